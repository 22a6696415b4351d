#include "kasmina/types.hpp"

#include "kasmina/error.hpp"

namespace kasmina {

std::string_view dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "float32";
    case DType::bf16: return "bfloat16";
    case DType::f16: return "float16";
    case DType::f64: return "float64";
  }
  return "unknown";
}

std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::f16: return 2;
    case DType::f64: return 8;
  }
  KASMINA_FAIL(ErrorKind::type, "unknown dtype value ", static_cast<int>(d));
}

std::string_view kind_name(Kind k) {
  switch (k) {
    case Kind::residual: return "RESIDUAL";
    case Kind::attention: return "ATTENTION";
    case Kind::mlp: return "MLP";
    case Kind::conv: return "CONV";
  }
  return "UNKNOWN_KIND";
}

std::string_view stage_name(Stage s) {
  switch (s) {
    case Stage::dormant: return "DORMANT";
    case Stage::germinated: return "GERMINATED";
    case Stage::training: return "TRAINING";
    case Stage::grafting: return "GRAFTING";
    case Stage::stabilization: return "STABILIZATION";
    case Stage::evaluating: return "EVALUATING";
    case Stage::fine_tuning: return "FINE_TUNING";
    case Stage::fossilized: return "FOSSILIZED";
    case Stage::culled: return "CULLED";
    case Stage::cancelled: return "CANCELLED";
    case Stage::rolled_back: return "ROLLED_BACK";
  }
  return "UNKNOWN_STAGE";
}

std::string_view strategy_name(Strategy s) {
  switch (s) {
    case Strategy::fixed_ramp: return "FIXED_RAMP";
    case Strategy::performance_linked: return "PERFORMANCE_LINKED";
    case Strategy::drift_controlled: return "DRIFT_CONTROLLED";
    case Strategy::grad_norm_gated: return "GRAD_NORM_GATED";
  }
  return "UNKNOWN_STRATEGY";
}

}  // namespace kasmina
