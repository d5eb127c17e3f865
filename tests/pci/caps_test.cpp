// Unit tests for the PCI/virtio capability parser (virtio spec 1.2, 4.1.4;
// PCI 3.0, 6.7 and 6.8.2; PCIe extended capabilities). Config snapshots are
// built byte by byte: a QEMU-like virtio-pmem and virtio-rng layout must parse
// to exact values, and each hostile layout must produce its exact outcome.
#include "uvirtio/pci/caps.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "uvirtio/base/le.hpp"

namespace uvirtio::pci {
namespace {

using Bars = std::array<std::uint64_t, 6>;

// A config-space snapshot of a virtio device with helpers to place capabilities.
struct Cfg {
  std::vector<std::uint8_t> b;

  explicit Cfg(std::size_t size = 256) : b(size, 0) {
    store_le16(&b[0], 0x1af4);  // vendor: Red Hat / virtio
    store_le16(&b[2], 0x105b);  // device: virtio-pmem (modern)
    b[6] = 0x10;                // Status: Capabilities List
  }
  void first(std::uint8_t ptr) { b[0x34] = ptr; }
  void cap(std::size_t at, std::uint8_t id, std::uint8_t next) {
    b[at] = id;
    b[at + 1] = next;
  }
  // struct virtio_pci_cap (4.1.4).
  void virtio(std::size_t at, std::uint8_t next, VirtioCfgType type, std::uint8_t bar, std::uint32_t off,
              std::uint32_t len, std::uint8_t cap_len = 16, std::uint8_t id = 0) {
    cap(at, 0x09, next);
    b[at + 2] = cap_len;
    b[at + 3] = static_cast<std::uint8_t>(type);
    b[at + 4] = bar;
    b[at + 5] = id;
    store_le32(&b[at + 8], off);
    store_le32(&b[at + 12], len);
  }
  // struct virtio_pci_notify_cap (4.1.4.4).
  void notify(std::size_t at, std::uint8_t next, std::uint8_t bar, std::uint32_t off, std::uint32_t len,
              std::uint32_t mult, std::uint8_t cap_len = 20) {
    virtio(at, next, VirtioCfgType::notify, bar, off, len, cap_len);
    store_le32(&b[at + 16], mult);
  }
  // struct virtio_pci_cap64 (4.1.4.7).
  void shm(std::size_t at, std::uint8_t next, std::uint8_t bar, std::uint8_t id, std::uint64_t off,
           std::uint64_t len) {
    virtio(at, next, VirtioCfgType::shared_memory, bar, static_cast<std::uint32_t>(off),
           static_cast<std::uint32_t>(len), 24, id);
    store_le32(&b[at + 16], static_cast<std::uint32_t>(off >> 32));
    store_le32(&b[at + 20], static_cast<std::uint32_t>(len >> 32));
  }
  // MSI-X (PCI 3.0, 6.8.2).
  void msix(std::size_t at, std::uint8_t next, std::uint16_t ctl, std::uint32_t table, std::uint32_t pba) {
    cap(at, 0x11, next);
    store_le16(&b[at + 2], ctl);
    store_le32(&b[at + 4], table);
    store_le32(&b[at + 8], pba);
  }
  // PCIe extended capability header.
  void ext(std::size_t at, std::uint16_t id, std::uint8_t version, std::uint16_t next) {
    store_le32(&b[at], id | (std::uint32_t{version} << 16) | (std::uint32_t{next} << 20));
  }
  Result<Capabilities> parse(const Bars& bars) const { return parse_capabilities(b, bars, "0000:00:04.0"); }
};

constexpr Bars kBar4 = {0, 0, 0, 0, 0x4000, 0};

// QEMU's modern virtio-pci layout for virtio-pmem: each new cap is prepended,
// so the walk runs 0x84 (pci_cfg) -> 0x70 -> 0x60 -> 0x50 -> 0x40.
Cfg qemu_pmem() {
  Cfg c;
  c.first(0x84);
  c.virtio(0x84, 0x70, VirtioCfgType::pci_cfg, 0, 0, 0, 20);
  c.notify(0x70, 0x60, 4, 0x3000, 0x1000, 4);
  c.virtio(0x60, 0x50, VirtioCfgType::device, 4, 0x2000, 0x1000);
  c.virtio(0x50, 0x40, VirtioCfgType::isr, 4, 0x1000, 0x1000);
  c.virtio(0x40, 0x00, VirtioCfgType::common, 4, 0, 0x1000);
  return c;
}

void expect_region(const std::optional<VirtioRegion>& r, std::uint8_t cap_offset, std::uint8_t bar,
                   std::uint64_t offset, std::uint64_t length) {
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->cap_offset, cap_offset);
  EXPECT_EQ(r->bar, bar);
  EXPECT_EQ(r->offset, offset);
  EXPECT_EQ(r->length, length);
}

// Parses a snapshot expected to succeed.
Capabilities ok_parse(const Cfg& c, const Bars& bars = kBar4) {
  auto r = c.parse(bars);
  EXPECT_TRUE(r.ok()) << r.error().message();
  return r.ok() ? std::move(r).value() : Capabilities{};
}

void expect_error(const Cfg& c, Errc code, const std::string& cause_part, const Bars& bars = kBar4) {
  auto r = c.parse(bars);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), code);
  EXPECT_EQ(r.error().device(), "0000:00:04.0");
  EXPECT_EQ(r.error().op(), "parse capabilities");
  EXPECT_NE(r.error().cause().find(cause_part), std::string::npos) << r.error().cause();
  EXPECT_EQ(r.error().message().rfind("0000:00:04.0: parse capabilities: ", 0), 0u) << r.error().message();
}

