// The backward of backward.cpp for bf16 inputs on CPUs with AMX or AVX512-BF16: the same
// transposed formulation and work split, with all five GEMMs of a tile on bf16 operands with
// fp32 accumulation (tile_gemm: AMX tiles or vdpbf16ps, see amx.h) and the softmax gradient in
// fp32 AVX-512. P and dS are rounded to bf16 before they enter a GEMM, as torch's and
// FlashAttention's bf16 kernels do. Compiled into the avx512_amx and avx512_bf16 builds.
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
constexpr int64_t kBlockK = 64;
// Packs pad each sequence's queries and keys to the AMX granule only: a 15-token sentence packs 32
// rows, not a whole 64-row tile (the tile loops never read past round_up(len, 32)).
constexpr int64_t kPad = 32;
// Keys per band of a diagonal tile: AMX's 32-row tiles, or 16 where tile_gemm takes 8-row blocks
// (AVX512-BF16: causal/full backward at (4,12,512,64) 0.576-0.580 with 32, 0.571-0.577 with 16).
constexpr int64_t kBand = kTileRows == 8 ? 16 : 32;

// Per query head (qpad rows): bf16 VNNI operands and fp32 row statistics.
struct QPack {
  uint16_t *qt, *q, *dot, *dout;  // B of S^T, dK, dP^T, dV
  float *neg_lse, *di;
};
int64_t q_elems(int64_t qpad, const Dims& d) { return qpad * (2 * d.Dp + 2 * d.Dvp) + 4 * qpad; }  // in bf16 units
QPack carve_q(uint16_t* base, int64_t qpad, const Dims& d) {
  QPack q;
  q.qt = base;
  q.q = q.qt + qpad * d.Dp;
  q.dot = q.q + qpad * d.Dp;
  q.dout = q.dot + qpad * d.Dvp;
  q.neg_lse = reinterpret_cast<float*>(q.dout + qpad * d.Dvp);
  q.di = q.neg_lse + qpad;
  return q;
}

// dQ accumulates as rows, dQ = dS K, with K packed once per kv head like any B operand (VNNI
// rows along the keys), so no GEMM reads A rows kpad elements apart and the sum needs no transpose
// at the end. dS comes from the dS^T tile: tile_gemm_tn reads it straight out of the tile's VNNI
// pack with dot products; AMX A tiles must be row-major, so there the tile is transposed first.
// (Dot products, bf16 backward with torch interleaved, causal / full, against dQ^T = K^T dS^T:
// (4,12,512,64) -7% / -4%, (2,16,1024,64) -10% / -6%, (1,32,2048,128) -8% / -5%.)

// Per kv head (kpad rows): A operands of S^T, dP^T (K and V rows, ldk and ldv elements apart)
// and K for the dQ GEMM (kdq: K as a VNNI B operand, kpad x Dp). The rows are the inputs
// themselves when they fill whole 32-row blocks and head dims (nothing to pad), else zero-padded
// copies in the pack.
struct KPack {
  const uint16_t *k, *v;
  int64_t ldk, ldv;
  uint16_t *k_copy, *v_copy, *kdq;
};
int64_t k_elems(int64_t kpad, const Dims& d) { return kpad * (2 * d.Dp + d.Dvp); }
KPack carve_k(const BackwardArgs& a, int64_t b, int64_t h, const Dims& d, uint16_t* base, int64_t kpad) {
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  KPack k;
  k.k_copy = base;
  k.v_copy = k.k_copy + kpad * d.Dp;
  k.kdq = k.v_copy + kpad * d.Dvp;
  const bool in_place = s.len_k == kpad && d.D == d.Dp && d.Dv == d.Dvp && a.k.seq_stride % 2 == 0;
  k.k = in_place ? static_cast<const uint16_t*>(at(a.k, p.dtype, row_offset(p, a.k, b, h, s.k_row0, 0))) : k.k_copy;
  k.v = in_place ? static_cast<const uint16_t*>(at(a.v, p.dtype, row_offset(p, a.v, b, h, s.k_row0, 0))) : k.v_copy;
  k.ldk = in_place ? a.k.seq_stride : d.Dp;
  k.ldv = in_place ? a.v.seq_stride : d.Dvp;
  return k;
}

