from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch

from conftest import ALPHA, RANKS, assert_binomial, binom_bounds, shape_for
from spatialdrop import DropBlock, DropBlock1d, DropBlock2d, DropBlock3d, MaskKey
from spatialdrop._dropblock import calibration, fused, geometry
from spatialdrop._dropblock import sampling as seed_draws
from spatialdrop._dropblock.geometry import Geometry
from spatialdrop._dropblock.ops import Path
from spatialdrop.functional import drop_block

MODULES = {1: DropBlock1d, 2: DropBlock2d, 3: DropBlock3d}
SCALES = ["expected", "realized", "none"]


# --- references ----------------------------------------------------------------------------


def grid_shape(sizes: tuple[int, ...], blocks: tuple[int, ...], seeding: str) -> tuple[int, ...]:
    if seeding == "uniform":
        return tuple(s + b - 1 for s, b in zip(sizes, blocks))
    return tuple(s - b + 1 for s, b in zip(sizes, blocks))


def loop_reference(
    seeds: torch.Tensor, sizes: tuple[int, ...], blocks: tuple[int, ...], seeding: str
) -> torch.Tensor:
    """Slow reference: the bool mask of dropped positions grown from a bool seed grid (maps, *grid).

    Uniform seeding: the seed at grid index j drops [j - b + 1, j] ∩ [0, L) per dim; valid seeding:
    the seed at j drops the whole block [j, j + b - 1].
    """
    dropped = torch.zeros((seeds.shape[0], *sizes), dtype=torch.bool)
    for m, *js in seeds.nonzero().tolist():
        ranges = []
        for j, size, b in zip(js, sizes, blocks):
            start = j - b + 1 if seeding == "uniform" else j
            ranges.append([i for i in range(start, start + b) if 0 <= i < size])
        for pos in itertools.product(*ranges):
            dropped[(m, *pos)] = True
    return dropped


def expected_scale(p: float) -> float:
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def patch_seeds(monkeypatch: pytest.MonkeyPatch, grid: torch.Tensor) -> None:
    """Make drop_block use the given bool seed grid (maps, *grid) instead of random seeds."""

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
        assert numel == grid.numel()
        flat = grid.reshape(-1)
        return flat.clone() if dense else flat.nonzero().squeeze(1)

    monkeypatch.setattr(seed_draws, "draw_grid", fake)


def valid_rates(sizes: tuple[int, ...], blocks: tuple[int, ...], gamma: float) -> torch.Tensor:
    """Exact per-position drop probability under valid seeding, by counting covering seeds."""
    per_dim = []
    for size, b in zip(sizes, blocks):
        counts = [sum(1 for j in range(size - b + 1) if j <= i <= j + b - 1) for i in range(size)]
        per_dim.append(torch.tensor(counts, dtype=torch.float64))
    cover = per_dim[0]
    for c in per_dim[1:]:
        cover = cover.unsqueeze(-1) * c
    return 1.0 - (1.0 - gamma) ** cover


