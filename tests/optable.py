"""The contract table: one entry per public op or module of spatialdrop (after torch's ``ModuleInfo``).

Each :class:`OpInfo` says how to build the op (``build``), its modes (``modes``: per-channel or
shared masks, seeding, scale policies ...), its sample inputs (``samples``), and the facts that the
shared checks need: which dims a mask is constant over, how to recover the mask and the scale
from an input and its output (:func:`check_output`), whether ``p = 1`` is allowed, which dtypes,
whether the op is keyed, and its bad arguments with the argument that the message must name.

``tests/test_contract.py``, ``tests/test_tooling.py`` and ``tests/test_properties.py`` are driven
by :data:`OPS`: a new op gets the whole contract by adding one entry here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import spatialdrop as sd
from spatialdrop import functional as F
from spatialdrop.alpha import SELU_NEG_SATURATION  # -lambda * alpha (Klambauer et al. 2017): < 0

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# --- the table's building blocks -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mode:
    """One configuration of an op: a name for test ids and the keyword arguments that select it."""

    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BadArg:
    """A bad argument: the keyword arguments, the exception type and the argument the message names.

    ``when`` is ``"build"`` when the error must come at construction (modules) and ``"call"`` when
    it can only come with an input (functions; sizes a module cannot check before it sees a map).

    ``match``, if given, is a regex for what follows ``"<op>: <arg> must be "`` in the message
    (the project's format ``"<fn>: <arg> must be <allowed>, got <value>"``): the allowed values
    and the bad value as the message must show them.
    """

    kwargs: dict[str, Any]
    exc: type[Exception]
    arg: str
    when: str = "build"
    match: str = ""

    @property
    def id(self) -> str:
        return ",".join(f"{k}={_short(v)}" for k, v in self.kwargs.items())


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 16 else s[:13] + "..."


@dataclasses.dataclass(frozen=True)
class Sample:
    """A sample input: its shape, the channel axis of its batched layout, and its memory format."""

    shape: tuple[int, ...]
    channel_dim: int = 1
    unbatched: bool = False
    memory_format: torch.memory_format | None = None
    desc: str = ""

    @property
    def id(self) -> str:
        return self.desc or "x".join(map(str, self.shape))

    def make(self, dtype: torch.dtype = torch.float32, *, seed: int = 0) -> Tensor:
        """An input of this shape whose entries are nonzero (|x| in [0.1, 1]), so masks can be read back."""
        return nonzero_input(self.shape, dtype, seed=seed, memory_format=self.memory_format)


def nonzero_input(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    memory_format: torch.memory_format | None = None,
) -> Tensor:
    """Random entries with |x| in [0.1, 1] and random signs: a zero in the output is a dropped element."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.rand(tuple(shape), generator=g, dtype=torch.float64) * 0.9 + 0.1
    sign = torch.randint(0, 2, tuple(shape), generator=g).mul(2).sub(1)
    x = (mag * sign).to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x


class FunctionModule(nn.Module):
    """A functional form wrapped as a module: ``forward`` is one call into the function.

    The generator or key, if any, is fixed at construction, so a test can run functions and
    modules through the same tools.
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        p: float,
        kwargs: dict[str, Any],
        *,
        generator: torch.Generator | None = None,
        key: sd.MaskKey | None = None,
    ) -> None:
        super().__init__()
        self.fn = fn
        self.p = p
        self.kwargs = dict(kwargs)
        self.generator = generator
        self.key = key

    def forward(self, x: Tensor) -> Tensor:
        extra: dict[str, Any] = dict(self.kwargs)
        if self.generator is not None:
            extra["generator"] = self.generator
        if self.key is not None:
            extra["key"] = self.key
        return self.fn(x, self.p, training=self.training, **extra)

    def extra_repr(self) -> str:
        return f"{self.fn.__name__}, p={self.p}"


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """Everything the shared checks need to know about one public op or module.

    Attributes:
        name: the public name (the class or function name), used in test ids and messages.
        kind: ``"function"`` (called with ``(input, p, training=..., **kwargs)``), ``"module"``
            (built with ``(p, **kwargs)``) or ``"filter"`` (filter dropout: a conv whose weights
            are dropped; its "input" is the conv's input and the reference output the plain conv's).
        target: the function or class.
        family: how outputs are read: ``"channel"`` (spatial dropout), ``"block"`` (DropBlock),
            ``"sample"`` (DropPath), ``"gaussian"``, ``"alpha"``, ``"filter"`` or ``"residual"``
            (ResidualDropPath with an identity branch: ``x`` or ``x + x / (1 - p)`` per sample).
        spatial_dims: the spatial rank of a rank-fixed ``...Nd`` class; ``None`` for any rank.
        allow_p_one: whether ``p = 1`` is allowed.
        modes: the configurations to test; the first is the default.
        has_channel_dim / has_inplace / keyed / unbatched: which arguments and forms exist.
        bad_args: bad arguments beyond the common ones (see :func:`bad_args`).
        function: for a module, the function its ``forward`` calls (for module == function).
        min_rank: the smallest batched input rank.
        p: a typical drop probability for the checks.
        conv: for ``"filter"``: builds the plain conv.
    """

    name: str
    kind: str
    target: Any
    family: str
    spatial_dims: int | None = None
    allow_p_one: bool = True
    modes: tuple[Mode, ...] = (Mode("default"),)
    has_channel_dim: bool = True
    has_inplace: bool = True
    keyed: bool = True
    unbatched: bool = False
    bad_args_extra: tuple[BadArg, ...] = ()
    function: Callable[..., Tensor] | None = None
    min_rank: int = 3
    p: float = 0.5
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    conv: Callable[[], nn.Module] | None = None

    @property
    def id(self) -> str:
        return self.name

    @property
    def is_module(self) -> bool:
        return self.kind != "function"

    @property
    def takes_generator(self) -> bool:
        return self.kind == "function"

    # --- construction ----------------------------------------------------------------------

    def construct(self, p: Any, **kwargs: Any) -> Any:
        """Call the public constructor with possibly bad arguments (for the argument checks).

        For functions this returns a closure that calls the function on a fitting input.
        """
        if self.kind == "module":
            return self.target(p, **kwargs)
        if self.kind == "filter":
            if self.target is sd.FilterDropout:
                return sd.FilterDropout(p, **kwargs)
            conv = kwargs.pop("conv", None)
            return self.target(self.conv() if conv is None else conv, p, **kwargs)  # type: ignore[misc]
        raise TypeError(f"{self.name} is a function: use call_function")

    def call_function(self, x: Tensor, p: Any, **kwargs: Any) -> Tensor:
        return self.target(x, p, **kwargs)

    def build(
        self,
        p: float | None = None,
        mode: Mode | None = None,
        *,
        inplace: bool = False,
        channel_dim: int = 1,
        training: bool = True,
        generator: torch.Generator | None = None,
        key: sd.MaskKey | None = None,
        keyed_seed: int | None = None,
    ) -> nn.Module:
        """A working module for this op (functions are wrapped in :class:`FunctionModule`)."""
        p = self.p if p is None else p
        kwargs = dict((mode or self.modes[0]).kwargs)
        if self.has_inplace and inplace:
            kwargs["inplace"] = True
        if self.has_channel_dim and channel_dim != 1:
            kwargs["channel_dim"] = channel_dim
        m: nn.Module
        if self.kind == "function":
            m = FunctionModule(self.target, p, kwargs, generator=generator, key=key)
        elif self.kind == "module":
            m = self.target(p, **kwargs)
        else:
            assert self.conv is not None
            m = sd.filter_dropout(self.conv(), p)
        m.train(training)
        if keyed_seed is not None:
            sd.keyed_masks(m, keyed_seed)
        return m

    def samples(self) -> list[Sample]:
        """The sample inputs: batched and unbatched, ranks, channels-last, memory formats, empty."""
        c, s = 6, 5
        out: list[Sample] = []
        if self.kind == "filter":
            assert self.conv is not None
            conv = self.conv()
            d = conv.weight.dim() - 2
            cin = conv.weight.shape[1]
            fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(d)
            out.append(Sample((2, cin) + (s,) * d))
            out.append(Sample((cin,) + (s,) * d, unbatched=True, desc="unbatched"))
            if fmt is not None:
                out.append(Sample((2, cin) + (s,) * d, memory_format=fmt, desc="memory_format"))
            return out
        if self.family in ("sample", "residual"):
            return [
                Sample((6,), desc="1d"),
                Sample((6, 5), desc="2d"),
                Sample((6, 3, 4), desc="3d"),
                Sample((6, 3, s, s), desc="4d"),
                Sample((6, 2, 3, 3, 3), desc="5d"),
                Sample((6, 3, s, s), memory_format=torch.channels_last, desc="channels_last"),
                Sample((0, 3, s), desc="empty"),
                Sample((1, 2, 3, 2, 2, 2), desc="6d"),
            ]
        ranks = [self.spatial_dims] if self.spatial_dims is not None else [1, 2, 3]
        for d in ranks:
            out.append(Sample((3, c) + (s,) * d, desc=f"{d}d"))
            if self.has_channel_dim:
                out.append(Sample((3,) + (s,) * d + (c,), channel_dim=-1, desc=f"{d}d-last"))
            fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(d)
            if fmt is not None:
                out.append(Sample((3, c) + (s,) * d, memory_format=fmt, desc=f"{d}d-memfmt"))
        d = ranks[-1]
        out.append(Sample((0, c) + (s,) * d, desc="empty-batch"))
        out.append(Sample((1, c) + (s,) * d, desc="batch1"))
        if self.unbatched:
            out.append(Sample((c,) + (s,) * d, unbatched=True, desc="unbatched"))
            if self.has_channel_dim:
                out.append(Sample((s,) * d + (c,), channel_dim=-1, unbatched=True, desc="unbatched-last"))
        if self.spatial_dims is None:
            out.append(Sample((2, 3, 2, 3, 2, 2), desc="4 spatial dims"))
        return out

    def mode_ids(self) -> list[str]:
        return [m.name for m in self.modes]

    def keyed_modes(self) -> tuple[Mode, ...]:
        return self.modes

    # --- running ---------------------------------------------------------------------------

    def run(
        self,
        module: nn.Module,
        x: Tensor,
        *,
        seed: int | None = None,
        key: sd.MaskKey | None = None,
    ) -> Tensor:
        """Run a module built by :meth:`build`: under a fresh global seed and/or a mask context."""
        with contextlib.ExitStack() as stack:
            if seed is not None:
                stack.enter_context(torch.random.fork_rng(devices=[]))
                torch.manual_seed(seed)
            if key is not None:
                stack.enter_context(sd.mask_context(step=key.step, sample_ids=key.sample_ids))
            return module(x)

    def reference(self, module: nn.Module | None, x: Tensor) -> Tensor:
        """The output without dropout: the input itself, the plain conv's output for filter dropout,
        ``x + branch(x) = 2 x`` for the residual family (the table's identity branch)."""
        if self.family == "residual":
            return x + x
        if self.kind != "filter":
            return x
        assert module is not None
        was = module.training
        module.eval()
        try:
            with torch.no_grad():
                return module(x)
        finally:
            module.train(was)

    def mask_dims(self, mode: Mode | None, ndim: int, channel_dim: int) -> tuple[int, ...]:
        """The dims of the batched output over which one mask value is shared."""
        cd = channel_dim % ndim
        if self.family in ("channel", "gaussian", "alpha"):
            return tuple(d for d in range(ndim) if d not in (0, cd))
        if self.family in ("sample", "residual"):
            return tuple(range(1, ndim))
        if self.family == "filter":
            return tuple(d for d in range(ndim) if d != 1)
        kwargs = (mode or self.modes[0]).kwargs
        return (cd,) if kwargs.get("shared_channels", False) else ()

    def scale_policy(self, mode: Mode | None) -> str:
        """``"expected"`` (1 / (1 - p)), ``"realized"`` (per sample), ``"none"`` or ``"free"`` (Gaussian)."""
        kwargs = (mode or self.modes[0]).kwargs
        if self.family == "gaussian":
            return "free"
        if self.family == "alpha":
            return "alpha"
        if self.family == "sample":
            return "expected" if kwargs.get("scale", True) else "none"
        if self.family == "residual":
            return "expected"
        if self.family == "block":
            return str(kwargs.get("scale", "expected"))
        return "expected"


# --- reading outputs back --------------------------------------------------------------------


def rtol_of(dtype: torch.dtype) -> float:
    """A relative tolerance for one rounding of a product and of its scale in ``dtype``."""
    return 4 * torch.finfo(dtype).eps


def alpha_affine(p: float) -> tuple[float, float, float]:
    """``(a, b_kept, value_dropped)`` of alpha dropout: kept ``a * x + b_kept``, dropped a constant."""
    al = SELU_NEG_SATURATION
    a = 1.0 / math.sqrt((al * al * p + 1.0) * (1.0 - p))
    return a, -a * al * p, a * al * (1.0 - p)


@dataclasses.dataclass
class Readout:
    """What an output says: ``y == ref * factor + offset`` with ``keep`` the kept elements.

    ``factor`` is also the gradient of the output with respect to the reference (mask x scale).
    All tensors are float64 and batched (an unbatched sample gets its batch axis back).
    """

    keep: Tensor
    factor: Tensor
    offset: Tensor | None


def _const_along(t: Tensor, dims: tuple[int, ...]) -> bool:
    if not dims or t.numel() == 0:
        return True
    return bool((t.amax(dim=dims, keepdim=True) == t.amin(dim=dims, keepdim=True)).all())


def check_output(
    op: OpInfo,
    mode: Mode | None,
    p: float,
    x: Tensor,
    y: Tensor,
    *,
    channel_dim: int = 1,
    unbatched: bool = False,
    ref: Tensor | None = None,
    what: str = "",
) -> Readout:
    """Assert that ``y`` is a valid training-mode output of ``op`` for ``x``; return what it says.

    Checks: shape, dtype and device kept; finite output from finite input; the mask is constant
    over the op's mask dims; kept elements are ``ref x scale`` with the policy's scale (for
    alpha dropout the affine map), dropped elements 0 (alpha: the constant). ``x`` (or ``ref``)
    must have no zeros.
    """
    where = f"{op.name} {what}".strip()
    if op.family == "residual":  # the table's identity branch: read y = x * (1 + keep / (1 - p))
        return _check_residual(op, mode, p, x, y, channel_dim=channel_dim, where=where)
    r = (x if ref is None else ref).detach()
    y = y.detach()
    assert y.shape == r.shape, f"{where}: shape {tuple(y.shape)} != {tuple(r.shape)}"
    assert y.dtype == r.dtype, f"{where}: dtype {y.dtype} != {r.dtype}"
    assert y.device == r.device, f"{where}: device {y.device} != {r.device}"
    if unbatched:
        r, y = r.unsqueeze(0), y.unsqueeze(0)
    r64, y64 = r.double(), y.double()
    if bool(torch.isfinite(r64).all()):
        assert bool(torch.isfinite(y64).all()), f"{where}: non-finite output from finite input"
    rtol = rtol_of(r.dtype)
    dims = op.mask_dims(mode, r.dim(), channel_dim)
    policy = op.scale_policy(mode)
    offset: Tensor | None = None
    if policy == "alpha":
        a, b_kept, dropped_value = alpha_affine(p)
        kept_value = r64 * a + b_kept
        tol = rtol * (r64.abs() * a + abs(b_kept)) + 1e-12
        is_kept = (y64 - kept_value).abs() <= tol
        # the dropped constant is a * alpha' + b_kept in the input's dtype: near p = 1 a difference of
        # two nearly equal terms, so its rounding error scales with the terms, not with the result
        drop_tol = rtol * (a * abs(SELU_NEG_SATURATION) + abs(b_kept)) + 1e-12
        is_dropped = (y64 - dropped_value).abs() <= drop_tol
        assert bool((is_kept | is_dropped).all()), f"{where}: values neither a*x+b nor the dropped constant"
        keep = is_kept
        assert _const_along(keep, dims), f"{where}: mask not constant over dims {dims}"
        factor = keep.double() * a
        offset = torch.where(keep, torch.full_like(r64, b_kept), torch.full_like(r64, dropped_value))
        return Readout(keep, factor, offset)
    if policy == "free":
        factor = y64 / r64
        if factor.numel() and dims:
            mean = factor.mean(dim=dims, keepdim=True)
            spread = (factor - mean).abs()
            assert bool((spread <= rtol * mean.abs() + 1e-30).all()), (
                f"{where}: factor not constant over {dims}"
            )
            factor = mean.expand_as(factor)
        return Readout(torch.ones_like(r64, dtype=torch.bool), factor, None)
    keep = y64 != 0
    assert _const_along(keep, dims), f"{where}: mask not constant over dims {dims}"
    if policy == "expected":
        scale: Tensor | float = 1.0 / (1.0 - p) if p < 1 else 0.0
    elif policy == "none":
        scale = 1.0
    elif policy == "realized":
        n = keep.shape[0]
        total = math.prod(keep.shape[1:])
        per = keep.reshape(n, total)
        kept = per.sum(dim=1).double()
        s = torch.where(kept > 0, total / kept.clamp(min=1), torch.zeros_like(kept))
        scale = s.view((n,) + (1,) * (keep.dim() - 1))
    else:
        raise AssertionError(f"unknown scale policy {policy}")
    factor = keep.double() * scale
    want = r64 * factor
    err = (y64 - want).abs()
    bound = rtol * want.abs() + 1e-30
    if op.kind == "filter" and want.numel():  # a conv with dropped filters sums in another order
        bound = bound + 16 * rtol * float(want.abs().max())
    assert bool((err <= bound).all()), (
        f"{where}: kept elements are not input x scale ({policy}); max rel err "
        f"{float((err / want.abs().clamp_min(1e-30)).max()) if err.numel() else 0.0:.3g}"
    )
    return Readout(keep, factor, offset)


def _check_residual(
    op: OpInfo, mode: Mode | None, p: float, x: Tensor, y: Tensor, *, channel_dim: int, where: str
) -> Readout:
    """``y`` of ResidualDropPath with an identity branch: ``x`` (dropped) or ``x + x / (1 - p)`` (kept).

    Dropped rows are the input itself (nothing is added), so ``keep = y != x``; the readout's
    factor ``1 + keep / (1 - p)`` is also the gradient (the skip plus the scaled branch).
    """
    r, y = x.detach(), y.detach()
    assert y.shape == r.shape, f"{where}: shape {tuple(y.shape)} != {tuple(r.shape)}"
    assert y.dtype == r.dtype, f"{where}: dtype {y.dtype} != {r.dtype}"
    assert y.device == r.device, f"{where}: device {y.device} != {r.device}"
    r64, y64 = r.double(), y.double()
    if bool(torch.isfinite(r64).all()):
        assert bool(torch.isfinite(y64).all()), f"{where}: non-finite output from finite input"
    keep = y64 != r64
    dims = op.mask_dims(mode, r.dim(), channel_dim)
    assert _const_along(keep, dims), f"{where}: a sample is neither wholly kept nor wholly dropped"
    factor = 1.0 + keep.double() * (1.0 / (1.0 - p) if p < 1 else 0.0)
    want = r64 * factor
    err = (y64 - want).abs()
    assert bool((err <= rtol_of(r.dtype) * want.abs() + 1e-30).all()), (
        f"{where}: kept samples are not x + x / (1 - p); max rel err "
        f"{float((err / want.abs().clamp_min(1e-30)).max()) if err.numel() else 0.0:.3g}"
    )
    return Readout(keep, factor, None)


def check_gradient(
    grad: Tensor, weight: Tensor, readout: Readout, *, unbatched: bool = False, what: str = ""
) -> None:
    """Assert ``grad == weight x factor`` (the gradient of ``sum(y * weight)`` is mask x scale)."""
    g = grad.detach().double()
    w = weight.detach().double()
    if unbatched:
        g, w = g.unsqueeze(0), w.unsqueeze(0)
    want = w * readout.factor
    rtol = rtol_of(grad.dtype)
    err = (g - want).abs()
    assert bool((err <= rtol * want.abs() + 1e-30).all()), f"{what}: gradient is not mask x scale"


def dropped_fraction(
    readout: Readout, op: OpInfo, mode: Mode | None, channel_dim: int = 1
) -> tuple[int, int]:
    """``(dropped units, units)`` counting one unit per independent mask value (not for DropBlock)."""
    keep = readout.keep
    dims = op.mask_dims(mode, keep.dim(), channel_dim)
    if dims:
        keep = keep.amax(dim=dims)
    return int((~keep).sum()), keep.numel()


def message_names(exc: BaseException, fn: str, arg: str) -> bool:
    """Whether an error message names the function or class and the argument."""
    msg = str(exc)
    return bool(re.search(rf"\b{re.escape(fn)}\b", msg)) and bool(re.search(rf"\b{re.escape(arg)}\b", msg))


@contextlib.contextmanager
def watchdog(seconds: float, what: str) -> Iterator[None]:
    """Fail with ``TimeoutError`` if the block runs longer than ``seconds`` (a hang is a bug).

    SIGALRM-based: it interrupts Python code between bytecodes (and torch ops when they return);
    in a thread other than the main one it does nothing.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{what}: no result within {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- the table ---------------------------------------------------------------------------------


def _got(v: Any) -> str:
    """The regex of ``", got <repr(v)>"`` at the end of a message."""
    return ", got " + re.escape(repr(v)) + "$"


def _p_bad(allow_one: bool) -> list[BadArg]:
    interval = r"\[0, 1\]" if allow_one else r"\[0, 1\)"
    prob, real = f"a probability in {interval}", f"a real number in {interval}"
    bad = [
        BadArg({"p": v}, ValueError, "p", match=prob + _got(v))
        for v in (-0.1, 1.5, 2, float("nan"), float("inf"))
    ]
    bad.append(BadArg({"p": 10**400}, ValueError, "p", match=prob + ", got a number of magnitude ~1e400$"))
    bad += [BadArg({"p": v}, TypeError, "p", match=real + _got(v)) for v in ("0.5", True, None)]
    if not allow_one:
        bad.append(
            BadArg(
                {"p": 1.0}, ValueError, "p", match=prob + r" \(p = 1 would drop every element.*" + _got(1.0)
            )
        )
    return bad


def _bools(arg: str, values: Sequence[Any]) -> list[BadArg]:
    return [BadArg({arg: v}, TypeError, arg, match="a bool" + _got(v)) for v in values]


def _channel_dim_range(ndim: int | None) -> str:
    """The allowed channel dims as the message shows them (any batched rank when ``ndim`` is None)."""
    if ndim is None:
        return r"a dim of the \d+-D batched input other than the batch dim 0: 1 \.\. \d+ or -1 \.\. -\d+"
    return (
        rf"a dim of the {ndim}-D batched input other than the batch dim 0: "
        rf"1 \.\. {ndim - 1} or -1 \.\. -{ndim - 1}"
    )


def _channel_dim_bad(op_spatial_dims: int | None, input_ndim: int | None, *, function: bool) -> list[BadArg]:
    """Bad ``channel_dim`` values; ``input_ndim``: the rank of the input the checks call with.

    A rank-free module checks ``channel_dim = 0`` at construction, against its smallest rank.
    """
    ndim = (op_spatial_dims + 2) if op_spatial_dims is not None else None
    when = "build" if ndim else "call"
    rng = _channel_dim_range(ndim or input_ndim)
    zero = rng if (ndim or function) else _channel_dim_range(None)
    out = [BadArg({"channel_dim": 0}, ValueError, "channel_dim", match=zero + _got(0))]
    out += [
        BadArg({"channel_dim": v}, TypeError, "channel_dim", match="an int" + _got(v))
        for v in (1.0, True, "last")
    ]
    out += [BadArg({"channel_dim": v}, ValueError, "channel_dim", when, match=rng + _got(v)) for v in (9, -9)]
    edge = ndim or input_ndim
    if edge is not None:  # one past the last dim, on either side
        out += [
            BadArg({"channel_dim": v}, ValueError, "channel_dim", when, match=rng + _got(v))
            for v in (edge, -edge)
        ]
    return out


def input_ndim(op: OpInfo) -> int | None:
    """The rank of the input the argument checks call an op with (``None``: none, or any)."""
    if op.kind == "filter":
        return None
    if op.family == "block" and op.spatial_dims is None:
        return 4  # 2-d, as the block_size lists in the table assume
    return len(op.samples()[0].shape)


def bad_args(op: OpInfo) -> list[BadArg]:
    """Every bad argument of ``op``: the common ones its signature has, then its own."""
    out = _p_bad(op.allow_p_one)
    if op.has_inplace:
        out += _bools("inplace", ["yes", 1, 0, None])
    if op.has_channel_dim:
        out += _channel_dim_bad(op.spatial_dims, input_ndim(op), function=op.kind == "function")
    if op.kind == "function":
        out += _bools("training", ["no", 1, None])
        out += [
            BadArg(
                {"generator": v}, TypeError, "generator", match="None or a torch.Generator, got " + t + "$"
            )
            for v, t in ((1, "int"), ("g", "str"))
        ]
        if op.keyed:
            out += [
                BadArg({"key": "k"}, TypeError, "key"),
                BadArg({"key": "KEY_AND_GENERATOR"}, ValueError, "key"),
                BadArg({"key": "KEY_WRONG_BATCH"}, ValueError, "key.sample_ids"),
                BadArg({"key": "KEY_BAD_STEP"}, ValueError, "key.step"),
                BadArg({"key": "KEY_BAD_IDS"}, TypeError, "key.sample_ids"),
            ]
    out += list(op.bad_args_extra)
    if op.kind == "function":
        out = [dataclasses.replace(b, when="call") for b in out]
    return out


def _block_bad(spatial_dims: int | None, *, function: bool = False) -> tuple[BadArg, ...]:
    n = spatial_dims or 2  # functions are checked on a 2-d input
    wrong_len = (3,) * (n + 1)
    # the rank-free module does not know how many sizes it needs until it sees a map
    sizes = r"a positive int or a tuple of (\d+ )?positive ints"
    if spatial_dims or function:
        sizes = rf"a positive int or a tuple of {n} positive ints"
    zero_first = (0,) + (3,) * (n - 1)
    zero_last = (3,) * (n - 1) + (0,)
    true_last = (3,) * (n - 1) + (True,)
    out = (
        BadArg({"block_size": 0}, ValueError, "block_size", match=sizes + _got(0)),
        BadArg({"block_size": -3}, ValueError, "block_size", match=sizes + _got(-3)),
        BadArg({"block_size": True}, TypeError, "block_size", match=sizes + _got(True)),
        BadArg({"block_size": 2.0}, TypeError, "block_size", match=sizes + _got(2.0)),
        BadArg({"block_size": 2.5}, TypeError, "block_size", match=sizes + _got(2.5)),
        BadArg({"block_size": "3"}, TypeError, "block_size", match=sizes + _got("3")),
        BadArg({"block_size": zero_first}, ValueError, "block_size", match=sizes + _got(zero_first)),
        BadArg({"block_size": zero_last}, ValueError, "block_size", match=sizes + _got(zero_last)),
        BadArg({"block_size": true_last}, TypeError, "block_size", match=sizes + _got(true_last)),
        BadArg(
            {"block_size": wrong_len},
            ValueError,
            "block_size",
            "build" if spatial_dims else "call",
            match=rf"a positive int or a tuple of {n} positive ints" + _got(wrong_len),
        ),
        BadArg({"block_size": 10**30}, ValueError, "block_size", "call"),
        BadArg({"block_size": 2**62}, ValueError, "block_size", "call"),
        *(
            BadArg({"seeding": v}, ValueError, "seeding", match="one of 'uniform', 'valid'" + _got(v))
            for v in ("random", "same", "centre")
        ),
        BadArg(
            {"scale": "batch"},
            ValueError,
            "scale",
            match="one of 'expected', 'realized', 'none'" + _got("batch"),
        ),
        BadArg(
            {"scale": None}, ValueError, "scale", match="one of 'expected', 'realized', 'none'" + _got(None)
        ),
        *_bools("shared_channels", ["yes", 1, None]),
    )
    if function:  # a block larger than the (6, 6) map cannot be seeded whole
        out += (
            BadArg(
                {"block_size": (8, 3), "seeding": "valid"},
                ValueError,
                "block_size",
                "call",
                match=r"at most the map size \(6, 6\) .*seeding='valid'.*" + _got((8, 3)),
            ),
        )
    return out


BLOCK_MODES = (
    Mode("default", {"block_size": 3}),
    Mode("shared", {"block_size": 3, "shared_channels": True}),
    Mode("valid", {"block_size": 2, "seeding": "valid"}),
    Mode("realized", {"block_size": 3, "scale": "realized"}),
    Mode("rect-none", {"block_size": "RECT", "scale": "none"}),
    Mode("shared-realized", {"block_size": 2, "shared_channels": True, "scale": "realized"}),
)


def _block_modes(spatial_dims: int | None) -> tuple[Mode, ...]:
    n = spatial_dims or 1
    out = []
    for m in BLOCK_MODES:
        kw = dict(m.kwargs)
        if kw["block_size"] == "RECT":  # a rectangular block, one side per spatial dim (rank-fixed only)
            kw["block_size"] = (2, 3, 1)[:n] if spatial_dims else 2
        out.append(Mode(m.name, kw))
    return tuple(out)


def _conv(d: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(1234)
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1](3, 8, 3, padding=1)
        return conv

    return make


def _module_entries(
    base: str, classes: Sequence[type], fn: Callable[..., Tensor], family: str, **kw: Any
) -> list[OpInfo]:
    out = [OpInfo(base, "module", classes[0], family, None, function=fn, **kw)]
    for d, cls in enumerate(classes[1:], start=1):
        out.append(OpInfo(cls.__name__, "module", cls, family, d, function=fn, unbatched=True, **kw))
    return out


def _block_module_entries() -> list[OpInfo]:
    classes = [sd.DropBlock, sd.DropBlock1d, sd.DropBlock2d, sd.DropBlock3d]
    out = []
    for d, cls in enumerate(classes):
        sdims = d or None
        out.append(
            OpInfo(
                cls.__name__,
                "module",
                cls,
                "block",
                sdims,
                allow_p_one=False,
                modes=_block_modes(sdims),
                unbatched=sdims is not None,
                bad_args_extra=_block_bad(sdims),
                function=F.drop_block,
                p=0.3,
            )
        )
    return out


def _same(rows: Tensor) -> Tensor:
    return rows


def _wrong_shape(rows: Tensor) -> Tensor:
    return rows.unsqueeze(-1)


def _wrong_type(rows: Tensor) -> tuple[Tensor]:
    return (rows,)


def drop_path_residual(input: Tensor, p: Any = 0.1, training: Any = True, **kwargs: Any) -> Tensor:
    """The table's form of :func:`spatialdrop.functional.drop_path_residual`: the branch is the identity.

    ``(input, p, training=..., **kwargs)`` like the other functions; a ``branch`` keyword replaces it.
    """
    branch = kwargs.pop("branch", _same)
    return F.drop_path_residual(input, branch, p, training=training, **kwargs)


class ResidualDropPath(sd.ResidualDropPath):
    """The table's form of :class:`spatialdrop.ResidualDropPath`: built from ``(p, **kwargs)``, the branch
    the identity (a ``branch`` keyword replaces it), so outputs read back as ``x (1 + keep / (1 - p))``."""

    def __init__(self, p: Any = 0.1, **kwargs: Any) -> None:
        branch = kwargs.pop("branch", None)
        super().__init__(nn.Identity() if branch is None else branch, p, **kwargs)


def _residual_bad(module: bool) -> tuple[BadArg, ...]:
    positions = "a collection of ints \\(positions in args\\) and strs \\(names in kwargs\\)"
    out = [
        BadArg(
            {"branch": 3},
            TypeError,
            "branch",
            match=("a torch.nn.Module" if module else "a callable .*") + ", got int$",
        ),
        BadArg({"batched_args": "mask"}, TypeError, "batched_args", match=positions + _got("mask")),
        BadArg({"batched_args": (1.5,)}, TypeError, "batched_args", match=positions + _got((1.5,))),
        BadArg(
            {"batched_args": (-1,)},
            ValueError,
            "batched_args",
            match=positions + " \\(positions >= 0\\)" + _got((-1,)),
        ),
    ]
    if module:
        out += [
            BadArg({"channel_dim": 1}, TypeError, "channel_dim"),  # no channel_dim
            BadArg({"inplace": False}, TypeError, "inplace"),  # no inplace: the input is never written
        ]
    else:
        out += [
            BadArg({"args": 3}, TypeError, "args"),
            BadArg({"kwargs": [1]}, TypeError, "kwargs"),
            # an absent batched argument is not gathered (issue 29 item 6): no error for (0,) / ("mask",)
            BadArg({"args": (torch.ones(5),), "batched_args": (0,)}, ValueError, "args"),  # names args[0]
            # p = 0: the branch surely runs (and on the whole batch)
            BadArg(
                {"branch": _wrong_shape, "p": 0.0},
                ValueError,
                "branch",
                match=r"a callable that returns a tensor of the shape of its input rows, got output \(6, 1\) "
                r"for input rows \(6,\)$",
            ),
            BadArg(
                {"branch": _wrong_type, "p": 0.0},
                TypeError,
                "branch",
                match="a callable that returns a tensor, got one that returned tuple$",
            ),
        ]
    return tuple(out)


OPS: list[OpInfo] = [
    OpInfo("spatial_dropout", "function", F.spatial_dropout, "channel"),
    *_module_entries(
        "SpatialDropout",
        [sd.SpatialDropout, sd.SpatialDropout1d, sd.SpatialDropout2d, sd.SpatialDropout3d],
        F.spatial_dropout,
        "channel",
    ),
    OpInfo(
        "drop_block",
        "function",
        F.drop_block,
        "block",
        allow_p_one=False,
        modes=_block_modes(None),
        bad_args_extra=_block_bad(None, function=True),
        p=0.3,
    ),
    *_block_module_entries(),
    OpInfo(
        "drop_path",
        "function",
        F.drop_path,
        "sample",
        modes=(Mode("default"), Mode("unscaled", {"scale": False})),
        has_channel_dim=False,
        min_rank=1,
        bad_args_extra=tuple(_bools("scale", ["yes", 1, 0])),
    ),
    OpInfo(
        "DropPath",
        "module",
        sd.DropPath,
        "sample",
        modes=(Mode("default"), Mode("unscaled", {"scale": False})),
        has_channel_dim=False,
        min_rank=1,
        function=F.drop_path,
        bad_args_extra=(
            *_bools("scale", ["yes", 1, 0]),
            BadArg({"channel_dim": 1}, TypeError, "channel_dim"),  # DropPath has no channel_dim
        ),
    ),
    OpInfo(
        "drop_path_residual",
        "function",
        drop_path_residual,
        "residual",
        has_channel_dim=False,
        has_inplace=False,
        min_rank=1,
        bad_args_extra=_residual_bad(module=False),
    ),
    OpInfo(
        "ResidualDropPath",
        "module",
        ResidualDropPath,
        "residual",
        has_channel_dim=False,
        has_inplace=False,
        min_rank=1,
        function=drop_path_residual,
        bad_args_extra=_residual_bad(module=True),
    ),
    OpInfo("gaussian_spatial_dropout", "function", F.gaussian_spatial_dropout, "gaussian", allow_p_one=False),
    *_module_entries(
        "GaussianSpatialDropout",
        [
            sd.GaussianSpatialDropout,
            sd.GaussianSpatialDropout1d,
            sd.GaussianSpatialDropout2d,
            sd.GaussianSpatialDropout3d,
        ],
        F.gaussian_spatial_dropout,
        "gaussian",
        allow_p_one=False,
    ),
    OpInfo("alpha_spatial_dropout", "function", F.alpha_spatial_dropout, "alpha", allow_p_one=False),
    *_module_entries(
        "AlphaSpatialDropout",
        [
            sd.AlphaSpatialDropout,
            sd.AlphaSpatialDropout1d,
            sd.AlphaSpatialDropout2d,
            sd.AlphaSpatialDropout3d,
        ],
        F.alpha_spatial_dropout,
        "alpha",
        allow_p_one=False,
    ),
    OpInfo(
        "FilterDropout",
        "filter",
        sd.FilterDropout,
        "filter",
        has_channel_dim=False,
        has_inplace=False,
        conv=_conv(2),
        dtypes=(torch.float32, torch.float64, torch.bfloat16),
    ),
    OpInfo(
        "filter_dropout",
        "filter",
        sd.filter_dropout,
        "filter",
        has_channel_dim=False,
        has_inplace=False,
        conv=_conv(1),
        dtypes=(torch.float32, torch.float64, torch.bfloat16),
        bad_args_extra=(
            BadArg({"conv": nn.Linear(3, 4)}, TypeError, "conv"),
            BadArg({"conv": nn.ConvTranspose2d(3, 4, 3)}, TypeError, "conv"),
        ),
    ),
]

# filter_dropout on a 3-d conv too (its samples follow the conv's rank)
OPS.append(dataclasses.replace(OPS[-1], name="filter_dropout[conv3d]", conv=_conv(3), bad_args_extra=()))

OPS_BY_NAME = {op.name: op for op in OPS}
ACTIVATION_OPS = [op for op in OPS if op.kind != "filter"]
FUNCTIONS = [op for op in OPS if op.kind == "function"]
MODULES = [op for op in OPS if op.kind == "module"]


def op_modes() -> Iterator[tuple[OpInfo, Mode]]:
    """Every (op, mode) pair."""
    for op in OPS:
        for mode in op.modes:
            yield op, mode


def op_mode_params(ops: Sequence[OpInfo] | None = None) -> list[Any]:
    """``pytest.param(op, mode, id=...)`` for every (op, mode) pair."""
    import pytest

    return [
        pytest.param(op, mode, id=f"{op.name}-{mode.name}")
        for op in (OPS if ops is None else ops)
        for mode in op.modes
    ]


def op_params(ops: Sequence[OpInfo] | None = None) -> list[Any]:
    import pytest

    return [pytest.param(op, id=op.name) for op in (OPS if ops is None else ops)]


def default_sample(op: OpInfo) -> Sample:
    """The first sample: a batched channels-first input."""
    return op.samples()[0]


def make_key(seed: int, n: int, *, step: int = 3, layer: int = 5, offset: int = 0) -> sd.MaskKey:
    return sd.MaskKey(seed, step, layer, torch.arange(offset, offset + n))