// One common cap at 0x40 in a fresh snapshot; returns the parse.
Capabilities one_common(std::uint8_t bar, std::uint32_t off, std::uint32_t len, std::uint8_t cap_len = 16,
                        const Bars& bars = kBar4) {
  Cfg c;
  c.first(0x40);
  c.virtio(0x40, 0, VirtioCfgType::common, bar, off, len, cap_len);
  return ok_parse(c, bars);
}

bool has_warning(const Capabilities& caps, const std::string& part) {
  for (const auto& w : caps.warnings) {
    if (w.find(part) != std::string::npos) return true;
  }
  return false;
}

TEST(Caps, CfgTypeNames) {
  EXPECT_STREQ(virtio_cfg_type_name(1), "common");
  EXPECT_STREQ(virtio_cfg_type_name(2), "notify");
  EXPECT_STREQ(virtio_cfg_type_name(3), "isr");
  EXPECT_STREQ(virtio_cfg_type_name(4), "device");
  EXPECT_STREQ(virtio_cfg_type_name(5), "pci_cfg");
  EXPECT_STREQ(virtio_cfg_type_name(8), "shared_memory");
  EXPECT_STREQ(virtio_cfg_type_name(9), "vendor");
  EXPECT_STREQ(virtio_cfg_type_name(0), "unknown");
  EXPECT_STREQ(virtio_cfg_type_name(6), "unknown");
  EXPECT_STREQ(virtio_cfg_type_name(255), "unknown");
}

TEST(Caps, QemuVirtioPmem) {
  Capabilities caps = ok_parse(qemu_pmem());
  expect_region(caps.common, 0x40, 4, 0, 0x1000);
  expect_region(caps.isr, 0x50, 4, 0x1000, 0x1000);
  expect_region(caps.device, 0x60, 4, 0x2000, 0x1000);
  expect_region(caps.notify, 0x70, 4, 0x3000, 0x1000);
  expect_region(caps.pci_cfg, 0x84, 0, 0, 0);
  EXPECT_EQ(caps.notify_off_multiplier, 4u);
  EXPECT_TRUE(caps.shm.empty());
  EXPECT_FALSE(caps.msix.has_value());
  EXPECT_TRUE(caps.warnings.empty());
  ASSERT_EQ(caps.list.size(), 5u);
  const std::uint16_t offsets[] = {0x84, 0x70, 0x60, 0x50, 0x40};
  const std::uint8_t types[] = {5, 2, 4, 3, 1};
  const std::uint8_t lens[] = {20, 20, 16, 16, 16};
  for (std::size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(caps.list[i].offset, offsets[i]);
    EXPECT_EQ(caps.list[i].id, 0x09);
    EXPECT_EQ(caps.list[i].length, lens[i]);
    EXPECT_FALSE(caps.list[i].extended);
    EXPECT_EQ(caps.list[i].virtio_cfg_type, types[i]);
  }
}

