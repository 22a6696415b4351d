// kasmina._C: the one file between Python and the C++ API (tiny-cuda-nn
// style). Tensors arrive as DLPack views (the DLPack C exchange API, else
// __dlpack__ through nb::ndarray), so the extension never links libtorch and
// builds against any PyTorch; see docs/PYTHON.md.
//
// The checks are grouped here (dtype of every tensor, shapes, one device,
// last dimension contiguous, leading dimensions viewable as rows) and run
// before anything is written; kasmina::forward/backward validate the filled
// params once more. Every failure is a kasmina::Error, which the translator
// below turns into ValueError / TypeError / RuntimeError with the same text.
#include <nanobind/nanobind.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "kasmina/kasmina.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using kasmina::Backend;
using kasmina::DType;

// A tensor argument as a DLPack view (nb::dlpack::dltensor is DLPack's
// DLTensor). Recent PyTorch publishes the DLPack C exchange API
// (`type(t).__dlpack_c_exchange_api__`, see lookup_exchange_api): one C call fills a
// non-owning DLTensor of a tensor, and another gives the producer's current
// stream of a device. That is what the binding uses (tens of nanoseconds per
// tensor); a tensor type without it goes through `__dlpack__` as a nanobind
// ndarray (a Python method, ~2-3 us per tensor). Both give the same view and
// run the same checks below. See docs/PYTHON.md.
struct DLPackVersion_ {
  uint32_t major;
  uint32_t minor;
};
struct DLPackExchangeAPIHeader_ {
  DLPackVersion_ version;
  DLPackExchangeAPIHeader_* prev_api;
};
struct DLPackExchangeAPI_ {  // DLPack's DLPackExchangeAPI (dlpack.h, 1.2 and 1.3 alike)
  DLPackExchangeAPIHeader_ header;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, nb::dlpack::dltensor* out);
  int (*current_work_stream)(int32_t device_type, int32_t device_id, void** out_stream);
};

// The exchange API of a tensor's exact type (nullptr: none), cached per type.
// Cached types are kept alive so that a cached address is never reused by
// another type.
struct ExchangeCache {
  struct Entry {
    PyTypeObject* type;
    const DLPackExchangeAPI_* api;
  };
  Entry entries[8] = {};
  int size = 0;
  bool enabled = true;  // tests switch it off to run the __dlpack__ path
};
ExchangeCache g_exchange;

// The table behind `type.__dlpack_c_exchange_api__` (DLPack 1.3: a capsule
// named "dlpack_exchange_api") or its earlier spelling
// `__c_dlpack_exchange_api__` (DLPack 1.2 drafts, PyTorch 2.10-era: the
// address as a Python int, or the same capsule); the table's layout is the same
// in both. nullptr when absent, of another major version, or without the
// non-owning view and stream functions.
const DLPackExchangeAPI_* lookup_exchange_api(PyTypeObject* type) {
  const void* ptr = nullptr;
  for (const char* attr : {"__dlpack_c_exchange_api__", "__c_dlpack_exchange_api__"}) {
    PyObject* o = PyObject_GetAttrString(reinterpret_cast<PyObject*>(type), attr);
    if (o == nullptr) {
      PyErr_Clear();
      continue;
    }
    if (PyCapsule_IsValid(o, "dlpack_exchange_api")) {
      ptr = PyCapsule_GetPointer(o, "dlpack_exchange_api");
    } else if (PyLong_Check(o)) {
      ptr = PyLong_AsVoidPtr(o);
      if (ptr == nullptr) PyErr_Clear();
    }
    Py_DECREF(o);
    if (ptr != nullptr) break;
  }
  const auto* api = static_cast<const DLPackExchangeAPI_*>(ptr);
  if (api == nullptr || api->header.version.major != 1 ||
      api->dltensor_from_py_object_no_sync == nullptr || api->current_work_stream == nullptr)
    return nullptr;
  return api;
}

const DLPackExchangeAPI_* exchange_api(PyObject* obj) {
  if (!g_exchange.enabled) return nullptr;
  PyTypeObject* type = Py_TYPE(obj);
  for (int i = 0; i < g_exchange.size; ++i)
    if (g_exchange.entries[i].type == type) return g_exchange.entries[i].api;
  const DLPackExchangeAPI_* api = lookup_exchange_api(type);
  if (g_exchange.size < 8) {
    Py_INCREF(reinterpret_cast<PyObject*>(type));
    g_exchange.entries[g_exchange.size++] = {type, api};
  }
  return api;
}

// A non-owning view of one tensor argument, valid during the call (the caller
// holds the tensors). Same accessors as nb::ndarray.
class View {
 public:
  View(nb::handle h, const char* name) {
    if (const DLPackExchangeAPI_* api = exchange_api(h.ptr())) {
      if (api->dltensor_from_py_object_no_sync(h.ptr(), &t_) != 0) throw nb::python_error();
    } else {
      nb::ndarray<> a;
      if (!nb::try_cast(h, a, false)) {
        // PyTorch's __dlpack__ refuses tensors that require grad; the kernels
        // never record autograd history (the autograd formulas do).
        bool retried = false;
        if (nb::hasattr(h, "requires_grad") && nb::cast<bool>(h.attr("requires_grad"))) {
          nb::object detached = h.attr("detach")();
          retried = nb::try_cast(detached, a, false);
        }
        if (!retried)
          KASMINA_FAIL(kasmina::ErrorKind::type, name, " must be a tensor, got ",
                       nb::inst_name(h).c_str());
      }
      t_.data = a.data();
      t_.device = {a.device_type(), a.device_id()};
      t_.ndim = static_cast<int32_t>(a.ndim());
      t_.dtype = a.dtype();
      t_.shape = const_cast<int64_t*>(a.shape_ptr());
      t_.strides = const_cast<int64_t*>(a.stride_ptr());
      t_.byte_offset = 0;
      keep_ = std::move(a);
    }
    if (t_.strides == nullptr && t_.ndim > 0) {  // DLPack: null strides = compact row-major
      own_strides_.resize(static_cast<size_t>(t_.ndim));
      int64_t s = 1;
      for (int32_t d = t_.ndim; d-- > 0;) {
        own_strides_[static_cast<size_t>(d)] = s;
        s *= t_.shape[d];
      }
      t_.strides = own_strides_.data();
    }
  }
  View(const View&) = delete;
  View& operator=(const View&) = delete;

  size_t ndim() const { return static_cast<size_t>(t_.ndim); }
  int64_t shape(size_t i) const { return t_.shape[i]; }
  int64_t stride(size_t i) const { return t_.strides[i]; }
  nb::dlpack::dtype dtype() const { return t_.dtype; }
  int device_type() const { return t_.device.device_type; }
  int device_id() const { return t_.device.device_id; }
  void* data() const { return static_cast<char*>(t_.data) + t_.byte_offset; }
  int64_t size() const {
    int64_t n = 1;
    for (int32_t d = 0; d < t_.ndim; ++d) n *= t_.shape[d];
    return n;
  }

 private:
  nb::dlpack::dltensor t_;
  nb::ndarray<> keep_;
  std::vector<int64_t> own_strides_;
};

using In = View;
using Out = View;

// The stream of a call: the given one, or (None) the producer's current
// stream of x's device at call time (CUDA; the CPU has none).
uintptr_t call_stream(nb::handle x_obj, const View& x, std::optional<uintptr_t> stream) {
  if (stream) return *stream;
  if (x.device_type() != nb::device::cuda::value) return 0;
  const DLPackExchangeAPI_* api = exchange_api(x_obj.ptr());
  if (api == nullptr)  // PyTorch without the exchange API: ask in Python
    return nb::cast<uintptr_t>(nb::module_::import_("torch.cuda")
                                   .attr("current_stream")(x_obj.attr("device"))
                                   .attr("cuda_stream"));
  void* s = nullptr;
  if (api->current_work_stream(nb::device::cuda::value, x.device_id(), &s) != 0)
    throw nb::python_error();
  return reinterpret_cast<uintptr_t>(s);
}

constexpr int kDeviceCpu = nb::device::cpu::value;
constexpr int kDeviceCuda = nb::device::cuda::value;

template <typename A>
std::string shape_str(const A& a) {
  std::string s = "[";
  for (size_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a.shape(i));
  }
  return s + "]";
}

template <typename A>
std::string dtype_str(const A& a) {
  const auto dt = a.dtype();
  std::string code;
  switch (static_cast<nb::dlpack::dtype_code>(dt.code)) {
    case nb::dlpack::dtype_code::Int: code = "int"; break;
    case nb::dlpack::dtype_code::UInt: code = "uint"; break;
    case nb::dlpack::dtype_code::Float: code = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: code = "bfloat"; break;
    case nb::dlpack::dtype_code::Bool: return "bool";
    default: code = "other"; break;
  }
  return code + std::to_string(dt.bits);
}

template <typename A>
bool is_dtype(const A& a, nb::dlpack::dtype_code code, int bits) {
  const auto dt = a.dtype();
  return dt.code == static_cast<uint8_t>(code) && dt.bits == bits && dt.lanes == 1;
}

