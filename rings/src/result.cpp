// Error formatting for uvirtio::Error.
#include "uvirtio/base/result.hpp"

namespace uvirtio {

const char* errc_name(Errc c) noexcept {
  switch (c) {
    case Errc::io:
      return "io";
    case Errc::invalid_argument:
      return "invalid_argument";
    case Errc::not_found:
      return "not_found";
    case Errc::permission:
      return "permission";
    case Errc::unsupported:
      return "unsupported";
    case Errc::bad_device_data:
      return "bad_device_data";
    case Errc::broken:
      return "broken";
    case Errc::needs_reset:
      return "needs_reset";
    case Errc::timeout:
      return "timeout";
    case Errc::busy:
      return "busy";
    case Errc::device_error:
      return "device_error";
    case Errc::peer_gone:
      return "peer_gone";
    case Errc::stale_completion:
      return "stale_completion";
  }
  return "unknown";
}

Error Error::from_errno(int err, std::string device, std::string op, std::string detail) {
  Errc code = Errc::io;
  if (err == EPERM || err == EACCES)
    code = Errc::permission;
  else if (err == ENOENT || err == ENODEV || err == ENXIO)
    code = Errc::not_found;
  else if (err == EBUSY)
    code = Errc::busy;
  else if (err == EINVAL)
    code = Errc::invalid_argument;
  else if (err == ETIMEDOUT)
    code = Errc::timeout;
  std::string cause = std::strerror(err);
  if (!detail.empty()) cause = detail + ": " + cause;
  return Error(code, std::move(device), std::move(op), std::move(cause), err);
}

std::string Error::message() const {
  std::string m;
  auto add = [&m](const std::string& part) {
    if (part.empty()) return;
    if (!m.empty()) m += ": ";
    m += part;
  };
  add(device_);
  add(op_);
  add(cause_);
  return m;
}

Error Error::within(const std::string& outer_op) const {
  Error e = *this;
  e.op_ = op_.empty() ? outer_op : outer_op + ": " + op_;
  return e;
}

}  // namespace uvirtio
