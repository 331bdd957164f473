// Sparse gradient pushes: choose the largest-magnitude entries of v = accrued + residual without sorting v.
//
// Magnitudes are compared through "keys": the bits of |v| read as an unsigned integer.  For IEEE floats of one sign
// the integer order of the bits is the order of the values, so a threshold is an integer and bisection over it ends
// after at most 31 (float) or 63 (double) halvings on an exact value.  NaN keys lie above +inf: NaN counts as the
// largest magnitude, as numpy.argpartition of numpy.abs(v) has it.
//
//   count_at_least   histogram of keys against sorted probe thresholds (the host turns it into count(key >= probe))
//   band_counts      per block of COMPACT_TILE entries: how many keys >= t_hi ("above") and in [t_lo, t_hi) ("band")
//   compact          writes the chosen (index, value) pairs in index order and zeroes them in the residual: every
//                    "above" entry and the first `allowed` "band" entries (ties at the threshold, taken in index order)
//   scatter_add      dense[idx[i]] += values[i]
// Kernels exist as <name>_f32 and <name>_f64.  Launch band_counts and compact with COMPACT_BLOCK threads and
// ceil(n / COMPACT_TILE) blocks; the others are grid-stride loops.  Compiled by NVRTC: no #include.

#define MAX_PROBES 32
#define COMPACT_BLOCK 256
#define COMPACT_ITEMS 8
#define COMPACT_TILE (COMPACT_BLOCK * COMPACT_ITEMS)

__device__ __forceinline__ unsigned int magnitude_key(float x)
{
    return __float_as_uint(x) & 0x7fffffffu;
}

__device__ __forceinline__ unsigned long long magnitude_key(double x)
{
    return (unsigned long long)__double_as_longlong(x) & 0x7fffffffffffffffull;
}

template <typename T, typename K>
__device__ void count_at_least_impl(const T* __restrict__ v, long long n, const K* __restrict__ probes, int n_probes,
                                    unsigned long long* __restrict__ hist)
{
    // hist[j] counts keys in [probes[j], probes[j+1]) (the last bin is open above); probes ascend strictly, so
    // count(key >= probes[j]) is the sum of hist[j:].  Keys below probes[0] (nearly all, near the answer) cost no
    // atomic at all.
    __shared__ K s_probes[MAX_PROBES];
    __shared__ unsigned int s_hist[MAX_PROBES];
    for (int j = threadIdx.x; j < n_probes; j += blockDim.x) {
        s_probes[j] = probes[j];
        s_hist[j] = 0u;
    }
    __syncthreads();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const K key = magnitude_key(v[i]);
        if (key < s_probes[0]) continue;
        // Binary search; invariant: s_probes[lo] <= key, and hi == n_probes or key < s_probes[hi].
        int lo = 0, hi = n_probes;
        while (hi - lo > 1) {
            const int mid = (lo + hi) >> 1;
            if (s_probes[mid] <= key) lo = mid; else hi = mid;
        }
        atomicAdd(&s_hist[lo], 1u);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < n_probes; j += blockDim.x) {
        if (s_hist[j]) atomicAdd(&hist[j], (unsigned long long)s_hist[j]);
    }
}

