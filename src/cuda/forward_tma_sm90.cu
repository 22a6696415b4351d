// CUDA forward, Hopper variant (sm_90): the input reaches shared memory by
// TMA, not by per-thread loads.
//
// Why: the generic kernel keeps as many bytes in flight as its threads have
// registers for (one or a few 16-byte loads each); HBM wants more. Here one
// thread issues a tensor-map copy of a whole row pass (R rows x C columns of
// the seed's chunk) into one stage of a shared-memory ring, `stages` deep,
// each stage with an mbarrier that completes when its bytes have landed. The
// CTA computes on stage i while stages i+1 .. i+stages-1 are in flight; after
// a barrier (every thread done with the stage) the same thread refills it
// with pass i + stages. Rows past N come zero-filled and are skipped.
//
// The math is forward_body.cuh's forward_pass, the pass and row assignment
// those of the generic kernel with one row in flight, and the tiles are the
// generic kernel's (forward_cuda.cu): the same additions in the same order,
// so the same bits. The kernel's body compiles for sm_90 only; the host runs
// it only on compute capability 9.x (forward_tma_refusal), where the sm_90a
// cubin is what loads.
//
// y by TMA store (CudaLaunchConfig::forward_tma_store, the Store instances):
// the threads write a pass's y into a y stage laid out as the x stage (R rows
// of C elements), and thread 0 writes the stage out with one tensor-map
// store of the box (rows past N are clipped by the TMA unit). The y stages
// are a ring of their own (kTmaStoreStages), not the x stage: CONV reads
// the x neighbours of other lanes. Each thread's fence.proxy.async and the
// end-of-pass barrier order its y writes before the store; thread 0's wait
// for the store that last read the next pass's y stage sits before the same
// barrier, so the store adds no barrier. The x and y stages may exceed the
// 48 KiB every architecture gives, so these instances opt in to more (once
// per instance and device; tuning.hpp's tma_store_smem_bytes).
// Before the CTA's finish, thread 0 waits for its stores to complete: the
// shared memory stays live until they are read, and y is in global memory
// when the grid completes (what a programmatic dependent's
// griddepcontrol.wait waits for).
//
// Late dependents (CudaLaunchConfig::forward_late_dependents, the Late
// instances): no griddepcontrol.launch_dependents at all, so a programmatic
// dependent (the backward) starts as the forward's CTAs exit, not with the
// wait at the first statement: its early CTAs take no SM slots or
// bandwidth from the row passes (with the store an H200 lost 5 % of
// forward+backward at 16384x4096/64 to them, and 2-4 % with the trigger
// after the row loop; docs/DESIGN.md 63).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <set>
#include <utility>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/cuda_check.hpp"
#include "cuda/timeline.cuh"

#ifdef KASMINA_TIMELINE
namespace kasmina::cuda {
__device__ TimelineRecords g_forward_timeline;
}  // namespace kasmina::cuda
#define KASMINA_FWD_TL(slot) timeline_mark(g_forward_timeline, slot)
#define KASMINA_FWD_TL_LAST(last) timeline_flag(g_forward_timeline, 16, last)
#define KASMINA_FWD_TL_WHERE(seed, tile, passes) timeline_where(g_forward_timeline, seed, tile, passes)
#endif

#include "cuda/forward_body.cuh"
#include "cuda/tma_sm90.cuh"
#include "kasmina/error.hpp"

