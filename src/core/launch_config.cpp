// The process-wide CUDA launch knobs (ops.hpp): stored here, in the core, so
// that the API exists in every build; the CUDA backend reads them at each
// launch.
#include <atomic>

#include "kasmina/error.hpp"
#include "kasmina/ops.hpp"

namespace kasmina {
namespace {
std::atomic<int> g_forward_rows{0};
std::atomic<int> g_backward_rows{0};

bool valid_forward_rows(int v) { return v == 0 || v == 1 || v == 2 || v == 4; }
// Four rows of X and G in flight spill past the backward's 128 registers.
bool valid_backward_rows(int v) { return v == 0 || v == 1 || v == 2; }
}  // namespace

void set_cuda_launch_config(const CudaLaunchConfig& config) {
  KASMINA_CHECK_VALUE(valid_forward_rows(config.forward_rows_in_flight),
                      "forward_rows_in_flight must be 0 (default), 1, 2 or 4 (got ",
                      config.forward_rows_in_flight, ")");
  KASMINA_CHECK_VALUE(valid_backward_rows(config.backward_rows_in_flight),
                      "backward_rows_in_flight must be 0 (default), 1 or 2 (got ",
                      config.backward_rows_in_flight, ")");
  g_forward_rows.store(config.forward_rows_in_flight, std::memory_order_relaxed);
  g_backward_rows.store(config.backward_rows_in_flight, std::memory_order_relaxed);
}

CudaLaunchConfig cuda_launch_config() {
  CudaLaunchConfig c;
  c.forward_rows_in_flight = g_forward_rows.load(std::memory_order_relaxed);
  c.backward_rows_in_flight = g_backward_rows.load(std::memory_order_relaxed);
  return c;
}

}  // namespace kasmina
