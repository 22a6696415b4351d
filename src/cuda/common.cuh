// Shared pieces of the CUDA backend: storage conversions, vector access,
// mergeable statistics with fixed-order block reductions, the per-seed view
// of the table, and the host-side launch plan. Included by the .cu files of
// this folder only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda/tuning.hpp"
#include "kasmina/error.hpp"
#include "kasmina/ops.hpp"
#include "kasmina/params.hpp"
#include "kasmina/types.hpp"

namespace kasmina::cuda {

// ---------------------------------------------------------------- host side

// What the launch plan needs to know about a device; queried once per device
// (cudaGetDeviceProperties is far too slow for every call).
struct DeviceInfo {
  int ordinal = 0;
  int sm_count = 0;
  int cc_major = 0;
  int cc_minor = 0;
  std::string name;
};
// The current device's facts (cached, thread-safe).
const DeviceInfo& current_device_info();

// What the one selection point of the launch knobs reads, read once per
// call: the process's CudaLaunchConfig and the tuned entry of (device,
// element size, shape class) (one lookup of the tuned table under its
// mutex, not one per knob).
struct LaunchKnobs {
  CudaLaunchConfig set;
  CudaTunedEntry tuned;
  std::size_t elem_bytes;
  ShapeClass shape;
};
LaunchKnobs launch_knobs(const DeviceInfo& dev, DType dtype, int64_t rows, int64_t hidden);

// The rows in flight (ops.hpp): a nonzero CudaLaunchConfig field, else the
// tuned entry, else the architecture's default; `source` names which.
struct RowsChoice {
  int rows;
  const char* source;  // "set", "tuned" or "default"
};
RowsChoice select_rows_in_flight(bool forward, const DeviceInfo& dev, const LaunchKnobs& k);

// The forward variant and the TMA pipeline depth: a CudaLaunchConfig field,
// else the tuned entry, else the architecture's default for the shape class
// (tuning.hpp); stages 0 means "as many as the tuning's stage budget holds".
struct VariantChoice {
  CudaForwardVariant variant;
  int stages;
  const char* source;  // "set", "tuned" or "default"
};
VariantChoice select_forward_variant(const DeviceInfo& dev, const LaunchKnobs& k);

// The forward's lanes per row: a nonzero CudaLaunchConfig field, else the
// tuned entry, else the architecture's default for the element size and the
// row's vectors (tuning.hpp). The plan then caps it at the row's vectors
// rounded up to a power of two.
struct GroupChoice {
  int group;
  const char* source;  // "set", "tuned" or "default"
};
GroupChoice select_forward_group(const DeviceInfo& dev, const LaunchKnobs& k,
                                 int64_t vectors_per_row, bool vector_path);
// Threads per CTA of the forward: the set value, else the tuned entry, else
// the architecture's block_threads (tuning.hpp).
struct ThreadsChoice {
  int threads;
  const char* source;  // "set", "tuned" or "default"
};
ThreadsChoice select_forward_threads(const DeviceInfo& dev, const LaunchKnobs& k);

// CTAs of `func` (launched with `threads` and `smem_bytes` dynamic shared
// memory) one SM of the current device holds at once; cached per (kernel,
// shape, device), so the occupancy calculator runs once.
int resident_ctas_per_sm(const void* func, int threads, std::size_t smem_bytes);

// How one op's grid is shaped for given params. Every field is a pure
// function of (dtype, alignment, S, C, N, device), so two calls with equal
// arguments run the same reduction trees and give the same bits.
struct LaunchPlan {
  int vector = 1;         // elements per access (16 bytes on the vector path)
  int group = 1;          // threads per row group (power of two, <= 32)
  int rows_in_flight = 1;  // rows a thread loads before it computes on the first
  const char* rows_source = "default";  // select_rows_in_flight's source
  const char* group_source = "default";  // select_forward_group's source (forward)
  const char* threads_source = "default";  // select_forward_threads's source (forward)
  int rows_per_pass = 1;  // rows a CTA covers per pass (row groups x rows in flight)
  int threads = 0;        // group * rows_per_pass
  int tiles_max = 1;      // row tiles per seed the workspace is sized for
  int tiles = 1;          // row tiles per seed of this call (<= tiles_max)
  std::size_t smem_bytes = 0;  // dynamic shared memory per CTA
  int table_floats = 0;        // backward: coefficient table ahead of the sums
  // The kernel variant (forward: select_forward_variant; backward:
  // CudaLaunchConfig::backward_tma) and, for TMA, the pipeline depth; why
  // TMA was asked for but does not run.
  bool tma = false;
  int stages = 0;
  const char* variant_source = "default";
  const char* tma_refusal = nullptr;
  // Backward only: CONV's neighbours from a shared-memory halo
  // (CudaLaunchConfig::backward_conv_halo), or why it was asked for and not.
  bool conv_halo = false;
  const char* conv_halo_refusal = nullptr;
  // Backward only: shared blueprint rows summed from a list of their seeds
  // (CudaLaunchConfig::backward_row_list).
  bool row_list = false;
  // Programmatic dependent launch (pdl_prologue): asked for (the launch
  // config's programmatic_launch, read with the plan's other knobs) and, once
  // the kernel instance is known (finish_programmatic), whether it is taken;
  // programmatic_refusal says why not where it was asked for.
  bool programmatic_asked = false;
  bool programmatic = false;
  const char* programmatic_refusal = nullptr;
  // The TMA forward only: y by TMA store (CudaLaunchConfig::forward_tma_store
  // or the tuning's default for the shape class: asked for where the TMA
  // forward runs, then decided by forward_tma_finish), or why it was asked
  // for and not, and whether it was set or the default; and the dependents
  // launched at the CTAs' exit (forward_late_dependents; automatic: with the
  // store, so late_auto drops it where the store is refused).
  bool tma_store = false;
  const char* tma_store_refusal = nullptr;
  const char* tma_store_source = "default";
  bool late_dependents = false;
  bool late_auto = false;
  // The TMA forward without the store whose two x stages exceed the shared
  // memory every architecture gives (wide chunks: a float32 C = 192 or 256
  // box): they take the tuning's opt-in (forward_tma_finish).
  bool tma_x_opt_in = false;
  // The TMA forward's column blocks per box row (tma_row_boxes: 1 for
  // C <= 256, a 3-D tensor map beyond).
  int tma_boxes = 1;
};

// Whether `kernel` as it loads on `device` (the current one) was compiled
// for sm_90 or newer (not JIT-compiled from compute_80 PTX, where a TMA
// kernel's body is empty and no kernel has griddepcontrol). Cached per
// kernel and device.
bool kernel_has_sm90_code(const void* kernel, int device);

// Decides plan.programmatic for a launch of `kernel` (DESIGN 55): asked for,
// compute capability 9.0 or newer, and the kernel as it loads carries sm_90
// code (code JIT-compiled from compute_80 PTX has no griddepcontrol.wait, so
// it must not start before its predecessor ends).
void finish_programmatic(LaunchPlan& plan, const void* kernel, const DeviceInfo& dev);
// The describe text of that decision.
std::string programmatic_text(const LaunchPlan& plan);

// Launches `kernel` on `stream` with the plan's programmatic decision; a
// launch failure is raised as the library's error.
template <typename... P, typename... A>
void launch_kernel(void (*kernel)(P...), const LaunchPlan& plan, unsigned grid, std::size_t smem,
                   void* stream, A&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(static_cast<unsigned>(plan.threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  if (plan.programmatic) {
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
  }
  const cudaError_t rc = cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
  if (rc != cudaSuccess) {
    (void)cudaGetLastError();  // the launch error is not sticky: leave none behind
    KASMINA_FAIL(ErrorKind::runtime, "CUDA kernel launch failed: ", cudaGetErrorString(rc), " (",
                 cudaGetErrorName(rc), ")");
  }
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(kVectorBytes) == 0;
}

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < kMaxGroupThreads) p *= 2;
  return p;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether every tensor of an op allows the 16-byte vector path: C a multiple
// of the vector, every base pointer 16-byte aligned, every row stride (in
// elements) a multiple of 16 bytes. `what` names the pointers in the reason
// ("x or y", "x, dy or dx").
struct VectorAccess {
  bool vector;
  const char* why;
};
template <std::size_t K>
VectorAccess vector_access(int64_t C, std::size_t elem_bytes, const void* const (&ptrs)[K],
                           const int64_t (&strides)[K], const char* unaligned_why) {
  const auto esize = static_cast<int64_t>(elem_bytes);
  if (C % (kVectorBytes / esize) != 0) return {false, "C is not a multiple of the 16-byte vector"};
  for (const void* ptr : ptrs) {
    if (!aligned16(ptr)) return {false, unaligned_why};
  }
  for (int64_t stride : strides) {
    if ((stride * esize) % kVectorBytes != 0) return {false, "a row stride is not a multiple of 16 bytes"};
  }
  return {true, "C, base pointers and row strides allow 16-byte access"};
}

// Calls f(T{}) with T the CUDA storage type of dtype (float, __nv_bfloat16,
// __half); float64 and anything else is refused with the library's error.
template <typename F>
decltype(auto) with_storage_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: return f(float{});
    case DType::bf16: return f(__nv_bfloat16{});
    case DType::f16: return f(__half{});
    case DType::f64: break;
  }
  KASMINA_FAIL(ErrorKind::type, "the CUDA backend takes float32, bfloat16 or float16 (got ",
               dtype_name(dtype), ")");
}


