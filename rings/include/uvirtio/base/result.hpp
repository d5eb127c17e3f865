// Result and Error: the one error type of uvirtio's control paths.
//
// Every fallible control-path call returns a [[nodiscard]] Result<T>. An
// Error names the device (a PCI BDF or another object name), the operation
// that failed and the cause, so a message printed to a user is complete on
// its own: "0000:00:03.0: VFIO_GROUP_SET_CONTAINER: Operation not permitted".
// Nothing here throws and library code never aborts.
#pragma once

#include <cerrno>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

namespace uvirtio {

enum class Errc {
  io,                // an OS call failed; sys_errno() tells which
  invalid_argument,  // the caller passed a bad value
  not_found,         // no such device, file or capability
  permission,        // missing privilege
  unsupported,       // the device or kernel lacks something we need
  bad_device_data,   // the device wrote or presented a value that fails validation
  broken,            // an earlier violation latched the queue or device broken
  needs_reset,       // the device set DEVICE_NEEDS_RESET
  timeout,           // a deadline passed
  busy,              // the resource is in use by someone else
  device_error,      // the device completed a request with an error status
  peer_gone,         // the other side of a channel detached or stopped heartbeating
  stale_completion,  // the device completed a request from before a reset; the queue needs a reset
};

const char* errc_name(Errc c) noexcept;

class Error {
 public:
  Error(Errc code, std::string device, std::string op, std::string cause, int sys_errno = 0)
      : code_(code),
        sys_errno_(sys_errno),
        device_(std::move(device)),
        op_(std::move(op)),
        cause_(std::move(cause)) {}

  // Builds an Errc::io (or permission/not_found) error from an errno value.
  static Error from_errno(int err, std::string device, std::string op, std::string detail = {});

  Errc code() const noexcept { return code_; }
  int sys_errno() const noexcept { return sys_errno_; }
  const std::string& device() const noexcept { return device_; }
  const std::string& op() const noexcept { return op_; }
  const std::string& cause() const noexcept { return cause_; }

  // "DEVICE: OP: CAUSE" (parts that are empty are left out).
  std::string message() const;

  // Returns a copy whose operation is "outer: inner", for adding context
  // while an error travels up.
  Error within(const std::string& outer_op) const;

 private:
  Errc code_;
  int sys_errno_;
  std::string device_;
  std::string op_;
  std::string cause_;
};

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}      // NOLINT: implicit by design
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT

  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const& { return std::get<1>(v_); }
  Error&& error() && { return std::get<1>(std::move(v_)); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  // User-provided on purpose (not = default): `return {}` value-initialises,
  // and with a defaulted constructor that first zeroes the whole object,
  // the Error's storage too (a 112-byte `rep stos` per ok(), the largest
  // single cost of a channel publication in a profile).
  Result() noexcept {}                                            // NOLINT(modernize-use-equals-default)
  Result(Error error) : err_(std::in_place, std::move(error)) {}  // NOLINT

  bool ok() const noexcept { return !err_.has_value(); }
  explicit operator bool() const noexcept { return ok(); }
  const Error& error() const& { return *err_; }
  Error&& error() && { return std::move(*err_); }

 private:
  std::optional<Error> err_;
};

inline Result<void> ok() { return {}; }

}  // namespace uvirtio

// Propagates an error: UV_TRY(auto x, f()); or UV_TRY_VOID(g());
#define UV_CONCAT_INNER(a, b) a##b
#define UV_CONCAT(a, b) UV_CONCAT_INNER(a, b)
#define UV_TRY_IMPL(tmp, decl, expr)            \
  auto tmp = (expr);                            \
  if (!tmp.ok()) return std::move(tmp).error(); \
  decl = std::move(tmp).value()
#define UV_TRY(decl, expr) UV_TRY_IMPL(UV_CONCAT(uv_try_, __COUNTER__), decl, expr)
#define UV_TRY_VOID(expr)                                           \
  do {                                                              \
    auto uv_try_void_ = (expr);                                     \
    if (!uv_try_void_.ok()) return std::move(uv_try_void_).error(); \
  } while (0)
