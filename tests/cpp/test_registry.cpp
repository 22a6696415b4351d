// The blueprint registry of SPEC section 6 and DESIGN decision 8: allocation
// order, sharing, release, exhaustion and the initial weights per kind.
#include <gtest/gtest.h>

#include <cstddef>
#include <random>
#include <string>
#include <vector>

#include "kasmina/kasmina.hpp"

namespace kasmina {
namespace {

LayerConfig config(int64_t hidden, int32_t seeds, int32_t blueprints) {
  LayerConfig c;
  c.hidden = hidden;
  c.num_seeds = seeds;
  c.max_blueprints = blueprints;
  c.embargo_steps = 2;
  return c;
}

std::vector<float> row_weights(const Layer& layer, int32_t row) {
  const auto c = static_cast<std::size_t>(layer.registry().chunk);
  const auto begin = layer.registry().weights.begin() + static_cast<std::ptrdiff_t>(row * c);
  return {begin, begin + static_cast<std::ptrdiff_t>(c)};
}

// Random values everywhere, so that what allocation writes is visible.
void scramble_registry(Layer& layer, std::mt19937& rng) {
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> w(layer.registry().weights.size());
  std::vector<float> s(layer.registry().scales.size());
  for (auto& v : w) v = n(rng);
  for (auto& v : s) v = 1.0f + n(rng);
  layer.set_registry_values(w, s);
}

void idle_steps(Layer& layer, int32_t count) {
  std::mt19937 rng(99);
  std::uniform_real_distribution<float> u(0.1f, 0.9f);
  const auto n = static_cast<std::size_t>(layer.config().num_seeds);
  for (int32_t k = 0; k < count; ++k) {
    std::vector<float> loss(n), grad(n), drift(n);
    for (std::size_t i = 0; i < n; ++i) {
      loss[i] = u(rng);
      grad[i] = u(rng);
      drift[i] = u(rng) * 0.01f;
    }
    layer.step(loss, grad, drift);
  }
}

TEST(Registry, InitialWeightsPerKind) {
  const int64_t c = 5;
  EXPECT_EQ(initial_blueprint_weights(Kind::residual, c), std::vector<float>(5, 0.0f));
  EXPECT_EQ(initial_blueprint_weights(Kind::attention, c), std::vector<float>(5, 0.0f));
  EXPECT_EQ(initial_blueprint_weights(Kind::mlp, c), std::vector<float>(5, 1.0f));
  EXPECT_EQ(initial_blueprint_weights(Kind::conv, c),
            (std::vector<float>{1.0f, 0.0f, 0.0f, 0.0f, 0.0f}));
  EXPECT_THROW(initial_blueprint_weights(Kind::mlp, 0), Error);
  EXPECT_THROW(initial_blueprint_weights(static_cast<Kind>(7), 5), Error);
}

TEST(Registry, AllocationWritesInitialRowInLowestFreeOrder) {
  std::mt19937 rng(1);
  Layer layer(config(20, 4, 8));
  scramble_registry(layer, rng);
  const Kind kinds[] = {Kind::conv, Kind::mlp, Kind::attention, Kind::residual};
  for (int32_t s = 0; s < 4; ++s) {
    EXPECT_EQ(layer.germinate(s, kinds[s]), s + 1);
    EXPECT_TRUE(layer.registry().allocated(s + 1));
    EXPECT_EQ(layer.registry().row_kind[static_cast<std::size_t>(s + 1)],
              static_cast<int32_t>(kinds[s]));
    EXPECT_EQ(row_weights(layer, s + 1), initial_blueprint_weights(kinds[s], 5));
    EXPECT_EQ(layer.registry().scales[static_cast<std::size_t>(s + 1)], kInitialScale);
  }
  EXPECT_FALSE(layer.registry().allocated(0));
  EXPECT_FALSE(layer.registry().allocated(5));
}

TEST(Registry, SharingUsesTheSameRow) {
  std::mt19937 rng(2);
  Layer layer(config(20, 4, 8));
  EXPECT_EQ(layer.germinate(0, Kind::mlp), 1);
  scramble_registry(layer, rng);
  const std::vector<float> trained = row_weights(layer, 1);
  EXPECT_EQ(layer.germinate(2, Kind::mlp, 1), 1);
  // Sharing does not reinitialise the trained row.
  EXPECT_EQ(row_weights(layer, 1), trained);
  EXPECT_EQ(layer.seeds().blueprint[2], 1);
  // The next fresh row is still the lowest free one.
  EXPECT_EQ(layer.germinate(1, Kind::residual), 2);
  EXPECT_THROW(layer.germinate(3, Kind::residual, 1), Error);  // row 1 is MLP
  EXPECT_THROW(layer.germinate(3, Kind::residual, 3), Error);  // row 3 is free
}

TEST(Registry, ReleasedWhenTheLastSeedLeaves) {
  std::mt19937 rng(3);
  Layer layer(config(20, 4, 8));
  layer.germinate(0, Kind::attention);      // row 1
  layer.germinate(1, Kind::attention, 1);   // shares row 1
  layer.germinate(2, Kind::mlp);            // row 2
  scramble_registry(layer, rng);
  layer.transition(0, Stage::cancelled);
  idle_steps(layer, 2);
  EXPECT_EQ(layer.seeds().stage[0], static_cast<int32_t>(Stage::dormant));
  EXPECT_TRUE(layer.registry().allocated(1));  // seed 1 still refers to it
  layer.transition(1, Stage::training);
  layer.transition(1, Stage::rolled_back);
  idle_steps(layer, 2);
  EXPECT_FALSE(layer.registry().allocated(1));
  EXPECT_EQ(row_weights(layer, 1), std::vector<float>(5, 0.0f));
  EXPECT_EQ(layer.registry().scales[1], 0.0f);
  EXPECT_TRUE(layer.registry().allocated(2));
  // A fresh germinate takes the lowest free row again, initialised anew.
  EXPECT_EQ(layer.germinate(3, Kind::conv), 1);
  EXPECT_EQ(row_weights(layer, 1), initial_blueprint_weights(Kind::conv, 5));
  EXPECT_EQ(layer.registry().scales[1], kInitialScale);
}

TEST(Registry, FossilizedSeedsKeepTheirRow) {
  Layer layer(config(20, 4, 8));
  layer.germinate(0, Kind::residual);
  for (Stage s : {Stage::training, Stage::grafting, Stage::stabilization, Stage::evaluating,
                  Stage::fossilized}) {
    layer.transition(0, s);
  }
  layer.germinate(1, Kind::residual, 1);
  layer.transition(1, Stage::cancelled);
  idle_steps(layer, 10);
  EXPECT_EQ(layer.seeds().stage[1], static_cast<int32_t>(Stage::dormant));
  EXPECT_TRUE(layer.registry().allocated(1));
}

TEST(Registry, ExhaustionIsAClearError) {
  Layer layer(config(20, 4, 3));  // rows 1 and 2 only
  EXPECT_EQ(layer.germinate(0, Kind::mlp), 1);
  EXPECT_EQ(layer.germinate(1, Kind::conv), 2);
  const std::vector<uint8_t> before = layer.save();
  try {
    layer.germinate(2, Kind::mlp);
    ADD_FAILURE() << "germinate on a full registry accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("registry is full (all 2 rows in use; max_blueprints = 3)"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(layer.save(), before);
  EXPECT_EQ(layer.seeds().stage[2], static_cast<int32_t>(Stage::dormant));
  // Sharing still works on a full registry.
  EXPECT_EQ(layer.germinate(2, Kind::mlp, 1), 1);
}

TEST(Registry, SetRegistryValuesChecksSizes) {
  std::mt19937 rng(4);
  Layer layer(config(20, 4, 8));
  layer.germinate(0, Kind::mlp);
  scramble_registry(layer, rng);
  const std::vector<uint8_t> before = layer.save();
  std::vector<float> w(layer.registry().weights.size() - 1, 0.5f);
  std::vector<float> s(layer.registry().scales.size(), 0.5f);
  try {
    layer.set_registry_values(w, s);
    ADD_FAILURE() << "short weights accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("8 * 5 = 40 entries, got 39"), std::string::npos)
        << e.what();
  }
  w.resize(40, 0.5f);
  s.resize(9, 0.5f);
  EXPECT_THROW(layer.set_registry_values(w, s), Error);
  EXPECT_EQ(layer.save(), before);
}

}  // namespace
}  // namespace kasmina
