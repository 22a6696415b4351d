// GPU tests of the CUDA backend (run by scripts/gpu-check): every output
// against the float64 reference under SPEC section 9, bit-identical reruns,
// CUDA-graph replay, and the workspace check. Outputs are poisoned with 0xFF
// bytes (NaN) first, so anything left unwritten fails.
//
// Suites named Small* hold a few small problems only: scripts/gpu-check runs
// them under compute-sanitizer (memcheck, racecheck, initcheck, synccheck).
// Without a CUDA device every test fails loudly: this file only runs where a
// GPU is expected.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "support/harness.hpp"

namespace kasmina::test {
namespace {

void check_cuda(cudaError_t status, const char* expr, const char* file, int line) {
  if (status != cudaSuccess) {
    std::ostringstream os;
    os << file << ":" << line << ": " << expr << " failed: " << cudaGetErrorString(status);
    throw std::runtime_error(os.str());
  }
}
#define CUDA_OK(expr) check_cuda((expr), #expr, __FILE__, __LINE__)

// Owning device allocation. `offset` bytes past a 256-byte aligned base
// gives a deliberately misaligned pointer.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes, std::size_t offset = 0) : bytes_(bytes), offset_(offset) {
    CUDA_OK(cudaMalloc(&base_, bytes + offset + 1));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(base_, o.base_);
    std::swap(bytes_, o.bytes_);
    std::swap(offset_, o.offset_);
    return *this;
  }
  ~DeviceBuffer() {
    if (base_ != nullptr) (void)cudaFree(base_);
  }
  void* get() const { return static_cast<unsigned char*>(base_) + offset_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(get());
  }
  std::size_t bytes() const { return bytes_; }
  void upload(const void* host, std::size_t n) const {
    if (n > 0) CUDA_OK(cudaMemcpy(get(), host, n, cudaMemcpyHostToDevice));
  }
  void download(void* host, std::size_t n) const {
    if (n > 0) CUDA_OK(cudaMemcpy(host, get(), n, cudaMemcpyDeviceToHost));
  }
  // Complete before it returns: cudaMemset runs on the legacy default stream,
  // asynchronously to the host, and a kernel on a non-blocking stream (the
  // graph replay's) is not ordered after it. Without the wait the poison
  // could land after that kernel's writes: under load from other processes
  // on the GPU (twenty-fifth session) SmallCuda.GraphReplay saw the poison
  // in telemetry and gradients after a replay.
  void fill(int byte) const {
    CUDA_OK(cudaMemset(get(), byte, bytes_));
    CUDA_OK(cudaDeviceSynchronize());
  }

 private:
  void* base_ = nullptr;
  std::size_t bytes_ = 0;
  std::size_t offset_ = 0;
};

template <typename T>
DeviceBuffer upload_vector(const std::vector<T>& v, std::size_t offset = 0) {
  DeviceBuffer b(v.size() * sizeof(T), offset);
  b.upload(v.data(), v.size() * sizeof(T));
  return b;
}

// A Problem's inputs, outputs and workspaces on the device.
struct DeviceProblem {
  DeviceBuffer x, dy, y, dx;
  DeviceBuffer stage, kind, blueprint, alpha, weights, scales;
  DeviceBuffer telemetry, nonfinite, dweights, dscales, dalpha, grad_stats;
  DeviceBuffer fwd_workspace, bwd_workspace;

  // misalign: shift x, y, dy, dx by one element (scalar path).
  DeviceProblem(Problem& p, bool misalign) {
    const std::size_t off = misalign ? dtype_size(p.options.dtype) : 0;
    x = DeviceBuffer(p.x.bytes.size(), off);
    x.upload(p.x.data(), p.x.bytes.size());
    dy = DeviceBuffer(p.dy.bytes.size(), off);
    dy.upload(p.dy.data(), p.dy.bytes.size());
    y = DeviceBuffer(p.y.bytes.size(), off);
    dx = DeviceBuffer(p.dx.bytes.size(), off);
    stage = upload_vector(p.stage);
    kind = upload_vector(p.kind);
    blueprint = upload_vector(p.blueprint);
    alpha = upload_vector(p.alpha);
    weights = upload_vector(p.weights);
    scales = upload_vector(p.scales);
    telemetry = DeviceBuffer(p.telemetry.size() * sizeof(float));
    nonfinite = DeviceBuffer(p.nonfinite.size() * sizeof(int64_t));
    dweights = DeviceBuffer(p.dweights.size() * sizeof(float));
    dscales = DeviceBuffer(p.dscales.size() * sizeof(float));
    dalpha = DeviceBuffer(p.dalpha.size() * sizeof(float));
    grad_stats = DeviceBuffer(p.grad_stats.size() * sizeof(float));
    // The sizes depend on shapes (and the forward's on forward_flat_reduction
    // when the buffers are made): the host params of the problem do.
    const std::size_t fw = forward_workspace_bytes(p.forward_params(), Backend::cuda);
    const std::size_t bw = backward_workspace_bytes(p.backward_params(), Backend::cuda);
    fwd_workspace = DeviceBuffer(fw);
    bwd_workspace = DeviceBuffer(bw);
    fwd_workspace.fill(0);
    bwd_workspace.fill(0);
    poison();
  }

  void poison() const {
    for (const DeviceBuffer* b : {&y, &dx, &telemetry, &nonfinite, &dweights, &dscales, &dalpha,
                                  &grad_stats}) {
      b->fill(0xFF);
    }
  }

  SeedTable seeds() const {
    return {stage.as<const int32_t>(), kind.as<const int32_t>(), blueprint.as<const int32_t>(),
            alpha.as<const float>()};
  }

  ForwardParams forward_params(Problem& p, Stream stream = nullptr) const {
    ForwardParams f = p.forward_params();
    f.x = x.get();
    f.y = y.get();
    f.seeds = seeds();
    f.registry.weights = weights.as<const float>();
    f.registry.scales = scales.as<const float>();
    f.telemetry = telemetry.as<float>();
    f.nonfinite_count = nonfinite.as<int64_t>();
    f.workspace = fwd_workspace.get();
    f.workspace_bytes = fwd_workspace.bytes();
    f.stream = stream;
    return f;
  }

  BackwardParams backward_params(Problem& p, Stream stream = nullptr) const {
    BackwardParams b = p.backward_params();
    b.x = x.get();
    b.dy = dy.get();
    b.dx = dx.get();
    b.seeds = seeds();
    b.registry.weights = weights.as<const float>();
    b.registry.scales = scales.as<const float>();
    b.dweights = dweights.as<float>();
    b.dscales = dscales.as<float>();
    b.dalpha = dalpha.as<float>();
    b.grad_stats = grad_stats.as<float>();
    b.workspace = bwd_workspace.get();
    b.workspace_bytes = bwd_workspace.bytes();
    b.stream = stream;
    return b;
  }

  void download_forward(Problem& p) const {
    y.download(p.y.data(), p.y.bytes.size());
    telemetry.download(p.telemetry.data(), p.telemetry.size() * sizeof(float));
    nonfinite.download(p.nonfinite.data(), p.nonfinite.size() * sizeof(int64_t));
  }
  void download_backward(Problem& p) const {
    dx.download(p.dx.data(), p.dx.bytes.size());
    dweights.download(p.dweights.data(), p.dweights.size() * sizeof(float));
    dscales.download(p.dscales.data(), p.dscales.size() * sizeof(float));
    dalpha.download(p.dalpha.data(), p.dalpha.size() * sizeof(float));
    grad_stats.download(p.grad_stats.data(), p.grad_stats.size() * sizeof(float));
  }
};

void require_device() {
  ASSERT_TRUE(backend_available(Backend::cuda))
      << "the CUDA test suite needs a CUDA device: " << backend_unavailable_reason(Backend::cuda);
}

// Run forward and backward on the device into p's host outputs.
void run_cuda(Problem& p, const DeviceProblem& d, bool with_backward = true) {
  d.poison();
  p.poison_outputs();
  forward(d.forward_params(p), Backend::cuda);
  if (with_backward) backward(d.backward_params(p), Backend::cuda);
  CUDA_OK(cudaDeviceSynchronize());
  d.download_forward(p);
  if (with_backward) d.download_backward(p);
}

struct CheckOptions {
  bool misalign = false;
  bool backward = true;
  bool compare_backward = true;
};

// The whole check for one problem: reference comparison of both ops and a
// second run that must give the same bits.
void check_problem(const ProblemOptions& o, const CheckOptions& c = {}) {
  Problem p = make_problem(o);
  const std::string ctx = std::string("cuda") + (c.misalign ? " misaligned" : "") + " " + describe(o);
  SCOPED_TRACE(ctx);
  const DeviceProblem d(p, c.misalign);
  run_cuda(p, d, c.backward);
  const reference::ForwardResult fref = reference::forward(p.forward_params());
  expect_forward_matches(p, fref, ctx);
  if (c.backward && c.compare_backward) {
    const reference::BackwardResult bref = reference::backward(p.backward_params());
    expect_backward_matches(p, bref, ctx);
  }
  Problem again = p;
  run_cuda(again, d, c.backward);
  expect_forward_bits_equal(p, again, ctx + " (second run)");
  if (c.backward) expect_backward_bits_equal(p, again, ctx + " (second run)");
}

constexpr DType kDTypes[] = {DType::f32, DType::bf16, DType::f16};

// Every shape with C < 3 runs without CONV seeds (the harness's mixed mode
// skips CONV there).
ProblemOptions shape(int64_t rows, int64_t chunk, int32_t seeds, DType dtype, uint64_t rng) {
  ProblemOptions o;
  o.rows = rows;
  o.chunk = chunk;
  o.num_seeds = seeds;
  o.dtype = dtype;
  o.rng_seed = rng;
  return o;
}

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override { require_device(); }
};

// ------------------------------------------------------------- small suite

class SmallCuda : public CudaTest {};

TEST_F(SmallCuda, MixedShapes) {
  uint64_t rng = 100;
  for (DType dt : {DType::f32, DType::bf16}) {
    for (int64_t rows : {0, 7}) {
      for (int64_t chunk : {1, 3, 48, 65}) check_problem(shape(rows, chunk, 3, dt, ++rng));
    }
  }
}

// The rows of dweights and dscales (DESIGN 62, 67): a row of one seed
// written by that seed's last CTA, a row of several by the last of them to
// finish (its row ticket), a row of none zeroed by the last CTA of seed
// b mod S. C = 3, 200 seeds over 5 rows: many seeds to a row; C = 1, 600
// seeds (more than a CTA's threads: the seeds are counted in rounds) over
// 1000 rows: rows of none, one and several seeds; one seed and 70 rows:
// its CTA zeroes the rows in three rounds of 32.
TEST_F(SmallCuda, BlueprintRowsOfOneAndOfManySeeds) {
  ProblemOptions shared = shape(6, 3, 200, DType::bf16, 92);
  shared.num_blueprints = 5;
  check_problem(shared);
  ProblemOptions many_rows = shape(5, 1, 600, DType::f32, 91);
  many_rows.num_blueprints = 1000;
  check_problem(many_rows);
  ProblemOptions one_seed = shape(9, 48, 1, DType::f32, 93);
  one_seed.num_blueprints = 70;
  check_problem(one_seed);
}

