// Flash-attention backward on the CPU, in the transposed form: for a key tile j and a query
// tile i it computes S^T = K_j Q_i^T, so P^T, dP^T and dS^T come out with keys as rows and
// no GEMM needs a per-tile transpose:
//   dV_j += P^T_j dO_i      dP^T = V_j dO_i^T      dS^T = P^T * (dP^T - D_i)
//   dK_j += dS^T Q_i        dQ_i += dS_i K_j  (dS read down the columns of dS^T: gemm<true>)
// Work items are (sequence, kv head, chunk of key tiles), so GQA heads never race on dK/dV.
// Two layouts share that loop:
//  - local: many short heads. Each item packs its group's operands into the thread's own
//    buffers, takes every key tile, and writes dQ itself; nothing round-trips through memory.
//  - shared: long sequences or few heads. Operands are packed once for all items, key tiles
//    are split into chunks so small batch x heads still fills every thread (torch's CPU
//    backward stops at batch x heads), each chunk accumulates dQ in its own buffer and a
//    final pass sums the chunks.
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
constexpr int64_t kBlockK = 64;
// Keys per band of a diagonal tile (see backward_tiles): 16 measured ~2% faster than 32
// on causal 512-token heads.
constexpr int64_t kBand = 16;
static_assert(kBlockQ % NR == 0, "query tiles are whole panels");

// The fp32 operands of one (sequence, kv head) group: its kv head and its query heads.
// Query head g of the group starts g * q_head_rows rows after head 0 in the packed q
// buffers (qt, dot, neg_lse, di). The row operands (k, v, q, dout) are either packed copies
// or, for fp32 inputs, the inputs themselves: hence their own row strides (ld) and the
// element step from one query head to the next.
struct GroupView {
  const float *qt, *dot, *neg_lse, *di;  // qt/dot: panels of queries
  int64_t q_head_rows;
  const float *k, *v, *q, *dout;  // head 0 of the group for q and dout
  int64_t k_ld, v_ld, q_ld, dout_ld, q_step, dout_step;
};

// fp32 inputs are read in place: the row operands need no copy (a third of the packing time
// of a 512-token backward).
bool rows_in_place(const Problem& p) { return p.dtype == DType::f32; }

// The row operands of group (b, hk): the inputs in place, or the packed copies at the given
// rows (q_row0: the group's first query head; k_row0: the kv head) of buffers whose query
// heads are q_head_rows apart.
void set_rows(const BackwardArgs& a, int64_t b, int64_t hk, const float* k, const float* v, const float* q,
              const float* dout, int64_t q_head_rows, GroupView& g) {
  const Problem& p = a.p;
  const int64_t D = p.head_dim, Dv = p.head_dim_v;
  if (rows_in_place(p)) {
    const Seq s = sequence(p, b);
    const int64_t h0 = hk * (p.heads_q / p.heads_kv);
    g.k = static_cast<const float*>(at(a.k, p.dtype, row_offset(p, a.k, b, hk, s.k_row0, 0)));
    g.v = static_cast<const float*>(at(a.v, p.dtype, row_offset(p, a.v, b, hk, s.k_row0, 0)));
    g.q = static_cast<const float*>(at(a.q, p.dtype, row_offset(p, a.q, b, h0, s.q_row0, 0)));
    g.dout = static_cast<const float*>(at(a.dout, p.dtype, row_offset(p, a.dout, b, h0, s.q_row0, 0)));
    g.k_ld = a.k.seq_stride, g.v_ld = a.v.seq_stride, g.q_ld = a.q.seq_stride, g.dout_ld = a.dout.seq_stride;
    g.q_step = a.q.head_stride, g.dout_step = a.dout.head_stride;
  } else {
    g.k = k, g.v = v, g.q = q, g.dout = dout;
    g.k_ld = D, g.v_ld = Dv, g.q_ld = D, g.dout_ld = Dv;
    g.q_step = q_head_rows * D, g.dout_step = q_head_rows * Dv;
  }
}