// Storage dtype of x / dy (SPEC section 2; float64 only for the reference,
// which kasmina::validate enforces with its own message).
template <typename A>
DType activation_dtype(const A& a, const char* name) {
  using C = nb::dlpack::dtype_code;
  if (is_dtype(a, C::Float, 32)) return DType::f32;
  if (is_dtype(a, C::Bfloat, 16)) return DType::bf16;
  if (is_dtype(a, C::Float, 16)) return DType::f16;
  if (is_dtype(a, C::Float, 64)) return DType::f64;
  KASMINA_FAIL(kasmina::ErrorKind::type, name,
               " must be float32, bfloat16 or float16 (float64 on the reference backend), got ",
               dtype_str(a));
}

// Rows view of an activation tensor [..., hidden]: the last dimension must be
// contiguous and the leading ones must collapse into one row stride without a
// copy (SPEC section 1: x is *viewed* as [N, H]; we never copy behind the
// caller's back).
struct RowsView {
  int64_t rows = 0;
  int64_t row_stride = 0;
};

template <typename A>
RowsView rows_view(const A& a, const char* name, int64_t hidden) {
  const size_t nd = a.ndim();
  KASMINA_CHECK_VALUE(nd >= 1, name, " must have rank >= 1 ([..., hidden]), got rank 0");
  const int64_t last = static_cast<int64_t>(a.shape(nd - 1));
  KASMINA_CHECK_VALUE(last == hidden, name, " last dimension must equal the layer's hidden (expected ",
                      hidden, ", got ", last, "; shape ", shape_str(a), ")");
  RowsView v;
  v.rows = 1;
  for (size_t d = 0; d + 1 < nd; ++d) v.rows *= static_cast<int64_t>(a.shape(d));
  // An empty tensor has no memory to lay out (PyTorch calls it contiguous
  // whatever its strides, e.g. the stride-0 gradient of an empty sum).
  if (v.rows == 0) {
    v.row_stride = hidden;
    return v;
  }
  KASMINA_CHECK_VALUE(last <= 1 || a.stride(nd - 1) == 1, name,
                      " must be contiguous in its last dimension (expected stride 1, got ",
                      a.stride(nd - 1), ")");
  v.row_stride = hidden;
  bool have = false;
  int64_t expect = 0;
  for (size_t i = nd - 1; i-- > 0;) {
    const int64_t n = static_cast<int64_t>(a.shape(i));
    if (n == 1) continue;  // any stride is fine for a unit dimension
    if (!have) {
      v.row_stride = a.stride(i);
      expect = v.row_stride * n;
      have = true;
    } else {
      KASMINA_CHECK_VALUE(a.stride(i) == expect, name, " leading dimensions ", shape_str(a),
                          " cannot be viewed as rows without a copy (dimension ", i, " has stride ",
                          a.stride(i), ", expected ", expect, "); call .contiguous() first");
      expect *= n;
    }
  }
  KASMINA_CHECK_VALUE(v.rows <= 1 || v.row_stride >= hidden, name, " rows overlap (row stride ",
                      v.row_stride, " < hidden ", hidden, ")");
  return v;
}

// A small contiguous tensor of fixed shape and dtype (seed table, registry,
// telemetry and the other per-seed outputs).
template <typename A>
void check_small(const A& a, const char* name, nb::dlpack::dtype_code code, int bits,
                 const char* dtype_name, std::initializer_list<int64_t> shape) {
  KASMINA_CHECK_TYPE(is_dtype(a, code, bits), name, " must be ", dtype_name, ", got ", dtype_str(a));
  bool ok = a.ndim() == shape.size();
  size_t i = 0;
  for (int64_t n : shape) {
    if (!ok) break;
    ok = static_cast<int64_t>(a.shape(i)) == n;
    ++i;
  }
  if (!ok) {  // the expected shape is spelled out only for the message
    std::string expected = "[";
    i = 0;
    for (int64_t n : shape) expected += (i++ ? ", " : "") + std::to_string(n);
    expected += "]";
    KASMINA_FAIL(kasmina::ErrorKind::value, name, " must have shape ", expected, ", got ",
                 shape_str(a));
  }
  int64_t want = 1;
  for (size_t d = a.ndim(); d-- > 0;) {
    KASMINA_CHECK_VALUE(a.shape(d) <= 1 || a.stride(d) == want, name, " must be contiguous");
    want *= static_cast<int64_t>(a.shape(d));
  }
}

// Every tensor of one call on one device, and that device the backend's.
struct DeviceCheck {
  int type = -1;
  int id = -1;
  const char* first = nullptr;
  template <typename A>
  void add(const A& a, const char* name) {
    if (first == nullptr) {
      type = a.device_type();
      id = a.device_id();
      first = name;
      return;
    }
    KASMINA_CHECK_VALUE(a.device_type() == type && a.device_id() == id,
                        "all tensors must be on one device: ", first, " is on ",
                        type == kDeviceCuda ? "cuda:" : "cpu:", id, ", ", name, " on ",
                        a.device_type() == kDeviceCuda ? "cuda:" : "cpu:", a.device_id());
  }
  void match(Backend backend) const {
    const bool on_cuda = type == kDeviceCuda;
    const bool wants_cuda = kasmina::backend_device(backend) == kasmina::Device::cuda;
    KASMINA_CHECK_VALUE(on_cuda == wants_cuda, "backend '", kasmina::backend_name(backend),
                        "' needs ", wants_cuda ? "CUDA" : "CPU", " tensors, got tensors on ",
                        on_cuda ? "cuda" : (type == kDeviceCpu ? "cpu" : "an unsupported device"));
  }
};

Backend to_backend(int backend) {
  KASMINA_CHECK_VALUE(backend >= 0 && backend <= 2,
                      "backend must be 0 (reference), 1 (cpu) or 2 (cuda), got ", backend);
  return static_cast<Backend>(backend);
}

kasmina::OutputClamp to_clamp(std::optional<double> lo, std::optional<double> hi) {
  kasmina::OutputClamp c;
  KASMINA_CHECK_VALUE(lo.has_value() == hi.has_value(),
                      "clamp needs both lo and hi (or neither)");
  if (lo) {
    c.enabled = true;
    c.lo = static_cast<float>(*lo);
    c.hi = static_cast<float>(*hi);
  }
  return c;
}

// The per-seed table and the registry, shared by forward and backward.
struct LayerTensors {
  kasmina::SeedTable seeds;
  kasmina::RegistryView registry;
  int32_t num_seeds = 0;
  int64_t chunk = 0;
};

LayerTensors layer_tensors(const In& stage, const In& kind, const In& blueprint, const In& alpha,
                           const In& weights, const In& scales, DeviceCheck& dev) {
  using C = nb::dlpack::dtype_code;
  KASMINA_CHECK_VALUE(stage.ndim() == 1, "stage must have shape [num_seeds], got ",
                      shape_str(stage));
  KASMINA_CHECK_VALUE(weights.ndim() == 2, "weights must have shape [num_blueprints, chunk], got ",
                      shape_str(weights));
  LayerTensors t;
  t.num_seeds = static_cast<int32_t>(stage.shape(0));
  KASMINA_CHECK_VALUE(t.num_seeds > 0, "num_seeds must be > 0, got 0");
  const int64_t b = static_cast<int64_t>(weights.shape(0));
  t.chunk = static_cast<int64_t>(weights.shape(1));
  const int64_t s = t.num_seeds;
  check_small(stage, "stage", C::Int, 32, "int32", {s});
  check_small(kind, "kind", C::Int, 32, "int32", {s});
  check_small(blueprint, "blueprint", C::Int, 32, "int32", {s});
  check_small(alpha, "alpha", C::Float, 32, "float32", {s});
  check_small(weights, "weights", C::Float, 32, "float32", {b, t.chunk});
  check_small(scales, "scales", C::Float, 32, "float32", {b});
  dev.add(stage, "stage");
  dev.add(kind, "kind");
  dev.add(blueprint, "blueprint");
  dev.add(alpha, "alpha");
  dev.add(weights, "weights");
  dev.add(scales, "scales");
  t.seeds.stage = static_cast<const int32_t*>(stage.data());
  t.seeds.kind = static_cast<const int32_t*>(kind.data());
  t.seeds.blueprint = static_cast<const int32_t*>(blueprint.data());
  t.seeds.alpha = static_cast<const float*>(alpha.data());
  t.registry.weights = static_cast<const float*>(weights.data());
  t.registry.scales = static_cast<const float*>(scales.data());
  t.registry.num_blueprints = static_cast<int32_t>(b);
  return t;
}

