// The C API of the pmem driver (uvirtio/pmem.h).
#include "uvirtio/driver/pmem_c.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>

#include "uvirtio/driver/pmem.hpp"
#include "uvirtio/pmem.h"

struct uvirtio_pmem {
  // Each thread's last failure: threads share handles, and a message must
  // stay valid while another thread fails (a node's string never moves when
  // other threads add theirs). Declared before `pm`, so they outlive it:
  // callbacks that run while `pm` closes may still ask for last_error().
  mutable std::mutex errors_mutex;
  std::unordered_map<std::thread::id, std::string> errors;
  std::unique_ptr<uvirtio::driver::Pmem> pm;

  std::string& own_error() {
    std::lock_guard lk(errors_mutex);
    return errors[std::this_thread::get_id()];
  }
};

int uvirtio::driver::pmem_c_errno(const uvirtio::Error& e) {
  using uvirtio::Errc;
  switch (e.code()) {
    case Errc::invalid_argument:
      return -EINVAL;
    case Errc::timeout:
      return -ETIMEDOUT;
    case Errc::permission:
      return -EPERM;
    case Errc::not_found:
      return -ENODEV;
    case Errc::busy:
      return -EBUSY;
    case Errc::unsupported:
      return -EOPNOTSUPP;
    case Errc::needs_reset:
    case Errc::stale_completion:
      return -ERESTART;  // uvirtio_pmem_recover() may bring the device back
    case Errc::io:
      // An OS call failed: its own errno says more than EIO would (ENOMEM,
      // EMFILE, ...). Without one, EIO.
      return e.sys_errno() > 0 ? -e.sys_errno() : -EIO;
    default:
      return -EIO;  // device_error (host fsync failed), broken, bad device data
  }
}

namespace {

int to_errno(const uvirtio::Error& e) { return uvirtio::driver::pmem_c_errno(e); }

int result(uvirtio_pmem* pm, const uvirtio::Result<void>& r) {
  if (r.ok()) return 0;
  pm->own_error() = r.error().message();
  return to_errno(r.error());
}

// The C completion constants and the modes they stand for.
struct Completion {
  int c;
  uvirtio::driver::CompletionMode mode;
};
constexpr Completion kCompletions[] = {{UVIRTIO_PMEM_HYBRID, uvirtio::driver::CompletionMode::hybrid},
                                       {UVIRTIO_PMEM_INTERRUPT, uvirtio::driver::CompletionMode::interrupt},
                                       {UVIRTIO_PMEM_POLL, uvirtio::driver::CompletionMode::polling}};

int fail_open(char* err, size_t errlen, const std::string& msg, int code) {
  if (err != nullptr && errlen > 0) {
    std::strncpy(err, msg.c_str(), errlen - 1);
    err[errlen - 1] = '\0';
  }
  return code;
}

}  // namespace

namespace uvirtio::driver {

uvirtio_pmem* to_c_handle(std::unique_ptr<Pmem> pm) {
  if (!pm) return nullptr;  // no device: no handle (every call refuses NULL)
  auto* h = new uvirtio_pmem;
  h->pm = std::move(pm);
  return h;
}

Result<PmemOptions> pmem_options_from_c(const uvirtio_pmem_options* opts) {
  PmemOptions o;
  if (opts == nullptr) return o;
  const std::string op = "pmem options";
  if (opts->size < sizeof(uvirtio_pmem_options))
    return Error(Errc::invalid_argument, "", op,
                 "size is " + std::to_string(opts->size) + ", expected " +
                     std::to_string(sizeof(uvirtio_pmem_options)) +
                     " (call uvirtio_pmem_options_init first)");
  const auto* m = std::find_if(std::begin(kCompletions), std::end(kCompletions),
                               [&](const Completion& c) { return c.c == opts->completion; });
  if (m == std::end(kCompletions))
    return Error(Errc::invalid_argument, "", op,
                 "completion " + std::to_string(opts->completion) +
                     " is none of UVIRTIO_PMEM_HYBRID (0), _INTERRUPT (1), _POLL (2)");
  o.completion = m->mode;
  if (opts->timeout_ms == 0) return Error(Errc::invalid_argument, "", op, "timeout_ms is 0; it must be > 0");
  o.timeout = std::chrono::milliseconds(opts->timeout_ms);
  o.recover_on_reset = opts->recover_on_reset != 0;
  o.gather_limit = std::chrono::microseconds(opts->gather_us);
  return o;
}

}  // namespace uvirtio::driver

