// The forward's per-CTA body, shared by its kernels (STYLE.md rule 3: one
// file per op and architecture, one copy of the math): the generic kernel
// and the streaming entry point (forward_cuda.cu), the Hopper TMA kernel
// (forward_tma_sm90.cu). Each kernel owns only how a row pass's input
// reaches the threads (global loads, or a shared-memory stage a TMA copy
// filled); the per-element math, the telemetry and the deterministic
// finish are here, so every variant with the same launch plan computes the
// same bits. Included by those .cu files only.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "cuda/common.cuh"

// Timeline hooks (timeline.cuh): empty unless the including file defines them.
#ifndef KASMINA_FWD_TL
#define KASMINA_FWD_TL(slot) ((void)0)
#define KASMINA_FWD_TL_LAST(last) ((void)0)
#define KASMINA_FWD_TL_WHERE(seed, tile, passes) ((void)0)
#endif

namespace kasmina::cuda {

// One CTA's (and, merged, one seed's) telemetry over the input chunk.
struct FwdStats {
  Moments mom;
  float lo;
  float hi;
  unsigned long long dead;
  unsigned long long nonfinite;
  double drift_sum;  // sum over rows of 1 - cos(X[n,:], Y[n,:]) (blending seeds only)

  __device__ __forceinline__ static FwdStats identity() {
    return {Moments::identity(), INFINITY, -INFINITY, 0ull, 0ull, 0.0};
  }
  __device__ __forceinline__ void merge(const FwdStats& b) {
    mom.merge(b.mom);
    lo = fminf(lo, b.lo);
    hi = fmaxf(hi, b.hi);
    dead += b.dead;
    nonfinite += b.nonfinite;
    drift_sum += b.drift_sum;
  }
};

// A 64-bit count summed over the whole warp, exactly, by the warp's integer
// reduction unit (redux.sync, sm_80+): three 22-bit pieces, each piece's sum
// over 32 lanes under 2^27, so no 32-bit sum overflows. One instruction a
// piece, against a five-step butterfly of two shuffles and an add each.
__device__ __forceinline__ unsigned long long warp_sum_u64(unsigned long long v) {
  constexpr unsigned kAll = 0xffffffffu;
  constexpr unsigned kMask = (1u << 22) - 1u;
  const unsigned s0 = __reduce_add_sync(kAll, static_cast<unsigned>(v) & kMask);
  const unsigned s1 = __reduce_add_sync(kAll, static_cast<unsigned>(v >> 22) & kMask);
  const unsigned s2 = __reduce_add_sync(kAll, static_cast<unsigned>(v >> 44));
  return static_cast<unsigned long long>(s0) + (static_cast<unsigned long long>(s1) << 22) +
         (static_cast<unsigned long long>(s2) << 44);
}

// A float as an int of the same order (finite values and infinities; -0
// below +0), and back: the extremes by the warp's integer min and max.
__device__ __forceinline__ int ordered_int(float f) {
  const int i = __float_as_int(f);
  return i ^ ((i >> 31) & 0x7fffffff);
}
__device__ __forceinline__ float ordered_float(int i) {
  return __int_as_float(i ^ ((i >> 31) & 0x7fffffff));
}

// FwdStats over a group of `Width` lanes (32: a warp; 8: warp 0 over the
// warps' results, its lanes 8-31 holding identities), every lane of the
// group with the same bits: a butterfly (each step adds the same two values
// in either lane) of n * mean in float64 and of the drift sums; the group's
// mean from those; then a butterfly of m2 + n (mean - group mean)^2. That
// is Chan's merge of many groups at once (no E[x^2] - E[x]^2, no
// cancellation: SPEC section 4), in two chains of additions instead of a
// chain of pairwise merges, each with a division and two count
// conversions (DESIGN 64). The counts and extremes need no butterfly: the
// warp's integer reduction unit sums and orders them over all 32 lanes
// (exact, so any order gives the same bits; for Width 8 the other lanes add
// zeros and infinities).
template <int Width>
__device__ __forceinline__ FwdStats group_stats(const FwdStats& v) {
  constexpr unsigned kAll = 0xffffffffu;
  const unsigned long long n = warp_sum_u64(v.mom.n);
  const unsigned long long dead = warp_sum_u64(v.dead);
  const unsigned long long nonfinite = warp_sum_u64(v.nonfinite);
  const float lo = ordered_float(__reduce_min_sync(kAll, ordered_int(v.lo)));
  const float hi = ordered_float(__reduce_max_sync(kAll, ordered_int(v.hi)));
  // Rounded here, not fused into the first addition: every lane adds the
  // same two values.
  double sum = __dmul_rn(static_cast<double>(v.mom.n), static_cast<double>(v.mom.mean));
  double drift = v.drift_sum;
#pragma unroll
  for (int off = Width / 2; off >= 1; off /= 2) {
    sum += __shfl_xor_sync(kAll, sum, off);
    drift += __shfl_xor_sync(kAll, drift, off);
  }
  // The group's mean (0 when empty): a fast division of the float sum
  // (2 ulp), or in float64 where that sum is past float32's range.
  const float fsum = static_cast<float>(sum);
  float mean = 0.0f;
  if (n > 0) {
    mean = isfinite(fsum) ? __fdividef(fsum, static_cast<float>(n))
                          : static_cast<float>(sum / static_cast<double>(n));
  }
  const float d = v.mom.mean - mean;
  float m2 = v.mom.n > 0 ? fmaf(static_cast<float>(v.mom.n) * d, d, v.mom.m2) : 0.0f;
#pragma unroll
  for (int off = Width / 2; off >= 1; off /= 2) m2 += __shfl_xor_sync(kAll, m2, off);
  return {{n, mean, m2}, lo, hi, dead, nonfinite, drift};
}

// The CTA's FwdStats in a fixed order (group_stats over each warp, then
// over the warps' results in warp 0), valid in thread 0. blockDim.x a
// multiple of 32 and at most 256.
__device__ __forceinline__ FwdStats block_reduce_stats(FwdStats v, FwdStats* scratch /* [8] */) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int warps = static_cast<int>(blockDim.x) >> 5;
  v = group_stats<32>(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) v = group_stats<8>(lane < warps ? scratch[lane] : FwdStats::identity());
  return v;
}

