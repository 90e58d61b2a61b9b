"""The one Ray Data batch skeleton that preprocessing and scoring share:

    listed items -> read tasks (each file's bytes; a failure becomes the row's error, never a failed block)
      -> an actor pool (`PoolWorker` subclasses: decode, detect, maybe the model) -> Parquet in a staging folder
      -> the stage's counts and summary -> published whole (`storage.publish`)

A rerun into the same --out is refused unless --overwrite, and a crash never leaves files that look complete.
"""

from __future__ import annotations

import contextlib
import logging
import math
import posixpath
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from c3ae_ray import storage
from c3ae_ray.config import UserError
from c3ae_ray.images import DEFAULT_MAX_PIXELS
from c3ae_ray.runtime import cluster_shape, pool_shape, ray_runtime

if TYPE_CHECKING:  # the read tasks run this module without torch: the inference path is imported where used
    from c3ae_ray.inference import ImageFailure

MAX_FILE_BYTES = 256 * 2**20  # a larger file is an error row: no image under the pixel cap needs more
PROGRESS_INTERVAL_S = 10.0  # a batch stage prints a progress line this often


def store_of(location: str) -> tuple[str, str]:
    """'s3://bucket/key' -> ('s3://bucket', 'bucket/key'); a local path -> ('', absolute path)."""
    if "://" not in location:
        return "", str(Path(location).resolve())
    scheme, rest = location.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}", rest


def filesystems_for(locations: list[str]) -> dict[str, pafs.FileSystem]:
    """{store: filesystem} for every store the locations name (read tasks get it pickled)."""
    stores = {store_of(location)[0] for location in locations}
    return {store: storage.resolve(store)[0] if store else pafs.LocalFileSystem() for store in stores}


def read_files(batch: pa.Table, filesystems: dict[str, pafs.FileSystem]) -> pa.Table:
    """Ray Data task: adds `data` (each file's bytes) and sets `error` ("code: detail") where a file cannot be
    read; a row that has an error already is not read. Reads at most MAX_FILE_BYTES + 1 bytes of any file."""
    given = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * len(batch)
    data, errors = [], []
    for location, error in zip(batch.column("path").to_pylist(), given):
        content = None
        if error is None:
            store, path = store_of(location)
            try:
                with filesystems[store].open_input_stream(path) as stream:
                    content = stream.read(MAX_FILE_BYTES + 1)
                if len(content) > MAX_FILE_BYTES:
                    content, error = None, f"too_large: file over {MAX_FILE_BYTES // 2**20} MiB"
            except Exception as failure:  # missing, a folder, no permission, a store error: the row says which
                error = f"read_error: {type(failure).__name__}: {str(failure)[:200]}"
        data.append(content)
        errors.append(error)
    others = [name for name in batch.column_names if name not in ("data", "error")]
    return batch.select(others).append_column("data", pa.array(data, pa.binary())).append_column("error", pa.array(errors, pa.string()))


def decoded_inputs(records: list[dict], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray | ImageFailure]:
    """Read rows -> the inference path's inputs: an image, or the failure the row already carries."""
    from c3ae_ray.inference import ImageFailure, decode_all

    readable = [r for r in records if r["error"] is None]
    decoded = iter(decode_all([r["data"] for r in readable], max_pixels))
    return [ImageFailure(*r["error"].split(": ", 1)) if r["error"] is not None else next(decoded) for r in records]


class Tally:
    """A Ray actor (no CPU) that the pool's workers tell how many inputs they have done: the progress lines."""

    def __init__(self):
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n

    def read(self) -> int:
        return self.done


class PoolWorker:
    """A Ray Data actor of the pool: one torch thread on CPU (the pool is sized by CPUs), and the heap handed
    back every 16 batches (MTCNN fragments it). Subclasses turn a batch of read rows into output rows; each
    batch done is counted on the run's `Tally`."""

    def __init__(self, device: str, tally=None):
        if device == "cpu":
            import torch

            torch.set_num_threads(1)
        self.calls = 0
        self.tally = tally

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        if self.calls % 16 == 0:
            from c3ae_ray.inference import release_free_memory

            release_free_memory()
        rows = self.rows(batch.to_pylist())
        if self.tally is not None:
            self.tally.add.remote(len(batch))  # fire and forget: a lost count only slows the progress line
        return rows

    def rows(self, records: list[dict]) -> pa.Table:
        raise NotImplementedError


@dataclass(frozen=True)
class BatchJob:
    """What one batch stage runs: its items through read tasks and a pool of `worker` actors, into Parquet."""

    items: list[dict]  # one per input, with its "path" (a location) and an optional "error"
    worker: type  # a PoolWorker; built with worker_kwargs and the device the pool runs on
    worker_kwargs: dict
    out: str
    overwrite: bool
    device: str  # auto, cpu or cuda
    actors: int | None  # pool size; default from the cluster's CPUs or GPUs
    batch_size: int
    folder: str = ""  # where the Parquet goes inside the output
    partition_cols: list[str] | None = None
    filesystems: dict = field(default_factory=dict)  # {store: filesystem} the items' paths are read from
    name: str = "batch"  # the stage, as its progress lines name it
    progress_s: float = PROGRESS_INTERVAL_S  # seconds between progress lines (0: none)


