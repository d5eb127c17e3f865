// Unit tests for VIRTIO_F_IN_ORDER (virtio spec 1.2, 2.7.5 and 2.7.9 for the
// split ring, 2.8.9 for the packed ring), driver and device roles together
// over one memory region:
//   - the driver allocates descriptors in ring order (checked in the
//     descriptor table, and by the in-order device role, which refuses
//     anything else);
//   - the device reports batches of 1..size chains with a single used entry
//     (split: at the batch's first used position, naming its last chain, the
//     used index moved by the batch; packed: one used descriptor, the ring
//     skipped by the batch's descriptors), through 16-bit index wraps and
//     packed wrap-counter flips; the driver hands the chains back one per
//     poll(), oldest first, the skipped ones with len 0 and `skipped` set;
//   - a hostile device (id not in flight, id of a chain already completed, a
//     descriptor inside a chain, a used index moved by more than is in
//     flight or by less than the batch, a length beyond the last chain's
//     writable bytes) breaks the driver queue with Errc::bad_device_data
//     naming it, and no byte of the shared memory changes, then or later;
//   - caller mistakes on the device role (completing out of order) are
//     invalid_argument and leave the queue usable.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <vector>

#include "support/ring_bytes.hpp"
#include "uvirtio/rings/packed.hpp"
#include "uvirtio/rings/packed_device.hpp"
#include "uvirtio/rings/split.hpp"
#include "uvirtio/rings/split_device.hpp"

namespace uvirtio::rings {
namespace {

constexpr const char* kDrv = "0000:00:05.0 queue 1";
constexpr const char* kDev = "peer 3 queue 1";
constexpr std::uint64_t kBus = 0x2'0000'0000ull;
constexpr std::size_t kSlot = 16;  // data bytes per descriptor

using test::align_up;
using test::load16;
using test::store16;
using test::store32;

// Everything in one heap region: ring areas, an indirect pool, then one data
// slot per descriptor. The device reaches the region through bus addresses
// kBus + offset.
struct Region {
  Region(std::uint16_t n, bool packed) : size(n) {
    if (packed) {
      a0 = 0;
      a1 = align_up(PackedLayout::desc_bytes(n), 16);
      a2 = a1 + 16;
      pool = align_up(a2 + 16, 64);
    } else {
      a0 = 0;
      a1 = align_up(SplitLayout::desc_bytes(n), 16);
      a2 = align_up(a1 + SplitLayout::avail_bytes(n), 16);
      pool = align_up(a2 + SplitLayout::used_bytes(n), 64);
    }
    data = align_up(pool + std::size_t{n} * 4 * 16, 64);
    total = align_up(data + std::size_t{n} * kSlot, 4096);
    mem.reset(static_cast<std::uint8_t*>(std::aligned_alloc(4096, total)));
    std::memset(mem.get(), 0, total);
  }
  std::uint8_t* at(std::size_t off) const { return mem.get() + off; }
  std::uint64_t bus(std::size_t off) const { return kBus + off; }
  std::vector<std::uint8_t> bytes() const { return {mem.get(), mem.get() + total}; }
  SplitDeviceQueue::Translate window() const {
    std::uint8_t* view = mem.get();
    const std::size_t bytes = total;
    return [view, bytes](std::uint64_t a, std::uint32_t len, bool) -> std::optional<std::span<std::uint8_t>> {
      if (a < kBus) return std::nullopt;
      const std::uint64_t off = a - kBus;
      if (off > bytes || len > bytes - off) return std::nullopt;
      return std::span<std::uint8_t>(view + off, len);
    };
  }
  // Split: desc, avail, used. Packed: ring, driver event, device event.
  SplitQueue split_driver() const {
    auto q = SplitQueue::create(size, at(a0), at(a1), at(a2), kDrv);
    EXPECT_TRUE(q.ok());
    return std::move(q).value();
  }
  SplitDeviceQueue split_device() const {
    auto q = SplitDeviceQueue::create(size, at(a0), at(a1), at(a2), kDev, window());
    EXPECT_TRUE(q.ok());
    return std::move(q).value();
  }
  PackedQueue packed_driver() const {
    auto q = PackedQueue::create(size, at(a0), at(a1), at(a2), kDrv);
    EXPECT_TRUE(q.ok());
    return std::move(q).value();
  }
  PackedDeviceQueue packed_device() const {
    auto q = PackedDeviceQueue::create(size, at(a0), at(a1), at(a2), kDev, window());
    EXPECT_TRUE(q.ok());
    return std::move(q).value();
  }
  VirtqDesc* desc() const { return reinterpret_cast<VirtqDesc*>(at(a0)); }
  PvirtqDesc* ring() const { return reinterpret_cast<PvirtqDesc*>(at(a0)); }
  std::uint8_t* used() const { return at(a2); }
  std::uint8_t* used_entry(std::uint16_t pos) const { return at(a2) + 4 + 8u * (pos & (size - 1u)); }

