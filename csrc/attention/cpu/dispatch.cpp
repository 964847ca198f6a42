// Chooses the kernel of the current ISA. The only place that names the per-ISA namespaces.
#include <cstdint>
#include <stdexcept>

#include "attention/attention.h"
#include "attention/cpu/philox.h"
#include "common/cpu_features.h"

namespace llmcore::attention {

#define LLMCORE_DECLARE_ISA(ns)                                                                       \
  namespace ns {                                                                                      \
  void forward(const ForwardArgs& args);                                                              \
  void backward(const BackwardArgs& args);                                                            \
  void dropout_keep_block(uint64_t seed, uint64_t offset, float p, int64_t row0, int64_t rows, int64_t col0, \
                          int64_t cols, bool transposed, uint8_t* keep);                              \
  }
#ifdef LLMCORE_HAVE_AVX512
LLMCORE_DECLARE_ISA(avx512)
#endif
#ifdef LLMCORE_HAVE_AVX2
LLMCORE_DECLARE_ISA(avx2)
#endif
LLMCORE_DECLARE_ISA(portable)
#undef LLMCORE_DECLARE_ISA
#ifdef LLMCORE_HAVE_AMX
namespace avx512_amx {
void forward(const ForwardArgs& args);
void backward(const BackwardArgs& args);
}
#endif
#ifdef LLMCORE_HAVE_BF16_DOT
namespace avx512_bf16 {  // forward_amx.cpp / backward_amx.cpp on AVX512-BF16 dot products
void forward(const ForwardArgs& args);
void backward(const BackwardArgs& args);
}
#endif

void forward(const ForwardArgs& args) {
#ifdef LLMCORE_HAVE_AMX
  if (args.p.dtype == DType::bf16 && amx_enabled()) return avx512_amx::forward(args);
#endif
#ifdef LLMCORE_HAVE_BF16_DOT
  if (args.p.dtype == DType::bf16 && bf16_dot_enabled()) return avx512_bf16::forward(args);
#endif
  switch (current_isa()) {
#ifdef LLMCORE_HAVE_AVX512
    case Isa::avx512: return avx512::forward(args);
#endif
#ifdef LLMCORE_HAVE_AVX2
    case Isa::avx2: return avx2::forward(args);
#endif
    default: return portable::forward(args);
  }
}

void backward(const BackwardArgs& args) {
#ifdef LLMCORE_HAVE_AMX
  if (args.p.dtype == DType::bf16 && amx_enabled()) return avx512_amx::backward(args);
#endif
#ifdef LLMCORE_HAVE_BF16_DOT
  if (args.p.dtype == DType::bf16 && bf16_dot_enabled()) return avx512_bf16::backward(args);
#endif
  switch (current_isa()) {
#ifdef LLMCORE_HAVE_AVX512
    case Isa::avx512: return avx512::backward(args);
#endif
#ifdef LLMCORE_HAVE_AVX2
    case Isa::avx2: return avx2::backward(args);
#endif
    default: return portable::backward(args);
  }
}

void dropout_keep_mask(uint64_t seed, uint64_t offset, float p, int64_t row0, int64_t rows, int64_t cols,
                       uint8_t* keep) {
  for (int64_t r = 0; r < rows; ++r) dropout_row(seed, offset, uint64_t(row0 + r), 0, cols, p, keep + r * cols);
}

void dropout_keep_block(uint64_t seed, uint64_t offset, float p, int64_t row0, int64_t rows, int64_t col0,
                        int64_t cols, bool transposed, uint8_t* keep) {
  switch (current_isa()) {
#ifdef LLMCORE_HAVE_AVX512
    case Isa::avx512: return avx512::dropout_keep_block(seed, offset, p, row0, rows, col0, cols, transposed, keep);
#endif
#ifdef LLMCORE_HAVE_AVX2
    case Isa::avx2: return avx2::dropout_keep_block(seed, offset, p, row0, rows, col0, cols, transposed, keep);
#endif
    default: return portable::dropout_keep_block(seed, offset, p, row0, rows, col0, cols, transposed, keep);
  }
}

}  // namespace llmcore::attention
