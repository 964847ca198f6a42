// LayerNorm and RMSNorm, forward and backward, with the optional fused residual add. One
// row per task; a row is read from the cache-resident input two or three times rather than
// staged in a float copy. Compiled once per ISA (vec.h).
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "norm/norm.h"
#include "norm/parallel.h"
#include "norm/vec.h"

namespace llmcore::norm::LLMCORE_ISA_NS {
namespace {

using vec::V;
constexpr int W = vec::W;

// Sum of x[j] (kSquares: of x[j]^2) over a row, two accumulators for the adder latency.
template <bool kSquares, class T>
float row_sum(const T* x, int64_t n) {
  V a0 = vec::zero(), a1 = vec::zero();
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const V u = vec::load(x + j), v = vec::load(x + j + W);
    a0 = kSquares ? vec::fmadd(u, u, a0) : vec::add(a0, u);
    a1 = kSquares ? vec::fmadd(v, v, a1) : vec::add(a1, v);
  }
  for (; j + W <= n; j += W) {
    const V u = vec::load(x + j);
    a0 = kSquares ? vec::fmadd(u, u, a0) : vec::add(a0, u);
  }
  if (j < n) {
    const V u = vec::load_n(x + j, int(n - j));  // zero lanes add nothing
    a1 = kSquares ? vec::fmadd(u, u, a1) : vec::add(a1, u);
  }
  return vec::reduce_add(vec::add(a0, a1));
}

// Sum of (x[j] - mean)^2 over a row.
template <class T>
float row_sq_dev(const T* x, int64_t n, float mean) {
  const V m = vec::set1(mean);
  V a0 = vec::zero(), a1 = vec::zero();
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const V u = vec::sub(vec::load(x + j), m), v = vec::sub(vec::load(x + j + W), m);
    a0 = vec::fmadd(u, u, a0);
    a1 = vec::fmadd(v, v, a1);
  }
  for (; j + W <= n; j += W) {
    const V u = vec::sub(vec::load(x + j), m);
    a0 = vec::fmadd(u, u, a0);
  }
  if (j < n) {
    const V u = vec::keep_first(vec::sub(vec::load_n(x + j, int(n - j)), m), int(n - j));
    a1 = vec::fmadd(u, u, a1);
  }
  return vec::reduce_add(vec::add(a0, a1));
}

// s[j] = round_T(x[j] + r[j]); returns the sum (kSquares: sum of squares) of the rounded s.
template <bool kSquares, class T>
float add_residual_row(const T* x, const T* r, T* s, int64_t n) {
  V acc = vec::zero();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V v = vec::round_as<T>(vec::add(vec::load(x + j), vec::load(r + j)));
    vec::store(s + j, v);
    acc = kSquares ? vec::fmadd(v, v, acc) : vec::add(acc, v);
  }
  if (j < n) {
    const int t = int(n - j);
    const V v = vec::round_as<T>(vec::add(vec::load_n(x + j, t), vec::load_n(r + j, t)));
    vec::store_n(s + j, v, t);
    acc = kSquares ? vec::fmadd(v, v, acc) : vec::add(acc, v);
  }
  return vec::reduce_add(acc);
}

template <class TI, class TO, bool kRms>
void forward_row(const NormForwardArgs& a, int64_t r) {
  const int64_t n = a.cols;
  const TI* s = row_of<TI>(a.x, r);
  float acc;
  if (a.residual.data) {
    TI* so = static_cast<TI*>(a.sum_out) + r * n;
    acc = add_residual_row<kRms>(s, row_of<TI>(a.residual, r), so, n);
    s = so;
  } else {
    acc = row_sum<kRms>(s, n);
  }
  TO* y = static_cast<TO*>(a.y) + r * n;
  const float* w = a.weight;
  if constexpr (kRms) {
    const float rstd = 1.f / std::sqrt(acc / float(n) + a.eps);
    a.rstd[r] = rstd;
    const V rs = vec::set1(rstd);
    int64_t j = 0;
    for (; j + W <= n; j += W)  // HF Llama: weight * (s * rstd).to(input dtype)
      vec::store(y + j, vec::mul(vec::load(w + j), vec::round_as<TI>(vec::mul(vec::load(s + j), rs))));
    if (j < n) {
      const int t = int(n - j);
      vec::store_n(y + j, vec::mul(vec::load_n(w + j, t), vec::round_as<TI>(vec::mul(vec::load_n(s + j, t), rs))), t);
    }
  } else {
    const float mean = acc / float(n);
    // A variance past the float maximum gave rstd 0 and y the bias, silently; torch's row is NaN (a probe).
    const float var = row_sq_dev(s, n, mean) / float(n) + a.eps;
    const float rstd = std::isinf(var) ? NAN : 1.f / std::sqrt(var);
    a.mean[r] = mean;
    a.rstd[r] = rstd;
    const V m = vec::set1(mean), rs = vec::set1(rstd);
    const float* b = a.bias;
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const V xhat = vec::mul(vec::sub(vec::load(s + j), m), rs);
      vec::store(y + j, vec::fmadd(xhat, vec::load(w + j), vec::load(b + j)));
    }
    if (j < n) {
      const int t = int(n - j);
      const V xhat = vec::mul(vec::sub(vec::load_n(s + j, t), m), rs);
      vec::store_n(y + j, vec::fmadd(xhat, vec::load_n(w + j, t), vec::load_n(b + j, t)), t);
    }
  }
}

// The normalized value of a lane group: (s - mean) * rstd, or s * rstd for RMSNorm.
template <bool kRms>
inline V normalized(V s, V m, V rs) {
  return kRms ? vec::mul(s, rs) : vec::mul(vec::sub(s, m), rs);
}

