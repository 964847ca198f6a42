// HF's BertNormalizer followed by BertPreTokenizer, fused into one pass over the original
// text that hands each word to a callback with, for every byte of the normalized word,
// the original byte range it came from (HF's alignments).
//
// The order of operations is HF's: clean_text (drop NUL, U+FFFD and Cc/Cf/Co controls but
// \t\n\r; map White_Space to ' '), CJK splitting, strip_accents (NFD, canonical reordering,
// drop Mn), lowercase (per code point); then split on White_Space and isolate punctuation.
// Category tables: unicode.h (BERT classes are Unicode 8.0, as in HF).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace llmcore::tok {

struct BertOptions {
  bool clean_text = true;
  bool handle_chinese_chars = true;
  bool strip_accents = true;
  bool lowercase = true;
};

// One normalized word: bytes plus the original byte range of each byte.
struct WordView {
  const uint8_t* bytes;
  size_t size;
  size_t n_chars;
  const uint32_t* orig_start;
  const uint32_t* orig_end;
};

class BertSplitter {
 public:
  explicit BertSplitter(BertOptions options) : opt_(options) {}
  const BertOptions& options() const { return opt_; }

  // Normalizes and splits s[0, n) (valid UTF-8); original offsets are s-relative plus
  // `base`. Calls on_word(const WordView&) for every word in order. Not reentrant per
  // Scratch; use one Scratch per thread.
  struct Scratch {
    std::string word;
    std::vector<uint32_t> orig_start, orig_end;
    size_t n_chars = 0;
    struct Pending {
      uint32_t cp, start, end;
      uint8_t ccc;
      bool first;  // first code point of its original character's decomposition
    };
    std::vector<Pending> marks;  // combining marks awaiting canonical reordering
    std::vector<std::pair<uint32_t, uint32_t>> run_origins;
    uint32_t prev_start = 0, prev_end = 0;  // origin of the last code point out of NFD
  };

  template <class OnWord>
  void split(const uint8_t* s, size_t n, uint32_t base, Scratch& sc, OnWord&& on_word) const;

 private:
  template <class OnWord>
  void emit_normalized(uint32_t cp, uint32_t start, uint32_t end, Scratch& sc, OnWord& on_word) const;
  template <class OnWord>
  void after_nfd(uint32_t cp, uint32_t start, uint32_t end, Scratch& sc, OnWord& on_word) const;
  template <class OnWord>
  void flush_marks(Scratch& sc, OnWord& on_word) const;
  template <class OnWord>
  static void end_word(Scratch& sc, OnWord& on_word);
  static void append(uint32_t cp, uint32_t start, uint32_t end, Scratch& sc);

  BertOptions opt_;
};

}  // namespace llmcore::tok

#include "tokenizer/bert_impl.h"
