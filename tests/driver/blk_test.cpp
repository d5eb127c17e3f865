// Unit tests for the virtio-blk driver (virtio spec 1.2, 5.2) against
// FakeVirtioDevice playing a 64-sector disk held in memory: reads and writes
// reach the right sectors, out-of-range requests are refused before the
// device sees them, the device's status byte is honoured, and a device that
// goes DEVICE_NEEDS_RESET with a request in flight is recovered (reset,
// same features, ring restarted in place) and the request resubmitted. The
// QEMU conformance matrix covers the real device.
#include "uvirtio/driver/blk.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "support/fake_virtio.hpp"
#include "uvirtio/base/le.hpp"

namespace uvirtio::driver {
namespace {

using test::FakeVirtioDevice;
using test::FakeVirtioOptions;
using test::Segment;
using namespace std::chrono_literals;

constexpr std::uint64_t kSectors = 64;
const std::vector<std::string> kNone;  // no driver protocol violations

// The disk: a chain is header (16 readable bytes: le32 type, le32 reserved,
// le64 sector), data (readable for writes, writable for reads), status (the
// last writable byte).
struct Disk {
  std::vector<std::uint8_t> bytes = std::vector<std::uint8_t>(kSectors * kSectorSize, 0);
  std::uint8_t status = 0;  // what the device answers
  std::uint64_t requests = 0;
  std::uint32_t max_data_segment = 0;  // the longest data descriptor seen
  std::uint32_t block = kSectorSize;   // as QEMU: a request not in whole blocks gets VIRTIO_BLK_S_IOERR
  test::RequestHandler handler() {
    return [this](std::uint16_t, std::span<const Segment> chain) -> std::uint32_t {
      ++requests;
      if (chain.size() < 2 || chain.front().writable || chain.front().len != 16 || !chain.back().writable ||
          chain.back().len != 1)
        return 0;
      const std::uint32_t type = load_le32(chain.front().data);
      const std::uint64_t sector =
          load_le32(chain.front().data + 8) | (std::uint64_t{load_le32(chain.front().data + 12)} << 32);
      std::uint32_t written = 1;
      std::uint64_t off = sector * kSectorSize;
      std::uint64_t data_len = 0;
      for (std::size_t i = 1; i + 1 < chain.size(); ++i) data_len += chain[i].len;
      if ((type == 0 || type == 1) && (off % block != 0 || data_len % block != 0)) {
        *chain.back().data = 1;  // VIRTIO_BLK_S_IOERR
        return 1;
      }
      for (std::size_t i = 1; i + 1 < chain.size(); ++i) {
        const Segment& s = chain[i];
        max_data_segment = std::max(max_data_segment, s.len);
        if (off + s.len > bytes.size()) return 0;
        if (type == 0 && s.writable) {
          std::memcpy(s.data, bytes.data() + off, s.len);
          written += s.len;
        } else if (type == 1 && !s.writable) {
          std::memcpy(bytes.data() + off, s.data, s.len);
        }
        off += s.len;
      }
      *chain.back().data = status;
      return written;
    };
  }
};

FakeVirtioOptions disk_options() {
  FakeVirtioOptions o;
  o.device_type = kVirtioBlkType;
  o.msix_vectors = 2;
  o.features |= 1ull << blk_feature::kFlush;
  o.device_config.assign(60, 0);
  for (int i = 0; i < 8; ++i) o.device_config[i] = static_cast<std::uint8_t>(kSectors >> (8 * i));
  return o;
}

std::unique_ptr<Blk> attach(FakeVirtioDevice& dev, bool recover_on_reset,
                            CompletionMode completion = CompletionMode::polling) {
  BlkOptions opt;
  opt.completion = completion;
  opt.timeout = 2s;
  opt.recover_on_reset = recover_on_reset;
  auto d = bring_up(dev.take_function(), kVirtioBlkType, Blk::policy(opt));
  EXPECT_TRUE(d.ok()) << d.error().message();
  if (!d.ok()) return nullptr;
  auto b = Blk::attach(std::move(d).value(), opt);
  EXPECT_TRUE(b.ok()) << b.error().message();
  return b.ok() ? std::move(b).value() : nullptr;
}

// A fake disk with the driver attached to it.
struct Rig {
  explicit Rig(bool recover_on_reset = false, std::uint8_t status = 0) {
    disk.status = status;
    dev.set_handler(disk.handler());
    blk = attach(dev, recover_on_reset);
  }
  FakeVirtioDevice dev{disk_options()};
  Disk disk;
  std::unique_ptr<Blk> blk;
};

std::vector<std::uint8_t> pattern(std::size_t n, std::uint8_t seed) {
  std::vector<std::uint8_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::uint8_t>(seed + i * 7);
  return v;
}

TEST(Blk, WritesAndReadsReachTheRightSectors) {
  Rig rig;
  auto& [dev, disk, blk] = rig;
  ASSERT_TRUE(blk);
  EXPECT_EQ(blk->capacity_sectors(), kSectors);
  const auto a = pattern(2 * kSectorSize, 1);
  ASSERT_TRUE(blk->write(3, a).ok());
  EXPECT_TRUE(std::equal(a.begin(), a.end(), disk.bytes.begin() + 3 * kSectorSize));
  std::vector<std::uint8_t> back(2 * kSectorSize);
  ASSERT_TRUE(blk->read(3, back).ok());
  EXPECT_EQ(back, a);
  ASSERT_TRUE(blk->flush().ok());
  EXPECT_EQ(dev.violations(), kNone);
}

TEST(Blk, BadRangesAreRefusedBeforeTheDeviceSeesThem) {
  Rig rig;
  auto& [dev, disk, blk] = rig;
  ASSERT_TRUE(blk);
  std::vector<std::uint8_t> buf(kSectorSize);
  EXPECT_EQ(blk->read(kSectors, buf).error().code(), Errc::invalid_argument);
  EXPECT_EQ(blk->write(~std::uint64_t{0}, buf).error().code(), Errc::invalid_argument);
  std::vector<std::uint8_t> odd(100);
  EXPECT_EQ(blk->read(0, odd).error().code(), Errc::invalid_argument);
  EXPECT_EQ(disk.requests, 0u);
}

TEST(Blk, DeviceIoErrorIsEio) {
  Rig rig(false, 1);  // VIRTIO_BLK_S_IOERR
  auto& blk = rig.blk;
  ASSERT_TRUE(blk);
  std::vector<std::uint8_t> buf(kSectorSize);
  auto r = blk->read(0, buf);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::device_error);
  EXPECT_EQ(r.error().sys_errno(), EIO);
}

// The device goes NEEDS_RESET on the next notify, dropping that write; a
// reset repairs it. With recover_on_reset the write is resubmitted after
// recovery and lands; without it the caller sees needs_reset, calls
// recover() and writes again.
TEST(Blk, RecoversFromNeedsResetAndResubmitsTheWrite) {
  for (const bool automatic : {true, false}) {
    SCOPED_TRACE(automatic ? "recover_on_reset" : "explicit recover()");
    Rig rig(automatic);
    auto& [dev, disk, blk] = rig;
    ASSERT_TRUE(blk);
    const auto a = pattern(kSectorSize, 3), b = pattern(kSectorSize, 9);
    ASSERT_TRUE(blk->write(1, a).ok());
    dev.faults.needs_reset_on_notify = true;
    dev.set_status_hook([&](std::uint8_t st) {
      if (st == 0) dev.faults.needs_reset_on_notify = false;
    });
    auto w = blk->write(5, b);
    if (!automatic) {
      ASSERT_FALSE(w.ok());
      EXPECT_EQ(w.error().code(), Errc::needs_reset);
      auto dropped = blk->recover();
      ASSERT_TRUE(dropped.ok()) << dropped.error().message();
      EXPECT_EQ(*dropped, 1u);
      w = blk->write(5, b);
    }
    ASSERT_TRUE(w.ok()) << w.error().message();
    EXPECT_EQ(blk->recoveries(), 1u);
    EXPECT_TRUE(std::equal(b.begin(), b.end(), disk.bytes.begin() + 5 * kSectorSize));
    std::vector<std::uint8_t> back(kSectorSize);
    ASSERT_TRUE(blk->read(1, back).ok());
    EXPECT_EQ(back, a);
    EXPECT_EQ(dev.status() & (status::kDriverOk | status::kNeedsReset), status::kDriverOk);
    EXPECT_EQ(dev.violations(), kNone);
  }
}

// A request abandoned at its deadline still belongs to the device, with the
// header, status byte and bounce buffer it names: the next request must not
// rewrite them under the device (it would run the abandoned request with the
// new request's sector and data), and once the late completion is in, it
// must not be taken for the next request's.
TEST(Blk, ARequestAbandonedAtItsDeadlineKeepsItsBuffers) {
  FakeVirtioDevice dev{disk_options()};
  Disk disk;
  dev.set_handler(disk.handler());
  dev.start_worker(300ms);
  BlkOptions opt;
  opt.completion = CompletionMode::polling;
  opt.timeout = 30ms;
  auto d = bring_up(dev.take_function(), kVirtioBlkType, Blk::policy(opt));
  ASSERT_TRUE(d.ok()) << d.error().message();
  auto b = Blk::attach(std::move(d).value(), opt);
  ASSERT_TRUE(b.ok()) << b.error().message();
  Blk& blk = **b;

  const auto a = pattern(kSectorSize, 5), other = pattern(kSectorSize, 77);
  auto w = blk.write(1, a);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.error().code(), Errc::timeout) << w.error().message();
  // The device still owns the buffers: refused, nothing touched.
  auto busy = blk.write(5, other);
  ASSERT_FALSE(busy.ok());
  EXPECT_EQ(busy.error().code(), Errc::busy) << busy.error().message();
  EXPECT_NE(busy.error().message().find(blk.name()), std::string::npos) << busy.error().message();
  EXPECT_NE(busy.error().message().find("write"), std::string::npos) << busy.error().message();
  const auto until = std::chrono::steady_clock::now() + 5s;
  while (dev.completions() < 1 && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
  ASSERT_GE(dev.completions(), 1u);
  std::this_thread::sleep_for(10ms);
  EXPECT_EQ(dev.completions(), 1u);
  // The late write ran as submitted.
  EXPECT_TRUE(std::equal(a.begin(), a.end(), disk.bytes.begin() + 1 * kSectorSize));
  EXPECT_TRUE(std::all_of(disk.bytes.begin() + 5 * kSectorSize, disk.bytes.begin() + 6 * kSectorSize,
                          [](std::uint8_t x) { return x == 0; }));
  // Its completion is taken off, not mistaken for the next request's.
  dev.set_worker_delay(0us);
  std::vector<std::uint8_t> back(kSectorSize);
  auto r = blk.read(1, back);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(back, a);
  ASSERT_TRUE(blk.write(5, other).ok());
  EXPECT_TRUE(std::equal(other.begin(), other.end(), disk.bytes.begin() + 5 * kSectorSize));
  EXPECT_EQ(dev.violations(), kNone);
}

// A request the device dropped when it went DEVICE_NEEDS_RESET stays in
// flight until recover(): the next request says the device needs a reset
// (not that the buffers are busy), and with recover_on_reset it recovers.
TEST(Blk, ARequestDroppedAtNeedsResetIsReportedAsSuch) {
  Rig rig;
  auto& [dev, disk, blk] = rig;
  ASSERT_TRUE(blk);
  dev.faults.needs_reset_on_notify = true;
  std::vector<std::uint8_t> buf(kSectorSize);
  for (int i = 0; i < 2; ++i) {
    auto r = blk->read(0, buf);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Errc::needs_reset) << r.error().message();
  }
  dev.faults.needs_reset_on_notify = false;
  auto dropped = blk->recover();
  ASSERT_TRUE(dropped.ok()) << dropped.error().message();
  EXPECT_EQ(*dropped, 1u);
  EXPECT_TRUE(blk->read(0, buf).ok());
}

