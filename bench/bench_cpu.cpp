// Benchmark of the fast CPU backend: forward+telemetry and backward for each
// shape and dtype, each beside its byte floor measured in the same run with
// the same thread count (forward: a threaded copy of x into y; backward: a
// kernel reading x and dy and writing dx). Caches are flushed before every
// timed repetition; op and floor alternate repetition by repetition; the
// figure is the median, and "paired" the median of the repetitions' own
// op / floor ratios.
//
//   bench_cpu [--json] [--shapes NxH:S,...] [--dtypes f32,bf16,f16] [--reps R] [--threads T]
//             [--no-flush]   (no cache flush between repetitions: the compute cost of
//                             inputs that fit in cache, not a memory-floor ratio)
#include <omp.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kasmina/kasmina.hpp"

namespace {

using namespace kasmina;

struct Shape {
  int64_t rows, hidden;
  int32_t seeds;
  std::vector<DType> dtypes;
};

struct Options {
  bool json = false;
  std::vector<Shape> shapes;
  std::vector<DType> dtypes;  // empty: each shape's default
  int reps = 15;
  int threads = 0;
  bool flush = true;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "bench_cpu: %s\nusage: bench_cpu [--json] [--shapes NxH:S,...] "
               "[--dtypes f32,bf16,f16] [--reps R] [--threads T] [--no-flush]\n",
               why.c_str());
  std::exit(2);
}

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::stringstream ss(text);
  for (std::string part; std::getline(ss, part, sep);) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}

DType parse_dtype(const std::string& name) {
  if (name == "f32" || name == "fp32" || name == "float32") return DType::f32;
  if (name == "bf16" || name == "bfloat16") return DType::bf16;
  if (name == "f16" || name == "fp16" || name == "float16") return DType::f16;
  usage("unknown dtype '" + name + "' (the cpu backend takes f32, bf16, f16)");
}

const char* short_name(DType d) {
  return d == DType::f32 ? "f32" : d == DType::bf16 ? "bf16" : "f16";
}

Options parse(int argc, char** argv) {
  Options o;
  o.shapes = {{8192, 768, 16, {DType::f32, DType::bf16, DType::f16}},
              {1024, 4096, 64, {DType::f32}},
              {16, 4096, 64, {DType::f32}}};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--json") {
      o.json = true;
    } else if (arg == "--shapes") {
      o.shapes.clear();
      for (const std::string& s : split(value(), ',')) {
        long long n = 0, h = 0;
        int seeds = 0;
        if (std::sscanf(s.c_str(), "%lldx%lld:%d", &n, &h, &seeds) != 3 || n < 0 || h <= 0 ||
            seeds <= 0 || h % seeds != 0) {
          usage("bad shape '" + s + "' (want NxH:S with H % S == 0)");
        }
        o.shapes.push_back({n, h, seeds, {DType::f32}});
      }
    } else if (arg == "--dtypes") {
      for (const std::string& d : split(value(), ',')) o.dtypes.push_back(parse_dtype(d));
    } else if (arg == "--reps") {
      o.reps = std::atoi(value().c_str());
      if (o.reps < 1) usage("--reps must be >= 1");
    } else if (arg == "--no-flush") {
      o.flush = false;
    } else if (arg == "--threads") {
      o.threads = std::atoi(value().c_str());
      if (o.threads < 0) usage("--threads must be >= 0");
    } else {
      usage("unknown option " + arg);
    }
  }
  if (o.threads == 0) o.threads = build_info().cpu_threads;
  return o;
}

// Writing a buffer larger than the last-level cache between repetitions, so
// every repetition reads its inputs from memory as a training step would:
// twice the L3 the system reports (at least 128 MiB, at most 2 GiB; a VM may
// report its host's whole L3).
std::size_t flush_bytes() {
  long l3 = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
  l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  const std::size_t lo = std::size_t{128} << 20, hi = std::size_t{2} << 30;
  const std::size_t want = l3 > 0 ? 2 * static_cast<std::size_t>(l3) : lo;
  return std::min(std::max(want, lo), hi);
}

