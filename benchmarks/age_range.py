"""How well the age range holds its coverage, by decade of true age: the method that ships (spread of the face's
distribution, multipliers per band of predicted age) against two baselines fitted on the same faces in the same
run: one pair of multipliers for every face, and a fixed width in years (plain split conformal, no spread).

Fits on the calibration half of the model's held-out faces and measures on the other half (`calibrate.split_parts`),
exactly as `c3ae calibrate` and the model card do.

    python benchmarks/age_range.py --model c3ae_ray/pretrained/c3ae_utkface.pt --data runs/utkface-all-faces
"""

from __future__ import annotations

import argparse

import numpy as np

from c3ae_ray import calibrate
from c3ae_ray.faces import open_faces, read_faces
from c3ae_ray.inference import predict_stored
from c3ae_ray.metrics import range_by_decade, range_metrics
from c3ae_ray.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="the preprocessed faces the model was trained on")
    parser.add_argument("--coverage", type=float, default=calibrate.COVERAGE)
    args = parser.parse_args()
    model, payload = load_model(args.model)
    data = open_faces(args.data)
    faces = read_faces(data)
    bins = model.cfg.bins.numpy()

    def outputs_of(rows):
        return predict_stored(model, data, faces, rows), faces["age"][rows]

    calibration_rows, check_rows = calibrate.split_parts(data, payload["meta"]["train_config"]["val_fraction"])
    (fit_on, fit_true), (test_on, test_true) = outputs_of(calibration_rows), outputs_of(check_rows)
    methods = {
        "bands of predicted age x spread (ships)": (fit_on.distribution, test_on.distribution, calibrate.BAND_EDGES),
        "one band x spread (baseline)": (fit_on.distribution, test_on.distribution, ()),
        "fixed width (baseline)": (None, None, ()),
    }
    results = {}
    for name, (fit_distribution, test_distribution, edges) in methods.items():
        fitted = calibrate.fit(fit_on.age, fit_distribution, fit_true, bins, args.coverage, edges)
        low, high = calibrate.bounds(test_on.age, test_distribution, fitted, bins)
        results[name] = (range_metrics(low, high, test_true), range_by_decade(low, high, test_true))
    print(f"{args.model}: {int(calibration_rows.sum())} faces fitted on, {int(check_rows.sum())} measured, target "
          f"{100 * args.coverage:.0f}%")
    for name, (overall, _) in results.items():
        print(f"  {name}: {100 * overall['coverage']:.1f}% inside, mean width {overall['mean_width']:.1f} years")
    decades = [row for row in next(iter(results.values()))[1] if row["faces"] >= 20]
    print("\n| true ages | faces | " + " | ".join(results) + " |")
    print("|---|---|" + "---|" * len(results))
    for row in decades:
        cells = []
        for _, by_decade in results.values():
            cell = next(r for r in by_decade if r["decade"] == row["decade"])
            cells.append(f"{100 * cell['coverage']:.0f}% ({cell['mean_width']:.1f} y)")
        print(f"| {row['ages']} | {row['faces']} | " + " | ".join(cells) + " |")
    print("\ncoverage off the target, over the decades with 20+ faces (a face's decade counts once per face):")
    for name, (_, by_decade) in results.items():
        rows = [r for r in by_decade if r["faces"] >= 20]
        off = np.array([abs(r["coverage"] - args.coverage) for r in rows])
        weights = np.array([r["faces"] for r in rows])
        print(f"  {name}: {100 * (off * weights).sum() / weights.sum():.1f} points on average, {100 * off.max():.0f} at worst")


if __name__ == "__main__":
    main()