TEST_F(SmallCuda, ClampClipMisaligned) {
  ProblemOptions o = shape(9, 48, 3, DType::f16, 7);
  o.clamp = true;
  o.clip = true;
  check_problem(o);
  o.row_pad = 3;
  check_problem(o, {.misalign = true});
}

// Every rows-in-flight variant of both kernels (kasmina::CudaLaunchConfig),
// restored afterwards.
class LaunchConfigGuard {
 public:
  explicit LaunchConfigGuard(const CudaLaunchConfig& c) : saved_(cuda_launch_config()) {
    set_cuda_launch_config(c);
  }
  ~LaunchConfigGuard() { set_cuda_launch_config(saved_); }
  LaunchConfigGuard(const LaunchConfigGuard&) = delete;
  LaunchConfigGuard& operator=(const LaunchConfigGuard&) = delete;

 private:
  CudaLaunchConfig saved_;
};

// The tuned table and the profiling switch, restored however a test ends.
class TunedTableGuard {
 public:
  TunedTableGuard() : saved_(cuda_tuned_table()) { set_cuda_tuned_table({}); }
  ~TunedTableGuard() { set_cuda_tuned_table(saved_); }
  TunedTableGuard(const TunedTableGuard&) = delete;
  TunedTableGuard& operator=(const TunedTableGuard&) = delete;

 private:
  std::vector<CudaTunedEntry> saved_;
};
class ProfilingGuard {
 public:
  ProfilingGuard() : was_on_(profiling()) {
    profile_reset();
    set_profiling(true);
  }
  ~ProfilingGuard() {
    set_profiling(was_on_);
    profile_reset();
  }
  ProfilingGuard(const ProfilingGuard&) = delete;
  ProfilingGuard& operator=(const ProfilingGuard&) = delete;

 private:
  bool was_on_;
};

bool all_bytes(const std::vector<uint8_t>& v, uint8_t byte) {
  for (uint8_t b : v) {
    if (b != byte) return false;
  }
  return true;
}

// The most training seeds that add into one blueprint row.
int32_t largest_row(const Problem& p) {
  std::vector<int32_t> n(static_cast<std::size_t>(p.num_blueprints), 0);
  int32_t most = 0;
  for (std::size_t s = 0; s < p.blueprint.size(); ++s) {
    const int32_t b = p.blueprint[s];
    if (b != 0 && (stage_trains_grafted(p.stage[s]) || stage_trains_shadow(p.stage[s]))) {
      most = std::max(most, ++n[static_cast<std::size_t>(b)]);
    }
  }
  return most;
}

// The backward's shared rows summed from a list of their seeds
// (CudaLaunchConfig::backward_row_list, DESIGN 69): the reference's values
// and the bits of the seed-table scan, the same bits again on a second run,
// the workspace left zero. `listed`: whether the row list is used (at most
// kRowList = 64 seeds a row); `tma`: both runs with the TMA backward.
void check_row_list(const ProblemOptions& o, bool listed, bool tma = false) {
  Problem scan = make_problem(o);
  const std::string ctx = std::string("row list vs scan") + (tma ? " (TMA)" : "") + ", " + describe(o);
  SCOPED_TRACE(ctx);
  if (listed) {
    EXPECT_GT(largest_row(scan), 1) << "no row of several seeds to list";
    EXPECT_LE(largest_row(scan), 64) << "a row too long for the list";
  } else {
    EXPECT_GT(largest_row(scan), 64) << "no row too long for the list";
  }
  Problem with_list = scan;
  const DeviceProblem d(scan, false);
  CudaLaunchConfig c = cuda_launch_config();
  c.backward_tma = tma;
  c.backward_row_list = false;
  {
    const LaunchConfigGuard guard(c);
    EXPECT_EQ(describe_backward(d.backward_params(scan), Backend::cuda).find("backward_row_list"),
              std::string::npos);
    run_cuda(scan, d);
  }
  c.backward_row_list = true;
  const LaunchConfigGuard guard(c);
  const std::string desc = describe_backward(d.backward_params(with_list), Backend::cuda);
  EXPECT_NE(desc.find("summed from a list of them (backward_row_list)"), std::string::npos)
      << desc;
  run_cuda(with_list, d);
  expect_backward_matches(with_list, reference::backward(with_list.backward_params()), ctx);
  expect_backward_bits_equal(scan, with_list, ctx + " (against the scan)");
  std::vector<uint8_t> bw(d.bwd_workspace.bytes());
  d.bwd_workspace.download(bw.data(), bw.size());
  EXPECT_TRUE(all_bytes(bw, 0)) << "backward workspace not zero after the launch";
  Problem again = with_list;
  run_cuda(again, d);
  expect_backward_bits_equal(with_list, again, ctx + " (second run)");
}

TEST_F(SmallCuda, BlueprintRowsFromAList) {
  ProblemOptions shared = shape(6, 3, 200, DType::bf16, 92);
  shared.num_blueprints = 5;
  check_row_list(shared, true);
  ProblemOptions wide = shape(5, 300, 24, DType::f16, 95);  // more columns than threads
  wide.num_blueprints = 3;
  check_row_list(wide, true);
  ProblemOptions many_rows = shape(5, 1, 600, DType::f32, 91);
  many_rows.num_blueprints = 1000;
  check_row_list(many_rows, true);
  // Every seed GRAFTING on one row (unmixed, two blueprint rows): a full
  // list of 64 seeds, the TMA backward's too, then one seed more (scanned).
  ProblemOptions full = shape(40, 64, 64, DType::f32, 96);
  full.mixed = false;
  full.num_blueprints = 2;
  check_row_list(full, true);
  check_row_list(full, true, true);
  full.num_seeds = 65;
  check_row_list(full, false);
  // Rows of hundreds of training seeds: scanned, with the list asked for.
  ProblemOptions crowded = shape(4, 2, 2000, DType::f32, 94);
  crowded.num_blueprints = 3;
  check_row_list(crowded, false);
}

struct ConfigCase {
  int forward_rows, backward_rows;
  CudaForwardVariant variant = CudaForwardVariant::generic;
  int group = 0;  // the forward's lanes per row (0: the default)
  int threads = 0;  // the forward's threads per CTA (0: the default)
};
// The TMA cases run the TMA forward where the device and shape allow it and
// the generic one elsewhere (both checked against the reference). Every
// lanes-per-row value appears with one, two or four rows in flight.
constexpr ConfigCase kConfigs[] = {{1, 1, CudaForwardVariant::generic, 1},
                                   {2, 2, CudaForwardVariant::generic, 2},
                                   {4, 1, CudaForwardVariant::generic, 4},
                                   {4, 2},
                                   {1, 2, CudaForwardVariant::tma},
                                   {1, 1, CudaForwardVariant::tma, 2},
                                   {2, 1, CudaForwardVariant::generic, 8},
                                   {1, 1, CudaForwardVariant::generic, 8, 64},
                                   {2, 2, CudaForwardVariant::tma, 2, 128}};

std::string config_name(const ConfigCase& c) {
  return "rows in flight fwd " + std::to_string(c.forward_rows) + " bwd " +
         std::to_string(c.backward_rows) + " variant " +
         std::string(cuda_forward_variant_name(c.variant)) + " lanes per row " +
         std::to_string(c.group) + " threads " + std::to_string(c.threads);
}

CudaLaunchConfig config_of(const ConfigCase& c) {
  CudaLaunchConfig l;
  l.forward_rows_in_flight = c.forward_rows;
  l.backward_rows_in_flight = c.backward_rows;
  l.forward_variant = c.variant;
  l.forward_group = c.group;
  l.forward_block_threads = c.threads;
  return l;
}

bool device_is_sm90() {
  int device = 0;
  CUDA_OK(cudaGetDevice(&device));
  int major = 0;
  CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major == 9;
}

// The TMA forward at one row in flight (the generic kernel's bits at the
// same lanes per row) with the pipeline depth `stages` asked for.
CudaLaunchConfig tma_config(int stages) {
  CudaLaunchConfig c;
  c.forward_rows_in_flight = 1;
  c.forward_variant = CudaForwardVariant::tma;
  c.forward_stages = stages;
  return c;
}

// The TMA forward of p under launch config c, twice: the description names
// the TMA kernel, the pipeline depth asked for (c.forward_stages, where not
// 0) and `must_name` (where not empty), and the second run gives the first
// run's bits.
void run_tma_twice(Problem& p, const DeviceProblem& d, const CudaLaunchConfig& c,
                   const std::string& must_name, const std::string& ctx) {
  const LaunchConfigGuard guard(c);
  const std::string desc = describe_forward(d.forward_params(p), Backend::cuda);
  ASSERT_EQ(desc.rfind("cuda.forward.tma", 0), 0u) << desc;
  if (!must_name.empty()) {
    ASSERT_NE(desc.find(must_name), std::string::npos) << desc;
  }
  if (c.forward_stages != 0) {
    EXPECT_NE(desc.find(std::to_string(c.forward_stages) + "-stage"), std::string::npos) << desc;
  }
  run_cuda(p, d, false);
  Problem again = p;
  run_cuda(again, d, false);
  expect_forward_bits_equal(p, again, ctx + " (second run)");
}

// The TMA forward (sm_90) against the generic one with 1 row in flight:
// the same bits (same passes, same reduction trees), and the reference. The
// description must name the TMA kernel, so the comparison cannot be two
// runs of the generic one.
void check_tma_matches_generic(const ProblemOptions& o, int stages, bool misalign = false) {
  Problem generic = make_problem(o);
  Problem tma = generic;
  const std::string ctx = "tma vs generic, " + std::to_string(stages) + " stages, " + describe(o);
  SCOPED_TRACE(ctx);
  const DeviceProblem d(generic, misalign);
  CudaLaunchConfig c = tma_config(stages);
  // The TMA plan's lanes per row (a default group widens until its stages
  // fit), which the generic run then takes: the same plan, the same bits.
  int group = 0;
  {
    const LaunchConfigGuard guard(c);
    const std::string desc = describe_forward(d.forward_params(tma), Backend::cuda);
    const std::size_t at = desc.find(" lanes per row");
    ASSERT_NE(at, std::string::npos) << desc;
    const std::size_t from = desc.rfind(' ', at - 1) + 1;
    group = std::stoi(desc.substr(from, at - from));
  }
  c.forward_variant = CudaForwardVariant::generic;
  c.forward_stages = 0;
  c.forward_group = group;
  {
    const LaunchConfigGuard guard(c);
    run_cuda(generic, d, false);
  }
  c.forward_variant = CudaForwardVariant::tma;
  c.forward_stages = stages;
  c.forward_group = 0;
  run_tma_twice(tma, d, c, "", ctx);
  expect_forward_matches(tma, reference::forward(tma.forward_params()), ctx);
  expect_forward_bits_equal(generic, tma, ctx);
}

