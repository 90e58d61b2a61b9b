"""The training loop without Ray: optimiser and schedule from the config, one epoch, one validation pass.

`c3ae train` runs it inside Ray Train workers (sums all-reduced across workers); evaluation and `c3ae tune`
run it inside Tune trials. All feed it from faces decoded once and held in memory (`hold_faces`, `batches_of`),
or `c3ae train` from a Ray Data shard streamed every epoch when a worker's share is too large to hold. All cut
their crops with `augment.crop_batch` on the batch's device, so the model step is the same wherever it runs.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch

from c3ae_ray.augment import AugmentConfig, crop_batch
from c3ae_ray.metrics import error_sums, from_sums
from c3ae_ray.model import UNKNOWN, C3AE, c3ae_loss, load_weights

if TYPE_CHECKING:
    from c3ae_ray.train import TrainConfig

LR_SCHEDULES = ("plateau", "cosine")


def build_training(cfg: TrainConfig, init_state: dict | None, device) -> tuple[C3AE, torch.optim.Optimizer, object]:
    """(model on `device`, Adam, its epoch-wise schedule) for a run's config; `init_state`: weights to start from."""
    model = C3AE(cfg.model)
    if init_state is not None:
        load_weights(model, init_state)
    # Convolution weights in the channels-last layout the forward pass runs in: their gradients come out in it
    # too, so DDP's gradient buckets match them (no stride warning, no copy per step).
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return model, optimizer, lr_scheduler(optimizer, cfg)


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


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 autocast pays off only with hardware support: AMX/AVX-512 BF16 on CPU, Ampere or newer on CUDA."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def unwrap(model: torch.nn.Module) -> C3AE:
    """The C3AE inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def _batch_losses(model, batch: dict, cfg: TrainConfig, augment: AugmentConfig | None, generator):
    """-> (the prediction, its loss parts); the loss runs in fp32 under bf16 autocast. A batch without gender or
    ethnicity labels trains those heads on nothing."""
    prediction = model(crop_batch(batch["region"], batch["boxes"], augment, generator))
    losses = c3ae_loss(unwrap(model), prediction, batch["age"], alpha=cfg.alpha, gender=batch.get("gender"),
                       ethnicity=batch.get("ethnicity"), gender_weight=cfg.gender_weight, ethnicity_weight=cfg.ethnicity_weight)
    return prediction, losses


def _loss_parts(model) -> tuple[str, ...]:
    """The loss parts a model's epochs log: the age parts, then one per head it has."""
    cfg = unwrap(model).cfg
    return ("total", "kl", "l1") + ("gender",) * cfg.gender_head + ("ethnicity",) * cfg.ethnicity_head


def batches_of(faces: dict, rows: torch.Tensor, batch_size: int, shuffle: torch.Generator | None = None) -> Iterator[dict]:
    """Batches of the `rows` of `faces` ({region, boxes, age} tensors held in memory, on one device): in a fresh
    random order drawn from `shuffle` (one call per epoch: a full shuffle that costs an index gather), else in order."""
    if shuffle is not None:
        rows = rows[torch.randperm(len(rows), generator=shuffle)]
    for chunk in rows.to(faces["age"].device).split(batch_size):
        yield {name: column[chunk] for name, column in faces.items()}


def hold_faces(faces: dict, region_size: int, device) -> dict:
    """A `faces.read_faces` dict decoded once into tensors on `device` ({region, boxes, age, gender, ethnicity}),
    what `batches_of` draws from: a Tune trial's whole dataset."""
    from c3ae_ray.datasets import ETHNICITIES
    from c3ae_ray.faces import class_codes, decode_regions
    from c3ae_ray.model import GENDERS

    return {
        "region": torch.from_numpy(decode_regions(faces["jpeg"], faces["path"], region_size)).to(device),
        "boxes": torch.tensor(faces["boxes"], device=device),  # a copy: arrays from the object store are read-only
        "age": torch.tensor(faces["age"], device=device),
        "gender": torch.from_numpy(class_codes(faces["gender"], GENDERS)).to(device),
        "ethnicity": torch.from_numpy(class_codes(faces["ethnicity"], ETHNICITIES)).to(device),
    }


def all_sum(values: list[float], device) -> list[float]:
    """Sum per-worker totals across the data-parallel group (a no-op on one worker or without one)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def train_epoch(model, optimizer, batches: Iterable[dict], cfg: TrainConfig, generator, device,
                progress: Callable[[float], None] = lambda seen: None) -> dict:
    """One pass over `batches` ({region, boxes, age} tensors on `device`); `progress(samples_seen)` after each."""
    model.train()
    parts = _loss_parts(model)
    totals = [0.0] * (1 + len(parts))  # samples, then each loss part (sums over samples)
    waited = 0.0  # seconds spent waiting for the next batch: high means the input pipeline is the bottleneck
    use_bf16 = cfg.bf16 and bf16_supported(device)
    asked = time.perf_counter()
    for batch in batches:
        waited += time.perf_counter() - asked
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            _, losses = _batch_losses(model, batch, cfg, cfg.augment, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        n = len(batch["age"])
        totals = [totals[0] + n, *(t + losses.get(k, torch.zeros(())).item() * n for t, k in zip(totals[1:], parts))]
        progress(totals[0])
        asked = time.perf_counter()
    n, *sums = all_sum(totals, device)
    per = 1 / max(n, 1)
    means = {f"train_{'loss' if k == 'total' else k}": total * per for k, total in zip(parts, sums)}
    return {"train_samples": int(n), **means, "data_wait_s": waited}


@torch.no_grad()
def validate(model, batches: Iterable[dict], cfg: TrainConfig, device) -> dict:
    """Loss, MAE and CA(n) over `batches` in fp32 without augmentation, summed over the data-parallel group;
    with a gender head also its accuracy over the faces whose gender is known."""
    model.eval()
    gender_head = unwrap(model).cfg.gender_head
    sums = [0.0, 0.0, 0.0, 0.0, 0.0, *error_sums([])]  # samples, loss, kl, gender right, gender known, metric sums
    for batch in batches:
        prediction, losses = _batch_losses(model, batch, cfg, None, None)
        n = len(batch["age"])
        right = known = 0.0
        if gender_head and batch.get("gender") is not None:
            labelled = batch["gender"] != UNKNOWN
            right = ((prediction.gender.argmax(1) == batch["gender"]) & labelled).sum().item()
            known = labelled.sum().item()
        batch_sums = [n, losses["total"].item() * n, losses["kl"].item() * n, right, known,
                      *error_sums((prediction.age.float() - batch["age"]).abs().cpu().numpy())]
        sums = [a + b for a, b in zip(sums, batch_sums)]
    n, loss, kl, right, known, *metric_sums = all_sum(sums, device)
    record = {"val_samples": int(n), "val_loss": loss / max(n, 1), "val_kl": kl / max(n, 1), **from_sums(metric_sums, "val_")}
    if gender_head:
        record["val_gender_acc"] = right / known if known else float("nan")
    return record