void set_workspace(const View* workspace, DeviceCheck& dev, void*& ptr, std::size_t& bytes) {
  if (workspace == nullptr) return;
  using C = nb::dlpack::dtype_code;
  KASMINA_CHECK_TYPE(is_dtype(*workspace, C::UInt, 8), "workspace must be uint8, got ",
                     dtype_str(*workspace));
  KASMINA_CHECK_VALUE(workspace->ndim() == 1 && (workspace->shape(0) <= 1 || workspace->stride(0) == 1),
                      "workspace must be a contiguous 1-D tensor, got shape ", shape_str(*workspace));
  dev.add(*workspace, "workspace");
  ptr = workspace->data();
  bytes = static_cast<std::size_t>(workspace->shape(0));
}

// y, dy and dx must match x in dtype and shape.
void check_like_x(const View& v, const char* name, const View& x, DType x_dtype) {
  KASMINA_CHECK_TYPE(activation_dtype(v, name) == x_dtype, name, " must have the dtype of x (",
                     dtype_str(x), "), got ", dtype_str(v));
  KASMINA_CHECK_VALUE(v.ndim() == x.ndim() && v.size() == x.size(), name,
                      " must have the shape of x (", shape_str(x), "), got ", shape_str(v));
}

// An optional tensor argument (None: absent).
struct OptView {
  std::optional<View> v;
  OptView(nb::handle h, const char* name) {
    if (!h.is_none()) v.emplace(h, name);
  }
  const View* get() const { return v ? &*v : nullptr; }
};

// The tensor arguments of forward, viewed in argument order; x's view may
// come from the caller (layer_call has taken it already; nullptr: viewed here).
struct ForwardViews {
  std::optional<View> x_own;
  const View& x;
  View y, telemetry, nonfinite, stage, kind, blueprint, alpha, weights, scales;
  OptView workspace;
  ForwardViews(nb::handle x_, const View* xv, nb::handle y_, nb::handle tel_, nb::handle nf_,
               nb::handle stage_, nb::handle kind_, nb::handle bp_, nb::handle alpha_,
               nb::handle w_, nb::handle sc_, nb::handle ws_)
      : x(xv != nullptr ? *xv : x_own.emplace(x_, "x")), y(y_, "y"), telemetry(tel_, "telemetry"),
        nonfinite(nf_, "nonfinite"), stage(stage_, "stage"), kind(kind_, "kind"),
        blueprint(bp_, "blueprint"), alpha(alpha_, "alpha"), weights(w_, "weights"),
        scales(sc_, "scales"), workspace(ws_, "workspace") {}
};

kasmina::ForwardParams forward_params(const In& x, const Out& y, const Out& telemetry,
                                      const Out& nonfinite, const In& stage, const In& kind,
                                      const In& blueprint, const In& alpha, const In& weights,
                                      const In& scales, const View* workspace,
                                      double dead_threshold, std::optional<double> clamp_lo,
                                      std::optional<double> clamp_hi, Backend backend,
                                      uintptr_t stream) {
  using C = nb::dlpack::dtype_code;
  DeviceCheck dev;
  dev.add(x, "x");
  const LayerTensors t = layer_tensors(stage, kind, blueprint, alpha, weights, scales, dev);
  const int64_t hidden = t.chunk * t.num_seeds;
  KASMINA_CHECK_VALUE(hidden > 0, "hidden must be > 0, got 0");
  kasmina::ForwardParams p;
  p.dtype = activation_dtype(x, "x");
  const RowsView xv = rows_view(x, "x", hidden);
  check_like_x(y, "y", x, p.dtype);
  const RowsView yv = rows_view(y, "y", hidden);
  check_small(telemetry, "telemetry", C::Float, 32, "float32",
              {t.num_seeds, kasmina::kTelemetryWidth});
  check_small(nonfinite, "nonfinite", C::Int, 64, "int64", {t.num_seeds});
  dev.add(y, "y");
  dev.add(telemetry, "telemetry");
  dev.add(nonfinite, "nonfinite");
  set_workspace(workspace, dev, p.workspace, p.workspace_bytes);
  dev.match(backend);

  p.x = x.data();
  p.y = y.data();
  p.rows = xv.rows;
  p.hidden = hidden;
  p.num_seeds = t.num_seeds;
  p.x_row_stride = xv.row_stride;
  p.y_row_stride = yv.row_stride;
  p.seeds = t.seeds;
  p.registry = t.registry;
  p.clamp = to_clamp(clamp_lo, clamp_hi);
  p.dead_threshold = static_cast<float>(dead_threshold);
  p.telemetry = static_cast<float*>(telemetry.data());
  p.nonfinite_count = static_cast<int64_t*>(nonfinite.data());
  p.stream = reinterpret_cast<kasmina::Stream>(stream);
  return p;
}

kasmina::ForwardParams forward_params(const ForwardViews& v, nb::handle x_obj,
                                      double dead_threshold, std::optional<double> clamp_lo,
                                      std::optional<double> clamp_hi, Backend b,
                                      std::optional<uintptr_t> stream) {
  return forward_params(v.x, v.y, v.telemetry, v.nonfinite, v.stage, v.kind, v.blueprint, v.alpha,
                        v.weights, v.scales, v.workspace.get(), dead_threshold, clamp_lo, clamp_hi,
                        b, call_stream(x_obj, v.x, stream));
}

void forward(nb::handle x, nb::handle y, nb::handle telemetry, nb::handle nonfinite,
             nb::handle stage, nb::handle kind, nb::handle blueprint, nb::handle alpha,
             nb::handle weights, nb::handle scales, nb::handle workspace, double dead_threshold,
             std::optional<double> clamp_lo, std::optional<double> clamp_hi, int backend,
             std::optional<uintptr_t> stream) {
  const Backend b = to_backend(backend);
  const ForwardViews v(x, nullptr, y, telemetry, nonfinite, stage, kind, blueprint, alpha, weights,
                       scales, workspace);
  const kasmina::ForwardParams p =
      forward_params(v, x, dead_threshold, clamp_lo, clamp_hi, b, stream);
  // The CPU backend threads with OpenMP; let other Python threads run meanwhile.
  nb::gil_scoped_release release;
  kasmina::forward(p, b);
}

// KasminaLayer's eager forward without a gradient (layer.py), in one call:
// the layer's buffers are read from its `_buffers` dict and its settings from
// its `_config` dict *at call time* (nothing is cached, so rebinding a buffer,
// `_apply`, `load_state_dict` or `set_extra_state` need no invalidation), the
// "auto" backend is resolved from x's view as _ops.resolve_backend does, and
// then the same views, checks and kasmina::forward as `forward` above run on
// the same arguments (same bits, same errors). It saves the Python frames and
// the ~16-argument calls between the module and the binding (docs/PYTHON.md).
//
// Returns x's rows, or None, with nothing read or written, when the call needs
// what only the Python path does: a tensor type without the DLPack C exchange
// API, x on a CUDA device other than the current one (the device guard), or
// the CUDA backend without the layer's CUDA workspace (a temporary one).
// `backend` is "auto" or a backend id (the layer maps its other names).
// Interned, like the dicts' own keys (attribute and keyword names), so that a
// lookup matches by pointer instead of comparing the characters.
nb::object interned(const char* s) { return nb::steal(PyUnicode_InternFromString(s)); }

struct LayerKeys {
  nb::object stage = interned("seed_stage"), kind = interned("seed_kind"),
             blueprint = interned("seed_blueprint"), telemetry = interned("telemetry"),
             nonfinite = interned("nonfinite_counts"), workspace = interned("workspace"),
             dead_threshold = interned("dead_threshold"), clamp_lo = interned("clamp_lo"),
             clamp_hi = interned("clamp_hi");
  nb::object cuda_current_device;  // torch._C._cuda_getDevice (None: torch without CUDA)
};

const LayerKeys& layer_keys() {
  static const LayerKeys* keys = [] {
    auto* k = new LayerKeys;  // never destroyed: its Python objects must not outlive Python
    nb::object torch_c = nb::module_::import_("torch._C");
    k->cuda_current_device = nb::getattr(torch_c, "_cuda_getDevice", nb::none());
    return k;
  }();
  return *keys;
}

nb::object item(nb::handle mapping, const nb::object& key) {
  PyObject* v = PyObject_GetItem(mapping.ptr(), key.ptr());  // KeyError as in Python
  if (v == nullptr) throw nb::python_error();
  return nb::steal(v);
}

std::optional<double> optional_float(const nb::object& o) {
  if (o.is_none()) return std::nullopt;
  return nb::cast<double>(o);
}

// Where layer_forward_viewed's kernel went.
struct Launched {
  bool cuda = false;
  kasmina::Stream stream = nullptr;
};

