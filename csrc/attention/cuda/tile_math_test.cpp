// Host check of tile_math.h, the index math the CUDA attention kernels share: plain C++ with
// no CUDA, so it runs on machines without a GPU (tests/test_attention_cuda.py compiles and
// runs it). Compares every tile decision with a brute-force mask over many small shapes and
// checks the shared-memory swizzle and the ldmatrix address trick of mma.cuh.
// Prints "N passed, 0 failed" and exits 0, or names the first failure and exits 1.
#include <cstdint>
#include <cstdio>
#include <set>
#include <vector>

#include "attention/cuda/tile_math.h"

using namespace llmcore::attention::cuda;

namespace {

int checks = 0;

bool fail(const char* what, int a, int b, int c, int d, int e, int f) {
  std::printf("FAILED %s (%d %d %d %d %d %d)\n", what, a, b, c, d, e, f);
  return false;
}

// Every (query tile, key tile) pair: the forward visits exactly a prefix of key tiles that
// covers each visible element of the stored rows, skips only invisible tiles, and leaves
// masking out only where every stored element is visible. The backward's query-tile range
// likewise covers each visible element.
bool check_shape(int len_q, int len_k, int bm, int bn, bool causal, bool bottom_right) {
  const int shift = bottom_right ? len_k - len_q : 0;
  const int m_tiles = ceil_div(len_q, bm), n_tiles = ceil_div(len_k, bn);
  for (int mt = 0; mt < m_tiles; ++mt) {
    const int m0 = mt * bm;
    const int visit = fwd_key_tiles(m0, bm, bn, len_q, len_k, causal, shift);
    if (visit < 0 || visit > n_tiles) return fail("fwd_key_tiles range", len_q, len_k, bm, bn, causal, mt);
    for (int nt = 0; nt < n_tiles; ++nt) {
      const int n0 = nt * bn;
      bool any = false, all = true;
      for (int i = m0; i < m0 + bm && i < len_q; ++i)
        for (int j = n0; j < n0 + bn; ++j) {
          const bool vis = visible(i, j, len_q, len_k, causal, shift);
          any = any || vis;
          all = all && vis;
        }
      ++checks;
      if (any && nt >= visit) return fail("forward skips a visible tile", len_q, len_k, bm, bn, causal, nt);
      if (nt < visit && !tile_needs_mask(m0, n0, bn, len_k, causal, shift) && !all)
        return fail("unmasked tile has hidden elements", len_q, len_k, bm, bn, causal, nt);
      const int first = bwd_first_query_tile(n0, bm, causal, shift);
      if (any && mt < first) return fail("backward skips a visible tile", len_q, len_k, bm, bn, causal, mt);
    }
    // a tile past the last visited one is never visible (the prefix is tight enough to matter)
    if (causal && visit < n_tiles) {
      bool any = false;
      for (int i = m0; i < m0 + bm && i < len_q; ++i)
        for (int j = visit * bn; j < len_k; ++j) any = any || visible(i, j, len_q, len_k, causal, shift);
      if (any) return fail("forward stops early", len_q, len_k, bm, bn, causal, mt);
    }
  }
  // the backward starts no later than needed and not wastefully early
  for (int nt = 0; nt < n_tiles && causal; ++nt) {
    const int first = bwd_first_query_tile(nt * bn, bm, causal, shift);
    if (first > 0) {
      bool any = false;
      for (int i = (first - 1) * bm; i < first * bm && i < len_q; ++i)
        for (int j = nt * bn; j < nt * bn + bn; ++j) any = any || visible(i, j, len_q, len_k, causal, shift);
      if (any) return fail("backward first tile too late", len_q, len_k, bm, bn, first, nt);
    }
  }
  return true;
}

bool check_swizzle() {
  for (int cols : {64, 128, 256}) {
    std::set<int> seen;
    for (int r = 0; r < 64; ++r)
      for (int c = 0; c < cols; ++c) {
        const int at = swizzle(r, c, cols);
        if (at / cols != r || !seen.insert(at).second) return fail("swizzle not a row-preserving bijection", cols, r, c, 0, 0, 0);
        // 8-element chunks stay contiguous (16-byte copies)
        if ((c & 7) && at != swizzle(r, c & ~7, cols) + (c & 7)) return fail("swizzle splits a chunk", cols, r, c, 0, 0, 0);
      }
    // the 8 rows of one ldmatrix phase (same logical chunk) hit 8 different 16-byte bank groups
    for (int r0 = 0; r0 < 64; r0 += 8)
      for (int c = 0; c < cols; c += 8) {
        std::set<int> groups;
        for (int r = r0; r < r0 + 8; ++r) groups.insert((swizzle(r, c, cols) * 2 / 16) % 8);
        ++checks;
        if (groups.size() != 8) return fail("ldmatrix bank conflict", cols, r0, c, 0, 0, 0);
      }
    // mma.cuh: ldsm_at(ldsm_base(tile, lane_row, sel), row0, chunk0) addresses the swizzled
    // element (row0 + lane_row, 8 * (chunk0 + sel)) for 8-aligned row0 and even chunk0
    const uint32_t row_bytes = uint32_t(cols) * 2, tile = 4096;  // tile aligned to its row length
    for (int lane_row = 0; lane_row < 16; ++lane_row)
      for (int sel = 0; sel < 2; ++sel) {
        const uint32_t base = tile + lane_row * row_bytes + ((sel ^ (lane_row & 7)) << 4);
        for (int row0 = 0; row0 < 64; row0 += 8)
          for (int chunk0 = 0; chunk0 < cols / 8; chunk0 += 2) {
            const uint32_t addr = (base ^ uint32_t(chunk0 << 4)) + uint32_t(row0) * row_bytes;
            const uint32_t want = tile + 2 * uint32_t(swizzle(row0 + lane_row, 8 * (chunk0 + sel), cols));
            ++checks;
            if (addr != want) return fail("ldsm address", cols, lane_row, sel, row0, chunk0, 0);
          }
      }
  }
  return true;
}

bool check_seq_span() {
  const int32_t cu[] = {0, 5, 5, 12, 3, 40};
  const SeqSpan a = seq_span(cu, 0, 99, 40), b = seq_span(cu, 1, 99, 40), c = seq_span(cu, 2, 99, 40);
  const SeqSpan bad_order = seq_span(cu, 3, 99, 40), past_end = seq_span(cu, 4, 99, 39);
  const SeqSpan dense = seq_span(nullptr, 7, 33, 0);
  checks += 6;
  if (a.start != 0 || a.len != 5 || b.len != 0 || c.start != 5 || c.len != 7) return fail("seq_span", a.len, b.len, c.len, 0, 0, 0);
  if (bad_order.len != 0 || past_end.len != 0) return fail("seq_span accepts bad offsets", bad_order.len, past_end.len, 0, 0, 0, 0);
  if (dense.start != 0 || dense.len != 33) return fail("seq_span dense", dense.len, 0, 0, 0, 0, 0);
  return true;
}

}  // namespace

int main() {
  bool ok = check_swizzle() && check_seq_span();
  const std::vector<int> lens = {0, 1, 2, 15, 16, 17, 31, 63, 64, 65, 97, 128, 129, 200, 257};
  const int tiles[][2] = {{128, 64}, {128, 32}, {64, 128}, {64, 64}, {64, 32}};
  for (int lq : lens)
    for (int lk : lens)
      for (const auto& t : tiles)
        for (int mode = 0; mode < 3 && ok; ++mode)  // full, causal top-left, causal bottom-right
          ok = check_shape(lq, lk, t[0], t[1], mode > 0, mode == 2);
  std::printf("%d passed, %d failed\n", ok ? checks : 0, ok ? 0 : 1);
  return ok ? 0 : 1;
}
