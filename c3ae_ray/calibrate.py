"""The age range: a central interval around each face's age, from the model's own distribution over the age
bins, calibrated on held-out faces so that the stated share of true ages falls inside it.

Split conformal prediction with a spread, by band of predicted age (Mondrian): a face's spread is the standard
deviation of its distribution (at least `MIN_SPREAD_YEARS`; 1 year for a model without the cascade, which then
gets fixed widths). On the calibration faces of each band of predicted age, the errors below and above the age,
divided by the spread, give two multipliers: the conformal quantiles that leave (1 - coverage) / 2 of the band's
faces on each side. A face's range is then

    age_low  = max(0, age - below[band] * spread)
    age_high =        age + above[band] * spread

so a face the model is unsure of (a flat distribution) gets a wide range, and each band holds the coverage on
its own: one pair of multipliers for all faces gave children 93% and the 40s and 50s 70% (bundled model). The
band is the predicted age's, known at answer time. The multipliers live in the model file (`age_range`); a file
without them still loads and answers no range. Calibration uses the validation faces of training's own hash
split whose hash lies in the upper half of the split, and checks coverage on the lower half, which nothing was
fitted on (`c3ae train` does both at its end; `c3ae calibrate` for an existing file).

    c3ae calibrate --model model.pt --data runs/utkface-faces --out model-with-range.pt
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np

from c3ae_ray import storage
from c3ae_ray.config import UserError, build, check
from c3ae_ray.metrics import range_metrics

COVERAGE = 0.8  # the share of true ages a range is meant to hold
MIN_FACES = 20  # fewer calibration faces than this in a band: the band merges with a neighbour (all: no range)
MIN_SPREAD_YEARS = 1.0  # a near-certain distribution still gets a range of some width
BAND_EDGES = (12.0, 20.0, 30.0, 45.0, 60.0)  # predicted ages between the bands, before merging thin ones


@dataclass(frozen=True)
class AgeRange:
    """A model file's calibration: per band of predicted age, multipliers of the spread below and above the age;
    and where they came from."""

    coverage: float  # the share of true ages meant to fall inside
    below: tuple[float, ...]  # per band: the range reaches below * spread years under the age ...
    above: tuple[float, ...]  # ... and above * spread years over it
    faces: int  # calibration faces
    edges: tuple[float, ...] = ()  # predicted ages between the bands, ascending (none: one band)
    check_faces: int = 0  # held-out faces the coverage was checked on (none fitted on them)
    check_coverage: float | None = None  # the share of their true ages inside their ranges

    def __post_init__(self):
        check(0 < self.coverage < 1, f"age_range: coverage must be in (0, 1), got {self.coverage}")
        check(len(self.below) == len(self.above) == len(self.edges) + 1, "age_range: one multiplier per band and side")
        check(min(self.below + self.above) >= 0, "age_range: multipliers must not be negative")
        check(list(self.edges) == sorted(self.edges), "age_range: band edges must ascend")


def spread(distribution, bins):
    """Standard deviation (years) of each face's distribution over the bins, at least MIN_SPREAD_YEARS; numpy
    arrays or torch tensors (the exports compute it in their graph). No distribution: None."""
    if distribution is None:
        return None
    mean = distribution @ bins
    variance = distribution @ (bins * bins) - mean * mean
    return variance.clip(min=MIN_SPREAD_YEARS ** 2) ** 0.5


def _band(age, edges: tuple[float, ...]):
    """Each face's band index from its predicted age (numpy or torch: comparisons and a sum export anywhere)."""
    if not edges:
        return (age * 0).long() if hasattr(age, "long") else np.zeros(len(age), dtype=np.int64)
    if hasattr(age, "long"):  # torch
        import torch

        return (age[:, None] >= torch.tensor(edges, dtype=age.dtype, device=age.device)).sum(1)
    return (np.asarray(age)[:, None] >= np.asarray(edges)).sum(1)


def bounds(age, distribution, age_range: AgeRange, bins):
    """(age_low, age_high) for each face; numpy arrays or torch tensors."""
    width = spread(distribution, bins)
    width = 1.0 if width is None else width
    band = _band(age, age_range.edges)
    if hasattr(age, "long"):
        import torch

        below, above = (torch.tensor(v, dtype=age.dtype, device=age.device)[band] for v in (age_range.below, age_range.above))
    else:
        below, above = (np.asarray(v)[band] for v in (age_range.below, age_range.above))
    return (age - below * width).clip(min=0), age + above * width


def _multipliers(errors_below: np.ndarray, errors_above: np.ndarray, coverage: float) -> tuple[float, float]:
    """The conformal quantile on each side that leaves (1 - coverage) / 2 of the faces beyond it (with n faces,
    the ceil((n + 1) q)-th smallest scaled error), never negative."""
    n = len(errors_below)
    rank = min(n, math.ceil((n + 1) * (1 - (1 - coverage) / 2))) - 1
    return tuple(round(float(max(0.0, np.sort(errors)[rank])), 4) for errors in (errors_below, errors_above))


