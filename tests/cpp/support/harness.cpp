#include "support/harness.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>

// The library's own conversions, so the harness rounds exactly as the backends do.
#include "core/storage.hpp"

namespace kasmina::test {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Outputs stored as float32 (telemetry, gradients) are exact inputs rounded
// once more; under float64 storage they still carry float32 rounding.
double float32_output_tolerance(DType dtype) {
  return rel_tolerance(dtype == DType::f64 ? DType::f32 : dtype);
}

std::vector<double> widen(const std::vector<float>& values) {
  return {values.begin(), values.end()};
}

// The [rows, hidden] window of a strided storage tensor.
std::vector<double> window(const HostTensor& t, int64_t rows, int64_t hidden, int64_t stride) {
  std::vector<double> out(static_cast<std::size_t>(rows * hidden));
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t j = 0; j < hidden; ++j)
      out[static_cast<std::size_t>(n * hidden + j)] = t.get(n * stride + j);
  }
  return out;
}

void expect_rel(const std::string& tensor, std::span<const double> out, std::span<const double> ref,
                double tolerance, const Problem& p, const std::string& context) {
  ASSERT_EQ(out.size(), ref.size())
      << tensor << " size, " << context << " [" << describe(p.options) << "]";
  const double rel = rel_error(out, ref);
  EXPECT_LE(rel, tolerance) << tensor << ": rel error " << rel << " > " << tolerance << ", "
                            << context << " [" << describe(p.options) << "]";
}

// A value in the middle of the gap after the k-th smallest of `values`, so
// that float32 and float64 evaluations of Y fall on the same side of it.
// A float bound between the sorted values near index k, in a gap wide
// enough that float32 and float64 outputs fall on the same side of it: the
// gap nearest k (searching both ways) of at least 1e-4 relative. Storage
// rounding (bfloat16, copies) puts many outputs on a few values, so the
// neighbours of k itself are often equal or a float32 ulp apart.
float split_point(std::vector<double> values, std::size_t k) {
  std::sort(values.begin(), values.end());
  auto wide = [&](std::size_t i) {
    const double lo = values[i], hi = values[i + 1];
    return hi - lo > 1e-4 * std::max(1.0, std::max(std::fabs(lo), std::fabs(hi)));
  };
  for (std::size_t d = 0; d < values.size(); ++d) {
    if (k + d + 1 < values.size() && wide(k + d)) return static_cast<float>(0.5 * (values[k + d] + values[k + d + 1]));
    if (d <= k && k - d + 1 < values.size() && wide(k - d)) {
      return static_cast<float>(0.5 * (values[k - d] + values[k - d + 1]));
    }
  }
  return static_cast<float>(values[k]);
}

double special_value(DType dtype, int which) {
  switch (which) {
    case 0:
      return std::numeric_limits<double>::quiet_NaN();
    case 1:
      return kInf;
    case 2:
      return -kInf;
    default:
      // A subnormal of the storage dtype, below the default dead threshold.
      switch (dtype) {
        case DType::f16:
          return std::ldexp(1.0, -20);
        case DType::f64:
          return 1e-310;
        default:
          return 1e-40;
      }
  }
}

}  // namespace

double rel_tolerance(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return 1e-5;
    case DType::bf16:
      return 1e-2;
    case DType::f16:
      return 2e-3;
    case DType::f64:
      return 1e-12;
  }
  return 0.0;
}

double rel_error(std::span<const double> out, std::span<const double> ref) {
  if (out.size() != ref.size()) return kInf;
  double diff_sq = 0.0, ref_sq = 0.0, out_sq = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double o = out[i], r = ref[i];
    if (!std::isfinite(o) || !std::isfinite(r)) {
      // Non-finite values must agree exactly: NaN with NaN, +-Inf with itself.
      const bool same = (std::isnan(o) && std::isnan(r)) || o == r;
      if (!same) return kInf;
      continue;
    }
    diff_sq += (o - r) * (o - r);
    ref_sq += r * r;
    out_sq += o * o;
  }
  if (ref_sq == 0.0) return std::sqrt(out_sq);
  return std::sqrt(diff_sq) / std::sqrt(ref_sq);
}