// The queue's wait() with a timeout of milliseconds::max(): the deadline
// saturates instead of overflowing steady_clock.
TEST(Blk, ATimeoutOfForeverWaitsForTheAnswer) {
  FakeVirtioDevice dev{disk_options()};
  Disk disk;
  dev.set_handler(disk.handler());
  dev.start_worker(20ms);
  BlkOptions opt;
  opt.completion = CompletionMode::interrupt;
  opt.timeout = std::chrono::milliseconds::max();
  auto d = bring_up(dev.take_function(), kVirtioBlkType, Blk::policy(opt));
  ASSERT_TRUE(d.ok()) << d.error().message();
  auto b = Blk::attach(std::move(d).value(), opt);
  ASSERT_TRUE(b.ok()) << b.error().message();
  const auto a = pattern(kSectorSize, 21);
  auto w = (*b)->write(4, a);
  ASSERT_TRUE(w.ok()) << w.error().message();
  EXPECT_TRUE(std::equal(a.begin(), a.end(), disk.bytes.begin() + 4 * kSectorSize));
}

// VIRTIO_BLK_F_SIZE_MAX accepted: no data descriptor is longer than the
// device's size_max (5.2.3), so a transfer goes in pieces of that size.
TEST(Blk, SegmentsStayWithinSizeMax) {
  FakeVirtioOptions o = disk_options();
  o.features |= 1ull << blk_feature::kSizeMax;
  o.device_config[8] = 0x00;  // size_max = 0x1000, le32 at offset 8
  o.device_config[9] = 0x10;
  FakeVirtioDevice dev{o};
  Disk disk;
  dev.set_handler(disk.handler());
  auto blk = attach(dev, false);
  ASSERT_TRUE(blk);
  EXPECT_TRUE(blk->features().has(blk_feature::kSizeMax));
  const auto a = pattern(16 * kSectorSize, 11);
  ASSERT_TRUE(blk->write(2, a).ok());
  std::vector<std::uint8_t> back(a.size());
  ASSERT_TRUE(blk->read(2, back).ok());
  EXPECT_EQ(back, a);
  EXPECT_TRUE(std::equal(a.begin(), a.end(), disk.bytes.begin() + 2 * kSectorSize));
  EXPECT_LE(disk.max_data_segment, 0x1000u);
  EXPECT_EQ(dev.violations(), kNone);
}

