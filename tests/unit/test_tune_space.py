"""`c3ae tune`'s space and recipes without Ray: what a space may say, how a trial's recipe is built from the base
and the drawn settings, and the report's order."""

from __future__ import annotations

import re

import pytest

from c3ae_ray.train import TrainConfig
from c3ae_ray.tune import format_report, read_space, trial_recipe


def space_file(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def test_nested_and_dotted_settings_name_the_same_fields(tmp_path):
    nested = read_space(space_file(tmp_path, "lr: {loguniform: [0.001, 0.01]}\nmodel:\n  dropout_head: {uniform: [0, 0.4]}\n"
                                             "augment: {p_rotate: {choice: [0.0, 0.3]}}\nbatch_size: {randint: [16, 65]}\n"))
    dotted = read_space(space_file(tmp_path, "lr: {loguniform: [0.001, 0.01]}\nmodel.dropout_head: {uniform: [0, 0.4]}\n"
                                             "augment.p_rotate: {choice: [0.0, 0.3]}\nbatch_size: {randint: [16, 65]}\n"))
    assert nested == dotted == {"lr": ("loguniform", [0.001, 0.01]), "model.dropout_head": ("uniform", [0, 0.4]),
                                "augment.p_rotate": ("choice", [0.0, 0.3]), "batch_size": ("randint", [16, 65])}


@pytest.mark.parametrize("text, message", [
    ("lr: {loguniform: [0, 0.01]}", "loguniform needs positive bounds"),
    ("lr: {uniform: [0.01, 0.001]}", "needs low < high"),
    ("lr: {uniform: [0.01]}", r"needs \[low, high\]"),
    ("batch_size: {randint: [8.5, 64]}", "randint needs whole numbers"),
    ("batch_size: {choice: []}", "choice needs a non-empty list"),
    ("lr: 0.01", "expected one of loguniform"),
    ("lr: {normal: [0, 1]}", "expected one of loguniform"),
    ("learning_rate: {uniform: [0.001, 0.01]}", "unknown space setting"),
    ("model: {dropout: {uniform: [0, 0.5]}}", "unknown .*model setting"),
    ("model: {dropout_head: {uniform: [0.5, 1.5]}}", "dropout rates must be in"),
    ("epochs: {randint: [5, 10]}", "epochs cannot be searched"),
    ("seed: {choice: [0, 1]}", "seed cannot be searched"),
    ("{}", "no setting to search"),
])
def test_a_bad_space_is_refused_with_the_setting_it_names(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_space(space_file(tmp_path, text))


def test_a_trial_recipe_is_the_base_with_its_settings_over_it():
    base = {"data": "d", "out": "o", "epochs": 4, "lr": 0.002, "model": {"gender_head": True, "dropout_head": 0.3}}
    recipe = trial_recipe(base, {"lr": 0.004, "model.dropout_head": 0.1, "augment.p_rotate": 0.5})
    assert isinstance(recipe, TrainConfig) and recipe.lr == 0.004 and recipe.epochs == 4
    assert recipe.model.gender_head and recipe.model.dropout_head == 0.1 and recipe.augment.p_rotate == 0.5


def test_the_report_ranks_trials_best_first_and_failed_last():
    row = {"status": "finished", "epochs": 3, "failures": 0, "error": None}
    summary = {
        "data": "faces", "trials": 3, "finished": 1, "stopped_early": 1, "failed": 1, "epochs_trained": 5, "elapsed_s": 12.0,
        "space": {"lr": {"loguniform": [0.001, 0.01]}},
        "rows": [{**row, "trial": "trial 1", "best_val_mae": 9.5, "best_epoch": 1, "status": "stopped early", "epochs": 1, "settings": {"lr": 0.002}},
                 {**row, "trial": "trial 2", "best_val_mae": None, "best_epoch": None, "status": "failed", "epochs": 1,
                  "error": "RuntimeError: boom", "settings": {"lr": 0.009}},
                 {**row, "trial": "trial 3", "best_val_mae": 8.25, "best_epoch": 3, "settings": {"lr": 0.004}}],
    }
    summary["best"] = summary["rows"][2]
    report = format_report(summary)
    lines = [line for line in report.splitlines() if re.match(r"\| trial \d", line)]
    assert [line.split(" | ")[0] for line in lines] == ["| trial 3", "| trial 1", "| trial 2"]
    assert "failed: RuntimeError: boom" in lines[2] and "Best: trial 3, validation MAE 8.250 at epoch 3 (lr 0.004)" in report
