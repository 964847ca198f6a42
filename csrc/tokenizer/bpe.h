// Byte-level BPE over raw bytes: tiktoken's rank semantics or HF's merge-list semantics.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace llmcore::tok {

class BytePairEncoder {
 public:
  // tiktoken: tokens[rank] are the token bytes; id = rank. Any two adjacent parts whose
  // concatenation is a token may merge; the lowest rank merges first (leftmost on ties).
  // A piece that is itself a token is emitted whole. Throws std::invalid_argument when a
  // byte string repeats or one of the 256 single bytes is missing.
  static BytePairEncoder from_ranks(std::vector<std::string> tokens);

  // HF tokenizers' BPE model: vocab (bytes, id) and an ordered merge list of (left, right)
  // byte strings; merge i has priority i and yields vocab[left + right]. ignore_merges:
  // a piece found whole in the vocab is emitted directly (Llama-3). Throws
  // std::invalid_argument naming the bad entry when a merge's parts or result are missing.
  static BytePairEncoder from_merges(std::vector<std::pair<std::string, int32_t>> vocab,
                                     std::vector<std::pair<std::string, std::string>> merges, bool ignore_merges);

  BytePairEncoder(BytePairEncoder&&) noexcept;
  BytePairEncoder& operator=(BytePairEncoder&&) noexcept;
  ~BytePairEncoder();

  // Appends the ids of one pre-tokenized piece (n >= 1 bytes). Thread-safe (const).
  // Worst case O(n log n): a 1 MB piece of one repeated byte must take well under 1 s.
  void encode(const uint8_t* piece, size_t n, std::vector<int32_t>& out) const;

  // Bytes of a token id; empty if the id is unknown.
  std::string_view token_bytes(int32_t id) const;
  // Id of an exact byte string, or -1.
  int32_t find(std::string_view bytes) const;

 private:
  struct Impl;
  explicit BytePairEncoder(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace llmcore::tok
