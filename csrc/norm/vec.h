// The float-vector layer of the norm and activation kernels: one source compiles for
// AVX-512, AVX2+FMA and a portable fallback (CMake builds it once per ISA, in a namespace of
// that name). Loads and stores convert float32 / bfloat16 / float16 storage to float lanes.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(LLMCORE_ISA_AVX512) || defined(LLMCORE_ISA_AVX2)
#include <immintrin.h>
#endif

#include "norm/norm.h"

#ifndef LLMCORE_ISA_NS
#error "compile kernel sources through CMake's per-ISA targets"
#endif

namespace llmcore::norm::LLMCORE_ISA_NS::vec {

// Scalar conversions (tails of the portable build, and checks).
inline float to_f32(float x) { return x; }
inline float to_f32(bf16_t h) {
  const uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f32(f16_t h) {
  _Float16 x;
  std::memcpy(&x, &h.bits, 2);
  return float(x);
}
inline bf16_t to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
inline f16_t to_f16(float f) {
  const _Float16 x = _Float16(f);
  f16_t h;
  std::memcpy(&h.bits, &x, 2);
  return h;
}

// exp(x) = 2^n * e^r, r = x - n ln2 in [-ln2/2, ln2/2] (Cody-Waite, ln2 split in two) and
// Cephes' degree-6 polynomial for e^r: about 2 ulp. Denormal results below -87.3, 0 below
// -103 and +inf above 88.72; NaN stays NaN.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
// kFast (16-bit results): a degree-4 fit, relative error 5.3e-6, ample below a bf16/fp16 ulp.
constexpr float kExpFastP[3] = {0.041277743f, 0.16753514f, 0.50005116f};
constexpr float kExpLo = -104.f, kExpHi = 89.f;  // the input clamp: 2^n stays in range

#if defined(LLMCORE_ISA_AVX512) || defined(LLMCORE_ISA_AVX2)
constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#endif

#if defined(LLMCORE_ISA_AVX512)

constexpr int W = 16;
struct V { __m512 x; };
inline V zero() { return {_mm512_setzero_ps()}; }
inline V set1(float a) { return {_mm512_set1_ps(a)}; }
inline V load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline V load(const bf16_t* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(u, 16))};
}
inline V load(const f16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
// The bf16 bit pattern (high half of each lane) of a, rounded to nearest even; NaN stays NaN.
inline __m512i bf16_bits(V a) {
  const __m512i u = _mm512_castps_si512(a.x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(a.x, a.x, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
}
inline void store(float* p, V a) { _mm512_storeu_ps(p, a.x); }
// bf16 by integer rounding to nearest even: denormals kept, as torch's conversion keeps them
// (AVX512-BF16's conversion flushes them).
inline void store_bf16_exact(bf16_t* p, V a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(a), 16)));
}
#if defined(__AVX512BF16__)
// The avx512_bf16 build: one conversion instruction (round to nearest even; it flushes values
// below 1.2e-38 to 0, where the integer path keeps a denormal).
inline void store(bf16_t* p, V a) {
  const __m256bh h = _mm512_cvtneps_pbh(a.x);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<const __m256i&>(h));
}
#else
inline void store(bf16_t* p, V a) { store_bf16_exact(p, a); }
#endif
inline void store(f16_t* p, V a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a.x, kNearest));
}
#if defined(__AVX512BF16__)
inline V round_bf16(V a) { return {_mm512_cvtpbh_ps(_mm512_cvtneps_pbh(a.x))}; }
#else
inline V round_bf16(V a) {
  return {_mm512_castsi512_ps(_mm512_and_si512(bf16_bits(a), _mm512_set1_epi32(int(0xffff0000u))))};
}
#endif
inline V round_f16(V a) { return {_mm512_cvtph_ps(_mm512_cvtps_ph(a.x, kNearest))}; }
inline V keep_first(V a, int n) { return {_mm512_maskz_mov_ps(__mmask16((1u << n) - 1u), a.x)}; }
inline V add(V a, V b) { return {_mm512_add_ps(a.x, b.x)}; }
inline V sub(V a, V b) { return {_mm512_sub_ps(a.x, b.x)}; }
inline V mul(V a, V b) { return {_mm512_mul_ps(a.x, b.x)}; }
inline V div(V a, V b) { return {_mm512_div_ps(a.x, b.x)}; }
inline V sqrt(V a) { return {_mm512_sqrt_ps(a.x)}; }
// 1 / a from the 14-bit estimate and one Newton step (within 2 ulp; a divide costs 8x more);
// kFast: the estimate alone (relative error 6e-5, for 16-bit results).
template <bool kFast = false>
inline V recip(V a) {
  const __m512 r = _mm512_rcp14_ps(a.x);
  if (kFast) return {r};
  return {_mm512_mul_ps(r, _mm512_fnmadd_ps(a.x, r, _mm512_set1_ps(2.f)))};
}
inline V fmadd(V a, V b, V c) { return {_mm512_fmadd_ps(a.x, b.x, c.x)}; }   // a * b + c
inline V fnmadd(V a, V b, V c) { return {_mm512_fnmadd_ps(a.x, b.x, c.x)}; }  // c - a * b
inline V fmsub(V a, V b, V c) { return {_mm512_fmsub_ps(a.x, b.x, c.x)}; }    // a * b - c, rounded once
inline V neg(V a) { return {_mm512_xor_ps(a.x, _mm512_set1_ps(-0.f))}; }
inline V abs(V a) { return {_mm512_abs_ps(a.x)}; }
inline V min(V a, V b) { return {_mm512_min_ps(a.x, b.x)}; }  // b where either is NaN
inline V max(V a, V b) { return {_mm512_max_ps(a.x, b.x)}; }  // b where either is NaN
// Lanes where a < 0 take x, the others y.
inline V select_negative(V a, V x, V y) {
  return {_mm512_mask_mov_ps(y.x, _mm512_cmp_ps_mask(a.x, _mm512_setzero_ps(), _CMP_LT_OQ), x.x)};
}
inline float reduce_add(V a) { return _mm512_reduce_add_ps(a.x); }
inline float reduce_max(V a) { return _mm512_reduce_max_ps(a.x); }

