"""A checkpoint write that fails half-way (file-size limit hit, like a full disk) leaves the old one valid."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from comet_ray.checkpoint import load_detector, save_detector
from comet_ray.models.simplenet import SimpleNet


def test_failed_write_keeps_previous_checkpoint(tmp_path) -> None:
    path = tmp_path / "model.pt"
    save_detector(path, SimpleNet(8, hidden=8), {"backbone": "mobilenet_v2"}, (2, 2), {}, 0.5, 0.1)
    before = path.read_bytes()
    # In a child process, cap the file size (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full
    # disk) and try to overwrite the checkpoint with a much larger model.
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from comet_ray.checkpoint import save_detector
        from comet_ray.models.simplenet import SimpleNet
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            save_detector({str(path)!r}, SimpleNet(512, hidden=512), {{"backbone": "mobilenet_v2"}}, (2, 2), {{}}, 0.5, 0.1)
        except Exception as exc:
            print(type(exc).__name__, exc)
            sys.exit(3 if type(exc).__name__ == "CheckpointError" else 4)
        sys.exit(0)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "previous file is intact" in result.stdout
    assert path.read_bytes() == before
    model, meta = load_detector(path)
    assert meta["threshold"] == 0.5 and isinstance(model, torch.nn.Module)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left behind
