"""The speed and memory goals of ``spatialdrop bench``, checked on a report it wrote.

    spatialdrop bench --out bench.json          # a full run (all suites), JSON from the suffix
    python benchmarks/goals.py bench.json       # each goal, its measured value and its verdict

Each goal is named by what it measures and checked on the medians of the report's rows (see
:func:`goals`). Exit status: 0 when every goal that the rows can check is met, 1 when one is
missed, 2 when the file cannot be read as a JSON report of ``spatialdrop bench`` (one line on
stderr names it). A ``--quick`` smoke run's report is not checked (its small shapes and few
repeats say nothing about goals set for the full-size shapes): the script says so and exits 0.

The goals live here, beside the benchmarks, not in the library: ``spatialdrop bench`` measures
and reports, this script judges.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REFERENCE = "x * 2.0"  # the bare multiply every speed row is a ratio to (the bench's reference call)

# the row fields the goals read; a report without one of them (an older bench) reads it as None
FIELDS = (
    "kind",
    "suite",
    "case",
    "shape",
    "p",
    "library",
    "call",
    "fwd_ms",
    "fwd_ratio",
    "fwd_bwd_ms",
    "fwd_bwd_ratio",
    "fwd_bwd_clean_ratio",
    "clean_calls",
    "calls",
    "vs_torchvision",
    "vs_baseline",
    "fwd_bwd_vs_eager",
    "saved_fraction",
)

SMOKE = (
    "a --quick smoke run: small shapes and few repeats; the goals are set for the full-size shapes, "
    "so they are not checked"
)


@dataclass
class Goal:
    """A speed or memory target, stated by what it measures, checked on the measured rows."""

    what: str
    measured: float
    limit: float
    at_least: bool

    @property
    def met(self) -> bool:
        """Whether the measured value meets the goal."""
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit

    def __str__(self) -> str:
        sign = ">=" if self.at_least else "<="
        verdict = "met" if self.met else "MISSED"
        return f"{self.what}: {self.measured:.3g} (goal {sign} {self.limit:g}) {verdict}"


def _find(rows: Sequence[Any], case: str, call: str) -> Any | None:
    return next((r for r in rows if r.case.startswith(case) and r.call.startswith(call) and r.fwd_ms), None)


def _memory_limit(rows: Sequence[Any], r: Any) -> tuple[float, str]:
    """The fwd+bwd ratio to the reference that a memory-limit goal checks, and what it is.

    The median of the calls that got no fresh pages from the allocator, on both sides, when at
    least 3 of each did (page faults fall on either side at random: ``benchmarks/page_faults.py``);
    else the median of all calls (e.g. a 3-D case whose outputs are above glibc's mmap threshold:
    every call of either side faults).
    """
    ref = next((t for t in rows if t.case == r.case and t.call == REFERENCE), None)
    if (
        ref is not None
        and r.fwd_bwd_clean_ratio is not None
        and (r.clean_calls or 0) >= 3
        and (ref.clean_calls or 0) >= 3
    ):
        counts = f"{r.clean_calls} of ours and {ref.clean_calls} of {REFERENCE}'s {r.calls} calls"
        return r.fwd_bwd_clean_ratio, f", calls that got no fresh pages ({counts})"
    return r.fwd_bwd_ratio or 0.0, ", all calls"


def goals(rows: Sequence[Any]) -> list[Goal]:
    """The targets that the measured rows can check (on medians), each named by what it measures.

    ``rows`` are the report's rows as objects with its fields as attributes (:func:`read_rows`).
    Channel dropout: at least as fast as torch's (within 5 %) and at most 1.2x a bare multiply.
    DropBlock per channel (2-D): fwd+bwd at most 1.3x a bare multiply (the memory limit is 1x:
    both read and write the tensor once each way; on the calls that paid no page faults, where
    there are enough: :func:`_memory_limit`), at least 20x torchvision's, at most a quarter
    of the input's bytes saved for backward; shared (2-D): at most 2x a bare multiply; per
    channel (3-D): at most 1.3x a bare multiply, at least 20x torchvision's. Compiled layers:
    fwd+bwd at most 1.1x the eager layer's. DropPath residual (the branch on the kept samples
    only) against ``x + DropPath(p)(branch(x))``: at least 1.25x faster fwd+bwd for the ViT MLP
    branch at p = 0.3, and for every branch and p a speed-up within 15 % of the ``1 / (1 - p)``
    that the skipped work predicts.
    """
    out: list[Goal] = []
    for r in rows:
        if r.suite != "spatial" or r.library != "spatialdrop" or r.call.startswith("compile("):
            continue
        if r.case.startswith("2-D maps, many"):
            continue
        peer = next(
            (t for t in rows if t.case == r.case and t.library == "torch" and t.call != REFERENCE), None
        )
        if peer is None or not (
            r.fwd_ms and r.fwd_bwd_ms and r.fwd_ratio and peer.fwd_ms and peer.fwd_bwd_ms
        ):
            continue
        where = f"spatial dropout, {r.case} {r.shape}"
        out.append(Goal(f"{where}: torch's forward time / ours", peer.fwd_ms / r.fwd_ms, 0.95, True))
        out.append(Goal(f"{where}: torch's fwd+bwd time / ours", peer.fwd_bwd_ms / r.fwd_bwd_ms, 0.95, True))
        out.append(Goal(f"{where}: forward time / {REFERENCE}", r.fwd_ratio, 1.2, False))
        out.append(Goal(f"{where}: fwd+bwd time / {REFERENCE}", r.fwd_bwd_ratio or 0.0, 1.2, False))
    per2 = _find(rows, "2-D, block 7, a mask per channel", "drop_block(")
    if per2 is not None and per2.fwd_bwd_ratio is not None:
        where = f"DropBlock 2-D per channel {per2.shape}"
        ratio, which = _memory_limit(rows, per2)
        out.append(Goal(f"{where}: fwd+bwd time / {REFERENCE}{which}", ratio, 1.3, False))
        if per2.vs_torchvision is not None:
            out.append(Goal(f"{where}: torchvision's fwd+bwd time / ours", per2.vs_torchvision, 20, True))
        if per2.saved_fraction is not None:
            out.append(
                Goal(f"{where}: bytes saved for backward / input bytes", per2.saved_fraction, 0.25, False)
            )
    shared2 = _find(rows, "2-D, block 7, one mask", "drop_block(")
    if shared2 is not None and shared2.fwd_bwd_ratio is not None:
        what = f"DropBlock 2-D shared {shared2.shape}: fwd+bwd time / {REFERENCE}"
        out.append(Goal(what, shared2.fwd_bwd_ratio, 2, False))
    per3 = _find(rows, "3-D, block 5, a mask per channel", "drop_block(")
    if per3 is not None and per3.fwd_bwd_ratio is not None:
        ratio, which = _memory_limit(rows, per3)
        what = f"DropBlock 3-D per channel {per3.shape}: fwd+bwd time / {REFERENCE}{which}"
        out.append(Goal(what, ratio, 1.3, False))
    if per3 is not None and per3.vs_torchvision is not None:
        what = f"DropBlock 3-D per channel {per3.shape}: torchvision's fwd+bwd time / ours"
        out.append(Goal(what, per3.vs_torchvision, 20, True))
    for r in rows:
        if not r.case.startswith("DropPath residual") or r.library != "spatialdrop" or r.vs_baseline is None:
            continue
        if r.call.startswith("x + "):  # the baseline itself, where timm is missing
            continue
        where = f"{r.case} {r.shape}, p {r.p}"
        if "MLP" in r.case and r.p == 0.3:
            out.append(
                Goal(f"{where}: x + DropPath(branch(x)) fwd+bwd time / ours", r.vs_baseline, 1.25, True)
            )
        deviation = abs(r.vs_baseline * (1 - r.p) - 1)
        out.append(Goal(f"{where}: |fwd+bwd speed-up / (1 / (1 - p)) - 1|", deviation, 0.15, False))
    for r in rows:
        if r.fwd_bwd_vs_eager is not None:
            what = f"{r.call} {r.shape}: fwd+bwd time compiled / eager"
            out.append(Goal(what, r.fwd_bwd_vs_eager, 1.1, False))
    return out


class ReportError(Exception):
    """The file is not a JSON report of ``spatialdrop bench``; the message says why."""


def read_report(path: Path) -> tuple[dict[str, Any], list[SimpleNamespace]]:
    """The report written by ``spatialdrop bench --out PATH.json`` and its rows.

    Each row is an object with the report's fields as attributes (:data:`FIELDS` that it lacks
    read as ``None``). Raises :class:`ReportError` for a file that is missing, not JSON (another
    ``--format``) or not shaped like the bench's report.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"cannot read it ({getattr(err, 'strerror', None) or err})") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError:
        raise ReportError(
            "not JSON: write the report with spatialdrop bench --out NAME.json (or --format json)"
        ) from None
    rows = report.get("rows") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ReportError('not a report of spatialdrop bench: no list of "rows"')
    try:
        objects = [SimpleNamespace(**{**dict.fromkeys(FIELDS), **r}) for r in rows]
    except TypeError:  # a key that is not a string
        raise ReportError("not a report of spatialdrop bench: a row's keys are not names") from None
    return report, objects


def main(argv: list[str] | None = None) -> int:
    """Check the goals on one report; return the exit status (0 met, 1 missed, 2 a bad file)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("report", type=Path, help="a JSON report of spatialdrop bench (--out NAME.json)")
    args = parser.parse_args(argv)
    try:
        report, rows = read_report(args.report)
        checked = goals(rows)
    except (ReportError, AttributeError, TypeError, ValueError) as err:
        why = err if isinstance(err, ReportError) else f"a row does not read as the bench's ({err})"
        print(f"goals.py: {args.report}: {why}", file=sys.stderr)
        return 2
    if report.get("smoke_run"):
        print(f"{args.report} is {SMOKE}.")
        return 0
    if report.get("partial"):
        print(f"{args.report} holds partial results ({report.get('interrupted', 'interrupted')}).")
    if not checked:
        print(f"{args.report}: no goal applies to its rows (goals are set for the full suites).")
        return 0
    print(f"goals, checked on the medians of {args.report}:")
    for g in checked:
        print(f"  {g}")
    missed = sum(not g.met for g in checked)
    print(f"{len(checked) - missed} of {len(checked)} goals met" + (f", {missed} MISSED" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
