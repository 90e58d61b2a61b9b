"""Evaluation protocols on Ray Tune: repeated random splits, leave-one-person-out, and the ablation grid.

Every split, fold or ablation cell is one Tune trial. The model is tiny, so a trial trains in its own
process (no DDP trainer): it decodes the stored face regions once, trains (or fine-tunes from
`--init-from`) for a fixed number of epochs with the training stage's step (`train.train_epoch`, the same
batched crops and augmentation), and predicts its test faces once at the end. Nothing about the test part
steers training: the learning rate follows the training loss, and there is no early stopping.

Protocols:
    splits    the paper's FG-NET protocol: `repeats` seeded random splits of `test_size` test images; with
              `by_subject` the test part is whole people (identity-disjoint), drawn until it holds test_size
    lopo      leave one person out: one fold per subject, the literature's FG-NET standard
    ablation  full, no-context, no-cascade, no-augment, no-SE x `seeds` on one hash split (as training's)

OUT (a local path or s3://...):

    config.json         the effective config, written first; a rerun with the same settings resumes
    trials/             the Tune experiment (a rerun restores it: finished trials are kept)
    summary.json        written last: protocol, counts, MAE mean/std, pooled MAE and CA(3/5/7), per-trial rows
    report.md           the same as Markdown tables (the CLI prints it)
    predictions.csv     one row per test face per trial: true and predicted age
    trial_mae.png, pred_vs_true.png, error_by_decade.png
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from c3ae_ray import __version__, storage
from c3ae_ray.augment import AugmentConfig
from c3ae_ray.model import VARIANTS, C3AE, ModelConfig, count_parameters
from c3ae_ray.runtime import ray_runtime
from c3ae_ray.score import predict_regions
from c3ae_ray.train import (
    CA_YEARS,
    FaceData,
    TrainConfig,
    decode_regions,
    in_validation,
    initial_weights,
    lr_scheduler,
    open_faces,
    split_key,
    step_schedule,
    train_epoch,
)

PROTOCOLS = ("splits", "lopo", "ablation")


def _switches(variant: ModelConfig) -> dict:
    """The fields where a model variant differs from the full model."""
    full = asdict(ModelConfig())
    return {k: v for k, v in asdict(variant).items() if v != full[k]}


# The paper's ablation (Fig. 5): each variant drops one ingredient of the full model (model.VARIANTS), or
# the training augmentation. name -> (model switches, augmentation on)
ABLATIONS: dict[str, tuple[dict, bool]] = {
    name: (_switches(VARIANTS["full" if name == "no-augment" else name]), name != "no-augment")
    for name in ("full", "no-context", "no-cascade", "no-augment", "no-se")
}
TRIALS = "trials"  # Tune's experiment name: OUT/trials/
# A resumed evaluation runs the same command: Tune restores its trials' resources and FailureConfig from
# the experiment it saved, so other values would be ignored without a word.
RESUMABLE_CHANGES = {"overwrite"}
DECADE = 10


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: a protocol over a preprocessed dataset, with the training settings every trial shares."""

    data: str
    out: str
    protocol: str = "splits"
    repeats: int = 10  # splits
    test_size: int = 30  # splits: test images per split (the paper's 30 of FG-NET's 1,002)
    by_subject: bool = False  # splits: the test part is whole people
    seeds: int = 3  # ablation: trials per variant
    variants: tuple[str, ...] = tuple(ABLATIONS)  # ablation
    test_fraction: float = 0.1  # ablation: share held out by a hash of subject or path, as in training
    init_from: str | None = None  # fine-tune every trial from this model.pt (splits, lopo)
    epochs: int = 30
    batch_size: int = 50
    lr: float | None = None  # None: the paper's 0.005 with SE, 0.002 without
    seed: int = 0
    trial_cpus: float = 1.0
    trial_gpus: float = 0.0
    max_failures: int = 2  # retries of a failed trial before it is reported as failed
    overwrite: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "variants": list(self.variants)}

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        for name in ("repeats", "test_size", "seeds", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be between 0 and 1, got {self.test_fraction}")
        unknown = sorted(set(self.variants) - set(ABLATIONS))
        if unknown or not self.variants:
            raise ValueError(f"variants must be among {', '.join(ABLATIONS)}, got {', '.join(self.variants) or 'none'}")
        if self.trial_cpus <= 0 or self.trial_gpus < 0 or self.max_failures < 0:
            raise ValueError("trial_cpus must be positive, trial_gpus and max_failures not negative")
        if self.protocol == "ablation" and self.init_from:
            raise ValueError("the ablation trains every variant from scratch: --init-from does not apply")

    def training(self) -> TrainConfig:
        """The training settings every trial shares (`data`/`out` only say where they come from)."""
        return TrainConfig(
            data=self.data, out=self.out, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
            init_from=self.init_from, seed=self.seed,
        )


# --- the plan: which faces each trial trains and tests on (no Ray, no torch) ---------------------------------


def plan_trials(cfg: EvalConfig, paths: list[str], subjects: list[str | None]) -> list[dict]:
    """-> one dict per trial: name, group, seed, model switches, augment, train and test row indices."""
    n = len(paths)
    keys = [split_key(p, s) for p, s in zip(paths, subjects)]
    rows = np.arange(n)

    def trial(name: str, group: str, test: np.ndarray, seed: int, switches: dict | None = None, augment=True) -> dict:
        test = np.sort(test)
        train = np.setdiff1d(rows, test)
        if not len(test) or not len(train):
            raise ValueError(f"{name}: {len(train)} training and {len(test)} test faces; both parts need faces")
        return {"name": name, "group": group, "seed": seed, "switches": switches or {}, "augment": augment,
                "train": train.tolist(), "test": test.tolist()}

    if cfg.protocol in ("lopo", "ablation") or cfg.by_subject:
        missing = sum(s is None for s in subjects)
        if missing and cfg.protocol != "ablation":
            raise ValueError(
                f"{cfg.protocol}{' --by-subject' if cfg.by_subject else ''} needs a subject for every face; "
                f"{missing} of {n} have none (FG-NET names carry them: PPPAaa.JPG)"
            )
    if cfg.protocol == "splits":
        if cfg.test_size >= n:
            raise ValueError(f"--test-size {cfg.test_size} leaves no training faces: the data has {n}")
        trials = []
        for repeat in range(cfg.repeats):
            rng = np.random.default_rng([cfg.seed, repeat])
            if cfg.by_subject:  # whole people, drawn in random order until the test part holds test_size faces
                sizes = Counter(keys)
                people = sorted(sizes)
                chosen, size = set(), 0
                for key in (people[i] for i in rng.permutation(len(people))):
                    if size >= cfg.test_size:
                        break
                    chosen.add(key)
                    size += sizes[key]
                test = rows[np.array([key in chosen for key in keys])]
            else:
                test = rng.choice(n, size=cfg.test_size, replace=False)
            trials.append(trial(f"split {repeat + 1:02d}", "splits", test, cfg.seed + repeat))
        return trials
    if cfg.protocol == "lopo":
        people = sorted(set(subjects))
        if len(people) < 2:
            raise ValueError(f"lopo needs at least 2 subjects, the data has {len(people)}")
        return [trial(f"subject {person}", "lopo", rows[np.asarray(subjects) == person], cfg.seed) for person in people]
    test = rows[np.array([in_validation(key, cfg.test_fraction) for key in keys], dtype=bool)]
    return [
        trial(f"{variant} seed {cfg.seed + i}", variant, test, cfg.seed + i, *ABLATIONS[variant])
        for variant in cfg.variants
        for i in range(cfg.seeds)
    ]


# --- one trial (runs in a Tune actor) ----------------------------------------------------------------------------


def age_metrics(predicted: np.ndarray, true: np.ndarray) -> dict:
    """MAE and the cumulative accuracies CA(n): the share of faces within n years."""
    errors = np.abs(np.asarray(predicted, dtype=np.float64) - np.asarray(true, dtype=np.float64))
    if not len(errors):
        return {"faces": 0, "mae": None, **{f"ca{years}": None for years in CA_YEARS}}
    return {"faces": int(len(errors)), "mae": float(errors.mean()),
            **{f"ca{years}": float((errors <= years).mean()) for years in CA_YEARS}}


def run_trial(config: dict, setup: dict) -> None:
    """Tune's function trainable: train one trial's model on its training rows, then predict its test rows.

    Reports the training loss every epoch and, with the last epoch, the test metrics and predictions.
    """
    from ray import tune

    spec = setup["trials"][config["trial"]]
    cfg = TrainConfig.from_dict(spec["train_config"])
    faces = setup["faces"]
    use_gpu = setup["gpus"] > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    if not use_gpu:
        torch.set_num_threads(setup["threads"])
    torch.manual_seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    regions = torch.from_numpy(decode_regions(faces["jpeg"], faces["path"], setup["region_size"])).to(device)
    boxes = torch.tensor(faces["boxes"], device=device)  # a copy: arrays from the object store are read-only
    ages = torch.tensor(faces["age"], device=device)
    model = C3AE(cfg.model).to(device)
    if setup["init_state"] is not None:
        model.load_state_dict(setup["init_state"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = lr_scheduler(optimizer, cfg)
    train_rows = torch.as_tensor(spec["train"])
    test_rows = torch.as_tensor(spec["test"])
    # Test faces whose person this trial trains on: 0 by construction for lopo and --by-subject, and the
    # identity leak of the paper's per-image splits otherwise.
    trained_people = {faces["subject"][i] for i in spec["train"]} - {None}
    overlap = sum(faces["subject"][i] in trained_people for i in spec["test"])
    for epoch in range(1, cfg.epochs + 1):
        order = train_rows[torch.randperm(len(train_rows), generator=shuffle)].to(device)
        batches = ({"region": regions[b], "boxes": boxes[b], "age": ages[b]} for b in order.split(cfg.batch_size))
        record = train_epoch(model, optimizer, batches, cfg, setup["crop_size"], generator, device, lambda seen: None)
        step_schedule(scheduler, record["train_l1"])
        report = {"epoch": epoch, "train_loss": record["train_loss"], "train_l1": record["train_l1"],
                  "lr": optimizer.param_groups[0]["lr"]}
        if epoch == cfg.epochs:
            predicted, _ = predict_regions(model, regions[test_rows.to(device)], boxes[test_rows.to(device)], setup["crop_size"])
            report.update(
                age_metrics(predicted, faces["age"][spec["test"]]),
                predicted=predicted.round(3).tolist(),
                train_faces=record["train_samples"],
                parameters=count_parameters(model),
                subject_overlap=overlap,
            )
        tune.report(report)


# --- the driver: plan, run the Tune experiment, write the report ---------------------------------------------------


def read_faces(data: FaceData) -> dict:
    """The columns trials need, as plain arrays (put in the object store once for every trial)."""
    import pyarrow.dataset as pads

    table = pads.dataset(data.files, filesystem=data.filesystem, format="parquet").to_table(
        columns=["path", "subject", "age", "region_jpeg", "region_boxes"]
    )
    return {
        "path": table.column("path").to_pylist(),
        "subject": table.column("subject").to_pylist(),
        "age": table.column("age").to_numpy(zero_copy_only=False).astype(np.float32),
        "jpeg": table.column("region_jpeg").to_pylist(),
        "boxes": np.asarray(table.column("region_boxes").to_pylist(), dtype=np.float32).reshape(
            len(table), len(data.crop.scales), 4
        ),
    }


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
                running = [
                    f"{names[t.config['trial']]} (epoch {(t.last_result or {}).get('epoch', 0)}/{epochs})"
                    for t in trials if t.status == "RUNNING"
                ]
                print(f"{ended}/{len(names)} trials done after {now - self.started:.0f} s; running: "
                      f"{', '.join(running) or 'none'}", flush=True)

    return Progress()


def evaluate(cfg: EvalConfig) -> dict:
    """Run (or resume) one protocol as a Tune experiment; -> the summary (also OUT/summary.json)."""
    from ray import tune

    started = time.perf_counter()
    cfg.validate()
    data = open_faces(cfg.data)
    faces = read_faces(data)
    plan = plan_trials(cfg, faces["path"], faces["subject"])
    base, init_state, init_provenance = initial_weights(cfg.training(), data.crop)
    for spec in plan:
        spec["train_config"] = replace(
            base,
            seed=spec["seed"],
            model=replace(base.model, **spec["switches"]),
            augment=AugmentConfig() if spec["augment"] else None,
        ).to_dict()
    filesystem, out = storage.resolve(cfg.out)
    setup = {
        "trials": plan,
        "faces": faces,
        "init_state": init_state,
        "crop_size": data.crop.size,
        "region_size": data.crop.region_size,
        "threads": max(1, int(cfg.trial_cpus)),
        "gpus": cfg.trial_gpus,
    }
    retries: dict[int, int] = {}
    # Tune saves the experiment state (which trials finished) at most every 10 s by default; trials take
    # seconds to minutes and the state is small, so save it every 2 s: a killed run loses less when resumed.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    with ray_runtime() as ray:
        _check_trial_resources(cfg, ray.cluster_resources())
        resuming = storage.prepare_run_dir(filesystem, out, cfg.out, cfg.to_dict(), cfg.overwrite, RESUMABLE_CHANGES, "evaluation")
        print(
            f"evaluating {cfg.data} ({len(faces['path'])} faces): {cfg.protocol}, {len(plan)} trials of {cfg.epochs} epochs, "
            f"{'fine-tuned from ' + cfg.init_from if cfg.init_from else 'from scratch'}, "
            f"{cfg.trial_cpus:g} CPU{f' and {cfg.trial_gpus:g} GPU' if cfg.trial_gpus else ''} per trial",
            flush=True,
        )
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, setup=setup), {"cpu": cfg.trial_cpus, "gpu": cfg.trial_gpus}
        )
        experiment = f"{out}/{TRIALS}"
        if resuming and tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
            print(f"resuming {experiment}: finished trials are kept, failed ones run again", flush=True)
            tuner = tune.Tuner.restore(experiment, trainable, restart_errored=True, storage_filesystem=filesystem)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(list(range(len(plan))))},
                tune_config=tune.TuneConfig(trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=TRIALS,
                    storage_path=out,
                    storage_filesystem=filesystem,
                    failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                    verbose=0,  # the callback's lines are the progress
                    callbacks=[_progress_callback([t["name"] for t in plan], cfg.epochs, retries)],
                ),
            )
        grid = tuner.fit()
        results = {result.config["trial"]: result for result in grid}
    rows, predictions = _trial_rows(plan, faces, results, retries)
    summary = _summarize(cfg, data, rows, predictions, init_provenance, time.perf_counter() - started)
    _write_report(filesystem, out, summary, predictions)
    return summary


