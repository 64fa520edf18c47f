// Causal softmax attention forward / backward CUDA kernels (flash-style, plain CUDA, fp32 math).
//
// Tiled over keys with an online softmax: no Tq x Tk matrix is ever written. A warp owns a
// query row (forward, dq) or a key row (dk, dv); its 32 lanes take the 32 keys (or queries) of a
// shared-memory tile for the dot products, and the head dimension (lane + 32 dd) for the
// accumulations, exchanging probabilities by warp shuffles. Tiles are staged in shared memory
// as fp32 (rows padded by one float where lanes read along a row, so no bank conflicts).
// CUDA cores only, no tensor cores: the point is a correct, readable baseline beside the Triton
// kernels, any T (masked tails), head size <= 128, fp32 / fp16 / bf16 in and out.
//
// FLOPs and fewest bytes for BH = B nh heads, Tq = Tk = T, head size D (causal halves the FLOPs):
//   forward: QK^T 2 T^2 D + PV 2 T^2 D = 4 BH T^2 D (x 1/2); bytes: BH (4 T D elements: q, k, v, y; + T fp32 lse)
//   backward: QK^T and dO V^T recomputed in both the dq and the dk/dv kernel, plus dV, dK, dQ:
//   14 BH T^2 D (x 1/2); bytes: BH (8 T D elements: q, k, v, y, dy in, dq, dk, dv out; + 3 T fp32).
// GPT-2 small (BH = 12 B, T = 1024, D = 64): 1.6 GFLOP per sequence forward (causal) against
// ~6.3 MB of bf16 traffic, ~250 FLOP/byte: compute bound, so these CUDA-core kernels are far
// from the tensor-core peak; that is what the Triton backend is for.
#pragma once

#include "common.cuh"
#include "launchers.h"

