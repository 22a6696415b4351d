// Fast CPU forward (SPEC sections 3 and 4): output and telemetry in one pass
// over memory. Each row is read once; per seed chunk the statistics of X, the
// blend and the drift terms are computed while the chunk sits in L1 (the row
// kernels of cpu_rows.hpp, one copy per instruction set), then the row is
// written once. Rows are processed in fixed blocks (cpu_kernels.hpp)
// whose partials merge in block order, so results are bit-identical for any
// thread count.
#include <omp.h>

#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "backends.hpp"
#include "cpu/cpu_kernels.hpp"
#include "kasmina/error.hpp"

namespace kasmina::detail {

namespace cpu {

int resolve_threads(int requested) {
  if (requested > 0) return requested;
  return cpu_default_threads();
}

Isa select_isa() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                           __builtin_cpu_supports("fma");
  const char* forced = std::getenv("KASMINA_CPU_ISA");
  if (forced != nullptr && std::string(forced) == "generic") return Isa::generic;
  return avx2 ? Isa::avx2 : Isa::generic;
#else
  return Isa::generic;
#endif
}

const char* isa_name(Isa isa) { return isa == Isa::avx2 ? "avx2" : "generic"; }

void make_plans(const SeedTable& seeds, const RegistryView& registry, int32_t num_seeds,
                int64_t chunk, SeedPlan* plans, float* vectors) {
  for (int32_t s = 0; s < num_seeds; ++s) {
    SeedPlan& p = plans[s];
    const int32_t stage = seeds.stage[s];
    p.kind = seeds.kind[s];
    p.blueprint = seeds.blueprint[s];
    const bool has_blueprint = p.blueprint != 0;
    const float alpha = seeds.alpha[s];
    // NaN alpha fails both comparisons and would survive std::clamp; treat it
    // as 0 like the reference's clamp(alpha, 0, 1) does with fmin/fmax.
    p.a = alpha > 0.0f ? (alpha < 1.0f ? alpha : 1.0f) : 0.0f;
    p.one_minus_a = 1.0f - p.a;
    p.blend = has_blueprint && stage_blends(stage);
    const bool grafted = has_blueprint && stage_trains_grafted(stage);
    p.grads = grafted || (has_blueprint && stage_trains_shadow(stage));
    p.grad_a = stage_trains_shadow(stage) ? 1.0f : p.a;
    p.dalpha = grafted && alpha >= 0.0f && alpha <= 1.0f;
    if (!has_blueprint) continue;

    p.sigma = registry.scales[p.blueprint];
    p.w = registry.weights + static_cast<int64_t>(p.blueprint) * chunk;
    float* v = vectors + static_cast<int64_t>(s) * chunk;
    p.vec = v;
    if (p.kind == static_cast<int32_t>(Kind::residual)) {
      for (int64_t j = 0; j < chunk; ++j) v[j] = p.sigma * p.w[j];
    } else if (p.kind == static_cast<int32_t>(Kind::attention)) {
      // Once per call, in float64, so that p sums to 1 as closely as float32
      // can hold it.
      double wmax = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < chunk; ++j) wmax = std::max(wmax, static_cast<double>(p.w[j]));
      double total = 0.0;
      for (int64_t j = 0; j < chunk; ++j) total += std::exp(static_cast<double>(p.w[j]) - wmax);
      for (int64_t j = 0; j < chunk; ++j) {
        v[j] = static_cast<float>(std::exp(static_cast<double>(p.w[j]) - wmax) / total);
      }
    } else {
      for (int64_t j = 0; j < chunk; ++j) v[j] = p.w[j];
    }
  }
}

}  // namespace cpu

int cpu_default_threads() {
  if (const char* env = std::getenv("KASMINA_NUM_THREADS")) {
    char* end = nullptr;
    const long value = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && value > 0) return static_cast<int>(value);
  }
  return omp_get_max_threads();
}

namespace {

using cpu::SeedPlan;
using cpu::TelemetryPartial;

void forward_all(const ForwardParams& p) {
  const int64_t N = p.rows, H = p.hidden;
  const int32_t num_seeds = p.num_seeds;
  const int64_t C = H / num_seeds;
  std::vector<SeedPlan> plans(static_cast<std::size_t>(num_seeds));
  std::vector<float> vectors(static_cast<std::size_t>(H));
  cpu::make_plans(p.seeds, p.registry, num_seeds, C, plans.data(), vectors.data());

  const cpu::ForwardJob job{p, C, p.x_row_stride > 0 ? p.x_row_stride : H,
                       p.y_row_stride > 0 ? p.y_row_stride : H, plans.data()};
  const int64_t rows_per_block = cpu::block_rows(N);
  const int64_t blocks = cpu::block_count(N);
  std::vector<TelemetryPartial> parts(static_cast<std::size_t>(blocks * num_seeds));
  const int threads = cpu::resolve_threads(p.num_threads);
  const auto rows = cpu::select_isa() == cpu::Isa::avx2 ? cpu::avx2::forward_block : cpu::generic::forward_block;

#pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 1)
  {
    std::vector<float> scratch(static_cast<std::size_t>(cpu::forward_scratch_floats(H, C)), 0.0f);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      rows(job, b * rows_per_block, std::min(N, (b + 1) * rows_per_block), parts.data() + b * num_seeds,
           scratch.data());
    }
  }

  for (int32_t s = 0; s < num_seeds; ++s) {
    TelemetryPartial total;
    for (int64_t b = 0; b < blocks; ++b) total.merge(parts[static_cast<std::size_t>(b * num_seeds + s)]);
    const double count = total.moments.count;
    const double variance = total.moments.variance();
    const double mean = count > 0.0 ? total.moments.mean : 0.0;
    float* row = p.telemetry + static_cast<int64_t>(s) * kTelemetryWidth;
    row[kTelVariance] = static_cast<float>(variance);
    row[kTelMean] = static_cast<float>(mean);
    row[kTelMin] = total.min;
    row[kTelMax] = total.max;
    row[kTelDeadRatio] = count > 0.0 ? static_cast<float>(static_cast<double>(total.dead) / count) : 0.0f;
    row[kTelSignalToNoise] = count > 0.0 ? static_cast<float>(std::fabs(mean) / std::sqrt(variance + 1e-8)) : 0.0f;
    row[kTelNonfinite] = static_cast<float>(total.nonfinite);
    row[kTelDrift] = N > 0 && plans[static_cast<std::size_t>(s)].blend
                         ? static_cast<float>(total.drift / static_cast<double>(N))
                         : 0.0f;
    if (p.nonfinite_count != nullptr) p.nonfinite_count[s] = total.nonfinite;
  }
}

}  // namespace

void forward_cpu(const ForwardParams& p) {
  if (p.dtype != DType::f64) {
    forward_all(p);
    return;
  }
  KASMINA_FAIL(ErrorKind::type, "the cpu backend does not take ", dtype_name(p.dtype),
               " (float64 is reference-only)");
}

std::string describe_forward_cpu(const ForwardParams& p) {
  std::ostringstream os;
  os << "cpu: one pass, " << cpu::isa_name(cpu::select_isa()) << " row kernels, "
     << cpu::resolve_threads(p.num_threads) << " threads, "
     << cpu::block_rows(p.rows) << "-row blocks, "
     << (p.dtype == DType::f32 ? "fp32" : p.dtype == DType::bf16 ? "bf16" : "fp16")
     << " storage, forward+telemetry";
  return os.str();
}

}  // namespace kasmina::detail
