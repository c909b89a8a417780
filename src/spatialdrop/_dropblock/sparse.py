"""DropBlock's sparse path (CPU input): the custom ops ``spatialdrop::drop_block`` and its backward.

Seeds are drawn sparsely (data-dependent sizes) and only the dropped positions are written, per
seed rather than per position. The compiler sees one opaque op, so ``torch.compile`` runs exactly
the eager code. Randomness comes in as an int64 ``seed`` tensor (drawn by the caller with
``torch.randint`` from its generator) that seeds a private generator inside the op, or as a key.

``spatialdrop::drop_block`` returns ``(output, heads, info, factor)``:

- ``heads`` (int32) is what the forward keeps of a per-channel mask for backward: the seeds
  themselves (flat seed-grid indices) when the fused pass wrote the output (:mod:`.fused`: dense
  float32/float64 output, scale ``"expected"`` or ``"none"``), else the *write plan*: the storage
  offsets in ``output`` where runs of dropped positions start, grouped by run width.
  Re-creating a per-channel mask costs about as much as the multiply, so either is kept when it
  takes at most 1/32 of the input's bytes (a bit per element). ``plan`` says how:
  :data:`PLAN_NONE` (keep nothing: shared masks, torch.func), :data:`PLAN_EXACT` (a plan of
  data-dependent length: eager) or :data:`PLAN_STATIC` (a buffer of static length
  :func:`plan_capacity`, the plan in its first entries: ``torch.compile``, where a
  data-dependent length would break the graph).
- ``info`` (int64, CPU) holds the output's strides (``ndim`` entries: the layout the plan's
  offsets address), then the number of runs of each width (:func:`plan_slots` entries); the
  counts are all ``-1`` when no plan is kept, and the first is ``-2 - len(seeds)`` when
  ``heads`` holds seeds (which address any layout).
- ``factor`` is the scale of the kept elements: ``(1,)`` for ``"expected"``, ``(N,)`` for
  ``"realized"``, ``(0,)`` for ``"none"`` (float32, float64 for float64 input).

``spatialdrop::drop_block_backward`` multiplies a gradient by the forward's mask and scale. It
allocates its result like the gradient (``empty_like``); it uses kept seeds in any layout, and a
kept plan only when that layout is the one the plan addresses (``info``'s strides); otherwise
(nothing kept, or a gradient in another layout, as ``torch.compile`` may hand it) it re-creates
the mask from the seed (or key) for its own layout. Every op allocates and addresses its
outputs from their own sizes and strides, and the fake (meta) functions return exactly what the
real ones return.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from .._philox import MASK32
from ..keyed import MaskKey
from . import fused
from . import seeds as _seeds
from .calibration import seed_rate
from .geometry import (
    Geometry,
    Plan,
    apply_plan,
    block_plan,
    geometry,
    map_offsets,
    paint_blocks,
    run_lengths,
)
from .scale import acc_dtype, factor_shape, scale_factor, scaled
from .window import global_geometry, local_geometry, localize_sparse

__all__ = [
    "PLAN_EXACT",
    "PLAN_NONE",
    "PLAN_STATIC",
    "backward_impl",
    "draw_sparse",
    "drop_block_backward",
    "drop_block_op",
    "forward_impl",
    "forward_parts",
    "fused_takes",
    "plan_capacity",
    "plan_slots",
    "seeds_backward",
    "write_sparse",
]

PLAN_NONE, PLAN_EXACT, PLAN_STATIC = 0, 1, 2

# The width that marks a plan of seeds (the fused pass's, :mod:`.fused`) instead of runs.
SEEDS = 0


def plan_capacity(input: Tensor) -> int:
    """The most int32 offsets a kept plan holds: 1/32 of the input's bytes (a bit per element)."""
    return input.numel() * input.element_size() // 128


