"""Where per-channel DropBlock's time goes on the CPU, path by path, against a bare ``x * 2.0``.

One thread, glibc's default allocator, a fresh gradient buffer each call (as for an activation in
training). Everything runs through the public ``spatialdrop.functional.drop_block``; the path a
call takes is chosen with the dispatcher's one switch, ``spatialdrop._dropblock.ops.override``:

- fused: the default on the CPU (one C sweep multiplies and zeroes the blocks, when the C
  extension is built);
- torch ops: ``override(extension=False)``, as an install without a C compiler runs it (the write
  plan, the scaled copy and the zero writes as torch ops);
- dense: ``override(Path.DENSE)``, as a device without Triton runs it (a dense seed grid, the
  blocks grown by windowed ORs).

For each path it prints the autograd node of the output (so a path that was not taken shows)
and the bytes saved for backward beyond the input; then (1) the whole call, forward + backward,
alternated with ``x * 2.0``, over all calls and over the calls that got no fresh pages from
glibc (fewer minor faults than an eighth of the output's pages: which side gets them is the
allocator's doing, ``benchmarks/page_faults.py``); (2) forward alone and backward alone; (3) a
``torch.profiler`` table of the ops of a few calls by self CPU time (the seed draw's
``random_``/``uniform_``, the multiplies, the index writes; the C sweep shows as the autograd
function's own time).

    PYTHONPATH=src python benchmarks/profile_dropblock.py            # 2-D (32, 256, 28, 28), block 7
    PYTHONPATH=src python benchmarks/profile_dropblock.py --3d       # 3-D (8, 32, 32, 32, 32), block 5
    PYTHONPATH=src python benchmarks/profile_dropblock.py --quick    # small shapes, few repeats

Not reachable through the public API, so not timed here: the seed draw, the fused sweep and the
torch-op path's plan and writes each on its own, and the timers inside a training step (they
needed the private functions patched); the profiler's table is what stands for them.

Times are the median of the calling thread's CPU time (``time.thread_time``) over the repeats,
which counts less of what other processes do to a shared machine than wall time does.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from spatialdrop._dropblock.ops import Path as DropBlockPath
from spatialdrop._dropblock.ops import override
from spatialdrop.functional import drop_block

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dropblock import _median_ms

PATHS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "fused": override,
    "torch ops": lambda: override(extension=False),
    "dense": lambda: override(DropBlockPath.DENSE),
}


def alternate(
    fns: dict[str, Callable[[], object]], reps: int, fresh: int
) -> tuple[dict[str, float], dict[str, tuple[float, int]]]:
    """Median thread CPU ms of each function, called in turn (A B C, C B A, ...), over all calls
    and over those with fewer than ``fresh`` minor page faults (with their count)."""
    for _ in range(3):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    faults: dict[str, list[int]] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(reps):
        for name, fn in order if r % 2 == 0 else order[::-1]:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.thread_time()
            fn()
            times[name].append(time.thread_time() - start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    clean = {}
    for name in fns:
        kept = [t for t, f in zip(times[name], faults[name]) if f < fresh]
        clean[name] = (statistics.median(kept) * 1e3 if kept else float("nan"), len(kept))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}, clean


def backward_ms(forward: Callable[[], torch.Tensor], g: torch.Tensor, reps: int) -> float:
    """Median thread CPU ms of ``backward(g)`` alone, on a fresh forward (not timed) each repeat."""
    times = []
    for r in range(reps + 2):
        y = forward()
        start = time.thread_time()
        y.backward(g)
        if r >= 2:  # two warm-up rounds
            times.append(time.thread_time() - start)
    return statistics.median(times) * 1e3


def saved_fraction(fn: Callable[[], torch.Tensor], x: torch.Tensor) -> float:
    """Bytes autograd keeps for backward when ``fn()`` runs, each storage once, ``x``'s not
    counted (it is alive anyway), as a fraction of ``x``'s bytes."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() != x.untyped_storage().data_ptr():
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / (x.numel() * x.element_size())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--3d", dest="three", action="store_true", help="(8, 32, 32, 32, 32), block 5")
    parser.add_argument("--quick", action="store_true", help="small shapes and 3 repeats: a smoke run")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats (default 21; 3 with --quick)")
    parser.add_argument("--rows", type=int, default=8, help="ops per profiler table (default 8)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.three:
        shape, block = ((2, 8, 12, 12, 12) if args.quick else (8, 32, 32, 32, 32)), 5
    else:
        shape, block = ((4, 16, 28, 28) if args.quick else (32, 256, 28, 28)), 7
    reps = args.reps or (3 if args.quick else 21)
    p = 0.1
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)

    def multiply() -> None:
        x.grad = None
        (x * 2.0).backward(g)

    def ours() -> None:
        x.grad = None
        drop_block(x, p, block).backward(g)

    def on(path: str, fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with PATHS[path]():
                fn()

        return run

    print(f"DropBlock per channel {tuple(shape)}, block {block}, p {p}, 1 thread, default allocator\n")
    nodes = {}
    for path in PATHS:
        with PATHS[path]():
            nodes[path] = type(drop_block(x, p, block).grad_fn).__name__
    print("| path | autograd node of the output | saved for backward, % of the input's bytes |")
    print("|---|---|---|")
    for path, node in nodes.items():
        with PATHS[path]():
            saved = saved_fraction(lambda: drop_block(x, p, block), x)
        print(f"| {path} | {node} | {100 * saved:.2f} % |")

    fresh = x.numel() * x.element_size() // 4096 // 8
    fns = {"x * 2.0": multiply, **{path: on(path, ours) for path in PATHS}}
    whole, clean = alternate(fns, reps, fresh)
    base, (cb, nb) = whole["x * 2.0"], clean["x * 2.0"]
    print(f"\nfwd+bwd, alternated, {reps} repeats (thread CPU ms, median; over x * 2.0's):\n")
    print("| call | all calls | / x * 2.0 | calls without fresh pages | / x * 2.0 | forward | backward |")
    print("|---|---|---|---|---|---|---|")
    fwd, bwd = _median_ms(lambda: x * 2.0, reps), backward_ms(lambda: x * 2.0, g, reps)
    print(f"| x * 2.0 | {base:.2f} | 1.00 | {cb:.2f} ({nb}) | 1.00 | {fwd:.2f} | {bwd:.2f} |")
    for path in PATHS:
        cm, nm = clean[path]
        with PATHS[path]():
            fwd = _median_ms(lambda: drop_block(x, p, block), reps)
            bwd = backward_ms(lambda: drop_block(x, p, block), g, reps)
        print(
            f"| {path} | {whole[path]:.2f} | {whole[path] / base:.2f} | {cm:.2f} ({nm}) | {cm / cb:.2f} "
            f"| {fwd:.2f} | {bwd:.2f} |"
        )

    for path in PATHS:
        with PATHS[path](), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(max(3, reps // 4)):
                ours()
        print(f"\n{path}: the ops of {max(3, reps // 4)} fwd+bwd calls by self CPU time (torch.profiler)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