  std::uint16_t size;
  std::size_t a0, a1, a2, pool, data, total;
  std::unique_ptr<std::uint8_t[], decltype(&std::free)> mem{nullptr, &std::free};
};

// A chain of `n` buffers, the last `w` of them device-writable, each kSlot
// bytes of the data area.
struct Chain {
  std::vector<Buffer> out, in;
};
Chain make_chain(const Region& r, std::size_t n, std::size_t w) {
  Chain c;
  for (std::size_t j = 0; j < n; ++j) {
    const Buffer b{r.bus(r.data + (j % r.size) * kSlot), static_cast<std::uint32_t>(kSlot)};
    (j + w < n ? c.out : c.in).push_back(b);
  }
  return c;
}

// ------------------------------------------------------------------ split

TEST(SplitInOrder, DescriptorsAreAllocatedInRingOrder) {
  Region r(8, false);
  auto q = r.split_driver();
  ASSERT_TRUE(q.set_in_order(true).ok());
  EXPECT_TRUE(q.in_order());
  // Heads 0, 1, 4, 6; the 3-chain at 1 links 1->2->3, the 4-chain at 4
  // never gets room.
  const auto c1 = make_chain(r, 1, 1), c3 = make_chain(r, 3, 1), c2 = make_chain(r, 2, 1);
  EXPECT_EQ(q.add(c1.out, c1.in, 1).value(), 0);
  EXPECT_EQ(q.add(c3.out, c3.in, 2).value(), 1);
  EXPECT_EQ(q.add(c2.out, c2.in, 3).value(), 4);
  EXPECT_EQ(q.add(c2.out, c2.in, 4).value(), 6);
  const auto c4 = make_chain(r, 4, 1);
  EXPECT_EQ(q.add(c4.out, c4.in, 5).error().code(), Errc::busy);
  EXPECT_EQ(r.desc()[1].next.get(), 2);
  EXPECT_EQ(r.desc()[2].next.get(), 3);
  EXPECT_EQ(r.desc()[3].flags.get() & VIRTQ_DESC_F_NEXT, 0);
  EXPECT_EQ(r.desc()[4].next.get(), 5);
  EXPECT_EQ(r.desc()[6].next.get(), 7);
  q.publish();
  // The device completes the first two as a batch, which frees descriptors
  // 0..3; allocation goes on at offset 8, i.e. 0 after the wrap.
  auto d = r.split_device();
  ASSERT_TRUE(d.set_in_order(true).ok());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(d.pop().value().has_value());
  ASSERT_TRUE(d.push_deferred(0, 0).ok());
  ASSERT_TRUE(d.push_deferred(1, 16).ok());
  d.publish_used();
  auto a = q.poll().value();
  ASSERT_TRUE(a);
  EXPECT_EQ(a->token, 1u);
  EXPECT_TRUE(a->skipped);
  EXPECT_EQ(a->len, 0u);
  auto b = q.poll().value();
  ASSERT_TRUE(b);
  EXPECT_EQ(b->token, 2u);
  EXPECT_FALSE(b->skipped);
  EXPECT_EQ(b->len, 16u);
  EXPECT_FALSE(q.poll().value());
  // Next allocation continues at offset 8 mod 8 = 0 and runs 0->1->2.
  EXPECT_EQ(q.add(c3.out, c3.in, 6).value(), 0);
  EXPECT_EQ(r.desc()[0].next.get(), 1);
  EXPECT_EQ(r.desc()[1].next.get(), 2);
}

TEST(SplitInOrder, ChainAcrossTheTableEndLinksLastToZero) {
  Region r(4, false);
  auto q = r.split_driver();
  auto d = r.split_device();
  ASSERT_TRUE(q.set_in_order(true).ok());
  ASSERT_TRUE(d.set_in_order(true).ok());
  const auto c3 = make_chain(r, 3, 1), c2 = make_chain(r, 2, 0);
  EXPECT_EQ(q.add(c3.out, c3.in, 1).value(), 0);
  q.publish();
  ASSERT_TRUE(d.pop().value().has_value());
  ASSERT_TRUE(d.push(0, 3).ok());
  EXPECT_EQ(q.poll().value()->len, 3u);
  EXPECT_EQ(q.add(c2.out, c2.in, 2).value(), 3);  // 3 -> 0
  EXPECT_EQ(r.desc()[3].next.get(), 0);
  q.publish();
  auto req = d.pop().value();
  ASSERT_TRUE(req);
  EXPECT_EQ(req->head, 3);
  EXPECT_EQ(req->readable.size(), 2u);
}

TEST(SplitInOrder, IndirectChainTakesOneRingDescriptor) {
  Region r(8, false);
  auto q = r.split_driver();
  ASSERT_TRUE(q.set_in_order(true).ok());
  q.set_indirect(true, 4);
  ASSERT_TRUE(q.provide_indirect_pool(r.at(r.pool), r.bus(r.pool), std::size_t{8} * 4 * 16).ok());
  auto d = r.split_device();
  ASSERT_TRUE(d.set_in_order(true).ok());
  d.set_indirect(true);
  const auto c3 = make_chain(r, 3, 1), c1 = make_chain(r, 1, 1);
  EXPECT_EQ(q.add(c3.out, c3.in, 1).value(), 0);
  EXPECT_EQ(r.desc()[0].flags.get(), VIRTQ_DESC_F_INDIRECT);
  EXPECT_EQ(q.add(c1.out, c1.in, 2).value(), 1);
  EXPECT_EQ(q.add(c3.out, c3.in, 3).value(), 2);
  EXPECT_EQ(q.free_count(), 5);
  q.publish();
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(d.pop().value().has_value());
  for (std::uint16_t h = 0; h < 3; ++h) ASSERT_TRUE(d.push_deferred(h, 7).ok());
  d.publish_used();
  for (std::uint64_t t = 1; t <= 3; ++t) {
    auto c = q.poll().value();
    ASSERT_TRUE(c);
    EXPECT_EQ(c->token, t);
    EXPECT_EQ(c->skipped, t != 3);
  }
  EXPECT_EQ(q.free_count(), 8);
}

// Random batches of 1..size chains of 1..3 descriptors, sometimes two
// batches published before the driver looks, through a 16-bit used index
// wrap. Only the batch's first used entry may change.
void split_round_trip(std::uint16_t size, std::uint32_t seed, std::uint64_t chains_total) {
  Region r(size, false);
  auto q = r.split_driver();
  auto d = r.split_device();
  ASSERT_TRUE(q.set_in_order(true).ok());
  ASSERT_TRUE(d.set_in_order(true).ok());
  std::mt19937 rng(seed);
  std::uint64_t next_token = 1, want_token = 1;
  std::uint16_t used_idx = 0;
  while (want_token <= chains_total) {
    // Driver: add as many chains as the batch wants and fit.
    const auto want = static_cast<int>(rng() % size) + 1;
    std::vector<std::uint32_t> writable;
    for (int i = 0; i < want; ++i) {
      const std::size_t n = std::min<std::size_t>(rng() % 3 + 1, q.free_count());
      if (n == 0) break;
      const std::size_t w = rng() % (n + 1);
      const auto c = make_chain(r, n, w);
      auto h = q.add(c.out, c.in, next_token++);
      ASSERT_TRUE(h.ok()) << h.error().message();
      writable.push_back(static_cast<std::uint32_t>(w * kSlot));
    }
    q.publish();
    // Device: pop them all (it checks ring order), complete as one or two batches.
    std::vector<std::uint16_t> heads;
    while (auto req = d.pop().value()) heads.push_back(req->head);
    ASSERT_EQ(heads.size(), writable.size());
    const std::size_t split_at = rng() % 2 == 0 ? heads.size() : rng() % heads.size() + 1;
    const auto used_area = [&] {
      return std::vector<std::uint8_t>(r.used(), r.used() + SplitLayout::used_bytes(size));
    };
    const auto before = used_area();
    std::vector<std::uint32_t> lens(heads.size());
    for (std::size_t i = 0; i < heads.size(); ++i) {
      lens[i] = writable[i] == 0 ? 0 : static_cast<std::uint32_t>(rng() % (writable[i] + 1));
      ASSERT_TRUE(d.push_deferred(heads[i], lens[i]).ok());
      if (i + 1 == split_at) d.publish_used();
    }
    d.publish_used();
    // One used entry per batch, at the batch's first position; the index
    // moved by the chain count.
    const auto after = used_area();
    std::vector<std::uint16_t> firsts = {used_idx};
    if (split_at < heads.size()) firsts.push_back(static_cast<std::uint16_t>(used_idx + split_at));
    for (std::uint16_t p = 0; p < size; ++p) {
      const std::size_t off = 4 + 8u * p;
      const bool written =
          std::any_of(firsts.begin(), firsts.end(), [&](std::uint16_t f) { return (f & (size - 1u)) == p; });
      if (!written) {
        EXPECT_EQ(std::memcmp(before.data() + off, after.data() + off, 8), 0) << p;
      }
    }
    used_idx = static_cast<std::uint16_t>(used_idx + heads.size());
    EXPECT_EQ(load16(r.used() + 2), used_idx);
    // Driver: every chain back, in order; skipped ones with len 0.
    for (std::size_t i = 0; i < heads.size(); ++i) {
      auto c = q.poll();
      ASSERT_TRUE(c.ok()) << c.error().message();
      ASSERT_TRUE(c->has_value());
      EXPECT_EQ((*c)->token, want_token++);
      const bool last_of_batch = i + 1 == split_at || i + 1 == heads.size();
      EXPECT_EQ((*c)->skipped, !last_of_batch);
      EXPECT_EQ((*c)->len, last_of_batch ? lens[i] : 0u);
    }
    EXPECT_FALSE(q.has_used());
    EXPECT_FALSE(q.poll().value());
    EXPECT_EQ(q.in_flight(), 0);
  }
}

TEST(SplitInOrder, RoundTripSize1) { split_round_trip(1, 1, 70000); }
TEST(SplitInOrder, RoundTripSize2) { split_round_trip(2, 2, 70000); }
TEST(SplitInOrder, RoundTripSize8) { split_round_trip(8, 3, 70000); }
TEST(SplitInOrder, RoundTripSize64) { split_round_trip(64, 4, 70000); }

TEST(SplitInOrder, OutstandingTokensAndResetRing) {
  Region r(8, false);
  auto q = r.split_driver();
  auto d = r.split_device();
  EXPECT_TRUE(q.set_in_order(true).ok());
  ASSERT_TRUE(d.set_in_order(true).ok());
  const auto c = make_chain(r, 1, 1);
  for (std::uint64_t t = 1; t <= 4; ++t) ASSERT_TRUE(q.add(c.out, c.in, t).ok());
  q.publish();
  EXPECT_EQ(q.set_in_order(false).error().code(), Errc::busy);
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(d.pop().value());
  EXPECT_EQ(d.set_in_order(false).error().code(), Errc::busy);
  for (std::uint16_t h = 0; h < 3; ++h) ASSERT_TRUE(d.push_deferred(h, 1).ok());
  d.publish_used();
  EXPECT_EQ(q.poll().value()->token, 1u);
  // Chains 2 and 3 are completed but not yet returned: still outstanding.
  EXPECT_EQ(q.outstanding_tokens(), (std::vector<std::uint64_t>{2, 3, 4}));
  EXPECT_TRUE(q.has_used());
  EXPECT_TRUE(q.enable_interrupts_and_check());
  ASSERT_TRUE(q.reset_ring().ok());
  EXPECT_TRUE(q.in_order());
  EXPECT_TRUE(q.outstanding_tokens().empty());
  EXPECT_FALSE(q.has_used());
  EXPECT_EQ(q.add(c.out, c.in, 9).value(), 0);  // from offset 0 again
}

TEST(SplitInOrder, EventIdxFollowsTheBatch) {
  Region r(8, false);
  auto q = r.split_driver();
  auto d = r.split_device();
  ASSERT_TRUE(q.set_in_order(true).ok());
  ASSERT_TRUE(d.set_in_order(true).ok());
  q.set_event_idx(true);
  d.set_event_idx(true);
  const auto c = make_chain(r, 1, 1);
  for (std::uint64_t t = 1; t <= 5; ++t) ASSERT_TRUE(q.add(c.out, c.in, t).ok());
  q.publish();
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(d.pop().value());
  for (std::uint16_t h = 0; h < 5; ++h) ASSERT_TRUE(d.push_deferred(h, 1).ok());
  d.publish_used();
  EXPECT_TRUE(d.should_interrupt());
  ASSERT_TRUE(q.poll().value());
  // used_event names the entry after the whole batch.
  EXPECT_EQ(load16(r.at(r.a1) + SplitLayout::used_event_offset(8)), 5);
}

// The next poll() must fail with bad_device_data naming the queue and
// `cause_part`; the queue is then broken, and later calls fail with broken
// and touch nothing.
template <class Queue>
void expect_driver_broken(Queue& q, Region& r, const std::string& cause_part) {
  const auto before = r.bytes();
  auto p = q.poll();
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.error().code(), Errc::bad_device_data);
  EXPECT_EQ(p.error().device(), kDrv);
  EXPECT_NE(p.error().cause().find(cause_part), std::string::npos) << p.error().cause();
  EXPECT_TRUE(q.broken());
  EXPECT_EQ(q.poll().error().code(), Errc::broken);
  const auto c = make_chain(r, 1, 1);
  EXPECT_EQ(q.add(c.out, c.in, 9).error().code(), Errc::broken);
  EXPECT_FALSE(q.publish());
  EXPECT_FALSE(q.has_used());
  q.set_interrupts(false);
  EXPECT_FALSE(q.enable_interrupts_and_check());
  EXPECT_EQ(r.bytes(), before);
}

// A driver queue with chains of 1, 2, 1 descriptors in flight (heads 0, 1,
// 3; tokens 1, 2, 3), writable 16, 32, 16 bytes; the test then plays the device.
class SplitInOrderHostile : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(q.set_in_order(true).ok());
    const auto c1 = make_chain(r, 1, 1), c2 = make_chain(r, 2, 2);
    ASSERT_EQ(q.add(c1.out, c1.in, 1).value(), 0);
    ASSERT_EQ(q.add(c2.out, c2.in, 2).value(), 1);
    ASSERT_EQ(q.add(c1.out, c1.in, 3).value(), 3);
    q.publish();
  }
  void used(std::uint16_t pos, std::uint32_t id, std::uint32_t len) {
    store32(r.used_entry(pos), id);
    store32(r.used_entry(pos) + 4, len);
  }
  void used_idx(std::uint16_t v) { store16(r.used() + 2, v); }

  void ExpectBroken(const std::string& cause_part) { expect_driver_broken(q, r, cause_part); }

  Region r{8, false};
  SplitQueue q = r.split_driver();
};

