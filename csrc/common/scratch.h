// Scratch memory for the kernels. Defined in one ISA-neutral translation unit.
#pragma once
#include <cstddef>
#include <cstdint>

namespace llmcore {

void* aligned_alloc_bytes(std::size_t bytes);  // 64-byte aligned; throws std::bad_alloc
void aligned_free(void* p) noexcept;

// A per-calling-thread arena that keeps its memory between kernel calls: fresh multi-MB
// allocations cost page faults on every call (measured: ~10% of small attention calls).
// Carve it with Workspace; one Workspace may be live per thread at a time.
class Workspace {
 public:
  Workspace();
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  // Reserves room for the carve() calls that follow (sum of their byte sizes + 64 each).
  void reserve(std::size_t bytes);
  template <class T>
  T* carve(std::size_t n) {
    return static_cast<T*>(carve_bytes(sizeof(T) * n));
  }

 private:
  void* carve_bytes(std::size_t bytes);
  std::size_t used_ = 0;
};

inline std::size_t ws_bytes(std::size_t bytes) { return (bytes + 63) / 64 * 64 + 64; }

// Frees the calling thread's arena (it regrows on the next call).
void release_workspace() noexcept;

}  // namespace llmcore