double round_to(DType dtype, double value) {
  uint64_t buffer = 0;
  storage::store_double(dtype, &buffer, 0, value);
  return storage::load_double(dtype, &buffer, 0);
}

HostTensor::HostTensor(DType dtype_, int64_t numel_)
    : dtype(dtype_), numel(numel_), bytes(static_cast<std::size_t>(numel_) * dtype_size(dtype_)) {}

double HostTensor::get(int64_t i) const { return storage::load_double(dtype, bytes.data(), i); }

void HostTensor::set(int64_t i, double value) {
  storage::store_double(dtype, bytes.data(), i, value);
}

void HostTensor::poison() {
  // Quiet NaNs with a recognisable payload.
  switch (dtype) {
    case DType::f32: {
      const auto bits = static_cast<uint32_t>(0x7fc0dead);
      for (int64_t i = 0; i < numel; ++i) std::memcpy(bytes.data() + i * 4, &bits, 4);
      return;
    }
    case DType::bf16:
    case DType::f16: {
      const auto bits = static_cast<uint16_t>(dtype == DType::bf16 ? 0x7fcd : 0x7e0d);
      for (int64_t i = 0; i < numel; ++i) std::memcpy(bytes.data() + i * 2, &bits, 2);
      return;
    }
    case DType::f64: {
      const auto bits = static_cast<uint64_t>(0x7ff80000deadbeefULL);
      for (int64_t i = 0; i < numel; ++i) std::memcpy(bytes.data() + i * 8, &bits, 8);
      return;
    }
  }
}

std::vector<double> HostTensor::to_double() const {
  std::vector<double> out(static_cast<std::size_t>(numel));
  for (int64_t i = 0; i < numel; ++i) out[static_cast<std::size_t>(i)] = get(i);
  return out;
}

void poison(std::vector<float>& values) {
  std::fill(values.begin(), values.end(), std::bit_cast<float>(static_cast<uint32_t>(0x7fc0dead)));
}

void poison(std::vector<int64_t>& values) {
  std::fill(values.begin(), values.end(), static_cast<int64_t>(0x5ead5ead5ead5eadLL));
}

ForwardParams Problem::forward_params() {
  ForwardParams p;
  p.x = x.data();
  p.y = y.data();
  p.dtype = options.dtype;
  p.rows = rows;
  p.hidden = hidden;
  p.num_seeds = num_seeds;
  // Unpadded problems pass 0 so that the "0 = hidden" path is exercised.
  p.x_row_stride = row_stride == hidden ? 0 : row_stride;
  p.y_row_stride = p.x_row_stride;
  p.seeds = {stage.data(), kind.data(), blueprint.data(), alpha.data()};
  p.registry = {weights.data(), scales.data(), num_blueprints};
  p.clamp = clamp;
  p.dead_threshold = dead_threshold;
  p.telemetry = telemetry.data();
  p.nonfinite_count = nonfinite.data();
  return p;
}

BackwardParams Problem::backward_params() {
  BackwardParams p;
  p.x = x.data();
  p.dy = dy.data();
  p.dx = dx.data();
  p.dtype = options.dtype;
  p.rows = rows;
  p.hidden = hidden;
  p.num_seeds = num_seeds;
  p.x_row_stride = row_stride == hidden ? 0 : row_stride;
  p.dy_row_stride = p.x_row_stride;
  p.dx_row_stride = p.x_row_stride;
  p.seeds = {stage.data(), kind.data(), blueprint.data(), alpha.data()};
  p.registry = {weights.data(), scales.data(), num_blueprints};
  p.clamp = clamp;
  p.clip_enabled = clip_enabled;
  p.clip_norm = clip_norm;
  p.dweights = dweights.data();
  p.dscales = dscales.data();
  p.dalpha = dalpha.data();
  p.grad_stats = grad_stats.data();
  return p;
}