def dropped_counts(
    sizes: tuple[int, ...],
    blocks: object,
    p: float,
    maps: int,
    seed: int,
    keyed: bool = False,
    **kwargs: object,
) -> torch.Tensor:
    """Per position, how many of ``maps`` independent maps (8 channels per sample) dropped it.

    With ``keyed`` the masks come from a keyed generator (sample ids 0 .. maps / 8 - 1).
    """
    x = torch.ones(maps // 8, 8, *sizes)
    if keyed:
        kwargs["key"] = MaskKey(seed, 1, 2, torch.arange(maps // 8))
    else:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    y = drop_block(x, p, blocks, **kwargs)
    return (y == 0).reshape(-1, *sizes).sum(0)


def assert_mean_rate(
    counts: torch.Tensor, maps: int, rates: torch.Tensor, blocks: tuple[int, ...], what: str
) -> None:
    """Check the total number of dropped (map, position) pairs with an honest bound.

    Positions are correlated (neighbours share seeds), so the total is not binomial. Positions
    whose coordinates agree modulo the block sides are at least a block apart in some dim, so
    the seed places that can drop them are disjoint and they are independent: the count over
    one such coset is a sum of independent Bernoulli trials, binomial under uniform seeding and
    Poisson-binomial under valid seeding, whose tails are no heavier than the binomial with the
    same mean (Hoeffding 1956). Bound each of the (at most prod(b)) cosets at ALPHA / #cosets
    and add the bounds: the total falls outside with probability at most ALPHA (Bonferroni).
    """
    cosets = list(itertools.product(*[range(min(b, s)) for b, s in zip(blocks, counts.shape)]))
    lo = hi = 0
    for start in cosets:
        sl = tuple(slice(r, None, b) for r, b in zip(start, blocks))
        n = counts[sl].numel() * maps
        coset_lo, coset_hi = binom_bounds(n, float(rates[sl].double().mean()), ALPHA / len(cosets))
        lo, hi = lo + coset_lo, hi + coset_hi
    total = int(counts.sum())
    mean = total / (counts.numel() * maps)
    assert lo <= total <= hi, f"{what}: mean rate {mean:.4f}, allowed [{lo}, {hi}] of {counts.numel() * maps}"


def probe_positions(sizes: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    corner = (0,) * len(sizes)
    far = tuple(s - 1 for s in sizes)
    centre = tuple(s // 2 for s in sizes)
    edge = (0, *centre[1:]) if len(sizes) > 1 else far
    return {"corner": corner, "far corner": far, "edge": edge, "centre": centre}


# --- structure: the growers against the loop reference -------------------------------------

STRUCTURE_CASES = [
    ((9,), (3,)),
    ((9,), (4,)),
    ((3,), (7,)),  # block larger than the map
    ((7, 8), (3, 3)),
    ((6, 9), (2, 4)),  # even, rectangular
    ((3, 4), (5, 6)),  # larger than the map
    ((5, 5), (1, 1)),
    ((5, 6, 4), (3, 2, 1)),
    ((4, 4, 4), (2, 2, 2)),
    ((3, 2, 4), (4, 3, 5)),  # larger than the map
]
VALID_CASES = [(s, b) for s, b in STRUCTURE_CASES if all(bi <= si for bi, si in zip(b, s))]


@pytest.mark.parametrize(
    ("sizes", "blocks", "seeding"),
    [(s, b, "uniform") for s, b in STRUCTURE_CASES] + [(s, b, "valid") for s, b in VALID_CASES],
)
def test_growers_match_loop_reference(sizes: tuple[int, ...], blocks: tuple[int, ...], seeding: str) -> None:
    maps = 5
    grid = grid_shape(sizes, blocks, seeding)
    seeds = torch.rand((maps, *grid), generator=torch.Generator().manual_seed(0)) < 0.08
    assert seeds.any()
    ref = loop_reference(seeds, sizes, blocks, seeding)
    geo = Geometry((maps, 1, *sizes), 1, blocks, False, seeding)
    assert geo.grid == grid
    # dense grower (the static-shape path)
    assert torch.equal(geometry.grow_blocks(seeds, geo), ref)
    # sparse painter (the CPU path), on a transposed layout to exercise the strides
    mask = torch.zeros((maps, *sizes), dtype=torch.bool).transpose(0, -1).contiguous().transpose(0, -1)
    flat = seeds.reshape(-1).nonzero().squeeze(1)
    geometry.paint_blocks(mask, True, flat, geo)
    assert torch.equal(mask, ref)


@pytest.mark.parametrize(("sizes", "blocks"), STRUCTURE_CASES)
def test_element_by_element_fallback_writes_the_same(
    monkeypatch: pytest.MonkeyPatch, sizes: tuple[int, ...], blocks: tuple[int, ...]
) -> None:
    # the path taken if a torch version refused index_fill_ through overlapping window views
    x = torch.randn(3, 4, *sizes)
    torch.manual_seed(3)
    windows = drop_block(x, 0.3, blocks)
    monkeypatch.setattr(geometry, "_window_views", False)
    torch.manual_seed(3)
    assert torch.equal(drop_block(x, 0.3, blocks), windows)
    assert (windows == 0).any()


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("seeding", ["uniform", "valid"])
@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("dense", [False, True])
def test_output_is_input_times_reference_mask(
    monkeypatch: pytest.MonkeyPatch,
    dropblock_path: Callable[..., None],
    rank: int,
    shared: bool,
    seeding: str,
    channel_dim: int,
    dense: bool,
) -> None:
    n, c, p = 3, 4, 0.2
    sizes, blocks = (7, 6, 5)[:rank], (3, 2, 4)[:rank]
    seeds = torch.rand((n if shared else n * c, *grid_shape(sizes, blocks, seeding))) < 0.05
    patch_seeds(monkeypatch, seeds)
    if dense:
        dropblock_path(Path.DENSE)
    ref = loop_reference(seeds, sizes, blocks, seeding).reshape(n, 1 if shared else c, *sizes)
    x = torch.randn(n, c, *sizes)
    expected = torch.where(ref, torch.zeros(()), x * expected_scale(p))
    moved = x.movedim(1, -1).contiguous() if channel_dim == -1 else x
    y = drop_block(moved, p, blocks, channel_dim=channel_dim, shared_channels=shared, seeding=seeding)
    assert torch.equal(y.movedim(channel_dim, 1), expected)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dense", [False, True])
def test_realized_scale_per_sample_and_all_dropped_sample(
    monkeypatch: pytest.MonkeyPatch, dropblock_path: Callable[..., None], shared: bool, dense: bool
) -> None:
    n, c, sizes, blocks = 3, 2, (6, 5), (2, 3)
    seeds = torch.rand((n if shared else n * c, *grid_shape(sizes, blocks, "uniform"))) < 0.1
    seeds[: 1 if shared else c] = True  # sample 0 loses every position
    patch_seeds(monkeypatch, seeds)
    if dense:
        dropblock_path(Path.DENSE)
    ref = loop_reference(seeds, sizes, blocks, "uniform").reshape(n, 1 if shared else c, *sizes)
    x = torch.randn(n, c, *sizes)
    y = drop_block(x, 0.3, blocks, shared_channels=shared, scale="realized")
    assert torch.equal(y[0], torch.zeros_like(y[0]))  # nothing kept: zeros, not nan
    keep = (~ref).expand(n, c, *sizes)
    for i in (1, 2):
        kept = int(keep[i].sum())
        factor = torch.tensor(keep[i].numel(), dtype=torch.float32) / kept
        assert torch.allclose(y[i], torch.where(keep[i], x[i] * factor, torch.zeros(())), rtol=1e-6, atol=0)
        assert int((y[i] != 0).sum()) == kept


# --- calibration ---------------------------------------------------------------------------

CAL_MAPS = 4000


def calibration_sizes(rank: int, block: int) -> list[tuple[int, ...]]:
    small = max(1, block - 1)
    if rank == 1:
        return [(max(1, block - 2),), (23,), (56,)]
    if rank == 2:
        return [(small, max(1, block - 3)), (14, 9), (56, 56)]
    return [(small, 2, max(1, block - 2)), (7, 9, 8), (56, 5, 6)]


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("block", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5])
@pytest.mark.parametrize("keyed", [False, True])
def test_uniform_seeding_drops_every_position_with_probability_p(
    rank: int, block: int, p: float, keyed: bool
) -> None:
    # every position is dropped in one map with probability exactly p, independently across
    # maps: the count at one position over CAL_MAPS maps is Binomial(CAL_MAPS, p)
    for i, sizes in enumerate(calibration_sizes(rank, block)):
        blocks = (block,) * rank
        counts = dropped_counts(sizes, block, p, CAL_MAPS, seed=1000 * rank + 10 * block + i, keyed=keyed)
        what = f"rank {rank}, map {sizes}, block {block}, p {p}"
        for name, pos in probe_positions(sizes).items():
            assert_binomial(int(counts[pos]), CAL_MAPS, p, f"{what}, {name}")
        assert_mean_rate(counts, CAL_MAPS, torch.full(sizes, p), blocks, f"{what}, mean")


@pytest.mark.parametrize(
    ("sizes", "blocks"),
    [
        ((56,), (7,)),
        ((13,), (13,)),
        ((14, 14), (5, 5)),
        ((28, 28), (7, 7)),
        ((9, 7), (2, 6)),
        ((8, 9, 10), (3, 3, 3)),
    ],
)
@pytest.mark.parametrize("p", [0.1, 0.3])
@pytest.mark.parametrize("keyed", [False, True])
def test_valid_seeding_mean_rate_is_p(
    sizes: tuple[int, ...], blocks: tuple[int, ...], p: float, keyed: bool
) -> None:
    gamma = calibration.valid_gamma(p, sizes, blocks)
    rates = valid_rates(sizes, blocks, gamma)
    assert abs(float(rates.mean()) - p) < 1e-9  # the solver, checked by brute force
    counts = dropped_counts(sizes, blocks, p, CAL_MAPS, seed=7, keyed=keyed, seeding="valid")
    assert_mean_rate(counts, CAL_MAPS, rates, blocks, f"valid {sizes} {blocks} p {p}")
    # each position at its own (uneven, by nature of the placement) exact rate
    for name, pos in probe_positions(sizes).items():
        assert_binomial(int(counts[pos]), CAL_MAPS, float(rates[pos]), f"valid {name}")
    if 1 < blocks[0] < sizes[0]:  # border positions are covered by fewer placements
        assert float(rates[(0,) * len(sizes)]) < p < float(rates.max())


def test_block_size_one_is_elementwise_dropout() -> None:
    p, maps, size = 0.3, 4000, 20
    x = torch.ones(maps // 8, 8, size)
    dropped = drop_block(x, p, 1, generator=torch.Generator().manual_seed(3)).reshape(maps, size) == 0
    for pos in (0, 7, size - 1):
        assert_binomial(int(dropped[:, pos].sum()), maps, p, f"position {pos}")
    # disjoint pairs of neighbours are independent: both dropped with probability p ** 2
    both = int((dropped[:, 0::2] & dropped[:, 1::2]).sum())
    assert_binomial(both, maps * size // 2, p * p, "both neighbours dropped")
    assert calibration.uniform_gamma(p, (1,)) == pytest.approx(p, rel=1e-15)


def test_blocks_make_neighbours_correlated() -> None:
    # with blocks, a neighbour of a dropped position is dropped far more often than p
    maps, p = 4000, 0.1
    x = torch.ones(maps // 8, 8, 30)
    dropped = drop_block(x, p, 5, generator=torch.Generator().manual_seed(4)).reshape(maps, 30) == 0
    both = int((dropped[:, 10] & dropped[:, 11]).sum())
    assert both > 0.5 * int(dropped[:, 10].sum())


def test_shared_channels_one_mask_per_sample_at_rate_p() -> None:
    n, c, p = 3000, 5, 0.3
    y = drop_block(
        torch.ones(n, c, 9, 9), p, 3, shared_channels=True, generator=torch.Generator().manual_seed(5)
    )
    assert (y == y[:, :1]).all()
    dropped = y[:, 0] == 0
    for name, pos in probe_positions((9, 9)).items():
        assert_binomial(int(dropped[(slice(None), *pos)].sum()), n, p, name)


def test_dense_path_rate(dropblock_path: Callable[..., None]) -> None:
    dropblock_path(Path.DENSE)
    sizes, p = (10, 12), 0.3
    counts = dropped_counts(sizes, (4, 3), p, CAL_MAPS, seed=9)
    for name, pos in probe_positions(sizes).items():
        assert_binomial(int(counts[pos]), CAL_MAPS, p, f"dense {name}")
    assert_mean_rate(counts, CAL_MAPS, torch.full(sizes, p), (4, 3), "dense mean")


def test_sparse_draw_is_a_bernoulli_sequence() -> None:
    numel, gamma = 200_000, 0.003
    g = torch.Generator().manual_seed(11)
    seeds = seed_draws.draw_grid(numel, gamma, g, torch.device("cpu"), dense=False)
    assert seeds.dtype == torch.int64
    assert bool((seeds.diff() > 0).all())
    assert int(seeds.min()) >= 0
    assert int(seeds.max()) < numel
    assert_binomial(seeds.numel(), numel, gamma, "seeds")
    # the first and last places get seeds at the same rate as the others (no edge artefact)
    hits = torch.zeros(4)
    for trial in range(3000):
        g_trial = torch.Generator().manual_seed(trial)
        s = seed_draws.draw_grid(4, 0.2, g_trial, torch.device("cpu"), dense=False)
        hits[s] += 1
    for i in range(4):
        assert_binomial(int(hits[i]), 3000, 0.2, f"place {i}")
    # the top-up loop (a short first batch) keeps it exact: many seeds in a tiny grid
    many = seed_draws.draw_grid(50, 0.9, g, torch.device("cpu"), dense=False)
    assert many.unique().numel() == many.numel()


def test_keyed_sparse_draw_is_a_bernoulli_sequence_per_sample() -> None:
    n, row, gamma = 50, 4000, 0.003
    key = MaskKey(5, 0, 1, torch.arange(n))
    seeds = seed_draws.draw_grid(n * row, gamma, None, torch.device("cpu"), dense=False, key=key)
    assert bool((seeds.diff() > 0).all())
    assert int(seeds.min()) >= 0
    assert int(seeds.max()) < n * row
    assert_binomial(seeds.numel(), n * row, gamma, "keyed seeds")
    # each sample's seeds depend only on its id: a batch of one gives the same row
    alone = seed_draws.draw_grid(
        row, gamma, None, torch.device("cpu"), dense=False, key=key._replace(sample_ids=torch.tensor([7]))
    )
    assert torch.equal(alone, seeds[(seeds >= 7 * row) & (seeds < 8 * row)] - 7 * row)
    # first and last places of a row get seeds at the same rate; the top-up loop stays exact
    hits = torch.zeros(4)
    many = MaskKey(6, 0, 1, torch.arange(3000))
    s = seed_draws.draw_grid(4 * 3000, 0.2, None, torch.device("cpu"), dense=False, key=many)
    hits.index_add_(0, s % 4, torch.ones(s.numel()))
    for i in range(4):
        assert_binomial(int(hits[i]), 3000, 0.2, f"keyed place {i}")
    dense = seed_draws.draw_grid(4 * 3000, 0.2, None, torch.device("cpu"), dense=True, key=many)
    assert_binomial(int(dense.sum()), 4 * 3000, 0.2, "keyed dense places")


# --- gradients, memory, dtypes -------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("p", "block"), [(0.1, 7), (0.5, 7), (0.5, 1)])
def test_saved_for_backward_is_small_and_gradient_exact(
    shared: bool, scale: str, p: float, block: int
) -> None:
    x = torch.randn(8, 64, 28, 28, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = drop_block(x, p, block, shared_channels=shared, scale=scale)
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    plan = [t for t in saved if t.dtype == torch.int32]
    # per channel, the fused pass (float32, not the realized scale) keeps its seeds (int32 grid
    # indices, fewer than the plan's runs); the torch ops keep their write plan (offsets of
    # dropped runs); either only when it takes at most 1/32 of the input's bytes
    seeds_kept = (fused.extension() is not None) and scale != "realized" and block == 7
    if not shared and ((p, block) == (0.1, 7) or seeds_kept):
        assert [t.dim() for t in plan] == [1]
        assert 0 < nbytes <= x.numel() * x.element_size() / 32 + 256
    else:  # nothing of per-element size: backward re-creates the mask from one int64 seed
        assert all(t.numel() == 0 for t in plan)
        assert nbytes <= 256
    g = torch.randn_like(y)
    y.backward(g)
    keep = y.detach() != 0
    if scale == "realized":
        factor = (keep[0].numel() / keep.reshape(8, -1).sum(1).float()).view(-1, 1, 1, 1)
    else:
        factor = torch.tensor(expected_scale(p) if scale == "expected" else 1.0)
    assert torch.allclose(x.grad, g * keep * factor, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale", ["expected", "realized"])
@pytest.mark.parametrize("shared", [False, True])
def test_float16_large_input_is_finite_and_exact(scale: str, shared: bool) -> None:
    x = (torch.randn(16, 64, 56, 56) * 100).half()  # 3.2 million elements: sums would overflow fp16
    torch.manual_seed(2)
    y = drop_block(x, 0.1, 7, scale=scale, shared_channels=shared)
    assert y.dtype == torch.float16
    assert bool(y.isfinite().all())
    keep = y != 0
    assert 0.85 < float(keep.float().mean()) < 0.95
    if scale == "expected":
        factor = torch.tensor(expected_scale(0.1))
    else:
        factor = (keep[0].numel() / keep.reshape(16, -1).sum(1).float()).view(-1, 1, 1, 1)
    # the product is formed in float32 and rounded once
    assert torch.equal(y, torch.where(keep, (x.float() * factor).half(), torch.zeros((), dtype=torch.half)))


# --- the usual menu: shapes, layouts, arguments, modes -------------------------------------


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_unbatched_equals_batched_of_one(rank: int, channel_dim: int) -> None:
    x = torch.randn(shape_for(rank, n=1, c=3, side=6))
    if channel_dim == -1:
        x = x.movedim(1, -1).contiguous()
    m = MODULES[rank](0.3, 2, channel_dim=channel_dim)
    torch.manual_seed(8)
    a = m(x[0])
    torch.manual_seed(8)
    b = m(x)
    assert a.shape == x.shape[1:]
    assert torch.equal(a, b[0])


def test_rank_free_module_any_rank() -> None:
    x = torch.ones(2, 3, 5, 6, 4, 3)
    y = DropBlock(0.3, (2, 3, 2, 1))(x)
    assert y.shape == x.shape
    with pytest.raises(ValueError, match=r"DropBlock: input must be a tensor with at least 3 dims"):
        DropBlock(0.1)(torch.ones(3, 4))
    with pytest.raises(
        ValueError, match=r"drop_block: block_size must be .* tuple of 4 positive ints, got \(2, 3\)"
    ):
        DropBlock(0.1, (2, 3))(x)


def test_generator_reproducible_and_global_rng_untouched() -> None:
    x = torch.randn(8, 16, 10, 10)
    state = torch.get_rng_state()
    a = drop_block(x, 0.2, 3, generator=torch.Generator().manual_seed(7))
    b = drop_block(x, 0.2, 3, generator=torch.Generator().manual_seed(7))
    c = drop_block(x, 0.2, 3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kwargs", [{}, {"seeding": "valid", "scale": "realized", "shared_channels": True}])
@pytest.mark.parametrize("static", [False, True])
def test_torch_compile_fullgraph_matches_eager(
    dropblock_path: Callable[..., None], kwargs: dict, static: bool
) -> None:
    # the sparse path is one opaque op: compiled code runs it as is; the static-shape path is
    # traced. With the compiler's RNG replaced by torch's, both match eager bit for bit.
    import torch._inductor.config as inductor_config

    dropblock_path(Path.DENSE if static else None)
    x = torch.randn(4, 6, 9, 9, requires_grad=True)
    m = DropBlock2d(0.3, 3, **kwargs)
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(m, fullgraph=True)
        torch.manual_seed(0)
        a = compiled(x)
    a.sum().backward()
    torch._dynamo.reset()
    torch.manual_seed(0)
    b = m(x)
    assert torch.equal(a, b)
    assert (a == 0).any()
    assert (a != 0).any()
    assert torch.allclose(x.grad, torch.ones_like(x) * (a.detach() / x.detach()))
