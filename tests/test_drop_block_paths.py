"""DropBlock's paths held to one reference, bit for bit, and its custom ops under ``opcheck``.

The reference is the eager sparse path (CPU, with its fused C pass where it applies). In keyed
mode every other path must give the same output *and* the same gradient, bit for bit: the
sparse path's torch ops alone (the fused pass switched off), torch.func (``vjp``), the dense
static-shape path
(what export, meta tensors and devices without Triton run), the fused Triton kernels (run by
Triton's interpreter on the CPU), and the compiled forms of the sparse and dense paths; over
the contract table's modes (per-channel and shared masks, both seedings, every scale policy),
spatial ranks 1-3, every float dtype and the layouts a model hands a layer: contiguous,
channels-last (memory format and ``channel_dim=-1``), non-contiguous and expanded. The output's
layout is ``torch.empty_like(input)``'s on every path.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

import spatialdrop as sd
from optable import OPS_BY_NAME, Mode, nonzero_input
from spatialdrop._dropblock import ops
from spatialdrop._dropblock.dense import keyed_seed_grid, seed_rate_op
from spatialdrop._dropblock.sparse import (
    PLAN_EXACT,
    PLAN_NONE,
    PLAN_STATIC,
    drop_block_backward,
    drop_block_op,
)
from spatialdrop.functional import drop_block

OP = OPS_BY_NAME["drop_block"]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
LAYOUTS = ["contiguous", "channels_last", "channel_dim=-1", "strided", "expanded"]


def block_kwargs(mode: Mode, rank: int) -> dict[str, Any]:
    kw = dict(mode.kwargs)
    if kw["block_size"] == "RECT":
        kw["block_size"] = (2, 3, 1)[:rank]
    return kw


def make_input(rank: int, layout: str, dtype: torch.dtype, n: int = 3, c: int = 4) -> tuple[Tensor, int]:
    """A leaf input of ``layout`` (values nonzero, so zeros in the output are drops) and its channel dim."""
    sizes = (7, 6, 5)[:rank]
    if layout == "channel_dim=-1":
        return nonzero_input((n, *sizes, c), dtype).requires_grad_(), -1
    if layout == "channels_last":
        fmt = {1: None, 2: torch.channels_last, 3: torch.channels_last_3d}[rank]
        return nonzero_input((n, c, *sizes), dtype, memory_format=fmt).requires_grad_(), 1
    if layout == "strided":  # every other position of a wider map: not dense
        wide = nonzero_input((n, c, *sizes[:-1], 2 * sizes[-1]), dtype)
        return wide[..., ::2].detach().requires_grad_(), 1
    if layout == "expanded":  # one map broadcast over the channels (stride 0)
        one = nonzero_input((n, 1, *sizes), dtype)
        return one.expand(n, c, *sizes).detach().requires_grad_(), 1
    return nonzero_input((n, c, *sizes), dtype).requires_grad_(), 1


def key_for(x: Tensor) -> sd.MaskKey:
    return sd.MaskKey(11, 4, 7, torch.arange(x.shape[0]) * 3 + 1)


@contextlib.contextmanager
def path(name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Route ``drop_block`` on CPU input through the named path (``ops.override``)."""
    if name in ("sparse", "func", "compiled-sparse", "compiled-dynamic", "torch-ops"):
        # torch-ops: the sparse path without the C extension (its write plans, torch's multiply)
        with ops.override(extension=name != "torch-ops"):
            yield
        return
    if name in ("dense", "compiled-dense"):
        with ops.override(ops.Path.DENSE):
            yield
        return
    monkeypatch.delenv("SPATIALDROP_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.override(ops.Path.TRITON):
        yield


def forward_backward(name: str, f: Callable[[Tensor], Tensor], x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``(f(x), d<f(x), w>/dx)`` by the named path's means (eager, torch.func or compiled)."""
    if name == "func":
        y, vjp = torch.func.vjp(f, x)
        return y, vjp(w)[0]
    if name.startswith("compiled"):
        torch._dynamo.reset()
        # compiled-dynamic: symbolic sizes and strides (no graph break on them: fullgraph)
        f = torch.compile(f, fullgraph=True, dynamic=name.endswith("dynamic"))
    y = f(x)
    (g,) = torch.autograd.grad(y, x, w)
    return y.detach(), g


def check_paths(
    monkeypatch: pytest.MonkeyPatch, paths: list[str], mode: Mode, rank: int, layout: str, dtype: torch.dtype
) -> None:
    x, cd = make_input(rank, layout, dtype)
    kw = block_kwargs(mode, rank)
    key = key_for(x)

    def f(t: Tensor) -> Tensor:
        return drop_block(t, 0.3, channel_dim=cd, key=key, **kw)

    w = nonzero_input(x.shape, dtype, seed=1)
    with path("sparse", monkeypatch):
        ref_y, ref_g = forward_backward("sparse", f, x, w)
    dropped = ref_y == 0
    assert dropped.any()
    assert not dropped.all()
    assert ref_y.stride() == torch.empty_like(x).stride()
    for name in paths:
        with path(name, monkeypatch):
            y, g = forward_backward(name, f, x, w)
        assert torch.equal(y, ref_y), (name, "output")
        assert torch.equal(g, ref_g), (name, "gradient")
        assert y.stride() == ref_y.stride(), (name, "layout", y.stride(), ref_y.stride())


EAGER_PATHS = ["torch-ops", "func", "dense"] + (["triton"] if HAVE_TRITON else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# channels-last memory formats exist for 2-D and 3-D maps only (rank 1 is the contiguous case)
CASES = [(r, lay) for r in (1, 2, 3) for lay in LAYOUTS if not (r == 1 and lay == "channels_last")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rank", "layout"), CASES, ids=[f"{r}d-{lay}" for r, lay in CASES])
@pytest.mark.parametrize("mode", OP.modes, ids=OP.mode_ids())
def test_eager_paths_equal_the_reference(
    monkeypatch: pytest.MonkeyPatch, mode: Mode, rank: int, layout: str, dtype: torch.dtype
) -> None:
    # the Triton kernel's dtype handling (float16, float64) is covered in tests/test_triton.py
    paths = EAGER_PATHS if dtype in (torch.float32, torch.bfloat16) else ["torch-ops", "func", "dense"]
    check_paths(monkeypatch, paths, mode, rank, layout, dtype)


COMPILED = ["compiled-sparse", "compiled-dynamic", "compiled-dense"]


@pytest.mark.parametrize(("rank", "layout"), [(2, "contiguous"), (2, "channels_last"), (3, "channel_dim=-1")])
@pytest.mark.parametrize("mode", OP.modes, ids=OP.mode_ids())
def test_compiled_paths_equal_the_reference(
    monkeypatch: pytest.MonkeyPatch, mode: Mode, rank: int, layout: str
) -> None:
    check_paths(monkeypatch, COMPILED, mode, rank, layout, torch.float32)


FULL = [(m, r, lay, torch.float32) for m in OP.modes for r, lay in CASES] + [
    (m, 2, "contiguous", dt) for m in OP.modes for dt in DTYPES[1:]
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "rank", "layout", "dtype"), FULL, ids=[f"{m.name}-{r}d-{lay}-{dt}" for m, r, lay, dt in FULL]
)
def test_compiled_paths_equal_the_reference_full(
    monkeypatch: pytest.MonkeyPatch, mode: Mode, rank: int, layout: str, dtype: torch.dtype
) -> None:
    # dynamic=True: the default run's test above (every mode, three layouts)
    check_paths(monkeypatch, ["compiled-sparse", "compiled-dense"], mode, rank, layout, dtype)


# --- every custom op under torch.library.opcheck (as torchvision's OPTESTS check its ops) ----------


def op_samples(every: int) -> list[tuple[str, tuple[Any, ...]]]:
    """Arguments of ``spatialdrop::drop_block`` from the contract table: each mode x its samples.

    The plan mode and keyed/unkeyed rotate over the samples; ``every`` keeps every n-th sample
    of a mode (1: all of them).
    """
    out = []
    samples = [s for s in OP.samples() if not s.unbatched]
    plans = [PLAN_EXACT, PLAN_STATIC, PLAN_NONE]
    for i, mode in enumerate(OP.modes):
        for j, sample in enumerate(samples):
            if (i + j) % every:
                continue
            x = sample.make().requires_grad_()
            rank = x.dim() - 2
            kw = block_kwargs(mode, rank)
            b = kw["block_size"]
            blocks = list(b) if isinstance(b, tuple) else [b] * rank
            cd = sample.channel_dim % x.dim()
            p = torch.tensor(0.3, dtype=torch.float64)
            shared, seeding, scale = (
                kw.get("shared_channels", False),
                kw.get("seeding", "uniform"),
                kw.get("scale", "expected"),
            )
            if (i + j) % 2:
                rand: tuple[Any, ...] = (
                    None,
                    p,
                    blocks,
                    cd,
                    shared,
                    seeding,
                    scale,
                    [1, 2, 3, 4],
                    torch.tensor(5),
                    torch.arange(x.shape[0]),
                )
            else:
                rand = (torch.tensor(12345), p, blocks, cd, shared, seeding, scale, None, None, None)
            out.append((f"{mode.name}-{sample.id}", (x, *rand, plans[(i + j) % 3])))
    return out


def _opcheck(op: Any, args: tuple[Any, ...]) -> None:
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def _backward_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    x, seed, p, blocks, cd, shared, seeding, scale, words, step, ids, _ = args
    _, heads, info, factor = drop_block_op(x.detach(), *args[1:])
    grad = nonzero_input(x.shape, x.dtype, seed=2).requires_grad_()
    return (grad, heads, info, factor, seed, p, blocks, cd, shared, seeding, scale, words, step, ids)


FEW = op_samples(every=4)
ALL = op_samples(every=1)


@pytest.mark.parametrize(("name", "args"), FEW, ids=[n for n, _ in FEW])
def test_opcheck_forward_and_backward_ops(name: str, args: tuple[Any, ...]) -> None:
    _opcheck(drop_block_op, args)
    _opcheck(drop_block_backward, _backward_args(args))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "args"), ALL, ids=[n for n, _ in ALL])
def test_opcheck_forward_and_backward_ops_every_sample(name: str, args: tuple[Any, ...]) -> None:
    _opcheck(drop_block_op, args)
    _opcheck(drop_block_backward, _backward_args(args))


@pytest.mark.parametrize("seeding", ["uniform", "valid"])
def test_opcheck_seed_rate_and_keyed_grid_ops(seeding: str) -> None:
    p = torch.tensor(0.25, dtype=torch.float64)
    _opcheck(seed_rate_op, (p, [6, 7], [3, 2], seeding))
    places = 3 * (8 * 8 if seeding == "uniform" else 4 * 6)
    _opcheck(
        keyed_seed_grid, (p, [6, 7], [3, 2], seeding, places, [1, 2, 3, 4], torch.tensor(9), torch.arange(3))
    )


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install spatialdrop[triton])")
@pytest.mark.parametrize(("name", "args"), FEW[::2], ids=[n for n, _ in FEW[::2]])
def test_opcheck_triton_op(monkeypatch: pytest.MonkeyPatch, name: str, args: tuple[Any, ...]) -> None:
    from spatialdrop._dropblock.triton_kernels import _key_tensors, drop_block_triton

    x, _, p, blocks, cd, shared, seeding, scale, words, step, ids, _ = args
    if x.dim() - 2 > 3:
        x = x.flatten(-2)  # the kernels take 1-3 spatial dims
        blocks = blocks[:-1]
    key = None if words is None else sd.MaskKey(1 | 2 << 32, step, 3 | 4 << 32, ids)
    s, sid, st, kw = _key_tensors(x.shape[0], x.device, torch.Generator().manual_seed(3), key)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.override(ops.Path.TRITON):
        _opcheck(
            drop_block_triton, (x, s, sid, st, p, kw, key is not None, blocks, cd, shared, seeding, scale)
        )