void Problem::poison_outputs() {
  y.poison();
  dx.poison();
  poison(telemetry);
  poison(nonfinite);
  poison(dweights);
  poison(dscales);
  poison(dalpha);
  poison(grad_stats);
}

Problem make_problem(const ProblemOptions& o) {
  Problem p;
  p.options = o;
  p.rows = o.rows;
  p.chunk = o.chunk;
  p.num_seeds = o.num_seeds;
  p.hidden = o.chunk * o.num_seeds;
  p.row_stride = p.hidden + o.row_pad;
  p.num_blueprints = o.num_blueprints;

  std::mt19937_64 rng(o.rng_seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  const auto uniform = [&](double lo, double hi) { return lo + (hi - lo) * unit(rng); };
  const auto pick = [&](int32_t n) {
    return static_cast<int32_t>(rng() % static_cast<uint64_t>(n));
  };

  // Seed table: every kind and stage cycled with random offsets.
  const auto S = static_cast<std::size_t>(o.num_seeds);
  p.stage.resize(S);
  p.kind.resize(S);
  p.blueprint.assign(S, 0);
  p.alpha.resize(S);
  const int32_t kind_offset = pick(kNumKinds);
  const int32_t stage_offset = pick(kNumStages);
  // Unmixed: one kind and GRAFTING for every seed, each with its own row.
  const int32_t unmixed_kind = o.chunk >= 3 ? kind_offset : kind_offset % 3;
  const int32_t unmixed_stage = static_cast<int32_t>(Stage::grafting);
  for (int32_t s = 0; s < o.num_seeds; ++s) {
    const auto us = static_cast<std::size_t>(s);
    int32_t kind = o.only_kind >= 0 ? o.only_kind
                   : o.mixed        ? (s + kind_offset) % kNumKinds
                                    : unmixed_kind;
    if (kind == static_cast<int32_t>(Kind::conv) && o.chunk < 3 && o.only_kind < 0) {
      kind = static_cast<int32_t>(Kind::residual);  // CONV is invalid below C = 3
    }
    p.kind[us] = kind;
    p.stage[us] = o.only_stage >= 0 ? o.only_stage
                  : o.mixed         ? (s + stage_offset) % kNumStages
                                    : unmixed_stage;
    const double r = unit(rng);
    // Mostly inside (0, 1); a few outside, and the inclusive bounds, to exercise clamp(alpha).
    p.alpha[us] = static_cast<float>(r < 0.08   ? -0.25
                                     : r < 0.16 ? 1.3
                                     : r < 0.20 ? 1.0
                                                : uniform(0.05, 0.95));
  }

  // Blueprints: DORMANT seeds (mixed mode) hold none; others take a fresh row
  // or, a third of the time, share an earlier row of the same kind.
  std::vector<int32_t> row_kind(static_cast<std::size_t>(o.num_blueprints), -1);
  int32_t next_row = 1;
  for (int32_t s = 0; s < o.num_seeds; ++s) {
    const auto us = static_cast<std::size_t>(s);
    if (o.only_stage < 0 && p.stage[us] == static_cast<int32_t>(Stage::dormant)) continue;
    int32_t shared = 0;
    for (int32_t b = 1; b < next_row; ++b) {
      if (row_kind[static_cast<std::size_t>(b)] == p.kind[us]) shared = b;
    }
    const bool share =
        shared != 0 && ((o.mixed && unit(rng) < 1.0 / 3.0) || next_row >= o.num_blueprints);
    if (share) {
      p.blueprint[us] = shared;
    } else if (next_row < o.num_blueprints) {
      row_kind[static_cast<std::size_t>(next_row)] = p.kind[us];
      p.blueprint[us] = next_row++;
    }
  }

  // Registry: every row random (row 0 and unused rows too, so that reading
  // them shows), moderate by kind so no transform is degenerate.
  const auto C = static_cast<std::size_t>(o.chunk);
  p.weights.resize(static_cast<std::size_t>(o.num_blueprints) * C);
  p.scales.resize(static_cast<std::size_t>(o.num_blueprints));
  for (int32_t b = 0; b < o.num_blueprints; ++b) {
    const int32_t kind = row_kind[static_cast<std::size_t>(b)];
    for (std::size_t j = 0; j < C; ++j) {
      double w = 0.0;
      switch (kind) {
        case static_cast<int32_t>(Kind::attention):
          w = 0.8 * normal(rng);
          break;  // softmax spread, not one-hot
        case static_cast<int32_t>(Kind::mlp):
          w = (unit(rng) < 0.2 ? -1.0 : 1.0) * uniform(0.5, 1.5);
          break;
        case static_cast<int32_t>(Kind::conv):
          w = j == 0 ? uniform(0.6, 1.2) : 0.4 * normal(rng);
          break;
        default:
          w = 0.5 * normal(rng);
          break;
      }
      p.weights[static_cast<std::size_t>(b) * C + j] = static_cast<float>(w);
    }
    p.scales[static_cast<std::size_t>(b)] =
        static_cast<float>((unit(rng) < 0.2 ? -1.0 : 1.0) * uniform(0.5, 1.5));
  }

  // Inputs: normal with a per-seed offset and scale; row padding holds NaN so
  // a backend that reads it shows in the telemetry.
  p.x = HostTensor(o.dtype, p.rows * p.row_stride);
  p.dy = HostTensor(o.dtype, p.rows * p.row_stride);
  p.x.poison();
  p.dy.poison();
  std::vector<double> offset(S), spread(S);
  for (std::size_t s = 0; s < S; ++s) {
    offset[s] = uniform(-1.0, 1.0);
    spread[s] = uniform(0.5, 2.0);
  }
  for (int64_t n = 0; n < p.rows; ++n) {
    for (int64_t j = 0; j < p.hidden; ++j) {
      const auto s = static_cast<std::size_t>(j / o.chunk);
      const int64_t i = n * p.row_stride + j;
      double v = offset[s] + spread[s] * normal(rng);
      if (o.special_fraction > 0.0 && unit(rng) < o.special_fraction) {
        v = special_value(o.dtype, pick(4));
      }
      p.x.set(i, v);
      p.dy.set(i, normal(rng));
    }
  }

  if (o.clamp && p.rows > 0) {
    // Bounds near the 10th/90th percentiles of the unclamped output, placed
    // in a gap between outputs so float32 and float64 agree on the mask.
    const reference::ForwardResult ref = reference::forward(p.forward_params());
    std::vector<double> finite;
    finite.reserve(ref.y_unclamped.size());
    for (double v : ref.y_unclamped) {
      if (std::isfinite(v)) finite.push_back(v);
    }
    if (finite.size() >= 2) {
      p.clamp = {true, split_point(finite, finite.size() / 10),
                 split_point(finite, (finite.size() * 9) / 10 - 1)};
    } else {
      p.clamp = {true, -1.0f, 1.0f};
    }
  } else if (o.clamp) {
    p.clamp = {true, -1.0f, 1.0f};
  }

  p.clip_enabled = o.clip;
  if (o.clip) {
    // The median row-chunk norm of dy: about half of the rows get clipped.
    std::vector<double> norms;
    norms.reserve(static_cast<std::size_t>(p.rows) * S);
    for (int64_t n = 0; n < p.rows; ++n) {
      for (int64_t s = 0; s < o.num_seeds; ++s) {
        double sq = 0.0;
        for (int64_t j = 0; j < o.chunk; ++j) {
          const double g = p.dy.get(n * p.row_stride + s * o.chunk + j);
          sq += g * g;
        }
        norms.push_back(std::sqrt(sq));
      }
    }
    if (norms.empty()) {
      p.clip_norm = 1.0f;
    } else {
      const auto mid = norms.begin() + static_cast<std::ptrdiff_t>(norms.size() / 2);
      std::nth_element(norms.begin(), mid, norms.end());
      p.clip_norm = static_cast<float>(*mid);
    }
  }

  p.y = HostTensor(o.dtype, p.rows * p.row_stride);
  p.dx = HostTensor(o.dtype, p.rows * p.row_stride);
  p.telemetry.resize(S * kTelemetryWidth);
  p.nonfinite.resize(S);
  p.dweights.resize(static_cast<std::size_t>(o.num_blueprints) * C);
  p.dscales.resize(static_cast<std::size_t>(o.num_blueprints));
  p.dalpha.resize(S);
  p.grad_stats.resize(S * kGradStatsWidth);
  p.poison_outputs();
  return p;
}

void expect_forward_matches(const Problem& p, const reference::ForwardResult& ref,
                            const std::string& context) {
  const std::string where = context + " [" + describe(p.options) + "]";
  const double tol = rel_tolerance(p.options.dtype);
  expect_rel("y", window(p.y, p.rows, p.hidden, p.row_stride), ref.y, tol, p, context);

  // Telemetry: variance, mean, dead ratio, SNR and drift by the rel rule over
  // the tensor; min, max and the counts exactly.
  std::vector<double> out_stats, ref_stats;
  for (int32_t s = 0; s < p.num_seeds; ++s) {
    const auto row = static_cast<std::size_t>(s) * kTelemetryWidth;
    for (int32_t c : {kTelVariance, kTelMean, kTelDeadRatio, kTelSignalToNoise, kTelDrift}) {
      out_stats.push_back(static_cast<double>(p.telemetry[row + static_cast<std::size_t>(c)]));
      ref_stats.push_back(ref.telemetry[row + static_cast<std::size_t>(c)]);
    }
    for (int32_t c : {kTelMin, kTelMax}) {
      const float got = p.telemetry[row + static_cast<std::size_t>(c)];
      const float want = static_cast<float>(ref.telemetry[row + static_cast<std::size_t>(c)]);
      EXPECT_EQ(std::bit_cast<uint32_t>(got), std::bit_cast<uint32_t>(want))
          << "telemetry[" << s << "][" << (c == kTelMin ? "min" : "max") << "] = " << got
          << ", expected exactly " << want << ", " << where;
    }
    const int64_t count = ref.nonfinite_count[static_cast<std::size_t>(s)];
    EXPECT_EQ(p.telemetry[row + kTelNonfinite], static_cast<float>(count))
        << "telemetry[" << s << "][nonfinite], " << where;
    EXPECT_EQ(p.nonfinite[static_cast<std::size_t>(s)], count)
        << "nonfinite_count[" << s << "], " << where;
  }
  expect_rel("telemetry", out_stats, ref_stats, float32_output_tolerance(p.options.dtype), p,
             context);

  // Drift is small next to the other columns, so the whole-tensor rule above
  // would let a wrong drift through: check the column on its own too, at ten
  // times the tensor tolerance (1 - cos loses digits to cancellation in float32).
  std::vector<double> out_drift, ref_drift;
  for (int32_t s = 0; s < p.num_seeds; ++s) {
    const auto at = static_cast<std::size_t>(s) * kTelemetryWidth + kTelDrift;
    out_drift.push_back(static_cast<double>(p.telemetry[at]));
    ref_drift.push_back(ref.telemetry[at]);
  }
  // A seed whose Y is a positive multiple of X (C = 1, or ATTENTION with
  // C = 1) has drift 0, which the float64 reference reproduces only up to
  // ~1e-30 of rounding noise: below an absolute floor the column is compared
  // absolutely, since a relative error against noise means nothing.
  constexpr double kDriftFloor = 1e-9;
  double ref_norm = 0.0, diff_norm = 0.0;
  for (std::size_t i = 0; i < ref_drift.size(); ++i) {
    ref_norm += ref_drift[i] * ref_drift[i];
    diff_norm += (out_drift[i] - ref_drift[i]) * (out_drift[i] - ref_drift[i]);
  }
  if (std::sqrt(ref_norm) < kDriftFloor) {
    EXPECT_LE(std::sqrt(diff_norm), 1e-6)
        << "telemetry[:, drift] should be ~0, " << context << " [" << describe(p.options) << "]";
  } else {
    expect_rel("telemetry[:, drift]", out_drift, ref_drift,
               10.0 * float32_output_tolerance(p.options.dtype), p, context);
  }
}

void expect_backward_matches(const Problem& p, const reference::BackwardResult& ref,
                             const std::string& context) {
  const double tol = rel_tolerance(p.options.dtype);
  const double tol32 = float32_output_tolerance(p.options.dtype);
  expect_rel("dx", window(p.dx, p.rows, p.hidden, p.row_stride), ref.dx, tol, p, context);
  expect_rel("dweights", widen(p.dweights), ref.dweights, tol32, p, context);
  expect_rel("dscales", widen(p.dscales), ref.dscales, tol32, p, context);
  expect_rel("dalpha", widen(p.dalpha), ref.dalpha, tol32, p, context);
  expect_rel("grad_stats", widen(p.grad_stats), ref.grad_stats, tol32, p, context);
}

namespace {

template <typename T>
void expect_same_bytes(const char* tensor, std::span<const T> a, std::span<const T> b,
                       const std::string& where) {
  ASSERT_EQ(a.size(), b.size()) << tensor << " size, " << where;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) {
      ADD_FAILURE() << tensor << " differs bitwise at element " << i << " (" << a[i] << " vs "
                    << b[i] << "), " << where;
      return;
    }
  }
}

