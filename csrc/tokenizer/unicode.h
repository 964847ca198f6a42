// Unicode properties for the tokenizers: one 16-bit flag word per code point from a
// two-stage table generated at build time (tools/unicode/gen_tables.py), plus sparse
// lowercase and NFD mappings. Versions: see gen_tables.py and README.
#pragma once

#include <cstddef>
#include <cstdint>

namespace llmcore::tok {

enum UnicodeFlag : uint16_t {
  kLetter = 1u << 0,       // \p{L}  (Unicode 16.0)
  kNumber = 1u << 1,       // \p{N}
  kSpace = 1u << 2,        // White_Space, the regex crate's \s
  kMark = 1u << 3,         // \p{M}
  kUpperish = 1u << 4,     // [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]  (o200k)
  kLowerish = 1u << 5,     // [\p{Ll}\p{Lm}\p{Lo}\p{M}]        (o200k)
  kBertPunct = 1u << 6,    // BertPreTokenizer punctuation: ASCII punctuation or P* (Unicode 8.0)
  kBertControl = 1u << 7,  // removed by BertNormalizer clean_text: Cc|Cf|Co (Unicode 8.0) but \t\n\r, NUL, U+FFFD
  kBertMn = 1u << 8,       // Mn (Unicode 8.0), removed by strip_accents
  kHasLower = 1u << 9,     // lowercase() differs from the code point
  kHasNfd = 1u << 10,      // has a canonical decomposition (Hangul syllables excepted)
  kBertCjk = 1u << 11,     // BertNormalizer's CJK ranges, split into their own words
  kHasCcc = 1u << 12,      // nonzero canonical combining class
  kWord = 1u << 13,        // the regex crate's \w: Alphabetic, \p{M}, \p{Nd}, \p{Pc}, Join_Control (Unicode 16.0)
};

const char* unicode_version();

// Flags of a code point; 0 beyond U+10FFFF.
uint16_t unicode_flags(uint32_t cp);

// Lowercase of cp into out (at most 3 code points); returns the count (>= 1).
int to_lower(uint32_t cp, uint32_t* out);

// Full canonical decomposition of cp into out (at most 4 code points, Hangul included);
// returns the count (>= 1).
int to_nfd(uint32_t cp, uint32_t* out);

// Canonical combining class (0 for starters).
uint8_t combining_class(uint32_t cp);

constexpr int kMaxLower = 3;
constexpr int kMaxNfd = 4;

}  // namespace llmcore::tok
