// The forward of forward.cpp for bf16 inputs on CPUs with AMX or AVX512-BF16: the two GEMMs of
// each tile run on bf16 operands with fp32 accumulation (tile_gemm: AMX tiles in the avx512_amx
// build, vdpbf16ps in the avx512_bf16 build; see amx.h), the online softmax stays in fp32
// AVX-512. P is rounded to bf16 before P V, as torch's and FlashAttention's bf16 kernels do; the
// row sums use the fp32 P.
#include <cstdint>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention/cpu/amx.h"
#include "attention/cpu/kernel_common.h"
#include "attention/cpu/row_ops.h"

namespace llmcore::attention::LLMCORE_ISA_NS {
namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 256;

// One (sequence, kv head): K^T and V as VNNI B operands, keys padded to 32.
struct KVPack {
  uint16_t *kt, *v;
  int64_t kpad;
};

int64_t kv_elems(int64_t kpad, const Dims& d) { return kpad * (d.Dp + d.Dvp); }

void pack_kv(const ForwardArgs& a, int64_t b, int64_t h, const Dims& d, int64_t kpad, void*, KVPack& out) {
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  const uint16_t* k = static_cast<const uint16_t*>(at(a.k, p.dtype, row_offset(p, a.k, b, h, s.k_row0, 0)));
  const uint16_t* v = static_cast<const uint16_t*>(at(a.v, p.dtype, row_offset(p, a.v, b, h, s.k_row0, 0)));
  out.kpad = kpad;
  out.v = out.kt + kpad * d.Dp;
  // B of S = Q K^T: K = head dim, N = keys.
  pack_vnni_transposed(k, a.k.seq_stride, s.len_k, d.D, d.Dp, kpad, out.kt);
  // B of O = P V: K = keys, N = value dim. Rows past len_k are zero (P is zero there too,
  // but 0 * garbage could be NaN).
  pack_vnni_rows(v, a.v.seq_stride, s.len_k, d.Dv, kpad, d.Dvp, out.v);
}

struct TileBuffers {
  float *s, *o, *m, *l, *m_new, *alpha;
  uint16_t *q, *pb;
  uint8_t* keep;
  static int64_t floats(const Dims& d) {
    return kBlockQ * kBlockK + kBlockQ * d.Dvp + 4 * kBlockQ + (kBlockQ * d.Dp + kBlockQ * kBlockK) / 2 +
           kBlockQ * kBlockK / 4 + 64;
  }
  TileBuffers(float* base, const Dims& d) {
    s = base;
    o = s + kBlockQ * kBlockK;
    m = o + kBlockQ * d.Dvp;
    l = m + kBlockQ;
    m_new = l + kBlockQ;
    alpha = m_new + kBlockQ;
    q = reinterpret_cast<uint16_t*>(alpha + kBlockQ);
    pb = q + kBlockQ * d.Dp;
    keep = reinterpret_cast<uint8_t*>(pb + kBlockQ * kBlockK);
  }
};

// Query tile qt of head h of sequence b; next_qt: the tile this thread runs next in the same
// head (its query rows are prefetched when it is inside the sequence), or -1. The local path
// passes qt + 1 and runs a head's tiles in order, so there tile qt - 1 asked for qt's rows, and
// a trickle of the next head's K and V rows, stepped once per softmax row of the first key block.
void forward_tile(const ForwardArgs& a, const Dims& d, const KVPack& kv, int64_t b, int64_t h, int64_t qt,
                  int64_t next_qt, TileBuffers& buf, RowTrickle* next_kv = nullptr) {
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  const int64_t q0 = qt * kBlockQ, qb = std::min(kBlockQ, s.len_q - q0);
  float *S = buf.s, *O = buf.o, *m = buf.m, *l = buf.l;

  const SoftmaxScale sc = softmax_scale(p);
  const uint16_t sign = p.scale < 0 ? 0x8000 : 0;  // a negative scale flips Q's sign (exact)
  const int64_t rows = round_up(qb, kTileRows);      // the row blocks the GEMMs read and write
  // A of S = Q K^T: the query rows in place when they fill the blocks as they are (no padding
  // rows or columns, no sign flip), else a zero-padded copy.
  const uint16_t* q_src = static_cast<const uint16_t*>(at(a.q, p.dtype, row_offset(p, a.q, b, h, s.q_row0, q0)));
  const bool in_place = !sign && qb == rows && d.D == d.Dp;
  const uint16_t* A = in_place ? q_src : buf.q;
  const int64_t lda = in_place ? a.q.seq_stride : d.Dp;
  const bool asked = next_qt == qt + 1 && qt > 0;
  if (in_place && !asked) prefetch_rows(A, lda * 2, qb, d.D * 2);
  if (!in_place) {
    copy_padded(q_src, a.q.seq_stride, qb, d.D, rows, d.Dp, buf.q);
    if (sign)
      for (int64_t r = 0; r < qb; ++r)
        for (int64_t x = 0; x < d.D; ++x) buf.q[r * d.Dp + x] ^= sign;
  }
  for (int64_t r = 0; r < qb; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  // O is not cleared: each row block's first P V GEMM overwrites it, and blocks no key reaches
  // are zeroed after the loop.
  constexpr int64_t kBlocks = kBlockQ / kTileRows;
  bool o_written[kBlocks] = {};
  // The next tile's query rows and this tile's output rows (written once, at the end), asked for
  // row by row during the last key block's exp. (Asking for the output rows at all: causal
  // (4,12,512,64) forward -7%. Spreading both over the exp instead of asking in the prologue, bf16
  // (4,12,512,64), builds alternating, medians of 8 runs: causal -3.5%, full 0%; during the first
  // block's exp instead of the last: about the same there, +1% at (1,32,2048,128).)
  const TileRowPrefetch ahead(a, b, h, q0, qb, next_qt, kBlockQ);

  const int64_t k_end = std::min(s.len_k, causal_limit(p, s, q0 + qb - 1) + 1);
  const float drop_scale = p.dropout_p < 1.f ? 1.f / (1.f - p.dropout_p) : 0.f;
  auto visible = [&](int64_t r, int64_t k0, int64_t kb) {
    return std::clamp<int64_t>(causal_limit(p, s, q0 + r) + 1 - k0, 0, kb);
  };

  for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
    const int64_t kb = std::min(kBlockK, k_end - k0), kbc = round_up(kb, kTileCols);
    const bool diagonal = p.causal && visible(0, k0, kb) < kb;
    // Columns each row block computes: on a diagonal tile, what its last row sees; none for a
    // block past the tile's last query (short sequences use only the first). A tile that is not
    // diagonal comes before any that is, and runs as one block of all rows, B read once.
    int64_t cols[kBlocks];
    for (int64_t rb = 0; rb < kBlocks; ++rb) {
      const int64_t last = std::min(rb * kTileRows + kTileRows - 1, qb - 1);
      cols[rb] = rb * kTileRows >= qb ? 0 : !diagonal ? kbc : round_up(visible(last, k0, kb), kTileCols);
    }
    if (!diagonal)
      tile_gemm(rows, kbc, d.Dp, A, lda, vnni_at(kv.kt, d.Dp, 0, k0), d.Dp * 16, S, kBlockK, false);
    else
      for (int64_t rb = 0; rb < kBlocks; ++rb)
        if (cols[rb] > 0)
          tile_gemm(kTileRows, cols[rb], d.Dp, A + rb * kTileRows * lda, lda, vnni_at(kv.kt, d.Dp, 0, k0), d.Dp * 16,
                    S + rb * kTileRows * kBlockK, kBlockK, false);

    if (p.dropout_p > 0.f)  // keep[r * kBlockK + j]
      dropout_block(p.seed, p.offset, lse_index(p, b, h, s, q0), qb, k0, kb, p.dropout_p, false, buf.keep, kBlockK);
    float *m_new = buf.m_new, *alpha = buf.alpha;
    online_softmax_maxima(p, b, h, q0, k0, qb, S, kBlockK, [&](int64_t r) { return diagonal ? visible(r, k0, kb) : kb; },
                          sc, m, m_new, alpha);
    for (int64_t r = 0; r < rows; ++r) {  // rows of the blocks computed
      float* row = S + r * kBlockK;
      uint16_t* prow = buf.pb + r * kBlockK;
      const int64_t width = cols[r / kTileRows];
      if (k0 + kBlockK >= k_end) ahead.row(r);
      if (k0 == 0 && next_kv) next_kv->step();
      const int64_t n = r < qb ? (diagonal ? visible(r, k0, kb) : kb) : 0;
      if (r >= qb || m_new[r] == -INFINITY) {  // padding row, or nothing visible so far
        std::memset(prow, 0, sizeof(uint16_t) * width);
        continue;
      }
      float sum;
      if (p.dropout_p > 0.f) {  // the row sum takes P before dropout
        sum = row_exp2_sum(row, n, exp_factor(sc, m_new[r]), m_new[r]);
        if (n < width) std::memset(row + n, 0, sizeof(float) * (width - n));
        row_dropout(row, buf.keep + r * kBlockK, n, n, drop_scale, nullptr, row);
        to_bf16(row, prow, width);
      } else {
        sum = exp2_to_bf16(row, n, width, exp_factor(sc, m_new[r]), m_new[r], prow);
      }
      if (l[r] > 0.f && alpha[r] != 1.f) row_scale(O + r * d.Dvp, d.Dv, alpha[r]);
      l[r] = l[r] * alpha[r] + sum;
      m[r] = m_new[r];
    }
    if (!diagonal) {
      tile_gemm(rows, d.Dvp, kbc, buf.pb, kBlockK, vnni_at(kv.v, kv.kpad, k0, 0), kv.kpad * 16, O, d.Dvp, o_written[0]);
      std::fill_n(o_written, kBlocks, true);
    } else {
      for (int64_t rb = 0; rb < kBlocks; ++rb)
        if (cols[rb] > 0) {
          tile_gemm(kTileRows, d.Dvp, cols[rb], buf.pb + rb * kTileRows * kBlockK, kBlockK,
                    vnni_at(kv.v, kv.kpad, k0, 0), kv.kpad * 16, O + rb * kTileRows * d.Dvp, d.Dvp, o_written[rb]);
          o_written[rb] = true;
        }
    }
  }
  for (int64_t rb = 0; rb * kTileRows < qb; ++rb)
    if (!o_written[rb]) std::memset(O + rb * kTileRows * d.Dvp, 0, sizeof(float) * kTileRows * d.Dvp);

  for (int64_t r = 0; r < qb; ++r) {
    const bool any = l[r] != 0.f;  // as in forward.cpp
    store_row(O + r * d.Dvp, d.Dv, any ? 1.f / l[r] : 0.f, p.dtype,
              at_mut(a.o, p.dtype, row_offset(p, a.o, b, h, s.q_row0, q0 + r)));
  }
  row_lse(m, l, qb, a.lse + lse_index(p, b, h, s, q0));  // a tile's rows are adjacent in lse
}

}  // namespace

