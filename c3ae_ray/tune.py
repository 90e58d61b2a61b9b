"""`c3ae tune`: search the training recipe on Ray Tune, stop the weak trials early, write the best recipe.

A trial trains one recipe in its own process, as an evaluation trial does: the faces are decoded once into
memory (`loop.hold_faces`), each epoch is `loop.train_epoch`, the training loop of `c3ae train`, then
`loop.validate` on training's own hash split (`val_fraction` of the base recipe). It reports the validation MAE
every epoch to the scheduler (ASHA or HyperBand), which stops or pauses the weaker trials. Every trial starts
from the same seed, so settings alone tell them apart. Every epoch leaves a checkpoint: a trial that HyperBand
paused, that failed and is retried, or that a rerun resumes continues from its last epoch.

SPACE (YAML) maps training settings, nested as in `c3ae train --config` or dotted (`model.dropout_head`), to
one distribution each: `{loguniform: [low, high]}`, `{uniform: [low, high]}`, `{randint: [low, high]}` (high
excluded) or `{choice: [a, b, ...]}`. What it does not search comes from `--base` (a `c3ae train --config`
YAML) or `c3ae train`'s defaults.

OUT (a local path or s3://...):

    config.json           the effective config; rerunning the same command resumes the search
    trials/               the Tune experiment (finished trials are kept on a rerun)
    trials.csv, trials.md every trial: its settings, status (finished, stopped early, failed), epochs run, best
                          validation MAE and its epoch, failures (each retried up to max_failures), error
    best.yaml             the best trial's whole recipe: `c3ae train --config best.yaml --out RUN_DIR`
    curves.png            validation MAE per epoch of every trial
    settings.png          each searched setting against the trial's best validation MAE
    summary.json          written last
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import yaml

from c3ae_ray import __version__, plots, storage
from c3ae_ray.config import UserError, build, check, load_yaml, merge, nest, to_dict
from c3ae_ray.faces import open_faces, read_faces
from c3ae_ray.loop import batches_of, build_training, hold_faces, step_schedule, train_epoch, validate
from c3ae_ray.runtime import check_trial_resources, ray_runtime
from c3ae_ray.train import TrainConfig

TRIALS = "trials"  # Tune's experiment name: OUT/trials/
STATE_FILE = "state.pt"
SCHEDULERS = ("asha", "hyperband")
SEARCHES = ("random", "optuna")
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
# What a search may not vary: where the data and the run are, the trial budget and seed (the search's own), and
# settings that need another machine or another model (workers, GPUs, ensembles, fine-tuning).
NOT_SEARCHABLE = {"data", "out", "val_data", "val_fraction", "epochs", "seed", "workers", "gpu", "members", "init_from",
                  "overwrite", "max_failures", "data_cache"}
RESUMABLE_CHANGES = {"overwrite"}  # Tune restores the rest from the experiment it saved


@dataclass(frozen=True)
class TuneConfig:
    """One search: a space over the training settings, a budget, and how trials are stopped and drawn."""

    data: str  # a `c3ae preprocess` output (path or s3://)
    out: str  # the search folder (path or s3://); rerunning the same command resumes it
    space: str  # the YAML of distributions (path or s3://)
    base: str | None = None  # a `c3ae train --config` YAML for the settings the space leaves alone
    trials: int = 24
    epochs: int = 10  # the most a trial trains; the scheduler stops weaker ones sooner
    scheduler: str = "asha"
    search: str = "random"  # random sampling, or optuna's TPE (the `tune` extra)
    grace_epochs: int = 1  # asha: epochs every trial trains before it may be stopped
    reduction_factor: int = 3  # of the trials kept at each rung
    concurrent: int | None = None  # trials at once; none: as many as the cluster's CPUs (or GPUs) hold
    trial_cpus: float = 1.0
    trial_gpus: float = 0.0
    seed: int = 0  # draws the settings and seeds every trial's training
    max_failures: int = 1  # retries of a failed trial before it is reported failed
    overwrite: bool = False

    def __post_init__(self):
        check(self.scheduler in SCHEDULERS, f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        check(self.search in SEARCHES, f"search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        for name in ("trials", "epochs", "grace_epochs"):
            check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        check(self.grace_epochs <= self.epochs, f"grace_epochs ({self.grace_epochs}) must not exceed epochs ({self.epochs})")
        check(self.reduction_factor >= 2, f"reduction_factor must be at least 2, got {self.reduction_factor}")
        check(self.concurrent is None or self.concurrent >= 1, f"concurrent must be at least 1, got {self.concurrent}")
        check(self.trial_cpus > 0 and self.trial_gpus >= 0 and self.max_failures >= 0,
              "trial_cpus must be positive, trial_gpus and max_failures not negative")


# --- the space ----------------------------------------------------------------------------------------------------


def read_space(location: str) -> dict[str, tuple[str, list]]:
    """SPACE YAML -> {dotted setting: (distribution, its arguments)}, checked against TrainConfig."""
    flat: dict[str, tuple[str, list]] = {}

    def walk(mapping, prefix: str) -> None:
        if not isinstance(mapping, dict):
            raise UserError(f"space: {prefix.rstrip('.') or 'the file'}: expected a mapping, got {mapping!r}")
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS:
                flat[name] = _distribution(name, *next(iter(value.items())))
            elif isinstance(value, dict):
                walk(value, f"{name}.")
            else:
                raise UserError(f"space: {name}: expected one of {', '.join(DISTRIBUTIONS)} as {{kind: arguments}}, got {value!r}")

    walk(load_yaml(location), "")
    if not flat:
        raise UserError(f"space {location}: no setting to search")
    fixed = sorted(name for name in flat if name.split(".")[0] in NOT_SEARCHABLE)
    if fixed:
        raise UserError(f"space: {', '.join(fixed)} cannot be searched (the search sets them)")
    for index in (0, -1):  # every setting must exist and accept its range's ends
        build(TrainConfig, merge({"data": "", "out": ""}, nest({name: _end(kind, args, index) for name, (kind, args) in flat.items()})), "space")
    return flat


def _distribution(name: str, kind: str, args) -> tuple[str, list]:
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise UserError(f"space: {name}: choice needs a non-empty list, got {args!r}")
        return kind, args
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise UserError(f"space: {name}: {kind} needs [low, high], got {args!r}")
    low, high = args
    if not low < high:
        raise UserError(f"space: {name}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"space: {name}: loguniform needs positive bounds, got {args!r}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise UserError(f"space: {name}: randint needs whole numbers, got {args!r}")
    return kind, args


def _end(kind: str, args: list, index: int):
    return args[index] - 1 if kind == "randint" and index == -1 else args[index]


def tune_domains(space: dict[str, tuple[str, list]]) -> dict:
    """The space as Tune's sampling domains, keyed by dotted setting."""
    from ray import tune

    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(*a), "choice": tune.choice}
    return {name: make[kind](args) for name, (kind, args) in space.items()}


