"""Per-channel DropBlock that keeps its write plan for backward: two custom ops.

Re-creating a per-channel mask costs about as much as the multiply (the plan's index
arithmetic), so the forward op ``spatialdrop::drop_block_maps_planned`` also returns the int32
write plan (the storage offsets of the dropped runs, data-dependent length) when it takes at most
1/32 of the input's bytes (a bit per element), and ``spatialdrop::drop_block_maps_replay`` applies
it to the gradient. When the plan would be larger (tiny blocks at a high ``p``) the forward
returns an empty plan and replay re-creates the mask from the seed (or key) instead. Replay is
linear in the gradient, so its own backward is replay again: every order of derivative works.
Both ops are opaque to the compiler, so eager and compiled code run the same code. The plan's
length depends on the data, which would break a ``torch.compile`` graph (or need
``capture_dynamic_output_shape_ops``): with ``static_plan`` (compiled calls) the plan is written
into a buffer of static size, its capacity (1/32 of the input's bytes, see :func:`plan_capacity`),
and ``counts`` says how much of it holds the plan.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .geometry import _run_lengths, apply_plan
from .scale import scaled
from .sparse import _sparse, scale_dtype

__all__ = ["drop_block_maps_planned", "drop_block_maps_replay"]


def plan_capacity(input: Tensor) -> int:
    """The most int32 offsets a kept plan holds: 1/32 of the input's bytes (a bit per element)."""
    return input.numel() * input.element_size() // 128


def _slots(block_size: list[int]) -> int:
    """Length of ``counts``: the most widths a plan can have, from the block alone.

    Not from the map's size (a map narrower than the block has fewer widths), so that the
    compiler does not specialise on it; unused slots hold 0.
    """
    return len(_run_lengths(int(block_size[-1])))


def _widths(input_shape: Any, channel_dim: int, block_size: list[int]) -> list[int]:
    last = [d for d in range(1, len(input_shape)) if d != channel_dim][-1]
    return _run_lengths(min(int(block_size[-1]), int(input_shape[last])))


