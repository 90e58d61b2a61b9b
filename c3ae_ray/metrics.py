"""Age metrics as the paper reports them, one definition for training, evaluation and the model card:
MAE in years and the cumulative accuracy CA(n), the share of faces within n years; gender accuracy; the age
range's coverage and width; each by age decade or any other grouping (the model card's fairness tables)."""

from __future__ import annotations

import numpy as np

CA_YEARS = (3, 5, 7)
DECADE = 10


def age_metrics(predicted, true) -> dict:
    """{faces, mae, ca3, ca5, ca7}; None values for no faces."""
    errors = np.abs(np.asarray(predicted, dtype=np.float64) - np.asarray(true, dtype=np.float64))
    if not len(errors):
        return {"faces": 0, "mae": None, **{f"ca{years}": None for years in CA_YEARS}}
    return {"faces": int(len(errors)), "mae": float(errors.mean()),
            **{f"ca{years}": float((errors <= years).mean()) for years in CA_YEARS}}


def decade_label(decade: int) -> str:
    return f"{decade * DECADE}-{decade * DECADE + DECADE - 1}"


def gender_metrics(p_female, genders) -> dict:
    """{gender_faces, gender_acc}: the share of faces with a known gender ("female"/"male") whose p_female falls
    on its side of 0.5; gender_acc None when no face has a known gender."""
    p_female, genders = np.asarray(p_female, dtype=np.float64), np.asarray(genders, dtype=object)
    known = (genders == "female") | (genders == "male")
    if not known.any():
        return {"gender_faces": 0, "gender_acc": None}
    right = (p_female[known] >= 0.5) == (genders[known] == "female")
    return {"gender_faces": int(known.sum()), "gender_acc": float(right.mean())}


def by_group(groups, predicted, true, p_female=None, genders=None) -> list[dict]:
    """`age_metrics` (and `gender_metrics` when p_female is given) per value of `groups`, in sorted order with
    unknown (None) last: the rows of the model card's fairness tables."""
    groups = np.asarray([g if g is not None else "unknown" for g in groups], dtype=object)
    predicted, true = np.asarray(predicted), np.asarray(true)
    values = sorted({g for g in groups.tolist() if g != "unknown"}) + ["unknown"] * ("unknown" in set(groups.tolist()))
    rows = []
    for value in values:
        pick = groups == value
        row = {"group": value, **age_metrics(predicted[pick], true[pick])}
        if p_female is not None:
            row.update(gender_metrics(np.asarray(p_female)[pick], np.asarray(genders, dtype=object)[pick]))
        rows.append(row)
    return rows


def by_decade(predicted, true, p_female=None, genders=None) -> list[dict]:
    """`by_group` over the decades of the true age, youngest first, with the decade (2) and its label ("20-29")."""
    decades = (np.asarray(true) // DECADE).astype(int)
    rows = []
    for row in by_group(decades.tolist(), predicted, true, p_female, genders):
        decade = row.pop("group")
        rows.append({"decade": decade, "ages": decade_label(decade), **row})
    return rows


def range_metrics(low, high, true) -> dict:
    """{faces, coverage, mean_width}: the share of true ages inside [low, high] and its mean width in years."""
    low, high, true = (np.asarray(v, dtype=np.float64) for v in (low, high, true))
    if not len(true):
        return {"faces": 0, "coverage": None, "mean_width": None}
    return {"faces": int(len(true)), "coverage": float(((true >= low) & (true <= high)).mean()),
            "mean_width": float((high - low).mean())}


def range_by_decade(low, high, true) -> list[dict]:
    """`range_metrics` per decade of the true age, youngest first."""
    low, high, true = (np.asarray(v, dtype=np.float64) for v in (low, high, true))
    decades = (true // DECADE).astype(int)
    return [{"decade": int(d), "ages": decade_label(int(d)), **range_metrics(low[decades == d], high[decades == d], true[decades == d])}
            for d in sorted(set(decades.tolist()))]


def error_sums(errors) -> list[float]:
    """Absolute errors of a batch -> [faces, sum of errors, faces within each CA_YEARS]: sums add up over
    batches and over data-parallel workers, and `from_sums` turns the total into metrics."""
    errors = np.asarray(errors, dtype=np.float64)
    return [float(len(errors)), float(errors.sum()), *(float((errors <= years).sum()) for years in CA_YEARS)]


def from_sums(sums: list[float], prefix: str = "") -> dict:
    n, total, *within = sums
    n = max(n, 1)
    return {f"{prefix}mae": total / n, **{f"{prefix}ca{years}": count / n for years, count in zip(CA_YEARS, within)}}
