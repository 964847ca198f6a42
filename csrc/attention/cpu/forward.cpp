// Flash-attention forward on the CPU: per (batch, head, query tile), an online softmax over
// key tiles in base 2 (the softmax scale folds in log2(e)); lse is saved in base 2 too.
// Compiled once per ISA; see simd.h.
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

// K^T panels and V rows of every (sequence, kv head), in fp32, computed once per call.
struct PackedKV {
  Scratch<int64_t> offset;  // first padded key row of each sequence; offset[B] = total
  Scratch<float> kt, v;
  int64_t total = 0, dim = 0, dim_v = 0;
  const float* kt_of(int64_t b, int64_t h) const { return kt.get() + (h * total + offset[b]) * dim; }
  const float* v_of(int64_t b, int64_t h) const { return v.get() + (h * total + offset[b]) * dim_v; }
};

PackedKV pack_kv(const ForwardArgs& a, int nthreads) {
  const Problem& p = a.p;
  PackedKV pk;
  pk.dim = p.head_dim;
  pk.dim_v = p.head_dim_v;
  pk.offset = make_scratch<int64_t>(p.batch + 1);
  pk.offset[0] = 0;
  for (int64_t b = 0; b < p.batch; ++b) pk.offset[b + 1] = pk.offset[b] + round_up(sequence(p, b).len_k, NR);
  pk.total = pk.offset[p.batch];
  pk.kt = make_scratch<float>(p.heads_kv * pk.total * pk.dim);
  pk.v = make_scratch<float>(p.heads_kv * pk.total * pk.dim_v);
  Scratch<float> rows = make_scratch<float>(pk.dim * nthreads);
#pragma omp parallel num_threads(nthreads)
  {
    float* row = rows.get() + pk.dim * omp_get_thread_num();
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t h = 0; h < p.heads_kv; ++h) {
        const Seq s = sequence(p, b);
        const void* k = at(a.k, p.dtype, row_offset(p, a.k, b, h, s.k_row0, 0));
        const void* v = at(a.v, p.dtype, row_offset(p, a.v, b, h, s.k_row0, 0));
        pack_transposed_panels(k, p.dtype, a.k.seq_stride, s.len_k, pk.dim, 1.f, row,
                               const_cast<float*>(pk.kt_of(b, h)));
        pack_rows(v, p.dtype, a.v.seq_stride, s.len_k, pk.dim_v, 1.f, const_cast<float*>(pk.v_of(b, h)));
      }
    }
  }
  return pk;
}

// Per-thread tile buffers, carved from one allocation made before the parallel region
// (an allocation failure inside it could not be reported).
struct TileBuffers {
  float *q, *s, *o, *m, *l;
  uint8_t* keep;
  static int64_t floats(int64_t dim, int64_t dim_v) {
    return kBlockQ * dim + kBlockQ * kBlockK + kBlockQ * dim_v + 2 * kBlockQ + kBlockK / 4 + 16;
  }
  TileBuffers(float* base, int64_t dim, int64_t dim_v)
      : q(base), s(q + kBlockQ * dim), o(s + kBlockQ * kBlockK), m(o + kBlockQ * dim_v), l(m + kBlockQ),
        keep(reinterpret_cast<uint8_t*>(l + kBlockQ)) {}
};

