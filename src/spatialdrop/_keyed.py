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

import collections
import math
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._compat import dispatch_mode_active, is_compiling
from ._validation import Shown, fail
from .keyed import KEYINGS, MaskKey, check_key, current_context, keyed_uniform, mc_layer, uniform_rows

__all__ = [
    "KEYINGS",
    "SHARED_SAMPLE_ID",
    "check_key_arg",
    "context_key",
    "guard_key",
    "input_version",
    "keyed_keep",
]

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


# The keys (step, sample ids, Monte Carlo draw) that each keyed layer drew its recent forwards
# with, per thread: a layer recomputed during backward (activation checkpointing) must find the
# key of its context among them.
_FORWARDS = threading.local()
_REMEMBERED = 64


def _same_key(a: Any, b: Any) -> bool:
    step_a = a.step if a.step is not None else int(a.step_tensor)
    step_b = b.step if b.step is not None else int(b.step_tensor)
    return bool(step_a == step_b and a.draw == b.draw and torch.equal(a.sample_ids, b.sample_ids))


def _check_recompute(fn: str, seed: int, layer: int, ctx: Any) -> None:
    """Refuse a keyed layer's checkpoint recompute under another key than its forward's.

    ``torch.utils.checkpoint`` re-runs a region's forward during backward to recreate what it
    did not save; a keyed layer re-draws its masks from the *current* context then, so a
    backward run under another step's context (or none) would silently get a wrong gradient.
    A forward outside backward remembers its context (a reentrant checkpoint runs it under
    ``no_grad``); a forward inside backward (the recompute) must run under a context with the
    same step and sample ids as a remembered one.
    """
    remembered = getattr(_FORWARDS, "contexts", None)
    if remembered is None:
        remembered = _FORWARDS.contexts = {}
    contexts = remembered.setdefault((seed, layer), collections.deque(maxlen=_REMEMBERED))
    if torch._C._current_graph_task_id() == -1:  # a forward: remember its context
        if ctx is not None and (not contexts or contexts[-1] is not ctx):
            contexts.append(ctx)
        return
    if ctx is None or not any(_same_key(ctx, old) for old in reversed(contexts)):
        raise RuntimeError(
            f"{fn}: this keyed layer is being recomputed during backward (activation "
            "checkpointing) under another mask_context (step and sample ids) than its forward, "
            "so it would draw other masks and give a wrong gradient: call loss.backward() inside "
            "`with spatialdrop.mask_context(...)` with the forward's step and sample ids"
        )


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
    if not is_compiling():
        _check_recompute(fn, seed, layer, ctx)
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
    if not is_compiling():
        _FORWARDS.pending = (ctx.step_tensor, ctx.sample_ids, ctx.draw)  # for guard_key (the layer's output)
    return MaskKey(seed, step, mc_layer(layer, ctx.draw), ids)


class _KeyGuard(torch.autograd.Function):
    """The identity on a keyed layer's output that checks, in backward, the key of its forward.

    Its saved tensors are the context's step and sample ids: a non-reentrant checkpoint replaces
    them by the ones its recompute used, while the attributes set in forward stay those of the
    forward, so a recompute under another key is caught exactly (before its gradient is used).

    It is an in-place identity (``mark_dirty``), not a view: the layer's output stays a tensor the
    model may modify in place (timm's ``x += shortcut`` after its DropBlock and DropPath), which a
    view made inside a custom Function may not be.
    """

    @staticmethod
    def forward(ctx: Any, out: Tensor, step: Tensor, ids: Tensor, fn: str, draw: int) -> Tensor:
        ctx.save_for_backward(step, ids)
        ctx.key = (int(step), ids, draw, fn)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        step, ids = ctx.saved_tensors
        forward_step, forward_ids, _, fn = ctx.key
        same_ids = ids.device.type != "cpu" or torch.equal(ids, forward_ids)  # no device read
        if int(step) != forward_step or not same_ids:
            raise RuntimeError(
                f"{fn}: this keyed layer was recomputed during backward (activation "
                f"checkpointing) under step {int(step)} instead of its forward's step {forward_step} "
                "(or under other sample ids), so its masks and gradient would be wrong: call "
                "loss.backward() inside `with spatialdrop.mask_context(...)` with the forward's step "
                "and sample ids"
            )
        return grad, None, None, None, None


def input_version(input: object) -> int | None:
    """The version counter of a keyed layer's eager input, read before the layer runs.

    ``None`` where :func:`guard_key` wraps nothing anyway (not a plain tensor, under the compiler
    or a torch.func transform), so that nothing is read there.
    """
    if type(input) is not Tensor or is_compiling():
        return None
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return None
    return input._version


def _untouched_alias(output: Tensor, input: Tensor | None, version: int | None) -> bool:
    """Whether ``output`` is ``input`` or a view of it that the layer did not modify in place."""
    if input is None or version is None or type(input) is not Tensor:
        return False
    if output is not input and output.untyped_storage().data_ptr() != input.untyped_storage().data_ptr():
        return False
    return input._version == version


def guard_key(fn: str, output: Tensor, input: Tensor | None = None, version: int | None = None) -> Tensor:
    """Wrap a keyed layer's eager output so that a checkpoint recompute under another key raises.

    Takes the key that :func:`context_key` just handed out (per thread); nothing for an unkeyed
    call, without grad, under the compiler, a torch.func transform or a dispatch mode (fake
    tensors), for a DTensor, on meta tensors, or when the context's step is not on the CPU
    (reading it must not wait for a device: the context-memory check of
    :func:`_check_recompute` still applies). Sample ids on a device are not compared in backward
    (no device read): the step is. Nor for a leaf, or for an output that is the layer's
    ``input`` or a view of it, left unmodified (``version``: the input's version counter before
    the layer ran, from :func:`input_version`): a layer that dropped nothing (``p = 0``, as a
    :class:`~spatialdrop.DropSchedule` sets at its first step), also ``inplace`` or on unbatched
    input. Such an output does not depend on the key, and the guard is an in-place identity:
    marking a tensor that an earlier op saved (ReLU saves its output) would break that op's
    backward.
    """
    pending = getattr(_FORWARDS, "pending", None)
    _FORWARDS.pending = None
    if pending is None or not (torch.is_grad_enabled() and output.requires_grad):
        return output
    if output.grad_fn is None:
        return output
    if is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return output
    if type(output) is not Tensor and not isinstance(output, torch.nn.Parameter):
        return output  # a DTensor or another subclass: left as it is
    step, ids, draw = pending
    if step.device.type != "cpu" or output.device.type == "meta" or dispatch_mode_active():
        return output  # reading the step must not wait for a device; fake tensors hold no values
    if _untouched_alias(output, input, version):
        return output
    out: Tensor = _KeyGuard.apply(output, step, ids, fn, draw)
    return out
