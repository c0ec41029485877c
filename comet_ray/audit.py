"""``comet-ray audit RUN``: which training images CoMet distrusts, how sure it is, and a clean copy.

CoMet's Soft Confident Learning weighs every training image every epoch: an image whose score lies
beyond the outlier fence gets a weight below 1. A run folder keeps those weights per epoch and the
final model's score of every training image (:mod:`comet_ray.weights_file`); the audit turns them into

* ``audit.csv``: every training image ranked from most to least suspect (lowest final weight first,
  then highest final score), with its weight, score and the epoch at which its weight first fell
  below 1;
* ``audit.json``: the share of the training set above the fence (the flagged images) with the fence
  itself and, when the run injected contamination, precision and recall of the flagged images and
  precision@k (k = the number injected) against the injected ones;
* ``gallery/``: the top suspects' anomaly-map panels, drawn by the same code as ``predict --maps``,
  and ``weights_trajectory.png``: each flagged image's weight per epoch against the band of the rest;
* with ``--export-clean DEST``: the category without the flagged images (see :func:`export_clean`).

A flagged image is one the model found least typical of the set. On a set with real defects those
are the first images to look at; on a clean set the fence still marks a few unusual ones, so the
audit never calls them defects unless the run itself put known anomalies there.

The ranking and metric functions at the top take plain arrays (ids, weights, scores, injected ids) so
benchmarks can score any ranking the same way.
"""

from __future__ import annotations

import csv
import math
import os
import posixpath
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from comet_ray import atomic, jsonfile
from comet_ray.atomic import publish_folder
from comet_ray.config import CometConfig
from comet_ray.errors import CometError
from comet_ray.runfolder import RUN_FILES, read_documents
from comet_ray.weights_file import TrainingWeights, read_training_weights

AUDIT_DIR = "audit"
GALLERY_DIR = "gallery"
TRAJECTORY_FILE = "weights_trajectory.png"
EXPORT_MANIFEST = "export_manifest.json"
FLAG_RULE = "SCL weight below 1 after the last epoch (the image scored above SCL's outlier fence)"


# --- ranking and metrics: plain arrays in, numbers out -------------------------------------------


