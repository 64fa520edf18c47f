// Shared device helpers of the gpt2k CUDA kernels: dtype conversion, warp and block reductions,
// and GPT2K_LAUNCH. Plain CUDA (no torch headers), so every .cuh compiles with nvcc alone.
//
// GPT2K_CUDA_EMULATION (tests only, never set by the build) swaps the CUDA headers for
// emulation/cuda_emulation.h, which runs the kernels on CPU threads so that their logic can be
// checked on a machine without a GPU (tests/test_nvcc.py).
#pragma once

#ifdef GPT2K_CUDA_EMULATION
#include "emulation/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// kernel<<<grid, block, 0, stream>>>, written so that the emulation can replace it.
#define GPT2K_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

#include <cstdint>

namespace gpt2k::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `shared` holds 32 floats. Ends with a barrier, so it can be called again right away.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < nwarps ? shared[lane] : 0.0f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

__device__ __forceinline__ float block_max(float v, float* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  v = warp_max(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < nwarps ? shared[lane] : -INFINITY;
  v = warp_max(v);
  __syncthreads();
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out[c] = sum over p < parts of partial[p * C + c], in order (deterministic).
__global__ void sum_partials_kernel(const float* __restrict__ partial,  // (parts, C) fp32 partial sums
                                    float* __restrict__ out,            // (C,) fp32 result
                                    int64_t parts, int64_t C) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  float s = 0.0f;
  for (int64_t p = 0; p < parts; ++p) s += partial[p * C + c];
  out[c] = s;
}

inline void sum_partials(const float* partial, float* out, int64_t parts, int64_t C, cudaStream_t stream) {
  if (C == 0) return;
  GPT2K_LAUNCH((unsigned)ceil_div(C, 256), 256, stream, sum_partials_kernel)(partial, out, parts, C);
}

}  // namespace gpt2k::cuda
