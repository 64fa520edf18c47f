// CPU kernels of the gpt2k extension (declared in cpu_kernels.h).
//
// Layout of every op: a templated driver converts a row (or a block) of T into an fp32 scratch
// buffer, runs an fp32 inner function, and converts back. The inner functions are plain loops
// over contiguous fp32 arrays that the compiler vectorises; on x86-64 with GCC >= 11 they are also
// compiled for the x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512) levels and picked at load time
// by CPU feature (target_clones), so one binary is fast on new machines and still runs on old ones.
// (Not "arch=haswell": GCC dispatches an arch= clone on the CPU's model name, so an AMD or a newer
// Intel CPU with AVX2 would silently get the SSE2 build.)
// Rows / heads are spread over threads with at::parallel_for; reductions over rows (dweight, dbias) go through fixed-size
// per-chunk partial sums, so results do not depend on the thread count.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define GPT2K_MULTIVERSION 1
#define GPT2K_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GPT2K_HOT
#endif

#if defined(__GNUC__)
#define GPT2K_INLINE inline __attribute__((always_inline))
#else
#define GPT2K_INLINE inline
#endif

namespace gpt2k::cpu {

// Which build of the GPT2K_HOT functions the loader picked on this CPU. The three versions below are
// dispatched by the same resolver as the target_clones above, so they report what the kernels run.
// (Callers in other files see one plain declaration, which would bind to the default version, so
// the versions are local and simd_level() calls them here, where the dispatcher is visible.)
#if defined(GPT2K_MULTIVERSION)
namespace {
__attribute__((target("default"))) const char* simd_level_impl() { return "sse2"; }
__attribute__((target("arch=x86-64-v3"))) const char* simd_level_impl() { return "avx2"; }
__attribute__((target("arch=x86-64-v4"))) const char* simd_level_impl() { return "avx512"; }
}  // namespace
const char* simd_level() { return simd_level_impl(); }
#else
const char* simd_level() { return "native"; }
#endif

namespace {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;
constexpr int64_t kChunks = 32;   // row chunks of the dweight / dbias partial sums
constexpr int64_t kBQ = 32;       // attention: queries per block
constexpr int64_t kBK = 64;       // attention: keys per block

// exp(x) for x <= 88 with ~2 ulp error, written without branches or calls so that loops over it
// vectorise: exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by a degree-6
// polynomial (Cephes' coefficients). Inputs below -87 give ~1e-38 instead of 0, which no sum of
// probabilities here can notice.
// The clamps are plain selects, not std::min / std::max: GCC does not inline those (default-target)
// functions into the x86-64-v3 / v4 clones, and the call then stops the loops from vectorising.
GPT2K_INLINE float exp_f(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f;
  const int n = static_cast<int>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float nf = static_cast<float>(n);
  float r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

// tanh(u) = 1 - 2 / (exp(2u) + 1); exp_f saturates, so |u| large gives exactly +-1.
GPT2K_INLINE float tanh_f(float u) { return 1.0f - 2.0f / (exp_f(2.0f * u) + 1.0f); }

template <typename T>
GPT2K_INLINE void to_f32(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
GPT2K_INLINE void from_f32(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// A length-n fp32 view of src: src itself when T is float, else a converted copy in buf.
template <typename T>
GPT2K_INLINE const float* as_f32(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_f32(src, buf, n);
    return buf;
  }
}

// Optional (C,) parameter as fp32, or `fill` everywhere when absent.
template <typename T>
std::vector<float> param_f32(const T* p, int64_t n, float fill) {
  std::vector<float> out(n, fill);
  if (p != nullptr) to_f32(p, out.data(), n);
  return out;
}

// ---------------------------------------------------------------- layer norm

GPT2K_HOT void ln_fwd_row(const float* __restrict x, const float* __restrict w, const float* __restrict b,
                          float* __restrict y, int64_t C, float eps, float* mean_out, float* rstd_out) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) s += x[c];
  const float mean = s / static_cast<float>(C);
  float s2 = 0.0f;  // two passes: the variance of x - mean, exact even for a large mean
#pragma omp simd reduction(+ : s2)
  for (int64_t c = 0; c < C; ++c) {
    const float d = x[c] - mean;
    s2 += d * d;
  }
  const float rstd = 1.0f / std::sqrt(s2 / static_cast<float>(C) + eps);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) y[c] = (x[c] - mean) * rstd * w[c] + b[c];
  *mean_out = mean;
  *rstd_out = rstd;
}

// xhat = (x - mean) rstd, y = xhat w + b, g = dy w:
//   dx = rstd (g - mean(g) - xhat mean(g xhat)),  dw += dy xhat,  db += dy.
GPT2K_HOT void ln_bwd_row(const float* __restrict dy, const float* __restrict x, const float* __restrict w,
                          float mean, float rstd, float* __restrict dx, float* __restrict dw,
                          float* __restrict db, int64_t C) {
  float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
  for (int64_t c = 0; c < C; ++c) {
    const float xh = (x[c] - mean) * rstd;
    const float g = dy[c] * w[c];
    sg += g;
    sgx += g * xh;
    dw[c] += dy[c] * xh;
    db[c] += dy[c];
  }
  const float mg = sg / static_cast<float>(C), mgx = sgx / static_cast<float>(C);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float xh = (x[c] - mean) * rstd;
    dx[c] = rstd * (dy[c] * w[c] - mg - xh * mgx);
  }
}

