"""The Ray Data feature pipeline: same features as the in-process extractor, from S3 or disk, corrupt
objects skipped and listed, the cache entry written by the actors reused, and datasets larger than the
object store.

One module-scoped local Ray (2 CPUs, an 80 MiB object store: near Ray's 75 MiB minimum) and the
session's SeaweedFS server; every pipeline uses a random-init mobilenet_v2 at small sizes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")

from comet_ray.config import FeatureConfig
from comet_ray.data.images import crop_image, decode_image, normalise_images, preprocess_image
from comet_ray.data.layout import build_sample_table, open_dataset_filesystem
from comet_ray.errors import StorageError
from comet_ray.features import streaming
from comet_ray.features.entry import INDEX_FILE, PARTS_DIR
from comet_ray.features.extractor import (
    PatchFeatureExtractor,
    extract_features,
    extract_features_cached,
    open_entry,
    read_split,
)
from comet_ray.features.stream_collect import stream_features
from comet_ray.features.streaming import StorageSpec, StreamOptions, extract_to_entry_streaming

from support.s3server import FAKE_ACCESS_KEY

OBJECT_STORE = 80 * 1024 * 1024
CONFIG = FeatureConfig(backbone="mobilenet_v2", pretrained=False, image_size=64, feature_dim=32, batch_size=8)
OPTIONS = StreamOptions(decode_batch_size=8, read_threads=4, actor_cpus=1.0, decode_cpus=0.5)


@pytest.fixture(scope="module")
def local_ray(s3_env):
    """A private local Ray; started after ``s3_env`` so its workers inherit the S3 credentials."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        address="local",
        object_store_memory=OBJECT_STORE,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def extractor() -> PatchFeatureExtractor:
    return PatchFeatureExtractor(CONFIG, "cpu")


def _assert_same_split(got, expected) -> None:
    assert got.store.ids == expected.store.ids
    assert got.store.grid == expected.store.grid
    assert got.store.features.dtype == expected.store.features.dtype
    torch.testing.assert_close(
        got.store.features.float(), expected.store.features.float(), atol=2e-3, rtol=2e-3
    )
    assert torch.equal(got.masks, expected.masks)
    assert torch.equal(got.mask_available, expected.mask_available)
    assert got.mask_issues == expected.mask_issues


def test_uint8_crop_then_normalise_is_preprocess_image(tmp_path) -> None:
    rng = np.random.default_rng(1)
    for width, height, size in ((64, 64, 64), (97, 51, 32), (300, 200, 288)):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        img = decode_image(_png_bytes(pixels), "x.png")
        crop = crop_image(img, size).numpy()
        assert crop.dtype == np.uint8 and crop.shape == (3, size, size)
        assert torch.equal(normalise_images(torch.from_numpy(crop)[None])[0], preprocess_image(img, size))


def test_s3_stream_equals_in_process_and_reuses_the_entry(
    local_ray, s3_dataset, s3_server, extractor, monkeypatch
) -> None:
    """The pipeline hook: S3 in, a cache entry on S3 written by the actors, same result as in process."""
    root = "s3://comet-test/corrupt"
    fs, _ = open_dataset_filesystem(root, s3_server.endpoint)
    samples = build_sample_table(root, "weave", fs)
    expected = extract_features_cached(samples, extractor, fs, True, None)
    cache = "s3://comet-test/stream-cache"
    ids = [s.sample_id for s in samples]

    entry, origin = extract_to_entry_streaming(
        samples, extractor, s3_server.endpoint, True, cache, options=OPTIONS
    )
    assert (
        origin.startswith(f"extracted {len(samples) - 1} images into the cache {cache}/")
        and "on 1 node" in origin
    )
    got = read_split(entry, ids, True)
    _assert_same_split(got, expected)
    assert [(s["sample_id"], s["uri"]) for s in got.skipped] == [
        (s["sample_id"], s["uri"]) for s in expected.skipped
    ]
    assert [s["uri"] for s in got.skipped] == ["s3://comet-test/corrupt/weave/train/good/zz_corrupt.png"]
    assert got.skipped[0]["reason"].startswith("UnidentifiedImageError")
    assert len(got.store) == len(samples) - 1 and got.masks.shape[0] == len(samples) - 1
    # the actors wrote the parts (one per batch: who, where and when is in the index); the driver the index
    assert len(entry.parts) == -(-len(samples) // OPTIONS.decode_batch_size)
    assert all(part["node"] and part["finished"] >= part["started"] for part in entry.parts)
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="comet-test", Prefix="stream-cache/")["Contents"]]
    assert sum(f"/{PARTS_DIR}/" in k and k.endswith(".npy") and ".mask" not in k for k in keys) == len(
        entry.parts
    )
    assert sum(k.endswith("/" + INDEX_FILE) for k in keys) == 1

    # another run (epoch, seed, Tune trial) reads the entry back without running the pipeline
    monkeypatch.setattr(streaming, "build_dataset", lambda *a, **k: pytest.fail("pipeline ran again"))
    again, origin = extract_to_entry_streaming(
        samples, extractor, s3_server.endpoint, True, cache, options=OPTIONS
    )
    assert origin.startswith(f"read {len(samples) - 1} images from the cache")
    _assert_same_split(read_split(again, ids, True), got)
    # the same entry the in-process path looks for: one cache whichever engine filled it
    _assert_same_split(
        extract_features_cached(samples, extractor, fs, True, cache, s3_endpoint=s3_server.endpoint), got
    )
    _assert_same_split(read_split(open_entry(entry.shown, s3_server.endpoint), ids, True), got)


