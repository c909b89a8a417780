"""Where per-channel DropBlock's time goes on the CPU, against a bare ``x * 2.0`` (the memory limit).

One thread, glibc's default allocator, a fresh gradient buffer each call (as for an activation in
training). Three whole calls (forward + backward) are timed alternately: ``x * 2.0``, DropBlock
with its fused C pass (the default), and DropBlock through the torch ops alone (the fused pass
switched off: what ran before it). The steps are timed on their own, each as its path runs it:

- seeds: drawing the seed grid (exact Bernoulli gaps);
- fused pass: ``out = input * scale`` with every seed's block zeroed, one sweep (C);
- torch ops: the plan (storage offsets of the dropped runs), the scaled copy ``input * scale``
  into a fresh output (what ``x * 2.0`` does), the zero writes at the plan's runs;
- backward: the backward op (the fused pass on the gradient, or the scaled copy and zero writes);
- in a step: the same whole call alternated with ``x * 2.0`` once more, with timers around the
  seed draw and the two sweeps as the call runs them (caches as a training step leaves them),
  the rest being Python, autograd and allocation;
- the sweeps' variants in a step: the whole call as it is, with its seeds dropped before the
  sweeps (the same loop, no zero stores) and with ``torch.mul(out=)`` in the sweeps' place.

    PYTHONPATH=src python benchmarks/profile_dropblock.py            # 2-D (32, 256, 28, 28), block 7
    PYTHONPATH=src python benchmarks/profile_dropblock.py --3d       # 3-D (8, 32, 32, 32, 32), block 5

Times are the median of the calling thread's CPU time (``time.thread_time``) over the repeats,
which counts less of what other processes do to a shared machine than wall time does. The whole
calls are also given over the calls that got no fresh pages from glibc (fewer minor faults than
an eighth of the output's pages): which side gets them is the allocator's doing
(``benchmarks/page_faults.py``).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from spatialdrop._dropblock import autograd, fused, geometry, ops, scale
from spatialdrop._dropblock import sampling as seed_draws
from spatialdrop._dropblock.calibration import seed_rate
from spatialdrop._dropblock.sparse import PLAN_EXACT, drop_block_backward, drop_block_op
from spatialdrop.functional import drop_block

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dropblock import _median_ms


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


def in_step(
    multiply: Callable[[], None], ours: Callable[[], None], reps: int, modes: tuple[str, ...] = ("seeds",)
) -> dict[str, dict[str, float]]:
    """Median thread CPU ms of the parts of ``ours`` (a whole per-channel fused call), each mode
    alternated with ``multiply`` and the other modes (two warm-up rounds first): the whole call,
    the seed draw, the forward and backward sweeps, and the rest of the call.

    Modes: ``"seeds"``, the call as it is; ``"no seeds"``, the drawn seeds dropped before the
    sweeps (the same loop, no zero stores); ``"torch.mul"``, ``torch.mul(out=)`` in the sweeps'
    place. ``multiply``'s whole call is under ``"x * 2.0"``.
    """
    real_draw, real_write = autograd.draw_sparse, fused.write
    mode = [modes[0]]
    spans: dict[str, list[float]] = {"seeds": [], "sweeps": []}

    def draw(*args: Any, **kwargs: Any) -> Tensor:
        start = time.thread_time()
        seeds = real_draw(*args, **kwargs)
        spans["seeds"].append(time.thread_time() - start)
        return seeds if mode[0] == "seeds" else seeds[:0]

    def write(out: Tensor, src: Optional[Tensor], factor: Optional[float], seeds: Tensor, geo: Any) -> None:
        start = time.thread_time()
        try:
            if mode[0] == "torch.mul":
                assert src is not None
                assert factor is not None
                torch.mul(src, factor, out=out)
            else:
                real_write(out, src, factor, seeds, geo)
        finally:
            spans["sweeps"].append(time.thread_time() - start)

    names = ("x * 2.0", *modes)
    parts = ("whole", "seeds", "forward sweep", "backward sweep")
    rows: dict[str, dict[str, list[float]]] = {name: {part: [] for part in parts} for name in names}
    autograd.draw_sparse = draw  # type: ignore[assignment]
    fused.write = write  # type: ignore[assignment]
    try:
        for r in range(reps + 2):
            for name in names if r % 2 == 0 else names[::-1]:
                mode[0] = name
                for v in spans.values():
                    v.clear()
                start = time.thread_time()
                (multiply if name == "x * 2.0" else ours)()
                if r < 2:  # warm-up rounds
                    continue
                rows[name]["whole"].append(time.thread_time() - start)
                if name == "x * 2.0":
                    continue
                if len(spans["sweeps"]) != 2 or len(spans["seeds"]) != 1:
                    raise RuntimeError("profile_dropblock: the call did not take the fused path")
                rows[name]["seeds"].append(spans["seeds"][0])
                rows[name]["forward sweep"].append(spans["sweeps"][0])
                rows[name]["backward sweep"].append(spans["sweeps"][1])
    finally:
        autograd.draw_sparse, fused.write = real_draw, real_write  # type: ignore[assignment]
    out = {
        name: {part: statistics.median(v) * 1e3 for part, v in row.items() if v} for name, row in rows.items()
    }
    for name in modes:
        o = out[name]
        o["rest"] = o["whole"] - o["seeds"] - o["forward sweep"] - o["backward sweep"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--3d", dest="three", action="store_true", help="(8, 32, 32, 32, 32), block 5")
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape, block = ((8, 32, 32, 32, 32), 5) if args.three else ((32, 256, 28, 28), 7)
    p = 0.1
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)

    def multiply() -> None:
        x.grad = None
        (x * 2.0).backward(g)

    def ours() -> None:
        x.grad = None
        drop_block(x, p, block).backward(g)

    def torch_ops() -> None:
        with ops.override(extension=False):
            ours()

    fresh = x.numel() * x.element_size() // 4096 // 8
    whole, clean = alternate({"x * 2.0": multiply, "fused": ours, "torch ops": torch_ops}, args.reps, fresh)
    xd = x.detach()
    blocks = (block,) * (xd.dim() - 2)
    geo = geometry.Geometry(xd.shape, 1, blocks, False, "uniform")
    gamma = seed_rate(p, geo.sizes, geo.blocks, "uniform")
    gen = torch.Generator().manual_seed(0)
    seeds = seed_draws.draw_grid(geo.places, gamma, gen, xd.device, dense=False)
    out = torch.empty_like(xd)
    strides = [out.stride(d) for d in geo.spatial]
    offsets = geometry.map_offsets(out, geo)
    plan = geometry.block_plan(seeds, geo, offsets, strides)
    factor = scale.scale_factor("expected", p, None, 0, xd)
    p_t = torch.tensor(p, dtype=torch.float64)
    op_args = (torch.tensor(7), p_t, list(blocks), 1, False, "uniform", "expected", None, None, None)
    _, heads, info, fac = drop_block_op(xd, *op_args, PLAN_EXACT, None)
    with ops.override(extension=False):
        _, t_heads, t_info, _ = drop_block_op(xd, *op_args, PLAN_EXACT, None)

    def fresh_scaled() -> None:
        scale.scaled(xd, factor, torch.empty_like(xd))

    def fused_pass() -> None:
        fused.write(torch.empty_like(xd), xd, float(factor), seeds, geo)

    def backward_torch_ops() -> None:
        with ops.override(extension=False):
            drop_block_backward(g, t_heads, t_info, fac, *op_args, None)

    steps = {
        "seeds": _median_ms(
            lambda: seed_draws.draw_grid(geo.places, gamma, gen, xd.device, dense=False), args.reps
        ),
        "fused pass (fresh output)": _median_ms(fused_pass, args.reps),
        "backward op, fused": _median_ms(
            lambda: drop_block_backward(g, heads, info, fac, *op_args, None), args.reps
        ),
        "torch ops: plan": _median_ms(lambda: geometry.block_plan(seeds, geo, offsets, strides), args.reps),
        "torch ops: scaled copy (fresh output)": _median_ms(fresh_scaled, args.reps),
        "torch ops: zero writes": _median_ms(
            lambda: geometry.apply_plan(out, 0, plan, strides[-1]), args.reps
        ),
        "backward op, torch ops": _median_ms(backward_torch_ops, args.reps),
        "x * 2.0 forward (fresh output)": _median_ms(lambda: xd * 2.0, args.reps),
    }
    runs = sum(h.numel() for _, h in plan)
    print(f"DropBlock per channel {tuple(shape)}, block {block}, p {p}, 1 thread, default allocator")
    print(f"{seeds.numel()} seeds, {runs} runs in the write plan, {geo.places} seed places\n")
    print("| step | ms (thread CPU, median) |")
    print("|---|---|")
    for name, ms in steps.items():
        print(f"| {name} | {ms:.2f} |")
    base, mine, old = whole["x * 2.0"], whole["fused"], whole["torch ops"]
    print(
        f"\nfwd+bwd, alternated: x * 2.0 {base:.2f} ms, fused {mine:.2f} ms ({mine / base:.2f}x), "
        f"torch ops {old:.2f} ms ({old / base:.2f}x)"
    )
    (cb, nb), (cm, nm), (co, no) = clean["x * 2.0"], clean["fused"], clean["torch ops"]
    print(
        f"calls without fresh pages ({nb}, {nm}, {no} of {args.reps}): x * 2.0 {cb:.2f} ms, "
        f"fused {cm:.2f} ms ({cm / cb:.2f}x), torch ops {co:.2f} ms ({co / cb:.2f}x)"
    )
    step = in_step(multiply, ours, args.reps)
    base, parts = step["x * 2.0"]["whole"], step["seeds"]
    print(
        f"\nin a step (alternated with x * 2.0, {base:.2f} ms): fused {parts['whole']:.2f} ms = "
        f"seeds {parts['seeds']:.2f} + forward sweep {parts['forward sweep']:.2f} + backward sweep "
        f"{parts['backward sweep']:.2f} + the rest {parts['rest']:.2f}"
    )
    modes = ("seeds", "no seeds", "torch.mul")
    variants = in_step(multiply, ours, args.reps, modes)
    print(
        f"\nthe sweeps' variants in a step (alternated with x * 2.0, {variants['x * 2.0']['whole']:.2f} ms):"
    )
    for name in modes:
        v = variants[name]
        print(
            f"  {name}: whole call {v['whole']:.2f} ms, forward sweep {v['forward sweep']:.2f}, "
            f"backward sweep {v['backward sweep']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
