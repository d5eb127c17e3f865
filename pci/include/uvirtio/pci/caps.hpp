// PCI and virtio capability parsing (virtio spec 1.2, 4.1.4; PCI Local Bus 3.0, 6.7;
// PCIe base spec, 7.6 extended capabilities).
//
// The parser works on a snapshot of configuration space and the sizes of the
// six BARs, so it does no I/O and can be fuzzed. Everything in the snapshot is
// device input and is treated as hostile: the walk is bounded and detects
// loops, every virtio structure is checked for a valid BAR index, minimum
// length, alignment, offset+length overflow and BAR end. A structure that fails
// a check is skipped with a warning (spec 4.1.4: the driver uses the first
// instance of each structure type it can use). A snapshot whose vendor ID
// reads all-ones is a removed device and fails as a whole.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "uvirtio/base/result.hpp"

namespace uvirtio::pci {

// virtio_pci_cap cfg_type values (spec 4.1.4).
enum class VirtioCfgType : std::uint8_t {
  common = 1,
  notify = 2,
  isr = 3,
  device = 4,
  pci_cfg = 5,
  shared_memory = 8,
  vendor = 9,
};
const char* virtio_cfg_type_name(std::uint8_t cfg_type) noexcept;

// A validated virtio structure location: [offset, offset+length) inside BAR `bar`.
struct VirtioRegion {
  std::uint8_t cap_offset = 0;  // where the capability sits in config space
  std::uint8_t bar = 0;
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
};

struct VirtioShmRegion {
  VirtioRegion region;
  std::uint8_t id = 0;
};

struct MsixCap {
  std::uint8_t cap_offset = 0;
  std::uint16_t table_size = 0;  // number of vectors
  std::uint8_t table_bar = 0;
  std::uint32_t table_offset = 0;
  std::uint8_t pba_bar = 0;
  std::uint32_t pba_offset = 0;
  bool enabled = false;
};

// One entry of the standard or extended list, as found (valid or not).
struct RawCap {
  std::uint16_t offset = 0;
  std::uint16_t id = 0;     // 8-bit id for standard caps, 16-bit for extended
  std::uint8_t length = 0;  // cap_len for vendor caps, 0 when not meaningful
  bool extended = false;
  std::uint8_t virtio_cfg_type = 0;  // for vendor (0x09) caps, else 0
};

struct Capabilities {
  std::vector<RawCap> list;  // walk order, standard then extended
  std::optional<VirtioRegion> common, notify, isr, device, pci_cfg;
  std::uint32_t notify_off_multiplier = 0;
  std::vector<VirtioShmRegion> shm;  // first instance of each id wins
  std::optional<MsixCap> msix;
  std::vector<std::string> warnings;  // skipped or suspicious entries, for users
};

// Parses `config` (256 bytes of conventional or 4096 of PCIe config space;
// shorter snapshots are fine, reads past the end count as absent data).
// `bar_sizes[i]` is 0 for an absent BAR. `device` names the function in errors.
// Fails only when the snapshot as a whole is unusable (all-ones vendor ID,
// a loop in a capability list, a list longer than config space allows).
Result<Capabilities> parse_capabilities(std::span<const std::uint8_t> config,
                                        const std::array<std::uint64_t, 6>& bar_sizes,
                                        std::string_view device);

}  // namespace uvirtio::pci
