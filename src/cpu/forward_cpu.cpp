// Fast CPU forward (SPEC sections 3 and 4): output and telemetry in one pass
// over memory. Each row is read once; per seed chunk the statistics of X, the
// blend and the drift terms are computed while the chunk sits in L1, then the
// row is written once. Rows are processed in fixed blocks (cpu_kernels.hpp)
// whose partials merge in block order, so results are bit-identical for any
// thread count.
// Without -fno-trapping-math GCC will not turn the selects and compares of
// the row loops into vector blends, and most of them stay scalar. We never
// unmask floating-point traps, so the flag changes no result (unlike
// -ffast-math): the IEEE semantics, NaN handling and rounding are unchanged.
#pragma GCC optimize("no-trapping-math")

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

using cpu::finite;
using cpu::Moments;
using cpu::SeedPlan;

struct TelemetryPartial {
  Moments moments;
  float min = std::numeric_limits<float>::infinity();
  float max = -std::numeric_limits<float>::infinity();
  int64_t dead = 0;
  int64_t nonfinite = 0;
  double drift = 0.0;  // sum over rows of (1 - cos)

  void merge(const TelemetryPartial& o) {
    moments.merge(o.moments);
    min = std::min(min, o.min);
    max = std::max(max, o.max);
    dead += o.dead;
    nonfinite += o.nonfinite;
    drift += o.drift;
  }
};

// Statistics of the finite values of one row chunk; returns its non-finite
// count (the row's cos is then 1 by SPEC section 4). Chunks are nearly always
// all finite, so a lean loop runs first and tells by `bad` (NaN as soon as one
// value is NaN or +-Inf) whether the masked loop must run instead.
int64_t chunk_statistics(const float* x, int64_t n, float dead_threshold, TelemetryPartial& part) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  float sum = 0.0f, bad = 0.0f, lo = inf, hi = -inf;
  int32_t count = static_cast<int32_t>(n), dead = 0;
#pragma omp simd reduction(+ : sum, bad, dead) reduction(min : lo) reduction(max : hi)
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    sum += v;
    bad += v - v;
    dead += static_cast<int32_t>(std::fabs(v) <= dead_threshold);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  const bool all_finite = bad == 0.0f;
  if (!all_finite) {
    sum = 0.0f, lo = inf, hi = -inf;
    count = 0, dead = 0;
#pragma omp simd reduction(+ : sum, count, dead) reduction(min : lo) reduction(max : hi)
    for (int64_t j = 0; j < n; ++j) {
      // Branch-free (bitwise &, selects) so that the loop vectorises.
      const float v = x[j];
      const bool fin = finite(v);
      sum += fin ? v : 0.0f;
      count += static_cast<int32_t>(fin);
      dead += static_cast<int32_t>(fin & (std::fabs(v) <= dead_threshold));
      lo = std::min(lo, fin ? v : inf);
      hi = std::max(hi, fin ? v : -inf);
    }
  }
  if (count > 0) {
    // Second sweep over the L1-resident chunk: deviations from the chunk
    // mean, so no E[x^2] - E[x]^2 cancellation.
    const float mean = sum / static_cast<float>(count);
    float m2 = 0.0f;
    if (all_finite) {
#pragma omp simd reduction(+ : m2)
      for (int64_t j = 0; j < n; ++j) m2 += (x[j] - mean) * (x[j] - mean);
    } else {
#pragma omp simd reduction(+ : m2)
      for (int64_t j = 0; j < n; ++j) {
        const float d = finite(x[j]) ? x[j] - mean : 0.0f;
        m2 += d * d;
      }
    }
    part.moments.merge(count, mean, m2);
  }
  part.min = std::min(part.min, lo);
  part.max = std::max(part.max, hi);
  part.dead += dead;
  const int64_t nonfinite = n - count;
  part.nonfinite += nonfinite;
  return nonfinite;
}

// 1 - cos(x, y) of one row chunk of a blending seed whose x is all finite.
double chunk_drift(const float* x, const float* y, int64_t n) {
  float xx = 0.0f, yy = 0.0f, bad = 0.0f;
#pragma omp simd reduction(+ : xx, yy, bad)
  for (int64_t j = 0; j < n; ++j) {
    xx += x[j] * x[j];
    yy += y[j] * y[j];
    bad += y[j] - y[j];
  }
  // bad is NaN as soon as one y is NaN or +-Inf: that row's cos is 1.
  if (!(bad == 0.0f)) return 0.0;
  constexpr float kSafeLo = 1e-30f, kSafeHi = 1e30f;
  if (xx >= kSafeLo && xx <= kSafeHi && yy >= kSafeLo && yy <= kSafeHi) {
    // 1 - cos = ||x/|x| - y/|y|||^2 / 2 has no cancellation when the drift is
    // small, unlike 1 - dot/(|x||y|).
    const float ix = 1.0f / std::sqrt(xx), iy = 1.0f / std::sqrt(yy);
    float d2 = 0.0f;
#pragma omp simd reduction(+ : d2)
    for (int64_t j = 0; j < n; ++j) {
      const float d = x[j] * ix - y[j] * iy;
      d2 += d * d;
    }
    return 0.5 * static_cast<double>(d2);
  }
  // Squares that underflow or overflow float32: redo the row in float64, which
  // also tells an all-zero row (cos = 1) from a tiny one.
  double dxy = 0.0, dxx = 0.0, dyy = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    dxy += static_cast<double>(x[j]) * y[j];
    dxx += static_cast<double>(x[j]) * x[j];
    dyy += static_cast<double>(y[j]) * y[j];
  }
  if (dxx == 0.0 || dyy == 0.0 || !std::isfinite(dxx) || !std::isfinite(dyy)) return 0.0;
  return 1.0 - dxy / (std::sqrt(dxx) * std::sqrt(dyy));
}