def rank_order(weights: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Row indices from most to least suspect: lowest weight first, then highest score, then row order.

    To rank by score alone (a model without SCL weights), pass weights of 1. A NaN score ranks lowest.
    """
    weights = np.asarray(weights, dtype=np.float64)
    scores = np.zeros_like(weights) if scores is None else np.asarray(scores, dtype=np.float64)
    if scores.shape != weights.shape:
        raise ValueError(f"rank_order: {weights.shape[0]} weights but {scores.shape[0]} scores")
    by_score = np.where(np.isnan(scores), -np.inf, scores)
    return np.lexsort((np.arange(weights.size), -by_score, weights))


def flagged_mask(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """The images SCL distrusts: final weight below 1."""
    return np.asarray(weights, dtype=np.float64) < 1.0


def precision_at_k(order: Sequence[int] | np.ndarray, injected: np.ndarray, k: int) -> float | None:
    """Share of known anomalies among the ``k`` first images of ``order`` (None when k is 0)."""
    if k <= 0:
        return None
    top = np.asarray(order)[:k]
    return float(np.asarray(injected, dtype=bool)[top].sum()) / k


def audit_metrics(
    ids: Sequence[str],
    weights: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray | None,
    injected_ids: set[str] | Sequence[str] | None = None,
    k: int | None = None,
) -> dict:
    """Flagged count and share; with known anomalies, precision/recall of the flagged set and precision@k.

    ``k`` defaults to the number of known anomalies, where precision@k equals recall@k. Undefined
    ratios (no flagged image, no anomaly) are None.
    """
    weights = np.asarray(weights, dtype=np.float64)
    n = len(ids)
    if weights.shape != (n,):
        raise ValueError(f"audit_metrics: {n} ids but {weights.size} weights")
    flagged = flagged_mask(weights)
    n_flagged = int(flagged.sum())
    result: dict = {
        "n_images": n,
        "n_flagged": n_flagged,
        "flagged_share": n_flagged / n if n else None,
        "flagged_weight_min": float(weights[flagged].min()) if n_flagged else None,
        "flagged_weight_median": float(np.median(weights[flagged])) if n_flagged else None,
        "flagged_weight_max": float(weights[flagged].max()) if n_flagged else None,
    }
    if not injected_ids:
        return result
    wanted = set(injected_ids)
    injected = np.array([i in wanted for i in ids], dtype=bool)
    n_injected = int(injected.sum())
    hits = int((flagged & injected).sum())
    k = n_injected if k is None else int(k)
    order = rank_order(weights, scores)
    result.update({
        "n_injected": n_injected,
        "n_flagged_injected": hits,
        "precision": hits / n_flagged if n_flagged else None,
        "recall": hits / n_injected if n_injected else None,
        "k": k,
        "precision_at_k": precision_at_k(order, injected, k),
    })
    return result


def first_below_one(per_epoch: np.ndarray) -> list[int | None]:
    """Per image, the first epoch (1-based) whose weight was below 1; None when it never was."""
    below = np.asarray(per_epoch, dtype=np.float64) < 1.0  # NaN (not recorded) compares False
    return [int(np.argmax(column)) + 1 if column.any() else None for column in below.T]


# --- one run's audit -----------------------------------------------------------------------------


@dataclass
class TrainingAudit:
    """A run's training images ranked, with what the audit says about them."""

    run: str
    category: str
    strategy: str
    data_root: str
    weights: TrainingWeights
    order: np.ndarray  # row indices, most suspect first
    first_below: list[int | None]
    fence: float | None  # the last epoch's fence on the SCL scores
    metrics: dict
    contamination: dict  # the run manifest's contamination section
    uses_scl: bool
    paths: dict[str, str] = field(default_factory=dict)  # sample_id -> image uri (when the data is reachable)
    notes: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return self.weights.ids

    @property
    def injected_known(self) -> bool:
        """Whether the run put known anomalies into its training set (an experiment)."""
        return bool(self.weights.injected)

    def rows(self) -> list[dict]:
        """``audit.csv``'s rows, most suspect first."""
        w = self.weights
        rows = []
        for rank, i in enumerate(self.order, start=1):
            sample_id = w.ids[i]
            score = None if w.scores is None or not math.isfinite(w.scores[i]) else float(w.scores[i])
            rows.append({
                "rank": rank,
                "sample_id": sample_id,
                "path": self.paths.get(sample_id, ""),
                "weight": float(w.final[i]),
                "score": score,
                "flagged": int(w.final[i] < 1),
                "first_below_one": self.first_below[i],
                "injected": int(sample_id in w.injected) if self.injected_known else "",
            })
        return rows

    def summary_lines(self) -> list[str]:
        """What the command prints: counts, fence, weights; precision only where anomalies are known."""
        m = self.metrics
        n, flagged = m["n_images"], m["n_flagged"]
        epochs = self.weights.per_epoch.shape[0]
        lines = [(f"{n} training images of {self.category} ({self.strategy}, {epochs} epochs), ranked by final "
                  "SCL weight, then final score")]
        if not self.uses_scl:
            lines.append(f"this run did not use SCL (strategy {self.strategy}): every weight is 1, nothing is "
                         "flagged, and the ranking is by the final model's score alone")
        elif flagged:
            fence = f" (fence τ = {self.fence:.4g} on the last epoch's scores)" if self.fence is not None else ""
            lines.append(f"{flagged} image(s) ({m['flagged_share']:.1%} of the training set) scored above SCL's "
                         f"outlier fence{fence}, with weights {m['flagged_weight_min']:.3f}-"
                         f"{m['flagged_weight_max']:.3f} (median {m['flagged_weight_median']:.3f})")
        else:
            lines.append("no image scored above SCL's outlier fence: every final weight is 1")
        if self.injected_known:
            achieved = self.contamination.get("achieved_ratio")
            injected = f"{m['n_injected']} anomalies were injected"
            injected += f" ({achieved:.1%} of the training set)" if isinstance(achieved, (int, float)) else ""
            top = f"top-{m['k']} precision {m['precision_at_k']:.2f}"
            if self.uses_scl:
                lines.append(f"estimated contamination {m['flagged_share']:.1%}; {injected}")
                precision = "-" if m["precision"] is None else f"{m['precision']:.2f}"
                lines.append(f"flagged: {m['n_flagged_injected']} of the {m['n_injected']} injected (recall "
                             f"{m['recall']:.2f}), precision {precision}; {top}")
            else:
                lines.append(f"{injected}; ranked by score, {top}")
        elif self.uses_scl and flagged:
            lines.append("the fence marks the images least typical of this set: the likeliest defects if any "
                         "slipped in, but unusual is not defective; look at them before removing any")
        return lines + self.notes


def audit_from_documents(run: str, weights_doc: dict, history: list[dict], manifest: dict, config: dict,
                         metrics: dict) -> TrainingAudit:
    """The audit of a run folder's JSON documents; an older folder without per-epoch weights is refused."""
    weights = read_training_weights(weights_doc)
    if not weights.ids:
        raise CometError(f"{run}: weights.json lists no training images")
    if weights.per_epoch is None or weights.scores is None:
        raise CometError(f"{run} was written by an older comet-ray: weights.json has no per-epoch weights and "
                         "scores; train it again with this version to audit it")
    value = history[-1].get("fence") if history else metrics.get("fence")  # knn + scl: no epochs, one fence
    fence = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    strategy = str(metrics.get("strategy") or config.get("comet", {}).get("strategy") or "comet")
    result = audit_metrics(weights.ids, weights.final, weights.scores, weights.injected)
    return TrainingAudit(
        run=run,
        category=str(metrics.get("category") or config.get("category") or manifest.get("category") or "?"),
        strategy=strategy,
        data_root=str(config.get("data_root") or manifest.get("data_root") or ""),
        weights=weights,
        order=rank_order(weights.final, weights.scores),
        first_below=first_below_one(weights.per_epoch),
        fence=fence,
        metrics=result,
        contamination=manifest.get("contamination") or {},
        uses_scl=CometConfig(strategy=strategy).uses_scl,
    )


def load_audit(folder: str | os.PathLike, shown: str | None = None) -> TrainingAudit:
    """The audit of a local run folder (``shown``: how to name it, e.g. its s3:// URI)."""
    folder = Path(folder)
    shown = shown or str(folder)
    if not folder.is_dir():
        raise CometError(f"run folder not found: {shown}")
    docs = read_documents(folder, weights_required=True)
    return audit_from_documents(shown, docs.weights, docs.history, docs.manifest, docs.config, docs.metrics)


# --- where the images are ------------------------------------------------------------------------


def category_folder(data_root: str, category: str, s3_endpoint: str | None = None):
    """``(filesystem, category folder path, uri prefix)`` of a dataset category, as the sample table sees it."""
    import pyarrow.fs as pafs

    from comet_ray.data.layout import open_dataset_filesystem

    fs, base = open_dataset_filesystem(data_root, s3_endpoint)
    folder = base if fs.get_file_info(posixpath.join(base, "train")).type == pafs.FileType.Directory else \
        posixpath.join(base, category)
    prefix = "s3://" if data_root.startswith("s3://") else ""
    return fs, folder, prefix


def source_scan(audit: TrainingAudit, s3_endpoint: str | None = None):
    """The run's category as it is now at its data root (``CategoryScan``); fills ``audit.paths``."""
    from comet_ray.data.layout import open_dataset_filesystem, scan_category

    if not audit.data_root:
        raise CometError(f"{audit.run}: config.json names no data root")
    scan = scan_category(audit.data_root, audit.category, open_dataset_filesystem(audit.data_root, s3_endpoint)[0])
    known = set(audit.ids)
    audit.paths = {s.sample_id: s.uri for s in scan.samples if s.sample_id in known}
    # Injected images were test images; the manifest names where they were when the run read them.
    for moved in audit.contamination.get("moved", []):
        if moved.get("sample_id") in known and moved["sample_id"] not in audit.paths:
            audit.paths[moved["sample_id"]] = moved.get("uri", "")
    return scan


# --- gallery and charts --------------------------------------------------------------------------


def suspect_panels(audit: TrainingAudit, checkpoint: str | os.PathLike, count: int, out_dir: str | os.PathLike,
                   device: str = "auto", s3_endpoint: str | None = None) -> list[tuple[dict, Path]]:
    """The ``count`` top suspects' anomaly-map panels in ``out_dir`` as ``NN-<name>.png`` (rank first).

    Drawn by :func:`comet_ray.inference.predict_images` (the ``predict --maps`` code): the center crop
    the model saw, the anomaly map on the checkpoint's colour scale, and the region at its threshold.
    Returns ``(audit.csv row, panel path)`` for each image that could be read.
    """
    from comet_ray.inference import predict_images
    from comet_ray.visualize import map_file_names

    rows = [r for r in audit.rows()[: max(0, count)] if r["path"]]
    if not rows:
        return []
    paths = [r["path"] for r in rows]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".panels-", dir=out_dir) as tmp:
        predicted = predict_images(str(checkpoint), paths, device, s3_endpoint=s3_endpoint, maps_dir=tmp)
        errors = {p["path"]: p["error"] for p in predicted if p["error"]}
        written = []
        for row, name in zip(rows, map_file_names(paths)):
            panel = Path(tmp) / name
            if not panel.exists():
                audit.notes.append(f"no panel for {row['sample_id']}: {errors.get(row['path'], 'not scored')}")
                continue
            target = out_dir / f"{row['rank']:02d}-{name}"
            os.replace(panel, target)
            written.append((row, target))
    return written