# --- torch.compile: a p that changes every step (DropSchedule) does not recompile ----------------


@pytest.mark.parametrize("fullgraph", [True, False])
@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("dense", {}),
        ("dense", {"seeding": "valid", "shared_channels": True}),
        ("triton", {}),
        ("triton", {"seeding": "valid", "scale": "realized"}),
    ],
)
def test_p_changing_every_step_compiles_at_most_twice(
    monkeypatch: pytest.MonkeyPatch, name: str, kw: dict[str, Any], keyed: bool, fullgraph: bool
) -> None:
    # the first p is a constant of the first graph; the second p makes it a symbol: two graphs
    from torch._dynamo.utils import counters

    if name == "triton" and not HAVE_TRITON:
        pytest.skip("triton is not installed (pip install spatialdrop[triton])")
    layer = sd.DropBlock2d(0.05, 3, **kw)
    if keyed:
        sd.keyed_masks(layer, seed=1)
    x = torch.ones(32, 4, 10, 10)
    rates = []
    with path(name, monkeypatch):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(layer, fullgraph=fullgraph)
        for step in range(6):
            layer.p = 0.05 + 0.06 * step
            with (
                sd.mask_context(step=torch.tensor(step), sample_ids=torch.arange(32))
                if keyed
                else contextlib.nullcontext()
            ):
                y = compiled(x)
            rates.append(float((y == 0).float().mean()))
            if keyed:  # the same bits as eager mode
                with sd.mask_context(step=torch.tensor(step), sample_ids=torch.arange(32)):
                    assert torch.equal(y, layer(x))
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert rates[0] < 0.15
    assert 0.25 < rates[-1] < 0.45  # p = 0.35 at the last step


