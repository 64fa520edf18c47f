// The one CUDA translation unit of the extension: the host entry points of launchers.h, each
// dispatching on the dtype tag to the templated launchers of the .cuh files. Needs only the
// CUDA toolkit (nvcc alone compiles it; tests/test_nvcc.py does, for sm_75 .. sm_90).
#include "attention.cuh"
#include "linear_cross_entropy.cuh"
#include "mlp.cuh"
#include "launchers.h"
#include "layer_norm.cuh"

#include <type_traits>

namespace gpt2k::cuda {

// Calls fn with a null pointer of the element type that `dt` names.
template <typename Fn>
cudaError_t dispatch(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::kF32: return fn(static_cast<float*>(nullptr));
    case DType::kF16: return fn(static_cast<__half*>(nullptr));
    case DType::kBF16: return fn(static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

#define GPT2K_T(ptr) static_cast<T*>(ptr)
#define GPT2K_CT(ptr) static_cast<const T*>(ptr)

cudaError_t layer_norm_fwd(DType dt, const void* x, const void* r, const void* w, const void* b, void* y, void* s,
                           float* mean, float* rstd, int64_t N, int64_t C, float eps, cudaStream_t stream) {
  return dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return layer_norm_fwd_launch<T>(GPT2K_CT(x), GPT2K_CT(r), GPT2K_CT(w), GPT2K_CT(b), GPT2K_T(y), GPT2K_T(s), mean,
                                    rstd, N, C, eps, stream);
  });
}

cudaError_t layer_norm_bwd(DType dt, const void* dy, const void* ds, const void* x, const void* w, const float* mean,
                           const float* rstd, void* dx, float* dw, float* db, float* scratch, int64_t N, int64_t C,
                           cudaStream_t stream) {
  return dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return layer_norm_bwd_launch<T>(GPT2K_CT(dy), GPT2K_CT(ds), GPT2K_CT(x), GPT2K_CT(w), mean, rstd, GPT2K_T(dx), dw,
                                    db, scratch, N, C, stream);
  });
}

cudaError_t bias_gelu_fwd(DType dt, const void* h, const void* bias, void* act, int64_t N, int64_t H,
                          cudaStream_t stream) {
  return dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return bias_gelu_fwd_launch<T>(GPT2K_CT(h), GPT2K_CT(bias), GPT2K_T(act), N, H, stream);
  });
}

cudaError_t bias_gelu_bwd(DType dt, const void* dact, const void* h, const void* bias, void* dh, float* dbias,
                          float* scratch, int64_t N, int64_t H, cudaStream_t stream) {
  return dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return bias_gelu_bwd_launch<T>(GPT2K_CT(dact), GPT2K_CT(h), GPT2K_CT(bias), GPT2K_T(dh), dbias, scratch, N, H,
                                   stream);
  });
}

cudaError_t attention_fwd(DType dt, const void* q, const void* k, const void* v, void* y, float* lse, int64_t BH,
                          int64_t Tq, int64_t Tk, int64_t D, bool causal, cudaStream_t stream) {
  return dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return attention_fwd_launch<T>(GPT2K_CT(q), GPT2K_CT(k), GPT2K_CT(v), GPT2K_T(y), lse, BH, Tq, Tk, D, causal,
                                   stream);
  });
}

cudaError_t attention_bwd(DType dt, const void* dy, const void* q, const void* k, const void* v, const void* y,
                          const float* lse, void* dq, void* dk, void* dv, float* scratch, int64_t BH, int64_t Tq,
                          int64_t Tk, int64_t D, bool causal, cudaStream_t stream) {
  return dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return attention_bwd_launch<T>(GPT2K_CT(dy), GPT2K_CT(q), GPT2K_CT(k), GPT2K_CT(v), GPT2K_CT(y), lse,
                                   GPT2K_T(dq), GPT2K_T(dk), GPT2K_T(dv), scratch, BH, Tq, Tk, D, causal, stream);
  });
}

cudaError_t cross_entropy(DType dt, void* logits, const int64_t* targets, float* loss, const float* grad_scale,
                          int64_t N, int64_t V, int64_t ld, int64_t ignore_index, cudaStream_t stream) {
  return dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return cross_entropy_launch<T>(GPT2K_T(logits), targets, loss, grad_scale, N, V, ld, ignore_index, stream);
  });
}

#undef GPT2K_T
#undef GPT2K_CT

}  // namespace gpt2k::cuda
