// Benchmark of the CUDA backend (STYLE.md rule 8): for the shapes of the
// project's issue, dtypes float32/bfloat16, passes forward and
// forward+backward, seeds all blending (mixed kinds, one blueprint row per
// kind: blend-mixed; or a row per seed, as germinate gives: blend-own) or
// all dormant (the copy cost); blend-own times forward+backward only. Each
// timed run flushes L2 first (a memset of twice its size) and starts behind a
// short spin kernel, so the events time the GPU work alone, not the host's
// launch overhead. Median of --runs runs (default 50) after warm-up. The
// floor is a device-to-device cudaMemcpyAsync of the same bytes in the same
// run: forward moves read x + write y, forward+backward moves read x + write
// y + read x + read dy + write dx.
//
// Then, same run, the launch-config candidates (rows in flight of each
// kernel, kasmina::CudaLaunchConfig), a plain copy kernel of the same bytes
// beside the memcpy floor, and, for the small shape, the forward replayed
// from a CUDA graph.
//
// Last, the host side of one launch (small shape, float32, blending seeds):
// host microseconds per kasmina::forward call and per empty kernel launch,
// and an empty kernel's GPU time by the same events method (what any launch
// pays before its first instruction).
//
//   bench_cuda [--runs N] [--json FILE] [--no-candidates] [--shapes RxH:S,...] [--no-pdl]
//              [--tma-store | --no-tma-store] [--late-pdl | --no-late-pdl] [--stages N]
//              [--warm-code] [--copies] [--copy-per-sm N,...] [--group N] [--row-list]
//
// --copies: the copy kernel rows (a grid-stride copy, a copy in the
// forward's column chunks and grid, and one in that grid on whole rows) even
// with --no-candidates.
// --copy-per-sm N,...: the chunk copy row once per value, with N CTAs per SM
// in its grid instead of the forward's (3 for 4-byte types, 2 for 2-byte).
// --group N: the default rows with N lanes per row in the forward
// (CudaLaunchConfig::forward_group: 1, 2, 4 or 8).
// --stages N: the default rows with the TMA forward's pipeline depth N (2 to
// 8; CudaLaunchConfig::forward_stages; fewer where the shared memory does
// not hold N, as describe_forward says).
// --no-pdl: the default rows without programmatic dependent launch.
// --tma-store / --no-tma-store: the default rows with the TMA forward's y by
// TMA store switched on / off (CudaLaunchConfig::forward_tma_store; where
// the TMA forward runs; without either, the architecture's default).
// --late-pdl / --no-late-pdl: the default rows with the TMA forward's
// dependents launched at its CTAs' exit switched on / off
// (CudaLaunchConfig::forward_late_dependents; by default with the store).
// --row-list: the default rows with the backward's shared blueprint rows
// summed from a list of their seeds (CudaLaunchConfig::backward_row_list).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "kasmina/kasmina.hpp"

#ifdef KASMINA_TIMELINE
#include "../src/cuda/timeline.cuh"
#endif

namespace {

void check(cudaError_t status, const char* expr, int line) {
  if (status != cudaSuccess) {
    std::fprintf(stderr, "bench_cuda: line %d: %s failed: %s\n", line, expr, cudaGetErrorString(status));
    std::exit(1);
  }
}
#define CHECK(expr) check((expr), #expr, __LINE__)

__global__ void empty_kernel() {}

__global__ void spin_kernel(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

__device__ float hash_normalish(uint64_t i, uint64_t salt) {
  uint64_t z = i * 0x9E3779B97F4A7C15ull + salt;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  // Sum of two uniforms in (-1, 1): cheap, bell-shaped, never all zeros.
  const float u1 = static_cast<float>(z & 0xFFFFFF) / 16777216.0f;
  const float u2 = static_cast<float>((z >> 24) & 0xFFFFFF) / 16777216.0f;
  return u1 + u2 - 1.0f;
}

// A plain copy of n 16-byte words, grid-stride: beside cudaMemcpyAsync's
// floor, what one launch of an ordinary kernel pays to move the same bytes
// (the fixed cost per launch that the medium shape shows, PERFORMANCE.md,
// tenth session).
__global__ void copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = src[i];
  }
}

// The same copy with the forward's access pattern: CTA b copies seed
// b / tiles's columns (chunk_vecs 16-byte words of each row) for the row
// passes tile, tile + tiles, ... (rows_per_pass rows each), two passes in
// flight per thread; `lanes` threads per row, each walking its words by
// lanes. What moving the bytes in column chunks costs, with none of the
// layer's arithmetic (PERFORMANCE.md, twenty-first session).
__global__ void chunk_copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                  int64_t rows, int64_t row_vecs, int chunk_vecs, int lanes,
                                  int tiles) {
  const int s = static_cast<int>(blockIdx.x) / tiles;
  const int tile = static_cast<int>(blockIdx.x) - s * tiles;
  const int R = static_cast<int>(blockDim.x) / lanes;
  const int r = static_cast<int>(threadIdx.x) / lanes;
  const int lane = static_cast<int>(threadIdx.x) - r * lanes;
  if (r >= R) return;
  const int64_t col = static_cast<int64_t>(s) * chunk_vecs;
  for (int64_t p = tile; p * R < rows; p += 2 * static_cast<int64_t>(tiles)) {
    const int64_t n0 = p * R + r;
    const int64_t n1 = (p + tiles) * R + r;
    for (int v = lane; v < chunk_vecs; v += lanes) {
      uint4 a{}, b{};
      if (n0 < rows) a = src[n0 * row_vecs + col + v];
      if (n1 < rows) b = src[n1 * row_vecs + col + v];
      if (n0 < rows) dst[n0 * row_vecs + col + v] = a;
      if (n1 < rows) dst[n1 * row_vecs + col + v] = b;
    }
  }
}

// Counts the 16-byte words in which a and b differ (the copy rows' check).
__global__ void count_differences(const uint4* __restrict__ a, const uint4* __restrict__ b, int64_t n,
                                  unsigned long long* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 u = a[i], v = b[i];
    if (u.x != v.x || u.y != v.y || u.z != v.z || u.w != v.w) atomicAdd(out, 1ull);
  }
}

template <typename T>
__device__ T from_f(float v);
template <>
__device__ float from_f<float>(float v) { return v; }
template <>
__device__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void fill_kernel(T* p, int64_t n, uint64_t salt) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = from_f<T>(hash_normalish(static_cast<uint64_t>(i), salt));
  }
}

template <typename T>
void fill(void* p, int64_t n, uint64_t salt) {
  fill_kernel<T><<<1024, 256>>>(static_cast<T*>(p), n, salt);
  CHECK(cudaGetLastError());
  // Done before it returns: nothing orders the bench's non-blocking stream
  // after the legacy stream's kernels.
  CHECK(cudaDeviceSynchronize());
}

struct Shape {
  int64_t rows, hidden;
  int32_t seeds;
};

struct Row {
  std::string pass, dtype, seeds_mode, variant;
  Shape shape;
  double time_us, gbps, floor_gbps, pct_floor;
  bool candidate = false;  // a launch-config candidate, not the default
};

double median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  const std::size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

