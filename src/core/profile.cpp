// The profiler's bookkeeping (kasmina/profile.hpp): per-kernel totals, the
// GPU timings still pending, the switch and the report at exit.
#include "kasmina/profile.hpp"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <map>
#include <mutex>
#include <sstream>
#include <utility>
#include <vector>

#include "backends.hpp"
#include "core/profile_scope.hpp"

namespace kasmina {
namespace {

struct Pending {
  std::string kernel;
  double bytes;
  void* token;
};

struct State {
  std::mutex mutex;
  std::map<std::string, ProfileEntry> entries;
  std::vector<Pending> pending;  // GPU timings not yet read
};

State& state() {
  static State* s = new State;  // never destroyed: the exit report may run late
  return *s;
}

bool env_profiling() {
  const char* v = std::getenv("KASMINA_PROFILE");
  return v != nullptr && std::strcmp(v, "") != 0 && std::strcmp(v, "0") != 0;
}

std::atomic<bool>& switch_on() {
  static std::atomic<bool> on{env_profiling()};
  return on;
}

void charge(const std::string& kernel, double us, double bytes) {
  ProfileEntry& e = state().entries[kernel];
  e.kernel = kernel;
  e.calls += 1;
  e.total_us += us;
  e.bytes += bytes;
}

// Reads every pending GPU timing (waits for their stop events). Caller holds
// the mutex.
void resolve_pending_locked() {
#ifdef KASMINA_WITH_CUDA
  std::vector<Pending> pending;
  pending.swap(state().pending);
  for (std::size_t i = 0; i < pending.size(); ++i) {
    try {
      charge(pending[i].kernel, detail::cuda_timer_elapsed_us(pending[i].token), pending[i].bytes);
    } catch (...) {
      for (std::size_t j = i + 1; j < pending.size(); ++j) detail::cuda_timer_discard(pending[j].token);
      throw;
    }
  }
#endif
}

// Past this many pending GPU timings, the completed ones are read before
// more are queued, so the list stays small in long runs.
constexpr std::size_t kMaxPending = 1024;

// Reads the pending GPU timings whose stop event already completed (no
// wait); while more than kMaxPending / 2 would stay, it waits for the oldest
// (already behind the newer work on the stream). Caller holds the mutex.
[[maybe_unused]] void resolve_completed_locked() {
#ifdef KASMINA_WITH_CUDA
  std::vector<Pending>& pending = state().pending;
  std::vector<Pending> running;
  for (std::size_t i = 0; i < pending.size(); ++i) {
    const bool wait = i < pending.size() / 2 && pending.size() - i > kMaxPending / 2;
    if (wait || detail::cuda_timer_ready(pending[i].token)) {
      try {
        charge(pending[i].kernel, detail::cuda_timer_elapsed_us(pending[i].token), pending[i].bytes);
      } catch (...) {
        // The report lacks this call (the pair is freed by elapsed_us).
      }
    } else {
      running.push_back(pending[i]);
    }
  }
  pending.swap(running);
#endif
}

void report_at_exit() {
  try {
    const std::vector<ProfileEntry> entries = profile_report();
    if (!entries.empty()) std::fprintf(stderr, "%s", format_profile(entries).c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kasmina profile: report failed: %s\n", e.what());
  }
}

// The exit report is registered at the first profiled call (after the CUDA
// runtime started, so it runs before the runtime's own teardown).
void register_exit_report() {
  static const bool registered = [] {
    if (env_profiling()) std::atexit(report_at_exit);
    return true;
  }();
  (void)registered;
}

}  // namespace

void set_profiling(bool on) { switch_on().store(on); }
bool profiling() { return switch_on().load(std::memory_order_relaxed); }

std::vector<ProfileEntry> profile_report() {
  const std::lock_guard<std::mutex> lock(state().mutex);
  resolve_pending_locked();
  std::vector<ProfileEntry> out;
  for (const auto& [name, e] : state().entries) out.push_back(e);
  std::sort(out.begin(), out.end(), [](const ProfileEntry& a, const ProfileEntry& b) {
    return a.total_us != b.total_us ? a.total_us > b.total_us : a.kernel < b.kernel;
  });
  return out;
}

void profile_reset() {
  const std::lock_guard<std::mutex> lock(state().mutex);
#ifdef KASMINA_WITH_CUDA
  for (const Pending& p : state().pending) detail::cuda_timer_discard(p.token);
#endif
  state().pending.clear();
  state().entries.clear();
}

std::string format_profile(const std::vector<ProfileEntry>& entries) {
  std::ostringstream os;
  os << "kasmina profile (per kernel variant; bytes = each input read once, each output written once)\n";
  os << std::left << std::setw(56) << "kernel" << std::right << std::setw(8) << "calls"
     << std::setw(12) << "total_us" << std::setw(11) << "mean_us" << std::setw(12) << "MB"
     << std::setw(9) << "GB/s" << "\n";
  os << std::fixed;
  for (const ProfileEntry& e : entries) {
    os << std::left << std::setw(56) << e.kernel << std::right << std::setw(8) << e.calls
       << std::setw(12) << std::setprecision(1) << e.total_us << std::setw(11)
       << std::setprecision(2) << e.mean_us() << std::setw(12) << std::setprecision(2)
       << e.bytes / 1e6 << std::setw(9) << std::setprecision(0) << e.gbps() << "\n";
  }
  return os.str();
}

namespace detail {

void OpScope::range_push(const char* name) {
#ifdef KASMINA_WITH_CUDA
  cuda_range_push(name);
#else
  (void)name;
#endif
}

void OpScope::start() {
  register_exit_report();
#ifdef KASMINA_WITH_CUDA
  if (backend_ == Backend::cuda) {
    cuda_token_ = cuda_timer_start(stream_);
    return;
  }
#endif
  t0_ = std::chrono::steady_clock::now();
}

OpScope::~OpScope() {
  if (active_) {
    try {
      if (backend_ == Backend::cuda) {
#ifdef KASMINA_WITH_CUDA
        if (cuda_token_ != nullptr) {
          if (ok_) {
            cuda_timer_stop(cuda_token_, stream_);
            const std::lock_guard<std::mutex> lock(state().mutex);
            state().pending.push_back({kernel_, bytes_, cuda_token_});
            if (state().pending.size() >= kMaxPending) resolve_completed_locked();
          } else {
            cuda_timer_discard(cuda_token_);
          }
        }
#endif
      } else if (ok_) {
        const double us =
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0_).count();
        const std::lock_guard<std::mutex> lock(state().mutex);
        charge(kernel_, us, bytes_);
      }
    } catch (...) {
      // A profiler failure must not turn a finished op into an exception
      // from a destructor; the report then lacks this call.
    }
  }
#ifdef KASMINA_WITH_CUDA
  cuda_range_pop();
#endif
}

}  // namespace detail
}  // namespace kasmina
