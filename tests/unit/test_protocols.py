"""The evaluation plans (who trains and tests on which faces), metrics, the report and its figures, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from c3ae_ray import plots
from c3ae_ray.evaluate import EvalConfig
from c3ae_ray.metrics import age_metrics, by_decade, by_group, gender_metrics
from c3ae_ray.protocols import ABLATIONS, PAPER_ABLATIONS, format_report, plan_trials

# 10 people with 3 to 7 photos each, 50 photos in all.
SUBJECTS = [f"{p:03d}" for p in range(10) for _ in range(3 + p % 5)]
PATHS = [f"img/{i:03d}.jpg" for i in range(len(SUBJECTS))]


def plan(**settings) -> list[dict]:
    return plan_trials(EvalConfig(data="d", out="o", **settings), PATHS, SUBJECTS)


def people(trial: dict, part: str) -> set[str]:
    return {SUBJECTS[i] for i in trial[part]}


def test_paper_splits_are_seeded_random_images_and_cover_everything():
    trials = plan(protocol="splits", repeats=10, test_size=8)
    assert [t["name"] for t in trials][:2] == ["split 01", "split 02"] and len(trials) == 10
    for trial in trials:
        assert len(trial["test"]) == 8 and sorted(trial["train"] + trial["test"]) == list(range(len(PATHS)))
    assert len({tuple(t["test"]) for t in trials}) == 10  # ten different splits
    assert [t["test"] for t in trials] == [t["test"] for t in plan(protocol="splits", repeats=10, test_size=8)]
    assert [t["test"] for t in plan(protocol="splits", repeats=10, test_size=8, seed=1)] != [t["test"] for t in trials]
    assert any(people(t, "test") & people(t, "train") for t in trials)  # per image: people straddle the split


def test_splits_by_subject_test_on_whole_people_only():
    for trial in plan(protocol="splits", repeats=5, test_size=8, by_subject=True):
        assert not people(trial, "test") & people(trial, "train")
        assert all(SUBJECTS.count(s) == sum(SUBJECTS[i] == s for i in trial["test"]) for s in people(trial, "test"))
        # people are added until the test part holds at least test_size faces, and not one more person
        assert 8 <= len(trial["test"]) < 8 + 7


def test_leave_one_person_out_has_one_fold_per_person():
    trials = plan(protocol="lopo")
    assert [t["name"] for t in trials] == [f"subject {p:03d}" for p in range(10)]
    for trial in trials:
        assert len(people(trial, "test")) == 1 and not people(trial, "test") & people(trial, "train")
    assert sorted(i for t in trials for i in t["test"]) == list(range(len(PATHS)))


def test_the_ablation_crosses_variants_and_seeds_on_one_hash_split():
    trials = plan(protocol="ablation", seeds=2, seed=5)
    assert [(t["group"], t["seed"]) for t in trials] == [(v, s) for v in PAPER_ABLATIONS for s in (5, 6)]
    assert len({tuple(t["test"]) for t in trials}) == 1
    switches = {t["group"]: (t["switches"], t["augment"], t["aligned"]) for t in trials}
    assert switches["no-context"] == ({"context": False}, True, False) and switches["no-augment"] == ({}, False, False)
    assert not people(trials[0], "test") & people(trials[0], "train")  # the hash is over people, as in training


def test_the_seeds_methods_are_rows_of_the_ablation_and_aligned_rows_need_aligned_data():
    trials = plan(protocol="ablation", seeds=1, variants=("full", "gaussian-k1", "aligned", "+gender+ethnicity+aligned"),
                  aligned_data="aligned-faces")
    rows = {t["group"]: (t["switches"], t["aligned"]) for t in trials}
    assert rows["full"] == ({}, False) and rows["aligned"] == ({}, True)
    assert rows["gaussian-k1"] == ({"label_encoding": "gaussian", "n_bins": 111, "interval": 1.0}, False)
    assert rows["+gender+ethnicity+aligned"] == ({"gender_head": True, "ethnicity_head": True}, True)
    assert len({tuple(t["test"]) for t in trials}) == 1  # aligned or not, one split over the same images
    with pytest.raises(ValueError, match="the variants aligned need --aligned-data"):
        EvalConfig(data="d", out="o", protocol="ablation", variants=("full", "aligned"))
    with pytest.raises(ValueError, match="--aligned-data is read only by the ablation's aligned variants"):
        EvalConfig(data="d", out="o", protocol="ablation", aligned_data="a")
    with pytest.raises(ValueError, match="--aligned-data is read only"):
        EvalConfig(data="d", out="o", protocol="lopo", aligned_data="a")


def test_plans_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="leaves no training faces"):
        plan(protocol="splits", test_size=50)
    with pytest.raises(ValueError, match="lopo needs a subject for every face; 1 of 50 have none"):
        plan_trials(EvalConfig(data="d", out="o", protocol="lopo"), PATHS, SUBJECTS[:-1] + [None])
    with pytest.raises(ValueError, match="--by-subject needs a subject"):
        plan_trials(EvalConfig(data="d", out="o", by_subject=True), PATHS, [None] * 50)
    with pytest.raises(ValueError, match="at least 2 subjects"):
        plan_trials(EvalConfig(data="d", out="o", protocol="lopo"), PATHS, ["001"] * 50)
    for settings, message in [
        ({"protocol": "kfold"}, "protocol must be one of"),
        ({"repeats": 0}, "repeats must be at least 1"),
        ({"protocol": "ablation", "variants": ("full", "no-dropout")}, "variants must be among"),
        ({"protocol": "ablation", "init_from": "m.pt"}, "from scratch"),
        ({"trial_cpus": 0}, "trial_cpus must be positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            EvalConfig(data="d", out="o", **settings)


def test_age_metrics_are_mae_and_cumulative_accuracy():
    metrics = age_metrics([10, 20, 30, 48], [12, 24, 36, 40])  # errors 2, 4, 6, 8
    assert metrics == {"faces": 4, "mae": 5.0, "ca3": 0.25, "ca5": 0.5, "ca7": 0.75}
    assert age_metrics([], [])["mae"] is None
    decades = by_decade([10, 20, 30, 48], [12, 24, 36, 40])  # true ages in the 10s, 20s, 30s and 40s
    assert [(d["ages"], d["faces"], d["mae"]) for d in decades] == [("10-19", 1, 2.0), ("20-29", 1, 4.0), ("30-39", 1, 6.0), ("40-49", 1, 8.0)]


def test_gender_accuracy_and_the_fairness_groups():
    p_female = [0.9, 0.2, 0.6, 0.4, 0.7]
    genders = ["female", "male", "male", None, "female"]  # right, right, wrong, unknown, right
    assert gender_metrics(p_female, genders) == {"gender_faces": 4, "gender_acc": 0.75}
    assert gender_metrics([0.5], [None]) == {"gender_faces": 0, "gender_acc": None}
    groups = by_group(["white", "black", None, "white", "black"], [10, 20, 30, 40, 50], [12, 20, 33, 40, 40], p_female, genders)
    assert [(g["group"], g["faces"], g["mae"], g["gender_acc"]) for g in groups] == [
        ("black", 2, 5.0, 1.0), ("white", 2, 1.0, 1.0), ("unknown", 1, 3.0, 0.0)]  # unknown last
    decades = by_decade([10, 20, 30, 40, 50], [12, 20, 33, 40, 40], p_female, genders)
    assert [(d["ages"], d["faces"], d["gender_faces"]) for d in decades] == [("10-19", 1, 1), ("20-29", 1, 1), ("30-39", 1, 1), ("40-49", 2, 1)]
    assert "gender_acc" not in by_group(["a"], [1], [1])[0]  # age-only models: no gender columns


def test_the_report_lists_failed_trials_and_the_figures_plot_the_results():
    rows = [
        {"trial": 0, "name": "subject 001", "group": "lopo", "status": "ok", "test_subjects": ["001"], "train_size": 9,
         "test_size": 3, "subject_overlap": 0, "retries": 1, "mae": 4.0, "ca3": 0.3, "ca5": 0.6, "ca7": 1.0},
        {"trial": 1, "name": "subject 002", "group": "lopo", "status": "failed", "test_subjects": ["002"],
         "train_size": 9, "test_size": 3, "retries": 2, "error": "ActorDiedError: killed"},
    ]
    group = {"trials": 2, "completed": 1, "failed": 1, "mae_mean": 4.0, "mae_std": 0.0, "pooled_mae": 4.0,
             "ca3": 0.3, "ca5": 0.6, "ca7": 1.0, "gender_acc": None, "test_faces": 3}
    summary = {"protocol": "lopo", "data": {"location": "d", "faces": 12}, "images": 12, "config": {"epochs": 3, "init_from": None},
               "groups": {"lopo": group}, "rows": rows, **group}
    report = format_report(summary)
    assert "3 epochs each, trained from scratch; 12 faces." in report
    assert "| lopo | 1/2 (1 failed) | 4.00 ± 0.00 | 4.00 | 0.300 | 0.600 | 1.000 | - | 3 |" in report  # no gender head: -
    assert "| subject 001 | 001 | 9 | 3 | 0 | 4.00 | 0.300 | 0.600 | 1.000 | ok after 1 retry |" in report
    assert "| subject 002 | 002 | 9 | 3 | - | - | - | - | - | FAILED: ActorDiedError: killed after 2 retries |" in report
    true, predicted = np.array([5.0, 15, 25, 70]), np.array([7.0, 12, 30, 60])
    trial_mae = plots.trial_mae(rows).axes[0]
    assert [bar.get_height() for bar in trial_mae.patches] == [4.0]  # the failed trial has no bar...
    assert [list(line.get_ydata()) for line in trial_mae.get_lines()] == [[0], [4.0, 4.0]]  # ...but a cross; the mean
    assert [label.get_text() for label in trial_mae.get_xticklabels()] == ["subject 001", "subject 002"]
    scatter = plots.pred_vs_true({"lopo": (true, predicted)}).axes[0]
    np.testing.assert_allclose(scatter.collections[0].get_offsets(), np.stack([true, predicted], axis=1))
    decades = plots.error_by_decade({"full": (true, predicted), "no-se": (true, predicted + 1)}).axes[0]
    heights = [bar.get_height() for bar in decades.patches]
    np.testing.assert_allclose(heights, [2, 3, 5, 10, 3, 2, 6, 9])  # per decade: full's errors, then no-se's
    assert [label.get_text() for label in decades.get_xticklabels()] == ["0-9", "10-19", "20-29", "70-79"]
    for figure in (plots.trial_mae(rows), plots.pred_vs_true({"lopo": (true, predicted)})):
        assert plots.png(figure)[:4] == b"\x89PNG"
