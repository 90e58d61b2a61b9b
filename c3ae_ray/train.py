"""Training: preprocessed Parquet -> Ray Train (V2) data-parallel workers -> RUN_DIR with model.pt.

Ray Data reads the face rows, keeps the rows of the split (a hash of the subject, or of the path where a
dataset has no subjects, so every rerun and resume sees the same split) and decodes the region JPEGs;
each worker streams its shard as tensors and cuts the three 64x64 crops on its own device with
`augment.crop_batch` (random box shift, rotation, flip, colour, erasing in one batched pass).

RUN_DIR (a local path or s3://...):

    config.json            the effective config, written when the run starts; a rerun must match it
    checkpoints/epoch_NNN/ Ray Train checkpoints: every epoch reported, the latest and the best kept
    metrics.csv, .json     one row per epoch: loss parts, validation MAE and CA(3/5/7), lr, samples/s
    curves.png             loss and MAE per epoch
    model.pt               the best epoch's weights (by validation MAE) with their configs and metrics
    summary.json           written last: the run is complete

Rerunning the same command on an unfinished RUN_DIR resumes from its latest checkpoint (Train V2 finds the
run by its name and storage path); a failed worker is restarted from it too (FailureConfig).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace

import cv2
import numpy as np
import torch

from c3ae_ray import __version__, storage
from c3ae_ray.augment import AugmentConfig, crop_batch
from c3ae_ray.crops import CropConfig
from c3ae_ray.model import C3AE, ModelConfig, c3ae_loss, check_keys, load_model, save_model
from c3ae_ray.runtime import cluster_shape, cpus_per_worker, ray_runtime

logger = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"  # Ray Train's run name: RUN_DIR/checkpoints/
STATE_FILE = "state.pt"
CA_YEARS = (3, 5, 7)
# Settings a resumed run may change: where and how wide it runs, how long, and whether to start over.
RESUMABLE_CHANGES = {"workers", "gpu", "epochs", "overwrite", "max_failures"}


@dataclass(frozen=True)
class TrainConfig:
    """One training run, with the paper's defaults (Adam, weight decay 1e-4, batch 50, alpha 10)."""

    data: str
    out: str
    val_data: str | None = None  # separate validation Parquet; else --val-fraction of --data by hash
    val_fraction: float = 0.1
    epochs: int = 30
    workers: int = 1
    gpu: bool = False
    batch_size: int = 50  # per worker
    lr: float | None = None  # None: the paper's 0.005 for the full model (SE), 0.002 for the plain one
    weight_decay: float = 1e-4
    alpha: float = 10.0  # weight of the KL term
    lr_schedule: str = "plateau"  # "plateau": ReduceLROnPlateau on validation MAE; "cosine": to 0 over `epochs`
    lr_factor: float = 0.5  # plateau only
    lr_patience: int = 3  # plateau only
    init_from: str | None = None  # a model.pt to fine-tune (fresh optimiser)
    seed: int = 0
    bf16: bool = True  # bfloat16 autocast for training steps where the hardware supports it (validation stays fp32)
    max_failures: int = 3  # worker failures survived by restarting from the latest checkpoint
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (0.005 if self.model.se else 0.002)

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["model"] = asdict(self.model)
        values["augment"] = self.augment.to_dict() if self.augment else None
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        check_keys(cls, values, "training")
        values = dict(values)
        if isinstance(values.get("model"), dict):
            values["model"] = ModelConfig.from_dict(values["model"])
        if isinstance(values.get("augment"), dict):
            check_keys(AugmentConfig, values["augment"], "augment")
            values["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values["augment"].items()})
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not 0 < self.val_fraction < 1 and self.val_data is None:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        for name in ("epochs", "workers", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"lr must be positive, got {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")


LR_SCHEDULES = ("plateau", "cosine")


def lr_scheduler(optimizer, cfg: TrainConfig):
    """The epoch-wise learning-rate schedule; `step_schedule` advances it after each epoch.

    Cosine annealing ends near 0 at the last epoch, so the last epochs average out the noise that a
    plateau schedule leaves in the validation curve of this small model."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)


def step_schedule(scheduler, monitored: float) -> None:
    """One epoch done: a plateau schedule watches `monitored` (lower is better), cosine just advances."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(monitored)
    else:
        scheduler.step()


def train_config(path: str | None, flags: dict) -> TrainConfig:
    """Defaults <- the YAML file at `path` <- the flags that were given (None: not given).

    The model switches (`context`, `cascade`, `se`) go into `model`; `augment: false` turns augmentation off.
    """
    import yaml

    values: dict = {}
    if path:
        with open(path) as file:
            loaded = yaml.safe_load(file) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of training settings")
        values = loaded
    given = {k: v for k, v in flags.items() if v is not None}
    switches = {k: given.pop(k) for k in ("context", "cascade", "se") if k in given}
    if switches:
        values["model"] = {**(values.get("model") or {}), **switches}
    if given.pop("augment", True) is False:
        values["augment"] = None
    values.update(given)
    for required in ("data", "out"):
        if not values.get(required):
            raise ValueError(f"--{required} is required (as a flag or in --config)")
    return TrainConfig.from_dict(values)


# --- data: Parquet rows -> decoded regions, split by hash --------------------------------------------------


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic membership of the validation split: the first 8 bytes of blake2b(key) as a share of 2^64."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def split_key(path: str, subject: str | None) -> str:
    """All faces of one person fall on the same side of the split; without subjects each image is its own key.
    The key is the file name, not the path, so that a split is the same wherever the data lives."""
    return f"subject:{subject}" if subject else f"file:{path.rsplit('/', 1)[-1]}"


def decode_faces(batch, split: str | None, val_fraction: float, crop: CropConfig) -> dict:
    """A pyarrow batch of face rows -> numpy columns region (n, R, R, 3) uint8, boxes (n, 3, 4), age (n,).

    `split` "train"/"val" keeps that side of the hash split; None keeps every row.
    """
    rows = batch.select(["path", "subject", "age", "region_jpeg", "region_boxes"]).to_pylist()
    if split is not None:
        rows = [r for r in rows if in_validation(split_key(r["path"], r["subject"]), val_fraction) == (split == "val")]
    return {
        "region": decode_regions([r["region_jpeg"] for r in rows], [r["path"] for r in rows], crop.region_size),
        "boxes": np.asarray([r["region_boxes"] for r in rows], dtype=np.float32).reshape(len(rows), len(crop.scales), 4),
        "age": np.asarray([r["age"] for r in rows], dtype=np.float32),
    }


def decode_regions(jpegs: list[bytes], paths: list[str], region_size: int) -> np.ndarray:
    """Stored region JPEGs -> (n, R, R, 3) RGB uint8; a region of another size or undecodable bytes is an error."""
    regions = np.empty((len(jpegs), region_size, region_size, 3), dtype=np.uint8)
    for i, (jpeg, path) in enumerate(zip(jpegs, paths)):
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        if image is None or image.shape[:2] != (region_size, region_size):
            raise ValueError(f"{path}: stored face region is not a {region_size}px JPEG")
        regions[i] = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return regions


@dataclass
class FaceData:
    """A preprocessed output as training sees it: where its rows are, its crop geometry, and its labels."""

    location: str
    files: list[str]
    filesystem: object
    crop: CropConfig
    keys: list[str]
    ages: np.ndarray

    def describe(self, mask: np.ndarray | None = None) -> dict:
        ages = self.ages if mask is None else self.ages[mask]
        return {
            "location": self.location,
            "faces": int(len(ages)),
            "age_min": float(ages.min()) if len(ages) else None,
            "age_max": float(ages.max()) if len(ages) else None,
            "age_mean": round(float(ages.mean()), 2) if len(ages) else None,
        }


def open_faces(location: str) -> FaceData:
    """Check a preprocess output (complete, labelled) and read its small columns: keys for the split and ages."""
    import pyarrow.dataset as pads

    filesystem, path, summary = storage.require_complete(location)
    if "crop" not in summary or not storage.exists(filesystem, f"{path}/faces"):
        raise ValueError(f"{location} is not a `c3ae preprocess` output (no faces/ or crop config)")
    files = storage.files_under(filesystem, f"{path}/faces")
    files = [f for f in files if f.endswith(".parquet")]
    if not files:
        raise ValueError(f"{location} has no face rows")
    table = pads.dataset(files, filesystem=filesystem, format="parquet").to_table(columns=["path", "subject", "age"])
    ages = table.column("age").to_numpy(zero_copy_only=False)
    unlabelled = int(table.column("age").null_count)
    if unlabelled:
        raise ValueError(f"{location}: {unlabelled} of {len(ages)} faces have no age label; training needs ages")
    keys = [split_key(p, s) for p, s in zip(table.column("path").to_pylist(), table.column("subject").to_pylist())]
    return FaceData(location, files, filesystem, CropConfig.from_dict(summary["crop"]), keys, ages.astype(np.float32))


def face_dataset(data: FaceData, split: str | None, val_fraction: float, shuffle: bool):
    import ray.data

    ds = ray.data.read_parquet(data.files, filesystem=data.filesystem).select_columns(
        ["path", "subject", "age", "region_jpeg", "region_boxes"]
    )
    if shuffle:
        # A full shuffle of the compact rows (JPEG bytes) every epoch: preprocess writes rows in path order,
        # which is age order for UTKFace, so block order plus a local buffer would still give one-age batches.
        ds = ds.random_shuffle()
    return ds.map_batches(
        decode_faces,
        fn_kwargs={"split": split, "val_fraction": val_fraction, "crop": data.crop},
        batch_size=256,
        batch_format="pyarrow",
    )


# --- the per-worker loop (no Ray Data logic in here beyond iterating the shard) -------------------------------


def _unwrap(model: torch.nn.Module) -> C3AE:
    return model.module if hasattr(model, "module") else model


def _batch_losses(model, batch: dict, crop_size: int, augment: AugmentConfig | None, alpha: float, generator):
    crops = crop_batch(batch["region"], batch["boxes"], crop_size, augment, generator)
    age_pred, distribution = model(crops)
    age_pred = age_pred.float()  # the loss in fp32 under bf16 autocast
    distribution = distribution.float() if distribution is not None else None
    return age_pred, c3ae_loss(_unwrap(model), age_pred, distribution, batch["age"], alpha=alpha)


def _all_sum(values: list[float], device) -> list[float]:
    """Sum per-worker totals across the worker group (a no-op on one worker)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def train_epoch(model, optimizer, batches, cfg: TrainConfig, crop_size: int, generator, device, progress) -> dict:
    """One pass over this worker's shard; `progress(samples_seen)` is called every batch (rank 0 logs it)."""
    model.train()
    totals = [0.0, 0.0, 0.0, 0.0]  # samples, loss, kl, l1 (sums over samples)
    waited = 0.0  # seconds spent waiting for the next batch: high means the input pipeline is the bottleneck
    use_bf16 = cfg.bf16 and bf16_supported(device)
    asked = time.perf_counter()
    for batch in batches:
        waited += time.perf_counter() - asked
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            _, losses = _batch_losses(model, batch, crop_size, cfg.augment, cfg.alpha, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        n = len(batch["age"])
        totals = [totals[0] + n, *(t + losses[k].item() * n for t, k in zip(totals[1:], ("total", "kl", "l1")))]
        progress(totals[0])
        asked = time.perf_counter()
    n, loss, kl, l1 = _all_sum(totals, device)
    return {
        "train_samples": int(n),
        "train_loss": loss / max(n, 1),
        "train_kl": kl / max(n, 1),
        "train_l1": l1 / max(n, 1),
        "data_wait_s": waited,
    }


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 autocast pays off only with hardware support: AMX/AVX-512 BF16 on CPU, Ampere or newer on CUDA."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@torch.no_grad()
def _validate(model, batches, cfg: TrainConfig, crop_size: int, device) -> dict:
    model.eval()
    totals = [0.0] * (4 + len(CA_YEARS))  # samples, loss, kl, abs error, within n years
    for batch in batches:
        age_pred, losses = _batch_losses(model, batch, crop_size, None, cfg.alpha, None)
        errors = (age_pred - batch["age"]).abs()
        n = len(errors)
        totals[0] += n
        totals[1] += losses["total"].item() * n
        totals[2] += losses["kl"].item() * n
        totals[3] += float(errors.sum())
        for i, years in enumerate(CA_YEARS):
            totals[4 + i] += float((errors <= years).sum())
    n, loss, kl, abs_error, *within = _all_sum(totals, device)
    n = max(n, 1)
    metrics = {"val_samples": int(n), "val_loss": loss / n, "val_kl": kl / n, "val_mae": abs_error / n}
    metrics.update({f"val_ca{years}": count / n for years, count in zip(CA_YEARS, within)})
    return metrics


def _cpu_state(module_or_optimizer) -> dict:
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in module_or_optimizer.state_dict().items()}


def train_worker(setup: dict) -> None:
    """Ray Train's per-worker function: restore, then train and validate epoch by epoch, reporting each."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(setup["config"])
    logger.setLevel(logging.INFO)  # one line per epoch (Train V2 would show a print() twice)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    torch.manual_seed(cfg.seed + 1000 * rank)
    generator = torch.Generator(device=device)

    model = C3AE(cfg.model)
    if setup.get("init_state") is not None:
        model.load_state_dict(setup["init_state"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = lr_scheduler(optimizer, cfg)
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
    generator.manual_seed(cfg.seed * 7919 + 1000 * rank + state["epoch"] + 100000 * state["attempt"])
    model = ray.train.torch.prepare_model(model)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    crop_size = setup["crop_size"]

    if rank == 0 and state["epoch"]:
        logger.info("resuming after epoch %d (attempt %d)", state["epoch"], state["attempt"])
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        started = time.perf_counter()
        train_batches = train_shard.iter_torch_batches(batch_size=cfg.batch_size, device=device)
        progress = _progress_logger(epoch, cfg.epochs, setup["train_faces"], context.get_world_size(), rank, started)
        record = train_epoch(model, optimizer, train_batches, cfg, crop_size, generator, device, progress)
        train_s = time.perf_counter() - started
        record.update(_validate(model, val_shard.iter_torch_batches(batch_size=256, device=device), cfg, crop_size, device))
        record.update(
            epoch=epoch,
            attempt=state["attempt"],
            lr=optimizer.param_groups[0]["lr"],
            samples_per_s=record["train_samples"] / train_s,
            epoch_s=time.perf_counter() - started,
        )
        step_schedule(scheduler, record["val_mae"])
        state["history"].append(record)
        state["epoch"] = epoch
        if state["best"] is None or record["val_mae"] < state["best"]["val_mae"]:
            state["best"] = {"epoch": epoch, "val_mae": record["val_mae"], "model": _cpu_state(_unwrap(model))}
        if rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                torch.save(
                    {
                        **state,
                        "model": _cpu_state(_unwrap(model)),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                    },
                    os.path.join(folder, STATE_FILE),
                )
                ray.train.report(
                    record,
                    checkpoint=ray.train.Checkpoint.from_directory(folder),
                    checkpoint_dir_name=f"epoch_{epoch:03d}",
                )
            logger.info(format_epoch(record, cfg.epochs))
        else:
            ray.train.report(record, checkpoint=None)


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
        f"CA(5) {record['val_ca5']:.3f}, lr {record['lr']:.2g}, {record['samples_per_s']:.0f} samples/s"
    )


# --- the driver: check inputs, start or resume the run, write the outputs --------------------------------------


def initial_weights(cfg: TrainConfig, crop: CropConfig) -> tuple[TrainConfig, dict | None, dict | None]:
    """--init-from: the model file's switches become the run's; other crop scales or age bins are an error."""
    if not cfg.init_from:
        return cfg, None, None
    model, payload = load_model(cfg.init_from)
    source_crop = payload.get("crop_config") or {}
    if source_crop and tuple(source_crop.get("scales", ())) != tuple(crop.scales):
        raise ValueError(
            f"{cfg.init_from} was trained on crops at scales {source_crop['scales']}, the data has {list(crop.scales)}"
        )
    other_bins = [name for name in ("n_bins", "interval") if getattr(model.cfg, name) != getattr(cfg.model, name)]
    if other_bins:
        raise ValueError(
            f"{cfg.init_from} predicts over other age bins ({', '.join(f'{n} {getattr(model.cfg, n)}' for n in other_bins)}) "
            f"than this run ({', '.join(f'{n} {getattr(cfg.model, n)}' for n in other_bins)})"
        )
    defaults = ModelConfig()
    conflicting = sorted(  # a switch the user set away from its default that the model file does not share
        name for name in ("context", "cascade", "se")
        if getattr(cfg.model, name) != getattr(defaults, name) and getattr(model.cfg, name) != getattr(cfg.model, name)
    )
    if conflicting:
        raise ValueError(f"{cfg.init_from} does not match the asked model config in: {', '.join(conflicting)}")
    provenance = {"path": cfg.init_from, "meta": {k: payload["meta"].get(k) for k in ("data", "best_epoch", "val_mae")}}
    return replace(cfg, model=model.cfg), model.state_dict(), provenance


def _worker_resources(cluster: dict, cfg: TrainConfig) -> dict:
    """CPU workers never claim every CPU: Ray Data needs one to read and decode the shards."""
    resources = {"CPU": cpus_per_worker(cluster, cfg.workers)}
    if cfg.gpu:
        if cluster.get("GPU", 0) < cfg.workers:
            raise ValueError(f"--gpu with {cfg.workers} workers needs {cfg.workers} GPUs; the cluster has {cluster.get('GPU', 0):g}")
        resources["GPU"] = 1
    return resources


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; -> the summary (also RUN_DIR/summary.json)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    cfg.validate()
    data = open_faces(cfg.data)
    cfg, init_state, init_provenance = initial_weights(cfg, data.crop)
    if cfg.val_data:
        val = open_faces(cfg.val_data)
        if val.crop != data.crop:
            raise ValueError(f"{cfg.val_data} was cut with another crop config than {cfg.data}")
        train_mask = np.ones(len(data.ages), dtype=bool)
        val_summary = val.describe()
    else:
        train_mask = np.array([not in_validation(k, cfg.val_fraction) for k in data.keys])
        val_summary = {**data.describe(~train_mask), "split": f"hash, {cfg.val_fraction:g}"}
    if train_mask.sum() < cfg.workers or val_summary["faces"] < cfg.workers:
        raise ValueError(
            f"too few faces: {int(train_mask.sum())} for training and {val_summary['faces']} for validation "
            f"with {cfg.workers} worker(s)"
        )
    data_summary = {"train": data.describe(train_mask), "val": val_summary}

    filesystem, out = storage.resolve(cfg.out)
    resuming = storage.prepare_run_dir(
        filesystem, out, cfg.out, cfg.to_dict(), cfg.overwrite, RESUMABLE_CHANGES, "training run"
    ) and storage.exists(filesystem, f"{out}/{CHECKPOINTS}")
    print(
        f"{'resuming' if resuming else 'training'} {cfg.out}: {data_summary['train']['faces']} training and "
        f"{val_summary['faces']} validation faces, {cfg.epochs} epochs on {cfg.workers} {'GPU' if cfg.gpu else 'CPU'} worker(s)",
        flush=True,
    )
    with ray_runtime() as ray:
        ray.data.DataContext.get_current().enable_progress_bars = False  # the epoch lines are the progress
        if cfg.val_data:
            datasets = {"train": face_dataset(data, None, 0.0, True), "val": face_dataset(val, None, 0.0, False)}
        else:
            datasets = {
                "train": face_dataset(data, "train", cfg.val_fraction, True),
                "val": face_dataset(data, "val", cfg.val_fraction, False),
            }
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={
                "config": cfg.to_dict(),
                "init_state": init_state,
                "crop_size": data.crop.size,
                "train_faces": data_summary["train"]["faces"],
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.workers,
                use_gpu=cfg.gpu,
                resources_per_worker=_worker_resources(cluster_shape(), cfg),
                # GPU workers pack for fast NCCL; CPU workers spread over nodes for their cores and memory
                # bandwidth (the all-reduce of a 0.2 MB model costs nothing over the network).
                placement_strategy="PACK" if cfg.gpu else "SPREAD",
            ),
            run_config=ray.train.RunConfig(
                name=CHECKPOINTS,
                storage_path=out,
                storage_filesystem=filesystem,
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # not a line per report
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute="val_mae", checkpoint_score_order="min"
                ),
            ),
            datasets=datasets,
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as error:
            raise RuntimeError(f"training failed after {cfg.max_failures} restart(s): {error}") from error
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
    return _write_outputs(cfg, filesystem, out, state, data, data_summary, init_provenance, time.perf_counter() - started)


def _write_outputs(cfg, filesystem, out, state, data: FaceData, data_summary, init_provenance, elapsed) -> dict:
    history = state["history"]
    best = state["best"]
    best_record = next(r for r in history if r["epoch"] == best["epoch"])
    best_metrics = {k: round(v, 4) for k, v in best_record.items() if k.startswith("val_")}
    model = C3AE(cfg.model)
    model.load_state_dict(best["model"])
    buffer = io.BytesIO()
    model_bytes = save_model(
        model,
        buffer,
        crop_config=data.crop.to_dict(),
        meta={
            "data": data_summary,
            "best_epoch": best["epoch"],
            **best_metrics,
            "train_config": cfg.to_dict(),
            "init_from": init_provenance,
            "c3ae_ray_version": __version__,
        },
    )
    with filesystem.open_output_stream(f"{out}/model.pt") as stream:
        stream.write(buffer.getvalue())
    _write_metrics(filesystem, out, history)
    summary = {
        "out": cfg.out,
        "epochs": len(history),
        "attempts": max(r["attempt"] for r in history),
        "best_epoch": best["epoch"],
        **best_metrics,
        "final_train_loss": round(history[-1]["train_loss"], 4),
        "mean_samples_per_s": round(float(np.mean([r["samples_per_s"] for r in history])), 1),
        "model_bytes": model_bytes,
        "data": data_summary,
        "workers": cfg.workers,
        "gpu": cfg.gpu,
        "elapsed_s": round(elapsed, 1),
        "config": cfg.to_dict(),
        "c3ae_ray_version": __version__,
    }
    storage.write_json(filesystem, f"{out}/{storage.SUMMARY}", summary)
    return summary


def _write_metrics(filesystem, out: str, history: list[dict]) -> None:
    columns = list(history[0])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    with filesystem.open_output_stream(f"{out}/metrics.csv") as stream:
        stream.write(text.getvalue().encode())
    storage.write_json(filesystem, f"{out}/metrics.json", history)
    with filesystem.open_output_stream(f"{out}/curves.png") as stream:
        stream.write(plot_curves(history))


def plot_curves(history: list[dict]) -> bytes:
    """Loss parts and validation MAE / CA per epoch as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    figure, (losses, errors) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "-"), ("train_l1", "--"), ("train_kl", ":"), ("val_kl", ":")):
        losses.plot(epochs, [r[key] for r in history], style, label=key.replace("_", " "))
    losses.set(xlabel="epoch", ylabel="loss", title="loss (alpha x KL + L1)")
    losses.legend()
    errors.plot(epochs, [r["val_mae"] for r in history], "o-", label="val MAE (years)")
    errors.set(xlabel="epoch", ylabel="MAE (years)", title="validation")
    for axes in (losses, errors):
        axes.xaxis.get_major_locator().set_params(integer=True)
    shares = errors.twinx()
    for years in CA_YEARS:
        shares.plot(epochs, [r[f"val_ca{years}"] for r in history], "--", label=f"CA({years})")
    shares.set_ylabel("share within n years")
    shares.set_ylim(0, 1)
    handles = errors.get_legend_handles_labels()
    more = shares.get_legend_handles_labels()
    errors.legend(handles[0] + more[0], handles[1] + more[1], loc="center right")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    return png.getvalue()


def format_summary(summary: dict) -> str:
    data = summary["data"]
    return "\n".join(
        [
            f"trained {summary['out']}: {summary['epochs']} epochs ({summary['attempts']} attempt(s)), "
            f"{data['train']['faces']} training / {data['val']['faces']} validation faces",
            f"  best epoch {summary['best_epoch']}: val MAE {summary['val_mae']:.2f}, CA(3) {summary['val_ca3']:.3f}, "
            f"CA(5) {summary['val_ca5']:.3f}, CA(7) {summary['val_ca7']:.3f}",
            f"  {summary['mean_samples_per_s']} samples/s on {summary['workers']} {'GPU' if summary['gpu'] else 'CPU'} "
            f"worker(s), {summary['elapsed_s']} s; model.pt {summary['model_bytes']} bytes",
        ]
    )
