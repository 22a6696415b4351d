// CUDA backward, Hopper variant (sm_90): X and G reach shared memory by TMA,
// not by per-thread loads (CudaLaunchConfig::backward_tma; issue 7's "TMA
// loading" measured on the backward too).
//
// As the TMA forward (forward_tma_sm90.cu): thread 0 issues, per row pass of
// this CTA, a tensor-map copy of the pass's R rows x C columns of G (and of
// X, where the seed reads X: it blends, trains or is clamped) into one stage
// of a shared-memory ring, `stages` deep, each stage with an mbarrier that
// completes when both copies have landed. The CTA computes pass i from stage
// i % stages while the next ones are in flight; after a barrier (every
// thread done with the stage) thread 0 refills it with pass i + stages. Rows
// past N come zero-filled and are skipped.
//
// The math is backward_body.cuh's backward_cta with the TmaRing as its row
// source, the plan the generic one at one row in flight: dX is the generic
// kernel's bit for bit; the cross-CTA sums are too where both run the same
// tiles (the TMA kernel's larger shared memory can lower the tiles that fit
// one wave, and with them the order of the partials). The clip's norm and
// CONV's neighbours read the stage, not L1. The body compiles for sm_90
// only; the host runs it only on compute capability 9.x with sm_90a code.
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "cuda/backward_body.cuh"
#include "cuda/common.cuh"
#include "cuda/cuda_check.hpp"
#include "cuda/tma_sm90.cuh"
#include "kasmina/error.hpp"

namespace kasmina::cuda::bwd {
namespace {

struct TmaBackwardArgs {
  CUtensorMap map_x;  // x as a 2-D tensor [rows, hidden], box [R, C]
  CUtensorMap map_g;  // dy, the same box
  BackwardArgs bwd;
  int stages;
  int box_bytes;    // R * C * element size
  int half_bytes;   // box_bytes rounded up to 128: G's offset within a stage
  int ring_offset;  // the plan's dynamic shared memory (table + sums) ahead of the ring
};

// Device code for the host pass and sm_90 only (the PTX wrappers exist
// there alone; the sm_80 pass compiles an empty kernel).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
// A stage holds X's box at 0 and G's at half_bytes, each R rows of C
// elements (the box is dense: row pitch C).
struct TmaRing {
  static constexpr bool kStaged = true;
  unsigned char* ring;
  uint64_t* full;
  const TmaBackwardArgs* targs;
  int count;  // this CTA's passes
  int tile, tiles, seed;
  bool need_x;

  __device__ __forceinline__ int stage_bytes() const { return 2 * targs->half_bytes; }
  // Thread 0: pass i into stage i % stages.
  __device__ __forceinline__ void issue(int i) const {
    const int buf = i % targs->stages;
    unsigned char* st = ring + static_cast<std::size_t>(buf) * stage_bytes();
    const int box = targs->box_bytes;
    mbar_arrive_expect_tx(&full[buf], static_cast<unsigned>(need_x ? 2 * box : box));
    const int c0 = seed * targs->bwd.C;
    const int r0 = static_cast<int>((tile + static_cast<int64_t>(i) * tiles) * targs->bwd.rows_per_pass);
    if (need_x) tma_load_2d(st, &targs->map_x, c0, r0, &full[buf]);
    tma_load_2d(st + targs->half_bytes, &targs->map_g, c0, r0, &full[buf]);
  }
  __device__ __forceinline__ void wait(int i) const {
    mbar_wait(&full[i % targs->stages], static_cast<unsigned>(i / targs->stages) & 1u);
  }
  __device__ __forceinline__ void release(int i) const {
    __syncthreads();  // every thread is done with the stage: refill it
    if (threadIdx.x == 0 && i + targs->stages < count) issue(i + targs->stages);
  }
  template <typename T>
  __device__ __forceinline__ const T* x(int i, int local) const {
    return reinterpret_cast<const T*>(ring + static_cast<std::size_t>(i % targs->stages) * stage_bytes()) +
           static_cast<int64_t>(local) * targs->bwd.C;
  }
  template <typename T>
  __device__ __forceinline__ const T* g(int i, int local) const {
    return reinterpret_cast<const T*>(ring + static_cast<std::size_t>(i % targs->stages) * stage_bytes() +
                                      targs->half_bytes) +
           static_cast<int64_t>(local) * targs->bwd.C;
  }
};
#endif

template <typename T, int V>
__global__ void __launch_bounds__(kMaxBlockThreads, backward_min_blocks(sizeof(T), 1))
    backward_tma_kernel(const __grid_constant__ TmaBackwardArgs targs) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  pdl_prologue();
  extern __shared__ __align__(16) unsigned char tma_smem[];  // table + sums, 128 B slack, stages
  __shared__ uint64_t full[kMaxTmaStages];
  const BackwardArgs& args = targs.bwd;
  unsigned char* after = tma_smem + targs.ring_offset;
  // TMA destinations 128-byte aligned whatever the dynamic base.
  unsigned char* ring = after + ((128u - (smem_u32(after) & 127u)) & 127u);

