// Unit tests for the virtio-rng driver (virtio spec 1.2, 5.4) over the
// virtio-pci transport, against FakeVirtioDevice playing an entropy device
// (PCI device id 0x1044). The device fills each request with a running byte
// counter, so every returned byte can be checked. Completion is tested by
// polling and by interrupt (MSI-X and INTx eventfds), with the device
// answering inside the notify write or from its own thread; a hostile or
// stuck device must give its exact Errc quickly, never a hang.
#include "uvirtio/driver/rng.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "support/fake_virtio.hpp"

namespace uvirtio::driver {
namespace {

using test::FakeVirtioDevice;
using test::FakeVirtioOptions;
using test::Segment;
using namespace std::chrono_literals;

constexpr const char* kBdf = "0000:00:04.0";
const std::vector<std::string> kNone;  // no driver protocol violations

// Fills the writable buffers of each request with 0, 1, 2, ... (continuing
// across requests) and records the request sizes. Runs on the device's thread.
struct Counter {
  std::uint8_t next = 0;
  std::vector<std::uint32_t> sizes;
  test::RequestHandler handler() {
    return [this](std::uint16_t, std::span<const Segment> chain) {
      std::uint32_t n = 0;
      for (const Segment& s : chain) {
        if (!s.writable) continue;
        for (std::uint32_t i = 0; i < s.len; ++i) s.data[i] = next++;
        n += s.len;
      }
      sizes.push_back(n);
      return n;
    };
  }
};

FakeVirtioOptions entropy(unsigned msix_vectors = 2) {
  FakeVirtioOptions o;
  o.device_type = kVirtioRngType;
  o.msix_vectors = msix_vectors;
  return o;
}

// bring_up() and Rng::attach() on the fake; `dev` must outlive the result.
std::unique_ptr<Rng> attach(FakeVirtioDevice& dev, CompletionMode mode,
                            std::chrono::milliseconds timeout = 2s, bool recover_on_reset = false) {
  auto d = bring_up(dev.take_function(), kVirtioRngType, {});
  EXPECT_TRUE(d.ok()) << d.error().message();
  if (!d.ok()) return nullptr;
  RngOptions opt;
  opt.completion = mode;
  opt.timeout = timeout;
  opt.recover_on_reset = recover_on_reset;
  auto rng = Rng::attach(std::move(d).value(), opt);
  EXPECT_TRUE(rng.ok()) << rng.error().message();
  return rng.ok() ? std::move(rng).value() : nullptr;
}

// Expects bytes first, first+1, ... (mod 256).
void expect_counter(const std::vector<std::uint8_t>& got, std::uint8_t first) {
  for (std::size_t i = 0; i < got.size(); ++i)
    ASSERT_EQ(got[i], static_cast<std::uint8_t>(first + i)) << "byte " << i;
}

void expect_error(const Result<void>& r, Errc code, const std::string& needle) {
  ASSERT_FALSE(r.ok()) << "expected " << errc_name(code);
  EXPECT_EQ(r.error().code(), code) << r.error().message();
  EXPECT_NE(r.error().message().find(kBdf), std::string::npos) << r.error().message();
  EXPECT_NE(r.error().message().find(needle), std::string::npos)
      << "'" << needle << "' not in: " << r.error().message();
}

// ------------------------------------------------------------------ reading

TEST(Rng, PollingReadsExactBytes) {
  FakeVirtioDevice dev(entropy());
  Counter counter;
  dev.set_handler(counter.handler());
  auto rng = attach(dev, CompletionMode::polling);
  ASSERT_TRUE(rng);
  EXPECT_EQ(dev.status(), status::kAcknowledge | status::kDriver | status::kFeaturesOk | status::kDriverOk);
  EXPECT_EQ(rng->queue().mode(), CompletionMode::polling);
  EXPECT_EQ(rng->queue().size(), 64);

  std::vector<std::uint8_t> a(32), b(16);
  ASSERT_TRUE(rng->read(a).ok());
  ASSERT_TRUE(rng->read(b).ok());
  expect_counter(a, 0);
  expect_counter(b, 32);
  EXPECT_EQ(counter.sizes, (std::vector<std::uint32_t>{32, 16}));
  EXPECT_EQ(rng->queue().notifications(), 2u);
  EXPECT_EQ(rng->queue().interrupts(), 0u);
  // A polling queue asks for no interrupts: no vector and VIRTQ_AVAIL_F_NO_INTERRUPT.
  EXPECT_EQ(dev.function().raise_count(pci::IrqKind::msix) + dev.function().raise_count(pci::IrqKind::intx),
            0u);
  EXPECT_EQ(dev.queue_vector(0), FakeVirtioDevice::kNoVector);
  EXPECT_EQ(dev.violations(), kNone);
}

// A request whose notification failed was published all the same: the device
// takes it at the next notification and fills its buffer, so the next
// request gets another one (as in pmem's AFlushWhoseNotifyFailed... test).
TEST(Rng, ARequestWhoseNotifyFailedKeepsItsBufferFromTheNextOne) {
  FakeVirtioDevice dev(entropy());
  Counter counter;
  std::vector<const std::uint8_t*> filled;
  auto serve = counter.handler();
  dev.set_handler([&](std::uint16_t q, std::span<const Segment> chain) {
    filled.push_back(chain[0].data);
    return serve(q, chain);
  });
  auto rng = attach(dev, CompletionMode::polling);
  ASSERT_TRUE(rng);
  dev.function()
      .soft_bar(FakeVirtioDevice::kBar)
      ->fail_writes_in(FakeVirtioDevice::kNotify, FakeVirtioDevice::kRegionSize, 1);
  std::vector<std::uint8_t> a(16);
  auto failed = rng->read(a);
  ASSERT_FALSE(failed.ok());
  EXPECT_NE(failed.error().message().find("write BAR"), std::string::npos) << failed.error().message();
  ASSERT_TRUE(rng->read(a).ok());
  ASSERT_EQ(filled.size(), 2u) << "the second notification serves both requests";
  EXPECT_NE(filled[0], filled[1]) << "the failed request's buffer went to the next request as well";
  EXPECT_EQ(dev.violations(), kNone);
}

// A timeout of milliseconds::max() means "wait as long as it takes": the
// deadline saturates instead of overflowing steady_clock (UB, and in a
// release build a deadline in the past: an immediate timeout).
TEST(Rng, ATimeoutOfForeverWaitsForTheAnswer) {
  for (CompletionMode mode : {CompletionMode::polling, CompletionMode::interrupt}) {
    SCOPED_TRACE(completion_mode_name(mode));
    FakeVirtioDevice dev(entropy());
    Counter counter;
    dev.set_handler(counter.handler());
    dev.start_worker(20ms);
    auto rng = attach(dev, mode, std::chrono::milliseconds::max());
    ASSERT_TRUE(rng);
    std::vector<std::uint8_t> a(32);
    auto r = rng->read(a);
    ASSERT_TRUE(r.ok()) << r.error().message();
    expect_counter(a, 0);
  }
}

// VIRTIO_F_IN_ORDER offered: accepted, the ring switched to in-order, and
// the fake completes what one notify brings as a batch with a single used
// entry (2.7.9); the driver gets every chain back in order, the skipped ones
// with len 0. The fake also checks the ring-order allocation (2.7.5).
TEST(Rng, InOrderBatchesEndToEnd) {
  FakeVirtioOptions o = entropy();
  o.features |= 1ull << feature::kInOrder;
  FakeVirtioDevice dev(o);
  Counter counter;
  dev.set_handler(counter.handler());
  auto rng = attach(dev, CompletionMode::polling);
  ASSERT_TRUE(rng);
  EXPECT_TRUE(FeatureSet(dev.driver_features()).has(feature::kInOrder));
  EXPECT_TRUE(rng->queue().ring().in_order());
  std::vector<std::uint8_t> a(32);
  ASSERT_TRUE(rng->read(a).ok());  // one request: a batch of one, with its length
  expect_counter(a, 0);

  // Four requests published with one notify: one used entry for all four.
  auto buf = rng->device().transport().dma().alloc(4 * 64, 64);
  ASSERT_TRUE(buf.ok());
  rings::Ring& ring = rng->queue().ring();
  for (std::uint64_t t = 0; t < 4; ++t) {
    const rings::Buffer in{buf->iova + 64 * t, static_cast<std::uint32_t>(16 + t)};
    ASSERT_TRUE(ring.add({}, std::span(&in, 1), 100 + t).ok());
  }
  ring.publish();
  const auto completions = dev.completions();
  ASSERT_TRUE(rng->device().transport().notify(0).ok());
  EXPECT_EQ(dev.completions(), completions + 4);
  for (std::uint64_t t = 0; t < 4; ++t) {
    auto c = rng->queue().wait(1s);
    ASSERT_TRUE(c.ok()) << c.error().message();
    EXPECT_EQ(c->token, 100 + t);
    EXPECT_EQ(c->skipped, t != 3);
    EXPECT_EQ(c->len, t == 3 ? 19u : 0u);
  }
  EXPECT_EQ(counter.sizes, (std::vector<std::uint32_t>{32, 16, 17, 18, 19}));
  EXPECT_EQ(ring.in_flight(), 0);
  std::vector<std::uint8_t> b(8);
  ASSERT_TRUE(rng->read(b).ok());
  expect_counter(b, static_cast<std::uint8_t>(32 + 16 + 17 + 18 + 19));
  EXPECT_EQ(dev.violations(), kNone);
}

TEST(Rng, ReadLargerThanOneBuffer) {
  FakeVirtioDevice dev(entropy());
  Counter counter;
  dev.set_handler(counter.handler());
  auto rng = attach(dev, CompletionMode::polling);
  ASSERT_TRUE(rng);
  std::vector<std::uint8_t> out(10000);
  ASSERT_TRUE(rng->read(out).ok());
  expect_counter(out, 0);
  EXPECT_EQ(counter.sizes, (std::vector<std::uint32_t>{4096, 4096, 1808}));
  EXPECT_EQ(dev.completions(), 3u);
}

TEST(Rng, ShortAnswersAreToppedUp) {
  FakeVirtioDevice dev(entropy());
  std::uint8_t next = 0;
  dev.set_handler([&](std::uint16_t, std::span<const Segment> chain) -> std::uint32_t {
    const std::uint32_t n = std::min<std::uint32_t>(chain[0].len, 5);  // at most 5 bytes per request
    for (std::uint32_t i = 0; i < n; ++i) chain[0].data[i] = next++;
    return n;
  });
  auto rng = attach(dev, CompletionMode::polling);
  ASSERT_TRUE(rng);
  std::vector<std::uint8_t> out(23);
  ASSERT_TRUE(rng->read(out).ok());
  expect_counter(out, 0);
  EXPECT_EQ(dev.completions(), 5u);
}

TEST(Rng, InterruptModeMsixOnDeviceThread) {
  FakeVirtioDevice dev(entropy(2));
  Counter counter;
  dev.set_handler(counter.handler());
  // The device answers 2 ms after the notify, so the driver is asleep on the
  // eventfd when the MSI-X message arrives.
  dev.start_worker(2ms);
  auto rng = attach(dev, CompletionMode::interrupt);
  ASSERT_TRUE(rng);
  EXPECT_EQ(dev.queue_vector(0), 1);
  std::vector<std::uint8_t> out(100);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(rng->read(out).ok());
    expect_counter(out, static_cast<std::uint8_t>(100 * i));
  }
  EXPECT_EQ(dev.function().raise_count(pci::IrqKind::msix), 3u);
  EXPECT_GT(rng->queue().interrupts(), 0u);
  EXPECT_EQ(dev.isr_reads(), 0u);  // MSI-X needs no ISR read
  EXPECT_EQ(dev.violations(), kNone);
}

TEST(Rng, InterruptModeIntxOnDeviceThread) {
  FakeVirtioDevice dev(entropy(0));  // no MSI-X: INTx and the ISR
  Counter counter;
  dev.set_handler(counter.handler());
  dev.start_worker(2ms);
  auto rng = attach(dev, CompletionMode::interrupt);
  ASSERT_TRUE(rng);
  std::vector<std::uint8_t> out(64);
  ASSERT_TRUE(rng->read(out).ok());
  ASSERT_TRUE(rng->read(out).ok());
  expect_counter(out, 64);
  EXPECT_EQ(dev.function().raise_count(pci::IrqKind::intx), 2u);
  EXPECT_GT(rng->queue().interrupts(), 0u);
  EXPECT_GT(dev.isr_reads(), 0u);                // acknowledged through the ISR ...
  EXPECT_GT(dev.function().unmask_count(), 0u);  // ... and INTx unmasked
  EXPECT_EQ(dev.violations(), kNone);
}

TEST(Rng, InterruptModeSynchronousDevice) {
  FakeVirtioDevice dev(entropy(2));
  Counter counter;
  dev.set_handler(counter.handler());
  auto rng = attach(dev, CompletionMode::interrupt);
  ASSERT_TRUE(rng);
  std::vector<std::uint8_t> out(5000);
  ASSERT_TRUE(rng->read(out).ok());
  expect_counter(out, 0);
  EXPECT_EQ(dev.function().raise_count(pci::IrqKind::msix), 2u);
}

// Many reads of varied sizes against a device thread with no delay, in both
// modes: the driver and device run truly concurrently on the shared ring.
TEST(Rng, ConcurrentDeviceThread) {
  for (CompletionMode mode : {CompletionMode::polling, CompletionMode::interrupt}) {
    SCOPED_TRACE(completion_mode_name(mode));
    FakeVirtioDevice dev(entropy(2));
    Counter counter;
    dev.set_handler(counter.handler());
    dev.start_worker();
    auto rng = attach(dev, mode);
    ASSERT_TRUE(rng);
    std::uint8_t expect_first = 0;
    for (std::size_t n : {1u, 7u, 4096u, 4097u, 300u, 12345u, 64u, 2u}) {
      std::vector<std::uint8_t> out(n);
      ASSERT_TRUE(rng->read(out).ok());
      expect_counter(out, expect_first);
      expect_first = static_cast<std::uint8_t>(expect_first + n);
    }
    EXPECT_EQ(dev.violations(), kNone);
  }
}

// ------------------------------------------------------------------ failures

TEST(Rng, DeviceNeverCompletesTimesOut) {
  for (CompletionMode mode : {CompletionMode::polling, CompletionMode::interrupt}) {
    SCOPED_TRACE(completion_mode_name(mode));
    FakeVirtioDevice dev(entropy());
    dev.faults.swallow = true;
    auto rng = attach(dev, mode, 50ms);
    ASSERT_TRUE(rng);
    std::vector<std::uint8_t> out(16);
    const auto start = std::chrono::steady_clock::now();
    auto r = rng->read(out);
    const auto took = std::chrono::steady_clock::now() - start;
    expect_error(r, Errc::timeout, "read entropy: wait for queue 0: no completion within");
    // The per-request timeout must not expire early.
    EXPECT_GE(took, 50ms);
    EXPECT_LT(took, 1s);
    EXPECT_EQ(dev.requests(), 1u);
  }
}

TEST(Rng, DeviceNeedsResetOnRequest) {
  for (CompletionMode mode : {CompletionMode::polling, CompletionMode::interrupt}) {
    SCOPED_TRACE(completion_mode_name(mode));
    FakeVirtioDevice dev(entropy());
    dev.faults.needs_reset_on_notify = true;
    auto rng = attach(dev, mode, 50ms);
    ASSERT_TRUE(rng);
    std::vector<std::uint8_t> out(16);
    expect_error(rng->read(out), Errc::needs_reset, "DEVICE_NEEDS_RESET");
  }
}

TEST(Rng, DeviceGoesNeedsResetBetweenReads) {
  FakeVirtioDevice dev(entropy());
  Counter counter;
  dev.set_handler(counter.handler());
  auto rng = attach(dev, CompletionMode::polling, 5s);
  ASSERT_TRUE(rng);
  std::vector<std::uint8_t> out(16);
  ASSERT_TRUE(rng->read(out).ok());
  dev.set_needs_reset();
  const auto start = std::chrono::steady_clock::now();
  expect_error(rng->read(out), Errc::needs_reset, "DEVICE_NEEDS_RESET");
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s)
      << "polling must notice NEEDS_RESET long before the timeout";
}

