"""``spatialdrop demo``: does structured dropout regularise a small conv net? Measure it.

Trains the variants of :mod:`.demo_train` on the data of :mod:`.demo_data` and reports, per
variant, as mean ± std over seeds: test accuracy, test NLL, expected calibration error (15 bins),
accuracy on corrupted test inputs (an occluded patch; Gaussian noise) and the AUROC with which the
MC-dropout predictive entropy (:func:`spatialdrop.mc_predict`) separates wrong from right
predictions. For ``none`` there is no dropout layer, so its "MC" entropy is the entropy of one
deterministic softmax: the baseline an uncertainty method has to beat.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ._optional import require
from ._options import DEMO_FILES
from ._signals import exit_code, stopped
from .demo_data import load_data
from .demo_plot import plot
from .demo_train import LOWER_IS_BETTER, METRICS, WIDTHS, DemoSettings, run_all

__all__ = ["OUTPUT_FILES", "format_table", "run_demo", "summarise", "table_rows"]

CMD = "demo"
OUTPUT_FILES = DEMO_FILES
SYNTHETIC = "synthetic data: procedurally generated volumes, not a real data set"
SMOKE = "a --quick smoke run: too few epochs and seeds for the regularisers to pay off"


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return mean, math.sqrt(var)


def summarise(settings: DemoSettings, runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-variant metrics (per seed, mean, std) and learning curves from the runs."""
    out: dict[str, dict[str, Any]] = {}
    for variant in settings.variants:
        mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["run"])
        metrics = {}
        for name in mine[0]["metrics"]:
            values = [r["metrics"][name] for r in mine]
            mean, std = _mean_std(values)
            metrics[name] = {"mean": mean, "std": std, "per_seed": values}
        out[variant] = {
            "layer": LAYER_NAMES[variant].format(d=3 if settings.data == "volumes" else 2),
            "seeds": [r["seed"] for r in mine],
            "metrics": metrics,
            "curves": [r["curves"] for r in mine],
            "seconds": [r["seconds"] for r in mine],
        }
    return out


LAYER_NAMES = {
    "none": "no dropout",
    "dropout": "nn.Dropout",
    "spatial": "SpatialDropout{d}d",
    "dropblock": "DropBlock{d}d + DropSchedule",
}


def _fmt(mean: float, std: float, n: int) -> str:
    """``mean ± std``; ``mean (n = 1)`` for one value, whose spread is unknown (not 0)."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f} (n = 1)" if n < 2 else f"{mean:.3f} ± {std:.3f}"


def table_rows(summary: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table; the best mean of each column is marked with ``*``."""
    header = ["regulariser", *METRICS.values()]
    best: dict[str, str] = {}
    for name in METRICS:
        means = {v: s["metrics"][name]["mean"] for v, s in summary.items()}
        means = {v: m for v, m in means.items() if not math.isnan(m)}
        if means:
            pick = min if name in LOWER_IS_BETTER else max
            best[name] = pick(means, key=lambda v: means[v])
    rows = []
    for variant, s in summary.items():
        row = [s["layer"]]
        for name in METRICS:
            m = s["metrics"][name]
            n = sum(1 for v in m["per_seed"] if not math.isnan(v))
            row.append(_fmt(m["mean"], m["std"], n) + ("*" if best.get(name) == variant else " "))
        rows.append(row)
    return header, rows


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """A plain aligned text table, or a GitHub markdown table."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(c.strip() for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def run_demo(settings: DemoSettings, out: Path, *, show_progress: bool = True, command: str = "") -> int:
    """Run the comparison, print the table, write ``results.json`` and ``figure.png`` into ``out``.

    ``out`` must have been checked by the caller (:func:`.check_folder`). On Ctrl-C nothing is
    written and the exit code is 130 (143 after SIGTERM). The two files are replaced together,
    after both have been written.
    """
    # check the optional dependencies before the long part
    require("matplotlib", "matplotlib", CMD)
    if settings.data == "digits":
        require("sklearn.datasets", "scikit-learn", CMD)
    threads_before = torch.get_num_threads()
    start = time.perf_counter()
    try:
        runs = run_all(settings, show_progress)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (:mod:`._signals`)
        elapsed = time.perf_counter() - start
        print(f"spatialdrop demo: {stopped(err)} after {elapsed:.0f} s; nothing written", file=sys.stderr)
        return exit_code(err)
    finally:
        torch.set_num_threads(threads_before)
    elapsed = time.perf_counter() - start
    data = load_data(settings.data, settings.seed, settings.train_size, settings.noise_std)
    summary = summarise(settings, runs)
    header, rows = table_rows(summary)
    dims = data.spatial_dims
    title = (
        f"spatialdrop demo --data {settings.data}{' --quick' if settings.quick else ''}: "
        f"{len(data.y_train)} training examples, {settings.epochs} epochs, p = {settings.p}, "
        f"DropBlock block {settings.block_size}, {settings.seeds} seeds"
    )
    kind = [SYNTHETIC] if settings.data == "volumes" else []
    kind += [SMOKE] if settings.quick else []
    if kind:
        title += "\n" + "; ".join(kind)
    results = {
        "command": command,
        "settings": asdict(settings),
        "data": data.description,
        "model": f"{len(WIDTHS[dims])} conv{dims}d-BatchNorm-ReLU blocks, widths {list(WIDTHS[dims])}, "
        "the regulariser after each block, global average pooling, linear head; Adam",
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads_per_job": settings.threads,
            "jobs": settings.jobs,
        },
        "runtime_s": round(elapsed, 1),
        "metrics": METRICS,
        "table": {"header": header, "rows": [[c.strip() for c in r] for r in rows]},
        "variants": summary,
    }
    print(title)
    print(f"data: {data.description}")
    print()
    print(format_table(header, rows))
    print()
    spread = "mean ± std over seeds" if settings.seeds > 1 else "one seed (n = 1): no spread to show"
    print(
        f"{spread}; * best mean per column (lower is better for NLL and ECE). "
        "'MC AUROC': how well the MC-dropout predictive entropy separates wrong from right "
        "predictions (for 'no dropout' it is the plain softmax entropy)."
    )
    if settings.quick:
        print(
            "--quick is a smoke run: too few epochs and seeds for the regularisers to pay off; "
            "run without --quick for the comparison."
        )
    sys.stdout.flush()  # the table is shown even if writing the files fails
    text = json.dumps(results, indent=1, allow_nan=True) + "\n"
    # both files replaced together, after both were written: never a new table beside an old figure
    plot(summary, out / "figure.png", title, also={out / "results.json": lambda tmp: _write(tmp, text)})
    total = time.perf_counter() - start
    print(
        f"wrote {out / 'results.json'} and {out / 'figure.png'} in {total:.0f} s (training {elapsed:.0f} s)"
    )
    sys.stdout.flush()
    return 0
