"""Training-step time and activation memory of timm/torchvision models with skip_dropped_compute.

For each model: the model as timm or torchvision build it (their ``DropPath`` /
``StochasticDepth``, which compute every sample) against a copy with the same weights after
``spatialdrop.skip_dropped_compute`` (each residual branch on the kept samples only). A step is
forward, cross-entropy against fixed labels, backward, from fresh gradients (``set_to_none``).

Timing: one thread, ``time.thread_time`` (this thread's CPU time: other work on the machine does
not count), the two models' steps alternated with the order flipped every round, after warm-up
steps; the speed-up is the median over rounds of the pairwise ratio base/skip. Memory: the bytes
of the tensors autograd saves for backward (each storage once, parameters excluded), counted by
``torch.autograd.graph.saved_tensors_hooks`` -- the activations held at the forward/backward turn,
where a step's memory peaks -- averaged over the two warm-up steps (the kept count is random).

    PYTHONPATH=src python benchmarks/bench_skip_compute.py [--rounds R] [--only NAME ...] [--compile]

Needs timm and torchvision (the ``.venv-models`` environment).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from spatialdrop import skip_dropped_compute


class Case(NamedTuple):
    name: str
    rate: str
    build: Callable[[], nn.Module]
    batch: int
    size: int
    rounds: int  # default rounds (bigger models fewer)


def _timm(name: str, **kw: Any) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kw)


def _uniform(model: nn.Module, p: float) -> nn.Module:
    """Every block's drop rate ``p``, as DINOv2 trains (timm builds the linear rule 0 -> p)."""
    from timm.layers import DropPath

    for block in model.blocks:  # type: ignore[union-attr]
        for name in ("drop_path1", "drop_path2"):
            setattr(block, name, DropPath(p))
    return model


def _tv(name: str, **kw: Any) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None, **kw)  # type: ignore[no-any-return]


CASES = [
    Case(
        "timm vit_tiny_patch16_224",
        "uniform 0.4",
        lambda: _uniform(_timm("vit_tiny_patch16_224", img_size=112, drop_path_rate=0.4), 0.4),
        32,
        112,
        9,
    ),
    Case(
        "timm vit_tiny_patch16_224",
        "linear 0 -> 0.4",
        lambda: _timm("vit_tiny_patch16_224", img_size=112, drop_path_rate=0.4),
        32,
        112,
        9,
    ),
    Case(
        "timm deit_small_patch16_224",
        "linear 0 -> 0.1 (DeiT-S)",
        lambda: _timm("deit_small_patch16_224", img_size=112, drop_path_rate=0.1),
        16,
        112,
        7,
    ),
    Case(
        "torchvision convnext_tiny",
        "linear 0 -> 0.1 (recipe)",
        lambda: _tv("convnext_tiny", stochastic_depth_prob=0.1),
        16,
        64,
        5,
    ),
    Case(
        "torchvision swin_t",
        "linear 0 -> 0.2 (recipe)",
        lambda: _tv("swin_t"),  # stochastic_depth_prob=0.2, its recipe
        16,
        112,
        5,
    ),
]


def _saved_bytes(step: Callable[[], None], params: set[int]) -> int:
    """Bytes of the tensors saved for backward during ``step``'s forward, each storage once."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.nbytes() > 0:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _stepper(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    return step


def run_case(case: Case, rounds: int, compiled: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    base = case.build().train()
    skip = skip_dropped_compute(copy.deepcopy(base))
    x = torch.randn(case.batch, 3, case.size, case.size)
    y = torch.randint(0, 1000, (case.batch,))
    if compiled:
        base_m: nn.Module = torch.compile(base)  # type: ignore[assignment]
        skip_m: nn.Module = torch.compile(skip)  # type: ignore[assignment]
    else:
        base_m, skip_m = base, skip
    steps = {"base": _stepper(base_m, x, y), "skip": _stepper(skip_m, x, y)}
    params = {p.untyped_storage().data_ptr() for m in (base, skip) for p in m.parameters()}
    saved: dict[str, list[int]] = {"base": [], "skip": []}
    for _ in range(2 if not compiled else 4):  # warm-up (compilation, allocator), counting memory
        for side in ("base", "skip"):
            if compiled:
                steps[side]()
            else:
                saved[side].append(_saved_bytes(steps[side], params))
    times: dict[str, list[float]] = {"base": [], "skip": []}
    for r in range(rounds):
        for side in ("base", "skip") if r % 2 == 0 else ("skip", "base"):
            t0 = time.thread_time()
            steps[side]()
            times[side].append(time.thread_time() - t0)
    ratios = [b / s for b, s in zip(times["base"], times["skip"])]
    mem = {side: statistics.mean(v) / 2**20 for side, v in saved.items() if v}
    return {
        "base_ms": 1e3 * statistics.median(times["base"]),
        "skip_ms": 1e3 * statistics.median(times["skip"]),
        "speedup": statistics.median(ratios),
        "mem": mem,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds per case (default: per case)")
    parser.add_argument(
        "--only", nargs="*", default=None, help="run the cases whose name contains one of these"
    )
    parser.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.monotonic()
    print(
        f"{datetime.date.today()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        "1 thread, thread CPU time; speed-up = median of per-round base/skip ratios"
    )
    print()
    cols = ["model", "drop rate", "batch x image", "timm/tv step (ms)", "skipping step (ms)", "speed-up"]
    print("| " + " | ".join([*cols, "saved for backward (MiB)"]) + " |")
    print("|---|---|---|---:|---:|---:|---:|")
    for case in CASES:
        if args.only and not any(o in case.name or o in case.rate for o in args.only):
            continue
        modes = (False, True) if args.compile else (False,)
        for compiled in modes:
            r = run_case(case, args.rounds or case.rounds, compiled)
            mem = f"{r['mem']['base']:.0f} -> {r['mem']['skip']:.0f}" if r["mem"] else "-"
            name = case.name + (" (compiled)" if compiled else "")
            print(
                f"| {name} | {case.rate} | {case.batch} x {case.size}px | {r['base_ms']:.0f} "
                f"| {r['skip_ms']:.0f} | {r['speedup']:.2f}x | {mem} |",
                flush=True,
            )
    print(f"\n{time.monotonic() - start:.0f} s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
