"""One way to build a config: any mapping -> a stage's dataclass, with every problem named; the CLI's errors."""

from __future__ import annotations

import pytest

from c3ae_ray import cli
from c3ae_ray.config import UserError, build, field_default, merge, nest, resolve_device, to_dict
from c3ae_ray.detect import DetectorConfig
from c3ae_ray.preprocess import PreprocessConfig
from c3ae_ray.score import ScoreConfig
from c3ae_ray.train import TrainConfig


def test_a_mapping_builds_nested_configs_with_lists_as_tuples_and_ints_as_floats():
    cfg = build(PreprocessConfig, {"dataset": "utkface", "root": "/r", "out": "/o", "min_age": 1,
                                   "detector": {"thresholds": [0.5, 0.6, 0.7]}, "crop": {"scales": [1, 1.5, 2]}})
    assert cfg.detector.thresholds == (0.5, 0.6, 0.7) and cfg.crop.scales == (1.0, 1.5, 2.0) and cfg.min_age == 1.0
    assert isinstance(cfg.min_age, float) and cfg.detector.min_face_score == 0.9
    assert build(PreprocessConfig, to_dict(cfg)) == cfg  # what a stage saves, it reads back


def test_every_problem_names_the_key():
    with pytest.raises(UserError, match="unknown ScoreConfig setting\\(s\\): min_face; allowed: input, out, model"):
        build(ScoreConfig, {"input": "i", "out": "o", "min_face": 0.5})
    with pytest.raises(UserError, match="unknown ScoreConfig.detector setting\\(s\\): score; allowed: min_face_score"):
        build(ScoreConfig, {"input": "i", "out": "o", "detector": {"score": 0.5}})
    with pytest.raises(UserError, match="ScoreConfig.max_faces: expected int, got 2.5"):
        build(ScoreConfig, {"input": "i", "out": "o", "max_faces": 2.5})
    with pytest.raises(UserError, match="ScoreConfig.overwrite: expected bool, got 'yes'"):
        build(ScoreConfig, {"input": "i", "out": "o", "overwrite": "yes"})
    with pytest.raises(UserError, match="expected 3 values, got 2"):
        build(DetectorConfig, {"thresholds": [0.5, 0.6]})
    with pytest.raises(UserError, match="ScoreConfig: input must be given"):
        build(ScoreConfig, {"out": "o"})
    with pytest.raises(UserError, match="min_face_score is a probability"):
        build(ScoreConfig, {"input": "i", "out": "o", "detector": {"min_face_score": 9}})
    with pytest.raises(UserError, match="expected a mapping of settings"):
        build(TrainConfig, ["data", "out"])


def test_flags_are_dotted_field_names_merged_over_a_file():
    assert nest({"model.se": False, "epochs": 3, "augment.p_flip": 0.0}) == {"model": {"se": False}, "epochs": 3, "augment": {"p_flip": 0.0}}
    assert merge({"model": {"se": True, "context": False}, "lr": 1}, {"model": {"se": False}}) == {"model": {"se": False, "context": False}, "lr": 1}
    assert field_default(TrainConfig, "model.mirror_average") is False and field_default(TrainConfig, "epochs") == 30
    assert field_default(ScoreConfig, "detector.min_face_score") == DetectorConfig().min_face_score


def test_devices_resolve_one_way():
    assert resolve_device("cpu") == "cpu" and resolve_device("auto", gpus=2) == "cuda" and resolve_device("auto", gpus=0) == "cpu"
    with pytest.raises(UserError, match="the Ray cluster has no CUDA GPU"):
        resolve_device("cuda", gpus=0)
    with pytest.raises(UserError, match="device must be auto, cpu or cuda"):
        resolve_device("tpu")


def test_the_command_prints_a_users_mistake_in_one_line_and_a_bug_with_its_traceback(capsys, monkeypatch, tmp_path):
    assert cli.main(["score", "--input", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == f"c3ae score: error: --input {tmp_path / 'nowhere'} does not exist\n"
    (tmp_path / "bad.yaml").write_text("epochs: 3\nmodle: {se: false}\n")
    assert cli.main(["train", "--config", str(tmp_path / "bad.yaml"), "--data", "d", "--out", "o"]) == 1
    assert "unknown train setting(s): modle; allowed:" in capsys.readouterr().err

    def broken() -> str:  # a bug deep inside a command: a plain ZeroDivisionError, not a UserError
        return str(1 / 0)

    monkeypatch.setattr("c3ae_ray.summary.summary_text", broken)
    assert cli.main(["summary"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("c3ae summary: internal error (a bug, not something you did): ZeroDivisionError: division by zero")
    assert "Traceback (most recent call last)" in err and "1 / 0" in err
