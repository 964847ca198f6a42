#include "tokenizer/bpe.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>

// The short-key packing below (load_short) assumes little-endian loads.
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "bpe.cpp assumes a little-endian target"
#endif

namespace llmcore::tok {
namespace {

// A merge candidate packed as (rank << 32) | merged_id; kNoMerge (all ones) when the pair
// does not merge. Comparing packed values compares ranks first. Equal ranks imply equal
// merged ids (tiktoken: rank == id; HF: one pair per rank), so "smallest packed value,
// leftmost on ties" is exactly "lowest rank, leftmost on ties".
constexpr uint64_t kNoMerge = ~uint64_t{0};
constexpr uint32_t kNoRank = uint32_t(kNoMerge >> 32);  // the rank half of kNoMerge (real ranks are below it)
constexpr uint32_t kAbsent = std::numeric_limits<uint32_t>::max();  // tok_len_ of an unused id

// Pieces up to this length merge by rescanning a stack array (O(n^2), tiny constants);
// longer ones use the heap + linked list (O(n log n)). Measured crossover: ~64 bytes for
// runs of one byte, ~200 for random letters.
constexpr size_t kRescanMax = 96;

inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint64_t load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t load16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// The bytes of a string of 1..8 bytes as a zero-padded little-endian word, without reading
// past the end. The overlapping loads cover the same bytes with the same values, so OR-ing
// them is exact. Together with the length this is an exact key.
inline uint64_t load_short(const uint8_t* p, size_t n) {
  if (n >= 4) return load32(p) | (load32(p + n - 4) << (8 * (n - 4)));
  if (n >= 2) return load16(p) | (load16(p + n - 2) << (8 * (n - 2)));
  return p[0];
}

inline uint64_t mix(uint64_t h) {
  h ^= h >> 32;
  h *= 0xd6e8feb86659fd93ull;
  h ^= h >> 32;
  return h;
}

// Hash of a byte string longer than 8 bytes (the tail is read as the last 8 bytes, which
// overlap the previous word; the length is mixed in, so this stays a function of the bytes).
inline uint64_t hash_long(const uint8_t* p, size_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ n;
  size_t i = 0;
  for (; i + 8 < n; i += 8) h = mix(h ^ load64(p + i)) * 0xbf58476d1ce4e5b9ull;
  return mix(h ^ load64(p + n - 8));
}

inline uint64_t hash_short(uint64_t word, size_t n) { return mix(word * 0x9e3779b97f4a7c15ull + n); }

// log2 of a power-of-two table size for `count` entries at load factor <= 1/2 (keeps
// linear probes short).
int table_bits(size_t count) {
  int bits = 4;
  while ((size_t{1} << bits) < 2 * count) ++bits;
  return bits;
}

// Printable form of token bytes for error messages.
std::string show(std::string_view s) {
  static const char* kHex = "0123456789abcdef";
  std::string r = "'";
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'') {
      r += char(c);
    } else {
      r += "\\x";
      r += kHex[c >> 4];
      r += kHex[c & 15];
    }
  }
  return r + "'";
}

}  // namespace

struct BytePairEncoder::Impl {
  // Byte string -> id, open addressing with linear probing. Strings of <= 8 bytes are keyed
  // exactly by their packed word; longer ones by their 64-bit hash, confirmed with memcmp.
  struct TokenSlot {
    uint64_t key;
    uint32_t len;
    int32_t id;  // -1: empty slot
  };
  // (left id, right id) -> packed merge, open addressing with linear probing. Most lookups are of pairs that do
  // not merge (~75% on Chinese text with cl100k), so a byte of tags per slot, 1/16 of the slots' size (512 KiB for
  // cl100k's 8 MiB), is probed first: a pair that does not merge is then found absent in the tags alone, which stay
  // in L2, and only a tag match reads its slot.
  struct PairSlot {
    uint64_t key;  // (left << 32) | right (ids are < 2^31)
    uint64_t merge;
  };