// Written by every thread, so that each core's own L3 slice (or CCX's L3)
// is overwritten, not only the main thread's.
void flush_caches() {
  static std::vector<uint8_t> junk(flush_bytes());
  static uint8_t tick = 0;
  ++tick;
  const int64_t chunk = int64_t{1} << 20;
  const int64_t chunks = static_cast<int64_t>(junk.size()) / chunk;
  uint8_t* base = junk.data();
  const uint8_t value = tick;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) std::memset(base + c * chunk, value, static_cast<std::size_t>(chunk));
  std::memset(base + chunks * chunk, value, junk.size() - static_cast<std::size_t>(chunks * chunk));
}

struct Timing {
  double median, best;
};

// The median is the figure; the best repetition is printed beside it because
// on a shared machine other processes inflate the median, never the best.
bool g_flush = true;  // Options::flush

double seconds_of(const std::function<void()>& fn) {
  if (g_flush) flush_caches();
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double>(t1 - t0).count();
}

Timing timing_of(std::vector<double> times) {
  std::sort(times.begin(), times.end());
  return {times[times.size() / 2], times.front()};
}

// An op and its floor, timed in alternation (each repetition runs both,
// which one first alternating): on a machine shared with other processes,
// a slow phase then falls on both rather than on whichever ran during it.
// `paired` is the median of the repetitions' own ratios (op / floor).
struct PairTiming {
  Timing time, floor;
  double paired;
};

PairTiming time_pair(int reps, const std::function<void()>& fn, const std::function<void()>& floor_fn) {
  for (int i = 0; i < 2; ++i) {  // warm-up: page faults, thread pool start
    fn();
    floor_fn();
  }
  std::vector<double> t, f, r;
  for (int i = 0; i < reps; ++i) {
    double a = 0, b = 0;
    if (i % 2 == 0) {
      a = seconds_of(fn);
      b = seconds_of(floor_fn);
    } else {
      b = seconds_of(floor_fn);
      a = seconds_of(fn);
    }
    t.push_back(a);
    f.push_back(b);
    r.push_back(a / b);
  }
  std::sort(r.begin(), r.end());
  return {timing_of(t), timing_of(f), r[r.size() / 2]};
}

struct Result {
  std::string shape;
  std::string dtype;
  std::string op;
  PairTiming pt;
  double bytes;
  std::string kernel;
};

// The layer as a training step sees it mid-graft: every seed blends, kinds
// mixed (CONV only where C >= 3), each seed with its own blueprint.
struct Problem {
  int64_t rows, hidden, chunk;
  int32_t seeds;
  DType dtype;
  std::vector<uint8_t> x, y, dy, dx;
  std::vector<int32_t> stage, kind, blueprint;
  std::vector<float> alpha, weights, scales, telemetry, dweights, dscales, dalpha, grad_stats;
  std::vector<int64_t> nonfinite;

