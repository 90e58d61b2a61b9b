"""The evaluation protocols without Ray or torch: which faces each trial trains and tests on, and how the
trials' results add up into the report.

    splits    the paper's FG-NET protocol: `repeats` seeded random splits of `test_size` test images; with
              `by_subject` the test part is whole people (identity-disjoint), drawn until it holds test_size
    lopo      leave one person out: one fold per subject, the literature's FG-NET standard
    ablation  full, no-context, no-cascade, no-augment, no-SE x `seeds` on one hash split (as training's),
              and the seeds' methods: heads, Gaussian labels, aligned crops (from an aligned preprocessing)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from c3ae_ray.config import UserError
from c3ae_ray.faces import in_validation, split_key
from c3ae_ray.metrics import CA_YEARS, age_metrics, gender_metrics
from c3ae_ray.model import VARIANTS, ModelConfig

if TYPE_CHECKING:
    from c3ae_ray.evaluate import EvalConfig

PROTOCOLS = ("splits", "lopo", "ablation")


def _switches(variant: ModelConfig) -> dict:
    """The fields where a model variant differs from the full model."""
    full = asdict(ModelConfig())
    return {k: v for k, v in asdict(variant).items() if v != full[k]}


class Variant(NamedTuple):
    """One ablation row: the model's switches against the full model, augmentation on or off, and whether it
    trains and tests on the aligned preprocessing of the same images (`EvalConfig.aligned_data`)."""

    switches: dict
    augment: bool = True
    aligned: bool = False


GENDER = _switches(ModelConfig(gender_head=True))
HEADS = _switches(ModelConfig(gender_head=True, ethnicity_head=True))
# The paper's ablation (Fig. 5): each variant drops one ingredient of the full model (model.VARIANTS), or
# the training augmentation; then the seeds' additions: the full model with a gender head, with gender and
# (auxiliary) ethnicity heads, with a Gaussian label distribution over 1-year bins (K = 1) instead of the
# two-point encoding over 10-year bins, on aligned crops, and the combination of the additions that helped.
PAPER_ABLATIONS = ("full", "no-context", "no-cascade", "no-augment", "no-se")
ABLATIONS: dict[str, Variant] = {
    **{name: Variant(_switches(VARIANTS["full" if name == "no-augment" else name]), name != "no-augment") for name in PAPER_ABLATIONS},
    "+gender": Variant(GENDER),
    "+gender+ethnicity": Variant(HEADS),
    "gaussian-k1": Variant(_switches(ModelConfig(label_encoding="gaussian", n_bins=111, interval=1.0))),
    "aligned": Variant({}, aligned=True),
    "+gender+ethnicity+aligned": Variant(HEADS, aligned=True),
}


def plan_trials(cfg: EvalConfig, paths: list[str], subjects: list[str | None]) -> list[dict]:
    """-> one dict per trial: name, group, seed, model switches, augment, train and test row indices."""
    n = len(paths)
    keys = [split_key(p, s) for p, s in zip(paths, subjects)]
    rows = np.arange(n)

    def trial(name: str, group: str, test: np.ndarray, seed: int, variant: Variant = Variant({})) -> dict:
        test = np.sort(test)
        train = np.setdiff1d(rows, test)
        if not len(test) or not len(train):
            raise UserError(f"{name}: {len(train)} training and {len(test)} test faces; both parts need faces")
        return {"name": name, "group": group, "seed": seed, **variant._asdict(), "train": train.tolist(), "test": test.tolist()}

    if cfg.protocol in ("lopo", "ablation") or cfg.by_subject:
        missing = sum(s is None for s in subjects)
        if missing and cfg.protocol != "ablation":
            raise UserError(
                f"{cfg.protocol}{' --by-subject' if cfg.by_subject else ''} needs a subject for every face; "
                f"{missing} of {n} have none (FG-NET names carry them: PPPAaa.JPG)"
            )
    if cfg.protocol == "splits":
        if cfg.test_size >= n:
            raise UserError(f"--test-size {cfg.test_size} leaves no training faces: the data has {n}")
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
            raise UserError(f"lopo needs at least 2 subjects, the data has {len(people)}")
        return [trial(f"subject {person}", "lopo", rows[np.asarray(subjects) == person], cfg.seed) for person in people]
    test = rows[np.array([in_validation(key, cfg.test_fraction) for key in keys], dtype=bool)]
    return [
        trial(f"{variant} seed {cfg.seed + i}", variant, test, cfg.seed + i, ABLATIONS[variant])
        for variant in cfg.variants
        for i in range(cfg.seeds)
    ]


def _short_error(error: BaseException) -> str:
    """The last line of an error's message, with its type: enough for a report row."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:300]


