from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from spatialdrop import (
    AlphaSpatialDropout1d,
    DropPath,
    DropSchedule,
    FilterDropout,
    GaussianSpatialDropout2d,
    SpatialDropout2d,
    filter_dropout,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = filter_dropout(nn.Conv2d(3, 8, 3, padding=1))
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), SpatialDropout2d(0.5))
        self.stage2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), GaussianSpatialDropout2d(0.1))
        self.path = DropPath(0.3)
        self.torch_drop = nn.Dropout(0.25)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.path(self.stage2(self.stage1(h)))
        return self.head(self.torch_drop(h.mean((2, 3))))


DRIVEN = ["stem.parametrizations.weight.0", "stage1.1", "stage2.1", "path"]


def rates(net: nn.Module) -> dict[str, float]:
    return {n: m.p for n, m in net.named_modules() if hasattr(m, "p") and isinstance(m, nn.Module)}


# --- the ramp ----------------------------------------------------------------------------


def test_default_drives_every_spatialdrop_module_not_torch_ones() -> None:
    net = Net()
    sched = DropSchedule(net, target_p=0.4, total_steps=10)
    assert [n for n, _ in sched.modules] == DRIVEN
    assert isinstance(net.stem.parametrizations.weight[0], FilterDropout)
    assert rates(net) == dict.fromkeys(DRIVEN, 0.0) | {"torch_drop": 0.25}  # step 0 applied
    sched.step(5)
    assert rates(net) == dict.fromkeys(DRIVEN, 0.2) | {"torch_drop": 0.25}


@pytest.mark.parametrize("curve", ["linear", "cosine"])
@pytest.mark.parametrize(("start", "target"), [(0.0, 0.3), (0.1, 0.5), (0.5, 0.1)])
def test_ramp_values(curve: str, start: float, target: float) -> None:
    net = Net()
    total = 40
    sched = DropSchedule(net, target, total, start_p=start, curve=curve)
    for t in [0, 1, 7, 20, 39, 40, 41, 1000]:
        frac = min(t / total, 1.0)
        w = frac if curve == "linear" else (1 - math.cos(math.pi * frac)) / 2
        expected = start + (target - start) * w
        assert sched.step(t) == pytest.approx(expected, abs=1e-15)
        assert sched.p_at(t) == sched.step(t)
        assert net.path.p == sched.step(t)
    assert sched.step(total) == target  # exactly, no rounding left over
    assert sched.step(0) == start
    # monotone between the ends
    values = [sched.p_at(t) for t in range(total + 1)]
    diffs = [b - a for a, b in itertools.pairwise(values)]
    assert all(d >= 0 for d in diffs) if target >= start else all(d <= 0 for d in diffs)


def test_cosine_is_slow_at_both_ends() -> None:
    sched = DropSchedule(Net(), 0.2, 100, curve="cosine")
    lin = DropSchedule(Net(), 0.2, 100)
    assert sched.p_at(10) < lin.p_at(10)
    assert sched.p_at(90) > lin.p_at(90)
    assert sched.p_at(50) == pytest.approx(lin.p_at(50), abs=1e-15)


def test_zero_total_steps_is_constant_target() -> None:
    sched = DropSchedule(Net(), 0.3, 0, start_p=0.1)
    assert [sched.p_at(t) for t in (0, 1, 10)] == [0.3, 0.3, 0.3]


def test_p_at_changes_nothing_and_step_returns_base() -> None:
    net = Net()
    sched = DropSchedule(net, 0.2, 10)
    sched.step(3)
    before = rates(net)
    sched.p_at(9)
    assert rates(net) == before
    assert sched.last_step == 3


def test_forward_uses_the_scheduled_rate() -> None:
    net = nn.Sequential(DropPath(0.9))
    sched = DropSchedule(net, 0.5, 10)
    x = torch.ones(4000, 1)
    assert torch.equal(net(x), x)  # step 0: p = 0
    sched.step(10)
    dropped = int((net(x) == 0).sum())
    assert 1700 < dropped < 2300  # p = 0.5: binomial(4000, 0.5), far from 0 and 0.9