void expect_same_window(const char* tensor, const Problem& a, const HostTensor& ta,
                        const HostTensor& tb, const std::string& where) {
  const std::size_t size = dtype_size(ta.dtype);
  for (int64_t n = 0; n < a.rows; ++n) {
    const std::size_t begin = static_cast<std::size_t>(n * a.row_stride) * size;
    const std::size_t length = static_cast<std::size_t>(a.hidden) * size;
    if (std::memcmp(ta.bytes.data() + begin, tb.bytes.data() + begin, length) != 0) {
      ADD_FAILURE() << tensor << " differs bitwise in row " << n << ", " << where;
      return;
    }
  }
}

}  // namespace

void expect_forward_bits_equal(const Problem& a, const Problem& b, const std::string& context) {
  const std::string where = context + " [" + describe(a.options) + "]";
  ASSERT_EQ(a.y.bytes.size(), b.y.bytes.size()) << "y size, " << where;
  expect_same_window("y", a, a.y, b.y, where);
  expect_same_bytes<float>("telemetry", a.telemetry, b.telemetry, where);
  expect_same_bytes<int64_t>("nonfinite_count", a.nonfinite, b.nonfinite, where);
}

void expect_backward_bits_equal(const Problem& a, const Problem& b, const std::string& context) {
  const std::string where = context + " [" + describe(a.options) + "]";
  ASSERT_EQ(a.dx.bytes.size(), b.dx.bytes.size()) << "dx size, " << where;
  expect_same_window("dx", a, a.dx, b.dx, where);
  expect_same_bytes<float>("dweights", a.dweights, b.dweights, where);
  expect_same_bytes<float>("dscales", a.dscales, b.dscales, where);
  expect_same_bytes<float>("dalpha", a.dalpha, b.dalpha, where);
  expect_same_bytes<float>("grad_stats", a.grad_stats, b.grad_stats, where);
}

std::string describe(const ProblemOptions& o) {
  std::ostringstream os;
  os << "rows=" << o.rows << " chunk=" << o.chunk << " seeds=" << o.num_seeds
     << " dtype=" << dtype_name(o.dtype) << " rng_seed=" << o.rng_seed
     << " blueprints=" << o.num_blueprints;
  if (o.only_kind >= 0) os << " kind=" << kind_name(static_cast<Kind>(o.only_kind));
  if (o.only_stage >= 0) os << " stage=" << stage_name(static_cast<Stage>(o.only_stage));
  if (!o.mixed) os << " unmixed";
  if (o.clamp) os << " clamp";
  if (o.clip) os << " clip";
  if (o.special_fraction > 0.0) os << " special=" << o.special_fraction;
  if (o.row_pad > 0) os << " row_pad=" << o.row_pad;
  return os.str();
}

}  // namespace kasmina::test
