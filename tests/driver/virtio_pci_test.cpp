// Unit tests for the virtio-pci modern transport (virtio spec 1.2, 4.1) and
// bring_up() (3.1.1), run against FakeVirtioDevice: a software device with
// QEMU's layout behind a FakeFunction. Each misbehaviour of the device must
// give its exact Errc and a message that names the device.
#include "uvirtio/driver/virtio_pci.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "support/fake_virtio.hpp"
#include "uvirtio/driver/device.hpp"
#include "uvirtio/driver/virtqueue.hpp"

namespace uvirtio::driver {
namespace {

using test::FakeVirtioDevice;
using test::FakeVirtioOptions;
using namespace std::chrono_literals;

constexpr const char* kBdf = "0000:00:04.0";
constexpr std::uint64_t kV1 = 1ull << feature::kVersion1;
const std::vector<std::string> kNone;  // no driver protocol violations

// Asserts an error with `code` whose message names the device and contains `needle`.
template <class T>
void expect_error(const Result<T>& r, Errc code, std::string_view needle) {
  ASSERT_FALSE(r.ok()) << "expected " << errc_name(code);
  EXPECT_EQ(r.error().code(), code) << r.error().message();
  EXPECT_EQ(r.error().device(), kBdf) << r.error().message();
  EXPECT_NE(r.error().message().find(kBdf), std::string::npos) << r.error().message();
  EXPECT_NE(r.error().message().find(needle), std::string::npos)
      << "'" << needle << "' not in: " << r.error().message();
}

bool readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1;
}

std::unique_ptr<VirtioPci> open(FakeVirtioDevice& dev, IrqPreference irq = IrqPreference::msix_then_intx) {
  auto t = VirtioPci::create(dev.function(), irq);
  EXPECT_TRUE(t.ok()) << t.error().message();
  return t.ok() ? std::move(t).value() : nullptr;
}

// Ring memory for queue setup; the device only looks at it on a notify.
QueueAddresses rings(FakeVirtioDevice& dev) {
  auto r = dev.function().dma().alloc(4096, 4096);
  EXPECT_TRUE(r.ok());
  return {r->iova, r->iova + 2048, r->iova + 3072};
}

FakeVirtioOptions with_msix(unsigned vectors, std::uint16_t queues = 1) {
  FakeVirtioOptions o;
  o.msix_vectors = vectors;
  o.num_queues = queues;
  return o;
}

// ------------------------------------------------------------------ create

TEST(VirtioPciCreate, FindsQemuLayout) {
  FakeVirtioOptions o = with_msix(3);
  o.device_config = std::vector<std::uint8_t>(8, 0);
  FakeVirtioDevice dev(o);
  auto t = open(dev);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->name(), kBdf);
  EXPECT_EQ(t->device_type(), 4);
  const pci::Capabilities& c = t->capabilities();
  EXPECT_TRUE(c.warnings.empty());
  ASSERT_TRUE(c.common && c.isr && c.device && c.notify && c.msix);
  EXPECT_EQ(c.common->bar, 4);
  EXPECT_EQ(c.common->offset, 0x0000u);
  EXPECT_EQ(c.isr->offset, 0x1000u);
  EXPECT_EQ(c.device->offset, 0x2000u);
  EXPECT_EQ(c.device->length, 8u);
  EXPECT_EQ(c.notify->offset, 0x3000u);
  EXPECT_EQ(c.notify->length, 0x1000u);
  EXPECT_EQ(c.notify_off_multiplier, 4u);
  EXPECT_EQ(c.msix->table_size, 3);
  EXPECT_EQ(c.msix->table_bar, 1);
  EXPECT_FALSE(t->using_msix());  // interrupts are set up with the first interrupt-driven queue
  EXPECT_EQ(dev.violations(), kNone);
}

TEST(VirtioPciCreate, TransitionalDeviceTypeComesFromSubsystemId) {
  FakeVirtioOptions o;
  o.pci_device_id = 0x1005;  // transitional entropy device
  FakeVirtioDevice dev(o);
  auto t = open(dev);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->device_type(), 4);
}

TEST(VirtioPciCreate, RefusesNonVirtioFunction) {
  FakeVirtioDevice dev;
  dev.function().set_ids(0x8086, 0x10d3);
  expect_error(VirtioPci::create(dev.function()), Errc::invalid_argument, "not a virtio function");
  dev.function().set_ids(0x1af4, 0x1080);  // outside the virtio device id range
  expect_error(VirtioPci::create(dev.function()), Errc::invalid_argument, "not a virtio function");
}

TEST(VirtioPciCreate, AllOnesConfigIsAGoneDevice) {
  FakeVirtioDevice dev;
  dev.function().set_ids(0xffff, 0xffff);
  expect_error(VirtioPci::create(dev.function()), Errc::not_found, "all-ones");
}

TEST(VirtioPciCreate, RefusesLegacyOnlyDevice) {
  FakeVirtioOptions o;
  o.modern_caps = false;
  FakeVirtioDevice dev(o);
  expect_error(VirtioPci::create(dev.function()), Errc::unsupported, "legacy");
}

// ------------------------------------------------------------------ reset, status, features

TEST(VirtioPci, ResetClearsStatus) {
  FakeVirtioDevice dev;
  auto t = open(dev);
  ASSERT_TRUE(t->add_status(status::kAcknowledge | status::kDriver).ok());
  ASSERT_EQ(dev.status(), 3);
  ASSERT_TRUE(t->reset(100ms).ok());
  EXPECT_EQ(dev.status(), 0);
  EXPECT_EQ(*t->status(), 0);
  EXPECT_EQ(dev.status_writes().back(), 0);
}

TEST(VirtioPci, ResetDeadline) {
  FakeVirtioDevice dev;
  auto t = open(dev);
  ASSERT_TRUE(t->add_status(status::kAcknowledge).ok());
  dev.faults.reset_stuck = true;
  const auto start = std::chrono::steady_clock::now();
  auto r = t->reset(30ms);
  const auto took = std::chrono::steady_clock::now() - start;
  expect_error(r, Errc::timeout, "reset device");
  EXPECT_NE(r.error().cause().find("30 ms"), std::string::npos) << r.error().cause();
  EXPECT_GE(took, 30ms);
  EXPECT_LT(took, 2s);
}

