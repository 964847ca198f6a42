// Batch encoding on native threads, in two steps so that the caller can size its output
// arrays in between: encode_batch stages every text's tokens in blocks; write_* copies
// them into row-major arrays and frees each block once copied, so the peak extra memory
// stays near one copy of the output.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace llmcore::tok {

struct StagedBatch {
  struct Block {
    size_t first_text = 0, count = 0;
    std::vector<int32_t> ids;
    std::vector<uint8_t> type_ids;
    std::vector<int32_t> offsets;  // (start, end) character offsets per token, when asked
    std::vector<uint8_t> special;  // 1 at the template's special tokens, when asked (EncodeOptions::special_mask)
  };
  std::vector<uint32_t> lengths;  // tokens per text
  std::vector<Block> blocks;
  bool has_offsets = false;
  bool has_special = false;
  size_t total_tokens() const;
  size_t max_length() const;
};

// Encodes texts (and pairs[i] with texts[i] when pairs is non-null) on up to num_threads
// threads. Offsets are character (code point) offsets into the original text, as Python
// strings count them.
StagedBatch encode_batch(const Tokenizer& tok, const std::vector<std::string_view>& texts,
                         const std::vector<std::string_view>* pairs, const EncodeOptions& opt, bool offsets,
                         int num_threads);

// Rows of row_len columns (>= every length): the pad id, type 0, offsets (0, 0) and special
// 1 (as HF's special_tokens_mask marks padding) after each text's tokens; right padding or,
// with pad_left, left padding. Any output pointer may be null to skip it.
void write_padded(StagedBatch& batch, size_t row_len, bool pad_left, int32_t pad_id, int32_t pad_type_id,
                  int32_t* ids, int32_t* attention_mask, int32_t* type_ids, int32_t* offsets,
                  int32_t* special = nullptr);

// Texts back to back (the packed, padding-free layout; the caller builds cu_seqlens from
// batch.lengths).
void write_packed(StagedBatch& batch, int32_t* ids, int32_t* type_ids, int32_t* offsets, int32_t* special = nullptr);

}  // namespace llmcore::tok
