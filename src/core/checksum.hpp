// Internal: CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320, as zlib's
// crc32), used for the per-seed integrity checksums and the whole-file check of
// the state format (SPEC section 8, DESIGN decision 12).
#pragma once

#include <cstdint>
#include <span>

namespace kasmina::detail {

uint32_t crc32(std::span<const uint8_t> bytes);

}  // namespace kasmina::detail