// A deadline too long to add to the clock (milliseconds::max() as "no
// deadline", OpenOptions::reset_deadline is user input) must not overflow:
// converting it to the clock's nanoseconds is undefined behaviour, and the
// wrapped deadline could lie in the past.
TEST(VirtioPci, ResetWithAHugeDeadline) {
  FakeVirtioDevice dev;
  auto t = open(dev);
  ASSERT_TRUE(t->add_status(status::kAcknowledge).ok());
  ASSERT_TRUE(t->reset(std::chrono::milliseconds::max()).ok());
  EXPECT_EQ(dev.status(), 0);
  dev.faults.reset_stuck = true;
  ASSERT_TRUE(t->add_status(status::kAcknowledge).ok());
  auto r = t->reset(std::chrono::milliseconds(-5));  // negative: one look, then the timeout
  expect_error(r, Errc::timeout, "reset device");
}

TEST(VirtioPci, StatusAndFeatureRoundTrip) {
  FakeVirtioOptions o;
  o.features = kV1 | (1ull << feature::kAccessPlatform) | (1ull << 0) | (1ull << 31) | (1ull << 63);
  FakeVirtioDevice dev(o);
  auto t = open(dev);
  ASSERT_TRUE(t->add_status(status::kAcknowledge).ok());
  ASSERT_TRUE(t->add_status(status::kDriver).ok());
  EXPECT_EQ(*t->status(), status::kAcknowledge | status::kDriver);
  auto offered = t->device_features();
  ASSERT_TRUE(offered.ok());
  EXPECT_EQ(offered->bits(), o.features);  // both 32-bit words

  const FeatureSet accept(kV1 | (1ull << feature::kAccessPlatform) | (1ull << 31));
  ASSERT_TRUE(t->accept_features(accept).ok());
  EXPECT_EQ(dev.driver_features(), accept.bits());
  EXPECT_EQ(t->features(), accept);
  EXPECT_EQ(*t->status(), status::kAcknowledge | status::kDriver | status::kFeaturesOk);
  EXPECT_EQ(dev.violations(), kNone);
}

TEST(VirtioPci, FeaturesOkReadBackFailure) {
  FakeVirtioDevice dev;
  auto t = open(dev);
  ASSERT_TRUE(t->add_status(status::kAcknowledge | status::kDriver).ok());
  dev.faults.refuse_features_ok = true;
  expect_error(t->accept_features(FeatureSet(kV1)), Errc::unsupported, "FEATURES_OK");
  EXPECT_EQ(t->features(), FeatureSet());
  EXPECT_EQ(dev.status() & status::kFeaturesOk, 0);
}

TEST(VirtioPci, FeaturesOkRefusedForUnofferedBit) {
  FakeVirtioDevice dev;  // offers VERSION_1 only
  auto t = open(dev);
  auto r = t->accept_features(FeatureSet(kV1 | 1ull << 5));
  expect_error(r, Errc::unsupported, "FEATURES_OK");
  EXPECT_NE(r.error().cause().find("bit5"), std::string::npos) << r.error().cause();
}

// A device that is gone (surprise removal) reads all-ones: its device_status
// of 0xff has FEATURES_OK set, but must not be taken for an accepted
// feature set, written back with another bit, or waited on in a reset.
TEST(VirtioPci, GoneDeviceStatusIsAnError) {
  FakeVirtioDevice dev;
  auto t = open(dev);
  ASSERT_TRUE(t->add_status(status::kAcknowledge | status::kDriver).ok());
  dev.faults.gone = true;
  ASSERT_EQ(*t->status(), 0xff);
  expect_error(t->accept_features(FeatureSet(kV1)), Errc::not_found, "the device is gone");
  EXPECT_EQ(t->features(), FeatureSet());
  expect_error(t->add_status(status::kDriverOk), Errc::not_found, "the device is gone");
  const auto start = std::chrono::steady_clock::now();
  expect_error(t->reset(2000ms), Errc::not_found, "the device is gone");
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s) << "a gone device is not waited for";
  expect_error(t->check_healthy("probe"), Errc::not_found, "the device is gone");
  dev.faults.gone = false;
  EXPECT_EQ(dev.status(), status::kAcknowledge | status::kDriver);
}

// ------------------------------------------------------------------ device config

FakeVirtioOptions with_config() {
  FakeVirtioOptions o;
  for (std::uint8_t i = 0; i < 12; ++i) o.device_config.push_back(static_cast<std::uint8_t>(0xa0 + i));
  return o;
}

TEST(VirtioPciConfig, StableRead) {
  FakeVirtioDevice dev(with_config());
  auto t = open(dev);
  std::vector<std::uint8_t> all(12);
  ASSERT_TRUE(t->read_device_config(0, all).ok());
  for (std::size_t i = 0; i < all.size(); ++i) EXPECT_EQ(all[i], 0xa0 + i);
  std::vector<std::uint8_t> part(7);  // unaligned start: 1-, 2- and 4-byte reads
  ASSERT_TRUE(t->read_device_config(1, part).ok());
  for (std::size_t i = 0; i < part.size(); ++i) EXPECT_EQ(part[i], 0xa1 + i);

  const std::uint8_t fresh[2] = {0x11, 0x22};
  dev.set_device_config(4, fresh);  // bumps config_generation
  std::vector<std::uint8_t> two(2);
  ASSERT_TRUE(t->read_device_config(4, two).ok());
  EXPECT_EQ(two, (std::vector<std::uint8_t>{0x11, 0x22}));
  EXPECT_EQ(dev.violations(), kNone);
}

TEST(VirtioPciConfig, GenerationNeverSettles) {
  FakeVirtioDevice dev(with_config());
  auto t = open(dev);
  dev.faults.unstable_generation = true;
  std::vector<std::uint8_t> out(4);
  expect_error(t->read_device_config(0, out), Errc::bad_device_data, "config_generation");
}