inline std::size_t align_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

// Row tiles per seed the workspace is sized for: the resident CTAs of the
// device shared out over the seeds (rounded down, so the grid stays one
// wave), at least 1, at most the tuning's bound. Depends on S and the device
// only, never on N.
inline int tiles_per_seed_bound(int32_t num_seeds, const Tuning& t, int sm_count) {
  const int64_t target = static_cast<int64_t>(t.ctas_per_sm) * sm_count;
  int64_t per_seed = target / num_seeds;
  if (per_seed < 1) per_seed = 1;
  if (per_seed > t.max_tiles_per_seed) per_seed = t.max_tiles_per_seed;
  return static_cast<int>(per_seed);
}

// Tiles of one call: no more than the workspace bound, than the CTAs the
// device holds at once shared out over the seeds (one wave: the row passes
// are split evenly, so a partial second wave would double its CTAs' time),
// or than there are row passes (small N launches few CTAs); at least 1 (N = 0
// still writes telemetry and zero gradients).
inline int tiles_for_rows(int64_t rows, int rows_per_pass, int tiles_max, int resident_per_sm,
                          int sm_count, int32_t num_seeds) {
  int64_t tiles = tiles_max;
  const int64_t wave = static_cast<int64_t>(resident_per_sm) * sm_count / num_seeds;
  if (wave < tiles) tiles = wave;
  const int64_t passes = ceil_div(rows, rows_per_pass);
  if (passes < tiles) tiles = passes;
  return static_cast<int>(tiles < 1 ? 1 : tiles);
}

