// CUDA forward (SPEC sections 3 and 4): one launch reads every chunk once,
// writes y and computes all telemetry.
//
// Grid: (row tiles x seeds), flattened. A CTA works on one seed's chunk; its
// threads form row groups of G lanes (a power of two <= 8; up to 32 in the
// TMA kernel's plan for wide chunks, forward_tma_sm90.cu; tuning.hpp), each
// group covers one chunk row V elements per lane per step (16-byte accesses
// on the vector path) and loops along the row when C > G*V. The CTA visits
// row passes tile, tile + tiles, ... so the tile count, and with it the
// workspace, does not depend on N. The blueprint's per-column coefficients
// (w, or softmax(w) for ATTENTION) sit in a shared-memory table built once
// per CTA. The row loop is specialised per seed kind and clamp (template),
// picked once per CTA: a copy seed only copies and measures.
//
// Telemetry: per-thread statistics (shifted sums folded into Chan-merged
// moments, DESIGN 30; the drift's row sums in float64 for float32 inputs,
// DESIGN 28), a fixed shuffle/warp-order block reduction (sums in two
// chains per level, DESIGN 64; counts and extremes by the warp's integer
// reduction, DESIGN 65) into one partial per CTA in the
// workspace, and the last CTA of each seed (an integer ticket taken with
// acquire-release semantics) merges the seed's partials in a fixed tree, writes the
// telemetry row, clears the partials and resets its ticket, so the
// workspace is zero again. No floating-point
// atomics: the bits depend only on the launch plan, which depends only on
// the params and the device.
#include <cuda_runtime.h>

#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "backends.hpp"
#include "cuda/common.cuh"
#include "cuda/forward_body.cuh"
#include "cuda/cuda_check.hpp"
#include "kasmina/error.hpp"

namespace kasmina::cuda {
namespace {

// The generic kernel's row loop: the CTA visits row passes tile,
// tile + tiles, ...; each thread loads its U rows' vectors from global
// memory, and asks L2 for the next pass's rows first (two passes in flight).
template <typename T, int V, int U, Mode M, bool Clamp>
__device__ __forceinline__ void forward_rows(const ForwardArgs& args, const CtaSeed& cs,
                                             int64_t col0, int tile, int lane, int group,
                                             ThreadStats& st) {
  const int C = args.C;
  const int step = args.group * V;
  const int tiles = args.tiles;
  const int64_t RG = args.row_groups;
  const int64_t R = args.rows_per_pass;
  const int64_t N = args.rows;
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  for (int64_t pass = tile; pass * R < N; pass += tiles) {
    const int64_t n0 = pass * R + group;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t n = n0 + tiles * R + u * RG;
      if (n < N) {
        const T* p = x + n * args.x_stride + col0;
        for (int c = lane * V; c < C; c += step) prefetch_l2(p + c);
      }
    }
    PassRows<T, U> r;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t n = n0 + u * RG;
      r.active[u] = n < N;
      const int64_t nn = r.active[u] ? n : 0;  // no pointer past the tensor
      r.x[u] = x + nn * args.x_stride + col0;
      r.y[u] = y + nn * args.y_stride + col0;
    }
    forward_pass<T, V, U, M, Clamp>(args, cs.sv, cs.table, r, lane, st);
  }
}

// One CTA of one forward problem: block is its index in the problem's grid
// (tiles x seeds). The plain kernel runs one problem; the streaming kernel
// runs several in one launch (forward_many).
template <typename T, int V, int U>
__device__ __forceinline__ void forward_cta(const ForwardArgs& args, int block) {
  // [C] when args.coef_table; float4 for 16-byte alignment (mode_coefs).
  extern __shared__ float4 coef_smem4[];
  float* const coef_smem = reinterpret_cast<float*>(coef_smem4);
  const int tiles = args.tiles;
  const int s = block / tiles;
  const int tile = block - s * tiles;
  const int C = args.C;
  const int G = args.group;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int group = static_cast<int>(threadIdx.x) / G;
  const int64_t N = args.rows;

  // The thread's first vectors on their way to L2 while the seed's view and
  // coefficients load (a small batch is otherwise a chain of round trips).
  {
    const int64_t n0 = static_cast<int64_t>(tile) * args.rows_per_pass + group;
    const int c = lane * V;
    if (c < C) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t n = n0 + static_cast<int64_t>(u) * args.row_groups;
        if (n < N) {
          const T* p = static_cast<const T*>(args.x) + n * args.x_stride +
                       static_cast<int64_t>(s) * C + c;
          prefetch_l2(p);
        }
      }
    }
  }

  const CtaSeed cs = setup_seed(args, s, coef_smem);
  ThreadStats st = ThreadStats::identity<T>();
  const int64_t col0 = static_cast<int64_t>(s) * C;
  with_mode(cs.mode, args.clamp.enabled, [&](auto m, auto clamp) {
    forward_rows<T, V, U, decltype(m)::value, decltype(clamp)::value>(args, cs, col0, tile, lane,
                                                                      group, st);
  });
  finish_seed<T>(args, s, tile, cs.sv.blends, st);
}

