"""`c3ae score` as a user types it: a file list in, a summary of counts out, clear errors before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

C3AE = str(Path(sys.executable).with_name("c3ae"))


def score(*args, timeout=300):
    return subprocess.run([C3AE, "score", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_file_list_end_to_end(shared_data, ensemble_file, tmp_path):
    """With an ensemble file (one model file of three members; single models score in the integration tests)."""
    faces = shared_data / "faces"
    listing = tmp_path / "images.txt"
    listing.write_text(f"{faces / 'multiface.jpg'}\n{faces / 'no-faces.jpg'}\n# a comment\n{tmp_path / 'gone.jpg'}\n")
    out = tmp_path / "scores"
    result = score("--input", listing, "--out", out, "--model", ensemble_file, "--actors", "1", "--max-faces", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scored 3 images" in result.stdout
    assert "faces 4 in 1 images, no_face 1, errors 1" in result.stdout
    assert "errors by reason: {'read_error': 1}" in result.stdout and "images/s" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["max_faces"] == 4 and summary["model"]["sha256"]
    rows = pq.read_table(out / "predictions").to_pylist()
    assert sorted(r["n_faces"] for r in rows if r["status"] == "face") == [6, 6, 6, 6]
    assert all(r["age_low"] < r["age"] < r["age_high"] and r["gender"] for r in rows if r["status"] == "face")


def test_bad_arguments_fail_fast_with_a_message(model_file, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jpg").write_bytes(b"x")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    for args, message in [
        (("--input", tmp_path / "in", "--model", junk), "not a C3AE model file"),
        (("--input", tmp_path / "in", "--model", tmp_path / "absent.pt"), "does not exist"),
        (("--input", tmp_path / "nowhere", "--model", model_file), "does not exist"),
    ]:
        result = score(*args, "--out", tmp_path / "o", timeout=60)
        assert result.returncode == 1, result.stderr[-2000:]
        assert result.stderr.startswith("c3ae score: error: ") and message in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
