"""The seed rate ``gamma`` that makes DropBlock drop each position (or the map on average) at rate p."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from .._compat import compile_cached

__all__ = ["p_tensor", "seed_rate", "uniform_gamma", "valid_gamma"]


def p_tensor(p: float) -> Tensor:
    """``p`` as a float64 0-dim CPU tensor: under ``torch.compile`` a new ``p`` does not recompile.

    ``torch.ones(()) * p``, not ``torch.full``/``torch.tensor``, which would specialise on ``p``.
    """
    return torch.ones((), dtype=torch.float64) * p


def uniform_gamma(p: float, blocks: Sequence[int]) -> float:
    """Seed rate that drops every position with probability ``p`` under uniform seeding.

    Every position is covered by exactly ``k = prod(blocks)`` seed places, so it is dropped with
    probability ``1 - (1 - gamma) ** k``; ``gamma = 1 - (1 - p) ** (1 / k)`` makes that ``p``.
    """
    k = math.prod(blocks)
    return -math.expm1(math.log1p(-p) / k)


def _coverage_histogram(sizes: tuple[int, ...], blocks: tuple[int, ...]) -> dict[int, int]:
    """How many map positions are covered by how many valid seed places (whole blocks only)."""
    hist: dict[int, int] = {1: 1}
    for size, b in zip(sizes, blocks):
        places = size - b + 1
        per_dim = Counter(min(i, places - 1) - max(0, i - b + 1) + 1 for i in range(size))
        combined: Counter[int] = Counter()
        for c, w in hist.items():
            for cd, wd in per_dim.items():
                combined[c * cd] += w * wd
        hist = dict(combined)
    return hist


@compile_cached(512)
def valid_gamma(p: float, sizes: tuple[int, ...], blocks: tuple[int, ...]) -> float:
    """Seed rate for ``seeding="valid"``: the mean drop rate over the map is ``p``.

    A position covered by ``c`` valid seed places is dropped with probability
    ``1 - (1 - gamma) ** c``; the mean of that over the map increases from 0 to 1 with
    ``gamma``, so bisection finds it (to float precision), once per set of arguments.
    """
    hist = _coverage_histogram(sizes, blocks)
    total = math.prod(sizes)

    def mean_rate(gamma: float) -> float:
        log_q = math.log1p(-gamma)
        return sum(-w * math.expm1(c * log_q) for c, w in hist.items()) / total

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if mean_rate(mid) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def seed_rate(p: float, sizes: tuple[int, ...], blocks: tuple[int, ...], seeding: str) -> float:
    """``gamma`` for ``seeding``."""
    if seeding == "uniform":
        return uniform_gamma(p, blocks)
    return valid_gamma(p, sizes, blocks)
