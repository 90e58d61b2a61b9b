"""Evaluation protocols on Ray Tune: repeated random splits, leave-one-person-out, and the ablation grid.

Every split, fold or ablation cell (`protocols.plan_trials`) is one Tune trial. The model is tiny, so a trial
trains in its own process (no DDP trainer): it decodes the stored face regions once, trains (or fine-tunes
from `--init-from`) for a fixed number of epochs with the training loop of `c3ae train` (`loop.train_epoch`:
the same batched crops and augmentation), and predicts its test faces once at the end through the inference
path (`inference.predict_regions`). Nothing about the test part steers training: the learning rate follows
the training loss, and there is no early stopping.

OUT (a local path or s3://...):

    config.json         the effective config, written first; a rerun with the same settings resumes
    trials/             the Tune experiment (a rerun restores it: finished trials are kept)
    summary.json        written last: protocol, counts, MAE mean/std, pooled MAE and CA(3/5/7), per-trial rows
    report.md           the same as Markdown tables (the CLI prints it)
    predictions.csv     one row per test face per trial: true and predicted age, the face's gender label and p_female
    trial_mae.png, pred_vs_true.png, error_by_decade.png
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from c3ae_ray import __version__, plots, storage
from c3ae_ray.augment import AugmentConfig
from c3ae_ray.config import build, check, to_dict
from c3ae_ray.faces import FaceData, open_faces, read_faces
from c3ae_ray.inference import predict_regions
from c3ae_ray.loop import batches_of, build_training, hold_faces, step_schedule, train_epoch
from c3ae_ray.metrics import age_metrics
from c3ae_ray.model import count_parameters
from c3ae_ray.protocols import ABLATIONS, PAPER_ABLATIONS, PROTOCOLS, aggregate, format_report, plan_trials, trial_rows
from c3ae_ray.runtime import check_trial_resources, ray_runtime
from c3ae_ray.train import TrainConfig, initial_weights

TRIALS = "trials"  # Tune's experiment name: OUT/trials/
# A resumed evaluation runs the same command: Tune restores its trials' resources and FailureConfig from
# the experiment it saved, so other values would be ignored without a word.
RESUMABLE_CHANGES = {"overwrite"}


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: a protocol over a preprocessed dataset, with the training settings every trial shares."""

    data: str  # a `c3ae preprocess` output (path or s3://)
    out: str  # the report folder (path or s3://); rerunning the same command resumes it
    protocol: str = "splits"
    repeats: int = 10  # splits: number of random splits
    test_size: int = 30  # splits: test images per split (the paper's 30 of FG-NET's 1,002)
    by_subject: bool = False  # splits: the test part is whole people
    seeds: int = 3  # ablation: trials per variant
    variants: tuple[str, ...] = PAPER_ABLATIONS  # ablation; also the seeds' methods (protocols.ABLATIONS)
    aligned_data: str | None = None  # ablation: `c3ae preprocess --align` of the same images, for the aligned rows
    test_fraction: float = 0.1  # ablation: share held out by a hash of subject or path, as in training
    init_from: str | None = None  # fine-tune every trial from this model.pt (splits, lopo)
    epochs: int = 30  # per trial
    batch_size: int = 50
    lr: float | None = None  # None: the paper's 0.005 with SE, 0.002 without
    seed: int = 0  # seeds the splits and each trial's training
    trial_cpus: float = 1.0  # CPUs per trial, may be fractional
    trial_gpus: float = 0.0  # GPUs per trial, may be fractional
    max_failures: int = 2  # retries of a failed trial before it is reported as failed
    overwrite: bool = False  # discard what `out` holds and start over

    def __post_init__(self):
        check(self.protocol in PROTOCOLS, f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        for name in ("repeats", "test_size", "seeds", "epochs", "batch_size"):
            check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        check(0 < self.test_fraction < 1, f"test_fraction must be between 0 and 1, got {self.test_fraction}")
        unknown = sorted(set(self.variants) - set(ABLATIONS))
        check(not unknown and bool(self.variants), f"variants must be among {', '.join(ABLATIONS)}, got {', '.join(self.variants) or 'none'}")
        check(self.trial_cpus > 0 and self.trial_gpus >= 0 and self.max_failures >= 0,
              "trial_cpus must be positive, trial_gpus and max_failures not negative")
        check(not (self.protocol == "ablation" and self.init_from), "the ablation trains every variant from scratch: --init-from does not apply")
        aligned = [v for v in self.variants if ABLATIONS[v].aligned] if self.protocol == "ablation" else []
        check(bool(aligned) == bool(self.aligned_data),
              f"the variants {', '.join(aligned)} need --aligned-data (a `c3ae preprocess --align` output of the same images)"
              if aligned else "--aligned-data is read only by the ablation's aligned variants (protocols.ABLATIONS)")

    def training(self) -> TrainConfig:
        """The training settings every trial shares (`data`/`out` only say where they come from)."""
        return TrainConfig(data=self.data, out=self.out, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           init_from=self.init_from, seed=self.seed)


def run_trial(config: dict, setup: dict) -> None:
    """Tune's function trainable: train one trial's model on its training rows, then predict its test rows.

    Reports the training loss every epoch and, with the last epoch, the test metrics and predictions.
    """
    from ray import tune

    spec = setup["trials"][config["trial"]]
    cfg = build(TrainConfig, spec["train_config"])
    faces = setup["aligned_faces" if spec["aligned"] else "faces"]
    device = torch.device("cuda" if setup["gpus"] > 0 and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(setup["threads"])
    torch.manual_seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    held = hold_faces(faces, setup["region_size"], device)
    model, optimizer, scheduler = build_training(cfg, setup["init_state"], device)
    train_rows, test_rows = torch.as_tensor(spec["train"]), torch.as_tensor(spec["test"], device=device)
    # Test faces whose person this trial trains on: 0 by construction for lopo and --by-subject, and the
    # identity leak of the paper's per-image splits otherwise.
    trained_people = {faces["subject"][i] for i in spec["train"]} - {None}
    overlap = sum(faces["subject"][i] in trained_people for i in spec["test"])
    for epoch in range(1, cfg.epochs + 1):
        batches = batches_of(held, train_rows, cfg.batch_size, shuffle)
        record = train_epoch(model, optimizer, batches, cfg, generator, device)
        step_schedule(scheduler, record["train_l1"])
        report = {"epoch": epoch, "train_loss": record["train_loss"], "train_l1": record["train_l1"], "lr": optimizer.param_groups[0]["lr"]}
        if epoch == cfg.epochs:
            outputs = predict_regions(model, held["region"][test_rows], held["boxes"][test_rows])
            predicted = outputs.age
            if outputs.p_female is not None:
                report["p_female"] = outputs.p_female.round(4).tolist()
            report.update(age_metrics(predicted, faces["age"][spec["test"]]), predicted=predicted.round(3).tolist(),
                          train_faces=record["train_samples"], parameters=count_parameters(model), subject_overlap=overlap)
        tune.report(report)


# --- the driver: plan, run the Tune experiment, write the report ---------------------------------------------------


def _trial_dirname(trial) -> str:
    return f"trial_{trial.config['trial']:03d}"


def _progress_callback(names: list[str], epochs: int, retries: dict):
    """Tune callback on the driver: a line per finished, retried or failed trial, and a status line a minute."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            self.started = self.last = time.perf_counter()

        def _line(self, trials, trial, text: str, ended: int = 0, failed: int = 0) -> None:
            """`ended`/`failed`: this trial's own outcome, which its status may not show yet."""
            retries[trial.config["trial"]] = trial.num_failures
            others = [t for t in trials if t is not trial]
            ended += sum(t.status in ("TERMINATED", "ERROR") for t in others)
            failed += sum(t.status == "ERROR" for t in others)
            print(f"[{ended}/{len(names)} done, {failed} failed] {names[trial.config['trial']]}: {text}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result
            self._line(trials, trial, f"MAE {result['mae']:.2f} on {result['faces']} test faces", ended=1)

        def on_trial_recover(self, iteration, trials, trial, **info):
            self._line(trials, trial, f"failed, retrying ({trial.num_failures} failure(s) so far)")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, trial, "FAILED", ended=1, failed=1)

        def on_step_end(self, iteration, trials, **info):
            now = time.perf_counter()
            if now - self.last >= 60:
                self.last = now
                ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
                running = [f"{names[t.config['trial']]} (epoch {(t.last_result or {}).get('epoch', 0)}/{epochs})"
                           for t in trials if t.status == "RUNNING"]
                print(f"{ended}/{len(names)} trials done after {now - self.started:.0f} s; running: "
                      f"{', '.join(running) or 'none'}", flush=True)

    return Progress()


def _tuner(cfg: EvalConfig, trainable, filesystem, out: str, resuming: bool, names: list[str], retries: dict):
    """A new Tune experiment over the planned trials, or the saved one restored (finished trials are kept)."""
    from ray import tune

    experiment = f"{out}/{TRIALS}"
    if resuming and tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        print(f"resuming {experiment}: finished trials are kept, failed ones run again", flush=True)
        return tune.Tuner.restore(experiment, trainable, restart_errored=True, storage_filesystem=filesystem)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(range(len(names))))},
        tune_config=tune.TuneConfig(trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=TRIALS, storage_path=out, storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            verbose=0,  # the callback's lines are the progress
            callbacks=[_progress_callback(names, cfg.epochs, retries)],
        ),
    )


