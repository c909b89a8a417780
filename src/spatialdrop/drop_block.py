"""DropBlock for any spatial rank: calibrated drop rate, per-channel or shared masks, sparse seeds.

How a mask is made. Per spatial dim of size ``L`` and block side ``b``, block *seeds* live on a
grid of ``L + b - 1`` places (``seeding="uniform"``); the seed at grid index ``j`` drops the map
positions ``[j - b + 1, j]`` that lie in ``[0, L)``. Every map position is then covered by
exactly ``b`` seed places per dim, ``k = prod(b)`` in all, corners included, so with seeds drawn
independently at rate ``gamma = 1 - (1 - p) ** (1 / k)`` every position is dropped with
probability exactly ``p``. With ``seeding="valid"`` seeds only sit where a whole block fits
(``L - b + 1`` places per dim, the paper's placement) and ``gamma`` is solved numerically so that
the *mean* drop rate over the map is ``p``.

How it is fast. ``gamma`` is tiny (about 0.002 for ``p = 0.1`` and a 7 x 7 block), so seeds are
drawn sparsely: the gaps between successes of a Bernoulli(``gamma``) sequence are geometric, so
drawing the gaps gives exactly a Bernoulli seed grid at the cost of a few random numbers per
*seed* rather than one per position. Per-channel masks are never materialised: the output is
``input * scale`` with the dropped positions zeroed by ``index_fill_``, each block row written
from its first offset through an overlapping window view (:func:`block_plan`). Backward reuses
that write plan (int32) when it takes at most 1/32 of the input's bytes, else it rebuilds it
from the saved seed indices. Shared masks (one per sample) are small ``(N, *spatial)`` bools.
Under ``torch.compile`` (where data-dependent sizes break graphs) a dense path draws the whole
seed grid and grows blocks with separable, logarithmic-depth windowed ORs.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections import Counter
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ._dropblock.keyed_seeds import draw_keyed_seeds
from ._module import StructuredDropout
from ._validation import (
    check_bool,
    check_channel_dim,
    check_choice,
    check_float_input,
    check_generator,
    check_min_rank,
    check_p,
    check_sizes,
    fail,
    float_dtype_of,
    squeeze_if,
)
from .keyed import MaskKey, check_key_arg

__all__ = [
    "DropBlock",
    "DropBlock1d",
    "DropBlock2d",
    "DropBlock3d",
    "drop_block",
]

_LAYOUT = "(N, C, *spatial), or (N, *spatial, C) with channel_dim=-1"
SEEDINGS = ("uniform", "valid")
SCALES = ("expected", "realized", "none")

BlockSize = Union[int, Sequence[int]]


# --- randomness: the one place that draws random numbers ---------------------------------


def _draw_seeds(
    numel: int,
    gamma: float,
    generator: torch.Generator | None,
    device: torch.device,
    *,
    dense: bool,
    key: MaskKey | None = None,
) -> Tensor:
    """Draw a flat Bernoulli(``gamma``) seed grid of ``numel`` places.

    Every random number spatialdrop's DropBlock uses comes from here, so that another source
    (for example a keyed, counter-based generator) can be put in one place.

    Args:
        numel: the number of places in the (flattened) seed grid.
        gamma: the probability of a seed at each place, in ``[0, 1)``.
        generator: the random number generator, or ``None`` for the global one.
        device: where to draw.
        dense: return a bool tensor of ``numel`` places (one uniform per place, static shape,
            for ``torch.compile``) instead of the sorted int64 indices of the seeds.
        key: draw from this keyed generator instead (see :mod:`spatialdrop.keyed`): the grid
            is then split into one row per sample (``numel`` must be a multiple of the number
            of sample ids), and row ``i`` depends only on the key's seed, step, layer and
            ``sample_ids[i]``.

    Returns:
        With ``dense``, a bool tensor of shape ``(numel,)``; else the sorted indices of the
        places holding a seed, an int64 tensor of data-dependent length. Both are exactly a
        sequence of independent Bernoulli(``gamma``) trials.
    """
    if key is not None:
        return draw_keyed_seeds(numel, gamma, key, device, dense=dense)
    if dense:
        return torch.rand(numel, generator=generator, device=device) < gamma
    if gamma <= 0.0 or numel == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    # The gaps between successes of a Bernoulli(gamma) sequence are i.i.d. Geometric(gamma) on
    # {1, 2, ...}: floor(log(U) / log(1 - gamma)) + 1 with U uniform on (0, 1]. Drawing gaps
    # until the running sum passes the end is exactly the Bernoulli sequence. Draw the expected
    # number plus a margin at once, and top up in the rare case it falls short.
    log_q = math.log1p(-gamma)
    parts: list[Tensor] = []
    last = -1  # index of the last seed placed (or -1)
    while True:
        left = numel - 1 - last
        mean = left * gamma
        count = int(mean + 6.0 * math.sqrt(mean) + 16.0)
        u = torch.rand(count, dtype=torch.float64, generator=generator, device=device)
        gaps = torch.log1p(u.neg_()).div_(log_q).floor_().add_(1.0).clamp_(max=float(numel + 1))
        pos = gaps.long().cumsum_(0).add_(last)
        end = int(pos[-1])
        parts.append(pos[pos < numel] if end >= numel else pos)
        if end >= numel:
            break
        last = end
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# --- calibration ---------------------------------------------------------------------------


def uniform_gamma(p: float, blocks: Sequence[int]) -> float:
    """Seed rate that drops every position with probability ``p`` under uniform seeding."""
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


def solve_valid_gamma(p: float, sizes: tuple[int, ...], blocks: tuple[int, ...]) -> float:
    """Seed rate for ``seeding="valid"``: the mean drop rate over the map is ``p``.

    A position covered by ``c`` valid seed places is dropped with probability
    ``1 - (1 - gamma) ** c``; the mean of that over the map increases from 0 to 1 with
    ``gamma``, so bisection finds it (to float precision). ``valid_gamma`` is the cached form.
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


