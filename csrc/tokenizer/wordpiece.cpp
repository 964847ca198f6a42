#include "tokenizer/wordpiece.h"

#include <cstdint>
#include <stdexcept>
#include <unordered_set>

namespace llmcore::tok {
namespace {

inline uint64_t mix(uint64_t key) {
  key *= 0x9E3779B97F4A7C15ull;
  return key ^ (key >> 29);
}

}  // namespace

WordPiece::WordPiece(std::vector<std::pair<std::string, int32_t>> vocab, const std::string& unk_token,
                     std::string continuing_prefix, size_t max_input_chars_per_word)
    : prefix_(std::move(continuing_prefix)), max_chars_(max_input_chars_per_word) {
  size_t total_bytes = 0;
  for (const auto& [token, id] : vocab) total_bytes += token.size();
  size_t cap = 64;
  while (cap < 2 * (total_bytes + 16)) cap <<= 1;
  edge_keys_.assign(cap, 0);
  edge_child_.assign(cap, 0);
  node_id_.reserve(total_bytes / 2 + 2);
  node_id_.push_back(-1);
  node_id_.push_back(-1);
  root_first_ = 0;
  root_next_ = 1;

  std::unordered_set<int32_t> ids;
  std::unordered_set<std::string_view> seen;
  for (const auto& [token, id] : vocab) {
    if (token.empty()) throw std::invalid_argument("WordPiece vocab: empty token (id " + std::to_string(id) + ")");
    if (id < 0) throw std::invalid_argument("WordPiece vocab: negative id for token '" + token + "'");
    if (!ids.insert(id).second) throw std::invalid_argument("WordPiece vocab: id " + std::to_string(id) + " repeats");
    if (!seen.insert(token).second) throw std::invalid_argument("WordPiece vocab: token '" + token + "' repeats");
    insert(root_first_, token, id);
    if (!prefix_.empty() && token.size() > prefix_.size() && token.compare(0, prefix_.size(), prefix_) == 0)
      insert(root_next_, std::string_view(token).substr(prefix_.size()), id);
    if (token == unk_token) unk_id_ = id;
  }
  if (prefix_.empty()) root_next_ = root_first_;  // HF looks continuations up unprefixed then
  if (unk_id_ < 0) throw std::invalid_argument("WordPiece: unk_token '" + unk_token + "' is not in the vocab");
}

uint32_t WordPiece::child(uint32_t node, uint8_t byte) const {
  const uint64_t key = ((uint64_t(node) << 8) | byte) + 1;
  const size_t mask = edge_keys_.size() - 1;
  for (size_t slot = mix(key) & mask;; slot = (slot + 1) & mask) {
    const uint64_t k = edge_keys_[slot];
    if (k == key) return edge_child_[slot];
    if (k == 0) return kNoChild;
  }
}

uint32_t WordPiece::add_child(uint32_t node, uint8_t byte) {
  const uint64_t key = ((uint64_t(node) << 8) | byte) + 1;
  const size_t mask = edge_keys_.size() - 1;
  size_t slot = mix(key) & mask;
  for (; edge_keys_[slot] != 0; slot = (slot + 1) & mask)
    if (edge_keys_[slot] == key) return edge_child_[slot];
  // Capacity is twice the vocab's bytes, an upper bound on the edge count: never full.
  edge_keys_[slot] = key;
  edge_child_[slot] = uint32_t(node_id_.size());
  node_id_.push_back(-1);
  ++edges_;
  return edge_child_[slot];
}

void WordPiece::insert(uint32_t root, std::string_view bytes, int32_t id) {
  uint32_t node = root;
  for (unsigned char b : bytes) node = add_child(node, b);
  node_id_[node] = id;
}

bool WordPiece::longest_match(uint32_t root, const uint8_t* w, size_t start, size_t n, int32_t& id,
                              size_t& end) const {
  bool found = false;
  uint32_t node = root;
  for (size_t i = start; i < n; ++i) {
    node = child(node, w[i]);
    if (node == kNoChild) break;
    // Vocab entries are whole UTF-8 strings, so a match always ends on a character boundary.
    if (node_id_[node] >= 0) {
      id = node_id_[node];
      end = i + 1;
      found = true;
    }
  }
  return found;
}

void WordPiece::encode_word(const uint8_t* w, size_t n, size_t n_chars, std::vector<Piece>& out) const {
  if (n == 0) return;
  if (n_chars > max_chars_) {
    out.push_back({unk_id_, 0, uint32_t(n)});
    return;
  }
  const size_t first = out.size();
  size_t start = 0;
  while (start < n) {
    int32_t id;
    size_t end;
    if (!longest_match(start == 0 ? root_first_ : root_next_, w, start, n, id, end)) {
      out.resize(first);
      out.push_back({unk_id_, 0, uint32_t(n)});
      return;
    }
    out.push_back({id, uint32_t(start), uint32_t(end)});
    start = end;
  }
}

}  // namespace llmcore::tok