template <typename T, int V, int U>
__global__ void __launch_bounds__(kMaxBlockThreads, forward_min_blocks(sizeof(T), U))
    forward_kernel(const ForwardArgs args) {
  pdl_prologue();
  forward_cta<T, V, U>(args, static_cast<int>(blockIdx.x));
}

// The streaming entry point: up to kMaxStreamed problems of one kernel
// variant in one launch, CTAs numbered problem after problem.
constexpr int kMaxStreamed = 16;
struct StreamArgs {
  int count;
  int first_block[kMaxStreamed + 1];  // prefix sums of the problems' grids
  ForwardArgs problem[kMaxStreamed];
};
// Kernel parameters up to 32 KiB need CUDA 12.1 and sm_70 or newer (here: sm_80, sm_90a).
static_assert(sizeof(StreamArgs) <= 32764, "the streaming kernel's parameters exceed 32 KiB");

// A problem picked by a run-time index reads its fields through generic
// loads and keeps more of them in registers: the streaming kernel (for small
// inputs, where the launch gap dominates) takes up to 255 registers.
template <typename T, int V, int U>
__global__ void __launch_bounds__(kMaxBlockThreads, 1)
    forward_stream_kernel(const __grid_constant__ StreamArgs args) {
  pdl_prologue();
  const int b = static_cast<int>(blockIdx.x);
  int p = 0;
  while (p + 1 < args.count && b >= args.first_block[p + 1]) ++p;  // uniform over the CTA
  forward_cta<T, V, U>(args.problem[p], b - args.first_block[p]);
}

struct Resolved {
  int64_t C;
  int64_t x_stride;
  int64_t y_stride;
  bool vector;
  const char* why;
};

Resolved resolve(const ForwardParams& p) {
  Resolved r{};
  r.C = p.hidden / p.num_seeds;
  r.x_stride = p.x_row_stride != 0 ? p.x_row_stride : p.hidden;
  r.y_stride = p.y_row_stride != 0 ? p.y_row_stride : p.hidden;
  const VectorAccess va = vector_access(r.C, dtype_size(p.dtype), {p.x, p.y},
                                        {r.x_stride, r.y_stride}, "x or y is not 16-byte aligned");
  r.vector = va.vector;
  r.why = va.why;
  return r;
}

int tiles_max_for(int32_t num_seeds, const DeviceInfo& dev) {
  return tiles_per_seed_bound(num_seeds, tuning_for(dev.cc_major), dev.sm_count);
}