def _bands(age: np.ndarray, edges: tuple[float, ...]) -> tuple[float, ...]:
    """`edges` less those that leave a band with fewer than MIN_FACES faces (the thinnest band merges first)."""
    edges = list(edges)
    while edges:
        counts = np.bincount(_band(age, tuple(edges)), minlength=len(edges) + 1)
        if counts.min() >= MIN_FACES:
            break
        thin = int(counts.argmin())
        # merge the thin band with its thinner neighbour: drop the edge between them
        edges.pop(thin - 1 if thin == len(edges) or (thin > 0 and counts[thin - 1] <= counts[thin + 1]) else thin)
    return tuple(edges)


def fit(age: np.ndarray, distribution: np.ndarray | None, true: np.ndarray, bins: np.ndarray,
        coverage: float = COVERAGE, edges: tuple[float, ...] = BAND_EDGES) -> AgeRange:
    """The multipliers from calibration faces, per band of predicted age (thin bands merged)."""
    n = len(true)
    if n < MIN_FACES:
        raise UserError(f"calibration needs at least {MIN_FACES} faces with an age, got {n}")
    width = spread(distribution, bins)
    width = np.ones(n) if width is None else width
    edges = _bands(age, edges)
    band = _band(age, edges)
    pairs = [_multipliers(((age - true) / width)[band == b], ((true - age) / width)[band == b], coverage) for b in range(len(edges) + 1)]
    return AgeRange(coverage=coverage, below=tuple(p[0] for p in pairs), above=tuple(p[1] for p in pairs), faces=n, edges=edges)


def age_range_of(payload: dict) -> AgeRange | None:
    """The calibration a model file carries, or None."""
    stored = payload.get("age_range")
    return None if not stored else build(AgeRange, stored, "model file age_range")


def split_parts(data, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(calibration rows, check rows) of the data: the validation split's upper and lower hash halves."""
    check_rows = data.held_out(val_fraction / 2)
    return data.held_out(val_fraction) & ~check_rows, check_rows


def calibrate_model(model, data, val_fraction: float, coverage: float = COVERAGE) -> dict:
    """Fit the range on the calibration part of `data`'s validation faces and check it on the other part
    -> {age_range (AgeRange), check: the checked faces' true ages, ranges and coverage}."""
    from c3ae_ray.faces import read_faces
    from c3ae_ray.inference import predict_stored

    faces = read_faces(data)
    bins = model.cfg.bins.numpy()

    def outputs_of(rows: np.ndarray):
        return predict_stored(model, data, faces, rows), faces["age"][rows]

    calibration_rows, check_rows = split_parts(data, val_fraction)
    outputs, true = outputs_of(calibration_rows)
    fitted = fit(outputs.age, outputs.distribution, true, bins, coverage)
    checked, check_true = outputs_of(check_rows)
    low, high = bounds(checked.age, checked.distribution, fitted, bins)
    held = range_metrics(low, high, check_true)
    age_range = AgeRange(**{**asdict(fitted), "check_faces": held["faces"],
                            "check_coverage": None if held["coverage"] is None else round(held["coverage"], 4)})
    return {"age_range": age_range, "true": check_true, "low": low, "high": high}


def calibrate_file(model_location: str, data_location: str, out: str, coverage: float = COVERAGE,
                   val_fraction: float | None = None) -> dict:
    """`c3ae calibrate`: the model file with its age range written to `out` -> a summary."""
    from c3ae_ray.faces import open_faces
    from c3ae_ray.model import load_model, save_model

    check(0 < coverage < 1, f"coverage must be between 0 and 1, got {coverage}")
    model, payload = load_model(model_location)
    recorded = (payload.get("meta") or {}).get("train_config", {}).get("val_fraction")
    fraction = val_fraction or recorded
    if fraction is None:
        raise UserError(f"{model_location} records no validation split: give --val-fraction")
    result = calibrate_model(model, open_faces(data_location), fraction, coverage)
    buffer = io.BytesIO()
    size = save_model(model, buffer, crop_config=payload["crop_config"], meta=payload["meta"], age_range=asdict(result["age_range"]))
    filesystem, path = storage.resolve(out)
    with filesystem.open_output_stream(path) as stream:
        stream.write(buffer.getvalue())
    return {"model": model_location, "out": out, "bytes": size, "val_fraction": fraction, **summary_of(result)}


def summary_of(result: dict) -> dict:
    """The calibration's figures for summaries: multipliers, faces, checked coverage and mean width."""
    width = result["high"] - result["low"]
    return {"age_range": asdict(result["age_range"]), "mean_width": round(float(width.mean()), 2) if len(width) else None}


def format_summary(summary: dict) -> str:
    r = summary["age_range"]
    checked = ("no held-out faces to check it on" if r["check_coverage"] is None else
               f"{100 * r['check_coverage']:.1f}% of {r['check_faces']} held-out faces inside (mean width {summary['mean_width']:.1f} years)")
    return (f"{100 * r['coverage']:.0f}% age range calibrated on {r['faces']} faces in {len(r['below'])} band(s) of predicted "
            f"age; {checked}")