def _check_trial_resources(cfg: EvalConfig, cluster: dict) -> None:
    """A trial that asks for more than the cluster has would wait forever: say so instead."""
    for name, wanted in (("CPU", cfg.trial_cpus), ("GPU", cfg.trial_gpus)):
        if wanted > cluster.get(name, 0):
            raise ValueError(f"--trial-{name.lower()}s {wanted:g}: the cluster has {cluster.get(name, 0):g} {name}s")


def _short_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:300]


def _trial_rows(plan: list[dict], faces: dict, results: dict, retries: dict) -> tuple[list[dict], list[dict]]:
    """One row per planned trial, failed or not (a trial missing from the results counts as failed)."""
    rows, predictions = [], []
    for index, spec in enumerate(plan):
        result = results.get(index)
        test = spec["test"]
        row = {
            "trial": index,
            "name": spec["name"],
            "group": spec["group"],
            "seed": spec["seed"],
            "train_size": len(spec["train"]),
            "test_size": len(test),
            "test_subjects": sorted({faces["subject"][i] for i in test if faces["subject"][i] is not None}),
            "retries": retries.get(index),
        }
        metrics = result.metrics if result is not None else {}
        if result is None or result.error is not None or "mae" not in metrics:
            reason = _short_error(result.error) if result is not None and result.error else "no result"
            rows.append({**row, "status": "failed", "error": reason})
            continue
        rows.append({
            **row,
            "status": "ok",
            **{k: round(metrics[k], 4) for k in ("mae", *(f"ca{y}" for y in CA_YEARS))},
            "trained_faces": metrics["train_faces"],
            "parameters": metrics["parameters"],
            "subject_overlap": metrics["subject_overlap"],
        })
        for i, predicted in zip(test, metrics["predicted"]):
            predictions.append({"trial": index, "group": spec["group"], "path": faces["path"][i],
                                "subject": faces["subject"][i], "age": float(faces["age"][i]), "predicted": predicted})
    return rows, predictions


