"""`c3ae train` as a user types it: a run killed mid-way resumes when the same command is run again,
a finished run is not overwritten by accident, and bad inputs are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

C3AE = str(Path(sys.executable).with_name("c3ae"))


def train(*args, timeout=600):
    return subprocess.run([C3AE, "train", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_a_killed_run_resumes_when_the_same_command_is_run_again(face_parquet, tmp_path):
    out = tmp_path / "run"
    command = ["--data", face_parquet, "--out", out, "--epochs", 4, "--seed", 3]
    process = subprocess.Popen(
        [C3AE, "train", *map(str, command)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "epoch_002" / "state.pt").is_file():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no second checkpoint within 300 s"
            time.sleep(0.2)
        time.sleep(1.0)  # let Ray Train commit it
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (out / "summary.json").exists() and not (out / "model.pt").exists()

    again = train(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.startswith(f"resuming {out}")
    assert "trained " in again.stdout and "val MAE" in again.stdout and "model.pt" in again.stdout
    printed = again.stdout + again.stderr  # the epoch lines say each report once; Ray's INFO chatter stays out
    assert printed.count("epoch 4/4: train loss") == 1
    assert "Reporting training result" not in printed and "Execution plan of Dataset" not in printed
    history = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    first = [r["epoch"] for r in history if r["attempt"] == 1]
    assert first[:1] == [1] and [r["epoch"] for r in history if r["attempt"] == 2] == list(range(first[-1] + 1, 5))
    assert json.loads((out / "summary.json").read_text())["attempts"] == 2

    finished = train(*command)
    assert finished.returncode == 1
    assert "finished training run" in finished.stderr and "--overwrite" in finished.stderr and "Traceback" not in finished.stderr


def test_bad_inputs_are_one_line_errors(face_parquet, tmp_path):
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.parquet").write_bytes(b"PAR1")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    cases = {
        "does not exist": ["--data", tmp_path / "nowhere", "--out", tmp_path / "o1"],
        "no summary.json": ["--data", tmp_path / "loose", "--out", tmp_path / "o2"],
        "not a C3AE model file": ["--data", face_parquet, "--out", tmp_path / "o3", "--init-from", tmp_path / "junk.pt"],
        "--out is required": ["--data", face_parquet],
        "lr must be positive": ["--data", face_parquet, "--out", tmp_path / "o4", "--lr", "-1"],
    }
    for message, args in cases.items():
        result = train(*args, timeout=120)
        assert result.returncode == 1, (message, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4"))
