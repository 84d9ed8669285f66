/* Optional CPU kernels for bfloat16 and float32 gradients (see _native.py).
 *
 * NumPy has no bfloat16 of its own (ml_dtypes' casts hold the GIL), torch's CPU
 * kernels either round a bfloat16 norm to bfloat16 or cast a float32 copy first, and
 * a BLAS dot per chunk of float32 is slower than one read of the memory. These loops
 * read each element once:
 *
 *   sumsq(x)        the sum of squares: float32 lanes per row of 1024 elements, each
 *                   lane adding blocks of 8 squares (a row's sum is then within
 *                   16 * 2^-24 of exact, whatever the values), the rows added in
 *                   double; a row whose float32 sum could have overflowed or lost its
 *                   tiny squares is summed again in double, where no square of a
 *                   finite float32 value overflows or underflows. So any finite input
 *                   gives an accurate sum, and inf and NaN propagate.
 *   scale(x, y, s)  y = x * s in float32, rounded once to the leaf's dtype (to nearest
 *                   even for bfloat16, NaN kept NaN): bit for bit what the reference
 *                   (NumPy, ml_dtypes) and torch's CPU kernels give.
 *
 * x and y are C-contiguous buffers: format 'H' holds bfloat16 bits (a uint16 view:
 * ml_dtypes' arrays export no buffer of their own), format 'f' float32. The _table
 * variants take a table of addresses and counts and the item size instead (torch
 * tensors' data_ptr(): thousands of tensors in one call, no view of each). The GIL is
 * released while they run, so the pool's threads run them side by side.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define GRADCLIP_X86 1
#include <immintrin.h>
#endif

#if defined(GRADCLIP_X86) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#define ROW 1024
/* Squares a lane adds before its sum joins the row's: a square then passes through at
 * most 7 + 3 + 5 float32 additions (the block, the row's lane, the pairwise end), so a
 * row's sum is within 16 * 2^-24 of exact whatever the values. A lane that starts
 * with a large square and adds small ones after it loses each small one entirely: 31
 * of them, when a lane added its 32 squares in one sum, were 2e-6 of the row. */
#define BLOCK 8

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? quiet_nan : rounded);
}

#define LOAD_BF16(x, i) bf16_to_f32(((const uint16_t *)(x))[i])
#define LOAD_F32(x, i) (((const float *)(x))[i])

/* A row's float32 sum inside these bounds lost nothing that matters: no square
 * overflowed (each is below the sum) and squares below 2^-149 are under 2^-139 of it. */
#define SAFE_LO 0x1p-100f
#define SAFE_HI 0x1p120f

/* ---- the sum of squares, for each element type ------------------------------- */

/* 32 float32 lanes over one row (vectorised: no reassociation needed), each adding
 * blocks of BLOCK squares, then added pairwise: a chain of 5 adds, not 31, at the end
 * of each row. The same operations in every version; with FMA (x86 CPUs that have AVX2
 * have it) each square is added unrounded: the float32 sums may differ in the last
 * bits. Two versions, picked at run time: AVX2 with FMA, and the baseline (no AVX2
 * clone of it: every AVX2 CPU takes the first). */
#define ROW_SUMSQ(LOAD)                                                                    \
    {                                                                                      \
        float acc[32], part[32];                                                           \
        for (int k = 0; k < 32; k++) acc[k] = 0.0f;                                        \
        for (int j = 0; j < ROW; j += 32 * BLOCK) {                                        \
            for (int k = 0; k < 32; k++) {                                                 \
                float v = LOAD(x, j + k);                                                  \
                part[k] = v * v;                                                           \
            }                                                                              \
            for (int b = j + 32; b < j + 32 * BLOCK; b += 32)                              \
                for (int k = 0; k < 32; k++) {                                             \
                    float v = LOAD(x, b + k);                                              \
                    part[k] += v * v;                                                      \
                }                                                                          \
            for (int k = 0; k < 32; k++) acc[k] += part[k];                                \
        }                                                                                  \
        for (int w = 16; w > 0; w /= 2)                                                    \
            for (int k = 0; k < w; k++) acc[k] += acc[k + w];                              \
        return acc[0];                                                                     \
    }

