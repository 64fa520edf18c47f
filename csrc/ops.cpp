// The gpt2k operator library: schemas, input checks and the CPU implementations.
//
// TORCH_LIBRARY(gpt2k) declares every op once; the CPU kernels (cpu_kernels.cpp) register under
// the CPU dispatch key here and the CUDA launchers (kernels.cu through cuda_ops.cpp) under the
// CUDA key when the extension is built with CUDA. kernels/cuda.py adds fake (meta) kernels and
// autograd. Loading the shared object as the Python module ``gpt2_kernels._C`` runs the registrations;
// the module itself is empty (no pybind11, which keeps the build short).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cpu_kernels.h"

namespace gpt2k {
namespace {

using at::Tensor;
using std::optional;

// ---------------------------------------------------------------- check helpers

// torch's Python spelling of a dtype, as users know it.
const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

void check_float(const char* op, const char* arg, const Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, op, ": argument '", arg, "' has dtype ",
              dtype_name(s), "; supported dtypes are float32, bfloat16 and float16");
}

void check_contiguous(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": argument '", arg, "' must be contiguous (got strides ", t.strides(),
              " for shape ", t.sizes(), "); gpt2_kernels.ext makes its inputs contiguous before calling the op");
}

void check_dim(const char* op, const char* arg, const Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": argument '", arg, "' must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

// Same device as `ref` (named ref_arg).
void check_device(const char* op, const char* arg, const Tensor& t, const char* ref_arg, const Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": argument '", arg, "' is on ", t.device(), " but '", ref_arg,
              "' is on ", ref.device(), "; all tensor arguments must be on the same device");
}

// Same device and dtype as `ref`.
void check_same_kind(const char* op, const char* arg, const Tensor& t, const char* ref_arg, const Tensor& ref) {
  check_device(op, arg, t, ref_arg, ref);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": argument '", arg, "' has dtype ",
              dtype_name(t.scalar_type()), " but '", ref_arg, "' has ", dtype_name(ref.scalar_type()),
              "; they must match");
}

// Same device and dtype as `ref`, and contiguous.
void check_like(const char* op, const char* arg, const Tensor& t, const char* ref_arg, const Tensor& ref) {
  check_same_kind(op, arg, t, ref_arg, ref);
  check_contiguous(op, arg, t);
}

void check_fp32_stat(const char* op, const char* arg, const Tensor& t, const char* ref_arg, const Tensor& ref,
                     at::IntArrayRef shape) {
  check_device(op, arg, t, ref_arg, ref);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": argument '", arg, "' must be float32 (the forward's fp32 "
              "statistics), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.sizes() == shape, op, ": argument '", arg, "' must have shape ", shape, ", got ", t.sizes());
  check_contiguous(op, arg, t);
}

void check_param(const char* op, const char* arg, const optional<Tensor>& p, const Tensor& x, int64_t n) {
  if (!p.has_value()) return;
  check_like(op, arg, *p, "x", x);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, op, ": argument '", arg, "' must have shape (", n,
              ",) to match the last dimension of the input, got ", p->sizes());
}

// On the CPU the targets can be read for free: reject ids outside [0, V) that are not ignored.
void check_targets_in_range(const char* op, const Tensor& targets, int64_t V, int64_t ignore_index) {
  const int64_t* t = targets.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < targets.numel(); ++r) {
    TORCH_CHECK(t[r] == ignore_index || (t[r] >= 0 && t[r] < V), op, ": argument 'targets' has targets[", r,
                "] = ", t[r], ", outside [0, ", V, ") and not ignore_index (", ignore_index, ")");
  }
}

template <typename T>
const T* opt_ptr(const optional<Tensor>& p) {
  return p.has_value() ? p->data_ptr<T>() : nullptr;
}

}  // namespace

// ---------------------------------------------------------------- checks (declared in checks.h)

