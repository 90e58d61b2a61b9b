"""Ensembles of 1, 3 and 5 members: validation MAE, CA(5), gender accuracy, milliseconds per face and file size.

From a finished (or member-complete) `c3ae train --members N` run: the first k of its members averaged as one
model (`model.Ensemble`), measured in this process on the run's own validation faces. Baselines from the same
run: one member alone (member 1, and the mean over every member alone: the score of a single run with a
random seed). Cost per face: the model half only (crops already cut), one thread, mirror averaging as the
recipe has it.

    python benchmarks/ensemble.py --run runs/ens5 [--sizes 1 3 5]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch

from c3ae_ray import storage
from c3ae_ray.config import build
from c3ae_ray.faces import decode_regions, open_faces, read_faces
from c3ae_ray.inference import predict_regions
from c3ae_ray.metrics import age_metrics, gender_metrics
from c3ae_ray.model import Ensemble, load_model, save_model
from c3ae_ray.train import TrainConfig, member_config


def combined(members: list) -> torch.nn.Module:
    if len(members) == 1:
        return members[0]
    ensemble = Ensemble(members[0].cfg, len(members)).eval()
    for slot, member in zip(ensemble.members, members):
        slot.load_state_dict(member.state_dict())
    return ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a `c3ae train --members N` run folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 5])
    args = parser.parse_args()
    cfg = build(TrainConfig, storage.read_json(*storage.resolve(f"{args.run}/config.json")))
    members = []  # the members trained so far, in order (a run still training its later members can be measured)
    for k in range(1, cfg.members + 1):
        location = f"{member_config(cfg, k).out}/model.pt"
        if not storage.exists(*storage.resolve(location)):
            break
        members.append(load_model(location)[0])
    if not members:
        raise SystemExit(f"{args.run}: no member has finished yet")
    data = open_faces(cfg.val_data or cfg.data)
    faces = read_faces(data)
    rows = np.ones(len(data.keys), dtype=bool) if cfg.val_data else data.held_out(cfg.val_fraction)
    index = np.flatnonzero(rows)
    regions = decode_regions([faces["jpeg"][i] for i in index], [faces["path"][i] for i in index], data.crop.region_size)
    boxes, true = faces["boxes"][index], faces["age"][index]
    genders = np.asarray(faces["gender"], dtype=object)[index]
    torch.set_num_threads(1)

    def measure(model) -> dict:
        started = time.perf_counter()
        outputs = predict_regions(model, regions, boxes)
        ms_per_face = 1000 * (time.perf_counter() - started) / len(index)
        row = {**age_metrics(outputs.age, true), "ms_per_face": ms_per_face, "bytes": save_model(model, io.BytesIO())}
        if outputs.p_female is not None:
            row.update(gender_metrics(outputs.p_female, genders))
        return row

    alone = [measure(member) for member in members]
    print(f"{args.run}: {len(members)} of {cfg.members} members trained, {cfg.epochs} epochs each (seeds {cfg.seed} to "
          f"{cfg.seed + len(members) - 1}), "
          f"{len(index)} validation faces of {cfg.val_data or cfg.data}; one thread")
    print("members alone, val MAE: " + ", ".join(f"{row['mae']:.3f}" for row in alone)
          + f" (mean {np.mean([row['mae'] for row in alone]):.3f})")
    sizes = [k for k in args.sizes if k <= len(members)]
    results = {k: measure(combined(members[:k])) for k in sizes}
    gender = "gender_acc" in alone[0]
    print("\n| members | val MAE | CA(5) |" + (" gender accuracy |" if gender else "") + " ms per face | file bytes |")
    print("|---|---|---|" + ("---|" if gender else "") + "---|---|")
    mean_alone = {name: float(np.mean([row[name] for row in alone])) for name in alone[0] if isinstance(alone[0][name], float)}
    rows_out = [("1 alone, mean of all", {**mean_alone, "bytes": alone[0]["bytes"]})] + [(str(k), results[k]) for k in sizes]
    for name, row in rows_out:
        print(f"| {name} | {row['mae']:.3f} | {row['ca5']:.3f} |" + (f" {row['gender_acc']:.3f} |" if gender else "")
              + f" {row['ms_per_face']:.2f} | {row['bytes']:,} |")
    if sizes and sizes[-1] > 1:
        k = sizes[-1]
        print(f"\n{k} members: {mean_alone['mae'] - results[k]['mae']:+.3f} years better than one member alone on average, "
              f"{alone[0]['mae'] - results[k]['mae']:+.3f} than member 1 (goal: at least 0.15), "
              f"{results[k]['ms_per_face'] / alone[0]['ms_per_face']:.1f}x the cost per face, {results[k]['bytes'] / 2**20:.2f} MiB "
              "(goal: under 1 MB)")


if __name__ == "__main__":
    main()