#if defined(GRADCLIP_X86)
#define WITH_FMA(DEF) __attribute__((target("avx2,fma"))) DEF
#define PICK(ROWF) (cpu_has_fma() ? ROWF##_fma : ROWF)
static int cpu_has_fma(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
#define WITH_FMA(DEF)
#define PICK(ROWF) ROWF
#endif

#define DEFINE_SUMSQ(NAME, LOAD, SIZE)                                                     \
    /* 8 double lanes (vectorised too), for the rows float32 cannot hold and the tail */ \
    CLONES static double NAME##_f64(const char *x, int64_t n) {                           \
        double acc[8] = {0};                                                               \
        int64_t i = 0;                                                                     \
        for (; i + 8 <= n; i += 8)                                                         \
            for (int k = 0; k < 8; k++) {                                                  \
                double v = LOAD(x, i + k);                                                 \
                acc[k] += v * v;                                                           \
            }                                                                              \
        double s = 0.0;                                                                    \
        for (; i < n; i++) {                                                               \
            double v = LOAD(x, i);                                                         \
            s += v * v;                                                                    \
        }                                                                                  \
        for (int k = 0; k < 8; k++) s += acc[k];                                           \
        return s;                                                                          \
    }                                                                                      \
    static float NAME##_row(const char *x) ROW_SUMSQ(LOAD)                                \
    WITH_FMA(static float NAME##_row_fma(const char *x) ROW_SUMSQ(LOAD))                   \
    static double NAME(const char *x, int64_t n) {                                         \
        float (*row)(const char *) = PICK(NAME##_row);                                     \
        double total = 0.0;                                                                \
        int64_t i = 0;                                                                     \
        for (; i + ROW <= n; i += ROW) {                                                   \
            float s = row(x + i * SIZE);                                                   \
            total += (s >= SAFE_LO && s <= SAFE_HI) ? (double)s                            \
                                                    : NAME##_f64(x + i * SIZE, ROW);       \
        }                                                                                  \
        return total + NAME##_f64(x + i * SIZE, n - i);                                    \
    }

DEFINE_SUMSQ(sumsq_bf16, LOAD_BF16, 2)
DEFINE_SUMSQ(sumsq_f32, LOAD_F32, 4)

static double sumsq(const char *x, int64_t n, Py_ssize_t itemsize) {
    return itemsize == 2 ? sumsq_bf16(x, n) : sumsq_f32(x, n);
}

/* ---- the scaling --------------------------------------------------------------- */

static void scale_bf16_plain(const uint16_t *x, uint16_t *y, int64_t n, float s) {
    for (int64_t i = 0; i < n; i++) y[i] = f32_to_bf16(bf16_to_f32(x[i]) * s);
}

#if defined(GRADCLIP_X86)
/* 16 elements a step: widen by interleaving with zeros, multiply, round to nearest
 * even with integer adds, NaN lanes replaced by their quieted top half, pack back
 * (the interleave and the pack undo each other's order). */
__attribute__((target("avx2"))) static void scale_bf16_avx2(const uint16_t *x, uint16_t *y,
                                                            int64_t n, float s) {
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i zero = _mm256_setzero_si256(), one = _mm256_set1_epi32(1);
    const __m256i bias = _mm256_set1_epi32(0x7fff), quiet = _mm256_set1_epi32(0x40);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(x + i));
        __m256 p[2] = {_mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), vs),
                       _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)), vs)};
        __m256i r[2];
        for (int k = 0; k < 2; k++) {
            __m256i u = _mm256_castps_si256(p[k]);
            __m256i top = _mm256_srli_epi32(u, 16);
            __m256i rounded = _mm256_srli_epi32(
                _mm256_add_epi32(_mm256_add_epi32(u, bias), _mm256_and_si256(top, one)), 16);
            __m256 nan = _mm256_cmp_ps(p[k], p[k], _CMP_UNORD_Q);
            r[k] = _mm256_castps_si256(_mm256_blendv_ps(
                _mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_or_si256(top, quiet)),
                nan));
        }
        _mm256_storeu_si256((__m256i *)(y + i), _mm256_packus_epi32(r[0], r[1]));
    }
    scale_bf16_plain(x + i, y + i, n - i, s);
}
#endif

static void scale_bf16(const uint16_t *x, uint16_t *y, int64_t n, float s) {
#if defined(GRADCLIP_X86)
    if (__builtin_cpu_supports("avx2")) {
        scale_bf16_avx2(x, y, n, s);
        return;
    }
#endif
    scale_bf16_plain(x, y, n, s);
}

/* in blocks of 32: four independent vector multiplies a step keep the core busy */
CLONES static void scale_f32(const float *x, float *y, int64_t n, float s) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int k = 0; k < 32; k++) y[i + k] = x[i + k] * s;
    for (; i < n; i++) y[i] = x[i] * s;
}

static void scale(const char *x, char *y, int64_t n, Py_ssize_t itemsize, float s) {
    if (itemsize == 2)
        scale_bf16((const uint16_t *)x, (uint16_t *)y, n, s);
    else
        scale_f32((const float *)x, (float *)y, n, s);
}

/* ---- the module ---------------------------------------------------------------- */

