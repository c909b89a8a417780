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
  :data:`FORCE_STATIC_PATH` is set. For CUDA with triton installed, :func:`_cuda_impl` runs
  the fused Triton kernel instead.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._compat import is_compiling
from .._philox import MASK32
from ..keyed import MaskKey
from . import seeds as _seeds
from .autograd import DropBlockFunction
from .calibration import seed_rate
from .geometry import Geometry, grow_blocks
from .planned import drop_block_maps_planned
from .scale import scale_factor, scaled
from .triton_kernels import triton_available, triton_drop_block

__all__ = ["FORCE_STATIC_PATH", "drop_block_dense", "run"]

# Internal switch (tests): when True, CPU input takes the static-shape path that CUDA takes.
FORCE_STATIC_PATH = False

_SEED_HIGH = 1 << 62


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
    gamma = seed_rate(p, geo.sizes, geo.blocks, seeding, cached=not is_compiling())
    with torch.no_grad():
        grid = _seeds.draw_grid(geo.places, gamma, generator, input.device, dense=True, key=key)
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
    """The fused Triton DropBlock when it can run on ``input``, else None (the dense path).

    Called for input that takes the static path (also under ``torch.compile``): CUDA input when
    triton is installed and ``SPATIALDROP_BACKEND`` is not ``torch``, or CPU input inside the
    tests' :func:`~.triton_kernels.cpu_interpreter`. It reads no device memory on the host.
    """
    if not 1 <= len(geo.sizes) <= 3 or not triton_available(input):
        return None
    gamma = seed_rate(p, geo.sizes, geo.blocks, seeding, cached=not is_compiling())
    return triton_drop_block(
        input,
        gamma=gamma,
        blocks=geo.blocks,
        seeding=seeding,
        shared=geo.shared,
        channel_dim=geo.channel_dim,
        scale=scale,
        p=p,
        generator=generator,
        key=key,
    )


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
        out = _cuda_impl(input, p, geo, seeding, scale, generator, key)
        return out if out is not None else drop_block_dense(input, p, geo, seeding, scale, generator, key)
    if torch.compiler.is_exporting():  # no custom op in an exported program (ONNX cannot lower it)
        return drop_block_dense(input, p, geo, seeding, scale, generator, key)
    seed, words, step, ids = _op_args(generator, key)
    p_tensor = torch.ones((), dtype=torch.float64) * p  # not torch.full: that specialises p
    compiling = is_compiling()
    if not geo.shared and (compiling or torch._C._functorch.peek_interpreter_stack() is None):
        # per channel: keep the write plan for backward when it is small (see .planned); under
        # torch.compile in a buffer of static size (no data-dependent shape: no graph break)
        planned = drop_block_maps_planned(
            input,
            seed,
            p_tensor,
            list(geo.blocks),
            geo.channel_dim,
            seeding,
            scale,
            words,
            step,
            ids,
            compiling,
        )
        return planned[0]
    result: Tensor = DropBlockFunction.apply(
        input, geo.shared, seed, p_tensor, list(geo.blocks), geo.channel_dim, seeding, scale, words, step, ids
    )
    return result