TEST(Caps, StatusBitClearMeansNoList) {
  Cfg c = qemu_pmem();
  c.b[6] = 0;
  Capabilities caps = ok_parse(c);
  EXPECT_TRUE(caps.list.empty());
  EXPECT_FALSE(caps.common.has_value());
  EXPECT_TRUE(caps.warnings.empty());
}

TEST(Caps, PointerLowBitsMasked) {
  Cfg c = qemu_pmem();
  c.first(0x87);     // reserved low bits set: still 0x84
  c.b[0x85] = 0x73;  // -> 0x70
  Capabilities caps = ok_parse(c);
  EXPECT_EQ(caps.list.size(), 5u);
  expect_region(caps.common, 0x40, 4, 0, 0x1000);
}

TEST(Caps, MsixLikeVirtioRng) {
  Cfg c;
  c.first(0x98);
  c.msix(0x98, 0x84, 0x0001, 0x00000001, 0x00000801);  // 2 vectors; table BAR1+0, PBA BAR1+0x800
  c.virtio(0x84, 0x70, VirtioCfgType::pci_cfg, 0, 0, 0, 20);
  c.notify(0x70, 0x60, 4, 0x3000, 0x1000, 4);
  c.virtio(0x60, 0x50, VirtioCfgType::device, 4, 0x2000, 0x1000);
  c.virtio(0x50, 0x40, VirtioCfgType::isr, 4, 0x1000, 0x1000);
  c.virtio(0x40, 0x00, VirtioCfgType::common, 4, 0, 0x1000);
  Capabilities caps = ok_parse(c, {0, 0x1000, 0, 0, 0x4000, 0});
  ASSERT_TRUE(caps.msix.has_value());
  EXPECT_EQ(caps.msix->cap_offset, 0x98);
  EXPECT_EQ(caps.msix->table_size, 2);
  EXPECT_EQ(caps.msix->table_bar, 1);
  EXPECT_EQ(caps.msix->table_offset, 0u);
  EXPECT_EQ(caps.msix->pba_bar, 1);
  EXPECT_EQ(caps.msix->pba_offset, 0x800u);
  EXPECT_FALSE(caps.msix->enabled);
  ASSERT_EQ(caps.list.size(), 6u);
  EXPECT_EQ(caps.list[0].id, 0x11);
  EXPECT_EQ(caps.list[0].length, 0);
  EXPECT_EQ(caps.list[0].virtio_cfg_type, 0);
  EXPECT_TRUE(caps.warnings.empty());
}

TEST(Caps, MsixEnabledAndFullTable) {
  Cfg c;
  c.first(0x40);
  c.msix(0x40, 0, 0x87ff, 0x00000002, 0x00008002);  // 2048 vectors: 32 KiB table, 256 B PBA
  Capabilities caps = ok_parse(c, {0, 0, 0x8100, 0, 0, 0});
  ASSERT_TRUE(caps.msix.has_value());
  EXPECT_EQ(caps.msix->table_size, 2048);
  EXPECT_TRUE(caps.msix->enabled);
  EXPECT_EQ(caps.msix->pba_offset, 0x8000u);
  // One byte short for the PBA.
  caps = ok_parse(c, {0, 0, 0x80ff, 0, 0, 0});
  EXPECT_FALSE(caps.msix.has_value());
  EXPECT_TRUE(has_warning(caps, "PBA")) << caps.warnings.at(0);
}