void forward(const ForwardArgs& a) {
  const Problem& p = a.p;
  const int nthreads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
  const Dims d = amx_dims(p);
  const int64_t group = p.heads_q / p.heads_kv, pairs = p.batch * p.heads_kv;

  int64_t max_k = 0, total = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    max_k = std::max(max_k, round_up(sequence(p, b).len_k, 32));
    total += round_up(sequence(p, b).len_k, 32);
  }
  // Local: each thread packs a (sequence, kv head) and runs all its query tiles while the pack
  // sits in its L2 (2 MB a core here); packs of up to 1 MB (2048 keys at head dim 128) measured
  // faster local than packed up front into one shared buffer, whose writes and re-reads go
  // through memory (1 x 32 x 2048 x 128 with torch interleaved: causal forward -12%, full -3%).
  const bool local = pairs >= 2 * nthreads && kv_elems(max_k, d) * 2 <= (1 << 20);
  const int64_t shared_elems = local ? 0 : p.heads_kv * kv_elems(total, d);
  const int64_t per_thread = TileBuffers::floats(d) + (local ? kv_elems(max_k, d) / 2 + 16 : 0);

  Workspace ws;
  ws.reserve(2 * ws_bytes(sizeof(int64_t) * (p.batch + 1)) + ws_bytes(sizeof(uint16_t) * shared_elems) +
             ws_bytes(sizeof(float) * per_thread * nthreads));
  int64_t* offset = ws.carve<int64_t>(p.batch + 1);  // padded key offset of each sequence
  int64_t* first = ws.carve<int64_t>(p.batch + 1);   // first work item of each sequence
  uint16_t* shared = ws.carve<uint16_t>(shared_elems);
  float* scratch = ws.carve<float>(per_thread * nthreads);
  offset[0] = first[0] = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const Seq s = sequence(p, b);
    offset[b + 1] = offset[b] + round_up(s.len_k, 32);
    first[b + 1] = first[b] + p.heads_q * ceil_div(s.len_q, kBlockQ);
  }
  // Shared packs: kv head h of sequence b at (h * total + offset[b]) * (Dp + Dvp).
  auto shared_pack = [&](int64_t b, int64_t h) {
    return KVPack{shared + (h * total + offset[b]) * (d.Dp + d.Dvp), nullptr, offset[b + 1] - offset[b]};
  };

