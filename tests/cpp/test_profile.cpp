// The profiler (kasmina/profile.hpp) on the host backends: calls and bytes
// charged per kernel, nothing recorded while off, failed calls not charged,
// reset, and the report's table.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "kasmina/profile.hpp"
#include "support/harness.hpp"

namespace kasmina::test {
namespace {

class ProfileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    was_on_ = profiling();
    profile_reset();
  }
  void TearDown() override {
    set_profiling(was_on_);
    profile_reset();
  }
  bool was_on_ = false;
};

const ProfileEntry* find(const std::vector<ProfileEntry>& entries, const std::string& kernel) {
  for (const ProfileEntry& e : entries) {
    if (e.kernel == kernel) return &e;
  }
  return nullptr;
}

ProblemOptions options(DType dtype) {
  ProblemOptions o;
  o.rows = 37;
  o.chunk = 12;
  o.num_seeds = 3;
  o.dtype = dtype;
  o.rng_seed = 91;
  return o;
}

TEST_F(ProfileTest, OffRecordsNothing) {
  set_profiling(false);
  Problem p = make_problem(options(DType::f32));
  forward(p.forward_params(), Backend::cpu);
  backward(p.backward_params(), Backend::cpu);
  EXPECT_TRUE(profile_report().empty());
}

TEST_F(ProfileTest, ChargesCallsAndBytesPerKernel) {
  set_profiling(true);
  Problem p = make_problem(options(DType::bf16));
  for (int i = 0; i < 3; ++i) forward(p.forward_params(), Backend::cpu);
  backward(p.backward_params(), Backend::cpu);
  forward(p.forward_params(), Backend::reference);
  const std::vector<ProfileEntry> r = profile_report();
  ASSERT_EQ(r.size(), 3u) << format_profile(r);
  const double elems = 37.0 * 36.0;  // rows x hidden
  const ProfileEntry* f = find(r, "cpu.forward bfloat16");
  ASSERT_NE(f, nullptr) << format_profile(r);
  EXPECT_EQ(f->calls, 3);
  EXPECT_DOUBLE_EQ(f->bytes, 3 * elems * 2 * 2);  // x read, y written, 2 bytes each
  EXPECT_GT(f->total_us, 0.0);
  EXPECT_GT(f->gbps(), 0.0);
  const ProfileEntry* b = find(r, "cpu.backward bfloat16");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->calls, 1);
  EXPECT_DOUBLE_EQ(b->bytes, elems * 2 * 3);  // x and dy read, dx written
  ASSERT_NE(find(r, "reference.forward bfloat16"), nullptr);
  const std::string table = format_profile(r);
  EXPECT_NE(table.find("cpu.forward bfloat16"), std::string::npos) << table;
  EXPECT_NE(table.find("GB/s"), std::string::npos) << table;
  profile_reset();
  EXPECT_TRUE(profile_report().empty());
}

// Validation runs before the profiler's scope opens, so a refused call is
// never charged (a call that fails inside a backend after validation is
// discarded by the scope: SmallCuda.ProfilerTimesKernelsAndSkipsCaptures,
// with a workspace too small).
TEST_F(ProfileTest, RefusedCallsAreNotCharged) {
  set_profiling(true);
  Problem p = make_problem(options(DType::f32));
  ForwardParams bad = p.forward_params();
  bad.y = nullptr;
  EXPECT_THROW(forward(bad, Backend::cpu), Error);
  EXPECT_TRUE(profile_report().empty());
}

}  // namespace
}  // namespace kasmina::test
