"""The tooling matrix (issue 10): every layer of the contract table through the tools people use.

torch.compile (default mode without graph breaks in spatialdrop, fullgraph, dynamic shapes, p
changing every step without recompiling, several layers at different map sizes), torch.fx,
torch.func (grad, vmap, functional_call), double backward, torch.export, torch.onnx.export,
torch.utils.checkpoint, deepcopy/pickle/state_dict. Each case asserts the result: the same masks
as eager for the same seed where the tool keeps torch's RNG, a valid output (mask x scale, the
right drop rate) where it does not, eval-mode identity, gradients = mask x scale.

Compile and export cases are slow: a representative subset runs by default, the rest with
``--runslow`` (or ``SPATIALDROP_SLOW=1``).
"""

from __future__ import annotations

import copy
import importlib.util
import pickle
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import spatialdrop as sd
import spatialdrop.spatial_dropout
from optable import (
    OPS,
    Mode,
    OpInfo,
    Readout,
    Sample,
    check_gradient,
    check_output,
    make_key,
    nonzero_input,
)

LAYERS = [op for op in OPS if op.is_module]
FAST = {
    "spatial_dropout",
    "drop_block",
    "SpatialDropout2d",
    "DropBlock2d",
    "GaussianSpatialDropout2d",
    "DropPath",
}


def _params(ops: list[OpInfo], *, fast: set[str] | None = None, all_modes: bool = True) -> list[Any]:
    """(op, mode) params; those outside ``fast`` (or beyond an op's first mode) are marked slow."""
    out = []
    for op in ops:
        for i, mode in enumerate(op.modes if all_modes else op.modes[:1]):
            slow = fast is not None and (op.name not in fast or i > 0)
            out.append(
                pytest.param(op, mode, id=f"{op.name}-{mode.name}", marks=[pytest.mark.slow] if slow else [])
            )
    return out


def _sample(op: OpInfo, n: int = 4) -> Sample:
    if op.kind == "filter":
        return op.samples()[0]
    if op.min_rank == 1:
        return Sample((n, 3, 4, 4))
    d = op.spatial_dims or 2
    return Sample((n, 8) + (6,) * d)


def _tiny(op: OpInfo) -> Sample:
    """A small input for the numerical checks (gradcheck evaluates the op once per element)."""
    if op.kind == "filter":
        conv = op.conv() if op.conv is not None else None
        d = conv.weight.dim() - 2 if conv is not None else 2
        return Sample((1, 3) + (2,) * d)
    if op.min_rank == 1:
        return Sample((3, 2, 2))
    d = op.spatial_dims or 2
    return Sample((2, 2) + (3,) * d)


def _plain(op: OpInfo, m: nn.Module, x: Tensor) -> Tensor:
    return op.reference(m, x)


def _check(
    op: OpInfo, mode: Mode, m: nn.Module, x: Tensor, y: Tensor, what: str, p: float | None = None
) -> Readout:
    return check_output(op, mode, op.p if p is None else p, x, y, ref=_plain(op, m, x.detach()), what=what)


def _seeded(op: OpInfo, m: nn.Module, seed: int) -> Any:
    """``f(x)`` that runs ``m`` with its masks fixed by ``seed`` (global RNG forked)."""

    def f(x: Tensor) -> Tensor:
        return op.run(m, x, seed=seed)

    return f


# --- torch.compile ----------------------------------------------------------------------------


def _spatialdrop_frames(reason: Any) -> list[str]:
    stack = getattr(reason, "user_stack", None) or []
    return [f"{fr.filename}:{fr.lineno}" for fr in stack if "spatialdrop" in fr.filename.replace("\\", "/")]


