// Fuzz target: the vhost-pci controlq parser and the remote memory table
// (driver/vhost_pci.hpp), what the driver does with every message the
// device writes.
//
// Input: a flags byte (bit 0: VHOST_PCI_F_ACKQ negotiated), a probe address
// (u64) and length (u32), then the message bytes. Traps when the parser
// accepts a message that breaks a rule it promises to check, fails with
// anything but bad_device_data naming the device, or when the memory table
// built from an accepted MEMORY_INFO translates the probe to memory outside
// the BAR or outside the region that contains it.
#include <cstddef>
#include <cstdint>
#include <span>

#include "fuzz_input.hpp"
#include "uvirtio/driver/vhost_pci.hpp"

namespace {

using namespace uvirtio::driver::vhost_pci;

constexpr const char* kDevice = "0000:00:10.0";
constexpr std::uint64_t kBarSize = 64ull << 20;

void check_accepted(const Message& m, std::size_t payload, bool ackq, std::uint64_t probe,
                    std::uint32_t len) {
  CHECK(m.version == (ackq ? kVersionAckq : kVersionSpec));
  switch (m.type) {
    case kMemoryInfo: {
      CHECK(m.ops <= kOpDel && !m.regions.empty() && m.regions.size() <= kMaxRegions);
      CHECK(payload == sizeof(MemoryInfoHeader) + m.regions.size() * sizeof(MemoryRegion));
      for (const auto& r : m.regions) {
        CHECK(r.size != 0 && r.gpa + (r.size - 1) >= r.gpa && r.bar_offset + (r.size - 1) >= r.bar_offset);
      }
      auto t = RemoteMemory::build(m.regions, kBarSize, kDevice);
      if (!t.ok()) {
        CHECK(t.error().code() == uvirtio::Errc::bad_device_data);
        return;
      }
      // A fake BAR base: translate() only computes addresses, never reads.
      auto* bar = reinterpret_cast<std::uint8_t*>(std::uintptr_t{1} << 40);
      auto s = t->translate(bar, probe, len);
      if (!s) return;
      CHECK(s->data() >= bar && s->size() == len &&
            static_cast<std::uint64_t>(s->data() - bar) + len <= kBarSize);
      bool inside = false;
      for (const auto& r : t->regions())
        inside |= probe >= r.gpa && probe - r.gpa < r.size && len <= r.size - (probe - r.gpa) &&
                  static_cast<std::uint64_t>(s->data() - bar) == r.bar_offset + (probe - r.gpa);
      CHECK(inside);
      break;
    }
    case kDeviceInfo:
      CHECK(m.ops <= kOpDel);
      CHECK(m.ops == kOpAdd ? !m.virtqs.empty() && m.virtqs.size() <= kMaxRemoteVirtqs : m.virtqs.empty());
      CHECK(payload == sizeof(DeviceInfoHeader) + m.virtqs.size() * sizeof(RemoteVirtq));
      for (const auto& q : m.virtqs) {
        CHECK(q.num != 0 && (q.num & (q.num - 1)) == 0 && q.num <= 32768);
        CHECK(q.desc % 16 == 0 && q.avail % 2 == 0 && q.used % 4 == 0);
        CHECK(q.desc + 16ull * q.num >= q.desc && q.used + 6 + 8ull * q.num >= q.used);
      }
      break;
    case kFeatureBits:
      CHECK(payload == (ackq ? sizeof(FeatureBitsAckq) : 8u));
      break;
    case kUpdateDone:
      CHECK(!ackq && payload == sizeof(UpdateDone));
      break;
    default:
      CHECK(false);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  uvirtio::fuzz::Reader in{data, size};
  const bool ackq = (in.u8() & 1) != 0;
  const std::uint64_t probe = in.u64();
  const std::uint32_t len = in.u32();
  const std::span<const std::uint8_t> bytes(in.p, in.n);
  auto r = parse_message(bytes, ackq, kDevice);
  if (r.ok()) {
    const std::size_t hdr = sizeof(ControlqHeader) + (ackq ? 8 : 0);
    check_accepted(*r, bytes.size() - hdr, ackq, probe, len);
  } else {
    CHECK(r.error().code() == uvirtio::Errc::bad_device_data && r.error().device() == kDevice);
    CHECK(!r.error().cause().empty());
  }
  return 0;
}
