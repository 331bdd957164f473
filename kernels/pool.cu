// Max and average pooling without padding in the network's channel-major layout (asyncsgd/backends/numpy_ops.py):
// x (C, N, H, W), y (C, N, OH, OW) with OH = (H - KH) / SH + 1 (floor), OW = (W - KW) / SW + 1; each (c, n) is one
// independent (H, W) plane.  Windows are KH x KW (rectangular, e.g. 2x1 pools over frequency only).
// Max pooling records arg (C, N, OH, OW) uint8 = kh*KW + kw, the window offset of the maximum, exactly as
// NumpyOps.maxpool_forward does (so caches are interchangeable): the first maximum in row-major window order wins;
// a NaN makes y NaN but, as numpy.greater is false for NaN, does not move arg.  Average pooling sums each window in
// row-major order and multiplies by scale = 1/(KH*KW) (rounded to T by the caller), as NumpyOps.avgpool_forward.
// Kernels exist as _f32 and _f64; loops are grid-stride over 64-bit indices.

template <typename T>
__device__ void maxpool_forward_impl(const T* __restrict__ x, T* __restrict__ y, unsigned char* __restrict__ arg,
                                     int C, int N, int H, int W, int KH, int KW, int SH, int SW, int OH, int OW)
{
    const long long total = (long long)C * N * OH * OW;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long r = i;
        const int ow = (int)(r % OW); r /= OW;
        const int oh = (int)(r % OH);
        const long long plane = r / OH;                       // c * N + n
        const T* window = x + (plane * H + (long long)oh * SH) * W + (long long)ow * SW;
        T best = window[0];
        int best_t = 0;
        for (int kh = 0; kh < KH; ++kh) {
            for (int kw = 0; kw < KW; ++kw) {
                const T v = window[(long long)kh * W + kw];
                if (v > best) {
                    best = v;
                    best_t = kh * KW + kw;
                } else if (v != v) {                          // numpy.maximum propagates NaN
                    best = v;
                }
            }
        }
        y[i] = best;
        arg[i] = (unsigned char)best_t;
    }
}

// The windows (oh, ow) that cover input element (h, w): oh in [oh_lo, oh_hi], ow in [ow_lo, ow_hi] (maybe empty).
__device__ __forceinline__ void covering_windows(int h, int w, int KH, int KW, int SH, int SW, int OH, int OW,
                                                 int* oh_lo, int* oh_hi, int* ow_lo, int* ow_hi)
{
    // Window oh covers rows oh*SH .. oh*SH + KH - 1.
    *oh_lo = h < KH ? 0 : (h - KH) / SH + 1;
    *oh_hi = h / SH < OH - 1 ? h / SH : OH - 1;
    *ow_lo = w < KW ? 0 : (w - KW) / SW + 1;
    *ow_hi = w / SW < OW - 1 ? w / SW : OW - 1;
}

template <typename T>
__device__ void maxpool_backward_impl(const T* __restrict__ dy, const unsigned char* __restrict__ arg,
                                      T* __restrict__ dx, int C, int N, int H, int W, int KH, int KW, int SH, int SW,
                                      int OH, int OW)
{
    // One thread per input element gathers dy of every window whose maximum it was (windows overlap when a stride is
    // below its window): no atomics, every element of dx written.  Windows are visited in increasing window offset t
    // (oh and ow descending), the order in which NumpyOps.maxpool_backward adds them.
    const long long total = (long long)C * N * H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long r = i;
        const int w = (int)(r % W); r /= W;
        const int h = (int)(r % H);
        const long long plane = r / H;
        int oh_lo, oh_hi, ow_lo, ow_hi;
        covering_windows(h, w, KH, KW, SH, SW, OH, OW, &oh_lo, &oh_hi, &ow_lo, &ow_hi);
        T sum = T(0);
        for (int oh = oh_hi; oh >= oh_lo; --oh) {
            for (int ow = ow_hi; ow >= ow_lo; --ow) {
                const long long o = (plane * OH + oh) * OW + ow;
                if ((int)arg[o] == (h - oh * SH) * KW + (w - ow * SW)) sum += dy[o];
            }
        }
        dx[i] = sum;
    }
}

