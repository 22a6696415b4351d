// Internal: little-endian encoding of the state format and of the per-seed
// checksum input (docs/STATE_FORMAT.md). Values are written byte by byte, so
// the bytes are the same on every host whatever its own byte order.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

#include "kasmina/error.hpp"

namespace kasmina::detail {

class ByteWriter {
 public:
  void u8(uint8_t v) { bytes_.push_back(v); }
  void u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) bytes_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  void u64(uint64_t v) {
    for (int i = 0; i < 8; ++i) bytes_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  void i32(int32_t v) { u32(static_cast<uint32_t>(v)); }
  void i64(int64_t v) { u64(static_cast<uint64_t>(v)); }
  // Bit pattern, so NaN payloads and signed zeros survive.
  void f32(float v) { u32(std::bit_cast<uint32_t>(v)); }
  void raw(std::string_view s) { bytes_.insert(bytes_.end(), s.begin(), s.end()); }
  void reserve(std::size_t n) { bytes_.reserve(n); }
  std::size_t size() const { return bytes_.size(); }
  std::vector<uint8_t>& bytes() { return bytes_; }

 private:
  std::vector<uint8_t> bytes_;
};

// Reads are bounds-checked: running past the end is an Error, never a read
// outside the buffer.
class ByteReader {
 public:
  explicit ByteReader(std::span<const uint8_t> bytes) : bytes_(bytes) {}
  uint8_t u8() { return take(1)[0]; }
  uint32_t u32() {
    const uint8_t* p = take(4);
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
    return v;
  }
  uint64_t u64() {
    const uint8_t* p = take(8);
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
    return v;
  }
  int32_t i32() { return static_cast<int32_t>(u32()); }
  int64_t i64() { return static_cast<int64_t>(u64()); }
  float f32() { return std::bit_cast<float>(u32()); }
  std::string_view raw(std::size_t n) {
    const uint8_t* p = take(n);
    return {reinterpret_cast<const char*>(p), n};
  }
  std::size_t offset() const { return offset_; }

 private:
  const uint8_t* take(std::size_t n) {
    KASMINA_CHECK_VALUE(n <= bytes_.size() - offset_, "state is truncated: needed ", n,
                        " more bytes at offset ", offset_, ", only ", bytes_.size() - offset_,
                        " left");
    const uint8_t* p = bytes_.data() + offset_;
    offset_ += n;
    return p;
  }

  std::span<const uint8_t> bytes_;
  std::size_t offset_ = 0;
};

}  // namespace kasmina::detail