def plan_slots(block_size: list[int]) -> int:
    """The number of run widths a plan can have, from the block alone.

    Not from the map's size (a map narrower than the block has fewer widths), so that the
    compiler does not specialise on it; unused slots hold 0.
    """
    return len(run_lengths(int(block_size[-1])))


def op_key(key_words: list[int], step: Tensor, sample_ids: Tensor) -> MaskKey:
    """The :class:`MaskKey` that the ops receive as four 32-bit words, a step and the ids."""
    seed = key_words[0] | (key_words[1] << 32)
    layer = key_words[2] | (key_words[3] << 32)
    return MaskKey(seed, int(step) & MASK32, layer, sample_ids)


def fused_takes(out: Tensor, geo: Geometry, scale: str, require_dense: bool = True) -> bool:
    """Whether :func:`write_sparse` writes ``out`` by the fused pass (see :func:`.fused.available`).

    Not for the realized scale, which needs the union of the blocks before the multiply.
    """
    return scale != "realized" and fused.available(out, geo, require_dense)


def seeds_backward(grad: Tensor, seeds: Tensor, factor: Optional[float], geo: Geometry) -> Tensor:
    """``grad`` times the mask of the forward's kept ``seeds`` and ``factor``, laid out like ``grad``.

    The fused pass on the gradient (any layout: seeds address none); a gradient laid out unlike
    its ``empty_like`` is multiplied by torch first; without the pass (switched off between
    forward and backward, in tests) the torch ops write the seeds' blocks.
    """
    g = torch.empty_like(grad)
    if fused.available(g, geo) and fused.same_layout(grad, g):
        fused.write(g, grad, factor, seeds, geo)
        return g
    if factor is None:
        g.copy_(grad)
    else:  # what ``scaled`` computes for a one-element factor on the CPU
        torch.mul(grad, factor, out=g)
    if fused.available(g, geo):
        fused.write(g, None, None, seeds, geo)
    else:
        paint_blocks(g, None, seeds.long(), geo)
    return g


def draw_sparse(
    input: Tensor,
    geo: Geometry,
    p: float,
    seeding: str,
    seed: Optional[Tensor],
    key: Optional[MaskKey],
    window: Optional[list[int]] = None,
    small: bool = False,
) -> Tensor:
    """The flat seed indices into ``geo``'s seed grid, from ``seed`` or ``key`` (see :func:`write_sparse`).

    ``small``: int32 indices where the C sampler draws them (what the fused pass keeps).
    """
    generator = None
    if key is None:
        assert seed is not None, "write_sparse: an unkeyed draw needs a seed"
        generator = torch.Generator(device=input.device).manual_seed(int(seed))
    if window is None:
        gamma = seed_rate(p, geo.sizes, geo.blocks, seeding)
        return _seeds.draw_grid(geo.places, gamma, generator, input.device, dense=False, key=key, small=small)
    geo_g = global_geometry(input.shape, geo.channel_dim, geo.blocks, geo.shared, seeding, window)
    gamma = seed_rate(p, geo_g.sizes, geo_g.blocks, seeding)
    drawn = _seeds.draw_grid(geo_g.places, gamma, generator, input.device, dense=False, key=key)
    return localize_sparse(drawn, geo_g, geo, window)


