// Shared pieces of the per-ISA attention kernels: addressing, dtype conversion, masks.
#pragma once
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cfloat>
#include <cstring>

#include "attention/attention.h"
#include "attention/cpu/gemm.h"
#include "attention/cpu/philox.h"
#include "attention/cpu/row_ops.h"
#include "common/scratch.h"

namespace llmcore::attention::LLMCORE_ISA_NS {

constexpr float kLog2e = 1.4426950408889634f;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// One sequence of the batch: where its rows start and how many there are.
struct Seq {
  int64_t q_row0, k_row0;  // varlen: first token in the packed tensors; dense: 0
  int64_t len_q, len_k;
};

inline Seq sequence(const Problem& p, int64_t b) {
  if (p.cu_seqlens_q) {
    const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    return {q0, k0, p.cu_seqlens_q[b + 1] - q0, p.cu_seqlens_k[b + 1] - k0};
  }
  return {0, 0, p.len_q, p.len_k};
}

// Element offset of row i of head h of sequence b.
inline int64_t row_offset(const Problem& p, const TensorRef& t, int64_t b, int64_t h, int64_t row0, int64_t i) {
  const int64_t base = p.cu_seqlens_q ? row0 * t.seq_stride : b * t.batch_stride;
  return base + h * t.head_stride + i * t.seq_stride;
}

// Flat index of (b, h, i) in lse: (B, Hq, Lq) dense, (Hq, total_q) varlen. It is also the
// dropout row id, so the mask of a row is the same whichever kernel draws it.
inline int64_t lse_index(const Problem& p, int64_t b, int64_t h, const Seq& s, int64_t i) {
  return p.cu_seqlens_q ? h * p.total_q + s.q_row0 + i : (b * p.heads_q + h) * p.len_q + i;
}

// Last key row i may see (inclusive), or a huge number without causality.
inline int64_t causal_limit(const Problem& p, const Seq& s, int64_t i) {
  if (!p.causal) return INT64_MAX / 4;
  return p.causal_bottom_right ? i + (s.len_k - s.len_q) : i;
}

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float f16_to_f32(uint16_t h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return float(x);
}
inline uint16_t f32_to_f16(float f) {
  const _Float16 x = _Float16(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
}

// dst[d] = scale * src[d] for a row of n elements of the given dtype.
inline void load_row(const void* src, DType dt, int64_t n, float scale, float* dst) {
  switch (dt) {
    case DType::f32: {
      const float* s = static_cast<const float*>(src);
      for (int64_t d = 0; d < n; ++d) dst[d] = s[d] * scale;
      break;
    }
    case DType::bf16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t d = 0; d < n; ++d) dst[d] = bf16_to_f32(s[d]) * scale;
      break;
    }
    case DType::f16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t d = 0; d < n; ++d) dst[d] = f16_to_f32(s[d]) * scale;
      break;
    }
  }
}

// dst[d] = scale * src[d], converted to dt.
inline void store_row(const float* src, int64_t n, float scale, DType dt, void* dst) {
  switch (dt) {
    case DType::f32: {
      float* o = static_cast<float*>(dst);
      for (int64_t d = 0; d < n; ++d) o[d] = src[d] * scale;
      break;
    }
    case DType::bf16: {
      uint16_t* o = static_cast<uint16_t*>(dst);
      int64_t d = 0;
#if defined(__AVX512BF16__)
      // The AMX build: one instruction per 16 values (round to nearest even; values below
      // 1.2e-38 become 0, where the scalar path would keep a denormal).
      const __m512 sv = _mm512_set1_ps(scale);
      for (; d + 16 <= n; d += 16) {
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + d), sv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d), reinterpret_cast<const __m256i&>(h));
      }
#endif
      for (; d < n; ++d) o[d] = f32_to_bf16(src[d] * scale);
      break;
    }
    case DType::f16: {
      uint16_t* o = static_cast<uint16_t*>(dst);
      for (int64_t d = 0; d < n; ++d) o[d] = f32_to_f16(src[d] * scale);
      break;
    }
  }
}

inline int64_t elem_size(DType dt) { return dt == DType::f32 ? 4 : 2; }
inline const void* at(const TensorRef& t, DType dt, int64_t off) {
  return static_cast<const char*>(t.data) + off * elem_size(dt);
}
inline void* at_mut(const TensorRef& t, DType dt, int64_t off) { return static_cast<char*>(t.data) + off * elem_size(dt); }

