// The float64 reference forward: SPEC sections 3 and 4 written as code, one
// seed at a time, for clarity rather than speed.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "backends.hpp"
#include "core/storage.hpp"
#include "core/validation.hpp"
#include "kasmina/reference.hpp"
#include "reference/seed_math.hpp"

namespace kasmina::reference {

namespace {

// SPEC section 4, column 7: 1 - cos(X[n,:], Y[n,:]) with cos = 1 where either
// vector is zero or holds a non-finite value. Computed as ||x/|x| - y/|y|||^2 / 2,
// which equals 1 - cos but has no cancellation: a row whose Y equals X gives
// exactly 0, not the rounding noise of 1 - dot/(|x||y|).
double row_one_minus_cosine(const double* X, const double* Y, int64_t chunk) {
  double xx = 0.0, yy = 0.0;
  for (int64_t j = 0; j < chunk; ++j) {
    if (!std::isfinite(X[j]) || !std::isfinite(Y[j])) return 0.0;
    xx += X[j] * X[j];
    yy += Y[j] * Y[j];
  }
  if (xx == 0.0 || yy == 0.0) return 0.0;
  const double inv_x = 1.0 / std::sqrt(xx), inv_y = 1.0 / std::sqrt(yy);
  double distance = 0.0;
  for (int64_t j = 0; j < chunk; ++j) {
    const double d = X[j] * inv_x - Y[j] * inv_y;
    distance += d * d;
  }
  return 0.5 * distance;
}

}  // namespace

ForwardResult forward(const ForwardParams& params) {
  kasmina::detail::validate_forward(params, Backend::reference, kasmina::detail::Outputs::ignored);
  const int64_t rows = params.rows;
  const int64_t hidden = params.hidden;
  const int32_t num_seeds = params.num_seeds;
  const int64_t chunk = hidden / num_seeds;
  const int64_t x_stride = params.x_row_stride != 0 ? params.x_row_stride : hidden;

  ForwardResult result;
  const auto cells = static_cast<std::size_t>(rows * hidden);
  result.y.resize(cells);
  result.y_unclamped.resize(cells);
  result.telemetry.assign(static_cast<std::size_t>(num_seeds) * kTelemetryWidth, 0.0);
  result.nonfinite_count.assign(static_cast<std::size_t>(num_seeds), 0);

  std::vector<double> X(static_cast<std::size_t>(chunk)), T(X.size()), Y(X.size());
  for (int32_t s = 0; s < num_seeds; ++s) {
    const oracle::Seed seed = oracle::load_seed(params.seeds, params.registry, s, chunk);
    const int64_t col0 = s * chunk;

    oracle::Welford moments;
    double lowest = std::numeric_limits<double>::infinity();
    double highest = -std::numeric_limits<double>::infinity();
    int64_t dead = 0, nonfinite = 0;
    double drift_sum = 0.0;

    for (int64_t n = 0; n < rows; ++n) {
      oracle::load_chunk(params.dtype, params.x, x_stride, n, col0, chunk, X.data());
      oracle::seed_output(seed, X.data(), chunk, T.data(), Y.data());  // SPEC §3
      for (int64_t j = 0; j < chunk; ++j) {
        const auto out = static_cast<std::size_t>(n * hidden + col0 + j);
        result.y_unclamped[out] = Y[static_cast<std::size_t>(j)];
        result.y[out] = oracle::clamp_output(params.clamp, Y[static_cast<std::size_t>(j)]);
      }
      // SPEC §4: statistics over the finite values; the others are only counted.
      for (int64_t j = 0; j < chunk; ++j) {
        const double v = X[static_cast<std::size_t>(j)];
        if (!std::isfinite(v)) {
          ++nonfinite;
          continue;
        }
        moments.add(v);
        lowest = std::min(lowest, v);
        highest = std::max(highest, v);
        if (std::fabs(v) <= static_cast<double>(params.dead_threshold)) ++dead;
      }
      drift_sum += row_one_minus_cosine(X.data(), Y.data(), chunk);
    }

    double* tel = result.telemetry.data() + static_cast<std::size_t>(s) * kTelemetryWidth;
    const double variance = moments.variance();
    const double mean = moments.count > 0 ? moments.mean : 0.0;
    tel[kTelVariance] = variance;
    tel[kTelMean] = mean;
    tel[kTelMin] = lowest;
    tel[kTelMax] = highest;
    tel[kTelDeadRatio] =
        moments.count > 0 ? static_cast<double>(dead) / static_cast<double>(moments.count) : 0.0;
    tel[kTelSignalToNoise] = moments.count > 0 ? std::fabs(mean) / std::sqrt(variance + 1e-8) : 0.0;
    tel[kTelNonfinite] = static_cast<double>(nonfinite);
    // Exactly 0 for a copy and for N = 0.
    tel[kTelDrift] = seed.blends && rows > 0 ? drift_sum / static_cast<double>(rows) : 0.0;
    result.nonfinite_count[static_cast<std::size_t>(s)] = nonfinite;
  }
  return result;
}

}  // namespace kasmina::reference

namespace kasmina::detail {

void forward_reference(const ForwardParams& params) {
  const reference::ForwardResult result = reference::forward(params);
  const int64_t hidden = params.hidden;
  const int64_t chunk = hidden / params.num_seeds;
  const int64_t x_stride = params.x_row_stride != 0 ? params.x_row_stride : hidden;
  const int64_t y_stride = params.y_row_stride != 0 ? params.y_row_stride : hidden;
  for (int32_t s = 0; s < params.num_seeds; ++s) {
    const bool blends = params.seeds.blueprint[s] != 0 && stage_blends(params.seeds.stage[s]);
    for (int64_t n = 0; n < params.rows; ++n) {
      for (int64_t j = s * chunk; j < (s + 1) * chunk; ++j) {
        // SPEC §3: a copy is bit-identical, NaN payloads and signalling NaNs
        // included, which a round trip through double would not guarantee.
        if (!blends && !params.clamp.enabled) {
          storage::copy_element(params.dtype, params.x, n * x_stride + j, params.y,
                                n * y_stride + j);
        } else {
          storage::store_double(params.dtype, params.y, n * y_stride + j,
                                result.y[static_cast<std::size_t>(n * hidden + j)]);
        }
      }
    }
  }
  for (std::size_t i = 0; i < result.telemetry.size(); ++i) {
    params.telemetry[i] = static_cast<float>(result.telemetry[i]);
  }
  if (params.nonfinite_count != nullptr) {
    for (std::size_t s = 0; s < result.nonfinite_count.size(); ++s) {
      params.nonfinite_count[s] = result.nonfinite_count[s];
    }
  }
}

}  // namespace kasmina::detail
