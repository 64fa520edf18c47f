// Bias + tanh-GELU forward / backward CUDA kernels and their launchers (plain CUDA).
//
// The MLP's matmuls stay with cuBLAS (torch); these fuse the c_fc bias into the activation so
// the (N, 4C) pre-activation is read once forward and once backward, and the backward also
// forms the fp32 partial sums of dbias in the same pass. Memory bound: ~20 FLOPs per element
// against 2 (fwd) or 3 (bwd) element transfers.
#pragma once

#include "common.cuh"
#include "launchers.h"

namespace gpt2k::cuda {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

template <typename T>
__global__ void bias_gelu_fwd_kernel(const T* __restrict__ h,     // (N, H) matmul output without bias
                                     const T* __restrict__ bias,  // (H,) or nullptr
                                     T* __restrict__ act,         // (N, H) output
                                     int64_t N, int64_t H) {
  const int64_t n = N * H;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const float x = to_float(h[e]) + (bias != nullptr ? to_float(bias[e % H]) : 0.0f);
    const float t = tanhf(kGeluC * (x + kGeluA * x * x * x));
    act[e] = from_float<T>(0.5f * x * (1.0f + t));
  }
}

// x = h + b, u = c (x + a x^3), t = tanh(u), gelu(x) = x (1 + t) / 2:
//   gelu'(x) = (1 + t) / 2 + x (1 - t^2) c (1 + 3 a x^2) / 2,   dh = dact gelu'(x),   dbias = sum_rows dh.
// Block (cx, p) handles columns [256 cx, 256 (cx + 1)) of rows [p kColSumRows, (p + 1) kColSumRows).
template <typename T>
__global__ void bias_gelu_bwd_kernel(const T* __restrict__ dact,  // (N, H) upstream gradient
                                     const T* __restrict__ h,     // (N, H) forward input
                                     const T* __restrict__ bias,  // (H,) or nullptr
                                     T* __restrict__ dh,          // (N, H) output
                                     float* __restrict__ pbias,   // (parts, H) fp32 dbias partials
                                     int64_t N, int64_t H) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t p = blockIdx.y;
  if (c >= H) return;
  const float bc = bias != nullptr ? to_float(bias[c]) : 0.0f;
  float s = 0.0f;
  const int64_t r1 = min(N, (p + 1) * kColSumRows);
  for (int64_t r = p * kColSumRows; r < r1; ++r) {
    const float x = to_float(h[r * H + c]) + bc;
    const float t = tanhf(kGeluC * (x + kGeluA * x * x * x));
    const float d = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kGeluC * (1.0f + 3.0f * kGeluA * x * x);
    const float g = to_float(dact[r * H + c]) * d;
    dh[r * H + c] = from_float<T>(g);
    s += g;
  }
  pbias[p * H + c] = s;
}

template <typename T>
cudaError_t bias_gelu_fwd_launch(const T* h, const T* bias, T* act, int64_t N, int64_t H, cudaStream_t stream) {
  const int64_t n = N * H;
  if (n > 0) {
    const unsigned blocks = (unsigned)min(ceil_div(n, 256), (int64_t)65535 * 8);
    GPT2K_LAUNCH(blocks, 256, stream, bias_gelu_fwd_kernel<T>)(h, bias, act, N, H);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bias_gelu_bwd_launch(const T* dact, const T* h, const T* bias, T* dh, float* dbias, float* scratch,
                                 int64_t N, int64_t H, cudaStream_t stream) {
  const int64_t parts = colsum_parts(N);
  if (N > 0) {
    const dim3 grid((unsigned)ceil_div(H, 256), (unsigned)parts);
    GPT2K_LAUNCH(grid, 256, stream, bias_gelu_bwd_kernel<T>)(dact, h, bias, dh, scratch, N, H);
  } else {
    cudaMemsetAsync(scratch, 0, sizeof(float) * parts * H, stream);
  }
  sum_partials(scratch, dbias, parts, H, stream);
  return cudaGetLastError();
}

}  // namespace gpt2k::cuda
