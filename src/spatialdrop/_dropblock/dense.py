"""DropBlock's dense, static-shape path: a dense seed grid, blocks grown by windowed ORs.

No data-dependent shape and no device-to-host read: it serves devices without the fused Triton
kernel, meta tensors, ``torch.export``/ONNX export, and CPU input when the tests force the
static path. It is composed of torch ops, so autograd differentiates it (it saves the bool keep
mask: a byte per element) and the compiler sees through it. The same seeds give the same
output as the sparse path, bit for bit (the same scale policy, :mod:`.scale`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._compat import is_compiling
from ..keyed import MaskKey
from . import seeds as _seeds
from .calibration import seed_rate
from .geometry import Geometry, grow_blocks
from .scale import scale_factor, scaled

__all__ = ["drop_block_dense"]


def drop_block_dense(
    input: Tensor,
    p: float,
    geo: Geometry,
    seeding: str,
    scale: str,
    generator: torch.Generator | None,
    key: MaskKey | None,
) -> Tensor:
    """DropBlock with static shapes and no device-to-host read: dense seed grid, grown blocks.

    The output has the input's dtype and the layout ``torch.empty_like(input)`` gives (the
    memory format of a channels-last input, the strides of any dense one).
    """
    gamma = seed_rate(p, geo.sizes, geo.blocks, seeding, cached=not is_compiling())
    with torch.no_grad():
        grid = _seeds.draw_grid(geo.places, gamma, generator, input.device, dense=True, key=key)
        blocks = grow_blocks(grid.view((geo.maps, *geo.grid)), geo).reshape(geo.map_shape)
        dropped = None
        if scale == "realized":  # counted over the map (channels once for a shared mask)
            dropped = blocks.sum(dim=tuple(range(1, blocks.dim())), dtype=torch.int64)
        factor = scale_factor(scale, p, dropped, math.prod(geo.map_shape[1:]), input)
        # the keep mask laid out like the output, so that every elementwise op below keeps it
        keep = torch.empty_like(input, dtype=torch.bool)
        kept = blocks.logical_not()
        if geo.channel_dim != 1:  # no identity permute: inductor cannot order its symbolic strides
            kept = kept.movedim(1, geo.channel_dim)
        keep.copy_(kept)
    product = scaled(input, factor)
    out = torch.where(keep, product, torch.zeros((), dtype=product.dtype, device=product.device))
    return out.to(input.dtype)
