// Internal: the argument checks behind kasmina::validate (ops.cpp), shared
// with the reference entry points, which take params whose output pointers
// they ignore.
#pragma once

#include "kasmina/ops.hpp"
#include "kasmina/params.hpp"

namespace kasmina::detail {

enum class Outputs { required, ignored };

void validate_forward(const ForwardParams&, Backend, Outputs);
void validate_backward(const BackwardParams&, Backend, Outputs);

}  // namespace kasmina::detail
