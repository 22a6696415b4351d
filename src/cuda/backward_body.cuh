// CUDA backward (SPEC section 5): one launch writes dX and every gradient.
// The device code shared by the generic kernel (backward_cuda.cu) and the
// Hopper TMA kernel (backward_tma_sm90.cu): they differ only in where a
// pass's X and G are read (the Ring: global memory, or a TMA stage).
//
// The grid is the forward's (see forward_cuda.cu); row groups have up to 32
// lanes, as many rows per CTA as the shared memory allows. Per row a
// group first applies the clamp mask (the forward's pre-clamp Y is
// recomputed) and, when clipping, reduces the row chunk's ||G|| over the
// group in a first sweep of the row (the second sweep re-reads the same
// bytes from L1/L2). Each CTA then keeps:
//   - column sums for dW (RESIDUAL: G, ATTENTION: G*X, MLP: G*X*m) in
//     shared memory, one row of C floats per row group, each lane owning its
//     columns (no atomics); CONV needs three scalars instead;
//   - scalar sums (dscale, dalpha, CONV taps) and dX statistics (sum of
//     squares, shifted sums folded into Chan-merged moments, max |dX|) in
//     registers.
// The row loop is specialised per seed kind (RESIDUAL, ATTENTION, MLP, CONV,
// and the first three without the coefficient table), clamp and clip
// (templates), picked once per CTA; a seed that neither blends nor trains
// takes a copy loop (DESIGN 31).
// CTA partials go to the workspace; the last CTA of a seed (integer ticket)
// sums them in tile order, applies the kind's final formula and writes the
// seed's dalpha and grad_stats, the seed's row of dweights/dscales when no
// other seed adds into that blueprint, and zero rows where no seed adds;
// of the seeds that share a row, the last to finish (a ticket per row)
// writes it: zero, then each seed's row added in seed order. No
// floating-point atomics; every sum has a fixed order. Every partial is
// cleared after it is merged, so the workspace is zero again.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "kasmina/params.hpp"

// Its own namespace: forward_body.cuh has row helpers of the same names.
// Timeline hooks (timeline.cuh): empty unless the including file defines them.
#ifndef KASMINA_BWD_TL
#define KASMINA_BWD_TL(slot) ((void)0)
#define KASMINA_BWD_TL_FLAG(bit, on) ((void)0)
#define KASMINA_BWD_TL_WHERE(seed, tile) ((void)0)
#endif

namespace kasmina::cuda::bwd {

// The scalar sums (dscale, dalpha, CONV taps) add N*C terms of both signs
// whose total can be far smaller than their magnitudes: every term is formed
// and added in float64 (DESIGN 45). A float32 running sum over a whole chunk
// missed SPEC section 9 at N*C ~ 1.5e5; float32 terms summed per step, then
// in float64, still missed it on unlucky random data (T - X = sigma*w
// rounded once per column: the error does not average out over rows).
struct BwdStats {
  Moments mom;   // of dX
  float sumsq;   // of dX
  float maxabs;  // of dX
  double dsig;    // sum of G * dT/dsigma (times a_eff at the end)
  double dalpha;  // sum of G * (T - X)
  double cw0, cw1, cw2;  // CONV: sums of G[j] * X[j-k]

