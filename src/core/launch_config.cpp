// The process-wide CUDA launch knobs (ops.hpp): stored here, in the core, so
// that the API exists in every build; the CUDA backend reads them at each
// launch.
#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "kasmina/error.hpp"
#include "kasmina/ops.hpp"

namespace kasmina {
namespace {
std::atomic<int> g_forward_rows{0};
std::atomic<int> g_backward_rows{0};
std::atomic<int> g_forward_variant{0};
std::atomic<int> g_forward_stages{0};
std::atomic<int> g_forward_group{0};
std::atomic<int> g_forward_threads{0};
std::atomic<bool> g_forward_flat{false};
std::atomic<bool> g_backward_halo{false};
std::atomic<bool> g_backward_tma{false};
std::atomic<int> g_backward_stages{0};
std::atomic<bool> g_backward_row_list{false};
std::atomic<bool> g_programmatic{true};
std::atomic<int> g_forward_tma_store{0};
std::atomic<int> g_forward_late_dependents{0};

bool valid_forward_rows(int v) { return v == 0 || v == 1 || v == 2 || v == 4; }
// Four rows of X and G in flight spill past the backward's 128 registers.
bool valid_backward_rows(int v) { return v == 0 || v == 1 || v == 2; }
// CudaForwardVariant and CudaSwitch: three values, 0 to 2.
template <typename Enum>
bool valid_three(Enum v) {
  const int i = static_cast<int>(v);
  return i >= 0 && i <= 2;
}
// The TMA pipeline's barriers are a fixed array of 8 (forward_tma_sm90.cu).
bool valid_stages(int v) { return v == 0 || (v >= 2 && v <= 8); }
// Row groups of the forward reduce with at most three butterfly steps.
bool valid_group(int v) { return v == 0 || v == 1 || v == 2 || v == 4 || v == 8; }
// Whole warps, at most kMaxBlockThreads (tuning.hpp: the kernels' launch bounds).
bool valid_threads(int v) { return v == 0 || v == 64 || v == 128 || v == 256; }
}  // namespace

std::string_view cuda_forward_variant_name(CudaForwardVariant v) {
  switch (v) {
    case CudaForwardVariant::automatic: return "automatic";
    case CudaForwardVariant::generic: return "generic";
    case CudaForwardVariant::tma: return "tma";
  }
  return "?";
}

std::string_view cuda_switch_name(CudaSwitch v) {
  switch (v) {
    case CudaSwitch::automatic: return "automatic";
    case CudaSwitch::off: return "off";
    case CudaSwitch::on: return "on";
  }
  return "?";
}

void set_cuda_launch_config(const CudaLaunchConfig& config) {
  KASMINA_CHECK_VALUE(valid_forward_rows(config.forward_rows_in_flight),
                      "forward_rows_in_flight must be 0 (default), 1, 2 or 4 (got ",
                      config.forward_rows_in_flight, ")");
  KASMINA_CHECK_VALUE(valid_backward_rows(config.backward_rows_in_flight),
                      "backward_rows_in_flight must be 0 (default), 1 or 2 (got ",
                      config.backward_rows_in_flight, ")");
  KASMINA_CHECK_VALUE(valid_three(config.forward_variant),
                      "forward_variant must be 0 (automatic), 1 (generic) or 2 (tma) (got ",
                      static_cast<int>(config.forward_variant), ")");
  KASMINA_CHECK_VALUE(valid_stages(config.backward_stages),
                      "backward_stages must be 0 (default) or 2 to 8 (got ", config.backward_stages,
                      ")");
  KASMINA_CHECK_VALUE(valid_stages(config.forward_stages),
                      "forward_stages must be 0 (default) or 2 to 8 (got ", config.forward_stages,
                      ")");
  KASMINA_CHECK_VALUE(valid_group(config.forward_group),
                      "forward_group must be 0 (default), 1, 2, 4 or 8 (got ", config.forward_group,
                      ")");
  KASMINA_CHECK_VALUE(valid_threads(config.forward_block_threads),
                      "forward_block_threads must be 0 (default), 64, 128 or 256 (got ",
                      config.forward_block_threads, ")");
  KASMINA_CHECK_VALUE(valid_three(config.forward_tma_store),
                      "forward_tma_store must be 0 (automatic), 1 (off) or 2 (on) (got ",
                      static_cast<int>(config.forward_tma_store), ")");
  KASMINA_CHECK_VALUE(valid_three(config.forward_late_dependents),
                      "forward_late_dependents must be 0 (automatic), 1 (off) or 2 (on) (got ",
                      static_cast<int>(config.forward_late_dependents), ")");
  g_forward_rows.store(config.forward_rows_in_flight, std::memory_order_relaxed);
  g_backward_rows.store(config.backward_rows_in_flight, std::memory_order_relaxed);
  g_forward_variant.store(static_cast<int>(config.forward_variant), std::memory_order_relaxed);
  g_forward_stages.store(config.forward_stages, std::memory_order_relaxed);
  g_forward_group.store(config.forward_group, std::memory_order_relaxed);
  g_forward_threads.store(config.forward_block_threads, std::memory_order_relaxed);
  g_forward_flat.store(config.forward_flat_reduction, std::memory_order_relaxed);
  g_backward_halo.store(config.backward_conv_halo, std::memory_order_relaxed);
  g_backward_tma.store(config.backward_tma, std::memory_order_relaxed);
  g_backward_stages.store(config.backward_stages, std::memory_order_relaxed);
  g_backward_row_list.store(config.backward_row_list, std::memory_order_relaxed);
  g_programmatic.store(config.programmatic_launch, std::memory_order_relaxed);
  g_forward_tma_store.store(static_cast<int>(config.forward_tma_store), std::memory_order_relaxed);
  g_forward_late_dependents.store(static_cast<int>(config.forward_late_dependents),
                                  std::memory_order_relaxed);
}

namespace {
std::mutex g_table_mutex;
std::vector<CudaTunedEntry>& table() {
  static std::vector<CudaTunedEntry> t;
  return t;
}
}  // namespace

ShapeClass shape_class(int64_t rows, int64_t hidden, std::size_t elem_bytes) {
  KASMINA_CHECK_VALUE(rows >= 0 && hidden >= 0, "shape_class: rows and hidden must be >= 0 (got ",
                      rows, " x ", hidden, ")");
  KASMINA_CHECK_VALUE(elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8,
                      "shape_class: elem_bytes must be 2, 4 or 8 (got ", elem_bytes, ")");
  const double bytes = static_cast<double>(rows) * static_cast<double>(hidden) *
                       static_cast<double>(elem_bytes);
  if (bytes < 1024.0 * 1024.0) return ShapeClass::small;
  if (bytes < 64.0 * 1024.0 * 1024.0) return ShapeClass::medium;
  return ShapeClass::large;
}

std::string_view shape_class_name(ShapeClass c) {
  switch (c) {
    case ShapeClass::small: return "small";
    case ShapeClass::medium: return "medium";
    case ShapeClass::large: return "large";
  }
  return "?";
}

void set_cuda_tuned_table(const std::vector<CudaTunedEntry>& entries) {
  for (const CudaTunedEntry& e : entries) {
    KASMINA_CHECK_VALUE(e.elem_bytes == 2 || e.elem_bytes == 4,
                        "tuned entry: elem_bytes must be 2 or 4 (got ", e.elem_bytes, ")");
    const int s = static_cast<int>(e.shape);
    KASMINA_CHECK_VALUE(s >= 0 && s <= 2, "tuned entry: shape class must be 0, 1 or 2 (got ", s, ")");
    KASMINA_CHECK_VALUE(valid_forward_rows(e.forward_rows_in_flight) &&
                            !(e.elem_bytes == 2 && e.forward_rows_in_flight == 4),
                        "tuned entry: forward_rows_in_flight must be 0, 1, 2 or 4 (2-byte types: ",
                        "at most 2) (got ", e.forward_rows_in_flight, ")");
    KASMINA_CHECK_VALUE(valid_backward_rows(e.backward_rows_in_flight),
                        "tuned entry: backward_rows_in_flight must be 0, 1 or 2 (got ",
                        e.backward_rows_in_flight, ")");
    KASMINA_CHECK_VALUE(valid_three(e.forward_variant),
                        "tuned entry: forward_variant must be 0, 1 or 2 (got ",
                        static_cast<int>(e.forward_variant), ")");
    KASMINA_CHECK_VALUE(valid_stages(e.forward_stages),
                        "tuned entry: forward_stages must be 0 or 2 to 8 (got ", e.forward_stages, ")");
    KASMINA_CHECK_VALUE(valid_group(e.forward_group),
                        "tuned entry: forward_group must be 0, 1, 2, 4 or 8 (got ", e.forward_group, ")");
    KASMINA_CHECK_VALUE(valid_threads(e.forward_block_threads),
                        "tuned entry: forward_block_threads must be 0, 64, 128 or 256 (got ",
                        e.forward_block_threads, ")");
  }
  const std::lock_guard<std::mutex> lock(g_table_mutex);
  table() = entries;
}

std::vector<CudaTunedEntry> cuda_tuned_table() {
  const std::lock_guard<std::mutex> lock(g_table_mutex);
  return table();
}

CudaTunedEntry cuda_tuned_lookup(const std::string& device, std::size_t elem_bytes, ShapeClass shape) {
  const std::lock_guard<std::mutex> lock(g_table_mutex);
  for (const CudaTunedEntry& e : table()) {
    if (e.device == device && static_cast<std::size_t>(e.elem_bytes) == elem_bytes && e.shape == shape) {
      return e;
    }
  }
  CudaTunedEntry none;
  none.device = device;
  none.elem_bytes = static_cast<int>(elem_bytes);
  none.shape = shape;
  return none;
}

CudaLaunchConfig cuda_launch_config() {
  CudaLaunchConfig c;
  c.forward_rows_in_flight = g_forward_rows.load(std::memory_order_relaxed);
  c.backward_rows_in_flight = g_backward_rows.load(std::memory_order_relaxed);
  c.forward_variant =
      static_cast<CudaForwardVariant>(g_forward_variant.load(std::memory_order_relaxed));
  c.forward_stages = g_forward_stages.load(std::memory_order_relaxed);
  c.forward_group = g_forward_group.load(std::memory_order_relaxed);
  c.forward_block_threads = g_forward_threads.load(std::memory_order_relaxed);
  c.forward_flat_reduction = g_forward_flat.load(std::memory_order_relaxed);
  c.backward_conv_halo = g_backward_halo.load(std::memory_order_relaxed);
  c.backward_tma = g_backward_tma.load(std::memory_order_relaxed);
  c.backward_stages = g_backward_stages.load(std::memory_order_relaxed);
  c.backward_row_list = g_backward_row_list.load(std::memory_order_relaxed);
  c.programmatic_launch = g_programmatic.load(std::memory_order_relaxed);
  c.forward_tma_store =
      static_cast<CudaSwitch>(g_forward_tma_store.load(std::memory_order_relaxed));
  c.forward_late_dependents =
      static_cast<CudaSwitch>(g_forward_late_dependents.load(std::memory_order_relaxed));
  return c;
}

}  // namespace kasmina
