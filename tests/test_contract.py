"""The shared contract of every public op and module, driven by the table in ``optable.py``.

Argument errors, eval and p = 0 identity, dtypes, batched/unbatched, memory format, outputs read
back as mask x scale, gradients, state_dict, deepcopy/pickle, repr, module == function, keyed
mode, and ``torch.compile(fullgraph=True)`` against eager.
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings
import zlib
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import spatialdrop as sd
import spatialdrop.spatial_dropout
from conftest import assert_binomial
from optable import (
    OPS,
    BadArg,
    Mode,
    OpInfo,
    Sample,
    bad_args,
    check_gradient,
    check_output,
    default_sample,
    dropped_fraction,
    make_key,
    message_names,
    nonzero_input,
    op_mode_params,
    op_params,
    watchdog,
)

KEYED = [op for op in OPS if op.keyed]
ACTIVATION = [op for op in OPS if op.kind != "filter"]


def _name(op: OpInfo) -> str:
    return op.target.__name__


def _bad_arg_params() -> list[Any]:
    return [pytest.param(op, bad, id=f"{op.name}-{bad.id}") for op in OPS for bad in bad_args(op)]


def _resolve(op: OpInfo, kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    kw = dict(kwargs)
    if kw.get("key") == "KEY_AND_GENERATOR":
        kw["key"] = make_key(0, n)
        kw["generator"] = torch.Generator()
    elif kw.get("key") == "KEY_WRONG_BATCH":
        kw["key"] = make_key(0, n + 1)
    elif kw.get("key") == "KEY_BAD_STEP":
        kw["key"] = make_key(0, n)._replace(step=-1)
    elif kw.get("key") == "KEY_BAD_IDS":
        kw["key"] = make_key(0, n)._replace(sample_ids=torch.arange(n, dtype=torch.float32))
    return kw


def _input_for(op: OpInfo) -> Tensor:
    if op.family == "block" and op.spatial_dims is None:
        return nonzero_input((2, 3, 6, 6))  # 2-d, as the block_size lists in the table assume
    return default_sample(op).make()


Tensor = torch.Tensor

# --- argument errors ------------------------------------------------------------------------


def _names(op: OpInfo, exc: BaseException, arg: str, at_call: bool) -> bool:
    """The message names the op (a module's call may name the function it calls) and the argument."""
    names = [_name(op)]
    if at_call and op.function is not None:
        names.append(op.function.__name__)
    return any(message_names(exc, n, arg) for n in names)


def _says(op: OpInfo, exc: BaseException, bad: BadArg, at_call: bool) -> bool:
    """The message reads ``"<op>: <arg> must be <bad.match>"`` (when the table gives a match)."""
    if not bad.match:
        return True
    names = [_name(op)]
    if at_call and op.function is not None:
        names.append(op.function.__name__)
    return any(
        re.search(rf"\b{re.escape(n)}: {re.escape(bad.arg)} must be {bad.match}", str(exc)) for n in names
    )


def _check_raises(op: OpInfo, bad: BadArg, call: Any, at_call: bool = False) -> None:
    with pytest.raises((ValueError, TypeError)) as info, watchdog(3.0, f"{op.name} {bad.id}"):
        call()
    assert isinstance(info.value, bad.exc), f"{op.name}: {bad.id} raised {info.type.__name__}: {info.value}"
    assert _names(op, info.value, bad.arg, at_call), (
        f"message must name {_name(op)} and {bad.arg}: {info.value}"
    )
    assert _says(op, info.value, bad, at_call), (
        f"message must read '{bad.arg} must be {bad.match}': {info.value}"
    )


@pytest.mark.parametrize(("op", "bad"), _bad_arg_params())
@pytest.mark.parametrize("training", [True, False])
def test_bad_argument_raises_naming_it(op: OpInfo, bad: BadArg, training: bool) -> None:
    """Every bad argument raises ValueError/TypeError naming the op and the argument, even in eval."""
    x = _input_for(op)
    if op.kind == "function":
        kwargs = {"training": training, **dict(op.modes[0].kwargs)}
        kwargs.update(_resolve(op, bad.kwargs, x.shape[0]))
        p = kwargs.pop("p", op.p)
        _check_raises(op, bad, lambda: op.call_function(x, p, **kwargs))
        return
    kwargs = dict(op.modes[0].kwargs) if op.kind == "module" else {}
    kwargs.update(bad.kwargs)
    p = kwargs.pop("p", op.p)
    if bad.when == "build":
        _check_raises(op, bad, lambda: op.construct(p, **kwargs))
        return
    try:  # the error may come at construction or at the first call
        with watchdog(3.0, f"{op.name} {bad.id}"):
            m = op.construct(p, **kwargs)
    except (ValueError, TypeError) as exc:
        assert isinstance(exc, bad.exc), f"{op.name}: {bad.id} raised {type(exc).__name__}: {exc}"  # noqa: PT017
        assert _names(op, exc, bad.arg, False), f"message must name {_name(op)} and {bad.arg}: {exc}"  # noqa: PT017
        assert _says(op, exc, bad, False), f"message must read '{bad.arg} must be {bad.match}': {exc}"  # noqa: PT017
        return
    m.train(training)
    _check_raises(op, bad, lambda: m(x), at_call=True)


@pytest.mark.parametrize("op", op_params(ACTIVATION))
@pytest.mark.parametrize("training", [True, False])
def test_bad_inputs_raise_naming_input(op: OpInfo, training: bool) -> None:
    """A non-tensor, an integer tensor or a tensor of the wrong rank: the message says what is allowed."""
    m = op.build(training=training)
    x = default_sample(op).make()
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor, got list$") as info:
        m(x.tolist())
    assert _names(op, info.value, "input", at_call=True), str(info.value)
    for dtype in (torch.int64, torch.int32):
        with pytest.raises(
            TypeError, match=rf"input must be a floating-point tensor .*, got {dtype}$"
        ) as info:
            m(torch.ones(x.shape, dtype=dtype))
        assert _names(op, info.value, "input", at_call=True), str(info.value)
    if op.spatial_dims is not None:
        d = op.spatial_dims
        want = rf"input must be a {d + 2}-D batched .* or {d + 1}-D unbatched .*"
        wrong = [torch.ones((2,) * (d + 3)), torch.ones((2,) * d)]
    elif op.min_rank == 3:
        want = r"input must be a tensor with at least 3 dims .*, got shape \(4, 5\)$"
        wrong = [torch.ones(4, 5)]
    else:
        want = rf"input must be a tensor with at least {op.min_rank} dims .*, got shape \(\)$"
        wrong = [torch.ones(())]
    # a rank-fixed class names itself; a rank-free one may name the function it calls
    names = (
        [_name(op)]
        if op.spatial_dims is not None or op.function is None
        else [_name(op), op.function.__name__]
    )
    prefix = "(" + "|".join(rf"\b{re.escape(n)}" for n in names) + "): "
    for t in wrong:
        with pytest.raises(ValueError, match=prefix + want) as info:
            m(t)
        assert _names(op, info.value, "input", at_call=True), str(info.value)


# --- identities -----------------------------------------------------------------------------


def _plain(op: OpInfo, m: nn.Module, x: Tensor) -> Tensor:
    return op.reference(m, x)


@pytest.mark.parametrize(("op", "mode"), op_mode_params())
def test_eval_is_identity_and_draws_nothing(op: OpInfo, mode: Mode) -> None:
    for sample in op.samples():
        x = sample.make()
        m = op.build(mode=mode, channel_dim=sample.channel_dim, training=False)
        want = _plain(op, m, x)
        state = torch.get_rng_state()
        y = m(x)
        assert torch.equal(torch.get_rng_state(), state), f"{op.name}: eval drew random numbers"
        assert torch.equal(y, want), f"{op.name} {sample.id}: eval is not the identity"
        if op.kind != "filter" and op.family != "residual" and not sample.unbatched:  # the input itself
            assert y is x, f"{op.name} {sample.id}: eval returned a copy of the input"


@pytest.mark.parametrize(("op", "mode"), op_mode_params())
def test_p_zero_is_identity_and_draws_nothing(op: OpInfo, mode: Mode) -> None:
    for sample in op.samples():
        x = sample.make()
        m = op.build(0.0, mode, channel_dim=sample.channel_dim)
        want = _plain(op, m, x)
        state = torch.get_rng_state()
        y = m(x)
        assert torch.equal(torch.get_rng_state(), state), f"{op.name}: p=0 drew random numbers"
        assert torch.equal(y, want), f"{op.name} {sample.id}: p=0 is not the identity"
        if op.kind != "filter" and op.family != "residual" and not sample.unbatched:  # the input itself
            assert y is x, f"{op.name} {sample.id}: p=0 returned a copy of the input"


@pytest.mark.parametrize("op", op_params([op for op in OPS if op.allow_p_one]))
def test_p_one_zeroes_everything(op: OpInfo) -> None:
    sample = default_sample(op)
    x = sample.make()
    y = op.build(1.0)(x)
    assert y.shape == _plain(op, op.build(1.0), x).shape
    if op.family == "residual":  # every branch dropped: the skip alone, the input itself
        assert y is x
        return
    assert not bool(y.any())


# --- outputs read back as mask x scale, gradients -------------------------------------------


def _sample_params() -> list[Any]:
    return [
        pytest.param(op, mode, s, id=f"{op.name}-{mode.name}-{s.id}")
        for op in OPS
        for mode in op.modes
        for s in op.samples()
    ]


def _forward_backward(
    op: OpInfo, mode: Mode, sample: Sample, dtype: torch.dtype, p: float, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, nn.Module]:
    x = sample.make(dtype, seed=seed).requires_grad_(True)
    m = op.build(p, mode, channel_dim=sample.channel_dim)
    if op.kind == "filter":
        m.to(dtype)
    y = op.run(m, x, seed=seed)
    w = nonzero_input(y.shape, dtype, seed=seed + 1)
    if y.requires_grad:
        (y * w).sum().backward()
    return x, y, w, x.grad if x.grad is not None else torch.zeros_like(x), m


@pytest.mark.parametrize(("op", "mode", "sample"), _sample_params())
def test_output_is_mask_times_scale_and_gradient_matches(op: OpInfo, mode: Mode, sample: Sample) -> None:
    """Every sample: shape/dtype/memory format kept, output = input x mask x scale, grad = mask x scale."""
    for seed in (0, 1):
        x, y, w, grad, m = _forward_backward(op, mode, sample, torch.float32, op.p, seed)
        ref = _plain(op, m, x.detach())
        out = check_output(
            op,
            mode,
            op.p,
            x,
            y,
            channel_dim=sample.channel_dim,
            unbatched=sample.unbatched,
            ref=ref,
            what=sample.id,
        )
        if sample.memory_format is not None:
            assert y.is_contiguous(memory_format=sample.memory_format), f"{op.name}: memory format not kept"
            if op.kind != "filter":  # the same masks as on a contiguous copy, under the same seed
                y_contiguous = op.run(
                    op.build(op.p, mode, channel_dim=sample.channel_dim), x.detach().contiguous(), seed=seed
                )
                assert torch.equal(y.detach(), y_contiguous), f"{op.name}: memory format changed the masks"
        if op.kind != "filter" and x.numel():
            check_gradient(grad, w, out, unbatched=sample.unbatched, what=f"{op.name} {sample.id}")


def _dtype_params() -> list[Any]:
    return [
        pytest.param(op, mode, dtype, id=f"{op.name}-{mode.name}-{str(dtype)[6:]}")
        for op in OPS
        for mode in op.modes
        for dtype in op.dtypes
        if dtype != torch.float32
    ]


@pytest.mark.parametrize(("op", "mode", "dtype"), _dtype_params())
def test_dtypes_kept(op: OpInfo, mode: Mode, dtype: torch.dtype) -> None:
    sample = default_sample(op)
    x, y, w, grad, m = _forward_backward(op, mode, sample, dtype, op.p, 0)
    out = check_output(op, mode, op.p, x, y, ref=_plain(op, m, x.detach()), what=str(dtype))
    if op.kind != "filter":
        check_gradient(grad, w, out, what=f"{op.name} {dtype}")


@pytest.mark.parametrize(("op", "mode"), op_mode_params(ACTIVATION))
@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_non_contiguous_input(op: OpInfo, mode: Mode, layout: str) -> None:
    """A strided slice, or the same values with the batch and channel strides swapped."""
    sample = default_sample(op)
    if layout == "sliced":
        shape = (*sample.shape[:-1], 2 * sample.shape[-1])
        x = nonzero_input(shape)[..., ::2]
    else:
        shape = sample.shape if len(sample.shape) >= 2 else (*sample.shape, 4)
        x = nonzero_input(shape).transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous()
    m = op.build(mode=mode)
    y = op.run(m, x, seed=0)
    check_output(op, mode, op.p, x, y, what=f"non-contiguous ({layout})")
    # the same masks as on a contiguous copy, under the same seed
    assert torch.equal(y, op.run(op.build(mode=mode), x.contiguous(), seed=0))


@pytest.mark.parametrize(("op", "mode"), op_mode_params([op for op in ACTIVATION if op.has_inplace]))
def test_inplace(op: OpInfo, mode: Mode) -> None:
    sample = default_sample(op)
    x = sample.make()
    want = op.run(op.build(mode=mode), x.clone(), seed=3)
    xi = x.clone()
    y = op.run(op.build(mode=mode, inplace=True), xi, seed=3)
    assert y.data_ptr() == xi.data_ptr()
    assert torch.equal(xi, want)
    # on a non-leaf that requires grad: autograd sees the in-place write
    leaf = x.clone().requires_grad_(True)
    a = leaf * 1.0
    y = op.run(op.build(mode=mode, inplace=True), a, seed=3)
    w = nonzero_input(y.shape, seed=9)
    (y * w).sum().backward()
    out = check_output(op, mode, op.p, x, y)
    check_gradient(leaf.grad, w, out, what=f"{op.name} inplace")
    # an expanded input (elements sharing memory) cannot be written in place: refused by name
    expanded = x[:1].expand(x.shape)
    with pytest.raises(ValueError, match=r": inplace must be False for an input whose elements share memory"):
        op.run(op.build(mode=mode, inplace=True), expanded, seed=3)
    # a non-dense view (every other element of a wider tensor) is written through
    wide = nonzero_input((*x.shape[:-1], 2 * x.shape[-1]), seed=4)
    view = wide[..., ::2]
    want = op.run(op.build(mode=mode), view.clone(), seed=3)
    op.run(op.build(mode=mode, inplace=True), view, seed=3)
    assert torch.equal(view, want), f"{op.name}: not written through a strided view"
    # a leaf that requires grad, or a view of one, is refused by name before any write
    before = leaf.detach().clone()
    for target, what in ((leaf, "a leaf"), (leaf[1:], "a view of a leaf")):
        with pytest.raises(ValueError, match=rf": inplace must be False .* got True with {what}"):
            op.run(op.build(mode=mode, inplace=True), target, seed=3)
    assert torch.equal(leaf.detach(), before)
    with torch.no_grad():  # without grad mode torch allows it, and so do we
        op.run(op.build(mode=mode, inplace=True), leaf, seed=3)
    assert not torch.equal(leaf.detach(), before)


@pytest.mark.parametrize(("op", "mode"), op_mode_params([op for op in OPS if op.kind != "filter"]))
def test_empty_input_in_training_draws_nothing(op: OpInfo, mode: Mode) -> None:
    """An input without elements (an empty batch) returns its like and draws no random number."""
    empty = [s for s in op.samples() if 0 in s.shape]
    assert empty, f"{op.name}: the table has no empty sample"
    for sample in empty:
        x = sample.make()
        m = op.build(mode=mode, channel_dim=sample.channel_dim)
        state = torch.get_rng_state()
        y = m(x)
        assert torch.equal(torch.get_rng_state(), state), f"{op.name}: an empty input drew random numbers"
        assert y.shape == x.shape
        assert y.dtype == x.dtype


@pytest.mark.parametrize(
    ("op", "mode"), op_mode_params([op for op in OPS if op.family not in ("block", "gaussian")])
)
def test_drop_rate_is_binomial(op: OpInfo, mode: Mode) -> None:
    """The units of a mask (channel, sample, filter) are dropped independently at rate p.

    (DropBlock's rate and Gaussian dropout's factor law are tested in their own files.)
    """
    p = 0.3
    dropped = total = 0
    for seed in range(40 if op.family in ("filter", "sample", "residual") else 4):
        if op.kind == "filter":
            sample = default_sample(op)
        elif op.family in ("sample", "residual"):
            sample = Sample((256, 3))
        else:
            shape = (16, 32) + (2,) * (op.spatial_dims or 1)
            sample = Sample(shape)
        x = sample.make(seed=seed)
        m = op.build(p, mode)
        y = op.run(m, x, seed=seed)
        out = check_output(op, mode, p, x, y, ref=_plain(op, m, x))
        d, t = dropped_fraction(out, op, mode)
        dropped, total = dropped + d, total + t
    assert_binomial(dropped, total, p, what=f"{op.name} dropped units")


# --- modules and functions agree, state, copies, repr ----------------------------------------


@pytest.mark.parametrize(("op", "mode"), op_mode_params([op for op in OPS if op.function is not None]))
def test_module_equals_function_under_the_same_seed(op: OpInfo, mode: Mode) -> None:
    assert op.function is not None
    for sample in op.samples():
        x = sample.make()
        y = op.run(op.build(mode=mode, channel_dim=sample.channel_dim), x, seed=11)
        xb = x.unsqueeze(0) if sample.unbatched else x
        kw = dict(mode.kwargs)
        if op.has_channel_dim:
            kw["channel_dim"] = sample.channel_dim
        z = op.function(xb, op.p, generator=torch.Generator().manual_seed(11), **kw)
        assert torch.equal(y, z.squeeze(0) if sample.unbatched else z), f"{op.name} {sample.id}"


@pytest.mark.parametrize(("op", "mode"), op_mode_params([op for op in OPS if op.is_module]))
def test_state_dict_round_trip(op: OpInfo, mode: Mode) -> None:
    m = op.build(0.25, mode)
    state = m.state_dict()
    fresh = op.build(0.25, mode)
    if op.kind == "filter":
        with torch.no_grad():
            for t in fresh.parameters():
                t.zero_()
    fresh.load_state_dict(state)
    assert sorted(fresh.state_dict()) == sorted(state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k])
    x = default_sample(op).make()
    assert torch.equal(op.run(fresh, x, seed=5), op.run(m, x, seed=5))


