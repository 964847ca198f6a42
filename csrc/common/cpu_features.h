// CPU feature detection and the choice of kernel ISA, made once at import time.
#pragma once
#include <string>

namespace llmcore {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_bf16 = false;
  bool amx_tile = false, amx_bf16 = false;
};

enum class Isa { portable = 0, avx2 = 1, avx512 = 2 };

const CpuFeatures& cpu_features();

// The best ISA this build and this CPU support; LLMCORE_CPU_ISA overrides it downwards.
Isa best_isa();
Isa current_isa();
// Force an ISA (for tests and benchmarks). Throws std::invalid_argument if the CPU or build lacks it.
void set_isa(const std::string& name);
const char* isa_name(Isa isa);
bool isa_compiled(Isa isa);

// AMX bf16 kernels: compiled in, CPU support, and the OS's permission to use the tile data
// (asked once, through arch_prctl). amx_enabled() is that, unless switched off.
bool amx_available();
bool amx_enabled();
// Switch the AMX kernels off or back on (tests, benchmarks). Throws if unavailable.
void set_amx(bool on);

// bf16 attention on AVX512-BF16 dot products (the AMX kernels built without tiles): compiled in
// and the CPU has AVX512-BF16. bf16_dot_enabled() is that, with the avx512 ISA selected and AMX
// not in use, unless switched off; set_bf16_dot throws if unavailable.
bool bf16_dot_available();
bool bf16_dot_enabled();
void set_bf16_dot(bool on);

}  // namespace llmcore
