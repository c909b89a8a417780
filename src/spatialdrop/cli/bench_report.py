"""How ``spatialdrop bench`` reports: the environment and the four output formats.

``table`` (the default) fits in :data:`WIDTH` columns and shows the main figures; ``markdown``,
``json`` and ``csv`` hold every measured column. The bench measures and reports; it does not
judge: the speed and memory goals are checked on a JSON report by ``benchmarks/goals.py`` in a
source checkout (:data:`GOALS`, the last line of ``table`` and ``markdown``).
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import itertools
import json
import os
import platform
import textwrap
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

import spatialdrop

from .bench_cases import REFERENCE
from .bench_measure import Row

__all__ = ["GOALS", "WIDTH", "environment", "format_rows"]

WIDTH = 100


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(threads: int, malloc: str = "default") -> dict[str, Any]:
    """The machine and the libraries the numbers come from."""
    try:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "unknown"
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "load_average_before": load,
        "malloc": malloc,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "spatialdrop": spatialdrop.__version__,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "dropblock": _version("dropblock"),
    }


# --- formats ------------------------------------------------------------------------------------

FULL_COLUMNS = [
    ("case", "case"),
    ("shape", "shape"),
    ("library", "library"),
    ("call", "call"),
    ("fwd_ms", "fwd ms"),
    ("fwd_ratio", f"fwd / {REFERENCE}"),
    ("fwd_bwd_ms", "fwd+bwd ms"),
    ("fwd_bwd_ratio", f"fwd+bwd / {REFERENCE}"),
    ("fwd_bwd_best_ms", "fwd+bwd best ms"),
    ("fwd_bwd_faults", "page faults per fwd+bwd"),
    ("clean_calls", "fwd+bwd calls without fresh pages"),
    ("fwd_bwd_clean_ratio", f"fwd+bwd / {REFERENCE}, calls without fresh pages"),
    ("vs_torchvision", "fwd+bwd speed-up vs torchvision"),
    ("vs_baseline", "fwd+bwd speed-up vs the case's baseline"),
    ("fwd_bwd_vs_eager", "fwd+bwd compiled / eager"),
    ("saved_bytes", "saved for bwd"),
    ("drop_mean", "drop mean"),
    ("drop_corner", "drop corner"),
    ("drop_centre", "drop centre"),
    ("note", "note"),
]
CALIBRATION_COLUMNS = [
    ("case", "case"),
    ("library", "library"),
    ("call", "call"),
    ("drop_mean", "drop mean"),
    ("drop_corner", "drop corner"),
    ("drop_centre", "drop centre"),
    ("fp16_ok", "float16 finite, not all zero"),
    ("note", "note"),
]
# the default table: the main figures, short titles (explained by LEGEND), at most WIDTH columns
TABLE_COLUMNS = [
    ("call", "call"),
    ("fwd_ms", "fwd ms"),
    ("fwd_bwd_ms", "f+b ms"),
    ("fwd_bwd_ratio", "f+b/ref"),
    ("vs_torchvision", "tv/ours"),
    ("vs_baseline", "base/ours"),
    ("fwd_bwd_vs_eager", "/eager"),
    ("saved_fraction", "saved"),
    ("drop_mean", "drop"),
]
TABLE_CALIBRATION_COLUMNS = [
    ("call", "call"),
    ("drop_mean", "mean"),
    ("drop_corner", "corner"),
    ("drop_centre", "centre"),
    ("fp16_ok", "fp16 ok"),
]
LEGEND = (
    f"f+b: forward + backward; ref: {REFERENCE} on the same input; tv/ours: torchvision's f+b time "
    "over ours; base/ours: the case's baseline f+b time over this row's (DropPath residual: "
    "x + DropPath(p)(branch(x))); /eager: compiled f+b time over the eager layer's; saved: bytes "
    "kept for backward beyond the input, as % of the input; drop: fraction dropped on an all-ones input. "
    "Every column, the corner and centre drop rates included: --format markdown, json or csv."
)
TEXT_KEYS = ("case", "shape", "library", "call", "note")


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _cell(row: Row, key: str) -> str:
    value = getattr(row, key)
    if value is None:
        return "—"
    if key == "saved_bytes":
        return f"{_human_bytes(value)} ({100 * (row.saved_fraction or 0):.1f}%)"
    if key == "saved_fraction":
        return f"{100 * value:.1f}%"
    if key.endswith("_ms"):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    if key == "fwd_bwd_faults":
        return f"{value:.0f}"
    if key.endswith(("_ratio", "_vs_eager")) or key in ("vs_torchvision", "vs_baseline"):
        return f"{value:.2f}×" if value < 100 else f"{value:.0f}×"
    if key.startswith("drop_"):
        return f"{value:.3f}"
    if key == "fp16_ok":
        return "yes" if value else "NO"
    return str(value)


def _markdown(rows: list[Row], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(t for _, t in columns) + " |"]
    lines.append("|" + "|".join("---" if k in TEXT_KEYS else "---:" for k, _ in columns) + "|")
    for r in rows:
        cells = [_cell(r, k) for k, _ in columns]
        cells = [f"`{c}`" if k == "call" else c for (k, _), c in zip(columns, cells)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ") or [""]


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _peer_missing(row: Row) -> bool:
    """Whether ``row`` is a peer's that could not be imported (its note says why, once per peer)."""
    return row.note.startswith((f"{row.library} not installed", f"{row.library} unavailable: "))


