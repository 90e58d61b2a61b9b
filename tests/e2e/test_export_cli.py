"""`c3ae export` writes an export from the command line, `c3ae calibrate` a model file with an age range; bad
input is a one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from c3ae_ray.model import BUNDLED_MODEL

C3AE_BIN = str(Path(sys.executable).with_name("c3ae"))


def test_export_command(tmp_path):
    done = subprocess.run([C3AE_BIN, "export", "--model", str(BUNDLED_MODEL), "--format", "torchscript", "--out",
                           str(tmp_path / "m.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torchscript" in done.stdout and "differ by at most" in done.stdout and (tmp_path / "m.pt").is_file()
    bad = subprocess.run([C3AE_BIN, "export", "--model", str(tmp_path / "absent.pt"), "--format", "onnx", "--out",
                          str(tmp_path / "x.onnx")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("c3ae export: error:") and "Traceback" not in bad.stderr


def test_calibrate_command_refuses_too_few_faces(face_parquet, tmp_path):
    """The 40-face fixture holds out 4 faces: too few to calibrate on, said in one line, and nothing written."""
    bad = subprocess.run([C3AE_BIN, "calibrate", "--model", str(BUNDLED_MODEL), "--data", str(face_parquet), "--out",
                          str(tmp_path / "c.pt")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("c3ae calibrate: error: calibration needs at least 20 faces")
    assert "Traceback" not in bad.stderr and not (tmp_path / "c.pt").exists()
    wrong = subprocess.run([C3AE_BIN, "calibrate", "--model", str(BUNDLED_MODEL), "--data", str(face_parquet), "--out",
                            str(tmp_path / "c.pt"), "--coverage", "80"], capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 1 and "coverage must be between 0 and 1" in wrong.stderr
