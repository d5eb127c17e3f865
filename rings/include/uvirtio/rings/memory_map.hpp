// The other side's memory as a device-role queue sees it: a small table of
// regions, each a range of the other side's addresses mapped at a host
// pointer of ours. SplitDeviceQueue and PackedDeviceQueue translate every
// buffer and indirect table through it.
//
// It is the fast alternative to a Translate callback: the table is checked
// once, when it is built (no empty, wrapping or overlapping region, no null
// host pointer), and translate() is inline with a last-hit cache, so the
// per-buffer cost is a compare or two instead of an indirect call. A buffer
// must lie inside one region: buffers that span two regions are refused,
// as by the vhost-user and vhost-pci tables this replaces.
//
// Threading: translate() updates the cache; one thread per map (each queue
// holds its own copy).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "uvirtio/base/result.hpp"

namespace uvirtio::rings {

struct MemoryRegion {
  std::uint64_t addr = 0;        // first address, in the other side's address space
  std::uint64_t size = 0;        // bytes
  std::uint8_t* host = nullptr;  // where addr is mapped in ours
  bool writable = true;          // false: the device may only read it
};

class MemoryMap {
 public:
  MemoryMap() = default;

  // invalid_argument naming `name` for an empty region, one whose end
  // overflows 64 bits, a null host pointer, or two regions that overlap.
  static Result<MemoryMap> create(std::vector<MemoryRegion> regions, const std::string& name);

  bool empty() const noexcept { return regions_.empty(); }
  const std::vector<MemoryRegion>& regions() const noexcept { return regions_; }

  // [addr, addr+len) inside one region (and writable when `write`): our
  // span of exactly `len` bytes; otherwise nullopt.
  std::optional<std::span<std::uint8_t>> translate(std::uint64_t addr, std::uint32_t len,
                                                   bool write) const noexcept {
    if (!regions_.empty()) {
      const MemoryRegion& r = regions_[hint_];
      if (auto s = in(r, addr, len, write)) return s;
    }
    return translate_slow(addr, len, write);
  }

 private:
  static std::optional<std::span<std::uint8_t>> in(const MemoryRegion& r, std::uint64_t addr,
                                                   std::uint64_t len, bool write) noexcept {
    // Written so nothing overflows: addr - r.addr only once addr >= r.addr.
    if (addr < r.addr || addr - r.addr >= r.size || len > r.size - (addr - r.addr)) return std::nullopt;
    if (write && !r.writable) return std::nullopt;
    return std::span<std::uint8_t>(r.host + (addr - r.addr), static_cast<std::size_t>(len));
  }
  std::optional<std::span<std::uint8_t>> translate_slow(std::uint64_t addr, std::uint32_t len,
                                                        bool write) const noexcept;

  std::vector<MemoryRegion> regions_;  // sorted by addr, disjoint
  mutable std::size_t hint_ = 0;       // the region of the last hit
};

// How a device-role queue reaches the other side's buffers: through a
// MemoryMap (fast), or through a callback where the table can change under
// running rings (the vhost-user back-end's SET_MEM_TABLE). Either converts
// implicitly, so create() takes a map, a lambda or a std::function.
class BufferTranslation {
 public:
  // A span of exactly `len` bytes of ours, or nullopt when [addr, addr+len)
  // is not (entirely) mapped or not allowed for the access (`writable`: the
  // device will write it).
  using Callback = std::function<std::optional<std::span<std::uint8_t>>(std::uint64_t addr, std::uint32_t len,
                                                                        bool writable)>;

  BufferTranslation() = default;
  BufferTranslation(MemoryMap map) : map_(std::move(map)) {}  // NOLINT: implicit by design
  template <class F>
  requires std::is_invocable_r_v<std::optional<std::span<std::uint8_t>>, F&, std::uint64_t, std::uint32_t,
                                 bool>
  BufferTranslation(F fn) : fn_(std::move(fn)) {}  // NOLINT: implicit by design

  // Neither a non-empty map nor a callback: nothing would translate.
  bool empty() const noexcept { return map_.empty() && !fn_; }

  std::optional<std::span<std::uint8_t>> operator()(std::uint64_t addr, std::uint32_t len, bool write) const {
    if (!map_.empty()) return map_.translate(addr, len, write);
    return fn_(addr, len, write);
  }

 private:
  Callback fn_;
  MemoryMap map_;
};

}  // namespace uvirtio::rings