@pytest.mark.parametrize(("op", "mode"), op_mode_params())
def test_deepcopy_and_pickle_keep_behaviour(op: OpInfo, mode: Mode) -> None:
    m = op.build(0.25, mode)
    x = default_sample(op).make()
    want = op.run(m, x, seed=5)
    twin = copy.deepcopy(m)
    assert repr(twin) == repr(m)
    assert torch.equal(op.run(twin, x, seed=5), want)
    if op.kind == "filter":  # torch refuses to pickle a parametrized module: the layer itself pickles
        layer = op.construct(0.25) if op.target is sd.FilterDropout else sd.FilterDropout(0.25)
        back = pickle.loads(pickle.dumps(layer))
        assert repr(back) == repr(layer)
        assert back.p == layer.p
        return
    back = pickle.loads(pickle.dumps(m))
    assert repr(back) == repr(m)
    assert back.training == m.training
    assert torch.equal(op.run(back, x, seed=5), want)


@pytest.mark.parametrize(("op", "mode"), op_mode_params([op for op in OPS if op.kind == "module"]))
def test_repr_shows_every_option(op: OpInfo, mode: Mode) -> None:
    m = op.build(0.25, mode)
    text = repr(m)
    assert type(m).__repr__ is nn.Module.__repr__, "use extra_repr, not __repr__"
    assert text.startswith(f"{_name(op)}(")
    assert "p=0.25" in text
    assert ("inplace=False" in text) == op.has_inplace
    for k, v in mode.kwargs.items():
        assert f"{k}={v!r}" in text, f"{text} does not show {k}={v!r}"
    if op.has_channel_dim:
        assert "channel_dim=-1" in repr(op.build(0.25, mode, channel_dim=-1))
    if op.has_inplace:
        assert "inplace=True" in repr(op.build(0.25, mode, inplace=True))
    assert isinstance(m, nn.modules.dropout._DropoutNd)


