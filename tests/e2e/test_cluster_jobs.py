"""The pipeline as a Ray job on a real two-node cluster, started on loopback the way a user starts one:
`ray start --head` and `ray start --address` with their own CPUs and temp dirs, token authentication on,
then `ray job submit` exactly as the README writes it. A job stopped mid-way and resubmitted under the same
submission id resumes: complete steps are skipped."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests import fixtures

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
JOB_ID = "c3ae-pipeline-test"


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:PORT: the job and state API
    env: dict  # what a user exports: the token settings
    base: Path

    def ray(self, *args, timeout=120, check=True) -> subprocess.CompletedProcess:
        result = subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT)
        if check:
            assert result.returncode == 0, f"ray {' '.join(args)}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
        return result

    def listed(self, kind: str, *filters: str) -> list[dict]:
        args = ["list", kind, "--address", self.dashboard, "--format", "json", "--detail", "--limit", "10000"]
        for item in filters:
            args += ["--filter", item]
        printed = self.ray(*args).stdout
        return [] if printed.startswith("No resource") else json.loads(printed)


def _node_command(base: Path, name: str, head_address: str | None, gcs_port: int, workers: range) -> list[str]:
    """`ray start --block` for one node with its own temp dir and ports (another Ray may run on this machine)."""
    ports = {
        "--node-manager-port": fixtures.free_port(),
        "--object-manager-port": fixtures.free_port(),
        "--metrics-export-port": fixtures.free_port(),
        "--dashboard-agent-listen-port": fixtures.free_port(),
        "--dashboard-agent-grpc-port": fixtures.free_port(),
        "--runtime-env-agent-port": fixtures.free_port(),
        "--min-worker-port": workers.start,
        "--max-worker-port": workers.stop - 1,
    }
    command = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
               "--object-store-memory=200000000", f"--temp-dir={base / name}", "--disable-usage-stats"]
    command += [f"{flag}={port}" for flag, port in ports.items()]
    if head_address is None:
        command += ["--head", f"--port={gcs_port}", "--ray-client-server-port", str(fixtures.free_port())]
    else:
        command += [f"--address={head_address}"]
    return command


def _teardown(processes: list[subprocess.Popen], base: Path) -> None:
    """SIGTERM each node's process group (`ray start --block` stops its node), SIGKILL what is left, then any
    process that still names this cluster's temp dir."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(base).encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def _wait(condition, what: str, seconds: float, interval: float = 1.0):
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        time.sleep(interval)


@pytest.fixture(scope="module")
def cluster():
    # A short folder: Ray's socket paths under the temp dir must stay within 107 bytes (pytest's are too long).
    base = Path(tempfile.mkdtemp(prefix="c3ae-cluster-", dir="/tmp"))
    token = base / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # A user's shell: the virtual environment active (the job's `python` is this one), the token exported.
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    gcs, dashboard = fixtures.free_port(), fixtures.free_port()
    # On SIGTERM a node drains for up to 30 s (Ray's default, for Kubernetes upgrades) before it stops: a test
    # cluster with nothing left to drain stops at once.
    node_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    processes = []
    try:
        head = _node_command(base, "head", None, gcs, range(20000, 20500)) + [f"--dashboard-port={dashboard}"]
        with open(base / "head.log", "w") as log:
            processes.append(subprocess.Popen(head, stdout=log, stderr=subprocess.STDOUT, env=node_env, start_new_session=True))
        url = f"http://127.0.0.1:{dashboard}"
        _wait(lambda: _status(url, token.read_text()) == 200, "the head's dashboard answered", 120)
        worker = _node_command(base, "worker", f"127.0.0.1:{gcs}", gcs, range(20500, 21000))
        with open(base / "worker.log", "w") as log:
            processes.append(subprocess.Popen(worker, stdout=log, stderr=subprocess.STDOUT, env=node_env, start_new_session=True))
        running = Cluster(url, env, base)
        _wait(lambda: len([n for n in running.listed("nodes") if n["state"] == "ALIVE"]) == 2, "two nodes alive", 120, 2)
        yield running
    finally:
        _teardown(processes, base)
        shutil.rmtree(base, ignore_errors=True)


