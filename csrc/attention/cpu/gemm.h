// Register-blocked fp32 GEMM for the attention tiles: C[M x N] (+)= A[M x K] * B[K x N].
// A is row-major (lda), or with AT its transpose is (A[m][k] at A[k * lda + m]); it is read one
// element at a time and broadcast. B is read in column blocks of simd::MR x (NV * W) (see
// BlockB); C is row-major (ldc).
#pragma once
#include <algorithm>
#include <cstdint>

#include "attention/cpu/simd.h"

namespace llmcore::attention::LLMCORE_ISA_NS {

namespace sv = simd;
constexpr int NR = sv::NV * sv::W;  // columns of one micro-kernel block, and the width of packed panels
// Longest run of K one micro-kernel call sums before adding into C: it bounds fp32 rounding
// on long dot products (head dim 256, key tiles) at a few percent of extra C traffic.
constexpr int64_t kChainK = 32;
// Products over the head dim (scores, dP) are short sums of similar terms: one chain up to
// 128 saves the C round trips (~10% of those GEMMs at D = 128) and stayed inside the tests'
// error bound. D_i must then round like dP: see rowwise_dot_like_gemm.
constexpr int64_t kHeadDimChainK = 128;

// Where column block [n0, n0 + NR) of B lives: a pointer and the stride between its rows.
struct BlockB {
  const float* ptr;
  int64_t ld;
};

// B row-major with leading dimension ld.
struct RowMajorB {
  const float* b;
  int64_t ld;
  BlockB operator()(int64_t n0) const { return {b + n0, ld}; }
  int64_t contiguous_cols(int64_t) const { return NR; }
};

// B packed in panels of `width` columns (NR, or less for a matrix narrower than NR): panel p
// holds columns [p * width, p * width + width) as a K x width row-major block, panel after
// panel. col0 is the first column of the GEMM, anywhere in a panel.
struct PanelB {
  const float* b;
  int64_t k_total;  // rows of each panel
  int64_t col0;
  int64_t width = NR;
  BlockB operator()(int64_t n0) const {
    const int64_t c = col0 + n0;
    return {b + (c / width) * k_total * width + c % width, width};
  }
  // Columns from n0 to the end of its panel: a micro-kernel block must not cross panels.
  int64_t contiguous_cols(int64_t n0) const { return width - (col0 + n0) % width; }
};

// Fully unrolled so the compiler keeps the R x NVec accumulators in registers (GCC otherwise
// mirrors an accumulator array to the stack on every k step).
#define LLMCORE_UNROLL _Pragma("GCC unroll 16")

template <bool AT, int R, int NVec>
inline void micro_kernel(int64_t K, const float* A, int64_t lda, BlockB B, float* C, int64_t ldc, int tail,
                         bool accumulate) {
  // The products start from zero and C is added last: a block of K terms then rounds like
  // one chain of K plus one addition, and the driver's K blocking bounds the chain.
  sv::V acc[R][NVec];
  LLMCORE_UNROLL for (int r = 0; r < R; ++r)
    LLMCORE_UNROLL for (int v = 0; v < NVec; ++v) acc[r][v] = sv::zero();
  const float* b = B.ptr;
  for (int64_t k = 0; k < K; ++k, b += B.ld) {
    sv::V bv[NVec];
    LLMCORE_UNROLL for (int v = 0; v < NVec; ++v)
      bv[v] = (v == NVec - 1) ? sv::load(b + v * sv::W, tail) : sv::load(b + v * sv::W);
    LLMCORE_UNROLL for (int r = 0; r < R; ++r) {
      const sv::V a = sv::set1(AT ? A[k * lda + r] : A[r * lda + k]);
      LLMCORE_UNROLL for (int v = 0; v < NVec; ++v) acc[r][v] = sv::fmadd(a, bv[v], acc[r][v]);
    }
  }
  LLMCORE_UNROLL for (int r = 0; r < R; ++r) {
    LLMCORE_UNROLL for (int v = 0; v < NVec; ++v) {
      float* c = C + r * ldc + v * sv::W;
      const bool last = v == NVec - 1;
      if (accumulate) acc[r][v] = sv::add(acc[r][v], last ? sv::load(c, tail) : sv::load(c));
      if (last) sv::store(c, acc[r][v], tail);
      else sv::store(c, acc[r][v]);
    }
  }
}

template <bool AT, int R>
inline void micro_kernel_rows(int nvec, int64_t K, const float* A, int64_t lda, BlockB B, float* C, int64_t ldc,
                              int tail, bool accumulate) {
  static_assert(sv::NV <= 4, "extend the switch below");
  switch (nvec) {
    case 1: micro_kernel<AT, R, 1>(K, A, lda, B, C, ldc, tail, accumulate); break;
    case 2: if constexpr (sv::NV >= 2) micro_kernel<AT, R, 2>(K, A, lda, B, C, ldc, tail, accumulate); break;
    case 3: if constexpr (sv::NV >= 3) micro_kernel<AT, R, 3>(K, A, lda, B, C, ldc, tail, accumulate); break;
    case 4: if constexpr (sv::NV >= 4) micro_kernel<AT, R, 4>(K, A, lda, B, C, ldc, tail, accumulate); break;
  }
}

template <bool AT, int R = sv::MR>
inline void micro_kernel_dispatch(int rows, int nvec, int64_t K, const float* A, int64_t lda, BlockB B, float* C,
                                  int64_t ldc, int tail, bool accumulate) {
  if constexpr (R >= 1) {
    if (rows == R) return micro_kernel_rows<AT, R>(nvec, K, A, lda, B, C, ldc, tail, accumulate);
    if constexpr (R > 1) micro_kernel_dispatch<AT, R - 1>(rows, nvec, K, A, lda, B, C, ldc, tail, accumulate);
  }
}

// C (+)= A * B for M x N x K. With K == 0 and accumulate == false, C is zeroed.
// out[r] = sum_k a[r][k] * b[r][k] for n rows (row strides lda, ldb), each rounded exactly as
// gemm() rounds one element of a product with this K. Eight rows at a time keep eight
// independent FMA chains in flight.
inline void rowwise_dot_like_gemm(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t K,
                                  float* out, int64_t chain) {
  constexpr int R = 8;
  for (int64_t r0 = 0; r0 < n; r0 += R) {
    const int rows = int(std::min<int64_t>(R, n - r0));
    float total[R] = {}, acc[R];
    for (int64_t k0 = 0; k0 < K; k0 += chain) {
      for (int r = 0; r < R; ++r) acc[r] = 0.f;
      const int64_t k1 = std::min(K, k0 + chain);
      for (int64_t k = k0; k < k1; ++k)
        for (int r = 0; r < rows; ++r) acc[r] = sv::madd(a[(r0 + r) * lda + k], b[(r0 + r) * ldb + k], acc[r]);
      for (int r = 0; r < rows; ++r) total[r] = k0 == 0 ? acc[r] : acc[r] + total[r];
    }
    for (int r = 0; r < rows; ++r) out[r0 + r] = total[r];
  }
}

// Every row block takes all N columns and all of K.
struct Whole {
  int64_t operator()(int64_t, int64_t) const { return INT64_MAX; }
};

// cols(m0, mb) and depth(m0, mb) may limit the columns and the K extent the row block of mb rows
// at m0 needs (a causal diagonal tile: each block stops at what its last row sees). A limited
// block computes what one gemm() call of its own limits would, in the same order, while the
// chunk of B stays in L1 for all row blocks. A block whose depth ends before a K chunk skips it
// (it must then accumulate). gemm<true> reads A transposed (see the top of this file).
template <bool AT = false, class BAt, class Cols = Whole, class Depth = Whole>
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const BAt& b_at, float* C, int64_t ldc,
                 bool accumulate, int64_t chain = kChainK, const Cols& cols = {}, const Depth& depth = {}) {
  for (int64_t n0 = 0, nb = 0; n0 < N; n0 += nb) {
    nb = std::min<int64_t>({NR, N - n0, b_at.contiguous_cols(n0)});
    const BlockB B = b_at(n0);
    // K chunk outside the row blocks: the chunk of B (chain x NR) stays in L1 for all rows.
    for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += chain) {
      const int64_t kb = std::min(chain, K - k0);
      const BlockB Bk{B.ptr + k0 * B.ld, B.ld};
      for (int64_t m0 = 0; m0 < M; m0 += sv::MR) {
        const int mb = int(std::min<int64_t>(sv::MR, M - m0));
        const int64_t nc = std::min(nb, cols(m0, mb) - n0);
        const int64_t kc = std::min(kb, depth(m0, mb) - k0);
        if (nc <= 0 || (kc <= 0 && (k0 > 0 || accumulate))) continue;
        const int nvec = int((nc + sv::W - 1) / sv::W);
        const int tail = int(nc - (nvec - 1) * sv::W);
        const float* a = AT ? A + k0 * lda + m0 : A + m0 * lda + k0;
        micro_kernel_dispatch<AT>(mb, nvec, std::max<int64_t>(kc, 0), a, lda, Bk, C + m0 * ldc + n0, ldc, tail,
                                  accumulate || k0 > 0);
      }
    }
  }
}

}  // namespace llmcore::attention::LLMCORE_ISA_NS