def trial_recipe(base: dict, settings: dict) -> TrainConfig:
    """A trial's training config: the base recipe with the drawn settings (dotted keys) over it."""
    return build(TrainConfig, merge(base, nest(settings)), "trial")


# --- one trial ----------------------------------------------------------------------------------------------------


def run_tune_trial(config: dict, setup: dict) -> None:
    """Tune's function trainable: train the trial's recipe epoch by epoch, reporting validation metrics and a
    checkpoint after each (the scheduler reads `val_mae`)."""
    from ray import tune

    # Ray's storage module logs every checkpoint at INFO: the driver's lines per ended trial are the progress
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = trial_recipe(setup["base"], config["settings"])
    device = torch.device("cuda" if setup["gpus"] > 0 and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(setup["threads"])
    torch.manual_seed(cfg.seed)
    held = hold_faces(setup["faces"], setup["region_size"], device)
    train_rows, val_rows = torch.tensor(setup["train_rows"]), torch.tensor(setup["val_rows"])  # copies: the object store's are read-only
    model, optimizer, scheduler = build_training(cfg, None, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # paused by HyperBand, retried after a failure, or resumed by a rerun
        with checkpoint.as_directory() as folder:
            saved = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        start = saved["epoch"]
    for epoch in range(start + 1, cfg.epochs + 1):
        shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # an epoch's order, resumed or not
        record = train_epoch(model, optimizer, batches_of(held, train_rows, cfg.batch_size, shuffle), cfg, generator, device)
        record.update(validate(model, batches_of(held, val_rows, 256), cfg, device))
        step_schedule(scheduler, record["val_mae"])
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "generator": generator.get_state(), "epoch": epoch}, os.path.join(folder, STATE_FILE))
            tune.report({"epoch": epoch, **record, "lr": optimizer.param_groups[0]["lr"]},
                        checkpoint=tune.Checkpoint.from_directory(folder))


