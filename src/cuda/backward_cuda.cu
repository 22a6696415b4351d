// CUDA backward (SPEC section 5): one launch writes dX and every gradient.
//
// The grid is the forward's (see forward_cuda.cu); row groups have up to 32
// lanes, as many rows per CTA as the shared memory allows. Per row a
// group first applies the clamp mask (the forward's pre-clamp Y is
// recomputed) and, when clipping, reduces the row chunk's ||G|| over the
// group in a first sweep of the row (the second sweep re-reads the same
// bytes from L1/L2). Each CTA then keeps:
//   - column sums for dW (RESIDUAL: G, ATTENTION: G*X, MLP: G*X*m) in
//     shared memory, one row of C floats per row group, each lane owning its
//     columns (no atomics); CONV needs three scalars instead;
//   - scalar sums (dscale, dalpha, CONV taps) and dX statistics (sum of
//     squares, shifted sums folded into Chan-merged moments, max |dX|) in
//     registers.
// The row loop is specialised per seed kind (RESIDUAL, ATTENTION, MLP, CONV,
// and the first three without the coefficient table), clamp and clip
// (templates), picked once per CTA; a seed that neither blends nor trains
// takes a copy loop (DESIGN 31).
// CTA partials go to the workspace; the last CTA of a seed (integer ticket)
// sums them in tile order, applies the kind's final formula and writes the
// seed's dalpha and grad_stats; a row of dweights/dscales is written by its
// one training seed, by the last of its seeds to finish (a ticket per row:
// zero, then each seed's row added in seed order), or as zeros where no
// seed adds into it (DESIGN 62, 67). No floating-point atomics; every sum
// has a fixed order. Every partial is cleared after it is merged, so the
// workspace is zero again.
#include <cuda_runtime.h>

#include <sstream>
#include <string>

#include "backends.hpp"
#include "cuda/common.cuh"
#include "cuda/cuda_check.hpp"
#include "cuda/timeline.cuh"

#ifdef KASMINA_TIMELINE
namespace kasmina::cuda {
__device__ TimelineRecords g_backward_timeline;
}  // namespace kasmina::cuda
#define KASMINA_BWD_TL(slot) timeline_mark(g_backward_timeline, slot)
#define KASMINA_BWD_TL_FLAG(bit, on) timeline_flag(g_backward_timeline, bit, on)
#define KASMINA_BWD_TL_WHERE(seed, tile) timeline_where(g_backward_timeline, seed, tile, 0)
#endif

#include "cuda/backward_body.cuh"
#include "kasmina/error.hpp"

