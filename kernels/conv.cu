// Convolution as im2col + GEMM in the network's channel-major layout (asyncsgd/backends/numpy_ops.py):
//   x   (C, N, H, W)                 activations, C order
//   col (C, KH, KW, N, OH, OW)       = a (C*KH*KW, N*OH*OW) matrix: row (c*KH + kh)*KW + kw, column (n*OH + oh)*OW + ow
//   col[c, kh, kw, n, oh, ow] = x[c, n, oh*SH - PH + kh, ow*SW - PW + kw], zero outside x (zero padding)
// so the forward pass is one GEMM  W(F, C*KH*KW) @ col  and col2im, the adjoint of im2col, turns the column gradient
// W^T @ dy back into dx.  OH = (H + 2*PH - KH) / SH + 1, OW likewise.
// Every kernel exists as <name>_f32 and <name>_f64 (float64 serves checks); loops are grid-stride over 64-bit
// indices, so any grid size is correct.  Compiled by NVRTC through cupy.RawModule: no #include.

template <typename T>
__device__ void im2col_impl(const T* __restrict__ x, T* __restrict__ col,
                            int C, int N, int H, int W, int KH, int KW,
                            int SH, int SW, int PH, int PW, int OH, int OW)
{
    // One thread per element of col, in col's memory order: coalesced writes, and reads along image rows.
    const long long total = (long long)C * KH * KW * N * OH * OW;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long r = i;
        const int ow = (int)(r % OW); r /= OW;
        const int oh = (int)(r % OH); r /= OH;
        const int n = (int)(r % N); r /= N;
        const int kw = (int)(r % KW); r /= KW;
        const int kh = (int)(r % KH);
        const long long c = r / KH;
        const int h = oh * SH - PH + kh;
        const int w = ow * SW - PW + kw;
        col[i] = (h >= 0 && h < H && w >= 0 && w < W) ? x[((c * N + n) * H + h) * W + w] : T(0);
    }
}

template <typename T>
__device__ void col2im_impl(const T* __restrict__ col, T* __restrict__ dx,
                            int C, int N, int H, int W, int KH, int KW,
                            int SH, int SW, int PH, int PW, int OH, int OW, int accumulate)
{
    // One thread per element of dx gathers every column entry that read it: no atomics, every element of dx written
    // exactly once, and the sum runs in (kh, kw) order starting from dx (accumulate) or 0, the order of
    // NumpyOps.col2im_add, so results agree with the numpy reference bit for bit.
    const long long total = (long long)C * N * H * W;
    const long long col_plane = (long long)N * OH * OW;    // one row of the column matrix
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        long long r = i;
        const int w = (int)(r % W); r /= W;
        const int h = (int)(r % H); r /= H;
        const int n = (int)(r % N);
        const long long c = r / N;
        T sum = accumulate ? dx[i] : T(0);
        for (int kh = 0; kh < KH; ++kh) {
            const int hh = h + PH - kh;             // = oh * SH for the output row that read (h, w) through kh
            if (hh < 0 || hh % SH != 0) continue;
            const int oh = hh / SH;
            if (oh >= OH) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int ww = w + PW - kw;
                if (ww < 0 || ww % SW != 0) continue;
                const int ow = ww / SW;
                if (ow >= OW) continue;
                const long long row = (c * KH + kh) * KW + kw;
                sum += col[row * col_plane + ((long long)n * OH + oh) * OW + ow];
            }
        }
        dx[i] = sum;
    }
}

extern "C" __global__ void im2col_f32(const float* x, float* col, int C, int N, int H, int W, int KH, int KW,
                                      int SH, int SW, int PH, int PW, int OH, int OW)
{
    im2col_impl<float>(x, col, C, N, H, W, KH, KW, SH, SW, PH, PW, OH, OW);
}

extern "C" __global__ void im2col_f64(const double* x, double* col, int C, int N, int H, int W, int KH, int KW,
                                      int SH, int SW, int PH, int PW, int OH, int OW)
{
    im2col_impl<double>(x, col, C, N, H, W, KH, KW, SH, SW, PH, PW, OH, OW);
}

extern "C" __global__ void col2im_f32(const float* col, float* dx, int C, int N, int H, int W, int KH, int KW,
                                      int SH, int SW, int PH, int PW, int OH, int OW, int accumulate)
{
    col2im_impl<float>(col, dx, C, N, H, W, KH, KW, SH, SW, PH, PW, OH, OW, accumulate);
}

extern "C" __global__ void col2im_f64(const double* col, double* dx, int C, int N, int H, int W, int KH, int KW,
                                      int SH, int SW, int PH, int PW, int OH, int OW, int accumulate)
{
    col2im_impl<double>(col, dx, C, N, H, W, KH, KW, SH, SW, PH, PW, OH, OW, accumulate);
}
