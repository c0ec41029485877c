"""The cluster definitions in clusters/ and the job entry points in jobs/ are valid and safe.

Ray cluster-launcher YAMLs are checked the way ``ray up`` checks them: ``prepare_config`` merges the
provider's defaults (for AWS that reads Ray's bundled defaults.yaml, no AWS call), then
``validate_config`` validates the result against ``ray/autoscaler/ray-schema.json`` with jsonschema
and checks the node types. KubeRay manifests have no schema here (the CRDs live in the cluster), so
the fields this project relies on are checked one by one.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import runpy
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from comet_ray.distributed.placement import DRIVER_RESOURCE, DRIVER_SHARE, DRIVER_SLOTS_PER_NODE

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
JOBS = ROOT / "jobs"
KUBERAY = CLUSTERS / "kuberay"
RAY_VERSION = ray.__version__


def path_text(name: str) -> str:
    return (CLUSTERS / name).read_text()


def _all_files() -> list[Path]:
    return sorted(
        p
        for base in (CLUSTERS, JOBS)
        for p in base.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def _launcher_configs() -> list[Path]:
    found = []
    for path in sorted(CLUSTERS.rglob("*.yaml")):
        if KUBERAY in path.parents:
            continue
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "provider" in data:
            found.append(path)
    return found


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [
        (path, doc)
        for path in sorted(KUBERAY.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for path, doc in _kuberay_docs():
        if doc["kind"] == "RayCluster":
            specs.append((path.name, doc["spec"]))
        elif doc["kind"] == "RayJob":
            specs.append((path.name, doc["spec"]["rayClusterSpec"]))
    return specs


def _ray_start_resources(group: dict) -> dict:
    """A group's ``rayStartParams.resources``: JSON that KubeRay passes through a shell, hence quoted."""
    text = group["rayStartParams"].get("resources")
    if text is None:
        return {}
    assert text.startswith('"') and text.endswith('"'), text
    return json.loads(text[1:-1].replace('\\"', '"'))


def _network_policies(name: str) -> list[dict]:
    return [doc for path, doc in _kuberay_docs() if path.name == name and doc["kind"] == "NetworkPolicy"]


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _project_dependencies() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [d for d in project["dependencies"] if not re.match(r"ray\b", d)]


# --------------------------------------------------------------------------- Ray cluster launcher
def test_there_is_a_launcher_config() -> None:
    assert [p.name for p in _launcher_configs()] == ["aws-gpu.yaml"]