class Bench {
 public:
  explicit Bench(int runs) : runs_(runs) {
    int device = 0;
    CHECK(cudaGetDevice(&device));
    CHECK(cudaGetDeviceProperties(&prop_, device));
    int l2 = 0;
    CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
    flush_bytes_ = static_cast<std::size_t>(l2) * 2;
    CHECK(cudaMalloc(&flush_, flush_bytes_));
    CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CHECK(cudaEventCreate(&start_));
    CHECK(cudaEventCreate(&stop_));
    // ~20 us of spin at the SM clock: longer than the host needs to enqueue
    // one forward + backward.
    int clock_khz = 0;
    CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
    spin_cycles_ = static_cast<long long>(clock_khz) * 20 / 1000;
    if (spin_cycles_ < 20000) spin_cycles_ = 20000;
  }
  ~Bench() {
    (void)cudaFree(flush_);
    (void)cudaStreamDestroy(stream_);
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }
  const cudaDeviceProp& prop() const { return prop_; }

  // Median GPU time (us) of `op` enqueued on the bench stream.
  template <typename Op>
  double time_us(Op op) {
    for (int i = 0; i < 5; ++i) op();
    CHECK(cudaStreamSynchronize(stream_));
    std::vector<float> ms;
    for (int r = 0; r < runs_; ++r) {
      CHECK(cudaMemsetAsync(flush_, r & 0xFF, flush_bytes_, stream_));
      if (warm_) warm_();
      spin_kernel<<<1, 1, 0, stream_>>>(spin_cycles_);
      CHECK(cudaGetLastError());
      CHECK(cudaEventRecord(start_, stream_));
      op();
      CHECK(cudaEventRecord(stop_, stream_));
      CHECK(cudaEventSynchronize(stop_));
      float t = 0.0f;
      CHECK(cudaEventElapsedTime(&t, start_, stop_));
      ms.push_back(t);
    }
    return median(ms) * 1000.0;
  }
  cudaStream_t stream() const { return stream_; }
  // Run after each flush, before the timed op (--warm-code): nothing by default.
  std::function<void()> warm_;

 private:
  int runs_;
  cudaDeviceProp prop_{};
  void* flush_ = nullptr;
  std::size_t flush_bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  long long spin_cycles_ = 0;
};

// The bench's layers: blending seeds cycling through the four kinds and the
// four blending stages that train, one blueprint row per kind shared by its
// seeds (blend_mixed) or a row per seed as germinate gives by default
// (blend_own); every seed a blending CONV seed (blend_conv: issue 7's halo
// backward); every seed dormant, a copy (dormant); or a network that grows:
// every eighth seed blending as blend_mixed's (kinds and stages cycling), the
// others dormant (growing).
enum class SeedsMode { blend_mixed, dormant, blend_conv, blend_own, growing };

const char* seeds_mode_name(SeedsMode m) {
  switch (m) {
    case SeedsMode::blend_mixed: return "blend-mixed";
    case SeedsMode::dormant: return "dormant";
    case SeedsMode::blend_conv: return "blend-conv";
    case SeedsMode::blend_own: return "blend-own";
    case SeedsMode::growing: return "growing";
  }
  return "?";
}

// Device memory freed at scope exit.
struct DeviceBuffer {
  void* p = nullptr;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { (void)cudaFree(p); }
};

// The layer's device state for one shape and seeds mode.
struct DeviceLayer {
  int32_t S = 0, B = 64;
  int64_t C = 0;
  int32_t *stage = nullptr, *kind = nullptr, *blueprint = nullptr;
  float *alpha = nullptr, *weights = nullptr, *scales = nullptr;
  float *telemetry = nullptr, *dweights = nullptr, *dscales = nullptr, *dalpha = nullptr,
        *grad_stats = nullptr;
  int64_t* nonfinite = nullptr;

  DeviceLayer(const Shape& s, SeedsMode mode)
      : S(s.seeds), B(mode == SeedsMode::blend_own ? std::max(64, s.seeds + 1) : 64),
        C(s.hidden / s.seeds) {
    const bool blending = mode != SeedsMode::dormant;
    const bool conv_only = mode == SeedsMode::blend_conv;
    const bool own_rows = mode == SeedsMode::blend_own;
    const bool growing = mode == SeedsMode::growing;
    std::vector<int32_t> st(S), kd(S), bp(S);
    std::vector<float> al(S, 0.5f), w(static_cast<std::size_t>(B * C)), sc(B, 1.0f);
    for (int32_t i = 0; i < S; ++i) {
      const int32_t j = growing ? i / 8 : i;  // growing: the j-th blending seed
      const bool blends = blending && (!growing || i % 8 == 0);
      kd[i] = conv_only ? 3 : (C >= 3) ? j % 4 : j % 3;
      st[i] = blends ? 3 + j % 4 : 0;
      bp[i] = !blends ? 0 : own_rows ? 1 + i : 1 + kd[i];
    }
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = 0.5f + 0.001f * static_cast<float>(i % 97);
    upload(&stage, st);
    upload(&kind, kd);
    upload(&blueprint, bp);
    upload(&alpha, al);
    upload(&weights, w);
    upload(&scales, sc);
    CHECK(cudaMalloc(&telemetry, sizeof(float) * S * 8));
    CHECK(cudaMalloc(&nonfinite, sizeof(int64_t) * S));
    CHECK(cudaMalloc(&dweights, sizeof(float) * B * C));
    CHECK(cudaMalloc(&dscales, sizeof(float) * B));
    CHECK(cudaMalloc(&dalpha, sizeof(float) * S));
    CHECK(cudaMalloc(&grad_stats, sizeof(float) * S * 3));
    // A pageable cudaMemcpy may return before its DMA is done, and the
    // bench's non-blocking stream is not ordered after it.
    CHECK(cudaDeviceSynchronize());
  }
  ~DeviceLayer() {
    for (void* p : std::initializer_list<void*>{stage, kind, blueprint, alpha, weights, scales, telemetry,
                                                 nonfinite, dweights, dscales, dalpha, grad_stats}) {
      (void)cudaFree(p);
    }
  }
  template <typename T>
  static void upload(T** dst, const std::vector<T>& v) {
    CHECK(cudaMalloc(dst, sizeof(T) * v.size()));
    CHECK(cudaMemcpy(*dst, v.data(), sizeof(T) * v.size(), cudaMemcpyHostToDevice));
  }
  kasmina::SeedTable table() const { return {stage, kind, blueprint, alpha}; }
  kasmina::RegistryView registry() const { return {weights, scales, B}; }
};

// The fields a forward's and a backward's params share.
template <typename Params>
Params params_for(const DeviceLayer& layer, const Shape& shape, kasmina::DType dtype, const void* x,
                  cudaStream_t stream) {
  Params p;
  p.x = x;
  p.dtype = dtype;
  p.rows = shape.rows;
  p.hidden = shape.hidden;
  p.num_seeds = shape.seeds;
  p.seeds = layer.table();
  p.registry = layer.registry();
  p.stream = stream;
  return p;
}

// A forward of `layer` on x (outputs and workspace left to the caller).
kasmina::ForwardParams forward_params_for(const DeviceLayer& layer, const Shape& shape,
                                          kasmina::DType dtype, const void* x, cudaStream_t stream) {
  return params_for<kasmina::ForwardParams>(layer, shape, dtype, x, stream);
}

// A backward of `layer` on x and dy into dx (workspace left to the caller).
kasmina::BackwardParams backward_params_for(const DeviceLayer& layer, const Shape& shape,
                                            kasmina::DType dtype, const void* x, const void* dy, void* dx,
                                            cudaStream_t stream) {
  auto bp = params_for<kasmina::BackwardParams>(layer, shape, dtype, x, stream);
  bp.dy = dy;
  bp.dx = dx;
  bp.dweights = layer.dweights;
  bp.dscales = layer.dscales;
  bp.dalpha = layer.dalpha;
  bp.grad_stats = layer.grad_stats;
  return bp;
}

