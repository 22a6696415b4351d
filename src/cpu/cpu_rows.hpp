// The row kernels of the fast CPU backend, compiled once per instruction set:
// cpu_rows_generic.cpp (baseline x86-64, SSE2) and cpu_rows_avx2.cpp (AVX2 +
// F16C under `#pragma GCC target`) each define KASMINA_CPU_ISA and include
// this file after all other headers, so every function here lands in its own
// namespace per ISA (the two copies never merge at link time), while the
// inline functions of the headers stay baseline code that is inlined into
// both. The sources are compiled with -fno-trapping-math (selects vectorise)
// and -ffp-contract=off (no FMA contraction: the forward blend and the
// backward clamp mask must give the same bits wherever they are inlined).
//
// The row loops (forward_rows, backward_rows) are shared; what they do per
// row chunk is a policy: on the generic path the omp simd loops below
// (GenericForwardChunks, GenericBackwardChunks), on the AVX2 path the
// intrinsics of cpu_chunks_avx2.hpp (one sweep per chunk; see there).
//
// Generic forward, per row chunk of C values (all in L1): one sweep over X
// for sum, min/max, dead and non-finite counts and ||x||^2; one sweep that
// writes the blended Y and sums the squared deviations from the chunk mean
// (two-pass, no E[x^2]-E[x]^2), ||y||^2 and Y's non-finite test; one sweep
// for the drift's ||x/|x| - y/|y|||^2. Backward: one sweep writes dX and sums
// its statistics, one adds the blueprint sums, one sums dX's squared
// deviations.
#ifndef KASMINA_CPU_ISA
#error "define KASMINA_CPU_ISA (the namespace of this instruction set) before including cpu_rows.hpp"
#endif

