// Attention backward, FlashAttention-2 algorithm on mma.sync tensor cores, in three kernels:
//   1. delta = rowsum(dO * O)                                   (fp32, laid out as lse)
//   2. per (key tile of kBN rows, kv head, sequence): K and V stay in shared memory while
//      every query tile that sees them streams through (Q and dO double-buffered), for each
//      query head of the GQA group in turn:
//        P  = 2^(Q K^T * scale * log2 e - lse)        dP = dO V^T
//        dS = P * (dP - delta)
//        dV += P^T dO      dK += dS^T Q                (registers, fp32, whole loop)
//        dQ += dS K                                    (fp32 atomics into dq_accum)
//      so GQA heads never race on dK/dV and no expanded copies are made.
//   3. dq = dq_accum * scale, rounded to the input type.
// Rows whose lse is -inf (nothing visible) get P = 0, hence zero gradients.
//
// Verified: compiles for sm_80 and sm_90a without spills; index math unit-tested on the host;
// on an H200 (sm_90a build) tests/test_attention_cuda.py passes and compute-sanitizer memcheck
// reports no error. Not run on an sm_80 GPU.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "attention/cuda/mma.cuh"
#include "attention/cuda/params.cuh"
#include "attention/cuda/tile_math.h"

namespace llmcore::attention::cuda {

constexpr int cmin(int a, int b) { return a < b ? a : b; }

template <class T, int kD, int kBM, int kBN, int kWarps, int kStages>
struct BwdTraits {
  static constexpr int kThreads = kWarps * 32;
  // S and dP (kBM x kBN): warps in a grid of kWarpsM_S x kWarpsN_S, 32 query rows each
  static constexpr int kWarpsM_S = kBM / 32;
  static constexpr int kWarpsN_S = kWarps / kWarpsM_S;
  static constexpr int kMT_S = 2;
  static constexpr int kSN = kBN / kWarpsN_S;
  static constexpr int kNT_S = kSN / 8;
  // dK and dV (kBN x kD): 32-row slices of keys, the head dim split among the rest (square-ish
  // warp tiles: every dO/Q fragment read from shared memory feeds two MMAs)
  static constexpr int kWarpsN_KV = cmin(kBN / 32, kWarps);
  static constexpr int kWarpsD_KV = kWarps / kWarpsN_KV;
  static constexpr int kKVR = kBN / kWarpsN_KV;
  static constexpr int kMT_KV = kKVR / 16;
  static constexpr int kKVD = kD / kWarpsD_KV;
  static constexpr int kNT_KV = kKVD / 8;
  // dQ (kBM x kD): 16-row slices of queries, the head dim split among the rest, 64 columns at a time
  static constexpr int kWarpsM_Q = cmin(kBM / 16, kWarps);
  static constexpr int kWarpsD_Q = kWarps / kWarpsM_Q;
  static constexpr int kQR = kBM / kWarpsM_Q;
  static constexpr int kMT_Q = kQR / 16;
  static constexpr int kQD = kD / kWarpsD_Q;
  static constexpr int kQC = cmin(kQD, kD > 128 ? 32 : 64);  // fewer live registers beside dK, dV at kD 256
  static constexpr int kNT_Q = kQC / 8;
  // K, V; kStages x (Q, dO); P, dS
  static constexpr int kSmem = (2 * kBN * kD + 2 * kStages * kBM * kD + 2 * kBM * kBN) * int(sizeof(T)) + 1024;

