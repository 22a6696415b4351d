// The row kernels for any x86-64 (or other) processor: baseline code, SSE2 on
// x86-64. See cpu_rows.hpp.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/cpu_kernels.hpp"

#define KASMINA_CPU_ISA generic
#include "cpu/cpu_rows.hpp"