def trajectory_chart(audit: TrainingAudit, limit: int = 200) -> bytes:
    """Each flagged image's weight per epoch against the band of the others (PNG bytes)."""
    from comet_ray.visualize import weight_trajectory_chart

    w = audit.weights
    injected = w.injected_mask if audit.injected_known else None
    title = f"{audit.category} · {audit.strategy}: SCL weight per epoch"
    return weight_trajectory_chart(w.per_epoch, flagged_mask(w.final), injected, title, order=audit.order,
                                   limit=limit)


# --- writing the audit ---------------------------------------------------------------------------

CSV_FIELDS = ("rank", "sample_id", "path", "weight", "score", "flagged", "first_below_one", "injected")


def write_csv(rows: list[dict], target: Path) -> None:
    atomic.write_csv(target, CSV_FIELDS, ({k: ("" if row[k] is None else repr(row[k]) if isinstance(row[k], float)
                                               else row[k]) for k in CSV_FIELDS} for row in rows))


def read_csv(path: str | os.PathLike) -> list[dict]:
    """``audit.csv`` back as rows with numbers parsed (empty cells become None)."""
    def number(text: str, cast):
        return cast(text) if text != "" else None

    with open(path, newline="") as handle:
        return [{"rank": int(row["rank"]), "sample_id": row["sample_id"], "path": row["path"],
                 "weight": float(row["weight"]), "score": number(row["score"], float), "flagged": int(row["flagged"]),
                 "first_below_one": number(row["first_below_one"], int), "injected": number(row["injected"], int)}
                for row in csv.DictReader(handle)]