TEST_F(SplitInOrderHostile, Valid) {
  used(0, 3, 16);
  used_idx(3);
  for (std::uint64_t t = 1; t <= 3; ++t) EXPECT_EQ(q.poll().value()->token, t);
  EXPECT_EQ(q.free_count(), 8);
}

TEST_F(SplitInOrderHostile, IdNotInFlight) {
  used(0, 5, 0);
  used_idx(1);
  ExpectBroken("used id 5 is not the head of an in-flight chain");
}

TEST_F(SplitInOrderHostile, IdInsideAChain) {
  used(0, 2, 0);  // the second descriptor of the chain at 1
  used_idx(2);
  ExpectBroken("used id 2 is not the head of an in-flight chain");
}

TEST_F(SplitInOrderHostile, IdOutOfRange) {
  used(0, 8, 0);
  used_idx(1);
  ExpectBroken("used id 8 out of range");
}

TEST_F(SplitInOrderHostile, IdOfAChainAlreadyCompleted) {
  used(0, 0, 4);
  used_idx(1);
  EXPECT_EQ(q.poll().value()->len, 4u);
  used(1, 0, 4);  // the oldest in flight is now head 1
  used_idx(2);
  ExpectBroken("used id 0 is not the head of an in-flight chain");
}

TEST_F(SplitInOrderHostile, UsedIndexMovedByMoreThanInFlight) {
  used(0, 3, 0);
  used_idx(4);
  ExpectBroken("4 entries ahead of the last seen 0 but only 3 chains are in flight");
}

