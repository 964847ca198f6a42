// Attention forward, FlashAttention-2 algorithm (Dao, 2023) on mma.sync tensor cores.
//
// One CTA computes kBM query rows of one (sequence, head): Q stays in shared memory, K and V
// tiles of kBN keys stream through a two-stage cp.async pipeline (tile n + 1 loads while
// tile n is used), and each warp owns kBM / kWarps rows, so the online softmax is warp-local:
//   S = Q K^T * scale * log2(e)            (registers, fp32)
//   m' = max(m, rowmax S);  P = 2^(S - m');  l' = l 2^(m - m') + rowsum P
//   O' = O 2^(m - m') + P V                (P rounded to bf16/fp16 as in FlashAttention)
// and at the end O / l and lse = m + log2 l, the base-2 logsumexp the CPU kernels save too.
// Rows that see no key return 0 with lse = -inf. Causal tiles past the diagonal are never
// loaded; only the tiles that straddle it (or the end of the keys) are masked per element.
//
// Verified: compiles for sm_80 and sm_90a (SASS holds HMMA, LDGSTS, LDSM); the index math is
// unit-tested on the host (tile_math_test.cpp); on an H200 (sm_90a build, torch 2.11) the tests
// of tests/test_attention_cuda.py pass and compute-sanitizer memcheck reports no error. Not run
// on an sm_80 GPU. The sm_90a build is this same mma.sync code: no wgmma, TMA or warp
// specialization, so it runs at FlashAttention-2 speed (benchmarks/results/attention-cuda-h200.json).
// The head-dim-128 kernel spills a few registers (84 bytes on sm_90a): measured, its 128x64
// tiles still beat the spill-free 128x32 ones by 6%.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "attention/cuda/mma.cuh"
#include "attention/cuda/params.cuh"
#include "attention/cuda/tile_math.h"

