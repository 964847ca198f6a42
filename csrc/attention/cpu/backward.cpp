// Flash-attention backward on the CPU, in the transposed form: for a key tile j and a query
// tile i it computes S^T = K_j Q_i^T, so P^T, dP^T and dS^T come out with keys as rows and
// every GEMM reads its operands row-major without a per-tile transpose:
//   dV_j += P^T_j dO_i      dP^T = V_j dO_i^T      dS^T = P^T * (dP^T - D_i)
//   dK_j += dS^T Q_i        dQ_i^T += K_j^T dS^T
// Work items are (sequence, kv head, chunk of key tiles), so GQA heads never race on dK/dV
// and small batch x heads still spread over all threads: each chunk accumulates dQ^T in its
// own buffer and a final pass sums the chunks. Compiled once per ISA; see simd.h.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention/cpu/kernel_common.h"
#include "attention/cpu/row_ops.h"

namespace llmcore::attention::LLMCORE_ISA_NS {
namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
static_assert(kBlockQ % NR == 0, "query tiles are whole panels");

// fp32 copies of the operands, packed once per call. Per (sequence, head) slices start at
// padded row offsets, so varlen batches waste no space on the longest sequence.
struct Packed {
  int64_t D = 0, Dv = 0, q_total = 0, k_total = 0;
  Scratch<int64_t> q_off, k_off;
  Scratch<float> qt, q, dot, dout, neg_lse, di;  // per query head
  Scratch<float> k, kt, v;                    // per kv head

  int64_t q_base(int64_t b, int64_t h) const { return h * q_total + q_off[b]; }
  int64_t k_base(int64_t b, int64_t h) const { return h * k_total + k_off[b]; }
  int64_t q_pad(int64_t b) const { return q_off[b + 1] - q_off[b]; }
  int64_t k_pad(int64_t b) const { return k_off[b + 1] - k_off[b]; }
};

Packed pack(const BackwardArgs& a, int nthreads) {
  const Problem& p = a.p;
  Packed pk;
  pk.D = p.head_dim;
  pk.Dv = p.head_dim_v;
  pk.q_off = make_scratch<int64_t>(p.batch + 1);
  pk.k_off = make_scratch<int64_t>(p.batch + 1);
  pk.q_off[0] = pk.k_off[0] = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const Seq s = sequence(p, b);
    pk.q_off[b + 1] = pk.q_off[b] + round_up(s.len_q, kBlockQ);
    pk.k_off[b + 1] = pk.k_off[b] + round_up(s.len_k, NR);
  }
  pk.q_total = pk.q_off[p.batch];
  pk.k_total = pk.k_off[p.batch];
  const int64_t nq = p.heads_q * pk.q_total, nk = p.heads_kv * pk.k_total;
  pk.qt = make_scratch<float>(nq * pk.D);
  pk.q = make_scratch<float>(nq * pk.D);
  pk.dot = make_scratch<float>(nq * pk.Dv);
  pk.dout = make_scratch<float>(nq * pk.Dv);
  pk.neg_lse = make_scratch<float>(nq);
  pk.di = make_scratch<float>(nq);
  pk.k = make_scratch<float>(nk * pk.D);
  pk.kt = make_scratch<float>(nk * pk.D);
  pk.v = make_scratch<float>(nk * pk.Dv);