# --- per-module scaling and explicit modules ---------------------------------------------


def test_scale_mapping_and_callable() -> None:
    net = Net()
    sched = DropSchedule(net, 0.4, 10, scale={"stage1.1": 0.5, "path": 0.25})
    sched.step(10)
    r = rates(net)
    assert r["stage1.1"] == 0.2
    assert r["path"] == 0.1
    assert r["stage2.1"] == 0.4
    net2 = Net()
    depth = {"stage1": 1, "stage2": 2}
    DropSchedule(net2, 0.4, 10, scale=lambda name, m: depth.get(name.split(".")[0], 2) / 2).step(10)
    assert rates(net2)["stage1.1"] == 0.2
    assert rates(net2)["stage2.1"] == 0.4


def test_explicit_modules_by_object_or_name_torch_dropout_included() -> None:
    net = Net()
    sched = DropSchedule(net, 0.3, 10, modules=[net.torch_drop, "path"])
    assert [n for n, _ in sched.modules] == ["torch_drop", "path"]
    sched.step(10)
    r = rates(net)
    assert r["torch_drop"] == pytest.approx(0.3)
    assert r["path"] == pytest.approx(0.3)
    assert r["stage1.1"] == 0.5  # not driven, untouched


# --- state -------------------------------------------------------------------------------


def test_resume_continues_the_ramp() -> None:
    net_a = Net()
    a = DropSchedule(net_a, 0.3, 100, curve="cosine", scale={"path": 0.5})
    for t in range(38):
        a.step(t)
    state = a.state_dict()
    assert state == {"curve": "cosine", "last_step": 37, "start_p": 0.0, "target_p": 0.3, "total_steps": 100}
    # a fresh run with other arguments: loading restores the ramp and the rates
    net_b = Net()
    b = DropSchedule(net_b, 0.9, 5, scale={"path": 0.5})
    b.load_state_dict(state)
    assert rates(net_b) == rates(net_a)
    for t in (38, 60, 120):
        assert b.step(t) == a.step(t)
        assert rates(net_b) == rates(net_a)
    # it survives torch.save / torch.load of a checkpoint dict
    import io

    buf = io.BytesIO()
    torch.save({"sched": b.state_dict()}, buf)
    buf.seek(0)
    c = DropSchedule(Net(), 0.1, 1)
    c.load_state_dict(torch.load(buf)["sched"])
    assert c.state_dict() == b.state_dict()


