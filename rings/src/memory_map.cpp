// MemoryMap: the region table a device-role queue translates through.
#include "uvirtio/rings/memory_map.hpp"

#include <algorithm>

#include "uvirtio/base/hex.hpp"

namespace uvirtio::rings {

Result<MemoryMap> MemoryMap::create(std::vector<MemoryRegion> regions, const std::string& name) {
  const char* op = "build memory map";
  for (const MemoryRegion& r : regions) {
    const std::string what = "region at " + hex(r.addr);
    if (r.size == 0) return Error(Errc::invalid_argument, name, op, what + " is empty");
    if (r.addr + r.size < r.addr && r.addr + r.size != 0)
      return Error(Errc::invalid_argument, name, op, what + " of " + hex(r.size) + " bytes wraps past 2^64");
    if (r.host == nullptr) return Error(Errc::invalid_argument, name, op, what + " has no host mapping");
  }
  std::sort(regions.begin(), regions.end(),
            [](const MemoryRegion& a, const MemoryRegion& b) { return a.addr < b.addr; });
  for (std::size_t i = 1; i < regions.size(); ++i) {
    const MemoryRegion& a = regions[i - 1];
    const MemoryRegion& b = regions[i];
    // a ends at a.addr + a.size (0 meaning 2^64, which b cannot be past).
    const std::uint64_t a_end = a.addr + a.size;
    if (a_end == 0 || a_end > b.addr)
      return Error(Errc::invalid_argument, name, op,
                   "regions at " + hex(a.addr) + " and " + hex(b.addr) + " overlap");
  }
  MemoryMap m;
  m.regions_ = std::move(regions);
  return m;
}

std::optional<std::span<std::uint8_t>> MemoryMap::translate_slow(std::uint64_t addr, std::uint32_t len,
                                                                 bool write) const noexcept {
  // The last region starting at or below addr is the only candidate.
  auto it = std::upper_bound(regions_.begin(), regions_.end(), addr,
                             [](std::uint64_t a, const MemoryRegion& r) { return a < r.addr; });
  if (it == regions_.begin()) return std::nullopt;
  --it;
  auto s = in(*it, addr, len, write);
  if (s) hint_ = static_cast<std::size_t>(it - regions_.begin());
  return s;
}

}  // namespace uvirtio::rings
