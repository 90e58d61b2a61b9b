"""What the benchmarks share: resident memory of a process tree, sampled while a command runs; a model file."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path


def tree_processes(root_pid: int) -> dict[int, tuple[str, int]]:
    """{pid: (command line, resident bytes)} of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    found: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(int(stat[1]), []).append(int(entry.name))
        found[int(entry.name)] = (title, int(stat[21]) * os.sysconf("SC_PAGE_SIZE"))
    tree, stack = {}, [root_pid]
    while stack:
        pid = stack.pop()
        if pid in found:
            tree[pid] = found[pid]
        stack.extend(children.get(pid, []))
    return tree


def tree_rss(root_pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    return sum(rss for _, rss in tree_processes(root_pid).values())


def run_sampled(command: list[str], every_s: float = 0.5) -> tuple[float, list[tuple[float, int]], str]:
    """Run `command`, sampling its process tree's RSS; -> (seconds, [(t, bytes)], stdout). Exits on failure."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples: list[tuple[float, int]] = []
    done = threading.Event()
    reader = threading.Thread(target=lambda: (setattr(done, "out", process.stdout.read()), done.set()))
    reader.start()
    while not done.wait(every_s):
        samples.append((time.perf_counter() - start, tree_rss(process.pid)))
    process.wait()
    elapsed = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])} failed with exit code {process.returncode}")
    return elapsed, samples, done.out


def model_or_untrained(model: str | None, folder: str) -> str:
    """The given model file, or an untrained full C3AE written into `folder`: speed does not depend on weights."""
    if model:
        return model
    from c3ae_ray.config import to_dict
    from c3ae_ray.crops import CropConfig
    from c3ae_ray.model import C3AE, save_model

    path = f"{folder}/untrained.pt"
    save_model(C3AE().eval(), path, crop_config=to_dict(CropConfig()))
    return path
