// CUDA forward (SPEC sections 3 and 4): one launch reads every chunk once,
// writes y and computes all telemetry.
//
// Grid: (row tiles x seeds), flattened. A CTA works on one seed's chunk; its
// threads form row groups of G lanes (a power of two <= 8, tuning.hpp), each
// group covers one chunk row V elements per lane per step (16-byte accesses
// on the vector path) and loops along the row when C > G*V. The CTA visits
// row passes tile, tile + tiles, ... so the tile count, and with it the
// workspace, does not depend on N. The blueprint's per-column coefficients
// (w, or softmax(w) for ATTENTION) sit in a shared-memory table built once
// per CTA. The row loop is specialised per seed kind and clamp (template),
// picked once per CTA: a copy seed only copies and measures.
//
// Telemetry: per-thread statistics (shifted sums folded into Chan-merged
// moments, DESIGN 30; the drift's row sums in float64, DESIGN 28), a fixed
// shuffle/warp-order block reduction into one partial per CTA in the
// workspace, and the last CTA of each seed (an integer ticket after a
// __threadfence) merges the seed's partials in a fixed tree, writes the
// telemetry row, clears the partials and resets its ticket, so the
// workspace is zero again. No floating-point
// atomics: the bits depend only on the launch plan, which depends only on
// the params and the device.
#include <cuda_runtime.h>

#include <sstream>
#include <string>
#include <vector>

#include "backends.hpp"
#include "cuda/common.cuh"
#include "cuda/cuda_check.hpp"
#include "kasmina/error.hpp"

namespace kasmina::cuda {
namespace {

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
  __device__ __forceinline__ FwdStats shfl_down(int off) const {
    return {mom.shfl_down(off),
            __shfl_down_sync(0xffffffffu, lo, off),
            __shfl_down_sync(0xffffffffu, hi, off),
            __shfl_down_sync(0xffffffffu, dead, off),
            __shfl_down_sync(0xffffffffu, nonfinite, off),
            __shfl_down_sync(0xffffffffu, drift_sum, off)};
  }
};

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

