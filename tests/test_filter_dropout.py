from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.utils import parametrize

from conftest import RANKS, assert_binomial
from spatialdrop import FilterDropout, filter_dropout, remove_filter_dropout
from spatialdrop._module import StructuredDropout

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def make(rank: int, cin: int = 3, cout: int = 8, **kw: object) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A conv with filter dropout, a plain copy of it, and an input."""
    torch.manual_seed(0)
    plain = CONVS[rank](cin, cout, 3, padding=1, **kw)
    with torch.no_grad():
        plain.bias.uniform_(0.5, 1.0) if plain.bias is not None else None  # never 0
    conv = filter_dropout(copy.deepcopy(plain), 0.5)
    x = torch.randn((4, cin) + (5,) * rank)
    return conv, plain, x


def expected_mask(cout: int, p: float, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.empty(cout).bernoulli_(1 - p).div_(1 - p)


# --- what is dropped ---------------------------------------------------------------------


@pytest.mark.parametrize("rank", RANKS)
def test_output_is_plain_output_times_one_batch_shared_filter_mask(rank: int) -> None:
    conv, plain, x = make(rank)
    for seed in range(5):
        torch.manual_seed(seed)
        y = conv(x)
        after = torch.get_rng_state()
        mask = expected_mask(8, 0.5, seed)
        assert torch.equal(after, torch.get_rng_state())  # one draw of 8 numbers per call
        shape = (1, 8) + (1,) * rank
        assert torch.allclose(y, plain(x) * mask.view(shape), rtol=1e-5, atol=1e-6)
        # a dropped filter gives an exactly zero channel for every sample: bias dropped too
        zero = (y == 0).flatten(2).all(-1)
        assert torch.equal(zero, (mask == 0).expand(4, 8))


def test_weight_and_bias_read_the_same_mask_within_a_call() -> None:
    conv, _, x = make(2, cout=64)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(module: nn.Module, args: object) -> None:  # runs after the mask is drawn
        w_zero = (module.weight == 0).flatten(1).all(1)
        b_zero = module.bias == 0
        seen.append((w_zero, b_zero))
        # and again: a second read within the call sees the same mask
        assert torch.equal((module.weight == 0).flatten(1).all(1), w_zero)

    conv.register_forward_pre_hook(spy)
    for _ in range(10):
        conv(x)
    masks = torch.stack([w for w, _ in seen])
    assert all(torch.equal(w, b) for w, b in seen)
    assert masks.any()
    assert not masks.all()
    assert not all(torch.equal(masks[0], m) for m in masks[1:])  # a new mask per call


def test_kept_filters_scaled_weights_unchanged_and_plain_outside_calls() -> None:
    conv, plain, x = make(2)
    original = conv.parametrizations.weight.original
    assert conv.weight is original  # between calls, in training mode too
    assert conv.parametrizations.bias.original is conv.bias
    torch.manual_seed(3)
    conv(x)
    assert conv.weight is original
    assert torch.equal(original, plain.weight)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate(p: float) -> None:
    conv = filter_dropout(nn.Conv1d(2, 100, 1), p)
    x = torch.ones(3, 2, 4)
    calls, dropped = 200, 0
    with torch.no_grad():
        for _ in range(calls):
            zero = (conv(x) == 0).all(-1)
            assert (zero == zero[:1]).all()  # shared by the batch
            dropped += int(zero[0].sum())
    assert_binomial(dropped, calls * 100, p, "dropped filters")


def test_gradient_flows_to_kept_filters_only() -> None:
    conv, plain, x = make(2)
    torch.manual_seed(7)
    conv(x).square().sum().backward()
    mask = expected_mask(8, 0.5, 7)
    g = conv.parametrizations.weight.original.grad
    gb = conv.parametrizations.bias.original.grad
    assert (g[mask == 0] == 0).all()
    assert (gb[mask == 0] == 0).all()
    assert (g[mask != 0].flatten(1).abs().sum(1) > 0).all()
    # chain rule: the grad of the stored weight is the grad of the used weight times the factor
    used = plain.weight.detach() * mask.view(-1, 1, 1, 1)
    w = used.clone().requires_grad_(True)
    b = (plain.bias.detach() * mask).requires_grad_(True)
    nn.functional.conv2d(x, w, b, padding=1).square().sum().backward()
    assert torch.allclose(g, w.grad * mask.view(-1, 1, 1, 1), rtol=1e-5, atol=1e-6)


# --- modes, edge rates, exceptions ------------------------------------------------------


def test_eval_uses_plain_weights_without_random_numbers() -> None:
    conv, plain, x = make(2)
    conv.eval()
    state = torch.get_rng_state()
    y = conv(x)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(y, plain(x))
    drop = conv.parametrizations.weight[0]
    assert not drop.training
    conv.train()
    assert drop.training


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_p_zero_and_one_draw_nothing(p: float) -> None:
    conv, plain, x = make(2)
    conv.parametrizations.weight[0].p = p
    state = torch.get_rng_state()
    y = conv(x)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(y, plain(x) if p == 0 else torch.zeros_like(y))


def test_mask_cleared_when_forward_raises() -> None:
    conv, _, _ = make(2)
    with pytest.raises(RuntimeError):
        conv(torch.randn(2, 5, 4, 4))  # wrong channel count
    assert conv.parametrizations.weight[0].current_mask() is None
    assert conv.weight is conv.parametrizations.weight.original


def test_uses_its_own_training_flag_for_mc_dropout() -> None:
    conv, plain, x = make(2)
    conv.eval()
    conv.parametrizations.weight[0].train()
    assert not torch.equal(conv(x), plain(x))


def test_groups_and_dtypes() -> None:
    conv = filter_dropout(nn.Conv2d(4, 8, 3, groups=2, bias=False), 0.5)
    assert not parametrize.is_parametrized(conv, "bias")
    x = torch.randn(2, 4, 5, 5)
    torch.manual_seed(1)
    y = conv(x)
    assert torch.equal((y == 0).flatten(2).all(-1)[0], expected_mask(8, 0.5, 1) == 0)
    conv = filter_dropout(nn.Conv1d(2, 6, 3).to(torch.float64), 0.3)
    assert conv(torch.randn(2, 2, 5, dtype=torch.float64)).dtype == torch.float64
    conv = filter_dropout(nn.Conv1d(2, 6, 3).to(torch.bfloat16), 0.3)
    assert conv(torch.randn(2, 2, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bad_arguments() -> None:
    with pytest.raises(
        TypeError, match=r"filter_dropout: conv must be an nn.Conv1d, nn.Conv2d or nn.Conv3d, got Linear"
    ):
        filter_dropout(nn.Linear(2, 3))
    with pytest.raises(TypeError, match=r"conv must be an nn.Conv1d, .* got ConvTranspose2d"):
        filter_dropout(nn.ConvTranspose2d(2, 3, 3))
    with pytest.raises(ValueError, match=r"filter_dropout: p must be a probability in \[0, 1\], got 1.5"):
        filter_dropout(nn.Conv2d(2, 3, 3), 1.5)
    with pytest.raises(TypeError, match=r"filter_dropout: p must be a real number"):
        filter_dropout(nn.Conv2d(2, 3, 3), "0.1")  # type: ignore[arg-type]
    conv = filter_dropout(nn.Conv2d(2, 3, 3))
    with pytest.raises(ValueError, match=r"filter_dropout: conv must be a conv without filter dropout"):
        filter_dropout(conv)
    with pytest.raises(ValueError, match=r"conv must be initialised .* got an uninitialised lazy conv"):
        filter_dropout(nn.LazyConv2d(3, 3))
    with pytest.raises(
        ValueError, match=r"remove_filter_dropout: conv must be a conv with filter dropout, got Conv2d"
    ):
        remove_filter_dropout(nn.Conv2d(2, 3, 3))
    with pytest.raises(TypeError, match=r"remove_filter_dropout: conv must be an nn.Module, got int"):
        remove_filter_dropout(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"FilterDropout: p must be a probability"):
        FilterDropout(-1.0)


def test_is_a_dropout_module_with_repr() -> None:
    conv = filter_dropout(nn.Conv2d(2, 3, 3), 0.2)
    drop = conv.parametrizations.weight[0]
    assert isinstance(drop, FilterDropout)
    assert isinstance(drop, StructuredDropout)
    assert isinstance(drop, _DropoutNd)
    assert drop is conv.parametrizations.bias[0]
    assert repr(drop) == "FilterDropout(p=0.2)"
    assert sum(isinstance(m, FilterDropout) for m in conv.modules()) == 1


# --- state, removal, copies --------------------------------------------------------------


def test_state_dict_round_trips() -> None:
    conv, _, x = make(2)
    sd = conv.state_dict()
    assert set(sd) == {"parametrizations.weight.original", "parametrizations.bias.original"}
    other = filter_dropout(nn.Conv2d(3, 8, 3, padding=1), 0.5)
    other.load_state_dict(sd)
    torch.manual_seed(9)
    a = conv(x)
    torch.manual_seed(9)
    assert torch.equal(other(x), a)
    plain = remove_filter_dropout(other)
    assert set(plain.state_dict()) == {"weight", "bias"}
    assert torch.equal(plain.weight, sd["parametrizations.weight.original"])


def test_remove_restores_a_plain_conv() -> None:
    conv, plain, x = make(2)
    out = remove_filter_dropout(conv)
    assert out is conv
    assert type(conv) is nn.Conv2d
    assert not parametrize.is_parametrized(conv)
    assert not conv._forward_pre_hooks
    assert not conv._forward_hooks
    state = torch.get_rng_state()
    assert torch.equal(conv.train()(x), plain(x))
    assert torch.equal(state, torch.get_rng_state())
    filter_dropout(conv, 0.3)  # can be added again
    assert isinstance(conv.parametrizations.weight[0], FilterDropout)


class Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_remove_keeps_other_parametrizations_and_hooks() -> None:
    conv, plain, x = make(2)
    parametrize.register_parametrization(conv, "weight", Double())
    other_hook_calls: list[int] = []
    conv.register_forward_hook(lambda *a: other_hook_calls.append(1))
    remove_filter_dropout(conv)
    assert parametrize.is_parametrized(conv, "weight")
    assert [type(m) for m in conv.parametrizations.weight] == [Double]
    assert not parametrize.is_parametrized(conv, "bias")
    y = conv(x)
    assert other_hook_calls == [1]
    expected = nn.functional.conv2d(x, 2 * plain.weight, plain.bias, padding=1)
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_deepcopy_keeps_working_and_is_removable() -> None:
    conv, plain, x = make(2)
    twin = copy.deepcopy(conv)
    torch.manual_seed(4)
    a = conv(x)
    torch.manual_seed(4)
    assert torch.equal(twin(x), a)
    remove_filter_dropout(twin)
    assert torch.equal(twin(x), plain(x))
    torch.manual_seed(4)
    assert torch.equal(conv(x), a)  # the original is untouched (torch shares the class)
    third = copy.deepcopy(conv)
    remove_filter_dropout(conv)
    torch.manual_seed(4)
    assert torch.equal(third(x), a)


def test_cached_reuses_the_first_mask_as_documented() -> None:
    conv, _, x = make(2, cout=32)
    with parametrize.cached():
        z1 = (conv(x) == 0).flatten(2).all(-1)
        z2 = (conv(x) == 0).flatten(2).all(-1)
    assert z1.any()
    assert torch.equal(z1, z2)


def test_inside_a_model_with_sequential() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    filter_dropout(net[0], 0.5)
    filter_dropout(net[3], 0.5)
    y = net(torch.randn(2, 3, 9, 9))
    assert y.shape == (2, 4, 5, 5)
    assert [n for n, m in net.named_modules() if isinstance(m, FilterDropout)] == [
        "0.parametrizations.weight.0",
        "3.parametrizations.weight.0",
    ]


def test_torch_compile_fullgraph_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.config as inductor_config

    import spatialdrop.spatial_dropout as sd_module

    conv, _, x = make(2)
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(conv, fullgraph=True)
        torch.manual_seed(0)
        a = compiled(x)
    with monkeypatch.context() as mp:  # the compiled draw, rand < 1 - p, taken in eager mode
        mp.setattr(sd_module, "is_compiling", lambda: True)
        torch.manual_seed(0)
        b = conv(x)
    assert torch.equal(a == 0, b == 0)  # the same filters dropped
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)  # inductor's conv may round differently
    assert conv.parametrizations.weight[0].current_mask() is None
    torch._dynamo.reset()
