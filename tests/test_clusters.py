"""The cluster definitions in clusters/ and the job entry points in jobs/ are valid and safe.

Ray cluster-launcher YAMLs are checked the way ``ray up`` checks them: ``prepare_config`` merges the
provider's defaults (for AWS that reads Ray's bundled defaults.yaml, no AWS call), then
``validate_config`` validates the result against ``ray/autoscaler/ray-schema.json`` with jsonschema
and checks the node types. KubeRay manifests have no schema here (the CRDs live in the cluster), so
the fields this project relies on are checked one by one.
"""

from __future__ import annotations

import copy
import re
import runpy
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
JOBS = ROOT / "jobs"
KUBERAY = CLUSTERS / "kuberay"
RAY_VERSION = ray.__version__


def _all_files() -> list[Path]:
    return sorted(p for base in (CLUSTERS, JOBS) for p in base.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


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
    return [(path, doc) for path in sorted(KUBERAY.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for path, doc in _kuberay_docs():
        if doc["kind"] == "RayCluster":
            specs.append((path.name, doc["spec"]))
        elif doc["kind"] == "RayJob":
            specs.append((path.name, doc["spec"]["rayClusterSpec"]))
    return specs


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
    drivers = [name for name, t in types.items() if t.get("resources", {}).get("job-driver")]
    assert drivers and all("InstanceMarketOptions" not in types[n]["node_config"] for n in drivers)  # on demand

    docker = config["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            assert docker[key].startswith(f"rayproject/ray:{RAY_VERSION}-py311"), docker[key]
    assert docker["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("comet_ray-" in c and ".whl" in c for c in config["setup_commands"])

    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not (rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", 0)), "dashboard port opened"


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
    assert "dashboard-host" not in head["rayStartParams"] or head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    for container in _containers(spec):
        image = container["image"]
        assert image.startswith("rayproject/ray:") and RAY_VERSION in image and "py311" in image, (name, image)
    assert head["template"]["spec"]["containers"][0]["image"] == f"rayproject/ray:{RAY_VERSION}-py311"

    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
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
    (job,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    spec = job["spec"]
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


# --------------------------------------------------------------------------- jobs/
def test_runtime_env_file_is_a_valid_ray_runtime_env() -> None:
    from ray.runtime_env import RuntimeEnv

    text = (JOBS / "runtime_env.yaml").read_text()
    env = yaml.safe_load(text)
    runtime_env = RuntimeEnv(**env)  # Ray's own validation of every field
    assert env["working_dir"] == "."
    # anchored at the project root: an unanchored "data/" would also drop the package's comet_ray/data/
    assert {"/.venv/", "/.git/", "/runs/", "/data/"} <= set(env["excludes"])
    assert not [p for p in env["excludes"] if p.rstrip("/").split("/")[-1] in ("data", "runs", "out") and
                not p.startswith("/")]
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
    key_patterns = [re.compile(p, re.IGNORECASE) for p in (r"\bAKIA[0-9A-Z]{16}\b", r"\bASIA[0-9A-Z]{16}\b",
                                                  r"aws_secret_access_key", r"aws_access_key_id",
                                                  r"aws_session_token")]
    for path in files:
        text = path.read_text(errors="replace")
        assert "0.0.0.0" not in text, f"{path}: nothing may bind or open to every address"
        assert not re.search(r"dashboard[-_]host\s*[=:]\s*['\"]?(?!127\.0\.0\.1)", text), path
        assert "ray-ml" not in text, f"{path}: use rayproject/ray, not the ML image"
        for image in re.findall(r"rayproject/ray[\w.-]*:[\w.-]+", text):
            assert RAY_VERSION in image, f"{path}: {image} is not Ray {RAY_VERSION}"
        for pattern in key_patterns:
            assert not pattern.search(text), f"{path}: looks like AWS credentials ({pattern.pattern})"


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


def test_head_policy_is_the_autoscalers_calls_and_nothing_else() -> None:
    statements = _statements("head-policy.json")
    actions = {a for s in statements for a in _actions(s)}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances",
            "iam:PassRole", "ssm:GetParameters"} <= actions
    assert not [a for a in actions if a.endswith("*") or a.startswith("s3:")]  # no wildcards, no data
    by_action = {a: s for s in statements for a in _actions(s)}
    assert by_action["iam:PassRole"]["Resource"].endswith(":role/comet-ray-worker")
    assert by_action["ssm:GetParameters"]["Resource"].startswith("arn:aws:ssm:us-west-2::parameter/aws/service/")
    config = yaml.safe_load((CLUSTERS / "aws-gpu.yaml").read_text())
    image = config["available_node_types"][config["head_node_type"]]["node_config"]["ImageId"]
    assert image.startswith("resolve:ssm:/aws/service/deeplearning/")  # what ssm:GetParameters covers
    for statement in statements:  # launching and ending instances only for this cluster's tagged nodes
        if {"ec2:TerminateInstances", "ec2:StopInstances"} & set(_actions(statement)):
            assert statement["Condition"]["StringEquals"]["aws:ResourceTag/ray-cluster-name"] == config["cluster_name"]
        if statement["Resource"] == "arn:aws:ec2:us-west-2:YOUR_ACCOUNT_ID:instance/*" and \
                _actions(statement) == ["ec2:RunInstances"]:
            assert statement["Condition"]["StringEquals"]["aws:RequestTag/ray-cluster-name"] == config["cluster_name"]
    assert any(s.get("Resource") == "*" for s in statements if set(_actions(s)) <= {
        "ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:DescribeImages"})


def test_worker_policy_is_one_bucket() -> None:
    statements = _statements("s3-bucket-policy.json")
    resources = {r for s in statements for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}
    assert resources == {"arn:aws:s3:::YOUR_BUCKET", "arn:aws:s3:::YOUR_BUCKET/*"}
    assert all(a.startswith("s3:") and "*" not in a for s in statements for a in _actions(s))
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