  __device__ __forceinline__ static BwdStats identity() {
    return {Moments::identity(), 0.0f, 0.0f, 0.0, 0.0, 0.0, 0.0, 0.0};
  }
  __device__ __forceinline__ void merge(const BwdStats& b) {
    mom.merge(b.mom);
    sumsq += b.sumsq;
    maxabs = fmaxf(maxabs, b.maxabs);  // like std::max(m, |v|): a NaN is skipped
    dsig += b.dsig;
    dalpha += b.dalpha;
    cw0 += b.cw0;
    cw1 += b.cw1;
    cw2 += b.cw2;
  }
};

__device__ __forceinline__ BwdStats load_partial(const BwdStats* p) {
  BwdStats s;
  s.mom.n = load_cg(&p->mom.n);
  s.mom.mean = load_cg(&p->mom.mean);
  s.mom.m2 = load_cg(&p->mom.m2);
  s.sumsq = load_cg(&p->sumsq);
  s.maxabs = load_cg(&p->maxabs);
  s.dsig = load_cg(&p->dsig);
  s.dalpha = load_cg(&p->dalpha);
  s.cw0 = load_cg(&p->cw0);
  s.cw1 = load_cg(&p->cw1);
  s.cw2 = load_cg(&p->cw2);
  return s;
}

// BwdStats's two independent halves, reduced over the CTA one after the
// other (fewer values live in the shuffles; every field merges on its own, so
// the bits are those of one reduction of the whole struct).
struct GradPart {
  Moments mom;
  float sumsq;
  float maxabs;
  __device__ __forceinline__ static GradPart identity() { return {Moments::identity(), 0.0f, 0.0f}; }
  __device__ __forceinline__ void merge(const GradPart& b) {
    mom.merge(b.mom);
    sumsq += b.sumsq;
    maxabs = fmaxf(maxabs, b.maxabs);
  }
  __device__ __forceinline__ GradPart shfl_down(int off) const {
    return {mom.shfl_down(off), __shfl_down_sync(0xffffffffu, sumsq, off),
            __shfl_down_sync(0xffffffffu, maxabs, off)};
  }
};
struct SumPart {
  double dsig, dalpha, cw0, cw1, cw2;
  __device__ __forceinline__ static SumPart identity() { return {0.0, 0.0, 0.0, 0.0, 0.0}; }
  __device__ __forceinline__ void merge(const SumPart& b) {
    dsig += b.dsig;
    dalpha += b.dalpha;
    cw0 += b.cw0;
    cw1 += b.cw1;
    cw2 += b.cw2;
  }
  __device__ __forceinline__ SumPart shfl_down(int off) const {
    return {__shfl_down_sync(0xffffffffu, dsig, off), __shfl_down_sync(0xffffffffu, dalpha, off),
            __shfl_down_sync(0xffffffffu, cw0, off), __shfl_down_sync(0xffffffffu, cw1, off),
            __shfl_down_sync(0xffffffffu, cw2, off)};
  }
};

// block_reduce of a BwdStats as its two halves (valid in thread 0).
__device__ __forceinline__ BwdStats block_reduce_split(const BwdStats& v, GradPart* gscratch,
                                                       SumPart* sscratch) {
  const GradPart g = block_reduce<true>(GradPart{v.mom, v.sumsq, v.maxabs}, gscratch);
  const SumPart p = block_reduce<true>(SumPart{v.dsig, v.dalpha, v.cw0, v.cw1, v.cw2}, sscratch);
  return {g.mom, g.sumsq, g.maxabs, p.dsig, p.dalpha, p.cw0, p.cw1, p.cw2};
}

// SPEC section 5's clip factor of a row chunk from its masked G's sum of
// squares, in float64 (DESIGN 45): min(1, clip / (||G|| + 1e-6)).
__device__ __forceinline__ double clip_factor(double sumsq, float clip_norm) {
  return fmin(1.0, static_cast<double>(clip_norm) / (sqrt(sumsq) + 1e-6));
}

// The type of the backward's scalar sums' terms (DESIGN 47): float64 for
// float32 inputs (DESIGN 45), float32 for 16-bit inputs, whose tolerance
// (1e-2, 2e-3) is far above float32 rounding of the terms, and whose backward
// the float32-to-float64 conversions (a quarter-rate unit, three per
// element) bounded.
template <typename T>
using ScalarSum = std::conditional_t<sizeof(T) == 2, float, double>;

// One row pass's scalar sums of one row, added into the thread's float64
// totals when the pass ends (a row's terms in S, the rows in float64).
template <typename S>
struct PassSums {
  S dsig = S(0), dalpha = S(0), cw0 = S(0), cw1 = S(0), cw2 = S(0);
  __device__ __forceinline__ void add_to(BwdStats& st) const {
    st.dsig += static_cast<double>(dsig);
    st.dalpha += static_cast<double>(dalpha);
    st.cw0 += static_cast<double>(cw0);
    st.cw1 += static_cast<double>(cw1);
    st.cw2 += static_cast<double>(cw2);
  }
};

// threadIdx.x read anew (volatile: not merged with an earlier read).
__device__ __forceinline__ int thread_index() {
  unsigned t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return static_cast<int>(t);
}

struct BackwardArgs {
  const void* x;
  const void* dy;
  void* dx;
  int64_t rows;
  int64_t x_stride;
  int64_t dy_stride;
  int64_t dx_stride;
  int C;
  int C_padded;  // per-group shared row: C rounded up to a multiple of G*V
  int table_floats;  // coefficient table ahead of the accumulators (0 = none)
  int group;
  int row_groups;     // threads / group: the row groups sharing the column sums
  int rows_per_pass;  // row_groups x rows in flight
  int tiles;
  int num_seeds;
  SeedTable seeds;
  RegistryView registry;
  OutputClamp clamp;
  bool clip_enabled;
  float clip_norm;
  float* dweights;
  float* dscales;
  float* dalpha;
  float* grad_stats;
  unsigned* tickets;     // [S], zero between launches: finished CTAs per seed
  unsigned* row_tickets; // [B], zero between launches: finished seeds per blueprint row
  BwdStats* partials;    // [S, tiles]
  float* col_partials;   // [S, tiles, C]
  float* seed_dw;        // [S, C]
  float* seed_dscale;    // [S]
  bool row_list;         // CudaLaunchConfig::backward_row_list (DESIGN 69)
};

// Loads in flight per thread in the finishing sums (tile partials, the last
// seed's per-seed rows): read first, then added in order.
constexpr int kFinishBatch = 8;
// With CudaLaunchConfig::backward_row_list, a blueprint row of at most this
// many training seeds is summed from a list of them (DESIGN 69); a larger one
// scans the seed table.
constexpr int kRowList = 64;  // 256 B: static shared memory under 2 KiB with 46 KiB dynamic (tuning.hpp)

// Whether seed s adds into dweights/dscales (SPEC section 7's table).
__device__ __forceinline__ bool seed_has_grads(const SeedTable& t, int s) {
  return t.blueprint[s] != 0 &&
         (stage_trains_grafted(t.stage[s]) || stage_trains_shadow(t.stage[s]));
}
// Whether seed s adds into blueprint row b.
__device__ __forceinline__ bool seed_adds_into(const SeedTable& t, int s, int b) {
  return t.blueprint[s] == b && seed_has_grads(t, s);
}

// Shared-memory slot of column j = c + i (c = lane*V + k*G*V): lanes of one
// step touch consecutive words, so the read-modify-writes are conflict-free.
__device__ __forceinline__ int acc_slot(int j, int G, int V) {
  const int span = G * V;
  const int step = j / span;
  const int r = j - step * span;
  const int lane = r / V;
  const int i = r - lane * V;
  return step * span + i * G + lane;
}

// One thread's dX statistics on the hot path (DESIGN 31): the sum of
// squares and max |dX| in float32, and the moments as shifted sums like the
// forward's telemetry (DESIGN 30): count, sum of (d - K) and of (d - K)^2 of
// the pending values, K the first value of the pending batch (0 if it is not
// finite), folded into Chan-merged moments once per row pass when
// kFlushCount values are pending, and at the end. Every value counts (SPEC
// section 5: over the N*C values of dX), so a non-finite dX makes the
// statistics non-finite, as before.
constexpr unsigned kFlushCount = 4096;

struct GradThreadStats {
  ThreadMoments mom;  // flushed batches
  unsigned cnt;       // pending values
  float shift;        // K of the pending batch
  float sum;          // pending sum of (d - K)
  float sq;           // pending sum of (d - K)^2
  float sumsq;        // sum of d^2
  float maxabs;       // max |d| (fmaxf: a NaN is skipped, like std::max(m, |v|))

