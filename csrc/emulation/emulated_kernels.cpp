// The CUDA launchers built for the CPU emulation (emulation/cuda_emulation.h), exported with C
// linkage for tests/test_nvcc.py, which loads this as a shared library through ctypes and
// compares the results with gpt2_kernels.ref. Pointers are host pointers here. Each entry point has
// an _f32, _f16 and _bf16 version taking buffers of that element type.
#define GPT2K_CUDA_EMULATION 1

#include "../attention.cuh"
#include "../linear_cross_entropy.cuh"
#include "../mlp.cuh"
#include "../layer_norm.cuh"

using namespace gpt2k::cuda;

#define GPT2K_EMU_EXPORT(SUFFIX, T)                                                                                \
  int emu_layer_norm_fwd_##SUFFIX(const T* x, const T* w, const T* b, T* y, float* mean, float* rstd, int64_t N,  \
                                  int64_t C, float eps) {                                                          \
    return layer_norm_fwd_launch<T>(x, nullptr, w, b, y, nullptr, mean, rstd, N, C, eps, nullptr);                 \
  }                                                                                                                \
  int emu_layer_norm_bwd_##SUFFIX(const T* dy, const T* x, const T* w, const float* mean, const float* rstd,       \
                                  T* dx, float* dw, float* db, float* scratch, int64_t N, int64_t C) {             \
    return layer_norm_bwd_launch<T>(dy, nullptr, x, w, mean, rstd, dx, dw, db, scratch, N, C, nullptr);            \
  }                                                                                                                \
  int emu_add_layer_norm_fwd_##SUFFIX(const T* x, const T* r, const T* w, const T* b, T* y, T* s, float* mean,     \
                                      float* rstd, int64_t N, int64_t C, float eps) {                              \
    return layer_norm_fwd_launch<T>(x, r, w, b, y, s, mean, rstd, N, C, eps, nullptr);                             \
  }                                                                                                                \
  int emu_add_layer_norm_bwd_##SUFFIX(const T* dy, const T* ds, const T* s, const T* w, const float* mean,         \
                                      const float* rstd, T* dx, float* dw, float* db, float* scratch, int64_t N,   \
                                      int64_t C) {                                                                 \
    return layer_norm_bwd_launch<T>(dy, ds, s, w, mean, rstd, dx, dw, db, scratch, N, C, nullptr);                 \
  }                                                                                                                \
  int emu_bias_gelu_fwd_##SUFFIX(const T* h, const T* bias, T* act, int64_t N, int64_t H) {                        \
    return bias_gelu_fwd_launch<T>(h, bias, act, N, H, nullptr);                                                   \
  }                                                                                                                \
  int emu_bias_gelu_bwd_##SUFFIX(const T* dact, const T* h, const T* bias, T* dh, float* dbias, float* scratch,    \
                                 int64_t N, int64_t H) {                                                           \
    return bias_gelu_bwd_launch<T>(dact, h, bias, dh, dbias, scratch, N, H, nullptr);                              \
  }                                                                                                                \
  int emu_attention_fwd_##SUFFIX(const T* q, const T* k, const T* v, T* y, float* lse, int64_t BH, int64_t Tq,     \
                                 int64_t Tk, int64_t D, int causal) {                                              \
    return attention_fwd_launch<T>(q, k, v, y, lse, BH, Tq, Tk, D, causal != 0, nullptr);                          \
  }                                                                                                                \
  int emu_attention_bwd_##SUFFIX(const T* dy, const T* q, const T* k, const T* v, const T* y, const float* lse,    \
                                 T* dq, T* dk, T* dv, float* scratch, int64_t BH, int64_t Tq, int64_t Tk,          \
                                 int64_t D, int causal) {                                                          \
    return attention_bwd_launch<T>(dy, q, k, v, y, lse, dq, dk, dv, scratch, BH, Tq, Tk, D, causal != 0, nullptr); \
  }                                                                                                                \
  int emu_cross_entropy_##SUFFIX(T* logits, const int64_t* targets, float* loss, const float* grad_scale,          \
                                 int64_t N, int64_t V, int64_t ignore_index) {                                     \
    return cross_entropy_launch<T>(logits, targets, loss, grad_scale, N, V, V, ignore_index, nullptr);             \
  }

extern "C" {

int64_t emu_layer_norm_bwd_scratch(int64_t N, int64_t C) { return layer_norm_bwd_scratch_floats(N, C); }
int64_t emu_bias_gelu_bwd_scratch(int64_t N, int64_t H) { return bias_gelu_bwd_scratch_floats(N, H); }

GPT2K_EMU_EXPORT(f32, float)
GPT2K_EMU_EXPORT(f16, __half)
GPT2K_EMU_EXPORT(bf16, __nv_bfloat16)

}  // extern "C"
