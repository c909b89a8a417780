"""The one place DropBlock draws its seed grids: :func:`draw_grid`.

Keyed grids follow the rule of :mod:`.keyed_seeds`; unkeyed ones are drawn here, sparse ones by
the one geometric-gap sampler (with its float64 tail in the C extension where it is built).
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from ..keyed import MaskKey
from . import fused
from .keyed_seeds import draw_keyed_seeds

__all__ = ["draw_grid", "gap_positions"]


def gap_positions(u: Tensor, gamma: float) -> Tensor:
    """Positions of the successes of Bernoulli(``gamma``) trials, from uniforms, along the last dim.

    The gaps between successes are i.i.d. Geometric(``gamma``) on ``{1, 2, ...}``:
    ``floor(log(1 - U) / log(1 - gamma)) + 1``. Their running sum minus one gives the index of
    each success. The sum is taken in float64: exact while below ``2**53`` (every grid we accept,
    see :data:`~.geometry.MAX_PLACES`), and it cannot overflow past the end of the grid (a huge
    gap is a huge float, not a wrapped int).

    Args:
        u: uniforms in ``[0, 1)``, any float dtype, ``(..., count)``.
        gamma: the success probability, in ``(0, 1)``.

    Returns:
        float64 ``(..., count)``: ascending success indices (from 0) along the last dim; the
        caller keeps those below its grid size and tops up if the last is not past the end.
    """
    log_q = math.log1p(-gamma)
    gaps = torch.log1p(u.to(torch.float64).neg_()).div_(log_q).floor_().add_(1.0)
    return gaps.cumsum_(-1).sub_(1.0)


def draw_grid(
    numel: int,
    gamma: float | Tensor,
    generator: torch.Generator | None,
    device: torch.device,
    *,
    dense: bool,
    key: MaskKey | None = None,
    small: bool = False,
) -> Tensor:
    """Draw a flat Bernoulli(``gamma``) seed grid of ``numel`` places, keyed or not.

    Args:
        numel: the number of places in the (flattened) seed grid.
        gamma: the probability of a seed at each place, in ``[0, 1)`` (a 0-dim tensor: unkeyed
            and dense only, under ``torch.compile``: see :mod:`.dense`).
        generator: the random number generator, or ``None`` for the global one.
        device: where to draw.
        dense: return a bool tensor of ``numel`` places (one uniform per place, static shape)
            instead of the sorted int64 indices of the seeds.
        key: draw by the keyed rule of :mod:`.keyed_seeds` instead (``generator`` unused).
        small: the sparse indices as int32 when the C sampler draws them and ``numel`` is at
            most ``2**31`` (what the fused pass and backward keep); the same values.

    Returns:
        With ``dense``, a bool tensor of shape ``(numel,)``; else the sorted indices of the
        places holding a seed, an int64 tensor of data-dependent length. Both are exactly a
        sequence of independent Bernoulli(``gamma``) trials.
    """
    if key is not None:
        assert not isinstance(gamma, Tensor), "draw_grid: a keyed draw takes gamma as a float"
        return draw_keyed_seeds(numel, gamma, key, device, dense=dense)
    if dense:  # no ``generator=None`` keyword: it has no ONNX lowering, and fails with symbolic sizes
        if generator is None:
            return torch.rand(numel, device=device) < gamma
        return torch.rand(numel, generator=generator, device=device) < gamma
    assert not isinstance(gamma, Tensor), "draw_grid: a sparse draw takes gamma as a float"
    if gamma <= 0.0 or numel == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    # Draw the expected number of gaps plus a margin at once, and top up in the rare case the
    # running sum falls short of the end. With the C extension, the float64 tail of
    # gap_positions (the division, floor, running sum and cut, in the same order: the same bits)
    # runs in C on torch's uniforms and log1p, without the torch version's passes and temporaries.
    ext = fused.extension() if device.type == "cpu" else None
    parts: list[Tensor] = []
    last = -1.0  # index of the last seed placed (or -1)
    while True:
        mean = (numel - 1 - last) * gamma
        count = int(mean + 6.0 * math.sqrt(mean) + 16.0)
        if ext is None:
            u = torch.rand(count, dtype=torch.float64, generator=generator, device=device)
            pos = gap_positions(u, gamma).add_(last + 1.0)
            end = float(pos[-1])
            # ascending: the seeds in the grid are a prefix (cheaper than a mask)
            parts.append(pos.narrow(0, 0, int((pos < numel).sum()) if end >= numel else count).long())
        else:
            logs = _scratch(count)  # the uniforms, then log1p(-u) in place: no allocation per call
            torch.rand(count, dtype=torch.float64, generator=generator, out=logs)
            logs.neg_().log1p_()
            out = torch.empty(count, dtype=torch.int32 if small and numel <= 2**31 else torch.int64)
            args = (math.log1p(-gamma), last + 1.0, float(numel), out.data_ptr(), count, out.element_size())
            kept, end = ext.gaps(logs.data_ptr(), count, *args)
            parts.append(out.narrow(0, 0, kept))
        if end >= numel:
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        last = end


_local = threading.local()
_SCRATCH_MAX = 1 << 20  # float64 elements (8 MiB) kept per thread at most


def _scratch(count: int) -> Tensor:
    """A float64 buffer of ``count`` elements, reused by this thread's draws (small ones)."""
    if count > _SCRATCH_MAX:
        return torch.empty(count, dtype=torch.float64)
    buf: Tensor | None = getattr(_local, "buf", None)
    if buf is None or buf.numel() < count:
        buf = torch.empty(max(count, 4096), dtype=torch.float64)
        _local.buf = buf
    return buf.narrow(0, 0, count)