// Floats per padded row of the packed buffers: the q side holds Q^T and dO^T panels, -lse and
// D_i, plus Q and dO row copies unless the inputs are read in place; the k side K and V copies
// likewise (nothing for fp32).
int64_t q_floats(int64_t qpad, int64_t D, int64_t Dv, bool copies) {
  return qpad * (D + Dv + 2 + (copies ? D + Dv : 0));
}
int64_t k_floats(int64_t rows, int64_t D, int64_t Dv, bool copies) { return copies ? rows * (D + Dv) : 0; }

// Packs query head h of sequence b at row `row` of the q buffers (rows of q_total).
struct QBuffers {
  float *qt, *dot, *neg_lse, *di;
  float *q = nullptr, *dout = nullptr;  // row copies, when the inputs are not read in place
  int64_t total;                        // rows per head slot
};
struct KBuffers {
  float *k = nullptr, *v = nullptr;
};

QBuffers carve_q(float* base, int64_t rows, int64_t heads, int64_t D, int64_t Dv, bool copies) {
  QBuffers qb;
  qb.total = rows;
  qb.qt = base;
  qb.dot = qb.qt + heads * rows * D;
  qb.neg_lse = qb.dot + heads * rows * Dv;
  qb.di = qb.neg_lse + heads * rows;
  if (copies) {
    qb.q = qb.di + heads * rows;
    qb.dout = qb.q + heads * rows * D;
  }
  return qb;
}

KBuffers carve_k(float* base, int64_t rows, int64_t heads, int64_t D, int64_t Dv, bool copies) {
  KBuffers kb;
  if (copies) {
    kb.k = base;
    kb.v = kb.k + heads * rows * D;
  }
  return kb;
}

// Writes query head h of sequence b into slot `slot` (row offset in the buffers).
void pack_q_head(const BackwardArgs& a, int64_t b, int64_t h, const QBuffers& qb, int64_t slot, float* rows,
                 float* row2) {
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  const int64_t D = p.head_dim, Dv = p.head_dim_v, pad = alias_free(panel_padded(s.len_q, kBlockQ));
  const void* q = at(a.q, p.dtype, row_offset(p, a.q, b, h, s.q_row0, 0));
  const void* dout = at(a.dout, p.dtype, row_offset(p, a.dout, b, h, s.q_row0, 0));
  // Each input is read once: rows (copied to fp32 unless fp32 already), then the transposed
  // panels from the rows. Q^T for the scores carries only the sign of the scale (see
  // forward.cpp).
  const bool in_place = rows_in_place(p);
  const float* qr = in_place ? static_cast<const float*>(q) : qb.q + slot * D;
  const float* gr = in_place ? static_cast<const float*>(dout) : qb.dout + slot * Dv;
  const int64_t q_ld = in_place ? a.q.seq_stride : D, g_ld = in_place ? a.dout.seq_stride : Dv;
  if (!in_place) {
    pack_rows(q, p.dtype, a.q.seq_stride, s.len_q, D, 1.f, qb.q + slot * D);
    pack_rows(dout, p.dtype, a.dout.seq_stride, s.len_q, Dv, 1.f, qb.dout + slot * Dv);
  }
  panels_from_rows(qr, q_ld, s.len_q, D, p.scale < 0, rows, qb.qt + slot * D);
  panels_from_rows(gr, g_ld, s.len_q, Dv, false, rows, qb.dot + slot * Dv);
  // D_i = dO . O rounded as the GEMM rounds dP = dO . V: dS = P (dP - D_i) cancels, and
  // where one key dominates (O = V_j) the cancellation is then exact. Non-fp32 O goes
  // through the tile-sized row2 buffer (NR rows) a block at a time.
  for (int64_t i0 = 0; i0 < s.len_q; i0 += NR) {
    const int64_t n = std::min<int64_t>(NR, s.len_q - i0);
    const void* o = at(a.o, p.dtype, row_offset(p, a.o, b, h, s.q_row0, i0));
    if (in_place) {
      rowwise_dot_like_gemm(static_cast<const float*>(o), a.o.seq_stride, gr + i0 * g_ld, g_ld, n, Dv,
                            qb.di + slot + i0, kHeadDimChainK);
    } else {
      pack_rows(o, p.dtype, a.o.seq_stride, n, Dv, 1.f, row2);
      rowwise_dot_like_gemm(row2, Dv, gr + i0 * g_ld, g_ld, n, Dv, qb.di + slot + i0, kHeadDimChainK);
    }
  }
  for (int64_t i = 0; i < pad; ++i) {
    float neg_lse = -INFINITY;  // padding and fully masked rows: P = 0
    if (i < s.len_q) {
      const float lse = a.lse[lse_index(p, b, h, s, i)];
      if (lse != -INFINITY) neg_lse = -lse;
    } else {
      qb.di[slot + i] = 0.f;
    }
    qb.neg_lse[slot + i] = neg_lse;
  }
}

