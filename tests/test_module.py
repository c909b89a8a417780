"""The base class contract for every layer: torch.fx, keyed capability, meta/fake tensors, autograd.

Op-specific behaviour lives in each op's test file; this file runs one check over every public
layer (``LAYERS``), so a new layer is covered by adding one entry.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import spatialdrop as sd
from spatialdrop import functional as F
from spatialdrop._module import StructuredDropout


class Layer(NamedTuple):
    name: str
    make: Callable[[], nn.Module]  # the layer (FilterDropout: a conv that has it)
    shape: tuple[int, ...]  # a training input shape
    ops: bool = True  # owned here (DropBlock's own paths are tested in test_drop_block*)


def _filter_conv() -> nn.Module:
    return sd.filter_dropout(nn.Conv2d(4, 6, 3, padding=1), 0.5)


LAYERS = [
    Layer("SpatialDropout", lambda: sd.SpatialDropout(0.5), (3, 6, 4, 4)),
    Layer("SpatialDropout1d", lambda: sd.SpatialDropout1d(0.5), (3, 6, 5)),
    Layer("SpatialDropout2d", lambda: sd.SpatialDropout2d(0.5), (3, 6, 4, 4)),
    Layer("SpatialDropout3d", lambda: sd.SpatialDropout3d(0.5, channel_dim=-1), (3, 2, 3, 4, 6)),
    Layer("GaussianSpatialDropout", lambda: sd.GaussianSpatialDropout(0.3), (3, 6, 4)),
    Layer("GaussianSpatialDropout1d", lambda: sd.GaussianSpatialDropout1d(0.3), (3, 6, 5)),
    Layer("GaussianSpatialDropout2d", lambda: sd.GaussianSpatialDropout2d(0.3), (3, 6, 4, 4)),
    Layer("GaussianSpatialDropout3d", lambda: sd.GaussianSpatialDropout3d(0.3), (3, 6, 2, 3, 4)),
    Layer("AlphaSpatialDropout", lambda: sd.AlphaSpatialDropout(0.5), (3, 6, 4)),
    Layer("AlphaSpatialDropout1d", lambda: sd.AlphaSpatialDropout1d(0.5), (3, 6, 5)),
    Layer("AlphaSpatialDropout2d", lambda: sd.AlphaSpatialDropout2d(0.5), (3, 6, 4, 4)),
    Layer("AlphaSpatialDropout3d", lambda: sd.AlphaSpatialDropout3d(0.5), (3, 6, 2, 3, 4)),
    Layer("DropPath", lambda: sd.DropPath(0.5), (8, 5, 3)),
    Layer("ResidualDropPath", lambda: sd.ResidualDropPath(nn.Linear(3, 3), 0.5), (8, 5, 3)),
    Layer("FilterDropout", _filter_conv, (3, 4, 5, 5)),
    Layer("DropBlock", lambda: sd.DropBlock(0.3, 3), (3, 4, 8, 8), ops=False),
    Layer("DropBlock1d", lambda: sd.DropBlock1d(0.3, 3), (3, 4, 12), ops=False),
    Layer("DropBlock2d", lambda: sd.DropBlock2d(0.3, 3), (3, 4, 8, 8), ops=False),
    Layer("DropBlock3d", lambda: sd.DropBlock3d(0.3, 3, shared_channels=True), (3, 4, 6, 6, 6), ops=False),
]
OPS_LAYERS = [layer for layer in LAYERS if layer.ops]
IDS = [layer.name for layer in LAYERS]
OPS_IDS = [layer.name for layer in OPS_LAYERS]


def test_every_public_layer_is_listed() -> None:
    layers = {
        name
        for name in sd.__all__
        if isinstance(getattr(sd, name), type) and issubclass(getattr(sd, name), StructuredDropout)
    }
    assert layers == set(IDS)


def run(net: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return net(x)


# --- torch.fx ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS, ids=IDS)
def test_symbolic_trace_equals_eager_and_follows_mode_and_p(layer: Layer) -> None:
    net = nn.Sequential(layer.make(), nn.Identity())
    traced = torch.fx.symbolic_trace(net)
    x = torch.rand(layer.shape) + 0.5
    for seed in range(3):
        assert torch.equal(run(traced, x, seed), run(net, x, seed))
    traced.eval()  # switches the traced graph's submodule: the graph reads training when it runs
    assert torch.equal(traced(x), net.eval()(x))
    traced.train()
    assert not torch.equal(run(traced, x, 5), net.eval()(x))
    drop = next(m for m in traced.modules() if isinstance(m, StructuredDropout))
    drop.p = 0.0
    assert torch.equal(traced(x), net.eval()(x))


def test_symbolic_trace_records_one_call_per_layer() -> None:
    traced = torch.fx.symbolic_trace(nn.Sequential(sd.SpatialDropout2d(0.1), sd.DropPath(0.2)))
    calls = [n for n in traced.graph.nodes if n.op == "call_function"]
    assert [n.target.__name__ for n in calls] == ["structured_forward"] * 2
    assert [n.args[0].op for n in calls] == ["get_attr", "get_attr"]


# --- keyed masks: a declared capability ----------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS, ids=IDS)
def test_every_layer_declares_its_keying(layer: Layer) -> None:
    drop = next(m for m in layer.make().modules() if isinstance(m, StructuredDropout))
    expected = "per_call" if layer.name == "FilterDropout" else "per_sample"
    assert type(drop).keying == expected


@pytest.mark.parametrize("layer", LAYERS, ids=IDS)
def test_keyed_mode_raises_outside_a_context_and_is_reproducible_inside(layer: Layer) -> None:
    net = sd.keyed_masks(nn.Sequential(layer.make()), seed=11)
    x = torch.rand(layer.shape) + 0.5
    with pytest.raises(RuntimeError, match="mask_context"):
        net(x)
    ids = torch.arange(10, 10 + layer.shape[0])
    with sd.mask_context(step=4, sample_ids=ids):
        a = run(net, x, 0)
        b = run(net, x, 1)  # torch's seed plays no part
    with sd.mask_context(step=5, sample_ids=ids):
        c = net(x)
    torch.manual_seed(0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the step changes the masks
    assert not torch.equal(a, net.eval()(x))
    with sd.mask_context(step=4, sample_ids=ids):  # eval mode needs no key and ignores it
        assert torch.equal(net(x), net[0](x))


def test_filter_dropout_keyed_draw_depends_only_on_seed_step_layer() -> None:
    conv = sd.keyed_masks(nn.Sequential(_filter_conv()), seed=5)[0]
    plain = nn.Conv2d(4, 6, 3, padding=1)
    plain.load_state_dict({"weight": conv.weight.detach(), "bias": conv.bias.detach()})
    conv.eval()
    plain_w = conv.weight.detach().clone()
    conv.train()
    masks = []
    for n, ids in ((3, torch.arange(3)), (5, torch.arange(100, 105)), (1, torch.tensor([7]))):
        x = torch.rand(n, 4, 5, 5) + 0.5
        with sd.mask_context(step=2, sample_ids=ids):
            y = conv(x)
        zero = (y == 0).flatten(2).all(-1)
        assert (zero == zero[:1]).all()  # one mask shared by the batch
        masks.append(zero[0])
    assert all(torch.equal(m, masks[0]) for m in masks)
    layer = conv.parametrizations.weight[0]
    key = sd.MaskKey(5, 2, layer.keyed_layer, torch.tensor([-1]))
    expected_dropped = sd.keyed_uniform(key, 6)[0] < 0.5
    assert torch.equal(masks[0], expected_dropped)
    assert torch.equal(plain_w, conv.parametrizations.weight.original)


def test_keyed_masks_switches_declared_layers_and_warns_about_the_others() -> None:
    net = nn.Sequential(sd.SpatialDropout2d(0.1), nn.Dropout(0.2), nn.Sequential(nn.Dropout2d(0.1)))
    with pytest.warns(
        UserWarning, match=r"2 dropout layer\(s\) cannot draw keyed masks .*1 \(Dropout\), 2.0 \(Dropout2d\)"
    ):
        sd.keyed_masks(net, seed=1)
    assert net[0].keyed_seed == 1
    assert not hasattr(net[1], "keyed_seed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd.keyed_masks(net, None)  # switching off: nothing to warn about
        sd.keyed_masks(nn.Sequential(sd.DropPath(0.1)), seed=1)
    assert net[0].keyed_seed is None


def test_no_import_cycle_between_keyed_masks_and_the_base_class() -> None:
    # keyed.py (public) sits below _keyed.py (the layers' private surface) below _module.py
    import ast
    from pathlib import Path

    src = Path(sd.__file__).parent

    def imports(name: str) -> set[str]:
        tree = ast.parse((src / f"{name}.py").read_text())
        return {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}

    assert imports("keyed") <= {"_compat", "_philox", "_validation"}
    assert imports("_keyed") <= {"_compat", "_validation", "keyed"}
    assert "_module" not in imports("_keyed") | imports("keyed")
    from spatialdrop import _keyed

    assert _keyed.__all__ == sorted(_keyed.__all__)
    assert {"check_key_arg", "context_key", "keyed_keep"} <= set(_keyed.__all__)


# --- meta and fake tensors: no data-dependent read ----------------------------------------


def _fwd_bwd(layer: Layer, device: str | None, keyed: bool) -> torch.Tensor:
    net = nn.Sequential(layer.make())
    if device is not None:
        net = net.to(device)
    if keyed:
        sd.keyed_masks(net, seed=3)
    x = torch.rand(layer.shape, device=device).requires_grad_(True)
    ids = torch.arange(layer.shape[0], device=device)
    with sd.mask_context(step=1, sample_ids=ids):
        y = net(x)
    y.sum().backward()
    assert x.grad is not None
    assert x.grad.shape == x.shape
    return y


@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("layer", OPS_LAYERS, ids=OPS_IDS)
def test_forward_and_backward_on_meta_tensors(layer: Layer, keyed: bool) -> None:
    y = _fwd_bwd(layer, "meta", keyed)
    assert y.device.type == "meta"


@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("layer", OPS_LAYERS, ids=OPS_IDS)
def test_no_data_dependent_read_under_fake_tensors(layer: Layer, keyed: bool) -> None:
    # FakeTensorMode raises on any read of tensor data (.item(), bool(t), nonzero, masks)
    with FakeTensorMode():
        y = _fwd_bwd(layer, None, keyed)
    assert y.shape[0] == layer.shape[0]


# --- autograd: double backward, torch.func --------------------------------------------------

FUNCS = {
    "spatial_dropout": lambda x, g: F.spatial_dropout(x, 0.4, generator=g),
    "gaussian_spatial_dropout": lambda x, g: F.gaussian_spatial_dropout(x, 0.4, generator=g),
    "alpha_spatial_dropout": lambda x, g: F.alpha_spatial_dropout(x, 0.4, generator=g),
    "drop_path": lambda x, g: F.drop_path(x, 0.4, generator=g),
}


@pytest.mark.parametrize("name", list(FUNCS))
def test_gradgradcheck_with_a_fixed_generator(name: str) -> None:
    fn = FUNCS[name]
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    f = lambda t: fn(t, torch.Generator().manual_seed(2)).square()  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_gradgradcheck_keyed_and_filter_dropout() -> None:
    key = sd.MaskKey(1, 2, 3, torch.arange(4))
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: F.spatial_dropout(t, 0.4, key=key).square(), (x,))
    conv = sd.keyed_masks(nn.Sequential(_filter_conv().double()), seed=1)
    xc = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    with sd.mask_context(step=0, sample_ids=torch.arange(2)):
        assert torch.autograd.gradgradcheck(lambda t: conv(t).square(), (xc,))


def test_gradient_penalty_step() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), sd.SpatialDropout2d(0.3), sd.DropPath(0.2), _filter_conv())
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    (g,) = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
    g.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("name", list(FUNCS))
def test_torch_func_grad_is_the_mask_times_scale(name: str) -> None:
    fn = FUNCS[name]
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    g = torch.func.grad(lambda t: fn(t, torch.Generator().manual_seed(3)).sum())(x)
    ones = torch.ones_like(x)
    y1 = fn(ones, torch.Generator().manual_seed(3))  # the function is linear in x but for alpha's shift
    y0 = fn(torch.zeros_like(x), torch.Generator().manual_seed(3))
    assert torch.allclose(g, y1 - y0, rtol=1e-12, atol=1e-12)  # the multiplier: mask x scale
    assert (g != 1).any()


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_vmap_over_a_batch_of_inputs(randomness: str) -> None:
    x = torch.ones(5, 2, 8, 3, 3)
    for fn in (
        lambda t: F.spatial_dropout(t, 0.5),
        lambda t: F.gaussian_spatial_dropout(t, 0.5),
        lambda t: F.drop_path(t, 0.5),
    ):
        y = torch.func.vmap(fn, randomness=randomness)(x)
        assert y.shape == x.shape
        flat = y.flatten(1)
        same = all(torch.equal(flat[0], flat[i]) for i in range(1, 5))
        assert same == (randomness == "same")


# --- torch.compile with dynamic shapes -------------------------------------------------------


@pytest.mark.parametrize(
    "make", [sd.SpatialDropout2d, sd.GaussianSpatialDropout2d, sd.AlphaSpatialDropout2d, sd.DropPath]
)
def test_compiles_with_dynamic_shapes_as_the_batch_changes(make: Callable[[float], nn.Module]) -> None:
    # p is a SymFloat under dynamic=True, and randn must not get an explicit generator=None
    c = torch.compile(make(0.2), dynamic=True, fullgraph=True)
    try:
        for n, side in ((8, 3), (16, 3), (5, 4)):
            y = c(torch.ones(n, 4, side, side))
            assert y.shape == (n, 4, side, side)
            assert (y == y[:, :, :1, :1]).all()
            assert not torch.equal(y, torch.ones_like(y))
    finally:
        torch._dynamo.reset()


def test_functional_forms_trace_as_one_call_each() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return (
            F.spatial_dropout(x, 0.5)
            + F.drop_path(x, 0.2)
            + F.gaussian_spatial_dropout(x, 0.1)
            + F.alpha_spatial_dropout(x, 0.1)
        )

    traced = torch.fx.symbolic_trace(f)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert [t for t in targets if t.__module__.startswith("spatialdrop")] == [
        F.spatial_dropout,
        F.drop_path,
        F.gaussian_spatial_dropout,
        F.alpha_spatial_dropout,
    ]
    x = torch.rand(2, 4, 3, 3) + 0.5
    assert torch.equal(run(traced, x, 3), run(f, x, 3))


@pytest.mark.parametrize("layer", OPS_LAYERS, ids=OPS_IDS)
def test_compiled_layer_does_not_recompile_when_p_changes_every_step(layer: Layer) -> None:
    from torch._dynamo.utils import counters

    net = nn.Sequential(layer.make())
    drop = next(m for m in net.modules() if isinstance(m, StructuredDropout))
    sched = sd.DropSchedule(net, target_p=0.4, total_steps=10, start_p=0.05)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(net)
    x = torch.rand(layer.shape) + 0.5
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a cache-limit fallback to eager would warn
            for step in range(10):
                sched.step(step)
                y = compiled(x)
        assert y.shape == net(x).shape
        # the first p is specialised, the second compile makes p symbolic: then no more
        assert counters["stats"]["unique_graphs"] <= 2, drop
    finally:
        torch._dynamo.reset()