extern "C" {

void uvirtio_pmem_options_init(uvirtio_pmem_options* opts) {
  if (opts == nullptr) return;
  const uvirtio::driver::PmemOptions d;
  opts->size = sizeof(uvirtio_pmem_options);
  for (const Completion& c : kCompletions)
    if (c.mode == d.completion) opts->completion = c.c;
  opts->timeout_ms = static_cast<uint32_t>(d.timeout.count());
  opts->recover_on_reset = d.recover_on_reset ? 1 : 0;
  opts->gather_us = static_cast<uint32_t>(d.gather_limit.count());
}

int uvirtio_pmem_open_opts(const char* bdf, const uvirtio_pmem_options* opts, uvirtio_pmem** out, char* err,
                           size_t errlen) {
  if (bdf == nullptr || out == nullptr)
    return fail_open(err, errlen, "uvirtio_pmem_open: null argument", -EINVAL);
  auto addr = uvirtio::pci::Bdf::parse(bdf);
  if (!addr) return fail_open(err, errlen, addr.error().message(), -EINVAL);
  auto o = uvirtio::driver::pmem_options_from_c(opts);
  if (!o) return fail_open(err, errlen, std::string(bdf) + ": " + o.error().message(), -EINVAL);
  auto pm = uvirtio::driver::Pmem::open(*addr, *o);
  if (!pm) return fail_open(err, errlen, pm.error().message(), to_errno(pm.error()));
  *out = uvirtio::driver::to_c_handle(std::move(pm).value());
  return 0;
}

int uvirtio_pmem_open(const char* bdf, uvirtio_pmem** out, char* err, size_t errlen) {
  return uvirtio_pmem_open_opts(bdf, nullptr, out, err, errlen);
}

void uvirtio_pmem_close(uvirtio_pmem* pm) { delete pm; }

// A NULL handle: -EINVAL (NULL or 0 where no errno can be returned).
void* uvirtio_pmem_data(uvirtio_pmem* pm) { return pm != nullptr ? pm->pm->data() : nullptr; }

uint64_t uvirtio_pmem_size(const uvirtio_pmem* pm) { return pm != nullptr ? pm->pm->size() : 0; }

int uvirtio_pmem_persist(uvirtio_pmem* pm, const void* addr, size_t len) {
  if (pm == nullptr) return -EINVAL;
  return result(pm, pm->pm->persist(addr, len));
}

int uvirtio_pmem_persist_async(uvirtio_pmem* pm, const void* addr, size_t len, uvirtio_pmem_done_fn done,
                               void* ctx) {
  if (pm == nullptr) return -EINVAL;
  if (done == nullptr)
    return result(pm, uvirtio::Error(uvirtio::Errc::invalid_argument, pm->pm->name(), "persist_async",
                                     "no completion callback (done is NULL)"));
  return result(pm, pm->pm->persist_async(addr, len, [done, ctx](uvirtio::Result<void> r) {
    if (r.ok()) {
      done(0, "", ctx);
    } else {
      const std::string msg = r.error().message();
      done(to_errno(r.error()), msg.c_str(), ctx);
    }
  }));
}

int uvirtio_pmem_flush(uvirtio_pmem* pm) { return pm != nullptr ? result(pm, pm->pm->flush()) : -EINVAL; }

int uvirtio_pmem_memcpy_persist(uvirtio_pmem* pm, void* dst, const void* src, size_t n) {
  if (pm == nullptr) return -EINVAL;
  return result(pm, pm->pm->memcpy_persist(dst, src, n));
}

int uvirtio_pmem_repersist(uvirtio_pmem* pm, const void* addr, size_t len) {
  if (pm == nullptr) return -EINVAL;
  return result(pm, pm->pm->repersist(addr, len));
}

int uvirtio_pmem_recover(uvirtio_pmem* pm) {
  if (pm == nullptr) return -EINVAL;
  auto r = pm->pm->recover();
  if (!r) return result(pm, uvirtio::Result<void>(r.error()));
  return static_cast<int>(*r);
}

void uvirtio_pmem_drain(void) { uvirtio::driver::Pmem::drain(); }

void uvirtio_pmem_get_stats(const uvirtio_pmem* pm, uvirtio_pmem_stats* out) {
  if (out == nullptr) return;
  if (pm == nullptr) {
    *out = uvirtio_pmem_stats{};
    return;
  }
  out->persist_calls = pm->pm->persist_calls();
  out->device_flushes = pm->pm->device_flushes();
  out->recoveries = pm->pm->recoveries();
}

const char* uvirtio_pmem_last_error(const uvirtio_pmem* pm) {
  if (pm == nullptr) return "no uvirtio_pmem handle (NULL)";
  std::lock_guard lk(pm->errors_mutex);
  auto it = pm->errors.find(std::this_thread::get_id());
  return it == pm->errors.end() ? "" : it->second.c_str();
}

}  // extern "C"