__device__ __forceinline__ FwdStats load_partial(const FwdStats* p) {
  FwdStats s;
  s.mom.n = load_cg(&p->mom.n);
  s.mom.mean = load_cg(&p->mom.mean);
  s.mom.m2 = load_cg(&p->mom.m2);
  s.lo = load_cg(&p->lo);
  s.hi = load_cg(&p->hi);
  s.dead = load_cg(&p->dead);
  s.nonfinite = load_cg(&p->nonfinite);
  s.drift_sum = load_cg(&p->drift_sum);
  return s;
}

// One thread's telemetry on the hot path: 32-bit counts (a thread never
// sees 2^32 values) keep the register budget small. The finite values are
// summed as shifted data (DESIGN 30): count, sum of (x - K) and of (x - K)^2
// in float32, K the first value of the pending batch (0 when it is not
// finite; the thread's own, so no CTA-wide pass picks it), folded into the
// Chan-merged moments by flush() every row pass once kFlushCount values are
// pending (and at the end), so no float32 sum grows long. Widened to
// FwdStats for the block reduction.
constexpr unsigned kFlushCount = 4096;

struct ThreadStats {
  ThreadMoments mom;  // flushed batches
  unsigned cnt;       // pending finite values since the last flush
  float shift;        // K of the pending batch
  float sum;          // their sum of (x - K)
  float sq;           // their sum of (x - K)^2
  float lo;
  float hi;
  float dead_pending;  // dead values since the last flush (exact: < 2^24)
  unsigned dead;
  unsigned nonfinite;
  double drift_sum;
  // 16-bit inputs: the running min / max of the vectors without a
  // non-finite value, two packed T lanes each (one min2 / max2 per two
  // values instead of a float min / max per value; the same result, as the
  // values are exact in T). Folded into lo / hi by widen<T>().
  unsigned lo2;
  unsigned hi2;

  template <typename T>
  __device__ __forceinline__ static ThreadStats identity() {
    return {{0u, 0.0f, 0.0f}, 0u,  0.0f, 0.0f, 0.0f, INFINITY, -INFINITY, 0.0f, 0u, 0u, 0.0,
            Packed2<T>::kPosInf, Packed2<T>::kNegInf};
  }
  // The pending batch as (count, mean, M2) into the moments (Chan): one exact
  // division per flush. sum/cnt is the batch mean of x - K, and
  // sq - sum * (sum/cnt) its M2 without cancellation while K lies near the
  // data (the shifted-data algorithm); rounding below 0 is clamped.
  __device__ __forceinline__ void flush() {
    dead += static_cast<unsigned>(dead_pending);
    dead_pending = 0.0f;
    if (cnt == 0) return;
    const float dm = sum / static_cast<float>(cnt);
    float m2 = sq - sum * dm;
    if (m2 < 0.0f) m2 = 0.0f;  // a NaN (overflowed sums) stays NaN
    mom.add_batch(cnt, shift + dm, m2);
    cnt = 0u;
    sum = 0.0f;
    sq = 0.0f;
  }
  // Call after the last flush().
  template <typename T>
  __device__ __forceinline__ FwdStats widen() const {
    float l = lo, h = hi;
    if constexpr (sizeof(T) == 2) {
      l = fminf(l, fminf(Packed2<T>::low(lo2), Packed2<T>::high(lo2)));
      h = fmaxf(h, fmaxf(Packed2<T>::low(hi2), Packed2<T>::high(hi2)));
    }
    return {mom.to_moments(), l, h, dead, nonfinite, drift_sum};
  }
};