@dataclass
class AuditOutcome:
    audit: TrainingAudit
    out: str  # where the files went (local folder or s3:// prefix)
    panels: list[Path]
    export: dict | None = None


def write_audit(audit: TrainingAudit, checkpoint: Path | None, staging: Path, gallery: int, device: str,
                s3_endpoint: str | None) -> list[Path]:
    """audit.csv, audit.json, weights_trajectory.png and gallery/ into ``staging``; returns the panels."""
    panels: list[Path] = []
    if gallery > 0:
        if checkpoint is None or not checkpoint.exists():
            audit.notes.append("no model.pt in the run folder: no gallery")
        elif not audit.paths:
            audit.notes.append("the training images are not reachable: no gallery")
        else:
            panels = [p for _, p in suspect_panels(audit, checkpoint, gallery, staging / GALLERY_DIR, device,
                                                   s3_endpoint)]
    write_csv(audit.rows(), staging / "audit.csv")
    (staging / TRAJECTORY_FILE).write_bytes(trajectory_chart(audit))
    summary = {
        "run": audit.run,
        "category": audit.category,
        "strategy": audit.strategy,
        "data_root": audit.data_root,
        "rule": FLAG_RULE,
        "fence": audit.fence,
        "ranking": "final SCL weight ascending, then the final model's SCL score descending",
        "injected_known": audit.injected_known,
        "achieved_contamination": audit.contamination.get("achieved_ratio") if audit.injected_known else None,
        **audit.metrics,
        "gallery": [p.name for p in panels],
        "notes": audit.notes,
    }
    jsonfile.write(staging / "audit.json", summary, indent=2)
    return panels


