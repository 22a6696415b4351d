// The float64 reference: SPEC.md written as code, for clarity, not speed. It
// is the oracle every other backend is tested against. Inputs are read from
// their storage dtype (so the reference sees exactly the rounded values the
// fast backends see) and all results are returned in float64, unrounded.
//
// forward(params, Backend::reference) and backward(params,
// Backend::reference) run these functions and round the results into the
// params' output pointers.
#pragma once

#include <cstdint>
#include <vector>

#include "kasmina/params.hpp"

namespace kasmina::reference {

struct ForwardResult {
  std::vector<double> y;                 // [rows, hidden]
  std::vector<double> y_unclamped;       // [rows, hidden], before the optional clamp
  std::vector<double> telemetry;         // [num_seeds, 8]
  std::vector<int64_t> nonfinite_count;  // [num_seeds]
};

struct BackwardResult {
  std::vector<double> dx;          // [rows, hidden]
  std::vector<double> dweights;    // [num_blueprints, C]
  std::vector<double> dscales;     // [num_blueprints]
  std::vector<double> dalpha;      // [num_seeds]
  std::vector<double> grad_stats;  // [num_seeds, 3]
};

// Output pointers in params are ignored (may be null); the input pointers and
// the seed table must be host memory. Validates like kasmina::validate.
ForwardResult forward(const ForwardParams& params);
BackwardResult backward(const BackwardParams& params);

}  // namespace kasmina::reference