// Telemetry of V input values. One finiteness test per vector: the sum of
// the shifted values is non-finite when any value is NaN or Inf (or, rarely,
// when it overflows); then the exact per-value path runs, else the values
// go into the shifted sums, min/max and the dead count without a test.
template <typename T, int V>
__device__ __forceinline__ void add_values(ThreadStats& st, const RawVec<T, V>& raw,
                                           const float (&xv)[V], float dead_threshold,
                                           unsigned dead_threshold2) {
  // 16-bit vectors: min / max and the dead test on the packed values
  // (Packed2; dead_threshold2 = Packed2<T>::splat_rd(dead_threshold)): the
  // same counts and extremes as the per-value code, fewer instructions.
  constexpr bool kPacked = sizeof(T) == 2 && V == 8;
  if (st.cnt == 0) st.shift = isfinite(xv[0]) ? xv[0] : 0.0f;  // nothing pending: any K is exact
  const float shift = st.shift;
  float d[V];
#pragma unroll
  for (int i = 0; i < V; ++i) d[i] = xv[i] - shift;
  // Pairwise, in a fixed order.
  float part[V];
#pragma unroll
  for (int i = 0; i < V; ++i) part[i] = d[i];
#pragma unroll
  for (int w = 1; w < V; w *= 2) {
#pragma unroll
    for (int i = 0; i + w < V; i += 2 * w) part[i] += part[i + w];
  }
  if (isfinite(part[0])) {
    st.cnt += static_cast<unsigned>(V);
    st.sum += part[0];
    if constexpr (kPacked) {
      const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
      unsigned dead_bits = 0u;  // one bit per dead value: lanes k and k + 16 of word k
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        st.lo2 = Packed2<T>::min2(st.lo2, w[k]);
        st.hi2 = Packed2<T>::max2(st.hi2, w[k]);
        dead_bits |= Packed2<T>::abs_le_mask(w[k], dead_threshold2) & (0x00010001u << k);
      }
      st.dead += static_cast<unsigned>(__popc(dead_bits));
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      st.sq = fmaf(d[i], d[i], st.sq);
      if constexpr (!kPacked) {
        st.lo = fminf(st.lo, xv[i]);
        st.hi = fmaxf(st.hi, xv[i]);
        st.dead_pending += fabsf(xv[i]) <= dead_threshold ? 1.0f : 0.0f;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (isfinite(xv[i])) {
        ++st.cnt;
        st.sum += d[i];
        st.sq = fmaf(d[i], d[i], st.sq);
        st.lo = fminf(st.lo, xv[i]);
        st.hi = fmaxf(st.hi, xv[i]);
        if (fabsf(xv[i]) <= dead_threshold) ++st.dead;
      } else {
        ++st.nonfinite;
      }
    }
  }
}

struct ForwardArgs {
  const void* x;
  void* y;
  int64_t rows;
  int64_t x_stride;
  int64_t y_stride;
  int C;
  int group;
  int row_groups;     // threads / group
  int rows_per_pass;  // row_groups x rows in flight
  int tiles;
  bool coef_table;  // the dynamic shared memory holds C floats of coefficients
  SeedTable seeds;
  RegistryView registry;
  OutputClamp clamp;
  float dead_threshold;
  float* telemetry;
  int64_t* nonfinite_count;
  unsigned* tickets;    // [S], zero between launches
  FwdStats* partials;   // [S, tiles] (flat: [S, tiles, blockDim.x])
  bool flat;            // CudaLaunchConfig::forward_flat_reduction
};

// group_sum of three drift sums over a row group of G lanes, the three
// butterflies interleaved, with immediate offsets; the same additions in
// the same order as group_sum, so the same bits in every lane of the group.
// G <= 8 (kForwardGroupThreads), or with Wide up to a warp
// (kForwardMaxGroupThreads: the TMA kernel's wide instances). Only those
// instances carry the two wider steps: in every kernel they added 2-6 % to
// the code (inlined at each kind's row loop), and the 8192x768/16 forward,
// whose SMs wait on instruction fetch, ran 2-3 % slower (PERFORMANCE.md,
// twenty-third session).
template <bool Wide, typename A>
__device__ __forceinline__ void group_sum3(A& a, A& b, A& c, int G) {
  static_assert(kForwardGroupThreads == 8 && kForwardMaxGroupThreads == 32,
                "group_sum3 unrolls three butterfly steps, five with Wide");
  // The widest step of the instance's groups first (Wide: 16, else 4).
  constexpr int kFirst = (Wide ? kForwardMaxGroupThreads : kForwardGroupThreads) / 2;
#pragma unroll
  for (int off = kFirst; off >= 1; off /= 2) {
    if (off < G) {  // uniform; lane ^ off stays in the lane's aligned group
      const A a2 = __shfl_xor_sync(0xffffffffu, a, off);
      const A b2 = __shfl_xor_sync(0xffffffffu, b, off);
      const A c2 = __shfl_xor_sync(0xffffffffu, c, off);
      a += a2;
      b += b2;
      c += c2;
    }
  }
}


