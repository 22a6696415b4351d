// The lifecycle state machine and the controller step (SPEC section 7,
// DESIGN decisions 7-11, 18-22). Every mutating method verifies the seed
// checksums, validates all of its arguments, and only then writes, so an
// Error leaves the layer exactly as it was.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <iomanip>
#include <limits>
#include <sstream>
#include <string>

#include "kasmina/error.hpp"
#include "kasmina/layer.hpp"
#include "registry.hpp"

namespace kasmina {
namespace {

constexpr int32_t as_int(Stage s) { return static_cast<int32_t>(s); }
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

bool is_stage(int32_t value) { return value >= 0 && value < kNumStages; }

bool is_ended(Stage s) {
  return s == Stage::culled || s == Stage::cancelled || s == Stage::rolled_back;
}

std::string join_stages(const std::vector<Stage>& stages) {
  if (stages.empty()) return "none";
  std::string out;
  for (std::size_t i = 0; i < stages.size(); ++i) {
    if (i > 0) out += ", ";
    out += stage_name(stages[i]);
  }
  return out;
}

// Why a stage has no requested exits, so that the error tells the user what
// to do instead.
std::string no_exit_reason(Stage from, int32_t embargo_steps) {
  if (from == Stage::dormant) return " (DORMANT -> GERMINATED goes through germinate())";
  if (from == Stage::fossilized) return " (FOSSILIZED is terminal)";
  if (is_ended(from)) {
    return " (the seed returns to DORMANT by itself after embargo_steps = " +
           std::to_string(embargo_steps) + " steps)";
  }
  return "";
}

void check_span(std::size_t size, int32_t expected, const char* name) {
  KASMINA_CHECK_VALUE(size == static_cast<std::size_t>(expected), name, " must have num_seeds = ",
                      expected, " entries, got ", size);
}

// The largest float32 rounding error that the additions of one ramp can
// accumulate (at most 2 * ramp_steps additions of at most 2^-25 each). An
// alpha this close to 1 has reached 1 (DESIGN decision 18).
double ramp_rounding_slack(int32_t ramp_steps) { return std::ldexp(double(ramp_steps), -24); }

}  // namespace

Layer::Layer(const LayerConfig& config) : config_(config) {
  config_.validate();
  const auto n = static_cast<std::size_t>(config_.num_seeds);
  const StrategyParams defaults;
  seeds_.stage.assign(n, as_int(Stage::dormant));
  seeds_.kind.assign(n, static_cast<int32_t>(Kind::residual));
  seeds_.blueprint.assign(n, 0);
  seeds_.alpha.assign(n, 0.0f);
  seeds_.steps_in_stage.assign(n, 0);
  seeds_.strategy.assign(n, static_cast<int32_t>(defaults.strategy));
  seeds_.ramp_steps.assign(n, defaults.ramp_steps);
  seeds_.drift_threshold.assign(n, defaults.drift_threshold);
  seeds_.grad_norm_lower.assign(n, defaults.grad_norm_lower);
  seeds_.grad_norm_upper.assign(n, defaults.grad_norm_upper);
  seeds_.drift_window.assign(n * kDriftWindow, 0.0f);
  seeds_.drift_count.assign(n, 0);
  seeds_.loss_baseline.assign(n, kNaN);
  seeds_.checksum.assign(n, 0u);

  const auto rows = static_cast<std::size_t>(config_.max_blueprints);
  registry_.num_blueprints = config_.max_blueprints;
  registry_.chunk = config_.chunk();
  registry_.weights.assign(rows * static_cast<std::size_t>(registry_.chunk), 0.0f);
  registry_.scales.assign(rows, 0.0f);
  registry_.row_kind.assign(rows, -1);

  for (int32_t s = 0; s < config_.num_seeds; ++s) reseal(s);
}

void Layer::check_seed(int32_t seed) const {
  KASMINA_CHECK_VALUE(seed >= 0 && seed < config_.num_seeds, "seed index must be in [0, ",
                      config_.num_seeds, ") (seed = ", seed, ")");
}

std::vector<Stage> Layer::allowed_targets(Stage from) {
  switch (from) {
    case Stage::germinated: return {Stage::training, Stage::cancelled};
    case Stage::training:
      return {Stage::grafting, Stage::culled, Stage::cancelled, Stage::rolled_back};
    case Stage::grafting: return {Stage::stabilization, Stage::rolled_back, Stage::culled};
    case Stage::stabilization: return {Stage::evaluating, Stage::rolled_back};
    case Stage::evaluating:
      return {Stage::fine_tuning, Stage::fossilized, Stage::culled, Stage::rolled_back};
    case Stage::fine_tuning: return {Stage::fossilized, Stage::culled, Stage::rolled_back};
    case Stage::dormant:
    case Stage::fossilized:
    case Stage::culled:
    case Stage::cancelled:
    case Stage::rolled_back: return {};
  }
  return {};
}

void Layer::enter_stage(int32_t seed, Stage to) {
  const auto s = static_cast<std::size_t>(seed);
  seeds_.stage[s] = as_int(to);
  seeds_.steps_in_stage[s] = 0;
  if (to == Stage::grafting) {
    seeds_.alpha[s] = 0.0f;
    seeds_.loss_baseline[s] = kNaN;
  } else if (to == Stage::dormant) {
    seeds_.blueprint[s] = 0;
    seeds_.alpha[s] = 0.0f;
    seeds_.loss_baseline[s] = kNaN;
  }
}

int32_t Layer::germinate(int32_t seed, Kind kind, int32_t blueprint,
                         const StrategyParams& strategy) {
  verify();
  check_seed(seed);
  const auto s = static_cast<std::size_t>(seed);
  const auto k = static_cast<int32_t>(kind);
  KASMINA_CHECK_VALUE(k >= 0 && k < kNumKinds, "seed ", seed, ": kind must be in [0, ", kNumKinds,
                      ") (kind = ", k, ")");
  strategy.validate();
  const auto from = static_cast<Stage>(seeds_.stage[s]);
  KASMINA_CHECK_VALUE(from == Stage::dormant, "seed ", seed, ": cannot germinate from ",
                      stage_name(from), "; germinate needs a DORMANT seed");
  KASMINA_CHECK_VALUE(kind != Kind::conv || config_.chunk() >= 3, "seed ", seed,
                      ": a CONV seed needs a chunk of at least 3 columns (chunk = hidden / "
                      "num_seeds = ",
                      config_.chunk(), ")");
  KASMINA_CHECK_VALUE(blueprint >= 0 && blueprint < registry_.num_blueprints, "seed ", seed,
                      ": blueprint id must be in [0, ", registry_.num_blueprints,
                      ") (blueprint = ", blueprint, ")");
  int32_t row = blueprint;
  if (blueprint == 0) {
    row = detail::lowest_free_row(registry_);
    KASMINA_CHECK_VALUE(row > 0, "seed ", seed, ": the blueprint registry is full (all ",
                        registry_.num_blueprints - 1, " rows in use; max_blueprints = ",
                        registry_.num_blueprints, ")");
  } else {
    KASMINA_CHECK_VALUE(registry_.allocated(blueprint), "seed ", seed, ": blueprint ", blueprint,
                        " is not allocated; share an allocated row or pass 0 for a fresh one");
    const auto row_kind = static_cast<Kind>(registry_.row_kind[static_cast<std::size_t>(blueprint)]);
    KASMINA_CHECK_VALUE(row_kind == kind, "seed ", seed, ": blueprint ", blueprint,
                        " was created for kind ", kind_name(row_kind), ", cannot share it as ",
                        kind_name(kind));
  }

  if (blueprint == 0) detail::allocate_row(registry_, row, kind);
  enter_stage(seed, Stage::germinated);
  seeds_.kind[s] = k;
  seeds_.blueprint[s] = row;
  seeds_.alpha[s] = 0.0f;
  seeds_.loss_baseline[s] = kNaN;
  store_strategy(seed, strategy);
  reseal(seed);
  return row;
}

void Layer::transition(int32_t seed, Stage to) {
  verify();
  check_seed(seed);
  const auto target = static_cast<int32_t>(to);
  KASMINA_CHECK_VALUE(is_stage(target), "seed ", seed, ": target stage must be in [0, ",
                      kNumStages, ") (stage = ", target, ")");
  const auto from = static_cast<Stage>(seeds_.stage[static_cast<std::size_t>(seed)]);
  const std::vector<Stage> allowed = allowed_targets(from);
  KASMINA_CHECK_VALUE(std::find(allowed.begin(), allowed.end(), to) != allowed.end(), "seed ",
                      seed, ": cannot go from ", stage_name(from), " to ", stage_name(to),
                      "; allowed from ", stage_name(from), ": ", join_stages(allowed),
                      no_exit_reason(from, config_.embargo_steps));
  enter_stage(seed, to);
  reseal(seed);
}

void Layer::set_strategy(int32_t seed, const StrategyParams& strategy) {
  verify();
  check_seed(seed);
  strategy.validate();
  const auto s = static_cast<std::size_t>(seed);
  const auto stage = static_cast<Stage>(seeds_.stage[s]);
  KASMINA_CHECK_VALUE(stage == Stage::dormant || stage == Stage::germinated ||
                          stage == Stage::training,
                      "seed ", seed,
                      ": the strategy can be set in DORMANT, GERMINATED or TRAINING only (stage = ",
                      stage_name(stage), ")");
  store_strategy(seed, strategy);
  reseal(seed);
}

void Layer::store_strategy(int32_t seed, const StrategyParams& strategy) {
  const auto s = static_cast<std::size_t>(seed);
  seeds_.strategy[s] = static_cast<int32_t>(strategy.strategy);
  seeds_.ramp_steps[s] = strategy.ramp_steps;
  seeds_.drift_threshold[s] = strategy.drift_threshold;
  seeds_.grad_norm_lower[s] = strategy.grad_norm_lower;
  seeds_.grad_norm_upper[s] = strategy.grad_norm_upper;
}

void Layer::step(std::span<const float> loss, std::span<const float> grad_norm,
                 std::span<const float> drift) {
  verify();
  const int32_t n = config_.num_seeds;
  check_span(loss.size(), n, "loss");
  check_span(grad_norm.size(), n, "grad_norm");
  check_span(drift.size(), n, "drift");

  for (int32_t seed = 0; seed < n; ++seed) {
    const auto s = static_cast<std::size_t>(seed);
    int32_t& steps = seeds_.steps_in_stage[s];
    if (steps < std::numeric_limits<int32_t>::max()) ++steps;

    // The window keeps its readings oldest first; a full window drops its
    // oldest reading (DESIGN decision 19).
    float* window = seeds_.drift_window.data() + s * kDriftWindow;
    int32_t& count = seeds_.drift_count[s];
    if (count < kDriftWindow) {
      window[count++] = drift[s];
    } else {
      std::copy(window + 1, window + kDriftWindow, window);
      window[kDriftWindow - 1] = drift[s];
    }
  }

  for (int32_t seed = 0; seed < n; ++seed) {
    const auto s = static_cast<std::size_t>(seed);
    if (seeds_.stage[s] != as_int(Stage::grafting)) continue;
    const double delta = 1.0 / seeds_.ramp_steps[s];
    // NaN = hold; every comparison below is false for NaN inputs.
    double increment = 0.0;
    switch (static_cast<Strategy>(seeds_.strategy[s])) {
      case Strategy::fixed_ramp: increment = delta; break;
      case Strategy::performance_linked: {
        const float current = loss[s];
        if (!std::isfinite(current)) break;
        if (std::isnan(seeds_.loss_baseline[s])) {
          seeds_.loss_baseline[s] = current;
          break;
        }
        const double baseline = seeds_.loss_baseline[s];
        const double r = baseline > 0.0 ? std::max(0.0, baseline - current) / baseline : 0.0;
        increment = delta * std::clamp(2.0 * r, 0.5, 3.0);
        break;
      }
      case Strategy::drift_controlled: {
        const float* window = seeds_.drift_window.data() + s * kDriftWindow;
        double sum = 0.0;
        for (int32_t k = 0; k < seeds_.drift_count[s]; ++k) sum += window[k];
        const double d = sum / seeds_.drift_count[s];
        const double threshold = seeds_.drift_threshold[s];
        if (d < threshold / 2.0) {
          increment = 2.0 * delta;
        } else if (d < threshold) {
          increment = delta;
        }
        break;
      }
      case Strategy::grad_norm_gated: {
        const float g = grad_norm[s];
        if (seeds_.grad_norm_lower[s] <= g && g <= seeds_.grad_norm_upper[s]) increment = delta;
        break;
      }
    }
    double alpha = std::clamp(double(seeds_.alpha[s]) + increment, 0.0, 1.0);
    if (1.0 - alpha <= ramp_rounding_slack(seeds_.ramp_steps[s])) alpha = 1.0;
    seeds_.alpha[s] = static_cast<float>(alpha);
  }

  // At most one automatic transition per seed and step, judged on the stage
  // the seed has after the alpha update.
  bool freed_slot = false;
  for (int32_t seed = 0; seed < n; ++seed) {
    const auto s = static_cast<std::size_t>(seed);
    const auto stage = static_cast<Stage>(seeds_.stage[s]);
    const int32_t steps = seeds_.steps_in_stage[s];
    if (stage == Stage::grafting && seeds_.alpha[s] >= 1.0f) {
      enter_stage(seed, Stage::stabilization);
    } else if (stage == Stage::stabilization && steps >= config_.stabilization_steps) {
      enter_stage(seed, Stage::evaluating);
    } else if (is_ended(stage) && steps >= config_.embargo_steps) {
      enter_stage(seed, Stage::dormant);
      freed_slot = true;
    }
  }
  if (freed_slot) release_unused_rows();
  for (int32_t seed = 0; seed < n; ++seed) reseal(seed);
}

void Layer::set_alpha(std::span<const float> alpha) {
  verify();
  check_span(alpha.size(), config_.num_seeds, "alpha");
  std::copy(alpha.begin(), alpha.end(), seeds_.alpha.begin());
  for (int32_t seed = 0; seed < config_.num_seeds; ++seed) reseal(seed);
}

void Layer::set_registry_values(std::span<const float> weights, std::span<const float> scales) {
  verify();
  KASMINA_CHECK_VALUE(weights.size() == registry_.weights.size(),
                      "registry weights must have max_blueprints * chunk = ",
                      registry_.num_blueprints, " * ", registry_.chunk, " = ",
                      registry_.weights.size(), " entries, got ", weights.size());
  KASMINA_CHECK_VALUE(scales.size() == registry_.scales.size(),
                      "registry scales must have max_blueprints = ", registry_.num_blueprints,
                      " entries, got ", scales.size());
  std::copy(weights.begin(), weights.end(), registry_.weights.begin());
  std::copy(scales.begin(), scales.end(), registry_.scales.begin());
}

ForwardParams Layer::forward_params() const {
  ForwardParams p;
  p.hidden = config_.hidden;
  p.num_seeds = config_.num_seeds;
  p.seeds = {seeds_.stage.data(), seeds_.kind.data(), seeds_.blueprint.data(),
             seeds_.alpha.data()};
  p.registry = {registry_.weights.data(), registry_.scales.data(), registry_.num_blueprints};
  p.clamp = config_.clamp;
  p.dead_threshold = config_.dead_threshold;
  return p;
}

BackwardParams Layer::backward_params() const {
  BackwardParams p;
  p.hidden = config_.hidden;
  p.num_seeds = config_.num_seeds;
  p.seeds = {seeds_.stage.data(), seeds_.kind.data(), seeds_.blueprint.data(),
             seeds_.alpha.data()};
  p.registry = {registry_.weights.data(), registry_.scales.data(), registry_.num_blueprints};
  p.clamp = config_.clamp;
  p.clip_enabled = config_.clip_enabled;
  p.clip_norm = config_.clip_norm;
  return p;
}

std::string Layer::describe() const {
  std::ostringstream os;
  os << "seed  stage          kind       blueprint  alpha      steps  strategy\n";
  for (int32_t seed = 0; seed < config_.num_seeds; ++seed) {
    const auto s = static_cast<std::size_t>(seed);
    const auto stage = static_cast<Stage>(seeds_.stage[s]);
    // A DORMANT slot has no kind worth showing: it is decided at germinate.
    const std::string_view kind =
        stage == Stage::dormant ? "-" : kind_name(static_cast<Kind>(seeds_.kind[s]));
    os << std::left << std::setw(6) << seed << std::setw(15) << stage_name(stage)
       << std::setw(11) << kind << std::setw(11) << seeds_.blueprint[s] << std::setw(11)
       << std::fixed << std::setprecision(6) << seeds_.alpha[s] << std::setw(7)
       << seeds_.steps_in_stage[s] << strategy_name(static_cast<Strategy>(seeds_.strategy[s]))
       << '\n';
  }
  return os.str();
}

}  // namespace kasmina
