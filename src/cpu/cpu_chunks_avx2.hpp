// The AVX2 chunk kernels: the row loops' policies of cpu_rows.hpp on the AVX2
// path. Included by cpu_rows.hpp inside its per-ISA anonymous namespace, under
// `#pragma GCC target("avx2,f16c")` (cpu_rows_avx2.cpp) only.
//
// Why intrinsics: GCC lowers every `omp simd reduction` to a store of the
// vector accumulator to the stack and a serial scalar sum, about ten per row
// chunk, which dominated a C = 48 chunk; 8-lane arrays in plain C++ were not
// kept in registers. Here the accumulators are __m256 values, the sums a chunk
// needs at once leave the registers in one batched horizontal sum, and what
// is only needed per block never leaves them per chunk:
//  - min, max, dead count (forward) and max |dX| (backward) are exact, so they
//    stay 8-lane vectors per seed for the whole block (one horizontal
//    reduction per block and seed);
//  - every all-finite row chunk has the same count C, so the block's chunk
//    moments are pooled by Welford over the chunk means (equal weights: a
//    multiplication by 1/k from a table, no division) and merged by Chan once
//    per block and seed instead of once per row;
//  - "all finite" is read off a sum of squares (finite only if every value is): a
//    chunk with an Inf or NaN, or one whose squares overflow, is re-tested
//    exactly, so the common chunk pays no finite test.
// One sweep per chunk: the moments come from the deviations from a shift
// (add_chunk_moments), the drift from y - λx (Avx2ForwardChunks::drift), each
// with a fallback in L1 where its guard sees cancellation; the forward's
// ||x||^2 is not summed but derived from the shifted sums. The forward leaves
// the scalar part of a row's chunks for the row's end (Avx2ForwardChunks),
// which does it for 8 seeds at once on vectors when no chunk of the 8 needs
// a fallback (the same operations as the scalar path, so the same bits). No
// FMA in the blend (-ffp-contract=off, no _mm256_fmadd_ps): it performs the
// very operations of the Blend* functors, so the backward's clamp mask
// (blend_chunk) sees the forward's bits; the backward's float64 sums, which
// no bits elsewhere depend on, are fused multiply-adds (wfma).
// Tails (C % 8) use masked loads and stores; masked lanes load 0, which adds
// nothing to any sum, and are excluded from min, max and the dead count.
// CONV's neighbours outside the chunk (x before it, g after it) are masked
// off the same way, so neither pass copies the chunk for zero padding.
#pragma once

// The 8 lanes of a full vector, or the first `rem` of a tail.
inline __m256i tail_mask(int64_t rem) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

struct FullLanes {
  __m256 load(const float* p) const { return _mm256_loadu_ps(p); }
  __m256 load_masked(const float* p, __m256i m) const { return _mm256_maskload_ps(p, m); }
  void store(float* p, __m256 v) const { _mm256_storeu_ps(p, v); }
  __m256 keep(__m256 v) const { return v; }
  __m256 keep_or(__m256 v, __m256 /*fill*/) const { return v; }
};

struct TailLanes {
  __m256i mask;
  __m256 load(const float* p) const { return _mm256_maskload_ps(p, mask); }
  __m256 load_masked(const float* p, __m256i m) const { return _mm256_maskload_ps(p, _mm256_and_si256(m, mask)); }
  void store(float* p, __m256 v) const { _mm256_maskstore_ps(p, mask, v); }
  __m256 keep(__m256 v) const { return _mm256_and_ps(v, _mm256_castsi256_ps(mask)); }
  __m256 keep_or(__m256 v, __m256 fill) const { return _mm256_blendv_ps(fill, v, _mm256_castsi256_ps(mask)); }
};

// body(j, lanes) for every 8 values of [0, n), the last vector masked.
template <typename Body>
inline void sweep(int64_t n, Body&& body) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) body(j, FullLanes{});
  if (j < n) body(j, TailLanes{tail_mask(n - j)});
}

// Sums of a and b, each in a fixed order.
inline void hsum2(__m256 a, __m256 b, float& sa, float& sb) {
  const __m256 t = _mm256_hadd_ps(a, b);  // a01 a23 b01 b23 | a45 a67 b45 b67
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  r = _mm_hadd_ps(r, r);  // a b a b
  sa = _mm_cvtss_f32(r);
  sb = _mm_cvtss_f32(_mm_shuffle_ps(r, r, 1));
}

// Sums of a, b, c, d in the lanes 0..3, each in a fixed order.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

inline float hmin(__m256 v) {
  alignas(32) float out[8];
  _mm256_store_ps(out, v);
  float m = out[0];
  for (int i = 1; i < 8; ++i) m = std::min(m, out[i]);
  return m;
}
inline float hmax(__m256 v) {
  alignas(32) float out[8];
  _mm256_store_ps(out, v);
  float m = out[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, out[i]);
  return m;
}
inline int64_t hsum_epi32(__m256i v) {
  alignas(32) int32_t out[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), v);
  int64_t total = 0;
  for (int i = 0; i < 8; ++i) total += out[i];
  return total;
}

// True when one value of v[0, n) is NaN or +-Inf (v - v is NaN exactly then).
inline bool any_nonfinite(const float* v, int64_t n) {
  __m256 bad = _mm256_setzero_ps();
  sweep(n, [&](int64_t j, const auto& lanes) {
    const __m256 x = lanes.load(v + j);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_NEQ_UQ));
  });
  return _mm256_movemask_ps(bad) != 0;
}

// Moments of a block's all-finite row chunks of one seed, all of the same
// count: Welford over the chunk means with equal weights, plus the sum of the
// chunks' own M2. The pooled M2 is m2 + C * spread.
struct PooledMoments {
  double chunks = 0.0, mean = 0.0, spread = 0.0, m2 = 0.0;

  void add(double chunk_mean, double chunk_m2) {
    // 1/k for k = 1..kMaxBlockRows, correctly rounded at compile time.
    static constexpr auto kInverse = [] {
      std::array<double, kMaxBlockRows + 1> t{};
      for (int64_t k = 1; k <= kMaxBlockRows; ++k) t[static_cast<std::size_t>(k)] = 1.0 / static_cast<double>(k);
      return t;
    }();
    chunks += 1.0;
    const double m = chunk_mean;
    const double delta = m - mean;
    mean += delta * kInverse[static_cast<std::size_t>(chunks)];
    spread += delta * (m - mean);
    m2 += chunk_m2;
  }
  void merge_into(Moments& moments, int64_t chunk) const {
    if (chunks == 0.0) return;
    const double c = static_cast<double>(chunk);
    moments.merge(chunks * c, mean, m2 + c * spread);
  }
};

// add_chunk_moments' chunk mean and M2 for 4 chunks at once from their
// float32 sums sd = Σ(v-k), dd = Σ(v-k)^2 and shifts k, in its very
// operations; returns the lanes whose M2 keeps at least a quarter of dd
// (no fallback needed) as a movemask.
inline int chunk_moments4(__m256d sd, __m256d dd, __m256d k, double inv_n, __m256d& mean, __m256d& m2) {
  const __m256d mean_d = _mm256_mul_pd(sd, _mm256_set1_pd(inv_n));
  m2 = _mm256_sub_pd(dd, _mm256_mul_pd(sd, mean_d));
  mean = _mm256_add_pd(k, mean_d);
  return _mm256_movemask_pd(_mm256_cmp_pd(m2, _mm256_mul_pd(_mm256_set1_pd(0.25), dd), _CMP_GE_OQ));
}

