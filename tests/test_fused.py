"""DropBlock's fused CPU pass (``spatialdrop/_dropblock/_cfused.c``) against the torch ops it replaces.

The fused pass writes ``input * scale`` and zeroes each seed's block in one sweep, and backward
reuses the forward's seeds. Everything here is compared bit for bit with the same call through
the sparse path's torch ops (``ops.override(extension=False)``): output, gradient, in place, keyed and
unkeyed, over ranks, layouts, dtypes, block shapes, both seedings, and the storage ranges that
more than one thread splits the sweep into (blocks that straddle two ranges included).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

import spatialdrop as sd
from spatialdrop._dropblock import autograd, fused, ops, sampling
from spatialdrop._dropblock.geometry import Geometry
from spatialdrop._dropblock.scale import expected_factor
from spatialdrop.functional import drop_block

pytestmark = pytest.mark.skipif(
    fused.extension() is None, reason="the C extension is not built (no C compiler): the rest runs without it"
)


def test_the_extension_is_built() -> None:
    # pip install builds it (a C compiler is needed); without it every call takes the torch ops
    assert fused.extension() is not None, (
        "spatialdrop._dropblock._cfused is missing: reinstall with a C compiler"
    )


def _input(shape: tuple[int, ...], layout: str, dtype: torch.dtype) -> tuple[Tensor, int]:
    gen = torch.Generator().manual_seed(3)
    if layout == "channel_dim=-1":
        x = torch.randn(shape[0], *shape[2:], shape[1], generator=gen, dtype=torch.float64)
        return x.to(dtype).requires_grad_(), -1
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    elif layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    elif layout == "permuted":  # dense, but the batch dim is not outermost
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    return x.detach().requires_grad_(), 1


def _both(fn: Any, x: Tensor, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Tensor, Tensor]]:
    """``(output, gradient)`` with the fused pass and with the torch ops, from the same randomness."""
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(x.dtype)
    results = []
    for enabled in (True, False):
        with ops.override(extension=enabled):
            xi = x.detach().clone().requires_grad_()
            y = fn(xi)
            y.backward(w)
        assert xi.grad is not None
        results.append((y.detach(), xi.grad))
    return results


def _assert_equal(results: list[tuple[Tensor, Tensor]]) -> None:
    (y1, g1), (y2, g2) = results
    assert torch.equal(y1, y2), "output"
    assert torch.equal(g1, g2), "gradient"
    assert y1.stride() == y2.stride()
    dropped = y1 == 0
    assert dropped.any()
    assert not dropped.all()


SHAPES = [(3, 5, 37), (2, 4, 9, 13), (2, 3, 6, 7, 5)]
LAYOUTS = ["contiguous", "channels_last", "channel_dim=-1", "strided", "permuted"]


# channels-last memory formats exist for 2-D and 3-D maps (1-D maps: the contiguous case)
CASES = [(s, lay) for s in SHAPES for lay in LAYOUTS if not (len(s) == 3 and lay == "channels_last")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("shape", "layout"), CASES, ids=[f"{len(s) - 2}d-{lay}" for s, lay in CASES])
@pytest.mark.parametrize(
    "options",
    [
        {"block_size": 3},
        {"block_size": 7, "seeding": "valid"},
        {"block_size": 1, "scale": "none"},
        {"block_size": (2, 3, 1)},
        {"block_size": 20},  # larger than some maps: blocks cut by the borders
    ],
    ids=["b3", "b7-valid", "b1-none", "rect", "b20"],
)
@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_fused_equals_the_torch_ops(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    layout: str,
    dtype: torch.dtype,
    options: dict[str, Any],
    keyed: bool,
) -> None:
    rank = len(shape) - 2
    kw = dict(options)
    if isinstance(kw["block_size"], tuple):
        kw["block_size"] = kw["block_size"][:rank]
    if kw.get("seeding") == "valid" and min(shape[2:]) < 7:
        kw["block_size"] = 2
    x, cd = _input(shape, layout, dtype)
    key = sd.MaskKey(5, 2, 8, torch.arange(shape[0])) if keyed else None

    def fn(t: Tensor) -> Tensor:
        gen = None if keyed else torch.Generator().manual_seed(17)
        return drop_block(t, 0.3, channel_dim=cd, generator=gen, key=key, **kw)

    _assert_equal(_both(fn, x, monkeypatch))


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ranges", [1, 40])
def test_ranges_split_over_threads_give_the_same_bits(
    monkeypatch: pytest.MonkeyPatch, threads: int, layout: str, ranges: int
) -> None:
    # 40 ranges a thread, a few hundred elements each: blocks straddling ranges are the rule
    monkeypatch.setattr(fused, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(fused, "_RANGES_PER_THREAD", ranges)
    monkeypatch.setattr(fused, "_CHUNK_BYTES", 64)
    x, _ = _input((4, 6, 30, 30), layout, torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = _both(
            lambda t: drop_block(t, 0.2, 5, generator=torch.Generator().manual_seed(1)), x, monkeypatch
        )
    finally:
        torch.set_num_threads(before)
    _assert_equal(results)


@pytest.mark.parametrize(
    ("dtype", "options"),
    [
        (torch.bfloat16, {}),
        (torch.float16, {}),
        (torch.float32, {"scale": "realized"}),
        (torch.float32, {"shared_channels": True}),
    ],
    ids=["bfloat16", "float16", "realized", "shared"],
)
def test_other_calls_take_the_torch_ops(dtype: torch.dtype, options: dict[str, Any]) -> None:
    # what the fused pass does not take: no call reaches it (a spy), and the torch ops run
    calls: list[int] = []
    real = fused.write
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "write", lambda *a: calls.append(1) or real(*a))
        x, _ = _input((2, 4, 12, 12), "contiguous", dtype)
        y = drop_block(x, 0.3, 3, generator=torch.Generator().manual_seed(0), **options)
        y.backward(torch.ones_like(y))
        assert not calls
        drop_block(x.detach().float(), 0.3, 3)
        assert calls  # the spy sees a call that does take it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_in_place_equals_out_of_place(dtype: torch.dtype) -> None:
    x, _ = _input((2, 8, 21, 21), "contiguous", dtype)
    key = sd.MaskKey(1, 1, 1, torch.arange(2))
    ref = drop_block(x.detach(), 0.2, 5, key=key)
    y = x.detach().clone()
    out = drop_block(y, 0.2, 5, key=key, inplace=True)
    assert out.data_ptr() == y.data_ptr()
    assert torch.equal(out, ref)


def test_backward_keeps_only_the_seeds() -> None:
    x = torch.randn(8, 64, 28, 28, requires_grad=True)
    saved: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = drop_block(x, 0.1, 7, generator=torch.Generator().manual_seed(0))
    seeds = [t for t in saved if t.dtype == torch.int32]
    assert len(seeds) == 1
    # about gamma * places seeds (binomial: within 6 standard deviations), 4 bytes each
    gamma = sd._dropblock.calibration.seed_rate(0.1, (28, 28), (7, 7), "uniform")
    places = 8 * 64 * 34 * 34
    mean = gamma * places
    assert abs(seeds[0].numel() - mean) < 6 * math.sqrt(mean)
    # and they are the seeds: their blocks are exactly the zeros
    keep = (y != 0).float()
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(g, keep / 0.9)


@pytest.mark.parametrize("trial", range(40))
def test_seed_sampler_in_c_equals_the_torch_ops(trial: int) -> None:
    gen = torch.Generator().manual_seed(trial)
    numel = int(torch.randint(1, 5_000_000, (1,), generator=gen))
    gamma = float(torch.rand((), generator=gen)) ** 3 * 0.9 + 1e-7
    if trial == 0:
        numel, gamma = 10, 0.999  # tops up: the first draw's gaps fall short of the grid's end
    state = gen.get_state()
    cpu = torch.device("cpu")
    in_c = sampling.draw_grid(numel, gamma, gen, cpu, dense=False)
    gen.set_state(state)
    with ops.override(extension=False):
        in_torch = sampling.draw_grid(numel, gamma, gen, cpu, dense=False)
    assert in_c.dtype == in_torch.dtype == torch.int64
    assert torch.equal(in_c, in_torch)
    gen.set_state(state)
    small = sampling.draw_grid(numel, gamma, gen, cpu, dense=False, small=True)  # what the fused pass keeps
    assert small.dtype == torch.int32
    assert torch.equal(small.long(), in_torch)


def test_a_forked_child_makes_its_own_thread_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    # a fork copies the pool object but not its threads: a process with another pid (a forked
    # child, simulated here: a real fork of this test process can hang in OpenMP) gets a new pool
    monkeypatch.setattr(fused, "_PARALLEL_MIN", 1)
    x = torch.arange(4 * 6 * 30 * 30, dtype=torch.float32).reshape(4, 6, 30, 30)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = drop_block(x, 0.2, 5, generator=torch.Generator().manual_seed(1))
        parent_pool = fused._pool
        assert parent_pool is not None
        pid = fused.os.getpid()
        monkeypatch.setattr(fused.os, "getpid", lambda: pid + 1)
        got = drop_block(x, 0.2, 5, generator=torch.Generator().manual_seed(1))
        assert fused._pool is not None
        assert fused._pool is not parent_pool
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_seed_drawn_scales_everything(dtype: torch.dtype) -> None:
    # p so small that no seed falls (the fused pass, and the torch ops' empty plan for bfloat16)
    x, _ = _input((2, 3, 5, 5), "contiguous", dtype)
    y = drop_block(x, 1e-9, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, x.detach() * (1 / (1 - 1e-9)))
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(g, torch.full_like(g, 1 / (1 - 1e-9)))


def _reference(x: Tensor, factor: float, seeds: list[int], geo: Geometry) -> Tensor:
    """``x * factor`` with each seed's block zeroed, by a slow loop over the seeds (the rule itself).

    A flat seed index names a map ``m`` and a grid place per spatial dim; the seed at uniform
    index ``j = place + shift`` drops ``[j - b + 1, j]`` cut to ``[0, L)``.
    """
    keep = torch.ones((geo.maps, *geo.sizes), dtype=torch.bool)
    for seed in seeds:
        rest, coords = seed, []
        for g in reversed(geo.grid):
            coords.append(rest % g)
            rest //= g
        index: list[Any] = [rest]
        for c, shift, b, size in zip(reversed(coords), geo.shift, geo.blocks, geo.sizes):
            j = c + shift
            index.append(slice(max(j - b + 1, 0), min(j, size - 1) + 1))
        keep[tuple(index)] = False
    mask = keep.view(geo.batch, geo.channels, *geo.sizes)
    return torch.where(mask, x * factor, torch.zeros((), dtype=x.dtype))


SWEEP_CASES = [
    ((2, 3, 9000), (7,), "uniform"),  # maps of 36 kB: longer than a sweep's chunk
    ((2, 3, 70, 70), (7, 7), "uniform"),
    ((2, 3, 70, 70), (3, 20), "valid"),
    ((1, 2, 20, 20, 20), (5, 5, 5), "uniform"),
    ((2, 2, 5, 6), (9, 9), "uniform"),  # blocks larger than the maps
]


@pytest.mark.parametrize("order", ["ascending", "shuffled"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("shape", "blocks", "seeding"), SWEEP_CASES, ids=[f"{len(s) - 2}d-{b}-{sd}" for s, b, sd in SWEEP_CASES]
)
def test_the_sweep_equals_a_loop_over_the_seeds(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    blocks: tuple[int, ...],
    seeding: str,
    dtype: torch.dtype,
    threads: int,
    order: str,
) -> None:
    # ascending seeds in contiguous maps take the streaming sweep (blocks located as it reaches
    # them, those cut by a map's far border held back); shuffled ones the located-and-bucketed
    # one. Both against the rule, with seeds forced onto every map's last grid places (where
    # blocks are cut and end out of order) and, with two threads, in 64-byte storage ranges.
    geo = Geometry(shape, 1, blocks, False, seeding)
    gen = torch.Generator().manual_seed(len(shape) + blocks[-1])
    drawn = torch.randperm(geo.places, generator=gen)[: max(4, geo.places // 200)]
    per_map = geo.places // geo.maps
    edges = torch.tensor([m * per_map + per_map - 1 - k for m in range(geo.maps) for k in (0, 1, 5)])
    seeds = torch.unique(torch.cat([drawn, edges.clamp(min=0)]))  # ascending, no repeats
    if order == "shuffled":
        seeds = seeds[torch.randperm(seeds.numel(), generator=gen)]
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    factor = expected_factor(0.3, dtype)
    want = _reference(x, factor, seeds.tolist(), geo)
    monkeypatch.setattr(fused, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(fused, "_RANGES_PER_THREAD", 7)
    monkeypatch.setattr(fused, "_CHUNK_BYTES", 64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for kept in (seeds, seeds.to(torch.int32)):
            out = torch.full_like(x, float("nan"))  # every element must be written
            fused.write(out, x, factor, kept, geo)
            assert torch.equal(out, want)
            in_place = x.clone()
            fused.write(in_place, in_place, factor, kept, geo)
            assert torch.equal(in_place, want)
    finally:
        torch.set_num_threads(before)


def test_a_block_held_back_behind_one_that_leaves_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    # 10 x 10 map, block 3: seed A (grid 9, 11) ends at the map's last element (99); seed B
    # (grid 11, 2), after A in seed order, is cut to the last row and ends at 92. Ranges of 32
    # elements: B lies wholly in [64, 96) but the sweep reaches it only after A, which ends past
    # 96: B must still be zeroed by its own range (A by the next one's straddling pass)
    geo = Geometry((1, 1, 10, 10), 1, (3, 3), False, "uniform")
    seeds = torch.tensor([9 * 12 + 11, 11 * 12 + 2])
    x = torch.randn(1, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(fused, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(fused, "_RANGES_PER_THREAD", 2)
    monkeypatch.setattr(fused, "_CHUNK_BYTES", 32)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = torch.empty_like(x)
        fused.write(out, x, 2.0, seeds, geo)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, _reference(x, 2.0, seeds.tolist(), geo))
    assert (out[0, 0, 9, :3] == 0).all()
    assert (out[0, 0, 7:, 9] == 0).all()


def _fused_function_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A spy on the eager fused path's autograd function: one entry per forward it runs."""
    calls: list[int] = []
    real = autograd.FusedFunction.forward
    monkeypatch.setattr(
        autograd.FusedFunction, "forward", staticmethod(lambda *a: calls.append(1) or real(*a))
    )
    return calls


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_double_backward_through_the_fused_function(monkeypatch: pytest.MonkeyPatch, keyed: bool) -> None:
    # a backward that records a graph takes the backward op (the one formula): the gradient of
    # the gradient with respect to the incoming gradient is the mask times the scale again
    calls = _fused_function_calls(monkeypatch)
    x, _ = _input((2, 6, 15, 15), "contiguous", torch.float32)
    key = sd.MaskKey(3, 1, 4, torch.arange(2)) if keyed else None
    results = []
    for enabled in (True, False):
        with ops.override(extension=enabled):
            gen = None if keyed else torch.Generator().manual_seed(5)
            xi = x.detach().clone().requires_grad_()
            y = drop_block(xi, 0.25, 5, generator=gen, key=key)
            w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
            (g,) = torch.autograd.grad(y, xi, w, create_graph=True)
            v = torch.randn(g.shape, generator=torch.Generator().manual_seed(2))
            (gw,) = torch.autograd.grad((g * v).sum(), w)
        results.append((y.detach(), g.detach(), gw))
    assert calls == [1]  # the fused run went through it, the torch-op run did not
    (y1, g1, gw1), (y2, g2, gw2) = results
    assert torch.equal(y1, y2)
    assert torch.equal(g1, g2)
    assert torch.equal(gw1, gw2)
    keep, factor = y1 != 0, expected_factor(0.25, torch.float32)
    zero = torch.zeros(())
    assert torch.equal(g1, torch.where(keep, w.detach() * factor, zero))
    assert torch.equal(gw1, torch.where(keep, v * factor, zero))  # w and v: the same in both runs