@pytest.mark.parametrize(("op", "mode"), _params(OPS, fast=FAST | {"DropBlock", "FilterDropout"}))
def test_compile_default_mode_has_no_graph_break_in_spatialdrop(op: OpInfo, mode: Mode) -> None:
    torch._dynamo.reset()
    m = op.build(mode=mode)
    x = _sample(op).make()
    explanation = torch._dynamo.explain(m)(x)
    ours = [
        (str(r.reason), _spatialdrop_frames(r)) for r in explanation.break_reasons if _spatialdrop_frames(r)
    ]
    assert not ours, f"{op.name}: graph breaks inside spatialdrop: {ours}"
    torch._dynamo.reset()
    compiled = torch.compile(m)
    y = compiled(x)
    _check(op, mode, m, x, y, "compiled (default mode)")
    m.eval()
    torch.testing.assert_close(compiled(x), _plain(op, m, x), rtol=0, atol=0 if op.kind != "filter" else 1e-6)


@pytest.mark.parametrize(("op", "mode"), _params(OPS, fast={"spatial_dropout", "drop_block"}))
@pytest.mark.parametrize("keyed", [False, True], ids=["seeded", "keyed"])
def test_compile_fullgraph_inductor(
    op: OpInfo, mode: Mode, keyed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inductor with ``fallback_random`` keeps torch's RNG: same masks as eager where the op draws alike."""
    assert op.keyed or not keyed, "every op of the table has a keyed form; add a param filter otherwise"
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        _compile_fullgraph_inductor(op, mode, keyed, monkeypatch)


def _compile_fullgraph_inductor(op: OpInfo, mode: Mode, keyed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch._dynamo.reset()
    x = _sample(op).make()
    key = make_key(7, x.shape[0]) if keyed else None
    if op.kind == "function":
        m, ctx = op.build(mode=mode, key=key), None
    else:
        m, ctx = op.build(mode=mode, keyed_seed=7 if keyed else None), key
    with monkeypatch.context() as patch:
        if not keyed:
            # compiled, a channel keep mask is rand < 1 - p (p stays symbolic), not bernoulli_:
            # so is eager's twin (see spatialdrop.spatial_dropout.bernoulli_keep)
            patch.setattr(spatialdrop.spatial_dropout, "is_compiling", lambda: True)
        eager = op.run(m, x, seed=5, key=ctx)
    compiled = torch.compile(m, fullgraph=True)
    got = op.run(compiled, x, seed=5, key=ctx)
    r_got = _check(op, mode, m, x, got, "compiled (fullgraph)")
    if keyed or op.family != "block":
        r_eager = _check(op, mode, m, x, eager, "eager")
        assert torch.equal(r_got.keep, r_eager.keep), (
            f"{op.name}: compiled masks differ from eager (same seed)"
        )
        # Gaussian noise and conv outputs are computed by other kernels: equal up to rounding
        exact = op.family not in ("gaussian", "filter")
        tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(got, eager, **tol)
    xg = x.clone().requires_grad_(True)
    y = op.run(compiled, xg, seed=5, key=ctx)
    w = nonzero_input(y.shape, seed=3)
    (y * w).sum().backward()
    if op.kind != "filter":
        check_gradient(xg.grad, w, _check(op, mode, m, x, y, "compiled grad"), what=f"{op.name} compiled")


DYNAMIC_FAST = {"DropBlock2d", "GaussianSpatialDropout2d", "drop_block"}


@pytest.mark.parametrize(("op", "mode"), _params(OPS, fast=DYNAMIC_FAST, all_modes=False))
def test_compile_dynamic_batch_and_map_size(op: OpInfo, mode: Mode) -> None:
    """dynamic=True: the batch and the map size change across calls; one compiled graph serves all."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    m = op.build(mode=mode)
    compiled = torch.compile(m, dynamic=True, backend=counter)
    base = _sample(op).shape
    shapes = [base, (2 * base[0], *base[1:])]
    if op.kind != "filter" and op.min_rank == 3:
        shapes.append((base[0], base[1], *tuple(s + i + 1 for i, s in enumerate(base[2:]))))
    first = 0
    for i, shape in enumerate(shapes):
        x = nonzero_input(shape, seed=i)
        y = compiled(x)
        _check(op, mode, m, x, y, f"dynamic {shape}")
        first = first or counter.frame_count
    extra = counter.frame_count - first  # frames compiled after the first call: recompilations
    assert extra <= 1, f"{op.name}: {extra} more frames compiled for {len(shapes) - 1} new shapes"


@pytest.mark.parametrize(
    ("op", "mode"), _params(LAYERS, fast={"DropBlock2d", "SpatialDropout2d"}, all_modes=False)
)
def test_compile_p_changing_every_step_does_not_recompile(op: OpInfo, mode: Mode) -> None:
    """As DropSchedule does: a new p every step, no error, no recompilation per step."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    m = op.build(0.05, mode)
    compiled = torch.compile(m, backend=counter)
    x = _sample(op).make()
    ps = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    layer = m if op.kind != "filter" else next(mm for mm in m.modules() if isinstance(mm, sd.FilterDropout))
    first = 0
    for p in ps:
        layer.p = p
        y = op.run(compiled, x, seed=1)
        _check(op, mode, m, x, y, f"p={p}", p=p)
        first = first or counter.frame_count
    extra = counter.frame_count - first  # frames compiled after the first step: recompilations
    assert extra <= 1, f"{op.name}: {extra} more frames compiled for {len(ps) - 1} new values of p"


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(op, id=op.name, marks=[] if op.name == "DropBlock2d" else [pytest.mark.slow])
        for op in LAYERS
        if op.kind == "module" and op.spatial_dims in (None, 2)
    ],
)
def test_compile_model_with_layers_at_different_map_sizes(op: OpInfo) -> None:
    """Two layers at 8x8 and 4x4 in one compiled model (issue 10's reproducer), called twice."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(
        op.build(0.1, op.modes[0]), nn.Conv2d(8, 8, 3, stride=2, padding=1), op.build(0.1, op.modes[0])
    )
    compiled = torch.compile(net)
    x = nonzero_input((8, 8, 8, 8))
    for _ in range(2):
        y = compiled(x)
        assert y.shape == (8, 8, 4, 4)
        assert bool(torch.isfinite(y).all())
    net.eval()
    # the conv alone (the residual family: with its identity branches, 2 conv(2 x))
    want = _plain(op, net[2], net[1](_plain(op, net[0], x)))
    torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)


# --- torch.fx ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "mode"), _params(LAYERS))
def test_fx_symbolic_trace_equals_eager(op: OpInfo, mode: Mode) -> None:
    m = op.build(mode=mode)
    net = nn.Sequential(nn.Identity(), m)
    traced = torch.fx.symbolic_trace(net)
    x = _sample(op).make()
    assert torch.equal(op.run(traced, x, seed=4), op.run(net, x, seed=4))
    traced.eval()
    net.eval()
    assert torch.equal(traced(x), net(x))


# --- torch.func -------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "mode"), _params([op for op in OPS if op.kind != "filter"]))
def test_func_grad_is_mask_times_scale(op: OpInfo, mode: Mode) -> None:
    m = op.build(mode=mode)
    x = _sample(op).make()
    w = nonzero_input(x.shape, seed=1)
    g = torch.func.grad(lambda t: (op.run(m, t, seed=6) * w).sum())(x)
    y = op.run(m, x, seed=6)
    check_gradient(g, w, _check(op, mode, m, x, y, "func.grad"), what=f"{op.name} func.grad")


@pytest.mark.parametrize(("op", "mode"), _params(LAYERS))
def test_func_functional_call(op: OpInfo, mode: Mode) -> None:
    m = op.build(mode=mode)
    x = _sample(op).make()
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        y = torch.func.functional_call(m, params, (x,))
    assert torch.equal(y, op.run(m, x, seed=2))


@pytest.mark.parametrize(("op", "mode"), _params([op for op in OPS if op.kind != "filter"]))
@pytest.mark.parametrize("randomness", ["different", "same"])
def test_func_vmap(op: OpInfo, mode: Mode, randomness: str) -> None:
    """vmap over a leading dim of batched inputs: each slice valid; "same" gives one mask for all."""
    m = op.build(mode=mode)
    xs = torch.stack([_sample(op).make(seed=i) for i in range(3)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        ys = torch.func.vmap(m, randomness=randomness)(xs)
    reads = [_check(op, mode, m, xs[i], ys[i], f"vmap {randomness} slice {i}") for i in range(3)]
    if randomness == "same":
        for r in reads[1:]:
            assert torch.equal(r.keep, reads[0].keep)
            assert torch.allclose(r.factor, reads[0].factor)
    elif op.family != "gaussian":
        assert any(not torch.equal(r.keep, reads[0].keep) for r in reads[1:]), (
            "vmap 'different' drew one mask"
        )


@pytest.mark.parametrize(("op", "mode"), _params([op for op in OPS if op.keyed and op.kind == "function"]))
def test_func_vmap_keyed(op: OpInfo, mode: Mode) -> None:
    """Keyed masks under vmap are those of the plain calls, slice by slice."""
    xs = torch.stack([_sample(op).make(seed=i) for i in range(3)])
    key = make_key(3, xs.shape[1])
    m = op.build(mode=mode, key=key)
    ys = torch.func.vmap(m, randomness="different")(xs)
    for i in range(3):
        assert torch.equal(ys[i], m(xs[i]))


# --- double backward --------------------------------------------------------------------------


def _fixed_mask_fn(op: OpInfo, mode: Mode, keyed: bool) -> tuple[Any, nn.Module]:
    """A function of x whose mask is fixed: a fresh generator (or a key) every call."""
    x = _tiny(op).make(torch.float64)
    if keyed and op.kind == "function":
        m = op.build(mode=mode, key=make_key(1, x.shape[0]))
        return (lambda t: m(t)), m
    if keyed:
        m = op.build(mode=mode, keyed_seed=1)
        key = make_key(1, x.shape[0])
        return (lambda t: op.run(m, t, key=key)), m
    m = op.build(mode=mode)
    if op.kind == "filter":
        m.double()
    return _seeded(op, m, 9), m


@pytest.mark.parametrize(
    ("op", "mode"),  # filter dropout's gradcheck runs the conv per element: slow
    _params([op for op in OPS if op.kind != "filter"])
    + _params([op for op in OPS if op.kind == "filter"], fast=set()),
)
def test_gradgradcheck_with_a_fixed_mask(op: OpInfo, mode: Mode) -> None:
    f, _ = _fixed_mask_fn(op, mode, keyed=False)
    x = _tiny(op).make(torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize(("op", "mode"), _params([op for op in OPS if op.kind != "filter"]))
def test_gradient_penalty_step(op: OpInfo, mode: Mode) -> None:
    """d/dx |d/dx sum(y^2)|^2 = 8 F^3 (F x + offset) for y = F x + offset with a fixed mask."""
    f, m = _fixed_mask_fn(op, mode, keyed=False)
    x = _tiny(op).make(torch.float64).requires_grad_(True)
    y = f(x)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    g.square().sum().backward()
    r = _check(op, mode, m, x.detach(), y, "penalty")
    fx = r.factor * x.detach() + (0 if r.offset is None else r.offset)
    want = 8 * r.factor**3 * fx
    assert torch.allclose(x.grad, want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(g.detach(), 2 * r.factor * fx, rtol=1e-9, atol=1e-12)


# --- torch.export and ONNX ---------------------------------------------------------------------

EXPORT_FAST = {"SpatialDropout2d", "DropBlock2d"}


@pytest.mark.parametrize(("op", "mode"), _params(OPS, fast=EXPORT_FAST, all_modes=False))
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_export(op: OpInfo, mode: Mode, strict: bool, training: bool) -> None:
    torch._dynamo.reset()
    m = op.build(mode=mode, training=training)
    x = _sample(op).make()
    ep = torch.export.export(m, (x,), strict=strict)
    got = ep.module()(x)
    if training:
        _check(op, mode, m, x, got, "exported (train)")
        assert not torch.equal(got, _plain(op, m, x)) or op.p == 0
    else:
        assert torch.equal(got, _plain(op, m, x))
        # eval: the layer vanishes, no random op is left in the graph
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert not any(("rand" in t or "bernoulli" in t) for t in targets), targets


HAS_ORT = (
    importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None
)
RANDOM_ONNX = {
    "RandomUniform",
    "RandomUniformLike",
    "RandomNormal",
    "RandomNormalLike",
    "Bernoulli",
    "Dropout",
}


def _onnx_run(m: nn.Module, x: Tensor) -> tuple[Tensor, set[str]]:
    import onnxruntime as ort

    program = torch.onnx.export(m, (x,), dynamo=True, verbose=False)
    assert program is not None
    proto = program.model_proto
    ops = {node.op_type for node in proto.graph.node}
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    (out,) = sess.run(None, {name: x.numpy()})
    return torch.from_numpy(out), ops


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnxscript not installed (test extra)")
@pytest.mark.parametrize(("op", "mode"), _params(OPS, fast=EXPORT_FAST, all_modes=False))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_onnx_export(op: OpInfo, mode: Mode, training: bool) -> None:
    """eval: the layer vanishes (no random op, output = input); train: ONNX's own RNG, a valid output."""
    torch._dynamo.reset()
    m = op.build(mode=mode, training=training)
    x = _sample(op).make()
    got, ops = _onnx_run(m, x)
    if not training:
        assert not (ops & RANDOM_ONNX), ops
        assert torch.allclose(got, _plain(op, m, x), rtol=1e-6, atol=1e-6)
    else:
        assert ops & RANDOM_ONNX or op.family == "block", f"train-mode graph has no random op: {ops}"
        _check(op, mode, m, x, got, "onnxruntime (train)")


