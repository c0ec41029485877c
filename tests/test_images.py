"""Image and mask decoding, SimpleNet preprocessing, batch loading with skips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comet_ray.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedImages,
    decode_image,
    decode_mask,
    load_samples,
    preprocess_image,
    preprocess_mask,
    resize_size,
)
from comet_ray.data.layout import build_sample_table
from comet_ray.errors import ImageDecodeError

from support.corpus import encode, png_header_only

# --- decode_image: modes -------------------------------------------------------------------------


def test_rgb_passes_through() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    img = decode_image(encode(Image.fromarray(pixels)), "rgb.png")
    assert img.mode == "RGB" and img.size == (20, 16)
    assert np.array_equal(np.asarray(img), pixels)


def test_grayscale_to_rgb() -> None:
    img = decode_image(encode(Image.new("L", (16, 16), 100)), "gray.png")
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (100, 100, 100)


def test_rgba_drops_alpha() -> None:
    img = decode_image(encode(Image.new("RGBA", (16, 16), (10, 20, 30, 0))), "rgba.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (10, 20, 30)


def test_la_drops_alpha() -> None:
    img = decode_image(encode(Image.new("LA", (16, 16), (70, 0))), "la.png")
    assert img.getpixel((0, 0)) == (70, 70, 70)


def test_palette_to_rgb() -> None:
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 200, 50, 25] + [0] * (256 * 3 - 6))
    img = decode_image(encode(pal), "palette.png")
    assert img.mode == "RGB" and img.getpixel((5, 5)) == (200, 50, 25)


@pytest.mark.parametrize("dtype, fmt", [("<u2", "PNG"), (">u2", "TIFF")])
def test_16_bit_scales_by_bit_depth(dtype: str, fmt: str) -> None:
    values = np.array([[0, 65535, 25700, 257 * 7]] * 8, dtype=np.uint16).astype(dtype)
    values = np.tile(values, (1, 2))  # 8 x 8
    source = Image.fromarray(values)
    assert source.mode.startswith("I;16")
    img = decode_image(encode(source, fmt), f"deep.{fmt.lower()}")
    row = np.asarray(img)[0, :4, 0]
    assert row.tolist() == [0, 255, 100, 7]  # scaled by 65535, not clipped at 255


def test_32_bit_int_holding_16_bit_values() -> None:
    values = np.tile(np.array([[0, 65535]], dtype=np.int32), (8, 4))
    img = decode_image(encode(Image.fromarray(values), "TIFF"), "int32.tif")
    assert np.asarray(img)[0, :2, 0].tolist() == [0, 255]


def test_cmyk_jpeg() -> None:
    img = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), "cmyk.jpg")
    r, g, b = img.getpixel((8, 8))
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    data = encode(Image.new("RGB", (40, 20), (0, 128, 0)), "JPEG", exif=exif.tobytes())
    assert decode_image(data, "rotated.jpg").size == (20, 40)


# --- decode_image: failures ----------------------------------------------------------------------


def _truncated_png() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (_truncated_png(), ""),
        (np.random.default_rng(2).bytes(4096), ""),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, ""),
        (encode(Image.new("RGB", (4, 4))), "too small"),
        (encode(Image.new("RGB", (100, 7))), "too small"),
        (png_header_only(10_000, 10_000), "too large"),  # 100 MP: PIL only warns, we refuse
        (png_header_only(20_000, 20_000), "too large"),  # 400 MP: PIL itself refuses
    ],
    ids=["zero-bytes", "truncated", "random", "bad-png", "tiny", "thin", "bomb-100mp", "bomb-400mp"],
)
def test_bad_images_raise_decode_error(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, "factory/cam3/img_0042.png")
    assert "factory/cam3/img_0042.png" in str(err.value)
    assert reason in err.value.reason
    assert err.value.path == "factory/cam3/img_0042.png"


# --- decode_mask ---------------------------------------------------------------------------------


def test_mask_8_bit_threshold_is_half_scale() -> None:
    values = np.array([[0, 127, 128, 255]] * 8, dtype=np.uint8).repeat(2, axis=1)
    mask = decode_mask(encode(Image.fromarray(values)), "m.png")
    assert mask.dtype == bool and mask.shape == (8, 8)
    assert mask[0, ::2].tolist() == [False, False, True, True]


def test_mask_1_bit_any_set_pixel() -> None:
    img = Image.new("1", (8, 8), 0)
    img.putpixel((2, 3), 1)
    mask = decode_mask(encode(img), "m.png")
    assert mask.sum() == 1 and mask[3, 2]


def test_mask_colour_and_16_bit() -> None:
    red = decode_mask(encode(Image.new("RGB", (8, 8), (255, 0, 0))), "red.png")
    assert red.all()
    deep = decode_mask(encode(Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))), "deep.png")
    assert deep.all()


def test_mask_failure_names_file() -> None:
    with pytest.raises(ImageDecodeError, match="gt/broken_mask.png"):
        decode_mask(b"not a png", "gt/broken_mask.png")


# --- preprocessing -------------------------------------------------------------------------------


def test_resize_size_matches_paper() -> None:
    assert resize_size(288) == 329
    assert resize_size(224) == 256


def test_preprocess_image_shape_and_normalisation() -> None:
    out = preprocess_image(Image.new("RGB", (80, 60), (255, 255, 255)), 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(out[:, 16, 16], expected, atol=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (64, 90)])
def test_mask_geometry_matches_image(size: tuple[int, int]) -> None:
    width, height = size
    mask = np.zeros((height, width), dtype=bool)
    mask[20:44, 30:50] = True
    img = Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    pixels = preprocess_image(img, 48)[0]
    target = preprocess_mask(mask, 48)
    assert target.shape == (48, 48) and target.dtype == torch.bool
    bright = pixels > 0.0  # normalised value of a mid-grey and above
    agreement = (bright == target).float().mean().item()
    assert agreement > 0.97


# --- load_samples --------------------------------------------------------------------------------


def test_load_samples_skips_corrupt_image(mvtec_tree: Path) -> None:
    train = [s for s in build_sample_table(str(mvtec_tree), "widget") if s.split == "train"]
    (mvtec_tree / "widget/train/good/003.png").write_bytes(b"garbage")
    loaded = load_samples(train, 32, None, with_masks=False, num_threads=3, progress=True)
    assert isinstance(loaded, LoadedImages)
    assert loaded.images.shape == (11, 3, 32, 32)
    assert "widget/train/good/003.png" not in loaded.sample_ids
    assert loaded.sample_ids == [s.sample_id for s in train if not s.sample_id.endswith("003.png")]
    assert loaded.masks is None and loaded.mask_available.shape == (11,)
    (record,) = loaded.skipped
    assert record["sample_id"] == "widget/train/good/003.png"
    assert record["uri"].endswith("003.png") and record["reason"]


def test_load_samples_images_match_single_preprocessing(mvtec_tree: Path) -> None:
    table = build_sample_table(str(mvtec_tree), "widget")[:3]
    loaded = load_samples(table, 32, None, with_masks=False)
    single = preprocess_image(decode_image(Path(table[1].uri).read_bytes(), "x"), 32)
    assert torch.equal(loaded.images[1], single)


def test_load_samples_masks_and_mask_issues(mvtec_tree: Path) -> None:
    gt = mvtec_tree / "widget/ground_truth"
    Image.new("L", (32, 32), 255).save(gt / "dent/001_mask.png")  # wrong size
    (gt / "dent/002_mask.png").write_bytes(b"\x89PNG broken")  # unreadable
    test = [s for s in build_sample_table(str(mvtec_tree), "widget") if s.split == "test"]
    loaded = load_samples(test, 32, None, with_masks=True)

    assert loaded.images.shape == (13, 3, 32, 32) and not loaded.skipped
    assert loaded.masks is not None and loaded.masks.shape == (13, 32, 32)
    issues = {m["sample_id"]: m["reason"] for m in loaded.mask_issues}
    expected = {"widget/test/dent/001.png", "widget/test/dent/002.png", "widget/test/scratch/004.png"}
    assert set(issues) == expected
    assert "no ground-truth mask" in issues["widget/test/scratch/004.png"]
    assert "32x32" in issues["widget/test/dent/001.png"]
    for i, sample_id in enumerate(loaded.sample_ids):
        available, mask = bool(loaded.mask_available[i]), loaded.masks[i]
        if "/good/" in sample_id:
            assert available and not mask.any()
        elif sample_id in issues:
            assert not available and not mask.any()
        else:
            assert available and mask.any()


def test_load_samples_empty_input() -> None:
    loaded = load_samples([], 16, None, with_masks=True)
    assert loaded.images.shape == (0, 3, 16, 16) and loaded.sample_ids == []


def test_load_real_bottle_images(
    bottle_root: Path,
) -> None:  # honours COMET_RAY_TEST_SHARED, skips without ../shared
    real_bottle = bottle_root / "mvtec_bottle"
    table = build_sample_table(str(real_bottle.parent), "mvtec_bottle")
    picked = [s for s in table if s.split == "test" and s.defect == "broken_large"][:2]
    picked += [s for s in table if s.split == "test" and s.defect == "good"][:1]
    loaded = load_samples(picked, 64, None, with_masks=True)
    assert loaded.images.shape == (3, 3, 64, 64) and not loaded.skipped and not loaded.mask_issues
    assert loaded.mask_available.all()
    assert loaded.masks[0].any() and not loaded.masks[2].any()
