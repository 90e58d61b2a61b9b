"""`c3ae tune` as a user types it: a search killed (the driver and its Ray) after its first trial ended resumes
when the same command runs again, without training that trial again; bad spaces are one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

C3AE = str(Path(sys.executable).with_name("c3ae"))


def test_a_killed_search_resumes_without_training_its_ended_trials_again(face_parquet, tmp_path):
    (tmp_path / "space.yaml").write_text("lr: {loguniform: [0.001, 0.01]}\nmodel.dropout_head: {uniform: [0.0, 0.3]}\n")
    command = [C3AE, "tune", "--data", str(face_parquet), "--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path / "search"),
               "--trials", "2", "--epochs", "2", "--trial-cpus", "2"]  # one trial at a time
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        for line in process.stdout:
            if first := re.match(r"\[1/2 ended: .*\] (trial \d) \(.*\): val MAE ([\d.]+) at epoch", line):
                break
        else:
            raise AssertionError("the search ended before its first trial did")
        time.sleep(3)  # the search's state is saved every 2 s
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (tmp_path / "search" / "summary.json").exists()

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout and f"] {first[1]} (" not in again.stdout  # not trained again
    chatter = again.stdout + again.stderr  # no line per checkpoint from Ray, no warning from our trials
    assert "Checkpoint successfully created" not in chatter and "UserWarning" not in chatter, chatter[-3000:]
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["failed"] == 0
    assert f"| {first[1]} |" in again.stdout and "best recipe:" in again.stdout
    assert yaml.safe_load((tmp_path / "search" / "best.yaml").read_text())["data"] == str(face_parquet)

    for space, message in (("lr: {uniform: [0.01, 0.001]}", "space: lr: uniform needs low < high"),
                           ("learning_rate: {uniform: [0.001, 0.01]}", "unknown space setting(s): learning_rate")):
        (tmp_path / "bad.yaml").write_text(space)
        bad = subprocess.run([C3AE, "tune", "--data", str(face_parquet), "--space", str(tmp_path / "bad.yaml"),
                              "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300)
        assert bad.returncode == 1 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert not (tmp_path / "bad").exists()
