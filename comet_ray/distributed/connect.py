"""Joining Ray for a command that starts Ray Train or Ray Tune work: the cluster, or a private local Ray.

Inside a job (``comet-ray submit``) or with ``--address`` the command joins that cluster. Otherwise it
starts a local Ray **with the dashboard** (on 127.0.0.1, a free port), because Ray Train relies on
the dashboard's state API: every run starts a detached ``PlacementGroupCleaner`` that asks the state
API once a second whether the run's controller is alive, so it can release the run's placement group
if the controller dies. Without the dashboard each of those questions failed with a warning ("State
API may be temporarily unavailable", 308 lines in a 2-epoch run) and the cleaner could not do its
job (Tune trials stopped early kept their workers' CPUs reserved). The state API's address is given
to every worker of the job (``RAY_API_SERVER_ADDRESS``), so Ray's workers do not have to guess which
of the machine's Ray instances is theirs.
"""

from __future__ import annotations

import os
import socket


def init_ray(address: str | None = None, log_to_driver: bool = True) -> None:
    """``ray.init`` for a command: join ``address`` / ``RAY_ADDRESS``, or start a local Ray with the dashboard."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target:
        ray.init(address=target, log_to_driver=log_to_driver)
        return
    with socket.socket() as probe:  # a free port for the dashboard (8265 may be another Ray's)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = f"http://127.0.0.1:{port}"
    # every server (GCS, raylet, object manager, dashboard, agents) on loopback, whatever the machine's address
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        log_to_driver=log_to_driver,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api}},
    )
