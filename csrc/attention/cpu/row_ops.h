// Vectorized row operations of the online softmax.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "attention/cpu/simd.h"

namespace llmcore::attention::LLMCORE_ISA_NS {

// max(a, b) as one compare: std::fmax is a libm call here (its NaN rule has no instruction).
inline float max_of(float a, float b) { return a > b ? a : b; }

inline float row_max(const float* x, int64_t n) {
  namespace sv = simd;
  if (n <= 0) return -INFINITY;
  // Tails go through masked loads: causal diagonal rows rarely end on a vector boundary.
  sv::V acc = sv::load_or(x, int(std::min<int64_t>(n, sv::W)), -INFINITY);
  int64_t j = sv::W;
  for (; j + sv::W <= n; j += sv::W) acc = sv::max(acc, sv::load(x + j));
  if (j < n) acc = sv::max(acc, sv::load_or(x + j, int(n - j), -INFINITY));
  return sv::reduce_max(acc);
}

// x[j] = 2^(x[j] * scale - shift), rounded once before the exp (FMA); returns the sum.
inline float row_exp2_sum(float* x, int64_t n, float scale, float shift) {
  namespace sv = simd;
  const sv::V c = sv::set1(scale), s = sv::set1(-shift);
  sv::V acc = sv::zero();
  int64_t j = 0;
  for (; j + sv::W <= n; j += sv::W) {
    const sv::V e = sv::exp2(sv::fmadd(sv::load(x + j), c, s));
    sv::store(x + j, e);
    acc = sv::add(acc, e);
  }
  if (j < n) {
    const int t = int(n - j);
    const sv::V e = sv::keep_first(sv::exp2(sv::fmadd(sv::load(x + j, t), c, s)), t);
    sv::store(x + j, e, t);
    acc = sv::add(acc, e);
  }
  return sv::reduce_add(acc);
}

// out[i] = 2^(a[i] - b[i]); lanes where both are -inf give NaN, and callers skip those.
inline void exp2_of_difference(const float* a, const float* b, float* out, int64_t n) {
  namespace sv = simd;
  int64_t i = 0;
  for (; i + sv::W <= n; i += sv::W) sv::store(out + i, sv::exp2(sv::sub(sv::load(a + i), sv::load(b + i))));
  if (i < n) {
    const int t = int(n - i);
    sv::store(out + i, sv::exp2(sv::sub(sv::load(a + i, t), sv::load(b + i, t))), t);
  }
}

// The saved logsumexp (base 2) of n rows: lse[r] = m[r] + log2(l[r]), or -inf for a row that
// saw no key (l[r] = 0). A NaN row sum (a NaN or +inf score) stays NaN, so the backward's P of
// that row is NaN, as torch's gradients are (-inf there made P 0 and the gradients finite).
inline void row_lse(const float* m, const float* l, int64_t n, float* lse) {
  namespace sv = simd;
  int64_t i = 0;
  for (; i + sv::W <= n; i += sv::W) sv::store(lse + i, sv::add(sv::load(m + i), sv::log2(sv::load(l + i))));
  if (i < n) {
    const int t = int(n - i);
    sv::store(lse + i, sv::add(sv::load(m + i, t), sv::log2(sv::load_or(l + i, t, 1.f))), t);
  }
  for (i = 0; i < n; ++i)
    if (!(l[i] > 0.f)) lse[i] = l[i] == 0.f ? -INFINITY : NAN;  // (the vector log2 maps NaN to a number)
}

// sum_i a[i] * b[i] in vector lanes (no particular rounding order).
inline float row_dot(const float* a, const float* b, int64_t n) {
  namespace sv = simd;
  sv::V acc = sv::zero();
  int64_t i = 0;
  for (; i + sv::W <= n; i += sv::W) acc = sv::fmadd(sv::load(a + i), sv::load(b + i), acc);
  if (i < n) acc = sv::fmadd(sv::load(a + i, int(n - i)), sv::load(b + i, int(n - i)), acc);
  return sv::reduce_add(acc);
}

// y[i] += x[i]
inline void add_rows(float* y, const float* x, int64_t n) {
  namespace sv = simd;
  int64_t i = 0;
  for (; i + sv::W <= n; i += sv::W) sv::store(y + i, sv::add(sv::load(y + i), sv::load(x + i)));
  for (; i < n; ++i) y[i] += x[i];
}

inline void row_scale(float* x, int64_t n, float a) {
  namespace sv = simd;
  const sv::V av = sv::set1(a);
  int64_t j = 0;
  for (; j + sv::W <= n; j += sv::W) sv::store(x + j, sv::mul(sv::load(x + j), av));
  for (; j < n; ++j) x[j] *= a;
}

// x[i] = 2^(x[i] * scale + bias[i]) (the backward's P from the saved logsumexp, one query
// per column; bias = -lse) for i in [hidden, n); the first `hidden` columns (queries a key's
// causal diagonal hides) become 0. With hidden > 0 every vector is computed and its hidden lanes
// zeroed, in one loop whose trip count does not depend on `hidden` (which changes from row to row
// of a diagonal band; before, zero stores, one masked vector and the rest, each loop's count
// following it; mispredicted loop exits are the likely cost, not counted). AMX bf16 backward at
// (4,12,512,64), rdtsc per tile: a diagonal tile cost 1.3x a whole one for 3/4 of its area,
// 1.0x with this; causal backward -4% to -6% (benchmarks/causal_ratio.py, builds alternating);
// fp32 and AVX512-BF16: no change.
template <bool kHidden>
inline void row_exp2_fma_impl(float* x, float scale, const float* bias, int64_t n, int64_t hidden) {
  namespace sv = simd;
  const sv::V c = sv::set1(scale);
  int64_t i = 0;
  for (; i + sv::W <= n; i += sv::W) {
    sv::V e = sv::exp2(sv::fmadd(sv::load(x + i), c, sv::load(bias + i)));
    if constexpr (kHidden) e = sv::zero_first(e, int(std::clamp<int64_t>(hidden - i, 0, sv::W)));
    sv::store(x + i, e);
  }
  if (i < n) {
    const int t = int(n - i);
    sv::V e = sv::exp2(sv::fmadd(sv::load(x + i, t), c, sv::load(bias + i, t)));
    if constexpr (kHidden) e = sv::zero_first(e, int(std::clamp<int64_t>(hidden - i, 0, t)));
    sv::store(x + i, e, t);
  }
}

inline void row_exp2_fma(float* x, float scale, const float* bias, int64_t n, int64_t hidden = 0) {
  if (hidden > 0)
    row_exp2_fma_impl<true>(x, scale, bias, n, hidden);
  else
    row_exp2_fma_impl<false>(x, scale, bias, n, 0);
}

// Dropout on a row of P: keep_scale[i] = keep[i] * scale (keep 0 or 1) for i < valid and 0 up to
// n, out[i] = p[i] * keep_scale[i] (in place when out is p). keep_scale may be null.
inline void row_dropout(const float* p, const uint8_t* keep, int64_t valid, int64_t n, float scale, float* keep_scale,
                        float* out) {
  namespace sv = simd;
  const sv::V s = sv::set1(scale);
  for (int64_t i = 0; i < n; i += sv::W) {
    const int t = int(std::min<int64_t>(sv::W, n - i)), v = int(std::clamp<int64_t>(valid - i, 0, t));
    const sv::V ks = v == sv::W ? sv::mul(sv::load_u8(keep + i), s) : v > 0 ? sv::mul(sv::load_u8(keep + i, v), s) : sv::zero();
    if (t == sv::W) {
      if (keep_scale) sv::store(keep_scale + i, ks);
      sv::store(out + i, sv::mul(sv::load(p + i), ks));
    } else {
      if (keep_scale) sv::store(keep_scale + i, ks, t);
      sv::store(out + i, sv::mul(sv::load(p + i, t), ks), t);
    }
  }
}

// ds[i] = p[i] * (dp[i] * keep_scale[i] - di[i]), keep_scale null meaning 1 (no dropout).
inline void row_softmax_grad(const float* p, const float* dp, const float* keep_scale, const float* di, float* ds,
                             int64_t n) {
  namespace sv = simd;
  int64_t i = 0;
  for (; i + sv::W <= n; i += sv::W) {
    sv::V g = sv::load(dp + i);
    if (keep_scale) g = sv::mul(g, sv::load(keep_scale + i));
    sv::store(ds + i, sv::mul(sv::load(p + i), sv::sub(g, sv::load(di + i))));
  }
  for (; i < n; ++i) ds[i] = p[i] * ((keep_scale ? dp[i] * keep_scale[i] : dp[i]) - di[i]);
}

}  // namespace llmcore::attention::LLMCORE_ISA_NS