def _fetch_run(run: str, s3_endpoint: str | None, into: Path) -> None:
    """Copy an ``s3://`` run folder's JSON files and model.pt into ``into``."""
    import pyarrow.fs as pafs

    from comet_ray.data.s3 import open_s3, public_s3_uri, storage_error

    fs, base = open_s3(run, s3_endpoint)
    shown = public_s3_uri(run)
    try:
        infos = fs.get_file_info([posixpath.join(base, name) for name in RUN_FILES])
        if infos[0].type != pafs.FileType.File:
            raise CometError(f"{shown} is not a comet-ray run folder (no metrics.json)")
        for info, name in zip(infos, RUN_FILES):
            if info.type == pafs.FileType.File:
                with fs.open_input_stream(info.path) as stream, open(into / name, "wb") as handle:
                    shutil.copyfileobj(stream, handle, 1 << 20)
    except OSError as exc:
        raise storage_error(exc, run, fs) from exc


def run_audit(run: str, out: str | None = None, gallery: int = 8, export_to: str | None = None,
              copy: bool = False, device: str = "auto", s3_endpoint: str | None = None) -> AuditOutcome:
    """Audit a run folder (local or ``s3://``) and write the audit to ``out`` (default ``RUN/audit``).

    Everything is checked before anything is written: a run folder from an older version, a missing
    data root for ``export_to`` or a non-empty export destination end in one :class:`CometError`.
    """
    from comet_ray.data.s3 import is_s3_uri, public_s3_uri

    remote = is_s3_uri(run)
    shown = public_s3_uri(run).rstrip("/") if remote else str(run)
    out = out or (f"{run.rstrip('/')}/{AUDIT_DIR}" if remote else str(Path(run) / AUDIT_DIR))
    with tempfile.TemporaryDirectory(prefix="comet-audit-") as tmp:
        folder = Path(tmp) / "run"
        if remote:
            folder.mkdir()
            _fetch_run(run, s3_endpoint, folder)
        else:
            folder = Path(run)
        audit = load_audit(folder, shown)
        scan = None
        try:
            scan = source_scan(audit, s3_endpoint)
        except CometError as exc:
            if export_to:
                raise CometError(f"--export-clean needs the run's data: {exc}") from None
            audit.notes.append(f"training images not reachable ({exc}): no paths, no gallery")
        if export_to:
            check_export_destination(export_to, audit, s3_endpoint)
        staging = Path(tmp) / "out"
        staging.mkdir()
        panels = write_audit(audit, folder / "model.pt", staging, gallery, device, s3_endpoint)
        if is_s3_uri(out):
            from comet_ray.upload import upload_tree

            upload_tree(staging, out, s3_endpoint)
            where = public_s3_uri(out)
            panels = [Path(p.name) for p in panels]
        else:
            publish_folder(staging, Path(out))  # a rerun replaces the earlier audit's files
            where = str(out)
            panels = [Path(out) / GALLERY_DIR / p.name for p in panels]
        outcome = AuditOutcome(audit, where, panels)
        if export_to:
            outcome.export = export_clean(audit, scan, export_to, copy=copy, s3_endpoint=s3_endpoint)
    return outcome