TEST_F(SplitInOrderHostile, UsedIndexMovedByLessThanTheBatch) {
  used(0, 3, 0);  // a batch of three chains
  used_idx(2);
  ExpectBroken(
      "completes an in-order batch of 3 chains (oldest in flight: head 0) but the used index moved by only "
      "2");
}

TEST_F(SplitInOrderHostile, UsedIndexWayAhead) {
  used_idx(40000);
  ExpectBroken("only 3 chains are in flight");
}

TEST_F(SplitInOrderHostile, LengthBeyondTheLastChain) {
  used(0, 1, 33);  // chain 1 has 32 writable bytes
  used_idx(2);
  ExpectBroken("used len 33 exceeds the 32 device-writable bytes of chain 1");
}

TEST_F(SplitInOrderHostile, SecondBatchEntryAtTheWrongPlaceIsNotTrusted) {
  // Two batches published at once: {0} then {1, 3}; the second entry must be
  // at position 1. The device put it at 2: position 1 holds id 1 only if the
  // device wrote it, here it holds a stale 0 -> chain 0 is no longer in flight.
  used(0, 0, 1);
  used(2, 3, 1);
  used_idx(3);
  EXPECT_EQ(q.poll().value()->token, 1u);
  ExpectBroken("used id 0 is not the head of an in-flight chain");
}

