/* DropBlock's fused CPU pass: ``dst = src * factor`` with every seed's block zeroed, in one sweep.

The torch-op path multiplies the whole tensor, then writes the dropped runs: by the time the
zeros are written the multiply has long left them behind, so each run is a cache miss (about
half the op's time on a 25 MB activation). Here the destination is swept in chunks of
``CHUNK_BYTES``; right after a chunk is multiplied, the blocks whose last element lies in it
are zeroed, while their rows are still in cache (a block's rows all lie at or before its last
element, in the chunk or in the ones just written).

The seeds are flat indices into the per-channel seed grid ``(N * C, *grid)`` (see
``geometry.py``). No torch headers: the Python side passes raw addresses and an int64 parameter
block, and this file builds with any C compiler as an ordinary extension module
(``spatialdrop._dropblock._cfused``). When it cannot be built, the library uses its torch-op path,
which gives the same bits.

Exactness: the product is ``src * factor`` in the input's float type (``factor`` rounded to it
first), as torch's ``mul`` by a scalar computes it; zeros are +0.0. No fast-math.
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
#define CHUNK_BYTES 4096
#endif

typedef struct {
    int64_t first; /* storage offset of the block's first element */
    int64_t last;  /* ... and of its last */
    int32_t extent[3];
} block_t;

static void locate(int64_t seed, const int64_t *P, block_t *b) {
    int64_t rest = seed, coord[3];
    if (seed < ((int64_t)1 << 32)) { /* 32-bit division: several times faster */
        uint32_t r = (uint32_t)seed;
        for (int d = 2; d >= 0; d--) {
            uint32_t g = (uint32_t)P[P_GRID + d];
            coord[d] = g == 1 ? 0 : r % g;
            r = g == 1 ? r : r / g;
        }
        rest = r;
    } else {
        for (int d = 2; d >= 0; d--) {
            coord[d] = rest % P[P_GRID + d];
            rest /= P[P_GRID + d];
        }
    }
    int64_t n, c;
    if (rest < ((int64_t)1 << 32) && P[P_CHANNELS] < ((int64_t)1 << 32)) {
        n = (uint32_t)rest / (uint32_t)P[P_CHANNELS];
        c = (uint32_t)rest % (uint32_t)P[P_CHANNELS];
    } else {
        n = rest / P[P_CHANNELS];
        c = rest % P[P_CHANNELS];
    }
    int64_t first = n * P[P_STRIDE_N] + c * P[P_STRIDE_C], last = first;
    for (int d = 0; d < 3; d++) {
        int64_t j = coord[d] + P[P_SHIFT + d]; /* drops [j - b + 1, j] cut to [0, L) */
        int64_t lo = j - P[P_BLOCKS + d] + 1, hi = j;
        if (lo < 0) lo = 0;
        if (hi > P[P_SIZES + d] - 1) hi = P[P_SIZES + d] - 1;
        b->extent[d] = (int32_t)(hi - lo + 1);
        first += lo * P[P_STRIDES + d];
        last += hi * P[P_STRIDES + d];
    }
    b->first = first;
    b->last = last;
}

/* A row of a block (``bytes``, a multiple of 4, contiguous) in 16-byte stores, the last one
   overlapping: a block's rows are short (its side), and a memset call per row, or a store per
   element, cost more than the zeroing itself. Fixed-size memcpy compiles to one store. */
static inline void zero_row(char *p, size_t bytes) {
    static const char zeros[16] = {0};
    if (bytes >= 16) {
        size_t off = 0;
        for (; off + 16 <= bytes; off += 16) memcpy(p + off, zeros, 16);
        if (off < bytes) memcpy(p + bytes - 16, zeros, 16);
    } else if (bytes >= 8) {
        memcpy(p, zeros, 8);
        memcpy(p + bytes - 8, zeros, 8);
    } else {
        memcpy(p, zeros, 4);
    }
}

static void zero_block(char *dst, int64_t esize, const block_t *b, const int64_t *P) {
    const int64_t s0 = P[P_STRIDES] * esize, s1 = P[P_STRIDES + 1] * esize, s2 = P[P_STRIDES + 2];
    const size_t row = (size_t)b->extent[2] * (size_t)esize;
    for (int32_t i = 0; i < b->extent[0]; i++) {
        char *plane = dst + b->first * esize + i * s0;
        for (int32_t k = 0; k < b->extent[1]; k++) {
            char *at = plane + k * s1;
            if (s2 == 1) {
                zero_row(at, row);
            } else {
                for (int32_t m = 0; m < b->extent[2]; m++) memset(at + m * s2 * esize, 0, (size_t)esize);
            }
        }
    }
}

