// Internal to the fast CPU backend (forward_cpu.cpp, backward_cpu.cpp and the
// per-ISA row kernels of cpu_rows.hpp): the row blocking that makes results
// independent of the thread count, the storage dtypes, the Chan merge, the
// per-seed plans and partials, and the per-ISA entry points.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "core/storage.hpp"
#include "kasmina/params.hpp"
#include "kasmina/types.hpp"

namespace kasmina::detail::cpu {

// Rows are cut into blocks whose size depends on the row count only, never on
// the thread count; every reduction is first done per block and the block
// partials are merged in block order, so the bits do not depend on how blocks
// are spread over threads. 64 rows keep a block's per-row float32 partial
// sums short (accuracy) while its partial buffers stay small; small inputs
// get smaller blocks so that they still spread over the threads.
inline constexpr int64_t kMaxBlockRows = 64;
inline constexpr int64_t kMinBlockRows = 4;
inline constexpr int64_t kTargetBlocks = 64;

inline int64_t block_rows(int64_t rows) {
  const int64_t per_block = (rows + kTargetBlocks - 1) / kTargetBlocks;
  return std::clamp(per_block, kMinBlockRows, kMaxBlockRows);
}

inline int64_t block_count(int64_t rows) {
  const int64_t r = block_rows(rows);
  return (rows + r - 1) / r;
}

// num_threads from the params: 0 means the library default.
int resolve_threads(int requested);

// Storage dtypes as types, so the row loops are compiled (and vectorised) per
// dtype instead of switching per element.
struct F32 {
  using raw = float;
  static constexpr DType dtype = DType::f32;
  static float load(raw v) { return v; }
  static raw store(float v) { return v; }
};
struct BF16 {
  using raw = uint16_t;
  static constexpr DType dtype = DType::bf16;
  static float load(raw v) { return storage::bf16_bits_to_float(v); }
  static raw store(float v) { return storage::float_to_bf16_bits(v); }
};
struct F16 {
  using raw = uint16_t;
  static constexpr DType dtype = DType::f16;
  static float load(raw v) { return storage::f16_bits_to_float(v); }
  static raw store(float v) { return storage::float_to_f16_bits(v); }
};

// Finite test that vectorises and survives without -ffast-math: v - v is 0
// for every finite v and NaN for NaN and +-Inf.
inline bool finite(float v) { return (v - v) == 0.0f; }

// Population moments in float64, merged with Chan's formula: the merge order is
// the fixed block order, and float64 keeps the merge of thousands of row
// partials far below the float32 tolerance.
struct Moments {
  double count = 0.0;
  double mean = 0.0;
  double m2 = 0.0;

  void merge(double n_b, double mean_b, double m2_b) {
    if (n_b == 0.0) return;
    const double n = count + n_b;
    const double delta = mean_b - mean;
    mean += delta * (n_b / n);
    m2 += m2_b + delta * delta * (count * n_b / n);
    count = n;
  }
  void merge(const Moments& o) { merge(o.count, o.mean, o.m2); }
  double variance() const { return count > 0.0 ? m2 / count : 0.0; }
};

// Per-seed constants of one call (SPEC sections 3 and 5), computed once so the
// row loops only read them.
struct SeedPlan {
  int32_t kind = 0;
  int32_t blueprint = 0;
  bool blend = false;         // output is a*T + (1-a)*X
  bool grads = false;         // blueprint receives gradients (grafted or shadow)
  bool dalpha = false;        // dalpha is produced
  float a = 0.0f;             // clamp(alpha, 0, 1)
  float one_minus_a = 1.0f;
  float grad_a = 0.0f;        // a, or 1 for shadow training
  float sigma = 0.0f;
  const float* w = nullptr;   // registry row, C entries
  const float* vec = nullptr; // RESIDUAL: sigma*w; ATTENTION: softmax(w); else w
};

// Per-seed plans and the per-call vectors they point at. `vectors` holds C
// floats per seed.
void make_plans(const SeedTable& seeds, const RegistryView& registry, int32_t num_seeds,
                int64_t chunk, SeedPlan* plans, float* vectors);

// Partials of one seed over the rows of one block, merged in block order.
struct TelemetryPartial {
  Moments moments;
  float min = std::numeric_limits<float>::infinity();
  float max = -std::numeric_limits<float>::infinity();
  int64_t dead = 0;
  int64_t nonfinite = 0;
  double drift = 0.0;  // sum over rows of (1 - cos)