TEST(Caps, MsixBadBirOrTableBeyondBarDropped) {
  Cfg c;
  c.first(0x40);
  c.msix(0x40, 0, 0x0001, 0x00000006, 0x00000801);  // table BIR 6
  Capabilities caps = ok_parse(c, {0, 0x1000, 0, 0, 0, 0});
  EXPECT_FALSE(caps.msix.has_value());
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("BAR index 6"), std::string::npos) << caps.warnings[0];

  c.msix(0x40, 0, 0x0001, 0x00000ff9, 0x00000801);  // table BAR1+0xff8, 32 bytes
  caps = ok_parse(c, {0, 0x1000, 0, 0, 0, 0});
  EXPECT_FALSE(caps.msix.has_value());
  EXPECT_TRUE(has_warning(caps, "table"));
  ASSERT_EQ(caps.list.size(), 1u);
  EXPECT_EQ(caps.list[0].id, 0x11);
}

TEST(Caps, CapLoopFails) {
  Cfg c;
  c.first(0x40);
  c.virtio(0x40, 0x50, VirtioCfgType::common, 4, 0, 0x1000);
  c.virtio(0x50, 0x40, VirtioCfgType::isr, 4, 0x1000, 0x1000);
  expect_error(c, Errc::bad_device_data, "loops back to offset 0x40");
}

TEST(Caps, SelfPointingCapFails) {
  Cfg c;
  c.first(0x40);
  c.cap(0x40, 0x05, 0x40);
  expect_error(c, Errc::bad_device_data, "loops back to offset 0x40");
}

TEST(Caps, PointerIntoHeaderEndsWalk) {
  Cfg c;
  c.first(0x20);
  Capabilities caps = ok_parse(c);
  EXPECT_TRUE(caps.list.empty());
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("config header"), std::string::npos) << caps.warnings[0];

  c.first(0x40);
  c.virtio(0x40, 0x3c, VirtioCfgType::common, 4, 0, 0x1000);  // next points into the header
  caps = ok_parse(c);
  ASSERT_EQ(caps.list.size(), 1u);
  expect_region(caps.common, 0x40, 4, 0, 0x1000);
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("0x3c"), std::string::npos) << caps.warnings[0];
}

TEST(Caps, BarIndexSixSkipped) {
  Capabilities caps = one_common(6, 0, 0x1000);
  EXPECT_FALSE(caps.common.has_value());
  ASSERT_EQ(caps.list.size(), 1u);
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("BAR index 6"), std::string::npos) << caps.warnings[0];
}

TEST(Caps, OffsetPlusLengthOverflowSkipped) {
  // 0xffffffff + 2 wraps to 1 in 32 bits, which would fit in BAR4.
  Cfg c;
  c.first(0x40);
  c.virtio(0x40, 0, VirtioCfgType::isr, 4, 0xffffffff, 2);
  Capabilities caps = ok_parse(c);
  EXPECT_FALSE(caps.isr.has_value());
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("beyond BAR 4"), std::string::npos) << caps.warnings[0];
}

TEST(Caps, RegionPastBarEndSkipped) {
  Cfg c;
  c.first(0x40);
  c.virtio(0x40, 0x50, VirtioCfgType::device, 4, 0x3800, 0x1000);  // ends at 0x4800
  c.virtio(0x50, 0, VirtioCfgType::isr, 4, 0x3fff, 1);             // last byte: fits
  Capabilities caps = ok_parse(c);
  EXPECT_FALSE(caps.device.has_value());
  expect_region(caps.isr, 0x50, 4, 0x3fff, 1);
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("virtio device"), std::string::npos) << caps.warnings[0];
}

TEST(Caps, BarSizeZeroSkipped) {
  Capabilities caps = one_common(2, 0, 0x1000);
  EXPECT_FALSE(caps.common.has_value());
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("BAR 2 is absent"), std::string::npos) << caps.warnings[0];
}

TEST(Caps, CommonCfgTooShortSkipped) {
  Capabilities caps = one_common(4, 0, 0x37);
  EXPECT_FALSE(caps.common.has_value());
  EXPECT_EQ(caps.warnings.size(), 1u);
  caps = one_common(4, 0, 0x38);
  expect_region(caps.common, 0x40, 4, 0, 0x38);
  EXPECT_TRUE(caps.warnings.empty());
}