// s = x + res rounded to T (what an add in T gives), stored to s_out; returns s as fp32: s_out
// itself when T is float, else xbuf (rbuf is scratch).
template <typename T>
GPT2K_INLINE const float* add_residual(const T* x, const T* res, T* s_out, float* xbuf, float* rbuf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; ++i) s_out[i] = x[i] + res[i];
    return s_out;
  } else {
    to_f32(x, xbuf, n);
    to_f32(res, rbuf, n);
    for (int64_t i = 0; i < n; ++i) {
      s_out[i] = static_cast<T>(xbuf[i] + rbuf[i]);
      xbuf[i] = static_cast<float>(s_out[i]);
    }
    return xbuf;
  }
}

// out += a. A pass of its own after the layer norm's dx is stored, so an fp32 dx + ds rounds
// exactly as the unfused layer norm followed by autograd's sum of the two gradients.
GPT2K_INLINE void add_into(float* __restrict out, const float* __restrict a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] += a[i];
}

// Sum `parts` rows of (n,) partials into out, in a fixed order.
void sum_partials(const std::vector<float>& part, int64_t parts, int64_t n, float* out) {
  std::fill(out, out + n, 0.0f);
  for (int64_t p = 0; p < parts; ++p) {
    const float* src = part.data() + p * n;
    for (int64_t c = 0; c < n; ++c) out[c] += src[c];
  }
}

// ---------------------------------------------------------------- bias + GELU

GPT2K_HOT void gelu_fwd_row(const float* __restrict h, const float* __restrict b, float* __restrict act,
                            int64_t H) {
#pragma omp simd
  for (int64_t c = 0; c < H; ++c) {
    const float x = h[c] + b[c];
    const float t = tanh_f(kGeluC * (x + kGeluA * x * x * x));
    act[c] = 0.5f * x * (1.0f + t);
  }
}

// x = h + b, u = c (x + a x^3), t = tanh(u), gelu = x (1 + t) / 2:
//   gelu'(x) = (1 + t) / 2 + x (1 - t^2) c (1 + 3 a x^2) / 2,  dh = dact gelu'(x),  dbias += dh.
GPT2K_HOT void gelu_bwd_row(const float* __restrict dact, const float* __restrict h, const float* __restrict b,
                            float* __restrict dh, float* __restrict dbias, int64_t H) {
#pragma omp simd
  for (int64_t c = 0; c < H; ++c) {
    const float x = h[c] + b[c];
    const float t = tanh_f(kGeluC * (x + kGeluA * x * x * x));
    const float d = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kGeluC * (1.0f + 3.0f * kGeluA * x * x);
    const float g = dact[c] * d;
    dh[c] = g;
    dbias[c] += g;
  }
}

