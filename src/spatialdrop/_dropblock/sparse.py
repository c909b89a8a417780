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
  offsets address), then what ``heads`` holds (a :class:`Kept`), then one count per run width
  (:func:`plan_slots` entries: the runs of each width, or the number of seeds in the first);
  :class:`PlanInfo` reads and writes it.
- ``factor`` is the scale of the kept elements: ``(1,)`` for ``"expected"``, ``(N,)`` for
  ``"realized"``, ``(0,)`` for ``"none"`` (float32, float64 for float64 input).

``spatialdrop::drop_block_backward`` multiplies a gradient by the forward's mask and scale,
into a result allocated like the gradient; it uses kept seeds in any layout, a kept plan only in
the layout it addresses (``info``'s strides), else it re-creates the mask from the seed (or
key). The fake (meta) functions return exactly what the real ones return.
"""

from __future__ import annotations

import enum
import math
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from .._philox import MASK32
from ..keyed import MaskKey
from . import fused, sampling
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
    "BackwardArgs",
    "ForwardArgs",
    "KeyWords",
    "backward_impl",
    "draw_sparse",
    "drop_block_backward",
    "drop_block_op",
    "forward_parts",
    "plan_capacity",
    "seeds_backward",
    "write_sparse",
]

PLAN_NONE, PLAN_EXACT, PLAN_STATIC = 0, 1, 2


class KeyWords(NamedTuple):
    """A key as the ops take it, packed in this one place (all ``None`` unkeyed).

    The seed's and the layer's 32-bit halves, the step as an int64 tensor, the sample ids.
    """

    words: Optional[list[int]]
    step: Optional[Tensor]
    ids: Optional[Tensor]

    @staticmethod
    def of(key: Optional[MaskKey]) -> KeyWords:
        if key is None:
            return KeyWords(None, None, None)
        step = key.step if isinstance(key.step, Tensor) else torch.tensor(key.step, dtype=torch.int64)
        s, layer = key.seed, key.layer
        return KeyWords([s & MASK32, s >> 32, layer & MASK32, layer >> 32], step, key.sample_ids)

    def key(self) -> Optional[MaskKey]:
        """The :class:`MaskKey` back (``None`` unkeyed)."""
        if self.words is None:
            return None
        assert self.step is not None, "a keyed call passes the step"
        assert self.ids is not None, "a keyed call passes the sample ids"
        w = self.words
        return MaskKey(w[0] | (w[1] << 32), int(self.step) & MASK32, w[2] | (w[3] << 32), self.ids)


class ForwardArgs(NamedTuple):
    """The arguments of ``spatialdrop::drop_block``, in its schema's order (see :func:`forward_impl`)."""

    input: Tensor
    seed: Optional[Tensor]
    p: Tensor
    block_size: list[int]
    channel_dim: int
    shared: bool
    seeding: str
    scale: str
    key_words: Optional[list[int]]
    step: Optional[Tensor]
    sample_ids: Optional[Tensor]
    plan: int
    window: Optional[list[int]] = None


class BackwardArgs(NamedTuple):
    """The arguments of ``spatialdrop::drop_block_backward``, in its schema's order."""

    grad: Tensor
    heads: Tensor
    info: Tensor
    factor: Tensor
    seed: Optional[Tensor]
    p: Tensor
    block_size: list[int]
    channel_dim: int
    shared: bool
    seeding: str
    scale: str
    key_words: Optional[list[int]]
    step: Optional[Tensor]
    sample_ids: Optional[Tensor]
    window: Optional[list[int]] = None


class Kept(enum.IntEnum):
    """What the forward kept in ``heads`` for backward."""

    NOTHING = 0  # backward re-creates the mask from the seed or key
    RUNS = 1  # a write plan: run starts grouped by width, for the layout in ``info``'s strides
    SEEDS = 2  # the fused pass's seeds (int32 grid indices, any layout)


class PlanInfo(NamedTuple):
    """``info``, read: the strides the plan addresses, what ``heads`` holds, the counts."""

    strides: list[int]
    kept: Kept
    counts: list[int]

    @staticmethod
    def read(info: Tensor, ndim: int) -> PlanInfo:
        values = info.tolist()
        return PlanInfo(values[:ndim], Kept(values[ndim]), values[ndim + 1 :])

    def tensor(self) -> Tensor:
        return torch.tensor([*self.strides, int(self.kept), *self.counts], dtype=torch.int64)


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
    """The flat seed indices into ``geo``'s seed grid, from ``seed`` or ``key``.

    ``small``: int32 indices where the C sampler draws them (what the fused pass keeps), unless
    a ``window`` is given (its seeds are localized in int64).
    """
    generator = None
    if key is None:
        assert seed is not None, "draw_sparse: an unkeyed draw needs a seed"
        generator = torch.Generator(device=input.device).manual_seed(int(seed))
    geo_g = geo if window is None else global_geometry(geo, seeding, window)
    gamma = seed_rate(p, geo_g.sizes, geo_g.blocks, seeding)
    drawn = sampling.draw_grid(
        geo_g.places, gamma, generator, input.device, dense=False, key=key, small=small and window is None
    )
    return drawn if window is None else localize_sparse(drawn, geo_g, geo, window)