  __device__ __forceinline__ static GradThreadStats identity() {
    return {{0u, 0.0f, 0.0f}, 0u, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  }
  template <int V>
  __device__ __forceinline__ void add(const float (&dv)[V]) {
    if (cnt == 0) shift = isfinite(dv[0]) ? dv[0] : 0.0f;
    float part[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float d = dv[i] - shift;
      part[i] = d;
      sq = fmaf(d, d, sq);
      sumsq = fmaf(dv[i], dv[i], sumsq);
      maxabs = fmaxf(maxabs, fabsf(dv[i]));
    }
    // Pairwise, in a fixed order.
#pragma unroll
    for (int w = 1; w < V; w *= 2) {
#pragma unroll
      for (int i = 0; i + w < V; i += 2 * w) part[i] += part[i + w];
    }
    sum += part[0];
    cnt += static_cast<unsigned>(V);
  }
  // The pending batch as (count, mean, M2) into the moments: sum/cnt is its
  // mean of d - K and sq - sum * (sum/cnt) its M2 (the shifted-data
  // algorithm; rounding below 0 is clamped, a NaN stays NaN).
  __device__ __forceinline__ void flush() {
    if (cnt == 0) return;
    const float dm = sum / static_cast<float>(cnt);
    float m2 = sq - sum * dm;
    if (m2 < 0.0f) m2 = 0.0f;
    mom.add_batch(cnt, shift + dm, m2);
    cnt = 0u;
    sum = 0.0f;
    sq = 0.0f;
  }
};

// G at V columns after the clamp mask (Y = X for a seed that does not
// blend) and the clip scale, for a seed that neither blends nor trains, from
// the raw vectors of X (read only under the clamp) and G.
template <typename T, int V>
__device__ __forceinline__ void copy_step(const RawVec<T, V>& rx, const RawVec<T, V>& rg,
                                          const OutputClamp& clamp, float scale,
                                          float (&gp)[V]) {
  float gv[V];
  decode_vec<T, V>(rg, gv);
  float xv[V];
  if (clamp.enabled) decode_vec<T, V>(rx, xv);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    // DESIGN 4: G passes where lo <= Y <= hi; a NaN Y passes nothing.
    const bool pass = !clamp.enabled || (clamp.lo <= xv[i] && xv[i] <= clamp.hi);
    gp[i] = pass ? gv[i] * scale : 0.0f;
  }
}

// Where a pass's X and G are read: GlobalRows, straight from global memory
// (the generic kernel), or a ring of shared-memory stages that the TMA fills
// (backward_tma_sm90.cu's TmaRing). The row loops call wait(i) before pass i
// of this CTA and release(i) after it; both are uniform over the CTA (every
// thread runs the same passes). x/g give row `local` of pass i's tile.
struct GlobalRows {
  static constexpr bool kStaged = false;
  __device__ __forceinline__ void wait(int) const {}
  __device__ __forceinline__ void release(int) const {}
  template <typename T>
  __device__ __forceinline__ const T* x(int, int) const { return nullptr; }
  template <typename T>
  __device__ __forceinline__ const T* g(int, int) const { return nullptr; }
};

// The rows of this thread's row group in one pass: U rows, group,
// group + row_groups, ...; `active` is false past N (the pointers then point
// at row 0, never past the tensor).
template <typename T, int U, typename Ring = GlobalRows>
struct PassRows {
  const BackwardArgs& args;
  const Ring& ring;
  int64_t col0;
  int64_t row[U];  // 0 for a row past N: the pointers never leave the tensor
  bool active[U];
  int pass_index;  // this CTA's i-th pass (the ring's stage)
  int local0;      // the group's first row within the pass
  __device__ __forceinline__ PassRows(const BackwardArgs& a, int64_t n0, int64_t c0,
                                      const Ring& r, int i, int local)
      : args(a), ring(r), col0(c0), pass_index(i), local0(local) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t n = n0 + static_cast<int64_t>(u) * args.row_groups;
      active[u] = n < args.rows;
      row[u] = active[u] ? n : 0;
    }
  }
  // The row pointers, recomputed where they are used (a multiply-add each)
  // rather than held in 3 x U register pairs across the row loop.
  __device__ __forceinline__ const T* xr(int u) const {
    if constexpr (Ring::kStaged) {
      return ring.template x<T>(pass_index, local0 + u * args.row_groups);
    } else {
      return static_cast<const T*>(args.x) + row[u] * args.x_stride + col0;
    }
  }
  __device__ __forceinline__ const T* gr(int u) const {
    if constexpr (Ring::kStaged) {
      return ring.template g<T>(pass_index, local0 + u * args.row_groups);
    } else {
      return static_cast<const T*>(args.dy) + row[u] * args.dy_stride + col0;
    }
  }
  __device__ __forceinline__ T* dxr(int u) const {
    return static_cast<T*>(args.dx) + row[u] * args.dx_stride + col0;
  }
  // The raw vectors of X (when with_x) and G at column c of every active
  // row, all issued before any is used.
  template <int V>
  __device__ __forceinline__ void load(int c, bool with_x, RawVec<T, V> (&rx)[U],
                                       RawVec<T, V> (&rg)[U]) const {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!active[u]) continue;
      if (with_x) rx[u] = load_raw<T, V>(xr(u) + c);
      rg[u] = load_raw<T, V>(gr(u) + c);
    }
  }
};

// The rows of a seed that neither blends nor trains: dX = G after the mask
// and the clip scale, and dX's statistics. X is loaded only under the clamp.
template <typename T, int V, int U, typename Ring>
__device__ __forceinline__ void backward_copy_rows(const BackwardArgs& args, const Ring& ring,
                                                   int tile, int lane, int group, int64_t col0,
                                                   GradThreadStats& gs) {
  const int C = args.C;
  const int G = args.group;
  const int tiles = args.tiles;
  const int64_t R = args.rows_per_pass;
  const int64_t N = args.rows;
  const bool with_x = args.clamp.enabled;
  int i_pass = 0;
  for (int64_t pass = tile; pass * R < N; pass += tiles, ++i_pass) {
    ring.wait(i_pass);
    const PassRows<T, U, Ring> rows(args, pass * R + group, col0, ring, i_pass, group);
    float scale[U];
#pragma unroll
    for (int u = 0; u < U; ++u) scale[u] = 1.0f;
    if (args.clip_enabled) {
      // SPEC section 5 / DESIGN 5: the row chunk's norm of the masked G, in
      // float64 like the other seeds' (DESIGN 45), the factor rounded once.
      double ss[U];
#pragma unroll
      for (int u = 0; u < U; ++u) ss[u] = 0.0;
      for (int c = lane * V; c < C; c += G * V) {
        RawVec<T, V> rx[U], rg[U];
        rows.template load<V>(c, with_x, rx, rg);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (!rows.active[u]) continue;
          float gp[V];
          copy_step<T, V>(rx[u], rg[u], args.clamp, 1.0f, gp);
#pragma unroll
          for (int i = 0; i < V; ++i) ss[u] = fma(static_cast<double>(gp[i]), gp[i], ss[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        ss[u] = group_sum(ss[u], G);
        scale[u] = static_cast<float>(clip_factor(ss[u], args.clip_norm));
      }
    }
    for (int c = lane * V; c < C; c += G * V) {
      RawVec<T, V> rx[U], rg[U];
      rows.template load<V>(c, with_x, rx, rg);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!rows.active[u]) continue;
        float dv[V];
        copy_step<T, V>(rx[u], rg[u], args.clamp, scale[u], dv);
        store_vec<T, V>(rows.dxr(u) + c, dv);
        gs.add<V>(dv);
      }
    }
    if (gs.cnt >= kFlushCount) gs.flush();
    ring.release(i_pass);
  }
}

// The general loop's variants are common.cuh's Mode (copy seeds take
// backward_copy_rows), chosen once per CTA by a uniform switch (like the
// forward's, DESIGN 30): the per-element code has no test of the kind, the
// clamp or the clip. `wide` runs RESIDUAL, ATTENTION and MLP without the
// coefficient table (C too wide for it), with the kind tested per element.