// The launch configuration of the default rows (--no-pdl and the other
// switches of main() change it; candidates set their own).
kasmina::CudaLaunchConfig g_default;
// --warm-code (a diagnostic): before each timed forward, after the L2 flush,
// a forward of 256 rows of another layer of the same kinds and stages with
// the same kernel instance, so the kernel's code (and nothing of the timed
// layer's state or data) is in L2.
bool g_warm_code = false;
// --copies: the copy kernel rows (plain and in column chunks) even with
// --no-candidates.
bool g_copies = false;
// --copy-per-sm: the chunk copy's CTAs per SM (empty: the forward's grid).
std::vector<int> g_copy_per_sm;

void run_shape(Bench& bench, const Shape& shape, kasmina::DType dtype, bool candidates,
               std::vector<Row>& rows) {
  const std::size_t esize = kasmina::dtype_size(dtype);
  const int64_t numel = shape.rows * shape.hidden;
  const std::size_t bytes = static_cast<std::size_t>(numel) * esize;
  void *x = nullptr, *y = nullptr, *dy = nullptr, *dx = nullptr;
  CHECK(cudaMalloc(&x, bytes + 16));
  CHECK(cudaMalloc(&y, bytes + 16));
  CHECK(cudaMalloc(&dy, bytes + 16));
  CHECK(cudaMalloc(&dx, bytes + 16));
  if (dtype == kasmina::DType::f32) {
    fill<float>(x, numel, 1);
    fill<float>(dy, numel, 2);
  } else {
    fill<__nv_bfloat16>(x, numel, 1);
    fill<__nv_bfloat16>(dy, numel, 2);
  }
  CHECK(cudaDeviceSynchronize());

  const double copy_us = bench.time_us([&] {
    CHECK(cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice, bench.stream()));
  });
  const double floor_gbps = 2.0 * static_cast<double>(bytes) / (copy_us * 1e3);
  // The copy kernel rows (candidates, --copies): each timed, then run once
  // more into a poisoned y and checked word for word against x, so a row
  // never times a copy that moved the wrong bytes.
  const auto copy_row = [&](const char* name, const std::string& what, auto launch) {
    const double t = bench.time_us(launch);
    DeviceBuffer count;
    CHECK(cudaMalloc(&count.p, sizeof(unsigned long long)));
    CHECK(cudaMemsetAsync(count.p, 0, sizeof(unsigned long long), bench.stream()));
    CHECK(cudaMemsetAsync(y, 0xFF, bytes, bench.stream()));
    launch();
    count_differences<<<1024, 256, 0, bench.stream()>>>(static_cast<const uint4*>(x), static_cast<const uint4*>(y),
                                                        static_cast<int64_t>(bytes / 16),
                                                        static_cast<unsigned long long*>(count.p));
    CHECK(cudaGetLastError());
    unsigned long long wrong = 0;
    CHECK(cudaMemcpyAsync(&wrong, count.p, sizeof(wrong), cudaMemcpyDeviceToHost, bench.stream()));
    CHECK(cudaStreamSynchronize(bench.stream()));
    if (wrong != 0) {
      throw std::runtime_error(std::string(name) + ": y differs from x in " + std::to_string(wrong) +
                               " of " + std::to_string(bytes / 16) + " 16-byte words");
    }
    const double moved = 2.0 * static_cast<double>(bytes);
    rows.push_back({name, std::string(kasmina::dtype_name(dtype)), "copy", what, shape, t, moved / (t * 1e3),
                    floor_gbps, 100.0 * copy_us / t, true});
  };
  if ((candidates || g_copies) && bytes % 16 == 0 && bytes > 0) {
    // One resident wave of 4 CTAs of 256 threads per SM.
    const unsigned grid = static_cast<unsigned>(bench.prop().multiProcessorCount) * 4u;
    copy_row("copy kernel", "16-byte grid-stride copy kernel, SMs x 4 CTAs of 256 threads", [&] {
      copy_kernel<<<grid, 256, 0, bench.stream()>>>(static_cast<const uint4*>(x), static_cast<uint4*>(y),
                                                     static_cast<int64_t>(bytes / 16));
      CHECK(cudaGetLastError());
    });
  }
  const std::size_t chunk_bytes = static_cast<std::size_t>(shape.hidden / shape.seeds) * esize;
  if ((candidates || g_copies) && chunk_bytes % 16 == 0 && bytes > 0) {
    // The forward's grid: 3 CTAs of 256 threads per SM for 4-byte types, 2
    // for 2-byte ones, shared by the seeds (or --copy-per-sm's counts); one
    // 16-byte word per lane.
    const int chunk_vecs = static_cast<int>(chunk_bytes / 16);
    const int lanes = std::min(chunk_vecs, 32);
    const int64_t row_vecs = static_cast<int64_t>(shape.hidden) * static_cast<int64_t>(esize) / 16;
    std::vector<int> per_sm_list = g_copy_per_sm;
    if (per_sm_list.empty()) per_sm_list.push_back(esize == 4 ? 3 : 2);
    for (const int per_sm : per_sm_list) {
      const int tiles = std::max(1, bench.prop().multiProcessorCount * per_sm / shape.seeds);
      const unsigned grid = static_cast<unsigned>(tiles) * static_cast<unsigned>(shape.seeds);
      std::ostringstream what;
      what << "copy in column chunks of " << chunk_bytes << " B, " << per_sm << " CTAs per SM"
           << (g_copy_per_sm.empty() ? " (the forward's grid)" : "") << ": " << tiles << " tiles x "
           << shape.seeds << " seeds of 256 threads, " << lanes << " lanes per row, two passes in flight";
      copy_row("chunk copy kernel", what.str(), [&] {
        chunk_copy_kernel<<<grid, 256, 0, bench.stream()>>>(
            static_cast<const uint4*>(x), static_cast<uint4*>(y), shape.rows, row_vecs, chunk_vecs, lanes,
            tiles);
        CHECK(cudaGetLastError());
      });
      // The same grid and mechanism with every CTA on whole rows (one
      // 16-byte word per lane, up to 256 lanes per row): what the column
      // chunks' layout costs, apart from the grid and the bytes in flight.
      const int row_lanes = static_cast<int>(std::min<int64_t>(row_vecs, 256));
      std::ostringstream band;
      band << "copy in row bands, " << per_sm << " CTAs per SM"
           << (g_copy_per_sm.empty() ? " (the forward's grid)" : "") << ": " << grid
           << " CTAs of 256 threads on whole rows, " << row_lanes << " lanes per row, two passes in flight";
      copy_row("row band copy kernel", band.str(), [&] {
        chunk_copy_kernel<<<grid, 256, 0, bench.stream()>>>(
            static_cast<const uint4*>(x), static_cast<uint4*>(y), shape.rows, row_vecs,
            static_cast<int>(row_vecs), row_lanes, static_cast<int>(grid));
        CHECK(cudaGetLastError());
      });
    }
  }

  for (const SeedsMode seeds_mode : {SeedsMode::blend_mixed, SeedsMode::dormant,
                                     SeedsMode::blend_conv, SeedsMode::blend_own,
                                     SeedsMode::growing}) {
    const bool blending = seeds_mode != SeedsMode::dormant && seeds_mode != SeedsMode::growing;
    const bool conv_only = seeds_mode == SeedsMode::blend_conv;
    // Layers whose forward is another's (a row per seed) or whose point is
    // the backward's balance (growing): forward+backward only.
    const bool own_rows = seeds_mode == SeedsMode::blend_own || seeds_mode == SeedsMode::growing;
    if (conv_only && (shape.hidden / shape.seeds < 3 || !candidates)) continue;
    DeviceLayer layer(shape, seeds_mode);
    kasmina::ForwardParams fp = forward_params_for(layer, shape, dtype, x, bench.stream());
    fp.y = y;
    fp.telemetry = layer.telemetry;
    fp.nonfinite_count = layer.nonfinite;
    kasmina::BackwardParams bp = backward_params_for(layer, shape, dtype, x, dy, dx, bench.stream());
    // Sized for the flat telemetry reduction too (a candidate below), the
    // largest workspace any forward variant asks for.
    {
      kasmina::CudaLaunchConfig flat;
      flat.forward_flat_reduction = true;
      kasmina::set_cuda_launch_config(flat);
      fp.workspace_bytes = kasmina::forward_workspace_bytes(fp, kasmina::Backend::cuda);
      kasmina::set_cuda_launch_config(g_default);
    }
    bp.workspace_bytes = kasmina::backward_workspace_bytes(bp, kasmina::Backend::cuda);
    CHECK(cudaMalloc(&fp.workspace, fp.workspace_bytes));
    CHECK(cudaMalloc(&bp.workspace, bp.workspace_bytes));
    CHECK(cudaMemsetAsync(fp.workspace, 0, fp.workspace_bytes, bench.stream()));
    CHECK(cudaMemsetAsync(bp.workspace, 0, bp.workspace_bytes, bench.stream()));

    const std::string mode = seeds_mode_name(seeds_mode);
    const std::string dname(kasmina::dtype_name(dtype));
    const double fwd_bytes = 2.0 * static_cast<double>(bytes);
    const double both_bytes = 5.0 * static_cast<double>(bytes);
    // --warm-code: the warming forward's layer, buffers and workspace.
    const Shape wshape{256, shape.hidden, shape.seeds};
    std::optional<DeviceLayer> wlayer;  // only with --warm-code
    DeviceBuffer wx, wy, wws;
    kasmina::ForwardParams wfp = fp;
    if (g_warm_code) {
      const std::size_t wbytes = static_cast<std::size_t>(wshape.rows * wshape.hidden) * esize;
      CHECK(cudaMalloc(&wx.p, wbytes));
      CHECK(cudaMalloc(&wy.p, wbytes));
      CHECK(cudaMemsetAsync(wx.p, 0x3c, wbytes, bench.stream()));
      wlayer.emplace(wshape, seeds_mode);
      wfp = forward_params_for(*wlayer, wshape, dtype, wx.p, bench.stream());
      wfp.y = wy.p;
      wfp.telemetry = wlayer->telemetry;
      wfp.nonfinite_count = wlayer->nonfinite;
      wfp.workspace_bytes = fp.workspace_bytes;
      CHECK(cudaMalloc(&wws.p, wfp.workspace_bytes));
      CHECK(cudaMemsetAsync(wws.p, 0, wfp.workspace_bytes, bench.stream()));
      wfp.workspace = wws.p;
    }
    auto time_forward = [&] {
      if (g_warm_code) {
        // The timed forward's instance: the TMA kernel with its store and
        // dependents' settings (the generic one where TMA does not run).
        const kasmina::CudaLaunchConfig saved = kasmina::cuda_launch_config();
        const std::string d = kasmina::describe_forward(fp, kasmina::Backend::cuda);
        kasmina::CudaLaunchConfig w = saved;
        const bool tma = d.find("variant tma") != std::string::npos;
        w.forward_variant = tma ? kasmina::CudaForwardVariant::tma : kasmina::CudaForwardVariant::generic;
        w.forward_tma_store = d.find("y by TMA store") != std::string::npos ? kasmina::CudaSwitch::on
                                                                             : kasmina::CudaSwitch::off;
        w.forward_late_dependents = d.find("at the CTAs' exit") != std::string::npos
                                        ? kasmina::CudaSwitch::on
                                        : kasmina::CudaSwitch::off;
        bench.warm_ = [&, w, saved] {
          kasmina::set_cuda_launch_config(w);
          kasmina::forward(wfp, kasmina::Backend::cuda);
          kasmina::set_cuda_launch_config(saved);
        };
      }
      const double t = bench.time_us([&] { kasmina::forward(fp, kasmina::Backend::cuda); });
      bench.warm_ = nullptr;
      return t;
    };
    auto time_both = [&] {
      return bench.time_us([&] {
        kasmina::forward(fp, kasmina::Backend::cuda);
        kasmina::backward(bp, kasmina::Backend::cuda);
      });
    };
    auto pct = [&](double moved, double us) { return 100.0 * (moved / floor_gbps / 1e3) / us; };
    // Every seed CONV: the backward with its neighbours from L1 and from the
    // shared-memory halo (CudaLaunchConfig::backward_conv_halo, one row in
    // flight), same run; nothing else for this layer.
    if (conv_only) {
      for (int halo : {0, 1, 2}) {
        kasmina::CudaLaunchConfig c;
        c.backward_rows_in_flight = 1;
        c.backward_conv_halo = halo == 1;
        c.backward_tma = halo == 2;  // the neighbours from the TMA stage
        kasmina::set_cuda_launch_config(c);
        const double t = time_both();
        rows.push_back({"forward+backward", dname, mode,
                        halo == 1   ? "bwd CONV halo in shared memory, rows in flight 1"
                        : halo == 2 ? "bwd CONV neighbours from the TMA stage"
                                    : "bwd CONV neighbours from L1, rows in flight 1",
                        shape, t, both_bytes / (t * 1e3), floor_gbps, pct(both_bytes, t), true});
      }
      kasmina::set_cuda_launch_config(g_default);
      CHECK(cudaFree(fp.workspace));
      CHECK(cudaFree(bp.workspace));
      continue;
    }
    // The default launch configuration (the architecture's tuning).
    kasmina::set_cuda_launch_config(g_default);
    // A row per seed: only the backward differs from blend-mixed's layer
    // (its last seed has no row of several seeds to sum), so only
    // forward+backward is timed; the same for the growing layer.
    if (own_rows) {
      const double t = time_both();
      rows.push_back({"forward+backward", dname, mode,
                      kasmina::describe_backward(bp, kasmina::Backend::cuda), shape, t,
                      both_bytes / (t * 1e3), floor_gbps, pct(both_bytes, t)});
      CHECK(cudaFree(fp.workspace));
      CHECK(cudaFree(bp.workspace));
      continue;
    }
    const double fwd_us = time_forward();
    rows.push_back({"forward", dname, mode, kasmina::describe_forward(fp, kasmina::Backend::cuda), shape,
                    fwd_us, fwd_bytes / (fwd_us * 1e3), floor_gbps, pct(fwd_bytes, fwd_us)});
    const double both_us = time_both();
    rows.push_back({"forward+backward", dname, mode,
                    kasmina::describe_backward(bp, kasmina::Backend::cuda), shape, both_us,
                    both_bytes / (both_us * 1e3), floor_gbps, pct(both_bytes, both_us)});
    // The candidates of the launch configuration, same run (blending seeds).
    if (blending && candidates) {
      // Programmatic dependent launch off (DESIGN 55): the plain launch the
      // default rows above are compared with.
      {
        kasmina::CudaLaunchConfig c;
        c.programmatic_launch = false;
        kasmina::set_cuda_launch_config(c);
        const double t = time_forward();
        rows.push_back({"forward", dname, mode, "fwd default, plain launch (no PDL)", shape, t,
                        fwd_bytes / (t * 1e3), floor_gbps, pct(fwd_bytes, t), true});
        const double tb = time_both();
        rows.push_back({"forward+backward", dname, mode, "fwd+bwd default, plain launches (no PDL)",
                        shape, tb, both_bytes / (tb * 1e3), floor_gbps, pct(both_bytes, tb), true});
        kasmina::set_cuda_launch_config(g_default);
      }
      for (int u : {1, 2, 4}) {
        if (u == 4 && esize == 2) continue;  // 2-byte types run at most 2 (ops.hpp)
        kasmina::set_cuda_launch_config({u, 0, kasmina::CudaForwardVariant::generic, 0});
        const double t = time_forward();
        rows.push_back({"forward", dname, mode, "fwd generic, rows in flight " + std::to_string(u), shape, t,
                        fwd_bytes / (t * 1e3), floor_gbps, pct(fwd_bytes, t), true});
      }
      // Lanes per row (kasmina::CudaLaunchConfig::forward_group) with each
      // rows in flight, generic kernel, and with the TMA kernel at 2 stages.
      for (int g : {1, 2, 4, 8}) {
        for (int u : {1, 2, 4}) {
          if (u == 4 && esize == 2) continue;
          kasmina::CudaLaunchConfig c;
          c.forward_rows_in_flight = u;
          c.forward_variant = kasmina::CudaForwardVariant::generic;
          c.forward_group = g;
          kasmina::set_cuda_launch_config(c);
          const double t = time_forward();
          rows.push_back({"forward", dname, mode,
                          "fwd generic, " + std::to_string(g) + " lanes per row, rows in flight " +
                              std::to_string(u),
                          shape, t, fwd_bytes / (t * 1e3), floor_gbps, pct(fwd_bytes, t), true});
        }
        kasmina::CudaLaunchConfig c;
        c.forward_variant = kasmina::CudaForwardVariant::tma;
        c.forward_stages = 2;
        c.forward_group = g;
        kasmina::set_cuda_launch_config(c);
        if (kasmina::describe_forward(fp, kasmina::Backend::cuda).rfind("cuda.forward.tma", 0) == 0) {
          const double t = time_forward();
          rows.push_back({"forward", dname, mode,
                          "fwd TMA 2 stages, " + std::to_string(g) + " lanes per row", shape, t,
                          fwd_bytes / (t * 1e3), floor_gbps, pct(fwd_bytes, t), true});
        }
      }
      // Threads per CTA (kasmina::CudaLaunchConfig::forward_block_threads)
      // with the default of everything else, and with the generic kernel at
      // 8 lanes per row.
      for (int threads : {64, 128}) {
        kasmina::CudaLaunchConfig c;
        c.forward_block_threads = threads;
        kasmina::set_cuda_launch_config(c);
        double t = time_forward();
        rows.push_back({"forward", dname, mode,
                        "fwd default, " + std::to_string(threads) + " threads", shape, t,
                        fwd_bytes / (t * 1e3), floor_gbps, pct(fwd_bytes, t), true});
        c.forward_variant = kasmina::CudaForwardVariant::generic;
        c.forward_group = 8;
        kasmina::set_cuda_launch_config(c);
        t = time_forward();
        rows.push_back({"forward", dname, mode,
                        "fwd generic, 8 lanes per row, " + std::to_string(threads) + " threads",
                        shape, t, fwd_bytes / (t * 1e3), floor_gbps, pct(fwd_bytes, t), true});
      }
      // The forward variants (sm_90: TMA at each pipeline depth; elsewhere
      // the generic kernel runs and the row says so).
      for (int stages : {2, 3, 4, 8}) {
        kasmina::CudaLaunchConfig c;
        c.forward_variant = kasmina::CudaForwardVariant::tma;
        c.forward_stages = stages;
        kasmina::set_cuda_launch_config(c);
        const std::string desc = kasmina::describe_forward(fp, kasmina::Backend::cuda);
        const bool tma = desc.rfind("cuda.forward.tma", 0) == 0;
        const double t = time_forward();
        rows.push_back({"forward", dname, mode,
                        tma ? "fwd TMA " + std::to_string(stages) + " stages"
                            : "fwd TMA refused: generic ran",
                        shape, t, fwd_bytes / (t * 1e3), floor_gbps, pct(fwd_bytes, t), true});
        if (!tma) break;
        if (stages == 4) {
          const double tb = time_both();
          rows.push_back({"forward+backward", dname, mode, "fwd TMA 4 stages + bwd default", shape,
                          tb, both_bytes / (tb * 1e3), floor_gbps, pct(both_bytes, tb), true});
        }
      }
      // Issue 7's hierarchical-reduction claim: the same forward with the
      // telemetry reduced flat (every thread's statistics through the
      // workspace), with the default plan and with the plain generic kernel
      // (1 row in flight, no TMA): the second is the path with none of the
      // seed document's forward optimisations, for the cumulative claim.
      {
        kasmina::CudaLaunchConfig c;
        c.forward_flat_reduction = true;
        kasmina::set_cuda_launch_config(c);
        double t = time_forward();
        rows.push_back({"forward", dname, mode, "fwd default, flat reduction", shape, t,
                        fwd_bytes / (t * 1e3), floor_gbps, pct(fwd_bytes, t), true});
        c.forward_variant = kasmina::CudaForwardVariant::generic;
        c.forward_rows_in_flight = 1;
        kasmina::set_cuda_launch_config(c);
        t = time_forward();
        rows.push_back({"forward", dname, mode, "fwd generic, rows in flight 1, flat reduction",
                        shape, t, fwd_bytes / (t * 1e3), floor_gbps, pct(fwd_bytes, t), true});
      }
      for (int u : {1, 2}) {
        kasmina::set_cuda_launch_config({0, u});
        const double t = time_both();
        rows.push_back({"forward+backward", dname, mode, "bwd rows in flight " + std::to_string(u),
                        shape, t, both_bytes / (t * 1e3), floor_gbps, pct(both_bytes, t), true});
      }
      // The backward's X and G by TMA (CudaLaunchConfig::backward_tma, one
      // row in flight): against "bwd rows in flight 1" and the default.
      for (int stages : {0, 2, 4, 8}) {
        kasmina::CudaLaunchConfig c;
        c.backward_tma = true;
        c.backward_stages = stages;
        kasmina::set_cuda_launch_config(c);
        const std::string desc = kasmina::describe_backward(bp, kasmina::Backend::cuda);
        const std::size_t at = desc.find("-stage shared-memory ring");
        const double t = time_both();
        std::string label = "bwd TMA refused: generic";
        if (at != std::string::npos) {
          // The depth that ran (the plan lowers what does not fit).
          const std::size_t from = desc.rfind(' ', at) + 1;
          label = "bwd TMA " + desc.substr(from, at - from) + " stages" +
                  (stages == 0 ? " (default)" : "");
        }
        rows.push_back({"forward+backward", dname, mode, label, shape, t, both_bytes / (t * 1e3),
                        floor_gbps, pct(both_bytes, t), true});
      }
      // Shared blueprint rows summed from a list of their seeds
      // (CudaLaunchConfig::backward_row_list, DESIGN 69): against the default.
      {
        kasmina::CudaLaunchConfig c = g_default;
        c.backward_row_list = true;
        kasmina::set_cuda_launch_config(c);
        const double t = time_both();
        rows.push_back({"forward+backward", dname, mode, "bwd row list (backward_row_list)", shape, t,
                        both_bytes / (t * 1e3), floor_gbps, pct(both_bytes, t), true});
      }
      kasmina::set_cuda_launch_config(g_default);
    }
    // Small inputs: the forward replayed from a CUDA graph of kGraphCalls
    // launches (launch gaps shrink to the graph's), per call; L2 is not
    // flushed between the calls of one replay.
    // With programmatic dependent launch (the default) and, as a candidate,
    // without (plain launches captured).
    if (shape.rows * shape.hidden <= (1 << 20)) {
      constexpr int kGraphCalls = 100;
      for (const bool programmatic : {true, false}) {
        if (!programmatic && !(blending && candidates)) break;
        kasmina::CudaLaunchConfig c;
        c.programmatic_launch = programmatic;
        kasmina::set_cuda_launch_config(c);
        cudaGraph_t graph = nullptr;
        cudaGraphExec_t exec = nullptr;
        CHECK(cudaStreamBeginCapture(bench.stream(), cudaStreamCaptureModeThreadLocal));
        for (int i = 0; i < kGraphCalls; ++i) kasmina::forward(fp, kasmina::Backend::cuda);
        CHECK(cudaStreamEndCapture(bench.stream(), &graph));
        CHECK(cudaGraphInstantiate(&exec, graph, 0));
        const double t = bench.time_us([&] { CHECK(cudaGraphLaunch(exec, bench.stream())); }) / kGraphCalls;
        rows.push_back({"forward (graph)", dname, mode,
                        programmatic ? "per call, 100 calls per CUDA graph"
                                     : "per call, 100 plain launches (no PDL) per CUDA graph",
                        shape, t, fwd_bytes / (t * 1e3), floor_gbps, pct(fwd_bytes, t), !programmatic});
        CHECK(cudaGraphExecDestroy(exec));
        CHECK(cudaGraphDestroy(graph));
      }
      kasmina::set_cuda_launch_config(g_default);
    }
    CHECK(cudaFree(fp.workspace));
    CHECK(cudaFree(bp.workspace));
  }
  for (void* p : {x, y, dy, dx}) CHECK(cudaFree(p));
}

