"""Undefined metrics are written as JSON ``null``: files stay readable by strict parsers."""

from __future__ import annotations

import json
import math

import pytest

from comet_ray import jsonfile


def test_nan_and_infinities_become_null_at_any_depth_and_finite_values_are_kept() -> None:
    value = {"auroc": float("nan"), "f1": 0.5, "rows": [{"loss": float("inf")}, (1, -math.inf)], "name": "x"}
    text = jsonfile.dumps(value, indent=2)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"auroc": None, "f1": 0.5, "rows": [{"loss": None}, [1, None]], "name": "x"}


def test_what_cannot_be_json_is_refused_rather_than_written() -> None:
    with pytest.raises(TypeError):
        jsonfile.dumps({"tensor": object()})
