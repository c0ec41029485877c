"""``--export-clean DEST``: the category without the images the audit flagged."""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from comet_ray import jsonfile
from comet_ray.audit.ranking import FLAG_RULE
from comet_ray.audit.run import TrainingAudit, category_folder
from comet_ray.errors import CometError

EXPORT_MANIFEST = "export_manifest.json"


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
            raise CometError(
                f"--export-clean destination {public_s3_uri(dest)} already holds objects; "
                "choose an empty prefix (nothing is overwritten)"
            )
        if audit.data_root.startswith("s3://"):
            source = public_s3_uri(audit.data_root).rstrip("/") + "/"
            target = public_s3_uri(dest).rstrip("/") + "/"
            if target.startswith(source) or source.startswith(target):
                raise CometError(
                    f"--export-clean destination {public_s3_uri(dest)} overlaps the data root {source}"
                )
        return
    target = Path(dest)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CometError(
            f"--export-clean destination {target} exists and is not empty (nothing is overwritten)"
        )
    if not audit.data_root.startswith("s3://"):
        source = Path(audit.data_root)
        if _is_within(target, source) or _is_within(source, target):
            raise CometError(f"--export-clean destination {target} overlaps the data root {source}")


def _relative(uri: str, folder: str, prefix: str) -> str:
    path = uri[len(prefix) :] if prefix and uri.startswith(prefix) else uri
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
            left_out.append(
                {
                    **{
                        k: row[k] for k in ("sample_id", "path", "rank", "weight", "score", "first_below_one")
                    },
                    "reason": f"SCL weight {row['weight']:.3g} < 1 after the last epoch",
                }
            )
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
    not_in_run = sorted(
        s.sample_id for s in scan.samples if s.split == "train" and s.sample_id not in trained
    )
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
    return [
        (prefix + i.path, i.base_name)
        for i in infos
        if i.type == pafs.FileType.File and not i.base_name.startswith(".")
    ]


def export_clean(
    audit: TrainingAudit,
    scan,
    dest: str,
    copy: bool = False,
    s3_endpoint: str | None = None,
    workers: int = 8,
) -> dict:
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
            source = uri[len(prefix) :] if prefix else uri
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
                with src_fs.open_input_stream(uri[len(prefix) :]) as stream, open(out, "wb") as sink:
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
