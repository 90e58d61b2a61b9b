"""Serve configs and request parsing, without Ray: the YAML files are what Serve accepts and what the app builds."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from c3ae_ray.model import BUNDLED_MODEL
from c3ae_ray.serving import MODEL_ENV, ApiError, Limits, ServeConfig, parse_max_faces, web_page

SERVE_DIR = Path(__file__).resolve().parents[2] / "serve"


@pytest.mark.parametrize("name", ["c3ae_cpu.yaml", "c3ae_gpu.yaml"])
def test_the_serve_configs_pass_serves_schema_and_match_the_app(name, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load((SERVE_DIR / name).read_text())
    schema = ServeDeploySchema.model_validate(document)
    (app,) = schema.applications
    assert app.import_path == "c3ae_ray.serving:build_app" and app.route_prefix == "/"
    monkeypatch.setenv(MODEL_ENV, "/models/model.pt")
    cfg = ServeConfig.from_args(app.args)  # every arg is one the app knows
    assert cfg.device == ("cpu" if "cpu" in name else "cuda")
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"AgeAPI", "FaceFinder", "AgePredictor"}
    assert set(deployments["AgeAPI"].user_config) == {f.name for f in fields(Limits)}
    for worker in ("FaceFinder", "AgePredictor"):
        assert deployments[worker].max_ongoing_requests >= cfg.max_batch_size  # else Serve caps the batches
        assert deployments[worker].autoscaling_config["max_replicas"] > 1
    if "gpu" in name:
        assert all(deployments[w].ray_actor_options.num_gpus > 0 for w in ("FaceFinder", "AgePredictor"))


def test_serve_args_name_the_model_or_take_it_from_the_environment_or_the_bundled_one(monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)
    assert ServeConfig.from_args({"device": "cpu"}).model == str(BUNDLED_MODEL)
    with pytest.raises(ValueError, match="unknown serve args.*batch"):
        ServeConfig.from_args({"model": "m.pt", "batch": 3})
    monkeypatch.setenv(MODEL_ENV, "/m.pt")
    cfg = ServeConfig.from_args({"limits": {"timeout_s": 5}, "detector": {"min_face_size": 40}})
    assert cfg.model == "/m.pt" and cfg.limits.timeout_s == 5 and cfg.detector.min_face_size == 40
    assert ServeConfig.from_args({"model": "s3://b/m.pt"}).model == "s3://b/m.pt"


def test_max_faces_is_a_whole_number_of_at_least_one_capped_by_the_limit():
    assert parse_max_faces(None, 100) == 100 and parse_max_faces("", 100) == 100
    assert parse_max_faces("3", 100) == 3 and parse_max_faces(3, 100) == 3 and parse_max_faces(500, 100) == 100
    for bad in (0, "-1", "two", 2.5, "2.5"):
        with pytest.raises(ApiError) as caught:
            parse_max_faces(bad, 100)
        assert caught.value.status == 400 and caught.value.code == "bad_request"


def test_the_web_page_ships_in_the_package_and_loads_nothing_from_elsewhere():
    page = web_page()
    assert "<script>" in page and 'id="file"' in page and "/v1/age" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page
