// Unit tests for MemoryMap, the region table device-role queues translate
// the other side's addresses through: construction refuses empty, wrapping,
// unmapped and overlapping regions; translate() gives exactly the bytes
// asked for inside one region and nothing else (no spanning, no write to a
// read-only region), whichever region the last-hit cache points at. Then
// both device queues built on a map: a chain inside it round-trips, one
// outside it breaks the queue without touching memory.
#include "uvirtio/rings/memory_map.hpp"

#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <limits>
#include <vector>

#include "uvirtio/rings/packed.hpp"
#include "uvirtio/rings/packed_device.hpp"
#include "uvirtio/rings/split.hpp"
#include "uvirtio/rings/split_device.hpp"

namespace uvirtio::rings {
namespace {

constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();

TEST(MemoryMap, RefusesBadRegions) {
  std::array<std::uint8_t, 64> a{};
  struct Case {
    const char* what;
    std::vector<MemoryRegion> regions;
    const char* cause;
  } cases[] = {
      {"empty", {{0x1000, 0, a.data()}}, "is empty"},
      {"wraps", {{kMax - 15, 32, a.data()}}, "wraps past 2^64"},
      {"no host", {{0x1000, 16, nullptr}}, "no host mapping"},
      {"overlap", {{0x1000, 0x100, a.data()}, {0x10ff, 1, a.data()}}, "overlap"},
      {"overlap unsorted", {{0x2000, 0x10, a.data()}, {0x1000, 0x1001, a.data()}}, "overlap"},
      {"overlap after the top", {{kMax - 15, 16, a.data()}, {kMax, 1, a.data()}}, "overlap"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    auto m = MemoryMap::create(c.regions, "peer 3");
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.error().code(), Errc::invalid_argument);
    EXPECT_NE(m.error().message().find("peer 3"), std::string::npos) << m.error().message();
    EXPECT_NE(m.error().message().find(c.cause), std::string::npos) << m.error().message();
  }
  // Adjacent regions and one ending exactly at 2^64 are fine.
  EXPECT_TRUE(MemoryMap::create({{0x1000, 0x10, a.data()}, {0x1010, 0x10, a.data() + 16}}, "p").ok());
  EXPECT_TRUE(MemoryMap::create({{kMax - 15, 16, a.data()}}, "p").ok());
  EXPECT_TRUE(MemoryMap::create({}, "p").value().empty());
}

TEST(MemoryMap, TranslatesInsideOneRegionOnly) {
  std::array<std::uint8_t, 256> host{};
  auto m = MemoryMap::create({{0x3000, 0x40, host.data() + 128, true},  // given out of order
                              {0x1000, 0x40, host.data(), true},
                              {0x1040, 0x40, host.data() + 64, false},
                              {kMax - 15, 16, host.data() + 192, true}},
                             "peer")
               .value();
  ASSERT_EQ(m.regions().size(), 4u);
  EXPECT_EQ(m.regions()[0].addr, 0x1000u);  // sorted
  auto s = m.translate(0x1008, 8, true);
  ASSERT_TRUE(s);
  EXPECT_EQ(s->data(), host.data() + 8);
  EXPECT_EQ(s->size(), 8u);
  // The last byte of a region, then one byte too many.
  EXPECT_EQ(m.translate(0x103f, 1, true)->data(), host.data() + 63);
  EXPECT_FALSE(m.translate(0x103f, 2, false));  // would span into the next region
  EXPECT_FALSE(m.translate(0x1000, 0x41, false));
  // Read-only region: reads yes, writes no.
  EXPECT_EQ(m.translate(0x1040, 0x40, false)->data(), host.data() + 64);
  EXPECT_FALSE(m.translate(0x1040, 1, true));
  // Holes, below the first, between, above.
  EXPECT_FALSE(m.translate(0xfff, 1, false));
  EXPECT_FALSE(m.translate(0x1080, 1, false));
  EXPECT_FALSE(m.translate(0x2fff, 2, false));
  EXPECT_FALSE(m.translate(0x3040, 1, false));
  // Back and forth between regions (the cache follows), and the top of the
  // address space without overflow.
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(m.translate(0x3000, 0x40, true)->data(), host.data() + 128);
    EXPECT_EQ(m.translate(0x1000, 1, true)->data(), host.data());
    EXPECT_EQ(m.translate(kMax, 1, true)->data(), host.data() + 207);
    EXPECT_FALSE(m.translate(kMax, 2, true));
    EXPECT_FALSE(m.translate(kMax - 15, 0xffffffffu, false));
  }
}

// Rings at the start of one buffer, data after them; the data is mapped at
// other-side address kData.
constexpr std::uint64_t kData = 0x8000'0000;
constexpr std::uint16_t kSize = 8;

struct Area {
  alignas(4096) std::array<std::uint8_t, 8192> mem{};
  std::uint8_t* data() { return mem.data() + 4096; }
  MemoryMap map() { return MemoryMap::create({{kData, 4096, data(), true}}, "peer").value(); }
};

// The next chain points outside the map: refused, queue broken, memory unchanged.
template <class Device>
void expect_refused(Device& dev, Area& a) {
  typename Device::Request r;
  const auto before = a.mem;
  auto e = dev.pop_into(r);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.error().code(), Errc::bad_device_data);
  EXPECT_NE(e.error().message().find("not mapped"), std::string::npos) << e.error().message();
  EXPECT_TRUE(dev.broken());
  EXPECT_EQ(a.mem, before);
}

