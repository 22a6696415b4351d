// The float64 reference against SPEC written out by hand: each kind's forward,
// copies by stage, telemetry corner cases, a finite-difference check of the
// backward in float64 storage, and the storage conversions it relies on.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "core/storage.hpp"
#include "support/harness.hpp"

namespace kasmina::test {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------------------
// Storage conversions (round to nearest even, single rounding from double).

TEST(Storage, Float16RoundsToNearestEven) {
  const auto f16 = [](double v) { return round_to(DType::f16, v); };
  EXPECT_EQ(f16(1.0 + std::ldexp(1.0, -11)), 1.0);                            // tie -> even
  EXPECT_EQ(f16(1.0 + 3 * std::ldexp(1.0, -11)), 1.0 + std::ldexp(1.0, -9));  // tie -> even (up)
  EXPECT_EQ(f16(65504.0), 65504.0);
  EXPECT_EQ(f16(65519.0), 65504.0);
  EXPECT_EQ(f16(65520.0), kInf);  // halfway to 2^16 rounds to even = overflow
  EXPECT_EQ(f16(-1e6), -kInf);
  EXPECT_EQ(f16(std::ldexp(1.0, -24)), std::ldexp(1.0, -24));  // smallest subnormal
  EXPECT_EQ(f16(std::ldexp(1.0, -25)), 0.0);                   // tie -> even (zero)
  EXPECT_EQ(f16(3 * std::ldexp(1.0, -25)), std::ldexp(1.0, -23));
  EXPECT_EQ(f16(std::ldexp(1023.0, -24)), std::ldexp(1023.0, -24));  // largest subnormal
  EXPECT_TRUE(std::signbit(f16(-0.0)));
  EXPECT_TRUE(std::isnan(f16(kNaN)));
  // Direct rounding of the double, not double -> float -> half.
  EXPECT_EQ(f16(1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40)), 1.0 + std::ldexp(1.0, -10));
}

TEST(Storage, BFloat16RoundsToNearestEven) {
  const auto bf16 = [](double v) { return round_to(DType::bf16, v); };
  EXPECT_EQ(bf16(1.0 + std::ldexp(1.0, -8)), 1.0);
  EXPECT_EQ(bf16(1.0 + 3 * std::ldexp(1.0, -8)), 1.0 + std::ldexp(1.0, -6));
  EXPECT_EQ(bf16(1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30)), 1.0 + std::ldexp(1.0, -7));
  EXPECT_EQ(bf16(std::numeric_limits<float>::max()), kInf);
  EXPECT_EQ(bf16(1e-40),
            static_cast<double>(storage::bf16_bits_to_float(storage::float_to_bf16_bits(1e-40f))));
  EXPECT_GT(bf16(1e-40), 0.0);
  EXPECT_TRUE(std::isnan(bf16(kNaN)));
  // A NaN whose payload sits only in the dropped half stays a NaN.
  EXPECT_TRUE(std::isnan(
      storage::bf16_bits_to_float(storage::float_to_bf16_bits(std::bit_cast<float>(0x7f800001u)))));
}

