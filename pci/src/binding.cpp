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
  if (!sysfs_iommu_group(bdf, os))
    return Error(Errc::unsupported, bdf.str(), op,
                 "the function has no IOMMU group (enable the IOMMU, e.g. intel_iommu=on, or use no-IOMMU mode)");
  if (os.mkdir(kBindStateDir) != 0) return Error::from_errno(errno, bdf.str(), op, std::string("mkdir ") + kBindStateDir);
  if (!os.write_file(state_file(bdf), out.previous_driver + "\n"))
    return Error::from_errno(errno, bdf.str(), op, "record previous driver in " + state_file(bdf));
  UV_TRY_VOID(write_attr(os, bdf, dir + "/driver_override", kVfio, op));
  if (!out.previous_driver.empty()) UV_TRY_VOID(write_attr(os, bdf, dir + "/driver/unbind", bdf.str(), op));
  UV_TRY_VOID(write_attr(os, bdf, "/sys/bus/pci/drivers_probe", bdf.str(), op));
  std::string now = sysfs_driver(bdf, os);
  if (now != kVfio)
    return Error(Errc::io, bdf.str(), op,
                 "vfio-pci did not take the function (driver is now '" + (now.empty() ? "none" : now) + "')");
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
