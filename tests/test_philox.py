from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from spatialdrop._philox import (
    MASK32,
    philox4x32,
    philox4x32_int,
    uint32_to_uniform,
    uint32_to_uniform_int,
    uniform,
)

# Random123's known-answer vectors (the file examples/kat_vectors of the Random123 distribution,
# lines "philox4x32 R ctr[4] key[2] -> out[4]"), read from copies of that file:
KAT = [
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        10,
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (MASK32,) * 4, (MASK32,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (
        7,
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A),
    ),
]

# tl.rand(seed, offset) of Triton 3.9.0 under TRITON_INTERPRET=1 (CPU), int64 offsets loaded from
# memory: (seed, offset, float32 bits of tl.rand, tl.randint as uint32). Produced by a kernel that
# stores tl.rand(seed, off) and tl.randint(seed, off); see notes/keyed.md.
TRITON_RAND = [
    (0, 0, 0x3F4C4FD1, 0x6627E8D5),
    (0, 1, 0x3D63666A, 0xF8E4CCA4),
    (1, 0, 0x3E60BFCB, 0xE3E80670),
    (42, 0, 0x3F462A1E, 0x9CEAF053),
    (42, 1, 0x3CC937B5, 0xFCDB2127),
    (42, 2, 0x3EB24FF6, 0xD36C0225),
    (42, 3, 0x3F0A71F6, 0xBAC70475),
    (123456789, 1000, 0x3F6622A0, 0x8CEEAF85),
    (2**32 + 5, 7, 0x3E37BAB6, 0xE908A920),
    (2**63 - 1, 2**31 - 1, 0x3E88FE7A, 0x223F9EC7),
    (0xDEADBEEFCAFE, 2**40 + 3, 0x3DAE0FDD, 0x0AE0FDE4),
    (7, 2**33, 0x3F258CED, 0x52C676CD),
]


def _bits(u: torch.Tensor) -> list[int]:
    return [int(v) & MASK32 for v in u.view(torch.int32).reshape(-1)]


@pytest.mark.parametrize(("rounds", "ctr", "key", "expected"), KAT)
def test_known_answer_vectors(rounds: int, ctr: tuple, key: tuple, expected: tuple) -> None:
    assert philox4x32_int(*ctr, *key, rounds=rounds) == expected
    out = philox4x32(*(torch.tensor(c) for c in ctr), *key, rounds=rounds)
    assert tuple(int(o) for o in out) == expected
    # ints for the counter words work too, and the outputs are int64 words in [0, 2**32)
    out = philox4x32(torch.tensor(ctr[0]), ctr[1], ctr[2], ctr[3], *key, rounds=rounds)
    assert all(o.dtype == torch.int64 for o in out)
    assert tuple(int(o) for o in out) == expected


@pytest.mark.parametrize("rounds", [1, 2, 3, 10])
def test_tensor_matches_int_reference_on_random_words(rounds: int) -> None:
    rng = random.Random(rounds)
    n = 64
    ctr = [[rng.getrandbits(32) for _ in range(n)] for _ in range(4)]
    ctr[0][:4] = [0, MASK32, 1 << 31, (1 << 31) - 1]  # edges of the signed/unsigned split
    k0, k1 = rng.getrandbits(32), rng.getrandbits(32)
    out = philox4x32(*(torch.tensor(c) for c in ctr), k0, k1, rounds=rounds)
    for i in range(n):
        ref = philox4x32_int(*(c[i] for c in ctr), k0, k1, rounds=rounds)
        assert tuple(int(o[i]) for o in out) == ref


