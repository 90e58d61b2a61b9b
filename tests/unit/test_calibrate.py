"""The age range: conformal multipliers that hold the stated share of true ages on faces the fit never saw, the
same bounds in numpy, torch and the exports, stored in the model file and answered by the one inference path;
a file without a range still loads and answers none."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from c3ae_ray import calibrate
from c3ae_ray.config import UserError
from c3ae_ray.export import Exported, export_model, run_export
from c3ae_ray.inference import AgeModel
from c3ae_ray.model import C3AE, ModelConfig, load_model, save_model

BINS = ModelConfig().bins.numpy()


def synthetic_faces(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(age, distribution, true): distributions of varied sharpness, true ages off by noise that grows with
    the distribution's spread, and a bias towards older true ages (so the two sides need different multipliers)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (n, len(BINS))) * rng.uniform(0.5, 6, (n, 1))
    distribution = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    age = distribution @ BINS
    true = age + calibrate.spread(distribution, BINS) * rng.normal(0.3, 1.0, n)
    return age, distribution, true


@pytest.mark.parametrize("coverage", [0.8, 0.9])
def test_the_fitted_range_holds_its_coverage_on_new_faces(coverage):
    fitted = calibrate.fit(*synthetic_faces(2000, seed=1), BINS, coverage)
    assert all(above > below > 0 for below, above in zip(fitted.below, fitted.above))  # true ages lie above more often
    age, distribution, true = synthetic_faces(4000, seed=2)
    low, high = calibrate.bounds(age, distribution, fitted, BINS)
    inside = (true >= low) & (true <= high)
    assert abs(inside.mean() - coverage) < 0.03
    assert abs((true < low).mean() - (true > high).mean()) < 0.03  # the misses split evenly between the two sides
    assert (low >= 0).all() and (low <= age).all() and (age <= high).all()


def test_each_band_of_predicted_age_holds_the_coverage_where_one_width_would_not():
    """Errors of 1 year for young faces and 6 for old ones (no distribution to tell them apart): one pair of
    multipliers covers every young face and too few old ones; the bands cover each group as stated."""
    rng = np.random.default_rng(3)

    def faces(n):
        age = rng.uniform(0, 80, n)
        return age, age + rng.normal(0, np.where(age < 30, 1.0, 6.0))

    age, true = faces(3000)
    new_age, new_true = faces(6000)
    for edges, young_coverage in ((calibrate.BAND_EDGES, (0.76, 0.84)), ((), (0.97, 1.0))):
        fitted = calibrate.fit(age, None, true, BINS, edges=edges)
        low, high = calibrate.bounds(new_age, None, fitted, BINS)
        inside = (new_true >= low) & (new_true <= high)
        young = new_age < 30
        assert young_coverage[0] <= inside[young].mean() <= young_coverage[1], (edges, inside[young].mean())
        if edges:
            assert abs(inside[~young].mean() - 0.8) < 0.04 and fitted.edges == calibrate.BAND_EDGES
            assert np.allclose((high - new_age)[~young], np.take(fitted.above, calibrate._band(new_age, fitted.edges))[~young])
        else:
            assert inside[~young].mean() < 0.72  # the old faces pay for the young ones


def test_thin_bands_merge_with_a_neighbour():
    age = np.concatenate([np.full(5, 8.0), np.full(100, 25.0), np.full(30, 50.0), np.full(3, 70.0)])
    edges = calibrate._bands(age, calibrate.BAND_EDGES)
    counts = np.bincount(calibrate._band(age, edges))
    assert counts.min() >= calibrate.MIN_FACES and counts.sum() == len(age) and len(edges) == 1, (edges, counts)
    fitted = calibrate.fit(age, None, age + np.random.default_rng(4).normal(0, 2, len(age)), BINS)
    assert len(fitted.below) == len(fitted.edges) + 1 == 2


def test_too_few_faces_is_a_clear_error():
    age, distribution, true = synthetic_faces(calibrate.MIN_FACES - 1, seed=4)
    with pytest.raises(UserError, match=f"at least {calibrate.MIN_FACES} faces"):
        calibrate.fit(age, distribution, true, BINS)


def test_numpy_and_torch_give_the_same_bounds():
    age, distribution, true = synthetic_faces(300, seed=5)
    fitted = calibrate.fit(age, distribution, true, BINS)
    low, high = calibrate.bounds(age, distribution, fitted, BINS)
    as_torch = calibrate.bounds(torch.tensor(age), torch.tensor(distribution), fitted, torch.tensor(BINS, dtype=torch.float64))
    assert np.allclose(low, as_torch[0].numpy()) and np.allclose(high, as_torch[1].numpy())


def model_file(age_range: calibrate.AgeRange | None) -> bytes:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    save_model(C3AE(gender_head=True), buffer, age_range=None if age_range is None else age_range.__dict__)
    return buffer.getvalue()


def test_the_range_travels_in_the_model_file_to_every_answer():
    fitted = calibrate.AgeRange(coverage=0.8, below=(0.5, 0.9), above=(0.7, 1.1), faces=500, edges=(20.0,), check_faces=480, check_coverage=0.79)
    regions = np.random.default_rng(6).integers(0, 256, (4, 128, 128, 3), dtype=np.uint8)
    boxes = np.tile(np.array([[32, 32, 96, 96], [24, 24, 104, 104], [0, 0, 128, 128]], np.float32), (4, 1, 1))
    ranged = AgeModel(model_file(fitted), "cpu")
    assert ranged.age_range == fitted and calibrate.age_range_of(load_model(model_file(fitted))[1]) == fitted
    outputs = ranged.predict(regions, boxes)
    expected = calibrate.bounds(outputs.age, outputs.distribution, fitted, BINS)
    assert np.allclose(outputs.age_low, expected[0], atol=1e-4) and np.allclose(outputs.age_high, expected[1], atol=1e-4)
    assert (outputs.age_low < outputs.age).all() and (outputs.age < outputs.age_high).all()
    plain = AgeModel(model_file(None), "cpu")  # a file from before ranges: same ages, no range
    assert plain.age_range is None
    unranged = plain.predict(regions, boxes)
    assert unranged.age_low is None and unranged.age_high is None and np.allclose(unranged.age, outputs.age)
    with pytest.raises(UserError, match="coverage must be in"):  # a damaged calibration is refused, not answered
        calibrate.age_range_of({"age_range": {"coverage": 1.5, "below": [1], "above": [1], "faces": 9}})


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_answer_the_range_as_pytorch_does(fmt, tmp_path):
    fitted = calibrate.AgeRange(coverage=0.8, below=(0.5, 0.9, 1.2), above=(0.7, 1.1, 1.0), faces=500, edges=(20.0, 45.0))
    source = tmp_path / "ranged.pt"
    source.write_bytes(model_file(fitted))
    out = str(tmp_path / f"model.{fmt}")
    summary = export_model(source, fmt, out)
    assert summary["outputs"] == ["age", "distribution", "age_low", "age_high", "p_female"]
    crops = np.random.default_rng(7).integers(0, 256, (9, 3, 3, 64, 64), dtype=np.uint8)
    exported = run_export(fmt, out, crops, summary["outputs"])
    model, payload = load_model(source)
    with torch.inference_mode():
        expected = Exported(model, calibrate.age_range_of(payload))(torch.from_numpy(crops))
    for name, value in zip(summary["outputs"], expected):
        assert np.abs(exported[name] - value.numpy()).max() <= 2e-4, name
    low, high = calibrate.bounds(exported["age"], exported["distribution"], fitted, BINS)
    assert np.allclose(exported["age_low"], low, atol=2e-4) and np.allclose(exported["age_high"], high, atol=2e-4)


def test_score_rows_and_predict_carry_the_range(shared_data):
    """The batch rows (`score`) and the per-face answers come from the same Estimator: a ranged file fills both."""
    from c3ae_ray.images import decode_image
    from c3ae_ray.inference import Estimator
    from c3ae_ray.score import SCHEMA, answer_rows

    fitted = calibrate.AgeRange(coverage=0.9, below=(1.0,), above=(1.2,), faces=300)
    estimator = Estimator(model_file(fitted), "cpu")
    [answer] = estimator.estimate([decode_image((shared_data / "faces" / "multiface.jpg").read_bytes())])
    rows = answer_rows("multiface.jpg", answer, estimator.age_model.identity)
    assert len(rows) == 6 and all(set(row) == set(SCHEMA.names) for row in rows)
    for row, face in zip(rows, answer.faces):
        assert row["age_low"] == face.age_low < row["age"] < row["age_high"] == face.age_high