// The U input rows of one pass as the threads read them: pointers into
// global memory (generic kernel) or into a shared-memory stage (TMA kernel);
// rows past N point at a valid row and are skipped (active[u] false). The
// output rows are in global memory, or with YShared in a shared-memory
// stage that a TMA store writes out (CudaLaunchConfig::forward_tma_store).
template <typename T, int U, bool YShared = false>
struct PassRows {
  const T* x[U];
  T* y[U];
  bool active[U];
};

// One access of y: to global memory, or to the shared-memory y stage.
template <typename T, int V, bool YShared>
__device__ __forceinline__ void store_y(T* p, const RawVec<T, V>& raw) {
  if constexpr (YShared) {
    store_raw_shared<T, V>(p, raw);
  } else {
    store_raw<T, V>(p, raw);
  }
}

// The drift's row sums (DESIGN 28). Float32 inputs: X.Y, |X|^2 and |Y|^2 in
// float64 (products of floats are exact there) and 1 - cos from them. 16-bit
// inputs (their tolerance is 1e-2 / 2e-3, and the float64 conversions and
// sums were a quarter of the bfloat16 forward's time): with R = T - k X, so
// Y = g X + a R (g = 1 + a (k - 1), k the seed's drift_k), the float32 sums
// |X|^2, X.R and |R|^2, and
//   1 - cos = a^2 (|X|^2 |R|^2 - (X.R)^2) / (r (r + X.Y)),  r = |X| |Y|
// (Lagrange's identity: not the cancellation of 1 - cos against 1, however
// small the drift; what is left cancels only as R turns parallel to X, at
// float32 rounding of the sums, which k, T's slope along X, prevents for
// ATTENTION, CONV and MLP, where T - X follows X; for X.Y < 0 the plain
// 1 - X.Y / r), all in float32. A row whose float32 sums or finish cannot be trusted (a
// non-finite value, squares or sums past float32's range or under 2^-100,
// |Y| << |X|) is summed again in float64 as float32 inputs are
// (drift_row_sums_exact).
template <typename T>
inline constexpr bool kDriftFloat32 = sizeof(T) == 2;

// 1 - cos of a row from the float64 sums X.Y, |X|^2, |Y|^2 (SPEC section 4:
// cos = 1 for a zero or non-finite row, and for a row with Y == X, where the
// formula would leave rounding noise instead of the exact 0). A non-finite X
// or Y makes |X|^2 or |Y|^2 non-finite (squares of finite floats cannot
// overflow a double), so no per-value test.
__device__ __forceinline__ double one_minus_cos_exact(double dot, double xx, double yy) {
  const bool unit = !isfinite(xx) || !isfinite(yy) || xx == 0.0 || yy == 0.0 ||
                    (dot == xx && xx == yy);
  return unit ? 0.0 : 1.0 - dot * rsqrt(xx * yy);
}

// 1 - cos from the float32 sums |X|^2, X.R, |R|^2 of R = T - X - (k - 1) X,
// a and k (kDriftFloat32), in float32 (two reciprocal square roots, no
// division by |X| |Y|: a float64 finish per row cost as much as the
// per-element float64 sums it replaced at 8 values per lane and row); false
// where the row must be summed again in float64. With Y = g X + a R,
// g = 1 + a (k - 1), Lagrange's |X|^2|R|^2 - (X.R)^2 is what cancels when R
// turns parallel to X, at float32 rounding of the sums; k near T's slope
// along X keeps R off X (DESIGN 28), and then the error (a few float32 ulps
// of the three sums and of the approximate rsqrt) is far inside the 16-bit
// tolerances.
__device__ __forceinline__ bool one_minus_cos_lagrange(float xx, float xd, float dd, float a,
                                                       float k, float& out) {
  // 2^-100: below it float32 squares may have underflowed (a denormal or
  // zero row); non-finite: a NaN/Inf value or an overflowed square.
  if (!(isfinite(xx) && isfinite(xd) && isfinite(dd)) || xx < 0x1p-100f) return false;
  const float g = fmaf(a, k - 1.0f, 1.0f);
  const float gx = g * xx;
  const float xy = fmaf(a, xd, gx);
  const float yy = fmaf(a, fmaf(a, dd, 2.0f * g * xd), g * gx);
  // |Y| << |X| (cancellation in |Y|^2), or |Y|^2 past float32's range.
  if (!(yy > 0x1p-10f * xx) || !isfinite(yy)) return false;
  const float ix = rsqrtf(xx);
  const float iy = rsqrtf(yy);
  const float c = xy * ix * iy;  // cos(X, Y)
  if (xy < 0.0f) {
    out = 1.0f - c;
  } else {
    // (|X|^2 |R|^2 - (X.R)^2) / (|X|^2 |Y|^2) as |R|^2/|Y|^2 - (X.R/(|X||Y|))^2:
    // scaled first, so no product overflows float32.
    const float q = xd * ix * iy;
    const float e = fmaf(dd * iy, iy, -q * q);
    // |R|^2 / |Y|^2 past float32's range (a tiny a with a huge R): the exact
    // sums decide (fmaxf below would turn a NaN into 0).
    if (!isfinite(e)) return false;
    out = __fdividef(a * a * fmaxf(e, 0.0f), 1.0f + c);  // 1 + c in [1, 2]
  }
  return isfinite(out);
}