namespace kasmina::detail::cpu::KASMINA_CPU_ISA {

namespace {

// Storage rows to and from float32, once per row.
template <typename S>
inline void load_row(const typename S::raw* src, float* dst, int64_t n) {
  int64_t j = 0;
#if defined(KASMINA_CPU_F16C)
  if constexpr (S::dtype == DType::f16) {
    // Exact; a signalling NaN comes back quieted, which no result can tell
    // (copies move raw bits, arithmetic quiets NaNs anyway).
    for (; j + 8 <= n; j += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
      _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
    }
  }
#endif
#pragma omp simd
  for (int64_t k = j; k < n; ++k) dst[k] = S::load(src[k]);
}

template <typename S>
inline void store_row(const float* src, typename S::raw* dst, int64_t n) {
  int64_t j = 0;
#if defined(KASMINA_CPU_F16C)
  if constexpr (S::dtype == DType::f16) {
    // Round to nearest even; NaN keeps its sign and upper payload, quieted;
    // the same bits as storage::float_to_f16_bits.
    for (; j + 8 <= n; j += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), h);
    }
  }
#endif
  if constexpr (S::dtype == DType::bf16) {
    // storage::float_to_bf16_bits written as one select, so that it
    // vectorises: round to nearest even, NaN keeps its upper payload, quieted.
#pragma omp simd
    for (int64_t k = j; k < n; ++k) {
      const uint32_t f = std::bit_cast<uint32_t>(src[k]);
      const uint32_t rounded = (f + 0x7fffu + ((f >> 16) & 1u)) >> 16;
      const uint32_t quiet_nan = (f >> 16) | 0x0040u;
      dst[k] = static_cast<uint16_t>((f & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
    }
    return;
  }
#pragma omp simd
  for (int64_t k = j; k < n; ++k) dst[k] = S::store(src[k]);
}

// T of each kind as a blend functor: Y = a*T + (1-a)*X. x must have two
// readable zeros before x[0] for CONV. Forward and the backward clamp mask
// both use these, so the mask sees the very bits the forward clamped. MLP and
// CONV take a*sigma (and CONV a*sigma*w_k) as one factor per call instead of
// two multiplications per value (conv_taps); 0 * Inf still gives NaN where
// a, sigma or w_k is 0, as in a*(sigma*T).
struct BlendResidual {
  const float* v;
  float a, om;
  float operator()(const float* x, int64_t j) const { return a * (x[j] + v[j]) + om * x[j]; }
};
struct BlendAttention {
  const float* v;
  float a, om;
  float operator()(const float* x, int64_t j) const { return a * (x[j] * v[j]) + om * x[j]; }
};
struct BlendMlp {
  const float* v;
  float a_sigma, om;
  float operator()(const float* x, int64_t j) const {
    const float h = x[j] * v[j];
    return a_sigma * (h > 0.0f ? h : 0.0f) + om * x[j];
  }
};
struct BlendConv {
  float c0, c1, c2, om;  // conv_taps
  float operator()(const float* x, int64_t j) const {
    return (c0 * x[j] + c1 * x[j - 1] + c2 * x[j - 2]) + om * x[j];
  }
};

// CONV's taps times a*sigma, the factors of BlendConv (and of the AVX2
// VecConv, which must see the same bits).
struct ConvTaps {
  float c0, c1, c2;
};
inline ConvTaps conv_taps(const SeedPlan& p) {
  const float a_sigma = p.a * p.sigma;
  return {a_sigma * p.vec[0], a_sigma * p.vec[1], a_sigma * p.vec[2]};
}

// Calls fn with the blend functor of the plan's kind.
template <typename Fn>
inline void with_blend(const SeedPlan& p, Fn&& fn) {
  switch (p.kind) {
    case static_cast<int32_t>(Kind::residual): fn(BlendResidual{p.vec, p.a, p.one_minus_a}); break;
    case static_cast<int32_t>(Kind::attention): fn(BlendAttention{p.vec, p.a, p.one_minus_a}); break;
    case static_cast<int32_t>(Kind::mlp): fn(BlendMlp{p.vec, p.a * p.sigma, p.one_minus_a}); break;
    default: {
      const ConvTaps c = conv_taps(p);
      fn(BlendConv{c.c0, c.c1, c.c2, p.one_minus_a});
      break;
    }
  }
}

// Y of one row chunk into y (unclamped), no statistics.
inline void blend_chunk(const SeedPlan& p, const float* x, float* y, int64_t n) {
  with_blend(p, [&](const auto& t) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = t(x, j);
  });
}

// Statistics of the finite values of a chunk that holds a non-finite value
// (rare): masked sweeps. Returns the chunk's non-finite count.
inline int64_t masked_statistics(const float* x, int64_t n, float dead_threshold, TelemetryPartial& part) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  float sum = 0.0f, lo = inf, hi = -inf;
  int32_t count = 0, dead = 0;
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
  if (count > 0) {
    const float mean = sum / static_cast<float>(count);
    float m2 = 0.0f;
#pragma omp simd reduction(+ : m2)
    for (int64_t j = 0; j < n; ++j) {
      const float d = finite(x[j]) ? x[j] - mean : 0.0f;
      m2 += d * d;
    }
    part.moments.merge(count, mean, m2);
  }
  part.min = std::min(part.min, lo);
  part.max = std::max(part.max, hi);
  part.dead += dead;
  part.nonfinite += n - count;
  return n - count;
}

// First sweep of an all-finite chunk's statistics; `bad` turns NaN as soon as
// one value is NaN or +-Inf, and the caller then takes the masked path.
struct XSums {
  float sum, bad, lo, hi, xx;
  int32_t dead;
};

inline XSums x_sums(const float* x, int64_t n, float dead_threshold) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  float sum = 0.0f, bad = 0.0f, lo = inf, hi = -inf, xx = 0.0f;
  int32_t dead = 0;
#pragma omp simd reduction(+ : sum, bad, dead, xx) reduction(min : lo) reduction(max : hi)
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    sum += v;
    bad += v - v;
    xx += v * v;
    dead += static_cast<int32_t>(std::fabs(v) <= dead_threshold);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  return {sum, bad, lo, hi, xx, dead};
}

inline void add_finite_sums(const XSums& s, float m2, float mean, int64_t n, TelemetryPartial& part) {
  part.moments.merge(static_cast<double>(n), mean, m2);
  part.min = std::min(part.min, s.lo);
  part.max = std::max(part.max, s.hi);
  part.dead += s.dead;
}

inline double drift_f64(const float* x, const float* y, int64_t n);

// 1 - cos(x, y) of one row chunk whose x is all finite, given ||x||^2 and
// ||y||^2 in float32 and y's non-finite test.
inline double chunk_drift(const float* x, const float* y, int64_t n, float xx, float yy, float ybad) {
  // ybad is NaN as soon as one y is NaN or +-Inf: that row's cos is 1.
  if (!(ybad == 0.0f)) return 0.0;
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
  return drift_f64(x, y, n);
}

