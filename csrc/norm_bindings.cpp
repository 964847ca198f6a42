// Python bindings of the norm and activation kernels (csrc/norm/norm.h). Arguments are data
// pointers, sizes and row strides in elements; dtype codes are 0 = float32, 1 = bfloat16,
// 2 = float16. Every call releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "norm/norm.h"

namespace py = pybind11;
namespace nm = llmcore::norm;

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

nm::DType dtype_of(int code, const char* name) {
  require(code >= 0 && code <= 2, std::string(name) + ": unknown dtype code " + std::to_string(code) +
                                      " (0 float32, 1 bfloat16, 2 float16)");
  return nm::DType(code);
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

nm::Mat mat(uintptr_t p, int64_t stride) { return nm::Mat{ptr<const void>(p), stride}; }

void check_sizes(int64_t rows, int64_t cols) {
  require(rows >= 0, "rows must be >= 0, got " + std::to_string(rows));
  require(cols > 0, "cols must be > 0, got " + std::to_string(cols));
}

void check_ptr(uintptr_t p, const char* name) { require(p != 0, std::string(name) + ": null data pointer"); }

// One AdamW operand set; the pointers of a tensor with elements are checked (grad and shadow
// may be 0: zeros, none).
nm::AdamWTensor adamw_tensor(uintptr_t param, uintptr_t grad, int grad_dtype, uintptr_t exp_avg, uintptr_t exp_avg_sq,
                             uintptr_t shadow, int64_t numel, float decay, float neg_step_size, float bc2_sqrt) {
  require(numel >= 0, "numel must be >= 0, got " + std::to_string(numel));
  if (numel) {
    check_ptr(param, "param"); check_ptr(exp_avg, "exp_avg"); check_ptr(exp_avg_sq, "exp_avg_sq");
  }
  nm::AdamWTensor t;
  t.param = ptr<float>(param);
  t.grad = ptr<const void>(grad);
  t.grad_dtype = dtype_of(grad_dtype, "grad_dtype");
  require(t.grad_dtype != nm::DType::f16, "grad_dtype: float32 or bfloat16 gradients only");
  t.exp_avg = ptr<float>(exp_avg);
  t.exp_avg_sq = ptr<float>(exp_avg_sq);
  t.shadow = ptr<void>(shadow);
  t.numel = numel;
  t.decay = decay; t.neg_step_size = neg_step_size; t.bc2_sqrt = bc2_sqrt;
  return t;
}

nm::AdamWShared adamw_shared(float lerp, float beta2, float one_minus_beta2, float eps, float grad_scale,
                             int num_threads) {
  nm::AdamWShared sh;
  sh.lerp = lerp; sh.beta2 = beta2; sh.one_minus_beta2 = one_minus_beta2; sh.eps = eps; sh.grad_scale = grad_scale;
  sh.num_threads = num_threads;
  return sh;
}

}  // namespace