// K and V rows as fp32 copies (fp32 inputs are read in place: nothing to pack).
void pack_k_head(const BackwardArgs& a, int64_t b, int64_t h, const KBuffers& kb, int64_t slot) {
  const Problem& p = a.p;
  if (rows_in_place(p)) return;
  const Seq s = sequence(p, b);
  const int64_t D = p.head_dim, Dv = p.head_dim_v;
  pack_rows(at(a.k, p.dtype, row_offset(p, a.k, b, h, s.k_row0, 0)), p.dtype, a.k.seq_stride, s.len_k, D, 1.f,
            kb.k + slot * D);
  pack_rows(at(a.v, p.dtype, row_offset(p, a.v, b, h, s.k_row0, 0)), p.dtype, a.v.seq_stride, s.len_k, Dv, 1.f,
            kb.v + slot * Dv);
}

struct TileBuffers {
  float *p, *pd, *ds, *keep_scale, *dk, *dv, *partial, *rows, *row2;
  uint8_t* keep;
  static int64_t floats(int64_t D, int64_t Dv) {
    const int64_t DD = std::max(D, Dv);
    return 4 * kBlockK * kBlockQ + kBlockK * (D + Dv + DD) + 2 * NR * DD + kBlockQ * kBlockK / 4 + 16;
  }
  TileBuffers(float* base, int64_t D, int64_t Dv) {
    const int64_t DD = std::max(D, Dv);
    p = base;
    pd = p + kBlockK * kBlockQ;
    ds = pd + kBlockK * kBlockQ;
    keep_scale = ds + kBlockK * kBlockQ;
    dk = keep_scale + kBlockK * kBlockQ;
    dv = dk + kBlockK * D;
    partial = dv + kBlockK * Dv;
    rows = partial + kBlockK * DD;
    row2 = rows + NR * DD;
    keep = reinterpret_cast<uint8_t*>(row2 + NR * DD);
  }
};

