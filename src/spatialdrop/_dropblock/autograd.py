"""The one autograd formula and vmap rule of each sparse DropBlock op, and their torch.func form.

DropBlock is linear in its input for a given mask (the realized scale depends on the mask only),
so the gradient of ``spatialdrop::drop_block`` is ``spatialdrop::drop_block_backward`` applied to
the incoming gradient with the forward's plan and randomness arguments (what is saved: the
table in :mod:`.ops`), and the backward op, being linear too, has itself as its gradient: every
order of derivative works (double backward, ``gradgradcheck``, gradient penalties).

Each formula is written once (:func:`_setup_forward` / :func:`_setup_backward` and
:func:`_replay`) and registered twice, because torch.func rejects the autograd of a
``torch.library.custom_op``: with :func:`torch.library.register_autograd` on the op, and as
:class:`ForwardFunction` / :class:`BackwardFunction`, the ``autograd.Function`` form that
torch.func runs (:func:`call_forward` and the formula pick it under a transform). The vmap
rule of each op runs it once per vmapped slice: a batched seed (``randomness="different"``)
gives each slice its own mask, an unbatched one (``"same"``, or a key) the same mask; under
vmap no plan is kept (plans of different lengths cannot be stacked).

Forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``): the same formula
is the tangent's, ``jvp = mask * scale * tangent`` (the op is linear in its input), given as the
``jvp`` of :class:`ForwardFunction` and :class:`BackwardFunction`; an input that carries a
forward-mode tangent (:func:`has_tangent`) is sent to them, as under torch.func.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

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
    BackwardArgs,
    ForwardArgs,
    KeyWords,
    backward_impl,
    draw_sparse,
    drop_block_backward,
    drop_block_op,
    forward_parts,
    package_plan,
    plan_capacity,
    seeds_backward,
)

__all__ = [
    "BackwardFunction",
    "EagerFunction",
    "ForwardFunction",
    "FusedFunction",
    "call_backward",
    "call_forward",
    "direct_call_ok",
    "functorch_active",
    "has_tangent",
]

_NO_GRADS = (None,) * (len(ForwardArgs._fields) - 1)  # for every argument but the input


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is active (eager mode).

    Under ``torch.compile`` the ops are called directly: dynamo traces torch.func itself.
    """
    return not is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def has_tangent(input: Tensor) -> bool:
    """Whether ``input`` carries a forward-mode tangent (``torch.autograd.forward_ad``, eager mode)."""
    return fwAD._current_level >= 0 and not is_compiling() and fwAD.unpack_dual(input).tangent is not None


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


class Options(NamedTuple):
    """What forward keeps for backward besides the saved tensors: the op's non-tensor arguments."""

    block_size: list[int]
    channel_dim: int
    shared: bool
    seeding: str
    scale: str
    key_words: Optional[list[int]]
    window: Optional[list[int]]


def _save(
    ctx: Any, a: ForwardArgs | BackwardArgs, heads: Tensor, info: Tensor, factor: Tensor, jvp: bool
) -> None:
    ctx.save_for_backward(heads, info, factor, a.seed, a.p, a.step, a.sample_ids)
    if jvp:  # the torch.func form: the same tensors for the tangent's formula
        ctx.save_for_forward(heads, info, factor, a.seed, a.p, a.step, a.sample_ids)
    ctx.options = Options(a.block_size, a.channel_dim, a.shared, a.seeding, a.scale, a.key_words, a.window)


def _setup_forward(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...], jvp: bool = False) -> None:
    _, heads, info, factor = output
    _save(ctx, ForwardArgs(*inputs), heads, info, factor, jvp)
    ctx.mark_non_differentiable(heads, info, factor)


def _setup_backward(ctx: Any, inputs: tuple[Any, ...], output: Tensor, jvp: bool = False) -> None:
    b = BackwardArgs(*inputs)
    _save(ctx, b, b.heads, b.info, b.factor, jvp)


def _replay(ctx: Any, grad: Tensor) -> Tensor:
    """The formula: the incoming gradient times the forward's mask and scale."""
    heads, info, factor, seed, p, step, ids = ctx.saved_tensors
    o: Options = ctx.options
    return call_backward(
        BackwardArgs(
            grad, heads, info, factor, seed, p, o.block_size, o.channel_dim, o.shared, o.seeding, o.scale,
            o.key_words, step, ids, o.window,
        )
    )  # fmt: skip


