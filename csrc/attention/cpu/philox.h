// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11):
// a counter-based generator, so the backward can regenerate the forward's dropout mask
// from (seed, offset, row, column) without storing it.
#pragma once
#include <cstdint>
#include <algorithm>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// The ten round keys of a key (the vector rounds read them from memory: a broadcast load takes
// no slot on the ports the multiplies and shuffles contend for, as a vector add would).
struct PhiloxKeys {
  uint32_t k0[10], k1[10];
};
static inline PhiloxKeys philox_keys(uint64_t seed) {
  PhiloxKeys k;
  for (int r = 0; r < 10; ++r) {
    k.k0[r] = uint32_t(seed) + uint32_t(r) * 0x9E3779B9u;
    k.k1[r] = uint32_t(seed >> 32) + uint32_t(r) * 0xBB67AE85u;
  }
  return k;
}

#if defined(__AVX512F__)
// Philox4x32-10 on 16 counters as two sets of 8: c[k][s] holds word k of the counters of set s in
// the low halves of its 64-bit lanes (the upper halves carry don't-cares), and is replaced by the
// output word there. vpmuludq then gives whole products, and the high words come from an in-lane
// shuffle (port 5, beside the multiplies' port 0).
static inline void philox4x32_10_x16_sets(__m512i c[4][2], const PhiloxKeys& key) {
  __m512i *c0 = c[0], *c1 = c[1], *c2 = c[2], *c3 = c[3];
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53), m1 = _mm512_set1_epi64(0xCD9E8D57);
  for (int r = 0; r < 10; ++r) {
    const __m512i k0 = _mm512_set1_epi32(int(key.k0[r])), k1 = _mm512_set1_epi32(int(key.k1[r]));
    for (int h = 0; h < 2; ++h) {
      const __m512i p0 = _mm512_mul_epu32(c0[h], m0), p1 = _mm512_mul_epu32(c2[h], m1);
      const __m512i hi0 = _mm512_shuffle_epi32(p0, _MM_PERM_CDAB), hi1 = _mm512_shuffle_epi32(p1, _MM_PERM_CDAB);
      c0[h] = _mm512_ternarylogic_epi32(hi1, c1[h], k0, 0x96);  // three-way xor
      c2[h] = _mm512_ternarylogic_epi32(hi0, c3[h], k1, 0x96);
      c1[h] = p1;  // low words: lo1, lo0
      c3[h] = p0;
    }
  }
}

// Lanes 2i of word k from set 0's low words, lanes 2i + 1 from set 1's.
static inline __m512i philox_merge_sets(const __m512i c[2]) {
  return _mm512_mask_blend_epi32(0xAAAA, c[0], _mm512_shuffle_epi32(c[1], _MM_PERM_CDAB));
}

// Philox4x32-10 on 16 counters at once: w[k] holds word k of lane l's counter and is replaced by
// word k of its output, bitwise philox4x32_10's (the even and odd lanes as the two sets).
static inline void philox4x32_10_x16(__m512i w[4], const PhiloxKeys& key) {
  __m512i c[4][2];
  for (int k = 0; k < 4; ++k) {
    c[k][0] = w[k];
    c[k][1] = _mm512_shuffle_epi32(w[k], _MM_PERM_CDAB);
  }
  philox4x32_10_x16_sets(c, key);
  for (int k = 0; k < 4; ++k) w[k] = philox_merge_sets(c[k]);
}
#endif

#if defined(__AVX2__)
// philox4x32_10_x16 on 8 counters (AVX2): the same two sets of 4.
static inline void philox4x32_10_x8(__m256i w[4], const PhiloxKeys& key) {
  __m256i c0[2], c1[2], c2[2], c3[2];
  __m256i* c[4] = {c0, c1, c2, c3};
  for (int k = 0; k < 4; ++k) {
    c[k][0] = w[k];
    c[k][1] = _mm256_shuffle_epi32(w[k], 0xB1);
  }
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53), m1 = _mm256_set1_epi64x(0xCD9E8D57);
  for (int r = 0; r < 10; ++r) {
    const __m256i k0 = _mm256_set1_epi32(int(key.k0[r])), k1 = _mm256_set1_epi32(int(key.k1[r]));
    for (int h = 0; h < 2; ++h) {
      const __m256i p0 = _mm256_mul_epu32(c0[h], m0), p1 = _mm256_mul_epu32(c2[h], m1);
      const __m256i hi0 = _mm256_shuffle_epi32(p0, 0xB1), hi1 = _mm256_shuffle_epi32(p1, 0xB1);
      c0[h] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[h]), k0);
      c2[h] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[h]), k1);
      c1[h] = p1;
      c3[h] = p0;
    }
  }
  for (int k = 0; k < 4; ++k) w[k] = _mm256_blend_epi32(c[k][0], _mm256_shuffle_epi32(c[k][1], 0xB1), 0xAA);
}
#endif