// One row of the backward. With g = grad_out * weight and xhat the normalized input,
//   LayerNorm: grad_s = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   grad_s = rstd * (g - xhat * mean(g * xhat))
// plus grad_sum. sums (if not null) gathers grad_weight (sums[0..]) and grad_bias (sums[ld..]).
template <class TI, class TO, bool kRms>
void backward_row(const NormBackwardArgs& a, int64_t r, float* sums, int64_t ld) {
  const int64_t n = a.cols;
  const TI* s = row_of<TI>(a.input, r);
  const TO* dy = row_of<TO>(a.grad_out, r);
  const float* w = a.weight;
  const V m = vec::set1(kRms ? 0.f : a.mean[r]), rs = vec::set1(a.rstd[r]);
  float* dw = sums;
  float* db = sums && !kRms ? sums + ld : nullptr;
  // Zero-filled tail lanes give g = 0 and grad_out = 0, so they add nothing to any sum.
  V a1 = vec::zero(), a2 = vec::zero();
  auto pass1 = [&](V sv, V dv, V wv, int64_t j) {
    const V xhat = normalized<kRms>(sv, m, rs);
    const V g = vec::mul(dv, wv);
    a1 = vec::add(a1, g);
    a2 = vec::fmadd(g, xhat, a2);
    if (dw) {  // sums are padded to whole vectors
      vec::store(dw + j, vec::fmadd(dv, kRms ? vec::round_as<TI>(xhat) : xhat, vec::load(dw + j)));
      if (db) vec::store(db + j, vec::add(vec::load(db + j), dv));
    }
  };
  int64_t j = 0;
  for (; j + W <= n; j += W) pass1(vec::load(s + j), vec::load(dy + j), vec::load(w + j), j);
  const int t = int(n - j);
  if (t > 0) pass1(vec::load_n(s + j, t), vec::load_n(dy + j, t), vec::load_n(w + j, t), j);
  const V c1 = vec::set1(kRms ? 0.f : vec::reduce_add(a1) / float(n));
  const V c2 = vec::set1(vec::reduce_add(a2) / float(n));

  TI* dx = static_cast<TI*>(a.grad_in) + r * n;
  const TI* gs = a.grad_sum.data ? row_of<TI>(a.grad_sum, r) : nullptr;
  auto pass2 = [&](V sv, V dv, V wv) {
    const V xhat = normalized<kRms>(sv, m, rs);
    return vec::mul(vec::fnmadd(xhat, c2, vec::sub(vec::mul(dv, wv), c1)), rs);
  };
  j = 0;
  for (; j + W <= n; j += W) {
    V d = pass2(vec::load(s + j), vec::load(dy + j), vec::load(w + j));
    if (gs) d = vec::add(d, vec::load(gs + j));
    vec::store(dx + j, d);
  }
  if (t > 0) {
    V d = pass2(vec::load_n(s + j, t), vec::load_n(dy + j, t), vec::load_n(w + j, t));
    if (gs) d = vec::add(d, vec::load_n(gs + j, t));
    vec::store_n(dx + j, d, t);
  }
}

template <class TI, class TO, bool kRms>
void forward_impl(const NormForwardArgs& a) {
  for_each_row(a.rows, a.cols, a.num_threads, [&](int64_t r) { forward_row<TI, TO, kRms>(a, r); });
}

template <class TI, class TO, bool kRms>
void backward_impl(const NormBackwardArgs& a) {
  if (!a.grad_weight && !a.grad_bias) {
    for_each_row(a.rows, a.cols, a.num_threads, [&](int64_t r) { backward_row<TI, TO, kRms>(a, r, nullptr, 0); });
    return;
  }
  float* out[2] = {a.grad_weight, a.grad_bias};
  for_each_row_with_sums(a.rows, a.cols, a.num_threads, kRms ? 1 : 2, out, [&](int64_t r, float* sums, int64_t ld) {
    backward_row<TI, TO, kRms>(a, r, sums, ld);
  });
}

template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<TI>, Tag<TO>) for the supported (input, output) dtype pairs.
template <class F>
void with_dtypes(DType in, DType out, const F& f) {
  if (in == out) {
    switch (in) {
      case DType::f32: return f(Tag<float>{}, Tag<float>{});
      case DType::bf16: return f(Tag<bf16_t>{}, Tag<bf16_t>{});
      case DType::f16: return f(Tag<f16_t>{}, Tag<f16_t>{});
    }
  } else if (out == DType::f32) {
    if (in == DType::bf16) return f(Tag<bf16_t>{}, Tag<float>{});
    if (in == DType::f16) return f(Tag<f16_t>{}, Tag<float>{});
  }
  throw std::invalid_argument("norm kernels: unsupported dtype pair (input " + std::to_string(int(in)) + ", output " +
                              std::to_string(int(out)) + ")");
}

}  // namespace

void norm_forward(const NormForwardArgs& a) {
  with_dtypes(a.dtype, a.out_dtype, [&](auto ti, auto to) {
    using TI = typename decltype(ti)::type;
    using TO = typename decltype(to)::type;
    if (a.rms) forward_impl<TI, TO, true>(a);
    else forward_impl<TI, TO, false>(a);
  });
}

void norm_backward(const NormBackwardArgs& a) {
  with_dtypes(a.dtype, a.out_dtype, [&](auto ti, auto to) {
    using TI = typename decltype(ti)::type;
    using TO = typename decltype(to)::type;
    if (a.rms) backward_impl<TI, TO, true>(a);
    else backward_impl<TI, TO, false>(a);
  });
}

}  // namespace llmcore::norm::LLMCORE_ISA_NS
