// Unit tests for the packed virtqueue, device role (PackedDeviceQueue,
// virtio spec 1.2, 2.8), against the driver role (PackedQueue) over the same
// memory. Buffer addresses are bus addresses kBus + offset into a data area
// that the device reaches through a window translation callback, so an
// address outside the window is "untranslatable". Covers round trips with
// multi-descriptor chains (checking the bytes both ways), long runs through
// odd and power-of-two sizes with out-of-order completion (wrap counters
// flip many times), a device on another thread, event suppression, and a
// hostile driver writing descriptors by hand: each such case must end with
// Errc::bad_device_data naming the queue, the queue latched broken (later
// calls Errc::broken) and no byte of the shared memory changed.
#include "uvirtio/rings/packed_device.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "uvirtio/base/barrier.hpp"
#include "uvirtio/rings/packed.hpp"

namespace uvirtio::rings {
namespace {

constexpr const char* kName = "peer 7 queue 1";
constexpr std::uint64_t kBus = 0x10'0000'0000;
constexpr std::size_t kSlot = 64;  // data bytes per in-flight request

std::size_t align_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

// Descriptor ring, both event areas and a data area of `size` slots.
struct Mem {
  explicit Mem(std::uint16_t n) : size(n) {
    drv_off = align_up(PackedLayout::desc_bytes(n), 16);
    dev_off = drv_off + 16;
    data_off = dev_off + 64;
    data_bytes = std::size_t{n} * kSlot;
    total = align_up(data_off + data_bytes, 4096);
    mem.reset(static_cast<std::uint8_t*>(std::aligned_alloc(4096, total)));
    std::memset(mem.get(), 0x5A, total);
  }
  std::uint8_t* desc() const { return mem.get(); }
  std::uint8_t* drv_event() const { return mem.get() + drv_off; }
  std::uint8_t* dev_event() const { return mem.get() + dev_off; }
  std::uint8_t* data() const { return mem.get() + data_off; }
  PvirtqDesc* ring() const { return reinterpret_cast<PvirtqDesc*>(desc()); }
  std::uint64_t bus(std::size_t data_offset) const { return kBus + data_offset; }
  std::vector<std::uint8_t> bytes() const { return {mem.get(), mem.get() + total}; }

  PackedDeviceQueue::Translate window() const {
    std::uint8_t* view = data();
    const std::size_t bytes = data_bytes;
    return [view, bytes](std::uint64_t a, std::uint32_t len,
                         bool /*writable*/) -> std::optional<std::span<std::uint8_t>> {
      if (a < kBus) return std::nullopt;
      const std::uint64_t off = a - kBus;
      if (off > bytes || len > bytes - off) return std::nullopt;
      return std::span<std::uint8_t>(view + off, len);
    };
  }
  Result<PackedQueue> driver() const {
    return PackedQueue::create(size, desc(), drv_event(), dev_event(), kName);
  }
  Result<PackedDeviceQueue> device() const {
    return PackedDeviceQueue::create(size, desc(), drv_event(), dev_event(), kName, window());
  }