// allow_tma false: the generic kernel's plan whatever the selection says
// (the streaming kernel is the generic one).
LaunchPlan plan_forward(const ForwardParams& p, const DeviceInfo& dev, bool allow_tma = true) {
  const Resolved r = resolve(p);
  const Tuning& t = tuning_for(dev.cc_major);
  LaunchPlan plan;
  plan.vector = r.vector ? kVectorBytes / static_cast<int>(dtype_size(p.dtype)) : 1;
  // Lanes per row (select_forward_group): at most the row's vectors rounded
  // up to a power of two, so no lane of a group is idle for a whole row.
  const LaunchKnobs knobs = launch_knobs(dev, p.dtype, p.rows, p.hidden);
  const GroupChoice gc = select_forward_group(dev, knobs, r.C / plan.vector, r.vector);
  plan.group = gc.group;
  plan.group_source = gc.source;
  const ThreadsChoice tc = select_forward_threads(dev, knobs);
  plan.threads = tc.threads;
  plan.threads_source = tc.source;
  const int needed = next_pow2(ceil_div(r.C, plan.vector));
  // A batch smaller than a pass keeps wider groups by default: its rows are
  // latency, and fewer lanes per row would only lengthen each lane's chain
  // (16x4096/64 float32: 9.5 us with 8 lanes, 10.6 with 4, 13.2 with 1).
  if (std::string_view(gc.source) == "default") {
    while (plan.group < kForwardGroupThreads && plan.group < needed &&
           static_cast<int64_t>(plan.threads / plan.group) > p.rows) {
      plan.group *= 2;
    }
  }
  if (plan.group > needed) plan.group = needed;
  // The scalar path (a fallback for odd shapes and pointers) keeps one row.
  const RowsChoice choice = select_rows_in_flight(true, dev, knobs);
  plan.rows_in_flight = r.vector ? choice.rows : 1;
  plan.rows_source = r.vector ? choice.source : "scalar path";
  // Wide rows (kWideRowVectors) by default: each lane walks many vectors of
  // a row one load at a time, so as many rows in flight as the kernel takes
  // (4, or 2 for 2-byte types), while the row passes over the seeds still
  // give every SM one (at 8192x768/2 four rows left 128 CTAs and ran slower
  // than two; PERFORMANCE.md, twenty-second session).
  if (r.vector && std::string_view(choice.source) == "default" &&
      r.C / plan.vector >= kWideRowVectors) {
    int u = dtype_size(p.dtype) == 4 ? 4 : 2;
    const int64_t groups = plan.threads / plan.group;
    while (u > 1 && ceil_div(p.rows, groups * u) * p.num_seeds < dev.sm_count) {
      u /= 2;
    }
    plan.rows_in_flight = u;
    plan.rows_source = "default for wide rows";
  }
  // 2-byte types at most 2: their 8-wide step with four rows spilled on
  // sm_80 (and ran no faster than two on the H100).
  if (dtype_size(p.dtype) == 2 && plan.rows_in_flight > 2) plan.rows_in_flight = 2;
  // No more rows in flight than a small batch fills: a thread's extra rows
  // would be idle and their code colder (16x4096/64 ran 11.3 us with 4 and
  // 9.5 us with 1, docs/PERFORMANCE.md).
  while (plan.rows_in_flight > 1 &&
         static_cast<int64_t>(plan.threads / plan.group) * (plan.rows_in_flight / 2) >= p.rows) {
    plan.rows_in_flight /= 2;
  }
  plan.rows_per_pass = plan.threads / plan.group * plan.rows_in_flight;
  plan.tiles_max = tiles_max_for(p.num_seeds, dev);
  // The coefficient table when it fits the shared memory every architecture
  // gives without an opt-in; wider chunks compute coefficients on the fly.
  const std::size_t table = static_cast<std::size_t>(r.C) * sizeof(float);
  plan.smem_bytes = table <= t.smem_budget_bytes ? table : 0;
  plan.tiles = plan.tiles_max;  // refined by finish_plan() for the kernel that runs
  // The variant: TMA where selected and possible, with the generic kernel's
  // plan for 1 row in flight (the same passes, so the same bits).
  plan.programmatic_asked = knobs.set.programmatic_launch;
  const VariantChoice vc = select_forward_variant(dev, knobs);
  plan.variant_source = vc.source;
  if (vc.variant == CudaForwardVariant::tma && allow_tma) {
    LaunchPlan one = plan;
    one.rows_in_flight = 1;
    one.rows_source = "TMA variant";
    one.rows_per_pass = plan.threads / plan.group;
    // A default group widens until the pipeline's stages (those asked for,
    // at least two) fit: fewer lanes per row mean taller boxes. Up to 8
    // lanes (kForwardGroupThreads) within the shared memory every
    // architecture gives; from 8 lanes on, wide chunks take the opt-in
    // (forward_tma_finish), and the group widens further, up to a warp,
    // only while even two stages do not fit that (float32 C = 512 and
    // 1024, 2-byte C = 1024, which would otherwise run the generic kernel;
    // stages asked for beyond two do not widen it), and while boxes keep 8
    // rows (a stage then stays a multiple of 128 bytes, the alignment of
    // the TMA copies' destinations).
    if (std::string_view(plan.group_source) == "default" && r.vector) {
      const int want = vc.stages > 2 ? vc.stages : 2;
      const auto fits = [&](const LaunchPlan& q) {
        const bool opt_in = q.group >= kForwardGroupThreads;
        return forward_tma_stages_fit(q, p, dev, r.C, opt_in ? 2 : want, opt_in);
      };
      while (one.group < kForwardMaxGroupThreads && one.group < needed &&
             (one.group < kForwardGroupThreads || plan.threads / (2 * one.group) >= 8) &&
             !fits(one)) {
        one.group *= 2;
        one.rows_per_pass = plan.threads / one.group;
      }
    }
    plan.tma_refusal = forward_tma_refusal(p, one, dev, r.C, r.vector);
    if (plan.tma_refusal == nullptr) {
      plan = one;
      plan.tma = true;
      plan.stages = vc.stages;
      // Asked for; forward_tma_finish decides whether the store's stages fit.
      const CudaSwitch store = knobs.set.forward_tma_store;
      const bool* store_default =
          knobs.elem_bytes == 4 ? t.forward_tma_store_4byte : t.forward_tma_store_2byte;
      plan.tma_store = store == CudaSwitch::automatic ? store_default[static_cast<int>(knobs.shape)]
                                                      : store == CudaSwitch::on;
      plan.tma_store_source = store == CudaSwitch::automatic ? "default" : "set";
      const CudaSwitch late = knobs.set.forward_late_dependents;
      plan.late_auto = late == CudaSwitch::automatic;
      plan.late_dependents = plan.late_auto ? plan.tma_store : late == CudaSwitch::on;
    }
  }
  return plan;
}

