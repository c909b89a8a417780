/* DropBlock's fused CPU pass: ``dst = src * factor`` with every seed's block zeroed, in one sweep.

Why one sweep: see fused.py. The destination is swept in chunks of ``CHUNK_BYTES``; right after
a chunk is multiplied, the blocks whose last element lies in it are zeroed, while their rows are
still in cache (a block's rows all lie at or before its last element, in the chunk or in the
ones just written).

Two ways to find the blocks of a chunk. Contiguous maps with ascending seeds (what the sampler
draws, in the usual layout) are walked: each seed is located as the sweep reaches it, and
nothing per seed is stored (``run_streaming``). Other layouts (channels-last, strided, permuted)
locate every block first and bucket them by the chunk of their last element.

Per seed, mispredicted branches (where a block is cut by the border, which map a seed falls in)
cost more than the arithmetic and the stores, so neither is decided by a branch where the CPU
allows: the map by a multiply, the rows by masked stores (AVX-512).

The seeds are flat indices into the per-channel seed grid ``(N * C, *grid)`` (see
``geometry.py``). No torch headers: the Python side passes raw addresses with the lengths of
their buffers and an int64 parameter block (a buffer, whose length is checked here, as are the
ranges it names against the buffers' lengths), so that any C compiler builds this file.

Exactness: the product is ``src * factor`` in the input's float type (``factor`` rounded to it
first), as torch's ``mul`` by a scalar computes it; a dropped element is that times 0 (NaN for
NaN or infinite input, as torch's dropout gives). No fast-math.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The int64 parameter block (see fused.py). Spatial dims are padded in front to 3. */
enum {
    P_NUMEL,    /* elements of dst (dense: they fill its storage span exactly) */
    P_NSEEDS,   /* number of seeds */
    P_CHANNELS, /* C: map m is (n, c) = (m / C, m % C) */
    P_STRIDE_N, /* dst's stride of the batch dim */
    P_STRIDE_C, /* dst's stride of the channel dim */
    P_LO,       /* the storage range [lo, hi) this call owns */
    P_HI,
    P_PASS,     /* 0: multiply the range and zero the blocks inside it; 1: zero the blocks that
                   end in the range but start before it (after every range's pass 0) */
    P_SEED_BYTES, /* 8: the seeds are int64; 4: int32 (as backward keeps them) */
    P_SIZES,    /* 3 map sizes */
    P_BLOCKS = P_SIZES + 3,  /* 3 block sides */
    P_GRID = P_BLOCKS + 3,   /* 3 seed grid sides */
    P_SHIFT = P_GRID + 3,    /* 3 shifts: uniform index = grid index + shift */
    P_STRIDES = P_SHIFT + 3, /* dst's 3 spatial strides */
    P_COUNT = P_STRIDES + 3
};

#ifndef CHUNK_BYTES
#define CHUNK_BYTES 16384
#endif

typedef struct {
    int64_t first; /* storage offset of the block's first element */
    int64_t last;  /* ... and of its last */
    int32_t extent[3];
} block_t;

/* Division by the grid's sides and the channel count, which are the same for every seed of a
   call: a 32-bit quotient by multiplying with a precomputed 64-bit reciprocal (Lemire, Kaser and
   Kurz, "Faster remainder by direct computation", 2019: exact for every 32-bit dividend and
   divisor), several times faster than a division instruction. Without 128-bit integers (or for
   larger values) ``locate`` divides. */
typedef struct {
    uint32_t d;
    uint64_t m; /* UINT64_MAX / d + 1; unused for d == 1 */
} divisor_t;

typedef struct {
    divisor_t grid[3], channels;
    int fast; /* every divisor fits 32 bits (the dividends are checked per seed) */
} divisors_t;

/* the reciprocal of a divisor below 2**32 */
static divisor_t divisor_of(int64_t n) {
    divisor_t dv;
    dv.d = (uint32_t)n;
    dv.m = dv.d > 1 ? UINT64_MAX / dv.d + 1 : 0;
    return dv;
}

