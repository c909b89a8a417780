"""Argument checks shared by every op (``_validation``): overflowing p, devices, float16 scales."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest
import torch
from torch import nn

import spatialdrop as sd
from spatialdrop import functional as F

X = torch.ones(2, 3, 4, 4)
HUGE = 10**400  # float(HUGE) raises OverflowError

CALLS: dict[str, Callable[[Any], object]] = {
    "spatial_dropout": lambda p: F.spatial_dropout(X, p),
    "gaussian_spatial_dropout": lambda p: F.gaussian_spatial_dropout(X, p),
    "alpha_spatial_dropout": lambda p: F.alpha_spatial_dropout(X, p),
    "drop_path": lambda p: F.drop_path(X, p),
    "drop_block": lambda p: F.drop_block(X, p, 3),
    "drop_path_residual": lambda p: F.drop_path_residual(X, nn.Identity(), p),
    "SpatialDropout2d": lambda p: sd.SpatialDropout2d(p),
    "GaussianSpatialDropout": lambda p: sd.GaussianSpatialDropout(p),
    "AlphaSpatialDropout1d": lambda p: sd.AlphaSpatialDropout1d(p),
    "DropBlock2d": lambda p: sd.DropBlock2d(p),
    "DropPath": lambda p: sd.DropPath(p),
    "ResidualDropPath": lambda p: sd.ResidualDropPath(nn.Identity(), p),
    "FilterDropout": lambda p: sd.FilterDropout(p),
    "filter_dropout": lambda p: sd.filter_dropout(nn.Conv2d(3, 3, 1), p),
}


@pytest.mark.parametrize("value", [HUGE, -HUGE, Fraction(HUGE, 3)])
@pytest.mark.parametrize("name", list(CALLS))
def test_p_past_the_float_range_is_a_value_error_naming_p(name: str, value: object) -> None:
    with pytest.raises(
        ValueError, match=rf"^{name}: p must be a probability in \[0, 1\)?\]?, got a number of magnitude ~1e"
    ):
        CALLS[name](value)


def test_schedule_and_rates_with_p_past_the_float_range() -> None:
    net = nn.Sequential(sd.SpatialDropout2d(0.1))
    with pytest.raises(ValueError, match=r"^DropSchedule: target_p must be a probability"):
        sd.DropSchedule(net, HUGE, 10)
    with pytest.raises(ValueError, match=r"^DropSchedule: start_p must be a probability"):
        sd.DropSchedule(net, 0.1, 10, start_p=-HUGE)
    with pytest.raises(ValueError, match=r"^DropSchedule: scale must be factors >= 0, got 1000"):
        sd.DropSchedule(net, 0.1, 10, scale={"0": HUGE})
    with pytest.raises(ValueError, match=r"^drop_path_rates: p_max must be a probability"):
        sd.drop_path_rates(4, HUGE)


def test_nan_and_inf_p_still_rejected() -> None:
    for p in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"spatial_dropout: p must be a probability in \[0, 1\], got"):
            F.spatial_dropout(X, p)


@pytest.mark.parametrize("device", ["bogus", "cuda:x", -1])
def test_bad_device_is_named(device: object) -> None:
    key = sd.MaskKey(0, 0, 0, torch.arange(2))
    with pytest.raises(ValueError, match=r"^keyed_uniform: device must be a torch.device, a device string"):
        sd.keyed_uniform(key, 3, device=device)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^keyed_normal: device must be"):
        sd.keyed_normal(key, 3, device=device)  # type: ignore[arg-type]


def test_device_of_a_wrong_type_is_a_type_error() -> None:
    key = sd.MaskKey(0, 0, 0, torch.arange(2))
    with pytest.raises(TypeError, match=r"^keyed_uniform: device must be .*, got list"):
        sd.keyed_uniform(key, 3, device=["cpu"])  # type: ignore[arg-type]
    assert sd.keyed_uniform(key, 3, device=torch.device("cpu")).shape == (2, 3)
    assert sd.keyed_uniform(key, 3, device="cpu").shape == (2, 3)


# --- float16 near p = 1 ------------------------------------------------------------------------

HALF = torch.zeros(64, 4096, 1, dtype=torch.half)

FP16: dict[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], float, float]] = {
    # op, the largest p that still fits float16, a p just past it
    "spatial_dropout": (lambda x, p: F.spatial_dropout(x, p), 0.9999, 0.99999),
    "drop_path": (lambda x, p: F.drop_path(x, p), 0.9999, 0.99999),
    "drop_path_residual": (lambda x, p: F.drop_path_residual(x, nn.Identity(), p), 0.9999, 0.99999),
    "gaussian_spatial_dropout": (lambda x, p: F.gaussian_spatial_dropout(x, p), 0.999999, 1 - 1e-9),
    "alpha_spatial_dropout": (lambda x, p: F.alpha_spatial_dropout(x, p), 0.999999, 1 - 1e-10),
}


@pytest.mark.parametrize("name", list(FP16))
def test_float16_near_p_one_never_gives_nan(name: str) -> None:
    op, ok, too_close = FP16[name]
    torch.manual_seed(0)
    y = op(HALF, ok)
    assert torch.isfinite(y).all()
    with pytest.raises(
        ValueError, match=rf"^{name}: p must be a probability whose multiplier .* fits torch.float16"
    ):
        op(HALF, too_close)
    for dtype in (torch.float32, torch.bfloat16):  # the same p fits the wider dtypes
        assert torch.isfinite(op(HALF.to(dtype), too_close)).all()


def test_float16_spatial_dropout_at_p_one_is_zero_and_bit_exact_below() -> None:
    assert torch.equal(F.spatial_dropout(HALF + 1, 1.0), torch.zeros_like(HALF))
    x = torch.randn(8, 16, 3, dtype=torch.half)
    for p in (0.1, 0.5, 0.99):
        torch.manual_seed(1)
        a = F.spatial_dropout(x, p)
        torch.manual_seed(1)
        assert torch.equal(a, torch.nn.functional.dropout1d(x, p))


def test_float16_filter_dropout_near_p_one() -> None:
    conv = sd.filter_dropout(nn.Conv1d(2, 4, 1).half(), 0.99999)
    with pytest.raises(
        ValueError, match=r"^FilterDropout: p must be a probability whose multiplier 1/\(1-p\) fits"
    ):
        conv(torch.ones(1, 2, 3, dtype=torch.half))
    assert conv.parametrizations.weight[0].current_mask() is None  # cleared although it raised
