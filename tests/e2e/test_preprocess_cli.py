"""`c3ae preprocess` as a user types it: its own local Ray, a summary on stdout, clear errors, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests import fixtures
from tests.bad_files import write_bad_files

C3AE = str(Path(sys.executable).with_name("c3ae"))


def preprocess(*args, timeout=300):
    return subprocess.run([C3AE, "preprocess", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_fgnet_end_to_end_then_a_rerun_is_refused(shared_data, tmp_path):
    built = fixtures.make_fgnet(tmp_path / "fgnet", shared_data / "utkface", subjects=2, per_subject=3)
    out = tmp_path / "out"
    result = preprocess("--dataset", "fgnet", "--root", built["root"], "--out", out, "--detectors", "1", "--progress-interval", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "preprocess: " in result.stdout and " of 6 images (" in result.stdout  # progress lines while it runs
    assert "Starting execution of Dataset" not in result.stdout + result.stderr  # not Ray Data's own INFO lines
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seen"] == 6 and summary["skipped_by_reader"] == {"bad_name": 2}
    assert f"seen 6, kept {summary['kept']}," in result.stdout
    assert "images/s" in result.stdout and "bytes per face row" in result.stdout
    again = preprocess("--dataset", "fgnet", "--root", built["root"], "--out", out)
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert json.loads((out / "summary.json").read_text()) == summary  # untouched


def test_a_dataset_with_no_usable_image_is_a_clear_error(shared_data, tmp_path):
    write_bad_files(tmp_path / "bad", (shared_data / "faces" / "ivan.jpg").read_bytes())
    result = preprocess("--dataset", "folder", "--root", tmp_path / "bad", "--out", tmp_path / "out", "--detectors", "1")
    assert result.returncode == 1
    assert "no usable image" in result.stderr and "unreadable 5" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    missing = preprocess("--dataset", "utkface", "--root", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert missing.returncode == 1 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr


def test_a_killed_run_leaves_nothing_that_looks_complete(shared_data, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        [C3AE, "preprocess", "--dataset", "utkface", "--root", str(shared_data / "utkface"), "--out", str(out),
         "--limit", "3000", "--detectors", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("out.partial-*/status=kept/*.parquet")):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no Parquet was written within 120 s"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not out.exists()  # only the staging folder, which no reader takes for a dataset
    result = preprocess("--dataset", "fgnet", "--root", fixtures.make_fgnet(tmp_path / "fgnet", shared_data / "utkface",
                        subjects=1, per_subject=2)["root"], "--out", out, "--detectors", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["seen"] == 2
