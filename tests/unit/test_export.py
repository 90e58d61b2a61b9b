"""Exports run as their users run them (onnxruntime, torch.jit.load) and agree with PyTorch within 1e-4 years,
for any batch size; `c3ae export` writes them from the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from c3ae_ray.export import AgeAndDistribution, export_model, run_export
from c3ae_ray.model import BUNDLED_MODEL, C3AE, load_model, save_model

C3AE_BIN = str(Path(sys.executable).with_name("c3ae"))


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


def test_export_command(tmp_path):
    done = subprocess.run([C3AE_BIN, "export", "--model", str(BUNDLED_MODEL), "--format", "torchscript", "--out",
                           str(tmp_path / "m.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torchscript" in done.stdout and "differ by at most" in done.stdout and (tmp_path / "m.pt").is_file()
    bad = subprocess.run([C3AE_BIN, "export", "--model", str(tmp_path / "absent.pt"), "--format", "onnx", "--out",
                          str(tmp_path / "x.onnx")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("c3ae export: error:") and "Traceback" not in bad.stderr
