"""``comet-ray audit RUN``: load the run (local or ``s3://``), write the audit, and export the clean copy."""

from __future__ import annotations

import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from comet_ray import jsonfile
from comet_ray.atomic import publish_folder
from comet_ray.audit.export import check_export_destination, export_clean
from comet_ray.audit.ranking import FLAG_RULE
from comet_ray.audit.run import (
    GALLERY_DIR,
    TRAJECTORY_FILE,
    TrainingAudit,
    load_audit,
    source_scan,
    suspect_panels,
    trajectory_chart,
    write_csv,
)
from comet_ray.errors import CometError
from comet_ray.runfolder import RUN_FILES

AUDIT_DIR = "audit"


@dataclass
class AuditOutcome:
    audit: TrainingAudit
    out: str  # where the files went (local folder or s3:// prefix)
    panels: list[Path]
    export: dict | None = None


def write_audit(
    audit: TrainingAudit,
    checkpoint: Path | None,
    staging: Path,
    gallery: int,
    device: str,
    s3_endpoint: str | None,
) -> list[Path]:
    """audit.csv, audit.json, weights_trajectory.png and gallery/ into ``staging``; returns the panels."""
    panels: list[Path] = []
    if gallery > 0:
        if checkpoint is None or not checkpoint.exists():
            audit.notes.append("no model.pt in the run folder: no gallery")
        elif not audit.paths:
            audit.notes.append("the training images are not reachable: no gallery")
        else:
            panels = [
                p
                for _, p in suspect_panels(
                    audit, checkpoint, gallery, staging / GALLERY_DIR, device, s3_endpoint
                )
            ]
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


def run_audit(
    run: str,
    out: str | None = None,
    gallery: int = 8,
    export_to: str | None = None,
    copy: bool = False,
    device: str = "auto",
    s3_endpoint: str | None = None,
) -> AuditOutcome:
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