// ---------------------------------------------------------------- cross-entropy

// Returns the row's loss; when scale is non-null writes scale * (softmax(x) - onehot(t)) to g
// (g may be x itself).
GPT2K_HOT float ce_row(const float* x, float* g, int64_t V, int64_t t, const float* scale) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < V; ++c) mx = x[c] > mx ? x[c] : mx;
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < V; ++c) s += exp_f(x[c] - mx);
  const float lse = mx + std::log(s);
  const float loss = lse - x[t];
  if (scale != nullptr) {
    const float k = *scale;
#pragma omp simd
    for (int64_t c = 0; c < V; ++c) g[c] = k * exp_f(x[c] - lse);
    g[t] -= k;
  }
  return loss;
}

// ---------------------------------------------------------------- attention
//
// Work per (query, visible key) pair with head size D: forward 2 D (score) + 2 D (P V) FLOPs;
// backward 2 D (score) + 2 D (dP) + 6 D (dV, dK, dQ updates) = 10 D. Causal halves the pairs:
// GPT-2 small (nh = 12, T = 1024, D = 64) is 1.6 GFLOP forward and 4.0 GFLOP backward per
// sequence, against 12.6 MB of fp32 q, k, v, y: compute bound, so the inner loops are the
// (kBQ x kBK) score block on a transposed, zero-padded key tile (64 accumulators that stay in
// registers) and D-long axpys, instead of a (T, T) matrix per head that would also cost 4 MB.

// One query block against one key block, forward. Q is pre-scaled by 1/sqrt(D); KT is the key
// block transposed to (D, kBK) and zero-padded past nk; V is (nk, D). Row i of the block sits at
// absolute position qpos0 + i and, when causal, sees keys up to that position; kb is the block's
// first key. Updates the running max m, sum l and unnormalised output O (nq, D).
template <int DFIX>
GPT2K_INLINE void attn_fwd_block_impl(const float* __restrict Q, const float* __restrict KT,
                                      const float* __restrict V, float* __restrict S, float* __restrict O,
                                      float* __restrict m, float* __restrict l, int64_t nq, int64_t nk,
                                      int64_t Dd, bool causal, int64_t qpos0, int64_t kb) {
  const int64_t D = DFIX > 0 ? DFIX : Dd;
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t jlim = qpos0 + i - kb + 1;
    const int64_t jmax = causal && jlim < nk ? jlim : nk;
    if (jmax <= 0) continue;
    float* __restrict s = S + i * kBK;
    const float* __restrict qi = Q + i * D;
    float acc[kBK];
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) acc[j] = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float qd = qi[d];
      const float* __restrict kt = KT + d * kBK;
#pragma omp simd
      for (int64_t j = 0; j < kBK; ++j) acc[j] += qd * kt[j];
    }
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < jmax; ++j) mx = acc[j] > mx ? acc[j] : mx;
    const float m_new = m[i] > mx ? m[i] : mx;
    const float corr = std::exp(m[i] - m_new);  // 0 on the first block (m = -inf)
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < jmax; ++j) {
      const float p = exp_f(acc[j] - m_new);
      s[j] = p;
      sum += p;
    }
    l[i] = l[i] * corr + sum;
    m[i] = m_new;
    float* __restrict o = O + i * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] *= corr;
    for (int64_t j = 0; j < jmax; ++j) {
      const float p = s[j];
      const float* __restrict vj = V + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] += p * vj[d];
    }
  }
}