  __device__ __forceinline__ static ThreadStats identity() {
    return {{0u, 0.0f, 0.0f}, 0u, 0.0f, 0.0f, 0.0f, INFINITY, -INFINITY, 0.0f, 0u, 0u, 0.0};
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
  __device__ __forceinline__ FwdStats widen() const {
    return {mom.to_moments(), lo, hi, dead, nonfinite, drift_sum};
  }
};

// Telemetry of V input values. One finiteness test per vector: the sum of
// the shifted values is non-finite when any value is NaN or Inf (or, rarely,
// when it overflows); then the exact per-value path runs, else the values
// go into the shifted sums, min/max and the dead count without a test.
template <int V>
__device__ __forceinline__ void add_values(ThreadStats& st, const float (&xv)[V],
                                           float dead_threshold) {
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
#pragma unroll
    for (int i = 0; i < V; ++i) {
      st.sq = fmaf(d[i], d[i], st.sq);
      st.lo = fminf(st.lo, xv[i]);
      st.hi = fmaxf(st.hi, xv[i]);
      st.dead_pending += fabsf(xv[i]) <= dead_threshold ? 1.0f : 0.0f;
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
  FwdStats* partials;   // [S, tiles]
};

// group_sum of the three drift sums over a row group of G <= 8 lanes
// (kForwardGroupThreads): unrolled with immediate offsets, the three
// butterflies interleaved; the same additions in the same order as
// group_sum, so the same bits in every lane of the group.
__device__ __forceinline__ void group_sum3(double& a, double& b, double& c, int G) {
  static_assert(kForwardGroupThreads <= 8, "group_sum3 unrolls three butterfly steps");
#pragma unroll
  for (int off = 4; off >= 1; off /= 2) {
    if (off < G) {  // uniform; lane ^ off stays in the lane's aligned group
      const double a2 = __shfl_xor_sync(0xffffffffu, a, off);
      const double b2 = __shfl_xor_sync(0xffffffffu, b, off);
      const double c2 = __shfl_xor_sync(0xffffffffu, c, off);
      a += a2;
      b += b2;
      c += c2;
    }
  }
}

// The inner loop's variants, one per seed kind (and copy), chosen once per
// CTA by a uniform switch: the per-element code has no test of the kind, of
// the stage or of the clamp. `wide` runs RESIDUAL, ATTENTION and MLP
// without the coefficient table (C too wide for it).
enum class Mode { copy, residual, attention, mlp, conv, wide };

// Rows of one CTA for one mode: y, the per-thread telemetry and the drift.
// A row group takes U rows of each row pass (group, group + row_groups, ...)
// and loads its vector of all U rows before it computes on the first: U
// 16-byte loads in flight per thread, where one leaves HBM idle.
template <typename T, int V, int U, Mode M, bool Clamp>
__device__ __forceinline__ void forward_rows(const ForwardArgs& args, const SeedView& sv,
                                             const float* table, int64_t col0, int tile, int lane,
                                             int group, ThreadStats& st) {
  constexpr bool kBlend = M != Mode::copy;
  const int C = args.C;
  const int G = args.group;
  const int tiles = args.tiles;
  const int64_t RG = args.row_groups;
  const int64_t R = args.rows_per_pass;
  const int64_t N = args.rows;
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  const float a = sv.a;
  const float b = 1.0f - sv.a;
  const float sigma = sv.sigma;
  const float w0 = sv.w0, w1 = sv.w1, w2 = sv.w2;
  const float clo = args.clamp.lo;
  const float chi = args.clamp.hi;
  const float thr = args.dead_threshold;
  const int step = G * V;

  for (int64_t pass = tile; pass * R < N; pass += tiles) {
    const int64_t n0 = pass * R + group;
    // The next pass's rows on their way to L2 (two passes in flight).
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t n = n0 + tiles * R + u * RG;
      if (n < N) {
        const T* p = x + n * args.x_stride + col0;
        for (int c = lane * V; c < C; c += step) prefetch_l2(p + c);
      }
    }
    bool active[U];
    const T* xr[U];
    T* yr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t n = n0 + u * RG;
      active[u] = n < N;
      const int64_t nn = active[u] ? n : 0;  // no pointer past the tensor
      xr[u] = x + nn * args.x_stride + col0;
      yr[u] = y + nn * args.y_stride + col0;
    }
    // Drift is 1 - cos, small next to 1: the row sums are kept in float64
    // (a product of two floats is exact there), so the cancellation in
    // 1 - cos costs nothing visible at float32 output precision (DESIGN 28).
    double dot[U], xx[U], yy[U];
#pragma unroll
    for (int u = 0; u < U; ++u) dot[u] = xx[u] = yy[u] = 0.0;
    for (int c = lane * V; c < C; c += step) {
      RawVec<T, V> raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (active[u]) raw[u] = load_raw<T, V>(xr[u] + c);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!active[u]) continue;
        float xv[V];
        decode_vec<T, V>(raw[u], xv);
        if constexpr (!kBlend && !Clamp) {
          // A copy stores the loaded bytes unchanged.
          store_raw<T, V>(yr[u] + c, raw[u]);
        } else {
          float yv[V];
          float coef[V];
          if constexpr (M == Mode::residual || M == Mode::attention || M == Mode::mlp) {
#pragma unroll
            for (int i = 0; i < V; ++i) coef[i] = table[c + i];
          }
          // CONV's two left neighbours (0 at the chunk start; L1 hits, the
          // neighbour lane loaded them), then rolled along the vector.
          float xm2 = 0.0f, xm1 = 0.0f;
          if constexpr (M == Mode::conv) {
            xm2 = c >= 2 ? load_one(xr[u] + c - 2) : 0.0f;
            xm1 = c >= 1 ? load_one(xr[u] + c - 1) : 0.0f;
          }
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const float xi = xv[i];
            float yi = xi;
            if constexpr (kBlend) {
              // seed_transform per kind, and the blend as the backward
              // recomputes it for the clamp mask (the same bits: DESIGN 4).
              float t;
              if constexpr (M == Mode::residual) {
                t = xi + sigma * coef[i];
              } else if constexpr (M == Mode::attention) {
                t = xi * coef[i];
              } else if constexpr (M == Mode::mlp) {
                t = sigma * relu(xi * coef[i]);
              } else if constexpr (M == Mode::conv) {
                t = sigma * (w0 * xi + w1 * xm1 + w2 * xm2);
                xm2 = xm1;
                xm1 = xi;
              } else {
                t = seed_transform(sv, coef_at(sv, nullptr, c + i), xi, 0.0f, 0.0f);
              }
              yi = a * t + b * xi;
              const double xd = xi, yd = yi;
              dot[u] += xd * yd;
              xx[u] += xd * xd;
              yy[u] += yd * yd;
            }
            yv[i] = Clamp ? clamp_output(true, clo, chi, yi) : yi;
          }
          store_vec<T, V>(yr[u] + c, yv);
        }
        add_values<V>(st, xv, thr);
      }
    }
    if constexpr (kBlend) {
      // Every lane of the CTA reaches this point the same number of times.
#pragma unroll
      for (int u = 0; u < U; ++u) {
        group_sum3(dot[u], xx[u], yy[u], G);
        if (active[u] && lane == 0) {
          // cos = 1 for a zero or non-finite row (SPEC section 4), and for a
          // row with Y == X (dot == |X|^2 == |Y|^2), where the formula would
          // leave rounding noise instead of the exact 0. A non-finite X or Y
          // makes |X|^2 or |Y|^2 non-finite (squares of finite floats cannot
          // overflow a double), so no per-value test.
          const bool unit = !isfinite(xx[u]) || !isfinite(yy[u]) || xx[u] == 0.0 ||
                            yy[u] == 0.0 || (dot[u] == xx[u] && xx[u] == yy[u]);
          if (!unit) st.drift_sum += 1.0 - dot[u] * rsqrt(xx[u] * yy[u]);
        }
      }
    }
    if (st.cnt >= kFlushCount) st.flush();
  }
}