// A device that swallows requests, with an Rng on it in interrupt mode, and
// NEEDS_RESET set after `delay` by another thread (joined on destruction).
struct SwallowThenNeedsReset {
  explicit SwallowThenNeedsReset(std::chrono::milliseconds delay) : dev(entropy()) {
    dev.faults.swallow = true;
    rng = attach(dev, CompletionMode::interrupt, 5s);
    later = std::thread([this, delay] {
      std::this_thread::sleep_for(delay);
      dev.set_needs_reset();
    });
  }
  ~SwallowThenNeedsReset() { later.join(); }
  FakeVirtioDevice dev;
  std::unique_ptr<Rng> rng;
  std::thread later;
};

TEST(Rng, NeedsResetWakesAnInterruptWaiterThroughTheConfigVector) {
  // The device swallows the request, then sets NEEDS_RESET and raises the
  // config MSI-X vector: the waiter must learn it from that interrupt, long
  // before its own deadline.
  SwallowThenNeedsReset rig(50ms);
  auto& rng = rig.rng;
  ASSERT_TRUE(rng);
  std::vector<std::uint8_t> out(16);
  const auto start = std::chrono::steady_clock::now();
  auto r = rng->read(out);
  const auto took = std::chrono::steady_clock::now() - start;
  expect_error(r, Errc::needs_reset, "DEVICE_NEEDS_RESET");
  EXPECT_LT(took, 900ms) << "woken by the config interrupt, not by a timeout";
  EXPECT_EQ(rng->queue().config_interrupts(), 1u);
}

