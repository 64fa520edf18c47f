// LayerNorm forward / backward CUDA kernels and their launchers (plain CUDA, raw pointers), with an
// optional fused residual add (add_layer_norm: s = x + r rounded to T, y = layer_norm(s)).
//
// Forward: one warp per row; mean and variance (two passes over the row, which stays in L1/L2)
// in fp32. With a residual the first pass forms and stores s, and the later passes read s back.
// Backward: one warp per row for dx (plus the gradient of s for the add variant), and a
// column-parallel kernel for the fp32 partial sums of dweight / dbias over chunks of kColSumRows
// rows, reduced in a fixed order.
// Bytes (the floor): forward reads x once and writes y, backward reads x and dy (twice: dx
// kernel and partial sums) and writes dx; ~4 FLOPs per element each way, so both are memory
// bound: at 3 TB/s a (4096, 768) bf16 forward moves 12.6 MB, ~4 us.
#pragma once

#include "common.cuh"
#include "launchers.h"

namespace gpt2k::cuda {

constexpr int kLnWarps = 8;  // rows (warps) per block

template <typename T>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ x,     // (N, C) input
                                      const T* __restrict__ r,     // (N, C) residual or nullptr
                                      const T* __restrict__ w,     // (C,) scale or nullptr
                                      const T* __restrict__ b,     // (C,) shift or nullptr
                                      T* __restrict__ y,           // (N, C) output
                                      T* s,                        // (N, C) output x + r (nullptr without r)
                                      float* __restrict__ mean,    // (N,) fp32 row means
                                      float* __restrict__ rstd,    // (N,) fp32 1/sqrt(var + eps)
                                      int64_t N, int64_t C, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * (int64_t)kLnWarps + threadIdx.x / 32;
  if (row >= N) return;  // warp-uniform
  float sum = 0.0f;
  if (r != nullptr) {  // each lane stores, then re-reads, its own elements of s: no barrier needed
    for (int64_t c = lane; c < C; c += 32) {
      const T v = from_float<T>(to_float(x[row * C + c]) + to_float(r[row * C + c]));
      s[row * C + c] = v;
      sum += to_float(v);
    }
  } else {
    for (int64_t c = lane; c < C; c += 32) sum += to_float(x[row * C + c]);
  }
  const T* xr = (r != nullptr ? s : x) + row * C;
  const float mu = warp_sum(sum) / (float)C;
  float s2 = 0.0f;
  for (int64_t c = lane; c < C; c += 32) {
    const float d = to_float(xr[c]) - mu;
    s2 += d * d;
  }
  const float rs = rsqrtf(warp_sum(s2) / (float)C + eps);
  T* yr = y + row * C;
  for (int64_t c = lane; c < C; c += 32) {
    float v = (to_float(xr[c]) - mu) * rs;
    if (w != nullptr) v *= to_float(w[c]);
    if (b != nullptr) v += to_float(b[c]);
    yr[c] = from_float<T>(v);
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// xhat = (x - mean) rstd, y = xhat w + b, g = dy w:
//   dx = rstd (g - mean_c(g) - xhat mean_c(g xhat))  (+ ds, the gradient of s = x + r, for the add variant)
template <typename T>
__global__ void layer_norm_bwd_dx_kernel(const T* __restrict__ dy,        // (N, C) upstream gradient
                                         const T* __restrict__ ds,        // (N, C) gradient of s, or nullptr
                                         const T* __restrict__ x,         // (N, C) forward input (s)
                                         const T* __restrict__ w,         // (C,) scale or nullptr
                                         const float* __restrict__ mean,  // (N,) forward statistics
                                         const float* __restrict__ rstd,  // (N,)
                                         T* __restrict__ dx,              // (N, C) output
                                         int64_t N, int64_t C) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * (int64_t)kLnWarps + threadIdx.x / 32;
  if (row >= N) return;
  const T* xr = x + row * C;
  const T* gr = dy + row * C;
  const float mu = mean[row], rs = rstd[row];
  float sg = 0.0f, sgx = 0.0f;
  for (int64_t c = lane; c < C; c += 32) {
    const float g = to_float(gr[c]) * (w != nullptr ? to_float(w[c]) : 1.0f);
    sg += g;
    sgx += g * (to_float(xr[c]) - mu) * rs;
  }
  const float mg = warp_sum(sg) / (float)C, mgx = warp_sum(sgx) / (float)C;
  T* dxr = dx + row * C;
  for (int64_t c = lane; c < C; c += 32) {
    const float g = to_float(gr[c]) * (w != nullptr ? to_float(w[c]) : 1.0f);
    const float xh = (to_float(xr[c]) - mu) * rs;
    const float d = rs * (g - mg - xh * mgx);
    dxr[c] = from_float<T>(ds != nullptr ? d + to_float(ds[row * C + c]) : d);
  }
}

// dw = sum_rows dy xhat, db = sum_rows dy: block (cx, p) sums rows [p kColSumRows, (p + 1) kColSumRows)
// of columns [256 cx, 256 (cx + 1)) into pw[p, c], pb[p, c].
template <typename T>
__global__ void layer_norm_bwd_dwdb_kernel(const T* __restrict__ dy,        // (N, C) upstream gradient
                                           const T* __restrict__ x,         // (N, C) forward input
                                           const float* __restrict__ mean,  // (N,)
                                           const float* __restrict__ rstd,  // (N,)
                                           float* __restrict__ pw,          // (parts, C) dweight partials
                                           float* __restrict__ pb,          // (parts, C) dbias partials
                                           int64_t N, int64_t C) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t p = blockIdx.y;
  if (c >= C) return;
  float sw = 0.0f, sb = 0.0f;
  const int64_t r1 = min(N, (p + 1) * kColSumRows);
  for (int64_t r = p * kColSumRows; r < r1; ++r) {
    const float g = to_float(dy[r * C + c]);
    sw += g * (to_float(x[r * C + c]) - mean[r]) * rstd[r];
    sb += g;
  }
  pw[p * C + c] = sw;
  pb[p * C + c] = sb;
}