namespace gpt2k::cuda {

constexpr int kAttnWarps = 4;  // warps per block
constexpr int kAttnTile = 32;  // keys (forward, dq) or queries (dk, dv) per shared tile: one per lane

// Forward. Block (x, bh) handles queries [x BQ, (x + 1) BQ) of head bh; query i sits at absolute
// position off + i (off = Tk - Tq) and, when causal, sees keys 0 .. off + i. Running max m,
// sum l and output acc per row (S = scale q k^T, l = sum exp(S - m), y = acc / l,
// lse = m + log l).
template <typename T, int HS, int RPW>
__global__ void __launch_bounds__(kAttnWarps * 32)
attention_fwd_kernel(const T* __restrict__ q,   // (BH, Tq, D) queries
                     const T* __restrict__ k,   // (BH, Tk, D) keys
                     const T* __restrict__ v,   // (BH, Tk, D) values
                     T* __restrict__ y,         // (BH, Tq, D) output
                     float* __restrict__ lse,   // (BH, Tq) fp32 log-sum-exp of the scaled scores
                     int64_t Tq, int64_t Tk, int D, bool causal, float scale) {
  constexpr int BQ = kAttnWarps * RPW;
  constexpr int DPL = HS / 32;  // head dims per lane
  __shared__ float Qs[BQ][HS];
  __shared__ float Ks[kAttnTile][HS + 1];
  __shared__ float Vs[kAttnTile][HS];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t bh = blockIdx.y, i0 = blockIdx.x * (int64_t)BQ, off = Tk - Tq;
  const T* qh = q + bh * Tq * D;
  const T* kh = k + bh * Tk * D;
  const T* vh = v + bh * Tk * D;
  for (int e = threadIdx.x; e < BQ * HS; e += blockDim.x) {
    const int r = e / HS, d = e % HS;
    const int64_t i = i0 + r;
    Qs[r][d] = (i < Tq && d < D) ? to_float(qh[i * D + d]) * scale : 0.0f;
  }
  float m[RPW], l[RPW], acc[RPW][DPL];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int dd = 0; dd < DPL; ++dd) acc[rr][dd] = 0.0f;
  }
  const int64_t i_last = min(Tq, i0 + BQ) - 1;
  const int64_t kend = causal ? min(Tk, off + i_last + 1) : Tk;  // keys the block's last query sees
  for (int64_t kb = 0; kb < kend; kb += kAttnTile) {
    __syncthreads();  // the previous tile is consumed (and Qs is written on the first pass)
    for (int e = threadIdx.x; e < kAttnTile * HS; e += blockDim.x) {
      const int j = e / HS, d = e % HS;
      const int64_t key = kb + j;
      const bool ok = key < Tk && d < D;
      Ks[j][d] = ok ? to_float(kh[key * D + d]) : 0.0f;
      Vs[j][d] = ok ? to_float(vh[key * D + d]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int r = warp * RPW + rr;
      const int64_t i = i0 + r;
      if (i >= Tq) continue;  // warp-uniform
      const int64_t key = kb + lane;
      const bool valid = key < Tk && (!causal || key <= off + i);
      float s = -INFINITY;
      if (valid) {
        s = 0.0f;
#pragma unroll 16
        for (int d = 0; d < HS; ++d) s += Qs[r][d] * Ks[lane][d];
      }
      const float m_new = fmaxf(m[rr], warp_max(s));
      if (m_new == -INFINITY) continue;  // no visible key in this tile yet (warp-uniform)
      const float corr = __expf(m[rr] - m_new);  // 0 on the first visible tile
      const float p = valid ? __expf(s - m_new) : 0.0f;
      l[rr] = l[rr] * corr + warp_sum(p);
      m[rr] = m_new;
#pragma unroll
      for (int dd = 0; dd < DPL; ++dd) acc[rr][dd] *= corr;
      for (int j = 0; j < kAttnTile; ++j) {
        const float pj = __shfl_sync(kFullMask, p, j);
#pragma unroll
        for (int dd = 0; dd < DPL; ++dd) acc[rr][dd] += pj * Vs[j][lane + 32 * dd];
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int64_t i = i0 + warp * RPW + rr;
    if (i >= Tq) continue;
    const float inv = 1.0f / l[rr];
#pragma unroll
    for (int dd = 0; dd < DPL; ++dd) {
      const int d = lane + 32 * dd;
      if (d < D) y[(bh * Tq + i) * D + d] = from_float<T>(acc[rr][dd] * inv);
    }
    if (lane == 0) lse[bh * Tq + i] = m[rr] + logf(l[rr]);
  }
}

// Backward, with S = scale Q K^T, P = softmax(S) = exp(S - lse), O = P V:
//   dV = P^T dO,   dP = dO V^T,   dS = P (dP - Dv) with Dv_i = dO_i . O_i,
//   dQ = scale dS K,   dK = scale dS^T Q.
// Dv first (one warp per row), then dQ by query rows and dK, dV by key rows, each recomputing P.
template <typename T>
__global__ void attention_bwd_dot_kernel(const T* __restrict__ dy,  // (R, D) upstream gradient, R = BH Tq
                                         const T* __restrict__ y,   // (R, D) forward output
                                         float* __restrict__ dv,    // (R,) fp32 output dO_i . O_i
                                         int64_t R, int D) {
  const int64_t row = blockIdx.x * (int64_t)kAttnWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= R) return;
  float s = 0.0f;
  for (int d = lane; d < D; d += 32) s += to_float(dy[row * D + d]) * to_float(y[row * D + d]);
  s = warp_sum(s);
  if (lane == 0) dv[row] = s;
}

template <typename T, int HS, int RPW>
__global__ void __launch_bounds__(kAttnWarps * 32)
attention_bwd_dq_kernel(const T* __restrict__ dy,       // (BH, Tq, D) upstream gradient
                        const T* __restrict__ q,        // (BH, Tq, D)
                        const T* __restrict__ k,        // (BH, Tk, D)
                        const T* __restrict__ v,        // (BH, Tk, D)
                        const float* __restrict__ lse,  // (BH, Tq) from the forward
                        const float* __restrict__ Dv,   // (BH, Tq) dO_i . O_i
                        T* __restrict__ dq,             // (BH, Tq, D) output
                        int64_t Tq, int64_t Tk, int D, bool causal, float scale) {
  constexpr int BQ = kAttnWarps * RPW;
  constexpr int DPL = HS / 32;
  __shared__ float Qs[BQ][HS];
  __shared__ float dOs[BQ][HS];
  __shared__ float Ks[kAttnTile][HS + 1];
  __shared__ float Vs[kAttnTile][HS + 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t bh = blockIdx.y, i0 = blockIdx.x * (int64_t)BQ, off = Tk - Tq;
  for (int e = threadIdx.x; e < BQ * HS; e += blockDim.x) {
    const int r = e / HS, d = e % HS;
    const int64_t i = i0 + r;
    const bool ok = i < Tq && d < D;
    Qs[r][d] = ok ? to_float(q[(bh * Tq + i) * D + d]) : 0.0f;
    dOs[r][d] = ok ? to_float(dy[(bh * Tq + i) * D + d]) : 0.0f;
  }
  float acc[RPW][DPL], li[RPW], di[RPW];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int64_t i = i0 + warp * RPW + rr;
    li[rr] = i < Tq ? lse[bh * Tq + i] : 0.0f;
    di[rr] = i < Tq ? Dv[bh * Tq + i] : 0.0f;
#pragma unroll
    for (int dd = 0; dd < DPL; ++dd) acc[rr][dd] = 0.0f;
  }
  const int64_t i_last = min(Tq, i0 + BQ) - 1;
  const int64_t kend = causal ? min(Tk, off + i_last + 1) : Tk;
  for (int64_t kb = 0; kb < kend; kb += kAttnTile) {
    __syncthreads();
    for (int e = threadIdx.x; e < kAttnTile * HS; e += blockDim.x) {
      const int j = e / HS, d = e % HS;
      const int64_t key = kb + j;
      const bool ok = key < Tk && d < D;
      Ks[j][d] = ok ? to_float(k[(bh * Tk + key) * D + d]) : 0.0f;
      Vs[j][d] = ok ? to_float(v[(bh * Tk + key) * D + d]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int r = warp * RPW + rr;
      const int64_t i = i0 + r;
      if (i >= Tq) continue;
      const int64_t key = kb + lane;
      const bool valid = key < Tk && (!causal || key <= off + i);
      float s = 0.0f, dp = 0.0f;
#pragma unroll 16
      for (int d = 0; d < HS; ++d) {
        s += Qs[r][d] * Ks[lane][d];
        dp += dOs[r][d] * Vs[lane][d];
      }
      const float p = valid ? __expf(s * scale - li[rr]) : 0.0f;
      const float ds = p * (dp - di[rr]);
      for (int j = 0; j < kAttnTile; ++j) {
        const float dsj = __shfl_sync(kFullMask, ds, j);
#pragma unroll
        for (int dd = 0; dd < DPL; ++dd) acc[rr][dd] += dsj * Ks[j][lane + 32 * dd];
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int64_t i = i0 + warp * RPW + rr;
    if (i >= Tq) continue;
#pragma unroll
    for (int dd = 0; dd < DPL; ++dd) {
      const int d = lane + 32 * dd;
      if (d < D) dq[(bh * Tq + i) * D + d] = from_float<T>(acc[rr][dd] * scale);
    }
  }
}

// Block (x, bh) owns keys [x BK, (x + 1) BK) of head bh (BK = kAttnWarps KPW, KPW per warp) and
// walks the queries that can see them in tiles of 32.
template <typename T, int HS, int KPW>
__global__ void __launch_bounds__(kAttnWarps * 32)
attention_bwd_dkdv_kernel(const T* __restrict__ dy,       // (BH, Tq, D) upstream gradient
                          const T* __restrict__ q,        // (BH, Tq, D)
                          const T* __restrict__ k,        // (BH, Tk, D)
                          const T* __restrict__ v,        // (BH, Tk, D)
                          const float* __restrict__ lse,  // (BH, Tq)
                          const float* __restrict__ Dv,   // (BH, Tq)
                          T* __restrict__ dk,             // (BH, Tk, D) output
                          T* __restrict__ dv,             // (BH, Tk, D) output
                          int64_t Tq, int64_t Tk, int D, bool causal, float scale) {
  constexpr int BK = kAttnWarps * KPW;
  constexpr int DPL = HS / 32;
  __shared__ float Kt[BK][HS];
  __shared__ float Vt[BK][HS];
  __shared__ float Qs[kAttnTile][HS + 1];
  __shared__ float dOs[kAttnTile][HS + 1];
  __shared__ float Ls[kAttnTile];
  __shared__ float Ds[kAttnTile];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t bh = blockIdx.y, kb0 = blockIdx.x * (int64_t)BK, off = Tk - Tq;
  for (int e = threadIdx.x; e < BK * HS; e += blockDim.x) {
    const int r = e / HS, d = e % HS;
    const int64_t key = kb0 + r;
    const bool ok = key < Tk && d < D;
    Kt[r][d] = ok ? to_float(k[(bh * Tk + key) * D + d]) : 0.0f;
    Vt[r][d] = ok ? to_float(v[(bh * Tk + key) * D + d]) : 0.0f;
  }
  float gk[KPW][DPL], gv[KPW][DPL];
#pragma unroll
  for (int kk = 0; kk < KPW; ++kk) {
#pragma unroll
    for (int dd = 0; dd < DPL; ++dd) gk[kk][dd] = gv[kk][dd] = 0.0f;
  }
  const int64_t ifirst = causal ? max((int64_t)0, kb0 - off) : 0;  // first query that sees key kb0
  for (int64_t qb = ifirst; qb < Tq; qb += kAttnTile) {
    __syncthreads();
    for (int e = threadIdx.x; e < kAttnTile * HS; e += blockDim.x) {
      const int r = e / HS, d = e % HS;
      const int64_t i = qb + r;
      const bool ok = i < Tq && d < D;
      Qs[r][d] = ok ? to_float(q[(bh * Tq + i) * D + d]) : 0.0f;
      dOs[r][d] = ok ? to_float(dy[(bh * Tq + i) * D + d]) : 0.0f;
    }
    if (threadIdx.x < kAttnTile) {
      const int64_t i = qb + threadIdx.x;
      Ls[threadIdx.x] = i < Tq ? lse[bh * Tq + i] : 0.0f;
      Ds[threadIdx.x] = i < Tq ? Dv[bh * Tq + i] : 0.0f;
    }
    __syncthreads();
    const int64_t i = qb + lane;
#pragma unroll
    for (int kk = 0; kk < KPW; ++kk) {
      const int r = warp * KPW + kk;
      const int64_t key = kb0 + r;
      if (key >= Tk) continue;  // warp-uniform
      const bool valid = i < Tq && (!causal || key <= off + i);
      float s = 0.0f, dp = 0.0f;
#pragma unroll 16
      for (int d = 0; d < HS; ++d) {
        s += Qs[lane][d] * Kt[r][d];
        dp += dOs[lane][d] * Vt[r][d];
      }
      const float p = valid ? __expf(s * scale - Ls[lane]) : 0.0f;
      const float ds = p * (dp - Ds[lane]);
      for (int j = 0; j < kAttnTile; ++j) {
        const float pj = __shfl_sync(kFullMask, p, j);
        const float dsj = __shfl_sync(kFullMask, ds, j);
#pragma unroll
        for (int dd = 0; dd < DPL; ++dd) {
          gv[kk][dd] += pj * dOs[j][lane + 32 * dd];
          gk[kk][dd] += dsj * Qs[j][lane + 32 * dd];
        }
      }
    }
  }
#pragma unroll
  for (int kk = 0; kk < KPW; ++kk) {
    const int64_t key = kb0 + warp * KPW + kk;
    if (key >= Tk) continue;
#pragma unroll
    for (int dd = 0; dd < DPL; ++dd) {
      const int d = lane + 32 * dd;
      if (d < D) {
        dk[(bh * Tk + key) * D + d] = from_float<T>(gk[kk][dd] * scale);
        dv[(bh * Tk + key) * D + d] = from_float<T>(gv[kk][dd]);
      }
    }
  }
}

template <typename T, int HS>
void attention_fwd_hs(const T* q, const T* k, const T* v, T* y, float* lse, int64_t BH, int64_t Tq, int64_t Tk,
                      int D, bool causal, float scale, cudaStream_t stream) {
  constexpr int RPW = 4;
  const dim3 grid((unsigned)ceil_div(Tq, kAttnWarps * RPW), (unsigned)BH);
  GPT2K_LAUNCH(grid, kAttnWarps * 32, stream, attention_fwd_kernel<T, HS, RPW>)(
      q, k, v, y, lse, Tq, Tk, D, causal, scale);
}

template <typename T, int HS>
void attention_bwd_hs(const T* dy, const T* q, const T* k, const T* v, const float* lse, const float* Dv, T* dq,
                      T* dk, T* dv, int64_t BH, int64_t Tq, int64_t Tk, int D, bool causal, float scale,
                      cudaStream_t stream) {
  constexpr int RPW = 2, KPW = 2;
  const dim3 gq((unsigned)ceil_div(Tq, kAttnWarps * RPW), (unsigned)BH);
  GPT2K_LAUNCH(gq, kAttnWarps * 32, stream, attention_bwd_dq_kernel<T, HS, RPW>)(
      dy, q, k, v, lse, Dv, dq, Tq, Tk, D, causal, scale);
  const dim3 gk((unsigned)ceil_div(Tk, kAttnWarps * KPW), (unsigned)BH);
  GPT2K_LAUNCH(gk, kAttnWarps * 32, stream, attention_bwd_dkdv_kernel<T, HS, KPW>)(
      dy, q, k, v, lse, Dv, dk, dv, Tq, Tk, D, causal, scale);
}

template <typename T>
cudaError_t attention_fwd_launch(const T* q, const T* k, const T* v, T* y, float* lse, int64_t BH, int64_t Tq,
                                 int64_t Tk, int64_t D, bool causal, cudaStream_t stream) {
  if (BH == 0 || Tq == 0) return cudaGetLastError();
  const float scale = 1.0f / sqrtf((float)D);
  if (D <= 64) {
    attention_fwd_hs<T, 64>(q, k, v, y, lse, BH, Tq, Tk, (int)D, causal, scale, stream);
  } else if (D <= kMaxHeadSize) {
    attention_fwd_hs<T, 128>(q, k, v, y, lse, BH, Tq, Tk, (int)D, causal, scale, stream);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t attention_bwd_launch(const T* dy, const T* q, const T* k, const T* v, const T* y, const float* lse,
                                 T* dq, T* dk, T* dv, float* scratch, int64_t BH, int64_t Tq, int64_t Tk, int64_t D,
                                 bool causal, cudaStream_t stream) {
  if (BH == 0) return cudaGetLastError();
  if (Tq == 0) {  // no query: every key and value gradient is 0
    cudaMemsetAsync(dk, 0, sizeof(T) * BH * Tk * D, stream);
    cudaMemsetAsync(dv, 0, sizeof(T) * BH * Tk * D, stream);
    return cudaGetLastError();
  }
  const float scale = 1.0f / sqrtf((float)D);
  float* Dv = scratch;  // (BH, Tq)
  GPT2K_LAUNCH((unsigned)ceil_div(BH * Tq, kAttnWarps), kAttnWarps * 32, stream, attention_bwd_dot_kernel<T>)(
      dy, y, Dv, BH * Tq, (int)D);
  if (D <= 64) {
    attention_bwd_hs<T, 64>(dy, q, k, v, lse, Dv, dq, dk, dv, BH, Tq, Tk, (int)D, causal, scale, stream);
  } else if (D <= kMaxHeadSize) {
    attention_bwd_hs<T, 128>(dy, q, k, v, lse, Dv, dq, dk, dv, BH, Tq, Tk, (int)D, causal, scale, stream);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace gpt2k::cuda