// The plan's tiles for a kernel instance: its resident CTAs per SM with the
// plan's threads and shared memory (tiles_for_rows).
inline int tiles_for_kernel(const void* kernel, const LaunchPlan& plan, int64_t rows,
                            int32_t num_seeds, int sm_count) {
  const int resident = resident_ctas_per_sm(kernel, plan.threads, plan.smem_bytes);
  return tiles_for_rows(rows, plan.rows_per_pass, plan.tiles_max, resident, sm_count, num_seeds);
}

// -------------------------------------------------------------- device side

// The first statement of every kernel (DESIGN 55). A kernel launched with
// programmatic dependent launch may start while the kernel before it on the
// stream is still running: griddepcontrol.wait blocks until that kernel has
// completed and its memory operations are visible, so nothing below it reads
// or writes global memory early and the results are those of a plain launch.
// Then griddepcontrol.launch_dependents lets the next kernel on the stream,
// if it too was launched that way, start its CTAs (they wait in turn), so
// its launch latency overlaps this kernel's work. Both are no-ops for a
// kernel launched without the attribute, and are compiled out below sm_90
// (the host never asks for the attribute there: finish_programmatic).
// A kernel that lets its dependents start only at its CTAs' exit
// (CudaLaunchConfig::forward_late_dependents) calls pdl_wait alone.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_prologue() {
  pdl_wait();
  pdl_launch_dependents();
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// V consecutive elements as one access: 16 bytes on the vector path (the
// caller guarantees the alignment), one element on the scalar path. The
// 16 bytes travel as a uint4.
template <typename T, int V>
using RawVec = std::conditional_t<V == 1, T, uint4>;

