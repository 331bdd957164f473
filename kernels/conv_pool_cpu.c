/* CPU kernels of the fused convolution + 2x2 max pooling (+ ReLU) of NumpyOps: the copies and masks around its
 * GEMMs, which numpy can only run as many whole-array passes.  Built by setup.py as the optional extension module
 * _asyncsgd_cpu; asyncsgd/backends/cpu_kernels.py checks the arguments and calls it, and NumpyOps falls back to its numpy
 * code where the module is missing.  Each function does what a block of NumpyOps._conv_pool_part(_backward) does,
 * with the same float operations in the same order, so results are bit-identical to the numpy path; what changes is
 * that one (channel, image) pair is finished at a time while its polyphase planes (a few KB) sit in L1, instead of
 * 36 passes over multi-megabyte arrays.
 *
 * Layouts (see NumpyOps.conv2d_maxpool_forward): padded input row U = i + ph lives in parity plane U % 2 at row U / 2
 * (likewise columns); a plane is hq x wq with hq carrying one slack row; the column matrix row (c, p, q) holds the
 * four output parities (a, b) of every image n as runs of run = hh * wq values.  Arrays are float32 (arg: uint8);
 * strides are in elements.  Every function releases the GIL: the batch parts of NumpyOps run them at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#define ABI_VERSION 2

typedef Py_ssize_t idx;

/* The element of padded position (u, v) in the four parity planes: plane (u % 2, v % 2), row u / 2, column v / 2. */
static inline idx plane_index(idx u, idx v, idx hq, idx wq)
{
    return ((u % 2) * 2 + v % 2) * hq * wq + (u / 2) * wq + v / 2;
}

/* Fill planes (4 * hq * wq floats) with the zero-padded parity planes of one (channel, image) slice of x. */
static void make_planes(const float *x, idx sh, idx sw, idx h, idx w, idx ph, idx pw, idx hq, idx wq, float *planes)
{
    memset(planes, 0, sizeof(float) * 4 * hq * wq);
    for (idx i = 0; i < h; i++) {
        idx u = i + ph;
        const float *row = x + i * sh;
        for (idx j = 0; j < w; j++)
            planes[plane_index(u, j + pw, hq, wq)] = row[j * sw];
    }
}

/* The workers take every size by value: the Python wrappers below parse into locals whose addresses escape to
 * PyArg_ParseTuple, and a loop bounded by such a local is not vectorised (gcc must assume the loop's stores may
 * change it). */

/* Rows (c, p, q) of col (row stride cols), each 4 * n * run values ordered (a, b, n, t), from x (c, n, h, w) with
 * strides sc, sn, sh, sw; planes is scratch of 4 * hq * wq floats. */
static void im2col_work(const float *x, float *col, idx sc, idx sn, idx sh, idx sw, idx c, idx n, idx h, idx w,
                        idx kh, idx kw, idx ph, idx pw, idx hq, idx wq, idx run, idx cols, float *planes)
{
    for (idx ci = 0; ci < c; ci++) {
        for (idx ni = 0; ni < n; ni++) {
            make_planes(x + ci * sc + ni * sn, sh, sw, h, w, ph, pw, hq, wq, planes);
            for (idx p = 0; p < kh; p++)
                for (idx q = 0; q < kw; q++) {
                    float *row = col + ((ci * kh + p) * kw + q) * cols;
                    for (idx a = 0; a < 2; a++)
                        for (idx b = 0; b < 2; b++) {
                            idx u = a + p, v = b + q;
                            const float *src = planes + plane_index(u, v, hq, wq);
                            memcpy(row + ((a * 2 + b) * n + ni) * run, src, sizeof(float) * run);
                        }
                }
        }
    }
}

/* numpy's scalar maximum, (a >= b || isnan(a)) ? a : b, in a form gcc compiles without branches (with || it
 * compiled to a branch per element, unpredictable on real data and 10x slower). */
static inline float np_max(float a, float b)
{
    return (a != a) ? a : ((a >= b) ? a : b);
}

/* out[f, j] (row stride so) = max over the four slabs y[f, 0..3, j], then max with `floor` (0 for the fused ReLU,
 * -inf for none); arg[f, j] (row stride sg) = the first slab holding the maximum, as NumpyOps._max4 computes them. */