  void merge(const TelemetryPartial& o) {
    moments.merge(o.moments);
    min = std::min(min, o.min);
    max = std::max(max, o.max);
    dead += o.dead;
    nonfinite += o.nonfinite;
    drift += o.drift;
  }
};

// One seed's sums over the rows of a block (the vector part lives in the
// block's float buffer, C entries per seed).
// The scalar sums (dsigma, dalpha, CONV's taps) are formed and added in
// float64, term by term (DESIGN 45): they add N*C terms of both signs whose
// total can be far below their magnitudes.
struct GradPartial {
  double dsigma = 0.0;  // RESIDUAL: Σ G⊙w; MLP: Σ G⊙relu(X⊙w); CONV: Σ G⊙conv(X)
  double dalpha = 0.0;  // ATTENTION, MLP, CONV: Σ G⊙(T - X)
  double taps[3] = {0.0, 0.0, 0.0};  // CONV: Σ G[j] X[j-k], k = 0, 1, 2
  double sumsq = 0.0;   // of dX
  Moments moments;      // of dX
  float max_abs = 0.0f;

  void merge(const GradPartial& o) {
    dsigma += o.dsigma;
    dalpha += o.dalpha;
    for (int k = 0; k < 3; ++k) taps[k] += o.taps[k];
    sumsq += o.sumsq;
    moments.merge(o.moments);
    max_abs = std::max(max_abs, o.max_abs);
  }
};

struct ForwardJob {
  const ForwardParams& params;
  int64_t chunk;
  int64_t x_stride, y_stride;
  const SeedPlan* plans;
};

struct BackwardJob {
  const BackwardParams& params;
  int64_t chunk;
  int64_t x_stride, dy_stride, dx_stride;
  const SeedPlan* plans;
};

// Floats of per-thread scratch the row kernels need: row and chunk buffers,
// then a block's per-seed state (kSeedStateFloats per seed, 32-byte aligned;
// used by the AVX2 kernels).
inline constexpr int64_t kSeedStateFloats = 96;
inline int64_t seed_state_floats(int64_t hidden, int64_t chunk) {
  return (chunk > 0 ? hidden / chunk : 0) * kSeedStateFloats + 8;
}
inline int64_t forward_scratch_floats(int64_t hidden, int64_t chunk) {
  return 2 * hidden + 2 + chunk + seed_state_floats(hidden, chunk);
}
inline int64_t backward_scratch_floats(int64_t hidden, int64_t chunk) {
  return 3 * hidden + 4 * chunk + 6 + seed_state_floats(hidden, chunk);
}

// The row kernels exist once per instruction set (cpu_rows.hpp, compiled by
// cpu_rows_generic.cpp and cpu_rows_avx2.cpp). The set is picked once per
// call from what the processor supports; KASMINA_CPU_ISA=generic forces the
// baseline path. Each path is deterministic for any thread count, but the two
// paths round differently (vector width changes the order of the float32
// partial sums), so results may differ in the last bits between machines.
enum class Isa { generic, avx2 };
Isa select_isa();
const char* isa_name(Isa isa);

#define KASMINA_CPU_ROW_KERNELS                                                                 \
  void forward_block(const ForwardJob& job, int64_t row_begin, int64_t row_end,               \
                     TelemetryPartial* parts, float* scratch);                                 \
  void backward_block(const BackwardJob& job, int64_t row_begin, int64_t row_end,             \
                      GradPartial* parts, float* acc_block, float* scratch);
namespace generic {
KASMINA_CPU_ROW_KERNELS
}
namespace avx2 {
KASMINA_CPU_ROW_KERNELS
}
#undef KASMINA_CPU_ROW_KERNELS

}  // namespace kasmina::detail::cpu