def evaluate(cfg: EvalConfig) -> dict:
    """Run (or resume) one protocol as a Tune experiment; -> the summary (also OUT/summary.json)."""
    from ray import tune

    started = time.perf_counter()
    data = open_faces(cfg.data)
    faces = read_faces(data)
    aligned_faces = None
    if cfg.aligned_data:
        faces, aligned_faces = _same_images(data, faces, open_faces(cfg.aligned_data))
    plan = plan_trials(cfg, faces["path"], faces["subject"])
    base, init_state, init_provenance = initial_weights(cfg.training(), data.crop)
    for spec in plan:
        spec["train_config"] = to_dict(replace(base, seed=spec["seed"], model=replace(base.model, **spec["switches"]),
                                               augment=AugmentConfig() if spec["augment"] else None))
    filesystem, out = storage.resolve(cfg.out)
    setup = {"trials": plan, "faces": faces, "aligned_faces": aligned_faces, "init_state": init_state, "region_size": data.crop.region_size,
             "threads": max(1, int(cfg.trial_cpus)), "gpus": cfg.trial_gpus}
    retries: dict[int, int] = {}
    # Tune saves the experiment state (which trials finished) at most every 10 s by default; trials take
    # seconds to minutes and the state is small, so save it every 2 s: a killed run loses less when resumed.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    with ray_runtime():
        check_trial_resources(cfg.trial_cpus, cfg.trial_gpus)
        resuming = storage.prepare_run_dir(filesystem, out, cfg.out, to_dict(cfg), cfg.overwrite, RESUMABLE_CHANGES, "evaluation")
        print(f"evaluating {cfg.data} ({len(faces['path'])} faces): {cfg.protocol}, {len(plan)} trials of {cfg.epochs} epochs, "
              f"{'fine-tuned from ' + cfg.init_from if cfg.init_from else 'from scratch'}, "
              f"{cfg.trial_cpus:g} CPU{f' and {cfg.trial_gpus:g} GPU' if cfg.trial_gpus else ''} per trial", flush=True)
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": cfg.trial_cpus, "gpu": cfg.trial_gpus})
        grid = _tuner(cfg, trainable, filesystem, out, resuming, [t["name"] for t in plan], retries).fit()
        # by the trial's folder (`_trial_dirname`): a trial killed before it started has no config in its result
        results = {int(os.path.basename(result.path).removeprefix("trial_")): result for result in grid}
    rows, predictions = trial_rows(plan, faces, results, retries)
    summary = _summarize(cfg, data, len(faces["path"]), rows, predictions, init_provenance, time.perf_counter() - started)
    _write_report(filesystem, out, summary, predictions)
    return summary


