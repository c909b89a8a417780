from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from conftest import ALPHA, FLOAT_DTYPES, RANKS, assert_binomial, shape_for
from spatialdrop import (
    AlphaSpatialDropout1d,
    AlphaSpatialDropout2d,
    AlphaSpatialDropout3d,
)
from spatialdrop.alpha import SELU_NEG_SATURATION
from spatialdrop.functional import alpha_spatial_dropout

MODULES = {1: AlphaSpatialDropout1d, 2: AlphaSpatialDropout2d, 3: AlphaSpatialDropout3d}
Z = stats.norm.isf(ALPHA / 2)  # two-sided normal bound at the suite's false-alarm level


def affine(p: float) -> tuple[float, float, float]:
    """Klambauer et al.'s a, b and the dropped value, from the paper's formulas (alpha' < 0)."""
    alpha_prime = SELU_NEG_SATURATION
    q = 1 - p
    a = (q + alpha_prime**2 * q * (1 - q)) ** -0.5
    b = -a * (1 - q) * alpha_prime
    return a, b, a * alpha_prime + b


def _grad_of(fn, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = fn(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
    return y.detach(), x.grad


# --- drop-in exactness against torch -----------------------------------------------------


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_bit_exact_with_torch_feature_alpha_dropout(
    rank: int, dtype: torch.dtype, p: float, seed: int
) -> None:
    x = torch.randn(shape_for(rank, n=3, c=7), dtype=dtype)
    ours, g_ours = _grad_of(lambda t: alpha_spatial_dropout(t, p), x, seed)
    after = torch.get_rng_state()
    theirs, g_theirs = _grad_of(lambda t: F.feature_alpha_dropout(t, p, True), x, seed)
    assert torch.equal(after, torch.get_rng_state())
    assert ours.dtype == dtype
    assert torch.equal(ours, theirs)
    assert torch.equal(g_ours, g_theirs)
    torch.manual_seed(seed)
    assert torch.equal(MODULES[rank](p)(x), theirs)
    torch.manual_seed(seed)
    assert torch.equal(torch.nn.FeatureAlphaDropout(p)(x), theirs)


@pytest.mark.parametrize("rank", RANKS)
def test_channels_last_equals_torch_on_moved_axis(rank: int) -> None:
    x = torch.randn(shape_for(rank, n=3, c=7))
    torch.manual_seed(5)
    theirs = F.feature_alpha_dropout(x, 0.3, True)
    torch.manual_seed(5)
    ours = alpha_spatial_dropout(x.movedim(1, -1).contiguous(), 0.3, channel_dim=-1)
    assert torch.equal(ours, theirs.movedim(1, -1))
    torch.manual_seed(5)
    assert torch.equal(MODULES[rank](0.3, channel_dim=-1)(x.movedim(1, -1)), ours)


@pytest.mark.parametrize("rank", RANKS)
def test_unbatched_is_masked_per_channel_unlike_torch(rank: int) -> None:
    c = 16
    x = torch.zeros(shape_for(rank, n=1, c=c, side=6)[1:])
    torch.manual_seed(0)
    ours = MODULES[rank](0.5)(x)
    per_channel = ours.reshape(c, -1)
    assert (per_channel.amax(1) == per_channel.amin(1)).all()
    torch.manual_seed(0)
    assert torch.equal(ours, alpha_spatial_dropout(x.unsqueeze(0), 0.5).squeeze(0))
    # torch reads (C, *spatial) as (N, C', ...): it masks rows (or single values), not channels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        theirs = torch.nn.FeatureAlphaDropout(0.5)(x).reshape(c, -1)
    assert not (theirs.amax(1) == theirs.amin(1)).all()


def test_inplace_matches_torch() -> None:
    x = torch.randn(4, 6, 5)
    a, b = x.clone(), x.clone()
    torch.manual_seed(2)
    out = alpha_spatial_dropout(a, 0.4, inplace=True)
    torch.manual_seed(2)
    F.feature_alpha_dropout(b, 0.4, True, inplace=True)
    assert out.data_ptr() == a.data_ptr()
    assert torch.equal(a, b)
    u = torch.zeros(6, 5, 5)
    AlphaSpatialDropout2d(0.5, inplace=True)(u)
    assert not (u == 0).all()  # written through the unbatched view


# --- semantics ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_values_are_the_papers_affine_map(p: float) -> None:
    a, b, dropped_value = affine(p)
    x = torch.randn(64, 20, 3, 3, dtype=torch.float64)
    y = alpha_spatial_dropout(x, p)
    dropped = (y == y[..., :1, :1]).reshape(64, 20, -1).all(-1)  # a dropped channel is constant
    assert torch.allclose(y[dropped], torch.tensor(dropped_value, dtype=torch.float64), rtol=1e-14, atol=0)
    assert torch.allclose(y[~dropped], a * x[~dropped] + b, rtol=1e-14, atol=1e-14)
    assert dropped_value == pytest.approx(SELU_NEG_SATURATION * a * (1 - p), rel=1e-14)


# --- statistics --------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_selu_normalised_input_keeps_mean_zero_variance_one(p: float, channel_dim: int) -> None:
    # SELU of N(0, 1) input has mean 0 and variance 1 (its fixed point; 0 and 1 to 1e-15 by
    # quadrature). The N*C channels are i.i.d.; within a channel the values share the mask, so
    # the statistics are averaged per channel first and the bound uses the spread of the
    # channel averages: CLT over n*c = 32000 channels, Z standard errors (two-sided ALPHA).
    n, c, s = 400, 80, 25
    x = F.selu(torch.randn(n, c, s, dtype=torch.float64))
    if channel_dim == -1:
        x = x.movedim(1, -1)
    y = alpha_spatial_dropout(x, p, channel_dim=channel_dim).movedim(channel_dim, 1)
    dropped = (y == y[..., :1]).all(-1)
    assert_binomial(int(dropped.sum()), n * c, p, "dropped channels")
    for what, moment, expected in (("mean", y, 0.0), ("second moment", y * y, 1.0)):
        per_channel = moment.mean(-1).flatten()
        se = per_channel.std().item() / math.sqrt(n * c)
        est = per_channel.mean().item()
        assert abs(est - expected) < Z * se, f"{what}: {est} vs {expected} ± {Z * se}"


def test_selu_network_stays_normalised_where_spatial_dropout_does_not() -> None:
    # A deep SELU conv net with LeCun-normal weights keeps activations at mean 0, variance 1;
    # alpha spatial dropout keeps it there, plain spatial dropout (zeros, 1/(1-p)) does not.
    from spatialdrop import SpatialDropout1d

    torch.manual_seed(0)
    depth, c, p = 8, 64, 0.3
    convs = []
    for _ in range(depth):
        conv = torch.nn.Conv1d(c, c, 3, padding=1, bias=False)
        torch.nn.init.normal_(conv.weight, std=1 / math.sqrt(c * 3))
        convs.append(conv)

    def run(drop: torch.nn.Module) -> tuple[float, float]:
        torch.manual_seed(1)
        h = torch.randn(64, c, 32)
        with torch.no_grad():
            for conv in convs:
                h = drop(F.selu(conv(h)))
        return h.mean().item(), h.var().item()

    m0, v0 = run(torch.nn.Identity())
    m1, v1 = run(AlphaSpatialDropout1d(p))
    _m2, v2 = run(SpatialDropout1d(p))
    assert abs(m0) < 0.1
    assert abs(v0 - 1) < 0.1
    assert abs(m1) < 0.1
    assert abs(v1 - 1) < 0.1
    assert v2 > 2  # measured 0.96 / 1.00 / 3.99 for the three
