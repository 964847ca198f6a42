// Template bodies of bert.h.
#pragma once

#include <algorithm>
#include <cstdint>

#include "tokenizer/bert.h"
#include "tokenizer/unicode.h"
#include "tokenizer/utf8.h"

namespace llmcore::tok {

inline void BertSplitter::append(uint32_t cp, uint32_t start, uint32_t end, Scratch& sc) {
  const int len = append_utf8(cp, sc.word);
  for (int k = 0; k < len; ++k) {
    sc.orig_start.push_back(start);
    sc.orig_end.push_back(end);
  }
  ++sc.n_chars;
}

template <class OnWord>
void BertSplitter::end_word(Scratch& sc, OnWord& on_word) {
  if (sc.word.empty()) return;
  on_word(WordView{reinterpret_cast<const uint8_t*>(sc.word.data()), sc.word.size(), sc.n_chars,
                   sc.orig_start.data(), sc.orig_end.data()});
  sc.word.clear();
  sc.orig_start.clear();
  sc.orig_end.clear();
  sc.n_chars = 0;
}

// A code point of the final normalized text: the pre-tokenizer's decision.
template <class OnWord>
void BertSplitter::emit_normalized(uint32_t cp, uint32_t start, uint32_t end, Scratch& sc, OnWord& on_word) const {
  const uint16_t f = unicode_flags(cp);
  if (f & kSpace) {
    end_word(sc, on_word);
  } else if (f & kBertPunct) {
    end_word(sc, on_word);
    append(cp, start, end, sc);
    end_word(sc, on_word);
  } else {
    append(cp, start, end, sc);
  }
}

// A code point after NFD (and reordering): drop nonspacing marks, then lowercase.
template <class OnWord>
void BertSplitter::after_nfd(uint32_t cp, uint32_t start, uint32_t end, Scratch& sc, OnWord& on_word) const {
  if (opt_.strip_accents && (unicode_flags(cp) & kBertMn)) return;
  if (opt_.lowercase) {
    uint32_t low[kMaxLower];
    const int k = to_lower(cp, low);
    for (int i = 0; i < k; ++i) emit_normalized(low[i], start, end, sc, on_word);
  } else {
    emit_normalized(cp, start, end, sc, on_word);
  }
}

// Canonical ordering: a stable sort of the run of marks by combining class. The origins
// follow HF (unicode-normalization-alignments): a code point that starts its character's
// decomposition takes the next original character of the run, in text order; any other
// takes the origin of the code point before it, after sorting.
template <class OnWord>
void BertSplitter::flush_marks(Scratch& sc, OnWord& on_word) const {
  if (sc.marks.empty()) return;
  if (sc.marks.size() > 1) {
    sc.run_origins.clear();
    for (const auto& m : sc.marks)
      if (m.first) sc.run_origins.emplace_back(m.start, m.end);
    std::stable_sort(sc.marks.begin(), sc.marks.end(),
                     [](const Scratch::Pending& a, const Scratch::Pending& b) { return a.ccc < b.ccc; });
    size_t next = 0;
    for (auto& m : sc.marks) {
      if (m.first) {
        m.start = sc.run_origins[next].first;
        m.end = sc.run_origins[next].second;
        ++next;
      } else {
        m.start = sc.prev_start;
        m.end = sc.prev_end;
      }
      sc.prev_start = m.start;
      sc.prev_end = m.end;
    }
  }
  for (const auto& m : sc.marks) after_nfd(m.cp, m.start, m.end, sc, on_word);
  sc.marks.clear();
}

template <class OnWord>
void BertSplitter::split(const uint8_t* s, size_t n, uint32_t base, Scratch& sc, OnWord&& on_word) const {
  sc.word.clear();
  sc.orig_start.clear();
  sc.orig_end.clear();
  sc.n_chars = 0;
  sc.marks.clear();
  size_t i = 0;
  while (i < n) {
    const uint32_t start = base + uint32_t(i);
    const uint8_t b = s[i];
    // ASCII letters and digits: the common case, no table lookups.
    if (sc.marks.empty() && (uint32_t(b | 0x20) - 'a' < 26u || uint32_t(b) - '0' < 10u)) {
      const uint8_t c = (opt_.lowercase && uint32_t(b) - 'A' < 26u) ? uint8_t(b | 0x20) : b;
      sc.prev_start = start, sc.prev_end = start + 1;
      sc.word.push_back(char(c));
      sc.orig_start.push_back(start);
      sc.orig_end.push_back(start + 1);
      ++sc.n_chars;
      ++i;
      continue;
    }
    const uint32_t cp = decode_utf8(s, i);
    const uint32_t end = base + uint32_t(i);
    const uint16_t f = unicode_flags(cp);
    if (opt_.clean_text) {
      if (f & kBertControl) continue;  // removed; does not interrupt a run of marks
      if (f & kSpace) {
        flush_marks(sc, on_word);
        end_word(sc, on_word);
        sc.prev_start = start, sc.prev_end = end;
        continue;
      }
    }
    if (opt_.handle_chinese_chars && (f & kBertCjk)) {
      // HF pads CJK characters with spaces: the character becomes a word of its own.
      flush_marks(sc, on_word);
      end_word(sc, on_word);
      sc.prev_start = start, sc.prev_end = end;
      uint32_t d[kMaxNfd];
      const int k = opt_.strip_accents ? to_nfd(cp, d) : (d[0] = cp, 1);
      for (int j = 0; j < k; ++j) after_nfd(d[j], start, end, sc, on_word);
      end_word(sc, on_word);
      continue;
    }
    if (!opt_.strip_accents) {
      after_nfd(cp, start, end, sc, on_word);
      continue;
    }
    uint32_t d[kMaxNfd];
    const int k = to_nfd(cp, d);
    for (int j = 0; j < k; ++j) {
      const uint8_t ccc = combining_class(d[j]);
      if (ccc == 0) {
        flush_marks(sc, on_word);
        sc.prev_start = start;
        sc.prev_end = end;
        after_nfd(d[j], start, end, sc, on_word);
      } else {
        sc.marks.push_back({d[j], start, end, ccc, j == 0});
      }
    }
  }
  flush_marks(sc, on_word);
  end_word(sc, on_word);
}

}  // namespace llmcore::tok