  static_assert(kBM % 32 == 0 && kWarps % kWarpsM_S == 0 && kNT_S % 2 == 0, "S tiling");
  static_assert(kWarps % kWarpsN_KV == 0 && kKVR % 16 == 0 && kNT_KV % 2 == 0, "dK/dV tiling");
  static_assert(kWarps % kWarpsM_Q == 0 && kQR % 16 == 0 && kQD % kQC == 0 && kNT_Q % 2 == 0, "dQ tiling");
  static_assert(kD % 64 == 0 && kBN % 64 == 0 && (kStages == 1 || kStages == 2), "tile shape");
};

// delta = rowsum(dO * O) and, for the same rows, nothing else: one warp per row.
template <class T>
__global__ void __launch_bounds__(128) attention_bwd_delta_kernel(const Params p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqSpan sq = seq_span(p.cu_q, b, p.len_q, p.total_q);
  const T* o = static_cast<const T*>(p.o) + b * p.o_s.batch + h * p.o_s.head + sq.start * p.o_s.row;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_s.batch + h * p.do_s.head + sq.start * p.do_s.row;
  float* delta = p.delta + b * p.lse_s.batch + h * p.lse_s.head + sq.start;
  for (int r = 0; r < 4; ++r) {
    const int i = blockIdx.x * 16 + warp * 4 + r;
    if (i >= sq.len) break;
    float sum = 0.f;
    for (int c = lane * 8; c < p.dv; c += 256) {
      const uint4 ov = *reinterpret_cast<const uint4*>(o + i * p.o_s.row + c);
      const uint4 dv = *reinterpret_cast<const uint4*>(dout + i * p.do_s.row + c);
      const T* oe = reinterpret_cast<const T*>(&ov);
      const T* de = reinterpret_cast<const T*>(&dv);
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += to_float<T>(oe[e]) * to_float<T>(de[e]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) delta[i] = sum;
  }
}

// dq = dq_accum * scale in the input type: one warp per row, 8 columns per lane.
template <class T>
__global__ void __launch_bounds__(128) attention_bwd_dq_kernel(const Params p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqSpan sq = seq_span(p.cu_q, b, p.len_q, p.total_q);
  const float* acc = p.dq_accum + b * p.dqa_s.batch + h * p.dqa_s.head + sq.start * p.dqa_s.row;
  T* dq = static_cast<T*>(p.dq) + b * p.dq_s.batch + h * p.dq_s.head + sq.start * p.dq_s.row;
  for (int r = 0; r < 4; ++r) {
    const int i = blockIdx.x * 16 + warp * 4 + r;
    if (i >= sq.len) break;
    for (int c = lane * 8; c < p.d; c += 256) {
      const float4 x0 = *reinterpret_cast<const float4*>(acc + i * p.dqa_s.row + c);
      const float4 x1 = *reinterpret_cast<const float4*>(acc + i * p.dqa_s.row + c + 4);
      uint4 out;
      out.x = pack2<T>(x0.x * p.scale, x0.y * p.scale);
      out.y = pack2<T>(x0.z * p.scale, x0.w * p.scale);
      out.z = pack2<T>(x1.x * p.scale, x1.y * p.scale);
      out.w = pack2<T>(x1.z * p.scale, x1.w * p.scale);
      *reinterpret_cast<uint4*>(dq + i * p.dq_s.row + c) = out;
    }
  }
}

template <class T, int kD, int kBM, int kBN, int kWarps, int kStages>
__global__ void __launch_bounds__(kWarps * 32) attention_bwd_kernel(const Params p) {
  using Tr = BwdTraits<T, kD, kBM, kBN, kWarps, kStages>;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kMT_S = Tr::kMT_S, kNT_S = Tr::kNT_S;
  constexpr int kMT_KV = Tr::kMT_KV, kNT_KV = Tr::kNT_KV;
  constexpr int kMT_Q = Tr::kMT_Q, kNT_Q = Tr::kNT_Q;

  constexpr int kRB = kD * int(sizeof(T));   // row bytes of K, V, Q, dO tiles
  constexpr int kPB = kBN * int(sizeof(T));  // row bytes of P, dS tiles
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(aligned_smem(smem_raw));  // kBN x kD
  T* sV = sK + kBN * kD;                   // kBN x kD
  T* sQ = sV + kBN * kD;                   // kStages x kBM x kD
  T* sdO = sQ + kStages * kBM * kD;        // kStages x kBM x kD
  T* sP = sdO + kStages * kBM * kD;        // kBM x kBN
  T* sdS = sP + kBM * kBN;                 // kBM x kBN

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n_tile = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const SeqSpan sk = seq_span(p.cu_k, b, p.len_k, p.total_k);
  const int n0 = n_tile * kBN;
  if (n0 >= sk.len) return;
  const SeqSpan sq = seq_span(p.cu_q, b, p.len_q, p.total_q);
  const int shift = p.bottom_right ? sk.len - sq.len : 0;
  const int m_first = bwd_first_query_tile(n0, kBM, p.causal, shift);
  const int per_head = max(0, ceil_div(sq.len, kBM) - m_first);
  const int iters = per_head * p.group;

  const T* q_base = static_cast<const T*>(p.q);
  const T* do_base = static_cast<const T*>(p.dout);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);

  // warp coordinates in the three GEMM layouts
  const int wm_s = warp / Tr::kWarpsN_S, wn_s = warp % Tr::kWarpsN_S;
  const int wk = warp % Tr::kWarpsN_KV, wd = warp / Tr::kWarpsN_KV;
  const int wq = warp % Tr::kWarpsM_Q, wdq = warp / Tr::kWarpsM_Q;

  // per-lane ldmatrix bases (mma.cuh: ldsm_base), named operand_tile
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_chunk = lane >> 4;  // A operand, and B via .trans
  const int b_row = (lane & 7) + (lane >> 4) * 8, b_chunk = (lane >> 3) & 1;  // B operand, and A via .trans
  const uint32_t a_q = ldsm_base<kRB>(smem_addr(sQ), wm_s * 32 + a_row, a_chunk);
  const uint32_t a_do = ldsm_base<kRB>(smem_addr(sdO), wm_s * 32 + a_row, a_chunk);
  const uint32_t b_k = ldsm_base<kRB>(smem_addr(sK), wn_s * Tr::kSN + b_row, b_chunk);
  const uint32_t b_v = ldsm_base<kRB>(smem_addr(sV), wn_s * Tr::kSN + b_row, b_chunk);
  const uint32_t at_p = ldsm_base<kPB>(smem_addr(sP), b_row, b_chunk);
  const uint32_t at_ds = ldsm_base<kPB>(smem_addr(sdS), b_row, b_chunk);
  const uint32_t bt_do = ldsm_base<kRB>(smem_addr(sdO), a_row, a_chunk);
  const uint32_t bt_q = ldsm_base<kRB>(smem_addr(sQ), a_row, a_chunk);
  const uint32_t a_ds = ldsm_base<kPB>(smem_addr(sdS), wq * Tr::kQR + a_row, a_chunk);
  const uint32_t bt_k = ldsm_base<kRB>(smem_addr(sK), a_row, a_chunk);

  float acc_dk[kMT_KV][kNT_KV][4], acc_dv[kMT_KV][kNT_KV][4];
#pragma unroll
  for (int mt = 0; mt < kMT_KV; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT_KV; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[mt][nt][e] = acc_dv[mt][nt][e] = 0.f;

  if (iters > 0) {
    load_tile_async<kBN, kD, kThreads>(sK, k_base + b * p.k_s.batch + hk * p.k_s.head + (sk.start + n0) * p.k_s.row,
                                       p.k_s.row, sk.len - n0, p.d, k_base, tid);
    load_tile_async<kBN, kD, kThreads>(sV, v_base + b * p.v_s.batch + hk * p.v_s.head + (sk.start + n0) * p.v_s.row,
                                       p.v_s.row, sk.len - n0, p.dv, v_base, tid);
  }
  auto load_q = [&](int it, int stage) {
    const int h = hk * p.group + it / per_head;
    const int m0 = (m_first + it % per_head) * kBM;
    const int64_t row = sq.start + m0;
    load_tile_async<kBM, kD, kThreads>(sQ + stage * kBM * kD,
                                       q_base + b * p.q_s.batch + h * p.q_s.head + row * p.q_s.row, p.q_s.row,
                                       sq.len - m0, p.d, q_base, tid);
    load_tile_async<kBM, kD, kThreads>(sdO + stage * kBM * kD,
                                       do_base + b * p.do_s.batch + h * p.do_s.head + row * p.do_s.row, p.do_s.row,
                                       sq.len - m0, p.dv, do_base, tid);
  };
  if (iters > 0) load_q(0, 0);
  cp_async_commit();

  for (int it = 0; it < iters; ++it) {
    const int stage = kStages == 2 ? (it & 1) : 0;
    if (kStages == 2 && it + 1 < iters) {
      load_q(it + 1, stage ^ 1);  // released by the barrier that ended iteration it - 1
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      if (kStages == 1 && it > 0) {
        load_q(it, 0);
        cp_async_commit();
      }
      cp_async_wait<0>();
    }
    const int h = hk * p.group + it / per_head;
    const int m0 = (m_first + it % per_head) * kBM;
    const uint32_t stage_off = stage * kBM * kRB;

    // this lane's rows of S: their lse (+inf where nothing is visible or past the end) and delta
    float lse_r[kMT_S][2], dlt_r[kMT_S][2];
    {
      const float* lse = p.lse + b * p.lse_s.batch + h * p.lse_s.head + sq.start;
      const float* delta = p.delta + b * p.lse_s.batch + h * p.lse_s.head + sq.start;
#pragma unroll
      for (int mt = 0; mt < kMT_S; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = m0 + wm_s * 32 + mt * 16 + g + hf * 8;
          float l = INFINITY, d = 0.f;
          if (i < sq.len) {
            l = lse[i];
            d = delta[i];
            if (l == -INFINITY) l = INFINITY;
          }
          lse_r[mt][hf] = l;
          dlt_r[mt][hf] = d;
        }
    }
    __syncthreads();

    // S = Q K^T and dP = dO V^T for this warp's 32 x kSN block
    float s[kMT_S][kNT_S][4], dp[kMT_S][kNT_S][4];
#pragma unroll
    for (int mt = 0; mt < kMT_S; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT_S; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = dp[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t aq[kMT_S][4], ado[kMT_S][4];
#pragma unroll
      for (int mt = 0; mt < kMT_S; ++mt) {
        ldmatrix_x4(aq[mt], ldsm_at<kRB>(a_q + stage_off, mt * 16, kk * 2));
        ldmatrix_x4(ado[mt], ldsm_at<kRB>(a_do + stage_off, mt * 16, kk * 2));
      }
#pragma unroll
      for (int np = 0; np < kNT_S / 2; ++np) {
        uint32_t bk[4], bv[4];
        ldmatrix_x4(bk, ldsm_at<kRB>(b_k, np * 16, kk * 2));
        ldmatrix_x4(bv, ldsm_at<kRB>(b_v, np * 16, kk * 2));
#pragma unroll
        for (int mt = 0; mt < kMT_S; ++mt) {
          mma_16816<T>(s[mt][2 * np], aq[mt], bk[0], bk[1]);
          mma_16816<T>(s[mt][2 * np + 1], aq[mt], bk[2], bk[3]);
          mma_16816<T>(dp[mt][2 * np], ado[mt], bv[0], bv[1]);
          mma_16816<T>(dp[mt][2 * np + 1], ado[mt], bv[2], bv[3]);
        }
      }
    }

    // P and dS, stored to shared memory as the 16-bit operands of the next three products
    const bool need_mask = tile_needs_mask(m0, n0, kBN, sk.len, p.causal, shift);
#pragma unroll
    for (int mt = 0; mt < kMT_S; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT_S; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hf = e >> 1;
          float pv = fast_exp2(s[mt][nt][e] * p.scale_log2 - lse_r[mt][hf]);
          if (need_mask) {
            const int i = m0 + wm_s * 32 + mt * 16 + g + hf * 8;
            const int j = n0 + wn_s * Tr::kSN + nt * 8 + 2 * t + (e & 1);
            if (j >= sk.len || (p.causal && j > i + shift)) pv = 0.f;
          }
          s[mt][nt][e] = pv;
          dp[mt][nt][e] = pv * (dp[mt][nt][e] - dlt_r[mt][hf]);
        }
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int r = wm_s * 32 + mt * 16 + g + hf * 8;
          const int c = wn_s * Tr::kSN + nt * 8 + 2 * t;
          *reinterpret_cast<uint32_t*>(sP + swizzle(r, c, kBN)) = pack2<T>(s[mt][nt][2 * hf], s[mt][nt][2 * hf + 1]);
          *reinterpret_cast<uint32_t*>(sdS + swizzle(r, c, kBN)) =
              pack2<T>(dp[mt][nt][2 * hf], dp[mt][nt][2 * hf + 1]);
        }
      }
    __syncthreads();

    // dV += P^T dO and dK += dS^T Q (the transposes come from ldmatrix.trans)
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      uint32_t ap[kMT_KV][4], ads[kMT_KV][4];
#pragma unroll
      for (int mt = 0; mt < kMT_KV; ++mt) {  // rows: queries kk*16.., columns: this warp's keys
        const int key_chunk = (wk * Tr::kKVR + mt * 16) / 8;
        ldmatrix_x4_trans(ap[mt], ldsm_at<kPB>(at_p, kk * 16, key_chunk));
        ldmatrix_x4_trans(ads[mt], ldsm_at<kPB>(at_ds, kk * 16, key_chunk));
      }
#pragma unroll
      for (int np = 0; np < kNT_KV / 2; ++np) {
        const int d_chunk = (wd * Tr::kKVD) / 8 + np * 2;
        uint32_t bo[4], bq[4];
        ldmatrix_x4_trans(bo, ldsm_at<kRB>(bt_do + stage_off, kk * 16, d_chunk));
        ldmatrix_x4_trans(bq, ldsm_at<kRB>(bt_q + stage_off, kk * 16, d_chunk));
#pragma unroll
        for (int mt = 0; mt < kMT_KV; ++mt) {
          mma_16816<T>(acc_dv[mt][2 * np], ap[mt], bo[0], bo[1]);
          mma_16816<T>(acc_dv[mt][2 * np + 1], ap[mt], bo[2], bo[3]);
          mma_16816<T>(acc_dk[mt][2 * np], ads[mt], bq[0], bq[1]);
          mma_16816<T>(acc_dk[mt][2 * np + 1], ads[mt], bq[2], bq[3]);
        }
      }
    }

    // dQ += dS K, added to the fp32 accumulator in global memory
    float* dqa = p.dq_accum + b * p.dqa_s.batch + h * p.dqa_s.head + sq.start * p.dqa_s.row;
#pragma unroll
    for (int chunk = 0; chunk < Tr::kQD / Tr::kQC; ++chunk) {
      const int col0 = wdq * Tr::kQD + chunk * Tr::kQC;
      float dq[kMT_Q][kNT_Q][4];
#pragma unroll
      for (int mt = 0; mt < kMT_Q; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNT_Q; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) dq[mt][nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t a[kMT_Q][4];
#pragma unroll
        for (int mt = 0; mt < kMT_Q; ++mt) ldmatrix_x4(a[mt], ldsm_at<kPB>(a_ds, mt * 16, kk * 2));
#pragma unroll
        for (int np = 0; np < kNT_Q / 2; ++np) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, ldsm_at<kRB>(bt_k, kk * 16, col0 / 8 + np * 2));
#pragma unroll
          for (int mt = 0; mt < kMT_Q; ++mt) {
            mma_16816<T>(dq[mt][2 * np], a[mt], bk[0], bk[1]);
            mma_16816<T>(dq[mt][2 * np + 1], a[mt], bk[2], bk[3]);
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < kMT_Q; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = m0 + wq * Tr::kQR + mt * 16 + g + hf * 8;
          if (i >= sq.len) continue;
#pragma unroll
          for (int nt = 0; nt < kNT_Q; ++nt) {
            const int c = col0 + nt * 8 + 2 * t;
            if (c < p.d) {
              atomicAdd(dqa + i * p.dqa_s.row + c, dq[mt][nt][2 * hf]);
              atomicAdd(dqa + i * p.dqa_s.row + c + 1, dq[mt][nt][2 * hf + 1]);
            }
          }
        }
    }
    __syncthreads();  // P, dS and this stage of Q, dO are overwritten next
  }

