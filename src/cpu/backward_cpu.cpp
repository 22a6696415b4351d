// Fast CPU backward (SPEC section 5): dX, the blueprint gradients, dalpha and
// the gradient statistics in one pass over x and dy. Per row and seed chunk,
// G (clamp mask, clip) is formed in L1, dX is written, and the row's
// contributions are added into the block's partials: float32 vectors for the
// sums over rows that make dw (at most 64 rows per block), float64 scalars.
// Blocks merge in block order, then each seed's totals are turned into dw, dσ,
// dalpha in seed order, so every output is bit-identical for any thread count.
// Without -fno-trapping-math GCC will not turn the selects and compares of
// the row loops into vector blends, and most of them stay scalar. We never
// unmask floating-point traps, so the flag changes no result (unlike
// -ffast-math): the IEEE semantics, NaN handling and rounding are unchanged.
#pragma GCC optimize("no-trapping-math")

#include <sstream>
#include <string>
#include <vector>

#include "backends.hpp"
#include "cpu/cpu_kernels.hpp"
#include "kasmina/error.hpp"

namespace kasmina::detail {

namespace {

using cpu::Moments;
using cpu::SeedPlan;

// One seed's sums over the rows of a block (the vector part lives in the
// block's float buffer, C entries per seed).
struct GradPartial {
  double dsigma = 0.0;  // RESIDUAL: Σ G⊙w; MLP: Σ G⊙relu(X⊙w); CONV: Σ G⊙conv(X)
  double dalpha = 0.0;  // MLP, CONV: Σ G⊙(T - X)
  double sumsq = 0.0;   // of dX
  Moments moments;      // of dX
  float max_abs = 0.0f;

  void merge(const GradPartial& o) {
    dsigma += o.dsigma;
    dalpha += o.dalpha;
    sumsq += o.sumsq;
    moments.merge(o.moments);
    max_abs = std::max(max_abs, o.max_abs);
  }
};

struct BackwardJob {
  const BackwardParams& params;
  int64_t chunk;
  int64_t x_stride, dy_stride, dx_stride;
  const SeedPlan* plans;
};

// dX and the blueprint sums of one row chunk for each kind. x has two zeros
// before x[0] and g two zeros after g[C-1] for CONV; acc is the block's
// float32 vector for the seed.
void residual_chunk(const SeedPlan& p, const float* g, float* dx, float* acc, int64_t n,
                    GradPartial& part) {
  std::memcpy(dx, g, static_cast<std::size_t>(n) * sizeof(float));
  if (!p.grads) return;
  const float* w = p.w;
  float gw = 0.0f;
#pragma omp simd reduction(+ : gw)
  for (int64_t j = 0; j < n; ++j) {
    acc[j] += g[j];
    gw += g[j] * w[j];
  }
  part.dsigma += gw;
}

void attention_chunk(const SeedPlan& p, const float* x, const float* g, float* dx, float* acc,
                     int64_t n) {
  const float* prob = p.vec;
  const float a = p.a, om = p.one_minus_a;
  if (p.blend) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dx[j] = om * g[j] + a * (prob[j] * g[j]);
  } else {
    std::memcpy(dx, g, static_cast<std::size_t>(n) * sizeof(float));
  }
  if (!p.grads) return;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += g[j] * x[j];
}

void mlp_chunk(const SeedPlan& p, const float* x, const float* g, float* dx, float* acc, int64_t n,
               GradPartial& part) {
  const float* w = p.w;
  const float om = p.one_minus_a, a_sigma = p.a * p.sigma, sigma = p.sigma;
  if (p.blend) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float gm = x[j] * w[j] > 0.0f ? g[j] : 0.0f;
      dx[j] = om * g[j] + a_sigma * (w[j] * gm);
    }
  } else {
    std::memcpy(dx, g, static_cast<std::size_t>(n) * sizeof(float));
  }
  if (!p.grads) return;
  float g_relu = 0.0f, g_delta = 0.0f;
#pragma omp simd reduction(+ : g_relu, g_delta)
  for (int64_t j = 0; j < n; ++j) {
    const float h = x[j] * w[j];
    const bool m = h > 0.0f;
    const float r = m ? h : 0.0f;
    acc[j] += m ? g[j] * x[j] : 0.0f;
    g_relu += g[j] * r;
    g_delta += g[j] * (sigma * r - x[j]);
  }
  part.dsigma += g_relu;
  part.dalpha += g_delta;
}

