// The library's one exception type (SPEC section 8). Every public entry point
// validates its arguments before it touches memory and throws kasmina::Error
// with what was expected and what came. The category tells the Python binding
// which built-in exception to raise (ValueError, TypeError, RuntimeError).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace kasmina {

enum class ErrorKind : int { value = 0, type = 1, runtime = 2 };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

namespace detail {
template <typename... Args>
[[noreturn]] void raise(ErrorKind kind, const char* file, int line, const Args&... parts) {
  std::ostringstream os;
  os << "kasmina: ";
  (os << ... << parts);
  (void)file;
  (void)line;
  throw Error(kind, os.str());
}
}  // namespace detail

}  // namespace kasmina

// KASMINA_CHECK(cond, kind, parts...): throw kasmina::Error of that kind with
// the parts streamed into the message when cond is false. Messages say what
// was expected and what came, e.g. "hidden must be divisible by num_seeds
// (hidden = 10, num_seeds = 3)".
#define KASMINA_CHECK(cond, kind, ...)                                              \
  do {                                                                              \
    if (!(cond)) ::kasmina::detail::raise((kind), __FILE__, __LINE__, __VA_ARGS__); \
  } while (0)
#define KASMINA_CHECK_VALUE(cond, ...) KASMINA_CHECK(cond, ::kasmina::ErrorKind::value, __VA_ARGS__)
#define KASMINA_CHECK_TYPE(cond, ...) KASMINA_CHECK(cond, ::kasmina::ErrorKind::type, __VA_ARGS__)
#define KASMINA_CHECK_RUNTIME(cond, ...) \
  KASMINA_CHECK(cond, ::kasmina::ErrorKind::runtime, __VA_ARGS__)
#define KASMINA_FAIL(kind, ...) ::kasmina::detail::raise((kind), __FILE__, __LINE__, __VA_ARGS__)