def _same_images(data: FaceData, faces: dict, aligned: FaceData) -> tuple[dict, dict]:
    """The faces that both preprocessings kept, in one order, so that every ablation row (aligned or not)
    trains and tests on the same images: (plain faces, aligned faces), each a `read_faces` dict."""
    check(aligned.crop.align, f"--aligned-data {aligned.location} was preprocessed without --align")
    check(aligned.crop.region_size == data.crop.region_size,
          f"--aligned-data has {aligned.crop.region_size}px regions, --data {data.crop.region_size}px: preprocess both with one geometry")
    aligned_faces = read_faces(aligned)
    where = {path: i for i, path in enumerate(aligned_faces["path"])}
    both = [i for i, path in enumerate(faces["path"]) if path in where]
    check(bool(both), "--data and --aligned-data share no images (matched by source path)")
    print(f"aligned rows: {len(both)} images in both preprocessings; left out: {len(faces['path']) - len(both)} only in --data, "
          f"{len(aligned_faces['path']) - len(both)} only in --aligned-data", flush=True)
    return _rows(faces, both), _rows(aligned_faces, [where[faces["path"][i]] for i in both])


def _rows(faces: dict, rows: list[int]) -> dict:
    """A `read_faces` dict cut down to `rows`, in that order."""
    return {name: column[rows] if isinstance(column, np.ndarray) else [column[i] for i in rows] for name, column in faces.items()}


