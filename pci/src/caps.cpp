// Capability parser: walks the standard (PCI 3.0, 6.7) and extended (PCIe base
// spec, 7.6) capability lists of a config-space snapshot and locates the virtio
// 1.x structures (virtio spec 1.2, 4.1.4) and MSI-X (PCI 3.0, 6.8.2). All input
// is hostile: every read is bounds-checked against the snapshot, the walks are
// bounded and loop-checked, and a structure that fails a check is skipped with
// a warning so the first usable instance of each type wins (spec 4.1.4).
#include "uvirtio/pci/caps.hpp"

#include <algorithm>
#include <cstdio>

#include "uvirtio/base/hex.hpp"
#include "uvirtio/base/le.hpp"

namespace uvirtio::pci {
namespace {

constexpr const char* kOp = "parse capabilities";
constexpr std::size_t kStdEnd = 0x100;     // standard caps live in the first 256 bytes
constexpr std::size_t kMaxStdCaps = 48;    // (0x100 - 0x40) / 4 dword slots
constexpr std::size_t kMaxExtCaps = 1024;  // (0x1000 - 0x100) / 4 would be 960
constexpr std::uint8_t kCapVendor = 0x09;  // PCI 3.0, appendix H: vendor specific
constexpr std::uint8_t kCapMsix = 0x11;    // PCI 3.0, 6.8.2

class Parser {
 public:
  Parser(std::span<const std::uint8_t> cfg, const std::array<std::uint64_t, 6>& bars, std::string_view device)
      : cfg_(cfg), bars_(bars), device_(device) {}

  Result<Capabilities> run();

 private:
  bool has(std::size_t off, std::size_t n) const { return off <= cfg_.size() && n <= cfg_.size() - off; }
  std::uint32_t le32(std::size_t off) const { return load_le32(cfg_.data() + off); }
  Error error(std::string cause) const {
    return Error(Errc::bad_device_data, std::string(device_), kOp, std::move(cause));
  }
  void warn(std::size_t at, const std::string& what, const std::string& why) {
    caps_.warnings.push_back("capability at " + hex(at) + " (" + what + "): " + why);
  }
  // Returns an empty string when [off, off+len) lies inside BAR `bar`, else why not.
  std::string check_bar(std::uint8_t bar, std::uint64_t off, std::uint64_t len) const;
  Result<void> walk_standard();
  Result<void> walk_extended();
  void virtio_cap(std::uint8_t at, RawCap& raw);
  void msix_cap(std::uint8_t at);