def _status(url: str, token: str | None) -> int | None:
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _pipeline_config(base: Path, utk: Path) -> Path:
    """A tiny pipeline over fixtures in the three layouts: pretrain on a wiki.mat, fine-tune on UTKFace,
    evaluate on FG-NET names; 2 training workers (spread over the nodes), one epoch each."""
    fixtures.make_wiki(base / "wiki", utk, n=24)
    fixtures.make_utkface(base / "utk", utk, n=24)
    fixtures.make_fgnet(base / "fgnet", utk, subjects=3, per_subject=4)
    train = {"epochs": 1, "workers": 2, "batch_size": 8, "val_fraction": 0.3}
    config = {
        "out": str(base / "pipeline"),
        "pretrain": {"data": {"dataset": "wiki", "root": str(base / "wiki" / "wiki_crop")}, "train": train},
        "finetune": {"data": {"dataset": "utkface", "root": str(base / "utk")}, "train": train},
        "evaluate": {
            "data": {"dataset": "fgnet", "root": str(base / "fgnet" / "images")},
            "evaluate": {"protocol": "splits", "repeats": 1, "test_size": 3, "epochs": 1, "batch_size": 8},
        },
    }
    path = base / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _submit(cluster: Cluster, config: Path, *extra: str, timeout=900) -> subprocess.CompletedProcess:
    """The README's command: ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/pipeline.py."""
    return cluster.ray(
        "job", "submit", "--address", cluster.dashboard, "--submission-id", JOB_ID, *extra,
        "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml",
        "--", "python", "jobs/pipeline.py", "--config", str(config), timeout=timeout,
    )


def _job_status(cluster: Cluster) -> str:
    return cluster.listed("jobs", f"submission_id={JOB_ID}")[0]["status"]


@pytest.mark.slow
def test_the_pipeline_job_runs_on_both_nodes_and_resumes_when_resubmitted(cluster, shared_data):
    base = cluster.base
    config = _pipeline_config(base, shared_data / "utkface")
    out = base / "pipeline"
    assert _status(cluster.dashboard, None) == 401, "token authentication is off"

    # First submission: stopped once the first step (IMDB-WIKI preprocessing) is complete.
    _submit(cluster, config, "--no-wait")
    _wait(lambda: (out / "data" / "wiki" / "summary.json").is_file() or _job_status(cluster) in ("FAILED", "STOPPED", "SUCCEEDED"),
          "the first step done", 600)
    assert (out / "data" / "wiki" / "summary.json").is_file(), cluster.ray("job", "logs", "--address", cluster.dashboard, JOB_ID).stdout[-3000:]
    cluster.ray("job", "stop", "--address", cluster.dashboard, JOB_ID)
    assert _wait(lambda: _job_status(cluster) in ("STOPPED", "SUCCEEDED"), "the job stopped", 120) and _job_status(cluster) == "STOPPED"
    assert not (out / "pipeline.json").exists()

    # Resubmitted under the same id (Ray keeps one job per id: delete the stopped one first), followed to the end.
    cluster.ray("job", "delete", "--address", cluster.dashboard, JOB_ID)
    run = _submit(cluster, config)
    logs = run.stdout + run.stderr
    assert _job_status(cluster) == "SUCCEEDED", logs[-4000:]
    assert f"[1/6] preprocess wiki: complete in {out / 'data' / 'wiki'}, skipped" in logs
    for step in ("[2/6] pretrain: running", "[4/6] finetune: running", "[6/6] evaluate splits: running"):
        assert step in logs, logs[-4000:]

    summary = json.loads((out / "pipeline.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [
        "preprocess wiki", "pretrain", "preprocess utkface", "finetune", "preprocess fgnet", "evaluate splits"]
    assert [s["status"] for s in summary["steps"]] == ["skipped"] + ["ran"] * 5
    for folder in ("data/wiki", "data/utkface", "data/fgnet", "runs/pretrain", "runs/finetune", "eval/splits"):
        assert (out / folder / "summary.json").is_file(), folder
    finetune = json.loads((out / "runs" / "finetune" / "summary.json").read_text())
    assert finetune["config"]["init_from"] == str(out / "runs" / "pretrain" / "model.pt")
    evaluation = json.loads((out / "eval" / "splits" / "summary.json").read_text())
    assert evaluation["completed"] == 1 and evaluation["config"]["init_from"] == str(out / "runs" / "pretrain" / "model.pt")
    assert (out / "model.pt").read_bytes() == (out / "runs" / "finetune" / "model.pt").read_bytes()

    # Each node's own logs show the actors it ran: the SPREAD training workers on both, detectors somewhere.
    # (The state API forgets a finished job's actors, so the nodes' worker logs are the record.)
    head, worker = _actors_run_on(base / "head"), _actors_run_on(base / "worker")
    assert "RayTrainWorker" in head and "RayTrainWorker" in worker, (head, worker)
    assert any("RegionMaker" in name for name in head | worker), (head, worker)


def _actors_run_on(node_dir: Path) -> set[str]:
    """Class names of the actors whose worker processes a node started: Ray writes ':actor_name:NAME' into
    each worker's log file in that node's session folder."""
    names = set()
    for log in node_dir.glob("session_*/logs/worker-*"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(":actor_name:"):
                names.add(line[len(":actor_name:"):])
    return names
