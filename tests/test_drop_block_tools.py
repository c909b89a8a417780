"""DropBlock under the tools (compile, torch.func, double backward, export, fake/meta tensors) and
the regression tests of issues 9 and 10 that concern DropBlock."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import spatialdrop as sd
from spatialdrop._dropblock import sampling as seed_draws
from spatialdrop._dropblock.ops import Path
from spatialdrop.functional import drop_block

SCALES = ["expected", "realized", "none"]
MODES = [
    {},
    {"shared_channels": True},
    {"seeding": "valid"},
    {"scale": "realized"},
    {"scale": "none", "shared_channels": True},
    {"scale": "realized", "seeding": "valid", "shared_channels": True},
]


def keyed(n: int, step: int = 5) -> sd.MaskKey:
    return sd.MaskKey(3, step, 7, torch.arange(n))


def mode_id(kw: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items()) or "default"


# --- issue 9 -----------------------------------------------------------------------------------


def test_huge_block_gradient_is_mask_times_scale() -> None:
    # issue 9.1: the seed grid has more than 2**31 places although the input is tiny
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(1, 2, 3, 7, dtype=torch.float64) + 3).requires_grad_()
        y = drop_block(x, 0.5, 65536, generator=g)
        w = torch.randn_like(y)
        (y * w).sum().backward()
        assert torch.equal(x.grad, torch.where(y == 0, 0.0, 2 * w)), seed
        assert torch.equal(y, torch.where(y == 0, 0.0, 2 * x.detach()))


@pytest.mark.parametrize(
    ("shape", "block"),
    [((2, 3, 8, 8), 2**31), ((2, 3, 4, 4, 4), 2**21), ((2, 3, 4, 4, 4), 2**20), ((1, 1, 5), 2**60)],
)
@pytest.mark.parametrize("training", [True, False])
def test_unrepresentable_seed_grid_raises_before_any_work(
    shape: tuple[int, ...], block: int, training: bool
) -> None:
    # issue 9.2: these hung (int64 overflow in the gap sampler) or raised IndexError
    with pytest.raises(ValueError, match=r"drop_block: block_size must be small enough .* 2\*\*53 places"):
        drop_block(torch.ones(shape), 0.1, block, training)
    module = sd.DropBlock(0.1, block).train(training)
    with pytest.raises(ValueError, match="block_size"):
        module(torch.ones(shape))


def test_large_but_representable_block_runs() -> None:
    # a block much larger than the map still drops every position at rate p (one seed covers all)
    x = torch.ones(400, 8, 3, 4)
    y = drop_block(x, 0.3, 2**20, generator=torch.Generator().manual_seed(1))
    dropped = (y == 0).reshape(-1, 12)
    assert bool((dropped.all(1) | ~dropped.any(1)).all())  # each map all kept or all dropped
    rate = float(dropped[:, 0].float().mean())
    assert 0.25 < rate < 0.35


@pytest.mark.parametrize("kw", MODES, ids=mode_id)
@pytest.mark.parametrize("use_key", [False, True])
def test_gradgradcheck(kw: dict, use_key: bool) -> None:
    # issue 9.3 / 10: second-order gradients are right (and do not raise) for every mode
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)

    def f(t: torch.Tensor) -> torch.Tensor:
        if use_key:
            return drop_block(t, 0.3, 3, key=keyed(2), **kw)
        return drop_block(t, 0.3, 3, generator=torch.Generator().manual_seed(1), **kw)

    assert (f(x) == 0).any()
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(
    ("shape", "p", "block"),
    [((2, 3, 8, 8), 0.3, 3), ((4, 16, 28, 28), 0.05, 7)],  # mask re-created; plan kept (eager)
)
def test_gradient_penalty_second_order_is_zero_where_dropped(
    scale: str, shape: tuple[int, ...], p: float, block: int
) -> None:
    x = torch.randn(shape, requires_grad=True)
    torch.manual_seed(4)
    y = drop_block(x, p, block, scale=scale)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)  # 2 m^2 s^2 x
    g.sum().backward()  # d/dx sum(2 m^2 s^2 x) = 2 m^2 s^2
    keep = y.detach() != 0
    factor = torch.where(keep, y.detach() / x.detach(), torch.zeros(()))
    assert bool((x.grad[~keep] == 0).all())
    assert torch.allclose(x.grad, 2 * factor.square(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("kw", [{}, {"seeding": "valid"}, {"shared_channels": True}], ids=mode_id)
def test_keyed_compiled_equals_eager(kw: dict) -> None:
    # issue 9.4
    torch._dynamo.reset()
    key = keyed(4)
    x = torch.randn(4, 3, 11, 12)

    def f(t: torch.Tensor) -> torch.Tensor:
        return drop_block(t, 0.2, 3, key=key, **kw)

    eager = f(x)
    assert (eager == 0).any()
    assert torch.equal(torch.compile(f, fullgraph=True)(x), eager)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("shared", [False, True])
def test_float16_near_p_one_gives_no_nan(scale: str, shared: bool) -> None:
    # issue 9.8: 1 / (1 - p) overflows float16; the scale is formed in float32, never 0 x inf
    kw = {"scale": scale, "shared_channels": shared}
    y = drop_block(torch.zeros(64, 32, 4, 4, dtype=torch.half), 0.99999, 3, **kw)
    assert y.dtype == torch.half
    assert bool((y == 0).all())
    small = torch.full((64, 32, 4, 4), 0.01, dtype=torch.half)
    y = drop_block(small, 0.999, 1, generator=torch.Generator().manual_seed(0), **kw)
    assert not bool(y.isnan().any())
    if scale == "expected":
        assert torch.equal(
            y.unique(), torch.tensor([0.0, (0.01 * torch.tensor(1000.0)).item()]).half().unique()
        )


# --- one scale policy ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", SCALES)
def test_every_path_gives_the_same_bits_for_the_same_seeds(
    monkeypatch: pytest.MonkeyPatch, dropblock_path: Callable[..., None], dtype: torch.dtype, scale: str
) -> None:
    # issue 11.3: sparse eager, sparse compiled, dense eager and dense compiled share one policy
    n, c, sizes, block = 3, 4, (9, 10), 3
    grids = {
        shared: torch.rand((n if shared else n * c, *(s + block - 1 for s in sizes))) < 0.02
        for shared in (False, True)
    }

    def fake(
        numel: int,
        gamma: float,
        generator: object,
        device: object,
        *,
        dense: bool,
        key: object = None,
        small: bool = False,
    ) -> torch.Tensor:
        flat = next(g for g in grids.values() if g.numel() == numel).reshape(-1)
        return flat.clone() if dense else flat.nonzero().squeeze(1)

    monkeypatch.setattr(seed_draws, "draw_grid", fake)
    x = (torch.randn(n, c, *sizes) * 50).to(dtype)
    for shared in (False, True):

        def f(t: torch.Tensor, shared: bool = shared) -> torch.Tensor:
            return drop_block(t, 0.3, block, scale=scale, shared_channels=shared)

        reference = f(x)
        assert (reference == 0).any()
        for static in (False, True):
            dropblock_path(Path.DENSE if static else None)
            torch._dynamo.reset()
            assert torch.equal(f(x), reference), ("eager", shared, static)
            if not static:  # compiled, the dense path draws inside an op (tests/test_drop_block_paths.py)
                assert torch.equal(torch.compile(f, fullgraph=True)(x), reference), ("compiled", shared)
        dropblock_path()


# --- torch.func, vmap ---------------------------------------------------------------------------


@pytest.mark.parametrize("kw", MODES[:2], ids=mode_id)
def test_func_grad_is_mask_times_scale(kw: dict) -> None:
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(3)
    g = torch.func.grad(lambda t: (drop_block(t, 0.3, 3, **kw) * 2.0).sum())(x)
    torch.manual_seed(3)
    y = drop_block(torch.ones_like(x), 0.3, 3, **kw)
    assert torch.equal(g, 2.0 * y)


@pytest.mark.parametrize("shared", [False, True])
def test_vmap_randomness_modes(shared: bool) -> None:
    x = torch.ones(6, 2, 3, 8, 8)

    def f(t: torch.Tensor) -> torch.Tensor:
        return drop_block(t, 0.3, 3, shared_channels=shared)

    different = torch.func.vmap(f, randomness="different")(x)
    same = torch.func.vmap(f, randomness="same")(x)
    assert different.shape == same.shape == x.shape
    assert all(torch.equal(same[0], same[i]) for i in range(6))
    assert not all(torch.equal(different[0], different[i]) for i in range(6))
    rate = float((different == 0).float().mean())
    assert 0.2 < rate < 0.4
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(f)(x)
    # keyed masks are a function of the key: the same in every vmapped slice
    k = torch.func.vmap(lambda t: drop_block(t, 0.3, 3, key=keyed(2)), randomness="different")(x)
    assert torch.equal(k[0], drop_block(x[0], 0.3, 3, key=keyed(2)))
    assert all(torch.equal(k[0], k[i]) for i in range(6))


# --- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [*MODES, {"key": keyed(4)}], ids=mode_id)
def test_no_graph_break(kw: dict) -> None:
    torch._dynamo.reset()
    x = torch.randn(4, 3, 9, 9)
    explanation = torch._dynamo.explain(lambda t: drop_block(t, 0.2, 3, **kw))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# --- static shapes: CUDA path on the CPU, meta, export --------------------------------------------


@pytest.mark.parametrize(
    "kw", [*MODES, {"key": keyed(2)}, {"key": keyed(2), "shared_channels": True}], ids=mode_id
)
def test_static_path_has_no_data_dependent_read(dropblock_path: Callable[..., None], kw: dict) -> None:
    # issue 12.1: under FakeTensorMode any device-to-host read (item, nonzero, ...) raises
    dropblock_path(Path.DENSE)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 3, 8, 9, requires_grad=True)
        y = drop_block(x, 0.2, 3, **kw)
        y.sum().backward()
        assert x.grad is not None
        assert y.shape == x.shape


def test_sparse_path_does_read_data_under_fake_tensors() -> None:
    # the check above has teeth: the sparse draw's data-dependent sizes fail there (the sparse
    # custom ops only run their shape-only fake implementation under fake tensors)
    with FakeTensorMode(), pytest.raises(Exception):  # noqa: B017, PT011
        seed_draws.draw_grid(1000, 0.1, None, torch.device("cpu"), dense=False)


@pytest.mark.parametrize("kw", MODES, ids=mode_id)
def test_meta_forward_and_backward(kw: dict) -> None:
    x = torch.ones(2, 3, 8, 8, device="meta", requires_grad=True)
    y = drop_block(x, 0.1, 3, **kw)
    y.sum().backward()
    assert y.device.type == "meta"
    assert y.shape == x.shape
    assert x.grad is not None


@pytest.mark.parametrize("strict", [False, True])
def test_export_train_mode_uses_the_dense_path(strict: bool) -> None:
    m = sd.DropBlock2d(0.3, 3).train()
    program = torch.export.export(m, (torch.ones(16, 8, 9, 9),), strict=strict)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not any("spatialdrop" in t for t in targets)
    y = program.module()(torch.ones(16, 8, 9, 9))
    assert 0.2 < float((y == 0).float().mean()) < 0.4
    assert set(y.unique().tolist()) <= {0.0, float(torch.tensor(1 / 0.7))}


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
    reason="onnx export check needs onnxscript and onnxruntime (test extra)",
)
def test_onnx_export_train_mode(tmp_path: object) -> None:
    import numpy as np
    import onnxruntime

    path = str(tmp_path) + "/drop_block.onnx"
    torch.onnx.export(sd.DropBlock2d(0.3, 3).train(), (torch.ones(4, 8, 9, 9),), path, dynamo=True)
    session = onnxruntime.InferenceSession(path)
    out = session.run(None, {session.get_inputs()[0].name: np.ones((4, 8, 9, 9), np.float32)})[0]
    assert 0.15 < float((out == 0).mean()) < 0.45


@pytest.mark.parametrize("shared", [False, True])
def test_compile_p_changing_every_step_does_not_recompile_per_step(shared: bool) -> None:
    # as DropSchedule does: a new p on the module at every step
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = sd.DropBlock2d(0.05, 3, shared_channels=shared)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.ones(64, 8, 12, 12)
    rates = []
    for step in range(8):
        m.p = 0.05 + 0.05 * step
        rates.append(float((compiled(x) == 0).float().mean()))
    assert counters["stats"]["unique_graphs"] <= 2  # the first p, then p as a symbol
    assert rates[0] < 0.15
    assert 0.3 < rates[-1] < 0.5


# --- issue 20.6: torch.fx traces the functional form; inplace writes without a full-size temporary ---


def test_fx_symbolic_trace_of_the_functional_form() -> None:
    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return drop_block(x, 0.3, 3, shared_channels=True) * 2.0

    gm = torch.fx.symbolic_trace(Net())
    assert next(n.target for n in gm.graph.nodes if n.op == "call_function") is drop_block
    x = torch.ones(16, 3, 9, 9)
    torch.manual_seed(5)
    y = gm(x)
    torch.manual_seed(5)
    assert torch.equal(y, drop_block(x, 0.3, 3, shared_channels=True) * 2.0)
    assert 0.2 < float((y == 0).float().mean()) < 0.4


class LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """The bytes of the largest new storage any op makes (outputs that alias no input's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        seen = {t.untyped_storage().data_ptr() for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_inplace_writes_the_input_without_a_full_size_temporary(
    shared: bool, fmt: torch.memory_format
) -> None:
    x = torch.randn(8, 32, 28, 28).contiguous(memory_format=fmt)
    leaf = x.clone().requires_grad_()
    a = leaf * 1.0  # a non-leaf activation, as after a conv
    torch.manual_seed(2)
    expected = drop_block(a.detach().clone(), 0.1, 7, shared_channels=shared)
    before = a.data_ptr()
    torch.manual_seed(2)
    with LargestAllocation() as probe:
        y = drop_block(a, 0.1, 7, inplace=True, shared_channels=shared)
    assert y is a
    assert a.data_ptr() == before
    assert torch.equal(y, expected)
    input_bytes = x.numel() * x.element_size()
    # the write plan (at most 1/32 of the input's bytes), the seeds; for a shared mask one map per sample
    assert probe.largest <= input_bytes // 16, (probe.largest, input_bytes)
    with LargestAllocation() as probe_out:
        drop_block(a.detach().clone(), 0.1, 7, shared_channels=shared)
    assert probe_out.largest >= input_bytes  # the probe sees the out-of-place output
    w = torch.randn_like(x)
    (y * w).sum().backward()
    assert leaf.grad is not None
    assert torch.equal(leaf.grad, torch.where(expected == 0, 0.0, w * torch.tensor(1 / 0.9)))