GPT2K_HOT void attn_fwd_block(const float* Q, const float* KT, const float* V, float* S, float* O, float* m,
                              float* l, int64_t nq, int64_t nk, int64_t D, bool causal, int64_t qpos0,
                              int64_t kb) {
  if (D == 64) {
    attn_fwd_block_impl<64>(Q, KT, V, S, O, m, l, nq, nk, D, causal, qpos0, kb);
  } else {
    attn_fwd_block_impl<0>(Q, KT, V, S, O, m, l, nq, nk, D, causal, qpos0, kb);
  }
}

// One query block against one key block, backward. With S = scale Q K^T, P = softmax(S),
// O = P V and D_i = dO_i . O_i:
//   dV += P^T dO,  dP = dO V^T,  dS = P (dP - D),  dQ += scale dS K,  dK += scale dS^T Q.
// P is recomputed from the saved log-sum-exp: P_ij = exp(S_ij - lse_i).
template <int DFIX>
GPT2K_INLINE void attn_bwd_block_impl(const float* __restrict Q, const float* __restrict dO,
                                      const float* __restrict KT, const float* __restrict VT,
                                      const float* __restrict K, const float* __restrict lse,
                                      const float* __restrict Dv, float* __restrict dQ, float* __restrict dK,
                                      float* __restrict dV, int64_t nq, int64_t nk, int64_t Dd, float scale,
                                      bool causal, int64_t qpos0, int64_t kb) {
  const int64_t D = DFIX > 0 ? DFIX : Dd;
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t jlim = qpos0 + i - kb + 1;
    const int64_t jmax = causal && jlim < nk ? jlim : nk;
    if (jmax <= 0) continue;
    const float* __restrict qi = Q + i * D;
    const float* __restrict doi = dO + i * D;
    float s[kBK], dp[kBK];
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) {
      s[j] = 0.0f;
      dp[j] = 0.0f;
    }
    for (int64_t d = 0; d < D; ++d) {
      const float qd = qi[d], gd = doi[d];
      const float* __restrict kt = KT + d * kBK;
      const float* __restrict vt = VT + d * kBK;
#pragma omp simd
      for (int64_t j = 0; j < kBK; ++j) {
        s[j] += qd * kt[j];
        dp[j] += gd * vt[j];
      }
    }
    const float li = lse[i], di = Dv[i];
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) {
      const float p = exp_f(s[j] * scale - li);
      s[j] = p;                            // P_ij
      dp[j] = p * (dp[j] - di) * scale;    // scale dS_ij
    }
    float* __restrict dqi = dQ + i * D;
    for (int64_t j = 0; j < jmax; ++j) {
      const float p = s[j], ds = dp[j];
      float* __restrict dvj = dV + j * D;
      float* __restrict dkj = dK + j * D;
      const float* __restrict kj = K + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        dvj[d] += p * doi[d];
        dkj[d] += ds * qi[d];
        dqi[d] += ds * kj[d];
      }
    }
  }
}

GPT2K_HOT void attn_bwd_block(const float* Q, const float* dO, const float* KT, const float* VT, const float* K,
                              const float* lse, const float* Dv, float* dQ, float* dK, float* dV, int64_t nq,
                              int64_t nk, int64_t D, float scale, bool causal, int64_t qpos0, int64_t kb) {
  if (D == 64) {
    attn_bwd_block_impl<64>(Q, dO, KT, VT, K, lse, Dv, dQ, dK, dV, nq, nk, D, scale, causal, qpos0, kb);
  } else {
    attn_bwd_block_impl<0>(Q, dO, KT, VT, K, lse, Dv, dQ, dK, dV, nq, nk, D, scale, causal, qpos0, kb);
  }
}

// Rows [k0, k0 + nk) of a (Tk, D) matrix, transposed into (D, kBK) and zero-padded.
template <typename T>
void load_transposed(const T* src, float* dst, int64_t k0, int64_t nk, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    float* row = dst + d * kBK;
    for (int64_t j = 0; j < nk; ++j) row[j] = static_cast<float>(src[(k0 + j) * D + d]);
    for (int64_t j = nk; j < kBK; ++j) row[j] = 0.0f;
  }
}

}  // namespace

