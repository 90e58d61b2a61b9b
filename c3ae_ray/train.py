"""Training: preprocessed Parquet -> Ray Train (V2) data-parallel workers -> RUN_DIR with model.pt.

Each worker keeps the rows of the split (`faces.in_validation`) and decodes the region JPEGs
(`faces.decode_faces`). A worker whose share fits in memory (`data_cache`) reads it once, straight from the
Parquet files, as uint8 tensors on its device, and feeds every epoch from there in a fresh random order, so
after the first load the cores go to the model; a larger share is streamed by Ray Data and decoded again every
epoch, in a random block order through a local shuffle buffer. `loop.train_epoch` cuts the three 64x64 crops on
the worker's device (random box shift, rotation, flip, colour, erasing in one batched pass).

RUN_DIR (a local path or s3://...):

    config.json            the effective config, written when the run starts; a rerun must match it
    checkpoints/epoch_NNN/ Ray Train checkpoints: every epoch reported, the latest and the best kept
    metrics.csv, .json     one row per epoch: loss parts, validation MAE and CA(3/5/7) (and gender accuracy),
                           lr, samples/s, epoch and data-loading seconds
    curves.png             loss and MAE per epoch
    model.pt               the best epoch's weights (by validation MAE) with their configs and metrics
    summary.json           written last: the run is complete

With `members` N > 1 (an ensemble) RUN_DIR holds member_1 ... member_N, each such a run folder (seeds seed to
seed + N - 1), and beside them config.json, model.pt (all members in one file, averaged as one model) and
summary.json (each member's validation MAE and the ensemble's).

Rerunning the same command on an unfinished RUN_DIR resumes from its latest checkpoint (Train V2 finds the
run by its name and storage path); a failed worker is restarted from it too (FailureConfig).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from c3ae_ray import __version__, calibrate, plots, storage
from c3ae_ray.augment import AugmentConfig
from c3ae_ray.config import UserError, build, check, to_dict
from c3ae_ray.crops import N_SCALES, CropConfig
from c3ae_ray.faces import FaceData, decode_faces, open_faces, read_faces
from c3ae_ray.inference import predict_stored
from c3ae_ray.loop import LR_SCHEDULES, batches_of, build_training, step_schedule, train_epoch, unwrap, validate
from c3ae_ray.metrics import age_metrics, gender_metrics
from c3ae_ray.model import HEADS, C3AE, Ensemble, ModelConfig, load_model, save_model
from c3ae_ray.runtime import cluster_shape, cpus_per_worker, ray_runtime

logger = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"  # Ray Train's run name: RUN_DIR/checkpoints/
STATE_FILE = "state.pt"
# Settings a resumed run may change: where and how wide it runs, how long, and whether to start over.
RESUMABLE_CHANGES = {"workers", "gpu", "epochs", "overwrite", "max_failures", "data_cache"}
DATA_CACHES = ("auto", "memory", "stream")
MEMORY_LIMIT_GIB = 4.0  # "auto" holds a worker's decoded faces in memory up to this size (21.7k UTKFace: 1.5 GiB)
SHUFFLE_BUFFER = 2000  # rows a streaming worker mixes locally (about 140 MB of decoded regions)


@dataclass(frozen=True)
class TrainConfig:
    """One training run, with the paper's defaults (Adam, weight decay 1e-4, batch 50, alpha 10)."""

    data: str  # a `c3ae preprocess` output (path or s3://)
    out: str  # the run folder (path or s3://; shared storage for a multi-node run)
    val_data: str | None = None  # separate validation Parquet; else val_fraction of data by hash
    val_fraction: float = 0.1  # share of data held out by a hash of subject or file name
    epochs: int = 30
    workers: int = 1  # data-parallel workers
    gpu: bool = False  # one GPU per worker (DDP over NCCL)
    batch_size: int = 50  # per worker
    lr: float | None = None  # Adam's; None: the paper's 0.005 for the full model (SE), 0.002 for the plain one
    weight_decay: float = 1e-4
    alpha: float = 10.0  # weight of the KL term
    gender_weight: float = 1.0  # of the gender head's cross-entropy (model.gender_head)
    ethnicity_weight: float = 1.0  # of the auxiliary ethnicity head's cross-entropy (model.ethnicity_head)
    lr_schedule: str = "plateau"  # "plateau": ReduceLROnPlateau on validation MAE; "cosine": to 0 over `epochs`
    lr_factor: float = 0.5  # plateau only
    lr_patience: int = 3  # plateau only
    init_from: str | None = None  # a model.pt to fine-tune (its switches and bins are kept; fresh optimiser)
    seed: int = 0
    # An ensemble of this many models in one model file: members differ by seed (initial weights, data order and
    # augmentation), not by split; each trains as its own run in RUN_DIR/member_K, one after another.
    members: int = 1
    bf16: bool = True  # bfloat16 autocast for training steps where the hardware supports it (validation stays fp32)
    max_failures: int = 3  # worker failures survived by restarting from the latest checkpoint
    # "memory": each worker decodes its share of the faces once and keeps it for every epoch; "stream": decode
    # every epoch (for shares too large to hold); "auto": memory when a worker's share is under MEMORY_LIMIT_GIB
    data_cache: str = "auto"
    overwrite: bool = False  # discard what `out` holds and train from scratch
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)  # None: no augmentation

    def __post_init__(self):
        check(self.val_data is not None or 0 < self.val_fraction < 1, f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        for name in ("epochs", "workers", "batch_size", "members"):
            check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        check(self.learning_rate > 0, f"lr must be positive, got {self.learning_rate}")
        check(self.gender_weight >= 0 and self.ethnicity_weight >= 0,
              f"gender_weight and ethnicity_weight must not be negative, got {self.gender_weight} and {self.ethnicity_weight}")
        check(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        check(self.data_cache in DATA_CACHES, f"data_cache must be one of {', '.join(DATA_CACHES)}, got {self.data_cache!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (0.005 if self.model.se else 0.002)


def face_dataset(data: FaceData, split: str | None, val_fraction: float, shuffle_blocks: bool):
    """The decoded rows of one side of the split; `shuffle_blocks` reads the files' blocks in a new random order
    on every pass (streamed training: the worker's local shuffle buffer mixes the rows within)."""
    import ray.data

    ds = ray.data.read_parquet(data.files, filesystem=data.filesystem).select_columns(data.columns)
    if shuffle_blocks:
        ds = ds.randomize_block_order()
    return ds.map_batches(
        decode_faces, fn_kwargs={"split": split, "val_fraction": val_fraction, "crop": data.crop},
        batch_size=256, batch_format="pyarrow",
    )


def shard_share_gib(cfg: TrainConfig, data: FaceData, data_summary: dict) -> float:
    """Decoded regions (training and validation) one worker holds in memory."""
    faces = data_summary["train"]["faces"] + data_summary["val"]["faces"]
    return faces / cfg.workers * 3 * data.crop.region_size**2 / 2**30


def in_memory(cfg: TrainConfig, share_gib: float) -> bool:
    return cfg.data_cache == "memory" or (cfg.data_cache == "auto" and share_gib <= MEMORY_LIMIT_GIB)


# --- the per-worker function: restore, then the loop epoch by epoch, reporting each ------------------------------


def _read_shares(sources: dict, val_fraction: float, rank: int, world: int, device) -> dict:
    """{"train"|"val": worker `rank`'s share (every world-th row) of that side, decoded (`faces.decode_faces`) as
    tensors on `device`}, read straight from the Parquet files (once per location: the hash split's two sides
    share one). Not through Ray Data: its pipeline's start-up (a split coordinator, read and decode workers, per
    dataset) took 20-30 s of every small run here."""
    shares = {}
    for location in {location for location, _ in sources.values()}:
        data = open_faces(location)
        table = data.read()
        shares[location] = data, table.take(np.arange(rank, table.num_rows, world))
    held = {}
    for name, (location, split) in sources.items():
        data, share = shares[location]
        size = data.crop.region_size
        parts = [{"region": np.zeros((0, size, size, 3), np.uint8), "boxes": np.zeros((0, N_SCALES, 4), np.float32),
                  "age": np.zeros(0, np.float32), "gender": np.zeros(0, np.int64), "ethnicity": np.zeros(0, np.int64)}]
        parts += [decode_faces(share.slice(start, 1024), split, val_fraction, data.crop) for start in range(0, share.num_rows, 1024)]
        held[name] = {column: torch.from_numpy(np.concatenate([part[column] for part in parts])).to(device) for column in parts[0]}
    return held


def _epoch_feeds(setup: dict, cfg: TrainConfig, rank: int, world: int, device):
    """(epoch -> training batches, () -> validation batches, seconds spent loading): from the faces held in
    memory (read here, once per attempt), or streamed from Ray Data's shards."""
    import ray.train

    if not setup["in_memory"]:
        train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
        return (
            lambda epoch: train_shard.iter_torch_batches(batch_size=cfg.batch_size, device=device, prefetch_batches=2,
                                                         local_shuffle_buffer_size=SHUFFLE_BUFFER),
            lambda: val_shard.iter_torch_batches(batch_size=256, device=device),
            0.0,
        )
    started = time.perf_counter()
    faces = _read_shares(setup["sources"], cfg.val_fraction, rank, world, device)
    train_faces, val_faces = faces["train"], faces["val"]
    train_rows, val_rows = torch.arange(len(train_faces["age"])), torch.arange(len(val_faces["age"]))
    if rank == 0:
        held = sum(t.nbytes for faces in (train_faces, val_faces) for t in faces.values()) / 2**30
        logger.info("decoded %d training and %d validation faces into memory in %.0f s (%.2f GiB per worker)",
                    len(train_rows), len(val_rows), time.perf_counter() - started, held)
    return (
        # the same order for an epoch whether or not the run was resumed before it
        lambda epoch: batches_of(train_faces, train_rows, cfg.batch_size, torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1009 * rank + epoch)),
        lambda: batches_of(val_faces, val_rows, 256),
        time.perf_counter() - started,
    )


def _cpu_state(module_or_optimizer) -> dict:
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in module_or_optimizer.state_dict().items()}


def _restore(model, optimizer, scheduler, cfg: TrainConfig) -> dict:
    """The latest checkpoint's weights, optimiser and schedule (if any) -> the run state to continue from."""
    import ray.train

    state = {"epoch": 0, "history": [], "best": None, "attempt": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if cfg.lr_schedule == "cosine":
            scheduler.T_max = cfg.epochs  # a resumed run may have been given more epochs
        state = {k: saved[k] for k in state}
    state["attempt"] += 1
    return state


def train_worker(setup: dict) -> None:
    """Ray Train's per-worker function."""
    import ray.train
    import ray.train.torch

    cfg = build(TrainConfig, setup["config"])
    logger.setLevel(logging.INFO)  # one line per epoch (Train V2 would show a print() twice)
    # Train V2 also logs every report's whole metrics dict at INFO, from a logger outside `ray.train` that its
    # LoggingConfig does not reach: the epoch line says it once, so this worker's other INFO lines stay quiet.
    logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    torch.manual_seed(cfg.seed + 1000 * rank)
    model, optimizer, scheduler = build_training(cfg, setup.get("init_state"), "cpu")
    state = _restore(model, optimizer, scheduler, cfg)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed * 7919 + 1000 * rank + state["epoch"] + 100000 * state["attempt"])
    model = ray.train.torch.prepare_model(model)
    if rank == 0 and state["epoch"]:
        logger.info("resuming after epoch %d (attempt %d)", state["epoch"], state["attempt"])
    train_batches, val_batches, load_s = _epoch_feeds(setup, cfg, rank, world, device)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        started = time.perf_counter()
        progress = _progress_logger(epoch, cfg.epochs, setup["train_faces"], world, rank, started)
        record = train_epoch(model, optimizer, train_batches(epoch), cfg, generator, device, progress)
        train_s = time.perf_counter() - started
        record.update(validate(model, val_batches(), cfg, device))
        record.update(epoch=epoch, attempt=state["attempt"], lr=optimizer.param_groups[0]["lr"],
                      samples_per_s=record["train_samples"] / train_s, epoch_s=time.perf_counter() - started,
                      data_load_s=load_s)  # the attempt's one load of its faces, on its first epoch
        load_s = 0.0
        step_schedule(scheduler, record["val_mae"])
        state["history"].append(record)
        state["epoch"] = epoch
        if state["best"] is None or record["val_mae"] < state["best"]["val_mae"]:
            state["best"] = {"epoch": epoch, "val_mae": record["val_mae"], "model": _cpu_state(unwrap(model))}
        if rank != 0:
            ray.train.report(record, checkpoint=None)
            continue
        with tempfile.TemporaryDirectory() as folder:
            saved = {**state, "model": _cpu_state(unwrap(model)), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            torch.save(saved, os.path.join(folder, STATE_FILE))
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=f"epoch_{epoch:03d}")
        logger.info(format_epoch(record, cfg.epochs))


def _progress_logger(epoch: int, epochs: int, total: int, world_size: int, rank: int, started: float, every_s: float = 60.0):
    """A line at most once a minute inside long epochs (the epoch line comes at its end)."""
    last = [started]

    def progress(seen_here: float) -> None:
        now = time.perf_counter()
        if rank == 0 and now - last[0] >= every_s:
            last[0] = now
            seen = int(seen_here * world_size)
            logger.info("epoch %d/%d: %d/%d samples, %.0f samples/s", epoch, epochs, seen, total, seen / (now - started))

    return progress


def format_epoch(record: dict, epochs: int) -> str:
    return (
        f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.3f} (L1 {record['train_l1']:.2f}), "
        f"val loss {record['val_loss']:.3f}, val MAE {record['val_mae']:.2f}, "
        f"CA(5) {record['val_ca5']:.3f}, "
        + (f"gender accuracy {record['val_gender_acc']:.3f}, " if "val_gender_acc" in record else "")
        + f"lr {record['lr']:.2g}, {record['samples_per_s']:.0f} samples/s"
    )