# --- the driver ---------------------------------------------------------------------------------------------------


def _trial_number(trial, search: str) -> int:
    """A trial's place in the search, from 1: Tune's experiment tags count from 0 under random search and from 1
    under a searcher (optuna)."""
    return int(trial.experiment_tag.split("_", 1)[0]) + (search == "random")


def _trial_dirname(trial, search: str) -> str:
    return f"trial_{_trial_number(trial, search):03d}"


def _trial_name(trial, search: str) -> str:
    return f"trial {_trial_number(trial, search)}"


def _describe(settings: dict) -> str:
    return ", ".join(f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}" for name, value in settings.items())


def _progress_callback(cfg: TuneConfig):
    """Tune callback on the driver: a line per ended, retried or failed trial, and a status line a minute. A
    resumed search restores it from the saved experiment, so its clock is the wall clock since the first start."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            self.started = self.last = time.time()

        def _counts(self, trials, trial, outcome: str | None) -> str:
            outcomes = [(_outcome(t, cfg.epochs) if t is not trial else outcome) for t in trials]
            ended = [o for o in outcomes if o]
            running = sum(t.status == "RUNNING" for t in trials if t is not trial)
            return (f"[{len(ended)}/{cfg.trials} ended: {ended.count('finished')} finished, {ended.count('stopped early')} "
                    f"stopped early, {ended.count('failed')} failed; {running} running]")

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            outcome = "finished" if result.get("epoch", 0) >= cfg.epochs else "stopped early"
            print(f"{self._counts(trials, trial, outcome)} {_trial_name(trial, cfg.search)} ({_describe(trial.config['settings'])}): "
                  f"val MAE {result.get('val_mae', math.nan):.2f} at epoch {result.get('epoch', 0)}, {outcome}", flush=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            print(f"{_trial_name(trial, cfg.search)} failed, retrying from its last epoch ({trial.num_failures} failure(s) so far)", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"{self._counts(trials, trial, 'failed')} {_trial_name(trial, cfg.search)}: FAILED", flush=True)

        def on_step_end(self, iteration, trials, **info):
            now = time.time()
            if now - self.last >= 60:
                self.last = now
                running = [f"{_trial_name(t, cfg.search)} (epoch {(t.last_result or {}).get('epoch', 0)}/{cfg.epochs})"
                           for t in trials if t.status == "RUNNING"]
                print(f"{sum(bool(_outcome(t, cfg.epochs)) for t in trials)}/{cfg.trials} trials ended after {now - self.started:.0f} s; "
                      f"running: {', '.join(running) or 'none'}", flush=True)

    return Progress()


def _outcome(trial, epochs: int) -> str | None:
    if trial.status == "ERROR":
        return "failed"
    if trial.status == "TERMINATED":
        return "finished" if (trial.last_result or {}).get("epoch", 0) >= epochs else "stopped early"
    return None


def _tuner(cfg: TuneConfig, trainable, space: dict, filesystem, out: str, resuming: bool):
    """A new Tune experiment, or the saved one restored: finished trials are kept, unfinished ones continue from
    their last checkpoint, failed ones stay failed."""
    from ray import tune

    experiment = f"{out}/{TRIALS}"
    if resuming and tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        print(f"resuming {experiment}: ended trials are kept, unfinished ones continue", flush=True)
        return tune.Tuner.restore(experiment, trainable, storage_filesystem=filesystem)
    if resuming:
        print(f"{experiment} holds no saved search state (stopped within seconds of its start): starting over", flush=True)
    if cfg.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=cfg.epochs, grace_period=cfg.grace_epochs,
                                                  reduction_factor=cfg.reduction_factor)
    else:
        scheduler = tune.schedulers.HyperBandScheduler(time_attr="epoch", max_t=cfg.epochs, reduction_factor=cfg.reduction_factor)
    if cfg.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(seed=cfg.seed)
        except (ImportError, AssertionError):
            raise UserError("--search optuna needs optuna: pip install 'c3ae-ray[tune]'") from None
    else:
        searcher = tune.search.BasicVariantGenerator(random_state=cfg.seed)
    return tune.Tuner(
        trainable,
        param_space={"settings": tune_domains(space)},
        tune_config=tune.TuneConfig(metric="val_mae", mode="min", num_samples=cfg.trials, scheduler=scheduler, search_alg=searcher,
                                    max_concurrent_trials=cfg.concurrent,
                                    trial_dirname_creator=functools.partial(_trial_dirname, search=cfg.search)),
        run_config=tune.RunConfig(
            name=TRIALS, storage_path=out, storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            # every epoch's checkpoint is kept (about 0.5 MB each): a resumed search restores each trial from the
            # checkpoint its saved state names, which may lag the newest by a few epochs when it was killed
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            verbose=0,  # the callback's lines are the progress
            callbacks=[_progress_callback(cfg)],
        ),
    )


def tune_recipe(cfg: TuneConfig) -> dict:
    """Run (or resume) the search; -> the summary (also OUT/summary.json)."""
    from ray import tune

    started = time.perf_counter()
    space = read_space(cfg.space)
    base = to_dict(build(TrainConfig, merge(load_yaml(cfg.base), {"data": cfg.data, "out": cfg.out, "epochs": cfg.epochs,
                                                                    "seed": cfg.seed}), "base"))
    base_cfg = build(TrainConfig, base)
    check(base_cfg.val_data is None and base_cfg.init_from is None and base_cfg.members == 1,
          "the base recipe may not set val_data, init_from or members: trials validate on the hash split of --data and train one model each")
    data = open_faces(cfg.data)
    faces = read_faces(data)
    val_rows = data.held_out(base_cfg.val_fraction)
    check(val_rows.any() and (~val_rows).any(), f"{cfg.data}: too few faces to hold out {base_cfg.val_fraction:g} for validation")
    filesystem, out = storage.resolve(cfg.out)
    setup = {"base": base, "faces": faces, "train_rows": np.flatnonzero(~val_rows), "val_rows": np.flatnonzero(val_rows),
             "region_size": data.crop.region_size, "threads": max(1, int(cfg.trial_cpus)), "gpus": cfg.trial_gpus}
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # a killed search loses at most 2 s of its state
    with ray_runtime():
        check_trial_resources(cfg.trial_cpus, cfg.trial_gpus)
        resuming = storage.prepare_run_dir(filesystem, out, cfg.out, to_dict(cfg), cfg.overwrite, RESUMABLE_CHANGES, "search")
        print(f"tuning on {cfg.data}: {int((~val_rows).sum())} training and {int(val_rows.sum())} validation faces; {cfg.trials} trials "
              f"of up to {cfg.epochs} epochs over {', '.join(space)}; {cfg.scheduler} stopping, {cfg.search} search, "
              f"{cfg.trial_cpus:g} CPU{f' and {cfg.trial_gpus:g} GPU' if cfg.trial_gpus else ''} per trial", flush=True)
        trainable = tune.with_resources(tune.with_parameters(run_tune_trial, setup=setup), {"cpu": cfg.trial_cpus, "gpu": cfg.trial_gpus})
        grid = _tuner(cfg, trainable, space, filesystem, out, resuming).fit()
        rows, histories = _trial_rows(grid, cfg.epochs)
    summary = _summarize(cfg, space, base, rows, time.perf_counter() - started)
    _write_report(filesystem, out, summary, space, histories)
    return summary


def _failures(result) -> int:
    """How often a trial failed, over every run of the search: Tune appends each failure to its error.txt."""
    import pyarrow.fs as pafs

    location = f"{result.path}/error.txt"
    if result.filesystem.get_file_info(location).type == pafs.FileType.NotFound:
        return 0
    with result.filesystem.open_input_stream(location) as stream:
        return stream.read().decode(errors="replace").count("Failure # ")


def _trial_rows(grid, epochs: int) -> tuple[list[dict], dict[str, tuple[list, list]]]:
    """One row per trial, in creation order, and each trial's (epochs, validation MAEs)."""
    rows, histories = [], {}
    for result in grid:
        number = int(os.path.basename(result.path).removeprefix("trial_"))
        frame = result.metrics_dataframe
        reported = frame[["epoch", "val_mae"]].dropna().drop_duplicates("epoch", keep="last") if frame is not None and "val_mae" in frame else None
        history = ([], []) if reported is None else (reported["epoch"].astype(int).tolist(), reported["val_mae"].astype(float).tolist())
        best = int(np.argmin(history[1])) if history[1] else None
        status = "failed" if result.error else "finished" if history[0] and history[0][-1] >= epochs else "stopped early"
        rows.append({
            "trial": f"trial {number}", "number": number, "status": status, "epochs": history[0][-1] if history[0] else 0,
            "best_val_mae": None if best is None else round(history[1][best], 4), "best_epoch": None if best is None else history[0][best],
            "failures": _failures(result), "error": str(result.error).strip().splitlines()[-1][:300] if result.error else None,
            "settings": (result.config or {}).get("settings", {}),  # none for a trial killed before it started
        })
        histories[rows[-1]["trial"]] = history
    rows.sort(key=lambda row: row["number"])
    return rows, {row["trial"]: histories[row["trial"]] for row in rows}


