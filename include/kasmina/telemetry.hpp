// Merging telemetry across shards of one batch (data-parallel training,
// docs/DISTRIBUTED.md). Each rank's forward sees only its own rows; SPEC
// section 4 telemetry of the concatenated batch is recovered from the ranks'
// rows by turning every row back into the sufficient statistics it was
// computed from and merging those with Chan's formula, in rank order.
//
// Exactness: counts (values, non-finite values, dead values, rows), min and
// max survive the round trip exactly (min/max are float32 values of x; the
// dead count is an integer recovered by rounding dead_ratio * count, exact
// while count < 2^23). Mean, variance and drift pass through float32 once on
// each rank, so the merged row matches the single-process telemetry within
// SPEC section 9 (float32: relative 1e-5), not bit for bit.
//
// Determinism: the merge is a fixed sequence of float64 operations over the
// ranks in the order given, so every rank that merges the same gathered rows
// gets the same bits.
#pragma once

#include <cstdint>
#include <span>

namespace kasmina {

// Sufficient statistics of one seed's chunk over some rows (SPEC section 4).
struct TelemetryMoments {
  int64_t count = 0;      // finite values
  double mean = 0.0;      // of the finite values (0 when count = 0)
  double m2 = 0.0;        // sum of squared deviations from mean (variance * count)
  double min = 0.0;       // +inf when count = 0 (set by the constructors below)
  double max = 0.0;       // -inf when count = 0
  int64_t dead = 0;       // finite values with abs(v) <= dead_threshold
  int64_t nonfinite = 0;  // NaN / +-Inf values, only counted
  double drift_sum = 0.0; // sum over rows of (1 - cos(X[n,:], Y[n,:])) = drift * rows
  int64_t rows = 0;       // N
};

// Moments of nothing (the identity of merge_moments).
TelemetryMoments empty_moments();

// Recovers the moments from one telemetry row (8 float32, SPEC section 4)
// produced by a forward over `rows` rows of a seed whose chunk has `chunk`
// columns, with `nonfinite` the exact (int64) count of that forward.
// count = rows * chunk - nonfinite; m2 = variance * count;
// dead = round(dead_ratio * count); drift_sum = drift * rows.
// Throws kasmina::Error (ValueError) when the row cannot have come from such
// a forward (negative sizes, nonfinite outside [0, rows * chunk], a NaN
// statistic with finite values, dead_ratio outside [0, 1]).
TelemetryMoments telemetry_moments(std::span<const float> row, int64_t nonfinite, int64_t rows,
                                   int64_t chunk);

// Chan et al.'s parallel merge of two disjoint sets of rows, a before b.
// Not commutative in the last bits: merge in a fixed (rank) order.
TelemetryMoments merge_moments(const TelemetryMoments& a, const TelemetryMoments& b);

// The telemetry row (SPEC section 4) of merged moments, rounded once to
// float32 into row[0..7].
void telemetry_row(const TelemetryMoments& m, std::span<float> row);

// All seeds of all ranks at once, which is what the front end calls:
// telemetry [ranks, seeds, 8], nonfinite [ranks, seeds], rows [ranks];
// writes merged telemetry [seeds, 8] and nonfinite [seeds]. Ranks are
// merged in index order. Validates everything before writing anything.
void merge_telemetry(std::span<const float> telemetry, std::span<const int64_t> nonfinite,
                     std::span<const int64_t> rows, int32_t num_ranks, int32_t num_seeds,
                     int64_t chunk, std::span<float> merged_telemetry,
                     std::span<int64_t> merged_nonfinite);

}  // namespace kasmina
