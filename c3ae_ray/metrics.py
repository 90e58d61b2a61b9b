"""Age metrics as the paper reports them, one definition for training, evaluation and the model card:
MAE in years and the cumulative accuracy CA(n), the share of faces within n years; both by age decade too."""

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


def by_decade(predicted, true) -> list[dict]:
    """`age_metrics` per decade of the true age, youngest first, with the decade (2) and its label ("20-29")."""
    predicted, true = np.asarray(predicted), np.asarray(true)
    decades = (true // DECADE).astype(int)
    return [{"decade": d, "ages": decade_label(d), **age_metrics(predicted[decades == d], true[decades == d])}
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