  Problem(int64_t n, int64_t h, int32_t s, DType d) : rows(n), hidden(h), chunk(h / s), seeds(s), dtype(d) {
    const std::size_t bytes = static_cast<std::size_t>(n * h) * dtype_size(d);
    x.resize(bytes);
    y.resize(bytes);
    dy.resize(bytes);
    dx.resize(bytes);
    std::mt19937_64 rng(42);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int64_t i = 0; i < n * h; ++i) {
      put(x, i, normal(rng));
      put(dy, i, normal(rng));
    }
    const int32_t kinds = chunk >= 3 ? kNumKinds : 3;
    for (int32_t k = 0; k < s; ++k) {
      stage.push_back(static_cast<int32_t>(Stage::fine_tuning));
      kind.push_back(k % kinds);
      blueprint.push_back(k + 1);
      alpha.push_back(0.5f);
    }
    weights.resize(static_cast<std::size_t>((s + 1) * chunk));
    for (float& w : weights) w = 0.5f * normal(rng) + 0.5f;
    scales.assign(static_cast<std::size_t>(s + 1), 1.0f);
    telemetry.resize(static_cast<std::size_t>(s) * kTelemetryWidth);
    nonfinite.resize(static_cast<std::size_t>(s));
    dweights.resize(weights.size());
    dscales.resize(scales.size());
    dalpha.resize(static_cast<std::size_t>(s));
    grad_stats.resize(static_cast<std::size_t>(s) * kGradStatsWidth);
  }

  void put(std::vector<uint8_t>& buf, int64_t i, float v) const {
    if (dtype == DType::f32) {
      std::memcpy(buf.data() + i * 4, &v, 4);
    } else {
      // Truncating to the upper half is enough for bf16 timing data; f16 gets
      // small integers' exact bits so the inputs stay finite.
      uint16_t bits;
      if (dtype == DType::bf16) {
        uint32_t u;
        std::memcpy(&u, &v, 4);
        bits = static_cast<uint16_t>(u >> 16);
      } else {
        const int q = std::clamp(static_cast<int>(v * 8.0f), -255, 255);
        // f16 of q/8: sign, exponent and mantissa built from the integer.
        bits = q == 0 ? 0 : half_bits(static_cast<float>(q) / 8.0f);
      }
      std::memcpy(buf.data() + i * 2, &bits, 2);
    }
  }

  static uint16_t half_bits(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const int exponent = static_cast<int>((u >> 23) & 0xff) - 127 + 15;
    const uint16_t mantissa = static_cast<uint16_t>((u >> 13) & 0x3ffu);
    return static_cast<uint16_t>(sign | (exponent << 10) | mantissa);
  }

  ForwardParams forward_params(int threads) {
    ForwardParams p;
    p.x = x.data();
    p.y = y.data();
    p.dtype = dtype;
    p.rows = rows;
    p.hidden = hidden;
    p.num_seeds = seeds;
    p.seeds = {stage.data(), kind.data(), blueprint.data(), alpha.data()};
    p.registry = {weights.data(), scales.data(), seeds + 1};
    p.telemetry = telemetry.data();
    p.nonfinite_count = nonfinite.data();
    p.num_threads = threads;
    return p;
  }

  BackwardParams backward_params(int threads) {
    BackwardParams p;
    p.x = x.data();
    p.dy = dy.data();
    p.dx = dx.data();
    p.dtype = dtype;
    p.rows = rows;
    p.hidden = hidden;
    p.num_seeds = seeds;
    p.seeds = {stage.data(), kind.data(), blueprint.data(), alpha.data()};
    p.registry = {weights.data(), scales.data(), seeds + 1};
    p.dweights = dweights.data();
    p.dscales = dscales.data();
    p.dalpha = dalpha.data();
    p.grad_stats = grad_stats.data();
    p.num_threads = threads;
    return p;
  }
};

// Byte floors, threaded over rows like the backend.
void copy_floor(const Problem& p, int threads, uint8_t* out) {
  const std::size_t row_bytes = static_cast<std::size_t>(p.hidden) * dtype_size(p.dtype);
  const uint8_t* in = p.x.data();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < p.rows; ++n) {
    std::memcpy(out + static_cast<std::size_t>(n) * row_bytes, in + static_cast<std::size_t>(n) * row_bytes, row_bytes);
  }
}

template <typename T>
void add_floor_typed(const T* a, const T* b, T* out, int64_t rows, int64_t hidden, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < rows; ++n) {
    const T* ar = a + n * hidden;
    const T* br = b + n * hidden;
    T* orow = out + n * hidden;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) orow[j] = static_cast<T>(ar[j] + br[j]);
  }
}