TEST_F(SmallCuda, EveryLaunchConfig) {
  uint64_t rng = 150;
  for (const ConfigCase& cc : kConfigs) {
    SCOPED_TRACE(config_name(cc));
    const LaunchConfigGuard guard(config_of(cc));
    // 100 rows: above the small-batch cap, so 4 rows in flight really run.
    for (int64_t rows : {1, 37, 100}) {
      ProblemOptions o = shape(rows, 48, 3, cc.forward_rows == 2 ? DType::bf16 : DType::f32, ++rng);
      check_problem(o);
      o.clamp = true;
      o.clip = true;
      o.rng_seed = ++rng;
      check_problem(o);
    }
  }
}

// 16-bit inputs sum the drift's rows in float32 (DESIGN 28); rows whose
// float32 squares underflow, zero rows, rows with NaN and, for bfloat16,
// rows whose squares overflow float32 are summed again in float64. Such rows
// among ordinary ones (so a warp holds both), every kind blending, several
// lanes-per-row values; against the reference and bit for bit across two
// runs. The overflowing rows overflow the float32 telemetry sums as well
// (so does every backend), so for them only the drift column is compared.
TEST_F(SmallCuda, DriftRowsOutsideFloat32Range) {
  uint64_t rng = 800;
  for (DType dt : kDTypes) {
    for (int g : {1, 2, 8}) {
      for (bool overflow : {false, true}) {
        if (overflow && dt != DType::bf16) continue;
        CudaLaunchConfig c;
        c.forward_group = g;
        const LaunchConfigGuard guard(c);
        ProblemOptions o = shape(300, 64, 4, dt, ++rng);
        o.only_stage = static_cast<int32_t>(Stage::grafting);
        Problem p = make_problem(o);
        // bfloat16 has float32's range: 1e-30 squares underflow it, rows of
        // 64 values near 1e18-1e19 overflow its sums; float16's smallest
        // values are denormals whose squares float32 holds.
        const double tiny = dt == DType::f16 ? 1e-7 : 1e-30;
        for (int64_t n = 0; n < p.rows; ++n) {
          for (int64_t j = 0; j < p.hidden; ++j) {
            const int64_t i = n * p.row_stride + j;
            const double v = p.x.get(i);
            if (overflow) {
              // 1e19: |X|^2 itself overflows; 1.5e18: |X|^2 may stay finite
              // while |Y|^2 or X.Y does not.
              if (n % 3 == 1) p.x.set(i, v * 1e19);
              if (n % 3 == 2) p.x.set(i, v * 1.5e18);
              continue;
            }
            switch (n % 5) {
              case 1: p.x.set(i, 0.0); break;
              case 2: p.x.set(i, v * tiny); break;
              case 3: if (j % 17 == 5) p.x.set(i, std::nan("")); break;
              default: break;
            }
          }
        }
        const std::string ctx = std::string("drift rows") + (overflow ? " (overflow)" : "") +
                                ", lanes per row " + std::to_string(g) + ", " + describe(o);
        SCOPED_TRACE(ctx);
        const DeviceProblem d(p, false);
        run_cuda(p, d, false);
        const reference::ForwardResult fref = reference::forward(p.forward_params());
        if (overflow) {
          std::vector<double> out, ref;
          for (int32_t s = 0; s < p.num_seeds; ++s) {
            const auto at = static_cast<std::size_t>(s) * kTelemetryWidth + kTelDrift;
            out.push_back(static_cast<double>(p.telemetry[at]));
            ref.push_back(fref.telemetry[at]);
          }
          EXPECT_LE(rel_error(out, ref), 10.0 * rel_tolerance(dt)) << "telemetry[:, drift], " << ctx;
        } else {
          expect_forward_matches(p, fref, ctx);
        }
        Problem again = p;
        run_cuda(again, d, false);
        expect_forward_bits_equal(p, again, ctx + " (second run)");
      }
    }
  }
}

// 16-bit drift of blends whose T - X is nearly parallel to X: ATTENTION with
// nearly equal weights (p ~ 1/C), CONV near its identity taps, MLP with
// nearly equal weights on positive inputs. There float32 sums of |X|^2,
// X.D and |D|^2 cancel in Lagrange's |X|^2|D|^2 - (X.D)^2 (a drift of ~1e-7
// came out at 100 % error); the kernel sums R = T - k X instead, k the
// kind's slope along X (DESIGN 28). Each seed's drift against the reference
// on its own (the column's norm would hide a small one's error).
TEST_F(SmallCuda, DriftOfNearlyParallelBlends) {
  uint64_t rng = 900;
  for (DType dt : {DType::bf16, DType::f16}) {
    for (Kind kind : {Kind::attention, Kind::conv, Kind::mlp}) {
      // 12288: wider than the coefficient table (the `wide` mode).
      for (int64_t chunk : {64, 1000, 12288}) {
        ProblemOptions o = shape(chunk > 1000 ? 5 : 33, chunk, chunk > 1000 ? 2 : 3, dt, ++rng);
        o.only_kind = static_cast<int32_t>(kind);
        o.only_stage = static_cast<int32_t>(Stage::grafting);
        Problem p = make_problem(o);
        uint64_t h = o.rng_seed;
        auto jitter = [&h] {  // uniform in [-1, 1)
          h = h * 6364136223846793005ull + 1442695040888963407ull;
          return static_cast<float>(static_cast<double>(h >> 11) / 4503599627370496.0 - 1.0);
        };
        for (int32_t b = 0; b < p.num_blueprints; ++b) {
          p.scales[static_cast<std::size_t>(b)] = 1.0f;
          for (int64_t j = 0; j < p.chunk; ++j) {
            float w = 0.0f;
            switch (kind) {
              case Kind::attention: w = 0.5f + 0.03f * jitter(); break;
              case Kind::mlp: w = 1.5f + 1e-3f * jitter(); break;
              default: w = j == 0 ? 1.02f : (j < 3 ? 2e-5f * jitter() : jitter()); break;
            }
            p.weights[static_cast<std::size_t>(b * p.chunk + j)] = w;
          }
        }
        if (kind == Kind::mlp) {
          for (int64_t n = 0; n < p.rows; ++n) {
            for (int64_t j = 0; j < p.hidden; ++j) {
              const int64_t i = n * p.row_stride + j;
              p.x.set(i, std::fabs(p.x.get(i)) + 0.25);
            }
          }
        }
        const std::string ctx = std::string("nearly parallel ") +
                                std::string(kind_name(kind)) + ", " + describe(o);
        SCOPED_TRACE(ctx);
        const DeviceProblem d(p, false);
        run_cuda(p, d, false);
        const reference::ForwardResult fref = reference::forward(p.forward_params());
        expect_forward_matches(p, fref, ctx);
        int blending = 0;
        for (int32_t s = 0; s < p.num_seeds; ++s) {
          const auto at = static_cast<std::size_t>(s) * kTelemetryWidth + kTelDrift;
          const double want = fref.telemetry[at];
          const double got = p.telemetry[at];
          if (want == 0.0) continue;  // a seed that does not blend
          ++blending;
          EXPECT_LE(std::fabs(got - want), 10.0 * rel_tolerance(dt) * std::fabs(want))
              << "seed " << s << " drift " << got << ", reference " << want;
        }
        EXPECT_GT(blending, 0);
      }
    }
  }
}

// The TMA forward's small problems (also under the sanitizers), each with
// the pipeline depth to ask for: tails inside a pass, several passes per
// CTA so the stage ring wraps (64 seeds give few tiles), every dtype,
// clamp, a padded row stride, both pipeline depths' ends, and 16 KiB
// stages (3 would pass the shared-memory budget, so 2 run).
template <typename Check>
void for_each_tma_problem(uint64_t rng, const Check& check) {
  check(shape(1, 64, 3, DType::f32, ++rng), 0);
  check(shape(37, 48, 3, DType::bf16, ++rng), 0);
  ProblemOptions o = shape(100, 64, 5, DType::f16, ++rng);
  o.clamp = true;
  check(o, 0);
  check(shape(3000, 8, 64, DType::f32, ++rng), 2);  // 24 passes over 6 tiles
  check(shape(1500, 16, 64, DType::bf16, ++rng), 8);
  o = shape(77, 64, 2, DType::f32, ++rng);
  o.row_pad = 4;  // a row stride that is not hidden (16-byte multiple)
  check(o, 3);
  check(shape(200, 128, 2, DType::f32, ++rng), 2);
}

TEST_F(SmallCuda, TmaForwardMatchesGeneric) {
  if (!device_is_sm90()) GTEST_SKIP() << "the TMA forward runs on compute capability 9.x only";
  for_each_tma_problem(700, [](const ProblemOptions& o, int stages) {
    check_tma_matches_generic(o, stages);
  });
}

// Bytes of y outside its window (the row padding) still hold the device's
// 0xFF poison: the TMA store writes the box's columns only.
void expect_padding_untouched(const Problem& p, const std::string& ctx) {
  const std::size_t size = dtype_size(p.y.dtype);
  for (int64_t n = 0; n < p.rows; ++n) {
    for (int64_t j = p.hidden; j < p.row_stride; ++j) {
      for (std::size_t b = 0; b < size; ++b) {
        if (p.y.bytes[static_cast<std::size_t>(n * p.row_stride + j) * size + b] != 0xFF) {
          ADD_FAILURE() << "y's row padding written in row " << n << ", " << ctx;
          return;
        }
      }
    }
  }
}

// The TMA forward with y by TMA store (CudaLaunchConfig::forward_tma_store)
// against the plain TMA forward on the same inputs: the same bits of y and
// telemetry (only the path of y to global memory differs), and the
// reference. The descriptions must name the store in one run and not in the
// other, so the comparison cannot be two runs of one kernel.
void check_tma_store_matches_plain(const ProblemOptions& o, int stages) {
  Problem plain = make_problem(o);
  Problem stored = plain;
  const std::string ctx =
      "tma store vs plain tma, " + std::to_string(stages) + " stages, " + describe(o);
  SCOPED_TRACE(ctx);
  const DeviceProblem d(plain, false);
  CudaLaunchConfig c = tma_config(stages);
  c.forward_tma_store = CudaSwitch::off;
  {
    const LaunchConfigGuard guard(c);
    const std::string desc = describe_forward(d.forward_params(plain), Backend::cuda);
    ASSERT_EQ(desc.rfind("cuda.forward.tma", 0), 0u) << desc;
    EXPECT_EQ(desc.find("TMA store"), std::string::npos) << desc;
    run_cuda(plain, d, false);
  }
  c.forward_tma_store = CudaSwitch::on;
  run_tma_twice(stored, d, c, "; y by TMA store (", ctx);
  expect_padding_untouched(stored, ctx);
  expect_forward_matches(stored, reference::forward(stored.forward_params()), ctx);
  expect_forward_bits_equal(plain, stored, ctx);
}

