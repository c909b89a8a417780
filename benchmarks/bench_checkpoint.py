"""Activation checkpointing with keyed masks: what ``preserve_rng_state=False`` saves.

Keyed masks do not read torch's generator, so a checkpointed block recomputes the same masks
without the generator's state being saved and restored (``preserve_rng_state=False``; the
gradients are the plain model's: ``tests/test_parallel.py``). This times one training step
(forward + backward, a fresh gradient buffer each call) of a stack of checkpointed residual blocks
with SpatialDropout2d and DropPath, keyed, with ``preserve_rng_state=True`` and ``False``,
interleaved round by round (the order alternating), one thread, timed in the thread's CPU time
(other load on a shared machine counts less):

    PYTHONPATH=src python benchmarks/bench_checkpoint.py [--quick] [--tuned-malloc]

Two shapes: small maps, where the per-block fixed cost shows, and a ResNet-stage-sized one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import spatialdrop as sd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tuned_malloc import steady_malloc


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.drop = sd.SpatialDropout2d(0.1)
        self.path = sd.DropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.path(self.drop(self.conv(x).relu()))


class Stack(nn.Module):
    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(channels) for _ in range(depth))
        self.preserve = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False, preserve_rng_state=self.preserve)
        return x


def step(model: Stack, x: torch.Tensor, preserve: bool) -> Callable[[], None]:
    ids = torch.arange(x.shape[0])

    def run() -> None:
        model.preserve = preserve
        for p in model.parameters():
            p.grad = None
        with sd.mask_context(step=3, sample_ids=ids):  # the recompute runs inside backward
            model(x).sum().backward()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (a smoke run)")
    parser.add_argument("--tuned-malloc", action="store_true", help="glibc: no mmap per tensor, no trimming")
    args = parser.parse_args(argv)
    tuned = args.tuned_malloc and steady_malloc(True)
    torch.set_num_threads(1)
    rounds = 5 if args.quick else 41
    cases = [
        ("32 blocks, (4, 8, 4, 4)", (4, 8, 4, 4), 32),
        ("16 blocks, (8, 16, 8, 8)", (8, 16, 8, 8), 16),
        ("4 blocks, (8, 32, 28, 28)", (8, 32, 28, 28), 4),
    ]
    allocator = "tuned allocator" if tuned else "glibc's default allocator"
    print(f"checkpointed keyed blocks, fwd+bwd, 1 thread, {allocator},")
    print(f"thread CPU time, median (best) of {rounds} interleaved rounds\n")
    print("| case | preserve_rng_state=True ms | False ms | True / False | saved per block |")
    print("|---|---|---|---|---|")
    for name, shape, depth in cases:
        torch.manual_seed(0)
        model = sd.keyed_masks(Stack(shape[1], depth), seed=1)
        x = torch.randn(shape)
        runs = {True: step(model, x, True), False: step(model, x, False)}
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(2):
            runs[True]()
            runs[False]()
        for r in range(rounds):
            for preserve in (True, False) if r % 2 == 0 else (False, True):
                start = time.thread_time()
                runs[preserve]()
                times[preserve].append(time.thread_time() - start)
        t, f = (statistics.median(times[k]) for k in (True, False))
        bt, bf = (min(times[k]) for k in (True, False))
        per = (bt - bf) / depth * 1e6
        print(
            f"| {name} | {t * 1e3:.2f} ({bt * 1e3:.2f}) | {f * 1e3:.2f} ({bf * 1e3:.2f}) | {t / f:.3f} "
            f"| {per:.0f} us (best) |"
        )
    print(f"\nwhat preserve_rng_state=True adds per checkpointed block: {state_us():.1f} us of CPU time")
    print("(the CPU generator's state saved in forward, then forked and restored for the recompute)")
    return 0


def state_us(reps: int = 2000) -> float:
    """The generator work of ``preserve_rng_state=True`` per region, timed alone (median of 5)."""

    def once() -> None:
        saved = torch.get_rng_state()  # forward
        with torch.random.fork_rng(devices=[]):  # the recompute
            torch.set_rng_state(saved)

    runs = []
    for _ in range(5):
        start = time.thread_time()
        for _ in range(reps):
            once()
        runs.append((time.thread_time() - start) / reps)
    return statistics.median(runs) * 1e6


if __name__ == "__main__":
    sys.exit(main())