valid_gamma = functools.lru_cache(maxsize=512)(solve_valid_gamma)


# --- geometry: from seed places to map positions -------------------------------------------


class _Geometry:
    """Sizes of the map, the blocks and the seed grid, and where a seed's block lands."""

    __slots__ = ("blocks", "channel_dim", "channels", "grid", "shared", "shift", "sizes", "spatial")

    def __init__(
        self,
        input: Tensor,
        channel_dim: int,
        blocks: tuple[int, ...],
        shared: bool,
        seeding: str,
    ) -> None:
        self.channel_dim = channel_dim
        self.spatial = tuple(d for d in range(1, input.dim()) if d != channel_dim)
        self.sizes = tuple(int(input.shape[d]) for d in self.spatial)
        self.blocks = blocks
        self.channels = int(input.shape[channel_dim])
        self.shared = shared
        if seeding == "uniform":
            self.grid = tuple(s + b - 1 for s, b in zip(self.sizes, blocks))
            self.shift = (0,) * len(blocks)
        else:
            self.grid = tuple(s - b + 1 for s, b in zip(self.sizes, blocks))
            self.shift = tuple(b - 1 for b in blocks)

    def maps(self, batch: int) -> int:
        """Number of independent masks: one per sample, or one per (sample, channel)."""
        return batch if self.shared else batch * self.channels


def _positions(j: Tensor, shift: int, size: int, b: int, stride: int) -> Tensor:
    """Storage offsets ``(S, min(b, L))`` along one dim of the positions each seed drops.

    The seed at uniform index ``j`` (grid index plus ``shift``) drops ``[j - b + 1, j]`` cut to
    ``[0, L)``; a cut block repeats its border position, which is harmless.
    """
    if b <= size:
        # clamp after scaling by the stride (monotone): one pass fewer
        span = torch.arange(b - 1 - shift, -1 - shift, -1, device=j.device).mul_(stride)
        return (j * stride).unsqueeze(-1).sub(span).clamp_(0, (size - 1) * stride)
    # the block covers at most the whole map: positions lo .. hi, L of them with repeats
    j = j + shift
    lo = (j - (b - 1)).clamp_(min=0)
    hi = j.clamp(max=size - 1)
    span = torch.arange(size, device=j.device)
    return torch.minimum(lo.unsqueeze(-1) + span, hi.unsqueeze(-1)).mul_(stride)


def _outer_add(off: Tensor, pos: Tensor) -> Tensor:
    """``off[s, ...] + pos[s, k]`` as a tensor ``(S, ..., k)``."""
    return off.unsqueeze(-1) + pos.view((pos.shape[0],) + (1,) * (off.dim() - 1) + (pos.shape[1],))


# A plan says where to write: for each run length ``w``, the storage offsets where a run of ``w``
# positions along the last spatial dim starts.
Plan = list[tuple[int, Tensor]]


def _run_lengths(run: int) -> list[int]:
    """The window lengths used for runs of at most ``run`` positions."""
    return [1 << i for i in range(run.bit_length()) if 1 << i < run] + [run]


def _run_length(length: int, run: int) -> int:
    """The window used for a run of ``length`` positions: the run itself if whole, else a power of 2."""
    return run if length == run else 1 << (length.bit_length() - 1)


