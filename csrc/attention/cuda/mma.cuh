// Warp-level building blocks of the attention kernels, as inline PTX for sm_80 and later:
// cp.async (global -> shared, zero-filling), ldmatrix (shared -> MMA fragments) and
// mma.sync.m16n8k16 with fp32 accumulators.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), with g = lane / 4 and
// t = lane % 4:
//   A (16x16, row-major) a0: (g, 2t..2t+1)  a1: (g+8, 2t..)  a2: (g, 8+2t..)  a3: (g+8, 8+2t..)
//   B (16x8, "col")      b0: (k 2t..2t+1, n g)  b1: (k 8+2t.., n g)
//   C (16x8, fp32)       c0,c1: (g, 2t..2t+1)   c2,c3: (g+8, 2t..2t+1)
// Two adjacent C tiles (16x8 + 16x8) therefore hold exactly the A fragment of a 16x16
// operand, which is how P = softmax(S) feeds the P.V product without leaving registers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace llmcore::attention::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; when !pred, writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register i
// of lane l receives row l/4, columns 2(l%4)..+1 of matrix i (transposed with .trans).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a * b for one 16x8x16 tile.
template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to the 16-bit type, the first in the low half (the lower column).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <class T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

// 2^x on the special-function unit (2 ulp; 2^-inf = +0), as FlashAttention does.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Reductions over the four lanes (t = 0..3) that share an accumulator row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ldmatrix addresses on swizzled tiles (tile_math.h: swizzle) without per-access index math.
// Every x4 pattern here has lane l read row (l & 7) + 8 * (0 or 1) of an 8-aligned row block
// and chunk c0 + (0 or 1) of an even chunk c0. With the tile aligned to its row length,
// (c0 + sel) ^ (row & 7) becomes an XOR of the lane's base address with c0 * 16, and the row
// block a plain add, which LDSM takes as an immediate offset.
template <int kRowBytes>
__device__ __forceinline__ uint32_t ldsm_base(uint32_t tile, int lane_row, int lane_chunk) {
  return tile + lane_row * kRowBytes + ((lane_chunk ^ (lane_row & 7)) << 4);
}

template <int kRowBytes>
__device__ __forceinline__ uint32_t ldsm_at(uint32_t base, int row0, int chunk0) {
  return (base ^ uint32_t(chunk0 << 4)) + uint32_t(row0 * kRowBytes);
}

// The dynamic shared memory, aligned up to 1024 bytes (kernels ask for 1 KB more than they use)
// so that every tile's rows start at a multiple of their length.
__device__ __forceinline__ unsigned char* aligned_smem(unsigned char* raw) {
  const uint32_t a = smem_addr(raw);
  return raw + (((a + 1023u) & ~1023u) - a);
}

// Loads a rows x cols tile (cols a multiple of 64) of 16-bit elements into swizzled shared
// memory with nthreads threads: row r comes from src + r * row_stride. Rows >= rows_valid and
// columns >= cols_valid (a multiple of 8) are zero-filled without reading global memory;
// `fallback` is a valid address given to the zero-filling copies.
template <int kRows, int kCols, int kThreads, class T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* src, int64_t row_stride, int rows_valid,
                                                int cols_valid, const T* fallback, int tid) {
  constexpr int kChunks = kCols / 8;  // 16-byte chunks per row
  static_assert(kThreads % kChunks == 0 && kRows % (kThreads / kChunks) == 0, "tile must divide among threads");
  constexpr int kStep = kThreads / kChunks;  // rows one pass covers
  // each thread keeps one chunk column: one pointer advanced by kStep rows per pass
  const int c = tid % kChunks, r0 = tid / kChunks;
  const bool col_ok = c * 8 < cols_valid;
  const T* g = src + r0 * row_stride + c * 8;
  const uint32_t dst = smem_addr(smem) + r0 * kCols * int(sizeof(T));
#pragma unroll
  for (int it = 0; it < kRows / kStep; ++it) {
    const int r = r0 + it * kStep;
    const bool ok = col_ok && r < rows_valid;
    cp_async_16(dst + it * kStep * kCols * int(sizeof(T)) + ((c ^ (r & 7)) << 4), ok ? g : fallback, ok);
    g += kStep * row_stride;
  }
}

}  // namespace llmcore::attention::cuda
