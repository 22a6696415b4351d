// The state format of docs/STATE_FORMAT.md: bit-exact round trips, and every
// corruption, truncation, version or shape mismatch refused with the layer
// left as it was (SPEC sections 7 and 8).
#include <gtest/gtest.h>

#include <bit>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kasmina/kasmina.hpp"

namespace kasmina {
namespace {

using Bytes = std::vector<uint8_t>;

// Offsets of docs/STATE_FORMAT.md, written out independently of the library.
constexpr std::size_t kSeedArrays = 20 + 42 + 16;
std::size_t seed_field_offset(int32_t num_seeds, int32_t field_index, int32_t seed) {
  return kSeedArrays + 4 * static_cast<std::size_t>(num_seeds * field_index + seed);
}
constexpr int32_t kFieldStage = 0, kFieldBlueprint = 2, kFieldAlpha = 3;
// The checksum array follows ten per-seed scalars, the 5-reading window,
// drift_count and loss_baseline.
constexpr int32_t kFieldChecksum = 10 + 5 + 2;

// Bitwise CRC-32 (IEEE, reflected), independent of the library's table.
uint32_t crc32(const Bytes& bytes, std::size_t length) {
  uint32_t c = 0xFFFFFFFFu;
  for (std::size_t i = 0; i < length; ++i) {
    c ^= bytes[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return ~c;
}

void put_u32(Bytes& bytes, std::size_t offset, uint32_t v) {
  for (int i = 0; i < 4; ++i) bytes[offset + i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t get_u32(const Bytes& bytes, std::size_t offset) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(bytes[offset + i]) << (8 * i);
  return v;
}
void reseal_file(Bytes& bytes) { put_u32(bytes, bytes.size() - 4, crc32(bytes, bytes.size() - 4)); }

LayerConfig config(int64_t hidden, int32_t seeds, int32_t blueprints) {
  LayerConfig c;
  c.hidden = hidden;
  c.num_seeds = seeds;
  c.max_blueprints = blueprints;
  return c;
}

std::vector<float> randoms(std::mt19937& rng, std::size_t n) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// A layer with seeds in many stages, random strategies, a drift history with
// NaNs, and alphas / weights with NaN payloads and negative zeros.
Layer busy_layer(const LayerConfig& c, uint32_t seed) {
  std::mt19937 rng(seed);
  Layer layer(c);
  const auto n = static_cast<std::size_t>(c.num_seeds);
  StrategyParams sp;
  sp.strategy = Strategy::drift_controlled;
  sp.ramp_steps = 9;
  sp.drift_threshold = 0.3f;
  layer.germinate(0, Kind::mlp, 0, sp);
  layer.transition(0, Stage::training);
  layer.transition(0, Stage::grafting);
  if (n > 1) {
    sp.strategy = Strategy::performance_linked;
    layer.germinate(1, Kind::residual, 0, sp);
    layer.transition(1, Stage::training);
    layer.transition(1, Stage::culled);
  }
  if (n > 2) layer.germinate(2, Kind::mlp, 1);
  std::uniform_real_distribution<float> u(0.01f, 0.2f);
  for (int k = 0; k < 3; ++k) {
    std::vector<float> loss(n), grad(n), drift(n);
    for (std::size_t i = 0; i < n; ++i) {
      loss[i] = u(rng);
      grad[i] = u(rng);
      drift[i] = (k == 1 && i == 0) ? std::numeric_limits<float>::quiet_NaN() : u(rng);
    }
    layer.step(loss, grad, drift);
  }
  std::vector<float> alpha = randoms(rng, n);
  alpha[0] = std::bit_cast<float>(0x7fc01234u);  // NaN with a payload
  if (n > 1) alpha[1] = -0.0f;
  layer.set_alpha(alpha);
  std::vector<float> w = randoms(rng, layer.registry().weights.size());
  std::vector<float> s = randoms(rng, layer.registry().scales.size());
  w[1] = std::bit_cast<float>(0xffa00001u);
  s[0] = -0.0f;
  layer.set_registry_values(w, s);
  return layer;
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

TEST(StateIO, TestCrcIsTheStandardOne) {
  const std::string check = "123456789";
  const Bytes bytes(check.begin(), check.end());
  EXPECT_EQ(crc32(bytes, bytes.size()), 0xCBF43926u);
}

TEST(StateIO, RoundTripIsBitExact) {
  LayerConfig c = config(48, 4, 6);
  c.clamp = {true, -3.5f, 2.25f};
  c.clip_enabled = true;
  c.clip_norm = 0.5f;
  c.dead_threshold = 1e-3f;
  c.stabilization_steps = 7;
  c.embargo_steps = 2;
  const Layer source = busy_layer(c, 42);
  const Bytes bytes = source.save();

  // The size formula of docs/STATE_FORMAT.md: S = 4, B = 6, C = 12.
  EXPECT_EQ(bytes.size(), 78u + 72u * 4 + 4u * 6 * 12 + 8u * 6 + 4);
  EXPECT_EQ(get_u32(bytes, bytes.size() - 4), crc32(bytes, bytes.size() - 4));

  Layer target(config(48, 4, 6));
  target.load(bytes);
  EXPECT_EQ(target.save(), bytes);
  const SeedState& a = source.seeds();
  const SeedState& b = target.seeds();
  EXPECT_TRUE(same_bits(a.stage, b.stage));
  EXPECT_TRUE(same_bits(a.blueprint, b.blueprint));
  EXPECT_TRUE(same_bits(a.alpha, b.alpha));
  EXPECT_TRUE(same_bits(a.drift_window, b.drift_window));
  EXPECT_TRUE(same_bits(a.loss_baseline, b.loss_baseline));
  EXPECT_TRUE(same_bits(a.checksum, b.checksum));
  EXPECT_TRUE(same_bits(source.registry().weights, target.registry().weights));
  EXPECT_TRUE(same_bits(source.registry().scales, target.registry().scales));
  EXPECT_TRUE(same_bits(source.registry().row_kind, target.registry().row_kind));
  // The configuration travels with the state.
  EXPECT_EQ(target.config().stabilization_steps, 7);
  EXPECT_EQ(target.config().embargo_steps, 2);
  EXPECT_TRUE(target.config().clamp.enabled);
  EXPECT_EQ(target.config().clamp.lo, -3.5f);
  EXPECT_EQ(target.config().clip_norm, 0.5f);
  EXPECT_EQ(target.config().dead_threshold, 1e-3f);
  EXPECT_NO_THROW(target.verify());

  // The loaded layer carries on exactly like the original.
  Layer original = busy_layer(c, 42);
  const std::vector<float> in = {0.1f, 0.2f, 0.3f, 0.4f};
  original.step(in, in, in);
  target.step(in, in, in);
  EXPECT_EQ(original.save(), target.save());
}

TEST(StateIO, EverySingleByteCorruptionIsRefused) {
  const Layer source = busy_layer(config(6, 2, 3), 7);
  const Bytes good = source.save();
  Layer target = busy_layer(config(6, 2, 3), 8);
  const Bytes before = target.save();
  ASSERT_NE(good, before);
  for (std::size_t i = 0; i < good.size(); ++i) {
    for (uint8_t flip : {uint8_t{0x01}, uint8_t{0x80}, uint8_t{0xFF}}) {
      Bytes bad = good;
      bad[i] ^= flip;
      EXPECT_THROW(target.load(bad), Error) << "byte " << i << " ^ " << int(flip);
    }
  }
  EXPECT_EQ(target.save(), before);
  target.load(good);
  EXPECT_EQ(target.save(), good);
}

TEST(StateIO, EveryTruncationIsRefused) {
  const Bytes good = busy_layer(config(6, 2, 3), 9).save();
  Layer target = busy_layer(config(6, 2, 3), 10);
  const Bytes before = target.save();
  for (std::size_t len = 0; len < good.size(); ++len) {
    const Bytes cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(len));
    EXPECT_THROW(target.load(cut), Error) << "length " << len;
  }
  Bytes padded = good;
  padded.push_back(0x5a);
  try {
    target.load(padded);
    ADD_FAILURE() << "padded state accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the header says " + std::to_string(good.size()) +
                                         " bytes, got " + std::to_string(padded.size())),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(target.save(), before);
}

void expect_refused(Layer& layer, const Bytes& bytes, const std::string& text, ErrorKind kind) {
  const Bytes before = layer.save();
  try {
    layer.load(bytes);
    ADD_FAILURE() << "accepted, expected: " << text;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
  }
  EXPECT_EQ(layer.save(), before) << text;
}

TEST(StateIO, WrongMagicAndVersion) {
  Bytes bytes = busy_layer(config(12, 3, 4), 11).save();
  Layer target(config(12, 3, 4));
  Bytes v2 = bytes;
  put_u32(v2, 8, 2);
  reseal_file(v2);
  expect_refused(target, v2, "unsupported state format version 2 (this build reads version 1)",
                 ErrorKind::value);
  Bytes magic = bytes;
  magic[0] = 'X';
  expect_refused(target, magic, "not a kasmina layer state", ErrorKind::value);
}

TEST(StateIO, WrongShape) {
  const Bytes small = busy_layer(config(12, 3, 4), 12).save();
  Layer wider(config(24, 3, 4));
  expect_refused(wider, small,
                 "the state is for hidden = 12, num_seeds = 3; this layer has hidden = 24, "
                 "num_seeds = 3",
                 ErrorKind::value);
  Layer more_seeds(config(12, 4, 4));
  expect_refused(more_seeds, small, "num_seeds = 3; this layer has hidden = 12, num_seeds = 4",
                 ErrorKind::value);
  Layer more_rows(config(12, 3, 9));
  expect_refused(more_rows, small,
                 "the state has max_blueprints = 4; this layer has max_blueprints = 9",
                 ErrorKind::value);
}

TEST(StateIO, CorruptSeedEntryRefused) {
  const int32_t n = 3;
  const Bytes good = busy_layer(config(12, n, 4), 13).save();
  Layer target(config(12, n, 4));
  // A changed alpha under an intact file CRC: only the seed checksum sees it.
  Bytes bad = good;
  put_u32(bad, seed_field_offset(n, kFieldAlpha, 1), std::bit_cast<uint32_t>(0.625f));
  reseal_file(bad);
  expect_refused(target, bad, "seed 1: integrity checksum mismatch", ErrorKind::runtime);
  // A changed checksum itself.
  bad = good;
  const std::size_t at = seed_field_offset(n, kFieldChecksum, 2);
  put_u32(bad, at, get_u32(bad, at) ^ 0x10u);
  reseal_file(bad);
  expect_refused(target, bad, "seed 2: integrity checksum mismatch", ErrorKind::runtime);
}

TEST(StateIO, OutOfRangeValuesRefused) {
  const int32_t n = 3;
  const Bytes good = busy_layer(config(12, n, 4), 14).save();
  Layer target(config(12, n, 4));
  Bytes bad = good;
  put_u32(bad, seed_field_offset(n, kFieldStage, 0), 11);
  reseal_file(bad);
  expect_refused(target, bad, "seed 0: stage must be in [0, 11), got 11", ErrorKind::value);
  bad = good;
  put_u32(bad, seed_field_offset(n, kFieldBlueprint, 2), 4);
  reseal_file(bad);
  expect_refused(target, bad, "seed 2: blueprint must be in [0, 4), got 4", ErrorKind::value);
  bad = good;
  put_u32(bad, seed_field_offset(n, kFieldBlueprint, 0), 3);  // a free row
  reseal_file(bad);
  expect_refused(target, bad, "seed 0: blueprint 3 has row_kind -1", ErrorKind::value);
}

// A stray write into the live seed table (simulated through const_cast; the
// Layer object itself is not const, so the write is well defined) is caught
// before the state is used or saved.
TEST(StateIO, CorruptedLiveStateIsRefused) {
  Layer layer = busy_layer(config(12, 3, 4), 15);
  const_cast<float&>(layer.seeds().alpha[2]) = 0.875f;
  try {
    layer.verify();
    ADD_FAILURE() << "corruption not detected";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::runtime);
    EXPECT_NE(std::string(e.what()).find("seed 2: integrity checksum mismatch"), std::string::npos)
        << e.what();
  }
  const std::vector<float> in = {0.1f, 0.2f, 0.3f};
  EXPECT_THROW(layer.step(in, in, in), Error);
  EXPECT_THROW(layer.transition(0, Stage::stabilization), Error);
  EXPECT_THROW(layer.save(), Error);
  EXPECT_EQ(layer.seeds().stage[0], static_cast<int32_t>(Stage::grafting));
  EXPECT_EQ(layer.seeds().alpha[2], 0.875f);
  // Loading a good state is the way back.
  const Bytes good = busy_layer(config(12, 3, 4), 15).save();
  layer.load(good);
  EXPECT_NO_THROW(layer.verify());
  EXPECT_EQ(layer.save(), good);
}

}  // namespace
}  // namespace kasmina