def test_filter_dropout_repr() -> None:
    assert repr(sd.FilterDropout(0.25)) == "FilterDropout(p=0.25)"
    conv = sd.filter_dropout(nn.Conv2d(3, 8, 3), 0.25)
    assert "FilterDropout(p=0.25)" in repr(conv)


# --- keyed mode -----------------------------------------------------------------------------


def _keyed_differs(a: Tensor, b: Tensor) -> bool:
    return not torch.equal(a, b)


@pytest.mark.parametrize(("op", "mode"), op_mode_params([op for op in KEYED if op.kind == "function"]))
def test_keyed_function_is_a_function_of_the_key(op: OpInfo, mode: Mode) -> None:
    sample = Sample((8, 16) + (6,) * (op.spatial_dims or 2)) if op.min_rank == 3 else Sample((64, 4))
    x = sample.make()
    n = x.shape[0]
    key = make_key(7, n)
    y = op.build(mode=mode, key=key)(x)
    check_output(op, mode, op.p, x, y, what="keyed")
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(op.build(mode=mode, key=key)(x), y)
    # a sample's mask depends on its id, not on the batch it is in
    part = op.build(mode=mode, key=key._replace(sample_ids=key.sample_ids[3:]))(x[3:])
    assert torch.equal(part, y[3:])
    assert _keyed_differs(op.build(mode=mode, key=key._replace(step=4))(x), y)
    assert _keyed_differs(op.build(mode=mode, key=key._replace(seed=8))(x), y)


