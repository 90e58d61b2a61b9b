"""Exports run as their users run them (onnxruntime, torch.jit.load) and agree with PyTorch within 1e-4 years,
for any batch size; a model with a gender head exports p_female too, never its ethnicity head; an ensemble exports
as one graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from c3ae_ray.export import Exported, export_model, run_export
from c3ae_ray.model import BUNDLED_MODEL, C3AE, load_model, save_model


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("which", ["bundled", "age-only", "ensemble"])
def test_exports_match_pytorch_within_5e4_years(fmt, which, ensemble_file, tmp_path):
    source = {"bundled": BUNDLED_MODEL, "age-only": tmp_path / "age-only.pt", "ensemble": ensemble_file}[which]
    if which == "age-only":
        save_model(C3AE(), source)
    out = str(tmp_path / f"model.{fmt}")
    summary = export_model(source, fmt, out)
    # the bundled model and the ensemble (3 members in one graph) have an age range and a gender head
    outputs = ["age", "distribution"] + ["age_low", "age_high", "p_female"] * (which != "age-only")
    assert summary["outputs"] == outputs
    assert summary["max_age_difference"] <= 5e-4 and Path(out).stat().st_size == summary["bytes"] > 10_000
    model, _ = load_model(source)
    for n in (1, 5, 64):  # the batch axis is free
        crops = np.random.default_rng(n).integers(0, 256, (n, 3, 3, 64, 64), dtype=np.uint8)
        exported = run_export(fmt, out, crops, outputs)
        with torch.inference_mode():
            expected = model.eval()(torch.from_numpy(crops))
        assert exported["age"].shape == (n,) and exported["distribution"].shape == (n, 12)
        # random pixels drive ages to 60-75, where float32 steps are 8e-6 years, and the runtimes' summation order
        # moves each bin's probability by about 1e-6 (bins up to 110 years): a few dozen steps
        assert np.abs(exported["age"] - expected.age.numpy()).max() <= 5e-4
        assert np.abs(exported["distribution"] - expected.distribution.numpy()).max() <= 1e-5
        assert np.allclose(exported["distribution"].sum(axis=1), 1, atol=1e-5)
        if which != "age-only":
            p_female = exported["p_female"]
            assert p_female.shape == (n,) and ((0 <= p_female) & (p_female <= 1)).all()
            assert np.abs(p_female - expected.p_female().numpy()).max() <= 1e-5


def test_a_model_without_the_cascade_has_no_distribution_to_export(tmp_path):
    save_model(C3AE(cascade=False), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="cascade"):
        Exported(load_model(tmp_path / "plain.pt")[0])
