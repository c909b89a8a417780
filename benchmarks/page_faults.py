"""Which calls get fresh pages from glibc: the allocator's doing, not the op's.

Four forward + backward calls are timed on the per-channel DropBlock bench shape, in a random
order each repeat, with glibc's default allocator and a fresh gradient each call (as in
``spatialdrop bench``): a bare ``x * 2.0``; the same multiply with 0.8 ms of busy-waiting added
(an op that allocates exactly what ``x * 2.0`` allocates, only slower); that slowed multiply
saving an int32 tensor of DropBlock's seed count for backward (what ``drop_block`` keeps: 83 kB
here); and ``drop_block``. For each: how many calls faulted in fresh pages (minor faults in at
least an eighth of the output's pages, counted with ``getrusage``), the median of all calls and
of the clean ones.

    PYTHONPATH=src python benchmarks/page_faults.py [--repeats 81] [--seed 0] [--3d]

What it showed on the 2-core machine of docs/performance.md: the count of faulting calls swings from
run to run (4 to 81 of 81), and an op that keeps a tensor of some 80 kB until its backward gets
fresh pages in more calls than one that keeps none (glibc consolidates and trims its heap when
a chunk of 64 kB or more is freed), ``drop_block`` as often as the multiply that saves the same
bytes. The median of all calls then depends on which side the faults fell on; the clean calls
measure the op.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import statistics
import sys
import time
from typing import Any

import torch

from spatialdrop.functional import drop_block


def _spin(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


class _SlowMultiply(torch.autograd.Function):
    """``x * 2.0`` and its gradient, each after a busy wait: the same allocations, more time."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        _spin(0.5)
        return x * 2.0

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        _spin(0.3)
        return grad * 2.0


class _SlowMultiplySaving(_SlowMultiply):
    """:class:`_SlowMultiply` that keeps ``SEEDS`` int32 values for backward, as DropBlock does."""

    SEEDS = 20_800  # about the seeds of p 0.1, block 7 on (32, 256, 28, 28)

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        kept = torch.zeros(_SlowMultiplySaving.SEEDS, dtype=torch.int32)
        ctx.save_for_backward(kept)
        return _SlowMultiply.forward(ctx, x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=81)
    parser.add_argument("--seed", type=int, default=0, help="of the call order")
    parser.add_argument("--3d", dest="three", action="store_true", help="(8, 32, 32, 32, 32), block 5")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape, block = ((8, 32, 32, 32, 32), 5) if args.three else ((32, 256, 28, 28), 7)
    x = torch.randn(shape).requires_grad_(True)
    grad = torch.ones(shape)
    fresh = x.numel() * x.element_size() // 4096 // 8
    impls = {
        "x * 2.0": lambda t: t * 2.0,
        "x * 2.0, slowed": _SlowMultiply.apply,
        "x * 2.0, slowed, saving 83 kB": _SlowMultiplySaving.apply,
        f"drop_block(x, 0.1, {block})": lambda t: drop_block(t, 0.1, block),
    }
    times: dict[str, list[float]] = {k: [] for k in impls}
    faults: dict[str, list[int]] = {k: [] for k in impls}
    order = random.Random(args.seed)
    gc.disable()
    for rep in range(3 + args.repeats):
        for name in order.sample(list(impls), len(impls)):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            torch.autograd.grad(impls[name](x), (x,), grad)
            elapsed = time.perf_counter() - start
            if rep >= 3:
                times[name].append(elapsed * 1e3)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    gc.enable()
    print(f"{tuple(shape)}, {args.repeats} calls each, random order (seed {args.seed}), default allocator")
    print("| call | calls with fresh pages | median ms, all calls | median ms, clean calls |")
    print("|---|---|---|---|")
    for name in impls:
        clean = [t for t, f in zip(times[name], faults[name]) if f < fresh]
        faulted = args.repeats - len(clean)
        clean_ms = f"{statistics.median(clean):.2f}" if clean else "—"
        print(f"| {name} | {faulted} | {statistics.median(times[name]):.2f} | {clean_ms} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
