from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.modules.dropout import _DropoutNd

from conftest import FLOAT_DTYPES, assert_binomial
from spatialdrop import DropPath, drop_path_rates
from spatialdrop._module import StructuredDropout
from spatialdrop.functional import drop_path

SHAPES = {1: (6,), 2: (6, 5), 3: (6, 3, 4), 4: (6, 3, 4, 4), 5: (6, 2, 3, 3, 3)}


def reference(x: torch.Tensor, p: float, scale: bool = True) -> torch.Tensor:
    """The calls of timm's drop_path and torchvision's stochastic_depth(mode="row"), then a loop."""
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    if scale:
        keep.div_(1 - p)
    return torch.stack([x[n] * keep[n] for n in range(x.shape[0])])


# --- exactness against the peers' random-number calls ------------------------------------


@pytest.mark.parametrize("rank", sorted(SHAPES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("scale", [True, False])
def test_equals_timm_torchvision_calls(rank: int, dtype: torch.dtype, p: float, scale: bool) -> None:
    x = torch.randn(SHAPES[rank], dtype=dtype)
    torch.manual_seed(3)
    ours = drop_path(x, p, scale=scale)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    theirs = reference(x, p, scale)
    assert torch.equal(ours, theirs)
    assert torch.equal(after, torch.get_rng_state())  # the same random numbers drawn
    torch.manual_seed(3)
    assert torch.equal(DropPath(p, scale=scale)(x), ours)


@pytest.mark.parametrize(
    ("p", "training", "numel"), [(0.0, True, 1), (1.0, True, 1), (0.5, False, 1), (0.5, True, 0)]
)
def test_no_random_numbers_drawn(p: float, training: bool, numel: int) -> None:
    x = torch.randn(3, 4) if numel else torch.randn(0, 4)
    state = torch.get_rng_state()
    drop_path(x, p, training)
    assert torch.equal(state, torch.get_rng_state())


def test_p_one_zeroes_everything_and_keeps_nan() -> None:
    x = torch.randn(4, 3, 2)
    x[0, 0, 0] = float("nan")
    y = drop_path(x, 1.0)
    assert y.isnan().sum() == 1
    assert (y.nan_to_num() == 0).all()
    assert (DropPath(1.0, scale=False)(torch.ones(3, 2)) == 0).all()


# --- semantics ---------------------------------------------------------------------------


def test_module_is_a_dropout_with_repr_and_no_state() -> None:
    # (argument errors, DropPath(channel_dim=...) included: tests/test_contract.py, from tests/optable.py)
    m = DropPath()
    assert isinstance(m, StructuredDropout)
    assert isinstance(m, _DropoutNd)
    assert repr(m) == "DropPath(p=0.1, inplace=False)"
    assert repr(DropPath(0.3, True, scale=False)) == "DropPath(p=0.3, inplace=True, scale=False)"
    assert not hasattr(m, "channel_dim")
    assert m.state_dict() == {}


def test_generator_reproducible_and_global_rng_untouched() -> None:
    x = torch.randn(64, 3)
    state = torch.get_rng_state()
    a = drop_path(x, 0.5, generator=torch.Generator().manual_seed(7))
    b = drop_path(x, 0.5, generator=torch.Generator().manual_seed(7))
    c = drop_path(x, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_inplace() -> None:
    x = torch.randn(8, 5)
    y = x.clone()
    torch.manual_seed(1)
    expected = drop_path(x, 0.5)
    torch.manual_seed(1)
    out = DropPath(0.5, inplace=True)(y)
    assert out.data_ptr() == y.data_ptr()
    assert torch.equal(y, expected)


def test_residual_branch_is_skipped_for_dropped_samples() -> None:
    branch = torch.nn.Linear(8, 8)
    x = torch.randn(32, 8)
    torch.manual_seed(5)
    out = x + drop_path(branch(x), 0.5)
    torch.manual_seed(5)
    keep = drop_path(torch.ones(32, 1), 0.5).squeeze(1) != 0
    assert 0 < int(keep.sum()) < 32
    assert torch.equal(out[~keep], x[~keep])
    assert torch.allclose(out[keep], x[keep] + 2 * branch(x)[keep])


# --- shapes, layouts, batch sizes --------------------------------------------------------


def test_gradient_is_mask_times_scale() -> None:
    x = torch.randn(16, 3, 4, requires_grad=True)
    torch.manual_seed(4)
    y = drop_path(x, 0.25)
    y.sum().backward()
    mask = (y.detach() != 0).to(x.dtype)
    assert torch.equal(x.grad, mask / 0.75)


# --- statistics --------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_drop_rate_and_structure(p: float, rank: int) -> None:
    n = 20000
    x = torch.ones((n, *SHAPES[rank][1:]))
    y = drop_path(x, p)
    flat = y.reshape(n, -1)
    assert (flat.amax(1) == flat.amin(1)).all()  # one draw per sample
    scale = torch.tensor(1.0) / (1 - p)
    assert ((flat == 0) | (flat == scale)).all()
    assert_binomial(int((flat[:, 0] == 0).sum()), n, p, "dropped samples")


def test_samples_are_independent() -> None:
    # pairs of neighbouring samples: both dropped with probability p**2 if independent
    p, n = 0.5, 40000
    d = drop_path(torch.ones(n), p) == 0
    assert_binomial(int((d[0::2] & d[1::2]).sum()), n // 2, p * p, "both of a pair dropped")


# --- drop_path_rates ---------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 12, 50])
@pytest.mark.parametrize("p_max", [0.0, 0.1, 0.35, 1.0])
def test_rates_follow_the_paper_and_linspace(depth: int, p_max: float) -> None:
    paper = drop_path_rates(depth, p_max)
    # Huang et al. eq. 4: survival p_l = 1 - l / L * (1 - p_L) with p_L = 1 - p_max
    survival = [1 - ell / depth * p_max for ell in range(1, depth + 1)]
    assert paper == pytest.approx([1 - s for s in survival], abs=1e-15)
    assert paper[-1] == p_max
    assert all(b >= a for a, b in itertools.pairwise(paper))
    lin = drop_path_rates(depth, p_max, rule="linspace")
    assert torch.allclose(
        torch.tensor(lin, dtype=torch.float64), torch.linspace(0, p_max, depth, dtype=torch.float64)
    )
    # timm's values are the float32 linspace: equal up to float32 rounding
    timm_like = torch.linspace(0, p_max, depth).double()
    assert torch.allclose(torch.tensor(lin, dtype=torch.float64), timm_like, rtol=0, atol=2**-23)
    assert lin[0] == 0.0
    assert lin[-1] == (p_max if depth > 1 else 0.0)  # torch.linspace(0, p, 1) is [0.]
    assert all(a <= b for a, b in zip(lin, paper))


def test_rates_validate() -> None:
    with pytest.raises(ValueError, match=r"drop_path_rates: depth must be an int >= 1, got 0"):
        drop_path_rates(0, 0.1)
    with pytest.raises(TypeError, match=r"drop_path_rates: depth must be an int, got 2.0"):
        drop_path_rates(2.0, 0.1)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"drop_path_rates: p_max must be a probability in \[0, 1\], got 1.2"
    ):
        drop_path_rates(4, 1.2)
    with pytest.raises(
        ValueError, match=r"drop_path_rates: rule must be one of 'paper', 'linspace', got 'timm'"
    ):
        drop_path_rates(4, 0.1, rule="timm")