template <bool kFast = false>
inline V exp(V v) {
  // min(hi, v) and max(lo, .) return their second operand for a NaN: NaN propagates.
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(kExpLo), _mm512_min_ps(_mm512_set1_ps(kExpHi), v.x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), kNearest);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kFast ? kExpFastP[0] : kExpP[0]);
  if (kFast) {
    for (int i = 1; i < 3; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpFastP[i]));
  } else {
    for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP[i]));
  }
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return {_mm512_scalef_ps(p, n)};  // overflows to inf, underflows through denormals to 0
}

#elif defined(LLMCORE_ISA_AVX2)

constexpr int W = 8;
struct V { __m256 x; };
inline V zero() { return {_mm256_setzero_ps()}; }
inline V set1(float a) { return {_mm256_set1_ps(a)}; }
inline V load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline V load(const bf16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(u, 16))};
}
inline V load(const f16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
inline __m256i bf16_bits(V a) {
  const __m256i u = _mm256_castps_si256(a.x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256 nan = _mm256_cmp_ps(a.x, a.x, _CMP_UNORD_Q);
  const __m256i q = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(q), nan));
}
inline void store(float* p, V a) { _mm256_storeu_ps(p, a.x); }
inline void store_bf16_exact(bf16_t* p, V a) {
  const __m256i h = _mm256_srli_epi32(bf16_bits(a), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void store(bf16_t* p, V a) { store_bf16_exact(p, a); }
inline void store(f16_t* p, V a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.x, kNearest));
}
inline V round_bf16(V a) {
  return {_mm256_castsi256_ps(_mm256_and_si256(bf16_bits(a), _mm256_set1_epi32(int(0xffff0000u))))};
}
inline V round_f16(V a) { return {_mm256_cvtph_ps(_mm256_cvtps_ph(a.x, kNearest))}; }
inline V keep_first(V a, int n) {
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return {_mm256_and_ps(a.x, _mm256_castsi256_ps(m))};
}
inline V add(V a, V b) { return {_mm256_add_ps(a.x, b.x)}; }
inline V sub(V a, V b) { return {_mm256_sub_ps(a.x, b.x)}; }
inline V mul(V a, V b) { return {_mm256_mul_ps(a.x, b.x)}; }
inline V div(V a, V b) { return {_mm256_div_ps(a.x, b.x)}; }
inline V sqrt(V a) { return {_mm256_sqrt_ps(a.x)}; }
// 1 / a: a divide; kFast: the 12-bit estimate and one Newton step (22 bits).
template <bool kFast = false>
inline V recip(V a) {
  if (!kFast) return {_mm256_div_ps(_mm256_set1_ps(1.f), a.x)};
  const __m256 r = _mm256_rcp_ps(a.x);
  return {_mm256_mul_ps(r, _mm256_fnmadd_ps(a.x, r, _mm256_set1_ps(2.f)))};
}
inline V fmadd(V a, V b, V c) { return {_mm256_fmadd_ps(a.x, b.x, c.x)}; }
inline V fnmadd(V a, V b, V c) { return {_mm256_fnmadd_ps(a.x, b.x, c.x)}; }
inline V fmsub(V a, V b, V c) { return {_mm256_fmsub_ps(a.x, b.x, c.x)}; }
inline V neg(V a) { return {_mm256_xor_ps(a.x, _mm256_set1_ps(-0.f))}; }
inline V abs(V a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.f), a.x)}; }
inline V min(V a, V b) { return {_mm256_min_ps(a.x, b.x)}; }
inline V max(V a, V b) { return {_mm256_max_ps(a.x, b.x)}; }
inline V select_negative(V a, V x, V y) {
  return {_mm256_blendv_ps(y.x, x.x, _mm256_cmp_ps(a.x, _mm256_setzero_ps(), _CMP_LT_OQ))};
}
inline float reduce_add(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.x), _mm256_extractf128_ps(a.x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max(V a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.x), _mm256_extractf128_ps(a.x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool kFast = false>
inline V exp(V v) {
  const __m256 x = _mm256_max_ps(_mm256_set1_ps(kExpLo), _mm256_min_ps(_mm256_set1_ps(kExpHi), v.x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), kNearest);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kFast ? kExpFastP[0] : kExpP[0]);
  if (kFast) {
    for (int i = 1; i < 3; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpFastP[i]));
  } else {
    for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP[i]));
  }
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n as two normal factors (n in [-150, 128]): overflow gives inf, underflow denormals or 0.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  return {_mm256_mul_ps(_mm256_mul_ps(p, s1), s2)};
}

