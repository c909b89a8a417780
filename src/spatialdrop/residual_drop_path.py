"""ResidualDropPath: stochastic depth that runs the residual branch on the kept samples only.

``x + drop_path(branch(x), p)`` computes the branch for every sample and then multiplies the
dropped ones by zero; :func:`drop_path_residual` gives the same result but calls the branch on
the kept rows only (``index_select`` -> branch -> ``index_add``), so a drop rate ``p`` saves about
a fraction ``p`` of the branch's forward and backward work and of the activations it keeps for
backward. Where the kept count cannot be read (see :func:`_can_skip`) the same law is computed
on the whole batch, as ``x + branch(x) * keep / (1 - p)``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.overrides import handle_torch_function, has_torch_function_unary

from ._compat import (
    dispatch_mode_active,
    in_vmap,
    inductor_layout_optimization,
    is_compiling,
    is_exporting,
    new_unbacked_size,
)
from ._dtensor import check_sharding, is_dtensor
from ._keyed import check_key_arg
from ._module import StructuredDropout
from ._validation import (
    Shown,
    check_bool,
    check_choice,
    check_float_input,
    check_generator,
    check_min_rank,
    check_p,
    check_scale_fits,
    check_tensor,
    fail,
)
from .drop_path import _draw_keep, drop_path
from .keyed import MaskKey, keyed_uniform

__all__ = ["DRAWS", "ResidualDropPath", "batch_coupled_modules", "drop_path_residual"]

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
    present: list[int | str] = []  # an optional batched argument absent or None is not gathered
    for item in check_batched_args(fn, batched_args):
        if isinstance(item, int):
            value = args[item] if item < len(args) else None
            name = f"args[{item}]"
        else:
            value = kwargs.get(item)
            name = f"kwargs[{item!r}]"
        if value is None:
            continue
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != n:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            fail(fn, name, f"a tensor with the batch ({n}) at dim 0, as batched_args says", Shown(got))
        present.append(item)
    return tuple(args), dict(kwargs), tuple(present)


def _has_conv(branch: Callable[..., Tensor]) -> bool:
    """Whether ``branch`` is a module holding a convolution (``nn.Conv1d/2d/3d``, transposed ones)."""
    return isinstance(branch, nn.Module) and any(
        isinstance(m, nn.modules.conv._ConvNd) for m in branch.modules()
    )


def _can_skip(input: Tensor, branch: Callable[..., Tensor]) -> bool:
    """Whether the kept samples can be gathered: the kept count is a size the call may depend on.

    Eager mode: yes (on an accelerator reading the count costs one host synchronisation). Under
    ``torch.compile``: yes, in any dynamo configuration, as an unbacked size (the op
    ``spatialdrop::kept_index``), except for a convolution branch on the CPU while inductor's
    ``layout_optimization`` is on (see :func:`~spatialdrop._compat.inductor_layout_optimization`:
    torch's crash, whatever the dynamo flags). Not under ``torch.export`` / ONNX export,
    ``vmap``, fake or meta tensors (no data to read).
    """
    if is_compiling():  # first: nothing below may be traced by dynamo
        if is_exporting():
            return False
        return not (input.device.type == "cpu" and inductor_layout_optimization() and _has_conv(branch))
    return input.device.type != "meta" and not dispatch_mode_active() and not in_vmap()


@torch.library.custom_op("spatialdrop::kept_index", mutates_args=())
def kept_index(keep: Tensor) -> Tensor:
    """The positions of the nonzero entries of the 1-D ``keep``, ascending (``nonzero``).

    One op whose output size depends on the data: under ``torch.compile`` its fake kernel gives
    an unbacked size, in any dynamo configuration, where ``nonzero`` is a graph break unless
    ``capture_dynamic_output_shape_ops`` is set. The kept count never recompiles the graph.
    """
    return keep.nonzero().squeeze(1)


@kept_index.register_fake
def _(keep: Tensor) -> Tensor:
    n = keep.shape[0]
    size = new_unbacked_size(torch.ops.spatialdrop.kept_index.default, n if isinstance(n, int) else None)
    return keep.new_empty((size,), dtype=torch.long)


DRAWS = ("per_sample", "exact_count")
"""The laws of :func:`drop_path_residual`'s ``draw``: see its docstring."""


def batch_coupled_modules(branch: Callable[..., Tensor]) -> list[str]:
    """The submodules of ``branch`` whose result for one sample depends on the other samples.

    Counted, in their current mode: a BatchNorm (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``,
    the lazy ones: any ``nn.modules.batchnorm._BatchNorm``) in training mode, or without running
    statistics (it normalises with the batch's); an InstanceNorm with
    ``track_running_stats=True`` in training mode (its output is per sample, but its running
    averages pool the batch). LayerNorm, GroupNorm, RMSNorm, linear layers, convolutions and
    attention within a sample are per sample. A branch that is not a module, or whose own code
    mixes samples, cannot be inspected: that is the caller's to know.

    Returns:
        ``"name (Class)"`` for each such submodule, ``"(Class)"`` for the branch itself.

    Examples:
        >>> from torch import nn
        >>> from spatialdrop import batch_coupled_modules
        >>> branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        >>> batch_coupled_modules(branch)
        ['1 (BatchNorm2d)']
        >>> batch_coupled_modules(branch.eval())  # eval: running statistics, per sample
        []
    """
    if not isinstance(branch, nn.Module):
        return []
    found = []
    for name, m in branch.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            coupled = m.training or m.running_mean is None
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
            coupled = m.training and m.track_running_stats
        else:
            coupled = False
        if coupled:
            found.append(f"{name} ({type(m).__name__})" if name else f"({type(m).__name__})")
    return found


def _check_coupled(fn: str, branch: Callable[..., Tensor], allow: bool) -> bool:
    """Refuse a batch-coupled branch unless ``allow``; whether it is one."""
    coupled = batch_coupled_modules(branch)
    if coupled and not allow:
        fail(
            fn,
            "branch",
            "one that treats the samples independently (it runs on the kept samples only), or "
            "allow_batch_coupled=True to run it on them anyway",
            Shown(f"one with batch-coupled modules {coupled}"),
        )
    if coupled and not is_compiling():
        warnings.warn(
            f"{fn}: the branch has batch-coupled modules {coupled}: allow_batch_coupled=True runs "
            "them on the kept samples only (their batch statistics and running averages come from "
            "those), eagerly and compiled alike",
            stacklevel=3,
        )
    return bool(coupled)


def _draw_subset(
    input: Tensor, p: float, generator: torch.Generator | None, key: MaskKey | None
) -> tuple[Tensor, int]:
    """``draw="exact_count"``: ``k = floor(n (1 - p) + 1/2)`` samples out of ``n``, uniformly.

    The ``k`` samples with the smallest uniform numbers (``torch.rand``, or the key's
    :func:`~spatialdrop.keyed_uniform` column), in batch order.
    """
    n = input.shape[0]
    k = math.floor(n * (1.0 - p) + 0.5) if isinstance(n, int) else torch.sym_int(n * (1.0 - p) + 0.5)
    with torch.no_grad():
        if key is not None:
            u = keyed_uniform(key, 1, device=input.device)[:, 0]
        elif generator is None:  # no generator= keyword: see _validation.generator_kwargs
            u = torch.rand(n, dtype=torch.float32, device=input.device)
        else:
            u = torch.rand(n, generator=generator, dtype=torch.float32, device=input.device)
        idx = u.topk(k, largest=False, sorted=False).indices.sort().values
    return idx, k


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
    draw: str = "per_sample",
    allow_batch_coupled: bool = False,
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
    and attention within a sample do. A branch with batch-coupled modules (BatchNorm in training
    mode, see :func:`~spatialdrop.batch_coupled_modules`) would see only the kept samples, so its
    output and running averages would differ from the branch run on the whole batch: it is
    refused with a ``ValueError`` unless ``allow_batch_coupled=True``, which runs it on the kept
    samples (a ``UserWarning`` in eager mode), eagerly and compiled alike; where the rows cannot
    be gathered (see below) it is then refused.

    Whole-batch cases: in eval mode (``training=False``), for ``p = 0`` and for an input with no
    elements the branch is called once on the whole batch and ``input + branch(input)`` is
    returned. When every sample is dropped (always at ``p = 1``) the branch is not called and
    ``input`` itself is returned; when none is, the branch runs on the input itself (no gather).

    Under ``torch.compile`` (any mode, ``dynamic=True`` or not, no dynamo flag needed) the kept
    rows are gathered too: the kept count is an unbacked size made by the op
    ``spatialdrop::kept_index``, so a changing count never recompiles, and when no sample is
    kept the branch is called on zero rows. One exception, for torch's own crash: a branch
    module holding a convolution, on the CPU, while ``torch._inductor.config.layout_optimization``
    is on (the default), runs on the whole batch (``input + branch(input) * mask / (1 - p)``:
    the same law, no saving); set that flag to ``False`` for the saving. Under ``torch.export``,
    ``vmap``, DTensor and on fake or meta tensors the branch also runs on the whole batch.

    ``draw="exact_count"`` draws another law, DINOv2's ("DINOv2: Learning Robust Visual Features
    without Supervision", https://arxiv.org/abs/2304.07193, ``drop_add_residual_stochastic_depth``):
    exactly ``k = floor(n (1 - p) + 1/2)`` of the ``n`` samples are kept, chosen uniformly at
    random without replacement (the ``k`` smallest of ``n`` uniform numbers, from ``generator``
    or the ``key``), and their branch outputs are scaled by ``n / k``, so that
    ``E[output] = input + branch(input)`` for a per-sample branch. The kept count is fixed by
    ``n`` and ``p``, a static shape: compiled, it needs no unbacked size and works for every
    branch. It is not ``drop_path``'s draw: samples are not independent, and a keyed sample's
    fate depends on the others in its batch. ``k = 0`` returns ``input``.

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
            gathered with the kept rows; one that is absent or ``None`` is not gathered. Every
            other argument is passed unchanged to every call (a shared ``(L, L)`` attention mask,
            a rotary table). Default: none.
        draw: ``"per_sample"``: each sample kept independently with probability ``1 - p`` and
            scaled by ``1 / (1 - p)``, ``drop_path``'s law and bits. ``"exact_count"``:
            ``round(n (1 - p))`` samples kept, scaled by ``n / k`` (above). Default:
            ``"per_sample"``.
        allow_batch_coupled: run a branch with batch-coupled modules on the kept samples
            (warning) instead of refusing it. Default: False.

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
            draw=draw,
            allow_batch_coupled=allow_batch_coupled,
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
    check_choice(fn, "draw", draw, DRAWS)
    check_bool(fn, "allow_batch_coupled", allow_batch_coupled)
    n = input.shape[0]
    check_key_arg(fn, key, generator, n)
    args, kwargs, batched = _check_extra(fn, n, args, kwargs, batched_args)
    check_sharding(fn, input)
    if not training or p == 0.0 or input.numel() == 0:
        return input + _checked_output(fn, branch(input, *args, **kwargs), input, True)
    if p == 1.0:
        return input
    coupled = _check_coupled(fn, branch, allow_batch_coupled)
    if draw == "exact_count":
        if is_dtensor(input):
            fail(fn, "draw", "'per_sample' for a DTensor input", draw)
        idx, k = _draw_subset(input, p, generator, key)
        if k == 0:  # static: compiled, k is an int or a backed size (a guard, no graph break)
            return input
        scale: Any = n / k
        if not _can_gather(input, branch, fn, coupled, unbacked=False):
            shape = (n,) + (1,) * (input.dim() - 1)
            keep = torch.zeros(n, dtype=input.dtype, device=input.device).index_fill_(0, idx, scale)
            out = _checked_output(fn, branch(input, *args, **kwargs), input, True)
            return input + out * keep.reshape(shape).to(out.dtype)
        if not is_compiling() and k == n:
            return input + _checked_output(fn, branch(input, *args, **kwargs), input, True)
        return _gather_run_add(fn, input, branch, idx, args, kwargs, batched, scale, p=None)
    check_scale_fits(fn, p, input.dtype, 1.0 / (1.0 - p), "1/(1-p)")
    if is_dtensor(input):  # each rank's part of one draw (drop_path's); the branch on the whole batch
        _can_gather(input, branch, fn, coupled, unbacked=True)
        out = _checked_output(fn, branch(input, *args, **kwargs), input, True)
        return input + drop_path(out, p, training=True, generator=generator, key=key)
    noise = _draw_keep(input, p, True, generator, key)  # (N, 1, ...): 0 or 1/(1-p), drop_path's draw
    if not _can_gather(input, branch, fn, coupled, unbacked=True):
        out = _checked_output(fn, branch(input, *args, **kwargs), input, True)
        return input + out * noise.to(out.dtype)
    if is_compiling():  # the kept count: an unbacked size (no branching on it), in any dynamo mode
        idx = torch.ops.spatialdrop.kept_index(noise.reshape(n))
    else:  # eager: the count is an int
        idx = noise.reshape(n).nonzero().squeeze(1)
        kept = idx.shape[0]
        if kept == 0:
            return input
        if kept == n:
            out = _checked_output(fn, branch(input, *args, **kwargs), input, True)
            return input + out * noise.to(out.dtype)
    # drop_path's scale, rounded to the branch output's dtype (below); the add fuses it (one rounding).
    # Compiled, the kept rows' factors (a tensor): a float p would be specialised (a recompile per p)
    scale = noise.reshape(n).index_select(0, idx) if is_compiling() else 1.0 / (1.0 - p)
    return _gather_run_add(fn, input, branch, idx, args, kwargs, batched, scale, p=p)


def _can_gather(
    input: Tensor, branch: Callable[..., Tensor], fn: str, coupled: bool, *, unbacked: bool
) -> bool:
    """Whether the kept rows can be gathered here (``unbacked``: the kept count is data-dependent).

    :func:`_can_skip` for a data-dependent count. A batch-coupled branch that would run on the
    whole batch here, unlike eagerly, is refused.
    """
    if is_dtensor(input):
        ok = False
    elif unbacked:
        ok = _can_skip(input, branch)
    elif is_compiling():  # a static count: only the tracers without data (export, vmap, fake) refuse
        ok = not is_exporting()
    else:
        ok = input.device.type != "meta" and not dispatch_mode_active() and not in_vmap()
    if coupled and not ok:
        fail(
            fn,
            "branch",
            "one that treats the samples independently where the kept samples cannot be gathered "
            "(DTensor, torch.export, vmap, fake tensors, or a convolution branch compiled on the CPU "
            "with inductor's layout_optimization on: then draw='exact_count', or "
            "torch._inductor.config.layout_optimization = False)",
            Shown("a batch-coupled one"),
        )
    return ok


def _gather_run_add(
    fn: str,
    input: Tensor,
    branch: Callable[..., Tensor],
    idx: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batched: tuple[int | str, ...],
    scale: Any,
    *,
    p: float | None,
) -> Tensor:
    """``input`` plus ``branch`` of its rows ``idx`` (and of the batched arguments' rows) times ``scale``.

    ``p`` given: the scale is drop_path's ``1 / (1 - p)`` rounded to the branch output's dtype.
    """
    rows = _rows_like(input.index_select(0, idx), input)
    a = tuple(t.index_select(0, idx) if i in batched else t for i, t in enumerate(args))
    kw = {k: v.index_select(0, idx) if k in batched else v for k, v in kwargs.items()}
    out = _checked_output(fn, branch(rows, *a, **kw), rows, not is_compiling())
    dtype = torch.promote_types(input.dtype, out.dtype)
    base = input if input.dtype == dtype else input.to(dtype)
    if is_compiling():
        if isinstance(scale, Tensor):  # per kept row
            scale = scale.reshape((-1,) + (1,) * (out.dim() - 1)).to(out.dtype)
        if not isinstance(scale, (int, float)):  # a tensor, or n / k with a symbolic batch size
            return _add_rows(base, idx, (out * scale).to(dtype), 1.0)
        return _add_rows(base, idx, out.to(dtype), float(scale))
    if p is not None:  # drop_path's scale, rounded to the branch output's dtype
        scale = torch.ones((), dtype=out.dtype).div_(1.0 - p).item()
    return _AddKeptRows.apply(base, idx, out.to(dtype), float(scale))


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
            ``kwargs`` of the extra arguments that hold the batch at dim 0; one that a call leaves
            out or passes as ``None`` is not gathered. Default: none.
        draw: ``"per_sample"`` (DropPath's law) or ``"exact_count"`` (DINOv2's): see
            :func:`~spatialdrop.functional.drop_path_residual`. Default: ``"per_sample"``.
        allow_batch_coupled: run a branch with batch-coupled modules (BatchNorm in training
            mode, see :func:`batch_coupled_modules`) on the kept samples, with a warning; by
            default such a branch is refused. Default: False.

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
    draw: str
    allow_batch_coupled: bool

    def __init__(
        self,
        branch: nn.Module,
        p: float = 0.1,
        *,
        batched_args: Collection[int | str] = (),
        draw: str = "per_sample",
        allow_batch_coupled: bool = False,
    ) -> None:
        super().__init__(p)
        name = type(self).__name__
        if not isinstance(branch, nn.Module):
            fail(name, "branch", "a torch.nn.Module", Shown(type(branch).__name__), kind=TypeError)
        self.branch = branch
        self.batched_args = check_batched_args(name, batched_args)
        self.draw = check_choice(name, "draw", draw, DRAWS)
        self.allow_batch_coupled = check_bool(name, "allow_batch_coupled", allow_batch_coupled)

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
            draw=self.draw,
            allow_batch_coupled=self.allow_batch_coupled,
        )

    def extra_repr(self) -> str:
        """``p`` and, when set, ``batched_args`` (there is no ``inplace``: the input is never written)."""
        out = f"p={self.p}" + (f", batched_args={self.batched_args!r}" if self.batched_args else "")
        if self.draw != "per_sample":
            out += f", draw={self.draw!r}"
        return out + (", allow_batch_coupled=True" if self.allow_batch_coupled else "")