# --- the driver: check inputs, start or resume the run, write the outputs --------------------------------------


def initial_weights(cfg: TrainConfig, crop: CropConfig) -> tuple[TrainConfig, dict | None, dict | None]:
    """--init-from: the model file's switches become the run's, plus any head the run asks for (it starts fresh);
    other crop scales or age bins are an error."""
    if not cfg.init_from:
        return cfg, None, None
    model, payload = load_model(cfg.init_from)
    if isinstance(model, Ensemble):
        raise UserError(f"{cfg.init_from} is an ensemble of {len(model.members)} models: fine-tune from one of them "
                        "(its run's member_K/model.pt)")
    source_crop = payload.get("crop_config") or {}
    if source_crop and tuple(source_crop.get("scales", ())) != tuple(crop.scales):
        raise UserError(f"{cfg.init_from} was trained on crops at scales {source_crop['scales']}, the data has {list(crop.scales)}")
    source_aligned = bool(source_crop.get("align", False))
    if source_aligned != crop.align:
        raise UserError(f"{cfg.init_from} was trained on {'aligned' if source_aligned else 'unaligned'} crops, "
                        f"the data's are {'aligned' if crop.align else 'unaligned'}")
    other_bins = [name for name in ("n_bins", "interval") if getattr(model.cfg, name) != getattr(cfg.model, name)]
    if other_bins:
        raise UserError(
            f"{cfg.init_from} predicts over other age bins ({', '.join(f'{n} {getattr(model.cfg, n)}' for n in other_bins)}) "
            f"than this run ({', '.join(f'{n} {getattr(cfg.model, n)}' for n in other_bins)})"
        )
    defaults = ModelConfig()
    conflicting = sorted(  # a switch the user set away from its default that the model file does not share
        name for name in ("context", "cascade", "se")
        if getattr(cfg.model, name) != getattr(defaults, name) and getattr(model.cfg, name) != getattr(cfg.model, name)
    )
    if conflicting:
        raise UserError(f"{cfg.init_from} does not match the asked model config in: {', '.join(conflicting)}")
    provenance = {"path": cfg.init_from, "meta": {k: payload["meta"].get(k) for k in ("data", "best_epoch", "val_mae")}}
    heads = {head: getattr(model.cfg, head) or getattr(cfg.model, head) for head in HEADS}
    return replace(cfg, model=replace(model.cfg, **heads)), model.state_dict(), provenance


