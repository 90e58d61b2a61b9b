"""A model's card: measure a trained model on the faces its training held out (the run's own hash split) and
write MODEL_CARD.md with its numbers and the error-by-decade plot.

    python -m c3ae_ray.card --run RUN_DIR --out c3ae_ray/pretrained
    python -m c3ae_ray.card --model c3ae_ray/pretrained/c3ae_utkface.pt --data runs/utkface-faces --out DIR

Every fact comes from the model file (its config, training config and provenance, which `c3ae train` writes
into it) and the preprocessed data (its summary); `--data` points at a fresh preprocessing of the same images
where the recorded location is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from c3ae_ray import plots, storage
from c3ae_ray.config import UserError, build, to_dict
from c3ae_ray.faces import open_faces, read_faces
from c3ae_ray.inference import predict_stored
from c3ae_ray.calibrate import age_range_of, bounds
from c3ae_ray.metrics import age_metrics, by_decade, by_group, gender_metrics, range_by_decade, range_metrics
from c3ae_ray.model import BUNDLED_MODEL, Ensemble, ModelConfig, count_parameters, load_model
from c3ae_ray.train import TrainConfig

PLOT = "error_by_decade.png"
# The project's goals for the bundled model: age MAE on the held-out faces from the `utkface` folder (the shared
# data/utkface, on which every bundled model so far is measured; all held-out faces when the data has no such
# folder), and gender accuracy over all held-out faces with a known gender.
TARGET_MAE = 5.0
TARGET_FOLDER = "utkface"
TARGET_GENDER_ACC = 0.90


def measure(model_source, data_location: str, val_fraction: float) -> dict:
    """Ages (and genders, with a gender head) predicted in this process for the held-out faces of `data_location`
    -> metrics overall, by decade, and by the dataset's gender and ethnicity labels and by source folder."""
    data = open_faces(data_location)
    faces = read_faces(data)
    held_out = data.held_out(val_fraction)  # training's own split
    index = np.flatnonzero(held_out)
    model, payload = load_model(model_source)
    outputs = predict_stored(model, data, faces, held_out)
    predicted, p_female, true = outputs.age, outputs.p_female, faces["age"][index]
    genders, ethnicities = ([faces[name][i] for i in index] for name in ("gender", "ethnicity"))
    every_folder = [_folder(path, data.summary["root"]) for path in faces["path"]]
    folders = [every_folder[i] for i in index]
    target = np.array([folder in (TARGET_FOLDER, ".") for folder in folders], dtype=bool)  # ".": the root is that folder
    return {
        "age_range": _age_range(payload, model, outputs, true, data.held_out(val_fraction / 2)[index]),
        "target": {"folder": TARGET_FOLDER, **age_metrics(predicted[target], true[target])},
        **age_metrics(predicted, true), **({} if p_female is None else gender_metrics(p_female, genders)),
        "by_decade": by_decade(predicted, true, p_female, genders),
        **{f"by_{name}": by_group(groups, predicted, true, p_female, genders)
           for name, groups in (("gender", genders), ("ethnicity", ethnicities), ("folder", folders))},
        "true": true, "predicted": predicted, "gender_head": p_female is not None,
        "folders": dict(sorted(Counter(every_folder).items())), "train_faces": int(len(data.keys) - len(index)),
        "sha256": payload["sha256"], "parameters": count_parameters(model),
        "data": data.summary,
    }


def _age_range(payload: dict, model, outputs, true: np.ndarray, checked: np.ndarray) -> dict | None:
    """The file's age range measured on the held-out faces its calibration did not use (`calibrate.split_parts`):
    coverage and mean width overall and by decade. None for a file without a range."""
    age_range = age_range_of(payload)
    if age_range is None:
        return None
    low, high = bounds(outputs.age, outputs.distribution, age_range, model.cfg.bins.numpy())
    low, high, true = low[checked], high[checked], true[checked]
    return {"target_coverage": age_range.coverage, "bands": len(age_range.below), "calibration_faces": age_range.faces, **range_metrics(low, high, true), "by_decade": range_by_decade(low, high, true)}


def _folder(path: str, root: str) -> str:
    """The first folder under the dataset's root that holds the image ("." for the root itself)."""
    relative = os.path.relpath(path, root)
    return relative.split(os.sep, 1)[0] if os.sep in relative else "."


