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

from .sparse import drop_block_maps, drop_block_shared

__all__ = ["DropBlockFunction"]

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