// layer_forward with x's view taken by the caller (nullptr: taken here);
// *launched (where given) says whether the kernel went to a CUDA stream, and
// which.
nb::object layer_forward_viewed(nb::handle x, const View* xv, nb::handle y, nb::handle alpha,
                                nb::handle weights, nb::handle scales, nb::handle buffers,
                                nb::handle config, nb::handle backend,
                                Launched* launched = nullptr) {
  const LayerKeys& k = layer_keys();
  const nb::object workspace = item(buffers, k.workspace);
  if (exchange_api(x.ptr()) == nullptr || exchange_api(workspace.ptr()) == nullptr)
    return nb::none();
  const nb::object stage = item(buffers, k.stage), kind = item(buffers, k.kind),
                   blueprint = item(buffers, k.blueprint),
                   telemetry = item(buffers, k.telemetry),
                   nonfinite = item(buffers, k.nonfinite);
  // Viewing has no side effects: the views are taken once, before the
  // fallback decisions that need x's and the workspace's devices.
  const ForwardViews v(x, xv, y, telemetry, nonfinite, stage, kind, blueprint, alpha, weights,
                       scales, workspace);
  Backend b;
  if (PyUnicode_Check(backend.ptr())) {  // "auto"
    using C = nb::dlpack::dtype_code;
    b = v.x.device_type() == kDeviceCuda ? Backend::cuda
        : is_dtype(v.x, C::Float, 64)    ? Backend::reference
                                         : Backend::cpu;
  } else {
    b = to_backend(nb::cast<int>(backend));
  }
  if (v.x.device_type() == kDeviceCuda &&
      (k.cuda_current_device.is_none() ||
       nb::cast<int>(k.cuda_current_device()) != v.x.device_id()))
    return nb::none();
  // The layer passes its workspace only once it lives on CUDA (layer.py).
  const View* ws = v.workspace.get();
  if (ws != nullptr && ws->device_type() != kDeviceCuda) ws = nullptr;
  if (b == Backend::cuda && ws == nullptr) return nb::none();
  const double dead_threshold = nb::cast<double>(item(config, k.dead_threshold));
  const std::optional<double> clamp_lo = optional_float(item(config, k.clamp_lo)),
                              clamp_hi = optional_float(item(config, k.clamp_hi));
  const kasmina::ForwardParams p = forward_params(
      v.x, v.y, v.telemetry, v.nonfinite, v.stage, v.kind, v.blueprint, v.alpha, v.weights,
      v.scales, ws, dead_threshold, clamp_lo, clamp_hi, b, call_stream(x, v.x, std::nullopt));
  {
    nb::gil_scoped_release release;  // as in forward: OpenMP on the CPU backend
    kasmina::forward(p, b);
  }
  if (launched != nullptr) *launched = {b == Backend::cuda, p.stream};
  return nb::int_(p.rows);
}

nb::object layer_forward(nb::handle x, nb::handle y, nb::handle alpha, nb::handle weights,
                         nb::handle scales, nb::handle buffers, nb::handle config,
                         nb::handle backend) {
  return layer_forward_viewed(x, nullptr, y, alpha, weights, scales, buffers, config, backend);
}

// KasminaLayer.__call__'s eager no-grad call in one binding call (layer.py):
// what nn.Module.__call__, KasminaLayer.forward and its eager checks do on
// that path, here, so a layer call costs one Python frame (the __call__ that
// calls this) besides the binding and the launch. Returns y, or None, having
// written nothing, for anything the Python path must see: hooks of the
// module or global ones, Module.compile(), a forward overridden by a subclass
// or an instance, a tracing or transform context (the same tests as
// _ops.eager_ok), a lazy negation view, a backend name
// the layer would refuse, and whatever layer_forward leaves to Python. Each
// test reads the module's dicts and torch's state at call time, so nothing
// is cached that could go stale. A call that records a gradient goes on as
// forward would, to _forward_eager (EagerForward), and returns its y.
struct CallKeys {
  nb::object forward_hooks = interned("_forward_hooks"),
             forward_pre_hooks = interned("_forward_pre_hooks"),
             backward_hooks = interned("_backward_hooks"),
             backward_pre_hooks = interned("_backward_pre_hooks"),
             compiled_call_impl = interned("_compiled_call_impl"), forward = interned("forward"),
             parameters = interned("_parameters"), buffers = interned("_buffers"),
             config = interned("_config"), backend = interned("backend"),
             rows_written = interned("_rows_written"), alpha = interned("alpha"),
             weights = interned("weights"), scales = interned("scales"),
             telemetry_rows = interned("telemetry_rows"), requires_grad = interned("requires_grad"),
             version = interned("_version"),
             is_neg = interned("is_neg"), note_rows = interned("_note_rows"),
             forward_eager = interned("_forward_eager"),
             auto_name = interned("auto"), call_impl = interned("_call_impl"),
             wrapped_call_impl = interned("_wrapped_call_impl"), dunder_call = interned("__call__");
  nb::object global_hooks[4] = {interned("_global_forward_hooks"),
                                interned("_global_forward_pre_hooks"),
                                interned("_global_backward_hooks"),
                                interned("_global_backward_pre_hooks")};
  nb::object backend_names[3] = {interned("reference"), interned("cpu"), interned("cuda")};
  nb::object module_dict;  // torch.nn.modules.module.__dict__ (the global hooks live there)
  nb::object has_torch_function, dispatch_stack_len, functorch_peek, jit_tracing_state,
      grad_enabled, empty_like, contiguous, memory_format_kw;
  nb::object layer_forward_fn;  // KasminaLayer.forward, set by layer.py (None: disabled)
  // nn.Module's own call machinery as layer.py found it at import: a
  // subclass overriding them, or a patch of nn.Module.__call__ (profilers
  // do that) after the import, makes layer_call step aside.
  nb::object module_type, call_impl_fn, wrapped_call_impl_fn, module_call_fn;
  PyTypeObject* tensor_type = nullptr;  // torch.Tensor
  // The last class whose lookups passed, at this version tag (layer_call).
  // Compared by address and tag only: a new class at a freed address has
  // another tag.
  PyTypeObject* checked_type = nullptr;
  unsigned int checked_tag = 0;
};

CallKeys& call_keys() {
  static CallKeys* keys = [] {
    auto* k = new CallKeys;  // never destroyed: its Python objects must not outlive Python
    nb::object torch = nb::module_::import_("torch");
    nb::object torch_c = nb::module_::import_("torch._C");
    k->module_dict = nb::borrow(PyModule_GetDict(nb::module_::import_("torch.nn.modules.module").ptr()));
    k->has_torch_function = torch_c.attr("_has_torch_function");
    k->dispatch_stack_len = torch_c.attr("_len_torch_dispatch_stack");
    k->functorch_peek = torch_c.attr("_functorch").attr("peek_interpreter_stack");
    k->jit_tracing_state = torch_c.attr("_get_tracing_state");
    k->grad_enabled = torch_c.attr("is_grad_enabled");
    k->empty_like = torch.attr("empty_like");
    k->contiguous = torch.attr("contiguous_format");
    k->memory_format_kw = nb::steal(PyTuple_Pack(1, interned("memory_format").ptr()));
    k->layer_forward_fn = nb::none();
    k->module_type = k->call_impl_fn = k->wrapped_call_impl_fn = k->module_call_fn = nb::none();
    nb::object tensor = torch.attr("Tensor");
    k->tensor_type = reinterpret_cast<PyTypeObject*>(tensor.release().ptr());  // kept alive
    return k;
  }();
  return *keys;
}

// Borrowed item of a dict (nullptr when absent); a lookup error propagates.
PyObject* dict_item(PyObject* d, const nb::object& key) {
  PyObject* v = PyDict_GetItemWithError(d, key.ptr());
  if (v == nullptr && PyErr_Occurred()) throw nb::python_error();
  return v;
}

// The same as an owned reference (null when absent).
nb::object owned_item(PyObject* d, const nb::object& key) { return nb::borrow(dict_item(d, key)); }

bool empty_dict(PyObject* v) { return v != nullptr && PyDict_Check(v) && PyDict_GET_SIZE(v) == 0; }

bool truthy(PyObject* o) {
  if (o == nullptr) throw nb::python_error();
  const int t = PyObject_IsTrue(o);
  Py_DECREF(o);
  if (t < 0) throw nb::python_error();
  return t == 1;
}

nb::object call0(const nb::object& f) {
  PyObject* r = PyObject_CallNoArgs(f.ptr());
  if (r == nullptr) throw nb::python_error();
  return nb::steal(r);
}

