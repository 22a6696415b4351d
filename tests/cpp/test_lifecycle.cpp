// The lifecycle state machine of SPEC section 7 (with DESIGN decision 7): the
// whole 11 x 11 matrix of requested transitions, germinate's errors, stage
// entry effects, stabilization and embargo timing, slot reuse. Every refused
// call must leave the saved state byte-identical.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "kasmina/kasmina.hpp"

namespace kasmina {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

LayerConfig small_config(int64_t hidden = 12, int32_t seeds = 3, int32_t blueprints = 8) {
  LayerConfig c;
  c.hidden = hidden;
  c.num_seeds = seeds;
  c.max_blueprints = blueprints;
  return c;
}

std::vector<float> random_values(std::mt19937& rng, std::size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Steps with random, in-range inputs that move no seed by themselves except
// through time.
void step_random(Layer& layer, std::mt19937& rng) {
  const auto n = static_cast<std::size_t>(layer.config().num_seeds);
  const auto loss = random_values(rng, n, 0.5f, 2.0f);
  const auto grad = random_values(rng, n, 0.2f, 0.9f);
  const auto drift = random_values(rng, n, 0.001f, 0.05f);
  layer.step(loss, grad, drift);
}

// Requested transitions that bring a freshly germinated seed to `target`.
std::vector<Stage> path_to(Stage target) {
  switch (target) {
    case Stage::dormant:
    case Stage::germinated: return {};
    case Stage::training: return {Stage::training};
    case Stage::grafting: return {Stage::training, Stage::grafting};
    case Stage::stabilization: return {Stage::training, Stage::grafting, Stage::stabilization};
    case Stage::evaluating:
      return {Stage::training, Stage::grafting, Stage::stabilization, Stage::evaluating};
    case Stage::fine_tuning:
      return {Stage::training, Stage::grafting, Stage::stabilization, Stage::evaluating,
              Stage::fine_tuning};
    case Stage::fossilized:
      return {Stage::training, Stage::grafting, Stage::stabilization, Stage::evaluating,
              Stage::fossilized};
    case Stage::culled: return {Stage::training, Stage::culled};
    case Stage::cancelled: return {Stage::cancelled};
    case Stage::rolled_back: return {Stage::training, Stage::rolled_back};
  }
  return {};
}

void drive_to(Layer& layer, int32_t seed, Stage target) {
  if (target == Stage::dormant) return;
  layer.germinate(seed, Kind::mlp);
  for (Stage s : path_to(target)) layer.transition(seed, s);
  ASSERT_EQ(layer.seeds().stage[static_cast<std::size_t>(seed)], static_cast<int32_t>(target));
}

// SPEC section 7's table as DESIGN decision 7 reads it, written out here
// independently of the library.
const std::map<Stage, std::vector<Stage>>& expected_table() {
  static const std::map<Stage, std::vector<Stage>> table = {
      {Stage::dormant, {}},
      {Stage::germinated, {Stage::training, Stage::cancelled}},
      {Stage::training, {Stage::grafting, Stage::culled, Stage::cancelled, Stage::rolled_back}},
      {Stage::grafting, {Stage::stabilization, Stage::rolled_back, Stage::culled}},
      {Stage::stabilization, {Stage::evaluating, Stage::rolled_back}},
      {Stage::evaluating,
       {Stage::fine_tuning, Stage::fossilized, Stage::culled, Stage::rolled_back}},
      {Stage::fine_tuning, {Stage::fossilized, Stage::culled, Stage::rolled_back}},
      {Stage::fossilized, {}},
      {Stage::culled, {}},
      {Stage::cancelled, {}},
      {Stage::rolled_back, {}},
  };
  return table;
}

std::string joined(const std::vector<Stage>& stages) {
  if (stages.empty()) return "none";
  std::string out;
  for (std::size_t i = 0; i < stages.size(); ++i) {
    out += (i ? ", " : "") + std::string(stage_name(stages[i]));
  }
  return out;
}

TEST(Lifecycle, FreshLayerIsDormant) {
  Layer layer(small_config());
  const SeedState& s = layer.seeds();
  ASSERT_EQ(s.size(), 3);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(s.stage[i], static_cast<int32_t>(Stage::dormant));
    EXPECT_EQ(s.blueprint[i], 0);
    EXPECT_EQ(s.alpha[i], 0.0f);
    EXPECT_EQ(s.steps_in_stage[i], 0);
    EXPECT_EQ(s.strategy[i], static_cast<int32_t>(Strategy::fixed_ramp));
    EXPECT_EQ(s.ramp_steps[i], 30);
    EXPECT_TRUE(std::isnan(s.loss_baseline[i]));
    EXPECT_EQ(s.checksum[i], layer.compute_checksum(static_cast<int32_t>(i)));
  }
  EXPECT_NO_THROW(layer.verify());
  EXPECT_EQ(layer.registry().num_blueprints, 8);
  EXPECT_EQ(layer.registry().chunk, 4);
  for (int32_t row = 0; row < 8; ++row) EXPECT_FALSE(layer.registry().allocated(row));
}

TEST(Lifecycle, ConfigValidation) {
  auto expect_invalid = [](LayerConfig c, const std::string& field) {
    try {
      Layer layer(c);
      ADD_FAILURE() << "config accepted, expected an error about " << field;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::value);
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  };
  LayerConfig c = small_config();
  c.hidden = 0;
  expect_invalid(c, "hidden must be > 0");
  c = small_config();
  c.num_seeds = 0;
  expect_invalid(c, "num_seeds must be > 0");
  c = small_config(10, 3);
  expect_invalid(c, "hidden = 10, num_seeds = 3");
  c = small_config(12, 3, 1);
  expect_invalid(c, "max_blueprints must be >= 2");
  c = small_config();
  c.dead_threshold = -1e-3f;
  expect_invalid(c, "dead_threshold");
  c.dead_threshold = kNaN;
  expect_invalid(c, "dead_threshold");
  c = small_config();
  c.clamp = {true, 1.5f, -0.5f};
  expect_invalid(c, "lo <= hi");
  c = small_config();
  c.clip_enabled = true;
  c.clip_norm = 0.0f;
  expect_invalid(c, "clip_norm > 0");
  c = small_config();
  c.stabilization_steps = -1;
  expect_invalid(c, "stabilization_steps");
  c = small_config();
  c.embargo_steps = -2;
  expect_invalid(c, "embargo_steps");
  // Disabled options are not checked.
  c = small_config();
  c.clamp = {false, 1.5f, -0.5f};
  c.clip_norm = -1.0f;
  EXPECT_NO_THROW(Layer{c});
}

// Every (from, to) pair: allowed requests succeed and reset steps_in_stage,
// the others throw naming both stages and the allowed targets, leaving the
// state byte-identical.
TEST(Lifecycle, TransitionMatrix) {
  std::mt19937 rng(11);
  const int32_t seed = 1;
  for (int32_t f = 0; f < kNumStages; ++f) {
    const auto from = static_cast<Stage>(f);
    const std::vector<Stage>& allowed = expected_table().at(from);
    EXPECT_EQ(Layer::allowed_targets(from), allowed) << stage_name(from);
    for (int32_t t = 0; t < kNumStages; ++t) {
      const auto to = static_cast<Stage>(t);
      Layer layer(small_config());
      drive_to(layer, 0, Stage::training);
      drive_to(layer, seed, from);
      // Give the seeds history so that a partial write would show.
      std::vector<float> alpha = random_values(rng, 3, 0.05f, 0.95f);
      layer.set_alpha(alpha);
      const int32_t embargo = layer.config().embargo_steps;
      for (int32_t k = 0; k < std::min(2, embargo - 1); ++k) step_random(layer, rng);
      ASSERT_EQ(layer.seeds().stage[seed], f);
      const std::vector<uint8_t> before = layer.save();
      const bool ok = std::find(allowed.begin(), allowed.end(), to) != allowed.end();
      const std::string pair = std::string(stage_name(from)) + " -> " + std::string(stage_name(to));
      if (ok) {
        EXPECT_NO_THROW(layer.transition(seed, to)) << pair;
        EXPECT_EQ(layer.seeds().stage[seed], t) << pair;
        EXPECT_EQ(layer.seeds().steps_in_stage[seed], 0) << pair;
        EXPECT_NO_THROW(layer.verify()) << pair;
        continue;
      }
      try {
        layer.transition(seed, to);
        ADD_FAILURE() << pair << " was accepted";
      } catch (const Error& e) {
        const std::string msg = e.what();
        EXPECT_EQ(e.kind(), ErrorKind::value) << pair;
        const std::string head = "kasmina: seed 1: cannot go from " + std::string(stage_name(from)) +
                                 " to " + std::string(stage_name(to)) + "; allowed from " +
                                 std::string(stage_name(from)) + ": " + joined(allowed);
        EXPECT_EQ(msg.rfind(head, 0), 0u) << pair << ": " << msg;
      }
      EXPECT_EQ(layer.save(), before) << pair << " changed the state";
    }
  }
}

TEST(Lifecycle, TransitionMessageExample) {
  LayerConfig c = small_config(12, 4);
  Layer layer(c);
  drive_to(layer, 2, Stage::training);
  try {
    layer.transition(2, Stage::fossilized);
    FAIL() << "TRAINING -> FOSSILIZED accepted";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(),
                 "kasmina: seed 2: cannot go from TRAINING to FOSSILIZED; allowed from TRAINING: "
                 "GRAFTING, CULLED, CANCELLED, ROLLED_BACK");
  }
}