// Issue 7's streaming comparison for the small batch: kLayers forwards of
// 16x4096/64 (one x, each its own y, telemetry and workspace), per forward:
// plain launches back to back, one forward_many launch, and the plain
// launches replayed from a CUDA graph. L2 is flushed before each timed run.
void run_streaming(Bench& bench, kasmina::DType dtype, std::vector<Row>& rows) {
  constexpr int kLayers = 8;
  const Shape shape{16, 4096, 64};
  const std::size_t esize = kasmina::dtype_size(dtype);
  const int64_t numel = shape.rows * shape.hidden;
  const std::size_t bytes = static_cast<std::size_t>(numel) * esize;
  void* x = nullptr;
  CHECK(cudaMalloc(&x, bytes));
  if (dtype == kasmina::DType::f32) {
    fill<float>(x, numel, 3);
  } else {
    fill<__nv_bfloat16>(x, numel, 3);
  }
  DeviceLayer layer(shape, SeedsMode::blend_mixed);
  std::vector<kasmina::ForwardParams> params(kLayers);
  std::vector<void*> owned;
  for (int i = 0; i < kLayers; ++i) {
    kasmina::ForwardParams& fp = params[i];
    fp = forward_params_for(layer, shape, dtype, x, bench.stream());
    void *y = nullptr, *tel = nullptr, *ws = nullptr;
    CHECK(cudaMalloc(&y, bytes));
    CHECK(cudaMalloc(&tel, sizeof(float) * shape.seeds * 8));
    fp.y = y;
    fp.telemetry = static_cast<float*>(tel);
    // Sized for the flat telemetry reduction too (a candidate below), the
    // largest workspace any forward variant asks for.
    {
      kasmina::CudaLaunchConfig flat;
      flat.forward_flat_reduction = true;
      kasmina::set_cuda_launch_config(flat);
      fp.workspace_bytes = kasmina::forward_workspace_bytes(fp, kasmina::Backend::cuda);
      kasmina::set_cuda_launch_config(g_default);
    }
    CHECK(cudaMalloc(&ws, fp.workspace_bytes));
    CHECK(cudaMemsetAsync(ws, 0, fp.workspace_bytes, bench.stream()));
    fp.workspace = ws;
    owned.insert(owned.end(), {y, tel, ws});
  }
  const std::string dname(kasmina::dtype_name(dtype));
  const double fwd_bytes = 2.0 * static_cast<double>(bytes);
  auto add = [&](const char* pass, const char* what, double total_us) {
    const double t = total_us / kLayers;
    rows.push_back({pass, dname, "blend-mixed", what, shape, t, fwd_bytes / (t * 1e3), 0.0, 0.0});
  };
  add("forward x8 plain", "8 launches back to back, per forward", bench.time_us([&] {
        for (const auto& fp : params) kasmina::forward(fp, kasmina::Backend::cuda);
      }));
  {
    kasmina::CudaLaunchConfig c;
    c.programmatic_launch = false;
    kasmina::set_cuda_launch_config(c);
    add("forward x8 noPDL", "8 launches back to back without PDL, per forward", bench.time_us([&] {
          for (const auto& fp : params) kasmina::forward(fp, kasmina::Backend::cuda);
        }));
    kasmina::set_cuda_launch_config(g_default);
  }
  add("forward x8 many", "one forward_many launch, per forward", bench.time_us([&] {
        kasmina::forward_many(params.data(), kLayers, kasmina::Backend::cuda);
      }));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CHECK(cudaStreamBeginCapture(bench.stream(), cudaStreamCaptureModeThreadLocal));
  for (const auto& fp : params) kasmina::forward(fp, kasmina::Backend::cuda);
  CHECK(cudaStreamEndCapture(bench.stream(), &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  add("forward x8 graph", "8 launches in a CUDA graph, per forward",
      bench.time_us([&] { CHECK(cudaGraphLaunch(exec, bench.stream())); }));
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  {
    kasmina::CudaLaunchConfig c;
    c.programmatic_launch = false;
    kasmina::set_cuda_launch_config(c);
    CHECK(cudaStreamBeginCapture(bench.stream(), cudaStreamCaptureModeThreadLocal));
    for (const auto& fp : params) kasmina::forward(fp, kasmina::Backend::cuda);
    CHECK(cudaStreamEndCapture(bench.stream(), &graph));
    CHECK(cudaGraphInstantiate(&exec, graph, 0));
    add("forward x8 gr.noPDL", "8 plain launches (no PDL) in a CUDA graph, per forward",
        bench.time_us([&] { CHECK(cudaGraphLaunch(exec, bench.stream())); }));
    CHECK(cudaGraphExecDestroy(exec));
    CHECK(cudaGraphDestroy(graph));
    kasmina::set_cuda_launch_config(g_default);
  }
  for (void* p : owned) CHECK(cudaFree(p));
  CHECK(cudaFree(x));
}

// The host side of a launch: per-call host time of kasmina::forward on the
// small shape (float32, blending seeds) and of an empty kernel launch, each
// the median of 7 batches of kCalls calls enqueued back to back (the GPU
// runs behind; the batch ends with a synchronize that is not counted), and
// the GPU time of an empty kernel by the events method of every other row.
void run_host_overhead(Bench& bench, std::vector<Row>& rows) {
  constexpr int kCalls = 400;
  const Shape shape{16, 4096, 64};
  const int64_t numel = shape.rows * shape.hidden;
  const std::size_t bytes = static_cast<std::size_t>(numel) * sizeof(float);
  void *x = nullptr, *y = nullptr;
  CHECK(cudaMalloc(&x, bytes));
  CHECK(cudaMalloc(&y, bytes));
  fill<float>(x, numel, 5);
  DeviceLayer layer(shape, SeedsMode::blend_mixed);
  kasmina::ForwardParams fp = forward_params_for(layer, shape, kasmina::DType::f32, x, bench.stream());
  fp.y = y;
  fp.telemetry = layer.telemetry;
  fp.nonfinite_count = layer.nonfinite;
  fp.workspace_bytes = kasmina::forward_workspace_bytes(fp, kasmina::Backend::cuda);
  CHECK(cudaMalloc(&fp.workspace, fp.workspace_bytes));
  CHECK(cudaMemset(fp.workspace, 0, fp.workspace_bytes));
  CHECK(cudaDeviceSynchronize());
  auto host_us = [&](auto op) {
    for (int i = 0; i < 50; ++i) op();
    CHECK(cudaStreamSynchronize(bench.stream()));
    std::vector<float> per_call;
    for (int b = 0; b < 7; ++b) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < kCalls; ++i) op();
      const auto t1 = std::chrono::steady_clock::now();
      CHECK(cudaStreamSynchronize(bench.stream()));
      per_call.push_back(static_cast<float>(
          std::chrono::duration<double, std::micro>(t1 - t0).count() / kCalls));
    }
    return median(per_call);
  };
  const std::string dname = "float32";
  auto add = [&](const char* pass, const char* what, double us) {
    rows.push_back({pass, dname, "blend-mixed", what, shape, us, 0.0, 0.0, 0.0});
  };
  add("host forward", "host us per kasmina::forward call (plan + checks + launch)",
      host_us([&] { kasmina::forward(fp, kasmina::Backend::cuda); }));
  add("host empty launch", "host us per empty kernel launch",
      host_us([&] {
        empty_kernel<<<1, 32, 0, bench.stream()>>>();
        CHECK(cudaGetLastError());
      }));
  add("gpu empty kernel", "GPU us of an empty kernel (events method)", bench.time_us([&] {
        empty_kernel<<<1, 32, 0, bench.stream()>>>();
        CHECK(cudaGetLastError());
      }));
  CHECK(cudaFree(fp.workspace));
  CHECK(cudaFree(x));
  CHECK(cudaFree(y));
}

