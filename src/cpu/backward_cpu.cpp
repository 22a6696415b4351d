// Fast CPU backward (SPEC section 5): dX, the blueprint gradients, dalpha and
// the gradient statistics in one pass over x and dy. Per row and seed chunk
// (the row kernels of cpu_rows.hpp, one copy per instruction set),
// G (clamp mask, clip) is formed in L1, dX is written, and the row's
// contributions are added into the block's partials: float32 vectors for the
// sums over rows that make dw (at most 64 rows per block), float64 scalars.
// Blocks merge in block order, then each seed's totals are turned into dw, dσ,
// dalpha in seed order, so every output is bit-identical for any thread count.
#include <sstream>
#include <string>
#include <vector>

#include "backends.hpp"
#include "cpu/cpu_kernels.hpp"
#include "kasmina/error.hpp"

namespace kasmina::detail {

namespace {

using cpu::GradPartial;
using cpu::SeedPlan;

void backward_all(const BackwardParams& p) {
  const int64_t N = p.rows, H = p.hidden;
  const int32_t num_seeds = p.num_seeds;
  const int64_t C = H / num_seeds;
  const int32_t B = p.registry.num_blueprints;
  std::vector<SeedPlan> plans(static_cast<std::size_t>(num_seeds));
  std::vector<float> vectors(static_cast<std::size_t>(H));
  cpu::make_plans(p.seeds, p.registry, num_seeds, C, plans.data(), vectors.data());

  const cpu::BackwardJob job{p, C, p.x_row_stride > 0 ? p.x_row_stride : H,
                        p.dy_row_stride > 0 ? p.dy_row_stride : H,
                        p.dx_row_stride > 0 ? p.dx_row_stride : H, plans.data()};
  const int64_t rows_per_block = cpu::block_rows(N);
  const int64_t blocks = cpu::block_count(N);
  std::vector<GradPartial> parts(static_cast<std::size_t>(blocks * num_seeds));
  std::vector<float> acc(static_cast<std::size_t>(blocks * H), 0.0f);
  const int threads = cpu::resolve_threads(p.num_threads);
  const auto rows = cpu::select_isa() == cpu::Isa::avx2 ? cpu::avx2::backward_block : cpu::generic::backward_block;

#pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 1)
  {
    std::vector<float> scratch(static_cast<std::size_t>(cpu::backward_scratch_floats(H, C)), 0.0f);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      rows(job, b * rows_per_block, std::min(N, (b + 1) * rows_per_block), parts.data() + b * num_seeds,
           acc.data() + b * H, scratch.data());
    }
  }

  // Seeds sharing a blueprint add into its row in seed order, in float64.
  std::vector<double> dweights(static_cast<std::size_t>(B) * static_cast<std::size_t>(C), 0.0);
  std::vector<double> dscales(static_cast<std::size_t>(B), 0.0);
  std::vector<double> total_acc(static_cast<std::size_t>(C));
  for (int32_t s = 0; s < num_seeds; ++s) {
    const SeedPlan& plan = plans[static_cast<std::size_t>(s)];
    const int64_t off = static_cast<int64_t>(s) * C;
    GradPartial total;
    for (int64_t b = 0; b < blocks; ++b) total.merge(parts[static_cast<std::size_t>(b * num_seeds + s)]);

    float* stats = p.grad_stats + static_cast<int64_t>(s) * kGradStatsWidth;
    stats[kGradL2Norm] = static_cast<float>(std::sqrt(total.sumsq));
    stats[kGradVariance] = static_cast<float>(total.moments.variance());
    stats[kGradMaxAbs] = total.max_abs;

    double dalpha = 0.0;
    if (plan.grads) {
      std::fill(total_acc.begin(), total_acc.end(), 0.0);
      for (int64_t b = 0; b < blocks; ++b) {
        const float* block = acc.data() + b * H + off;
        for (int64_t j = 0; j < C; ++j) total_acc[static_cast<std::size_t>(j)] += block[j];
      }
      double* dw = dweights.data() + static_cast<int64_t>(plan.blueprint) * C;
      double& dsigma = dscales[static_cast<std::size_t>(plan.blueprint)];
      const double ga = plan.grad_a, sigma = plan.sigma;
      switch (plan.kind) {
        case static_cast<int32_t>(Kind::residual):
          for (int64_t j = 0; j < C; ++j) dw[j] += ga * sigma * total_acc[static_cast<std::size_t>(j)];
          dsigma += ga * total.dsigma;
          dalpha = sigma * total.dsigma;  // Σ G⊙(T - X) with T - X = σw
          break;
        case static_cast<int32_t>(Kind::attention): {
          // q = a Σ_n G⊙X; dw = p ⊙ (q - <p,q>).
          double pq = 0.0;
          for (int64_t j = 0; j < C; ++j) pq += plan.vec[j] * (ga * total_acc[static_cast<std::size_t>(j)]);
          for (int64_t j = 0; j < C; ++j) {
            const double q = ga * total_acc[static_cast<std::size_t>(j)];
            dw[j] += plan.vec[j] * (q - pq);
          }
          dalpha = total.dalpha;  // Σ G⊙X⊙(p - 1), term by term in float64
          break;
        }
        case static_cast<int32_t>(Kind::mlp):
          for (int64_t j = 0; j < C; ++j) dw[j] += ga * sigma * total_acc[static_cast<std::size_t>(j)];
          dsigma += ga * total.dsigma;
          dalpha = total.dalpha;
          break;
        default:
          for (int64_t k = 0; k < 3; ++k) dw[k] += ga * sigma * total.taps[k];
          dsigma += ga * total.dsigma;
          dalpha = total.dalpha;
          break;
      }
    }
    p.dalpha[s] = plan.dalpha ? static_cast<float>(dalpha) : 0.0f;
  }
  for (std::size_t i = 0; i < dweights.size(); ++i) p.dweights[i] = static_cast<float>(dweights[i]);
  for (std::size_t i = 0; i < dscales.size(); ++i) p.dscales[i] = static_cast<float>(dscales[i]);
}

}  // namespace

void backward_cpu(const BackwardParams& p) {
  if (p.dtype != DType::f64) {
    backward_all(p);
    return;
  }
  KASMINA_FAIL(ErrorKind::type, "the cpu backend does not take ", dtype_name(p.dtype),
               " (float64 is reference-only)");
}

std::string describe_backward_cpu(const BackwardParams& p) {
  std::ostringstream os;
  os << "cpu: one pass, " << cpu::isa_name(cpu::select_isa()) << " row kernels, "
     << cpu::resolve_threads(p.num_threads) << " threads, "
     << cpu::block_rows(p.rows) << "-row blocks, "
     << (p.dtype == DType::f32 ? "fp32" : p.dtype == DType::bf16 ? "bf16" : "fp16")
     << " storage, backward+grad stats";
  return os.str();
}

}  // namespace kasmina::detail
