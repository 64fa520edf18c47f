// Host stand-ins for the CUDA built-ins the gpt2k kernels use, for tests only.
//
// With GPT2K_CUDA_EMULATION defined, common.cuh includes this instead of the CUDA headers and
// the kernels compile with a plain C++20 compiler (fp16 / bf16 as 16-bit storage structs). A
// launch creates blockDim.x std::threads that run the grid's blocks one after another:
// __shared__ arrays become function statics (shared by the threads of the one running block),
// __syncthreads is a block-wide std::barrier, and warp shuffles exchange values through a
// per-warp slot array between two warp-wide barriers. A thread that returns from the kernel
// drops out of both barriers, as an exited thread does on a GPU. This checks indexing, masking,
// reductions and synchronisation, not speed or memory-model subtleties.
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

// fp16 / bf16 storage types with round-to-nearest-even conversions, as cuda_fp16.h / cuda_bf16.h.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  int32_t e = (h.bits >> 10) & 0x1f;
  uint32_t m = h.bits & 0x3ffu, u;
  if (e == 0 && m == 0) {
    u = sign;
  } else if (e == 0) {  // subnormal: normalise
    e = 1;
    while (!(m & 0x400u)) {
      m <<= 1;
      --e;
    }
    u = sign | (static_cast<uint32_t>(e + 112) << 23) | ((m & 0x3ffu) << 13);
  } else if (e == 31) {
    u = sign | 0x7f800000u | (m << 13);
  } else {
    u = sign | (static_cast<uint32_t>(e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half, round(|f| 2^24) in units of 2^-24
    float af;
    std::memcpy(&af, &a, sizeof(af));
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(af * 16777216.0f)))};
  }
  uint32_t r = a - 0x38000000u;  // rebias the exponent from 127 to 15
  r += 0xfffu + ((r >> 13) & 1u);
  return {static_cast<uint16_t>(sign | (r >> 13))};
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

// Runs kernel(args...) over the grid (1-D blocks): blockDim.x threads walk the blocks in order
// (blockIdx.x fastest), all finishing one block before any starts the next.
template <typename Kernel, typename... Args>
void run(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  g_grid = grid;
  g_block_dim = block;
  const int n = static_cast<int>(block.x);
  const unsigned nblocks = grid.x * grid.y;
  if (n == 0 || nblocks == 0) return;
  Block b;
  auto fresh_barriers = [&b, n]() noexcept {  // every thread dropped out of the last block's barriers
    b.block = std::make_unique<std::barrier<>>(n);
    b.warps.clear();
    for (int w = 0; w < (n + 31) / 32; ++w) {
      b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32, n - 32 * w)));
    }
  };
  fresh_barriers();
  g_block = &b;
  std::barrier between_blocks(n, fresh_barriers);
  std::vector<std::thread> threads;
  for (int t = 0; t < n; ++t) {
    threads.emplace_back([&, t] {
      t_thread = dim3(t);
      for (unsigned i = 0; i < nblocks; ++i) {
        t_block = dim3(i % grid.x, i / grid.x);
        kernel(args...);
        b.warps[t / 32]->arrive_and_drop();
        b.block->arrive_and_drop();
        between_blocks.arrive_and_wait();
      }
    });
  }
  for (auto& th : threads) th.join();
  g_block = nullptr;
}

template <typename Kernel>
auto launch(dim3 grid, dim3 block, Kernel kernel) {
  return [=](auto... args) { run(grid, block, kernel, args...); };
}

}  // namespace gpt2k_emu

#define GPT2K_LAUNCH(grid, block, stream, ...) ::gpt2k_emu::launch((grid), (block), __VA_ARGS__)