TEST(Rng, RequestAfterNeedsResetIsRefusedAtOnceUntilRecovered) {
  // Once NEEDS_RESET was seen the device ignores its queues until a reset:
  // a new request must fail at once (not at its deadline, which in interrupt
  // mode has no config interrupt left to cut it short) and reach nothing.
  SwallowThenNeedsReset rig(20ms);
  auto& rng = rig.rng;
  auto& dev = rig.dev;
  ASSERT_TRUE(rng);
  std::vector<std::uint8_t> out(16);
  expect_error(rng->read(out), Errc::needs_reset, "DEVICE_NEEDS_RESET");
  const std::uint64_t kicks = rng->queue().notifications();
  const auto start = std::chrono::steady_clock::now();
  expect_error(rng->read(out), Errc::needs_reset, "submit to queue 0");
  EXPECT_LT(std::chrono::steady_clock::now() - start, 900ms);
  EXPECT_EQ(rng->queue().notifications(), kicks) << "a request was sent to a device that needs a reset";
  EXPECT_EQ(rng->queue().ring().in_flight(), 1u) << "only the swallowed request is outstanding";
  dev.faults.swallow = false;
  Counter counter;
  dev.set_handler(counter.handler());
  auto n = rng->recover();
  ASSERT_TRUE(n) << n.error().message();
  EXPECT_EQ(*n, 1u);
  EXPECT_TRUE(rng->read(out).ok());
}