namespace kasmina::cuda {
namespace {

struct TmaForwardArgs {
  CUtensorMap map;  // x as a 2-D tensor [rows, hidden], box [R, C] (64-byte aligned),
                    // or for C > 256 the 3-D view of tensor_map_rows
  ForwardArgs fwd;
  int stages;
  int stage_bytes;  // R * C * element size
  int boxes;        // column blocks of a chunk row (tma_row_boxes): 1 for a 2-D map
  // y, the same box: the Store instances only. Last, so the other fields'
  // offsets (and the default instances' code) are those without it;
  // 64-byte aligned as CUtensorMap is declared.
  CUtensorMap map_y;
};
static_assert(offsetof(TmaForwardArgs, map_y) % 64 == 0, "a tensor map must be 64-byte aligned");

// ------------------------------------------------------------------ kernel

// Store: y by TMA store; Late: dependents launched at the CTAs' exit (see
// the top of this file); Wide: row groups of 16 or 32 lanes (the plan of
// chunks whose 8-lane boxes do not fit two stages in the opt-in; never with
// Store, which takes one box per row, C <= 256). The default instance (all
// false) is the plain TMA forward.
template <typename T, int V, bool Store, bool Late, bool Wide>
__global__ void __launch_bounds__(kMaxBlockThreads, forward_min_blocks(sizeof(T), 1))
    forward_tma_kernel(const __grid_constant__ TmaForwardArgs targs) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  if constexpr (Late) {
    pdl_wait();
  } else {
    pdl_prologue();
  }
  KASMINA_FWD_TL(0);
  // 128 bytes of slack, x stages, y stages (Store), coefficient table.
  extern __shared__ unsigned char tma_smem[];
  __shared__ uint64_t full[kMaxTmaStages];
  const ForwardArgs& args = targs.fwd;
  const int stages = targs.stages;
  const int stage_bytes = targs.stage_bytes;
  // TMA sources and destinations 128-byte aligned whatever the dynamic base;
  // a stage's bytes are a multiple of 128 (R >= 8 rows of 16-byte multiples).
  unsigned char* ring = tma_smem + ((128u - (smem_u32(tma_smem) & 127u)) & 127u);
  unsigned char* y_ring = ring + static_cast<std::size_t>(stages) * stage_bytes;
  // 16-byte aligned (mode_coefs): a stage is rows x C elements of 16-byte rows.
  float* table_mem = reinterpret_cast<float*>(
      y_ring + static_cast<std::size_t>(Store ? kTmaStoreStages : 0) * stage_bytes);

  const int tiles = args.tiles;
  const int s = static_cast<int>(blockIdx.x) / tiles;
  const int tile = static_cast<int>(blockIdx.x) - s * tiles;
  const int C = args.C;
  const int G = args.group;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int group = static_cast<int>(threadIdx.x) / G;
  const int64_t N = args.rows;
  const int64_t R = args.rows_per_pass;
  const int64_t passes = (N + R - 1) / R;
  const int count = tile < passes ? static_cast<int>((passes - 1 - tile) / tiles + 1) : 0;

  // The first row of this CTA's pass i.
  const auto row0 = [&](int i) {
    return static_cast<int>((tile + static_cast<int64_t>(i) * tiles) * R);
  };
  const auto issue = [&](int i) {  // thread 0: pass i of this CTA into stage i % stages
    const int buf = i % stages;
    mbar_arrive_expect_tx(&full[buf], static_cast<unsigned>(stage_bytes));
    if (targs.boxes == 1) {
      tma_load_2d(ring + static_cast<std::size_t>(buf) * stage_bytes, &targs.map, s * C, row0(i),
                  &full[buf]);
    } else {  // the seed's column blocks s * boxes .. (s + 1) * boxes - 1
      tma_load_3d(ring + static_cast<std::size_t>(buf) * stage_bytes, &targs.map, s * targs.boxes,
                  row0(i), &full[buf]);
    }
  };
  if (threadIdx.x == 0) {
    for (int k = 0; k < stages; ++k) mbar_init(&full[k], 1u);
    fence_mbar_init();
    // The first stages are in flight before the seed's view loads.
    for (int i = 0; i < stages && i < count; ++i) issue(i);
  }
  __syncthreads();
  KASMINA_FWD_TL(1);
  KASMINA_FWD_TL_WHERE(s, tile, count);