#else  // portable: plain loops the compiler may vectorize

constexpr int W = 8;
struct V { float x[W]; };
inline V zero() { V r; for (int i = 0; i < W; ++i) r.x[i] = 0.f; return r; }
inline V set1(float a) { V r; for (int i = 0; i < W; ++i) r.x[i] = a; return r; }
template <class T>
inline V load(const T* p) { V r; for (int i = 0; i < W; ++i) r.x[i] = to_f32(p[i]); return r; }
inline void store(float* p, V a) { std::memcpy(p, a.x, sizeof a.x); }
inline void store(bf16_t* p, V a) { for (int i = 0; i < W; ++i) p[i] = to_bf16(a.x[i]); }
inline void store_bf16_exact(bf16_t* p, V a) { store(p, a); }
inline void store(f16_t* p, V a) { for (int i = 0; i < W; ++i) p[i] = to_f16(a.x[i]); }
inline V round_bf16(V a) { for (int i = 0; i < W; ++i) a.x[i] = to_f32(to_bf16(a.x[i])); return a; }
inline V round_f16(V a) { for (int i = 0; i < W; ++i) a.x[i] = to_f32(to_f16(a.x[i])); return a; }
inline V keep_first(V a, int n) { for (int i = n; i < W; ++i) a.x[i] = 0.f; return a; }
inline V add(V a, V b) { for (int i = 0; i < W; ++i) a.x[i] += b.x[i]; return a; }
inline V sub(V a, V b) { for (int i = 0; i < W; ++i) a.x[i] -= b.x[i]; return a; }
inline V mul(V a, V b) { for (int i = 0; i < W; ++i) a.x[i] *= b.x[i]; return a; }
inline V div(V a, V b) { for (int i = 0; i < W; ++i) a.x[i] /= b.x[i]; return a; }
inline V sqrt(V a) { for (int i = 0; i < W; ++i) a.x[i] = std::sqrt(a.x[i]); return a; }
template <bool kFast = false>
inline V recip(V a) { for (int i = 0; i < W; ++i) a.x[i] = 1.f / a.x[i]; return a; }
inline V fmadd(V a, V b, V c) { for (int i = 0; i < W; ++i) c.x[i] += a.x[i] * b.x[i]; return c; }
inline V fnmadd(V a, V b, V c) { for (int i = 0; i < W; ++i) c.x[i] -= a.x[i] * b.x[i]; return c; }
// Rounded twice here (no FMA in the portable build): error terms built with it come out 0.
inline V fmsub(V a, V b, V c) { for (int i = 0; i < W; ++i) c.x[i] = a.x[i] * b.x[i] - c.x[i]; return c; }
inline V neg(V a) { for (int i = 0; i < W; ++i) a.x[i] = -a.x[i]; return a; }
inline V abs(V a) { for (int i = 0; i < W; ++i) a.x[i] = std::fabs(a.x[i]); return a; }
inline V min(V a, V b) { for (int i = 0; i < W; ++i) a.x[i] = a.x[i] < b.x[i] ? a.x[i] : b.x[i]; return a; }
inline V max(V a, V b) { for (int i = 0; i < W; ++i) a.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i]; return a; }
inline V select_negative(V a, V x, V y) {
  for (int i = 0; i < W; ++i) y.x[i] = a.x[i] < 0.f ? x.x[i] : y.x[i];
  return y;
}
inline float reduce_add(V a) { float s = 0.f; for (int i = 0; i < W; ++i) s += a.x[i]; return s; }
inline float reduce_max(V a) { float m = a.x[0]; for (int i = 1; i < W; ++i) m = a.x[i] > m ? a.x[i] : m; return m; }
template <bool kFast = false>
inline V exp(V a) { for (int i = 0; i < W; ++i) a.x[i] = std::exp(a.x[i]); return a; }