void check_programmatic_chain(DType dt, uint64_t rng, bool variants, bool tma_store = false,
                              bool late_dependents = false);

// The store on TmaForwardMatchesGeneric's problems (also under the
// sanitizers): rows past N clipped by the store, the y ring wrapping, and
// the 16 KiB stages (two x and two y stages: past the 48 KiB without an
// opt-in). Then the store's y read by the next kernels of a stream under
// programmatic dependent launch.
TEST_F(SmallCuda, TmaStoreMatchesPlainTma) {
  if (!device_is_sm90()) GTEST_SKIP() << "the TMA forward runs on compute capability 9.x only";
  for_each_tma_problem(760, [](const ProblemOptions& o, int stages) {
    check_tma_store_matches_plain(o, stages);
  });
  for (const DType dt : {DType::f32, DType::bf16}) check_programmatic_chain(dt, 780, true, true);
}

// Where the TMA forward cannot run, the generic one does and says why.
TEST_F(SmallCuda, TmaForwardRefusalIsNamed) {
  CudaLaunchConfig c;
  c.forward_variant = CudaForwardVariant::tma;
  const LaunchConfigGuard guard(c);
  const ProblemOptions o = shape(7, 65, 3, DType::f32, 720);  // C = 65: no 16-byte vector path
  Problem p = make_problem(o);
  const DeviceProblem d(p, false);
  const std::string desc = describe_forward(d.forward_params(p), Backend::cuda);
  EXPECT_EQ(desc.rfind("cuda.forward.scalar", 0), 0u) << desc;
  EXPECT_NE(desc.find(device_is_sm90() ? "TMA variant needs the 16-byte vector path"
                                       : "TMA variant needs compute capability 9.x"),
            std::string::npos)
      << desc;
  check_problem(o);
  if (device_is_sm90()) {
    // The box's row coordinate is 32-bit: 2^31 rows take the generic kernel
    // (described only: a shape, no buffers).
    ForwardParams big;
    big.rows = int64_t{1} << 31;
    big.hidden = 64;
    big.num_seeds = 1;
    big.dtype = DType::f32;
    const std::string text = describe_forward(big, Backend::cuda);
    EXPECT_NE(text.find("TMA variant needs N < 2^31"), std::string::npos) << text;
  }
}

// The selection order of rows in flight: an explicit launch config, else the
// tuned entry of (device, element size, shape class), else the default; the
// description names the source, and a tuned run matches the reference.
TEST_F(SmallCuda, TunedEntryIsSelectedAndNamed) {
  const TunedTableGuard table_guard;
  const LaunchConfigGuard guard({0, 0});
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  // 100 rows: more than a pass of the default lanes per row holds, so the
  // plan keeps 2 rows in flight.
  const ProblemOptions o = shape(100, 48, 3, DType::f32, 181);
  Problem p = make_problem(o);
  const DeviceProblem d(p, false);
  EXPECT_NE(describe_forward(d.forward_params(p), Backend::cuda).find("(default)"), std::string::npos);
  CudaTunedEntry e;
  e.device = prop.name;
  e.elem_bytes = 4;
  e.shape = shape_class(o.rows, o.chunk * o.num_seeds, 4);
  e.forward_rows_in_flight = 2;
  e.backward_rows_in_flight = 1;
  e.forward_group = 8;
  e.forward_block_threads = 128;
  set_cuda_tuned_table({e});
  const std::string fwd = describe_forward(d.forward_params(p), Backend::cuda);
  EXPECT_NE(fwd.find("2 rows in flight per thread (tuned)"), std::string::npos) << fwd;
  EXPECT_NE(fwd.find("8 lanes per row (tuned)"), std::string::npos) << fwd;
  EXPECT_NE(fwd.find("CTAs of 128 threads (tuned)"), std::string::npos) << fwd;
  const std::string bwd = describe_backward(d.backward_params(p), Backend::cuda);
  EXPECT_NE(bwd.find("1 rows in flight per thread (tuned)"), std::string::npos) << bwd;
  check_problem(o);
  set_cuda_launch_config({1, 0});
  const std::string set = describe_forward(d.forward_params(p), Backend::cuda);
  EXPECT_NE(set.find("1 rows in flight per thread (set)"), std::string::npos) << set;
}

// The streaming entry point: several problems (shapes differ, one dtype) in
// one launch give each problem the bits of its own plain launch (same rows in
// flight) and match the reference; a mixed dtype is refused before anything
// runs.
void check_forward_many(DType dt, uint64_t rng) {
  const LaunchConfigGuard guard({1, 0});  // one rows-in-flight setting for both ways
  const ProblemOptions shapes[] = {shape(16, 64, 64, dt, rng), shape(37, 48, 3, dt, rng + 1),
                                   shape(300, 64, 5, dt, rng + 2), shape(1, 48, 16, dt, rng + 3),
                                   shape(0, 64, 2, dt, rng + 4)};
  std::vector<Problem> many, plain;
  std::vector<std::unique_ptr<DeviceProblem>> dev;
  for (const ProblemOptions& o : shapes) {
    many.push_back(make_problem(o));
    plain.push_back(many.back());
  }
  for (Problem& p : many) dev.push_back(std::make_unique<DeviceProblem>(p, false));
  std::vector<ForwardParams> params;
  for (std::size_t i = 0; i < many.size(); ++i) {
    dev[i]->poison();
    many[i].poison_outputs();
    params.push_back(dev[i]->forward_params(many[i]));
  }
  forward_many(params.data(), static_cast<int>(params.size()), Backend::cuda);
  CUDA_OK(cudaDeviceSynchronize());
  for (std::size_t i = 0; i < many.size(); ++i) dev[i]->download_forward(many[i]);
  for (std::size_t i = 0; i < plain.size(); ++i) {
    const std::string ctx = "forward_many problem " + std::to_string(i) + " " + describe(shapes[i]);
    SCOPED_TRACE(ctx);
    expect_forward_matches(many[i], reference::forward(many[i].forward_params()), ctx);
    dev[i]->poison();
    plain[i].poison_outputs();
    forward(dev[i]->forward_params(plain[i]), Backend::cuda);
    CUDA_OK(cudaDeviceSynchronize());
    dev[i]->download_forward(plain[i]);
    expect_forward_bits_equal(plain[i], many[i], ctx + " vs a plain launch");
  }
}

TEST_F(SmallCuda, ForwardManyMatchesPlainLaunches) {
  check_forward_many(DType::f32, 190);
  check_forward_many(DType::bf16, 290);
}

// -------------------------------------------------------------- full suite

class CudaBackend : public CudaTest {};

TEST_F(CudaBackend, Sweep) {
  uint64_t rng = 1000;
  for (DType dt : kDTypes) {
    for (int32_t seeds : {1, 3, 16}) {
      for (int64_t chunk : {1, 3, 4, 48, 65, 1000}) {
        for (int64_t rows : {0, 1, 7, 1000}) check_problem(shape(rows, chunk, seeds, dt, ++rng));
      }
    }
  }
}

// The TMA forward at a size where each CTA's ring wraps several times (64
// seeds: 6 tiles on 132 SMs, ~10 passes each), default depth.
TEST_F(CudaBackend, TmaForwardLarge) {
  if (!device_is_sm90()) GTEST_SKIP() << "the TMA forward runs on compute capability 9.x only";
  uint64_t rng = 7500;
  for (DType dt : kDTypes) check_tma_matches_generic(shape(2000, 64, 64, dt, ++rng), 0);
  check_tma_matches_generic(shape(2000, 256, 8, DType::bf16, ++rng), 0);
}

// Wide float32 chunks (C = 192 and 256: boxes of 24 and 32 KiB at 8 lanes
// per row, two of which pass the 46 KiB every architecture gives) take the
// shared-memory opt-in for their x stages instead of the generic kernel:
// the description says so, and the bits are the generic kernel's with the
// same plan (check_tma_matches_generic), within SPEC of the reference. The
// store's y stages do not fit beside them, so it is refused and says why.
TEST_F(SmallCuda, TmaForwardWideChunksOptIn) {
  if (!device_is_sm90()) GTEST_SKIP() << "the TMA forward runs on compute capability 9.x only";
  uint64_t rng = 7550;
  for (const int64_t C : {192, 256}) {
    const ProblemOptions o = shape(300, C, 8, DType::f32, ++rng);  // 10 passes, the last one partial
    Problem p = make_problem(o);
    const DeviceProblem d(p, false);
    for (const CudaSwitch store : {CudaSwitch::off, CudaSwitch::on}) {
      CudaLaunchConfig c = tma_config(0);
      c.forward_tma_store = store;
      const LaunchConfigGuard guard(c);
      const std::string desc = describe_forward(d.forward_params(p), Backend::cuda);
      EXPECT_EQ(desc.rfind("cuda.forward.tma", 0), 0u) << desc;
      EXPECT_NE(desc.find("8 lanes per row"), std::string::npos) << desc;
      EXPECT_NE(desc.find("2-stage shared-memory ring (mbarrier pipeline, in the shared-memory opt-in)"),
                std::string::npos)
          << desc;
      if (store == CudaSwitch::on) {
        EXPECT_NE(desc.find("forward_tma_store refused"), std::string::npos) << desc;
      }
    }
    check_tma_matches_generic(o, 0);
  }
}

// Chunks over 256 columns: the TMA forward reads each chunk row as column
// blocks through a 3-D tensor map (bfloat16 C = 512: two blocks of 256;
// float16 C = 384: two of 192), in the shared-memory opt-in: the generic
// kernel's bits at the same plan and the reference; the store is refused
// (one box per row). Float32 C = 320 (two blocks of 160: 40 KiB boxes)
// would hold fewer CTAs per SM than the generic kernel, which runs and
// says why.
TEST_F(SmallCuda, TmaForwardColumnBlocks) {
  if (!device_is_sm90()) GTEST_SKIP() << "the TMA forward runs on compute capability 9.x only";
  uint64_t rng = 7570;
  const std::pair<int64_t, DType> cases[] = {{512, DType::bf16}, {384, DType::f16}};
  for (const auto& [C, dt] : cases) {
    const ProblemOptions o = shape(300, C, 4, dt, ++rng);  // 32-row passes, the last one partial
    Problem p = make_problem(o);
    const DeviceProblem d(p, false);
    CudaLaunchConfig c = tma_config(0);
    c.forward_tma_store = CudaSwitch::on;
    {
      const LaunchConfigGuard guard(c);
      const std::string desc = describe_forward(d.forward_params(p), Backend::cuda);
      EXPECT_EQ(desc.rfind("cuda.forward.tma", 0), 0u) << desc;
      EXPECT_NE(desc.find("32 x " + std::to_string(C) + " (2 column blocks, a 3-D tensor map)"),
                std::string::npos)
          << desc;
      EXPECT_NE(desc.find("in the shared-memory opt-in"), std::string::npos) << desc;
      EXPECT_NE(desc.find("TMA store needs C <= 256"), std::string::npos) << desc;
    }
    check_tma_matches_generic(o, 0);
  }
  const ProblemOptions o = shape(300, 320, 2, DType::f32, ++rng);
  Problem p = make_problem(o);
  const DeviceProblem d(p, false);
  const LaunchConfigGuard guard(tma_config(0));
  const std::string desc = describe_forward(d.forward_params(p), Backend::cuda);
  EXPECT_EQ(desc.rfind("cuda.forward.vec", 0), 0u) << desc;
  EXPECT_NE(desc.find("would hold fewer CTAs per SM than the generic kernel"), std::string::npos)
      << desc;
  check_problem(o);
}

