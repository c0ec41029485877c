"""One Ray worker node, started the way ``ray.cluster_utils.Cluster.add_node`` starts one.

Run by path (``python ray_node.py SPEC_JSON``) with the test cluster's Python, which has Ray but not
comet-ray: this file imports nothing from the package. :class:`support.cluster.LocalCluster`
starts it inside the node's own mount namespace (``unshare -m``), after bind mounts have given the
node private temp, Ray and home folders, so it behaves like a separate machine that shares only the
network (127.0.0.1) with the head.

``ray start --address`` is not used: with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (kept so that Ray
never rewrites 127.0.0.1 to the machine's external address) it refuses to add a node. A
``ray._private.node.Node`` with ``head=False`` is what ``ray start`` builds underneath, minus that
check. The process prints one JSON line (the node id) once the raylet is up, then blocks; SIGTERM
stops the node's processes (raylet first, as ``ray stop`` does) and exits.
"""

import json
import signal
import sys
import threading


def main() -> int:
    spec = json.loads(sys.argv[1])
    import ray._private.node
    import ray._private.parameter
    import ray._private.utils

    params = ray._private.parameter.RayParams(
        gcs_address=spec["gcs_address"],
        node_ip_address="127.0.0.1",
        node_name=spec["name"],
        num_cpus=spec["num_cpus"],
        num_gpus=spec.get("num_gpus", 0),
        resources=spec.get("resources") or {},
        labels=spec.get("labels") or {},
        object_store_memory=spec["object_store_memory"],
        min_worker_port=spec["min_worker_port"],
        max_worker_port=spec["max_worker_port"],
        node_manager_port=0,
        dashboard_agent_listen_port=spec["dashboard_agent_listen_port"],
        runtime_env_agent_port=spec.get("runtime_env_agent_port"),
        metrics_export_port=spec.get("metrics_export_port"),
        include_log_monitor=True,  # this node's own session folder: its workers' output reaches drivers
        temp_dir=spec.get(
            "temp_dir"
        ),  # None: the head's path, which the node's mount namespace makes private
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    # As ``ray start`` does: the node's own temp folder names the cluster, so Ray tools (and the state
    # API Ray Train's placement-group cleaner calls) run on this node find it without RAY_ADDRESS.
    ray._private.utils.write_ray_address(spec["gcs_address"], node.get_temp_dir_path())
    print(json.dumps({"node_id": node.node_id, "session_dir": node.get_session_dir_path()}), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        if any(kind == "raylet" for kind, _ in node.dead_processes()):
            print("the raylet exited", file=sys.stderr, flush=True)
            break
    node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
