"""The sample table: one row per image, built once from an MVTec-AD-style tree.

Everything downstream (decoding, feature cache, SCL weights, predictions, manifests) is keyed by
``Sample.sample_id`` and reads this table; nothing else walks the disk. Listing goes through
``pyarrow.fs`` so the same code reads a local folder or an ``s3://`` prefix.

Expected layout (``<root>`` may also be the category folder itself)::

    <root>/<category>/train/<defect>/<image>          # unlabelled; usually defect "good"
    <root>/<category>/test/<defect>/<image>           # "good" or a defect type
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from comet_ray.data.local_walk import is_utf8_name, walk_files
from comet_ray.data.s3 import is_storage_failure, open_s3, public_s3_uri, storage_error
from comet_ray.errors import DatasetLayoutError, ImageDecodeError, StorageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
NOMINAL = "good"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Sample:
    """One image of the dataset and what the folder layout says about it."""

    sample_id: str  # "<category>/<split>/<defect>/<file name>", posix, relative to the dataset root
    category: str
    split: str  # "train" or "test"
    uri: str  # local absolute path or "s3://bucket/key"
    defect: str  # folder name under the split; train images are unlabelled whatever it says
    mask_uri: str | None  # ground-truth mask, when one exists (test anomalies only)
    injected: bool = False  # moved from test into train by contamination injection (experiments)

    @property
    def is_anomalous(self) -> bool:
        """Ground truth as far as it is known.

        Train images are unlabelled (uncurated data may hide anomalies), so a plain train sample
        counts as nominal here; only injected ones are known anomalies.
        """
        if self.split == "test":
            return self.defect != NOMINAL
        return self.injected


def open_dataset_filesystem(root: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, base path)`` for a local folder or an ``s3://bucket/prefix`` URI.

    ``s3_endpoint`` (e.g. ``http://minio:9000``; default ``AWS_ENDPOINT_URL``) targets an
    S3-compatible store; its scheme picks http or https. Credentials come from the standard AWS
    chain, never from arguments; region, retries and timeouts follow :mod:`comet_ray.data.s3`.
    """
    if _is_uri(root):
        parsed = urlparse(root)
        if parsed.scheme == "s3":
            return open_s3(root, s3_endpoint)
        try:
            fs, path = pafs.FileSystem.from_uri(root)
        except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
            raise DatasetLayoutError(f"cannot open dataset root {public_s3_uri(root)}: {exc}") from exc
        return fs, _strip_slash(path)
    path = os.path.abspath(os.path.expanduser(root))
    fs, path = pafs.FileSystem.from_uri(path)
    return fs, _strip_slash(path)


