// Internal: the scope the dispatcher (core/ops.cpp) opens around every
// forward and backward: an NVTX range always (CUDA builds), and with
// profiling on a timer charged to the kernel variant (kasmina/profile.hpp).
#pragma once

#include <chrono>
#include <string>

#include "kasmina/ops.hpp"
#include "kasmina/profile.hpp"

namespace kasmina::detail {

class OpScope {
 public:
  // `name` is a static string ("kasmina.forward"); `kernel` is called only
  // when profiling is on (the variant's name costs a describe()).
  template <typename KernelName>
  OpScope(const char* name, Backend backend, void* stream, double bytes, KernelName kernel)
      : backend_(backend), stream_(stream), bytes_(bytes) {
    if (profiling()) {
      // A profiler failure (naming the variant, creating events) leaves
      // this call untimed; it never fails the op.
      try {
        kernel_ = kernel();
        start();
        active_ = true;
      } catch (...) {
        active_ = false;
      }
    }
    range_push(name);  // last: nothing after it can throw, so the destructor pops it
  }
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;
  // Call when the op returned normally: only completed calls are charged.
  void done() { ok_ = true; }

 private:
  static void range_push(const char* name);
  void start();

  Backend backend_;
  void* stream_;
  double bytes_;
  bool active_ = false;
  bool ok_ = false;
  std::string kernel_;
  std::chrono::steady_clock::time_point t0_{};
  void* cuda_token_ = nullptr;
};

}  // namespace kasmina::detail