// Adds the user mask to n scores s[t] whose mask entries sit `step` elements apart from
// mask element `base`, the scores already scaled to base 2. Boolean false -> -inf; additive
// adds log2(e) * m. A finite m past FLT_MAX / log2(e) (~2.36e38) overflows that product to +inf,
// and the softmax's inf - inf to NaN, where torch gives that key all the weight: it is clamped
// to FLT_MAX. An m of +inf itself stays +inf, so its row is NaN as in torch (clamping it too
// gave a finite row); -inf and NaN pass through.
inline void apply_user_mask_strided(const Problem& p, int64_t base, int64_t step, int64_t n, float* s) {
  if (p.mask_kind == MaskKind::boolean) {
    const uint8_t* m = static_cast<const uint8_t*>(p.mask) + base;
    for (int64_t t = 0; t < n; ++t) s[t] = m[t * step] ? s[t] : -INFINITY;
  } else if (p.mask_kind == MaskKind::additive) {
    const float* m = static_cast<const float*>(p.mask) + base;
    for (int64_t t = 0; t < n; ++t) {
      const float mt = m[t * step];
      const float scaled = kLog2e * mt;
      s[t] += scaled == INFINITY && mt != INFINITY ? FLT_MAX : scaled;
    }
  }
}

// The mask for query row i of head h of batch b against keys [k0, k0 + n) (forward rows).
inline void apply_user_mask(const Problem& p, int64_t b, int64_t h, int64_t i, int64_t k0, int64_t n, float* s) {
  const int64_t* st = p.mask_strides;
  apply_user_mask_strided(p, b * st[0] + h * st[1] + i * st[2] + k0 * st[3], st[3], n, s);
}

// The mask for key `key` against queries [q0, q0 + n) (the backward's transposed rows).
inline void apply_user_mask_to_key(const Problem& p, int64_t b, int64_t h, int64_t q0, int64_t key, int64_t n,
                                   float* s) {
  const int64_t* st = p.mask_strides;
  apply_user_mask_strided(p, b * st[0] + h * st[1] + q0 * st[2] + key * st[3], st[2], n, s);
}

// How scores become base-2 softmax arguments: the GEMMs produce unscaled q.k; the softmax
// applies c = |scale| * log2(e) inside its FMA (a negative scale flips Q's sign instead,
// which is exact). Rows with a mask, or a zero scale, are scaled first (prescale) so the
// mask adds in the same units; they then use a factor of 1.
struct SoftmaxScale {
  float c;
  bool prescale;
  float row_c;
};
inline SoftmaxScale softmax_scale(const Problem& p) {
  const float c = std::fabs(p.scale) * kLog2e;
  const bool prescale = p.mask_kind != MaskKind::none || c == 0.f;
  return {c, prescale, prescale ? 1.f : c};
}

// Rows whose softmax shift (running max, or -lse) is large are scaled first, as masked rows are,
// and exponentiated with a factor of 1. The FMA s * c - shift rounds once, but leaves a row's
// maximum 2^(s c - round(s c)), up to 2^(ulp(shift) / 2), not 2^0: the forward's common factor
// cancels in the row sum until it under- or overflows (a score of 2.5e19 gave the row 0, where
// torch gives v); the backward, whose P = 2^(s c - lse) has no sum to cancel it, was off by up to
// ulp(lse), which a huge key multiplies into dQ (a key that takes its rows: dQ off by 1e-2 of its
// size at score 1e4, NaN at 1e10; float64 and torch's math backend exact). Scaled first, that
// maximum's argument is exactly 0 and its P exactly 1. The cost is the product's own rounding,
// at most ulp(score) / 2, as much as the fp32 score GEMM's last rounding already put there:
// random scores at temperature 64, every row scaled first, moved dQ's error of float64 from
// 1.3e-5 to 1.6e-5 of its size and dK's from 1.7e-5 to 2.0e-5 (torch's fused kernel: 1.2e-5, 1.4e-5).
// Below 2^6 (typical rows) nothing changes. Fully masked rows (-inf) are not large; NaN is.
inline bool huge_shift(float shift) { return shift != -INFINITY && !(std::fabs(shift) < 0x1p6f); }
// The factor the exp applies to row r's scores once pass 1 has run: 1 for rows scaled first.
inline float exp_factor(const SoftmaxScale& sc, float shift) { return huge_shift(shift) ? 1.f : sc.row_c; }
// Whether a backward tile's rows, whose shifts are the -lse of queries [0, n), are scaled first.
inline bool scale_first(const SoftmaxScale& sc, const float* neg_lse, int64_t n) {
  if (sc.prescale) return true;
  for (int64_t i = 0; i < n; ++i)
    if (huge_shift(-neg_lse[i])) return true;
  return false;
}