static void divisors_init(const int64_t *P, divisors_t *v) {
    v->fast = P[P_CHANNELS] < ((int64_t)1 << 32);
    for (int d = 0; d < 4; d++) {
        int64_t n = d < 3 ? P[P_GRID + d] : P[P_CHANNELS];
        if (n >= ((int64_t)1 << 32)) v->fast = 0;
        *(d < 3 ? &v->grid[d] : &v->channels) = divisor_of(n);
    }
}

/* n / d and n % d for 32-bit n */
static inline uint32_t divide(uint32_t n, const divisor_t *dv, uint32_t *rem) {
    if (dv->d == 1) {
        *rem = 0;
        return n;
    }
#ifdef __SIZEOF_INT128__
    uint32_t q = (uint32_t)(((unsigned __int128)dv->m * n) >> 64);
#else
    uint32_t q = n / dv->d;
#endif
    *rem = n - q * dv->d;
    return q;
}

/* The block of the seed at grid coordinates ``coord`` of the map whose first element is ``base``. */
static inline void place(block_t *b, const int64_t coord[3], int64_t base, const int64_t *sizes,
                         const int64_t *blocks, const int64_t *shift, const int64_t *strides) {
    int64_t first = base, last = base;
    for (int d = 0; d < 3; d++) {
        int64_t j = coord[d] + shift[d]; /* drops [j - b + 1, j] cut to [0, L) */
        int64_t lo = j - blocks[d] + 1, hi = j;
        if (lo < 0) lo = 0;
        if (hi > sizes[d] - 1) hi = sizes[d] - 1;
        b->extent[d] = (int32_t)(hi - lo + 1);
        first += lo * strides[d];
        last += hi * strides[d];
    }
    b->first = first;
    b->last = last;
}

static void locate(int64_t seed, const int64_t *P, const divisors_t *v, block_t *b) {
    int64_t rest = seed, coord[3];
    int64_t n, c;
    if (v->fast && seed < ((int64_t)1 << 32)) { /* 32-bit: by the reciprocals */
        uint32_t r = (uint32_t)seed, rem;
        for (int d = 2; d >= 0; d--) {
            r = divide(r, &v->grid[d], &rem);
            coord[d] = rem;
        }
        n = divide(r, &v->channels, &rem);
        c = rem;
    } else {
        for (int d = 2; d >= 0; d--) {
            coord[d] = rest % P[P_GRID + d];
            rest /= P[P_GRID + d];
        }
        n = rest / P[P_CHANNELS];
        c = rest % P[P_CHANNELS];
    }
    const int64_t base = n * P[P_STRIDE_N] + c * P[P_STRIDE_C];
    place(b, coord, base, P + P_SIZES, P + P_BLOCKS, P + P_SHIFT, P + P_STRIDES);
}

/* Zeroing a block row by row: each dropped element becomes ``x * 0`` (a zero of x's sign, NaN
   where x is NaN or infinite), as torch's dropout multiplies, so that every path gives the same
   answer on non-finite input; the rows were just written, so the loads hit the cache. Rows are
   short (the block's side), so a loop call per row, or an operation per element, would cost
   more than the stores themselves: each row is done with the fewest fixed-size loads,
   multiplies and stores that cover it, overlapping where its length is no multiple of theirs
   (``x * 0 * 0`` is ``x * 0``: an element done twice gets the same bits), and the kind is
   chosen once per block, not per row. */
#if defined(__GNUC__)
typedef float f32x2 __attribute__((vector_size(8)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x2 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));
#endif

/* ``*at *= 0`` for a value of type T at an unaligned address (one load, multiply, store) */
#define DROP(T, at)                        \
    do {                                   \
        T v_;                              \
        memcpy(&v_, (at), sizeof v_);      \
        v_ *= (T){0};                      \
        memcpy((at), &v_, sizeof v_);      \
    } while (0)

/* the same at two addresses that may overlap: both loaded before either is stored (no load
   waits on the other's store) */
#define DROP2(T, a, b)                     \
    do {                                   \
        T u_, w_;                          \
        memcpy(&u_, (a), sizeof u_);       \
        memcpy(&w_, (b), sizeof w_);       \
        u_ *= (T){0};                      \
        w_ *= (T){0};                      \
        memcpy((a), &u_, sizeof u_);       \
        memcpy((b), &w_, sizeof w_);       \
    } while (0)