def write_sparse(
    input: Tensor,
    out: Tensor,
    geo: Geometry,
    p: float,
    seeding: str,
    scale: str,
    seed: Optional[Tensor],
    key: Optional[MaskKey],
    window: Optional[list[int]] = None,
    seeds: Optional[Tensor] = None,
) -> tuple[Optional[Plan], Optional[Tensor]]:
    """Write ``input * scale`` with every seed's block zeroed into ``out`` (dense, input's shape).

    A dropped element is ``x * 0`` (NaN where ``x`` is NaN or infinite), on every path.

    Returns the per-channel write plan (``None`` for shared masks) and the scale factor. With a
    ``window`` (see :mod:`.window`) ``input`` is a window of larger maps and ``geo`` its local
    geometry (:func:`~.window.local_geometry`): the seeds are drawn for the global maps.
    ``seeds``: already drawn by :func:`draw_sparse` (else drawn here).
    """
    use_fused = fused_takes(out, geo, scale)
    if seeds is None:
        seeds = draw_sparse(input, geo, p, seeding, seed, key, window, small=use_fused)
    if use_fused:
        factor = scale_factor(scale, p, None, 0, input)
        fac = None if factor is None else float(factor)
        if input is out or fused.same_layout(input, out):
            fused.write(out, input, fac, seeds, geo)
        else:  # a strided or expanded input: the multiply by torch, the zeros fused
            scaled(input, factor, out)
            fused.write(out, None, None, seeds, geo)
        return [(SEEDS, seeds)], factor
    if not geo.shared:
        strides = [out.stride(d) for d in geo.spatial]
        plan = block_plan(seeds, geo, map_offsets(out, geo), strides)
        dropped = None
        if scale == "realized":  # the kept count needs the union of the blocks: paint them once
            mask = torch.zeros_like(out, dtype=torch.uint8)
            apply_plan(mask, 1, plan, strides[-1])
            dropped = mask.sum(dim=tuple(range(1, out.dim())), dtype=torch.int64)
        factor = scale_factor(scale, p, dropped, math.prod(input.shape[1:]), input)
        scaled(input, factor, out)
        apply_plan(out, None, plan, strides[-1])  # x * 0: NaN stays NaN
        return plan, factor
    keep = torch.ones((geo.maps, *geo.sizes), dtype=torch.bool, device=input.device)
    paint_blocks(keep, False, seeds, geo)
    dropped = None
    if scale == "realized":
        dropped = (~keep).sum(dim=tuple(range(1, keep.dim())), dtype=torch.int64)
    factor = scale_factor(scale, p, dropped, math.prod(geo.sizes), input)
    mult = scaled(keep.to(acc_dtype(input)), factor)
    torch.mul(input, mult.unsqueeze(geo.channel_dim), out=out)
    return None, factor


def _key_of(
    key_words: Optional[list[int]], step: Optional[Tensor], ids: Optional[Tensor]
) -> Optional[MaskKey]:
    if key_words is None:
        return None
    assert step is not None, "a keyed call passes the step"
    assert ids is not None, "a keyed call passes the sample ids"
    return op_key(key_words, step, ids)