// PooledMoments::add on 4 seeds at once, their moments as arrays over the
// seeds (at chunks, mean, spread, m2); 1/k by a division is the table's
// value, so the same bits.
inline void pooled_add4(double* chunks, double* mean, double* spread, double* m2, __m256d chunk_mean,
                        __m256d chunk_m2) {
  const __m256d count = _mm256_add_pd(_mm256_loadu_pd(chunks), _mm256_set1_pd(1.0));
  const __m256d old_mean = _mm256_loadu_pd(mean);
  const __m256d delta = _mm256_sub_pd(chunk_mean, old_mean);
  const __m256d new_mean =
      _mm256_add_pd(old_mean, _mm256_mul_pd(delta, _mm256_div_pd(_mm256_set1_pd(1.0), count)));
  _mm256_storeu_pd(chunks, count);
  _mm256_storeu_pd(mean, new_mean);
  _mm256_storeu_pd(spread,
                   _mm256_add_pd(_mm256_loadu_pd(spread), _mm256_mul_pd(delta, _mm256_sub_pd(chunk_mean, new_mean))));
  _mm256_storeu_pd(m2, _mm256_add_pd(_mm256_loadu_pd(m2), chunk_m2));
}

// Per-seed state of one block, in the block scratch (32-byte aligned; after
// the S states come S chunk records, kSeedStateFloats per seed in all).
// The forward's pooled moments, shift (the previous chunk mean, NaN at the
// block start), λ (the previous chunk's <x,y>/||x||^2, NaN at the block start)
// and drift sum (added to the partial once per block) are arrays over the
// seeds after the records (5 doubles, 2 floats per seed), so that the row's
// end updates 8 seeds at once (Avx2ForwardChunks::finish_vector).
struct ForwardSeedState {
  __m256 lo, hi;
  __m256i dead;
};
// The backward's pooled moments and shift are arrays over the seeds after
// the records in the same way (4 doubles, 1 float per seed), so that the
// row's end updates 4 seeds at once (Avx2BackwardChunks::moments_vector).
struct BackwardSeedState {
  __m256 max_abs;
};

template <typename State>
inline State* seed_states(float* block_scratch) {
  const auto at = reinterpret_cast<std::uintptr_t>(block_scratch);
  return reinterpret_cast<State*>((at + 31) & ~static_cast<std::uintptr_t>(31));
}

// Squared deviations of v[0, n) from mean.
inline float deviations(const float* v, int64_t n, float mean) {
  const __m256 m = _mm256_set1_ps(mean);
  __m256 m2 = _mm256_setzero_ps();
  sweep(n, [&](int64_t j, const auto& lanes) {
    const __m256 d = lanes.keep(_mm256_sub_ps(lanes.load(v + j), m));
    m2 = _mm256_add_ps(m2, _mm256_mul_ps(d, d));
  });
  float total, unused;
  hsum2(m2, m2, total, unused);
  return total;
}

// The Blend* functors of cpu_rows.hpp on 8 lanes, the same operations in the
// same order; xv = x[j..j+8).
struct VecResidual {
  const float* v;
  __m256 a, om;
  template <typename L>
  __m256 operator()(__m256 xv, const float* /*x*/, int64_t j, const L& lanes) const {
    return _mm256_add_ps(_mm256_mul_ps(a, _mm256_add_ps(xv, lanes.load(v + j))), _mm256_mul_ps(om, xv));
  }
};
struct VecAttention {
  const float* v;
  __m256 a, om;
  template <typename L>
  __m256 operator()(__m256 xv, const float* /*x*/, int64_t j, const L& lanes) const {
    return _mm256_add_ps(_mm256_mul_ps(a, _mm256_mul_ps(xv, lanes.load(v + j))), _mm256_mul_ps(om, xv));
  }
};
struct VecMlp {
  const float* v;
  __m256 a_sigma, om;
  template <typename L>
  __m256 operator()(__m256 xv, const float* /*x*/, int64_t j, const L& lanes) const {
    const __m256 h = _mm256_mul_ps(xv, lanes.load(v + j));
    const __m256 relu = _mm256_and_ps(h, _mm256_cmp_ps(h, _mm256_setzero_ps(), _CMP_GT_OQ));
    return _mm256_add_ps(_mm256_mul_ps(a_sigma, relu), _mm256_mul_ps(om, xv));
  }
};
// CONV's left neighbours of x[j..j+8): x[j-1..] and x[j-2..], with x[-1],
// x[-2] as zeros: the chunk's first vector reads them through masked loads
// (masked lanes neither load nor fault), so x needs no zero-padded copy.
template <typename L>
inline void conv_left(const float* x, int64_t j, const L& lanes, __m256& x1, __m256& x2) {
  if (j == 0) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    x1 = lanes.load_masked(x - 1, _mm256_cmpgt_epi32(lane, _mm256_setzero_si256()));
    x2 = lanes.load_masked(x - 2, _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(1)));
  } else {
    x1 = lanes.load(x + j - 1);
    x2 = lanes.load(x + j - 2);
  }
}
// The forward skips BlendConv's padded copy (conv_left).
struct VecConv {
  __m256 c0, c1, c2, om;  // conv_taps
  template <typename L>
  __m256 operator()(__m256 xv, const float* x, int64_t j, const L& lanes) const {
    __m256 x1, x2;
    conv_left(x, j, lanes, x1, x2);
    const __m256 t = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(c0, xv), _mm256_mul_ps(c1, x1)),
                                   _mm256_mul_ps(c2, x2));
    return _mm256_add_ps(t, _mm256_mul_ps(om, xv));
  }
};

template <typename Fn>
[[gnu::always_inline]] inline void with_vec_blend(const SeedPlan& p, Fn&& fn) {
  const __m256 a = _mm256_set1_ps(p.a), om = _mm256_set1_ps(p.one_minus_a);
  switch (p.kind) {
    case static_cast<int32_t>(Kind::residual): fn(VecResidual{p.vec, a, om}); break;
    case static_cast<int32_t>(Kind::attention): fn(VecAttention{p.vec, a, om}); break;
    case static_cast<int32_t>(Kind::mlp): fn(VecMlp{p.vec, _mm256_set1_ps(p.a * p.sigma), om}); break;
    default: {
      const ConvTaps c = conv_taps(p);
      fn(VecConv{_mm256_set1_ps(c.c0), _mm256_set1_ps(c.c1), _mm256_set1_ps(c.c2), om});
      break;
    }
  }
}

