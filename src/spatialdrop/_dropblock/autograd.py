"""The one autograd formula and vmap rule of each sparse DropBlock op, and their torch.func form.

DropBlock is linear in its input for a given mask (the realized scale depends on the mask only),
so the gradient of ``spatialdrop::drop_block`` is ``spatialdrop::drop_block_backward`` applied to
the incoming gradient with the forward's plan and randomness arguments, and the backward op,
being linear too, has itself as its gradient: every order of derivative works (double
backward, ``gradgradcheck``, gradient penalties). Saved for backward: the plan (at most 1/32 of
the input's bytes, or nothing), ``info`` and ``factor`` (a few numbers), the int64 seed tensor
or the key's step and sample ids, and ``p`` (a float64 scalar).

Each formula is written once (:func:`_setup_forward` / :func:`_setup_backward` and
:func:`_replay`) and registered twice, because torch.func's transforms (``grad``, ``vmap``,
``jacrev``, ``jvp``) reject the autograd of a ``torch.library.custom_op`` (it has no ``setup_context``
staticmethod): with :func:`torch.library.register_autograd` on the op (eager, ``torch.compile``,
``opcheck``), and as :class:`ForwardFunction` / :class:`BackwardFunction`, the
``autograd.Function`` form that torch.func runs (:func:`call_forward` and the formula pick it
when a functorch transform is active). The vmap rule of each op runs it once per vmapped slice:
a batched seed (``randomness="different"``) gives each slice its own mask, an unbatched one
(``"same"``, or a key) the same mask; under vmap no plan is kept (plans of different lengths
cannot be stacked).

Forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``): the same formula
is the tangent's, ``jvp = mask * scale * tangent`` (the op is linear in its input), given as
the ``jvp`` of :class:`ForwardFunction` and :class:`BackwardFunction`; an input that carries a
forward-mode tangent (:func:`has_tangent`) is sent to them, as under torch.func.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from .._compat import is_compiling
from ..keyed import MaskKey
from . import fused
from .calibration import p_tensor
from .geometry import Geometry, geometry
from .scale import acc_dtype, expected_factor
from .sparse import (
    PLAN_EXACT,
    PLAN_NONE,
    SEEDS,
    backward_impl,
    draw_sparse,
    drop_block_backward,
    drop_block_op,
    forward_parts,
    op_key,
    package_plan,
    plan_capacity,
    seeds_backward,
    write_sparse,
)
from .window import local_geometry

__all__ = [
    "BackwardFunction",
    "EagerFunction",
    "ForwardFunction",
    "FusedFunction",
    "InplaceFunction",
    "call_backward",
    "call_forward",
    "direct_call_ok",
    "functorch_active",
    "fused_eager_takes",
    "has_tangent",
]

# the ops' arguments: input, seed, p, block_size, channel_dim, shared, seeding, scale, words, step,
# ids, plan, window; grad, heads, info, factor, seed, p, ..., ids, window (always all passed)
_FORWARD_ARGS = 13
_BACKWARD_ARGS = 15
_PLAN = 11  # the position of ``plan`` among the forward op's arguments


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is active (eager mode).

    Under ``torch.compile`` the ops are called directly: dynamo traces torch.func itself.
    """
    return not is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def has_tangent(input: Tensor) -> bool:
    """Whether ``input`` carries a forward-mode tangent (``torch.autograd.forward_ad``, eager mode)."""
    return fwAD._current_level >= 0 and not is_compiling() and fwAD.unpack_dual(input).tangent is not None


def _setup_forward(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...], jvp: bool = False) -> None:
    _, seed, p, blocks, channel_dim, shared, seeding, scale, words, step, ids, _, window = inputs
    _, heads, info, factor = output
    ctx.save_for_backward(heads, info, factor, seed, p, step, ids)
    if jvp:  # the torch.func form: the same tensors for the tangent's formula
        ctx.save_for_forward(heads, info, factor, seed, p, step, ids)
    ctx.options = (blocks, channel_dim, shared, seeding, scale, words, window)
    ctx.mark_non_differentiable(heads, info, factor)


def _setup_backward(ctx: Any, inputs: tuple[Any, ...], output: Tensor, jvp: bool = False) -> None:
    _, heads, info, factor, seed, p, blocks, channel_dim, shared, seeding, scale, words, step, ids, window = (
        inputs
    )
    ctx.save_for_backward(heads, info, factor, seed, p, step, ids)
    if jvp:
        ctx.save_for_forward(heads, info, factor, seed, p, step, ids)
    ctx.options = (blocks, channel_dim, shared, seeding, scale, words, window)


