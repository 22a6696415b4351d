// The one dispatch interface in front of every backend. Callers fill a
// ForwardParams / BackwardParams and name a backend; validation happens here,
// before any memory is touched, so every backend sees only valid arguments.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "kasmina/params.hpp"

namespace kasmina {

enum class Backend : int32_t {
  reference = 0,  // float64 oracle on the CPU; the only one that takes DType::f64
  cpu = 1,        // fast CPU backend: one pass, vectorised, threaded, deterministic
  cuda = 2,       // CUDA backend (when compiled in and a device is present)
};

std::string_view backend_name(Backend);
Device backend_device(Backend);
// Compiled in and usable now (for CUDA: the runtime sees at least one device).
bool backend_available(Backend);
// Why a backend is not available ("" when it is).
std::string backend_unavailable_reason(Backend);

// Throw kasmina::Error (nothing written) unless the params are valid for the
// backend. Checks shapes, strides, dtypes, null pointers and, on host
// backends, the seed table.
void validate(const ForwardParams&, Backend);
void validate(const BackwardParams&, Backend);

// Scratch the CUDA backend needs (0 on the CPU backends). Depends on
// num_seeds, hidden, num_blueprints and the device only, not on rows, so a
// layer sizes it once.
std::size_t forward_workspace_bytes(const ForwardParams&, Backend);
std::size_t backward_workspace_bytes(const BackwardParams&, Backend);

// Validate, then run. Results obey SPEC.md sections 3-5 within section 9.
void forward(const ForwardParams&, Backend);
void backward(const BackwardParams&, Backend);

// The streaming entry point: the forwards of several problems (layers or
// micro-batches: each its own x, y, seed table, registry, telemetry and
// workspace) with one launch on CUDA, which removes the launch gaps of small
// inputs. Each problem obeys SPEC as forward() does. On CUDA: 1 to 16
// problems, one dtype, one stream and one access path (16-byte vector or
// scalar), else kasmina::Error and nothing runs; every problem is validated
// before any runs. On the CPU backends the problems run one after another.
void forward_many(const ForwardParams* params, int count, Backend);

// Which kernel variant the dispatcher picks for these params and why, for
// `kasmina info` and the profiler (e.g. "cuda.forward.vec4 fp32: C % 4 == 0
// and 16-byte aligned rows").
std::string describe_forward(const ForwardParams&, Backend);
std::string describe_backward(const BackwardParams&, Backend);

// Launch knobs of the CUDA kernels that change speed only (results stay
// within SPEC section 9 and deterministic for a given setting; the bits may
// differ between settings). 0 means the architecture's default from
// src/cuda/tuning.hpp. Process-wide, read at every launch; the benchmark and
// `kasmina tune` set them to measure candidates.
// The forward's kernel variant: the generic one (global loads, every
// architecture) or, on sm_90, the TMA one (tensor-map copies of whole row
// tiles into a shared-memory pipeline; needs the 16-byte vector path and
// C <= 256 elements, else the generic one runs and `describe` says why).
// Both give results within SPEC section 9 of the reference; the TMA variant
// gives the bits of the generic one with 1 row in flight.
enum class CudaForwardVariant : int32_t { automatic = 0, generic = 1, tma = 2 };
std::string_view cuda_forward_variant_name(CudaForwardVariant);
// A switch whose default depends on the architecture and the shape class
// (src/cuda/tuning.hpp): automatic takes that default; off and on force it.
enum class CudaSwitch : int32_t { automatic = 0, off = 1, on = 2 };
std::string_view cuda_switch_name(CudaSwitch);

struct CudaLaunchConfig {
  int forward_rows_in_flight = 0;   // rows each thread loads before it computes: 1, 2 or 4 (2-byte types: at most 2)
  int backward_rows_in_flight = 0;  // the same for the backward: 1 or 2
  CudaForwardVariant forward_variant = CudaForwardVariant::automatic;
  int forward_stages = 0;  // the TMA variant's pipeline depth: 0 (default), 2 to 8
  // Lanes that share one row of a seed's chunk in the forward: 0 (default),
  // 1, 2, 4 or 8. Fewer lanes per row give each lane more of the row and
  // share the per-row work (the drift's row sums) among fewer lanes; never
  // more lanes than the row has vectors.
  int forward_group = 0;
  // Threads per CTA of the forward: 0 (default), 64, 128 or 256. Fewer
  // threads give a small batch fewer idle row groups and a shorter block
  // reduction; more give a large one more bytes in flight per CTA.
  int forward_block_threads = 0;
  // The forward's telemetry reduction without its shared-memory stage
  // (issue 7's "hierarchical reduction" claim, measured against this): every
  // thread writes its statistics to the workspace and the seed's last CTA
  // merges them all, in index order. A measurement variant, not a default:
  // the workspace it needs is kMaxBlockThreads times larger, and
  // forward_workspace_bytes, asked while it is set, says so. Results stay
  // within SPEC section 9 and deterministic, with other bits than the
  // hierarchical reduction's (another merge order). forward_many ignores it.
  bool forward_flat_reduction = false;
  // The backward's CONV seeds read their neighbours from a shared-memory halo
  // (issue 7's "shared-memory backward with halos"): each row group stages
  // its rows' chunks of X and the masked G in shared memory in one sweep,
  // then reads the two neighbours each side there; without it they are
  // scalar loads that hit L1. The same bits either way; where the halo does
  // not fit the shared memory the L1 path runs and describe_backward says so.
  bool backward_conv_halo = false;
  // The backward's X and G reach shared memory by TMA (sm_90a; issue 7's
  // "TMA loading" on the backward): per CTA a ring of stages, each a
  // tensor-map copy of one row pass of X (where the seed reads it) and of G,
  // completed on an mbarrier, with one row in flight. The same math on the
  // same values; the tiles can differ from the generic plan's, and with them
  // the bits of the cross-CTA sums (dW, dscale, dalpha, grad_stats), never
  // dX's. Where it cannot run (not sm_90, no sm_90a code, C > 256, the
  // scalar path, the CONV halo, shared memory) the generic kernel runs and
  // describe_backward says why. A measurement variant until it wins.
  bool backward_tma = false;
  int backward_stages = 0;  // its pipeline depth: 0 (default: 16 KiB of stages), 2 to 8
  // The backward's blueprint rows shared by several training seeds summed
  // from a list of those seeds (docs/DESIGN.md 69): the row's last seed to
  // finish lists them in seed order (warp ballots over the seed table) and
  // loads only their staged rows, instead of scanning every seed's entry per
  // column. The same bits either way (the same additions in the same
  // order); rows of more than 64 seeds scan as without it. A measurement
  // variant until it wins.
  bool backward_row_list = false;
  // Programmatic dependent launch (sm_90 and newer; docs/DESIGN.md 55): every
  // kernel is launched so that it may start while the kernel before it on the
  // stream still runs, waits (griddepcontrol.wait) for that kernel to complete
  // before it touches global memory, and lets the next kernel start the same
  // way. The same bits either way; only the launch latency between back-to-back
  // kernels changes. Off: plain stream order. Ignored below compute capability
  // 9.0 and for kernel code without sm_90 instructions (describe says so).
  bool programmatic_launch = true;
  // The TMA forward's y by TMA store (sm_90a): each row pass's y goes to a
  // shared-memory stage and reaches global memory as one tensor-map store of
  // the pass's box, not as per-thread stores. The same bits and telemetry as
  // the TMA forward without it. Its stages need more than the 48 KiB of
  // shared memory every architecture gives without an opt-in; where they do
  // not fit (or would hold fewer CTAs per SM than the generic kernel) the
  // plain TMA forward runs and describe_forward says why. Only where the TMA
  // forward runs. automatic: the architecture's default per element size
  // and shape class (tuning.hpp: on sm_90 for float32 at the medium and
  // large classes; docs/DESIGN.md 63 has the measurements).
  CudaSwitch forward_tma_store = CudaSwitch::automatic;
  // The TMA forward lets the next kernel on the stream start (programmatic
  // dependent launch) only as its CTAs exit, not at its first statement
  // (griddepcontrol.launch_dependents), so the dependent's early CTAs do
  // not take SM slots and memory bandwidth from the forward's row passes.
  // The same bits; only where the TMA forward runs with programmatic_launch.
  // automatic: on wherever the store runs.
  CudaSwitch forward_late_dependents = CudaSwitch::automatic;
};
// Whether `stream` is capturing a CUDA graph (cudaStreamIsCapturing: the
// capture is active or invalidated), what torch.cuda.is_current_stream_capturing()
// asks of PyTorch's current stream; a host-side query, no synchronisation.
// `stream` is a live stream of the current device or nullptr (the legacy
// default stream). False in a build without the CUDA backend or without a
// CUDA device. Throws kasmina::Error (ErrorKind::runtime) where the query
// fails; changes nothing.
bool cuda_stream_capturing(Stream stream);

// Throws kasmina::Error (ErrorKind::value) for a value outside the lists
// above, changing nothing.
void set_cuda_launch_config(const CudaLaunchConfig&);
CudaLaunchConfig cuda_launch_config();

// Winners of `kasmina tune` (docs/PERFORMANCE.md, "Autotuning"): per device
// name, element size and shape class, the rows in flight, forward variant
// and pipeline depth that measured fastest. The plan's one selection point takes, in this order, a nonzero
// CudaLaunchConfig field, the tuned entry of (device, element size, shape
// class), the architecture's default (src/cuda/tuning.hpp); `describe`
// says which. Entries with values outside CudaLaunchConfig's lists are
// refused (nothing changed).
enum class ShapeClass : int32_t {
  small = 0,   // x under 1 MiB: latency-bound (launch, seed view, one pass)
  medium = 1,  // under 64 MiB: a few passes per CTA
  large = 2,   // 64 MiB and more: streaming
};
ShapeClass shape_class(int64_t rows, int64_t hidden, std::size_t elem_bytes);
std::string_view shape_class_name(ShapeClass);
struct CudaTunedEntry {
  std::string device;  // the CUDA device name, e.g. "NVIDIA H100 80GB HBM3"
  int elem_bytes = 4;  // 4 (float32) or 2 (bfloat16, float16)
  ShapeClass shape = ShapeClass::large;
  int forward_rows_in_flight = 0;   // 0 = keep the default
  int backward_rows_in_flight = 0;
  CudaForwardVariant forward_variant = CudaForwardVariant::automatic;  // automatic = keep the default
  int forward_stages = 0;
  int forward_group = 0;  // lanes per row; 0 = keep the default
  int forward_block_threads = 0;  // threads per forward CTA; 0 = keep the default
};
void set_cuda_tuned_table(const std::vector<CudaTunedEntry>&);
std::vector<CudaTunedEntry> cuda_tuned_table();
// The tuned rows in flight for (device, elem_bytes, shape), 0 where none.
CudaTunedEntry cuda_tuned_lookup(const std::string& device, std::size_t elem_bytes, ShapeClass shape);

// Build facts for `kasmina info`.
struct BuildInfo {
  std::string version;
  std::string compiler;
  bool cuda_compiled = false;
  std::string cuda_architectures;  // e.g. "80;90a"
  std::vector<std::string> cuda_devices;
  int cpu_threads = 0;
};
BuildInfo build_info();

}  // namespace kasmina
