"""Robust image/mask decoding and SimpleNet preprocessing.

Real factory data is messy: grayscale and 16-bit sensors, CMYK JPEGs, palette PNGs, rotated phone
shots, half-copied files. Decoding turns all of them into 8-bit RGB or refuses with one
:class:`ImageDecodeError` naming the file, so a bad image is skipped and reported, never a PIL
traceback. Preprocessing follows SimpleNet (method page section 2): shorter side to 329, center crop
288, ImageNet normalisation; masks get the same geometry.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

from comet_ray.data.layout import NOMINAL, Sample, read_bytes
from comet_ray.errors import ImageDecodeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MAX_PIXELS = 64_000_000  # refuse larger images: a tiny file can claim gigapixels (decompression bomb)
MIN_SIDE = 8  # smaller images cannot survive the backbone's stride-16 features meaningfully

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode image bytes into a fully loaded 8-bit RGB image, or raise :class:`ImageDecodeError`.

    EXIF orientation is applied so the pixels match what a viewer shows; alpha is dropped (not
    composited) because industrial images use it, if at all, for nothing the detector should see.
    """
    img = _open_checked(data, name)
    try:
        img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)
    except Exception as exc:  # malformed EXIF/pixels raise assorted types
        raise ImageDecodeError(name, _describe(exc)) from exc


def decode_mask(data: bytes, name: str) -> np.ndarray:
    """Decode a ground-truth mask of any mode into a bool ``[H, W]`` array (True = anomalous).

    1-bit masks: any set pixel is anomalous. Label masks, with exactly two values (``{0, 255}`` as in
    MVTec, but also ``{0, 1}`` as many tools write them): any non-zero pixel is anomalous; a
    half-scale threshold would read a 0/1 mask as empty. Anything else (anti-aliased or
    JPEG-compressed edges) is brought to 8 bits and thresholded at ``>= 128``, so compression noise
    does not flip the label; colour masks use the brightest channel so a pure red mask still counts.
    """
    img = _open_checked(data, name)
    try:
        if img.mode == "1":
            return np.asarray(img, dtype=bool).copy()
        if img.mode in _HIGH_DEPTH_MODES:
            return _binarise_mask(np.asarray(img).astype(np.float64), _high_depth_to_uint8(img))
        if img.mode in ("L", "LA", "La"):
            gray = np.asarray(img.getchannel(0))
        else:
            gray = np.asarray(img.convert("RGB")).max(axis=2)
        return _binarise_mask(gray, gray)
    except Exception as exc:  # see _open_checked
        raise ImageDecodeError(name, _describe(exc)) from exc


def _binarise_mask(raw: np.ndarray, eight_bit: np.ndarray) -> np.ndarray:
    values = np.unique(raw)
    if len(values) == 2 and values[0] == 0:  # a label mask: background 0, one anomaly value
        return raw > 0
    return eight_bit >= 128


def resize_size(image_size: int) -> int:
    """Shorter-side size before the center crop, in the paper's ratio 329 → 288 (round half up)."""
    return math.floor(image_size * 329 / 288 + 0.5)


def crop_image(img: Image.Image, image_size: int) -> torch.Tensor:
    """RGB image → uint8 ``[3, S, S]``: shorter side to :func:`resize_size`, center crop (SimpleNet's geometry).

    The Ray Data pipeline ships these uint8 crops (4x less object-store traffic than float32) and
    normalises them on the backbone's side: :func:`preprocess_image` is exactly the two steps.
    """
    tensor = TF.pil_to_tensor(img)  # uint8 [3, H, W]
    tensor = TF.resize(tensor, [resize_size(image_size)], InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(tensor, [image_size, image_size]).contiguous()


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, S, S]`` → ImageNet-normalised float32."""
    tensor = TF.to_dtype(images, torch.float32, scale=True)
    return TF.normalize(tensor, list(IMAGENET_MEAN), list(IMAGENET_STD)).contiguous()


def preprocess_image(img: Image.Image, image_size: int) -> torch.Tensor:
    """RGB image → normalised ``[3, S, S]`` float32 tensor (SimpleNet input)."""
    return normalise_images(crop_image(img, image_size))


def preprocess_mask(mask: np.ndarray, image_size: int) -> torch.Tensor:
    """Bool ``[H, W]`` mask → bool ``[S, S]`` with exactly the image's resize and crop.

    NEAREST_EXACT uses the same half-pixel grid as the bilinear image resize (plain NEAREST is
    shifted by half a pixel), so mask and image stay aligned.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None]
    tensor = TF.resize(tensor, [resize_size(image_size)], InterpolationMode.NEAREST_EXACT, antialias=False)
    tensor = TF.center_crop(tensor, [image_size, image_size])
    return tensor[0].bool()


@dataclass
class LoadedImages:
    """A batch of preprocessed samples plus an account of what could not be used.

    ``skipped`` images are absent from ``images``; ``mask_issues`` images are present (usable for
    image-level metrics) but their ``mask_available`` is False, so pixel metrics leave them out.
    """

    images: torch.Tensor  # [N, 3, S, S] float32
    sample_ids: list[str]
    masks: torch.Tensor | None  # [N, S, S] bool; zeros where no anomaly (or no mask) is known
    mask_available: torch.Tensor  # [N] bool
    skipped: list[dict] = field(default_factory=list)  # {sample_id, uri, reason}
    mask_issues: list[dict] = field(default_factory=list)  # {sample_id, uri, reason}