def _splits(cfg: TrainConfig, data: FaceData) -> tuple[dict, dict]:
    """({"train"|"val": (FaceData, hash split side or None for all rows)}, their descriptions): a separate
    validation output, or the hash split of `data`."""
    if cfg.val_data:
        val = open_faces(cfg.val_data)
        if val.crop != data.crop:
            raise UserError(f"{cfg.val_data} was cut with another crop config than {cfg.data}")
        sources, train_mask, described = {"train": (data, None), "val": (val, None)}, np.ones(len(data.ages), dtype=bool), val.describe()
    else:
        sources, train_mask = {"train": (data, "train"), "val": (data, "val")}, ~data.held_out(cfg.val_fraction)
        described = {**data.describe(~train_mask), "split": f"hash, {cfg.val_fraction:g}"}
    if train_mask.sum() < cfg.workers or described["faces"] < cfg.workers:
        raise UserError(f"too few faces: {int(train_mask.sum())} for training and {described['faces']} for validation "
                        f"with {cfg.workers} worker(s)")
    return sources, {"train": data.describe(train_mask), "val": described}


def _worker_resources(cluster: dict, cfg: TrainConfig) -> dict:
    """CPU workers never claim every CPU: Ray Data needs one to read and decode the shards."""
    resources = {"CPU": cpus_per_worker(cluster, cfg.workers)}
    if cfg.gpu:
        check(cluster.get("GPU", 0) >= cfg.workers, f"--gpu with {cfg.workers} workers needs {cfg.workers} GPUs; the cluster has {cluster.get('GPU', 0):g}")
        resources["GPU"] = 1
    return resources


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; -> the summary (also RUN_DIR/summary.json)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    if cfg.members > 1:
        return train_ensemble(cfg)
    started = time.perf_counter()
    data = open_faces(cfg.data)
    cfg, init_state, init_provenance = initial_weights(cfg, data.crop)
    sources, data_summary = _splits(cfg, data)
    filesystem, out = storage.resolve(cfg.out)
    resuming = storage.prepare_run_dir(
        filesystem, out, cfg.out, to_dict(cfg), cfg.overwrite, RESUMABLE_CHANGES, "training run"
    ) and storage.exists(filesystem, f"{out}/{CHECKPOINTS}")
    share_gib = shard_share_gib(cfg, data, data_summary)
    held = in_memory(cfg, share_gib)
    print(f"{'resuming' if resuming else 'training'} {cfg.out}: {data_summary['train']['faces']} training and "
          f"{data_summary['val']['faces']} validation faces, {cfg.epochs} epochs on {cfg.workers} "
          f"{'GPU' if cfg.gpu else 'CPU'} worker(s); faces {'decoded once and held' if held else 'decoded every epoch'} "
          f"({share_gib:.2f} GiB per worker, data_cache {cfg.data_cache})", flush=True)
    with ray_runtime():
        ray.data.DataContext.get_current().enable_progress_bars = False  # the epoch lines are the progress
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config": to_dict(cfg), "init_state": init_state, "train_faces": data_summary["train"]["faces"],
                               "in_memory": held, "sources": {name: (faces.location, split) for name, (faces, split) in sources.items()}},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker=_worker_resources(cluster_shape(), cfg),
                # GPU workers pack for fast NCCL; CPU workers spread over nodes for their cores and memory
                # bandwidth (the all-reduce of a 0.2 MB model costs nothing over the network).
                placement_strategy="PACK" if cfg.gpu else "SPREAD",
            ),
            run_config=ray.train.RunConfig(
                name=CHECKPOINTS, storage_path=out, storage_filesystem=filesystem,
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # not a line per report
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_mae", checkpoint_score_order="min"),
            ),
            datasets={} if held else {name: face_dataset(faces, split, cfg.val_fraction, name == "train")
                                      for name, (faces, split) in sources.items()},
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as error:
            raise RuntimeError(f"training failed after {cfg.max_failures} restart(s): {error}") from error
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
    return _write_outputs(cfg, filesystem, out, state, data, sources["val"], data_summary, init_provenance, started)