namespace {

void check_ln_rows(const char* op, const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias) {
  check_dim(op, "x", x, 2, "(rows, C)");
  check_float(op, "x", x);
  check_contiguous(op, "x", x);
  TORCH_CHECK(x.size(1) > 0, op, ": argument 'x' must have at least one feature (C > 0), got shape ", x.sizes());
  check_param(op, "weight", weight, x, x.size(1));
  check_param(op, "bias", bias, x, x.size(1));
}

// A (rows, C) tensor `arg` (a residual, a gradient) shaped as `x_arg`: same device, dtype, shape, contiguous.
void check_row_like(const char* op, const char* arg, const Tensor& g, const char* x_arg, const Tensor& x) {
  check_like(op, arg, g, x_arg, x);
  TORCH_CHECK(g.sizes() == x.sizes(), op, ": argument '", arg, "' must have the shape of ", x_arg, " ", x.sizes(),
              ", got ", g.sizes());
}

// x_arg names the forward's normalised input: x for layer_norm_bwd, s for add_layer_norm_bwd.
void check_ln_bwd(const char* op, const char* x_arg, const Tensor& dy, const Tensor& x,
                  const optional<Tensor>& weight, const Tensor& mean, const Tensor& rstd) {
  check_dim(op, x_arg, x, 2, "(rows, C)");
  check_float(op, x_arg, x);
  check_contiguous(op, x_arg, x);
  check_row_like(op, "dy", dy, x_arg, x);
  check_param(op, "weight", weight, x, x.size(1));
  check_fp32_stat(op, "mean", mean, x_arg, x, {x.size(0)});
  check_fp32_stat(op, "rstd", rstd, x_arg, x, {x.size(0)});
}

}  // namespace

void check_layer_norm_fwd(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias) {
  check_ln_rows("gpt2k::layer_norm_fwd", x, weight, bias);
}

void check_layer_norm_bwd(const Tensor& dy, const Tensor& x, const optional<Tensor>& weight, const Tensor& mean,
                          const Tensor& rstd) {
  check_ln_bwd("gpt2k::layer_norm_bwd", "x", dy, x, weight, mean, rstd);
}

void check_add_layer_norm_fwd(const Tensor& x, const Tensor& residual, const optional<Tensor>& weight,
                              const optional<Tensor>& bias) {
  const char* op = "gpt2k::add_layer_norm_fwd";
  check_ln_rows(op, x, weight, bias);
  check_row_like(op, "residual", residual, "x", x);
}

void check_add_layer_norm_bwd(const Tensor& dy, const Tensor& ds, const Tensor& s, const optional<Tensor>& weight,
                              const Tensor& mean, const Tensor& rstd) {
  const char* op = "gpt2k::add_layer_norm_bwd";
  check_ln_bwd(op, "s", dy, s, weight, mean, rstd);
  check_row_like(op, "ds", ds, "s", s);
}

void check_bias_gelu_fwd(const Tensor& h, const optional<Tensor>& bias) {
  const char* op = "gpt2k::bias_gelu_fwd";
  check_dim(op, "h", h, 2, "(rows, H)");
  check_float(op, "h", h);
  check_contiguous(op, "h", h);
  check_param(op, "bias", bias, h, h.size(1));
}

void check_bias_gelu_bwd(const Tensor& dact, const Tensor& h, const optional<Tensor>& bias) {
  const char* op = "gpt2k::bias_gelu_bwd";
  check_dim(op, "h", h, 2, "(rows, H)");
  check_float(op, "h", h);
  check_contiguous(op, "h", h);
  check_like(op, "dact", dact, "h", h);
  TORCH_CHECK(dact.sizes() == h.sizes(), op, ": argument 'dact' must have the shape of h ", h.sizes(), ", got ",
              dact.sizes());
  check_param(op, "bias", bias, h, h.size(1));
}

// The distance in elements between consecutive (batch, head) blocks of a (B, nh, T, hs) tensor whose
// heads are each a contiguous (T, hs) block, evenly spaced: a contiguous tensor (Tk * hs), or a key /
// value cache's view of its first T positions. -1 for any other layout.
int64_t uniform_head_stride(const Tensor& t) {
  const int64_t B = t.size(0), H = t.size(1), T = t.size(2), D = t.size(3);
  if ((D > 1 && t.stride(3) != 1) || (T > 1 && t.stride(2) != D)) return -1;
  if (B * H <= 1) return T * D;
  const int64_t hs = H > 1 ? t.stride(1) : t.stride(0);
  if (H > 1 && B > 1 && t.stride(0) != H * hs) return -1;
  return hs >= T * D ? hs : -1;  // heads must not overlap
}

