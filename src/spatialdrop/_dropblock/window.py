"""DropBlock of a window of larger maps: a shard of a DTensor gets its part of the global mask.

A rank that holds channels ``[c0, c0 + lc)`` and, per spatial dim, positions ``[s, s + l)`` of
maps of ``C`` channels and sizes ``L`` draws the seeds of its samples' *global* seed grid (the
keyed rule makes a sample's seeds a function of its key alone, and the seed rate is calibrated
on the global map), keeps those whose block reaches the window (blocks cross shard borders: the
seeds of the halo come from global coordinates, with no communication) and places them in the
window's own grid. A window of ``l`` positions and a block of ``b`` behave like a map of size
``l`` under uniform seeding, whose seed at (uniform) index ``j - s`` drops ``[j - s - b + 1,
j - s]`` cut to ``[0, l)``: the global seed at uniform index ``j`` (``g + b - 1`` for a valid
seeding grid index ``g``) reaches the window iff ``0 <= j - s < l + b - 1``. So the window is
DropBlocked by the usual code with *local* geometry (:func:`local_geometry`, uniform seeding)
and these seeds, and the result is the window of the global mask, bit for bit.

A window is passed to the ops as a list of ints: ``[C, c0, L_1, s_1, L_2, s_2, ...]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .geometry import Geometry, grid_coords

__all__ = ["global_geometry", "local_geometry", "localize_dense", "localize_sparse", "window_of"]


def window_of(channels: int, channel_start: int, sizes: Sequence[int], starts: Sequence[int]) -> list[int]:
    """The op argument ``[C, c0, L_1, s_1, ...]`` of a window (global channels and sizes, starts)."""
    out = [int(channels), int(channel_start)]
    for size, start in zip(sizes, starts):
        out += [int(size), int(start)]
    return out


def _split(window: Sequence[int]) -> tuple[int, int, list[int], list[int]]:
    return int(window[0]), int(window[1]), [int(v) for v in window[2::2]], [int(v) for v in window[3::2]]


def global_geometry(geo: Geometry, seeding: str, window: Sequence[int]) -> Geometry:
    """The geometry of the global maps of the window ``geo``'s samples (its batch, global C and L)."""
    channels, _, sizes, _ = _split(window)
    shape = [geo.batch] * (len(geo.sizes) + 2)
    shape[geo.channel_dim] = channels
    for d, size in zip(geo.spatial, sizes):
        shape[d] = size
    return Geometry(shape, geo.channel_dim, geo.blocks, geo.shared, seeding)


def local_geometry(
    local_shape: Sequence[int], channel_dim: int, blocks: Sequence[int], shared: bool
) -> Geometry:
    """The window's own geometry: local sizes, uniform seeding (see the module docstring)."""
    return Geometry(local_shape, channel_dim, blocks, shared, "uniform")


def localize_sparse(seeds: Tensor, geo_g: Geometry, geo_l: Geometry, window: Sequence[int]) -> Tensor:
    """Sorted flat indices into ``geo_l``'s grid of the global ``seeds`` whose blocks reach the window."""
    _, c0, _, starts = _split(window)
    rest, coords = grid_coords(seeds, geo_g.grid)
    keep = torch.ones_like(seeds, dtype=torch.bool)
    if geo_g.shared:
        flat = rest  # the local sample
    else:
        sample, channel = rest // geo_g.channels, rest % geo_g.channels - c0
        keep &= (channel >= 0) & (channel < geo_l.channels)
        flat = sample * geo_l.channels + channel
    for coord, shift, start, places in zip(coords, geo_g.shift, starts, geo_l.grid):
        j = coord + (shift - start)  # the uniform index in the window's grid of l + b - 1 places
        keep &= (j >= 0) & (j < places)
        flat = flat * places + j
    return flat[keep]  # ascending: the order of the global grid restricted to the window


def localize_dense(grid: Tensor, geo_g: Geometry, geo_l: Geometry, window: Sequence[int]) -> Tensor:
    """The window's dense seed grid ``(maps_l, *geo_l.grid)`` from the global dense ``grid``."""
    _, c0, _, starts = _split(window)
    g = grid.view((geo_g.batch, 1 if geo_g.shared else geo_g.channels, *geo_g.grid))
    if not geo_g.shared:
        g = g.narrow(1, c0, geo_l.channels)
    for axis, (shift, start, places) in enumerate(zip(geo_g.shift, starts, geo_l.grid), start=2):
        if shift:  # a valid-seeding grid: pad to uniform indices (no seed in the first and last b - 1)
            pad = list(g.shape)
            pad[axis] = shift
            zeros = g.new_zeros(pad)
            g = torch.cat([zeros, g, zeros], dim=axis)
        g = g.narrow(axis, start, places)  # the window's uniform grid: l + b - 1 places
    return g.reshape((geo_l.maps, *geo_l.grid))