template <typename T, int V, int U, bool Clamp>
__device__ __forceinline__ void forward_rows_mode(Mode mode, const ForwardArgs& args,
                                                  const SeedView& sv, const float* table,
                                                  int64_t col0, int tile, int lane, int group,
                                                  ThreadStats& st) {
  switch (mode) {
    case Mode::copy:
      forward_rows<T, V, U, Mode::copy, Clamp>(args, sv, table, col0, tile, lane, group, st);
      break;
    case Mode::residual:
      forward_rows<T, V, U, Mode::residual, Clamp>(args, sv, table, col0, tile, lane, group, st);
      break;
    case Mode::attention:
      forward_rows<T, V, U, Mode::attention, Clamp>(args, sv, table, col0, tile, lane, group, st);
      break;
    case Mode::mlp:
      forward_rows<T, V, U, Mode::mlp, Clamp>(args, sv, table, col0, tile, lane, group, st);
      break;
    case Mode::conv:
      forward_rows<T, V, U, Mode::conv, Clamp>(args, sv, table, col0, tile, lane, group, st);
      break;
    case Mode::wide:
      forward_rows<T, V, U, Mode::wide, Clamp>(args, sv, table, col0, tile, lane, group, st);
      break;
  }
}

// Seed s's telemetry row from its merged statistics (SPEC section 4).
__device__ __forceinline__ void write_telemetry(const ForwardArgs& args, int s, const FwdStats& acc,
                                                bool blends) {
  const int64_t N = args.rows;
  const unsigned long long n = acc.mom.n;
  const float mean = n > 0 ? acc.mom.mean : 0.0f;
  const float variance = n > 0 ? acc.mom.m2 / static_cast<float>(n) : 0.0f;
  float* tel = args.telemetry + static_cast<int64_t>(s) * kTelemetryWidth;
  tel[kTelVariance] = variance;
  tel[kTelMean] = mean;
  tel[kTelMin] = acc.lo;
  tel[kTelMax] = acc.hi;
  tel[kTelDeadRatio] = n > 0 ? static_cast<float>(acc.dead) / static_cast<float>(n) : 0.0f;
  tel[kTelSignalToNoise] = n > 0 ? fabsf(mean) / sqrtf(variance + 1e-8f) : 0.0f;
  tel[kTelNonfinite] = static_cast<float>(acc.nonfinite);
  // Exactly 0 for a copy and for N = 0 (SPEC section 4).
  tel[kTelDrift] =
      (blends && N > 0) ? static_cast<float>(acc.drift_sum / static_cast<double>(N)) : 0.0f;
  if (args.nonfinite_count != nullptr) {
    args.nonfinite_count[s] = static_cast<int64_t>(acc.nonfinite);
  }
}