// The float64 row sums X.Y, |X|^2, |Y|^2 of this lane's part of one row,
// X and Y as the pass computes them (kDriftFloat32's fallback).
template <typename T, int V, Mode M>
__device__ __forceinline__ void drift_row_sums_exact(const ForwardArgs& args, const SeedView& sv,
                                                  const float* table, const T* x, int lane,
                                                  double& dot, double& xx, double& yy) {
  const float a = sv.a;
  const float b = 1.0f - sv.a;
  for (int c = lane * V; c < args.C; c += args.group * V) {
    float xv[V];
    load_vec<T, V>(x + c, xv);
    float xm2 = 0.0f, xm1 = 0.0f;
    if constexpr (M == Mode::conv) {
      xm2 = c >= 2 ? load_one(x + c - 2) : 0.0f;
      xm1 = c >= 1 ? load_one(x + c - 1) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float t = mode_transform<M>(sv, mode_coef<M>(sv, table, c + i), xv[i], xm1, xm2);
      xm2 = xm1;
      xm1 = xv[i];
      const double xd = xv[i], yd = blend_value(a, b, t, xv[i]);
      dot += xd * yd;
      xx += xd * xd;
      yy += yd * yd;
    }
  }
}

// One row pass of one mode: y, the per-thread telemetry and the drift of
// the thread's U rows. Every lane loads its vector of all U rows before it
// computes on the first (U accesses in flight per thread). Wide: row groups
// of up to 32 lanes (group_sum3), else at most 8.
template <typename T, int V, int U, Mode M, bool Clamp, bool YShared, bool Wide = false>
__device__ __forceinline__ void forward_pass(const ForwardArgs& args, const SeedView& sv,
                                             const float* table, const PassRows<T, U, YShared>& r,
                                             int lane, ThreadStats& st) {
  constexpr bool kBlend = M != Mode::copy;
  constexpr bool kF32 = kDriftFloat32<T>;
  using Acc = std::conditional_t<kF32, float, double>;
  const int C = args.C;
  const float a = sv.a;
  const float b = 1.0f - sv.a;
  [[maybe_unused]] const float k = sv.drift_k;  // the 16-bit drift's R = T - k X
  const float clo = args.clamp.lo;
  const float chi = args.clamp.hi;
  const float thr = args.dead_threshold;
  [[maybe_unused]] const unsigned thr2 = Packed2<T>::splat_rd(thr);  // 16-bit add_values
  const int step = args.group * V;
  // The drift's row sums: float64 X.Y, |X|^2, |Y|^2, or for 16-bit inputs
  // float32 |X|^2, X.R, |R|^2 with R = T - k X (see kDriftFloat32).
  Acc s0[U], s1[U], s2[U];
#pragma unroll
  for (int u = 0; u < U; ++u) s0[u] = s1[u] = s2[u] = Acc(0);
  for (int c = lane * V; c < C; c += step) {
    RawVec<T, V> raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (r.active[u]) raw[u] = load_raw<T, V>(r.x[u] + c);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!r.active[u]) continue;
      float xv[V];
      decode_vec<T, V>(raw[u], xv);
      if constexpr (!kBlend && !Clamp) {
        // A copy stores the loaded bytes unchanged.
        store_y<T, V, YShared>(r.y[u] + c, raw[u]);
      } else {
        float yv[V];
        float coef[V];
        mode_coefs<M, V>(sv, table, c, coef);
        // CONV's two left neighbours (0 at the chunk start; cache hits, the
        // neighbour lane loaded them), then rolled along the vector.
        float xm2 = 0.0f, xm1 = 0.0f;
        if constexpr (M == Mode::conv) {
          xm2 = c >= 2 ? load_one(r.x[u] + c - 2) : 0.0f;
          xm1 = c >= 1 ? load_one(r.x[u] + c - 1) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float xi = xv[i];
          float yi = xi;
          if constexpr (kBlend) {
            // The blend as the backward recomputes it for the clamp mask
            // (the same bits: DESIGN 4).
            const float t = mode_transform<M>(sv, coef[i], xi, xm1, xm2);
            xm2 = xm1;
            xm1 = xi;
            yi = blend_value(a, b, t, xi);
            if constexpr (kF32) {
              const float d = fmaf(-k, xi, t);  // R = T - k X (DESIGN 28)
              s0[u] = fmaf(xi, xi, s0[u]);
              s1[u] = fmaf(xi, d, s1[u]);
              s2[u] = fmaf(d, d, s2[u]);
            } else {
              const double xd = xi, yd = yi;
              s0[u] += xd * yd;
              s1[u] += xd * xd;
              s2[u] += yd * yd;
            }
          }
          yv[i] = Clamp ? clamp_output(true, clo, chi, yi) : yi;
        }
        store_y<T, V, YShared>(r.y[u] + c, encode_vec<T, V>(yv));
      }
      add_values<T, V>(st, raw[u], xv, thr, thr2);
    }
  }
  if constexpr (kBlend) {
    // Every lane of the CTA reaches this point the same number of times.
    std::conditional_t<kF32, float, double> drift[U];
    bool redo[U];
    bool any_redo = false;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      group_sum3<Wide>(s0[u], s1[u], s2[u], args.group);
      drift[u] = 0;
      redo[u] = false;
      if constexpr (kF32) {
        redo[u] = r.active[u] && !one_minus_cos_lagrange(s0[u], s1[u], s2[u], a, k, drift[u]);
        any_redo = any_redo || redo[u];
      } else {
        drift[u] = one_minus_cos_exact(s0[u], s1[u], s2[u]);
      }
    }
    if constexpr (kF32) {
      // Rare (non-finite, denormal or zero rows): the warp sums its rows
      // again in float64 (uniform over the warp, so the shuffles are too).
      if (__any_sync(0xffffffffu, any_redo)) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          double dot = 0.0, xx = 0.0, yy = 0.0;
          if (r.active[u]) drift_row_sums_exact<T, V, M>(args, sv, table, r.x[u], lane, dot, xx, yy);
          group_sum3<Wide>(dot, xx, yy, args.group);
          if (redo[u]) drift[u] = static_cast<float>(one_minus_cos_exact(dot, xx, yy));
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (r.active[u] && lane == 0) st.drift_sum += drift[u];
    }
  }
  if (st.cnt >= kFlushCount) st.flush();
}