  // dV and dK (times the softmax scale) for this tile's keys
  T* dv = static_cast<T*>(p.dv_out) + b * p.dv_s.batch + hk * p.dv_s.head + (sk.start + n0) * p.dv_s.row;
  T* dk = static_cast<T*>(p.dk) + b * p.dk_s.batch + hk * p.dk_s.head + (sk.start + n0) * p.dk_s.row;
#pragma unroll
  for (int mt = 0; mt < kMT_KV; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = wk * Tr::kKVR + mt * 16 + g + hf * 8;
      if (n0 + r >= sk.len) continue;
#pragma unroll
      for (int nt = 0; nt < kNT_KV; ++nt) {
        const int c = wd * Tr::kKVD + nt * 8 + 2 * t;
        if (c < p.dv)
          *reinterpret_cast<uint32_t*>(dv + r * p.dv_s.row + c) =
              pack2<T>(acc_dv[mt][nt][2 * hf], acc_dv[mt][nt][2 * hf + 1]);
        if (c < p.d)
          *reinterpret_cast<uint32_t*>(dk + r * p.dk_s.row + c) =
              pack2<T>(acc_dk[mt][nt][2 * hf] * p.scale, acc_dk[mt][nt][2 * hf + 1] * p.scale);
      }
    }
}

template <class T, int kD, int kBM, int kBN, int kWarps, int kStages>
std::string launch_backward(const Params& p, cudaStream_t stream) {
  using Tr = BwdTraits<T, kD, kBM, kBN, kWarps, kStages>;
  static std::atomic<uint64_t> smem_set{0};
  auto kernel = attention_bwd_kernel<T, kD, kBM, kBN, kWarps, kStages>;
  cudaError_t err = allow_smem(reinterpret_cast<const void*>(kernel), Tr::kSmem, smem_set);
  if (err != cudaSuccess) return error_text(err, "attention backward: setting shared memory");
  const dim3 rows(ceil_div(p.len_q, 16), p.heads_q, p.batch);
  attention_bwd_delta_kernel<T><<<rows, 128, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return error_text(err, "attention backward: delta launch");
  kernel<<<dim3(ceil_div(p.len_k, kBN), p.heads_kv, p.batch), Tr::kThreads, Tr::kSmem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return error_text(err, "attention backward: launch");
  attention_bwd_dq_kernel<T><<<rows, 128, 0, stream>>>(p);
  return error_text(cudaGetLastError(), "attention backward: dq launch");
}

}  // namespace llmcore::attention::cuda