#pragma omp parallel num_threads(nthreads)
  {
    TileScope tiles;
    float* mine = scratch + per_thread * omp_get_thread_num();
    TileBuffers buf(mine, d);
    if (local) {
      uint16_t* own = reinterpret_cast<uint16_t*>(mine + TileBuffers::floats(d));
      const int64_t chunk = local_chunk(p, nthreads);
#pragma omp for schedule(dynamic, chunk)
      for (int64_t it = 0; it < pairs; ++it) {
        const int64_t b = it / p.heads_kv, hk = it % p.heads_kv;
        const Seq s = sequence(p, b);
        KVPack kv{own, nullptr, 0};
        pack_kv(a, b, hk, d, round_up(s.len_k, 32), nullptr, kv);
        const int64_t nq = ceil_div(s.len_q, kBlockQ);
        // The next pair's K and V rows, over the softmax rows of this pair's first key blocks.
        // bf16, a torch SDPA forward + backward before each call (kernels alone, builds
        // alternating, medians of 3-4 runs), causal / full: (4,12,512,64) -10% / -6%,
        // (2,16,1024,64) -4% / -1%, (16,12,128,32) -12% / -14%, (32,12,64,32) -18% / -14%;
        // without torch between, within noise.
        RowTrickle next_kv;
        if (const int64_t nit = likely_next_item(it, chunk, nthreads, pairs); nit >= 0) {
          const int64_t nb = nit / p.heads_kv, nh = nit % p.heads_kv, es = elem_size(p.dtype);
          const Seq ns = sequence(p, nb);
          next_kv.add(at(a.k, p.dtype, row_offset(p, a.k, nb, nh, ns.k_row0, 0)), a.k.seq_stride * es, d.D * es);
          next_kv.add(at(a.v, p.dtype, row_offset(p, a.v, nb, nh, ns.k_row0, 0)), a.v.seq_stride * es, d.Dv * es);
          next_kv.spread(ns.len_k, group * round_up(s.len_q, kTileRows));
        }
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
          for (int64_t qt = 0; qt < nq; ++qt) forward_tile(a, d, kv, b, h, qt, qt + 1, buf, &next_kv);
      }
    } else {
#pragma omp for schedule(dynamic, 1) collapse(2)
      for (int64_t b = 0; b < p.batch; ++b)
        for (int64_t hk = 0; hk < p.heads_kv; ++hk) {
          KVPack kv = shared_pack(b, hk);
          pack_kv(a, b, hk, d, kv.kpad, nullptr, kv);
        }
      const int64_t items = first[p.batch];
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t b = std::upper_bound(first, first + p.batch + 1, it) - first - 1;
        const int64_t nq = ceil_div(sequence(p, b).len_q, kBlockQ);
        const int64_t rem = it - first[b], h = rem / nq;
        const int64_t qt = p.causal ? nq - 1 - rem % nq : rem % nq;
        KVPack kv = shared_pack(b, h / group);
        kv.v = kv.kt + kv.kpad * d.Dp;
        forward_tile(a, d, kv, b, h, qt, -1, buf);
      }
    }
  }
}

}  // namespace llmcore::attention::LLMCORE_ISA_NS
