#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <unordered_set>

#include "tokenizer/unicode.h"
#include "tokenizer/utf8.h"

namespace llmcore::tok {
namespace {

// HF's single_word test: the regex crate's \w.
bool is_word_char(uint32_t cp) { return (unicode_flags(cp) & kWord) != 0; }

// Code point ending at byte `end` of valid UTF-8 s (end > 0).
uint32_t last_codepoint(const uint8_t* s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (s[i] & 0xC0) == 0x80) --i;
  return decode_utf8(s, i);
}

// HF's WordPiece decoder cleanup of one token.
void cleanup(std::string& t) {
  static const std::pair<const char*, const char*> kRules[] = {
      {" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"}, {" n't", "n't"},
      {" 'm", "'m"}, {" do not", " don't"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
  for (const auto& [from, to] : kRules) {
    const size_t flen = std::strlen(from), tlen = std::strlen(to);
    for (size_t pos = t.find(from); pos != std::string::npos; pos = t.find(from, pos + tlen))
      t.replace(pos, flen, to);
  }
}

}  // namespace

Tokenizer Tokenizer::wordpiece(WordPiece model, std::optional<BertOptions> bert, bool decoder_cleanup) {
  Tokenizer t;
  // Without a BertNormalizer the BertPreTokenizer still runs: all normalization steps off.
  t.bert_ = bert.value_or(BertOptions{false, false, false, false});
  t.decoder_cleanup_ = decoder_cleanup;
  t.wordpiece_.emplace(std::move(model));
  return t;
}

Tokenizer Tokenizer::byte_level_bpe(BytePairEncoder model, Pattern pattern, bool add_prefix_space) {
  Tokenizer t;
  t.bpe_.emplace(std::move(model));
  t.pattern_ = pattern;
  t.add_prefix_space_ = add_prefix_space;
  return t;
}

void Tokenizer::set_token_text(int32_t id, std::string_view bytes, bool special) {
  if (id < 0) throw std::invalid_argument("negative token id " + std::to_string(id));
  if (size_t(id) >= decode_text_.size()) {
    decode_text_.resize(size_t(id) + 1);
    decode_special_.resize(size_t(id) + 1, 0);
  }
  decode_text_[id] = std::string(bytes);
  decode_special_[id] = special;
}

void Tokenizer::set_added_tokens(std::vector<AddedToken> tokens) {
  for (const auto& t : tokens)
    if (t.content.empty()) throw std::invalid_argument("added token with empty content (id " + std::to_string(t.id) + ")");
  // Longest first among tokens sharing a first byte: the first match found is the longest.
  std::sort(tokens.begin(), tokens.end(), [](const AddedToken& a, const AddedToken& b) {
    return a.content.size() != b.content.size() ? a.content.size() > b.content.size() : a.content < b.content;
  });
  for (const auto& t : tokens) set_token_text(t.id, t.content, t.special);
  added_ = std::move(tokens);
  added_first_.assign(256, 0);
  added_normalized_ = false;
  for (const auto& t : added_) {
    added_first_[uint8_t(t.content[0])] |= uint8_t(1u << t.normalized);
    added_normalized_ = added_normalized_ || t.normalized;
  }
}

std::vector<uint8_t> Tokenizer::added_skip_mask(const std::vector<std::string>& contents) const {
  const std::unordered_set<std::string_view> names(contents.begin(), contents.end());
  std::vector<uint8_t> mask(added_.size(), 0);
  for (size_t k = 0; k < added_.size(); ++k) mask[k] = names.count(added_[k].content) ? 1 : 0;
  return mask;
}

void Tokenizer::set_template(std::vector<TemplateItem> single, std::vector<TemplateItem> pair) {
  single_ = std::move(single);
  pair_ = std::move(pair);
}

size_t Tokenizer::num_special_tokens(bool pair) const {
  size_t n = 0;
  for (const auto& item : pair ? pair_ : single_)
    if (!item.is_sequence) n += item.ids.size();
  return n;
}

// HF's two passes: the added tokens matched in the text as written (normalized=false) over the whole text, then
// those matched after normalization (normalized=true) inside each span the first pass left. (llmcore loads
// normalized=true tokens only where normalization leaves the text as it is.) A second-pass match sees its span's
// ends as the text's: single_word takes them for word boundaries, lstrip / rstrip stop at them.
void Tokenizer::split_added(std::string_view text, const std::vector<uint8_t>* skip, bool skip_restarts,
                            std::vector<Segment>& out) const {
  out.clear();
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  if (!added_normalized_) {
    match_added(s, 0, text.size(), false, skip, skip_restarts, out);
    return;
  }
  thread_local std::vector<Segment> first;  // (reused: no allocation per text)
  first.clear();
  match_added(s, 0, text.size(), false, skip, skip_restarts, first);
  for (const Segment& g : first) {
    if (g.added_id < 0) match_added(s, g.begin, g.end, true, skip, skip_restarts, out);
    else out.push_back(g);
  }
}

// The matches of one pass in s[begin, end), appended to out with the plain spans between them. Leftmost match,
// longest at that position; single_word / lstrip / rstrip as HF applies them: the matches are found first (the
// next one searched from the end of the last, refused or not), then a single_word match next to a word character
// is dropped, and lstrip / rstrip widen a kept one over the spaces beside it -- its rstrip can overlap the next
// match, which is kept too (HF's offsets then overlap), unless that one is lstrip.
void Tokenizer::match_added(const uint8_t* s, size_t begin, size_t end, bool normalized,
                            const std::vector<uint8_t>* skip, bool skip_restarts, std::vector<Segment>& out) const {
  const uint8_t pass = uint8_t(1u << normalized);
  size_t plain_begin = begin;
  if (!added_.empty()) {
    for (size_t i = begin; i < end; ++i) {
      if (!(added_first_[s[i]] & pass)) continue;
      size_t k = 0;
      while (k < added_.size() && !(added_[k].normalized == normalized && added_[k].content.size() <= end - i &&
                                    std::memcmp(s + i, added_[k].content.data(), added_[k].content.size()) == 0))
        ++k;
      if (k == added_.size()) continue;
      const AddedToken* hit = &added_[k];
      const size_t match_end = i + hit->content.size();
      if (skip && (*skip)[k]) {
        // not matched: its text is plain text. HF's matcher takes the span (no token starts inside it); tiktoken's
        // search goes on at the next byte
        if (!skip_restarts) i = match_end - 1;
        continue;
      }
      size_t start = i, stop = match_end;
      if (hit->single_word) {
        const bool word_before = start > begin && is_word_char(last_codepoint(s, start));
        size_t j = stop;
        const bool word_after = stop < end && is_word_char(decode_utf8(s, j));
        if (word_before || word_after) {
          i = match_end - 1;  // (the search goes on after the refused match)
          continue;
        }
      }
      if (hit->lstrip) {
        while (start > plain_begin) {
          size_t k = start - 1;
          while (k > begin && (s[k] & 0xC0) == 0x80) --k;
          size_t j = k;
          if (!(unicode_flags(decode_utf8(s, j)) & kSpace)) break;
          start = k;
        }
        start = std::max(start, plain_begin);  // (a match inside the last one's rstrip spaces: HF's max)
      }
      if (hit->rstrip)
        while (stop < end) {
          size_t j = stop;
          if (!(unicode_flags(decode_utf8(s, j)) & kSpace)) break;
          stop = j;
        }
      if (start >= stop) {
        // lstrip started it at or past its end (contents are never empty): no token, as HF drops the empty split
        // (where the last stop is past this one's, HF panics: "AddedVocabulary bad split")
        i = match_end - 1;
        continue;
      }
      if (start > plain_begin) out.push_back({uint32_t(plain_begin), uint32_t(start), -1});
      out.push_back({uint32_t(start), uint32_t(stop), hit->id});
      plain_begin = stop;
      i = match_end - 1;
    }
  }
  if (plain_begin < end) out.push_back({uint32_t(plain_begin), uint32_t(end), -1});
}

void Tokenizer::encode_plain(std::string_view text, uint32_t base, Encoding& out, Workspace& ws) const {
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  if (wordpiece_) {
    std::vector<Piece>& pieces = ws.pieces;
    BertSplitter(*bert_).split(s, text.size(), base, ws.bert, [&](const WordView& w) {
      pieces.clear();
      wordpiece_->encode_word(w.bytes, w.size, w.n_chars, pieces);
      for (const Piece& p : pieces) out.ids.push_back(p.id);
      if (ws.offsets)
        for (const Piece& p : pieces) {
          out.start.push_back(w.orig_start[p.start]);
          out.end.push_back(w.orig_end[p.end - 1]);
        }
    });
    return;
  }
  // Byte-level BPE. HF's add_prefix_space prepends a space unless there is one already;
  // the added space has no width in the original text.
  std::string& prefixed = ws.prefixed;
  size_t n = text.size();
  size_t shift = 0;
  if (add_prefix_space_ && (n == 0 || s[0] != ' ')) {
    if (n == 0) return;
    prefixed.assign(" ");
    prefixed.append(text);
    s = reinterpret_cast<const uint8_t*>(prefixed.data());
    n = prefixed.size();
    shift = 1;
  }
  size_t first_char_len = 0;
  if (shift) {
    const uint8_t lead = s[1];
    first_char_len = lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
  }
  for (size_t pos = 0; pos < n;) {
    const size_t end = next_piece(pattern_, reinterpret_cast<const char*>(s), n, pos);
    const size_t before = out.ids.size();
    bpe_->encode(s + pos, end - pos, out.ids);
    if (!ws.offsets) {
      pos = end;
      continue;
    }
    size_t at = pos;
    for (size_t k = before; k < out.ids.size(); ++k) {
      const std::string_view bytes = bpe_->token_bytes(out.ids[k]);
      // The added prefix space takes the first character's offsets, as in HF.
      uint32_t start = uint32_t(base + (at > shift ? at - shift : 0));
      uint32_t stop = uint32_t(base + (at + bytes.size() > shift ? at + bytes.size() - shift : first_char_len));
      if (trim_offsets_) {
        size_t lead = 0, trail = 0;
        while (lead < bytes.size() && bytes[lead] == ' ') ++lead;
        while (trail < bytes.size() && bytes[bytes.size() - 1 - trail] == ' ') ++trail;
        // As HF's ByteLevel post-processor: with its add_prefix_space, the first token (or
        // one starting the text) keeps a single leading space (more were not added: they go).
        const bool first = k == 0 || start == 0;
        // HF trims in characters: the added prefix space is the first character (first_char_len bytes).
        const size_t skip = at < shift ? first_char_len + lead - 1 : lead;
        if (lead > 0 && !(trim_keeps_first_ && first && lead == 1)) {
          start = std::min<uint32_t>(start + uint32_t(skip), stop);
          size_t e = at + bytes.size();
          if (start == stop && e > shift && e < n && (s[e] & 0xC0) == 0x80) {
            // trimmed to nothing at a stop inside a character (the prefix space and the first bytes of a
            // multi-byte one): HF, trimming in characters, leaves it empty at that character's end
            while (e < n && (s[e] & 0xC0) == 0x80) ++e;
            start = stop = uint32_t(base + e - shift);
          }
        }
        // HF trims in characters: a token of the added prefix space alone spans the first character (one
        // character, first_char_len bytes), which its trailing space takes away whole.
        if (trail > 0 && at + bytes.size() <= shift) stop = start;
        else if (trail > 0 && stop >= trail) stop = std::max<uint32_t>(stop - uint32_t(trail), start);
      }
      out.start.push_back(start);
      out.end.push_back(stop);
      at += bytes.size();
    }
    pos = end;
  }
}

// HF's ByteLevel offsets trim on an added token: its matched text (lstrip / rstrip spaces included) loses its
// leading and trailing White_Space, counted in characters; the first token of a text keeps a single leading one
// under add_prefix_space, as a BPE token does.
void Tokenizer::trim_added(const uint8_t* s, bool first, uint32_t& start, uint32_t& stop) const {
  size_t lead_end = start, lead = 0;
  while (lead_end < stop) {
    size_t j = lead_end;
    if (!(unicode_flags(decode_utf8(s, j)) & kSpace)) break;
    lead_end = j;
    ++lead;
  }
  size_t trail_begin = stop;
  while (trail_begin > start) {
    size_t k = trail_begin - 1;
    while (k > start && (s[k] & 0xC0) == 0x80) --k;
    size_t j = k;
    if (!(unicode_flags(decode_utf8(s, j)) & kSpace)) break;
    trail_begin = k;
  }
  if (lead > 0 && !(trim_keeps_first_ && first && lead == 1)) start = uint32_t(std::min<size_t>(lead_end, stop));
  if (trail_begin < stop) stop = uint32_t(std::max<size_t>(trail_begin, start));
}

void Tokenizer::encode_text(std::string_view text, Encoding& out, uint8_t from_pair, Workspace& ws) const {
  std::vector<Segment>& segments = ws.segments;
  split_added(text, ws.skip_added, ws.skip_restarts, segments);
  for (const Segment& seg : segments) {
    if (seg.added_id >= 0) {
      const bool first = out.ids.empty() || seg.begin == 0;
      out.ids.push_back(seg.added_id);
      if (ws.offsets) {
        uint32_t start = seg.begin, stop = seg.end;
        if (trim_offsets_) trim_added(reinterpret_cast<const uint8_t*>(text.data()), first, start, stop);
        out.start.push_back(start);
        out.end.push_back(stop);
      }
    } else {
      encode_plain(text.substr(seg.begin, seg.end - seg.begin), seg.begin, out, ws);
    }
  }
  if (ws.offsets) out.from_pair.resize(out.ids.size(), from_pair);
  out.type_ids.resize(out.ids.size(), 0);
}

void Tokenizer::encode(std::string_view text, const std::string_view* pair, const EncodeOptions& opt,
                       Encoding& out, Workspace& ws) const {
  out.clear();
  Encoding& a = ws.a;
  Encoding& b = ws.b;
  a.clear();
  b.clear();
  ws.offsets = opt.offsets;
  ws.skip_added = opt.skip_added;
  ws.skip_restarts = opt.skip_restarts;
  encode_text(text, a, 0, ws);
  if (pair) encode_text(*pair, b, 1, ws);

  if (opt.truncation) {
    const size_t specials = opt.add_special_tokens ? num_special_tokens(pair != nullptr) : 0;
    const size_t budget = opt.max_length > specials ? opt.max_length - specials : 0;
    size_t n1 = a.ids.size(), n2 = b.ids.size();
    if (!pair) {
      n1 = std::min(n1, budget);
    } else if (n1 + n2 > budget) {
      // HF's LongestFirst: shorten the longer sequence first, then both to half each.
      const bool swap = n1 > n2;
      if (swap) std::swap(n1, n2);
      n2 = n1 > budget ? n1 : std::max(n1, budget - n1);
      if (n1 + n2 > budget) {
        n1 = budget / 2;
        n2 = n1 + budget % 2;
      }
      if (swap) std::swap(n1, n2);
      n1 = std::min(n1, a.ids.size());
      n2 = std::min(n2, b.ids.size());
    }
    for (Encoding* e : {&a, &b}) {
      const size_t keep = e == &a ? n1 : n2;
      e->ids.resize(keep), e->type_ids.resize(keep);
      if (opt.offsets) e->start.resize(keep), e->end.resize(keep), e->from_pair.resize(keep);
    }
  }

  const std::vector<TemplateItem>& tmpl = pair ? pair_ : single_;
  auto append_seq = [&](const Encoding& e, uint8_t type_id) {
    out.ids.insert(out.ids.end(), e.ids.begin(), e.ids.end());
    out.type_ids.insert(out.type_ids.end(), e.ids.size(), type_id);
    out.start.insert(out.start.end(), e.start.begin(), e.start.end());
    out.end.insert(out.end.end(), e.end.begin(), e.end.end());
    out.from_pair.insert(out.from_pair.end(), e.from_pair.begin(), e.from_pair.end());
    if (opt.special_mask) out.special.insert(out.special.end(), e.ids.size(), 0);
  };
  if (tmpl.empty()) {  // no post-processor: the sequences, the pair's with type id 1
    append_seq(a, 0);
    if (pair) append_seq(b, 1);
    return;
  }
  for (const TemplateItem& item : tmpl) {
    if (item.is_sequence) {
      append_seq(item.sequence == 0 ? a : b, item.type_id);
    } else if (opt.add_special_tokens) {
      for (int32_t id : item.ids) {
        out.ids.push_back(id);
        out.type_ids.push_back(item.type_id);
        if (opt.special_mask) out.special.push_back(1);
        if (opt.offsets) {
          out.start.push_back(0);
          out.end.push_back(0);
          out.from_pair.push_back(0);
        }
      }
    }
  }
}

std::string Tokenizer::decode(const int32_t* ids, size_t n, bool skip_special_tokens) const {
  std::string out;
  bool first = true;
  const std::string& prefix = wordpiece_ ? wordpiece_->continuing_prefix() : std::string();
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = ids[i];
    std::string_view text;
    bool special = false;
    if (id >= 0 && size_t(id) < decode_text_.size() && !decode_text_[id].empty()) {
      text = decode_text_[id];
      special = decode_special_[id];
    } else if (bpe_ && !bpe_->token_bytes(id).empty()) {
      text = bpe_->token_bytes(id);
    } else {
      throw std::out_of_range("decode: unknown token id " + std::to_string(id));
    }
    if (skip_special_tokens && special) continue;
    if (!wordpiece_) {
      out.append(text);
      continue;
    }
    std::string token(text);
    if (!first) {
      // (an empty prefix starts every token, as in HF's decoder: the tokens are joined without spaces)
      if (token.compare(0, prefix.size(), prefix) == 0)
        token.erase(0, prefix.size());
      else
        token.insert(0, " ");
    }
    if (decoder_cleanup_) cleanup(token);
    out += token;
    first = false;
  }
  return out;
}

}  // namespace llmcore::tok