def write_card(model_location: str, out: str, data_location: str | None = None) -> dict:
    """MODEL_CARD.md and error_by_decade.png in `out` for the model file; -> the measurement."""
    model_bytes = storage.read_bytes(model_location)
    model, payload = load_model(model_bytes, name=model_location)
    meta = payload["meta"]
    if "train_config" not in meta:
        raise UserError(f"{model_location} records no training config: only `c3ae train` models have cards")
    config = build(TrainConfig, meta["train_config"])
    measured = measure(model_bytes, data_location or config.data, config.val_fraction)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / PLOT).write_bytes(plots.png(plots.error_by_decade({"held-out faces": (measured["true"], measured["predicted"])})))
    members = len(model.members) if isinstance(model, Ensemble) else 1
    (Path(out) / "MODEL_CARD.md").write_text(_card(Path(model_location).name, model.cfg, members, config, meta, measured, len(model_bytes)))
    return measured


def _variant(cfg: ModelConfig, members: int) -> str:
    parts = [
        "context (three crops)" if cfg.context else "one crop (no context)",
        (f"the two-point cascade ({cfg.n_bins} bins, K = {cfg.interval:g})" if cfg.label_encoding == "two_point" else
         f"the cascade trained on a Gaussian label distribution (sigma {cfg.sigma:g} years; {cfg.n_bins} bins, K = {cfg.interval:g})")
        if cfg.cascade else "plain regression (no cascade)",
        "squeeze-and-excitation" if cfg.se else "no squeeze-and-excitation",
    ]
    name = "The full C3AE" if cfg.context and cfg.cascade and cfg.se else "A C3AE variant"
    mirror = ("\nIt answers for each face the mean of two passes, the face and its mirror image (`mirror_average`;"
              "\nvalidation and this card measure it so).") if cfg.mirror_average else ""
    heads = ""
    if cfg.gender_head or cfg.ethnicity_head:
        named = ["a gender head (outputs gender and p_female)"] * cfg.gender_head + \
                ["an ethnicity head (an auxiliary training task; never an output)"] * cfg.ethnicity_head
        heads = f"\nBeside the age it has {' and '.join(named)}."
    ensemble = (f"\nAn ensemble of {members} such models in one file, trained alike from {members} seeds: it answers the"
                "\nmean of their ages, distributions and gender probabilities.") if members > 1 else ""
    return f"{name} of Zhang et al.\n(CVPR 2019), with {', '.join(parts[:-1])} and {parts[-1]}.{mirror}{heads}{ensemble}"


def _recipe(config: TrainConfig) -> str:
    """The training settings that differ from `c3ae train`'s defaults, as the YAML for --config."""
    defaults = to_dict(TrainConfig(data="", out=""))
    chosen = to_dict(config)

    def differing(given: dict, default: dict) -> dict:
        return {k: (differing(v, default[k]) if isinstance(v, dict) and isinstance(default.get(k), dict) else v)
                for k, v in given.items() if v != default.get(k) and k not in ("data", "out", "overwrite", "workers", "gpu")}

    return yaml.safe_dump(json.loads(json.dumps(differing(chosen, defaults))), sort_keys=False).strip()


def _pretraining(config: TrainConfig, source: dict | None) -> str:
    """How the weights started, with what the model file records of a fine-tuned model's source (its file may
    since have been replaced, as the bundled model's is)."""
    if not config.init_from:
        return "trained from scratch (no pretraining)"
    facts = (source or {}).get("meta") or {}
    train = (facts.get("data") or {}).get("train") or {}
    known = [f"{train['faces']:,} training faces" if "faces" in train else None,
             f"best epoch {facts['best_epoch']}" if facts.get("best_epoch") else None,
             f"validation MAE {facts['val_mae']:.2f}" if facts.get("val_mae") is not None else None]
    known = [fact for fact in known if fact]
    return f"fine-tuned from `{config.init_from}`" + (f" (then: {', '.join(known)})" if known else "")


