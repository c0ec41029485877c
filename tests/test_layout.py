"""The sample table built from an MVTec-AD-style tree."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from comet_ray.data.layout import (
    Sample,
    build_sample_table,
    list_categories,
    open_dataset_filesystem,
    read_bytes,
)
from comet_ray.errors import DatasetLayoutError, ImageDecodeError


def test_table_counts_labels_and_masks(mvtec_tree: Path) -> None:
    table = build_sample_table(str(mvtec_tree), "widget")
    train = [s for s in table if s.split == "train"]
    test = [s for s in table if s.split == "test"]
    assert len(train) == 12 and len(test) == 13
    assert {s.defect for s in test} == {"good", "scratch", "dent"}
    assert not any(s.is_anomalous for s in train)
    assert sum(s.is_anomalous for s in test) == 9
    assert all(s.mask_uri is None for s in table if not s.is_anomalous)
    missing = [s.sample_id for s in test if s.is_anomalous and s.mask_uri is None]
    assert missing == ["widget/test/scratch/004.png"]
    dent = next(s for s in table if s.sample_id == "widget/test/dent/002.png")
    assert dent.uri == str(mvtec_tree / "widget/test/dent/002.png")
    assert dent.mask_uri == str(mvtec_tree / "widget/ground_truth/dent/002_mask.png")
    assert dent.category == "widget"


def test_table_ids_are_stable_and_sorted(mvtec_tree: Path) -> None:
    first = build_sample_table(str(mvtec_tree), "widget")
    second = build_sample_table(str(mvtec_tree) + "/", "widget")
    ids = [s.sample_id for s in first]
    assert ids == sorted(ids)
    assert first == second
    assert ids[0] == "widget/test/dent/000.png"
    assert "widget/train/good/011.png" in ids


def test_ignores_hidden_and_non_image_files(mvtec_tree: Path) -> None:
    good = mvtec_tree / "widget/train/good"
    (good / ".hidden.png").write_bytes(b"x")
    (good / "notes.txt").write_text("not an image")
    (good / "UPPER.PNG").write_bytes((good / "000.png").read_bytes())
    hidden_dir = good / ".ipynb_checkpoints"
    hidden_dir.mkdir()
    (hidden_dir / "000.png").write_bytes(b"x")
    ids = {s.sample_id for s in build_sample_table(str(mvtec_tree), "widget")}
    assert "widget/train/good/UPPER.PNG" in ids
    assert sum(i.startswith("widget/train/") for i in ids) == 13


def test_root_may_be_the_category_folder(mvtec_tree: Path) -> None:
    from_parent = build_sample_table(str(mvtec_tree), "widget")
    assert build_sample_table(str(mvtec_tree / "widget")) == from_parent
    assert build_sample_table(str(mvtec_tree / "widget"), "widget") == from_parent
    assert list_categories(str(mvtec_tree / "widget")) == ["widget"]
    with pytest.raises(DatasetLayoutError, match="category folder 'widget'"):
        build_sample_table(str(mvtec_tree / "widget"), "gadget")


def test_list_categories(mvtec_tree: Path) -> None:
    (mvtec_tree / "gadget/train/good").mkdir(parents=True)
    (mvtec_tree / "not_a_category").mkdir()
    (mvtec_tree / ".cache/train").mkdir(parents=True)
    assert list_categories(str(mvtec_tree)) == ["gadget", "widget"]


def test_explicit_filesystem(mvtec_tree: Path) -> None:
    table = build_sample_table(str(mvtec_tree), "widget", filesystem=pafs.LocalFileSystem())
    assert table == build_sample_table(str(mvtec_tree), "widget")
    fs, base = open_dataset_filesystem(str(mvtec_tree))
    assert base == str(mvtec_tree)
    assert read_bytes(table[0].uri, fs) == Path(table[0].uri).read_bytes()


def test_read_bytes_missing_file_is_a_decode_error(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="nope.png"):
        read_bytes(str(tmp_path / "nope.png"), pafs.LocalFileSystem())


def test_s3_filesystem_with_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing is contacted: building the filesystem and the base path is all that is checked.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    fs, base = open_dataset_filesystem("s3://bucket/datasets/mvtec/", s3_endpoint="http://127.0.0.1:9")
    assert isinstance(fs, pafs.S3FileSystem)
    assert base == "bucket/datasets/mvtec"


# --- errors --------------------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist") as err:
        build_sample_table(str(tmp_path / "absent"), "widget")
    assert str(tmp_path / "absent") in str(err.value)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        list_categories(str(tmp_path / "absent"))


def test_missing_category_lists_available(mvtec_tree: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"'gadget' not found.*available: \['widget'\]"):
        build_sample_table(str(mvtec_tree), "gadget")


def test_no_categories(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="no category found"):
        list_categories(str(tmp_path))


def test_no_train_folder(mvtec_tree: Path) -> None:
    shutil.rmtree(mvtec_tree / "widget/train")
    with pytest.raises(DatasetLayoutError, match="has no train/ folder"):
        build_sample_table(str(mvtec_tree), "widget")


def test_empty_train_folder(mvtec_tree: Path) -> None:
    for png in (mvtec_tree / "widget/train/good").iterdir():
        png.unlink()
    (mvtec_tree / "widget/train/good/readme.txt").write_text("no images")
    with pytest.raises(DatasetLayoutError, match="contains no images") as err:
        build_sample_table(str(mvtec_tree), "widget")
    assert str(mvtec_tree / "widget/train") in str(err.value)


def test_missing_test_folder_is_allowed(mvtec_tree: Path) -> None:
    shutil.rmtree(mvtec_tree / "widget/test")
    table = build_sample_table(str(mvtec_tree), "widget")
    assert len(table) == 12 and all(s.split == "train" for s in table)


def test_loose_test_image_is_an_error(mvtec_tree: Path) -> None:
    shutil.copy(mvtec_tree / "widget/test/good/000.png", mvtec_tree / "widget/test/loose.png")
    with pytest.raises(DatasetLayoutError, match="loose.png"):
        build_sample_table(str(mvtec_tree), "widget")


def test_is_anomalous_rules() -> None:
    base = {"category": "c", "uri": "/x", "mask_uri": None}
    assert Sample("c/test/dent/0.png", split="test", defect="dent", **base).is_anomalous
    assert not Sample("c/test/good/0.png", split="test", defect="good", **base).is_anomalous
    assert not Sample("c/train/good/0.png", split="train", defect="good", **base).is_anomalous
    assert Sample("c/test/dent/0.png", split="train", defect="dent", injected=True, **base).is_anomalous


# --- real data -----------------------------------------------------------------------------------


def test_real_mvtec_bottle(
    bottle_root: Path,
) -> None:  # honours COMET_RAY_TEST_SHARED, skips without ../shared
    real_bottle = bottle_root / "mvtec_bottle"
    table = build_sample_table(str(real_bottle.parent), "mvtec_bottle")
    train = [s for s in table if s.split == "train"]
    test = [s for s in table if s.split == "test"]
    defects = [s for s in test if s.is_anomalous]
    assert (len(train), len(test), len(defects)) == (209, 83, 63)
    assert all(s.mask_uri is not None and Path(s.mask_uri).is_file() for s in defects)
    assert build_sample_table(str(real_bottle)) == table
