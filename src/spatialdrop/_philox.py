"""Philox-4x32-10 in plain PyTorch integer ops: the same bits on every device.

Philox (Salmon, Moraes, Dror and Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3", SC'11) is a
counter-based generator: the output is a pure function of a 128-bit counter and a 64-bit key, so
there is no state to carry, split or replay. It is the generator behind curand and Triton's
``tl.rand``.

Every 32-bit word is held in an ``int64`` tensor with a value in ``[0, 2**32)``. The only products
are of such a word with a *negative* 32-bit constant (``a - 2**32`` for the unsigned multiplier
``a``), which stay inside ``(-2**63, 0]``: no integer overflow happens anywhere, so the result does
not depend on how a backend treats overflow. The high word of the unsigned product follows from
``x * a = x * (a - 2**32) + x * 2**32``: ``hi = (p >> 32) + x`` with ``p`` the signed product and
``>>`` torch's arithmetic shift; the low word is ``p mod 2**32``.

Only element-wise integer ops, ``stack`` and ``flip`` are used, so the functions work on any
device, under ``torch.compile(fullgraph=True)`` and under ``vmap``.

The ``*_int`` functions are the same algorithm on Python ints, for host-side scalars (deriving
keys) and as a reference in tests.
"""

from __future__ import annotations

import functools
import struct
from typing import Union

import torch
from torch import Tensor

from ._compat import dispatch_mode_active, is_compiling

__all__ = [
    "MASK32",
    "philox4x32",
    "philox4x32_int",
    "uint32_to_uniform",
    "uint32_to_uniform_int",
    "uniform",
]

MASK32 = 0xFFFFFFFF
ROUND_A = 0xD2511F53  # multiplier of word 0 (Random123's PHILOX_M4x32_0)
ROUND_B = 0xCD9E8D57  # multiplier of word 2 (PHILOX_M4x32_1)
KEY_A = 0x9E3779B9  # Weyl increment of key word 0 (golden ratio)
KEY_B = 0xBB67AE85  # Weyl increment of key word 1 (sqrt(3) - 1)

# Triton's uint_to_uniform_float scale for 32-bit input, 4.6566127342e-10 (the largest value with
# (2**31 - 1) * scale < 1 in float32), rounded to float32 as Triton does with the literal. As an
# exact float32 value the product is the same whether a backend multiplies in float32 or float64.
UNIFORM_SCALE = struct.unpack("<f", struct.pack("<f", 4.6566127342e-10))[0]

Word = Union[Tensor, int]


def philox4x32_int(
    c0: int, c1: int, c2: int, c3: int, k0: int, k1: int, rounds: int = 10
) -> tuple[int, int, int, int]:
    """Philox-4x32 on Python ints: the reference for :func:`philox4x32`.

    Args:
        c0: counter word 0 (each word is taken modulo ``2**32``).
        c1: counter word 1.
        c2: counter word 2.
        c3: counter word 3.
        k0: key word 0.
        k1: key word 1.
        rounds: number of rounds; 10 is the standard (and Triton's, curand's) choice.

    Returns:
        The four output words, each in ``[0, 2**32)``.

    Examples:
        >>> [f"{w:08x}" for w in philox4x32_int(0, 0, 0, 0, 0, 0)]
        ['6627e8d5', 'e169c58d', 'bc57ac4c', '9b00dbd8']
    """
    c0, c1, c2, c3, k0, k1 = (v & MASK32 for v in (c0, c1, c2, c3, k0, k1))
    for _ in range(rounds):
        p0, p2 = ROUND_A * c0, ROUND_B * c2
        c0, c1, c2, c3 = (p2 >> 32) ^ c1 ^ k0, p2 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def uint32_to_uniform_int(x: int) -> float:
    """Triton's ``uint_to_uniform_float`` for one 32-bit word, on Python numbers.

    The word is read as an ``int32``; negative values ``v`` become ``-v - 1``; the result is
    that non-negative int times :data:`UNIFORM_SCALE`, both rounded to float32 and multiplied in
    float32 (the rounding is emulated with ``torch``).
    """
    v = x & MASK32
    r = MASK32 - v if v >= 1 << 31 else v
    out = torch.tensor(r, dtype=torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)
    return float(out)


def _word(c: Word, device: torch.device | None) -> Tensor:
    if isinstance(c, Tensor):
        return c
    # a fill, not torch.tensor(...): no host-to-device copy on an accelerator
    return torch.full((), int(c) & MASK32, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=512)
def _constants_cached(
    device: torch.device, k0: int, k1: int, rounds: int
) -> tuple[list[Tensor], list[Tensor]]:
    return _constants(device, k0, k1, rounds)


def _constants(device: torch.device, k0: int, k1: int, rounds: int) -> tuple[list[Tensor], list[Tensor]]:
    """Per-round multipliers and round keys as ``(2, 1)`` columns, in :func:`philox4x32`'s row order.

    The multipliers are the signed ``a - 2**32``; the rows alternate between the rounds.
    """
    a_s, b_s = ROUND_A - (1 << 32), ROUND_B - (1 << 32)
    keys = []
    for r in range(rounds):
        keys.append([k1, k0] if r % 2 == 0 else [k0, k1])
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    m = torch.tensor([[a_s, b_s], [b_s, a_s]], dtype=torch.int64, device=device).unsqueeze(-1)
    k = torch.tensor(keys, dtype=torch.int64, device=device).unsqueeze(-1)
    return list(m.unbind(0)), list(k.unbind(0))