#ifdef KASMINA_TIMELINE
// The records of one launch, one line per CTA: op, shape, globaltimer ns
// from the earliest CTA's entry, then clock64 cycles from the CTA's own entry.
void print_timeline(const char* op, const std::vector<unsigned long long>& tl, kasmina::DType dtype,
                    const Shape& shape, const char* mode, int rep, double us) {
  using kasmina::cuda::kTimelineSlots;
  using kasmina::cuda::kTimelineWords;
  unsigned long long g0 = ~0ull;
  for (std::size_t c = 0; c * kTimelineWords < tl.size(); ++c) {
    const unsigned long long g = tl[c * kTimelineWords];
    if (g != 0 && g < g0) g0 = g;
  }
  for (std::size_t c = 0; c * kTimelineWords < tl.size(); ++c) {
    const unsigned long long* r = tl.data() + c * kTimelineWords;
    if (r[0] == 0) continue;
    const unsigned long long meta = r[2 * kTimelineSlots], where = r[2 * kTimelineSlots + 1];
    std::printf("TL %s %s %lldx%lldx%d %s %d %.2f %zu %llu %llu %llu %llu %llu %llu", op,
                std::string(kasmina::dtype_name(dtype)).c_str(), static_cast<long long>(shape.rows),
                static_cast<long long>(shape.hidden), shape.seeds, mode, rep, us, c,
                where >> 20, where & 0xFFFFF, meta & 0xFFFF, (meta >> 16) & 1, (meta >> 17) & 1, meta >> 20);
    for (int k = 0; k < kTimelineSlots; ++k) {
      std::printf(" %lld", r[k] ? static_cast<long long>(r[k] - g0) : -1ll);
    }
    for (int k = 1; k < kTimelineSlots; ++k) {
      const unsigned long long ck = r[kTimelineSlots + k];
      std::printf(" %lld", ck ? static_cast<long long>(ck - r[kTimelineSlots]) : -1ll);
    }
    std::printf("\n");
  }
}