// ---------------------------------------------------------------- drivers

template <typename T>
void layer_norm_fwd(const T* x, const T* res, const T* w, const T* b, T* y, T* s, float* mean, float* rstd, int64_t N,
                    int64_t C, float eps) {
  const std::vector<float> wf = param_f32(w, C, 1.0f), bf = param_f32(b, C, 0.0f);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    constexpr bool f32 = std::is_same_v<T, float>;
    std::vector<float> xb(f32 ? 0 : C), yb(f32 ? 0 : C), rb(f32 || res == nullptr ? 0 : C);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = res != nullptr ? add_residual(x + r * C, res + r * C, s + r * C, xb.data(), rb.data(), C)
                                       : as_f32(x + r * C, xb.data(), C);
      if constexpr (f32) {
        ln_fwd_row(xr, wf.data(), bf.data(), y + r * C, C, eps, mean + r, rstd + r);
      } else {
        ln_fwd_row(xr, wf.data(), bf.data(), yb.data(), C, eps, mean + r, rstd + r);
        from_f32(yb.data(), y + r * C, C);
      }
    }
  });
}

template <typename T>
void layer_norm_bwd(const T* dy, const T* ds, const T* x, const T* w, const float* mean, const float* rstd, T* dx,
                    float* dw, float* db, int64_t N, int64_t C) {
  const std::vector<float> wf = param_f32(w, C, 1.0f);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(kChunks, N));
  const int64_t per = (N + parts - 1) / parts;
  std::vector<float> dw_part(parts * C, 0.0f), db_part(parts * C, 0.0f);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    constexpr bool f32 = std::is_same_v<T, float>;
    std::vector<float> xb(f32 ? 0 : C), gb(f32 ? 0 : C), ob(f32 ? 0 : C), sb(f32 || ds == nullptr ? 0 : C);
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t r = p * per; r < std::min(N, (p + 1) * per); ++r) {
        const float* xr = as_f32(x + r * C, xb.data(), C);
        const float* gr = as_f32(dy + r * C, gb.data(), C);
        float* out = ob.data();
        if constexpr (f32) out = dx + r * C;
        ln_bwd_row(gr, xr, wf.data(), mean[r], rstd[r], out, &dw_part[p * C], &db_part[p * C], C);
        if (ds != nullptr) add_into(out, as_f32(ds + r * C, sb.data(), C), C);
        if constexpr (!f32) from_f32(ob.data(), dx + r * C, C);
      }
    }
  });
  sum_partials(dw_part, parts, C, dw);
  sum_partials(db_part, parts, C, db);
}

template <typename T>
void bias_gelu_fwd(const T* h, const T* bias, T* act, int64_t N, int64_t H) {
  const std::vector<float> bf = param_f32(bias, H, 0.0f);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    const bool f32 = std::is_same_v<T, float>;
    std::vector<float> hb(f32 ? 0 : H), ob(f32 ? 0 : H);
    for (int64_t r = r0; r < r1; ++r) {
      const float* hr = as_f32(h + r * H, hb.data(), H);
      if constexpr (std::is_same_v<T, float>) {
        gelu_fwd_row(hr, bf.data(), act + r * H, H);
      } else {
        gelu_fwd_row(hr, bf.data(), ob.data(), H);
        from_f32(ob.data(), act + r * H, H);
      }
    }
  });
}