  const CtaSeed cs = setup_seed(args, s, table_mem);
  KASMINA_FWD_TL(2);
  ThreadStats st = ThreadStats::identity<T>();
  [[maybe_unused]] const int64_t col0 = static_cast<int64_t>(s) * C;  // y's chunk (not Store)
  [[maybe_unused]] T* y = static_cast<T*>(args.y);
  with_mode(cs.mode, args.clamp.enabled, [&](auto m, auto clamp) {
    for (int i = 0; i < count; ++i) {
      const int buf = i % stages;
      mbar_wait(&full[buf], static_cast<unsigned>(i / stages) & 1u);
      if (i == 0) KASMINA_FWD_TL(3);
      const int64_t n = (tile + static_cast<int64_t>(i) * tiles) * R + group;
      PassRows<T, 1, Store> r;
      r.active[0] = n < N;
      r.x[0] = reinterpret_cast<const T*>(ring + static_cast<std::size_t>(buf) * stage_bytes) +
               static_cast<int64_t>(group) * C;
      if constexpr (Store) {
        r.y[0] = reinterpret_cast<T*>(y_ring + static_cast<std::size_t>(i % kTmaStoreStages) *
                                                   stage_bytes) +
                 static_cast<int64_t>(group) * C;
      } else {
        r.y[0] = y + (r.active[0] ? n : 0) * args.y_stride + col0;
      }
      forward_pass<T, V, 1, decltype(m)::value, decltype(clamp)::value, Store, Wide>(
          args, cs.sv, cs.table, r, lane, st);
      if constexpr (Store) {
        // This thread's y-stage writes before the async proxy's reads (the
        // store thread 0 issues after the barrier).
        fence_proxy_async_shared();
        // The store that last read the y stage of pass i + 1 (that of pass
        // i + 1 - kTmaStoreStages; thread 0 has committed up to pass i - 1)
        // is done reading before any thread passes the barrier to write it.
        if (threadIdx.x == 0) bulk_wait_group_read<kTmaStoreStages - 2>();
      }
      __syncthreads();  // every thread is done with the stage: refill it
      if (threadIdx.x == 0) {
        if (i + stages < count) issue(i + stages);
        if constexpr (Store) {
          tma_store_2d(&targs.map_y, s * C, row0(i),
                       y_ring + static_cast<std::size_t>(i % kTmaStoreStages) * stage_bytes);
          bulk_commit_group();
        }
      }
    }
  });
  // The stores complete before the y stages go (the CTA's exit) and before
  // the grid counts as complete.
  if constexpr (Store) {
    if (threadIdx.x == 0) bulk_wait_all();
  }
  // Late: no launch_dependents; the dependents launch at the CTAs' exit.
  KASMINA_FWD_TL(4);
  finish_seed<T>(args, s, tile, cs.sv.blends, st);
  KASMINA_FWD_TL(7);
#else
  // No sm_90 code in this build (e.g. only compute_80 PTX, JIT-compiled on a
  // Hopper): the host refuses TMA then (forward_tma_refusal); never run empty.
  (void)targs;
  __trap();
#endif
}

using TmaKernel = void (*)(TmaForwardArgs);

// The kernel instance of (dtype, store, late, wide); wide plans never store
// (forward_tma_finish: the store needs one box per row).
TmaKernel instance(DType dtype, bool store, bool late, bool wide) {
  KASMINA_CHECK_RUNTIME(!(store && wide), "internal: the TMA store with row groups over ",
                        kForwardGroupThreads, " lanes");
  return with_storage_type(dtype, [&](auto t) -> TmaKernel {
    using T = decltype(t);
    constexpr int V = kTmaVector<T>;
    if (wide) {
      return late ? &forward_tma_kernel<T, V, false, true, true>
                  : &forward_tma_kernel<T, V, false, false, true>;
    }
    if (store) {
      return late ? &forward_tma_kernel<T, V, true, true, false>
                  : &forward_tma_kernel<T, V, true, false, false>;
    }
    return late ? &forward_tma_kernel<T, V, false, true, false>
                : &forward_tma_kernel<T, V, false, false, false>;
  });
}

// The Store instances, and the plain ones for wide chunks, may take the
// tuning's opt-in of dynamic shared memory: set once per instance and
// device, before the occupancy query (which counts no CTA above 48 KiB
// without it) and the launch.
void allow_opt_in_smem(const void* kernel, const DeviceInfo& dev) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  const std::pair<const void*, int> key{kernel, dev.ordinal};
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count(key) != 0) return;
  KASMINA_CUDA_CHECK(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
      static_cast<int>(tuning_for(dev.cc_major).tma_store_smem_bytes)));
  done.insert(key);
}

// Row groups wider than 8 lanes: the Wide instances.
bool wide_groups(const LaunchPlan& plan) { return plan.group > kForwardGroupThreads; }