// --timeline (a KASMINA_TIMELINE build, src/cuda/timeline.cuh): for each
// shape, dtype and seed mode (blend: blend-mixed's layer, dormant, own:
// blend-own's row per seed), three L2-flushed forward+backward pairs (the
// events time both), each followed by the forward's records (TMA kernel)
// and the backward's (generic kernel).
void run_timeline(const std::vector<Shape>& shapes) {
  using kasmina::cuda::kTimelineSlots;
  Bench bench(1);
  std::printf("TLHEAD op dtype shape mode rep event_us cta seed tile smid last last_seed passes");
  for (int k = 0; k < kTimelineSlots; ++k) std::printf(" g%d", k);
  for (int k = 1; k < kTimelineSlots; ++k) std::printf(" c%d", k);
  std::printf("\n");
  for (const Shape& shape : shapes) {
    for (kasmina::DType dtype : {kasmina::DType::f32, kasmina::DType::bf16}) {
      const int64_t numel = shape.rows * shape.hidden;
      const std::size_t bytes = static_cast<std::size_t>(numel) * kasmina::dtype_size(dtype);
      void *x = nullptr, *y = nullptr, *dy = nullptr, *dx = nullptr;
      for (void** p : {&x, &y, &dy, &dx}) CHECK(cudaMalloc(p, bytes + 16));
      if (dtype == kasmina::DType::f32) {
        fill<float>(x, numel, 1);
        fill<float>(dy, numel, 2);
      } else {
        fill<__nv_bfloat16>(x, numel, 1);
        fill<__nv_bfloat16>(dy, numel, 2);
      }
      // The timeline's names of the layers (scripts/timeline_summary.py).
      for (const auto& [mode, seeds_mode] :
           {std::pair{"blend", SeedsMode::blend_mixed}, std::pair{"dormant", SeedsMode::dormant},
            std::pair{"own", SeedsMode::blend_own}}) {
        DeviceLayer layer(shape, seeds_mode);
        kasmina::ForwardParams fp = forward_params_for(layer, shape, dtype, x, bench.stream());
        fp.y = y;
        fp.telemetry = layer.telemetry;
        fp.workspace_bytes = kasmina::forward_workspace_bytes(fp, kasmina::Backend::cuda);
        kasmina::BackwardParams bp = backward_params_for(layer, shape, dtype, x, dy, dx, bench.stream());
        bp.workspace_bytes = kasmina::backward_workspace_bytes(bp, kasmina::Backend::cuda);
        CHECK(cudaMalloc(&fp.workspace, fp.workspace_bytes));
        CHECK(cudaMalloc(&bp.workspace, bp.workspace_bytes));
        CHECK(cudaMemsetAsync(fp.workspace, 0, fp.workspace_bytes, bench.stream()));
        CHECK(cudaMemsetAsync(bp.workspace, 0, bp.workspace_bytes, bench.stream()));
        for (int rep = 0; rep < 3; ++rep) {
          kasmina::cuda::forward_timeline_reset();
          kasmina::cuda::backward_timeline_reset();
          const double us = bench.time_us([&] {
            kasmina::forward(fp, kasmina::Backend::cuda);
            kasmina::backward(bp, kasmina::Backend::cuda);
          });
          print_timeline("fwd", kasmina::cuda::forward_timeline(kasmina::cuda::kTimelineCtas), dtype, shape,
                         mode, rep, us);
          print_timeline("bwd", kasmina::cuda::backward_timeline(kasmina::cuda::kTimelineCtas), dtype, shape,
                         mode, rep, us);
        }
        CHECK(cudaFree(fp.workspace));
        CHECK(cudaFree(bp.workspace));
      }
      for (void* p : {x, y, dy, dx}) CHECK(cudaFree(p));
    }
  }
}
#endif

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int runs = 50;
  bool candidates = true;
  std::string json_path;
  [[maybe_unused]] bool timeline = false;
  std::vector<Shape> shapes = {{16384, 4096, 64}, {8192, 768, 16}, {16, 4096, 64}};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--runs" && i + 1 < argc) {
      runs = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else if (a == "--no-candidates") {
      candidates = false;
    } else if (a == "--warm-code") {
      g_warm_code = true;
    } else if (a == "--copies") {
      g_copies = true;
    } else if (a == "--copy-per-sm" && i + 1 < argc) {
      g_copies = true;
      std::stringstream list(argv[++i]);
      std::string item;
      while (std::getline(list, item, ',')) {
        const int n = std::atoi(item.c_str());
        if (n < 1 || n > 32) {
          std::fprintf(stderr, "bench_cuda: bad --copy-per-sm value '%s' (want 1 to 32)\n", item.c_str());
          return 2;
        }
        g_copy_per_sm.push_back(n);
      }
    } else if (a == "--group" && i + 1 < argc) {
      g_default.forward_group = std::atoi(argv[++i]);
    } else if (a == "--no-pdl") {
      g_default.programmatic_launch = false;
    } else if (a == "--row-list") {
      g_default.backward_row_list = true;
    } else if (a == "--tma-store" || a == "--no-tma-store") {
      g_default.forward_tma_store = a == "--tma-store" ? kasmina::CudaSwitch::on : kasmina::CudaSwitch::off;
    } else if (a == "--stages" && i + 1 < argc) {
      g_default.forward_stages = std::atoi(argv[++i]);
    } else if (a == "--late-pdl" || a == "--no-late-pdl") {
      g_default.forward_late_dependents =
          a == "--late-pdl" ? kasmina::CudaSwitch::on : kasmina::CudaSwitch::off;
#ifdef KASMINA_TIMELINE
    } else if (a == "--timeline") {
      timeline = true;
#endif
    } else if (a == "--shapes" && i + 1 < argc) {
      shapes.clear();
      std::stringstream list(argv[++i]);
      std::string item;
      while (std::getline(list, item, ',')) {
        Shape sh{};
        long long r = 0, h = 0;
        int sd = 0;
        if (std::sscanf(item.c_str(), "%lldx%lld:%d", &r, &h, &sd) != 3 || r < 0 || h <= 0 ||
            sd <= 0 || h % sd != 0) {
          std::fprintf(stderr, "bench_cuda: bad shape '%s' (want ROWSxHIDDEN:SEEDS)\n", item.c_str());
          return 2;
        }
        sh.rows = r;
        sh.hidden = h;
        sh.seeds = sd;
        shapes.push_back(sh);
      }
    } else {
      std::fprintf(stderr,
                   "usage: bench_cuda [--runs N] [--json FILE] [--no-candidates] [--shapes RxH:S,...] "
                   "[--no-pdl] [--tma-store | --no-tma-store] [--late-pdl | --no-late-pdl] [--stages N] [--warm-code]\n"
                   "       [--copies] [--copy-per-sm N,...] [--group N] [--row-list]\n");
      return 2;
    }
  }
  try {  // the switches' values, checked before anything runs
    kasmina::set_cuda_launch_config(g_default);
  } catch (const kasmina::Error& e) {
    std::fprintf(stderr, "bench_cuda: %s\n", e.what());
    return 2;
  }
  if (!kasmina::backend_available(kasmina::Backend::cuda)) {
    std::fprintf(stderr, "bench_cuda: no CUDA device: %s\n",
                 kasmina::backend_unavailable_reason(kasmina::Backend::cuda).c_str());
    return 1;
  }
  try {
#ifdef KASMINA_TIMELINE
    if (timeline) {
      run_timeline(shapes);
      return 0;
    }
#endif
    Bench bench(runs);
    std::printf("bench_cuda on %s (sm_%d%d, %d SMs), median of %d runs, L2 flushed\n",
                bench.prop().name, bench.prop().major, bench.prop().minor,
                bench.prop().multiProcessorCount, runs);
    std::vector<Row> rows;
    bool small = false;
    for (const Shape& s : shapes) {
      small = small || (s.rows == 16 && s.hidden == 4096 && s.seeds == 64);
      for (kasmina::DType dt : {kasmina::DType::f32, kasmina::DType::bf16}) {
        run_shape(bench, s, dt, candidates, rows);
      }
    }
    if (small) {
      for (kasmina::DType dt : {kasmina::DType::f32, kasmina::DType::bf16}) run_streaming(bench, dt, rows);
      run_host_overhead(bench, rows);
    }
    std::printf("%-17s %-9s %-16s %-12s %10s %9s %9s %7s\n", "pass", "dtype", "shape", "seeds",
                "time_us", "GB/s", "floorGB/s", "%floor");
    for (const Row& r : rows) {
      if (r.candidate) continue;
      std::ostringstream shape;
      shape << r.shape.rows << "x" << r.shape.hidden << "/" << r.shape.seeds;
      std::printf("%-17s %-9s %-16s %-12s %10.1f %9.0f %9.0f %6.1f%%\n", r.pass.c_str(),
                  r.dtype.c_str(), shape.str().c_str(), r.seeds_mode.c_str(), r.time_us, r.gbps,
                  r.floor_gbps, r.pct_floor);
    }
    std::printf("launch-config candidates (blending seeds, same run):\n");
    for (const Row& r : rows) {
      if (!r.candidate) continue;
      std::ostringstream shape;
      shape << r.shape.rows << "x" << r.shape.hidden << "/" << r.shape.seeds;
      std::printf("  %-17s %-9s %-16s %-22s %9.1f us %6.1f%%\n", r.pass.c_str(), r.dtype.c_str(),
                  shape.str().c_str(), r.variant.c_str(), r.time_us, r.pct_floor);
    }
    for (const Row& r : rows) {
      if (r.shape.rows == 16 && !r.candidate && r.pass.rfind("forward", 0) == 0 &&
          r.pass != "forward+backward") {
        std::printf("small-batch %s (16x4096, S=64, %s, %s): %.2f us GPU time\n", r.pass.c_str(),
                    r.dtype.c_str(), r.seeds_mode.c_str(), r.time_us);
      }
    }
    std::printf("variants:\n");
    for (const Row& r : rows) {
      if (r.seeds_mode == "blend-mixed" && !r.candidate && r.pass != "forward (graph)" &&
          r.floor_gbps > 0.0) {
        std::printf("  %s\n", r.variant.c_str());
      }
    }
    if (!json_path.empty()) {
      std::ofstream out(json_path);
      out << "{\n  \"device\": \"" << json_escape(bench.prop().name) << "\",\n  \"runs\": " << runs
          << ",\n  \"rows\": [\n";
      for (std::size_t i = 0; i < rows.size(); ++i) {
        const Row& r = rows[i];
        out << "    {\"pass\": \"" << r.pass << "\", \"dtype\": \"" << r.dtype
            << "\", \"rows\": " << r.shape.rows << ", \"hidden\": " << r.shape.hidden
            << ", \"seeds\": " << r.shape.seeds << ", \"mode\": \"" << r.seeds_mode
            << "\", \"time_us\": " << r.time_us << ", \"gbps\": " << r.gbps
            << ", \"floor_gbps\": " << r.floor_gbps << ", \"pct_floor\": " << r.pct_floor
            << ", \"candidate\": " << (r.candidate ? "true" : "false")
            << ", \"variant\": \"" << json_escape(r.variant) << "\"}"
            << (i + 1 < rows.size() ? "," : "") << "\n";
      }
      out << "  ]\n}\n";
      if (!out) throw std::runtime_error("cannot write " + json_path);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda: %s\n", e.what());
    return 1;
  }
  return 0;
}
