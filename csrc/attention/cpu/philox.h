// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11):
// a counter-based generator, so the backward can regenerate the forward's dropout mask
// from (seed, offset, row, column) without storing it.
#pragma once
#include <cstdint>

namespace llmcore::attention {

struct Philox4 {
  uint32_t v[4];
};

static inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(M0) * c0, p1 = uint64_t(M1) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += W0; k1 += W1;
  }
  return {{c0, c1, c2, c3}};
}

// Dropout keeps element (row, col) when its 32-bit draw is at least p * 2^32 (never when p >= 1).
// static: this header is compiled with several ISAs' flags, and must not share symbols between them.
// Counter: (col / 4, row low, row high, offset); key: the seed. One call covers four columns.
static inline uint32_t dropout_threshold(float p) {
  const double t = double(p) * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(t);
}

// keep[j] for columns [col0, col0 + n) of one row; col0 must be a multiple of 4.
static inline void dropout_row(uint64_t seed, uint64_t offset, uint64_t row, int64_t col0, int64_t n, float p,
                               uint8_t* keep) {
  const uint32_t threshold = dropout_threshold(p);
  const bool p_below_one = p < 1.f;
  const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int64_t j = 0; j < n; j += 4) {
    const uint64_t c = uint64_t(col0 + j) >> 2;
    Philox4 r = philox4x32_10(uint32_t(c), uint32_t(row), uint32_t(row >> 32), uint32_t(offset + (c >> 32)), k0, k1);
    for (int t = 0; t < 4 && j + t < n; ++t) keep[j + t] = p_below_one && r.v[t] >= threshold;
  }
}

}  // namespace llmcore::attention
