"""What the data-dependent kept count of ResidualDropPath costs under ``torch.compile`` (issue 18).

A ViT-S block's MLP branch (LayerNorm, 384 -> 1536 -> 384 with GELU) on (N, 197, 384) tokens,
p = 0.3, forward + backward with the branch's weight gradients, one thread. Printed:

1. graph counts and graph breaks (``torch._dynamo.explain``) of ``ResidualDropPath(branch)``
   compiled by default and with ``torch._dynamo.config.capture_dynamic_output_shape_ops = True``,
   and of a plain gather (``nonzero`` -> ``index_select`` -> branch -> ``index_add``) compiled
   without the flag, with the frames it compiles over a few steps (the kept count changes);
2. fwd+bwd times, interleaved in one process (median of the repeats): eager ours, eager
   ``x + DropPath(p)(branch(x))`` (timm's where installed, else ``spatialdrop.functional.drop_path``,
   the same bits), both compiled by default, and ours compiled with the flag.

    PYTHONPATH=src python benchmarks/bench_residual_compile.py [N] [repeats]   # default 16 9
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch._dynamo
from torch import Tensor, nn

from spatialdrop import ResidualDropPath
from spatialdrop.functional import drop_path

P = 0.3


def _baseline_drop() -> tuple[Callable[[Tensor], Tensor], str]:
    try:
        from timm.layers import DropPath
    except ImportError:
        return (lambda y: drop_path(y, P)), "x + drop_path(branch(x), p)"
    return DropPath(P), "x + timm DropPath(p)(branch(x))"


def _naive_gather(branch: nn.Module) -> Callable[[Tensor], Tensor]:
    """The gather written plainly: without the flag, ``nonzero`` is a graph break."""

    def f(x: Tensor) -> Tensor:
        idx = (torch.rand(x.shape[0]) >= P).nonzero().squeeze(1)
        return x.index_add(0, idx, branch(x.index_select(0, idx)), alpha=1 / (1 - P))

    return f


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 16
    repeats = int(argv[1]) if len(argv) > 1 else 9
    torch.set_num_threads(1)
    torch.manual_seed(0)
    branch = nn.Sequential(nn.LayerNorm(384), nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384))
    ours = ResidualDropPath(branch, P)
    drop, base_call = _baseline_drop()

    def base(x: Tensor) -> Tensor:
        return x + drop(branch(x))

    x = torch.randn(n, 197, 384, requires_grad=True)
    params = tuple(branch.parameters())
    print(f"ResidualDropPath(ViT-S MLP branch, p={P}), input ({n}, 197, 384), torch {torch.__version__}")
    for flag in (False, True):
        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=flag):
            e = torch._dynamo.explain(ours)(x)
        graphs = f"{e.graph_count} graph(s), {e.graph_break_count} break(s)"
        print(f"  ours, capture_dynamic_output_shape_ops={flag}: {graphs}")
    torch._dynamo.reset()
    naive = _naive_gather(branch)
    e = torch._dynamo.explain(naive)(x)
    why = str(e.break_reasons[0].reason).splitlines()[0] if e.break_reasons else "-"
    print(f"  plain gather, no flag: {e.graph_count} graphs, {e.graph_break_count} break(s): {why}")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_naive = torch.compile(naive)
    for _ in range(6):
        compiled_naive(x).sum().backward()
    print(f"  plain gather, no flag, 6 steps: {counters['stats']['unique_graphs']} graphs compiled")
    torch._dynamo.reset()

    compiled_ours = torch.compile(ours)
    compiled_base = torch.compile(base)
    with_flag = torch.compile(ResidualDropPath(branch, P))

    def flagged(t: Tensor) -> Tensor:
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            return with_flag(t)

    impls: dict[str, Callable[[Tensor], Tensor]] = {
        "eager ResidualDropPath": ours,
        f"eager {base_call}": base,
        "compiled ResidualDropPath (default: whole batch)": compiled_ours,
        f"compiled {base_call}": compiled_base,
        "compiled ResidualDropPath, capture_dynamic_output_shape_ops": flagged,
    }
    grad = torch.ones_like(x)

    def step(fn: Callable[[Tensor], Tensor]) -> float:
        start = time.perf_counter()
        torch.autograd.grad(fn(x), (x, *params), grad, allow_unused=True)
        return time.perf_counter() - start

    for fn in impls.values():  # compile and warm up
        step(fn)
        step(fn)
    times: dict[str, list[float]] = {k: [] for k in impls}
    for rep in range(repeats):
        order = list(impls.items())
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            times[name].append(step(fn))
    ref = statistics.median(times[f"eager {base_call}"])
    print(f"  fwd+bwd, median of {repeats} interleaved repeats; speed-up = eager baseline / row")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:62s} {m * 1e3:8.1f} ms  speed-up {ref / m:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