template <typename T>
__device__ __forceinline__ float half_bits_to_float(unsigned bits);
template <>
__device__ __forceinline__ float half_bits_to_float<__nv_bfloat16>(unsigned bits) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(bits)));
}
template <>
__device__ __forceinline__ float half_bits_to_float<__half>(unsigned bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
template <typename T>
__device__ __forceinline__ unsigned float_to_half_bits(float v);
template <>
__device__ __forceinline__ unsigned float_to_half_bits<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
template <>
__device__ __forceinline__ unsigned float_to_half_bits<__half>(float v) {
  return __half_as_ushort(__float2half_rn(v));
}

// Two floats rounded to T (nearest even, as float_to_half_bits) and packed,
// lo in the low 16 bits: one cvt.rn.{bf16x2,f16x2}.f32 instead of two
// conversions and a merge.
template <typename T>
__device__ __forceinline__ unsigned pack2_rn(float lo, float hi);
template <>
__device__ __forceinline__ unsigned pack2_rn<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&v);
}
template <>
__device__ __forceinline__ unsigned pack2_rn<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&v);
}

// Two T values packed in 32 bits (element 0 low): their min / max in one
// instruction (min.{bf16x2,f16x2}: exact, and -0 below +0 as fminf), the
// dead test |x| <= threshold as a lane mask, the halves as floats, and the
// packed +-infinity that start a running min / max. Float32 has none (never
// called; the constants only fill the fields).
template <typename T>
struct Packed2 {
  static constexpr unsigned kPosInf = 0u;
  static constexpr unsigned kNegInf = 0u;
  __device__ __forceinline__ static unsigned splat_rd(float) { return 0u; }
};
// The operations on the packed pair type V2 (__nv_bfloat162, __half2) that
// both 16-bit types share.
template <typename V2>
struct Packed2Ops {
  __device__ __forceinline__ static V2 pair(const unsigned& a) {
    return *reinterpret_cast<const V2*>(&a);
  }
  __device__ __forceinline__ static unsigned bits(const V2& r) {
    return *reinterpret_cast<const unsigned*>(&r);
  }
  __device__ __forceinline__ static unsigned min2(unsigned a, unsigned b) {
    return bits(__hmin2(pair(a), pair(b)));
  }
  __device__ __forceinline__ static unsigned max2(unsigned a, unsigned b) {
    return bits(__hmax2(pair(a), pair(b)));
  }
  // |a| <= t per lane as a 0xffff / 0 mask (t: splat_rd's packed bound).
  __device__ __forceinline__ static unsigned abs_le_mask(unsigned a, unsigned t) {
    return __hle2_mask(__habs2(pair(a)), pair(t));
  }
  __device__ __forceinline__ static unsigned splat(unsigned short b) {
    return static_cast<unsigned>(b) | (static_cast<unsigned>(b) << 16);
  }
};
template <>
struct Packed2<__nv_bfloat16> : Packed2Ops<__nv_bfloat162> {
  static constexpr unsigned kPosInf = 0x7f807f80u;
  static constexpr unsigned kNegInf = 0xff80ff80u;
  // The largest bfloat16 <= v in both lanes: for a bfloat16 x,
  // |x| <= v exactly when |x| <= splat_rd(v) (NaN: never).
  __device__ __forceinline__ static unsigned splat_rd(float v) {
    return splat(__bfloat16_as_ushort(__float2bfloat16_rd(v)));
  }
  __device__ __forceinline__ static float low(unsigned v) { return __uint_as_float(v << 16); }
  __device__ __forceinline__ static float high(unsigned v) {
    return __uint_as_float(v & 0xffff0000u);
  }
};
template <>
struct Packed2<__half> : Packed2Ops<__half2> {
  static constexpr unsigned kPosInf = 0x7c007c00u;
  static constexpr unsigned kNegInf = 0xfc00fc00u;
  __device__ __forceinline__ static unsigned splat_rd(float v) {
    return splat(__half_as_ushort(__float2half_rd(v)));
  }
  __device__ __forceinline__ static float low(unsigned v) { return half_bits_to_float<__half>(v & 0xffffu); }
  __device__ __forceinline__ static float high(unsigned v) { return half_bits_to_float<__half>(v >> 16); }
};

// The V values of a raw access as floats (element 0 in the lowest bits).
template <typename T, int V>
__device__ __forceinline__ void decode_vec(const RawVec<T, V>& raw, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_float<T>(raw);
  } else {
    static_assert(sizeof(T) * V == 16, "the vector path moves 16 bytes");
    const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int k = 0; k < 4; ++k) out[k] = __uint_as_float(w[k]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      // A bfloat16 is the high half of its float32: one shift or one mask
      // per value (the compiler's conversion of the high half shifts twice).
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        out[2 * k] = __uint_as_float(w[k] << 16);
        out[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        out[2 * k] = half_bits_to_float<T>(w[k] & 0xffffu);
        out[2 * k + 1] = half_bits_to_float<T>(w[k] >> 16);
      }
    }
  }
}