def write_sparse(
    input: Tensor, out: Tensor, geo: Geometry, p: float, scale: str, seeds: Tensor
) -> tuple[Optional[Plan], Optional[Tensor]]:
    """Write ``input * scale`` with every seed's block zeroed into ``out`` (dense, input's shape).

    Returns the per-channel write plan (``None`` for shared masks) and the scale factor. The
    seeds come from :func:`draw_sparse`; the fused pass writes per-channel float32/float64
    output, not for the realized scale (which needs the union of the blocks first).
    """
    if scale != "realized" and fused.available(out, geo):
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


def _draw(src: Tensor, out: Tensor, geo: Geometry, a: ForwardArgs | BackwardArgs) -> Tensor:
    """:func:`draw_sparse` from the op's seed or key: int32 seeds where the fused pass takes ``out``."""
    key = KeyWords(a.key_words, a.step, a.sample_ids).key()
    small = a.scale != "realized" and fused.available(out, geo)
    return draw_sparse(src, geo, float(a.p), a.seeding, a.seed, key, a.window, small=small)


def forward_impl(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DropBlock of ``input``: ``(output, heads, info, factor)``, see the module docstring.

    The arguments are :class:`ForwardArgs`'. ``p`` is a float64 0-dim tensor, so that a ``p``
    that changes every step (a schedule) does not specialise a compiled graph; ``seed``
    (unkeyed) or ``key_words``/``step``/``sample_ids`` (keyed) give the randomness. ``window``:
    ``input`` is a window of larger maps (a DTensor shard, see :mod:`.window`).
    """
    return forward_parts(ForwardArgs(*args))[0]


def forward_parts(
    a: ForwardArgs, inplace: bool = False
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Optional[tuple[Tensor, Optional[float]]]]:
    """:func:`forward_impl`'s outputs, and the kept seeds and scale when the fused pass ran.

    The second item, ``(seeds, factor)`` (int32 seeds, the scale as a float or ``None``), is
    what eager autograd's backward needs to run the fused pass on the gradient directly. With
    ``inplace`` the output is the (dense) input itself.
    """
    geo = _geometry(a.input, a)
    if a.input.numel() == 0:
        out = torch.empty_like(a.input)
        return (out, *package_plan(None, None, out, geo, a.scale, a.plan)), None
    out = a.input if inplace else torch.empty_like(a.input)
    kept, factor = write_sparse(a.input, out, geo, float(a.p), a.scale, _draw(a.input, out, geo, a))
    outputs = (out, *package_plan(kept, factor, out, geo, a.scale, a.plan))
    heads = outputs[1]
    if kept and kept[0][0] == SEEDS and a.window is None and heads.numel() == kept[0][1].numel():
        return outputs, (heads, None if factor is None else float(factor))
    return outputs, None


# The op over the plain function, which eager autograd also calls directly (``autograd.EagerFunction``:
# the dispatcher's round trip costs more than the rest of a small call).
drop_block_op = torch.library.custom_op(
    "spatialdrop::drop_block",
    mutates_args=(),
    schema="(Tensor input, Tensor? seed, Tensor p, SymInt[] block_size, SymInt channel_dim, bool shared, "
    "str seeding, str scale, SymInt[]? key_words, Tensor? step, Tensor? sample_ids, SymInt plan, "
    "SymInt[]? window=None) -> (Tensor, Tensor, Tensor, Tensor)",
)(forward_impl)


def _geometry(t: Tensor, a: ForwardArgs | BackwardArgs) -> Geometry:
    """The geometry of ``t`` for the op's arguments: a window's own (:mod:`.window`) if it has one."""
    if a.window is None:
        return geometry(t.shape, a.channel_dim, a.block_size, a.shared, a.seeding)
    return local_geometry(t.shape, a.channel_dim, a.block_size, a.shared)


def package_plan(
    kept: Optional[Plan], factor: Optional[Tensor], out: Tensor, geo: Geometry, scale: str, plan: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(heads, info, factor)`` as ``spatialdrop::drop_block`` returns them, for a written ``out``.

    ``kept`` is the plan :func:`write_sparse` returned (``None`` for shared masks or an empty
    input): the fused pass's seeds (kept as int32 grid indices, any layout, with at most 2**31
    places) or runs (for ``out``'s layout, with at most 2**31 elements). It is kept as ``plan``
    says when it takes at most :func:`plan_capacity` offsets; else backward draws it again.
    """
    slots = plan_slots(list(geo.blocks))
    info = PlanInfo(list(out.stride()), Kept.NOTHING, [0] * slots)
    # a static plan's buffer: the plan in its first entries, zeros after (a deterministic output)
    heads = torch.zeros(plan_capacity(out) if plan == PLAN_STATIC else 0, dtype=torch.int32)
    factors = _factors(factor, out, scale)
    if kept is None or plan == PLAN_NONE:
        return heads, info.tensor(), factors
    if kept and kept[0][0] == SEEDS:
        parts, what, fits = [kept[0][1]], Kept.SEEDS, geo.places < 2**31
    else:
        by_width = dict(kept)
        empty = torch.empty(0, dtype=torch.int64)
        parts = [by_width.get(w, empty) for w in run_lengths(min(geo.blocks[-1], geo.sizes[-1]))]
        what, fits = Kept.RUNS, out.numel() < 2**31
    total = sum(h.numel() for h in parts)
    if fits and total <= plan_capacity(out):
        if plan == PLAN_STATIC:
            torch.cat(parts, out=heads.narrow(0, 0, total))
        else:
            heads = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(torch.int32)
        counts = [h.numel() for h in parts]
        info = info._replace(kept=what, counts=counts + [0] * (slots - len(counts)))
    return heads, info.tensor(), factors


def _factors(factor: Optional[Tensor], out: Tensor, scale: str) -> Tensor:
    shape, dtype = factor_shape(scale, out.shape[0]), acc_dtype(out)
    if factor is not None and factor.shape == shape and factor.dtype == dtype:
        return factor  # made by scale_factor for this call: already the op's own tensor
    factors = torch.zeros(shape, dtype=dtype)
    if factor is not None:
        factors.copy_(factor.view(factors.shape))
    return factors


@drop_block_op.register_fake
def _(*args: object) -> tuple[Tensor, ...]:
    a = ForwardArgs(*args)  # type: ignore[arg-type]
    input = a.input
    if a.plan == PLAN_EXACT:
        heads = input.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int32)
    else:
        heads = input.new_empty((plan_capacity(input) if a.plan == PLAN_STATIC else 0,), dtype=torch.int32)
    info = input.new_empty((input.dim() + 1 + plan_slots(a.block_size),), dtype=torch.int64, device="cpu")
    factor = input.new_empty(factor_shape(a.scale, input.shape[0]), dtype=acc_dtype(input))
    return torch.empty_like(input), heads, info, factor