// Moments of one all-finite row chunk from sums of the deviations from a
// shift k (the seed's previous chunk mean): sd = Σ(v-k), dd = Σ(v-k)^2. With k
// near the mean there is no cancellation; where there is (dd - sd^2/n below
// dd/4: more than 2 bits lost), or dd overflowed, the chunk is redone two-pass
// in L1. `shift` becomes the chunk mean, the next chunk's shift.
inline void add_chunk_moments(const float* v, int64_t n, double inv_n, float k, float sd, float dd,
                              PooledMoments& pooled, float& shift) {
  const double mean_d = static_cast<double>(sd) * inv_n;
  const double m2 = static_cast<double>(dd) - static_cast<double>(sd) * mean_d;
  double mean = static_cast<double>(k) + mean_d;
  if (m2 >= 0.25 * static_cast<double>(dd) && finite(dd)) {
    pooled.add(mean, m2);
  } else {
    const float mean_f = static_cast<float>(mean);
    pooled.add(mean_f, deviations(v, n, mean_f));
    mean = mean_f;
  }
  shift = static_cast<float>(mean);
}

// The shift of a chunk: the seed's previous chunk mean, or for the block's
// first chunk its first value (finite or not: a non-finite one makes the
// chunk's sums non-finite, which the caller tests anyway).
inline float chunk_shift(float previous, const float* v) { return finite(previous) ? previous : v[0]; }

// Sums of 8 vectors: lane i of the result is the sum of the i-th vector.
inline __m256 hsum8(__m256 a, __m256 b, __m256 c, __m256 d, __m256 e, __m256 f, __m256 g, __m256 h) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(e, f), _mm256_hadd_ps(g, h));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}


// What one row chunk's sweep leaves for the row's end (Avx2ForwardChunks).
struct ForwardChunkRecord {
  __m256 lo, hi;
  __m256i dead;
  // Σ(x-k), Σ(x-k)^2, then blending only ||z||^2, <x,z> (z = y - λx), then
  // k, and blending only λ, 1 (one row of the 8 x 8 transpose in fast_drifts).
  // Stored once at the sweep's end and read as scalars long after, so no
  // load waits on a store.
  alignas(32) float sums[8];
  const float* x;
  const float* y;  // the unclamped Y of a blending chunk
  float shift;
  float lambda;
  float drift;        // fast_drifts: 1 - cos, or NaN for drift() to decide
  float next_lambda;  // fast_drifts: <x,y>/||x||^2
  bool blend;
};
// The block scratch holds S states, then S records.
static_assert(sizeof(ForwardSeedState) + sizeof(ForwardChunkRecord) + 5 * sizeof(double) + 2 * sizeof(float) <=
              kSeedStateFloats * sizeof(float));

// The forward in two phases per row: each chunk's sweep (blend, store, sums)
// only records its sums; at the row's end the scalar work (finite test,
// moments, drift, fallbacks) runs for all seeds at once, while the row is
// still in L1. The sweeps of a row are then independent of each other and of
// the scalar work (float64 arithmetic, a square root, branches), which the
// processor overlaps instead of waiting on each chunk's tail. With a clamp,
// the unclamped Y is gone by the row's end, so each chunk is finished at once.
class Avx2ForwardChunks {
 public:
  // VecConv reads no padding (see there).
  static constexpr bool kConvPadding = false;

 private:
  // The transposed sums and the results of fast_drifts, one lane per seed.
  struct DriftLanes {
    __m256 sd, dd, k, blend, drift, next;
  };

 public:
  Avx2ForwardChunks(const ForwardJob& job, float* block_scratch)
      : dead_threshold_(job.params.dead_threshold),
        threshold_(_mm256_set1_ps(job.params.dead_threshold)),
        num_seeds_(job.params.num_seeds),
        chunk_(job.chunk),
        inv_chunk_(1.0 / static_cast<double>(job.chunk)),
        defer_(!job.params.clamp.enabled),
        states_(seed_states<ForwardSeedState>(block_scratch)),
        records_(reinterpret_cast<ForwardChunkRecord*>(states_ + job.params.num_seeds)),
        chunks_(reinterpret_cast<double*>(records_ + job.params.num_seeds)),
        mean_(chunks_ + job.params.num_seeds),
        spread_(mean_ + job.params.num_seeds),
        m2_(spread_ + job.params.num_seeds),
        drift_(m2_ + job.params.num_seeds),
        shift_(reinterpret_cast<float*>(drift_ + job.params.num_seeds)),
        lambda_(shift_ + job.params.num_seeds) {
    const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    for (int32_t s = 0; s < num_seeds_; ++s) {
      states_[s].lo = inf;
      states_[s].hi = _mm256_sub_ps(_mm256_setzero_ps(), inf);
      states_[s].dead = _mm256_setzero_si256();
      chunks_[s] = mean_[s] = spread_[s] = m2_[s] = drift_[s] = 0.0;
      shift_[s] = lambda_[s] = std::numeric_limits<float>::quiet_NaN();
    }
  }

  // One sweep: shifted sums, min, max, dead count.
  void copy_stats(int32_t seed, const float* x, int64_t n, TelemetryPartial& part) const {
    ForwardChunkRecord& r = records_[seed];
    r.shift = chunk_shift(shift_[seed], x);
    r.x = x;
    r.y = nullptr;
    r.blend = false;
    copy_sweep(x, n, _mm256_set1_ps(r.shift), threshold_, r);
    if (!defer_) finish_chunk(seed, part);
  }

  // One sweep: Y (written to y whatever the values), shifted sums, min, max,
  // dead count, ||z||^2, <x,z>.
  [[gnu::always_inline]] void blend_stats(int32_t seed, const SeedPlan& plan, const float* x, const float* xb,
                                          float* y, int64_t n, TelemetryPartial& part) const {
    ForwardChunkRecord& r = records_[seed];
    r.shift = chunk_shift(shift_[seed], x);
    r.x = x;
    r.y = y;
    r.blend = true;
    const float lambda = lambda_[seed];
    r.lambda = finite(lambda) ? lambda : first_lambda(plan, n);
    const __m256 kv = _mm256_set1_ps(r.shift), lv = _mm256_set1_ps(r.lambda);
    // always_inline on the lambda too: without it GCC keeps CONV's sweep out
    // of line, a call per CONV chunk with the row loop's vectors spilled.
    with_vec_blend(plan, [&](const auto& t) __attribute__((always_inline)) {
      blend_sweep(t, xb, y, n, kv, lv, threshold_, r);
    });
    if (!defer_) finish_chunk(seed, part);
  }

  void end_row(TelemetryPartial* parts) const {
    if (!defer_) return;
    for (int32_t s = 0; s < num_seeds_; s += 8) {
      const int32_t count = std::min<int32_t>(8, num_seeds_ - s);
      const DriftLanes lanes = fast_drifts(records_ + s, count, static_cast<float>(chunk_));
      if (count == 8 && finish_vector(s, lanes)) continue;
      for (int32_t i = 0; i < count; ++i) finish_scalar(s + i, parts[s + i]);
    }
  }

  void finish(TelemetryPartial* parts, int32_t num_seeds, int64_t chunk) const {
    for (int32_t s = 0; s < num_seeds; ++s) {
      const ForwardSeedState& st = states_[s];
      TelemetryPartial& part = parts[s];
      PooledMoments{chunks_[s], mean_[s], spread_[s], m2_[s]}.merge_into(part.moments, chunk);
      part.drift += drift_[s];
      part.min = std::min(part.min, hmin(st.lo));
      part.max = std::max(part.max, hmax(st.hi));
      part.dead += hsum_epi32(st.dead);
    }
  }