def _aggregate(rows: list[dict], predictions: list[dict]) -> dict:
    """MAE mean and std over completed trials, and MAE / CA(n) pooled over all their test predictions."""
    maes = [r["mae"] for r in rows if r["status"] == "ok"]
    pooled = age_metrics([p["predicted"] for p in predictions], [p["age"] for p in predictions])
    return {
        "trials": len(rows),
        "completed": len(maes),
        "failed": len(rows) - len(maes),
        "mae_mean": round(float(np.mean(maes)), 4) if maes else None,
        "mae_std": round(float(np.std(maes)), 4) if maes else None,
        "pooled_mae": round(pooled["mae"], 4) if maes else None,
        **{f"ca{y}": round(pooled[f"ca{y}"], 4) if maes else None for y in CA_YEARS},
        "test_faces": pooled["faces"],
    }


def _summarize(cfg: EvalConfig, data: FaceData, rows, predictions, init_provenance, elapsed: float) -> dict:
    groups = list(dict.fromkeys(r["group"] for r in rows))
    return {
        "protocol": cfg.protocol,
        "data": data.describe(),
        "out": cfg.out,
        **_aggregate(rows, predictions),
        "failed_trials": [{"name": r["name"], "error": r["error"]} for r in rows if r["status"] == "failed"],
        "groups": {g: _aggregate([r for r in rows if r["group"] == g], [p for p in predictions if p["group"] == g]) for g in groups},
        "init_from": init_provenance,
        "rows": rows,
        "elapsed_s": round(elapsed, 1),
        "config": cfg.to_dict(),
        "c3ae_ray_version": __version__,
    }


