// Internal to the fast CPU backend (forward_cpu.cpp, backward_cpu.cpp): the
// row blocking that makes results independent of the thread count, the
// storage-dtype row converters, the Chan merge and the per-kind blend that
// forward and backward (clamp mask) must compute bit-identically.
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

template <typename S>
inline void load_row(const typename S::raw* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = S::load(src[j]);
}

template <typename S>
inline void store_row(const float* src, typename S::raw* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = S::store(src[j]);
}

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

// Y = a*T + (1-a)*X of one row chunk into y (unclamped). x must have two
// readable zeros before x[0] for CONV. Forward and the backward clamp mask
// both call this, so the mask sees the very bits the forward clamped.
inline void blend_chunk(const SeedPlan& p, const float* x, float* y, int64_t n) {
  const float a = p.a, om = p.one_minus_a, sigma = p.sigma;
  const float* v = p.vec;
  switch (p.kind) {
    case static_cast<int32_t>(Kind::residual):
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) y[j] = a * (x[j] + v[j]) + om * x[j];
      break;
    case static_cast<int32_t>(Kind::attention):
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) y[j] = a * (x[j] * v[j]) + om * x[j];
      break;
    case static_cast<int32_t>(Kind::mlp):
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float h = x[j] * v[j];
        y[j] = a * (sigma * (h > 0.0f ? h : 0.0f)) + om * x[j];
      }
      break;
    default: {
      const float w0 = v[0], w1 = v[1], w2 = v[2];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        y[j] = a * (sigma * (w0 * x[j] + w1 * x[j - 1] + w2 * x[j - 2])) + om * x[j];
      }
      break;
    }
  }
}

}  // namespace kasmina::detail::cpu
