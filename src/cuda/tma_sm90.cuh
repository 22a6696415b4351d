// Hopper (sm_90) building blocks shared by the TMA forward and backward:
// the PTX of mbarriers and tensor-map copies, and the host's cache of 2-D
// tensor maps. The device wrappers compile for the host pass and sm_90 only
// (an sm_80 pass has no use for them: the TMA kernels' bodies are empty
// there and the host never launches them).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/tuning.hpp"
#include "kasmina/params.hpp"

namespace kasmina::cuda {

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
#endif
}

// The barriers' initialisation visible to the async proxy (the TMA unit).
__device__ __forceinline__ void fence_mbar_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// This thread's arrival, announcing `bytes` the TMA will deliver this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
#endif
}

// Until the barrier's phase `parity` has completed. A phase that never
// completes (a copy that cannot land) traps after ~2^34 cycles (seconds)
// instead of hanging: the launch then fails with an error the host raises.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned done = 0;
  const long long start = clock64();
  do {
    if (clock64() - start > (1ll << 34)) __trap();
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  } while (done == 0);
#endif
}

// The box at (column c0, row r0) of the tensor map into shared memory at
// dst; completion (all of the box's bytes, zero-filled past the tensor's
// edge) is signalled on bar.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int r0,
                                            uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(r0), "r"(smem_u32(bar))
      : "memory");
#endif
}

// The same for a 3-D tensor map (a row's chunk as boxes: tensor_map_rows):
// the box at (0, column block b0, row r0).
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, int b0, int r0,
                                            uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(0), "r"(b0), "r"(r0), "r"(smem_u32(bar))
      : "memory");
#endif
}

// Shared-memory writes of this thread (generic proxy) visible to the async
// proxy: before a TMA store reads what the threads wrote.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// The box at (column c0, row r0) of the tensor map from shared memory at
// src (128-byte aligned), in this thread's current bulk group; rows and
// columns past the tensor's edge are not written.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, int c0, int r0,
                                             const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(r0), "r"(smem_u32(src))
               : "memory");
#endif
}

// Closes this thread's bulk group of stores issued since the last commit.
__device__ __forceinline__ void bulk_commit_group() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
#endif
}

// Until at most `Pending` of this thread's latest bulk groups still read
// their shared memory (the older ones' sources may be written again).
template <int Pending>
__device__ __forceinline__ void bulk_wait_group_read() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(Pending) : "memory");
#endif
}

// Until every bulk group of this thread has completed: its writes are done
// (visible to the grids after this one) and its sources read.
__device__ __forceinline__ void bulk_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#endif
}

#endif

// The tensor map of a row-major 2-D tensor `ptr` [rows, hidden] (row stride
// `row_stride` elements, 16-byte multiple) with box [R rows, C columns],
// no swizzle, rows past the edge zero-filled by a load and left unwritten
// by a store (the TMA forward's y). Encoded once per (pointer,
// shape, stride, dtype, box, device) and cached: a layer called again on the
// same buffer (the caching allocator's usual case) pays a lookup. Throws
// kasmina::Error (runtime) when the driver refuses the encoding.

// The TMA kernels' vector width: 16 bytes of T.
template <typename T>
constexpr int kTmaVector = kVectorBytes / static_cast<int>(sizeof(T));

CUtensorMap tensor_map_2d(const void* ptr, DType dtype, int64_t rows, int64_t hidden,
                          int64_t row_stride, int C, int R, int device);

// A box is at most 256 elements wide: a chunk of C > 256 columns is read as
// `boxes` column blocks of C / boxes elements each (the fewest that divide
// C, are at most 256 wide and a multiple of 16 bytes), through a 3-D view
// of the tensor (block columns, blocks, rows) whose box (C / boxes, boxes,
// R) lands in shared memory as R rows of C elements, the layout of one 2-D
// box. 1 for C <= 256; 0 where no split exists.
int tma_row_boxes(int64_t C, std::size_t elem_bytes);

// The tensor map of x for the TMA forward's passes: tensor_map_2d's for
// boxes == 1, else the 3-D view above (box_cols = C / boxes).
CUtensorMap tensor_map_rows(const void* ptr, DType dtype, int64_t rows, int64_t hidden,
                            int64_t row_stride, int C, int R, int boxes, int device);

}  // namespace kasmina::cuda
