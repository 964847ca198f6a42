#include "tokenizer/batch.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <system_error>
#include <thread>

#include "tokenizer/utf8.h"

namespace llmcore::tok {
namespace {

// Byte offsets -> code point offsets of one text, in place over (start, end) pairs.
void to_char_offsets(std::string_view text, std::vector<uint32_t>& scratch, int32_t* pairs, size_t n_tokens,
                     const uint8_t* from_pair, uint8_t which) {
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  bool ascii = true;
  for (size_t i = 0; i < text.size() && ascii; ++i) ascii = s[i] < 0x80;
  if (ascii) return;
  scratch.resize(text.size() + 1);
  uint32_t chars = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    scratch[i] = chars;
    chars += (s[i] & 0xC0) != 0x80;
  }
  scratch[text.size()] = chars;
  for (size_t t = 0; t < n_tokens; ++t) {
    if (from_pair[t] != which) continue;
    // A byte-level token may start inside a character: its offsets then cover that character.
    const uint32_t b = uint32_t(pairs[2 * t]);
    const bool inside = b < text.size() && (s[b] & 0xC0) == 0x80;
    pairs[2 * t] = int32_t(scratch[b] - inside);
    pairs[2 * t + 1] = int32_t(scratch[pairs[2 * t + 1]]);
  }
}

void encode_block(const Tokenizer& tok, const std::vector<std::string_view>& texts,
                  const std::vector<std::string_view>* pairs, const EncodeOptions& opt, bool offsets,
                  StagedBatch::Block& block, uint32_t* lengths) {
  struct Scratch {
    Tokenizer::Workspace ws;
    Encoding enc;
    std::vector<uint32_t> char_of_byte;
  };
  thread_local Scratch scratch;  // one thread-local lookup per block
  Encoding& enc = scratch.enc;
  std::vector<uint32_t>& char_of_byte = scratch.char_of_byte;
  for (size_t i = block.first_text; i < block.first_text + block.count; ++i) {
    tok.encode(texts[i], pairs ? &(*pairs)[i] : nullptr, opt, enc, scratch.ws);
    const size_t n = enc.ids.size();
    lengths[i] = uint32_t(n);
    block.ids.insert(block.ids.end(), enc.ids.begin(), enc.ids.end());
    block.type_ids.insert(block.type_ids.end(), enc.type_ids.begin(), enc.type_ids.end());
    block.special.insert(block.special.end(), enc.special.begin(), enc.special.end());  // (empty unless asked)
    if (!offsets) continue;
    const size_t base = block.offsets.size();
    block.offsets.resize(base + 2 * n);
    int32_t* o = block.offsets.data() + base;
    for (size_t t = 0; t < n; ++t) {
      o[2 * t] = int32_t(enc.start[t]);
      o[2 * t + 1] = int32_t(enc.end[t]);
    }
    to_char_offsets(texts[i], char_of_byte, o, n, enc.from_pair.data(), 0);
    if (pairs) to_char_offsets((*pairs)[i], char_of_byte, o, n, enc.from_pair.data(), 1);
  }
}

}  // namespace

size_t StagedBatch::total_tokens() const {
  size_t total = 0;
  for (uint32_t n : lengths) total += n;
  return total;
}

size_t StagedBatch::max_length() const {
  uint32_t m = 0;
  for (uint32_t n : lengths) m = std::max(m, n);
  return m;
}