  std::uint16_t size;
  std::size_t drv_off, dev_off, data_off, data_bytes, total;
  std::unique_ptr<std::uint8_t[], decltype(&std::free)> mem{nullptr, &std::free};
};

// Flags a driver with wrap counter `wrap` writes to make a descriptor available.
std::uint16_t avail(bool wrap) { return wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED; }

void put(PvirtqDesc& d, std::uint64_t addr, std::uint32_t len, std::uint16_t id, std::uint16_t flags) {
  d.addr.set(addr);
  d.len.set(len);
  d.id.set(id);
  d.flags.set(flags);
}

std::uint64_t get64(const std::uint8_t* p) {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
void set64(std::uint8_t* p, std::uint64_t v) { std::memcpy(p, &v, 8); }

TEST(PackedDeviceCreate, RejectsBadArgumentsWithoutTouchingMemory) {
  Mem m(8);
  const auto before = m.bytes();
  const auto x = m.window();
  EXPECT_EQ(PackedDeviceQueue::create(0, m.desc(), m.drv_event(), m.dev_event(), kName, x).error().code(),
            Errc::invalid_argument);
  EXPECT_EQ(PackedDeviceQueue::create(40000, m.desc(), m.drv_event(), m.dev_event(), kName, x).error().code(),
            Errc::invalid_argument);
  EXPECT_EQ(PackedDeviceQueue::create(8, nullptr, m.drv_event(), m.dev_event(), kName, x).error().code(),
            Errc::invalid_argument);
  EXPECT_EQ(PackedDeviceQueue::create(8, m.desc() + 8, m.drv_event(), m.dev_event(), kName, x).error().code(),
            Errc::invalid_argument);
  EXPECT_EQ(PackedDeviceQueue::create(8, m.desc(), m.drv_event() + 2, m.dev_event(), kName, x).error().code(),
            Errc::invalid_argument);
  EXPECT_EQ(PackedDeviceQueue::create(8, m.desc(), m.drv_event(), m.dev_event(), kName,
                                      PackedDeviceQueue::Translate{})
                .error()
                .code(),
            Errc::invalid_argument);
  auto ok = PackedDeviceQueue::create(3, m.desc(), m.drv_event(), m.dev_event(), kName, x);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok.value().size(), 3);
  EXPECT_EQ(m.bytes(), before);
}

TEST(PackedDevice, RoundTripMultiDescriptorChainsAcrossTheRingEnd) {
  Mem m(5);  // odd: 3-descriptor chains start at 0, 3, 1, 4, 2, ... and cross the end
  auto drv = m.driver().value();
  auto dev = m.device().value();
  EXPECT_FALSE(dev.has_avail());
  EXPECT_FALSE(dev.pop().value().has_value());
  for (std::uint64_t round = 0; round < 12; ++round) {
    std::uint8_t* d = m.data();
    std::memset(d, 0, 48);
    set64(d, 0x1111 + round);
    set64(d + 8, 0x2222 + round);
    const Buffer out[] = {{m.bus(0), 8}, {m.bus(8), 8}};
    const Buffer in[] = {{m.bus(16), 16}};
    const auto id = drv.add(out, in, 100 + round);
    ASSERT_TRUE(id.ok()) << id.error().message();
    EXPECT_TRUE(drv.publish());
    ASSERT_TRUE(dev.has_avail());
    auto req = dev.pop();
    ASSERT_TRUE(req.ok()) << req.error().message();
    ASSERT_TRUE(req.value().has_value());
    const auto& r = *req.value();
    EXPECT_EQ(r.head, id.value());
    ASSERT_EQ(r.readable.size(), 2u);
    ASSERT_EQ(r.writable.size(), 1u);
    EXPECT_EQ(r.readable_bytes, 16u);
    EXPECT_EQ(r.writable_bytes, 16u);
    EXPECT_EQ(get64(r.readable[0].data()), 0x1111 + round);
    EXPECT_EQ(get64(r.readable[1].data()), 0x2222 + round);
    ASSERT_EQ(r.writable[0].size(), 16u);
    set64(r.writable[0].data(), 0x3333 + round);
    EXPECT_EQ(dev.in_flight(), 1);
    EXPECT_FALSE(dev.has_avail());
    ASSERT_TRUE(dev.push(r.head, 8).ok());
    EXPECT_EQ(dev.in_flight(), 0);
    EXPECT_TRUE(dev.should_interrupt());
    EXPECT_FALSE(dev.should_interrupt());  // nothing pushed since
    auto c = drv.poll();
    ASSERT_TRUE(c.ok()) << c.error().message();
    ASSERT_TRUE(c.value().has_value());
    EXPECT_EQ(c.value()->token, 100 + round);
    EXPECT_EQ(c.value()->len, 8u);
    EXPECT_EQ(get64(d + 16), 0x3333 + round);
    EXPECT_EQ(drv.free_count(), 5);
  }
  EXPECT_FALSE(dev.broken());
  EXPECT_FALSE(drv.broken());
}

// A device reset with requests in flight: the driver lists them, resets
// the ring in place (both wrap counters back to 1, ids free) and a fresh
// device role (what the device is after its reset) serves it again, across
// several wraps. A driver that kept its old wrap counter or free ids would
// stall or be refused here.
TEST(PackedDevice, ResetRingWithRequestsInFlightThenServeAgain) {
  Mem m(5);
  auto drv = m.driver().value();
  std::vector<std::uint16_t> dropped_ids;
  {
    auto dev = m.device().value();
    for (std::uint64_t t = 0; t < 7; ++t) {  // past the end once: wrap counter 0
      const Buffer in[] = {{m.bus(0), 8}};
      ASSERT_TRUE(drv.add({}, in, t).ok());
      drv.publish();
      auto r = dev.pop().value();
      ASSERT_TRUE(r.has_value());
      ASSERT_TRUE(dev.push(r->head, 8).ok());
      ASSERT_TRUE(drv.poll().value().has_value());
    }
    for (std::uint64_t t = 100; t < 103; ++t) {  // in flight when the device resets
      const Buffer in[] = {{m.bus(8 * (t - 99)), 8}};
      auto id = drv.add({}, in, t);
      ASSERT_TRUE(id.ok());
      dropped_ids.push_back(*id);
    }
    drv.publish();
    ASSERT_TRUE(dev.pop().value().has_value());  // the device took one, never answered
  }
  EXPECT_EQ(drv.outstanding_tokens(), (std::vector<std::uint64_t>{100, 101, 102}));
  ASSERT_TRUE(drv.reset_ring().ok());
  EXPECT_TRUE(drv.outstanding_tokens().empty());
  EXPECT_EQ(drv.free_count(), 5);
  EXPECT_EQ(drv.in_flight(), 0);
  for (std::size_t i = 0; i < 5; ++i)
    EXPECT_EQ(m.ring()[i].flags.get(), 0) << "descriptor " << i << " not cleared";
  auto dev = m.device().value();
  for (std::uint64_t t = 200; t < 230; ++t) {
    const Buffer in[] = {{m.bus(0), 8}};
    auto id = drv.add({}, in, t);
    ASSERT_TRUE(id.ok()) << id.error().message();
    // A late completion of a dropped request must not match a new one.
    if (t == 200) {
      EXPECT_EQ(std::count(dropped_ids.begin(), dropped_ids.end(), *id), 0)
          << "id " << *id << " reused first";
    }
    drv.publish();
    auto r = dev.pop();
    ASSERT_TRUE(r.ok()) << r.error().message();
    ASSERT_TRUE(r->has_value()) << "request " << t << " not seen by the fresh device";
    ASSERT_TRUE(dev.push((*r)->head, 4).ok());
    auto c = drv.poll();
    ASSERT_TRUE(c.ok()) << c.error().message();
    ASSERT_TRUE(c->has_value());
    EXPECT_EQ((*c)->token, t);
  }
  EXPECT_FALSE(drv.broken());
  EXPECT_FALSE(dev.broken());
}

// Ids an earlier owner left in flight come last on a fresh packed queue, so
// a late completion naming one breaks the ring ("not in flight") instead of
// completing a new request; completions carry the buffer id.
TEST(PackedDevice, AdoptedStaleIdsComeLastAndTheirLateCompletionIsRefused) {
  Mem m(4);
  auto drv = m.driver().value();
  const std::uint16_t stale[] = {0, 2};
  const std::uint16_t too_big[] = {4};
  EXPECT_EQ(drv.adopt_stale(0, too_big).error().code(), Errc::invalid_argument);
  EXPECT_EQ(drv.adopt_stale(4, stale).error().code(), Errc::invalid_argument);
  ASSERT_TRUE(drv.adopt_stale(0, stale).ok());
  const Buffer in[] = {{m.bus(0), 8}};
  auto id = drv.add({}, in, 7);
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(*id, 1);
  EXPECT_EQ(drv.adopt_stale(0, stale).error().code(), Errc::invalid_argument) << "a request is in flight";
  drv.publish();
  {
    auto dev = m.device().value();
    auto r = dev.pop().value();
    ASSERT_TRUE(r.has_value());
    ASSERT_TRUE(dev.push(r->head, 8).ok());
  }
  auto c = drv.poll();
  ASSERT_TRUE(c.ok() && c->has_value());
  EXPECT_EQ((*c)->id, 1);
  EXPECT_EQ((*c)->token, 7u);
  std::vector<std::uint16_t> order;
  for (std::uint64_t t = 0; t < 4; ++t) order.push_back(*drv.add({}, in, t));
  EXPECT_EQ(order, (std::vector<std::uint16_t>{1, 3, 0, 2}));

  // The earlier owner's completion of id 2, where the device writes its
  // next used descriptor, before id 2 is handed out again.
  Mem n(4);
  auto fresh = n.driver().value();
  const std::uint16_t two[] = {2};
  ASSERT_TRUE(fresh.adopt_stale(2, two).ok());
  const Buffer in_n[] = {{n.bus(0), 8}};
  ASSERT_EQ(*fresh.add({}, in_n, 9), 3);
  fresh.publish();
  n.ring()[0].id.set(2);
  n.ring()[0].len.set(8);
  n.ring()[0].flags.set(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
  auto late = fresh.poll();
  ASSERT_FALSE(late.ok()) << "the stale completion was taken for request 9";
  EXPECT_EQ(late.error().code(), Errc::stale_completion) << "a held-back id: the queue needs a reset";
  EXPECT_NE(late.error().message().find("used id 2 not in flight"), std::string::npos)
      << late.error().message();
  EXPECT_TRUE(fresh.broken());
  // Latched with the same code, so a caller's recovery policy sees it on
  // every later call, and a reset clears it.
  EXPECT_EQ(fresh.poll().error().code(), Errc::stale_completion);
  EXPECT_EQ(fresh.add({}, in_n, 10).error().code(), Errc::stale_completion);
  ASSERT_TRUE(fresh.reset_ring().ok());
  EXPECT_FALSE(fresh.broken());
  ASSERT_TRUE(fresh.add({}, in_n, 11).ok());
  // An id that was never held back and is not in flight is plain bad data.
  n.ring()[0].id.set(1);
  n.ring()[0].len.set(8);
  n.ring()[0].flags.set(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
  auto bad = fresh.poll();
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code(), Errc::bad_device_data) << bad.error().message();
  EXPECT_EQ(fresh.poll().error().code(), Errc::broken);
}

// A later start_ids_at() keeps the held-back ids last (QEMU's late
// completion after a reset was once taken for a new flush this way, in the
// packed branch of conformance.pmem_fsync_error), across reset_ring() too,
// until each is handed out again.
TEST(PackedDevice, HeldBackIdsStayLastUntilHandedOutAgain) {
  Mem m(4);
  auto drv = m.driver().value();
  const std::uint16_t zero[] = {0};
  ASSERT_TRUE(drv.adopt_stale(0, zero).ok());
  ASSERT_TRUE(drv.start_ids_at(0).ok());
  const Buffer in[] = {{m.bus(0), 8}};
  EXPECT_EQ(*drv.add({}, in, 1), 1) << "start_ids_at forgot the adopted id";
  ASSERT_TRUE(drv.reset_ring().ok());  // id 1 in flight: held back as well
  ASSERT_TRUE(drv.start_ids_at(1).ok());
  std::vector<std::uint16_t> order;
  for (std::uint64_t t = 0; t < 4; ++t) order.push_back(*drv.add({}, in, t));
  EXPECT_EQ(order, (std::vector<std::uint16_t>{2, 3, 1, 0}));
  drv.publish();
  {
    auto dev = m.device().value();
    for (int k = 0; k < 4; ++k) {
      auto r = dev.pop().value();
      ASSERT_TRUE(r.has_value());
      ASSERT_TRUE(dev.push(r->head, 8).ok());
    }
  }
  for (int k = 0; k < 4; ++k) {
    auto c = drv.poll();
    ASSERT_TRUE(c.ok() && c->has_value()) << (c.ok() ? "nothing" : c.error().message());
  }
  ASSERT_TRUE(drv.start_ids_at(0).ok());
  EXPECT_EQ(*drv.add({}, in, 9), 0) << "the marks end when the ids are handed out again";
}

// set_in_order(false) rebuilds the id free list; it must keep the held-back
// ids (adopt_stale, reset_ring) last and held back, as the split ring does,
// or a new request takes an id whose late completion is still to come.
TEST(PackedDevice, SetInOrderOffKeepsHeldBackIds) {
  Mem m(4);
  auto drv = m.driver().value();
  const std::uint16_t stale[] = {0, 1};
  ASSERT_TRUE(drv.adopt_stale(0, stale).ok());
  ASSERT_TRUE(drv.set_in_order(false).ok());
  const Buffer in[] = {{m.bus(0), 8}};
  auto id = drv.add({}, in, 5);
  ASSERT_TRUE(id.ok()) << id.error().message();
  EXPECT_EQ(*id, 2) << "a held-back id was handed out first";
  drv.publish();
  // The earlier owner's late completion of id 0: refused, not taken for request 5.
  m.ring()[0].id.set(0);
  m.ring()[0].len.set(8);
  m.ring()[0].flags.set(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
  auto late = drv.poll();
  ASSERT_FALSE(late.ok()) << "the stale completion was taken for request "
                          << (late->has_value() ? (**late).token : 0);
  EXPECT_EQ(late.error().code(), Errc::stale_completion) << late.error().message();
}

TEST(PackedDevice, UsedDescriptorHasBothWrapBitsAndWriteOnlyWithWritableBuffers) {
  Mem m(2);
  auto drv = m.driver().value();
  auto dev = m.device().value();
  const Buffer out[] = {{m.bus(0), 4}};
  ASSERT_TRUE(drv.add(out, {}, 1).ok());
  auto r = dev.pop().value();
  ASSERT_TRUE(r.has_value());
  ASSERT_TRUE(dev.push(r->head, 0).ok());
  EXPECT_EQ(m.ring()[0].flags.get(), VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
  EXPECT_EQ(m.ring()[0].id.get(), r->head);
  ASSERT_TRUE(drv.poll().value().has_value());
  // Second lap at position 1 then wrap: wrap counter 0 gives AVAIL=USED=0.
  const Buffer in[] = {{m.bus(8), 4}};
  ASSERT_TRUE(drv.add(out, {}, 2).ok());
  ASSERT_TRUE(drv.add({}, in, 3).ok());
  auto a = dev.pop().value();
  auto b = dev.pop().value();
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(dev.push(b->head, 4).ok());  // out of order: lands at position 1
  EXPECT_EQ(m.ring()[1].flags.get(), VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED | VIRTQ_DESC_F_WRITE);
  ASSERT_TRUE(dev.push(a->head, 0).ok());  // position 0 of the next lap
  EXPECT_EQ(m.ring()[0].flags.get(), 0);
  auto c1 = drv.poll().value();
  auto c2 = drv.poll().value();
  ASSERT_TRUE(c1 && c2);
  EXPECT_EQ(c1->token, 3u);
  EXPECT_EQ(c1->len, 4u);
  EXPECT_EQ(c2->token, 2u);
}

// Driver adds random chains of 1-3 descriptors, the device pops everything
// and completes in a random order; every request's bytes are checked both
// ways.
struct Pending {
  std::uint16_t slot, id, n_out, n;
};
void run_many(std::uint16_t size, std::uint64_t total, std::uint32_t seed) {
  Mem m(size);
  auto drv = m.driver().value();
  auto dev = m.device().value();
  std::mt19937 rng(seed);
  std::vector<std::uint16_t> free_slots;
  for (std::uint16_t s = 0; s < size; ++s) free_slots.push_back(s);
  std::map<std::uint64_t, Pending> pending;  // by token
  std::uint64_t next_token = 1, done = 0;
  std::vector<PackedDeviceQueue::Request> held;
  while (done < total) {
    // Driver: add while descriptors are free.
    while (next_token <= total && !free_slots.empty()) {
      const std::uint16_t max_n = static_cast<std::uint16_t>(std::min<int>(3, size));
      const auto n = static_cast<std::uint16_t>(1 + rng() % max_n);
      if (n > drv.free_count()) break;
      const auto n_out = static_cast<std::uint16_t>(rng() % (n + 1));
      const std::uint16_t slot = free_slots.back();
      free_slots.pop_back();
      std::uint8_t* p = m.data() + std::size_t{slot} * kSlot;
      std::vector<Buffer> out, in;
      for (std::uint16_t k = 0; k < n; ++k) {
        const std::size_t off = std::size_t{slot} * kSlot + k * 16u;
        if (k < n_out) {
          set64(p + k * 16u, next_token * 4 + k);
          out.push_back({m.bus(off), 8});
        } else {
          std::memset(p + k * 16u, 0, 16);
          in.push_back({m.bus(off), 16});
        }
      }
      const auto id = drv.add(out, in, next_token);
      ASSERT_TRUE(id.ok()) << id.error().message();
      pending[next_token] = Pending{slot, id.value(), n_out, n};
      ++next_token;
    }
    // Device: pop everything, check readable bytes, fill writable ones.
    for (;;) {
      auto r = dev.pop();
      ASSERT_TRUE(r.ok()) << r.error().message();
      if (!r.value()) break;
      held.push_back(std::move(*r.value()));
    }
    ASSERT_FALSE(held.empty());
    std::shuffle(held.begin(), held.end(), rng);
    const std::size_t npush = 1 + rng() % held.size();
    for (std::size_t i = 0; i < npush; ++i) {
      const auto& r = held.back();
      std::uint64_t token = 0;
      if (!r.readable.empty()) token = get64(r.readable[0].data()) / 4;
      for (std::size_t k = 0; k < r.readable.size(); ++k) {
        ASSERT_EQ(get64(r.readable[k].data()), token * 4 + k);
      }
      std::uint32_t written = 0;
      for (std::size_t k = 0; k < r.writable.size(); ++k) {
        set64(r.writable[k].data(), ~(std::uint64_t{r.head} * 8 + k));
        written += 16;
      }
      ASSERT_TRUE(dev.push(r.head, written).ok());
      held.pop_back();
    }
    // Driver: collect completions and check what the device wrote.
    for (;;) {
      auto c = drv.poll();
      ASSERT_TRUE(c.ok()) << c.error().message();
      if (!c.value()) break;
      const std::uint64_t token = c.value()->token;
      const Pending pd = pending.at(token);
      pending.erase(token);
      ASSERT_EQ(c.value()->len, 16u * (pd.n - pd.n_out));
      const std::uint8_t* p = m.data() + std::size_t{pd.slot} * kSlot;
      for (std::uint16_t k = pd.n_out; k < pd.n; ++k) {
        ASSERT_EQ(get64(p + k * 16u), ~(std::uint64_t{pd.id} * 8 + (k - pd.n_out))) << "token " << token;
      }
      free_slots.push_back(pd.slot);
      ++done;
    }
  }
  EXPECT_EQ(done, total);
  EXPECT_EQ(dev.in_flight(), 0);
  EXPECT_FALSE(dev.broken());
  EXPECT_FALSE(drv.broken());
}

TEST(PackedDevice, ManyRequestsOddSizesOutOfOrder) {
  for (const int sz : {1, 3, 7, 255}) {
    const auto size = static_cast<std::uint16_t>(sz);
    SCOPED_TRACE(size);
    run_many(size, 70001, size);
  }
}

TEST(PackedDevice, ManyRequestsPowerOfTwoSizesOutOfOrder) {
  for (const int sz : {2, 8, 256}) {
    const auto size = static_cast<std::uint16_t>(sz);
    SCOPED_TRACE(size);
    run_many(size, 70001, 1000u + size);
  }
}

TEST(PackedDevice, WritableDataReachesTheDriver) {
  Mem m(4);
  auto drv = m.driver().value();
  auto dev = m.device().value();
  for (std::uint64_t i = 0; i < 1000; ++i) {
    const Buffer out[] = {{m.bus(0), 8}};
    const Buffer in[] = {{m.bus(64), 8}, {m.bus(128), 8}};
    set64(m.data(), i);
    ASSERT_TRUE(drv.add(out, in, i).ok());
    auto r = dev.pop().value();
    ASSERT_TRUE(r.has_value());
    ASSERT_EQ(r->writable.size(), 2u);
    set64(r->writable[0].data(), get64(r->readable[0].data()) * 3);
    set64(r->writable[1].data(), get64(r->readable[0].data()) * 5);
    ASSERT_TRUE(dev.push(r->head, 16).ok());
    auto c = drv.poll().value();
    ASSERT_TRUE(c.has_value());
    ASSERT_EQ(c->token, i);
    ASSERT_EQ(get64(m.data() + 64), i * 3);
    ASSERT_EQ(get64(m.data() + 128), i * 5);
  }
}

TEST(PackedDevice, DeviceOnAnotherThread) {
  constexpr std::uint64_t kTotal = 100000;
  Mem m(64);
  auto drv = m.driver().value();
  auto dev = m.device().value();
  std::atomic<bool> failed{false};
  std::thread t([&] {
    std::uint64_t served = 0;
    while (served < kTotal && !failed.load()) {
      auto r = dev.pop();
      if (!r.ok()) {
        failed = true;
        return;
      }
      if (!r.value()) {
        cpu_relax();
        continue;
      }
      const auto& q = *r.value();
      if (q.readable.size() != 1 || q.writable.size() != 1) {
        failed = true;
        return;
      }
      set64(q.writable[0].data(), get64(q.readable[0].data()) + 1);
      if (!dev.push(q.head, 8).ok()) {
        failed = true;
        return;
      }
      ++served;
    }
  });
  std::uint64_t next = 0, done = 0;
  std::vector<std::uint16_t> free_slots;
  for (std::uint16_t s = 0; s < 32; ++s) free_slots.push_back(s);
  std::map<std::uint64_t, std::uint16_t> slot_of;
  while (done < kTotal && !failed.load()) {
    while (next < kTotal && !free_slots.empty() && drv.free_count() >= 2) {
      const std::uint16_t s = free_slots.back();
      free_slots.pop_back();
      const std::size_t off = std::size_t{s} * kSlot;
      set64(m.data() + off, next * 7);
      const Buffer out[] = {{m.bus(off), 8}};
      const Buffer in[] = {{m.bus(off + 8), 8}};
      if (!drv.add(out, in, next).ok()) {
        ADD_FAILURE() << "add failed";
        failed = true;
        break;
      }
      slot_of[next++] = s;
    }
    drv.publish();
    auto c = drv.poll();
    if (!c.ok()) {
      ADD_FAILURE() << c.error().message();
      failed = true;
      break;
    }
    if (!c.value()) {
      cpu_relax();
      continue;
    }
    const std::uint16_t s = slot_of.at(c.value()->token);
    if (get64(m.data() + std::size_t{s} * kSlot + 8) != c.value()->token * 7 + 1) {
      ADD_FAILURE() << "bad data for token " << c.value()->token;
      failed = true;
      break;
    }
    slot_of.erase(c.value()->token);
    free_slots.push_back(s);
    ++done;
  }
  t.join();
  EXPECT_FALSE(failed.load());
  EXPECT_EQ(done, kTotal);
}

TEST(PackedDevice, EventSuppression) {
  Mem m(4);
  auto drv = m.driver().value();
  auto dev = m.device().value();
  EXPECT_TRUE(drv.publish());
  dev.set_notifications(false);
  EXPECT_FALSE(drv.publish());
  EXPECT_FALSE(dev.enable_notifications_and_check());
  EXPECT_TRUE(drv.publish());
  const Buffer out[] = {{m.bus(0), 8}};
  ASSERT_TRUE(drv.add(out, {}, 1).ok());
  dev.set_notifications(false);
  EXPECT_TRUE(dev.enable_notifications_and_check());  // a chain arrived meanwhile
  drv.set_interrupts(false);
  auto r = dev.pop().value();
  ASSERT_TRUE(r.has_value());
  EXPECT_FALSE(dev.should_interrupt());  // nothing pushed
  ASSERT_TRUE(dev.push(r->head, 0).ok());
  EXPECT_FALSE(dev.should_interrupt());  // driver disabled interrupts
  drv.set_interrupts(true);
  ASSERT_TRUE(drv.poll().value().has_value());
  ASSERT_TRUE(drv.add(out, {}, 2).ok());
  r = dev.pop().value();
  ASSERT_TRUE(r.has_value());
  ASSERT_TRUE(dev.push(r->head, 0).ok());
  EXPECT_TRUE(dev.should_interrupt());
  // DESC without VIRTIO_F_EVENT_IDX is undefined: interrupt, to be safe.
  m.drv_event()[2] = RING_EVENT_FLAGS_DESC;
  ASSERT_TRUE(drv.poll().value().has_value());
  ASSERT_TRUE(drv.add(out, {}, 3).ok());
  r = dev.pop().value();
  ASSERT_TRUE(r.has_value());
  ASSERT_TRUE(dev.push(r->head, 0).ok());
  EXPECT_TRUE(dev.should_interrupt());
}

TEST(PackedDevice, PushOfAnIdNotInFlightIsACallerErrorAndLeavesTheQueueUsable) {
  Mem m(4);
  auto drv = m.driver().value();
  auto dev = m.device().value();
  const auto before = m.bytes();
  auto e = dev.push(0, 0);
  EXPECT_EQ(e.error().code(), Errc::invalid_argument);
  EXPECT_NE(e.error().message().find(kName), std::string::npos);
  EXPECT_EQ(m.bytes(), before);
  const Buffer in[] = {{m.bus(0), 8}};
  ASSERT_TRUE(drv.add({}, in, 9).ok());
  auto r = dev.pop().value();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(dev.push(static_cast<std::uint16_t>(r->head + 1), 0).error().code(), Errc::invalid_argument);
  EXPECT_EQ(dev.push(r->head, 9).error().code(), Errc::invalid_argument);  // more than writable
  EXPECT_FALSE(dev.broken());
  ASSERT_TRUE(dev.push(r->head, 8).ok());
  EXPECT_EQ(dev.push(r->head, 8).error().code(), Errc::invalid_argument);  // already pushed
  auto c = drv.poll().value();
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->len, 8u);
}

TEST(PackedDevice, DeferredPushesReachTheDriverAtOnce) {
  Mem m(8);
  auto drv = m.driver().value();
  auto dev = m.device().value();
  for (std::uint64_t t = 0; t < 3; ++t) {
    const Buffer in[] = {{m.bus(t * kSlot), 8}};
    ASSERT_TRUE(drv.add({}, in, 10 + t).ok());
  }
  drv.publish();
  PackedDeviceQueue::Request r;
  std::vector<std::uint16_t> ids;
  while (dev.pop_into(r).value()) ids.push_back(r.head);
  ASSERT_EQ(ids.size(), 3u);
  for (std::uint16_t id : ids) ASSERT_TRUE(dev.push_deferred(id, 4).ok());
  EXPECT_EQ(dev.in_flight(), 0);
  // Nothing is visible to the driver, nor counted for an interrupt, before
  // publish_used(): the batch's first descriptor still says available.
  EXPECT_FALSE(drv.has_used());
  EXPECT_FALSE(drv.poll().value().has_value());
  EXPECT_FALSE(dev.should_interrupt());
  dev.publish_used();
  for (std::uint64_t t = 0; t < 3; ++t) {
    auto c = drv.poll().value();
    ASSERT_TRUE(c.has_value());
    EXPECT_EQ(c->token, 10 + t);
    EXPECT_EQ(c->len, 4u);
  }
  EXPECT_TRUE(dev.should_interrupt());
  dev.publish_used();  // nothing pending: no effect
  EXPECT_FALSE(dev.should_interrupt());
  EXPECT_FALSE(drv.broken());
}

TEST(PackedDevice, EventIdxInterruptCountsPublishedDescriptorsWhileABatchIsDeferred) {
  // With EVENT_IDX the driver asks for an interrupt at descriptor 0. The
  // device publishes a used descriptor there, then defers a second one:
  // should_interrupt() must judge the published positions (0), not the
  // deferred one (1) the used position has already moved past, or the
  // interrupt for descriptor 0 is lost for good.
  Mem m(8);
  auto drv = m.driver().value();
  auto dev = m.device().value();
  drv.set_event_idx(true);
  dev.set_event_idx(true);
  for (std::uint64_t t = 0; t < 2; ++t) {
    const Buffer in[] = {{m.bus(t * kSlot), 8}};
    ASSERT_TRUE(drv.add({}, in, 20 + t).ok());
  }
  drv.publish();
  PackedDeviceQueue::Request r;
  std::vector<std::uint16_t> ids;
  while (dev.pop_into(r).value()) ids.push_back(r.head);
  ASSERT_EQ(ids.size(), 2u);
  ASSERT_TRUE(dev.push(ids[0], 4).ok());
  ASSERT_TRUE(dev.push_deferred(ids[1], 4).ok());
  EXPECT_TRUE(dev.should_interrupt());
  dev.publish_used();
  EXPECT_FALSE(dev.should_interrupt());  // descriptor 1: the driver did not ask for it
  for (std::uint64_t t = 0; t < 2; ++t) {
    auto c = drv.poll().value();
    ASSERT_TRUE(c.has_value());
    EXPECT_EQ(c->token, 20 + t);
  }
  EXPECT_FALSE(drv.broken());
}

TEST(PackedDevice, BufferIdsBeyondTheQueueSizeAreTracked) {
  // A driver may pick any 16-bit id (2.8.6); ours stay below the size, so
  // write these chains by hand: ids 3 (flat table), 4, 0x8000 and 0xffff (map).
  Mem m(4);
  auto dev = m.device().value();
  const std::uint16_t ids[] = {3, 0xffff, 4, 0x8000};
  for (int i = 3; i >= 0; --i)
    put(m.ring()[i], m.bus(i * kSlot), 8, ids[i],
        static_cast<std::uint16_t>(VIRTQ_DESC_F_WRITE | avail(true)));
  PackedDeviceQueue::Request r;
  for (std::uint16_t id : ids) {
    ASSERT_TRUE(dev.pop_into(r).value());
    EXPECT_EQ(r.head, id);
  }
  EXPECT_EQ(dev.in_flight(), 4);
  EXPECT_EQ(dev.push(5, 0).error().code(), Errc::invalid_argument);       // never popped
  EXPECT_EQ(dev.push(0x8001, 0).error().code(), Errc::invalid_argument);  // never popped
  EXPECT_EQ(dev.push(0xffff, 9).error().code(), Errc::invalid_argument);  // more than writable
  for (std::uint16_t id : {std::uint16_t{0x8000}, std::uint16_t{3}, std::uint16_t{0xffff}, std::uint16_t{4}})
    ASSERT_TRUE(dev.push(id, 8).ok()) << id;
  EXPECT_EQ(dev.in_flight(), 0);
  EXPECT_EQ(dev.push(0xffff, 0).error().code(), Errc::invalid_argument);  // already pushed
  // Used descriptors in push order, each with its id.
  EXPECT_EQ(m.ring()[0].id.get(), 0x8000);
  EXPECT_EQ(m.ring()[1].id.get(), 3);
  EXPECT_EQ(m.ring()[2].id.get(), 0xffff);
  EXPECT_EQ(m.ring()[3].id.get(), 4);
  EXPECT_FALSE(dev.broken());
}

// Hostile driver: descriptors written by hand at the device's position.
class PackedDeviceHostile : public ::testing::Test {
 protected:
  PackedDeviceHostile() : m(4), drv(m.driver().value()), dev(m.device().value()) {}

  // pop() must fail with bad_device_data naming the queue, latch broken,
  // and leave memory untouched; later calls fail with broken.
  void expect_rejected(const char* what) {
    SCOPED_TRACE(what);
    const auto before = m.bytes();
    EXPECT_TRUE(dev.has_avail());
    auto r = dev.pop();
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Errc::bad_device_data);
    EXPECT_NE(r.error().message().find(kName), std::string::npos) << r.error().message();
    EXPECT_TRUE(dev.broken());
    EXPECT_EQ(m.bytes(), before);
    EXPECT_EQ(dev.pop().error().code(), Errc::broken);
    EXPECT_EQ(dev.push(0, 0).error().code(), Errc::broken);
    EXPECT_FALSE(dev.has_avail());
    EXPECT_FALSE(dev.should_interrupt());
    dev.set_notifications(false);
    EXPECT_EQ(m.bytes(), before);
  }

  Mem m;
  PackedQueue drv;
  PackedDeviceQueue dev;
};

TEST_F(PackedDeviceHostile, ChainWithNextOnEveryDescriptorOverrunsTheBound) {
  PvirtqDesc* d = m.ring();
  for (int i = 3; i >= 0; --i) {
    put(d[i], m.bus(0), 8, 0, static_cast<std::uint16_t>(VIRTQ_DESC_F_NEXT | avail(true)));
  }
  expect_rejected("next on all");
}

TEST_F(PackedDeviceHostile, ChainLongerThanTheFreePositions) {
  // One legitimate chain held by the device, then a chain claiming all 4
  // positions (the rest of the ring plus the wrap).
  const Buffer out[] = {{m.bus(0), 8}};
  ASSERT_TRUE(drv.add(out, {}, 1).ok());
  ASSERT_TRUE(dev.pop().value().has_value());
  PvirtqDesc* d = m.ring();
  put(d[1], m.bus(0), 8, 1, static_cast<std::uint16_t>(VIRTQ_DESC_F_NEXT | avail(true)));
  put(d[2], m.bus(0), 8, 1, static_cast<std::uint16_t>(VIRTQ_DESC_F_NEXT | avail(true)));
  put(d[3], m.bus(0), 8, 1, static_cast<std::uint16_t>(VIRTQ_DESC_F_NEXT | avail(true)));
  put(d[0], m.bus(0), 8, 1, static_cast<std::uint16_t>(avail(false)));  // next lap
  expect_rejected("overruns held positions");
}

TEST_F(PackedDeviceHostile, ChainDescriptorNotAvailable) {
  PvirtqDesc* d = m.ring();
  put(d[1], m.bus(0), 8, 0, avail(false));  // wrong lap
  put(d[0], m.bus(0), 8, 0, static_cast<std::uint16_t>(VIRTQ_DESC_F_NEXT | avail(true)));
  expect_rejected("second descriptor not available");
}

TEST_F(PackedDeviceHostile, WritableBeforeReadable) {
  PvirtqDesc* d = m.ring();
  put(d[1], m.bus(8), 8, 0, avail(true));
  put(d[0], m.bus(0), 8, 0, static_cast<std::uint16_t>(VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | avail(true)));
  expect_rejected("writable before readable");
}

TEST_F(PackedDeviceHostile, UntranslatableAddress) {
  PvirtqDesc* d = m.ring();
  put(d[1], m.bus(m.data_bytes - 4), 8, 0, static_cast<std::uint16_t>(VIRTQ_DESC_F_WRITE | avail(true)));
  put(d[0], m.bus(0), 8, 0, static_cast<std::uint16_t>(VIRTQ_DESC_F_NEXT | avail(true)));
  expect_rejected("straddles the window end");
}

TEST_F(PackedDeviceHostile, AddressBelowTheWindow) {
  put(m.ring()[0], 0x1000, 8, 0, avail(true));
  expect_rejected("below the window");
}

TEST_F(PackedDeviceHostile, IndirectIsRejected) {
  put(m.ring()[0], m.bus(0), 16, 0, static_cast<std::uint16_t>(VIRTQ_DESC_F_INDIRECT | avail(true)));
  expect_rejected("indirect");
}

TEST_F(PackedDeviceHostile, BufferIdAlreadyInFlight) {
  const Buffer out[] = {{m.bus(0), 8}};
  const auto id = drv.add(out, {}, 1);
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(dev.pop().value().has_value());
  put(m.ring()[1], m.bus(0), 8, id.value(), avail(true));
  expect_rejected("duplicate id");
}

TEST_F(PackedDeviceHostile, ChainOverFourGiB) {
  // Lengths are checked before translation, so no mapping is needed.
  PvirtqDesc* d = m.ring();
  put(d[1], m.bus(0), 0xFFFF'FFFFu, 0, avail(true));
  put(d[0], m.bus(0), 0x10u, 0, static_cast<std::uint16_t>(VIRTQ_DESC_F_NEXT | avail(true)));
  expect_rejected("more than 2^32 bytes");
}

TEST_F(PackedDeviceHostile, NotAvailableIsNotAnError) {
  // USED bit equal to the wrap counter (a used descriptor) or AVAIL wrong:
  // simply nothing to pop.
  put(m.ring()[0], m.bus(0), 8, 0, static_cast<std::uint16_t>(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED));
  EXPECT_FALSE(dev.has_avail());
  EXPECT_FALSE(dev.pop().value().has_value());
  put(m.ring()[0], m.bus(0), 8, 0, 0);
  EXPECT_FALSE(dev.pop().value().has_value());
  EXPECT_FALSE(dev.broken());
}

}  // namespace
}  // namespace uvirtio::rings
