"""convert_dropout, and mc_dropout/mc_predict over every kind of dropout layer.

Three parts: small torch nets (Dropout1d/2d/3d, FeatureAlphaDropout) and stand-ins for timm's and
torchvision's layers (classes with the peers' module paths, names and attributes) in the default
run; the real timm and torchvision models, marked ``models``, in the second environment
(``bash dev/test.sh``), where timm and torchvision import. The stand-ins check the converter's
logic where the peers cannot be installed; the real models check it against the peers themselves.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

import spatialdrop as sd
from distributed import run_world
from spatialdrop import (
    AlphaSpatialDropout,
    DropBlock2d,
    DropBlock3d,
    DropPath,
    DropSchedule,
    SpatialDropout,
    SpatialDropout1d,
    SpatialDropout3d,
    convert_dropout,
    keyed_masks,
    mask_context,
    mc_dropout,
    mc_predict,
)
from spatialdrop._module import StructuredDropout

ROOT = Path(__file__).resolve().parents[1]


def _ours(model: nn.Module) -> list[tuple[str, StructuredDropout]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, StructuredDropout)]


def _peers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of the peers that convert_dropout converts (by exact class)."""
    torch_kinds = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)
    names = {"DropPath", "DropBlock2d", "DropBlock3d", "StochasticDepth"}
    return [
        (n, m)
        for n, m in model.named_modules()
        if type(m) in torch_kinds
        or (type(m).__module__.split(".")[0] in ("timm", "torchvision") and type(m).__name__ in names)
    ]


# --- small torch nets ------------------------------------------------------------------------


