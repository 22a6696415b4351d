// The fast CPU backend against the float64 reference (SPEC section 9) over
// shapes that are multiples of nothing, every dtype, kind and stage, clamp,
// clip, padded rows and special values; and bitwise determinism across runs
// and thread counts.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "support/harness.hpp"

namespace kasmina::test {
namespace {

constexpr DType kDtypes[] = {DType::f32, DType::bf16, DType::f16};

void run_forward(Problem& p, int threads) {
  ForwardParams params = p.forward_params();
  params.num_threads = threads;
  forward(params, Backend::cpu);
}

void run_backward(Problem& p, int threads) {
  BackwardParams params = p.backward_params();
  params.num_threads = threads;
  backward(params, Backend::cpu);
}

// Forward and backward of one random problem against the reference.
void expect_matches_reference(const ProblemOptions& options, const std::string& context) {
  Problem p = make_problem(options);
  run_forward(p, 0);
  expect_forward_matches(p, reference::forward(p.forward_params()), context);
  run_backward(p, 0);
  expect_backward_matches(p, reference::backward(p.backward_params()), context);
}

ProblemOptions options_for(int64_t rows, int64_t chunk, int32_t seeds, DType dtype, uint64_t rng_seed) {
  ProblemOptions o;
  o.rows = rows;
  o.chunk = chunk;
  o.num_seeds = seeds;
  o.dtype = dtype;
  o.rng_seed = rng_seed;
  o.num_blueprints = seeds + 2;
  return o;
}

TEST(CpuBackend, ShapeSweepMatchesReference) {
  // Every value of every axis appears; the largest products run in float32
  // only, so the executable stays fast on two cores.
  uint64_t rng_seed = 100;
  for (int64_t rows : {0, 1, 7, 1000}) {
    for (int64_t chunk : {3, 4, 48, 65, 1000}) {
      for (int32_t seeds : {1, 3, 16}) {
        const int64_t elements = rows * chunk * seeds;
        for (DType dtype : kDtypes) {
          const int64_t budget = dtype == DType::f32 ? 1'000'000 : 200'000;
          if (elements > budget) continue;
          ++rng_seed;
          expect_matches_reference(options_for(rows, chunk, seeds, dtype, rng_seed), "sweep");
        }
      }
    }
  }
}

TEST(CpuBackend, TinyChunksWithoutConv) {
  // C = 1 and 2 are legal when no seed is CONV (the harness swaps CONV out).
  for (int64_t chunk : {1, 2}) {
    for (DType dtype : kDtypes) {
      expect_matches_reference(options_for(7, chunk, 16, dtype, 7 + static_cast<uint64_t>(chunk)),
                               "tiny chunk");
    }
  }
}

TEST(CpuBackend, EveryKindAloneInEveryStage) {
  uint64_t rng_seed = 300;
  for (int32_t kind = 0; kind < kNumKinds; ++kind) {
    for (int32_t stage = 0; stage < kNumStages; ++stage) {
      ProblemOptions o = options_for(7, kind == static_cast<int32_t>(Kind::conv) ? 3 : 65, 3,
                                     kDtypes[stage % 3], ++rng_seed);
      o.only_kind = kind;
      o.only_stage = stage;
      o.clamp = stage % 2 == 0;
      expect_matches_reference(o, "one kind, one stage");
    }
    // One kind for every seed, each GRAFTING with its own blueprint row.
    ProblemOptions o = options_for(1000, 48, 3, DType::f32, ++rng_seed);
    o.only_kind = kind;
    o.mixed = false;
    expect_matches_reference(o, "unmixed");
  }
}

TEST(CpuBackend, ClampAndClip) {
  uint64_t rng_seed = 500;
  for (DType dtype : kDtypes) {
    for (bool clamp : {false, true}) {
      for (bool clip : {false, true}) {
        ProblemOptions o = options_for(1000, 48, 3, dtype, ++rng_seed);
        o.clamp = clamp;
        o.clip = clip;
        expect_matches_reference(o, "clamp/clip");
      }
    }
  }
}

TEST(CpuBackend, PaddedRowStride) {
  uint64_t rng_seed = 600;
  for (DType dtype : kDtypes) {
    ProblemOptions o = options_for(7, 65, 3, dtype, ++rng_seed);
    o.row_pad = 5;
    o.clamp = true;
    o.clip = true;
    expect_matches_reference(o, "padded rows");
  }
}

TEST(CpuBackend, SpecialValuesInTelemetry) {
  uint64_t rng_seed = 700;
  for (DType dtype : kDtypes) {
    for (int64_t chunk : {4, 65}) {
      ProblemOptions o = options_for(1000, chunk, 16, dtype, ++rng_seed);
      o.special_fraction = 0.02;
      Problem p = make_problem(o);
      run_forward(p, 0);
      expect_forward_matches(p, reference::forward(p.forward_params()), "special values");
    }
  }
}

TEST(CpuBackend, RowOffsetsAndSmallDriftMatchReference) {
  // The AVX2 row kernels sum each chunk's deviations from the seed's previous
  // chunk mean and fall back to two passes where that cancels; and take the
  // drift from y - λx with λ the previous row's <x,y>/||x||^2, with a second
  // sweep where that cancels. Rows whose means jump far apart, and seeds
  // that barely move their input, exercise both fallbacks and the fast paths.
  uint64_t rng_seed = 750;
  for (DType dtype : kDtypes) {
    for (int64_t chunk : {5, 48, 65}) {
      for (float alpha : {1e-3f, 0.5f}) {
        ProblemOptions o = options_for(300, chunk, 8, dtype, ++rng_seed);
        Problem p = make_problem(o);
        for (float& a : p.alpha) a = alpha;
        for (int64_t n = 0; n < p.rows; ++n) {
          // Every third row sits on a large offset of alternating sign.
          const double offset = n % 3 == 0 ? (n % 2 == 0 ? 3000.0 : -3000.0) : 0.0;
          for (int64_t j = 0; j < p.hidden; ++j) {
            const int64_t i = n * p.row_stride + j;
            p.x.set(i, p.x.get(i) + offset);
          }
        }
        run_forward(p, 2);
        expect_forward_matches(p, reference::forward(p.forward_params()), "row offsets, small drift");
        run_backward(p, 2);
        expect_backward_matches(p, reference::backward(p.backward_params()), "row offsets, small drift");
      }
    }
  }
}

TEST(CpuBackend, CommonOffsetAndSmallDriftMatchReference) {
  // The AVX2 forward derives ||x||^2 from the shifted sums, n k^2 + Σ(x-k)^2
  // + 2k Σ(x-k): with every row on one large offset n k^2 carries it all and
  // the drift (alpha small) must keep its precision; seeds counts of 8, 16
  // (the vectorised row end) and 11 (a partial group of 8).
  uint64_t rng_seed = 780;
  for (int32_t seeds : {8, 11, 16}) {
    for (double offset : {-500.0, 20.0}) {
      ProblemOptions o = options_for(257, 48, seeds, DType::f32, ++rng_seed);
      Problem p = make_problem(o);
      for (float& a : p.alpha) a = 1e-3f;
      for (int64_t n = 0; n < p.rows; ++n) {
        for (int64_t j = 0; j < p.hidden; ++j) {
          const int64_t i = n * p.row_stride + j;
          p.x.set(i, p.x.get(i) + offset);
        }
      }
      run_forward(p, 2);
      expect_forward_matches(p, reference::forward(p.forward_params()), "common offset, small drift");
    }
  }
}

TEST(CpuBackend, CopySeedsAreBitIdentical) {
  // A seed that does not blend copies its chunk: same bytes even for bf16/f16
  // NaN payloads, subnormals and signed zeros.
  uint64_t rng_seed = 800;
  for (DType dtype : kDtypes) {
    ProblemOptions o = options_for(7, 65, 16, dtype, ++rng_seed);
    o.special_fraction = 0.05;
    Problem p = make_problem(o);
    run_forward(p, 2);
    const std::size_t size = dtype_size(dtype);
    int32_t copies = 0;
    for (int32_t s = 0; s < p.num_seeds; ++s) {
      const auto us = static_cast<std::size_t>(s);
      if (stage_blends(p.stage[us]) && p.blueprint[us] != 0) continue;
      ++copies;
      for (int64_t n = 0; n < p.rows; ++n) {
        const auto first = static_cast<std::size_t>(n * p.row_stride + s * p.chunk) * size;
        EXPECT_EQ(std::memcmp(p.x.bytes.data() + first, p.y.bytes.data() + first,
                              static_cast<std::size_t>(p.chunk) * size),
                  0)
            << "seed " << s << " row " << n << " " << describe(o);
      }
    }
    EXPECT_GT(copies, 0) << "the problem should hold non-blending seeds, " << describe(o);
  }
}

TEST(CpuBackend, DeterministicAcrossRunsAndThreadCounts) {
  uint64_t rng_seed = 900;
  for (DType dtype : kDtypes) {
    for (bool clamp_and_clip : {false, true}) {
      ProblemOptions o = options_for(1000, 65, 16, dtype, ++rng_seed);
      o.clamp = clamp_and_clip;
      o.clip = clamp_and_clip;
      Problem base = make_problem(o);
      run_forward(base, 1);
      run_backward(base, 1);
      for (int threads : {1, 2, 3, 8}) {
        Problem again = base;
        again.poison_outputs();
        run_forward(again, threads);
        run_backward(again, threads);
        const std::string context = "threads=" + std::to_string(threads) + " vs 1";
        expect_forward_bits_equal(base, again, context);
        expect_backward_bits_equal(base, again, context);
      }
    }
  }
}

TEST(CpuBackend, DescribeSaysWhatRuns) {
  Problem p = make_problem(options_for(1000, 48, 3, DType::bf16, 1000));
  ForwardParams fp = p.forward_params();
  fp.num_threads = 3;
  const std::string forward_text = describe_forward(fp, Backend::cpu);
  EXPECT_NE(forward_text.find("cpu: one pass"), std::string::npos) << forward_text;
  EXPECT_NE(forward_text.find("3 threads"), std::string::npos) << forward_text;
  EXPECT_NE(forward_text.find("bf16"), std::string::npos) << forward_text;
  EXPECT_NE(forward_text.find("row kernels"), std::string::npos) << forward_text;
  BackwardParams bp = p.backward_params();
  bp.num_threads = 2;
  const std::string backward_text = describe_backward(bp, Backend::cpu);
  EXPECT_NE(backward_text.find("2 threads"), std::string::npos) << backward_text;
}

TEST(CpuBackend, GenericRowKernelsMatchReferenceAndThreadCounts) {
  // KASMINA_CPU_ISA=generic forces the baseline row kernels on a machine that
  // would run the AVX2 ones; both paths must meet SPEC section 9 and be
  // bit-identical across thread counts on their own.
  ASSERT_EQ(setenv("KASMINA_CPU_ISA", "generic", 1), 0);
  uint64_t rng_seed = 1200;
  for (DType dtype : kDtypes) {
    for (int64_t chunk : {3, 48, 65}) {
      ProblemOptions o = options_for(1000, chunk, 3, dtype, ++rng_seed);
      o.clamp = chunk == 65;
      o.clip = chunk == 65;
      expect_matches_reference(o, "generic isa");
    }
    ProblemOptions o = options_for(300, 65, 16, dtype, ++rng_seed);
    o.special_fraction = 0.02;
    Problem base = make_problem(o);
    run_forward(base, 1);
    run_backward(base, 1);
    for (int threads : {2, 3}) {
      Problem again = base;
      again.poison_outputs();
      run_forward(again, threads);
      run_backward(again, threads);
      expect_forward_bits_equal(base, again, "generic isa, threads=" + std::to_string(threads));
      expect_backward_bits_equal(base, again, "generic isa, threads=" + std::to_string(threads));
    }
  }
  const std::string text = describe_forward(make_problem(options_for(7, 48, 3, DType::f32, 1300)).forward_params(),
                                            Backend::cpu);
  unsetenv("KASMINA_CPU_ISA");
  EXPECT_NE(text.find("generic row kernels"), std::string::npos) << text;
}

// The scalar gradients (dalpha, dscale, CONV's taps) add N*C terms of both
// signs whose total can be far below their magnitudes; SPEC section 9's
// 1e-5 must hold on such random data too (DESIGN 45), on both row-kernel
// paths. With float32 terms, a search of 600 problems of these shapes found
// rng_seed 6750 (515x64x3, clamp and clip, generic path): dalpha rel error
// 1.46e-5; it is among the seeds below.
TEST(CpuBackend, ScalarGradientsMeetSpecOnCancellingSums) {
  for (const char* isa : {"", "generic"}) {
    if (*isa != 0) {
      ASSERT_EQ(setenv("KASMINA_CPU_ISA", isa, 1), 0);
    }
    for (uint64_t rng_seed = 6745; rng_seed <= 6755; ++rng_seed) {
      ProblemOptions o = options_for(515, 64, 3, DType::f32, rng_seed);
      o.clamp = true;
      o.clip = true;
      expect_matches_reference(o, std::string("cancelling sums, clamp and clip ") + isa);
    }
    for (uint64_t rng_seed = 6601; rng_seed <= 6604; ++rng_seed) {
      expect_matches_reference(options_for(3001, 48, 5, DType::f32, rng_seed),
                               std::string("cancelling sums ") + isa);
    }
    unsetenv("KASMINA_CPU_ISA");
  }
}

TEST(CpuBackend, EnvironmentSetsDefaultThreads) {
  Problem p = make_problem(options_for(7, 48, 3, DType::f32, 1100));
  ASSERT_EQ(setenv("KASMINA_NUM_THREADS", "5", 1), 0);
  const std::string text = describe_forward(p.forward_params(), Backend::cpu);
  unsetenv("KASMINA_NUM_THREADS");
  EXPECT_NE(text.find("5 threads"), std::string::npos) << text;
}

}  // namespace
}  // namespace kasmina::test