// Squares that underflow or overflow float32: redo the row in float64, which
// also tells an all-zero row (cos = 1) from a tiny one.
inline double drift_f64(const float* x, const float* y, int64_t n) {
  double dxy = 0.0, dxx = 0.0, dyy = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    dxy += static_cast<double>(x[j]) * y[j];
    dxx += static_cast<double>(x[j]) * x[j];
    dyy += static_cast<double>(y[j]) * y[j];
  }
  if (dxx == 0.0 || dyy == 0.0 || !std::isfinite(dxx) || !std::isfinite(dyy)) return 0.0;
  return 1.0 - dxy / (std::sqrt(dxx) * std::sqrt(dyy));
}

// One blending chunk whose x is all finite: Y, the squared deviations of X
// from its mean, and the drift, in two sweeps after x_sums.
template <typename Blend>
inline void blend_with_statistics(const Blend& t, const float* x, float* y, int64_t n, const XSums& s,
                                  TelemetryPartial& part) {
  const float mean = s.sum / static_cast<float>(n);
  float m2 = 0.0f, yy = 0.0f, ybad = 0.0f;
#pragma omp simd reduction(+ : m2, yy, ybad)
  for (int64_t j = 0; j < n; ++j) {
    const float d = x[j] - mean;
    m2 += d * d;
    const float v = t(x, j);
    y[j] = v;
    yy += v * v;
    ybad += v - v;
  }
  add_finite_sums(s, m2, mean, n, part);
  part.drift += chunk_drift(x, y, n, s.xx, yy, ybad);
}

// The generic chunk kernels as the row loops' policy (see forward_rows): the
// omp simd loops above, every row chunk's moments merged by Chan.
struct GenericForwardChunks {
  // CONV's blend reads x[-1], x[-2]: it needs the zero-padded copy.
  static constexpr bool kConvPadding = true;
  float dead_threshold;
  GenericForwardChunks(const ForwardJob& job, float* /*block_scratch*/)
      : dead_threshold(job.params.dead_threshold) {}

  // Statistics of a chunk that is copied.
  void copy_stats(int32_t /*seed*/, const float* x, int64_t n, TelemetryPartial& part) const {
    const XSums sums = x_sums(x, n, dead_threshold);
    if (sums.bad == 0.0f) {
      const float mean = sums.sum / static_cast<float>(n);
      float m2 = 0.0f;
#pragma omp simd reduction(+ : m2)
      for (int64_t j = 0; j < n; ++j) m2 += (x[j] - mean) * (x[j] - mean);
      add_finite_sums(sums, m2, mean, n, part);
    } else {
      masked_statistics(x, n, dead_threshold, part);
    }
  }
  // Statistics, Y (unclamped) and the drift of a blending chunk; xb is x, or
  // its copy with CONV's padding.
  void blend_stats(int32_t /*seed*/, const SeedPlan& plan, const float* x, const float* xb, float* y, int64_t n,
                   TelemetryPartial& part) const {
    const XSums sums = x_sums(x, n, dead_threshold);
    if (sums.bad == 0.0f) {
      with_blend(plan, [&](const auto& t) { blend_with_statistics(t, xb, y, n, sums, part); });
    } else {
      // The row's cos is 1 (SPEC section 4): no drift term.
      masked_statistics(x, n, dead_threshold, part);
      KASMINA_CPU_ISA::blend_chunk(plan, xb, y, n);
    }
  }
  // After every row's chunks: what the chunk calls left for the row's end.
  void end_row(TelemetryPartial* /*parts*/) const {}
  // Folds what the block kept aside into the partials.
  void finish(TelemetryPartial* /*parts*/, int32_t /*num_seeds*/, int64_t /*chunk*/) const {}
};

