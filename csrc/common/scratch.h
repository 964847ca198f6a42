// Aligned scratch memory for the kernels. Defined in one ISA-neutral translation unit.
#pragma once
#include <cstddef>
#include <memory>

namespace llmcore {

void* aligned_alloc_bytes(std::size_t bytes);  // 64-byte aligned; throws std::bad_alloc
void aligned_free(void* p) noexcept;

struct AlignedDeleter {
  void operator()(void* p) const noexcept { aligned_free(p); }
};

template <class T>
using Scratch = std::unique_ptr<T[], AlignedDeleter>;

template <class T>
Scratch<T> make_scratch(std::size_t n) {
  return Scratch<T>(static_cast<T*>(aligned_alloc_bytes(sizeof(T) * (n ? n : 1))));
}

}  // namespace llmcore