// V floats rounded to T (round to nearest even) as one raw access.
template <typename T, int V>
__device__ __forceinline__ RawVec<T, V> encode_vec(const float (&in)[V]) {
  if constexpr (V == 1) {
    return from_float<T>(in[0]);
  } else {
    static_assert(sizeof(T) * V == 16, "the vector path moves 16 bytes");
    unsigned w[4];
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int k = 0; k < 4; ++k) w[k] = __float_as_uint(in[k]);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) w[k] = pack2_rn<T>(in[2 * k], in[2 * k + 1]);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

template <typename T, int V>
__device__ __forceinline__ RawVec<T, V> load_raw(const T* p) {
  return *reinterpret_cast<const RawVec<T, V>*>(p);
}
// The vector store through __stwb (st.global.wb.v4, the default caching):
// a plain uint4 assignment is a struct store the compiler may split into
// four 32-bit stores.
template <typename T, int V>
__device__ __forceinline__ void store_raw(T* p, const RawVec<T, V>& raw) {
  if constexpr (V == 1) {
    *p = raw;
  } else {
    __stwb(reinterpret_cast<uint4*>(p), raw);
  }
}

// The same into shared memory (the TMA forward's y stage): one
// st.shared.v4 (__stwb's st.global would fault on a shared address, and a
// plain uint4 assignment may be split).
template <typename T, int V>
__device__ __forceinline__ void store_raw_shared(T* p, const RawVec<T, V>& raw) {
  if constexpr (V == 1) {
    *p = raw;
  } else {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(
                     static_cast<unsigned>(__cvta_generic_to_shared(p))),
                 "r"(raw.x), "r"(raw.y), "r"(raw.z), "r"(raw.w)
                 : "memory");
  }
}

template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[V]) {
  decode_vec<T, V>(load_raw<T, V>(p), out);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[V]) {
  store_raw<T, V>(p, encode_vec<T, V>(in));
}

// Ask L2 for the line holding p (no register, no wait): the loads of the
// next row pass are on their way while this pass computes.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

template <typename T>
__device__ __forceinline__ float load_one(const T* p) {
  return to_float<T>(*p);
}

// Population moments, merged by Chan's formula. The count is 64-bit: a
// seed's chunk may hold more than 2^32 values.
//
// The merge is branch-free with a fast division (2 ulp; the weight only
// scales the update, as in ThreadMoments): the block reductions chain eight
// or nine merges, and with a branch per empty side and an IEEE division each
// a CTA's reduction took 3000-4500 cycles on the H100, microseconds of every
// launch's tail (docs/DESIGN.md 58). Both sides' results are computed and
// the empty cases selected, so an empty side changes nothing, bit for bit
// (and a huge mean cannot turn an empty merge into inf * 0).
struct Moments {
  unsigned long long n;
  float mean;
  float m2;

  __device__ __forceinline__ static Moments identity() { return {0ull, 0.0f, 0.0f}; }
  __device__ __forceinline__ void merge(const Moments& b) {
    const unsigned long long total = n + b.n;
    const float frac_b = __fdividef(static_cast<float>(b.n), static_cast<float>(total));
    const float delta = b.mean - mean;
    const float mean_ab = fmaf(delta, frac_b, mean);
    const float m2_ab = fmaf(delta * delta, static_cast<float>(n) * frac_b, m2 + b.m2);
    mean = b.n == 0 ? mean : (n == 0 ? b.mean : mean_ab);
    m2 = b.n == 0 ? m2 : (n == 0 ? b.m2 : m2_ab);
    n = total;
  }
  __device__ __forceinline__ Moments shfl_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, n, offset), __shfl_down_sync(0xffffffffu, mean, offset),
            __shfl_down_sync(0xffffffffu, m2, offset)};
  }
};

// One thread's running moments on the hot path: a 32-bit count (a thread
// never sees 2^24 values, so the float conversions are exact) and a fast
// division for the merge weight (2 ulp; the weight only scales the update).
// Converted to Moments for the block reduction.
struct ThreadMoments {
  unsigned n;
  float mean;
  float m2;

