// Input checks of every gpt2k op, shared by the CPU (ops.cpp) and CUDA (cuda_ops.cpp) bindings.
//
// Each op calls one check_<op>() before touching data; every failure names the op, the argument
// and what is supported. The device checks compare against the op's first tensor, so a CPU
// implementation also rejects a stray CUDA argument and vice versa.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace gpt2k {

void check_layer_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias);
void check_layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const at::Tensor& mean, const at::Tensor& rstd);
// residual: the shape, dtype and device of x. s: the forward's s = x + residual; ds its gradient.
void check_add_layer_norm_fwd(const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias);
void check_add_layer_norm_bwd(const at::Tensor& dy, const at::Tensor& ds, const at::Tensor& s,
                              const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd);
void check_bias_gelu_fwd(const at::Tensor& h, const std::optional<at::Tensor>& bias);
void check_bias_gelu_bwd(const at::Tensor& dact, const at::Tensor& h, const std::optional<at::Tensor>& bias);
// strided_kv: k and v may also be views whose heads are contiguous (T, hs) blocks evenly spaced (a
// KV cache's first T positions), not only contiguous tensors. The CPU forward takes those.
void check_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double dropout_p,
                         bool strided_kv = false);
int64_t uniform_head_stride(const at::Tensor& t);
void check_attention_bwd(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& y, const at::Tensor& lse);
void check_cross_entropy(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                         const std::optional<at::Tensor>& scale);

}  // namespace gpt2k