// Calls f(mode, clamp) with both as compile-time constants
// (std::integral_constant): the row loop is specialised per seed kind and
// clamp, picked once per CTA by this uniform switch, so the per-element
// code has no test of the kind, of the stage or of the clamp.
template <bool Clamp, typename F>
__device__ __forceinline__ void with_mode_clamped(Mode mode, F& f) {
  using K = std::integral_constant<bool, Clamp>;
  switch (mode) {
    case Mode::copy: f(std::integral_constant<Mode, Mode::copy>{}, K{}); break;
    case Mode::residual: f(std::integral_constant<Mode, Mode::residual>{}, K{}); break;
    case Mode::attention: f(std::integral_constant<Mode, Mode::attention>{}, K{}); break;
    case Mode::mlp: f(std::integral_constant<Mode, Mode::mlp>{}, K{}); break;
    case Mode::conv: f(std::integral_constant<Mode, Mode::conv>{}, K{}); break;
    case Mode::wide: f(std::integral_constant<Mode, Mode::wide>{}, K{}); break;
  }
}
template <typename F>
__device__ __forceinline__ void with_mode(Mode mode, bool clamp, F&& f) {
  if (clamp) {
    with_mode_clamped<true>(mode, f);
  } else {
    with_mode_clamped<false>(mode, f);
  }
}