def test_load_state_dict_validates() -> None:
    sched = DropSchedule(Net(), 0.3, 10)
    good = sched.state_dict()
    with pytest.raises(ValueError, match=r"DropSchedule.load_state_dict: state_dict must be a mapping with"):
        sched.load_state_dict({"last_step": 3})
    with pytest.raises(
        ValueError, match=r"load_state_dict: curve must be one of 'linear', 'cosine', got 'x'"
    ):
        sched.load_state_dict(good | {"curve": "x"})
    with pytest.raises(ValueError, match=r"load_state_dict: last_step must be an int >= 0, got -1"):
        sched.load_state_dict(good | {"last_step": -1})
    with pytest.raises(ValueError, match=r"load_state_dict: target_p must be a probability"):
        sched.load_state_dict(good | {"target_p": 2.0})
    assert sched.state_dict() == good  # nothing half-loaded
    s2 = DropSchedule(Net(), 0.3, 10, scale={"stage2.1": 2.0})
    with pytest.raises(ValueError, match=r"scale must be factors that keep every rate in \[0, 1\)"):
        s2.load_state_dict(good | {"target_p": 0.5})  # GaussianSpatialDropout2d * 2 would reach 1
    assert s2.target_p == 0.3


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"target_p": 1.5}, ValueError, r"DropSchedule: target_p must be a probability in \[0, 1\], got 1.5"),
        ({"start_p": -0.1}, ValueError, r"DropSchedule: start_p must be a probability"),
        ({"target_p": "0.1"}, TypeError, r"DropSchedule: target_p must be a real number"),
        ({"total_steps": -1}, ValueError, r"DropSchedule: total_steps must be an int >= 0, got -1"),
        ({"total_steps": 10.0}, TypeError, r"DropSchedule: total_steps must be an int, got 10.0"),
        ({"curve": "step"}, ValueError, r"DropSchedule: curve must be one of 'linear', 'cosine', got 'step'"),
        ({"modules": []}, ValueError, r"DropSchedule: modules must be a non-empty iterable"),
        ({"modules": "path"}, TypeError, r"DropSchedule: modules must be None or an iterable"),
        ({"modules": ["nope"]}, ValueError, r"modules must be names of submodules of model, got 'nope'"),
        ({"modules": [nn.Dropout()]}, ValueError, r"modules must be submodules of model, got Dropout not in"),
        (
            {"modules": ["head"]},
            TypeError,
            r"modules must be modules with a float attribute p, got head: Linear",
        ),
        ({"modules": [3]}, TypeError, r"modules must be modules or module names, got 3"),
        ({"scale": {"path": -1.0}}, ValueError, r"scale must be factors >= 0, got -1.0 for 'path'"),
        ({"scale": {"path": math.inf}}, ValueError, r"scale must be factors >= 0"),
        ({"scale": {"path": "2"}}, TypeError, r"scale must be real factors, got '2' for 'path'"),
        (
            {"scale": {"stage3": 1.0}},
            ValueError,
            r"scale must be a mapping over .* got unknown names \['stage3'\]",
        ),
        ({"scale": 0.5}, TypeError, r"scale must be None, a mapping name -> factor or a callable"),
        (
            {"scale": {"path": 4.0}},
            ValueError,
            r"keep every rate in \[0, 1\] \(path: DropPath\), got factor 4.0",
        ),
        ({"scale": lambda n, m: 4.0}, ValueError, r"keep every rate in \[0, 1\] \(stem"),
    ],
)
def test_constructor_validates(kwargs: dict, exc: type, match: str) -> None:
    args = {"target_p": 0.3, "total_steps": 10, **kwargs}
    with pytest.raises(exc, match=match):
        DropSchedule(Net(), **args)


def test_model_and_step_validation() -> None:
    with pytest.raises(TypeError, match=r"DropSchedule: model must be an nn.Module, got list"):
        DropSchedule([], 0.1, 10)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"model must be a model with spatialdrop layers .* \['Dropout', 'Linear'"
    ):
        DropSchedule(nn.Sequential(nn.Linear(2, 2), nn.Dropout()), 0.1, 10)
    sched = DropSchedule(Net(), 0.1, 10)
    with pytest.raises(ValueError, match=r"DropSchedule.step: global_step must be an int >= 0, got -1"):
        sched.step(-1)
    with pytest.raises(TypeError, match=r"DropSchedule.step: global_step must be an int, got True"):
        sched.step(True)
    with pytest.raises(TypeError, match=r"DropSchedule.p_at: global_step must be an int, got 1.5"):
        sched.p_at(1.5)  # type: ignore[arg-type]


def test_alpha_and_gaussian_may_not_reach_one() -> None:
    net = nn.Sequential(AlphaSpatialDropout1d(0.1))
    with pytest.raises(ValueError, match=r"\[0, 1\) \(0: AlphaSpatialDropout1d\), got factor 1.0 \* p 1.0"):
        DropSchedule(net, 1.0, 10)
    DropSchedule(nn.Sequential(DropPath()), 1.0, 10)  # p = 1 is valid for DropPath


def test_repr() -> None:
    sched = DropSchedule(Net(), 0.3, 10)
    sched.step(4)
    assert repr(sched) == (
        "DropSchedule(start_p=0.0, target_p=0.3, total_steps=10, curve='linear', modules=4, last_step=4)"
    )
