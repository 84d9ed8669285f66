/* Optional CPU kernels for bfloat16 gradients (see gradclip/_native.py).
 *
 * NumPy has no bfloat16 of its own (ml_dtypes' casts run at ~2.4 elements per ns and
 * hold the GIL) and torch's CPU kernels either round a bfloat16 norm to bfloat16 or
 * cast a float32 copy first, so the 16-bit fast paths spent most of their time
 * widening values through small buffers. These two loops read each element once:
 *
 *   sumsq_bf16(x)        the sum of squares, float32 lanes per row of 1024 elements
 *                        (each square of a bfloat16 value is exact in float32), the
 *                        rows added in double; a row whose float32 sum could have
 *                        overflowed or lost its tiny squares is summed again in double,
 *                        where no square of a finite bfloat16 value overflows or
 *                        underflows. So any finite input gives an accurate sum, and
 *                        inf and NaN propagate.
 *   scale_bf16(x, y, s)  y = bfloat16(float32(x) * s): the float32 product rounded
 *                        once to nearest even, NaN kept NaN; bit for bit what the core
 *                        (ml_dtypes) and torch's CPU kernel give.
 *
 * x and y are C-contiguous buffers of 2-byte items holding bfloat16 bits (a uint16
 * view: ml_dtypes' arrays export no buffer of their own). The _table variants take a
 * table of addresses and counts instead (torch tensors' data_ptr(): thousands of
 * tensors in one call, no view of each). The GIL is released while they run, so the
 * NumPy path's threads run them side by side.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define GRADCLIP_X86 1
#include <immintrin.h>
#endif

#define ROW 1024

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

/* ---- the sum of squares ------------------------------------------------------ */

/* 8 double lanes (vectorised too), for the rows float32 cannot hold and the tail. */
#if defined(GRADCLIP_X86) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static double row_sumsq_f64(const uint16_t *x, int64_t n) {
    double acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) {
            double v = bf16_to_f32(x[i + k]);
            acc[k] += v * v;
        }
    double s = 0.0;
    for (; i < n; i++) {
        double v = bf16_to_f32(x[i]);
        s += v * v;
    }
    for (int k = 0; k < 8; k++) s += acc[k];
    return s;
}

/* 16 float32 lanes over one row (vectorised by the compiler: no reassociation). */
#if defined(GRADCLIP_X86) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static float row_sumsq_f32(const uint16_t *x) {
    float acc[16] = {0};
    for (int j = 0; j < ROW; j += 16)
        for (int k = 0; k < 16; k++) {
            float v = bf16_to_f32(x[j + k]);
            acc[k] += v * v;
        }
    float s = 0.0f;
    for (int k = 0; k < 16; k++) s += acc[k];
    return s;
}

/* A row's float32 sum inside these bounds lost nothing that matters: no square
 * overflowed (each is below the sum) and squares below 2^-149 are under 2^-139 of it. */
#define SAFE_LO 0x1p-100f
#define SAFE_HI 0x1p120f

static double sumsq_bf16(const uint16_t *x, int64_t n) {
    double total = 0.0;
    int64_t i = 0;
    for (; i + ROW <= n; i += ROW) {
        float s = row_sumsq_f32(x + i);
        total += (s >= SAFE_LO && s <= SAFE_HI) ? (double)s : row_sumsq_f64(x + i, ROW);
    }
    return total + row_sumsq_f64(x + i, n - i);
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

/* ---- the module ---------------------------------------------------------------- */

static int get_bf16(PyObject *obj, Py_buffer *view, int writable) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->itemsize != 2) {
        PyErr_SetString(PyExc_TypeError, "expected a buffer of 2-byte items (bfloat16 bits)");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *py_sumsq_bf16(PyObject *self, PyObject *arg) {
    Py_buffer x;
    if (get_bf16(arg, &x, 0) < 0) return NULL;
    double total;
    Py_BEGIN_ALLOW_THREADS total = sumsq_bf16((const uint16_t *)x.buf, x.len / 2);
    Py_END_ALLOW_THREADS PyBuffer_Release(&x);
    return PyFloat_FromDouble(total);
}

static PyObject *py_scale_bf16(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "scale_bf16(x, y, s) takes 3 arguments");
        return NULL;
    }
    double s = PyFloat_AsDouble(args[2]);
    if (s == -1.0 && PyErr_Occurred()) return NULL;
    Py_buffer x, y;
    if (get_bf16(args[0], &x, 0) < 0) return NULL;
    if (get_bf16(args[1], &y, 1) < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    if (x.len != y.len) {
        PyBuffer_Release(&x);
        PyBuffer_Release(&y);
        PyErr_SetString(PyExc_ValueError, "scale_bf16: x and y differ in size");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS scale_bf16((const uint16_t *)x.buf, (uint16_t *)y.buf, x.len / 2,
                                      (float)s);
    Py_END_ALLOW_THREADS PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    Py_RETURN_NONE;
}

/* A table of (address, count) pairs: two int64 buffers of one length. */
static int get_table(PyObject *const *args, Py_buffer *ptrs, Py_buffer *counts) {
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

static PyObject *py_sumsq_bf16_table(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer ptrs, counts;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "sumsq_bf16_table(ptrs, counts) takes 2 arguments");
        return NULL;
    }
    if (get_table(args, &ptrs, &counts) < 0) return NULL;
    const int64_t *p = (const int64_t *)ptrs.buf, *c = (const int64_t *)counts.buf;
    Py_ssize_t n = ptrs.len / 8;
    double total = 0.0;
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < n; i++) total +=
        sumsq_bf16((const uint16_t *)(intptr_t)p[i], c[i]);
    Py_END_ALLOW_THREADS PyBuffer_Release(&ptrs);
    PyBuffer_Release(&counts);
    return PyFloat_FromDouble(total);
}

static PyObject *py_scale_bf16_table(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer ptrs, counts;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "scale_bf16_table(ptrs, counts, s) takes 3 arguments");
        return NULL;
    }
    double s = PyFloat_AsDouble(args[2]);
    if (s == -1.0 && PyErr_Occurred()) return NULL;
    if (get_table(args, &ptrs, &counts) < 0) return NULL;
    const int64_t *p = (const int64_t *)ptrs.buf, *c = (const int64_t *)counts.buf;
    Py_ssize_t n = ptrs.len / 8;
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t *x = (uint16_t *)(intptr_t)p[i];
        scale_bf16(x, x, c[i], (float)s);
    }
    Py_END_ALLOW_THREADS PyBuffer_Release(&ptrs);
    PyBuffer_Release(&counts);
    Py_RETURN_NONE;
}

static PyMethodDef kernels_methods[] = {
    {"sumsq_bf16", (PyCFunction)py_sumsq_bf16, METH_O,
     "sumsq_bf16(x) -> float: the sum of squares of bfloat16 bits x."},
    {"scale_bf16", (PyCFunction)(void (*)(void))py_scale_bf16, METH_FASTCALL,
     "scale_bf16(x, y, s): y = bfloat16(float32(x) * s), rounded to nearest even."},
    {"sumsq_bf16_table", (PyCFunction)(void (*)(void))py_sumsq_bf16_table, METH_FASTCALL,
     "sumsq_bf16_table(ptrs, counts) -> float: the sum of squares of bfloat16 memory at "
     "each address (int64 buffers), count elements each."},
    {"scale_bf16_table", (PyCFunction)(void (*)(void))py_scale_bf16_table, METH_FASTCALL,
     "scale_bf16_table(ptrs, counts, s): scale_bf16 in place at each address."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT, "_kernels", "C kernels for bfloat16 gradients (see gradclip._native).",
    -1, kernels_methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