// di[i] = dO_i . O_i (D_i of the softmax gradient) for the qpad rows of a query pack; a row past
// rows gets 0. dot is the pack's VNNI dO^T (the dP GEMM's B operand).
#ifndef LLMCORE_BF16_DOT
// AMX rounds dP its own way, so no chain order to match here (unlike backward.cpp): a vector dot
// per row, in fp32 lanes (exact products, no particular rounding order for the sum).
void fill_di(const uint16_t* o, int64_t o_ld, const uint16_t* g, int64_t g_ld, int64_t rows, const Dims& d,
             int64_t qpad, const uint16_t*, float* di) {
  auto widen = [](const uint16_t* x) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
  };
  for (int64_t r = 0; r < qpad; ++r) {
    if (r >= rows) {
      di[r] = 0.f;
      continue;
    }
    const uint16_t *a = o + r * o_ld, *b = g + r * g_ld;
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d.Dv; i += 16) acc = _mm512_fmadd_ps(widen(a + i), widen(b + i), acc);
    float sum = _mm512_reduce_add_ps(acc);
    for (; i < d.Dv; ++i) sum += bf16_to_f32(a[i]) * bf16_to_f32(b[i]);
    di[r] = sum;
  }
}
#else
// Rounded exactly as tile_gemm rounds dP = dO . V: lane i of one vdpbf16ps chain over O^T and dO^T
// pairs runs the very operations of dP's lane i, so where one key dominates (O_i = V_j) dP - D_i
// cancels exactly, as backward.cpp arranges for fp32.
void fill_di(const uint16_t* o, int64_t o_ld, const uint16_t*, int64_t, int64_t rows, const Dims& d, int64_t qpad,
             const uint16_t* dot, float* di) {
  alignas(64) uint16_t ot[32 * 256];  // O^T of 32 rows, VNNI-packed like dot (head dims up to 256)
  for (int64_t i0 = 0; i0 < qpad; i0 += 32) {
    const int64_t n = std::clamp<int64_t>(rows - i0, 0, 32);  // padding rows pack as zeros
    pack_vnni_transposed(n > 0 ? o + i0 * o_ld : o, o_ld, n, d.Dv, d.Dvp, 32, ot);
    for (int64_t j = 0; j < 2; ++j) {
      const uint16_t* x = ot + j * d.Dvp * 16;
      const uint16_t* y = vnni_at(dot, d.Dvp, 0, i0 + 16 * j);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < d.Dvp; k += 2)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + k * 16), (__m512bh)_mm512_loadu_si512(y + k * 16));
      _mm512_storeu_ps(di + i0 + 16 * j, acc);
    }
  }
}
#endif

void pack_q(const BackwardArgs& a, int64_t b, int64_t h, const Dims& d, int64_t qpad, const QPack& out) {
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  const uint16_t* q = static_cast<const uint16_t*>(at(a.q, p.dtype, row_offset(p, a.q, b, h, s.q_row0, 0)));
  const uint16_t* g = static_cast<const uint16_t*>(at(a.dout, p.dtype, row_offset(p, a.dout, b, h, s.q_row0, 0)));
  const uint16_t* o = static_cast<const uint16_t*>(at(a.o, p.dtype, row_offset(p, a.o, b, h, s.q_row0, 0)));
  pack_vnni_transposed(q, a.q.seq_stride, s.len_q, d.D, d.Dp, qpad, out.qt, p.scale < 0 ? 0x8000 : 0);
  pack_vnni_rows(q, a.q.seq_stride, s.len_q, d.D, qpad, d.Dp, out.q);
  pack_vnni_transposed(g, a.dout.seq_stride, s.len_q, d.Dv, d.Dvp, qpad, out.dot);
  pack_vnni_rows(g, a.dout.seq_stride, s.len_q, d.Dv, qpad, d.Dvp, out.dout);
  fill_di(o, a.o.seq_stride, g, a.dout.seq_stride, s.len_q, d, qpad, out.dot, out.di);
  for (int64_t i = 0; i < qpad; ++i) {
    float neg_lse = -INFINITY;  // padding and fully masked rows: P = 0
    if (i < s.len_q) {
      const float lse = a.lse[lse_index(p, b, h, s, i)];
      if (lse != -INFINITY) neg_lse = -lse;
    }
    out.neg_lse[i] = neg_lse;
  }
}

