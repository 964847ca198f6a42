#include "common/scratch.h"

#include <cstdlib>
#include <new>

namespace llmcore {

void* aligned_alloc_bytes(std::size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) throw std::bad_alloc();
  return p;
}

void aligned_free(void* p) noexcept { std::free(p); }

}  // namespace llmcore
