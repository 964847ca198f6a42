// Chooses the norm and activation kernels of the current ISA. The only place that names the
// per-ISA namespaces of csrc/norm.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "common/cpu_features.h"
#include "norm/norm.h"

namespace llmcore::norm {

#define LLMCORE_DECLARE_ISA(ns)                      \
  namespace ns {                                     \
  void norm_forward(const NormForwardArgs& a);       \
  void norm_backward(const NormBackwardArgs& a);     \
  void bias_gelu_forward(const BiasGeluArgs& a);     \
  void bias_gelu_backward(const BiasGeluArgs& a);    \
  void swiglu_forward(const SwigluArgs& a);          \
  void swiglu_backward(const SwigluArgs& a);         \
  void dropout_apply(const DropoutArgs& a);          \
  void adamw_rows(const AdamWRowsArgs& a);           \
  void adamw_tensors(const AdamWTensorsArgs& a);     \
  void decay_rows(const DecayRowsArgs& a);           \
  void sum_squares(const SumSquaresArgs& a);         \
  void cross_entropy_rows(const CrossEntropyRowsArgs& a); \
  void rotary(const RotaryArgs& a);                  \
  }
#ifdef LLMCORE_HAVE_AVX512
LLMCORE_DECLARE_ISA(avx512)
#endif
#ifdef LLMCORE_HAVE_AVX2
LLMCORE_DECLARE_ISA(avx2)
#endif
LLMCORE_DECLARE_ISA(portable)
#ifdef LLMCORE_HAVE_NORM_AVX512_BF16
LLMCORE_DECLARE_ISA(avx512_bf16)
#endif
#undef LLMCORE_DECLARE_ISA

namespace {
bool g_bf16_instructions = [] {
  const char* env = std::getenv("LLMCORE_DISABLE_AVX512_BF16");
  return bf16_instructions_available() && !(env && *env && std::string(env) != "0");
}();
}  // namespace

bool bf16_instructions_available() {
#ifdef LLMCORE_HAVE_NORM_AVX512_BF16
  return cpu_features().avx512_bf16;
#else
  return false;
#endif
}

bool bf16_instructions_enabled() { return g_bf16_instructions; }

void set_bf16_instructions(bool on) {
  if (on && !bf16_instructions_available())
    throw std::invalid_argument("the AVX512-BF16 norm kernels are not compiled in or not supported by this CPU");
  g_bf16_instructions = on;
}

#if defined(LLMCORE_HAVE_NORM_AVX512_BF16)
#define LLMCORE_CASE_AVX512(fn)                             \
  case Isa::avx512:                                         \
    if (g_bf16_instructions) return avx512_bf16::fn(a);     \
    return avx512::fn(a);
#elif defined(LLMCORE_HAVE_AVX512)
#define LLMCORE_CASE_AVX512(fn) \
  case Isa::avx512: return avx512::fn(a);
#else
#define LLMCORE_CASE_AVX512(fn)
#endif
#ifdef LLMCORE_HAVE_AVX2
#define LLMCORE_CASE_AVX2(fn) \
  case Isa::avx2: return avx2::fn(a);
#else
#define LLMCORE_CASE_AVX2(fn)
#endif

#define LLMCORE_DISPATCH(fn, Args)          \
  void fn(const Args& a) {                  \
    switch (current_isa()) {                \
      LLMCORE_CASE_AVX512(fn)               \
      LLMCORE_CASE_AVX2(fn)                 \
      default: return portable::fn(a);      \
    }                                       \
  }

LLMCORE_DISPATCH(norm_forward, NormForwardArgs)
LLMCORE_DISPATCH(norm_backward, NormBackwardArgs)
LLMCORE_DISPATCH(bias_gelu_forward, BiasGeluArgs)
LLMCORE_DISPATCH(bias_gelu_backward, BiasGeluArgs)
LLMCORE_DISPATCH(swiglu_forward, SwigluArgs)
LLMCORE_DISPATCH(swiglu_backward, SwigluArgs)
LLMCORE_DISPATCH(dropout_apply, DropoutArgs)
LLMCORE_DISPATCH(adamw_rows, AdamWRowsArgs)
LLMCORE_DISPATCH(adamw_tensors, AdamWTensorsArgs)
LLMCORE_DISPATCH(decay_rows, DecayRowsArgs)
LLMCORE_DISPATCH(sum_squares, SumSquaresArgs)
LLMCORE_DISPATCH(cross_entropy_rows, CrossEntropyRowsArgs)
LLMCORE_DISPATCH(rotary, RotaryArgs)

}  // namespace llmcore::norm
