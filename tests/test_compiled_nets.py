"""Structured dropout inside real training graphs: eager and ``torch.compile`` train alike.

Each test trains a network a few steps twice from the same weights, eagerly and compiled, with
keyed masks (so both runs draw the same masks) and compares the losses at every step: equal to
float rounding. The networks put DropBlock where the papers do (after a ResNet's layer3 and
layer4), between convolutions, at several map sizes; the modes are the ways users compile:
default, ``dynamic=True`` with the batch changing, automatic dynamic shapes (a second model
compiled in the same process, or the map size changing between calls: multi-scale training),
channels-last, bf16 autocast. These are the graphs in which the compiled backward used to crash
(``setStorage ... out of bounds``).

The torchvision/timm networks are marked ``models`` (they run in the ``.venv-models`` environment
of ``dev/test.sh``); the small ones run everywhere.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spatialdrop as sd
from spatialdrop._dropblock import ops

Batch = tuple[Tensor, Tensor, Tensor]  # input, labels, sample ids


def batches(shapes: Sequence[tuple[int, ...]], classes: int = 10, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out, start = [], 0
    for shape in shapes:
        n = shape[0]
        x = torch.randn(shape, generator=g)
        y = torch.randint(0, classes, (n,), generator=g)
        out.append((x, y, torch.arange(start, start + n)))
        start += n
    return out


def dropped_fractions(model: nn.Module) -> list[float]:
    """Hooks that record what each dropout layer of ``model`` zeroes; returns the live list."""
    seen: list[float] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if module.training:
            seen.append(float((output == 0).float().mean()) - float((inputs[0] == 0).float().mean()))

    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.register_forward_hook(hook)
    return seen


def train(
    model: nn.Module,
    data: list[Batch],
    *,
    compile_kwargs: dict[str, Any] | None = None,
    channels_last: bool = False,
    autocast: bool = False,
) -> list[float]:
    """Losses of SGD steps on ``data`` with keyed masks, eagerly or compiled."""
    sd.keyed_masks(model, seed=3)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    forward = model if compile_kwargs is None else torch.compile(model, **compile_kwargs)
    losses = []
    for step, (x, y, ids) in enumerate(data):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with sd.mask_context(step=step, sample_ids=ids), amp:
            loss = F.cross_entropy(forward(x).float(), y)
            opt.zero_grad()
            loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def eager_vs_compiled(
    make: Callable[[], nn.Module],
    data: list[Batch],
    *,
    rtol: float = 1e-4,
    later_rtol: float | None = None,
    **kwargs: Any,
) -> None:
    """Train a copy of one model eagerly and one compiled; the losses agree at every step.

    ``rtol`` holds at the first step (the same weights and keyed masks: a different mask would
    move the loss by far more); ``later_rtol`` (default ``rtol``) after optimizer steps, where
    the compiled kernels' own rounding (reduction order, bf16 casts) compounds.
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)
    seen = dropped_fractions(model)
    compile_kwargs = kwargs.pop("compile_kwargs", {})
    eager = train(model, data, **kwargs)
    compiled = train(twin, data, compile_kwargs=compile_kwargs, **kwargs)
    assert seen, "no dropout layer ran"
    assert max(seen) > 0.02, f"the dropout layers dropped almost nothing: {seen}"
    torch.testing.assert_close(torch.tensor(compiled[0]), torch.tensor(eager[0]), rtol=rtol, atol=rtol)
    later = rtol if later_rtol is None else later_rtol
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=later, atol=later)


# --- small networks: every environment ---------------------------------------------------------


