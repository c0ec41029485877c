"""Options and printing shared by several subcommands (train, tune, evaluate, predict, demo)."""

from __future__ import annotations

import argparse
import os
import sys

from comet_ray.comet.schedule import check_experiment_knobs
from comet_ray.config import (
    STRATEGIES,
    TRAINING_FREE,
    FeatureConfig,
    TrainConfig,
    apply_overrides,
    check_strategy,
)
from comet_ray.errors import CometError
from comet_ray.models import MODELS
from comet_ray.table import format_table


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def add_training_options(parser: argparse.ArgumentParser, contamination_list: bool = False) -> None:
    defaults = TrainConfig()
    features = FeatureConfig()
    parser.add_argument(
        "data_root", help="dataset root holding <category>/{train,test,ground_truth} (or a category folder)"
    )
    parser.add_argument(
        "--category",
        required=True,
        help="category folder under DATA_ROOT; for train also 'all' or a comma-separated list",
    )
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help="baseline: plain detector; scl: confidence weights only; meta: meta-learning + lambda(Sigma) "
        "only; comet: both (default; baseline for --model knn, where scl leaves the images SCL "
        "flags out of the memory bank)",
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="simplenet",
        help="detector on the cached features: SimpleNet, a normalizing flow, or knn (the "
        "training-free PatchCore-style reference: no epochs; strategy baseline or scl)",
    )
    if contamination_list:
        parser.add_argument(
            "--contamination",
            default="0,0.05,0.1,0.2",
            help="comma-separated contamination levels (experimental conditions, never searched)",
        )
    else:
        parser.add_argument(
            "--contamination",
            type=float,
            default=0.0,
            help="experiments: move this fraction of anomalous test images into train (SoftPatch no-overlap protocol); 0 = use train/ as it is",
        )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seeds initialisation, batch order, tasks and noise (and the split, unless --split-seed)",
    )
    parser.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="seeds the contamination draw and the validation split (unset: the same as --seed)",
    )
    parser.add_argument(
        "--backbone",
        default=features.backbone,
        choices=("wide_resnet50_2", "resnet18", "mobilenet_v2"),
        help="frozen feature extractor (paper: wide_resnet50_2)",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="ImageNet weights file for the backbone (default: torchvision's hub cache)",
    )
    parser.add_argument(
        "--no-pretrained", action="store_true", help="use a randomly initialised backbone (tests, benchmarks)"
    )
    parser.add_argument(
        "--image-size", type=int, default=features.image_size, help="center-crop size in pixels (paper: 288)"
    )
    parser.add_argument(
        "--feature-dim",
        type=int,
        default=None,
        help="patch feature width (default: 1536 for WRN50, smaller for small backbones)",
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="outer CoMet epochs (paper: 40)")
    parser.add_argument(
        "--passes",
        type=int,
        default=defaults.passes,
        help="passes over the training set per epoch (paper: 4)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="images per training step (paper: 8)"
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=defaults.validation_fraction,
        help="share of the test split held out for the threshold and tuning (never reported on)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("COMET_RAY_CACHE"),
        help="reuse backbone features across runs from this folder (env COMET_RAY_CACHE)",
    )
    parser.add_argument(
        "--s3-endpoint",
        default=os.environ.get("AWS_ENDPOINT_URL"),
        help="endpoint of an S3-compatible store for s3:// roots (env AWS_ENDPOINT_URL)",
    )
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="feature extraction: in this process, or streamed through Ray Data (large or s3:// sets)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="override any knob of comet_ray.config, e.g. --set fence_k=2 --set noise_std=0.05 (repeatable)",
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    same_names = (
        "data_root",
        "category",
        "contamination",
        "seed",
        "split_seed",
        "epochs",
        "passes",
        "batch_size",
        "validation_fraction",
        "device",
    )  # options named as the knobs they set
    config = TrainConfig(**{name: getattr(args, name) for name in same_names}, out=getattr(args, "out", ""))
    config.features.backbone = args.backbone
    config.features.weights = args.weights
    config.features.pretrained = not args.no_pretrained
    config.features.image_size = args.image_size
    config.features.feature_dim = args.feature_dim
    config.model.model = args.model
    config.comet.strategy = args.strategy or ("baseline" if args.model in TRAINING_FREE else "comet")
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise CometError(f"--set expects KNOB=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_value(value.strip())
    try:
        config = apply_overrides(config, overrides) if overrides else config
    except KeyError as exc:
        raise CometError(f"--set: {exc.args[0]}") from None
    check_strategy(config.model.model, config.comet.strategy)
    check_experiment_knobs(config)  # before any feature is extracted or worker started
    return config


def print_epoch(total: int):
    def callback(_trainer, epoch_log) -> None:
        print(epoch_log.line(total), flush=True)

    return callback


def size(text: str) -> int:
    """Bytes from ``123``, ``80KB``, ``1.5GiB``, ... (K, M, G, T: powers of 1024)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = number[-1] if number and number[-1] in units else ""
    try:
        return int(float(number.removesuffix(unit)) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 24GiB)") from None


def report_left_out(records: list[dict], what: str, where: str, shown: int = 10) -> None:
    """Name what a command left out, on stderr: the first few with their reason, the count, and where all are listed."""
    if not records:
        return
    for record in records[:shown]:
        print(f"  {record.get('uri') or record.get('path')}: {record['reason']}", file=sys.stderr)
    more = f" (first {shown} above)" if len(records) > shown else ""
    print(f"{len(records)} {what}{more}; all listed in {where}", file=sys.stderr)


METRIC_COLUMNS = (
    "strategy",
    "contamination",
    "seed",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1_at_threshold",
    "f1_max_oracle",
    "mean_weight_injected",
    "mean_weight_nominal",
    "train_seconds",
)


def metrics_table(rows: list[dict]) -> str:
    """The table ``train`` and ``demo`` end with (F1-max: best threshold on the report split itself, an oracle)."""
    return format_table([{**row, "f1_max_oracle": row.get("f1_max")} for row in rows], METRIC_COLUMNS)
