"""``--model knn --strategy scl``: SCL's fence on leave-one-out scores chooses what enters the memory bank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from comet_ray.audit import read_csv
from comet_ray.cli import main
from comet_ray.comet.bank_confidence import fit_confident_bank
from comet_ray.config import CometConfig
from comet_ray.errors import CometError
from comet_ray.features.store import FeatureStore
from comet_ray.models.knn import PatchKNN, nearest_distances

from support import TINY_TRAIN_ARGS

N, P, D = 30, 16, 24
OUTLIER_ROWS = [4, 11, 23]


def make_store() -> FeatureStore:
    """Nominal patches near a few prototypes; the outlier images carry six far-off patches each."""
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(4, D, generator=generator)
    features = prototypes[torch.randint(0, 4, (N, P), generator=generator)] + 0.1 * torch.randn(
        N, P, D, generator=generator
    )
    for row in OUTLIER_ROWS:
        features[row, :6] = 2.0 * torch.randn(6, D, generator=generator)
    return FeatureStore([f"img{i:02d}" for i in range(N)], features, (4, 4))


@pytest.mark.parametrize("patch_weighting", [False, True])
def test_flagged_images_stay_out_of_a_bank_of_the_same_size(patch_weighting: bool) -> None:
    store = make_store()
    model = PatchKNN(D, bank_fraction=0.25)
    comet = CometConfig(strategy="scl", patch_weighting=patch_weighting, bank_leave_out="images")
    bank = fit_confident_bank(model, store, comet, torch.Generator().manual_seed(0))
    outliers = torch.zeros(N, dtype=torch.bool)
    outliers[OUTLIER_ROWS] = True
    assert bool((bank.weights[outliers] < 1).all()) and bool((bank.weights[~outliers] == 1).all())
    assert bool(bank.scores[outliers].min() > bank.scores[~outliers].max())
    assert not bank.kept[outliers].any()  # no patch of a flagged image can be chosen
    assert model.bank.shape[0] == round(0.25 * N * P)  # as large as a bank from every patch
    # Every bank entry is a patch of a kept image: none is as far from the nominal prototypes as a defect.
    nominal = store.features[~outliers].reshape(-1, D)
    assert float(nearest_distances(model.bank, nominal).max()) < 0.01  # up to float32 rounding
    assert (bank.patch_fence is not None) == patch_weighting
    if not patch_weighting:  # image-level only: every patch of a kept image may enter the bank
        assert bool(bank.kept[~outliers].all())
    metrics = bank.metrics(store.ids, {store.ids[r] for r in OUTLIER_ROWS})
    assert metrics["bank_images_left_out"] == metrics["bank_images_flagged"] == len(OUTLIER_ROWS)
    assert metrics["mean_weight_injected"] < metrics["mean_weight_nominal"] == 1.0
    with pytest.raises(CometError, match="bank_leave_out must be one of patches, images"):
        fit_confident_bank(PatchKNN(D), store, CometConfig(bank_leave_out="all"), torch.Generator())
    with pytest.raises(CometError, match="whole training set"):
        shard = FeatureStore(store.ids, store.features[:10], (4, 4), held=torch.arange(10))
        fit_confident_bank(PatchKNN(D), shard, CometConfig(), torch.Generator())


def test_a_flagged_image_loses_its_defect_patches_and_keeps_its_nominal_surface() -> None:
    """The default (bank_leave_out=patches): a flagged image's six far-off patches leave the bank, its ten
    nominal ones may enter it, and no patch of an unflagged image is left out."""
    store = make_store()
    model = PatchKNN(D, bank_fraction=0.25)
    bank = fit_confident_bank(model, store, CometConfig(strategy="scl"), torch.Generator().manual_seed(0))
    outliers = torch.zeros(N, dtype=torch.bool)
    outliers[OUTLIER_ROWS] = True
    assert bool((bank.weights[outliers] < 1).all()) and bool((bank.weights[~outliers] == 1).all())
    assert not bank.kept[outliers, :6].any() and bool(bank.kept[outliers, 6:].all())
    assert bool(bank.kept[~outliers].all()) and bank.patch_fence is not None
    assert model.bank.shape[0] == round(0.25 * N * P)
    nominal = store.features[~outliers].reshape(-1, D)
    assert (
        float(nearest_distances(model.bank, nominal).max()) < 2.0
    )  # defects lie ~7 away: none is in the bank
    metrics = bank.metrics(store.ids, {store.ids[r] for r in OUTLIER_ROWS})
    assert metrics["bank_images_flagged"] == len(OUTLIER_ROWS) and metrics["bank_images_left_out"] == 0
    assert metrics["bank_patches_left_out"] == 6 * len(OUTLIER_ROWS)


def test_knn_scl_from_the_cli_writes_weights_that_audit_and_export_read(
    tiny_category: Path, tmp_path: Path, capsys, one_line_error
) -> None:
    out = tmp_path / "run"
    # Fence at Q3 (k = 0): on a random backbone the injected spots are not all beyond Tukey's 1.5 IQR.
    args = [
        "train",
        str(tiny_category),
        "--category",
        "weave",
        "--model",
        "knn",
        "--contamination",
        "0.2",
        *TINY_TRAIN_ARGS,
        "--set",
        "fence_k=0",
    ]
    assert main([*args, "--strategy", "scl", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    document = json.loads((out / "weights.json").read_text())
    injected = set(document["injected"])
    assert metrics["strategy"] == "scl" and metrics["bank_images_flagged"] > 0 and injected
    assert metrics["mean_weight_injected"] < metrics["mean_weight_nominal"]
    assert min(document["weights"].values()) < 1 and document["per_epoch"]["epochs"] == 1
    assert "leave-one-out" in document["score"] and set(document["scores"]) == set(document["weights"])
    assert (
        main(
            [
                "audit",
                str(out),
                "--device",
                "cpu",
                "--gallery",
                "2",
                "--export-clean",
                str(tmp_path / "clean"),
            ]
        )
        == 0
    )
    rows = read_csv(out / "audit" / "audit.csv")
    flagged = {r["sample_id"] for r in rows if r["flagged"]}
    assert flagged == {i for i, w in document["weights"].items() if w < 1}
    assert sum(r["injected"] for r in rows[: len(injected)]) > len(injected) / 2  # most suspects are injected
    exported = [
        p for p in (tmp_path / "clean").rglob("*.png") if "train" in p.relative_to(tmp_path / "clean").parts
    ]
    assert len(exported) == len(rows) - len(flagged)
    assert main(["report", str(out), "--out", str(tmp_path / "report.html"), "--device", "cpu"]) == 0
    shutil.rmtree(tmp_path / "clean")
    capsys.readouterr()
    assert main([*args, "--strategy", "meta", "--out", str(tmp_path / "meta")]) == 2
    assert "training-free" in one_line_error() and not (tmp_path / "meta").exists()