# --- the clean copy ------------------------------------------------------------------------------


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_export_destination(dest: str, audit: TrainingAudit, s3_endpoint: str | None = None) -> None:
    """Refuse a destination that holds anything, or that lies inside the source category (or around it)."""
    import pyarrow.fs as pafs

    from comet_ray.data.s3 import is_s3_uri, open_s3, public_s3_uri, storage_error

    if is_s3_uri(dest):
        fs, base = open_s3(dest, s3_endpoint)
        try:
            if not base.strip("/") or "/" not in base.strip("/"):
                raise CometError(f"--export-clean needs a prefix inside a bucket, got {public_s3_uri(dest)}")
            found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise storage_error(exc, dest, fs) from exc
        if found:
            raise CometError(f"--export-clean destination {public_s3_uri(dest)} already holds objects; "
                             "choose an empty prefix (nothing is overwritten)")
        if audit.data_root.startswith("s3://"):
            source = public_s3_uri(audit.data_root).rstrip("/") + "/"
            target = public_s3_uri(dest).rstrip("/") + "/"
            if target.startswith(source) or source.startswith(target):
                raise CometError(f"--export-clean destination {public_s3_uri(dest)} overlaps the data root {source}")
        return
    target = Path(dest)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CometError(f"--export-clean destination {target} exists and is not empty (nothing is overwritten)")
    if not audit.data_root.startswith("s3://"):
        source = Path(audit.data_root)
        if _is_within(target, source) or _is_within(source, target):
            raise CometError(f"--export-clean destination {target} overlaps the data root {source}")


def _relative(uri: str, folder: str, prefix: str) -> str:
    path = uri[len(prefix):] if prefix and uri.startswith(prefix) else uri
    if path.startswith("/") and not folder.startswith("/"):
        path = path.lstrip("/")
    return posixpath.relpath(path, folder)


def export_plan(audit: TrainingAudit, scan, folder: str, prefix: str) -> tuple[list[tuple[str, str]], dict]:
    """``([(source uri, path relative to the export's category folder)], manifest)``.

    The export is the run's training set as a category without the flagged images:

    * ``train/``: every image the run trained on and did not flag, at its source path; images the run
      injected from ``test/<defect>/`` (experiments) keep their folder under ``train/``: train folder
      names are not labels;
    * ``test/`` and ``ground_truth/``: as at the source, minus the images the run moved into training
      (an image is never both trained on and tested on) and their masks;
    * files lying directly in the category folder (a licence, a readme) are copied as they are.
    """
    rows = {r["sample_id"]: r for r in audit.rows()}
    moved = {m["sample_id"] for m in audit.contamination.get("moved", [])}
    by_id = {s.sample_id: s for s in scan.samples}
    plan: list[tuple[str, str]] = []
    left_out, missing, kept_injected = [], [], []
    for sample_id in audit.ids:
        row = rows[sample_id]
        if row["flagged"]:
            left_out.append({**{k: row[k] for k in ("sample_id", "path", "rank", "weight", "score",
                                                    "first_below_one")},
                             "reason": f"SCL weight {row['weight']:.3g} < 1 after the last epoch"})
            continue
        if sample_id not in by_id:  # deleted or renamed at the source since training
            missing.append(sample_id)
            continue
        rel = _relative(by_id[sample_id].uri, folder, prefix)
        if sample_id in moved:
            rel = "train/" + rel.split("/", 1)[1]  # test/<defect>/x.png -> train/<defect>/x.png
            kept_injected.append(sample_id)
        plan.append((by_id[sample_id].uri, rel))
    trained = set(audit.ids)
    not_in_run = sorted(s.sample_id for s in scan.samples if s.split == "train" and s.sample_id not in trained)
    n_test = n_masks = 0
    for sample in scan.samples:
        if sample.split != "test" or sample.sample_id in moved:
            continue
        plan.append((sample.uri, _relative(sample.uri, folder, prefix)))
        n_test += 1
        if sample.mask_uri:
            plan.append((sample.mask_uri, _relative(sample.mask_uri, folder, prefix)))
            n_masks += 1
    targets = [rel for _, rel in plan]
    if len(set(targets)) != len(targets):
        clash = next(t for t in targets if targets.count(t) > 1)
        raise CometError(f"--export-clean: two images would both become {clash}; rename one at the source")
    manifest = {
        "source": {"run": audit.run, "data_root": audit.data_root, "category": audit.category},
        "rule": FLAG_RULE,
        "n_train_kept": len(audit.ids) - len(left_out) - len(missing),
        "n_left_out": len(left_out),
        "n_test": n_test,
        "n_masks": n_masks,
        "left_out": left_out,
        "injected_kept_in_train": sorted(kept_injected),
        "removed_from_test": sorted(moved),
        "missing_at_source": missing,
        "not_in_run": not_in_run,
        "layout": "train/: the run's training images minus left_out (injected ones under train/<defect>/); "
                  "test/ and ground_truth/: the source's, minus the images the run moved into training",
    }
    return plan, manifest