// Rows of one block. `Chunks` computes each chunk's statistics (and a
// blending chunk's Y); block_scratch is the scratch past the row buffers.
template <typename S, typename Chunks>
void forward_rows(const ForwardJob& job, int64_t row_begin, int64_t row_end, TelemetryPartial* parts,
                  float* scratch) {
  using raw = typename S::raw;
  constexpr bool kFloat = S::dtype == DType::f32;
  const ForwardParams& p = job.params;
  const int64_t H = p.hidden, C = job.chunk;
  const OutputClamp clamp = p.clamp;
  const raw clamp_lo_raw = S::store(clamp.lo), clamp_hi_raw = S::store(clamp.hi);
  // scratch: [x row (H) | y row (H) | 2 zeros | conv chunk (C)]; the zeros are
  // CONV's padding before the chunk start.
  float* xrow_buf = scratch;
  float* yrow = xrow_buf + H;
  float* conv_x = yrow + H + 2;
  conv_x[-1] = conv_x[-2] = 0.0f;
  Chunks stats(job, conv_x + C);
  // Without a clamp, a float32 output is written in place and a 16-bit one
  // once per row from yrow.
  const bool direct = kFloat && !clamp.enabled;
  bool stage_row = false;  // yrow holds blended chunks to store

  for (int64_t n = row_begin; n < row_end; ++n) {
    const raw* xin = static_cast<const raw*>(p.x) + n * job.x_stride;
    raw* yout = static_cast<raw*>(p.y) + n * job.y_stride;
    const float* xrow;
    if constexpr (kFloat) {
      xrow = xin;
    } else {
      load_row<S>(xin, xrow_buf, H);
      xrow = xrow_buf;
    }
    for (int32_t s = 0; s < p.num_seeds; ++s) {
      const SeedPlan& plan = job.plans[s];
      const int64_t off = static_cast<int64_t>(s) * C;
      const float* x = xrow + off;
      TelemetryPartial& part = parts[s];

      if (!plan.blend) {
        stats.copy_stats(s, x, C, part);
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
      if (Chunks::kConvPadding && plan.kind == static_cast<int32_t>(Kind::conv)) {
        // The chunk starts with zero padding: no value crosses a chunk boundary.
        std::memcpy(conv_x, x, static_cast<std::size_t>(C) * sizeof(float));
        xb = conv_x;
      }
      float* y = direct ? reinterpret_cast<float*>(yout) + off : yrow + off;
      stats.blend_stats(s, plan, x, xb, y, C, part);

      if (clamp.enabled) {
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) yrow[off + j] = std::min(std::max(y[j], clamp.lo), clamp.hi);
      }
      if (!direct) stage_row = true;
      if constexpr (kFloat) {
        if (clamp.enabled) std::memcpy(yout + off, yrow + off, static_cast<std::size_t>(C) * sizeof(float));
      }
    }
    stats.end_row(parts);
    if constexpr (!kFloat) {
      // Blended chunks go out in one conversion per run of blending seeds.
      if (stage_row) {
        int32_t s = 0;
        while (s < p.num_seeds) {
          if (!job.plans[s].blend) {
            ++s;
            continue;
          }
          int32_t e = s;
          while (e < p.num_seeds && job.plans[e].blend) ++e;
          const int64_t off = static_cast<int64_t>(s) * C;
          store_row<S>(yrow + off, yout + off, (e - s) * C);
          s = e;
        }
      }
    }
  }
  stats.finish(parts, p.num_seeds, C);
}

// Backward: dX of one row chunk with its statistics (sum, sum of squares,
// max |dX|) in the same sweep.
struct DxSums {
  float sum = 0.0f, sumsq = 0.0f, max_abs = 0.0f;
};

template <typename Fn>
inline DxSums write_dx(float* dx, int64_t n, Fn&& f) {
  float sum = 0.0f, sumsq = 0.0f, max_abs = 0.0f;
#pragma omp simd reduction(+ : sum, sumsq) reduction(max : max_abs)
  for (int64_t j = 0; j < n; ++j) {
    const float d = f(j);
    dx[j] = d;
    sum += d;
    sumsq += d * d;
    max_abs = std::max(max_abs, std::fabs(d));
  }
  return {sum, sumsq, max_abs};
}

inline void add_grad_stats(const float* dx, int64_t n, const DxSums& s, GradPartial& part) {
  // Second sweep over the L1-resident chunk: deviations from its mean.
  const float mean = s.sum / static_cast<float>(n);
  float m2 = 0.0f;
#pragma omp simd reduction(+ : m2)
  for (int64_t j = 0; j < n; ++j) {
    const float d = dx[j] - mean;
    m2 += d * d;
  }
  part.sumsq += s.sumsq;
  part.moments.merge(static_cast<double>(n), mean, m2);
  part.max_abs = std::max(part.max_abs, s.max_abs);
}

