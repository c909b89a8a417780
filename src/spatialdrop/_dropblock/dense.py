"""DropBlock's dense, static-shape path: a dense seed grid, blocks grown by windowed ORs.

No data-dependent shape and no device-to-host read (where it runs: the table in :mod:`.ops`).
It is composed of torch ops, so autograd differentiates it (it saves the bool keep mask: a byte
per element) and the compiler sees through it.

Under ``torch.compile`` the seed rate and the keyed seed grid depend on ``p`` through host
arithmetic (the calibration's bisection, the keyed rule's chunk length and integer thresholds),
which would pin ``p`` in the graph and recompile it for every new ``p`` of a schedule. There the
draw goes through two small opaque ops that take ``p`` as a float64 CPU tensor and do that
arithmetic on the host, exactly as eager mode does: ``spatialdrop::seed_rate`` (unkeyed: the
grid is ``rand < gamma``) and ``spatialdrop::keyed_seed_grid`` (the keyed rule's dense form).
Exported programs hold no custom op: export takes the plain functions (its ``p`` is a constant).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ..keyed import MaskKey
from . import sampling
from .calibration import p_tensor, seed_rate
from .geometry import Geometry, grow_blocks
from .scale import scale_factor, scaled
from .sparse import KeyWords
from .window import global_geometry, localize_dense

__all__ = ["drop_block_dense", "keyed_seed_grid", "seed_rate_op"]


@torch.library.custom_op("spatialdrop::seed_rate", mutates_args=())
def seed_rate_op(p: Tensor, sizes: list[int], blocks: list[int], seeding: str) -> Tensor:
    """The seed rate ``gamma`` of ``p`` (a float64 CPU tensor), as a float64 0-dim CPU tensor."""
    return torch.tensor(seed_rate(float(p), tuple(sizes), tuple(blocks), seeding), dtype=torch.float64)


@seed_rate_op.register_fake
def _(p: Tensor, sizes: list[int], blocks: list[int], seeding: str) -> Tensor:
    return p.new_empty((), dtype=torch.float64)


@torch.library.custom_op("spatialdrop::keyed_seed_grid", mutates_args=())
def keyed_seed_grid(
    p: Tensor,
    sizes: list[int],
    blocks: list[int],
    seeding: str,
    numel: int,
    key_words: list[int],
    step: Tensor,
    sample_ids: Tensor,
) -> Tensor:
    """The keyed dense seed grid (bool, ``numel`` places, on the ids' device) for ``p`` (a CPU tensor)."""
    gamma = seed_rate(float(p), tuple(sizes), tuple(blocks), seeding)
    key = KeyWords(key_words, step, sample_ids).key()
    return sampling.draw_grid(numel, gamma, None, sample_ids.device, dense=True, key=key)


@keyed_seed_grid.register_fake
def _(p: Tensor, sizes: list[int], blocks: list[int], seeding: str, numel: int, *key: Any) -> Tensor:
    return torch.empty((numel,), dtype=torch.bool, device=key[-1].device)  # the sample ids' device


def _seed_grid(
    p: float,
    geo: Geometry,
    seeding: str,
    generator: Optional[torch.Generator],
    key: Optional[MaskKey],
    device: torch.device,
    p_as_tensor: bool,
) -> Tensor:
    """The dense bool seed grid of ``geo.places`` places (see the module docstring)."""
    if not p_as_tensor:
        gamma = seed_rate(p, geo.sizes, geo.blocks, seeding)
        return sampling.draw_grid(geo.places, gamma, generator, device, dense=True, key=key)
    sizes, blocks = list(geo.sizes), list(geo.blocks)
    if key is None:  # the rate from an op (p a tensor), the draw as in eager mode
        rate = seed_rate_op(p_tensor(p), sizes, blocks, seeding)
        return sampling.draw_grid(geo.places, rate, generator, device, dense=True)
    words, step, _ = KeyWords.of(key)
    ids = key.sample_ids.to(device=device, dtype=torch.int64)
    return keyed_seed_grid(p_tensor(p), sizes, blocks, seeding, geo.places, words, step, ids)


def drop_block_dense(
    input: Tensor,
    p: float,
    geo: Geometry,
    seeding: str,
    scale: str,
    generator: torch.Generator | None,
    key: MaskKey | None,
    window: list[int] | None = None,
    p_as_tensor: bool = False,
) -> Tensor:
    """DropBlock with static shapes and no device-to-host read: dense seed grid, grown blocks.

    The output has the input's dtype and the layout ``torch.empty_like(input)`` gives (the
    memory format of a channels-last input, the strides of any dense one). With a ``window``
    (see :mod:`.window`) ``geo`` is the local geometry and the seeds come from the global grid.
    ``p_as_tensor`` (under ``torch.compile``, not export): the seed rate and the scale computed
    from ``p`` as a tensor, so that a new ``p`` does not recompile (see the module docstring).
    """
    with torch.no_grad():
        geo_g = geo if window is None else global_geometry(geo, seeding, window)
        grid = _seed_grid(p, geo_g, seeding, generator, key, input.device, p_as_tensor)
        if window is not None:
            grid = localize_dense(grid, geo_g, geo, window)
        blocks = grow_blocks(grid.view((geo.maps, *geo.grid)), geo).reshape(geo.map_shape)
        dropped = None
        if scale == "realized":  # counted over the map (channels once for a shared mask)
            dropped = blocks.sum(dim=tuple(range(1, blocks.dim())), dtype=torch.int64)
        factor = scale_factor(scale, p, dropped, math.prod(geo.map_shape[1:]), input, p_as_tensor)
        # the keep mask laid out like the output, so that every elementwise op below keeps it
        keep = torch.empty_like(input, dtype=torch.bool)
        kept = blocks.logical_not()
        if geo.channel_dim != 1:  # no identity permute: inductor cannot order its symbolic strides
            kept = kept.movedim(1, geo.channel_dim)
        keep.copy_(kept)
    product = scaled(input, factor)
    out = product * keep  # x * 0 where dropped: NaN stays NaN, as on every path
    return out.to(input.dtype)