namespace llmcore::attention::cuda {

template <class T, int kD, int kBM, int kBN, int kWarps>
struct FwdTraits {
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBM / kWarps;  // query rows per warp
  static constexpr int kMT = kWarpRows / 16;      // 16-row MMA tiles per warp
  static constexpr int kNT = kBN / 8;             // 8-column tiles of S
  static constexpr int kDT = kD / 8;              // 8-column tiles of O
  static constexpr int kRowBytes = kD * int(sizeof(T));
  static constexpr int kSmem = (kBM * kD + 4 * kBN * kD) * int(sizeof(T)) + 1024;  // Q + 2 x (K, V) + alignment
  static_assert(kWarpRows % 16 == 0 && kD % 64 == 0 && kBN % 16 == 0, "tile shape");
};

template <class T, int kD, int kBM, int kBN, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) attention_fwd_kernel(const Params p) {
  using Tr = FwdTraits<T, kD, kBM, kBN, kWarps>;
  constexpr int kMT = Tr::kMT, kNT = Tr::kNT, kDT = Tr::kDT, kThreads = Tr::kThreads;

  constexpr int kRB = Tr::kRowBytes;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(aligned_smem(smem_raw));  // kBM x kD; reused for O at the end
  T* sK = sQ + kBM * kD;                   // 2 stages x kBN x kD
  T* sV = sK + 2 * kBN * kD;               // 2 stages x kBN x kD

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int m_tile = gridDim.x - 1 - blockIdx.x;  // causal: the longest rows start first
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqSpan sq = seq_span(p.cu_q, b, p.len_q, p.total_q);
  const int m0 = m_tile * kBM;
  if (m0 >= sq.len) return;
  const SeqSpan sk = seq_span(p.cu_k, b, p.len_k, p.total_k);
  const int shift = p.bottom_right ? sk.len - sq.len : 0;
  const int hk = h / p.group;

  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);
  const T* q = q_base + b * p.q_s.batch + h * p.q_s.head + (sq.start + m0) * p.q_s.row;
  const T* k = k_base + b * p.k_s.batch + hk * p.k_s.head + sk.start * p.k_s.row;
  const T* v = v_base + b * p.v_s.batch + hk * p.v_s.head + sk.start * p.v_s.row;
  const int n_tiles = fwd_key_tiles(m0, kBM, kBN, sq.len, sk.len, p.causal, shift);

  auto load_kv = [&](int n, int stage) {
    const int n0 = n * kBN;
    load_tile_async<kBN, kD, kThreads>(sK + stage * kBN * kD, k + n0 * p.k_s.row, p.k_s.row, sk.len - n0, p.d,
                                       k_base, tid);
    load_tile_async<kBN, kD, kThreads>(sV + stage * kBN * kD, v + n0 * p.v_s.row, p.v_s.row, sk.len - n0, p.dv,
                                       v_base, tid);
  };

  load_tile_async<kBM, kD, kThreads>(sQ, q, p.q_s.row, sq.len - m0, p.d, q_base, tid);
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  float acc[kMT][kDT][4];
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][dt][e] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }
  const int warp_row0 = warp * Tr::kWarpRows;
  // per-lane ldmatrix bases: Q (A operand), K (B, keys as rows), V (B via .trans)
  const uint32_t q_lane = ldsm_base<kRB>(smem_addr(sQ), warp_row0 + (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
  const uint32_t k_lane = ldsm_base<kRB>(smem_addr(sK), (lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);
  const uint32_t v_lane = ldsm_base<kRB>(smem_addr(sV), (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);

  for (int n = 0; n < n_tiles; ++n) {
    const int stage = n & 1;
    if (n + 1 < n_tiles) {
      load_kv(n + 1, stage ^ 1);  // that stage was released by the barrier ending iteration n - 1
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint32_t k_stage = k_lane + stage * kBN * kRB, v_stage = v_lane + stage * kBN * kRB;

    // S = Q K^T
    float s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) ldmatrix_x4(a[mt], ldsm_at<kRB>(q_lane, mt * 16, kk * 2));
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bk[4];
        ldmatrix_x4(bk, ldsm_at<kRB>(k_stage, np * 16, kk * 2));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(s[mt][2 * np], a[mt], bk[0], bk[1]);
          mma_16816<T>(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // scale into the log2 domain, then mask the tiles that straddle the diagonal or the end
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] *= p.scale_log2;
    if (tile_needs_mask(m0, n * kBN, kBN, sk.len, p.causal, shift)) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = m0 + warp_row0 + mt * 16 + g + (e >> 1) * 8;
            const int j = n * kBN + nt * 8 + 2 * t + (e & 1);
            if (j >= sk.len || (p.causal && j > i + shift)) s[mt][nt][e] = -INFINITY;
          }
    }

    // online softmax; the four lanes of a quad share each row
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = row_max[mt][hf];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hf], s[mt][nt][2 * hf + 1]));
        mx = quad_max(mx);
        const float m_use = mx == -INFINITY ? 0.f : mx;  // a row with nothing visible yet stays 0
        const float alpha = fast_exp2(row_max[mt][hf] - m_use);
        row_max[mt][hf] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 2 * hf; e < 2 * hf + 2; ++e) {
            s[mt][nt][e] = fast_exp2(s[mt][nt][e] - m_use);
            sum += s[mt][nt][e];
          }
        row_sum[mt][hf] = row_sum[mt][hf] * alpha + sum;  // per lane; reduced over the quad at the end
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          acc[mt][dt][2 * hf] *= alpha;
          acc[mt][dt][2 * hf + 1] *= alpha;
        }
      }

    // O += P V, P straight from the S accumulators (packed to 16 bits first: half the registers)
    uint32_t pa[kBN / 16][kMT][4];
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk)
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        pa[kk][mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[kk][mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[kk][mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[kk][mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t (&a)[kMT][4] = pa[kk];
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, ldsm_at<kRB>(v_stage, kk * 16, dp * 2));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(acc[mt][2 * dp], a[mt], bv[0], bv[1]);
          mma_16816<T>(acc[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // Epilogue: O / l through shared memory (coalesced 16-byte stores), lse per row.
  cp_async_wait<0>();  // the Q copy is still in flight when no key tile was visited
  __syncthreads();
  float* lse = p.lse + b * p.lse_s.batch + h * p.lse_s.head + sq.start;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float l = quad_sum(row_sum[mt][hf]);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int r = warp_row0 + mt * 16 + g + hf * 8;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt)
        *reinterpret_cast<uint32_t*>(sQ + swizzle(r, dt * 8 + 2 * t, kD)) =
            pack2<T>(acc[mt][dt][2 * hf] * inv, acc[mt][dt][2 * hf + 1] * inv);
      if (t == 0 && m0 + r < sq.len) lse[m0 + r] = l > 0.f ? row_max[mt][hf] + log2f(l) : -INFINITY;
    }
  __syncthreads();
  T* o = static_cast<T*>(p.o) + b * p.o_s.batch + h * p.o_s.head + (sq.start + m0) * p.o_s.row;
  constexpr int kChunks = kD / 8;
#pragma unroll
  for (int it = 0; it < kBM * kChunks / kThreads; ++it) {
    const int idx = tid + it * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    if (r < sq.len - m0 && c * 8 < p.dv)
      *reinterpret_cast<uint4*>(o + r * p.o_s.row + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + r * kD + ((c ^ (r & 7)) * 8));
  }
}

template <class T, int kD, int kBM, int kBN, int kWarps>
std::string launch_forward(const Params& p, cudaStream_t stream) {
  using Tr = FwdTraits<T, kD, kBM, kBN, kWarps>;
  static std::atomic<uint64_t> smem_set{0};
  auto kernel = attention_fwd_kernel<T, kD, kBM, kBN, kWarps>;
  cudaError_t err = allow_smem(reinterpret_cast<const void*>(kernel), Tr::kSmem, smem_set);
  if (err != cudaSuccess) return error_text(err, "attention forward: setting shared memory");
  const dim3 grid(ceil_div(p.len_q, kBM), p.heads_q, p.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(p);
  return error_text(cudaGetLastError(), "attention forward: launch");
}

}  // namespace llmcore::attention::cuda