def load_samples(
    samples: Sequence[Sample],
    image_size: int,
    filesystem: pafs.FileSystem | None,
    with_masks: bool,
    num_threads: int = 4,
    progress: bool = False,
) -> LoadedImages:
    """Read, decode and preprocess ``samples`` in a thread pool (PIL and torch release the GIL).

    Unreadable images are skipped and listed with the reason instead of stopping the run. With
    ``with_masks``: nominal test images get an all-zero mask that counts as available; anomalies
    (test or injected) load their mask, and a missing, unreadable or wrongly sized mask is listed in
    ``mask_issues``. Plain train images are unlabelled: zero mask, not available, not an issue.
    """
    n = len(samples)
    images = torch.empty((n, 3, image_size, image_size), dtype=torch.float32)
    masks = torch.zeros((n, image_size, image_size), dtype=torch.bool) if with_masks else None
    mask_available = torch.zeros(n, dtype=torch.bool)

    def work(index: int) -> tuple[dict | None, dict | None]:
        sample = samples[index]
        try:
            img = decode_image(read_bytes(sample.uri, filesystem), sample.uri)
        except ImageDecodeError as exc:
            return _issue(sample, exc.reason), None
        images[index] = preprocess_image(img, image_size)
        if masks is None:
            return None, None
        reason = _load_mask(sample, img.size, image_size, filesystem, masks, index)
        if reason is None:
            mask_available[index] = sample.split == "test" or sample.injected
            return None, None
        return None, _issue(sample, reason)

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = _with_progress(pool.map(work, range(n)), n, progress)
        outcomes = list(results)

    skipped = [s for s, _ in outcomes if s is not None]
    mask_issues = [m for _, m in outcomes if m is not None]
    keep = [i for i, (s, _) in enumerate(outcomes) if s is None]
    if len(keep) < n:  # copy only when something was skipped
        index = torch.tensor(keep, dtype=torch.long)
        images, mask_available = images[index], mask_available[index]
        masks = masks[index] if masks is not None else None
    return LoadedImages(
        images=images,
        sample_ids=[samples[i].sample_id for i in keep],
        masks=masks,
        mask_available=mask_available,
        skipped=skipped,
        mask_issues=mask_issues,
    )


# --- helpers -------------------------------------------------------------------------------------


def _open_checked(data: bytes, name: str) -> Image.Image:
    """Open and fully decode, refusing empty, oversized and tiny images."""
    if not data:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns from ~89 MP on; our own, lower limit below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_size(img.width, img.height, name)
            img.load()  # full decode here, so truncation is caught here
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(name, f"image too large ({exc}); limit is {_mp(MAX_PIXELS)}") from exc
    except Exception as exc:  # PIL plugins raise OSError, SyntaxError, struct.error, ...
        raise ImageDecodeError(name, _describe(exc)) from exc
    return img


def _check_size(width: int, height: int, name: str) -> None:
    if width * height > MAX_PIXELS:
        size = f"{width}x{height} = {_mp(width * height)}"
        raise ImageDecodeError(name, f"image too large: {size} exceeds the {_mp(MAX_PIXELS)} limit")
    if min(width, height) < MIN_SIDE:
        raise ImageDecodeError(
            name, f"image too small: {width}x{height}, need at least {MIN_SIDE} px per side"
        )


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):  # its text names a BytesIO address, different every run
        return "UnidentifiedImageError: not a recognised image format (or the header is corrupt)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_high_depth_to_uint8(img)).convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "palette images with transparency..." is expected here
        return img.convert("RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a >8-bit single-channel image to uint8 by its container's bit depth (not by clipping).

    16-bit modes divide by 65535. Mode "I" is how 16-bit data often arrives too, so values that fit
    in 16 bits use that scale; wider or negative ranges (and float images outside [0, 1]) are
    min-max scaled since no fixed depth describes them.
    """
    arr = np.asarray(img).astype(np.float64)
    fits_16_bit = bool(arr.size) and arr.min() >= 0 and arr.max() <= 65535
    if img.mode.startswith("I;16") or (img.mode == "I" and fits_16_bit):
        scaled = arr / 65535.0
    elif img.mode == "F" and arr.size and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1:
        scaled = arr
    else:
        arr = np.nan_to_num(arr)
        low, high = float(arr.min()), float(arr.max())
        scaled = (arr - low) / (high - low) if high > low else np.zeros_like(arr)
    return np.rint(scaled * 255.0).astype(np.uint8)


def _load_mask(
    sample: Sample,
    image_size_wh: tuple[int, int],
    image_size: int,
    filesystem: pafs.FileSystem | None,
    masks: torch.Tensor,
    index: int,
) -> str | None:
    """Fill ``masks[index]``; return a reason when the sample's mask cannot be used."""
    if sample.split == "test" and sample.defect == NOMINAL:
        return None  # all-zero mask, already in place
    if not sample.is_anomalous:
        return None  # unlabelled train image: no mask expected
    if sample.mask_uri is None:
        return "no ground-truth mask for this anomalous image"
    try:
        mask = decode_mask(read_bytes(sample.mask_uri, filesystem), sample.mask_uri)
    except ImageDecodeError as exc:
        return f"mask unreadable: {exc}"
    width, height = image_size_wh
    if mask.shape != (height, width):
        return f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}"
    if not mask.any():
        return "mask is empty (no anomalous pixel) for an image labelled anomalous"
    masks[index] = preprocess_mask(mask, image_size)
    return None


def _issue(sample: Sample, reason: str) -> dict:
    return {"sample_id": sample.sample_id, "uri": sample.uri, "reason": reason}


def _with_progress(iterable, total: int, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety, never a dependency
        return iterable
    return tqdm(iterable, total=total, desc="decoding images", unit="img")