// dX and the blueprint sums of one row chunk for each kind. x has two zeros
// before x[0] and g two zeros after g[C-1] for CONV; acc is the block's
// float32 vector for the seed.
// The scalar sums take `graw`, G before the clip's factor, and `factor`
// (1 without a clip) in float64: products of two floats are exact there.
inline DxSums residual_chunk(const SeedPlan& p, const float* g, const float* graw, double factor,
                             float* dx, float* acc, int64_t n, GradPartial& part) {
  const DxSums s = write_dx(dx, n, [&](int64_t j) { return g[j]; });
  if (!p.grads) return s;
  const float* w = p.w;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += g[j];
  double gw = 0.0;
#pragma omp simd reduction(+ : gw)
  for (int64_t j = 0; j < n; ++j) gw += static_cast<double>(graw[j]) * static_cast<double>(w[j]);
  part.dsigma += factor * gw;
  return s;
}

inline DxSums attention_chunk(const SeedPlan& p, const float* x, const float* g, const float* graw,
                              double factor, float* dx, float* acc, int64_t n, GradPartial& part) {
  const float* prob = p.vec;
  const float a = p.a, om = p.one_minus_a;
  const DxSums s = p.blend ? write_dx(dx, n, [&](int64_t j) { return om * g[j] + a * (prob[j] * g[j]); })
                           : write_dx(dx, n, [&](int64_t j) { return g[j]; });
  if (!p.grads) return s;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += g[j] * x[j];
  // Σ G⊙X⊙(p - 1) in float64 (x*(p - 1) with at most one float64 rounding).
  double gd = 0.0;
#pragma omp simd reduction(+ : gd)
  for (int64_t j = 0; j < n; ++j) {
    gd += static_cast<double>(graw[j]) * (static_cast<double>(x[j]) * (static_cast<double>(prob[j]) - 1.0));
  }
  part.dalpha += factor * gd;
  return s;
}

inline DxSums mlp_chunk(const SeedPlan& p, const float* x, const float* g, const float* graw, double factor,
                        float* dx, float* acc, int64_t n, GradPartial& part) {
  const float* w = p.w;
  const float om = p.one_minus_a, a_sigma = p.a * p.sigma, sigma = p.sigma;
  const DxSums s = p.blend ? write_dx(dx, n,
                                      [&](int64_t j) {
                                        const float gm = x[j] * w[j] > 0.0f ? g[j] : 0.0f;
                                        return om * g[j] + a_sigma * (w[j] * gm);
                                      })
                           : write_dx(dx, n, [&](int64_t j) { return g[j]; });
  if (!p.grads) return s;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += x[j] * w[j] > 0.0f ? g[j] * x[j] : 0.0f;
  // Σ G relu(X w) and Σ G X; Σ G (sigma relu(X w) - X) follows.
  double g_relu = 0.0, g_x = 0.0;
#pragma omp simd reduction(+ : g_relu, g_x)
  for (int64_t j = 0; j < n; ++j) {
    const double xd = x[j];
    const double h = xd * static_cast<double>(w[j]);  // exact
    const double r = h > 0.0 ? h : 0.0;
    const double gd = graw[j];
    g_relu += gd * r;
    g_x += gd * xd;
  }
  part.dsigma += factor * g_relu;
  part.dalpha += factor * (static_cast<double>(sigma) * g_relu - g_x);
  return s;
}

