// The bf16 tile GEMM of forward_amx.cpp / backward_amx.cpp, and the packing it reads. Two builds:
// avx512_amx (-mamx-tile -mamx-bf16 -mavx512bf16) runs it on AMX tiles; avx512_bf16
// (-mavx512bf16, LLMCORE_BF16_DOT) on AVX512-BF16 dot products, for CPUs with those but no AMX
// (AMD Zen 4 and 5, Intel Cooper Lake). Both read the same VNNI-packed operands.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "attention/attention.h"
#include "attention/cpu/simd.h"

namespace llmcore::attention::LLMCORE_ISA_NS {

// Head dims and their AMX padding (K and N of every tile GEMM are multiples of 32).
struct Dims {
  int64_t D, Dv, Dp, Dvp;
};
inline Dims amx_dims(const Problem& p) {
  return {p.head_dim, p.head_dim_v, (p.head_dim + 31) / 32 * 32, (p.head_dim_v + 31) / 32 * 32};
}

#ifndef LLMCORE_BF16_DOT
// Palette 1, every tile 16 rows x 64 bytes. Loaded once per thread per kernel call.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = 16;
    }
  }
};

// Holds the tile configuration for its scope (one per OpenMP thread).
struct TileScope {
  TileScope() {
    static const TileConfig cfg;
    _tile_loadconfig(&cfg);
  }
  ~TileScope() { _tile_release(); }
};

#else
struct TileScope {};  // dot products need no tile state
#endif

// B operand in VNNI blocks: a K x N matrix (K even) stored as N/16 column blocks, each K/2
// rows of 16 (b[2k][n], b[2k+1][n]) pairs: 64 bytes a row, block after block (a block is
// K * 16 elements). The sub-matrix at rows k0.., columns n0.. starts here:
inline const uint16_t* vnni_at(const uint16_t* b, int64_t K, int64_t k0, int64_t n0) {
  return b + (n0 / 16) * K * 16 + k0 * 16;
}

#ifndef LLMCORE_BF16_DOT
// C (M x N fp32, ldc floats) (+)= A (M x K bf16 row-major, lda elements) * B, where B points
// at a VNNI sub-matrix (vnni_at) of a matrix whose blocks are block_stride elements apart.
// M, N and K are multiples of 32; every padded row of A and B must be readable (its
// values only reach the padded part of C).
inline void tile_gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                     int64_t block_stride, float* C, int64_t ldc, bool accumulate) {
  const int64_t sa = lda * 2, sc = ldc * 4;
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      float* c = C + m0 * ldc + n0;
      if (accumulate) {
        _tile_loadd(0, c, sc);
        _tile_loadd(1, c + 16, sc);
        _tile_loadd(2, c + 16 * ldc, sc);
        _tile_loadd(3, c + 16 * ldc + 16, sc);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      const uint16_t* b0 = B + (n0 / 16) * block_stride;
      const uint16_t* b1 = b0 + block_stride;
      const uint16_t* a = A + m0 * lda;
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        _tile_loadd(4, a + k0, sa);
        _tile_loadd(5, a + 16 * lda + k0, sa);
        _tile_loadd(6, b0 + k0 * 16, 64);
        _tile_loadd(7, b1 + k0 * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, sc);
      _tile_stored(1, c + 16, sc);
      _tile_stored(2, c + 16 * ldc, sc);
      _tile_stored(3, c + 16 * ldc + 16, sc);
    }
  }
}