void add_floor(Problem& p, int threads) {
  // Reads x and dy, writes dx: the bytes backward must move. 16-bit dtypes
  // add their raw bits, which costs the same as a real add.
  if (p.dtype == DType::f32) {
    add_floor_typed(reinterpret_cast<const float*>(p.x.data()), reinterpret_cast<const float*>(p.dy.data()),
                    reinterpret_cast<float*>(p.dx.data()), p.rows, p.hidden, threads);
  } else {
    add_floor_typed(reinterpret_cast<const uint16_t*>(p.x.data()), reinterpret_cast<const uint16_t*>(p.dy.data()),
                    reinterpret_cast<uint16_t*>(p.dx.data()), p.rows, p.hidden, threads);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  g_flush = o.flush;
  std::vector<Result> results;
  for (const Shape& shape : o.shapes) {
    const std::vector<DType>& dtypes = o.dtypes.empty() ? shape.dtypes : o.dtypes;
    for (DType dtype : dtypes) {
      const std::string shape_name = std::to_string(shape.rows) + "x" + std::to_string(shape.hidden) +
                                     ":" + std::to_string(shape.seeds);
      std::fprintf(stderr, "bench_cpu: %s %s, %d threads, %d reps...\n", shape_name.c_str(),
                   short_name(dtype), o.threads, o.reps);
      Problem p(shape.rows, shape.hidden, shape.seeds, dtype);
      const double elems = static_cast<double>(shape.rows * shape.hidden);
      const double size = static_cast<double>(dtype_size(dtype));

      ForwardParams fp = p.forward_params(o.threads);
      const PairTiming fwd = time_pair(o.reps, [&] { forward(fp, Backend::cpu); },
                                       [&] { copy_floor(p, o.threads, p.y.data()); });
      results.push_back({shape_name, short_name(dtype), "forward+telemetry", fwd, 2.0 * elems * size,
                         describe_forward(fp, Backend::cpu)});

      BackwardParams bp = p.backward_params(o.threads);
      const PairTiming bwd = time_pair(o.reps, [&] { backward(bp, Backend::cpu); },
                                       [&] { add_floor(p, o.threads); });
      results.push_back({shape_name, short_name(dtype), "backward", bwd, 3.0 * elems * size,
                         describe_backward(bp, Backend::cpu)});
    }
  }

  if (o.json) {
    std::printf("{\"threads\": %d, \"reps\": %d, \"flush\": %s, \"results\": [\n", o.threads, o.reps,
                o.flush ? "true" : "false");
    for (std::size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      std::printf(
          "  {\"shape\": \"%s\", \"dtype\": \"%s\", \"op\": \"%s\", \"ms\": %.4f, \"best_ms\": %.4f, "
          "\"gbps\": %.3f, \"floor_ms\": %.4f, \"floor_best_ms\": %.4f, \"floor_gbps\": %.3f, "
          "\"ratio_to_floor\": %.3f, \"best_ratio_to_floor\": %.3f, \"paired_ratio\": %.3f, "
          "\"kernel\": \"%s\"}%s\n",
          r.shape.c_str(), r.dtype.c_str(), r.op.c_str(), r.pt.time.median * 1e3, r.pt.time.best * 1e3,
          r.bytes / r.pt.time.median / 1e9, r.pt.floor.median * 1e3, r.pt.floor.best * 1e3,
          r.bytes / r.pt.floor.median / 1e9, r.pt.time.median / r.pt.floor.median,
          r.pt.time.best / r.pt.floor.best, r.pt.paired, r.kernel.c_str(), i + 1 < results.size() ? "," : "");
    }
    std::printf("]}\n");
  } else {
    std::printf("%-14s %-5s %-18s %9s %9s %8s %9s %9s %8s %7s %7s %7s\n", "shape NxH:S", "dtype", "op", "ms",
                "best ms", "GB/s", "floor ms", "best ms", "GB/s", "ratio", "best", "paired");
    for (const Result& r : results) {
      std::printf("%-14s %-5s %-18s %9.3f %9.3f %8.2f %9.3f %9.3f %8.2f %7.2f %7.2f %7.2f\n", r.shape.c_str(),
                  r.dtype.c_str(), r.op.c_str(), r.pt.time.median * 1e3, r.pt.time.best * 1e3,
                  r.bytes / r.pt.time.median / 1e9, r.pt.floor.median * 1e3, r.pt.floor.best * 1e3,
                  r.bytes / r.pt.floor.median / 1e9, r.pt.time.median / r.pt.floor.median,
                  r.pt.time.best / r.pt.floor.best, r.pt.paired);
    }
    std::printf("threads: %d, median (and best) of %d %s, op and floor alternating; GB/s from the median; "
                "floor = the same bytes read+written; paired = median of each repetition's op / floor\n",
                o.threads, o.reps,
                o.flush ? "after a cache flush" : "WITHOUT a cache flush (in-cache compute cost)");
  }
  return 0;
}