def _summarize(cfg: TuneConfig, space: dict, base: dict, rows: list[dict], elapsed: float) -> dict:
    scored = [row for row in rows if row["best_val_mae"] is not None]
    best = min(scored, key=lambda row: row["best_val_mae"]) if scored else None
    counts = {status: sum(row["status"] == status for row in rows) for status in ("finished", "stopped early", "failed")}
    return {
        "out": cfg.out, "data": cfg.data, "trials": len(rows), **{k.replace(" ", "_"): v for k, v in counts.items()},
        "epochs_trained": sum(row["epochs"] for row in rows), "best": best,
        "best_recipe": None if best is None else _best_recipe(base, best["settings"]),
        "space": {name: {kind: args} for name, (kind, args) in space.items()}, "rows": rows,
        "elapsed_s": round(elapsed, 1), "config": to_dict(cfg), "c3ae_ray_version": __version__,
    }


def _best_recipe(base: dict, settings: dict) -> dict:
    """The best trial's whole training config, as `c3ae train --config` reads it (--out is the user's)."""
    recipe = to_dict(trial_recipe(base, settings))
    return {k: v for k, v in recipe.items() if k not in ("out", "overwrite")}


def _write_report(filesystem, out: str, summary: dict, space: dict, histories: dict) -> None:
    names = list(space)
    columns = ["trial", "status", "epochs", "best_val_mae", "best_epoch", "failures", *names, "error"]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    for row in summary["rows"]:
        writer.writerow({**{k: row[k] for k in columns if k in row}, **row["settings"]})
    outputs = {
        "trials.csv": table.getvalue().encode(),
        "trials.md": format_report(summary).encode(),
        "curves.png": plots.png(plots.search_curves(histories)),
        "settings.png": plots.png(plots.search_settings(summary["rows"], {name: kind for name, (kind, _) in space.items()})),
    }
    if summary["best_recipe"] is not None:
        outputs["best.yaml"] = yaml.safe_dump(summary["best_recipe"], sort_keys=False).encode()
    for name, content in outputs.items():
        with filesystem.open_output_stream(f"{out}/{name}") as stream:
            stream.write(content)
    storage.write_json(filesystem, f"{out}/{storage.SUMMARY}", summary)