 private:
  // Min, max and dead count of a chunk's values on 8 lanes.
  template <typename L>
  [[gnu::always_inline]] static inline void extremes(__m256 v, const L& lanes, __m256 threshold, __m256& lo,
                                                     __m256& hi, __m256i& dead) {
    lo = _mm256_min_ps(lo, lanes.keep_or(v, _mm256_set1_ps(std::numeric_limits<float>::infinity())));
    hi = _mm256_max_ps(hi, lanes.keep_or(v, _mm256_set1_ps(-std::numeric_limits<float>::infinity())));
    const __m256 is_dead = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), v), threshold, _CMP_LE_OQ);
    dead = _mm256_sub_epi32(dead, _mm256_castps_si256(lanes.keep(is_dead)));
  }

  // The sweeps keep their accumulators as locals, so that they stay in
  // registers even where GCC does not inline the sweep.
  static void copy_sweep(const float* x, int64_t n, __m256 kv, __m256 threshold, ForwardChunkRecord& r) {
    __m256 sd = _mm256_setzero_ps(), dd = _mm256_setzero_ps();
    __m256 lo = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    __m256 hi = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256i dead = _mm256_setzero_si256();
    sweep(n, [&](int64_t j, const auto& lanes) {
      const __m256 v = lanes.load(x + j);
      const __m256 d = lanes.keep(_mm256_sub_ps(v, kv));
      sd = _mm256_add_ps(sd, d);
      dd = _mm256_add_ps(dd, _mm256_mul_ps(d, d));
      extremes(v, lanes, threshold, lo, hi, dead);
    });
    const __m256 zero = _mm256_setzero_ps();
    r.lo = lo;
    r.hi = hi;
    r.dead = dead;
    const __m128 upper = _mm_move_ss(_mm_setzero_ps(), _mm256_castps256_ps128(kv));  // k 0 0 0
    _mm256_store_ps(r.sums, _mm256_insertf128_ps(_mm256_castps128_ps256(hsum4(sd, dd, zero, zero)), upper, 1));
  }

  template <typename T>
  [[gnu::always_inline]] static void blend_sweep(const T& t, const float* xb, float* y, int64_t n, __m256 kv, __m256 lv,
                          __m256 threshold, ForwardChunkRecord& r) {
    __m256 sd = _mm256_setzero_ps(), dd = _mm256_setzero_ps();
    __m256 zz = _mm256_setzero_ps(), xz = _mm256_setzero_ps();
    __m256 lo = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    __m256 hi = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256i dead = _mm256_setzero_si256();
    sweep(n, [&](int64_t j, const auto& lanes) {
      const __m256 v = lanes.load(xb + j);
      const __m256 d = lanes.keep(_mm256_sub_ps(v, kv));
      sd = _mm256_add_ps(sd, d);
      dd = _mm256_add_ps(dd, _mm256_mul_ps(d, d));
      extremes(v, lanes, threshold, lo, hi, dead);
      const __m256 out = t(v, xb, j, lanes);
      lanes.store(y + j, out);
      const __m256 z = lanes.keep(_mm256_sub_ps(out, _mm256_mul_ps(lv, v)));
      zz = _mm256_add_ps(zz, _mm256_mul_ps(z, z));
      xz = _mm256_add_ps(xz, _mm256_mul_ps(v, z));
    });
    r.lo = lo;
    r.hi = hi;
    r.dead = dead;
    // ||x||^2 is not summed: fast_drifts derives it from Σ(x-k) and Σ(x-k)^2.
    const __m128 kl = _mm_unpacklo_ps(_mm256_castps256_ps128(kv), _mm256_castps256_ps128(lv));  // k λ k λ
    const __m128 upper = _mm_movelh_ps(kl, _mm_setr_ps(1.0f, 0.0f, 0.0f, 0.0f));             // k λ 1 0
    _mm256_store_ps(r.sums, _mm256_insertf128_ps(_mm256_castps128_ps256(hsum4(sd, dd, zz, xz)), upper, 1));
  }

  void finish_chunk(int32_t seed, TelemetryPartial& part) const {
    fast_drifts(records_ + seed, 1, static_cast<float>(chunk_));
    finish_scalar(seed, part);
  }

  // The drift of up to 8 recorded blending chunks at once, 8 lanes of float32
  // (the formula of drift() below; every term is positive, so float32 keeps
  // about 1e-6 relative), into each record's `drift`, or NaN where the lane
  // is not usable (a sum out of range, non-finite, or q^2 below a quarter of
  // ||z||^2, or ||x||^2 cancelled) and drift() must decide; also returned
  // as lanes with the moments' sums for finish_vector.
  static DriftLanes fast_drifts(ForwardChunkRecord* records, int32_t count, float n) {
    // The records' sums as rows of an 8 x 8 matrix, transposed: one vector
    // per field, one lane per seed. Lanes past `count` are zero, lanes of copy
    // chunks compute harmless values that nobody reads.
    __m256 row[8];
    for (int32_t i = 0; i < 8; ++i) row[i] = i < count ? _mm256_load_ps(records[i].sums) : _mm256_setzero_ps();
    const __m256 t0 = _mm256_unpacklo_ps(row[0], row[1]), t1 = _mm256_unpackhi_ps(row[0], row[1]);
    const __m256 t2 = _mm256_unpacklo_ps(row[2], row[3]), t3 = _mm256_unpackhi_ps(row[2], row[3]);
    const __m256 t4 = _mm256_unpacklo_ps(row[4], row[5]), t5 = _mm256_unpackhi_ps(row[4], row[5]);
    const __m256 t6 = _mm256_unpacklo_ps(row[6], row[7]), t7 = _mm256_unpackhi_ps(row[6], row[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    const __m256 vsd = _mm256_permute2f128_ps(u0, u4, 0x20), vk = _mm256_permute2f128_ps(u0, u4, 0x31);
    const __m256 vdd = _mm256_permute2f128_ps(u1, u5, 0x20), vlambda = _mm256_permute2f128_ps(u1, u5, 0x31);
    const __m256 vz2 = _mm256_permute2f128_ps(u2, u6, 0x20), vxz = _mm256_permute2f128_ps(u3, u7, 0x20);
    const __m256 vblend = _mm256_permute2f128_ps(u2, u6, 0x31);
    // ||x||^2 = Σ(x-k)^2 + n k^2 + 2k Σ(x-k); a lane where the last term
    // cancels more than 2 bits of the others (k far from the mean) goes to
    // drift(), which sums ||x||^2 itself.
    const __m256 nk2 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(n), vk), vk);
    const __m256 cross = _mm256_mul_ps(_mm256_add_ps(vk, vk), vsd);
    const __m256 base = _mm256_add_ps(vdd, nk2);
    const __m256 vx2 = _mm256_add_ps(base, cross);
    const __m256 bound =
        _mm256_mul_ps(_mm256_set1_ps(0.25f), _mm256_add_ps(base, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), cross)));
    const __m256 lo = _mm256_set1_ps(1e-30f), hi = _mm256_set1_ps(1e30f), zero = _mm256_setzero_ps();
    const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), vx2);
    const __m256 ratio = _mm256_add_ps(vlambda, _mm256_mul_ps(vxz, inv));
    const __m256 q2 = _mm256_sub_ps(vz2, _mm256_mul_ps(_mm256_mul_ps(vxz, vxz), inv));
    const __m256 p = _mm256_mul_ps(ratio, _mm256_sqrt_ps(vx2));
    const __m256 ny = _mm256_sqrt_ps(_mm256_add_ps(_mm256_mul_ps(p, p), q2));
    const __m256 positive = _mm256_cmp_ps(p, zero, _CMP_GT_OQ);
    const __m256 num = _mm256_blendv_ps(_mm256_sub_ps(ny, p), q2, positive);
    const __m256 den = _mm256_blendv_ps(ny, _mm256_mul_ps(ny, _mm256_add_ps(ny, p)), positive);
    __m256 ok = _mm256_and_ps(_mm256_cmp_ps(vx2, lo, _CMP_GE_OQ), _mm256_cmp_ps(vx2, hi, _CMP_LE_OQ));
    ok = _mm256_and_ps(ok, _mm256_and_ps(_mm256_cmp_ps(vz2, lo, _CMP_GE_OQ), _mm256_cmp_ps(vz2, hi, _CMP_LE_OQ)));
    ok = _mm256_and_ps(ok, _mm256_cmp_ps(q2, _mm256_mul_ps(_mm256_set1_ps(0.25f), vz2), _CMP_GE_OQ));
    ok = _mm256_and_ps(ok, _mm256_cmp_ps(vx2, bound, _CMP_GE_OQ));
    const __m256 nan = _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN());
    alignas(32) float drift[8], next[8];
    const __m256 vdrift = _mm256_blendv_ps(nan, _mm256_div_ps(num, den), ok);
    _mm256_store_ps(drift, vdrift);
    _mm256_store_ps(next, ratio);
    for (int32_t i = 0; i < count; ++i) {
      records[i].drift = drift[i];
      records[i].next_lambda = next[i];
    }
    return {vsd, vdd, vk, vblend, vdrift, ratio};
  }

  // The scalar part of 8 recorded chunks (seeds s..s+8) at once, in the very
  // operations of finish_scalar, when every one is all finite and needs no
  // fallback; returns false (nothing done) otherwise.
  bool finish_vector(int32_t s, const DriftLanes& d) const {
    const __m256 blend = _mm256_cmp_ps(d.blend, _mm256_set1_ps(1.0f), _CMP_EQ_OQ);
    // Σ(x-k)^2 finite (<= FLT_MAX; NaN fails), a blending chunk's drift known.
    const __m256 fin = _mm256_cmp_ps(d.dd, _mm256_set1_ps(std::numeric_limits<float>::max()), _CMP_LE_OQ);
    const __m256 drift_ok = _mm256_or_ps(_mm256_andnot_ps(blend, _mm256_castsi256_ps(_mm256_set1_epi32(-1))),
                                         _mm256_cmp_ps(d.drift, d.drift, _CMP_ORD_Q));
    if (_mm256_movemask_ps(_mm256_and_ps(fin, drift_ok)) != 0xff) return false;
    __m256d mean[2], m2[2];
    for (int h = 0; h < 2; ++h) {
      const __m128 sdh = h ? _mm256_extractf128_ps(d.sd, 1) : _mm256_castps256_ps128(d.sd);
      const __m128 ddh = h ? _mm256_extractf128_ps(d.dd, 1) : _mm256_castps256_ps128(d.dd);
      const __m128 kh = h ? _mm256_extractf128_ps(d.k, 1) : _mm256_castps256_ps128(d.k);
      if (chunk_moments4(_mm256_cvtps_pd(sdh), _mm256_cvtps_pd(ddh), _mm256_cvtps_pd(kh), inv_chunk_, mean[h],
                         m2[h]) != 0xf) {
        return false;
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int32_t i = s + 4 * h;
      pooled_add4(chunks_ + i, mean_ + i, spread_ + i, m2_ + i, mean[h], m2[h]);
      _mm_storeu_ps(shift_ + i, _mm256_cvtpd_ps(mean[h]));
      // Copy chunks add no drift: their lanes add +0.
      const __m256 dsel = _mm256_and_ps(d.drift, blend);
      const __m128 dh = h ? _mm256_extractf128_ps(dsel, 1) : _mm256_castps256_ps128(dsel);
      _mm256_storeu_pd(drift_ + i, _mm256_add_pd(_mm256_loadu_pd(drift_ + i), _mm256_cvtps_pd(dh)));
    }
    _mm256_storeu_ps(lambda_ + s, _mm256_blendv_ps(_mm256_loadu_ps(lambda_ + s), d.next, blend));
    for (int32_t i = s; i < s + 8; ++i) {
      const ForwardChunkRecord& r = records_[i];
      ForwardSeedState& st = states_[i];
      st.lo = _mm256_min_ps(st.lo, r.lo);
      st.hi = _mm256_max_ps(st.hi, r.hi);
      st.dead = _mm256_add_epi32(st.dead, r.dead);
    }
    return true;
  }

  // The scalar part of one recorded chunk.
  [[gnu::always_inline]] void finish_scalar(int32_t seed, TelemetryPartial& part) const {
    const ForwardChunkRecord& r = records_[seed];
    ForwardSeedState& st = states_[seed];
    const float* sums = r.sums;
    // Σ(x-k)^2 is finite unless a value is NaN or +-Inf, or the squares
    // overflow.
    if (!finite(sums[1]) && any_nonfinite(r.x, chunk_)) {
      // A blending row's cos is 1 (SPEC section 4): no drift term.
      masked_statistics(r.x, chunk_, dead_threshold_, part);
      return;
    }
    st.lo = _mm256_min_ps(st.lo, r.lo);
    st.hi = _mm256_max_ps(st.hi, r.hi);
    st.dead = _mm256_add_epi32(st.dead, r.dead);
    PooledMoments pooled{chunks_[seed], mean_[seed], spread_[seed], m2_[seed]};
    add_chunk_moments(r.x, chunk_, inv_chunk_, r.shift, sums[0], sums[1], pooled, shift_[seed]);
    chunks_[seed] = pooled.chunks;
    mean_[seed] = pooled.mean;
    spread_[seed] = pooled.spread;
    m2_[seed] = pooled.m2;
    if (!r.blend) return;
    if (finite(r.drift)) {
      drift_[seed] += r.drift;
      lambda_[seed] = r.next_lambda;
    } else {
      // ||x||^2 summed here: the one fast_drifts derived may have cancelled.
      const float xx = deviations(r.x, chunk_, 0.0f);
      drift_[seed] += drift(r.x, r.y, chunk_, r.lambda, xx, sums[2], sums[3], lambda_[seed]);
    }
  }

  // λ for a seed's first chunk of a block, where no previous <x,y>/||x||^2
  // exists: what the blend scales x by, roughly (a wrong guess only costs
  // that chunk the second drift sweep).
  static float first_lambda(const SeedPlan& plan, int64_t n) {
    switch (plan.kind) {
      case static_cast<int32_t>(Kind::residual): return 1.0f;
      case static_cast<int32_t>(Kind::attention): return plan.one_minus_a + plan.a / static_cast<float>(n);
      case static_cast<int32_t>(Kind::mlp): {
        float w_abs = 0.0f;
        for (int64_t j = 0; j < n; ++j) w_abs += std::fabs(plan.vec[j]);
        return plan.one_minus_a + plan.a * plan.sigma * w_abs / static_cast<float>(2 * n);
      }
      default: return plan.one_minus_a + plan.a * plan.sigma * plan.vec[0];
    }
  }

  // 1 - cos(x, y) of a row chunk whose x is all finite, from ||x||^2, and
  // ||z||^2, <x,z> of z = y - λx (chunk_drift's rules). With p = <x,y>/|x|
  // and q^2 = ||z||^2 - <x,z>^2/||x||^2 (y's part orthogonal to x), |y|^2 =
  // p^2 + q^2 and 1 - cos = q^2 / (|y| (|y| + p)) for p > 0: no cancellation
  // however small the drift, as long as λ is close enough to <x,y>/||x||^2
  // that q^2 keeps at least a quarter of ||z||^2 (at most 2 bits lost); the
  // rows of a seed change little, so the previous row's ratio serves. Else a
  // second sweep. `next_lambda` gets this chunk's <x,y>/||x||^2.
  static double drift(const float* x, const float* y, int64_t n, float lambda, float xx, float zz, float xz,
                      float& next_lambda) {
    constexpr float kSafeLo = 1e-30f, kSafeHi = 1e30f;
    if (!finite(zz) && any_nonfinite(y, n)) return 0.0;  // a non-finite y: cos is 1
    if (!(xx >= kSafeLo && xx <= kSafeHi)) return drift_f64(x, y, n);
    const double x2 = xx, z2 = zz, x_z = xz;
    const double ratio = static_cast<double>(lambda) + x_z / x2;
    next_lambda = static_cast<float>(ratio);
    const double q2 = z2 - x_z * x_z / x2;
    if (zz >= kSafeLo && zz <= kSafeHi && q2 >= 0.25 * z2) {
      const double nx = std::sqrt(x2);
      const double p = ratio * nx;
      const double ny = std::sqrt(p * p + q2);
      return p > 0.0 ? q2 / (ny * (ny + p)) : (ny - p) / ny;
    }
    return drift_sweeps(x, y, n, xx);
  }

  // chunk_drift with ||y||^2 summed first: 1 - cos = ||x/|x| - y/|y|||^2 / 2.
  static double drift_sweeps(const float* x, const float* y, int64_t n, float xx) {
    __m256 acc = _mm256_setzero_ps();
    sweep(n, [&](int64_t j, const auto& lanes) {
      const __m256 v = lanes.load(y + j);
      acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    });
    float yy, unused;
    hsum2(acc, acc, yy, unused);
    constexpr float kSafeLo = 1e-30f, kSafeHi = 1e30f;
    if (!(yy >= kSafeLo && yy <= kSafeHi)) return drift_f64(x, y, n);
    const __m256 ix = _mm256_set1_ps(1.0f / std::sqrt(xx)), iy = _mm256_set1_ps(1.0f / std::sqrt(yy));
    __m256 d2 = _mm256_setzero_ps();
    sweep(n, [&](int64_t j, const auto& lanes) {
      const __m256 d = _mm256_sub_ps(_mm256_mul_ps(lanes.load(x + j), ix), _mm256_mul_ps(lanes.load(y + j), iy));
      d2 = _mm256_add_ps(d2, _mm256_mul_ps(d, d));
    });
    float total;
    hsum2(d2, d2, total, unused);
    return 0.5 * static_cast<double>(total);
  }

  float dead_threshold_;
  __m256 threshold_;
  int32_t num_seeds_;
  int64_t chunk_;
  double inv_chunk_;
  bool defer_;
  ForwardSeedState* states_;
  ForwardChunkRecord* records_;
  double *chunks_, *mean_, *spread_, *m2_, *drift_;
  float *shift_, *lambda_;
};