// Recovery (spec 2.1.2): the device goes NEEDS_RESET with a request in
// flight; read() resets it, brings it back with the same features, restarts
// the ring in the same memory and resubmits. Both completion modes (the fake
// serves split rings without event index; the packed ring's reset is tested
// against the packed device role in tests/rings); the counter shows exactly
// the bytes of the resubmitted request.
TEST(Rng, RecoversFromNeedsResetAndResubmits) {
  for (CompletionMode mode : {CompletionMode::polling, CompletionMode::interrupt}) {
    SCOPED_TRACE(completion_mode_name(mode));
    FakeVirtioOptions o = entropy();
    FakeVirtioDevice dev(o);
    Counter counter;
    dev.set_handler(counter.handler());
    auto rng = attach(dev, mode, 2s, /*recover_on_reset=*/true);
    ASSERT_TRUE(rng);
    std::vector<std::uint8_t> out(16);
    ASSERT_TRUE(rng->read(out).ok());
    expect_counter(out, 0);
    // The next notify finds the device broken: the request is dropped.
    dev.faults.needs_reset_on_notify = true;
    dev.set_status_hook([&](std::uint8_t st) {
      if (st == 0) dev.faults.needs_reset_on_notify = false;  // a reset repairs it
    });
    const std::size_t writes_before = dev.status_writes().size();
    auto r = rng->read(out);
    ASSERT_TRUE(r.ok()) << r.error().message();
    expect_counter(out, 16);  // served once, after the recovery
    EXPECT_EQ(rng->recoveries(), 1u);
    EXPECT_EQ(counter.sizes.size(), 2u);
    const auto writes = dev.status_writes();
    ASSERT_GT(writes.size(), writes_before);
    EXPECT_EQ(writes[writes_before], 0) << "recovery starts with a reset";
    EXPECT_EQ(dev.status() & (status::kDriverOk | status::kNeedsReset), status::kDriverOk);
    // And it keeps working, across many ring wraps.
    for (int i = 0; i < 300; ++i) ASSERT_TRUE(rng->read(out).ok()) << i;
    EXPECT_EQ(dev.violations(), kNone);
  }
}