#define ROWS(STORE)                                                   \
    for (int32_t i = 0; i < b->extent[0]; i++) {                      \
        char *at = base + i * s0;                                     \
        for (int32_t k = 0; k < b->extent[1]; k++, at += s1) { STORE; } \
    }

/* The rows of T (contiguous) by the vectors of 2 and 4 elements, V2 and V4, and the 32-byte one,
   W: one load and store where the row fits a vector, else two overlapping ones (rows to 64
   bytes), else W after W (float64's W is its V4, which covers its rows to 64 bytes). */
#define ZERO_ROWS(T, V2, V4, W)                                                 \
    if (row <= sizeof(T)) {                                                     \
        ROWS(DROP(T, at));                                                      \
    } else if (row <= sizeof(V2)) {                                             \
        ROWS(DROP(V2, at));                                                     \
    } else if (row <= 2 * sizeof(V2)) {                                         \
        ROWS(DROP2(V2, at, at + row - sizeof(V2)));                             \
    } else if (row <= 2 * sizeof(V4)) {                                         \
        ROWS(DROP2(V4, at, at + row - sizeof(V4)));                             \
    } else if (row <= 64) {                                                     \
        ROWS(DROP2(W, at, at + row - 32));                                      \
    } else {                                                                    \
        ROWS(W t_; memcpy(&t_, at + row - 32, 32); t_ *= (W){0};                \
             for (size_t j = 0; j + 32 <= row; j += 32) DROP(W, at + j);        \
             memcpy(at + row - 32, &t_, 32));                                   \
    }

static void zero_block(char *dst, int64_t esize, const block_t *b, const int64_t *P) {
    const int64_t s0 = P[P_STRIDES] * esize, s1 = P[P_STRIDES + 1] * esize, s2 = P[P_STRIDES + 2];
    const int32_t n = b->extent[2];
    char *base = dst + b->first * esize;
#if defined(__GNUC__)
    if (s2 == 1) {
        const size_t row = (size_t)n * (size_t)esize; /* a multiple of 4 */
        if (esize == 4) {
            ZERO_ROWS(float, f32x2, f32x4, f32x8)
        } else {
            ZERO_ROWS(double, f64x2, f64x4, f64x4)
        }
        return;
    }
#endif
    /* the last dim strided (channels-last), or no vector types: element by element */
    if (esize == 4) {
        ROWS(for (int32_t m = 0; m < n; m++) DROP(float, at + m * s2 * 4));
    } else {
        ROWS(for (int32_t m = 0; m < n; m++) DROP(double, at + m * s2 * 8));
    }
}

/* With AVX-512, a block whose rows fit one 64-byte store (16 float32 or 8 float64: every block
   side up to 16) is zeroed with one masked load, multiply and store per row, and a fixed number
   of them: the block's side in each outer dim, the rows past its cut extent masked off entirely.
   No branch depends on where the block was cut, which costs more than the stores themselves
   when seeds fall near the borders at random (a mispredicted branch per block). A masked-off
   lane is neither written nor faulted on. Chosen once, when the module is loaded. */
typedef void (*zero_fn_t)(char *dst, int64_t esize, const block_t *b, const int64_t *P);
static zero_fn_t zero_short = zero_block; /* the AVX-512 form for short rows, where the CPU has it */

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_MASKED_ZERO 1

__attribute__((target("avx512f"))) static void zero_block_masked(char *dst, int64_t esize, const block_t *b,
                                                                  const int64_t *P) {
    const int64_t s0 = P[P_STRIDES] * esize, s1 = P[P_STRIDES + 1] * esize;
    const int64_t n0 = P[P_BLOCKS] < P[P_SIZES] ? P[P_BLOCKS] : P[P_SIZES];
    const int64_t n1 = P[P_BLOCKS + 1] < P[P_SIZES + 1] ? P[P_BLOCKS + 1] : P[P_SIZES + 1];
    const uint32_t lanes = (uint32_t)b->extent[2]; /* 1 .. 16 float32 or 1 .. 8 float64 */
    const uint32_t row = (1u << lanes) - 1u;
    const int64_t e0 = b->extent[0], e1 = b->extent[1];
    char *base = dst + b->first * esize;
    for (int64_t i = 0; i < n0; i++) {
        /* all ones while i < e0 (and k < e1), by the sign of the difference: no branch */
        const uint32_t plane = row & (uint32_t)((i - e0) >> 63);
        for (int64_t k = 0; k < n1; k++) {
            const uint32_t mask = plane & (uint32_t)((k - e1) >> 63);
            char *at = base + i * s0 + k * s1;
            if (esize == 4) { /* x * 0: see zero_block */
                const __m512 v = _mm512_maskz_loadu_ps((__mmask16)mask, at);
                _mm512_mask_storeu_ps(at, (__mmask16)mask, _mm512_mul_ps(v, _mm512_setzero_ps()));
            } else {
                const __m512d v = _mm512_maskz_loadu_pd((__mmask8)mask, at);
                _mm512_mask_storeu_pd(at, (__mmask8)mask, _mm512_mul_pd(v, _mm512_setzero_pd()));
            }
        }
    }
}
#endif

