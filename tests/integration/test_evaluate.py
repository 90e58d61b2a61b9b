"""`evaluate` and the ablation on the session's local Ray (Tune trials as real actors) with an FG-NET-layout
fixture: repeated splits, leave-one-person-out, the ablation grid, and trials killed while they run."""

from __future__ import annotations

import csv
import threading
import time

import pyarrow.fs as pafs
import pytest
import torch

from c3ae_ray import storage
from c3ae_ray.config import to_dict
from c3ae_ray.crops import CropConfig
from c3ae_ray.evaluate import EvalConfig, evaluate
from c3ae_ray.protocols import PAPER_ABLATIONS
from c3ae_ray.model import C3AE, save_model
from tests import fixtures

SUMMARY_KEYS = {"protocol", "data", "trials", "completed", "failed", "failed_trials", "mae_mean", "mae_std",
                "pooled_mae", "ca3", "ca5", "ca7", "test_faces", "groups", "rows", "config"}
REPORT_FILES = {"config.json", "trials", "summary.json", "report.md", "predictions.csv", "trial_mae.png",
                "pred_vs_true.png", "error_by_decade.png"}


def run(data, out, **settings) -> dict:
    return evaluate(EvalConfig(data=str(data), out=str(out), **settings))


def faces_of(data) -> int:
    return storage.read_json(*storage.resolve(str(data / "summary.json")))["kept"]


def test_repeated_splits_write_the_report(fgnet_parquet, tmp_path):
    summary = run(fgnet_parquet, tmp_path / "splits", protocol="splits", repeats=3, test_size=5, epochs=2)
    assert SUMMARY_KEYS <= set(summary)
    assert sorted(p.name for p in (tmp_path / "splits").iterdir()) == sorted(REPORT_FILES)
    assert (summary["protocol"], summary["trials"], summary["completed"], summary["failed"]) == ("splits", 3, 3, 0)
    faces = faces_of(fgnet_parquet)
    rows = summary["rows"]
    assert [r["name"] for r in rows] == ["split 01", "split 02", "split 03"]
    for row in rows:
        assert row["status"] == "ok" and row["test_size"] == 5 and row["train_size"] == faces - 5
        assert row["trained_faces"] == faces - 5 and 1 <= len(row["test_subjects"]) <= 4
        assert 0 <= row["mae"] and 0 <= row["ca3"] <= row["ca5"] <= row["ca7"] <= 1
    maes = [r["mae"] for r in rows]
    assert summary["mae_mean"] == pytest.approx(sum(maes) / 3, abs=1e-3)
    assert summary["mae_std"] > 0 and summary["test_faces"] == 15
    assert len({tuple(sorted(r["test_subjects"])) + (r["mae"],) for r in rows}) == 3  # three different splits
    with open(tmp_path / "splits" / "predictions.csv") as file:
        predictions = list(csv.DictReader(file))
    assert len(predictions) == 15 and {int(p["trial"]) for p in predictions} == {0, 1, 2}
    pooled = sum(abs(float(p["predicted"]) - float(p["age"])) for p in predictions) / 15
    assert summary["pooled_mae"] == pytest.approx(pooled, abs=1e-2)
    report = (tmp_path / "splits" / "report.md").read_text()
    assert "| splits | 3/3 |" in report and report.count("| split 0") == 3
    for plot in ("trial_mae.png", "pred_vs_true.png", "error_by_decade.png"):
        assert (tmp_path / "splits" / plot).read_bytes()[:4] == b"\x89PNG"


def test_leave_one_person_out_never_trains_on_the_test_person(fgnet_parquet, tmp_path):
    summary = run(fgnet_parquet, tmp_path / "lopo", protocol="lopo", epochs=2)
    rows = summary["rows"]
    assert [r["test_subjects"] for r in rows] == [["001"], ["041"], ["081"], ["121"]]
    assert summary["trials"] == summary["completed"] == 4
    faces = faces_of(fgnet_parquet)
    assert sum(r["test_size"] for r in rows) == faces == summary["test_faces"]  # every face tested exactly once
    for row in rows:
        # Counted inside the trial from the faces it trained on: none of them is the test person.
        assert row["subject_overlap"] == 0 and row["trained_faces"] == faces - row["test_size"]
    with open(tmp_path / "lopo" / "predictions.csv") as file:
        for prediction in csv.DictReader(file):
            assert rows[int(prediction["trial"])]["test_subjects"] == [prediction["subject"]]