// Device role: completing out of order is the caller's bug, not the driver's.
TEST(SplitInOrderDevice, PushOutOfOrderIsInvalidArgumentAndHarmless) {
  Region r(8, false);
  auto q = r.split_driver();
  auto d = r.split_device();
  ASSERT_TRUE(q.set_in_order(true).ok());
  ASSERT_TRUE(d.set_in_order(true).ok());
  const auto c = make_chain(r, 1, 1);
  for (std::uint64_t t = 1; t <= 2; ++t) ASSERT_TRUE(q.add(c.out, c.in, t).ok());
  q.publish();
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(d.pop().value());
  const auto before = r.bytes();
  auto e = d.push(1, 0);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.error().code(), Errc::invalid_argument);
  EXPECT_NE(e.error().cause().find("head 1 is not the oldest chain in flight (0)"), std::string::npos)
      << e.error().cause();
  EXPECT_FALSE(d.broken());
  EXPECT_EQ(r.bytes(), before);
  ASSERT_TRUE(d.push(0, 1).ok());
  ASSERT_TRUE(d.push(1, 2).ok());
  EXPECT_EQ(q.poll().value()->len, 1u);
  EXPECT_EQ(q.poll().value()->len, 2u);
}

// Device role facing a driver that ignores ring order.
TEST(SplitInOrderDevice, DriverOutOfRingOrderBreaksTheDeviceQueue) {
  for (int which = 0; which < 2; ++which) {
    Region r(8, false);
    auto q = r.split_driver();  // not in order: LIFO free list after a completion
    auto d = r.split_device();
    ASSERT_TRUE(d.set_in_order(true).ok());
    VirtqDesc* t = r.desc();
    if (which == 0) {
      // Head 2 first: not offset 0.
      t[2].addr.set(r.bus(r.data));
      t[2].len.set(16);
      t[2].flags.set(0);
      store16(r.at(r.a1) + 4, 2);
    } else {
      // Head 0, next 5 instead of 1.
      t[0].addr.set(r.bus(r.data));
      t[0].len.set(16);
      t[0].flags.set(VIRTQ_DESC_F_NEXT);
      t[0].next.set(5);
      t[5].addr.set(r.bus(r.data));
      t[5].len.set(16);
      t[5].flags.set(0);
      store16(r.at(r.a1) + 4, 0);
    }
    store16(r.at(r.a1) + 2, 1);
    const auto before = r.bytes();
    auto p = d.pop();
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.error().code(), Errc::bad_device_data);
    EXPECT_EQ(p.error().device(), kDev);
    EXPECT_NE(p.error().cause().find(which == 0 ? "head 2 is not descriptor 0, the next in ring order"
                                                : "descriptor 0: next 5 is not the next in ring order"),
              std::string::npos)
        << p.error().cause();
    EXPECT_TRUE(d.broken());
    EXPECT_EQ(r.bytes(), before);
  }
}

