// Device discovery for the CUDA backend: availability (never a crash on a
// machine without a GPU), device names, and the cached facts the launch plan
// needs.
#include <cuda_runtime.h>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backends.hpp"
#include "cuda/common.cuh"
#include "cuda/cuda_check.hpp"

namespace kasmina::cuda {

const DeviceInfo& current_device_info() {
  int device = 0;
  KASMINA_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  // unique_ptr: references handed out stay valid while the map grows.
  static std::map<int, std::unique_ptr<DeviceInfo>> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it == cache.end()) {
    auto info = std::make_unique<DeviceInfo>();
    info->ordinal = device;
    KASMINA_CUDA_CHECK(
        cudaDeviceGetAttribute(&info->sm_count, cudaDevAttrMultiProcessorCount, device));
    KASMINA_CUDA_CHECK(
        cudaDeviceGetAttribute(&info->cc_major, cudaDevAttrComputeCapabilityMajor, device));
    KASMINA_CUDA_CHECK(
        cudaDeviceGetAttribute(&info->cc_minor, cudaDevAttrComputeCapabilityMinor, device));
    cudaDeviceProp prop{};
    KASMINA_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    info->name = prop.name;
    it = cache.emplace(device, std::move(info)).first;
  }
  return *it->second;
}

LaunchKnobs launch_knobs(const DeviceInfo& dev, DType dtype, int64_t rows, int64_t hidden) {
  LaunchKnobs k{};
  k.set = cuda_launch_config();
  k.elem_bytes = dtype_size(dtype);
  k.shape = shape_class(rows, hidden, k.elem_bytes);
  k.tuned = cuda_tuned_lookup(dev.name, k.elem_bytes, k.shape);
  return k;
}

RowsChoice select_rows_in_flight(bool forward, const DeviceInfo& dev, const LaunchKnobs& k) {
  const int configured = forward ? k.set.forward_rows_in_flight : k.set.backward_rows_in_flight;
  if (configured != 0) return {configured, "set"};
  const int from_table = forward ? k.tuned.forward_rows_in_flight : k.tuned.backward_rows_in_flight;
  if (from_table != 0) return {from_table, "tuned"};
  const Tuning& t = tuning_for(dev.cc_major);
  if (!forward) return {t.backward_rows_in_flight, "default"};
  return {k.elem_bytes == 4 ? t.forward_rows_in_flight_4byte : t.forward_rows_in_flight_2byte,
          "default"};
}

GroupChoice select_forward_group(const DeviceInfo& dev, const LaunchKnobs& k,
                                 int64_t vectors_per_row, bool vector_path) {
  if (k.set.forward_group != 0) return {k.set.forward_group, "set"};
  // The scalar path (odd C or pointers) keeps the widest group by default:
  // its "vectors" are single elements, and `kasmina tune` measures the
  // vector path only.
  if (!vector_path) return {kForwardGroupThreads, "default"};
  if (k.tuned.forward_group != 0) return {k.tuned.forward_group, "tuned"};
  return {forward_group_default(tuning_for(dev.cc_major), k.elem_bytes, vectors_per_row), "default"};
}

ThreadsChoice select_forward_threads(const DeviceInfo& dev, const LaunchKnobs& k) {
  if (k.set.forward_block_threads != 0) return {k.set.forward_block_threads, "set"};
  if (k.tuned.forward_block_threads != 0) return {k.tuned.forward_block_threads, "tuned"};
  return {tuning_for(dev.cc_major).block_threads, "default"};
}

VariantChoice select_forward_variant(const DeviceInfo& dev, const LaunchKnobs& k) {
  VariantChoice c{};
  if (k.set.forward_variant != CudaForwardVariant::automatic) {
    c.variant = k.set.forward_variant;
    c.source = "set";
  } else if (k.tuned.forward_variant != CudaForwardVariant::automatic) {
    c.variant = k.tuned.forward_variant;
    c.source = "tuned";
  } else {
    const Tuning& t = tuning_for(dev.cc_major);
    const int* by_class = k.elem_bytes == 4 ? t.forward_variant_4byte : t.forward_variant_2byte;
    c.variant = static_cast<CudaForwardVariant>(by_class[static_cast<int>(k.shape)]);
    // The TMA kernel is sm_90a code: newer architectures share sm_90's
    // tuning otherwise, but keep the generic kernel by default.
    if (c.variant == CudaForwardVariant::tma && dev.cc_major != 9) {
      c.variant = CudaForwardVariant::generic;
    }
    c.source = "default";
  }
  c.stages = k.set.forward_stages != 0 ? k.set.forward_stages : k.tuned.forward_stages;
  return c;
}

