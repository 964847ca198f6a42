// The tokenizer pipeline: added tokens -> normalizer + pre-tokenizer -> model ->
// truncation -> post-processing template, for one text or pair, with original byte
// offsets. A Tokenizer is immutable once built and safe to share between threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tokenizer/bert.h"
#include "tokenizer/bpe.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/wordpiece.h"

namespace llmcore::tok {

struct AddedToken {
  std::string content;
  int32_t id;
  bool special = false;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;  // matched in HF's second pass, inside the spans the first pass left
};

// One element of a post-processing template: a special token (its ids) or sequence A/B.
struct TemplateItem {
  bool is_sequence;
  int sequence;                // 0 = A, 1 = B (is_sequence)
  std::vector<int32_t> ids;    // the special token's ids (!is_sequence)
  uint8_t type_id;
};

// Tokens of one text (or pair) with byte offsets into the original text it came from.
struct Encoding {
  std::vector<int32_t> ids;
  std::vector<uint8_t> type_ids;
  std::vector<uint32_t> start, end;   // byte offsets; special tokens from templates: 0, 0
  std::vector<uint8_t> from_pair;     // 1 where the offsets refer to the pair's second text
  std::vector<uint8_t> special;       // 1 at the template's special tokens (when EncodeOptions::special_mask)
  void clear() {
    ids.clear(), type_ids.clear(), start.clear(), end.clear(), from_pair.clear(), special.clear();
  }
};

struct EncodeOptions {
  bool add_special_tokens = true;
  bool truncation = false;
  size_t max_length = 0;  // with truncation
  bool offsets = true;    // fill Encoding::start/end/from_pair (else they stay empty)
  bool special_mask = false;  // fill Encoding::special (else it stays empty)
  // Per added token (Tokenizer::added_skip_mask), 1 where it is not matched in the text: its text is encoded as
  // plain text (HF's encode_special_tokens, tiktoken's specials not allowed). Null: every added token is matched.
  const std::vector<uint8_t>* skip_added = nullptr;
  // Where a skipped token is the leftmost-longest match, the search goes on at the next byte (tiktoken's); else
  // after its text (HF's matcher: no added token starts inside it).
  bool skip_restarts = false;
};

class Tokenizer {
 public:
  struct Segment {
    uint32_t begin, end;  // text range, or the added token's match range
    int32_t added_id;     // -1 for plain text
  };
  // Per-thread scratch memory of encode(), reused from call to call.
  struct Workspace {
    BertSplitter::Scratch bert;
    std::vector<Piece> pieces;
    std::string prefixed;
    std::vector<Segment> segments;
    Encoding a, b;
    bool offsets = true;  // the current call's EncodeOptions::offsets
    const std::vector<uint8_t>* skip_added = nullptr;  // and its skip_added, skip_restarts
    bool skip_restarts = false;
  };

  static Tokenizer wordpiece(WordPiece model, std::optional<BertOptions> bert, bool decoder_cleanup);
  static Tokenizer byte_level_bpe(BytePairEncoder model, Pattern pattern, bool add_prefix_space);

  // The text decode() gives an id (WordPiece vocab entries; added tokens are registered by
  // set_added_tokens; BPE ids decode to their bytes without this).
  void set_token_text(int32_t id, std::string_view text, bool special);

  // Added tokens are matched in the raw text before normalization (leftmost, then longest).
  void set_added_tokens(std::vector<AddedToken> tokens);
  // EncodeOptions::skip_added for the added tokens whose content is one of `contents` (others are not flagged).
  std::vector<uint8_t> added_skip_mask(const std::vector<std::string>& contents) const;
  void set_template(std::vector<TemplateItem> single, std::vector<TemplateItem> pair);
  // HF's ByteLevel post-processor trim_offsets: BPE token offsets exclude leading and
  // trailing spaces; with keep_first (its add_prefix_space), not the first token's leading ones.
  void set_trim_offsets(bool on, bool keep_first) {
    trim_offsets_ = on;
    trim_keeps_first_ = keep_first;
  }

  // Encodes a text, or a pair when `pair` is non-null, into `out` (cleared first).
  void encode(std::string_view text, const std::string_view* pair, const EncodeOptions& opt, Encoding& out,
              Workspace& ws) const;

  // Ids -> text bytes (UTF-8 for WordPiece; raw token bytes for BPE, for the caller to
  // decode leniently). Throws std::out_of_range naming an unknown id.
  std::string decode(const int32_t* ids, size_t n, bool skip_special_tokens) const;

  // Special tokens the template adds around one text (pair = false) or a pair.
  size_t num_special_tokens(bool pair) const;
  bool is_wordpiece() const { return wordpiece_.has_value(); }

 private:
  Tokenizer() = default;
  void split_added(std::string_view text, const std::vector<uint8_t>* skip, bool skip_restarts,
                   std::vector<Segment>& out) const;
  void match_added(const uint8_t* s, size_t begin, size_t end, bool normalized, const std::vector<uint8_t>* skip,
                   bool skip_restarts, std::vector<Segment>& out) const;
  void encode_text(std::string_view text, Encoding& out, uint8_t from_pair, Workspace& ws) const;
  void encode_plain(std::string_view text, uint32_t base, Encoding& out, Workspace& ws) const;
  void trim_added(const uint8_t* s, bool first, uint32_t& start, uint32_t& stop) const;

  std::optional<WordPiece> wordpiece_;
  std::optional<BertOptions> bert_;
  bool decoder_cleanup_ = false;
  std::optional<BytePairEncoder> bpe_;
  Pattern pattern_ = Pattern::gpt2;
  bool add_prefix_space_ = false;
  bool trim_offsets_ = false;
  bool trim_keeps_first_ = false;

  std::vector<AddedToken> added_;        // sorted by content for matching
  std::vector<uint8_t> added_first_;     // 256 bit sets: bit p, the byte can start an added token of pass p
  bool added_normalized_ = false;        // some added token is normalized=true (HF's second pass has work)
  // Decoding: the text (WordPiece) or bytes (BPE) of every id, and which are special.
  std::vector<std::string> decode_text_;
  std::vector<uint8_t> decode_special_;
  std::vector<TemplateItem> single_, pair_;
};

}  // namespace llmcore::tok
