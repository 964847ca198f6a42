// How the row-wise kernels share work between OpenMP threads, and how they sum columns
// (weight and bias gradients) deterministically for a given thread count.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "norm/norm.h"

#ifndef LLMCORE_ISA_NS
#error "compile kernel sources through CMake's per-ISA targets"
#endif

namespace llmcore::norm::LLMCORE_ISA_NS {

// Below this many elements a call runs on the calling thread: waking the team costs more.
constexpr int64_t kSerialElems = 1 << 14;
// Rows summed into a block before the block joins the thread's running column sums, so
// rounding grows with rows / kSumBlock + kSumBlock rather than with rows.
constexpr int64_t kSumBlock = 32;

inline int threads_for(int64_t rows, int64_t cols, int requested) {
  if (rows * cols < kSerialElems) return 1;
  const int nt = requested > 0 ? requested : omp_get_max_threads();
  return int(std::max<int64_t>(1, std::min<int64_t>(nt, rows)));
}

template <class T>
inline const T* row_of(const Mat& m, int64_t r) {
  return static_cast<const T*>(m.data) + r * m.stride;
}

// body(r) for every row, rows split evenly between threads.
template <class Body>
void for_each_row(int64_t rows, int64_t cols, int num_threads, const Body& body) {
  const int nt = threads_for(rows, cols, num_threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t r = 0; r < rows; ++r) body(r);
}

// body(r, c0, c1) over every row cut into pieces of at most kPiece columns (elementwise
// kernels: a few long rows still spread over all threads).
constexpr int64_t kPiece = 4096;  // a multiple of every vector width
template <class Body>
void for_each_piece(int64_t rows, int64_t cols, int num_threads, const Body& body) {
  const int64_t per_row = (cols + kPiece - 1) / kPiece;
  const int64_t items = rows * per_row;
  const int nt = threads_for(items, std::min(cols, kPiece), num_threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t r = i / per_row, c0 = (i % per_row) * kPiece;
    body(r, c0, std::min(cols, c0 + kPiece));
  }
}

// body(r, sums) for every row, where sums points at `nsums` float vectors of stride `ld`
// (>= cols) that the body adds its row's contributions to. Their totals over all rows land
// in out[k] (cols floats each; null entries are skipped). Each thread owns a contiguous
// range of rows; blocks of kSumBlock rows are summed apart and then added to the thread's
// total, and the threads' totals are added in thread order.
template <class Body>
void for_each_row_with_sums(int64_t rows, int64_t cols, int num_threads, int nsums, float* const* out,
                            const Body& body) {
  const int nt = threads_for(rows, cols, num_threads);
  const int64_t ld = (cols + 15) / 16 * 16;
  const int64_t per_thread = 2 * nsums * ld;  // the block's sums, then the thread's totals
  std::vector<float> buf(size_t(nt * per_thread), 0.f);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num(), team = omp_get_num_threads();
    float* block = buf.data() + t * per_thread;
    float* total = block + nsums * ld;
    const int64_t r0 = rows * t / team, r1 = rows * (t + 1) / team;
    for (int64_t b0 = r0; b0 < r1; b0 += kSumBlock) {
      std::fill(block, block + nsums * ld, 0.f);
      const int64_t b1 = std::min(r1, b0 + kSumBlock);
      for (int64_t r = b0; r < b1; ++r) body(r, block, ld);
      for (int64_t i = 0; i < nsums * ld; ++i) total[i] += block[i];
    }
#pragma omp barrier
    const int64_t c0 = cols * t / team, c1 = cols * (t + 1) / team;
    for (int k = 0; k < nsums; ++k) {
      if (!out[k]) continue;
      for (int64_t c = c0; c < c1; ++c) {
        float s = 0.f;
        for (int u = 0; u < team; ++u) s += buf[u * per_thread + (nsums + k) * ld + c];
        out[k][c] = s;
      }
    }
  }
}

}  // namespace llmcore::norm::LLMCORE_ISA_NS