def philox4x32(
    c0: Word, c1: Word, c2: Word, c3: Word, k0: int, k1: int, rounds: int = 10
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32 on tensors: counters may be tensors (broadcast together), the key is two ints.

    Args:
        c0: counter word 0, an ``int64`` tensor with values in ``[0, 2**32)`` or an int.
        c1: counter word 1, likewise.
        c2: counter word 2, likewise.
        c3: counter word 3, likewise.
        k0: key word 0, an int (taken modulo ``2**32``).
        k1: key word 1, an int.
        rounds: number of rounds (10 for Philox-4x32-10).

    Returns:
        The four output words as ``int64`` tensors of the broadcast shape, values in
        ``[0, 2**32)``.

    Examples:
        >>> import torch
        >>> out = philox4x32(torch.tensor([0, 0xFFFFFFFF]), 0, 0, 0, 0, 0)
        >>> hex(int(out[0][0])), hex(int(out[3][0]))
        ('0x6627e8d5', '0x9b00dbd8')
    """
    device = next((c.device for c in (c0, c1, c2, c3) if isinstance(c, Tensor)), None)
    w0, w1, w2, w3 = torch.broadcast_tensors(*(_word(c, device) for c in (c0, c1, c2, c3)))
    if rounds == 0:
        return w0, w1, w2, w3
    shape = w0.shape
    # Rows of the (2, M) state: ``e`` holds the two words that get multiplied, ``o`` the words
    # they are xor-ed with. Round r, r even: e = (c0, c2), o = (c3, c1); the round maps
    # row 0 to c2' = hi(A c0) ^ c3 ^ k1 and row 1 to c0' = hi(B c2) ^ c1 ^ k0, and the low
    # products (c3', c1') must be swapped to pair up again, hence the flip. Odd rounds see the
    # rows the other way round and use the multipliers and keys in the other order.
    e = torch.stack((w0, w2)).reshape(2, -1)
    o = torch.stack((w3, w1)).reshape(2, -1)
    k0, k1 = k0 & MASK32, k1 & MASK32
    dev = e.device
    if is_compiling() or dispatch_mode_active():
        mult, keys = _constants(dev, k0, k1, rounds)  # never cache fake or traced tensors
    else:
        mult, keys = _constants_cached(dev, k0, k1, rounds)
    p = o
    for r in range(rounds):
        p = e * mult[r % 2]  # in (-2**63, 0]: x * (a - 2**32), no overflow
        hi = p >> 32
        if r == 0:  # out of place: under vmap only some inputs may be batched
            e = (((hi + e) ^ o) ^ keys[r]) & MASK32
        else:  # e and hi are batched alike from here on, so in place is safe
            e = hi.add_(e).bitwise_xor_(o).bitwise_xor_(keys[r]).bitwise_and_(MASK32)
        o = p.flip(0)
    lo = p & MASK32
    # after the last round r = rounds - 1: row (r % 2) holds c2', c3'; the other row c0', c1'
    i = (rounds - 1) % 2
    j = 1 - i
    return (
        e[j].reshape(shape),
        lo[j].reshape(shape),
        e[i].reshape(shape),
        lo[i].reshape(shape),
    )


def uint32_to_uniform(x: Tensor) -> Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words held in ``int64``: float32 in [0, 1).

    The word is read as an ``int32`` ``v``; ``v < 0`` becomes ``-v - 1`` (so both halves of the
    range map onto ``[0, 2**31)``); the result is that int, rounded to float32, times
    :data:`UNIFORM_SCALE` in float32.
    """
    r = torch.minimum(x, MASK32 - x)  # x if v >= 0, else MASK32 - x = -v - 1
    return r.to(torch.float32) * UNIFORM_SCALE


def uniform(seed: int, offset: Word) -> Tensor:
    """Uniform float32 numbers in [0, 1), bit for bit those of Triton's ``tl.rand(seed, offset)``.

    Triton keys Philox with ``(seed mod 2**32, seed >> 32)`` and counts with
    ``(offset mod 2**32, offset >> 32, 0, 0)`` (an ``int32`` offset has a zero high word), and
    converts the first output word with ``uint_to_uniform_float``.

    Args:
        seed: the 64-bit seed, an int in ``[0, 2**64)``.
        offset: an ``int64`` tensor of offsets (read as 64-bit two's complement) or an int.

    Returns:
        A float32 tensor of the offsets' shape.

    Examples:
        >>> import torch
        >>> uniform(42, torch.arange(4))
        tensor([0.7741, 0.0246, 0.3483, 0.5408])
    """
    off = offset if isinstance(offset, Tensor) else torch.tensor(int(offset), dtype=torch.int64)
    w0, _, _, _ = philox4x32(off & MASK32, (off >> 32) & MASK32, 0, 0, seed & MASK32, (seed >> 32) & MASK32)
    return uint32_to_uniform(w0)