TEST(MemoryMapQueues, EmptyMapIsRefused) {
  Area a;
  using L = SplitLayout;
  auto s = SplitDeviceQueue::create(kSize, a.mem.data(), a.mem.data() + L::desc_bytes(kSize),
                                    a.mem.data() + 1024, "q", MemoryMap{});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code(), Errc::invalid_argument);
  auto p = PackedDeviceQueue::create(kSize, a.mem.data(), a.mem.data() + 1024, a.mem.data() + 1040, "q",
                                     MemoryMap{});
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.error().code(), Errc::invalid_argument);
}

TEST(MemoryMapQueues, SplitDeviceTranslatesThroughTheMap) {
  Area a;
  using L = SplitLayout;
  void* desc = a.mem.data();
  void* avail = a.mem.data() + L::desc_bytes(kSize);
  void* used = a.mem.data() + 1024;
  auto drv = SplitQueue::create(kSize, desc, avail, used, "q").value();
  auto dev = SplitDeviceQueue::create(kSize, desc, avail, used, "q", a.map()).value();
  std::memcpy(a.data() + 16, "hello", 5);
  const Buffer out[] = {{kData + 16, 5}};
  const Buffer in[] = {{kData + 64, 8}};
  ASSERT_TRUE(drv.add(out, in, 1).ok());
  drv.publish();
  SplitDeviceQueue::Request r;
  ASSERT_TRUE(dev.pop_into(r).value());
  ASSERT_EQ(r.readable.size(), 1u);
  EXPECT_EQ(std::memcmp(r.readable[0].data(), "hello", 5), 0);
  EXPECT_EQ(r.writable[0].data(), a.data() + 64);
  ASSERT_TRUE(dev.push(r.head, 8).ok());
  EXPECT_EQ(drv.poll().value()->token, 1u);
  // A buffer past the mapped 4 KiB: refused, queue broken, memory unchanged.
  const Buffer bad[] = {{kData + 4090, 8}};
  ASSERT_TRUE(drv.add(bad, {}, 2).ok());
  drv.publish();
  expect_refused(dev, a);
}

TEST(MemoryMapQueues, PackedDeviceTranslatesThroughTheMap) {
  Area a;
  void* desc = a.mem.data();
  void* drv_ev = a.mem.data() + 1024;
  void* dev_ev = a.mem.data() + 1040;
  auto drv = PackedQueue::create(kSize, desc, drv_ev, dev_ev, "q").value();
  auto dev = PackedDeviceQueue::create(kSize, desc, drv_ev, dev_ev, "q", a.map()).value();
  const Buffer in[] = {{kData + 128, 16}};
  ASSERT_TRUE(drv.add({}, in, 7).ok());
  drv.publish();
  PackedDeviceQueue::Request r;
  ASSERT_TRUE(dev.pop_into(r).value());
  EXPECT_EQ(r.writable[0].data(), a.data() + 128);
  ASSERT_TRUE(dev.push(r.head, 16).ok());
  EXPECT_EQ(drv.poll().value()->len, 16u);
  const Buffer bad[] = {{kData - 8, 8}};
  ASSERT_TRUE(drv.add(bad, {}, 8).ok());
  drv.publish();
  expect_refused(dev, a);
}

}  // namespace
}  // namespace uvirtio::rings
