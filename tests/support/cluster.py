"""A multi-node Ray cluster on this one machine that behaves like several machines (for tests).

What makes it behave like a real cluster rather than Ray's usual single-machine test setups:

* **a head that trains and runs nothing**: ``ray start --head --num-cpus=0`` (as ``clusters/aws-gpu.yaml``
  starts it), dashboard and job API on 127.0.0.1, token authentication on (``RAY_AUTH_MODE=token``);
  the worker nodes offer the job drivers' resource (``comet_ray.distributed.placement``), the head not;
* **worker nodes with their own disks**: each worker node runs inside its own mount namespace
  (``unshare -m``) where bind mounts put private folders over the cluster's temp folder (``TMPDIR``,
  which holds Ray's ``<tmp>/ray``: sessions, runtime envs, working dirs) and over ``HOME``. What a
  node writes there (checkpoint staging, feature caches, a relative ``--out``) is invisible to the
  head and to the other nodes, as
  on separate machines; a node removed and added again starts on an empty disk. The nodes share only
  the network (127.0.0.1) and the read-only software (the Python environment). Where mount
  namespaces are not allowed, the same folders are private through TMPDIR, HOME and Ray's
  ``temp_dir`` per node (:attr:`LocalCluster.isolation` says which);
* **a Python without comet-ray**: :func:`cluster_python` builds a venv whose only link to this
  environment is a ``.pth`` *path line* naming its site-packages. Python adds such a line to
  ``sys.path`` as it is and does not process the ``.pth`` files inside that folder, so an editable
  install's import hook (``__editable__...pth``) never runs: the dependencies import, ``comet_ray``
  does not. A job's code then comes only from what ``comet-ray submit`` uploaded.

Worker nodes are started the way ``ray.cluster_utils.Cluster.add_node`` starts them (a
``ray._private.node.Node`` with ``head=False``, all addresses 127.0.0.1; see ``ray_node.py``), from a
process inside the node's namespace. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` stays 0 (with 1, Ray
rewrites 127.0.0.1 to the machine's external address). Everything is stopped by PID: each node and
the head run in their own session, and :meth:`LocalCluster.close` sends SIGTERM, then SIGKILL, to
every process of those sessions and their descendants, never ``ray stop``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from comet_ray.distributed.placement import DRIVER_RESOURCE

from support import LOCAL_ENV
from support.s3server import free_ports

NODE_SCRIPT = Path(__file__).with_name("ray_node.py")
START_TIMEOUT_S = 180.0
# Ray's own settings for every process of the cluster: a dead node is noticed in seconds, not ~30 s.
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "3",
}
_MOUNT_SCRIPT = 'set -e; while [ "$1" != "--" ]; do mount --bind "$1" "$2"; shift 2; done; shift; exec "$@"'


# --------------------------------------------------------------------------- the cluster's Python
def cluster_python(directory: str | os.PathLike) -> Path:
    """A venv at ``directory`` that imports this environment's packages but not comet-ray; returns its python.

    Raises ``RuntimeError`` when ``comet_ray`` is importable there anyway (e.g. installed as a wheel
    into site-packages instead of in editable mode): the tier would then prove nothing.
    """
    directory = Path(directory)
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", "--without-pip", str(directory)], check=True, capture_output=True)
    python = directory / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = [
        p
        for p in dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
        if Path(p).is_dir()
    ]
    (Path(purelib) / "cluster-dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    probe = subprocess.run(
        [str(python), "-c", "import ray, torch; import comet_ray"],
        capture_output=True,
        text=True,
        cwd=directory,
        env=_clean_env(os.environ),
        check=False,
    )
    if probe.returncode == 0:
        raise RuntimeError(
            "comet_ray is importable without the project on the path (installed as a wheel?): "
            "the cluster Python must not have it"
        )
    if "No module named 'comet_ray'" not in probe.stderr:
        raise RuntimeError(
            f"the cluster Python cannot import its dependencies: {probe.stderr.strip()[-500:]}"
        )
    return python


def _clean_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without what would let a process import this checkout or join another Ray."""
    drop = (
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "VIRTUAL_ENV",
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_TMPDIR",
        "TMPDIR",
        "COMET_RAY_CACHE",
    )
    return {k: v for k, v in env.items() if k not in drop}


