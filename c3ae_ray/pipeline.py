"""The paper's whole recipe as one resumable run: IMDB-WIKI -> pretraining -> fine-tuning (UTKFace or FG-NET)
-> FG-NET evaluation -> model file.

Every step writes to a place under OUT (a path or s3://) that depends only on the config, and a step whose
output is complete (its summary.json, written last) is skipped. Rerunning the same config, or resubmitting
the same Ray job, therefore picks up where a failed or stopped run left off; training and evaluation also
resume inside themselves from their checkpoints.

    OUT/data/<dataset>/     `c3ae preprocess` of each dataset the config names (once, even if used twice)
    OUT/runs/pretrain/      `c3ae train` on the pretraining data
    OUT/runs/finetune/      `c3ae train --init-from OUT/runs/pretrain/model.pt` on the fine-tuning data
    OUT/eval/<protocol>/    `c3ae evaluate` on FG-NET; every trial fine-tunes from the pretrained model
    MODEL                   the final model file (default OUT/model.pt): fine-tuned, else pretrained
    OUT/pipeline.json       what each step did, written at the end
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from c3ae_ray import storage
from c3ae_ray.config import UserError, build

SECTIONS = ("pretrain", "finetune", "evaluate")
TOP_KEYS = {"out", "model", *SECTIONS}
EVAL_INIT = ("pretrain", "finetune", "none")


@dataclass(frozen=True)
class Plan:
    """The steps in order, the run whose model.pt is the result, and where that file is published."""

    steps: list
    model_from: str
    model: str


@dataclass(frozen=True)
class Step:
    """One stage run with its output folder; `run` returns the stage's summary, `line` says it in a few words."""

    name: str
    out: str
    run: Callable[[], dict]
    line: Callable[[dict], str]


def _preprocess_config(values: dict, out: str):
    from c3ae_ray.datasets import DATASETS
    from c3ae_ray.preprocess import PreprocessConfig

    if not isinstance(values, dict) or values.get("dataset") not in DATASETS or not values.get("root"):
        raise UserError(f"a data section needs dataset (one of {', '.join(DATASETS)}) and root, got {values}")
    if {"out", "overwrite"} & set(values):
        raise UserError("the pipeline chooses each stage's out (under its own out) and never overwrites")
    return build(PreprocessConfig, {**values, "out": out}, "preprocess")


def _section(config: dict, name: str) -> dict | None:
    section = config.get(name)
    if section is None:
        return None
    work = "evaluate" if name == "evaluate" else "train"
    allowed = {"data", work} | ({"init_from"} if name == "evaluate" else set())
    if not isinstance(section, dict) or not isinstance(section.get("data"), dict) or set(section) - allowed:
        raise UserError(f"{name}: expected a mapping with data: (preprocess settings) and {work}: (its settings)")
    return section


def plan(config: dict) -> Plan:
    """The plan of a pipeline config (a mapping as in jobs/pipeline.yaml).

    Every stage's config is built and checked here, so a bad config fails before any work starts.
    """
    from c3ae_ray import evaluate, preprocess, train

    unknown = set(config) - TOP_KEYS
    if unknown or not config.get("out"):
        raise UserError(f"a pipeline config needs out: and may have {', '.join(sorted(TOP_KEYS - {'out'}))}; unknown: {sorted(unknown)}")
    root = _absolute(str(config["out"]))
    sections = {name: _section(config, name) for name in SECTIONS}
    if not sections["pretrain"] and not sections["finetune"]:
        raise UserError("a pipeline needs pretrain: or finetune: (something must train the model)")

    steps: list[Step] = []
    data_of: dict[str, tuple[dict, str]] = {}  # dataset -> (its preprocess settings, its output)

    def data_step(name: str) -> str:
        values = sections[name]["data"]
        dataset = values.get("dataset")
        if dataset in data_of:
            if data_of[dataset][0] != values:
                raise UserError(f"{name}: {dataset} is preprocessed twice with different settings; use one data: mapping")
            return data_of[dataset][1]
        out = f"{root}/data/{dataset}"
        cfg = _preprocess_config(values, out)
        data_of[dataset] = (values, out)
        steps.append(Step(f"preprocess {dataset}", out, lambda: preprocess.preprocess(cfg), preprocess.count_line))
        return out

    def train_step(name: str, init_from: str | None) -> str:
        data = data_step(name)
        out = f"{root}/runs/{name}"
        values = dict(sections[name].get("train") or {})
        if {"data", "out", "init_from", "overwrite"} & set(values):
            raise UserError(f"{name}: train: may not set data, out, init_from or overwrite (the pipeline does)")
        cfg = build(train.TrainConfig, {**values, "data": data, "out": out, "init_from": init_from}, f"{name}: train")
        if name == "pretrain" and cfg.members > 1 and (sections["finetune"] or sections["evaluate"]):
            raise UserError("pretrain: train: members: the later steps fine-tune from the pretrained model, which an "
                            "ensemble cannot be; give members to finetune instead")
        steps.append(Step(name, out, lambda: train.train(cfg), _train_line))
        return f"{out}/model.pt"

    models = {"none": None}
    if sections["pretrain"]:
        models["pretrain"] = train_step("pretrain", None)
    if sections["finetune"]:
        models["finetune"] = train_step("finetune", models.get("pretrain"))
    model_from = models.get("finetune") or models["pretrain"]

    if sections["evaluate"]:
        section = sections["evaluate"]
        init = section.get("init_from", "pretrain" if "pretrain" in models else "none")
        if init not in models:
            raise UserError(f"evaluate: init_from must be one of {', '.join(m for m in EVAL_INIT if m in models)}, got {init!r}")
        if init == "finetune" and sections["finetune"]["data"].get("dataset") == section["data"].get("dataset"):
            raise UserError("evaluate: init_from finetune would test on people the fine-tuned model has trained on")
        data = data_step("evaluate")
        values = dict(section.get("evaluate") or {})
        if {"data", "out", "init_from", "overwrite"} & set(values) or values.get("protocol", "splits") not in ("splits", "lopo"):
            raise UserError("evaluate: evaluate: takes protocol (splits or lopo) and trial settings, not data, out or init_from")
        protocol = values.get("protocol", "splits")
        cfg = build(evaluate.EvalConfig, {**values, "protocol": protocol, "data": data, "out": f"{root}/eval/{protocol}",
                                          "init_from": models[init]}, "evaluate")
        steps.append(Step(f"evaluate {protocol}", cfg.out, lambda: evaluate.evaluate(cfg), _eval_line))
    return Plan(steps, model_from, _absolute(str(config.get("model") or f"{root}/model.pt")))


