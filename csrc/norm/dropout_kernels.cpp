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

struct Rng {
  attention::PhiloxKeys keys;  // keys.k0[0], keys.k1[0]: the seed's two words
  uint32_t off0, off1;
  uint32_t threshold;
  float scale;
};

Rng make_rng(const DropoutArgs& a) {
  Rng r;
  r.keys = attention::philox_keys(a.seed);
  r.off0 = uint32_t(a.offset);
  r.off1 = uint32_t(a.offset >> 32);
  r.threshold = attention::dropout_threshold(a.p);
  r.scale = a.p >= 1.0 ? 0.f : a.scale;
  return r;
}

// mult[j] = keep ? scale : 0 for the 64 elements of block b.
#if defined(LLMCORE_ISA_AVX512)
// The counters go in as the two sets directly (words 1-3 are the same in every lane).
inline void block_multipliers(uint64_t b, const Rng& g, float* mult) {
  const uint64_t ctr = b << 4;  // the block's 16 counters share their upper 60 bits
  const __m512i base = _mm512_set1_epi64(int64_t(uint32_t(ctr)));
  const __m512i hi = _mm512_set1_epi32(int(uint32_t(ctr >> 32))), o0 = _mm512_set1_epi32(int(g.off0)),
                o1 = _mm512_set1_epi32(int(g.off1));
  __m512i c[4][2] = {{_mm512_or_si512(base, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14)),
                      _mm512_or_si512(base, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15))},
                     {hi, hi}, {o0, o0}, {o1, o1}};
  attention::philox4x32_10_x16_sets(c, g.keys);
  const __m512i t = _mm512_set1_epi32(int(g.threshold));
  const __m512 s = _mm512_set1_ps(g.scale);
  for (int k = 0; k < 4; ++k)
    _mm512_store_ps(mult + 16 * k, _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(attention::philox_merge_sets(c[k]), t), s));
}
#elif defined(LLMCORE_ISA_AVX2)
inline void block_multipliers(uint64_t b, const Rng& g, float* mult) {
  const uint64_t ctr = b << 4;
  // keep: word >= threshold, i.e. not (threshold > word) as unsigned numbers
  const __m256i sign = _mm256_set1_epi32(int(0x80000000u));
  const __m256i t = _mm256_xor_si256(_mm256_set1_epi32(int(g.threshold)), sign);
  const __m256 s = _mm256_set1_ps(g.scale);
  for (int q = 0; q < 2; ++q) {  // counters 8q .. 8q + 7
    __m256i w[4] = {_mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(ctr) + 8 * q)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                    _mm256_set1_epi32(int(uint32_t(ctr >> 32))), _mm256_set1_epi32(int(g.off0)),
                    _mm256_set1_epi32(int(g.off1))};
    attention::philox4x32_10_x8(w, g.keys);
    for (int k = 0; k < 4; ++k) {
      const __m256i drop = _mm256_cmpgt_epi32(t, _mm256_xor_si256(w[k], sign));
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
        attention::philox4x32_10(uint32_t(c), uint32_t(c >> 32), g.off0, g.off1, g.keys.k0[0], g.keys.k1[0]);
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
  with_dtype(a.dtype, "dropout kernel", [&](auto tag) { dropout_impl<decltype(tag)>(a); });
}

}  // namespace llmcore::norm::LLMCORE_ISA_NS