void bind_norm(py::module_& m) {
  m.def("norm_bf16_instructions", &nm::bf16_instructions_enabled,
        "Whether the AVX-512 norm/activation kernels use AVX512-BF16 conversions now.");
  m.def("set_norm_bf16_instructions", &nm::set_bf16_instructions, py::arg("on"),
        "Switch the AVX512-BF16 twins of the norm/activation kernels off or on (tests, benchmarks).");
  m.def("norm_bf16_instructions_available", &nm::bf16_instructions_available);

  m.def("norm_forward",
        [](bool rms, int dtype, int out_dtype, int64_t rows, int64_t cols, float eps, uintptr_t x, int64_t x_stride,
           uintptr_t residual, int64_t residual_stride, uintptr_t weight, uintptr_t bias, uintptr_t y,
           uintptr_t sum_out, uintptr_t mean, uintptr_t rstd, int num_threads) {
          check_sizes(rows, cols);
          check_ptr(x, "x"); check_ptr(weight, "weight"); check_ptr(y, "out"); check_ptr(rstd, "rstd");
          if (!rms) { check_ptr(bias, "bias"); check_ptr(mean, "mean"); }
          if (residual) check_ptr(sum_out, "sum_out");
          nm::NormForwardArgs a;
          a.rms = rms;
          a.dtype = dtype_of(dtype, "dtype");
          a.out_dtype = dtype_of(out_dtype, "out_dtype");
          a.rows = rows; a.cols = cols; a.eps = eps;
          a.x = mat(x, x_stride);
          a.residual = mat(residual, residual_stride);
          a.weight = ptr<const float>(weight);
          a.bias = ptr<const float>(bias);
          a.y = ptr<void>(y);
          a.sum_out = ptr<void>(sum_out);
          a.mean = ptr<float>(mean);
          a.rstd = ptr<float>(rstd);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          nm::norm_forward(a);
        },
        py::arg("rms"), py::arg("dtype"), py::arg("out_dtype"), py::arg("rows"), py::arg("cols"), py::arg("eps"),
        py::arg("x"), py::arg("x_stride"), py::arg("residual"), py::arg("residual_stride"), py::arg("weight"),
        py::arg("bias"), py::arg("out"), py::arg("sum_out"), py::arg("mean"), py::arg("rstd"),
        py::arg("num_threads"),
        "LayerNorm (rms=False) or RMSNorm over rows of cols elements, with an optional fused residual add "
        "(residual = 0: none). weight and bias are float32; mean and rstd (float32, one per row) are saved.");

  m.def("norm_backward",
        [](bool rms, int dtype, int out_dtype, int64_t rows, int64_t cols, uintptr_t grad_out,
           int64_t grad_out_stride, uintptr_t input, int64_t input_stride, uintptr_t grad_sum,
           int64_t grad_sum_stride, uintptr_t mean, uintptr_t rstd, uintptr_t weight, uintptr_t grad_in,
           uintptr_t grad_weight, uintptr_t grad_bias, int num_threads) {
          check_sizes(rows, cols);
          check_ptr(grad_out, "grad_out"); check_ptr(input, "input"); check_ptr(rstd, "rstd");
          check_ptr(weight, "weight"); check_ptr(grad_in, "grad_in");
          if (!rms) check_ptr(mean, "mean");
          require(!(rms && grad_bias), "RMSNorm has no bias gradient");
          nm::NormBackwardArgs a;
          a.rms = rms;
          a.dtype = dtype_of(dtype, "dtype");
          a.out_dtype = dtype_of(out_dtype, "out_dtype");
          a.rows = rows; a.cols = cols;
          a.grad_out = mat(grad_out, grad_out_stride);
          a.input = mat(input, input_stride);
          a.grad_sum = mat(grad_sum, grad_sum_stride);
          a.mean = ptr<const float>(mean);
          a.rstd = ptr<const float>(rstd);
          a.weight = ptr<const float>(weight);
          a.grad_in = ptr<void>(grad_in);
          a.grad_weight = ptr<float>(grad_weight);
          a.grad_bias = ptr<float>(grad_bias);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          nm::norm_backward(a);
        },
        py::arg("rms"), py::arg("dtype"), py::arg("out_dtype"), py::arg("rows"), py::arg("cols"),
        py::arg("grad_out"), py::arg("grad_out_stride"), py::arg("input"), py::arg("input_stride"),
        py::arg("grad_sum"), py::arg("grad_sum_stride"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
        py::arg("grad_in"), py::arg("grad_weight"), py::arg("grad_bias"), py::arg("num_threads"),
        "Gradients of norm_forward: grad_in (+ grad_sum, 0: none) and the float32 column sums grad_weight and "
        "grad_bias (0: not wanted).");

  m.def("bias_gelu_forward",
        [](int dtype, bool tanh, int64_t rows, int64_t cols, uintptr_t x, int64_t x_stride, uintptr_t bias,
           uintptr_t out, int num_threads) {
          check_sizes(rows, cols);
          check_ptr(x, "x"); check_ptr(out, "out");
          nm::BiasGeluArgs a;
          a.dtype = dtype_of(dtype, "dtype");
          a.tanh = tanh;
          a.rows = rows; a.cols = cols;
          a.x = mat(x, x_stride);
          a.bias = ptr<const float>(bias);
          a.out = ptr<void>(out);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          nm::bias_gelu_forward(a);
        },
        py::arg("dtype"), py::arg("tanh"), py::arg("rows"), py::arg("cols"), py::arg("x"), py::arg("x_stride"),
        py::arg("bias"), py::arg("out"), py::arg("num_threads"),
        "gelu(x + bias) (erf form, or tanh with tanh=True); bias is float32 or 0.");

  m.def("bias_gelu_backward",
        [](int dtype, bool tanh, int64_t rows, int64_t cols, uintptr_t grad_out, int64_t grad_out_stride,
           uintptr_t x, int64_t x_stride, uintptr_t bias, uintptr_t grad_x, uintptr_t grad_bias, int num_threads) {
          check_sizes(rows, cols);
          check_ptr(grad_out, "grad_out"); check_ptr(x, "x"); check_ptr(grad_x, "grad_x");
          nm::BiasGeluArgs a;
          a.dtype = dtype_of(dtype, "dtype");
          a.tanh = tanh;
          a.rows = rows; a.cols = cols;
          a.x = mat(x, x_stride);
          a.bias = ptr<const float>(bias);
          a.grad_out = mat(grad_out, grad_out_stride);
          a.out = ptr<void>(grad_x);
          a.grad_bias = ptr<float>(grad_bias);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          nm::bias_gelu_backward(a);
        },
        py::arg("dtype"), py::arg("tanh"), py::arg("rows"), py::arg("cols"), py::arg("grad_out"),
        py::arg("grad_out_stride"), py::arg("x"), py::arg("x_stride"), py::arg("bias"), py::arg("grad_x"),
        py::arg("grad_bias"), py::arg("num_threads"),
        "Gradients of bias_gelu_forward; grad_bias (float32, 0: not wanted) sums grad_x over rows.");

  m.def("swiglu_forward",
        [](int dtype, int64_t rows, int64_t cols, uintptr_t gate, int64_t gate_stride, uintptr_t up,
           int64_t up_stride, uintptr_t out, int num_threads) {
          check_sizes(rows, cols);
          check_ptr(gate, "gate"); check_ptr(up, "up"); check_ptr(out, "out");
          nm::SwigluArgs a;
          a.dtype = dtype_of(dtype, "dtype");
          a.rows = rows; a.cols = cols;
          a.gate = mat(gate, gate_stride);
          a.up = mat(up, up_stride);
          a.out = ptr<void>(out);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          nm::swiglu_forward(a);
        },
        py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("gate"), py::arg("gate_stride"), py::arg("up"),
        py::arg("up_stride"), py::arg("out"), py::arg("num_threads"), "silu(gate) * up.");

  m.def("rotary",
        [](int dtype, int cs_dtype, bool backward, int64_t rows, int64_t heads, int64_t head_dim, uintptr_t x,
           int64_t x_stride, uintptr_t cos, int64_t cos_stride, uintptr_t sin, int64_t sin_stride, uintptr_t out,
           int num_threads) {
          check_sizes(rows, heads * head_dim);
          require(heads >= 1 && head_dim >= 2 && head_dim % 2 == 0,
                  "rotary: heads must be >= 1 and head_dim even, got " + std::to_string(heads) + " and " +
                      std::to_string(head_dim));
          check_ptr(x, "x"); check_ptr(cos, "cos"); check_ptr(sin, "sin"); check_ptr(out, "out");
          nm::RotaryArgs a;
          a.dtype = dtype_of(dtype, "dtype");
          a.cs_dtype = dtype_of(cs_dtype, "cs_dtype");
          a.backward = backward;
          a.rows = rows; a.heads = heads; a.head_dim = head_dim;
          a.x = mat(x, x_stride);
          a.cos = mat(cos, cos_stride);
          a.sin = mat(sin, sin_stride);
          a.out = ptr<void>(out);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          nm::rotary(a);
        },
        py::arg("dtype"), py::arg("cs_dtype"), py::arg("backward"), py::arg("rows"), py::arg("heads"),
        py::arg("head_dim"), py::arg("x"), py::arg("x_stride"), py::arg("cos"), py::arg("cos_stride"), py::arg("sin"),
        py::arg("sin_stride"), py::arg("out"), py::arg("num_threads"),
        "Rotary position embedding (rotate-half) of x (rows, heads * head_dim) by cos / sin (rows, head_dim) into "
        "out; backward=True applies the transpose (the gradient).");

  m.def("swiglu_backward",
        [](int dtype, int64_t rows, int64_t cols, uintptr_t grad_out, int64_t grad_out_stride, uintptr_t gate,
           int64_t gate_stride, uintptr_t up, int64_t up_stride, uintptr_t grad_gate, uintptr_t grad_up,
           int num_threads) {
          check_sizes(rows, cols);
          check_ptr(grad_out, "grad_out"); check_ptr(gate, "gate"); check_ptr(up, "up");
          check_ptr(grad_gate, "grad_gate"); check_ptr(grad_up, "grad_up");
          nm::SwigluArgs a;
          a.dtype = dtype_of(dtype, "dtype");
          a.rows = rows; a.cols = cols;
          a.grad_out = mat(grad_out, grad_out_stride);
          a.gate = mat(gate, gate_stride);
          a.up = mat(up, up_stride);
          a.grad_gate = ptr<void>(grad_gate);
          a.grad_up = ptr<void>(grad_up);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          nm::swiglu_backward(a);
        },
        py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("grad_out"), py::arg("grad_out_stride"),
        py::arg("gate"), py::arg("gate_stride"), py::arg("up"), py::arg("up_stride"), py::arg("grad_gate"),
        py::arg("grad_up"), py::arg("num_threads"), "Gradients of swiglu_forward.");

  m.def("dropout_apply",
        [](int dtype, int64_t numel, double p, float scale, uint64_t seed, uint64_t offset, uintptr_t in,
           uintptr_t out, int num_threads) {
          require(numel >= 0, "numel must be >= 0, got " + std::to_string(numel));
          require(p >= 0.0 && p <= 1.0, "p must be in [0, 1], got " + std::to_string(p));
          if (numel == 0) return;
          check_ptr(in, "in"); check_ptr(out, "out");
          nm::DropoutArgs a;
          a.dtype = dtype_of(dtype, "dtype");
          a.numel = numel; a.p = p; a.scale = scale;
          a.seed = seed; a.offset = offset;
          a.in = ptr<const void>(in);
          a.out = ptr<void>(out);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          nm::dropout_apply(a);
        },
        py::arg("dtype"), py::arg("numel"), py::arg("p"), py::arg("scale"), py::arg("seed"), py::arg("offset"),
        py::arg("in"), py::arg("out"), py::arg("num_threads"),
        "out = in * (keep ? scale : 0) over numel contiguous elements; keep (probability 1 - p) comes from "
        "Philox4x32-10 keyed by (seed, offset) and the element index, so the same call on the gradient is the "
        "backward.");

  m.def("adamw_rows",
        [](uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t rows, int64_t n_rows,
           int64_t cols, float decay, float lerp, float beta2, float one_minus_beta2, float neg_step_size,
           float bc2_sqrt, float eps, float grad_scale, int num_threads, int grad_dtype, uintptr_t shadow) {
          require(n_rows >= 0, "n_rows must be >= 0, got " + std::to_string(n_rows));
          require(cols > 0, "cols must be > 0, got " + std::to_string(cols));
          if (n_rows == 0) return;
          check_ptr(rows, "rows");
          nm::AdamWRowsArgs a;
          // numel: the elements the rows cover (the kernel reads rows and cols, not this)
          a.table = adamw_tensor(param, grad, grad_dtype, exp_avg, exp_avg_sq, shadow, n_rows * cols, decay,
                                 neg_step_size, bc2_sqrt);
          a.rows = ptr<const int64_t>(rows);
          a.n_rows = n_rows; a.cols = cols;
          a.shared = adamw_shared(lerp, beta2, one_minus_beta2, eps, grad_scale, num_threads);
          py::gil_scoped_release release;
          nm::adamw_rows(a);
        },
        py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("rows"),
        py::arg("n_rows"), py::arg("cols"), py::arg("decay"), py::arg("lerp"), py::arg("beta2"),
        py::arg("one_minus_beta2"), py::arg("neg_step_size"), py::arg("bc2_sqrt"), py::arg("eps"),
        py::arg("grad_scale"), py::arg("num_threads"), py::arg("grad_dtype") = 0, py::arg("shadow") = 0,
        "AdamW (torch's fused CPU update) on the listed int64 rows of contiguous float32 (., cols) tables; "
        "grad 0: zero gradients, grad_dtype 0 float32 or 1 bfloat16; grad_scale 0: none; shadow (0: none): a "
        "bfloat16 table that receives the updated rows rounded to bfloat16. The caller checks the row indices.");

  m.def("decay_rows",
        [](uintptr_t param, uintptr_t rows, uintptr_t first, int64_t n_rows, int64_t cols, uintptr_t factors,
           int64_t end, int num_threads) {
          require(n_rows >= 0, "n_rows must be >= 0, got " + std::to_string(n_rows));
          require(cols > 0, "cols must be > 0, got " + std::to_string(cols));
          if (n_rows == 0) return;
          check_ptr(param, "param"); check_ptr(rows, "rows"); check_ptr(first, "first");
          check_ptr(factors, "factors");
          nm::DecayRowsArgs a;
          a.param = ptr<float>(param);
          a.rows = ptr<const int64_t>(rows);
          a.first = ptr<const int64_t>(first);
          a.n_rows = n_rows; a.cols = cols;
          a.factors = ptr<const float>(factors);
          a.end = end;
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          nm::decay_rows(a);
        },
        py::arg("param"), py::arg("rows"), py::arg("first"), py::arg("n_rows"), py::arg("cols"), py::arg("factors"),
        py::arg("end"), py::arg("num_threads"),
        "Multiply row rows[i] of a contiguous float32 (., cols) table by factors[s] for s in [first[i], end), in "
        "order. The caller checks the indices.");

  m.def("cross_entropy_rows",
        [](int dtype, int64_t rows, int64_t cols, uintptr_t logits, int64_t stride, uintptr_t labels, uintptr_t coef,
           float eps, uintptr_t loss, int num_threads) {
          require(rows >= 0, "rows must be >= 0, got " + std::to_string(rows));
          require(cols > 0, "cols must be > 0, got " + std::to_string(cols));
          require(stride >= cols, "stride must be >= cols");
          require(eps >= 0.f && eps <= 1.f, "eps must be in [0, 1], got " + std::to_string(eps));
          if (rows == 0) return;
          check_ptr(logits, "logits"); check_ptr(labels, "labels"); check_ptr(loss, "loss");
          nm::CrossEntropyRowsArgs a;
          a.dtype = dtype_of(dtype, "dtype");
          a.rows = rows; a.cols = cols;
          a.logits = ptr<void>(logits);
          a.stride = stride;
          a.labels = ptr<const int64_t>(labels);
          a.coef = coef ? ptr<const float>(coef) : nullptr;
          a.eps = eps;
          a.loss = ptr<float>(loss);
          a.num_threads = num_threads;
          py::gil_scoped_release release;
          nm::cross_entropy_rows(a);
        },
        py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("logits"), py::arg("stride"), py::arg("labels"),
        py::arg("coef"), py::arg("eps"), py::arg("loss"), py::arg("num_threads"),
        "Cross-entropy of logits rows (labels int64 in [0, cols)): loss[r] (float32) = lse - (1 - eps) z_y - eps "
        "mean(z); with coef (float32 per row; 0: none) each row becomes its gradient times coef, in place.");

  m.def("sum_squares",
        [](const std::vector<uintptr_t>& data, const std::vector<int64_t>& counts, const std::vector<int>& dtypes,
           int num_threads) {
          require(data.size() == counts.size() && data.size() == dtypes.size(),
                  "data, counts and dtypes must have one entry per tensor");
          std::vector<const void*> ptrs(data.size());
          std::vector<nm::DType> kinds(data.size());
          for (size_t i = 0; i < data.size(); ++i) {
            require(counts[i] >= 0, "counts must be >= 0, got " + std::to_string(counts[i]));
            if (counts[i]) check_ptr(data[i], "data");
            kinds[i] = dtype_of(dtypes[i], "dtypes");
            require(kinds[i] != nm::DType::f16, "dtypes: float32 or bfloat16 only");
            ptrs[i] = ptr<const void>(data[i]);
          }
          double out = 0.0;
          nm::SumSquaresArgs a;
          a.n_tensors = int64_t(data.size());
          a.data = ptrs.data();
          a.counts = counts.data();
          a.dtypes = kinds.data();
          a.out = &out;
          a.num_threads = num_threads;
          {
            py::gil_scoped_release release;
            nm::sum_squares(a);
          }
          return out;
        },
        py::arg("data"), py::arg("counts"), py::arg("dtypes"), py::arg("num_threads"),
        "Sum of the squares of every element of contiguous float32 (0) / bfloat16 (1) arrays, in double; "
        "the same result for any thread count.");

  m.def("adamw_tensors",
        [](const std::vector<uintptr_t>& params, const std::vector<uintptr_t>& grads,
           const std::vector<int>& grad_dtypes, const std::vector<uintptr_t>& exp_avgs,
           const std::vector<uintptr_t>& exp_avg_sqs,
           const std::vector<uintptr_t>& shadows, const std::vector<int64_t>& numels, const std::vector<float>& decays,
           const std::vector<float>& neg_step_sizes, const std::vector<float>& bc2_sqrts, float lerp, float beta2,
           float one_minus_beta2, float eps, float grad_scale, int num_threads) {
          const size_t n = params.size();
          require(grads.size() == n && grad_dtypes.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                      shadows.size() == n && numels.size() == n && decays.size() == n && neg_step_sizes.size() == n &&
                      bc2_sqrts.size() == n,
                  "adamw_tensors: every per-tensor list needs one entry per tensor");
          std::vector<nm::AdamWTensor> ts(n);
          for (size_t i = 0; i < n; ++i)
            ts[i] = adamw_tensor(params[i], grads[i], grad_dtypes[i], exp_avgs[i], exp_avg_sqs[i], shadows[i],
                                 numels[i], decays[i], neg_step_sizes[i], bc2_sqrts[i]);
          nm::AdamWTensorsArgs a;
          a.tensors = ts.data();
          a.n_tensors = int64_t(n);
          a.shared = adamw_shared(lerp, beta2, one_minus_beta2, eps, grad_scale, num_threads);
          py::gil_scoped_release release;
          nm::adamw_tensors(a);
        },
        py::arg("params"), py::arg("grads"), py::arg("grad_dtypes"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("shadows"), py::arg("numels"), py::arg("decays"), py::arg("neg_step_sizes"), py::arg("bc2_sqrts"),
        py::arg("lerp"), py::arg("beta2"), py::arg("one_minus_beta2"), py::arg("eps"), py::arg("grad_scale"),
        py::arg("num_threads"),
        "adamw_rows' update on whole contiguous float32 tensors, many in one call; per tensor its decay, "
        "neg_step_size, bc2_sqrt, gradient dtype (0 float32, 1 bfloat16; pointer 0: zeros) and bf16 shadow "
        "(0: none).");
}