  const int tiles = args.tiles;
  const int s = static_cast<int>(blockIdx.x) / tiles;
  const int tile = static_cast<int>(blockIdx.x) - s * tiles;
  const int64_t R = args.rows_per_pass;
  const int64_t passes = (args.rows + R - 1) / R;
  TmaRing rg;
  rg.ring = ring;
  rg.full = full;
  rg.targs = &targs;
  rg.count = tile < passes ? static_cast<int>((passes - 1 - tile) / tiles + 1) : 0;
  rg.tile = tile;
  rg.tiles = tiles;
  rg.seed = s;
  {
    // X is read where backward_cta's loops read it: every seed that blends
    // or trains, a copy seed under the clamp (uniform over the CTA).
    const SeedView sv = load_seed_view(args.seeds, args.registry, s, args.C);
    rg.need_x = sv.blends || sv.grafted || sv.shadow || args.clamp.enabled;
  }
  if (threadIdx.x == 0) {
    for (int k = 0; k < targs.stages; ++k) mbar_init(&full[k], 1u);
    fence_mbar_init();
    for (int i = 0; i < targs.stages && i < rg.count; ++i) rg.issue(i);
  }
  __syncthreads();
  backward_cta<T, V, 1, false>(args, reinterpret_cast<float*>(tma_smem), rg);
#else
  // No sm_90 code in this build: the host refuses TMA then; never run empty.
  (void)targs;
  __trap();
#endif
}

const void* kernel_for(DType dtype) {
  return with_storage_type(dtype, [](auto t) {
    using T = decltype(t);
    return reinterpret_cast<const void*>(&backward_tma_kernel<T, kTmaVector<T>>);
  });
}

bool has_sm90_code(DType dtype, int device) { return kernel_has_sm90_code(kernel_for(dtype), device); }

int box_bytes_of(const LaunchPlan& plan, const BackwardParams& p, int64_t C) {
  return static_cast<int>(static_cast<int64_t>(plan.rows_per_pass) * C *
                          static_cast<int64_t>(dtype_size(p.dtype)));
}
int half_bytes_of(int box_bytes) { return (box_bytes + 127) / 128 * 128; }

std::size_t smem_for(const LaunchPlan& plan, int stages, int box_bytes) {
  return plan.smem_bytes + 128 +
         static_cast<std::size_t>(stages) * 2u * static_cast<std::size_t>(half_bytes_of(box_bytes));
}

}  // namespace

const char* backward_tma_refusal(const BackwardParams& p, const LaunchPlan& plan,
                                 const DeviceInfo& dev, int64_t C, bool vector_path) {
  if (dev.cc_major != 9) return "TMA variant needs compute capability 9.x (sm_90a)";
  if (!has_sm90_code(p.dtype, dev.ordinal)) return "TMA variant needs a build with sm_90a code";
  if (!vector_path) return "TMA variant needs the 16-byte vector path";
  if (plan.conv_halo) return "TMA variant does not combine with backward_conv_halo";
  if (C > 256) return "TMA variant needs C <= 256 (one tensor-map box per row)";
  if (p.rows < 1) return "TMA variant needs N >= 1";
  // The box's coordinates are signed 32-bit values.
  if (p.rows > std::numeric_limits<int32_t>::max()) return "TMA variant needs N < 2^31";
  if (p.hidden > std::numeric_limits<int32_t>::max()) return "TMA variant needs hidden < 2^31";
  if (plan.rows_per_pass > 256) return "TMA variant needs <= 256 rows per pass (box height)";
  if (smem_for(plan, 2, box_bytes_of(plan, p, C)) > tuning_for(dev.cc_major).smem_budget_bytes) {
    return "TMA variant needs two stages within the shared-memory budget";
  }
  return nullptr;
}

LaunchPlan backward_tma_finish(LaunchPlan plan, const BackwardParams& p, const DeviceInfo& dev,
                               int resident_generic) {
  const Tuning& t = tuning_for(dev.cc_major);
  const int64_t C = p.hidden / p.num_seeds;
  const int box = box_bytes_of(plan, p, C);
  int stages = plan.stages != 0 ? plan.stages : t.tma_stage_budget_bytes / (2 * half_bytes_of(box));
  if (stages > kMaxTmaStages) stages = kMaxTmaStages;
  while (stages > 2 && smem_for(plan, stages, box) > t.smem_budget_bytes) --stages;
  const void* kernel = kernel_for(p.dtype);
  while (stages > 2 && resident_ctas_per_sm(kernel, plan.threads, smem_for(plan, stages, box)) <
                           resident_generic) {
    --stages;
  }
  if (stages < 2) stages = 2;
  plan.stages = stages;
  const int resident = resident_ctas_per_sm(kernel, plan.threads, smem_for(plan, stages, box));
  plan.tiles = tiles_for_rows(p.rows, plan.rows_per_pass, plan.tiles_max, resident, dev.sm_count,
                              p.num_seeds);
  finish_programmatic(plan, kernel, dev);
  return plan;
}

void backward_tma_launch(const LaunchPlan& plan, const BackwardParams& p, const BackwardArgs& args) {
  int device = 0;
  KASMINA_CUDA_CHECK(cudaGetDevice(&device));
  TmaBackwardArgs targs{};
  targs.map_x = tensor_map_2d(p.x, p.dtype, p.rows, p.hidden, args.x_stride, args.C,
                              args.rows_per_pass, device);
  targs.map_g = tensor_map_2d(p.dy, p.dtype, p.rows, p.hidden, args.dy_stride, args.C,
                              args.rows_per_pass, device);
  targs.bwd = args;
  targs.stages = plan.stages;
  targs.box_bytes = box_bytes_of(plan, p, args.C);
  targs.half_bytes = half_bytes_of(targs.box_bytes);
  targs.ring_offset = static_cast<int>(plan.smem_bytes);
  const std::size_t smem = smem_for(plan, plan.stages, targs.box_bytes);
  const unsigned grid = static_cast<unsigned>(plan.tiles) * static_cast<unsigned>(p.num_seeds);
  with_storage_type(p.dtype, [&](auto t) {
    using T = decltype(t);
    launch_kernel(&backward_tma_kernel<T, kTmaVector<T>>, plan, grid, smem, p.stream, targs);
  });
}

}  // namespace kasmina::cuda::bwd
