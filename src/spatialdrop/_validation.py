"""Argument checks shared by every op: one place that builds the error messages.

Every message has the form ``"<function>: <argument> must be <what is allowed>, got <value>"``
so that a user sees at once which call, which argument, what was passed and what would do.
The checks run before any eval-mode shortcut, so a bad argument fails on the first call.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NoReturn

import torch
from torch import Tensor

__all__ = [
    "Shown",
    "as_batched",
    "check_bool",
    "check_channel_dim",
    "check_choice",
    "check_device",
    "check_float_input",
    "check_generator",
    "check_inplace_target",
    "check_int",
    "check_min_rank",
    "check_p",
    "check_scale_fits",
    "check_sizes",
    "check_tensor",
    "fail",
    "generator_kwargs",
]


class Shown(str):
    """A description to put in a message as it is, without the quotes of ``repr``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def fail(fn: str, arg: str, allowed: str, value: Any, *, kind: type[Exception] = ValueError) -> NoReturn:
    """Raise ``kind`` with the project's message format."""
    raise kind(f"{fn}: {arg} must be {allowed}, got {value!r}")


def check_p(fn: str, p: Any, *, allow_one: bool = True, arg: str = "p") -> float:
    """Check a drop probability and return it as a float.

    Args:
        fn: name of the calling function, for the message.
        p: the value to check; a real number (not a bool).
        allow_one: whether ``p == 1`` is allowed (``[0, 1]``) or not (``[0, 1)``).
        arg: the argument's name in the message.
    """
    interval = "[0, 1]" if allow_one else "[0, 1)"
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        fail(fn, arg, f"a real number in {interval}", p, kind=TypeError)
    try:
        value = float(p)
    except OverflowError:  # an int (or Fraction) beyond the float range, like 10**400
        size = Shown(f"a number of magnitude ~1e{len(str(math.floor(p))) - 1}")
        fail(fn, arg, f"a probability in {interval}", size)
    # comparisons only (NaN fails them): under torch.compile(dynamic=True) p may be a SymFloat
    if not 0.0 <= value <= 1.0 or (not allow_one and value == 1.0):
        why = (
            ""
            if allow_one or value != 1.0
            else (" (p = 1 would drop every element and the 1/(1-p) scale is undefined)")
        )
        fail(fn, arg, f"a probability in {interval}{why}", p)
    return value


def check_scale_fits(fn: str, p: float, dtype: torch.dtype, largest: float, what: str) -> None:
    """Refuse a ``p`` whose largest multiplier does not fit the input's floating dtype.

    Near ``p = 1`` the rescaling factor grows without bound: ``1 / (1 - p)`` is past float16's
    largest value 65504 for ``p > 0.99998``, where the multiply would give ``inf`` and
    ``0 * inf = NaN`` (torch's own dropout does). Such a ``p`` is refused for that dtype.

    Args:
        fn: name of the calling function, for the message.
        p: the drop probability.
        dtype: the input's dtype.
        largest: the largest multiplier the op would use at this ``p`` (computed in float64).
        what: how the multiplier is computed, for the message (e.g. ``"1/(1-p)"``).
    """
    top = torch.finfo(dtype).max
    if not largest <= top:
        fail(
            fn,
            "p",
            f"a probability whose multiplier {what} fits {dtype} (at most {top:g}; "
            f"it would be {largest:.6g}): use a wider dtype or a smaller p",
            p,
        )


def generator_kwargs(generator: torch.Generator | None) -> dict[str, torch.Generator]:
    """``{"generator": generator}``, or ``{}`` for ``None``.

    torch's random functions are called without the keyword when there is no generator: an
    explicit ``generator=None`` breaks ``torch.compile(dynamic=True)`` with symbolic sizes and
    has no ONNX lowering (``aten.randn.generator``).
    """
    return {} if generator is None else {"generator": generator}