// ----------------------------------------------------------------- packed

void packed_round_trip(std::uint16_t size, std::uint32_t seed, std::uint64_t chains_total) {
  Region r(size, true);
  auto q = r.packed_driver();
  auto d = r.packed_device();
  ASSERT_TRUE(q.set_in_order(true).ok());
  ASSERT_TRUE(d.set_in_order(true).ok());
  std::mt19937 rng(seed);
  std::uint64_t next_token = 1, want_token = 1;
  std::uint16_t pos = 0;  // where the next chain starts: its buffer id
  std::uint64_t laps = 0;
  while (want_token <= chains_total) {
    const auto want = static_cast<int>(rng() % size) + 1;
    std::vector<std::uint32_t> writable;
    std::vector<std::uint16_t> ids;
    for (int i = 0; i < want; ++i) {
      const std::size_t n = std::min<std::size_t>(rng() % 3 + 1, q.free_count());
      if (n == 0) break;
      const std::size_t w = rng() % (n + 1);
      const auto c = make_chain(r, n, w);
      auto id = q.add(c.out, c.in, next_token++);
      ASSERT_TRUE(id.ok()) << id.error().message();
      EXPECT_EQ(*id, pos);  // in order: the id is the head's position
      ids.push_back(*id);
      pos = static_cast<std::uint16_t>((pos + n) % size);
      if (pos < n) ++laps;
      writable.push_back(static_cast<std::uint32_t>(w * kSlot));
    }
    q.publish();
    std::vector<std::uint16_t> got;
    while (auto req = d.pop().value()) got.push_back(req->head);
    ASSERT_EQ(got, ids);
    const std::size_t split_at = rng() % 2 == 0 ? got.size() : rng() % got.size() + 1;
    std::vector<std::uint32_t> lens(got.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
      lens[i] = writable[i] == 0 ? 0 : static_cast<std::uint32_t>(rng() % (writable[i] + 1));
      ASSERT_TRUE(d.push_deferred(got[i], lens[i]).ok());
      if (i + 1 == split_at) d.publish_used();
    }
    d.publish_used();
    for (std::size_t i = 0; i < got.size(); ++i) {
      auto c = q.poll();
      ASSERT_TRUE(c.ok()) << c.error().message();
      ASSERT_TRUE(c->has_value());
      EXPECT_EQ((*c)->token, want_token++);
      const bool last_of_batch = i + 1 == split_at || i + 1 == got.size();
      EXPECT_EQ((*c)->skipped, !last_of_batch);
      EXPECT_EQ((*c)->len, last_of_batch ? lens[i] : 0u);
    }
    EXPECT_FALSE(q.has_used());
    EXPECT_FALSE(q.poll().value());
    EXPECT_EQ(q.in_flight(), 0);
  }
  EXPECT_GT(laps, 100u);  // many wrap-counter flips
}

