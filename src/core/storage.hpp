// Internal, header-only: loading and storing the storage dtypes of x, y, dy,
// dx (SPEC section 2). Loads are exact. Stores round to nearest even, as the
// GPU's conversion instructions do, and are correct for NaN (payload kept,
// quieted), +-Inf, subnormals and overflow. No dependence on compiler half
// types, so every backend and the test harness round the same way.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kasmina/types.hpp"

namespace kasmina::storage {

inline float bf16_bits_to_float(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

inline uint16_t float_to_bf16_bits(float value) {
  const uint32_t f = std::bit_cast<uint32_t>(value);
  if ((f & 0x7fffffffu) > 0x7f800000u) {
    // Keep the upper payload bits and force the quiet bit, so a NaN stays a NaN
    // even if its payload lived only in the dropped half.
    return static_cast<uint16_t>((f >> 16) | 0x0040u);
  }
  // Adding 0x7fff plus the lowest kept bit rounds ties to even; a carry into
  // the exponent yields the next binade or +-Inf, both correct.
  return static_cast<uint16_t>((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
}

inline float f16_bits_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exp_mant = bits & 0x7fffu;
  // Placing the half's exponent and mantissa in a float's fields and scaling by
  // 2^112 rebias the exponent; subnormal halves land on normal floats exactly.
  float magnitude = std::bit_cast<float>(exp_mant << 13) * 0x1p112f;
  if (exp_mant >= 0x7c00u) magnitude = std::bit_cast<float>((exp_mant << 13) | 0x7f800000u);
  return std::bit_cast<float>(std::bit_cast<uint32_t>(magnitude) | sign);
}

inline uint16_t float_to_f16_bits(float value) {
  uint32_t f = std::bit_cast<uint32_t>(value);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint32_t out;
  if (f >= 0x47800000u) {
    // |value| >= 2^16 is beyond the largest half (65504) even before rounding.
    out = f > 0x7f800000u ? (0x7e00u | ((f >> 13) & 0x3ffu)) : 0x7c00u;
  } else if (f < 0x38800000u) {
    // Below 2^-14 the result is subnormal: adding 0.5f aligns the value so the
    // FPU's own round-to-nearest-even drops exactly the bits a half cannot hold.
    const float aligned = std::bit_cast<float>(f) + 0.5f;
    out = std::bit_cast<uint32_t>(aligned) - 0x3f000000u;
  } else {
    const uint32_t mant_odd = (f >> 13) & 1u;
    f += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;  // rebias, round half up
    f += mant_odd;                                          // ties to even
    out = f >> 13;  // a carry past the largest exponent yields +-Inf
  }
  return static_cast<uint16_t>(out | (sign >> 16));
}

// Round a double to float with round-to-odd. Rounding that result again to a
// format with at least two fewer significand bits (bf16, f16) equals rounding
// the double directly, which avoids double-rounding errors in the reference.
inline float double_to_float_round_odd(double value) {
  if (std::isnan(value)) return static_cast<float>(value);
  float f = static_cast<float>(value);
  if (static_cast<double>(f) == value) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(value)) {
    f = std::nextafter(f, 0.0f);
  }
  return std::bit_cast<float>(std::bit_cast<uint32_t>(f) | 1u);
}

// Element i of a buffer of the given storage dtype, widened exactly.
inline float load_float(DType dtype, const void* base, int64_t i) {
  switch (dtype) {
    case DType::f32:
      return static_cast<const float*>(base)[i];
    case DType::bf16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::f16:
      return f16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::f64:
      return static_cast<float>(static_cast<const double*>(base)[i]);
  }
  return 0.0f;
}

inline double load_double(DType dtype, const void* base, int64_t i) {
  if (dtype == DType::f64) return static_cast<const double*>(base)[i];
  return static_cast<double>(load_float(dtype, base, i));
}

inline void store_float(DType dtype, void* base, int64_t i, float value) {
  switch (dtype) {
    case DType::f32:
      static_cast<float*>(base)[i] = value;
      return;
    case DType::bf16:
      static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(value);
      return;
    case DType::f16:
      static_cast<uint16_t*>(base)[i] = float_to_f16_bits(value);
      return;
    case DType::f64:
      static_cast<double*>(base)[i] = static_cast<double>(value);
      return;
  }
}

// Store a double with a single rounding to the storage dtype.
inline void store_double(DType dtype, void* base, int64_t i, double value) {
  switch (dtype) {
    case DType::f32:
      static_cast<float*>(base)[i] = static_cast<float>(value);
      return;
    case DType::bf16:
      static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(double_to_float_round_odd(value));
      return;
    case DType::f16:
      static_cast<uint16_t*>(base)[i] = float_to_f16_bits(double_to_float_round_odd(value));
      return;
    case DType::f64:
      static_cast<double*>(base)[i] = value;
      return;
  }
}

// Copy element i of src to element j of dst of the same dtype, bit for bit.
inline void copy_element(DType dtype, const void* src, int64_t i, void* dst, int64_t j) {
  const std::size_t size = dtype == DType::f64 ? 8 : dtype == DType::f32 ? 4 : 2;
  std::memcpy(static_cast<unsigned char*>(dst) + static_cast<std::size_t>(j) * size,
              static_cast<const unsigned char*>(src) + static_cast<std::size_t>(i) * size, size);
}

}  // namespace kasmina::storage
