"""The fused Triton DropBlock, run on CPU tensors by Triton's interpreter (TRITON_INTERPRET=1).

Keyed masks must equal the CPU torch path's bit for bit; unkeyed masks must have the exact rate
at every position; backward must be mask x scale while saving nothing of per-element size.
Shapes are small: the interpreter runs the kernels in numpy.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from conftest import assert_binomial

pytest.importorskip("triton", reason="triton is not installed (pip install spatialdrop[triton])")

from spatialdrop import MaskKey
from spatialdrop._dropblock import ops
from spatialdrop._dropblock.calibration import uniform_gamma, valid_gamma
from spatialdrop._dropblock.keyed_seeds import draw_keyed_seeds
from spatialdrop._dropblock.ops import Path, triton_ready
from spatialdrop._dropblock.triton_kernels import seed_bits, triton_drop_block
from spatialdrop.functional import drop_block

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernels are defined for the mode at the time of the call: set per test, no leak
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SPATIALDROP_BACKEND", raising=False)


def _gamma(p: float, blocks: tuple[int, ...], sizes: tuple[int, ...], seeding: str) -> float:
    return uniform_gamma(p, blocks) if seeding == "uniform" else valid_gamma(p, sizes, blocks)


def _both(x: torch.Tensor, p: float, blocks: tuple[int, ...], key: MaskKey, **kw: object) -> tuple:
    """The Triton and the torch DropBlock of ``x`` under the same key."""
    seeding = str(kw.get("seeding", "uniform"))
    cd = int(kw.get("channel_dim", 1)) % x.dim()  # type: ignore[call-overload]
    shared = bool(kw.get("shared", False))
    scale = str(kw.get("scale", "expected"))
    y = triton_drop_block(x, p, blocks, seeding=seeding, shared=shared, channel_dim=cd, scale=scale, key=key)
    ref = drop_block(
        x, p, blocks, channel_dim=cd, shared_channels=shared, seeding=seeding, scale=scale, key=key
    )
    return y, ref


def _unpack(bits: torch.Tensor, row: int) -> torch.Tensor:
    words = bits.long() & 0xFFFFFFFF
    return ((words.unsqueeze(-1) >> torch.arange(32)) & 1).bool().view(bits.shape[0], -1)[:, :row]


@pytest.mark.parametrize("gamma", [1e-4, 0.003, 0.08, 0.5, 0.97])
@pytest.mark.parametrize(("n", "row"), [(1, 1), (2, 33), (3, 1030), (2, 5000)])
def test_seed_bits_equal_the_torch_rule(gamma: float, n: int, row: int) -> None:
    key = MaskKey(2**64 - 1, torch.tensor(2**32 + 5), 2**63, torch.tensor([-1, 2**40, 3])[:n])
    expected = draw_keyed_seeds(n * row, gamma, key, torch.device("cpu"), dense=True).view(n, row)
    bits = seed_bits(n, row, gamma, key, "cpu")
    assert bits.shape == (n, (row + 31) // 32)
    assert torch.equal(_unpack(bits, row), expected)
    assert not (_unpack(bits, bits.shape[1] * 32)[:, row:]).any()  # no bit past the row


CASES = [
    # (shape, blocks): ranks 1-3, blocks 1, odd and even, maps smaller and larger than the block
    ((2, 3, 17), (1,)),
    ((2, 3, 17), (4,)),
    ((3, 2, 5), (7,)),
    ((2, 2, 40), (35,)),  # a last side over 32: the kernel reads the window place by place
    ((2, 3, 9, 10), (3, 3)),
    ((2, 2, 5, 6), (7, 7)),
    ((2, 2, 8, 7), (2, 4)),
    ((2, 2, 4, 5, 6), (3, 2, 1)),
    ((1, 2, 3, 4, 4), (7, 3, 3)),
]


# seeding="valid" needs a whole block inside the map (drop_block raises otherwise)
SEEDED = [(s, b, "uniform") for s, b in CASES] + [
    (s, b, "valid") for s, b in CASES if all(k <= n for k, n in zip(b, s[2:]))
]


@pytest.mark.parametrize(("shape", "blocks", "seeding"), SEEDED)
@pytest.mark.parametrize("shared", [False, True])
def test_keyed_triton_equals_keyed_torch(
    shape: tuple[int, ...], blocks: tuple[int, ...], shared: bool, seeding: str
) -> None:
    x = torch.randn(shape)
    key = MaskKey(3, 14, 15, torch.arange(shape[0]) * 5 + 2)
    y, ref = _both(x, 0.3, blocks, key, shared=shared, seeding=seeding)
    assert torch.equal(y, ref)
    if ref.numel() >= 200:  # the mask is not trivially all-kept
        assert (y == 0).any()


@pytest.mark.parametrize("scale", ["expected", "realized", "none"])
@pytest.mark.parametrize("shared", [False, True])
def test_scale_policies_and_gradient_is_mask_times_scale(scale: str, shared: bool) -> None:
    key = MaskKey(1, 2, 3, torch.arange(3))
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    y, ref = _both(x, 0.25, (3, 2), key, shared=shared, scale=scale)
    assert torch.equal(y, ref)
    ones = torch.ones_like(x, requires_grad=True)
    m, _ = _both(ones, 0.25, (3, 2), key, shared=shared, scale=scale)  # m = mask * scale
    g = torch.randn_like(x)
    (grad,) = torch.autograd.grad(y, x, g)
    assert torch.equal(grad, g * m.detach())
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(grad, grad_ref)
    if scale == "none":
        assert set(m.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 8, 8).to(dtype)
    # non-finite values: 0 where dropped (not nan * 0), scaled as torch scales them where kept
    x[:, 0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30])
    key = MaskKey(0, 0, 0, torch.arange(2))
    for scale in ("expected", "realized"):
        y, ref = _both(x, 0.3, (3, 3), key, scale=scale)
        assert y.dtype == dtype
        torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)
        assert ((ref == 0) == (y == 0)).all()


def test_channels_last_and_strided_layouts() -> None:
    key = MaskKey(5, 5, 5, torch.arange(2))
    x = torch.randn(2, 5, 6, 7).to(memory_format=torch.channels_last)
    y, ref = _both(x, 0.3, (3, 3), key)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, ref)
    last = torch.randn(2, 6, 7, 5)  # (N, H, W, C)
    y, ref = _both(last, 0.3, (3, 3), key, channel_dim=-1)
    assert y.is_contiguous()
    assert torch.equal(y, ref)
    strided = torch.randn(2, 5, 12, 7)[:, :, ::2]  # not dense: copied first
    y, ref = _both(strided, 0.3, (3, 3), key, shared=True)
    assert torch.equal(y, ref)
    x3 = torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d)
    y, ref = _both(x3, 0.3, (2, 3, 3), key)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("seeding", ["uniform", "valid"])
def test_unkeyed_rate_at_corners_edges_centre(shared: bool, seeding: str) -> None:
    n, c, side, p, b = 600, 4, 7, 0.2, 3
    gamma = _gamma(p, (b, b), (side, side), seeding)
    g = torch.Generator().manual_seed(0)
    x = torch.ones(n, c, side, side)
    y = triton_drop_block(x, p, (b, b), seeding=seeding, shared=shared, generator=g)
    dropped = y == 0
    maps = dropped[:, 0] if shared else dropped.reshape(n * c, side, side)
    trials = maps.shape[0]
    if seeding == "uniform":
        for where, (i, j) in {"corner": (0, 0), "edge": (0, 3), "centre": (3, 3), "far": (6, 5)}.items():
            assert_binomial(int(maps[:, i, j].sum()), trials, p, where)
    else:  # a position covered by k valid seed places is dropped with probability 1 - (1 - gamma)**k
        for (i, j), k in {(0, 0): 1, (0, 3): 3, (3, 3): 9, (1, 6): 2}.items():
            assert_binomial(int(maps[:, i, j].sum()), trials, 1 - (1 - gamma) ** k, f"{(i, j)}")
    if shared:
        assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))


def test_unkeyed_follows_the_generator_and_the_global_seed() -> None:
    x = torch.ones(2, 3, 9, 9)
    kw = {"p": 0.3, "block_size": (3, 3)}
    a = triton_drop_block(x, generator=torch.Generator().manual_seed(1), **kw)
    b = triton_drop_block(x, generator=torch.Generator().manual_seed(1), **kw)
    c = triton_drop_block(x, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(7)
    d = triton_drop_block(x, **kw)
    torch.manual_seed(7)
    assert torch.equal(triton_drop_block(x, **kw), d)
    # the two samples get different masks (the sample index keys the row)
    assert not torch.equal(a[0], a[1])


def test_backward_saves_no_per_element_tensor() -> None:
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    key = MaskKey(1, 1, 1, torch.arange(4))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = triton_drop_block(x, 0.1, (3, 3), key=key)
        small = sum(saved)
        triton_drop_block(x[:, :1, :4, :4], 0.1, (3, 3), key=key)
    # p, the ids and the step: nothing that grows with the input
    assert small == sum(saved) - small
    assert small <= 8 + 8 * 4 + 8
    y.sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, (y != 0).float() * y.new_tensor(1 / 0.9).float())


def test_backend_switch_and_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.ones(1, 1, 4)
    assert not triton_ready(x)  # CPU input never takes Triton outside the override
    with ops.override(Path.TRITON):
        assert triton_ready(x)
        monkeypatch.setenv("SPATIALDROP_BACKEND", "torch")
        assert not triton_ready(x)
        monkeypatch.delenv("SPATIALDROP_BACKEND")
        with ops.override(Path.TRITON):
            pass
        assert triton_ready(x)  # still inside the outer override
        assert not triton_ready(torch.ones(1, 1, 4, device="meta"))
    assert not triton_ready(x)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"), ops.override(Path.TRITON):
        pass


def test_empty_and_zero_rate() -> None:
    key = MaskKey(1, 1, 1, torch.arange(0))
    y = triton_drop_block(torch.ones(0, 3, 5, 5), 0.1, (3, 3), key=key)
    assert y.shape == (0, 3, 5, 5)
    x = torch.randn(2, 3, 5)
    y = triton_drop_block(x, 0.0, (3,), scale="none", generator=torch.Generator())
    assert torch.equal(y, x)


@pytest.mark.parametrize("keyed", [False, True])
def test_one_op_under_dynamo_fullgraph(keyed: bool) -> None:
    # dynamo sees spatialdrop::triton_drop_block as one op; with the interpreter only the eager
    # backend can run it (tests/test_cuda.py compiles it with inductor on a GPU)
    key = MaskKey(5, 6, 7, torch.arange(2)) if keyed else None

    def f(x: torch.Tensor) -> torch.Tensor:
        return triton_drop_block(x, 0.1, (3, 3), key=key) * 2

    x = torch.randn(2, 4, 9, 9)
    torch._dynamo.reset()
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., object]:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    torch.manual_seed(0)
    a = compiled(x)
    torch.manual_seed(0)
    assert torch.equal(a, f(x))
    assert len(graphs) == 1
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.spatialdrop.drop_block_triton.default) == 1


def test_meta_input_gives_the_shape() -> None:
    x = torch.empty(2, 3, 8, 8, device="meta")
    y = triton_drop_block(x, 0.1, (3, 3))
    assert y.shape == x.shape
    assert y.device.type == "meta"


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("seeding", ["uniform", "valid"])
@pytest.mark.parametrize("scale", ["expected", "realized", "none"])
def test_drop_block_dispatches_the_static_path_to_triton(
    monkeypatch: pytest.MonkeyPatch, shared: bool, seeding: str, scale: str
) -> None:
    # drop_block itself: the CPU sparse path, the dense static path and the Triton kernel (what
    # CUDA input runs) give the same keyed output, bit for bit
    x = torch.randn(2, 3, 9, 9)
    key = MaskKey(3, 5, 7, torch.arange(2))
    kw = {"key": key, "shared_channels": shared, "seeding": seeding, "scale": scale}
    sparse = drop_block(x, 0.3, 3, **kw)
    calls: list[int] = []
    real = ops.triton_drop_block
    monkeypatch.setattr(ops, "triton_drop_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    with ops.override(Path.TRITON):
        fused = drop_block(x, 0.3, 3, **kw)
        assert calls == [1]
        monkeypatch.setenv("SPATIALDROP_BACKEND", "torch")
        dense = drop_block(x, 0.3, 3, **kw)
    assert calls == [1]  # the backend switch keeps the kernel out
    with ops.override(Path.DENSE):
        assert torch.equal(drop_block(x, 0.3, 3, **kw), dense)
    assert calls == [1]
    assert 0 < int((sparse == 0).sum()) < sparse.numel()
    assert torch.equal(sparse, dense)
    assert torch.equal(sparse, fused)