void conv_chunk(const SeedPlan& p, const float* x, const float* g, float* dx, float* acc, int64_t n,
                GradPartial& part) {
  if (!p.blend) std::memcpy(dx, g, static_cast<std::size_t>(n) * sizeof(float));
  if (!p.blend && !p.grads) return;  // without a blueprint there is no w to read
  const float w0 = p.w[0], w1 = p.w[1], w2 = p.w[2];
  const float om = p.one_minus_a, a_sigma = p.a * p.sigma, sigma = p.sigma;
  if (p.blend) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      dx[j] = om * g[j] + a_sigma * (w0 * g[j] + w1 * g[j + 1] + w2 * g[j + 2]);
    }
  }
  if (!p.grads) return;
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, g_conv = 0.0f, g_delta = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, g_conv, g_delta)
  for (int64_t j = 0; j < n; ++j) {
    const float c = w0 * x[j] + w1 * x[j - 1] + w2 * x[j - 2];
    s0 += g[j] * x[j];
    s1 += g[j] * x[j - 1];
    s2 += g[j] * x[j - 2];
    g_conv += g[j] * c;
    g_delta += g[j] * (sigma * c - x[j]);
  }
  acc[0] += s0;
  acc[1] += s1;
  acc[2] += s2;
  part.dsigma += g_conv;
  part.dalpha += g_delta;
}

// Gradient statistics of one row chunk of dX, in float32 before rounding.
void chunk_grad_stats(const float* dx, int64_t n, GradPartial& part) {
  float sum = 0.0f, sumsq = 0.0f, max_abs = 0.0f;
#pragma omp simd reduction(+ : sum, sumsq) reduction(max : max_abs)
  for (int64_t j = 0; j < n; ++j) {
    sum += dx[j];
    sumsq += dx[j] * dx[j];
    max_abs = std::max(max_abs, std::fabs(dx[j]));
  }
  const float mean = sum / static_cast<float>(n);
  float m2 = 0.0f;
#pragma omp simd reduction(+ : m2)
  for (int64_t j = 0; j < n; ++j) {
    const float d = dx[j] - mean;
    m2 += d * d;
  }
  part.sumsq += sumsq;
  part.moments.merge(static_cast<double>(n), mean, m2);
  part.max_abs = std::max(part.max_abs, max_abs);
}

template <typename S>
void backward_block(const BackwardJob& job, int64_t row_begin, int64_t row_end, GradPartial* parts,
                    float* acc_block, std::vector<float>& scratch) {
  using raw = typename S::raw;
  constexpr bool kFloat = S::dtype == DType::f32;
  const BackwardParams& p = job.params;
  const int64_t H = p.hidden, C = job.chunk;
  const OutputClamp clamp = p.clamp;
  const bool clip = p.clip_enabled;
  // scratch: [x row | dy row | dx row | y chunk | 2 zeros | x chunk | g chunk | 2 zeros]
  // The zeros are CONV's padding: before the chunk start for X, past its end for G.
  float* xrow_buf = scratch.data();
  float* dyrow_buf = xrow_buf + H;
  float* dxrow_buf = dyrow_buf + H;
  float* ychunk = dxrow_buf + H;
  float* conv_x = ychunk + C + 2;
  float* gchunk = conv_x + C;

  for (int64_t n = row_begin; n < row_end; ++n) {
    const raw* xin = static_cast<const raw*>(p.x) + n * job.x_stride;
    const raw* dyin = static_cast<const raw*>(p.dy) + n * job.dy_stride;
    raw* dxout = static_cast<raw*>(p.dx) + n * job.dx_stride;
    const float* xrow;
    const float* dyrow;
    float* dxrow;
    if constexpr (kFloat) {
      xrow = xin;
      dyrow = dyin;
      dxrow = dxout;
    } else {
      cpu::load_row<S>(xin, xrow_buf, H);
      cpu::load_row<S>(dyin, dyrow_buf, H);
      xrow = xrow_buf;
      dyrow = dyrow_buf;
      dxrow = dxrow_buf;
    }
    for (int32_t s = 0; s < p.num_seeds; ++s) {
      const SeedPlan& plan = job.plans[s];
      const int64_t off = static_cast<int64_t>(s) * C;
      const float* x = xrow + off;
      float* dx = dxrow + off;
      const bool is_conv = plan.kind == static_cast<int32_t>(Kind::conv);
      const bool neighbours = is_conv && (plan.blend || plan.grads);
      if (neighbours) {
        std::memcpy(conv_x, x, static_cast<std::size_t>(C) * sizeof(float));
        x = conv_x;
      }

      const float* g = dyrow + off;
      if (clamp.enabled || clip || neighbours) {
        if (clamp.enabled) {
          // The forward's Y before its clamp, recomputed bit for bit.
          const float* y = x;
          if (plan.blend) {
            cpu::blend_chunk(plan, x, ychunk, C);
            y = ychunk;
          }
#pragma omp simd
          for (int64_t j = 0; j < C; ++j) {
            gchunk[j] = ((clamp.lo <= y[j]) & (y[j] <= clamp.hi)) ? g[j] : 0.0f;
          }
        } else {
          std::memcpy(gchunk, g, static_cast<std::size_t>(C) * sizeof(float));
        }
        if (clip) {
          float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
          for (int64_t j = 0; j < C; ++j) ss += gchunk[j] * gchunk[j];
          const float factor = p.clip_norm / (std::sqrt(ss) + 1e-6f);
          if (factor < 1.0f) {
#pragma omp simd
            for (int64_t j = 0; j < C; ++j) gchunk[j] *= factor;
          }
        }
        g = gchunk;
      }

      float* acc = acc_block + off;
      GradPartial& part = parts[s];
      switch (plan.kind) {
        case static_cast<int32_t>(Kind::residual): residual_chunk(plan, g, dx, acc, C, part); break;
        case static_cast<int32_t>(Kind::attention): attention_chunk(plan, x, g, dx, acc, C); break;
        case static_cast<int32_t>(Kind::mlp): mlp_chunk(plan, x, g, dx, acc, C, part); break;
        default: conv_chunk(plan, x, g, dx, acc, C, part); break;
      }
      chunk_grad_stats(dx, C, part);
    }
    if constexpr (!kFloat) cpu::store_row<S>(dxrow_buf, dxout, H);
  }
}