def _forward_grads(ctx: Any, grad: Tensor, *_: Any) -> tuple[Optional[Tensor], ...]:
    return (_replay(ctx, grad), *_NO_GRADS)


def _backward_grads(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
    return (_replay(ctx, grad),) + (None,) * (len(BackwardArgs._fields) - 1)


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


class EagerFunction(torch.autograd.Function):
    """``spatialdrop::drop_block``'s own function and formula, without the dispatcher (eager only).

    The dispatcher's round trip (argument defaults, the autograd kernel, the redispatch) costs
    more than the rest of a small call, which :func:`direct_call_ok` calls avoid: the same
    function, the same saved tensors, the same backward (:func:`call_backward`). With
    ``inplace`` the output is written into the (dense) input: no full-size temporary.
    """

    @staticmethod
    def forward(ctx: Any, inplace: bool, *args: Any) -> Tensor:
        output, ctx.fused_seeds = forward_parts(ForwardArgs(*args), inplace)  # seeds: the short way below
        if inplace:
            ctx.mark_dirty(output[0])
        _setup_forward(ctx, args, output)
        return output[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        if ctx.fused_seeds is not None and not torch.is_grad_enabled() and direct_call_ok(grad):
            # the formula's own arithmetic (backward_impl with kept seeds), without its dispatch
            o: Options = ctx.options
            geo = geometry(grad.shape, o.channel_dim, o.block_size, o.shared, o.seeding)
            seeds, factor = ctx.fused_seeds
            return (None, seeds_backward(grad, seeds, factor, geo), *_NO_GRADS)
        return (None, *_forward_grads(ctx, grad))


class FusedFunction(torch.autograd.Function):
    """The eager sparse path's common case (``Path.FUSED`` in :mod:`.ops`) in one sweep each way.

    What :class:`EagerFunction` runs for it, without the op's packaging: the same seeds (from
    :func:`~.sparse.draw_sparse`), the same sweep (:func:`.fused.write`), the same bits; the
    seeds kept as the table in :mod:`.ops` says. Backward runs the sweep on the gradient
    (:func:`~.sparse.seeds_backward`); one that records a graph (double backward, gradient
    penalties) or gets a gradient that the direct call cannot take goes through the backward op,
    with the ``heads``/``info``/``factor`` that the forward op would have returned, built then.
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
        randomness: KeyWords,
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
        geo, p, seeding, scale, factor, seed, kw, kept = ctx.fused
        none = (None,) * 7
        if kept and not torch.is_grad_enabled() and direct_call_ok(grad):
            return (seeds_backward(grad, seeds, factor, geo), *none)
        plan = [(SEEDS, seeds)] if kept else None
        fac = None if factor is None else torch.full((1,), factor, dtype=acc_dtype(grad))
        heads, info, fac_t = package_plan(plan, fac, grad, geo, scale, PLAN_EXACT)
        args = BackwardArgs(
            grad, heads, info, fac_t, seed, p_tensor(p), list(geo.blocks), geo.channel_dim, geo.shared,
            seeding, scale, kw.words, kw.step, kw.ids, None,
        )  # fmt: skip
        return (call_backward(args), *none)


def call_forward(a: ForwardArgs) -> tuple[Tensor, ...]:
    """Call ``spatialdrop::drop_block``: :class:`ForwardFunction` (no plan) under torch.func, forward AD."""
    if functorch_active() or has_tangent(a.input):
        return ForwardFunction.apply(*a._replace(plan=PLAN_NONE))
    return drop_block_op(*a)


def call_backward(b: BackwardArgs) -> Tensor:
    """Call ``spatialdrop::drop_block_backward``: :class:`BackwardFunction` under torch.func, forward AD."""
    if functorch_active() or has_tangent(b.grad):
        return BackwardFunction.apply(*b)
    if not torch.is_grad_enabled() and direct_call_ok(b.grad):  # no graph to record: the function
        return backward_impl(*b)
    return drop_block_backward(*b)


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
    return drop_block_op(*ForwardArgs(*args)._replace(plan=PLAN_NONE))


torch.library.register_autograd(drop_block_op, _forward_grads, setup_context=_setup_forward)
torch.library.register_autograd(drop_block_backward, _backward_grads, setup_context=_setup_backward)
# the rules run below the vmap level: the ops themselves, once per slice
torch.library.register_vmap(drop_block_op, _vmap_rule(_forward_no_plan))
torch.library.register_vmap(drop_block_backward, _vmap_rule(drop_block_backward))
