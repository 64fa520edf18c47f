// CPU kernels of the gpt2k extension: raw-pointer functions, no tensors.
//
// Every function takes contiguous row-major buffers. T is float, c10::BFloat16 or c10::Half; all
// arithmetic (statistics, reductions, softmax, accumulations) is done in fp32 whatever T is.
// The bindings in ops.cpp check the inputs, allocate outputs and call these.
#pragma once

#include <cstdint>

namespace gpt2k::cpu {

// The instruction set the hot loops were dispatched to on this CPU: "avx512" (x86-64-v4), "avx2"
// (x86-64-v3, AVX2 + FMA), "sse2" (the baseline build), or "native" where the compiler builds one
// version only (not GCC on x86-64 Linux).
const char* simd_level();

// LayerNorm over rows of length C. w, b may be null (no scale / no shift). With a residual res, the
// rows normalised are s = x + res rounded to T, and s is stored (the fused residual add); res and s
// are both null for a plain layer norm.
template <typename T>
void layer_norm_fwd(const T* x,    // (N, C) input
                    const T* res,  // (N, C) residual or nullptr
                    const T* w,    // (C,) scale or nullptr
                    const T* b,    // (C,) shift or nullptr
                    T* y,          // (N, C) output
                    T* s,          // (N, C) output x + res, or nullptr (when res is)
                    float* mean,   // (N,) fp32 row means
                    float* rstd,   // (N,) fp32 row 1/sqrt(var + eps)
                    int64_t N, int64_t C, float eps);

// dx = the layer norm's input gradient, plus ds (the gradient of s = x + res, which reaches x and
// res alike) when ds is not null.
template <typename T>
void layer_norm_bwd(const T* dy,         // (N, C) upstream gradient of y
                    const T* ds,         // (N, C) upstream gradient of s, or nullptr
                    const T* x,          // (N, C) the forward's normalised input (s with a residual)
                    const T* w,          // (C,) scale or nullptr
                    const float* mean,   // (N,) from the forward
                    const float* rstd,   // (N,) from the forward
                    T* dx,               // (N, C) output
                    float* dw,           // (C,) fp32 output: sum over rows of dy * xhat
                    float* db,           // (C,) fp32 output: sum over rows of dy
                    int64_t N, int64_t C);

// act = gelu_tanh(h + bias), bias broadcast over rows; bias may be null.
template <typename T>
void bias_gelu_fwd(const T* h,     // (N, H) matmul output without its bias
                   const T* bias,  // (H,) or nullptr
                   T* act,         // (N, H) output
                   int64_t N, int64_t H);

// dh = dact * gelu_tanh'(h + bias); dbias = sum over rows of dh (fp32).
template <typename T>
void bias_gelu_bwd(const T* dact,   // (N, H) upstream gradient
                   const T* h,      // (N, H) forward input
                   const T* bias,   // (H,) or nullptr
                   T* dh,           // (N, H) output
                   float* dbias,    // (H,) fp32 output
                   int64_t N, int64_t H);

// Causal (or not) softmax attention, one (B*nh) head after another, queries are the last Tq of Tk
// positions. Blocked over keys with an online softmax: no Tq x Tk matrix is ever stored.
template <typename T>
void attention_fwd(const T* q,     // (BH, Tq, D) queries
                   const T* k,     // BH heads of (Tk, D) keys, head h at k + h * kv_head_stride
                   const T* v,     // BH heads of (Tk, D) values, laid out as k
                   T* y,           // (BH, Tq, D) output
                   float* lse,     // (BH, Tq) fp32 log-sum-exp of the scaled scores
                   int64_t BH, int64_t Tq, int64_t Tk, int64_t D, bool causal,
                   int64_t kv_head_stride);  // Tk * D when k, v are contiguous; larger for a KV cache's view

template <typename T>
void attention_bwd(const T* dy,         // (BH, Tq, D) upstream gradient
                   const T* q,          // (BH, Tq, D)
                   const T* k,          // (BH, Tk, D)
                   const T* v,          // (BH, Tk, D)
                   const T* y,          // (BH, Tq, D) forward output
                   const float* lse,    // (BH, Tq) from the forward
                   T* dq,               // (BH, Tq, D) output
                   T* dk,               // (BH, Tk, D) output
                   T* dv,               // (BH, Tk, D) output
                   int64_t BH, int64_t Tq, int64_t Tk, int64_t D, bool causal);

// Per-row softmax cross-entropy over the first V columns of rows ld >= V elements apart (the loss
// head pads its vocabulary; columns [V, ld) are neither read nor written).
// loss[r] = logsumexp(logits[r]) - logits[r, t[r]], 0 where t[r] is ignore_index. When grad_scale
// is not null, logits is overwritten in place with grad_scale * (softmax(logits[r]) - onehot(t[r]))
// (a zero row where ignored). Every target must be ignore_index or in [0, V) (the binding checks).
template <typename T>
void cross_entropy(T* logits,               // (N, ld) logits in [0, V); the gradient on return if grad_scale
                   const int64_t* targets,  // (N,) class ids or ignore_index
                   float* loss,             // (N,) fp32 output
                   const float* grad_scale, // scalar multiplier of the gradient, or nullptr
                   int64_t N, int64_t V, int64_t ld, int64_t ignore_index);

}  // namespace gpt2k::cpu
