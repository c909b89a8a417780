"""DropBlock's two paths and the dispatch between them.

- The sparse path runs inside the custom ops ``spatialdrop::drop_block_maps`` (one mask per
  (sample, channel)) and ``spatialdrop::drop_block_shared`` (one mask per sample): seeds are
  drawn sparsely (data-dependent sizes) and only the dropped positions are written. The compiler
  sees one opaque op, so ``torch.compile`` runs exactly the eager code. Randomness comes in as an
  int64 ``seed`` tensor drawn with ``torch.randint`` from the caller's generator (so
  ``torch.manual_seed`` reproduces it and ``vmap``'s randomness modes apply to it) and seeds a
  private generator inside the op; backward re-creates the same mask from that seed, so nothing
  of per-element size is saved (see :mod:`.autograd`). Keyed masks pass the key instead.
- The dense path (:func:`drop_block_dense`) has static shapes and no device-to-host read: it
  draws the whole seed grid and grows blocks densely. It serves CUDA and meta input (and any
  other non-CPU device), ``torch.export`` / ONNX export, and CPU input when
  :data:`FORCE_STATIC_PATH` is set. For CUDA, :func:`_cuda_impl` is where a fused kernel plugs in.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._philox import MASK32
from ..keyed import MaskKey
from .calibration import seed_rate
from .geometry import Geometry, apply_plan, block_plan, grow_blocks, map_offsets, paint_blocks
from .keyed_seeds import draw_keyed_seeds
from .sampling import draw_seeds
from .scale import scale_factor, scaled

__all__ = ["FORCE_STATIC_PATH", "drop_block_dense", "drop_block_maps", "drop_block_shared", "run"]

# Internal switch (tests): when True, CPU input takes the static-shape path that CUDA takes.
FORCE_STATIC_PATH = False

_SEED_HIGH = 1 << 62


def draw_grid(
    numel: int,
    gamma: float,
    generator: torch.Generator | None,
    device: torch.device,
    *,
    dense: bool,
    key: MaskKey | None = None,
) -> Tensor:
    """The one place DropBlock draws its seed grid: keyed (:mod:`.keyed_seeds`) or not (:mod:`.sampling`)."""
    if key is not None:
        return draw_keyed_seeds(numel, gamma, key, device, dense=dense)
    return draw_seeds(numel, gamma, generator, device, dense=dense)


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


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
) -> Tensor:
    """The body of both custom ops: ``input * scale`` with every seed's block zeroed.

    ``p`` comes as a float64 0-dim tensor, so that a ``p`` that changes every step (a schedule)
    does not specialise a compiled graph.
    """
    p = float(p_tensor)
    geo = Geometry(input.shape, channel_dim, block_size, shared, seeding)
    gamma = seed_rate(p, geo.sizes, geo.blocks, seeding)
    out = torch.empty_like(input)
    if out.numel() == 0:
        return out
    if key_words is None:
        assert seed is not None
        generator: torch.Generator | None = torch.Generator(device=input.device).manual_seed(int(seed))
        key = None
    else:
        generator, key = None, _op_key(key_words, step, sample_ids)
    seeds = draw_grid(geo.places, gamma, generator, input.device, dense=False, key=key)
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


def _op_args(
    generator: torch.Generator | None, key: MaskKey | None
) -> tuple[Optional[Tensor], Optional[list[int]], Optional[Tensor], Optional[Tensor]]:
    """The randomness arguments of the ops: a seed from ``generator``, or the key's words."""
    if key is None:
        if generator is None:
            seed = torch.randint(0, _SEED_HIGH, (), dtype=torch.int64)
        else:
            seed = torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, generator=generator)
        return seed, None, None, None
    words = [key.seed & MASK32, key.seed >> 32, key.layer & MASK32, key.layer >> 32]
    step = key.step if isinstance(key.step, Tensor) else torch.tensor(key.step, dtype=torch.int64)
    return None, words, step, key.sample_ids


# --- the dense, static-shape path -------------------------------------------------------------


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

    The same seeds give the same output as the sparse path, bit for bit (same scale policy).
    """
    gamma = seed_rate(p, geo.sizes, geo.blocks, seeding, cached=not _compiling())
    with torch.no_grad():
        grid = draw_grid(geo.places, gamma, generator, input.device, dense=True, key=key)
        keep = ~grow_blocks(grid.view((geo.maps, *geo.grid)), geo)
        keep = keep.view(geo.map_shape).movedim(1, geo.channel_dim)
        dropped = None
        if scale == "realized":
            dropped = (~keep).sum(dim=tuple(range(1, keep.dim())), dtype=torch.int64)
        factor = scale_factor(scale, p, dropped, math.prod(keep.shape[1:]), input)
    product = scaled(input, factor)
    out = torch.where(keep, product, torch.zeros((), dtype=product.dtype, device=product.device))
    return out.to(input.dtype)


def _cuda_impl(
    input: Tensor,
    p: float,
    geo: Geometry,
    seeding: str,
    scale: str,
    generator: torch.Generator | None,
    key: MaskKey | None,
) -> Tensor | None:
    """A fused CUDA kernel's entry point: return its output, or None to use the dense path.

    Called only for CUDA input (also under ``torch.compile``); it must not read device memory
    on the host. No kernel is plugged in yet.
    """
    return None


def _static_path(input: Tensor) -> bool:
    return FORCE_STATIC_PATH or input.device.type != "cpu"


def run(
    input: Tensor,
    p: float,
    geo: Geometry,
    seeding: str,
    scale: str,
    generator: torch.Generator | None,
    key: MaskKey | None,
) -> Tensor:
    """DropBlock of a checked, non-empty input in training mode, by the right path."""
    if _static_path(input):
        out = _cuda_impl(input, p, geo, seeding, scale, generator, key) if input.is_cuda else None
        return out if out is not None else drop_block_dense(input, p, geo, seeding, scale, generator, key)
    if torch.compiler.is_exporting():  # no custom op in an exported program (ONNX cannot lower it)
        return drop_block_dense(input, p, geo, seeding, scale, generator, key)
    seed, words, step, ids = _op_args(generator, key)
    op = drop_block_shared if geo.shared else drop_block_maps
    p_tensor = torch.scalar_tensor(p, dtype=torch.float64)
    return op(input, seed, p_tensor, list(geo.blocks), geo.channel_dim, seeding, scale, words, step, ids)
