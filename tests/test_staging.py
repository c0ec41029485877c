"""Checkpoint staging folders: named after their process; those of exited processes are swept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from comet_ray.distributed.staging import checkpoint_staging, orphaned_staging, remove_orphaned_staging


def _exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_folders_of_exited_processes_are_removed_and_live_or_foreign_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / f"comet-ckpt-{_exited_pid()}-abc"
    (dead / "epoch").mkdir(parents=True)
    (dead / "epoch" / "trainer_state.pt").write_bytes(b"w")
    mine = tmp_path / f"comet-ckpt-{os.getpid()}-def"
    mine.mkdir()
    unrelated = [tmp_path / "comet-ckpt-notapid", tmp_path / "other-123-x"]
    for folder in unrelated:
        folder.mkdir()
    link = tmp_path / f"comet-ckpt-{_exited_pid()}-link"
    link.symlink_to(mine)  # never followed: removing through it would delete a live folder's files

    assert orphaned_staging(tmp_path) == [dead]
    assert remove_orphaned_staging(tmp_path) == [dead]
    assert not dead.exists() and mine.is_dir() and all(f.is_dir() for f in unrelated) and link.is_symlink()


def test_a_staging_folder_carries_this_process_id_and_is_not_an_orphan(tmp_path: Path) -> None:
    with checkpoint_staging(tmp_path) as folder:
        assert Path(folder).name.startswith(f"comet-ckpt-{os.getpid()}-")
        assert orphaned_staging(tmp_path) == []
    assert not Path(folder).exists()


def test_a_missing_temp_dir_is_nothing_to_sweep(tmp_path: Path) -> None:
    assert remove_orphaned_staging(tmp_path / "absent") == []


def test_s3_staging_is_private_to_this_user_and_stable_for_resume() -> None:
    from comet_ray import storage

    local = storage.staging_folder("s3://bucket/runs/private-test")
    try:
        for folder in (local, local.parent):
            info = folder.lstat()
            assert info.st_uid == os.getuid() and (info.st_mode & 0o777) == 0o700, oct(info.st_mode)
        assert storage.staging_folder("s3://bucket/runs/private-test") == local  # a rerun finds its state
    finally:
        local.rmdir()


def test_a_run_folder_write_sweeps_only_dead_writers_staging(tmp_path: Path) -> None:
    from comet_ray.atomic import orphaned_staging, owned_staging

    prefix = ".run.staging-"
    mine = owned_staging(tmp_path, prefix)
    assert (mine.stat().st_mode & 0o777) == 0o700
    dead = tmp_path / f"{prefix}{_exited_pid()}-x"
    dead.mkdir()
    live_other = tmp_path / f"{prefix}{os.getppid()}-y"  # another live writer beside the same out
    live_other.mkdir()
    assert orphaned_staging(tmp_path, prefix) == [dead]