// What one backward row chunk's sweep leaves for the row's end: Σ(dX-k),
// Σ(dX-k)^2, ||dX||^2; the kind's scalar sums in float64 (DESIGN 45: dsigma,
// dalpha, CONV's three taps) and the clip's factor they take.
struct BackwardChunkRecord {
  enum class Tail : int32_t { none, dsigma, dalpha, dsigma_dalpha, conv };
  alignas(32) float sums[4];
  double scalar[5];
  double factor;
  const float* dx;
  float shift;
  Tail tail;
};

// 8 floats as two vectors of 4 doubles (exact).
struct Wide {
  __m256d lo, hi;
};
inline Wide widen(__m256 v) {
  return {_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))};
}
inline Wide wmul(const Wide& a, const Wide& b) {
  return {_mm256_mul_pd(a.lo, b.lo), _mm256_mul_pd(a.hi, b.hi)};
}
inline Wide wsub(const Wide& a, const Wide& b) {
  return {_mm256_sub_pd(a.lo, b.lo), _mm256_sub_pd(a.hi, b.hi)};
}
inline Wide wadd(const Wide& a, const Wide& b) {
  return {_mm256_add_pd(a.lo, b.lo), _mm256_add_pd(a.hi, b.hi)};
}
// acc + a b with one rounding: the backward's float64 sums only, never Y's
// blend (whose bits the clamp mask recomputes with the scalar functors).
inline Wide wfma(const Wide& acc, const Wide& a, const Wide& b) {
  return {_mm256_fmadd_pd(a.lo, b.lo, acc.lo), _mm256_fmadd_pd(a.hi, b.hi, acc.hi)};
}
// The 8 partial sums added in a fixed order.
inline double wtotal(const Wide& a) {
  // ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7)) on the vector unit:
  // h = [t0+t1, t4+t5, t2+t3, t6+t7], then its halves added, then the two
  // lanes (the same additions in the same order as the scalar tree).
  const __m256d h = _mm256_hadd_pd(a.lo, a.hi);
  const __m128d q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
  return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
}
static_assert(sizeof(BackwardSeedState) + sizeof(BackwardChunkRecord) + 4 * sizeof(double) + sizeof(float) <=
              kSeedStateFloats * sizeof(float));