// Pass 1 of the online softmax over a tile of scores S (row stride lds) for query rows
// [q0, q0 + rows) and keys from k0, of which row r sees the first n_of(r): masks, the new
// running maxima m_new[r] = max(m[r], scaled row max), and alpha[r] = 2^(m[r] - m_new[r]).
// Pass 2 exponentiates row r with exp_factor(sc, m_new[r]).
template <class VisibleCols>
inline void online_softmax_maxima(const Problem& p, int64_t b, int64_t h, int64_t q0, int64_t k0, int64_t rows,
                                  float* S, int64_t lds, const VisibleCols& n_of, const SoftmaxScale& sc,
                                  const float* m, float* m_new, float* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = S + r * lds;
    const int64_t n = n_of(r);
    if (sc.prescale) {
      row_scale(row, n, sc.c);
      apply_user_mask(p, b, h, q0 + r, k0, n, row);
    }
    m_new[r] = max_of(m[r], row_max(row, n) * sc.row_c);
    if (!sc.prescale && huge_shift(m_new[r])) row_scale(row, n, sc.c);  // pass 2: exp_factor 1
  }
  exp2_of_difference(m, m_new, alpha, rows);
}

// Starts loading rows [0, rows) of row_bytes each, ld_bytes apart, into L1, all at once (Write:
// in a writable state). A GEMM whose first micro-kernel call meets cold operand rows otherwise
// waits on one demand miss after another (measured: the first score GEMM of an fp32 forward
// tile ran ~20% slower per FMA than the second, which reads the same query rows again).
template <int Write = 0>
inline void prefetch_rows(const void* x, int64_t ld_bytes, int64_t rows, int64_t row_bytes) {
  const char* row = static_cast<const char*>(x);
  for (int64_t r = 0; r < rows; ++r, row += ld_bytes) {
    for (int64_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(row + c, Write, 3);
    __builtin_prefetch(row + row_bytes - 1, Write, 3);  // the last line of a row that is not line-aligned
  }
}

// Prefetches the query rows of tile `next` (tiles of tile_rows rows) of head h of sequence b,
// if there is one (next >= 0, inside the sequence): a forward tile asks for the next one's rows
// while it computes, so that tile's first score GEMM does not wait on them. (4,12,512,64)
// forward with torch interleaved, on and off alternating in one process: bf16 causal faster in 8
// of 9 runs (-0.6% to -2.3%; one +2.8%), full 0 to -1%; fp32 -2.6% / -1.6% (one run).
inline void prefetch_query_tile(const ForwardArgs& a, int64_t b, int64_t h, int64_t next, int64_t tile_rows) {
  if (next < 0) return;  // the shared paths: every tile, nothing to look up
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  const int64_t q0 = next * tile_rows, rows = std::min(tile_rows, s.len_q - q0), es = elem_size(p.dtype);
  if (rows <= 0) return;
  prefetch_rows(at(a.q, p.dtype, row_offset(p, a.q, b, h, s.q_row0, q0)), a.q.seq_stride * es, rows, p.head_dim * es);
}

// What a forward tile asks for while it computes: the query rows of the tile this thread runs next
// in the same head (`next`, or -1 for none) and its own output rows, for writing, one row of each
// per call of row(r), which the AMX forward makes once per softmax row of its last key block.
// Asked for all at once in the tile's prologue, these ~3 lines a row waited there for fill buffers
// (bf16 (4,12,512,64), rdtsc: the prologue took 1.5 K cycles a tile, 0.2 K without them); spread
// over the exp they overlap it.
struct TileRowPrefetch {
  const char *next_q = nullptr;
  char* o = nullptr;
  int64_t next_rows = 0, rows = 0, q_ld = 0, o_ld = 0, q_bytes = 0, o_bytes = 0;

  TileRowPrefetch(const ForwardArgs& a, int64_t b, int64_t h, int64_t q0, int64_t rows_, int64_t next,
                  int64_t tile_rows) {
    const Problem& p = a.p;
    const Seq s = sequence(p, b);
    const int64_t es = elem_size(p.dtype);
    if (next >= 0 && next * tile_rows < s.len_q) {
      next_q = static_cast<const char*>(at(a.q, p.dtype, row_offset(p, a.q, b, h, s.q_row0, next * tile_rows)));
      next_rows = std::min(tile_rows, s.len_q - next * tile_rows);
    }
    o = static_cast<char*>(at_mut(a.o, p.dtype, row_offset(p, a.o, b, h, s.q_row0, q0)));
    rows = rows_;
    q_ld = a.q.seq_stride * es;
    o_ld = a.o.seq_stride * es;
    q_bytes = p.head_dim * es;
    o_bytes = p.head_dim_v * es;
  }
  void row(int64_t r) const {
    if (r < next_rows) prefetch_rows(next_q + r * q_ld, 0, 1, q_bytes);
    if (r < rows) prefetch_rows<1>(o + r * o_ld, 0, 1, o_bytes);
  }
};

// The rows of a few matrices of one head (up to kMax, the same row count), asked for a few at a
// time: each step() asks for the next per_step rows of every matrix. A kernel's local path fills it
// with the inputs of the (sequence, head) it will likely run next and steps it while it computes the
// current one, so that head's packs find their rows in cache instead of waiting on memory for them
// (they come from memory when another op ran in between and streamed its data through the caches).
struct RowTrickle {
  static constexpr int kMax = 4;
  const char* base[kMax] = {};
  int64_t ld[kMax] = {}, bytes[kMax] = {};
  int n = 0;
  int64_t rows = 0, next = 0, per_step = 0;

  void add(const void* x, int64_t ld_bytes, int64_t row_bytes) {
    if (n == kMax) return;  // a hint only: past kMax, matrices are not asked for
    base[n] = static_cast<const char*>(x);
    ld[n] = ld_bytes;
    bytes[n++] = row_bytes;
  }
  // Spreads `rows` rows over `steps` calls of step().
  void spread(int64_t rows_, int64_t steps) {
    rows = rows_;
    next = 0;
    per_step = ceil_div(rows_, std::max<int64_t>(steps, 1));
  }
  void step() {
    for (const int64_t end = std::min(rows, next + per_step); next < end; ++next)
      for (int i = 0; i < n; ++i) prefetch_rows(base[i] + next * ld[i], 0, 1, bytes[i]);
  }
};

// The work item a thread likely takes after item `it` of an OpenMP `schedule(dynamic, chunk)` loop
// of `items` items on `nthreads` threads, when the threads take chunks in turn: the rest of its chunk,
// then the chunk nthreads - 1 chunks on. -1 past the end. A wrong guess costs the prefetches of an
// item another thread runs (from this core's caches, or not at all).
inline int64_t likely_next_item(int64_t it, int64_t chunk, int nthreads, int64_t items) {
  const int64_t next = (it + 1) % chunk != 0 ? it + 1 : it + 1 + (nthreads - 1) * chunk;
  return next < items ? next : -1;
}

// dst[c][r] = src[r][c] for an rows x cols block (row strides in floats), in W x W register
// transposes with scalar edges.
inline void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  constexpr int W = simd::W;
  int64_t r0 = 0;
  for (; r0 + W <= rows; r0 += W) {
    int64_t c0 = 0;
    for (; c0 + W <= cols; c0 += W) simd::transpose_block(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
    for (int64_t c = c0; c < cols; ++c)
      for (int64_t r = r0; r < r0 + W; ++r) dst[c * ldd + r] = src[r * lds + c];
  }
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// Width of the transposed panels of a matrix of len rows: NR, or for fewer rows just enough
// whole vectors (a 15-token sequence packs 16 columns, not 64).
inline int64_t panel_width(int64_t len) { return std::min<int64_t>(NR, round_up(std::max<int64_t>(len, 1), simd::W)); }
// Rows a sequence of len rows occupies when packed in panels and processed in blocks of `block`
// (a multiple of NR).
inline int64_t panel_padded(int64_t len, int64_t block) {
  return len >= block ? round_up(len, block) : round_up(len, panel_width(len));
}

// Transposes fp32 rows [0, len) (row stride ld) into panels of panel_width(len) columns:
// out[p][d][c] = rows[p * width + c][d], columns past len zero; `negate` flips every sign
// (exact). out holds round_up(len, width) * dim floats; row_buf holds NR * dim floats.
inline void panels_from_rows(const float* rows, int64_t ld, int64_t len, int64_t dim, bool negate, float* row_buf,
                             float* out) {
  const int64_t width = panel_width(len);
  for (int64_t p0 = 0; p0 < len; p0 += width) {
    const int64_t n = std::min<int64_t>(width, len - p0);
    const float* src = rows + p0 * ld;
    int64_t lds = ld;
    if (n < width) {  // pad the last panel with zero rows, then transpose it whole
      for (int64_t c = 0; c < n; ++c) std::memcpy(row_buf + c * dim, src + c * ld, sizeof(float) * dim);
      std::memset(row_buf + n * dim, 0, sizeof(float) * (width - n) * dim);
      src = row_buf;
      lds = dim;
    }
    float* panel = out + p0 * dim;
    transpose(src, lds, width, dim, panel, width);
    if (negate)
      for (int64_t i = 0; i < width * dim; ++i) panel[i] = -panel[i];
  }
}

// Packs rows [0, len) of one head into transposed panels (see panels_from_rows), reading the
// source once: rows go through row_buf (NR x dim floats) in fp32.
inline void pack_transposed_panels(const void* src, DType dt, int64_t seq_stride, int64_t len, int64_t dim,
                                   float scale, float* row_buf, float* out) {
  const int64_t width = panel_width(len);
  for (int64_t p0 = 0; p0 < len; p0 += width) {
    const int64_t rows = std::min<int64_t>(width, len - p0);
    for (int64_t c = 0; c < rows; ++c)
      load_row(static_cast<const char*>(src) + (p0 + c) * seq_stride * elem_size(dt), dt, dim, scale,
               row_buf + c * dim);
    std::memset(row_buf + rows * dim, 0, sizeof(float) * (width - rows) * dim);
    transpose(row_buf, dim, width, dim, out + p0 * dim, width);
  }
}

// A leading dimension (in floats) for matrices read down their columns: a multiple of 512
// floats puts every row in the same L1 set (measured: 8 KB strides on 2048-token heads), so
// such sizes get 64 more.
inline int64_t alias_free(int64_t n) { return n >= 512 && n % 512 == 0 ? n + 64 : n; }

// dQ rows [0, len_q) of head h of sequence b = scale * the sum of `chunks` row-major dQ
// accumulators (ld floats a row, chunk_stride floats apart; the first is summed into), stored in
// the output dtype.
inline void write_dq_rows(const BackwardArgs& a, int64_t b, int64_t h, float* dq, int64_t ld, int64_t chunks,
                          int64_t chunk_stride) {
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  for (int64_t i = 0; i < s.len_q; ++i) {
    float* row = dq + i * ld;
    for (int64_t c = 1; c < chunks; ++c)
      for (int64_t x = 0; x < p.head_dim; ++x) row[x] += row[c * chunk_stride + x];
    store_row(row, p.head_dim, p.scale, p.dtype, at_mut(a.dq, p.dtype, row_offset(p, a.dq, b, h, s.q_row0, i)));
  }
}

// Chunks the key tiles of each (sequence, kv head) pair are split into in the backward: one
// when the pairs alone keep every thread busy (or the group is packed per work item), else
// enough that pairs x chunks reaches four items per thread.
inline int64_t backward_chunks(bool local, int64_t pairs, int nthreads, int64_t max_tiles) {
  if (local || pairs >= 4 * nthreads) return 1;
  return std::min(max_tiles, ceil_div(4 * nthreads, std::max<int64_t>(pairs, 1)));
}

// OpenMP chunk for the local paths' work items, (sequence, kv head) pairs in sequence-major
// order: all kv heads of a sequence together when there are enough sequences to keep every
// thread busy, else single pairs. A thread then walks each token's rows (all heads side by
// side, the (T, H, D) layout) in order instead of 1/H of them, and takes a new item H times
// less often. 128 SST-2-length sequences, H12 D32 (interleaved A/B): forward 23% / 12% faster,
// forward+backward 20% / 11% (fp32 / bf16 AMX); dense (32,12,64,32) and (16,12,128,32) within noise.
inline int64_t local_chunk(const Problem& p, int nthreads) { return p.batch >= 4 * nthreads ? p.heads_kv : 1; }

// Packs rows [0, len) of one head row-major fp32: out[r][d] (leading dimension dim).
inline void pack_rows(const void* src, DType dt, int64_t seq_stride, int64_t len, int64_t dim, float scale,
                      float* out) {
  for (int64_t r = 0; r < len; ++r)
    load_row(static_cast<const char*>(src) + r * seq_stride * elem_size(dt), dt, dim, scale, out + r * dim);
}

}  // namespace llmcore::attention::LLMCORE_ISA_NS