# --- memory format on every path, meta tensors included ------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize(("rank", "layout"), CASES, ids=[f"{r}d-{lay}" for r, lay in CASES])
def test_meta_and_fake_outputs_have_the_layout_of_empty_like(rank: int, layout: str, shared: bool) -> None:
    x, cd = make_input(rank, layout, torch.float32)
    for t in (x.detach().to("meta").requires_grad_(), x):
        y = drop_block(t, 0.2, 2, channel_dim=cd, shared_channels=shared)
        assert y.stride() == torch.empty_like(t).stride(), (t.device, y.stride())
        y.sum().backward()
        assert t.grad is not None
        assert t.grad.shape == t.shape
    # a following .view works on every path (it failed for NHWC on the dense path)
    assert drop_block(x.detach().to("meta"), 0.2, 2, channel_dim=cd).reshape(-1).shape == (x.numel(),)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install spatialdrop[triton])")
def test_export_never_holds_the_triton_op(monkeypatch: pytest.MonkeyPatch) -> None:
    # the export check comes before the Triton dispatch: an exported program holds no custom op
    with path("triton", monkeypatch):
        program = torch.export.export(sd.DropBlock2d(0.3, 3).train(), (torch.ones(8, 4, 9, 9),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not any("spatialdrop" in t for t in targets), targets
    y = program.module()(torch.ones(8, 4, 9, 9))
    assert 0.15 < float((y == 0).float().mean()) < 0.45


# --- non-finite input: one rule on every path (issue 29) -----------------------------------------


def with_non_finite(t: Tensor) -> Tensor:
    """A leaf like ``t`` (its values, strides and storage offset) with NaN, inf and -inf at every
    fifth, seventh and eleventh position."""
    storage = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype)
    v = storage.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t.detach())
    idx = torch.arange(v.numel()).view(v.shape)
    for every, value in ((5, float("nan")), (7, float("inf")), (11, float("-inf"))):
        v.masked_fill_(idx % every == 0, value)
    return v.requires_grad_()


