// Cross-entropy rows of a logits chunk, loss and (optionally) gradient in place: the softmax part
// of the chunked LM-head loss (csrc/norm/norm.h: CrossEntropyRowsArgs). Compiled once per ISA.
//
// A row is read three times -- its max, the sum of exp(z - max), the gradient -- but only the first
// read comes from memory: a row of a large vocabulary (128K classes: 256-512 KB) still fits in L2,
// where the PyTorch composite (widen, log_softmax, exp, scatter, scale, narrow) streams the whole
// chunk through memory five or six times.
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "norm/norm.h"
#include "norm/parallel.h"
#include "norm/vec.h"

namespace llmcore::norm::LLMCORE_ISA_NS {
namespace {

using vec::V;
constexpr int W = vec::W;

// 16-bit gradients take the fast exp (relative error 5e-6, far below their rounding).
template <class T>
constexpr bool kFastFor = !std::is_same<T, float>::value;

inline void put(float* p, float x) { *p = x; }
inline void put(bf16_t* p, float x) { *p = vec::to_bf16(x); }
inline void put(f16_t* p, float x) { *p = vec::to_f16(x); }

template <class T>
void cross_entropy_rows_impl(const CrossEntropyRowsArgs& a) {
  const int64_t cols = a.cols;
  const float keep = 1.f - a.eps, spread = a.eps / float(cols);
  const bool smoothing = a.eps != 0.f;
  for_each_row(a.rows, cols, a.num_threads, [&](int64_t r) {
    T* z = static_cast<T*>(a.logits) + r * a.stride;
    // the max of the row
    V mv = vec::set1(-std::numeric_limits<float>::infinity());
    int64_t j = 0;
    for (; j + W <= cols; j += W) mv = vec::max(mv, vec::load(z + j));
    float m = vec::reduce_max(mv);
    for (; j < cols; ++j) {
      const float x = vec::to_f32(z[j]);
      m = x > m ? x : m;
    }
    // log sum exp (and, for smoothing, the sum of z - max: a sum of z itself rounds at the logits' magnitude, a
    // float32 loss 60x torch's error with logits near 1000, a probe)
    const V mm = vec::set1(m);
    V s = vec::zero(), d = vec::zero();
    vec::over_columns(0, cols, [&](int64_t c, int n) {
      const V x = vec::sub(vec::ld(z + c, n), mm);
      const V e = vec::exp(x);
      s = vec::add(s, n == W ? e : vec::keep_first(e, n));
      if (smoothing) d = vec::add(d, n == W ? x : vec::keep_first(x, n));
    });
    // loss = log(sum) - (1 - eps) (z_y - max) - eps (mean(z) - max): the max cancels exactly, and the row's
    // scalars are combined in double and rounded once (torch's float32 log_softmax rounds -log p_y once too)
    const float sum = vec::reduce_add(s), zy = vec::to_f32(z[a.labels[r]]);
    double loss = std::log(double(sum)) - double(keep) * (double(zy) - m);
    if (smoothing) loss -= double(a.eps) * (double(vec::reduce_add(d)) / double(cols));
    a.loss[r] = float(loss);
    if (!a.coef) return;
    const float c = a.coef[r];
    if (c == 0.f) {  // an ignored row: no gradient
      vec::over_columns(0, cols, [&](int64_t k, int n) { vec::st(z + k, vec::zero(), n); });
      return;
    }
    // p = exp(z - max) / sum: z - max is exact or nearly so where p is large, where exp(z - lse) would take
    // lse's rounding (relative ulp(lse)) into every p. Then (p - eps / V) c, the order of torch's in-place
    // ops; the label's entry also loses (1 - eps) c.
    const float inv = 1.f / sum;
    const V cv = vec::set1(c), iv = vec::set1(inv), sp = vec::set1(spread);
    vec::over_columns(0, cols, [&](int64_t k, int n) {
      const V p = vec::mul(vec::exp<kFastFor<T>>(vec::sub(vec::ld(z + k, n), mm)), iv);
      vec::st(z + k, vec::mul(smoothing ? vec::sub(p, sp) : p, cv), n);
    });
    put(z + a.labels[r], ((std::exp(zy - m) * inv - keep) - spread) * c);
  });
}

}  // namespace

void cross_entropy_rows(const CrossEntropyRowsArgs& a) {
  with_dtype(a.dtype, "cross_entropy_rows", [&](auto tag) { cross_entropy_rows_impl<decltype(tag)>(a); });
}

}  // namespace llmcore::norm::LLMCORE_ISA_NS