#else
// C (8 rows x NV * 16 columns at c, ldc floats) (+)= A (8 rows at a) * B (NV VNNI column
// blocks from b0, block_stride apart) over K (even): each step over a pair of k broadcasts a
// row's (a[2k], a[2k+1]) against the 16-column VNNI rows of B (vdpbf16ps: both products summed
// in fp32 into the accumulator). Row r's pair k/2 is at a + r * lda + k * KA: KA = 1 for a
// row-major A, 16 for an A read out of a VNNI pack (pairs 32 elements apart).
template <int NV, int KA = 1>
inline void dot_block(int64_t K, const uint16_t* a, int64_t lda, const uint16_t* b0, int64_t block_stride, float* c,
                      int64_t ldc, bool accumulate) {
  constexpr int R = 8;
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2) {
    __m512bh x[NV];
    for (int v = 0; v < NV; ++v) x[v] = (__m512bh)_mm512_loadu_si512(b0 + v * block_stride + k * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + k * KA, sizeof(pair));
      const __m512bh y = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], y, x[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

// tile_gemm's contract on AVX512-BF16, wider than AMX's: M a multiple of 8, N of 16, K of 2
// (the AMX contract's sizes included). C in blocks of 8 rows x 32 columns (16 registers), a last
// block of 16 columns where N needs it. Column blocks are outer, so a block of B (K x 32) stays
// in L1 for all the rows of A.
template <int KA, class AOf>
inline void dot_gemm(int64_t M, int64_t N, int64_t K, const AOf& a_of, int64_t lda, const uint16_t* B,
                     int64_t block_stride, float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    const uint16_t* b0 = B + (n0 / 16) * block_stride;
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      if (N - n0 >= 32)
        dot_block<2, KA>(K, a_of(m0), lda, b0, block_stride, C + m0 * ldc + n0, ldc, accumulate);
      else
        dot_block<1, KA>(K, a_of(m0), lda, b0, block_stride, C + m0 * ldc + n0, ldc, accumulate);
    }
  }
}

inline void tile_gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                      int64_t block_stride, float* C, int64_t ldc, bool accumulate) {
  dot_gemm<1>(M, N, K, [&](int64_t m0) { return A + m0 * lda; }, lda, B, block_stride, C, ldc, accumulate);
}

// C (M x N, ldc floats) (+)= X^T B, with X a K x M matrix VNNI-packed as a B operand (its
// 16-column blocks x_block_stride elements apart; row m of X^T is X's column m) and B as in
// tile_gemm. Same contract as tile_gemm. The backward's dQ = dS K reads dS straight from the
// VNNI pack of its dS^T tile, with no transpose (AMX A tiles must be row-major: no such variant).
inline void tile_gemm_tn(int64_t M, int64_t N, int64_t K, const uint16_t* X, int64_t x_block_stride,
                         const uint16_t* B, int64_t block_stride, float* C, int64_t ldc, bool accumulate) {
  auto a_of = [&](int64_t m0) { return X + (m0 / 16) * x_block_stride + (m0 % 16) * 2; };
  dot_gemm<16>(M, N, K, a_of, 2, B, block_stride, C, ldc, accumulate);
}
#endif

// The sizes tile_gemm's M and N must be multiples of in this build (see its contract above).
#ifndef LLMCORE_BF16_DOT
constexpr int64_t kTileRows = 32, kTileCols = 32;
#else
constexpr int64_t kTileRows = 8, kTileCols = 16;
#endif

// dst[i] = bf16(src[i]) rounded to nearest even (n a multiple of 16).
inline void to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i, reinterpret_cast<const __m512i&>(v));
  }
  if (i < n) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), reinterpret_cast<const __m256i&>(h));
  }
}

// 2^x for the forward's P, which is rounded to bf16 next: a degree-4 polynomial on [-0.5, 0.5]
// (near-minimax for relative error: < 3e-6 evaluated in fp32, against the 2e-3 of bf16's
// rounding) where simd::exp2 takes degree 7 (the same simd::exp2_poly otherwise).
// The row sums take the fp32 values. Outputs against float64 at (4,12,512,64) and (2,4,1025,80),
// causal and not: the same max and rms error to 3 digits as with simd::exp2. AMX forward, builds
// alternating (benchmarks/causal_ratio.py): D 64 -4% to -7%, (1,32,2048,128) -0% to -2%; the
// AVX512-BF16 build on the same Xeon: no change. The backward, which keeps simd::exp2, measured
// no gain from it (exp is a smaller share there).
inline simd::V exp2_for_bf16(simd::V v) {
  static constexpr float kCoef[] = {0.009582852944731712f, 0.055906426161527634f, 0.24024099111557007f,
                                    0.6931241750717163f, 1.f};
  return simd::exp2_poly(v, kCoef);
}