TEST(PackedInOrder, RoundTripSize1) { packed_round_trip(1, 11, 3000); }
TEST(PackedInOrder, RoundTripSize3) { packed_round_trip(3, 12, 20000); }
TEST(PackedInOrder, RoundTripSize8) { packed_round_trip(8, 13, 20000); }
TEST(PackedInOrder, RoundTripSize13) { packed_round_trip(13, 14, 20000); }

TEST(PackedInOrder, OneUsedDescriptorForTheBatch) {
  Region r(8, true);
  auto q = r.packed_driver();
  auto d = r.packed_device();
  ASSERT_TRUE(q.set_in_order(true).ok());
  ASSERT_TRUE(d.set_in_order(true).ok());
  const auto c2 = make_chain(r, 2, 1), c1 = make_chain(r, 1, 1);
  EXPECT_EQ(q.add(c2.out, c2.in, 1).value(), 0);
  EXPECT_EQ(q.add(c1.out, c1.in, 2).value(), 2);
  EXPECT_EQ(q.add(c2.out, c2.in, 3).value(), 3);
  q.publish();
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(d.pop().value());
  const auto before = r.bytes();
  for (const std::uint16_t id : std::vector<std::uint16_t>{0, 2, 3}) ASSERT_TRUE(d.push_deferred(id, 5).ok());
  EXPECT_EQ(r.bytes(), before);  // nothing until publish_used()
  EXPECT_FALSE(d.should_interrupt());
  d.publish_used();
  // Only descriptor 0 changed: id 3, len 5, used for wrap counter 1.
  const auto after = r.bytes();
  EXPECT_EQ(std::memcmp(before.data() + 16, after.data() + 16, 16u * 7), 0);
  EXPECT_EQ(r.ring()[0].id.get(), 3);
  EXPECT_EQ(r.ring()[0].len.get(), 5u);
  EXPECT_EQ(r.ring()[0].flags.get() & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED),
            VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
  EXPECT_TRUE(d.should_interrupt());
  EXPECT_EQ(q.outstanding_tokens(), (std::vector<std::uint64_t>{1, 2, 3}));
  EXPECT_TRUE(q.poll().value()->skipped);
  EXPECT_EQ(q.outstanding_tokens(), (std::vector<std::uint64_t>{2, 3}));
  EXPECT_TRUE(q.has_used());
  EXPECT_TRUE(q.poll().value()->skipped);
  auto last = q.poll().value();
  EXPECT_FALSE(last->skipped);
  EXPECT_EQ(last->len, 5u);
  EXPECT_EQ(q.free_count(), 8);
  EXPECT_EQ(q.add(c1.out, c1.in, 4).value(), 5);
}