/* A C-contiguous buffer of bfloat16 bits ('H') or float32 ('f'). */
static int get_array(PyObject *obj, Py_buffer *view, int writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    const char *f = view->format ? view->format : "B";
    if (f[0] == '<' || f[0] == '=' || f[0] == '@') f++;
    if (!((f[0] == 'H' && view->itemsize == 2) || (f[0] == 'f' && view->itemsize == 4)) ||
        f[1] != '\0') {
        PyErr_Format(PyExc_TypeError,
                     "expected bfloat16 bits (uint16) or float32, got format '%s'",
                     view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *py_sumsq(PyObject *self, PyObject *arg) {
    Py_buffer x;
    if (get_array(arg, &x, 0) < 0) return NULL;
    double total;
    Py_BEGIN_ALLOW_THREADS total = sumsq((const char *)x.buf, x.len / x.itemsize, x.itemsize);
    Py_END_ALLOW_THREADS PyBuffer_Release(&x);
    return PyFloat_FromDouble(total);
}

static PyObject *py_scale(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "scale(x, y, s) takes 3 arguments");
        return NULL;
    }
    double s = PyFloat_AsDouble(args[2]);
    if (s == -1.0 && PyErr_Occurred()) return NULL;
    Py_buffer x, y;
    if (get_array(args[0], &x, 0) < 0) return NULL;
    if (get_array(args[1], &y, 1) < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    if (x.len != y.len || x.itemsize != y.itemsize) {
        PyBuffer_Release(&x);
        PyBuffer_Release(&y);
        PyErr_SetString(PyExc_ValueError, "scale: x and y differ in size or dtype");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS scale((const char *)x.buf, (char *)y.buf, x.len / x.itemsize,
                                 x.itemsize, (float)s);
    Py_END_ALLOW_THREADS PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    Py_RETURN_NONE;
}

/* A table of (address, count) pairs: two int64 buffers of one length, and an item size
 * (2: bfloat16, 4: float32): the first three of the nargs arguments, of want. */
static int get_table(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
                     const char *signature, Py_buffer *ptrs, Py_buffer *counts,
                     Py_ssize_t *itemsize) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s: %zd arguments", signature, want);
        return -1;
    }
    *itemsize = PyLong_AsSsize_t(args[2]);
    if (*itemsize == -1 && PyErr_Occurred()) return -1;
    if (*itemsize != 2 && *itemsize != 4) {
        PyErr_SetString(PyExc_ValueError, "itemsize: 2 (bfloat16) or 4 (float32)");
        return -1;
    }
    if (PyObject_GetBuffer(args[0], ptrs, PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (PyObject_GetBuffer(args[1], counts, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(ptrs);
        return -1;
    }
    if (ptrs->itemsize != 8 || counts->itemsize != 8 || ptrs->len != counts->len) {
        PyErr_SetString(PyExc_TypeError, "expected two int64 buffers of one length");
        PyBuffer_Release(ptrs);
        PyBuffer_Release(counts);
        return -1;
    }
    return 0;
}

static PyObject *py_sumsq_table(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer ptrs, counts;
    Py_ssize_t size;
    if (get_table(args, nargs, 3, "sumsq_table(ptrs, counts, itemsize)", &ptrs, &counts,
                  &size) < 0)
        return NULL;
    const int64_t *p = (const int64_t *)ptrs.buf, *c = (const int64_t *)counts.buf;
    Py_ssize_t n = ptrs.len / 8;
    double total = 0.0;
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < n; i++) total +=
        sumsq((const char *)(intptr_t)p[i], c[i], size);
    Py_END_ALLOW_THREADS PyBuffer_Release(&ptrs);
    PyBuffer_Release(&counts);
    return PyFloat_FromDouble(total);
}

static PyObject *py_scale_table(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer ptrs, counts;
    Py_ssize_t size;
    if (get_table(args, nargs, 4, "scale_table(ptrs, counts, itemsize, s)", &ptrs, &counts,
                  &size) < 0)
        return NULL;
    double s = PyFloat_AsDouble(args[3]);
    if (s == -1.0 && PyErr_Occurred()) {
        PyBuffer_Release(&ptrs);
        PyBuffer_Release(&counts);
        return NULL;
    }
    const int64_t *p = (const int64_t *)ptrs.buf, *c = (const int64_t *)counts.buf;
    Py_ssize_t n = ptrs.len / 8;
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < n; i++) {
        char *x = (char *)(intptr_t)p[i];
        scale(x, x, c[i], size, (float)s);
    }
    Py_END_ALLOW_THREADS PyBuffer_Release(&ptrs);
    PyBuffer_Release(&counts);
    Py_RETURN_NONE;
}

/* The data address of a C-contiguous buffer (taken and released: the caller keeps the
 * array alive while it uses it). */
static PyObject *py_address(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    PyObject *address = PyLong_FromVoidPtr(view.buf);
    PyBuffer_Release(&view);
    return address;
}

static PyMethodDef kernels_methods[] = {
    {"sumsq", (PyCFunction)py_sumsq, METH_O,
     "sumsq(x) -> float: the sum of squares of x (bfloat16 bits or float32)."},
    {"scale", (PyCFunction)(void (*)(void))py_scale, METH_FASTCALL,
     "scale(x, y, s): y = x * s in float32, rounded once to x's dtype."},
    {"sumsq_table", (PyCFunction)(void (*)(void))py_sumsq_table, METH_FASTCALL,
     "sumsq_table(ptrs, counts, itemsize) -> float: sumsq of the memory at each address "
     "(int64 buffers), count elements each."},
    {"scale_table", (PyCFunction)(void (*)(void))py_scale_table, METH_FASTCALL,
     "scale_table(ptrs, counts, itemsize, s): scale in place at each address."},
    {"address", (PyCFunction)py_address, METH_O,
     "address(buffer) -> int: the data address of a C-contiguous buffer."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "C kernels for bfloat16 and float32 gradients (see gradclip._native).", -1,
    kernels_methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