TEST(Caps, MisalignedCommonOffsetSkipped) {
  Capabilities caps = one_common(4, 2, 0x1000);
  EXPECT_FALSE(caps.common.has_value());
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("aligned"), std::string::npos) << caps.warnings[0];
}

TEST(Caps, MisalignedDeviceOffsetSkipped) {
  Cfg c;
  c.first(0x40);
  c.virtio(0x40, 0x50, VirtioCfgType::device, 4, 0x2002, 0x10);
  c.virtio(0x50, 0, VirtioCfgType::isr, 4, 0x1001, 1);  // the ISR byte needs no alignment
  Capabilities caps = ok_parse(c);
  EXPECT_FALSE(caps.device.has_value());
  expect_region(caps.isr, 0x50, 4, 0x1001, 1);
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("not 4-byte aligned"), std::string::npos) << caps.warnings[0];
}

TEST(Caps, NotifyAlignmentAndMultiplier) {
  Cfg c;
  c.first(0x40);
  c.notify(0x40, 0, 4, 0x3000, 0x1000, 3);
  Capabilities caps = ok_parse(c);
  EXPECT_FALSE(caps.notify.has_value());
  EXPECT_EQ(caps.notify_off_multiplier, 0u);
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("odd notify_off_multiplier 3"), std::string::npos) << caps.warnings[0];

  c.notify(0x40, 0, 4, 0x3001, 0x10, 4);  // offset must be 2-byte aligned
  caps = ok_parse(c);
  EXPECT_FALSE(caps.notify.has_value());
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("not 2-byte aligned"), std::string::npos) << caps.warnings[0];

  c.notify(0x40, 0, 4, 0x3002, 0x10, 0);  // multiplier 0: all queues share one address
  caps = ok_parse(c);
  expect_region(caps.notify, 0x40, 4, 0x3002, 0x10);
  EXPECT_EQ(caps.notify_off_multiplier, 0u);
  EXPECT_TRUE(caps.warnings.empty());
}

// 4.1.4.4: the device MUST present 0 or an even power of 2; an even value
// that is no power of 2 is as bad as an odd one.
TEST(Caps, NotifyMultiplierMustBeAPowerOfTwo) {
  Cfg c;
  c.first(0x40);
  for (std::uint32_t bad : {6u, 12u, 0x1002u, 0x80000002u}) {
    SCOPED_TRACE(bad);
    c.notify(0x40, 0, 4, 0x3000, 0x1000, bad);
    Capabilities caps = ok_parse(c);
    EXPECT_FALSE(caps.notify.has_value());
    EXPECT_EQ(caps.notify_off_multiplier, 0u);
    ASSERT_EQ(caps.warnings.size(), 1u);
    EXPECT_NE(caps.warnings[0].find("not a power of 2: notify_off_multiplier " + std::to_string(bad)),
              std::string::npos)
        << caps.warnings[0];
  }
  for (std::uint32_t good : {2u, 4u, 8u, 0x1000u, 0x80000000u}) {
    SCOPED_TRACE(good);
    c.notify(0x40, 0, 4, 0x3000, 0x1000, good);
    Capabilities caps = ok_parse(c);
    expect_region(caps.notify, 0x40, 4, 0x3000, 0x1000);
    EXPECT_EQ(caps.notify_off_multiplier, good);
    EXPECT_TRUE(caps.warnings.empty());
  }
}

// 4.1.4.4: a notification is a 16-bit write, so a notify structure shorter
// than 2 bytes cannot be used; the driver takes the next one it can use.
TEST(Caps, NotifyTooShortForANotificationSkippedForTheNextOne) {
  Cfg c;
  c.first(0x40);
  c.notify(0x40, 0x54, 4, 0x3000, 1, 0);
  c.notify(0x54, 0, 4, 0x3100, 0x100, 4);
  Capabilities caps = ok_parse(c);
  expect_region(caps.notify, 0x54, 4, 0x3100, 0x100);
  EXPECT_EQ(caps.notify_off_multiplier, 4u);
  EXPECT_TRUE(has_warning(caps, "length 0x1 < 0x2"));
}