// Key tiles [t_begin, t_end) of one group. dq_of(g) is the dQ accumulator (len_q x D, row-major)
// of the group's query head g.
template <class DqOf>
void backward_tiles(const BackwardArgs& a, const GroupView& g, int64_t b, int64_t hk, int64_t t_begin, int64_t t_end,
                    const DqOf& dq_of, TileBuffers& buf) {
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  const int64_t D = p.head_dim, Dv = p.head_dim_v, group = p.heads_q / p.heads_kv;
  const int64_t off = p.causal ? causal_limit(p, s, 0) : 0;  // row i sees keys j <= i + off
  const bool dropout = p.dropout_p > 0.f;
  const float drop_scale = p.dropout_p < 1.f ? 1.f / (1.f - p.dropout_p) : 0.f;
  const SoftmaxScale sc = softmax_scale(p);

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t k0 = t * kBlockK, kb = std::min(kBlockK, s.len_k - k0);
    const float* kr = g.k + k0 * g.k_ld;
    const float* vr = g.v + k0 * g.v_ld;
    if (rows_in_place(p)) {  // the first GEMMs of the tile read these rows
      prefetch_rows(vr, g.v_ld * 4, kb, Dv * 4);  // V first: measured faster than K first
      prefetch_rows(kr, g.k_ld * 4, kb, D * 4);
    }
    bool first_q = true;  // dK and dV start from the first tile's product
    // Queries before q_first cannot see any key of this tile.
    const int64_t q_first = p.causal ? std::max<int64_t>(0, k0 - off) : 0;

    for (int64_t gh = 0; gh < group; ++gh) {
      const int64_t h = hk * group + gh, qrow = gh * g.q_head_rows;
      const float* neg_lse = g.neg_lse + qrow;
      const float* di = g.di + qrow;
      float* dq = dq_of(gh);
      for (int64_t q0 = q_first / kBlockQ * kBlockQ; q0 < s.len_q; q0 += kBlockQ) {
        const int64_t qb = std::min(kBlockQ, s.len_q - q0), width = panel_width(s.len_q);
        const bool diagonal = p.causal && q0 + off < k0 + kb - 1;
        const bool scaled = scale_first(sc, neg_lse + q0, qb);  // rows scaled before the exp
        if (dropout)  // keep[key * kBlockQ + query]
          dropout_block(p.seed, p.offset, lse_index(p, b, h, s, q0), qb, k0, kb, p.dropout_p, true, buf.keep, kBlockQ);
        // A diagonal tile runs as bands of kBand keys; each band starts at the first query its
        // first key is visible to, so the hidden lower-left blocks are never computed.
        const int64_t bands = diagonal ? ceil_div(kb, kBand) : 1;
        for (int64_t band = 0; band < bands; ++band) {
          const int64_t r0 = band * kBand, r1 = bands == 1 ? kb : std::min(kb, r0 + kBand);
          const int64_t c0 = diagonal ? std::clamp<int64_t>(k0 + r0 - off - q0, 0, qb) : 0;
          const int64_t m = r1 - r0, n = qb - c0;
          float* P = buf.p + r0 * kBlockQ + c0;  // band rows, columns from c0; row stride kBlockQ
          float* dS = buf.ds + r0 * kBlockQ + c0;
          float* dv = buf.dv + r0 * Dv;
          float* dk = buf.dk + r0 * D;
          if (n == 0) {  // this band sees no query of the tile
            if (first_q) {
              std::memset(dv, 0, sizeof(float) * m * Dv);
              std::memset(dk, 0, sizeof(float) * m * D);
            }
            continue;
          }
          gemm(m, n, D, kr + r0 * g.k_ld, g.k_ld, PanelB{g.qt + qrow * D, D, q0 + c0, width}, P, kBlockQ, false,
               kHeadDimChainK);
          for (int64_t j = r0; j < r1; ++j) {
            float* row = P + (j - r0) * kBlockQ;
            if (scaled) row_scale(row, n, sc.c);
            if (p.mask_kind != MaskKind::none) apply_user_mask_to_key(p, b, h, q0 + c0, k0 + j, n, row);
            // On a diagonal tile the queries before key j's first viewer get P = 0.
            const int64_t hidden = diagonal ? std::clamp<int64_t>(k0 + j - off - q0 - c0, 0, n) : 0;
            row_exp2_fma(row, scaled ? 1.f : sc.row_c, neg_lse + q0 + c0, n, hidden);
          }

          const float* keep_scale = nullptr;
          const float* Pd = P;
          if (dropout) {
            float* ks_band = buf.keep_scale + r0 * kBlockQ + c0;
            float* pd_band = buf.pd + r0 * kBlockQ + c0;
            for (int64_t j = r0; j < r1; ++j)
              row_dropout(P + (j - r0) * kBlockQ, buf.keep + j * kBlockQ + c0, n, n, drop_scale,
                          ks_band + (j - r0) * kBlockQ, pd_band + (j - r0) * kBlockQ);
            keep_scale = ks_band;
            Pd = pd_band;
          }

          // dK and dV sum over every query: each query tile's product is added as one
          // partial sum, which keeps fp32 rounding on long sequences near a blocked sum's.
          gemm(m, Dv, n, Pd, kBlockQ, RowMajorB{g.dout + gh * g.dout_step + (q0 + c0) * g.dout_ld, g.dout_ld},
               first_q ? dv : buf.partial, Dv, false);
          if (!first_q) add_rows(dv, buf.partial, m * Dv);
          gemm(m, n, Dv, vr + r0 * g.v_ld, g.v_ld, PanelB{g.dot + qrow * Dv, Dv, q0 + c0, width}, dS, kBlockQ, false,
               kHeadDimChainK);
          for (int64_t j = 0; j < m; ++j)
            row_softmax_grad(P + j * kBlockQ, dS + j * kBlockQ, keep_scale ? keep_scale + j * kBlockQ : nullptr,
                             di + q0 + c0, dS + j * kBlockQ, n);
          gemm(m, D, n, dS, kBlockQ, RowMajorB{g.q + gh * g.q_step + (q0 + c0) * g.q_ld, g.q_ld},
               first_q ? dk : buf.partial, D, false);
          if (!first_q) add_rows(dk, buf.partial, m * D);
          gemm<true>(n, D, m, dS, kBlockQ, RowMajorB{kr + r0 * g.k_ld, g.k_ld}, dq + (q0 + c0) * D, D, true);
        }
        first_q = false;
      }
    }
    if (first_q) {  // no query sees this key tile
      std::memset(buf.dk, 0, sizeof(float) * kb * D);
      std::memset(buf.dv, 0, sizeof(float) * kb * Dv);
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
  const int64_t D = p.head_dim, Dv = p.head_dim_v, group = p.heads_q / p.heads_kv;
  const int64_t pairs = p.batch * p.heads_kv;

  int64_t max_q = 0, max_k = 0, q_total = 0, k_total = 0, max_tiles = 1;
  for (int64_t b = 0; b < p.batch; ++b) {
    const Seq s = sequence(p, b);
    max_q = std::max(max_q, alias_free(panel_padded(s.len_q, kBlockQ)));
    max_k = std::max(max_k, s.len_k);  // K and V copies are read row by row: no padding
    q_total += alias_free(panel_padded(s.len_q, kBlockQ));
    k_total += s.len_k;
    max_tiles = std::max(max_tiles, ceil_div(s.len_k, kBlockK));
  }
  // One group's packed operands plus its dQ, per thread.
  const bool copies = !rows_in_place(p);
  const int64_t group_floats =
      group * q_floats(max_q, D, Dv, copies) + k_floats(max_k, D, Dv, copies) + group * max_q * D;
  const bool local = pairs >= 2 * nthreads && group_floats * 4 <= (1 << 20);
  const int64_t chunks = backward_chunks(local, pairs, nthreads, max_tiles);

  const int64_t tile_floats = TileBuffers::floats(D, Dv);
  const int64_t per_thread = tile_floats + (local ? group_floats : 0);
  const int64_t shared_floats =
      local ? 0 : p.heads_q * q_floats(q_total, D, Dv, copies) + p.heads_kv * k_floats(k_total, D, Dv, copies) +
                      chunks * p.heads_q * q_total * D;
  Workspace ws;
  ws.reserve(2 * ws_bytes(sizeof(int64_t) * (p.batch + 1)) + ws_bytes(sizeof(float) * per_thread * nthreads) +
             ws_bytes(sizeof(float) * shared_floats));
  int64_t* q_off = ws.carve<int64_t>(p.batch + 1);
  int64_t* k_off = ws.carve<int64_t>(p.batch + 1);
  float* scratch = ws.carve<float>(per_thread * nthreads);
  float* shared = ws.carve<float>(shared_floats);
  q_off[0] = k_off[0] = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const Seq s = sequence(p, b);
    q_off[b + 1] = q_off[b] + alias_free(panel_padded(s.len_q, kBlockQ));
    k_off[b + 1] = k_off[b] + s.len_k;
  }

  if (local) {
#pragma omp parallel num_threads(nthreads)
    {
      float* mine = scratch + per_thread * omp_get_thread_num();
      TileBuffers buf(mine, D, Dv);
      float* gbase = mine + tile_floats;
      const QBuffers qb = carve_q(gbase, max_q, group, D, Dv, copies);
      float* kbase = gbase + group * q_floats(max_q, D, Dv, copies);
      const KBuffers kb = carve_k(kbase, max_k, 1, D, Dv, copies);
      float* dq_acc = kbase + k_floats(max_k, D, Dv, copies);  // group x qpad x D
#pragma omp for schedule(dynamic, local_chunk(p, nthreads))
      for (int64_t it = 0; it < pairs; ++it) {
        const int64_t b = it / p.heads_kv, hk = it % p.heads_kv;
        const Seq s = sequence(p, b);
        const int64_t qpad = alias_free(panel_padded(s.len_q, kBlockQ));
        for (int64_t gh = 0; gh < group; ++gh)
          pack_q_head(a, b, hk * group + gh, qb, gh * max_q, buf.rows, buf.row2);
        pack_k_head(a, b, hk, kb, 0);
        GroupView g{qb.qt, qb.dot, qb.neg_lse, qb.di, max_q};
        set_rows(a, b, hk, kb.k, kb.v, qb.q, qb.dout, max_q, g);
        std::memset(dq_acc, 0, sizeof(float) * group * D * qpad);
        backward_tiles(a, g, b, hk, 0, ceil_div(s.len_k, kBlockK), [&](int64_t gh) { return dq_acc + gh * D * qpad; },
                       buf);
        for (int64_t gh = 0; gh < group; ++gh) write_dq_rows(a, b, hk * group + gh, dq_acc + gh * D * qpad, D, 1, 0);
      }
    }
    return;
  }

  const QBuffers qb = carve_q(shared, q_total, p.heads_q, D, Dv, copies);
  float* kbase = shared + p.heads_q * q_floats(q_total, D, Dv, copies);
  const KBuffers kb = carve_k(kbase, k_total, p.heads_kv, D, Dv, copies);
  float* dq_acc = kbase + p.heads_kv * k_floats(k_total, D, Dv, copies);  // chunks x Hq x (qpad x D per sequence)
  const int64_t dq_acc_size = chunks * p.heads_q * q_total * D;
  auto dq_acc_of = [&](int64_t c, int64_t h, int64_t b) {
    return dq_acc + ((c * p.heads_q + h) * q_total + q_off[b]) * D;
  };

#pragma omp parallel num_threads(nthreads)
  {
    TileBuffers buf(scratch + per_thread * omp_get_thread_num(), D, Dv);
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < dq_acc_size; i += 4096)
      std::memset(dq_acc + i, 0, sizeof(float) * std::min<int64_t>(4096, dq_acc_size - i));
#pragma omp for schedule(dynamic, 1) collapse(2) nowait
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.heads_q; ++h) pack_q_head(a, b, h, qb, h * q_total + q_off[b], buf.rows, buf.row2);
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.heads_kv; ++h) pack_k_head(a, b, h, kb, h * k_total + k_off[b]);

