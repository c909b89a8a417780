"""Shared test helpers: binomial bounds for statistical checks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

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


@pytest.fixture
def dropblock_path() -> Iterator[Callable[..., None]]:
    """Steer DropBlock's paths for the rest of the test through its one switch, ``ops.override``.

    ``dropblock_path(Path.DENSE)``, ``dropblock_path(extension=False)``; each call replaces the
    previous one, ``dropblock_path()`` restores the usual choice.
    """
    from spatialdrop._dropblock import ops

    stack = contextlib.ExitStack()

    def steer(path: Any = None, *, extension: bool = True) -> None:
        stack.close()
        stack.enter_context(ops.override(path, extension=extension))

    yield steer
    stack.close()


RANKS = [1, 2, 3]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def shape_for(spatial_dims: int, n: int = 4, c: int = 6, side: int = 5) -> tuple[int, ...]:
    """A small batched channels-first shape with ``spatial_dims`` spatial dims."""
    return (n, c) + (side,) * spatial_dims


# --- markers, the slow subset, hypothesis profiles ------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow",
        action="store_true",
        default=False,
        help="also run the tests marked slow (the full compile/export matrix); or set SPATIALDROP_SLOW=1",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a slow case (compile, export); run with --runslow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tests marked cuda need a CUDA device (benchmarks/gpu_check.sh runs them): deselected without one
    if not torch.cuda.is_available():
        cuda = [item for item in items if "cuda" in item.keywords]
        if cuda:
            config.hook.pytest_deselected(items=cuda)
            items[:] = [item for item in items if "cuda" not in item.keywords]
    # tests marked models need torchvision and timm, which import only beside torch 2.14.1: they run
    # in the second environment of dev/test.sh (`pytest -m models`), deselected elsewhere. Where
    # they are selected, a missing peer is an error, never a skip.
    if "models" not in (config.getoption("markexpr") or ""):
        models = [item for item in items if "models" in item.keywords]
        if models:
            config.hook.pytest_deselected(items=models)
            items[:] = [item for item in items if "models" not in item.keywords]
    if config.getoption("--runslow") or os.environ.get("SPATIALDROP_SLOW") == "1":
        return
    # deselected, not skipped: the default run is the fast subset, .ci/run runs the slow one too
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # hypothesis is in the test extra; only test_properties needs it
    pass
else:
    # "ci": fixed examples (derandomized), a few minutes in all; the default.
    settings.register_profile(
        "ci",
        max_examples=150,
        derandomize=True,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: a hang costs the time bound
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    # "release": many random examples, for release checks:
    #   HYPOTHESIS_PROFILE=release pytest tests/test_properties.py
    settings.register_profile(
        "release",
        max_examples=2000,
        derandomize=False,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
