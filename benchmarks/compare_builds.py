"""DropBlock before and after a change: two source trees (each with its C extension built in place).

Each round runs one process per tree, in alternating order (flipped every round). A process
times ``drop_block`` forward + backward (a fresh gradient buffer each call, as in training) and a
bare ``x * 2.0`` forward + backward alternately on one thread with ``time.thread_time()``, and
reports the median of the pairwise ratios per case, with glibc tuned to reuse freed memory
(``benchmarks/tuned_malloc.py``: without it page faults land on either side at random). The
table gives, per case, the median over rounds of each tree's ratio and of their quotient (after
/ before; above 1: the change is slower). Usage (the "before" tree's extension built with
``pip wheel`` and unpacked, or ``pip install -e`` in its own environment)::

    OMP_NUM_THREADS=1 python benchmarks/compare_builds.py BEFORE/src AFTER/src --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = {
    "2-D per channel (32, 256, 28, 28), block 7": ((32, 256, 28, 28), {"block_size": 7}),
    "2-D shared (32, 256, 28, 28), block 7": ((32, 256, 28, 28), {"block_size": 7, "shared_channels": True}),
    "3-D per channel (8, 32, 32, 32, 32), block 5": ((8, 32, 32, 32, 32), {"block_size": 5}),
    "1-D per channel (32, 256, 784), block 7": ((32, 256, 784), {"block_size": 7}),
    "small 2-D per channel (8, 16, 14, 14), block 3": ((8, 16, 14, 14), {"block_size": 3}),
}


def _child(calls: int) -> None:
    """One tree's ratios (this process imports the tree on its ``PYTHONPATH``), as JSON on stdout."""
    import time

    import torch

    from spatialdrop.functional import drop_block

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tuned_malloc import steady_malloc

    steady_malloc(True)  # freed memory reused: no page faults landing on either side at random
    torch.set_num_threads(1)
    out = {}
    for name, (shape, kw) in CASES.items():
        x = torch.randn(shape, requires_grad=True)

        def ours(x: torch.Tensor = x, kw: dict = kw) -> None:
            drop_block(x, 0.1, **kw).backward(torch.ones(x.shape))

        def reference(x: torch.Tensor = x) -> None:
            (x * 2.0).backward(torch.ones(x.shape))

        ratios = []
        for i in range(calls + 2):
            times = {}
            for f in (ours, reference) if i % 2 else (reference, ours):
                x.grad = None
                t0 = time.thread_time()
                f()
                times[f] = time.thread_time() - t0
            if i >= 2:  # two warm-up rounds
                ratios.append(times[ours] / times[reference])
        out[name] = statistics.median(ratios)
    print(json.dumps(out))


def main() -> None:
    """Alternate the two trees' processes and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="the src/ folder of the tree before the change")
    ap.add_argument("after", help="the src/ folder of the tree after the change")
    ap.add_argument("--rounds", type=int, default=5, help="process pairs (default 5)")
    ap.add_argument("--calls", type=int, default=25, help="timed calls per case and process (default 25)")
    a = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for r in range(a.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for side in order:
            env = {**os.environ, "PYTHONPATH": getattr(a, side), "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, __file__, "--child", str(a.calls)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[side].append(json.loads(done.stdout))
        print(f"round {r + 1} of {a.rounds} done", file=sys.stderr)
    print(f"{'case':50} {'before':>8} {'after':>8} {'after/before':>13}")
    for name in CASES:
        b = [run[name] for run in runs["before"]]
        f = [run[name] for run in runs["after"]]
        q = statistics.median(y / x for x, y in zip(b, f))
        print(f"{name:50} {statistics.median(b):8.3f} {statistics.median(f):8.3f} {q:13.3f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(int(sys.argv[2]))
    else:
        main()
