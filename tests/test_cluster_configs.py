"""cluster/: the Ray cluster launcher config against the schema that ships inside Ray, the
KubeRay manifests against the fields KubeRay requires, and the worker image's pins."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from batch_infer.spec import resolve_spec
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
MANIFESTS = ["raycluster.yaml", "rayjob.yaml", "cronjob.yaml", "raycronjob.yaml"]


def dockerfile_args() -> dict[str, str]:
    text = (CLUSTER / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))


# ----------------------------------------------------------------------------- launcher


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def test_launcher_config_matches_rays_schema(ray_schema, launcher):
    jsonschema.Draft7Validator.check_schema(ray_schema)
    jsonschema.Draft7Validator(ray_schema).validate(launcher)
    # the schema is not vacuous: what Ray would refuse, it refuses
    broken = copy.deepcopy(launcher)
    del broken["available_node_types"]["gpu_worker"]["node_config"]
    broken["available_node_types"]["head"]["gpus"] = 1
    errors = {e.message for e in jsonschema.Draft7Validator(ray_schema).iter_errors(broken)}
    assert "'node_config' is a required property" in errors
    assert any("'gpus' was unexpected" in e for e in errors)


def test_launcher_cpu_head_and_gpu_workers(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for worker in gpu_types.values():
        # one actor per GPU, the other cores prepare shards; a fixed number of workers
        assert worker["resources"]["CPU"] > worker["resources"]["GPU"]
        assert worker["min_workers"] == worker["max_workers"] >= 1
    assert launcher["max_workers"] >= sum(t.get("min_workers", 0) for t in types.values())
    args = dockerfile_args()
    assert launcher["docker"]["image"].endswith(f"-trt{args['TRT_VERSION']}")


def test_launcher_turns_token_auth_on(launcher):
    """Every node starts Ray with RAY_AUTH_MODE=token and the token file the launcher copies
    from the machine that runs `ray up` (where `batch-infer submit` reads it too)."""
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in launcher[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key


# ----------------------------------------------------------------------------- KubeRay

# The fields KubeRay's CRDs require (ray-project/kuberay v1.7.0,
# ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,raycronjobs}.yaml), plus what
# these manifests promise: token authentication and GPUs on the workers.
_CONTAINER = {
    "type": "object",
    "required": ["name", "image", "resources"],
    "properties": {"name": {"pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
}
_POD = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}},
        }
    },
}
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec", "workerGroupSpecs", "rayVersion", "authOptions"],
    "properties": {
        "rayVersion": {"type": "string"},
        "authOptions": {
            "type": "object",
            "required": ["mode"],
            "properties": {"mode": {"const": "token"}},
        },
        "headGroupSpec": {
            "type": "object",
            "required": ["template"],
            "properties": {"template": _POD, "rayStartParams": _START_PARAMS},
        },
        "workerGroupSpecs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["groupName", "minReplicas", "maxReplicas", "template"],
                "properties": {
                    "groupName": {"type": "string"},
                    "replicas": {"type": "integer", "minimum": 1},
                    "minReplicas": {"type": "integer", "minimum": 1},
                    "maxReplicas": {"type": "integer", "minimum": 1},
                    "template": _POD,
                    "rayStartParams": _START_PARAMS,
                },
            },
        },
    },
}
RAY_JOB_SPEC = {
    "type": "object",
    "required": [
        "entrypoint",
        "rayClusterSpec",
        "shutdownAfterJobFinishes",
        "activeDeadlineSeconds",
    ],
    "properties": {
        "entrypoint": {"type": "string", "pattern": r"^batch-infer run "},
        "shutdownAfterJobFinishes": {"const": True},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 1},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},  # a hung run ends
        "rayClusterSpec": RAY_CLUSTER_SPEC,
    },
}
_META = {
    "type": "object",
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
}
SCHEMAS = {
    "RayCluster": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "metadata": _META,
            "spec": RAY_CLUSTER_SPEC,
        },
    },
    "RayJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "metadata": _META,
            "spec": RAY_JOB_SPEC,
        },
    },
    "RayCronJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "metadata": {"required": ["name"], "properties": {"name": {"maxLength": 36}}},
            "spec": {
                "type": "object",
                "required": ["schedule", "jobTemplate", "timeZone"],
                "properties": {"jobTemplate": RAY_JOB_SPEC},
            },
        },
    },
}


def ray_objects(name: str) -> list[dict]:
    """The KubeRay objects of a manifest, with the RayJob a CronJob's ConfigMap carries."""
    out = []
    for doc in yaml.safe_load_all((KUBERAY / name).read_text()):
        if doc["kind"] == "ConfigMap" and "rayjob.yaml" in doc["data"]:
            out.append(yaml.safe_load(doc["data"]["rayjob.yaml"]))
        elif doc["kind"] in SCHEMAS:
            out.append(doc)
    return out