  // Merge a batch of `cnt` values with mean `mean_b` and M2 `m2_b` (Chan).
  __device__ __forceinline__ void add_batch(unsigned cnt, float mean_b, float m2_b) {
    if (cnt == 0) return;
    const unsigned total = n + cnt;
    const float frac_b = __fdividef(static_cast<float>(cnt), static_cast<float>(total));
    const float delta = mean_b - mean;
    mean = mean + delta * frac_b;
    m2 = m2 + m2_b + delta * delta * static_cast<float>(n) * frac_b;
    n = total;
  }
  __device__ __forceinline__ Moments to_moments() const { return {n, mean, m2}; }
};

// Sum over the threads of a row group (width G, a power of two, within a
// warp). A butterfly: every lane gets the same bits, because each step adds
// the same two values (commutativity is exact).
__device__ __forceinline__ float group_sum(float v, int group) {
  for (int off = group / 2; off >= 1; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off, group);
  return v;
}
__device__ __forceinline__ double group_sum(double v, int group) {
  for (int off = group / 2; off >= 1; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off, group);
  return v;
}

// A seed's ticket (thread 0 of a CTA, once its CTA's partials are stored:
// its own directly, the other threads' before a __syncthreads). Release:
// those stores are visible at GPU scope before the count moves (the barrier
// makes the other threads' stores the caller's to release, as CUTLASS's
// semaphore does); acquire: the CTA that takes the last ticket sees every
// other CTA's partials once its threads pass a __syncthreads after this.
// One fenced atomic where a __threadfence before and another after the
// ticket each took 0.7 us of the tail (docs/DESIGN.md 58).
__device__ __forceinline__ unsigned take_ticket(unsigned* ticket) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(ticket) : "memory");
  return old;
}

// Fixed-order reduction over a warp (every lane calls it) of any type with
// merge()/shfl_down(): a shuffle tree whose result is valid in lane 0.
// Rolled: the tree as a loop, not unrolled (same order, same bits): a fifth
// of the code, for reductions that run once from code cold in the
// instruction cache (DESIGN 60).
template <bool Rolled = false, typename S>
__device__ __forceinline__ S warp_reduce(S v) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll(Rolled ? 1 : 5)
  for (int off = 16; off >= 1; off /= 2) {
    const S other = v.shfl_down(off);
    if (lane + off < 32) v.merge(other);
  }
  return v;
}

// Fixed-order reduction over the CTA of any type with merge()/shfl_down()
// and identity(): a shuffle tree in each warp, then warp 0 merges the warp
// results in warp order. The result is valid in thread 0. blockDim.x must be
// a multiple of 32 and at most 256. Rolled: as in warp_reduce.
template <bool Rolled = false, typename S>
__device__ S block_reduce(S v, S* scratch /* [8] */) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int warps = static_cast<int>(blockDim.x) >> 5;
  v = warp_reduce<Rolled>(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : S::identity();
#pragma unroll(Rolled ? 1 : 3)
    for (int off = 4; off >= 1; off /= 2) {
      const S other = v.shfl_down(off);
      if (lane + off < 8) v.merge(other);
    }
  }
  return v;
}

struct SumF {
  float v;
  __device__ __forceinline__ static SumF identity() { return {0.0f}; }
  __device__ __forceinline__ void merge(const SumF& b) { v += b.v; }
  __device__ __forceinline__ SumF shfl_down(int off) const {
    return {__shfl_down_sync(0xffffffffu, v, off)};
  }
};
struct MaxF {
  float v;
  __device__ __forceinline__ static MaxF identity() { return {-INFINITY}; }
  __device__ __forceinline__ void merge(const MaxF& b) { v = fmaxf(v, b.v); }
  __device__ __forceinline__ MaxF shfl_down(int off) const {
    return {__shfl_down_sync(0xffffffffu, v, off)};
  }
};

// Block-wide sum / max broadcast to every thread.
template <bool Rolled = false>
__device__ __forceinline__ float block_sum_all(float v, SumF* scratch, float* bcast) {
  const SumF r = block_reduce<Rolled>(SumF{v}, scratch);
  if (threadIdx.x == 0) *bcast = r.v;
  __syncthreads();
  const float out = *bcast;
  __syncthreads();
  return out;
}
template <bool Rolled = false>
__device__ __forceinline__ float block_max_all(float v, MaxF* scratch, float* bcast) {
  const MaxF r = block_reduce<Rolled>(MaxF{v}, scratch);
  if (threadIdx.x == 0) *bcast = r.v;
  __syncthreads();
  const float out = *bcast;
  __syncthreads();
  return out;
}