def member_config(cfg: TrainConfig, k: int) -> TrainConfig:
    """Member k (from 1) of an ensemble run: seed + k - 1 and its own run folder; the split is every member's
    (a hash of the faces' keys, not of the seed), so one validation set measures them all."""
    return replace(cfg, members=1, seed=cfg.seed + k - 1, out=f"{cfg.out.rstrip('/')}/member_{k}", overwrite=False)


def train_ensemble(cfg: TrainConfig) -> dict:
    """Train the members one after another (each resumes like any run; a finished one is kept), then write one
    model file holding them all, measured and calibrated as one model on the validation faces.

    One after another, each with all of `--workers`, rather than side by side: a member's run is already
    data-parallel over the cluster, and its data actors need CPUs of their own that side-by-side runs would
    take from each other."""
    started = time.perf_counter()
    data = open_faces(cfg.data)
    if cfg.init_from:
        raise UserError("an ensemble trains its members from scratch: --init-from does not apply with --members")
    sources, data_summary = _splits(cfg, data)
    filesystem, out = storage.resolve(cfg.out)
    storage.prepare_run_dir(filesystem, out, cfg.out, to_dict(cfg), cfg.overwrite, RESUMABLE_CHANGES, "training run")
    summaries = []
    with ray_runtime():
        for k in range(1, cfg.members + 1):
            member = member_config(cfg, k)
            member_fs, member_path = storage.resolve(member.out)
            if storage.exists(member_fs, f"{member_path}/{storage.SUMMARY}"):
                summaries.append(storage.read_json(member_fs, f"{member_path}/{storage.SUMMARY}"))
                print(f"member {k}/{cfg.members}: finished before (val MAE {summaries[-1]['val_mae']:.2f})", flush=True)
                continue
            print(f"member {k}/{cfg.members} (seed {member.seed}):", flush=True)
            summaries.append(train(member))
            print(f"member {k}/{cfg.members}: val MAE {summaries[-1]['val_mae']:.2f}", flush=True)
    members = [load_model(f"{member_config(cfg, k).out}/model.pt")[0] for k in range(1, cfg.members + 1)]
    ensemble = Ensemble(members[0].cfg, cfg.members).eval()
    for slot, member in zip(ensemble.members, members):
        slot.load_state_dict(member.state_dict())
    measured = measure_on_validation(ensemble, sources["val"], cfg.val_fraction)
    print(f"ensemble of {cfg.members}: val MAE {measured['val_mae']:.2f} (members {_maes(summaries)})", flush=True)
    ranged = calibrated_range(ensemble, sources["val"], cfg.val_fraction)
    described = [{"seed": member_config(cfg, k).seed, "out": summary["out"], "best_epoch": summary["best_epoch"],
                  "val_mae": summary["val_mae"]} for k, summary in enumerate(summaries, start=1)]
    buffer = io.BytesIO()
    meta = {"data": data_summary, "best_epoch": [m["best_epoch"] for m in described], **measured, "members": described,
            "train_config": to_dict(cfg), "c3ae_ray_version": __version__}
    model_bytes = save_model(ensemble, buffer, crop_config=to_dict(data.crop), meta=meta,
                             age_range=None if ranged is None else asdict(ranged["age_range"]))
    with filesystem.open_output_stream(f"{out}/model.pt") as stream:
        stream.write(buffer.getvalue())
    summary = {
        "out": cfg.out, "members": described, "epochs": max(s["epochs"] for s in summaries), "best_epoch": meta["best_epoch"],
        **measured, "member_val_mae": round(float(np.mean([s["val_mae"] for s in summaries])), 4),
        "attempts": max(s["attempts"] for s in summaries), "final_train_loss": None,
        "mean_samples_per_s": round(float(np.mean([s["mean_samples_per_s"] for s in summaries])), 1),
        "model_bytes": model_bytes, "data": data_summary, "workers": cfg.workers, "gpu": cfg.gpu,
        "age_range": None if ranged is None else calibrate.summary_of(ranged),
        "elapsed_s": round(time.perf_counter() - started, 1), "config": to_dict(cfg), "c3ae_ray_version": __version__,
    }
    storage.write_json(filesystem, f"{out}/{storage.SUMMARY}", summary)
    return summary


