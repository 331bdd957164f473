// One fused pass for a replica's local update (asyncsgd.backends.sparse.fused_update is the reference):
//   d = g;  if ADAGRAD: G += g*g, d = g / sqrt(G + eps);  if MOMENTUM: v = mu*v + d, d = v;
//   params -= step_scale * d   (step_scale = staleness weight * lr);   if ACCRUE: accrued += d
// Each element is read and written once, instead of once per numpy operation.  The loader compiles with
// --fmad=false and the default IEEE division and square root, so every operation rounds exactly as numpy's does
// and the result equals the reference bit for bit.  Disabled arrays are never touched (any pointer may be passed).

#define UPDATE_ADAGRAD 1
#define UPDATE_MOMENTUM 2
#define UPDATE_ACCRUE 4

__device__ __forceinline__ float square_root(float x) { return sqrtf(x); }      // IEEE round-to-nearest
__device__ __forceinline__ double square_root(double x) { return sqrt(x); }

template <typename T>
__device__ void fused_update_impl(T* __restrict__ params, const T* __restrict__ grad, T* __restrict__ velocity,
                                  T* __restrict__ sum_sq, T* __restrict__ accrued, long long n,
                                  T step_scale, T momentum, T eps, int flags)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const T g = grad[i];
        T d = g;
        if (flags & UPDATE_ADAGRAD) {
            const T s = sum_sq[i] + g * g;
            sum_sq[i] = s;
            d = g / square_root(s + eps);
        }
        if (flags & UPDATE_MOMENTUM) {
            const T v = momentum * velocity[i] + d;
            velocity[i] = v;
            d = v;
        }
        params[i] = params[i] - step_scale * d;
        if (flags & UPDATE_ACCRUE) accrued[i] = accrued[i] + d;
    }
}

extern "C" __global__ void fused_update_f32(float* params, const float* grad, float* velocity, float* sum_sq,
                                            float* accrued, long long n, float step_scale, float momentum,
                                            float eps, int flags)
{
    fused_update_impl<float>(params, grad, velocity, sum_sq, accrued, n, step_scale, momentum, eps, flags);
}

extern "C" __global__ void fused_update_f64(double* params, const double* grad, double* velocity, double* sum_sq,
                                            double* accrued, long long n, double step_scale, double momentum,
                                            double eps, int flags)
{
    fused_update_impl<double>(params, grad, velocity, sum_sq, accrued, n, step_scale, momentum, eps, flags);
}
