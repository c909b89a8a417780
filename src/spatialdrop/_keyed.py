"""The private surface of keyed masks that spatialdrop's layers and ops use (not for users).

:mod:`spatialdrop.keyed` is the public side (``MaskKey``, ``keyed_uniform``, ``keyed_normal``,
``mask_context``, ``keyed_masks``); this module holds what an op or a layer needs to take part:

- :func:`check_key_arg`: check an op's ``key=`` argument;
- :func:`keyed_keep`: a keyed Bernoulli keep mask of a given shape;
- :func:`context_key`: the key of a keyed layer for the current ``mask_context``, per sample
  or per call (see ``KEYINGS``);
- ``KEYINGS``: the values a layer class may declare in its ``keying`` attribute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._compat import is_compiling
from ._validation import Shown, fail
from .keyed import KEYINGS, MaskKey, check_key, current_context, keyed_uniform, mc_layer, uniform_rows

__all__ = ["KEYINGS", "SHARED_SAMPLE_ID", "check_key_arg", "context_key", "keyed_keep"]

#: The sample id of a per-call key (a draw shared by the batch): -1, that is ``2**64 - 1`` as
#: the unsigned 64-bit id, which no dataset index reaches.
SHARED_SAMPLE_ID = -1


def check_key_arg(fn: str, key: Any, generator: object, batch_size: int) -> None:
    """Check a function's ``key=`` argument: ``None``, or a :class:`MaskKey` for this batch.

    A key and a ``generator`` together are an error (the key replaces the generator).
    """
    if key is None:
        return
    if generator is not None:
        fail(fn, "key", "None when a generator is given (pass one of them)", Shown("a MaskKey"))
    check_key(fn, key, batch_size, allowed="None or a spatialdrop.MaskKey")


def keyed_keep(key: MaskKey, p: float, shape: Sequence[int], like: Tensor, *, first: int = 0) -> Tensor:
    """A keyed keep mask: 1 where ``keyed_uniform(key, K) >= p``, else 0, in ``like``'s dtype.

    ``shape`` is ``(N, ...)`` with ``K`` = the product of its other dims (the per-sample
    Bernoulli draws of a layer: channels, or 1 for DropPath); the result has that shape, on
    ``like``'s device. ``first``: draw columns ``first .. first + K - 1`` of the key's rows
    instead (the local channels of a shard whose first channel is ``first``).
    """
    per_sample = math.prod(shape[1:])
    if first == 0:
        u = keyed_uniform(key, per_sample, device=like.device)
    else:
        check_key("keyed_keep", key)
        u = uniform_rows(key, per_sample, like.device, first)
    return (u >= p).to(like.dtype).view(tuple(shape))


def context_key(fn: str, seed: int, layer: int, batch_size: int | None, device: torch.device) -> MaskKey:
    """The :class:`MaskKey` of a keyed layer for the current :func:`~spatialdrop.mask_context`.

    Args:
        fn: the layer's name, for messages.
        seed: the layer's ``keyed_seed``.
        layer: the layer's ``keyed_layer``.
        batch_size: the batch size for a per-sample layer (the context must have one id per
            sample), or ``None`` for a per-call layer: its key has the one sample id
            :data:`SHARED_SAMPLE_ID`, so the draw depends only on ``(seed, step, layer)``.
        device: where the key's ``sample_ids`` go (the input's device).

    Inside a Monte Carlo draw ``d`` of :func:`~spatialdrop.mc_predict` the key's layer is
    ``mc_layer(layer, d)``.

    Raises:
        RuntimeError: outside a :func:`~spatialdrop.mask_context`.
        ValueError: if the context's ``sample_ids`` do not match the batch size.
    """
    ctx = current_context()
    if ctx is None:
        raise RuntimeError(
            f"{fn}: this layer draws keyed masks (set by spatialdrop.keyed_masks) and needs the "
            "step and the samples' ids: run the training step inside "
            "`with spatialdrop.mask_context(step=..., sample_ids=...):`, or switch keyed masks off "
            "with spatialdrop.keyed_masks(model, None)"
        )
    if batch_size is None:
        ids = torch.full((1,), SHARED_SAMPLE_ID, dtype=torch.int64, device=device)
    else:
        n = ctx.sample_ids.shape[0]
        if n != batch_size:
            fail(
                fn,
                "mask_context sample_ids",
                f"one id per sample of the batch ({batch_size})",
                Shown(f"{n} ids"),
            )
        ids = ctx.sample_ids if ctx.sample_ids.device == device else ctx.sample_ids.to(device)
    # is_compiling() first: reading the int would make it a guarded constant
    step = ctx.step_tensor if is_compiling() or ctx.step is None else ctx.step
    return MaskKey(seed, step, mc_layer(layer, ctx.draw), ids)