def block_plan(
    seeds: Tensor,
    grid: Sequence[int],
    shift: Sequence[int],
    sizes: Sequence[int],
    blocks: Sequence[int],
    map_offsets: Tensor,
    strides: Sequence[int],
) -> Plan:
    """Where to write so as to cover every position dropped by the given seeds.

    Args:
        seeds: flat int64 indices into the seed grid of shape ``(maps, *grid)``.
        grid: the seed grid's spatial shape.
        shift: added to a seed's grid index to give its uniform-seeding index ``j`` (0 for
            uniform seeding, ``b - 1`` for valid seeding); the seed at ``j`` drops positions
            ``[j - b + 1, j]`` of ``[0, L)`` per dim.
        sizes: the map's spatial shape ``L``.
        blocks: the block sides ``b``.
        map_offsets: storage offset (from the target's start) of position 0 of each map.
        strides: the target's stride along each spatial dim.

    Returns:
        A list of ``(w, starts)``: write runs of ``w`` positions along the last spatial dim,
        starting at the storage offsets ``starts`` (int64, ascending within each list entry).
        A block's run along the last dim is written whole when the border does not cut it, and
        as two overlapping power-of-2 windows when it does; the other dims are expanded row by
        row. The work is proportional to the number of seeds times the block's cross-section:
        per seed, never per map position, and it does not grow with the block's last side.
    """
    rest = seeds
    coords: list[Tensor] = []
    for g in reversed(grid):
        coords.append(rest % g)
        rest = rest // g
    coords.reverse()
    j = coords[-1] + shift[-1] if shift[-1] else coords[-1]
    size, b, st = sizes[-1], blocks[-1], strides[-1]
    lo = (j - (b - 1)).clamp_(min=0)
    hi = j.clamp(max=size - 1)
    run = min(b, size)
    first = map_offsets.index_select(0, rest).add_(lo * st)
    outer = coords[:-1]
    if run == 1:
        groups: list[tuple[int, Tensor | None]] = [(1, None)]
    else:
        table = torch.tensor([0] + [_run_length(n, run) for n in range(1, run + 1)], device=seeds.device)
        width = table.index_select(0, hi - lo + 1)
        # the second window of a cut run ends at hi
        second = first + (hi - lo - width + 1).mul_(st)
        groups = [(w, (width == w).nonzero().squeeze(1)) for w in _run_lengths(run)]
    plan: Plan = []
    for w, which in groups:
        if which is None:
            heads, cs = first, outer
        elif which.numel() == 0:
            continue
        elif w == run:
            heads, cs = first.index_select(0, which), [c.index_select(0, which) for c in outer]
        else:  # two windows per run
            heads = torch.cat([first.index_select(0, which), second.index_select(0, which)])
            cs = [c.index_select(0, which).repeat(2) for c in outer]
        for c, s, n, k, stride in zip(cs, shift, sizes, blocks, strides):
            heads = _outer_add(heads, _positions(c, s, n, k, stride))
        plan.append((w, heads.reshape(-1)))
    return plan


# Whether ``index_fill_`` may write through a self-overlapping window view (torch 2.x allows it;
# should a future version refuse, the first refusal switches to one offset per element).
_window_views = True


def apply_plan(target: Tensor, value: float | bool, plan: Plan, last_stride: int) -> None:
    """Write ``value`` into the dense tensor ``target`` at the runs given by ``plan``.

    A run of ``w`` positions is one row of an overlapping window view of ``target``'s storage
    (rows start one element apart, a row steps by ``last_stride``), so ``index_fill_`` writes
    it from its first offset alone. Overlapping rows only write the same value twice.
    """
    global _window_views
    for w, heads in plan:
        index = heads.long()
        if _window_views:
            rows = target.numel() - (w - 1) * last_stride
            windows = target.as_strided((rows, w), (1, last_stride), target.storage_offset())
            try:
                windows.index_fill_(0, index, value)
                continue
            except RuntimeError:
                _window_views = False
        span = torch.arange(w, device=index.device).mul_(last_stride)
        _flat(target).index_fill_(0, (index.unsqueeze(1) + span).reshape(-1), value)


def paint_blocks(
    target: Tensor,
    value: float | bool,
    seeds: Tensor,
    grid: Sequence[int],
    shift: Sequence[int],
    sizes: Sequence[int],
    blocks: Sequence[int],
    map_offsets: Tensor,
    strides: Sequence[int],
) -> None:
    """Write ``value`` into the dense tensor ``target`` at every position the seeds drop.

    See :func:`block_plan` for the arguments.
    """
    plan = block_plan(seeds, grid, shift, sizes, blocks, map_offsets, strides)
    apply_plan(target, value, plan, strides[-1])


def grow_blocks(grid: Tensor, sizes: Sequence[int], blocks: Sequence[int], shift: Sequence[int]) -> Tensor:
    """Dense mask of dropped positions from a dense bool seed grid of shape ``(maps, *grid)``.

    Each spatial dim is a windowed OR of width ``b`` done by log-doubling (``log2(b) + 1``
    passes), so the cost does not grow with the block area. Valid-seeding grids (``shift``
    ``b - 1``) are first placed in a zero uniform-sized grid.
    """
    out = grid
    for axis, (size, b, s) in enumerate(zip(sizes, blocks, shift), start=1):
        if s:  # valid grid of size - b + 1 places: pad to the uniform size + b - 1 places
            pad_shape = list(out.shape)
            pad_shape[axis] = b - 1
            pad = out.new_zeros(pad_shape)
            out = torch.cat([pad, out, pad], dim=axis)
        out = _window_any(out, axis, b, size)
    return out


