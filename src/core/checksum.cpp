// Integrity checksums of the seed entries (SPEC section 8): one CRC-32 per
// seed over the bit patterns of all its fields, resealed after every mutation
// and verified before every mutation, so a corrupted state is refused rather
// than used.
#include "checksum.hpp"

#include <array>
#include <cstddef>

#include "kasmina/error.hpp"
#include "kasmina/layer.hpp"
#include "little_endian.hpp"

namespace kasmina {
namespace detail {
namespace {

constexpr std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kCrcTable = make_crc_table();

}  // namespace

uint32_t crc32(std::span<const uint8_t> bytes) {
  uint32_t c = 0xFFFFFFFFu;
  for (uint8_t b : bytes) c = kCrcTable[(c ^ b) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

}  // namespace detail

uint32_t Layer::compute_checksum(int32_t seed) const {
  check_seed(seed);
  const auto s = static_cast<std::size_t>(seed);
  // The seed index is part of the input so that two swapped entries, each
  // intact on its own, are still caught.
  detail::ByteWriter w;
  w.reserve(96);
  w.i32(seed);
  w.i32(seeds_.stage[s]);
  w.i32(seeds_.kind[s]);
  w.i32(seeds_.blueprint[s]);
  w.f32(seeds_.alpha[s]);
  w.i32(seeds_.steps_in_stage[s]);
  w.i32(seeds_.strategy[s]);
  w.i32(seeds_.ramp_steps[s]);
  w.f32(seeds_.drift_threshold[s]);
  w.f32(seeds_.grad_norm_lower[s]);
  w.f32(seeds_.grad_norm_upper[s]);
  for (int32_t k = 0; k < kDriftWindow; ++k) w.f32(seeds_.drift_window[s * kDriftWindow + k]);
  w.i32(seeds_.drift_count[s]);
  w.f32(seeds_.loss_baseline[s]);
  return detail::crc32(w.bytes());
}

void Layer::verify() const {
  for (int32_t s = 0; s < seeds_.size(); ++s) {
    const uint32_t stored = seeds_.checksum[static_cast<std::size_t>(s)];
    const uint32_t actual = compute_checksum(s);
    KASMINA_CHECK_RUNTIME(stored == actual, "seed ", s,
                          ": integrity checksum mismatch (stored 0x", std::hex, stored,
                          ", computed 0x", actual, std::dec,
                          "); the layer state is corrupted and is refused");
  }
}

void Layer::reseal(int32_t seed) {
  seeds_.checksum[static_cast<std::size_t>(seed)] = compute_checksum(seed);
}

}  // namespace kasmina
