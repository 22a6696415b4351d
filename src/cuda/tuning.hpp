// Tuning constants of the CUDA backend, one home per architecture (STYLE.md
// rule 3). The kernels are written for any value that satisfies the
// constraints noted here; the numbers are what we chose, not what the code
// needs. Change them only with a figure in docs/PERFORMANCE.md.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kasmina::cuda {

struct Tuning {
  // Threads per CTA of the forward kernel and upper bound of the backward
  // one. A multiple of 32 and at most 256 (the block reductions keep one
  // slot per warp, 8 slots).
  int block_threads;
  // CTAs per SM the grid aims for (resident at once, see below).
  int ctas_per_sm;
  // Upper bound of row tiles per seed, so the workspace stays small whatever
  // the number of seeds.
  int max_tiles_per_seed;
  // Dynamic shared memory per CTA: the coefficient table (C floats) and the
  // backward's column accumulators (rows in flight x C floats). Every
  // architecture gives 48 KiB (static + dynamic) without an opt-in; the
  // kernels' static shared memory (reduction scratch; the backward's row
  // list, DESIGN 69) takes under 2 KiB (sm_90a build, `cuobjdump
  // --dump-resource-usage`: at most 1552 B forward, 2016 B backward), so
  // 46 KiB are left for this. It bounds the backward's C at 11776 floats
  // (wider chunks skip the table first).
  std::size_t smem_budget_bytes;
  // Bytes the backward kernel may use for per-CTA column partials of dW
  // (tiles x S x C floats): caps the tile count for very wide chunks.
  std::size_t backward_partial_bytes;
  // Rows each thread of the forward loads before it computes on the first,
  // for 4-byte and for 2-byte types, and of the backward
  // (kasmina::CudaLaunchConfig overrides them). The forward also prefetches
  // the next row pass into L2, which with one row in flight did as well as
  // four without it for float32 and better at 8192x768 (docs/PERFORMANCE.md,
  // "Rows in flight").
  int forward_rows_in_flight_4byte;
  int forward_rows_in_flight_2byte;
  int backward_rows_in_flight;
  // The forward variant per shape class (small, medium, large: ops.hpp
  // ShapeClass) where nothing is set or tuned, for 4-byte and for 2-byte
  // types: 1 generic, 2 TMA (sm_90 only).
  int forward_variant_4byte[3];
  int forward_variant_2byte[3];
  // Shared memory the TMA variant's stages may take per CTA by default
  // (stages = this / stage bytes, 2 to 8); the occupancy of the generic
  // kernel is kept (forward_tma_sm90.cu), so fewer stages may run.
  int tma_stage_budget_bytes;
  // Lanes per row of the forward where nothing is set, for 4-byte and for
  // 2-byte types (1, 2, 4 or 8; forward_group_default lowers it for rows
  // whose vectors would leave lanes idle).
  int forward_group_4byte;
  int forward_group_2byte;
  // Dynamic shared memory per CTA the TMA forward may opt in to
  // (cudaFuncAttributeMaxDynamicSharedMemorySize) when it stores y by TMA
  // (CudaLaunchConfig::forward_tma_store): its y stages come on top of the x
  // stages, and the 16 KiB boxes of 16384x4096/64 float32 (4 lanes per row)
  // take 64 KiB in two of each. The generic kernel's CTAs per SM bound it
  // further (forward_tma_finish). Not tuned (it ran with this cap in
  // docs/PERFORMANCE.md's eighteenth and nineteenth sessions). 0: no TMA
  // store.
  std::size_t tma_store_smem_bytes;
  // Shared memory the TMA forward's x stages may take by default when it
  // stores y by TMA (stages = this / stage bytes, then as forward_tma_finish
  // bounds them): on sm_90 3 stages of 12 KiB (8192x768/16 float32, where 3
  // ran 1.04-1.07x faster than 2, twentieth session) and 2 of 16 KiB
  // (16384x4096/64: float32 cannot hold 3 CTAs per SM with 3, and bfloat16
  // ran 0.97x with 3).
  int tma_store_stage_budget_bytes;
  // Whether the TMA forward stores y by TMA where nothing is set
  // (CudaLaunchConfig::forward_tma_store automatic), per shape class, for
  // 4-byte and for 2-byte types.
  bool forward_tma_store_4byte[3];
  bool forward_tma_store_2byte[3];
};

