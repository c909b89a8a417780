"""A fused Triton DropBlock: a packed seed-bit grid, then ``out = input * scale`` with blocks zeroed.

Two kernels, for every spatial rank 1-3 (lower ranks are padded with size-1 dims), per-channel
and shared masks, both seedings, every float dtype and any dense memory layout:

1. ``_seed_kernel`` draws the Bernoulli(``gamma``) seed grid of each sample's row (the flat
   ``(maps, *grid)`` seed places of the sample, as in :mod:`spatialdrop.drop_block`) into a
   packed bit grid, one bit per place, 32 places per int32 word, ``ceil(R / 32)`` words per
   row. It follows the rule of :mod:`spatialdrop._dropblock.keyed_seeds` exactly, one lane per
   chunk: keyed masks are bit-identical to the CPU torch path. Unkeyed masks use the same rule
   with a Philox key drawn on the device from the torch generator (``torch.randint``, read by
   the kernel: no host synchronisation), the sample's index as its id and step 0.
2. ``_apply_kernel`` visits every element once (in storage order) and zeroes it if any seed
   place of its block window holds a bit, else writes ``input * factor[n]`` (the product in
   float32, float64 for float64 input). With ``COUNT`` it instead counts each sample's
   dropped positions (for ``scale="realized"``) over the ``(maps, *spatial)`` positions.

Backward re-runs both kernels from the same key: nothing of per-element size is saved. The op
``spatialdrop::drop_block_triton`` is opaque to the compiler; ``p`` comes in as a float64 CPU
tensor and the seed rate, thresholds and scale are computed from it inside the op, on the host
(:mod:`.calibration`, :mod:`.keyed_seeds`, :mod:`.scale`), so a changing ``p`` does not recompile.

Triton is imported and the kernels are defined on first use (inside the op, never while dynamo
traces), so that ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, for tests) may be set at any
time before that.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..keyed import MaskKey
from .calibration import seed_rate
from .geometry import Geometry, is_dense
from .keyed_seeds import rule_key, seed_rule, threshold_table
from .scale import acc_dtype, scale_factor

__all__ = [
    "APPLY_BLOCK",
    "SEED_BLOCK",
    "apply_warps",
    "kernels",
    "seed_bits",
    "triton_drop_block",
]

_BIAS = 1 << 32  # added to 32-bit key words so that Triton always types them int64
SEED_BLOCK = 128  # lanes (chunks) per program of the seed kernel
APPLY_BLOCK = 512  # elements per program of the apply kernel


def apply_warps(count: bool) -> int:
    """The apply kernel's warps: 8 for the writing pass, 4 for the counting one.

    With these no variant spills registers on sm_80 or sm_90 (``dev/triton_aot.py``).
    """
    return 4 if count else 8


_KERNELS: dict[bool, tuple[Any, Any]] = {}


def kernels(interpret: bool | None = None) -> tuple[Any, Any]:
    """``(seed_kernel, apply_kernel)``, defined on first use for the mode (compiled or interpreted).

    ``interpret`` defaults to the current ``TRITON_INTERPRET``. Each mode executes
    ``triton_jit.py`` afresh (``triton.jit`` fixes the mode when a kernel is defined).
    """
    mode = os.environ.get("TRITON_INTERPRET", "") == "1" if interpret is None else interpret
    if mode not in _KERNELS:
        name = f"spatialdrop._dropblock._triton_jit_{'interpreted' if mode else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("triton_jit.py"))
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the Triton kernels from {__file__}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _KERNELS[mode] = (module.seed_kernel, module.apply_kernel)
    return _KERNELS[mode]


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _padded(sizes: Sequence[int], fill: int) -> list[int]:
    return [fill] * (3 - len(sizes)) + list(sizes)


def _seed_bits_impl(
    n: int,
    row: int,
    gamma: float,
    seed: Tensor,
    sample_ids: Tensor,
    step: Tensor,
    key_words: Sequence[int],
    keyed: bool,
    device: torch.device,
) -> Tensor:
    """The packed seed bits ``(n, ceil(row / 32))`` int32 of every sample's row (seed kernel)."""
    words = _cdiv(row, 32)
    bits = torch.zeros((n, words), dtype=torch.int32, device=device)
    if gamma <= 0.0 or row == 0 or n == 0:
        return bits
    k = seed_rule(gamma).chunk
    chunks = _cdiv(row, k)
    seed_kernel, _ = kernels()
    grid, table = (_cdiv(n * chunks, SEED_BLOCK),), threshold_table(gamma, device)
    seed_kernel[grid](
        bits, table, seed, sample_ids, step, key_words[0] + _BIAS, key_words[1] + _BIAS,
        row, words, chunks, n * chunks, K=k, LOG_K=k.bit_length() - 1, KEYED=keyed, BLOCK=SEED_BLOCK,
    )  # fmt: skip
    return bits


