"""ResidualDropPath: stochastic depth that runs the residual branch on the kept samples only.

``x + drop_path(branch(x), p)`` computes the branch for every sample and then multiplies the
dropped ones by zero; :func:`drop_path_residual` gives the same result but calls the branch on
the kept rows only (``index_select`` -> branch -> ``index_add``), so a drop rate ``p`` saves about
a fraction ``p`` of the branch's forward and backward work and of the activations it keeps for
backward. Where the kept count cannot be read (see :func:`_can_skip`) the same law is computed
on the whole batch, as ``x + branch(x) * keep / (1 - p)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.overrides import handle_torch_function, has_torch_function_unary

from ._compat import captures_dynamic_output_shapes, dispatch_mode_active, in_vmap, is_compiling, is_exporting
from ._dtensor import check_sharding, is_dtensor
from ._keyed import check_key_arg
from ._module import StructuredDropout
from ._validation import (
    Shown,
    check_bool,
    check_float_input,
    check_generator,
    check_min_rank,
    check_p,
    check_scale_fits,
    check_tensor,
    fail,
)
from .drop_path import _draw_keep, drop_path
from .keyed import MaskKey

__all__ = ["ResidualDropPath", "drop_path_residual"]

_LAYOUT = "(N, *) with the batch at dim 0"
_BATCHED_ALLOWED = "a collection of ints (positions in args) and strs (names in kwargs)"


def check_batched_args(fn: str, batched_args: Any) -> tuple[int | str, ...]:
    """Check ``batched_args``: positions (ints >= 0) in ``args`` and names (strs) in ``kwargs``."""
    if isinstance(batched_args, (str, bytes)) or not isinstance(batched_args, Collection):
        fail(fn, "batched_args", _BATCHED_ALLOWED, batched_args, kind=TypeError)
    out: list[int | str] = []
    for item in batched_args:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
            if item < 0:
                fail(fn, "batched_args", _BATCHED_ALLOWED + " (positions >= 0)", batched_args)
            out.append(int(item))
        else:
            fail(fn, "batched_args", _BATCHED_ALLOWED, batched_args, kind=TypeError)
    return tuple(out)


def _check_extra(
    fn: str, n: int, args: Any, kwargs: Any, batched_args: Any
) -> tuple[tuple[Any, ...], dict[str, Any], tuple[int | str, ...]]:
    """Check the branch's extra arguments; every one named in ``batched_args`` must have the batch."""
    if not isinstance(args, (tuple, list)):
        fail(
            fn,
            "args",
            "a tuple of the branch's extra positional arguments",
            Shown(type(args).__name__),
            kind=TypeError,
        )
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        fail(
            fn,
            "kwargs",
            "None or a mapping of the branch's keyword arguments",
            Shown(type(kwargs).__name__),
            kind=TypeError,
        )
    batched = check_batched_args(fn, batched_args)
    for item in batched:
        if isinstance(item, int):
            if item >= len(args):
                fail(fn, "batched_args", f"positions in args (it has {len(args)})", batched_args)
            name, value = f"args[{item}]", args[item]
        else:
            if item not in kwargs:
                fail(fn, "batched_args", f"names in kwargs (it has {sorted(kwargs)})", batched_args)
            name, value = f"kwargs[{item!r}]", kwargs[item]
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != n:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            fail(fn, name, f"a tensor with the batch ({n}) at dim 0, as batched_args says", Shown(got))
    return tuple(args), dict(kwargs), batched


def _can_skip(input: Tensor) -> bool:
    """Whether the kept samples can be gathered: the kept count is a size the call may depend on.

    Eager mode: yes (on an accelerator reading the count costs one host synchronisation). Under
    ``torch.compile`` only when dynamo captures ops with data-dependent output shapes
    (``torch._dynamo.config.capture_dynamic_output_shape_ops = True``: the count becomes an
    unbacked size); by default the whole batch is computed, which keeps the graph in one piece.
    Not under ``torch.export`` / ONNX export, ``vmap``, fake or meta tensors (no data to read).
    """
    if is_compiling():  # first: nothing below may be traced by dynamo
        return captures_dynamic_output_shapes() and not is_exporting()
    return input.device.type != "meta" and not dispatch_mode_active() and not in_vmap()


def _checked_output(fn: str, out: Any, rows: Tensor, exact_batch: bool) -> Tensor:
    """The branch's output, which must be a tensor of the shape of its input rows."""
    if not isinstance(out, Tensor):
        fail(
            fn,
            "branch",
            "a callable that returns a tensor",
            Shown(f"one that returned {type(out).__name__}"),
            kind=TypeError,
        )
    same = out.shape == rows.shape if exact_batch else out.shape[1:] == rows.shape[1:]
    if not same:
        fail(
            fn,
            "branch",
            "a callable that returns a tensor of the shape of its input rows",
            Shown(f"output {tuple(out.shape)} for input rows {tuple(rows.shape)}"),
        )
    return out