def _absolute(location: str) -> str:
    """Local paths become absolute on the driver: a Ray job's working directory is a temporary copy, and
    other nodes would read a relative path against their own."""
    return location.rstrip("/") if "://" in location else str(Path(location).resolve())


def _train_line(summary: dict) -> str:
    if summary.get("members"):
        return (f"val MAE {summary['val_mae']:.2f} (an ensemble of {len(summary['members'])}; its members alone "
                f"{summary['member_val_mae']:.2f} on average), {summary['data']['train']['faces']} training faces")
    return f"val MAE {summary['val_mae']:.2f} (epoch {summary['best_epoch']} of {summary['epochs']}), {summary['data']['train']['faces']} training faces"


def _eval_line(summary: dict) -> str:
    mae = "n/a" if summary["mae_mean"] is None else f"{summary['mae_mean']:.2f} ± {summary['mae_std']:.2f}"
    return f"MAE {mae} over {summary['completed']} of {summary['trials']} trials"


def run_pipeline(config: dict) -> dict:
    """Run every step not yet complete, in order, then copy the final model to MODEL; -> the pipeline summary."""
    started = time.perf_counter()
    planned = plan(config)
    steps = planned.steps
    records = []
    for number, step in enumerate(steps, 1):
        step_started = time.perf_counter()
        filesystem, path = storage.resolve(step.out)
        done = storage.exists(filesystem, f"{path}/{storage.SUMMARY}")
        print(f"[{number}/{len(steps)}] {step.name}: {'complete in ' + step.out + ', skipped' if done else 'running -> ' + step.out}", flush=True)
        summary = storage.read_json(filesystem, f"{path}/{storage.SUMMARY}") if done else step.run()
        records.append(
            {
                "step": step.name,
                "out": step.out,
                "status": "skipped" if done else "ran",
                "elapsed_s": round(time.perf_counter() - step_started, 1),
                "result": step.line(summary),
            }
        )
        print(f"[{number}/{len(steps)}] {step.name}: {records[-1]['result']}", flush=True)
    data = storage.read_bytes(planned.model_from)
    model_fs, model_path = storage.resolve(planned.model)
    model_fs.create_dir(model_path.rsplit("/", 1)[0], recursive=True)
    with model_fs.open_output_stream(model_path) as stream:
        stream.write(data)
    summary = {
        "out": _absolute(str(config["out"])),
        "model": planned.model,
        "model_from": planned.model_from,
        "model_bytes": len(data),
        "steps": records,
        "ran": sum(r["status"] == "ran" for r in records),
        "skipped": sum(r["status"] == "skipped" for r in records),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "config": config,
    }
    filesystem, root = storage.resolve(summary["out"])
    storage.write_json(filesystem, f"{root}/pipeline.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"pipeline {summary['out']}: {summary['ran']} steps ran, {summary['skipped']} were complete, {summary['elapsed_s']} s"]
    lines += [f"  {r['step']:<20} {r['status']:<8} {r['elapsed_s']:>8.1f} s  {r['result']}" for r in summary["steps"]]
    lines.append(f"model: {summary['model']} ({summary['model_bytes']} bytes, from {summary['model_from']})")
    return "\n".join(lines)

