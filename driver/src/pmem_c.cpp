// The C API of the pmem driver (uvirtio/pmem.h).
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>

#include "uvirtio/driver/pmem.hpp"
#include "uvirtio/pmem.h"

struct uvirtio_pmem {
  std::unique_ptr<uvirtio::driver::Pmem> pm;
  std::string last_error;
};

namespace {

int to_errno(const uvirtio::Error& e) {
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
    default:
      return -EIO;  // device_error (host fsync failed), broken, bad device data, io
  }
}

int result(uvirtio_pmem* pm, const uvirtio::Result<void>& r) {
  if (r.ok()) return 0;
  pm->last_error = r.error().message();
  return to_errno(r.error());
}

}  // namespace

extern "C" {

int uvirtio_pmem_open(const char* bdf, uvirtio_pmem** out, char* err, size_t errlen) {
  auto fail = [&](const std::string& msg, int code) {
    if (err != nullptr && errlen > 0) {
      std::strncpy(err, msg.c_str(), errlen - 1);
      err[errlen - 1] = '\0';
    }
    return code;
  };
  if (bdf == nullptr || out == nullptr) return fail("uvirtio_pmem_open: null argument", -EINVAL);
  auto addr = uvirtio::pci::Bdf::parse(bdf);
  if (!addr) return fail(addr.error().message(), -EINVAL);
  auto pm = uvirtio::driver::Pmem::open(*addr, {});
  if (!pm) return fail(pm.error().message(), to_errno(pm.error()));
  *out = new uvirtio_pmem{std::move(pm).value(), {}};
  return 0;
}

void uvirtio_pmem_close(uvirtio_pmem* pm) { delete pm; }

void* uvirtio_pmem_data(uvirtio_pmem* pm) { return pm->pm->data(); }

uint64_t uvirtio_pmem_size(const uvirtio_pmem* pm) { return pm->pm->size(); }

int uvirtio_pmem_persist(uvirtio_pmem* pm, const void* addr, size_t len) {
  return result(pm, pm->pm->persist(addr, len));
}

int uvirtio_pmem_flush(uvirtio_pmem* pm) { return result(pm, pm->pm->flush()); }

int uvirtio_pmem_memcpy_persist(uvirtio_pmem* pm, void* dst, const void* src, size_t n) {
  return result(pm, pm->pm->memcpy_persist(dst, src, n));
}

int uvirtio_pmem_repersist(uvirtio_pmem* pm, const void* addr, size_t len) {
  return result(pm, pm->pm->repersist(addr, len));
}

int uvirtio_pmem_recover(uvirtio_pmem* pm) {
  auto r = pm->pm->recover();
  if (!r) return result(pm, uvirtio::Result<void>(r.error()));
  pm->last_error.clear();
  return static_cast<int>(*r);
}

void uvirtio_pmem_drain(void) { uvirtio::driver::Pmem::drain(); }

const char* uvirtio_pmem_last_error(const uvirtio_pmem* pm) { return pm->last_error.c_str(); }

}  // extern "C"