#endif

inline V round_to(V a, const float*) { return a; }
inline V round_to(V a, const bf16_t*) { return round_bf16(a); }
inline V round_to(V a, const f16_t*) { return round_f16(a); }
// a rounded to the storage type T and back: what storing and reloading it would give.
template <class T>
inline V round_as(V a) { return round_to(a, static_cast<const T*>(nullptr)); }

// The first n < W elements from p (the other lanes 0), and their store.
template <class T>
inline V load_n(const T* p, int n) {
  T tmp[W] = {};
  std::memcpy(tmp, p, sizeof(T) * n);
  return load(tmp);
}
template <class T>
inline void store_n(T* p, V a, int n) {
  T tmp[W];
  store(tmp, a);
  std::memcpy(p, tmp, sizeof(T) * n);
}

// f(j, n) over the columns [c0, c1) in vectors of n = W lanes, two at a time, then the tail
// (n < W). Kernels load through ld() so the full-vector calls compile to plain loads.
template <class F>
inline void over_columns(int64_t c0, int64_t c1, const F& f) {
  int64_t j = c0;
  for (; j + 2 * W <= c1; j += 2 * W) {
    f(j, W);
    f(j + W, W);
  }
  for (; j + W <= c1; j += W) f(j, W);
  if (j < c1) f(j, int(c1 - j));
}
template <class T>
inline V ld(const T* p, int n) {
  return n == W ? load(p) : load_n(p, n);
}
template <class T>
inline void st(T* p, V v, int n) {
  if (n == W) store(p, v);
  else store_n(p, v, n);
}

// sigmoid(a) in *s and 1 - sigmoid(a) in *c, neither with cancellation nor overflow: with
// e = exp(-|a|) <= 1 and q = 1 / (1 + e), they are (q, e q) for a >= 0 and (e q, q) below.
template <bool kFast = false>
inline void sigmoid_pair(V a, V* s, V* c) {
  const V e = exp<kFast>(neg(abs(a)));
  const V q = recip<kFast>(add(set1(1.f), e));
  const V eq = mul(e, q);
  *s = select_negative(a, eq, q);
  *c = select_negative(a, q, eq);
}
template <bool kFast = false>
inline V sigmoid(V a) {
  const V e = exp<kFast>(neg(abs(a)));
  const V q = recip<kFast>(add(set1(1.f), e));
  return select_negative(a, mul(e, q), q);
}

}  // namespace llmcore::norm::LLMCORE_ISA_NS::vec