static void max4_work(const float *y, float *out, unsigned char *arg, idx f, idx m, idx so, idx sg, float floor)
{
    for (idx fi = 0; fi < f; fi++) {
        const float *restrict y0 = y + fi * 4 * m, *restrict y1 = y0 + m, *restrict y2 = y1 + m, *restrict y3 = y2 + m;
        float *restrict o = out + fi * so;
        unsigned char *restrict g = arg + fi * sg;
        for (idx j = 0; j < m; j++) {
            float a0 = y0[j], a1 = y1[j], a2 = y2[j], a3 = y3[j];
            int g1 = a1 > a0, g3 = a3 > a2;
            float m01 = np_max(a0, a1), m23 = np_max(a2, a3);
            int g23 = m23 > m01;
            o[j] = np_max(np_max(m01, m23), floor);
            g[j] = (unsigned char)((g23 << 1) | (g23 & g3) | ((g23 ^ 1) & g1));   /* no ?: here: a branch */
        }
    }
}

/* v[j] *= (r[j] > 0): the fused ReLU's mask, as numpy multiplies by the bool array.  The test is taken from the
 * float's bits (positive and at most +inf, so not NaN): a float > may trap, and gcc will not vectorise it without
 * -fno-trapping-math (with which it stops vectorising max4_work). */
static void relu_mask_row(float *restrict v, const float *restrict r, idx wq)
{
    const int32_t *restrict ri = (const int32_t *)r;
    for (idx j = 0; j < wq; j++) {
        float keep = ((ri[j] > 0) & (ri[j] <= 0x7f800000)) ? 1.0f : 0.0f;
        v[j] = v[j] * keep;
    }
}

/* One row of wq pooled gradients v routed to the four slabs by the window maxima g: slab t gets v * (g == t), the
 * products numpy's masked multiplies make.  Restrict pointers and float compares in a function of their own: the
 * form gcc vectorises ((float)(g == t) inside the caller's loop nest compiled to branches). */
static void route_row(const float *restrict v, const unsigned char *restrict g, float *restrict d0,
                      float *restrict d1, float *restrict d2, float *restrict d3, idx wq)
{
    for (idx j = 0; j < wq; j++) {
        float vj = v[j], t = g[j];
        d0[j] = vj * (t == 0.0f ? 1.0f : 0.0f);
        d1[j] = vj * (t == 1.0f ? 1.0f : 0.0f);
        d2[j] = vj * (t == 2.0f ? 1.0f : 0.0f);
        d3[j] = vj * (t == 3.0f ? 1.0f : 0.0f);
    }
}

/* dconv (f, 4, m), m = n * hh * wq: the pooled gradient dy (f, n, hh, wh; strides sf, sn, si, sj) routed to each
 * window's first maximum arg (row stride sg), zero in the junk columns j >= wh, and with relu (the pooled output,
 * row stride sr; NULL for none) masked where the pooled value is <= 0: NumpyOps' dyq, ReLU mask and four masked
 * products.  v is scratch of wq floats. */
static void pool_grad_work(const float *dy, const float *relu, const unsigned char *arg, float *dconv, idx sf,
                           idx sn, idx si, idx sj, idx sr, idx sg, idx f, idx n, idx hh, idx wh, idx wq, float *v)
{
    idx m = n * hh * wq;
    for (idx fi = 0; fi < f; fi++) {
        float *d0 = dconv + fi * 4 * m;
        for (idx ni = 0; ni < n; ni++)
            for (idx i = 0; i < hh; i++) {
                const float *src = dy + fi * sf + ni * sn + i * si;
                idx base = (ni * hh + i) * wq;
                for (idx j = 0; j < wh; j++)
                    v[j] = src[j * sj];
                for (idx j = wh; j < wq; j++)           /* junk columns: zero gradient */
                    v[j] = 0.0f;
                if (relu)
                    relu_mask_row(v, relu + fi * sr + base, wq);
                route_row(v, arg + fi * sg + base, d0 + base, d0 + m + base, d0 + 2 * m + base, d0 + 3 * m + base, wq);
            }
    }
}

/* dx (c, n, h, w; strides sc, sn, sh, sw) = the adjoint of im2col_work applied to dcol: each (channel, image)
 * pair's 4 * kh * kw runs summed in (p, q, a, b) order into its planes (scratch), which are then unpadded. */
static void col2im_work(const float *dcol, float *dx, idx sc, idx sn, idx sh, idx sw, idx c, idx n, idx h, idx w,
                        idx kh, idx kw, idx ph, idx pw, idx hq, idx wq, idx run, idx cols, float *planes)
{
    for (idx ci = 0; ci < c; ci++) {
        for (idx ni = 0; ni < n; ni++) {
            memset(planes, 0, sizeof(float) * 4 * hq * wq);
            for (idx p = 0; p < kh; p++)
                for (idx q = 0; q < kw; q++) {
                    const float *row = dcol + ((ci * kh + p) * kw + q) * cols;
                    for (idx a = 0; a < 2; a++)
                        for (idx b = 0; b < 2; b++) {
                            idx u = a + p, v = b + q;
                            float *restrict dst = planes + plane_index(u, v, hq, wq);
                            const float *restrict src = row + ((a * 2 + b) * n + ni) * run;
                            for (idx t = 0; t < run; t++)
                                dst[t] += src[t];
                        }
                }
            float *out = dx + ci * sc + ni * sn;
            for (idx i = 0; i < h; i++)
                for (idx j = 0; j < w; j++)
                    out[i * sh + j * sw] = planes[plane_index(i + ph, j + pw, hq, wq)];
        }
    }
}