  std::string blob_;                // all token bytes, contiguous
  std::vector<uint32_t> tok_off_;   // by id: offset into blob_
  std::vector<uint32_t> tok_len_;   // by id: length, kAbsent for ids without a token
  std::vector<TokenSlot> tokens_;
  uint64_t token_mask_ = 0;
  std::vector<PairSlot> pairs_;
  std::vector<uint8_t> pair_tags_;  // by slot: 0 empty, else kTagUsed | 7 bits of the key's hash (pair_probe)
  uint64_t pair_mask_ = 0;
  int pair_shift_ = 0;
  int32_t byte_id_[256];
  bool whole_piece_first_ = false;  // emit a piece that is itself a token without merging

  // ---- construction -------------------------------------------------------------------

  // Stores the tokens and builds the byte-string table; throws on repeats and on missing
  // single bytes. `vocab` entries are (bytes, id) with id >= 0.
  void build_tokens(std::vector<std::pair<std::string, int32_t>>& vocab) {
    int32_t max_id = -1;
    size_t total = 0;
    for (const auto& [bytes, id] : vocab) {
      if (id < 0) throw std::invalid_argument("BPE vocab: negative id " + std::to_string(id) + " for " + show(bytes));
      max_id = std::max(max_id, id);
      total += bytes.size();
    }
    if (total >= kAbsent) throw std::invalid_argument("BPE vocab: token bytes exceed 4 GiB");
    blob_.reserve(total);
    tok_off_.assign(size_t(max_id) + 1, 0);
    tok_len_.assign(size_t(max_id) + 1, kAbsent);
    tokens_.assign(size_t{1} << table_bits(vocab.size()), TokenSlot{0, 0, -1});
    token_mask_ = tokens_.size() - 1;
    for (auto& [bytes, id] : vocab) {
      if (tok_len_[id] != kAbsent) {
        throw std::invalid_argument("BPE vocab: id " + std::to_string(id) + " given to both " +
                                    show(token_bytes(id)) + " and " + show(bytes));
      }
      if (find(bytes) >= 0) throw std::invalid_argument("BPE vocab: duplicate token bytes " + show(bytes));
      tok_off_[id] = uint32_t(blob_.size());
      tok_len_[id] = uint32_t(bytes.size());
      blob_ += bytes;
      const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
      const size_t n = bytes.size();
      const uint64_t key = token_key(p, n);
      uint64_t h = token_home(key, n);
      while (tokens_[h].id >= 0) h = (h + 1) & token_mask_;
      tokens_[h] = TokenSlot{key, uint32_t(n), id};
      std::string().swap(bytes);  // the bytes now live in blob_
    }
    for (int b = 0; b < 256; ++b) {
      const char c = char(b);
      byte_id_[b] = find(std::string_view(&c, 1));
      if (byte_id_[b] < 0) throw std::invalid_argument("BPE vocab: missing single byte " + show({&c, 1}));
    }
  }

  void init_pairs(size_t count) {
    const int bits = table_bits(count);
    if (bits > 56) throw std::length_error("BPE: too many merges");  // (pair_probe takes its tag below the slot bits)
    pairs_.assign(size_t{1} << bits, PairSlot{0, kNoMerge});
    pair_tags_.assign(size_t{1} << bits, 0);
    pair_mask_ = pairs_.size() - 1;
    pair_shift_ = 64 - bits;
  }

  // Inserts or overwrites (HF keeps the last of repeated merges).
  void put_pair(int32_t left, int32_t right, uint64_t merge) {
    const uint64_t key = pair_key(left, right);
    auto [h, tag] = pair_probe(key);
    while (pair_tags_[h] != 0 && pairs_[h].key != key) h = (h + 1) & pair_mask_;
    pair_tags_[h] = tag;
    pairs_[h] = PairSlot{key, merge};
  }

  // ---- lookups ------------------------------------------------------------------------

  static uint64_t pair_key(int32_t left, int32_t right) { return (uint64_t(uint32_t(left)) << 32) | uint32_t(right); }