// Philox calls per batch of a vector build: word k of call l is words[k][l].
#if defined(__AVX512F__)
constexpr int kPhiloxLanes = 16;
#elif defined(__AVX2__)
constexpr int kPhiloxLanes = 8;
#else
constexpr int kPhiloxLanes = 1;
#endif

// words[k][l] = word k of philox4x32_10(ctr[0][l], ..., ctr[3][l], key), for l < kPhiloxLanes.
static inline void philox_lanes(const uint32_t ctr[4][kPhiloxLanes], const PhiloxKeys& key,
                                uint32_t words[4][kPhiloxLanes]) {
#if defined(__AVX512F__)
  __m512i w[4];
  for (int k = 0; k < 4; ++k) w[k] = _mm512_loadu_si512(ctr[k]);
  philox4x32_10_x16(w, key);
  for (int k = 0; k < 4; ++k) _mm512_storeu_si512(words[k], w[k]);
#elif defined(__AVX2__)
  __m256i w[4];
  for (int k = 0; k < 4; ++k) w[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ctr[k]));
  philox4x32_10_x8(w, key);
  for (int k = 0; k < 4; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[k]), w[k]);
#else
  const Philox4 r = philox4x32_10(ctr[0][0], ctr[1][0], ctr[2][0], ctr[3][0], key.k0[0], key.k1[0]);
  for (int k = 0; k < 4; ++k) words[k][0] = r.v[k];
#endif
}

// Dropout keeps element (row, col) when its 32-bit draw is at least p * 2^32 (never when p >= 1).
// static: this header is compiled with several ISAs' flags, and must not share symbols between them.
// Counter: (col / 4, row low, row high, offset); key: the seed. One call covers four columns.
// p is a double so that norm's dropout (whose p is one) gets its threshold unrounded.
static inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(t);
}

// keep[j] for columns [col0, col0 + n) of one row; col0 must be a multiple of 4. The reference
// the kernels' dropout_block is tested against.
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

// dropout_row's draws for rows [row0, row0 + rows) and columns [col0, col0 + cols) (col0 a
// multiple of 4): keep[r * ld + j] (the forward's query-major tiles), or keep[j * ld + r] with
// ``transposed`` (the backward's key-major tiles). The lanes of a Philox batch are rows (one call
// covers four columns of a row), so short rows waste no lanes.
static inline void dropout_block(uint64_t seed, uint64_t offset, uint64_t row0, int64_t rows, int64_t col0,
                                 int64_t cols, float p, bool transposed, uint8_t* keep, int64_t ld) {
  constexpr int N = kPhiloxLanes;
  const uint32_t threshold = dropout_threshold(p);
  const bool p_below_one = p < 1.f;
  const PhiloxKeys key = philox_keys(seed);
  alignas(64) uint32_t ctr[4][N];
  alignas(64) uint32_t words[4][N];
  const uint64_t c_first = uint64_t(col0) >> 2;
  for (int64_t r0 = 0; r0 < rows; r0 += N) {
    const int64_t m = std::min<int64_t>(N, rows - r0);
    for (int l = 0; l < N; ++l) {
      const uint64_t row = row0 + uint64_t(r0 + l);
      ctr[1][l] = uint32_t(row);
      ctr[2][l] = uint32_t(row >> 32);
    }
    for (int64_t j0 = 0; j0 < cols; j0 += 4) {
      const uint64_t c = c_first + uint64_t(j0 >> 2);
      for (int l = 0; l < N; ++l) {
        ctr[0][l] = uint32_t(c);
        ctr[3][l] = uint32_t(offset + (c >> 32));
      }
      philox_lanes(ctr, key, words);
      const int64_t w = std::min<int64_t>(4, cols - j0);
      if (transposed) {
        for (int64_t k = 0; k < w; ++k) {
          uint8_t kept[N];
          for (int l = 0; l < N; ++l) kept[l] = p_below_one && words[k][l] >= threshold;
          uint8_t* dst = keep + (j0 + k) * ld + r0;
          if (m == N)
            std::memcpy(dst, kept, N);  // a constant size: one store, not a library call
          else
            for (int64_t l = 0; l < m; ++l) dst[l] = kept[l];
        }
      } else {
        // lane l's four bytes, columns j0 .. j0 + 3 of row r0 + l
        uint32_t quad[N];
        for (int l = 0; l < N; ++l) {
          uint32_t q = 0;
          for (int k = 0; k < 4; ++k) q |= uint32_t(p_below_one && words[k][l] >= threshold) << (8 * k);
          quad[l] = q;
        }
        for (int64_t l = 0; l < m; ++l) {
          uint8_t* dst = keep + (r0 + l) * ld + j0;
          if (w == 4)
            std::memcpy(dst, &quad[l], 4);  // little-endian: byte k is column j0 + k
          else
            for (int64_t k = 0; k < w; ++k) dst[k] = uint8_t(quad[l] >> (8 * k));
        }
      }
    }
  }
}

}  // namespace llmcore::attention