def read_bytes(uri: str, filesystem: pafs.FileSystem | None) -> bytes:
    """Read a whole file named by a ``Sample`` uri.

    An unreadable file is reported as :class:`ImageDecodeError` (one line naming it), because the
    only files read this way are images and masks.
    """
    if filesystem is None:
        filesystem, path = open_dataset_filesystem(uri)
    else:
        path = _uri_to_path(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (OSError, ValueError) as exc:
        if isinstance(filesystem, pafs.S3FileSystem) and is_storage_failure(exc):
            # Denied credentials or an endpoint still down after retries: no image will do better.
            raise storage_error(exc, uri, filesystem) from exc
        raise ImageDecodeError(public_s3_uri(uri), f"cannot read file ({exc})") from exc


def list_image_uris(uri: str, s3_endpoint: str | None = None) -> list[str]:
    """Image files under an ``s3://`` prefix (recursive, hidden ones skipped, sorted), or that object.

    For ``comet-ray predict``: storage failures (denied, missing bucket, endpoint down) are one
    :class:`~comet_ray.errors.StorageError` line; a prefix with nothing under it gives ``[]``.
    """
    fs, base = open_dataset_filesystem(uri, s3_endpoint)
    prefix = _uri_prefix(uri, fs)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        keys = [
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and _is_image(i.base_name)
            and not any(_is_hidden(part) for part in posixpath.relpath(i.path, base).split("/"))
        ]
        if not keys:
            info = fs.get_file_info(base)
            if info.type == pafs.FileType.File:
                keys = [base]
            elif info.type == pafs.FileType.NotFound and isinstance(fs, pafs.S3FileSystem):
                bucket = base.split("/", 1)[0]
                if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise StorageError(f"bucket '{bucket}' does not exist (asked for {public_s3_uri(uri)})")
    except OSError as exc:
        raise storage_error(exc, uri, fs) from exc
    return [prefix + key for key in sorted(keys)]


def list_categories(root: str, filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Category folders under ``root`` (those with a ``train/`` folder), sorted.

    If ``root`` is itself a category folder, that one category is returned.
    """
    fs, base = _resolve(root, filesystem)
    try:
        return _list_categories(root, fs, base)
    except OSError as exc:
        raise storage_error(exc, root, fs) from exc


def _list_categories(root: str, fs: pafs.FileSystem, base: str) -> list[str]:
    _require_dir(fs, base, root, "the dataset root")
    if _is_dir(fs, posixpath.join(base, "train")):
        return [posixpath.basename(base)]
    if fs.type_name == "local":  # pyarrow's listing fails on the first non-UTF-8 name
        names = [n.decode("utf-8") for n in os.listdir(os.fsencode(base)) if is_utf8_name(n)]
    else:
        names = [
            info.base_name
            for info in fs.get_file_info(pafs.FileSelector(base, recursive=False))
            if info.type == pafs.FileType.Directory
        ]
    categories = sorted(
        name for name in names if not _is_hidden(name) and _is_dir(fs, posixpath.join(base, name, "train"))
    )
    if not categories:
        raise DatasetLayoutError(
            f"no category found under {public_s3_uri(root)}: expected <category>/train/ folders (MVTec AD layout)"
        )
    return categories


@dataclass
class CategoryScan:
    """A category's sample table plus the files found but left out of it.

    ``unlisted`` records (``{sample_id, uri, reason}``, the shape of decode-time skips) name local
    files that cannot be used whatever their content: non-UTF-8 names, broken links, folders
    reached twice through a link loop (see :mod:`comet_ray.data.local_walk`).
    """

    samples: list[Sample]
    unlisted: list[dict]


def build_sample_table(
    root: str, category: str | None = None, filesystem: pafs.FileSystem | None = None
) -> list[Sample]:
    """The samples of :func:`scan_category` (for callers that report nothing about left-out files)."""
    return scan_category(root, category, filesystem).samples


def scan_category(
    root: str, category: str | None = None, filesystem: pafs.FileSystem | None = None
) -> CategoryScan:
    """List every image of one category once, sorted by ``sample_id``, and what was left out.

    ``root`` may be the dataset root (then ``category`` names a folder in it) or the category folder
    itself (then ``category`` may be omitted or must match its name). A missing ``test/`` is allowed
    (predict-only use) and yields no test samples; a test anomaly without a mask gets ``mask_uri``
    None, which downstream counts rather than fails on.
    """
    fs, base = _resolve(root, filesystem)
    try:
        return _scan_category(root, category, fs, base)
    except OSError as exc:
        raise storage_error(exc, root, fs) from exc


def _scan_category(root: str, category: str | None, fs: pafs.FileSystem, base: str) -> CategoryScan:
    _require_dir(fs, base, root, "the dataset root")
    prefix = _uri_prefix(root, fs)

    if _is_dir(fs, posixpath.join(base, "train")):
        folder_name = posixpath.basename(base)
        if category not in (None, folder_name):
            raise DatasetLayoutError(
                f"{public_s3_uri(root)} is the category folder '{folder_name}', but category '{category}' was asked for"
            )
        category, category_dir = folder_name, base
    else:
        if not category:
            raise DatasetLayoutError(f"no category given and {public_s3_uri(root)} has no train/ folder")
        category_dir = posixpath.join(base, category)
        if not _is_dir(fs, category_dir):
            available = _available_categories(root, fs)
            raise DatasetLayoutError(
                f"category '{category}' not found under {public_s3_uri(root)}; available: {available or 'none'}"
            )

    train_dir = posixpath.join(category_dir, "train")
    if not _is_dir(fs, train_dir):
        raise DatasetLayoutError(f"{prefix + category_dir} has no train/ folder (expected train/<defect>/)")

    unlisted: list[dict] = []
    masks = _mask_index(
        fs, posixpath.join(category_dir, "ground_truth"), unlisted, posixpath.join(category, "ground_truth")
    )
    samples: list[Sample] = []
    for split in SPLITS:
        split_dir = posixpath.join(category_dir, split)
        if split == "test" and not _is_dir(fs, split_dir):
            continue  # predict-only datasets have no test split
        for rel in _list_images(fs, split_dir, unlisted, id_prefix=posixpath.join(category, split)):
            parent, file_name = posixpath.split(rel)
            if not parent:
                if split == "test":
                    raise DatasetLayoutError(
                        f"{prefix + posixpath.join(split_dir, rel)} lies directly in test/; "
                        "expected test/<defect>/<image> so its label is known"
                    )
                parent = NOMINAL  # train is unlabelled anyway; a flat train/ folder is fine
            defect = parent.split("/")[0]
            mask_uri = None
            if split == "test" and defect != NOMINAL:
                mask_rel = masks.get(_mask_key(parent, file_name))
                if mask_rel is not None:
                    mask_uri = prefix + posixpath.join(category_dir, "ground_truth", mask_rel)
            samples.append(
                Sample(
                    sample_id=posixpath.join(category, split, parent, file_name),
                    category=category,
                    split=split,
                    uri=prefix + posixpath.join(split_dir, rel),
                    defect=defect,
                    mask_uri=mask_uri,
                )
            )

    if not any(s.split == "train" for s in samples):
        left_out = (
            f"; {len(unlisted)} file(s) left out, first: {unlisted[0]['uri']} ({unlisted[0]['reason']})"
            if unlisted
            else ""
        )
        raise DatasetLayoutError(
            f"{prefix + train_dir} contains no images (expected {', '.join(sorted(IMAGE_EXTENSIONS))}){left_out}"
        )
    samples.sort(key=lambda s: s.sample_id)
    return CategoryScan(samples, unlisted)


# --- helpers -------------------------------------------------------------------------------------


def _is_uri(root: str) -> bool:
    scheme = urlparse(root).scheme
    return len(scheme) > 1 and "://" in root  # a single letter is a Windows drive, not a scheme


def _strip_slash(path: str) -> str:
    return path.rstrip("/") or "/"


def _resolve(root: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if filesystem is None:
        return open_dataset_filesystem(root)
    return filesystem, _strip_slash(_uri_to_path(root) if _is_uri(root) else _local_or_raw(root, filesystem))


def _local_or_raw(root: str, fs: pafs.FileSystem) -> str:
    if fs.type_name == "local":
        return os.path.abspath(os.path.expanduser(root))
    return root


def _uri_to_path(uri: str) -> str:
    if _is_uri(uri):
        parsed = urlparse(uri)
        return parsed.netloc.rpartition("@")[2] + parsed.path  # user info may hold credentials
    return uri


def _uri_prefix(root: str, fs: pafs.FileSystem) -> str:
    """What turns a filesystem path back into a ``Sample.uri`` (empty for local paths)."""
    if _is_uri(root):
        return urlparse(root).scheme + "://"
    return "" if fs.type_name == "local" else f"{fs.type_name}://"


def _is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def _require_dir(fs: pafs.FileSystem, path: str, shown: str, what: str) -> None:
    info = fs.get_file_info(path)
    shown = public_s3_uri(shown)
    if info.type == pafs.FileType.NotFound:
        if isinstance(fs, pafs.S3FileSystem):
            bucket = path.split("/", 1)[0]
            if bucket != path and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"bucket '{bucket}' does not exist (asked for {shown})")
            if bucket == path:
                raise StorageError(f"bucket '{bucket}' does not exist")
            raise DatasetLayoutError(f"{what} {shown} does not exist: no object has this prefix")
        raise DatasetLayoutError(f"{what} {shown} does not exist")
    if info.type != pafs.FileType.Directory:
        raise DatasetLayoutError(f"{what} {shown} is not a folder")


def _available_categories(root: str, fs: pafs.FileSystem) -> list[str]:
    try:
        return list_categories(root, fs)
    except DatasetLayoutError:
        return []


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_images(
    fs: pafs.FileSystem, directory: str, unlisted: list[dict] | None = None, id_prefix: str = ""
) -> list[str]:
    """Image files under ``directory`` (recursive), as posix paths relative to it; hidden ones skipped.

    Local folders go through :func:`~comet_ray.data.local_walk.walk_files` (non-UTF-8 names and link
    loops would break or duplicate a pyarrow listing); what it leaves out is appended to ``unlisted``.
    """
    if fs.type_name == "local":
        if not os.path.isdir(directory):
            return []
        listing = walk_files(directory, _is_image)
        if unlisted is not None:
            for problem in listing.problems:
                rel = os.path.relpath(problem["path"], directory).replace(os.sep, "/")
                unlisted.append(
                    {
                        "sample_id": posixpath.join(id_prefix, rel),
                        "uri": problem["path"],
                        "reason": problem["reason"],
                    }
                )
        return sorted(os.path.relpath(path, directory).replace(os.sep, "/") for path in listing.files)
    selector = pafs.FileSelector(directory, recursive=True, allow_not_found=True)
    found = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, directory)
        if any(_is_hidden(part) for part in rel.split("/")) or not _is_image(info.base_name):
            continue
        found.append(rel)
    return sorted(found)


def _mask_key(parent: str, file_name: str) -> str:
    stem = posixpath.splitext(file_name)[0]
    return posixpath.join(parent, stem + "_mask").lower()


def _mask_index(
    fs: pafs.FileSystem, gt_dir: str, unlisted: list[dict] | None = None, id_prefix: str = ""
) -> dict[str, str]:
    """Map ``"<defect>/<stem>_mask"`` (lower case) to the mask's path relative to ``ground_truth/``.

    Listing once and matching by key avoids one existence probe per image (slow on S3) and accepts
    any image extension for the mask.
    """
    index: dict[str, str] = {}
    for rel in _list_images(fs, gt_dir, unlisted, id_prefix):
        key = posixpath.splitext(rel)[0].lower()
        if not key.endswith("_mask"):
            continue
        # Prefer .png when the same mask exists in several formats; sorted order makes this stable.
        if key not in index or rel.lower().endswith(".png"):
            index[key] = rel
    return index
