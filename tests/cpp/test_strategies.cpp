// Alpha trajectories of the four grafting strategies of SPEC section 7
// against sequences computed by hand from the formulas (DESIGN decisions
// 9, 10, 18-20). Ramps are powers of two so that every expected alpha is
// exact in float32. Seed 0 is the seed under test; seeds 1 and 2 get random
// inputs and must not disturb it.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kasmina/kasmina.hpp"

namespace kasmina {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr auto kGrafting = static_cast<int32_t>(Stage::grafting);
constexpr auto kStabilization = static_cast<int32_t>(Stage::stabilization);

struct Bench {
  Layer layer;
  std::mt19937 rng;

  explicit Bench(const StrategyParams& params, uint32_t seed = 1)
      : layer(make_config()), rng(seed) {
    layer.germinate(0, Kind::residual, 0, params);
    layer.transition(0, Stage::training);
    layer.transition(0, Stage::grafting);
    layer.germinate(1, Kind::mlp);
    layer.transition(1, Stage::training);
  }

  static LayerConfig make_config() {
    LayerConfig c;
    c.hidden = 24;
    c.num_seeds = 3;
    return c;
  }

  // One controller step with seed 0's inputs given and random inputs for the
  // other seeds.
  void step(float loss, float grad_norm, float drift) {
    std::uniform_real_distribution<float> u(0.01f, 2.0f);
    std::vector<float> l = {loss, u(rng), u(rng)};
    std::vector<float> g = {grad_norm, u(rng), u(rng)};
    std::vector<float> d = {drift, u(rng), u(rng)};
    layer.step(l, g, d);
  }

