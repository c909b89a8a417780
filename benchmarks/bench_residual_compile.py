"""Compiled ViT training steps: ResidualDropPath against timm's DropPath (issue 33).

timm's ``vit_tiny_patch16_224`` at ``img_size`` 112 (50 tokens), batch 32, every block's two
residual branches dropped at a uniform ``p`` (0.4), in four versions of the same weights:

- ``timm``: timm's blocks with ``DropPath(p)`` put in by hand (``drop_path1``/``drop_path2``);
- ``per_sample``: each block's branches ``norm1 -> attn -> ls1`` and ``norm2 -> mlp -> ls2``
  wrapped by hand in ``ResidualDropPath(branch, p)``, DropPath's law, the branch on the kept
  samples (under ``torch.compile`` an unbacked kept count);
- ``exact_count``: the same with ``draw="exact_count"`` (DINOv2's law, ``round(n (1 - p))``
  samples kept, a static shape);
- ``none``: no drop path at all (p = 0), for scale.

A step is forward, cross-entropy, backward with fresh gradients (``set_to_none``). Each version
runs compiled (``torch.compile``, default mode, no dynamo flag) and, with ``--eager``, eagerly.
One thread, ``time.thread_time()``: the CPU time of the calling thread (where a CPU backward
runs), so other processes on a shared machine count little. Rounds alternate the versions, the
order reversed every other round; a round times ``--steps`` steps per version. Printed: the
median of the per-round ratios ``timm / version`` (> 1: faster than timm's DropPath), its
min-max, the medians in ms per step, and the graphs dynamo compiled (``unique_graphs``; the kept
counts change at every step).

    PYTHONPATH=src python benchmarks/bench_residual_compile.py [--rounds 15] [--steps 2] [--eager]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch._dynamo
from torch import Tensor, nn

from spatialdrop import ResidualDropPath


class SkipBlock(nn.Module):
    """A timm ViT block whose two residual branches are ResidualDropPath layers (same submodules)."""

    def __init__(self, block: nn.Module, p: float, draw: str) -> None:
        super().__init__()
        self.attn = ResidualDropPath(nn.Sequential(block.norm1, block.attn, block.ls1), p, draw=draw)
        self.mlp = ResidualDropPath(nn.Sequential(block.norm2, block.mlp, block.ls2), p, draw=draw)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.attn(x))


def build(img: int, p: float) -> dict[str, nn.Module]:
    """The versions, with the same weights."""
    import timm
    from timm.layers import DropPath

    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=img, num_classes=100)
    models: dict[str, nn.Module] = {}
    ref = copy.deepcopy(base)
    for blk in ref.blocks:
        blk.drop_path1, blk.drop_path2 = DropPath(p), DropPath(p)
    models["timm"] = ref
    for draw in ("per_sample", "exact_count"):
        m = copy.deepcopy(base)
        m.blocks = nn.Sequential(*(SkipBlock(b, p, draw) for b in m.blocks))
        models[draw] = m
    models["none"] = copy.deepcopy(base)
    for m in models.values():
        m.train()
    return models


def step_fn(model: nn.Module, compiled: bool) -> Callable[[Tensor, Tensor], None]:
    fwd = torch.compile(model) if compiled else model
    loss_fn = nn.CrossEntropyLoss()

    def step(x: Tensor, y: Tensor) -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(fwd(x), y).backward()

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img", type=int, default=112)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--p", type=float, default=0.4)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=2, help="steps per version per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="also time the eager versions")
    ap.add_argument("--versions", default="timm,per_sample,exact_count,none")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from torch._dynamo.utils import counters

    models = build(args.img, args.p)
    names = args.versions.split(",")
    steps: dict[str, Callable[[Tensor, Tensor], None]] = {}
    graphs: dict[str, int] = {}
    gen = torch.Generator().manual_seed(1)

    def batch() -> tuple[Tensor, Tensor]:
        x = torch.randn(args.batch, 3, args.img, args.img, generator=gen)
        return x, torch.randint(0, 100, (args.batch,), generator=gen)

    for mode in ("compiled", "eager") if args.eager else ("compiled",):
        for name in names:
            key = f"{mode} {name}"
            steps[key] = step_fn(models[name], mode == "compiled")
            before = counters["stats"]["unique_graphs"]
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                steps[key](*batch())
            graphs[key] = counters["stats"]["unique_graphs"] - before
            print(f"warm {key}: {time.perf_counter() - t0:.1f} s wall, {graphs[key]} graph(s)", flush=True)
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for r in range(args.rounds):
        data = [batch() for _ in range(args.steps)]
        for key in order if r % 2 == 0 else order[::-1]:
            start = time.thread_time()
            for x, y in data:
                steps[key](x, y)
            times[key].append((time.thread_time() - start) / args.steps)
    after = {k: counters["stats"]["unique_graphs"] for k in ("all",)}
    print(
        f"\nvit_tiny_patch16_224 img {args.img}, batch {args.batch}, p={args.p} uniform, torch "
        f"{torch.__version__}, 1 thread, {args.rounds} rounds x {args.steps} steps, thread_time; "
        f"graphs compiled in all: {after['all']}"
    )
    print(f"{'version':28s} {'ms/step':>9s} {'timm/version':>13s} {'(min-max)':>13s} {'graphs':>7s}")
    for key in steps:
        mode = key.split()[0]
        base = times[f"{mode} timm"]
        ratios = [b / t for b, t in zip(base, times[key])]
        print(
            f"{key:28s} {statistics.median(times[key]) * 1e3:9.1f} {statistics.median(ratios):13.2f} "
            f"  ({min(ratios):.2f}-{max(ratios):.2f}) {graphs[key]:7d}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
