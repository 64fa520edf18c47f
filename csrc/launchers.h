// Host entry points of the gpt2k CUDA kernels (defined in kernels.cu, called by cuda_ops.cpp).
//
// Plain C++: raw device pointers, sizes, a dtype tag and a cudaStream_t. Every launcher only
// enqueues work and returns cudaGetLastError(). Buffers are contiguous row-major; statistics
// and weight-gradient partial sums are fp32. Scratch buffers are allocated by the caller, sized
// by the *_scratch_floats() functions below.
#pragma once

#ifdef GPT2K_CUDA_EMULATION
#include "emulation/cuda_emulation.h"
#else
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

namespace gpt2k::cuda {

enum class DType { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Rows summed by one block of a column-sum (dweight / dbias partial sums).
constexpr int64_t kColSumRows = 64;
inline int64_t colsum_parts(int64_t N) { return N == 0 ? 1 : (N + kColSumRows - 1) / kColSumRows; }
// Largest head size of the attention kernels.
constexpr int64_t kMaxHeadSize = 128;

// LayerNorm over rows of C; w, b may be null. With a residual r (r and s both set; both null for a
// plain layer norm), the rows normalised are s = x + r rounded to the dtype, and s is stored.
cudaError_t layer_norm_fwd(DType dt, const void* x, const void* r, const void* w, const void* b, void* y, void* s,
                           float* mean, float* rstd, int64_t N, int64_t C, float eps, cudaStream_t stream);
inline int64_t layer_norm_bwd_scratch_floats(int64_t N, int64_t C) { return 2 * colsum_parts(N) * C; }
// ds: null, or the gradient of s = x + r, added into dx (x is then s).
cudaError_t layer_norm_bwd(DType dt, const void* dy, const void* ds, const void* x, const void* w, const float* mean,
                           const float* rstd, void* dx, float* dw, float* db, float* scratch, int64_t N, int64_t C,
                           cudaStream_t stream);

// act = gelu_tanh(h + bias); dh = dact * gelu_tanh'(h + bias), dbias = column sums of dh (fp32).
cudaError_t bias_gelu_fwd(DType dt, const void* h, const void* bias, void* act, int64_t N, int64_t H,
                          cudaStream_t stream);
inline int64_t bias_gelu_bwd_scratch_floats(int64_t N, int64_t H) { return colsum_parts(N) * H; }
cudaError_t bias_gelu_bwd(DType dt, const void* dact, const void* h, const void* bias, void* dh, float* dbias,
                          float* scratch, int64_t N, int64_t H, cudaStream_t stream);

// Attention of BH heads, queries the last Tq of Tk positions, head size D <= kMaxHeadSize.
cudaError_t attention_fwd(DType dt, const void* q, const void* k, const void* v, void* y, float* lse, int64_t BH,
                          int64_t Tq, int64_t Tk, int64_t D, bool causal, cudaStream_t stream);
inline int64_t attention_bwd_scratch_floats(int64_t BH, int64_t Tq) { return BH * Tq; }
cudaError_t attention_bwd(DType dt, const void* dy, const void* q, const void* k, const void* v, const void* y,
                          const float* lse, void* dq, void* dk, void* dv, float* scratch, int64_t BH, int64_t Tq,
                          int64_t Tk, int64_t D, bool causal, cudaStream_t stream);

// Per-row softmax cross-entropy over the first V columns of N rows ld >= V elements apart; with
// grad_scale (a device pointer to one float) those columns are overwritten by
// grad_scale * (softmax - onehot). A target outside [0, V) that is not ignore_index gives its row a
// NaN loss and a zero gradient.
cudaError_t cross_entropy(DType dt, void* logits, const int64_t* targets, float* loss, const float* grad_scale,
                          int64_t N, int64_t V, int64_t ld, int64_t ignore_index, cudaStream_t stream);

}  // namespace gpt2k::cuda