// sm_80 (A100) and sm_90 (H100) share one memory-bound design: 16-byte
// vector loads, 256 threads, 3 CTAs per SM (the kernels use 60-80 registers
// a thread, so 3 CTAs of 256 fit and the grid is one even wave; the row
// passes are split evenly over the tiles, so a partial second wave would
// double the time of its CTAs). Hopper adds the TMA forward variant; its
// default per shape class is set from a same-run comparison with the
// generic kernel (docs/PERFORMANCE.md).
// sm_90's TMA defaults: on the H100 (third session) TMA won only for large
// float32 inputs with 8 lanes per row. On the H200 (fourth session,
// docs/PERFORMANCE.md "Lanes per row") fewer lanes per row made TMA win at
// the medium and large classes for both element sizes: bfloat16
// 16384x4096/64 105.6 us with TMA and 2 lanes per row against 139.8 us for
// the old default, float32 158.1 us with TMA and 4 lanes against 165.4 us
// with 8; at 8192x768/16 TMA led by 3-10 %. The small class (16x4096) is
// latency-bound and keeps the generic kernel. sm_80 keeps 8 lanes per row
// (not measured there since).
// sm_90's y by TMA store (nineteenth and twentieth sessions, H100,
// docs/PERFORMANCE.md; DESIGN 63): on by default for float32 at the medium
// and large classes, with the dependents launched at the CTAs' exit:
// forward 1.02-1.03x at 16384x4096/64, forward+backward 1.00-1.01x; at
// 8192x768/16 with three x stages (tma_store_stage_budget_bytes) forward
// 1.04-1.07x, forward+backward 0.99-1.01x (an H200 in the twenty-first
// session: 1.03-1.07x and 0.99-1.02x; with two x stages the store
// gained nothing there and the exit trigger cost dormant seeds' forward+
// backward 1-2 %). Not for 2-byte types: a layer with one seed in eight
// blending lost 1-3 % of forward+backward on the H100, an H200 lost 3 % of
// the forward for blending seeds, and at 8192x768/16 the store lost 2-6 %
// of the forward.
inline constexpr Tuning kTuningSm80{256, 3, 1024, 46 * 1024, 32u << 20, 1, 2, 2,
                                    {1, 1, 1}, {1, 1, 1}, 0, 8, 8, 0, 0, {false, false, false},
                                    {false, false, false}};
inline constexpr Tuning kTuningSm90{256, 3, 1024, 46 * 1024, 32u << 20, 1, 2, 2,
                                    {1, 2, 2}, {1, 2, 2}, 16 * 1024, 4, 2, 96 * 1024, 36 * 1024,
                                    {false, true, true}, {false, false, false}};

inline constexpr const Tuning& tuning_for(int cc_major) {
  return cc_major >= 9 ? kTuningSm90 : kTuningSm80;
}

// Widest access of the vector path.
inline constexpr int kVectorBytes = 16;
// Row groups never span more than a warp: their reductions are shuffles.
inline constexpr int kMaxGroupThreads = 32;
inline constexpr int kMaxBlockThreads = 256;
// Lanes per row in the forward: 8 lanes x 16 bytes = one 128-byte line per
// row and access, while per-row reductions are shared by 4 rows a warp.
inline constexpr int kForwardGroupThreads = 8;
// The widest row group the forward takes: only the TMA kernel's wide
// instances, where the TMA plan's boxes at 8 lanes per row do not fit two
// stages of the shared-memory opt-in (float32 C = 512 and 1024, 2-byte C =
// 1024); CudaLaunchConfig::forward_group stays at most 8.
inline constexpr int kForwardMaxGroupThreads = 32;
// The TMA forward's pipeline depth bound (its barrier array).
inline constexpr int kMaxTmaStages = 8;
// The y stages of the TMA forward's store (CudaLaunchConfig::forward_tma_store):
// the TMA unit reads one while the threads write the next. At least 2 (the
// kernel waits for the store of pass i - 1 at the end of pass i; 2 leaves
// one pass of compute for it). A compile-time count: the wait's depth is an
// immediate of cp.async.bulk.wait_group.read.
inline constexpr int kTmaStoreStages = 2;
// Rows of this many 16-byte vectors or more (512 bytes: float32 C >= 128,
// 2-byte C >= 256) are wide: the forward's default plan gives them 8 lanes
// per row and, on the generic kernel, more rows in flight (forward_cuda.cu's
// plan_forward; PERFORMANCE.md, twenty-second session: float32 C = 512 and
// 1024 ran 1.2-1.35x faster, bfloat16 C = 384 1.4x).
inline constexpr int64_t kWideRowVectors = 32;
// The forward's default lanes per row for a row of `vectors` 16-byte
// vectors: 8 for wide rows, else the tuning's value for the element size, halved while more than
// an eighth of the group's lane steps would be idle (C = 48 float32 is 12
// vectors: 8 lanes take two steps with 4 lanes idle on the second, 4 lanes
// take three steps with none idle).
inline constexpr int forward_group_default(const Tuning& t, std::size_t elem_bytes,
                                           int64_t vectors) {
  if (vectors >= kWideRowVectors) return kForwardGroupThreads;
  int g = elem_bytes == 4 ? t.forward_group_4byte : t.forward_group_2byte;
  while (g > 1 && vectors > 0) {
    const int64_t slots = (vectors + g - 1) / g * g;
    if (8 * (slots - vectors) <= slots) break;
    g /= 2;
  }
  return g;
}

// Minimum resident CTAs of kMaxBlockThreads the forward kernel is compiled
// for (__launch_bounds__), per element size and rows in flight U: float32
// with U = 1 takes 3 (up to 80 registers a thread; 4 would cap it at 64,
// which spills); 2-byte types (their 8-wide step spilled a few values under
// 80 registers on sm_80) and more rows in flight (U raw vectors and U row
// sums each) take 2 (128 registers).
inline constexpr int forward_min_blocks(std::size_t elem_bytes, int rows_in_flight) {
  return (elem_bytes == 4 && rows_in_flight == 1) ? 3 : 2;
}
// The same for the backward kernel: 2 for every type and rows in flight (at
// most 128 registers). Float32 with one row in flight took 3 (80 registers)
// until its scalar sums and clip factor moved to float64 (DESIGN 45),
// which spilled there;
// its default is 2 rows in flight, which already ran at 2.
inline constexpr int backward_min_blocks(std::size_t elem_bytes, int rows_in_flight) {
  (void)elem_bytes;
  (void)rows_in_flight;
  return 2;
}

}  // namespace kasmina::cuda
