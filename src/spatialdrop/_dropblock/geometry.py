"""Where a DropBlock seed's block lands: the geometry object and the write plans."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._compat import is_compiling
from .._validation import fail

__all__ = [
    "MAX_PLACES",
    "Geometry",
    "Plan",
    "apply_plan",
    "block_plan",
    "check_representable",
    "geometry",
    "grid_coords",
    "grow_blocks",
    "is_dense",
    "map_offsets",
    "paint_blocks",
    "run_lengths",
]

# Seed indices are found by a float64 running sum of geometric gaps, exact below 2**53; so is
# every seed grid we accept (and it then fits int64 with room for offsets).
MAX_PLACES = 1 << 53


class Geometry:
    """Sizes of the map, the blocks and the seed grid, and where a seed's block lands.

    Args:
        shape: the batched input's shape ``(N, ...)``.
        channel_dim: the channel axis (normalised, positive).
        blocks: the block side per spatial dim.
        shared: one mask per sample instead of one per (sample, channel).
        seeding: ``"uniform"`` (seeds wherever a block overlaps the map: ``L + b - 1`` places
            per dim) or ``"valid"`` (whole blocks only: ``L - b + 1`` places).

    Attributes:
        spatial: the spatial dims of the input; ``sizes``: their sizes ``L``.
        grid: the seed grid's shape per map; ``shift``: added to a grid index to give the
            uniform-seeding index ``j`` (the seed at ``j`` drops ``[j - b + 1, j]`` of ``[0, L)``).
        maps: the number of independent masks (``N`` or ``N * C``); ``places``: seed places in all.
    """

    __slots__ = (
        "batch",
        "blocks",
        "channel_dim",
        "channels",
        "grid",
        "maps",
        "places",
        "shared",
        "shift",
        "sizes",
        "spatial",
    )

    def __init__(
        self, shape: Sequence[int], channel_dim: int, blocks: Sequence[int], shared: bool, seeding: str
    ) -> None:
        self.channel_dim = channel_dim
        self.spatial = tuple(d for d in range(1, len(shape)) if d != channel_dim)
        self.sizes = tuple(shape[d] for d in self.spatial)
        self.blocks = tuple(int(b) for b in blocks)
        self.batch = shape[0]
        self.channels = shape[channel_dim]
        self.shared = shared
        if seeding == "uniform":
            self.grid = tuple(s + b - 1 for s, b in zip(self.sizes, self.blocks))
            self.shift = (0,) * len(self.blocks)
        else:
            self.grid = tuple(s - b + 1 for s, b in zip(self.sizes, self.blocks))
            self.shift = tuple(b - 1 for b in self.blocks)
        self.maps = self.batch if shared else self.batch * self.channels
        self.places = self.maps * math.prod(self.grid)

    @property
    def map_shape(self) -> tuple[int, ...]:
        """``(N, C or 1, *sizes)``: the mask's shape with the channel axis at dim 1."""
        return (self.batch, 1 if self.shared else self.channels, *self.sizes)


_cached = functools.lru_cache(maxsize=256)(Geometry)  # one object per distinct set of arguments


def geometry(
    shape: Sequence[int], channel_dim: int, blocks: Sequence[int], shared: bool, seeding: str
) -> Geometry:
    """``Geometry(shape, ...)``, one object per distinct set of arguments (read it, never change it).

    A training loop calls every layer on the same few shapes, and each call needs the geometry
    two or three times (validation, forward, backward): built once, not each time. Not while
    ``torch.compile`` traces (sizes may be symbolic, and dynamo does not trace through a cache):
    a new object each call, which the compiled graph does not keep anyway.
    """
    if not is_compiling() and all(type(s) is int for s in shape) and all(type(b) is int for b in blocks):
        return _cached(tuple(shape), channel_dim, tuple(blocks), shared, seeding)
    return Geometry(shape, channel_dim, blocks, shared, seeding)