def _keyed_sample(op: OpInfo) -> Sample:
    if op.kind == "filter":
        return default_sample(op)
    if op.min_rank == 1:
        return Sample((64, 4))
    d = op.spatial_dims or 2
    return Sample((8, 16) + (6,) * d)


@pytest.mark.parametrize(("op", "mode"), op_mode_params([op for op in OPS if op.is_module]))
def test_keyed_module_needs_a_context_and_is_reproducible_in_one(op: OpInfo, mode: Mode) -> None:
    """issue 11 item 2: every public layer in keyed mode raises outside a context, reproduces inside one."""
    x = _keyed_sample(op).make()
    n = x.shape[0]
    m = op.build(mode=mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sd.keyed_masks(m, 7)
        except (ValueError, TypeError) as exc:  # a layer that cannot be keyed may be refused
            assert op.kind == "filter", f"{op.name}: keyed_masks refused a keyed layer: {exc}"  # noqa: PT017
            assert _name(op) in str(exc) or "FilterDropout" in str(exc)  # noqa: PT017
            return
    skipped = [w for w in caught if "FilterDropout" in str(w.message)]
    if op.kind == "filter" and skipped:  # keyed_masks said it skipped the layer: it stays unkeyed
        return
    with pytest.raises(RuntimeError, match="mask_context"):
        m(x)
    ids = torch.arange(n)
    with sd.mask_context(step=3, sample_ids=ids):
        torch.manual_seed(1)
        a = m(x)
    with sd.mask_context(step=3, sample_ids=ids):
        torch.manual_seed(2)
        b = m(x)
    with sd.mask_context(step=4, sample_ids=ids):
        c = m(x)
    assert torch.equal(a, b), f"{op.name}: keyed output depends on the global RNG"
    assert not torch.equal(a, c), f"{op.name}: keyed output does not depend on the step"
    check_output(op, mode, op.p, x, a, ref=_plain(op, m, x), what="keyed")
    if op.kind != "filter":  # per-sample keys: a sample's mask does not depend on its batch
        with sd.mask_context(step=3, sample_ids=ids[2:]):
            assert torch.equal(m(x[2:]), a[2:])
    m.eval()
    assert torch.equal(m(x), _plain(op, m, x))  # eval needs no context


# ours, or torch's own check when the recompute saves tensors of other shapes (ResidualDropPath's
# kept rows): either way an error, never a silent wrong gradient
RECOMPUTE_REFUSED = "recomputed during backward|Recomputed values for the following tensors"


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize(("op", "mode"), op_mode_params([op for op in OPS if op.is_module and op.keyed]))
def test_keyed_checkpoint_recompute_equal_or_refused(op: OpInfo, mode: Mode, reentrant: bool) -> None:
    """Activation checkpointing: a keyed layer recomputed in backward under its forward's context
    gives the plain gradient; under another step's context it refuses (no silent wrong gradient),
    also when that other step's forward ran in between (non-reentrant: exactly)."""
    x = _keyed_sample(op).make().requires_grad_()
    m = op.build(mode=mode)
    seed = zlib.crc32(f"{op.name}-{mode.name}-{reentrant}".encode())  # no key shared with another test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd.keyed_masks(m, seed)
    if op.kind == "filter" and any("FilterDropout" in str(w.message) for w in caught):
        return  # keyed_masks skipped the layer: it stays unkeyed (see the test above)
    ids = torch.arange(x.shape[0])

    def grad_of(y: Tensor, w: Tensor) -> Tensor:
        x.grad = None
        y.backward(w)  # reentrant checkpointing does not support autograd.grad
        assert x.grad is not None
        return x.grad

    with sd.mask_context(step=3, sample_ids=ids):
        plain = m(x)
        w = torch.randn_like(plain)
        expected = grad_of(plain, w)
    with sd.mask_context(step=3, sample_ids=ids):
        y = checkpoint(m, x, use_reentrant=reentrant, preserve_rng_state=False)
        got = grad_of(y, w)
    assert torch.equal(y, plain)
    assert torch.equal(got, expected), f"{op.name}: the recomputed mask differs"
    with sd.mask_context(step=3, sample_ids=ids):
        y = checkpoint(m, x, use_reentrant=reentrant, preserve_rng_state=False)
    with (
        sd.mask_context(step=4, sample_ids=ids),
        pytest.raises(RuntimeError, match=RECOMPUTE_REFUSED),
    ):
        grad_of(y, w)
    if reentrant:
        return  # a reentrant checkpoint keeps no node of its forward: only the check above applies
    # pipelined: step 3's forward, step 4's forward, then step 3's backward under step 4's context
    with sd.mask_context(step=3, sample_ids=ids):
        y3 = checkpoint(m, x, use_reentrant=False, preserve_rng_state=False)
    with sd.mask_context(step=4, sample_ids=ids):
        checkpoint(m, x, use_reentrant=False, preserve_rng_state=False)
        with pytest.raises(RuntimeError, match=RECOMPUTE_REFUSED):
            grad_of(y3, w)


@pytest.mark.parametrize(
    ("op", "mode", "layer_inplace"),
    [
        pytest.param(op, mode, inplace, id=f"{op.name}-{mode.name}-{'inplace' if inplace else 'out'}")
        for op in OPS
        if op.is_module and op.keyed
        for mode in op.modes
        for inplace in ([False, True] if op.has_inplace else [False])
    ],
)
def test_keyed_output_can_be_modified_in_place(op: OpInfo, mode: Mode, layer_inplace: bool) -> None:
    """A keyed layer's output, like any layer's, takes an in-place op (timm's ``x += shortcut``
    after its DropBlock), and the layer's input may be a tensor an earlier op saved (ReLU's
    output): the gradient is that of the same computation written out of place."""
    m = op.build(mode=mode, inplace=layer_inplace)
    seed = zlib.crc32(f"{op.name}-{mode.name}-inplace-after".encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd.keyed_masks(m, seed)
    x = _keyed_sample(op).make().requires_grad_()
    ids = torch.arange(x.shape[0])
    grads = []
    for in_place in (False, True):
        x.grad = None
        with sd.mask_context(step=5, sample_ids=ids):
            h = torch.relu(x * 1.0)  # relu saves its output for backward
            y = m(h * 1.0 if layer_inplace else h)  # an inplace layer may not overwrite relu's output
            if in_place:
                y += 1.0
                y.mul_(3.0)
            else:
                y = (y + 1.0) * 3.0
            w = torch.linspace(-1.0, 1.0, y.numel()).view_as(y)
            (y * w).sum().backward()
        assert x.grad is not None
        grads.append(x.grad.clone())
    assert torch.equal(grads[1], grads[0]), f"{op.name}: in-place use of the keyed output changed a gradient"


# --- compile ----------------------------------------------------------------------------------


def _compile_params() -> list[Any]:
    out = []
    for op in OPS:
        for i, mode in enumerate(op.modes):
            marks = [] if (i == 0 and op.spatial_dims in (None, 2)) else [pytest.mark.slow]
            for keyed in [False, True] if op.keyed else [False]:
                kind = "keyed" if keyed else "seeded"
                out.append(pytest.param(op, mode, keyed, id=f"{kind}-{op.name}-{mode.name}", marks=marks))
    return out


@pytest.mark.parametrize(("op", "mode", "keyed"), _compile_params())
def test_compile_fullgraph_matches_eager(
    op: OpInfo, mode: Mode, keyed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile(fullgraph=True) (aot_eager: the RNG stays torch's) gives eager's output.

    Keyed masks are the same bits by design. With the global generator the same seed gives the
    same masks as the eager twin of the traced draw (``rand < 1 - p``, see
    ``spatial_dropout.bernoulli_keep``); DropBlock's traced path may draw differently, so there
    the output is checked against the contract instead.
    """
    torch._dynamo.reset()
    sample = _keyed_sample(op)
    x = sample.make()
    n = x.shape[0]
    key = make_key(7, n)
    if op.kind == "function":
        m = op.build(mode=mode, key=key if keyed else None)
        ctx_key = None
    else:
        m = op.build(mode=mode, keyed_seed=7 if keyed else None)
        ctx_key = key if keyed else None
    if not keyed and op.family != "block":
        # compiled, the keep mask is rand < 1 - p (p stays symbolic), not bernoulli_: so is eager's twin
        monkeypatch.setattr(spatialdrop.spatial_dropout, "is_compiling", lambda: True)
    eager = op.run(m, x, seed=5, key=ctx_key)
    monkeypatch.undo()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    got = op.run(compiled, x, seed=5, key=ctx_key)
    check_output(op, mode, op.p, x, got, ref=_plain(op, m, x), what="compiled")
    if keyed or op.family != "block":
        assert torch.equal(got, eager), f"{op.name}: compiled output differs from eager"
    m.eval()
    assert torch.equal(compiled(x), _plain(op, m, x))