template <typename S>
void backward_typed(const BackwardParams& p) {
  const int64_t N = p.rows, H = p.hidden;
  const int32_t num_seeds = p.num_seeds;
  const int64_t C = H / num_seeds;
  const int32_t B = p.registry.num_blueprints;
  std::vector<SeedPlan> plans(static_cast<std::size_t>(num_seeds));
  std::vector<float> vectors(static_cast<std::size_t>(H));
  cpu::make_plans(p.seeds, p.registry, num_seeds, C, plans.data(), vectors.data());

  const BackwardJob job{p, C, p.x_row_stride > 0 ? p.x_row_stride : H,
                        p.dy_row_stride > 0 ? p.dy_row_stride : H,
                        p.dx_row_stride > 0 ? p.dx_row_stride : H, plans.data()};
  const int64_t rows_per_block = cpu::block_rows(N);
  const int64_t blocks = cpu::block_count(N);
  std::vector<GradPartial> parts(static_cast<std::size_t>(blocks * num_seeds));
  std::vector<float> acc(static_cast<std::size_t>(blocks * H), 0.0f);
  const int threads = cpu::resolve_threads(p.num_threads);

#pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 1)
  {
    std::vector<float> scratch(static_cast<std::size_t>(3 * H + 3 * C + 4), 0.0f);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      backward_block<S>(job, b * rows_per_block, std::min(N, (b + 1) * rows_per_block),
                        parts.data() + b * num_seeds, acc.data() + b * H, scratch);
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
          // q = a Σ_n G⊙X; dw = p ⊙ (q - <p,q>); Σ G⊙(T - X) = Σ_j (p_j - 1) Σ_n (G⊙X)_j.
          double pq = 0.0;
          for (int64_t j = 0; j < C; ++j) pq += plan.vec[j] * (ga * total_acc[static_cast<std::size_t>(j)]);
          for (int64_t j = 0; j < C; ++j) {
            const double q = ga * total_acc[static_cast<std::size_t>(j)];
            dw[j] += plan.vec[j] * (q - pq);
            dalpha += (static_cast<double>(plan.vec[j]) - 1.0) * total_acc[static_cast<std::size_t>(j)];
          }
          break;
        }
        case static_cast<int32_t>(Kind::mlp):
          for (int64_t j = 0; j < C; ++j) dw[j] += ga * sigma * total_acc[static_cast<std::size_t>(j)];
          dsigma += ga * total.dsigma;
          dalpha = total.dalpha;
          break;
        default:
          for (int64_t k = 0; k < 3; ++k) dw[k] += ga * sigma * total_acc[static_cast<std::size_t>(k)];
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
  switch (p.dtype) {
    case DType::f32: backward_typed<cpu::F32>(p); return;
    case DType::bf16: backward_typed<cpu::BF16>(p); return;
    case DType::f16: backward_typed<cpu::F16>(p); return;
    case DType::f64: break;
  }
  KASMINA_FAIL(ErrorKind::type, "the cpu backend does not take ", dtype_name(p.dtype),
               " (float64 is reference-only)");
}

std::string describe_backward_cpu(const BackwardParams& p) {
  std::ostringstream os;
  os << "cpu: one pass, " << cpu::resolve_threads(p.num_threads) << " threads, "
     << cpu::block_rows(p.rows) << "-row blocks, "
     << (p.dtype == DType::f32 ? "fp32" : p.dtype == DType::bf16 ? "bf16" : "fp16")
     << " storage, backward+grad stats";
  return os.str();
}

}  // namespace kasmina::detail
