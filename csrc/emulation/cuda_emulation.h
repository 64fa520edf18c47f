// Host stand-ins for the CUDA built-ins the gpt2k kernels use, for tests only.
//
// With GPT2K_CUDA_EMULATION defined, common.cuh includes this instead of the CUDA headers and
// the fp32 kernels compile with a plain C++20 compiler. A launch runs the grid's blocks one after
// another, each as blockDim.x std::threads: __shared__ arrays become function statics (shared
// by the threads of the one running block), __syncthreads is a block-wide std::barrier, and warp
// shuffles exchange values through a per-warp slot array between two warp-wide barriers. A
// thread that returns drops out of both barriers, as an exited thread does on a GPU. This checks
// indexing, masking, reductions and synchronisation, not speed or memory-model subtleties.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(n)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}

namespace gpt2k_emu {

constexpr int kMaxWarps = 32;

struct Block {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  float slots[kMaxWarps][32];
};

inline Block* g_block = nullptr;  // the block being run
inline dim3 g_grid, g_block_dim;
inline thread_local dim3 t_thread, t_block;

}  // namespace gpt2k_emu

#define threadIdx (::gpt2k_emu::t_thread)
#define blockIdx (::gpt2k_emu::t_block)
#define blockDim (::gpt2k_emu::g_block_dim)
#define gridDim (::gpt2k_emu::g_grid)

inline void __syncthreads() { gpt2k_emu::g_block->block->arrive_and_wait(); }

inline float __shfl_sync(unsigned, float v, int src) {
  auto* b = gpt2k_emu::g_block;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  b->slots[warp][lane] = v;
  b->warps[warp]->arrive_and_wait();
  const float out = b->slots[warp][src % 32];
  b->warps[warp]->arrive_and_wait();
  return out;
}

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  return __shfl_sync(mask, v, static_cast<int>(threadIdx.x % 32) ^ lane_mask);
}

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::max;
using std::min;

namespace gpt2k_emu {

// Runs kernel(args...) over the grid (1-D blocks; blocks one at a time).
template <typename Kernel, typename... Args>
void run(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  g_grid = grid;
  g_block_dim = block;
  const int n = static_cast<int>(block.x);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block b;
      b.block = std::make_unique<std::barrier<>>(n);
      for (int w = 0; w < (n + 31) / 32; ++w) {
        b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32, n - 32 * w)));
      }
      g_block = &b;
      std::vector<std::thread> threads;
      for (int t = 0; t < n; ++t) {
        threads.emplace_back([&, t] {
          t_thread = dim3(t);
          t_block = dim3(bx, by);
          kernel(args...);
          b.warps[t / 32]->arrive_and_drop();
          b.block->arrive_and_drop();
        });
      }
      for (auto& th : threads) th.join();
      g_block = nullptr;
    }
  }
}

template <typename Kernel>
auto launch(dim3 grid, dim3 block, Kernel kernel) {
  return [=](auto... args) { run(grid, block, kernel, args...); };
}

}  // namespace gpt2k_emu

#define GPT2K_LAUNCH(grid, block, stream, ...) ::gpt2k_emu::launch((grid), (block), __VA_ARGS__)