std::size_t tickets_bytes(int32_t num_seeds) {
  return align_up(static_cast<std::size_t>(num_seeds) * sizeof(unsigned), 256);
}

// flat: CudaLaunchConfig::forward_flat_reduction (one partial per thread).
std::size_t workspace_bytes(const ForwardParams& p, const DeviceInfo& dev, bool flat) {
  const std::size_t per_tile = flat ? static_cast<std::size_t>(kMaxBlockThreads) : 1;
  return tickets_bytes(p.num_seeds) + static_cast<std::size_t>(p.num_seeds) *
                                          static_cast<std::size_t>(tiles_max_for(p.num_seeds, dev)) *
                                          per_tile * sizeof(FwdStats);
}

bool flat_reduction() { return kasmina::cuda_launch_config().forward_flat_reduction; }

template <typename T, int V, int U>
LaunchPlan finish_plan(LaunchPlan plan, const ForwardParams& p, const DeviceInfo& dev) {
  const void* kernel = reinterpret_cast<const void*>(&forward_kernel<T, V, U>);
  plan.tiles = tiles_for_kernel(kernel, plan, p.rows, p.num_seeds, dev.sm_count);
  finish_programmatic(plan, kernel, dev);
  return plan;
}

ForwardArgs make_args(const ForwardParams& p, const LaunchPlan& plan, bool flat = false) {
  const Resolved r = resolve(p);
  ForwardArgs args{};
  args.flat = flat;
  args.x = p.x;
  args.y = p.y;
  args.rows = p.rows;
  args.x_stride = r.x_stride;
  args.y_stride = r.y_stride;
  args.C = static_cast<int>(r.C);
  args.group = plan.group;
  args.row_groups = plan.threads / plan.group;
  args.rows_per_pass = plan.rows_per_pass;
  args.coef_table = plan.smem_bytes > 0;
  args.seeds = p.seeds;
  args.registry = p.registry;
  args.clamp = p.clamp;
  args.dead_threshold = p.dead_threshold;
  args.telemetry = p.telemetry;
  args.nonfinite_count = p.nonfinite_count;
  auto* base = static_cast<unsigned char*>(p.workspace);
  args.tickets = reinterpret_cast<unsigned*>(base);
  args.partials = reinterpret_cast<FwdStats*>(base + tickets_bytes(p.num_seeds));
  return args;
}

LaunchPlan dispatch(const LaunchPlan& plan, const ForwardParams& p, const DeviceInfo& dev,
                    ForwardArgs* args);