// Chunks whose rows at 8 lanes per row make boxes too tall for two stages
// in the shared-memory opt-in (float32 C = 512 and 1024, bfloat16 C =
// 1024): the TMA plan's default group widens to 16 or 32 lanes (boxes of 16
// or 8 rows, column blocks of a 3-D tensor map), in the opt-in, by default
// too. Those groups run only in the TMA kernel's wide instances (the
// generic kernel takes at most 8 lanes), so the check is the reference and
// the same bits twice; every seed blends (GRAFTING, the four kinds), so
// the drift's row sums cross the whole group, and the bfloat16 case has
// non-finite and denormal inputs too (its float64 redo of such rows
// crosses the group as well). Where the finish refuses such a plan (float32 C =
// 1024 at 128 threads per CTA: 16 lanes, 8-row boxes, whose 68 KiB would
// hold fewer CTAs per SM than the generic kernel), the generic kernel runs
// with its own plan of 8 lanes and says why.
TEST_F(SmallCuda, TmaForwardWideGroups) {
  if (!device_is_sm90()) GTEST_SKIP() << "the TMA forward runs on compute capability 9.x only";
  uint64_t rng = 7590;
  const struct {
    int64_t C;
    DType dt;
    const char* lanes;
  } cases[] = {{512, DType::f32, "16 lanes per row (default)"},
               {1024, DType::f32, "32 lanes per row (default)"},
               {1024, DType::bf16, "16 lanes per row (default)"}};
  for (const auto& c : cases) {
    ProblemOptions o = shape(300, c.C, 4, c.dt, ++rng);  // the last pass partial
    o.only_stage = static_cast<int32_t>(Stage::grafting);
    if (c.dt == DType::bf16) o.special_fraction = 0.01;
    const std::string ctx = "wide groups, " + describe(o);
    SCOPED_TRACE(ctx);
    Problem p = make_problem(o);
    const DeviceProblem d(p, false);
    for (const bool set : {false, true}) {
      const LaunchConfigGuard guard(set ? tma_config(0) : CudaLaunchConfig{});
      const std::string desc = describe_forward(d.forward_params(p), Backend::cuda);
      EXPECT_EQ(desc.rfind("cuda.forward.tma", 0), 0u) << desc;
      EXPECT_NE(desc.find(c.lanes), std::string::npos) << desc;
      EXPECT_NE(desc.find("in the shared-memory opt-in"), std::string::npos) << desc;
    }
    run_tma_twice(p, d, tma_config(0), c.lanes, ctx);
    expect_forward_matches(p, reference::forward(p.forward_params()), ctx);
  }
  const ProblemOptions o = shape(300, 1024, 2, DType::f32, ++rng);
  Problem p = make_problem(o);
  const DeviceProblem d(p, false);
  CudaLaunchConfig c = tma_config(0);
  c.forward_block_threads = 128;
  const LaunchConfigGuard guard(c);
  const std::string desc = describe_forward(d.forward_params(p), Backend::cuda);
  EXPECT_EQ(desc.rfind("cuda.forward.vec", 0), 0u) << desc;
  EXPECT_NE(desc.find("8 lanes per row (default)"), std::string::npos) << desc;
  EXPECT_NE(desc.find("would hold fewer CTAs per SM than the generic kernel"), std::string::npos)
      << desc;
  check_problem(o);
}

// Wide rows (512 bytes or more of a seed's chunk; tuning.hpp's
// kWideRowVectors) on the generic kernel: its default plan takes 8 lanes
// per row and as many rows in flight as the kernel takes (4 for float32, 2
// for bfloat16) while the passes over the seeds give every SM one; the
// result matches the reference. (On sm_90 the TMA kernel takes these
// chunks by default, TmaForwardWideGroups; here the generic one is set.)
TEST_F(CudaBackend, WideRowsDefaultPlan) {
  uint64_t rng = 7580;
  CudaLaunchConfig generic;
  generic.forward_variant = CudaForwardVariant::generic;
  const LaunchConfigGuard guard(generic);
  for (const DType dt : {DType::f32, DType::bf16}) {
    // 4096 rows of chunks of 512 float32 (8 seeds) or 1024 bfloat16 (4
    // seeds: 2 KiB rows, whose TMA boxes would not fit): 32 passes of 128
    // rows a seed, or 64 of 64.
    const ProblemOptions o =
        dt == DType::f32 ? shape(4096, 512, 8, dt, ++rng) : shape(4096, 1024, 4, dt, ++rng);
    Problem p = make_problem(o);
    const DeviceProblem d(p, false);
    const std::string desc = describe_forward(d.forward_params(p), Backend::cuda);
    EXPECT_NE(desc.find(dt == DType::f32
                            ? "8 lanes per row (default), 4 rows in flight per thread (default for wide rows)"
                            : "8 lanes per row (default), 2 rows in flight per thread (default for wide rows)"),
              std::string::npos)
        << desc;
    check_problem(o);
  }
}

// The TMA store where each CTA's y ring wraps several times, and with the
// 16 KiB boxes of a 256-wide bfloat16 chunk (two x and two y stages: 64 KiB).
TEST_F(CudaBackend, TmaStoreLarge) {
  if (!device_is_sm90()) GTEST_SKIP() << "the TMA forward runs on compute capability 9.x only";
  uint64_t rng = 7600;
  for (DType dt : kDTypes) check_tma_store_matches_plain(shape(2000, 64, 64, dt, ++rng), 0);
  check_tma_store_matches_plain(shape(2000, 256, 8, DType::bf16, ++rng), 0);
}

// The store's default (CudaLaunchConfig::forward_tma_store automatic): on
// sm_90 the TMA forward of float32 inputs of the medium and large shape
// classes stores y by TMA with its dependents launched at the CTAs' exit
// (tuning.hpp), the medium one's 12 KiB boxes in three x stages; 2-byte
// types and the small class do not; off and on override it. The default run
// matches the reference and gives the bits of the store switched off.
TEST_F(CudaBackend, TmaStoreDefaultByShapeClass) {
  if (!device_is_sm90()) GTEST_SKIP() << "the TMA forward runs on compute capability 9.x only";
  uint64_t rng = 7700;
  // 16384 x 1024 float32 (64 MiB, the large class: two x stages of 16 KiB)
  // and 8192 x 768 (24 MiB, the medium class: three of 12 KiB).
  const struct {
    ProblemOptions o;
    const char* stages;
  } storing[] = {{shape(16384, 64, 16, DType::f32, ++rng), "into a 2-stage"},
                 {shape(8192, 48, 16, DType::f32, ++rng), "into a 3-stage"}};
  for (const auto& c : storing) {
    const ProblemOptions& o = c.o;
    Problem auto_run = make_problem(o);
    Problem off_run = auto_run;
    const std::string ctx = "store default, " + describe(o);
    SCOPED_TRACE(ctx);
    const DeviceProblem d(auto_run, false);
    {
      const LaunchConfigGuard guard(CudaLaunchConfig{});
      const std::string desc = describe_forward(d.forward_params(auto_run), Backend::cuda);
      ASSERT_EQ(desc.rfind("cuda.forward.tma", 0), 0u) << desc;
      EXPECT_NE(desc.find("; y by TMA store (default"), std::string::npos) << desc;
      EXPECT_NE(desc.find(c.stages), std::string::npos) << desc;
      EXPECT_NE(desc.find("; dependents launched at the CTAs' exit (with the store)"),
                std::string::npos)
          << desc;
      run_cuda(auto_run, d, false);
    }
    CudaLaunchConfig off;
    off.forward_tma_store = CudaSwitch::off;
    run_tma_twice(off_run, d, off, "", ctx);
    {
      const LaunchConfigGuard guard(off);
      const std::string desc = describe_forward(d.forward_params(off_run), Backend::cuda);
      EXPECT_EQ(desc.find("TMA store"), std::string::npos) << desc;
      EXPECT_EQ(desc.find("CTAs' exit"), std::string::npos) << desc;
      EXPECT_NE(desc.find("into a 2-stage"), std::string::npos) << desc;
    }
    expect_forward_matches(auto_run, reference::forward(auto_run.forward_params()), ctx);
    expect_forward_bits_equal(auto_run, off_run, ctx);
  }
  // No store by default for bfloat16 of the large and medium classes or
  // for the small class; on where set.
  const ProblemOptions others[] = {shape(32768, 64, 16, DType::bf16, ++rng),
                                   shape(8192, 48, 16, DType::bf16, ++rng),
                                   shape(16, 64, 16, DType::f32, ++rng)};
  for (const ProblemOptions& q : others) {
    Problem p = make_problem(q);
    const DeviceProblem dq(p, false);
    CudaLaunchConfig tma;
    tma.forward_variant = CudaForwardVariant::tma;
    {
      const LaunchConfigGuard guard(tma);
      const std::string desc = describe_forward(dq.forward_params(p), Backend::cuda);
      ASSERT_EQ(desc.rfind("cuda.forward.tma", 0), 0u) << describe(q) << ": " << desc;
      EXPECT_EQ(desc.find("TMA store"), std::string::npos) << describe(q) << ": " << desc;
    }
    tma.forward_tma_store = CudaSwitch::on;
    {
      const LaunchConfigGuard guard(tma);
      const std::string desc = describe_forward(dq.forward_params(p), Backend::cuda);
      EXPECT_NE(desc.find("; y by TMA store (set"), std::string::npos) << describe(q) << ": " << desc;
    }
  }
}

TEST_F(CudaBackend, EveryKindAlone) {
  uint64_t rng = 2000;
  for (DType dt : kDTypes) {
    for (int32_t kind = 0; kind < kNumKinds; ++kind) {
      for (int64_t chunk : {3, 48, 65}) {
        ProblemOptions o = shape(257, chunk, 4, dt, ++rng);
        o.only_kind = kind;
        check_problem(o);
        // Every stage with this kind: blending, shadow and copy seeds alike.
        for (int32_t stage = 0; stage < kNumStages; ++stage) {
          o.only_stage = stage;
          o.rng_seed = ++rng;
          check_problem(o);
        }
      }
    }
  }
}

TEST_F(CudaBackend, ClampAndClip) {
  uint64_t rng = 3000;
  for (DType dt : kDTypes) {
    for (int64_t chunk : {3, 48, 65, 1000}) {
      for (int mode = 0; mode < 3; ++mode) {
        ProblemOptions o = shape(300, chunk, 3, dt, ++rng);
        o.clamp = mode != 1;
        o.clip = mode != 0;
        check_problem(o);
      }
    }
  }
}