inline DxSums conv_chunk(const SeedPlan& p, const float* x, const float* g, const float* graw, double factor,
                         float* dx, int64_t n, GradPartial& part) {
  if (!p.blend && !p.grads) return write_dx(dx, n, [&](int64_t j) { return g[j]; });
  // Without a blueprint there is no w to read; with one, w0..w2 exist.
  const float w0 = p.w[0], w1 = p.w[1], w2 = p.w[2];
  const float om = p.one_minus_a, a_sigma = p.a * p.sigma, sigma = p.sigma;
  const DxSums s =
      p.blend ? write_dx(dx, n,
                         [&](int64_t j) {
                           return om * g[j] + a_sigma * (w0 * g[j] + w1 * g[j + 1] + w2 * g[j + 2]);
                         })
              : write_dx(dx, n, [&](int64_t j) { return g[j]; });
  if (!p.grads) return s;
  // The taps Σ G[j] X[j-k]; Σ G conv(X) and Σ G (sigma conv(X) - X) are
  // linear in them.
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2)
  for (int64_t j = 0; j < n; ++j) {
    const double gd = graw[j];
    s0 += gd * static_cast<double>(x[j]);
    s1 += gd * static_cast<double>(x[j - 1]);
    s2 += gd * static_cast<double>(x[j - 2]);
  }
  const double g_conv = static_cast<double>(w0) * s0 + static_cast<double>(w1) * s1 +
                        static_cast<double>(w2) * s2;
  part.taps[0] += factor * s0;
  part.taps[1] += factor * s1;
  part.taps[2] += factor * s2;
  part.dsigma += factor * g_conv;
  part.dalpha += factor * (static_cast<double>(sigma) * g_conv - s0);
  return s;
}

// G of one row chunk (SPEC section 5): dy with the clamp mask and the clip
// applied, in gchunk (two zeros after it) when anything changes it or when
// CONV needs its neighbours; otherwise dy itself.
// Also sets graw (G before the clip's factor: gchunk itself, or a copy in
// graw_buf when the factor scales) and factor (the clip's factor in
// float64, 1 without one) for the scalar sums.
inline const float* form_g(const BackwardParams& p, const SeedPlan& plan, const float* x, const float* dy,
                           bool neighbours, float* ychunk, float* gchunk, float* graw_buf, int64_t C,
                           const float*& graw, double& factor) {
  const OutputClamp clamp = p.clamp;
  factor = 1.0;
  graw = dy;
  if (!(clamp.enabled || p.clip_enabled || neighbours)) return dy;
  graw = gchunk;
  if (clamp.enabled) {
    // The forward's Y before its clamp, recomputed bit for bit.
    const float* y = x;
    if (plan.blend) {
      blend_chunk(plan, x, ychunk, C);
      y = ychunk;
    }
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) {
      gchunk[j] = ((clamp.lo <= y[j]) & (y[j] <= clamp.hi)) ? dy[j] : 0.0f;
    }
  } else {
    std::memcpy(gchunk, dy, static_cast<std::size_t>(C) * sizeof(float));
  }
  if (p.clip_enabled) {
    // The row chunk's norm in float64 (squares of floats are exact there).
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < C; ++j) ss += static_cast<double>(gchunk[j]) * static_cast<double>(gchunk[j]);
    const double f = static_cast<double>(p.clip_norm) / (std::sqrt(ss) + 1e-6);
    if (f < 1.0) {
      std::memcpy(graw_buf, gchunk, static_cast<std::size_t>(C) * sizeof(float));
      graw = graw_buf;
      factor = f;
      const float ff = static_cast<float>(f);
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) gchunk[j] *= ff;
    }
  }
  return gchunk;
}

// The generic backward chunk kernels as the row loops' policy.
struct GenericBackwardChunks {
  // CONV's chunks come with two zeros before x and after g (copies).
  static constexpr bool kPaddedNeighbours = true;
  GenericBackwardChunks(const BackwardJob& /*job*/, float* /*block_scratch*/) {}

  // dX of one row chunk, its statistics and the blueprint sums. x has two
  // zeros before x[0] and g two zeros after g[n-1] for CONV.
  void chunk(int32_t /*seed*/, const SeedPlan& plan, const float* x, const float* g, const float* graw,
             double factor, float* dx, float* acc, int64_t n, GradPartial& part) const {
    DxSums sums;
    switch (plan.kind) {
      case static_cast<int32_t>(Kind::residual): sums = residual_chunk(plan, g, graw, factor, dx, acc, n, part); break;
      case static_cast<int32_t>(Kind::attention): sums = attention_chunk(plan, x, g, graw, factor, dx, acc, n, part); break;
      case static_cast<int32_t>(Kind::mlp): sums = mlp_chunk(plan, x, g, graw, factor, dx, acc, n, part); break;
      default: sums = conv_chunk(plan, x, g, graw, factor, dx, n, part); break;
    }
    add_grad_stats(dx, n, sums, part);
  }
  void end_row(GradPartial* /*parts*/) const {}
  void finish(GradPartial* /*parts*/, int32_t /*num_seeds*/, int64_t /*chunk*/) const {}
};

