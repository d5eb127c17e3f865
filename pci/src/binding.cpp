// sysfs binding: driver_override, unbind, drivers_probe (Documentation/ABI/testing/sysfs-bus-pci).
#include "uvirtio/pci/binding.hpp"

#include <cerrno>

#include "uvirtio/pci/discovery.hpp"

namespace uvirtio::pci {
namespace {

constexpr const char* kVfio = "vfio-pci";

Result<void> write_attr(Os& os, const Bdf& bdf, const std::string& path, const std::string& value,
                        const std::string& op) {
  if (!os.write_file(path, value)) {
    int e = errno;
    if (e == EACCES || e == EPERM)
      return Error(Errc::permission, bdf.str(), op, "cannot write " + path + " (run as root)", e);
    return Error::from_errno(e, bdf.str(), op, "write '" + value + "' to " + path);
  }
  return ok();
}

bool noiommu_enabled(Os& os) {
  auto v = os.read_file("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode");
  return v && !v->empty() && ((*v)[0] == 'Y' || (*v)[0] == '1');
}

std::string state_file(const Bdf& bdf) { return std::string(kBindStateDir) + "/" + bdf.str() + ".driver"; }

}  // namespace

Result<BindOutcome> bind_vfio(const Bdf& bdf, Os& os) {
  const std::string op = "bind to vfio-pci";
  const std::string dir = "/sys/bus/pci/devices/" + bdf.str();
  if (!os.exists(dir)) return Error(Errc::not_found, bdf.str(), op, "no such PCI function");
  BindOutcome out;
  out.previous_driver = sysfs_driver(bdf, os);
  if (out.previous_driver == kVfio) return out;
  if (!os.exists("/sys/bus/pci/drivers/vfio-pci"))
    return Error(Errc::unsupported, bdf.str(), op, "the vfio-pci driver is not loaded (modprobe vfio-pci)");
  // Without an IOMMU a function has no group until vfio-pci binds it: in
  // no-IOMMU mode vfio creates one in its probe. Anywhere else, no group
  // means vfio-pci will refuse the function.
  const bool noiommu = noiommu_enabled(os);
  if (!sysfs_iommu_group(bdf, os) && !noiommu)
    return Error(Errc::unsupported, bdf.str(), op,
                 "the function has no IOMMU group (enable the IOMMU, e.g. intel_iommu=on, or load vfio with "
                 "enable_unsafe_noiommu_mode=1)");
  if (os.mkdir(kBindStateDir) != 0) {
    int e = errno;
    if (e == EACCES || e == EPERM)
      return Error(Errc::permission, bdf.str(), op,
                   std::string("cannot create ") + kBindStateDir + " (run as root)", e);
    return Error::from_errno(e, bdf.str(), op, std::string("mkdir ") + kBindStateDir);
  }
  if (!os.write_file(state_file(bdf), out.previous_driver + "\n"))
    return Error::from_errno(errno, bdf.str(), op, "record previous driver in " + state_file(bdf));
  UV_TRY_VOID(write_attr(os, bdf, dir + "/driver_override", kVfio, op));
  // From here on a failure must not leave the function driverless with a
  // stale override: clear it and give the function back to its driver.
  auto rollback = [&](Error e) -> Error {
    (void)os.write_file(dir + "/driver_override", "\n");
    // vfio-pci may hold the function although it is unusable (no IOMMU
    // group): take it off again so the previous driver can have it back.
    if (sysfs_driver(bdf, os) == kVfio)
      (void)os.write_file(std::string("/sys/bus/pci/drivers/") + kVfio + "/unbind", bdf.str());
    if (sysfs_driver(bdf, os).empty()) {
      if (!out.previous_driver.empty())
        (void)os.write_file("/sys/bus/pci/drivers/" + out.previous_driver + "/bind", bdf.str());
      else
        (void)os.write_file("/sys/bus/pci/drivers_probe", bdf.str());
    }
    return e;
  };
  if (!out.previous_driver.empty()) {
    if (auto r = write_attr(os, bdf, dir + "/driver/unbind", bdf.str(), op); !r) return rollback(r.error());
  }
  if (auto r = write_attr(os, bdf, "/sys/bus/pci/drivers_probe", bdf.str(), op); !r)
    return rollback(r.error());
  std::string now = sysfs_driver(bdf, os);
  if (now != kVfio)
    return rollback(
        Error(Errc::io, bdf.str(), op,
              "vfio-pci did not take the function (driver is now '" + (now.empty() ? "none" : now) + "')"));
  if (!sysfs_iommu_group(bdf, os))
    return rollback(Error(Errc::unsupported, bdf.str(), op,
                          "bound to vfio-pci but the function still has no IOMMU group"));
  out.changed = true;
  return out;
}

Result<std::string> unbind_vfio(const Bdf& bdf, Os& os) {
  const std::string op = "unbind from vfio-pci";
  const std::string dir = "/sys/bus/pci/devices/" + bdf.str();
  if (!os.exists(dir)) return Error(Errc::not_found, bdf.str(), op, "no such PCI function");
  std::string current = sysfs_driver(bdf, os);
  if (current != kVfio)
    return Error(Errc::invalid_argument, bdf.str(), op,
                 "not bound to vfio-pci (driver is '" + (current.empty() ? "none" : current) + "')");
  std::string previous;
  if (auto saved = os.read_file(state_file(bdf))) {
    previous = *saved;
    while (!previous.empty() && (previous.back() == '\n' || previous.back() == ' ')) previous.pop_back();
  }
  UV_TRY_VOID(write_attr(os, bdf, dir + "/driver/unbind", bdf.str(), op));
  // An empty write clears driver_override; the kernel wants at least a newline.
  UV_TRY_VOID(write_attr(os, bdf, dir + "/driver_override", "\n", op));
  if (!previous.empty() && previous != kVfio && os.exists("/sys/bus/pci/drivers/" + previous)) {
    UV_TRY_VOID(write_attr(os, bdf, "/sys/bus/pci/drivers/" + previous + "/bind", bdf.str(), op));
  } else {
    // No recorded driver (or it is gone): let the kernel pick one. A probe that
    // finds no driver fails with ENODEV-like errors, which is not our failure.
    (void)os.write_file("/sys/bus/pci/drivers_probe", bdf.str());
  }
  (void)os.write_file(state_file(bdf), "");
  return sysfs_driver(bdf, os);
}

}  // namespace uvirtio::pci