// One seed's view of the table and the registry, the same in every thread
// of the CTA (the branches on it are uniform).
struct SeedView {
  int stage;
  int kind;
  int blueprint;
  float alpha;    // raw
  float a;        // clamp(alpha, 0, 1)
  bool blends;    // SPEC section 3
  bool grafted;   // SPEC section 7: grads with the real a, and dalpha
  bool shadow;    // TRAINING: grads as if a = 1
  const float* w; // w_b, C floats
  float sigma;
  float w0, w1, w2;  // CONV taps (0 when C < 3 or not CONV)
  float att_max;     // ATTENTION: max_j w_j and sum_j exp(w_j - max)
  float att_sum;
  // The forward's 16-bit drift sums D - drift_k X instead of D = T - X
  // (DESIGN 28): drift_k near T's slope along X keeps the sums off the
  // cancellation of a D nearly parallel to X. Set by the forward's setup.
  float drift_k;
};

__device__ __forceinline__ SeedView load_seed_view(const SeedTable& table,
                                                    const RegistryView& registry, int s, int C) {
  SeedView v;
  v.stage = table.stage[s];
  v.kind = table.kind[s];
  v.blueprint = table.blueprint[s];
  v.alpha = table.alpha[s];
  // fminf/fmaxf would turn a NaN alpha into 0; SPEC's clamp is std::clamp.
  v.a = v.alpha < 0.0f ? 0.0f : (v.alpha > 1.0f ? 1.0f : v.alpha);
  const bool has = v.blueprint != 0;
  v.blends = has && stage_blends(v.stage);
  v.grafted = has && stage_trains_grafted(v.stage);
  v.shadow = has && stage_trains_shadow(v.stage);
  v.w = registry.weights + static_cast<int64_t>(v.blueprint) * C;
  v.sigma = registry.scales[v.blueprint];
  const bool conv = v.kind == static_cast<int>(Kind::conv) && C >= 3;
  v.w0 = conv ? v.w[0] : 0.0f;
  v.w1 = conv ? v.w[1] : 0.0f;
  v.w2 = conv ? v.w[2] : 0.0f;
  v.att_max = 0.0f;
  v.att_sum = 1.0f;
  v.drift_k = 1.0f;
  return v;
}

// ATTENTION's softmax normaliser over the blueprint's C weights, computed by
// the whole CTA (call uniformly). Shifted by the maximum so exp never
// overflows, like the reference.
template <bool Rolled = false>
__device__ __forceinline__ void compute_softmax(SeedView& v, int C, SumF* sum_scratch,
                                                MaxF* max_scratch, float* bcast) {
  float m = -INFINITY;
  for (int j = static_cast<int>(threadIdx.x); j < C; j += static_cast<int>(blockDim.x)) {
    m = fmaxf(m, v.w[j]);
  }
  v.att_max = block_max_all<Rolled>(m, max_scratch, bcast);
  float s = 0.0f;
  for (int j = static_cast<int>(threadIdx.x); j < C; j += static_cast<int>(blockDim.x)) {
    s += expf(v.w[j] - v.att_max);
  }
  v.att_sum = block_sum_all<Rolled>(s, sum_scratch, bcast);
}

__device__ __forceinline__ float softmax_p(const SeedView& v, int j) {
  return expf(v.w[j] - v.att_max) / v.att_sum;
}

// std::max(v, 0) of the reference: a NaN stays NaN.
__device__ __forceinline__ float relu(float v) { return v < 0.0f ? 0.0f : v; }

// Per-CTA table of the blueprint coefficient each column needs: w_j for
// RESIDUAL and MLP, p_j = softmax(w)_j for ATTENTION (CONV reads w0..w2
// only). Built once per CTA in shared memory, so the hot loop does one
// shared load per element instead of a global load (and an exp and a
// division for ATTENTION). Call uniformly; a __syncthreads must follow.
__device__ __forceinline__ void fill_coef_table(const SeedView& v, int C, float* table) {
  for (int j = static_cast<int>(threadIdx.x); j < C; j += static_cast<int>(blockDim.x)) {
    table[j] = v.kind == static_cast<int>(Kind::attention) ? softmax_p(v, j) : v.w[j];
  }
}
// The coefficient of column j from the table, or computed when the chunk is
// too wide for one (table == nullptr).
__device__ __forceinline__ float coef_at(const SeedView& v, const float* table, int j) {
  if (table != nullptr) return table[j];
  return v.kind == static_cast<int>(Kind::attention) ? softmax_p(v, j) : v.w[j];
}

