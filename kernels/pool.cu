// Max pooling without padding in the network's channel-major layout (asyncsgd/model/ops.py): x (C, N, H, W),
// y (C, N, OH, OW) with OH = (H - K) / S + 1 (floor), OW likewise; each (c, n) is one independent (H, W) plane.
// The forward pass records arg (C, N, OH, OW) uint8 = kh*K + kw, the window offset of the maximum, exactly as
// NumpyOps.maxpool_forward does (so caches are interchangeable): the first maximum in row-major window order wins;
// a NaN makes y NaN but, as numpy.greater is false for NaN, does not move arg.  Kernels exist as _f32 and _f64.

template <typename T>
__device__ void maxpool_forward_impl(const T* __restrict__ x, T* __restrict__ y, unsigned char* __restrict__ arg,
                                     int C, int N, int H, int W, int K, int S, int OH, int OW)
{
    const long long total = (long long)C * N * OH * OW;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long r = i;
        const int ow = (int)(r % OW); r /= OW;
        const int oh = (int)(r % OH);
        const long long plane = r / OH;                       // c * N + n
        const T* window = x + (plane * H + (long long)oh * S) * W + (long long)ow * S;
        T best = window[0];
        int best_t = 0;
        for (int kh = 0; kh < K; ++kh) {
            for (int kw = 0; kw < K; ++kw) {
                const T v = window[(long long)kh * W + kw];
                if (v > best) {
                    best = v;
                    best_t = kh * K + kw;
                } else if (v != v) {                          // numpy.maximum propagates NaN
                    best = v;
                }
            }
        }
        y[i] = best;
        arg[i] = (unsigned char)best_t;
    }
}

template <typename T>
__device__ void maxpool_backward_impl(const T* __restrict__ dy, const unsigned char* __restrict__ arg,
                                      T* __restrict__ dx, int C, int N, int H, int W, int K, int S, int OH, int OW)
{
    // One thread per input element gathers dy of every window whose maximum it was (windows overlap when S < K):
    // no atomics, every element of dx written.  Windows are visited in increasing window offset t (oh and ow
    // descending), the order in which NumpyOps.maxpool_backward adds them.
    const long long total = (long long)C * N * H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long r = i;
        const int w = (int)(r % W); r /= W;
        const int h = (int)(r % H);
        const long long plane = r / H;
        // Window oh covers rows oh*S .. oh*S + K - 1.
        const int oh_lo = h < K ? 0 : (h - K) / S + 1;
        const int oh_hi = h / S < OH - 1 ? h / S : OH - 1;
        const int ow_lo = w < K ? 0 : (w - K) / S + 1;
        const int ow_hi = w / S < OW - 1 ? w / S : OW - 1;
        T sum = T(0);
        for (int oh = oh_hi; oh >= oh_lo; --oh) {
            for (int ow = ow_hi; ow >= ow_lo; --ow) {
                const long long o = (plane * OH + oh) * OW + ow;
                if ((int)arg[o] == (h - oh * S) * K + (w - ow * S)) sum += dy[o];
            }
        }
        dx[i] = sum;
    }
}

extern "C" __global__ void maxpool_forward_f32(const float* x, float* y, unsigned char* arg,
                                               int C, int N, int H, int W, int K, int S, int OH, int OW)
{
    maxpool_forward_impl<float>(x, y, arg, C, N, H, W, K, S, OH, OW);
}

extern "C" __global__ void maxpool_forward_f64(const double* x, double* y, unsigned char* arg,
                                               int C, int N, int H, int W, int K, int S, int OH, int OW)
{
    maxpool_forward_impl<double>(x, y, arg, C, N, H, W, K, S, OH, OW);
}

extern "C" __global__ void maxpool_backward_f32(const float* dy, const unsigned char* arg, float* dx,
                                                int C, int N, int H, int W, int K, int S, int OH, int OW)
{
    maxpool_backward_impl<float>(dy, arg, dx, C, N, H, W, K, S, OH, OW);
}

extern "C" __global__ void maxpool_backward_f64(const double* dy, const unsigned char* arg, double* dx,
                                                int C, int N, int H, int W, int K, int S, int OH, int OW)
{
    maxpool_backward_impl<double>(dy, arg, dx, C, N, H, W, K, S, OH, OW);
}
