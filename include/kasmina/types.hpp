// Basic vocabulary of kasmina: dtypes, seed kinds, lifecycle stages, grafting
// strategies and the layout of the telemetry rows. No framework types here:
// everything the kernels see is a pointer, a size, a stride, an enum or an
// opaque stream handle (SPEC.md sections 1, 2 and 7).
#pragma once

#include <cstdint>
#include <string_view>

namespace kasmina {

// Storage dtype of x, y, dy, dx. All arithmetic is float32 (float64 in the
// reference backend); results are rounded once on store. f64 is accepted only
// by the reference backend, so that gradients can be checked in float64.
enum class DType : int32_t { f32 = 0, bf16 = 1, f16 = 2, f64 = 3 };

// What a seed's blueprint computes (SPEC section 3).
enum class Kind : int32_t { residual = 0, attention = 1, mlp = 2, conv = 3 };
inline constexpr int32_t kNumKinds = 4;

// Lifecycle stage of a seed (SPEC section 7). The numeric values are part of
// the contract: they are stored in state files and read by the kernels.
enum class Stage : int32_t {
  dormant = 0,
  germinated = 1,
  training = 2,
  grafting = 3,
  stabilization = 4,
  evaluating = 5,
  fine_tuning = 6,
  fossilized = 7,
  culled = 8,
  cancelled = 9,
  rolled_back = 10,
};
inline constexpr int32_t kNumStages = 11;

// How alpha moves while a seed is GRAFTING (SPEC section 7).
enum class Strategy : int32_t {
  fixed_ramp = 0,
  performance_linked = 1,
  drift_controlled = 2,
  grad_norm_gated = 3,
};
inline constexpr int32_t kNumStrategies = 4;

// Columns of a telemetry row (SPEC section 4): one row of 8 float32 per seed.
enum TelemetryColumn : int32_t {
  kTelVariance = 0,
  kTelMean = 1,
  kTelMin = 2,
  kTelMax = 3,
  kTelDeadRatio = 4,
  kTelSignalToNoise = 5,
  kTelNonfinite = 6,
  kTelDrift = 7,
};
inline constexpr int32_t kTelemetryWidth = 8;

// Columns of a gradient-statistics row (SPEC section 5): over the N*C values
// of the seed's dX.
enum GradStatColumn : int32_t { kGradL2Norm = 0, kGradVariance = 1, kGradMaxAbs = 2 };
inline constexpr int32_t kGradStatsWidth = 3;

// Opaque stream handle: a cudaStream_t for the CUDA backend, ignored on the CPU.
using Stream = void*;

// Where a backend expects its pointers to live.
enum class Device : int32_t { cpu = 0, cuda = 1 };

// Stage semantics, shared by every backend and the lifecycle so that the
// table of SPEC section 7 is written down exactly once.
constexpr bool stage_blends(int32_t stage) {
  return stage >= static_cast<int32_t>(Stage::grafting) &&
         stage <= static_cast<int32_t>(Stage::fossilized);
}
// Stages whose blueprint receives gradients with the seed's real alpha and
// which also get dalpha (GRAFTING .. FINE_TUNING).
constexpr bool stage_trains_grafted(int32_t stage) {
  return stage >= static_cast<int32_t>(Stage::grafting) &&
         stage <= static_cast<int32_t>(Stage::fine_tuning);
}
// TRAINING: output is a copy, blueprint gets the gradient as if alpha = 1.
constexpr bool stage_trains_shadow(int32_t stage) {
  return stage == static_cast<int32_t>(Stage::training);
}

std::string_view dtype_name(DType);
std::string_view kind_name(Kind);
std::string_view stage_name(Stage);
std::string_view strategy_name(Strategy);
std::size_t dtype_size(DType);

}  // namespace kasmina