def format_report(summary: dict) -> str:
    """The trials as a Markdown table, best first (failed last), under a line of counts and the best recipe."""
    names = list(summary["space"])
    best = summary["best"]
    ranked = sorted(summary["rows"], key=lambda row: (row["best_val_mae"] is None, row["best_val_mae"] or 0.0))

    def cell(value) -> str:
        return "" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = [
        f"# Search on {summary['data']}",
        "",
        f"{summary['trials']} trials: {summary['finished']} finished, {summary['stopped_early']} stopped early, "
        f"{summary['failed']} failed; {summary['epochs_trained']} epochs trained in {summary['elapsed_s']:.0f} s.",
        "" if best is None else f"Best: {best['trial']}, validation MAE {best['best_val_mae']:.3f} at epoch {best['best_epoch']} "
        f"({_describe(best['settings'])}); its recipe is best.yaml.",
        "",
        "| trial | status | epochs | best val MAE | at epoch | " + " | ".join(names) + " | failures |",
        "|---|---|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for row in ranked:
        lines.append(f"| {row['trial']} | {row['status']}{': ' + row['error'] if row['error'] else ''} | {row['epochs']} | "
                     f"{cell(row['best_val_mae'])} | {cell(row['best_epoch'])} | "
                     + " | ".join(cell(row["settings"].get(name)) for name in names) + f" | {row['failures']} |")
    return "\n".join(lines) + "\n"

