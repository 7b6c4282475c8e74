// A CPU stand-in for the CUDA features src/model/cuda_kernels.cu uses, so that its kernels can
// be checked here against plain references (scripts/check_cuda_kernels.sh) without a GPU.
//
// Blocks run one after another; a block's threads are real threads. `__shared__` variables
// become function statics: one copy, which is what the running block sees. `__syncthreads`
// and `__syncwarp` are barriers, `__shfl_xor_sync` a barrier-fenced exchange (the kernels call
// it with full warps only). A thread that returns leaves its barriers (arrive_and_drop), as an
// exited GPU thread no longer holds back `__syncthreads`.
#pragma once
#define CLIPFT_CUDA_EMU 1
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    uint32_t x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

using std::max;
using std::min;

typedef _Float16 __half;
inline float __half2float(__half x) { return (float)x; }
inline __half __float2half(float x) { return (__half)x; } // round to nearest even

struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 x) {
    uint32_t u = (uint32_t)x.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return {(uint16_t)((u >> 16) | 0x40)}; // quiet NaN
    }
    u += 0x7fffu + ((u >> 16) & 1); // round to nearest even
    return {(uint16_t)(u >> 16)};
}

namespace emu {
struct Warp {
    std::barrier<> bar{32};
    float slots[32];
};
inline thread_local std::barrier<> *block_bar;
inline thread_local Warp *warp;
} // namespace emu

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp() { emu::warp->bar.arrive_and_wait(); }
inline float __shfl_xor_sync(uint32_t, float v, int lane_mask) {
    const uint32_t lane = threadIdx.x % 32;
    emu::warp->slots[lane] = v;
    emu::warp->bar.arrive_and_wait();
    const float r = emu::warp->slots[lane ^ (uint32_t)lane_mask];
    emu::warp->bar.arrive_and_wait();
    return r;
}

namespace emu {
// Runs `kernel()` over the grid, one block at a time (block.x threads, a multiple of 32).
inline void launch(dim3 grid, dim3 block, const std::function<void()> &kernel) {
    gridDim = grid;
    blockDim = block;
    for (uint32_t z = 0; z < grid.z; ++z)
        for (uint32_t y = 0; y < grid.y; ++y)
            for (uint32_t x = 0; x < grid.x; ++x) {
                std::barrier<> bar(block.x);
                std::vector<std::unique_ptr<Warp>> warps;
                for (uint32_t w = 0; w < block.x / 32; ++w) warps.push_back(std::make_unique<Warp>());
                std::vector<std::thread> threads;
                for (uint32_t t = 0; t < block.x; ++t) {
                    threads.emplace_back([&, t] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        block_bar = &bar;
                        warp = warps[t / 32].get();
                        kernel();
                        warp->bar.arrive_and_drop();
                        bar.arrive_and_drop();
                    });
                }
                for (auto &th : threads) th.join();
            }
}
} // namespace emu
