// The host's cache of tensor maps for the TMA kernels (tma_sm90.cuh).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/cuda_check.hpp"
#include "cuda/tma_sm90.cuh"
#include "kasmina/error.hpp"

namespace kasmina::cuda {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    KASMINA_CUDA_CHECK(
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
#else
    KASMINA_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &q));
#endif
    KASMINA_CHECK_RUNTIME(q == cudaDriverEntryPointSuccess && f != nullptr,
                          "the CUDA driver has no cuTensorMapEncodeTiled (the TMA variants need "
                          "CUDA 12 or newer)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// Tensor maps of the last inputs, keyed by everything the map encodes: a
// layer called again on the same buffer (the caching allocator's usual
// case) pays a lookup, not an encode.
struct MapKey {
  const void* ptr;
  int64_t rows, hidden, stride_bytes;
  int dtype, C, R, boxes, device;
  bool operator==(const MapKey& o) const {
    return ptr == o.ptr && rows == o.rows && hidden == o.hidden && stride_bytes == o.stride_bytes &&
           dtype == o.dtype && C == o.C && R == o.R && boxes == o.boxes && device == o.device;
  }
};
constexpr std::size_t kMapCacheSize = 32;

// How much the L2 fetches around a box's row (DESIGN 66): 256 bytes where
// every chunk row starts and ends on a 256-byte boundary, else 128. A
// 128-byte row (bfloat16, C = 64) promoted to 256 bytes also fetches the
// neighbouring seed's row, which another CTA reads at another time: 1.3 %
// more DRAM reads at 16384x4096/64 (Nsight Compute, twenty-seventh session).
CUtensorMapL2promotion row_promotion(const void* ptr, int64_t stride_bytes, int64_t row_bytes) {
  const bool aligned = reinterpret_cast<std::uintptr_t>(ptr) % 256 == 0 && stride_bytes % 256 == 0 &&
                       row_bytes % 256 == 0;
  return aligned ? CU_TENSOR_MAP_L2_PROMOTION_L2_256B : CU_TENSOR_MAP_L2_PROMOTION_L2_128B;
}

}  // namespace

int tma_row_boxes(int64_t C, std::size_t elem_bytes) {
  if (C <= 256) return 1;
  for (int64_t k = 2; k <= 256 && k <= C; ++k) {
    if (C % k != 0) continue;
    const int64_t w = C / k;
    if (w <= 256 && (w * static_cast<int64_t>(elem_bytes)) % 16 == 0) return static_cast<int>(k);
  }
  return 0;
}

CUtensorMap tensor_map_rows(const void* ptr, DType dtype, int64_t rows, int64_t hidden,
                            int64_t row_stride, int C, int R, int boxes, int device) {
  const auto esize = static_cast<int64_t>(dtype_size(dtype));
  const MapKey key{ptr, rows, hidden, row_stride * esize, static_cast<int>(dtype), C, R, boxes, device};
  static std::mutex mutex;
  static std::vector<std::pair<MapKey, CUtensorMap>> cache;
  static std::size_t next = 0;  // round-robin replacement
  {
    const std::lock_guard<std::mutex> lock(mutex);
    for (const auto& [k, m] : cache) {
      if (k == key) return m;
    }
  }
  CUtensorMapDataType type = CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
  if (dtype == DType::bf16) type = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  if (dtype == DType::f16) type = CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUtensorMapL2promotion promotion = row_promotion(ptr, row_stride * esize, C * esize);
  CUtensorMap map;
  std::memset(&map, 0, sizeof(map));
  CUresult rc = CUDA_SUCCESS;
  if (boxes <= 1) {
    const cuuint64_t dims[2] = {static_cast<cuuint64_t>(hidden), static_cast<cuuint64_t>(rows)};
    const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_stride * esize)};
    const cuuint32_t box[2] = {static_cast<cuuint32_t>(C), static_cast<cuuint32_t>(R)};
    const cuuint32_t elem_strides[2] = {1, 1};
    rc = encode_fn()(&map, type, 2, const_cast<void*>(ptr), dims, strides, box, elem_strides,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                     promotion, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  } else {
    // (block columns, blocks of the row, rows): the box's blocks of a row
    // land one after another, so a box row is the chunk's row.
    const int64_t w = C / boxes;
    const cuuint64_t dims[3] = {static_cast<cuuint64_t>(w), static_cast<cuuint64_t>(hidden / w),
                                static_cast<cuuint64_t>(rows)};
    const cuuint64_t strides[2] = {static_cast<cuuint64_t>(w * esize),
                                   static_cast<cuuint64_t>(row_stride * esize)};
    const cuuint32_t box[3] = {static_cast<cuuint32_t>(w), static_cast<cuuint32_t>(boxes),
                               static_cast<cuuint32_t>(R)};
    const cuuint32_t elem_strides[3] = {1, 1, 1};
    rc = encode_fn()(&map, type, 3, const_cast<void*>(ptr), dims, strides, box, elem_strides,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                     promotion, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  }
  KASMINA_CHECK_RUNTIME(rc == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed (CUresult ",
                        static_cast<int>(rc), ") for ", ptr, " [", rows, " x ", hidden,
                        "], box ", R, " x ", C, " in ", boxes, " column blocks");
  const std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() < kMapCacheSize) {
    cache.emplace_back(key, map);
  } else {
    cache[next] = {key, map};
    next = (next + 1) % kMapCacheSize;
  }
  return map;
}

CUtensorMap tensor_map_2d(const void* ptr, DType dtype, int64_t rows, int64_t hidden,
                          int64_t row_stride, int C, int R, int device) {
  return tensor_map_rows(ptr, dtype, rows, hidden, row_stride, C, R, 1, device);
}

}  // namespace kasmina::cuda