void forward_tile(const ForwardArgs& a, const PackedKV& pk, int64_t b, int64_t h, int64_t qt, TileBuffers& buf) {
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  const int64_t D = p.head_dim, Dv = p.head_dim_v, hk = h / (p.heads_q / p.heads_kv);
  const int64_t q0 = qt * kBlockQ, qb = std::min(kBlockQ, s.len_q - q0);
  float *Q = buf.q, *S = buf.s, *O = buf.o, *m = buf.m, *l = buf.l;

  // Scores stay unscaled in the GEMM; the softmax applies c = |scale| * log2(e) inside its
  // FMA. A negative scale flips the sign of Q instead, which is exact.
  const float c = std::fabs(p.scale) * kLog2e;
  // Rows with a mask (or a zero scale) are scaled first so the mask adds in the same units.
  const bool prescale = p.mask_kind != MaskKind::none || c == 0.f;
  const float row_c = prescale ? 1.f : c;
  for (int64_t r = 0; r < qb; ++r) {
    load_row(at(a.q, p.dtype, row_offset(p, a.q, b, h, s.q_row0, q0 + r)), p.dtype, D, p.scale < 0 ? -1.f : 1.f,
             Q + r * D);
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  std::memset(O, 0, sizeof(float) * qb * Dv);

  const float* kt = pk.kt_of(b, hk);
  const float* vr = pk.v_of(b, hk);
  const int64_t k_end = std::min(s.len_k, causal_limit(p, s, q0 + qb - 1) + 1);
  const float drop_scale = p.dropout_p < 1.f ? 1.f / (1.f - p.dropout_p) : 0.f;
  // Columns row r must compute in the tile starting at k0: the causal limit trims them.
  auto visible = [&](int64_t r, int64_t k0, int64_t kb) {
    return std::clamp<int64_t>(causal_limit(p, s, q0 + r) + 1 - k0, 0, kb);
  };

  for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
    const int64_t kb = std::min(kBlockK, k_end - k0);
    // On a diagonal tile each block of MR rows computes only the columns its last row sees.
    const bool diagonal = p.causal && visible(0, k0, kb) < kb;
    const PanelB kt_at{kt, D, k0};
    if (!diagonal) {
      gemm(qb, kb, D, Q, D, kt_at, S, kBlockK, false);
    } else {
      for (int64_t r0 = 0; r0 < qb; r0 += simd::MR) {
        const int64_t mb = std::min<int64_t>(simd::MR, qb - r0);
        const int64_t n = visible(r0 + mb - 1, k0, kb);
        if (n > 0) gemm(mb, n, D, Q + r0 * D, D, kt_at, S + r0 * kBlockK, kBlockK, false);
      }
    }

    for (int64_t r = 0; r < qb; ++r) {
      float* row = S + r * kBlockK;
      const int64_t n = diagonal ? visible(r, k0, kb) : kb;
      if (prescale) {
        row_scale(row, n, c);
        apply_user_mask(p, b, h, q0 + r, k0, n, row);
      }
      const float m_new = std::fmax(m[r], row_max(row, n) * row_c);  // m: running max, scaled
      if (m_new == -INFINITY) {  // nothing visible so far: this tile adds nothing
        std::memset(row, 0, sizeof(float) * kb);
        continue;
      }
      const float alpha = std::exp2(m[r] - m_new);
      const float sum = row_exp2_sum(row, n, row_c, m_new);
      std::memset(row + n, 0, sizeof(float) * (kb - n));
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
      if (alpha != 1.f) row_scale(O + r * Dv, Dv, alpha);
      if (p.dropout_p > 0.f) {
        uint8_t* keep = buf.keep;
        dropout_row(p.seed, p.offset, lse_index(p, b, h, s, q0 + r), k0, n, p.dropout_p, keep);
        for (int64_t j = 0; j < n; ++j) row[j] = keep[j] ? row[j] * drop_scale : 0.f;
      }
    }

    const RowMajorB v_at{vr + k0 * Dv, Dv};
    if (!diagonal) {
      gemm(qb, Dv, kb, S, kBlockK, v_at, O, Dv, true);
    } else {
      for (int64_t r0 = 0; r0 < qb; r0 += simd::MR) {
        const int64_t mb = std::min<int64_t>(simd::MR, qb - r0);
        const int64_t n = visible(r0 + mb - 1, k0, kb);
        if (n > 0) gemm(mb, Dv, n, S + r0 * kBlockK, kBlockK, v_at, O + r0 * Dv, Dv, true);
      }
    }
  }

  for (int64_t r = 0; r < qb; ++r) {
    const bool any = l[r] > 0.f;  // false on fully masked rows: output 0, lse -inf (as torch)
    store_row(O + r * Dv, Dv, any ? 1.f / l[r] : 0.f, p.dtype, at_mut(a.o, p.dtype, row_offset(p, a.o, b, h, s.q_row0, q0 + r)));
    a.lse[lse_index(p, b, h, s, q0 + r)] = any ? m[r] + std::log2(l[r]) : -INFINITY;
  }
}

}  // namespace

void forward(const ForwardArgs& a) {
  const Problem& p = a.p;
  const int nthreads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
  const PackedKV pk = pack_kv(a, nthreads);

  // Work items (b, h, query tile), numbered sequence after sequence.
  Scratch<int64_t> first = make_scratch<int64_t>(p.batch + 1);
  first[0] = 0;
  for (int64_t b = 0; b < p.batch; ++b) first[b + 1] = first[b] + p.heads_q * ceil_div(sequence(p, b).len_q, kBlockQ);
  const int64_t items = first[p.batch];

  const int64_t per_thread = TileBuffers::floats(p.head_dim, p.head_dim_v);
  Scratch<float> scratch = make_scratch<float>(per_thread * nthreads);
#pragma omp parallel num_threads(nthreads)
  {
    TileBuffers buf(scratch.get() + per_thread * omp_get_thread_num(), p.head_dim, p.head_dim_v);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = std::upper_bound(first.get(), first.get() + p.batch + 1, it) - first.get() - 1;
      const int64_t nq = ceil_div(sequence(p, b).len_q, kBlockQ);
      const int64_t rem = it - first[b], h = rem / nq;
      // Causal tiles near the end of a sequence cost the most: hand them out first.
      const int64_t qt = p.causal ? nq - 1 - rem % nq : rem % nq;
      forward_tile(a, pk, b, h, qt, buf);
    }
  }
}

}  // namespace llmcore::attention::LLMCORE_ISA_NS