class TorchNet(nn.Module):
    """Every torch kind that is converted, each on the input ranks torch reads it at."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Conv1d(3, 6, 3)
        self.drop1 = nn.Dropout1d(0.3)
        self.img = nn.Conv2d(3, 6, 3)
        self.drop2 = nn.Dropout2d(0.4)
        self.vol = nn.Conv3d(3, 6, 3)
        self.drop3 = nn.Dropout3d(0.5, inplace=True)
        self.alpha = nn.Sequential(nn.SELU(), nn.FeatureAlphaDropout(0.2))
        self.keep = nn.Dropout(0.1)  # elementwise: stays
        self.head = nn.Linear(6 * 3, 4)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        a = self.drop1(self.seq(x1)).mean(-1)
        b = self.alpha(self.drop2(self.img(x2))).mean((-2, -1))
        c = self.drop3(self.vol(x3)).mean((-3, -2, -1))
        return self.head(self.keep(torch.cat([a, b, c], dim=1)))


def _inputs(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(n, 3, 12, generator=g),
        torch.randn(n, 3, 8, 8, generator=g),
        torch.randn(n, 3, 5, 5, 5, generator=g),
    )


def test_torch_net_converts_to_the_same_layers_bit_for_bit() -> None:
    net = TorchNet()
    ref = copy.deepcopy(net)
    keys = list(net.state_dict())
    x = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact kinds: no warning
        out = convert_dropout(net)
    assert out is net
    assert _peers(net) == []
    kinds = {n: (type(m), m.p, m.inplace) for n, m in _ours(net)}
    assert kinds == {
        "drop1": (SpatialDropout1d, 0.3, False),
        "drop2": (SpatialDropout, 0.4, False),
        "drop3": (SpatialDropout3d, 0.5, True),
        "alpha.1": (AlphaSpatialDropout, 0.2, False),
    }
    assert type(net.keep) is nn.Dropout
    assert list(net.state_dict()) == keys
    # training mode: the same bits as torch's layers for the same seed (these kinds are exact)
    torch.manual_seed(5)
    want = ref(*x)
    torch.manual_seed(5)
    got = net(*x)
    assert torch.equal(got, want)
    net.eval(), ref.eval()
    assert torch.equal(net(*x), ref(*x))


@pytest.mark.parametrize(
    ("torch_layer", "shape"),
    [
        (nn.Dropout1d(0.5), (6, 10)),  # unbatched (C, L)
        (nn.Dropout2d(0.5), (4, 6, 10)),  # torch reads a 3-D input as (N, C, L); so does SpatialDropout
        (nn.Dropout2d(0.5), (4, 6, 3, 2, 2)),  # any rank: (N, C, *)
        (nn.Dropout3d(0.5), (6, 3, 4, 4)),  # unbatched (C, D, H, W)
        (nn.FeatureAlphaDropout(0.5), (4, 6, 7)),
    ],
)
def test_every_input_rank_torch_reads_keeps_its_meaning(
    torch_layer: nn.Module, shape: tuple[int, ...]
) -> None:
    ours = convert_dropout(copy.deepcopy(torch_layer))  # the layer itself: its replacement comes back
    assert isinstance(ours, StructuredDropout)
    x = torch.randn(shape)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warning for a 3-D or 5-D dropout2d input
        want = torch_layer(x)
    torch.manual_seed(3)
    assert torch.equal(ours(x), want)


def test_training_step_and_schedule_on_a_converted_net() -> None:
    net = convert_dropout(TorchNet())
    x = _inputs()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    loss = nn.functional.cross_entropy(net(*x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    # DropSchedule finds every converted layer; factors = the converted rates keep them at the end
    rates = {n: m.p for n, m in _ours(net)}
    sched = DropSchedule(net, target_p=1.0, total_steps=10, scale=lambda name, m: m.p)
    assert [n for n, _ in sched.modules] == list(rates)
    assert all(m.p == 0 for _, m in _ours(net))
    sched.step(10)
    assert {n: m.p for n, m in _ours(net)} == rates


def test_keyed_masks_drive_converted_layers_invariant_to_the_split() -> None:
    net = convert_dropout(TorchNet())
    net.keep = nn.Identity()  # nn.Dropout stays torch's, which draws from torch's generator
    net = keyed_masks(net, seed=11)
    x = _inputs(6)
    ids = torch.arange(100, 106)
    with mask_context(step=2, sample_ids=ids):
        whole = net(*x)
    with mask_context(step=2, sample_ids=ids[:2]):
        first = net(*(t[:2] for t in x))
    with mask_context(step=2, sample_ids=ids[2:]):
        rest = net(*(t[2:] for t in x))
    torch.testing.assert_close(torch.cat([first, rest]), whole, rtol=1e-6, atol=1e-6)
    with mask_context(step=3, sample_ids=ids):
        other = net(*x)
    assert not torch.allclose(other, whole)  # the step changes the masks: they act
    with pytest.raises(RuntimeError, match="mask_context"):
        net(*x)  # keyed and training: outside a context the layer raises


def _keyed_outputs(net: nn.Module) -> torch.Tensor:
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    with mask_context(step=5, sample_ids=torch.arange(4)):
        return net(x)


def _mixed() -> nn.Sequential:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(8, 8, 1), TimmDropPath(drop_prob=0.5, scale_by_keep=True))
    return nn.Sequential(nn.Conv2d(3, 8, 3), sd.SpatialDropout2d(0.5), nn.Dropout2d(0.5), block)


def test_convert_after_keyed_masks_carries_the_keys() -> None:
    from spatialdrop.keyed import layer_id

    want = keyed_masks(convert_dropout(_mixed()), seed=11)  # converted, then keyed
    net = _mixed()
    net[3] = torch.compile(net[3])  # a wrapper in the path: the id of the bare name all the same
    with pytest.warns(UserWarning, match=r"keyed_masks: 2 dropout layer\(s\) cannot draw keyed masks"):
        keyed_masks(net, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: every new layer is keyed
        convert_dropout(net)
    new = [net[2], net[3]._orig_mod[1]]
    assert [type(m) for m in new] == [sd.SpatialDropout, sd.DropPath]
    assert [(m.keyed_seed, m.keyed_layer) for m in new] == [(11, layer_id("2")), (11, layer_id("3.1"))]
    assert torch.equal(_keyed_outputs(net), _keyed_outputs(want))
    keyed_masks(net, None)  # switched off: the carried keys go too
    plain = _mixed()
    keyed_masks(plain, None)
    convert_dropout(plain)
    assert all(m.keyed_seed is None for m in plain.modules() if isinstance(m, StructuredDropout))


def test_convert_warns_when_a_keyed_model_gets_unkeyed_layers() -> None:
    net = keyed_masks(_mixed()[:2], seed=11)
    net.append(nn.Dropout2d(0.5))  # added after keyed_masks: it has no key to hand on
    with pytest.warns(UserWarning, match=r"convert_dropout: the model draws keyed masks, but 1 new layer"):
        convert_dropout(net)
    assert net[2].keyed_seed is None


@pytest.mark.parametrize("layer", [sd.SpatialDropout(0.1), sd.DropBlock2d(0.1, 3), sd.DropPath(0.1)])
def test_torchscript_is_refused_clearly(layer: nn.Module) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(layer))
    torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout2d(0.1)))  # torch's: scriptable
    name = type(layer).__name__
    with pytest.raises(
        TypeError, match=rf"torch.jit.script: {name} \(spatialdrop\) does not support TorchScript"
    ):
        torch.jit.script(net)


@pytest.mark.slow
def test_converted_net_compiles_fullgraph() -> None:
    conv = nn.Conv2d(3, 8, 3)
    net = convert_dropout(nn.Sequential(conv, nn.Dropout2d(0.5), TimmDropPath(drop_prob=0.5)))
    compiled = torch.compile(net, fullgraph=True)  # fullgraph: no graph break anywhere
    x = torch.randn(16, 3, 6, 6)
    y = compiled(x)
    y.sum().backward()
    # every (sample, channel) map is dropped (by either layer) or kept and scaled by 1/(0.5 * 0.5)
    ref = conv(x).detach() * 4
    kept = (y != 0).flatten(2).all(-1)
    assert torch.equal(kept, (y != 0).flatten(2).any(-1))
    torch.testing.assert_close(y.detach()[kept], ref[kept])
    assert 0 < int(kept.sum()) < kept.numel()


def _wrapped_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    """One rank: a converted net's keyed outputs plain, under DDP and under FSDP2 (all must agree)."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    def make() -> nn.Module:
        torch.manual_seed(0)
        return convert_dropout(
            nn.Sequential(
                nn.Conv2d(3, 8, 3),
                nn.Dropout2d(0.5),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3),
                nn.Dropout2d(0.5),
                nn.Flatten(),
                nn.Linear(8 * 4 * 4, 4),
            )
        )

    x, ids = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(4)
    plain = sd.keyed_masks(make(), seed=3)
    with sd.mask_context(step=1, sample_ids=ids):
        out = {"plain": plain(x).detach()}
    out["eval"] = plain.eval()(x).detach()  # no dropout: differs where the masks acted
    for name, wrap in (("ddp", DDP), ("fsdp2", fully_shard)):
        model = sd.keyed_masks(wrap(make()), seed=3)  # keyed after wrapping: names keep their ids
        with sd.mask_context(step=1, sample_ids=ids):
            got = model(x)
            got.sum().backward()
        out[name] = got.detach()
    return out