TEST(PackedInOrder, DevicePushOutOfOrderIsInvalidArgument) {
  Region r(4, true);
  auto q = r.packed_driver();
  auto d = r.packed_device();
  ASSERT_TRUE(q.set_in_order(true).ok());
  ASSERT_TRUE(d.set_in_order(true).ok());
  const auto c = make_chain(r, 1, 1);
  for (std::uint64_t t = 1; t <= 2; ++t) ASSERT_TRUE(q.add(c.out, c.in, t).ok());
  q.publish();
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(d.pop().value());
  const auto before = r.bytes();
  auto e = d.push(1, 0);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.error().code(), Errc::invalid_argument);
  EXPECT_NE(e.error().cause().find("buffer id 1 is not the oldest chain in flight (0)"), std::string::npos);
  EXPECT_EQ(d.push_deferred(1, 0).error().code(), Errc::invalid_argument);
  EXPECT_EQ(r.bytes(), before);
  EXPECT_FALSE(d.broken());
  EXPECT_EQ(d.set_in_order(false).error().code(), Errc::busy);
  ASSERT_TRUE(d.push(0, 1).ok());
  ASSERT_TRUE(d.push(1, 1).ok());
  EXPECT_EQ(q.poll().value()->token, 1u);
  EXPECT_EQ(q.poll().value()->token, 2u);
}

// A packed driver queue with chains of 1, 2, 1 descriptors in flight (ids =
// positions 0, 1, 3; tokens 1, 2, 3); the test writes used descriptors.
class PackedInOrderHostile : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(q.set_in_order(true).ok());
    const auto c1 = make_chain(r, 1, 1), c2 = make_chain(r, 2, 2);
    ASSERT_EQ(q.add(c1.out, c1.in, 1).value(), 0);
    ASSERT_EQ(q.add(c2.out, c2.in, 2).value(), 1);
    ASSERT_EQ(q.add(c1.out, c1.in, 3).value(), 3);
    q.publish();
  }
  // A used descriptor for wrap counter 1.
  void used(std::uint16_t pos, std::uint16_t id, std::uint32_t len) {
    r.ring()[pos].id.set(id);
    r.ring()[pos].len.set(len);
    r.ring()[pos].flags.set(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
  }
  void ExpectBroken(const std::string& cause_part) { expect_driver_broken(q, r, cause_part); }

  Region r{8, true};
  PackedQueue q = r.packed_driver();
};

TEST_F(PackedInOrderHostile, Valid) {
  used(0, 1, 32);
  EXPECT_TRUE(q.poll().value()->skipped);
  EXPECT_EQ(q.poll().value()->len, 32u);
  used(3, 3, 0);
  EXPECT_EQ(q.poll().value()->token, 3u);
  EXPECT_EQ(q.free_count(), 8);
}

TEST_F(PackedInOrderHostile, IdNotInFlight) {
  used(0, 6, 0);
  ExpectBroken("used id 6 not in flight");
}

TEST_F(PackedInOrderHostile, IdInsideAChain) {
  used(0, 2, 0);
  ExpectBroken("used id 2 not in flight");
}

TEST_F(PackedInOrderHostile, IdOutOfRange) {
  used(0, 8, 0);
  ExpectBroken("used id 8 out of range");
}

TEST_F(PackedInOrderHostile, IdOfAChainAlreadyCompleted) {
  used(0, 0, 0);
  EXPECT_EQ(q.poll().value()->token, 1u);
  used(1, 0, 0);
  ExpectBroken("used id 0 not in flight");
}

TEST_F(PackedInOrderHostile, LengthBeyondTheLastChain) {
  used(0, 3, 17);
  ExpectBroken("used len 17 exceeds the 16 device-writable bytes of chain 3");
}

TEST_F(PackedInOrderHostile, UsedDescriptorInsideTheBatchIsNotRead) {
  // A batch {0, 1} ends at position 3: a used descriptor the device writes
  // at 1 (inside the batch) is never looked at; position 3 still holds the
  // driver's available descriptor, so nothing more is used.
  used(0, 1, 0);
  used(1, 3, 0);
  EXPECT_EQ(q.poll().value()->token, 1u);
  EXPECT_EQ(q.poll().value()->token, 2u);
  EXPECT_FALSE(q.poll().value());
  EXPECT_FALSE(q.broken());
}

}  // namespace
}  // namespace uvirtio::rings