def check_device(fn: str, device: Any) -> torch.device:
    """Check a ``device`` argument (a :class:`torch.device`, a device string or index)."""
    allowed = "a torch.device, a device string such as 'cpu' or 'cuda:0', or a device index"
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, numbers.Integral)):
        fail(fn, "device", allowed, Shown(type(device).__name__), kind=TypeError)
    try:
        return torch.device(device if isinstance(device, str) else int(device))
    except (RuntimeError, ValueError, TypeError):
        fail(fn, "device", allowed, device)


def check_bool(fn: str, arg: str, value: Any) -> bool:
    """Check that ``value`` is a bool."""
    if not isinstance(value, bool):
        fail(fn, arg, "a bool", value, kind=TypeError)
    return value


def check_int(fn: str, arg: str, value: Any, *, minimum: int | None = None) -> int:
    """Check that ``value`` is an int (not a bool), at least ``minimum`` if given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(fn, arg, "an int", value, kind=TypeError)
    if minimum is not None and value < minimum:
        fail(fn, arg, f"an int >= {minimum}", value)
    return int(value)


def check_choice(fn: str, arg: str, value: Any, allowed: Sequence[str]) -> str:
    """Check that ``value`` is one of the strings in ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        fail(fn, arg, f"one of {choices}", value)
    return value


def check_tensor(fn: str, input: Any) -> Tensor:
    """Check that ``input`` is a :class:`torch.Tensor` (a ``TypeError`` naming ``input`` if not)."""
    if not isinstance(input, Tensor):
        fail(fn, "input", "a torch.Tensor", Shown(type(input).__name__), kind=TypeError)
    return input


def check_float_input(fn: str, input: Any) -> Tensor:
    """Check that ``input`` is a floating-point tensor."""
    check_tensor(fn, input)
    if not input.is_floating_point():
        fail(
            fn,
            "input",
            "a floating-point tensor (float16, bfloat16, float32, float64)",
            input.dtype,
            kind=TypeError,
        )
    return input


def check_generator(fn: str, generator: object) -> None:
    """Check that ``generator`` is ``None`` or a :class:`torch.Generator`."""
    if generator is not None and not isinstance(generator, torch.Generator):
        fail(fn, "generator", "None or a torch.Generator", Shown(type(generator).__name__), kind=TypeError)


def check_inplace_target(fn: str, input: Tensor, inplace: bool) -> None:
    """Refuse ``inplace=True`` on an input that cannot or may not be written in place.

    An input whose elements share memory (an expanded view) cannot be written element by
    element (torch raises its overlapping-memory ``RuntimeError``).

    With grad mode on, torch raises a ``RuntimeError`` deep inside the op for an in-place write
    into a leaf that requires grad, or into a view of one (an unbatched input given a batch axis
    by a module is such a view). This raises the project's ``ValueError`` naming ``inplace``
    first. It reads only ``requires_grad``, ``is_leaf`` and ``_base``, never data, so it traces
    under ``torch.compile`` and ``torch.fx``. Call it where the op is about to write ``input``,
    after the eval-mode shortcut (which writes nothing and is fine on any input).
    """
    if not inplace:
        return
    if _overlaps(input):
        fail(
            fn,
            "inplace",
            "False for an input whose elements share memory (an expanded or otherwise "
            "self-overlapping view: one write would change several elements); pass a "
            "non-overlapping tensor (e.g. input.contiguous()) or use inplace=False",
            Shown(f"True with a tensor of shape {tuple(input.shape)} and strides {tuple(input.stride())}"),
        )
    if not torch.is_grad_enabled() or not input.requires_grad:
        return
    if input.is_leaf:
        what = "a leaf tensor that requires grad"
    else:
        base = input._base
        if base is None or not base.is_leaf:
            return
        what = "a view of a leaf tensor that requires grad"
    fail(
        fn,
        "inplace",
        "False for an input that autograd may not modify in place (a leaf that requires grad, "
        "or a view of one, with grad mode on); pass a non-leaf, run under torch.no_grad(), "
        "or use inplace=False",
        Shown(f"True with {what}"),
    )