# --------------------------------------------------------------------------- mount namespaces
def unshare_command() -> list[str] | None:
    """How to enter a private mount namespace here: ``unshare -m`` (root) or ``unshare -rm`` (a user
    namespace, for unprivileged users where the kernel allows it); None when neither works."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    probe = tempfile.mkdtemp(prefix="crm-probe-")
    try:
        for command in (
            ["unshare", "-m", "--propagation", "private"],
            ["unshare", "-r", "-m", "--propagation", "private"],
        ):
            result = subprocess.run(
                [*command, "sh", "-c", _MOUNT_SCRIPT, "sh", probe, probe, "--", "true"],
                capture_output=True,
                timeout=30,
                check=False,
            )
            if result.returncode == 0:
                return command
        return None
    finally:
        os.rmdir(probe)


# --------------------------------------------------------------------------- processes, from /proc
def _proc_table() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (parent pid, session id, start time, command line) of every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = (
                Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        table[int(entry)] = (int(fields[1]), int(fields[3]), fields[19], cmdline)
    return table


def session_processes(leaders: set[int], marker: str | None = None) -> dict[int, str]:
    """pid -> start time of every live process in the sessions led by ``leaders`` (or whose command line
    contains ``marker``, e.g. a cluster's temp folder) and of their descendants."""
    table = _proc_table()
    found = {pid for pid, (_, sid, _, cmd) in table.items() if sid in leaders or (marker and marker in cmd)}
    found |= leaders & set(table)
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (ppid, _, _, _) in table.items() if ppid in frontier and pid not in found}
        found |= frontier
    found.discard(os.getpid())
    return {pid: table[pid][2] for pid in found}


def _still_alive(pids: dict[int, str]) -> dict[int, str]:
    table = _proc_table()
    return {pid: started for pid, started in pids.items() if pid in table and table[pid][2] == started}


def stop_processes(leaders: set[int], grace_s: float = 10.0, marker: str | None = None) -> list[int]:
    """SIGTERM every process of ``leaders``' sessions (and ``marker``'s), SIGKILL what is left after
    ``grace_s``; returns the survivors."""
    known = session_processes(leaders, marker)
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        known.update(session_processes(leaders, marker))
        for pid in _still_alive(known):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            known.update(session_processes(leaders, marker))
            if not _still_alive(known):
                return []
            time.sleep(0.2)
    return sorted(_still_alive(known))