  // A key's home slot (the hash's top bits) and its tag (the 7 bits below them, with kTagUsed set).
  static constexpr uint8_t kTagUsed = 0x80;
  std::pair<uint64_t, uint8_t> pair_probe(uint64_t key) const {
    const uint64_t h = key * 0x9e3779b97f4a7c15ull;
    return {h >> pair_shift_, uint8_t(kTagUsed | ((h >> (pair_shift_ - 7)) & 0x7f))};
  }

  uint64_t pair_merge(int32_t left, int32_t right) const {
    const uint64_t key = pair_key(left, right);
    auto [h, tag] = pair_probe(key);
    for (;; h = (h + 1) & pair_mask_) {
      const uint8_t t = pair_tags_[h];
      if (t == 0) return kNoMerge;
      if (t == tag && pairs_[h].key == key) return pairs_[h].merge;
    }
  }

  // TokenSlot::key of a byte string, and its first probe slot.
  static uint64_t token_key(const uint8_t* p, size_t n) {
    return n <= 8 ? (n ? load_short(p, n) : 0) : hash_long(p, n);
  }
  uint64_t token_home(uint64_t key, size_t n) const { return (n <= 8 ? hash_short(key, n) : key) & token_mask_; }

  int32_t find(const uint8_t* p, size_t n) const {
    const uint64_t key = token_key(p, n);
    for (uint64_t h = token_home(key, n);; h = (h + 1) & token_mask_) {
      const TokenSlot& s = tokens_[h];
      if (s.id < 0) return -1;
      // Short keys are exact; long ones are hashes and need the bytes compared.
      if (s.key == key && s.len == n && (n <= 8 || std::memcmp(blob_.data() + tok_off_[s.id], p, n) == 0)) return s.id;
    }
  }
  int32_t find(std::string_view s) const { return find(reinterpret_cast<const uint8_t*>(s.data()), s.size()); }

  std::string_view token_bytes(int32_t id) const {
    if (id < 0 || size_t(id) >= tok_len_.size() || tok_len_[id] == kAbsent) return {};
    return std::string_view(blob_.data() + tok_off_[id], tok_len_[id]);
  }

  // ---- merging ------------------------------------------------------------------------

  // Rescan merge of piece[0, n): ids/ranks/merged are caller scratch of n entries each. Each round merges the
  // leftmost lowest-rank pair and re-derives the two pairs it touched. The ranks are scanned apart from the merged
  // ids, as 32-bit values: first their minimum (a reduction the compiler vectorizes; the branchy "smallest so far"
  // scan of packed 64-bit merges mispredicted on Chinese text, ~40% of its time), then its first position, which
  // is the leftmost of the lowest rank (equal ranks are one pair, so one merged id).
  void merge_rescan(const uint8_t* piece, size_t n, int32_t* ids, uint32_t* ranks, int32_t* merged,
                    std::vector<int32_t>& out) const {
    const auto set = [&](size_t i) {
      const uint64_t m = pair_merge(ids[i], ids[i + 1]);
      ranks[i] = uint32_t(m >> 32);
      merged[i] = int32_t(uint32_t(m));
    };
    for (size_t i = 0; i < n; ++i) ids[i] = byte_id_[piece[i]];
    for (size_t i = 0; i + 1 < n; ++i) set(i);
    size_t m = n;  // live parts; ranks[i], merged[i] are the pair (ids[i], ids[i + 1]) for i < m - 1
    while (m > 1) {
      uint32_t lowest = ranks[0];
      for (size_t i = 1; i + 1 < m; ++i) lowest = std::min(lowest, ranks[i]);
      if (lowest == kNoRank) break;
      size_t best = 0;
      while (ranks[best] != lowest) ++best;
      ids[best] = merged[best];
      std::memmove(ids + best + 1, ids + best + 2, (m - best - 2) * sizeof(int32_t));
      std::memmove(ranks + best + 1, ranks + best + 2, (m - best - 2) * sizeof(uint32_t));
      std::memmove(merged + best + 1, merged + best + 2, (m - best - 2) * sizeof(int32_t));
      --m;
      if (best + 1 < m) set(best);
      if (best > 0) set(best - 1);
    }
    out.insert(out.end(), ids, ids + m);
  }