def _card(file_name: str, cfg: ModelConfig, members: int, config: TrainConfig, meta: dict, m: dict, model_bytes: int) -> str:
    data, summary = meta["data"], m["data"]
    gender = m["gender_head"]
    rows = "\n".join(f"| {d['ages']} | {d['faces']} | {d['mae']:.2f} | {d['ca5']:.3f} |{_gender_cell(d, gender)}" for d in m["by_decade"])
    thin = ", ".join(d["ages"] for d in m["by_decade"] if d["faces"] < 20)
    hard = ", ".join(d["ages"] for d in m["by_decade"] if d["faces"] >= 20 and d["mae"] > 1.5 * m["mae"])
    worst = max(m["by_decade"], key=lambda d: d["mae"])
    augment = to_dict(config.augment) if config.augment else {}
    dataset, crop = summary["dataset"], summary["crop"]
    pretrained = _pretraining(config, meta.get("init_from"))
    return f"""# Model card: {file_name}

{_variant(cfg, members)}
{m['parameters']:,} parameters, {model_bytes:,} bytes, sha256 `{m['sha256']}`.
Default model of `c3ae predict`, `c3ae score` and `c3ae serve`: {'yes' if file_name == BUNDLED_MODEL.name else 'no'}.

## Data
- {summary['kept']:,} faces of the {summary['seen']:,} `{dataset}` images in `{summary['root']}`{_folders(m)} (those where MTCNN
  found exactly one face), cut by `c3ae preprocess` with the one crop geometry every stage uses (region and
  three context boxes at {', '.join(f'{s:g}' for s in crop['scales'])} times the MTCNN box).
- Training ages {data['train']['age_min']:.0f} to {data['train']['age_max']:.0f}, mean {data['train']['age_mean']:.1f};
  the decade table below shows how unevenly they spread.
- **Licence: check the dataset's. UTKFace and IMDB-WIKI are for non-commercial research only, and so is a
  model trained on them.** The images are not in this repository or the package; only the weights are.

## Split and protocol
- Held out: every face whose split key hashes below {config.val_fraction:g} (`faces.in_validation`, blake2b of
  `subject:<id>` or `file:<name>`), the same split on every machine: {m['faces']:,} faces, never trained on;
  {m['train_faces']:,} faces trained on.
- Training: `c3ae train` on Ray Train, {pretrained}, {config.epochs} epochs, Adam (lr {config.learning_rate:g},
  weight decay {config.weight_decay:g}, batch {config.batch_size}), alpha {config.alpha:g} (KL) + L1, {_schedule(config)},
  {f"each member's best epoch kept ({', '.join(map(str, meta['best_epoch']))})" if members > 1 else f"the best epoch kept ({meta['best_epoch']})"}.
  Dropout {cfg.dropout_feat:g} (features) and {cfg.dropout_head:g} (head).
  Augmentation: {'none' if not augment else f"box shift {augment['shift']:g}, flips {augment['p_flip']:g}, rotation {augment['p_rotate']:g} (up to {augment['max_degrees']:g} degrees), colour {augment['p_brightness']:g}, erasing {augment['p_erase']:g}"}.

## Metrics (held-out faces, measured in-process by `python -m c3ae_ray.card`)
| | value |
|---|---|
| MAE | **{m['mae']:.2f} years** |
| CA(3) / CA(5) / CA(7) | {m['ca3']:.3f} / {m['ca5']:.3f} / {m['ca7']:.3f} |
| training's own validation MAE ({'the ensemble' if members > 1 else 'best epoch'}) | {meta['val_mae']:.2f} |
{_gender_line(m)}
{_targets(m)}

Error by age decade ({PLOT}):

| true ages | faces | MAE | CA(5) |{' gender accuracy |' if gender else ''}
|---|---|---|---|{'---|' if gender else ''}
{rows}
{_range_section(m)}{_fairness(m)}
## Known weaknesses
- Few held-out faces in {thin or 'no decade'} (under 20 each): those numbers are noisy, and the model has seen
  few such faces. Errors over 1.5 times the overall MAE: {hard or 'none'}. The largest error is at
  {worst['ages']} ({worst['mae']:.1f} years).
- Bins stop at {cfg.max_age:g}: ages above are predicted as at most {cfg.max_age:g}.
- One dataset (`{dataset}`), {pretrained}. Expect larger errors on faces unlike its photos:
  profile views, low light, small faces.
- Age estimation from a face is uncertain by nature; never use it to decide about a person.

## Reproduce
The settings that differ from `c3ae train`'s defaults (its `--config` YAML):
```yaml
{_recipe(config)}
```
```bash
c3ae preprocess --dataset {dataset} --root {summary['root']} --out runs/{dataset}-faces
c3ae train --data runs/{dataset}-faces --out runs/card-run --config RECIPE.yaml
python -m c3ae_ray.card --run runs/card-run --out CARD_DIR
```
{_source_first(config)}"""


def _source_first(config: TrainConfig) -> str:
    if not config.init_from:
        return ""
    return (f"`init_from` is the model these weights started from (`{config.init_from}` as it was then; see the"
            " training line above): make or fetch that one first.\n")


def _folders(m: dict) -> str:
    """The faces per folder under the root, when the data spans several (linked folders, say)."""
    if len(m["folders"]) < 2:
        return ""
    return " (" + ", ".join(f"`{name}` {count:,}" for name, count in m["folders"].items()) + " faces)"