StagedBatch encode_batch(const Tokenizer& tok, const std::vector<std::string_view>& texts,
                         const std::vector<std::string_view>* pairs, const EncodeOptions& opt, bool offsets,
                         int num_threads) {
  StagedBatch batch;
  const size_t n = texts.size();
  EncodeOptions options = opt;
  options.offsets = offsets;
  batch.lengths.assign(n, 0);
  batch.has_offsets = offsets;
  batch.has_special = opt.special_mask;
  size_t bytes = 0;
  for (auto t : texts) bytes += t.size();
  if (pairs)
    for (auto t : *pairs) bytes += t.size();
  // Blocks of ~64 KiB of text: enough work to amortize scheduling, small enough to balance.
  const size_t target = 64 * 1024;
  for (size_t i = 0; i < n;) {
    StagedBatch::Block block;
    block.first_text = i;
    size_t b = 0;
    while (i < n && (b < target || block.count == 0)) {
      b += texts[i].size() + (pairs ? (*pairs)[i].size() : 0);
      ++i;
      ++block.count;
    }
    batch.blocks.push_back(std::move(block));
  }
  // more threads than a few per core only cost stacks (and, under a memory limit, glibc aborts a thread it cannot
  // give thread-local storage)
  const size_t cores = std::max(1u, std::thread::hardware_concurrency());
  const int threads = int(std::min({size_t(std::max(num_threads, 1)), batch.blocks.size(), 4 * cores}));
  if (threads <= 1) {
    for (auto& block : batch.blocks) encode_block(tok, texts, pairs, options, offsets, block, batch.lengths.data());
    return batch;
  }
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  auto worker = [&] {
    try {
      for (size_t b; !failed.load(std::memory_order_relaxed) && (b = next.fetch_add(1)) < batch.blocks.size();)
        encode_block(tok, texts, pairs, options, offsets, batch.blocks[b], batch.lengths.data());
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  try {
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  } catch (const std::system_error&) {
    // no more threads to be had (a pids or memory limit): the ones started and this one do the work (unwinding
    // past joinable threads was std::terminate)
  }
  worker();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
  return batch;
}

void write_padded(StagedBatch& batch, size_t row_len, bool pad_left, int32_t pad_id, int32_t pad_type_id,
                  int32_t* ids, int32_t* attention_mask, int32_t* type_ids, int32_t* offsets, int32_t* special) {
  for (auto& block : batch.blocks) {
    size_t src = 0;
    for (size_t i = block.first_text; i < block.first_text + block.count; ++i) {
      const size_t len = batch.lengths[i], pad = row_len - len;
      const size_t row = i * row_len, at = row + (pad_left ? pad : 0), pad_at = row + (pad_left ? 0 : len);
      if (ids) {
        std::copy_n(block.ids.data() + src, len, ids + at);
        std::fill_n(ids + pad_at, pad, pad_id);
      }
      if (attention_mask) {
        std::fill_n(attention_mask + at, len, 1);
        std::fill_n(attention_mask + pad_at, pad, 0);
      }
      if (type_ids) {
        std::copy_n(block.type_ids.data() + src, len, type_ids + at);
        std::fill_n(type_ids + pad_at, pad, pad_type_id);
      }
      if (offsets && batch.has_offsets) {
        std::copy_n(block.offsets.data() + 2 * src, 2 * len, offsets + 2 * at);
        std::fill_n(offsets + 2 * pad_at, 2 * pad, 0);
      }
      if (special && batch.has_special) {
        std::copy_n(block.special.data() + src, len, special + at);
        std::fill_n(special + pad_at, pad, 1);
      }
      src += len;
    }
    block = StagedBatch::Block{};  // release the staging memory as soon as it is copied
  }
}

void write_packed(StagedBatch& batch, int32_t* ids, int32_t* type_ids, int32_t* offsets, int32_t* special) {
  size_t at = 0;
  for (auto& block : batch.blocks) {
    const size_t len = block.ids.size();
    if (ids) std::copy_n(block.ids.data(), len, ids + at);
    if (type_ids) std::copy_n(block.type_ids.data(), len, type_ids + at);
    if (offsets && batch.has_offsets) std::copy_n(block.offsets.data(), 2 * len, offsets + 2 * at);
    if (special && batch.has_special) std::copy_n(block.special.data(), len, special + at);
    at += len;
    block = StagedBatch::Block{};
  }
}

}  // namespace llmcore::tok