  // Heap merge of piece[0, n): parts form a linked list indexed by their first byte; the
  // heap holds (rank << 32 | position) entries, so it pops the lowest rank, leftmost first.
  // An entry is stale once merge[position] no longer carries its rank: a part's pair only
  // changes by growing (the part absorbs its right neighbour or the neighbour grows), and a
  // longer concatenation never has the same rank, so a rank match means the pair is current.
  void merge_heap(const uint8_t* piece, size_t n, std::vector<int32_t>& out) const {
    if (n >= kAbsent) throw std::length_error("BPE: piece longer than 4 GiB");
    std::vector<int32_t> ids(n);
    std::vector<uint32_t> next(n), prev(n);
    std::vector<uint64_t> merge(n, kNoMerge);  // merge[i]: pair (part i, next part); kNoMerge if none or dead
    std::vector<uint64_t> heap;
    heap.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      ids[i] = byte_id_[piece[i]];
      next[i] = uint32_t(i + 1);  // n == end of list
      prev[i] = uint32_t(i - 1);  // kAbsent (wrapped) == start of list
    }
    const auto refresh = [&](uint32_t i) {
      merge[i] = next[i] < n ? pair_merge(ids[i], ids[next[i]]) : kNoMerge;
      if (merge[i] != kNoMerge) {
        heap.push_back((merge[i] & 0xffffffff00000000ull) | i);
        std::push_heap(heap.begin(), heap.end(), std::greater<>());
      }
    };
    for (size_t i = 0; i + 1 < n; ++i) {
      merge[i] = pair_merge(ids[i], ids[i + 1]);
      if (merge[i] != kNoMerge) heap.push_back((merge[i] & 0xffffffff00000000ull) | i);
    }
    std::make_heap(heap.begin(), heap.end(), std::greater<>());
    while (!heap.empty()) {
      const uint64_t top = heap.front();
      std::pop_heap(heap.begin(), heap.end(), std::greater<>());
      heap.pop_back();
      const uint32_t i = uint32_t(top);
      if ((merge[i] >> 32) != (top >> 32)) continue;  // stale
      const uint32_t right = next[i];
      ids[i] = int32_t(uint32_t(merge[i]));
      next[i] = next[right];
      if (next[i] < n) prev[next[i]] = i;
      merge[right] = kNoMerge;
      refresh(i);
      if (prev[i] != kAbsent) refresh(prev[i]);
    }
    for (size_t i = 0; i < n; i = next[i]) out.push_back(ids[i]);
  }

  void encode(const uint8_t* piece, size_t n, std::vector<int32_t>& out) const {
    if (n == 1) {
      out.push_back(byte_id_[piece[0]]);
      return;
    }
    if (whole_piece_first_) {
      const int32_t id = find(piece, n);
      if (id >= 0) {
        out.push_back(id);
        return;
      }
    }
    if (n <= kRescanMax) {
      int32_t ids[kRescanMax], merged[kRescanMax];
      uint32_t ranks[kRescanMax];
      merge_rescan(piece, n, ids, ranks, merged, out);
    } else {
      merge_heap(piece, n, out);
    }
  }
};