TEST(VirtioPciConfig, Bounds) {
  FakeVirtioDevice dev(with_config());
  auto t = open(dev);
  std::vector<std::uint8_t> four(4), none;
  EXPECT_TRUE(t->read_device_config(8, four).ok());   // exactly at the end
  EXPECT_TRUE(t->read_device_config(12, none).ok());  // empty read at the end
  expect_error(t->read_device_config(9, four), Errc::invalid_argument, "outside the 12-byte device config");
  expect_error(t->read_device_config(13, none), Errc::invalid_argument, "device config");
  expect_error(t->read_device_config(0xffffffffu, four), Errc::invalid_argument, "device config");
  expect_error(t->write_device_config(10, four), Errc::invalid_argument, "device config");

  const std::uint8_t bytes[2] = {1, 2};
  ASSERT_TRUE(t->write_device_config(10, bytes).ok());
  std::vector<std::uint8_t> back(2);
  ASSERT_TRUE(t->read_device_config(10, back).ok());
  EXPECT_EQ(back, (std::vector<std::uint8_t>{1, 2}));
}

// Spec 4.1.3.1: the driver writes each field with its natural width. A
// device acting on a config write (as QEMU calls set_config per access)
// must not see a 32-bit field torn into four byte writes.
TEST(VirtioPciConfig, WritesUseTheFieldWidth) {
  FakeVirtioDevice dev(with_config());
  auto t = open(dev);
  std::vector<std::pair<std::uint32_t, unsigned>> writes;
  dev.set_config_write_hook([&](std::uint32_t off, unsigned w) { writes.emplace_back(off, w); });
  const std::uint8_t le32[4] = {1, 2, 3, 4};
  ASSERT_TRUE(t->write_device_config(4, le32).ok());
  EXPECT_EQ(writes, (std::vector<std::pair<std::uint32_t, unsigned>>{{4, 4}}));
  writes.clear();
  const std::uint8_t three[3] = {5, 6, 7};
  ASSERT_TRUE(t->write_device_config(8, three, 1).ok());  // three u8 fields
  EXPECT_EQ(writes, (std::vector<std::pair<std::uint32_t, unsigned>>{{8, 1}, {9, 1}, {10, 1}}));
  writes.clear();
  ASSERT_TRUE(t->write_device_config(0, std::span(le32, 4), 2).ok());  // two u16 fields
  EXPECT_EQ(writes, (std::vector<std::pair<std::uint32_t, unsigned>>{{0, 2}, {2, 2}}));
  EXPECT_EQ(dev.device_config(), (std::vector<std::uint8_t>{1, 2, 3, 4, 1, 2, 3, 4, 5, 6, 7, 0xab}));
  EXPECT_EQ(dev.violations(), kNone);
}

TEST(VirtioPciConfig, NoDeviceConfigStructure) {
  FakeVirtioDevice dev;  // the entropy device has no config
  auto t = open(dev);
  std::vector<std::uint8_t> out(1);
  expect_error(t->read_device_config(0, out), Errc::unsupported, "no device-specific config");
  expect_error(t->write_device_config(0, out), Errc::unsupported, "no device-specific config");
}

// ------------------------------------------------------------------ queues

TEST(VirtioPciQueue, SizeChecks) {
  FakeVirtioDevice dev;  // one queue, max size 256
  auto t = open(dev);
  EXPECT_EQ(*t->num_queues(), 1);
  EXPECT_EQ(*t->queue_max_size(0), 256);
  const QueueAddresses a = rings(dev);
  expect_error(t->setup_queue(0, 0, a, false), Errc::invalid_argument, "power of two <= 256");
  expect_error(t->setup_queue(0, 48, a, false), Errc::invalid_argument, "size 48");
  expect_error(t->setup_queue(0, 512, a, false), Errc::invalid_argument, "size 512");
  expect_error(t->setup_queue(1, 16, a, false), Errc::invalid_argument, "queue 1 does not exist");
  EXPECT_FALSE(dev.queue_enabled(0));
  ASSERT_TRUE(t->setup_queue(0, 256, a, false).ok());
  EXPECT_TRUE(dev.queue_enabled(0));
  EXPECT_EQ(dev.queue_size(0), 256);
  EXPECT_EQ(dev.violations(), kNone);
}

TEST(VirtioPciQueue, UnavailableQueue) {
  FakeVirtioOptions o;
  o.queue_max_size = 0;
  FakeVirtioDevice dev(o);
  auto t = open(dev);
  expect_error(t->setup_queue(0, 16, rings(dev), false), Errc::unsupported, "size 0");
}

TEST(VirtioPciQueue, NotifyOffsetOutOfBounds) {
  FakeVirtioDevice dev;
  auto t = open(dev);
  // 0x400 * 4 = 0x1000: the 2-byte write would start at the end of the 0x1000-byte region.
  dev.set_queue_notify_off(0, 0x400);
  expect_error(t->setup_queue(0, 16, rings(dev), false), Errc::bad_device_data, "queue_notify_off 1024");
  EXPECT_FALSE(dev.queue_enabled(0));
  expect_error(t->notify(0), Errc::invalid_argument, "not set up");
  EXPECT_EQ(dev.function().soft_bar(4)->writes_in(FakeVirtioDevice::kNotify, FakeVirtioDevice::kRegionSize),
            0u);
  EXPECT_EQ(dev.notifies(), 0u);
}

TEST(VirtioPciQueue, NotifyAtTheLastSlot) {
  FakeVirtioDevice dev;
  auto t = open(dev);
  dev.set_queue_notify_off(0, 0x3ff);  // last 4-byte slot of the notify region
  ASSERT_TRUE(t->setup_queue(0, 16, rings(dev), false).ok());
  ASSERT_TRUE(t->notify(0).ok());
  EXPECT_EQ(dev.function().soft_bar(4)->writes_in(FakeVirtioDevice::kNotify + 0xffc, 2), 1u);
  EXPECT_EQ(dev.notifies(), 1u);
}