void check_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, double dropout_p,
                         bool strided_kv) {
  const char* op = "gpt2k::attention_fwd";
  TORCH_CHECK(dropout_p == 0.0, op, ": dropout_p = ", dropout_p, " is not supported; the extension implements "
              "attention without dropout only (dropout_p == 0)");
  check_dim(op, "q", q, 4, "(B, nh, Tq, hs)");
  check_float(op, "q", q);
  check_contiguous(op, "q", q);
  check_dim(op, "k", k, 4, "(B, nh, Tk, hs)");
  check_dim(op, "v", v, 4, "(B, nh, Tk, hs)");
  if (strided_kv) {  // heads may be spaced apart (a KV cache's view), each head's (Tk, hs) rows contiguous
    for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"k", k}, {"v", v}}) {
      check_same_kind(op, name, t, "q", q);
      TORCH_CHECK(uniform_head_stride(t) >= 0, op, ": argument '", name, "' must be contiguous, or a view whose "
                  "heads are contiguous (T, hs) blocks evenly spaced (got strides ", t.strides(), " for shape ",
                  t.sizes(), "); gpt2_kernels.ext makes its inputs contiguous before calling the op");
    }
  } else {
    check_like(op, "k", k, "q", q);
    check_like(op, "v", v, "q", q);
  }
  TORCH_CHECK(q.size(3) > 0, op, ": argument 'q' must have a head size > 0, got shape ", q.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": argument 'k' must have shape (B, nh, Tk, hs) with q's B, nh and hs ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": argument 'v' must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(2) >= q.size(2), op, ": argument 'k' has ", k.size(2), " positions, fewer than q's ",
              q.size(2), "; the queries must be the last Tq <= Tk positions");
  if (strided_kv) {
    TORCH_CHECK(uniform_head_stride(k) == uniform_head_stride(v), op, ": arguments 'k' and 'v' must have the same "
                "layout, got strides ", k.strides(), " and ", v.strides());
  }
}

void check_attention_bwd(const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& y,
                         const Tensor& lse) {
  const char* op = "gpt2k::attention_bwd";
  check_attention_fwd(q, k, v, 0.0, false);
  check_like(op, "dy", dy, "q", q);
  check_like(op, "y", y, "q", q);
  TORCH_CHECK(dy.sizes() == q.sizes(), op, ": argument 'dy' must have q's shape ", q.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(y.sizes() == q.sizes(), op, ": argument 'y' must have q's shape ", q.sizes(), ", got ", y.sizes());
  check_fp32_stat(op, "lse", lse, "q", q, {q.size(0), q.size(1), q.size(2)});
}

void check_cross_entropy(const char* op, const Tensor& logits, const Tensor& targets, const optional<Tensor>& scale) {
  check_dim(op, "logits", logits, 2, "(rows, V)");
  check_float(op, "logits", logits);
  TORCH_CHECK(logits.size(1) > 0, op, ": argument 'logits' must have at least one class, got shape ",
              logits.sizes());
  // Rows may be further apart than V (the first V columns of a buffer padded to an aligned width).
  TORCH_CHECK((logits.size(1) == 1 || logits.stride(1) == 1) &&
                  (logits.size(0) <= 1 || logits.stride(0) >= logits.size(1)), op,
              ": argument 'logits' must have contiguous rows (strides (ld, 1) with ld >= V), got strides ",
              logits.strides(), " for shape ", logits.sizes());
  check_device(op, "targets", targets, "logits", logits);
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": argument 'targets' must be int64 class ids, got ",
              dtype_name(targets.scalar_type()));
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": argument 'targets' must have shape (",
              logits.size(0), ",) (one id per logits row), got ", targets.sizes());
  check_contiguous(op, "targets", targets);
  if (scale.has_value()) {
    check_device(op, "scale", *scale, "logits", logits);
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->numel() == 1, op,
                ": argument 'scale' must be a one-element float32 tensor, got dtype ",
                dtype_name(scale->scalar_type()), " and shape ", scale->sizes());
  }
}

// ---------------------------------------------------------------- CPU implementations

