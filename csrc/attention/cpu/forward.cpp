// Flash-attention forward on the CPU: per (batch, head, query tile), an online softmax over
// key tiles in base 2 (the softmax scale folds in log2(e)); lse is saved in base 2 too.
// Compiled once per ISA; see simd.h.
#include <cstdint>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention/cpu/kernel_common.h"
#include "attention/cpu/row_ops.h"

namespace llmcore::attention::LLMCORE_ISA_NS {
namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 256;
static_assert(kBlockK % NR == 0, "key tiles are whole panels");

// Where the K^T panels and V rows of each (sequence, kv head) are packed in fp32: in one
// shared buffer packed up front when many query tiles reuse them, or per work item in the
// thread's own buffer when the batch has many short heads (then they never leave its cache).
struct KVLayout {
  const int64_t* offset;  // first padded key row of each sequence; offset[B] = total
  int64_t total = 0, dim = 0, dim_v = 0;
  int64_t kt_at(int64_t b, int64_t h) const { return (h * total + offset[b]) * dim; }
  int64_t v_at(int64_t b, int64_t h) const { return (h * total + offset[b]) * dim_v; }
};

// V rows of kv head h of sequence b as the P V GEMM's B operand: fp32 inputs in place, others
// converted into v (row stride head_dim_v) by pack_head.
inline bool v_packed(const Problem& p) { return p.dtype != DType::f32; }
RowMajorB v_rows(const ForwardArgs& a, int64_t b, int64_t h, const float* v) {
  const Problem& p = a.p;
  if (v_packed(p)) return {v, p.head_dim_v};
  return {static_cast<const float*>(at(a.v, p.dtype, row_offset(p, a.v, b, h, sequence(p, b).k_row0, 0))),
          a.v.seq_stride};
}

void pack_head(const ForwardArgs& a, int64_t b, int64_t h, float* row, float* kt, float* v) {
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  pack_transposed_panels(at(a.k, p.dtype, row_offset(p, a.k, b, h, s.k_row0, 0)), p.dtype, a.k.seq_stride, s.len_k,
                         p.head_dim, 1.f, row, kt);
  if (v_packed(p))
    pack_rows(at(a.v, p.dtype, row_offset(p, a.v, b, h, s.k_row0, 0)), p.dtype, a.v.seq_stride, s.len_k,
              p.head_dim_v, 1.f, v);
}

// Per-thread tile buffers, carved from the workspace before the parallel region (an
// allocation failure inside it could not be reported).
struct TileBuffers {
  float *q, *s, *o, *m, *l, *m_new, *alpha, *row;
  uint8_t* keep;
  static int64_t floats(int64_t dim, int64_t dim_v) {
    return kBlockQ * dim + kBlockQ * kBlockK + kBlockQ * dim_v + 4 * kBlockQ + NR * dim + kBlockQ * kBlockK / 4 + 16;
  }
  TileBuffers(float* base, int64_t dim, int64_t dim_v)
      : q(base), s(q + kBlockQ * dim), o(s + kBlockQ * kBlockK), m(o + kBlockQ * dim_v), l(m + kBlockQ),
        m_new(l + kBlockQ), alpha(m_new + kBlockQ), row(alpha + kBlockQ),
        keep(reinterpret_cast<uint8_t*>(row + NR * dim)) {}
};

// Query tile qt of head h of sequence b; next_qt: the tile this thread runs next in the same
// head (its query rows are prefetched when it is inside the sequence), or -1.
void forward_tile(const ForwardArgs& a, const float* kt, const RowMajorB& vr, int64_t b, int64_t h, int64_t qt,
                  int64_t next_qt, TileBuffers& buf) {
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  const int64_t D = p.head_dim, Dv = p.head_dim_v;
  const int64_t q0 = qt * kBlockQ, qb = std::min(kBlockQ, s.len_q - q0);
  float *Q = buf.q, *S = buf.s, *O = buf.o, *m = buf.m, *l = buf.l;

  const SoftmaxScale sc = softmax_scale(p);  // Q carries the sign of the scale
  // fp32 queries with a positive scale are the A operand as they are; others are converted
  // (and negated for a negative scale) into the tile buffer.
  const bool in_place = p.dtype == DType::f32 && p.scale >= 0;
  const float* A = in_place ? static_cast<const float*>(at(a.q, p.dtype, row_offset(p, a.q, b, h, s.q_row0, q0))) : Q;
  const int64_t lda = in_place ? a.q.seq_stride : D;
  if (in_place) prefetch_rows(A, lda * 4, qb, D * 4);
  prefetch_query_tile(a, b, h, next_qt, kBlockQ);
  for (int64_t r = 0; r < qb; ++r) {
    if (!in_place)
      load_row(at(a.q, p.dtype, row_offset(p, a.q, b, h, s.q_row0, q0 + r)), p.dtype, D, p.scale < 0 ? -1.f : 1.f,
               Q + r * D);
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  std::memset(O, 0, sizeof(float) * qb * Dv);

  const int64_t k_end = std::min(s.len_k, causal_limit(p, s, q0 + qb - 1) + 1);
  // A causal tile is the first of its head to read the V rows of its last qb keys (fp32 V is
  // read in place): ask for them now (causal/full forward at (4,12,512,64): 0.59 -> 0.57).
  if (p.causal && !v_packed(p)) {
    const int64_t k_new = std::max<int64_t>(0, k_end - qb);
    prefetch_rows(vr.b + k_new * vr.ld, vr.ld * 4, k_end - k_new, Dv * 4);
  }
  const float drop_scale = p.dropout_p < 1.f ? 1.f / (1.f - p.dropout_p) : 0.f;
  // Columns row r must compute in the tile starting at k0: the causal limit trims them.
  auto visible = [&](int64_t r, int64_t k0, int64_t kb) {
    return std::clamp<int64_t>(causal_limit(p, s, q0 + r) + 1 - k0, 0, kb);
  };

  for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
    const int64_t kb = std::min(kBlockK, k_end - k0);
    // On a diagonal tile each block of MR rows computes only the columns its last row sees.
    const bool diagonal = p.causal && visible(0, k0, kb) < kb;
    const PanelB kt_at{kt, D, k0, panel_width(s.len_k)};
    // Columns (S) and keys (P V) the row block at r0 needs: on a diagonal tile, what its last row sees.
    auto block_cols = [&](int64_t r0, int64_t mb) { return diagonal ? visible(r0 + mb - 1, k0, kb) : kb; };
    gemm(qb, kb, D, A, lda, kt_at, S, kBlockK, false, kHeadDimChainK, block_cols);

    float *m_new = buf.m_new, *alpha = buf.alpha;
    online_softmax_maxima(p, b, h, q0, k0, qb, S, kBlockK, [&](int64_t r) { return diagonal ? visible(r, k0, kb) : kb; },
                          sc, m, m_new, alpha);
    if (p.dropout_p > 0.f)  // keep[r * kBlockK + j]
      dropout_block(p.seed, p.offset, lse_index(p, b, h, s, q0), qb, k0, kb, p.dropout_p, false, buf.keep, kBlockK);
    // Pass 2: probabilities, row sums, and the rescaled output accumulator.
    for (int64_t r = 0; r < qb; ++r) {
      float* row = S + r * kBlockK;
      const int64_t n = diagonal ? visible(r, k0, kb) : kb;
      const int64_t r0 = r / simd::MR * simd::MR;
      const int64_t width = block_cols(r0, std::min<int64_t>(simd::MR, qb - r0));  // what P V reads of this row
      if (m_new[r] == -INFINITY) {  // nothing visible so far: this tile adds nothing
        std::memset(row, 0, sizeof(float) * width);
        continue;
      }
      const float sum = row_exp2_sum(row, n, exp_factor(sc, m_new[r]), m_new[r]);
      if (n < width) std::memset(row + n, 0, sizeof(float) * (width - n));
      if (l[r] > 0.f && alpha[r] != 1.f) row_scale(O + r * Dv, Dv, alpha[r]);
      l[r] = l[r] * alpha[r] + sum;
      m[r] = m_new[r];
      if (p.dropout_p > 0.f) {
        row_dropout(row, buf.keep + r * kBlockK, n, n, drop_scale, nullptr, row);
      }
    }

    const RowMajorB v_at{vr.b + k0 * vr.ld, vr.ld};
    gemm(qb, Dv, kb, S, kBlockK, v_at, O, Dv, true, kChainK, Whole{}, block_cols);
  }

  for (int64_t r = 0; r < qb; ++r) {
    const bool any = l[r] != 0.f;  // false on fully masked rows: output 0, lse -inf (as torch); NaN stays NaN
    store_row(O + r * Dv, Dv, any ? 1.f / l[r] : 0.f, p.dtype, at_mut(a.o, p.dtype, row_offset(p, a.o, b, h, s.q_row0, q0 + r)));
  }
  row_lse(m, l, qb, a.lse + lse_index(p, b, h, s, q0));  // a tile's rows are adjacent in lse
}

}  // namespace