def test_the_ablation_trains_each_variant_on_one_split(fgnet_parquet, tmp_path):
    summary = run(fgnet_parquet, tmp_path / "ablation", protocol="ablation", seeds=1, epochs=1, test_fraction=0.3)
    assert list(summary["groups"]) == list(PAPER_ABLATIONS) and summary["completed"] == 5
    rows = {r["group"]: r for r in summary["rows"]}
    assert len({tuple(r["test_subjects"]) for r in rows.values()}) == 1  # the same split for every variant
    parameters = {group: row["parameters"] for group, row in rows.items()}
    assert parameters["full"] == parameters["no-augment"] == 39_781  # the paper's 39.7K
    assert parameters["no-se"] == 36_565 and parameters["no-context"] < parameters["full"]
    assert parameters["no-cascade"] == parameters["full"]  # same layers; only the head's activation differs
    report = (tmp_path / "ablation" / "report.md").read_text()
    assert all(f"| {variant} | 1/1 |" in report for variant in PAPER_ABLATIONS)
    assert all(row["gender_acc"] is None for row in rows.values())  # no gender head in the paper's variants


def test_the_ablation_rows_with_heads_report_gender_accuracy(face_parquet, tmp_path):
    """UTKFace faces carry gender and ethnicity: the +gender rows train those heads and are scored on gender."""
    summary = run(face_parquet, tmp_path / "heads", protocol="ablation", seeds=1, epochs=1, test_fraction=0.4,
                  variants=["full", "+gender", "+gender+ethnicity"])
    rows = {r["group"]: r for r in summary["rows"]}
    assert summary["completed"] == 3 and rows["full"]["gender_acc"] is None
    assert rows["+gender"]["parameters"] == rows["full"]["parameters"] + 74  # a 36 -> 2 linear head
    assert rows["+gender+ethnicity"]["parameters"] == rows["full"]["parameters"] + 74 + 185
    for group in ("+gender", "+gender+ethnicity"):
        assert 0 <= rows[group]["gender_acc"] <= 1 and summary["groups"][group]["gender_acc"] == rows[group]["gender_acc"]
    with open(tmp_path / "heads" / "predictions.csv") as file:
        predictions = list(csv.DictReader(file))
    by_group = {g: [p for p in predictions if p["group"] == g] for g in rows}
    assert all(p["p_female"] == "" for p in by_group["full"]) and all(0 <= float(p["p_female"]) <= 1 for p in by_group["+gender"])
    known = [p for p in by_group["+gender"] if p["gender"]]
    right = sum((float(p["p_female"]) >= 0.5) == (p["gender"] == "female") for p in known) / len(known)
    assert rows["+gender"]["gender_acc"] == pytest.approx(right, abs=1e-4)
    report = (tmp_path / "heads" / "report.md").read_text()
    assert f"| {rows['+gender']['gender_acc']:.3f} |" in report


def test_aligned_rows_train_on_the_aligned_preprocessing_of_the_same_images(fgnet_parquet, tmp_path):
    """`c3ae preprocess --align` over the fixture's images, then the ablation's full and aligned rows: one split,
    the same images, and the aligned row really reads the aligned regions (same seed and order, other answers)."""
    from c3ae_ray.cli import main

    aligned = tmp_path / "aligned-faces"
    assert main(["preprocess", "--dataset", "fgnet", "--root", str(fgnet_parquet.parent / "fgnet"), "--out", str(aligned),
                 "--detectors", "1", "--align"]) == 0
    with pytest.raises(ValueError, match="preprocessed without --align"):
        run(fgnet_parquet, tmp_path / "refused", protocol="ablation", variants=["aligned"], aligned_data=str(fgnet_parquet))
    summary = run(fgnet_parquet, tmp_path / "aligned", protocol="ablation", seeds=1, epochs=1, test_fraction=0.3,
                  variants=["full", "aligned"], aligned_data=str(aligned))
    rows = {r["group"]: r for r in summary["rows"]}
    assert summary["completed"] == 2 and summary["aligned_data"] == str(aligned)
    assert summary["images"] == faces_of(fgnet_parquet) == faces_of(aligned)  # MTCNN found the same faces both times
    assert rows["full"]["test_subjects"] == rows["aligned"]["test_subjects"] and rows["full"]["test_size"] == rows["aligned"]["test_size"]
    with open(tmp_path / "aligned" / "predictions.csv") as file:
        predictions = list(csv.DictReader(file))
    by_group = {g: [(p["path"], float(p["predicted"])) for p in predictions if p["group"] == g] for g in rows}
    assert [path for path, _ in by_group["full"]] == [path for path, _ in by_group["aligned"]]
    assert max(abs(a - b) for (_, a), (_, b) in zip(by_group["full"], by_group["aligned"])) > 1e-3
    assert "aligned, for the aligned rows" in (tmp_path / "aligned" / "report.md").read_text()