def _write_report(filesystem, out: str, summary: dict, predictions: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["trial", "group", "path", "subject", "age", "predicted"])
    writer.writeheader()
    writer.writerows(predictions)
    groups = _by_group(predictions)
    outputs = {
        "predictions.csv": text.getvalue().encode(),
        "report.md": format_report(summary).encode(),
        "trial_mae.png": plot_trial_mae(summary["rows"]),
        "pred_vs_true.png": plot_pred_vs_true(groups),
        "error_by_decade.png": plot_error_by_decade(groups),
    }
    for name, content in outputs.items():
        with filesystem.open_output_stream(f"{out}/{name}") as stream:
            stream.write(content)
    storage.write_json(filesystem, f"{out}/{storage.SUMMARY}", summary)


def _by_group(predictions: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    groups = list(dict.fromkeys(p["group"] for p in predictions))
    return {
        g: (np.array([p["age"] for p in predictions if p["group"] == g]), np.array([p["predicted"] for p in predictions if p["group"] == g]))
        for g in groups
    }


# --- the report ------------------------------------------------------------------------------------------------------


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(summary: dict) -> str:
    """The Markdown report: the result per group (protocol or ablation variant), then one row per trial."""
    cfg = summary["config"]
    how = f"fine-tuned from {cfg['init_from']}" if cfg["init_from"] else "trained from scratch"
    lines = [
        f"# C3AE {summary['protocol']} on {summary['data']['location']}",
        "",
        f"{summary['trials']} trials ({summary['completed']} completed, {summary['failed']} failed), "
        f"{cfg['epochs']} epochs each, {how}; {summary['data']['faces']} faces.",
        "MAE mean ± std is over completed trials; pooled MAE and CA(n) are over all their test predictions.",
        "",
        "| | trials | MAE mean ± std | pooled MAE | CA(3) | CA(5) | CA(7) | test faces |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group, agg in summary["groups"].items():
        failed = f" ({agg['failed']} failed)" if agg["failed"] else ""
        lines.append(
            f"| {group} | {agg['completed']}/{agg['trials']}{failed} | {_number(agg['mae_mean'])} ± {_number(agg['mae_std'])} "
            f"| {_number(agg['pooled_mae'])} | {_number(agg['ca3'], 3)} | {_number(agg['ca5'], 3)} | {_number(agg['ca7'], 3)} "
            f"| {agg['test_faces']} |"
        )
    lines += [
        "",
        "Overlap: test faces whose person is also in the trial's training faces (0 for identity-disjoint protocols).",
        "",
        "| trial | test subjects | train | test | overlap | MAE | CA(3) | CA(5) | CA(7) | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        subjects = ", ".join(row["test_subjects"][:5]) + (f" (+{len(row['test_subjects']) - 5})" if len(row["test_subjects"]) > 5 else "")
        status = "ok" if row["status"] == "ok" else f"FAILED: {row['error']}"
        if row["retries"]:
            status += f" after {row['retries']} retr{'y' if row['retries'] == 1 else 'ies'}"
        lines.append(
            f"| {row['name']} | {subjects or '-'} | {row['train_size']} | {row['test_size']} | {row.get('subject_overlap', '-')} "
            f"| {_number(row.get('mae'))} "
            f"| {_number(row.get('ca3'), 3)} | {_number(row.get('ca5'), 3)} | {_number(row.get('ca7'), 3)} | {status} |"
        )
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height))


def _png(plt, figure) -> bytes:
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    return png.getvalue()


def plot_trial_mae(rows: list[dict]) -> bytes:
    """Test MAE per trial (a bar each, coloured by group); a failed trial is a red cross on the axis."""
    plt, figure, axes = _figure(max(6.0, 0.22 * len(rows) + 2), 4)
    groups = list(dict.fromkeys(r["group"] for r in rows))
    colours = {g: f"C{i}" for i, g in enumerate(groups)}
    for x, row in enumerate(rows):
        if row["status"] == "ok":
            axes.bar(x, row["mae"], color=colours[row["group"]], label=row["group"])
        else:
            axes.plot(x, 0, "rx", markersize=10, label="failed")
    maes = [r["mae"] for r in rows if r["status"] == "ok"]
    if maes:
        axes.axhline(np.mean(maes), color="k", linestyle="--", linewidth=1, label=f"mean {np.mean(maes):.2f}")
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=90, fontsize=7)
    axes.set(ylabel="test MAE (years)", title="MAE per trial")
    return _png(plt, figure)


