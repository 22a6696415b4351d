// Per-kernel profiling. Every forward and backward runs inside an NVTX range
// ("kasmina.forward" / "kasmina.backward", in CUDA builds; free when no
// profiler is attached). With profiling switched on (set_profiling(true), or
// KASMINA_PROFILE=1 in the environment, which also prints the report to
// stderr at exit), each call is timed (CUDA events on the caller's stream;
// a wall clock on the CPU backends) and charged to its kernel variant with
// the bytes it must move, so the report gives time, bytes and GB/s per
// kernel. Timing costs two event records per call and never synchronises on
// the hot path; calls inside a CUDA graph capture are not timed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kasmina {

struct ProfileEntry {
  std::string kernel;    // e.g. "cuda.forward.vec4 float32 (1 rows in flight)"
  std::int64_t calls = 0;
  double total_us = 0;   // summed time of the calls
  double bytes = 0;      // summed minimum bytes moved (each input read once, each output written once)
  double gbps() const { return total_us > 0 ? bytes / (total_us * 1e3) : 0.0; }
  double mean_us() const { return calls > 0 ? total_us / static_cast<double>(calls) : 0.0; }
};

void set_profiling(bool on);
bool profiling();
// The entries so far, sorted by total time (waits for timings still pending
// on the GPU).
std::vector<ProfileEntry> profile_report();
void profile_reset();
// The report as a table.
std::string format_profile(const std::vector<ProfileEntry>& entries);

}  // namespace kasmina