  const int64_t row_len = NR * std::max(pk.D, pk.Dv);  // pack_transposed_panels' row buffer
  Scratch<float> rows = make_scratch<float>(2 * row_len * nthreads);
#pragma omp parallel num_threads(nthreads)
  {
    float* row = rows.get() + 2 * row_len * omp_get_thread_num();
    float* row2 = row + row_len;
#pragma omp for schedule(dynamic, 1) collapse(2) nowait
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t h = 0; h < p.heads_q; ++h) {
        const Seq s = sequence(p, b);
        const int64_t base = pk.q_base(b, h), pad = pk.q_pad(b);
        const void* q = at(a.q, p.dtype, row_offset(p, a.q, b, h, s.q_row0, 0));
        const void* dout = at(a.dout, p.dtype, row_offset(p, a.dout, b, h, s.q_row0, 0));
        // Q^T for the scores carries only the sign of the scale (see forward.cpp).
        pack_transposed_panels(q, p.dtype, a.q.seq_stride, s.len_q, pk.D, p.scale < 0 ? -1.f : 1.f, row,
                               pk.qt.get() + base * pk.D);
        pack_rows(q, p.dtype, a.q.seq_stride, s.len_q, pk.D, 1.f, pk.q.get() + base * pk.D);
        pack_transposed_panels(dout, p.dtype, a.dout.seq_stride, s.len_q, pk.Dv, 1.f, row, pk.dot.get() + base * pk.Dv);
        pack_rows(dout, p.dtype, a.dout.seq_stride, s.len_q, pk.Dv, 1.f, pk.dout.get() + base * pk.Dv);
        for (int64_t i = 0; i < pad; ++i) {
          float neg_lse = -INFINITY, di = 0.f;  // padding and fully masked rows: P = 0
          if (i < s.len_q) {
            const float lse = a.lse[lse_index(p, b, h, s, i)];
            if (lse != -INFINITY) neg_lse = -lse;
            load_row(at(a.o, p.dtype, row_offset(p, a.o, b, h, s.q_row0, i)), p.dtype, pk.Dv, 1.f, row2);
            const float* g = pk.dout.get() + (base + i) * pk.Dv;
            // D_i = dO . O rounded as the GEMM rounds dP = dO . V: dS = P (dP - D_i) cancels, and
            // where one key dominates (O = V_j) the cancellation is then exact.
            di = dot_like_gemm(row2, g, pk.Dv);
          }
          pk.neg_lse[base + i] = neg_lse;
          pk.di[base + i] = di;
        }
      }
    }
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t h = 0; h < p.heads_kv; ++h) {
        const Seq s = sequence(p, b);
        const int64_t base = pk.k_base(b, h), pad = pk.k_pad(b);
        const void* k = at(a.k, p.dtype, row_offset(p, a.k, b, h, s.k_row0, 0));
        const void* v = at(a.v, p.dtype, row_offset(p, a.v, b, h, s.k_row0, 0));
        float* kr = pk.k.get() + base * pk.D;
        pack_rows(k, p.dtype, a.k.seq_stride, s.len_k, pk.D, 1.f, kr);
        pack_rows(v, p.dtype, a.v.seq_stride, s.len_k, pk.Dv, 1.f, pk.v.get() + base * pk.Dv);
        float* kt = pk.kt.get() + base * pk.D;  // D x pad, row-major
        transpose(kr, pk.D, s.len_k, pk.D, kt, pad);
        for (int64_t d = 0; d < pk.D; ++d) std::memset(kt + d * pad + s.len_k, 0, sizeof(float) * (pad - s.len_k));
      }
    }
  }
  return pk;
}

struct TileBuffers {
  float *p, *pd, *ds, *keep_scale, *dk, *dv, *partial;
  uint8_t* keep;
  static int64_t floats(int64_t D, int64_t Dv) {
    return 4 * kBlockK * kBlockQ + kBlockK * (D + Dv + std::max(D, Dv)) + kBlockQ * kBlockK / 4 + 16;
  }
  TileBuffers(float* base, int64_t D, int64_t Dv)
      : p(base), pd(p + kBlockK * kBlockQ), ds(pd + kBlockK * kBlockQ), keep_scale(ds + kBlockK * kBlockQ),
        dk(keep_scale + kBlockK * kBlockQ), dv(dk + kBlockK * D), partial(dv + kBlockK * Dv),
        keep(reinterpret_cast<uint8_t*>(partial + kBlockK * std::max(D, Dv))) {}
};

struct Chunking {
  int64_t chunks;
  int64_t tiles_per_chunk(int64_t len_k) const { return ceil_div(ceil_div(len_k, kBlockK), chunks); }
};

