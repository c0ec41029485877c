"""Helpers for tests and benchmarks (a local S3-compatible server, tiny settings); not used by runs themselves."""

# `comet-ray train` options for runs that take seconds on a CPU: a random-init MobileNetV2 at 64 px
# and a 32-wide head. For tests of plumbing, not of detection quality.
TINY_TRAIN_ARGS: list[str] = [
    "--backbone", "mobilenet_v2", "--no-pretrained", "--image-size", "64", "--feature-dim", "32",
    "--epochs", "2", "--passes", "1", "--set", "discriminator_hidden=32", "--set", "noise_std=0.1",
    "--set", "inner_steps=1", "--set", "meta_tasks=2", "--device", "cpu",
]
