"""DropBlock's sparse path: the custom ops ``spatialdrop::drop_block_maps`` and ``drop_block_shared``.

Seeds are drawn sparsely (data-dependent sizes) and only the dropped positions are written, per
seed rather than per position. The compiler sees one opaque op, so ``torch.compile`` runs exactly
the eager code. Randomness comes in as an int64 ``seed`` tensor (drawn by the caller with
``torch.randint`` from its generator) that seeds a private generator inside the op, or as a key.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from .._philox import MASK32
from ..keyed import MaskKey
from . import seeds as _seeds
from .calibration import seed_rate
from .geometry import Geometry, apply_plan, block_plan, map_offsets, paint_blocks
from .scale import scale_factor, scaled

__all__ = ["drop_block_maps", "drop_block_shared"]


# --- the sparse path: custom ops --------------------------------------------------------------


def _op_key(key_words: Optional[list[int]], step: Optional[Tensor], sample_ids: Optional[Tensor]) -> MaskKey:
    assert key_words is not None
    assert step is not None
    assert sample_ids is not None
    seed = key_words[0] | (key_words[1] << 32)
    layer = key_words[2] | (key_words[3] << 32)
    return MaskKey(seed, int(step) & MASK32, layer, sample_ids)


def _sparse(
    input: Tensor,
    seed: Optional[Tensor],
    p_tensor: Tensor,
    block_size: list[int],
    channel_dim: int,
    shared: bool,
    seeding: str,
    scale: str,
    key_words: Optional[list[int]],
    step: Optional[Tensor],
    sample_ids: Optional[Tensor],
    keep_plan: Optional[list[Any]] = None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """The body of both custom ops: ``input * scale`` with every seed's block zeroed.

    ``p`` comes as a float64 0-dim tensor, so that a ``p`` that changes every step (a schedule)
    does not specialise a compiled graph. With ``keep_plan`` (eager per-channel calls), the write
    plan and the factor are appended to it, for a backward that reuses them. ``out`` (dense, the
    input's shape) receives the result; default: a new tensor like the input.
    """
    p = float(p_tensor)
    geo = Geometry(input.shape, channel_dim, block_size, shared, seeding)
    gamma = seed_rate(p, geo.sizes, geo.blocks, seeding)
    if out is None:
        out = torch.empty_like(input)
    if out.numel() == 0:
        return out
    if key_words is None:
        assert seed is not None
        generator: torch.Generator | None = torch.Generator(device=input.device).manual_seed(int(seed))
        key = None
    else:
        generator, key = None, _op_key(key_words, step, sample_ids)
    seeds = _seeds.draw_grid(geo.places, gamma, generator, input.device, dense=False, key=key)
    if not shared:
        strides = [out.stride(d) for d in geo.spatial]
        plan = block_plan(seeds, geo, map_offsets(out, geo), strides)
        dropped = None
        if scale == "realized":  # the kept count needs the union of the blocks: paint them once
            mask = torch.zeros_like(out, dtype=torch.uint8)
            apply_plan(mask, 1, plan, strides[-1])
            dropped = mask.sum(dim=tuple(range(1, out.dim())), dtype=torch.int64)
        factor = scale_factor(scale, p, dropped, math.prod(input.shape[1:]), input)
        scaled(input, factor, out)
        apply_plan(out, 0, plan, strides[-1])
        if keep_plan is not None:
            keep_plan.extend((plan, factor, strides[-1]))
        return out
    keep = torch.ones((geo.maps, *geo.sizes), dtype=torch.bool, device=input.device)
    paint_blocks(keep, False, seeds, geo)
    dropped = None
    if scale == "realized":
        dropped = (~keep).sum(dim=tuple(range(1, keep.dim())), dtype=torch.int64)
    factor = scale_factor(scale, p, dropped, math.prod(geo.sizes), input)
    mult = scaled(keep.to(scale_dtype(input)), factor)
    torch.mul(input, mult.unsqueeze(channel_dim), out=out)
    return out


def scale_dtype(input: Tensor) -> torch.dtype:
    """float32, or float64 for float64 input: where masks and scales are multiplied."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


@torch.library.custom_op("spatialdrop::drop_block_maps", mutates_args=())
def drop_block_maps(
    input: Tensor,
    seed: Optional[Tensor],
    p: Tensor,
    block_size: list[int],
    channel_dim: int,
    seeding: str,
    scale: str,
    key_words: Optional[list[int]],
    step: Optional[Tensor],
    sample_ids: Optional[Tensor],
) -> Tensor:
    """DropBlock with one mask per (sample, channel), sparse: see :func:`_sparse`."""
    return _sparse(
        input, seed, p, block_size, channel_dim, False, seeding, scale, key_words, step, sample_ids
    )


@torch.library.custom_op("spatialdrop::drop_block_shared", mutates_args=())
def drop_block_shared(
    input: Tensor,
    seed: Optional[Tensor],
    p: Tensor,
    block_size: list[int],
    channel_dim: int,
    seeding: str,
    scale: str,
    key_words: Optional[list[int]],
    step: Optional[Tensor],
    sample_ids: Optional[Tensor],
) -> Tensor:
    """DropBlock with one mask per sample shared by its channels, sparse: see :func:`_sparse`."""
    return _sparse(input, seed, p, block_size, channel_dim, True, seeding, scale, key_words, step, sample_ids)


@drop_block_maps.register_fake
def _(input: Tensor, *args: object) -> Tensor:
    return torch.empty_like(input)


@drop_block_shared.register_fake
def _(input: Tensor, *args: object) -> Tensor:
    return torch.empty_like(input)