namespace kasmina::cuda {
namespace {

using namespace bwd;

template <typename T, int V, int U, bool Halo = false>
__global__ void __launch_bounds__(kMaxBlockThreads, backward_min_blocks(sizeof(T), U))
    backward_kernel(const __grid_constant__ BackwardArgs args) {
  pdl_prologue();
  KASMINA_BWD_TL(0);
  extern __shared__ float smem[];
  backward_cta<T, V, U, Halo>(args, smem, GlobalRows{});
  KASMINA_BWD_TL(7);
}

struct Resolved {
  int64_t C;
  int64_t x_stride;
  int64_t dy_stride;
  int64_t dx_stride;
  bool vector;
  const char* why;
};

Resolved resolve(const BackwardParams& p) {
  Resolved r{};
  r.C = p.hidden / p.num_seeds;
  r.x_stride = p.x_row_stride != 0 ? p.x_row_stride : p.hidden;
  r.dy_stride = p.dy_row_stride != 0 ? p.dy_row_stride : p.hidden;
  r.dx_stride = p.dx_row_stride != 0 ? p.dx_row_stride : p.hidden;
  const VectorAccess va =
      vector_access(r.C, dtype_size(p.dtype), {p.x, p.dy, p.dx},
                    {r.x_stride, r.dy_stride, r.dx_stride}, "x, dy or dx is not 16-byte aligned");
  r.vector = va.vector;
  r.why = va.why;
  return r;
}

int tiles_max_for(int32_t num_seeds, int64_t C, const DeviceInfo& dev) {
  const Tuning& t = tuning_for(dev.cc_major);
  int tiles = tiles_per_seed_bound(num_seeds, t, dev.sm_count);
  const std::size_t per_tile = static_cast<std::size_t>(num_seeds) * static_cast<std::size_t>(C) * sizeof(float);
  const std::size_t by_bytes = t.backward_partial_bytes / per_tile;
  if (by_bytes < static_cast<std::size_t>(tiles)) tiles = by_bytes < 1 ? 1 : static_cast<int>(by_bytes);
  return tiles;
}

// Largest C whose per-group shared row fits the tuning's shared memory.
int64_t max_chunk(const DeviceInfo& dev) {
  return static_cast<int64_t>(tuning_for(dev.cc_major).smem_budget_bytes / sizeof(float));
}

LaunchPlan plan_backward(const BackwardParams& p, const DeviceInfo& dev) {
  const Resolved r = resolve(p);
  const Tuning& t = tuning_for(dev.cc_major);
  LaunchPlan plan;
  plan.vector = r.vector ? kVectorBytes / static_cast<int>(dtype_size(p.dtype)) : 1;
  plan.group = next_pow2(ceil_div(r.C, plan.vector));
  const int64_t span = static_cast<int64_t>(plan.group) * plan.vector;
  int64_t c_padded = ceil_div(r.C, span) * span;
  // CONV's shared-memory halo (CudaLaunchConfig::backward_conv_halo): each
  // group's shared row holds its row of X and G, where that fits (one row in
  // flight, set below).
  // The launch config read once for this plan.
  const kasmina::CudaLaunchConfig config = kasmina::cuda_launch_config();
  plan.row_list = config.backward_row_list;
  plan.conv_halo = false;
  if (config.backward_conv_halo) {
    const int64_t halo = halo_row_floats(static_cast<int>(r.C));
    const int64_t table = static_cast<int64_t>(align_up(static_cast<std::size_t>(r.C) * sizeof(float), 16));
    if (halo * static_cast<int64_t>(sizeof(float)) + table <= static_cast<int64_t>(t.smem_budget_bytes)) {
      plan.conv_halo = true;
      if (halo > c_padded) c_padded = halo;
    } else {
      plan.conv_halo_refusal = "the chunk's halo rows do not fit the shared memory";
    }
  }
  // With the halo, the coefficient table is kept room for (the halo rows
  // must not push RESIDUAL/ATTENTION/MLP seeds off the table).
  const int64_t reserve = plan.conv_halo ? static_cast<int64_t>(align_up(static_cast<std::size_t>(r.C) * sizeof(float), 16)) : 0;
  const int64_t by_smem = (static_cast<int64_t>(t.smem_budget_bytes) - reserve) / (c_padded * static_cast<int64_t>(sizeof(float)));
  int64_t groups = t.block_threads / plan.group;
  if (by_smem < groups) groups = by_smem;
  if (groups < 1) groups = 1;
  plan.threads = plan.group * static_cast<int>(groups);
  const RowsChoice choice =
      select_rows_in_flight(false, dev, launch_knobs(dev, p.dtype, p.rows, p.hidden));
  plan.rows_in_flight = r.vector ? choice.rows : 1;
  plan.rows_source = r.vector ? choice.source : "scalar path";
  if (plan.conv_halo) {
    plan.rows_in_flight = 1;
    plan.rows_source = "CONV halo";
  }
  // No more rows in flight than a small batch fills (as the forward).
  while (plan.rows_in_flight > 1 && groups * (plan.rows_in_flight / 2) >= p.rows) {
    plan.rows_in_flight /= 2;
  }
  plan.rows_per_pass = static_cast<int>(groups) * plan.rows_in_flight;
  const std::size_t acc_bytes = static_cast<std::size_t>(groups) * static_cast<std::size_t>(c_padded) * sizeof(float);
  // The coefficient table goes first, when it still fits next to the sums.
  const std::size_t table_bytes = align_up(static_cast<std::size_t>(r.C) * sizeof(float), 16);
  plan.table_floats = acc_bytes + table_bytes <= t.smem_budget_bytes ? static_cast<int>(table_bytes / sizeof(float)) : 0;
  plan.smem_bytes = acc_bytes + static_cast<std::size_t>(plan.table_floats) * sizeof(float);
  plan.tiles_max = tiles_max_for(p.num_seeds, r.C, dev);
  plan.tiles = plan.tiles_max;  // refined by finish_plan() for the kernel that runs
  // The TMA variant (CudaLaunchConfig::backward_tma), at one row in flight.
  plan.programmatic_asked = config.programmatic_launch;
  plan.tma = false;
  if (config.backward_tma) {
    LaunchPlan one = plan;
    one.stages = config.backward_stages;  // 0: backward_tma_finish picks
    one.rows_in_flight = 1;
    one.rows_per_pass = static_cast<int>(groups);
    plan.tma_refusal = backward_tma_refusal(p, one, dev, r.C, r.vector);
    if (plan.tma_refusal == nullptr) {
      plan = one;
      plan.tma = true;
      plan.rows_source = "TMA";
    }
  }
  return plan;
}

struct Layout {
  std::size_t tickets, row_tickets, partials, col_partials, seed_dw, seed_dscale, total;
};

Layout layout(const BackwardParams& p, const DeviceInfo& dev) {
  const auto S = static_cast<std::size_t>(p.num_seeds);
  const auto C = static_cast<std::size_t>(p.hidden / p.num_seeds);
  const auto tiles = static_cast<std::size_t>(tiles_max_for(p.num_seeds, static_cast<int64_t>(C), dev));
  Layout l{};
  const auto B = static_cast<std::size_t>(p.registry.num_blueprints > 0 ? p.registry.num_blueprints : 0);
  l.tickets = 0;
  l.row_tickets = align_up(S * sizeof(unsigned), 16);
  l.partials = l.row_tickets + align_up(B * sizeof(unsigned), 256);
  l.col_partials = l.partials + align_up(S * tiles * sizeof(BwdStats), 256);
  l.seed_dw = l.col_partials + align_up(S * tiles * C * sizeof(float), 256);
  l.seed_dscale = l.seed_dw + align_up(S * C * sizeof(float), 256);
  l.total = l.seed_dscale + align_up(S * sizeof(float), 256);
  return l;
}

template <typename T, int V, int U, bool Halo = false>
LaunchPlan finish_plan(LaunchPlan plan, const BackwardParams& p, const DeviceInfo& dev) {
  const void* kernel = reinterpret_cast<const void*>(&backward_kernel<T, V, U, Halo>);
  plan.tiles = tiles_for_kernel(kernel, plan, p.rows, p.num_seeds, dev.sm_count);
  finish_programmatic(plan, kernel, dev);
  return plan;
}

template <typename T, int V, int U, bool Halo = false>
LaunchPlan plan_and_launch(LaunchPlan plan, const BackwardParams& p, const DeviceInfo& dev,
                           BackwardArgs* args) {
  plan = finish_plan<T, V, U, Halo>(plan, p, dev);
  if (args == nullptr) return plan;
  args->tiles = plan.tiles;
  const unsigned grid = static_cast<unsigned>(plan.tiles) * static_cast<unsigned>(p.num_seeds);
  launch_kernel(&backward_kernel<T, V, U, Halo>, plan, grid, plan.smem_bytes, p.stream, *args);
  return plan;
}

// The one dispatch point: (dtype, vector width, rows in flight) -> kernel
// instance. Returns the final plan; launches only when args is given.
template <typename T>
LaunchPlan dispatch_dtype(LaunchPlan plan, const BackwardParams& p, const DeviceInfo& dev,
                          BackwardArgs* args) {
  constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
  if (plan.tma) {  // sm_90a: X and G by TMA (backward_tma_sm90.cu), one row in flight
    const int resident = resident_ctas_per_sm(reinterpret_cast<const void*>(&backward_kernel<T, kVec, 1>),
                                              plan.threads, plan.smem_bytes);
    plan = backward_tma_finish(plan, p, dev, resident);
    if (args != nullptr) {
      args->tiles = plan.tiles;
      backward_tma_launch(plan, p, *args);
    }
    return plan;
  }
  // CONV's shared-memory halo: its own kernel instances (one row in flight),
  // so the default ones keep their registers and occupancy.
  if (plan.conv_halo) {
    return plan.vector != kVec ? plan_and_launch<T, 1, 1, true>(plan, p, dev, args)
                               : plan_and_launch<T, kVec, 1, true>(plan, p, dev, args);
  }
  if (plan.vector != kVec) return plan_and_launch<T, 1, 1>(plan, p, dev, args);
  // 1 or 2 (four rows of X and G in flight spill past 128 registers).
  return plan.rows_in_flight == 1 ? plan_and_launch<T, kVec, 1>(plan, p, dev, args)
                                  : plan_and_launch<T, kVec, 2>(plan, p, dev, args);
}

LaunchPlan dispatch(const LaunchPlan& plan, const BackwardParams& p, const DeviceInfo& dev,
                    BackwardArgs* args) {
  return with_storage_type(p.dtype, [&](auto t) {
    return dispatch_dtype<decltype(t)>(plan, p, dev, args);
  });
}

}  // namespace

#ifdef KASMINA_TIMELINE
void backward_timeline_reset() { timeline_reset(g_backward_timeline); }
std::vector<unsigned long long> backward_timeline(int ctas) { return timeline_read(g_backward_timeline, ctas); }
#endif

}  // namespace kasmina::cuda