template <typename T, int V, int U>
LaunchPlan plan_and_launch(LaunchPlan plan, const ForwardParams& p, const DeviceInfo& dev,
                           ForwardArgs* args) {
  plan = finish_plan<T, V, U>(plan, p, dev);
  if constexpr (U == 1 && V > 1) {
    if (plan.tma) {
      const int resident = resident_ctas_per_sm(
          reinterpret_cast<const void*>(&forward_kernel<T, V, 1>), plan.threads, plan.smem_bytes);
      plan = forward_tma_finish(plan, p, dev, resident);
      if (plan.tma) {
        if (args != nullptr) {
          args->tiles = plan.tiles;
          forward_tma_launch(plan, p, *args);
        }
        return plan;
      }
      // Refused at the finish (forward_tma_finish says why): the generic
      // kernel with the TMA plan's passes (finish_plan above), or where
      // those have row groups over 8 lanes (its group_sum3 takes at most
      // 8), with its own plan.
      if (plan.group > kForwardGroupThreads) {
        LaunchPlan generic = plan_forward(p, dev, false);
        generic.tma_refusal = plan.tma_refusal;
        if (args == nullptr) return dispatch(generic, p, dev, nullptr);
        ForwardArgs generic_args = make_args(p, generic, args->flat);
        return dispatch(generic, p, dev, &generic_args);
      }
    }
  }
  KASMINA_CHECK_RUNTIME(plan.group <= kForwardGroupThreads, "internal: the generic forward with ",
                        plan.group, " lanes per row");
  if (args == nullptr) return plan;
  args->tiles = plan.tiles;
  const unsigned grid = static_cast<unsigned>(plan.tiles) * static_cast<unsigned>(p.num_seeds);
  launch_kernel(&forward_kernel<T, V, U>, plan, grid, plan.smem_bytes, p.stream, *args);
  return plan;
}

// The one dispatch point: (dtype, vector width, rows in flight) -> kernel
// instance. Returns the final plan; launches only when args is given.
template <typename T>
LaunchPlan dispatch_dtype(LaunchPlan plan, const ForwardParams& p, const DeviceInfo& dev,
                          ForwardArgs* args) {
  constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
  if (plan.vector != kVec) return plan_and_launch<T, 1, 1>(plan, p, dev, args);
  if (plan.rows_in_flight == 1) return plan_and_launch<T, kVec, 1>(plan, p, dev, args);
  if constexpr (sizeof(T) == 4) {
    if (plan.rows_in_flight == 4) return plan_and_launch<T, kVec, 4>(plan, p, dev, args);
  }
  return plan_and_launch<T, kVec, 2>(plan, p, dev, args);
}

LaunchPlan dispatch(const LaunchPlan& plan, const ForwardParams& p, const DeviceInfo& dev,
                    ForwardArgs* args) {
  return with_storage_type(p.dtype, [&](auto t) {
    return dispatch_dtype<decltype(t)>(plan, p, dev, args);
  });
}

// Every CUDA forward's checks before anything runs (SPEC section 8 errors
// the dispatcher cannot see: the dtype the backend takes, the workspace).
void check_cuda_forward(const ForwardParams& p, const DeviceInfo& dev, bool flat) {
  KASMINA_CHECK_TYPE(p.dtype == DType::f32 || p.dtype == DType::bf16 || p.dtype == DType::f16,
                     "the CUDA backend takes float32, bfloat16 or float16 (got ",
                     dtype_name(p.dtype), ")");
  const std::size_t need = workspace_bytes(p, dev, flat);
  KASMINA_CHECK_VALUE(p.workspace != nullptr && p.workspace_bytes >= need,
                      "forward workspace too small: need ", need, " bytes (",
                      "forward_workspace_bytes", flat ? ", asked with forward_flat_reduction set" : "",
                      "), got ", p.workspace_bytes, " bytes at ", p.workspace);
  KASMINA_CHECK_VALUE(aligned16(p.workspace), "forward workspace must be 16-byte aligned (got ",
                      p.workspace, ")");
}