// One step of a row for mode M, from the raw vectors of X and G at the V
// columns c..c+V-1: X in xs[2..V+1] (CONV: its two left neighbours in
// xs[0..1], and with `halo` its two right ones in xs[V+2..V+3]) and G after
// the clamp mask in g[0..V-1] (with `halo` CONV's two right neighbours in
// g[V..V+1]); 0 past the chunk end. The neighbours are scalar loads (L1
// hits: the neighbour lanes loaded their lines). The clip scale is applied by
// the caller. T and the coefficients are recomputed by the caller where it
// needs them (fewer values live across the step).
template <typename T, int V, Mode M, bool Clamp>
__device__ __forceinline__ void prepare_step(const RawVec<T, V>& rx, const RawVec<T, V>& rg,
                                             const T* xr, const T* gr, int c, int C,
                                             const SeedView& sv, const float* table, bool halo,
                                             float clo, float chi, float (&xs)[V + 4],
                                             float (&g)[V + 2]) {
  constexpr bool kConv = M == Mode::conv;
  float xv[V];
  float gv[V];
  decode_vec<T, V>(rx, xv);
  decode_vec<T, V>(rg, gv);
  xs[0] = (kConv && c >= 2) ? load_one(xr + c - 2) : 0.0f;
  xs[1] = (kConv && c >= 1) ? load_one(xr + c - 1) : 0.0f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    xs[i + 2] = xv[i];
    g[i] = gv[i];
  }
  xs[V + 2] = 0.0f;
  xs[V + 3] = 0.0f;
  g[V] = 0.0f;
  g[V + 1] = 0.0f;
  if (kConv && halo) {
    if (c + V < C) {
      xs[V + 2] = load_one(xr + c + V);
      g[V] = load_one(gr + c + V);
    }
    if (c + V + 1 < C) {
      xs[V + 3] = load_one(xr + c + V + 1);
      g[V + 1] = load_one(gr + c + V + 1);
    }
  }
  if constexpr (Clamp) {
    const float a = sv.a;
    const float b = 1.0f - sv.a;
#pragma unroll
    for (int k = 0; k < V + 2; ++k) {
      if (k >= V && !(kConv && halo)) continue;
      const float xk = xs[k + 2];
      const float t = mode_transform<M>(sv, mode_coef<M>(sv, table, c + k), xk, xs[k + 1], xs[k]);
      // DESIGN 4: G passes where lo <= Y <= hi; a NaN Y passes nothing. Y
      // as the forward computes it (the same bits).
      const float yk = sv.blends ? blend_value(a, b, t, xk) : xk;
      const bool pass = clo <= yk && yk <= chi;
      g[k] = pass ? g[k] : 0.0f;
    }
  }
}

// The shared-memory halo of a CONV row (CudaLaunchConfig::backward_conv_halo,
// issue 7's "shared-memory backward with halos"): per row in flight, X at
// hx[4 + j] with zeros at hx[2..3] (X[-2], X[-1]) and hx[C+4..C+5], then
// the clamp-masked G at hg[j] with zeros at hg[C..C+1]; hx and hg start at
// 16-byte boundaries, so a lane's own V values are aligned vector accesses.
__host__ __device__ constexpr int halo_x_floats(int C) { return (C + 6 + 3) / 4 * 4; }
__host__ __device__ constexpr int halo_row_floats(int C) {
  return halo_x_floats(C) + (C + 2 + 3) / 4 * 4;
}

// The lanes of this thread's row group (G lanes, a power of two <= 32, so
// inside one warp).
__device__ __forceinline__ unsigned group_lanes(int G) {
  if (G >= 32) return 0xffffffffu;
  const unsigned lane_in_warp = threadIdx.x & 31u;
  return ((1u << G) - 1u) << (lane_in_warp & ~static_cast<unsigned>(G - 1));
}

template <int V>
__device__ __forceinline__ void smem_store_vec(float* p, const float (&v)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      *reinterpret_cast<float4*>(p + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = v[i];
  }
}
template <int V>
__device__ __forceinline__ void smem_load_vec(const float* p, float* v) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      const float4 q = *reinterpret_cast<const float4*>(p + i);
      v[i] = q.x;
      v[i + 1] = q.y;
      v[i + 2] = q.z;
      v[i + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = p[i];
  }
}

// One CONV step from the halo: what prepare_step gives with `halo` (X with
// its two left neighbours in xs, the masked G with its two right ones in g),
// read from shared memory; the same values, so the same bits.
template <int V>
__device__ __forceinline__ void halo_step(const float* hx, const float* hg, int c,
                                          float (&xs)[V + 4], float (&g)[V + 2]) {
  xs[0] = hx[c + 2];
  xs[1] = hx[c + 3];
  smem_load_vec<V>(hx + 4 + c, xs + 2);
  xs[V + 2] = 0.0f;  // only the clamp mask reads these, and it ran at staging
  xs[V + 3] = 0.0f;
  smem_load_vec<V>(hg + c, g);
  g[V] = hg[c + V];
  g[V + 1] = hg[c + V + 1];
}

// The clip's factors of U rows from their sums of squares over this lane's
// columns: summed over the row group, in float64 for the scalar sums
// (DESIGN 45) and rounded to float32 for dX.
template <int U>
__device__ __forceinline__ void clip_scales(double (&ss)[U], int G, float clip_norm,
                                            double (&scale_d)[U], float (&scale)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    ss[u] = group_sum(ss[u], G);
    scale_d[u] = clip_factor(ss[u], clip_norm);
    scale[u] = static_cast<float>(scale_d[u]);
  }
}

