"""Using a trained checkpoint: evaluate a dataset's test split, or score arbitrary images.

The checkpoint says how its features were made (backbone, weights, image size, width), so both
commands rebuild exactly that extractor; nothing from the training config is needed.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import torch

from comet_ray.config import resolve_device
from comet_ray.data.images import decode_image, preprocess_image
from comet_ray.data.layout import (
    IMAGE_EXTENSIONS,
    list_image_uris,
    open_dataset_filesystem,
    read_bytes,
    scan_category,
)
from comet_ray.data.local_walk import is_utf8_name, printable, walk_files
from comet_ray.errors import CometError, ImageDecodeError
from comet_ray.evaluate import evaluate_split, split_labels
from comet_ray.features.extractor import extract_features_cached
from comet_ray.model import AnomalyModel
from comet_ray.prepare import subset_split
from comet_ray.runfolder import held_out_ids


def evaluate_checkpoint(
    checkpoint: str,
    data_root: str,
    category: str,
    device: str = "auto",
    s3_endpoint: str | None = None,
    cache_dir: str | None = None,
    with_scores: bool = False,
) -> dict | tuple[dict, dict[str, float]]:
    """Metrics of a checkpoint on a category's test split (``with_scores``: and each image's score, by id).

    Given a run folder, the images that run moved into training or used for validation are left out
    (its manifest lists them), so the numbers match the run's own report split.
    """
    torch_device = resolve_device(device)
    model = AnomalyModel.from_checkpoint(checkpoint, torch_device)
    filesystem, _ = open_dataset_filesystem(data_root, s3_endpoint)
    scan = scan_category(data_root, category, filesystem)
    samples = [s for s in scan.samples if s.split == "test"]
    excluded = set(_held_out(checkpoint, model.meta))
    samples = [s for s in samples if s.sample_id not in excluded]
    if not samples:
        raise CometError(f"no test images to evaluate in category {category!r}")
    extracted = extract_features_cached(
        samples, model.extractor, filesystem, True, cache_dir, progress=True, s3_endpoint=s3_endpoint
    )
    split = subset_split(extracted, [s.sample_id for s in samples])
    labels = split_labels(split, {s.sample_id for s in samples if s.is_anomalous})
    # the cached features through the model's scoring (validation's path: score_patches)
    result = evaluate_split(
        model.detector, split, labels, model.image_size, torch_device, precision=model.precision
    )
    result.metrics["checkpoint"] = str(checkpoint)
    skipped = [u for u in scan.unlisted if u["sample_id"].split("/")[1] in ("test", "ground_truth")]
    skipped += split.skipped
    result.metrics["n_skipped"] = len(skipped)
    result.metrics["skipped"] = skipped
    result.metrics["mask_issues"] = split.mask_issues
    if with_scores:
        return result.metrics, dict(zip(split.store.ids, result.image_scores.tolist()))
    return result.metrics


def _held_out(checkpoint: str, meta: dict) -> list[str]:
    """The checkpoint's validation and training-moved test images: from model.pt, else manifest.json beside it."""
    if "held_out_ids" in meta.get("extra", {}):
        return list(meta["extra"]["held_out_ids"])
    path = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    if (path / "manifest.json").exists():
        return held_out_ids(json.loads((path / "manifest.json").read_text()))
    raise CometError(
        f"{checkpoint}: cannot tell which test images the run used for validation or training "
        "(no held-out list in model.pt, no manifest.json beside it); evaluate its run folder"
    )


def expand_inputs(inputs: list[str], s3_endpoint: str | None = None) -> tuple[list[str], list[dict]]:
    """Files, folders (recursive) and glob patterns -> (image paths, problems); s3:// prefixes are listed.

    Problems (``{"path", "reason"}``) are local entries that cannot be read whatever their content
    (non-UTF-8 names, broken links, link loops: see :mod:`comet_ray.data.local_walk`); ``predict``
    reports them as rows with an error instead of stopping.
    """
    found: list[str] = []
    problems: list[dict] = []
    for item in inputs:
        if item.startswith("s3://"):
            found.extend(list_image_uris(item, s3_endpoint))
            continue
        if any(ch in item for ch in "*?[") and not os.path.exists(item):
            matches = sorted(glob.glob(item, recursive=True))
        else:
            matches = [item]
        for match in matches:
            if os.path.isdir(match):
                listing = walk_files(match, lambda name: Path(name).suffix.lower() in IMAGE_EXTENSIONS)
                found.extend(listing.files)
                problems.extend(listing.problems)
            elif is_utf8_name(os.fsencode(match)):
                found.append(match)  # a missing or unreadable file becomes an error row, named
            else:
                problems.append(
                    {"path": printable(match), "reason": "file name is not valid UTF-8; rename it"}
                )
    return found, problems


