// Dropout without a stored mask: out = in * (keep ? scale : 0), where keep comes from
// Philox4x32-10 keyed by (seed, offset) and the element's index alone, so the backward
// regenerates the forward's mask and neither the ISA nor the thread split changes it.
//
// Element i belongs to block b = i / 64 and uses word (i % 64) / 16 of the Philox call with
// counter (16 b + i % 16 as a 64-bit number in words 0-1, offset in words 2-3) and key seed.
// The element is kept when that 32-bit word is >= floor(p * 2^32). One block is 16 calls,
// vectorized over the counters (AVX-512, AVX2) or a scalar loop (portable build).
#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "attention/cpu/philox.h"
#include "norm/norm.h"
#include "norm/parallel.h"
#include "norm/vec.h"

namespace llmcore::norm::LLMCORE_ISA_NS {
namespace {

using vec::V;
constexpr int W = vec::W;
constexpr int64_t kBlock = 64;       // elements per 16 Philox calls
constexpr int64_t kChunk = 1 << 13;  // elements per OpenMP work item, a multiple of kBlock
constexpr int kRounds = 10;

struct Rng {
  uint32_t k0[kRounds], k1[kRounds];  // the key of each round
  uint32_t key0, key1;
  uint32_t off0, off1;
  uint32_t threshold;
  float scale;
};

Rng make_rng(const DropoutArgs& a) {
  Rng r;
  r.key0 = uint32_t(a.seed);
  r.key1 = uint32_t(a.seed >> 32);
  for (int i = 0; i < kRounds; ++i) {
    r.k0[i] = r.key0 + uint32_t(i) * 0x9E3779B9u;
    r.k1[i] = r.key1 + uint32_t(i) * 0xBB67AE85u;
  }
  r.off0 = uint32_t(a.offset);
  r.off1 = uint32_t(a.offset >> 32);
  const double t = a.p * 4294967296.0;
  r.threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(t);
  r.scale = a.p >= 1.0 ? 0.f : a.scale;
  return r;
}

// mult[j] = keep ? scale : 0 for the 64 elements of block b.
#if defined(LLMCORE_ISA_AVX512)
// The 16 counters run as two sets of 8 (even and odd lanes), each in the low halves of
// 64-bit lanes: vpmuludq then gives whole products, the high words come from one in-lane
// shuffle (port 5, beside the multiplies' port 0), and the upper halves carry don't-cares.
inline void block_multipliers(uint64_t b, const Rng& g, float* mult) {
  const uint64_t ctr = b << 4;
  const __m512i base = _mm512_set1_epi64(int64_t(uint32_t(ctr)));
  __m512i c0[2] = {_mm512_or_si512(base, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14)),
                   _mm512_or_si512(base, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15))};
  __m512i c1[2], c2[2], c3[2];
  for (int h = 0; h < 2; ++h) {
    c1[h] = _mm512_set1_epi32(int(uint32_t(ctr >> 32)));
    c2[h] = _mm512_set1_epi32(int(g.off0));
    c3[h] = _mm512_set1_epi32(int(g.off1));
  }
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53), m1 = _mm512_set1_epi64(0xCD9E8D57);
  for (int r = 0; r < kRounds; ++r) {
    const __m512i k0 = _mm512_set1_epi32(int(g.k0[r])), k1 = _mm512_set1_epi32(int(g.k1[r]));
    for (int h = 0; h < 2; ++h) {
      const __m512i p0 = _mm512_mul_epu32(c0[h], m0), p1 = _mm512_mul_epu32(c2[h], m1);
      const __m512i hi0 = _mm512_shuffle_epi32(p0, _MM_PERM_CDAB), hi1 = _mm512_shuffle_epi32(p1, _MM_PERM_CDAB);
      c0[h] = _mm512_ternarylogic_epi32(hi1, c1[h], k0, 0x96);  // three-way xor
      c2[h] = _mm512_ternarylogic_epi32(hi0, c3[h], k1, 0x96);
      c1[h] = p1;  // low words: lo1, lo0
      c3[h] = p0;
    }
  }
  const __m512i t = _mm512_set1_epi32(int(g.threshold));
  const __m512 s = _mm512_set1_ps(g.scale);
  const __m512i* w[4] = {c0, c1, c2, c3};
  for (int k = 0; k < 4; ++k) {
    // lanes 2i from the even set's low words, lanes 2i + 1 from the odd set's
    const __m512i v = _mm512_mask_blend_epi32(0xAAAA, w[k][0], _mm512_shuffle_epi32(w[k][1], _MM_PERM_CDAB));
    _mm512_store_ps(mult + 16 * k, _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(v, t), s));
  }
}
#elif defined(LLMCORE_ISA_AVX2)
// As the AVX-512 version, in four sets of 4 counters (lanes 8q + 2i + e for set 2q + e).
inline void block_multipliers(uint64_t b, const Rng& g, float* mult) {
  const uint64_t ctr = b << 4;
  const __m256i base = _mm256_set1_epi64x(int64_t(uint32_t(ctr)));
  __m256i c0[4], c1[4], c2[4], c3[4];
  for (int h = 0; h < 4; ++h) {
    const int l0 = 8 * (h >> 1) + (h & 1);
    c0[h] = _mm256_or_si256(base, _mm256_setr_epi64x(l0, l0 + 2, l0 + 4, l0 + 6));
    c1[h] = _mm256_set1_epi32(int(uint32_t(ctr >> 32)));
    c2[h] = _mm256_set1_epi32(int(g.off0));
    c3[h] = _mm256_set1_epi32(int(g.off1));
  }
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53), m1 = _mm256_set1_epi64x(0xCD9E8D57);
  for (int r = 0; r < kRounds; ++r) {
    const __m256i k0 = _mm256_set1_epi32(int(g.k0[r])), k1 = _mm256_set1_epi32(int(g.k1[r]));
    for (int h = 0; h < 4; ++h) {
      const __m256i p0 = _mm256_mul_epu32(c0[h], m0), p1 = _mm256_mul_epu32(c2[h], m1);
      const __m256i hi0 = _mm256_shuffle_epi32(p0, 0xB1), hi1 = _mm256_shuffle_epi32(p1, 0xB1);
      c0[h] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[h]), k0);
      c2[h] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[h]), k1);
      c1[h] = p1;
      c3[h] = p0;
    }
  }
  // keep: word >= threshold, i.e. not (threshold > word) as unsigned numbers
  const __m256i sign = _mm256_set1_epi32(int(0x80000000u));
  const __m256i t = _mm256_xor_si256(_mm256_set1_epi32(int(g.threshold)), sign);
  const __m256 s = _mm256_set1_ps(g.scale);
  const __m256i* w[4] = {c0, c1, c2, c3};
  for (int k = 0; k < 4; ++k) {
    for (int q = 0; q < 2; ++q) {
      const __m256i v = _mm256_blend_epi32(w[k][2 * q], _mm256_shuffle_epi32(w[k][2 * q + 1], 0xB1), 0xAA);
      const __m256i drop = _mm256_cmpgt_epi32(t, _mm256_xor_si256(v, sign));
      _mm256_store_ps(mult + 16 * k + 8 * q, _mm256_andnot_ps(_mm256_castsi256_ps(drop), s));
    }
  }
}
#else
inline void block_multipliers(uint64_t b, const Rng& g, float* mult) {
  const uint64_t ctr = b << 4;
  for (int l = 0; l < 16; ++l) {
    const uint64_t c = ctr + uint64_t(l);
    const attention::Philox4 r =
        attention::philox4x32_10(uint32_t(c), uint32_t(c >> 32), g.off0, g.off1, g.key0, g.key1);
    for (int k = 0; k < 4; ++k) mult[16 * k + l] = r.v[k] >= g.threshold ? g.scale : 0.f;
  }
}
#endif

