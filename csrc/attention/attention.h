// Parameters of the CPU attention kernels. Everything is raw pointers, sizes and strides:
// the native module never sees a torch tensor.
//
// Layout (dense):  q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), o (B, Hq, Lq, Dv).
// Layout (varlen): q (total_q, Hq, D) with cu_seqlens_q (B + 1); sequence b owns rows
//                  [cu_q[b], cu_q[b+1]); likewise k and v with cu_seqlens_k.
// The last dimension is always contiguous; every other stride is free (0 broadcasts).
// lse is float32: (B, Hq, Lq) dense, (Hq, total_q) varlen; the logsumexp of the scaled scores in
// base 2 (log2 sum_j 2^(log2(e) * s_ij)), -inf on fully masked rows. Only the backward reads it.
#pragma once
#include <cstdint>

namespace llmcore::attention {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };
enum class MaskKind : int { none = 0, boolean = 1, additive = 2 };

struct TensorRef {
  void* data = nullptr;
  int64_t batch_stride = 0;  // ignored for varlen, where rows are addressed through cu_seqlens
  int64_t head_stride = 0;
  int64_t seq_stride = 0;
};

struct Problem {
  DType dtype = DType::f32;
  int64_t batch = 0;  // B, or the number of sequences for varlen
  int64_t heads_q = 0, heads_kv = 0;
  int64_t len_q = 0, len_k = 0;  // per sequence; the maxima for varlen
  int64_t head_dim = 0, head_dim_v = 0;
  const int32_t* cu_seqlens_q = nullptr;  // varlen when non-null
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;  // varlen: rows of q and of k
  float scale = 1.f;
  bool causal = false;
  bool causal_bottom_right = false;  // row i sees keys j <= i + (len_k - len_q); else j <= i
  MaskKind mask_kind = MaskKind::none;
  const void* mask = nullptr;  // bool (uint8) or float32, indexed (b, hq, i, j) through mask_strides
  int64_t mask_strides[4] = {0, 0, 0, 0};
  float dropout_p = 0.f;
  uint64_t seed = 0, offset = 0;  // Philox key and counter offset for dropout
  int num_threads = 0;            // 0: OpenMP's default
};

struct ForwardArgs {
  Problem p;
  TensorRef q, k, v, o;
  float* lse = nullptr;
};

struct BackwardArgs {
  Problem p;
  TensorRef q, k, v, o, dout, dq, dk, dv;
  const float* lse = nullptr;
};

// Entry points; they pick the kernel of the current ISA (common/cpu_features.h).
void forward(const ForwardArgs& args);
void backward(const BackwardArgs& args);

// The dropout keep-mask the kernels use, for tests: keep[r * cols + j] for rows
// [row0, row0 + rows) (the flat lse index) and key columns [0, cols).
void dropout_keep_mask(uint64_t seed, uint64_t offset, float p, int64_t row0, int64_t rows, int64_t cols,
                       uint8_t* keep);

// The same draws as the current ISA's kernels make them (dropout_block, philox.h), for tests:
// columns [col0, col0 + cols) (col0 a multiple of 4), keep[r * cols + j], or keep[j * rows + r]
// when transposed.
void dropout_keep_block(uint64_t seed, uint64_t offset, float p, int64_t row0, int64_t rows, int64_t col0,
                        int64_t cols, bool transposed, uint8_t* keep);

}  // namespace llmcore::attention