TEST(Storage, EveryHalfPatternRoundTrips) {
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const auto h = static_cast<uint16_t>(bits);
    for (const bool is_bf16 : {false, true}) {
      const float f = is_bf16 ? storage::bf16_bits_to_float(h) : storage::f16_bits_to_float(h);
      const uint16_t back =
          is_bf16 ? storage::float_to_bf16_bits(f) : storage::float_to_f16_bits(f);
      if (std::isnan(f)) {
        // Quiet NaNs keep their payload; signalling ones come back quiet.
        const uint16_t quiet = is_bf16 ? 0x0040 : 0x0200;
        EXPECT_EQ(back, static_cast<uint16_t>(h | quiet)) << "bits " << bits;
      } else {
        EXPECT_EQ(back, h) << (is_bf16 ? "bf16" : "f16") << " bits " << bits;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Hand-made problems: one seed of C = 4, two rows.

struct Manual {
  DType dtype = DType::f32;
  int64_t rows = 2, chunk = 4;
  int32_t num_seeds = 1;
  std::vector<double> x;                        // [rows, hidden]
  std::vector<int32_t> stage, kind, blueprint;  // [S]
  std::vector<float> alpha;                     // [S]
  std::vector<float> weights, scales;           // [B, C], [B]
  OutputClamp clamp;
  HostTensor x_storage;

  ForwardParams params() {
    x_storage = HostTensor(dtype, static_cast<int64_t>(x.size()));
    for (std::size_t i = 0; i < x.size(); ++i) x_storage.set(static_cast<int64_t>(i), x[i]);
    ForwardParams p;
    p.x = x_storage.data();
    p.dtype = dtype;
    p.rows = rows;
    p.hidden = chunk * num_seeds;
    p.num_seeds = num_seeds;
    p.seeds = {stage.data(), kind.data(), blueprint.data(), alpha.data()};
    p.registry = {weights.data(), scales.data(), static_cast<int32_t>(scales.size())};
    p.clamp = clamp;
    return p;
  }
};

// Row 0 of the registry is junk that must never be read.
Manual one_seed(Kind kind, Stage stage, float alpha) {
  Manual m;
  m.x = {0.5, -1.0, 2.0, -0.25, 1.5, 0.75, -2.5, 3.0};
  m.stage = {static_cast<int32_t>(stage)};
  m.kind = {static_cast<int32_t>(kind)};
  m.blueprint = {1};
  m.alpha = {alpha};
  m.weights = {9.0f, 9.0f, 9.0f, 9.0f, 0.5f, -0.25f, 1.0f, 2.0f};
  m.scales = {9.0f, 1.5f};
  return m;
}

// SPEC §3, written out per kind for the values of one_seed.
std::vector<double> expected_transform(Kind kind, const std::vector<double>& x) {
  const double w0 = 0.5, w1 = -0.25, w2 = 1.0, w3 = 2.0, sigma = 1.5;
  const double w[4] = {w0, w1, w2, w3};
  std::vector<double> t(8);
  const double e_sum = std::exp(w0) + std::exp(w1) + std::exp(w2) + std::exp(w3);
  for (int n = 0; n < 2; ++n) {
    const double* X = &x[static_cast<std::size_t>(n) * 4];
    double* T = &t[static_cast<std::size_t>(n) * 4];
    switch (kind) {
      case Kind::residual:
        for (int j = 0; j < 4; ++j) T[j] = X[j] + sigma * w[j];
        break;
      case Kind::attention:
        for (int j = 0; j < 4; ++j) T[j] = X[j] * std::exp(w[j]) / e_sum;
        break;
      case Kind::mlp:
        for (int j = 0; j < 4; ++j) T[j] = X[j] * w[j] > 0 ? sigma * X[j] * w[j] : 0.0;
        break;
      case Kind::conv:
        T[0] = sigma * (w0 * X[0]);
        T[1] = sigma * (w0 * X[1] + w1 * X[0]);
        T[2] = sigma * (w0 * X[2] + w1 * X[1] + w2 * X[0]);
        T[3] = sigma * (w0 * X[3] + w1 * X[2] + w2 * X[1]);
        break;
    }
  }
  return t;
}

TEST(ReferenceForward, EachKindByHand) {
  const double a = 0.25;
  for (int32_t k = 0; k < kNumKinds; ++k) {
    const Kind kind = static_cast<Kind>(k);
    Manual m = one_seed(kind, Stage::grafting, static_cast<float>(a));
    const reference::ForwardResult ref = reference::forward(m.params());
    const std::vector<double> t = expected_transform(kind, m.x);
    for (std::size_t i = 0; i < t.size(); ++i) {
      const double y = a * t[i] + (1 - a) * m.x[i];
      EXPECT_NEAR(ref.y[i], y, 1e-15 * (1 + std::fabs(y))) << kind_name(kind) << " element " << i;
      EXPECT_EQ(ref.y_unclamped[i], ref.y[i]);
    }
  }
}

TEST(ReferenceForward, AlphaIsClampedAndClampActsOnOutput) {
  Manual m = one_seed(Kind::residual, Stage::fine_tuning, 1.75f);  // a = 1
  m.clamp = {true, -1.0f, 2.0f};
  const reference::ForwardResult ref = reference::forward(m.params());
  const std::vector<double> t = expected_transform(Kind::residual, m.x);
  for (std::size_t i = 0; i < t.size(); ++i) {
    EXPECT_DOUBLE_EQ(ref.y_unclamped[i], t[i]);
    EXPECT_DOUBLE_EQ(ref.y[i], std::min(std::max(t[i], -1.0), 2.0));
  }
}

TEST(ReferenceForward, CopyIsBitIdenticalInEveryDtype) {
  for (const DType dtype : {DType::f32, DType::bf16, DType::f16, DType::f64}) {
    for (int32_t stage = 0; stage < kNumStages; ++stage) {
      ProblemOptions o;
      o.dtype = dtype;
      o.rows = 9;
      o.chunk = 5;
      o.num_seeds = 4;
      o.only_stage = stage;
      o.special_fraction = 0.1;
      o.row_pad = 3;
      o.rng_seed = 100 + static_cast<uint64_t>(stage);
      Problem p = make_problem(o);
      // Seed 0 has no blueprint: a copy whatever its stage.
      p.blueprint[0] = 0;
      // A signalling NaN and a NaN payload, which a round trip through double could alter.
      if (dtype == DType::f32) {
        const uint32_t snan = 0x7f800123u;
        std::memcpy(p.x.bytes.data(), &snan, 4);
      }
      forward(p.forward_params(), Backend::reference);
      const std::size_t size = dtype_size(dtype);
      for (int32_t s = 0; s < p.num_seeds; ++s) {
        const bool copy = s == 0 || !stage_blends(stage);
        for (int64_t n = 0; n < p.rows; ++n) {
          const std::size_t at = static_cast<std::size_t>(n * p.row_stride + s * p.chunk) * size;
          const bool same = std::memcmp(p.x.bytes.data() + at, p.y.bytes.data() + at,
                                        static_cast<std::size_t>(p.chunk) * size) == 0;
          if (copy) {
            EXPECT_TRUE(same) << "seed " << s << " row " << n << ", " << describe(o);
          }
        }
        if (copy) {
          EXPECT_EQ(p.telemetry[static_cast<std::size_t>(s) * kTelemetryWidth + kTelDrift], 0.0f);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Telemetry.

TEST(ReferenceTelemetry, NonFiniteValuesAreOnlyCounted) {
  const double tiny = 1e-40;  // a float32 subnormal, below the dead threshold
  Manual m = one_seed(Kind::residual, Stage::grafting, 0.5f);
  m.x = {kNaN, 2.0, kInf, -3.0, tiny, -kInf, 0.5, kNaN};
  const reference::ForwardResult ref = reference::forward(m.params());
  const double tiny_f = static_cast<double>(static_cast<float>(tiny));
  const std::vector<double> f = {2.0, -3.0, tiny_f, 0.5};
  const double mean = (2.0 - 3.0 + tiny_f + 0.5) / 4;
  double var = 0;
  for (double v : f) var += (v - mean) * (v - mean) / 4;
  const double* tel = ref.telemetry.data();
  EXPECT_NEAR(tel[kTelVariance], var, 1e-15);
  EXPECT_NEAR(tel[kTelMean], mean, 1e-15);
  EXPECT_EQ(tel[kTelMin], -3.0);
  EXPECT_EQ(tel[kTelMax], 2.0);
  EXPECT_EQ(tel[kTelDeadRatio], 0.25);
  EXPECT_NEAR(tel[kTelSignalToNoise], std::fabs(mean) / std::sqrt(var + 1e-8), 1e-15);
  EXPECT_EQ(tel[kTelNonfinite], 4.0);
  EXPECT_EQ(ref.nonfinite_count[0], 4);
  // Both rows hold a non-finite value, so both count as cos = 1.
  EXPECT_EQ(tel[kTelDrift], 0.0);
}

TEST(ReferenceTelemetry, AllNonFiniteChunk) {
  Manual m = one_seed(Kind::mlp, Stage::evaluating, 0.5f);
  m.x = {kNaN, kInf, -kInf, kNaN, kInf, kInf, -kInf, kNaN};
  const reference::ForwardResult ref = reference::forward(m.params());
  const std::vector<double> expected = {0, 0, kInf, -kInf, 0, 0, 8, 0};
  for (int c = 0; c < kTelemetryWidth; ++c)
    EXPECT_EQ(ref.telemetry[static_cast<std::size_t>(c)], expected[static_cast<std::size_t>(c)])
        << "column " << c;
}

TEST(ReferenceTelemetry, EmptyBatch) {
  for (const DType dtype : {DType::f32, DType::bf16, DType::f16, DType::f64}) {
    ProblemOptions o;
    o.rows = 0;
    o.dtype = dtype;
    o.num_seeds = 5;
    o.chunk = 7;
    Problem p = make_problem(o);
    forward(p.forward_params(), Backend::reference);
    for (int32_t s = 0; s < p.num_seeds; ++s) {
      const float* tel = &p.telemetry[static_cast<std::size_t>(s) * kTelemetryWidth];
      const std::vector<float> expected = {0, 0, INFINITY, -INFINITY, 0, 0, 0, 0};
      for (int c = 0; c < kTelemetryWidth; ++c)
        EXPECT_EQ(tel[c], expected[static_cast<std::size_t>(c)]) << "seed " << s << " column " << c;
      EXPECT_EQ(p.nonfinite[static_cast<std::size_t>(s)], 0);
    }
    backward(p.backward_params(), Backend::reference);
    for (float v : p.dweights) EXPECT_EQ(v, 0.0f);
    for (float v : p.dscales) EXPECT_EQ(v, 0.0f);
    for (float v : p.dalpha) EXPECT_EQ(v, 0.0f);
    for (float v : p.grad_stats) EXPECT_EQ(v, 0.0f);
  }
}

TEST(ReferenceTelemetry, VarianceIsStableForLargeOffsets) {
  // Values 1e8 + u with u of order 1: E[x^2] - E[x]^2 loses every digit of the
  // variance in float64 (1e16 against 1); Welford keeps it.
  ProblemOptions o;
  o.dtype = DType::f64;
  o.rows = 50;
  o.chunk = 40;
  o.num_seeds = 1;
  o.only_stage = static_cast<int32_t>(Stage::dormant);
  Problem p = make_problem(o);
  std::vector<double> values;
  for (int64_t i = 0; i < p.rows * p.hidden; ++i) {
    const double v = 1e8 + p.x.get(i);
    p.x.set(i, v);
    values.push_back(v);
  }
  const double mean =
      std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(values.size());
  double var = 0;
  for (double v : values) var += (v - mean) * (v - mean);
  var /= static_cast<double>(values.size());
  ASSERT_GT(var, 0.1);
  const reference::ForwardResult ref = reference::forward(p.forward_params());
  EXPECT_NEAR(ref.telemetry[kTelVariance], var, 1e-7 * var);
  EXPECT_NEAR(ref.telemetry[kTelMean], mean, 1e-14 * mean);
}

TEST(ReferenceTelemetry, DriftByHand) {
  Manual m = one_seed(Kind::residual, Stage::grafting, 0.5f);
  m.rows = 3;
  m.x = {0.5, -1.0, 2.0, -0.25, 1.5, 0.75, -2.5, 3.0, 0, 0, 0, 0};  // row 2 is zero: cos = 1
  const reference::ForwardResult ref = reference::forward(m.params());
  double cos_sum = 1.0;
  for (int n = 0; n < 2; ++n) {
    double dot = 0, xx = 0, yy = 0;
    for (int j = 0; j < 4; ++j) {
      const double x = m.x[static_cast<std::size_t>(n * 4 + j)];
      const double y = ref.y[static_cast<std::size_t>(n * 4 + j)];
      dot += x * y;
      xx += x * x;
      yy += y * y;
    }
    cos_sum += dot / std::sqrt(xx * yy);
  }
  EXPECT_NEAR(ref.telemetry[kTelDrift], 1.0 - cos_sum / 3.0, 1e-15);
  EXPECT_GT(ref.telemetry[kTelDrift], 0.0);
}

// ---------------------------------------------------------------------------
// Backward: central finite differences in float64 storage.

// The effective gradient of SPEC §5: dy masked where the clamp acted (on the
// unclamped output), then each row chunk clipped.
std::vector<double> effective_grad(const Problem& p, const reference::ForwardResult& fwd) {
  std::vector<double> g(static_cast<std::size_t>(p.rows * p.hidden));
  for (int64_t n = 0; n < p.rows; ++n) {
    for (int64_t s = 0; s < p.num_seeds; ++s) {
      double sq = 0;
      for (int64_t j = s * p.chunk; j < (s + 1) * p.chunk; ++j) {
        const auto i = static_cast<std::size_t>(n * p.hidden + j);
        const double y = fwd.y_unclamped[i];
        const bool passes = !p.clamp.enabled || (p.clamp.lo <= y && y <= p.clamp.hi);
        g[i] = passes ? p.dy.get(n * p.row_stride + j) : 0.0;
        sq += g[i] * g[i];
      }
      const double factor =
          p.clip_enabled ? std::min(1.0, p.clip_norm / (std::sqrt(sq) + 1e-6)) : 1.0;
      for (int64_t j = s * p.chunk; j < (s + 1) * p.chunk; ++j)
        g[static_cast<std::size_t>(n * p.hidden + j)] *= factor;
    }
  }
  return g;
}

double surrogate_loss(Problem& p, const std::vector<double>& g) {
  const reference::ForwardResult fwd = reference::forward(p.forward_params());
  return std::inner_product(g.begin(), g.end(), fwd.y_unclamped.begin(), 0.0);
}

// Central difference of the loss in one float parameter, with the steps that
// float32 can actually take.
double fd_float(Problem& p, float& param, const std::vector<double>& g) {
  const float saved = param;
  const float up = saved + 1e-3f, down = saved - 1e-3f;
  param = up;
  const double l_up = surrogate_loss(p, g);
  param = down;
  const double l_down = surrogate_loss(p, g);
  param = saved;
  return (l_up - l_down) / (static_cast<double>(up) - static_cast<double>(down));
}

struct Numeric {
  std::vector<double> dx, dweights, dscales, dalpha;
};

Numeric finite_differences(Problem& p, const std::vector<double>& g, bool inputs, bool params) {
  Numeric num;
  if (inputs) {
    const double h = 1e-6;
    for (int64_t n = 0; n < p.rows; ++n) {
      for (int64_t j = 0; j < p.hidden; ++j) {
        const int64_t i = n * p.row_stride + j;
        const double saved = p.x.get(i);
        p.x.set(i, saved + h);
        const double l_up = surrogate_loss(p, g);
        p.x.set(i, saved - h);
        const double l_down = surrogate_loss(p, g);
        p.x.set(i, saved);
        num.dx.push_back((l_up - l_down) / (2 * h));
      }
    }
  }
  if (params) {
    for (float& w : p.weights) num.dweights.push_back(fd_float(p, w, g));
    for (float& s : p.scales) num.dscales.push_back(fd_float(p, s, g));
    for (float& a : p.alpha) num.dalpha.push_back(fd_float(p, a, g));
  }
  return num;
}

void expect_close(const char* tensor, const std::vector<double>& analytic,
                  const std::vector<double>& numeric, const std::string& where) {
  ASSERT_EQ(analytic.size(), numeric.size()) << tensor << ", " << where;
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < analytic.size(); ++i) {
    diff += (analytic[i] - numeric[i]) * (analytic[i] - numeric[i]);
    norm += numeric[i] * numeric[i];
  }
  EXPECT_LE(std::sqrt(diff), 1e-6 * std::max(1.0, std::sqrt(norm))) << tensor << ", " << where;
}

TEST(ReferenceBackward, FiniteDifferencesEveryKindAndStage) {
  const Stage stages[] = {Stage::training,   Stage::grafting,    Stage::stabilization,
                          Stage::evaluating, Stage::fine_tuning, Stage::fossilized};
  uint64_t rng_seed = 1;
  for (int32_t kind = 0; kind < kNumKinds; ++kind) {
    for (const Stage stage : stages) {
      for (const bool clamp : {false, true}) {
        for (const bool clip : {false, true}) {
          ProblemOptions o;
          o.dtype = DType::f64;
          o.rows = 5;
          o.chunk = 6;
          o.num_seeds = 3;
          o.num_blueprints = 4;
          o.only_kind = kind;
          o.only_stage = static_cast<int32_t>(stage);
          o.clamp = clamp;
          o.clip = clip;
          o.rng_seed = rng_seed++;
          Problem p = make_problem(o);
          // Inside (0, 1) where dalpha is defined, and one out of range (a = 1, dalpha = 0).
          p.alpha = {0.3f, 0.7f, 1.3f};
          const std::string where = describe(o);
          const reference::BackwardResult bwd = reference::backward(p.backward_params());
          const std::vector<double> g = effective_grad(p, reference::forward(p.forward_params()));

          if (stage != Stage::training) {
            // Blending or copy stages: every gradient is that of the real loss;
            // FOSSILIZED seeds are frozen, so their parameter grads are zero.
            Numeric num = finite_differences(p, g, true, stage != Stage::fossilized);
            expect_close("dx", bwd.dx, num.dx, where);
            if (stage == Stage::fossilized) {
              num.dweights.assign(bwd.dweights.size(), 0.0);
              num.dscales.assign(bwd.dscales.size(), 0.0);
              num.dalpha.assign(bwd.dalpha.size(), 0.0);
            }
            expect_close("dweights", bwd.dweights, num.dweights, where);
            expect_close("dscales", bwd.dscales, num.dscales, where);
            expect_close("dalpha", bwd.dalpha, num.dalpha, where);
            for (double v : bwd.dweights) EXPECT_TRUE(std::isfinite(v)) << where;
          } else {
            // Shadow: dX = G, dalpha = 0, and the blueprint grads are those of
            // the surrogate sum(G * T): the seed grafted with alpha = 1.
            const Numeric host = finite_differences(p, g, true, false);
            expect_close("dx", bwd.dx, host.dx, where);
            expect_close("dx = G", bwd.dx, g, where);
            Problem grafted = p;
            std::fill(grafted.stage.begin(), grafted.stage.end(),
                      static_cast<int32_t>(Stage::grafting));
            std::fill(grafted.alpha.begin(), grafted.alpha.end(), 1.0f);
            grafted.clamp.enabled = false;
            const Numeric num = finite_differences(grafted, g, false, true);
            expect_close("dweights", bwd.dweights, num.dweights, where);
            expect_close("dscales", bwd.dscales, num.dscales, where);
            expect_close("dalpha", bwd.dalpha, std::vector<double>(bwd.dalpha.size(), 0.0), where);
          }
          if (clip) {
            // The clip must bind on some rows and not others, or it was not tested.
            std::size_t clipped = 0, total = 0;
            for (int64_t n = 0; n < p.rows; ++n) {
              for (int64_t s = 0; s < p.num_seeds; ++s, ++total) {
                double sq = 0;
                for (int64_t j = s * p.chunk; j < (s + 1) * p.chunk; ++j)
                  sq += std::pow(p.dy.get(n * p.row_stride + j), 2);
                clipped += std::sqrt(sq) > p.clip_norm ? 1 : 0;
              }
            }
            EXPECT_GT(clipped, 0u) << where;
            EXPECT_LT(clipped, total) << where;
          }
        }
      }
    }
  }
}

TEST(ReferenceBackward, GradStatsMatchDirectComputation) {
  for (uint64_t rng_seed = 1; rng_seed <= 6; ++rng_seed) {
    ProblemOptions o;
    o.rows = 11;
    o.chunk = 13;
    o.num_seeds = 6;
    o.rng_seed = rng_seed;
    o.clamp = rng_seed % 2 == 0;
    o.clip = rng_seed % 3 == 0;
    Problem p = make_problem(o);
    const reference::BackwardResult bwd = reference::backward(p.backward_params());
    for (int64_t s = 0; s < p.num_seeds; ++s) {
      std::vector<double> v;
      for (int64_t n = 0; n < p.rows; ++n) {
        for (int64_t j = s * p.chunk; j < (s + 1) * p.chunk; ++j)
          v.push_back(bwd.dx[static_cast<std::size_t>(n * p.hidden + j)]);
      }
      double sq = 0, sum = 0, max_abs = 0;
      for (double d : v) {
        sq += d * d;
        sum += d;
        max_abs = std::max(max_abs, std::fabs(d));
      }
      const double mean = sum / static_cast<double>(v.size());
      double var = 0;
      for (double d : v) var += (d - mean) * (d - mean);
      var /= static_cast<double>(v.size());
      const double* stats = &bwd.grad_stats[static_cast<std::size_t>(s) * kGradStatsWidth];
      EXPECT_NEAR(stats[kGradL2Norm], std::sqrt(sq), 1e-12 * std::sqrt(sq)) << describe(o);
      EXPECT_NEAR(stats[kGradVariance], var, 1e-12 * (var + 1e-300)) << describe(o);
      EXPECT_EQ(stats[kGradMaxAbs], max_abs) << describe(o);
    }
  }
}

// ---------------------------------------------------------------------------
// The dispatch path rounds the oracle into storage within SPEC §9, and is
// deterministic.

TEST(ReferenceOps, MatchesOracleInEveryDtype) {
  uint64_t rng_seed = 1;
  for (const DType dtype : {DType::f32, DType::bf16, DType::f16, DType::f64}) {
    for (const int64_t rows : {1, 7, 130}) {
      for (const int64_t chunk : {3, 48, 65}) {
        ProblemOptions o;
        o.dtype = dtype;
        o.rows = rows;
        o.chunk = chunk;
        o.num_seeds = 13;
        o.rng_seed = rng_seed++;
        o.clamp = rng_seed % 2 == 0;
        o.clip = rng_seed % 3 == 0;
        o.row_pad = rng_seed % 4 == 0 ? 5 : 0;
        o.special_fraction = rng_seed % 5 == 0 ? 0.02 : 0.0;
        Problem p = make_problem(o);
        forward(p.forward_params(), Backend::reference);
        backward(p.backward_params(), Backend::reference);
        expect_forward_matches(p, reference::forward(p.forward_params()), "reference ops");
        expect_backward_matches(p, reference::backward(p.backward_params()), "reference ops");
        Problem again = p;
        again.poison_outputs();
        forward(again.forward_params(), Backend::reference);
        backward(again.backward_params(), Backend::reference);
        expect_forward_bits_equal(p, again, "reference determinism");
        expect_backward_bits_equal(p, again, "reference determinism");
      }
    }
  }
}

TEST(Harness, RelErrorRejectsNaNAndMismatchedInfinities) {
  const std::vector<double> ref = {1.0, 2.0, kInf};
  EXPECT_EQ(rel_error(std::vector<double>{1.0, 2.0, kInf}, ref), 0.0);
  EXPECT_EQ(rel_error(std::vector<double>{1.0, kNaN, kInf}, ref), kInf);
  EXPECT_EQ(rel_error(std::vector<double>{1.0, 2.0, -kInf}, ref), kInf);
  EXPECT_EQ(rel_error(std::vector<double>{1.0, 2.0, 5.0}, ref), kInf);
  EXPECT_NEAR(rel_error(std::vector<double>{1.0, 2.5, kInf}, ref), 0.5 / std::sqrt(5.0), 1e-15);
}

}  // namespace
}  // namespace kasmina::test