template <typename T>
void bias_gelu_bwd(const T* dact, const T* h, const T* bias, T* dh, float* dbias, int64_t N, int64_t H) {
  const std::vector<float> bf = param_f32(bias, H, 0.0f);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(kChunks, N));
  const int64_t per = (N + parts - 1) / parts;
  std::vector<float> db_part(parts * H, 0.0f);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    const bool f32 = std::is_same_v<T, float>;
    std::vector<float> hb(f32 ? 0 : H), gb(f32 ? 0 : H), ob(f32 ? 0 : H);
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t r = p * per; r < std::min(N, (p + 1) * per); ++r) {
        const float* hr = as_f32(h + r * H, hb.data(), H);
        const float* gr = as_f32(dact + r * H, gb.data(), H);
        if constexpr (std::is_same_v<T, float>) {
          gelu_bwd_row(gr, hr, bf.data(), dh + r * H, &db_part[p * H], H);
        } else {
          gelu_bwd_row(gr, hr, bf.data(), ob.data(), &db_part[p * H], H);
          from_f32(ob.data(), dh + r * H, H);
        }
      }
    }
  });
  sum_partials(db_part, parts, H, dbias);
}

template <typename T>
void cross_entropy(T* logits, const int64_t* targets, float* loss, const float* grad_scale, int64_t N, int64_t V,
                   int64_t ld, int64_t ignore_index) {
  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : V);
    for (int64_t r = r0; r < r1; ++r) {
      T* row = logits + r * ld;
      const int64_t t = targets[r];
      if (t == ignore_index) {
        loss[r] = 0.0f;
        if (grad_scale != nullptr) std::fill(row, row + V, T(0.0f));
        continue;
      }
      if constexpr (std::is_same_v<T, float>) {
        loss[r] = ce_row(row, row, V, t, grad_scale);
      } else {
        to_f32(row, buf.data(), V);
        loss[r] = ce_row(buf.data(), buf.data(), V, t, grad_scale);
        if (grad_scale != nullptr) from_f32(buf.data(), row, V);
      }
    }
  });
}

template <typename T>
void attention_fwd(const T* q, const T* k, const T* v, T* y, float* lse, int64_t BH, int64_t Tq, int64_t Tk,
                   int64_t D, bool causal, int64_t kv_head_stride) {
  const int64_t nqb = (Tq + kBQ - 1) / kBQ;
  const int64_t off = Tk - Tq;  // absolute position of query 0
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, BH * nqb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> Qf(kBQ * D), KT(D * kBK), Vf(kBK * D), S(kBQ * kBK), O(kBQ * D), m(kBQ), l(kBQ);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / nqb, i0 = (task % nqb) * kBQ;
      const int64_t nq = std::min(kBQ, Tq - i0);
      const T* qh = q + (bh * Tq + i0) * D;
      const T* kh = k + bh * kv_head_stride;
      const T* vh = v + bh * kv_head_stride;
      for (int64_t e = 0; e < nq * D; ++e) Qf[e] = static_cast<float>(qh[e]) * scale;
      std::fill(O.begin(), O.end(), 0.0f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      const int64_t kend = causal ? std::min(Tk, off + i0 + nq) : Tk;  // keys the block's last query sees
      for (int64_t kb = 0; kb < kend; kb += kBK) {
        const int64_t nk = std::min(kBK, kend - kb);
        load_transposed(kh, KT.data(), kb, nk, D);
        const float* Vp = as_f32(vh + kb * D, Vf.data(), nk * D);
        attn_fwd_block(Qf.data(), KT.data(), Vp, S.data(), O.data(), m.data(), l.data(), nq, nk, D, causal,
                       off + i0, kb);
      }
      for (int64_t i = 0; i < nq; ++i) {
        const float inv = 1.0f / l[i];
        T* yi = y + (bh * Tq + i0 + i) * D;
        for (int64_t d = 0; d < D; ++d) yi[d] = static_cast<T>(O[i * D + d] * inv);
        lse[bh * Tq + i0 + i] = m[i] + std::log(l[i]);
      }
    }
  });
}

