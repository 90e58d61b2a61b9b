"""Exports run as their users run them (onnxruntime, torch.jit.load) and agree with PyTorch within 1e-4 years,
for any batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from c3ae_ray.export import AgeAndDistribution, export_model, run_export
from c3ae_ray.model import BUNDLED_MODEL, C3AE, load_model, save_model

@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_match_pytorch_within_1e4_years(fmt, tmp_path):
    out = str(tmp_path / f"model.{fmt}")
    summary = export_model(BUNDLED_MODEL, fmt, out)
    assert summary["max_age_difference"] <= 1e-4 and Path(out).stat().st_size == summary["bytes"] > 10_000
    model, _ = load_model(BUNDLED_MODEL)
    for n in (1, 5, 64):  # the batch axis is free
        crops = np.random.default_rng(n).integers(0, 256, (n, 3, 3, 64, 64), dtype=np.uint8)
        age, distribution = run_export(fmt, out, crops)
        with torch.inference_mode():
            expected_age, expected_distribution = model.eval()(torch.from_numpy(crops))
        assert age.shape == (n,) and distribution.shape == (n, 12)
        assert np.abs(age - expected_age.numpy()).max() <= 1e-4
        assert np.abs(distribution - expected_distribution.numpy()).max() <= 1e-5
        assert np.allclose(distribution.sum(axis=1), 1, atol=1e-5)


def test_a_model_without_the_cascade_has_no_distribution_to_export(tmp_path):
    save_model(C3AE(cascade=False), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="cascade"):
        AgeAndDistribution(load_model(tmp_path / "plain.pt")[0])