TEST(Rng, NeedsResetThatResetDoesNotCureFailsAfterOneRecovery) {
  FakeVirtioDevice dev(entropy());
  dev.faults.needs_reset_on_notify = true;
  auto rng = attach(dev, CompletionMode::polling, 1s, /*recover_on_reset=*/true);
  ASSERT_TRUE(rng);
  std::vector<std::uint8_t> out(16);
  expect_error(rng->read(out), Errc::needs_reset, "DEVICE_NEEDS_RESET");
  EXPECT_EQ(rng->recoveries(), 1u);
}

// recover() on request: requests abandoned at their deadline are dropped
// and their buffers are free again, so no late completion can arrive.
TEST(Rng, RecoverReclaimsAbandonedRequests) {
  FakeVirtioDevice dev(entropy());
  Counter counter;
  dev.set_handler(counter.handler());
  dev.faults.swallow = true;
  auto rng = attach(dev, CompletionMode::polling, 5ms);
  ASSERT_TRUE(rng);
  std::vector<std::uint8_t> out(16);
  for (int i = 0; i < 3; ++i) expect_error(rng->read(out), Errc::timeout, "no completion");
  dev.faults.swallow = false;
  auto dropped = rng->recover();
  ASSERT_TRUE(dropped.ok()) << dropped.error().message();
  EXPECT_EQ(*dropped, 3u);
  EXPECT_TRUE(rng->queue().ring().outstanding_tokens().empty());
  ASSERT_TRUE(rng->read(out).ok());
  expect_counter(out, 0);
  EXPECT_EQ(rng->stale_completions(), 0u);
  EXPECT_EQ(dev.violations(), kNone);
}