def same_numbers(a: Tensor, b: Tensor) -> bool:
    """Equal NaN positions and, elsewhere, equal values with the same sign (``-0.0`` is not ``0.0``)."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    a, b = a.masked_fill(nan, 1), b.masked_fill(nan, 1)
    return torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())


NON_FINITE_LAYOUTS = [(2, "contiguous"), (2, "channels_last"), (3, "channel_dim=-1"), (1, "strided")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("rank", "layout"), NON_FINITE_LAYOUTS, ids=[f"{r}d-{lay}" for r, lay in NON_FINITE_LAYOUTS]
)
@pytest.mark.parametrize("mode", OP.modes, ids=OP.mode_ids())
def test_non_finite_input_gives_x_times_zero_on_every_path(
    monkeypatch: pytest.MonkeyPatch, mode: Mode, rank: int, layout: str, dtype: torch.dtype
) -> None:
    """Dropped elements are ``x * 0`` on every path, as torch's dropout gives: NaN where ``x`` is NaN
    or infinite, a zero of ``x``'s sign elsewhere; kept ones ``x * scale``; the gradient likewise."""
    clean, cd = make_input(rank, layout, dtype)
    x = with_non_finite(clean)
    kw = block_kwargs(mode, rank)
    key = key_for(x)

    def f(t: Tensor) -> Tensor:
        return drop_block(t, 0.3, channel_dim=cd, key=key, **kw)

    with path("sparse", monkeypatch):
        mask_y = f(clean).detach()  # the same key: the same mask; a zero there is a drop
        ref_y, ref_g = forward_backward(
            "sparse", f, x, with_non_finite(nonzero_input(x.shape, dtype, seed=1))
        )
    dropped = mask_y == 0
    assert dropped.any()
    assert not dropped.all()
    xd = x.detach()
    assert same_numbers(ref_y[dropped], xd[dropped] * 0), "dropped elements are not x * 0"
    assert bool(ref_y[~dropped & xd.isnan()].isnan().all())
    assert bool(ref_y[~dropped & xd.isinf()].isinf().all())
    w = with_non_finite(nonzero_input(x.shape, dtype, seed=1)).detach()
    assert same_numbers(ref_g[dropped], w[dropped] * 0), "dropped gradients are not g * 0"
    paths = EAGER_PATHS if dtype in (torch.float32, torch.bfloat16) else ["torch-ops", "func", "dense"]
    for name in paths:
        with path(name, monkeypatch):
            y, g = forward_backward(name, f, x, w)
        assert same_numbers(y, ref_y), (name, "output")
        assert same_numbers(g, ref_g), (name, "gradient")