@torch.library.custom_op("spatialdrop::drop_block_maps_planned", mutates_args=())
def drop_block_maps_planned(
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
    static_plan: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel DropBlock: ``(output, plan offsets int32, runs per width int64, factor)``.

    ``counts[i]`` offsets of the plan start runs of ``widths[i]`` positions (``counts`` has
    :func:`_slots` entries, those past the widths 0); ``counts`` is all ``-1`` when no plan is
    kept. ``factor`` is the scale (``(1,)`` or ``(N,)``, empty for none).
    With ``static_plan`` the offsets tensor always has :func:`plan_capacity` entries (a static
    shape for the compiler); the plan fills its first ``counts.sum()``.
    """
    kept: list[Any] = []
    out = _sparse(
        input, seed, p, block_size, channel_dim, False, seeding, scale, key_words, step, sample_ids, kept
    )
    widths = _widths(input.shape, channel_dim, block_size)
    factor = torch.empty(0, dtype=scale_dtype(input), device=input.device)
    empty = torch.empty(0, dtype=torch.int32, device=input.device)
    heads = (
        torch.empty(plan_capacity(input), dtype=torch.int32, device=input.device) if static_plan else empty
    )
    counts = torch.full((_slots(block_size),), -1, dtype=torch.int64)
    if not kept:  # empty input
        return out, heads, counts, factor
    plan, f, _ = kept
    if f is not None:
        factor = f.clone()
    total = sum(h.numel() for _, h in plan)
    if out.numel() < 2**31 and 4 * 32 * total <= input.numel() * input.element_size():
        by_width = dict(plan)
        parts = [by_width.get(w, empty).to(torch.int32) for w in widths]
        if static_plan:
            torch.cat(parts, out=heads.narrow(0, 0, total))
        else:
            heads = torch.cat(parts)
        counts = torch.zeros(_slots(block_size), dtype=torch.int64)
        counts[: len(parts)] = torch.tensor([h.numel() for h in parts], dtype=torch.int64)
    return out, heads, counts, factor


@drop_block_maps_planned.register_fake
def _(
    input: Tensor,
    seed: Any,
    p: Any,
    block_size: list[int],
    channel_dim: int,
    seeding: str,
    scale: str,
    key_words: Any,
    step: Any,
    sample_ids: Any,
    static_plan: bool,
) -> Any:
    if static_plan:
        heads = input.new_empty((plan_capacity(input),), dtype=torch.int32)
    else:
        heads = input.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int32)
    counts = input.new_empty((_slots(block_size),), dtype=torch.int64, device="cpu")
    n = {"expected": 1, "realized": input.shape[0], "none": 0}[scale]
    factor = input.new_empty((n,), dtype=scale_dtype(input))
    return torch.empty_like(input), heads, counts, factor


@torch.library.custom_op("spatialdrop::drop_block_maps_replay", mutates_args=())
def drop_block_maps_replay(
    grad: Tensor,
    heads: Tensor,
    counts: Tensor,
    factor: Tensor,
    strides: list[int],
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
    """The gradient (or any tensor) times the forward's mask and scale, laid out with ``strides``."""
    g = torch.empty_strided(grad.shape, strides, dtype=grad.dtype, device=grad.device)
    if g.numel() == 0:
        return g
    count_list = [int(c) for c in counts.tolist()]
    if count_list and count_list[0] < 0:  # no plan kept: re-create the mask from the seed
        args = (seed, p, block_size, channel_dim, False, seeding, scale, key_words, step, sample_ids)
        return _sparse(grad, *args, None, g)
    widths = _widths(grad.shape, channel_dim, block_size)
    count_list = count_list[: len(widths)]
    last = [d for d in range(1, grad.dim()) if d != channel_dim][-1]
    scaled(grad, factor if factor.numel() else None, g)
    heads = heads.narrow(0, 0, sum(count_list))  # a static plan's buffer may be longer
    apply_plan(g, 0, list(zip(widths, heads.split(count_list))), strides[last])
    return g


@drop_block_maps_replay.register_fake
def _(grad: Tensor, heads: Tensor, counts: Tensor, factor: Tensor, strides: list[int], *_: Any) -> Tensor:
    return torch.empty_strided(grad.shape, strides, dtype=grad.dtype, device=grad.device)


def _setup_planned(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    _, seed, p, blocks, channel_dim, seeding, scale, words, step, ids, _ = inputs
    out, heads, counts, factor = output
    ctx.save_for_backward(heads, counts, factor, seed, p, step, ids)
    ctx.options = (list(out.stride()), blocks, channel_dim, seeding, scale, words)
    ctx.mark_non_differentiable(heads, counts, factor)


def _backward_planned(ctx: Any, grad: Tensor, *_: Any) -> tuple[Optional[Tensor], ...]:
    heads, counts, factor, seed, p, step, ids = ctx.saved_tensors
    strides, blocks, channel_dim, seeding, scale, words = ctx.options
    g = drop_block_maps_replay(
        grad, heads, counts, factor, strides, seed, p, blocks, channel_dim, seeding, scale, words, step, ids
    )
    return (g,) + (None,) * 10


def _setup_replay(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(*(a for a in inputs[1:4]), inputs[5], inputs[6], inputs[12], inputs[13])
    ctx.options = (inputs[4], *inputs[7:12])


def _backward_replay(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
    heads, counts, factor, seed, p, step, ids = ctx.saved_tensors
    strides, blocks, channel_dim, seeding, scale, words = ctx.options
    g = drop_block_maps_replay(
        grad, heads, counts, factor, strides, seed, p, blocks, channel_dim, seeding, scale, words, step, ids
    )
    return (g,) + (None,) * 13


torch.library.register_autograd(drop_block_maps_planned, _backward_planned, setup_context=_setup_planned)
torch.library.register_autograd(drop_block_maps_replay, _backward_replay, setup_context=_setup_replay)