/* zero_block, or its masked form for rows of one store (see above) */
static inline void zero_any(char *dst, int64_t esize, const block_t *b, const int64_t *P) {
    if (P[P_STRIDES + 2] == 1 && P[P_BLOCKS + 2] * esize <= 64) {
        zero_short(dst, esize, b, P);
    } else {
        zero_block(dst, esize, b, P);
    }
}

/* ``dst[i] = src[i] * factor`` over [lo, hi): one IEEE multiply per element whatever the vector
   width, so every build gives the bits of torch's ``mul`` by a scalar. With GCC on x86-64 Linux
   the loop is compiled for AVX-512, AVX2 and the baseline, and the loader picks the widest the CPU
   has (as torch's own kernels do): the baseline's SSE2 loop alone is slower than torch's multiply
   on a tensor that partly fits the last-level cache. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

#define MULTIPLY(NAME, T)                                             \
    VECTOR_CLONES static void NAME(T *d, const T *s, T f, int64_t n) { \
        for (int64_t i = 0; i < n; i++) d[i] = s[i] * f;              \
    }
MULTIPLY(multiply_f32, float)
MULTIPLY(multiply_f64, double)

/* elements [a, e) of dst: ``src * factor`` with ``scale``, else src copied (unless it is dst) */
static void fill(char *dst, const char *src, int dtype, int scale, double factor, int64_t a, int64_t e) {
    if (!scale) {
        const int64_t esize = dtype == 0 ? 4 : 8;
        if (src != dst) memcpy(dst + a * esize, src + a * esize, (size_t)((e - a) * esize));
    } else if (dtype == 0) {
        multiply_f32((float *)dst + a, (const float *)src + a, (float)factor, e - a);
    } else {
        multiply_f64((double *)dst + a, (const double *)src + a, factor, e - a);
    }
}

#define SEED(i) (P[P_SEED_BYTES] == 4 ? (int64_t)((const int32_t *)seeds)[i] : ((const int64_t *)seeds)[i])

/* Whether dst is laid out (N, C, *spatial) contiguously: map m then fills [m * M, (m + 1) * M),
   M the map's element count (size-1 dims' strides do not matter). */
static int maps_contiguous(const int64_t *P, int64_t *map_numel) {
    int64_t expected = 1;
    for (int d = 2; d >= 0; d--) {
        if (P[P_SIZES + d] > 1 && P[P_STRIDES + d] != expected) return 0;
        expected *= P[P_SIZES + d];
    }
    *map_numel = expected;
    if (P[P_CHANNELS] > 1 && P[P_STRIDE_C] != expected) return 0;
    expected *= P[P_CHANNELS];
    return P[P_NUMEL] == expected || P[P_STRIDE_N] == expected;
}

static int seeds_ascend(const void *seeds, const int64_t *P) {
    for (int64_t i = 1; i < P[P_NSEEDS]; i++)
        if (SEED(i) < SEED(i - 1)) return 0;
    return 1;
}

/* Locating seeds in contiguous maps: a seed's map gives its first element directly (maps are
   laid one after another), so the channel count and the batch play no part; within the map, its
   place needs one division by a grid side less than the map's rank (none in 1-D, one in 2-D, two
   in 3-D). When every seed fits 32 bits, the map too is found by a reciprocal multiply, every
   seed (cheaper than a branch taken at random); else the walker keeps the current map and
   divides only to enter a later one (the seeds ascend). The constants are copied out of the
   parameter block so that they stay in registers (the zeroing writes through char pointers,
   which may alias the block). */