TEST(Caps, CapLenTooSmallSkipped) {
  Capabilities caps = one_common(4, 0, 0x1000, 15);
  EXPECT_FALSE(caps.common.has_value());
  ASSERT_EQ(caps.list.size(), 1u);
  EXPECT_EQ(caps.list[0].length, 15);
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("cap_len 15 < 16"), std::string::npos) << caps.warnings[0];

  Cfg c;  // a notify cap needs 20 bytes for notify_off_multiplier
  c.first(0x40);
  c.notify(0x40, 0, 4, 0x3000, 0x1000, 4, 16);
  caps = ok_parse(c);
  EXPECT_FALSE(caps.notify.has_value());
  EXPECT_TRUE(has_warning(caps, "cap_len 16 < 20"));

  c.virtio(0x40, 0, VirtioCfgType::pci_cfg, 0, 0, 0, 16);  // pci_cfg carries 4 data bytes
  caps = ok_parse(c);
  EXPECT_FALSE(caps.pci_cfg.has_value());
}

TEST(Caps, CapRunningOffShortSnapshotSkipped) {
  Cfg c;
  c.first(0x40);
  c.virtio(0x40, 0, VirtioCfgType::common, 4, 0, 0x1000);
  c.b.resize(0x48);  // cap_len 16 needs up to 0x50
  Capabilities caps = ok_parse(c);
  EXPECT_FALSE(caps.common.has_value());
  ASSERT_EQ(caps.list.size(), 1u);
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("runs past"), std::string::npos) << caps.warnings[0];

  c.b.resize(0x41);  // not even the next pointer is there
  caps = ok_parse(c);
  EXPECT_TRUE(caps.list.empty());
  EXPECT_EQ(caps.warnings.size(), 1u);

  c.b.resize(0x30);  // no capability pointer at all
  caps = ok_parse(c);
  EXPECT_TRUE(caps.list.empty());
  EXPECT_TRUE(caps.warnings.empty());
}

TEST(Caps, CapLenPastStandardSpaceSkipped) {
  Cfg c(4096);  // standard caps may not spill into extended space
  c.first(0xf0);
  c.virtio(0xf0, 0, VirtioCfgType::isr, 4, 0, 1, 20);
  Capabilities caps = ok_parse(c);
  EXPECT_FALSE(caps.isr.has_value());
  EXPECT_TRUE(has_warning(caps, "runs past"));
}

TEST(Caps, AllOnesVendorIdFails) {
  Cfg c = qemu_pmem();
  std::fill(c.b.begin(), c.b.end(), 0xff);
  expect_error(c, Errc::not_found, "device not responding (all-ones config read: surprise removal?)");
}

TEST(Caps, DuplicateCommonFirstInvalidSecondWins) {
  Cfg c;
  c.first(0x40);
  c.virtio(0x40, 0x50, VirtioCfgType::common, 4, 0, 0x10);  // too short
  c.virtio(0x50, 0, VirtioCfgType::common, 4, 0x100, 0x100);
  Capabilities caps = ok_parse(c);
  expect_region(caps.common, 0x50, 4, 0x100, 0x100);
  EXPECT_EQ(caps.warnings.size(), 1u);
}

TEST(Caps, DuplicateCommonBothValidFirstWins) {
  Cfg c;
  c.first(0x40);
  c.virtio(0x40, 0x50, VirtioCfgType::common, 4, 0, 0x1000);
  c.virtio(0x50, 0x60, VirtioCfgType::common, 4, 0x100, 0x100);
  c.virtio(0x60, 0, VirtioCfgType::common, 9, 0x100, 0x100);  // invalid later duplicate: ignored
  Capabilities caps = ok_parse(c);
  expect_region(caps.common, 0x40, 4, 0, 0x1000);
  EXPECT_EQ(caps.list.size(), 3u);
  EXPECT_TRUE(caps.warnings.empty());
}