struct ForwardJob {
  const ForwardParams& params;
  int64_t chunk;
  int64_t x_stride, y_stride;
  const SeedPlan* plans;
};

template <typename S>
void forward_block(const ForwardJob& job, int64_t row_begin, int64_t row_end,
                   TelemetryPartial* parts, std::vector<float>& scratch) {
  using raw = typename S::raw;
  constexpr bool kFloat = S::dtype == DType::f32;
  const ForwardParams& p = job.params;
  const int64_t H = p.hidden, C = job.chunk;
  const OutputClamp clamp = p.clamp;
  const raw clamp_lo_raw = S::store(clamp.lo), clamp_hi_raw = S::store(clamp.hi);
  // scratch: [x row (H) | y row (H) | 2 zeros | conv chunk (C)]; the zeros are
  // CONV's padding before the chunk start.
  float* xrow_buf = scratch.data();
  float* yrow = xrow_buf + H;
  float* conv_x = yrow + H + 2;

  for (int64_t n = row_begin; n < row_end; ++n) {
    const raw* xin = static_cast<const raw*>(p.x) + n * job.x_stride;
    raw* yout = static_cast<raw*>(p.y) + n * job.y_stride;
    const float* xrow;
    if constexpr (kFloat) {
      xrow = xin;
    } else {
      cpu::load_row<S>(xin, xrow_buf, H);
      xrow = xrow_buf;
    }
    for (int32_t s = 0; s < p.num_seeds; ++s) {
      const SeedPlan& plan = job.plans[s];
      const int64_t off = static_cast<int64_t>(s) * C;
      const float* x = xrow + off;
      TelemetryPartial& part = parts[s];
      const int64_t nonfinite = chunk_statistics(x, C, p.dead_threshold, part);

      if (!plan.blend) {
        // A copy must be bit-identical, so raw elements move, never floats.
        if (!clamp.enabled) {
          std::memcpy(yout + off, xin + off, static_cast<std::size_t>(C) * sizeof(raw));
        } else if constexpr (kFloat) {
#pragma omp simd
          for (int64_t j = 0; j < C; ++j) yout[off + j] = std::min(std::max(x[j], clamp.lo), clamp.hi);
        } else {
          for (int64_t j = 0; j < C; ++j) {
            const float v = x[j];
            yout[off + j] = v < clamp.lo ? clamp_lo_raw : (v > clamp.hi ? clamp_hi_raw : xin[off + j]);
          }
        }
        continue;
      }

      const float* xb = x;
      if (plan.kind == static_cast<int32_t>(Kind::conv)) {
        // The chunk starts with zero padding: no value crosses a chunk boundary.
        std::memcpy(conv_x, x, static_cast<std::size_t>(C) * sizeof(float));
        xb = conv_x;
      }
      float* y = (kFloat && !clamp.enabled) ? reinterpret_cast<float*>(yout) + off : yrow + off;
      cpu::blend_chunk(plan, xb, y, C);
      if (nonfinite == 0) part.drift += chunk_drift(x, y, C);

      if (clamp.enabled) {
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) yout[off + j] = S::store(std::min(std::max(y[j], clamp.lo), clamp.hi));
      } else if constexpr (!kFloat) {
        cpu::store_row<S>(y, yout + off, C);
      }
    }
  }
}

template <typename S>
void forward_typed(const ForwardParams& p) {
  const int64_t N = p.rows, H = p.hidden;
  const int32_t num_seeds = p.num_seeds;
  const int64_t C = H / num_seeds;
  std::vector<SeedPlan> plans(static_cast<std::size_t>(num_seeds));
  std::vector<float> vectors(static_cast<std::size_t>(H));
  cpu::make_plans(p.seeds, p.registry, num_seeds, C, plans.data(), vectors.data());

  const ForwardJob job{p, C, p.x_row_stride > 0 ? p.x_row_stride : H,
                       p.y_row_stride > 0 ? p.y_row_stride : H, plans.data()};
  const int64_t rows_per_block = cpu::block_rows(N);
  const int64_t blocks = cpu::block_count(N);
  std::vector<TelemetryPartial> parts(static_cast<std::size_t>(blocks * num_seeds));
  const int threads = cpu::resolve_threads(p.num_threads);

#pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 1)
  {
    std::vector<float> scratch(static_cast<std::size_t>(2 * H + 2 + C), 0.0f);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      forward_block<S>(job, b * rows_per_block, std::min(N, (b + 1) * rows_per_block),
                       parts.data() + b * num_seeds, scratch);
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
  switch (p.dtype) {
    case DType::f32: forward_typed<cpu::F32>(p); return;
    case DType::bf16: forward_typed<cpu::BF16>(p); return;
    case DType::f16: forward_typed<cpu::F16>(p); return;
    case DType::f64: break;
  }
  KASMINA_FAIL(ErrorKind::type, "the cpu backend does not take ", dtype_name(p.dtype),
               " (float64 is reference-only)");
}

std::string describe_forward_cpu(const ForwardParams& p) {
  std::ostringstream os;
  os << "cpu: one pass, " << cpu::resolve_threads(p.num_threads) << " threads, "
     << cpu::block_rows(p.rows) << "-row blocks, "
     << (p.dtype == DType::f32 ? "fp32" : p.dtype == DType::bf16 ? "bf16" : "fp16")
     << " storage, forward+telemetry";
  return os.str();
}

}  // namespace kasmina::detail