typedef struct {
    int64_t places, map_numel; /* seed places and elements per map */
    int64_t start, base;       /* the current map's first seed place (64-bit seeds) and first element */
    int64_t sizes[3], blocks[3], shift[3], strides[3], grid[3];
    divisor_t g2, g1, maps; /* grid sides 2 and 1, and places (32-bit seeds) */
    int small;              /* places and every seed below 2**32 */
} walker_t;

static void walker_init(walker_t *w, const int64_t *P, int64_t map_numel) {
    w->places = P[P_GRID] * P[P_GRID + 1] * P[P_GRID + 2];
    w->map_numel = map_numel;
    w->start = 0;
    w->base = 0;
    for (int d = 0; d < 3; d++) {
        w->sizes[d] = P[P_SIZES + d];
        w->blocks[d] = P[P_BLOCKS + d];
        w->shift[d] = P[P_SHIFT + d];
        w->strides[d] = P[P_STRIDES + d];
        w->grid[d] = P[P_GRID + d];
    }
    /* the largest seed place is below maps * places: 32 bits hold every seed when that does */
    int64_t total = P[P_NUMEL] / map_numel * w->places;
    w->small = total < ((int64_t)1 << 32);
    /* the reciprocals serve 32-bit seeds only (then every grid side and places fit too) */
    w->g1 = divisor_of(w->small ? w->grid[1] : 1);
    w->g2 = divisor_of(w->small ? w->grid[2] : 1);
    w->maps = divisor_of(w->small ? w->places : 1);
}

static inline void walk(walker_t *w, int64_t seed, block_t *b) {
    int64_t coord[3];
    if (w->small) { /* the map too by a reciprocal; r < places < 2**32 */
        uint32_t r, rem;
        w->base = (int64_t)divide((uint32_t)seed, &w->maps, &r) * w->map_numel;
        uint32_t q = divide(r, &w->g2, &rem);
        coord[2] = rem;
        if (w->grid[0] == 1) {
            coord[1] = q;
            coord[0] = 0;
        } else {
            q = divide(q, &w->g1, &rem);
            coord[1] = rem;
            coord[0] = q;
        }
    } else { /* in 64 bits */
        int64_t r = seed - w->start;
        if (r >= w->places) { /* a later map */
            int64_t m = seed / w->places;
            w->start = m * w->places;
            w->base = m * w->map_numel;
            r = seed - w->start;
        }
        coord[2] = r % w->grid[2];
        r /= w->grid[2];
        coord[1] = r % w->grid[1];
        coord[0] = r / w->grid[1];
    }
    place(b, coord, w->base, w->sizes, w->blocks, w->shift, w->strides);
}

/* The streaming sweep (contiguous maps, ascending seeds): seeds are located one at a time as the
   sweep reaches them, so nothing per seed is stored. In seed order the blocks' last elements
   ascend, except that blocks cut by a map's far border end on the same last row or plane as
   the ones before them: a block is zeroed once the sweep has written past its last element (all
   its elements lie at or before it), at the latest when its map's last element is written, so
   at most one map after its own chunk, while that map is still in cache. */
static void run_streaming(char *dst, const char *src, int dtype, int scale, double factor, const void *seeds,
                          const int64_t *P, int64_t map_numel) {
    const int64_t esize = dtype == 0 ? 4 : 8, chunk = CHUNK_BYTES / esize;
    const int64_t lo = P[P_LO], hi = P[P_HI], nseeds = P[P_NSEEDS];
    walker_t w;
    walker_init(&w, P, map_numel);
    const int64_t places = w.places;
    /* the first seed of the map holding lo: seeds of earlier maps have no element in [lo, hi) */
    const int64_t from = lo / map_numel * places;
    int64_t a0 = 0, a1 = nseeds;
    while (a0 < a1) {
        int64_t mid = a0 + (a1 - a0) / 2;
        if (SEED(mid) < from) a0 = mid + 1;
        else a1 = mid;
    }
    int64_t next = a0;
    block_t b;
    int have = 0; /* b holds seed next, located */
    for (int64_t a = lo; a < hi; a += chunk) {
        int64_t e = a + chunk < hi ? a + chunk : hi;
        fill(dst, src, dtype, scale, factor, a, e);
        for (; next < nseeds; next++, have = 0) {
            if (!have) walk(&w, SEED(next), &b), have = 1;
            if (b.last >= e) break;
            if (b.first >= lo) zero_any(dst, esize, &b, P);
        }
    }
    /* blocks held back behind one that ends past hi: those of maps that start before hi */
    for (; next < nseeds && SEED(next) / places * map_numel < hi; next++, have = 0) {
        if (!have) walk(&w, SEED(next), &b), have = 1;
        if (b.first >= lo && b.last < hi) zero_any(dst, esize, &b, P);
    }
}