def _window_any(x: Tensor, dim: int, b: int, out_len: int) -> Tensor:
    """``y[i] = any(x[i : i + b])`` along ``dim`` for ``i < out_len`` (``x`` has out_len + b - 1)."""
    w = 1
    while 2 * w <= b:
        n = x.shape[dim] - w
        x = x.narrow(dim, 0, n) | x.narrow(dim, w, n)
        w *= 2
    if w < b:
        x = x.narrow(dim, 0, out_len) | x.narrow(dim, b - w, out_len)
    return x.narrow(dim, 0, out_len)


# --- applying a mask -----------------------------------------------------------------------


def _is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers a gap-free, non-overlapping stretch of its storage."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor's storage stretch, indexed by storage offset."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _map_offsets(t: Tensor, geo: _Geometry) -> Tensor:
    """Storage offset (relative to ``t``'s start) of position 0 of each per-channel map."""
    n = torch.arange(t.shape[0], device=t.device).mul_(t.stride(0))
    c = torch.arange(geo.channels, device=t.device).mul_(t.stride(geo.channel_dim))
    return (n.unsqueeze(1) + c).reshape(-1)


def _maps_plan(target: Tensor, seeds: Tensor, geo: _Geometry) -> Plan:
    """The plan that zeroes the dropped positions of every per-channel map of ``target``."""
    strides = [target.stride(d) for d in geo.spatial]
    return block_plan(seeds, geo.grid, geo.shift, geo.sizes, geo.blocks, _map_offsets(target, geo), strides)


def _multiply(src: Tensor, factor: float | Tensor | None, dst: Tensor) -> None:
    """``dst = src * factor`` in ``src``'s dtype, the product computed in float32 or wider."""
    if factor is None:
        if dst is not src:
            dst.copy_(src)
    else:
        torch.mul(src, factor, out=dst)


def _realized_factor(dropped: Tensor, per_sample: int, like: Tensor) -> Tensor:
    """``per_sample / kept`` per sample (0 where nothing is kept), shaped to broadcast on ``like``."""
    kept = (per_sample - dropped).to(float_dtype_of(like))
    factor = torch.where(kept > 0, per_sample / kept.clamp(min=1), torch.zeros_like(kept))
    return factor.view((like.shape[0],) + (1,) * (like.dim() - 1))


def _shared_multiplier(keep: Tensor, factor: float | Tensor | None, geo: _Geometry, like: Tensor) -> Tensor:
    """The ``(N, 1, *spatial)`` multiplier (kept * scale) of a shared mask, in float32 or wider."""
    mult = keep.to(float_dtype_of(like))
    if factor is not None:
        mult = mult * (factor.view((-1,) + (1,) * len(geo.sizes)) if isinstance(factor, Tensor) else factor)
    return mult.unsqueeze(geo.channel_dim)


def _apply_shared(
    src: Tensor, keep: Tensor, factor: float | Tensor | None, geo: _Geometry, inplace: bool
) -> Tensor:
    mult = _shared_multiplier(keep, factor, geo, src)
    if inplace:
        return src.mul_(mult)
    out = torch.empty_like(src)
    torch.mul(src, mult, out=out)
    return out