def check_representable(fn: str, geo: Geometry, block_size: object) -> None:
    """Raise ``ValueError`` naming ``block_size`` when the seed grid has too many places.

    A grid of more than ``2**53`` places (for instance a block of ``2**31`` on a 2-D map) cannot
    be sampled exactly (nor, past ``2**63``, indexed); refuse it before any work.
    """
    if geo.places > MAX_PLACES:
        fail(
            fn,
            "block_size",
            f"small enough that the seed grid (map size + block_size - 1 per dim, times {geo.maps} "
            f"maps) has at most 2**53 places; it would have {geo.places}",
            block_size,
        )


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill its storage span exactly once, in any order of dims.

    Write plans address storage offsets, so they apply to such a tensor only.
    """
    if t.is_contiguous():  # the common case, at the cost of one C call
        return True
    # Sort-free (dynamo cannot sort SymInt tuples): each dim's stride is the product of the sizes
    # of the dims with smaller strides, and no two dims share a stride.
    dims = [(st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1]
    for i, (stride, _) in enumerate(dims):
        expected = 1
        for j, (other, size) in enumerate(dims):
            if j != i and other == stride:
                return False
            if other < stride:
                expected *= size
        if stride != expected:
            return False
    return True


def _positions(j: Tensor, shift: int, size: int, b: int, stride: int) -> Tensor:
    """Storage offsets ``(min(b, L), S)`` along one dim of the positions each of ``S`` seeds drops.

    The seed at uniform index ``j`` (grid index plus ``shift``) drops ``[j - b + 1, j]`` cut to
    ``[0, L)``; a cut block repeats its border position, which is harmless. The seeds are the
    last (contiguous) dim, so every elementwise op runs over long rows.
    """
    if b <= size:
        # clamp after scaling by the stride (monotone): one pass fewer
        span = torch.arange(b - 1 - shift, -1 - shift, -1, device=j.device).mul_(stride)
        return (j * stride).unsqueeze(0).sub(span.unsqueeze(1)).clamp_(0, (size - 1) * stride)
    # the block covers at most the whole map: positions lo .. hi, L of them with repeats
    j = j + shift
    lo = (j - (b - 1)).clamp_(min=0)
    hi = j.clamp(max=size - 1)
    span = torch.arange(size, device=j.device).unsqueeze(1)
    return torch.minimum(lo.unsqueeze(0) + span, hi.unsqueeze(0)).mul_(stride)


def grid_coords(seeds: Tensor, grid: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """``(map index, [coordinate per grid dim])`` of flat seed indices into ``(maps, *grid)``."""
    rest = seeds
    coords: list[Tensor] = []
    for g in reversed(grid):
        coords.append(rest % g)
        rest = rest // g
    coords.reverse()
    return rest, coords


# A plan says where to write: for each run length ``w``, the storage offsets where a run of ``w``
# positions along the last spatial dim starts.
Plan = list[tuple[int, Tensor]]


def run_lengths(run: int) -> list[int]:
    """The window lengths used for runs of at most ``run`` positions."""
    return [1 << i for i in range(run.bit_length()) if 1 << i < run] + [run]


def map_offsets(target: Tensor, geo: Geometry) -> Tensor:
    """Storage offset (relative to ``target``'s start) of position 0 of each of ``geo``'s maps."""
    n = torch.arange(target.shape[0], device=target.device).mul_(target.stride(0))
    if geo.shared:
        return n
    c = torch.arange(geo.channels, device=target.device).mul_(target.stride(geo.channel_dim))
    return (n.unsqueeze(1) + c).reshape(-1)


def block_plan(seeds: Tensor, geo: Geometry, offsets: Tensor, strides: Sequence[int]) -> Plan:
    """Where to write so as to cover every position dropped by the given seeds.

    Args:
        seeds: flat int64 indices into the seed grid of shape ``(maps, *geo.grid)``.
        geo: the geometry.
        offsets: storage offset (from the target's start) of position 0 of each map.
        strides: the target's stride along each spatial dim.

    Returns:
        A list of ``(w, starts)``: write runs of ``w`` positions along the last spatial dim,
        starting at the storage offsets ``starts`` (int64, seed by seed).
        A block's run along the last dim is written whole when the border does not cut it, and
        as two overlapping power-of-2 windows when it does; the other dims are expanded row by
        row. The work is proportional to the number of seeds times the block's cross-section:
        per seed, never per map position, and it does not grow with the block's last side.
    """
    rest, coords = grid_coords(seeds, geo.grid)
    j = coords[-1] + geo.shift[-1] if geo.shift[-1] else coords[-1]
    size, b, st = geo.sizes[-1], geo.blocks[-1], strides[-1]
    lo = (j - (b - 1)).clamp_(min=0)
    hi = j.clamp(max=size - 1)
    run = min(b, size)
    first = offsets.index_select(0, rest).add_(lo * st)
    outer = coords[:-1]
    if run == 1:
        groups: list[tuple[int, Tensor | None]] = [(1, None)]
    else:
        # the window of a run of n positions: the run itself if whole, else a power of 2
        windows = [run if n == run else 1 << (n.bit_length() - 1) for n in range(1, run + 1)]
        table = torch.tensor([0, *windows], device=seeds.device)
        width = table.index_select(0, hi - lo + 1)
        # the second window of a cut run ends at hi
        second = first + (hi - lo - width + 1).mul_(st)
        groups = [(w, (width == w).nonzero().squeeze(1)) for w in run_lengths(run)]
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
        for c, s, n, k, stride in zip(cs, geo.shift, geo.sizes, geo.blocks, strides):
            pos = _positions(c, s, n, k, stride)  # heads[..., s] + pos[k, s]: a tensor (k, ..., S)
            heads = heads.unsqueeze(0) + pos.view(pos.shape[0], *[1] * (heads.dim() - 1), pos.shape[1])
        # built seed-last (long inner rows); written seed by seed in storage order (locality)
        plan.append((w, heads.permute(tuple(range(heads.dim() - 1, -1, -1))).reshape(-1)))
    return plan


# Whether ``index_fill_`` may write through a self-overlapping window view (torch 2.x allows it;
# should a future version refuse, the first refusal switches to one offset per element).
_window_views = True


def _flat(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor's storage stretch, indexed by storage offset."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def apply_plan(target: Tensor, value: float | bool | None, plan: Plan, last_stride: int) -> None:
    """Write ``value`` into the dense tensor ``target`` at the runs given by ``plan``.

    A run of ``w`` positions is one row of an overlapping window view of ``target``'s storage
    (rows start one element apart, a row steps by ``last_stride``), so ``index_fill_`` writes
    it from its first offset alone. Overlapping rows only write the same value twice.

    ``value=None`` drops the values there: each becomes ``x * 0`` (NaN where ``x`` is NaN or
    infinite, as torch's dropout multiplies; an element dropped twice gets the same bits).
    """
    global _window_views
    for w, heads in plan:
        index = heads.long()
        if value is None:
            # in slices of at most 1/64 of the target's elements, so that the positions and the
            # values read (not written in place) stay far below a full-size temporary
            flat = _flat(target)
            span = torch.arange(w, device=index.device).mul_(last_stride)
            step = max(1, max(1024, target.numel() // 64) // w)
            for part in index.split(step):
                at = (part.unsqueeze(1) + span).reshape(-1)
                flat.index_copy_(0, at, flat.index_select(0, at).mul_(0))
            continue
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


def paint_blocks(target: Tensor, value: float | bool | None, seeds: Tensor, geo: Geometry) -> None:
    """Write ``value`` into ``target`` at every position the seeds drop (``None``: see :func:`apply_plan`).

    ``target`` is dense, in ``geo``'s input layout or shaped ``(maps, *sizes)``.
    """
    if target.dim() == len(geo.sizes) + 1:  # (maps, *sizes)
        offsets = torch.arange(target.shape[0], device=target.device).mul_(target.stride(0))
        strides: Sequence[int] = target.stride()[1:]
    else:
        offsets = map_offsets(target, geo)
        strides = [target.stride(d) for d in geo.spatial]
    apply_plan(target, value, block_plan(seeds, geo, offsets, strides), strides[-1])


def grow_blocks(grid: Tensor, geo: Geometry) -> Tensor:
    """Dense mask of dropped positions from a dense bool seed grid of shape ``(maps, *geo.grid)``.

    Each spatial dim is a windowed OR of width ``b`` done by log-doubling (``log2(b) + 1``
    passes), so the cost does not grow with the block area. Valid-seeding grids (``shift``
    ``b - 1``) are first placed in a zero uniform-sized grid.
    """
    out = grid
    for axis, (size, b, s) in enumerate(zip(geo.sizes, geo.blocks, geo.shift), start=1):
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