// out[j] = bf16(2^(x[j] * scale - shift)) for j < n and 0 for n <= j < width (a multiple of
// 16); returns the sum of the fp32 values. x is only read: one pass from fp32 scores to the
// bf16 P of the P V GEMM.
inline float exp2_to_bf16(const float* x, int64_t n, int64_t width, float scale, float shift, uint16_t* out) {
  const __m512 c = _mm512_set1_ps(scale), s = _mm512_set1_ps(-shift);
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp2_for_bf16({_mm512_fmadd_ps(_mm512_loadu_ps(x + j), c, s)}).x;
    acc = _mm512_add_ps(acc, e);
    const __m256bh h = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), reinterpret_cast<const __m256i&>(h));
  }
  if (j < n) {
    const __mmask16 live = __mmask16((1u << (n - j)) - 1u);
    const __m512 e = _mm512_maskz_mov_ps(live, exp2_for_bf16({_mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, x + j), c, s)}).x);
    acc = _mm512_add_ps(acc, e);
    const __m256bh h = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), reinterpret_cast<const __m256i&>(h));
    j += 16;
  }
  for (; j < width; j += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_setzero_si256());
  return _mm512_reduce_add_ps(acc);
}

// VNNI-packs rows [0, rows) of a row-major bf16 matrix (ld elements, `cols` columns) as the
// B operand with K = rows: out holds n_pad / 16 blocks of k_pad / 2 pair-rows (k_pad, n_pad
// multiples of 32 covering rows, cols); padding is zero.
inline void pack_vnni_rows(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, int64_t k_pad, int64_t n_pad,
                           uint16_t* out) {
  // Zero only what the loops below leave unwritten: blocks holding padding columns, and in
  // the others the pair-rows from the odd last row on (nothing when rows and cols fill the pack).
  for (int64_t n0 = 0; n0 < n_pad; n0 += 16) {
    const int64_t from = n0 + 16 <= cols ? rows / 2 : 0;
    std::memset(out + n0 * k_pad + from * 32, 0, sizeof(uint16_t) * (k_pad / 2 - from) * 32);
  }
  const int64_t full_cols = cols / 16 * 16;
  for (int64_t r = 0; r + 1 < rows; r += 2) {
    const uint16_t* a = src + r * ld;
    const uint16_t* b = a + ld;
    for (int64_t n = 0; n < full_cols; n += 16) {  // interleave 16 columns of the two rows
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + n));
      const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + n));
      const __m256i lo = _mm256_unpacklo_epi16(x, y), hi = _mm256_unpackhi_epi16(x, y);
      uint16_t* o = out + (n / 16) * k_pad * 16 + (r / 2) * 32;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
  }
  for (int64_t r = 0; r < rows; ++r) {  // the odd last row, and the columns past full_cols
    const int64_t n_from = (rows % 2 == 1 && r == rows - 1) ? 0 : full_cols;
    for (int64_t n = n_from; n < cols; ++n)
      out[(n / 16) * k_pad * 16 + (r / 2) * 32 + (n % 16) * 2 + (r % 2)] = src[r * ld + n];
  }
}

// Rows [0, rows) x columns [0, cols) of src into a zero-padded rows_pad x cols_pad matrix.
inline void copy_padded(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, int64_t rows_pad,
                        int64_t cols_pad, uint16_t* out) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    uint16_t* o = out + r * cols_pad;
    if (r < rows) {
      std::memcpy(o, src + r * ld, sizeof(uint16_t) * cols);
      std::memset(o + cols, 0, sizeof(uint16_t) * (cols_pad - cols));
    } else {
      std::memset(o, 0, sizeof(uint16_t) * cols_pad);
    }
  }
}

