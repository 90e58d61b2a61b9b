"""Every figure the project draws. Each function returns a matplotlib `Figure` (tests read what it plotted
from its lines, bars and labels); `png` renders one. Figures are built without pyplot: no global state, no
display, safe in Ray workers."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from c3ae_ray.metrics import CA_YEARS, DECADE, by_decade, decade_label


def png(figure: Figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _legend_once(axes, **options) -> None:
    """A legend with each label once (bars drawn one by one repeat their group's label)."""
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        axes.legend(unique.values(), unique.keys(), **options)


def training_curves(history: list[dict]) -> Figure:
    """Loss parts and validation MAE / CA per epoch of a training run."""
    figure = Figure(figsize=(11, 4))
    losses, errors = figure.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    for key, style in (("train_loss", "-"), ("val_loss", "-"), ("train_l1", "--"), ("train_kl", ":"), ("val_kl", ":")):
        losses.plot(epochs, [r[key] for r in history], style, label=key.replace("_", " "))
    losses.set(xlabel="epoch", ylabel="loss", title="loss (alpha x KL + L1)")
    losses.legend()
    errors.plot(epochs, [r["val_mae"] for r in history], "o-", label="val MAE (years)")
    errors.set(xlabel="epoch", ylabel="MAE (years)", title="validation")
    for axes in (losses, errors):
        axes.xaxis.get_major_locator().set_params(integer=True)
    shares = errors.twinx()
    for years in CA_YEARS:
        shares.plot(epochs, [r[f"val_ca{years}"] for r in history], "--", label=f"CA({years})")
    shares.set(ylabel="share within n years", ylim=(0, 1))
    handles, labels = (a + b for a, b in zip(errors.get_legend_handles_labels(), shares.get_legend_handles_labels()))
    errors.legend(handles, labels, loc="center right")
    return figure


def trial_mae(rows: list[dict]) -> Figure:
    """Test MAE per trial (a bar each, coloured by group); a failed trial is a red cross on the axis."""
    figure = Figure(figsize=(max(6.0, 0.22 * len(rows) + 2), 4))
    axes = figure.subplots()
    colours = {g: f"C{i}" for i, g in enumerate(dict.fromkeys(r["group"] for r in rows))}
    for x, row in enumerate(rows):
        if row["status"] == "ok":
            axes.bar(x, row["mae"], color=colours[row["group"]], label=row["group"])
        else:
            axes.plot(x, 0, "rx", markersize=10, label="failed")
    maes = [r["mae"] for r in rows if r["status"] == "ok"]
    if maes:
        axes.axhline(np.mean(maes), color="k", linestyle="--", linewidth=1, label=f"mean {np.mean(maes):.2f}")
    _legend_once(axes, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=90, fontsize=7)
    axes.set(ylabel="test MAE (years)", title="MAE per trial")
    return figure


def pred_vs_true(groups: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """Predicted against true age for every test face, per group, with the diagonal of a perfect estimate."""
    figure = Figure(figsize=(5.5, 5))
    axes = figure.subplots()
    top = 1.0
    for group, (true, predicted) in groups.items():
        axes.scatter(true, predicted, s=8, alpha=0.5, label=group)
        top = max(top, float(np.max(true, initial=0)), float(np.max(predicted, initial=0)))
    axes.plot([0, top], [0, top], "k--", linewidth=1)
    axes.set(xlabel="true age", ylabel="predicted age", title="predicted vs true age", xlim=(0, top * 1.05), ylim=(0, top * 1.05))
    if groups:
        axes.legend(fontsize=8)
    return figure


def error_by_decade(groups: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """MAE per true-age decade (bars per group); with one group, each bar says how many faces it holds."""
    figure = Figure(figsize=(8, 4))
    axes = figure.subplots()
    decades = sorted({int(a // DECADE) for true, _ in groups.values() for a in true})
    position = {decade: d for d, decade in enumerate(decades)}
    width = 0.8 / max(1, len(groups))
    for g, (group, (true, predicted)) in enumerate(groups.items()):
        for row in by_decade(predicted, true):
            x = position[row["decade"]] + (g - (len(groups) - 1) / 2) * width
            axes.bar(x, row["mae"], width, color=f"C{g}", label=group)
            if len(groups) == 1:
                axes.annotate(f"n={row['faces']}", (x, row["mae"]), ha="center", va="bottom", fontsize=8)
    _legend_once(axes, fontsize=8)
    axes.set_xticks(range(len(decades)), [decade_label(d) for d in decades])
    axes.set(xlabel="true age", ylabel="MAE (years)", title="error by age decade")
    return figure


def search_curves(histories: dict[str, tuple[list, list]]) -> Figure:
    """`c3ae tune`: validation MAE per epoch of every trial; a trial stopped early is a short line."""
    figure = Figure(figsize=(8, 4.5))
    axes = figure.subplots()
    for name, (epochs, maes) in histories.items():
        if epochs:
            axes.plot(epochs, maes, "o-", markersize=3, linewidth=1, label=name)
    axes.set(xlabel="epoch", ylabel="validation MAE (years)", title="validation MAE of every trial")
    axes.xaxis.get_major_locator().set_params(integer=True)
    if 0 < len(histories) <= 30:
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure


def search_settings(rows: list[dict], kinds: dict[str, str]) -> Figure:
    """`c3ae tune`: each searched setting against the trial's best validation MAE, one panel per setting (log axis
    for a log-uniform one, categories for a choice); finished trials filled, trials stopped early hollow."""
    figure = Figure(figsize=(4 * min(len(kinds), 3), 3.5 * -(-len(kinds) // 3)))
    panels = np.atleast_1d(figure.subplots(-(-len(kinds) // 3), min(len(kinds), 3), squeeze=False)).ravel()
    scored = [row for row in rows if row["best_val_mae"] is not None]
    for axes, (name, kind) in zip(panels, kinds.items()):
        values = [row["settings"][name] for row in scored]
        if kind == "choice":
            seen = list(dict.fromkeys(values))
            try:  # numbers in order (batch sizes 32, 50, 100), not in the order the trials drew them
                seen = sorted(seen)
            except TypeError:
                pass
            categories = list(map(str, seen))
            values = [categories.index(str(value)) for value in values]
            axes.set_xticks(range(len(categories)), categories)
        for stopped, marker in ((False, "o"), (True, "o")):
            pick = [i for i, row in enumerate(scored) if (row["status"] != "finished") == stopped]
            axes.scatter([values[i] for i in pick], [scored[i]["best_val_mae"] for i in pick], s=25, marker=marker,
                         facecolors="none" if stopped else "C0", edgecolors="C0",
                         label="stopped early" if stopped else "finished")
        if kind == "loguniform":
            axes.set_xscale("log")
            axes.xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels overlap on a narrow range
        axes.set(xlabel=name, ylabel="best validation MAE (years)")
    for axes in panels[len(kinds):]:
        axes.set_visible(False)
    _legend_once(panels[0], fontsize=7)
    return figure