void pack_k(const BackwardArgs& a, int64_t b, int64_t h, const Dims& d, int64_t kpad, const KPack& out) {
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  if (out.k == out.k_copy) {
    const uint16_t* k = static_cast<const uint16_t*>(at(a.k, p.dtype, row_offset(p, a.k, b, h, s.k_row0, 0)));
    const uint16_t* v = static_cast<const uint16_t*>(at(a.v, p.dtype, row_offset(p, a.v, b, h, s.k_row0, 0)));
    copy_padded(k, a.k.seq_stride, s.len_k, d.D, kpad, d.Dp, out.k_copy);
    copy_padded(v, a.v.seq_stride, s.len_k, d.Dv, kpad, d.Dvp, out.v_copy);
  }
  pack_vnni_rows(out.k, out.ldk, kpad, d.Dp, kpad, d.Dp, out.kdq);  // a padded copy's zeros stay zeros
}

struct TileBuffers {
  float *p, *dp, *keep_scale, *dk, *dv;
  uint16_t *pb, *dsb, *ds;  // ds: the dQ GEMM's dS (a VNNI pack of dS^T with dot products, dS rows on AMX)
  uint8_t* keep;
  static int64_t floats(const Dims& d) {
    const int64_t t = kBlockK * kBlockQ;
    return 3 * t + kBlockK * (d.Dp + d.Dvp) + 3 * t / 2 + t / 4 + 64;
  }
  TileBuffers(float* base, const Dims& d) {
    const int64_t t = kBlockK * kBlockQ;
    p = base;
    dp = p + t;
    keep_scale = dp + t;
    dk = keep_scale + t;
    dv = dk + kBlockK * d.Dp;
    pb = reinterpret_cast<uint16_t*>(dv + kBlockK * d.Dvp);
    dsb = pb + t;
    ds = dsb + t;
    keep = reinterpret_cast<uint8_t*>(ds + t);
  }
};