// The instance of (dtype, store, late, wide) as the occupancy query and the
// launch take it (the shared-memory opt-in set with the store or where
// opt_in says).
const void* kernel_for(DType dtype, bool store, bool late, bool wide, const DeviceInfo& dev,
                       bool opt_in = false) {
  const void* kernel = reinterpret_cast<const void*>(instance(dtype, store, late, wide));
  if (store || opt_in) allow_opt_in_smem(kernel, dev);
  return kernel;
}

// Every instance is compiled for the same architectures: the default one
// answers for all.
bool has_sm90_code(DType dtype, int device) {
  return kernel_has_sm90_code(reinterpret_cast<const void*>(instance(dtype, false, false, false)),
                              device);
}

// With the store (asked for or decided: plan.tma_store) its y stages too.
std::size_t smem_for(const LaunchPlan& plan, int stages, int stage_bytes) {
  const int y_stages = plan.tma_store ? kTmaStoreStages : 0;
  return 128 + static_cast<std::size_t>(stages + y_stages) * static_cast<std::size_t>(stage_bytes) +
         plan.smem_bytes;  // plan.smem_bytes: the coefficient table (0 without it)
}

int stage_bytes_of(const LaunchPlan& plan, const ForwardParams& p, int64_t C) {
  return static_cast<int>(static_cast<int64_t>(plan.rows_per_pass) * C *
                          static_cast<int64_t>(dtype_size(p.dtype)));
}

// nullptr when the store can run with this plan (plan.tma_boxes set): one
// box per row, its y stages and two x stages within the opt-in, holding no
// fewer CTAs per SM than the generic kernel (whose tiles are one wave);
// else why not.
const char* store_refusal(const LaunchPlan& plan, const ForwardParams& p, const DeviceInfo& dev,
                          int stage_bytes, int resident_generic) {
  if (plan.tma_boxes != 1) return "TMA store needs C <= 256 (one tensor-map box per row)";
  if (wide_groups(plan)) return "TMA store needs at most 8 lanes per row";
  const std::size_t smem = smem_for(plan, 2, stage_bytes);
  if (smem > tuning_for(dev.cc_major).tma_store_smem_bytes) {
    return "TMA store needs its y stages and two x stages within the shared-memory opt-in";
  }
  const void* kernel = kernel_for(p.dtype, true, plan.late_dependents, false, dev);
  if (resident_ctas_per_sm(kernel, plan.threads, smem) < resident_generic) {
    return "TMA store's shared memory would hold fewer CTAs per SM than the generic kernel";
  }
  return nullptr;
}

}  // namespace

#ifdef KASMINA_TIMELINE
void forward_timeline_reset() { timeline_reset(g_forward_timeline); }
std::vector<unsigned long long> forward_timeline(int ctas) { return timeline_read(g_forward_timeline, ctas); }
#endif

bool forward_tma_stages_fit(const LaunchPlan& plan, const ForwardParams& p, const DeviceInfo& dev,
                            int64_t C, int stages, bool opt_in) {
  const Tuning& t = tuning_for(dev.cc_major);
  return smem_for(plan, stages, stage_bytes_of(plan, p, C)) <=
         (opt_in ? t.tma_store_smem_bytes : t.smem_budget_bytes);
}

const char* forward_tma_refusal(const ForwardParams& p, const LaunchPlan& plan,
                                const DeviceInfo& dev, int64_t C, bool vector_path) {
  if (dev.cc_major != 9) return "TMA variant needs compute capability 9.x (sm_90a)";
  if (!has_sm90_code(p.dtype, dev.ordinal)) return "TMA variant needs a build with sm_90a code";
  if (!vector_path) return "TMA variant needs the 16-byte vector path";
  if (tma_row_boxes(C, dtype_size(p.dtype)) == 0) {
    return "TMA variant needs C <= 256, or C split into column blocks of at most 256 values and "
           "16-byte multiples";
  }
  if (p.rows < 1) return "TMA variant needs N >= 1";
  // The box's row coordinate is a signed 32-bit value.
  if (p.rows > std::numeric_limits<int32_t>::max()) return "TMA variant needs N < 2^31";
  if (plan.rows_per_pass > 256) return "TMA variant needs <= 256 rows per pass (box height)";
  const Tuning& t = tuning_for(dev.cc_major);
  // Beyond the budget every architecture gives, two x stages may take the
  // opt-in (wide chunks; forward_tma_finish checks the CTAs per SM).
  const std::size_t two = smem_for(plan, 2, stage_bytes_of(plan, p, C));
  if (two > t.smem_budget_bytes && two > t.tma_store_smem_bytes) {
    return "TMA variant needs two stages within the shared-memory opt-in";
  }
  return nullptr;
}