def measure_on_validation(model, val: tuple[FaceData, str | None], val_fraction: float) -> dict:
    """val_* metrics (MAE, CA(n), gender accuracy with a gender head) of a finished model on the validation faces,
    cut and predicted as every stage does; for a single model they match its run's own validation."""
    faces_data, split = val
    faces = read_faces(faces_data)
    rows = faces_data.held_out(val_fraction) if split else np.ones(len(faces_data.keys), dtype=bool)
    outputs = predict_stored(model, faces_data, faces, rows)
    measured = age_metrics(outputs.age, faces["age"][rows])
    if outputs.p_female is not None:
        measured.update(gender_metrics(outputs.p_female, np.asarray(faces["gender"], dtype=object)[rows]))
    return {f"val_{name}": round(value, 4) if isinstance(value, float) else value for name, value in measured.items()
            if name in ("mae", "ca3", "ca5", "ca7", "gender_acc")}


def calibrated_range(model: C3AE, val: tuple[FaceData, str | None], val_fraction: float) -> dict | None:
    """The best model's age range from its validation faces (`calibrate`), or None (said why) when they are too few."""
    faces, split = val
    fraction = val_fraction if split else 1.0  # a separate validation output: all of its rows are validation
    calibration_rows, _ = calibrate.split_parts(faces, fraction)
    if calibration_rows.sum() < calibrate.MIN_FACES:
        print(f"no age range: {int(calibration_rows.sum())} calibration faces (half of validation), at least "
              f"{calibrate.MIN_FACES} needed", flush=True)
        return None
    result = calibrate.calibrate_model(model, faces, fraction)
    print(calibrate.format_summary(calibrate.summary_of(result)), flush=True)
    return result


