// The host-side state of one Kasmina layer (SPEC.md sections 6-8): its
// configuration, the per-seed state as a structure of arrays, the blueprint
// registry, the lifecycle state machine and the controller step, integrity
// checksums and the versioned state format (docs/STATE_FORMAT.md).
//
// Every mutating method validates first and either succeeds completely or
// throws kasmina::Error leaving the layer exactly as it was.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kasmina/ops.hpp"
#include "kasmina/params.hpp"
#include "kasmina/types.hpp"

namespace kasmina {

struct LayerConfig {
  int64_t hidden = 0;
  int32_t num_seeds = 0;
  int32_t max_blueprints = 64;  // B, including the reserved row 0
  float dead_threshold = 1e-6f;
  OutputClamp clamp;            // off by default
  bool clip_enabled = false;    // per-row gradient clip, off by default
  float clip_norm = 0.0f;
  int32_t stabilization_steps = 5;
  int32_t embargo_steps = 5;

  int64_t chunk() const { return num_seeds > 0 ? hidden / num_seeds : 0; }
  // Throws kasmina::Error (ValueError) naming the offending field.
  void validate() const;
};

// Largest ramp_steps: alpha is a float32, and beyond this the rounding of the
// ramp's additions is no longer small against delta = 1/ramp_steps (DESIGN
// decision 18).
inline constexpr int32_t kMaxRampSteps = 1024;

// Per-seed grafting strategy and its parameters (SPEC section 7).
struct StrategyParams {
  Strategy strategy = Strategy::fixed_ramp;
  int32_t ramp_steps = 30;
  float drift_threshold = 0.12f;
  float grad_norm_lower = 0.1f;
  float grad_norm_upper = 1.0f;
  void validate() const;
};

inline constexpr int32_t kDriftWindow = 5;

// Structure of arrays, one entry per seed. The int32/float arrays are laid out
// so that the kernels' SeedTable can point straight at them.
struct SeedState {
  std::vector<int32_t> stage;
  std::vector<int32_t> kind;
  std::vector<int32_t> blueprint;
  std::vector<float> alpha;
  std::vector<int32_t> steps_in_stage;
  std::vector<int32_t> strategy;
  std::vector<int32_t> ramp_steps;
  std::vector<float> drift_threshold;
  std::vector<float> grad_norm_lower;
  std::vector<float> grad_norm_upper;
  std::vector<float> drift_window;        // [num_seeds, kDriftWindow], ring buffer
  std::vector<int32_t> drift_count;       // readings recorded, saturates at kDriftWindow
  std::vector<float> loss_baseline;       // PERFORMANCE_LINKED L0; NaN = not yet recorded
  std::vector<uint32_t> checksum;         // integrity checksum over the entry (SPEC section 8)

  int32_t size() const { return static_cast<int32_t>(stage.size()); }
};

// Blueprint registry: W [B, C], scale [B] and which rows are allocated.
struct Registry {
  int32_t num_blueprints = 0;
  int64_t chunk = 0;
  std::vector<float> weights;    // [B, C]
  std::vector<float> scales;     // [B]
  std::vector<int32_t> row_kind;  // kind a row was created for; -1 = free (row 0 too)

  bool allocated(int32_t row) const {
    return row > 0 && row < num_blueprints && row_kind[static_cast<size_t>(row)] >= 0;
  }
};

// Initial blueprint weights of SPEC section 6 (C values) and scale.
std::vector<float> initial_blueprint_weights(Kind kind, int64_t chunk);
inline constexpr float kInitialScale = 1.0f;

class Layer {
 public:
  explicit Layer(const LayerConfig& config);

  const LayerConfig& config() const { return config_; }
  const SeedState& seeds() const { return seeds_; }
  const Registry& registry() const { return registry_; }

  // --- Lifecycle (SPEC section 7) ---------------------------------------
  // DORMANT -> GERMINATED. blueprint = 0 allocates a fresh registry row
  // initialised as in SPEC section 6; a non-zero blueprint shares an
  // allocated row of the same kind. Returns the seed's registry row.
  int32_t germinate(int32_t seed, Kind kind, int32_t blueprint = 0,
                    const StrategyParams& strategy = StrategyParams{});
  // Requested transition; throws (naming both stages and the allowed targets)
  // when the table of SPEC section 7 does not allow it.
  void transition(int32_t seed, Stage to);
  // Allowed in DORMANT, GERMINATED and TRAINING (before GRAFTING).
  void set_strategy(int32_t seed, const StrategyParams& strategy);
  // Controller step: loss, grad_norm and drift have num_seeds entries each
  // (NaN = not measured). drift is telemetry column 7 of the latest forward.
  void step(std::span<const float> loss, std::span<const float> grad_norm,
            std::span<const float> drift);
  // Alpha is also a trainable parameter: the front end writes back what the
  // optimiser did to it. Values are stored as given (kernels clamp them).
  void set_alpha(std::span<const float> alpha);
  // The registry weights/scales are trainable too; the front end keeps them in
  // sync before saving.
  void set_registry_values(std::span<const float> weights, std::span<const float> scales);

  // Targets the table allows from a stage by request (for messages and UIs).
  static std::vector<Stage> allowed_targets(Stage from);

  // --- Integrity and state I/O (SPEC sections 7, 8) ----------------------
  uint32_t compute_checksum(int32_t seed) const;
  // Throws kasmina::Error (RuntimeError) if any seed's checksum does not match.
  void verify() const;
  std::vector<uint8_t> save() const;
  // Refuses (Error, layer unchanged) a wrong magic, version, size, shape,
  // checksum or configuration that does not match this layer's hidden and
  // num_seeds.
  void load(std::span<const uint8_t> bytes);

  // --- Running the layer on host memory ---------------------------------
  // Fill params from this layer's host state (seed table, registry, config).
  // The caller sets x/y (dx/dy) pointers, rows and dtype.
  ForwardParams forward_params() const;
  BackwardParams backward_params() const;

  // Text table of the seeds (stage, kind, blueprint, alpha, steps).
  std::string describe() const;

 private:
  void check_seed(int32_t seed) const;
  void enter_stage(int32_t seed, Stage to);
  void release_unused_rows();
  void reseal(int32_t seed);
  void store_strategy(int32_t seed, const StrategyParams& strategy);

  LayerConfig config_;
  SeedState seeds_;
  Registry registry_;
};

}  // namespace kasmina
