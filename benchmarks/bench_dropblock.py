"""DropBlock against torchvision, timm, the ``dropblock`` package and a bare ``x * 2.0`` (issue 3).

A thin script over the package's harness: the same as ``spatialdrop bench --suite dropblock``, and
it takes the same options (``--quick``, ``--format markdown``, ``--threads``, ``--out FILE``, ...).
Peers that are not installed are listed with a note.

    PYTHONPATH=src python benchmarks/bench_dropblock.py --format markdown

``--compiled`` instead times DropBlock eager against ``torch.compile(fullgraph=True)`` in the same
process (1 thread, forward + ``backward(g)`` with a dense ``g``, median thread CPU time of 9 runs,
so that other load on the machine counts less), for per-channel and shared 2-D masks and 3-D:

    PYTHONPATH=src python benchmarks/bench_dropblock.py --compiled
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

from spatialdrop import cli
from spatialdrop.functional import drop_block

ROWS = [
    ("per channel (32, 256, 28, 28), block 7", (32, 256, 28, 28), {"p": 0.1, "block_size": 7}),
    (
        "shared (32, 256, 28, 28), block 7",
        (32, 256, 28, 28),
        {"p": 0.1, "block_size": 7, "shared_channels": True},
    ),
    ("per channel (8, 32, 32, 32, 32), block 5", (8, 32, 32, 32, 32), {"p": 0.1, "block_size": 5}),
]


def _median_ms(fn: Callable[[], None], reps: int = 9) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times) * 1e3


def compiled_table() -> str:
    """Markdown rows: eager, compiled and their ratio, fwd+bwd, in one process."""
    torch.set_num_threads(1)
    lines = ["| DropBlock fwd+bwd, 1 thread | eager ms | compiled ms | compiled / eager |"]
    lines.append("|---|---|---|---|")
    for name, shape, kw in ROWS:
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)

        def eager(t: torch.Tensor, kw: dict = kw) -> torch.Tensor:
            return drop_block(t, **kw)

        compiled = torch.compile(eager, fullgraph=True)

        def step(
            fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor = x, g: torch.Tensor = g
        ) -> Callable[[], None]:
            def run() -> None:
                fn(x).backward(g)
                x.grad = None

            return run

        e1, c, e2 = _median_ms(step(eager)), _median_ms(step(compiled)), _median_ms(step(eager))
        e = (e1 + e2) / 2
        lines.append(f"| {name} | {e:.2f} | {c:.2f} | {c / e:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``spatialdrop bench --suite dropblock`` with ``argv`` (default: the command line)."""
    args = sys.argv[1:] if argv is None else argv
    if "--compiled" in args:
        print(compiled_table())
        return 0
    return cli.main(["bench", "--suite", "dropblock", *args])


if __name__ == "__main__":
    sys.exit(main())