# --- the dispatcher: one table, one choice, one switch ------------------------------------------


def test_the_path_table_has_one_row_per_path() -> None:
    doc = ops.__doc__
    assert doc is not None
    rules = [i for i, line in enumerate(doc.splitlines()) if line.startswith("=====")]
    body = doc.splitlines()[rules[1] + 1 : rules[2]]  # between the header's rule and the last
    assert [line.split()[0] for line in body if line[:1].isupper()] == [p.name for p in ops.Path]


def _geo(x: Tensor, shared: bool = False) -> Any:
    from spatialdrop._dropblock.geometry import geometry

    return geometry(x.shape, 1, (3,) * (x.dim() - 2), shared, "uniform")


def test_select_path_follows_the_table() -> None:
    x = torch.randn(2, 3, 8, 8)
    geo, shared = _geo(x), _geo(x, shared=True)
    select = ops.select_path
    expected_fused = ops.Path.FUSED if sd._dropblock.fused.extension() is not None else ops.Path.EAGER
    assert select(x, geo, "expected", False, None) is expected_fused
    assert select(x.half(), geo, "expected", False, None) is ops.Path.EAGER
    assert select(x, geo, "realized", False, None) is ops.Path.EAGER
    assert select(x, shared, "expected", False, None) is ops.Path.OP
    assert select(x, geo, "expected", True, None) is ops.Path.INPLACE
    assert select(x, geo, "expected", False, [3, 0, 8, 0, 8, 0]) is ops.Path.EAGER
    seen: list[ops.Path] = []
    torch.func.grad(lambda t: (seen.append(select(t, geo, "expected", False, None)), t.sum())[1])(x)
    assert seen == [ops.Path.FUNC]
    assert select(x.to("meta"), geo, "expected", False, None) is ops.Path.DENSE
    with ops.override(ops.Path.DENSE):
        assert select(x, geo, "expected", False, None) is ops.Path.DENSE
    with ops.override(extension=False):
        assert select(x, geo, "expected", False, None) is ops.Path.EAGER
        assert sd._dropblock.fused.extension() is None
    with pytest.raises(ValueError, match="override: path must be"), ops.override(ops.Path.FUSED):
        pass


def test_every_path_runs_under_its_table_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # the same keyed call by each CPU path the table lists, bit for bit
    calls: list[ops.Path] = []
    real = ops.select_path
    monkeypatch.setattr(ops, "select_path", lambda *a: calls.append(real(*a)) or calls[-1])
    x = nonzero_input((2, 3, 8, 8), torch.float32)
    key = sd.MaskKey(1, 2, 3, torch.arange(2))
    ref = drop_block(x, 0.3, 3, key=key)
    results = {
        "half": drop_block(x.double(), 0.3, 3, key=key, scale="none").float() * (1 / 0.7),
        "inplace": drop_block(x.clone(), 0.3, 3, key=key, inplace=True),
        "func": torch.func.vmap(lambda t: drop_block(t, 0.3, 3, key=key), randomness="same")(x[None])[0],
    }
    with ops.override(ops.Path.DENSE):
        results["dense"] = drop_block(x, 0.3, 3, key=key)
    with ops.override(extension=False):
        results["eager"] = drop_block(x, 0.3, 3, key=key)
    for name, y in results.items():
        assert torch.equal(y == 0, ref == 0), name
    assert torch.equal(results["inplace"], ref)
    assert torch.equal(results["dense"], ref)
    assert torch.equal(results["eager"], ref)
    fused_or_eager = ops.Path.FUSED if sd._dropblock.fused.extension() is not None else ops.Path.EAGER
    assert calls[:2] == [fused_or_eager, fused_or_eager]
    assert {ops.Path.INPLACE, ops.Path.DENSE, ops.Path.EAGER} <= set(calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_more_than_three_spatial_dims_equal_the_torch_ops(dtype: torch.dtype) -> None:
    # the C pass's parameter block holds 3 sizes per kind: 4 spatial dims must not reach it
    # (it read misplaced sizes and zeroed the wrong blocks); the torch ops and the dense path agree
    x = nonzero_input((2, 3, 5, 6, 4, 5), dtype)
    key = sd.MaskKey(1, 2, 3, torch.arange(2))

    def f(t: Tensor) -> Tensor:
        return drop_block(t, 0.3, (2, 3, 2, 2), key=key, seeding="valid")

    ref = f(x)
    with ops.override(extension=False):
        assert torch.equal(f(x), ref)
    with ops.override(ops.Path.DENSE):
        assert torch.equal(f(x), ref)