def _summarize(cfg: EvalConfig, data: FaceData, images: int, rows, predictions, init_provenance, elapsed: float) -> dict:
    groups = list(dict.fromkeys(r["group"] for r in rows))
    return {
        "protocol": cfg.protocol,
        "data": data.describe(),
        "aligned_data": cfg.aligned_data,
        "images": images,  # the faces the trials drew from (with aligned rows: those both preprocessings kept)
        "out": cfg.out,
        **aggregate(rows, predictions),
        "failed_trials": [{"name": r["name"], "error": r["error"]} for r in rows if r["status"] == "failed"],
        "groups": {g: aggregate([r for r in rows if r["group"] == g], [p for p in predictions if p["group"] == g]) for g in groups},
        "init_from": init_provenance,
        "rows": rows,
        "elapsed_s": round(elapsed, 1),
        "config": to_dict(cfg),
        "c3ae_ray_version": __version__,
    }


def _write_report(filesystem, out: str, summary: dict, predictions: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["trial", "group", "path", "subject", "age", "predicted", "gender", "p_female"])
    writer.writeheader()
    writer.writerows(predictions)
    groups = {g: (np.array([p["age"] for p in predictions if p["group"] == g]), np.array([p["predicted"] for p in predictions if p["group"] == g]))
              for g in dict.fromkeys(p["group"] for p in predictions)}
    outputs = {
        "predictions.csv": text.getvalue().encode(),
        "report.md": format_report(summary).encode(),
        "trial_mae.png": plots.png(plots.trial_mae(summary["rows"])),
        "pred_vs_true.png": plots.png(plots.pred_vs_true(groups)),
        "error_by_decade.png": plots.png(plots.error_by_decade(groups)),
    }
    for name, content in outputs.items():
        with filesystem.open_output_stream(f"{out}/{name}") as stream:
            stream.write(content)
    storage.write_json(filesystem, f"{out}/{storage.SUMMARY}", summary)