def test_broadcasting_and_shapes() -> None:
    col = torch.arange(5).view(1, 5)
    row = torch.arange(3).view(3, 1) * 1000
    out = philox4x32(col, row, 7, torch.tensor(9), 11, 12)
    assert all(o.shape == (3, 5) for o in out)
    for i in range(3):
        for j in range(5):
            assert tuple(int(o[i, j]) for o in out) == philox4x32_int(j, i * 1000, 7, 9, 11, 12)
    assert philox4x32(torch.arange(4), 0, 0, 0, 1, 2, rounds=0)[0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(("seed", "offset", "bits", "word"), TRITON_RAND)
def test_uniform_matches_pinned_triton_values(seed: int, offset: int, bits: int, word: int) -> None:
    u = uniform(seed, torch.tensor([offset]))
    assert u.dtype == torch.float32
    assert _bits(u) == [bits]
    w0 = philox4x32(offset & MASK32, offset >> 32, 0, 0, seed & MASK32, seed >> 32)[0]
    assert int(w0) == word
    assert uint32_to_uniform_int(word) == float(u)
    assert _bits(uniform(seed, offset)) == [bits]  # an int offset too


def test_uint32_to_uniform_range_and_edges() -> None:
    x = torch.tensor([0, 1, (1 << 31) - 1, 1 << 31, MASK32 - 1, MASK32])
    u = uint32_to_uniform(x)
    assert u.dtype == torch.float32
    assert (u >= 0).all()
    assert (u < 1).all()
    # both halves of the word range fold onto [0, 2**31): v and ~v give the same float
    assert u[0] == u[5] == 0
    assert u[1] == u[4]
    assert u[2] == u[3] == u.max()
    assert [uint32_to_uniform_int(int(v)) for v in x] == u.tolist()


def test_uniform_is_uniform() -> None:
    from conftest import assert_binomial

    u = uniform(2024, torch.arange(200_000))
    for edge in (0.1, 0.25, 0.5, 0.9):
        assert_binomial(int((u < edge).sum()), u.numel(), edge, f"u < {edge}")
    # consecutive offsets are not correlated: pairs fall in each quadrant a quarter of the time
    a, b = u[0::2] < 0.5, u[1::2] < 0.5
    assert_binomial(int((a & b).sum()), a.numel(), 0.25, "both < 1/2")


def test_same_bits_on_meta_shape_and_under_compile_and_vmap() -> None:
    offsets = torch.arange(64) * 7919 + 3
    ref = uniform(5, offsets)
    assert uniform(5, offsets.to("meta")).shape == (64,)
    batched = torch.func.vmap(lambda o: uniform(5, o))(offsets.view(8, 8))
    assert torch.equal(batched.reshape(-1), ref)


_HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRITON_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, triton, triton.language as tl
    from spatialdrop._philox import uniform
    from spatialdrop.keyed import MaskKey, keyed_uniform

    @triton.jit
    def rand_kernel(out, offs, seed, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        m = i < n
        tl.store(out + i, tl.rand(seed, tl.load(offs + i, mask=m)), mask=m)

    @triton.jit
    def keyed_kernel(out, ids, step, philox_seed, per_sample, BLOCK: tl.constexpr):
        # keyed_uniform's layout: column j of sample i is word j % 4 at (j // 4, lo, hi, step)
        row = tl.program_id(0)
        sid = tl.load(ids + row)
        j = tl.arange(0, BLOCK)
        z = (j // 4).to(tl.uint32)
        lo = (sid & 0xFFFFFFFF).to(tl.uint32) + z * 0
        hi = ((sid >> 32) & 0xFFFFFFFF).to(tl.uint32) + z * 0
        st = step.to(tl.uint32) + z * 0
        r0, r1, r2, r3 = tl.philox(philox_seed, z, lo, hi, st)
        w = j % 4
        r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
        tl.store(out + row * per_sample + j, tl.uint_to_uniform_float(r), mask=j < per_sample)

    bad = 0
    for seed in [0, 3, 2**40 + 17, 2**64 - 1]:
        offs = torch.tensor([0, 1, 5, 2**31 - 1, 2**31, 2**35 + 9], dtype=torch.int64)
        out = torch.empty(6, dtype=torch.float32)
        rand_kernel[(1,)](out, offs, seed, 6, BLOCK=8)
        bad += not torch.equal(out, uniform(seed, offs))
    for seed, layer, step in [(0, 0, 0), (1234, 2**63 + 5, 77), (2**64 - 1, 3, 2**32 - 1)]:
        ids = torch.tensor([0, 1, 7, -1, 2**40 + 3], dtype=torch.int64)
        key = MaskKey(seed, step, layer, ids)
        out = torch.empty(5, 13, dtype=torch.float32)
        keyed_kernel[(5,)](out, ids, step, key.philox_seed(), 13, BLOCK=16)
        bad += not torch.equal(out, keyed_uniform(key, 13))
    print("mismatches", bad)
    sys.exit(1 if bad else 0)
    """
)


@pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed: the pinned values above stand in")
def test_against_triton_interpreter() -> None:
    # in a subprocess: TRITON_INTERPRET must be set before triton is imported
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "mismatches 0" in res.stdout