def _write_outputs(cfg: TrainConfig, filesystem, out: str, state: dict, data: FaceData, val: tuple[FaceData, str | None],
                   data_summary: dict, init_provenance, started: float) -> dict:
    history, best = state["history"], state["best"]
    best_record = next(r for r in history if r["epoch"] == best["epoch"])
    best_metrics = {k: round(v, 4) for k, v in best_record.items() if k.startswith("val_")}
    model = C3AE(cfg.model)
    model.load_state_dict(best["model"])
    model.eval()
    ranged = calibrated_range(model, val, cfg.val_fraction)
    buffer = io.BytesIO()
    meta = {"data": data_summary, "best_epoch": best["epoch"], **best_metrics, "train_config": to_dict(cfg),
            "init_from": init_provenance, "c3ae_ray_version": __version__}
    model_bytes = save_model(model, buffer, crop_config=to_dict(data.crop), meta=meta,
                             age_range=None if ranged is None else asdict(ranged["age_range"]))
    metrics_csv = io.StringIO()
    # every record's columns: a run resumed across versions may have records with more of them
    writer = csv.DictWriter(metrics_csv, fieldnames=list(dict.fromkeys(key for record in history for key in record)))
    writer.writeheader()
    writer.writerows(history)
    for name, content in (("model.pt", buffer.getvalue()), ("metrics.csv", metrics_csv.getvalue().encode()),
                          ("curves.png", plots.png(plots.training_curves(history)))):
        with filesystem.open_output_stream(f"{out}/{name}") as stream:
            stream.write(content)
    storage.write_json(filesystem, f"{out}/metrics.json", history)
    summary = {
        "out": cfg.out, "epochs": len(history), "attempts": max(r["attempt"] for r in history), "best_epoch": best["epoch"],
        **best_metrics,
        "final_train_loss": round(history[-1]["train_loss"], 4),
        "mean_samples_per_s": round(float(np.mean([r["samples_per_s"] for r in history])), 1),
        "model_bytes": model_bytes, "data": data_summary, "workers": cfg.workers, "gpu": cfg.gpu,
        "age_range": None if ranged is None else calibrate.summary_of(ranged),
        "elapsed_s": round(time.perf_counter() - started, 1), "config": to_dict(cfg), "c3ae_ray_version": __version__,
    }
    storage.write_json(filesystem, f"{out}/{storage.SUMMARY}", summary)
    return summary