def test_seeds_past_the_budget_are_drawn_again_in_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    # block 1 at p 0.5: a seed for every other element, far past 1/32 of the input's bytes, so
    # the forward keeps nothing of per-element size and backward draws the same seeds again
    calls = _fused_function_calls(monkeypatch)
    x, _ = _input((2, 4, 16, 16), "contiguous", torch.float32)
    saved: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        drop_block(x, 0.5, 1, generator=torch.Generator().manual_seed(2))
    assert calls
    assert sum(t.numel() for t in saved) == 0  # one empty tensor
    _assert_equal(
        _both(lambda t: drop_block(t, 0.5, 1, generator=torch.Generator().manual_seed(2)), x, monkeypatch)
    )


def test_a_gradient_in_another_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    # a contiguous output's gradient handed over channels-last (as a compiled consumer may):
    # the kept seeds address any layout, and the gradient keeps the layout it came in
    calls = _fused_function_calls(monkeypatch)
    x, _ = _input((2, 5, 9, 11), "contiguous", torch.float64)
    w = torch.randn(x.shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    grads = []
    for enabled in (True, False):
        with ops.override(extension=enabled):
            xi = x.detach().clone().requires_grad_()
            y = drop_block(xi, 0.3, 3, generator=torch.Generator().manual_seed(8))
            (g,) = torch.autograd.grad(y, xi, w)
        grads.append(g)
    assert calls == [1]
    assert torch.equal(grads[0], grads[1])
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


def test_seeds_past_32_bits_are_located_in_64() -> None:
    # 62 000 maps of 3, block 70 000: 70 002 seed places a map, 4.3e9 in all, so the walker
    # divides in 64 bits (the pass reads int64 seeds); where a seed sits in its map decides
    # which of the 3 elements its block covers: {0}, {0, 1}, all, {1, 2}, {2}
    geo = Geometry((1, 62_000, 3), 1, (70_000,), False, "uniform")
    assert geo.places > 2**32
    per_map = 70_002
    places = [(0, 0), (7, 1), (30_000, 5), (61_350, 70_000), (61_999, 70_001)]
    seeds = torch.tensor([m * per_map + j for m, j in places])
    assert seeds[-1] > 2**32
    x = torch.randn(1, 62_000, 3, generator=torch.Generator().manual_seed(4))
    out = torch.empty_like(x)
    fused.write(out, x, 2.0, seeds, geo)
    assert torch.equal(out, _reference(x, 2.0, seeds.tolist(), geo))
    assert (out == 0).sum() == 1 + 2 + 3 + 2 + 1


def _non_finite(x: Tensor) -> Tensor:
    """``x`` (same layout) with NaN, inf and -inf at every fifth, seventh and eleventh position."""
    v = x.detach().clone()
    idx = torch.arange(v.numel()).view(v.shape)
    for every, value in ((5, float("nan")), (7, float("inf")), (11, float("-inf"))):
        v.masked_fill_(idx % every == 0, value)
    return v


def _same_numbers(a: Tensor, b: Tensor) -> bool:
    """Equal NaN positions; elsewhere equal values of the same sign (``-0.0`` is not ``0.0``)."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    a, b = a.masked_fill(nan, 1), b.masked_fill(nan, 1)
    return torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("block", [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 20, 33])
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_pass_drops_as_x_times_zero(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, layout: str, block: int, threads: int
) -> None:
    """Every row width of the zero stores (1 to 33 elements: each store size and the long-row loop,
    float32 and float64, element by element when channels-last), split over threads: a dropped element
    is ``x * 0`` (NaN for NaN and infinite input, a zero of x's sign), as the torch ops and torch's
    dropout give, forward and backward."""
    monkeypatch.setattr(fused, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(fused, "_CHUNK_BYTES", 256)
    x, _ = _input((2, 3, 11, 40), layout, dtype)
    x = _non_finite(x)
    w = _non_finite(torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=dtype))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for enabled in (True, False):
            with ops.override(extension=enabled):
                xi = x.clone().requires_grad_()
                y = drop_block(xi, 0.3, block, generator=torch.Generator().manual_seed(4))
                y.backward(w)
            results.append((y.detach(), xi.grad))
    finally:
        torch.set_num_threads(before)
    (y1, g1), (y2, g2) = results
    assert _same_numbers(y1, y2), "output"
    assert _same_numbers(g1, g2), "gradient"
    clean = drop_block(torch.ones_like(x), 0.3, block, generator=torch.Generator().manual_seed(4))
    dropped = clean == 0
    assert dropped.any()
    assert _same_numbers(y1[dropped], x[dropped] * 0)
    assert _same_numbers(g1[dropped], w[dropped] * 0)


def test_the_c_side_checks_the_lengths_it_is_given() -> None:
    # the parameter block is a buffer of its own length, and the ranges it names must lie in the
    # buffers whose lengths come with their addresses: a mismatch is refused before any write
    ext = fused.extension()
    assert ext is not None
    x = torch.ones(2, 3, 8, 8)
    geo = Geometry(x.shape, 1, (3, 3), False, "uniform")
    seeds = torch.tensor([0, 50], dtype=torch.int32)
    n, ptr, sp = x.numel(), x.data_ptr(), seeds.data_ptr()
    ext.fused(ptr, n, ptr, sp, 2, fused._params(x, seeds, geo, 0, n, 0), 0, 1, 2.0)
    assert int((x == 0).sum()) > 0
    assert int((x == 2).sum()) > 0
    bad = [
        ((ptr, n, 0, sp, 2, fused._params(x, seeds, geo, 0, n, 0)[:-1], 0, 0, 1.0), "parameter block"),
        ((ptr, n, 0, sp, 2, fused._params(x, seeds, geo, 0, n + 1, 0), 0, 0, 1.0), r"\[lo, hi\)"),
        ((ptr, n - 1, 0, sp, 2, fused._params(x, seeds, geo, 0, n, 0), 0, 0, 1.0), r"\[lo, hi\)"),
        ((ptr, n, 0, sp, 3, fused._params(x, seeds, geo, 0, n, 0), 0, 0, 1.0), "nseeds"),
    ]
    before = x.clone()
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            ext.fused(*args)
    assert torch.equal(x, before)
    logs, out = torch.full((4,), -0.5, dtype=torch.float64), torch.empty(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="out must hold n"):
        ext.gaps(logs.data_ptr(), 4, -0.1, 0.0, 100.0, out.data_ptr(), 3, 8)