// The float expressions that several kernel instances compute for the same
// value (the forward's Y, the backward's clamp mask, CONV's sums, with and
// without the shared-memory halo) are written as explicit fused multiply-adds:
// left to the compiler, contraction may differ between instances and so
// would the bits (DESIGN 53).
template <typename F>
__device__ __forceinline__ F conv_sum(F w0, F w1, F w2, F x, F xm1, F xm2) {
  return fma(w2, xm2, fma(w1, xm1, w0 * x));
}
// Y = a T + (1 - a) X, with b = 1 - a.
__device__ __forceinline__ float blend_value(float a, float b, float t, float x) {
  return fmaf(a, t, b * x);
}

// SPEC section 3: T at one column from its X, X one and two columns to the
// left (0 at the chunk start; only CONV reads them) and its coefficient.
__device__ __forceinline__ float seed_transform(const SeedView& v, float coef, float x, float xm1,
                                                float xm2) {
  switch (v.kind) {
    case static_cast<int>(Kind::residual): return fmaf(v.sigma, coef, x);
    case static_cast<int>(Kind::attention): return x * coef;
    case static_cast<int>(Kind::mlp): return v.sigma * relu(x * coef);
    default: return v.sigma * conv_sum(v.w0, v.w1, v.w2, x, xm1, xm2);
  }
}

// The row loops' variants, one per seed kind (and, in the forward, copy),
// chosen once per CTA by a uniform switch: the per-element code has no test
// of the kind, of the stage or of the clamp. `wide` runs RESIDUAL,
// ATTENTION and MLP without the coefficient table (C too wide for it).
enum class Mode { copy, residual, attention, mlp, conv, wide };

// T at one column for mode M (SPEC section 3), from its X, X one and two
// columns to the left (CONV only) and its coefficient (the table's, or for
// `wide` coef_at's): the same float operations in the forward, the
// backward's clamp mask and the drift's float64 fallback.
template <Mode M>
__device__ __forceinline__ float mode_transform(const SeedView& sv, float coef, float x,
                                                float xm1, float xm2) {
  if constexpr (M == Mode::residual) {
    return fmaf(sv.sigma, coef, x);
  } else if constexpr (M == Mode::attention) {
    return x * coef;
  } else if constexpr (M == Mode::mlp) {
    return sv.sigma * relu(x * coef);
  } else if constexpr (M == Mode::conv) {
    return sv.sigma * conv_sum(sv.w0, sv.w1, sv.w2, x, xm1, xm2);
  } else {
    return seed_transform(sv, coef, x, 0.0f, 0.0f);
  }
}

// The coefficient of column j for mode M: the table's w_j or p_j,
// computed for `wide`, none for CONV.
template <Mode M>
__device__ __forceinline__ float mode_coef(const SeedView& sv, const float* table, int j) {
  if constexpr (M == Mode::residual || M == Mode::attention || M == Mode::mlp) {
    return table[j];
  } else if constexpr (M == Mode::wide) {
    return coef_at(sv, nullptr, j);
  } else {
    return 0.0f;
  }
}

// The coefficients of columns c .. c+V-1 for mode M: from the table as
// 16-byte shared loads where V is a multiple of 4 (the vector path: c is a
// multiple of V, and both kernels place the table 16-byte aligned), else
// one at a time. The same values as mode_coef, fewer instructions.
template <Mode M, int V>
__device__ __forceinline__ void mode_coefs(const SeedView& sv, const float* table, int c,
                                           float (&coef)[V]) {
  if constexpr ((M == Mode::residual || M == Mode::attention || M == Mode::mlp) && V % 4 == 0) {
    const float4* t4 = reinterpret_cast<const float4*>(table + c);
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      const float4 f = t4[q];
      coef[4 * q] = f.x;
      coef[4 * q + 1] = f.y;
      coef[4 * q + 2] = f.z;
      coef[4 * q + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) coef[i] = mode_coef<M>(sv, table, c + i);
  }
}

// SPEC section 3's clamp; a NaN stays NaN, as in torch.clamp.
__device__ __forceinline__ float clamp_output(bool enabled, float lo, float hi, float v) {
  if (!enabled) return v;
  if (v < lo) return lo;
  if (v > hi) return hi;
  return v;
}

// Loads of partial results another CTA wrote in this launch: through L2,
// never a stale L1 line.
template <typename T>
__device__ __forceinline__ T load_cg(const T* p) {
  return __ldcg(p);
}

}  // namespace kasmina::cuda
