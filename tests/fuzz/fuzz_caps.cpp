// libFuzzer target for the PCI/virtio capability parser. The input is six
// little-endian u64 BAR sizes (48 bytes) followed by a config-space snapshot
// (at most 4096 bytes, PCIe extended config space). On success it checks what
// the parser promises (virtio spec 1.2, 4.1.4; PCI 3.0, 6.7 and 6.8.2): every
// returned region lies inside an existing BAR without overflow and meets its
// type's length and alignment rules, and the lists are bounded. A violation
// traps so libFuzzer records the input.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <set>
#include <span>

#include "uvirtio/base/le.hpp"
#include "uvirtio/pci/caps.hpp"

namespace {

using uvirtio::pci::Capabilities;
using uvirtio::pci::VirtioRegion;

void check(bool cond) {
  if (!cond) __builtin_trap();
}

// A returned region must sit in a present BAR, [offset, offset+length) without wrap.
void check_region(const VirtioRegion& r, const std::array<std::uint64_t, 6>& bars, std::uint64_t min_length,
                  std::uint64_t align) {
  check(r.bar <= 5);
  check(r.cap_offset >= 0x40 && r.cap_offset % 4 == 0);
  check(r.length >= min_length);
  check(r.offset % align == 0);
  check(r.offset <= UINT64_MAX - r.length);
  check(r.offset + r.length <= bars[r.bar]);
}

void check_caps(const Capabilities& caps, std::span<const std::uint8_t> config,
                const std::array<std::uint64_t, 6>& bars) {
  check(caps.list.size() <= 48 + 1024);
  std::set<std::uint16_t> seen;
  bool extended = false;
  for (const auto& raw : caps.list) {
    check(seen.insert(raw.offset).second);  // no entry visited twice
    check(raw.offset % 4 == 0 && raw.offset + 2u <= config.size());
    if (raw.extended) {
      check(raw.offset >= 0x100 && raw.offset + 4u <= config.size());
    } else {
      check(!extended);  // standard entries come first
      check(raw.offset >= 0x40 && raw.offset <= 0xfc && raw.id == config[raw.offset]);
    }
    extended = raw.extended;
  }
  auto in_list = [&](std::uint8_t at, std::uint8_t cfg_type) {
    for (const auto& raw : caps.list) {
      if (!raw.extended && raw.offset == at) return raw.id == 0x09 && raw.virtio_cfg_type == cfg_type;
    }
    return false;
  };
  if (caps.common) {
    check_region(*caps.common, bars, 0x38, 4);
    check(in_list(caps.common->cap_offset, 1));
  }
  if (caps.notify) {
    check_region(*caps.notify, bars, 1, 2);
    check(in_list(caps.notify->cap_offset, 2));
    check(caps.notify->cap_offset + 20u <= config.size());
  }
  // 4.1.4.4: 0 or an even power of 2.
  check(caps.notify_off_multiplier % 2 == 0 &&
        (caps.notify_off_multiplier & (caps.notify_off_multiplier - 1)) == 0);
  check(caps.notify || caps.notify_off_multiplier == 0);
  if (caps.isr) {
    check_region(*caps.isr, bars, 1, 1);
    check(in_list(caps.isr->cap_offset, 3));
  }
  if (caps.device) {
    check_region(*caps.device, bars, 1, 4);
    check(in_list(caps.device->cap_offset, 4));
  }
  if (caps.pci_cfg) {  // a window selector: only its position is validated
    check(in_list(caps.pci_cfg->cap_offset, 5));
    check(caps.pci_cfg->cap_offset + 20u <= config.size() && caps.pci_cfg->cap_offset + 20u <= 0x100);
  }
  std::set<std::uint8_t> shm_ids;
  for (const auto& s : caps.shm) {
    check(shm_ids.insert(s.id).second);  // first instance of each id only
    check_region(s.region, bars, 1, 1);
    check(in_list(s.region.cap_offset, 8));
    check(s.region.cap_offset + 24u <= config.size());
  }
  if (caps.msix) {
    const auto& m = *caps.msix;
    check(m.table_size >= 1 && m.table_size <= 2048);
    check(m.table_bar <= 5 && m.pba_bar <= 5);
    check(m.table_offset % 8 == 0 && m.pba_offset % 8 == 0);
    check(std::uint64_t{m.table_offset} + m.table_size * 16ull <= bars[m.table_bar]);
    check(std::uint64_t{m.pba_offset} + (m.table_size + 63ull) / 64 * 8 <= bars[m.pba_bar]);
    check(m.cap_offset >= 0x40 && m.cap_offset + 12u <= config.size() && config[m.cap_offset] == 0x11);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  constexpr std::size_t kBarBytes = 6 * 8;
  if (size < kBarBytes) return 0;
  std::array<std::uint64_t, 6> bars{};
  for (std::size_t i = 0; i < 6; ++i) {
    bars[i] = std::uint64_t{uvirtio::load_le32(data + 8 * i)} |
              (std::uint64_t{uvirtio::load_le32(data + 8 * i + 4)} << 32);
  }
  const std::span<const std::uint8_t> config(data + kBarBytes, std::min<std::size_t>(size - kBarBytes, 4096));
  auto result = uvirtio::pci::parse_capabilities(config, bars, "fuzz");
  if (result.ok()) {
    check_caps(result.value(), config, bars);
  } else {
    const auto& e = result.error();
    check(e.device() == "fuzz" && e.op() == "parse capabilities" && !e.cause().empty());
    if (e.code() == uvirtio::Errc::not_found) {
      check(config.size() >= 2 && config[0] == 0xff && config[1] == 0xff);
    } else {
      check(e.code() == uvirtio::Errc::bad_device_data);
    }
  }
  return 0;
}
