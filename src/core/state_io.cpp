// The versioned binary state format (docs/STATE_FORMAT.md): configuration,
// seed arrays, registry and checksums, little-endian, closed by a CRC-32 over
// the whole payload. load() parses and checks everything into a temporary
// layer and commits only when all of it is valid (SPEC section 7, State I/O).
#include <algorithm>
#include <cstddef>
#include <string>
#include <string_view>

#include "checksum.hpp"
#include "kasmina/error.hpp"
#include "kasmina/layer.hpp"
#include "little_endian.hpp"

namespace kasmina {
namespace {

constexpr std::string_view kMagic = "KSMNSTAT";
constexpr uint32_t kFormatVersion = 1;
constexpr std::size_t kHeaderBytes = 8 + 4 + 8;  // magic, version, total size
constexpr std::size_t kConfigBytes = 8 + 4 + 4 + 4 + 1 + 4 + 4 + 1 + 4 + 4 + 4;
constexpr std::size_t kShapeBytes = 4 + 4 + 8;
constexpr std::size_t kSeedBytes = 10 * 4 + kDriftWindow * 4 + 4 + 4 + 4;
constexpr std::size_t kCrcBytes = 4;

std::size_t state_bytes(std::size_t seeds, std::size_t rows, std::size_t chunk) {
  return kHeaderBytes + kConfigBytes + kShapeBytes + seeds * kSeedBytes + rows * chunk * 4 +
         rows * 4 + rows * 4 + kCrcBytes;
}

bool read_flag(detail::ByteReader& r, const char* name) {
  const uint8_t v = r.u8();
  KASMINA_CHECK_VALUE(v <= 1, "state: ", name, " must be 0 or 1, got ", int(v));
  return v == 1;
}

// Strategy validation names the field but not the seed; the state error adds
// which seed it was.
void validate_seed_strategy(int32_t seed, const StrategyParams& params) {
  try {
    params.validate();
  } catch (const Error& e) {
    constexpr std::string_view prefix = "kasmina: ";
    std::string_view what = e.what();
    if (what.starts_with(prefix)) what.remove_prefix(prefix.size());
    KASMINA_FAIL(ErrorKind::value, "state: seed ", seed, ": ", what);
  }
}

template <typename T, typename ReadOne>
void read_array(std::vector<T>& out, std::size_t n, ReadOne read_one) {
  out.resize(n);
  for (auto& v : out) v = read_one();
}

}  // namespace

std::vector<uint8_t> Layer::save() const {
  verify();
  const auto n = static_cast<std::size_t>(config_.num_seeds);
  const auto rows = static_cast<std::size_t>(registry_.num_blueprints);
  const auto chunk = static_cast<std::size_t>(registry_.chunk);
  const std::size_t total = state_bytes(n, rows, chunk);

  detail::ByteWriter w;
  w.reserve(total);
  w.raw(kMagic);
  w.u32(kFormatVersion);
  w.u64(total);

  w.i64(config_.hidden);
  w.i32(config_.num_seeds);
  w.i32(config_.max_blueprints);
  w.f32(config_.dead_threshold);
  w.u8(config_.clamp.enabled ? 1 : 0);
  w.f32(config_.clamp.lo);
  w.f32(config_.clamp.hi);
  w.u8(config_.clip_enabled ? 1 : 0);
  w.f32(config_.clip_norm);
  w.i32(config_.stabilization_steps);
  w.i32(config_.embargo_steps);

  w.i32(config_.num_seeds);
  w.i32(registry_.num_blueprints);
  w.i64(registry_.chunk);

  for (int32_t v : seeds_.stage) w.i32(v);
  for (int32_t v : seeds_.kind) w.i32(v);
  for (int32_t v : seeds_.blueprint) w.i32(v);
  for (float v : seeds_.alpha) w.f32(v);
  for (int32_t v : seeds_.steps_in_stage) w.i32(v);
  for (int32_t v : seeds_.strategy) w.i32(v);
  for (int32_t v : seeds_.ramp_steps) w.i32(v);
  for (float v : seeds_.drift_threshold) w.f32(v);
  for (float v : seeds_.grad_norm_lower) w.f32(v);
  for (float v : seeds_.grad_norm_upper) w.f32(v);
  for (float v : seeds_.drift_window) w.f32(v);
  for (int32_t v : seeds_.drift_count) w.i32(v);
  for (float v : seeds_.loss_baseline) w.f32(v);
  for (uint32_t v : seeds_.checksum) w.u32(v);

  for (float v : registry_.weights) w.f32(v);
  for (float v : registry_.scales) w.f32(v);
  for (int32_t v : registry_.row_kind) w.i32(v);

  w.u32(detail::crc32(w.bytes()));
  return std::move(w.bytes());
}

// The live state is not verified first: load replaces all of it, so it is
// also the way back from a corrupted layer.
void Layer::load(std::span<const uint8_t> bytes) {
  KASMINA_CHECK_VALUE(bytes.size() >= kHeaderBytes + kCrcBytes, "state is truncated: ",
                      bytes.size(), " bytes, the header and the CRC alone need ",
                      kHeaderBytes + kCrcBytes);
  detail::ByteReader r(bytes);
  const std::string_view magic = r.raw(kMagic.size());
  KASMINA_CHECK_VALUE(magic == kMagic, "not a kasmina layer state: the magic is not \"", kMagic,
                      "\"");
  const uint32_t version = r.u32();
  KASMINA_CHECK_VALUE(version == kFormatVersion, "unsupported state format version ", version,
                      " (this build reads version ", kFormatVersion, ")");
  const uint64_t declared = r.u64();
  KASMINA_CHECK_VALUE(declared == bytes.size(), "state size mismatch: the header says ",
                      declared, " bytes, got ", bytes.size(), " (truncated or padded)");
  const std::size_t payload = bytes.size() - kCrcBytes;
  const uint32_t stored_crc = detail::ByteReader(bytes.subspan(payload)).u32();
  const uint32_t actual_crc = detail::crc32(bytes.first(payload));
  KASMINA_CHECK_RUNTIME(stored_crc == actual_crc,
                        "state integrity check failed: the CRC-32 of the payload does not "
                        "match (stored ",
                        stored_crc, ", computed ", actual_crc, "); the state is corrupted");

  LayerConfig cfg;
  cfg.hidden = r.i64();
  cfg.num_seeds = r.i32();
  cfg.max_blueprints = r.i32();
  cfg.dead_threshold = r.f32();
  cfg.clamp.enabled = read_flag(r, "clamp_enabled");
  cfg.clamp.lo = r.f32();
  cfg.clamp.hi = r.f32();
  cfg.clip_enabled = read_flag(r, "clip_enabled");
  cfg.clip_norm = r.f32();
  cfg.stabilization_steps = r.i32();
  cfg.embargo_steps = r.i32();
  const int32_t num_seeds = r.i32();
  const int32_t num_blueprints = r.i32();
  const int64_t chunk = r.i64();

  KASMINA_CHECK_VALUE(cfg.hidden == config_.hidden && cfg.num_seeds == config_.num_seeds,
                      "state shape mismatch: the state is for hidden = ", cfg.hidden,
                      ", num_seeds = ", cfg.num_seeds, "; this layer has hidden = ",
                      config_.hidden, ", num_seeds = ", config_.num_seeds);
  KASMINA_CHECK_VALUE(cfg.max_blueprints == config_.max_blueprints,
                      "state shape mismatch: the state has max_blueprints = ", cfg.max_blueprints,
                      "; this layer has max_blueprints = ", config_.max_blueprints);
  KASMINA_CHECK_VALUE(num_seeds == config_.num_seeds &&
                          num_blueprints == config_.max_blueprints && chunk == config_.chunk(),
                      "state shape mismatch: the state's arrays are S = ", num_seeds, ", B = ",
                      num_blueprints, ", C = ", chunk, "; this layer has S = ", config_.num_seeds,
                      ", B = ", config_.max_blueprints, ", C = ", config_.chunk());
  cfg.validate();

  const auto n = static_cast<std::size_t>(num_seeds);
  const auto rows = static_cast<std::size_t>(num_blueprints);
  const auto c = static_cast<std::size_t>(chunk);
  KASMINA_CHECK_VALUE(declared == state_bytes(n, rows, c), "state size mismatch: S = ", n,
                      ", B = ", rows, ", C = ", c, " need ", state_bytes(n, rows, c),
                      " bytes, the state has ", declared);

  // Everything is parsed into a fresh layer; *this is touched only by the
  // final move, which cannot throw.
  Layer next(cfg);
  SeedState& s = next.seeds_;
  auto i32 = [&r] { return r.i32(); };
  auto f32 = [&r] { return r.f32(); };
  read_array(s.stage, n, i32);
  read_array(s.kind, n, i32);
  read_array(s.blueprint, n, i32);
  read_array(s.alpha, n, f32);
  read_array(s.steps_in_stage, n, i32);
  read_array(s.strategy, n, i32);
  read_array(s.ramp_steps, n, i32);
  read_array(s.drift_threshold, n, f32);
  read_array(s.grad_norm_lower, n, f32);
  read_array(s.grad_norm_upper, n, f32);
  read_array(s.drift_window, n * kDriftWindow, f32);
  read_array(s.drift_count, n, i32);
  read_array(s.loss_baseline, n, f32);
  read_array(s.checksum, n, [&r] { return r.u32(); });
  Registry& reg = next.registry_;
  read_array(reg.weights, rows * c, f32);
  read_array(reg.scales, rows, f32);
  read_array(reg.row_kind, rows, i32);

  KASMINA_CHECK_VALUE(reg.row_kind[0] == -1,
                      "state: registry row 0 is reserved and must be free (row_kind = ",
                      reg.row_kind[0], ")");
  for (std::size_t row = 1; row < rows; ++row) {
    const int32_t k = reg.row_kind[row];
    KASMINA_CHECK_VALUE(k >= -1 && k < kNumKinds, "state: registry row ", row,
                        ": row_kind must be -1 (free) or in [0, ", kNumKinds, "), got ", k);
  }
  std::vector<bool> referenced(rows, false);
  for (int32_t seed = 0; seed < num_seeds; ++seed) {
    const auto i = static_cast<std::size_t>(seed);
    const int32_t stage = s.stage[i], kind = s.kind[i], bp = s.blueprint[i];
    KASMINA_CHECK_VALUE(stage >= 0 && stage < kNumStages, "state: seed ", seed,
                        ": stage must be in [0, ", kNumStages, "), got ", stage);
    KASMINA_CHECK_VALUE(kind >= 0 && kind < kNumKinds, "state: seed ", seed,
                        ": kind must be in [0, ", kNumKinds, "), got ", kind);
    KASMINA_CHECK_VALUE(bp >= 0 && bp < num_blueprints, "state: seed ", seed,
                        ": blueprint must be in [0, ", num_blueprints, "), got ", bp);
    KASMINA_CHECK_VALUE(s.steps_in_stage[i] >= 0, "state: seed ", seed,
                        ": steps_in_stage must be >= 0, got ", s.steps_in_stage[i]);
    KASMINA_CHECK_VALUE(s.drift_count[i] >= 0 && s.drift_count[i] <= kDriftWindow, "state: seed ",
                        seed, ": drift_count must be in [0, ", kDriftWindow, "], got ",
                        s.drift_count[i]);
    StrategyParams params;
    params.strategy = static_cast<Strategy>(s.strategy[i]);
    params.ramp_steps = s.ramp_steps[i];
    params.drift_threshold = s.drift_threshold[i];
    params.grad_norm_lower = s.grad_norm_lower[i];
    params.grad_norm_upper = s.grad_norm_upper[i];
    validate_seed_strategy(seed, params);
    // Only a DORMANT slot is without a blueprint (DESIGN decisions 8, 22).
    const bool dormant = stage == static_cast<int32_t>(Stage::dormant);
    KASMINA_CHECK_VALUE(dormant == (bp == 0), "state: seed ", seed, ": stage ",
                        stage_name(static_cast<Stage>(stage)), " with blueprint ", bp,
                        " (a DORMANT seed has blueprint 0, any other has a registry row)");
    if (!dormant) {
      KASMINA_CHECK_VALUE(reg.row_kind[static_cast<std::size_t>(bp)] == kind, "state: seed ",
                          seed, ": blueprint ", bp, " has row_kind ",
                          reg.row_kind[static_cast<std::size_t>(bp)], ", the seed's kind is ",
                          kind);
      KASMINA_CHECK_VALUE(kind != static_cast<int32_t>(Kind::conv) || chunk >= 3, "state: seed ",
                          seed, ": a CONV seed needs chunk >= 3 (chunk = ", chunk, ")");
      referenced[static_cast<std::size_t>(bp)] = true;
    }
  }
  for (std::size_t row = 1; row < rows; ++row) {
    KASMINA_CHECK_VALUE(reg.row_kind[row] < 0 || referenced[row], "state: registry row ", row,
                        " is allocated but no seed refers to it");
  }
  next.verify();

  *this = std::move(next);
}

}  // namespace kasmina
