"""Where a submitted job's driver (the command's own process) runs: on a worker node, never the head.

The head of every cluster in ``clusters/`` runs Ray's control plane and, on AWS, the autoscaler with
its EC2 launch and ``iam:PassRole`` rights; job code there would hold those rights. Ray's job manager
places a driver that asks for nothing on the head, so ``comet-ray submit`` asks by default for a
small share of :data:`DRIVER_RESOURCE`, a custom resource that only worker node types declare
(``clusters/aws-gpu.yaml``: the on-demand CPU nodes; KubeRay: the CPU worker group's
``rayStartParams``; the multi-node test tier: every worker node), ``DRIVER_SLOTS_PER_NODE`` of them.
A driver that reserves CPUs or GPUs of its own (``--entrypoint-num-cpus`` / ``--entrypoint-num-gpus``)
already lands on a worker (the heads offer none) and asks for no share. ``--entrypoint-resources JSON``
replaces the default; ``'{}'`` lets Ray place the driver anywhere, the head included.
"""

from __future__ import annotations

import json

from comet_ray.errors import CometError

DRIVER_RESOURCE = "job-driver"
DRIVER_SLOTS_PER_NODE = 16
# What one driver asks for; a node type declares {"job-driver": 1} and holds DRIVER_SLOTS_PER_NODE drivers.
DRIVER_SHARE = 1 / DRIVER_SLOTS_PER_NODE
DRIVER_HELP = (
    f"custom resources the command's process (the driver) needs; default "
    f"'{{\"{DRIVER_RESOURCE}\": {DRIVER_SHARE}}}' (unless it reserves CPUs or GPUs): "
    f'"{DRIVER_RESOURCE}" is offered by the worker node types of clusters/ (1 per node, '
    f"{DRIVER_SLOTS_PER_NODE} drivers each), never by the head, so no job code runs beside the "
    "autoscaler's rights; a cluster of your own needs nodes started with --resources "
    f"'{{\"{DRIVER_RESOURCE}\": 1}}' or the job stays PENDING; '{{}}' lets Ray place it anywhere, "
    "the head included"
)


def parse_entrypoint_resources(text: str) -> dict[str, float]:
    """``--entrypoint-resources '{"job-driver": 1}'``: a JSON object of positive numbers (``{}``: none)."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value.values()
    ):
        raise CometError(f"--entrypoint-resources expects a JSON object of positive numbers, got {text!r}")
    return {str(k): float(v) for k, v in value.items()}


def driver_resources(text: str | None, num_cpus: float = 0.0, num_gpus: float = 0.0) -> dict[str, float]:
    """The ``entrypoint_resources`` of a submitted job: ``text`` when given, else a share of the driver
    resource unless the driver reserves CPUs or GPUs (which the heads of ``clusters/`` do not offer)."""
    if text is not None:
        return parse_entrypoint_resources(text)
    if num_cpus or num_gpus:
        return {}
    return {DRIVER_RESOURCE: DRIVER_SHARE}


def placement_line(resources: dict[str, float]) -> str:
    """One line for the user on where the driver may run."""
    if resources.get(DRIVER_RESOURCE):
        return (
            f"driver: on a worker node offering {DRIVER_RESOURCE!r} (asks {resources[DRIVER_RESOURCE]:g}); "
            "a cluster without one keeps the job PENDING (--entrypoint-resources '{}': any node)"
        )
    if resources:
        return f"driver: on a node offering {json.dumps(resources)}"
    return "driver: wherever Ray places it (a node with the CPUs or GPUs it reserves; reserving none, the head too)"