def progress_line(name: str, done: int, total: int, seconds: float) -> str:
    """`preprocess: 3,200 of 21,692 images (15%), 95.1 images/s, about 3 min left`."""
    done = min(done, total)  # a batch retried after a lost actor counts twice
    rate = done / seconds if seconds > 0 else 0.0
    left = (total - done) / rate if rate > 0 else None
    eta = "" if left is None else f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"
    return f"{name}: {done:,} of {total:,} images ({100 * done / max(total, 1):.0f}%), {rate:.1f} images/s{eta}"


@contextlib.contextmanager
def progress_lines(name: str, total: int, tally, interval_s: float):
    """While the block runs: every `interval_s` seconds, a `progress_line` from the tally (none with 0).

    The reporter is joined on the way out: a Ray call from it after the stage's `ray.shutdown()` would make
    Ray end the whole process (a pipeline's next stage never ran)."""
    import ray

    stop, started = threading.Event(), time.perf_counter()

    def report():
        while not stop.wait(interval_s):
            try:
                done = ray.get(tally.read.remote(), timeout=5.0)
            except Exception:  # nosec B112: a busy or restarting cluster skips one progress line, never the run
                continue
            print(progress_line(name, done, total, time.perf_counter() - started), flush=True)

    thread = threading.Thread(target=report, name=f"{name}-progress", daemon=True)
    if interval_s > 0:
        thread.start()
    try:
        yield thread
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()


def run_batch(job: BatchJob, summarize: Callable[[pafs.FileSystem, str, dict], dict]) -> dict:
    """Run the job into a staging folder; `summarize(filesystem, staging, run)` reads what was written (run:
    device, actors, pipeline_s) and returns the summary, which is published with the output. -> the summary."""
    import ray
    from ray.data import ActorPoolStrategy

    filesystem, out = storage.resolve(job.out)
    storage.check_writable(filesystem, out, job.overwrite)
    staging = storage.staging_path(out)
    try:
        with ray_runtime():
            # The stage's own progress lines instead of Ray Data's bars and INFO lines (warnings still show)
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            # Ray Data retries a failed write 10 times, up to 32 s apart, on a store that is not there (network
            # errors), after the S3 client's own retries: a run stalled for many minutes. Only throttling is
            # retried here: a store gone is a StorageError within about a minute, and the user reruns.
            context.retried_io_errors = [error for error in context.retried_io_errors if "SLOW_DOWN" in error]
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            device, actors, cpus, gpus = pool_shape(cluster_shape(), job.device, job.actors)
            blocks = min(len(job.items), max(8 * actors, math.ceil(len(job.items) / 1000)))
            tally = ray.remote(num_cpus=0)(Tally).remote()
            started = time.perf_counter()
            rows = (
                ray.data.from_items(job.items, override_num_blocks=blocks)
                .map_batches(read_files, fn_kwargs={"filesystems": job.filesystems}, batch_size=job.batch_size, batch_format="pyarrow")
                .map_batches(
                    job.worker,
                    fn_constructor_kwargs={**job.worker_kwargs, "device": device, "tally": tally},
                    batch_size=job.batch_size,
                    batch_format="pyarrow",
                    compute=ActorPoolStrategy(size=actors),
                    num_cpus=cpus,
                    num_gpus=gpus,
                )
            )
            # A refused write is the store's (said in one line below): not Ray Data's error log with its traceback
            # (the level is put back on the way out)
            logging.getLogger("ray.data").setLevel(logging.CRITICAL)
            with progress_lines(job.name, len(job.items), tally, job.progress_s):
                rows.write_parquet(posixpath.join(staging, job.folder), filesystem=filesystem, partition_cols=job.partition_cols)
            run = {"device": device, "actors": actors, "pipeline_s": round(time.perf_counter() - started, 2)}
        summary = summarize(filesystem, staging, run)
        storage.publish(filesystem, staging, out, summary, job.overwrite)
        return summary
    except OSError as error:  # a full or read-only disk, an object store gone (a Ray task's OSError too)
        if isinstance(error, UserError):  # ours already (an output that appeared meanwhile, say)
            raise
        raise storage.refused_write(job.out, error) from error
    finally:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        with contextlib.suppress(OSError):  # a store still refusing keeps the staging folder, which looks incomplete
            storage.delete_tree(filesystem, staging)


def status_counts(filesystem: pafs.FileSystem, folder: str, error_status: str, columns: tuple[str, ...] = (),
                  partitioning: str | None = None) -> tuple[Counter, dict, pa.Table]:
    """From the written Parquet (small columns only): rows per status, the `error_status` rows per code (their
    reason's text before ':'), and the table of status, reason and `columns`."""
    import pyarrow.dataset as pads

    data = pads.dataset(folder, filesystem=filesystem, format="parquet", partitioning=partitioning)
    table = data.to_table(columns=["status", "reason", *columns])
    statuses = table.column("status").to_pylist()
    codes = Counter(reason.split(":", 1)[0] for status, reason in zip(statuses, table.column("reason").to_pylist()) if status == error_status)
    return Counter(statuses), dict(codes), table
