// AdamW on chosen rows of a table, and the late replay of the weight decay the other rows
// missed (norm.h: AdamWRowsArgs, DecayRowsArgs). The element update is the one torch's fused
// CPU AdamW makes in its vector loop, operation for operation: this file is compiled with
// -ffp-contract=off, so each multiply and add rounds where it is written, and the fused
// multiply-adds are where torch's compiled kernel has them.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "norm/norm.h"
#include "norm/parallel.h"
#include "norm/vec.h"

namespace llmcore::norm::LLMCORE_ISA_NS {
namespace {

using vec::V;
constexpr int W = vec::W;

// a * b + c rounded once, in every build (the portable vec::fmadd rounds twice).
inline V fma(V a, V b, V c) {
#if defined(LLMCORE_ISA_AVX512) || defined(LLMCORE_ISA_AVX2)
  return vec::fmadd(a, b, c);
#else
  for (int i = 0; i < W; ++i) c.x[i] = std::fma(a.x[i], b.x[i], c.x[i]);
  return c;
#endif
}

struct AdamWConsts {
  V decay, coeff, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps, grad_scale;
  bool decays, scales, base_is_grad;
};

// One vector of n <= W elements (n < W: a row's tail, through masked copies).
inline void adamw_vec(const AdamWConsts& k, float* p, const float* g, float* m, float* v, int n) {
  const bool whole = n == W;
  V pv = whole ? vec::load(p) : vec::load_n(p, n);
  V gv = g == nullptr ? vec::zero() : whole ? vec::load(g) : vec::load_n(g, n);
  V mv = whole ? vec::load(m) : vec::load_n(m, n);
  V vv = whole ? vec::load(v) : vec::load_n(v, n);
  if (k.scales) gv = vec::div(gv, k.grad_scale);
  if (k.decays) pv = vec::mul(pv, k.decay);
  // exp_avg.lerp_(grad, 1 - beta1): base + coeff * (grad - exp_avg), one rounding
  mv = fma(k.coeff, vec::sub(gv, mv), k.base_is_grad ? gv : mv);
  // exp_avg_sq * beta2 + (1 - beta2) * grad * grad, which torch's build (GCC contracts its
  // vector intrinsics) computes as one fma of the last product onto the first: checked
  // bitwise against torch 2.13 (tests/test_lazy_rows.py)
  vv = fma(vec::mul(k.one_minus_beta2, gv), gv, vec::mul(vv, k.beta2));
  const V denom = vec::add(vec::div(vec::sqrt(vv), k.bc2_sqrt), k.eps);
  pv = vec::add(pv, vec::div(vec::mul(k.neg_step_size, mv), denom));
  if (whole) {
    vec::store(p, pv);
    vec::store(m, mv);
    vec::store(v, vv);
  } else {
    vec::store_n(p, pv, n);
    vec::store_n(m, mv, n);
    vec::store_n(v, vv, n);
  }
}

}  // namespace

void adamw_rows(const AdamWRowsArgs& a) {
  AdamWConsts k;
  k.decays = a.decay != 1.f;
  k.scales = a.grad_scale != 0.f;
  // torch blends by |weight| < 0.5: small weights step from exp_avg, large ones from grad
  k.base_is_grad = !(a.lerp < 0.5f && a.lerp > -0.5f);
  k.decay = vec::set1(a.decay);
  k.coeff = vec::set1(k.base_is_grad ? a.lerp - 1.f : a.lerp);
  k.beta2 = vec::set1(a.beta2);
  k.one_minus_beta2 = vec::set1(a.one_minus_beta2);
  k.neg_step_size = vec::set1(a.neg_step_size);
  k.bc2_sqrt = vec::set1(a.bc2_sqrt);
  k.eps = vec::set1(a.eps);
  k.grad_scale = vec::set1(a.grad_scale);
  const int64_t cols = a.cols;
  for_each_row(a.n_rows, cols, a.num_threads, [&](int64_t i) {
    const int64_t off = a.rows[i] * cols;
    const float* g = a.grad == nullptr ? nullptr : a.grad + off;
    for (int64_t c = 0; c < cols; c += W) {
      adamw_vec(k, a.param + off + c, g == nullptr ? nullptr : g + c, a.exp_avg + off + c, a.exp_avg_sq + off + c,
                int(std::min<int64_t>(W, cols - c)));
    }
  });
}

void decay_rows(const DecayRowsArgs& a) {
  constexpr int kVecs = 8;  // independent products in flight per step (two multiplies a cycle)
  const int64_t cols = a.cols;
  for_each_row(a.n_rows, cols, a.num_threads, [&](int64_t i) {
    float* row = a.param + a.rows[i] * cols;
    const int64_t s0 = a.first[i];
    int64_t c = 0;
    for (; c + kVecs * W <= cols; c += kVecs * W) {
      V x[kVecs];
      for (int j = 0; j < kVecs; ++j) x[j] = vec::load(row + c + j * W);
      for (int64_t s = s0; s < a.end; ++s) {
        const V f = vec::set1(a.factors[s]);
        for (int j = 0; j < kVecs; ++j) x[j] = vec::mul(x[j], f);
      }
      for (int j = 0; j < kVecs; ++j) vec::store(row + c + j * W, x[j]);
    }
    for (; c < cols; c += W) {
      const int n = int(std::min<int64_t>(W, cols - c));
      V x = vec::load_n(row + c, n);
      for (int64_t s = s0; s < a.end; ++s) x = vec::mul(x, vec::set1(a.factors[s]));
      vec::store_n(row + c, x, n);
    }
  });
}

}  // namespace llmcore::norm::LLMCORE_ISA_NS
