// Telemetry merged across shards of one batch (include/kasmina/telemetry.hpp):
// the forward run on row slices of a random problem, the slices' telemetry
// merged in order, compared with the float64 reference over the whole batch
// under SPEC section 9 (min, max, non-finite counts exact).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kasmina/kasmina.hpp"
#include "support/harness.hpp"

namespace kasmina {
namespace {

struct Shards {
  std::vector<float> telemetry;   // [ranks, S, 8]
  std::vector<int64_t> nonfinite;  // [ranks, S]
  std::vector<int64_t> rows;       // [ranks]
};

// Runs the CPU backend on consecutive row slices of p (sizes `parts`).
Shards run_shards(test::Problem& p, const std::vector<int64_t>& parts) {
  const auto s = static_cast<std::size_t>(p.num_seeds);
  const std::size_t elem = dtype_size(p.x.dtype);
  Shards out;
  int64_t row0 = 0;
  for (int64_t n : parts) {
    ForwardParams f = p.forward_params();
    f.x = static_cast<const uint8_t*>(f.x) + static_cast<std::size_t>(row0 * p.row_stride) * elem;
    f.y = static_cast<uint8_t*>(f.y) + static_cast<std::size_t>(row0 * p.row_stride) * elem;
    f.rows = n;
    std::vector<float> tel(s * kTelemetryWidth);
    std::vector<int64_t> nf(s);
    test::poison(tel);
    test::poison(nf);
    f.telemetry = tel.data();
    f.nonfinite_count = nf.data();
    forward(f, Backend::cpu);
    out.telemetry.insert(out.telemetry.end(), tel.begin(), tel.end());
    out.nonfinite.insert(out.nonfinite.end(), nf.begin(), nf.end());
    out.rows.push_back(n);
    row0 += n;
  }
  EXPECT_EQ(row0, p.rows) << "the parts must cover the problem";
  return out;
}

struct Merged {
  std::vector<float> telemetry;
  std::vector<int64_t> nonfinite;
};

Merged merge(const Shards& sh, int32_t num_seeds, int64_t chunk) {
  Merged m;
  m.telemetry.assign(static_cast<std::size_t>(num_seeds) * kTelemetryWidth, -7.0f);
  m.nonfinite.assign(static_cast<std::size_t>(num_seeds), -7);
  merge_telemetry(sh.telemetry, sh.nonfinite, sh.rows, static_cast<int32_t>(sh.rows.size()),
                  num_seeds, chunk, m.telemetry, m.nonfinite);
  return m;
}

std::vector<double> column(std::span<const float> tel, int col) {
  std::vector<double> v;
  for (std::size_t i = static_cast<std::size_t>(col); i < tel.size(); i += kTelemetryWidth)
    v.push_back(tel[i]);
  return v;
}
std::vector<double> column(std::span<const double> tel, int col) {
  std::vector<double> v;
  for (std::size_t i = static_cast<std::size_t>(col); i < tel.size(); i += kTelemetryWidth)
    v.push_back(tel[i]);
  return v;
}

// SPEC section 9 on merged telemetry vs the float64 reference of the whole.
void expect_matches_reference(const test::Problem& p, const Merged& m,
                              const reference::ForwardResult& ref, const std::string& what) {
  const double tol = test::rel_tolerance(DType::f32);  // telemetry is float32
  for (int col : {kTelVariance, kTelMean, kTelSignalToNoise, kTelDrift}) {
    EXPECT_LE(test::rel_error(column(std::span<const float>(m.telemetry), col),
                              column(std::span<const double>(ref.telemetry), col)),
              tol)
        << what << ": column " << col;
  }
  for (int32_t s = 0; s < p.num_seeds; ++s) {
    const float* row = m.telemetry.data() + s * kTelemetryWidth;
    const double* r = ref.telemetry.data() + s * kTelemetryWidth;
    EXPECT_EQ(row[kTelMin], static_cast<float>(r[kTelMin])) << what << ": min of seed " << s;
    EXPECT_EQ(row[kTelMax], static_cast<float>(r[kTelMax])) << what << ": max of seed " << s;
    EXPECT_EQ(row[kTelNonfinite], static_cast<float>(r[kTelNonfinite])) << what << ": seed " << s;
    EXPECT_EQ(m.nonfinite[static_cast<std::size_t>(s)], ref.nonfinite_count[static_cast<std::size_t>(s)])
        << what << ": nonfinite of seed " << s;
    // The dead count is recovered exactly, so the ratio rounds like the whole's.
    EXPECT_EQ(row[kTelDeadRatio], static_cast<float>(r[kTelDeadRatio])) << what << ": seed " << s;
  }
}

TEST(TelemetryMerge, SlicesOfRandomProblemsMatchTheWhole) {
  struct Case {
    int64_t rows, chunk;
    int32_t seeds;
    DType dtype;
    double special;
    std::vector<int64_t> parts;
  };
  const std::vector<Case> cases = {
      {1000, 48, 5, DType::f32, 0.0, {500, 500}},
      {1000, 48, 5, DType::f32, 0.02, {500, 500}},
      {1001, 65, 3, DType::f32, 0.01, {1, 700, 0, 300}},  // uneven, an empty rank
      {7, 3, 4, DType::bf16, 0.05, {3, 4}},
      {300, 1000, 2, DType::f16, 0.01, {100, 100, 100}},
      {64, 48, 8, DType::f32, 0.0, {0, 64}},  // a rank with no rows first
  };
  for (const Case& c : cases) {
    test::ProblemOptions o;
    o.rows = c.rows;
    o.chunk = c.chunk;
    o.num_seeds = c.seeds;
    o.dtype = c.dtype;
    o.special_fraction = c.special;
    o.rng_seed = static_cast<uint64_t>(c.rows * 31 + c.chunk);
    test::Problem p = test::make_problem(o);
    const std::string what = test::describe(o) + ", " + std::to_string(c.parts.size()) + " ranks";
    const reference::ForwardResult ref = reference::forward(p.forward_params());

    const Shards sh = run_shards(p, c.parts);
    const Merged m = merge(sh, p.num_seeds, p.chunk);
    expect_matches_reference(p, m, ref, what);

    // The same rows gathered again give the same bits (what every rank relies on).
    const Merged again = merge(sh, p.num_seeds, p.chunk);
    EXPECT_EQ(0, std::memcmp(m.telemetry.data(), again.telemetry.data(),
                             m.telemetry.size() * sizeof(float)))
        << what;
  }
}

TEST(TelemetryMerge, OneRankGivesItsOwnRowBack) {
  test::ProblemOptions o;
  o.rows = 257;
  o.special_fraction = 0.03;
  test::Problem p = test::make_problem(o);
  const Shards sh = run_shards(p, {257});
  const Merged m = merge(sh, p.num_seeds, p.chunk);
  for (std::size_t i = 0; i < m.telemetry.size(); ++i) {
    const float a = m.telemetry[i], b = sh.telemetry[i];
    EXPECT_TRUE(a == b || std::fabs(a - b) <= 2e-7f * std::fabs(b)) << "entry " << i << ": " << a
                                                                     << " vs " << b;
  }
  EXPECT_EQ(m.nonfinite, sh.nonfinite);
}

TEST(TelemetryMerge, NoFiniteValuesAndNoRows) {
  // An all-NaN chunk on one rank and an empty rank: SPEC section 4's values
  // for "no finite values" and for N = 0.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> all_nonfinite = {0, 0, inf, -inf, 0, 0, 6, 0.25f};
  const std::vector<float> unmeasured(8, nan);  // rows = 0: values are ignored
  std::vector<float> tel = all_nonfinite;
  tel.insert(tel.end(), unmeasured.begin(), unmeasured.end());
  std::vector<float> out(8, -1.0f);
  std::vector<int64_t> nf_out(1, -1);
  merge_telemetry(tel, std::vector<int64_t>{6, 0}, std::vector<int64_t>{2, 0}, 2, 1, 3, out, nf_out);
  EXPECT_EQ(out[kTelVariance], 0.0f);
  EXPECT_EQ(out[kTelMean], 0.0f);
  EXPECT_EQ(out[kTelMin], inf);
  EXPECT_EQ(out[kTelMax], -inf);
  EXPECT_EQ(out[kTelDeadRatio], 0.0f);
  EXPECT_EQ(out[kTelSignalToNoise], 0.0f);
  EXPECT_EQ(out[kTelNonfinite], 6.0f);
  EXPECT_EQ(out[kTelDrift], 0.25f);
  EXPECT_EQ(nf_out[0], 6);

  merge_telemetry(unmeasured, std::vector<int64_t>{0}, std::vector<int64_t>{0}, 1, 1, 3, out, nf_out);
  EXPECT_EQ(out[kTelDrift], 0.0f);
  EXPECT_EQ(out[kTelMin], inf);
  EXPECT_EQ(nf_out[0], 0);
}

TEST(TelemetryMerge, ChanMatchesDirectMoments) {
  // Two hand-made sets: {1, 2, 3} and {10, 20}.
  TelemetryMoments a = empty_moments(), b = empty_moments();
  a.count = 3; a.mean = 2; a.m2 = 2; a.min = 1; a.max = 3; a.rows = 1;
  b.count = 2; b.mean = 15; b.m2 = 50; b.min = 10; b.max = 20; b.rows = 1;
  const TelemetryMoments m = merge_moments(merge_moments(empty_moments(), a), b);
  EXPECT_EQ(m.count, 5);
  EXPECT_DOUBLE_EQ(m.mean, 36.0 / 5.0);
  // sum of squares 1+4+9+100+400 = 514; m2 = 514 - 5 * 7.2^2
  EXPECT_NEAR(m.m2, 514.0 - 5.0 * 7.2 * 7.2, 1e-12);
  EXPECT_EQ(m.min, 1);
  EXPECT_EQ(m.max, 20);
}

TEST(TelemetryMerge, InvalidInputsAreRefusedAndNothingIsWritten) {
  const std::vector<float> good = {1, 0, -1, 1, 0, 0, 0, 0};
  std::vector<float> out(8, -1.0f);
  std::vector<int64_t> nf_out(1, -1);
  auto expect_refused = [&](std::vector<float> tel, std::vector<int64_t> nf, std::vector<int64_t> rows,
                            int32_t ranks, int32_t seeds, int64_t chunk, const char* needle) {
    try {
      merge_telemetry(tel, nf, rows, ranks, seeds, chunk, out, nf_out);
      ADD_FAILURE() << "expected an error containing '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::value);
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_EQ(out, std::vector<float>(8, -1.0f)) << needle;
    EXPECT_EQ(nf_out[0], -1) << needle;
  };
  expect_refused(good, {5}, {1}, 1, 1, 4, "nonfinite must be in [0, rows * chunk = 4]");
  expect_refused(good, {-1}, {1}, 1, 1, 4, "nonfinite must be in");
  expect_refused(good, {0}, {-2}, 1, 1, 4, "rows must be >= 0");
  expect_refused(good, {0}, {1}, 1, 1, 0, "chunk must be > 0");
  expect_refused(good, {0, 0}, {1}, 1, 1, 4, "nonfinite must have 1 values");
  expect_refused(good, {0}, {1, 1}, 1, 1, 4, "rows must have 1 values");
  expect_refused(good, {0}, {1}, 2, 1, 4, "telemetry must have 16 values");
  std::vector<float> bad = good;
  bad[kTelVariance] = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> two = good;
  two.insert(two.end(), bad.begin(), bad.end());
  expect_refused(two, {0, 0}, {1, 1}, 2, 1, 4, "rank 1, seed 0: variance");
  bad = good;
  bad[kTelDeadRatio] = 1.5f;
  expect_refused(bad, {0}, {1}, 1, 1, 4, "dead_ratio");
  bad = good;
  bad[kTelMin] = 2.0f;
  expect_refused(bad, {0}, {1}, 1, 1, 4, "min <= max");
  bad = good;
  bad[kTelDrift] = std::numeric_limits<float>::infinity();
  expect_refused(bad, {0}, {1}, 1, 1, 4, "drift");
}

}  // namespace
}  // namespace kasmina