// A size_max below one sector leaves no request the driver could send.
TEST(Blk, SizeMaxBelowASectorIsRefused) {
  FakeVirtioOptions o = disk_options();
  o.features |= 1ull << blk_feature::kSizeMax;
  o.device_config[8] = 0xff;  // size_max = 255
  FakeVirtioDevice dev{o};
  BlkOptions opt;
  opt.completion = CompletionMode::polling;
  auto d = bring_up(dev.take_function(), kVirtioBlkType, Blk::policy(opt));
  ASSERT_TRUE(d.ok()) << d.error().message();
  auto b = Blk::attach(std::move(d).value(), opt);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.error().code(), Errc::bad_device_data);
  EXPECT_NE(b.error().message().find("size_max"), std::string::npos) << b.error().message();
  EXPECT_NE(b.error().message().find(dev.bdf()), std::string::npos) << b.error().message();
}

// VIRTIO_BLK_F_BLK_SIZE with a 4 KiB logical block (le32 blk_size at offset
// 20, 5.2.4): the driver reads it, and a read or write whose offset or length
// is not whole blocks is refused before the device sees it (QEMU answers it
// with VIRTIO_BLK_S_IOERR). Requests cut at size_max stay whole blocks.
TEST(Blk, ReadsAndWritesAreWholeLogicalBlocks) {
  FakeVirtioOptions o = disk_options();
  o.features |= (1ull << blk_feature::kBlkSize) | (1ull << blk_feature::kSizeMax);
  o.device_config[8] = 0x00;  // size_max = 0x1800: one and a half blocks
  o.device_config[9] = 0x18;
  o.device_config[20] = 0x00;  // blk_size = 4096
  o.device_config[21] = 0x10;
  FakeVirtioDevice dev{o};
  Disk disk;
  disk.block = 4096;
  dev.set_handler(disk.handler());
  auto blk = attach(dev, false);
  ASSERT_TRUE(blk);
  EXPECT_TRUE(blk->features().has(blk_feature::kBlkSize));
  EXPECT_EQ(blk->block_size(), 4096u);
  std::vector<std::uint8_t> one(kSectorSize), block(4096);
  for (auto r : {blk->read(0, one), blk->write(0, one), blk->read(1, block), blk->write(9, block)}) {
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Errc::invalid_argument) << r.error().message();
    EXPECT_NE(r.error().message().find(dev.bdf()), std::string::npos) << r.error().message();
    EXPECT_NE(r.error().message().find("4096"), std::string::npos) << r.error().message();
  }
  EXPECT_EQ(disk.requests, 0u);
  const auto a = pattern(3 * 4096, 5);
  ASSERT_TRUE(blk->write(8, a).ok());
  std::vector<std::uint8_t> back(a.size());
  ASSERT_TRUE(blk->read(8, back).ok());
  EXPECT_EQ(back, a);
  EXPECT_TRUE(std::equal(a.begin(), a.end(), disk.bytes.begin() + 8 * kSectorSize));
  EXPECT_EQ(disk.max_data_segment, 4096u);
  EXPECT_EQ(dev.violations(), kNone);
}