/* Returns 0, or -1 when out of memory. */
static int run(char *dst, const char *src, int dtype, int scale, double factor, const void *seeds,
               const int64_t *P) {
    const int64_t esize = dtype == 0 ? 4 : 8, chunk = CHUNK_BYTES / esize;
    const int64_t lo = P[P_LO], hi = P[P_HI], nseeds = P[P_NSEEDS];
    divisors_t div;
    divisors_init(P, &div);
    if (P[P_PASS] == 1) {
        for (int64_t i = 0; i < nseeds; i++) {
            block_t b;
            locate(SEED(i), P, &div, &b);
            if (b.last >= lo && b.last < hi && b.first < lo) zero_block(dst, esize, &b, P);
        }
        return 0;
    }
    int64_t map_numel;
    if (maps_contiguous(P, &map_numel) && seeds_ascend(seeds, P)) {
        run_streaming(dst, src, dtype, scale, factor, seeds, P, map_numel);
        return 0;
    }
    /* other layouts (channels-last, strided, permuted): the blocks that lie wholly in [lo, hi),
       located first, then bucketed by the chunk of their last element (a counting sort) unless
       their last elements already ascend */
    const int64_t nchunks = (hi - lo + chunk - 1) / chunk;
    block_t *blocks = malloc(sizeof(block_t) * (size_t)(nseeds ? nseeds : 1));
    int64_t *start = NULL, *order = NULL;
    if (!blocks) return -1;
    int64_t m = 0;
    int sorted = 1;
    for (int64_t i = 0; i < nseeds; i++) {
        locate(SEED(i), P, &div, &blocks[m]);
        if (blocks[m].first >= lo && blocks[m].last < hi) {
            if (m && blocks[m].last < blocks[m - 1].last) sorted = 0;
            m++;
        }
    }
    if (!sorted) {
        start = calloc((size_t)nchunks + 2, sizeof(int64_t));
        order = malloc(sizeof(int64_t) * (size_t)(m ? m : 1));
        if (!start || !order) {
            free(blocks);
            free(start);
            free(order);
            return -1;
        }
        for (int64_t i = 0; i < m; i++) start[(blocks[i].last - lo) / chunk + 2]++;
        for (int64_t k = 2; k < nchunks + 2; k++) start[k] += start[k - 1];
        for (int64_t i = 0; i < m; i++) order[start[(blocks[i].last - lo) / chunk + 1]++] = i;
        /* now start[k] .. start[k + 1] index the blocks of chunk k */
    }
    int64_t next = 0; /* sorted: the first block not yet zeroed */
    for (int64_t k = 0; k < nchunks; k++) {
        int64_t a = lo + k * chunk, e = a + chunk < hi ? a + chunk : hi;
        fill(dst, src, dtype, scale, factor, a, e);
        if (sorted) {
            for (; next < m && blocks[next].last < e; next++) zero_block(dst, esize, &blocks[next], P);
        } else {
            for (int64_t j = start[k]; j < start[k + 1]; j++) zero_block(dst, esize, &blocks[order[j]], P);
        }
    }
    free(blocks);
    free(start);
    free(order);
    return 0;
}

/* fused(dst, numel, src, seeds, nseeds, params, dtype, scale, factor): addresses as ints, with the
   element counts of dst (and src, laid out alike) and of seeds; params a buffer of P_COUNT int64;
   src may equal dst; src 0 means dst already holds the values (only the zeros are written). */
