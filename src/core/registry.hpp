// Internal: allocation of blueprint registry rows (SPEC section 6, DESIGN
// decisions 8, 21). Free rows, row 0 included, hold zero weights and scale.
#pragma once

#include <cstdint>

#include "kasmina/layer.hpp"

namespace kasmina::detail {

// Lowest free row >= 1, or -1 when every row is in use.
int32_t lowest_free_row(const Registry& registry);
// Marks a free row as created for `kind` and writes the initial values.
void allocate_row(Registry& registry, int32_t row, Kind kind);

}  // namespace kasmina::detail
