#include "common/cpu_features.h"

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define LLMCORE_X86 1
#endif
#if defined(__linux__) && defined(LLMCORE_X86)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace llmcore {
namespace {

#ifdef LLMCORE_X86
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#ifdef LLMCORE_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  if (!osxsave) return f;
  const uint64_t xcr0 = xgetbv0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;
  f.fma = os_ymm && (c & (1u << 12));
  f.f16c = os_ymm && (c & (1u << 29));
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = os_ymm && (b & (1u << 5));
  f.avx512f = os_zmm && (b & (1u << 16));
  f.avx512dq = os_zmm && (b & (1u << 17));
  f.avx512bw = os_zmm && (b & (1u << 30));
  f.avx512vl = os_zmm && (b & (1u << 31));
  f.amx_bf16 = os_amx && (d & (1u << 22));
  f.amx_tile = os_amx && (d & (1u << 24));
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512_bf16 = os_zmm && (a & (1u << 5));
#endif
  return f;
}

Isa parse(const std::string& s) {
  if (s == "avx512") return Isa::avx512;
  if (s == "avx2") return Isa::avx2;
  if (s == "portable") return Isa::portable;
  throw std::invalid_argument("unknown CPU ISA '" + s + "': expected one of avx512, avx2, portable");
}

bool isa_supported(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::avx512: return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.fma && f.f16c;
    case Isa::avx2: return f.avx2 && f.fma && f.f16c;
    case Isa::portable: return true;
  }
  return false;
}

Isa detect_best() {
  for (Isa isa : {Isa::avx512, Isa::avx2}) {
    if (isa_compiled(isa) && isa_supported(isa)) return isa;
  }
  return Isa::portable;
}

Isa initial_isa() {
  Isa best = detect_best();
  if (const char* env = std::getenv("LLMCORE_CPU_ISA")) {
    try {
      Isa want = parse(env);
      // The variable may only lower the ISA: asking for more than the CPU has would crash later.
      if (static_cast<int>(want) < static_cast<int>(best)) return want;
    } catch (const std::invalid_argument&) {
      // An unknown value is ignored rather than failing the import.
    }
  }
  return best;
}

Isa g_isa = initial_isa();

bool request_amx() {
#if defined(LLMCORE_HAVE_AMX) && defined(__linux__)
  const CpuFeatures& f = cpu_features();
  if (!(f.amx_tile && f.amx_bf16 && f.avx512_bf16 && f.avx512f)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

bool g_bf16_dot_on = true;

bool g_amx_on = [] {
  const char* env = std::getenv("LLMCORE_DISABLE_AMX");
  return !(env && *env && std::string(env) != "0");
}();

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

bool isa_compiled(Isa isa) {
  switch (isa) {
#ifdef LLMCORE_HAVE_AVX512
    case Isa::avx512: return true;
#endif
#ifdef LLMCORE_HAVE_AVX2
    case Isa::avx2: return true;
#endif
    case Isa::portable: return true;
    default: return false;
  }
}

Isa best_isa() { return detect_best(); }
Isa current_isa() { return g_isa; }

void set_isa(const std::string& name) {
  Isa isa = parse(name);
  if (!isa_compiled(isa)) throw std::invalid_argument("CPU ISA '" + name + "' was not compiled into this build");
  if (!isa_supported(isa)) throw std::invalid_argument("this CPU does not support the '" + name + "' kernels");
  g_isa = isa;
}

bool amx_available() {
  static const bool ok = request_amx();
  return ok;
}

bool amx_enabled() { return g_amx_on && amx_available() && g_isa == Isa::avx512; }

void set_amx(bool on) {
  if (on && !amx_available()) throw std::invalid_argument("AMX bf16 kernels are not available on this CPU/build");
  g_amx_on = on;
}

bool bf16_dot_available() {
#ifdef LLMCORE_HAVE_BF16_DOT
  return cpu_features().avx512_bf16 && isa_supported(Isa::avx512);
#else
  return false;
#endif
}

bool bf16_dot_enabled() {
  return g_bf16_dot_on && bf16_dot_available() && g_isa == Isa::avx512 && !amx_enabled();
}

void set_bf16_dot(bool on) {
  if (on && !bf16_dot_available())
    throw std::invalid_argument("AVX512-BF16 attention kernels are not available on this CPU/build");
  g_bf16_dot_on = on;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    case Isa::portable: return "portable";
  }
  return "?";
}

}  // namespace llmcore