def normalised_score(score: float, nominal: float, threshold: float) -> float:
    """0 at the median nominal validation score, 0.5 at the decision threshold (scores are comparable across models)."""
    span = threshold - nominal
    if span <= 0:
        return 0.5
    return 0.5 * (score - nominal) / span


@torch.no_grad()
def predict_images(
    checkpoint: str,
    inputs: list[str],
    device: str = "auto",
    threshold: float | None = None,
    s3_endpoint: str | None = None,
    batch_size: int = 16,
    maps_dir: str | os.PathLike | None = None,
    return_maps: bool = False,
):
    """One row per input: path, image score, normalised score, decision; unreadable files get an error.

    ``maps_dir``: also write one panel PNG per scored image there (image | heat map | region at or above
    the threshold; see :mod:`comet_ray.visualize`); unreadable images get none. ``return_maps``: return
    ``(rows, maps)`` with ``maps[path]`` the float32 ``[S, S]`` anomaly map of each scored image (holds
    every map in memory: for large batches prefer ``maps_dir``). The map is on the image score's scale
    (the image score is its patch maximum before the blur), so the same threshold marks regions.
    """
    from tqdm import tqdm

    model = AnomalyModel.from_checkpoint(checkpoint, resolve_device(device))
    meta = model.meta
    cut = float(meta["threshold"]) if threshold is None else float(threshold)
    nominal = float(meta["nominal_score"])
    pixel_cut = meta.get("pixel_threshold") if threshold is None else None
    paths, problems = expand_inputs(inputs, s3_endpoint)
    if not paths and not problems:
        raise CometError(f"no images found in {' '.join(inputs)}")
    filesystem = None
    if any(p.startswith("s3://") for p in paths):
        filesystem, _ = open_dataset_filesystem(next(p for p in paths if p.startswith("s3://")), s3_endpoint)
    writer = None
    if maps_dir is not None:
        from comet_ray.visualize import MapWriter

        writer = MapWriter(maps_dir, paths)
    with_maps = writer is not None or return_maps
    rows: list[dict] = []
    maps: dict[str, object] = {}
    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([t for _, t in pending])
        scores, batch_maps = model(batch, with_maps)
        for index, ((path, tensor), score) in enumerate(zip(pending, scores.tolist())):
            rows.append(
                {
                    "path": path,
                    "score": score,
                    "normalised_score": normalised_score(score, nominal, cut),
                    "anomalous": int(score >= cut),
                    "error": "",
                }
            )
            if batch_maps is not None:
                if writer is not None:
                    writer(path, tensor, batch_maps[index], score, cut, nominal, pixel_cut)
                if return_maps:
                    maps[path] = batch_maps[index].numpy()
        pending.clear()

    for path in tqdm(paths, desc="predict", unit="img", leave=False):
        try:
            data = read_bytes(path, filesystem if path.startswith("s3://") else None)
            tensor = preprocess_image(decode_image(data, path), model.image_size)
        except ImageDecodeError as exc:
            rows.append(
                {"path": path, "score": "", "normalised_score": "", "anomalous": "", "error": exc.reason}
            )
            continue
        pending.append((path, tensor))
        if len(pending) >= batch_size:
            flush()
    flush()
    order = {p: i for i, p in enumerate(paths)}
    rows = sorted(rows, key=lambda r: order[r["path"]])
    rows += [
        {"path": p["path"], "score": "", "normalised_score": "", "anomalous": "", "error": p["reason"]}
        for p in problems
    ]
    return (rows, maps) if return_maps else rows