@pytest.mark.slow
def test_converted_net_under_ddp_and_fsdp2(tmp_path: Path) -> None:
    (out,) = run_world(_wrapped_worker, 1, tmp_path, timeout_s=120)
    assert not torch.allclose(out["plain"], out["eval"])  # the converted layers drop
    for name in ("ddp", "fsdp2"):
        torch.testing.assert_close(out[name], out["plain"], rtol=0, atol=0)


# --- stand-ins for timm's and torchvision's layers --------------------------------------------


def _standin(module: str, name: str, forward: Callable[..., torch.Tensor]) -> type[nn.Module]:
    """A class with the peer's module path and name; attributes are set per instance."""

    def __init__(self: nn.Module, **attrs: Any) -> None:
        nn.Module.__init__(self)
        for k, v in attrs.items():
            setattr(self, k, v)

    return type(name, (nn.Module,), {"__module__": module, "__init__": __init__, "forward": forward})


def _drop_sample(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    p = getattr(self, "drop_prob", getattr(self, "p", 0.0))
    if not self.training or p == 0:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


TimmDropPath = _standin("timm.layers.drop", "DropPath", _drop_sample)
TimmDropBlock2d = _standin("timm.layers.drop", "DropBlock2d", _drop_sample)
StochasticDepth = _standin("torchvision.ops.stochastic_depth", "StochasticDepth", _drop_sample)
TvDropBlock2d = _standin("torchvision.ops.drop_block", "DropBlock2d", _drop_sample)
TvDropBlock3d = _standin("torchvision.ops.drop_block", "DropBlock3d", _drop_sample)


def timm_drop_block(drop_prob: float = 0.1, **kw: Any) -> nn.Module:
    attrs = dict(
        drop_prob=drop_prob,
        block_size=7,
        gamma_scale=1.0,
        with_noise=False,
        inplace=False,
        couple_channels=True,
        scale_by_keep=True,
    )
    return TimmDropBlock2d(**{**attrs, **kw})


class PeerNet(nn.Module):
    """A conv net with a BatchNorm and one layer of each peer kind."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.path = TimmDropPath(drop_prob=0.2, scale_by_keep=True)
        self.block = timm_drop_block(0.1, block_size=5, gamma_scale=0.25)
        self.depth = StochasticDepth(p=0.3, mode="row")
        self.tv_block = TvDropBlock2d(p=0.15, block_size=3, inplace=False, eps=1e-6)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x)).relu()
        h = h + self.path(self.block(h)) + self.depth(self.tv_block(h))
        return self.head(h.mean((2, 3)))


def test_peer_layers_map_to_ours_with_their_settings() -> None:
    net = PeerNet()
    with pytest.warns(UserWarning, match="DropBlock2d -> spatialdrop DropBlock2d") as record:
        convert_dropout(net)
    assert _peers(net) == []
    assert isinstance(net.path, DropPath)
    assert (net.path.p, net.path.scale) == (0.2, True)
    assert isinstance(net.depth, DropPath)
    assert net.depth.p == 0.3
    b = net.block
    assert isinstance(b, DropBlock2d)
    assert (b.p, b.block_size, b.shared_channels, b.scale, b.seeding) == (
        0.025,
        5,
        True,
        "realized",
        "uniform",
    )
    t = net.tv_block
    assert isinstance(t, DropBlock2d)
    assert (t.p, t.block_size, t.shared_channels, t.scale) == (0.15, 3, False, "realized")
    # one warning per kind whose meaning changes (the two DropBlocks), none for the exact kinds
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert messages[0].startswith(
        "convert_dropout: timm DropBlock2d -> spatialdrop DropBlock2d: every position"
    )
    assert "exactly p = drop_prob * gamma_scale" in messages[0]
    assert "whole batch" in messages[0]
    assert messages[1].startswith("convert_dropout: torchvision DropBlock2d -> spatialdrop DropBlock2d")


def test_peer_settings_variants() -> None:
    net = nn.Sequential(
        TimmDropPath(drop_prob=0.1, scale_by_keep=False),
        timm_drop_block(0.2, couple_channels=False, scale_by_keep=False, inplace=True),
        timm_drop_block(0.2, with_noise=True),
        timm_drop_block(0.2, with_noise=True),
        TvDropBlock3d(p=0.1, block_size=(1, 3, 3), inplace=True, eps=1e-6),
    )
    with pytest.warns(UserWarning, match="DropBlock") as record:
        convert_dropout(net)
    assert not net[0].scale
    assert (net[1].shared_channels, net[1].scale, net[1].inplace) == (False, "none", True)
    assert (net[2].shared_channels, net[2].scale) == (True, "none")  # noise: zeros, unscaled
    assert isinstance(net[4], DropBlock3d)
    assert (net[4].block_size, net[4].inplace) == ((1, 3, 3), True)
    timm_notes = [str(w.message) for w in record if "timm DropBlock2d" in str(w.message)]
    assert len(timm_notes) == 1  # once per kind, the noise note once
    assert timm_notes[0].count("with_noise=True has no counterpart") == 1
    # an older timm DropBlock2d (no couple_channels, gamma_scale, scale_by_keep): per-channel masks
    with pytest.warns(UserWarning, match="timm DropBlock2d"):
        old = convert_dropout(TimmDropBlock2d(drop_prob=0.1, block_size=3, inplace=False))
    assert (old.p, old.shared_channels, old.scale) == (0.1, False, "realized")


def test_modes_sharing_and_eval_output_are_kept() -> None:
    shared = TimmDropPath(drop_prob=0.1, scale_by_keep=True)
    net = nn.Sequential(nn.Linear(4, 4), shared, nn.ModuleList([shared]), TimmDropPath(drop_prob=0.2))
    net[3].eval()
    x = torch.randn(3, 4)
    net.eval()
    want = net[1](net[0](x))
    net.train()
    net[3].eval()
    convert_dropout(net)
    assert isinstance(net[1], DropPath)
    assert net[1] is net[2][0]
    assert (net[1].training, net[3].training) == (True, False)
    net.eval()
    assert torch.equal(net[1](net[0](x)), want)


def test_batch_mode_stochastic_depth_is_refused_and_nothing_changes() -> None:
    net = nn.Sequential(TimmDropPath(drop_prob=0.1), nn.Sequential(StochasticDepth(p=0.2, mode="batch")))
    with pytest.raises(
        ValueError,
        match=r"convert_dropout: model must be a model whose layers to convert all have a spatialdrop "
        r"counterpart \(1\.0: mode='batch' draws one keep-or-drop for the whole batch.*; leave it as it "
        r"is with exclude=\['1\.0'\]\), got torchvision StochasticDepth\(p=0\.2, mode='batch'\)",
    ):
        convert_dropout(net)
    assert type(net[0]) is TimmDropPath  # nothing changed
    convert_dropout(net, exclude="1.0")
    assert isinstance(net[0], DropPath)
    assert type(net[1][0]) is StochasticDepth


def test_a_setting_our_layer_refuses_names_the_layer() -> None:
    net = nn.Sequential(timm_drop_block(1.0, block_size=3))
    with pytest.raises(
        ValueError, match=r"convert_dropout: .*\(0: DropBlock2d: p must be a probability in \[0, 1\)"
    ):
        convert_dropout(net)


def test_include_and_exclude() -> None:
    def net() -> nn.Module:
        return nn.Sequential(
            nn.Dropout2d(0.1),
            nn.Sequential(nn.Dropout1d(0.2), TimmDropPath(drop_prob=0.3)),
            nn.Dropout3d(0.4),
        )

    only = convert_dropout(net(), include=(nn.Dropout2d, TimmDropPath))
    assert [type(m) for m in only.modules()][1:] == [
        SpatialDropout,
        nn.Sequential,
        nn.Dropout1d,
        DropPath,
        nn.Dropout3d,
    ]
    by_name = convert_dropout(net(), exclude=["1", "0"])  # a name excludes what is inside it
    assert [type(m) for m in by_name.modules()][1:] == [
        nn.Dropout2d,
        nn.Sequential,
        nn.Dropout1d,
        TimmDropPath,
        SpatialDropout3d,
    ]
    by_type = convert_dropout(net(), exclude=nn.Dropout3d)
    assert type(by_type[2]) is nn.Dropout3d
    assert isinstance(by_type[1][1], DropPath)


def test_errors() -> None:
    with pytest.raises(TypeError, match=r"convert_dropout: model must be an nn.Module, got int"):
        convert_dropout(3)  # type: ignore[arg-type]
    net = nn.Sequential(nn.Dropout2d(0.1))
    with pytest.raises(
        ValueError, match=r"convert_dropout: include must be layer types that convert_dropout "
    ):
        convert_dropout(net, include=nn.Dropout)
    with pytest.raises(TypeError, match=r"convert_dropout: include must be None or layer types"):
        convert_dropout(net, include=("Dropout2d",))  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"convert_dropout: exclude must be names from model.named_modules\(\), "
    ):
        convert_dropout(net, exclude=["1"])
    with pytest.raises(
        TypeError, match=r"convert_dropout: exclude must be module names \(str\) and nn.Module"
    ):
        convert_dropout(net, exclude=[3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"convert_dropout: verbose must be a bool, got 1"):
        convert_dropout(net, verbose=1)  # type: ignore[arg-type]
    assert type(net[0]) is nn.Dropout2d


class MyDropout2d(nn.Dropout2d):
    pass


@pytest.mark.parametrize(
    ("model", "kwargs", "got"),
    [
        (nn.Sequential(nn.Linear(2, 2)), {}, "got one without dropout layers"),
        (  # without a spatialdrop layer: with one, nothing to convert is a no-op (see below)
            nn.Sequential(nn.Dropout(0.1), MyDropout2d(0.1)),
            {},
            "got one whose dropout layers are Dropout x1 (elementwise: no counterpart, stays), "
            "MyDropout2d x1 (a subclass: left alone)",
        ),
        (
            nn.Sequential(nn.Dropout1d(0.1), nn.Dropout1d(0.1)),
            {"include": nn.Dropout2d},
            "torch Dropout2d, as include asks), got one whose dropout layers are Dropout1d x2 (not included)",
        ),
        (
            nn.Sequential(nn.Dropout1d(0.1), nn.Sequential(nn.Dropout1d(0.1))),
            {"exclude": ["0", "1"]},
            "got one whose dropout layers are Dropout1d x1 (excluded), "
            "Dropout1d x1 (inside an excluded module)",
        ),
    ],
)
def test_nothing_to_convert_is_an_error_that_says_why(model: nn.Module, kwargs: dict, got: str) -> None:
    with pytest.raises(
        ValueError, match=r"convert_dropout: model must be a model that holds a layer to convert"
    ) as e:
        convert_dropout(model, **kwargs)
    assert str(e.value).endswith(got)


@pytest.mark.parametrize("include", [None, [nn.Dropout2d], {nn.Dropout2d, nn.Dropout1d}])
def test_a_second_conversion_is_a_no_op(include: Any, capsys: pytest.CaptureFixture[str]) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout2d(0.2), nn.Dropout(0.1), MyDropout2d(0.1))
    assert convert_dropout(net, include=include) is net
    converted = list(net)
    capsys.readouterr()
    assert convert_dropout(net, include=include) is net  # no error, nothing changed
    assert list(net) == converted
    assert capsys.readouterr().out == ""
    convert_dropout(net, include=include, verbose=True)
    assert capsys.readouterr().out.splitlines() == [
        "converted 0 layers: nothing to convert, the model's dropout layers are Dropout x1 (elementwise: "
        "no counterpart, stays), MyDropout2d x1 (a subclass: left alone), SpatialDropout x1 "
        "(spatialdrop's already)"
    ]


@pytest.mark.parametrize(
    "include",
    [
        [nn.Dropout2d, TimmDropPath],
        {nn.Dropout2d, TimmDropPath},
        dict.fromkeys([nn.Dropout2d, TimmDropPath]).keys(),
    ],
)
def test_include_takes_any_collection_of_types(include: Any) -> None:
    net = nn.Sequential(nn.Dropout2d(0.1), nn.Dropout1d(0.1), TimmDropPath(drop_prob=0.1))
    convert_dropout(net, include=include)
    assert [type(m) for m in net] == [sd.SpatialDropout, nn.Dropout1d, sd.DropPath]


def test_verbose_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 3, 1),
        TimmDropPath(drop_prob=0.1 / 3, scale_by_keep=True),
        nn.Dropout3d(0.0, inplace=True),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_dropout(net, verbose=True)
    assert capsys.readouterr().out.splitlines() == [
        "module  from                                  to",
        "1       timm DropPath(drop_prob=0.03333)      DropPath(p=0.03333)",
        "2       torch Dropout3d(p=0.0, inplace=True)  SpatialDropout3d(p=0.0, inplace=True)",
        "converted 2 layers: timm DropPath x1, torch Dropout3d x1",
    ]
    assert net[1].p == 0.1 / 3  # the table rounds, the layer keeps the exact rate


# --- mc_dropout and mc_predict over every kind ---------------------------------------------------


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_mc_dropout_finds_peer_layers_and_keeps_batchnorm_frozen() -> None:
    net = PeerNet().train()
    net.bn.running_mean.fill_(0.25)
    with mc_dropout(net):
        modes = {n: m.training for n, m in net.named_modules()}
    assert modes == {
        "": False,
        "conv": False,
        "bn": False,
        "path": True,
        "block": True,
        "depth": True,
        "tv_block": True,
        "head": False,
    }
    assert all(m.training for m in net.modules())  # restored
    only_peers = nn.Sequential(nn.Linear(3, 3), TimmDropPath(drop_prob=0.5))
    with mc_dropout(only_peers):  # no longer "a model with dropout layers ... got one with only"
        assert only_peers[1].training


def test_mc_predict_samples_peer_layers_without_conversion() -> None:
    net = PeerNet().eval()
    net.bn.running_mean.uniform_()
    before = _bn_state(net)
    x = torch.randn(4, 3, 6, 6)
    out = mc_predict(net, x, samples=20)
    assert (out.variance > 0).all()  # sampled: the peers' layers were on
    assert all(torch.equal(v, before[k]) for k, v in _bn_state(net).items())
    assert not any(m.training for m in net.modules())
    # the rates of the peers count for the all-zero warning
    quiet = nn.Sequential(nn.Linear(3, 3), TimmDropPath(drop_prob=0.0), StochasticDepth(p=0.0, mode="row"))
    with pytest.warns(UserWarning, match=r"mc_predict: every dropout layer of the model has p = 0"):
        mc_predict(quiet, torch.randn(2, 3), samples=3)


def test_mc_predict_include_and_batch_mode() -> None:
    class Mine(nn.Module):  # a dropout layer mc_dropout does not know
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * (torch.rand_like(x) > 0.5) * 2 if self.training else x

    net = nn.Sequential(nn.Linear(3, 3), Mine())
    with pytest.raises(ValueError, match=r"mc_predict: model must be a model with dropout layers"):
        mc_predict(net, torch.randn(2, 3))  # named: mc_predict, the function called
    assert (mc_predict(net, torch.randn(2, 3), samples=10, include=Mine).variance > 0).any()
    batch = nn.Sequential(nn.Linear(3, 3), StochasticDepth(p=0.5, mode="batch"))
    with pytest.raises(
        ValueError, match=r"mc_predict: batched must be False for a model with StochasticDepth"
    ):
        mc_predict(batch, torch.randn(2, 3), batched=True)
    assert mc_predict(batch, torch.randn(2, 3), samples=4).mean.shape == (2, 3)


# --- real models (timm, torchvision): the `models` environment -----------------------------------


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kw)

    return make


def _tv(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return make


MODELS = {
    # zero_init_last=False: timm zeroes each block's last BatchNorm scale at init, which would
    # zero the residual branches and with them everything DropBlock and DropPath act on
    "timm-resnet50": _timm("resnet50", drop_block_rate=0.1, drop_path_rate=0.05, zero_init_last=False),
    "timm-vit_tiny": _timm("vit_tiny_patch16_224", drop_path_rate=0.1, img_size=64),
    "timm-convnext_atto": _timm("convnext_atto", drop_path_rate=0.1),
    "tv-efficientnet_b0": _tv("efficientnet_b0"),
    "tv-convnext_tiny": _tv("convnext_tiny"),
}
EXACT = {"timm-vit_tiny", "timm-convnext_atto", "tv-efficientnet_b0", "tv-convnext_tiny"}  # no DropBlock


def _expected_p(m: nn.Module) -> float:
    if type(m).__name__ == "DropBlock2d" and type(m).__module__.startswith("timm."):
        return m.drop_prob * m.gamma_scale
    return float(getattr(m, "drop_prob", getattr(m, "p", None)))


@pytest.fixture(scope="module")
def x64() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.models
@pytest.mark.parametrize("name", list(MODELS))
def test_real_model_converts(name: str, x64: torch.Tensor) -> None:
    model = MODELS[name]()
    ref = copy.deepcopy(model)
    peers = {n: _expected_p(m) for n, m in _peers(model)}
    assert peers, "the model should have layers to convert"
    state = model.state_dict()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert convert_dropout(model) is model
    assert _peers(model) == []
    assert {n: m.p for n, m in _ours(model)} == pytest.approx(peers, rel=1e-12, abs=0)
    assert len(record) == (1 if name == "timm-resnet50" else 0)  # timm's DropBlock warns, once
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    model.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(model(x64), ref(x64))
    model.train(), ref.train()
    if name in EXACT:  # DropPath for timm's DropPath and torchvision's StochasticDepth: the same bits
        with torch.no_grad():
            torch.manual_seed(7)
            want = ref(x64)
            torch.manual_seed(7)
            assert torch.equal(model(x64), want)


@pytest.mark.models
@pytest.mark.parametrize("name", ["timm-convnext_atto", "tv-efficientnet_b0"])
def test_real_model_training_step(name: str, x64: torch.Tensor) -> None:
    model = convert_dropout(MODELS[name]()).train()
    sched = DropSchedule(model, target_p=1.0, total_steps=4, scale=lambda n, m: m.p)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    sched.step(2)  # half way up the ramp: every converted layer at half its rate
    assert all(m.p == pytest.approx(0.5 * f) for (_, m), f in zip(sched.modules, sched.factors))
    loss = model(x64).logsumexp(dim=1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed > len(before) // 2


@pytest.mark.models
@pytest.mark.slow
def test_real_resnet50_training_step(x64: torch.Tensor) -> None:
    model = convert_dropout(MODELS["timm-resnet50"]()).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model(x64).logsumexp(dim=1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()


def _dropped_masks(model: nn.Module) -> tuple[list[torch.Tensor], list[RemovableHandle]]:
    """Hooks that record, per call of a converted layer: 1 where it zeroed a nonzero input, 0 where
    it kept one, 2 where the input was 0."""
    masks: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        zero_in = args[0] == 0
        masks.append(((out == 0) & ~zero_in).to(torch.int8) + zero_in.to(torch.int8) * 2)

    return masks, [m.register_forward_hook(hook) for _, m in _ours(model)]


@pytest.mark.models
@pytest.mark.parametrize("name", ["timm-resnet50", "timm-vit_tiny"])
def test_real_model_keyed_masks_invariant_to_the_split(name: str) -> None:
    model = keyed_masks(convert_dropout(MODELS[name]()), seed=2024)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([40, 41, 42, 43])
    runs = []
    with mc_dropout(model), torch.no_grad():  # BatchNorm in eval: a sample's output is its own
        for parts in ([slice(0, 4)], [slice(0, 1), slice(1, 4)]):
            masks, hooks = _dropped_masks(model)
            outs = []
            for s in parts:
                with mask_context(step=9, sample_ids=ids[s]):
                    outs.append(model(x[s]))
            for h in hooks:
                h.remove()
            layers = len(_ours(model))
            per_layer = [torch.cat(masks[i::layers]) for i in range(layers)]
            runs.append((torch.cat(outs), per_layer))
    (whole, whole_masks), (split, split_masks) = runs
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5)
    dropped = 0
    for a, b in zip(whole_masks, split_masks):
        both = (a < 2) & (b < 2)  # where the layer's input was nonzero in both runs
        assert torch.equal(a[both], b[both])
        dropped += int(a[both].sum())
    assert dropped > 0  # the masks acted


@pytest.mark.models
@pytest.mark.parametrize("name", ["timm-resnet50", "tv-efficientnet_b0"])
def test_real_model_mc_predict_without_conversion(name: str, x64: torch.Tensor) -> None:
    model = MODELS[name]()
    if name == "timm-resnet50":  # timm's DropBlock and DropPath only: no nn.Dropout to lean on
        assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    # a randomly initialised model's eval-mode BatchNorm (mean 0, variance 1) lets the signal
    # fade to ~1e-14 through efficientnet's blocks: set the statistics from one batch first
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # a cumulative average: one batch sets it exactly
        model.train()(x64)
    model.eval()
    bn = _bn_state(model)
    assert bn
    out = mc_predict(model, x64, samples=3, softmax=True)
    assert (out.variance > 0).any()
    assert all(torch.equal(v, bn[k]) for k, v in _bn_state(model).items())
    assert not any(m.training for m in model.modules())


@pytest.mark.models
def test_converted_timm_model_refuses_torchscript_clearly() -> None:
    model = MODELS["timm-convnext_atto"]()
    torch.jit.script(model)  # timm's model is scriptable; converted, it is refused with a reason
    convert_dropout(model)
    with pytest.raises(
        TypeError, match=r"torch.jit.script: DropPath \(spatialdrop\) does not support TorchScript"
    ):
        torch.jit.script(model)


@pytest.mark.models
def test_example_convert_timm_runs() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "convert_timm.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["module", "from", "to"]
    assert "converted 24 layers: timm DropPath x15, timm DropBlock2d x9" in lines
