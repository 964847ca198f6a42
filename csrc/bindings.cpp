// The module's entry point; with tokenizer_bindings.cpp the only files that include pybind11.
// Every long-running call releases the GIL.
#include <cstdint>
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "attention/attention.h"
#include "attention/cpu/philox.h"
#include "common/cpu_features.h"
#include "common/scratch.h"
#ifdef LLMCORE_WITH_CUDA
#include "cuda/probe.h"
#endif

namespace py = pybind11;
namespace at = llmcore::attention;

void bind_tokenizer(py::module_& m);  // tokenizer_bindings.cpp
void bind_norm(py::module_& m);       // norm_bindings.cpp

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

void check_ref(const at::TensorRef& t, const char* name) {
  require(t.data != nullptr, std::string(name) + ": null data pointer");
}

// Defensive checks of what the Python layer already validated: a wrong call from Python
// must raise, never read out of bounds.
void check_problem(const at::Problem& p) {
  require(p.batch >= 0, "batch must be >= 0");
  require(p.heads_q > 0 && p.heads_kv > 0, "head counts must be positive");
  require(p.heads_q % p.heads_kv == 0, "heads_q must be a multiple of heads_kv");
  require(p.len_q >= 0 && p.len_k >= 0, "sequence lengths must be >= 0");
  require(p.head_dim > 0 && p.head_dim_v > 0, "head dims must be positive");
  require(p.dropout_p >= 0.f && p.dropout_p <= 1.f, "dropout_p must be in [0, 1]");
  require((p.cu_seqlens_q == nullptr) == (p.cu_seqlens_k == nullptr), "give both cu_seqlens or neither");
  require(p.cu_seqlens_q == nullptr || p.mask_kind == at::MaskKind::none, "varlen takes no attention mask");
  require(p.mask_kind == at::MaskKind::none || p.mask != nullptr, "mask kind set without a mask pointer");
  if (p.cu_seqlens_q) {
    struct Cu {
      const char* name;
      const int32_t* cu;
      int64_t total, max_len;
    };
    for (const Cu& c : {Cu{"cu_seqlens_q", p.cu_seqlens_q, p.total_q, p.len_q},
                        Cu{"cu_seqlens_k", p.cu_seqlens_k, p.total_k, p.len_k}}) {
      const std::string name = c.name;
      require(c.cu[0] == 0, name + " must start at 0, got " + std::to_string(c.cu[0]));
      for (int64_t b = 0; b < p.batch; ++b) {
        const int64_t len = int64_t(c.cu[b + 1]) - c.cu[b];
        require(len >= 0, name + " must be non-decreasing, but entry " + std::to_string(b + 1) + " (" +
                              std::to_string(c.cu[b + 1]) + ") < entry " + std::to_string(b) + " (" +
                              std::to_string(c.cu[b]) + ")");
        require(len <= c.max_len, "a sequence of " + std::to_string(len) + " tokens is longer than max_seqlen=" +
                                      std::to_string(c.max_len) + " (" + name + ")");
      }
      require(c.cu[p.batch] == c.total, name + "[-1] = " + std::to_string(c.cu[p.batch]) +
                                            " but the packed tensor has " + std::to_string(c.total) + " rows");
    }
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llmcore native kernels (CPU attention; optional CUDA). Not linked against libtorch.";
  m.attr("__version__") = LLMCORE_VERSION;

  py::enum_<at::DType>(m, "DType").value("f32", at::DType::f32).value("bf16", at::DType::bf16).value("f16", at::DType::f16);
  py::enum_<at::MaskKind>(m, "MaskKind")
      .value("none", at::MaskKind::none)
      .value("boolean", at::MaskKind::boolean)
      .value("additive", at::MaskKind::additive);

  py::class_<at::TensorRef>(m, "TensorRef", "A (batch, head, seq, dim) view: data pointer and element strides; dim is contiguous.")
      .def(py::init([](uintptr_t data, int64_t batch_stride, int64_t head_stride, int64_t seq_stride) {
             return at::TensorRef{ptr<void>(data), batch_stride, head_stride, seq_stride};
           }),
           py::arg("data"), py::arg("batch_stride"), py::arg("head_stride"), py::arg("seq_stride"));

  py::class_<at::Problem>(m, "AttentionProblem", "Sizes and options of one attention call (csrc/attention/attention.h).")
      // The sizes in one call: a Python caller sets a dozen fields on every attention call, and
      // each attribute write is a pybind call of its own.
      .def(py::init([](at::DType dtype, int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t len_q, int64_t len_k,
                       int64_t head_dim, int64_t head_dim_v, float scale, bool causal, bool causal_bottom_right,
                       int num_threads) {
             at::Problem p;
             p.dtype = dtype;
             p.batch = batch;
             p.heads_q = heads_q;
             p.heads_kv = heads_kv;
             p.len_q = len_q;
             p.len_k = len_k;
             p.head_dim = head_dim;
             p.head_dim_v = head_dim_v;
             p.scale = scale;
             p.causal = causal;
             p.causal_bottom_right = causal_bottom_right;
             p.num_threads = num_threads;
             return p;
           }),
           py::arg("dtype"), py::arg("batch"), py::arg("heads_q"), py::arg("heads_kv"), py::arg("len_q"),
           py::arg("len_k"), py::arg("head_dim"), py::arg("head_dim_v"), py::arg("scale"), py::arg("causal"),
           py::arg("causal_bottom_right"), py::arg("num_threads"))
      .def(py::init<>())
      .def_readwrite("dtype", &at::Problem::dtype)
      .def_readwrite("batch", &at::Problem::batch)
      .def_readwrite("heads_q", &at::Problem::heads_q)
      .def_readwrite("heads_kv", &at::Problem::heads_kv)
      .def_readwrite("len_q", &at::Problem::len_q)
      .def_readwrite("len_k", &at::Problem::len_k)
      .def_readwrite("head_dim", &at::Problem::head_dim)
      .def_readwrite("head_dim_v", &at::Problem::head_dim_v)
      .def_readwrite("total_q", &at::Problem::total_q)
      .def_readwrite("total_k", &at::Problem::total_k)
      .def_readwrite("scale", &at::Problem::scale)
      .def_readwrite("causal", &at::Problem::causal)
      .def_readwrite("causal_bottom_right", &at::Problem::causal_bottom_right)
      .def_readwrite("mask_kind", &at::Problem::mask_kind)
      .def_readwrite("dropout_p", &at::Problem::dropout_p)
      .def_readwrite("seed", &at::Problem::seed)
      .def_readwrite("offset", &at::Problem::offset)
      .def_readwrite("num_threads", &at::Problem::num_threads)
      .def("set_mask", [](at::Problem& p, uintptr_t data, std::array<int64_t, 4> strides) {
        p.mask = ptr<const void>(data);
        for (int i = 0; i < 4; ++i) p.mask_strides[i] = strides[i];
      }, py::arg("data"), py::arg("strides"))
      .def("set_cu_seqlens", [](at::Problem& p, uintptr_t cu_q, uintptr_t cu_k) {
        p.cu_seqlens_q = ptr<const int32_t>(cu_q);
        p.cu_seqlens_k = ptr<const int32_t>(cu_k);
      }, py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"));

  m.def("attention_forward",
        [](const at::Problem& p, const at::TensorRef& q, const at::TensorRef& k, const at::TensorRef& v,
           const at::TensorRef& o, uintptr_t lse) {
          check_problem(p);
          check_ref(q, "q"); check_ref(k, "k"); check_ref(v, "v"); check_ref(o, "out");
          require(lse != 0, "lse: null data pointer");
          py::gil_scoped_release release;
          at::forward(at::ForwardArgs{p, q, k, v, o, ptr<float>(lse)});
        },
        py::arg("problem"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        "Attention forward: writes out and the float32 logsumexp (see attention.h for layouts).");

  m.def("attention_backward",
        [](const at::Problem& p, const at::TensorRef& q, const at::TensorRef& k, const at::TensorRef& v,
           const at::TensorRef& o, const at::TensorRef& dout, const at::TensorRef& dq, const at::TensorRef& dk,
           const at::TensorRef& dv, uintptr_t lse) {
          check_problem(p);
          check_ref(q, "q"); check_ref(k, "k"); check_ref(v, "v"); check_ref(o, "out"); check_ref(dout, "grad_out");
          check_ref(dq, "dq"); check_ref(dk, "dk"); check_ref(dv, "dv");
          require(lse != 0, "lse: null data pointer");
          py::gil_scoped_release release;
          at::backward(at::BackwardArgs{p, q, k, v, o, dout, dq, dk, dv, ptr<const float>(lse)});
        },
        py::arg("problem"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("grad_out"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("lse"),
        "Attention backward from the saved logsumexp; dk and dv are written in full (GQA heads summed).");

  m.def("dropout_keep_mask",
        [](uint64_t seed, uint64_t offset, float p, int64_t row0, int64_t rows, int64_t cols, uintptr_t out) {
          require(out != 0 && rows >= 0 && cols >= 0, "dropout_keep_mask: bad arguments");
          py::gil_scoped_release release;
          at::dropout_keep_mask(seed, offset, p, row0, rows, cols, ptr<uint8_t>(out));
        },
        py::arg("seed"), py::arg("offset"), py::arg("p"), py::arg("row0"), py::arg("rows"), py::arg("cols"),
        py::arg("out"), "The uint8 keep-mask (rows x cols) the kernels draw for flat lse rows [row0, row0 + rows).");

  m.def("dropout_keep_block",
        [](uint64_t seed, uint64_t offset, float p, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
           bool transposed, uintptr_t out) {
          require(out != 0 && rows >= 0 && cols >= 0 && col0 >= 0 && col0 % 4 == 0,
                  "dropout_keep_block: bad arguments (col0 must be a non-negative multiple of 4)");
          py::gil_scoped_release release;
          at::dropout_keep_block(seed, offset, p, row0, rows, col0, cols, transposed, ptr<uint8_t>(out));
        },
        py::arg("seed"), py::arg("offset"), py::arg("p"), py::arg("row0"), py::arg("rows"), py::arg("col0"),
        py::arg("cols"), py::arg("transposed"), py::arg("out"),
        "dropout_keep_mask's draws for key columns [col0, col0 + cols) as the current ISA's kernels make them: "
        "(rows x cols), or (cols x rows) when transposed.");

  m.def("philox4x32_10", [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
    const at::Philox4 r = at::philox4x32_10(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1]);
    return std::array<uint32_t, 4>{r.v[0], r.v[1], r.v[2], r.v[3]};
  }, py::arg("counter"), py::arg("key"), "Philox4x32-10, for checking against the published test vectors.");

  m.def("cpu_isa", [] { return std::string(llmcore::isa_name(llmcore::current_isa())); },
        "The ISA whose kernels run now: avx512, avx2 or portable.");
  m.def("best_cpu_isa", [] { return std::string(llmcore::isa_name(llmcore::best_isa())); });
  m.def("set_cpu_isa", &llmcore::set_isa, py::arg("name"), "Force the kernels of one ISA (tests, benchmarks).");
  m.def("compiled_isas", [] {
    std::vector<std::string> out;
    for (auto isa : {llmcore::Isa::avx512, llmcore::Isa::avx2, llmcore::Isa::portable})
      if (llmcore::isa_compiled(isa)) out.emplace_back(llmcore::isa_name(isa));
    return out;
  });
  m.def("cpu_features", [] {
    const auto& f = llmcore::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw; d["avx512vl"] = f.avx512vl; d["avx512dq"] = f.avx512dq;
    d["avx512_bf16"] = f.avx512_bf16; d["amx_tile"] = f.amx_tile; d["amx_bf16"] = f.amx_bf16;
    return d;
  });
  m.def("amx_available", &llmcore::amx_available, "AMX bf16 kernels compiled, supported by the CPU and allowed by the OS.");
  m.def("amx_enabled", &llmcore::amx_enabled, "Whether bf16 attention runs on AMX now.");
  m.def("set_amx", &llmcore::set_amx, py::arg("on"), "Switch the AMX bf16 kernels off or on (tests, benchmarks).");
  m.def("bf16_dot_available", &llmcore::bf16_dot_available,
        "bf16 attention kernels on AVX512-BF16 dot products compiled and supported by the CPU.");
  m.def("bf16_dot_enabled", &llmcore::bf16_dot_enabled,
        "Whether bf16 attention runs on AVX512-BF16 dot products now (no AMX in use).");
  m.def("set_bf16_dot", &llmcore::set_bf16_dot, py::arg("on"),
        "Switch the AVX512-BF16 bf16 attention kernels off or on (tests, benchmarks).");
  m.def("release_workspace", &llmcore::release_workspace,
        "Free the calling thread's kernel workspace (it is kept between calls and regrows on the next).");
  m.def("num_threads", [] { return omp_get_max_threads(); }, "OpenMP threads the kernels use by default.");
  m.def("set_num_threads", [](int n) {
    require(n > 0, "num_threads must be positive");
    omp_set_num_threads(n);
  }, py::arg("n"));

  bind_tokenizer(m);
  bind_norm(m);

#ifdef LLMCORE_WITH_CUDA
  m.attr("cuda_built") = true;
  { void bind_attention_cuda(py::module_&); bind_attention_cuda(m); }  // attention_cuda_bindings.cpp
  m.def("cuda_device_count", &llmcore::cuda::device_count);
  m.def("cuda_runtime_version", &llmcore::cuda::runtime_version);
  m.def("cuda_selftest", [](int n) {
    require(n > 0, "n must be positive");
    py::gil_scoped_release release;
    return llmcore::cuda::selftest(n);
  }, py::arg("n") = 1024);
#else
  m.attr("cuda_built") = false;
  m.def("cuda_device_count", [] { return 0; });
#endif
}
