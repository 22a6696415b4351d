// A per-CTA timeline of the TMA forward, for finding where a launch's fixed
// cost goes (a developer build only: configure with
// -DCMAKE_CUDA_FLAGS=-DKASMINA_TIMELINE; never in a release build). Thread 0
// of each CTA records %globaltimer (ns, comparable across SMs) and clock64
// (cycles of its SM) at kTimelineSlots points; bench_cuda --timeline prints
// them (docs/PERFORMANCE.md, tenth session). Without KASMINA_TIMELINE every
// hook is empty.
#pragma once

#include <cstdint>
#include <vector>

namespace kasmina::cuda {

// 0 entry (after the programmatic-launch wait: nothing is written before
// it, DESIGN 55), 1 ring ready, 2 seed set up, 3 first pass landed, 4 row loop
// done, 5 CTA reduced, 6 ticket taken, 7 end (after the seed's merge when
// this CTA was the last).
inline constexpr int kTimelineSlots = 8;
inline constexpr int kTimelineCtas = 4096;
// Per CTA: kTimelineSlots globaltimer values, kTimelineSlots clock64
// values, then smid | last << 16 | passes << 20, then seed << 20 | tile.
inline constexpr int kTimelineWords = 2 * kTimelineSlots + 2;

#ifdef KASMINA_TIMELINE
// Zeroes the records (host; the device's current context).
void forward_timeline_reset();
// The records of CTAs [0, ctas) of the last TMA forward since the reset.
std::vector<unsigned long long> forward_timeline(int ctas);
#endif

}  // namespace kasmina::cuda