// One group (sequence b, kv head hk): its query heads' packs are q_of(g), its fp32 dQ
// accumulators dq_of(g) (dQ, qpad x Dp). Key tiles [t_begin, t_end).
template <class QOf, class DqOf>
void backward_tiles(const BackwardArgs& a, const Dims& d, const KPack& kp, int64_t kpad, int64_t qpad, const QOf& q_of,
                    const DqOf& dq_of, int64_t b, int64_t hk, int64_t t_begin, int64_t t_end, TileBuffers& buf) {
  const Problem& p = a.p;
  const Seq s = sequence(p, b);
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t off = p.causal ? causal_limit(p, s, 0) : 0;
  const bool dropout = p.dropout_p > 0.f;
  const float drop_scale = p.dropout_p < 1.f ? 1.f / (1.f - p.dropout_p) : 0.f;
  const SoftmaxScale sc = softmax_scale(p);
  constexpr int64_t T = kBlockQ;  // row stride of the tile buffers

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t k0 = t * kBlockK, kb = std::min(kBlockK, s.len_k - k0);
    bool first_q = true;
    const int64_t q_first = p.causal ? std::max<int64_t>(0, k0 - off) : 0;
    prefetch_rows(kp.v + k0 * kp.ldv, kp.ldv * 2, kb, d.Dv * 2);  // the tile's first GEMMs read these rows
    prefetch_rows(kp.k + k0 * kp.ldk, kp.ldk * 2, kb, d.D * 2);
    for (int64_t gh = 0; gh < group; ++gh) {
      const int64_t h = hk * group + gh;
      const QPack qp = q_of(gh);
      float* dq = dq_of(gh);
      for (int64_t q0 = q_first / kBlockQ * kBlockQ; q0 < s.len_q; q0 += kBlockQ) {
        const int64_t qb = std::min(kBlockQ, s.len_q - q0), qb32 = round_up(qb, 32);
        const bool diagonal = p.causal && q0 + off < k0 + kb - 1;
        const bool scaled = scale_first(sc, qp.neg_lse + q0, qb);  // rows scaled before the exp
        if (dropout)  // keep[key * kBlockQ + query]
          dropout_block(p.seed, p.offset, lse_index(p, b, h, s, q0), qb, k0, kb, p.dropout_p, true, buf.keep, kBlockQ);
        // Diagonal tiles run as bands of kBand keys; each band starts at the kTileCols-column
        // block holding the first query its first key is visible to (see backward.cpp).
        // Keys past the tile's last one (short sequences) are not computed: m covers them to 32.
        const int64_t bands = diagonal ? kBlockK / kBand : 1;
        for (int64_t band = 0; band < bands; ++band) {
          const int64_t r0 = band * kBand, m = bands == 1 ? round_up(kb, 32) : kBand;
          if (r0 >= kb) break;  // a band of padding keys only: never stored
          const int64_t c0 = diagonal ? std::clamp<int64_t>(k0 + r0 - off - q0, 0, qb) / kTileCols * kTileCols : 0;
          const int64_t n = qb32 - c0;
          float* P = buf.p + r0 * T + c0;  // band rows, columns from c0; row stride T
          float* dP = buf.dp + r0 * T + c0;
          uint16_t* Pb = buf.pb + r0 * T + c0;
          uint16_t* dSb = buf.dsb + r0 * T + c0;
          float* dv = buf.dv + r0 * d.Dvp;
          float* dk = buf.dk + r0 * d.Dp;
          if (n <= 0) {
            if (first_q) {
              std::memset(dv, 0, sizeof(float) * m * d.Dvp);
              std::memset(dk, 0, sizeof(float) * m * d.Dp);
            }
            continue;
          }
          tile_gemm(m, n, d.Dp, kp.k + (k0 + r0) * kp.ldk, kp.ldk, vnni_at(qp.qt, d.Dp, 0, q0 + c0), d.Dp * 16, P, T, false);
          for (int64_t j = r0; j < r0 + m; ++j) {
            float* row = P + (j - r0) * T;
            if (j >= kb) {  // padding keys
              std::memset(row, 0, sizeof(float) * n);
              continue;
            }
            const int64_t valid = std::max<int64_t>(0, qb - c0);  // real queries in the band's columns
            if (scaled) row_scale(row, valid, sc.c);
            if (p.mask_kind != MaskKind::none) apply_user_mask_to_key(p, b, h, q0 + c0, k0 + j, valid, row);
            // Queries before the key's diagonal see P = 0. Padded queries have neg_lse = -inf,
            // so P = 0 there too.
            const int64_t hidden = diagonal ? std::clamp<int64_t>(k0 + j - off - q0 - c0, 0, valid) : 0;
            row_exp2_fma(row, scaled ? 1.f : sc.row_c, qp.neg_lse + q0 + c0, n, hidden);
          }

          const float* keep_scale = nullptr;
          if (dropout) {
            float* ks_band = buf.keep_scale + r0 * T + c0;
            for (int64_t j = 0; j < m; ++j) {  // dP's rows serve as scratch for P * keep here
              const int64_t key = r0 + j;  // padding keys and queries keep nothing
              row_dropout(P + j * T, buf.keep + key * kBlockQ + c0, key < kb ? qb - c0 : 0, n, drop_scale,
                          ks_band + j * T, dP + j * T);
            }
            keep_scale = ks_band;
            for (int64_t j = 0; j < m; ++j) to_bf16(dP + j * T, Pb + j * T, n);
          } else {
            for (int64_t j = 0; j < m; ++j) to_bf16(P + j * T, Pb + j * T, n);
          }
          // dV += P^T dO (keys x Dv), K = queries
          tile_gemm(m, d.Dvp, n, Pb, T, vnni_at(qp.dout, qpad, q0 + c0, 0), qpad * 16, dv, d.Dvp, !first_q);
          // dP^T = V dO^T (keys x queries), K = Dv
          tile_gemm(m, n, d.Dvp, kp.v + (k0 + r0) * kp.ldv, kp.ldv, vnni_at(qp.dot, d.Dvp, 0, q0 + c0), d.Dvp * 16, dP, T,
                   false);
          for (int64_t j = 0; j < m; ++j) {
            float* ds = dP + j * T;
            row_softmax_grad(P + j * T, ds, keep_scale ? keep_scale + j * T : nullptr, qp.di + q0 + c0, ds, n);
            to_bf16(ds, dSb + j * T, n);
          }
          // dK += dS^T Q (keys x D), K = queries
          tile_gemm(m, d.Dp, n, dSb, T, vnni_at(qp.q, qpad, q0 + c0, 0), qpad * 16, dk, d.Dp, !first_q);
          // dQ += dS K (queries x D), K = keys
#ifdef LLMCORE_BF16_DOT
          pack_vnni_rows(dSb, T, m, n, m, n, buf.ds);
          tile_gemm_tn(n, d.Dp, m, buf.ds, m * 16, vnni_at(kp.kdq, kpad, k0 + r0, 0), kpad * 16,
                       dq + (q0 + c0) * d.Dp, d.Dp, true);
#else
          transpose_bf16(dSb, T, m, n, buf.ds, m);  // dS, n x m row-major
          tile_gemm(n, d.Dp, m, buf.ds, m, vnni_at(kp.kdq, kpad, k0 + r0, 0), kpad * 16, dq + (q0 + c0) * d.Dp,
                    d.Dp, true);
#endif
        }
        first_q = false;
      }
    }
    if (first_q) {
      std::memset(buf.dk, 0, sizeof(float) * kBlockK * d.Dp);
      std::memset(buf.dv, 0, sizeof(float) * kBlockK * d.Dvp);
    }
    for (int64_t j = 0; j < kb; ++j) {
      store_row(buf.dk + j * d.Dp, d.D, p.scale, p.dtype, at_mut(a.dk, p.dtype, row_offset(p, a.dk, b, hk, s.k_row0, k0 + j)));
      store_row(buf.dv + j * d.Dvp, d.Dv, 1.f, p.dtype, at_mut(a.dv, p.dtype, row_offset(p, a.dv, b, hk, s.k_row0, k0 + j)));
    }
  }
}

}  // namespace