void forward(const ForwardArgs& a) {
  const Problem& p = a.p;
  const int nthreads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
  const int64_t D = p.head_dim, Dv = p.head_dim_v, group = p.heads_q / p.heads_kv;

  Workspace ws;
  int64_t max_k = 0;
  for (int64_t b = 0; b < p.batch; ++b) max_k = std::max(max_k, panel_padded(sequence(p, b).len_k, NR));
  const int64_t Dv_packed = v_packed(p) ? Dv : 0;
  const int64_t head_floats = max_k * (D + Dv_packed);
  const int64_t pairs = p.batch * p.heads_kv;
  // Short heads, and enough of them to keep every thread busy: pack per work item.
  const bool local = pairs >= 2 * nthreads && head_floats * 4 <= (512 << 10);

  int64_t total = 0;
  for (int64_t b = 0; b < p.batch; ++b) total += panel_padded(sequence(p, b).len_k, NR);
  const int64_t shared_floats = local ? 0 : p.heads_kv * total * (D + Dv_packed);
  const int64_t per_thread = TileBuffers::floats(D, Dv) + (local ? head_floats : 0);
  ws.reserve(2 * ws_bytes(sizeof(int64_t) * (p.batch + 1)) + ws_bytes(sizeof(float) * shared_floats) +
             ws_bytes(sizeof(float) * per_thread * nthreads));
  int64_t* offset = ws.carve<int64_t>(p.batch + 1);
  int64_t* first = ws.carve<int64_t>(p.batch + 1);  // first work item of each sequence
  float* shared = ws.carve<float>(shared_floats);
  float* scratch = ws.carve<float>(per_thread * nthreads);

  offset[0] = first[0] = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const Seq s = sequence(p, b);
    offset[b + 1] = offset[b] + panel_padded(s.len_k, NR);
    first[b + 1] = first[b] + p.heads_q * ceil_div(s.len_q, kBlockQ);
  }
  const KVLayout kv{offset, total, D, Dv_packed};
  float* shared_kt = shared;
  float* shared_v = shared + p.heads_kv * total * D;

