"""DropBlock's one scale policy: the multiplier of the kept elements, for every path.

Every path (the per-channel and shared custom ops, the dense static-shape path, eager or
compiled) gets its multiplier from :func:`scale_factor` and applies it with :func:`scaled`
(the product formed in float32, or float64 for float64 input, and rounded once to the input's
dtype), so the paths agree to the last bit for the same seeds, whatever the dtype and policy.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .._validation import float_dtype_of
from .calibration import p_tensor

__all__ = ["POLICIES", "acc_dtype", "expected_factor", "factor_shape", "scale_factor", "scaled"]

POLICIES = ("expected", "realized", "none")

acc_dtype = float_dtype_of  # float32, or float64 for float64 input: where scales are formed


def factor_shape(policy: str, batch: int) -> tuple[int]:
    """The shape of :func:`scale_factor`'s result as the ops return it: ``(1,)``, ``(N,)`` or ``(0,)``."""
    return ({"expected": 1, "realized": batch, "none": 0}[policy],)


def scale_factor(
    policy: str, p: float, dropped: Optional[Tensor], per_sample: int, like: Tensor, p_as_tensor: bool = False
) -> Optional[Tensor]:
    """The multiplier of the kept elements, in float32 (float64 for float64 input).

    Args:
        policy: ``"expected"``: ``1 / (1 - p)``, the same for every sample (computed in float64
            and rounded once, so it cannot overflow a float16 input's range on its way: a
            float16 input near ``p = 1`` gives large but never NaN results); ``"realized"``:
            ``per_sample / kept`` for each sample (0 for a sample with nothing kept);
            ``"none"``: no multiplier.
        p: the drop probability.
        dropped: for ``"realized"``, the number of dropped elements of each sample, shape ``(N,)``.
        per_sample: for ``"realized"``, the number of elements (or mask positions) per sample.
        like: the input (gives the dtype and device).
        p_as_tensor: ``"expected"`` from ``p`` as a tensor (the same float64 quotient), so that a
            new ``p`` does not pin a compiled graph (the dense path under ``torch.compile``).

    Returns:
        ``None`` for ``"none"``; else a float tensor of shape ``(1,)`` (expected) or ``(N,)``.
    """
    acc = float_dtype_of(like)
    if policy == "none":
        return None
    if policy == "expected":
        if p_as_tensor:
            return (1.0 / (1.0 - p_tensor(p))).to(dtype=acc, device=like.device).reshape(1)
        return torch.full((1,), 1.0 / (1.0 - p), dtype=acc, device=like.device)
    assert dropped is not None, "scale_factor: 'realized' needs the dropped counts"
    kept = (per_sample - dropped).to(acc)
    return torch.where(kept > 0, per_sample / kept.clamp(min=1), torch.zeros_like(kept))


@functools.lru_cache(maxsize=256)
def expected_factor(p: float, dtype: torch.dtype) -> float:
    """The ``"expected"`` multiplier of an input of ``dtype`` as a Python float (the fused pass's).

    ``float(scale_factor("expected", p, None, 0, x))``: ``1 / (1 - p)`` rounded once to float32
    (float64 for float64 input), computed by that one rule and kept per ``(p, dtype)``.
    """
    factor = scale_factor("expected", p, None, 0, torch.empty(0, dtype=dtype))
    assert factor is not None
    return float(factor)


def scaled(src: Tensor, factor: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """``src * factor`` (factor broadcast along dim 0), formed in float32 or wider.

    With ``out`` (the sparse path, CPU) the product is written there in ``out``'s dtype; else the
    result is in the accumulation dtype (the dense path rounds it after masking).
    """
    if factor is None:
        if out is None:
            return src
        return out.copy_(src) if out is not src else out
    f = factor.view((factor.shape[0],) + (1,) * (src.dim() - 1))
    if out is None:
        return src * f
    if factor.numel() == 1 and src.device.type == "cpu" and out.dtype == src.dtype:
        # the same product through the fast scalar kernel: x * s in float32 (or float64), rounded
        return torch.mul(src, factor.item(), out=out)
    return torch.mul(src, f, out=out)