class Avx2BackwardChunks {
 public:
  // CONV's neighbours past the chunk (x before it, g after it) are masked
  // off as zeros: no padded copies (kind_chunk).
  static constexpr bool kPaddedNeighbours = false;
  Avx2BackwardChunks(const BackwardJob& job, float* block_scratch)
      : chunk_(job.chunk),
        inv_chunk_(1.0 / static_cast<double>(job.chunk)),
        num_seeds_(job.params.num_seeds),
        states_(seed_states<BackwardSeedState>(block_scratch)),
        records_(reinterpret_cast<BackwardChunkRecord*>(states_ + job.params.num_seeds)),
        chunks_(reinterpret_cast<double*>(records_ + job.params.num_seeds)),
        mean_(chunks_ + job.params.num_seeds),
        spread_(mean_ + job.params.num_seeds),
        m2_(spread_ + job.params.num_seeds),
        shift_(reinterpret_cast<float*>(m2_ + job.params.num_seeds)) {
    for (int32_t s = 0; s < job.params.num_seeds; ++s) {
      states_[s].max_abs = _mm256_setzero_ps();
      chunks_[s] = mean_[s] = spread_[s] = m2_[s] = 0.0;
      shift_[s] = std::numeric_limits<float>::quiet_NaN();
    }
  }

