"""cluster/: the launcher configs pass Ray's own validator, the KubeRay manifests carry what
KubeRay requires, and the image installs the project the way README.md does."""

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_validator(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(name)
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does first: merge the provider's defaults
    validate_config(prepared)  # `ray up`'s check against ray/autoscaler/ray-schema.json (raises on any error)

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no training or reading on the head
    gpu = [spec for spec in types.values() if spec["resources"].get("GPU")]
    readers = [spec for spec in types.values() if "ingest" in spec["resources"]]
    assert len(gpu) == 1 and gpu[0]["resources"]["GPU"] == 8 and gpu[0]["min_workers"] == 0
    assert 8 * gpu[0]["max_workers"] == 64  # up to 64 GPUs
    assert len(readers) == 1 and readers[0]["min_workers"] == 0 and readers[0]["max_workers"] > 0
    reader = readers[0]["resources"]
    assert "GPU" not in reader and reader["ingest"] == reader["CPU"]  # one reader lane per CPU
    assert not gpu[0]["resources"].get("ingest")  # else the autoscaler could start GPU nodes for readers
    assert config["max_workers"] >= sum(spec.get("max_workers", 0) for spec in types.values())
    run_options = " ".join(config["docker"]["run_options"])
    scheme = {"aws": "s3://", "gcp": "gs://"}[config["provider"]["type"]]
    assert f"MOCO_STORAGE={scheme}" in run_options and "MLFLOW_TRACKING_URI=" in run_options


def test_ray_validator_rejects_what_the_schema_forbids():
    """The check above could fail: a node type with a misspelt key or a fractional resource is refused."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load("aws.yaml")
    config["available_node_types"]["cpu_readers"]["resources"]["ingest"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))
    config = _load("gcp.yaml")
    config["available_node_types"]["gpu_8x"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def _kuberay() -> tuple[dict, dict, dict[tuple[str, str], dict]]:
    cluster = _load("kuberay/raycluster.yaml")
    job = _load("kuberay/rayjob.yaml")
    documents = yaml.safe_load_all((CLUSTER / "kuberay/config.yaml").read_text())
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}
    return cluster, job, objects


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def _check_cluster_spec(spec: dict, objects: dict[tuple[str, str], dict]) -> None:
    """The fields KubeRay's RayCluster CRD (ray.io/v1) requires, and what this project needs."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"])
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    for group in [head, *groups]:
        assert isinstance(group["rayStartParams"], dict)  # required by KubeRay < 1.2
        assert all(isinstance(value, str) for value in group["rayStartParams"].values())  # strings only
        containers = _containers(group["template"])
        assert containers and all(container["name"] and container["image"] for container in containers)
        env = {item["name"]: item for item in containers[0].get("env", [])}  # the Ray container comes first
        tracking = env["MLFLOW_TRACKING_URI"]["valueFrom"]
        source = tracking.get("secretKeyRef") or tracking["configMapKeyRef"]
        kind = "Secret" if "secretKeyRef" in tracking else "ConfigMap"
        document = objects[(kind, source["name"])]
        assert source["key"] in document.get("stringData", document.get("data", {}))
        storage = env["MOCO_STORAGE"]["valueFrom"]["configMapKeyRef"]
        run_root = objects[("ConfigMap", storage["name"])]["data"][storage["key"]]
        assert run_root.startswith(("s3://", "gs://"))  # run directories on object storage
        account = group["template"]["spec"].get("serviceAccountName")
        assert account is None or ("ServiceAccount", account) in objects
    ports = {port["containerPort"] for port in _containers(head["template"])[0]["ports"]}
    assert {6379, 8265, 10001} <= ports
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert len({group["groupName"] for group in groups}) == len(groups)
    for group in groups:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    limits = {group["groupName"]: _containers(group["template"])[0]["resources"]["limits"] for group in groups}
    gpu_groups = [name for name, limit in limits.items() if limit.get("nvidia.com/gpu")]
    assert gpu_groups == ["gpu-trainers"] and limits["gpu-trainers"]["nvidia.com/gpu"] == "8"
    readers = next(group for group in groups if group["groupName"] == "cpu-readers")
    custom = json.loads(json.loads(readers["rayStartParams"]["resources"]))  # '"{\"ingest\": 60}"'
    assert custom == {"ingest": int(limits["cpu-readers"]["cpu"])}  # one reader lane per CPU
    assert "nvidia.com/gpu" not in limits["cpu-readers"]


def test_kuberay_raycluster_and_rayjob_carry_what_kuberay_requires():
    cluster, job, objects = _kuberay()
    for manifest, kind in ((cluster, "RayCluster"), (job, "RayJob")):
        assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind and manifest["metadata"]["name"]
    _check_cluster_spec(cluster["spec"], objects)
    _check_cluster_spec(job["spec"]["rayClusterSpec"], objects)
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]  # one cluster shape, two ways to run it
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_the_rayjob_entrypoint_is_a_valid_moco_pretrain_command():
    import shlex

    from pipelines.cli import build_parser
    from pipelines.pretrain.command import _scaling_overrides
    from pipelines.pretrain.config import load_config

    _, job, _ = _kuberay()
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["moco", "pretrain"]
    args = build_parser().parse_args(words[1:])
    config = load_config(args.recipe, args.overrides + _scaling_overrides(args))
    assert config.data.reader_resources == {"ingest": 1.0} and config.data.readers > 0
    assert config.scaling.workers * config.scaling.gpus_per_worker == 8
    assert all(path.startswith("s3://") for path in args.data + args.val_data)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _readme_install_command() -> str:
    """README.md's install command for an environment of one's own (the one bash line running pip install)."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    commands = [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if "pip install" in line]
    assert len(commands) == 1, commands
    return commands[0]


def test_the_image_installs_the_project_as_the_readme_does():
    instructions = _dockerfile_instructions()
    install = _readme_install_command()
    runs = [argument for instruction, argument in instructions if instruction == "RUN"]
    assert install in runs  # the same command, not a variant of it
    order = [instruction for instruction, _ in instructions]
    copy_index = instructions.index(("COPY", ". ."))
    assert copy_index < order.index("RUN", copy_index) == instructions.index(("RUN", install))
    base = dict(re.findall(r"ARG (\w+)=(\S+)", (CLUSTER / "Dockerfile").read_text()))
    assert instructions[order.index("FROM")][1] == "${BASE_IMAGE}"
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base["BASE_IMAGE"])
    # One Ray version across the image and the KubeRay manifests.
    cluster, job, _ = _kuberay()
    assert base["RAY_VERSION"] == cluster["spec"]["rayVersion"] == job["spec"]["rayClusterSpec"]["rayVersion"]
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "outputs", "mlruns", ".git"} <= set(ignored)