# --------------------------------------------------------------------------- the cluster
@dataclass
class ClusterNode:
    """One worker node: its launcher process (session leader), its private disk and its log."""

    name: str
    process: subprocess.Popen
    disk: Path
    log: Path
    node_id: str = ""
    resources: dict = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class LocalCluster:
    """A head (no CPUs) plus worker nodes with private disks, on 127.0.0.1 (see the module docstring).

    ``env`` is what every cluster process gets on top of a clean copy of ``os.environ`` (e.g. S3
    credentials and ``AWS_ENDPOINT_URL``, as an instance profile and a cluster config would provide).
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        token: str | None = None,
        root: str | os.PathLike | None = None,
        namespaces: bool = True,
    ) -> None:
        # Where mount namespaces are not allowed (an unprivileged container), or with namespaces=False,
        # each node still gets its own temp, Ray and home folders, through TMPDIR, HOME and Ray's
        # temp_dir instead of bind mounts: everything Ray and comet-ray write goes there; only a
        # hard-coded path would escape.
        self.unshare = unshare_command() if namespaces else None
        self.isolation = "mount namespaces" if self.unshare else "per-node TMPDIR, HOME and Ray temp dir"
        # Short: Ray puts Unix sockets under <root>/ray/session_.../sockets (107 characters at most).
        parent = tempfile.gettempdir() if len(tempfile.gettempdir()) <= 20 else "/tmp"
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="crm", dir=parent))
        self.token = token or secrets.token_hex(32)
        self.python = cluster_python(self.root / "py")
        # The folders each worker node gets privately; Ray's temp folder is <tmp>/ray, as /tmp/ray on a machine.
        self.shared = {name: self.root / name for name in ("tmp", "home")}
        for folder in self.shared.values():
            folder.mkdir(exist_ok=True)
        self.ray_temp = self.shared["tmp"] / "ray"
        self.env = {
            **_clean_env(os.environ),
            **LOCAL_ENV,
            **FAST_FAILURE_DETECTION,
            **(env or {}),
            "PATH": f"{self.python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(self.shared["home"]),
            "TMPDIR": str(self.shared["tmp"]),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PYTHONNOUSERSITE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.head: subprocess.Popen | None = None
        self.nodes: dict[str, ClusterNode] = {}
        self.retired: list[ClusterNode] = []
        self._leaders: set[int] = set()
        self._logs: list = []
        self.gcs_port = self.dashboard_port = 0

    # ----------------------------------------------------------------- addresses
    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """What a user's terminal needs to reach the job API (the port-forward's address and the token)."""
        return {"RAY_ADDRESS": self.dashboard_url, "RAY_AUTH_TOKEN": self.token}

    # ----------------------------------------------------------------- starting
    def _spawn(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        handle = open(log, "ab")  # noqa: SIM115 - kept open for the process's life, closed in close()
        self._logs.append(handle)
        process = subprocess.Popen(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**self.env, **(env or {})},
            cwd=self.root,
            start_new_session=True,
        )
        self._leaders.add(process.pid)
        return process

    def start_head(self) -> LocalCluster:
        (
            self.gcs_port,
            self.dashboard_port,
            client,
            manager,
            objects,
            agent,
            agent_grpc,
            env_agent,
            metrics,
        ) = free_ports(9)
        low = free_port_range()
        command = [
            str(self.python),
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=0",
            "--num-gpus=0",
            f"--temp-dir={self.ray_temp}",
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={manager}",
            f"--object-manager-port={objects}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + 99}",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
        ]
        # Every process of the cluster knows its GCS, as KubeRay's pods do: Ray tools run on a node (the
        # state API Ray Train's placement-group cleaner calls) never scan the machine for other Rays.
        self.env["RAY_ADDRESS"] = self.gcs_address
        self.head = self._spawn(command, self.root / "head.log")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.head.poll() is not None:
                raise RuntimeError(
                    f"the head exited ({self.head.returncode}): {self._tail(self.root / 'head.log')}"
                )
            try:
                self.api("/api/jobs/")
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(1.0)
        raise RuntimeError(
            f"the head's job API did not answer in {START_TIMEOUT_S:.0f}s: "
            f"{self._tail(self.root / 'head.log')}"
        )

    def add_node(
        self,
        name: str,
        num_cpus: float = 1,
        num_gpus: float = 0,
        resources: dict | None = None,
        wait: bool = True,
    ) -> ClusterNode:
        """Start worker node ``name`` on an empty private disk (a fresh one if ``name`` ran before)."""
        if name in self.nodes and self.nodes[name].alive:
            raise RuntimeError(f"node {name} is running")
        disk = self.root / "n" / str(len(self.retired) + len(self.nodes))  # short: Unix socket paths
        binds = []
        for key, target in self.shared.items():
            private = disk / key
            private.mkdir(parents=True)
            binds += [str(private), str(target)]
        low = free_port_range()
        agent, env_agent, metrics = free_ports(3)
        # Every worker node offers the job drivers' resource, as the worker node types of clusters/ do
        # (comet-ray submit's default placement; the head offers none).
        resources = {DRIVER_RESOURCE: 1, **(resources or {})}
        spec = {
            "gcs_address": self.gcs_address,
            "name": name,
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "resources": resources,
            "object_store_memory": 100_000_000,
            "min_worker_port": low,
            "max_worker_port": low + 99,
            "dashboard_agent_listen_port": agent,
            "runtime_env_agent_port": env_agent,
            "metrics_export_port": metrics,
        }
        node_env = None
        if self.unshare:
            command = [
                *self.unshare,
                "sh",
                "-c",
                _MOUNT_SCRIPT,
                "sh",
                *binds,
                "--",
                str(self.python),
                str(NODE_SCRIPT),
                json.dumps(spec),
            ]
        else:
            spec["temp_dir"] = str(disk / "tmp" / "ray")
            node_env = {"TMPDIR": str(disk / "tmp"), "HOME": str(disk / "home")}
            command = [str(self.python), str(NODE_SCRIPT), json.dumps(spec)]
        log = disk.parent / f"{disk.name}.log"
        node = ClusterNode(
            name,
            self._spawn(command, log, node_env),
            disk,
            log,
            resources={"CPU": num_cpus, "GPU": num_gpus, **resources},
        )
        self.nodes[name] = node
        if wait:
            self.wait_for_node(node)
        return node

    def wait_for_node(self, node: ClusterNode, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.alive:
                raise RuntimeError(
                    f"node {node.name} exited ({node.process.returncode}): {self._tail(node.log)}"
                )
            for line in node.log.read_text(errors="replace").splitlines():
                if line.startswith('{"node_id"'):
                    node.node_id = json.loads(line)["node_id"]
            if node.node_id and node.node_id in self.alive_node_ids():
                return
            time.sleep(0.5)
        raise RuntimeError(f"node {node.name} did not join in {timeout:.0f}s: {self._tail(node.log)}")

    # ----------------------------------------------------------------- looking at it
    def api(self, path: str, timeout: float = 10.0):
        """GET ``path`` on the dashboard with the token; the decoded JSON."""
        request = urllib.request.Request(
            self.dashboard_url + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def alive_node_ids(self) -> set[str]:
        """Ids of the nodes the GCS counts as alive (the dashboard's node table)."""
        try:
            reply = self.api("/nodes?view=summary")
        except (urllib.error.URLError, OSError, ValueError):
            return set()
        return {
            n["raylet"]["nodeId"] for n in reply["data"]["summary"] if n["raylet"].get("state") == "ALIVE"
        }

    def node_pids(self, node: ClusterNode) -> dict[int, str]:
        """Every live process of worker node ``node`` (pid -> start time)."""
        return session_processes({node.process.pid})

    def processes_named(self, node: ClusterNode, text: str) -> list[int]:
        """PIDs of ``node``'s processes whose command line (Ray sets ``ray::<Actor>...`` titles) contains ``text``."""
        table = _proc_table()
        return sorted(pid for pid in self.node_pids(node) if pid in table and text in table[pid][3])

    def run_driver(self, code: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run ``code`` with the cluster's Python on the head, outside any job, as a driver of this cluster."""
        return subprocess.run(
            [str(self.python), "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=self.shared["tmp"],
            check=False,
        )

    # ----------------------------------------------------------------- stopping
    def stop_node(self, name: str) -> ClusterNode:
        """Take worker node ``name`` away as a reclaimed spot instance goes: SIGKILL to all its processes."""
        node = self.nodes.pop(name)
        leftover = stop_processes({node.process.pid}, grace_s=0.0)
        node.process.wait(timeout=10)
        self._leaders.discard(node.process.pid)
        self.retired.append(node)
        if leftover:
            raise RuntimeError(f"processes of node {name} survived SIGKILL: {leftover}")
        return node

    def close(self) -> None:
        """Stop every process this cluster started (by PID), remove its folders; fail if any survived."""
        survivors = stop_processes(set(self._leaders), grace_s=5.0)
        for handle in self._logs:
            handle.close()
        for process in [self.head, *(n.process for n in [*self.nodes.values(), *self.retired])]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        if not survivors:
            shutil.rmtree(self.root, ignore_errors=True)
        if survivors:
            raise RuntimeError(
                f"processes of the test cluster survived SIGKILL: {survivors} (logs in {self.root})"
            )

    def logs(self, chars: int = 4000) -> str:
        """The tail of the head's and every node's launcher log, for failure messages."""
        parts = [f"--- head\n{self._tail(self.root / 'head.log', chars)}"]
        parts += [f"--- {n.name}\n{self._tail(n.log, chars)}" for n in [*self.retired, *self.nodes.values()]]
        return "\n".join(parts)

    @staticmethod
    def _tail(path: Path, chars: int = 2000) -> str:
        try:
            return path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def free_port_range(width: int = 100) -> int:
    """The first of ``width`` consecutive ports that are free now (a node's worker ports)."""
    rng = secrets.SystemRandom()
    for _ in range(100):
        low = rng.randrange(20000, 30000 - width)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", low))
            except OSError:
                continue
        if all(_free(port) for port in range(low + 1, low + width, 9)):
            return low
    raise RuntimeError("no free range of worker ports")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
