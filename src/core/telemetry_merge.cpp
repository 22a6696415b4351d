// Telemetry rows -> sufficient statistics -> Chan merge in rank order ->
// telemetry row (include/kasmina/telemetry.hpp, docs/DISTRIBUTED.md).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "kasmina/error.hpp"
#include "kasmina/telemetry.hpp"
#include "kasmina/types.hpp"

namespace kasmina {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Largest count for which round(dead_ratio * count) recovers the integer dead
// count from a float32 ratio: the ratio carries 24 bits, so the product is
// off by at most count * 2^-24 < 0.5.
constexpr int64_t kExactDeadCount = int64_t{1} << 23;

}  // namespace

TelemetryMoments empty_moments() {
  TelemetryMoments m;
  m.min = kInf;
  m.max = -kInf;
  return m;
}

TelemetryMoments telemetry_moments(std::span<const float> row, int64_t nonfinite, int64_t rows,
                                   int64_t chunk) {
  KASMINA_CHECK_VALUE(row.size() == static_cast<std::size_t>(kTelemetryWidth),
                      "a telemetry row has ", kTelemetryWidth, " values, got ", row.size());
  KASMINA_CHECK_VALUE(rows >= 0, "rows must be >= 0, got ", rows);
  KASMINA_CHECK_VALUE(chunk > 0, "chunk must be > 0, got ", chunk);
  KASMINA_CHECK_VALUE(rows <= std::numeric_limits<int64_t>::max() / chunk,
                      "rows * chunk overflows int64 (rows = ", rows, ", chunk = ", chunk, ")");
  const int64_t values = rows * chunk;
  KASMINA_CHECK_VALUE(nonfinite >= 0 && nonfinite <= values, "nonfinite must be in [0, rows * chunk = ",
                      values, "], got ", nonfinite);

  TelemetryMoments m = empty_moments();
  m.rows = rows;
  m.nonfinite = nonfinite;
  m.count = values - nonfinite;
  if (rows == 0) return m;  // telemetry of an empty chunk carries nothing else

  const double drift = row[kTelDrift];
  KASMINA_CHECK_VALUE(std::isfinite(drift), "drift (telemetry column 7) must be finite for ", rows,
                      " rows, got ", drift);
  m.drift_sum = drift * static_cast<double>(rows);
  if (m.count == 0) return m;

  const double variance = row[kTelVariance];
  const double mean = row[kTelMean];
  const double lo = row[kTelMin];
  const double hi = row[kTelMax];
  const double dead_ratio = row[kTelDeadRatio];
  KASMINA_CHECK_VALUE(std::isfinite(variance) && variance >= 0.0,
                      "variance (telemetry column 0) must be finite and >= 0 for ", m.count,
                      " finite values, got ", variance);
  KASMINA_CHECK_VALUE(std::isfinite(mean), "mean (telemetry column 1) must be finite for ", m.count,
                      " finite values, got ", mean);
  KASMINA_CHECK_VALUE(std::isfinite(lo) && std::isfinite(hi) && lo <= hi,
                      "min and max (telemetry columns 2, 3) must be finite with min <= max for ",
                      m.count, " finite values, got min = ", lo, ", max = ", hi);
  KASMINA_CHECK_VALUE(dead_ratio >= 0.0 && dead_ratio <= 1.0,
                      "dead_ratio (telemetry column 4) must be in [0, 1], got ", dead_ratio);
  KASMINA_CHECK_VALUE(m.count <= kExactDeadCount, "a telemetry row of more than ", kExactDeadCount,
                      " finite values cannot give its dead count exactly (got ", m.count, ")");
  m.mean = mean;
  m.m2 = variance * static_cast<double>(m.count);
  m.min = lo;
  m.max = hi;
  m.dead = static_cast<int64_t>(std::nearbyint(dead_ratio * static_cast<double>(m.count)));
  return m;
}

TelemetryMoments merge_moments(const TelemetryMoments& a, const TelemetryMoments& b) {
  TelemetryMoments m;
  m.count = a.count + b.count;
  m.rows = a.rows + b.rows;
  m.nonfinite = a.nonfinite + b.nonfinite;
  m.dead = a.dead + b.dead;
  m.drift_sum = a.drift_sum + b.drift_sum;
  m.min = std::fmin(a.min, b.min);
  m.max = std::fmax(a.max, b.max);
  if (a.count == 0) {
    m.mean = b.mean;
    m.m2 = b.m2;
  } else if (b.count == 0) {
    m.mean = a.mean;
    m.m2 = a.m2;
  } else {
    const double na = static_cast<double>(a.count);
    const double nb = static_cast<double>(b.count);
    const double n = na + nb;
    const double delta = b.mean - a.mean;
    m.mean = a.mean + delta * (nb / n);
    m.m2 = a.m2 + b.m2 + delta * delta * (na * nb / n);
  }
  return m;
}