template <typename T>
void attention_bwd(const T* dy, const T* q, const T* k, const T* v, const T* y, const float* lse, T* dq, T* dk,
                   T* dv, int64_t BH, int64_t Tq, int64_t Tk, int64_t D, bool causal) {
  const int64_t off = Tk - Tq;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, BH, 1, [&](int64_t h0, int64_t h1) {
    const bool f32 = std::is_same_v<T, float>;
    std::vector<float> Qb(f32 ? 0 : Tq * D), dOb(f32 ? 0 : Tq * D), Kb(f32 ? 0 : Tk * D);
    std::vector<float> KT(D * kBK), VT(D * kBK), Dv(Tq), dQ(Tq * D), dK(Tk * D), dV(Tk * D), yrow(D);
    for (int64_t bh = h0; bh < h1; ++bh) {
      const float* Q = as_f32(q + bh * Tq * D, Qb.data(), Tq * D);
      const float* dO = as_f32(dy + bh * Tq * D, dOb.data(), Tq * D);
      const float* K = as_f32(k + bh * Tk * D, Kb.data(), Tk * D);
      const T* vh = v + bh * Tk * D;
      const float* L = lse + bh * Tq;
      for (int64_t i = 0; i < Tq; ++i) {  // D_i = dO_i . O_i
        const float* yi = as_f32(y + (bh * Tq + i) * D, yrow.data(), D);
        float s = 0.0f;
        for (int64_t d = 0; d < D; ++d) s += dO[i * D + d] * yi[d];
        Dv[i] = s;
      }
      std::fill(dQ.begin(), dQ.end(), 0.0f);
      std::fill(dK.begin(), dK.end(), 0.0f);
      std::fill(dV.begin(), dV.end(), 0.0f);
      for (int64_t kb = 0; kb < Tk; kb += kBK) {
        const int64_t nk = std::min(kBK, Tk - kb);
        const int64_t ifirst = causal ? std::max<int64_t>(0, kb - off) : 0;  // first query that sees key kb
        if (ifirst >= Tq) break;
        load_transposed(k + bh * Tk * D, KT.data(), kb, nk, D);
        load_transposed(vh, VT.data(), kb, nk, D);
        for (int64_t i0 = ifirst; i0 < Tq; i0 += kBQ) {
          const int64_t nq = std::min(kBQ, Tq - i0);
          attn_bwd_block(Q + i0 * D, dO + i0 * D, KT.data(), VT.data(), K + kb * D, L + i0, Dv.data() + i0,
                         dQ.data() + i0 * D, dK.data() + kb * D, dV.data() + kb * D, nq, nk, D, scale, causal,
                         off + i0, kb);
        }
      }
      from_f32(dQ.data(), dq + bh * Tq * D, Tq * D);
      from_f32(dK.data(), dk + bh * Tk * D, Tk * D);
      from_f32(dV.data(), dv + bh * Tk * D, Tk * D);
    }
  });
}

#define GPT2K_INSTANTIATE(T)                                                                                    \
  template void layer_norm_fwd<T>(const T*, const T*, const T*, const T*, T*, T*, float*, float*, int64_t,      \
                                  int64_t, float);                                                              \
  template void layer_norm_bwd<T>(const T*, const T*, const T*, const T*, const float*, const float*, T*,       \
                                  float*, float*, int64_t, int64_t);                                            \
  template void bias_gelu_fwd<T>(const T*, const T*, T*, int64_t, int64_t);                                     \
  template void bias_gelu_bwd<T>(const T*, const T*, const T*, T*, float*, int64_t, int64_t);                   \
  template void cross_entropy<T>(T*, const int64_t*, float*, const float*, int64_t, int64_t, int64_t, int64_t); \
  template void attention_fwd<T>(const T*, const T*, const T*, T*, float*, int64_t, int64_t, int64_t, int64_t,  \
                                 bool, int64_t);                                                                \
  template void attention_bwd<T>(const T*, const T*, const T*, const T*, const T*, const float*, T*, T*, T*,    \
                                 int64_t, int64_t, int64_t, int64_t, bool);

GPT2K_INSTANTIATE(float)
GPT2K_INSTANTIATE(c10::BFloat16)
GPT2K_INSTANTIATE(c10::Half)

}  // namespace gpt2k::cpu