template <typename S, typename Chunks>
void backward_rows(const BackwardJob& job, int64_t row_begin, int64_t row_end, GradPartial* parts,
                   float* acc_block, float* scratch) {
  using raw = typename S::raw;
  constexpr bool kFloat = S::dtype == DType::f32;
  const BackwardParams& p = job.params;
  const int64_t H = p.hidden, C = job.chunk;
  // scratch: [x row | dy row | dx row | y chunk | 2 zeros | x chunk | g chunk | 2 zeros | G unclipped | 2]
  // The zeros are CONV's padding: before the chunk start for X, past its end for G.
  float* xrow_buf = scratch;
  float* dyrow_buf = xrow_buf + H;
  float* dxrow_buf = dyrow_buf + H;
  float* ychunk = dxrow_buf + H;
  float* conv_x = ychunk + C + 2;
  float* gchunk = conv_x + C;
  float* graw_buf = gchunk + C + 2;  // [C + 2]
  conv_x[-1] = conv_x[-2] = 0.0f;
  gchunk[C] = gchunk[C + 1] = 0.0f;
  Chunks chunks(job, graw_buf + C + 2);

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
      load_row<S>(xin, xrow_buf, H);
      load_row<S>(dyin, dyrow_buf, H);
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
      // CONV's neighbours past the chunk are zeros: copies with zero padding
      // where the policy reads them as plain loads (generic), or where the
      // clamp mask recomputes Y with the scalar blend (x); the AVX2 policy
      // masks them off instead, a copy and its store-forwarding stalls fewer
      // per CONV chunk.
      const bool pad_g = neighbours && Chunks::kPaddedNeighbours;
      if (neighbours && (Chunks::kPaddedNeighbours || (p.clamp.enabled && plan.blend))) {
        std::memcpy(conv_x, x, static_cast<std::size_t>(C) * sizeof(float));
        x = conv_x;
      }

      const float* graw = nullptr;
      double factor = 1.0;
      const float* g = form_g(p, plan, x, dyrow + off, pad_g, ychunk, gchunk, graw_buf, C, graw, factor);

      chunks.chunk(s, plan, x, g, graw, factor, dx, acc_block + off, C, parts[s]);
    }
    chunks.end_row(parts);
    if constexpr (!kFloat) store_row<S>(dxrow_buf, dxout, H);
  }
  chunks.finish(parts, p.num_seeds, C);
}

#if defined(KASMINA_CPU_AVX2)
#include "cpu/cpu_chunks_avx2.hpp"
using ForwardChunks = Avx2ForwardChunks;
using BackwardChunks = Avx2BackwardChunks;
#else
using ForwardChunks = GenericForwardChunks;
using BackwardChunks = GenericBackwardChunks;
#endif

}  // namespace

void forward_block(const ForwardJob& job, int64_t row_begin, int64_t row_end, TelemetryPartial* parts,
                   float* scratch) {
  switch (job.params.dtype) {
    case DType::f32: forward_rows<F32, ForwardChunks>(job, row_begin, row_end, parts, scratch); return;
    case DType::bf16: forward_rows<BF16, ForwardChunks>(job, row_begin, row_end, parts, scratch); return;
    case DType::f16: forward_rows<F16, ForwardChunks>(job, row_begin, row_end, parts, scratch); return;
    case DType::f64: return;  // refused by forward_cpu
  }
}

void backward_block(const BackwardJob& job, int64_t row_begin, int64_t row_end, GradPartial* parts,
                    float* acc_block, float* scratch) {
  switch (job.params.dtype) {
    case DType::f32: backward_rows<F32, BackwardChunks>(job, row_begin, row_end, parts, acc_block, scratch); return;
    case DType::bf16: backward_rows<BF16, BackwardChunks>(job, row_begin, row_end, parts, acc_block, scratch); return;
    case DType::f16: backward_rows<F16, BackwardChunks>(job, row_begin, row_end, parts, acc_block, scratch); return;
    case DType::f64: return;  // refused by backward_cpu
  }
}

}  // namespace kasmina::detail::cpu::KASMINA_CPU_ISA
