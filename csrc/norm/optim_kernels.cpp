// Optimizer kernels: AdamW on chosen rows of a table or on whole tensors, the late replay of
// the weight decay untouched rows missed, and gradient sums of squares (norm.h: AdamWRowsArgs,
// AdamWTensorsArgs, DecayRowsArgs, SumSquaresArgs). The element update is the one torch's fused
// CPU AdamW makes in its vector loop, operation for operation: this file is compiled with
// -ffp-contract=off, so each multiply and add rounds where it is written, and the fused
// multiply-adds are where torch's compiled kernel has them.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

// One vector of n <= W elements (n < W: a row's tail, through masked copies). G: the
// gradient's storage (float or bf16_t; null: zeros); shadow (null: none) takes the new
// parameter rounded to bf16.
template <class G>
inline void adamw_vec(const AdamWConsts& k, float* p, const G* g, float* m, float* v, bf16_t* shadow, int n) {
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
    if (shadow) vec::store_bf16_exact(shadow, pv);
  } else {
    vec::store_n(p, pv, n);
    vec::store_n(m, mv, n);
    vec::store_n(v, vv, n);
    if (shadow) {
      bf16_t tmp[W];
      vec::store_bf16_exact(tmp, pv);
      std::memcpy(shadow, tmp, sizeof(bf16_t) * n);
    }
  }
}

// Elements [i0, i1) of one flat float32 tensor (and its gradient, moments and shadow).
template <class G>
void adamw_range(const AdamWConsts& k, float* param, const void* grad, float* m, float* v, void* shadow, int64_t i0,
                 int64_t i1) {
  const G* g = static_cast<const G*>(grad);
  bf16_t* sh = static_cast<bf16_t*>(shadow);
  for (int64_t i = i0; i < i1; i += W)
    adamw_vec(k, param + i, g == nullptr ? nullptr : g + i, m + i, v + i, sh == nullptr ? nullptr : sh + i,
              int(std::min<int64_t>(W, i1 - i)));
}

// Work over many flat tensors cut into chunks of kChunk elements: tensor t owns chunks
// [first[t], first[t + 1]), so small tensors share the threads.
template <int64_t kChunk>
struct TensorChunks {
  std::vector<int64_t> first;
  template <class Count>
  TensorChunks(int64_t n_tensors, const Count& count) : first(n_tensors + 1, 0) {
    for (int64_t t = 0; t < n_tensors; ++t) first[t + 1] = first[t] + (count(t) + kChunk - 1) / kChunk;
  }
  int64_t total() const { return first.back(); }
  // chunk c's tensor t, and the index in t of chunk c's first element
  int64_t tensor_of(int64_t c) const { return std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1; }
  int64_t begin(int64_t t, int64_t c) const { return (c - first[t]) * kChunk; }
};

inline void prefetch_for_write(const void* p, int64_t bytes) {
  for (int64_t x = 0; x < bytes; x += 64) __builtin_prefetch(static_cast<const char*>(p) + x, 1, 3);
}

template <class G>
void adamw_rows_impl(const AdamWRowsArgs& a, const AdamWConsts& k) {
  // Rows are scattered through tables far larger than the caches: the hardware prefetchers
  // follow a row but not the jump to the next one, so each row asks for the row kAhead later.
  constexpr int64_t kAhead = 2;
  const AdamWTensor& t = a.table;
  const int64_t cols = a.cols;
  for_each_row(a.n_rows, cols, a.shared.num_threads, [&](int64_t i) {
    if (i + kAhead < a.n_rows) {
      const int64_t next = a.rows[i + kAhead] * cols;
      prefetch_for_write(t.param + next, cols * int64_t(sizeof(float)));
      prefetch_for_write(t.exp_avg + next, cols * int64_t(sizeof(float)));
      prefetch_for_write(t.exp_avg_sq + next, cols * int64_t(sizeof(float)));
      if (t.grad != nullptr) prefetch_for_write(static_cast<const G*>(t.grad) + next, cols * int64_t(sizeof(G)));
    }
    const int64_t off = a.rows[i] * cols;
    adamw_range<G>(k, t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.shadow, off, off + cols);
  });
}

