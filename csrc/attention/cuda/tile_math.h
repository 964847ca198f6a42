// Index math of the CUDA attention kernels, kept free of CUDA so that a host program
// (tests/test_attention_cuda.py compiles csrc/attention/cuda/tile_math_test.cpp) can check
// it exhaustively against a brute-force mask on machines without a GPU.
//
// Conventions. Query row i of a sequence sees key j when j < len_k and, if causal,
// j <= i + shift, where shift = len_k - len_q for bottom-right alignment (varlen, as
// FlashAttention >= 2.1) and 0 for top-left (torch's is_causal). Query tiles are kBM rows,
// key tiles kBN columns.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LLMCORE_HD __host__ __device__ __forceinline__
#else
#define LLMCORE_HD inline
#endif

namespace llmcore::attention::cuda {

LLMCORE_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Floor division that is right for negative numerators too.
LLMCORE_HD int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The rows a sequence owns: [start, start + len) of the packed tensor (varlen), or [0, len)
// (dense, cu == nullptr). Inconsistent offsets (negative, decreasing, past `total`) give an
// empty sequence, so a bad cu_seqlens can never send a kernel out of bounds.
struct SeqSpan {
  int64_t start;
  int len;
};

LLMCORE_HD SeqSpan seq_span(const int32_t* cu, int b, int dense_len, int64_t total) {
  if (cu == nullptr) return {0, dense_len};
  const int64_t s = cu[b], e = cu[b + 1];
  if (s < 0 || e < s || e > total) return {0, 0};
  return {s, int(e - s)};
}

// Forward: how many key tiles the query tile starting at row m0 must visit (tiles
// [0, n_tiles)). Rows at or past len_q are not stored, so they do not widen the range.
LLMCORE_HD int fwd_key_tiles(int m0, int bm, int bn, int len_q, int len_k, bool causal, int shift) {
  const int all = ceil_div(len_k, bn);
  if (!causal) return all;
  const int last_row = (m0 + bm < len_q ? m0 + bm : len_q) - 1;
  const int last_key = last_row + shift;  // the last key any row of the tile sees
  if (last_key < 0) return 0;
  const int n = last_key / bn + 1;
  return n < all ? n : all;
}

// Whether the (query tile m0, key tile n0) block needs per-element masking: some key is
// past len_k, or (causal) some key lies right of the first row's diagonal. Rows past len_q
// are ignored: the forward never stores them, and the backward zeroes them through their
// logsumexp.
LLMCORE_HD bool tile_needs_mask(int m0, int n0, int bn, int len_k, bool causal, int shift) {
  if (n0 + bn > len_k) return true;
  return causal && n0 + bn - 1 > m0 + shift;
}

// Backward: the first query tile with a row that sees some key of the tile starting at n0
// (tiles [first, ceil(len_q / bm)) are visited). Row i sees key n0 once i >= n0 - shift.
LLMCORE_HD int bwd_first_query_tile(int n0, int bm, bool causal, int shift) {
  if (!causal) return 0;
  const int first_row = n0 - shift;
  return first_row <= 0 ? 0 : first_row / bm;
}

// Whether query row i sees key j (the per-element rule the masks apply).
LLMCORE_HD bool visible(int i, int j, int len_q, int len_k, bool causal, int shift) {
  return i < len_q && j < len_k && (!causal || j <= i + shift);
}

// Shared-memory tiles are row-major with rows of `cols` 16-bit elements (cols a multiple
// of 64), stored in 16-byte chunks whose index is XOR-ed with the row's low 3 bits, so
// that the 8 rows one ldmatrix phase reads fall in 8 different bank groups.
LLMCORE_HD int swizzle(int row, int col, int cols) {
  const int chunk = (col >> 3) ^ (row & 7);
  return row * cols + chunk * 8 + (col & 7);
}

}  // namespace llmcore::attention::cuda