TEST(Lifecycle, TransitionArgumentErrors) {
  Layer layer(small_config());
  drive_to(layer, 0, Stage::training);
  const std::vector<uint8_t> before = layer.save();
  EXPECT_THROW(layer.transition(-1, Stage::grafting), Error);
  EXPECT_THROW(layer.transition(3, Stage::grafting), Error);
  try {
    layer.transition(0, static_cast<Stage>(11));
    ADD_FAILURE() << "stage 11 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("stage = 11"), std::string::npos) << e.what();
  }
  EXPECT_THROW(layer.transition(0, static_cast<Stage>(-1)), Error);
  EXPECT_EQ(layer.save(), before);
}

TEST(Lifecycle, GerminateErrors) {
  std::mt19937 rng(5);
  Layer layer(small_config(12, 3, 4));
  ASSERT_EQ(layer.germinate(0, Kind::residual), 1);
  layer.set_alpha(random_values(rng, 3, 0.1f, 0.9f));
  const std::vector<uint8_t> before = layer.save();
  auto expect_error = [&](auto call, const std::string& text) {
    try {
      call();
      ADD_FAILURE() << "accepted, expected: " << text;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
    EXPECT_EQ(layer.save(), before) << text;
  };
  expect_error([&] { layer.germinate(3, Kind::mlp); }, "seed = 3");
  expect_error([&] { layer.germinate(-1, Kind::mlp); }, "seed = -1");
  expect_error([&] { layer.germinate(1, static_cast<Kind>(4)); }, "kind = 4");
  expect_error([&] { layer.germinate(1, static_cast<Kind>(-1)); }, "kind = -1");
  expect_error([&] { layer.germinate(1, Kind::mlp, 4); }, "blueprint = 4");
  expect_error([&] { layer.germinate(1, Kind::mlp, -1); }, "blueprint = -1");
  expect_error([&] { layer.germinate(1, Kind::mlp, 2); }, "blueprint 2 is not allocated");
  expect_error([&] { layer.germinate(1, Kind::mlp, 1); },
               "blueprint 1 was created for kind RESIDUAL, cannot share it as MLP");
  expect_error([&] { layer.germinate(0, Kind::residual); }, "cannot germinate from GERMINATED");
  StrategyParams bad;
  bad.ramp_steps = 0;
  expect_error([&] { layer.germinate(1, Kind::mlp, 0, bad); }, "ramp_steps");

  // C = 2: CONV needs three taps.
  Layer narrow(small_config(4, 2));
  try {
    narrow.germinate(0, Kind::conv);
    ADD_FAILURE() << "CONV with C = 2 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("chunk = hidden / num_seeds = 2"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(narrow.seeds().stage[0], static_cast<int32_t>(Stage::dormant));
  EXPECT_FALSE(narrow.registry().allocated(1));
  EXPECT_EQ(narrow.germinate(0, Kind::attention), 1);
}

TEST(Lifecycle, GerminateSetsStrategyAndStage) {
  Layer layer(small_config());
  StrategyParams sp;
  sp.strategy = Strategy::grad_norm_gated;
  sp.ramp_steps = 7;
  sp.drift_threshold = 0.3f;
  sp.grad_norm_lower = 0.25f;
  sp.grad_norm_upper = 2.5f;
  EXPECT_EQ(layer.germinate(2, Kind::conv, 0, sp), 1);
  const SeedState& s = layer.seeds();
  EXPECT_EQ(s.stage[2], static_cast<int32_t>(Stage::germinated));
  EXPECT_EQ(s.kind[2], static_cast<int32_t>(Kind::conv));
  EXPECT_EQ(s.blueprint[2], 1);
  EXPECT_EQ(s.alpha[2], 0.0f);
  EXPECT_EQ(s.strategy[2], static_cast<int32_t>(Strategy::grad_norm_gated));
  EXPECT_EQ(s.ramp_steps[2], 7);
  EXPECT_EQ(s.drift_threshold[2], 0.3f);
  EXPECT_EQ(s.grad_norm_lower[2], 0.25f);
  EXPECT_EQ(s.grad_norm_upper[2], 2.5f);
}

TEST(Lifecycle, EnteringGraftingZeroesAlpha) {
  std::mt19937 rng(7);
  Layer layer(small_config());
  drive_to(layer, 1, Stage::training);
  const std::vector<float> alpha = random_values(rng, 3, 0.2f, 0.8f);
  layer.set_alpha(alpha);
  layer.transition(1, Stage::grafting);
  EXPECT_EQ(layer.seeds().alpha[1], 0.0f);
  EXPECT_EQ(layer.seeds().alpha[0], alpha[0]);
  EXPECT_EQ(layer.seeds().alpha[2], alpha[2]);
  // Later stages hold whatever alpha the optimiser wrote back.
  layer.set_alpha(alpha);
  layer.transition(1, Stage::stabilization);
  EXPECT_EQ(layer.seeds().alpha[1], alpha[1]);
}

TEST(Lifecycle, StepsInStageCountAndReset) {
  std::mt19937 rng(3);
  Layer layer(small_config());
  drive_to(layer, 0, Stage::germinated);
  for (int32_t k = 1; k <= 4; ++k) {
    step_random(layer, rng);
    EXPECT_EQ(layer.seeds().steps_in_stage[0], k);
    EXPECT_EQ(layer.seeds().steps_in_stage[1], k);  // DORMANT seeds count too
  }
  layer.transition(0, Stage::training);
  EXPECT_EQ(layer.seeds().steps_in_stage[0], 0);
  EXPECT_EQ(layer.seeds().steps_in_stage[1], 4);
}

TEST(Lifecycle, StabilizationTiming) {
  std::mt19937 rng(13);
  LayerConfig c = small_config();
  c.stabilization_steps = 3;
  Layer layer(c);
  drive_to(layer, 0, Stage::stabilization);
  for (int32_t k = 1; k < 3; ++k) {
    step_random(layer, rng);
    EXPECT_EQ(layer.seeds().stage[0], static_cast<int32_t>(Stage::stabilization)) << k;
    EXPECT_EQ(layer.seeds().steps_in_stage[0], k);
  }
  step_random(layer, rng);
  EXPECT_EQ(layer.seeds().stage[0], static_cast<int32_t>(Stage::evaluating));
  EXPECT_EQ(layer.seeds().steps_in_stage[0], 0);
  // EVALUATING waits for a decision.
  for (int32_t k = 0; k < 20; ++k) step_random(layer, rng);
  EXPECT_EQ(layer.seeds().stage[0], static_cast<int32_t>(Stage::evaluating));
  EXPECT_EQ(layer.seeds().steps_in_stage[0], 20);
}

TEST(Lifecycle, EmbargoFreesSlotAndRow) {
  std::mt19937 rng(17);
  for (Stage ended : {Stage::culled, Stage::cancelled, Stage::rolled_back}) {
    LayerConfig c = small_config();
    c.embargo_steps = 4;
    Layer layer(c);
    drive_to(layer, 0, Stage::training);  // row 1
    drive_to(layer, 1, ended);            // row 2
    const int32_t row = layer.seeds().blueprint[1];
    ASSERT_EQ(row, 2);
    layer.set_alpha(random_values(rng, 3, 0.1f, 0.9f));
    for (int32_t k = 1; k < 4; ++k) {
      step_random(layer, rng);
      EXPECT_EQ(layer.seeds().stage[1], static_cast<int32_t>(ended)) << k;
      EXPECT_EQ(layer.seeds().blueprint[1], row);
      EXPECT_TRUE(layer.registry().allocated(row));
    }
    step_random(layer, rng);
    EXPECT_EQ(layer.seeds().stage[1], static_cast<int32_t>(Stage::dormant));
    EXPECT_EQ(layer.seeds().blueprint[1], 0);
    EXPECT_EQ(layer.seeds().alpha[1], 0.0f);
    EXPECT_EQ(layer.seeds().steps_in_stage[1], 0);
    EXPECT_FALSE(layer.registry().allocated(row));
    EXPECT_TRUE(layer.registry().allocated(1));
    // The slot and the row are reusable.
    EXPECT_EQ(layer.germinate(1, Kind::attention), row);
    EXPECT_EQ(layer.seeds().stage[1], static_cast<int32_t>(Stage::germinated));
  }
}

TEST(Lifecycle, ZeroEmbargoReturnsOnNextStep) {
  std::mt19937 rng(19);
  LayerConfig c = small_config();
  c.embargo_steps = 0;
  Layer layer(c);
  drive_to(layer, 2, Stage::cancelled);
  step_random(layer, rng);
  EXPECT_EQ(layer.seeds().stage[2], static_cast<int32_t>(Stage::dormant));
}

TEST(Lifecycle, FossilizedIsTerminalAndKeepsItsRow) {
  std::mt19937 rng(23);
  Layer layer(small_config());
  drive_to(layer, 0, Stage::fossilized);
  const int32_t row = layer.seeds().blueprint[0];
  for (int32_t k = 0; k < 50; ++k) step_random(layer, rng);
  EXPECT_EQ(layer.seeds().stage[0], static_cast<int32_t>(Stage::fossilized));
  EXPECT_TRUE(layer.registry().allocated(row));
  for (int32_t t = 0; t < kNumStages; ++t) {
    EXPECT_THROW(layer.transition(0, static_cast<Stage>(t)), Error) << t;
  }
  EXPECT_THROW(layer.set_strategy(0, StrategyParams{}), Error);
}

TEST(Lifecycle, StepRejectsWrongSpans) {
  std::mt19937 rng(29);
  Layer layer(small_config());
  drive_to(layer, 0, Stage::grafting);
  const std::vector<uint8_t> before = layer.save();
  const auto ok = random_values(rng, 3, 0.2f, 0.9f);
  const auto short_span = random_values(rng, 2, 0.2f, 0.9f);
  const auto long_span = random_values(rng, 4, 0.2f, 0.9f);
  try {
    layer.step(short_span, ok, ok);
    ADD_FAILURE() << "short loss accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("loss must have num_seeds = 3 entries, got 2"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(layer.step(ok, long_span, ok), Error);
  EXPECT_THROW(layer.step(ok, ok, short_span), Error);
  EXPECT_THROW(layer.set_alpha(long_span), Error);
  EXPECT_EQ(layer.save(), before);
}

TEST(Lifecycle, ParamsPointAtTheLayer) {
  LayerConfig c = small_config(12, 3, 5);
  c.clamp = {true, -2.0f, 3.0f};
  c.clip_enabled = true;
  c.clip_norm = 0.75f;
  c.dead_threshold = 1e-4f;
  Layer layer(c);
  drive_to(layer, 1, Stage::grafting);
  const ForwardParams f = layer.forward_params();
  EXPECT_EQ(f.x, nullptr);
  EXPECT_EQ(f.y, nullptr);
  EXPECT_EQ(f.telemetry, nullptr);
  EXPECT_EQ(f.rows, 0);
  EXPECT_EQ(f.hidden, 12);
  EXPECT_EQ(f.num_seeds, 3);
  EXPECT_EQ(f.seeds.stage, layer.seeds().stage.data());
  EXPECT_EQ(f.seeds.kind, layer.seeds().kind.data());
  EXPECT_EQ(f.seeds.blueprint, layer.seeds().blueprint.data());
  EXPECT_EQ(f.seeds.alpha, layer.seeds().alpha.data());
  EXPECT_EQ(f.registry.weights, layer.registry().weights.data());
  EXPECT_EQ(f.registry.scales, layer.registry().scales.data());
  EXPECT_EQ(f.registry.num_blueprints, 5);
  EXPECT_TRUE(f.clamp.enabled);
  EXPECT_EQ(f.clamp.lo, -2.0f);
  EXPECT_EQ(f.clamp.hi, 3.0f);
  EXPECT_EQ(f.dead_threshold, 1e-4f);
  const BackwardParams b = layer.backward_params();
  EXPECT_EQ(b.x, nullptr);
  EXPECT_EQ(b.dy, nullptr);
  EXPECT_EQ(b.dx, nullptr);
  EXPECT_EQ(b.dweights, nullptr);
  EXPECT_EQ(b.rows, 0);
  EXPECT_EQ(b.hidden, 12);
  EXPECT_EQ(b.seeds.alpha, layer.seeds().alpha.data());
  EXPECT_EQ(b.registry.weights, layer.registry().weights.data());
  EXPECT_TRUE(b.clip_enabled);
  EXPECT_EQ(b.clip_norm, 0.75f);
  EXPECT_EQ(b.clamp.hi, 3.0f);
}

TEST(Lifecycle, DescribeListsEverySeed) {
  Layer layer(small_config());
  drive_to(layer, 1, Stage::grafting);
  const std::string text = layer.describe();
  EXPECT_NE(text.find("GRAFTING"), std::string::npos) << text;
  EXPECT_NE(text.find("MLP"), std::string::npos) << text;
  EXPECT_NE(text.find("DORMANT"), std::string::npos) << text;
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 4) << text;
}

}  // namespace
}  // namespace kasmina