def trial_rows(plan: list[dict], faces: dict, results: dict, retries: dict) -> tuple[list[dict], list[dict]]:
    """One row per planned trial, failed or not (a trial missing from the results counts as failed), and one
    prediction row per test face of each completed trial. `results`: trial index -> Tune result."""
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
        p_female = metrics.get("p_female") or [None] * len(test)  # a trial without a gender head answers none
        rows.append({
            **row,
            "status": "ok",
            **{k: round(metrics[k], 4) for k in ("mae", *(f"ca{y}" for y in CA_YEARS))},
            "gender_acc": _rounded(gender_metrics(p_female, [faces["gender"][i] for i in test])["gender_acc"])
            if metrics.get("p_female") else None,
            "trained_faces": metrics["train_faces"],
            "parameters": metrics["parameters"],
            "subject_overlap": metrics["subject_overlap"],
        })
        for i, predicted, female in zip(test, metrics["predicted"], p_female):
            predictions.append({"trial": index, "group": spec["group"], "path": faces["path"][i], "subject": faces["subject"][i],
                                "age": float(faces["age"][i]), "predicted": predicted, "gender": faces["gender"][i], "p_female": female})
    return rows, predictions


def aggregate(rows: list[dict], predictions: list[dict]) -> dict:
    """MAE mean and std over completed trials, and MAE / CA(n) pooled over all their test predictions."""
    maes = [r["mae"] for r in rows if r["status"] == "ok"]
    pooled = age_metrics([p["predicted"] for p in predictions], [p["age"] for p in predictions])
    gendered = [p for p in predictions if p["p_female"] is not None]
    gender = gender_metrics([p["p_female"] for p in gendered], [p["gender"] for p in gendered])
    return {
        "trials": len(rows),
        "completed": len(maes),
        "failed": len(rows) - len(maes),
        "mae_mean": round(float(np.mean(maes)), 4) if maes else None,
        "mae_std": round(float(np.std(maes)), 4) if maes else None,
        "pooled_mae": round(pooled["mae"], 4) if maes else None,
        **{f"ca{y}": round(pooled[f"ca{y}"], 4) if maes else None for y in CA_YEARS},
        "gender_acc": _rounded(gender["gender_acc"]),
        "test_faces": pooled["faces"],
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


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
        f"{cfg['epochs']} epochs each, {how}; {summary['images']} faces"
        + (f" (those that {cfg['aligned_data']} also holds, aligned, for the aligned rows)." if cfg.get("aligned_data") else "."),
        "MAE mean ± std is over completed trials; pooled MAE, CA(n) and gender accuracy (models with a gender head,",
        "faces with a known gender) are over all their test predictions.",
        "",
        "| | trials | MAE mean ± std | pooled MAE | CA(3) | CA(5) | CA(7) | gender accuracy | test faces |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for group, agg in summary["groups"].items():
        failed = f" ({agg['failed']} failed)" if agg["failed"] else ""
        lines.append(
            f"| {group} | {agg['completed']}/{agg['trials']}{failed} | {_number(agg['mae_mean'])} ± {_number(agg['mae_std'])} "
            f"| {_number(agg['pooled_mae'])} | {_number(agg['ca3'], 3)} | {_number(agg['ca5'], 3)} | {_number(agg['ca7'], 3)} "
            f"| {_number(agg['gender_acc'], 3)} | {agg['test_faces']} |"
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
