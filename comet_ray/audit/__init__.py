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

Rooms: :mod:`.ranking` (plain arrays in, numbers out, so benchmarks score any ranking the same way),
:mod:`.run` (a run folder as a :class:`TrainingAudit`, gallery, trajectories, audit.csv), :mod:`.export`
(the clean copy) and :mod:`.command` (the command: fetch, write, publish).
"""

from comet_ray.audit.command import AUDIT_DIR, AuditOutcome, run_audit, write_audit
from comet_ray.audit.export import EXPORT_MANIFEST, check_export_destination, export_clean, export_plan
from comet_ray.audit.ranking import (
    FLAG_RULE,
    audit_metrics,
    first_below_one,
    flagged_mask,
    precision_at_k,
    rank_order,
)
from comet_ray.audit.run import (
    CSV_FIELDS,
    GALLERY_DIR,
    TRAJECTORY_FILE,
    TrainingAudit,
    audit_from_documents,
    category_folder,
    load_audit,
    read_csv,
    source_scan,
    suspect_panels,
    trajectory_chart,
    write_csv,
)

__all__ = [
    "AUDIT_DIR",
    "CSV_FIELDS",
    "EXPORT_MANIFEST",
    "FLAG_RULE",
    "GALLERY_DIR",
    "TRAJECTORY_FILE",
    "AuditOutcome",
    "TrainingAudit",
    "audit_from_documents",
    "audit_metrics",
    "category_folder",
    "check_export_destination",
    "export_clean",
    "export_plan",
    "first_below_one",
    "flagged_mask",
    "load_audit",
    "precision_at_k",
    "rank_order",
    "read_csv",
    "run_audit",
    "source_scan",
    "suspect_panels",
    "trajectory_chart",
    "write_audit",
    "write_csv",
]
