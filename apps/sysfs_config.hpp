// Reading a function's config space and BAR sizes from sysfs, for commands
// that inspect a device without taking it (uvirtio caps).
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "uvirtio/base/result.hpp"
#include "uvirtio/pci/bdf.hpp"
#include "uvirtio/pci/os.hpp"

namespace uvirtio::apps {

struct SysfsSnapshot {
  std::vector<std::uint8_t> config;  // 256 bytes unprivileged, up to 4096 as root
  std::array<std::uint64_t, 6> bar_sizes{};
};

Result<SysfsSnapshot> read_sysfs_snapshot(const pci::Bdf& bdf, pci::Os& os = pci::Os::system());

}  // namespace uvirtio::apps