// NOTIFICATION_DATA changes the notify write to 32 bits carrying the next
// available index (spec 4.1.5.2); the transport does not implement it, so it
// refuses the bit rather than notify with the wrong width.
TEST(VirtioPciQueue, NotificationDataIsRefused) {
  FakeVirtioOptions o;
  o.features = kV1 | (1ull << feature::kNotificationData);
  FakeVirtioDevice dev(o);
  auto t = open(dev);
  ASSERT_TRUE(t->add_status(status::kAcknowledge | status::kDriver).ok());
  auto r = t->accept_features(FeatureSet(o.features));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_NE(r.error().message().find("NOTIFICATION_DATA"), std::string::npos) << r.error().message();
  EXPECT_TRUE(t->accept_features(FeatureSet(kV1)).ok());
}

// NOTIF_CONFIG_DATA (spec 4.1.4.4, 4.1.5.2) makes the driver write the
// queue's queue_notify_data instead of its index on every notify; notify()
// writes the index, so the transport must refuse the bit as it refuses
// NOTIFICATION_DATA, not accept it and then notify with the wrong value.
TEST(VirtioPciQueue, NotifConfigDataIsRefused) {
  FakeVirtioOptions o;
  o.features = kV1 | (1ull << feature::kNotifConfigData);
  FakeVirtioDevice dev(o);
  auto t = open(dev);
  ASSERT_TRUE(t->add_status(status::kAcknowledge | status::kDriver).ok());
  auto r = t->accept_features(FeatureSet(o.features));
  expect_error(r, Errc::unsupported, "NOTIF_CONFIG_DATA");
  EXPECT_EQ(dev.status() & status::kFeaturesOk, 0) << "FEATURES_OK set for a feature notify() ignores";
  EXPECT_TRUE(t->accept_features(FeatureSet(kV1)).ok());
}

TEST(VirtioPciQueue, NotifySlotMustHoldTheWholeWrite) {
  FakeVirtioOptions o;
  o.notify_multiplier = 2;
  FakeVirtioDevice dev(o);
  auto t = open(dev);
  dev.set_queue_notify_off(0, 0x800);  // 0x1000: no room for the 2-byte write
  expect_error(t->setup_queue(0, 16, rings(dev), false), Errc::bad_device_data,
               "queue_notify_off 2048 x multiplier 2 lies outside the 4096-byte notify structure");
  dev.set_queue_notify_off(0, 0x7ff);  // 0xffe: the last 2 bytes
  ASSERT_TRUE(t->setup_queue(0, 16, rings(dev), false).ok());
  ASSERT_TRUE(t->notify(0).ok());
  EXPECT_EQ(dev.function().soft_bar(4)->writes_in(FakeVirtioDevice::kNotify + 0xffe, 2), 1u);
}

// ------------------------------------------------------------------ interrupts

TEST(VirtioPciIrq, MsixVectorsProgrammed) {
  FakeVirtioDevice dev(with_msix(3, 2));
  auto t = open(dev);
  ASSERT_TRUE(t->setup_queue(0, 16, rings(dev), true).ok());
  ASSERT_TRUE(t->setup_queue(1, 16, rings(dev), true).ok());
  EXPECT_TRUE(t->using_msix());
  EXPECT_EQ(dev.function().irq_kind(), pci::IrqKind::msix);
  EXPECT_EQ(dev.function().enabled_vectors(), 3u);
  EXPECT_EQ(dev.config_vector(), 0);
  EXPECT_EQ(dev.queue_vector(0), 1);
  EXPECT_EQ(dev.queue_vector(1), 2);
  auto fd0 = t->queue_eventfd(0), fd1 = t->queue_eventfd(1);
  ASSERT_TRUE(fd0 && fd1);
  EXPECT_NE(*fd0, *fd1);
  ASSERT_TRUE(dev.function().raise(2));
  EXPECT_TRUE(readable(*fd1));
  EXPECT_FALSE(readable(*fd0));
  // MSI-X needs no acknowledgement: no ISR read, no unmask.
  ASSERT_TRUE(t->ack_interrupt(1).ok());
  EXPECT_EQ(dev.isr_reads(), 0u);
  EXPECT_EQ(dev.function().unmask_count(), 0u);
  EXPECT_EQ(dev.violations(), kNone);
}

TEST(VirtioPciIrq, FewerVectorsThanQueuesShareTheLast) {
  FakeVirtioDevice dev(with_msix(2, 3));
  auto t = open(dev);
  for (std::uint16_t q = 0; q < 3; ++q) ASSERT_TRUE(t->setup_queue(q, 16, rings(dev), true).ok());
  EXPECT_EQ(dev.function().enabled_vectors(), 2u);
  EXPECT_EQ(dev.queue_vector(0), 1);
  EXPECT_EQ(dev.queue_vector(2), 1);
  EXPECT_EQ(t->queue_eventfd(0), t->queue_eventfd(2));
}

TEST(VirtioPciIrq, PollingQueueGetsNoVector) {
  FakeVirtioDevice dev(with_msix(3, 2));
  auto t = open(dev);
  ASSERT_TRUE(t->setup_queue(0, 16, rings(dev), true).ok());
  ASSERT_TRUE(t->setup_queue(1, 16, rings(dev), false).ok());
  EXPECT_EQ(dev.queue_vector(1), FakeVirtioDevice::kNoVector);
  EXPECT_FALSE(t->queue_eventfd(1));
  EXPECT_TRUE(t->queue_eventfd(0));
}

TEST(VirtioPciIrq, RefusedQueueVector) {
  FakeVirtioDevice dev(with_msix(3));
  dev.refuse_vector(1);
  auto t = open(dev);
  expect_error(t->setup_queue(0, 16, rings(dev), true), Errc::unsupported, "refused MSI-X vector 1");
  EXPECT_FALSE(dev.queue_enabled(0));
}

TEST(VirtioPciIrq, RefusedConfigVector) {
  FakeVirtioDevice dev(with_msix(3));
  dev.refuse_vector(0);
  auto t = open(dev);
  expect_error(t->setup_queue(0, 16, rings(dev), true), Errc::unsupported, "refused vector 0");
  EXPECT_FALSE(dev.queue_enabled(0));
}

