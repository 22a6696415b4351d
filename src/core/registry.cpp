// The blueprint registry (SPEC section 6): rows are allocated on germinate,
// shared by seeds of the same kind, and released when no seed refers to them.
#include "registry.hpp"

#include <algorithm>
#include <cstddef>

#include "kasmina/error.hpp"

namespace kasmina {

std::vector<float> initial_blueprint_weights(Kind kind, int64_t chunk) {
  KASMINA_CHECK_VALUE(chunk > 0, "blueprint chunk must be > 0 (chunk = ", chunk, ")");
  const auto k = static_cast<int32_t>(kind);
  KASMINA_CHECK_VALUE(k >= 0 && k < kNumKinds, "kind must be in [0, ", kNumKinds, ") (kind = ", k,
                      ")");
  // Each start makes a freshly grafted seed close to the identity: a zero
  // shift, a uniform softmax, a unit gate, a one-tap filter.
  const float fill = kind == Kind::mlp ? 1.0f : 0.0f;
  std::vector<float> w(static_cast<std::size_t>(chunk), fill);
  if (kind == Kind::conv) w[0] = 1.0f;
  return w;
}

namespace detail {

int32_t lowest_free_row(const Registry& registry) {
  for (int32_t row = 1; row < registry.num_blueprints; ++row) {
    if (!registry.allocated(row)) return row;
  }
  return -1;
}

void allocate_row(Registry& registry, int32_t row, Kind kind) {
  const std::vector<float> w = initial_blueprint_weights(kind, registry.chunk);
  const auto r = static_cast<std::size_t>(row);
  std::copy(w.begin(), w.end(), registry.weights.begin() + static_cast<std::ptrdiff_t>(r * w.size()));
  registry.scales[r] = kInitialScale;
  registry.row_kind[r] = static_cast<int32_t>(kind);
}

}  // namespace detail

void Layer::release_unused_rows() {
  std::vector<bool> used(static_cast<std::size_t>(registry_.num_blueprints), false);
  for (int32_t b : seeds_.blueprint) used[static_cast<std::size_t>(b)] = true;
  const auto chunk = static_cast<std::ptrdiff_t>(registry_.chunk);
  for (int32_t row = 1; row < registry_.num_blueprints; ++row) {
    const auto r = static_cast<std::size_t>(row);
    if (used[r] || registry_.row_kind[r] < 0) continue;
    // Zeroed so that a free row's values do not depend on its history.
    std::fill_n(registry_.weights.begin() + static_cast<std::ptrdiff_t>(r) * chunk, chunk, 0.0f);
    registry_.scales[r] = 0.0f;
    registry_.row_kind[r] = -1;
  }
}

}  // namespace kasmina