@pytest.mark.parametrize("path", _launcher_configs(), ids=lambda p: p.name)
def test_launcher_config_validates_like_ray_up(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # jsonschema against ray-schema.json + node-type checks; raises on error
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_aws_cluster_shape() -> None:
    config = yaml.safe_load((CLUSTERS / "aws-gpu.yaml").read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"]  # no training on the head

    gpu_types = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU")}
    assert gpu_types, "a GPU worker group"
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1, name
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert re.match(r"g[56]\.", node_type["node_config"]["InstanceType"]), name
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Name"] for name, t in types.items()}
    assert profiles.pop(config["head_node_type"]) == "comet-ray-head"  # the autoscaler's EC2 rights
    assert set(profiles.values()) == {"comet-ray-worker"}  # job code: S3 only
    # The job drivers' node types: on demand (a spot reclaim never takes a driver), never the head.
    drivers = [name for name, t in types.items() if t.get("resources", {}).get(DRIVER_RESOURCE)]
    assert drivers == ["cpu-ondemand"] and config["head_node_type"] not in drivers
    assert all("InstanceMarketOptions" not in types[n]["node_config"] for n in drivers)
    # each such node holds DRIVER_SLOTS_PER_NODE of the drivers `comet-ray submit` starts
    assert all(
        round(types[n]["resources"][DRIVER_RESOURCE] / DRIVER_SHARE) == DRIVER_SLOTS_PER_NODE for n in drivers
    )
    assert "--entrypoint-resources" not in path_text(
        "aws-gpu.yaml"
    )  # the default already keeps drivers off the head

    docker = config["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            assert docker[key].startswith(f"rayproject/ray:{RAY_VERSION}-py311"), docker[key]
    assert docker["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("comet_ray-" in c and ".whl" in c for c in config["setup_commands"])

    start = " ".join(config["head_start_ray_commands"])
    assert re.findall(r"--dashboard-host=(\S+)", start) == ["127.0.0.1"]
    assert "dashboard-host" not in " ".join(config["worker_start_ray_commands"])
    # No inbound rule of our own: the launcher's group opens only SSH and traffic between its members,
    # and no node type brings a security group of its own (which could open the dashboard's port).
    assert set(config["provider"]["security_group"]) == {"GroupName"}
    assert not [n for n, t in types.items() if "SecurityGroupIds" in t["node_config"]]


# --------------------------------------------------------------------------- KubeRay
def test_kuberay_manifests_parse_and_name_ray_io_v1() -> None:
    kinds = {}
    for path, doc in _kuberay_docs():
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc) or doc["kind"] == "ServiceAccount", path
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", path
        kinds.setdefault(doc["kind"], []).append(path.name)
    assert kinds["RayCluster"] == ["raycluster.yaml"]
    assert sorted(kinds["RayJob"]) == ["rayjob-sweep.yaml", "rayjob-train.yaml"]


@pytest.mark.parametrize("name,spec", _cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_cluster_spec(name: str, spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION, name
    assert spec["enableInTreeAutoscaling"] is True, name
    assert spec["authOptions"]["mode"] == "token", name
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", name
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
    # KubeRay binds the dashboard to every address unless told otherwise: the long-lived cluster, reached
    # only through `kubectl port-forward`, says 127.0.0.1; a RayJob's head must answer the operator and
    # its submitter pod over the head service, so it keeps the pod network behind its NetworkPolicy.
    host = head["rayStartParams"].get("dashboard-host")
    if name == "raycluster.yaml":
        assert host == "127.0.0.1", name
    else:
        assert host is None and _network_policies(name), name
    assert not [g for g in spec["workerGroupSpecs"] if "dashboard-host" in g["rayStartParams"]], name
    # the job drivers' pods: the CPU group, never the head nor the (spot) GPU pods
    offers = {
        g["groupName"]: _ray_start_resources(g).get(DRIVER_RESOURCE, 0) for g in spec["workerGroupSpecs"]
    }
    assert offers == {"gpu": 0, "cpu": 1} and DRIVER_RESOURCE not in _ray_start_resources(head), (
        name,
        offers,
    )
    assert spec["workerGroupSpecs"][1]["maxReplicas"] >= 1
    for container in _containers(spec):
        image = container["image"]
        assert image.startswith("rayproject/ray:") and RAY_VERSION in image and "py311" in image, (
            name,
            image,
        )
    assert head["template"]["spec"]["containers"][0]["image"] == f"rayproject/ray:{RAY_VERSION}-py311"

    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, name
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, (name, group["groupName"])
        pod = group["template"]["spec"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), (name, group["groupName"])
        for container in pod["containers"]:
            assert container["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
            assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_kuberay_rayjob(path: Path) -> None:
    (job,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc["kind"] == "RayJob"]
    spec = job["spec"]
    # the driver on a worker pod: a GPU pod (train) or a share of the CPU group's job-driver (sweep)
    driver = json.loads(spec.get("entrypointResources", "{}"))
    assert spec.get("entrypointNumGpus", 0) >= 1 or driver == {DRIVER_RESOURCE: DRIVER_SHARE}, path.name
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0
    script = "jobs/train.py" if "train" in path.name else "jobs/sweep.py"
    assert spec["entrypoint"].startswith(f"python {script} ")
    assert (ROOT / script).is_file()
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"].startswith("s3://") and env["working_dir"].endswith(".zip")
    # the explicit pip list is the project's own dependency list (minus Ray, which the image has)
    assert env["pip"]["packages"] == _project_dependencies()
    assert "$" not in spec["runtimeEnvYAML"]  # KubeRay's submitter shell would expand it
    out = spec["entrypoint"].split("--out", 1)[1].split()[0]
    if "sweep" in path.name:  # the trials run on other pods than the driver: results and storage in S3
        assert out.startswith("s3://YOUR_BUCKET/")
    else:  # one process on one GPU pod, whose disk goes with the cluster: copied to S3 afterwards
        assert env["env_vars"]["COMET_RAY_RESULTS_URI"].startswith("s3://")


KUBERAY_CLUSTERS = {
    "raycluster.yaml": "comet-ray",
    "rayjob-train.yaml": "comet-ray-train-bottle",
    "rayjob-sweep.yaml": "comet-ray-sweep-bottle",
}
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}  # the label of the KubeRay Helm chart's pods


@pytest.mark.parametrize("name,cluster", sorted(KUBERAY_CLUSTERS.items()))
def test_kuberay_network_policy_admits_only_the_clusters_pods_and_the_operator(
    name: str, cluster: str
) -> None:
    (spec,) = [s for n, s in _cluster_specs() if n == name]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    own = {"comet-ray/cluster": cluster}
    assert all(g["template"]["metadata"]["labels"].items() >= own.items() for g in groups), name  # every pod
    (policy,) = _network_policies(name)
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    rules = policy["spec"]
    assert rules["podSelector"] == {
        "matchLabels": {**own, "ray.io/node-type": "head"}
    }  # KubeRay labels the head
    assert rules["policyTypes"] == ["Ingress"]
    allowed = {"own": {"matchLabels": own}, "operator": {"matchLabels": OPERATOR}}
    if name.startswith("rayjob"):  # the submitter: the Kubernetes Job KubeRay names after the RayJob
        (job,) = [d for p, d in _kuberay_docs() if p.name == name and d["kind"] == "RayJob"]
        allowed["submitter"] = {"matchLabels": {"batch.kubernetes.io/job-name": job["metadata"]["name"]}}
    seen = {}
    for rule in rules["ingress"]:
        assert rule.get("from"), f"{name}: a rule without 'from' admits every pod and address"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, (
                peer
            )  # no ipBlock, no namespaceSelector: this namespace's pods
            (who,) = [k for k, selector in allowed.items() if peer["podSelector"] == selector]
            seen[who] = rule.get("ports")
    assert set(seen) == set(allowed), (name, seen)
    assert seen["own"] is None  # the cluster's pods: every Ray port (GCS, raylet, object manager, ...)
    assert all(
        seen[k] == [{"protocol": "TCP", "port": 8265}] for k in allowed if k != "own"
    )  # the job API only


# --------------------------------------------------------------------------- jobs/
def test_runtime_env_file_is_a_valid_ray_runtime_env() -> None:
    from ray.runtime_env import RuntimeEnv

    text = (JOBS / "runtime_env.yaml").read_text()
    env = yaml.safe_load(text)
    runtime_env = RuntimeEnv(**env)  # Ray's own validation of every field
    assert env["working_dir"] == "."
    # anchored at the project root: an unanchored "data/" would also drop the package's comet_ray/data/
    assert {"/.venv/", "/.git/", "/runs/", "/data/"} <= set(env["excludes"])
    assert not [
        p
        for p in env["excludes"]
        if p.rstrip("/").split("/")[-1] in ("data", "runs", "out") and not p.startswith("/")
    ]
    # The pip list is what Ray hashes to name (and reuse) a node's virtualenv: the project's dependencies
    # themselves, so a dependency change builds a new env; never a path or variable that hides them.
    assert env["pip"]["packages"] == _project_dependencies()
    assert "${" not in "".join(env["pip"]["packages"])
    # torch with CUDA takes longer to install than Ray's default 600 s limit on a small node
    assert runtime_env.get("config")["setup_timeout_seconds"] >= 1200


@pytest.mark.parametrize("script,command", [("train.py", "train"), ("sweep.py", "tune")])
def test_job_entry_points_pass_everything_to_the_cli(script: str, command: str, monkeypatch) -> None:
    import comet_ray.cli

    seen = []
    monkeypatch.setattr(comet_ray.cli, "run_command", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", [script, "s3://b/data", "--category", "bottle", "--out", "o"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(JOBS / script), run_name="__main__")
    assert stop.value.code == 0
    assert seen == [[command, "s3://b/data", "--category", "bottle", "--out", "o"]]


# --------------------------------------------------------------------------- safety, every file
def test_no_public_dashboard_no_ml_image_no_keys() -> None:
    files = _all_files()
    assert len(files) >= 8
    key_patterns = [
        re.compile(p, re.IGNORECASE)
        for p in (
            r"\bAKIA[0-9A-Z]{16}\b",
            r"\bASIA[0-9A-Z]{16}\b",
            r"aws_secret_access_key",
            r"aws_access_key_id",
            r"aws_session_token",
        )
    ]
    bound = []
    for path in files:
        text = path.read_text(errors="replace")
        assert "0.0.0.0" not in text, f"{path}: nothing may bind or open to every address"
        hosts = re.findall(r"dashboard[-_]host\s*[=:]\s*['\"]?([^\s'\"]*)", text)
        assert set(hosts) <= {"127.0.0.1"}, (path, hosts)
        if hosts:
            bound.append(path.name)
        assert "ray-ml" not in text, f"{path}: use rayproject/ray, not the ML image"
        for image in re.findall(r"rayproject/ray[\w.-]*:[\w.-]+", text):
            assert RAY_VERSION in image, f"{path}: {image} is not Ray {RAY_VERSION}"
        for pattern in key_patterns:
            assert not pattern.search(text), f"{path}: looks like AWS credentials ({pattern.pattern})"
    # the heads whose dashboard a user reaches by a tunnel say so (the RayJobs' heads: their NetworkPolicy)
    assert {"aws-gpu.yaml", "raycluster.yaml"} <= set(bound), bound


# --------------------------------------------------------------------------- IAM, image, versions
IAM = CLUSTERS / "iam"


def _statements(name: str) -> list[dict]:
    import json

    policy = json.loads((IAM / name).read_text())
    assert policy["Version"] == "2012-10-17"
    return policy["Statement"]


def _actions(statement: dict) -> list[str]:
    actions = statement["Action"]
    return [actions] if isinstance(actions, str) else list(actions)


def _resources(statement: dict) -> list[str]:
    resources = statement["Resource"]
    return [resources] if isinstance(resources, str) else list(resources)


def test_head_policy_is_the_autoscalers_calls_and_nothing_else() -> None:
    statements = _statements("head-policy.json")
    assert all(s["Effect"] == "Allow" for s in statements)
    actions = {a for s in statements for a in _actions(s)}
    assert {
        "ec2:RunInstances",
        "ec2:TerminateInstances",
        "ec2:CreateTags",
        "ec2:DescribeInstances",
        "iam:PassRole",
        "ssm:GetParameters",
    } <= actions
    assert not [a for a in actions if a.endswith("*") or a.startswith("s3:")]  # no wildcards, no data
    config = yaml.safe_load((CLUSTERS / "aws-gpu.yaml").read_text())
    types = config["available_node_types"]
    cluster = {"aws:RequestTag/ray-cluster-name": config["cluster_name"]}
    account = "arn:aws:ec2:us-west-2:YOUR_ACCOUNT_ID"

    # RunInstances: the instance only with the cluster's tag, a worker type of aws-gpu.yaml (the head is
    # launched by `ray up` with your identity, not by the autoscaler) and the worker profile; the image
    # only Amazon's; the network, disk and spot resources it launches into, of this account.
    launches = {r: s for s in statements if _actions(s) == ["ec2:RunInstances"] for r in _resources(s)}
    worker_types = sorted(
        {t["node_config"]["InstanceType"] for n, t in types.items() if n != config["head_node_type"]}
    )
    assert launches[f"{account}:instance/*"]["Condition"] == {
        "StringEquals": {
            **cluster,
            "ec2:InstanceType": worker_types,
            "ec2:InstanceProfile": "arn:aws:iam::YOUR_ACCOUNT_ID:instance-profile/comet-ray-worker",
        }
    }
    profiles = {
        t["node_config"]["IamInstanceProfile"]["Name"]
        for n, t in types.items()
        if n != config["head_node_type"]
    }
    assert profiles == {"comet-ray-worker"}
    assert launches["arn:aws:ec2:us-west-2::image/*"]["Condition"] == {
        "StringEquals": {"ec2:Owner": "amazon"}
    }
    images = {t["node_config"]["ImageId"] for t in types.values()}
    assert all(i.startswith("resolve:ssm:/aws/service/deeplearning/") for i in images), (
        images
    )  # Amazon's DLAMI
    unconditioned = {r for r, s in launches.items() if "Condition" not in s}
    assert unconditioned == {
        f"{account}:{kind}/*"
        for kind in (
            "subnet",
            "security-group",
            "network-interface",
            "volume",
            "key-pair",
            "spot-instances-request",
        )
    }
    assert not [
        a for s in statements for a in _actions(s) if a == "ec2:RunInstances" and "*" in _resources(s)
    ]

    by_action = {a: s for s in statements for a in _actions(s)}
    assert by_action["iam:PassRole"]["Resource"] == "arn:aws:iam::YOUR_ACCOUNT_ID:role/comet-ray-worker"
    assert by_action["iam:PassRole"]["Condition"] == {
        "StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}
    }
    assert by_action["ssm:GetParameters"]["Resource"].startswith(
        "arn:aws:ssm:us-west-2::parameter/aws/service/"
    )
    for statement in statements:  # ending, stopping and re-tagging only this cluster's tagged nodes
        if {"ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"} & set(_actions(statement)):
            assert statement["Condition"] == {
                "StringEquals": {"aws:ResourceTag/ray-cluster-name": config["cluster_name"]}
            }
        if "ec2:CreateTags" in _actions(statement):
            assert statement.get("Condition"), statement["Sid"]
    assert {s["Sid"] for s in statements if s["Resource"] == "*"} == {"RayAutoscalerReads"}
    assert set(_actions(by_action["ec2:DescribeInstances"])) == {
        "ec2:DescribeInstances",
        "ec2:DescribeInstanceTypes",
        "ec2:DescribeImages",
    }


def _s3_outputs() -> set[str]:
    """Every S3 location the cluster files and the README's cluster sections write to, as bucket keys."""
    texts = [p.read_text() for p in _all_files()] + [(ROOT / "README.md").read_text()]
    found = set()
    for text in texts:
        found |= set(re.findall(r'--out\s+"?s3://(?:\$BUCKET|YOUR_BUCKET|BUCKET)/([^\s"]+)', text))
        found |= set(re.findall(r'COMET_RAY_RESULTS_URI:\s*"s3://YOUR_BUCKET/([^\s"]+)"', text))
    return found


def test_workers_write_run_outputs_caches_and_state_only_never_the_code() -> None:
    statements = _statements("s3-bucket-policy.json")
    assert all(s["Effect"] == "Allow" and "Condition" not in s for s in statements)
    resources = {r for s in statements for r in _resources(s)}
    assert {r.split("/")[0] for r in resources} == {"arn:aws:s3:::YOUR_BUCKET"}  # one bucket
    assert all(a.startswith("s3:") and "*" not in a for s in statements for a in _actions(s))
    writes = {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}

    def granted(action: str, key: str) -> bool:
        arn = f"arn:aws:s3:::YOUR_BUCKET/{key}"
        return any(
            action in _actions(s) and any(fnmatch.fnmatchcase(arn, r) for r in _resources(s))
            for s in statements
        )

    assert all(
        a in {"s3:ListBucket", "s3:GetBucketLocation", "s3:GetObject"} | writes
        for s in statements
        for a in _actions(s)
    )
    write_prefixes = {
        r.removeprefix("arn:aws:s3:::YOUR_BUCKET/")
        for s in statements
        if writes & set(_actions(s))
        for r in _resources(s)
    }
    assert write_prefixes == {"runs/*", "sweeps/*", "cache/*"}
    assert all(set(_actions(s)) == writes for s in statements if writes & set(_actions(s)))

    # the code KubeRay's RayJobs run, and the data: read, never written
    code = {
        yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"].removeprefix("s3://YOUR_BUCKET/")
        for _, doc in _kuberay_docs()
        if doc["kind"] == "RayJob"
    }
    assert code == {"code/comet-ray.zip"}
    for key in [*code, "mvtec/bottle/train/good/000.png", "tuner.pkl", "other/x"]:
        assert granted("s3:GetObject", key) and not any(granted(a, key) for a in writes), key
    # every output the docs and manifests use is writable (outputs, Ray's state and the caches beneath them)
    outputs = _s3_outputs()
    assert {"runs/bottle", "sweeps/bottle", "runs"} <= outputs, outputs
    for out in outputs:
        for key in (
            f"{out}/metrics.json",
            f"{out}/.ray/experiment_state.json",
            f"{out}/.ray/feature_cache/x/index.json",
        ):
            assert all(granted(a, key) for a in writes), key

    everything = " ".join(p.read_text() for p in _all_files())
    assert "policy/AmazonEC2FullAccess" not in everything and "policy/AmazonS3FullAccess" not in everything


def test_the_image_recipe_bakes_in_the_dependencies_not_comet_ray() -> None:
    text = (CLUSTERS / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu" in text
    assert "pyproject.toml" in text and "pip install" in text
    assert "pip install ." not in text and "comet_ray-" not in text  # the code comes with each job


def test_kuberay_needs_1_6_for_auth_secrets() -> None:
    readme = (KUBERAY / "README.md").read_text()
    assert "1.6.0 or newer" in readme and "1.5.1 or newer" not in readme
    assert all("secretName" in spec["authOptions"] for _, spec in _cluster_specs())