// The streaming launch of one kernel instance: each problem's tiles as the
// plain launch would pick them (the plain kernel's occupancy), so each
// problem gives the bits of a plain launch with the same rows in flight.
template <typename T, int V, int U>
void stream_launch(std::vector<LaunchPlan> plans, const ForwardParams* ps, int count,
                   const DeviceInfo& dev) {
  StreamArgs sa{};
  sa.count = count;
  std::size_t smem = 0;
  for (int i = 0; i < count; ++i) {
    plans[i] = finish_plan<T, V, U>(plans[i], ps[i], dev);
    sa.problem[i] = make_args(ps[i], plans[i]);
    sa.problem[i].tiles = plans[i].tiles;
    sa.first_block[i + 1] = sa.first_block[i] + plans[i].tiles * ps[i].num_seeds;
    if (plans[i].smem_bytes > smem) smem = plans[i].smem_bytes;
  }
  LaunchPlan launch = plans[0];
  finish_programmatic(launch, reinterpret_cast<const void*>(&forward_stream_kernel<T, V, U>), dev);
  launch_kernel(&forward_stream_kernel<T, V, U>, launch, static_cast<unsigned>(sa.first_block[count]),
                smem, ps[0].stream, sa);
}

template <typename T>
void stream_dispatch_dtype(const std::vector<LaunchPlan>& plans, const ForwardParams* ps, int count,
                           const DeviceInfo& dev) {
  constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
  if (plans[0].vector != kVec) return stream_launch<T, 1, 1>(plans, ps, count, dev);
  if (plans[0].rows_in_flight == 1) return stream_launch<T, kVec, 1>(plans, ps, count, dev);
  if constexpr (sizeof(T) == 4) {
    if (plans[0].rows_in_flight == 4) return stream_launch<T, kVec, 4>(plans, ps, count, dev);
  }
  stream_launch<T, kVec, 2>(plans, ps, count, dev);
}

void stream_dispatch(const std::vector<LaunchPlan>& plans, const ForwardParams* ps, int count,
                     const DeviceInfo& dev) {
  with_storage_type(ps[0].dtype, [&](auto t) {
    stream_dispatch_dtype<decltype(t)>(plans, ps, count, dev);
  });
}

}  // namespace
}  // namespace kasmina::cuda