// Spec 4.1.5.1.2: reading the vector back gives the vector written, or
// NO_VECTOR when the device could not map it; anything else is bad data.
TEST(VirtioPciIrq, ConfigVectorReadBackIsNeitherWrittenNorNoVector) {
  FakeVirtioDevice dev(with_msix(3));
  dev.answer_vector(0, 2);
  auto t = open(dev);
  expect_error(t->setup_queue(0, 16, rings(dev), true), Errc::bad_device_data,
               "vector 0 written, but the device reads back 2");
  EXPECT_FALSE(dev.queue_enabled(0));
  EXPECT_EQ(dev.function().enabled_vectors(), 0u);
  EXPECT_FALSE(t->using_msix());
}

TEST(VirtioPciIrq, QueueVectorReadBackIsNeitherWrittenNorNoVector) {
  FakeVirtioDevice dev(with_msix(3, 2));
  dev.answer_vector(1, 2);
  auto t = open(dev);
  expect_error(t->setup_queue(0, 16, rings(dev), true), Errc::bad_device_data,
               "MSI-X vector 1 written, but the device reads back 2");
  EXPECT_FALSE(dev.queue_enabled(0));
  // A polling queue's NO_VECTOR read back as a vector is just as bad.
  FakeVirtioDevice dev2(with_msix(3, 2));
  dev2.answer_vector(FakeVirtioDevice::kNoVector, 1);
  auto t2 = open(dev2);
  ASSERT_TRUE(t2->setup_queue(0, 16, rings(dev2), true).ok());
  expect_error(t2->setup_queue(1, 16, rings(dev2), false), Errc::bad_device_data,
               "MSI-X vector 65535 written, but the device reads back 1");
  EXPECT_FALSE(dev2.queue_enabled(1));
}

TEST(VirtioPciIrq, IntxWhenNoMsix) {
  FakeVirtioDevice dev;  // no MSI-X capability
  auto t = open(dev);
  ASSERT_TRUE(t->setup_queue(0, 16, rings(dev), true).ok());
  EXPECT_FALSE(t->using_msix());
  EXPECT_EQ(dev.function().irq_kind(), pci::IrqKind::intx);
  auto fd = t->queue_eventfd(0);
  ASSERT_TRUE(fd);
  ASSERT_TRUE(dev.function().raise(0));
  EXPECT_TRUE(readable(*fd));
  // ack_interrupt reads (and so clears) the ISR, then unmasks INTx.
  ASSERT_TRUE(t->ack_interrupt(0).ok());
  EXPECT_EQ(dev.isr_reads(), 1u);
  EXPECT_EQ(dev.function().unmask_count(), 1u);
}

TEST(VirtioPciIrq, IntxPreferenceIgnoresMsix) {
  FakeVirtioDevice dev(with_msix(3));
  auto t = open(dev, IrqPreference::intx);
  ASSERT_TRUE(t->setup_queue(0, 16, rings(dev), true).ok());
  EXPECT_FALSE(t->using_msix());
  EXPECT_EQ(dev.function().irq_kind(), pci::IrqKind::intx);
  EXPECT_EQ(dev.queue_vector(0), FakeVirtioDevice::kNoVector);
}

TEST(VirtioPciIrq, ResetDisablesInterrupts) {
  FakeVirtioDevice dev(with_msix(2));
  auto t = open(dev);
  ASSERT_TRUE(t->setup_queue(0, 16, rings(dev), true).ok());
  ASSERT_EQ(dev.function().enabled_vectors(), 2u);
  ASSERT_TRUE(t->reset(100ms).ok());
  EXPECT_EQ(dev.function().enabled_vectors(), 0u);
  EXPECT_FALSE(t->queue_eventfd(0));
  expect_error(t->notify(0), Errc::invalid_argument, "not set up");
}

// ------------------------------------------------------------------ health

TEST(VirtioPci, CheckHealthy) {
  FakeVirtioDevice dev;
  auto t = open(dev);
  EXPECT_TRUE(t->check_healthy("probe").ok());
  dev.set_needs_reset();
  auto r = t->check_healthy("read entropy");
  expect_error(r, Errc::needs_reset, "DEVICE_NEEDS_RESET");
  EXPECT_EQ(r.error().op(), "read entropy");
}

TEST(VirtioPci, CheckHealthyFailed) {
  FakeVirtioDevice dev;
  auto t = open(dev);
  ASSERT_TRUE(t->add_status(status::kFailed).ok());
  expect_error(t->check_healthy("probe"), Errc::broken, "FAILED");
}

// The fake translates every device address through its DMA allocator, as an
// IOMMU would: memory the driver did not get from dma() is a device-side DMA
// fault, which the device reports with DEVICE_NEEDS_RESET.
TEST(VirtioPci, RingOutsideDmaMemoryMakesTheDeviceNeedReset) {
  FakeVirtioDevice dev;
  auto t = open(dev);
  static std::uint8_t not_dma[4096];
  const auto va = reinterpret_cast<std::uintptr_t>(not_dma);
  ASSERT_TRUE(t->setup_queue(0, 16, {va, va + 2048, va + 3072}, false).ok());
  ASSERT_TRUE(t->add_status(status::kDriverOk).ok());
  ASSERT_TRUE(t->notify(0).ok());
  expect_error(t->check_healthy("probe"), Errc::needs_reset, "DEVICE_NEEDS_RESET");
  EXPECT_EQ(dev.violations(), std::vector<std::string>{"ring address outside DMA memory"});
}

TEST(Virtqueue, BufferOutsideDmaMemoryGivesNeedsReset) {
  for (CompletionMode mode : {CompletionMode::polling, CompletionMode::interrupt}) {
    SCOPED_TRACE(completion_mode_name(mode));
    FakeVirtioDevice dev(with_msix(2));
    auto t = open(dev);
    auto vq = Virtqueue::create(*t, 0, 8, mode);
    ASSERT_TRUE(vq.ok()) << vq.error().message();
    EXPECT_EQ((*vq)->size(), 8);
    ASSERT_TRUE(t->add_status(status::kDriverOk).ok());
    std::uint8_t stack[64];
    const rings::Buffer in{reinterpret_cast<std::uintptr_t>(stack), sizeof stack};
    ASSERT_TRUE((*vq)->submit({}, std::span(&in, 1), 7).ok());
    expect_error((*vq)->wait(50ms), Errc::needs_reset, "wait for queue 0");
    EXPECT_EQ(dev.violations(), std::vector<std::string>{"descriptor address outside DMA memory"});
  }
}