def _apply(
    x: Tensor,
    out: Tensor,
    bits: Tensor,
    factors: Tensor,
    counts: Tensor,
    geo: Geometry,
    *,
    valid: bool,
    count: bool,
    scale: bool,
) -> None:
    """Launch the apply kernel over ``x`` (channels at dim 1): write ``out``, or count drops."""
    _, apply_kernel = kernels()
    n, c = geo.batch, geo.channels
    size3, block3, grid3 = _padded(geo.sizes, 1), _padded(geo.blocks, 1), _padded(geo.grid, 1)
    flags = {"B0": block3[0], "B1": block3[1], "B2": block3[2], "VALID": int(valid), "SHARED": geo.shared}
    words = bits.shape[1]
    if count:  # over the (maps, *spatial) positions, logically contiguous
        per_sample = (1 if geo.shared else c) * math.prod(geo.sizes)
        total = n * per_sample
        strides = [per_sample, math.prod(geo.sizes)] + [math.prod(size3[i + 1 :]) for i in range(3)]
        shape = [n, 1 if geo.shared else c]
    else:
        total = x.numel()
        strides = [int(x.stride(0)), int(x.stride(1)), *_padded([int(s) for s in x.stride()[2:]], 1)]
        shape = [n, c]
    apply_kernel[(_cdiv(total, APPLY_BLOCK),)](
        x, out, bits, factors, counts, total, *strides, *shape, *size3, *grid3, words,
        **flags, COUNT=count, SCALE=scale, BLOCK=APPLY_BLOCK, num_warps=apply_warps(count),
    )  # fmt: skip