// r and s: both nullptr (layer norm) or both set (add + layer norm).
template <typename T>
cudaError_t layer_norm_fwd_launch(const T* x, const T* r, const T* w, const T* b, T* y, T* s, float* mean,
                                  float* rstd, int64_t N, int64_t C, float eps, cudaStream_t stream) {
  if (N > 0) {
    const unsigned blocks = (unsigned)ceil_div(N, kLnWarps);
    GPT2K_LAUNCH(blocks, kLnWarps * 32, stream, layer_norm_fwd_kernel<T>)(x, r, w, b, y, s, mean, rstd, N, C, eps);
  }
  return cudaGetLastError();
}

// ds: nullptr (layer norm) or the gradient of s, added into dx (add + layer norm; x is then s).
template <typename T>
cudaError_t layer_norm_bwd_launch(const T* dy, const T* ds, const T* x, const T* w, const float* mean,
                                  const float* rstd, T* dx, float* dw, float* db, float* scratch, int64_t N, int64_t C,
                                  cudaStream_t stream) {
  const int64_t parts = colsum_parts(N);
  float* pw = scratch;
  float* pb = scratch + parts * C;
  if (N > 0) {
    const unsigned blocks = (unsigned)ceil_div(N, kLnWarps);
    GPT2K_LAUNCH(blocks, kLnWarps * 32, stream, layer_norm_bwd_dx_kernel<T>)(dy, ds, x, w, mean, rstd, dx, N, C);
    const dim3 grid((unsigned)ceil_div(C, 256), (unsigned)parts);
    GPT2K_LAUNCH(grid, 256, stream, layer_norm_bwd_dwdb_kernel<T>)(dy, x, mean, rstd, pw, pb, N, C);
  } else {
    cudaMemsetAsync(scratch, 0, sizeof(float) * 2 * parts * C, stream);
  }
  sum_partials(pw, dw, parts, C, stream);
  sum_partials(pb, db, parts, C, stream);
  return cudaGetLastError();
}

}  // namespace gpt2k::cuda
