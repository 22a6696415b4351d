// Host-side checking of CUDA runtime calls: every failure becomes a
// kasmina::Error (RuntimeError) naming the file, the line, the failing
// expression and the CUDA error text, so the Python binding raises a
// RuntimeError with the same words.
#pragma once

#include <cuda_runtime_api.h>

#include "kasmina/error.hpp"

#define KASMINA_CUDA_CHECK(expr)                                                         \
  do {                                                                                   \
    const cudaError_t kasmina_cuda_status_ = (expr);                                     \
    if (kasmina_cuda_status_ != cudaSuccess) {                                           \
      KASMINA_FAIL(::kasmina::ErrorKind::runtime, "CUDA call failed at ", __FILE__, ":", \
                   __LINE__, ": ", #expr, ": ", cudaGetErrorString(kasmina_cuda_status_), \
                   " (", cudaGetErrorName(kasmina_cuda_status_), ")");                   \
    }                                                                                    \
  } while (0)
