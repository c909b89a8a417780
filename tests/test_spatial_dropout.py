from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import FLOAT_DTYPES, RANKS, assert_binomial, shape_for
from spatialdrop import SpatialDropout1d, SpatialDropout2d, SpatialDropout3d
from spatialdrop.functional import spatial_dropout

TORCH_FN = {1: F.dropout1d, 2: F.dropout2d, 3: F.dropout3d}
MODULES = {1: SpatialDropout1d, 2: SpatialDropout2d, 3: SpatialDropout3d}


def _grad_of(fn, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = fn(x)
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float32).reshape(y.shape).to(y.dtype)
    y.backward(g)
    return y.detach(), x.grad


# --- drop-in exactness against torch ------------------------------------------------------


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bit_exact_with_torch(rank: int, dtype: torch.dtype, p: float, seed: int) -> None:
    x = torch.randn(shape_for(rank, n=3, c=7), dtype=dtype)
    ours, g_ours = _grad_of(lambda t: spatial_dropout(t, p), x, seed)
    theirs, g_theirs = _grad_of(lambda t: TORCH_FN[rank](t, p), x, seed)
    assert ours.dtype == dtype
    assert torch.equal(ours, theirs)
    assert torch.equal(g_ours, g_theirs)
    # the module gives the same bits as the function
    torch.manual_seed(seed)
    assert torch.equal(MODULES[rank](p)(x), theirs)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("seed", [0, 5])
def test_channels_last_equals_torch_on_moved_axis(rank: int, dtype: torch.dtype, seed: int) -> None:
    x = torch.randn(shape_for(rank, n=3, c=7), dtype=dtype)
    x_last = x.movedim(1, -1).contiguous()
    torch.manual_seed(seed)
    theirs = TORCH_FN[rank](x, 0.4)
    torch.manual_seed(seed)
    ours = spatial_dropout(x_last, 0.4, channel_dim=-1)
    assert torch.equal(ours, theirs.movedim(1, -1))
    torch.manual_seed(seed)
    assert torch.equal(MODULES[rank](0.4, channel_dim=-1)(x_last), ours)


@pytest.mark.parametrize("rank", [1, 3])
def test_unbatched_matches_torch_where_torch_is_right(rank: int) -> None:
    # torch handles unbatched (C, L) in dropout1d and (C, D, H, W) in dropout3d correctly
    x = torch.randn(shape_for(rank, n=1, c=9)[1:])
    torch.manual_seed(3)
    theirs = TORCH_FN[rank](x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(MODULES[rank](0.5)(x), theirs)


def test_unbatched_2d_is_masked_per_channel_unlike_torch() -> None:
    x = torch.ones(16, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        theirs = F.dropout2d(x, 0.5)  # torch reads (C, H, W) as (N, C, L): masks rows
    torch.manual_seed(0)
    ours = SpatialDropout2d(0.5)(x)
    per_channel = ours.reshape(16, -1)
    assert (per_channel.amax(1) == per_channel.amin(1)).all()
    rows = theirs.reshape(16, -1)
    assert not (rows.amax(1) == rows.amin(1)).all()
    torch.manual_seed(0)
    assert torch.equal(ours, spatial_dropout(x.unsqueeze(0), 0.5).squeeze(0))


@pytest.mark.parametrize("rank", RANKS)
def test_p_one_matches_torch(rank: int) -> None:
    x = torch.randn(shape_for(rank))
    x[0, 0] = float("nan")
    ours, theirs = spatial_dropout(x, 1.0), TORCH_FN[rank](x, 1.0)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    assert (ours[1:] == 0).all()


def test_p_one_draws_no_random_numbers() -> None:
    # (p = 0, eval and empty input: tests/test_contract.py)
    x = torch.randn(2, 3, 4, 4)
    state = torch.get_rng_state()
    assert not spatial_dropout(x, 1.0).any()
    assert torch.equal(state, torch.get_rng_state())


def test_random_numbers_drawn_like_torch() -> None:
    x = torch.randn(5, 7, 3, 3)
    torch.manual_seed(0)
    F.dropout2d(x, 0.3)
    after_torch = torch.get_rng_state()
    torch.manual_seed(0)
    spatial_dropout(x, 0.3)
    assert torch.equal(after_torch, torch.get_rng_state())


# --- semantics ---------------------------------------------------------------------------


def test_generator_reproducible_and_global_rng_untouched() -> None:
    x = torch.randn(8, 16, 3, 3)
    state = torch.get_rng_state()
    a = spatial_dropout(x, 0.5, generator=torch.Generator().manual_seed(7))
    b = spatial_dropout(x, 0.5, generator=torch.Generator().manual_seed(7))
    c = spatial_dropout(x, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_inplace_unbatched_module_writes_through_its_view() -> None:
    # (in place in general, leaves and views of leaves: tests/test_contract.py)
    u = torch.ones(6, 5, 5)
    torch.manual_seed(0)
    SpatialDropout2d(0.5, inplace=True)(u)
    assert ((u == 0) | (u == 2)).all()
    assert (u == 0).any()
    assert (u == 2).any()
    leaf = torch.randn(4, 6, 5, 5, requires_grad=True)
    with pytest.raises(ValueError, match=r"spatial_dropout: inplace .* got True with a view of a leaf"):
        SpatialDropout2d(0.5, inplace=True)(leaf[0])  # unbatched: the batch axis makes a view
    assert SpatialDropout2d(0.5, inplace=True).eval()(leaf) is leaf  # eval writes nothing


# --- shapes, layouts, batch sizes --------------------------------------------------------


def test_only_channel_noise_is_saved_for_backward() -> None:
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        spatial_dropout(x, 0.5)
    assert saved == [torch.Size([4, 8, 1, 1])]


# --- statistics --------------------------------------------------------------------------


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_drop_rate_and_structure(rank: int, p: float, channel_dim: int) -> None:
    n, c = 64, 50
    x = torch.ones(shape_for(rank, n=n, c=c, side=3))
    if channel_dim == -1:
        x = x.movedim(1, -1).contiguous()
    y = spatial_dropout(x, p, channel_dim=channel_dim).movedim(channel_dim, 1)
    flat = y.reshape(n, c, -1)
    # every (n, c) slice is all zero or all kept
    assert (flat.amax(-1) == flat.amin(-1)).all()
    scale = torch.tensor(1.0) / (1 - p)  # rounded to float32, as the op does
    assert ((flat == 0) | (flat == scale)).all()
    dropped = int((flat[..., 0] == 0).sum())
    assert_binomial(dropped, n * c, p, "dropped channels")


def test_mean_preserved_in_expectation() -> None:
    # E[y] = x; the sample mean over n*c independent channels of y / x is (kept/total) / (1-p)
    p, n, c = 0.3, 200, 100
    x = torch.full((n, c, 2, 2), 3.0)
    y = spatial_dropout(x, p)
    kept = int((y[:, :, 0, 0] != 0).sum())
    assert_binomial(kept, n * c, 1 - p, "kept channels")
    assert torch.allclose(y[y != 0], torch.tensor(3.0 / 0.7))