nb::object layer_call(nb::handle self, nb::handle x) {
  CallKeys& k = call_keys();
  if (k.layer_forward_fn.is_none()) return nb::none();
  PyObject* dict_ptr = PyObject_GenericGetDict(self.ptr(), nullptr);
  if (dict_ptr == nullptr) throw nb::python_error();
  const nb::object dict = nb::steal(dict_ptr);
  PyObject* d = dict.ptr();
  // nn.Module.__call__'s fast path holds: no hooks, not compiled, and the
  // forward it would call is KasminaLayer.forward.
  for (const nb::object* key : {&k.forward_hooks, &k.forward_pre_hooks, &k.backward_hooks,
                                &k.backward_pre_hooks}) {
    if (!empty_dict(dict_item(d, *key))) return nb::none();
  }
  for (const nb::object& key : k.global_hooks) {
    if (!empty_dict(dict_item(k.module_dict.ptr(), key))) return nb::none();
  }
  PyObject* compiled = dict_item(d, k.compiled_call_impl);
  if (compiled != nullptr && compiled != Py_None) return nb::none();
  if (dict_item(d, k.forward) != nullptr) return nb::none();  // an instance's own forward
  // The forward, _call_impl and _wrapped_call_impl the class resolves to
  // are nn.Module's / ours, and nn.Module.__call__ is unpatched: looked up
  // once per version of the class. CPython's type version tag changes
  // (or goes to 0, never reused) whenever an attribute of the type or of
  // any base is set or deleted, nn.Module's __call__ included.
  PyTypeObject* const self_type = Py_TYPE(self.ptr());
  if (!(k.checked_type == self_type && self_type->tp_version_tag != 0 &&
        self_type->tp_version_tag == k.checked_tag)) {
    PyObject* type = reinterpret_cast<PyObject*>(self_type);
    const std::pair<PyObject*, const nb::object*> expected[] = {
        {type, &k.forward}, {type, &k.call_impl}, {type, &k.wrapped_call_impl},
        {k.module_type.ptr(), &k.dunder_call}};
    const nb::object* want[] = {&k.layer_forward_fn, &k.call_impl_fn, &k.wrapped_call_impl_fn,
                                &k.module_call_fn};
    for (int i = 0; i < 4; ++i) {
      PyObject* f = PyObject_GetAttr(expected[i].first, expected[i].second->ptr());
      if (f == nullptr) throw nb::python_error();
      const bool same = f == want[i]->ptr();
      Py_DECREF(f);
      if (!same) return nb::none();
    }
    k.checked_type = self_type;  // the lookups above assigned its tag (0: none, not cached)
    k.checked_tag = self_type->tp_version_tag;
  }
  // Owned references from here on: the calls into torch below run Python,
  // which could rebind (and so free) what the dicts held.
  const nb::object params_o = owned_item(d, k.parameters), buffers_o = owned_item(d, k.buffers),
                   config_o = owned_item(d, k.config);
  PyObject *params = params_o.ptr(), *buffers = buffers_o.ptr(), *config = config_o.ptr();
  if (params == nullptr || buffers == nullptr || config == nullptr || !PyDict_Check(params) ||
      !PyDict_Check(buffers))
    return nb::none();
  // rows_buf: layer._note_rows' buffer, looked up before anything runs (no
  // buffer: the Python path's KeyError).
  const nb::object alpha_o = owned_item(params, k.alpha), weights_o = owned_item(params, k.weights),
                   scales_o = owned_item(params, k.scales),
                   rows_buf_o = owned_item(buffers, k.telemetry_rows);
  PyObject *alpha = alpha_o.ptr(), *weights = weights_o.ptr(), *scales = scales_o.ptr(),
           *rows_buf = rows_buf_o.ptr();
  if (alpha == nullptr || weights == nullptr || scales == nullptr || rows_buf == nullptr)
    return nb::none();
  // Tensors only (anything else gets the Python path's error).
  for (PyObject* t : {x.ptr(), alpha, weights, scales}) {
    if (!PyType_IsSubtype(Py_TYPE(t), k.tensor_type)) return nb::none();
  }
  // _ops.eager_ok: plain tensors, no mode, transform or trace.
  {
    const nb::object group = nb::steal(PyTuple_Pack(4, x.ptr(), alpha, weights, scales));
    if (!group.is_valid()) throw nb::python_error();
    if (truthy(PyObject_CallOneArg(k.has_torch_function.ptr(), group.ptr()))) return nb::none();
  }
  if (truthy(call0(k.dispatch_stack_len).release().ptr())) return nb::none();
  if (!call0(k.functorch_peek).is_none()) return nb::none();
  if (!call0(k.jit_tracing_state).is_none()) return nb::none();
  // A gradient to record: forward's own next step, EagerForward through
  // _forward_eager (so a training step skips nn.Module.__call__ and forward too).
  if (truthy(call0(k.grad_enabled).release().ptr())) {
    bool needs_grad = false;
    for (PyObject* t : {x.ptr(), alpha, weights, scales}) {
      needs_grad = needs_grad || truthy(PyObject_GetAttr(t, k.requires_grad.ptr()));
    }
    if (needs_grad) {
      PyObject* margs[7] = {self.ptr(), x.ptr(), alpha, weights, scales, buffers, Py_True};
      PyObject* r = PyObject_VectorcallMethod(k.forward_eager.ptr(), margs, 7, nullptr);
      if (r == nullptr) throw nb::python_error();
      return nb::steal(r);
    }
  }
  if (truthy(PyObject_CallMethodNoArgs(x.ptr(), k.is_neg.ptr()))) return nb::none();  // Python raises
  // The layer's backend: "auto" as is, a known name as its id, else Python's error.
  const nb::object backend_o = owned_item(d, k.backend);
  PyObject* backend = backend_o.ptr();
  if (backend == nullptr) return nb::none();
  nb::object backend_arg;
  if (backend == k.auto_name.ptr() ||
      (PyUnicode_Check(backend) && PyUnicode_Compare(backend, k.auto_name.ptr()) == 0)) {
    backend_arg = k.auto_name;
  } else {
    for (int i = 0; i < 3 && !backend_arg.is_valid(); ++i) {
      if (PyUnicode_Check(backend) && PyUnicode_Compare(backend, k.backend_names[i].ptr()) == 0)
        backend_arg = nb::int_(i);
    }
    if (!backend_arg.is_valid()) return nb::none();
  }
  // y as layer.py allocates it, empty_like(x, memory_format=contiguous),
  // spelled empty_like(x) where x is row-major already (then the same layout,
  // and torch's argument parser is 0.5 us faster without the keyword).
  bool row_major = true;
  const View xv(x, "x");  // layer_forward_viewed uses it too
  {
    int64_t expect = 1;
    for (size_t i = xv.ndim(); i-- > 0;) {
      // Size-1 dimensions too: empty_like(x) copies x's strides, and y must
      // come out as the keyword spelling would make it.
      if (xv.stride(i) != expect) row_major = false;
      expect *= xv.shape(i);
    }
  }
  PyObject* args[2] = {x.ptr(), k.contiguous.ptr()};
  PyObject* y_ptr = row_major ? PyObject_Vectorcall(k.empty_like.ptr(), args, 1, nullptr)
                              : PyObject_Vectorcall(k.empty_like.ptr(), args, 1,
                                                    k.memory_format_kw.ptr());
  if (y_ptr == nullptr) throw nb::python_error();
  const nb::object y = nb::steal(y_ptr);
  Launched launched;
  const nb::object rows = layer_forward_viewed(x, &xv, y, nb::handle(alpha), nb::handle(weights),
                                               nb::handle(scales), nb::handle(buffers),
                                               nb::handle(config), backend_arg, &launched);
  if (rows.is_none()) return nb::none();
  // layer._note_rows, whose common case (this very buffer already holds
  // rows, unchanged since: its version counter) is tested here.
  const nb::object last_o = owned_item(d, k.rows_written);
  PyObject* last = last_o.ptr();
  bool unchanged = false;
  if (last != nullptr && PyTuple_Check(last) && PyTuple_GET_SIZE(last) == 3 &&
      PyTuple_GET_ITEM(last, 1) == rows_buf && PyTuple_GET_ITEM(last, 2) != Py_None) {
    const int same_rows = PyObject_RichCompareBool(PyTuple_GET_ITEM(last, 0), rows.ptr(), Py_EQ);
    if (same_rows < 0) throw nb::python_error();
    PyObject* version = PyObject_GetAttr(rows_buf, k.version.ptr());
    if (version == nullptr) {
      PyErr_Clear();  // an inference tensor has none: never unchanged
    } else {
      const int same_version = PyObject_RichCompareBool(PyTuple_GET_ITEM(last, 2), version, Py_EQ);
      Py_DECREF(version);
      if (same_version < 0) throw nb::python_error();
      unchanged = same_rows == 1 && same_version == 1;
    }
    // A CUDA graph capture records the fill (layer._note_rows). The stream
    // asked here is the one the kernel was captured on: PyTorch's current
    // stream of x's device, which is the current device (layer_forward).
    if (unchanged && launched.cuda && kasmina::cuda_stream_capturing(launched.stream))
      unchanged = false;
  }
  if (!unchanged) {
    PyObject* margs[4] = {self.ptr(), x.ptr(), rows.ptr(), rows_buf};
    PyObject* r = PyObject_VectorcallMethod(k.note_rows.ptr(), margs,
                                            4, nullptr);
    if (r == nullptr) throw nb::python_error();
    Py_DECREF(r);
  }
  return y;
}

std::string describe_forward(nb::handle x, nb::handle y, nb::handle telemetry,
                             nb::handle nonfinite, nb::handle stage, nb::handle kind,
                             nb::handle blueprint, nb::handle alpha, nb::handle weights,
                             nb::handle scales, nb::handle workspace, double dead_threshold,
                             std::optional<double> clamp_lo, std::optional<double> clamp_hi,
                             int backend, std::optional<uintptr_t> stream) {
  const Backend b = to_backend(backend);
  const ForwardViews v(x, nullptr, y, telemetry, nonfinite, stage, kind, blueprint, alpha, weights,
                       scales, workspace);
  return kasmina::describe_forward(
      forward_params(v, x, dead_threshold, clamp_lo, clamp_hi, b, stream), b);
}

