// One host-side harness for every backend's tests (STYLE.md rules 6 and 7):
// random problems (never zeros), storage-dtype buffers, output poisoning, and
// the single tolerance policy of SPEC section 9. CUDA tests copy a Problem's
// buffers to the device, run, copy back, and use the same checks.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kasmina/kasmina.hpp"

namespace kasmina::test {

// SPEC section 9: rel <= 1e-5 (f32), 1e-2 (bf16), 2e-3 (f16); f64 gets 1e-12.
double rel_tolerance(DType dtype);
// ||out - ref|| / ||ref|| (L2); when ||ref|| == 0 returns ||out||. Any NaN in
// out where ref is finite (or vice versa) gives +inf: NaN never passes.
double rel_error(std::span<const double> out, std::span<const double> ref);

// Rounding to and from a storage dtype (round-to-nearest-even, as on the GPU).
double round_to(DType dtype, double value);

// A buffer of `numel` elements of a storage dtype in host memory.
struct HostTensor {
  DType dtype = DType::f32;
  int64_t numel = 0;
  std::vector<uint8_t> bytes;

  HostTensor() = default;
  HostTensor(DType dtype, int64_t numel);
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  double get(int64_t i) const;
  void set(int64_t i, double value);  // rounds to the dtype
  // Fill with a NaN pattern so an unwritten element is caught.
  void poison();
  std::vector<double> to_double() const;
};

// Fill a float vector with a NaN pattern.
void poison(std::vector<float>& values);
void poison(std::vector<int64_t>& values);

struct ProblemOptions {
  int64_t rows = 7;
  int64_t chunk = 48;
  int32_t num_seeds = 3;
  DType dtype = DType::f32;
  uint64_t rng_seed = 1;
  int32_t num_blueprints = 8;
  // Every kind and every stage appear across the seeds (cycled by seed index
  // with a random offset), some seeds share a blueprint row, some are DORMANT
  // with blueprint 0; alpha is random in (0, 1) with a few out-of-range
  // values to exercise the clamp.
  bool mixed = true;
  // Force every seed to this kind / stage instead (-1 = use mixed).
  int32_t only_kind = -1;
  int32_t only_stage = -1;
  bool clamp = false;   // output clamp at roughly the 10th/90th percentiles
  bool clip = false;    // gradient clip at roughly the median row-chunk norm
  // Fraction of x values replaced by NaN / +Inf / -Inf / denormals (telemetry tests).
  double special_fraction = 0.0;
  // Row strides in elements (0 = hidden); larger values leave gaps between rows.
  int64_t row_pad = 0;
};

// A complete random problem in host memory. Inputs are random normal (with a
// random per-seed offset and scale), weights random, never zero.
struct Problem {
  ProblemOptions options;
  int64_t rows = 0, hidden = 0, chunk = 0, row_stride = 0;
  int32_t num_seeds = 0, num_blueprints = 0;
  std::vector<int32_t> stage, kind, blueprint;
  std::vector<float> alpha, weights, scales;
  OutputClamp clamp;
  bool clip_enabled = false;
  float clip_norm = 0.0f;
  float dead_threshold = 1e-6f;

  HostTensor x, dy;                  // inputs, [rows, row_stride]
  HostTensor y, dx;                  // outputs, poisoned by make_problem
  std::vector<float> telemetry;      // [S, 8], poisoned
  std::vector<int64_t> nonfinite;    // [S], poisoned
  std::vector<float> dweights, dscales, dalpha, grad_stats;  // poisoned

  // Params pointing at this problem's host buffers.
  ForwardParams forward_params();
  BackwardParams backward_params();
  // Poison every output again (before a second run).
  void poison_outputs();
};

Problem make_problem(const ProblemOptions& options);

// The checks of SPEC section 9 against the float64 reference. They report
// through GoogleTest (EXPECT_*) and name the tensor and the problem.
void expect_forward_matches(const Problem& p, const reference::ForwardResult& ref,
                            const std::string& context);
void expect_backward_matches(const Problem& p, const reference::BackwardResult& ref,
                             const std::string& context);

// Bitwise comparisons of every output of two runs.
void expect_forward_bits_equal(const Problem& a, const Problem& b, const std::string& context);
void expect_backward_bits_equal(const Problem& a, const Problem& b, const std::string& context);

// Human-readable description of a problem for failure messages.
std::string describe(const ProblemOptions& options);

}  // namespace kasmina::test
