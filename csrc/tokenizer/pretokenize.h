// Pre-tokenizers of the byte-level BPE families: hand-written scanners that split text
// exactly as the reference regexes do (tiktoken's fancy-regex, HF's Oniguruma), with no
// regex engine. Each call returns the end of the piece that starts at `pos`; the pieces
// of these patterns tile the whole text.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace llmcore::tok {

enum class Pattern : uint8_t {
  // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  gpt2,
  // '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s
  cl100k,
  // o200k_base's pattern (upper/lower letter runs, [\r\n/]* after punctuation)
  o200k,
  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  llama3,
  // Qwen2: llama3 with single digits (\p{N} instead of \p{N}{1,3})
  qwen2,
  // cl100k's regex as HF tokenizers' engine (Oniguruma) reads it in a tokenizer.json: \p{N}{1,3}+ is not
  // possessive there but (?:\p{N}{1,3})+, a whole digit run
  cl100k_hf,
};

// The exact regex source of each pattern, as tiktoken / tokenizer.json spell it.
std::string_view pattern_regex(Pattern p);

// End (byte offset, > pos) of the piece starting at byte `pos` of the valid UTF-8 text
// s[0, n). Requires pos < n.
size_t next_piece(Pattern p, const char* s, size_t n, size_t pos);

}  // namespace llmcore::tok
