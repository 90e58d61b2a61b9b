"""The deployment files are what Ray, Serve and KubeRay accept (checked with Ray's own schemas, so these
tests import Ray internals): cluster.yaml passes Ray's own launcher schema, the Serve configs pass Serve's, cluster.yaml passes Ray's own launcher schema, the
KubeRay manifests have their required fields, and every file names the same Ray version, image, install
steps, entrypoints and Serve config as the rest of the repo (so they cannot drift apart)."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import ray
import yaml

from c3ae_ray.api import MODEL_ENV, Limits, ServeConfig
from c3ae_ray.config import build
from c3ae_ray.pipeline import plan

ROOT = Path(__file__).resolve().parents[2]
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
FACENET = re.search(r"^FACENET := (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_cluster_yaml_passes_rays_launcher_schema_and_installs_the_package():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load("cluster.yaml"))  # fills the AWS defaults as `ray up` does
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == IMAGE
    assert any(option.startswith("--shm-size=") for option in config["docker"]["run_options"])
    head, worker = config["available_node_types"][config["head_node_type"]], config["available_node_types"]["gpu_worker"]
    assert worker["max_workers"] >= 1 and worker["node_config"]["InstanceType"].startswith(("g5.", "g6."))
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # a CPU head
    assert config["file_mounts"] == {"~/c3ae_ray": "."}
    assert config["setup_commands"] == ["pip install --quiet -e ~/c3ae_ray", f"pip install --quiet --no-deps {FACENET}"]


@pytest.mark.parametrize("name", ["k8s/rayjob.yaml", "k8s/rayservice.yaml"])
def test_kuberay_manifests_have_their_required_fields(name):
    manifest = load(name)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["metadata"]["name"]
    spec = manifest["spec"]
    cluster = spec["rayClusterSpec"] if manifest["kind"] == "RayJob" else spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["authOptions"]["mode"] == "token"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay: map of strings
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] == "YOUR-REGISTRY/c3ae-ray:0.1.0" for c in containers)
    for worker in cluster["workerGroupSpecs"]:
        assert worker["groupName"] and 0 <= worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
        assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    if manifest["kind"] == "RayJob":
        script = spec["entrypoint"].split()[1]
        assert spec["entrypoint"].startswith("python jobs/") and (ROOT / script).is_file()
        assert spec["jobId"] and yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    else:
        from ray.serve.schema import ServeDeploySchema

        from c3ae_ray.serving import HIGH_THROUGHPUT_MODE

        served = yaml.safe_load(spec["serveConfigV2"])
        assert served == load("serve/c3ae_gpu.yaml")  # the same Serve config as `serve deploy` uses
        ServeDeploySchema.model_validate(served)
        for group in groups:  # Serve's high-throughput mode on every pod, as `c3ae serve` runs it
            for container in group["template"]["spec"]["containers"]:
                assert {env["name"]: env["value"] for env in container["env"]}.items() >= HIGH_THROUGHPUT_MODE.items()


def test_the_dockerfile_installs_like_the_cluster_and_the_makefile():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM (\S+)", dockerfile, re.M).group(1) == IMAGE
    assert f"--no-deps {FACENET}" in dockerfile


def test_job_files_are_complete():
    from ray.runtime_env import RuntimeEnv

    runtime_env = load("jobs/runtime_env.yaml")
    RuntimeEnv(**runtime_env)
    assert ".venv" in runtime_env["excludes"] and ".git" in runtime_env["excludes"]
    planned = plan(load("jobs/pipeline.yaml"))
    assert [s.name for s in planned.steps] == [
        "preprocess wiki", "pretrain", "preprocess utkface", "finetune", "preprocess fgnet", "evaluate lopo"]
    assert planned.model == "s3://YOUR-BUCKET/c3ae/models/model.pt"
    for stage in ("preprocess", "pretrain", "finetune", "tune", "evaluate", "ablate", "score", "pipeline"):
        assert (ROOT / "jobs" / f"{stage}.py").is_file()


@pytest.mark.parametrize("name", ["c3ae_cpu.yaml", "c3ae_gpu.yaml"])
def test_the_serve_configs_pass_serves_schema_and_match_the_app(name, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load((ROOT / "serve" / name).read_text())
    schema = ServeDeploySchema.model_validate(document)
    (app,) = schema.applications
    assert app.import_path == "c3ae_ray.serving:build_app" and app.route_prefix == "/"
    monkeypatch.setenv(MODEL_ENV, "/models/model.pt")
    cfg = build(ServeConfig, app.args, "serve args")  # every arg is one the app knows
    assert cfg.device == ("cpu" if "cpu" in name else "cuda")
    deployments = {d.name: d for d in app.deployments}
    # build_app's choice by device: on CPUs the ingress runs the whole path itself
    workers = ("FaceFinder", "AgePredictor") if "gpu" in name else ("AgeAPI",)
    assert set(deployments) == {"AgeAPI", *workers}
    assert set(deployments["AgeAPI"].user_config) == {f.name for f in fields(Limits)}
    for worker in workers:
        assert deployments[worker].max_ongoing_requests >= cfg.max_batch_size  # else Serve caps the batches
        assert deployments[worker].autoscaling_config["max_replicas"] > 1
    if "gpu" in name:
        assert all(deployments[w].ray_actor_options.num_gpus > 0 for w in workers)
