"""A generated corpus of bad input: what production image folders really contain, in one MVTec-style root.

``write_bad_input_corpus(root)`` writes, beside a small usable texture category, every kind of
damage the hardening tests run through each CLI command, and returns what each command must make
of every entry, so tests assert on the exact set of files skipped, not on "it ran":

* ``messy``: a usable category whose ``train/`` and ``test/`` hide zero-byte, truncated, random-byte,
  misnamed, oversized (decompression bomb) and tiny images, decodable odd formats (16-bit,
  palette, CMYK, a JPEG named ``.png``), a non-UTF-8 file name, a link loop, a broken link, and
  masks that are missing, of the wrong size, 0/1-valued, JPEG-compressed or empty;
* ``empty``: a ``train/good/`` folder with nothing in it;
* ``only_anomalies``: a test split with defects and no good image (image AUROC is undefined);
* ``no_train``: a category folder with ``test/`` only.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from comet_ray.data.synthetic import make_texture_category

NON_UTF8_NAME = b"caf\xe9_latin1.png"  # "café" written by a Latin-1 system


@dataclass
class BadInputCorpus:
    """Where the corpus lies and what each command must make of it (ids are ``sample_id`` strings)."""

    root: Path
    usable_category: str = "messy"
    empty_category: str = "empty"
    only_anomalies_category: str = "only_anomalies"
    no_train_category: str = "no_train"
    skipped_at_decode: set[str] = field(default_factory=set)  # listed, then refused by the decoder
    left_out_at_listing: set[str] = field(default_factory=set)  # never listed: names, links, loops
    decoded_odd: set[str] = field(default_factory=set)  # odd but valid: must be used, not skipped
    mask_issues: set[str] = field(default_factory=set)  # anomalous test images whose mask is unusable
    masks_ok: set[str] = field(default_factory=set)  # anomalous test images whose odd mask must be read

    @property
    def size(self) -> int:
        """Bad or odd entries in the corpus (good filler images not counted), across all categories."""
        broken_categories = 3  # empty, only_anomalies, no_train
        return (
            len(self.skipped_at_decode)
            + len(self.left_out_at_listing)
            + len(self.decoded_odd)
            + len(self.mask_issues)
            + len(self.masks_ok)
            + broken_categories
        )


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    """Image -> file bytes in ``fmt``."""
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width`` x ``height``, with no pixel data (a bomb's shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def write_bad_input_corpus(root: str | Path, size: int = 64, seed: int = 0) -> BadInputCorpus:
    """Write the corpus under ``root`` (created) and return what to expect of it."""
    root = Path(root)
    corpus = BadInputCorpus(root)
    category = corpus.usable_category
    make_texture_category(
        root, category, n_train=14, n_test_good=6, defects={"spot": 8}, size=size, seed=seed
    )
    cat = root / category
    rng = np.random.default_rng(seed)
    good_bytes = (cat / "train/good/000.png").read_bytes()
    pixels = np.asarray(Image.open(io.BytesIO(good_bytes)).convert("RGB"))

    def put(rel: str, data: bytes) -> str:
        path = cat / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return f"{category}/{rel}"

    # Refused by the decoder: each is listed, skipped with its reason, and the run goes on.
    for rel, data in {
        "train/good/zero_bytes.png": b"",
        "train/good/truncated.png": good_bytes[: len(good_bytes) // 2],
        "train/good/truncated.jpg": encode(Image.fromarray(pixels), "JPEG")[:300],
        "train/good/random_bytes.png": rng.bytes(2048),
        "train/good/text_named.jpg": b"scan failed: camera 3 offline\n",
        "train/good/bomb_400mp.png": png_header_only(20_000, 20_000),
        "train/good/tiny_4px.png": encode(Image.new("RGB", (4, 4))),
        "test/good/zero_bytes.png": b"",
        "test/spot/truncated.png": good_bytes[:100],
    }.items():
        corpus.skipped_at_decode.add(put(rel, data))

    # Odd but valid: decoded and used.
    deep = (pixels[..., 0].astype(np.uint16) * 257).astype("<u2")
    palette = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    for rel, data in {
        "train/good/deep_16bit.png": encode(Image.fromarray(deep)),
        "train/good/palette.png": encode(palette),
        "train/good/cmyk.jpg": encode(Image.fromarray(pixels).convert("CMYK"), "JPEG", quality=95),
        "train/good/jpeg_named.png": encode(Image.fromarray(pixels), "JPEG", quality=95),
    }.items():
        corpus.decoded_odd.add(put(rel, data))

    # Never listed: a Latin-1 name, a link loop, a broken link (all in train/good).
    good_dir = cat / "train/good"
    with open(os.path.join(os.fsencode(good_dir), NON_UTF8_NAME), "wb") as handle:
        handle.write(good_bytes)
    corpus.left_out_at_listing.add(
        f"{category}/train/good/" + NON_UTF8_NAME.decode("utf-8", "backslashreplace")
    )
    os.symlink("..", good_dir / "loop_to_train")
    corpus.left_out_at_listing.add(f"{category}/train/good/loop_to_train")
    os.symlink("deleted_frame.png", good_dir / "broken_link.png")
    corpus.left_out_at_listing.add(f"{category}/train/good/broken_link.png")

    # Masks: spot/000..002 keep their generated masks; the rest are damaged or odd.
    gt = cat / "ground_truth/spot"
    mask = np.asarray(Image.open(gt / "003_mask.png"))
    Image.fromarray(mask[: size // 2, : size // 2]).save(gt / "003_mask.png")  # wrong size
    (gt / "004_mask.png").unlink()  # missing
    Image.fromarray(np.zeros_like(mask)).save(gt / "005_mask.png")  # empty for an anomaly
    corpus.mask_issues |= {f"{category}/test/spot/{i:03d}.png" for i in (3, 4, 5)}
    Image.fromarray((mask > 0).astype(np.uint8)).save(gt / "006_mask.png")  # values {0, 1}
    Image.open(gt / "007_mask.png").save(gt / "007_mask.jpg", "JPEG", quality=60)  # noisy edges
    (gt / "007_mask.png").unlink()
    corpus.masks_ok |= {f"{category}/test/spot/{i:03d}.png" for i in (6, 7)}

    # Broken categories.
    (root / corpus.empty_category / "train/good").mkdir(parents=True)
    (root / corpus.empty_category / "test/good").mkdir(parents=True)
    make_texture_category(
        root,
        corpus.only_anomalies_category,
        n_train=10,
        n_test_good=0,
        defects={"spot": 6},
        size=size,
        seed=seed + 1,
    )
    make_texture_category(
        root,
        corpus.no_train_category,
        n_train=0,
        n_test_good=3,
        defects={"spot": 2},
        size=size,
        seed=seed + 2,
    )
    return corpus