def forward_impl(
    input: Tensor,
    seed: Optional[Tensor],
    p: Tensor,
    block_size: list[int],
    channel_dim: int,
    shared: bool,
    seeding: str,
    scale: str,
    key_words: Optional[list[int]],
    step: Optional[Tensor],
    sample_ids: Optional[Tensor],
    plan: int,
    window: Optional[list[int]] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DropBlock of ``input``: ``(output, heads, info, factor)``, see the module docstring.

    ``p`` is a float64 0-dim tensor, so that a ``p`` that changes every step (a schedule) does
    not specialise a compiled graph; ``seed`` (unkeyed) or ``key_words``/``step``/``sample_ids``
    (keyed) give the randomness. ``window``: ``input`` is a window of larger maps (a DTensor
    shard, see :mod:`.window`).
    """
    return forward_parts(
        input,
        seed,
        p,
        block_size,
        channel_dim,
        shared,
        seeding,
        scale,
        key_words,
        step,
        sample_ids,
        plan,
        window,
    )[0]


def forward_parts(
    *args: Any,
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Optional[tuple[Tensor, Optional[float]]]]:
    """:func:`forward_impl`'s outputs, and the kept seeds and scale when the fused pass ran.

    The second item, ``(seeds, factor)`` (int32 seeds, the scale as a float or ``None``), is
    what eager autograd's backward needs to run the fused pass on the gradient directly.
    ``args``: :func:`forward_impl`'s thirteen, in its order.
    """
    (
        input,
        seed,
        p,
        block_size,
        channel_dim,
        shared,
        seeding,
        scale,
        key_words,
        step,
        sample_ids,
        plan,
        window,
    ) = args
    geo = _geometry(input, channel_dim, block_size, shared, seeding, window)
    if input.numel() == 0:
        out = torch.empty_like(input)
        return (out, *package_plan(None, None, out, geo, scale, plan)), None
    key = _key_of(key_words, step, sample_ids)
    # the seeds as int32 when the fused pass takes the output (``empty_like(input)``, dense)
    small = fused_takes(input, geo, scale, require_dense=False)
    seeds = draw_sparse(input, geo, float(p), seeding, seed, key, window, small=small)
    out = torch.empty_like(input)
    kept, factor = write_sparse(input, out, geo, float(p), seeding, scale, seed, key, window, seeds)
    outputs = (out, *package_plan(kept, factor, out, geo, scale, plan))
    heads = outputs[1]
    if kept and kept[0][0] == SEEDS and window is None and heads.numel() == kept[0][1].numel():
        return outputs, (heads, None if factor is None else float(factor))
    return outputs, None


# The op over the plain function, which eager autograd also calls directly (``autograd.EagerFunction``:
# the dispatcher's round trip costs more than the rest of a small call).
drop_block_op = torch.library.custom_op("spatialdrop::drop_block", mutates_args=())(forward_impl)


def _geometry(
    input: Tensor,
    channel_dim: int,
    block_size: list[int],
    shared: bool,
    seeding: str,
    window: Optional[list[int]],
) -> Geometry:
    if window is None:
        return geometry(input.shape, channel_dim, block_size, shared, seeding)
    return local_geometry(input.shape, channel_dim, block_size, shared)


def package_plan(
    kept: Optional[Plan], factor: Optional[Tensor], out: Tensor, geo: Geometry, scale: str, plan: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(heads, info, factor)`` as ``spatialdrop::drop_block`` returns them, for a written ``out``.

    ``kept`` is the plan :func:`write_sparse` returned (``None`` for shared masks or an empty
    input); it is kept as ``plan`` says when it takes at most :func:`plan_capacity` offsets.
    """
    slots = plan_slots(list(geo.blocks))
    if kept and kept[0][0] == SEEDS and plan != PLAN_NONE:
        return _package_seeds(kept[0][1], factor, out, geo, scale, plan, slots)
    info = torch.full((out.dim() + slots,), -1, dtype=torch.int64)
    info[: out.dim()] = torch.tensor(out.stride(), dtype=torch.int64)
    # a static plan's buffer: the plan in its first entries, zeros after (a deterministic output)
    heads = torch.zeros(plan_capacity(out) if plan == PLAN_STATIC else 0, dtype=torch.int32)
    factors = _factors(factor, out, scale)
    if kept is None or plan == PLAN_NONE:
        return heads, info, factors
    total = sum(h.numel() for _, h in kept)
    if out.numel() < 2**31 and total <= plan_capacity(out):
        by_width = dict(kept)
        empty = torch.empty(0, dtype=torch.int64)
        parts = [by_width.get(w, empty) for w in run_lengths(min(geo.blocks[-1], geo.sizes[-1]))]
        if plan == PLAN_STATIC:
            torch.cat(parts, out=heads.narrow(0, 0, total))
        else:
            heads = torch.cat(parts).to(torch.int32)
        info[out.dim() :] = 0
        info[out.dim() : out.dim() + len(parts)] = torch.tensor([h.numel() for h in parts])
    return heads, info, factors


def _factors(factor: Optional[Tensor], out: Tensor, scale: str) -> Tensor:
    shape, dtype = factor_shape(scale, out.shape[0]), acc_dtype(out)
    if factor is not None and factor.shape == shape and factor.dtype == dtype:
        return factor  # made by scale_factor for this call: already the op's own tensor
    factors = torch.zeros(shape, dtype=dtype)
    if factor is not None:
        factors.copy_(factor.view(factors.shape))
    return factors


def _package_seeds(
    seeds: Tensor, factor: Optional[Tensor], out: Tensor, geo: Geometry, scale: str, plan: int, slots: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(heads, info, factor)`` for the fused pass: the seeds themselves, as int32 grid indices.

    ``info``'s first count is ``-2 - len(seeds)`` (the seeds, any layout), or ``-1`` when they
    do not fit (more than 2**31 places, or past :func:`plan_capacity`): backward draws them again.
    """
    total = seeds.numel()
    fits = geo.places < 2**31 and total <= plan_capacity(out)
    info = torch.tensor([*out.stride(), -2 - total if fits else -1] + [0] * (slots - 1), dtype=torch.int64)
    if plan == PLAN_STATIC:
        heads = torch.zeros(plan_capacity(out), dtype=torch.int32)
        if fits:
            heads.narrow(0, 0, total).copy_(seeds)
    else:
        heads = seeds.to(torch.int32) if fits else torch.zeros(0, dtype=torch.int32)
    return heads, info, _factors(factor, out, scale)


@drop_block_op.register_fake
def _(input: Tensor, seed: object, p: object, block_size: list[int], *args: object) -> tuple[Tensor, ...]:
    scale, plan = args[3], args[7]  # of channel_dim, shared, seeding, scale, words, step, ids, plan, window
    assert isinstance(scale, str)
    if plan == PLAN_EXACT:
        heads = input.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int32)
    else:
        heads = input.new_empty((plan_capacity(input) if plan == PLAN_STATIC else 0,), dtype=torch.int32)
    info = input.new_empty((input.dim() + plan_slots(block_size),), dtype=torch.int64, device="cpu")
    factor = input.new_empty(factor_shape(scale, input.shape[0]), dtype=acc_dtype(input))
    return torch.empty_like(input), heads, info, factor


def backward_impl(
    grad: Tensor,
    heads: Tensor,
    info: Tensor,
    factor: Tensor,
    seed: Optional[Tensor],
    p: Tensor,
    block_size: list[int],
    channel_dim: int,
    shared: bool,
    seeding: str,
    scale: str,
    key_words: Optional[list[int]],
    step: Optional[Tensor],
    sample_ids: Optional[Tensor],
    window: Optional[list[int]] = None,
) -> Tensor:
    """``grad`` (or any tensor) times the forward's mask and scale, laid out like ``grad``."""
    g = torch.empty_like(grad)
    if g.numel() == 0:
        return g
    ndim = grad.dim()
    values = info.tolist()
    strides, counts = values[:ndim], values[ndim:]
    geo = _geometry(grad, channel_dim, block_size, shared, seeding, window)
    if counts[0] <= -2:  # the forward's seeds (the fused pass): any layout
        seeds = heads.narrow(0, 0, -2 - counts[0])  # int32, read as such by the fused pass
        return seeds_backward(grad, seeds, float(factor) if factor.numel() else None, geo)
    if counts[0] >= 0 and tuple(strides) == g.stride():  # the kept plan addresses this layout
        widths = run_lengths(min(geo.blocks[-1], geo.sizes[-1]))
        counts = counts[: len(widths)]
        scaled(grad, factor if factor.numel() else None, g)
        parts = heads.narrow(0, 0, sum(counts)).split(counts)  # a static plan's buffer is longer
        apply_plan(g, None, list(zip(widths, parts)), strides[geo.spatial[-1]])
        return g
    write_sparse(grad, g, geo, float(p), seeding, scale, seed, _key_of(key_words, step, sample_ids), window)
    return g


drop_block_backward = torch.library.custom_op("spatialdrop::drop_block_backward", mutates_args=())(
    backward_impl
)


@drop_block_backward.register_fake
def _(grad: Tensor, *args: object) -> Tensor:
    return torch.empty_like(grad)
