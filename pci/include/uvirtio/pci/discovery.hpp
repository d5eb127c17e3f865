// Finding PCI functions: libpci for the scan and the ids, sysfs (through the
// Os seam) for the bound driver and the IOMMU group.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "uvirtio/base/result.hpp"
#include "uvirtio/pci/bdf.hpp"
#include "uvirtio/pci/os.hpp"

namespace uvirtio::pci {

inline constexpr std::uint16_t kVirtioVendor = 0x1af4;

struct FunctionInfo {
  Bdf bdf;
  std::uint16_t vendor = 0, device = 0;
  std::uint16_t subsys_vendor = 0, subsys_device = 0;
  std::uint32_t class_code = 0;  // base class, subclass, prog-if (24 bits)
  std::uint8_t revision = 0;
  std::string driver;                   // empty when unbound
  std::optional<unsigned> iommu_group;  // none when the function has no group
};

// Every PCI function libpci sees, sorted by address.
Result<std::vector<FunctionInfo>> enumerate_functions(Os& os = Os::system());

// One function by address, read from sysfs.
Result<FunctionInfo> describe_function(const Bdf& bdf, Os& os = Os::system());

// The virtio device id (virtio spec 1.2, 4.1.2.1): 0x1040+id for modern
// functions, the subsystem device id for transitional ones (0x1000..0x103f).
// nullopt for non-virtio functions.
std::optional<std::uint16_t> virtio_device_id(const FunctionInfo& f);
bool is_modern_virtio(const FunctionInfo& f);

// QEMU's inter-VM shared memory device (1af4:1110), which uvirtio also drives.
bool is_ivshmem(const FunctionInfo& f);
// "entropy", "pmem", "block", ... (spec 5), or "unknown".
const char* virtio_device_name(std::uint16_t id);

// Driver name and IOMMU group of bdf from sysfs.
std::string sysfs_driver(const Bdf& bdf, Os& os);
std::optional<unsigned> sysfs_iommu_group(const Bdf& bdf, Os& os);

}  // namespace uvirtio::pci
