// UTF-8 helpers. Inputs are validated once, at the boundary (validate_utf8); the decoders
// below assume valid UTF-8.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace llmcore::tok {

// Decodes the code point at s[i] (valid UTF-8) and advances i past it.
inline uint32_t decode_utf8(const uint8_t* s, size_t& i) {
  const uint32_t b0 = s[i];
  if (b0 < 0x80) {
    i += 1;
    return b0;
  }
  if (b0 < 0xE0) {
    const uint32_t cp = ((b0 & 0x1F) << 6) | (s[i + 1] & 0x3F);
    i += 2;
    return cp;
  }
  if (b0 < 0xF0) {
    const uint32_t cp = ((b0 & 0x0F) << 12) | ((s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
    i += 3;
    return cp;
  }
  const uint32_t cp = ((b0 & 0x07) << 18) | ((s[i + 1] & 0x3F) << 12) | ((s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
  i += 4;
  return cp;
}

// Appends the UTF-8 encoding of cp; returns the number of bytes written (1..4).
inline int append_utf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out.push_back(char(cp));
    return 1;
  }
  if (cp < 0x800) {
    out.push_back(char(0xC0 | (cp >> 6)));
    out.push_back(char(0x80 | (cp & 0x3F)));
    return 2;
  }
  if (cp < 0x10000) {
    out.push_back(char(0xE0 | (cp >> 12)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
    return 3;
  }
  out.push_back(char(0xF0 | (cp >> 18)));
  out.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
  out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
  out.push_back(char(0x80 | (cp & 0x3F)));
  return 4;
}

// Byte offset of the first invalid sequence (overlong forms, surrogates and code points
// past U+10FFFF are invalid), or n when s[0, n) is valid UTF-8.
size_t validate_utf8(const uint8_t* s, size_t n);

// Number of code points in valid UTF-8.
inline size_t count_codepoints(const uint8_t* s, size_t n) {
  size_t count = 0;
  for (size_t i = 0; i < n; ++i) count += (s[i] & 0xC0) != 0x80;
  return count;
}

}  // namespace llmcore::tok