def _plain(rows: list[Row], columns: list[tuple[str, str]], title: Callable[[Row], str]) -> list[str]:
    """Groups of rows under a heading, each line at most WIDTH characters, notes below the group."""
    keys = [k for k, _ in columns]
    titles = [t for _, t in columns]
    widths = [max(len(t), *(len(_cell(r, k)) for r in rows)) for k, t in zip(keys, titles)]
    room = WIDTH - sum(widths[1:]) - 2 * (len(widths) - 1)
    widths[0] = max(12, min(widths[0], room))  # the call column takes what is left
    out = []
    for heading, group in itertools.groupby(rows, key=title):
        out += _wrap(heading)
        out.append(
            "  ".join(t.ljust(w) if k in TEXT_KEYS else t.rjust(w) for k, t, w in zip(keys, titles, widths))
        )
        notes = []
        for r in group:
            cells = [_fit(_cell(r, k), w) for k, w in zip(keys, widths)]
            line = "  ".join(
                c.ljust(w) if k in TEXT_KEYS else c.rjust(w) for k, c, w in zip(keys, cells, widths)
            )
            out.append(line.rstrip())
            if r.note and not _peer_missing(r):
                notes.append(f"note: {r.call}: {r.note}")
            elif len(r.call) > widths[0]:
                notes.append(f"call in full: {r.call}")
        for note in notes:
            out += _wrap(note, "  ")
        out.append("")
    return out


SMOKE = "a --quick smoke run: small shapes and few repeats, not figures to compare or quote"
GOALS = "goals: check a JSON report (--out NAME.json) with python benchmarks/goals.py NAME.json"
GOALS_MARKDOWN = "Goals: check a JSON report (`--out NAME.json`) with `python benchmarks/goals.py NAME.json`."


def format_rows(
    rows: list[Row],
    fmt: str,
    env: dict[str, Any],
    command: str,
    *,
    smoke: bool = False,
    partial: str = "",
) -> str:
    """The rows as ``table``, ``markdown``, ``json`` or ``csv`` text.

    ``smoke`` marks a ``--quick`` run; ``partial`` (why the run stopped, e.g. "interrupted after
    6 s, 2 of 4 cases measured") marks the rows of an interrupted one, in every format: a first
    line in ``table`` and ``markdown``, ``"partial"`` in ``json``, a ``partial`` column in ``csv``.
    """
    if fmt == "json":
        report = {
            "command": command,
            "partial": bool(partial),
            **({"interrupted": partial} if partial else {}),
            "smoke_run": smoke,
            "environment": env,
            "rows": [asdict(r) for r in rows],
        }
        return json.dumps(report, indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        fields = [f.name for f in Row.__dataclass_fields__.values()]
        writer = csv.DictWriter(buf, fieldnames=[*fields, "partial"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**asdict(r), "partial": bool(partial)})
        return buf.getvalue()
    banner = f"PARTIAL RESULTS ({partial}): not every case was measured" if partial else ""
    machine = (
        f"{env['cpu']}, {env['cores']} cores, torch threads {env['torch_threads']}, load average "
        f"before {env['load_average_before']}, malloc {env['malloc']}; torch {env['torch']}, "
        f"torchvision {env['torchvision']}, timm {env['timm']}, dropblock {env['dropblock']}; "
        f"{env['platform']}"
    )
    about = (
        f"speed: median of interleaved repeats after warm-up, ratios to {REFERENCE} on the same input in "
        "the same run; saved for bwd: bytes autograd keeps beyond the input (% of the input's); "
        "drop rates on an all-ones input"
    )
    speed = [r for r in rows if r.kind == "speed"]
    calibration = [r for r in rows if r.kind == "calibration"]
    if fmt == "markdown":
        lines = [f"**{banner}.**", ""] if banner else []
        lines += [f"Command: `{command}`  ", f"Machine: {machine}  ", f"{about}.", ""]
        if smoke:
            lines += [f"This is {SMOKE}.", ""]
        if speed:
            lines += [*_markdown(speed, FULL_COLUMNS), ""]
        if calibration:
            lines += [
                "Calibration: fraction dropped over many independent single-channel maps "
                "(p asked in the case name).",
                "",
                *_markdown(calibration, CALIBRATION_COLUMNS),
                "",
            ]
        lines += [GOALS_MARKDOWN, ""]
        return "\n".join(lines)
    out = [*_wrap(banner)] if banner else []
    out += [*_wrap(f"command: {command}"), *_wrap(f"machine: {machine}"), *_wrap(LEGEND)]
    if smoke:
        out += _wrap(f"This is {SMOKE}.")
    missing = sorted({r.library for r in rows if r.note == f"{r.library} not installed"})
    if missing:
        out += _wrap(f"not installed, so their rows show —: {', '.join(missing)}")
    broken = sorted({r.note for r in rows if r.note.startswith(f"{r.library} unavailable: ")})
    for note in broken:
        out += _wrap(f"{note}; its rows show —")
    out.append("")
    if speed:
        out += _plain(speed, TABLE_COLUMNS, lambda r: f"[{r.suite}] {r.case}; input {r.shape}, p {r.p}")
    if calibration:
        out += _plain(
            calibration,
            TABLE_CALIBRATION_COLUMNS,
            lambda r: f"[calibration] {r.case}; {r.shape.split('x')[0]} maps; drop rate mean, corner, centre",
        )
    out += _wrap(GOALS)
    return "\n".join(out)
