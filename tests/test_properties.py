"""Property tests (issue 9): generated arguments for every public op and module, driven by ``optable``.

Generated: shapes (ranks 1-6, sizes 0 and 1 included), dtypes (float and not), ``p`` (edge values,
NaN, inf, huge ints, numpy scalars, 0-d tensors, wrong types), block sizes (0, negative, huge,
wrong length, bool), every ``channel_dim``, ``inplace`` on leaves and on views, non-contiguous
and channels-last input, generators and keys, train and eval.

The only acceptable outcomes, within a time bound per example (a SIGALRM watchdog): a result
that satisfies the op's invariants (shape/dtype/device kept; eval and p = 0 give the input;
dropped elements 0 and kept ones input x scale; no NaN/inf from finite input; gradient = mask x
scale; second-order gradient consistent), or a ``ValueError``/``TypeError`` whose message names
the op and an argument.

Profiles (tests/conftest.py): ``ci`` (default: fixed, derandomized examples, no shrinking: a few
minutes) and ``release`` (``HYPOTHESIS_PROFILE=release``: 2000 random examples per test, shrinking).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import spatialdrop as sd
from optable import (
    FLOAT_DTYPES,
    OPS,
    Mode,
    OpInfo,
    check_gradient,
    check_output,
    nonzero_input,
    watchdog,
)

ACTIVATION = [op for op in OPS if op.kind != "filter"]
TIME_BOUND = 5.0  # seconds per example: a correct op answers these small inputs in milliseconds
ARG_NAMES = (
    r"p|input|block_size|channel_dim|inplace|training|generator|key|key\.\w+|seeding|scale|"
    r"shared_channels|conv|mask_context sample_ids"
)

P_EDGE = [
    0.0,
    -0.0,
    1.0,
    0.5,
    1e-300,
    5e-324,
    0.99999,
    1 - 1e-7,
    1 - 2**-53,
    1e-7,
    -1e-9,
    1.0000001,
    -1.0,
    2.0,
    float("nan"),
    float("inf"),
    float("-inf"),
    10**400,
    -(10**400),
    2**64,
    0,
    1,
    True,
    False,
    None,
    "0.5",
    [0.5],
    1 + 0j,
]


@st.composite
def p_values(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["float", "edge", "numpy", "tensor"]))
    if kind == "float":
        return draw(st.floats(0.0, 1.0))
    if kind == "edge":
        return draw(st.sampled_from(P_EDGE))
    if kind == "numpy":
        v = draw(st.sampled_from([0.0, 0.3, 1.0, 0.99999, float("nan")]))
        return draw(st.sampled_from([np.float32, np.float64, np.float16]))(v)
    v = draw(st.sampled_from([0.0, 0.3, 1.0]))
    return torch.tensor(v, dtype=draw(st.sampled_from([torch.float32, torch.float64])))


def block_sizes(n: int) -> st.SearchStrategy[Any]:
    side = st.one_of(st.integers(-2, 7), st.sampled_from([0, 2**31, 2**62, 10**30, True, 2.0]))
    return st.one_of(
        st.integers(1, 7),
        side,
        st.tuples(*([st.integers(1, 7)] * max(n, 1))),
        st.lists(side, min_size=0, max_size=6).map(tuple),
        st.sampled_from([None, "3", [3, 3], np.int64(3)]),
    )


DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.bool,
    torch.complex64,
]


@st.composite
def shapes(draw: st.DrawFn, op: OpInfo) -> tuple[int, ...]:
    if op.spatial_dims is not None and draw(st.booleans()):  # mostly the module's own ranks
        rank = op.spatial_dims + draw(st.sampled_from([1, 2]))
    else:
        rank = draw(st.integers(1, 6))
    return tuple(draw(st.lists(st.integers(0, 4), min_size=rank, max_size=rank)))


def _make_input(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, str]:
    layout = draw(st.sampled_from(["contiguous", "non-contiguous", "channels_last", "expanded-free"]))
    float_dtype = dtype.is_floating_point
    base_dtype = dtype if float_dtype else torch.float32
    if layout == "non-contiguous" and len(shape) >= 1:
        big = (*shape[:-1], 2 * shape[-1])
        x = nonzero_input(big, base_dtype, seed=draw(st.integers(0, 9)))[..., ::2]
    else:
        x = nonzero_input(shape, base_dtype, seed=draw(st.integers(0, 9)))
        if layout == "channels_last" and len(shape) in (4, 5):
            x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
        else:
            layout = "contiguous"
    if not float_dtype:
        x = (x > 0).to(dtype) if dtype == torch.bool else x.mul(10).to(dtype)
    return x, layout


def _message_ok(exc: BaseException, names: list[str]) -> bool:
    msg = str(exc)
    if msg.startswith("mask_context: "):  # the harness's own mask_context(step=..., sample_ids=...) call
        return re.match(r"mask_context: (step|sample_ids)\b", msg) is not None
    op_named = any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names)
    return op_named and re.search(rf"\b({ARG_NAMES})\b", msg) is not None


def _is_zero(p: Any) -> bool:
    try:
        return float(p) == 0.0
    except Exception:
        return False


@st.composite
def calls(draw: st.DrawFn, op: OpInfo) -> dict[str, Any]:
    """One generated call: input, p, keyword arguments, training, inplace target, grad.

    Half of the calls are "sane" (a float input, p in [0, 1), training, the op's own modes) so that
    the invariants of results, not only the errors, get many examples.
    """
    sane = draw(st.booleans())
    shape = draw(shapes(op))
    dtype = draw(st.sampled_from(DTYPES[:4] if sane else DTYPES))
    x, layout = _make_input(draw, shape, dtype)
    kwargs: dict[str, Any] = {}
    mode = draw(st.sampled_from(op.modes))
    kwargs.update(mode.kwargs)
    if op.family == "block" and not sane and draw(st.booleans()):
        kwargs["block_size"] = draw(block_sizes(max(len(shape) - 2, 1)))
    if op.family == "block" and not sane:
        if draw(st.integers(0, 9)) == 0:
            kwargs["seeding"] = draw(st.sampled_from(["uniform", "valid", "other", 1]))
        if draw(st.integers(0, 9)) == 0:
            kwargs["scale"] = draw(st.sampled_from(["expected", "realized", "none", "batch", None]))
    if op.has_channel_dim and draw(st.booleans()):
        if sane:
            kwargs["channel_dim"] = draw(st.integers(-len(shape), len(shape) - 1)) if shape else 1
        else:
            kwargs["channel_dim"] = draw(
                st.one_of(st.integers(-7, 7), st.sampled_from([1.0, True, None, np.int64(1)]))
            )
    inplace = (
        draw(st.sampled_from([False, True] if sane else [False, True, "yes"])) if op.has_inplace else False
    )
    if op.has_inplace and inplace is not False:
        kwargs["inplace"] = inplace
    training = True if sane else draw(st.sampled_from([True, False, "yes"]))
    source = draw(
        st.sampled_from(
            ["none", "generator", "key"] if sane else ["none", "generator", "key", "bad-key", "both"]
        )
    )
    n = shape[0] if shape else 0
    if op.kind == "function" and source in ("generator", "both"):
        kwargs["generator"] = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
    key = None
    if op.keyed and source in ("key", "bad-key", "both"):
        ids_n = n if source != "bad-key" else draw(st.integers(0, 5))
        bad_steps = [] if sane else [-1, 2**32, 1.5]
        step = draw(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, *bad_steps])))
        key = sd.MaskKey(
            draw(st.integers(0, 2**64 - 1)), step, draw(st.integers(0, 2**64 - 1)), torch.arange(ids_n)
        )
    grad = dtype.is_floating_point and draw(st.booleans())
    where = draw(st.sampled_from(["leaf", "view"])) if grad else "plain"
    p = draw(st.floats(0.0, 0.95)) if sane else draw(p_values())
    return {
        "x": x,
        "p": p,
        "kwargs": kwargs,
        "mode": mode,
        "training": training,
        "key": key,
        "grad": grad,
        "where": where,
        "layout": layout,
    }


def _run(
    op: OpInfo, case: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, nn.Module | None]:
    """Run one generated call; returns (input as given, output, leaf to read the gradient from, module)."""
    x0 = case["x"]
    leaf = None
    x = x0  # the generated layout itself (an in-place op may write it; the checks use a copy)
    if case["grad"]:
        leaf = x0.detach().clone().requires_grad_(True)
        x = leaf if case["where"] == "leaf" else leaf * 1.0
    kwargs = dict(case["kwargs"])
    if op.kind == "function":
        if case["key"] is not None:
            kwargs["key"] = case["key"]
        return x, op.target(x, case["p"], training=case["training"], **kwargs), leaf, None
    m = op.target(case["p"], **kwargs)
    m.train(case["training"]) if isinstance(case["training"], bool) else None
    if case["key"] is not None:
        sd.keyed_masks(m, case["key"].seed)
        with sd.mask_context(step=case["key"].step, sample_ids=case["key"].sample_ids):
            return x, m(x), leaf, m
    return x, m(x), leaf, m


def _check_case(op: OpInfo, case: dict[str, Any]) -> None:
    names = [op.target.__name__] + ([op.function.__name__] if op.function is not None else [])
    x0 = case["x"].clone()  # the values before the call, for the checks
    with watchdog(TIME_BOUND, f"{op.name} {case['kwargs']} p={case['p']!r} shape={tuple(x0.shape)}"):
        try:
            x, y, leaf, m = _run(op, case)
        except (ValueError, TypeError) as exc:
            assert _message_ok(exc, names), f"{op.name}: message names no op/argument: {exc}"  # noqa: PT017
            if "mask_context" in str(exc) or "MaskKey" in str(exc):
                return
            return
        except RuntimeError as exc:
            # keyed modules outside a valid context raise RuntimeError by design
            if case["key"] is None and op.is_module and "mask_context" in str(exc):
                return
            raise
        training = case["training"] if isinstance(case["training"], bool) else True
        if op.is_module and m is not None:
            training = m.training
        _check_result(op, case, x0, x, y, leaf, training)


def _check_result(
    op: OpInfo,
    case: dict[str, Any],
    x0: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    leaf: torch.Tensor | None,
    training: bool,
) -> None:
    assert y.shape == x0.shape, op.name
    assert y.dtype == x0.dtype, op.name
    assert y.device == x0.device, op.name
    assert x0.is_floating_point(), f"{op.name} accepted a {x0.dtype} input"
    p = float(case["p"])
    inplace = case["kwargs"].get("inplace", False) is True
    if not training or p == 0.0 or x0.numel() == 0:  # the identity (residual: x + branch(x))
        assert torch.equal(y, op.reference(None, x0)), f"{op.name}: eval / p=0 / empty is not the identity"
        return
    kwargs = case["kwargs"]
    mode = Mode(
        "generated",
        {k: v for k, v in kwargs.items() if k in ("block_size", "shared_channels", "scale", "seeding")},
    )
    channel_dim = kwargs.get("channel_dim", 1)
    ndim = x0.dim()
    unbatched = op.spatial_dims is not None and ndim == op.spatial_dims + 1
    readout = check_output(
        op,
        mode,
        p,
        x0,
        y,
        channel_dim=int(channel_dim),
        unbatched=unbatched,
        what=f"generated {tuple(x0.shape)}",
    )
    if inplace:
        assert torch.equal(x, y), f"{op.name}: inplace did not write the input"
    if leaf is not None and y.requires_grad:
        w = nonzero_input(y.shape, y.dtype, seed=1)
        (g,) = torch.autograd.grad((y * w).sum(), leaf, create_graph=x0.dtype == torch.float64)
        check_gradient(g, w, readout, unbatched=unbatched, what=f"{op.name} generated")
        if x0.dtype == torch.float64 and g.requires_grad:  # y is affine in x: the second derivative is 0
            (gg,) = torch.autograd.grad((g * w).sum(), leaf, allow_unused=True)
            assert gg is None or not bool(gg.any()), f"{op.name}: non-zero second-order gradient"


@pytest.mark.parametrize("op", [pytest.param(op, id=op.name) for op in ACTIVATION])
@given(data=st.data())
def test_generated_calls_give_a_valid_result_or_a_clear_error(op: OpInfo, data: st.DataObject) -> None:
    _check_case(op, data.draw(calls(op)))


@pytest.mark.parametrize("op", [pytest.param(op, id=op.name) for op in OPS if op.kind == "filter"])
@given(
    p=p_values(), dims=st.integers(1, 3), cin=st.integers(0, 3), cout=st.integers(0, 4), n=st.integers(0, 3)
)
@settings(max_examples=30)
def test_generated_filter_dropout(op: OpInfo, p: Any, dims: int, cin: int, cout: int, n: int) -> None:
    """Filter dropout: output = plain conv output x one factor per filter (0 or 1/(1-p)), or a clear error."""
    with watchdog(TIME_BOUND, f"{op.name} p={p!r}"):
        try:
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](max(cin, 1), cout or 1, 1)
            if op.target is sd.FilterDropout:
                layer = sd.FilterDropout(p)
                p = layer.p
                conv = sd.filter_dropout(conv, p)
            else:
                conv = sd.filter_dropout(conv, p)
        except (ValueError, TypeError) as exc:
            assert _message_ok(exc, ["FilterDropout", "filter_dropout"]), str(exc)  # noqa: PT017
            return
        x = nonzero_input((n, max(cin, 1)) + (3,) * dims)
        y = conv(x)
        conv.eval()
        ref = conv(x)
        conv.train()
        readout = check_output(op, None, float(p), x, y, ref=ref, what="generated")
        if float(p) == 0.0:
            assert torch.equal(y, ref)
        assert readout.keep.shape == y.shape


@given(
    seed=st.integers(0, 2**64 - 1), step=st.integers(0, 2**32 - 1), n=st.integers(0, 6), per=st.integers(0, 9)
)
def test_keyed_uniform_and_normal_are_bounded_and_split_consistent(
    seed: int, step: int, n: int, per: int
) -> None:
    key = sd.MaskKey(seed, step, 5, torch.arange(n))
    with watchdog(TIME_BOUND, "keyed_uniform"):
        u = sd.keyed_uniform(key, per)
        z = sd.keyed_normal(key, per)
    assert u.shape == (n, per)
    assert z.shape == (n, per)
    assert bool(((u >= 0) & (u < 1)).all())
    assert bool(torch.isfinite(z).all())
    if n > 1:
        part = key._replace(sample_ids=key.sample_ids[1:])
        assert torch.equal(sd.keyed_uniform(part, per), u[1:])


# --- non-finite input and forward-mode AD (issue 29) ----------------------------------------------


@contextlib.contextmanager
def dropblock_path(name: str) -> Iterator[None]:
    """Route CPU DropBlock through ``name``: ``sparse`` (fused C pass), ``torch-ops``, ``dense``."""
    from spatialdrop._dropblock import ops

    with ops.override(ops.Path.DENSE if name == "dense" else None, extension=name != "torch-ops"):
        yield


@st.composite
def sane_calls(draw: st.DrawFn, op: OpInfo, dtypes: tuple[torch.dtype, ...]) -> dict[str, Any]:
    """A call that must succeed: a sample of the op's table with its sizes redrawn (1 to 5), a mode,
    a dtype, ``p`` in [0.05, 0.9], a seed and (DropBlock) a path."""
    sample = draw(st.sampled_from([s for s in op.samples() if 0 not in s.shape]))
    shape = sample.shape if op.kind == "filter" else tuple(draw(st.integers(1, 5)) for _ in sample.shape)
    mode = draw(st.sampled_from(op.modes))
    if op.family == "block" and mode.kwargs.get("seeding") == "valid":
        mode = Mode(mode.name, {**mode.kwargs, "block_size": 1})  # a whole block fits any map
    return {
        "sample": sample,
        "shape": shape,
        "mode": mode,
        "dtype": draw(st.sampled_from(dtypes)),
        "p": draw(st.floats(0.05, 0.9))
        if op.allow_p_one or op.family != "block"
        else draw(st.floats(0.05, 0.6)),
        "seed": draw(st.integers(0, 2**31)),
        "path": draw(st.sampled_from(["sparse", "torch-ops", "dense"])) if op.family == "block" else "sparse",
    }


def _build(op: OpInfo, case: dict[str, Any]) -> nn.Module:
    channel_dim = case["sample"].channel_dim if op.has_channel_dim else 1
    return op.build(case["p"], case["mode"], channel_dim=channel_dim)


def _same_numbers(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal NaN positions; elsewhere equal values of the same sign (``-0.0`` is not ``0.0``)."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    a, b = a.masked_fill(nan, 1), b.masked_fill(nan, 1)
    return torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())


@pytest.mark.parametrize("op", [pytest.param(op, id=op.name) for op in ACTIVATION])
@given(data=st.data())
@settings(max_examples=40)
def test_non_finite_input_follows_one_rule(op: OpInfo, data: st.DataObject) -> None:
    """Every layer and (DropBlock) path is ``y = x a + b`` per element, ``a``, ``b`` finite and drawn
    apart from ``x``, as torch's dropout: NaN gives NaN, inf where dropped (``a = 0``) gives NaN and
    where kept an inf, and every finite element the bits it has without the non-finite ones."""
    case = data.draw(sane_calls(op, FLOAT_DTYPES))
    x = nonzero_input(case["shape"], case["dtype"], seed=data.draw(st.integers(0, 9)))
    where = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    kind = torch.randint(0, 8, x.shape, generator=where)  # 0: NaN, 1: inf, 2: -inf, else finite
    xn = x.masked_fill(kind == 0, float("nan")).masked_fill(kind == 1, float("inf"))
    xn = xn.masked_fill(kind == 2, float("-inf"))
    m = _build(op, case)
    with dropblock_path(case["path"]), torch.no_grad():
        y1, y2, yn = (op.run(m, t, seed=case["seed"]) for t in (x, x * 2, xn))
    dropped = y1 == y2  # a = 0: the output does not depend on x there
    finite = kind > 2
    assert _same_numbers(yn[finite], y1[finite]), f"{op.name} {case['path']}: finite elements changed"
    assert bool(yn[kind == 0].isnan().all()), f"{op.name} {case['path']}: NaN did not give NaN"
    inf = (kind == 1) | (kind == 2)
    assert bool(yn[inf & dropped].isnan().all()), f"{op.name} {case['path']}: a dropped inf is not NaN"
    assert bool(yn[inf & ~dropped].isinf().all()), f"{op.name} {case['path']}: a kept inf is not inf"


@pytest.mark.parametrize("op", [pytest.param(op, id=op.name) for op in OPS])
@given(data=st.data())
@settings(max_examples=40)
def test_forward_mode_ad_is_mask_times_scale_times_tangent(op: OpInfo, data: st.DataObject) -> None:
    """``torch.func.jvp`` and ``torch.autograd.forward_ad`` on every layer, mode and (DropBlock) path
    of the table: the primal is the output and the tangent ``J t``, which for these ops (affine in the
    input under fixed randomness) is ``f(x + t) - f(x)``: mask x scale x tangent; never a silent zero."""
    case = data.draw(sane_calls(op, (torch.float64,)))
    how = data.draw(st.sampled_from(["torch.func", "forward_ad"]))
    x = nonzero_input(case["shape"], torch.float64, seed=1)
    t = nonzero_input(case["shape"], torch.float64, seed=2)
    m = _build(op, case)
    if op.kind == "filter":
        m = m.double()

    def f(z: torch.Tensor) -> torch.Tensor:
        return op.run(m, z, seed=case["seed"])

    with dropblock_path(case["path"]):
        if how == "torch.func":
            y, jt = torch.func.jvp(f, (x,), (t,))
        else:
            with fwAD.dual_level():
                out = f(fwAD.make_dual(x, t))
                y, jt = fwAD.unpack_dual(out)
        assert jt is not None, f"{op.name} {case['path']} {how}: no tangent"
        ref_y, ref_t = f(x), f(x + t) - f(x)
    assert torch.equal(y, ref_y), f"{op.name} {case['path']} {how}: primal"
    torch.testing.assert_close(
        jt, ref_t, rtol=1e-9, atol=1e-9, msg=f"{op.name} {case['path']} {how}: tangent"
    )
