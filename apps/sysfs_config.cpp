// sysfs config-space and resource reading (Documentation/PCI/sysfs-pci.rst).
#include "sysfs_config.hpp"

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <sstream>

namespace uvirtio::apps {

Result<SysfsSnapshot> read_sysfs_snapshot(const pci::Bdf& bdf, pci::Os& os) {
  const std::string dir = "/sys/bus/pci/devices/" + bdf.str();
  if (!os.exists(dir)) return Error(Errc::not_found, bdf.str(), "read config space", "no such PCI function");
  auto cfg = os.read_file(dir + "/config");
  if (!cfg) return Error::from_errno(errno, bdf.str(), "read config space", dir + "/config");
  SysfsSnapshot s;
  s.config.assign(cfg->begin(), cfg->end());
  if (s.config.size() < 64)
    return Error(Errc::permission, bdf.str(), "read config space",
                 "only " + std::to_string(s.config.size()) + " bytes readable (run as root)");
  auto res = os.read_file(dir + "/resource");
  if (!res) return Error::from_errno(errno, bdf.str(), "read BAR sizes", dir + "/resource");
  std::istringstream lines(*res);
  std::string line;
  for (unsigned i = 0; i < 6 && std::getline(lines, line); ++i) {
    std::uint64_t start = 0, end = 0, flags = 0;
    if (std::sscanf(line.c_str(), "%" SCNx64 " %" SCNx64 " %" SCNx64, &start, &end, &flags) == 3 &&
        end > start)
      s.bar_sizes[i] = end - start + 1;
  }
  return s;
}

}  // namespace uvirtio::apps
