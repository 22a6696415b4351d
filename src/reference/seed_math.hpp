// Internal to the reference backend: the per-seed formulas of SPEC sections
// 3 and 5 on one row chunk, in float64, shared by forward and backward so the
// forward transform T is written down once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/storage.hpp"
#include "kasmina/params.hpp"
#include "kasmina/types.hpp"

namespace kasmina::reference::oracle {

// One seed's view of the table and the registry.
struct Seed {
  int32_t stage = 0;
  Kind kind = Kind::residual;
  int32_t blueprint = 0;
  double alpha = 0.0;     // raw alpha, as stored
  double a = 0.0;         // SPEC section 1: a = clamp(alpha, 0, 1)
  double sigma = 0.0;     // scale_b
  std::vector<double> w;  // w_b, length C
  std::vector<double> p;  // softmax(w) for ATTENTION, else empty
  bool blends = false;    // SPEC section 3: stage blends and b != 0
  bool grafted = false;   // SPEC section 7: grads with the real a, and dalpha
  bool shadow = false;    // SPEC section 7: TRAINING, grads as if a = 1
};

inline Seed load_seed(const SeedTable& table, const RegistryView& registry, int32_t s,
                      int64_t chunk) {
  Seed seed;
  seed.stage = table.stage[s];
  seed.kind = static_cast<Kind>(table.kind[s]);
  seed.blueprint = table.blueprint[s];
  seed.alpha = static_cast<double>(table.alpha[s]);
  seed.a = std::clamp(seed.alpha, 0.0, 1.0);
  const bool has_blueprint = seed.blueprint != 0;
  seed.blends = has_blueprint && stage_blends(seed.stage);
  seed.grafted = has_blueprint && stage_trains_grafted(seed.stage);
  seed.shadow = has_blueprint && stage_trains_shadow(seed.stage);
  seed.sigma = static_cast<double>(registry.scales[seed.blueprint]);
  seed.w.resize(static_cast<std::size_t>(chunk));
  for (int64_t j = 0; j < chunk; ++j) {
    seed.w[static_cast<std::size_t>(j)] =
        static_cast<double>(registry.weights[seed.blueprint * chunk + j]);
  }
  if (seed.kind == Kind::attention) {
    // Softmax shifted by the maximum so exp never overflows.
    const double w_max = *std::max_element(seed.w.begin(), seed.w.end());
    double total = 0.0;
    seed.p.resize(seed.w.size());
    for (std::size_t j = 0; j < seed.w.size(); ++j) {
      seed.p[j] = std::exp(seed.w[j] - w_max);
      total += seed.p[j];
    }
    for (double& v : seed.p) v /= total;
  }
  return seed;
}

// Read row n of seed chunk s of a strided storage buffer into out[0, C).
inline void load_chunk(DType dtype, const void* base, int64_t row_stride, int64_t n, int64_t col0,
                       int64_t chunk, double* out) {
  for (int64_t j = 0; j < chunk; ++j)
    out[j] = storage::load_double(dtype, base, n * row_stride + col0 + j);
}

// SPEC section 3, the table: T of one row chunk X (length C).
inline void transform(const Seed& seed, const double* X, int64_t chunk, double* T) {
  const std::vector<double>& w = seed.w;
  for (int64_t j = 0; j < chunk; ++j) {
    const auto uj = static_cast<std::size_t>(j);
    switch (seed.kind) {
      case Kind::residual:
        T[j] = X[j] + seed.sigma * w[uj];
        break;
      case Kind::attention:
        T[j] = X[j] * seed.p[uj];
        break;
      case Kind::mlp:
        T[j] = seed.sigma * std::max(X[j] * w[uj], 0.0);
        break;
      case Kind::conv: {
        // Zero padding at the chunk start; nothing crosses a chunk boundary.
        const double x1 = j >= 1 ? X[j - 1] : 0.0;
        const double x2 = j >= 2 ? X[j - 2] : 0.0;
        T[j] = seed.sigma * (w[0] * X[j] + w[1] * x1 + w[2] * x2);
        break;
      }
    }
  }
}

// SPEC section 3: Y = a*T + (1-a)*X for a blending seed, else Y = X.
inline void seed_output(const Seed& seed, const double* X, int64_t chunk, double* T, double* Y) {
  if (!seed.blends) {
    std::copy(X, X + chunk, Y);
    return;
  }
  transform(seed, X, chunk, T);
  for (int64_t j = 0; j < chunk; ++j) Y[j] = seed.a * T[j] + (1.0 - seed.a) * X[j];
}

// SPEC section 3: the optional clamp; a NaN stays NaN, as in torch.clamp.
inline double clamp_output(const OutputClamp& clamp, double v) {
  if (!clamp.enabled) return v;
  const double lo = static_cast<double>(clamp.lo);
  const double hi = static_cast<double>(clamp.hi);
  if (v < lo) return lo;
  if (v > hi) return hi;
  return v;
}

// Population mean and variance by Welford's update (SPEC section 4 asks for a
// stable method).
struct Welford {
  int64_t count = 0;
  double mean = 0.0;
  double m2 = 0.0;
  void add(double v) {
    ++count;
    const double delta = v - mean;
    mean += delta / static_cast<double>(count);
    m2 += delta * (v - mean);
  }
  double variance() const { return count > 0 ? m2 / static_cast<double>(count) : 0.0; }
};

}  // namespace kasmina::reference::oracle