void backward(const BackwardArgs& a) {
  const Problem& p = a.p;
  const int nthreads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
  const Dims d = amx_dims(p);
  const int64_t group = p.heads_q / p.heads_kv, pairs = p.batch * p.heads_kv;

  int64_t max_q = 0, max_k = 0, q_total = 0, k_total = 0, max_tiles = 1;
  for (int64_t b = 0; b < p.batch; ++b) {
    const Seq s = sequence(p, b);
    max_q = std::max(max_q, round_up(s.len_q, kPad));
    max_k = std::max(max_k, round_up(s.len_k, kPad));
    q_total += round_up(s.len_q, kPad);
    k_total += round_up(s.len_k, kPad);
    max_tiles = std::max(max_tiles, ceil_div(s.len_k, kBlockK));
  }
  // In bf16 units: the group's packs, plus its dQ (fp32) accumulators.
  const int64_t group_elems = group * q_elems(max_q, d) + k_elems(max_k, d) + 2 * group * max_q * d.Dp;
  // Local: each thread packs a group and runs all its key tiles, with no shared buffer of every
  // head's packs (written and re-read through memory). With torch interleaved, local measured
  // faster at 1.2 MB a group ((2,16,1024,64): causal backward -20%, full -13%) and at 4.7 MB
  // ((1,32,2048,128): -20%, -4.5%), past the 2 MB L2 of a core here; 6 MB bounds it near there.
  const bool local = pairs >= 2 * nthreads && group_elems * 2 <= (6 << 20);
  const int64_t chunks = backward_chunks(local, pairs, nthreads, max_tiles);
  const int64_t tile_floats = TileBuffers::floats(d);
  const int64_t per_thread = tile_floats + (local ? group_elems / 2 + 16 : 0);
  const int64_t shared_elems = local ? 0
                                     : p.heads_q * q_elems(q_total, d) + p.heads_kv * k_elems(k_total, d) +
                                           2 * chunks * p.heads_q * q_total * d.Dp;
  Workspace ws;
  ws.reserve(2 * ws_bytes(sizeof(int64_t) * (p.batch + 1)) + ws_bytes(sizeof(float) * per_thread * nthreads) +
             ws_bytes(sizeof(uint16_t) * shared_elems));
  int64_t* q_off = ws.carve<int64_t>(p.batch + 1);
  int64_t* k_off = ws.carve<int64_t>(p.batch + 1);
  float* scratch = ws.carve<float>(per_thread * nthreads);
  uint16_t* shared = ws.carve<uint16_t>(shared_elems);
  q_off[0] = k_off[0] = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const Seq s = sequence(p, b);
    q_off[b + 1] = q_off[b] + round_up(s.len_q, kPad);
    k_off[b + 1] = k_off[b] + round_up(s.len_k, kPad);
  }

  if (local) {
#pragma omp parallel num_threads(nthreads)
    {
      TileScope tiles;
      float* mine = scratch + per_thread * omp_get_thread_num();
      TileBuffers buf(mine, d);
      uint16_t* gbase = reinterpret_cast<uint16_t*>(mine + tile_floats);
      uint16_t* kbase = gbase + group * q_elems(max_q, d);
      float* dq_acc = reinterpret_cast<float*>(kbase + k_elems(max_k, d));
#pragma omp for schedule(dynamic, local_chunk(p, nthreads))
      for (int64_t it = 0; it < pairs; ++it) {
        const int64_t b = it / p.heads_kv, hk = it % p.heads_kv;
        const Seq s = sequence(p, b);
        const int64_t qpad = round_up(s.len_q, kPad), kpad = round_up(s.len_k, kPad);
        auto q_of = [&](int64_t gh) { return carve_q(gbase + gh * q_elems(max_q, d), qpad, d); };
        for (int64_t gh = 0; gh < group; ++gh) pack_q(a, b, hk * group + gh, d, qpad, q_of(gh));
        const KPack k = carve_k(a, b, hk, d, kbase, kpad);
        pack_k(a, b, hk, d, kpad, k);
        std::memset(dq_acc, 0, sizeof(float) * group * d.Dp * qpad);
        backward_tiles(a, d, k, kpad, qpad, q_of, [&](int64_t gh) { return dq_acc + gh * d.Dp * qpad; }, b, hk, 0,
                       ceil_div(s.len_k, kBlockK), buf);
        for (int64_t gh = 0; gh < group; ++gh)
          write_dq_rows(a, b, hk * group + gh, dq_acc + gh * d.Dp * qpad, d.Dp, 1, 0);
      }
    }
    return;
  }

  // Shared: query head h of sequence b at q_elems offset (h * q_total + q_off[b]) rows, etc.
  uint16_t* q_base = shared;
  uint16_t* k_base = q_base + p.heads_q * q_elems(q_total, d);
  float* dq_acc = reinterpret_cast<float*>(k_base + p.heads_kv * k_elems(k_total, d));
  auto q_pack = [&](int64_t b, int64_t h) {
    return carve_q(q_base + h * q_elems(q_total, d) + q_elems(q_off[b], d), q_off[b + 1] - q_off[b], d);
  };
  auto k_pack = [&](int64_t b, int64_t h) {
    return carve_k(a, b, h, d, k_base + h * k_elems(k_total, d) + k_elems(k_off[b], d), k_off[b + 1] - k_off[b]);
  };
  auto dq_acc_of = [&](int64_t c, int64_t h, int64_t b) {
    return dq_acc + ((c * p.heads_q + h) * q_total + q_off[b]) * d.Dp;
  };
  const int64_t dq_acc_size = chunks * p.heads_q * q_total * d.Dp;