TEST(Caps, UnknownAndVendorCfgTypesIgnoredSilently) {
  Cfg c;
  c.first(0x40);
  c.virtio(0x40, 0x50, static_cast<VirtioCfgType>(7), 4, 0, 0x1000);
  c.virtio(0x50, 0x60, VirtioCfgType::vendor, 9, 0, 0x1000);
  c.virtio(0x60, 0, static_cast<VirtioCfgType>(0xff), 0, 0, 0, 2);
  Capabilities caps = ok_parse(c);
  EXPECT_TRUE(caps.warnings.empty());
  EXPECT_FALSE(caps.common || caps.notify || caps.isr || caps.device || caps.pci_cfg);
  ASSERT_EQ(caps.list.size(), 3u);
  EXPECT_EQ(caps.list[0].virtio_cfg_type, 7);
  EXPECT_EQ(caps.list[1].virtio_cfg_type, 9);
  EXPECT_EQ(caps.list[2].length, 2);
}

TEST(Caps, PciCfgNotCheckedAgainstBar) {
  Cfg c;
  c.first(0x40);
  c.virtio(0x40, 0, VirtioCfgType::pci_cfg, 7, 0xfffffff0, 0x40, 20);
  Capabilities caps = ok_parse(c);
  expect_region(caps.pci_cfg, 0x40, 7, 0xfffffff0, 0x40);
  EXPECT_TRUE(caps.warnings.empty());
}