static PyObject *fused(PyObject *self, PyObject *args) {
    unsigned long long dst, src, seeds;
    long long numel, nseeds;
    Py_buffer params;
    int dtype, scale;
    double factor;
    if (!PyArg_ParseTuple(args, "KLKKLy*iid", &dst, &numel, &src, &seeds, &nseeds, &params, &dtype, &scale,
                          &factor))
        return NULL;
    const int64_t *P = (const int64_t *)params.buf;
    const char *bad = NULL;
    if (params.len != P_COUNT * (Py_ssize_t)sizeof(int64_t)) bad = "the parameter block must hold P_COUNT int64";
    else if (dtype != 0 && dtype != 1) bad = "dtype code must be 0 (float32) or 1 (float64)";
    else if (P[P_NUMEL] != numel || P[P_LO] < 0 || P[P_LO] > P[P_HI] || P[P_HI] > numel)
        bad = "the range [lo, hi) must lie in dst's numel elements";
    else if (P[P_NSEEDS] != nseeds || (P[P_SEED_BYTES] != 4 && P[P_SEED_BYTES] != 8))
        bad = "the seeds must be nseeds int32 or int64";
    if (bad) {
        PyBuffer_Release(&params);
        PyErr_Format(PyExc_ValueError, "fused: %s", bad);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run((char *)(uintptr_t)dst, src ? (const char *)(uintptr_t)src : (const char *)(uintptr_t)dst,
             dtype, src ? scale : 0, factor, (const void *)(uintptr_t)seeds, P);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&params);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* gaps(logs, n, log_q, base, numel, out, out_bytes) -> (count, end): the tail of
   sampling.gap_positions.

   ``logs`` holds ``log1p(-u)`` for ``n`` uniforms (float64, computed by torch); seed i is at
   ``(cumsum_i(floor(logs / log_q) + 1) - 1) + base``, the same float64 operations in the same
   order as the torch ops (so the same bits). Writes the positions below ``numel`` to ``out``
   (``out_len`` elements, at least ``n``: int64, or int32 with ``out_bytes`` 4; they are a prefix,
   ascending) and returns their count and the last position. */
static PyObject *gaps(PyObject *self, PyObject *args) {
    unsigned long long logs_addr, out_addr;
    long long n, out_len;
    double log_q, base, numel;
    int out_bytes;
    if (!PyArg_ParseTuple(args, "KLdddKLi", &logs_addr, &n, &log_q, &base, &numel, &out_addr, &out_len, &out_bytes))
        return NULL;
    const char *bad = NULL;
    if (out_len < n || n < 0 || (out_bytes != 4 && out_bytes != 8)) bad = "out must hold n int32 or int64";
    else if (out_bytes == 4 && numel > 2147483648.0) bad = "int32 output needs at most 2**31 places";
    if (bad) {
        PyErr_Format(PyExc_ValueError, "gaps: %s", bad);
        return NULL;
    }
    const double *logs = (const double *)(uintptr_t)logs_addr;
    int64_t *out = (int64_t *)(uintptr_t)out_addr;
    int32_t *out32 = (int32_t *)(uintptr_t)out_addr;
    double acc = 0.0, pos = base - 1.0;
    long long count = 0;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n; i++) {
        acc += floor(logs[i] / log_q) + 1.0;
        pos = (acc - 1.0) + base;
        if (pos < numel) {
            if (out_bytes == 4) {
                out32[count++] = (int32_t)pos;
            } else {
                out[count++] = (int64_t)pos;
            }
        }
    }
    Py_END_ALLOW_THREADS
    return Py_BuildValue("Ld", count, pos);
}

static PyMethodDef methods[] = {
    {"fused", fused, METH_VARARGS, "dst = src * factor with the seeds' blocks zeroed (see fused.py)."},
    {"gaps", gaps, METH_VARARGS, "Seed positions from log1p(-u) (see sampling.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cfused", "DropBlock's fused CPU pass.", -1, methods};

PyMODINIT_FUNC PyInit__cfused(void) {
#ifdef HAVE_MASKED_ZERO
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) zero_short = zero_block_masked;
#endif
    return PyModule_Create(&module);
}