// VNNI-packs the transpose of a row-major bf16 matrix: B = src^T, so K = cols (the
// contraction runs along src's rows) and N = rows. Same block layout and padding as above.
// A pair of bf16 along a row is one 32-bit unit, so this is a 32-bit transpose, 16 x 16
// blocks in registers; the last rows (fewer than 16: all of a short sequence) go through a
// zero-padded 16-row copy. Each element is XORed with flip (0x8000 negates a bf16 exactly);
// with a flip, or an odd ld, everything takes the scalar loop.
inline void pack_vnni_transposed(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, int64_t k_pad,
                                 int64_t n_pad, uint16_t* out, uint16_t flip = 0) {
  // Zero only what the loops below leave unwritten: the block of the last rows (fewer than 16)
  // and the blocks past them, and in full blocks the pair-rows from the odd last column on.
  for (int64_t n0 = 0; n0 < n_pad; n0 += 16) {
    const int64_t from = n0 + 16 <= rows ? cols / 2 : 0;
    std::memset(out + n0 * k_pad + from * 32, 0, sizeof(uint16_t) * (k_pad / 2 - from) * 32);
  }
  const bool vector = !flip && ld % 2 == 0;
  const int64_t full_pairs = vector ? cols / 32 * 16 : 0, width = 2 * full_pairs;  // columns done in registers
  auto transpose_rows = [&](const uint16_t* rows16, int64_t ld16, int64_t n0) {
    for (int64_t p0 = 0; p0 < full_pairs; p0 += 16)
      simd::transpose_block(reinterpret_cast<const float*>(rows16 + 2 * p0), ld16 / 2,
                            reinterpret_cast<float*>(out + (n0 / 16) * k_pad * 16 + p0 * 32), 16);
  };
  const int64_t full_rows = rows / 16 * 16;
  for (int64_t n0 = 0; n0 < full_rows && full_pairs > 0; n0 += 16) transpose_rows(src + n0 * ld, ld, n0);
  const bool staged = full_rows < rows && full_pairs > 0 && width <= 256;  // head dims up to 256
  if (staged) {
    alignas(64) uint16_t stage[16 * 256];
    copy_padded(src + full_rows * ld, ld, rows - full_rows, width, 16, width, stage);
    transpose_rows(stage, width, full_rows);
  }
  for (int64_t n = 0; n < rows; ++n) {
    const uint16_t* s = src + n * ld;
    uint16_t* blk = out + (n / 16) * k_pad * 16 + (n % 16) * 2;
    for (int64_t k = n < full_rows || staged ? width : 0; k < cols; ++k) blk[(k / 2) * 32 + (k % 2)] = s[k] ^ flip;
  }
}

// dst = src^T for a row-major bf16 matrix (rows x cols, ld elements; rows a multiple of 16, cols
// of 32, ld even): dst is cols x rows, ldd elements a row. A pair of bf16 along a row is one
// 32-bit unit, so 16 x 16 blocks of pairs transpose in registers; each transposed row of pairs
// then splits into its two output rows (low halves, high halves).
inline void transpose_bf16(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd) {
  alignas(64) float pairs[16 * 16];
  for (int64_t r0 = 0; r0 < rows; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 32) {
      simd::transpose_block(reinterpret_cast<const float*>(src + r0 * ld + c0), ld / 2, pairs, 16);
      for (int64_t q = 0; q < 16; ++q) {  // pairs[q][r] = (src[r0 + r][c0 + 2q], src[r0 + r][c0 + 2q + 1])
        const __m512i v = _mm512_load_si512(pairs + q * 16);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (c0 + 2 * q) * ldd + r0), _mm512_cvtepi32_epi16(v));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (c0 + 2 * q + 1) * ldd + r0),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
      }
    }
}

}  // namespace llmcore::attention::LLMCORE_ISA_NS