// A request the driver gave up on but the device completed before the
// reset is not dropped: recover() takes its used entry off the ring, so it
// is not reported as lost and its id is not held back for a late completion
// that cannot come (RecoverReclaimsAbandonedRequests has one never answered).
TEST(Rng, RecoverTakesOffWhatTheDeviceCompletedBeforeTheReset) {
  FakeVirtioDevice dev(entropy());
  Counter counter;
  dev.set_handler(counter.handler());
  dev.start_worker(600ms);
  auto rng = attach(dev, CompletionMode::polling, 200ms);
  ASSERT_TRUE(rng);
  std::vector<std::uint8_t> out(16);
  expect_error(rng->read(out), Errc::timeout, "no completion");
  const auto until = std::chrono::steady_clock::now() + 5s;
  while (dev.completions() < 1 && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
  ASSERT_EQ(dev.completions(), 1u) << "the device did not answer the abandoned request";
  auto dropped = rng->recover();
  ASSERT_TRUE(dropped.ok()) << dropped.error().message();
  EXPECT_EQ(*dropped, 0u) << "the request ran before the reset";
  EXPECT_EQ(rng->queue().completed_before_reset(), 1u);
  if (const auto* split = rng->queue().ring().split()) {
    for (std::uint16_t id = 0; id < split->size(); ++id)
      EXPECT_FALSE(split->id_outstanding(id)) << "id " << id << " waits for a completion that came";
  }
  dev.set_worker_delay(0us);
  ASSERT_TRUE(rng->read(out).ok());
  expect_counter(out, 16);  // the abandoned request took bytes 0..15
  EXPECT_EQ(rng->stale_completions(), 0u);
  EXPECT_EQ(dev.violations(), kNone);
}

// Both ring layouts: the fake writes the hostile used entry raw, on a packed
// ring at the device role's used position with the right wrap bits.
TEST(Rng, UsedLenBeyondBufferBreaksTheQueue) {
  for (const bool packed : {false, true}) {
    SCOPED_TRACE(packed ? "packed" : "split");
    FakeVirtioOptions o = entropy();
    if (packed) o.features |= 1ull << feature::kRingPacked;
    FakeVirtioDevice dev(o);
    Counter counter;
    dev.set_handler(counter.handler());
    dev.faults.used_len_excess = 1;
    auto rng = attach(dev, CompletionMode::polling);
    ASSERT_TRUE(rng);
    EXPECT_EQ(rng->queue().packed(), packed);
    std::vector<std::uint8_t> out(32);
    expect_error(rng->read(out), Errc::bad_device_data, "used len 33 exceeds the 32 device-writable bytes");
    dev.faults.used_len_excess = 0;  // even a device that behaves again is not trusted
    expect_error(rng->read(out), Errc::broken, "broken");
    expect_error(rng->read(out), Errc::broken, "broken");
    EXPECT_TRUE(rng->queue().ring().broken());
    EXPECT_EQ(dev.notifies(), 1u) << "a broken queue must not notify the device";
  }
}

TEST(Rng, UsedIdOutOfRangeBreaksTheQueue) {
  for (const bool packed : {false, true}) {
    SCOPED_TRACE(packed ? "packed" : "split");
    FakeVirtioOptions o = entropy();
    if (packed) o.features |= 1ull << feature::kRingPacked;
    FakeVirtioDevice dev(o);
    dev.faults.bad_used_id = true;
    auto rng = attach(dev, CompletionMode::interrupt);
    ASSERT_TRUE(rng);
    EXPECT_EQ(rng->queue().packed(), packed);
    std::vector<std::uint8_t> out(8);
    expect_error(rng->read(out), Errc::bad_device_data, "used id 67 out of range");
    expect_error(rng->read(out), Errc::broken, "broken");
  }
}

TEST(Rng, DeviceAnsweringZeroBytesForeverIsAnError) {
  FakeVirtioDevice dev(entropy());
  dev.set_handler([](std::uint16_t, std::span<const Segment>) { return 0u; });
  auto rng = attach(dev, CompletionMode::polling);
  ASSERT_TRUE(rng);
  std::vector<std::uint8_t> out(8);
  expect_error(rng->read(out), Errc::device_error, "0 bytes");
  EXPECT_EQ(dev.completions(), 17u);
}

// A request abandoned by a timeout stays in flight. When the device completes
// it late (legal: the device cannot know the driver gave up), the next read()
// drops that completion and keeps waiting for its own.
TEST(Rng, LateCompletionAfterTimeout) {
  FakeVirtioDevice dev(entropy());
  Counter counter;
  dev.set_handler(counter.handler());
  dev.start_worker(150ms);  // the device answers after the driver gave up
  auto rng = attach(dev, CompletionMode::polling, 30ms);
  ASSERT_TRUE(rng);
  std::vector<std::uint8_t> out(16);
  expect_error(rng->read(out), Errc::timeout, "no completion");
  dev.set_worker_delay(0ms);           // from now on the device answers at once
  std::this_thread::sleep_for(200ms);  // the late completion lands
  auto r = rng->read(out);
  ASSERT_TRUE(r.ok()) << r.error().message();
  expect_counter(out, 16);  // bytes 0..15 went to the abandoned request's buffer
  EXPECT_EQ(rng->stale_completions(), 1u);
  auto r2 = rng->read(out);
  ASSERT_TRUE(r2.ok()) << r2.error().message();
  expect_counter(out, 32);
  EXPECT_EQ(rng->stale_completions(), 1u);
  EXPECT_EQ(dev.violations(), kNone);
}

// Abandoned requests keep their buffers; once all are held by a device that
// never answers, read() says so instead of reusing one.
TEST(Rng, TooManyAbandonedRequestsIsBusy) {
  FakeVirtioDevice dev(entropy());
  dev.faults.swallow = true;
  auto rng = attach(dev, CompletionMode::polling, 5ms);
  ASSERT_TRUE(rng);
  std::vector<std::uint8_t> out(16);
  std::uint64_t timeouts = 0;
  Result<void> r = ok();
  for (int i = 0; i < 64; ++i) {
    r = rng->read(out);
    if (r.ok() || r.error().code() != Errc::timeout) break;
    ++timeouts;
  }
  EXPECT_GT(timeouts, 0u);
  expect_error(r, Errc::busy, "abandoned requests are still in flight");
  EXPECT_EQ(dev.requests(), timeouts) << "the busy read must not submit";
}

}  // namespace
}  // namespace uvirtio::driver
