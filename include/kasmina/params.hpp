// One parameter struct per op (forward, backward), the same for every
// backend. All pointers live in the backend's memory space (host memory for
// the CPU backends, device memory for CUDA), including the per-seed table:
// kernels read stage/kind/blueprint/alpha themselves, so that no host read is
// needed on the hot path and the ops are CUDA-graph safe.
//
// Layout: x is viewed as [rows, hidden], row-major, last dimension
// contiguous, rows `*_row_stride` elements apart (>= hidden). Seed s owns
// columns [s*C, (s+1)*C) with C = hidden / num_seeds.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kasmina/types.hpp"

namespace kasmina {

// Per-seed arrays of length num_seeds (SPEC section 7). The lifecycle keeps
// them consistent: 0 <= kind < 4, 0 <= blueprint < num_blueprints, CONV only
// with C >= 3. The CPU backends re-check this table; the CUDA backend trusts
// it (it cannot read device memory without a host synchronisation).
struct SeedTable {
  const int32_t* stage = nullptr;
  const int32_t* kind = nullptr;
  const int32_t* blueprint = nullptr;
  const float* alpha = nullptr;  // raw alpha; kernels use clamp(alpha, 0, 1)
};

// Blueprint registry (SPEC section 6): weights [num_blueprints, C] row-major,
// scales [num_blueprints]. Row 0 is "none".
struct RegistryView {
  const float* weights = nullptr;
  const float* scales = nullptr;
  int32_t num_blueprints = 0;
};

// Output clamp of SPEC section 3 (off by default).
struct OutputClamp {
  bool enabled = false;
  float lo = 0.0f;
  float hi = 0.0f;
};

struct ForwardParams {
  const void* x = nullptr;  // [rows, hidden], dtype
  void* y = nullptr;        // [rows, hidden], dtype; fully written
  DType dtype = DType::f32;
  int64_t rows = 0;  // N, may be 0
  int64_t hidden = 0;
  int32_t num_seeds = 0;
  int64_t x_row_stride = 0;  // elements; 0 means "= hidden"
  int64_t y_row_stride = 0;

  SeedTable seeds;
  RegistryView registry;
  OutputClamp clamp;
  float dead_threshold = 1e-6f;

  float* telemetry = nullptr;         // [num_seeds, 8], fully written
  int64_t* nonfinite_count = nullptr;  // [num_seeds] exact counts; optional

  // CUDA: scratch of forward_workspace_bytes(); zero-filled before its first
  // use, left zero-filled by every launch (its counters reset themselves), so
  // a caller allocates it once and reuses it on one stream. CPU: ignored.
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
  Stream stream = nullptr;
  int num_threads = 0;  // CPU fast backend; 0 = library default
};

struct BackwardParams {
  const void* x = nullptr;   // [rows, hidden], the forward's input
  const void* dy = nullptr;  // [rows, hidden], dL/dy
  void* dx = nullptr;        // [rows, hidden], fully written
  DType dtype = DType::f32;  // of x, dy and dx alike
  int64_t rows = 0;
  int64_t hidden = 0;
  int32_t num_seeds = 0;
  int64_t x_row_stride = 0;  // elements; 0 means "= hidden"
  int64_t dy_row_stride = 0;
  int64_t dx_row_stride = 0;

  SeedTable seeds;
  RegistryView registry;
  OutputClamp clamp;          // the forward's clamp: its mask is recomputed
  bool clip_enabled = false;  // per-row clip of G (SPEC section 5)
  float clip_norm = 0.0f;

  float* dweights = nullptr;    // [num_blueprints, C], fully written (zeros where unused)
  float* dscales = nullptr;     // [num_blueprints], fully written
  float* dalpha = nullptr;      // [num_seeds], fully written
  float* grad_stats = nullptr;  // [num_seeds, 3], fully written

  void* workspace = nullptr;  // as in ForwardParams
  std::size_t workspace_bytes = 0;
  Stream stream = nullptr;
  int num_threads = 0;
};

}  // namespace kasmina
