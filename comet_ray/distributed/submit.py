"""Run comet-ray commands on a Ray cluster through the Ray Jobs API.

``comet-ray submit [--address URL] [--no-wait] [--runtime-env FILE] -- train DATA --category C --out DIR``
uploads the project (the folder holding ``pyproject.toml``; ``.venv``, ``.git``, run and data folders
excluded) as the job's ``working_dir`` and runs ``python -m comet_ray train ...`` as the job's
entrypoint. Whatever follows ``--`` is passed through unchanged, so every command the CLI has
(``train``, ``tune``, ``evaluate``, ...) runs remotely as it runs locally. The submit command then
streams the job's output with a status line (job id, status, elapsed time) and exits with the job's
result: 0 when it SUCCEEDED, 1 when it FAILED or was STOPPED.

``comet-ray status JOB_ID``, ``comet-ray logs JOB_ID [--follow]`` and ``comet-ray stop JOB_ID`` look
after a job submitted earlier (``--no-wait``, or a terminal that was closed: Ctrl-C detaches, the job
keeps running).

The connection, the token and following a job: :mod:`comet_ray.distributed.job_client`.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from comet_ray.errors import CometError

RESULTS_URI_ENV = "COMET_RAY_RESULTS_URI"


# gitignore-style patterns, relative to the working dir (Ray also honours the project's .gitignore).
# Folders a user keeps in the project root (environments, datasets, run outputs) are anchored with a
# leading "/": an unanchored "data/" matches at any depth and would strip the package's own
# comet_ray/data/ from the job. Only names that are never part of the package match everywhere.
DEFAULT_EXCLUDES = [
    "/.venv/",
    "/venv/",
    "/.git/",
    "__pycache__/",
    "*.pyc",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    "/runs/",
    "/out/",
    "/data/",
    "/datasets/",
    "/.cache/",
    "/cache/",
    "/.whl/",
    "/.gpu/",
    "/dist/",
    "/build/",
    "/comet-ray-demo/",
    "/predictions/",
    "/tune-runs/",
    "/tune-results/",
    "/.ci/out/",
]


def project_root() -> Path | None:
    """The source tree this package runs from (editable install / checkout), or None for a wheel install."""
    import comet_ray

    root = Path(comet_ray.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    try:
        if pyproject.is_file() and 'name = "comet-ray"' in pyproject.read_text():
            return root
    except OSError:
        pass
    return None


def load_runtime_env(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise CometError(f"--runtime-env {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CometError(f"--runtime-env {path}: not valid YAML/JSON ({exc.__class__.__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CometError(f"--runtime-env {path}: expected a mapping (working_dir, pip, env_vars, ...)")
    return data


_DETECT = Path("<detect>")


def build_runtime_env(file_env: dict[str, Any] | None = None, root: Path | None = _DETECT) -> dict[str, Any]:
    """The job's runtime env: ``file_env`` (``--runtime-env``) plus the project as ``working_dir``.

    A local ``working_dir`` (relative paths are relative to the current directory, as with
    ``ray job submit``) gets :data:`DEFAULT_EXCLUDES` added to its ``excludes``. Without any
    ``working_dir`` the project root is used; a wheel install without a source tree ships the
    ``comet_ray`` package as ``py_modules`` instead.
    """
    env = dict(file_env or {})
    root = project_root() if root is _DETECT else root
    if "working_dir" not in env:
        if root is not None:
            env["working_dir"] = str(root)
        else:
            import comet_ray

            modules = list(env.get("py_modules") or [])
            package = str(Path(comet_ray.__file__).resolve().parent)
            if package not in modules:
                modules.append(package)
            env["py_modules"] = modules
    working_dir = env.get("working_dir")
    if isinstance(working_dir, str) and "://" not in working_dir:
        local = Path(working_dir).expanduser().resolve()
        if not local.is_dir():
            raise CometError(f"runtime env working_dir {working_dir} is not a folder")
        if not (local / "comet_ray" / "__init__.py").is_file() and not env.get("py_modules"):
            raise CometError(
                f"runtime env working_dir {local} does not hold the comet_ray package: run from the "
                "project root (relative working_dir paths are relative to the current directory)"
            )
        env["working_dir"] = str(local)
        excludes = list(env.get("excludes") or [])
        env["excludes"] = excludes + [p for p in DEFAULT_EXCLUDES if p not in excludes]
    env_vars = {str(k): str(v) for k, v in (env.get("env_vars") or {}).items()}
    env_vars.setdefault("PYTHONUNBUFFERED", "1")
    env["env_vars"] = env_vars
    return env


def command_args(raw: list[str], known: set[str] | None = None) -> list[str]:
    """The arguments after ``--``: a comet-ray command line (``train DATA ...``); ``known``: the CLI's commands."""
    args = list(raw)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise CometError(
            "nothing to run: give a comet-ray command after --, e.g. "
            "comet-ray submit -- train DATA --category bottle --out runs/bottle"
        )
    if args[0] in ("comet-ray", "comet_ray"):
        args = args[1:]
    if not args or args[0].startswith("-"):
        raise CometError(f"expected a comet-ray command after --, got {' '.join(raw)!r}")
    if known is not None and args[0] not in known:
        raise CometError(f"'{args[0]}' is not a comet-ray command here (known: {', '.join(sorted(known))})")
    if args[0] in ("submit", "status", "logs", "stop"):
        raise CometError(f"'{args[0]}' runs on your machine, not as a cluster job")
    return args