def _rows_like(rows: Tensor, input: Tensor) -> Tensor:
    """Gathered rows in the input's channels-last memory format, if it has one (conv branches)."""
    if input.is_contiguous():
        return rows
    for fmt, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if input.dim() == ndim and input.is_contiguous(memory_format=fmt):
            return rows.contiguous(memory_format=fmt)
    return rows


def _add_rows(input: Tensor, index: Tensor, rows: Tensor, scale: float) -> Tensor:
    """``input`` with ``rows * scale`` added to its rows ``index`` (dim 0), in ``input``'s memory format."""
    if input.is_contiguous():
        return input.index_add(0, index, rows, alpha=scale)
    return input.clone().index_add_(0, index, rows, alpha=scale)  # clone keeps the memory format


class _AddKeptRows(torch.autograd.Function):
    """``input`` with ``rows * scale`` added to the rows ``index`` (dim 0): the kept branch outputs.

    Autograd's ``rows * scale`` then ``index_add`` allocates a buffer of the kept rows' size in
    forward (the product) and two in backward (``index_select`` of the gradient, then the
    multiply); large buffers are fresh pages under glibc's default allocator, which costs more
    than the arithmetic. Here the scale is fused into forward's add (``alpha``) and backward
    scales its one ``index_select`` in place. The gradient of ``input`` is the output's own.
    Eager only: dynamo does not trace a Function with a ``jvp``, and a compiled graph plans its
    own buffers (there the plain ops are used).
    """

    @staticmethod
    def forward(input: Tensor, index: Tensor, rows: Tensor, scale: float) -> Tensor:
        return _add_rows(input, index, rows, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        input, index, _, scale = inputs
        ctx.save_for_backward(index)
        ctx.save_for_forward(index)
        ctx.scale = scale
        ctx.shape = input.shape

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        (index,) = ctx.saved_tensors
        grad_rows = grad.index_select(0, index).mul_(ctx.scale) if ctx.needs_input_grad[2] else None
        return grad, None, grad_rows, None

    @staticmethod
    def jvp(ctx: Any, input_t: Tensor | None, index_t: None, rows_t: Tensor | None, scale_t: None) -> Tensor:
        (index,) = ctx.saved_tensors
        if rows_t is None:
            assert input_t is not None
            return input_t.clone()
        base = (
            torch.zeros(ctx.shape, dtype=rows_t.dtype, device=rows_t.device) if input_t is None else input_t
        )
        return base.index_add(0, index, rows_t, alpha=ctx.scale)


def drop_path_residual(
    input: Tensor,
    branch: Callable[..., Tensor],
    p: float = 0.1,
    *,
    training: bool = True,
    generator: torch.Generator | None = None,
    key: MaskKey | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    batched_args: Collection[int | str] = (),
) -> Tensor:
    r"""``input + drop_path(branch(input), p)``, calling ``branch`` on the kept samples only.

    Stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016,
    https://arxiv.org/abs/1603.09382) drops a residual branch per sample: row ``n`` of the result
    is ``input[n]`` (dropped, probability ``p``) or ``input[n] + branch(input)[n] / (1 - p)``
    (kept; the scale is ``1 / (1 - p)``, never the batch's kept fraction). Unlike
    ``input + drop_path(branch(input))``, which computes the branch for every sample and then
    zeroes the dropped ones, this gathers the kept rows, runs ``branch`` on them alone and adds
    the result back (``index_select`` -> ``branch`` -> ``index_add``): the branch's forward and
    backward work, and the activations it keeps for backward, shrink by a fraction ``p`` on
    average.

    The random draw is :func:`~spatialdrop.functional.drop_path`'s: with the same seed (or the
    same ``key``) the same samples are dropped as by ``drop_path(branch(input), p)`` (drawn in
    ``input``'s dtype, which a branch usually keeps); the
    dropped rows are ``input``'s bits and the kept rows equal ``input + drop_path(branch(input))``
    up to rounding (the scaled add is one fused multiply-add).

    Other branch arguments are documented with ``batched_args`` below. Reading the kept count is
    one host synchronisation on an accelerator. Under DDP, a rank whose whole batch is dropped
    gives its branch parameters no gradient: see the README (``find_unused_parameters=True``).

    The branch must treat the samples independently, as LayerNorm, linear layers, convolutions
    and attention within a sample do. A branch whose result for one sample depends on the others
    (BatchNorm in training mode: its batch statistics and running averages) sees only the kept
    samples, so its output differs from the branch run on the whole batch.

    Whole-batch cases: in eval mode (``training=False``), for ``p = 0`` and for an input with no
    elements the branch is called once on the whole batch and ``input + branch(input)`` is
    returned. When every sample is dropped (always at ``p = 1``) the branch is not called and
    ``input`` itself is returned; when none is, the branch runs on the input itself (no gather).
    Under ``torch.compile`` (unless ``torch._dynamo.config.capture_dynamic_output_shape_ops`` is
    set), ``torch.export``, ``vmap`` and on fake or meta tensors the branch runs on the whole batch
    and the result is ``input + branch(input) * mask / (1 - p)``: the same law, no saving. With
    that flag the compiled graph gathers the kept rows (an unbacked size) and, when none is kept,
    calls the branch on zero rows.

    Args:
        input: a floating-point tensor with at least 1 dim; dim 0 is always the batch.
        branch: the residual branch, a module or any callable ``rows -> tensor of rows' shape``.
        p: probability of dropping a sample's branch, in ``[0, 1]``. Default: 0.1.
        training: apply the drop if ``True``; else return ``input + branch(input)``. Default: True.
        generator: the random number generator to draw from. Default: the global one.
        key: draw keyed masks instead (see :mod:`spatialdrop.keyed`), the same as ``drop_path``'s
            for this key. Not together with ``generator``. Default: None.
        args: more positional arguments for the branch, after the rows. Default: none.
        kwargs: keyword arguments for the branch. Default: none.
        batched_args: which of ``args`` (by position) and ``kwargs`` (by name) hold the batch at
            dim 0 (a key padding mask of shape ``(N, L)``, per-sample conditioning): they are
            gathered with the kept rows. Every other argument is passed unchanged to every call
            (a shared ``(L, L)`` attention mask, a rotary table). Default: none.

    Shape:
        - Input: :math:`(N, *)`, any number of trailing dims (tokens, channels, spatial).
        - Output: the same shape and memory format as the input, the dtype of
          ``input + branch(input)``.

    Returns:
        ``input`` plus the branch's output on the kept samples, scaled by ``1 / (1 - p)``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from spatialdrop.functional import drop_path_residual
        >>> seen = []
        >>> def branch(rows):
        ...     seen.append(rows.shape[0])  # how many samples the branch computes
        ...     return torch.ones_like(rows)
        >>> g = torch.Generator().manual_seed(0)
        >>> y = drop_path_residual(torch.zeros(6, 2), branch, p=0.5, generator=g)
        >>> y[:, 0]  # kept samples get the branch's output / (1 - p), dropped ones the input
        tensor([0., 0., 2., 0., 0., 0.])
        >>> seen  # the branch ran on the one kept sample only
        [1]
        >>> mlp = nn.Sequential(nn.LayerNorm(384), nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384))
        >>> drop_path_residual(torch.randn(8, 197, 384), mlp, p=0.3).shape  # ViT tokens (N, L, D)
        torch.Size([8, 197, 384])
    """
    if has_torch_function_unary(input):  # torch.fx proxies, tensor subclasses: as torch's functions
        return handle_torch_function(
            drop_path_residual,
            (input,),
            input,
            branch,
            p,
            training=training,
            generator=generator,
            key=key,
            args=args,
            kwargs=kwargs,
            batched_args=batched_args,
        )
    fn = "drop_path_residual"
    check_float_input(fn, input)
    check_min_rank(fn, input, 1, _LAYOUT)
    if not callable(branch):
        fail(
            fn,
            "branch",
            "a callable (a module or a function of the input rows)",
            Shown(type(branch).__name__),
            kind=TypeError,
        )
    p = check_p(fn, p)
    check_bool(fn, "training", training)
    check_generator(fn, generator)
    n = input.shape[0]
    check_key_arg(fn, key, generator, n)
    args, kwargs, batched = _check_extra(fn, n, args, kwargs, batched_args)
    check_sharding(fn, input)
    if not training or p == 0.0 or input.numel() == 0:
        return input + _checked_output(fn, branch(input, *args, **kwargs), input, True)
    if p == 1.0:
        return input
    check_scale_fits(fn, p, input.dtype, 1.0 / (1.0 - p), "1/(1-p)")
    if is_dtensor(input):  # each rank's part of one draw (drop_path's); the branch on the whole batch
        out = _checked_output(fn, branch(input, *args, **kwargs), input, True)
        return input + drop_path(out, p, training=True, generator=generator, key=key)
    noise = _draw_keep(input, p, True, generator, key)  # (N, 1, ...): 0 or 1/(1-p), drop_path's draw
    if not _can_skip(input):
        out = _checked_output(fn, branch(input, *args, **kwargs), input, True)
        return input + out * noise.to(out.dtype)
    idx = noise.reshape(n).nonzero().squeeze(1)
    if not is_compiling():  # eager: the count is an int; compiled, an unbacked size (no branching on it)
        kept = idx.shape[0]
        if kept == 0:
            return input
        if kept == n:
            out = _checked_output(fn, branch(input, *args, **kwargs), input, True)
            return input + out * noise.to(out.dtype)
    rows = _rows_like(input.index_select(0, idx), input)
    a = tuple(t.index_select(0, idx) if i in batched else t for i, t in enumerate(args))
    kw = {k: v.index_select(0, idx) if k in batched else v for k, v in kwargs.items()}
    out = _checked_output(fn, branch(rows, *a, **kw), rows, not is_compiling())
    dtype = torch.promote_types(input.dtype, out.dtype)
    base = input if input.dtype == dtype else input.to(dtype)
    # drop_path's scale, rounded to the branch output's dtype; the add fuses it (one rounding)
    scale = torch.ones((), dtype=out.dtype).div_(1.0 - p).item() if not is_compiling() else 1.0 / (1.0 - p)
    if is_compiling():
        return _add_rows(base, idx, out.to(dtype), scale)
    return _AddKeptRows.apply(base, idx, out.to(dtype), scale)


def residual_forward(
    module: ResidualDropPath, input: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor:
    """Run ``module``'s computation: wrapped with :func:`torch.fx.wrap`, one node in a traced graph.

    As for the other layers (``_module.structured_forward``), the traced graph reads ``training``
    and ``p`` when it runs; the branch runs inside the node.
    """
    return module.residual(input, args, kwargs)


torch.fx.wrap("residual_forward")


class ResidualDropPath(StructuredDropout):
    r"""A residual block with DropPath that skips the dropped samples' compute: ``x + drop_path(branch(x))``.

    See :func:`spatialdrop.functional.drop_path_residual`: in training each sample's branch is
    dropped with probability ``p`` (the sample passes through unchanged) or kept and scaled by
    ``1 / (1 - p)``, and ``branch`` runs on the kept samples only. In eval mode (and for
    ``p = 0``) it returns ``x + branch(x)``. Keyed masks are :class:`DropPath`'s for the same
    key. The branch is a child module (``state_dict`` keys ``branch.*``); :func:`mc_dropout`
    puts this layer in training mode and leaves the branch's own modules in eval.

    Extra arguments of ``forward(x, *args, **kwargs)`` go to the branch; those named in
    ``batched_args`` hold the batch at dim 0 and are gathered with the kept samples, the others
    are passed unchanged.

    Args:
        branch: the residual branch, a module whose output has its input's shape.
        p: probability of dropping a sample's branch, in ``[0, 1]``. Default: 0.1.
        batched_args: positions in ``args`` (0 is the first argument after ``x``) and names in
            ``kwargs`` of the extra arguments that hold the batch at dim 0. Default: none.

    Shape:
        - Input: :math:`(N, *)`.
        - Output: same as the input.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from spatialdrop import ResidualDropPath
        >>> ResidualDropPath(nn.Linear(4, 4), 0.2)
        ResidualDropPath(
          p=0.2
          (branch): Linear(in_features=4, out_features=4, bias=True)
        )
        >>> mlp = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        >>> block = ResidualDropPath(mlp, 0.2)  # in a ViT block: x = block(x), was x + drop_path(mlp(x))
        >>> block(torch.randn(8, 197, 64)).shape
        torch.Size([8, 197, 64])
        >>> sorted(block.state_dict())[:2]
        ['branch.0.bias', 'branch.0.weight']
    """

    has_channel_dim = False
    branch: nn.Module
    batched_args: tuple[int | str, ...]

    def __init__(
        self, branch: nn.Module, p: float = 0.1, *, batched_args: Collection[int | str] = ()
    ) -> None:
        super().__init__(p)
        name = type(self).__name__
        if not isinstance(branch, nn.Module):
            fail(name, "branch", "a torch.nn.Module", Shown(type(branch).__name__), kind=TypeError)
        self.branch = branch
        self.batched_args = check_batched_args(name, batched_args)

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``input + drop_path(branch(input, *args, **kwargs))``, the branch on the kept samples."""
        return residual_forward(self, input, args, kwargs)

    def dropout(self, input: Tensor) -> Tensor:
        """The layer's computation without extra arguments (the base class's contract)."""
        return self.residual(input, (), {})

    def residual(self, input: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """Apply :func:`~spatialdrop.functional.drop_path_residual` with this module's settings."""
        name = type(self).__name__  # checked here so that a bad input names the layer
        check_tensor(name, input)
        check_min_rank(name, input, 1, _LAYOUT)
        key = self.mask_key(input.shape[0], input.device)
        return drop_path_residual(
            input,
            self.branch,
            self.p,
            training=self.training,
            key=key,
            args=args,
            kwargs=kwargs,
            batched_args=self.batched_args,
        )

    def extra_repr(self) -> str:
        """``p`` and, when set, ``batched_args`` (there is no ``inplace``: the input is never written)."""
        return f"p={self.p}" + (f", batched_args={self.batched_args!r}" if self.batched_args else "")
