"""The Triton kernels of the fused DropBlock, executed afresh per mode by :func:`.triton_kernels.kernels`.

See :mod:`spatialdrop._dropblock.triton_kernels` for what they compute; the seed rule is that of
:mod:`spatialdrop._dropblock.keyed_seeds`.
"""

# mypy: ignore-errors

triton = None
if __name__.startswith("spatialdrop._dropblock._triton_jit_"):  # loaded by .triton_kernels
    import triton
    import triton.language as tl
# else imported as a plain module (doctest collection): it defines nothing and imports no triton,
# which would fix the compiled-or-interpreted choice for the whole process

__all__ = ["apply_kernel", "seed_kernel"]

if triton is not None:

    @triton.jit
    def _to_bf16_rne(r):
        """float32 to bfloat16, rounded to nearest even as torch rounds (the interpreter truncates)."""
        bits = r.to(tl.uint32, bitcast=True)
        up = bits + 0x7FFF + ((bits >> 16) & 1)
        up = tl.where(r != r, bits | 0x400000, up)  # NaN stays a (quiet) NaN
        return (up >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    # Only Triton builtins and functions defined here: Triton's own library functions (tl.zeros,
    # tl.max, tl.philox, ...) are compiled or interpreted as chosen when triton was imported.

    @triton.jit
    def _maximum(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _philox(c0, c1, c2, c3, k0, k1):
        """Philox-4x32-10, as Triton's ``philox_impl`` for uint32 words."""
        for _ in tl.static_range(10):
            _c0, _c2 = c0, c2
            c0 = tl.umulhi(0xCD9E8D57, _c2) ^ c1 ^ k0
            c2 = tl.umulhi(0xD2511F53, _c0) ^ c3 ^ k1
            c1 = tl.mul(0xCD9E8D57, _c2, sanitize_overflow=False)
            c3 = tl.mul(0xD2511F53, _c0, sanitize_overflow=False)
            k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
            k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
        return c0, c1, c2, c3

    @triton.jit
    def _gap_step(
        r, pos, alive, c64, n, table_ptr, bits_ptr, row, words_per_row, K: tl.constexpr, LOG_K: tl.constexpr
    ):
        """One word of a chunk's chain: the next gap, its seed bit set if inside the chunk and row."""
        w = r.to(tl.int64) & 0xFFFFFFFF
        cnt = pos * 0
        for i in tl.static_range(LOG_K):
            # a binary search over the K thresholds: steps of K/2, K/4, ..., 1 (no constexpr is
            # assigned in the loop: the compiler refuses a constexpr defined twice)
            t = tl.load(table_ptr + cnt + ((K >> (i + 1)) - 1))
            cnt = tl.where(t <= w, cnt + (K >> (i + 1)), cnt)
        t = tl.load(table_ptr + cnt)
        cnt = tl.where(t <= w, cnt + 1, cnt)
        pos = pos + cnt + 1
        place = c64 * K + pos
        ok = alive & (pos < K) & (place < row)
        bit = (tl.full(pos.shape, 1, tl.uint32) << (place & 31).to(tl.uint32)).to(tl.int32, bitcast=True)
        tl.atomic_or(bits_ptr + n * words_per_row + (place >> 5), bit, mask=ok)
        return pos, alive & (pos < K)

    @triton.jit(do_not_specialize=["key0", "key1", "row", "words_per_row", "chunks", "total"])
    def seed_kernel(
        bits_ptr,
        table_ptr,
        key_ptr,
        sid_ptr,
        step_ptr,
        key0,
        key1,
        row,
        words_per_row,
        chunks,
        total,
        K: tl.constexpr,
        LOG_K: tl.constexpr,
        KEYED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        alive = lane < total
        n = lane // chunks  # one lane per (sample, chunk)
        c64 = lane % chunks
        zero = tl.full([BLOCK], 0, tl.int64)
        if KEYED:
            w0 = key0 & 0xFFFFFFFF
            w1 = key1 & 0xFFFFFFFF
            sid = tl.load(sid_ptr + n, mask=alive, other=0)
            step = zero + (tl.load(step_ptr) & 0xFFFFFFFF)
        else:
            w0 = tl.load(key_ptr) & 0xFFFFFFFF
            w1 = tl.load(key_ptr + 1) & 0xFFFFFFFF
            sid = n
            step = zero
        k0 = w0.to(tl.uint32)
        k1 = w1.to(tl.uint32)
        sid_lo = (sid & 0xFFFFFFFF).to(tl.uint32)
        sid_hi = ((sid >> 32) & 0xFFFFFFFF).to(tl.uint32)
        step32 = step.to(tl.uint32)
        pos = tl.full([BLOCK], -1, tl.int64)
        d = tl.program_id(0) * 0  # an int32 tensor: a loop-carried value cannot be a constexpr
        while tl.reduce(alive.to(tl.int32), 0, _maximum) > 0:
            ctr = (c64 * (K // 4) + d).to(tl.uint32)
            r0, r1, r2, r3 = _philox(ctr, sid_lo, sid_hi, step32, k0, k1)
            pos, alive = _gap_step(r0, pos, alive, c64, n, table_ptr, bits_ptr, row, words_per_row, K, LOG_K)
            pos, alive = _gap_step(r1, pos, alive, c64, n, table_ptr, bits_ptr, row, words_per_row, K, LOG_K)
            pos, alive = _gap_step(r2, pos, alive, c64, n, table_ptr, bits_ptr, row, words_per_row, K, LOG_K)
            pos, alive = _gap_step(r3, pos, alive, c64, n, table_ptr, bits_ptr, row, words_per_row, K, LOG_K)
            d += 1

    @triton.jit(do_not_specialize=["numel", "words_per_row"])
    def apply_kernel(
        x_ptr,
        out_ptr,
        bits_ptr,
        factor_ptr,
        counts_ptr,
        numel,
        s_n,
        s_c,
        s_0,
        s_1,
        s_2,
        size_n,
        size_c,
        size_0,
        size_1,
        size_2,
        grid_0,
        grid_1,
        grid_2,
        words_per_row,
        B0: tl.constexpr,
        B1: tl.constexpr,
        B2: tl.constexpr,
        VALID: tl.constexpr,
        SHARED: tl.constexpr,
        COUNT: tl.constexpr,
        SCALE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        m = o < numel
        n = (o // s_n) % size_n
        z = (o // s_0) % size_0
        y = (o // s_1) % size_1
        x = (o // s_2) % size_2
        if SHARED:
            base = n * words_per_row * 32
        else:
            c = (o // s_c) % size_c
            base = n * words_per_row * 32 + c * (grid_0 * grid_1 * grid_2)
        dropped = tl.full([BLOCK], 0, tl.int32)
        # the seed places of an element's window along the last dim, [lo, hi], read as 64-bit
        # windows of bits, 32 places at a time
        lo = tl.maximum(x - (B2 - 1) * VALID, 0)
        hi = tl.minimum(x + (B2 - 1) * (1 - VALID), grid_2 - 1)
        for e0 in range(B0):  # loops, not unrolled: registers and code do not grow with the block
            g0 = z + e0 - (B0 - 1) * VALID
            ok0 = (g0 >= 0) & (g0 < grid_0)
            for e1 in range(B1):
                g1 = y + e1 - (B1 - 1) * VALID
                ok1 = m & ok0 & (g1 >= 0) & (g1 < grid_1)
                row = base + (g0 * grid_1 + g1) * grid_2
                for w in tl.static_range((B2 + 31) // 32):
                    start = lo + 32 * w
                    width = tl.maximum(tl.minimum(hi - start + 1, 32), 0)
                    ok = ok1 & (width > 0)
                    t = row + start
                    sh = t & 31
                    wa = tl.load(bits_ptr + (t >> 5), mask=ok, other=0)
                    wb = tl.load(bits_ptr + (t >> 5) + 1, mask=ok & (sh + width > 32), other=0)
                    pair = wa.to(tl.uint32, bitcast=True).to(tl.uint64) | (
                        wb.to(tl.uint32, bitcast=True).to(tl.uint64) << 32
                    )
                    ones = (tl.full([BLOCK], 1, tl.uint64) << width.to(tl.uint64)) - 1
                    hit = (pair >> sh.to(tl.uint64)) & ones
                    dropped = dropped | (hit != 0).to(tl.int32)
        if COUNT:
            tl.atomic_add(counts_ptr + n, dropped, mask=m & (dropped != 0))
        else:
            v = tl.load(x_ptr + o, mask=m)
            if SCALE:
                f = tl.load(factor_ptr + n, mask=m)
                r = v.to(f.dtype) * f
            elif v.dtype == tl.float64:
                r = v
            else:  # exact in float32; 16-bit products are formed there
                r = v.to(tl.float32)
            # x * 0 where dropped, as on every path: NaN where x is NaN or infinite
            r = tl.where(dropped != 0, r * 0.0, r)
            if v.dtype == tl.bfloat16:  # noqa: SIM108 (a constexpr branch)
                v = _to_bf16_rne(r)
            else:
                v = r.to(v.dtype)
            tl.store(out_ptr + o, v, mask=m)