template <class T>
void dropout_impl(const DropoutArgs& a) {
  const Rng g = make_rng(a);
  const T* in = static_cast<const T*>(a.in);
  T* out = static_cast<T*>(a.out);
  const int64_t n = a.numel;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int nt = threads_for(chunks, std::min(n, kChunk), a.num_threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    alignas(64) float mult[kBlock];
    const int64_t i1 = std::min(n, (c + 1) * kChunk);
    for (int64_t b0 = c * kChunk; b0 < i1; b0 += kBlock) {
      block_multipliers(uint64_t(b0) / kBlock, g, mult);
      const int64_t m = std::min(kBlock, i1 - b0);
      if (m == kBlock) {
        for (int k = 0; k < kBlock; k += W)
          vec::store(out + b0 + k, vec::mul(vec::load(in + b0 + k), vec::load(mult + k)));
      } else {
        for (int k = 0; k < m; k += W) {
          const int w = int(std::min<int64_t>(W, m - k));
          vec::store_n(out + b0 + k, vec::mul(vec::load_n(in + b0 + k, w), vec::load(mult + k)), w);
        }
      }
    }
  }
}

}  // namespace

void dropout_apply(const DropoutArgs& a) {
  switch (a.dtype) {
    case DType::f32: return dropout_impl<float>(a);
    case DType::bf16: return dropout_impl<bf16_t>(a);
    case DType::f16: return dropout_impl<f16_t>(a);
  }
  throw std::invalid_argument("dropout kernel: unsupported dtype");
}

}  // namespace llmcore::norm::LLMCORE_ISA_NS