  void chunk(int32_t seed, const SeedPlan& plan, const float* x, const float* g, const float* graw, double factor,
             float* dx, float* acc, int64_t n, GradPartial& /*part: end_row*/) const {
    records_[seed].factor = factor;
    const bool blend = plan.blend, grads = plan.grads;
    switch (plan.kind) {
      case static_cast<int32_t>(Kind::residual):
        if (grads) return kind_chunk<Kind::residual, false, true>(seed, plan, x, g, graw, dx, acc, n);
        return kind_chunk<Kind::residual, false, false>(seed, plan, x, g, graw, dx, acc, n);
      case static_cast<int32_t>(Kind::attention):
        if (blend && grads) return kind_chunk<Kind::attention, true, true>(seed, plan, x, g, graw, dx, acc, n);
        if (blend) return kind_chunk<Kind::attention, true, false>(seed, plan, x, g, graw, dx, acc, n);
        if (grads) return kind_chunk<Kind::attention, false, true>(seed, plan, x, g, graw, dx, acc, n);
        return kind_chunk<Kind::attention, false, false>(seed, plan, x, g, graw, dx, acc, n);
      case static_cast<int32_t>(Kind::mlp):
        if (blend && grads) return kind_chunk<Kind::mlp, true, true>(seed, plan, x, g, graw, dx, acc, n);
        if (blend) return kind_chunk<Kind::mlp, true, false>(seed, plan, x, g, graw, dx, acc, n);
        if (grads) return kind_chunk<Kind::mlp, false, true>(seed, plan, x, g, graw, dx, acc, n);
        return kind_chunk<Kind::mlp, false, false>(seed, plan, x, g, graw, dx, acc, n);
      default:
        if (blend && grads) return kind_chunk<Kind::conv, true, true>(seed, plan, x, g, graw, dx, acc, n);
        if (blend) return kind_chunk<Kind::conv, true, false>(seed, plan, x, g, graw, dx, acc, n);
        if (grads) return kind_chunk<Kind::conv, false, true>(seed, plan, x, g, graw, dx, acc, n);
        return kind_chunk<Kind::conv, false, false>(seed, plan, x, g, graw, dx, acc, n);
    }
  }

  // The scalar part of the row's chunks, for all seeds at once (as in the
  // forward, so that the sweeps do not wait on each chunk's tail).
  void end_row(GradPartial* parts) const {
    for (int32_t s = 0; s < num_seeds_; ++s) {
      const BackwardChunkRecord& r = records_[s];
      GradPartial& part = parts[s];
      const float* sums = r.sums;
      const double* sc = r.scalar;
      const double f = r.factor;
      part.sumsq += sums[2];
      switch (r.tail) {
        case BackwardChunkRecord::Tail::dsigma: part.dsigma += f * sc[0]; break;
        case BackwardChunkRecord::Tail::dalpha: part.dalpha += f * sc[1]; break;
        case BackwardChunkRecord::Tail::dsigma_dalpha:
          part.dsigma += f * sc[0];
          part.dalpha += f * sc[1];
          break;
        case BackwardChunkRecord::Tail::conv:
          part.dsigma += f * sc[0];
          part.dalpha += f * sc[1];
          part.taps[0] += f * sc[2];
          part.taps[1] += f * sc[3];
          part.taps[2] += f * sc[4];
          break;
        case BackwardChunkRecord::Tail::none: break;
      }
    }
    for (int32_t s = 0; s < num_seeds_; s += 4) {
      const int32_t count = std::min<int32_t>(4, num_seeds_ - s);
      if (count == 4 && moments_vector(s)) continue;
      for (int32_t i = s; i < s + count; ++i) {
        const BackwardChunkRecord& r = records_[i];
        PooledMoments pooled{chunks_[i], mean_[i], spread_[i], m2_[i]};
        add_chunk_moments(r.dx, chunk_, inv_chunk_, r.shift, r.sums[0], r.sums[1], pooled, shift_[i]);
        chunks_[i] = pooled.chunks;
        mean_[i] = pooled.mean;
        spread_[i] = pooled.spread;
        m2_[i] = pooled.m2;
      }
    }
  }

  void finish(GradPartial* parts, int32_t num_seeds, int64_t chunk) const {
    for (int32_t s = 0; s < num_seeds; ++s) {
      PooledMoments{chunks_[s], mean_[s], spread_[s], m2_[s]}.merge_into(parts[s].moments, chunk);
      parts[s].max_abs = std::max(parts[s].max_abs, hmax(states_[s].max_abs));
    }
  }

 private:
  // add_chunk_moments of the recorded chunks of seeds s..s+4 at once, in its
  // very operations (1/k by a division is PooledMoments' table value), when
  // none needs the two-pass fallback; returns false (nothing done)
  // otherwise.
  bool moments_vector(int32_t s) const {
    const BackwardChunkRecord* r = records_ + s;
    const __m256d sd = _mm256_setr_pd(r[0].sums[0], r[1].sums[0], r[2].sums[0], r[3].sums[0]);
    const __m256d dd = _mm256_setr_pd(r[0].sums[1], r[1].sums[1], r[2].sums[1], r[3].sums[1]);
    const __m256d k = _mm256_setr_pd(r[0].shift, r[1].shift, r[2].shift, r[3].shift);
    // dd finite (|dd| <= FLT_MAX; NaN fails), as add_chunk_moments tests.
    const __m256d abs_dd = _mm256_andnot_pd(_mm256_set1_pd(-0.0), dd);
    if (_mm256_movemask_pd(_mm256_cmp_pd(abs_dd, _mm256_set1_pd(std::numeric_limits<float>::max()), _CMP_LE_OQ)) !=
        0xf) {
      return false;
    }
    __m256d mean, m2;
    if (chunk_moments4(sd, dd, k, inv_chunk_, mean, m2) != 0xf) return false;
    pooled_add4(chunks_ + s, mean_ + s, spread_ + s, m2_ + s, mean, m2);
    _mm_storeu_ps(shift_ + s, _mm256_cvtpd_ps(mean));
    return true;
  }

