"""Every public layer called from two threads at once: each output is a valid draw of its own.

What is thread-safe: every layer may be called from several threads at once (torch's global
generator is shared, so the *sequence* of masks then depends on the scheduling, but each
output is a correct draw). Filter dropout keeps the mask of a call per thread. Keyed contexts
(``mask_context``) are per thread.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn

import spatialdrop as sd
from spatialdrop.alpha import SELU_NEG_SATURATION

CALLS = 150  # per thread


def per_slice(y: torch.Tensor, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The ratio y / x, checked constant over ``dims``; returns it reduced over them."""
    r = y / x
    lo, hi = r.amin(dim=dims), r.amax(dim=dims)
    assert torch.allclose(lo, hi, rtol=1e-5, atol=1e-6), "a slice is not one factor"
    return lo


def check_bernoulli(y: torch.Tensor, x: torch.Tensor, dims: tuple[int, ...], p: float) -> None:
    f = per_slice(y, x, dims)
    kept = f != 0
    assert torch.allclose(f[kept], torch.full_like(f[kept], 1 / (1 - p)), rtol=1e-6), "wrong scale"


def check_alpha(y: torch.Tensor, x: torch.Tensor, p: float) -> None:
    alpha = -SELU_NEG_SATURATION
    a = 1.0 / ((alpha * alpha * p + 1.0) * (1.0 - p)) ** 0.5
    b = a * alpha * p
    kept = torch.isclose(y, a * x + b, rtol=1e-5, atol=1e-6).flatten(2).all(-1)
    dropped = torch.isclose(y, torch.full_like(y, -a * alpha * (1 - p)), rtol=1e-5).flatten(2).all(-1)
    assert (kept ^ dropped).all(), "a channel is neither kept nor dropped"


def check_drop_block(y: torch.Tensor, x: torch.Tensor, p: float) -> None:
    zero = y == 0
    assert torch.allclose(y[~zero], x[~zero] / (1 - p), rtol=1e-6), "wrong scale"
    assert zero.any(), "nothing dropped"


Case = tuple[
    Callable[[], nn.Module], tuple[int, ...], Callable[[nn.Module, torch.Tensor, torch.Tensor], None]
]

CASES: dict[str, Case] = {
    "SpatialDropout2d": (
        lambda: sd.SpatialDropout2d(0.5),
        (4, 16, 3, 3),
        lambda m, x, y: check_bernoulli(y, x, (2, 3), 0.5),
    ),
    "SpatialDropout": (
        lambda: sd.SpatialDropout(0.3, channel_dim=-1),
        (4, 3, 16),
        lambda m, x, y: check_bernoulli(y, x, (1,), 0.3),
    ),
    "GaussianSpatialDropout2d": (
        lambda: sd.GaussianSpatialDropout2d(0.3),
        (4, 16, 3, 3),
        lambda m, x, y: per_slice(y, x, (2, 3)),
    ),
    "AlphaSpatialDropout1d": (
        lambda: sd.AlphaSpatialDropout1d(0.5),
        (4, 16, 5),
        lambda m, x, y: check_alpha(y, x, 0.5),
    ),
    "DropPath": (
        lambda: sd.DropPath(0.5),
        (16, 3, 4),
        lambda m, x, y: check_bernoulli(y, x, (1, 2), 0.5),
    ),
    "ResidualDropPath": (  # the identity branch: y - x is x / (1 - p) or 0 per sample
        lambda: sd.ResidualDropPath(nn.Identity(), 0.5),
        (16, 3, 4),
        lambda m, x, y: check_bernoulli(y - x, x, (1, 2), 0.5),
    ),
    "DropBlock2d": (
        lambda: sd.DropBlock2d(0.3, 3),
        (2, 8, 10, 10),
        lambda m, x, y: check_drop_block(y, x, 0.3),
    ),
}


def filter_case() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 32, 3, padding=1)
    with torch.no_grad():
        plain.bias.uniform_(0.5, 1.0)
    conv = nn.Conv2d(3, 32, 3, padding=1)
    conv.load_state_dict(plain.state_dict())
    return sd.filter_dropout(conv, 0.5), plain


def hammer(fn: Callable[[int], None]) -> None:
    """Run ``fn(thread)`` in two threads at once, ``CALLS`` times each; re-raise any failure."""
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(t: int) -> None:
        start.wait()
        try:
            for _ in range(CALLS):
                fn(t)
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]


@pytest.mark.parametrize("name", list(CASES))
def test_layer_from_two_threads(name: str) -> None:
    make, shape, check = CASES[name]
    m = make()
    xs = [torch.rand(shape) + 0.5, torch.rand(shape) + 1.5]

    def call(t: int) -> None:
        y = m(xs[t])
        check(m, xs[t], y)

    hammer(call)


def test_filter_dropout_conv_from_two_threads() -> None:
    conv, plain = filter_case()
    xs = [torch.rand(2, 3, 5, 5) + 0.5, torch.rand(2, 3, 5, 5) + 1.5]
    refs = [plain(x).detach() for x in xs]

    def call(t: int) -> None:
        with torch.no_grad():
            y = conv(xs[t])
        zero = (y == 0).flatten(2).all(-1)
        assert (zero == zero[:1]).all(), "weight and bias masks disagree, or samples differ"
        kept = ~zero[0]
        assert zero.any(), "no filter dropped"  # P(all 32 kept) = 2**-32
        assert torch.allclose(y[:, kept], 2 * refs[t][:, kept], rtol=1e-5, atol=1e-5), "not scaled by 2"
        assert conv.parametrizations.weight[0].current_mask() is None

    hammer(call)


def test_keyed_layers_from_two_threads_with_their_own_contexts() -> None:
    net = sd.keyed_masks(
        nn.Sequential(sd.SpatialDropout2d(0.5), sd.filter_dropout(nn.Conv2d(8, 8, 1), 0.5)), 1
    )
    x = torch.rand(4, 8, 3, 3) + 0.5
    expected = []
    for step in range(2):
        with sd.mask_context(step=step, sample_ids=torch.arange(4)), torch.no_grad():
            expected.append(net(x))

    def call(t: int) -> None:
        with sd.mask_context(step=t, sample_ids=torch.arange(4)), torch.no_grad():
            assert torch.equal(net(x), expected[t])

    hammer(call)