/* ---- Python entry points: pointers and sizes as integers (asyncsgd/backends/cpu_kernels.py checks them) ---- */

/* im2col and col2im share their arguments: (source, destination, the 4-d array's strides sc, sn, sh, sw, then
 * c, n, h, w, kh, kw, ph, pw, hq, wq, run, cols), and a scratch of four planes. */
typedef void (*planes_work)(const float *, float *, idx, idx, idx, idx, idx, idx, idx, idx, idx, idx, idx, idx, idx,
                            idx, idx, idx, float *);

static PyObject *run_planes_work(PyObject *args, planes_work work)
{
    idx psrc, pdst, sc, sn, sh, sw, c, n, h, w, kh, kw, ph, pw, hq, wq, run, cols;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnnnnnnnnn", &psrc, &pdst, &sc, &sn, &sh, &sw, &c, &n, &h, &w, &kh, &kw,
                          &ph, &pw, &hq, &wq, &run, &cols))
        return NULL;
    float *planes = PyMem_RawMalloc(sizeof(float) * 4 * hq * wq);
    if (!planes)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    work((const float *)psrc, (float *)pdst, sc, sn, sh, sw, c, n, h, w, kh, kw, ph, pw, hq, wq, run, cols, planes);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(planes);
    Py_RETURN_NONE;
}

/* im2col(x, col, strides of x, c, n, h, w, kh, kw, ph, pw, hq, wq, run, cols) */
static PyObject *im2col(PyObject *self, PyObject *args) { return run_planes_work(args, im2col_work); }

/* col2im(dcol, dx, strides of dx, c, n, h, w, kh, kw, ph, pw, hq, wq, run, cols) */
static PyObject *col2im(PyObject *self, PyObject *args) { return run_planes_work(args, col2im_work); }

/* max4(y, out, arg, f, m, out_row_stride, arg_row_stride, relu) */
static PyObject *max4(PyObject *self, PyObject *args)
{
    idx py, pout, parg, f, m, so, sg, relu;
    if (!PyArg_ParseTuple(args, "nnnnnnnn", &py, &pout, &parg, &f, &m, &so, &sg, &relu))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    max4_work((const float *)py, (float *)pout, (unsigned char *)parg, f, m, so, sg, relu ? 0.0f : -INFINITY);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* pool_grad(dy, relu_out or 0, arg, dconv, sf, sn, si, sj, relu_row_stride, arg_row_stride, f, n, hh, wh, wq) */
static PyObject *pool_grad(PyObject *self, PyObject *args)
{
    idx pdy, prelu, parg, pdc, sf, sn, si, sj, sr, sg, f, n, hh, wh, wq;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnnnnnn", &pdy, &prelu, &parg, &pdc, &sf, &sn, &si, &sj, &sr, &sg, &f, &n,
                          &hh, &wh, &wq))
        return NULL;
    float *v = PyMem_RawMalloc(sizeof(float) * wq);
    if (!v)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    pool_grad_work((const float *)pdy, (const float *)prelu, (const unsigned char *)parg, (float *)pdc, sf, sn, si,
                   sj, sr, sg, f, n, hh, wh, wq, v);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(v);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"im2col", im2col, METH_VARARGS, "polyphase im2col of the fused conv + 2x2 max pool"},
    {"max4", max4, METH_VARARGS, "2x2 max pool (and ReLU) over the four parity slabs, with the first argmax"},
    {"pool_grad", pool_grad, METH_VARARGS, "the pooled (and ReLU-masked) gradient routed to the four slabs"},
    {"col2im", col2im, METH_VARARGS, "adjoint of im2col: column gradient summed into the input gradient"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_asyncsgd_cpu",
                                    "CPU kernels of asyncsgd's fused conv + max pool (see kernels/conv_pool_cpu.c)",
                                    -1, methods};

PyMODINIT_FUNC PyInit__asyncsgd_cpu(void)
{
    PyObject *mod = PyModule_Create(&module);
    if (mod && PyModule_AddIntConstant(mod, "ABI_VERSION", ABI_VERSION) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
