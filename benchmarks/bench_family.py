"""Forward (+ backward) times of the family's layers beside their peers, CPU, median of runs.

Run: PYTHONPATH=src /work/benchvenv/bin/python benchmarks/bench_family.py
Peers (timm, torchvision) are timed when importable; their rows are skipped otherwise.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spatialdrop import filter_dropout
from spatialdrop.functional import alpha_spatial_dropout, drop_path, gaussian_spatial_dropout


def median_ms(fn: Callable[[], object], runs: int = 15) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 64, 56, 56)
    rows: list[tuple[str, Callable[[], object]]] = [
        ("x * 2.0 (the floor)", lambda: x * 2.0),
        ("spatialdrop drop_path p=0.1", lambda: drop_path(x, 0.1)),
        ("spatialdrop gaussian_spatial_dropout p=0.1", lambda: gaussian_spatial_dropout(x, 0.1)),
        ("spatialdrop alpha_spatial_dropout p=0.1", lambda: alpha_spatial_dropout(x, 0.1)),
        ("torch F.feature_alpha_dropout p=0.1", lambda: F.feature_alpha_dropout(x, 0.1, True)),
    ]
    try:
        from timm.layers import drop_path as timm_drop_path

        rows.append(("timm drop_path p=0.1", lambda: timm_drop_path(x, 0.1, True)))
    except ImportError:
        pass
    try:
        from torchvision.ops import stochastic_depth

        rows.append(("torchvision stochastic_depth row p=0.1", lambda: stochastic_depth(x, 0.1, "row", True)))
    except ImportError:
        pass
    conv_in = torch.randn(32, 64, 28, 28)
    plain = nn.Conv2d(64, 64, 3, padding=1)
    dropped = filter_dropout(nn.Conv2d(64, 64, 3, padding=1), 0.1)
    with torch.no_grad():
        rows.append(("nn.Conv2d 64->64 3x3 on (32, 64, 28, 28)", lambda: plain(conv_in)))
        rows.append(("same conv with filter_dropout p=0.1", lambda: dropped(conv_in)))
        print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}")
        print("| what | median forward ms |\n|---|---|")
        for name, fn in rows:
            print(f"| {name} | {median_ms(fn):.2f} |")


if __name__ == "__main__":
    main()
