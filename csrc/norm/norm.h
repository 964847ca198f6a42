// Row-wise normalizations and fused activations on the CPU: LayerNorm, RMSNorm, bias + GELU
// and SwiGLU, forward and backward. Everything is raw pointers, sizes and strides.
//
// Every operand is a (rows, cols) matrix: its last dim is contiguous and its rows sit
// `stride` elements apart (0 broadcasts one row). Outputs are contiguous (rows, cols).
// Arithmetic is float32 whatever the storage dtype; weight and bias are float32 vectors of
// cols elements (the Python layer converts them). Column sums (weight and bias gradients)
// are float32 and summed in a fixed order for a given thread count.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace llmcore::norm {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

// Storage types for the 16-bit floats (bit patterns; the kernels convert through float).
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

// Calls f(T{}) with T the storage type of dt (float, bf16_t or f16_t); `what` names the kernels in the error.
template <class F>
void with_dtype(DType dt, const char* what, const F& f) {
  switch (dt) {
    case DType::f32: return f(float{});
    case DType::bf16: return f(bf16_t{});
    case DType::f16: return f(f16_t{});
  }
  throw std::invalid_argument(std::string(what) + ": unsupported dtype");
}

struct Mat {
  const void* data = nullptr;  // null: absent (optional operands)
  int64_t stride = 0;          // elements between rows
};

// LayerNorm: y = (s - mean) * rstd * weight + bias, rstd = 1 / sqrt(var + eps), var biased.
// RMSNorm (HF Llama): y = weight * round_dtype(s * rstd), rstd = 1 / sqrt(mean(s^2) + eps);
// the product is taken in float32 and rounded once to out_dtype.
// s = x, or round_dtype(x + residual) written to sum_out when a residual is given.
struct NormForwardArgs {
  bool rms = false;
  DType dtype = DType::f32;      // x, residual, sum_out
  DType out_dtype = DType::f32;  // y: dtype, or f32 (RMSNorm of a 16-bit input with a float32 weight)
  int64_t rows = 0, cols = 0;
  float eps = 0.f;
  Mat x, residual;
  const float* weight = nullptr;  // cols; required
  const float* bias = nullptr;    // cols; required for LayerNorm, ignored by RMSNorm
  void* y = nullptr;
  void* sum_out = nullptr;  // required with a residual
  float* mean = nullptr;    // rows; LayerNorm only
  float* rstd = nullptr;    // rows
  int num_threads = 1;
};

// Gradients from the saved statistics. grad_in = d loss / d s (+ grad_sum, the gradient that
// reached the returned sum directly): with a residual it is the gradient of x and of residual.
// The rounding of RMSNorm's normalized value passes gradients straight through.
struct NormBackwardArgs {
  bool rms = false;
  DType dtype = DType::f32;      // input, grad_sum, grad_in
  DType out_dtype = DType::f32;  // grad_out
  int64_t rows = 0, cols = 0;
  Mat grad_out;
  Mat input;     // s, the tensor that was normalized
  Mat grad_sum;  // optional
  const float* mean = nullptr;  // LayerNorm only
  const float* rstd = nullptr;
  const float* weight = nullptr;  // required
  void* grad_in = nullptr;
  float* grad_weight = nullptr;  // cols; optional
  float* grad_bias = nullptr;    // cols; optional, LayerNorm only
  int num_threads = 1;
};

// y = gelu(x + bias), erf GELU or its tanh approximation; bias (cols) is optional.
// Backward: grad_x = grad_out * gelu'(x + bias), grad_bias = column sums of grad_x.
struct BiasGeluArgs {
  DType dtype = DType::f32;
  bool tanh = false;
  int64_t rows = 0, cols = 0;
  Mat x;
  const float* bias = nullptr;
  Mat grad_out;               // backward only
  void* out = nullptr;        // forward: y; backward: grad_x
  float* grad_bias = nullptr; // backward, optional
  int num_threads = 1;
};

// y = silu(gate) * up. Backward writes grad_gate and grad_up.
struct SwigluArgs {
  DType dtype = DType::f32;
  int64_t rows = 0, cols = 0;
  Mat gate, up;
  Mat grad_out;  // backward only
  void* out = nullptr;  // forward
  void* grad_gate = nullptr;
  void* grad_up = nullptr;
  int num_threads = 1;
};

// Rotary position embedding, rotate-half layout (HF Llama / Qwen2 / Mistral): per row r (a token) and
// head h, with x1 | x2 the halves of x[r, h] and c1 | c2, s1 | s2 those of cos[r], sin[r]:
//   forward   out1 = x1 c1 - x2 s1,  out2 = x2 c2 + x1 s2
//   backward  out1 = x1 c1 + x2 s2,  out2 = x2 c2 - x1 s1   (x: the output's gradient; the transpose)
// in float32, rounded once to dtype. x's heads sit head_dim apart within a row (a column slice of a
// fused projection works in place); out is contiguous (rows, heads, head_dim); head_dim is even.
struct RotaryArgs {
  DType dtype = DType::f32;     // x, out
  DType cs_dtype = DType::f32;  // cos, sin
  bool backward = false;
  int64_t rows = 0, heads = 0, head_dim = 0;
  Mat x, cos, sin;  // x (rows, heads * head_dim); cos, sin (rows, head_dim)
  void* out = nullptr;
  int num_threads = 1;
};

// Dropout with a regenerated mask: out = in * (keep ? scale : 0) over numel contiguous
// elements, keep drawn from Philox4x32-10 keyed by (seed, offset) and the element's index
// only (csrc/norm/dropout_kernels.cpp), so the same call on the gradient is the backward.
// Kept with probability 1 - p (p >= 1: nothing is kept); scale is usually 1 / (1 - p).
struct DropoutArgs {
  DType dtype = DType::f32;
  int64_t numel = 0;
  double p = 0.0;
  float scale = 1.f;
  uint64_t seed = 0, offset = 0;
  const void* in = nullptr;
  void* out = nullptr;
  int num_threads = 1;
};

