"""The figure of ``spatialdrop demo``: learning curves, and every metric with every seed shown."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ._io import write_all
from ._optional import require
from .demo_train import LOWER_IS_BETTER, METRICS

__all__ = ["ACCURACY_TICKS", "CAPTION", "COLORS", "plot"]

COLORS = {"none": "#555555", "dropout": "#1f77b4", "spatial": "#2ca02c", "dropblock": "#d62728"}
ACCURACY_TICKS = (0.01, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
CAPTION = (
    "Top: mean over seeds (line) ± 1 std (band). Bottom: large dot = mean over seeds, bar = ± 1 std, "
    "small dots = the individual seeds; ↑ higher is better, ↓ lower is better. MC AUROC: how well the "
    "MC-dropout entropy flags wrong predictions (plain softmax entropy for 'no dropout')."
)


def plot(
    summary: dict[str, dict[str, Any]],
    path: Path,
    title: str,
    also: Mapping[Path, Callable[[Path], None]] | None = None,
) -> None:
    """Draw the learning curves (top) and the per-metric comparison (bottom) into the PNG ``path``.

    The same layer names label the legend and the bottom panels' ticks; the accuracy axis (a logit
    scale) spans all the data; the legend sits above the panels, outside the data. ``title`` may
    hold two lines (the second says what kind of run or data it is). The files of ``also``
    (``path -> write(tmp)``) are written with the figure, and all are replaced together
    (:func:`.write_all`).
    """
    matplotlib = require("matplotlib", "matplotlib", "demo")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "matplotlib", "demo")
    ticker = require("matplotlib.ticker", "matplotlib", "demo")

    fig = plt.figure(figsize=(15, 8.4), layout="constrained")
    grid = fig.add_gridspec(3, len(METRICS), height_ratios=[0.08, 1.25, 1])
    half = len(METRICS) // 2
    ax_legend = fig.add_subplot(grid[0, :])
    ax_acc = fig.add_subplot(grid[1, :half])
    ax_loss = fig.add_subplot(grid[1, half:])
    for variant, s in summary.items():
        color = COLORS[variant]
        for key, ax in (("test_accuracy", ax_acc), ("train_loss", ax_loss)):
            ys = torch.tensor([c[key] for c in s["curves"]], dtype=torch.float64)
            epochs = s["curves"][0]["epoch"]
            mean = ys.mean(dim=0)
            label = s["layer"] if ax is ax_acc else None
            ax.plot(epochs, mean.tolist(), color=color, label=label, lw=1.6, marker=".", ms=4)
            if len(ys) > 1:
                std = ys.std(dim=0)
                low, high = (mean - std).tolist(), (mean + std).tolist()
                ax.fill_between(epochs, low, high, color=color, alpha=0.15, lw=0)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy during training, logit scale")
    # a logit axis spreads the last epochs' accuracies near 1 (on a linear 0.1-1.0 axis they
    # differ by a pixel or two) and still shows the first epochs' (all the data is on the axis)
    ax_acc.set_yscale("logit", nonpositive="clip")
    ax_acc.yaxis.set_major_locator(ticker.FixedLocator(ACCURACY_TICKS))
    ax_acc.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax_acc.yaxis.set_minor_locator(ticker.NullLocator())
    ax_loss.set(xlabel="epoch", title="training loss (dropout active), log scale")
    ax_loss.set_ylabel("training loss", labelpad=10)
    ax_loss.set_yscale("log")
    ax_loss.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_loss.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax_loss.yaxis.set_minor_formatter(ticker.NullFormatter())
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    # the legend gets a row of its own, above the panels, so that it covers no data
    ax_legend.axis("off")
    handles, labels = ax_acc.get_legend_handles_labels()
    ax_legend.legend(handles, labels, loc="center", ncol=len(summary), fontsize=10, frameon=False)

    names = [s["layer"] for s in summary.values()]
    for i, (metric, label) in enumerate(METRICS.items()):
        ax = fig.add_subplot(grid[2, i])
        for j, (variant, s) in enumerate(summary.items()):
            m = s["metrics"][metric]
            values = [v for v in m["per_seed"] if not math.isnan(v)]
            color = COLORS[variant]
            ax.scatter([j + 0.18] * len(values), values, color=color, s=14, alpha=0.6, lw=0)
            if values:
                ax.errorbar(j, m["mean"], yerr=m["std"], fmt="o", color=color, ms=7, capsize=4, lw=1.5)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.3)
        arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
        ax.set_title(f"{label} {arrow}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=11)
    fig.supxlabel(CAPTION, fontsize=9, wrap=True)
    try:
        write_all({path: lambda tmp: fig.savefig(tmp, dpi=110, format="png"), **(also or {})})
    finally:
        plt.close(fig)