#pragma omp parallel num_threads(nthreads)
  {
    float* mine = scratch + per_thread * omp_get_thread_num();
    TileBuffers buf(mine, D, Dv);
    if (local) {
      float* kt = mine + TileBuffers::floats(D, Dv);
      float* v = kt + max_k * D;
#pragma omp for schedule(dynamic, local_chunk(p, nthreads))
      for (int64_t it = 0; it < pairs; ++it) {
        const int64_t b = it / p.heads_kv, hk = it % p.heads_kv;
        pack_head(a, b, hk, buf.row, kt, v);
        const int64_t nq = ceil_div(sequence(p, b).len_q, kBlockQ);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
          for (int64_t qt = 0; qt < nq; ++qt) forward_tile(a, kt, v_rows(a, b, hk, v), b, h, qt, qt + 1, buf);
      }
    } else {
#pragma omp for schedule(dynamic, 1) collapse(2)
      for (int64_t b = 0; b < p.batch; ++b)
        for (int64_t hk = 0; hk < p.heads_kv; ++hk)
          pack_head(a, b, hk, buf.row, shared_kt + kv.kt_at(b, hk), shared_v + kv.v_at(b, hk));
      const int64_t items = first[p.batch];
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t b = std::upper_bound(first, first + p.batch + 1, it) - first - 1;
        const int64_t nq = ceil_div(sequence(p, b).len_q, kBlockQ);
        const int64_t rem = it - first[b], h = rem / nq, hk = h / group;
        // Causal tiles near the end of a sequence cost the most: hand them out first.
        const int64_t qt = p.causal ? nq - 1 - rem % nq : rem % nq;
        forward_tile(a, shared_kt + kv.kt_at(b, hk), v_rows(a, b, hk, shared_v + kv.v_at(b, hk)), b, h, qt, -1, buf);
      }
    }
  }
}

// dropout_block as this ISA compiles it (attention.h's dropout_keep_block, for tests).
void dropout_keep_block(uint64_t seed, uint64_t offset, float p, int64_t row0, int64_t rows, int64_t col0,
                        int64_t cols, bool transposed, uint8_t* keep) {
  dropout_block(seed, offset, uint64_t(row0), rows, col0, cols, p, transposed, keep, transposed ? rows : cols);
}

}  // namespace llmcore::attention::LLMCORE_ISA_NS