  float alpha() const { return layer.seeds().alpha[0]; }
  int32_t stage() const { return layer.seeds().stage[0]; }
};

StrategyParams params(Strategy s, int32_t ramp) {
  StrategyParams p;
  p.strategy = s;
  p.ramp_steps = ramp;
  return p;
}

TEST(Strategies, FixedRampQuarterSteps) {
  Bench b(params(Strategy::fixed_ramp, 4));
  const std::vector<float> expected = {0.25f, 0.5f, 0.75f};
  for (float e : expected) {
    b.step(kNaN, kNaN, kNaN);  // FIXED_RAMP reads no input
    EXPECT_EQ(b.alpha(), e);
    EXPECT_EQ(b.stage(), kGrafting);
  }
  b.step(1.0f, 0.5f, 0.01f);
  // Reaching 1 moves the seed on at the end of the same step.
  EXPECT_EQ(b.alpha(), 1.0f);
  EXPECT_EQ(b.stage(), kStabilization);
  EXPECT_EQ(b.layer.seeds().steps_in_stage[0], 0);
  // STABILIZATION holds alpha.
  b.step(1.0f, 0.5f, 0.01f);
  EXPECT_EQ(b.alpha(), 1.0f);
}

// Float32 additions of 1/ramp do not always sum to 1 (e.g. 1/30 thirty
// times); the seed must still leave GRAFTING after exactly ramp_steps steps.
TEST(Strategies, FixedRampTakesExactlyRampSteps) {
  for (int32_t ramp : {1, 3, 7, 10, 11, 12, 19, 30, 97, 100, 513, 1000, kMaxRampSteps}) {
    Bench b(params(Strategy::fixed_ramp, ramp));
    for (int32_t k = 1; k < ramp; ++k) {
      b.step(1.0f, 0.5f, 0.01f);
      ASSERT_EQ(b.stage(), kGrafting) << "ramp " << ramp << " left early at step " << k;
      ASSERT_LT(b.alpha(), 1.0f);
    }
    b.step(1.0f, 0.5f, 0.01f);
    EXPECT_EQ(b.stage(), kStabilization) << "ramp " << ramp;
    EXPECT_EQ(b.alpha(), 1.0f) << "ramp " << ramp;
  }
}

TEST(Strategies, PerformanceLinked) {
  // delta = 1/4. Baseline L0 = 2.
  Bench b(params(Strategy::performance_linked, 4));
  EXPECT_TRUE(std::isnan(b.layer.seeds().loss_baseline[0]));
  b.step(kNaN, 0.5f, 0.01f);  // NaN on the first step records nothing
  EXPECT_TRUE(std::isnan(b.layer.seeds().loss_baseline[0]));
  EXPECT_EQ(b.alpha(), 0.0f);
  b.step(2.0f, 0.5f, 0.01f);  // baseline recorded, alpha held
  EXPECT_EQ(b.layer.seeds().loss_baseline[0], 2.0f);
  EXPECT_EQ(b.alpha(), 0.0f);
  b.step(1.5f, 0.5f, 0.01f);  // r = 0.25, 2r = 0.5: + 0.5 * 0.25
  EXPECT_EQ(b.alpha(), 0.125f);
  b.step(1.0f, 0.5f, 0.01f);  // r = 0.5, 2r = 1: + 0.25
  EXPECT_EQ(b.alpha(), 0.375f);
  b.step(kNaN, 0.5f, 0.01f);  // hold
  EXPECT_EQ(b.alpha(), 0.375f);
  b.step(3.0f, 0.5f, 0.01f);  // worse than baseline: r = 0, clamped up to 0.5: + 0.125
  EXPECT_EQ(b.alpha(), 0.5f);
  b.step(0.5f, 0.5f, 0.01f);  // r = 0.75, 2r = 1.5: + 0.375
  EXPECT_EQ(b.alpha(), 0.875f);
  EXPECT_EQ(b.stage(), kGrafting);
  b.step(-2.0f, 0.5f, 0.01f);  // r = 2, 2r = 4 clamped to 3: + 0.75, alpha clamped to 1
  EXPECT_EQ(b.alpha(), 1.0f);
  EXPECT_EQ(b.stage(), kStabilization);
  EXPECT_EQ(b.layer.seeds().loss_baseline[0], 2.0f);
}

TEST(Strategies, PerformanceLinkedUpperClamp) {
  // delta = 1/8; L0 = 1, loss = -1: r = 2, 2r = 4 -> 3: + 0.375 per step.
  Bench b(params(Strategy::performance_linked, 8));
  b.step(1.0f, 0.5f, 0.01f);
  b.step(-1.0f, 0.5f, 0.01f);
  EXPECT_EQ(b.alpha(), 0.375f);
  b.step(-1.0f, 0.5f, 0.01f);
  EXPECT_EQ(b.alpha(), 0.75f);
}

TEST(Strategies, PerformanceLinkedNonPositiveBaseline) {
  // L0 <= 0 gives r = 0, so alpha moves by delta / 2 = 0.0625.
  Bench b(params(Strategy::performance_linked, 8));
  b.step(-0.5f, 0.5f, 0.01f);
  EXPECT_EQ(b.layer.seeds().loss_baseline[0], -0.5f);
  b.step(-3.0f, 0.5f, 0.01f);
  EXPECT_EQ(b.alpha(), 0.0625f);
  b.step(std::numeric_limits<float>::infinity(), 0.5f, 0.01f);  // not a measurement: hold
  EXPECT_EQ(b.alpha(), 0.0625f);
}

TEST(Strategies, DriftControlled) {
  // delta = 1/8, threshold 0.2: d < 0.1 -> +0.25, d < 0.2 -> +0.125, else hold.
  StrategyParams p = params(Strategy::drift_controlled, 8);
  p.drift_threshold = 0.2f;
  Bench b(p);
  b.step(1.0f, 0.5f, 0.05f);  // window [0.05], d = 0.05
  EXPECT_EQ(b.alpha(), 0.25f);
  b.step(1.0f, 0.5f, 0.25f);  // [0.05, 0.25], d = 0.15
  EXPECT_EQ(b.alpha(), 0.375f);
  b.step(1.0f, 0.5f, 0.45f);  // [0.05, 0.25, 0.45], d = 0.25: hold
  EXPECT_EQ(b.alpha(), 0.375f);
  b.step(1.0f, 0.5f, kNaN);  // a NaN in the window holds until it drops out
  EXPECT_EQ(b.alpha(), 0.375f);
  EXPECT_EQ(b.layer.seeds().drift_count[0], 4);
  for (int32_t k = 0; k < 4; ++k) {
    b.step(1.0f, 0.5f, 0.0f);
    EXPECT_EQ(b.alpha(), 0.375f) << k;
  }
  // Window now [NaN, 0, 0, 0, 0] -> after this step [0, 0, 0, 0, 0].
  EXPECT_EQ(b.layer.seeds().drift_count[0], kDriftWindow);
  b.step(1.0f, 0.5f, 0.0f);
  EXPECT_EQ(b.alpha(), 0.625f);
  b.step(1.0f, 0.5f, 0.9f);  // [0, 0, 0, 0, 0.9], d = 0.18
  EXPECT_EQ(b.alpha(), 0.75f);
  b.step(1.0f, 0.5f, 0.9f);  // mean 0.36: hold
  EXPECT_EQ(b.alpha(), 0.75f);
}

TEST(Strategies, DriftControlledBoundaries) {
  // threshold 0.5: d = 0.25 is not < 0.25, so + delta only; d = 0.5 holds.
  StrategyParams p = params(Strategy::drift_controlled, 4);
  p.drift_threshold = 0.5f;
  Bench b(p);
  b.step(1.0f, 0.5f, 0.25f);
  EXPECT_EQ(b.alpha(), 0.25f);
  b.step(1.0f, 0.5f, 0.75f);  // [0.25, 0.75], d = 0.5: hold
  EXPECT_EQ(b.alpha(), 0.25f);
}

TEST(Strategies, DriftWindowRecordsEverySeed) {
  Bench b(params(Strategy::fixed_ramp, 4));
  const std::vector<float> readings = {0.5f, 0.25f, 0.125f, 1.0f, 2.0f, 4.0f, 8.0f};
  for (float r : readings) b.step(1.0f, 0.5f, r);
  // Seed 2 is DORMANT and records as well; seed 0 left GRAFTING and still records.
  EXPECT_EQ(b.layer.seeds().drift_count[2], kDriftWindow);
  const std::vector<float> oldest_first = {0.125f, 1.0f, 2.0f, 4.0f, 8.0f};
  for (int32_t k = 0; k < kDriftWindow; ++k) EXPECT_EQ(b.layer.seeds().drift_window[k], oldest_first[k]);
}

TEST(Strategies, GradNormGated) {
  // delta = 1/4, bounds [0.1, 1.0] inclusive.
  Bench b(params(Strategy::grad_norm_gated, 4));
  b.step(1.0f, 0.5f, 0.01f);
  EXPECT_EQ(b.alpha(), 0.25f);
  b.step(1.0f, 0.1f, 0.01f);  // lower bound inclusive
  EXPECT_EQ(b.alpha(), 0.5f);
  b.step(1.0f, 1.5f, 0.01f);  // above
  EXPECT_EQ(b.alpha(), 0.5f);
  b.step(1.0f, 0.05f, 0.01f);  // below
  EXPECT_EQ(b.alpha(), 0.5f);
  b.step(1.0f, kNaN, 0.01f);  // not measured
  EXPECT_EQ(b.alpha(), 0.5f);
  b.step(1.0f, 1.0f, 0.01f);  // upper bound inclusive
  EXPECT_EQ(b.alpha(), 0.75f);
  EXPECT_EQ(b.stage(), kGrafting);
  b.step(1.0f, 0.7f, 0.01f);
  EXPECT_EQ(b.alpha(), 1.0f);
  EXPECT_EQ(b.stage(), kStabilization);
}

TEST(Strategies, GradNormGatedCustomBounds) {
  StrategyParams p = params(Strategy::grad_norm_gated, 2);
  p.grad_norm_lower = 2.0f;
  p.grad_norm_upper = 3.0f;
  Bench b(p);
  b.step(1.0f, 1.0f, 0.01f);
  EXPECT_EQ(b.alpha(), 0.0f);
  b.step(1.0f, 2.5f, 0.01f);
  EXPECT_EQ(b.alpha(), 0.5f);
}

TEST(Strategies, AlphaIsClampedWhileGrafting) {
  // The optimiser may push alpha outside [0, 1]; the step clamps it even
  // when the strategy holds.
  Bench b(params(Strategy::grad_norm_gated, 4));
  std::vector<float> alpha(b.layer.seeds().alpha);
  alpha[0] = -0.5f;
  b.layer.set_alpha(alpha);
  b.step(1.0f, 5.0f, 0.01f);  // held, clamped to 0
  EXPECT_EQ(b.alpha(), 0.0f);
  alpha[0] = 1.5f;
  b.layer.set_alpha(alpha);
  b.step(1.0f, 5.0f, 0.01f);  // held, clamped to 1: reaches 1
  EXPECT_EQ(b.alpha(), 1.0f);
  EXPECT_EQ(b.stage(), kStabilization);
}

TEST(Strategies, OnlyGraftingSeedsMove) {
  Bench b(params(Strategy::fixed_ramp, 4));
  std::vector<float> alpha(b.layer.seeds().alpha);
  alpha[1] = 0.3f;  // TRAINING
  alpha[2] = 0.6f;  // DORMANT
  b.layer.set_alpha(alpha);
  b.step(1.0f, 0.5f, 0.01f);
  EXPECT_EQ(b.layer.seeds().alpha[1], 0.3f);
  EXPECT_EQ(b.layer.seeds().alpha[2], 0.6f);
  EXPECT_EQ(b.alpha(), 0.25f);
}

TEST(Strategies, SetStrategyRules) {
  Layer layer(Bench::make_config());
  StrategyParams p = params(Strategy::drift_controlled, 16);
  EXPECT_NO_THROW(layer.set_strategy(0, p));  // DORMANT
  layer.germinate(0, Kind::mlp, 0, p);
  p.strategy = Strategy::grad_norm_gated;
  EXPECT_NO_THROW(layer.set_strategy(0, p));  // GERMINATED
  layer.transition(0, Stage::training);
  p.strategy = Strategy::performance_linked;
  EXPECT_NO_THROW(layer.set_strategy(0, p));  // TRAINING
  EXPECT_EQ(layer.seeds().strategy[0], static_cast<int32_t>(Strategy::performance_linked));
  EXPECT_EQ(layer.seeds().ramp_steps[0], 16);
  layer.transition(0, Stage::grafting);
  try {
    layer.set_strategy(0, params(Strategy::fixed_ramp, 4));
    ADD_FAILURE() << "strategy change while GRAFTING accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("stage = GRAFTING"), std::string::npos) << e.what();
  }
  EXPECT_EQ(layer.seeds().strategy[0], static_cast<int32_t>(Strategy::performance_linked));
}

TEST(Strategies, InvalidParamsRefused) {
  Layer layer(Bench::make_config());
  const std::vector<uint8_t> before = layer.save();
  auto refused = [&](StrategyParams p, const std::string& field) {
    try {
      layer.set_strategy(1, p);
      ADD_FAILURE() << "accepted, expected an error about " << field;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::value);
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
    EXPECT_EQ(layer.save(), before);
  };
  StrategyParams p;
  p.strategy = static_cast<Strategy>(4);
  refused(p, "strategy = 4");
  p = {};
  p.ramp_steps = 0;
  refused(p, "ramp_steps = 0");
  p.ramp_steps = kMaxRampSteps + 1;
  refused(p, "ramp_steps");
  p = {};
  p.drift_threshold = 0.0f;
  refused(p, "drift_threshold");
  p.drift_threshold = kNaN;
  refused(p, "drift_threshold");
  p = {};
  p.grad_norm_lower = -0.1f;
  refused(p, "grad_norm_lower");
  p = {};
  p.grad_norm_lower = 2.0f;
  p.grad_norm_upper = 1.0f;
  refused(p, "grad_norm_upper must be >= grad_norm_lower");
}

}  // namespace
}  // namespace kasmina