BytePairEncoder BytePairEncoder::from_ranks(std::vector<std::string> tokens) {
  if (tokens.size() > size_t(std::numeric_limits<int32_t>::max()))
    throw std::invalid_argument("BPE ranks: more than 2^31 - 1 tokens");
  std::vector<std::pair<std::string, int32_t>> vocab;
  vocab.reserve(tokens.size());
  for (size_t r = 0; r < tokens.size(); ++r) vocab.emplace_back(std::move(tokens[r]), int32_t(r));
  tokens = {};
  auto impl = std::make_unique<Impl>();
  impl->build_tokens(vocab);
  impl->whole_piece_first_ = true;

  // tiktoken merges two adjacent parts whenever their concatenation is a token; parts are
  // always tokens, so every such merge is a split of some token into two tokens. Enumerate
  // all splits once; each (left, right) pair concatenates to exactly one token.
  // Only splits into two lengths some token has are looked up: each lookup hashes its part, so a file with one
  // long token (1 MB: a probe) took time quadratic in its length, ~8 minutes, where its splits need none.
  const int32_t count = int32_t(impl->tok_len_.size());
  std::vector<bool> has_length;
  for (int32_t t = 0; t < count; ++t) {
    const size_t len = impl->token_bytes(t).size();
    if (len >= has_length.size()) has_length.resize(len + 1, false);
    has_length[len] = true;
  }
  std::vector<uint64_t> splits;  // (left, right, token) collected first to size the table
  std::vector<int32_t> split_tok;
  for (int32_t t = 0; t < count; ++t) {
    const std::string_view s = impl->token_bytes(t);
    for (size_t k = 1; k < s.size(); ++k) {
      if (!has_length[k] || !has_length[s.size() - k]) continue;
      const int32_t l = impl->find(s.substr(0, k));
      if (l < 0) continue;
      const int32_t r = impl->find(s.substr(k));
      if (r < 0) continue;
      splits.push_back((uint64_t(uint32_t(l)) << 32) | uint32_t(r));
      split_tok.push_back(t);
    }
  }
  impl->init_pairs(splits.size());
  for (size_t i = 0; i < splits.size(); ++i) {
    const uint64_t t = uint32_t(split_tok[i]);
    impl->put_pair(int32_t(splits[i] >> 32), int32_t(uint32_t(splits[i])), (t << 32) | t);
  }
  return BytePairEncoder(std::move(impl));
}

BytePairEncoder BytePairEncoder::from_merges(std::vector<std::pair<std::string, int32_t>> vocab,
                                             std::vector<std::pair<std::string, std::string>> merges,
                                             bool ignore_merges) {
  if (merges.size() >= size_t(std::numeric_limits<uint32_t>::max()))
    throw std::invalid_argument("BPE merges: too many merges");
  auto impl = std::make_unique<Impl>();
  impl->build_tokens(vocab);
  impl->whole_piece_first_ = ignore_merges;
  impl->init_pairs(merges.size());
  std::string joined;
  for (size_t i = 0; i < merges.size(); ++i) {
    const auto& [a, b] = merges[i];
    const auto where = [&] { return "BPE merge #" + std::to_string(i) + " (" + show(a) + ", " + show(b) + "): "; };
    const int32_t l = impl->find(a);
    if (l < 0) throw std::invalid_argument(where() + "left part " + show(a) + " is not in the vocab");
    const int32_t r = impl->find(b);
    if (r < 0) throw std::invalid_argument(where() + "right part " + show(b) + " is not in the vocab");
    joined.assign(a).append(b);
    const int32_t m = impl->find(joined);
    if (m < 0) throw std::invalid_argument(where() + "merged token " + show(joined) + " is not in the vocab");
    impl->put_pair(l, r, (uint64_t(i) << 32) | uint32_t(m));
  }
  return BytePairEncoder(std::move(impl));
}

BytePairEncoder::BytePairEncoder(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BytePairEncoder::BytePairEncoder(BytePairEncoder&&) noexcept = default;
BytePairEncoder& BytePairEncoder::operator=(BytePairEncoder&&) noexcept = default;
BytePairEncoder::~BytePairEncoder() = default;

void BytePairEncoder::encode(const uint8_t* piece, size_t n, std::vector<int32_t>& out) const {
  impl_->encode(piece, n, out);
}

std::string_view BytePairEncoder::token_bytes(int32_t id) const { return impl_->token_bytes(id); }

int32_t BytePairEncoder::find(std::string_view bytes) const { return impl_->find(bytes); }

}  // namespace llmcore::tok