// A blk_size that is no power of two in 512..64 KiB, or a size_max below one
// block, is bad device data naming the device.
TEST(Blk, BadBlkSizeIsRefused) {
  const std::pair<std::uint32_t, std::uint32_t> cases[] = {{0, 0},          {256, 0},         {768, 0},
                                                           {128 * 1024, 0}, {0x80000000u, 0}, {4096, 2048}};
  for (const auto& [blk_size, size_max] : cases) {
    SCOPED_TRACE("blk_size " + std::to_string(blk_size) + " size_max " + std::to_string(size_max));
    FakeVirtioOptions o = disk_options();
    o.features |= 1ull << blk_feature::kBlkSize;
    if (size_max != 0) o.features |= 1ull << blk_feature::kSizeMax;
    for (int i = 0; i < 4; ++i) {
      o.device_config[static_cast<std::size_t>(20 + i)] = static_cast<std::uint8_t>(blk_size >> (8 * i));
      o.device_config[static_cast<std::size_t>(8 + i)] = static_cast<std::uint8_t>(size_max >> (8 * i));
    }
    FakeVirtioDevice dev{o};
    BlkOptions opt;
    opt.completion = CompletionMode::polling;
    auto d = bring_up(dev.take_function(), kVirtioBlkType, Blk::policy(opt));
    ASSERT_TRUE(d.ok()) << d.error().message();
    auto b = Blk::attach(std::move(d).value(), opt);
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.error().code(), Errc::bad_device_data);
    EXPECT_NE(b.error().message().find(size_max != 0 ? "size_max" : "blk_size"), std::string::npos)
        << b.error().message();
    EXPECT_NE(b.error().message().find(dev.bdf()), std::string::npos) << b.error().message();
  }
}