// Exclusive prefix sums over the block of two per-thread counts (a, b); also returns the block totals.
// Every thread of the block must call it (warp shuffles and barriers); blockDim.x must be a multiple of 32, <= 1024.
__device__ void block_exclusive_scan2(int a, int b, int* a_before, int* b_before, int* a_total, int* b_total)
{
    __shared__ int s_warp[2][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    int ai = a, bi = b;                                      // inclusive scan inside the warp
    for (int d = 1; d < 32; d <<= 1) {
        const int x = __shfl_up_sync(0xffffffffu, ai, d);
        const int y = __shfl_up_sync(0xffffffffu, bi, d);
        if (lane >= d) { ai += x; bi += y; }
    }
    if (lane == 31) { s_warp[0][warp] = ai; s_warp[1][warp] = bi; }
    __syncthreads();
    if (warp == 0) {                                         // inclusive scan of the warp totals
        int x = lane < n_warps ? s_warp[0][lane] : 0;
        int y = lane < n_warps ? s_warp[1][lane] : 0;
        for (int d = 1; d < 32; d <<= 1) {
            const int xs = __shfl_up_sync(0xffffffffu, x, d);
            const int ys = __shfl_up_sync(0xffffffffu, y, d);
            if (lane >= d) { x += xs; y += ys; }
        }
        s_warp[0][lane] = x;
        s_warp[1][lane] = y;
    }
    __syncthreads();
    *a_before = (warp > 0 ? s_warp[0][warp - 1] : 0) + ai - a;
    *b_before = (warp > 0 ? s_warp[1][warp - 1] : 0) + bi - b;
    *a_total = s_warp[0][n_warps - 1];
    *b_total = s_warp[1][n_warps - 1];
    __syncthreads();                                         // s_warp is reused by the next call
}

template <typename T, typename K>
__device__ void band_counts_impl(const T* __restrict__ v, long long n, K t_lo, K t_hi,
                                 long long* __restrict__ above, long long* __restrict__ band)
{
    const long long base = (long long)blockIdx.x * COMPACT_TILE;
    int a = 0, b = 0;
    for (int j = 0; j < COMPACT_ITEMS; ++j) {
        const long long i = base + (long long)j * COMPACT_BLOCK + threadIdx.x;
        if (i < n) {
            const K key = magnitude_key(v[i]);
            a += key >= t_hi;
            b += key >= t_lo && key < t_hi;
        }
    }
    int a_before, b_before, a_total, b_total;
    block_exclusive_scan2(a, b, &a_before, &b_before, &a_total, &b_total);
    if (threadIdx.x == 0) {
        above[blockIdx.x] = a_total;
        band[blockIdx.x] = b_total;
    }
}

template <typename T, typename K>
__device__ void compact_impl(T* __restrict__ residual, long long n, K t_lo, K t_hi, long long allowed,
                             const long long* __restrict__ above_before, const long long* __restrict__ band_before,
                             long long* __restrict__ idx_out, T* __restrict__ val_out)
{
    // above_before/band_before: exclusive prefix sums over blocks of band_counts' results.  An entry's output slot is
    // (above entries before it) + min(band entries before it, allowed): the chosen entries in index order.
    long long a_run = above_before[blockIdx.x];
    long long b_run = band_before[blockIdx.x];
    const long long base = (long long)blockIdx.x * COMPACT_TILE;
    for (int j = 0; j < COMPACT_ITEMS; ++j) {                // COMPACT_BLOCK consecutive entries per round
        const long long i = base + (long long)j * COMPACT_BLOCK + threadIdx.x;
        T x = T(0);
        int is_above = 0, is_band = 0;
        if (i < n) {
            x = residual[i];
            const K key = magnitude_key(x);
            is_above = key >= t_hi;
            is_band = !is_above && key >= t_lo;
        }
        int a_before, b_before, a_total, b_total;
        block_exclusive_scan2(is_above, is_band, &a_before, &b_before, &a_total, &b_total);
        const long long a_prev = a_run + a_before;
        const long long b_prev = b_run + b_before;
        if (is_above || (is_band && b_prev < allowed)) {
            const long long slot = a_prev + (b_prev < allowed ? b_prev : allowed);
            idx_out[slot] = i;
            val_out[slot] = x;
            residual[i] = T(0);
        }
        a_run += a_total;
        b_run += b_total;
    }
}

template <typename T>
__device__ void scatter_add_impl(T* __restrict__ dense, long long n, const long long* __restrict__ idx,
                                 const T* __restrict__ values, long long m)
{
    // atomicAdd makes repeated indices sum (numpy.add.at); the wrapper has checked 0 <= idx < n, the test here only
    // keeps a bad index from writing outside dense.
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < m;
         i += (long long)blockDim.x * gridDim.x) {
        const long long j = idx[i];
        if (j >= 0 && j < n) atomicAdd(&dense[j], values[i]);
    }
}

extern "C" __global__ void count_at_least_f32(const float* v, long long n, const unsigned int* probes, int n_probes,
                                              unsigned long long* hist)
{
    count_at_least_impl<float, unsigned int>(v, n, probes, n_probes, hist);
}

extern "C" __global__ void count_at_least_f64(const double* v, long long n, const unsigned long long* probes,
                                              int n_probes, unsigned long long* hist)
{
    count_at_least_impl<double, unsigned long long>(v, n, probes, n_probes, hist);
}

extern "C" __global__ void band_counts_f32(const float* v, long long n, unsigned int t_lo, unsigned int t_hi,
                                           long long* above, long long* band)
{
    band_counts_impl<float, unsigned int>(v, n, t_lo, t_hi, above, band);
}

extern "C" __global__ void band_counts_f64(const double* v, long long n, unsigned long long t_lo,
                                           unsigned long long t_hi, long long* above, long long* band)
{
    band_counts_impl<double, unsigned long long>(v, n, t_lo, t_hi, above, band);
}

extern "C" __global__ void compact_f32(float* residual, long long n, unsigned int t_lo, unsigned int t_hi,
                                       long long allowed, const long long* above_before,
                                       const long long* band_before, long long* idx_out, float* val_out)
{
    compact_impl<float, unsigned int>(residual, n, t_lo, t_hi, allowed, above_before, band_before, idx_out, val_out);
}

extern "C" __global__ void compact_f64(double* residual, long long n, unsigned long long t_lo,
                                       unsigned long long t_hi, long long allowed, const long long* above_before,
                                       const long long* band_before, long long* idx_out, double* val_out)
{
    compact_impl<double, unsigned long long>(residual, n, t_lo, t_hi, allowed, above_before, band_before, idx_out,
                                             val_out);
}

extern "C" __global__ void scatter_add_f32(float* dense, long long n, const long long* idx, const float* values,
                                           long long m)
{
    scatter_add_impl<float>(dense, n, idx, values, m);
}

extern "C" __global__ void scatter_add_f64(double* dense, long long n, const long long* idx, const double* values,
                                           long long m)
{
    scatter_add_impl<double>(dense, n, idx, values, m);
}