LaunchPlan forward_tma_finish(LaunchPlan plan, const ForwardParams& p, const DeviceInfo& dev,
                              int resident_generic) {
  const Tuning& t = tuning_for(dev.cc_major);
  const int64_t C = p.hidden / p.num_seeds;
  const int sb = stage_bytes_of(plan, p, C);
  plan.tma_boxes = tma_row_boxes(C, dtype_size(p.dtype));
  if (plan.tma_store) {
    plan.tma_store_refusal = store_refusal(plan, p, dev, sb, resident_generic);
    plan.tma_store = plan.tma_store_refusal == nullptr;
    if (!plan.tma_store && plan.late_auto) plan.late_dependents = false;
  }
  // Without the store, x stages that do not fit two within the budget every
  // architecture gives take the opt-in (forward_tma_refusal let them).
  plan.tma_x_opt_in = !plan.tma_store && smem_for(plan, 2, sb) > t.smem_budget_bytes;
  const bool opt_in = plan.tma_store || plan.tma_x_opt_in;
  int stages = plan.stages;
  if (stages == 0) {
    stages = (plan.tma_store ? t.tma_store_stage_budget_bytes : t.tma_stage_budget_bytes) / sb;
  }
  if (stages > kMaxTmaStages) stages = kMaxTmaStages;
  // Within the budget every architecture gives without an opt-in, or the
  // opt-in.
  const std::size_t budget = opt_in ? t.tma_store_smem_bytes : t.smem_budget_bytes;
  while (stages > 2 && smem_for(plan, stages, sb) > budget) --stages;
  // No fewer CTAs per SM than the generic kernel: its tiles are one wave.
  const void* kernel =
      kernel_for(p.dtype, plan.tma_store, plan.late_dependents, wide_groups(plan), dev,
                 plan.tma_x_opt_in);
  while (stages > 2 &&
         resident_ctas_per_sm(kernel, plan.threads, smem_for(plan, stages, sb)) < resident_generic) {
    --stages;
  }
  // Two stages in the opt-in that would hold fewer: the generic kernel runs
  // (plan_and_launch), and says why.
  if (plan.tma_x_opt_in &&
      resident_ctas_per_sm(kernel, plan.threads, smem_for(plan, 2, sb)) < resident_generic) {
    plan.tma = false;
    plan.tma_x_opt_in = false;
    plan.late_dependents = false;  // a TMA kernel's switch
    plan.rows_source = "the TMA plan's";
    plan.tma_refusal =
        "TMA variant's two stages in the shared-memory opt-in would hold fewer CTAs per SM than the "
        "generic kernel";
    return plan;
  }
  if (stages < 2) stages = 2;
  plan.stages = stages;
  finish_programmatic(plan, kernel, dev);
  return plan;
}

void forward_tma_launch(const LaunchPlan& plan, const ForwardParams& p, const ForwardArgs& args) {
  int device = 0;
  KASMINA_CUDA_CHECK(cudaGetDevice(&device));
  TmaForwardArgs targs{};
  targs.boxes = plan.tma_boxes;
  targs.map = tensor_map_rows(p.x, p.dtype, p.rows, p.hidden, args.x_stride, args.C,
                              args.rows_per_pass, targs.boxes, device);
  if (plan.tma_store) {
    targs.map_y = tensor_map_2d(p.y, p.dtype, p.rows, p.hidden, args.y_stride, args.C,
                                args.rows_per_pass, device);
  }
  targs.fwd = args;
  targs.stages = plan.stages;
  targs.stage_bytes = stage_bytes_of(plan, p, args.C);
  const std::size_t smem = smem_for(plan, plan.stages, targs.stage_bytes);
  const unsigned grid = static_cast<unsigned>(plan.tiles) * static_cast<unsigned>(p.num_seeds);
  launch_kernel(instance(p.dtype, plan.tma_store, plan.late_dependents, wide_groups(plan)), plan,
                grid, smem, p.stream, targs);
}

}  // namespace kasmina::cuda
