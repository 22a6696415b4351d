// CUDA side of the profiler (kasmina/profile.hpp): NVTX ranges and event
// pairs on the caller's stream.
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <memory>

#include "backends.hpp"
#include "cuda/cuda_check.hpp"

namespace kasmina::detail {

namespace {
struct EventPair {
  cudaEvent_t start = nullptr;
  cudaEvent_t stop = nullptr;
};
}  // namespace

void cuda_range_push(const char* name) { nvtxRangePushA(name); }
void cuda_range_pop() { nvtxRangePop(); }

void* cuda_timer_start(void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  KASMINA_CUDA_CHECK(cudaStreamIsCapturing(s, &capture));
  if (capture != cudaStreamCaptureStatusNone) return nullptr;  // a graph: not timed
  auto pair = std::make_unique<EventPair>();
  cudaError_t status = cudaEventCreate(&pair->start);
  if (status == cudaSuccess) status = cudaEventCreate(&pair->stop);
  if (status == cudaSuccess) status = cudaEventRecord(pair->start, s);
  if (status != cudaSuccess) {
    cuda_timer_discard(pair.release());
    KASMINA_CUDA_CHECK(status);
  }
  return pair.release();
}

bool cuda_timer_ready(void* token) {
  return cudaEventQuery(static_cast<EventPair*>(token)->stop) != cudaErrorNotReady;
}

void cuda_timer_stop(void* token, void* stream) {
  auto* pair = static_cast<EventPair*>(token);
  KASMINA_CUDA_CHECK(cudaEventRecord(pair->stop, static_cast<cudaStream_t>(stream)));
}

double cuda_timer_elapsed_us(void* token) {
  auto* pair = static_cast<EventPair*>(token);
  float ms = 0.0f;
  const cudaError_t sync = cudaEventSynchronize(pair->stop);
  const cudaError_t elapsed = sync == cudaSuccess ? cudaEventElapsedTime(&ms, pair->start, pair->stop) : sync;
  cuda_timer_discard(token);
  KASMINA_CUDA_CHECK(elapsed);
  return static_cast<double>(ms) * 1000.0;
}

void cuda_timer_discard(void* token) {
  auto* pair = static_cast<EventPair*>(token);
  if (pair->start != nullptr) (void)cudaEventDestroy(pair->start);
  if (pair->stop != nullptr) (void)cudaEventDestroy(pair->stop);
  delete pair;
}

}  // namespace kasmina::detail
