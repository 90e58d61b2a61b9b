"""`c3ae evaluate` as a user types it on a preprocessed FG-NET-layout fixture: the table at the end, a
killed evaluation that keeps its finished trials when the same command runs again, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

C3AE = str(Path(sys.executable).with_name("c3ae"))


def c3ae(*args, timeout=600):
    return subprocess.run([C3AE, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_splits_by_subject_print_the_table(fgnet_parquet, tmp_path):
    done = c3ae("evaluate", "--data", fgnet_parquet, "--protocol", "splits", "--by-subject", "--repeats", 2,
                "--test-size", 4, "--epochs", 2, "--out", tmp_path / "eval")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[2/2 done, 0 failed]" in done.stdout  # progress lines while trials finish
    assert "| splits | 2/2 |" in done.stdout
    trial_rows = re.findall(r"^\| split 0\d \| [^|]+ \| (\d+) \| (\d+) \| (\d+) \|", done.stdout, re.MULTILINE)
    assert len(trial_rows) == 2 and all(overlap == "0" and int(test) >= 4 for _, test, overlap in trial_rows)
    assert f"report: {tmp_path / 'eval'}/report.md" in done.stdout
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["config"]["by_subject"] is True


def test_a_killed_evaluation_keeps_its_finished_trials(fgnet_parquet, tmp_path):
    command = [C3AE, "evaluate", "--data", str(fgnet_parquet), "--protocol", "lopo", "--epochs", "4",
               "--trial-cpus", "2", "--out", str(tmp_path / "lopo")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        for line in process.stdout:
            if first := re.match(r"\[1/4 done, 0 failed\] (subject \d+): MAE ([\d.]+)", line):
                break
        else:
            raise AssertionError("the evaluation ended before its first trial finished")
        time.sleep(3)  # the experiment state is saved every 2 s
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (tmp_path / "lopo" / "summary.json").exists()

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout and f"{first[1]}: MAE" not in again.stdout  # not trained again
    summary = json.loads((tmp_path / "lopo" / "summary.json").read_text())
    assert summary["completed"] == 4
    kept = next(r for r in summary["rows"] if r["name"] == first[1])
    assert f"{kept['mae']:.2f}" == first[2]

    finished = c3ae(*command[1:])
    assert finished.returncode == 1 and "finished evaluation" in finished.stderr and "Traceback" not in finished.stderr


def test_bad_inputs_are_one_line_errors(face_parquet, fgnet_parquet, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    cases = {
        "lopo needs a subject for every face": ["evaluate", "--protocol", "lopo", "--data", face_parquet],
        "does not exist": ["evaluate", "--protocol", "splits", "--data", tmp_path / "nowhere"],
        "leaves no training faces": ["evaluate", "--protocol", "splits", "--data", fgnet_parquet, "--test-size", 100],
        "not a C3AE model file": ["evaluate", "--protocol", "splits", "--data", fgnet_parquet, "--test-size", 4,
                                  "--init-from", tmp_path / "junk.pt"],
        "trial_cpus must be positive": ["ablate", "--data", fgnet_parquet, "--trial-cpus", 0],
        "--trial-gpus 1: the cluster has 0 GPUs": ["ablate", "--data", fgnet_parquet, "--trial-gpus", 1],
    }
    for message, args in cases.items():
        result = c3ae(*args, "--out", tmp_path / "out")
        assert result.returncode == 1, (message, result.stdout, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()