class _SeedMaskFunction(torch.autograd.Function):
    """``input * scale`` with every seed's block zeroed: one mask per (sample, channel).

    Saves for backward the write plan as int32 when that takes at most 1/32 of the input's
    bytes (a bit per element), else the seed indices (int32 when they fit), from which backward
    rebuilds the plan, or, if the seeds would take more than a byte per element (tiny blocks at
    a high ``p``), a bool mask.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        seeds: Tensor,
        scale: Optional[float],
        realized: bool,
        geo: _Geometry,
        inplace: bool,
    ) -> Tensor:
        out = input if inplace else torch.empty_like(input)
        target = out if _is_dense(out) else torch.empty_like(out, memory_format=torch.contiguous_format)
        plan = _maps_plan(target, seeds, geo)
        last_stride = target.stride(geo.spatial[-1])
        factor: float | Tensor | None = scale
        if realized:  # the kept count needs the union of the blocks: paint them once
            dropped = torch.zeros_like(target, dtype=torch.uint8)
            apply_plan(dropped, 1, plan, last_stride)
            counts = dropped.sum(dim=tuple(range(1, target.dim())), dtype=torch.int64)
            factor = _realized_factor(counts, math.prod(target.shape[1:]), input)
        _multiply(input, factor, target)
        apply_plan(target, 0, plan, last_stride)
        if target is not out:
            out.copy_(target)
        if inplace:
            ctx.mark_dirty(input)
        # keep for backward the smallest of: the plan, the seeds, a bool mask (one byte each)
        heads = [h for _, h in plan]
        small = target.numel() < 2**31
        ctx.mode = "mask"
        if small and 4 * sum(h.numel() for h in heads) * 32 <= input.numel() * input.element_size():
            ctx.mode, ctx.widths = "plan", [w for w, _ in plan]
            kept: list[Tensor] = [h.to(torch.int32) for h in heads]
        elif (4 if small else 8) * seeds.numel() <= target.numel():
            ctx.mode = "seeds"
            kept = [seeds.to(torch.int32) if small else seeds]
        else:  # seeds denser than one in four positions (tiny blocks, high p)
            dropped_mask = torch.zeros_like(target, dtype=torch.bool)
            apply_plan(dropped_mask, True, plan, last_stride)
            kept = [dropped_mask]
        ctx.save_for_backward(factor if isinstance(factor, Tensor) else None, *kept)
        ctx.scale = factor if not isinstance(factor, Tensor) else None
        ctx.geo = geo
        ctx.layout = (target.shape, target.stride(), last_stride)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None, None, None]:
        factor, *kept = ctx.saved_tensors
        shape, strides, last_stride = ctx.layout
        g = torch.empty_strided(shape, strides, dtype=grad.dtype, device=grad.device)
        _multiply(grad, factor if factor is not None else ctx.scale, g)
        if ctx.mode == "mask":
            g.masked_fill_(kept[0], 0)
        else:
            plan = (
                list(zip(ctx.widths, kept)) if ctx.mode == "plan" else _maps_plan(g, kept[0].long(), ctx.geo)
            )
            apply_plan(g, 0, plan, last_stride)
        return g, None, None, None, None, None


class _SharedMaskFunction(torch.autograd.Function):
    """``input * multiplier`` for a shared mask: saves the small bool mask (one per sample)."""

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        keep: Tensor,
        factor: Optional[Tensor],
        scale: Optional[float],
        geo: _Geometry,
        inplace: bool,
    ) -> Tensor:
        out = _apply_shared(input, keep, factor if factor is not None else scale, geo, inplace)
        if inplace:
            ctx.mark_dirty(input)
        ctx.save_for_backward(keep, factor)
        ctx.scale = scale
        ctx.geo = geo
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None, None, None]:
        keep, factor = ctx.saved_tensors
        g = _apply_shared(grad, keep, factor if factor is not None else ctx.scale, ctx.geo, False)
        return g, None, None, None, None, None


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


# --- the op --------------------------------------------------------------------------------


def drop_block(
    input: Tensor,
    p: float = 0.1,
    block_size: BlockSize = 7,
    training: bool = True,
    inplace: bool = False,
    *,
    channel_dim: int = 1,
    shared_channels: bool = False,
    seeding: str = "uniform",
    scale: str = "expected",
    generator: torch.Generator | None = None,
    key: MaskKey | None = None,
) -> Tensor:
    r"""Zero contiguous blocks of each feature map at random (DropBlock), for any spatial rank.

    For every sample ``n`` and channel ``c`` the map ``input[n, c]`` (channel axis set by
    ``channel_dim``, every other non-batch dim spatial) gets its own mask: block seeds are drawn
    independently and every position inside a seed's block (a box of ``block_size``) is zeroed;
    kept positions are scaled. Dropping contiguous regions removes the spatially correlated
    evidence that plain dropout leaves behind (Ghiasi, Lin, Le, "DropBlock: A regularization
    method for convolutional networks", NeurIPS 2018, https://arxiv.org/abs/1810.12890).

    Calibration. With ``seeding="uniform"`` (default) seeds may sit wherever a block still
    overlaps the map (blocks are cut at the borders) and the seed rate is
    ``gamma = 1 - (1 - p) ** (1 / prod(block_size))``: every position, corner, edge or centre,
    is dropped with probability exactly ``p``. A block larger than the map works the same way
    (a seed then drops the part of the block inside the map) and keeps the rate exactly ``p``.
    ``block_size=1`` is elementwise dropout. With ``seeding="valid"`` seeds sit only where a
    whole block fits, as in the paper, and ``gamma`` is solved so that the *mean* drop rate
    over the map is ``p``; positions near the border are then dropped less often than the
    centre, by nature of the placement. A block larger than the map has no valid placement and
    raises ``ValueError``.

    Memory. No float mask is built. Per-channel masks are applied by zeroing the dropped
    positions of ``input * scale``; for backward autograd keeps the positions to zero as int32
    block-row offsets when they take at most 1/32 of the input's bytes, else the seed indices
    (about ``p / prod(block_size)`` of the positions), and never more than one byte per
    element (a bool mask, for tiny blocks at a high ``p``). A shared mask keeps one bool per
    sample and position. Under ``torch.compile`` a dense path is used instead (a full-size
    bool mask is kept).

    Args:
        input: a floating-point tensor ``(N, C, *spatial)`` with at least one spatial dim.
        p: probability of dropping each position, in ``[0, 1)``. Default: 0.1.
        block_size: side of a block, an int or a tuple with one entry per spatial dim (even and
            rectangular sizes work). Default: 7.
        training: apply DropBlock if ``True``; else return ``input`` unchanged. Default: True.
        inplace: write the result into ``input``. Default: False.
        channel_dim: the channel axis, any dim but 0; ``-1`` for channels-last. Default: 1.
        shared_channels: one mask per sample, shared by all channels, instead of one per
            (sample, channel). Default: False.
        seeding: ``"uniform"`` (exact rate ``p`` at every position) or ``"valid"`` (whole
            blocks only, mean rate ``p``). Default: ``"uniform"``.
        scale: ``"expected"`` multiplies kept elements by ``1 / (1 - p)`` (unbiased, since the
            drop rate is exact, and independent of the rest of the batch); ``"realized"``
            divides by each sample's own kept fraction, computed in float32 (a sample with
            nothing kept becomes all zeros); ``"none"`` does not rescale.
            Default: ``"expected"``.
        generator: the random number generator to draw from. Default: the global one.
        key: draw keyed masks instead (see :mod:`spatialdrop.keyed`): a sample's masks depend
            only on the key's seed, step, layer and the sample's id, the same on any device,
            dtype, batch split or world size. Not together with ``generator``. Default: None.

    Shape:
        - Input: :math:`(N, C, *)` or, with ``channel_dim=-1``, :math:`(N, *, C)`.
        - Output: the same shape, dtype and memory format as the input.

    Returns:
        The tensor with dropped blocks zeroed and kept elements scaled.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``, a bad ``block_size``, ``seeding`` or ``scale``,
            or ``seeding="valid"`` with a block larger than the map.
        TypeError: a non-float input or an argument of the wrong type.

    Examples:
        >>> import torch
        >>> from spatialdrop.functional import drop_block
        >>> g = torch.Generator().manual_seed(3)
        >>> y = drop_block(torch.ones(1, 1, 6, 8), p=0.2, block_size=3, generator=g)
        >>> (y > 0).long()[0, 0]  # 3 x 3 blocks, cut where they overlap the border
        tensor([[0, 0, 1, 0, 0, 0, 1, 1],
                [1, 1, 1, 0, 0, 0, 1, 1],
                [1, 1, 1, 1, 1, 1, 1, 1],
                [1, 1, 1, 1, 1, 1, 1, 1],
                [1, 1, 1, 1, 1, 1, 1, 1],
                [1, 1, 1, 0, 0, 0, 1, 1]])
        >>> y.max()  # kept elements scaled by 1 / (1 - p)
        tensor(1.2500)
        >>> drop_block(torch.randn(2, 16, 32), p=0.1, block_size=5).shape  # 1-D
        torch.Size([2, 16, 32])
        >>> drop_block(torch.randn(2, 4, 8, 8, 8), p=0.1, block_size=(3, 3, 2)).shape  # 3-D
        torch.Size([2, 4, 8, 8, 8])
    """
    fn = "drop_block"
    check_float_input(fn, input)
    p = check_p(fn, p, allow_one=False)
    check_min_rank(fn, input, 3, _LAYOUT)
    cd = check_channel_dim(fn, channel_dim, input.dim())
    blocks = check_sizes(fn, "block_size", block_size, input.dim() - 2)
    check_bool(fn, "training", training)
    check_bool(fn, "inplace", inplace)
    check_bool(fn, "shared_channels", shared_channels)
    check_choice(fn, "seeding", seeding, SEEDINGS)
    check_choice(fn, "scale", scale, SCALES)
    check_generator(fn, generator)
    check_key_arg(fn, key, generator, input.shape[0])
    geo = _Geometry(input, cd, blocks, shared_channels, seeding)
    if seeding == "valid" and any(b > s for b, s in zip(blocks, geo.sizes)):
        fail(
            fn,
            "block_size",
            f"at most the map size {geo.sizes} in every dim with seeding='valid' (no whole block "
            "fits otherwise; seeding='uniform' handles larger blocks)",
            block_size,
        )
    if not training or p == 0.0 or input.numel() == 0:
        return input
    compiling = _compiling()
    if seeding == "uniform":
        gamma = uniform_gamma(p, blocks)
    else:  # dynamo traces the solver (constant-folded); eager calls share a cache
        gamma = (solve_valid_gamma if compiling else valid_gamma)(p, geo.sizes, blocks)
    factor: float | None = None
    if scale == "expected":
        factor = float(torch.tensor(1.0 / (1.0 - p), dtype=float_dtype_of(input)))
    maps = geo.maps(input.shape[0])
    places = maps * math.prod(geo.grid)
    if compiling:
        return _drop_block_dense(
            input, gamma, factor, scale == "realized", geo, inplace, places, generator, key
        )
    with torch.no_grad():
        seeds = _draw_seeds(places, gamma, generator, input.device, dense=False, key=key)
    if not geo.shared:
        out: Tensor = _SeedMaskFunction.apply(input, seeds, factor, scale == "realized", geo, inplace)
        return out
    with torch.no_grad():
        keep = torch.ones((maps, *geo.sizes), dtype=torch.bool, device=input.device)
        map_offsets = torch.arange(maps, device=input.device).mul_(math.prod(geo.sizes))
        paint_blocks(
            keep, False, seeds, geo.grid, geo.shift, geo.sizes, geo.blocks, map_offsets, keep.stride()[1:]
        )
        per_sample: Tensor | None = None
        if scale == "realized":
            counts = (~keep).sum(dim=tuple(range(1, keep.dim())), dtype=torch.int64)
            per_sample = _realized_factor(counts, math.prod(geo.sizes), input).view(-1)
    out = _SharedMaskFunction.apply(input, keep, per_sample, factor, geo, inplace)
    return out


def _drop_block_dense(
    input: Tensor,
    gamma: float,
    factor: float | None,
    realized: bool,
    geo: _Geometry,
    inplace: bool,
    places: int,
    generator: torch.Generator | None,
    key: MaskKey | None,
) -> Tensor:
    """The static-shape path used under ``torch.compile``: dense seed grid, grown blocks."""
    n = input.shape[0]
    maps = geo.maps(n)
    with torch.no_grad():
        grid = _draw_seeds(places, gamma, generator, input.device, dense=True, key=key)
        grid = grid.view((maps, *geo.grid))
        keep = ~grow_blocks(grid, geo.sizes, geo.blocks, geo.shift)
        keep = keep.view((n, 1 if geo.shared else geo.channels, *geo.sizes)).movedim(1, geo.channel_dim)
        mult: float | Tensor | None = factor
        if realized:
            kept = keep.sum(dim=tuple(range(1, keep.dim())), dtype=torch.int64)
            per_map = math.prod(keep.shape[1:])
            mult = _realized_factor(per_map - kept, per_map, input).to(input.dtype)
    scaled = input if mult is None else input * mult
    out = torch.where(keep, scaled, torch.zeros((), dtype=input.dtype, device=input.device))
    if inplace:
        return input.copy_(out)
    return out


# --- modules -------------------------------------------------------------------------------


def _check_block_size(fn: str, block_size: Any, n: int | None) -> BlockSize:
    """Validate ``block_size`` at construction; the length is checked per call when ``n`` is None."""
    if n is not None:
        check_sizes(fn, "block_size", block_size, n)
    elif isinstance(block_size, (tuple, list)):
        check_sizes(fn, "block_size", block_size, len(block_size))
    elif isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        fail(fn, "block_size", "a positive int or a tuple of positive ints", block_size, kind=TypeError)
    elif block_size < 1:
        fail(fn, "block_size", "a positive int or a tuple of positive ints", block_size)
    return tuple(int(b) for b in block_size) if isinstance(block_size, (tuple, list)) else int(block_size)


class DropBlock(StructuredDropout):
    r"""DropBlock for input of any spatial rank (batched only).

    See :func:`spatialdrop.functional.drop_block`: blocks of ``block_size`` are zeroed in every
    ``input[n, c]`` map so that each position is dropped with probability ``p``; kept elements
    are scaled. Eval mode is the identity.

    Args:
        p: probability of dropping each position, in ``[0, 1)``. Default: 0.1.
        block_size: side of a block, an int or one int per spatial dim. Default: 7.
        inplace: write the result into the input. Default: False.
        shared_channels: one mask per sample shared by all channels. Default: False.
        seeding: ``"uniform"`` or ``"valid"``. Default: ``"uniform"``.
        scale: ``"expected"``, ``"realized"`` or ``"none"``. Default: ``"expected"``.
        channel_dim: the channel axis (never 0, the batch); ``-1`` for channels-last. Default: 1.

    Shape:
        - Input: :math:`(N, C, *)` or, with ``channel_dim=-1``, :math:`(N, *, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import DropBlock
        >>> m = DropBlock(0.1, block_size=(3, 5, 5, 5))
        >>> m(torch.randn(2, 3, 8, 10, 10, 10)).shape  # 4 spatial dims
        torch.Size([2, 3, 8, 10, 10, 10])
    """

    allow_p_one = False
    block_size: BlockSize
    shared_channels: bool
    seeding: str
    scale: str

    def __init__(
        self,
        p: float = 0.1,
        block_size: BlockSize = 7,
        inplace: bool = False,
        *,
        shared_channels: bool = False,
        seeding: str = "uniform",
        scale: str = "expected",
        channel_dim: int = 1,
    ) -> None:
        super().__init__(p, inplace, channel_dim=channel_dim)
        name = type(self).__name__
        self.block_size = _check_block_size(name, block_size, self.spatial_dims)
        self.shared_channels = check_bool(name, "shared_channels", shared_channels)
        self.seeding = check_choice(name, "seeding", seeding, SEEDINGS)
        self.scale = check_choice(name, "scale", scale, SCALES)

    def forward(self, input: Tensor) -> Tensor:
        """Apply :func:`~spatialdrop.functional.drop_block` with this module's settings."""
        x, unbatched = self.batched(input)
        out = drop_block(
            x,
            self.p,
            self.block_size,
            self.training,
            self.inplace,
            channel_dim=self.channel_dim,
            shared_channels=self.shared_channels,
            seeding=self.seeding,
            scale=self.scale,
            key=self.mask_key(x.shape[0], x.device),
        )
        return squeeze_if(out, unbatched)

    def extra_options(self) -> dict[str, Any]:
        """``block_size``, ``seeding``, ``scale`` and ``shared_channels`` for ``repr``."""
        return {
            "block_size": self.block_size,
            "seeding": self.seeding,
            "scale": self.scale,
            "shared_channels": self.shared_channels,
        }


class DropBlock1d(DropBlock):
    r"""DropBlock for sequences: zeroes runs of ``block_size`` steps in ``(N, C, L)`` or ``(C, L)``.

    Args:
        p: probability of dropping each position, in ``[0, 1)``. Default: 0.1.
        block_size: length of a dropped run. Default: 7.
        inplace: write the result into the input. Default: False.
        shared_channels: one mask per sample shared by all channels. Default: False.
        seeding: ``"uniform"`` or ``"valid"``. Default: ``"uniform"``.
        scale: ``"expected"``, ``"realized"`` or ``"none"``. Default: ``"expected"``.
        channel_dim: the channel axis of the batched layout, 1 or 2 (-1). Default: 1.

    Shape:
        - Input: :math:`(N, C, L)` or unbatched :math:`(C, L)`; with ``channel_dim=-1``
          :math:`(N, L, C)` or :math:`(L, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import DropBlock1d
        >>> torch.manual_seed(4)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> y = DropBlock1d(0.3, block_size=4)(torch.ones(1, 20))  # unbatched (C, L)
        >>> (y > 0).long()  # a run of 4, and one cut by the end of the sequence
        tensor([[1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]])
    """

    spatial_dims = 1


class DropBlock2d(DropBlock):
    r"""DropBlock for images: zeroes ``block_size`` squares in ``(N, C, H, W)`` or ``(C, H, W)``.

    Unlike ``torchvision.ops.DropBlock2d`` every position is dropped with probability exactly
    ``p`` (corners included), masks are per channel by default, and the scale does not depend
    on the rest of the batch.

    Args:
        p: probability of dropping each position, in ``[0, 1)``. Default: 0.1.
        block_size: side of a block, an int or ``(h, w)``. Default: 7.
        inplace: write the result into the input. Default: False.
        shared_channels: one mask per sample shared by all channels. Default: False.
        seeding: ``"uniform"`` or ``"valid"``. Default: ``"uniform"``.
        scale: ``"expected"``, ``"realized"`` or ``"none"``. Default: ``"expected"``.
        channel_dim: the channel axis of the batched layout. Default: 1.

    Shape:
        - Input: :math:`(N, C, H, W)` or unbatched :math:`(C, H, W)`; with ``channel_dim=-1``
          :math:`(N, H, W, C)` or :math:`(H, W, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import DropBlock2d
        >>> m = DropBlock2d(0.1, block_size=5)
        >>> m
        DropBlock2d(p=0.1, inplace=False, block_size=5, seeding='uniform', scale='expected',
                    shared_channels=False)
        >>> m(torch.randn(8, 64, 28, 28)).shape
        torch.Size([8, 64, 28, 28])
    """

    spatial_dims = 2


class DropBlock3d(DropBlock):
    r"""DropBlock for volumes: zeroes ``block_size`` cubes in ``(N, C, D, H, W)`` or ``(C, D, H, W)``.

    Args:
        p: probability of dropping each position, in ``[0, 1)``. Default: 0.1.
        block_size: side of a block, an int or ``(d, h, w)``. Default: 7.
        inplace: write the result into the input. Default: False.
        shared_channels: one mask per sample shared by all channels. Default: False.
        seeding: ``"uniform"`` or ``"valid"``. Default: ``"uniform"``.
        scale: ``"expected"``, ``"realized"`` or ``"none"``. Default: ``"expected"``.
        channel_dim: the channel axis of the batched layout. Default: 1.

    Shape:
        - Input: :math:`(N, C, D, H, W)` or unbatched :math:`(C, D, H, W)`; with
          ``channel_dim=-1`` :math:`(N, D, H, W, C)` or :math:`(D, H, W, C)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from spatialdrop import DropBlock3d
        >>> DropBlock3d(0.1, block_size=(1, 3, 3), shared_channels=True)(torch.randn(2, 8, 4, 16, 16)).shape
        torch.Size([2, 8, 4, 16, 16])
    """

    spatial_dims = 3
