"""Shared test helpers: binomial bounds for statistical checks."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binom

# Two-sided false-alarm probability of one statistical check. With fixed seeds a check either
# always passes or always fails; the bound says how unlikely a correct implementation is to fail.
ALPHA = 1e-6


def binom_bounds(n: int, p: float, alpha: float = ALPHA) -> tuple[int, int]:
    """Inclusive bounds on the count of successes of Binomial(n, p) at two-sided level alpha."""
    lo = int(binom.ppf(alpha / 2, n, p))
    hi = int(binom.isf(alpha / 2, n, p))
    return lo, hi


def assert_binomial(count: int, n: int, p: float, what: str = "count", alpha: float = ALPHA) -> None:
    """Assert that ``count`` of ``n`` independent trials is plausible for rate ``p``."""
    lo, hi = binom_bounds(n, p, alpha)
    assert lo <= count <= hi, f"{what}: {count}/{n} = {count / n:.4f}, allowed [{lo}, {hi}] for p={p}"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


RANKS = [1, 2, 3]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def shape_for(spatial_dims: int, n: int = 4, c: int = 6, side: int = 5) -> tuple[int, ...]:
    """A small batched channels-first shape with ``spatial_dims`` spatial dims."""
    return (n, c) + (side,) * spatial_dims