// AdamW (decoupled weight decay, no amsgrad) on float32 tensors: the update torch's fused CPU
// kernel (torch.optim.AdamW(fused=True)) makes, element for element and in the same float32
// operations. The constants are torch's, computed in double by the caller and rounded to float:
// per tensor decay = 1 - lr * weight_decay (1: none), neg_step_size = -lr / (1 - beta1^step),
// bc2_sqrt = sqrt(1 - beta2^step); shared lerp = 1 - beta1, beta2, one_minus_beta2, eps.
// grad_scale (0: none) divides the gradient first, as a GradScaler's scale does.

// One contiguous tensor: param, grad (null: all zeros; float32 or bf16, widened exactly as
// autocast's cast back would), exp_avg, exp_avg_sq, and an optional bf16 shadow that receives
// the updated values rounded to bf16 (the weight a bf16 autocast forward reads).
struct AdamWTensor {
  float* param = nullptr;
  const void* grad = nullptr;
  DType grad_dtype = DType::f32;  // f32 or bf16
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  void* shadow = nullptr;
  int64_t numel = 0;  // AdamWTensorsArgs only
  float decay = 1.f, neg_step_size = 0.f, bc2_sqrt = 1.f;
};
struct AdamWShared {
  float lerp = 0.1f, beta2 = 0.999f, one_minus_beta2 = 0.001f, eps = 1e-8f, grad_scale = 0.f;
  int num_threads = 1;
};

// The update on the listed rows of one (., cols) table only (llmcore/train/lazy_rows.py keeps
// the other rows exact).
struct AdamWRowsArgs {
  AdamWTensor table;
  const int64_t* rows = nullptr;
  int64_t n_rows = 0, cols = 0;
  AdamWShared shared;
};

// The update on whole tensors, many in one call (torch's multi-tensor fused AdamW): the work is
// cut into fixed-size chunks over all tensors, so small tensors share the threads.
struct AdamWTensorsArgs {
  const AdamWTensor* tensors = nullptr;
  int64_t n_tensors = 0;
  AdamWShared shared;
};

// The weight decay AdamW applies to a row whose gradient and moments are all zero, replayed
// late: row rows[i] of the float32 (., cols) table is multiplied by factors[s] for s from
// first[i] to end - 1, in order, each product rounded as the step's own would have been.
struct DecayRowsArgs {
  float* param = nullptr;
  const int64_t* rows = nullptr;
  const int64_t* first = nullptr;
  int64_t n_rows = 0, cols = 0;
  const float* factors = nullptr;
  int64_t end = 0;
  int num_threads = 1;
};

// The sum of the squares of every element of n_tensors contiguous float32 or bf16 arrays, in
// double (squares exact), the same for any thread count: *out.
struct SumSquaresArgs {
  int64_t n_tensors = 0;
  const void* const* data = nullptr;
  const int64_t* counts = nullptr;
  const DType* dtypes = nullptr;  // f32 or bf16
  double* out = nullptr;
  int num_threads = 1;
};

// Cross-entropy of a chunk of logits rows z (rows, cols = classes), for the chunked LM-head loss
// (llmcore/ops/cross_entropy.py). Per row r, with label y = labels[r] in [0, cols) and smoothing eps:
//   lse = log(sum_j exp(z_j)),  loss[r] = lse - (1 - eps) z_y - eps mean(z)
//     ( = -(1 - eps) log p_y - eps mean_j(log p_j), torch's label-smoothed cross-entropy);
// with coef (not null), the row is then overwritten with its gradient times coef[r]:
//   z_j := (exp(z_j - lse) - (1 - eps) [j == y] - eps / cols) coef[r]   (0 where coef[r] is 0).
// Arithmetic in float32 whatever the storage dtype; three passes over a row (max, sum of exp,
// gradient), the last two from cache.
struct CrossEntropyRowsArgs {
  DType dtype = DType::f32;
  int64_t rows = 0, cols = 0;
  void* logits = nullptr;
  int64_t stride = 0;  // elements between rows (>= cols)
  const int64_t* labels = nullptr;
  const float* coef = nullptr;  // rows, or null: no gradient
  float eps = 0.f;
  float* loss = nullptr;  // rows
  int num_threads = 1;
};

// The AVX-512 kernels have a twin built with AVX512-BF16's conversion instructions, used when
// the CPU has them; LLMCORE_DISABLE_AVX512_BF16=1 or set_bf16_instructions(false) turns it off.
bool bf16_instructions_available();
bool bf16_instructions_enabled();
void set_bf16_instructions(bool on);  // throws std::invalid_argument if unavailable

// Entry points; they run the kernels of the current ISA (common/cpu_features.h).
void norm_forward(const NormForwardArgs& a);
void norm_backward(const NormBackwardArgs& a);
void bias_gelu_forward(const BiasGeluArgs& a);
void bias_gelu_backward(const BiasGeluArgs& a);
void swiglu_forward(const SwigluArgs& a);
void swiglu_backward(const SwigluArgs& a);
void dropout_apply(const DropoutArgs& a);
void adamw_rows(const AdamWRowsArgs& a);
void adamw_tensors(const AdamWTensorsArgs& a);
void decay_rows(const DecayRowsArgs& a);
void sum_squares(const SumSquaresArgs& a);
void cross_entropy_rows(const CrossEntropyRowsArgs& a);
void rotary(const RotaryArgs& a);

}  // namespace llmcore::norm
