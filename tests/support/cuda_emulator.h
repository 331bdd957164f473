// Runs asyncsgd's CUDA kernels on the CPU for tests (tests/support/cuda_emulator.py compiles kernels/*.cu with this header
// included first, unchanged).  The threads of a block are fibers (ucontext) of one OS thread, switched round robin;
// a fiber gives way only at a barrier, so __syncthreads and warp shuffles have their real meaning and shared
// memory (__shared__ mapped to static storage) belongs to the running block; blocks run one after another.
// A warp shuffle exchanges values through a per-warp buffer and a warp barrier, exact when all 32 lanes call it
// (the kernels use full masks only).  This checks indexing, synchronisation and arithmetic, not performance, and
// not races that only real parallel hardware would expose.
#pragma once

#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline dim3 threadIdx;        // of the fiber running now (set by the scheduler before every switch)
inline dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

namespace emu {

// One block runs as blockDim.x fibers in this OS thread, switched round robin; a fiber leaves only at a barrier.
struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    bool done = false;
};

inline ucontext_t scheduler;
inline std::vector<Fiber>* fibers = nullptr;
inline unsigned int current = 0;
inline const std::function<void()>* body = nullptr;
constexpr std::size_t STACK_BYTES = 256 * 1024;

inline void yield() { swapcontext(&(*fibers)[current].context, &scheduler); }

// Wait until `members` fibers have arrived; generations make it reusable at once.
struct Barrier {
    unsigned int members = 0, arrived = 0;
    unsigned long long generation = 0;
    void wait()
    {
        const unsigned long long g = generation;
        if (++arrived == members) {
            arrived = 0;
            ++generation;
            return;
        }
        while (generation == g) yield();
    }
};

struct Warp {
    Barrier barrier;
    long long slot[2][32];      // double-buffered, so one barrier per shuffle suffices
    unsigned int calls[32] = {};
};

inline Barrier block_barrier;
inline std::vector<Warp>* warps = nullptr;

template <typename T>
T shuffle_up(T v, unsigned int d)
{
    const unsigned int lane = threadIdx.x & 31u;
    Warp& w = (*warps)[threadIdx.x >> 5];
    const unsigned int parity = w.calls[lane]++ & 1u;
    std::memcpy(&w.slot[parity][lane], &v, sizeof(T));
    w.barrier.wait();
    T r = v;
    if (lane >= d) std::memcpy(&r, &w.slot[parity][lane - d], sizeof(T));
    return r;
}

inline void fiber_main() { (*body)(); (*fibers)[current].done = true; }

// Run kernel(args...) on a grid of `grid` blocks of `block` threads, one block after another.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), unsigned int grid, unsigned int block, A... args)
{
    gridDim.x = grid;
    blockDim.x = block;
    const std::function<void()> call = [=] { kernel(args...); };
    body = &call;
    for (unsigned int b = 0; b < grid; ++b) {
        blockIdx.x = b;
        std::vector<Fiber> fs(block);
        std::vector<Warp> ws((block + 31) / 32);
        for (unsigned int i = 0; i < ws.size(); ++i) ws[i].barrier.members = block - 32 * i < 32 ? block - 32 * i : 32;
        block_barrier = Barrier{};
        block_barrier.members = block;
        fibers = &fs;
        warps = &ws;
        for (unsigned int t = 0; t < block; ++t) {
            fs[t].stack.reset(new char[STACK_BYTES]);
            getcontext(&fs[t].context);
            fs[t].context.uc_stack.ss_sp = fs[t].stack.get();
            fs[t].context.uc_stack.ss_size = STACK_BYTES;
            fs[t].context.uc_link = &scheduler;
            makecontext(&fs[t].context, fiber_main, 0);
        }
        for (unsigned int alive = block; alive > 0;) {
            alive = 0;
            for (unsigned int t = 0; t < block; ++t) {
                if (fs[t].done) continue;
                current = t;
                threadIdx.x = t;
                swapcontext(&scheduler, &fs[t].context);
                alive += !fs[t].done;
            }
        }
    }
}

}  // namespace emu

inline void __syncthreads() { emu::block_barrier.wait(); }

inline int __shfl_up_sync(unsigned int, int v, unsigned int d) { return emu::shuffle_up(v, d); }

inline unsigned int __float_as_uint(float x)
{
    unsigned int u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}

inline long long __double_as_longlong(double x)
{
    long long u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}

template <typename T>
inline T atomicAdd(T* address, T value)      // fibers never interleave inside it; atomic_ref keeps the intent visible
{
    return std::atomic_ref<T>(*address).fetch_add(value);
}

using std::sqrt;  // sqrtf comes from <cmath> in the global namespace
