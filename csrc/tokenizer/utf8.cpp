#include "tokenizer/utf8.h"

#include <cstdint>
#include <cstring>

namespace llmcore::tok {

size_t validate_utf8(const uint8_t* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    // ASCII fast path, eight bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, s + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    const uint8_t b0 = s[i];
    if (b0 < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t min_cp;
    if ((b0 & 0xE0) == 0xC0) {
      len = 2, min_cp = 0x80;
    } else if ((b0 & 0xF0) == 0xE0) {
      len = 3, min_cp = 0x800;
    } else if ((b0 & 0xF8) == 0xF0) {
      len = 4, min_cp = 0x10000;
    } else {
      return i;
    }
    if (i + len > n) return i;
    uint32_t cp = b0 & (0x7F >> len);
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000)) return i;
    i += len;
  }
  return n;
}

}  // namespace llmcore::tok