// Seed s's telemetry row from its merged statistics (SPEC section 4).
__device__ __forceinline__ void write_telemetry(const ForwardArgs& args, int s, const FwdStats& acc,
                                                bool blends) {
  // Fast divisions and reciprocal square root (2 ulp each, far inside SPEC
  // section 9): one thread's last step, on the launch's critical path,
  // without the IEEE paths' extra instructions to fetch (DESIGN 59).
  const int64_t N = args.rows;
  const unsigned long long n = acc.mom.n;
  const float fn = static_cast<float>(n);
  const float mean = n > 0 ? acc.mom.mean : 0.0f;
  const float variance = n > 0 ? __fdividef(acc.mom.m2, fn) : 0.0f;
  float* tel = args.telemetry + static_cast<int64_t>(s) * kTelemetryWidth;
  tel[kTelVariance] = variance;
  tel[kTelMean] = mean;
  tel[kTelMin] = acc.lo;
  tel[kTelMax] = acc.hi;
  tel[kTelDeadRatio] = n > 0 ? __fdividef(static_cast<float>(acc.dead), fn) : 0.0f;
  tel[kTelSignalToNoise] = n > 0 ? fabsf(mean) * rsqrtf(variance + 1e-8f) : 0.0f;
  tel[kTelNonfinite] = static_cast<float>(acc.nonfinite);
  // Exactly 0 for a copy and for N = 0 (SPEC section 4).
  tel[kTelDrift] = (blends && N > 0)
                       ? __fdividef(static_cast<float>(acc.drift_sum), static_cast<float>(N))
                       : 0.0f;
  if (args.nonfinite_count != nullptr) {
    args.nonfinite_count[s] = static_cast<int64_t>(acc.nonfinite);
  }
}

// What a CTA knows about its seed before the row loop: the seed's view, the
// loop mode, and the coefficient table (built in `table_mem` when the plan
// gave it room; else the `wide` mode computes coefficients per element).
// Every thread of the CTA calls it (barriers inside).
struct CtaSeed {
  SeedView sv;
  Mode mode;
  const float* table;
};
__device__ __forceinline__ CtaSeed setup_seed(const ForwardArgs& args, int s, float* table_mem) {
  __shared__ SumF sum_scratch[8];
  __shared__ MaxF max_scratch[8];
  __shared__ float bcast;
  const int C = args.C;
  CtaSeed cs{load_seed_view(args.seeds, args.registry, s, C), Mode::copy, nullptr};
  if (cs.sv.blends && cs.sv.kind == static_cast<int>(Kind::attention)) {
    compute_softmax(cs.sv, C, sum_scratch, max_scratch, &bcast);
  }
  KASMINA_FWD_TL(8);
  if (cs.sv.blends) {
    switch (cs.sv.kind) {
      case static_cast<int>(Kind::residual): cs.mode = Mode::residual; break;
      case static_cast<int>(Kind::attention): cs.mode = Mode::attention; break;
      case static_cast<int>(Kind::mlp): cs.mode = Mode::mlp; break;
      default: cs.mode = Mode::conv; break;
    }
  }
  const bool needs_coef =
      cs.mode == Mode::residual || cs.mode == Mode::attention || cs.mode == Mode::mlp;
  if (needs_coef) {
    if (args.coef_table) {
      fill_coef_table(cs.sv, C, table_mem);
      cs.table = table_mem;
      __syncthreads();
    } else {
      cs.mode = Mode::wide;
    }
  }
  // T's slope along X for the 16-bit drift sums (DESIGN 28): ATTENTION's
  // T = p X with p averaging 1/C, CONV's centre tap, MLP's first weight
  // (T = sigma w X on positive X); RESIDUAL's D = sigma w does not follow X.
  switch (cs.mode) {
    case Mode::attention: cs.sv.drift_k = 1.0f / static_cast<float>(C); break;
    case Mode::conv: cs.sv.drift_k = cs.sv.sigma * cs.sv.w0; break;
    case Mode::mlp: cs.sv.drift_k = cs.sv.sigma * cs.table[0]; break;
    case Mode::wide:  // no table: the same slopes from the seed's view
      cs.sv.drift_k = cs.sv.kind == static_cast<int>(Kind::attention) ? 1.0f / static_cast<float>(C)
                      : cs.sv.kind == static_cast<int>(Kind::mlp)     ? cs.sv.sigma * cs.sv.w[0]
                                                                      : 1.0f;
      break;
    default: cs.sv.drift_k = 1.0f; break;
  }
  return cs;
}

// The flat variant of a CTA's end (CudaLaunchConfig::forward_flat_reduction,
// issue 7): no reduction inside the CTA before the global one. Every thread
// writes its statistics to the workspace; the seed's last CTA (the same
// ticket, take_ticket) has each of its threads merge the partials at its
// index stride, in index order, then combines its threads with the block
// reduction, writes the telemetry row and clears what it read. Every thread
// of the CTA calls it.
__device__ __forceinline__ void finish_seed_flat(const ForwardArgs& args, int s, int tile,
                                                 bool blends, const FwdStats& mine,
                                                 FwdStats* red_scratch, int* is_last) {
  const int64_t per_seed = static_cast<int64_t>(args.tiles) * blockDim.x;
  FwdStats* seed_partials = args.partials + static_cast<int64_t>(s) * per_seed;
  seed_partials[static_cast<int64_t>(tile) * blockDim.x + threadIdx.x] = mine;
  __syncthreads();  // every thread's partial is written before thread 0 releases them
  if (threadIdx.x == 0) {
    *is_last = take_ticket(&args.tickets[s]) == static_cast<unsigned>(args.tiles - 1);
  }
  __syncthreads();
  if (!*is_last) return;
  FwdStats acc = FwdStats::identity();
  for (int64_t i = threadIdx.x; i < per_seed; i += blockDim.x) {
    acc.merge(load_partial(seed_partials + i));
  }
  acc = block_reduce_stats(acc, red_scratch);  // its barriers order the reads before the clears
  for (int64_t i = threadIdx.x; i < per_seed; i += blockDim.x) seed_partials[i] = FwdStats{};
  if (threadIdx.x == 0) {
    write_telemetry(args, s, acc, blends);
    args.tickets[s] = 0u;
  }
}

