"""Keyed vs. unkeyed spatial dropout: forward and forward + backward, same process, same run.

Run: ``PYTHONPATH=src python benchmarks/bench_keyed.py`` (``--quick`` for a smoke run).

The two variants are timed in alternating blocks (unkeyed, keyed, keyed, unkeyed, ...), so that
load from other processes falls on both alike; the table reports the median of each and the
ratio.
The keyed path adds the Philox draws for the N * C (sample, channel) pairs (``keyed_uniform``
is timed alone too); everything else, the multiply that dominates, is shared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

from spatialdrop import MaskKey, keyed_uniform
from spatialdrop.functional import spatial_dropout

SHAPES = [(32, 64, 56, 56), (64, 256, 14, 14)]


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _alternating(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, block: int = 4
) -> dict[str, float]:
    """Median ms of each function, timed in alternating blocks (A-block, B-block, B, A, ...).

    Blocks, not single calls, so that the allocator settles into each variant's pattern (a
    big output that lands on fresh pages costs page faults); the order alternates so that
    neither variant always goes first.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(-(-repeats // block)):
        for name in names if i % 2 == 0 else names[::-1]:
            for _ in range(warmup):
                fns[name]()
            for _ in range(min(block, repeats - i * block)):
                times[name].append(_time(fns[name]))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def bench_shape(shape: tuple[int, ...], p: float, repeats: int, warmup: int) -> list[dict[str, object]]:
    n, c = shape[0], shape[1]
    x = torch.randn(shape)
    key = MaskKey(seed=1234, step=7, layer=42, sample_ids=torch.arange(n))
    xg = x.clone().requires_grad_(True)
    grad = torch.ones_like(x)

    def fwd_b(k: MaskKey | None) -> Callable[[], object]:
        return lambda: spatial_dropout(x, p, key=k)

    def fb(k: MaskKey | None) -> Callable[[], object]:
        def run() -> None:
            xg.grad = None
            spatial_dropout(xg, p, key=k).backward(grad)

        return run

    fwd = _alternating({"unkeyed": fwd_b(None), "keyed": fwd_b(key)}, repeats, warmup)
    both = _alternating({"unkeyed": fb(None), "keyed": fb(key)}, repeats, warmup)
    draws = _alternating({"keyed_uniform": lambda: keyed_uniform(key, c)}, repeats, warmup)
    rows: list[dict[str, object]] = []
    for what, t in (("forward", fwd), ("forward + backward", both)):
        rows.append(
            {
                "shape": shape,
                "pass": what,
                "unkeyed_ms": t["unkeyed"],
                "keyed_ms": t["keyed"],
                "ratio": t["keyed"] / t["unkeyed"],
                "draws_ms": draws["keyed_uniform"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant")
    parser.add_argument("--p", type=float, default=0.1, help="drop probability")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 31)
    warmup = 1 if args.quick else 2  # before each block
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, p = {args.p}, median of {repeats}")
    print("| shape | pass | unkeyed ms | keyed ms | keyed / unkeyed | keyed_uniform(N, C) ms |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in SHAPES:
        for r in bench_shape(shape, args.p, repeats, warmup):
            print(
                f"| {r['shape']} | {r['pass']} | {r['unkeyed_ms']:.2f} | {r['keyed_ms']:.2f} "
                f"| {r['ratio']:.2f}x | {r['draws_ms']:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
