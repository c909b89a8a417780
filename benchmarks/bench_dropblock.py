"""DropBlock side by side: speed (forward + backward), memory saved for backward, calibration.

Run:  PYTHONPATH=src python benchmarks/bench_dropblock.py [--quick] [--threads N]

Every timing is the median of repeated forward + backward passes, measured in interleaved
rounds (one pass of each method per round) so that a busy machine slows all columns alike.
torchvision, timm and the ``dropblock`` package are measured when they are importable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from spatialdrop.functional import drop_block

Fn = Callable[[torch.Tensor], torch.Tensor]


def _peers(rank: int, p: float, block: int) -> dict[str, Fn]:
    """The other implementations that are installed, for 2-D or 3-D input."""
    out: dict[str, Fn] = {}
    try:
        from torchvision.ops import drop_block2d, drop_block3d

        tv = drop_block2d if rank == 2 else drop_block3d
        out[f"torchvision drop_block{rank}d (per-channel)"] = lambda x: tv(x, p, block)
    except ImportError:
        pass
    if rank == 2:
        try:
            from timm.layers import drop_block_2d

            out["timm drop_block_2d (shared)"] = lambda x: drop_block_2d(x, p, block)
            out["timm drop_block_2d (per-channel)"] = lambda x: drop_block_2d(
                x, p, block, couple_channels=False
            )
        except ImportError:
            pass
    try:
        import dropblock

        cls = dropblock.DropBlock2D if rank == 2 else dropblock.DropBlock3D
        module = cls(drop_prob=p, block_size=block)
        out[f"dropblock DropBlock{rank}D (shared)"] = module
    except ImportError:
        pass
    return out


def _methods(rank: int, p: float, block: int) -> dict[str, Fn]:
    methods: dict[str, Fn] = {
        "x * 2.0": lambda x: x * 2.0,
        "spatialdrop per-channel": lambda x: drop_block(x, p, block),
        "spatialdrop shared": lambda x: drop_block(x, p, block, shared_channels=True),
    }
    if rank in (2, 3):
        methods.update(_peers(rank, p, block))
    return methods


def _saved_bytes(fn: Fn, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward (the input itself not counted: it is alive anyway)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() != x.data_ptr():
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def _time(methods: dict[str, Fn], x: torch.Tensor, repeats: int) -> dict[str, tuple[float, float]]:
    grad = torch.randn_like(x)

    def step(fn: Fn) -> None:
        y = fn(x)
        y.backward(grad)
        x.grad = None

    for fn in methods.values():  # warm up
        step(fn)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            step(fn)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(ts) * 1e3, min(ts) * 1e3) for name, ts in times.items()}


def speed_rows(quick: bool) -> list[dict[str, Any]]:
    """Forward + backward time and bytes saved for backward, per case and method."""
    if quick:
        cases = [((8, 64, 28, 28), 7, 0.1), ((2, 16, 16, 16, 16), 5, 0.1), ((8, 64, 784), 7, 0.1)]
        repeats = 5
    else:
        cases = [((32, 256, 28, 28), 7, 0.1), ((8, 32, 32, 32, 32), 5, 0.1), ((32, 256, 784), 7, 0.1)]
        repeats = 15
    rows = []
    for shape, block, p in cases:
        rank = len(shape) - 2
        methods = _methods(rank, p, block)
        x = torch.randn(shape, requires_grad=True)
        timed = _time(methods, x, repeats)
        base = timed["x * 2.0"][0]
        tv = next((v[0] for k, v in timed.items() if k.startswith("torchvision")), None)
        in_bytes = x.numel() * x.element_size()
        for name, fn in methods.items():
            ms, best = timed[name]
            rows.append(
                {
                    "shape": str(tuple(shape)),
                    "block": block,
                    "p": p,
                    "method": name,
                    "ms": ms,
                    "ms_min": best,
                    "x_baseline": ms / base,
                    "speedup_vs_torchvision": (tv / ms) if tv is not None else None,
                    "saved_over_input": _saved_bytes(fn, x) / in_bytes,
                }
            )
    return rows


def _rates(fn: Fn, size: int, maps: int) -> tuple[float, float, float]:
    y = fn(torch.ones(maps, 1, size, size))  # one channel: shared and per-channel masks alike
    dropped = (y == 0).float().reshape(-1, size, size)
    c = size // 2
    return float(dropped.mean()), float(dropped[:, 0, 0].mean()), float(dropped[:, c, c].mean())


def _fp16_ok(fn: Fn) -> bool:
    y = fn(torch.ones(8, 64, 56, 56, dtype=torch.float16))
    return bool(y.isfinite().all()) and bool((y != 0).any())


def calibration_rows(quick: bool) -> list[dict[str, Any]]:
    """Realised drop rate (mean, corner, centre) of each method against the p asked for."""
    maps = 1024 if quick else 8192
    cases = [(28, 7, 0.1), (14, 5, 0.3), (7, 3, 0.3), (56, 7, 0.3), (7, 7, 0.1)]
    rows = []
    torch.manual_seed(0)
    for size, block, p in cases:
        methods: dict[str, Fn] = {
            "spatialdrop uniform": lambda x, p=p, b=block: drop_block(x, p, b),
            "spatialdrop valid": lambda x, p=p, b=block: drop_block(x, p, b, seeding="valid"),
        }
        methods.update(_peers(2, p, block))
        for name, fn in methods.items():
            mean, corner, centre = _rates(fn, size, maps)
            with torch.no_grad():
                fp16 = _fp16_ok(fn) if size == 28 else None
            rows.append(
                {
                    "map": f"{size}x{size}",
                    "block": block,
                    "p": p,
                    "method": name,
                    "mean": mean,
                    "corner": corner,
                    "centre": centre,
                    "fp16_finite_nonzero": fp16,
                }
            )
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    """All rows, each a dict with a ``table`` key: ``"speed"`` or ``"calibration"``."""
    rows = [{"table": "speed", **r} for r in speed_rows(quick)]
    rows += [{"table": "calibration", **r} for r in calibration_rows(quick)]
    return rows


def goals(speed: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, checked on the speed rows (medians)."""
    out = []
    for rank in (2, 3):
        mine = {r["method"]: r for r in speed if r["shape"].count(",") == rank + 1}
        per, shared = mine.get("spatialdrop per-channel"), mine.get("spatialdrop shared")
        if per is None or shared is None:
            continue
        out.append(f"{rank}-D per-channel: {per['x_baseline']:.2f}x the time of x * 2.0 (goal, 2-D: <= 4)")
        out.append(f"{rank}-D shared: {shared['x_baseline']:.2f}x the time of x * 2.0 (goal, 2-D: <= 2)")
        speedup = per["speedup_vs_torchvision"]
        if speedup is not None:
            out.append(f"{rank}-D per-channel: {speedup:.1f}x faster than torchvision (goal: >= 20)")
        saved = per["saved_over_input"]
        out.append(f"{rank}-D per-channel saved for backward: {saved:.4f} of the input (goal: <= 1/32)")
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub-flavoured markdown table of ``rows``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run(args.quick)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average before: {load}; median of interleaved runs\n"
    )
    speed = [r for r in rows if r["table"] == "speed"]
    cols = [
        "shape",
        "block",
        "method",
        "ms",
        "ms_min",
        "x_baseline",
        "speedup_vs_torchvision",
        "saved_over_input",
    ]
    print(format_table(speed, cols))
    print()
    cal = [r for r in rows if r["table"] == "calibration"]
    cols = ["map", "block", "p", "method", "mean", "corner", "centre", "fp16_finite_nonzero"]
    print(format_table(cal, cols))
    print()
    for line in goals(speed):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