void backward(nb::handle x_obj, nb::handle dy_obj, nb::handle dx_obj, nb::handle dweights_obj,
              nb::handle dscales_obj, nb::handle dalpha_obj, nb::handle grad_stats_obj,
              nb::handle stage_obj, nb::handle kind_obj, nb::handle blueprint_obj,
              nb::handle alpha_obj, nb::handle weights_obj, nb::handle scales_obj,
              nb::handle workspace_obj, std::optional<double> clamp_lo,
              std::optional<double> clamp_hi, std::optional<double> grad_clip, int backend,
              std::optional<uintptr_t> stream_arg) {
  using C = nb::dlpack::dtype_code;
  const Backend b = to_backend(backend);
  const View x(x_obj, "x"), dy(dy_obj, "dy"), dx(dx_obj, "dx"), dweights(dweights_obj, "dweights"),
      dscales(dscales_obj, "dscales"), dalpha(dalpha_obj, "dalpha"),
      grad_stats(grad_stats_obj, "grad_stats"), stage(stage_obj, "stage"),
      kind(kind_obj, "kind"), blueprint(blueprint_obj, "blueprint"), alpha(alpha_obj, "alpha"),
      weights(weights_obj, "weights"), scales(scales_obj, "scales");
  const OptView workspace(workspace_obj, "workspace");
  DeviceCheck dev;
  dev.add(x, "x");
  const LayerTensors t = layer_tensors(stage, kind, blueprint, alpha, weights, scales, dev);
  const int64_t hidden = t.chunk * t.num_seeds;
  KASMINA_CHECK_VALUE(hidden > 0, "hidden must be > 0, got 0");
  kasmina::BackwardParams p;
  p.dtype = activation_dtype(x, "x");
  const RowsView xv = rows_view(x, "x", hidden);
  check_like_x(dy, "dy", x, p.dtype);
  check_like_x(dx, "dx", x, p.dtype);
  const RowsView dyv = rows_view(dy, "dy", hidden);
  const RowsView dxv = rows_view(dx, "dx", hidden);
  const int64_t nb_rows = t.registry.num_blueprints;
  check_small(dweights, "dweights", C::Float, 32, "float32", {nb_rows, t.chunk});
  check_small(dscales, "dscales", C::Float, 32, "float32", {nb_rows});
  check_small(dalpha, "dalpha", C::Float, 32, "float32", {t.num_seeds});
  check_small(grad_stats, "grad_stats", C::Float, 32, "float32",
              {t.num_seeds, kasmina::kGradStatsWidth});
  dev.add(dy, "dy");
  dev.add(dx, "dx");
  dev.add(dweights, "dweights");
  dev.add(dscales, "dscales");
  dev.add(dalpha, "dalpha");
  dev.add(grad_stats, "grad_stats");
  set_workspace(workspace.get(), dev, p.workspace, p.workspace_bytes);
  dev.match(b);
  KASMINA_CHECK_VALUE(!grad_clip || *grad_clip > 0.0, "grad_clip must be > 0, got ",
                      grad_clip ? *grad_clip : 0.0);

  p.x = x.data();
  p.dy = dy.data();
  p.dx = dx.data();
  p.rows = xv.rows;
  p.hidden = hidden;
  p.num_seeds = t.num_seeds;
  p.x_row_stride = xv.row_stride;
  p.dy_row_stride = dyv.row_stride;
  p.dx_row_stride = dxv.row_stride;
  p.seeds = t.seeds;
  p.registry = t.registry;
  p.clamp = to_clamp(clamp_lo, clamp_hi);
  p.clip_enabled = grad_clip.has_value();
  p.clip_norm = grad_clip ? static_cast<float>(*grad_clip) : 0.0f;
  p.dweights = static_cast<float*>(dweights.data());
  p.dscales = static_cast<float*>(dscales.data());
  p.dalpha = static_cast<float*>(dalpha.data());
  p.grad_stats = static_cast<float*>(grad_stats.data());
  p.stream = reinterpret_cast<kasmina::Stream>(call_stream(x_obj, x, stream_arg));
  nb::gil_scoped_release release;
  kasmina::backward(p, b);
}

// Workspace a layer allocates once per device: the larger of forward's and
// backward's, which both leave it zero-filled, so one buffer serves both.
std::size_t workspace_bytes(int64_t hidden, int32_t num_seeds, int32_t num_blueprints,
                            int backend) {
  const Backend b = to_backend(backend);
  kasmina::ForwardParams f;
  f.hidden = hidden;
  f.num_seeds = num_seeds;
  f.registry.num_blueprints = num_blueprints;
  kasmina::BackwardParams bw;
  bw.hidden = hidden;
  bw.num_seeds = num_seeds;
  bw.registry.num_blueprints = num_blueprints;
  return std::max(kasmina::forward_workspace_bytes(f, b), kasmina::backward_workspace_bytes(bw, b));
}

