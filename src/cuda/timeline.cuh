// A per-CTA timeline of the forward (TMA kernel) and the backward (generic
// kernel), for finding where a launch's fixed cost goes (a developer build
// only: configure with -DCMAKE_CUDA_FLAGS=-DKASMINA_TIMELINE; never in a
// release build). Thread 0 of each CTA records %globaltimer (ns, comparable
// across SMs) and clock64 (cycles of its SM) at kTimelineSlots points;
// bench_cuda --timeline prints them and scripts/timeline_summary.py sums
// them up (docs/DESIGN.md 56). Without KASMINA_TIMELINE every hook is empty.
#pragma once

#include <cstdint>
#include <vector>

#include "cuda_check.hpp"

namespace kasmina::cuda {

// Forward: 0 entry (after the programmatic-launch wait: nothing is written
// before it, DESIGN 55), 1 ring ready, 2 seed set up, 3 first pass landed,
// 4 row loop done, 5 CTA reduced, 6 ticket taken, 7 end (after the seed's
// merge when this CTA was the last).
// Backward: 0 entry, 1 seed set up, 2 row loop done, 3 CTA partials
// written, 4 ticket taken, 5 seed finished (last CTA of a seed; unused
// blueprint rows zeroed), 6 row ticket taken (or none to take), 7 end
// (after its blueprint row when this was the row's last seed).
// Detail marks inside those phases (8-11, -1 where a CTA does not pass):
// forward: 8 seed's view loaded (inside the set-up), 9 the seed's last
// CTA starts its merge (after a __threadfence before DESIGN 58), 10
// partials loaded and merged per thread, 11 merged over the CTA (then the
// telemetry row is written);
// backward: 8 partials loaded (the seed's last CTA), 9 seed totals
// reduced over the CTA, 10 dW column sums written, 11 the row's ordered
// sums and clears done (the row's last seed).
inline constexpr int kTimelineSlots = 12;
inline constexpr int kTimelineCtas = 4096;
// Per CTA: kTimelineSlots globaltimer values, kTimelineSlots clock64
// values, then smid | last CTA of its seed << 16 | last seed << 17 |
// passes << 20 (forward), then seed << 20 | tile.
inline constexpr int kTimelineWords = 2 * kTimelineSlots + 2;

#ifdef KASMINA_TIMELINE
// Zero the records (host; the device's current context) and read those of
// CTAs [0, ctas) of the last launch since the reset.
void forward_timeline_reset();
std::vector<unsigned long long> forward_timeline(int ctas);
void backward_timeline_reset();
std::vector<unsigned long long> backward_timeline(int ctas);

#ifdef __CUDACC__
using TimelineRecords = unsigned long long[kTimelineCtas][kTimelineWords];

// Host: zero the records of `symbol` (a __device__ TimelineRecords) or read
// those of CTAs [0, ctas); the .cu file that defines the symbol calls them.
template <typename Symbol>
void timeline_reset(const Symbol& symbol) {
  static const std::vector<unsigned long long> zeros(static_cast<std::size_t>(kTimelineCtas) * kTimelineWords, 0ull);
  KASMINA_CUDA_CHECK(cudaMemcpyToSymbol(symbol, zeros.data(), zeros.size() * sizeof(unsigned long long)));
}
template <typename Symbol>
std::vector<unsigned long long> timeline_read(const Symbol& symbol, int ctas) {
  if (ctas > kTimelineCtas) ctas = kTimelineCtas;
  std::vector<unsigned long long> out(static_cast<std::size_t>(ctas) * kTimelineWords);
  KASMINA_CUDA_CHECK(cudaMemcpyFromSymbol(out.data(), symbol, out.size() * sizeof(unsigned long long)));
  return out;
}

__device__ __forceinline__ void timeline_mark(TimelineRecords& rec, int slot) {
  if (threadIdx.x != 0 || blockIdx.x >= kTimelineCtas) return;
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  rec[blockIdx.x][slot] = t;
  rec[blockIdx.x][kTimelineSlots + slot] = static_cast<unsigned long long>(clock64());
}
// Word 2 * kTimelineSlots (this SM, passes) and the next (seed, tile).
__device__ __forceinline__ void timeline_where(TimelineRecords& rec, int seed, int tile, long long passes) {
  if (threadIdx.x != 0 || blockIdx.x >= kTimelineCtas) return;
  unsigned smid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  rec[blockIdx.x][2 * kTimelineSlots] = smid | static_cast<unsigned long long>(passes) << 20;
  rec[blockIdx.x][2 * kTimelineSlots + 1] = static_cast<unsigned long long>(seed) << 20 | tile;
}
// bit 16: the last CTA of its seed; bit 17: the last seed of its blueprint
// row (backward).
__device__ __forceinline__ void timeline_flag(TimelineRecords& rec, int bit, bool on) {
  if (threadIdx.x == 0 && blockIdx.x < kTimelineCtas && on) rec[blockIdx.x][2 * kTimelineSlots] |= 1ull << bit;
}
#endif
#endif

}  // namespace kasmina::cuda