TEST_F(CudaBackend, PaddedStrideAndMisalignedBase) {
  uint64_t rng = 4000;
  for (DType dt : kDTypes) {
    for (int64_t chunk : {4, 48, 1000}) {
      for (int64_t pad : {8, 3}) {  // 8: vector path stays possible; 3: scalar path
        ProblemOptions o = shape(100, chunk, 3, dt, ++rng);
        o.row_pad = pad;
        check_problem(o);
      }
      check_problem(shape(100, chunk, 3, dt, ++rng), {.misalign = true});
    }
  }
}

TEST_F(CudaBackend, NonFiniteAndDenormalInputs) {
  uint64_t rng = 5000;
  for (DType dt : kDTypes) {
    for (int64_t chunk : {3, 48, 65}) {
      ProblemOptions o = shape(200, chunk, 3, dt, ++rng);
      o.special_fraction = 0.05;
      // Gradients of NaN inputs are NaN in the reference as well; the
      // telemetry is what this test is about. Backward still must run and be
      // deterministic.
      check_problem(o, {.compare_backward = false});
    }
  }
}

// Data with a large mean next to its spread (1e3 + N(0, ~1)): the
// forward's shifted sums (DESIGN 30) must keep the variance accurate, which
// the whole-row telemetry check would not see next to the mean, so the
// variance and mean columns are checked on their own. (Only these: the
// drift of such nearly parallel rows is dominated by Y's float32 rounding.)
TEST_F(CudaBackend, LargeMeanVariance) {
  uint64_t rng = 5500;
  for (DType dt : {DType::f32, DType::f16}) {
    for (int64_t chunk : {3, 64}) {
      Problem p = make_problem(shape(3000, chunk, 4, dt, ++rng));
      for (int64_t i = 0; i < p.x.numel; ++i) {
        const double v = p.x.get(i);
        if (std::isfinite(v)) p.x.set(i, 1000.0 + 0.5 * v);
      }
      const std::string ctx = "cuda large mean " + describe(p.options);
      SCOPED_TRACE(ctx);
      const DeviceProblem d(p, false);
      run_cuda(p, d, false);
      const reference::ForwardResult fref = reference::forward(p.forward_params());
      for (int32_t col : {kTelVariance, kTelMean}) {
        std::vector<double> out, ref;
        for (int32_t s = 0; s < p.num_seeds; ++s) {
          const auto at =
              static_cast<std::size_t>(s) * kTelemetryWidth + static_cast<std::size_t>(col);
          out.push_back(static_cast<double>(p.telemetry[at]));
          ref.push_back(fref.telemetry[at]);
        }
        EXPECT_LE(rel_error(out, ref), col == kTelVariance ? 1e-4 : 1e-5)
            << "telemetry[:, " << (col == kTelVariance ? "variance" : "mean") << "], " << ctx;
      }
    }
  }
}

TEST_F(CudaBackend, BenchmarkShapes) {
  struct Shape {
    int64_t rows, hidden;
    int32_t seeds;
  };
  uint64_t rng = 6000;
  for (const Shape& s : {Shape{16384, 4096, 64}, Shape{8192, 768, 16}, Shape{16, 4096, 64}}) {
    check_problem(shape(s.rows, s.hidden / s.seeds, s.seeds, DType::f32, ++rng));
  }
}

TEST_F(CudaBackend, EveryLaunchConfig) {
  uint64_t rng = 6500;
  for (const ConfigCase& cc : kConfigs) {
    SCOPED_TRACE(config_name(cc));
    const LaunchConfigGuard guard(config_of(cc));
    for (DType dt : kDTypes) {
      for (int64_t chunk : {4, 48, 64, 65, 1000}) {
        // Rows that end inside a pass, in every rows-in-flight slot. At most
        // ~5e4 values a seed: dalpha sums N*C terms of both signs, and past
        // ~1.5e5 float32 terms its error on random data reached SPEC's 1e-5
        // on both fast backends (docs/PERFORMANCE.md, known limits).
        for (int64_t rows : {1, 7, 257, 1000, 3001}) {
          if (rows * chunk > 64000) continue;
          check_problem(shape(rows, chunk, 5, dt, ++rng));
        }
        ProblemOptions o = shape(515, chunk, 3, dt, ++rng);
        o.clamp = true;
        o.clip = true;
        check_problem(o);
        o.row_pad = 8;
        o.rng_seed = ++rng;
        check_problem(o, {.misalign = true});
      }
    }
    check_problem(shape(2048, 64, 64, DType::f32, ++rng));
    check_problem(shape(16, 64, 64, DType::bf16, ++rng));
  }
}

template <typename T>
bool all_bytes(const std::vector<T>& v, uint8_t byte) {
  std::vector<uint8_t> raw(v.size() * sizeof(T));
  if (!raw.empty()) std::memcpy(raw.data(), v.data(), raw.size());
  return all_bytes(raw, byte);
}

// Gradients with a large mean next to their spread (1e3 + N(0, ~1)): the
// backward's shifted sums (DESIGN 31) must keep dX's variance accurate; the
// grad_stats check as a whole would not see it next to the l2 norm.
TEST_F(CudaBackend, LargeMeanGradVariance) {
  uint64_t rng = 5600;
  for (DType dt : {DType::f32, DType::f16}) {
    for (int64_t chunk : {3, 64}) {
      Problem p = make_problem(shape(3000, chunk, 4, dt, ++rng));
      for (int64_t i = 0; i < p.dy.numel; ++i) {
        const double v = p.dy.get(i);
        if (std::isfinite(v)) p.dy.set(i, 1000.0 + 0.5 * v);
      }
      const std::string ctx = "cuda large mean dy " + describe(p.options);
      SCOPED_TRACE(ctx);
      const DeviceProblem d(p, false);
      run_cuda(p, d);
      const reference::BackwardResult bref = reference::backward(p.backward_params());
      std::vector<double> out, ref;
      for (int32_t s = 0; s < p.num_seeds; ++s) {
        const auto at =
            static_cast<std::size_t>(s) * kGradStatsWidth + static_cast<std::size_t>(kGradVariance);
        out.push_back(static_cast<double>(p.grad_stats[at]));
        ref.push_back(bref.grad_stats[at]);
      }
      EXPECT_LE(rel_error(out, ref), 1e-4) << "grad_stats[:, variance], " << ctx;
    }
  }
}

// The backward's `wide` loop (RESIDUAL/ATTENTION/MLP without the coefficient
// table: at C = 2048 float32 the column sums leave no room for it) for every
// kind and stage mix, with clamp and clip on and off (DESIGN 31).
TEST_F(CudaBackend, WideBackwardEveryKind) {
  uint64_t rng = 7500;
  for (int32_t kind = 0; kind < kNumKinds; ++kind) {
    for (int mode = 0; mode < 3; ++mode) {
      ProblemOptions o = shape(40, 2048, 3, DType::f32, ++rng);
      o.only_kind = kind;
      o.clamp = mode != 1;
      o.clip = mode != 0;
      check_problem(o);
    }
  }
}

// Wide chunks: the forward's coefficient table stops at 46 KiB (C > 11776
// computes coefficients per element), the backward drops its table first
// (C = 8192: the column sums alone fill the shared memory) and refuses
// C > 11776 with an Error, writing nothing (DESIGN 27).
TEST_F(CudaBackend, WideChunks) {
  uint64_t rng = 7000;
  for (int64_t chunk : {8192, 11776}) check_problem(shape(5, chunk, 2, DType::f32, ++rng));
  check_problem(shape(5, 11776, 2, DType::bf16, ++rng));

  ProblemOptions o = shape(5, 11777, 2, DType::f32, ++rng);
  check_problem(o, {.backward = false});
  Problem p = make_problem(o);
  const DeviceProblem d(p, false);
  d.poison();
  EXPECT_THROW(backward(d.backward_params(p), Backend::cuda), Error);
  CUDA_OK(cudaDeviceSynchronize());
  d.download_backward(p);
  EXPECT_TRUE(all_bytes(p.dx.bytes, 0xFF)) << "dx was written by a refused backward";
}

// Capture forward + backward on a non-default stream into a CUDA graph,
// replay it twice: both replays give the eager bits.
void graph_replay(const ProblemOptions& o) {
  Problem eager = make_problem(o);
  const DeviceProblem d(eager, false);
  run_cuda(eager, d);

  cudaStream_t stream = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  Problem replay = eager;
  const ForwardParams fp = d.forward_params(replay, stream);
  const BackwardParams bp = d.backward_params(replay, stream);
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  try {
    forward(fp, Backend::cuda);
    backward(bp, Backend::cuda);
  } catch (...) {
    (void)cudaStreamEndCapture(stream, &graph);
    throw;
  }
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  for (int round = 0; round < 2; ++round) {
    d.poison();
    replay.poison_outputs();
    CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    d.download_forward(replay);
    d.download_backward(replay);
    const std::string ctx = "graph replay " + std::to_string(round) + " " + describe(o);
    expect_forward_bits_equal(eager, replay, ctx);
    expect_backward_bits_equal(eager, replay, ctx);
  }
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));
  CUDA_OK(cudaStreamDestroy(stream));
}

TEST_F(SmallCuda, GraphReplay) { graph_replay(shape(33, 48, 3, DType::bf16, 77)); }

// kasmina::cuda_stream_capturing (what the Python layer asks before skipping
// a host-side fill) follows a capture's begin and end, per stream.
TEST_F(SmallCuda, StreamCapturing) {
  cudaStream_t stream = nullptr, other = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA_OK(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking));
  EXPECT_FALSE(cuda_stream_capturing(stream));
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  const bool during = cuda_stream_capturing(stream);
  const bool other_during = cuda_stream_capturing(other);
  cudaGraph_t graph = nullptr;
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  EXPECT_TRUE(during);
  EXPECT_FALSE(other_during);
  EXPECT_FALSE(cuda_stream_capturing(stream));
  CUDA_OK(cudaGraphDestroy(graph));
  CUDA_OK(cudaStreamDestroy(other));
  CUDA_OK(cudaStreamDestroy(stream));
}