// One CTA of one forward problem: block is its index in the problem's grid
// (tiles x seeds). The plain kernel runs one problem; the streaming kernel
// runs several in one launch (forward_many).
template <typename T, int V, int U>
__device__ __forceinline__ void forward_cta(const ForwardArgs& args, int block) {
  extern __shared__ float coef_smem[];  // [C] when args.coef_table
  __shared__ FwdStats red_scratch[8];
  __shared__ SumF sum_scratch[8];
  __shared__ MaxF max_scratch[8];
  __shared__ float bcast;
  __shared__ int is_last;

  const int tiles = args.tiles;
  const int s = block / tiles;
  const int tile = block - s * tiles;
  const int C = args.C;
  const int G = args.group;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int group = static_cast<int>(threadIdx.x) / G;
  const int64_t N = args.rows;

  // The thread's first vectors on their way to L2 while the seed's view and
  // coefficients load (a small batch is otherwise a chain of round trips).
  {
    const int64_t n0 = static_cast<int64_t>(tile) * args.rows_per_pass + group;
    const int c = lane * V;
    if (c < C) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t n = n0 + static_cast<int64_t>(u) * args.row_groups;
        if (n < N) {
          const T* p = static_cast<const T*>(args.x) + n * args.x_stride +
                       static_cast<int64_t>(s) * C + c;
          prefetch_l2(p);
        }
      }
    }
  }

  SeedView sv = load_seed_view(args.seeds, args.registry, s, C);
  if (sv.blends && sv.kind == static_cast<int>(Kind::attention)) {
    compute_softmax(sv, C, sum_scratch, max_scratch, &bcast);
  }
  Mode mode = Mode::copy;
  if (sv.blends) {
    switch (sv.kind) {
      case static_cast<int>(Kind::residual): mode = Mode::residual; break;
      case static_cast<int>(Kind::attention): mode = Mode::attention; break;
      case static_cast<int>(Kind::mlp): mode = Mode::mlp; break;
      default: mode = Mode::conv; break;
    }
  }
  const bool needs_coef = mode == Mode::residual || mode == Mode::attention || mode == Mode::mlp;
  const float* table = nullptr;
  if (needs_coef) {
    if (args.coef_table) {
      fill_coef_table(sv, C, coef_smem);
      table = coef_smem;
      __syncthreads();
    } else {
      mode = Mode::wide;
    }
  }

  ThreadStats st = ThreadStats::identity();
  const int64_t col0 = static_cast<int64_t>(s) * C;
  if (args.clamp.enabled) {
    forward_rows_mode<T, V, U, true>(mode, args, sv, table, col0, tile, lane, group, st);
  } else {
    forward_rows_mode<T, V, U, false>(mode, args, sv, table, col0, tile, lane, group, st);
  }
  st.flush();

  const FwdStats cta = block_reduce(st.widen(), red_scratch);
  if (tiles == 1) {
    // The seed's only CTA: its statistics are the seed's (no partials, no
    // ticket: a small batch pays no second round trip through L2).
    if (threadIdx.x == 0) write_telemetry(args, s, cta, sv.blends);
    return;
  }
  FwdStats* seed_partials = args.partials + static_cast<int64_t>(s) * tiles;
  if (threadIdx.x == 0) {
    seed_partials[tile] = cta;
    __threadfence();
    const unsigned ticket = atomicAdd(&args.tickets[s], 1u);
    is_last = ticket == static_cast<unsigned>(tiles - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  FwdStats acc = FwdStats::identity();
  for (int i = static_cast<int>(threadIdx.x); i < tiles; i += static_cast<int>(blockDim.x)) {
    acc.merge(load_partial(seed_partials + i));
  }
  acc = block_reduce(acc, red_scratch);  // its barriers order the reads before the clears
  // params.hpp: the workspace is left zero-filled by every launch.
  for (int i = static_cast<int>(threadIdx.x); i < tiles; i += static_cast<int>(blockDim.x)) {
    seed_partials[i] = FwdStats{};
  }
  if (threadIdx.x == 0) {
    write_telemetry(args, s, acc, sv.blends);
    args.tickets[s] = 0u;  // every CTA of this seed has taken its ticket
  }
}

template <typename T, int V, int U>
__global__ void __launch_bounds__(kMaxBlockThreads, forward_min_blocks(sizeof(T), U))
    forward_kernel(const ForwardArgs args) {
  forward_cta<T, V, U>(args, static_cast<int>(blockIdx.x));
}

// The streaming entry point: up to kMaxStreamed problems of one kernel
// variant in one launch, CTAs numbered problem after problem.
constexpr int kMaxStreamed = 16;
struct StreamArgs {
  int count;
  int first_block[kMaxStreamed + 1];  // prefix sums of the problems' grids
  ForwardArgs problem[kMaxStreamed];
};
// Kernel parameters up to 32 KiB need CUDA 12.1 and sm_70 or newer (here: sm_80, sm_90a).
static_assert(sizeof(StreamArgs) <= 32764, "the streaming kernel's parameters exceed 32 KiB");

// A problem picked by a run-time index reads its fields through generic
// loads and keeps more of them in registers: the streaming kernel (for small
// inputs, where the launch gap dominates) takes up to 255 registers.
template <typename T, int V, int U>
__global__ void __launch_bounds__(kMaxBlockThreads, 1)
    forward_stream_kernel(const __grid_constant__ StreamArgs args) {
  const int b = static_cast<int>(blockIdx.x);
  int p = 0;
  while (p + 1 < args.count && b >= args.first_block[p + 1]) ++p;  // uniform over the CTA
  forward_cta<T, V, U>(args.problem[p], b - args.first_block[p]);
}

struct Resolved {
  int64_t C;
  int64_t x_stride;
  int64_t y_stride;
  bool vector;
  const char* why;
};

Resolved resolve(const ForwardParams& p) {
  Resolved r{};
  r.C = p.hidden / p.num_seeds;
  r.x_stride = p.x_row_stride != 0 ? p.x_row_stride : p.hidden;
  r.y_stride = p.y_row_stride != 0 ? p.y_row_stride : p.hidden;
  const auto esize = static_cast<int64_t>(dtype_size(p.dtype));
  const int64_t v = kVectorBytes / esize;
  if (r.C % v != 0) {
    r.why = "C is not a multiple of the 16-byte vector";
  } else if (!aligned16(p.x) || !aligned16(p.y)) {
    r.why = "x or y is not 16-byte aligned";
  } else if ((r.x_stride * esize) % kVectorBytes != 0 || (r.y_stride * esize) % kVectorBytes != 0) {
    r.why = "a row stride is not a multiple of 16 bytes";
  } else {
    r.vector = true;
    r.why = "C, base pointers and row strides allow 16-byte access";
  }
  return r;
}

int tiles_max_for(int32_t num_seeds, const DeviceInfo& dev) {
  return tiles_per_seed_bound(num_seeds, tuning_for(dev.cc_major), dev.sm_count);
}

LaunchPlan plan_forward(const ForwardParams& p, const DeviceInfo& dev) {
  const Resolved r = resolve(p);
  const Tuning& t = tuning_for(dev.cc_major);
  LaunchPlan plan;
  plan.vector = r.vector ? kVectorBytes / static_cast<int>(dtype_size(p.dtype)) : 1;
  // At most kForwardGroupThreads lanes per row (still 128 contiguous bytes
  // per row and access): the per-row work (the drift sums' shuffles and the
  // float64 cosine) is then shared by more rows per warp instruction.
  plan.group = next_pow2(ceil_div(r.C, plan.vector));
  if (plan.group > kForwardGroupThreads) plan.group = kForwardGroupThreads;
  plan.threads = t.block_threads;
  // The scalar path (a fallback for odd shapes and pointers) keeps one row.
  const RowsChoice choice = select_rows_in_flight(true, dev, p.dtype, p.rows, p.hidden);
  plan.rows_in_flight = r.vector ? choice.rows : 1;
  plan.rows_source = r.vector ? choice.source : "scalar path";
  // 2-byte types at most 2: their 8-wide step with four rows spilled on
  // sm_80 (and ran no faster than two on the H100).
  if (dtype_size(p.dtype) == 2 && plan.rows_in_flight > 2) plan.rows_in_flight = 2;
  // No more rows in flight than a small batch fills: a thread's extra rows
  // would be idle and their code colder (16x4096/64 ran 11.3 us with 4 and
  // 9.5 us with 1, docs/PERFORMANCE.md).
  while (plan.rows_in_flight > 1 &&
         static_cast<int64_t>(plan.threads / plan.group) * (plan.rows_in_flight / 2) >= p.rows) {
    plan.rows_in_flight /= 2;
  }
  plan.rows_per_pass = plan.threads / plan.group * plan.rows_in_flight;
  plan.tiles_max = tiles_max_for(p.num_seeds, dev);
  // The coefficient table when it fits the shared memory every architecture
  // gives without an opt-in; wider chunks compute coefficients on the fly.
  const std::size_t table = static_cast<std::size_t>(r.C) * sizeof(float);
  plan.smem_bytes = table <= t.smem_budget_bytes ? table : 0;
  plan.tiles = plan.tiles_max;  // refined by finish_plan() for the kernel that runs
  return plan;
}

std::size_t tickets_bytes(int32_t num_seeds) {
  return align_up(static_cast<std::size_t>(num_seeds) * sizeof(unsigned), 256);
}

std::size_t workspace_bytes(const ForwardParams& p, const DeviceInfo& dev) {
  return tickets_bytes(p.num_seeds) + static_cast<std::size_t>(p.num_seeds) *
                                          static_cast<std::size_t>(tiles_max_for(p.num_seeds, dev)) *
                                          sizeof(FwdStats);
}

template <typename T, int V, int U>
LaunchPlan finish_plan(LaunchPlan plan, const ForwardParams& p, const DeviceInfo& dev) {
  const int resident = resident_ctas_per_sm(reinterpret_cast<const void*>(&forward_kernel<T, V, U>),
                                            plan.threads, plan.smem_bytes);
  plan.tiles = tiles_for_rows(p.rows, plan.rows_per_pass, plan.tiles_max, resident, dev.sm_count,
                              p.num_seeds);
  return plan;
}

template <typename T, int V, int U>
LaunchPlan plan_and_launch(LaunchPlan plan, const ForwardParams& p, const DeviceInfo& dev,
                           ForwardArgs* args) {
  plan = finish_plan<T, V, U>(plan, p, dev);
  if (args == nullptr) return plan;
  args->tiles = plan.tiles;
  const unsigned grid = static_cast<unsigned>(plan.tiles) * static_cast<unsigned>(p.num_seeds);
  forward_kernel<T, V, U><<<grid, static_cast<unsigned>(plan.threads), plan.smem_bytes,
                            static_cast<cudaStream_t>(p.stream)>>>(*args);
  KASMINA_CUDA_CHECK(cudaGetLastError());
  return plan;
}

// The one dispatch point: (dtype, vector width, rows in flight) -> kernel
// instance. Returns the final plan; launches only when args is given.
template <typename T>
LaunchPlan dispatch_dtype(LaunchPlan plan, const ForwardParams& p, const DeviceInfo& dev,
                          ForwardArgs* args) {
  constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
  if (plan.vector != kVec) return plan_and_launch<T, 1, 1>(plan, p, dev, args);
  if (plan.rows_in_flight == 1) return plan_and_launch<T, kVec, 1>(plan, p, dev, args);
  if constexpr (sizeof(T) == 4) {
    if (plan.rows_in_flight == 4) return plan_and_launch<T, kVec, 4>(plan, p, dev, args);
  }
  return plan_and_launch<T, kVec, 2>(plan, p, dev, args);
}

LaunchPlan dispatch(const LaunchPlan& plan, const ForwardParams& p, const DeviceInfo& dev,
                    ForwardArgs* args) {
  switch (p.dtype) {
    case DType::f32: return dispatch_dtype<float>(plan, p, dev, args);
    case DType::bf16: return dispatch_dtype<__nv_bfloat16>(plan, p, dev, args);
    case DType::f16: return dispatch_dtype<__half>(plan, p, dev, args);
    case DType::f64: break;
  }
  KASMINA_FAIL(ErrorKind::type, "the CUDA backend takes float32, bfloat16 or float16 (got ",
               dtype_name(p.dtype), ")");
}

// Every CUDA forward's checks before anything runs (SPEC section 8 errors
// the dispatcher cannot see: the dtype the backend takes, the workspace).
void check_cuda_forward(const ForwardParams& p, const DeviceInfo& dev) {
  KASMINA_CHECK_TYPE(p.dtype == DType::f32 || p.dtype == DType::bf16 || p.dtype == DType::f16,
                     "the CUDA backend takes float32, bfloat16 or float16 (got ",
                     dtype_name(p.dtype), ")");
  const std::size_t need = workspace_bytes(p, dev);
  KASMINA_CHECK_VALUE(p.workspace != nullptr && p.workspace_bytes >= need,
                      "forward workspace too small: need ", need, " bytes (",
                      "forward_workspace_bytes), got ", p.workspace_bytes, " bytes at ",
                      p.workspace);
  KASMINA_CHECK_VALUE(aligned16(p.workspace), "forward workspace must be 16-byte aligned (got ",
                      p.workspace, ")");
}

ForwardArgs make_args(const ForwardParams& p, const LaunchPlan& plan) {
  const Resolved r = resolve(p);
  ForwardArgs args{};
  args.x = p.x;
  args.y = p.y;
  args.rows = p.rows;
  args.x_stride = r.x_stride;
  args.y_stride = r.y_stride;
  args.C = static_cast<int>(r.C);
  args.group = plan.group;
  args.row_groups = plan.threads / plan.group;
  args.rows_per_pass = plan.rows_per_pass;
  args.coef_table = plan.smem_bytes > 0;
  args.seeds = p.seeds;
  args.registry = p.registry;
  args.clamp = p.clamp;
  args.dead_threshold = p.dead_threshold;
  args.telemetry = p.telemetry;
  args.nonfinite_count = p.nonfinite_count;
  auto* base = static_cast<unsigned char*>(p.workspace);
  args.tickets = reinterpret_cast<unsigned*>(base);
  args.partials = reinterpret_cast<FwdStats*>(base + tickets_bytes(p.num_seeds));
  return args;
}

// The streaming launch of one kernel instance: each problem's tiles as the
// plain launch would pick them (the plain kernel's occupancy), so each
// problem gives the bits of a plain launch with the same rows in flight.
template <typename T, int V, int U>
void stream_launch(std::vector<LaunchPlan> plans, const ForwardParams* ps, int count,
                   const DeviceInfo& dev) {
  StreamArgs sa{};
  sa.count = count;
  std::size_t smem = 0;
  for (int i = 0; i < count; ++i) {
    plans[i] = finish_plan<T, V, U>(plans[i], ps[i], dev);
    sa.problem[i] = make_args(ps[i], plans[i]);
    sa.problem[i].tiles = plans[i].tiles;
    sa.first_block[i + 1] = sa.first_block[i] + plans[i].tiles * ps[i].num_seeds;
    if (plans[i].smem_bytes > smem) smem = plans[i].smem_bytes;
  }
  forward_stream_kernel<T, V, U><<<static_cast<unsigned>(sa.first_block[count]),
                                   static_cast<unsigned>(plans[0].threads), smem,
                                   static_cast<cudaStream_t>(ps[0].stream)>>>(sa);
  KASMINA_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void stream_dispatch_dtype(const std::vector<LaunchPlan>& plans, const ForwardParams* ps, int count,
                           const DeviceInfo& dev) {
  constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
  if (plans[0].vector != kVec) return stream_launch<T, 1, 1>(plans, ps, count, dev);
  if (plans[0].rows_in_flight == 1) return stream_launch<T, kVec, 1>(plans, ps, count, dev);
  if constexpr (sizeof(T) == 4) {
    if (plans[0].rows_in_flight == 4) return stream_launch<T, kVec, 4>(plans, ps, count, dev);
  }
  stream_launch<T, kVec, 2>(plans, ps, count, dev);
}

void stream_dispatch(const std::vector<LaunchPlan>& plans, const ForwardParams* ps, int count,
                     const DeviceInfo& dev) {
  switch (ps[0].dtype) {
    case DType::f32: return stream_dispatch_dtype<float>(plans, ps, count, dev);
    case DType::bf16: return stream_dispatch_dtype<__nv_bfloat16>(plans, ps, count, dev);
    case DType::f16: return stream_dispatch_dtype<__half>(plans, ps, count, dev);
    case DType::f64: break;
  }
  KASMINA_FAIL(ErrorKind::type, "the CUDA backend takes float32, bfloat16 or float16");
}

}  // namespace
}  // namespace kasmina::cuda

