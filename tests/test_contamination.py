"""Contamination injection (no-overlap protocol) and the validation split carved from test."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from comet_ray.data.contamination import inject_contamination
from comet_ray.data.layout import Sample, build_sample_table
from comet_ray.data.splits import validation_split


def make_table(n_train: int, defects: dict[str, int], n_good: int = 4) -> list[Sample]:
    """A sample table without files: contamination and splits only read the table."""
    rows = [("train", "good", i) for i in range(n_train)] + [("test", "good", i) for i in range(n_good)]
    rows += [("test", d, i) for d, count in defects.items() for i in range(count)]
    table = [
        Sample(
            sample_id=f"c/{split}/{defect}/{i:03d}.png",
            category="c",
            split=split,
            uri=f"/data/c/{split}/{defect}/{i:03d}.png",
            defect=defect,
            mask_uri=None if defect == "good" else f"/data/c/ground_truth/{defect}/{i:03d}_mask.png",
        )
        for split, defect, i in rows
    ]
    return sorted(table, key=lambda s: s.sample_id)


def moved_ids(samples: list[Sample]) -> set[str]:
    return {s.sample_id for s in samples if s.injected}


# --- inject_contamination ------------------------------------------------------------------------


@pytest.mark.parametrize("ratio, expected", [(0.05, 5), (0.10, 11), (0.20, 25)])
def test_ratio_math(ratio: float, expected: int) -> None:
    table = make_table(100, {"crack": 30, "hole": 30})
    result, manifest = inject_contamination(table, ratio, seed=0)
    assert manifest.n_moved == expected == len(moved_ids(result))  # round(ρ·100/(1−ρ))
    assert manifest.n_train_nominal == 100 and not manifest.capped
    assert manifest.achieved_ratio == pytest.approx(expected / (100 + expected))
    assert sum(s.split == "train" for s in result) == 100 + expected


def test_no_overlap_and_traceable_ids(mvtec_tree: Path) -> None:
    table = build_sample_table(str(mvtec_tree), "widget")
    result, manifest = inject_contamination(table, 0.2, seed=3)  # round(0.2·12/0.8) = 3
    assert manifest.n_moved == 3
    moved = moved_ids(result)
    remaining_test = {s.sample_id for s in result if s.split == "test"}
    assert moved and not moved & remaining_test
    assert {s.sample_id for s in result} == {s.sample_id for s in table}  # ids unchanged, none lost
    for sample in result:
        if sample.injected:
            assert sample.split == "train" and sample.is_anomalous and sample.defect != "good"
            assert sample.sample_id.startswith("widget/test/")  # still names the original file
    assert [m["sample_id"] for m in manifest.moved] == sorted(moved)
    assert all(set(m) == {"sample_id", "uri", "defect"} for m in manifest.moved)
    assert json.loads(json.dumps(manifest.to_dict()))["seed"] == 3


def test_deterministic_per_seed_and_seeds_differ() -> None:
    table = make_table(50, {"crack": 20, "hole": 20})
    first = inject_contamination(table, 0.1, seed=7)
    again = inject_contamination(table, 0.1, seed=7)
    assert first == again
    selections = {frozenset(moved_ids(inject_contamination(table, 0.1, seed=s)[0])) for s in range(5)}
    assert len(selections) > 1


def test_cap_keeps_a_third_of_each_defect(mvtec_tree: Path) -> None:
    table = build_sample_table(str(mvtec_tree), "widget")  # 12 train; scratch 5, dent 4
    result, manifest = inject_contamination(table, 0.5, seed=0)  # asks for 12
    # keep ceil(5/3) = 2 scratch and ceil(4/3) = 2 dent: at most 3 + 2 may move
    assert manifest.capped and manifest.n_moved == 5
    assert manifest.achieved_ratio == pytest.approx(5 / 17)
    assert manifest.requested_ratio == 0.5
    left = Counter(s.defect for s in result if s.split == "test")
    assert left == Counter({"good": 4, "scratch": 2, "dent": 2})


def test_exactly_at_the_cap_is_not_capped(mvtec_tree: Path) -> None:
    table = build_sample_table(str(mvtec_tree), "widget")
    _, manifest = inject_contamination(table, 0.3, seed=0)  # round(0.3·12/0.7) = 5
    assert manifest.n_moved == 5 and not manifest.capped


def test_zero_ratio_moves_nothing(mvtec_tree: Path) -> None:
    table = build_sample_table(str(mvtec_tree), "widget")
    result, manifest = inject_contamination(table, 0.0, seed=0)
    assert result == table
    assert manifest.n_moved == 0 and manifest.moved == [] and manifest.achieved_ratio == 0.0
    assert not manifest.capped


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_out_of_range(ratio: float) -> None:
    with pytest.raises(ValueError, match="ratio"):
        inject_contamination(make_table(10, {"crack": 5}), ratio, seed=0)


def test_refuses_double_injection() -> None:
    once, _ = inject_contamination(make_table(10, {"crack": 9}), 0.2, seed=0)
    with pytest.raises(ValueError, match="already"):
        inject_contamination(once, 0.2, seed=0)


# --- validation_split ----------------------------------------------------------------------------


def test_validation_split_is_stratified_and_disjoint(mvtec_tree: Path) -> None:
    test = [s for s in build_sample_table(str(mvtec_tree), "widget") if s.split == "test"]
    validation, report = validation_split(test, 0.3, seed=0)
    assert not {s.sample_id for s in validation} & {s.sample_id for s in report}
    assert sorted(validation + report, key=lambda s: s.sample_id) == test
    # round(0.3·4) = 1 good, round(0.3·5) = 2 scratch, round(0.3·4) = 1 dent
    assert Counter(s.defect for s in validation) == Counter({"good": 1, "scratch": 2, "dent": 1})
    assert [s.sample_id for s in validation] == sorted(s.sample_id for s in validation)


def test_validation_split_small_strata() -> None:
    test = [s for s in make_table(0, {"tiny": 2, "single": 1, "big": 10}, n_good=3) if s.split == "test"]
    validation, report = validation_split(test, 0.05, seed=1)  # rounds to 0: at least 1 from each
    assert Counter(s.defect for s in validation) == Counter({"tiny": 1, "big": 1, "good": 1})
    validation, report = validation_split(test, 0.95, seed=1)  # rounds to all: keep 1 in report
    assert Counter(s.defect for s in report) == Counter({"tiny": 1, "single": 1, "big": 1, "good": 1})


def test_validation_split_deterministic_and_seeded() -> None:
    test = [s for s in make_table(0, {"crack": 20, "hole": 15}, n_good=20) if s.split == "test"]
    assert validation_split(test, 0.3, seed=4) == validation_split(test, 0.3, seed=4)
    picks = {tuple(s.sample_id for s in validation_split(test, 0.3, seed=s)[0]) for s in range(4)}
    assert len(picks) > 1


def test_validation_split_strata_independent() -> None:
    test = [s for s in make_table(0, {"crack": 20}, n_good=20) if s.split == "test"]
    more = [s for s in make_table(0, {"crack": 20, "hole": 10}, n_good=20) if s.split == "test"]
    crack = {s.sample_id for s in validation_split(test, 0.3, seed=2)[0] if s.defect == "crack"}
    crack_more = {s.sample_id for s in validation_split(more, 0.3, seed=2)[0] if s.defect == "crack"}
    assert crack == crack_more


def test_validation_split_fraction_zero_and_errors(mvtec_tree: Path) -> None:
    table = build_sample_table(str(mvtec_tree), "widget")
    test = [s for s in table if s.split == "test"]
    validation, report = validation_split(test, 0.0)
    assert validation == [] and report == test
    with pytest.raises(ValueError, match="fraction"):
        validation_split(test, 1.0)
    with pytest.raises(ValueError, match="test samples only"):
        validation_split(table, 0.3)


# --- real data -----------------------------------------------------------------------------------


def test_real_bottle_injection(
    bottle_root: Path,
) -> None:  # honours COMET_RAY_TEST_SHARED, skips without ../shared
    real_bottle = bottle_root / "mvtec_bottle"
    table = build_sample_table(str(real_bottle.parent), "mvtec_bottle")
    result, manifest = inject_contamination(table, 0.15, seed=0)
    assert manifest.n_moved == 37 == round(0.15 * 209 / 0.85) and not manifest.capped
    assert sum(s.split == "train" for s in result) == 209 + 37
    assert sum(s.split == "test" for s in result) == 83 - 37
    validation, report = validation_split([s for s in result if s.split == "test"], 0.3, seed=0)
    assert len(validation) + len(report) == 46