// A transport reset takes the queues' eventfds away until Virtqueue::restart()
// sets the queue up again: a wait in between is an error, not a poll() on
// whatever an empty optional holds.
TEST(Virtqueue, WaitAfterATransportResetSaysTheQueueIsNotSetUp) {
  for (CompletionMode mode : {CompletionMode::interrupt, CompletionMode::hybrid}) {
    SCOPED_TRACE(completion_mode_name(mode));
    FakeVirtioDevice dev(with_msix(2));
    auto t = open(dev);
    auto vq = Virtqueue::create(*t, 0, 8, mode);
    ASSERT_TRUE(vq.ok()) << vq.error().message();
    ASSERT_TRUE(t->reset(100ms).ok());
    ASSERT_FALSE(t->queue_eventfd(0));
    const auto start = std::chrono::steady_clock::now();
    auto r = (*vq)->wait(2000ms);
    expect_error(r, Errc::invalid_argument, "no interrupt eventfd");
    EXPECT_EQ(r.error().op(), "wait for queue 0 interrupt");
    EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
    // restart() sets the queue up again: waiting is a plain timeout then.
    ASSERT_TRUE((*vq)->restart().ok());
    expect_error((*vq)->wait(20ms), Errc::timeout, "no completion");
  }
}

// A completion the device wrote before the reset is still returned: only a
// wait that would sleep needs the eventfd.
TEST(Virtqueue, ACompletionFromBeforeATransportResetIsNotLost) {
  FakeVirtioDevice dev(with_msix(2));
  auto t = open(dev);
  auto vq = Virtqueue::create(*t, 0, 8, CompletionMode::interrupt);
  ASSERT_TRUE(vq.ok()) << vq.error().message();
  ASSERT_TRUE(t->add_status(status::kDriverOk).ok());
  auto buf = dev.function().dma().alloc(4096, 4096);
  ASSERT_TRUE(buf.ok());
  const rings::Buffer in{buf->iova, 16};
  ASSERT_TRUE((*vq)->submit({}, std::span(&in, 1), 7).ok());
  ASSERT_EQ(dev.completions(), 1u);
  ASSERT_TRUE(t->reset(100ms).ok());
  auto c = (*vq)->wait(1000ms);
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->token, 7u);
}

// An eventfd that can never become readable (closed, or replaced by a file
// that hung up) fails the wait at once instead of spinning to the deadline.
TEST(Virtqueue, ABrokenEventfdFailsTheWaitAtOnce) {
  FakeVirtioDevice dev(with_msix(2));
  auto t = open(dev);
  auto vq = Virtqueue::create(*t, 0, 8, CompletionMode::interrupt);
  ASSERT_TRUE(vq.ok()) << vq.error().message();
  const int fd = *t->queue_eventfd(0);

  ASSERT_EQ(::close(fd), 0);
  auto start = std::chrono::steady_clock::now();
  expect_error((*vq)->wait(2000ms), Errc::io, "eventfd " + std::to_string(fd) + " is not open (POLLNVAL)");
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
  // Give the number back to the function, which closes it at the end.
  const int fresh = ::eventfd(0, EFD_CLOEXEC);
  ASSERT_GE(fresh, 0);
  if (fresh != fd) {
    ASSERT_EQ(::dup3(fresh, fd, O_CLOEXEC), fd);
    ::close(fresh);
  }

  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  ASSERT_TRUE(dev.function().route_vector(1, pipe_fds[0]).ok());
  ::close(pipe_fds[0]);
  ::close(pipe_fds[1]);  // no writer: the read end hangs up
  start = std::chrono::steady_clock::now();
  expect_error((*vq)->wait(2000ms), Errc::io, "was hung up (POLLHUP)");
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
}

// A completion the device wrote before it went NEEDS_RESET is still the
// caller's: the interrupt drain after it sees the config interrupt and the
// reset, but must not drop the completion with an error (the request would
// be lost to its owner). The next call reports the reset.
TEST(Virtqueue, ACompletionBeforeNeedsResetIsReturnedThenTheResetIsReported) {
  FakeVirtioDevice dev(with_msix(2));
  dev.set_handler([](std::uint16_t, std::span<const Segment>) -> std::uint32_t { return 16; });
  auto t = open(dev);
  auto vq = Virtqueue::create(*t, 0, 8, CompletionMode::interrupt);
  ASSERT_TRUE(vq.ok()) << vq.error().message();
  ASSERT_TRUE(t->add_status(status::kDriverOk).ok());
  auto buf = dev.function().dma().alloc(4096, 4096);
  ASSERT_TRUE(buf.ok());
  const rings::Buffer in{buf->iova, 16};
  ASSERT_TRUE((*vq)->submit({}, std::span(&in, 1), 42).ok());
  dev.set_needs_reset();  // after the completion: both interrupts are pending
  auto c = (*vq)->wait(2000ms);
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->token, 42u);
  EXPECT_EQ(c->len, 16u);
  expect_error(t->check_healthy("next request"), Errc::needs_reset, "DEVICE_NEEDS_RESET");
}

// With a single MSI-X vector the config interrupt shares the queue's
// eventfd: a DEVICE_NEEDS_RESET it announces must reach the waiter at once,
// as it does with a vector of its own (and with INTx, through the ISR), not
// after the next one-second poll slice runs out.
TEST(Virtqueue, NeedsResetOnASharedMsixVectorEndsTheWaitAtOnce) {
  FakeVirtioDevice dev(with_msix(1));
  dev.faults.swallow = true;
  auto t = open(dev);
  auto vq = Virtqueue::create(*t, 0, 8, CompletionMode::interrupt);
  ASSERT_TRUE(vq.ok()) << vq.error().message();
  ASSERT_TRUE(t->using_msix());
  ASSERT_EQ(t->config_eventfd(), t->queue_eventfd(0));
  ASSERT_TRUE(t->add_status(status::kDriverOk).ok());
  auto buf = dev.function().dma().alloc(4096, 4096);
  ASSERT_TRUE(buf.ok());
  const rings::Buffer in{buf->iova, 16};
  ASSERT_TRUE((*vq)->submit({}, std::span(&in, 1), 42).ok());
  dev.set_needs_reset();
  const auto start = std::chrono::steady_clock::now();
  expect_error((*vq)->wait(5000ms), Errc::needs_reset, "DEVICE_NEEDS_RESET");
  EXPECT_LT(std::chrono::steady_clock::now() - start, 500ms);
}

