// Fused activations: gelu(x + bias) (erf or tanh form) and silu(gate) * up, forward and
// backward, in float32 lanes whatever the storage dtype. Compiled once per ISA (vec.h).
#include <cstdint>
#include <type_traits>

#include "norm/norm.h"
#include "norm/parallel.h"
#include "norm/vec.h"

namespace llmcore::norm::LLMCORE_ISA_NS {
namespace {

using vec::V;
constexpr int W = vec::W;

constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhK = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhC = 0.044715f;

using vec::ld;
using vec::over_columns;
using vec::st;

// Phi(-|x|), the normal lower tail, as t R(t) exp(-x^2/2) with t = 1 / (1 + a |x|): R is a
// degree-8 fit of erfcx (relative error 1.5e-8), so the tail keeps its relative accuracy
// all the way down (where 1 + erf(x / sqrt 2) cancels). *gauss = exp(-x^2/2), corrected for
// the rounding of x^2 (it is phi(x) sqrt(2 pi), the derivative's other half).
// kFast (16-bit results): a degree-5 fit (5e-6), and no correction.
constexpr float kTailA = 0.26162951f;  // 0.37 / sqrt(2)
constexpr float kTailR[9] = {0.031168079f, -0.15264421f, 0.24551456f, -0.14507030f, 0.15708782f,
                             0.052530437f, 0.10331758f, 0.10368749f, 0.10440854f};  // halved, t^8 first
constexpr float kTailFastA = 0.31112698f;  // 0.44 / sqrt(2)
constexpr float kTailFastR[6] = {-0.073049068f, 0.17531373f, 0.020381569f, 0.13178337f, 0.12128763f, 0.12428019f};
template <bool kFast>
inline V normal_tail(V ax, V* gauss) {
  ax = vec::min(vec::set1(1e18f), ax);  // x = inf: t, x^2 and lo stay finite, the tail is 0
  const V t = vec::recip<kFast>(vec::fmadd(ax, vec::set1(kFast ? kTailFastA : kTailA), vec::set1(1.f)));
  V r = vec::set1(kFast ? kTailFastR[0] : kTailR[0]);
  if (kFast) {
    for (int i = 1; i < 6; ++i) r = vec::fmadd(r, t, vec::set1(kTailFastR[i]));
  } else {
    for (int i = 1; i < 9; ++i) r = vec::fmadd(r, t, vec::set1(kTailR[i]));
  }
  const V x2 = vec::mul(ax, ax);
  V e = vec::exp<kFast>(vec::mul(x2, vec::set1(-0.5f)));
  if (!kFast) {
    const V lo = vec::fmsub(ax, ax, x2);  // x^2 = x2 + lo exactly
    e = vec::fnmadd(vec::mul(e, vec::set1(0.5f)), lo, e);  // * exp(-lo / 2)
  }
  *gauss = e;
  return vec::mul(vec::mul(t, r), e);
}

// gelu(x) = x Phi(x); with kGrad, d gelu / dx = Phi(x) + x phi(x) instead.
template <bool kGrad, bool kFast>
inline V gelu_erf(V x) {
  V g;
  const V tail = normal_tail<kFast>(vec::abs(x), &g);
  const V cdf = vec::select_negative(x, tail, vec::sub(vec::set1(1.f), tail));
  if (!kGrad) return vec::mul(x, cdf);
  return vec::fmadd(vec::mul(x, g), vec::set1(kInvSqrt2Pi), cdf);
}

// 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): no cancellation
// for negative x. With kGrad, the derivative s + x s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2).
template <bool kGrad, bool kFast>
inline V gelu_tanh(V x) {
  const V x2 = vec::mul(x, x);
  const V two_u = vec::mul(vec::mul(x, vec::set1(2.f * kTanhK)), vec::fmadd(x2, vec::set1(kTanhC), vec::set1(1.f)));
  if (!kGrad) return vec::mul(x, vec::sigmoid<kFast>(two_u));
  V s, c;
  vec::sigmoid_pair<kFast>(two_u, &s, &c);
  const V du = vec::mul(vec::set1(2.f * kTanhK), vec::fmadd(x2, vec::set1(3.f * kTanhC), vec::set1(1.f)));
  return vec::fmadd(vec::mul(x, vec::mul(s, c)), du, s);
}

// Storage types narrower than float take the cheaper approximations (kFast above).
template <class T>
constexpr bool kFastFor = !std::is_same<T, float>::value;

template <bool kTanh, bool kGrad, class T>
inline V gelu(V x) {
  return kTanh ? gelu_tanh<kGrad, kFastFor<T>>(x) : gelu_erf<kGrad, kFastFor<T>>(x);
}

template <class T, bool kTanh>
void bias_gelu_forward_impl(const BiasGeluArgs& a) {
  const float* b = a.bias;
  for_each_piece(a.rows, a.cols, a.num_threads, [&](int64_t r, int64_t c0, int64_t c1) {
    const T* x = row_of<T>(a.x, r);
    T* y = static_cast<T*>(a.out) + r * a.cols;
    over_columns(c0, c1, [&](int64_t j, int n) {
      const V v = b ? vec::add(ld(x + j, n), ld(b + j, n)) : ld(x + j, n);
      st(y + j, gelu<kTanh, false, T>(v), n);
    });
  });
}

// grad_x of one row segment [c0, c1); the float grads are added to db (padded) when given.
template <class T, bool kTanh>
void bias_gelu_backward_row(const BiasGeluArgs& a, int64_t r, int64_t c0, int64_t c1, float* db) {
  const float* b = a.bias;
  const T* x = row_of<T>(a.x, r);
  const T* dy = row_of<T>(a.grad_out, r);
  T* dx = static_cast<T*>(a.out) + r * a.cols;
  over_columns(c0, c1, [&](int64_t j, int n) {
    const V v = b ? vec::add(ld(x + j, n), ld(b + j, n)) : ld(x + j, n);
    const V d = vec::mul(ld(dy + j, n), gelu<kTanh, true, T>(v));  // tail lanes: dy loads as 0
    st(dx + j, d, n);
    if (db) vec::store(db + j, vec::add(vec::load(db + j), d));
  });
}

template <class T, bool kTanh>
void bias_gelu_backward_impl(const BiasGeluArgs& a) {
  if (!a.grad_bias) {
    for_each_piece(a.rows, a.cols, a.num_threads, [&](int64_t r, int64_t c0, int64_t c1) {
      bias_gelu_backward_row<T, kTanh>(a, r, c0, c1, nullptr);
    });
    return;
  }
  float* out[1] = {a.grad_bias};
  for_each_row_with_sums(a.rows, a.cols, a.num_threads, 1, out, [&](int64_t r, float* sums, int64_t) {
    bias_gelu_backward_row<T, kTanh>(a, r, 0, a.cols, sums);
  });
}

template <class T>
void swiglu_forward_impl(const SwigluArgs& a) {
  for_each_piece(a.rows, a.cols, a.num_threads, [&](int64_t r, int64_t c0, int64_t c1) {
    const T* g = row_of<T>(a.gate, r);
    const T* u = row_of<T>(a.up, r);
    T* y = static_cast<T*>(a.out) + r * a.cols;
    over_columns(c0, c1, [&](int64_t j, int n) {
      const V gv = ld(g + j, n);
      st(y + j, vec::mul(vec::mul(gv, vec::sigmoid<kFastFor<T>>(gv)), ld(u + j, n)), n);
    });
  });
}

// grad_gate = dy up s (1 + g (1 - s)), grad_up = dy g s, with s = sigmoid(g).
template <class T>
void swiglu_backward_impl(const SwigluArgs& a) {
  for_each_piece(a.rows, a.cols, a.num_threads, [&](int64_t r, int64_t c0, int64_t c1) {
    const T* g = row_of<T>(a.gate, r);
    const T* u = row_of<T>(a.up, r);
    const T* dy = row_of<T>(a.grad_out, r);
    T* dg = static_cast<T*>(a.grad_gate) + r * a.cols;
    T* du = static_cast<T*>(a.grad_up) + r * a.cols;
    over_columns(c0, c1, [&](int64_t j, int n) {
      const V gv = ld(g + j, n), dv = ld(dy + j, n);
      V s, c;  // sigmoid(g), 1 - sigmoid(g)
      vec::sigmoid_pair<kFastFor<T>>(gv, &s, &c);
      const V gs = vec::mul(gv, s);
      st(du + j, vec::mul(dv, gs), n);
      st(dg + j, vec::mul(vec::mul(dv, ld(u + j, n)), vec::fmadd(gs, c, s)), n);
    });
  });
}

}  // namespace

void bias_gelu_forward(const BiasGeluArgs& a) {
  with_dtype(a.dtype, "activation kernels", [&](auto tag) {
    using T = decltype(tag);
    if (a.tanh) bias_gelu_forward_impl<T, true>(a);
    else bias_gelu_forward_impl<T, false>(a);
  });
}

void bias_gelu_backward(const BiasGeluArgs& a) {
  with_dtype(a.dtype, "activation kernels", [&](auto tag) {
    using T = decltype(tag);
    if (a.tanh) bias_gelu_backward_impl<T, true>(a);
    else bias_gelu_backward_impl<T, false>(a);
  });
}

void swiglu_forward(const SwigluArgs& a) {
  with_dtype(a.dtype, "activation kernels", [&](auto tag) { swiglu_forward_impl<decltype(tag)>(a); });
}

void swiglu_backward(const SwigluArgs& a) {
  with_dtype(a.dtype, "activation kernels", [&](auto tag) { swiglu_backward_impl<decltype(tag)>(a); });
}

}  // namespace llmcore::norm::LLMCORE_ISA_NS