// The end of a CTA: its threads' statistics reduced in a fixed order; the
// last CTA of the seed (an integer ticket, take_ticket) merges the seed's
// partials in index order, writes the telemetry row and leaves the
// partials and the ticket zero. Every thread of the CTA calls it.
//
// Both reductions run through one copy of the code (a loop of two rounds,
// not unrolled): the seed's last CTA merges the tiles' partials with the
// instructions it has just run for its own threads, so the tail of the
// launch does not wait for the fetch of code that no CTA of its SM has run
// yet (DESIGN 59).
template <typename T>
__device__ __forceinline__ void finish_seed(const ForwardArgs& args, int s, int tile, bool blends,
                                            ThreadStats& st) {
  __shared__ FwdStats red_scratch[8];
  __shared__ int is_last;
  const int tiles = args.tiles;
  st.flush();
  if (args.flat) {
    finish_seed_flat(args, s, tile, blends, st.widen<T>(), red_scratch, &is_last);
    return;
  }
  FwdStats* seed_partials = args.partials + static_cast<int64_t>(s) * tiles;
  FwdStats v = st.widen<T>();
#pragma unroll 1
  for (int round = 0;; ++round) {
    v = block_reduce_stats(v, red_scratch);
    if (round == 1) break;
    KASMINA_FWD_TL(5);
    // The seed's only CTA: its statistics are the seed's (no partials, no
    // ticket: a small batch pays no second round trip through L2).
    if (tiles == 1) break;
    if (threadIdx.x == 0) {
      seed_partials[tile] = v;
      is_last = take_ticket(&args.tickets[s]) == static_cast<unsigned>(tiles - 1);
    }
    __syncthreads();
    KASMINA_FWD_TL(6);
    KASMINA_FWD_TL_LAST(is_last);
    if (!is_last) return;
    KASMINA_FWD_TL(9);
    v = FwdStats::identity();
    for (int i = static_cast<int>(threadIdx.x); i < tiles; i += static_cast<int>(blockDim.x)) {
      v.merge(load_partial(seed_partials + i));
    }
    KASMINA_FWD_TL(10);
  }
  if (tiles > 1) {
    KASMINA_FWD_TL(11);
    // params.hpp: the workspace is left zero-filled by every launch (each
    // thread clears what it read).
    for (int i = static_cast<int>(threadIdx.x); i < tiles; i += static_cast<int>(blockDim.x)) {
      seed_partials[i] = FwdStats{};
    }
  }
  if (threadIdx.x == 0) {
    write_telemetry(args, s, v, blends);
    if (tiles > 1) args.tickets[s] = 0u;  // every CTA of this seed has taken its ticket
  }
}

// ------------------------------------------------- the TMA variant (host)
// forward_tma_sm90.cu. `plan` comes from plan_forward with tiles already
// set from the generic kernel's occupancy (1 row in flight), so the TMA
// kernel runs the same passes and reduction trees, hence the same bits.

// nullptr when the TMA variant can run these params on this device, else
// why not (the generic kernel then runs; describe says so).
const char* forward_tma_refusal(const ForwardParams& p, const LaunchPlan& plan,
                                const DeviceInfo& dev, int64_t C, bool vector_path);
// Whether `stages` stages of the plan's box (and its coefficient table) fit
// the shared memory every architecture gives without an opt-in, or with
// opt_in the tuning's opt-in (tma_store_smem_bytes).
bool forward_tma_stages_fit(const LaunchPlan& plan, const ForwardParams& p, const DeviceInfo& dev,
                            int64_t C, int stages, bool opt_in);
// Picks the pipeline depth (plan.stages: requested, else the tuning's stage
// budget, then fewer while the TMA kernel would hold fewer CTAs per SM than
// the generic one: `resident_generic`) and the dynamic shared memory.
LaunchPlan forward_tma_finish(LaunchPlan plan, const ForwardParams& p, const DeviceInfo& dev,
                              int resident_generic);
// Launches the TMA kernel on p.stream (a tensor map of x, cached).
void forward_tma_launch(const LaunchPlan& plan, const ForwardParams& p, const ForwardArgs& args);

}  // namespace kasmina::cuda
