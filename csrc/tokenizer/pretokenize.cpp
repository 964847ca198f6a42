// Hand-written equivalents of the byte-level BPE pre-tokenization regexes (see
// pretokenize.h). Each scanner reproduces the backtracking semantics of its regex:
// alternatives are tried left to right and the first one that matches wins (not the
// longest), greedy quantifiers give back characters only where the rest of the
// alternative needs them. The reasoning behind each shortcut is in the comments.
//
// Character classes, as the regexes use them:
//   L = \p{L}, N = \p{N}, S = \s (Unicode White_Space), O = [^\s\p{L}\p{N}] ("other");
//   P = [^\r\n\p{L}\p{N}] (the optional one-character prefix of a letter run).
// Every character is in exactly one of L, N, S, O.
#include <cstdint>
#include <limits>

#include "tokenizer/pretokenize.h"

#include "tokenizer/unicode.h"

namespace llmcore::tok {
namespace {

using Byte = unsigned char;

constexpr uint16_t kClassMask = kLetter | kNumber | kSpace | kMark | kUpperish | kLowerish;
constexpr uint16_t kLNS = kLetter | kNumber | kSpace;
// o200k's [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}] and [\p{Ll}\p{Lm}\p{Lo}\p{M}], both "U" and "W".
constexpr uint16_t kBoth = kUpperish | kLowerish;

// unicode_flags(c) & kClassMask for the ASCII characters, so that ASCII text needs no
// decoding and no table walk.
struct AsciiFlags {
  uint16_t f[128];
};

constexpr AsciiFlags make_ascii_flags() {
  AsciiFlags t{};
  for (int c = 0; c < 128; ++c) {
    uint16_t f = 0;
    if (c >= 'A' && c <= 'Z') f = kLetter | kUpperish;
    else if (c >= 'a' && c <= 'z') f = kLetter | kLowerish;
    else if (c >= '0' && c <= '9') f = kNumber;
    else if (c == ' ' || (c >= '\t' && c <= '\r')) f = kSpace;
    t.f[c] = f;
  }
  return t;
}

constexpr AsciiFlags kAscii = make_ascii_flags();

struct Char {
  uint16_t flags;  // unicode flags, masked to kClassMask
  size_t len;      // bytes
};

Char decode(const Byte* s, size_t n, size_t i) {
  const Byte b = s[i];
  uint32_t cp;
  size_t len;
  if (b >= 0xF0) {
    cp = b & 0x07u;
    len = 4;
  } else if (b >= 0xE0) {
    cp = b & 0x0Fu;
    len = 3;
  } else {
    cp = b & 0x1Fu;
    len = 2;
  }
  // Input is required to be valid UTF-8; a truncated sequence at the end is read as one
  // "other" byte rather than past the buffer.
  if (len > n - i) return {0, 1};
  for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (s[i + k] & 0x3Fu);
  return {uint16_t(unicode_flags(cp) & kClassMask), len};
}

inline Char char_at(const Byte* s, size_t n, size_t i) {
  return s[i] < 0x80 ? Char{kAscii.f[s[i]], 1} : decode(s, n, i);
}

inline uint16_t flags_at(const Byte* s, size_t n, size_t i) { return char_at(s, n, i).flags; }

// End of the run of characters starting at i for which pred(flags) holds.
template <typename Pred>
inline size_t skip_while(const Byte* s, size_t n, size_t i, Pred pred) {
  while (i < n) {
    if (s[i] < 0x80) {
      if (!pred(kAscii.f[s[i]])) break;
      ++i;
    } else {
      const Char c = decode(s, n, i);
      if (!pred(c.flags)) break;
      i += c.len;
    }
  }
  return i;
}

inline size_t skip_letters(const Byte* s, size_t n, size_t i) {
  return skip_while(s, n, i, [](uint16_t f) { return (f & kLetter) != 0; });
}

inline size_t skip_other(const Byte* s, size_t n, size_t i) {
  return skip_while(s, n, i, [](uint16_t f) { return (f & kLNS) == 0; });
}

// \p{N}{1,max_digits} from i (s[i] is a number).
size_t skip_digits(const Byte* s, size_t n, size_t i, int max_digits) {
  for (int k = 0; k < max_digits && i < n; ++k) {
    const Char c = char_at(s, n, i);
    if (!(c.flags & kNumber)) break;
    i += c.len;
  }
  return i;
}

// [\r\n]* (or [\r\n/]* when slash) from i.
size_t skip_newlines(const Byte* s, size_t n, size_t i, bool slash) {
  while (i < n && (s[i] == '\r' || s[i] == '\n' || (slash && s[i] == '/'))) ++i;
  return i;
}

// Length of the contraction 's 't 're 've 'm 'll 'd at i, 0 if there is none. The
// case-insensitive form, (?i:...), follows Unicode simple case folding like the reference
// engines: besides ASCII case, the only character folding to one of these letters is
// U+017F LATIN SMALL LETTER LONG S (UTF-8 C5 BF), which matches 's'.
size_t contraction(const Byte* s, size_t n, size_t i, bool ignore_case) {
  if (i + 1 >= n || s[i] != '\'') return 0;
  auto fold = [ignore_case](Byte b) { return ignore_case && b >= 'A' && b <= 'Z' ? Byte(b + 32) : b; };
  const Byte a = fold(s[i + 1]);
  switch (a) {
    case 's':
    case 't':
    case 'm':
    case 'd':
      return 2;
    case 'l':
    case 'r':
    case 'v': {
      if (i + 2 >= n) return 0;
      const Byte b = fold(s[i + 2]);
      return b == (a == 'l' ? 'l' : 'e') ? 3 : 0;
    }
    case 0xC5:
      return ignore_case && i + 2 < n && s[i + 2] == 0xBF ? 3 : 0;
    default:
      return 0;
  }
}

// How a pattern ends a run of whitespace, given the alternatives it has.
enum class SpaceRule : uint8_t {
  gpt2,    // \s+(?!\S)|\s+
  cl100k,  // \s++$|\s*[\r\n]|\s+(?!\S)|\s
  lines,   // \s*[\r\n]+|\s+(?!\S)|\s+   (llama3, qwen2, o200k)
};

// Piece starting with the whitespace character at pos, once the earlier alternatives
// (letters, punctuation) have failed. One pass over the maximal run \s+ from pos gives
// everything the whitespace alternatives need, so no alternative rescans the run:
//   \s++$         the whole run, if it reaches the end of the text ($ = end of text);
//   \s*[\r\n]+    backtracking \s* stops after the last \r or \n of the run (the [\r\n]+
//                 after it cannot extend past the run's last \r/\n); same for \s*[\r\n];
//   \s+(?!\S)     the whole run at the end of the text, else the run less its last
//                 character (which is followed by \S), which needs a run of 2+ chars;
//   \s+ / \s      otherwise the run is a single character followed by \S.
size_t space_piece(const Byte* s, size_t n, size_t pos, SpaceRule rule) {
  size_t i = pos, last_start = pos, after_newline = 0;
  while (i < n) {
    const Char c = char_at(s, n, i);
    if (!(c.flags & kSpace)) break;
    if (s[i] == '\r' || s[i] == '\n') after_newline = i + 1;
    last_start = i;
    i += c.len;
  }
  if (rule == SpaceRule::cl100k && i == n) return n;
  if (rule != SpaceRule::gpt2 && after_newline) return after_newline;
  if (i == n) return n;
  return last_start > pos ? last_start : i;
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
size_t next_gpt2(const Byte* s, size_t n, size_t pos) {
  if (const size_t k = contraction(s, n, pos, false)) return pos + k;
  // " ?" is taken exactly when a space is followed by a non-space: each of the three
  // " ?X+" alternatives then matches on the class X of that next character.
  size_t q = pos;
  uint16_t f = flags_at(s, n, pos);
  if (s[pos] == ' ' && pos + 1 < n) {
    const uint16_t next = flags_at(s, n, pos + 1);
    if (!(next & kSpace)) {
      q = pos + 1;
      f = next;
    }
  }
  if (f & kLetter) return skip_letters(s, n, q);
  if (f & kNumber) return skip_while(s, n, q, [](uint16_t g) { return (g & kNumber) != 0; });
  if (!(f & kSpace)) return skip_other(s, n, q);
  return space_piece(s, n, pos, SpaceRule::gpt2);
}

// cl100k:  '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|
//          ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s
// llama3:  (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//          ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// qwen2:   llama3 with \p{N} for \p{N}{1,3}.
// The possessive quantifiers of cl100k change nothing here: a consumed prefix P can only
// be followed by a letter (P excludes \p{L}), and [\r\n]*+ always succeeds, so no
// backtracking into them could make a match.
size_t next_cl100k_family(const Byte* s, size_t n, size_t pos, int max_digits, SpaceRule rule) {
  if (const size_t k = contraction(s, n, pos, true)) return pos + k;
  const Char c = char_at(s, n, pos);
  if (c.flags & kLetter) return skip_letters(s, n, pos);
  if (c.flags & kNumber) return skip_digits(s, n, pos, max_digits);
  // c is in O or S: as a prefix P (unless \r or \n) it joins a letter run that follows.
  const size_t next = pos + c.len;
  if (s[pos] != '\r' && s[pos] != '\n' && next < n && (flags_at(s, n, next) & kLetter))
    return skip_letters(s, n, next);
  if (!(c.flags & kSpace)) return skip_newlines(s, n, skip_other(s, n, next), false);
  if (s[pos] == ' ' && next < n && !(flags_at(s, n, next) & kLNS))
    return skip_newlines(s, n, skip_other(s, n, next), false);
  return space_piece(s, n, pos, rule);
}

// o200k's two letter alternatives, tried from q (after the optional prefix P), with
// U = [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}] and W = [\p{Ll}\p{Lm}\p{Lo}\p{M}]:
//   A1 = U*W+ : greedy U* takes the maximal U run [q, u_end) and gives back characters
//        until W+ can start. If the character at u_end is in W, W+ runs on from there.
//        Otherwise W+ must start inside the run, at its last character that is also in W
//        (Lm, Lo, M: "both"), and matches only that character (the next one is not in W).
//   A2 = U+W* : the whole U run; W* then matches nothing, since A2 is only tried when A1
//        failed, i.e. when the character at u_end is not in W.
// Ends are 0 when the alternative fails.
struct O200kLetters {
  size_t a1;
  size_t a2;
};

O200kLetters o200k_letters(const Byte* s, size_t n, size_t q) {
  size_t u_end = q, after_both = 0;
  while (u_end < n) {
    const Char c = char_at(s, n, u_end);
    if (!(c.flags & kUpperish)) break;
    u_end += c.len;
    if ((c.flags & kBoth) == kBoth) after_both = u_end;
  }
  if (u_end < n && (flags_at(s, n, u_end) & kLowerish))
    return {skip_while(s, n, u_end, [](uint16_t f) { return (f & kLowerish) != 0; }), 0};
  return {after_both, u_end > q ? u_end : 0};
}

// [^\r\n\p{L}\p{N}]?[U]*[W]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
// [^\r\n\p{L}\p{N}]?[U]+[W]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
// \p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
size_t next_o200k(const Byte* s, size_t n, size_t pos) {
  const Char c = char_at(s, n, pos);
  // The optional contraction after a letter piece always matches when it can.
  auto with_contraction = [&](size_t end) { return end + contraction(s, n, end, true); };
  if (c.flags & kNumber) return skip_digits(s, n, pos, 3);  // N is in neither P, U nor W
  if (c.flags & kLetter) {                                  // no prefix possible
    const O200kLetters m = o200k_letters(s, n, pos);
    return with_contraction(m.a1 ? m.a1 : m.a2);  // every letter is in U or W
  }
  const size_t next = pos + c.len;
  if (s[pos] != '\r' && s[pos] != '\n') {  // c is a prefix candidate P
    const O200kLetters m = o200k_letters(s, n, next);
    if (m.a1) return with_contraction(m.a1);
    // Backtracking "P?" to empty before trying A2: a mark (in P, U and W at once) then
    // starts A1 itself. The U run from pos is c plus the run from next; A1 from next
    // failed, so that run holds no "both" character and is not followed by W, so W+ can
    // only be c alone.
    if (c.flags & kMark) return with_contraction(next);
    if (m.a2) return with_contraction(m.a2);
  }
  if (!(c.flags & kSpace)) return skip_newlines(s, n, skip_other(s, n, next), true);
  if (s[pos] == ' ' && next < n && !(flags_at(s, n, next) & kLNS))
    return skip_newlines(s, n, skip_other(s, n, next), true);
  return space_piece(s, n, pos, SpaceRule::lines);
}

}  // namespace

std::string_view pattern_regex(Pattern p) {
  switch (p) {
    case Pattern::gpt2:
      return R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
    case Pattern::cl100k:
    case Pattern::cl100k_hf:
      return R"('(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s)";
    case Pattern::o200k:
      return R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|)"
             R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|)"
             R"(\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
    case Pattern::llama3:
      return R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
    case Pattern::qwen2:
      return R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  }
  return {};
}

size_t next_piece(Pattern p, const char* text, size_t n, size_t pos) {
  const Byte* s = reinterpret_cast<const Byte*>(text);
  switch (p) {
    case Pattern::gpt2:
      return next_gpt2(s, n, pos);
    case Pattern::cl100k:
      return next_cl100k_family(s, n, pos, 3, SpaceRule::cl100k);
    case Pattern::o200k:
      return next_o200k(s, n, pos);
    case Pattern::llama3:
      return next_cl100k_family(s, n, pos, 3, SpaceRule::lines);
    case Pattern::qwen2:
      return next_cl100k_family(s, n, pos, 1, SpaceRule::lines);
    case Pattern::cl100k_hf:
      return next_cl100k_family(s, n, pos, std::numeric_limits<int>::max(), SpaceRule::cl100k);
  }
  return n;
}

}  // namespace llmcore::tok
