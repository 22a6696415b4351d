// SPEC section 8 at the ops level, on every host backend: each invalid
// argument raises kasmina::Error of the right kind, naming what was expected
// and what came, and leaves every output buffer untouched.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "support/harness.hpp"

namespace kasmina::test {
namespace {

struct Expected {
  ErrorKind kind;
  std::vector<std::string> parts;  // substrings the message must contain
};

void expect_error(const std::function<void()>& call, const Expected& expected,
                  const std::string& where) {
  try {
    call();
    ADD_FAILURE() << "no error raised; expected one containing '"
                  << (expected.parts.empty() ? "" : expected.parts.front()) << "', " << where;
  } catch (const Error& e) {
    EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(expected.kind))
        << e.what() << ", " << where;
    const std::string message = e.what();
    for (const std::string& part : expected.parts) {
      EXPECT_NE(message.find(part), std::string::npos)
          << "message '" << message << "' lacks '" << part << "', " << where;
    }
  }
}

template <typename T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Nothing written: every output equals a freshly poisoned copy.
void expect_untouched(const Problem& p, const std::string& where) {
  Problem fresh = p;
  fresh.poison_outputs();
  EXPECT_TRUE(same_bytes(p.y.bytes, fresh.y.bytes)) << "y written, " << where;
  EXPECT_TRUE(same_bytes(p.dx.bytes, fresh.dx.bytes)) << "dx written, " << where;
  EXPECT_TRUE(same_bytes(p.telemetry, fresh.telemetry)) << "telemetry written, " << where;
  EXPECT_TRUE(same_bytes(p.nonfinite, fresh.nonfinite)) << "nonfinite_count written, " << where;
  EXPECT_TRUE(same_bytes(p.dweights, fresh.dweights)) << "dweights written, " << where;
  EXPECT_TRUE(same_bytes(p.dscales, fresh.dscales)) << "dscales written, " << where;
  EXPECT_TRUE(same_bytes(p.dalpha, fresh.dalpha)) << "dalpha written, " << where;
  EXPECT_TRUE(same_bytes(p.grad_stats, fresh.grad_stats)) << "grad_stats written, " << where;
}

ProblemOptions small_options() {
  ProblemOptions o;
  o.rows = 4;
  o.chunk = 5;
  o.num_seeds = 3;
  o.num_blueprints = 6;
  o.rng_seed = 7;
  return o;
}

struct ForwardCase {
  std::string name;
  std::function<void(Problem&, ForwardParams&)> mutate;
  Expected expected;
};

struct BackwardCase {
  std::string name;
  std::function<void(Problem&, BackwardParams&)> mutate;
  Expected expected;
};

constexpr ErrorKind kValue = ErrorKind::value;
constexpr ErrorKind kType = ErrorKind::type;

// Shape, dtype and table errors common to both ops, written once for a
// params type P with the fields forward and backward share.
template <typename P>
std::vector<std::pair<std::string, std::pair<std::function<void(Problem&, P&)>, Expected>>>
shared_cases(Backend backend) {
  std::vector<std::pair<std::string, std::pair<std::function<void(Problem&, P&)>, Expected>>>
      cases = {
          {"hidden not divisible",
           {[](Problem&, P& q) { q.hidden = 16; },
            {kValue, {"divisible", "hidden = 16", "num_seeds = 3"}}}},
          {"hidden zero",
           {[](Problem&, P& q) { q.hidden = 0; }, {kValue, {"hidden must be > 0", "hidden = 0"}}}},
          {"num_seeds zero",
           {[](Problem&, P& q) { q.num_seeds = 0; },
            {kValue, {"num_seeds must be > 0", "num_seeds = 0"}}}},
          {"num_seeds negative",
           {[](Problem&, P& q) { q.num_seeds = -3; }, {kValue, {"num_seeds = -3"}}}},
          {"rows negative",
           {[](Problem&, P& q) { q.rows = -2; }, {kValue, {"rows must be >= 0", "rows = -2"}}}},
          {"x stride short",
           {[](Problem&, P& q) { q.x_row_stride = 14; },
            {kValue, {"x_row_stride", "hidden = 15", "x_row_stride = 14"}}}},
          {"x stride negative",
           {[](Problem&, P& q) { q.x_row_stride = -15; }, {kValue, {"x_row_stride = -15"}}}},
          {"x null", {[](Problem&, P& q) { q.x = nullptr; }, {kValue, {"x must not be null"}}}},
          {"unknown dtype",
           {[](Problem&, P& q) { q.dtype = static_cast<DType>(9); }, {kType, {"dtype", "9"}}}},
          {"stage table null",
           {[](Problem&, P& q) { q.seeds.stage = nullptr; }, {kValue, {"seeds.stage", "null"}}}},
          {"alpha table null",
           {[](Problem&, P& q) { q.seeds.alpha = nullptr; }, {kValue, {"seeds.alpha", "null"}}}},
          {"registry empty",
           {[](Problem&, P& q) { q.registry.num_blueprints = 0; },
            {kValue, {"num_blueprints", ">= 1", "num_blueprints = 0"}}}},
          {"registry weights null",
           {[](Problem&, P& q) { q.registry.weights = nullptr; },
            {kValue, {"registry.weights", "null"}}}},
          {"registry scales null",
           {[](Problem&, P& q) { q.registry.scales = nullptr; },
            {kValue, {"registry.scales", "null"}}}},
          {"clamp inverted",
           {[](Problem&, P& q) {
              q.clamp = {true, 2.0f, 1.0f};
            },
            {kValue, {"lo <= hi", "lo = 2", "hi = 1"}}}},
          {"clamp NaN",
           {[](Problem&, P& q) {
              q.clamp = {true, NAN, 1.0f};
            },
            {kValue, {"lo <= hi", "lo = nan"}}}},
          {"kind out of range",
           {[](Problem& p, P&) { p.kind[1] = 4; },
            {kValue, {"seed 1", "kind 4", "0 <= kind < 4"}}}},
          {"kind negative",
           {[](Problem& p, P&) { p.kind[0] = -1; }, {kValue, {"seed 0", "kind -1"}}}},
          {"stage out of range",
           {[](Problem& p, P&) { p.stage[2] = 11; },
            {kValue, {"seed 2", "stage 11", "0 <= stage < 11"}}}},
          {"blueprint out of range",
           {[](Problem& p, P&) { p.blueprint[2] = 6; },
            {kValue, {"seed 2", "blueprint 6", "0 <= blueprint < 6"}}}},
          {"blueprint negative",
           {[](Problem& p, P&) { p.blueprint[0] = -1; }, {kValue, {"seed 0", "blueprint -1"}}}},
      };
  if (backend != Backend::reference) {
    cases.push_back(
        {"float64 on a fast backend",
         {[](Problem&, P& q) { q.dtype = DType::f64; },
          {kType, {"float64", "reference backend only", std::string(backend_name(backend))}}}});
  }
  return cases;
}

class Validation : public ::testing::TestWithParam<Backend> {};

TEST_P(Validation, ForwardErrors) {
  const Backend backend = GetParam();
  std::vector<ForwardCase> cases;
  for (auto& [name, body] : shared_cases<ForwardParams>(backend))
    cases.push_back({name, body.first, body.second});
  cases.push_back({"y null",
                   [](Problem&, ForwardParams& q) { q.y = nullptr; },
                   {kValue, {"y must not be null"}}});
  cases.push_back({"telemetry null",
                   [](Problem&, ForwardParams& q) { q.telemetry = nullptr; },
                   {kValue, {"telemetry must not be null"}}});
  cases.push_back({"y stride short",
                   [](Problem&, ForwardParams& q) { q.y_row_stride = 3; },
                   {kValue, {"y_row_stride = 3", "hidden = 15"}}});
  cases.push_back({"dead threshold negative",
                   [](Problem&, ForwardParams& q) { q.dead_threshold = -1.0f; },
                   {kValue, {"dead_threshold", ">= 0", "dead_threshold = -1"}}});
  cases.push_back({"y overlaps x",
                   [](Problem& p, ForwardParams& q) { q.y = p.x.data(); },
                   {kValue, {"y must not overlap x"}}});
  cases.push_back({"telemetry overlaps x",
                   [](Problem& p, ForwardParams& q) {
                     q.telemetry = static_cast<float*>(p.x.data()) + 3;
                   },
                   {kValue, {"telemetry must not overlap x"}}});
  cases.push_back({"telemetry overlaps the registry",
                   [](Problem&, ForwardParams& q) {
                     q.telemetry = const_cast<float*>(q.registry.weights);
                   },
                   {kValue, {"telemetry must not overlap registry.weights"}}});
  cases.push_back({"nonfinite counts overlap telemetry",
                   [](Problem& p, ForwardParams& q) {
                     q.nonfinite_count = reinterpret_cast<int64_t*>(p.telemetry.data() + 2);
                   },
                   {kValue, {"telemetry must not overlap nonfinite_count"}}});

  for (const ForwardCase& c : cases) {
    Problem p = make_problem(small_options());
    ForwardParams params = p.forward_params();
    c.mutate(p, params);
    const std::string where = std::string(backend_name(backend)) + " forward, " + c.name;
    expect_error([&] { forward(params, backend); }, c.expected, where);
    expect_error([&] { validate(params, backend); }, c.expected, where);
    expect_untouched(p, where);
  }
}

TEST_P(Validation, BackwardErrors) {
  const Backend backend = GetParam();
  std::vector<BackwardCase> cases;
  for (auto& [name, body] : shared_cases<BackwardParams>(backend))
    cases.push_back({name, body.first, body.second});
  cases.push_back({"dy null",
                   [](Problem&, BackwardParams& q) { q.dy = nullptr; },
                   {kValue, {"dy must not be null"}}});
  cases.push_back({"dx null",
                   [](Problem&, BackwardParams& q) { q.dx = nullptr; },
                   {kValue, {"dx must not be null"}}});
  cases.push_back({"dweights null",
                   [](Problem&, BackwardParams& q) { q.dweights = nullptr; },
                   {kValue, {"dweights must not be null"}}});
  cases.push_back({"dscales null",
                   [](Problem&, BackwardParams& q) { q.dscales = nullptr; },
                   {kValue, {"dscales must not be null"}}});
  cases.push_back({"dalpha null",
                   [](Problem&, BackwardParams& q) { q.dalpha = nullptr; },
                   {kValue, {"dalpha must not be null"}}});
  cases.push_back({"grad_stats null",
                   [](Problem&, BackwardParams& q) { q.grad_stats = nullptr; },
                   {kValue, {"grad_stats must not be null"}}});
  cases.push_back({"dy stride short",
                   [](Problem&, BackwardParams& q) { q.dy_row_stride = 1; },
                   {kValue, {"dy_row_stride = 1", "hidden = 15"}}});
  cases.push_back({"dx stride short",
                   [](Problem&, BackwardParams& q) { q.dx_row_stride = 2; },
                   {kValue, {"dx_row_stride = 2", "hidden = 15"}}});
  cases.push_back({"clip zero",
                   [](Problem&, BackwardParams& q) {
                     q.clip_enabled = true;
                     q.clip_norm = 0.0f;
                   },
                   {kValue, {"clip_norm must be > 0", "clip_norm = 0"}}});
  cases.push_back({"clip negative",
                   [](Problem&, BackwardParams& q) {
                     q.clip_enabled = true;
                     q.clip_norm = -0.5f;
                   },
                   {kValue, {"clip_norm = -0.5"}}});
  cases.push_back({"dx aliases x",
                   [](Problem& p, BackwardParams& q) { q.dx = p.x.data(); },
                   {kValue, {"dx must not overlap x"}}});
  cases.push_back({"dx aliases dy",
                   [](Problem& p, BackwardParams& q) { q.dx = p.dy.data(); },
                   {kValue, {"dx must not overlap dy"}}});
  cases.push_back({"dweights overlap the registry",
                   [](Problem&, BackwardParams& q) {
                     q.dweights = const_cast<float*>(q.registry.weights);
                   },
                   {kValue, {"dweights must not overlap registry.weights"}}});
  cases.push_back({"dalpha overlaps alpha",
                   [](Problem&, BackwardParams& q) { q.dalpha = const_cast<float*>(q.seeds.alpha); },
                   {kValue, {"dalpha must not overlap seeds.alpha"}}});
  // Both in one buffer of their own: grad_stats (3 S floats) placed at the
  // problem's dalpha could also reach whichever output the heap put next,
  // and that pair's message would come first.
  cases.push_back({"grad_stats overlap dalpha",
                   [](Problem& p, BackwardParams& q) {
                     static std::vector<float> both;
                     both.assign(static_cast<std::size_t>(4 * p.num_seeds), 0.0f);
                     q.dalpha = both.data();
                     q.grad_stats = both.data() + 1;
                   },
                   {kValue, {"dalpha must not overlap grad_stats"}}});
  cases.push_back(
      {"dx overlaps x partly",
       [](Problem& p, BackwardParams& q) { q.dx = static_cast<float*>(p.x.data()) + 7; },
       {kValue, {"dx must not overlap x"}}});

  for (const BackwardCase& c : cases) {
    Problem p = make_problem(small_options());
    BackwardParams params = p.backward_params();
    c.mutate(p, params);
    const std::string where = std::string(backend_name(backend)) + " backward, " + c.name;
    expect_error([&] { backward(params, backend); }, c.expected, where);
    expect_error([&] { validate(params, backend); }, c.expected, where);
    expect_untouched(p, where);
  }
}

TEST_P(Validation, ConvNeedsChunkOfThree) {
  const Backend backend = GetParam();
  ProblemOptions o = small_options();
  o.chunk = 2;
  Problem p = make_problem(o);
  p.kind[1] = static_cast<int32_t>(Kind::conv);
  const Expected expected{kValue, {"seed 1 is CONV, which needs chunk >= 3 (chunk = 2)"}};
  expect_error([&] { forward(p.forward_params(), backend); }, expected, "forward");
  expect_error([&] { backward(p.backward_params(), backend); }, expected, "backward");
  expect_untouched(p, std::string(backend_name(backend)) + " CONV with chunk 2");
}

TEST_P(Validation, EmptyBatchIsValid) {
  const Backend backend = GetParam();
  for (const DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    ProblemOptions o = small_options();
    o.rows = 0;
    o.dtype = dtype;
    Problem p = make_problem(o);
    ForwardParams fp = p.forward_params();
    fp.x = nullptr;  // no rows: no data pointer needed
    fp.y = nullptr;
    ASSERT_NO_THROW(forward(fp, backend)) << describe(o);
    for (int32_t s = 0; s < p.num_seeds; ++s) {
      const float* tel = &p.telemetry[static_cast<std::size_t>(s) * kTelemetryWidth];
      const float expected[kTelemetryWidth] = {0, 0, INFINITY, -INFINITY, 0, 0, 0, 0};
      for (int c = 0; c < kTelemetryWidth; ++c) {
        EXPECT_EQ(tel[c], expected[c]) << "seed " << s << " column " << c << ", " << describe(o);
      }
      EXPECT_EQ(p.nonfinite[static_cast<std::size_t>(s)], 0);
    }
    BackwardParams bp = p.backward_params();
    bp.x = nullptr;
    bp.dy = nullptr;
    bp.dx = nullptr;
    ASSERT_NO_THROW(backward(bp, backend)) << describe(o);
    for (float v : p.dweights) EXPECT_EQ(v, 0.0f) << describe(o);
    for (float v : p.dscales) EXPECT_EQ(v, 0.0f) << describe(o);
    for (float v : p.dalpha) EXPECT_EQ(v, 0.0f) << describe(o);
    for (float v : p.grad_stats) EXPECT_EQ(v, 0.0f) << describe(o);
  }
}

INSTANTIATE_TEST_SUITE_P(HostBackends, Validation,
                         ::testing::Values(Backend::reference, Backend::cpu),
                         [](const ::testing::TestParamInfo<Backend>& info) {
                           return std::string(backend_name(info.param));
                         });

TEST(Dispatch, UnavailableCudaSaysWhy) {
  if (backend_available(Backend::cuda)) GTEST_SKIP() << "a CUDA device is present";
  const std::string reason = backend_unavailable_reason(Backend::cuda);
  EXPECT_FALSE(reason.empty());
  Problem p = make_problem(small_options());
  expect_error([&] { forward(p.forward_params(), Backend::cuda); },
               {ErrorKind::runtime, {"cuda", "not available", reason}}, "forward on cuda");
  expect_error([&] { backward(p.backward_params(), Backend::cuda); },
               {ErrorKind::runtime, {"cuda", "not available", reason}}, "backward on cuda");
  expect_untouched(p, "cuda unavailable");
}

TEST(Dispatch, NoStreamCapturesWithoutCuda) {
  if (backend_available(Backend::cuda)) GTEST_SKIP() << "a CUDA device is present";
  EXPECT_FALSE(cuda_stream_capturing(nullptr));
}

TEST(Dispatch, UnknownBackendIsRefused) {
  Problem p = make_problem(small_options());
  expect_error([&] { forward(p.forward_params(), static_cast<Backend>(5)); },
               {ErrorKind::value, {"unknown backend", "5"}}, "backend 5");
  expect_untouched(p, "backend 5");
}

TEST(Dispatch, HostBackendsNeedNoWorkspaceAndDescribeThemselves) {
  Problem p = make_problem(small_options());
  EXPECT_EQ(forward_workspace_bytes(p.forward_params(), Backend::reference), 0u);
  EXPECT_EQ(backward_workspace_bytes(p.backward_params(), Backend::cpu), 0u);
  EXPECT_EQ(describe_forward(p.forward_params(), Backend::reference), "reference: float64 oracle");
  EXPECT_EQ(describe_backward(p.backward_params(), Backend::reference),
            "reference: float64 oracle");
  EXPECT_EQ(backend_device(Backend::cpu), Device::cpu);
  EXPECT_EQ(backend_device(Backend::cuda), Device::cuda);
  const BuildInfo info = build_info();
  EXPECT_FALSE(info.version.empty());
  EXPECT_FALSE(info.compiler.empty());
  EXPECT_GT(info.cpu_threads, 0);
}

TEST(Dispatch, LaunchConfigRefusesUnknownValuesAndKeepsTheOld) {
  const CudaLaunchConfig saved = cuda_launch_config();
  set_cuda_launch_config({2, 1});
  expect_error([] { set_cuda_launch_config({3, 1}); },
               {ErrorKind::value, {"forward_rows_in_flight", "0 (default), 1, 2 or 4", "got 3"}},
               "forward rows 3");
  expect_error([] { set_cuda_launch_config({1, 4}); },
               {ErrorKind::value, {"backward_rows_in_flight", "0 (default), 1 or 2", "got 4"}},
               "backward rows 4");
  expect_error([] { set_cuda_launch_config({1, 1, static_cast<CudaForwardVariant>(3), 0}); },
               {ErrorKind::value, {"forward_variant", "2 (tma)", "got 3"}}, "variant 3");
  expect_error([] { set_cuda_launch_config({1, 1, CudaForwardVariant::tma, 1}); },
               {ErrorKind::value, {"forward_stages", "2 to 8", "got 1"}}, "stages 1");
  expect_error([] { set_cuda_launch_config({1, 1, CudaForwardVariant::tma, 9}); },
               {ErrorKind::value, {"forward_stages", "got 9"}}, "stages 9");
  for (int group : {-1, 3, 16}) {
    expect_error([group] { set_cuda_launch_config({1, 1, CudaForwardVariant::generic, 0, group}); },
                 {ErrorKind::value, {"forward_group", "1, 2, 4 or 8", "got " + std::to_string(group)}},
                 "group");
  }
  for (int threads : {-64, 32, 96, 512}) {
    expect_error(
        [threads] { set_cuda_launch_config({1, 1, CudaForwardVariant::generic, 0, 0, threads}); },
        {ErrorKind::value, {"forward_block_threads", "64, 128 or 256", "got " + std::to_string(threads)}},
        "threads");
  }
  for (int stages : {1, 9}) {
    expect_error(
        [stages] {
          CudaLaunchConfig c;
          c.backward_tma = true;
          c.backward_stages = stages;
          set_cuda_launch_config(c);
        },
        {ErrorKind::value, {"backward_stages", "2 to 8", "got " + std::to_string(stages)}},
        "backward stages");
  }
  EXPECT_FALSE(cuda_launch_config().backward_tma);
  EXPECT_EQ(cuda_launch_config().forward_rows_in_flight, 2);
  EXPECT_EQ(cuda_launch_config().backward_rows_in_flight, 1);
  EXPECT_EQ(cuda_launch_config().forward_block_threads, 0);
  EXPECT_EQ(cuda_launch_config().forward_variant, CudaForwardVariant::automatic);
  EXPECT_EQ(cuda_launch_config().forward_group, 0);
  set_cuda_launch_config({1, 2, CudaForwardVariant::tma, 4, 2, 128});
  EXPECT_EQ(cuda_launch_config().forward_block_threads, 128);
  EXPECT_EQ(cuda_launch_config().forward_variant, CudaForwardVariant::tma);
  EXPECT_EQ(cuda_launch_config().forward_stages, 4);
  EXPECT_EQ(cuda_launch_config().forward_group, 2);
  EXPECT_EQ(cuda_forward_variant_name(CudaForwardVariant::tma), "tma");
  CudaLaunchConfig tma_bwd;
  tma_bwd.backward_tma = true;
  tma_bwd.backward_stages = 4;
  set_cuda_launch_config(tma_bwd);
  EXPECT_TRUE(cuda_launch_config().backward_tma);
  EXPECT_EQ(cuda_launch_config().backward_stages, 4);
  // The backward's row list: off by default, kept when set.
  EXPECT_FALSE(CudaLaunchConfig{}.backward_row_list);
  EXPECT_FALSE(cuda_launch_config().backward_row_list);
  CudaLaunchConfig listed;
  listed.backward_row_list = true;
  set_cuda_launch_config(listed);
  EXPECT_TRUE(cuda_launch_config().backward_row_list);
  // Programmatic dependent launch: on by default, off when set so.
  EXPECT_TRUE(CudaLaunchConfig{}.programmatic_launch);
  EXPECT_TRUE(cuda_launch_config().programmatic_launch);
  CudaLaunchConfig plain;
  plain.programmatic_launch = false;
  set_cuda_launch_config(plain);
  EXPECT_FALSE(cuda_launch_config().programmatic_launch);
  // The TMA forward's store and late dependents: automatic by default, kept
  // when set; a value outside the switch is refused, changing nothing.
  EXPECT_EQ(CudaLaunchConfig{}.forward_tma_store, CudaSwitch::automatic);
  EXPECT_EQ(CudaLaunchConfig{}.forward_late_dependents, CudaSwitch::automatic);
  set_cuda_launch_config(CudaLaunchConfig{});
  EXPECT_EQ(cuda_launch_config().forward_tma_store, CudaSwitch::automatic);
  EXPECT_EQ(cuda_launch_config().forward_late_dependents, CudaSwitch::automatic);
  CudaLaunchConfig store;
  store.forward_tma_store = CudaSwitch::on;
  store.forward_late_dependents = CudaSwitch::off;
  set_cuda_launch_config(store);
  EXPECT_EQ(cuda_launch_config().forward_tma_store, CudaSwitch::on);
  EXPECT_EQ(cuda_launch_config().forward_late_dependents, CudaSwitch::off);
  for (int field = 0; field < 2; ++field) {
    CudaLaunchConfig bad;
    (field == 0 ? bad.forward_tma_store : bad.forward_late_dependents) = static_cast<CudaSwitch>(3);
    expect_error([&] { set_cuda_launch_config(bad); },
                 {ErrorKind::value,
                  {field == 0 ? "forward_tma_store" : "forward_late_dependents",
                   "0 (automatic), 1 (off) or 2 (on)", "got 3"}},
                 "switch");
    EXPECT_EQ(cuda_launch_config().forward_tma_store, CudaSwitch::on);
    EXPECT_EQ(cuda_launch_config().forward_late_dependents, CudaSwitch::off);
  }
  EXPECT_EQ(cuda_switch_name(CudaSwitch::automatic), "automatic");
  EXPECT_EQ(cuda_switch_name(CudaSwitch::off), "off");
  EXPECT_EQ(cuda_switch_name(CudaSwitch::on), "on");
  set_cuda_launch_config(saved);
}

TEST(Dispatch, ForwardManyRunsEachAndRefusesSharedOutputs) {
  ProblemOptions o = small_options();
  Problem a = make_problem(o);
  o.rng_seed += 1;
  Problem b = make_problem(o);
  Problem a1 = a, b1 = b;
  const ForwardParams both[] = {a.forward_params(), b.forward_params()};
  forward_many(both, 2, Backend::cpu);
  forward(a1.forward_params(), Backend::cpu);
  forward(b1.forward_params(), Backend::cpu);
  expect_forward_bits_equal(a, a1, "forward_many problem 0");
  expect_forward_bits_equal(b, b1, "forward_many problem 1");

  Problem c = make_problem(o);
  c.poison_outputs();
  ForwardParams shared[] = {c.forward_params(), b.forward_params()};
  shared[1].y = shared[0].y;  // two problems writing one y
  expect_error([&] { forward_many(shared, 2, Backend::cpu); },
               {ErrorKind::value, {"forward_many", "problem 0's y overlaps problem 1's y"}}, "shared y");
  expect_untouched(c, "shared y");
  shared[1] = b.forward_params();
  shared[1].x = static_cast<const void*>(shared[0].y);  // one reads what the other writes
  expect_error([&] { forward_many(shared, 2, Backend::cpu); },
               {ErrorKind::value, {"problem 0's y overlaps problem 1's x"}}, "y read as x");
  expect_error([&] { forward_many(shared, 0, Backend::cpu); },
               {ErrorKind::value, {"at least one problem"}}, "no problem");
}

TEST(Dispatch, TunedTableValidatesAndLooksUp) {
  const std::vector<CudaTunedEntry> saved = cuda_tuned_table();
  EXPECT_EQ(shape_class(16, 4096, 4), ShapeClass::small);
  EXPECT_EQ(shape_class(8192, 768, 4), ShapeClass::medium);
  EXPECT_EQ(shape_class(16384, 4096, 2), ShapeClass::large);
  EXPECT_EQ(shape_class(0, 4096, 4), ShapeClass::small);
  EXPECT_EQ(shape_class_name(ShapeClass::medium), "medium");
  expect_error([] { (void)shape_class(-1, 64, 4); },
               {ErrorKind::value, {"shape_class", ">= 0", "-1 x 64"}}, "negative rows");
  expect_error([] { (void)shape_class(8, 64, 3); },
               {ErrorKind::value, {"elem_bytes must be 2, 4 or 8", "got 3"}}, "elem 3");
  CudaTunedEntry e;
  e.device = "GPU A";
  e.elem_bytes = 4;
  e.shape = ShapeClass::large;
  e.forward_rows_in_flight = 4;
  e.backward_rows_in_flight = 2;
  set_cuda_tuned_table({e});
  const CudaTunedEntry hit = cuda_tuned_lookup("GPU A", 4, ShapeClass::large);
  EXPECT_EQ(hit.forward_rows_in_flight, 4);
  EXPECT_EQ(hit.backward_rows_in_flight, 2);
  EXPECT_EQ(cuda_tuned_lookup("GPU B", 4, ShapeClass::large).forward_rows_in_flight, 0);
  EXPECT_EQ(cuda_tuned_lookup("GPU A", 2, ShapeClass::large).forward_rows_in_flight, 0);
  EXPECT_EQ(cuda_tuned_lookup("GPU A", 4, ShapeClass::small).backward_rows_in_flight, 0);
  CudaTunedEntry bad = e;
  bad.elem_bytes = 2;  // 2-byte types run at most 2 rows in flight
  expect_error([&] { set_cuda_tuned_table({bad}); },
               {ErrorKind::value, {"forward_rows_in_flight", "at most 2", "got 4"}}, "bf16 rows 4");
  bad = e;
  bad.backward_rows_in_flight = 3;
  expect_error([&] { set_cuda_tuned_table({e, bad}); },
               {ErrorKind::value, {"backward_rows_in_flight", "got 3"}}, "bwd rows 3");
  bad = e;
  bad.elem_bytes = 8;
  expect_error([&] { set_cuda_tuned_table({bad}); }, {ErrorKind::value, {"elem_bytes", "got 8"}},
               "elem 8");
  bad = e;
  bad.forward_stages = 1;
  expect_error([&] { set_cuda_tuned_table({bad}); },
               {ErrorKind::value, {"forward_stages", "got 1"}}, "tuned stages 1");
  bad = e;
  bad.forward_variant = static_cast<CudaForwardVariant>(-1);
  expect_error([&] { set_cuda_tuned_table({bad}); },
               {ErrorKind::value, {"forward_variant", "got -1"}}, "tuned variant -1");
  bad = e;
  bad.forward_group = 6;
  expect_error([&] { set_cuda_tuned_table({bad}); },
               {ErrorKind::value, {"forward_group", "got 6"}}, "tuned group 6");
  bad = e;
  bad.forward_block_threads = 192;
  expect_error([&] { set_cuda_tuned_table({bad}); },
               {ErrorKind::value, {"forward_block_threads", "got 192"}}, "tuned threads 192");
  ASSERT_EQ(cuda_tuned_table().size(), 1u);  // the refused tables changed nothing
  EXPECT_EQ(cuda_tuned_table()[0].device, "GPU A");
  set_cuda_tuned_table(saved);
}

}  // namespace
}  // namespace kasmina::test
