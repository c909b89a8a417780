"""Autograd and vmap for DropBlock's custom ops.

DropBlock is linear in its input for a given mask (the realized scale depends on the mask only),
so the gradient is the same op applied to the incoming gradient with the same randomness
arguments: backward re-creates the mask from the saved seed (or key) instead of saving it, and
since backward is the op itself, every order of derivative works (double backward,
``gradgradcheck``, gradient penalties, ``torch.func.grad``). Saved for backward: the int64 seed
tensor (8 bytes) and ``p`` (a float64 scalar), or the key's step and sample ids instead of the seed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .ops import drop_block_maps, drop_block_shared

__all__: list[str] = []

_NUM_ARGS = 10  # input, seed, p, block_size, channel_dim, seeding, scale, key_words, step, sample_ids


def _register(op: Any) -> None:
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, seed, p, blocks, channel_dim, seeding, scale, words, step, ids = inputs
        ctx.save_for_backward(seed, p, step, ids)
        ctx.options = (blocks, channel_dim, seeding, scale, words)

    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        seed, p, step, ids = ctx.saved_tensors
        blocks, channel_dim, seeding, scale, words = ctx.options
        g = op(grad, seed, p, blocks, channel_dim, seeding, scale, words, step, ids)
        return (g,) + (None,) * (_NUM_ARGS - 1)

    def vmap_rule(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[Tensor, int]:
        # one call per vmapped slice: a batched seed (randomness="different") gives each slice
        # its own mask, an unbatched one (randomness="same", or a key) the same mask
        outs = []
        for i in range(info.batch_size):
            sliced = [a if d is None else a.select(d, i) for a, d in zip(args, in_dims)]
            outs.append(op(*sliced))
        return torch.stack(outs), 0

    torch.library.register_autograd(op, backward, setup_context=setup_context)
    torch.library.register_vmap(op, vmap_rule)


_register(drop_block_maps)
_register(drop_block_shared)