def _top_level_files(fs, folder: str, prefix: str) -> list[tuple[str, str]]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
    return [(prefix + i.path, i.base_name) for i in infos
            if i.type == pafs.FileType.File and not i.base_name.startswith(".")]


def export_clean(audit: TrainingAudit, scan, dest: str, copy: bool = False, s3_endpoint: str | None = None,
                 workers: int = 8) -> dict:
    """Write the category without the flagged images to ``dest`` (a folder or ``s3://`` prefix).

    ``dest/<category>/...`` becomes a category ``comet-ray train`` accepts (see :func:`export_plan`),
    and ``dest/export_manifest.json`` records what was left out and why. Nothing at the source is
    written: local exports hard-link the files (no extra space; ``copy=True`` copies them, and a link
    that cannot be made falls back to a copy), ``s3://`` exports copy objects. A local export appears
    at once (staged beside ``dest``, then renamed); an ``s3://`` one is complete when its manifest is there.
    """
    from comet_ray.data.layout import open_dataset_filesystem
    from comet_ray.data.s3 import is_s3_uri, public_s3_uri, storage_error

    check_export_destination(dest, audit, s3_endpoint)
    src_fs, folder, prefix = category_folder(audit.data_root, audit.category, s3_endpoint)
    try:
        plan, manifest = export_plan(audit, scan, folder, prefix)
        plan += _top_level_files(src_fs, folder, prefix)
    except OSError as exc:
        raise storage_error(exc, audit.data_root, src_fs) from exc
    manifest["mode"] = "copy" if copy or is_s3_uri(dest) or is_s3_uri(audit.data_root) else "hardlink"
    category = audit.category
    if is_s3_uri(dest):
        dst_fs, base = open_dataset_filesystem(dest, s3_endpoint)
        same_store = is_s3_uri(audit.data_root) and type(src_fs) is type(dst_fs)

        def put(item: tuple[str, str]) -> None:
            uri, rel = item
            target = posixpath.join(base, category, rel)
            source = uri[len(prefix):] if prefix else uri
            if same_store:
                dst_fs.copy_file(source, target)  # server-side copy
            else:
                with src_fs.open_input_stream(source) as stream, dst_fs.open_output_stream(target) as sink:
                    shutil.copyfileobj(stream, sink, 1 << 20)

        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(put, plan))
            with dst_fs.open_output_stream(posixpath.join(base, EXPORT_MANIFEST)) as sink:
                sink.write(jsonfile.dumps(manifest, indent=2).encode())
        except OSError as exc:
            raise storage_error(exc, dest, dst_fs) from exc
        manifest["destination"] = public_s3_uri(dest)
        return manifest
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        for uri, rel in plan:
            out = staging / category / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if prefix:  # s3 source: download
                with src_fs.open_input_stream(uri[len(prefix):]) as stream, open(out, "wb") as sink:
                    shutil.copyfileobj(stream, sink, 1 << 20)
            elif copy:
                shutil.copy2(uri, out)
            else:
                try:
                    os.link(uri, out)
                except OSError:  # another file system, or links not allowed: copy
                    shutil.copy2(uri, out)
        jsonfile.write(staging / EXPORT_MANIFEST, manifest, indent=2)
        if target.exists():
            target.rmdir()  # empty (checked above); the rename below needs the name free
        os.rename(staging, target)
    except OSError as exc:
        raise CometError(f"--export-clean: cannot write {target}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest["destination"] = str(target)
    return manifest


# --- command line --------------------------------------------------------------------------------