# --- checkpoint, copies, state ----------------------------------------------------------------


@pytest.mark.parametrize(("op", "mode"), _params(OPS))
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_recomputes_the_same_mask(op: OpInfo, mode: Mode, use_reentrant: bool) -> None:
    from torch.utils.checkpoint import checkpoint

    m = op.build(mode=mode)
    x = _sample(op).make().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12)
        y = checkpoint(m, x, use_reentrant=use_reentrant)
    w = nonzero_input(y.shape, seed=2)
    (y * w).sum().backward()
    r = _check(op, mode, m, x.detach(), y, "checkpoint")
    assert torch.equal(y, op.run(m, x.detach(), seed=12))
    if op.kind != "filter":
        check_gradient(x.grad, w, r, what=f"{op.name} checkpoint")
    else:  # the gradient of the plain conv with the output gradient masked: the same mask was used
        x2 = x.detach().clone().requires_grad_(True)
        plain = copy.deepcopy(m).eval()
        (plain(x2) * w * r.factor.float()).sum().backward()
        assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", [pytest.param(op, id=op.name) for op in LAYERS])
def test_model_copies_and_state_dict(op: OpInfo) -> None:
    """A model holding the layer: deepcopy, pickle (where torch allows) and a state_dict round trip."""
    torch.manual_seed(0)
    layer = op.build(0.2)
    if op.kind == "filter":
        net = nn.Sequential(layer, nn.Flatten(1), nn.LazyLinear(3))
    else:
        c = _sample(op).shape[1]
        net = nn.Sequential(nn.Identity(), layer, nn.Flatten(1), nn.LazyLinear(3))
        del c
    x = _sample(op).make()
    net(x)  # materialise the lazy layer
    net.eval()
    want = net(x)
    twin = copy.deepcopy(net)
    assert torch.equal(twin(x), want)
    if op.kind != "filter":
        assert torch.equal(pickle.loads(pickle.dumps(net))(x), want)
    fresh = copy.deepcopy(net)
    with torch.no_grad():
        for t in fresh.parameters():
            t.add_(1.0)
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh(x), want)
    net.train()
    twin.train()
    assert torch.equal(op.run(net, x, seed=3), op.run(twin, x, seed=3))