def backward_impl(*args: Any) -> Tensor:
    """``grad`` (or any tensor) times the forward's mask and scale, laid out like ``grad``.

    The arguments are :class:`BackwardArgs`'.
    """
    b = BackwardArgs(*args)
    grad, factor = b.grad, b.factor
    g = torch.empty_like(grad)
    if g.numel() == 0:
        return g
    kept = PlanInfo.read(b.info, grad.dim())
    geo = _geometry(grad, b)
    if kept.kept == Kept.SEEDS:  # the forward's seeds (the fused pass): any layout
        seeds = b.heads.narrow(0, 0, kept.counts[0])  # int32, read as such by the fused pass
        return seeds_backward(grad, seeds, float(factor) if factor.numel() else None, geo)
    if kept.kept == Kept.RUNS and tuple(kept.strides) == g.stride():  # the plan addresses this layout
        widths = run_lengths(min(geo.blocks[-1], geo.sizes[-1]))
        counts = kept.counts[: len(widths)]
        scaled(grad, factor if factor.numel() else None, g)
        parts = b.heads.narrow(0, 0, sum(counts)).split(counts)  # a static plan's buffer is longer
        apply_plan(g, None, list(zip(widths, parts)), kept.strides[geo.spatial[-1]])
        return g
    write_sparse(grad, g, geo, float(b.p), b.scale, _draw(grad, g, geo, b))
    return g


drop_block_backward = torch.library.custom_op(
    "spatialdrop::drop_block_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor heads, Tensor info, Tensor factor, Tensor? seed, Tensor p, "
    "SymInt[] block_size, SymInt channel_dim, bool shared, str seeding, str scale, SymInt[]? key_words, "
    "Tensor? step, Tensor? sample_ids, SymInt[]? window=None) -> Tensor",
)(backward_impl)


@drop_block_backward.register_fake
def _(grad: Tensor, *args: object) -> Tensor:
    return torch.empty_like(grad)