// Rows of one CTA for one mode (a seed that blends or trains): dX, its
// per-thread statistics, the scalar sums in st and the dW column sums in
// this row group's shared row (acc = its slot of column lane*V; column
// lane*V + i + k*G*V is acc[k*G*V + i*G], acc_slot's layout). The row group
// takes U rows per pass and loads X and G of all U before it computes on the
// first; the U rows add into the shared row in row order.
// Halo (CONV only): the rows' chunks are staged in `acc`'s shared row first
// (halo_row_floats per row in flight): one sweep of X and G from global
// memory, the clamp mask and the clip's norm from shared memory, then the
// step reads its neighbours there instead of from L1.
template <typename T, int V, int U, Mode M, bool Clamp, bool Clip, bool Halo, typename Ring>
__device__ __forceinline__ void backward_rows(const BackwardArgs& args, const Ring& ring,
                                              const SeedView& sv,
                                              const float* table, float* acc, bool grads,
                                              int tile, int lane, int group, int64_t col0,
                                              BwdStats& st, GradThreadStats& gs) {
  constexpr bool kConv = M == Mode::conv;
  static_assert(!Halo || kConv, "the shared-memory halo is CONV's");
  using S = ScalarSum<T>;
  const int C = args.C;
  const int G = args.group;
  const int tiles = args.tiles;
  const int64_t R = args.rows_per_pass;
  const int64_t N = args.rows;
  const int span = G * V;
  const bool blends = sv.blends;
  const bool halo = kConv && blends;  // dX of CONV reads G two columns ahead
  const float a = sv.a;
  const float b = 1.0f - sv.a;
  const float sigma = sv.sigma;
  const float w0 = sv.w0, w1 = sv.w1, w2 = sv.w2;
  const float clo = args.clamp.lo;
  const float chi = args.clamp.hi;
  int i_pass = 0;
  for (int64_t pass = tile; pass * R < N; pass += tiles, ++i_pass) {
    ring.wait(i_pass);
    const PassRows<T, U, Ring> rows(args, pass * R + group, col0, ring, i_pass, group);
    // This pass's scalar sums (DESIGN 47), added into st after the pass.
    PassSums<S> ps[U];
    // The clip's factor in float64 for the scalar sums (DESIGN 45) and
    // rounded to float32 for dX.
    float scale[U];
    double scale_d[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      scale[u] = 1.0f;
      scale_d[u] = 1.0;
    }
    // The halo rows of this group: acc is its shared row at column lane*V's
    // slot; the row starts `lane` floats earlier.
    float* const hrow = acc - lane;
    if constexpr (Halo) {
      const int rowf = halo_row_floats(C);
      const int xf = halo_x_floats(C);
      for (int c = lane * V; c < C; c += span) {
        RawVec<T, V> rx[U], rg[U];
        rows.template load<V>(c, true, rx, rg);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (!rows.active[u]) continue;
          float xv[V], gv[V];
          decode_vec<T, V>(rx[u], xv);
          decode_vec<T, V>(rg[u], gv);
          smem_store_vec<V>(hrow + u * rowf + 4 + c, xv);
          smem_store_vec<V>(hrow + u * rowf + xf + c, gv);
        }
      }
      if (lane == 0) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          float* hx = hrow + u * rowf;
          hx[2] = hx[3] = hx[C + 4] = hx[C + 5] = 0.0f;
          hx[xf + C] = hx[xf + C + 1] = 0.0f;
        }
      }
      __syncwarp(group_lanes(G));
      if constexpr (Clamp) {
        // DESIGN 4's mask, column by column as prepare_step forms it, into
        // G in place (each lane its own columns; X is only read).
        for (int c = lane * V; c < C; c += span) {
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (!rows.active[u]) continue;
            const float* hx = hrow + u * rowf;
            float* hg = hrow + u * rowf + xf;
#pragma unroll
            for (int i = 0; i < V; ++i) {
              const float xk = hx[4 + c + i];
              const float t = mode_transform<M>(sv, mode_coef<M>(sv, table, c + i), xk,
                                                hx[3 + c + i], hx[2 + c + i]);
              const float yk = sv.blends ? blend_value(a, b, t, xk) : xk;
              const bool pass = clo <= yk && yk <= chi;
              hg[c + i] = pass ? hg[c + i] : 0.0f;
            }
          }
        }
        __syncwarp(group_lanes(G));
      }
      if constexpr (Clip) {
        double ss[U];
#pragma unroll
        for (int u = 0; u < U; ++u) ss[u] = 0.0;
        for (int c = lane * V; c < C; c += span) {
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (!rows.active[u]) continue;
            float g[V];
            smem_load_vec<V>(hrow + u * rowf + xf + c, g);
#pragma unroll
            for (int i = 0; i < V; ++i) ss[u] = fma(static_cast<double>(g[i]), g[i], ss[u]);
          }
        }
        clip_scales<U>(ss, G, args.clip_norm, scale_d, scale);
      }
    } else if constexpr (Clip) {
      // SPEC section 5 / DESIGN 5: the row chunk's norm of the masked G in
      // float64 for every dtype (squares of floats are exact there, and
      // bfloat16's range would overflow a float32 sum of squares, zeroing
      // the very rows the clip is for).
      double ss[U];
#pragma unroll
      for (int u = 0; u < U; ++u) ss[u] = 0.0;
      for (int c = lane * V; c < C; c += span) {
        RawVec<T, V> rx[U], rg[U];
        rows.template load<V>(c, true, rx, rg);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (!rows.active[u]) continue;
          float xs[V + 4], g[V + 2];
          prepare_step<T, V, M, Clamp>(rx[u], rg[u], rows.xr(u), rows.gr(u), c, C, sv, table,
                                       false, clo, chi, xs, g);
#pragma unroll
          for (int i = 0; i < V; ++i) ss[u] = fma(static_cast<double>(g[i]), g[i], ss[u]);
        }
      }
      clip_scales<U>(ss, G, args.clip_norm, scale_d, scale);
    }
    float* accp = acc;
    for (int c = lane * V; c < C; c += span, accp += span) {
      RawVec<T, V> rx[U], rg[U];
      if constexpr (!Halo) rows.template load<V>(c, true, rx, rg);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!rows.active[u]) continue;
        float xs[V + 4], g[V + 2];
        if constexpr (Halo) {
          const int rowf = halo_row_floats(C);
          halo_step<V>(hrow + u * rowf, hrow + u * rowf + halo_x_floats(C), c, xs, g);
        } else {
          prepare_step<T, V, M, Clamp>(rx[u], rg[u], rows.xr(u), rows.gr(u), c, C, sv, table,
                                       halo, clo, chi, xs, g);
        }
        // g stays unscaled: the float64 terms take the exact factor; the
        // float32 path scales each value where it is used.
        const float sc = scale[u];
        float dv[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float gi = Clip ? g[i] * sc : g[i];
          const float xi = xs[i + 2];
          const float cf = mode_coef<M>(sv, table, c + i);
          // The scalar sums' terms in S (see BwdStats): for float32 inputs
          // float64, where products of two floats are exact, so T - X and
          // dT/dsigma carry no float32 rounding (which, per column, does not
          // average out); float32 for 16-bit inputs (DESIGN 47).
          const S gd = Clip ? static_cast<S>(g[i]) * static_cast<S>(scale_d[u]) : static_cast<S>(g[i]);
          const S xd = xi;
          float through;  // dT/dX applied to G
          S t_minus_x;
          if constexpr (kConv) {
            const float g1 = Clip ? g[i + 1] * sc : g[i + 1];
            const float g2 = Clip ? g[i + 2] * sc : g[i + 2];
            through = sigma * conv_sum(w0, w1, w2, gi, g1, g2);
            const S x1 = xs[i + 1], x2 = xs[i];
            ps[u].cw0 = fma(gd, xd, ps[u].cw0);
            ps[u].cw1 = fma(gd, x1, ps[u].cw1);
            ps[u].cw2 = fma(gd, x2, ps[u].cw2);
            const S conv = conv_sum<S>(w0, w1, w2, xd, x1, x2);
            ps[u].dsig = fma(gd, conv, ps[u].dsig);
            t_minus_x = fma(static_cast<S>(sigma), conv, -xd);
          } else {
            const bool att = M == Mode::attention ||
                             (M == Mode::wide && sv.kind == static_cast<int>(Kind::attention));
            const bool mlp = M == Mode::mlp ||
                             (M == Mode::wide && sv.kind == static_cast<int>(Kind::mlp));
            const S cd = cf;
            float contrib;
            if (att) {
              through = cf * gi;
              contrib = gi * xi;
              t_minus_x = xd * (cd - S(1));  // at most one rounding in float64
            } else if (mlp) {
              const float pre = xi * cf;
              through = pre > 0.0f ? sigma * cf * gi : 0.0f;
              contrib = pre > 0.0f ? gi * xi : 0.0f;
              const S pred = xd * cd;  // exact in float64
              const S r = pred > S(0) ? pred : S(0);
              ps[u].dsig = fma(gd, r, ps[u].dsig);
              t_minus_x = fma(static_cast<S>(sigma), r, -xd);
            } else {  // RESIDUAL
              through = gi;
              contrib = gi;
              ps[u].dsig = fma(gd, cd, ps[u].dsig);
              t_minus_x = static_cast<S>(sigma) * cd;  // exact in float64
            }
            if (grads) accp[i * G] += contrib;  // uniform
          }
          dv[i] = blends ? fmaf(a, through, b * gi) : gi;
          // Summed for every seed; kept only where alpha has a gradient.
          ps[u].dalpha = fma(gd, t_minus_x, ps[u].dalpha);
        }
        store_vec<T, V>(rows.dxr(u) + c, dv);
        gs.add<V>(dv);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) ps[u].add_to(st);
    if (gs.cnt >= kFlushCount) gs.flush();
    if constexpr (Halo) __syncwarp(group_lanes(G));  // the next pass restages the rows
    ring.release(i_pass);
  }
}

