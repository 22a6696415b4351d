// Validation of the layer configuration and of the per-seed strategy
// parameters (SPEC sections 7, 8). Comparisons are written so that NaN fails
// them.
#include "kasmina/error.hpp"
#include "kasmina/layer.hpp"

namespace kasmina {

void LayerConfig::validate() const {
  KASMINA_CHECK_VALUE(hidden > 0, "hidden must be > 0 (hidden = ", hidden, ")");
  KASMINA_CHECK_VALUE(num_seeds > 0, "num_seeds must be > 0 (num_seeds = ", num_seeds, ")");
  KASMINA_CHECK_VALUE(hidden % num_seeds == 0, "hidden must be divisible by num_seeds (hidden = ",
                      hidden, ", num_seeds = ", num_seeds, ")");
  KASMINA_CHECK_VALUE(max_blueprints >= 2,
                      "max_blueprints must be >= 2 (row 0 is reserved; max_blueprints = ",
                      max_blueprints, ")");
  KASMINA_CHECK_VALUE(dead_threshold >= 0.0f,
                      "dead_threshold must be >= 0 (dead_threshold = ", dead_threshold, ")");
  KASMINA_CHECK_VALUE(!clamp.enabled || clamp.lo <= clamp.hi,
                      "output clamp needs lo <= hi (lo = ", clamp.lo, ", hi = ", clamp.hi, ")");
  KASMINA_CHECK_VALUE(!clip_enabled || clip_norm > 0.0f,
                      "gradient clip needs clip_norm > 0 (clip_norm = ", clip_norm, ")");
  KASMINA_CHECK_VALUE(stabilization_steps >= 0,
                      "stabilization_steps must be >= 0 (stabilization_steps = ",
                      stabilization_steps, ")");
  KASMINA_CHECK_VALUE(embargo_steps >= 0, "embargo_steps must be >= 0 (embargo_steps = ",
                      embargo_steps, ")");
}

void StrategyParams::validate() const {
  const auto value = static_cast<int32_t>(strategy);
  KASMINA_CHECK_VALUE(value >= 0 && value < kNumStrategies, "strategy must be in [0, ",
                      kNumStrategies, ") (strategy = ", value, ")");
  KASMINA_CHECK_VALUE(ramp_steps >= 1 && ramp_steps <= kMaxRampSteps,
                      "ramp_steps must be in [1, ", kMaxRampSteps, "] (ramp_steps = ", ramp_steps,
                      ")");
  KASMINA_CHECK_VALUE(drift_threshold > 0.0f,
                      "drift_threshold must be > 0 (drift_threshold = ", drift_threshold, ")");
  KASMINA_CHECK_VALUE(grad_norm_lower >= 0.0f,
                      "grad_norm_lower must be >= 0 (grad_norm_lower = ", grad_norm_lower, ")");
  KASMINA_CHECK_VALUE(grad_norm_upper >= grad_norm_lower,
                      "grad_norm_upper must be >= grad_norm_lower (grad_norm_lower = ",
                      grad_norm_lower, ", grad_norm_upper = ", grad_norm_upper, ")");
}

}  // namespace kasmina