@torch.library.custom_op("spatialdrop::drop_block_triton", mutates_args=())
def drop_block_triton(
    input: Tensor,
    seed: Tensor,
    sample_ids: Tensor,
    step: Tensor,
    p: Tensor,
    key_words: list[int],
    keyed: bool,
    block_size: list[int],
    channel_dim: int,
    shared: bool,
    seeding: str,
    scale: str,
) -> Tensor:
    """DropBlock of ``input`` by the two kernels; the output is laid out like ``empty_like(input)``.

    ``seed`` holds two key words drawn on the device (unkeyed), or ``sample_ids``/``step`` and the
    rule's key words ``key_words`` the key (keyed). ``p`` is a float64 CPU tensor.
    """
    if not is_dense(input):
        input = input.clone(memory_format=torch.preserve_format)
    out = torch.empty_like(input)
    if input.numel() == 0:
        return out
    x, o = input.movedim(channel_dim, 1), out.movedim(channel_dim, 1)
    geo = Geometry(x.shape, 1, block_size, shared, seeding)
    pf = float(p)
    gamma = seed_rate(pf, geo.sizes, geo.blocks, seeding)
    n = geo.batch
    bits = _seed_bits_impl(n, geo.places // n, gamma, seed, sample_ids, step, key_words, keyed, x.device)
    dropped = None
    if scale == "realized":
        dropped = torch.zeros(n, dtype=torch.int32, device=x.device)
        _apply(x, x, bits, bits, dropped, geo, valid=seeding == "valid", count=True, scale=False)
    factor = scale_factor(scale, pf, dropped, math.prod(geo.map_shape[1:]), x)
    factors = torch.empty(0, dtype=acc_dtype(x), device=x.device)
    if factor is not None:
        factors = factor.expand(n).contiguous()
    _apply(x, o, bits, factors, bits, geo, valid=seeding == "valid", count=False, scale=factor is not None)
    return out


@drop_block_triton.register_fake
def _(input: Tensor, *args: Any) -> Tensor:
    return torch.empty_like(input)


_ARGS = [a.name for a in drop_block_triton._opoverload._schema.arguments]  # the schema's names
_TENSORS = ("seed", "sample_ids", "step", "p")  # the op's tensors but the input


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    args = dict(zip(_ARGS, inputs))
    ctx.save_for_backward(*(args.pop(k) for k in _TENSORS))
    ctx.options = {k: v for k, v in args.items() if k != "input"}


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    """The formula: the kernels again, on the gradient, from the same seed or key."""
    g = drop_block_triton(grad, **dict(zip(_TENSORS, ctx.saved_tensors)), **ctx.options)
    return (g,) + (None,) * (len(_ARGS) - 1)


torch.library.register_autograd(drop_block_triton, _backward, setup_context=_setup_context)


def _key_tensors(
    n: int, device: torch.device, generator: torch.Generator | None, key: MaskKey | None
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """``(seed, sample_ids, step, key_words)`` for the op: keyed words, or a device-drawn key."""
    empty = torch.empty(0, dtype=torch.int64, device=device)
    if key is not None:
        sid = key.sample_ids.to(device=device, dtype=torch.int64)
        st = key.step
        if isinstance(st, Tensor):
            step = st.to(device=device, dtype=torch.int64).reshape(1)
        else:
            step = torch.full((1,), int(st), dtype=torch.int64, device=device)
        return empty, sid, step, list(rule_key(key))
    if generator is None:
        seed = torch.randint(0, 1 << 32, (2,), dtype=torch.int64, device=device)
    else:
        seed = torch.randint(0, 1 << 32, (2,), dtype=torch.int64, device=device, generator=generator)
    return seed, empty, empty, [0, 0]


def seed_bits(n: int, row: int, gamma: float, key: MaskKey, device: torch.device | str) -> Tensor:
    """The keyed packed seed bits ``(n, ceil(row / 32))`` int32 of the seed kernel (for tests).

    Bit ``t % 32`` of word ``t // 32`` of row ``i`` is place ``t`` of sample ``i``'s seed row.
    """
    dev = torch.device(device)
    seed, sid, step, words = _key_tensors(n, dev, None, key)
    return _seed_bits_impl(n, row, gamma, seed, sid, step, words, True, dev)


def triton_drop_block(
    input: Tensor,
    p: float | Tensor,
    block_size: Sequence[int],
    *,
    channel_dim: int = 1,
    shared: bool = False,
    seeding: str = "uniform",
    scale: str = "expected",
    generator: torch.Generator | None = None,
    key: MaskKey | None = None,
) -> Tensor:
    """DropBlock by the Triton kernels, for already validated arguments (see ``drop_block``).

    ``input`` is ``(N, C, *spatial)`` with the channels at ``channel_dim`` and 1-3 spatial dims,
    on CUDA (or the CPU in Triton's interpreter); ``p`` a float or a float64 0-dim CPU tensor.
    The output has the input's shape, dtype and layout, and is differentiable.
    """
    if not 1 <= input.dim() - 2 <= 3:
        shape = tuple(input.shape)
        raise ValueError(f"triton_drop_block: input must have 1 to 3 spatial dims, got shape {shape}")
    p_t = p if isinstance(p, Tensor) else torch.tensor(float(p), dtype=torch.float64)
    seed, sid, step, words = _key_tensors(input.shape[0], input.device, generator, key)
    blocks = [int(b) for b in block_size]
    cd = channel_dim % input.dim()
    return drop_block_triton(
        input, seed, sid, step, p_t, words, key is not None, blocks, cd, bool(shared), seeding, scale
    )
