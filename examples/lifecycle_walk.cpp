// Walks one seed of a Kasmina layer through its whole life, DORMANT to
// FOSSILIZED, running the fast CPU forward on random activations at every
// controller step and feeding its drift telemetry back into the step.
//
//   ./lifecycle_walk
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "kasmina/kasmina.hpp"

namespace {

constexpr float kNotMeasured = std::numeric_limits<float>::quiet_NaN();

void print_telemetry(const std::vector<float>& telemetry, int32_t num_seeds) {
  std::printf("  seed  variance   mean       min        max        dead   snr     nonfin  drift\n");
  for (int32_t s = 0; s < num_seeds; ++s) {
    const float* t = telemetry.data() + s * kasmina::kTelemetryWidth;
    std::printf("  %-5d %-10.4f %-10.4f %-10.4f %-10.4f %-6.3f %-7.3f %-7.0f %.6f\n", s,
                t[kasmina::kTelVariance], t[kasmina::kTelMean], t[kasmina::kTelMin],
                t[kasmina::kTelMax], t[kasmina::kTelDeadRatio], t[kasmina::kTelSignalToNoise],
                t[kasmina::kTelNonfinite], t[kasmina::kTelDrift]);
  }
}

}  // namespace

int main() {
  using kasmina::Stage;
  try {
    kasmina::LayerConfig config;
    config.hidden = 64;
    config.num_seeds = 4;
    config.stabilization_steps = 2;
    kasmina::Layer layer(config);

    // A short ramp so the walk fits on a screen: alpha 0.25, 0.5, 0.75, 1.
    kasmina::StrategyParams ramp;
    ramp.ramp_steps = 4;
    const int32_t walker = 1;
    layer.germinate(walker, kasmina::Kind::mlp, 0, ramp);
    layer.transition(walker, Stage::training);

    const int64_t rows = 8;
    std::mt19937 rng(2024);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(static_cast<std::size_t>(rows * config.hidden));
    std::vector<float> y(x.size());
    std::vector<float> telemetry(
        static_cast<std::size_t>(config.num_seeds * kasmina::kTelemetryWidth));

    // The MLP blueprint starts as the identity gate; nudge it so that
    // grafting visibly moves the signal.
    std::vector<float> weights(layer.registry().weights);
    const int32_t row = layer.seeds().blueprint[walker];
    for (int64_t j = 0; j < layer.registry().chunk; ++j) {
      const auto at = static_cast<std::size_t>(row * layer.registry().chunk + j);
      weights[at] = 0.5f + normal(rng) * 0.1f;
    }
    layer.set_registry_values(weights, layer.registry().scales);

    for (int step = 1; layer.seeds().stage[walker] != static_cast<int32_t>(Stage::fossilized);
         ++step) {
      for (float& v : x) v = normal(rng);
      kasmina::ForwardParams params = layer.forward_params();
      params.x = x.data();
      params.y = y.data();
      params.rows = rows;
      params.dtype = kasmina::DType::f32;
      params.telemetry = telemetry.data();
      kasmina::forward(params, kasmina::Backend::cpu);

      std::vector<float> drift(static_cast<std::size_t>(config.num_seeds));
      for (int32_t s = 0; s < config.num_seeds; ++s) {
        const auto at = static_cast<std::size_t>(s * kasmina::kTelemetryWidth + kasmina::kTelDrift);
        drift[static_cast<std::size_t>(s)] = telemetry[at];
      }
      const std::vector<float> loss(drift.size(), kNotMeasured);
      const std::vector<float> grad_norm(drift.size(), kNotMeasured);
      layer.step(loss, grad_norm, drift);

      // The controller's decisions: graft after two steps of shadow
      // training, fine-tune once evaluated, then fossilize.
      const auto stage = static_cast<Stage>(layer.seeds().stage[walker]);
      const int32_t steps = layer.seeds().steps_in_stage[walker];
      if (stage == Stage::training && steps >= 2) layer.transition(walker, Stage::grafting);
      if (stage == Stage::evaluating && steps >= 1) layer.transition(walker, Stage::fine_tuning);
      if (stage == Stage::fine_tuning && steps >= 1) layer.transition(walker, Stage::fossilized);

      std::printf("after step %d\n%s", step, layer.describe().c_str());
      std::printf("  telemetry of this step's forward:\n");
      print_telemetry(telemetry, config.num_seeds);
      std::printf("\n");
    }
    layer.verify();
    std::printf("seed %d fossilized; state is %zu bytes\n", walker, layer.save().size());
  } catch (const kasmina::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