def _overlaps(t: Tensor) -> bool:
    """Whether some elements of ``t`` share memory (torch refuses to write such a tensor in place).

    Under the compiler only the common case, a stride 0 over a dim of size > 1 (``expand``), is
    checked (the general check reads no data but does not trace).
    """
    if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
        return True
    from ._compat import is_compiling

    return not is_compiling() and torch._debug_has_internal_overlap(t) == 1


def check_min_rank(fn: str, input: Tensor, min_ndim: int, layout: str) -> None:
    """Check that ``input`` has at least ``min_ndim`` dims; ``layout`` describes the expected shape."""
    if input.dim() < min_ndim:
        fail(
            fn,
            "input",
            f"a tensor with at least {min_ndim} dims {layout}",
            Shown(f"shape {tuple(input.shape)}"),
        )


def check_channel_dim(fn: str, channel_dim: Any, ndim: int) -> int:
    """Check ``channel_dim`` against a batched rank ``ndim`` and return it as a non-negative dim.

    Dim 0 is the batch, so the channel axis may be any of ``1 .. ndim - 1`` (or ``-1 ..
    -(ndim - 1)``).
    """
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, numbers.Integral):
        fail(fn, "channel_dim", "an int", channel_dim, kind=TypeError)
    allowed = (
        f"a dim of the {ndim}-D batched input other than the batch dim 0: "
        f"1 .. {ndim - 1} or -1 .. -{ndim - 1}"
    )
    dim = int(channel_dim)
    if not -ndim < dim < ndim:
        fail(fn, "channel_dim", allowed, channel_dim)
    dim %= ndim
    if dim == 0:
        fail(fn, "channel_dim", allowed, channel_dim)
    return dim


def check_sizes(fn: str, arg: str, value: Any, n: int) -> tuple[int, ...]:
    """Check an int-or-tuple size argument (like ``block_size``) and return ``n`` positive ints."""
    allowed = f"a positive int or a tuple of {n} positive ints"
    if isinstance(value, bool):
        fail(fn, arg, allowed, value, kind=TypeError)
    if isinstance(value, numbers.Integral):
        sizes: tuple[Any, ...] = (value,) * n
    elif isinstance(value, (tuple, list)):
        sizes = tuple(value)
        if len(sizes) != n:
            fail(fn, arg, allowed, value)
    else:
        fail(fn, arg, allowed, value, kind=TypeError)
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            fail(fn, arg, allowed, value, kind=TypeError)
        if s < 1:
            fail(fn, arg, allowed, value)
    return tuple(int(s) for s in sizes)


def as_batched(fn: str, input: Tensor, spatial_dims: int | None) -> tuple[Tensor, bool]:
    """Give an unbatched input a batch axis, for the rank-fixed ``...1d/2d/3d`` modules.

    Args:
        fn: name of the calling class, for the message.
        input: the tensor.
        spatial_dims: the number of spatial dims the class is made for, or ``None`` for the
            rank-free class (which needs a batched input of at least 3 dims).

    Returns:
        The batched tensor (a view of ``input``) and whether a batch axis was added.
    """
    check_tensor(fn, input)
    if spatial_dims is None:
        check_min_rank(fn, input, 3, "(N, C, *spatial) or with channel_dim=-1 (N, *spatial, C)")
        return input, False
    batched = spatial_dims + 2
    if input.dim() == batched:
        return input, False
    if input.dim() == batched - 1:
        return input.unsqueeze(0), True
    names = {1: "L", 2: "H, W", 3: "D, H, W"}.get(spatial_dims, f"{spatial_dims} spatial dims")
    fail(
        fn,
        "input",
        f"a {batched}-D batched (N, C, {names}) or {batched - 1}-D unbatched "
        f"(C, {names}) tensor (channel position set by channel_dim)",
        Shown(f"a {input.dim()}-D tensor of shape {tuple(input.shape)}"),
    )


def squeeze_if(output: Tensor, unbatched: bool) -> Tensor:
    """Remove the batch axis that :func:`as_batched` added."""
    return output.squeeze(0) if unbatched else output


def float_dtype_of(t: Tensor) -> torch.dtype:
    """The dtype in which to accumulate counts and scales for ``t``: float32 or wider."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
