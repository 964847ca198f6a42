#include "tokenizer/unicode.h"

#include <algorithm>
#include <cstdint>

namespace llmcore::tok {
namespace {

struct Mapping {
  uint32_t cp;
  uint32_t offset;
  uint32_t length;
};

#include "unicode_tables.inc"

template <size_t N>
const Mapping* find(const Mapping (&table)[N], uint32_t cp) {
  const Mapping* it = std::lower_bound(table, table + N, cp, [](const Mapping& m, uint32_t c) { return m.cp < c; });
  return it != table + N && it->cp == cp ? it : nullptr;
}

int copy_mapping(const Mapping* m, uint32_t cp, uint32_t* out) {
  if (!m) {
    out[0] = cp;
    return 1;
  }
  for (uint32_t i = 0; i < m->length; ++i) out[i] = kMapPool[m->offset + i];
  return int(m->length);
}

}  // namespace

const char* unicode_version() { return kUnicodeVersion; }

uint16_t unicode_flags(uint32_t cp) {
  if (cp >= 0x110000) return 0;
  return kStage2[(uint32_t(kStage1[cp >> kBlockShift]) << kBlockShift) | (cp & ((1u << kBlockShift) - 1))];
}

int to_lower(uint32_t cp, uint32_t* out) {
  return copy_mapping(unicode_flags(cp) & kHasLower ? find(kLower, cp) : nullptr, cp, out);
}

int to_nfd(uint32_t cp, uint32_t* out) {
  constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
  constexpr uint32_t kVCount = 21, kTCount = 28, kSCount = 11172;
  if (cp - kSBase < kSCount) {  // Hangul syllable: arithmetic decomposition
    const uint32_t s = cp - kSBase;
    out[0] = kLBase + s / (kVCount * kTCount);
    out[1] = kVBase + (s % (kVCount * kTCount)) / kTCount;
    if (s % kTCount == 0) return 2;
    out[2] = kTBase + s % kTCount;
    return 3;
  }
  return copy_mapping(unicode_flags(cp) & kHasNfd ? find(kNfd, cp) : nullptr, cp, out);
}

uint8_t combining_class(uint32_t cp) {
  if (!(unicode_flags(cp) & kHasCcc)) return 0;
  const uint32_t* end = kCccCodepoints + sizeof(kCccCodepoints) / sizeof(kCccCodepoints[0]);
  const uint32_t* it = std::lower_bound(kCccCodepoints, end, cp);
  return it != end && *it == cp ? kCccValues[it - kCccCodepoints] : 0;
}

}  // namespace llmcore::tok
