// Python bindings of the CUDA attention kernels (built only with LLMCORE_WITH_CUDA). Tensors
// arrive as device pointers and element strides, the stream as torch's cudaStream_t handle
// (torch.cuda.current_stream().cuda_stream): the module still never sees a torch tensor.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "attention/attention.h"
#include "attention/cuda/flash.h"

namespace py = pybind11;
namespace at = llmcore::attention;

void bind_attention_cuda(py::module_& m) {
  m.def("cuda_attention_forward",
        [](const at::Problem& p, const at::TensorRef& q, const at::TensorRef& k, const at::TensorRef& v,
           const at::TensorRef& o, uintptr_t lse, uintptr_t stream) {
          py::gil_scoped_release release;
          at::cuda::forward(at::ForwardArgs{p, q, k, v, o, reinterpret_cast<float*>(lse)}, stream);
        },
        py::arg("problem"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("stream"),
        "Queues the CUDA attention forward on `stream`: writes out and the float32 base-2 logsumexp "
        "(layouts as attention_forward). bf16/fp16, head dims multiples of 8 up to 256, no mask, no dropout.");

  m.def("cuda_attention_backward",
        [](const at::Problem& p, const at::TensorRef& q, const at::TensorRef& k, const at::TensorRef& v,
           const at::TensorRef& o, const at::TensorRef& dout, const at::TensorRef& dq, const at::TensorRef& dk,
           const at::TensorRef& dv, uintptr_t lse, uintptr_t dq_accum, uintptr_t delta, uintptr_t stream) {
          py::gil_scoped_release release;
          at::cuda::backward(at::BackwardArgs{p, q, k, v, o, dout, dq, dk, dv, reinterpret_cast<const float*>(lse)},
                             reinterpret_cast<float*>(dq_accum), reinterpret_cast<float*>(delta), stream);
        },
        py::arg("problem"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("grad_out"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("lse"), py::arg("dq_accum"), py::arg("delta"),
        py::arg("stream"),
        "Queues the CUDA attention backward on `stream`. dq_accum: zeroed float32 scratch shaped like q "
        "(contiguous); delta: float32 scratch shaped like lse (csrc/attention/cuda/flash.h).");

  m.def("cuda_attention_device_support",
        [](int device) {
          py::gil_scoped_release release;
          return at::cuda::device_support(device);
        },
        py::arg("device"), "'' when the CUDA attention kernels can run on this device, else the reason.");

  m.attr("cuda_attention_smem_bytes") = at::cuda::max_shared_memory_bytes();
}