namespace kasmina::detail {

std::size_t forward_workspace_bytes_cuda(const ForwardParams& p) {
  return cuda::workspace_bytes(p, cuda::current_device_info());
}

void forward_cuda(const ForwardParams& p) {
  using namespace kasmina::cuda;
  const DeviceInfo& dev = current_device_info();
  check_cuda_forward(p, dev);
  const LaunchPlan plan = plan_forward(p, dev);
  ForwardArgs args = make_args(p, plan);
  dispatch(plan, p, dev, &args);
}

void forward_stream_cuda(const ForwardParams* ps, int count) {
  using namespace kasmina::cuda;
  KASMINA_CHECK_VALUE(count >= 1 && count <= kMaxStreamed, "forward_many on CUDA runs 1 to ",
                      kMaxStreamed, " problems per launch (got ", count, ")");
  const DeviceInfo& dev = current_device_info();
  const bool vector = resolve(ps[0]).vector;
  int rows_in_flight = 4;
  std::vector<LaunchPlan> plans;
  for (int i = 0; i < count; ++i) {
    const ForwardParams& p = ps[i];
    check_cuda_forward(p, dev);
    KASMINA_CHECK_TYPE(p.dtype == ps[0].dtype, "forward_many: every problem must have one dtype (",
                       dtype_name(ps[0].dtype), " and ", dtype_name(p.dtype), ")");
    KASMINA_CHECK_VALUE(p.stream == ps[0].stream, "forward_many: every problem must use one stream");
    KASMINA_CHECK_VALUE(resolve(p).vector == vector, "forward_many: problem ", i, " takes the ",
                        vector ? "scalar" : "vector", " path and problem 0 the other (",
                        resolve(p).why, "); launch them apart");
    plans.push_back(plan_forward(p, dev));
    if (plans.back().rows_in_flight < rows_in_flight) rows_in_flight = plans.back().rows_in_flight;
  }
  // One kernel instance for all: the smallest rows in flight of the plans.
  for (LaunchPlan& plan : plans) {
    plan.rows_in_flight = rows_in_flight;
    plan.rows_per_pass = plan.threads / plan.group * rows_in_flight;
  }
  stream_dispatch(plans, ps, count, dev);
}

std::string describe_forward_cuda(const ForwardParams& p) {
  using namespace kasmina::cuda;
  if (!cuda_available()) return "cuda.forward: unavailable (" + cuda_unavailable_reason() + ")";
  const DeviceInfo& dev = current_device_info();
  const Resolved r = resolve(p);
  const LaunchPlan plan = dispatch(plan_forward(p, dev), p, dev, nullptr);
  std::ostringstream os;
  os << "cuda.forward." << (r.vector ? "vec" : "scalar") << plan.vector << " "
     << dtype_name(p.dtype) << " on " << dev.name << " (sm_" << dev.cc_major << dev.cc_minor
     << "): " << r.why << "; " << plan.group << " lanes per row, " << plan.rows_in_flight
     << " rows in flight per thread (" << plan.rows_source << "), " << plan.rows_per_pass
     << " rows per pass, " << plan.tiles << " tiles x " << p.num_seeds << " seeds = "
     << static_cast<int64_t>(plan.tiles) * p.num_seeds << " CTAs of " << plan.threads
     << " threads, one launch"
     << (plan.tiles == 1 ? " (one CTA per seed: no partials)" : "") << ", "
     << (plan.smem_bytes > 0 ? "coefficients in a shared-memory table"
                             : "coefficients computed per element (C too wide for the table)");
  return os.str();
}

}  // namespace kasmina::detail