// The profiler on CUDA: every eager call timed with events on its stream and
// charged to its variant with its bytes; calls inside a graph capture are
// not timed, and the capture still replays bit-identically.
TEST_F(SmallCuda, ProfilerTimesKernelsAndSkipsCaptures) {
  const ProfilingGuard profiling_on;
  const LaunchConfigGuard config({0, 0});
  const ProblemOptions o = shape(33, 48, 3, DType::f32, 79);
  {
    Problem p = make_problem(o);
    const DeviceProblem d(p, false);
    run_cuda(p, d);
    run_cuda(p, d);
    // Fails inside the backend, after the profiler's scope opened: not charged.
    ForwardParams small = d.forward_params(p);
    small.workspace_bytes = 1;
    EXPECT_THROW(forward(small, Backend::cuda), Error);
  }
  graph_replay(o);  // one more eager forward + backward, then a capture
  const std::vector<ProfileEntry> r = profile_report();
  int64_t fwd = 0, bwd = 0;
  const double elems = 33.0 * 48.0 * 3.0;
  for (const ProfileEntry& e : r) {
    SCOPED_TRACE(format_profile(r));
    EXPECT_NE(e.kernel.find("rows in flight"), std::string::npos) << e.kernel;
    EXPECT_GT(e.total_us, 0.0) << e.kernel;
    if (e.kernel.rfind("cuda.forward.vec4 float32", 0) == 0) {
      fwd += e.calls;
      EXPECT_DOUBLE_EQ(e.bytes, static_cast<double>(e.calls) * elems * 4 * 2);
    } else if (e.kernel.rfind("cuda.backward.vec4 float32", 0) == 0) {
      bwd += e.calls;
      EXPECT_DOUBLE_EQ(e.bytes, static_cast<double>(e.calls) * elems * 4 * 3);
    } else {
      ADD_FAILURE() << "unexpected kernel " << e.kernel;
    }
  }
  EXPECT_EQ(fwd, 3);
  EXPECT_EQ(bwd, 3);
}

TEST_F(CudaBackend, GraphReplayLarge) {
  ProblemOptions o = shape(4000, 64, 16, DType::f32, 78);
  o.clamp = true;
  o.clip = true;
  graph_replay(o);
}

// The flat telemetry reduction (CudaLaunchConfig::forward_flat_reduction,
// issue 7's baseline for the hierarchical one): against the reference, bit
// for bit across two runs, the workspace left zero, on the generic and (on
// sm_90) the TMA kernel, one tile and many; the description names it; a
// workspace sized for the hierarchical reduction is refused, nothing written.
TEST_F(SmallCuda, FlatReductionMatchesReference) {
  uint64_t rng = 500;
  for (CudaForwardVariant v : {CudaForwardVariant::generic, CudaForwardVariant::tma}) {
    CudaLaunchConfig c;
    c.forward_variant = v;
    c.forward_flat_reduction = true;
    SCOPED_TRACE(std::string("flat reduction, variant ") + std::string(cuda_forward_variant_name(v)));
    for (DType dt : {DType::f32, DType::bf16}) {
      for (int64_t rows : {1, 37, 3000}) {
        ProblemOptions o = shape(rows, rows == 37 ? 65 : 48, 3, dt, ++rng);
        o.clamp = rows == 37;
        const LaunchConfigGuard guard(c);
        check_problem(o, {false, false, false});
        Problem p = make_problem(o);
        const DeviceProblem d(p, false);
        const std::string desc = describe_forward(d.forward_params(p), Backend::cuda);
        EXPECT_NE(desc.find("reduced flat"), std::string::npos) << desc;
        run_cuda(p, d, false);
        std::vector<uint8_t> fw(d.fwd_workspace.bytes());
        d.fwd_workspace.download(fw.data(), fw.size());
        EXPECT_TRUE(all_bytes(fw, 0)) << "flat: forward workspace not zero, " << describe(o);
      }
    }
  }
  Problem p = make_problem(shape(300, 48, 3, DType::f32, 599));
  const DeviceProblem d(p, false);  // sized for the hierarchical reduction
  CudaLaunchConfig c;
  c.forward_flat_reduction = true;
  const LaunchConfigGuard guard(c);
  d.poison();
  try {
    forward(d.forward_params(p), Backend::cuda);
    ADD_FAILURE() << "a workspace too small for the flat reduction was taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("forward_flat_reduction"), std::string::npos) << e.what();
  }
  CUDA_OK(cudaDeviceSynchronize());
  d.download_forward(p);
  EXPECT_TRUE(all_bytes(p.y.bytes, 0xFF)) << "y was written";
  EXPECT_TRUE(all_bytes(p.telemetry, 0xFF)) << "telemetry was written";
}

// The backward's CONV halo through shared memory (CudaLaunchConfig::
// backward_conv_halo, issue 7): against the reference, bit for bit across
// two runs, and bit for bit against the L1 path at one row in flight where
// both plans run the same rows per pass and CTAs (the halo's shared rows can
// leave a wide chunk fewer row groups); the description names the halo.
// "R rows per pass, T tiles x S seeds = K CTAs of N" of a description.
std::string plan_shape(const std::string& desc) {
  const std::size_t at = desc.find(" rows per pass");
  if (at == std::string::npos) return desc;
  const std::size_t from = desc.rfind(", ", at) + 2;
  return desc.substr(from, desc.find(" threads", at) - from);
}

void check_conv_halo(const ProblemOptions& o, bool misalign) {
  Problem l1 = make_problem(o);
  Problem halo = l1;
  const std::string ctx = std::string("conv halo") + (misalign ? " misaligned " : " ") + describe(o);
  SCOPED_TRACE(ctx);
  const DeviceProblem d(l1, misalign);
  CudaLaunchConfig c;
  c.backward_rows_in_flight = 1;
  std::string l1_desc, halo_desc;
  {
    const LaunchConfigGuard guard(c);
    l1_desc = describe_backward(d.backward_params(l1), Backend::cuda);
    run_cuda(l1, d);
  }
  c.backward_conv_halo = true;
  {
    const LaunchConfigGuard guard(c);
    halo_desc = describe_backward(d.backward_params(halo), Backend::cuda);
    ASSERT_NE(halo_desc.find("shared-memory halo"), std::string::npos) << halo_desc;
    run_cuda(halo, d);
    Problem again = halo;
    run_cuda(again, d);
    expect_backward_bits_equal(halo, again, ctx + " (second run)");
  }
  expect_backward_matches(halo, reference::backward(halo.backward_params()), ctx);
  if (plan_shape(l1_desc) == plan_shape(halo_desc)) {
    expect_backward_bits_equal(l1, halo, ctx + " (against L1)");
  } else {
    EXPECT_GE(o.chunk, 512) << "the halo changed the plan of a narrow chunk: " << l1_desc << " / " << halo_desc;
  }
}

TEST_F(SmallCuda, ConvHaloMatchesL1) {
  uint64_t rng = 700;
  for (DType dt : kDTypes) {
    for (int64_t chunk : {3, 48, 65, 1000}) {
      for (int64_t rows : {1, 37, 300}) {
        if (chunk == 1000 && rows == 300) continue;
        ProblemOptions o = shape(rows, chunk, 4, dt, ++rng);
        o.only_kind = static_cast<int32_t>(Kind::conv);
        check_conv_halo(o, false);
        o.clamp = true;
        o.clip = true;
        o.rng_seed = ++rng;
        check_conv_halo(o, chunk == 48);
        o.only_kind = -1;  // mixed kinds: the others keep their loops
        o.rng_seed = ++rng;
        check_conv_halo(o, false);
        o.only_stage = static_cast<int32_t>(Stage::training);  // shadow CONV: no blend
        o.only_kind = static_cast<int32_t>(Kind::conv);
        o.rng_seed = ++rng;
        check_conv_halo(o, false);
      }
    }
  }
}

// The backward's TMA variant (CudaLaunchConfig::backward_tma, issue 7): on a
// compute capability 9.x device with sm_90a code it runs where C <= 256 on
// the vector path, else the generic kernel runs and the description says
// why. Either way: against the reference, bit for bit across two runs, dX
// bit for bit against the generic kernel at one row in flight (the same
// per-element math), and every output where both plans run the same tiles;
// the workspace is left zero.
void check_backward_tma(const ProblemOptions& o, bool misalign, bool hopper, int stages = 0) {
  Problem generic = make_problem(o);
  Problem tma = generic;
  const std::string ctx = std::string("backward tma") + (misalign ? " misaligned " : " ") +
                          describe(o) + " stages=" + std::to_string(stages);
  SCOPED_TRACE(ctx);
  const DeviceProblem d(generic, misalign);
  CudaLaunchConfig c;
  c.backward_rows_in_flight = 1;
  std::string generic_desc, tma_desc;
  {
    const LaunchConfigGuard guard(c);
    generic_desc = describe_backward(d.backward_params(generic), Backend::cuda);
    run_cuda(generic, d);
  }
  c.backward_tma = true;
  c.backward_stages = stages;
  {
    const LaunchConfigGuard guard(c);
    tma_desc = describe_backward(d.backward_params(tma), Backend::cuda);
    const bool expect_tma = hopper && !misalign && o.chunk <= 256 &&
                            (o.chunk * static_cast<int64_t>(dtype_size(o.dtype))) % 16 == 0;
    if (expect_tma) {
      EXPECT_NE(tma_desc.find("by TMA into a"), std::string::npos) << tma_desc;
      if (stages != 0 && stages <= 4) {  // deeper asks may be lowered to fit
        EXPECT_NE(tma_desc.find(std::to_string(stages) + "-stage"), std::string::npos) << tma_desc;
      }
      EXPECT_EQ(tma_desc.rfind("cuda.backward.tma", 0), 0u) << tma_desc;  // the profiler's name
    } else {
      EXPECT_NE(tma_desc.find("backward_tma refused"), std::string::npos) << tma_desc;
    }
    run_cuda(tma, d);
    Problem again = tma;
    run_cuda(again, d);
    expect_backward_bits_equal(tma, again, ctx + " (second run)");
    std::vector<uint8_t> bw(d.bwd_workspace.bytes());
    d.bwd_workspace.download(bw.data(), bw.size());
    EXPECT_TRUE(all_bytes(bw, 0)) << "backward workspace not zero after the TMA launch";
  }
  expect_backward_matches(tma, reference::backward(tma.backward_params()), ctx);
  EXPECT_TRUE(generic.dx.bytes == tma.dx.bytes) << "dx differs from the generic kernel's bits";
  if (plan_shape(generic_desc) == plan_shape(tma_desc)) {
    expect_backward_bits_equal(generic, tma, ctx + " (against generic)");
  }
}

TEST_F(SmallCuda, TmaBackwardMatchesReference) {
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  const bool hopper = prop.major == 9;
  uint64_t rng = 900;
  for (DType dt : kDTypes) {
    for (int64_t chunk : {3, 48, 64, 256, 1000}) {
      for (int64_t rows : {1, 37, 3000}) {
        if (chunk >= 256 && rows == 3000) continue;
        ProblemOptions o = shape(rows, chunk, 4, dt, ++rng);
        check_backward_tma(o, false, hopper);  // mixed kinds and stages
        o.clamp = true;
        o.clip = true;
        o.rng_seed = ++rng;
        check_backward_tma(o, chunk == 64, hopper);
        o.only_kind = static_cast<int32_t>(Kind::conv);
        o.rng_seed = ++rng;
        check_backward_tma(o, false, hopper);
        o.only_kind = -1;
        o.only_stage = static_cast<int32_t>(Stage::training);  // shadow: no blend, grads
        o.clamp = false;
        o.rng_seed = ++rng;
        check_backward_tma(o, false, hopper);
        o.only_stage = static_cast<int32_t>(Stage::dormant);  // copy seeds: X not loaded
        o.rng_seed = ++rng;
        check_backward_tma(o, false, hopper);
      }
    }
    // Other pipeline depths (CudaLaunchConfig::backward_stages): many
    // passes per CTA, so the ring wraps.
    // 12003 rows: the last pass of a CTA partly past N after the ring has
    // wrapped; the clamp for copy seeds after a refill; a padded row stride
    // (the tensor maps' stride is not hidden; the padding holds NaN).
    for (int stages : {2, 3, 8}) {
      ProblemOptions o = shape(12003, 64, 4, dt, ++rng);
      o.clip = true;
      o.clamp = true;
      o.row_pad = static_cast<int64_t>(16 / dtype_size(dt));
      check_backward_tma(o, false, hopper, stages);
    }
  }
}

