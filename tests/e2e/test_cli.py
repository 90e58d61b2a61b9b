"""The `c3ae` command as a user types it."""

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

import c3ae_ray
from c3ae_ray.cli import build_parser

C3AE = str(Path(sys.executable).with_name("c3ae"))


def run(*args):
    return subprocess.run([C3AE, *args], capture_output=True, text=True, timeout=120)


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"c3ae {c3ae_ray.__version__}"


def test_help_lists_only_working_commands():
    result = run("--help")
    assert result.returncode == 0
    listed = re.findall(r"^    (\w+)\s", result.stdout, flags=re.M)
    assert listed == ["summary", "preprocess", "train", "tune", "evaluate", "ablate", "score", "predict", "export", "calibrate", "pipeline", "serve"]
    parser = build_parser()  # each command's own help, parsed as the `c3ae` entry point parses it (one process)
    for command in listed:
        with pytest.raises(SystemExit) as exit_status, contextlib.redirect_stdout(io.StringIO()) as printed:
            parser.parse_args([command, "--help"])
        assert exit_status.value.code == 0 and f"usage: c3ae {command}" in printed.getvalue(), command


def test_summary_prints_every_variant_with_counts_and_file_size():
    result = run("summary")
    assert result.returncode == 0, result.stderr
    for variant in ("full", "plain", "no-context", "no-cascade", "no-se"):
        assert f"== {variant} (" in result.stdout
    totals = [int(t.replace(",", "")) for t in re.findall(r"total trainable parameters: ([\d,]+)", result.stdout)]
    assert totals[:2] == [39_781, 36_565]
    assert "trunk.feat" in result.stdout and "6,156" in result.stdout
    sizes = [int(s.replace(",", "")) for s in re.findall(r"saved model file: ([\d,]+) bytes", result.stdout)]
    assert len(sizes) == 5 and all(size < 250_000 for size in sizes)


def test_unknown_command_and_missing_command_fail_with_a_message():
    for args in ([], ["frobnicate"]):
        result = run(*args)
        assert result.returncode == 2
        assert "usage: c3ae" in result.stderr and "error:" in result.stderr


def test_pipeline_config_errors_are_one_line_before_any_work(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("out: [unclosed\n")
    leaking = tmp_path / "leaking.yaml"
    leaking.write_text(
        f"out: {tmp_path / 'run'}\n"
        "finetune: {data: {dataset: fgnet, root: /x}}\n"
        "evaluate: {data: {dataset: fgnet, root: /x}, init_from: finetune}\n"
    )
    for config, message in ((tmp_path / "missing.yaml", "does not exist"), (broken, "not valid YAML"), (leaking, "trained on")):
        result = run("pipeline", "--config", str(config))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith("c3ae pipeline: error:") and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
