"""The pipeline's plan: which steps, where each writes, which model each starts from, and the configs it
refuses before any work starts."""

from __future__ import annotations

import pytest

from c3ae_ray.pipeline import plan

DATA = {
    "wiki": {"dataset": "wiki", "root": "/data/wiki_crop"},
    "utk": {"dataset": "utkface", "root": "/data/UTKFace"},
    "fgnet": {"dataset": "fgnet", "root": "/data/FGNET/images"},
}


def config(**sections) -> dict:
    return {"out": "s3://bucket/run", **sections}


def test_every_step_writes_under_out_and_starts_from_the_right_model():
    planned = plan(config(
        pretrain={"data": DATA["wiki"], "train": {"epochs": 2}},
        finetune={"data": DATA["fgnet"], "train": {"lr": 0.001}},
        evaluate={"data": DATA["fgnet"], "evaluate": {"protocol": "lopo", "epochs": 3}},
    ))
    # FG-NET is preprocessed once although two sections use it.
    assert [(s.name, s.out) for s in planned.steps] == [
        ("preprocess wiki", "s3://bucket/run/data/wiki"),
        ("pretrain", "s3://bucket/run/runs/pretrain"),
        ("preprocess fgnet", "s3://bucket/run/data/fgnet"),
        ("finetune", "s3://bucket/run/runs/finetune"),
        ("evaluate lopo", "s3://bucket/run/eval/lopo"),
    ]
    assert planned.model == "s3://bucket/run/model.pt" and planned.model_from == "s3://bucket/run/runs/finetune/model.pt"


def test_local_outs_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    planned = plan({"out": "run", "finetune": {"data": DATA["utk"]}, "model": "m/model.pt"})
    assert [s.out for s in planned.steps] == [str(tmp_path / "run/data/utkface"), str(tmp_path / "run/runs/finetune")]
    assert planned.model == str(tmp_path / "m/model.pt")


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"pretrain": {"data": DATA["wiki"]}, "extra": 1}, "unknown"),
        ({"evaluate": {"data": DATA["fgnet"]}}, "needs pretrain: or finetune:"),
        ({"pretrain": {"data": {"dataset": "nope", "root": "/x"}}}, "dataset"),
        ({"pretrain": {"data": {**DATA["wiki"], "out": "/elsewhere"}}}, "chooses each stage's out"),
        ({"pretrain": {"data": DATA["wiki"], "train": {"init_from": "m.pt"}}}, "may not set"),
        ({"pretrain": {"data": DATA["wiki"], "train": {"epochs": 0}}}, "epochs must be at least 1"),
        ({"pretrain": {"data": DATA["wiki"], "train": {"epoch": 3}}}, "unknown pretrain: train setting\\(s\\): epoch"),
        ({"pretrain": {"data": DATA["wiki"]}, "finetune": {"data": {**DATA["wiki"], "limit": 5}}}, "different settings"),
        ({"finetune": {"data": DATA["fgnet"]}, "evaluate": {"data": DATA["fgnet"], "init_from": "finetune"}}, "trained on"),
        ({"pretrain": {"data": DATA["wiki"]}, "evaluate": {"data": DATA["fgnet"], "init_from": "finetune"}}, "init_from must be"),
        ({"pretrain": {"data": DATA["wiki"]}, "evaluate": {"data": DATA["fgnet"], "evaluate": {"protocol": "ablation"}}}, "protocol"),
        ({"pretrain": {"data": DATA["wiki"], "train": {"members": 3}}, "finetune": {"data": DATA["utk"]}}, "give members to finetune"),
        ({"pretrain": "wiki"}, "expected a mapping"),
        ({"pretrain": {"data": {**DATA["wiki"], "crop": {"size": 96}}}}, "crop size is fixed at 64"),
    ],
)
def test_bad_configs_are_refused_before_any_work(bad, message):
    with pytest.raises(ValueError, match=message):
        plan(config(**bad))


def test_out_is_required():
    with pytest.raises(ValueError, match="needs out"):
        plan({"pretrain": {"data": DATA["wiki"]}})