template <typename T>
__device__ void avgpool_forward_impl(const T* __restrict__ x, T* __restrict__ y, int C, int N, int H, int W,
                                     int KH, int KW, int SH, int SW, int OH, int OW, T scale)
{
    const long long total = (long long)C * N * OH * OW;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long r = i;
        const int ow = (int)(r % OW); r /= OW;
        const int oh = (int)(r % OH);
        const long long plane = r / OH;
        const T* window = x + (plane * H + (long long)oh * SH) * W + (long long)ow * SW;
        T sum = window[0];
        for (int t = 1; t < KH * KW; ++t) sum += window[(long long)(t / KW) * W + t % KW];
        y[i] = sum * scale;
    }
}

template <typename T>
__device__ void avgpool_backward_impl(const T* __restrict__ dy, T* __restrict__ dx, int C, int N, int H, int W,
                                      int KH, int KW, int SH, int SW, int OH, int OW, T scale)
{
    // One thread per input element sums dy * scale over the windows that cover it, in NumpyOps.avgpool_backward's
    // order (window offset ascending, i.e. oh and ow descending); elements in no window get 0.
    const long long total = (long long)C * N * H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long r = i;
        const int w = (int)(r % W); r /= W;
        const int h = (int)(r % H);
        const long long plane = r / H;
        int oh_lo, oh_hi, ow_lo, ow_hi;
        covering_windows(h, w, KH, KW, SH, SW, OH, OW, &oh_lo, &oh_hi, &ow_lo, &ow_hi);
        T sum = T(0);
        for (int oh = oh_hi; oh >= oh_lo; --oh) {
            for (int ow = ow_hi; ow >= ow_lo; --ow) {
                const T g = dy[(plane * OH + oh) * OW + ow] * scale;
                sum += g;
            }
        }
        dx[i] = sum;
    }
}

extern "C" __global__ void maxpool_forward_f32(const float* x, float* y, unsigned char* arg, int C, int N, int H,
                                               int W, int KH, int KW, int SH, int SW, int OH, int OW)
{
    maxpool_forward_impl<float>(x, y, arg, C, N, H, W, KH, KW, SH, SW, OH, OW);
}

extern "C" __global__ void maxpool_forward_f64(const double* x, double* y, unsigned char* arg, int C, int N, int H,
                                               int W, int KH, int KW, int SH, int SW, int OH, int OW)
{
    maxpool_forward_impl<double>(x, y, arg, C, N, H, W, KH, KW, SH, SW, OH, OW);
}

extern "C" __global__ void maxpool_backward_f32(const float* dy, const unsigned char* arg, float* dx, int C, int N,
                                                int H, int W, int KH, int KW, int SH, int SW, int OH, int OW)
{
    maxpool_backward_impl<float>(dy, arg, dx, C, N, H, W, KH, KW, SH, SW, OH, OW);
}

extern "C" __global__ void maxpool_backward_f64(const double* dy, const unsigned char* arg, double* dx, int C, int N,
                                                int H, int W, int KH, int KW, int SH, int SW, int OH, int OW)
{
    maxpool_backward_impl<double>(dy, arg, dx, C, N, H, W, KH, KW, SH, SW, OH, OW);
}

extern "C" __global__ void avgpool_forward_f32(const float* x, float* y, int C, int N, int H, int W,
                                               int KH, int KW, int SH, int SW, int OH, int OW, float scale)
{
    avgpool_forward_impl<float>(x, y, C, N, H, W, KH, KW, SH, SW, OH, OW, scale);
}

extern "C" __global__ void avgpool_forward_f64(const double* x, double* y, int C, int N, int H, int W,
                                               int KH, int KW, int SH, int SW, int OH, int OW, double scale)
{
    avgpool_forward_impl<double>(x, y, C, N, H, W, KH, KW, SH, SW, OH, OW, scale);
}

extern "C" __global__ void avgpool_backward_f32(const float* dy, float* dx, int C, int N, int H, int W,
                                                int KH, int KW, int SH, int SW, int OH, int OW, float scale)
{
    avgpool_backward_impl<float>(dy, dx, C, N, H, W, KH, KW, SH, SW, OH, OW, scale);
}

extern "C" __global__ void avgpool_backward_f64(const double* dy, double* dx, int C, int N, int H, int W,
                                                int KH, int KW, int SH, int SW, int OH, int OW, double scale)
{
    avgpool_backward_impl<double>(dy, dx, C, N, H, W, KH, KW, SH, SW, OH, OW, scale);
}
