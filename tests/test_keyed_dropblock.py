"""The keyed DropBlock seed rule (spatialdrop._dropblock.keyed_seeds): exact, integer-only, per sample."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import spatialdrop as sd
from conftest import assert_binomial
from spatialdrop import MaskKey
from spatialdrop._dropblock.keyed_seeds import DOMAIN, chunk_length, draw_keyed_seeds, rule_key, seed_rule
from spatialdrop._philox import MASK32, philox4x32_int
from spatialdrop.functional import drop_block
from spatialdrop.keyed import _layer_key

CPU = torch.device("cpu")
GAMMAS = [1e-9, 0.0004, 0.002, 0.03, 0.2, 0.7, 0.999]


def _reference(row: int, gamma: float, key: MaskKey) -> list[list[int]]:
    """The rule as the module docstring states it, on Python ints: seed places per sample."""
    q_log = math.log1p(-gamma)
    _, e = math.frexp(4.0 / gamma)
    k = 1 << min(10, max(2, e - 1))
    thresholds = [round(2.0**32 * -math.expm1(g * q_log)) for g in range(1, k + 1)]
    k0, k1 = _layer_key(key.seed, key.layer)
    w0, w1 = philox4x32_int(DOMAIN, 0, 0, 0, k0, k1)[:2]
    step = int(key.step) & MASK32
    out = []
    for sid in key.sample_ids.tolist():
        sid &= (1 << 64) - 1
        seeds = []
        for c in range((row + k - 1) // k):
            x, d = -1, 0
            while d < k:
                j = c * k + d
                w = philox4x32_int(j // 4, sid & MASK32, sid >> 32, step, w0, w1)[j % 4]
                x += 1 + sum(w >= t for t in thresholds)
                if x >= k:
                    break
                if c * k + x < row:
                    seeds.append(c * k + x)
                d += 1
        out.append(seeds)
    return out


@pytest.mark.parametrize("gamma", [0.002, 0.05, 0.4, 0.95])
def test_dense_grid_follows_the_documented_rule(gamma: float) -> None:
    key = MaskKey(11, 3, 2**63 + 5, torch.tensor([0, -1, 2**40 + 7]))
    row = 2100 if gamma < 0.01 else 300
    dense = draw_keyed_seeds(3 * row, gamma, key, CPU, dense=True).view(3, row)
    for i, seeds in enumerate(_reference(row, gamma, key)):
        assert dense[i].nonzero().squeeze(1).tolist() == seeds


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize(("n", "row"), [(1, 1), (3, 5), (2, 31), (4, 33), (2, 1000), (3, 4097), (1, 20000)])
def test_sparse_equals_dense(gamma: float, n: int, row: int) -> None:
    ids = torch.tensor([5, -3, 2**33 + 1, 0])[:n]
    for step in (0, torch.tensor(2**32 + 9)):
        key = MaskKey(7, step, 12, ids)
        dense = draw_keyed_seeds(n * row, gamma, key, CPU, dense=True)
        sparse = draw_keyed_seeds(n * row, gamma, key, CPU, dense=False)
        assert dense.shape == (n * row,)
        assert dense.dtype == torch.bool
        assert sparse.dtype == torch.int64
        assert torch.equal(dense.nonzero().squeeze(1), sparse)


def test_zero_rate_and_empty_grids() -> None:
    key = MaskKey(1, 0, 2, torch.arange(3))
    assert draw_keyed_seeds(30, 0.0, key, CPU, dense=False).numel() == 0
    assert not draw_keyed_seeds(30, 0.0, key, CPU, dense=True).any()
    assert draw_keyed_seeds(0, 0.5, key, CPU, dense=True).shape == (0,)
    assert draw_keyed_seeds(0, 0.5, key, CPU, dense=False).shape == (0,)


def test_thresholds_and_chunk_length() -> None:
    assert [chunk_length(g) for g in (0.9, 0.5, 0.1, 0.01, 0.002, 1e-6)] == [4, 8, 32, 256, 1024, 1024]
    for gamma in GAMMAS:
        t = seed_rule(gamma).thresholds
        assert len(t) == seed_rule(gamma).chunk
        assert all(a <= b for a, b in itertools.pairwise(t))
        assert 0 <= t[0] <= t[-1] <= 2**32
        assert abs(t[0] - gamma * 2**32) <= 0.5  # T[1] is the rate itself


@pytest.mark.parametrize("gamma", [0.002, 0.05, 0.3])
def test_every_place_is_bernoulli_gamma(gamma: float) -> None:
    # places at chunk starts, ends and inside, and the last place of a row cut inside a chunk
    k = chunk_length(gamma)
    row = 2 * k + 7
    n = 40000 if gamma < 0.01 else 6000
    key = MaskKey(3, 1, 4, torch.arange(n))
    seeds = draw_keyed_seeds(n * row, gamma, key, CPU, dense=False)
    count = torch.bincount(seeds % row, minlength=row)
    for t in sorted({0, 1, k - 1, k, k + 1, 2 * k - 1, 2 * k, row - 1}):
        assert_binomial(int(count[t]), n, gamma, f"place {t}")
    # independence: pairs of neighbours, inside a chunk and across a chunk border
    with_next = seeds[torch.isin(seeds + 1, seeds)] % row
    for t in (0, k - 1, k + 2):
        both = int((with_next == t).sum())
        assert_binomial(both, n, gamma * gamma, f"places {t}, {t + 1}", alpha=1e-4)


def test_whole_grid_rate_and_seed_count_spread() -> None:
    gamma = 0.002
    key = MaskKey(9, 9, 9, torch.arange(64))
    seeds = draw_keyed_seeds(64 * 50000, gamma, key, CPU, dense=False)
    assert_binomial(seeds.numel(), 64 * 50000, gamma, "seeds")
    per_row = torch.bincount(seeds // 50000, minlength=64).double()
    assert 0.5 < per_row.var().item() / (50000 * gamma) < 1.6  # binomial spread, not clumped


def test_row_depends_only_on_its_sample() -> None:
    ids = torch.tensor([10, 3, 2**35, -8, 77])
    row, gamma = 3000, 0.01
    full = draw_keyed_seeds(5 * row, gamma, MaskKey(1, 2, 3, ids), CPU, dense=True).view(5, row)
    perm = torch.tensor([4, 2, 0, 3, 1])
    shuffled = draw_keyed_seeds(5 * row, gamma, MaskKey(1, 2, 3, ids[perm]), CPU, dense=True).view(5, row)
    assert torch.equal(shuffled, full[perm])
    for split in ([0, 1], [2], [3, 4]):
        part = draw_keyed_seeds(len(split) * row, gamma, MaskKey(1, 2, 3, ids[split]), CPU, dense=False)
        expected = full[split].reshape(-1).nonzero().squeeze(1)
        assert torch.equal(part, expected)
    # and on the seed, the step and the layer
    for other in (MaskKey(2, 2, 3, ids), MaskKey(1, 3, 3, ids), MaskKey(1, 2, 4, ids)):
        assert not torch.equal(draw_keyed_seeds(5 * row, gamma, other, CPU, dense=True).view(5, row), full)


def test_rule_key_separates_the_stream_from_keyed_uniform() -> None:
    key = MaskKey(1, 0, 2, torch.arange(1))
    assert rule_key(key) != _layer_key(1, 2)
    assert rule_key(key) == philox4x32_int(DOMAIN, 0, 0, 0, *_layer_key(1, 2))[:2]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_keyed_drop_block_rate_at_corners_edges_centre(shared: bool, channel_dim: int) -> None:
    n, c, side, p = 1500, 4, 7, 0.2
    shape = (n, c, side, side) if channel_dim == 1 else (n, side, side, c)
    key = MaskKey(5, 0, 6, torch.arange(n))
    y = drop_block(torch.ones(shape), p, 3, channel_dim=channel_dim, shared_channels=shared, key=key)
    dropped = (y == 0).movedim(channel_dim, 1)
    trials = n if shared else n * c
    maps = dropped[:, 0] if shared else dropped.reshape(n * c, side, side)
    for where, (i, j) in {"corner": (0, 0), "edge": (0, 3), "centre": (3, 3), "far corner": (6, 6)}.items():
        assert_binomial(int(maps[:, i, j].sum()), trials, p, where)
    if shared:
        assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))


@pytest.mark.parametrize("shared", [False, True])
def test_keyed_drop_block_same_on_any_batch_split(shared: bool) -> None:
    x = torch.randn(6, 3, 11, 9)
    ids = torch.arange(100, 106)
    whole = drop_block(x, 0.3, (3, 2), shared_channels=shared, key=MaskKey(4, 8, 15, ids))
    for lo, hi in ((0, 1), (1, 4), (4, 6)):
        part = drop_block(x[lo:hi], 0.3, (3, 2), shared_channels=shared, key=MaskKey(4, 8, 15, ids[lo:hi]))
        assert torch.equal(part, whole[lo:hi])


@pytest.mark.parametrize("shared", [False, True])
def test_keyed_seed_grid_past_2_34_places_names_block_size_and_the_input(shared: bool) -> None:
    """A sample's keyed seed grid of more than 2**34 places is refused by the public function, naming
    ``block_size`` and the input's size (not the internal ``draw_keyed_seeds``), for the module too."""
    x = torch.ones(2, 3, 4, 4)
    block = (2**17, 2**17)  # (4 + 2**17 - 1) ** 2 > 2**34 places per map
    key = sd.MaskKey(1, 2, 3, torch.arange(2))
    pattern = (
        r"^drop_block: block_size must be small enough, for an input of size \(2, 3, 4, 4\), that a "
        r"sample's keyed seed grid .* has at most 2\*\*34 places; it would have \d+, got \(131072, 131072\)$"
    )
    with pytest.raises(ValueError, match=pattern):
        sd.functional.drop_block(x, 0.1, block, shared_channels=shared, key=key)
    m = sd.keyed_masks(sd.DropBlock2d(0.1, block, shared_channels=shared), 1)
    with pytest.raises(ValueError, match=pattern), sd.mask_context(step=2, sample_ids=torch.arange(2)):
        m(x)
