// The one dispatch point (ops.hpp): validate, then hand the params to the
// backend. Backends see only params that passed these checks.
#include "kasmina/ops.hpp"

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "backends.hpp"
#include "core/profile_scope.hpp"
#include "core/validation.hpp"
#include "kasmina/error.hpp"
#include "kasmina/version.hpp"

namespace kasmina {

namespace {

bool backend_known(Backend backend) {
  return backend == Backend::reference || backend == Backend::cpu || backend == Backend::cuda;
}

void check_backend_usable(Backend backend) {
  KASMINA_CHECK_VALUE(backend_known(backend), "unknown backend value ", static_cast<int>(backend),
                      " (expected 0 = reference, 1 = cpu, 2 = cuda)");
  KASMINA_CHECK_RUNTIME(backend_available(backend), "backend '", backend_name(backend),
                        "' is not available: ", backend_unavailable_reason(backend));
}

// Shapes and dtype: the checks every op shares.
void check_shape(int64_t rows, int64_t hidden, int32_t num_seeds, DType dtype, Backend backend) {
  KASMINA_CHECK_VALUE(hidden > 0, "hidden must be > 0 (hidden = ", hidden, ")");
  KASMINA_CHECK_VALUE(num_seeds > 0, "num_seeds must be > 0 (num_seeds = ", num_seeds, ")");
  KASMINA_CHECK_VALUE(hidden % num_seeds == 0,
                      "hidden must be divisible by num_seeds (hidden = ", hidden,
                      ", num_seeds = ", num_seeds, ")");
  KASMINA_CHECK_VALUE(rows >= 0, "rows must be >= 0 (rows = ", rows, ")");
  const auto code = static_cast<int32_t>(dtype);
  KASMINA_CHECK_TYPE(code >= 0 && code <= static_cast<int32_t>(DType::f64), "unknown dtype value ",
                     code, " (expected 0 = float32, 1 = bfloat16, 2 = float16, 3 = float64)");
  // DESIGN 13: float64 storage exists so gradients can be checked through the
  // oracle; the fast backends have no float64 kernels.
  KASMINA_CHECK_TYPE(dtype != DType::f64 || backend == Backend::reference,
                     "dtype float64 is supported by the reference backend only (backend = ",
                     backend_name(backend), "); use float32, bfloat16 or float16");
}

void check_stride(const char* name, int64_t stride, int64_t hidden) {
  KASMINA_CHECK_VALUE(stride == 0 || stride >= hidden, name,
                      " must be 0 (= hidden) or >= hidden (hidden = ", hidden, ", ", name, " = ",
                      stride, ")");
}

void check_pointer(const void* pointer, const char* name, const char* why) {
  KASMINA_CHECK_VALUE(pointer != nullptr, name, " must not be null", why);
}

void check_registry(const RegistryView& registry) {
  KASMINA_CHECK_VALUE(registry.num_blueprints >= 1,
                      "registry.num_blueprints must be >= 1 (row 0 is reserved) (num_blueprints = ",
                      registry.num_blueprints, ")");
  check_pointer(registry.weights, "registry.weights", "");
  check_pointer(registry.scales, "registry.scales", "");
}

void check_seed_pointers(const SeedTable& seeds) {
  check_pointer(seeds.stage, "seeds.stage", "");
  check_pointer(seeds.kind, "seeds.kind", "");
  check_pointer(seeds.blueprint, "seeds.blueprint", "");
  check_pointer(seeds.alpha, "seeds.alpha", "");
}

void check_clamp(const OutputClamp& clamp) {
  if (!clamp.enabled) return;
  // Written so that a NaN bound fails too.
  KASMINA_CHECK_VALUE(clamp.lo <= clamp.hi, "clamp needs lo <= hi (lo = ", clamp.lo,
                      ", hi = ", clamp.hi, ")");
}

// Host backends can read the table; the CUDA backend trusts it (params.hpp).
void check_seed_table(const SeedTable& seeds, int32_t num_seeds, int32_t num_blueprints,
                      int64_t chunk, Backend backend) {
  if (backend_device(backend) != Device::cpu) return;
  for (int32_t s = 0; s < num_seeds; ++s) {
    const int32_t stage = seeds.stage[s];
    const int32_t kind = seeds.kind[s];
    const int32_t blueprint = seeds.blueprint[s];
    KASMINA_CHECK_VALUE(stage >= 0 && stage < kNumStages, "seed ", s, " has stage ", stage,
                        ", expected 0 <= stage < ", kNumStages);
    KASMINA_CHECK_VALUE(kind >= 0 && kind < kNumKinds, "seed ", s, " has kind ", kind,
                        ", expected 0 <= kind < ", kNumKinds);
    KASMINA_CHECK_VALUE(blueprint >= 0 && blueprint < num_blueprints, "seed ", s, " has blueprint ",
                        blueprint, ", expected 0 <= blueprint < ", num_blueprints);
    KASMINA_CHECK_VALUE(kind != static_cast<int32_t>(Kind::conv) || chunk >= 3, "seed ", s,
                        " is CONV, which needs chunk >= 3 (chunk = ", chunk, ")");
  }
}

// Byte span [begin, end) of a strided [rows, hidden] view.
struct Span {
  uintptr_t begin = 0, end = 0;
};
Span span_of(const void* base, int64_t rows, int64_t hidden, int64_t stride, DType dtype) {
  const auto size = static_cast<uintptr_t>(dtype_size(dtype));
  const auto begin = reinterpret_cast<uintptr_t>(base);
  const auto elements = static_cast<uintptr_t>((rows - 1) * stride + hidden);
  return {begin, begin + elements * size};
}
bool overlap(Span a, Span b) { return a.begin < b.end && b.begin < a.end; }

template <typename T>
Span span_n(const T* base, int64_t count) {
  const auto begin = reinterpret_cast<uintptr_t>(base);
  return {begin, base == nullptr ? begin : begin + static_cast<uintptr_t>(count) * sizeof(T)};
}

struct NamedSpan {
  const char* name;
  Span span;
};

// The small outputs (telemetry, counts, gradients of the registry and of
// alpha, statistics) are written while the inputs are still read: each must
// be disjoint from every input and from the other outputs.
void check_outputs_disjoint(std::initializer_list<NamedSpan> outputs,
                            std::initializer_list<NamedSpan> inputs) {
  for (auto out = outputs.begin(); out != outputs.end(); ++out) {
    if (out->span.begin == out->span.end) continue;
    auto refuse_overlap = [&](const NamedSpan& other) {
      KASMINA_CHECK_VALUE(other.span.begin == other.span.end || !overlap(out->span, other.span),
                          out->name, " must not overlap ", other.name, " (", out->name,
                          " spans [", reinterpret_cast<const void*>(out->span.begin), ", ",
                          reinterpret_cast<const void*>(out->span.end), "), ", other.name,
                          " spans [", reinterpret_cast<const void*>(other.span.begin), ", ",
                          reinterpret_cast<const void*>(other.span.end), "))");
    };
    for (const NamedSpan& in : inputs) refuse_overlap(in);
    for (auto later = out + 1; later != outputs.end(); ++later) refuse_overlap(*later);
  }
}

int64_t stride_or_hidden(int64_t stride, int64_t hidden) { return stride != 0 ? stride : hidden; }

}  // namespace

std::string_view backend_name(Backend backend) {
  switch (backend) {
    case Backend::reference:
      return "reference";
    case Backend::cpu:
      return "cpu";
    case Backend::cuda:
      return "cuda";
  }
  return "unknown";
}

Device backend_device(Backend backend) {
  return backend == Backend::cuda ? Device::cuda : Device::cpu;
}

bool backend_available(Backend backend) { return backend_unavailable_reason(backend).empty(); }

std::string backend_unavailable_reason(Backend backend) {
  switch (backend) {
    case Backend::reference:
    case Backend::cpu:
      return "";
    case Backend::cuda:
#ifdef KASMINA_WITH_CUDA
      return detail::cuda_available() ? std::string() : detail::cuda_unavailable_reason();
#else
      return "kasmina was built without the CUDA backend (configured with KASMINA_CUDA=OFF or no "
             "CUDA compiler found)";
#endif
  }
  return "unknown backend value " + std::to_string(static_cast<int>(backend));
}

namespace detail {

void validate_forward(const ForwardParams& p, Backend backend, Outputs outputs) {
  check_backend_usable(backend);
  check_shape(p.rows, p.hidden, p.num_seeds, p.dtype, backend);
  check_stride("x_row_stride", p.x_row_stride, p.hidden);
  if (outputs == Outputs::required) check_stride("y_row_stride", p.y_row_stride, p.hidden);
  if (p.rows > 0) {
    check_pointer(p.x, "x", " when rows > 0");
    if (outputs == Outputs::required) check_pointer(p.y, "y", " when rows > 0");
  }
  if (outputs == Outputs::required) check_pointer(p.telemetry, "telemetry", "");
  check_seed_pointers(p.seeds);
  check_registry(p.registry);
  check_clamp(p.clamp);
  KASMINA_CHECK_VALUE(p.dead_threshold >= 0.0f,
                      "dead_threshold must be >= 0 (dead_threshold = ", p.dead_threshold, ")");
  check_seed_table(p.seeds, p.num_seeds, p.registry.num_blueprints, p.hidden / p.num_seeds,
                   backend);
  if (outputs == Outputs::required && p.rows > 0) {
    // Telemetry and CONV read X after neighbouring Y values may be written.
    const Span x =
        span_of(p.x, p.rows, p.hidden, stride_or_hidden(p.x_row_stride, p.hidden), p.dtype);
    const Span y =
        span_of(p.y, p.rows, p.hidden, stride_or_hidden(p.y_row_stride, p.hidden), p.dtype);
    KASMINA_CHECK_VALUE(!overlap(x, y), "y must not overlap x (forward is not in place; x spans [",
                        reinterpret_cast<const void*>(x.begin), ", ",
                        reinterpret_cast<const void*>(x.end), "), y spans [",
                        reinterpret_cast<const void*>(y.begin), ", ",
                        reinterpret_cast<const void*>(y.end), "))");
  }
  if (outputs == Outputs::required) {
    const int64_t S = p.num_seeds, C = p.hidden / p.num_seeds, B = p.registry.num_blueprints;
    const Span x = p.rows > 0 ? span_of(p.x, p.rows, p.hidden,
                                        stride_or_hidden(p.x_row_stride, p.hidden), p.dtype)
                              : Span{};
    const Span y = p.rows > 0 ? span_of(p.y, p.rows, p.hidden,
                                        stride_or_hidden(p.y_row_stride, p.hidden), p.dtype)
                              : Span{};
    check_outputs_disjoint(
        {{"telemetry", span_n(p.telemetry, S * kTelemetryWidth)},
         {"nonfinite_count", span_n(p.nonfinite_count, S)}},
        {{"x", x}, {"y", y}, {"seeds.stage", span_n(p.seeds.stage, S)},
         {"seeds.kind", span_n(p.seeds.kind, S)}, {"seeds.blueprint", span_n(p.seeds.blueprint, S)},
         {"seeds.alpha", span_n(p.seeds.alpha, S)},
         {"registry.weights", span_n(p.registry.weights, B * C)},
         {"registry.scales", span_n(p.registry.scales, B)}});
  }
}

void validate_backward(const BackwardParams& p, Backend backend, Outputs outputs) {
  check_backend_usable(backend);
  check_shape(p.rows, p.hidden, p.num_seeds, p.dtype, backend);
  check_stride("x_row_stride", p.x_row_stride, p.hidden);
  check_stride("dy_row_stride", p.dy_row_stride, p.hidden);
  if (outputs == Outputs::required) check_stride("dx_row_stride", p.dx_row_stride, p.hidden);
  if (p.rows > 0) {
    check_pointer(p.x, "x", " when rows > 0");
    check_pointer(p.dy, "dy", " when rows > 0");
    if (outputs == Outputs::required) check_pointer(p.dx, "dx", " when rows > 0");
  }
  if (outputs == Outputs::required) {
    check_pointer(p.dweights, "dweights", "");
    check_pointer(p.dscales, "dscales", "");
    check_pointer(p.dalpha, "dalpha", "");
    check_pointer(p.grad_stats, "grad_stats", "");
  }
  check_seed_pointers(p.seeds);
  check_registry(p.registry);
  check_clamp(p.clamp);
  if (p.clip_enabled) {
    KASMINA_CHECK_VALUE(p.clip_norm > 0.0f,
                        "clip_norm must be > 0 when clipping is enabled (clip_norm = ", p.clip_norm,
                        ")");
  }
  check_seed_table(p.seeds, p.num_seeds, p.registry.num_blueprints, p.hidden / p.num_seeds,
                   backend);
  if (outputs == Outputs::required && p.rows > 0) {
    // dx is written while x and dy of neighbouring columns (CONV) and rows
    // (the clamp mask, the clip norm) are still to be read.
    const Span dx =
        span_of(p.dx, p.rows, p.hidden, stride_or_hidden(p.dx_row_stride, p.hidden), p.dtype);
    const Span x =
        span_of(p.x, p.rows, p.hidden, stride_or_hidden(p.x_row_stride, p.hidden), p.dtype);
    const Span dy =
        span_of(p.dy, p.rows, p.hidden, stride_or_hidden(p.dy_row_stride, p.hidden), p.dtype);
    KASMINA_CHECK_VALUE(
        !overlap(dx, x), "dx must not overlap x (backward is not in place; x spans [",
        reinterpret_cast<const void*>(x.begin), ", ", reinterpret_cast<const void*>(x.end),
        "), dx spans [", reinterpret_cast<const void*>(dx.begin), ", ",
        reinterpret_cast<const void*>(dx.end), "))");
    KASMINA_CHECK_VALUE(
        !overlap(dx, dy), "dx must not overlap dy (backward is not in place; dy spans [",
        reinterpret_cast<const void*>(dy.begin), ", ", reinterpret_cast<const void*>(dy.end),
        "), dx spans [", reinterpret_cast<const void*>(dx.begin), ", ",
        reinterpret_cast<const void*>(dx.end), "))");
  }
  if (outputs == Outputs::required) {
    const int64_t S = p.num_seeds, C = p.hidden / p.num_seeds, B = p.registry.num_blueprints;
    auto rows_span = [&](const void* base, int64_t stride) {
      return p.rows > 0 ? span_of(base, p.rows, p.hidden, stride_or_hidden(stride, p.hidden),
                                  p.dtype)
                        : Span{};
    };
    check_outputs_disjoint(
        {{"dweights", span_n(p.dweights, B * C)},
         {"dscales", span_n(p.dscales, B)},
         {"dalpha", span_n(p.dalpha, S)},
         {"grad_stats", span_n(p.grad_stats, S * kGradStatsWidth)}},
        {{"x", rows_span(p.x, p.x_row_stride)}, {"dy", rows_span(p.dy, p.dy_row_stride)},
         {"dx", rows_span(p.dx, p.dx_row_stride)}, {"seeds.stage", span_n(p.seeds.stage, S)},
         {"seeds.kind", span_n(p.seeds.kind, S)}, {"seeds.blueprint", span_n(p.seeds.blueprint, S)},
         {"seeds.alpha", span_n(p.seeds.alpha, S)},
         {"registry.weights", span_n(p.registry.weights, B * C)},
         {"registry.scales", span_n(p.registry.scales, B)}});
  }
}

}  // namespace detail

void validate(const ForwardParams& params, Backend backend) {
  detail::validate_forward(params, backend, detail::Outputs::required);
}

void validate(const BackwardParams& params, Backend backend) {
  detail::validate_backward(params, backend, detail::Outputs::required);
}

std::size_t forward_workspace_bytes(const ForwardParams& params, Backend backend) {
  check_backend_usable(backend);
#ifdef KASMINA_WITH_CUDA
  if (backend == Backend::cuda) return detail::forward_workspace_bytes_cuda(params);
#else
  (void)params;
#endif
  return 0;
}

std::size_t backward_workspace_bytes(const BackwardParams& params, Backend backend) {
  check_backend_usable(backend);
#ifdef KASMINA_WITH_CUDA
  if (backend == Backend::cuda) return detail::backward_workspace_bytes_cuda(params);
#else
  (void)params;
#endif
  return 0;
}

namespace {

// The profiler's name of the kernel variant that runs: backend, op and dtype,
// and for CUDA the variant and rows in flight from describe().
std::string profile_kernel_name(const char* op, Backend backend, DType dtype,
                                const std::string& description) {
  std::string name = std::string(backend_name(backend)) + "." + op + " " + std::string(dtype_name(dtype));
  if (backend != Backend::cuda) return name;
  const std::size_t on = description.find(" on ");
  name = description.substr(0, on);
  const std::string plain = "cuda.forward.";
  if (std::string(op) == "forward_many" && name.rfind(plain, 0) == 0) {
    name = "cuda.forward_many." + name.substr(plain.size());
  }
  const std::size_t rif = description.find(" rows in flight");
  if (rif != std::string::npos) {
    std::size_t b = description.rfind(", ", rif);
    b = b == std::string::npos ? 0 : b + 2;
    name += " (" + description.substr(b, rif - b) + " rows in flight)";
  }
  return name;
}

double moved_bytes(int64_t rows, int64_t hidden, DType dtype, int tensors) {
  return static_cast<double>(rows) * static_cast<double>(hidden) *
         static_cast<double>(dtype_size(dtype)) * tensors;
}

}  // namespace

void forward(const ForwardParams& params, Backend backend) {
  validate(params, backend);
  detail::OpScope scope("kasmina.forward", backend, params.stream,
                        moved_bytes(params.rows, params.hidden, params.dtype, 2), [&] {
                          return profile_kernel_name(
                              "forward", backend, params.dtype,
                              backend == Backend::cuda ? describe_forward(params, backend) : "");
                        });
  switch (backend) {
    case Backend::reference:
      detail::forward_reference(params);
      break;
    case Backend::cpu:
      detail::forward_cpu(params);
      break;
    case Backend::cuda:
#ifdef KASMINA_WITH_CUDA
      detail::forward_cuda(params);
#endif
      break;
  }
  scope.done();
}

void forward_many(const ForwardParams* params, int count, Backend backend) {
  KASMINA_CHECK_VALUE(params != nullptr && count >= 1, "forward_many needs at least one problem (got ",
                      count, ")");
  double bytes = 0;
  for (int i = 0; i < count; ++i) {
    validate(params[i], backend);
    bytes += moved_bytes(params[i].rows, params[i].hidden, params[i].dtype, 2);
  }
  // The problems run at once on CUDA: what one writes (y, telemetry, counts,
  // workspace) must be disjoint from what any other reads (x) or writes.
  auto spans = [](const ForwardParams& p) {
    const bool any = p.rows > 0;
    return std::array<NamedSpan, 5>{{
        {"x", any ? span_of(p.x, p.rows, p.hidden, stride_or_hidden(p.x_row_stride, p.hidden), p.dtype)
                  : Span{}},
        {"y", any ? span_of(p.y, p.rows, p.hidden, stride_or_hidden(p.y_row_stride, p.hidden), p.dtype)
                  : Span{}},
        {"telemetry", span_n(p.telemetry, static_cast<int64_t>(p.num_seeds) * kTelemetryWidth)},
        {"nonfinite_count", span_n(p.nonfinite_count, p.num_seeds)},
        {"workspace", span_n(static_cast<const unsigned char*>(p.workspace),
                             static_cast<int64_t>(p.workspace_bytes))},
    }};
  };
  for (int i = 0; i < count; ++i) {
    const auto a = spans(params[i]);
    for (int j = 0; j < count; ++j) {
      if (j == i) continue;
      const auto b = spans(params[j]);
      for (std::size_t w = 1; w < a.size(); ++w) {  // a's writes
        for (const NamedSpan& other : b) {
          KASMINA_CHECK_VALUE(a[w].span.begin == a[w].span.end || other.span.begin == other.span.end ||
                                  !overlap(a[w].span, other.span),
                              "forward_many: problem ", i, "'s ", a[w].name, " overlaps problem ", j,
                              "'s ", other.name, " (the problems run at once)");
        }
      }
    }
  }
  if (backend != Backend::cuda) {
    for (int i = 0; i < count; ++i) forward(params[i], backend);
    return;
  }
  detail::OpScope scope("kasmina.forward_many", backend, params[0].stream, bytes, [&] {
#ifdef KASMINA_WITH_CUDA
    const std::string what = detail::describe_forward_stream_cuda(params, count);
#else
    const std::string what = describe_forward(params[0], backend);
#endif
    return profile_kernel_name("forward_many", backend, params[0].dtype, what) + " x" +
           std::to_string(count);
  });
#ifdef KASMINA_WITH_CUDA
  detail::forward_stream_cuda(params, count);
#endif
  scope.done();
}

void backward(const BackwardParams& params, Backend backend) {
  validate(params, backend);
  detail::OpScope scope("kasmina.backward", backend, params.stream,
                        moved_bytes(params.rows, params.hidden, params.dtype, 3), [&] {
                          return profile_kernel_name(
                              "backward", backend, params.dtype,
                              backend == Backend::cuda ? describe_backward(params, backend) : "");
                        });
  switch (backend) {
    case Backend::reference:
      detail::backward_reference(params);
      break;
    case Backend::cpu:
      detail::backward_cpu(params);
      break;
    case Backend::cuda:
#ifdef KASMINA_WITH_CUDA
      detail::backward_cuda(params);
#endif
      break;
  }
  scope.done();
}

std::string describe_forward(const ForwardParams& params, Backend backend) {
  // Shapes only: describing needs no buffers, but the backends' choices
  // depend on a valid shape and dtype.
  check_backend_usable(backend);
  check_shape(params.rows, params.hidden, params.num_seeds, params.dtype, backend);
  switch (backend) {
    case Backend::reference:
      return "reference: float64 oracle";
    case Backend::cpu:
      return detail::describe_forward_cpu(params);
    case Backend::cuda:
#ifdef KASMINA_WITH_CUDA
      return detail::describe_forward_cuda(params);
#else
      break;
#endif
  }
  return "";
}

std::string describe_backward(const BackwardParams& params, Backend backend) {
  check_backend_usable(backend);
  check_shape(params.rows, params.hidden, params.num_seeds, params.dtype, backend);
  switch (backend) {
    case Backend::reference:
      return "reference: float64 oracle";
    case Backend::cpu:
      return detail::describe_backward_cpu(params);
    case Backend::cuda:
#ifdef KASMINA_WITH_CUDA
      return detail::describe_backward_cuda(params);
#else
      break;
#endif
  }
  return "";
}

bool cuda_stream_capturing(Stream stream) {
#ifdef KASMINA_WITH_CUDA
  // No device (or no driver): nothing can be capturing.
  return detail::cuda_available() && detail::cuda_stream_capturing(stream);
#else
  (void)stream;
  return false;
#endif
}

BuildInfo build_info() {
  BuildInfo info;
  info.version = KASMINA_VERSION;
#if defined(__clang__)
  info.compiler = __VERSION__;
#elif defined(__GNUC__)
  info.compiler = "GCC " __VERSION__;
#else
  info.compiler = "unknown compiler";
#endif
#ifdef KASMINA_WITH_CUDA
  info.cuda_compiled = true;
  info.cuda_architectures = KASMINA_CUDA_ARCHITECTURES;
  if (detail::cuda_available()) info.cuda_devices = detail::cuda_device_names();
#endif
  info.cpu_threads = detail::cpu_default_threads();
  return info;
}

}  // namespace kasmina
