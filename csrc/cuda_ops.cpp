// CUDA implementations of the gpt2k ops: check (checks.h), allocate with torch, and call the
// plain launchers of kernels.cu (launchers.h) on the current CUDA stream. Compiled only when
// the extension is built with CUDA (setup.py, CUDAExtension).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "launchers.h"

namespace gpt2k {
namespace {

using at::Tensor;
using std::optional;

cuda::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kF32;
    case at::kHalf: return cuda::DType::kF16;
    case at::kBFloat16: return cuda::DType::kBF16;
    default: break;
  }
  TORCH_CHECK(false, "gpt2k: unsupported dtype ", t.scalar_type());
  return cuda::DType::kF32;  // not reached
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

const void* opt_ptr(const optional<Tensor>& p) { return p.has_value() ? p->const_data_ptr() : nullptr; }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

Tensor fp32_empty(const Tensor& like, at::IntArrayRef shape) {
  return at::empty(shape, like.options().dtype(at::kFloat));
}

// y, s, mean, rstd of the (rows, C) x, plus residual when given (then s = x + residual is returned too).
std::tuple<Tensor, Tensor, Tensor, Tensor> ln_fwd_cuda(const char* op, const Tensor& x,
                                                       const optional<Tensor>& residual, const optional<Tensor>& weight,
                                                       const optional<Tensor>& bias, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  Tensor y = at::empty_like(x), mean = fp32_empty(x, {N}), rstd = fp32_empty(x, {N});
  Tensor s = residual.has_value() ? at::empty_like(x) : Tensor();
  check_launch(op, cuda::layer_norm_fwd(dtype_of(x), x.const_data_ptr(), opt_ptr(residual), opt_ptr(weight),
                                        opt_ptr(bias), y.mutable_data_ptr(),
                                        s.defined() ? s.mutable_data_ptr() : nullptr, mean.mutable_data_ptr<float>(),
                                        rstd.mutable_data_ptr<float>(), N, C, static_cast<float>(eps), stream()));
  return {y, s, mean, rstd};
}

// dx (plus ds when given), dweight, dbias of the layer norm of the (rows, C) x.
std::tuple<Tensor, Tensor, Tensor> ln_bwd_cuda(const char* op, const Tensor& dy, const optional<Tensor>& ds,
                                               const Tensor& x, const optional<Tensor>& weight, const Tensor& mean,
                                               const Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(cuda::colsum_parts(N) <= 65535, op, ": the input has ", N, " rows; the CUDA kernel supports at most ",
              65535 * cuda::kColSumRows);
  Tensor dx = at::empty_like(x), dw = fp32_empty(x, {C}), db = fp32_empty(x, {C});
  Tensor scratch = fp32_empty(x, {cuda::layer_norm_bwd_scratch_floats(N, C)});
  check_launch(op, cuda::layer_norm_bwd(dtype_of(x), dy.const_data_ptr(), opt_ptr(ds), x.const_data_ptr(),
                                        opt_ptr(weight), mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                                        dx.mutable_data_ptr(), dw.mutable_data_ptr<float>(),
                                        db.mutable_data_ptr<float>(), scratch.mutable_data_ptr<float>(), N, C,
                                        stream()));
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cuda(const Tensor& x, const optional<Tensor>& weight,
                                                       const optional<Tensor>& bias, double eps) {
  check_layer_norm_fwd(x, weight, bias);
  auto [y, s, mean, rstd] = ln_fwd_cuda("gpt2k::layer_norm_fwd", x, std::nullopt, weight, bias, eps);
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cuda(const Tensor& dy, const Tensor& x,
                                                       const optional<Tensor>& weight, const Tensor& mean,
                                                       const Tensor& rstd) {
  check_layer_norm_bwd(dy, x, weight, mean, rstd);
  return ln_bwd_cuda("gpt2k::layer_norm_bwd", dy, std::nullopt, x, weight, mean, rstd);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_fwd_cuda(const Tensor& x, const Tensor& residual,
                                                                   const optional<Tensor>& weight,
                                                                   const optional<Tensor>& bias, double eps) {
  check_add_layer_norm_fwd(x, residual, weight, bias);
  return ln_fwd_cuda("gpt2k::add_layer_norm_fwd", x, residual, weight, bias, eps);
}

std::tuple<Tensor, Tensor, Tensor> add_layer_norm_bwd_cuda(const Tensor& dy, const Tensor& ds, const Tensor& s,
                                                           const optional<Tensor>& weight, const Tensor& mean,
                                                           const Tensor& rstd) {
  check_add_layer_norm_bwd(dy, ds, s, weight, mean, rstd);
  return ln_bwd_cuda("gpt2k::add_layer_norm_bwd", dy, ds, s, weight, mean, rstd);
}

Tensor bias_gelu_fwd_cuda(const Tensor& h, const optional<Tensor>& bias) {
  check_bias_gelu_fwd(h, bias);
  const c10::cuda::CUDAGuard guard(h.device());
  Tensor act = at::empty_like(h);
  check_launch("gpt2k::bias_gelu_fwd", cuda::bias_gelu_fwd(dtype_of(h), h.const_data_ptr(), opt_ptr(bias),
                                                           act.mutable_data_ptr(), h.size(0), h.size(1), stream()));
  return act;
}

std::tuple<Tensor, Tensor> bias_gelu_bwd_cuda(const Tensor& dact, const Tensor& h, const optional<Tensor>& bias) {
  check_bias_gelu_bwd(dact, h, bias);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t N = h.size(0), H = h.size(1);
  TORCH_CHECK(cuda::colsum_parts(N) <= 65535, "gpt2k::bias_gelu_bwd: argument 'h' has ", N,
              " rows; the CUDA kernel supports at most ", 65535 * cuda::kColSumRows);
  Tensor dh = at::empty_like(h), dbias = fp32_empty(h, {H});
  Tensor scratch = fp32_empty(h, {cuda::bias_gelu_bwd_scratch_floats(N, H)});
  check_launch("gpt2k::bias_gelu_bwd",
               cuda::bias_gelu_bwd(dtype_of(h), dact.const_data_ptr(), h.const_data_ptr(), opt_ptr(bias),
                                   dh.mutable_data_ptr(), dbias.mutable_data_ptr<float>(),
                                   scratch.mutable_data_ptr<float>(), N, H, stream()));
  return {dh, dbias};
}

void check_head_size(const char* op, const Tensor& q) {
  TORCH_CHECK(q.size(3) <= cuda::kMaxHeadSize, op, ": argument 'q' has head size ", q.size(3),
              "; the CUDA kernels support head sizes up to ", cuda::kMaxHeadSize);
  TORCH_CHECK(q.size(0) * q.size(1) <= 65535, op, ": argument 'q' has B * nh = ", q.size(0) * q.size(1),
              " heads; the CUDA kernels support at most 65535");
}

std::tuple<Tensor, Tensor> attention_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                              double dropout_p) {
  check_attention_fwd(q, k, v, dropout_p);
  check_head_size("gpt2k::attention_fwd", q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  Tensor y = at::empty_like(q), lse = fp32_empty(q, {B, H, Tq});
  check_launch("gpt2k::attention_fwd",
               cuda::attention_fwd(dtype_of(q), q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
                                   y.mutable_data_ptr(), lse.mutable_data_ptr<float>(), B * H, Tq, Tk, D, causal,
                                   stream()));
  return {y, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cuda(const Tensor& dy, const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Tensor& y, const Tensor& lse,
                                                      bool causal) {
  check_attention_bwd(dy, q, k, v, y, lse);
  check_head_size("gpt2k::attention_bwd", q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  Tensor scratch = fp32_empty(q, {cuda::attention_bwd_scratch_floats(B * H, Tq)});
  check_launch("gpt2k::attention_bwd",
               cuda::attention_bwd(dtype_of(q), dy.const_data_ptr(), q.const_data_ptr(), k.const_data_ptr(),
                                   v.const_data_ptr(), y.const_data_ptr(), lse.const_data_ptr<float>(),
                                   dq.mutable_data_ptr(), dk.mutable_data_ptr(), dv.mutable_data_ptr(),
                                   scratch.mutable_data_ptr<float>(), B * H, Tq, Tk, D, causal, stream()));
  return {dq, dk, dv};
}

Tensor cross_entropy_fwd_cuda(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  check_cross_entropy("gpt2k::cross_entropy_fwd", logits, targets, std::nullopt);
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor loss = fp32_empty(logits, {logits.size(0)});
  // Without a gradient scale the kernel only reads the logits.
  check_launch("gpt2k::cross_entropy_fwd",
               cuda::cross_entropy(dtype_of(logits), const_cast<void*>(logits.const_data_ptr()),
                                   targets.const_data_ptr<int64_t>(), loss.mutable_data_ptr<float>(), nullptr,
                                   logits.size(0), logits.size(1), logits.stride(0), ignore_index, stream()));
  return loss;
}

Tensor cross_entropy_fwd_bwd_cuda(Tensor& logits, const Tensor& targets, const Tensor& scale, int64_t ignore_index) {
  check_cross_entropy("gpt2k::cross_entropy_fwd_bwd_", logits, targets, scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor loss = fp32_empty(logits, {logits.size(0)});
  check_launch("gpt2k::cross_entropy_fwd_bwd_",
               cuda::cross_entropy(dtype_of(logits), logits.mutable_data_ptr(), targets.const_data_ptr<int64_t>(),
                                   loss.mutable_data_ptr<float>(), scale.const_data_ptr<float>(), logits.size(0),
                                   logits.size(1), logits.stride(0), ignore_index, stream()));
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt2k, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cuda);
  m.impl("add_layer_norm_bwd", &add_layer_norm_bwd_cuda);
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cuda);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cuda);
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_fwd_bwd_", &cross_entropy_fwd_bwd_cuda);
}

}  // namespace gpt2k