def kill_a_trial_while_it_runs(ray_session, data, out, **settings) -> tuple[dict, int]:
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=run(data, out, **settings)))
    thread.start()
    deadline = time.time() + 120
    while not (pid := fixtures.kill_ray_process(ray_session, "ray::ImplicitFunc.train")):
        assert thread.is_alive() and time.time() < deadline, "no trial process appeared"
        time.sleep(0.05)
    thread.join(timeout=300)
    assert "summary" in outcome, "the evaluation did not finish after a trial was killed"
    return outcome["summary"], pid


def test_a_trial_that_keeps_failing_is_reported_failed_and_left_out_of_the_means(ray_session, fgnet_parquet, tmp_path):
    summary, _ = kill_a_trial_while_it_runs(ray_session, fgnet_parquet, tmp_path / "fail", protocol="lopo", epochs=3, max_failures=0)
    assert (summary["trials"], summary["completed"], summary["failed"]) == (4, 3, 1)
    failed = [r for r in summary["rows"] if r["status"] == "failed"]
    assert len(failed) == 1 and "mae" not in failed[0]
    assert summary["failed_trials"] == [{"name": failed[0]["name"], "error": failed[0]["error"]}]
    assert failed[0]["error"]  # the reason, not an empty cell
    completed = [r["mae"] for r in summary["rows"] if r["status"] == "ok"]
    assert summary["mae_mean"] == pytest.approx(sum(completed) / 3, abs=1e-3)  # not averaged in as zero
    assert summary["test_faces"] == sum(r["test_size"] for r in summary["rows"] if r["status"] == "ok")
    assert f"| {failed[0]['name']} |" in (tmp_path / "fail" / "report.md").read_text()
    assert "FAILED" in (tmp_path / "fail" / "report.md").read_text()


def test_a_killed_trial_is_retried_and_the_report_goes_to_s3(ray_session, fgnet_parquet, s3_server):
    out = "s3://c3ae-test/eval/retry"
    summary, _ = kill_a_trial_while_it_runs(ray_session, fgnet_parquet, out, protocol="lopo", epochs=3, max_failures=1)
    assert (summary["completed"], summary["failed"]) == (4, 0)
    assert sorted(r["retries"] for r in summary["rows"]) == [0, 0, 0, 1]
    filesystem, path = storage.resolve(out)
    names = {info.base_name for info in filesystem.get_file_info(pafs.FileSelector(path))}
    assert names == REPORT_FILES
    assert storage.read_json(filesystem, f"{path}/summary.json")["completed"] == 4


def test_trials_fine_tune_from_the_given_model(fgnet_parquet, tmp_path):
    start = C3AE()
    with torch.no_grad():
        start.w2.bias.fill_(50.0)  # every age 50 years above what the same weights would say: easy to recognise
    save_model(start, tmp_path / "start.pt", crop_config=to_dict(CropConfig()), meta={"val_mae": 1.0})
    summary = run(fgnet_parquet, tmp_path / "tuned", protocol="lopo", epochs=1, lr=1e-7, init_from=str(tmp_path / "start.pt"))
    assert summary["init_from"]["path"] == str(tmp_path / "start.pt") and summary["completed"] == 4
    with open(tmp_path / "tuned" / "predictions.csv") as file:
        predicted = [float(p["predicted"]) for p in csv.DictReader(file)]
    # A fresh model says about 55 for any face (the mean of the bins); one epoch at lr 1e-7 keeps the +50.
    assert len(predicted) == faces_of(fgnet_parquet) and min(predicted) > 85