def _maes(summaries: list[dict]) -> str:
    return ", ".join(f"{summary['val_mae']:.2f}" for summary in summaries)


def format_summary(summary: dict) -> str:
    data = summary["data"]
    members = summary.get("members")
    return "\n".join([
        f"trained {summary['out']}: {summary['epochs']} epochs ({summary['attempts']} attempt(s)), "
        f"{data['train']['faces']} training / {data['val']['faces']} validation faces",
        *([f"  {len(members)} members, val MAE {_maes(members)} (mean {summary['member_val_mae']:.2f})"] if members else []),
        f"  {'the ensemble' if members else 'best epoch ' + str(summary['best_epoch'])}: val MAE {summary['val_mae']:.2f}, CA(3) {summary['val_ca3']:.3f}, "
        f"CA(5) {summary['val_ca5']:.3f}, CA(7) {summary['val_ca7']:.3f}"
        + (f", gender accuracy {summary['val_gender_acc']:.3f}" if "val_gender_acc" in summary else ""),
        f"  {summary['mean_samples_per_s']} samples/s on {summary['workers']} {'GPU' if summary['gpu'] else 'CPU'} "
        f"worker(s), {summary['elapsed_s']} s; model.pt {summary['model_bytes']} bytes",
        "  " + (calibrate.format_summary(summary["age_range"]) if summary.get("age_range") else
                "no age range (too few validation faces to calibrate one; see `c3ae calibrate`)"),
    ])