def test_collect_mode_from_local_disk(local_ray, s3_dataset, extractor) -> None:
    local, _ = s3_dataset
    samples = [s for s in build_sample_table(str(local), "weave") if s.split == "test"][:10]
    expected = extract_features(samples, extractor, None, with_masks=True)
    got = stream_features(samples, CONFIG, options=OPTIONS, extractor=extractor)  # no output: collected
    _assert_same_split(got, expected)
    assert got.skipped == [] and len(got.store) == 10 and bool(got.mask_available.any())


def test_storage_failure_in_a_worker_is_one_line(local_ray, s3_dataset, s3_server) -> None:
    root = "s3://comet-test/datasets/mvtec"
    samples = build_sample_table(root, "weave", open_dataset_filesystem(root, s3_server.endpoint)[0])[:2]
    wrong = StorageSpec(s3_server.endpoint, access_key=FAKE_ACCESS_KEY, secret_key="wrong" * 8)
    ds = ray.data.from_items(streaming._sample_rows(samples)).map_batches(
        streaming._decode_batch,
        batch_format="numpy",
        num_cpus=0.5,
        fn_kwargs={"image_size": 64, "with_masks": True, "storage": wrong, "read_threads": 2},
    )
    with pytest.raises(StorageError, match="access denied to s3://comet-test/datasets/mvtec/weave/") as err:
        streaming._run(ds.take_all)
    assert "wrong" * 8 not in str(err.value) and "\n" not in str(err.value)


def test_dataset_larger_than_the_object_store_streams_to_an_entry(local_ray, tmp_path) -> None:
    # 170 images at 128 px with 1024-wide features: 170 * (3*128*128 + 16*16*1024*2) bytes = 97 MiB
    # through an 80 MiB object store (real settings are bigger still: WRN50 at 288 px is 4 MiB/image).
    size, count, dim = 128, 170, 1024
    folder = tmp_path / "data" / "big" / "train" / "good"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(count):
        base = 128 + 60 * np.sin(x / (3 + i % 7) + rng.uniform(0, 6)) * np.cos(y / 11)
        pixels = np.clip(base[..., None] + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=85)
    samples = build_sample_table(str(tmp_path / "data"), "big")
    config = FeatureConfig(
        backbone="mobilenet_v2", pretrained=False, image_size=size, feature_dim=dim, batch_size=16
    )
    grid = (size // 8, size // 8)
    through_store = count * (3 * size * size + grid[0] * grid[1] * dim * 2)
    capacity = int(ray.cluster_resources()["object_store_memory"])
    assert through_store > capacity
    output = tmp_path / "features"
    got = stream_features(
        samples,
        config,
        output=str(output),
        with_masks=False,
        options=StreamOptions(decode_batch_size=16, read_threads=4),
    )
    assert len(got.store) == count and got.skipped == []
    assert got.store.features.shape == (count, grid[0] * grid[1], dim)
    assert got.store.ids == [s.sample_id for s in samples]
    assert float(got.store.features[-1].float().abs().sum()) > 0
    assert json.loads((output / INDEX_FILE).read_text())["skipped"] == []
    assert got.store.nbytes > capacity and len(list((output / PARTS_DIR).glob("*.npy"))) == -(-count // 16)


def _png_bytes(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