namespace kasmina::detail {

std::size_t backward_workspace_bytes_cuda(const BackwardParams& p) {
  return cuda::layout(p, cuda::current_device_info()).total;
}

void backward_cuda(const BackwardParams& p) {
  using namespace kasmina::cuda;
  KASMINA_CHECK_TYPE(p.dtype == DType::f32 || p.dtype == DType::bf16 || p.dtype == DType::f16,
                     "the CUDA backend takes float32, bfloat16 or float16 (got ",
                     dtype_name(p.dtype), ")");
  const DeviceInfo& dev = current_device_info();
  const Resolved r = resolve(p);
  KASMINA_CHECK_VALUE(r.C <= max_chunk(dev), "the CUDA backward supports a chunk (hidden / ",
                      "num_seeds) of at most ", max_chunk(dev), " columns (got ", r.C, ")");
  const Layout l = layout(p, dev);
  KASMINA_CHECK_VALUE(p.workspace != nullptr && p.workspace_bytes >= l.total,
                      "backward workspace too small: need ", l.total, " bytes (",
                      "backward_workspace_bytes), got ", p.workspace_bytes, " bytes at ",
                      p.workspace);
  KASMINA_CHECK_VALUE(aligned16(p.workspace), "backward workspace must be 16-byte aligned (got ",
                      p.workspace, ")");
  const LaunchPlan plan = plan_backward(p, dev);

  BackwardArgs args{};
  args.x = p.x;
  args.dy = p.dy;
  args.dx = p.dx;
  args.rows = p.rows;
  args.x_stride = r.x_stride;
  args.dy_stride = r.dy_stride;
  args.dx_stride = r.dx_stride;
  args.C = static_cast<int>(r.C);
  args.table_floats = plan.table_floats;
  args.group = plan.group;
  args.row_groups = plan.threads / plan.group;
  args.rows_per_pass = plan.rows_per_pass;
  args.C_padded = static_cast<int>((plan.smem_bytes / sizeof(float) - static_cast<std::size_t>(plan.table_floats)) /
                                   static_cast<std::size_t>(args.row_groups));
  args.num_seeds = p.num_seeds;
  args.seeds = p.seeds;
  args.registry = p.registry;
  args.clamp = p.clamp;
  args.clip_enabled = p.clip_enabled;
  args.clip_norm = p.clip_norm;
  args.dweights = p.dweights;
  args.dscales = p.dscales;
  args.dalpha = p.dalpha;
  args.grad_stats = p.grad_stats;
  auto* base = static_cast<unsigned char*>(p.workspace);
  args.tickets = reinterpret_cast<unsigned*>(base + l.tickets);
  args.row_tickets = reinterpret_cast<unsigned*>(base + l.row_tickets);
  args.partials = reinterpret_cast<BwdStats*>(base + l.partials);
  args.col_partials = reinterpret_cast<float*>(base + l.col_partials);
  args.seed_dw = reinterpret_cast<float*>(base + l.seed_dw);
  args.seed_dscale = reinterpret_cast<float*>(base + l.seed_dscale);
  args.row_list = plan.row_list;

  dispatch(plan, p, dev, &args);
}

std::string describe_backward_cuda(const BackwardParams& p) {
  using namespace kasmina::cuda;
  if (!cuda_available()) return "cuda.backward: unavailable (" + cuda_unavailable_reason() + ")";
  const DeviceInfo& dev = current_device_info();
  const Resolved r = resolve(p);
  if (r.C > max_chunk(dev)) {
    return "cuda.backward: unsupported, C = " + std::to_string(r.C) + " > " +
           std::to_string(max_chunk(dev)) + " (shared-memory column accumulators)";
  }
  const LaunchPlan plan = dispatch(plan_backward(p, dev), p, dev, nullptr);
  std::ostringstream os;
  os << "cuda.backward." << (plan.tma ? "tma" : r.vector ? "vec" : "scalar") << plan.vector << " "
     << dtype_name(p.dtype) << " on " << dev.name << " (sm_" << dev.cc_major << dev.cc_minor
     << "): " << r.why << "; " << plan.group << " lanes per row, " << plan.rows_in_flight
     << " rows in flight per thread (" << plan.rows_source << "), " << plan.rows_per_pass
     << " rows per pass, " << plan.tiles << " tiles x " << p.num_seeds << " seeds = "
     << static_cast<int64_t>(plan.tiles) * p.num_seeds << " CTAs of " << plan.threads
     << " threads, " << programmatic_text(plan) << ", " << plan.smem_bytes
     << " B shared memory (dW column sums"
     << (plan.table_floats > 0 ? " + coefficient table)" : ", no coefficient table)")
     << (p.clip_enabled ? ", two sweeps per row (clip)" : ", one sweep per row")
     << (plan.row_list ? "; shared blueprint rows of up to " + std::to_string(bwd::kRowList) +
                             " seeds summed from a list of them (backward_row_list)"
                       : std::string())
     << (plan.conv_halo ? "; CONV neighbours from a shared-memory halo (backward_conv_halo: "
                          "one sweep of global memory per row, clip included)"
         : plan.conv_halo_refusal != nullptr
             ? std::string("; CONV neighbours from L1 (backward_conv_halo refused: ") +
                   plan.conv_halo_refusal + ")"
             : std::string("; CONV neighbours from L1"))
     << (plan.tma ? "; X and G by TMA into a " + std::to_string(plan.stages) +
                        "-stage shared-memory ring (backward_tma)"
         : plan.tma_refusal != nullptr
             ? std::string("; generic loads (backward_tma refused: ") + plan.tma_refusal + ")"
             : std::string());
  return os.str();
}

}  // namespace kasmina::detail
