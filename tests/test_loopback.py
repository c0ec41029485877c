"""The local Ray the CLI starts (train --workers, tune) listens on 127.0.0.1 only: GCS, raylet, object
manager, dashboard and its agents. Every listening TCP socket of its processes is read from /proc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc"),
]

# Starts Ray as the CLI does, runs one task, prints [[process, address, port], ...] of every listening socket.
_PROBE = r"""
import json, os, socket, struct, time
from pathlib import Path
import ray
from comet_ray.distributed.connect import init_ray

def descendants(root):
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found

def listening():
    table = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A":
                continue
            hexip, hexport = cols[1].split(":")
            raw = bytes.fromhex(hexip)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            table[cols[9]] = (socket.inet_ntop(family, raw), int(hexport, 16))
    rows = []
    for pid in descendants(os.getpid()):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in table:
                rows.append([comm, *table[link[8:-1]]])
    return rows

init_ray(log_to_driver=False)
ray.get(ray.remote(lambda: 1).remote())
time.sleep(5)  # the dashboard's agents start after the first task
print(json.dumps(listening()))
ray.shutdown()
"""


def test_the_local_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sockets = json.loads(done.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the probe sees Ray's own servers
    assert [s for s in sockets if s[1].removeprefix("::ffff:") != "127.0.0.1"] == [], sockets