def plot_pred_vs_true(groups: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Predicted against true age for every test face, with the diagonal of a perfect estimate."""
    plt, figure, axes = _figure(5.5, 5)
    top = 1.0
    for group, (true, predicted) in groups.items():
        axes.scatter(true, predicted, s=8, alpha=0.5, label=group)
        top = max(top, float(np.max(true, initial=0)), float(np.max(predicted, initial=0)))
    axes.plot([0, top], [0, top], "k--", linewidth=1)
    axes.set(xlabel="true age", ylabel="predicted age", title="predicted vs true age", xlim=(0, top * 1.05), ylim=(0, top * 1.05))
    if groups:
        axes.legend(fontsize=8)
    return _png(plt, figure)


def plot_error_by_decade(groups: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """MAE per true-age decade (bars per group), with the number of faces in each decade: where data is thin."""
    plt, figure, axes = _figure(8, 4)
    decades = sorted({int(a // DECADE) for true, _ in groups.values() for a in true})
    width = 0.8 / max(1, len(groups))
    for g, (group, (true, predicted)) in enumerate(groups.items()):
        which = (true // DECADE).astype(int)
        for d, decade in enumerate(decades):
            mask = which == decade
            if mask.any():
                x = d + (g - (len(groups) - 1) / 2) * width
                mae = np.abs(predicted[mask] - true[mask]).mean()
                axes.bar(x, mae, width, color=f"C{g}", label=group)
                if len(groups) == 1:
                    axes.annotate(f"n={int(mask.sum())}", (x, mae), ha="center", va="bottom", fontsize=8)
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        axes.legend(unique.values(), unique.keys(), fontsize=8)
    axes.set_xticks(range(len(decades)), [f"{d * DECADE}-{d * DECADE + DECADE - 1}" for d in decades])
    axes.set(xlabel="true age", ylabel="MAE (years)", title="error by age decade")
    return _png(plt, figure)