static void multiply(char *dst, const char *src, int dtype, double factor, int64_t lo, int64_t hi) {
    if (dtype == 0) {
        float f = (float)factor, *d = (float *)dst + lo;
        const float *s = (const float *)src + lo;
        for (int64_t i = 0; i < hi - lo; i++) d[i] = s[i] * f;
    } else if (dtype == 1) {
        double *d = (double *)dst + lo;
        const double *s = (const double *)src + lo;
        for (int64_t i = 0; i < hi - lo; i++) d[i] = s[i] * factor;
    }
}

/* Returns 0, or -1 when out of memory. */
#define SEED(i) (P[P_SEED_BYTES] == 4 ? (int64_t)((const int32_t *)seeds)[i] : ((const int64_t *)seeds)[i])

static int run(char *dst, const char *src, int dtype, int scale, double factor, const void *seeds,
               const int64_t *P) {
    const int64_t esize = dtype == 0 ? 4 : 8, chunk = CHUNK_BYTES / esize;
    const int64_t lo = P[P_LO], hi = P[P_HI], nseeds = P[P_NSEEDS];
    if (P[P_PASS] == 1) {
        for (int64_t i = 0; i < nseeds; i++) {
            block_t b;
            locate(SEED(i), P, &b);
            if (b.last >= lo && b.last < hi && b.first < lo) zero_block(dst, esize, &b, P);
        }
        return 0;
    }
    const int64_t nchunks = (hi - lo + chunk - 1) / chunk;
    block_t *blocks = malloc(sizeof(block_t) * (size_t)(nseeds ? nseeds : 1));
    int64_t *start = NULL, *order = NULL;
    if (!blocks) return -1;
    /* the blocks that lie wholly in [lo, hi), in seed order; in the usual layouts (maps one after
       another, each row-major) their last elements ascend and need no sorting */
    int64_t m = 0;
    int sorted = 1;
    for (int64_t i = 0; i < nseeds; i++) {
        locate(SEED(i), P, &blocks[m]);
        if (blocks[m].first >= lo && blocks[m].last < hi) {
            if (m && blocks[m].last < blocks[m - 1].last) sorted = 0;
            m++;
        }
    }
    if (!sorted) { /* bucket them by the chunk of their last element (a counting sort) */
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
        if (scale) {
            multiply(dst, src, dtype, factor, a, e);
        } else if (src != dst) {
            memcpy(dst + a * esize, src + a * esize, (size_t)((e - a) * esize));
        }
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

/* fused(dst, src, seeds, params, dtype, scale, factor): addresses as ints; src may equal dst;
   src 0 means dst already holds the values (only the zeros are written). */
static PyObject *fused(PyObject *self, PyObject *args) {
    unsigned long long dst, src, seeds, params;
    int dtype, scale;
    double factor;
    if (!PyArg_ParseTuple(args, "KKKKiid", &dst, &src, &seeds, &params, &dtype, &scale, &factor)) return NULL;
    if (dtype != 0 && dtype != 1) {
        PyErr_SetString(PyExc_ValueError, "fused: dtype code must be 0 (float32) or 1 (float64)");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run((char *)(uintptr_t)dst, src ? (const char *)(uintptr_t)src : (const char *)(uintptr_t)dst,
             dtype, src ? scale : 0, factor, (const void *)(uintptr_t)seeds,
             (const int64_t *)(uintptr_t)params);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* gaps(logs, n, log_q, base, numel, out, out_bytes) -> (count, end): the tail of
   sampling.gap_positions.

   ``logs`` holds ``log1p(-u)`` for ``n`` uniforms (float64, computed by torch); seed i is at
   ``(cumsum_i(floor(logs / log_q) + 1) - 1) + base``, the same float64 operations in the same
   order as the torch ops (so the same bits). Writes the positions below ``numel`` to ``out``
   (int64, or int32 with ``out_bytes`` 4; they are a prefix, ascending) and returns their count
   and the last position. */
static PyObject *gaps(PyObject *self, PyObject *args) {
    unsigned long long logs_addr, out_addr;
    long long n;
    double log_q, base, numel;
    int out_bytes;
    if (!PyArg_ParseTuple(args, "KLdddKi", &logs_addr, &n, &log_q, &base, &numel, &out_addr, &out_bytes))
        return NULL;
    if (out_bytes == 4 && numel > 2147483648.0) {
        PyErr_SetString(PyExc_ValueError, "gaps: int32 output needs at most 2**31 places");
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

PyMODINIT_FUNC PyInit__cfused(void) { return PyModule_Create(&module); }