// An owner of queue 0 with its ledger in `dir` submits n requests the device
// takes and never completes, then goes away; returns their ids, ascending.
std::vector<std::uint16_t> abandon_requests(const std::string& dir, unsigned n) {
  std::vector<std::uint16_t> ids;
  FakeVirtioDevice dev;
  dev.faults.swallow = true;
  auto t = open(dev);
  t->set_inflight_dir(dir);
  auto vq = Virtqueue::create(*t, 0, 8, CompletionMode::polling);
  EXPECT_TRUE(vq.ok()) << vq.error().message();
  if (!vq.ok()) return ids;
  EXPECT_NE((*vq)->ledger(), nullptr) << (*vq)->ledger_error();
  EXPECT_TRUE(t->add_status(status::kDriverOk).ok());
  auto buf = dev.function().dma().alloc(4096, 4096);
  EXPECT_TRUE(buf.ok());
  const rings::Buffer in{buf->iova, 16};
  for (std::uint64_t k = 0; k < n; ++k) {
    auto id = (*vq)->submit({}, std::span(&in, 1), k);
    EXPECT_TRUE(id.ok()) << id.error().message();
    if (id.ok()) ids.push_back(*id);
  }
  expect_error((*vq)->wait(20ms), Errc::timeout, "wait for queue 0");
  std::sort(ids.begin(), ids.end());
  return ids;
}

// The next owner of queue 0, on a device that completes every request, with
// its ledger in a directory of its own; buf is a 16-byte receive buffer.
struct NextOwner {
  NextOwner() {
    char tmpl[] = "/tmp/uvirtio-vq-ledger-XXXXXX";
    if (::mkdtemp(tmpl) != nullptr) dir = tmpl;
    dev.set_handler([](std::uint16_t, std::span<const Segment> chain) -> std::uint32_t {
      return chain.empty() ? 0 : chain.back().len;
    });
  }
  ~NextOwner() {
    if (!dir.empty()) std::filesystem::remove_all(dir);
  }
  // Lets an earlier owner abandon n requests (abandoned: their ids), then
  // opens the queue and starts the device.
  void take_over(unsigned n) {
    ASSERT_FALSE(dir.empty());
    abandoned = abandon_requests(dir, n);
    ASSERT_EQ(abandoned.size(), n);
    t = open(dev);
    t->set_inflight_dir(dir);
    auto q = Virtqueue::create(*t, 0, 8, CompletionMode::polling);
    ASSERT_TRUE(q.ok()) << q.error().message();
    vq = std::move(*q);
    ledger = vq->ledger();
    ASSERT_NE(ledger, nullptr) << vq->ledger_error();
    ASSERT_TRUE(t->add_status(status::kDriverOk).ok());
    auto b = dev.function().dma().alloc(4096, 4096);
    ASSERT_TRUE(b.ok());
    buf = rings::Buffer{b->iova, 16};
  }
  std::string dir;
  FakeVirtioDevice dev;
  std::unique_ptr<VirtioPci> t;
  std::unique_ptr<Virtqueue> vq;
  const InflightLedger* ledger = nullptr;
  rings::Buffer buf{};
  std::vector<std::uint16_t> abandoned;
};

// The in-flight ledger carries the ids an owner left in flight to the next
// owner of the queue (another process after a crash, or after a request
// abandoned at its deadline): the next owner hands them out last and drops
// one late completion of each, so a device that completes the old request
// after its reset never completes a new one with it.
TEST(Virtqueue, InflightLedgerHandsTheIdsAnEarlierOwnerLeftOutLast) {
  NextOwner o;
  ASSERT_NO_FATAL_FAILURE(o.take_over(7));
  const std::vector<std::uint16_t>& abandoned = o.abandoned;
  EXPECT_EQ(o.ledger->left_over(), abandoned);
  auto id = o.vq->submit({}, std::span(&o.buf, 1), 100);
  ASSERT_TRUE(id.ok()) << id.error().message();
  EXPECT_EQ(std::count(abandoned.begin(), abandoned.end(), *id), 0)
      << "id " << *id << " of an abandoned request came first";
  EXPECT_TRUE(o.ledger->marked(*id));
  auto c = o.vq->wait(1000ms);
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->token, 100u);
  EXPECT_EQ(c->id, *id);
  EXPECT_FALSE(o.ledger->marked(*id)) << "a completed request stays in the ledger";
  for (std::uint16_t a : abandoned) EXPECT_TRUE(o.ledger->marked(a)) << a;
}

// The device completes one of the earlier owner's ids late (QEMU 7.2 after a
// reset): the ring drops it, the new request still gets its own completion,
// and that id leaves the ledger while the others stay.
TEST(Virtqueue, ALateCompletionOfAnEarlierOwnersIdIsDroppedAndLeavesTheLedger) {
  NextOwner o;
  ASSERT_NO_FATAL_FAILURE(o.take_over(3));
  const std::vector<std::uint16_t>& abandoned = o.abandoned;
  ASSERT_EQ(o.ledger->left_over(), abandoned);
  const std::uint16_t late = abandoned[1];
  ASSERT_TRUE(o.dev.complete_late(0, late, 16));
  auto id = o.vq->submit({}, std::span(&o.buf, 1), 100);
  ASSERT_TRUE(id.ok()) << id.error().message();
  auto c = o.vq->wait(1000ms);
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->token, 100u) << "the late completion of id " << late << " was taken for the new request";
  EXPECT_EQ(c->id, *id);
  EXPECT_FALSE(o.ledger->marked(late)) << "id " << late << " stays in the ledger after its late completion";
  EXPECT_TRUE(o.ledger->marked(abandoned[0]));
  EXPECT_TRUE(o.ledger->marked(abandoned[2]));
  EXPECT_FALSE(o.ledger->marked(*id));
}

