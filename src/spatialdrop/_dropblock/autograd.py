"""Autograd (any order, torch.func) and vmap for DropBlock's sparse custom ops.

DropBlock is linear in its input for a given mask (the realized scale depends on the mask only),
so the gradient is the same op applied to the incoming gradient with the same randomness
arguments: backward re-creates the mask from the saved seed (or key) instead of saving it, and
since backward is the op itself, every order of derivative works (double backward,
``gradgradcheck``, gradient penalties). Saved for backward: the int64 seed tensor (8 bytes) and
``p`` (a float64 scalar), or the key's step and sample ids instead of the seed.

:class:`DropBlockFunction` (``forward`` + ``setup_context``, ``generate_vmap_rule``) is what the
public op calls, so that ``torch.func.grad``/``vmap`` work; the custom ops also get the same
formula through ``register_autograd`` and a vmap rule (one call per vmapped slice: a batched seed,
from ``randomness="different"``, gives each slice its own mask; an unbatched one, from
``randomness="same"`` or a key, the same mask).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .geometry import apply_plan
from .scale import scaled
from .sparse import _sparse, drop_block_maps, drop_block_shared

__all__ = ["DropBlockFunction", "EagerMapsFunction"]

_NUM_ARGS = 10  # input, seed, p, block_size, channel_dim, seeding, scale, key_words, step, sample_ids


class DropBlockFunction(torch.autograd.Function):
    """``input * scale`` with the seeds' blocks zeroed; its backward is itself, on the gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: Tensor,
        shared: bool,
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
        op = drop_block_shared if shared else drop_block_maps
        return op(input, seed, p, block_size, channel_dim, seeding, scale, key_words, step, sample_ids)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, shared, seed, p, blocks, channel_dim, seeding, scale, words, step, ids = inputs
        ctx.save_for_backward(seed, p, step, ids)
        ctx.options = (shared, blocks, channel_dim, seeding, scale, words)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        seed, p, step, ids = ctx.saved_tensors
        shared, blocks, channel_dim, seeding, scale, words = ctx.options
        g = DropBlockFunction.apply(
            grad, shared, seed, p, blocks, channel_dim, seeding, scale, words, step, ids
        )
        return (g,) + (None,) * _NUM_ARGS


class EagerMapsFunction(torch.autograd.Function):
    """Eager per-channel DropBlock that keeps its int32 write plan for backward when that is small.

    Re-creating the mask costs about as much as the multiply (the plan's index arithmetic), so in
    eager mode (no compiler, no torch.func transform) the plan is kept when it takes at most 1/32
    of the input's bytes (a bit per element), as before. Otherwise (or when the plan is larger)
    backward re-creates it from the seed like :class:`DropBlockFunction`. Same values either way:
    both run :func:`~.sparse._sparse`.
    """

    @staticmethod
    def forward(
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
    ) -> tuple[Tensor, Any]:
        kept: list[Any] = []
        out = _sparse(
            input, seed, p, block_size, channel_dim, False, seeding, scale, key_words, step, sample_ids, kept
        )
        return out, _PlanBox(kept, out, input)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Any]) -> None:
        _, seed, p, blocks, channel_dim, seeding, scale, words, step, ids = inputs
        box = output[1]
        ctx.options = (blocks, channel_dim, seeding, scale, words)
        ctx.box = box if box.kept else None
        if ctx.box is not None:
            ctx.save_for_backward(box.factor, *box.heads)
        else:
            ctx.save_for_backward(seed, p, step, ids)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Any = None) -> tuple[Optional[Tensor], ...]:
        blocks, channel_dim, seeding, scale, words = ctx.options
        if ctx.box is None:
            seed, p, step, ids = ctx.saved_tensors
            args = (seed, p, blocks, channel_dim, seeding, scale, words, step, ids)
            g = DropBlockFunction.apply(grad, False, *args)
        else:
            factor, *heads = ctx.saved_tensors
            g = _PlanFunction.apply(grad, factor, ctx.box.widths, heads, ctx.box.layout)
        return (g,) + (None,) * (_NUM_ARGS - 1)


class _PlanBox:
    """The eager forward's plan (int32) and factor, or nothing when the plan would be too large."""

    def __init__(self, kept: list[Any], out: Tensor, input: Tensor) -> None:
        self.kept = False
        self.factor: Tensor | None = None
        self.heads: list[Tensor] = []
        self.widths: list[int] = []
        if not kept:
            return
        plan, factor, last_stride = kept
        self.layout = (tuple(out.shape), tuple(out.stride()), last_stride)
        # int32 offsets when the output's storage fits; at most a bit per element
        small = out.numel() < 2**31
        heads = sum(h.numel() for _, h in plan)
        if small and 4 * 32 * heads <= input.numel() * input.element_size():
            self.kept, self.factor = True, factor
            self.heads = [h.to(torch.int32) for _, h in plan]
            self.widths = [w for w, _ in plan]


class _PlanFunction(torch.autograd.Function):
    """``grad * factor`` with the plan's runs zeroed; linear, so its backward is itself."""

    @staticmethod
    def forward(
        grad: Tensor, factor: Optional[Tensor], widths: list[int], heads: list[Tensor], layout: Any
    ) -> Tensor:
        shape, strides, last_stride = layout
        g = torch.empty_strided(shape, strides, dtype=grad.dtype, device=grad.device)
        scaled(grad, factor, g)
        apply_plan(g, 0, list(zip(widths, heads)), last_stride)
        return g

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, factor, widths, heads, layout = inputs
        ctx.save_for_backward(factor, *heads)
        ctx.widths, ctx.layout = widths, layout

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        factor, *heads = ctx.saved_tensors
        return _PlanFunction.apply(grad, factor, ctx.widths, heads, ctx.layout), None, None, None, None


def _register(op: Any) -> None:
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, seed, p, blocks, channel_dim, seeding, scale, words, step, ids = inputs
        ctx.save_for_backward(seed, p, step, ids)
        ctx.options = (blocks, channel_dim, seeding, scale, words)

    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        seed, p, step, ids = ctx.saved_tensors
        blocks, channel_dim, seeding, scale, words = ctx.options
        g = op(grad, seed, p, blocks, channel_dim, seeding, scale, words, step, ids)
        return (g,) + (None,) * (_NUM_ARGS - 1)

    def vmap_rule(info: Any, in_dims: tuple[Any, ...], *args: Any) -> tuple[Tensor, int]:
        outs = []
        for i in range(info.batch_size):
            sliced = [
                a.select(d, i) if isinstance(a, Tensor) and d is not None else a
                for a, d in zip(args, in_dims)
            ]
            outs.append(op(*sliced))
        return torch.stack(outs), 0

    torch.library.register_autograd(op, backward, setup_context=setup_context)
    torch.library.register_vmap(op, vmap_rule)


_register(drop_block_maps)
_register(drop_block_shared)