void backward_item(const BackwardArgs& a, const Packed& pk, const Chunking& ch, float* dqt, int64_t b, int64_t hk,
                   int64_t c, TileBuffers& buf) {
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  const int64_t D = pk.D, Dv = pk.Dv, group = p.heads_q / p.heads_kv;
  const int64_t tpc = ch.tiles_per_chunk(s.len_k);
  const int64_t t_begin = c * tpc, t_end = std::min(ceil_div(s.len_k, kBlockK), t_begin + tpc);
  const int64_t kbase = pk.k_base(b, hk), kpad = pk.k_pad(b), qpad = pk.q_pad(b);
  const int64_t off = p.causal ? causal_limit(p, s, 0) : 0;  // row i sees keys j <= i + off
  const bool dropout = p.dropout_p > 0.f;
  const float cs = std::fabs(p.scale) * kLog2e;  // as in forward.cpp
  const bool prescale = p.mask_kind != MaskKind::none || cs == 0.f;
  const float row_c = prescale ? 1.f : cs;
  const float drop_scale = p.dropout_p < 1.f ? 1.f / (1.f - p.dropout_p) : 0.f;

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t k0 = t * kBlockK, kb = std::min(kBlockK, s.len_k - k0);
    std::memset(buf.dk, 0, sizeof(float) * kb * D);
    std::memset(buf.dv, 0, sizeof(float) * kb * Dv);
    const float* kr = pk.k.get() + (kbase + k0) * D;
    const float* vr = pk.v.get() + (kbase + k0) * Dv;
    const float* kt = pk.kt.get() + kbase * D + k0;
    // Queries before q_first cannot see any key of this tile.
    const int64_t q_first = p.causal ? std::max<int64_t>(0, k0 - off) : 0;

    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const int64_t qbase = pk.q_base(b, h);
      const float* neg_lse = pk.neg_lse.get() + qbase;
      const float* di = pk.di.get() + qbase;
      for (int64_t q0 = q_first / kBlockQ * kBlockQ; q0 < s.len_q; q0 += kBlockQ) {
        const int64_t qb = std::min(kBlockQ, s.len_q - q0);
        float* P = buf.p;
        gemm(kb, qb, D, kr, D, PanelB{pk.qt.get() + qbase * D, D, q0}, P, kBlockQ, false);
        const bool diagonal = p.causal && q0 + off < k0 + kb - 1;
        for (int64_t j = 0; j < kb; ++j) {
          float* row = P + j * kBlockQ;
          if (prescale) {
            row_scale(row, qb, cs);
          }
          if (p.mask_kind != MaskKind::none) {
            const int64_t* st = p.mask_strides;
            const int64_t base = b * st[0] + h * st[1] + q0 * st[2] + (k0 + j) * st[3];
            if (p.mask_kind == MaskKind::boolean) {
              const uint8_t* m = static_cast<const uint8_t*>(p.mask) + base;
              for (int64_t i = 0; i < qb; ++i) row[i] = m[i * st[2]] ? row[i] : -INFINITY;
            } else {
              const float* m = static_cast<const float*>(p.mask) + base;
              for (int64_t i = 0; i < qb; ++i) row[i] += kLog2e * m[i * st[2]];
            }
          }
          if (diagonal) {
            const int64_t hidden = std::clamp<int64_t>(k0 + j - off - q0, 0, qb);
            for (int64_t i = 0; i < hidden; ++i) row[i] = -INFINITY;
          }
          row_exp2_fma(row, row_c, neg_lse + q0, qb);
        }

        const float* keep_scale = nullptr;
        const float* Pd = P;
        if (dropout) {
          for (int64_t i = 0; i < qb; ++i)
            dropout_row(p.seed, p.offset, lse_index(p, b, h, s, q0 + i), k0, kb, p.dropout_p, buf.keep + i * kBlockK);
          for (int64_t j = 0; j < kb; ++j)
            for (int64_t i = 0; i < qb; ++i) {
              const float ks = buf.keep[i * kBlockK + j] ? drop_scale : 0.f;
              buf.keep_scale[j * kBlockQ + i] = ks;
              buf.pd[j * kBlockQ + i] = P[j * kBlockQ + i] * ks;
            }
          keep_scale = buf.keep_scale;
          Pd = buf.pd;
        }

        // dK and dV sum over every query: add each tile's product as one partial sum, which
        // keeps the fp32 rounding error of long sequences near that of a blocked sum.
        gemm(kb, Dv, qb, Pd, kBlockQ, RowMajorB{pk.dout.get() + (qbase + q0) * Dv, Dv}, buf.partial, Dv, false);
        add_rows(buf.dv, buf.partial, kb * Dv);
        float* dS = buf.ds;
        gemm(kb, qb, Dv, vr, Dv, PanelB{pk.dot.get() + qbase * Dv, Dv, q0}, dS, kBlockQ, false);
        for (int64_t j = 0; j < kb; ++j)
          row_softmax_grad(P + j * kBlockQ, dS + j * kBlockQ, keep_scale ? keep_scale + j * kBlockQ : nullptr, di + q0,
                           dS + j * kBlockQ, qb);
        gemm(kb, D, qb, dS, kBlockQ, RowMajorB{pk.q.get() + (qbase + q0) * D, D}, buf.partial, D, false);
        add_rows(buf.dk, buf.partial, kb * D);
        float* dq_t = dqt + ((c * p.heads_q + h) * pk.q_total + pk.q_off[b]) * D;  // D x qpad
        gemm(D, qb, kb, kt, kpad, RowMajorB{dS, kBlockQ}, dq_t + q0, qpad, true);
      }
    }
    for (int64_t j = 0; j < kb; ++j) {
      store_row(buf.dk + j * D, D, p.scale, p.dtype, at_mut(a.dk, p.dtype, row_offset(p, a.dk, b, hk, s.k_row0, k0 + j)));
      store_row(buf.dv + j * Dv, Dv, 1.f, p.dtype, at_mut(a.dv, p.dtype, row_offset(p, a.dv, b, hk, s.k_row0, k0 + j)));
    }
  }
}

}  // namespace

