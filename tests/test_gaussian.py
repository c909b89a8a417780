from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from conftest import ALPHA, FLOAT_DTYPES, RANKS, assert_binomial, shape_for
from spatialdrop import (
    GaussianSpatialDropout,
    GaussianSpatialDropout1d,
    GaussianSpatialDropout2d,
    GaussianSpatialDropout3d,
)
from spatialdrop._module import StructuredDropout
from spatialdrop.functional import gaussian_spatial_dropout

MODULES = {1: GaussianSpatialDropout1d, 2: GaussianSpatialDropout2d, 3: GaussianSpatialDropout3d}


def reference(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Slow loop: one N(1, p/(1-p)) factor per (sample, channel), drawn in float32 (N, C) order."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    eps = torch.randn(x.shape[0], x.shape[1], generator=g, dtype=wide)
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            factor = (1 + math.sqrt(p / (1 - p)) * eps[n, c]).to(x.dtype)
            out[n, c] = x[n, c] * factor
    return out


def factors(y: torch.Tensor) -> torch.Tensor:
    """The (N, C) factors of an output computed on an all-ones channels-first input."""
    flat = y.reshape(y.shape[0], y.shape[1], -1)
    assert (flat.amax(-1) == flat.amin(-1)).all()  # one factor per (sample, channel)
    return flat[..., 0]


# --- against a loop reference ------------------------------------------------------------


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_equals_loop_reference(rank: int, dtype: torch.dtype, p: float) -> None:
    x = torch.randn(shape_for(rank, n=3, c=5), dtype=dtype)
    ours = gaussian_spatial_dropout(x, p, generator=torch.Generator().manual_seed(4))
    assert ours.dtype == dtype
    assert torch.equal(ours, reference(x, p, 4))
    torch.manual_seed(4)
    a = MODULES[rank](p)(x)
    torch.manual_seed(4)
    assert torch.equal(a, gaussian_spatial_dropout(x, p))


@pytest.mark.parametrize("rank", RANKS)
def test_channels_last_and_unbatched(rank: int) -> None:
    x = torch.randn(shape_for(rank, n=3, c=7))
    torch.manual_seed(2)
    first = gaussian_spatial_dropout(x, 0.3)
    torch.manual_seed(2)
    last = gaussian_spatial_dropout(x.movedim(1, -1).contiguous(), 0.3, channel_dim=-1)
    assert torch.equal(last, first.movedim(1, -1))
    torch.manual_seed(2)
    assert torch.equal(MODULES[rank](0.3, channel_dim=-1)(x.movedim(1, -1)), last)
    # unbatched input: one factor per channel, as the batched form with a batch of one
    u = torch.ones(shape_for(rank, n=1, c=9)[1:])
    torch.manual_seed(6)
    yu = MODULES[rank](0.4)(u)
    torch.manual_seed(6)
    assert torch.equal(yu, gaussian_spatial_dropout(u.unsqueeze(0), 0.4).squeeze(0))
    flat = yu.reshape(9, -1)
    assert (flat.amax(1) == flat.amin(1)).all()


@pytest.mark.parametrize(("p", "training", "numel"), [(0.0, True, 1), (0.5, False, 1), (0.5, True, 0)])
def test_no_random_numbers_drawn(p: float, training: bool, numel: int) -> None:
    x = torch.randn(2, 3, 4) if numel else torch.randn(0, 3, 4)
    state = torch.get_rng_state()
    assert gaussian_spatial_dropout(x, p, training) is x
    assert torch.equal(state, torch.get_rng_state())


# --- semantics ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [GaussianSpatialDropout, *MODULES.values()])
def test_module_is_structured_dropout_with_repr(cls: type) -> None:
    # (argument errors: tests/test_contract.py, driven by tests/optable.py)
    m = cls(0.25, channel_dim=-1)
    assert isinstance(m, StructuredDropout)
    assert repr(m) == f"{cls.__name__}(p=0.25, inplace=False, channel_dim=-1)"


def test_inplace_and_gradient() -> None:
    x = torch.randn(4, 6, 5, 5)
    y = x.clone()
    torch.manual_seed(1)
    expected = gaussian_spatial_dropout(x, 0.5)
    torch.manual_seed(1)
    out = gaussian_spatial_dropout(y, 0.5, inplace=True)
    assert out.data_ptr() == y.data_ptr()
    assert torch.equal(y, expected)
    # the gradient is the noise itself
    leaf = torch.randn(4, 6, 5, 5, requires_grad=True)
    torch.manual_seed(3)
    gaussian_spatial_dropout(leaf, 0.5).sum().backward()
    torch.manual_seed(3)
    assert torch.equal(leaf.grad, gaussian_spatial_dropout(torch.ones_like(leaf), 0.5))


# --- statistics --------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_factors_are_normal_with_dropout_moments(p: float) -> None:
    n, c = 400, 50
    f = factors(gaussian_spatial_dropout(torch.ones(n, c, 2, 2, dtype=torch.float64), p)).flatten()
    m, var = n * c, p / (1 - p)
    # exact sampling distributions of the mean and variance of m i.i.d. normals
    z = (f.mean().item() - 1.0) / math.sqrt(var / m)
    assert abs(z) < stats.norm.isf(ALPHA / 2), f"mean {f.mean().item()} z={z}"
    chi = (m - 1) * f.var().item() / var
    lo, hi = stats.chi2.ppf(ALPHA / 2, m - 1), stats.chi2.isf(ALPHA / 2, m - 1)
    assert lo < chi < hi, f"variance {f.var().item()} vs {var}"
    # the whole distribution: Kolmogorov-Smirnov against N(1, p/(1-p))
    assert stats.kstest(f.numpy(), "norm", args=(1.0, math.sqrt(var))).pvalue > ALPHA
    # sign flips at the rate Phi(-sqrt((1-p)/p))
    assert_binomial(int((f < 0).sum()), m, stats.norm.cdf(-math.sqrt((1 - p) / p)), "negative factors")


def test_same_moments_as_spatial_dropout() -> None:
    from spatialdrop.functional import spatial_dropout

    p, n, c = 0.3, 500, 40
    g = factors(gaussian_spatial_dropout(torch.ones(n, c, 3, dtype=torch.float64), p)).flatten()
    b = factors(spatial_dropout(torch.ones(n, c, 3, dtype=torch.float64), p)).flatten()
    tol = 5 * math.sqrt(p / (1 - p) / (n * c))  # 5 standard errors of a mean
    assert abs(g.mean().item() - 1) < tol
    assert abs(b.mean().item() - 1) < tol
    assert (b == 0).any()
    assert not (g == 0).any()


def test_factors_independent_across_channels_and_samples() -> None:
    n, c = 2000, 8
    f = factors(gaussian_spatial_dropout(torch.ones(n, c, 2), 0.5)) - 1.0
    # correlation between neighbouring channels and between samples: |r| < 5 / sqrt(n)
    r_ch = torch.corrcoef(torch.stack([f[:, 0], f[:, 1]]))[0, 1].item()
    r_n = torch.corrcoef(torch.stack([f[0::2, 0], f[1::2, 0]]))[0, 1].item()
    assert abs(r_ch) < 5 / math.sqrt(n)
    assert abs(r_n) < 5 / math.sqrt(n / 2)
