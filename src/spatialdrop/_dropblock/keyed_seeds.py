"""The keyed seed rule of DropBlock: a Bernoulli seed grid, one row per sample, from a MaskKey.

One entry point, :func:`draw_keyed_seeds`; everything else in DropBlock calls it, so the rule
can be replaced here alone (for example by one that a Triton kernel reproduces bit for bit).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..keyed import MaskKey, keyed_uniform
from .sampling import gap_positions

__all__ = ["draw_keyed_seeds"]


def draw_keyed_seeds(numel: int, gamma: float, key: MaskKey, device: torch.device, *, dense: bool) -> Tensor:
    """The keyed form of :func:`~.sampling.draw_seeds`: the same Bernoulli grid, one row per sample.

    The grid is split into one row per sample (``numel`` is a multiple of the number of sample
    ids), and row ``i`` depends only on the key's seed, step, layer and ``sample_ids[i]``.

    Sparse: each row's seeds come from geometric gaps of its own keyed uniforms (columns of
    ``keyed_uniform`` do not depend on how many are drawn, so topping up a short row by drawing
    more columns leaves every row's earlier numbers, and so its seeds, unchanged).

    Returns:
        With ``dense``, a bool tensor ``(numel,)``; else the sorted int64 seed indices.
    """
    n = key.sample_ids.numel()
    row = numel // n if n else 0
    if dense:
        return (keyed_uniform(key, row, device=device) < gamma).view(-1)
    if gamma <= 0.0 or numel == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    mean = row * gamma
    count = int(mean + 6.0 * math.sqrt(mean) + 16.0)
    while True:
        pos = gap_positions(keyed_uniform(key, count, device=device), gamma)
        if bool((pos[:, -1] >= row).all()):
            break
        count *= 2
    inside = pos < row
    pos = pos.long().add_(torch.arange(n, device=device).mul_(row).unsqueeze(1))
    return pos[inside]  # row by row, ascending: sorted flat indices
