"""`c3ae serve` and `serve run serve/c3ae_cpu.yaml` as a user types them: each starts its own local Ray, answers
over loopback HTTP, and shuts down cleanly on Ctrl-C (SIGINT); bad flags fail before Ray starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

from tests.fixtures import free_port

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def start(command: list[str], env: dict | None = None) -> tuple[subprocess.Popen, list[str]]:
    """The command with its output collected line by line as it comes."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        # Ctrl-C as in a terminal: a suite started in the background (`make test &`, some CI runners) hands its
        # children SIGINT ignored, and Python then never raises KeyboardInterrupt; Ray's `serve run` would not stop.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    return process, lines


def healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=30).status_code == 200
    except requests.RequestException:
        return False


def wait_ready(process: subprocess.Popen, lines: list[str], url: str, ready_line: str | None = None, timeout_s: float = 240) -> None:
    """Until /healthz answers 200 (and the command has said `ready_line`, when it prints one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode}: {''.join(lines)[-3000:]}"
        if (ready_line is None or any(ready_line in line for line in lines)) and healthy(url):
            return
        time.sleep(0.5)
    raise AssertionError(f"not ready within {timeout_s} s: {''.join(lines)[-3000:]}")


def interrupt(process: subprocess.Popen, lines: list[str], timeout_s: float = 90) -> str:
    """Ctrl-C, then the whole output; the process must exit 0 by itself."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        time.sleep(0.5)
        raise AssertionError(f"still running {timeout_s} s after Ctrl-C; its last output:\n{''.join(lines)[-4000:]}")
    time.sleep(0.5)  # the reader thread drains the pipe
    output = "".join(lines)
    assert process.returncode == 0, output[-3000:]
    return output


def port_is_free(port: int) -> bool:
    """Whether a server could listen on it now (SO_REUSEADDR, as servers do: closed connections may linger)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_c3ae_serve_answers_and_stops_cleanly_on_ctrl_c(shared_data, ensemble_file):
    """With an ensemble file (the bundled single model serves in the other tests). Also the calm terminal: after
    the ready banner, 50 requests print a traffic line per interval, not Serve's lines per request (three each at
    INFO, which --log-level INFO brings back)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process, lines = start([str(BIN / "c3ae"), "serve", "--model", str(ensemble_file), "--port", str(port), "--device", "cpu",
                            "--stats-interval", "2"])
    photo = (shared_data / "faces" / "ivan.jpg").read_bytes()
    try:
        wait_ready(process, lines, url, "c3ae serve: ready")
        banner = len(lines)
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(
                lambda _: requests.post(f"{url}/v1/age", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=60).status_code,
                range(49)))
        assert statuses == [200] * 49
        answer = requests.post(f"{url}/v1/age", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["faces"]) == 1
        deadline = time.monotonic() + 30
        while not any("50 since the start (0 failed)" in line for line in lines[banner:]) and time.monotonic() < deadline:
            time.sleep(0.5)
        printed = lines[banner:]
        assert any("50 since the start (0 failed)" in line for line in printed), "".join(printed)
        others = [line for line in printed if not line.startswith("c3ae serve: ")]
        assert len(others) <= 3 and len(printed) <= 20, "".join(printed)  # a stray Ray warning at most; not 150 lines
        [face] = answer.json()["faces"]  # its members have a gender head (and an ethnicity one, never shown)
        assert face["gender"] in ("female", "male") and 0 < face["p_female"] < 1 and "ethnicity" not in face
        assert face["age_low"] < face["age"] < face["age_high"] and answer.json()["model"]["name"] == "ensemble3"
        documented = requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]["/v1/age"]["post"]["responses"]["200"]
        example = documented["content"]["application/json"]["example"]["faces"][0]
        assert {"age", "age_low", "age_high", "gender", "p_female"} <= set(example)
    finally:
        output = interrupt(process, lines)
    assert "c3ae serve: ready" in output and f"{url}/" in output and "c3ae serve: stopped" in output
    assert "Traceback" not in output
    deadline = time.monotonic() + 30  # Ray's worker processes (Serve's proxy among them) end just after
    while not port_is_free(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert port_is_free(port)


def test_serve_run_starts_the_same_app_from_the_cpu_config_with_the_bundled_model(shared_data, tmp_path):
    config = yaml.safe_load((ROOT / "serve" / "c3ae_cpu.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port  # the only change: a free port instead of 8000
    (tmp_path / "c3ae_cpu.yaml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    process, lines = start([str(BIN / "serve"), "run", str(tmp_path / "c3ae_cpu.yaml")], env={"C3AE_MODEL": ""})
    try:
        wait_ready(process, lines, url)
        answer = requests.post(
            f"{url}/v1/age", files={"file": ("multiface.jpg", (shared_data / "faces" / "multiface.jpg").read_bytes(), "image/jpeg")},
            timeout=60,
        )
        assert answer.status_code == 200 and len(answer.json()["faces"]) == 6
        assert answer.json()["model"]["name"] == "c3ae_utkface"  # neither args.model nor $C3AE_MODEL: the bundled one
        bad = requests.post(f"{url}/v1/age", data=b"x" * 100, headers={"Content-Type": "image/png"}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "undecodable"
    finally:
        interrupt(process, lines)


def test_bad_flags_fail_before_ray_starts(tmp_path, model_file):
    missing = subprocess.run(
        [str(BIN / "c3ae"), "serve", "--model", str(tmp_path / "none.pt")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 1 and "c3ae serve: error:" in missing.stderr and "none.pt" in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [str(BIN / "c3ae"), "serve", "--model", str(model_file), "--port", str(port)],
            capture_output=True, text=True, timeout=120,
        )
    assert busy.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    assert "Traceback" not in missing.stderr + busy.stderr