TEST_F(SmallCuda, WorkspaceTooSmallWritesNothing) {
  Problem p = make_problem(shape(7, 48, 3, DType::f32, 9));
  const DeviceProblem d(p, false);
  ForwardParams fp = d.forward_params(p);
  fp.workspace_bytes -= 1;
  EXPECT_THROW(forward(fp, Backend::cuda), Error);
  fp.workspace = nullptr;
  EXPECT_THROW(forward(fp, Backend::cuda), Error);
  BackwardParams bp = d.backward_params(p);
  bp.workspace_bytes = 16;
  EXPECT_THROW(backward(bp, Backend::cuda), Error);
  CUDA_OK(cudaDeviceSynchronize());
  d.download_forward(p);
  d.download_backward(p);
  EXPECT_TRUE(all_bytes(p.y.bytes, 0xFF)) << "y was written";
  EXPECT_TRUE(all_bytes(p.dx.bytes, 0xFF)) << "dx was written";
  EXPECT_TRUE(all_bytes(p.telemetry, 0xFF)) << "telemetry was written";
  EXPECT_TRUE(all_bytes(p.nonfinite, 0xFF)) << "nonfinite counts were written";
  EXPECT_TRUE(all_bytes(p.dweights, 0xFF)) << "dweights were written";
  EXPECT_TRUE(all_bytes(p.grad_stats, 0xFF)) << "grad_stats were written";
}

TEST_F(SmallCuda, ForwardManyRefusesMixedDtypes) {
  Problem a = make_problem(shape(8, 48, 3, DType::f32, 301));
  Problem b = make_problem(shape(8, 48, 3, DType::bf16, 302));
  const DeviceProblem da(a, false), db(b, false);
  da.poison();
  db.poison();
  const ForwardParams params[] = {da.forward_params(a), db.forward_params(b)};
  EXPECT_THROW(forward_many(params, 2, Backend::cuda), Error);
  CUDA_OK(cudaDeviceSynchronize());
  da.download_forward(a);
  EXPECT_TRUE(all_bytes(a.y.bytes, 0xFF)) << "y was written by a refused forward_many";
}

// params.hpp: a workspace is left zero-filled by every launch (the Python
// front end declares it unmutated).
// Also where seeds share blueprint rows (their staged rows cleared by each
// row's last seed, DESIGN 62, 67), with more seeds than a CTA's threads.
TEST_F(SmallCuda, WorkspaceLeftZeroFilled) {
  std::vector<ProblemOptions> cases;
  for (int32_t seeds : {1, 5}) {
    cases.push_back(shape(300, 65, seeds, DType::f32, 11));
    cases.back().clip = true;
  }
  cases.push_back(shape(6, 3, 200, DType::bf16, 12));
  cases.back().num_blueprints = 5;
  cases.push_back(shape(5, 1, 600, DType::f32, 13));
  cases.back().num_blueprints = 1000;
  for (const ProblemOptions& o : cases) {
    Problem p = make_problem(o);
    const DeviceProblem d(p, false);
    run_cuda(p, d);
    std::vector<uint8_t> fw(d.fwd_workspace.bytes()), bw(d.bwd_workspace.bytes());
    d.fwd_workspace.download(fw.data(), fw.size());
    d.bwd_workspace.download(bw.data(), bw.size());
    EXPECT_TRUE(all_bytes(fw, 0)) << "forward workspace not zero after the launch, " << describe(o);
    EXPECT_TRUE(all_bytes(bw, 0)) << "backward workspace not zero after the launch, " << describe(o);
  }
}

// Programmatic dependent launch (DESIGN 55): two stacked layers' forward and
// backward enqueued back to back, each kernel reading what the one before it
// wrote (B's x is A's y, A's dy is B's dx), three rounds without a
// synchronisation (the workspaces reused kernel after kernel). With PDL each
// kernel may start before its predecessor ends and must wait for it: the
// outputs must be the bits of plain launches and match the reference on the
// values the device produced. `variants`: the TMA forward and backward too;
// with them, `tma_store` and `late_dependents` (CudaLaunchConfig's
// forward_tma_store, forward_late_dependents) in the programmatic rounds,
// whose bits must still be the plain launches' of the plain TMA forward.
void check_programmatic_chain(DType dt, uint64_t rng, bool variants, bool tma_store,
                              bool late_dependents) {
  const ProblemOptions oa = shape(300, 64, 8, dt, rng), ob = shape(300, 64, 8, dt, rng + 1);
  const Problem a = make_problem(oa), b = make_problem(ob);
  Problem a0 = a, b0 = b;
  const DeviceProblem da(a0, false), db(b0, false);
  cudaStream_t stream = nullptr;
  CUDA_OK(cudaStreamCreate(&stream));
  struct Pair {
    Problem a, b;
  };
  auto chain = [&](bool programmatic, int rounds) {
    CudaLaunchConfig c;
    c.programmatic_launch = programmatic;
    if (variants) {
      c.forward_variant = CudaForwardVariant::tma;
      c.backward_tma = true;
      c.forward_tma_store = programmatic && tma_store ? CudaSwitch::on : CudaSwitch::off;
      c.forward_late_dependents =
          programmatic && late_dependents ? CudaSwitch::on : CudaSwitch::off;
    }
    const LaunchConfigGuard guard(c);
    Pair r{a, b};
    r.a.poison_outputs();
    r.b.poison_outputs();
    da.poison();
    db.poison();
    CUDA_OK(cudaDeviceSynchronize());
    const ForwardParams fa = da.forward_params(r.a, stream);
    ForwardParams fb = db.forward_params(r.b, stream);
    fb.x = da.y.get();
    BackwardParams bb = db.backward_params(r.b, stream);
    bb.x = da.y.get();
    BackwardParams ba = da.backward_params(r.a, stream);
    ba.dy = db.dx.get();
    const std::string want = programmatic && device_is_sm90() ? "programmatic dependent launch"
                                                              : "plain launch";
    for (const std::string& d : {describe_forward(fa, Backend::cuda), describe_backward(ba, Backend::cuda)}) {
      EXPECT_NE(d.find(want), std::string::npos) << d;
      if (variants && device_is_sm90()) {
        EXPECT_NE(d.find(".tma"), std::string::npos) << d;
      }
    }
    if (variants && device_is_sm90()) {
      for (const ForwardParams& f : {fa, fb}) {
        const std::string d = describe_forward(f, Backend::cuda);
        EXPECT_EQ(d.find("; y by TMA store (") != std::string::npos,
                  c.forward_tma_store == CudaSwitch::on)
            << d;
        EXPECT_EQ(d.find("; dependents launched at the CTAs' exit") != std::string::npos,
                  c.forward_late_dependents == CudaSwitch::on)
            << d;
      }
    }
    for (int i = 0; i < rounds; ++i) {
      forward(fa, Backend::cuda);
      forward(fb, Backend::cuda);
      backward(bb, Backend::cuda);
      backward(ba, Backend::cuda);
    }
    CUDA_OK(cudaStreamSynchronize(stream));
    for (auto [dev, host] : {std::pair{&da, &r.a}, std::pair{&db, &r.b}}) {
      dev->download_forward(*host);
      dev->download_backward(*host);
    }
    return r;
  };
  Pair on = chain(true, 3);
  const Pair off = chain(false, 1);
  const std::string ctx = std::string("PDL chain ") + (variants ? "(TMA) " : "") +
                          (tma_store ? "(TMA store) " : "") +
                          (late_dependents ? "(late dependents) " : "") + describe(oa);
  SCOPED_TRACE(ctx);
  expect_forward_bits_equal(on.a, off.a, ctx + ": layer A, PDL vs plain");
  expect_backward_bits_equal(on.a, off.a, ctx + ": layer A, PDL vs plain");
  expect_forward_bits_equal(on.b, off.b, ctx + ": layer B, PDL vs plain");
  expect_backward_bits_equal(on.b, off.b, ctx + ": layer B, PDL vs plain");
  // The reference on the device's own intermediate values.
  on.b.x.bytes = on.a.y.bytes;
  on.a.dy.bytes = on.b.dx.bytes;
  expect_forward_matches(on.a, reference::forward(on.a.forward_params()), ctx + ": layer A");
  expect_backward_matches(on.a, reference::backward(on.a.backward_params()), ctx + ": layer A");
  expect_forward_matches(on.b, reference::forward(on.b.forward_params()), ctx + ": layer B");
  expect_backward_matches(on.b, reference::backward(on.b.backward_params()), ctx + ": layer B");
  CUDA_OK(cudaStreamDestroy(stream));
}

TEST_F(SmallCuda, ProgrammaticLaunchChains) {
  for (const DType dt : {DType::f32, DType::bf16}) {
    check_programmatic_chain(dt, 510, false);
    check_programmatic_chain(dt, 520, true);
  }
}

// The TMA forward's dependents launched at its CTAs' exit
// (CudaLaunchConfig::forward_late_dependents), with and without the TMA
// store: forwards and backwards back to back under programmatic launch,
// three rounds, against plain launches bit for bit and the reference.
TEST_F(SmallCuda, TmaLateDependentsMatchReference) {
  if (!device_is_sm90()) GTEST_SKIP() << "the TMA forward runs on compute capability 9.x only";
  for (const DType dt : {DType::f32, DType::bf16}) {
    check_programmatic_chain(dt, 530, true, false, true);
    check_programmatic_chain(dt, 540, true, true, true);
  }
}

TEST_F(SmallCuda, DescribeNamesTheVariant) {
  Problem p = make_problem(shape(7, 48, 3, DType::f32, 10));
  const DeviceProblem aligned(p, false);
  const DeviceProblem shifted(p, true);
  EXPECT_NE(describe_forward(aligned.forward_params(p), Backend::cuda).find("vec4"), std::string::npos)
      << describe_forward(aligned.forward_params(p), Backend::cuda);
  EXPECT_NE(describe_forward(shifted.forward_params(p), Backend::cuda).find("scalar"), std::string::npos)
      << describe_forward(shifted.forward_params(p), Backend::cuda);
  EXPECT_NE(describe_backward(aligned.backward_params(p), Backend::cuda).find("cuda.backward"),
            std::string::npos);
}

}  // namespace
}  // namespace kasmina::test
