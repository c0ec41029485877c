"""Property test: any byte string handed to the decoder either decodes or raises ImageDecodeError."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from comet_ray.data.images import decode_image, decode_mask
from comet_ray.errors import ImageDecodeError


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


VALID = _png(0)


def _only_documented_errors(data: bytes) -> None:
    for decoder in (decode_image, decode_mask):
        try:
            decoder(data, "fuzz.png")
        except ImageDecodeError as exc:
            assert "fuzz.png" in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    _only_documented_errors(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=16), st.booleans())
def test_mutated_and_truncated_pngs_never_crash_the_decoder(
    position: int, patch: bytes, truncate: bool
) -> None:
    data = VALID[:position] if truncate else VALID[:position] + patch + VALID[position + len(patch) :]
    _only_documented_errors(data)