#pragma omp parallel num_threads(nthreads)
  {
    TileScope tiles;
    TileBuffers buf(scratch + per_thread * omp_get_thread_num(), d);
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < dq_acc_size; i += 4096)
      std::memset(dq_acc + i, 0, sizeof(float) * std::min<int64_t>(4096, dq_acc_size - i));
#pragma omp for schedule(dynamic, 1) collapse(2) nowait
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.heads_q; ++h)
        pack_q(a, b, h, d, q_off[b + 1] - q_off[b], q_pack(b, h));
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.heads_kv; ++h) pack_k(a, b, h, d, k_off[b + 1] - k_off[b], k_pack(b, h));

#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < pairs * chunks; ++it) {
      const int64_t c = it % chunks, pair = it / chunks, b = pair / p.heads_kv, hk = pair % p.heads_kv;
      const Seq s = sequence(p, b);
      const int64_t ntiles = ceil_div(s.len_k, kBlockK), tpc = ceil_div(ntiles, chunks);
      backward_tiles(a, d, k_pack(b, hk), k_off[b + 1] - k_off[b], q_off[b + 1] - q_off[b],
                     [&](int64_t gh) { return q_pack(b, hk * group + gh); },
                     [&](int64_t gh) { return dq_acc_of(c, hk * group + gh, b); }, b, hk, c * tpc,
                     std::min(ntiles, (c + 1) * tpc), buf);
    }
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.heads_q; ++h)
        write_dq_rows(a, b, h, dq_acc_of(0, h, b), d.Dp, chunks, p.heads_q * q_total * d.Dp);
  }
}

}  // namespace llmcore::attention::LLMCORE_ISA_NS
