"""`c3ae tune` on the session's local Ray: a small search whose trials report every epoch, one of them killed
while it trains and retried from its last epoch, with every output written and the best recipe accepted by
`c3ae train` as is."""

from __future__ import annotations

import csv
import json
import threading
import time

import pytest
import yaml

from c3ae_ray import storage
from c3ae_ray.config import build
from c3ae_ray.train import TrainConfig
from c3ae_ray.tune import TuneConfig, tune_recipe
from tests import fixtures

SPACE = "lr: {loguniform: [0.001, 0.01]}\nmodel:\n  dropout_head: {uniform: [0.0, 0.3]}\nbatch_size: {choice: [8, 16]}\n"


def test_a_search_retries_a_killed_trial_and_writes_its_report(ray_session, face_parquet, tmp_path, capsys):
    (tmp_path / "space.yaml").write_text(SPACE)
    (tmp_path / "base.yaml").write_text("model: {gender_head: true}\nval_fraction: 0.3\n")
    cfg = TuneConfig(data=str(face_parquet), out=str(tmp_path / "search"), space=str(tmp_path / "space.yaml"),
                     base=str(tmp_path / "base.yaml"), trials=4, epochs=4, grace_epochs=1, reduction_factor=2, max_failures=1)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=tune_recipe(cfg)))
    thread.start()
    deadline = time.time() + 300
    # a trial with a checkpoint from an epoch is killed mid-training
    while not list((tmp_path / "search" / "trials").glob("trial_*/checkpoint_*")):
        assert thread.is_alive() and time.time() < deadline, "the search ended or stalled before any trial's first epoch"
        time.sleep(0.2)
    assert fixtures.kill_ray_process(ray_session, "ray::ImplicitFunc.train"), "no trial process found"
    thread.join(timeout=400)
    assert "summary" in outcome, "the search did not finish after a trial was killed"
    summary = outcome["summary"]
    printed = capsys.readouterr().out

    rows = summary["rows"]
    assert [row["trial"] for row in rows] == ["trial 1", "trial 2", "trial 3", "trial 4"]
    assert all(row["status"] in ("finished", "stopped early") and row["error"] is None for row in rows)  # retried, not lost
    assert sum(row["failures"] for row in rows) == 1 and "failed, retrying from its last epoch" in printed
    for row in rows:
        assert (row["status"] == "finished") == (row["epochs"] == 4) and 1 <= row["best_epoch"] <= row["epochs"]
        assert 1e-3 <= row["settings"]["lr"] <= 1e-2 and row["settings"]["batch_size"] in (8, 16)
    history = storage.read_json(*storage.resolve(f"{cfg.out}/summary.json"))["rows"]
    assert history == rows and summary["epochs_trained"] == sum(row["epochs"] for row in rows)
    assert "[4/4 ended:" in printed

    best = min(rows, key=lambda row: row["best_val_mae"])
    assert summary["best"]["trial"] == best["trial"]
    recipe = yaml.safe_load((tmp_path / "search" / "best.yaml").read_text())
    accepted = build(TrainConfig, {**recipe, "out": str(tmp_path / "run")})  # `c3ae train --config best.yaml --out ...`
    assert accepted.lr == best["settings"]["lr"] and accepted.model.dropout_head == best["settings"]["model.dropout_head"]
    assert accepted.model.gender_head and accepted.val_fraction == 0.3 and accepted.epochs == 4 and accepted.data == str(face_parquet)
    with open(tmp_path / "search" / "trials.csv") as table:
        assert [r["trial"] for r in csv.DictReader(table)] == [row["trial"] for row in rows]
    for plot in ("curves.png", "settings.png"):
        assert (tmp_path / "search" / plot).read_bytes()[:4] == b"\x89PNG"
    assert f"| {best['trial']} |" in (tmp_path / "search" / "trials.md").read_text().split("\n| trial |")[1].splitlines()[2]
    with pytest.raises(storage.OutputExistsError):
        tune_recipe(cfg)


def test_hyperband_pauses_trials_and_each_continues_from_its_checkpoint(face_parquet, tmp_path):
    """HyperBand (with Optuna drawing the settings) runs a bracket's trials to a rung, pauses them, stops the worse
    and continues the better from their last checkpoint: no trial reports an epoch twice (one started over would
    report epoch 1 again). Ray fills its brackets without early stopping first: trials 1-2 here run in full,
    trials 3-4 share a bracket that halves at epoch 1."""
    (tmp_path / "space.yaml").write_text("lr: {loguniform: [0.001, 0.01]}\n")
    cfg = TuneConfig(data=str(face_parquet), out=str(tmp_path / "search"), space=str(tmp_path / "space.yaml"),
                     trials=4, epochs=2, scheduler="hyperband", reduction_factor=2, search="optuna", seed=3)
    summary = tune_recipe(cfg)
    assert summary["trials"] == 4 and summary["failed"] == 0 and summary["finished"] >= 3 and summary["stopped_early"] == 1
    for trial in (tmp_path / "search" / "trials").glob("trial_*"):
        epochs = [json.loads(line)["epoch"] for line in (trial / "result.json").read_text().splitlines()]
        assert epochs == list(range(1, len(epochs) + 1)), (trial.name, epochs)
    assert len({round(row["settings"]["lr"], 8) for row in summary["rows"]}) == 4  # optuna drew four settings
