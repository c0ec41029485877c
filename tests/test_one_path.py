"""One image, one score: validation, ``evaluate``, ``predict``, ``report`` and the exported ONNX graph
all score an image through :class:`comet_ray.model.AnomalyModel`'s path (cache-dtype round trip, the
run's precision), so the same image gets the same score from each (to 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from comet_ray.config import TrainConfig
from comet_ray.data.images import decode_image, preprocess_image
from comet_ray.evaluate import score_patches
from comet_ray.export import export_detector
from comet_ray.inference import evaluate_checkpoint, predict_images
from comet_ray.model import AnomalyModel
from comet_ray.models.anomaly_map import image_scores
from comet_ray.prepare import prepare_data
from comet_ray.report.runs import _DataAccess, load_run, recompute_scores
from comet_ray.runfolder import read_scores

TOLERANCE = 1e-4
RELATIVE_ONNX = 1e-4


def _image(path: str) -> torch.Tensor:
    return preprocess_image(decode_image(Path(path).read_bytes(), path), 64)[None]


def test_one_image_gets_the_same_score_from_every_command(
    tiny_run: Path, tiny_category: Path, tmp_path: Path
) -> None:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (test dependency) is not installed")
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    config = TrainConfig.from_dict(json.loads((tiny_run / "config.json").read_text()))
    report_id = next(i for i in manifest["report_ids"] if "/spot/" in i)
    validation_id = manifest["validation_ids"][0]
    paths = {i: str(tiny_category / i) for i in (report_id, validation_id)}
    model = AnomalyModel.from_checkpoint(tiny_run, "cpu")

    # validation, as train_category scores it: the run's validation split from the feature cache
    data = prepare_data(config, torch.device("cpu"))
    validation = image_scores(score_patches(model.detector, data.validation.store, "cpu", model.precision))
    validation_score = dict(zip(data.validation.store.ids, validation.tolist()))[validation_id]
    # the report split as training scored it (scores.csv) and as `evaluate` scores it
    trained = read_scores(tiny_run)
    trained_score = float(trained.scores[trained.ids.index(report_id)])
    _, evaluated = evaluate_checkpoint(
        str(tiny_run), str(tiny_category), config.category, "cpu", with_scores=True
    )
    # predict
    predicted = {
        row["path"]: row["score"] for row in predict_images(str(tiny_run), list(paths.values()), "cpu")
    }
    # report: scores recomputed from the data, and the model its example panels are drawn with
    record = load_run(tiny_run)
    access = _DataAccess("cpu", None)
    recomputed = recompute_scores(record, access)
    report_score = float(recomputed.scores[recomputed.ids.index(report_id)])
    panel_model = access.model(record)
    # the exported ONNX graph in onnxruntime
    session = ort.InferenceSession(
        str(export_detector(tiny_run, tmp_path / "model.onnx", "onnx")), providers=["CPUExecutionProvider"]
    )

    def onnx_score(sample_id: str) -> float:
        return float(session.run(None, {"images": _image(paths[sample_id]).numpy()})[0][0])

    def panel_score(sample_id: str) -> float:
        return float(panel_model(_image(paths[sample_id]), with_maps=False)[0][0])

    report_scores = {
        "training (scores.csv)": trained_score,
        "evaluate": evaluated[report_id],
        "predict": predicted[paths[report_id]],
        "report (recomputed)": report_score,
        "report (panels)": panel_score(report_id),
        "onnx": onnx_score(report_id),
    }
    validation_scores = {
        "validation": validation_score,
        "predict": predicted[paths[validation_id]],
        "report (panels)": panel_score(validation_id),
        "onnx": onnx_score(validation_id),
    }
    for scores in (report_scores, validation_scores):
        values = np.array(list(scores.values()))
        assert np.ptp(values) <= TOLERANCE, scores  # what a user needs: the saved threshold holds everywhere
        # A tiny run's scores are ~1e-3, so also relative: the PyTorch paths are one computation (equal to
        # float32 rounding; skipping the float16 cache round trip moves a score by ~1e-4 of itself), the
        # ONNX graph is the same arithmetic fused differently.
        torch_paths = values[:-1]
        assert np.ptp(torch_paths) <= 1e-6 * np.abs(torch_paths).max(), scores
        assert abs(values[-1] - torch_paths[0]) <= RELATIVE_ONNX * abs(torch_paths[0]), scores
    # and the saved nominal score is the median of the nominal validation images as predict scores them
    nominal_ids = [i for i in manifest["validation_ids"] if "/good/" in i]
    rows = predict_images(str(tiny_run), [str(tiny_category / i) for i in nominal_ids], "cpu")
    assert float(torch.tensor([r["score"] for r in rows]).median()) == pytest.approx(
        model.meta["nominal_score"], abs=TOLERANCE
    )