def _replay(ctx: Any, grad: Tensor) -> Tensor:
    """The formula: the incoming gradient times the forward's mask and scale."""
    heads, info, factor, seed, p, step, ids = ctx.saved_tensors
    blocks, channel_dim, shared, seeding, scale, words, window = ctx.options
    return call_backward(
        grad,
        heads,
        info,
        factor,
        seed,
        p,
        blocks,
        channel_dim,
        shared,
        seeding,
        scale,
        words,
        step,
        ids,
        window,
    )


def _forward_grads(ctx: Any, grad: Tensor, *_: Any) -> tuple[Optional[Tensor], ...]:
    return (_replay(ctx, grad),) + (None,) * (_FORWARD_ARGS - 1)


def _backward_grads(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
    return (_replay(ctx, grad),) + (None,) * (_BACKWARD_ARGS - 1)


def _forward_jvp(ctx: Any, tangent: Optional[Tensor], *_: Any) -> tuple[Optional[Tensor], ...]:
    return (None if tangent is None else _replay(ctx, tangent), None, None, None)


def _backward_jvp(ctx: Any, tangent: Optional[Tensor], *_: Any) -> Optional[Tensor]:
    return None if tangent is None else _replay(ctx, tangent)


def _function(name: str, op: Any, setup: Any, grads: Any, jvp: Any) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` that calls ``op`` with its formulas, for torch.func and forward AD."""

    def forward(*args: Any) -> Any:
        return op(*args)

    attrs = {
        "__doc__": f"``{op._qualname}`` with its formula, for torch.func transforms.",
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(functools.partial(setup, jvp=True)),
        "backward": staticmethod(grads),
        "jvp": staticmethod(jvp),
    }
    return type(name, (torch.autograd.Function,), attrs)


ForwardFunction = _function("ForwardFunction", drop_block_op, _setup_forward, _forward_grads, _forward_jvp)
BackwardFunction = _function(
    "BackwardFunction", drop_block_backward, _setup_backward, _backward_grads, _backward_jvp
)


class InplaceFunction(torch.autograd.Function):
    """``spatialdrop::drop_block`` written into its (dense) input: no full-size temporary.

    Eager mode only (the compiler and torch.func take the functional op and copy). The same
    arguments as the op; the same formula for backward.
    """

    @staticmethod
    def forward(ctx: Any, *args: Any) -> Tensor:
        input, seed, p, blocks, channel_dim, shared, seeding, scale, words, step, ids, plan, window = args
        if window is None:
            geo = geometry(input.shape, channel_dim, blocks, shared, seeding)
        else:
            geo = local_geometry(input.shape, channel_dim, blocks, shared)
        key = None if words is None else op_key(words, step, ids)
        kept, factor = write_sparse(input, input, geo, float(p), seeding, scale, seed, key, window)
        output = (input, *package_plan(kept, factor, input, geo, scale, plan))
        ctx.mark_dirty(input)
        _setup_forward(ctx, args, output)
        return input

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        return _forward_grads(ctx, grad)


class EagerFunction(torch.autograd.Function):
    """``spatialdrop::drop_block``'s own function and formula, without the dispatcher (eager only).

    The op's round trip through the dispatcher (argument defaults, the autograd kernel, the
    redispatch) costs about 0.1 ms a call, which :func:`direct_call_ok` calls avoid: the same
    function, the same saved tensors, the same backward (:func:`call_backward`).
    """

    @staticmethod
    def forward(ctx: Any, *args: Any) -> Tensor:
        output, ctx.fused_seeds = forward_parts(*args)  # kept seeds: backward's short way (below)
        _setup_forward(ctx, args, output)
        return output[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        if ctx.fused_seeds is not None and not torch.is_grad_enabled() and direct_call_ok(grad):
            # the formula's own arithmetic (backward_impl with kept seeds), without its dispatch
            blocks, channel_dim, shared, seeding = ctx.options[:4]
            geo = geometry(grad.shape, channel_dim, blocks, shared, seeding)
            seeds, factor = ctx.fused_seeds
            g = seeds_backward(grad, seeds, factor, geo)
            return (g,) + (None,) * (_FORWARD_ARGS - 1)
        return _forward_grads(ctx, grad)


def fused_eager_takes(input: Tensor, geo: Geometry, scale: str) -> bool:
    """Whether :class:`FusedFunction` takes a call that :func:`direct_call_ok` allows.

    The fused pass on a dense input, per channel, scale ``"expected"`` or ``"none"``, a seed grid
    that int32 indexes.
    """
    return scale != "realized" and geo.places < 2**31 and fused.available(input, geo)


class FusedFunction(torch.autograd.Function):
    """The eager sparse path's common case in one sweep each way, with nothing else around it.

    What :class:`EagerFunction` runs for a dense float32/float64 input with per-channel masks
    and the fused pass (:func:`fused_eager_takes`), without the op's packaging: the same seeds
    (drawn by :func:`~.sparse.draw_sparse` from the same seed or key), the same sweep
    (:func:`.fused.write`), the same bits. Forward keeps the int32 seeds when they take at most
    1/32 of the input's bytes (else nothing: backward draws them again), and backward runs the
    sweep on the gradient (:func:`~.sparse.seeds_backward`). A backward that records a graph
    (double backward, gradient penalties) or gets a gradient that the direct call cannot take
    goes through the backward op, with the ``heads``/``info``/``factor`` that the forward op
    would have returned, built then: the op's one formula.

    In a training step on a 25 MB activation the Python around the two sweeps costs about twice
    what it costs on a small one (the sweeps leave the caches cold): each call and temporary
    avoided here is worth that twice (docs/archive/benchmarks-history.md, "the memory limit").
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        seed: Optional[Tensor],
        p: float,
        geo: Geometry,
        seeding: str,
        scale: str,
        key: Optional[MaskKey],
        randomness: tuple[Optional[list[int]], Optional[Tensor], Optional[Tensor]],
    ) -> Tensor:
        seeds = draw_sparse(input, geo, p, seeding, seed, key, None, small=True)
        out = torch.empty_like(input)
        factor = None if scale == "none" else expected_factor(p, input.dtype)
        fused.write(out, input, factor, seeds, geo)
        kept = seeds.numel() <= plan_capacity(out)
        # always one tensor (empty when not kept), so that a checkpoint's recompute saves as many
        ctx.save_for_backward(seeds.to(torch.int32) if kept else seeds.new_empty(0, dtype=torch.int32))
        ctx.fused = (geo, p, seeding, scale, factor, seed, randomness, kept)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        (seeds,) = ctx.saved_tensors
        geo, p, seeding, scale, factor, seed, (words, step, ids), kept = ctx.fused
        none = (None,) * 7
        if kept and not torch.is_grad_enabled() and direct_call_ok(grad):
            return (seeds_backward(grad, seeds, factor, geo), *none)
        plan = [(SEEDS, seeds)] if kept else None
        fac = None if factor is None else torch.full((1,), factor, dtype=acc_dtype(grad))
        heads, info, fac_t = package_plan(plan, fac, grad, geo, scale, PLAN_EXACT)
        options = (list(geo.blocks), geo.channel_dim, geo.shared, seeding, scale)
        g = call_backward(grad, heads, info, fac_t, seed, p_tensor(p), *options, words, step, ids, None)
        return (g, *none)


def direct_call_ok(input: Tensor) -> bool:
    """Whether the ops' plain functions may run without the dispatcher: eager, a plain tensor.

    Not under ``torch.compile``, a torch.func transform or a dispatch mode (fake tensors, probes),
    and not for tensor subclasses: those need the op (its fake function, its registrations); not
    for an input with a forward-mode tangent (:func:`call_forward` takes it).
    """
    return (
        type(input) in (Tensor, torch.nn.Parameter)
        and not is_compiling()
        and not functorch_active()
        and _current_dispatch_mode() is None
        and not has_tangent(input)
    )


def _no_plan(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (*args[:_PLAN], PLAN_NONE, *args[_PLAN + 1 :])


def call_forward(*args: Any) -> tuple[Tensor, ...]:
    """Call ``spatialdrop::drop_block``, through :class:`ForwardFunction` under torch.func or forward AD."""
    if functorch_active() or has_tangent(args[0]):
        return ForwardFunction.apply(*_no_plan(args))
    return drop_block_op(*args)


def call_backward(*args: Any) -> Tensor:
    """Call ``spatialdrop::drop_block_backward``: :class:`BackwardFunction` under torch.func, forward AD."""
    if functorch_active() or has_tangent(args[0]):
        return BackwardFunction.apply(*args)
    if not torch.is_grad_enabled() and direct_call_ok(args[0]):  # no graph to record: the function
        return backward_impl(*args)
    return drop_block_backward(*args)


def _vmap_rule(call: Any) -> Any:
    def rule(info: Any, in_dims: tuple[Any, ...], *args: Any) -> Any:
        outs = []
        for i in range(info.batch_size):
            sliced = [
                a.select(d, i) if isinstance(a, Tensor) and d is not None else a
                for a, d in zip(args, in_dims)
            ]
            outs.append(call(*sliced))
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0

    return rule


def _forward_no_plan(*args: Any) -> tuple[Tensor, ...]:
    return drop_block_op(*_no_plan(args))


torch.library.register_autograd(drop_block_op, _forward_grads, setup_context=_setup_forward)
torch.library.register_autograd(drop_block_backward, _backward_grads, setup_context=_setup_backward)
# the rules run below the vmap level: the ops themselves, once per slice
torch.library.register_vmap(drop_block_op, _vmap_rule(_forward_no_plan))
torch.library.register_vmap(drop_block_backward, _vmap_rule(drop_block_backward))