namespace {

// Calls fn with a null pointer of the C++ element type of `t` (float, BFloat16 or Half).
template <typename Fn>
void dispatch_float(const Tensor& t, Fn&& fn) {
  switch (t.scalar_type()) {
    case at::kFloat: fn(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: fn(static_cast<c10::BFloat16*>(nullptr)); break;
    case at::kHalf: fn(static_cast<c10::Half*>(nullptr)); break;
    default: TORCH_CHECK(false, "gpt2k: unsupported dtype ", dtype_name(t.scalar_type()));
  }
}

// y, s, mean, rstd of the (rows, C) x, plus residual when given (then s = x + residual is returned too).
std::tuple<Tensor, Tensor, Tensor, Tensor> ln_fwd_cpu(const Tensor& x, const optional<Tensor>& residual,
                                                      const optional<Tensor>& weight, const optional<Tensor>& bias,
                                                      double eps) {
  const int64_t N = x.size(0), C = x.size(1);
  Tensor y = at::empty_like(x);
  Tensor s = residual.has_value() ? at::empty_like(x) : Tensor();
  Tensor mean = at::empty({N}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));
  dispatch_float(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::layer_norm_fwd<T>(x.data_ptr<T>(), opt_ptr<T>(residual), opt_ptr<T>(weight), opt_ptr<T>(bias),
                           y.data_ptr<T>(), s.defined() ? s.data_ptr<T>() : nullptr, mean.data_ptr<float>(),
                           rstd.data_ptr<float>(), N, C, static_cast<float>(eps));
  });
  return {y, s, mean, rstd};
}

// dx (plus ds when given), dweight, dbias of the layer norm of the (rows, C) x.
std::tuple<Tensor, Tensor, Tensor> ln_bwd_cpu(const Tensor& dy, const optional<Tensor>& ds, const Tensor& x,
                                              const optional<Tensor>& weight, const Tensor& mean,
                                              const Tensor& rstd) {
  const int64_t N = x.size(0), C = x.size(1);
  Tensor dx = at::empty_like(x);
  Tensor dw = at::empty({C}, x.options().dtype(at::kFloat));
  Tensor db = at::empty({C}, x.options().dtype(at::kFloat));
  dispatch_float(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::layer_norm_bwd<T>(dy.data_ptr<T>(), opt_ptr<T>(ds), x.data_ptr<T>(), opt_ptr<T>(weight),
                           mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr<T>(), dw.data_ptr<float>(),
                           db.data_ptr<float>(), N, C);
  });
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cpu(const Tensor& x, const optional<Tensor>& weight,
                                                      const optional<Tensor>& bias, double eps) {
  check_layer_norm_fwd(x, weight, bias);
  auto [y, s, mean, rstd] = ln_fwd_cpu(x, std::nullopt, weight, bias, eps);
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cpu(const Tensor& dy, const Tensor& x,
                                                      const optional<Tensor>& weight, const Tensor& mean,
                                                      const Tensor& rstd) {
  check_layer_norm_bwd(dy, x, weight, mean, rstd);
  return ln_bwd_cpu(dy, std::nullopt, x, weight, mean, rstd);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_fwd_cpu(const Tensor& x, const Tensor& residual,
                                                                  const optional<Tensor>& weight,
                                                                  const optional<Tensor>& bias, double eps) {
  check_add_layer_norm_fwd(x, residual, weight, bias);
  return ln_fwd_cpu(x, residual, weight, bias, eps);
}

std::tuple<Tensor, Tensor, Tensor> add_layer_norm_bwd_cpu(const Tensor& dy, const Tensor& ds, const Tensor& s,
                                                          const optional<Tensor>& weight, const Tensor& mean,
                                                          const Tensor& rstd) {
  check_add_layer_norm_bwd(dy, ds, s, weight, mean, rstd);
  return ln_bwd_cpu(dy, ds, s, weight, mean, rstd);
}

Tensor bias_gelu_fwd_cpu(const Tensor& h, const optional<Tensor>& bias) {
  check_bias_gelu_fwd(h, bias);
  Tensor act = at::empty_like(h);
  dispatch_float(h, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::bias_gelu_fwd<T>(h.data_ptr<T>(), opt_ptr<T>(bias), act.data_ptr<T>(), h.size(0), h.size(1));
  });
  return act;
}

std::tuple<Tensor, Tensor> bias_gelu_bwd_cpu(const Tensor& dact, const Tensor& h, const optional<Tensor>& bias) {
  check_bias_gelu_bwd(dact, h, bias);
  Tensor dh = at::empty_like(h);
  Tensor dbias = at::empty({h.size(1)}, h.options().dtype(at::kFloat));
  dispatch_float(h, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::bias_gelu_bwd<T>(dact.data_ptr<T>(), h.data_ptr<T>(), opt_ptr<T>(bias), dh.data_ptr<T>(),
                          dbias.data_ptr<float>(), h.size(0), h.size(1));
  });
  return {dh, dbias};
}

