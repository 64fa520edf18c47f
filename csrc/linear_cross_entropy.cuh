// Softmax cross-entropy over rows of logits, forward and in-place gradient (plain CUDA).
//
// One block per row. Pass 1: an online max / sum of exp per thread over a strided slice of the
// row, merged across the block -> lse. Pass 2 (when a gradient is asked for): overwrite the row
// with scale * (exp(x - lse) - onehot(t)). Reads the row twice and writes it once, in fp32 math,
// where an unfused softmax / nll / backward makes several passes and a second (N, V) tensor.
//
// Rows are ld elements apart (ld >= V): the loss head runs its GEMMs on a vocabulary padded to a
// multiple of 64 and hands this kernel the first V columns of each row; columns [V, ld) are never
// read or written. A target outside [0, V) that is not ignore_index gives its row a NaN loss and a
// zero gradient (no error flag, no host read: the caller checks targets where that is free).
#pragma once

#include "common.cuh"
#include "launchers.h"

namespace gpt2k::cuda {

constexpr int kCeThreads = 512;

// loss = lse(x) - x[t];   d loss / d x = softmax(x) - onehot(t).
template <typename T>
__global__ void __launch_bounds__(kCeThreads)
cross_entropy_kernel(T* __restrict__ logits,               // (N, ld) logits in [0, V); gradient if grad_scale
                     const int64_t* __restrict__ targets,  // (N,) class ids or ignore_index
                     float* __restrict__ loss,             // (N,) fp32 per-row loss
                     const float* __restrict__ grad_scale, // one float (device), or nullptr for no gradient
                     int64_t V, int64_t ld, int64_t ignore_index) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  T* x = logits + row * ld;
  const int64_t t = targets[row];
  if (t == ignore_index) {  // block-uniform
    if (threadIdx.x == 0) loss[row] = 0.0f;
    if (grad_scale != nullptr) {
      for (int64_t c = threadIdx.x; c < V; c += blockDim.x) x[c] = from_float<T>(0.0f);
    }
    return;
  }
  const bool bad = t < 0 || t >= V;
  const float xt = bad ? 0.0f : to_float(x[t]);  // read before any thread overwrites the row
  float m = -INFINITY, s = 0.0f;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
    const float v = to_float(x[c]);
    if (v > m) {
      s = s * __expf(m - v) + 1.0f;
      m = v;
    } else {
      s += __expf(v - m);
    }
  }
  const float mx = block_max(m, red);
  s = m == -INFINITY ? 0.0f : s * __expf(m - mx);
  const float lse = mx + logf(block_sum(s, red));  // block_sum ends with a barrier
  if (threadIdx.x == 0) loss[row] = bad ? NAN : lse - xt;
  if (grad_scale == nullptr) return;
  const float k = bad ? 0.0f : *grad_scale;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
    const float g = k * __expf(to_float(x[c]) - lse) - (c == t ? k : 0.0f);
    x[c] = from_float<T>(g);
  }
}

template <typename T>
cudaError_t cross_entropy_launch(T* logits, const int64_t* targets, float* loss, const float* grad_scale, int64_t N,
                                 int64_t V, int64_t ld, int64_t ignore_index, cudaStream_t stream) {
  if (N > 0) {
    GPT2K_LAUNCH((unsigned)N, kCeThreads, stream, cross_entropy_kernel<T>)(
        logits, targets, loss, grad_scale, V, ld, ignore_index);
  }
  return cudaGetLastError();
}

}  // namespace gpt2k::cuda