// ------------------------------------------------------------------ ring features

// Every combination of the ring features the driver accepts (the fake serves
// each: its own split walk, or the rings library's packed device role), by
// polling and by interrupt, with the device answering inside the notify or
// from its own thread. A ring of 8 entries, so 64 requests wrap the split
// indices and flip the packed wrap counters many times; every sector read
// back must be what was written, and the disk must hold it.
struct RingCase {
  unsigned bits;  // 1 packed, 2 event_idx, 4 indirect, 8 in_order, 16 interrupt, 32 device thread
  bool has(unsigned b) const { return (bits & b) != 0; }
};
class BlkRingFeatures : public ::testing::TestWithParam<unsigned> {};

TEST_P(BlkRingFeatures, WriteReadFlushAroundASmallRing) {
  const RingCase c{GetParam()};
  FakeVirtioOptions o = disk_options();
  o.queue_max_size = 8;
  const std::pair<unsigned, unsigned> offer[] = {{1, feature::kRingPacked},
                                                 {2, feature::kEventIdx},
                                                 {4, feature::kIndirectDesc},
                                                 {8, feature::kInOrder}};
  for (const auto& [b, f] : offer)
    if (c.has(b)) o.features |= 1ull << f;
  FakeVirtioDevice dev(o);
  Disk disk;
  dev.set_handler(disk.handler());
  if (c.has(32)) dev.start_worker();
  auto blk = attach(dev, false, c.has(16) ? CompletionMode::interrupt : CompletionMode::polling);
  ASSERT_TRUE(blk);
  for (const auto& [b, f] : offer)
    EXPECT_EQ(FeatureSet(dev.driver_features()).has(f), c.has(b)) << "feature " << f;
  Virtqueue& vq = blk->queue();
  EXPECT_EQ(vq.size(), 8);
  EXPECT_EQ(vq.packed(), c.has(1));
  EXPECT_EQ(vq.event_idx(), c.has(2));
  EXPECT_EQ(vq.indirect(), c.has(4));
  EXPECT_EQ(vq.ring().in_order(), c.has(8));

  std::vector<std::uint8_t> model(kSectors * kSectorSize, 0);
  for (unsigned i = 0; i < 64; ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    const std::uint64_t sector = (i * 7) % (kSectors - 3);
    const auto data = pattern((1 + i % 3) * kSectorSize, static_cast<std::uint8_t>(i));
    ASSERT_TRUE(blk->write(sector, data).ok());
    std::copy(data.begin(), data.end(), model.begin() + static_cast<std::ptrdiff_t>(sector * kSectorSize));
    std::vector<std::uint8_t> back(data.size());
    auto r = blk->read(sector, back);
    ASSERT_TRUE(r.ok()) << r.error().message();
    ASSERT_EQ(back, data);
    if (i % 8 == 7) {
      ASSERT_TRUE(blk->flush().ok());
    }
  }
  EXPECT_EQ(disk.bytes, model);
  EXPECT_EQ(disk.requests, 64u * 2 + 8);
  if (c.has(16)) {
    EXPECT_GT(vq.interrupts(), 0u);
  }
  EXPECT_EQ(dev.violations(), kNone);
}

std::string ring_case_name(const ::testing::TestParamInfo<unsigned>& info) {
  const RingCase c{info.param};
  std::string n = c.has(1) ? "Packed" : "Split";
  if (c.has(2)) n += "EventIdx";
  if (c.has(4)) n += "Indirect";
  if (c.has(8)) n += "InOrder";
  n += c.has(16) ? "Interrupt" : "Polling";
  if (c.has(32)) n += "DeviceThread";
  return n;
}
INSTANTIATE_TEST_SUITE_P(AllCombinations, BlkRingFeatures, ::testing::Range(0u, 64u), ring_case_name);

}  // namespace
}  // namespace uvirtio::driver