std::tuple<Tensor, Tensor> attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                             double dropout_p) {
  // k and v may be a KV cache's view (heads spaced block_size apart): decoding then reads the cache
  // in place instead of copying every layer's keys and values at every step.
  check_attention_fwd(q, k, v, dropout_p, /*strided_kv=*/true);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  Tensor y = at::empty_like(q);
  Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  dispatch_float(q, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::attention_fwd<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), y.data_ptr<T>(), lse.data_ptr<float>(),
                          B * H, Tq, Tk, D, causal, uniform_head_stride(k));
  });
  return {y, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cpu(const Tensor& dy, const Tensor& q, const Tensor& k,
                                                     const Tensor& v, const Tensor& y, const Tensor& lse,
                                                     bool causal) {
  check_attention_bwd(dy, q, k, v, y, lse);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  dispatch_float(q, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::attention_bwd<T>(dy.data_ptr<T>(), q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), y.data_ptr<T>(),
                          lse.data_ptr<float>(), dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(), B * H, Tq, Tk,
                          D, causal);
  });
  return {dq, dk, dv};
}

Tensor cross_entropy_fwd_cpu(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  check_cross_entropy("gpt2k::cross_entropy_fwd", logits, targets, std::nullopt);
  check_targets_in_range("gpt2k::cross_entropy_fwd", targets, logits.size(1), ignore_index);
  Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  dispatch_float(logits, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    // Without a gradient scale the kernel only reads the logits.
    cpu::cross_entropy<T>(const_cast<T*>(logits.const_data_ptr<T>()), targets.data_ptr<int64_t>(),
                          loss.data_ptr<float>(), nullptr, logits.size(0), logits.size(1), logits.stride(0),
                          ignore_index);
  });
  return loss;
}

Tensor cross_entropy_fwd_bwd_cpu(Tensor& logits, const Tensor& targets, const Tensor& scale, int64_t ignore_index) {
  check_cross_entropy("gpt2k::cross_entropy_fwd_bwd_", logits, targets, scale);
  check_targets_in_range("gpt2k::cross_entropy_fwd_bwd_", targets, logits.size(1), ignore_index);
  Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  dispatch_float(logits, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::cross_entropy<T>(logits.data_ptr<T>(), targets.data_ptr<int64_t>(), loss.data_ptr<float>(),
                          scale.data_ptr<float>(), logits.size(0), logits.size(1), logits.stride(0), ignore_index);
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY(gpt2k, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd)"
        " -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def("add_layer_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor y, Tensor s, Tensor mean, Tensor rstd)");
  m.def("add_layer_norm_bwd(Tensor dy, Tensor ds, Tensor s, Tensor? weight, Tensor mean, Tensor rstd)"
        " -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def("bias_gelu_fwd(Tensor h, Tensor? bias) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dact, Tensor h, Tensor? bias) -> (Tensor dh, Tensor dbias)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float dropout_p) -> (Tensor y, Tensor lse)");
  m.def("attention_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor y, Tensor lse, bool causal)"
        " -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("cross_entropy_fwd(Tensor logits, Tensor targets, int ignore_index) -> Tensor");
  m.def("cross_entropy_fwd_bwd_(Tensor(a!) logits, Tensor targets, Tensor scale, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt2k, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cpu);
  m.impl("add_layer_norm_bwd", &add_layer_norm_bwd_cpu);
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cpu);
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_fwd_bwd_", &cross_entropy_fwd_bwd_cpu);
}

}  // namespace gpt2k

// The Python module: empty; importing it loads the library above. Its name is gpt2_kernels._C when setup.py builds it
// and gpt2_kernels.build.JIT_NAME when gpt2_kernels.ext builds it on first use; torch's build passes it as TORCH_EXTENSION_NAME.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define GPT2K_CONCAT_(a, b) a##b
#define GPT2K_CONCAT(a, b) GPT2K_CONCAT_(a, b)
#define GPT2K_STR_(a) #a
#define GPT2K_STR(a) GPT2K_STR_(a)

extern "C" PyMODINIT_FUNC GPT2K_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      GPT2K_STR(TORCH_EXTENSION_NAME),
      "gpt2k C++/CUDA operators, registered as torch.ops.gpt2k.* on import.",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
#ifdef GPT2K_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  // WITH_CUDA tells gpt2_kernels.ext whether CUDA kernels were compiled in (registered under the CUDA key).
  // CPU_SIMD: which build of the CPU kernels this CPU runs (see gpt2k::cpu::simd_level).
  if (module != nullptr && (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0 ||
                            PyModule_AddStringConstant(module, "CPU_SIMD", gpt2k::cpu::simd_level()) != 0)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