def cluster_spec(obj: dict) -> dict:
    spec = obj["spec"]
    if obj["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]
    return spec if obj["kind"] == "RayCluster" else spec["rayClusterSpec"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifests_have_what_kuberay_requires(name):
    objects = ray_objects(name)
    assert objects, f"{name}: no KubeRay object"
    args = dockerfile_args()
    for obj in objects:
        jsonschema.Draft202012Validator(SCHEMAS[obj["kind"]]).validate(obj)
        spec = cluster_spec(obj)
        # token auth needs Ray >= 2.52; the image's Ray must be the manifest's
        assert spec["rayVersion"] == args["RAY_VERSION"]
        assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52)
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] == group["maxReplicas"] == group.get("replicas", 1)
            pod = group["template"]["spec"]
            [worker] = pod["containers"]
            limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert requests.get("nvidia.com/gpu") == limits["nvidia.com/gpu"]  # extended
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
        workers = [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
        for container in [head, *workers]:
            assert container["image"].endswith(f"-trt{args['TRT_VERSION']}")


def test_the_schemas_above_are_not_vacuous():
    [cluster] = ray_objects("raycluster.yaml")
    validator = jsonschema.Draft202012Validator(SCHEMAS["RayCluster"])
    for path, value in [
        (("spec", "authOptions", "mode"), "disabled"),
        (("spec", "workerGroupSpecs", 0, "groupName"), None),
        (("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),
    ]:
        broken = copy.deepcopy(cluster)
        node = broken
        for key in path[:-1]:
            node = node[key]
        if value is None:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        assert list(validator.iter_errors(broken)), path


def test_scheduled_manifests_carry_the_specs_schedule():
    spec = resolve_spec(KUBERAY / "job.yaml")
    assert spec.schedule is not None
    docs = {d["kind"]: d for d in yaml.safe_load_all((KUBERAY / "cronjob.yaml").read_text())}
    cron = docs["CronJob"]["spec"]
    assert (cron["schedule"], cron["timeZone"]) == (spec.schedule.cron, spec.schedule.timezone)
    assert cron["concurrencyPolicy"] == "Forbid"
    # with Forbid, a hung run would block every later one: the Job ends after the RayJob's
    # deadline, its small kubectl pod deletes the RayJob, and may do so (RBAC)
    [rayjob_of_cron] = ray_objects("cronjob.yaml")
    job = cron["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] > rayjob_of_cron["spec"]["activeDeadlineSeconds"]
    [pod] = job["template"]["spec"]["containers"]
    assert "tensorrt" not in pod["image"] and "batch-infer" not in pod["image"]
    verbs = {
        v for rule in docs["Role"]["rules"] if "rayjobs" in rule["resources"] for v in rule["verbs"]
    }
    assert {"create", "get", "list", "delete"} <= verbs
    assert docs["ConfigMap"]["data"]["job.yaml"] == (KUBERAY / "job.yaml").read_text()
    [raycron] = ray_objects("raycronjob.yaml")
    assert raycron["spec"]["schedule"] == spec.schedule.cron
    assert raycron["spec"]["timeZone"] == spec.schedule.timezone
    # the standalone RayJob mounts the ConfigMap its comment says to create from job.yaml
    [rayjob] = ray_objects("rayjob.yaml")
    volumes = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert volumes[0]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert f"configmap -n NAMESPACE {volumes[0]['configMap']['name']}" in (
        (KUBERAY / "rayjob.yaml").read_text()
    )


# ----------------------------------------------------------------------------- image


def test_dockerfile_pins_tensorrt():
    text = (CLUSTER / "Dockerfile").read_text()
    args = dockerfile_args()
    assert re.search(r"^FROM nvcr\.io/nvidia/tensorrt:\$\{TRT_CONTAINER\}$", text, flags=re.M)
    assert re.fullmatch(r"\d\d\.\d\d-py3", args["TRT_CONTAINER"])  # a release, not latest
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TRT_VERSION"])
    assert "tensorrt.__version__" in text and "${TRT_VERSION}" in text  # checked at build
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["RAY_VERSION"])
    assert '"ray[default]==${RAY_VERSION}"' in text
