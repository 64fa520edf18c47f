// The fp32 CUDA launchers built for the CPU emulation (emulation/cuda_emulation.h), exported with
// C linkage for tests/test_nvcc.py, which loads this as a shared library through ctypes and
// compares the results with kernels.ref. Pointers are host pointers here.
#define GPT2K_CUDA_EMULATION 1

#include "../attention.cuh"
#include "../cross_entropy.cuh"
#include "../gelu.cuh"
#include "../layer_norm.cuh"

using namespace gpt2k::cuda;

extern "C" {

int emu_layer_norm_fwd(const float* x, const float* w, const float* b, float* y, float* mean, float* rstd, int64_t N,
                       int64_t C, float eps) {
  return layer_norm_fwd_launch<float>(x, w, b, y, mean, rstd, N, C, eps, nullptr);
}

int64_t emu_layer_norm_bwd_scratch(int64_t N, int64_t C) { return layer_norm_bwd_scratch_floats(N, C); }

int emu_layer_norm_bwd(const float* dy, const float* x, const float* w, const float* mean, const float* rstd,
                       float* dx, float* dw, float* db, float* scratch, int64_t N, int64_t C) {
  return layer_norm_bwd_launch<float>(dy, x, w, mean, rstd, dx, dw, db, scratch, N, C, nullptr);
}

int emu_bias_gelu_fwd(const float* h, const float* bias, float* act, int64_t N, int64_t H) {
  return bias_gelu_fwd_launch<float>(h, bias, act, N, H, nullptr);
}

int64_t emu_bias_gelu_bwd_scratch(int64_t N, int64_t H) { return bias_gelu_bwd_scratch_floats(N, H); }

int emu_bias_gelu_bwd(const float* dact, const float* h, const float* bias, float* dh, float* dbias, float* scratch,
                      int64_t N, int64_t H) {
  return bias_gelu_bwd_launch<float>(dact, h, bias, dh, dbias, scratch, N, H, nullptr);
}

int emu_attention_fwd(const float* q, const float* k, const float* v, float* y, float* lse, int64_t BH, int64_t Tq,
                      int64_t Tk, int64_t D, int causal) {
  return attention_fwd_launch<float>(q, k, v, y, lse, BH, Tq, Tk, D, causal != 0, nullptr);
}

int emu_attention_bwd(const float* dy, const float* q, const float* k, const float* v, const float* y,
                      const float* lse, float* dq, float* dk, float* dv, float* scratch, int64_t BH, int64_t Tq,
                      int64_t Tk, int64_t D, int causal) {
  return attention_bwd_launch<float>(dy, q, k, v, y, lse, dq, dk, dv, scratch, BH, Tq, Tk, D, causal != 0, nullptr);
}

int emu_cross_entropy(float* logits, const int64_t* targets, float* loss, const float* grad_scale, int64_t N,
                      int64_t V, int64_t ignore_index) {
  return cross_entropy_launch<float>(logits, targets, loss, grad_scale, N, V, ignore_index, nullptr);
}

}  // extern "C"
