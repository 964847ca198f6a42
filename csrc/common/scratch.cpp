#include "common/scratch.h"

#include <cstdlib>
#include <new>
#include <stdexcept>

namespace llmcore {

void* aligned_alloc_bytes(std::size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) throw std::bad_alloc();
  return p;
}

void aligned_free(void* p) noexcept { std::free(p); }

namespace {

struct Arena {
  char* data = nullptr;
  std::size_t capacity = 0;
  bool in_use = false;
  ~Arena() { aligned_free(data); }
};

thread_local Arena t_arena;

}  // namespace

Workspace::Workspace() {
  if (t_arena.in_use) throw std::logic_error("llmcore: nested Workspace on one thread");
  t_arena.in_use = true;
}

Workspace::~Workspace() { t_arena.in_use = false; }

void Workspace::reserve(std::size_t bytes) {
  if (bytes <= t_arena.capacity) return;
  aligned_free(t_arena.data);
  t_arena.data = nullptr;
  t_arena.capacity = 0;
  t_arena.data = static_cast<char*>(aligned_alloc_bytes(bytes));
  t_arena.capacity = bytes;
}

void* Workspace::carve_bytes(std::size_t bytes) {
  const std::size_t need = ws_bytes(bytes);
  if (used_ + need > t_arena.capacity) throw std::logic_error("llmcore: Workspace carve beyond its reservation");
  void* p = t_arena.data + used_;
  used_ += need;
  return p;
}

void release_workspace() noexcept {
  if (t_arena.in_use) return;
  aligned_free(t_arena.data);
  t_arena.data = nullptr;
  t_arena.capacity = 0;
}

}  // namespace llmcore