AdamWConsts make_consts(const AdamWTensor& t, const AdamWShared& sh) {
  AdamWConsts k;
  k.decays = t.decay != 1.f;
  k.scales = sh.grad_scale != 0.f;
  // torch blends by |weight| < 0.5: small weights step from exp_avg, large ones from grad
  k.base_is_grad = !(sh.lerp < 0.5f && sh.lerp > -0.5f);
  k.decay = vec::set1(t.decay);
  k.coeff = vec::set1(k.base_is_grad ? sh.lerp - 1.f : sh.lerp);
  k.beta2 = vec::set1(sh.beta2);
  k.one_minus_beta2 = vec::set1(sh.one_minus_beta2);
  k.neg_step_size = vec::set1(t.neg_step_size);
  k.bc2_sqrt = vec::set1(t.bc2_sqrt);
  k.eps = vec::set1(sh.eps);
  k.grad_scale = vec::set1(sh.grad_scale);
  return k;
}

}  // namespace

void adamw_rows(const AdamWRowsArgs& a) {
  const AdamWConsts k = make_consts(a.table, a.shared);
  if (a.table.grad_dtype == DType::bf16)
    adamw_rows_impl<bf16_t>(a, k);
  else
    adamw_rows_impl<float>(a, k);
}

void adamw_tensors(const AdamWTensorsArgs& a) {
  constexpr int64_t kChunk = 1 << 14;  // a multiple of every vector width
  const TensorChunks<kChunk> work(a.n_tensors, [&](int64_t t) { return a.tensors[t].numel; });
  const int64_t chunks = work.total();
  const int nt = threads_for(chunks, kChunk, a.shared.num_threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t ti = work.tensor_of(c);
    const AdamWTensor& t = a.tensors[ti];
    const int64_t i0 = work.begin(ti, c), i1 = std::min(t.numel, i0 + kChunk);
    const AdamWConsts k = make_consts(t, a.shared);
    if (t.grad_dtype == DType::bf16)
      adamw_range<bf16_t>(k, t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.shadow, i0, i1);
    else
      adamw_range<float>(k, t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.shadow, i0, i1);
  }
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

// Squares are exact in double (a float has 24 significant bits); each chunk sums them in
// kLanes double accumulators (bf16: after float partial sums of 8), and the chunks' sums are
// added in chunk order, so the result does not depend on the thread count.
void sum_squares(const SumSquaresArgs& a) {
  constexpr int kLanes = 8;
  constexpr int64_t kChunk = 1 << 15;
  const TensorChunks<kChunk> work(a.n_tensors, [&](int64_t t) { return a.counts[t]; });
  const int64_t chunks = work.total();
  std::vector<double> part(chunks, 0.0);
  const int nt = threads_for(chunks, kChunk, a.num_threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t t = work.tensor_of(c);
    const int64_t i0 = work.begin(t, c), i1 = std::min(a.counts[t], i0 + kChunk);
    double acc[kLanes] = {};
    if (a.dtypes[t] == DType::bf16) {
      // A bf16 value has 8 significant bits, so its square is exact in float: lanes add 8 squares
      // in float (2 chains of 4; relative error below 3e-7), then the partial sums go to double.
      const bf16_t* x = static_cast<const bf16_t*>(a.data[t]);
      int64_t i = i0;
      for (; i + 8 * W <= i1; i += 8 * W) {
        V s0 = vec::zero(), s1 = vec::zero();
        for (int j = 0; j < 8; j += 2) {
          const V v0 = vec::load(x + i + j * W), v1 = vec::load(x + i + (j + 1) * W);
          s0 = vec::fmadd(v0, v0, s0);
          s1 = vec::fmadd(v1, v1, s1);
        }
        float sums[W];
        vec::store(sums, vec::add(s0, s1));
        for (int l = 0; l < W; ++l) acc[l % kLanes] += double(sums[l]);
      }
      for (; i < i1; ++i) {
        const double v = vec::to_f32(x[i]);
        acc[0] += v * v;
      }
    } else {
      const float* x = static_cast<const float*>(a.data[t]);
      int64_t i = i0;
      for (; i + kLanes <= i1; i += kLanes)
        for (int l = 0; l < kLanes; ++l) {
          const double v = x[i + l];
          acc[l] += v * v;
        }
      for (; i < i1; ++i) acc[0] += double(x[i]) * x[i];
    }
    double sum = 0.0;
    for (int l = 0; l < kLanes; ++l) sum += acc[l];
    part[c] = sum;
  }
  double total = 0.0;
  for (int64_t c = 0; c < chunks; ++c) total += part[c];
  *a.out = total;
}

}  // namespace llmcore::norm::LLMCORE_ISA_NS
