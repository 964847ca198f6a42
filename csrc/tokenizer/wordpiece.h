// WordPiece: greedy longest-match-first over a byte trie, with HF tokenizers' rules: a
// word longer than max_input_chars_per_word, or one with any piece missing from the vocab,
// becomes the unknown token as a whole.
//
// HF shrinks each candidate one character at a time (quadratic per word); walking a trie
// finds the same longest match in one pass over at most the longest token's bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace llmcore::tok {

struct Piece {
  int32_t id;
  uint32_t start;  // byte range inside the word
  uint32_t end;
};

class WordPiece {
 public:
  // Throws std::invalid_argument on duplicate tokens/ids or an unknown unk_token.
  WordPiece(std::vector<std::pair<std::string, int32_t>> vocab, const std::string& unk_token,
            std::string continuing_prefix, size_t max_input_chars_per_word);

  // Appends the pieces of one normalized word w[0, n) holding n_chars code points.
  void encode_word(const uint8_t* w, size_t n, size_t n_chars, std::vector<Piece>& out) const;

  int32_t unk_id() const { return unk_id_; }
  const std::string& continuing_prefix() const { return prefix_; }

 private:
  static constexpr uint32_t kNoChild = 0xFFFFFFFFu;
  uint32_t child(uint32_t node, uint8_t byte) const;
  uint32_t add_child(uint32_t node, uint8_t byte);
  void insert(uint32_t root, std::string_view bytes, int32_t id);
  // Longest vocab match of w[start, n) from `root`: sets id/end, false when none.
  bool longest_match(uint32_t root, const uint8_t* w, size_t start, size_t n, int32_t& id, size_t& end) const;

  std::vector<int32_t> node_id_;       // token id ending at each node, or -1
  std::vector<uint64_t> edge_keys_;    // open addressing: (node << 8 | byte) + 1, 0 = empty
  std::vector<uint32_t> edge_child_;
  size_t edges_ = 0;
  uint32_t root_first_ = 0;            // tokens that may start a word (the whole vocab)
  uint32_t root_next_ = 0;             // continuation tokens, with the prefix removed
  int32_t unk_id_ = -1;
  std::string prefix_;
  size_t max_chars_;
};

}  // namespace llmcore::tok
