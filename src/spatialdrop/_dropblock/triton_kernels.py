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

Backward re-runs both kernels from the same key (a few words): nothing of per-element size is
saved. The op is registered as ``torch.ops.spatialdrop.triton_drop_block`` with
``torch.library.triton_op``, so ``torch.compile(fullgraph=True)`` sees one op.

Triton is imported and the kernels are defined on first use, so that ``TRITON_INTERPRET=1``
(Triton's CPU interpreter, for tests) may be set at any time before that.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._validation import float_dtype_of
from ..keyed import MaskKey
from .keyed_seeds import rule_key, seed_rule, threshold_table

__all__ = ["cpu_interpreter", "register_op", "seed_bits", "triton_available", "triton_drop_block"]

_SCALE_MODES = {"none": 0, "expected": 1, "realized": 2}
_BIAS = 1 << 32  # added to 32-bit key words so that Triton always types them int64
_SEED_BLOCK = 128
_APPLY_BLOCK = 1024


@functools.cache
def _triton_importable() -> bool:
    """Whether ``triton`` is installed (found without importing it: the import takes seconds)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


_cpu_interpreter = False


@contextlib.contextmanager
def cpu_interpreter() -> Iterator[None]:
    """Let CPU tensors take the Triton path, run by Triton's interpreter (for tests).

    ``TRITON_INTERPRET=1`` must have been set before ``triton`` was first imported (Triton
    decides at import whether its own library functions are compiled or interpreted).

    Raises:
        RuntimeError: if ``TRITON_INTERPRET`` is not ``1``.
    """
    global _cpu_interpreter
    if not _interpreting():
        raise RuntimeError("cpu_interpreter: set TRITON_INTERPRET=1 before triton is first imported")
    previous, _cpu_interpreter = _cpu_interpreter, True
    try:
        yield
    finally:
        _cpu_interpreter = previous


def triton_available(input: Tensor | None = None) -> bool:
    """Whether the Triton DropBlock can run on ``input``.

    True when ``triton`` is importable, ``SPATIALDROP_BACKEND`` is not ``torch``, and ``input``
    is a CUDA tensor (or a CPU tensor inside :func:`cpu_interpreter`, for the tests). CPU input
    in normal use never touches Triton.
    """
    if os.environ.get("SPATIALDROP_BACKEND", "").lower() == "torch":
        return False
    if not _triton_importable():
        return False
    if input is None:
        return True
    return input.is_cuda or (_cpu_interpreter and _interpreting() and input.device.type == "cpu")


@functools.cache
def _kernels_for(interpret: bool) -> tuple[Any, Any]:
    name = f"spatialdrop._dropblock._triton_jit_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("triton_jit.py"))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the Triton kernels from {__file__}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.seed_kernel, module.apply_kernel


def _kernels() -> tuple[Any, Any]:
    """The two kernels, defined on first use in the current mode (compiled or interpreted)."""
    return _kernels_for(_interpreting())


def _wrap(kernel: Any) -> Any:
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _table(gamma: float, device: torch.device) -> Tensor:
    return threshold_table(gamma, device)


def _padded(sizes: Sequence[int], fill: int) -> list[int]:
    return [fill] * (3 - len(sizes)) + list(sizes)


def _is_dense(t: Tensor) -> bool:
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _seed_bits_impl(
    n: int,
    row: int,
    gamma: float,
    device: torch.device,
    table: Tensor,
    seed: Tensor,
    sample_ids: Tensor,
    step: Tensor,
    key0: int,
    key1: int,
    keyed: bool,
) -> Tensor:
    words = _cdiv(row, 32)
    bits = torch.zeros((n, words), dtype=torch.int32, device=device)
    if gamma <= 0.0 or row == 0 or n == 0:
        return bits
    rule = seed_rule(gamma)
    k = rule.chunk
    chunks = _cdiv(row, k)
    seed_kernel, _ = _kernels()
    grid = (_cdiv(n * chunks, _SEED_BLOCK),)
    _wrap(seed_kernel)[grid](
        bits,
        table,
        seed,
        sample_ids,
        step,
        key0 + _BIAS,
        key1 + _BIAS,
        row,
        words,
        chunks,
        n * chunks,
        K=k,
        LOG_K=k.bit_length() - 1,
        KEYED=keyed,
        BLOCK=_SEED_BLOCK,
    )
    return bits


def _drop_block_impl(
    input: Tensor,
    seed: Tensor,
    sample_ids: Tensor,
    step: Tensor,
    table: Tensor,
    key0: int,
    key1: int,
    keyed: bool,
    gamma: float,
    blocks: list[int],
    valid: bool,
    shared: bool,
    channel_dim: int,
    scale_mode: int,
    factor: float,
) -> Tensor:
    x = input.movedim(channel_dim, 1)
    if not _is_dense(x):
        x = x.contiguous()
    n, c = int(x.shape[0]), int(x.shape[1])
    sizes = [int(s) for s in x.shape[2:]]
    grid = [s - b + 1 if valid else s + b - 1 for s, b in zip(sizes, blocks)]
    maps = 1 if shared else c
    row = maps * math.prod(grid)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out.movedim(1, channel_dim)
    bits = _seed_bits_impl(n, row, gamma, x.device, table, seed, sample_ids, step, key0, key1, keyed)
    words = bits.shape[1]
    _, apply_kernel = _kernels()
    size3, block3, grid3 = _padded(sizes, 1), _padded(blocks, 1), _padded(grid, 1)
    strides3 = _padded([int(s) for s in x.stride()[2:]], 1)
    fdt = float_dtype_of(x)
    factors = torch.empty(0, dtype=fdt, device=x.device)
    if scale_mode == _SCALE_MODES["expected"]:
        factors = torch.full((n,), factor, dtype=fdt, device=x.device)
    elif scale_mode == _SCALE_MODES["realized"]:
        counts = torch.zeros(n, dtype=torch.int32, device=x.device)
        per_sample = maps * math.prod(sizes)
        cs = [per_sample, math.prod(sizes)] + [math.prod(size3[i + 1 :]) for i in range(3)]
        _wrap(apply_kernel)[(_cdiv(n * per_sample, _APPLY_BLOCK),)](
            x, x, bits, factors, counts, n * per_sample, *cs, n, maps, *size3, *grid3, words,
            B0=block3[0], B1=block3[1], B2=block3[2], VALID=int(valid), SHARED=shared, COUNT=True,
            SCALE=False, BLOCK=_APPLY_BLOCK,
        )  # fmt: skip
        kept = (per_sample - counts).to(fdt)
        factors = torch.where(kept > 0, per_sample / kept.clamp(min=1), torch.zeros_like(kept))
    s_c = int(x.stride(1))
    _wrap(apply_kernel)[(_cdiv(x.numel(), _APPLY_BLOCK),)](
        x, out, bits, factors, bits, x.numel(), int(x.stride(0)), s_c, *strides3, n, c, *size3, *grid3, words,
        B0=block3[0], B1=block3[1], B2=block3[2], VALID=int(valid), SHARED=shared, COUNT=False,
        SCALE=scale_mode != _SCALE_MODES["none"], BLOCK=_APPLY_BLOCK,
    )  # fmt: skip
    return out.movedim(1, channel_dim)


def _register() -> Any:
    """Register ``spatialdrop::triton_drop_block`` (at import: not inside a traced call)."""
    from torch.library import triton_op

    @triton_op("spatialdrop::triton_drop_block", mutates_args=())
    def triton_drop_block_op(
        input: Tensor,
        seed: Tensor,
        sample_ids: Tensor,
        step: Tensor,
        table: Tensor,
        key0: int,
        key1: int,
        keyed: bool,
        gamma: float,
        blocks: list[int],
        valid: bool,
        shared: bool,
        channel_dim: int,
        scale_mode: int,
        factor: float,
    ) -> Tensor:
        return _drop_block_impl(
            input, seed, sample_ids, step, table, key0, key1, keyed, gamma, blocks, valid, shared,
            channel_dim, scale_mode, factor,
        )  # fmt: skip

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs[1:5])
        ctx.args = inputs[5:]

    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        seed, sample_ids, step, table = ctx.saved_tensors
        g = triton_drop_block_op(grad, seed, sample_ids, step, table, *ctx.args)
        return (g,) + (None,) * 14

    triton_drop_block_op.register_autograd(backward, setup_context=setup_context)

    @triton_drop_block_op.register_fake
    def _(input: Tensor, *args: Any) -> Tensor:
        # the output's layout is the (dense) input's, as the kernel writes it
        channel_dim = args[11]
        x = input.movedim(channel_dim, 1)
        if not _is_dense(x):
            x = x.contiguous()
        return torch.empty_like(x).movedim(1, channel_dim)

    return triton_drop_block_op


_OP: Any = None


def register_op() -> Any:
    """Register ``spatialdrop::triton_drop_block`` once and return it.

    Registering imports ``triton`` (seconds), so it happens at this module's import only where
    CUDA is available, else on the first eager call; call it before a ``torch.compile`` whose
    trace would otherwise be the first call (the tests do, for the interpreter).
    """
    global _OP
    if _OP is None:
        _OP = _register()
    return _OP


if _triton_importable() and torch.cuda.is_available():
    register_op()


def _key_tensors(
    n: int, device: torch.device, generator: torch.Generator | None, key: MaskKey | None
) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """``(seed, sample_ids, step, key0, key1)`` for the op: keyed words, or a device-drawn key."""
    if key is not None:
        k0, k1 = rule_key(key)
        sid = key.sample_ids.to(device=device, dtype=torch.int64)
        st = key.step
        if isinstance(st, Tensor):
            step = st.to(device=device, dtype=torch.int64).reshape(1)
        else:
            step = torch.full((1,), int(st), dtype=torch.int64, device=device)
        return torch.empty(0, dtype=torch.int64, device=device), sid, step, k0, k1
    seed = torch.randint(0, 1 << 32, (2,), dtype=torch.int64, device=device, generator=generator)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    return seed, empty, empty, 0, 0


def seed_bits(n: int, row: int, gamma: float, key: MaskKey, device: torch.device | str) -> Tensor:
    """The keyed packed seed bits ``(n, ceil(row / 32))`` int32 of :func:`_seed_kernel` (for tests).

    Bit ``t % 32`` of word ``t // 32`` of row ``i`` is place ``t`` of sample ``i``'s seed row.
    """
    dev = torch.device(device)
    seed, sid, step, k0, k1 = _key_tensors(n, dev, None, key)
    return _seed_bits_impl(n, row, gamma, dev, _table(gamma, dev), seed, sid, step, k0, k1, True)


def triton_drop_block(
    input: Tensor,
    *,
    gamma: float,
    blocks: Sequence[int],
    seeding: str = "uniform",
    shared: bool = False,
    channel_dim: int = 1,
    scale: str = "expected",
    p: float = 0.1,
    generator: torch.Generator | None = None,
    key: MaskKey | None = None,
) -> Tensor:
    """DropBlock by the Triton kernels, for already validated arguments (see ``drop_block``).

    Args:
        input: a float tensor ``(N, C, *spatial)`` (channel axis at ``channel_dim``), 1-3
            spatial dims, on CUDA (or on the CPU in Triton's interpreter mode).
        gamma: the seed rate (from the uniform or valid calibration).
        blocks: the block side per spatial dim.
        seeding: ``"uniform"`` or ``"valid"``.
        shared: one mask per sample for all channels.
        channel_dim: the channel axis (non-negative, not 0).
        scale: ``"expected"`` (times ``1 / (1 - p)`` rounded as the torch path does),
            ``"realized"`` (each sample's kept fraction) or ``"none"``.
        p: the drop probability, for ``scale="expected"``.
        generator: the torch generator for unkeyed masks (a 2-word Philox key is drawn from
            it on the device).
        key: a :class:`~spatialdrop.MaskKey` for keyed masks (bit-identical to the CPU path).

    Returns:
        The output, with the input's shape, dtype and (dense) layout; differentiable.
    """
    cd = channel_dim % input.dim()
    if not 1 <= input.dim() - 2 <= 3:
        shape = tuple(input.shape)
        raise ValueError(f"triton_drop_block: input must have 1 to 3 spatial dims, got shape {shape}")
    factor = 1.0
    if scale == "expected":
        factor = float(torch.tensor(1.0 / (1.0 - p), dtype=float_dtype_of(input)))
    seed, sid, step, k0, k1 = _key_tensors(input.shape[0], input.device, generator, key)
    out: Tensor = register_op()(
        input, seed, sid, step, _table(float(gamma), input.device), k0, k1, key is not None, float(gamma),
        [int(b) for b in blocks], seeding == "valid", bool(shared), cd, _SCALE_MODES[scale], factor,
    )  # fmt: skip
    return out