#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < pairs * chunks; ++it) {
      const int64_t c = it % chunks, pair = it / chunks, b = pair / p.heads_kv, hk = pair % p.heads_kv;
      const Seq s = sequence(p, b);
      const int64_t ntiles = ceil_div(s.len_k, kBlockK), tpc = ceil_div(ntiles, chunks);
      const int64_t qrow0 = (hk * group) * q_total + q_off[b], krow0 = hk * k_total + k_off[b];
      GroupView g{qb.qt + qrow0 * D, qb.dot + qrow0 * Dv, qb.neg_lse + qrow0, qb.di + qrow0, q_total};
      if (copies)
        set_rows(a, b, hk, kb.k + krow0 * D, kb.v + krow0 * Dv, qb.q + qrow0 * D, qb.dout + qrow0 * Dv, q_total, g);
      else
        set_rows(a, b, hk, nullptr, nullptr, nullptr, nullptr, q_total, g);
      backward_tiles(a, g, b, hk, c * tpc, std::min(ntiles, (c + 1) * tpc),
                     [&](int64_t gh) { return dq_acc_of(c, hk * group + gh, b); }, buf);
    }

#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.heads_q; ++h)
        write_dq_rows(a, b, h, dq_acc_of(0, h, b), D, chunks, p.heads_q * q_total * D);
  }
}

}  // namespace llmcore::attention::LLMCORE_ISA_NS