class SmallNet(nn.Module):
    """conv-BN-ReLU-DropBlock-conv(stride 2)-DropBlock-..., two DropBlocks at two map sizes."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            sd.DropBlock2d(0.15, 3, shared_channels=shared),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            sd.DropBlock2d(0.15, 3, scale="realized"),
            nn.Conv2d(32, 32, 3, padding=1),
            sd.SpatialDropout2d(0.1),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Net3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(1, 8, 3, padding=1),
            nn.BatchNorm3d(8),
            nn.ReLU(),
            sd.DropBlock3d(0.15, 3),
            # a 2x2x2 stride-2 conv: torch 2.13.0's inductor cannot lower a conv that follows a
            # 3x3x3 stride-2 padded one under dynamic=True, with or without dropout
            # (ValueRangeError "Invalid ranges [0:-1]"; fixed in 2.14)
            nn.Conv3d(8, 16, 2, stride=2),
            nn.ReLU(),
            sd.SpatialDropout3d(0.15),
            nn.Conv3d(16, 16, 3, padding=1),
            sd.DropBlock3d(0.1, (1, 3, 3), shared_channels=True),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@contextlib.contextmanager
def dense_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """DropBlock by its static-shape path (what devices without Triton run)."""
    with ops.override(ops.Path.DENSE):
        yield


SMALL = [(4, 3, 16, 16)] * 3


@pytest.mark.slow
def test_small_net_default_compile() -> None:
    eager_vs_compiled(SmallNet, batches(SMALL))


def test_small_net_multiscale_default_compile() -> None:
    # the map size changes between calls: dynamo turns on automatic dynamic shapes
    eager_vs_compiled(SmallNet, batches([(4, 3, 16, 16), (4, 3, 24, 20), (4, 3, 32, 28), (4, 3, 20, 36)]))


@pytest.mark.slow
def test_small_net_dynamic_batch_and_map() -> None:
    shapes = [(4, 3, 16, 16), (6, 3, 16, 16), (3, 3, 20, 24), (5, 3, 12, 12)]
    eager_vs_compiled(SmallNet, batches(shapes), compile_kwargs={"dynamic": True})


def test_dense_path_dynamic_between_convs(monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 21.4: inductor could not order the dense path's symbolic strides
    with dense_path(monkeypatch):
        shapes = [(4, 3, 16, 16), (4, 3, 24, 20), (6, 3, 16, 16)]
        eager_vs_compiled(SmallNet, batches(shapes), compile_kwargs={"dynamic": True})


def second_model(
    first: Callable[[], nn.Module],
    first_shape: tuple[int, ...],
    make: Callable[[], nn.Module],
    data: list[Batch],
    rtol: float,
) -> None:
    """Automatic dynamic shapes: ``first()`` compiled and run at ``first_shape``, then ``make()``
    trained eagerly and compiled in the same process (no reset in between) at other sizes."""
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(first())(torch.randn(first_shape))
    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)
    eager = train(model, data)
    compiled = train(twin, data, compile_kwargs={})
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=rtol, atol=rtol)


@pytest.mark.slow
def test_small_net_second_model_in_the_same_process() -> None:
    data = batches([(4, 3, 16, 16), (4, 3, 20, 20), (4, 3, 16, 16)])
    second_model(SmallNet, (2, 3, 12, 12), SmallNet, data, rtol=1e-4)


@pytest.mark.slow
def test_small_net_shared_masks_channels_last() -> None:
    eager_vs_compiled(lambda: SmallNet(shared=True), batches(SMALL), channels_last=True)


@pytest.mark.slow
def test_small_net_bf16_autocast() -> None:
    eager_vs_compiled(SmallNet, batches(SMALL), autocast=True, rtol=2e-2)


@pytest.mark.slow
def test_dense_path_multiscale_default_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    with dense_path(monkeypatch):
        eager_vs_compiled(SmallNet, batches([(4, 3, 16, 16), (4, 3, 24, 20), (4, 3, 20, 28)]))


@pytest.mark.slow
def test_3d_net_default_and_dynamic() -> None:
    shapes = [(2, 1, 12, 12, 12), (3, 1, 12, 16, 12), (2, 1, 16, 12, 12)]
    eager_vs_compiled(Net3d, batches(shapes[:1] * 3))
    eager_vs_compiled(Net3d, batches(shapes), compile_kwargs={"dynamic": True})


# --- torchvision and timm networks: the models environment -------------------------------------


def torchvision_resnet18() -> nn.Module:
    from torchvision.models import resnet18

    r = resnet18(num_classes=10)
    # the DropBlock paper's placement: after layer3 and layer4 (on 4x4 and 2x2 maps at 64x64)
    r.layer3 = nn.Sequential(r.layer3, sd.DropBlock2d(0.1, 3))
    r.layer4 = nn.Sequential(r.layer4, sd.DropBlock2d(0.1, 1))
    return r


def timm_resnet() -> nn.Module:
    import timm

    model = timm.create_model(
        "resnet18", num_classes=10, drop_block_rate=0.2, drop_path_rate=0.1, zero_init_last=False
    )
    with pytest.warns(UserWarning, match="DropBlock2d"):  # the converter says where the meaning changes
        sd.convert_dropout(model)
    assert any(isinstance(m, sd.DropBlock2d) for m in model.modules())
    assert any(isinstance(m, sd.DropPath) for m in model.modules())
    return model


RESNET = [(4, 3, 64, 64)] * 3
# resnet18 without any dropout, eager vs compiled: losses 2e-7, 3e-7, 7e-4 apart at steps 1-3
# (inductor sums in another order; training amplifies it): the tolerance of the real networks
RESNET_RTOL = 2e-3


@pytest.mark.models
def test_torchvision_resnet18_default_compile() -> None:
    eager_vs_compiled(torchvision_resnet18, batches(RESNET), rtol=RESNET_RTOL)


@pytest.mark.models
def test_torchvision_resnet18_dynamic_issue_reproducer() -> None:
    # the issue's reproducer: dynamic=True, forward and backward (crashed in the compiled backward)
    eager_vs_compiled(
        torchvision_resnet18,
        batches([(4, 3, 64, 64), (6, 3, 64, 64), (4, 3, 96, 80)]),
        compile_kwargs={"dynamic": True},
        rtol=RESNET_RTOL,
    )


@pytest.mark.models
@pytest.mark.slow
def test_torchvision_resnet18_multiscale() -> None:
    eager_vs_compiled(
        torchvision_resnet18, batches([(4, 3, 64, 64), (4, 3, 96, 80), (4, 3, 80, 112)]), rtol=RESNET_RTOL
    )


@pytest.mark.models
@pytest.mark.slow
def test_torchvision_resnet18_channels_last() -> None:
    eager_vs_compiled(torchvision_resnet18, batches(RESNET), channels_last=True, rtol=RESNET_RTOL)


@pytest.mark.models
@pytest.mark.slow
def test_torchvision_resnet18_bf16_autocast() -> None:
    eager_vs_compiled(torchvision_resnet18, batches(RESNET), autocast=True, rtol=3e-2, later_rtol=1e-1)


@pytest.mark.models
@pytest.mark.slow
def test_timm_resnet_converted_default_and_dynamic() -> None:
    # later steps, measured at the third (torch 2.14.1, inductor's reduction order): 3.3e-4 apart
    # in the default mode, 1.2e-3 with dynamic=True (its third batch is a new map size)
    eager_vs_compiled(timm_resnet, batches(RESNET), later_rtol=1e-3)
    eager_vs_compiled(
        timm_resnet,
        batches([(4, 3, 64, 64), (6, 3, 64, 64), (4, 3, 96, 96)]),
        compile_kwargs={"dynamic": True},
        later_rtol=5e-3,
    )


@pytest.mark.models
@pytest.mark.slow
def test_second_model_compiled_in_the_same_process() -> None:
    # torchvision's resnet18 compiled once at 64x64, then a converted timm ResNet at 96x96
    second_model(
        torchvision_resnet18, (2, 3, 64, 64), timm_resnet, batches([(4, 3, 96, 96)] * 2), RESNET_RTOL
    )