def option_value(args: list[str], name: str) -> str | None:
    """The value of ``--name X`` / ``--name=X`` in a pass-through command line (last one wins)."""
    value = None
    for i, item in enumerate(args):
        if item == name and i + 1 < len(args):
            value = args[i + 1]
        elif item.startswith(name + "="):
            value = item.split("=", 1)[1]
    return value


def build_entrypoint(args: list[str], results_uri: str | None = None, python: str = "python") -> str:
    """``python -m comet_ray ARGS`` (shell-quoted), then the results upload when ``results_uri`` is set."""
    entry = shlex.join([python, "-m", "comet_ray", *args])
    out = option_value(args, "--out")
    if results_uri and out and not out.startswith("s3://"):
        entry += " && " + shlex.join(
            [
                python,
                "-m",
                "comet_ray.distributed.submit",
                "push-results",
                out,
                results_destination(out, results_uri),
            ]
        )
    return entry


def results_destination(out: str, results_uri: str) -> str:
    return f"{results_uri.rstrip('/')}/{Path(out.rstrip('/')).name}"


def where_results_go(args: list[str], results_uri: str | None = None) -> str | None:
    out = option_value(args, "--out")
    if out is None:
        return None
    if out.startswith("s3://"):
        return f"results: {out}"
    if results_uri:
        return f"results: {results_destination(out, results_uri)} (copied from {out} on the node that ran the job)"
    return (
        f"results: {out} on the cluster's filesystem (the node that ran the job, relative to its working dir "
        "unless absolute), not on this machine; pass --results-uri s3://... to copy them out"
    )


def new_submission_id(command: str) -> str:
    return f"comet-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def push_results(local: str, destination: str, s3_endpoint: str | None = None) -> int:
    """Copy a finished run folder to object storage (runs on the cluster, after the command)."""
    from comet_ray.upload import upload_tree

    if not Path(local).is_dir():
        raise CometError(f"no results folder {local} to copy to {destination}")
    summary = upload_tree(local, destination, s3_endpoint, False, 8, progress=False)
    print(summary.line(), flush=True)
    return 0


def _main(argv: list[str] | None = None) -> int:
    """``python -m comet_ray.distributed.submit push-results LOCAL S3_URI`` (used inside jobs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 3 and argv[0] == "push-results":
        try:
            return push_results(argv[1], argv[2], os.environ.get("AWS_ENDPOINT_URL"))
        except CometError as exc:
            print(f"comet-ray: error: {exc}", file=sys.stderr)
            return 2
    print(
        "usage: python -m comet_ray.distributed.submit push-results LOCAL_DIR s3://bucket/prefix",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(_main())