// Copies of host arrays as numpy arrays (the core Layer stays the owner of its
// state; Python gets snapshots).
template <typename T>
nb::ndarray<nb::numpy, T> to_numpy(const T* data, std::initializer_list<size_t> shape) {
  size_t n = 1;
  for (size_t d : shape) n *= d;
  auto* copy = new std::vector<T>(data, data + n);
  nb::capsule owner(copy, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(copy->data(), shape, owner);
}
template <typename T>
nb::ndarray<nb::numpy, T> to_numpy(const std::vector<T>& v) {
  return to_numpy<T>(v.data(), {v.size()});
}

using HostFloats = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using HostBytes = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

std::span<const float> as_span(const HostFloats& a) { return {a.data(), a.shape(0)}; }

kasmina::StrategyParams strategy_params(int strategy, int ramp_steps, double drift_threshold,
                                        double grad_norm_lower, double grad_norm_upper) {
  kasmina::StrategyParams s;
  KASMINA_CHECK_VALUE(strategy >= 0 && strategy < kasmina::kNumStrategies,
                      "strategy must be in [0, ", kasmina::kNumStrategies, "), got ", strategy);
  s.strategy = static_cast<kasmina::Strategy>(strategy);
  s.ramp_steps = ramp_steps;
  s.drift_threshold = static_cast<float>(drift_threshold);
  s.grad_norm_lower = static_cast<float>(grad_norm_lower);
  s.grad_norm_upper = static_cast<float>(grad_norm_upper);
  return s;
}

kasmina::LayerConfig make_config(int64_t hidden, int32_t num_seeds, int32_t max_blueprints,
                                 double dead_threshold, std::optional<double> clamp_lo,
                                 std::optional<double> clamp_hi, std::optional<double> grad_clip,
                                 int32_t stabilization_steps, int32_t embargo_steps) {
  kasmina::LayerConfig c;
  c.hidden = hidden;
  c.num_seeds = num_seeds;
  c.max_blueprints = max_blueprints;
  c.dead_threshold = static_cast<float>(dead_threshold);
  c.clamp = to_clamp(clamp_lo, clamp_hi);
  c.clip_enabled = grad_clip.has_value();
  c.clip_norm = grad_clip ? static_cast<float>(*grad_clip) : 0.0f;
  c.stabilization_steps = stabilization_steps;
  c.embargo_steps = embargo_steps;
  return c;
}

// Cross-rank telemetry (kasmina.distributed): the gathered rows of every rank
// merged in rank order by the core (include/kasmina/telemetry.hpp). Host
// arrays in, fresh numpy arrays out.
using HostTelemetry = nb::ndarray<const float, nb::ndim<3>, nb::c_contig, nb::device::cpu>;
using HostCounts2 = nb::ndarray<const int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using HostCounts1 = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

nb::tuple merge_telemetry(const HostTelemetry& telemetry, const HostCounts2& nonfinite,
                          const HostCounts1& rows, int64_t chunk) {
  const auto ranks = static_cast<int32_t>(telemetry.shape(0));
  const auto seeds = static_cast<int32_t>(telemetry.shape(1));
  KASMINA_CHECK_VALUE(telemetry.shape(2) == static_cast<size_t>(kasmina::kTelemetryWidth),
                      "telemetry must have shape [ranks, seeds, ", kasmina::kTelemetryWidth,
                      "], got ", shape_str(telemetry));
  KASMINA_CHECK_VALUE(nonfinite.shape(0) == telemetry.shape(0) &&
                          nonfinite.shape(1) == telemetry.shape(1),
                      "nonfinite must have shape [", ranks, ", ", seeds, "], got ",
                      shape_str(nonfinite));
  std::vector<float> out(static_cast<size_t>(seeds) * kasmina::kTelemetryWidth);
  std::vector<int64_t> out_nf(static_cast<size_t>(seeds));
  kasmina::merge_telemetry(
      std::span<const float>(telemetry.data(), telemetry.size()),
      std::span<const int64_t>(nonfinite.data(), nonfinite.size()),
      std::span<const int64_t>(rows.data(), rows.shape(0)), ranks, seeds, chunk, out, out_nf);
  return nb::make_tuple(
      to_numpy<float>(out.data(), {static_cast<size_t>(seeds),
                                   static_cast<size_t>(kasmina::kTelemetryWidth)}),
      to_numpy(out_nf));
}

void translate(const std::exception_ptr& p, void*) {
  try {
    std::rethrow_exception(p);
  } catch (const kasmina::Error& e) {
    switch (e.kind()) {
      case kasmina::ErrorKind::value: PyErr_SetString(PyExc_ValueError, e.what()); break;
      case kasmina::ErrorKind::type: PyErr_SetString(PyExc_TypeError, e.what()); break;
      default: PyErr_SetString(PyExc_RuntimeError, e.what()); break;
    }
  }
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "kasmina C++ core (nanobind). Use the kasmina package, not this module.";
  nb::register_exception_translator(translate);

  m.def("forward", &forward, "x"_a, "y"_a, "telemetry"_a, "nonfinite"_a, "stage"_a, "kind"_a,
        "blueprint"_a, "alpha"_a, "weights"_a, "scales"_a, "workspace"_a.none(),
        "dead_threshold"_a, "clamp_lo"_a.none(), "clamp_hi"_a.none(), "backend"_a,
        "stream"_a.none());
  // Positional only, no defaults: nanobind's simple (fastest) call path.
  m.def("layer_forward", &layer_forward,
        "KasminaLayer's eager no-grad forward (layer.py): x's rows, or None for the Python path.");
  m.def("layer_call", &layer_call,
        "KasminaLayer.__call__'s eager no-grad call (layer.py): y, or None for nn.Module.__call__.");
  m.def(
      "_set_layer_forward",
      [](nb::handle f, nb::handle module_type) {
        CallKeys& k = call_keys();
        k.checked_type = nullptr;  // the class lookups compare against what is set here
        k.checked_tag = 0;
        k.layer_forward_fn = nb::borrow(f);
        k.module_type = nb::borrow(module_type);
        k.call_impl_fn = k.module_type.attr("_call_impl");
        k.wrapped_call_impl_fn = k.module_type.attr("_wrapped_call_impl");
        k.module_call_fn = k.module_type.attr("__call__");
      },
      "forward"_a.none(), "module_type"_a,
      "layer.py: KasminaLayer.forward, which layer_call stands for (None turns layer_call off), "
      "and torch.nn.Module, whose call machinery it must find unchanged.");
  m.def("describe_forward", &describe_forward, "x"_a, "y"_a, "telemetry"_a, "nonfinite"_a,
        "stage"_a, "kind"_a, "blueprint"_a, "alpha"_a, "weights"_a, "scales"_a,
        "workspace"_a.none(), "dead_threshold"_a, "clamp_lo"_a.none(), "clamp_hi"_a.none(),
        "backend"_a, "stream"_a.none());
  m.def("backward", &backward, "x"_a, "dy"_a, "dx"_a, "dweights"_a, "dscales"_a, "dalpha"_a,
        "grad_stats"_a, "stage"_a, "kind"_a, "blueprint"_a, "alpha"_a, "weights"_a, "scales"_a,
        "workspace"_a.none(), "clamp_lo"_a.none(), "clamp_hi"_a.none(), "grad_clip"_a.none(),
        "backend"_a, "stream"_a.none());
  m.def("has_exchange_api",
        [](nb::handle t) { return exchange_api(t.ptr()) != nullptr; }, "tensor"_a,
        "Whether the tensor's type publishes the DLPack C exchange API (and it is enabled).");
  m.def("_set_exchange_api_enabled", [](bool on) { g_exchange.enabled = on; }, "on"_a,
        "Tests only: False makes every tensor cross through __dlpack__.");
  m.def("workspace_bytes", &workspace_bytes, "hidden"_a, "num_seeds"_a, "num_blueprints"_a,
        "backend"_a);
  m.def("backend_available",
        [](int b) { return kasmina::backend_available(to_backend(b)); }, "backend"_a);
  m.def("backend_unavailable_reason",
        [](int b) { return kasmina::backend_unavailable_reason(to_backend(b)); }, "backend"_a);
  m.def("backend_name",
        [](int b) { return std::string(kasmina::backend_name(to_backend(b))); }, "backend"_a);
  m.def("build_info", []() {
    const kasmina::BuildInfo info = kasmina::build_info();
    nb::dict d;
    d["version"] = info.version;
    d["compiler"] = info.compiler;
    d["cuda_compiled"] = info.cuda_compiled;
    d["cuda_architectures"] = info.cuda_architectures;
    d["cuda_devices"] = info.cuda_devices;
    d["cpu_threads"] = info.cpu_threads;
    return d;
  });
  m.def("set_profiling", [](bool on) { kasmina::set_profiling(on); }, "on"_a);
  m.def("profiling", []() { return kasmina::profiling(); });
  m.def("profile_reset", []() { kasmina::profile_reset(); });
  m.def("profile_report", []() {
    nb::list out;
    for (const kasmina::ProfileEntry& e : kasmina::profile_report()) {
      nb::dict d;
      d["kernel"] = e.kernel;
      d["calls"] = e.calls;
      d["total_us"] = e.total_us;
      d["mean_us"] = e.mean_us();
      d["bytes"] = e.bytes;
      d["gbps"] = e.gbps();
      out.append(d);
    }
    return out;
  });
  m.def("format_profile", []() { return kasmina::format_profile(kasmina::profile_report()); });
  m.def("set_cuda_launch_config",
        [](int forward_rows, int backward_rows, int variant, int stages, int group, int threads) {
    kasmina::CudaLaunchConfig c;
    c.forward_rows_in_flight = forward_rows;
    c.backward_rows_in_flight = backward_rows;
    c.forward_variant = static_cast<kasmina::CudaForwardVariant>(variant);
    c.forward_stages = stages;
    c.forward_group = group;
    c.forward_block_threads = threads;
    kasmina::set_cuda_launch_config(c);
  }, "forward_rows_in_flight"_a, "backward_rows_in_flight"_a, "forward_variant"_a = 0,
     "forward_stages"_a = 0, "forward_group"_a = 0, "forward_block_threads"_a = 0,
     "forward_variant: 0 automatic, 1 generic, 2 tma (sm_90); forward_group: lanes per row; "
     "forward_block_threads: threads per forward CTA (64, 128 or 256).");
  m.def("cuda_launch_config", []() {
    const kasmina::CudaLaunchConfig c = kasmina::cuda_launch_config();
    nb::dict d;
    d["forward_rows_in_flight"] = c.forward_rows_in_flight;
    d["backward_rows_in_flight"] = c.backward_rows_in_flight;
    d["forward_variant"] = static_cast<int>(c.forward_variant);
    d["forward_stages"] = c.forward_stages;
    d["forward_group"] = c.forward_group;
    d["forward_block_threads"] = c.forward_block_threads;
    return d;
  });
  m.def("set_cuda_tuned_table",
        [](const std::vector<std::tuple<std::string, int, int, int, int, int, int, int, int>>& rows) {
    std::vector<kasmina::CudaTunedEntry> entries;
    for (const auto& [device, elem_bytes, shape, fwd, bwd, variant, stages, group, threads] : rows) {
      KASMINA_CHECK_VALUE(shape >= 0 && shape <= 2, "tuned entry: shape class must be 0, 1 or 2 (got ",
                          shape, ")");
      kasmina::CudaTunedEntry e;
      e.device = device;
      e.elem_bytes = elem_bytes;
      e.shape = static_cast<kasmina::ShapeClass>(shape);
      e.forward_rows_in_flight = fwd;
      e.backward_rows_in_flight = bwd;
      e.forward_variant = static_cast<kasmina::CudaForwardVariant>(variant);
      e.forward_stages = stages;
      e.forward_group = group;
      e.forward_block_threads = threads;
      entries.push_back(e);
    }
    kasmina::set_cuda_tuned_table(entries);
  }, "entries"_a, "Entries (device, elem_bytes, shape_class 0/1/2, forward rows, backward rows, "
     "forward variant 0/1/2, forward stages, forward lanes per row, forward threads per CTA).");
  m.def("cuda_tuned_table", []() {
    nb::list out;
    for (const kasmina::CudaTunedEntry& e : kasmina::cuda_tuned_table()) {
      out.append(nb::make_tuple(e.device, e.elem_bytes, static_cast<int>(e.shape),
                                e.forward_rows_in_flight, e.backward_rows_in_flight,
                                static_cast<int>(e.forward_variant), e.forward_stages,
                                e.forward_group, e.forward_block_threads));
    }
    return out;
  });
  m.def("shape_class", [](int64_t rows, int64_t hidden, int elem_bytes) {
    return static_cast<int>(kasmina::shape_class(rows, hidden, static_cast<std::size_t>(elem_bytes)));
  }, "rows"_a, "hidden"_a, "elem_bytes"_a);
  m.def("allowed_targets", [](int stage) {
    KASMINA_CHECK_VALUE(stage >= 0 && stage < kasmina::kNumStages, "stage must be in [0, ",
                        kasmina::kNumStages, "), got ", stage);
    std::vector<int> out;
    for (kasmina::Stage s : kasmina::Layer::allowed_targets(static_cast<kasmina::Stage>(stage)))
      out.push_back(static_cast<int>(s));
    return out;
  });
  m.def("merge_telemetry", &merge_telemetry, "telemetry"_a, "nonfinite"_a, "rows"_a, "chunk"_a,
        "Telemetry [ranks, seeds, 8] of row shards merged in rank order (Chan): "
        "(telemetry [seeds, 8] float32, nonfinite [seeds] int64).");
  m.attr("TELEMETRY_WIDTH") = kasmina::kTelemetryWidth;
  m.attr("GRAD_STATS_WIDTH") = kasmina::kGradStatsWidth;
  m.attr("DRIFT_WINDOW") = kasmina::kDriftWindow;

  nb::class_<kasmina::Layer>(m, "Layer")
      .def("__init__",
           [](kasmina::Layer* self, int64_t hidden, int32_t num_seeds, int32_t max_blueprints,
              double dead_threshold, std::optional<double> clamp_lo,
              std::optional<double> clamp_hi, std::optional<double> grad_clip,
              int32_t stabilization_steps, int32_t embargo_steps) {
             new (self) kasmina::Layer(make_config(hidden, num_seeds, max_blueprints,
                                                   dead_threshold, clamp_lo, clamp_hi, grad_clip,
                                                   stabilization_steps, embargo_steps));
           },
           "hidden"_a, "num_seeds"_a, "max_blueprints"_a = 64, "dead_threshold"_a = 1e-6,
           "clamp_lo"_a.none() = nb::none(), "clamp_hi"_a.none() = nb::none(),
           "grad_clip"_a.none() = nb::none(), "stabilization_steps"_a = 5, "embargo_steps"_a = 5)
      .def_prop_ro("hidden", [](const kasmina::Layer& l) { return l.config().hidden; })
      .def_prop_ro("num_seeds", [](const kasmina::Layer& l) { return l.config().num_seeds; })
      .def_prop_ro("chunk", [](const kasmina::Layer& l) { return l.config().chunk(); })
      // The configuration as the constructor takes it (a loaded state may
      // carry its own clamp / clip / thresholds).
      .def_prop_ro("config",
                   [](const kasmina::Layer& l) {
                     const kasmina::LayerConfig& c = l.config();
                     nb::dict d;
                     d["hidden"] = c.hidden;
                     d["num_seeds"] = c.num_seeds;
                     d["max_blueprints"] = c.max_blueprints;
                     d["dead_threshold"] = static_cast<double>(c.dead_threshold);
                     d["clamp_lo"] = c.clamp.enabled ? nb::cast(static_cast<double>(c.clamp.lo)) : nb::none();
                     d["clamp_hi"] = c.clamp.enabled ? nb::cast(static_cast<double>(c.clamp.hi)) : nb::none();
                     d["grad_clip"] = c.clip_enabled ? nb::cast(static_cast<double>(c.clip_norm)) : nb::none();
                     d["stabilization_steps"] = c.stabilization_steps;
                     d["embargo_steps"] = c.embargo_steps;
                     return d;
                   })
      .def_prop_ro("max_blueprints",
                   [](const kasmina::Layer& l) { return l.config().max_blueprints; })
      .def("germinate",
           [](kasmina::Layer& l, int32_t seed, int kind, int32_t blueprint, int strategy,
              int ramp_steps, double drift_threshold, double lower, double upper) {
             KASMINA_CHECK_VALUE(kind >= 0 && kind < kasmina::kNumKinds, "kind must be in [0, ",
                                 kasmina::kNumKinds, "), got ", kind);
             return l.germinate(seed, static_cast<kasmina::Kind>(kind), blueprint,
                                strategy_params(strategy, ramp_steps, drift_threshold, lower,
                                                upper));
           },
           "seed"_a, "kind"_a, "blueprint"_a, "strategy"_a, "ramp_steps"_a, "drift_threshold"_a,
           "grad_norm_lower"_a, "grad_norm_upper"_a)
      .def("transition",
           [](kasmina::Layer& l, int32_t seed, int stage) {
             KASMINA_CHECK_VALUE(stage >= 0 && stage < kasmina::kNumStages,
                                 "stage must be in [0, ", kasmina::kNumStages, "), got ", stage);
             l.transition(seed, static_cast<kasmina::Stage>(stage));
           },
           "seed"_a, "stage"_a)
      .def("set_strategy",
           [](kasmina::Layer& l, int32_t seed, int strategy, int ramp_steps,
              double drift_threshold, double lower, double upper) {
             l.set_strategy(seed, strategy_params(strategy, ramp_steps, drift_threshold, lower,
                                                  upper));
           },
           "seed"_a, "strategy"_a, "ramp_steps"_a, "drift_threshold"_a, "grad_norm_lower"_a,
           "grad_norm_upper"_a)
      .def("step",
           [](kasmina::Layer& l, const HostFloats& loss, const HostFloats& grad_norm,
              const HostFloats& drift) { l.step(as_span(loss), as_span(grad_norm), as_span(drift)); },
           "loss"_a, "grad_norm"_a, "drift"_a)
      .def("set_alpha", [](kasmina::Layer& l, const HostFloats& a) { l.set_alpha(as_span(a)); },
           "alpha"_a)
      .def("set_registry_values",
           [](kasmina::Layer& l, const HostFloats& w, const HostFloats& s) {
             l.set_registry_values(as_span(w), as_span(s));
           },
           "weights"_a, "scales"_a)
      .def("verify", &kasmina::Layer::verify)
      .def("describe", &kasmina::Layer::describe)
      .def("save",
           [](const kasmina::Layer& l) {
             const std::vector<uint8_t> bytes = l.save();
             return nb::bytes(reinterpret_cast<const char*>(bytes.data()), bytes.size());
           })
      .def("load",
           [](kasmina::Layer& l, const HostBytes& bytes) {
             l.load(std::span<const uint8_t>(bytes.data(), bytes.shape(0)));
           },
           "state"_a)
      .def("checksum", &kasmina::Layer::compute_checksum, "seed"_a)
      // Snapshots of the seed arrays and the registry (numpy copies).
      .def_prop_ro("stage", [](const kasmina::Layer& l) { return to_numpy(l.seeds().stage); }, nb::rv_policy::move)
      .def_prop_ro("kind", [](const kasmina::Layer& l) { return to_numpy(l.seeds().kind); }, nb::rv_policy::move)
      .def_prop_ro("blueprint",
                   [](const kasmina::Layer& l) { return to_numpy(l.seeds().blueprint); }, nb::rv_policy::move)
      .def_prop_ro("alpha", [](const kasmina::Layer& l) { return to_numpy(l.seeds().alpha); }, nb::rv_policy::move)
      .def_prop_ro("steps_in_stage",
                   [](const kasmina::Layer& l) { return to_numpy(l.seeds().steps_in_stage); }, nb::rv_policy::move)
      .def_prop_ro("strategy",
                   [](const kasmina::Layer& l) { return to_numpy(l.seeds().strategy); }, nb::rv_policy::move)
      .def_prop_ro("ramp_steps",
                   [](const kasmina::Layer& l) { return to_numpy(l.seeds().ramp_steps); }, nb::rv_policy::move)
      .def_prop_ro("drift_threshold",
                   [](const kasmina::Layer& l) { return to_numpy(l.seeds().drift_threshold); }, nb::rv_policy::move)
      .def_prop_ro("grad_norm_lower",
                   [](const kasmina::Layer& l) { return to_numpy(l.seeds().grad_norm_lower); }, nb::rv_policy::move)
      .def_prop_ro("grad_norm_upper",
                   [](const kasmina::Layer& l) { return to_numpy(l.seeds().grad_norm_upper); }, nb::rv_policy::move)
      .def_prop_ro("loss_baseline",
                   [](const kasmina::Layer& l) { return to_numpy(l.seeds().loss_baseline); }, nb::rv_policy::move)
      .def_prop_ro("registry_weights",
                   [](const kasmina::Layer& l) {
                     const kasmina::Registry& r = l.registry();
                     return to_numpy<float>(r.weights.data(),
                                            {static_cast<size_t>(r.num_blueprints),
                                             static_cast<size_t>(r.chunk)});
                   }, nb::rv_policy::move)
      .def_prop_ro("registry_scales",
                   [](const kasmina::Layer& l) { return to_numpy(l.registry().scales); }, nb::rv_policy::move)
      .def_prop_ro("registry_row_kind",
                   [](const kasmina::Layer& l) { return to_numpy(l.registry().row_kind); }, nb::rv_policy::move);
}