void backward(const BackwardArgs& a) {
  const Problem& p = a.p;
  const int nthreads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
  const Packed pk = pack(a, nthreads);

  // Split the key tiles of each (sequence, kv head) into chunks when there are too few of
  // those pairs to keep every thread busy (torch's CPU backward stops at batch x heads).
  int64_t max_tiles = 1;
  for (int64_t b = 0; b < p.batch; ++b) max_tiles = std::max(max_tiles, ceil_div(sequence(p, b).len_k, kBlockK));
  const int64_t pairs = p.batch * p.heads_kv;
  const Chunking ch{pairs >= 4 * nthreads ? 1 : std::min(max_tiles, ceil_div(4 * nthreads, std::max<int64_t>(pairs, 1)))};

  const int64_t dqt_size = ch.chunks * p.heads_q * pk.q_total * pk.D;
  Scratch<float> dqt = make_scratch<float>(dqt_size);
  const int64_t per_thread = TileBuffers::floats(pk.D, pk.Dv);
  Scratch<float> scratch = make_scratch<float>(per_thread * nthreads);
  const int64_t items = pairs * ch.chunks;

#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < dqt_size; i += 4096) std::memset(dqt.get() + i, 0, sizeof(float) * std::min<int64_t>(4096, dqt_size - i));

    TileBuffers buf(scratch.get() + per_thread * omp_get_thread_num(), pk.D, pk.Dv);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t c = it % ch.chunks, pair = it / ch.chunks;
      backward_item(a, pk, ch, dqt.get(), pair / p.heads_kv, pair % p.heads_kv, c, buf);
    }

    // dQ = scale * sum over chunks of dQ^T, transposed back, block of rows by block of rows.
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t h = 0; h < p.heads_q; ++h) {
        const Seq s = sequence(p, b);
        const int64_t qpad = pk.q_pad(b), D = pk.D;
        float* rows = buf.p;  // kBlockK * kBlockQ floats >= 16 rows of up to 256
        const int64_t rows_per_block = std::max<int64_t>(1, (kBlockK * kBlockQ) / D);
        for (int64_t i0 = 0; i0 < s.len_q; i0 += rows_per_block) {
          const int64_t n = std::min(rows_per_block, s.len_q - i0);
          std::memset(rows, 0, sizeof(float) * n * D);
          for (int64_t c = 0; c < ch.chunks; ++c) {
            const float* src = dqt.get() + ((c * p.heads_q + h) * pk.q_total + pk.q_off[b]) * D;
            for (int64_t d = 0; d < D; ++d)
              for (int64_t i = 0; i < n; ++i) rows[i * D + d] += src[d * qpad + i0 + i];
          }
          for (int64_t i = 0; i < n; ++i)
            store_row(rows + i * D, D, p.scale, p.dtype, at_mut(a.dq, p.dtype, row_offset(p, a.dq, b, h, s.q_row0, i0 + i)));
        }
      }
    }
  }
}

}  // namespace llmcore::attention::LLMCORE_ISA_NS
