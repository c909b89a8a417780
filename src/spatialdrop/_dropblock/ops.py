"""DropBlock's paths and the dispatch between them (:func:`run`).

Three paths, each tested bit for bit against the others in keyed mode (the same seeds give the
same output, forward and backward: ``tests/test_drop_block_paths.py``):

=======  ==============================  ==================================  ==========================
path     runs for                        forward                             saved for backward
=======  ==============================  ==================================  ==========================
sparse   CPU input: eager,               ``spatialdrop::drop_block``:        the seeds (int32, fused
         ``torch.compile`` (one opaque   seeds drawn sparsely; per channel   pass) or the write plan,
         op, any shapes), torch.func     (float32/64) one C sweep            at most 1/32 of the
         (:mod:`.autograd`)              multiplies and zeroes the blocks    input's bytes, or
                                         (:mod:`.fused`), else torch ops     nothing; the seed or
                                         write the dropped positions         key, ``p``, the scale.
                                         (:mod:`.sparse`)                    Backward: the op
                                                                             ``drop_block_backward``
dense    ``torch.export``/ONNX, meta,    torch ops: a dense seed grid,       the bool keep mask
         devices without Triton, CPU     blocks grown by windowed ORs        (autograd of
         with ``FORCE_STATIC_PATH``      (:mod:`.dense`)                     the multiply by it)
Triton   CUDA input with triton (CPU     ``spatialdrop::drop_block_triton``  the seed or key words and
         in Triton's interpreter, for    (:mod:`.triton_kernels`): a         ``p``; backward runs the
         the tests)                      packed seed-bit grid, one fused     kernels on the gradient
                                         write
=======  ==============================  ==================================  ==========================

In eager mode a plain tensor's call runs the sparse op's function under an ``autograd.Function``
(:class:`~.autograd.EagerFunction`) rather than through the dispatcher, whose round trip cost
more than the rest of a small call; the same function and formula, so the same bits.

Every path drops an element as ``x * 0``, as torch's dropout does (NaN or infinite input gives
NaN there, finite input a zero of its sign), forward and backward.

The export check comes first, so exported programs never hold a custom op. Every path takes
its ``Geometry`` from :mod:`.geometry`, its seed rate from :mod:`.calibration` and its scale
from :mod:`.scale`; keyed seeds follow the one rule of :mod:`.keyed_seeds`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._compat import is_compiling
from .._philox import MASK32
from ..keyed import MaskKey
from .autograd import (
    EagerFunction,
    FusedFunction,
    InplaceFunction,
    call_forward,
    direct_call_ok,
    functorch_active,
    fused_eager_takes,
    has_tangent,
)
from .calibration import p_tensor
from .dense import drop_block_dense
from .geometry import Geometry, is_dense
from .sparse import PLAN_EXACT, PLAN_NONE, PLAN_STATIC
from .triton_kernels import triton_available, triton_drop_block

__all__ = ["FORCE_STATIC_PATH", "run"]

# Internal switch (tests): when True, CPU input takes the static-shape path that CUDA takes.
FORCE_STATIC_PATH = False

_SEED_HIGH = 1 << 62


def _op_args(
    generator: torch.Generator | None, key: MaskKey | None
) -> tuple[Optional[Tensor], Optional[list[int]], Optional[Tensor], Optional[Tensor]]:
    """The randomness arguments of the sparse op: a seed from ``generator``, or the key's words."""
    if key is None:
        if generator is None:
            seed = torch.randint(0, _SEED_HIGH, (), dtype=torch.int64)
        else:
            seed = torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, generator=generator)
        return seed, None, None, None
    words = [key.seed & MASK32, key.seed >> 32, key.layer & MASK32, key.layer >> 32]
    step = key.step if isinstance(key.step, Tensor) else torch.tensor(key.step, dtype=torch.int64)
    return None, words, step, key.sample_ids


def _static_path(input: Tensor) -> bool:
    return FORCE_STATIC_PATH or input.device.type != "cpu"


def run(
    input: Tensor,
    p: float,
    geo: Geometry,
    seeding: str,
    scale: str,
    generator: torch.Generator | None,
    key: MaskKey | None,
    inplace: bool = False,
    window: list[int] | None = None,
) -> Tensor:
    """DropBlock of a checked, non-empty input in training mode, by the right path.

    With ``inplace`` the result is written into ``input``: directly by the eager sparse path
    (:class:`~.autograd.InplaceFunction`: no full-size temporary) when ``input`` is dense, else
    computed out of place and copied in. With a ``window`` (a DTensor's shard: see
    :mod:`.window`), ``geo`` is the shard's local geometry and the mask is the window of the
    global one; the fused Triton kernel takes no window (the dense path does).
    """
    if torch.compiler.is_exporting():  # no custom op in an exported program (ONNX cannot lower it)
        return _copied(
            input, drop_block_dense(input, p, geo, seeding, scale, generator, key, window), inplace
        )
    if _static_path(input):
        if (
            window is None
            and 1 <= len(geo.sizes) <= 3
            and triton_available(input)
            and not functorch_active()
            and not has_tangent(input)
        ):
            out = triton_drop_block(
                input,
                p_tensor(p),
                geo.blocks,
                channel_dim=geo.channel_dim,
                shared=geo.shared,
                seeding=seeding,
                scale=scale,
                generator=generator,
                key=key,
            )
            return _copied(input, out, inplace)
        return _copied(
            input, drop_block_dense(input, p, geo, seeding, scale, generator, key, window), inplace
        )
    seed, words, step, ids = _op_args(generator, key)
    if window is None and not inplace and direct_call_ok(input) and fused_eager_takes(input, geo, scale):
        # eager, per channel, the fused pass: its lean autograd function (the same bits)
        fast: Tensor = FusedFunction.apply(input, seed, p, geo, seeding, scale, key, (words, step, ids))
        return fast
    plan = PLAN_EXACT  # eager: keep the plan, of data-dependent length
    if geo.shared or functorch_active() or has_tangent(input):  # ForwardFunction: no plan
        plan = PLAN_NONE
    elif is_compiling():
        plan = PLAN_STATIC
    args = (input, seed, p_tensor(p), list(geo.blocks), geo.channel_dim, geo.shared, seeding, scale)
    if (
        inplace
        and plan != PLAN_STATIC
        and not functorch_active()
        and not has_tangent(input)
        and is_dense(input)
    ):
        written: Tensor = InplaceFunction.apply(*args, words, step, ids, plan, window)
        return written
    if plan == PLAN_EXACT and direct_call_ok(input):
        result: Tensor = EagerFunction.apply(*args, words, step, ids, plan, window)
        return _copied(input, result, inplace)
    return _copied(input, call_forward(*args, words, step, ids, plan, window)[0], inplace)


def _copied(input: Tensor, out: Tensor, inplace: bool) -> Tensor:
    return input.copy_(out) if inplace else out