template <typename T, int V, int U, Mode M, bool Halo, typename Ring>
__device__ __forceinline__ void backward_rows_cc(const BackwardArgs& args, const Ring& ring,
                                                 const SeedView& sv,
                                                 const float* table, float* acc, bool grads,
                                                 int tile, int lane, int group, int64_t col0,
                                                 BwdStats& st, GradThreadStats& gs) {
  if (args.clamp.enabled) {
    if (args.clip_enabled) {
      backward_rows<T, V, U, M, true, true, Halo>(args, ring, sv, table, acc, grads, tile, lane, group, col0, st, gs);
    } else {
      backward_rows<T, V, U, M, true, false, Halo>(args, ring, sv, table, acc, grads, tile, lane, group, col0, st, gs);
    }
  } else {
    if (args.clip_enabled) {
      backward_rows<T, V, U, M, false, true, Halo>(args, ring, sv, table, acc, grads, tile, lane, group, col0, st, gs);
    } else {
      backward_rows<T, V, U, M, false, false, Halo>(args, ring, sv, table, acc, grads, tile, lane, group, col0, st, gs);
    }
  }
}

// One CTA of the backward: tile `tile` of seed s (blockIdx.x = s * tiles +
// tile). smem: [table_floats] coefficients, [row_groups, C_padded] sums.
template <typename T, int V, int U, bool Halo, typename Ring>
__device__ __forceinline__ void backward_cta(const BackwardArgs& args, float* smem,
                                             const Ring& ring) {
  __shared__ GradPart grad_scratch[8];
  __shared__ SumPart sum_part_scratch[8];
  __shared__ SumF sum_scratch[8];
  __shared__ MaxF max_scratch[8];
  __shared__ BwdStats seed_total;
  __shared__ float bcast;
  __shared__ int is_last;
  __shared__ int row_seeds;  // training seeds of the seed's blueprint row (its last CTA)
  __shared__ unsigned used_rows;  // which of 32 blueprint rows a training seed adds into
  __shared__ int row_list[kRowList];  // a row's training seeds in seed order (its last seed)

  const int tiles = args.tiles;
  const int s = static_cast<int>(blockIdx.x) / tiles;
  const int tile = static_cast<int>(blockIdx.x) - s * tiles;
  const int C = args.C;
  const int Cp = args.C_padded;
  const int G = args.group;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int group = static_cast<int>(threadIdx.x) / G;
  const int nthreads = static_cast<int>(blockDim.x);
  float* col_acc = smem + args.table_floats;

  __shared__ float att_norm[2];  // ATTENTION: the softmax's max and sum
  BwdStats st = BwdStats::identity();
  {
    SeedView sv = load_seed_view(args.seeds, args.registry, s, C);
    const bool grads = sv.grafted || sv.shadow;
    const bool is_conv = sv.kind == static_cast<int>(Kind::conv);
    if (sv.kind == static_cast<int>(Kind::attention) && (sv.blends || grads)) {
      compute_softmax<true>(sv, C, sum_scratch, max_scratch, &bcast);
      if (threadIdx.x == 0) {
        att_norm[0] = sv.att_max;
        att_norm[1] = sv.att_sum;
      }
    }
    const float* table = nullptr;
    if (args.table_floats > 0 && (sv.blends || grads) && !is_conv) {
      fill_coef_table(sv, C, smem);
      table = smem;
    }
    if (grads && !is_conv) {
      for (int i = static_cast<int>(threadIdx.x); i < args.row_groups * Cp; i += nthreads) {
        col_acc[i] = 0.0f;
      }
    }
    __syncthreads();
    KASMINA_BWD_TL_WHERE(s, tile);
    KASMINA_BWD_TL(1);
    float* my_acc = col_acc + static_cast<int64_t>(group) * Cp + lane;  // acc_slot of column lane*V

    const int64_t col0 = static_cast<int64_t>(s) * C;
    GradThreadStats gs = GradThreadStats::identity();
    // The loop variant, picked once per CTA (uniform): a seed that neither
    // blends nor trains takes the copy loop.
    if (!sv.blends && !grads) {
      backward_copy_rows<T, V, U>(args, ring, tile, lane, group, col0, gs);
    } else if (is_conv) {
      // The halo kernel (CudaLaunchConfig::backward_conv_halo) runs one row
      // in flight: with two, the float32 instance spilled.
      static_assert(!Halo || U == 1, "the CONV halo runs one row in flight");
      backward_rows_cc<T, V, U, Mode::conv, Halo>(args, ring, sv, table, my_acc, grads, tile, lane, group, col0, st, gs);
    } else if (table == nullptr) {
      backward_rows_cc<T, V, U, Mode::wide, false>(args, ring, sv, table, my_acc, grads, tile, lane, group, col0, st, gs);
    } else if (sv.kind == static_cast<int>(Kind::attention)) {
      backward_rows_cc<T, V, U, Mode::attention, false>(args, ring, sv, table, my_acc, grads, tile, lane, group, col0, st, gs);
    } else if (sv.kind == static_cast<int>(Kind::mlp)) {
      backward_rows_cc<T, V, U, Mode::mlp, false>(args, ring, sv, table, my_acc, grads, tile, lane, group, col0, st, gs);
    } else {
      backward_rows_cc<T, V, U, Mode::residual, false>(args, ring, sv, table, my_acc, grads, tile, lane, group, col0, st, gs);
    }
    gs.flush();
    KASMINA_BWD_TL(2);
    st.mom = gs.mom.to_moments();
    st.sumsq = gs.sumsq;
    st.maxabs = gs.maxabs;
  }

  // The thread index and the seed's view again for the finishing steps,
  // read anew rather than kept live across the loops (fewer live registers;
  // when the float32 kernel fitted 80, 3 CTAs/SM, ptxas spilled the thread
  // index otherwise; DESIGN 31).
  const int tid = thread_index();
  SeedView sv = load_seed_view(args.seeds, args.registry, s, C);
  const int kind = sv.kind;
  const bool grads = sv.grafted || sv.shadow;
  const float a_eff = sv.shadow ? 1.0f : sv.a;  // SPEC section 7: shadow grads as if a = 1
  const bool alpha_grad = sv.grafted && sv.alpha >= 0.0f && sv.alpha <= 1.0f;  // DESIGN 6
  const bool is_conv = kind == static_cast<int>(Kind::conv);
  const bool is_att = kind == static_cast<int>(Kind::attention);
  if (is_att && (sv.blends || grads)) {
    sv.att_max = att_norm[0];  // published by the block reductions' barriers
    sv.att_sum = att_norm[1];
  }
  const bool cols = grads && !is_conv;
  const float* table =
      (args.table_floats > 0 && (sv.blends || grads) && !is_conv) ? smem : nullptr;

  // ---- this CTA's partials
  // The reduction's barriers publish col_acc too.
  const BwdStats cta = block_reduce_split(st, grad_scratch, sum_part_scratch);
  const int64_t part0 = static_cast<int64_t>(s) * tiles;
  if (cols) {
    float* mine = args.col_partials + (part0 + tile) * C;
    for (int j = tid; j < C; j += nthreads) {
      const int slot = acc_slot(j, G, V);
      float v = 0.0f;
      for (int g = 0; g < args.row_groups; ++g) v += col_acc[g * Cp + slot];
      mine[j] = v;
    }
  }
  if (tid == 0) args.partials[part0 + tile] = cta;
  KASMINA_BWD_TL(3);
  __syncthreads();  // the CTA's column partials are thread 0's to release
  if (tid == 0) is_last = take_ticket(&args.tickets[s]) == static_cast<unsigned>(tiles - 1);
  __syncthreads();
  KASMINA_BWD_TL(4);
  KASMINA_BWD_TL_FLAG(16, is_last);
  if (!is_last) return;

  // ---- last CTA of seed s: the seed's gradients
  BwdStats acc = BwdStats::identity();
  if (tiles <= 32) {  // uniform
    // Warp 0 alone: the bits of block_reduce_split, whose warps past the
    // first hold identities here; its merges of them change a value at most
    // as one merge with the identity does (x + 0, fmaxf(x, 0)), so that
    // merge is done once.
    if (tid < 32) {
      if (tid < tiles) acc.merge(load_partial(args.partials + part0 + tid));
      KASMINA_BWD_TL(8);
      GradPart g = warp_reduce<true>(GradPart{acc.mom, acc.sumsq, acc.maxabs});
      SumPart p = warp_reduce<true>(SumPart{acc.dsig, acc.dalpha, acc.cw0, acc.cw1, acc.cw2});
      g.merge(GradPart::identity());
      p.merge(SumPart::identity());
      if (tid == 0) seed_total = {g.mom, g.sumsq, g.maxabs, p.dsig, p.dalpha, p.cw0, p.cw1, p.cw2};
    }
  } else {
#pragma unroll 1
    for (int i = tid; i < tiles; i += nthreads) acc.merge(load_partial(args.partials + part0 + i));
    KASMINA_BWD_TL(8);
    acc = block_reduce_split(acc, grad_scratch, sum_part_scratch);
    if (tid == 0) seed_total = acc;
  }
  // How many training seeds add into this seed's blueprint row, this one
  // included (counted by barriers: any order gives the same count). One:
  // the row of dweights/dscales is this seed's alone, zero plus its own
  // row, and this CTA writes it (DESIGN 62). More: the row's last seed to
  // finish sums them (DESIGN 67).
  int row_n = __syncthreads_count(grads && tid < args.num_seeds &&
                                  seed_adds_into(args.seeds, tid, sv.blueprint));  // also publishes seed_total
  if (grads) {  // uniform
#pragma unroll 1
    for (int s0 = nthreads; s0 < args.num_seeds; s0 += nthreads) {
      const int s2 = s0 + tid;
      row_n += __syncthreads_count(s2 < args.num_seeds && seed_adds_into(args.seeds, s2, sv.blueprint));
    }
  }
  const bool sole = grads && row_n == 1;
  if (tid == 0) row_seeds = row_n;  // for the row's ticket, not kept in a register
  KASMINA_BWD_TL(9);
  // params.hpp: the workspace is left zero-filled by every launch (the
  // barriers above order every read of these partials before the clears).
  for (int i = tid; i < tiles; i += nthreads) args.partials[part0 + i] = BwdStats{};
  const BwdStats total = seed_total;
  // The seed's row: staged for its row's last seed to sum (and clear), or
  // (sole) the blueprint's row of dweights, 0.0f + v as that sum would have
  // written it (the bits of a zero-started sum: -0 becomes +0); ATTENTION's
  // q goes through the same row, each column read back by the thread that
  // wrote it.
  float* drow = sole ? args.dweights + static_cast<int64_t>(sv.blueprint) * C
                     : args.seed_dw + static_cast<int64_t>(s) * C;
  if (grads) {
    const float a_sigma = a_eff * sv.sigma;
    if (cols) {
      float pq = 0.0f;
#pragma unroll 1
      for (int j = tid; j < C; j += nthreads) {
        // Tile order: kFinishBatch independent loads, then the adds in
        // order (the bits of a running sum, one L2 round trip per batch).
        float* col = args.col_partials + part0 * C + j;
        float sum = 0.0f;
#pragma unroll 1
        for (int t0 = 0; t0 < tiles; t0 += kFinishBatch) {
          float x[kFinishBatch];
#pragma unroll
          for (int k = 0; k < kFinishBatch; ++k) {
            x[k] = t0 + k < tiles ? load_cg(col + static_cast<int64_t>(t0 + k) * C) : 0.0f;
          }
#pragma unroll
          for (int k = 0; k < kFinishBatch; ++k) {
            if (t0 + k < tiles) {
              sum += x[k];
              col[static_cast<int64_t>(t0 + k) * C] = 0.0f;  // read by this thread only
            }
          }
        }
        if (is_att) {
          const float q = a_eff * sum;
          drow[j] = q;
          pq += coef_at(sv, table, j) * q;
        } else {
          drow[j] = 0.0f + a_sigma * sum;
        }
      }
      if (is_att) {
        // SPEC section 5: dw = p * (q - <p, q>), the softmax Jacobian.
        pq = block_sum_all<true>(pq, sum_scratch, &bcast);
        for (int j = tid; j < C; j += nthreads) drow[j] = 0.0f + coef_at(sv, table, j) * (drow[j] - pq);
      }
    } else {
      for (int j = tid; j < C; j += nthreads) {
        const double tap = j == 0 ? total.cw0 : (j == 1 ? total.cw1 : (j == 2 ? total.cw2 : 0.0));
        drow[j] = 0.0f + (j < 3 ? static_cast<float>(static_cast<double>(a_sigma) * tap) : 0.0f);
      }
    }
  }
  KASMINA_BWD_TL(10);
  if (tid == 0) {
    const float dscale =
        (grads && !is_att) ? static_cast<float>(static_cast<double>(a_eff) * total.dsig) : 0.0f;
    if (sole) {
      args.dscales[sv.blueprint] = 0.0f + dscale;
    } else if (grads) {
      args.seed_dscale[s] = dscale;
    }
    args.dalpha[s] = alpha_grad ? static_cast<float>(total.dalpha) : 0.0f;
    const unsigned long long n = total.mom.n;
    float* gs = args.grad_stats + static_cast<int64_t>(s) * kGradStatsWidth;
    gs[kGradL2Norm] = sqrtf(total.sumsq);
    gs[kGradVariance] = n > 0 ? total.mom.m2 / static_cast<float>(n) : 0.0f;
    gs[kGradMaxAbs] = total.maxabs;
    args.tickets[s] = 0u;
  }
  // Rows that no training seed adds into are zero: seed s writes those of
  // rows s, s + S, s + 2S, ... (every row has one such seed), 32 rows at a
  // time: the threads mark the rows a seed adds into (a shared bit mask),
  // then write the unmarked rows.
  const int S = args.num_seeds;
  const int W = C + 1;  // C columns of dweights, then dscales
  const int my_rows = s < args.registry.num_blueprints ? (args.registry.num_blueprints - 1 - s) / S + 1 : 0;
#pragma unroll 1
  for (int r0 = 0; r0 < my_rows; r0 += 32) {  // uniform
    const int nr = my_rows - r0 < 32 ? my_rows - r0 : 32;
    if (tid == 0) used_rows = 0u;
    __syncthreads();
    for (int s2 = tid; s2 < S; s2 += nthreads) {
      const int b = args.seeds.blueprint[s2];
      const int r = (b - s) / S - r0;  // row b is this CTA's r-th (b >= s, (b - s) % S == 0)
      if (b >= s && (b - s) % S == 0 && r >= 0 && r < nr && seed_has_grads(args.seeds, s2)) {
        atomicOr(&used_rows, 1u << r);
      }
    }
    __syncthreads();
    const unsigned used = used_rows;
    for (int i = tid; i < nr * W; i += nthreads) {
      const int r = i / W;
      const int c = i - r * W;
      if ((used >> r) & 1u) continue;
      const int b = s + (r0 + r) * S;
      if (c < C) {
        args.dweights[static_cast<int64_t>(b) * C + c] = 0.0f;
      } else {
        args.dscales[b] = 0.0f;
      }
    }
    __syncthreads();  // used_rows is read before the next round clears it
  }
  KASMINA_BWD_TL(5);
  if (!grads || sole) {  // uniform: no row to sum
    KASMINA_BWD_TL(6);
    return;
  }
  __syncthreads();  // the seed's staged row is thread 0's to release
  const int b = sv.blueprint;
  if (tid == 0) is_last = take_ticket(&args.row_tickets[b]) == static_cast<unsigned>(row_seeds - 1);
  __syncthreads();
  KASMINA_BWD_TL(6);
  KASMINA_BWD_TL_FLAG(17, is_last);
  if (!is_last) return;

  // ---- the last seed of row b to finish: the row of dweights and dscales
  // (DESIGN 3: zero plus its seeds' rows added in seed order). One thread
  // per column, C standing for dscales[b]: it reads the row's seeds
  // kFinishBatch at a time (independent loads), adds them in seed order,
  // the bits of a running sum (DESIGN 57), and clears what it read (read by
  // this thread only: the staging rows are zero again). The row's seeds
  // come from a scan of the seed table, or (args.row_list, DESIGN 69) from a
  // list that warp 0 builds in seed order, 32 seeds a ballot, where the row
  // has at most kRowList seeds.
  // sum_row(n, seed_of): entries 0 .. n-1, seed_of(i, s2) true where entry
  // i is a seed of the row (its index in s2), in seed order.
  auto sum_row = [&](const int n, auto seed_of) {
#pragma unroll 1
    for (int c = tid; c < W; c += nthreads) {
      float v = 0.0f;
      float* src = c < C ? args.seed_dw + c : args.seed_dscale;
      const int64_t stride = c < C ? C : 1;
#pragma unroll 1
      for (int i0 = 0; i0 < n; i0 += kFinishBatch) {
        float x[kFinishBatch];
        int64_t at[kFinishBatch];  // the staged value's offset, -1 where entry i0 + k is not the row's
#pragma unroll
        for (int k = 0; k < kFinishBatch; ++k) {
          int s2 = 0;
          at[k] = seed_of(i0 + k, s2) ? s2 * stride : -1;
          x[k] = at[k] >= 0 ? load_cg(src + at[k]) : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < kFinishBatch; ++k) {
          if (at[k] >= 0) {
            v += x[k];
            src[at[k]] = 0.0f;
          }
        }
      }
      if (c < C) {
        args.dweights[static_cast<int64_t>(b) * C + c] = v;
      } else {
        args.dscales[b] = v;
      }
    }
  };
  const int n_row = row_seeds;
  if (args.row_list && n_row <= kRowList) {  // uniform
    if (tid < 32) {
      int base = 0;
#pragma unroll 1
      for (int s0 = 0; s0 < S && base < n_row; s0 += 32) {  // uniform in the warp
        const int s2 = s0 + tid;
        const bool in = s2 < S && seed_adds_into(args.seeds, s2, b);
        const unsigned m = __ballot_sync(0xffffffffu, in);
        if (in) row_list[base + __popc(m & ((1u << tid) - 1u))] = s2;
        base += __popc(m);
      }
    }
    __syncthreads();
    sum_row(n_row, [&](int i, int& s2) {
      if (i >= n_row) return false;
      s2 = row_list[i];
      return true;
    });
  } else {
    sum_row(S, [&](int i, int& s2) {
      s2 = i;
      return i < S && seed_adds_into(args.seeds, i, b);
    });
  }
  KASMINA_BWD_TL(11);
  if (tid == 0) args.row_tickets[b] = 0u;
}

// ------------------------------------------------------------------ TMA
// The Hopper variant (backward_tma_sm90.cu; CudaLaunchConfig::backward_tma).
// Why it cannot run for this plan, or nullptr. `plan` is the generic plan at
// one row in flight.
const char* backward_tma_refusal(const BackwardParams& p, const LaunchPlan& plan,
                                 const DeviceInfo& dev, int64_t C, bool vector_path);
// The pipeline depth (plan.stages: the one asked for, CudaLaunchConfig::
// backward_stages, else from the tuning's stage budget; lowered to fit the
// shared memory) and the tiles of the TMA kernel, keeping
// at least `resident_generic` CTAs per SM (the generic kernel's).
LaunchPlan backward_tma_finish(LaunchPlan plan, const BackwardParams& p, const DeviceInfo& dev,
                               int resident_generic);
// Launches it on p.stream (tensor maps of x and dy, cached).
void backward_tma_launch(const LaunchPlan& plan, const BackwardParams& p, const BackwardArgs& args);

}  // namespace kasmina::cuda::bwd