  // dX (the formulas of residual_chunk .. conv_chunk, same operations), its
  // shifted sums (add_chunk_moments), sum of squares and max |dX|, and the
  // blueprint sums, in one sweep.
  template <Kind K, bool Blend, bool Grads>
  void kind_chunk(int32_t seed, const SeedPlan& p, const float* x, const float* g, const float* graw, float* dx,
                  float* acc, int64_t n) const {
    const __m256 zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    const __m256 om = _mm256_set1_ps(p.one_minus_a), a = _mm256_set1_ps(p.a);
    const __m256 a_sigma = _mm256_set1_ps(p.a * p.sigma);
    __m256 w0 = zero, w1 = zero, w2 = zero;
    if constexpr (K == Kind::conv && (Blend || Grads)) {
      w0 = _mm256_set1_ps(p.w[0]);
      w1 = _mm256_set1_ps(p.w[1]);
      w2 = _mm256_set1_ps(p.w[2]);
    }
    BackwardSeedState& st = states_[seed];
    // The shift is the previous chunk's mean of dX; at the block start, 0
    // (gradients are mostly centred; the fallback covers the rest).
    const float k = finite(shift_[seed]) ? shift_[seed] : 0.0f;
    const __m256 kv = _mm256_set1_ps(k);
    __m256 sd = zero, dd = zero, sq = zero;
    // The scalar sums in float64 from G before the clip (graw): dsigma,
    // dalpha, CONV's taps 0..2.
    const __m256d dz = _mm256_setzero_pd();
    Wide q0{dz, dz}, q1{dz, dz}, q2{dz, dz}, q3{dz, dz}, q4{dz, dz};
    const __m256d one_d = _mm256_set1_pd(1.0);
    __m256 max_abs = st.max_abs;
    sweep(n, [&](int64_t j, const auto& lanes) {
      const __m256 gv = lanes.load(g + j);
      __m256 d = gv;
      if constexpr (K == Kind::residual) {
        if constexpr (Grads) {
          lanes.store(acc + j, _mm256_add_ps(lanes.load(acc + j), gv));
          q0 = wfma(q0, widen(lanes.load(graw + j)), widen(lanes.load(p.w + j)));
        }
      } else if constexpr (K == Kind::attention) {
        if constexpr (Blend) {
          d = _mm256_add_ps(_mm256_mul_ps(om, gv), _mm256_mul_ps(a, _mm256_mul_ps(lanes.load(p.vec + j), gv)));
        }
        if constexpr (Grads) {
          const __m256 xv = lanes.load(x + j);
          lanes.store(acc + j, _mm256_add_ps(lanes.load(acc + j), _mm256_mul_ps(gv, xv)));
          // G X (p - 1) in float64 (at most one rounding in x (p - 1)).
          const Wide pm = widen(lanes.load(p.vec + j));
          const Wide pm1{_mm256_sub_pd(pm.lo, one_d), _mm256_sub_pd(pm.hi, one_d)};
          q1 = wfma(q1, widen(lanes.load(graw + j)), wmul(widen(xv), pm1));
        }
      } else if constexpr (K == Kind::mlp) {
        if constexpr (Blend || Grads) {
          const __m256 xv = lanes.load(x + j), wv = lanes.load(p.w + j);
          const __m256 h = _mm256_mul_ps(xv, wv);
          const __m256 m = _mm256_cmp_ps(h, zero, _CMP_GT_OQ);
          if constexpr (Blend) {
            d = _mm256_add_ps(_mm256_mul_ps(om, gv), _mm256_mul_ps(a_sigma, _mm256_mul_ps(wv, _mm256_and_ps(gv, m))));
          }
          if constexpr (Grads) {
            lanes.store(acc + j, _mm256_add_ps(lanes.load(acc + j), _mm256_and_ps(_mm256_mul_ps(gv, xv), m)));
            // relu(x w) with x w exact in float64.
            // Σ G relu(x w) and Σ G x; dalpha = sigma * the first - the second.
            const Wide xd = widen(xv);
            const Wide hd = wmul(xd, widen(wv));
            const Wide r{_mm256_max_pd(hd.lo, dz), _mm256_max_pd(hd.hi, dz)};
            const Wide gd = widen(lanes.load(graw + j));
            q0 = wfma(q0, gd, r);
            q1 = wfma(q1, gd, xd);
          }
        }
      } else {
        if constexpr (Blend) {
          // G[j+1], G[j+2]: zeros past the chunk's end (masked lanes
          // neither load nor fault).
          __m256 g1, g2;
          if (j + 10 <= n) {
            g1 = _mm256_loadu_ps(g + j + 1);
            g2 = _mm256_loadu_ps(g + j + 2);
          } else {
            g1 = _mm256_maskload_ps(g + j + 1, tail_mask(n - j - 1));
            g2 = _mm256_maskload_ps(g + j + 2, tail_mask(n - j - 2));
          }
          const __m256 conv = _mm256_add_ps(
              _mm256_add_ps(_mm256_mul_ps(w0, gv), _mm256_mul_ps(w1, g1)), _mm256_mul_ps(w2, g2));
          d = _mm256_add_ps(_mm256_mul_ps(om, gv), _mm256_mul_ps(a_sigma, conv));
        }
        if constexpr (Grads) {
          // The taps Σ G[j] X[j-k]; dsigma and dalpha follow from them
          // (linear in X) at the chunk's end. X[-1], X[-2]: zeros.
          __m256 x1, x2;
          conv_left(x, j, lanes, x1, x2);
          const Wide gd = widen(lanes.load(graw + j));
          q2 = wfma(q2, gd, widen(lanes.load(x + j)));
          q3 = wfma(q3, gd, widen(x1));
          q4 = wfma(q4, gd, widen(x2));
        }
      }
      lanes.store(dx + j, d);
      const __m256 dk = lanes.keep(_mm256_sub_ps(d, kv));
      sd = _mm256_add_ps(sd, dk);
      dd = _mm256_add_ps(dd, _mm256_mul_ps(dk, dk));
      sq = _mm256_add_ps(sq, _mm256_mul_ps(d, d));
      // NaN |dX| leaves the maximum as it was, like std::max(max, |d|).
      max_abs = _mm256_max_ps(_mm256_andnot_ps(sign, d), max_abs);
    });
    st.max_abs = max_abs;
    BackwardChunkRecord& r = records_[seed];
    _mm_store_ps(r.sums, hsum4(sd, dd, sq, zero));
    if constexpr (Grads) {
      const double sg = p.sigma;
      if constexpr (K == Kind::conv) {
        const double t0 = wtotal(q2), t1 = wtotal(q3), t2 = wtotal(q4);
        const double gc = static_cast<double>(p.w[0]) * t0 + static_cast<double>(p.w[1]) * t1 +
                          static_cast<double>(p.w[2]) * t2;  // Σ G conv(X)
        r.scalar[0] = gc;
        r.scalar[1] = sg * gc - t0;  // Σ G (sigma conv(X) - X)
        r.scalar[2] = t0;
        r.scalar[3] = t1;
        r.scalar[4] = t2;
      } else if constexpr (K == Kind::mlp) {
        const double g_relu = wtotal(q0);
        r.scalar[0] = g_relu;
        r.scalar[1] = sg * g_relu - wtotal(q1);  // Σ G (sigma relu(X w) - X)
      } else {
        r.scalar[0] = wtotal(q0);
        r.scalar[1] = wtotal(q1);
      }
    }
    r.dx = dx;
    r.shift = k;
    using Tail = BackwardChunkRecord::Tail;
    r.tail = !Grads                  ? Tail::none
             : K == Kind::residual  ? Tail::dsigma
             : K == Kind::attention ? Tail::dalpha
             : K == Kind::mlp       ? Tail::dsigma_dalpha
                                    : Tail::conv;
  }

  int64_t chunk_;
  double inv_chunk_;
  int32_t num_seeds_;
  BackwardSeedState* states_;
  BackwardChunkRecord* records_;
  double* chunks_;  // PooledMoments of each seed, as arrays over the seeds
  double* mean_;
  double* spread_;
  double* m2_;
  float* shift_;
};
