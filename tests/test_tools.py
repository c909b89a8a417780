from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from spatialdrop import (
    DropPath,
    DropSchedule,
    MaskKey,
    MCPrediction,
    SpatialDropout1d,
    SpatialDropout2d,
    SpatialDropout3d,
    add_dropout,
    filter_dropout,
    keyed_masks,
    mask_context,
    mc_dropout,
    mc_predict,
)
from spatialdrop.functional import spatial_dropout
from spatialdrop.keyed import mc_layer


class Block(nn.Module):
    """A ResNet-style block: convs as plain attributes, called in forward."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.bn1(self.conv1(x)).relu())


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h.mean((2, 3)))


# --- add_dropout -------------------------------------------------------------------------


def test_add_dropout_inserts_in_sequential_and_wraps_attributes() -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 3, 6, 6)
    before = net.eval()(x)
    made: list[nn.Module] = []

    def factory(m: nn.Module) -> nn.Module:
        made.append(SpatialDropout2d(0.2))
        return made[-1]

    assert add_dropout(net, factory=factory) is net
    assert len(made) == 5
    assert len({id(m) for m in made}) == 5  # one new layer per match
    assert isinstance(net.stem[1], SpatialDropout2d)
    assert isinstance(net.stem[2], nn.ReLU)
    for b in net.blocks:
        assert isinstance(b.conv1, nn.Sequential)
        assert isinstance(b.conv1[0], nn.Conv2d)
        assert isinstance(b.conv1[1], SpatialDropout2d)
        assert isinstance(b.bn1, nn.BatchNorm2d)
    assert torch.equal(net.eval()(x), before)  # eval: the network computes the same
    net.train()
    assert net(x).shape == (2, 4)
    keys = set(net.state_dict())
    assert "blocks.0.conv1.0.weight" in keys
    assert "blocks.0.bn1.running_mean" in keys  # unmatched modules keep their keys
    assert "stem.0.weight" in keys


def test_named_sequential_keeps_names_and_default_factory_picks_rank() -> None:
    net = nn.Sequential(
        OrderedDict(
            conv=nn.Conv1d(2, 4, 3),
            act=nn.ReLU(),
            vol=nn.Sequential(nn.Conv3d(4, 4, 1)),
        )
    )
    add_dropout(net, after=(nn.Conv1d, nn.Conv3d))
    assert list(net._modules) == ["conv", "conv_dropout", "act", "vol"]
    assert isinstance(net.conv_dropout, SpatialDropout1d)
    assert isinstance(net.vol[1], SpatialDropout3d)
    assert repr(net.conv_dropout) == "SpatialDropout1d(p=0.1, inplace=False)"
    # a taken name is not overwritten
    taken = nn.Sequential(OrderedDict(c=nn.Conv2d(1, 1, 1), c_dropout=nn.ReLU()))
    add_dropout(taken)
    assert list(taken._modules) == ["c", "c_dropout_", "c_dropout"]
    assert isinstance(taken.c_dropout, nn.ReLU)


def test_model_itself_and_matched_modules_are_not_searched() -> None:
    inner = nn.Sequential(nn.Conv2d(2, 2, 1))
    net = nn.Sequential(inner)
    add_dropout(net, after=nn.Sequential, factory=lambda m: DropPath(0.1))
    assert [type(m) for m in net] == [nn.Sequential, DropPath]
    assert len(inner) == 1  # the match was not searched further


def test_add_dropout_errors() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with pytest.raises(
        ValueError,
        match=r"add_dropout: after must be a module type present in the model "
        r"\(it has Linear, ReLU\), got \(Conv2d,\)",
    ):
        add_dropout(net)
    with pytest.raises(ValueError, match=r"factory must be given for modules other than nn.Conv1d/2d/3d"):
        add_dropout(net, after=nn.Linear)
    with pytest.raises(
        TypeError, match=r"add_dropout: after must be an nn.Module subclass or a non-empty tuple"
    ):
        add_dropout(net, after=(int,))
    with pytest.raises(TypeError, match=r"after must be an nn.Module subclass"):
        add_dropout(net, after=())
    with pytest.raises(TypeError, match=r"add_dropout: factory must be None or a callable"):
        add_dropout(net, after=nn.Linear, factory=SpatialDropout2d(0.1).p)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"add_dropout: factory must be a callable that returns an nn.Module, got float"
    ):
        add_dropout(net, after=nn.Linear, factory=lambda m: 0.1)  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match=r"add_dropout: model must be an nn.Module, got list"):
        add_dropout([], after=nn.Linear)  # type: ignore[arg-type]


# --- mc_dropout --------------------------------------------------------------------------


def zoo() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        SpatialDropout2d(0.5),
        DropPath(0.2),
        nn.Dropout(0.1),
        nn.Dropout2d(0.1),
        nn.AlphaDropout(0.1),
        nn.FeatureAlphaDropout(0.1),
        filter_dropout(nn.Conv2d(4, 4, 1)),
    )


def test_mc_dropout_trains_only_dropout_layers_and_restores() -> None:
    net = zoo().train()
    net[1].eval()  # a mixed starting state is restored exactly
    start = {n: m.training for n, m in net.named_modules()}
    with mc_dropout(net) as m:
        assert m is net
        modes = {n: mod.training for n, mod in net.named_modules()}
    assert modes == {
        "": False,
        "0": False,
        "1": False,
        "2": True,
        "3": True,
        "4": True,
        "5": True,
        "6": True,
        "7": True,
        "8": False,
        "8.parametrizations": False,
        "8.parametrizations.weight": False,
        "8.parametrizations.weight.0": True,
        "8.parametrizations.bias": False,
    }
    assert {n: m.training for n, m in net.named_modules()} == start


def test_mc_dropout_restores_after_exception_and_keeps_batchnorm_stats() -> None:
    net = zoo().eval()
    net[1].running_mean.fill_(0.5)
    outputs: list[torch.Tensor] = []

    def fails() -> None:
        with mc_dropout(net):
            outputs.append(net(torch.randn(2, 3, 5, 5) + 3))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fails()
    y1 = outputs[0]
    assert not any(m.training for m in net.modules())
    assert torch.equal(net[1].running_mean, torch.full((4,), 0.5))
    assert y1.shape == (2, 4, 3, 3)


def test_types_arguments_take_any_collection() -> None:
    class MyDrop(nn.Module):
        pass

    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Linear(3, 3), nn.Conv1d(3, 3, 1))
    add_dropout(net, after=[nn.Conv2d, nn.Conv1d])
    assert [type(m) for m in net] == [nn.Conv2d, SpatialDropout2d, nn.Linear, nn.Conv1d, SpatialDropout1d]
    plain = nn.Sequential(nn.Linear(2, 2), MyDrop())
    for include in ([MyDrop], {MyDrop}):
        with mc_dropout(plain, include=include):
            assert plain[1].training
    with mc_dropout(net, include=[]):  # an empty collection: nothing more than the known layers
        assert net[1].training
    with pytest.raises(TypeError, match=r"mc_dropout: include must be an nn.Module subclass or a tuple"):
        enter(mc_dropout(net, include="MyDrop"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"add_dropout: after must be an nn.Module subclass or a non-empty"):
        add_dropout(net, after=nn.Sequential(nn.Conv2d(3, 3, 1)))  # type: ignore[arg-type]


def test_mc_dropout_samples_differ_include_and_errors() -> None:
    net = nn.Sequential(nn.Linear(8, 8), SpatialDropout1d(0.5)).eval()
    x = torch.randn(4, 8, 3)
    x = x.transpose(1, 2)  # (N, L, C) -> Linear over C, channels last for the dropout
    net[1].channel_dim = -1
    assert torch.equal(net(x), net(x))
    with mc_dropout(net):
        assert not torch.equal(net(x), net(x))

    class MyDrop(nn.Module):
        pass

    plain = nn.Sequential(nn.Linear(2, 2), MyDrop())
    with pytest.raises(
        ValueError, match=r"mc_dropout: model must be a model with dropout layers, got one with only"
    ):
        enter(mc_dropout(plain))
    with mc_dropout(plain, include=MyDrop):
        assert plain[1].training
        assert not plain[0].training
    with pytest.raises(TypeError, match=r"mc_dropout: include must be an nn.Module subclass"):
        enter(mc_dropout(net, include=(str,)))
    with pytest.raises(TypeError, match=r"mc_dropout: model must be an nn.Module, got int"):
        enter(mc_dropout(3))  # type: ignore[arg-type]


# --- mc_predict --------------------------------------------------------------------------


def test_mc_predict_equals_manual_samples() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), SpatialDropout2d(0.4), nn.Flatten(), nn.Linear(96, 5)
    )
    x = torch.randn(3, 3, 6, 6)
    net.train()
    torch.manual_seed(1)
    out = mc_predict(net, x, samples=25)
    assert isinstance(out, MCPrediction)
    assert out.entropy is None
    assert net.training  # modes restored
    torch.manual_seed(1)
    with mc_dropout(net), torch.no_grad():
        ys = torch.stack([net(x) for _ in range(25)])
    assert torch.allclose(out.mean, ys.mean(0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.variance, ys.var(0, correction=0), rtol=1e-4, atol=1e-6)
    assert not out.mean.requires_grad
    # softmax: probabilities averaged, entropy of the mean
    torch.manual_seed(1)
    sm = mc_predict(net, x, samples=25, softmax=True)
    probs = ys.softmax(-1)
    assert torch.allclose(sm.mean, probs.mean(0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(sm.variance, probs.var(0, correction=0), rtol=1e-4, atol=1e-7)
    pbar = probs.mean(0)
    assert torch.allclose(sm.entropy, -(pbar * pbar.log()).sum(-1), rtol=1e-5)
    assert ((sm.entropy >= 0) & (sm.entropy <= math.log(5) + 1e-6)).all()


def test_mc_predict_batched_equals_manual_batched() -> None:
    net = nn.Sequential(nn.Conv1d(2, 6, 3), SpatialDropout1d(0.5), nn.Conv1d(6, 3, 1))
    x = torch.randn(4, 2, 10)
    torch.manual_seed(3)
    out = mc_predict(net, x, samples=8, batched=True, softmax=True)
    torch.manual_seed(3)
    with mc_dropout(net), torch.no_grad():
        ys = net(x.repeat(8, 1, 1)).reshape(8, 4, 3, 8).softmax(2)
    assert torch.allclose(out.mean, ys.mean(0), rtol=1e-5, atol=1e-7)
    assert torch.allclose(out.variance, ys.var(0, correction=0), rtol=1e-4, atol=1e-7)
    assert out.entropy.shape == (4, 8)  # dense output: entropy per position
    # each repeated sample got its own masks
    assert not torch.equal(ys[0], ys[1])


def test_mc_predict_loop_and_batched_agree_statistically() -> None:
    # y = x * mask / (1 - p) per channel: mean x, variance x^2 p / (1 - p)
    p, samples = 0.3, 4000
    net = nn.Sequential(SpatialDropout1d(p))
    x = torch.full((1, 2, 1), 2.0)
    for batched in (False, True):
        out = mc_predict(net, x, samples=samples, batched=batched)
        var = 4.0 * p / (1 - p)
        assert torch.allclose(out.mean, x, atol=5 * math.sqrt(var / samples))
        # variance of a Bernoulli sample: relative error well under 10% at 4000 samples
        assert torch.allclose(out.variance, torch.full_like(x, var), rtol=0.1)


def test_mc_predict_any_rank_and_dtypes() -> None:
    net = nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.5))
    one = mc_predict(net, torch.randn(5), samples=4, softmax=True, class_dim=0)  # unbatched vector
    assert one.mean.shape == (3,)
    assert one.entropy.shape == ()
    out = mc_predict(net.double(), torch.randn(2, 7, 5, dtype=torch.float64), samples=3)
    assert out.mean.dtype == torch.float64
    half = mc_predict(nn.Sequential(nn.Dropout(0.5)), torch.randn(3, 4, dtype=torch.bfloat16), samples=3)
    assert half.mean.dtype == torch.float32  # accumulated in float32
    assert torch.equal(mc_predict(net.float(), torch.randn(2, 5), samples=1).variance, torch.zeros(2, 3))


def test_welford_is_accurate_with_a_large_offset() -> None:
    net = nn.Sequential(nn.Dropout(0.5))
    x = torch.full((1, 64), 3.0)
    torch.manual_seed(0)
    offset = mc_predict(nn.Sequential(OffsetBy(1e4), nn.Dropout(0.5)), x, samples=50)
    torch.manual_seed(0)
    with mc_dropout(net), torch.no_grad():
        ys = torch.stack([net(x + 1e4).double() for _ in range(50)])
    assert torch.allclose(offset.variance.double(), ys.var(0, correction=0), rtol=1e-4)


class OffsetBy(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c


def test_mc_predict_does_not_touch_input_or_batchnorm() -> None:
    net = nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Identity())
    net[0].running_mean.fill_(1.0)
    x = torch.randn(8, 4)
    x0 = x.clone()
    mc_predict(net, x, samples=5)
    with pytest.warns(UserWarning, match="p = 0"):
        mc_predict(nn.Sequential(nn.Identity(), nn.Dropout(0.0)), x, samples=5)  # identity output
    assert torch.equal(x, x0)
    assert torch.equal(net[0].running_mean, torch.ones(4))


def test_mc_predict_errors() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"mc_predict: samples must be an int >= 1, got 0"):
        mc_predict(net, x, samples=0)
    with pytest.raises(TypeError, match=r"mc_predict: samples must be an int, got True"):
        mc_predict(net, x, samples=True)
    with pytest.raises(TypeError, match=r"mc_predict: softmax must be a bool, got 1"):
        mc_predict(net, x, softmax=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"mc_predict: batched must be a bool"):
        mc_predict(net, x, batched=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mc_predict: class_dim must be a dim of the 2-D output, got 2"):
        mc_predict(net, x, softmax=True, class_dim=2)
    with pytest.raises(ValueError, match=r"mc_predict: class_dim must be a dim of the 2-D output, got -3"):
        mc_predict(net, x, softmax=True, class_dim=-3, batched=True)
    with pytest.raises(TypeError, match=r"mc_predict: x must be a torch.Tensor, got list"):
        mc_predict(net, [1.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"mc_predict: model must be an nn.Module"):
        mc_predict(lambda t: t, x)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"mc_predict: batched must be False for a model with filter dropout"
    ):
        mc_predict(nn.Sequential(filter_dropout(nn.Conv1d(4, 3, 1))), x[..., None], batched=True)
    with pytest.raises(
        ValueError, match=r"batched must be False for a model whose output does not keep the batch"
    ):
        mc_predict(nn.Sequential(nn.Dropout(0.5), OffsetBy(0.0), Summed()), x, batched=True)
    with pytest.raises(
        TypeError, match=r"mc_predict: model must be a model that returns a tensor, got tuple"
    ):
        mc_predict(nn.Sequential(nn.Dropout(0.5), Pair()), x)
    with pytest.raises(ValueError, match=r"model must be a model with dropout layers"):
        mc_predict(nn.Linear(4, 3), x)


def enter(cm: object) -> None:
    with cm:  # type: ignore[attr-defined]
        pass


class Summed(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(0)


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


# --- MC dropout of keyed models, inactive dropout ---------------------------------------------


def keyed_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), SpatialDropout2d(0.4), nn.Flatten(), nn.Linear(96, 5))
    return keyed_masks(net, seed=9)


def test_mc_predict_of_a_keyed_model_draws_a_fresh_key_per_pass() -> None:
    net = keyed_net()
    x = torch.randn(3, 3, 6, 6)
    ids = torch.tensor([4, 5, 6])
    with mask_context(step=7, sample_ids=ids):
        out = mc_predict(net, x, samples=20)
        again = mc_predict(net, x, samples=20)
    assert (out.variance > 0).all()  # not one mask repeated 20 times
    assert torch.equal(out.mean, again.mean)  # as reproducible as the keyed masks
    assert torch.equal(out.variance, again.variance)
    # pass t keys layer l with mc_layer(l, t): the documented rule, checked by hand
    drop = net[1]
    with mask_context(step=7, sample_ids=ids), mc_dropout(net), torch.no_grad():
        ys = []
        for t in range(20):
            key = MaskKey(9, 7, mc_layer(drop.keyed_layer, t), ids)
            h = net[0](x)
            ys.append(net[3](net[2](spatial_dropout(h, 0.4, key=key))))
    ys_t = torch.stack(ys)
    assert torch.allclose(out.mean, ys_t.mean(0), rtol=1e-5, atol=1e-6)
    with mask_context(step=7, sample_ids=ids), torch.no_grad():
        first = net(x)  # pass 0 is the ordinary keyed forward
    assert torch.equal(first, ys_t[0])


def test_mc_predict_of_a_keyed_model_needs_a_context_and_no_batching() -> None:
    net = keyed_net()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(
        RuntimeError, match=r"mc_predict: the model draws keyed masks.*also for inference.*mask_context"
    ) as e:
        mc_predict(net, x, samples=3)
    assert "training" not in str(e.value)
    with (
        mask_context(step=0, sample_ids=torch.arange(2)),
        pytest.raises(ValueError, match=r"mc_predict: batched must be False for a model with keyed masks"),
    ):
        mc_predict(net, x, samples=3, batched=True)


def test_mc_predict_warns_when_no_dropout_layer_is_active() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), SpatialDropout2d(0.3), DropPath(0.2))
    sched = DropSchedule(net, target_p=0.3, total_steps=10)  # step 0: p = 0
    x = torch.randn(2, 3, 5, 5)
    with pytest.warns(UserWarning, match=r"mc_predict: every dropout layer of the model has p = 0"):
        out = mc_predict(net, x, samples=4)
    assert (out.variance == 0).all()
    sched.step(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (mc_predict(net, x, samples=4).variance > 0).any()
