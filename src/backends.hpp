// Internal: the entry points each backend gives the dispatcher (core/ops.cpp).
// Backends receive validated params only.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "kasmina/params.hpp"

namespace kasmina::detail {

// reference/ (float64 oracle; rounds its results into the params' outputs)
void forward_reference(const ForwardParams&);
void backward_reference(const BackwardParams&);

// cpu/ (fast CPU backend)
void forward_cpu(const ForwardParams&);
void backward_cpu(const BackwardParams&);
std::string describe_forward_cpu(const ForwardParams&);
std::string describe_backward_cpu(const BackwardParams&);
int cpu_default_threads();

#ifdef KASMINA_WITH_CUDA
// cuda/
bool cuda_available();
std::string cuda_unavailable_reason();
std::vector<std::string> cuda_device_names();
std::size_t forward_workspace_bytes_cuda(const ForwardParams&);
std::size_t backward_workspace_bytes_cuda(const BackwardParams&);
void forward_cuda(const ForwardParams&);
// Up to 16 forwards of one dtype, stream and access path in one launch.
void forward_stream_cuda(const ForwardParams* params, int count);
// The kernel the streamed launch runs, described for problem 0 (its plan as
// streamed: the generic kernel, the smallest rows in flight of the plans).
std::string describe_forward_stream_cuda(const ForwardParams* params, int count);
void backward_cuda(const BackwardParams&);
bool cuda_stream_capturing(Stream stream);
std::string describe_forward_cuda(const ForwardParams&);
std::string describe_backward_cuda(const BackwardParams&);
// Profiling (core/profile.cpp): an event pair recorded around a call on
// `stream` (nullptr while the stream is capturing a graph), and its elapsed
// time once the stop event completed (waits for it; frees the pair).
void* cuda_timer_start(void* stream);
void cuda_timer_stop(void* token, void* stream);
double cuda_timer_elapsed_us(void* token);
void cuda_timer_discard(void* token);
bool cuda_timer_ready(void* token);  // its stop event completed (no wait)
void cuda_range_push(const char* name);
void cuda_range_pop();
#endif

}  // namespace kasmina::detail