void telemetry_row(const TelemetryMoments& m, std::span<float> row) {
  KASMINA_CHECK_VALUE(row.size() == static_cast<std::size_t>(kTelemetryWidth),
                      "a telemetry row has ", kTelemetryWidth, " values, got ", row.size());
  // SPEC section 4: with no finite values variance = mean = dead_ratio =
  // signal_to_noise = 0, min = +inf, max = -inf; drift is 0 for N = 0.
  const bool any = m.count > 0;
  const double count = static_cast<double>(m.count);
  const double variance = any ? m.m2 / count : 0.0;
  const double mean = any ? m.mean : 0.0;
  row[kTelVariance] = static_cast<float>(variance);
  row[kTelMean] = static_cast<float>(mean);
  row[kTelMin] = static_cast<float>(any ? m.min : kInf);
  row[kTelMax] = static_cast<float>(any ? m.max : -kInf);
  row[kTelDeadRatio] = static_cast<float>(any ? static_cast<double>(m.dead) / count : 0.0);
  row[kTelSignalToNoise] = static_cast<float>(any ? std::fabs(mean) / std::sqrt(variance + 1e-8) : 0.0);
  row[kTelNonfinite] = static_cast<float>(m.nonfinite);
  row[kTelDrift] = static_cast<float>(m.rows > 0 ? m.drift_sum / static_cast<double>(m.rows) : 0.0);
}

void merge_telemetry(std::span<const float> telemetry, std::span<const int64_t> nonfinite,
                     std::span<const int64_t> rows, int32_t num_ranks, int32_t num_seeds,
                     int64_t chunk, std::span<float> merged_telemetry,
                     std::span<int64_t> merged_nonfinite) {
  KASMINA_CHECK_VALUE(num_ranks > 0, "num_ranks must be > 0, got ", num_ranks);
  KASMINA_CHECK_VALUE(num_seeds > 0, "num_seeds must be > 0, got ", num_seeds);
  const auto ranks = static_cast<std::size_t>(num_ranks);
  const auto seeds = static_cast<std::size_t>(num_seeds);
  const auto width = static_cast<std::size_t>(kTelemetryWidth);
  KASMINA_CHECK_VALUE(telemetry.size() == ranks * seeds * width, "telemetry must have ",
                      ranks * seeds * width, " values ([", num_ranks, ", ", num_seeds, ", ",
                      kTelemetryWidth, "]), got ", telemetry.size());
  KASMINA_CHECK_VALUE(nonfinite.size() == ranks * seeds, "nonfinite must have ", ranks * seeds,
                      " values ([", num_ranks, ", ", num_seeds, "]), got ", nonfinite.size());
  KASMINA_CHECK_VALUE(rows.size() == ranks, "rows must have ", ranks, " values (one per rank), got ",
                      rows.size());
  KASMINA_CHECK_VALUE(merged_telemetry.size() == seeds * width, "merged telemetry must have ",
                      seeds * width, " values ([", num_seeds, ", ", kTelemetryWidth, "]), got ",
                      merged_telemetry.size());
  KASMINA_CHECK_VALUE(merged_nonfinite.size() == seeds, "merged nonfinite must have ", seeds,
                      " values, got ", merged_nonfinite.size());

  // Validate every rank's rows before writing anything (SPEC section 8).
  std::vector<TelemetryMoments> merged(seeds, empty_moments());
  for (std::size_t r = 0; r < ranks; ++r) {
    for (std::size_t s = 0; s < seeds; ++s) {
      TelemetryMoments m;
      try {
        m = telemetry_moments(telemetry.subspan((r * seeds + s) * width, width),
                              nonfinite[r * seeds + s], rows[r], chunk);
      } catch (const Error& e) {
        // Name the rank and seed; the message already starts with "kasmina: ".
        const std::string what = e.what();
        KASMINA_FAIL(e.kind(), "rank ", r, ", seed ", s, ": ",
                     what.rfind("kasmina: ", 0) == 0 ? what.substr(9) : what);
      }
      merged[s] = merge_moments(merged[s], m);
    }
  }
  for (std::size_t s = 0; s < seeds; ++s) {
    telemetry_row(merged[s], merged_telemetry.subspan(s * width, width));
    merged_nonfinite[s] = merged[s].nonfinite;
  }
}

}  // namespace kasmina