def _targets(m: dict) -> str:
    """Whether the model meets the project's goals for the bundled model (TARGET_*), measured on this card's faces."""
    target = m["target"]
    if target["faces"]:
        age = (f"MAE <= {TARGET_MAE:g} on the held-out faces from `{target['folder']}`: {target['mae']:.2f} on {target['faces']:,} "
               f"faces, {'met' if target['mae'] <= TARGET_MAE else 'not met'}")
    else:
        age = f"MAE <= {TARGET_MAE:g} on the held-out faces from `{target['folder']}`: this data has none, not measured"
    if not m["gender_head"] or m["gender_acc"] is None:
        gender = "no gender head or no known genders, not met"
    else:
        gender = f"{m['gender_acc']:.3f}, {'met' if m['gender_acc'] >= TARGET_GENDER_ACC else 'not met'}"
    return (f"The project's targets for the bundled model: age {age}; gender accuracy >= {TARGET_GENDER_ACC:g} over all\n"
            f"held-out faces with a known gender: {gender}.")


def _range_section(m: dict) -> str:
    """How often the stated age range held the true age, by decade, on faces its calibration never saw."""
    r = m["age_range"]
    if r is None:
        return "\nAge range: none in this file (`c3ae calibrate` adds one).\n"
    if not r["faces"]:
        return "\nAge range: no held-out faces left to check it on.\n"
    rows = "\n".join(f"| {d['ages']} | {d['faces']} | {100 * d['coverage']:.0f}% | {d['mean_width']:.1f} |" for d in r["by_decade"])
    short = ", ".join(d["ages"] for d in r["by_decade"] if d["faces"] >= 20 and d["coverage"] < r["target_coverage"] - 0.1)
    caveat = (f"\nIt holds clearly less than stated for true ages {short}: there the model errs more than its distribution and"
              f"\nits predicted age show (a face it takes for older or younger than it is gets a range about the wrong age).\n"
              if short else "")
    return f"""
## Age range
Every answer carries `age_low` to `age_high`, meant to hold {100 * r['target_coverage']:.0f}% of true ages: the spread of
the face's own age distribution times multipliers fitted, in {r['bands']} bands of predicted age, on {r['calibration_faces']:,}
held-out faces (`c3ae_ray.calibrate`). On the other {r['faces']:,} held-out faces, which the fit never saw, it held
**{100 * r['coverage']:.1f}%** of true ages, with a mean width of {r['mean_width']:.1f} years:

| true ages | faces | inside the range | mean width (years) |
|---|---|---|---|
{rows}
{caveat}"""


def _gender_cell(row: dict, gender_head: bool) -> str:
    if not gender_head:
        return ""
    return f" {row['gender_acc']:.3f} ({row['gender_faces']}) |" if row["gender_acc"] is not None else " - |"


def _gender_line(m: dict) -> str:
    if not m["gender_head"]:
        return "| gender | no gender head: this model answers age only |\n"
    acc = "no face with a known gender" if m["gender_acc"] is None else f"**{m['gender_acc']:.3f}**"
    return f"| gender accuracy ({m['gender_faces']:,} faces with a known gender) | {acc} |\n"


def _fairness(m: dict) -> str:
    """Error (and gender accuracy) by the dataset's own gender and ethnicity labels, and by source folder:
    groups the model must serve alike. A table with a single group says nothing and is left out."""
    tables = []
    for name, title in (("by_gender", "gender (the dataset's label)"), ("by_ethnicity", "ethnicity (the dataset's label)"),
                        ("by_folder", "source folder")):
        rows = m[name]
        if len(rows) < 2:
            continue
        head = f"| {title} | faces | MAE | CA(5) |" + (" gender accuracy |" if m["gender_head"] else "")
        line = "|---|---|---|---|" + ("---|" if m["gender_head"] else "")
        body = "\n".join(f"| {r['group']} | {r['faces']} | {r['mae']:.2f} | {r['ca5']:.3f} |{_gender_cell(r, m['gender_head'])}" for r in rows)
        tables.append(f"{head}\n{line}\n{body}")
    if not tables:
        return ""
    return "\nBy group (fairness: the same model should serve every group alike):\n\n" + "\n\n".join(tables) + "\n"


def _schedule(config: TrainConfig) -> str:
    if config.lr_schedule == "cosine":
        return "learning rate annealed to 0 on a cosine over the epochs"
    return f"learning rate halved after {config.lr_patience} epochs without a better validation MAE"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a finished `c3ae train` run folder (its model.pt)")
    source.add_argument("--model", help="a model file written by `c3ae train`")
    parser.add_argument("--data", help="the preprocessed data to measure on (default: where the model was trained from)")
    parser.add_argument("--out", required=True, help="folder for MODEL_CARD.md and the plot")
    args = parser.parse_args(argv)
    try:
        measured = write_card(args.model or f"{args.run.rstrip('/')}/model.pt", args.out, args.data)
    except UserError as error:
        print(f"c3ae_ray.card: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in measured.items() if k not in ("true", "predicted", "data") and not k.startswith("by_")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