// A ledger that cannot be opened leaves the queue working without one and
// says why.
TEST(Virtqueue, WithoutItsLedgerTheQueueWorksAndSaysWhy) {
  FakeVirtioDevice dev;
  auto t = open(dev);
  t->set_inflight_dir("/proc/uvirtio-no-such-dir");
  auto vq = Virtqueue::create(*t, 0, 8, CompletionMode::polling);
  ASSERT_TRUE(vq.ok()) << vq.error().message();
  EXPECT_EQ((*vq)->ledger(), nullptr);
  EXPECT_NE((*vq)->ledger_error().find("open in-flight ledger"), std::string::npos) << (*vq)->ledger_error();
  EXPECT_NE((*vq)->ledger_error().find(kBdf), std::string::npos) << (*vq)->ledger_error();
  ASSERT_TRUE(t->add_status(status::kDriverOk).ok());
  auto buf = dev.function().dma().alloc(4096, 4096);
  ASSERT_TRUE(buf.ok());
  const rings::Buffer in{buf->iova, 16};
  ASSERT_TRUE((*vq)->submit({}, std::span(&in, 1), 1).ok());
  EXPECT_TRUE((*vq)->wait(1000ms).ok());
}

// ------------------------------------------------------------------ bring_up

TEST(BringUp, EndToEnd) {
  FakeVirtioOptions o;
  o.features = kV1 | (1ull << feature::kAccessPlatform) | (1ull << 0) | (1ull << 1);
  FakeVirtioDevice dev(o);
  const FeaturePolicy policy{FeatureSet::of({0, 2}), FeatureSet::of({0})};
  auto d = bring_up(dev.take_function(), 4, policy);
  ASSERT_TRUE(d.ok()) << d.error().message();
  // Spec 3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
  EXPECT_EQ(dev.status_writes(), (std::vector<std::uint8_t>{0, 1, 3, 11}));
  const std::uint64_t want = kV1 | (1ull << feature::kAccessPlatform) | 1ull;
  EXPECT_EQ(dev.driver_features(), want);
  EXPECT_EQ((*d)->transport().features().bits(), want);
  EXPECT_EQ((*d)->function().bdf(), kBdf);
  ASSERT_TRUE((*d)->driver_ok().ok());
  EXPECT_EQ(dev.status(), 15);
  d.value().reset();  // the Device resets the device when it goes away
  EXPECT_EQ(dev.status(), 0);
  EXPECT_EQ(dev.violations(), kNone);
}

TEST(BringUp, WrongDeviceType) {
  FakeVirtioDevice dev;  // entropy
  auto d = bring_up(dev.take_function(), 27, {});
  expect_error(d, Errc::invalid_argument, "it is a virtio entropy device, not pmem");
  EXPECT_TRUE(dev.status_writes().empty()) << "the device must not be touched";
}

TEST(BringUp, LegacyDeviceRefused) {
  FakeVirtioOptions o;
  o.features = 1ull << 0;  // no VERSION_1
  FakeVirtioDevice dev(o);
  expect_error(bring_up(dev.take_function(), 4, {}), Errc::unsupported, "legacy");
  EXPECT_EQ(dev.status() & status::kFeaturesOk, 0);
  EXPECT_NE(dev.status() & status::kFailed, 0) << "spec 3.1.1: a driver that gives up sets FAILED";
}

TEST(BringUp, FeaturesOkRefused) {
  FakeVirtioDevice dev;
  dev.faults.refuse_features_ok = true;
  expect_error(bring_up(dev.take_function(), 4, {}), Errc::unsupported, "FEATURES_OK");
  EXPECT_NE(dev.status() & status::kFailed, 0);
}

// Spec 3.1.1: a driver that gives up sets FAILED, in a reinitialization
// after DEVICE_NEEDS_RESET as in the first bring-up.
TEST(BringUp, ReinitializeSetsFailedWhenFeaturesOkIsRefused) {
  FakeVirtioDevice dev;
  auto d = bring_up(dev.take_function(), 4, {});
  ASSERT_TRUE(d.ok()) << d.error().message();
  dev.faults.refuse_features_ok = true;
  expect_error((*d)->reinitialize(100ms), Errc::unsupported, "FEATURES_OK");
  EXPECT_NE(dev.status() & status::kFailed, 0) << "spec 3.1.1: a driver that gives up sets FAILED";
  EXPECT_EQ(dev.status() & status::kFeaturesOk, 0);
}

// Spec 3.1.1: a recovery that gives up after FEATURES_OK (the queue cannot
// be set up again: its notify offset now lies outside the notify structure)
// sets FAILED too, as reinitialize() does.
TEST(BringUp, RecoverSetsFailedWhenTheQueueCannotBeSetUpAgain) {
  FakeVirtioDevice dev;
  auto d = bring_up(dev.take_function(), 4, {});
  ASSERT_TRUE(d.ok()) << d.error().message();
  auto vq = Virtqueue::create((*d)->transport(), 0, 8, CompletionMode::polling);
  ASSERT_TRUE(vq.ok()) << vq.error().message();
  ASSERT_TRUE((*d)->driver_ok().ok());
  dev.set_queue_notify_off(0, 0x7fff);
  expect_error((*d)->recover(**vq, 100ms), Errc::bad_device_data, "queue_notify_off");
  EXPECT_NE(dev.status() & status::kFailed, 0) << "spec 3.1.1: a driver that gives up sets FAILED";
  EXPECT_EQ(dev.status() & status::kDriverOk, 0);
}

TEST(BringUp, ResetTimeout) {
  FakeVirtioDevice dev;
  {
    auto t = open(dev);
    ASSERT_TRUE(t->add_status(status::kAcknowledge).ok());  // a previous user left it running
  }
  dev.faults.reset_stuck = true;
  OpenOptions opts;
  opts.reset_deadline = 20ms;
  expect_error(bring_up(dev.take_function(), 4, {}, opts), Errc::timeout, "reset device");
}

}  // namespace
}  // namespace uvirtio::driver