TEST(Caps, SharedMemoryCap64) {
  Cfg c;
  c.first(0x40);
  c.shm(0x40, 0x58, 2, 0, 0x1'0000'0000ull, 0x2000'0000ull);
  c.shm(0x58, 0x70, 2, 0, 0, 0x1000);         // same id: first wins
  c.shm(0x70, 0x88, 2, 1, 0x1000, 0x1000);    // another id
  c.shm(0x88, 0, 2, 2, 0x1'2000'0000ull, 1);  // 64-bit offset at the BAR's end
  const Bars bars = {0, 0, 0x1'2000'0000ull, 0, 0, 0};
  Capabilities caps = ok_parse(c, bars);
  ASSERT_EQ(caps.shm.size(), 2u);
  EXPECT_EQ(caps.shm[0].id, 0);
  EXPECT_EQ(caps.shm[0].region.cap_offset, 0x40);
  EXPECT_EQ(caps.shm[0].region.bar, 2);
  EXPECT_EQ(caps.shm[0].region.offset, 0x1'0000'0000ull);
  EXPECT_EQ(caps.shm[0].region.length, 0x2000'0000ull);
  EXPECT_EQ(caps.shm[1].id, 1);
  EXPECT_EQ(caps.shm[1].region.offset, 0x1000u);
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("beyond BAR 2"), std::string::npos) << caps.warnings[0];

  caps = ok_parse(c, {0, 0, 0x1'0000'0000ull, 0, 0, 0});
  ASSERT_EQ(caps.shm.size(), 2u);  // id 0 at 0x40 fails, so the one at 0x58 wins
  EXPECT_EQ(caps.shm[0].region.cap_offset, 0x58);
  EXPECT_EQ(caps.shm[1].region.cap_offset, 0x70);
  EXPECT_EQ(caps.warnings.size(), 2u);  // 0x40 and 0x88
}

TEST(Caps, SharedMemory64BitOverflowSkipped) {
  Cfg c;
  c.first(0x40);
  c.shm(0x40, 0x58, 0, 0, ~0ull, 2);
  c.virtio(0x58, 0, VirtioCfgType::shared_memory, 0, 0, 0x10, 20, 1);  // cap_len 20 < 24
  Capabilities caps = ok_parse(c, {~0ull, 0, 0, 0, 0, 0});
  EXPECT_TRUE(caps.shm.empty());
  ASSERT_EQ(caps.warnings.size(), 2u);
  EXPECT_NE(caps.warnings[0].find("beyond BAR 0"), std::string::npos) << caps.warnings[0];
  EXPECT_NE(caps.warnings[1].find("cap_len 20 < 24"), std::string::npos) << caps.warnings[1];
}

TEST(Caps, FortyEightEntriesAndLoopBound) {
  Cfg c;
  c.first(0x40);
  for (std::size_t at = 0x40; at <= 0xfc; at += 4) {
    c.cap(at, 0x05, static_cast<std::uint8_t>(at == 0xfc ? 0 : at + 4));
  }
  Capabilities caps = ok_parse(c);
  EXPECT_EQ(caps.list.size(), 48u);
  EXPECT_EQ(caps.list.back().offset, 0xfc);
  EXPECT_TRUE(caps.warnings.empty());

  c.b[0xfd] = 0x40;  // the 49th entry can only be a revisit
  expect_error(c, Errc::bad_device_data, "loops back to offset 0x40");
  c.b[0xfd] = 0xa0;
  expect_error(c, Errc::bad_device_data, "loops back to offset 0xa0");
}

TEST(Caps, ExtendedCaps) {
  Cfg c(4096);
  c.ext(0x100, 0x0001, 2, 0x148);  // AER
  c.ext(0x148, 0x000b, 1, 0x200);  // vendor specific
  c.ext(0x200, 0x0010, 1, 0);      // SR-IOV
  Capabilities caps = ok_parse(c);
  ASSERT_EQ(caps.list.size(), 3u);
  EXPECT_EQ(caps.list[0].offset, 0x100);
  EXPECT_EQ(caps.list[0].id, 0x0001);
  EXPECT_TRUE(caps.list[0].extended);
  EXPECT_EQ(caps.list[1].offset, 0x148);
  EXPECT_EQ(caps.list[1].id, 0x000b);
  EXPECT_EQ(caps.list[2].offset, 0x200);
  EXPECT_EQ(caps.list[2].id, 0x0010);
  EXPECT_TRUE(caps.warnings.empty());

  // Standard then extended, in walk order.
  Cfg p = qemu_pmem();
  p.b.resize(4096);
  p.ext(0x100, 0x0001, 2, 0);
  caps = ok_parse(p);
  ASSERT_EQ(caps.list.size(), 6u);
  EXPECT_FALSE(caps.list[4].extended);
  EXPECT_TRUE(caps.list[5].extended);
}

TEST(Caps, ExtendedListAbsent) {
  Cfg c(4096);
  EXPECT_TRUE(ok_parse(c).list.empty());  // header 0
  c.ext(0x100, 0xffff, 0xf, 0xfff);       // all-ones header
  Capabilities caps = ok_parse(c);
  EXPECT_TRUE(caps.list.empty());
  EXPECT_TRUE(caps.warnings.empty());

  Cfg s(256);  // conventional snapshot: no extended walk at all
  EXPECT_TRUE(ok_parse(s).list.empty());
}

TEST(Caps, ExtendedLoopFails) {
  Cfg c(4096);
  c.ext(0x100, 0x0001, 1, 0x200);
  c.ext(0x200, 0x0002, 1, 0x100);
  expect_error(c, Errc::bad_device_data, "extended capability list loops back to offset 0x100");

  Cfg s(4096);
  s.ext(0x100, 0x0001, 1, 0x100);
  expect_error(s, Errc::bad_device_data, "loops back to offset 0x100");
}

TEST(Caps, ExtendedNextBelow0x100EndsWalk) {
  Cfg c(4096);
  c.ext(0x100, 0x0001, 1, 0x180);
  c.ext(0x180, 0x0002, 1, 0x040);
  Capabilities caps = ok_parse(c);
  ASSERT_EQ(caps.list.size(), 2u);
  EXPECT_EQ(caps.list[1].offset, 0x180);
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("below 0x100"), std::string::npos) << caps.warnings[0];
}

TEST(Caps, ExtendedPastShortSnapshotEndsWalk) {
  Cfg c(0x200);
  c.ext(0x100, 0x0001, 1, 0x400);
  Capabilities caps = ok_parse(c);
  ASSERT_EQ(caps.list.size(), 1u);
  ASSERT_EQ(caps.warnings.size(), 1u);
  EXPECT_NE(caps.warnings[0].find("0x400"), std::string::npos) << caps.warnings[0];
}

}  // namespace
}  // namespace uvirtio::pci