namespace kasmina::detail {

std::size_t forward_workspace_bytes_cuda(const ForwardParams& p) {
  return cuda::workspace_bytes(p, cuda::current_device_info(), cuda::flat_reduction());
}

void forward_cuda(const ForwardParams& p) {
  using namespace kasmina::cuda;
  const DeviceInfo& dev = current_device_info();
  const bool flat = flat_reduction();
  check_cuda_forward(p, dev, flat);
  const LaunchPlan plan = plan_forward(p, dev);
  ForwardArgs args = make_args(p, plan, flat);
  dispatch(plan, p, dev, &args);
}

namespace {
// The plans of a streamed launch: each problem's generic plan, all with the
// smallest rows in flight among them (one kernel instance for all).
std::vector<cuda::LaunchPlan> stream_plans(const ForwardParams* ps, int count,
                                           const cuda::DeviceInfo& dev) {
  using namespace kasmina::cuda;
  KASMINA_CHECK_VALUE(count >= 1 && count <= kMaxStreamed, "forward_many on CUDA runs 1 to ",
                      kMaxStreamed, " problems per launch (got ", count, ")");
  const bool vector = resolve(ps[0]).vector;
  int rows_in_flight = 4;
  std::vector<LaunchPlan> plans;
  for (int i = 0; i < count; ++i) {
    const ForwardParams& p = ps[i];
    check_cuda_forward(p, dev, false);
    KASMINA_CHECK_TYPE(p.dtype == ps[0].dtype, "forward_many: every problem must have one dtype (",
                       dtype_name(ps[0].dtype), " and ", dtype_name(p.dtype), ")");
    KASMINA_CHECK_VALUE(p.stream == ps[0].stream, "forward_many: every problem must use one stream");
    KASMINA_CHECK_VALUE(resolve(p).vector == vector, "forward_many: problem ", i, " takes the ",
                        vector ? "scalar" : "vector", " path and problem 0 the other (",
                        resolve(p).why, "); launch them apart");
    plans.push_back(plan_forward(p, dev, false));
    if (plans.back().rows_in_flight < rows_in_flight) rows_in_flight = plans.back().rows_in_flight;
  }
  for (LaunchPlan& plan : plans) {
    plan.rows_in_flight = rows_in_flight;
    plan.rows_per_pass = plan.threads / plan.group * rows_in_flight;
  }
  return plans;
}
}  // namespace

void forward_stream_cuda(const ForwardParams* ps, int count) {
  using namespace kasmina::cuda;
  const DeviceInfo& dev = current_device_info();
  stream_dispatch(stream_plans(ps, count, dev), ps, count, dev);
}

namespace {
std::string format_forward(const ForwardParams& p, const cuda::LaunchPlan& plan,
                           const cuda::DeviceInfo& dev, const char* launch, bool flat) {
  using namespace kasmina::cuda;
  const Resolved r = resolve(p);
  std::ostringstream os;
  os << "cuda.forward." << (plan.tma ? "tma" : r.vector ? "vec" : "scalar") << plan.vector << " "
     << dtype_name(p.dtype) << " on " << dev.name << " (sm_" << dev.cc_major << dev.cc_minor
     << "): " << r.why << "; " << plan.group << " lanes per row (" << plan.group_source << "), "
     << plan.rows_in_flight
     << " rows in flight per thread (" << plan.rows_source << "), " << plan.rows_per_pass
     << " rows per pass, ";
  if (plan.tma) {
    os << "variant tma (" << plan.variant_source << "): each pass one tensor-map copy of "
       << plan.rows_per_pass << " x " << r.C
       << (plan.tma_boxes > 1
               ? " (" + std::to_string(plan.tma_boxes) + " column blocks, a 3-D tensor map)"
               : std::string())
       << " into a " << plan.stages
       << "-stage shared-memory ring (mbarrier pipeline"
       << (plan.tma_x_opt_in ? ", in the shared-memory opt-in" : "") << "), ";
  } else if (plan.tma_refusal != nullptr) {
    os << "variant generic (" << plan.tma_refusal << "; TMA was " << plan.variant_source << "), ";
  } else {
    os << "variant generic (" << plan.variant_source << "), ";
  }
  os << plan.tiles << " tiles x " << p.num_seeds << " seeds = "
     << static_cast<int64_t>(plan.tiles) * p.num_seeds << " CTAs of " << plan.threads
     << " threads (" << plan.threads_source << "), " << launch << ", "
     << programmatic_text(plan)
     << (flat ? ", telemetry reduced flat (every thread's statistics through the workspace: "
                "forward_flat_reduction)"
         : plan.tiles == 1 ? " (one CTA per seed: no partials)"
                           : "")
     << ", "
     << (plan.smem_bytes > 0 ? "coefficients in a shared-memory table"
                             : "coefficients computed per element (C too wide for the table)");
  if (plan.tma_store) {
    os << "; y by TMA store (" << plan.tma_store_source << ", " << kTmaStoreStages << " y stages)";
  } else if (plan.tma_store_refusal != nullptr) {
    os << "; y by per-thread stores (" << plan.tma_store_source
       << " forward_tma_store refused: " << plan.tma_store_refusal << ")";
  }
  if (plan.late_dependents) {
    os << "; dependents launched at the CTAs' exit ("
       << (plan.late_auto ? "with the store" : "set") << ")"
       << (plan.programmatic ? "" : " (no effect: plain launch)");
  }
  return os.str();
}
}  // namespace

std::string describe_forward_cuda(const ForwardParams& p) {
  using namespace kasmina::cuda;
  if (!cuda_available()) return "cuda.forward: unavailable (" + cuda_unavailable_reason() + ")";
  const DeviceInfo& dev = current_device_info();
  return format_forward(p, dispatch(plan_forward(p, dev), p, dev, nullptr), dev, "one launch",
                        flat_reduction());
}

std::string describe_forward_stream_cuda(const ForwardParams* ps, int count) {
  using namespace kasmina::cuda;
  if (!cuda_available()) return "cuda.forward: unavailable (" + cuda_unavailable_reason() + ")";
  const DeviceInfo& dev = current_device_info();
  std::vector<LaunchPlan> plans = stream_plans(ps, count, dev);
  const LaunchPlan plan = dispatch(plans[0], ps[0], dev, nullptr);
  return format_forward(ps[0], plan, dev, "problem 0 of one streamed launch", false);
}

}  // namespace kasmina::detail
