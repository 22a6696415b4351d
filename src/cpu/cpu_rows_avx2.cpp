// The row kernels for processors with AVX2 and F16C (picked at run time by
// select_isa): 8-wide float32 vectors, and hardware conversion of float16
// rows. No FMA: the sources are compiled with -ffp-contract=off, and the
// blend of the forward must match the backward's clamp mask bit for bit.
// Every header is included before the target pragma, so only the functions of
// cpu_rows.hpp (in namespace cpu::avx2) are compiled for AVX2; inline
// functions of the headers stay baseline code, safe to share at link time.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/cpu_kernels.hpp"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma")
#define KASMINA_CPU_ISA avx2
#define KASMINA_CPU_F16C 1
#define KASMINA_CPU_AVX2 1
#include "cpu/cpu_rows.hpp"
#pragma GCC pop_options
#else
// Not x86 or not GCC/Clang: select_isa never picks this path; these forward
// to the generic kernels so the program links.
namespace kasmina::detail::cpu::avx2 {
void forward_block(const ForwardJob& job, int64_t row_begin, int64_t row_end, TelemetryPartial* parts,
                   float* scratch) {
  generic::forward_block(job, row_begin, row_end, parts, scratch);
}
void backward_block(const BackwardJob& job, int64_t row_begin, int64_t row_end, GradPartial* parts,
                    float* acc_block, float* scratch) {
  generic::backward_block(job, row_begin, row_end, parts, acc_block, scratch);
}
}  // namespace kasmina::detail::cpu::avx2
#endif
