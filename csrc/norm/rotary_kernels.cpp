// Rotary position embedding (rotate-half layout), forward and backward, in float32 lanes whatever
// the storage dtype (norm.h: RotaryArgs). Compiled once per ISA (vec.h).
#include <algorithm>
#include <cstdint>

#include "norm/norm.h"
#include "norm/parallel.h"
#include "norm/vec.h"

namespace llmcore::norm::LLMCORE_ISA_NS {
namespace {

using vec::V;
constexpr int W = vec::W;

using vec::ld;
using vec::st;

// One row: the cos / sin lanes of a column block are loaded once and serve every head.
template <class T, class C>
void rotary_row(const RotaryArgs& a, int64_t r) {
  const int64_t half = a.head_dim / 2;
  const T* x = row_of<T>(a.x, r);
  const C* cs = row_of<C>(a.cos, r);
  const C* sn = row_of<C>(a.sin, r);
  T* out = static_cast<T*>(a.out) + r * a.heads * a.head_dim;
  for (int64_t j = 0; j < half; j += W) {
    const int n = int(std::min<int64_t>(W, half - j));
    const V c1 = ld(cs + j, n), c2 = ld(cs + half + j, n);
    V s1 = ld(sn + j, n), s2 = ld(sn + half + j, n);
    if (a.backward) {  // the transpose: (s1, s2) -> (-s2, -s1)
      const V t = s1;
      s1 = vec::neg(s2);
      s2 = vec::neg(t);
    }
    for (int64_t h = 0; h < a.heads; ++h) {
      const T* xh = x + h * a.head_dim;
      T* oh = out + h * a.head_dim;
      const V x1 = ld(xh + j, n), x2 = ld(xh + half + j, n);
      st(oh + j, vec::fnmadd(x2, s1, vec::mul(x1, c1)), n);
      st(oh + half + j, vec::fmadd(x1, s2, vec::mul(x2, c2)), n);
    }
  }
}

template <class T, class C>
void rotary_impl(const RotaryArgs& a) {
  for_each_row(a.rows, a.heads * a.head_dim, a.num_threads, [&](int64_t r) { rotary_row<T, C>(a, r); });
}

}  // namespace

void rotary(const RotaryArgs& a) {
  with_dtype(a.dtype, "rotary", [&](auto x) {
    with_dtype(a.cs_dtype, "rotary cos/sin", [&](auto c) { rotary_impl<decltype(x), decltype(c)>(a); });
  });
}

}  // namespace llmcore::norm::LLMCORE_ISA_NS