int resident_ctas_per_sm(const void* func, int threads, std::size_t smem_bytes) {
  int device = 0;
  KASMINA_CUDA_CHECK(cudaGetDevice(&device));
  struct Key {
    const void* func;
    int threads;
    std::size_t smem;
    int device;
    bool operator<(const Key& o) const {
      if (func != o.func) return std::less<const void*>()(func, o.func);
      if (threads != o.threads) return threads < o.threads;
      if (smem != o.smem) return smem < o.smem;
      return device < o.device;
    }
  };
  static std::mutex mutex;
  static std::map<Key, int> cache;
  const Key key{func, threads, smem_bytes, device};
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    int ctas = 0;
    KASMINA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, func, threads, smem_bytes));
    KASMINA_CHECK_RUNTIME(ctas >= 1, "a kasmina CUDA kernel cannot be resident with ", threads,
                          " threads and ", smem_bytes, " bytes of shared memory");
    it = cache.emplace(key, ctas).first;
  }
  return it->second;
}

bool kernel_has_sm90_code(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, bool> cache;
  const std::pair<const void*, int> key{kernel, device};
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    cudaFuncAttributes attr{};
    KASMINA_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    it = cache.emplace(key, attr.ptxVersion >= 90).first;  // JIT from compute_80 reports 80
  }
  return it->second;
}

void finish_programmatic(LaunchPlan& plan, const void* kernel, const DeviceInfo& dev) {
  plan.programmatic = false;
  plan.programmatic_refusal = nullptr;
  if (!plan.programmatic_asked) return;
  if (dev.cc_major < 9) {
    plan.programmatic_refusal = "needs compute capability 9.0 or newer";
  } else if (!kernel_has_sm90_code(kernel, dev.ordinal)) {
    plan.programmatic_refusal = "the kernel runs without sm_90 code (JIT from compute_80 PTX)";
  } else {
    plan.programmatic = true;
  }
}

std::string programmatic_text(const LaunchPlan& plan) {
  if (plan.programmatic) return "programmatic dependent launch";
  if (plan.programmatic_refusal != nullptr)
    return std::string("plain launch (programmatic launch ") + plan.programmatic_refusal + ")";
  return "plain launch (programmatic_launch off)";
}

}  // namespace kasmina::cuda

namespace kasmina::detail {

namespace {
// cudaGetDeviceCount's verdict, taken once: a machine does not grow a GPU
// while a process runs, and the query costs a driver round trip.
struct Availability {
  int count = 0;
  cudaError_t status = cudaSuccess;
};
const Availability& availability() {
  static const Availability cached = [] {
    Availability a;
    a.status = cudaGetDeviceCount(&a.count);
    if (a.status != cudaSuccess) {
      a.count = 0;
      // Not sticky, but do not leave it for the next cudaGetLastError().
      (void)cudaGetLastError();
    }
    return a;
  }();
  return cached;
}
}  // namespace

bool cuda_available() { return availability().status == cudaSuccess && availability().count > 0; }

std::string cuda_unavailable_reason() {
  const Availability& a = availability();
  if (a.status != cudaSuccess) {
    return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(a.status) + " (" +
           cudaGetErrorName(a.status) + ")";
  }
  if (a.count == 0) return "no CUDA device is visible";
  return "";
}

bool cuda_stream_capturing(Stream stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  KASMINA_CUDA_CHECK(cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status));
  return status != cudaStreamCaptureStatusNone;
}

std::vector<std::string> cuda_device_names() {
  std::vector<std::string> names;
  if (!cuda_available()) return names;
  for (int d = 0; d < availability().count; ++d) {
    cudaDeviceProp prop{};
    KASMINA_CUDA_CHECK(cudaGetDeviceProperties(&prop, d));
    names.push_back(std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
                    std::to_string(prop.minor) + ", " + std::to_string(prop.multiProcessorCount) +
                    " SMs)");
  }
  return names;
}

}  // namespace kasmina::detail