  std::span<const std::uint8_t> cfg_;
  const std::array<std::uint64_t, 6>& bars_;
  std::string_view device_;
  Capabilities caps_;
};

std::string Parser::check_bar(std::uint8_t bar, std::uint64_t off, std::uint64_t len) const {
  if (bar > 5) return "BAR index " + std::to_string(bar) + " out of range";
  const std::uint64_t size = bars_[bar];
  if (size == 0) return "BAR " + std::to_string(bar) + " is absent (size 0)";
  // Compare without computing off+len, which can wrap for 64-bit values.
  if (len > size || off > size - len) {
    return "offset " + hex(off) + " + length " + hex(len) + " beyond BAR " + std::to_string(bar) + " size " +
           hex(size);
  }
  return {};
}

// Virtio spec 1.2, 4.1.4: struct virtio_pci_cap and its extensions.
void Parser::virtio_cap(std::uint8_t at, RawCap& raw) {
  const std::size_t end = std::min(cfg_.size(), kStdEnd);
  if (at + 4u > end) return warn(at, "vendor", "truncated by the end of the config snapshot; skipped");
  const std::uint8_t cap_len = cfg_[at + 2u];
  const std::uint8_t type = cfg_[at + 3u];
  raw.length = cap_len;
  raw.virtio_cfg_type = type;

  std::optional<VirtioRegion>* slot = nullptr;
  std::size_t min_cap_len = 16;  // sizeof(struct virtio_pci_cap)
  std::uint64_t min_length = 1;  // smallest usable structure
  std::uint64_t align = 1;
  switch (static_cast<VirtioCfgType>(type)) {
    case VirtioCfgType::common:  // 4.1.4.3: struct virtio_pci_common_cfg is 0x38 bytes
      slot = &caps_.common;
      min_length = 0x38;
      align = 4;
      break;
    case VirtioCfgType::notify:  // 4.1.4.4: cap carries le32 notify_off_multiplier
      slot = &caps_.notify;
      min_cap_len = 20;
      min_length = 2;  // room for one 16-bit notification write
      align = 2;
      break;
    case VirtioCfgType::isr:  // 4.1.4.5
      slot = &caps_.isr;
      break;
    case VirtioCfgType::device:  // 4.1.4.6
      slot = &caps_.device;
      align = 4;
      break;
    case VirtioCfgType::pci_cfg:  // 4.1.4.9: cap carries u8 pci_cfg_data[4]
      slot = &caps_.pci_cfg;
      min_cap_len = 20;
      break;
    case VirtioCfgType::shared_memory:  // 4.1.4.7: struct virtio_pci_cap64
      min_cap_len = 24;
      break;
    default:
      return;  // vendor (4.1.4.8) or reserved cfg_type: the driver ignores it
  }
  if (slot != nullptr && slot->has_value()) return;  // first usable instance wins
  const std::string what = std::string("virtio ") + virtio_cfg_type_name(type);
  if (cap_len < min_cap_len) {
    return warn(at, what,
                "cap_len " + std::to_string(cap_len) + " < " + std::to_string(min_cap_len) + "; skipped");
  }
  if (at + std::size_t{cap_len} > end) {
    return warn(at, what, "cap_len " + std::to_string(cap_len) + " runs past the config snapshot; skipped");
  }
  VirtioRegion r{at, cfg_[at + 4u], le32(at + 8u), le32(at + 12u)};
  if (type == static_cast<std::uint8_t>(VirtioCfgType::pci_cfg)) {
    caps_.pci_cfg = r;  // bar/offset/length select a window; the driver writes them (4.1.4.9)
    return;
  }
  const std::uint8_t shm_id = cfg_[at + 5u];
  if (!slot) {  // struct virtio_pci_cap64: high halves follow the cap
    if (std::any_of(caps_.shm.begin(), caps_.shm.end(), [&](const auto& s) { return s.id == shm_id; }))
      return;
    r.offset |= std::uint64_t{le32(at + 16u)} << 32;
    r.length |= std::uint64_t{le32(at + 20u)} << 32;
  }
  if (r.length < min_length) {
    return warn(at, what, "length " + hex(r.length) + " < " + hex(min_length) + "; skipped");
  }
  if (r.offset % align != 0) {
    return warn(at, what,
                "offset " + hex(r.offset) + " not " + std::to_string(align) + "-byte aligned; skipped");
  }
  if (std::string why = check_bar(r.bar, r.offset, r.length); !why.empty()) {
    return warn(at, what, why + "; skipped");
  }
  if (slot == &caps_.notify) {
    // 4.1.4.4: notify_off_multiplier is an even power of 2 (2, 4, 8, ...), or 0.
    const std::uint32_t mult = le32(at + 16u);
    if (mult % 2 != 0 || (mult & (mult - 1)) != 0)
      return warn(at, what,
                  std::string(mult % 2 != 0 ? "odd" : "not a power of 2:") + " notify_off_multiplier " +
                      std::to_string(mult) + "; skipped");
    caps_.notify_off_multiplier = mult;
  }
  if (slot) {
    *slot = r;
  } else {
    caps_.shm.push_back({r, shm_id});
  }
}

// PCI 3.0, 6.8.2: MSI-X capability {id, next, le16 msg_ctl, le32 table, le32 pba}.
void Parser::msix_cap(std::uint8_t at) {
  if (caps_.msix) return warn(at, "MSI-X", "second MSI-X capability; ignored");
  if (at + 12u > std::min(cfg_.size(), kStdEnd)) {
    return warn(at, "MSI-X", "truncated by the end of the config snapshot; dropped");
  }
  const std::uint16_t ctl = load_le16(cfg_.data() + at + 2);
  const std::uint32_t table = le32(at + 4u), pba = le32(at + 8u);
  MsixCap m;
  m.cap_offset = at;
  m.table_size = static_cast<std::uint16_t>((ctl & 0x7ff) + 1);
  m.enabled = (ctl & 0x8000) != 0;
  m.table_bar = static_cast<std::uint8_t>(table & 7);
  m.table_offset = table & ~7u;
  m.pba_bar = static_cast<std::uint8_t>(pba & 7);
  m.pba_offset = pba & ~7u;
  if (std::string why = check_bar(m.table_bar, m.table_offset, m.table_size * 16ull); !why.empty()) {
    return warn(at, "MSI-X", "table: " + why + "; dropped");
  }
  if (std::string why = check_bar(m.pba_bar, m.pba_offset, (m.table_size + 63ull) / 64 * 8); !why.empty()) {
    return warn(at, "MSI-X", "PBA: " + why + "; dropped");
  }
  caps_.msix = m;
}

// PCI 3.0, 6.7: the list starts at the pointer at 0x34, entries are dword
// aligned (bottom two bits reserved) and live above the 64-byte header.
Result<void> Parser::walk_standard() {
  if (!has(0x34, 1) || (cfg_[6] & 0x10) == 0) return ok();  // Status: Capabilities List
  std::array<bool, kStdEnd> visited{};
  std::size_t count = 0;
  for (auto at = static_cast<std::uint8_t>(cfg_[0x34] & 0xfc); at != 0;) {
    if (at < 0x40) {
      warn(at, "list", "pointer into the config header; list walk stopped");
      break;
    }
    if (!has(at, 2)) {
      warn(at, "list", "pointer past the end of the config snapshot; list walk stopped");
      break;
    }
    if (visited[at]) return error("capability list loops back to offset " + hex(at));
    if (++count > kMaxStdCaps) return error("capability list longer than " + std::to_string(kMaxStdCaps));
    visited[at] = true;
    RawCap raw;
    raw.offset = at;
    raw.id = cfg_[at];
    if (raw.id == kCapVendor) virtio_cap(at, raw);
    if (raw.id == kCapMsix) msix_cap(at);
    caps_.list.push_back(raw);
    at = static_cast<std::uint8_t>(cfg_[at + 1u] & 0xfc);
  }
  return ok();
}

// PCIe base spec 7.6: extended list at 0x100, header {id:16, version:4, next:12}.
Result<void> Parser::walk_extended() {
  if (cfg_.size() <= kStdEnd) return ok();
  std::array<bool, 0x1000 / 4> visited{};
  std::size_t count = 0;
  for (std::size_t at = kStdEnd; at != 0;) {
    if (!has(at, 4)) {
      warn(at, "extended", "pointer past the end of the config snapshot; list walk stopped");
      break;
    }
    const std::uint32_t header = le32(at);
    if (header == 0 || header == 0xffffffff) {
      // At 0x100 this means there is no list; later it is a broken link.
      if (at != kStdEnd) warn(at, "extended", "empty header; list walk stopped");
      break;
    }
    if (visited[at / 4]) return error("extended capability list loops back to offset " + hex(at));
    if (++count > kMaxExtCaps)
      return error("extended capability list longer than " + std::to_string(kMaxExtCaps));
    visited[at / 4] = true;
    RawCap raw;
    raw.offset = static_cast<std::uint16_t>(at);
    raw.id = static_cast<std::uint16_t>(header & 0xffff);
    raw.extended = true;
    caps_.list.push_back(raw);
    const std::size_t next = (header >> 20) & 0xffc;
    if (next != 0 && next < kStdEnd) {
      warn(at, "extended", "next pointer " + hex(next) + " below 0x100; list walk stopped");
      break;
    }
    at = next;
  }
  return ok();
}

Result<Capabilities> Parser::run() {
  if (has(0, 2) && load_le16(cfg_.data()) == 0xffff) {
    return Error(Errc::not_found, std::string(device_), kOp,
                 "device not responding (all-ones config read: surprise removal?)");
  }
  UV_TRY_VOID(walk_standard());
  UV_TRY_VOID(walk_extended());
  return std::move(caps_);
}

}  // namespace

const char* virtio_cfg_type_name(std::uint8_t cfg_type) noexcept {
  switch (static_cast<VirtioCfgType>(cfg_type)) {
    case VirtioCfgType::common:
      return "common";
    case VirtioCfgType::notify:
      return "notify";
    case VirtioCfgType::isr:
      return "isr";
    case VirtioCfgType::device:
      return "device";
    case VirtioCfgType::pci_cfg:
      return "pci_cfg";
    case VirtioCfgType::shared_memory:
      return "shared_memory";
    case VirtioCfgType::vendor:
      return "vendor";
  }
  return "unknown";
}

Result<Capabilities> parse_capabilities(std::span<const std::uint8_t> config,
                                        const std::array<std::uint64_t, 6>& bar_sizes,
                                        std::string_view device) {
  return Parser(config, bar_sizes, device).run();
}

}  // namespace uvirtio::pci
