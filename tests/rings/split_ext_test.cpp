// Unit tests for the split virtqueue extensions (virtio spec 1.2, 2.7):
// VIRTIO_F_EVENT_IDX on both sides (2.7.7, 2.7.10), indirect descriptors
// (2.7.5.3), in-flight listing and ring reset on the driver, and the device
// role (SplitDeviceQueue) facing a hostile driver.
//
// Driver (SplitQueue) and device (SplitDeviceQueue) talk through shared
// memory. Buffers are given to the device as bus addresses (kBus + offset into
// the arena), which it translates through a window callback, so nothing
// depends on the two sides seeing the memory at the same address; one test
// maps a memfd twice to make that literal, as Linux's vringh_test does.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "support/ring_bytes.hpp"
#include "uvirtio/rings/split.hpp"
#include "uvirtio/rings/split_device.hpp"

namespace uvirtio::rings {
namespace {

constexpr const char* kDrv = "0000:00:04.0 queue 2";
constexpr const char* kDev = "peer 7 queue 2";
constexpr std::uint64_t kBus = 0x100000000ull;

using test::align_up;
using test::load16;
using test::store16;

// Offsets of the ring areas, an indirect pool and a data area.
struct Layout {
  Layout(std::uint16_t n, std::size_t pool_bytes, std::size_t data_bytes) {
    desc = 0;
    avail = align_up(SplitLayout::desc_bytes(n), 16);
    used = align_up(avail + SplitLayout::avail_bytes(n), 16);
    pool = align_up(used + SplitLayout::used_bytes(n), 64);
    data = align_up(pool + pool_bytes, 64);
    total = align_up(data + data_bytes, 4096);
  }
  std::size_t desc, avail, used, pool, data, total;
};

// A device window: bus [kBus, kBus + bytes) maps to `view`; optionally a
// read-only sub-range the device may not write.
SplitDeviceQueue::Translate window(std::uint8_t* view, std::size_t bytes, std::size_t ro_begin = 0,
                                   std::size_t ro_end = 0) {
  return [=](std::uint64_t a, std::uint32_t len, bool writable) -> std::optional<std::span<std::uint8_t>> {
    if (a < kBus) return std::nullopt;
    const std::uint64_t off = a - kBus;
    if (off > bytes || len > bytes - off) return std::nullopt;
    if (writable && off < ro_end && off + len > ro_begin) return std::nullopt;
    return std::span<std::uint8_t>(view + off, len);
  };
}

// One heap arena holding everything; driver and device share it.
struct Arena {
  Arena(std::uint16_t n, std::size_t pool_bytes = 0, std::size_t data_bytes = 4096)
      : size(n), lay(n, pool_bytes, data_bytes) {
    mem.reset(static_cast<std::uint8_t*>(std::aligned_alloc(4096, lay.total)));
    std::memset(mem.get(), 0, lay.total);
  }
  std::uint8_t* at(std::size_t off) const { return mem.get() + off; }
  VirtqDesc* desc() const { return reinterpret_cast<VirtqDesc*>(at(lay.desc)); }
  std::uint8_t* avail() const { return at(lay.avail); }
  std::uint8_t* used() const { return at(lay.used); }
  std::uint8_t* data() const { return at(lay.data); }
  std::uint64_t bus(const void* p) const {
    return kBus + static_cast<std::uint64_t>(static_cast<const std::uint8_t*>(p) - mem.get());
  }
  Result<SplitQueue> driver() const { return SplitQueue::create(size, desc(), avail(), used(), kDrv); }
  Result<SplitDeviceQueue> device() const {
    return SplitDeviceQueue::create(size, desc(), avail(), used(), kDev, window(mem.get(), lay.total));
  }
  std::vector<std::uint8_t> used_area() const {
    return std::vector<std::uint8_t>(used(), used() + SplitLayout::used_bytes(size));
  }
  std::uint16_t used_event() const { return load16(avail() + SplitLayout::used_event_offset(size)); }
  std::uint16_t avail_event() const { return load16(used() + SplitLayout::avail_event_offset(size)); }
  void set_avail_event(std::uint16_t v) const { store16(used() + SplitLayout::avail_event_offset(size), v); }
  std::uint16_t avail_flags() const { return load16(avail()); }
  std::uint16_t used_flags() const { return load16(used()); }
  // As the device: used entry `slot` says (id, len), and the used index
  // covers it.
  void put_used(std::uint16_t slot, std::uint32_t id, std::uint32_t len) const {
    test::store32(used() + 4 + 8 * slot, id);
    test::store32(used() + 8 + 8 * slot, len);
    store16(used() + 2, static_cast<std::uint16_t>(slot + 1));
  }

  std::uint16_t size;
  Layout lay;
  std::unique_ptr<std::uint8_t[], decltype(&std::free)> mem{nullptr, &std::free};
};

// Device echo: each readable byte plus one into the writable buffers.
std::uint32_t echo(const SplitDeviceQueue::Request& r) {
  std::vector<std::uint8_t> src;
  for (auto s : r.readable) src.insert(src.end(), s.begin(), s.end());
  std::uint32_t n = 0;
  for (auto s : r.writable) {
    for (std::size_t j = 0; j < s.size() && n < src.size(); ++j, ++n)
      s[j] = static_cast<std::uint8_t>(src[n] + 1);
  }
  return n;
}

// ---- VIRTIO_F_EVENT_IDX ----

TEST(SplitEventIdx, NeedEventIsWrapSafe) {
  struct Case {
    std::uint16_t event, new_idx, old_idx;
    bool want;
  };
  const Case cases[] = {
      {0, 1, 0, true},
      {0, 2, 1, false},
      {1, 2, 1, true},
      {5, 5, 5, false},
      {4, 9, 5, false},
      {5, 9, 5, true},
      {8, 9, 5, true},
      {9, 9, 5, false},
      {0xffff, 0, 0xfffe, true},
      {0xfffe, 0, 0xffff, false},
      {0xffff, 0, 0xffff, true},
      {0xffff, 1, 0xffff, true},
      {0, 1, 0xffff, true},
      {1, 1, 0xffff, false},
      {0xfffd, 2, 0xfffe, false},
      {0xfffe, 2, 0xfffe, true},
      {1, 2, 0xfffe, true},
      {2, 2, 0xfffe, false},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(vring_need_event(c.event, c.new_idx, c.old_idx), c.want)
        << c.event << " " << c.new_idx << " " << c.old_idx;
  }
}

TEST(SplitEventIdx, PublishKicksOnlyWhenAvailEventIsPassed) {
  Arena a(4);
  auto q = a.driver();
  ASSERT_TRUE(q.ok());
  q->set_event_idx(true);
  const Buffer b[] = {{kBus, 1}};
  ASSERT_TRUE(q->add(b, {}, 1).ok());
  EXPECT_TRUE(q->publish());  // avail_event 0: 0 -> 1 passes it
  ASSERT_TRUE(q->add(b, {}, 2).ok());
  EXPECT_FALSE(q->publish());  // 1 -> 2 does not
  EXPECT_FALSE(q->publish());  // nothing new
  a.set_avail_event(2);
  ASSERT_TRUE(q->add(b, {}, 3).ok());
  EXPECT_TRUE(q->publish());  // 2 -> 3 publishes entry 2
  // NO_NOTIFY in used flags means nothing with EVENT_IDX; avail_event rules.
  store16(a.used(), VIRTQ_USED_F_NO_NOTIFY);
  a.set_avail_event(3);
  ASSERT_TRUE(q->add(b, {}, 4).ok());
  EXPECT_TRUE(q->publish());
  EXPECT_EQ(load16(a.avail() + 2), 4);
}

// Drives the available index to 0xfffe, then checks kicks across the wrap.
TEST(SplitEventIdx, PublishAcrossIndexWrap) {
  Arena a(4);
  auto q = a.driver();
  auto d = a.device();
  ASSERT_TRUE(q.ok() && d.ok());
  q->set_event_idx(true);
  d->set_event_idx(true);
  d->set_notifications(false);  // the device polls: avail_event stays put
  const Buffer b[] = {{kBus + a.lay.data, 1}};
  for (std::uint32_t i = 0; i < 0xfffe; ++i) {
    ASSERT_TRUE(q->add(b, {}, i).ok());
    q->publish();
    auto r = d->pop();
    ASSERT_TRUE(r.ok() && r->has_value());
    ASSERT_TRUE(d->push((*r)->head, 0).ok());
    ASSERT_TRUE(q->poll()->has_value());
  }
  auto add_one = [&] { ASSERT_TRUE(q->add(b, {}, 0).ok()); };
  a.set_avail_event(0xffff);
  add_one();
  EXPECT_FALSE(q->publish());  // 0xfffe -> 0xffff: entry 0xffff not yet published
  add_one();
  EXPECT_TRUE(q->publish());  // 0xffff -> 0: it is
  a.set_avail_event(0);
  add_one();
  EXPECT_TRUE(q->publish());  // 0 -> 1
  add_one();
  EXPECT_FALSE(q->publish());  // 1 -> 2, event 0 already passed
  EXPECT_EQ(load16(a.avail() + 2), 2);
  EXPECT_FALSE(q->broken());
}

TEST(SplitEventIdx, BatchPublishAcrossWrapKicksOnce) {
  Arena a(8);
  auto q = a.driver();
  auto d = a.device();
  ASSERT_TRUE(q.ok() && d.ok());
  q->set_event_idx(true);
  const Buffer b[] = {{kBus + a.lay.data, 1}};
  for (std::uint32_t i = 0; i < 0xfffe; ++i) {
    ASSERT_TRUE(q->add(b, {}, i).ok());
    q->publish();
    auto r = d->pop();
    ASSERT_TRUE(r.ok() && r->has_value());
    ASSERT_TRUE(d->push((*r)->head, 0).ok());
    ASSERT_TRUE(q->poll()->has_value());
  }
  a.set_avail_event(0xffff);
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(q->add(b, {}, 0).ok());
  EXPECT_TRUE(q->publish());  // 0xfffe -> 1 covers 0xffff
  a.set_avail_event(0xfffd);
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(q->add(b, {}, 0).ok());
  EXPECT_FALSE(q->publish());  // 1 -> 4 does not cover 0xfffd
}

TEST(SplitEventIdx, SetInterruptsWritesUsedEventNotFlags) {
  Arena a(8);
  auto q = a.driver();
  auto d = a.device();
  ASSERT_TRUE(q.ok() && d.ok());
  q->set_event_idx(true);
  d->set_event_idx(true);
  EXPECT_EQ(a.avail_flags(), 0);
  const Buffer b[] = {{kBus + a.lay.data, 1}};
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(q->add(b, {}, static_cast<std::uint64_t>(k)).ok());
  q->publish();
  for (int k = 0; k < 3; ++k) {
    auto r = d->pop();
    ASSERT_TRUE(r.ok() && r->has_value());
    ASSERT_TRUE(d->push((*r)->head, 0).ok());
  }
  q->set_interrupts(false);
  EXPECT_EQ(a.avail_flags(), 0);  // 2.7.7.2: flags stay 0
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(q->poll()->has_value());
  EXPECT_EQ(a.used_event(), 0);  // disabled: left alone
  q->set_interrupts(true);
  EXPECT_EQ(a.used_event(), 3);  // last used
  EXPECT_EQ(a.avail_flags(), 0);
  // While enabled, poll keeps used_event at the next entry.
  ASSERT_TRUE(q->add(b, {}, 9).ok());
  q->publish();
  auto r = d->pop();
  ASSERT_TRUE(r.ok() && r->has_value());
  ASSERT_TRUE(d->push((*r)->head, 0).ok());
  ASSERT_TRUE(q->poll()->has_value());
  EXPECT_EQ(a.used_event(), 4);
}

// Device pushes while the driver has interrupts off; the re-arm must report
// the entry instead of letting the driver sleep on an interrupt that the
// device (correctly) will not send.
TEST(SplitEventIdx, EnableInterruptsAndCheckClosesTheRace) {
  for (const bool ev : {true, false}) {
    SCOPED_TRACE(ev ? "event idx" : "flags");
    Arena a(4);
    auto q = a.driver();
    auto d = a.device();
    ASSERT_TRUE(q.ok() && d.ok());
    q->set_event_idx(ev);
    d->set_event_idx(ev);
    const Buffer b[] = {{kBus + a.lay.data, 1}};
    ASSERT_TRUE(q->add(b, {}, 1).ok());
    ASSERT_TRUE(q->add(b, {}, 2).ok());
    q->publish();
    auto r1 = d->pop();
    auto r2 = d->pop();
    ASSERT_TRUE(r1.ok() && r1->has_value() && r2.ok() && r2->has_value());
    EXPECT_FALSE(q->enable_interrupts_and_check());  // nothing yet
    ASSERT_TRUE(d->push((*r1)->head, 0).ok());
    EXPECT_TRUE(d->should_interrupt());
    EXPECT_FALSE(d->should_interrupt());  // nothing new since
    q->set_interrupts(false);
    ASSERT_TRUE(q->poll()->has_value());
    ASSERT_TRUE(d->push((*r2)->head, 0).ok());
    EXPECT_FALSE(d->should_interrupt());  // suppressed
    EXPECT_TRUE(q->enable_interrupts_and_check());
    auto c = q->poll();
    ASSERT_TRUE(c.ok() && c->has_value());
    EXPECT_EQ((*c)->token, 2u);
    EXPECT_FALSE(q->enable_interrupts_and_check());
    if (ev) {
      EXPECT_EQ(a.used_event(), 2);
    }
  }
}

// > 65536 rounds of two chains each: kicks and interrupts follow the exact
// event-index pattern while both 16-bit indices wrap twice.
TEST(SplitEventIdx, KickAndInterruptPatternThroughWrap) {
  Arena a(4);
  auto q = a.driver();
  auto d = a.device();
  ASSERT_TRUE(q.ok() && d.ok());
  q->set_event_idx(true);
  d->set_event_idx(true);
  const Buffer b[] = {{kBus + a.lay.data, 1}};
  std::uint64_t kicks = 0, irqs = 0, token = 0;
  constexpr int kRounds = 70000;
  for (int round = 0; round < kRounds; ++round) {
    ASSERT_TRUE(q->add(b, {}, token++).ok());
    const bool k1 = q->publish();
    ASSERT_TRUE(q->add(b, {}, token++).ok());
    const bool k2 = q->publish();
    ASSERT_TRUE(k1) << round;  // the device re-armed after draining
    ASSERT_FALSE(k2) << round;
    kicks += k1 + k2;
    for (int k = 0; k < 2; ++k) {
      auto r = d->pop();
      ASSERT_TRUE(r.ok() && r->has_value());
      ASSERT_TRUE(d->push((*r)->head, 0).ok());
      const bool irq = d->should_interrupt();
      ASSERT_EQ(irq, k == 0) << round;
      irqs += irq;
    }
    ASSERT_FALSE(d->enable_notifications_and_check());
    for (int k = 0; k < 2; ++k) ASSERT_TRUE(q->poll()->has_value());
    ASSERT_FALSE(q->enable_interrupts_and_check());
  }
  EXPECT_EQ(kicks, static_cast<std::uint64_t>(kRounds));
  EXPECT_EQ(irqs, static_cast<std::uint64_t>(kRounds));
  EXPECT_EQ(load16(a.avail() + 2), static_cast<std::uint16_t>(2 * kRounds));
  EXPECT_EQ(a.avail_event(), static_cast<std::uint16_t>(2 * kRounds));
  EXPECT_EQ(a.used_event(), static_cast<std::uint16_t>(2 * kRounds));
}

TEST(SplitDeviceNotify, FlagsWithoutEventIdx) {
  Arena a(4);
  auto q = a.driver();
  auto d = a.device();
  ASSERT_TRUE(q.ok() && d.ok());
  const Buffer b[] = {{kBus + a.lay.data, 1}};
  d->set_notifications(false);
  EXPECT_EQ(a.used_flags(), VIRTQ_USED_F_NO_NOTIFY);
  ASSERT_TRUE(q->add(b, {}, 1).ok());
  EXPECT_FALSE(q->publish());
  EXPECT_TRUE(d->enable_notifications_and_check());  // the entry that came without a kick
  EXPECT_EQ(a.used_flags(), 0);
  ASSERT_TRUE(d->pop()->has_value());
  EXPECT_FALSE(d->enable_notifications_and_check());
  ASSERT_TRUE(q->add(b, {}, 2).ok());
  EXPECT_TRUE(q->publish());
  // Interrupt flag from the driver side.
  ASSERT_TRUE(d->push(0, 0).ok());
  q->set_interrupts(false);
  EXPECT_FALSE(d->should_interrupt());
  auto r = d->pop();
  ASSERT_TRUE(r.ok() && r->has_value());
  ASSERT_TRUE(d->push((*r)->head, 0).ok());
  q->set_interrupts(true);
  EXPECT_TRUE(d->should_interrupt());
}

TEST(SplitDeviceNotify, AvailEventWithEventIdx) {
  Arena a(4);
  auto q = a.driver();
  auto d = a.device();
  ASSERT_TRUE(q.ok() && d.ok());
  q->set_event_idx(true);
  d->set_event_idx(true);
  const Buffer b[] = {{kBus + a.lay.data, 1}};
  d->set_notifications(false);
  EXPECT_EQ(a.used_flags(), 0);  // 2.7.10.1: flags stay 0
  ASSERT_TRUE(q->add(b, {}, 1).ok());
  ASSERT_TRUE(q->publish());  // event 0 still there
  ASSERT_TRUE(d->pop()->has_value());
  ASSERT_TRUE(q->add(b, {}, 2).ok());
  EXPECT_FALSE(q->publish());  // event 0 passed long ago, no re-arm
  EXPECT_TRUE(d->enable_notifications_and_check());
  EXPECT_EQ(a.avail_event(), 1);
  ASSERT_TRUE(d->pop()->has_value());
  ASSERT_TRUE(d->push(0, 0).ok());
  EXPECT_EQ(a.avail_event(), 2);  // push keeps it at last popped while enabled
  ASSERT_TRUE(q->add(b, {}, 3).ok());
  EXPECT_TRUE(q->publish());
}

// pop_into() reuses the request; push_deferred() entries reach the driver
// only at publish_used(), all at once, and only published ones count for
// interrupts. The available index is read once per batch: entries the
// driver adds meanwhile are seen when the batch is consumed.
TEST(SplitDeviceBatch, DeferredPushPublishesOnceAndPopReusesTheRequest) {
  Arena a(8);
  auto q = a.driver();
  auto d = a.device();
  ASSERT_TRUE(q.ok() && d.ok());
  const Buffer b[] = {{kBus + a.lay.data, 16}};
  for (std::uint64_t t = 1; t <= 3; ++t) ASSERT_TRUE(q->add(b, {}, t).ok());
  q->publish();
  SplitDeviceQueue::Request req;
  std::vector<std::uint16_t> heads;
  for (int i = 0; i < 2; ++i) {
    auto got = d->pop_into(req);
    ASSERT_TRUE(got.ok() && *got);
    ASSERT_EQ(req.readable.size(), 1u);  // cleared between chains, not appended to
    EXPECT_EQ(req.readable_bytes, 16u);
    heads.push_back(req.head);
  }
  // A fourth entry published now is seen after the third.
  ASSERT_TRUE(q->add(b, {}, 4).ok());
  q->publish();
  for (auto h : heads) ASSERT_TRUE(d->push_deferred(h, 0).ok());
  EXPECT_EQ(load16(a.used() + 2), 0);  // nothing visible yet
  EXPECT_FALSE(d->should_interrupt());
  EXPECT_FALSE(q->poll()->has_value());
  d->publish_used();
  EXPECT_EQ(load16(a.used() + 2), 2);
  EXPECT_TRUE(d->should_interrupt());
  EXPECT_FALSE(d->should_interrupt());  // nothing new since
  for (std::uint64_t t = 1; t <= 2; ++t) {
    auto c = q->poll();
    ASSERT_TRUE(c.ok() && c->has_value());
    EXPECT_EQ((*c)->token, t);
  }
  for (int i = 0; i < 2; ++i) {
    auto got = d->pop_into(req);
    ASSERT_TRUE(got.ok() && *got);
    ASSERT_TRUE(d->push(req.head, 0).ok());
  }
  auto none = d->pop_into(req);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(*none);
  EXPECT_EQ(load16(a.used() + 2), 4);
  EXPECT_EQ(d->in_flight(), 0);
}

// A ring resumed at base 5: the device takes the entry at available index 5
// and writes its used entry at index 5.
TEST(SplitDeviceBatch, ResumesAtABase) {
  Arena a(8);
  auto q = a.driver();
  ASSERT_TRUE(q.ok());
  const Buffer b[] = {{kBus + a.lay.data, 16}};
  for (std::uint64_t t = 1; t <= 6; ++t) ASSERT_TRUE(q->add(b, {}, t).ok());
  q->publish();
  auto d = SplitDeviceQueue::create(8, a.desc(), a.avail(), a.used(), "resumed",
                                    window(a.mem.get(), a.lay.total), 5);
  ASSERT_TRUE(d.ok()) << d.error().message();
  const std::uint16_t sixth = load16(a.avail() + 4 + 2 * 5);
  auto r = d->pop();
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->head, sixth);
  EXPECT_FALSE(d->pop()->has_value());
  ASSERT_TRUE(d->push((*r)->head, 0).ok());
  EXPECT_EQ(load16(a.used() + 2), 6);
  std::uint32_t id = 0;
  std::memcpy(&id, a.used() + 4 + 8 * 5, 4);
  EXPECT_EQ(id, sixth);
}

// ---- indirect descriptors ----

struct IndirectFixture {
  explicit IndirectFixture(std::uint16_t n, std::size_t max = 8) : a(n, std::size_t{n} * max * 16, 8192) {
    auto r = a.driver();
    EXPECT_TRUE(r.ok());
    q.emplace(std::move(r).value());
    q->set_indirect(true, max);
    auto p = q->provide_indirect_pool(a.at(a.lay.pool), kBus + a.lay.pool, std::size_t{n} * max * 16);
    EXPECT_TRUE(p.ok()) << p.error().message();
    auto dr = a.device();
    EXPECT_TRUE(dr.ok());
    d.emplace(std::move(dr).value());
    d->set_indirect(true);
  }
  Arena a;
  std::optional<SplitQueue> q;
  std::optional<SplitDeviceQueue> d;
};

TEST(SplitIndirect, AddWritesOneRingDescriptorAndTheTable) {
  IndirectFixture f(8, 4);
  const Buffer out[] = {{0x1000, 16}, {0x2000, 8}};
  const Buffer in[] = {{0x3000, 32}};
  auto h = f.q->add(out, in, 5);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(*h, 0);
  EXPECT_EQ(f.q->free_count(), 7);
  const VirtqDesc& rd = f.a.desc()[0];
  EXPECT_EQ(rd.flags.get(), VIRTQ_DESC_F_INDIRECT);
  EXPECT_EQ(rd.len.get(), 48u);
  EXPECT_EQ(rd.addr.get(), kBus + f.a.lay.pool);
  auto* t = reinterpret_cast<VirtqDesc*>(f.a.at(f.a.lay.pool));
  const std::uint64_t addrs[] = {0x1000, 0x2000, 0x3000};
  const std::uint16_t flags[] = {VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(t[i].addr.get(), addrs[i]);
    EXPECT_EQ(t[i].flags.get(), flags[i]);
    EXPECT_EQ(t[i].next.get(), i < 2 ? i + 1 : 0);
  }
  // Second chain: head 1, table slot 1 (4 entries * 16 bytes further).
  ASSERT_EQ(*f.q->add(out, {}, 6), 1);
  EXPECT_EQ(f.a.desc()[1].addr.get(), kBus + f.a.lay.pool + 64);
  EXPECT_EQ(f.a.desc()[1].len.get(), 32u);
  // One buffer: direct. Five (> max 4): direct chain.
  const Buffer five[] = {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}};
  ASSERT_EQ(*f.q->add(std::span(five, 1), {}, 7), 2);
  EXPECT_EQ(f.a.desc()[2].flags.get(), 0);
  ASSERT_EQ(*f.q->add(five, {}, 8), 3);
  EXPECT_EQ(f.a.desc()[3].flags.get(), VIRTQ_DESC_F_NEXT);
  EXPECT_EQ(f.q->free_count(), 0);
  EXPECT_EQ(f.q->add(std::span(five, 1), {}, 9).error().code(), Errc::busy);
}

TEST(SplitIndirect, ChainLongerThanFreeDescriptorsGoesIndirect) {
  IndirectFixture f(4, 4);
  const Buffer one[] = {{kBus + f.a.lay.data, 1}};
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(f.q->add(one, {}, 0).ok());
  EXPECT_EQ(f.q->free_count(), 1);
  const Buffer four[] = {
      {kBus + f.a.lay.data, 1}, {kBus + f.a.lay.data, 2}, {kBus + f.a.lay.data, 3}, {kBus + f.a.lay.data, 4}};
  auto h = f.q->add(four, {}, 1);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(f.q->free_count(), 0);
  f.q->publish();
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(f.d->pop()->has_value());
  auto r = f.d->pop();
  ASSERT_TRUE(r.ok()) << r.error().message();
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ((*r)->head, *h);
  ASSERT_EQ((*r)->readable.size(), 4u);
  EXPECT_EQ((*r)->readable_bytes, 10u);
}

TEST(SplitIndirect, PoolValidation) {
  Arena a(8, 8 * 8 * 16);
  auto q = a.driver();
  ASSERT_TRUE(q.ok());
  std::uint8_t* pool = a.at(a.lay.pool);
  auto code = [&](void* va, std::uint64_t dev, std::size_t bytes) {
    auto r = q->provide_indirect_pool(va, dev, bytes);
    if (!r.ok()) {
      EXPECT_EQ(r.error().device(), kDrv);
    }
    return r.ok() ? std::optional<Errc>{} : std::optional<Errc>{r.error().code()};
  };
  EXPECT_EQ(code(pool, kBus, 4096), Errc::invalid_argument);  // set_indirect not called
  q->set_indirect(true, 4);
  EXPECT_EQ(code(nullptr, kBus, 4096), Errc::invalid_argument);
  EXPECT_EQ(code(pool + 8, kBus, 4096), Errc::invalid_argument);
  EXPECT_EQ(code(pool, kBus, 8 * 4 * 16 - 1), Errc::invalid_argument);
  EXPECT_EQ(code(pool, ~std::uint64_t{0} - 100, 8 * 4 * 16), Errc::invalid_argument);
  const Buffer b[] = {{1, 1}};
  ASSERT_TRUE(q->add(b, {}, 0).ok());
  EXPECT_EQ(code(pool, kBus, 8 * 4 * 16), Errc::busy);
  ASSERT_TRUE(q->reset_ring().ok());
  EXPECT_EQ(code(pool, kBus, 8 * 4 * 16), std::nullopt);
  // max_indirect above the queue size is clamped to it (2.7.5.3.1).
  q->set_indirect(true, 100);
  EXPECT_EQ(code(pool, kBus, 8 * 8 * 16), std::nullopt);
}

TEST(SplitIndirect, RoundTripMixedChains) {
  IndirectFixture f(8, 4);
  std::uint8_t* data = f.a.data();
  for (std::uint64_t t = 0; t < 2000; ++t) {
    const std::size_t nout = 1 + t % 3, nin = t % 4;
    std::vector<Buffer> out, in;
    std::size_t off = 0;
    std::uint32_t rd = 0, wr = 0;
    for (std::size_t k = 0; k < nout; ++k, off += 64) {
      const auto len = static_cast<std::uint32_t>(1 + (t + k) % 17);
      for (std::uint32_t j = 0; j < len; ++j) data[off + j] = static_cast<std::uint8_t>(t + k + j);
      out.push_back({kBus + f.a.lay.data + off, len});
      rd += len;
    }
    for (std::size_t k = 0; k < nin; ++k, off += 64) {
      std::memset(data + off, 0, 64);
      in.push_back({kBus + f.a.lay.data + off, 8});
      wr += 8;
    }
    ASSERT_TRUE(f.q->add(out, in, t).ok());
    f.q->publish();
    auto r = f.d->pop();
    ASSERT_TRUE(r.ok()) << r.error().message();
    ASSERT_TRUE(r->has_value());
    ASSERT_EQ((*r)->readable.size(), nout);
    ASSERT_EQ((*r)->writable.size(), nin);
    ASSERT_EQ((*r)->writable_bytes, wr);
    const std::uint32_t n = echo(**r);
    ASSERT_TRUE(f.d->push((*r)->head, n).ok());
    auto c = f.q->poll();
    ASSERT_TRUE(c.ok() && c->has_value()) << (c.ok() ? "" : c.error().message());
    ASSERT_EQ((*c)->token, t);
    ASSERT_EQ((*c)->len, std::min(rd, wr));
    // The echoed bytes landed in the driver's writable buffers.
    std::vector<std::uint8_t> src, got;
    for (const Buffer& b : out)
      src.insert(src.end(), data + (b.addr - kBus - f.a.lay.data),
                 data + (b.addr - kBus - f.a.lay.data) + b.len);
    for (const Buffer& b : in)
      got.insert(got.end(), data + (b.addr - kBus - f.a.lay.data),
                 data + (b.addr - kBus - f.a.lay.data) + b.len);
    for (std::size_t j = 0; j < std::min(src.size(), got.size()); ++j) {
      ASSERT_EQ(got[j], static_cast<std::uint8_t>(src[j] + 1)) << t;
    }
    ASSERT_EQ(f.q->free_count(), 8);
  }
}

// Device on its own thread (SplitDeviceQueue, event idx and indirect on both
// sides); tokens and data come back in order, once.
TEST(SplitIndirect, ConcurrentDeviceThread) {
  constexpr std::uint16_t kSize = 16;
  constexpr std::uint64_t kTotal = 100000;
  IndirectFixture f(kSize, 4);
  f.q->set_event_idx(true);
  f.d->set_event_idx(true);
  std::atomic<bool> stop{false};
  std::atomic<bool> dev_failed{false};
  std::thread device([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      auto r = f.d->pop();
      if (!r.ok()) {
        dev_failed = true;
        return;
      }
      if (!r->has_value()) {
        std::this_thread::yield();
        continue;
      }
      if (!f.d->push((*r)->head, echo(**r)).ok()) dev_failed = true;
      (void)f.d->should_interrupt();
    }
  });
  std::uint64_t next_token = 0, next_expected = 0;
  bool failed = false;
  std::uint8_t* data = f.a.data();
  while (next_expected < kTotal && !failed && !dev_failed) {
    bool added = false;
    while (next_token < kTotal && f.q->free_count() >= 1) {
      std::uint8_t* o = data + (next_token % kSize) * 32;
      std::memcpy(o, &next_token, 8);
      std::memset(o + 8, 0, 16);
      const Buffer out[] = {{f.a.bus(o), 4}, {f.a.bus(o + 4), 4}};
      const Buffer in[] = {{f.a.bus(o + 8), 3}, {f.a.bus(o + 11), 5}};
      if (!f.q->add(out, in, next_token).ok()) {
        failed = true;
        break;
      }
      ++next_token;
      added = true;
    }
    if (added) f.q->publish();
    for (;;) {
      auto r = f.q->poll();
      if (!r.ok()) {
        ADD_FAILURE() << r.error().message();
        failed = true;
        break;
      }
      if (!r->has_value()) break;
      if ((*r)->token != next_expected || (*r)->len != 8) {
        ADD_FAILURE() << "token " << (*r)->token << " len " << (*r)->len << ", want " << next_expected;
        failed = true;
        break;
      }
      const std::uint8_t* o = data + (next_expected % kSize) * 32;
      std::uint8_t src[8];
      std::memcpy(src, &next_expected, 8);
      for (int k = 0; k < 8; ++k) {
        if (o[8 + k] != static_cast<std::uint8_t>(src[k] + 1)) {
          ADD_FAILURE() << "bad data for token " << next_expected;
          failed = true;
          break;
        }
      }
      ++next_expected;
    }
    std::this_thread::yield();
  }
  stop = true;
  device.join();
  EXPECT_FALSE(failed);
  EXPECT_FALSE(dev_failed);
  EXPECT_FALSE(f.d->broken());
  EXPECT_EQ(next_expected, kTotal);
  EXPECT_EQ(f.q->free_count(), kSize);
}

// Driver and device see one memfd at two different addresses.
TEST(SplitIndirect, DualMappedMemfd) {
  constexpr std::uint16_t kSize = 8;
  Layout lay(kSize, kSize * 4 * 16, 8192);
  const int fd = memfd_create("uvirtio-split-ext-test", 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, static_cast<off_t>(lay.total)), 0);
  void* va = mmap(nullptr, lay.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  void* vb = mmap(nullptr, lay.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  ASSERT_NE(va, MAP_FAILED);
  ASSERT_NE(vb, MAP_FAILED);
  ASSERT_NE(va, vb);
  auto* drv = static_cast<std::uint8_t*>(va);
  auto* dv = static_cast<std::uint8_t*>(vb);
  auto q = SplitQueue::create(kSize, drv + lay.desc, drv + lay.avail, drv + lay.used, kDrv);
  ASSERT_TRUE(q.ok());
  q->set_event_idx(true);
  q->set_indirect(true, 4);
  ASSERT_TRUE(q->provide_indirect_pool(drv + lay.pool, kBus + lay.pool, kSize * 4 * 16).ok());
  // The device may not write its own ring areas or the tables through buffers.
  auto d = SplitDeviceQueue::create(kSize, dv + lay.desc, dv + lay.avail, dv + lay.used, kDev,
                                    window(dv, lay.total, 0, lay.data));
  ASSERT_TRUE(d.ok());
  d->set_event_idx(true);
  d->set_indirect(true, 4);
  for (std::uint64_t t = 0; t < 200; ++t) {
    const std::size_t off = lay.data + (t % 4) * 512;
    for (std::size_t k = 0; k < 100; ++k) drv[off + k] = static_cast<std::uint8_t>(t + k);
    const Buffer out[] = {{kBus + off, 60}, {kBus + off + 60, 40}};
    const Buffer in[] = {{kBus + off + 100, 50}, {kBus + off + 150, 200}};
    ASSERT_TRUE(q->add(out, in, t).ok());
    if (t % 4 != 3) continue;
    q->publish();
    for (int k = 0; k < 4; ++k) {
      auto r = d->pop();
      ASSERT_TRUE(r.ok()) << r.error().message();
      ASSERT_TRUE(r->has_value());
      for (auto s : (*r)->writable) {
        ASSERT_GE(s.data(), dv + lay.data);
        ASSERT_LE(s.data() + s.size(), dv + lay.total);
      }
      ASSERT_TRUE(d->push((*r)->head, echo(**r)).ok());
    }
    for (std::uint64_t u = t - 3; u <= t; ++u) {
      auto r = q->poll();
      ASSERT_TRUE(r.ok() && r->has_value());
      EXPECT_EQ((*r)->token, u);
      EXPECT_EQ((*r)->len, 100u);
      const std::size_t uo = lay.data + (u % 4) * 512;
      for (std::size_t k = 0; k < 100; ++k)
        ASSERT_EQ(drv[uo + 100 + k], static_cast<std::uint8_t>(u + k + 1)) << u;
    }
  }
  EXPECT_EQ(q->free_count(), kSize);
  munmap(va, lay.total);
  munmap(vb, lay.total);
}

// ---- in-flight listing and reset ----

TEST(SplitOutstanding, TokensInSubmissionOrder) {
  Arena a(8);
  auto q = a.driver();
  auto d = a.device();
  ASSERT_TRUE(q.ok() && d.ok());
  EXPECT_TRUE(q->outstanding_tokens().empty());
  const Buffer b[] = {{kBus + a.lay.data, 1}};
  const Buffer b2[] = {{kBus + a.lay.data, 1}, {kBus + a.lay.data, 1}};
  ASSERT_EQ(*q->add(b, {}, 30), 0);
  ASSERT_EQ(*q->add(b2, {}, 20), 1);
  ASSERT_EQ(*q->add(b, {}, 10), 3);
  EXPECT_EQ(q->outstanding_tokens(), (std::vector<std::uint64_t>{30, 20, 10}));
  q->publish();
  auto r0 = d->pop();
  auto r1 = d->pop();
  ASSERT_TRUE(r0.ok() && r0->has_value() && r1.ok() && r1->has_value());
  ASSERT_TRUE(d->push(0, 0).ok());
  ASSERT_EQ((*q->poll())->token, 30u);
  EXPECT_EQ(q->outstanding_tokens(), (std::vector<std::uint64_t>{20, 10}));
  ASSERT_EQ(*q->add(b, {}, 5), 0);  // head 0 reused, but submitted last
  EXPECT_EQ(q->outstanding_tokens(), (std::vector<std::uint64_t>{20, 10, 5}));
  ASSERT_TRUE(d->push(1, 0).ok());
  ASSERT_EQ((*q->poll())->token, 20u);
  EXPECT_EQ(q->outstanding_tokens(), (std::vector<std::uint64_t>{10, 5}));
}

TEST(SplitOutstanding, ResetRingForgetsEverythingAndRecoversFromBroken) {
  IndirectFixture f(8, 4);
  f.q->set_event_idx(true);
  const Buffer b[] = {{kBus + f.a.lay.data, 4}};
  const Buffer b3[] = {{kBus + f.a.lay.data, 4}, {kBus + f.a.lay.data, 4}, {kBus + f.a.lay.data, 4}};
  ASSERT_TRUE(f.q->add(b, {}, 1).ok());
  ASSERT_TRUE(f.q->add(b3, {}, 2).ok());
  f.q->publish();
  // A hostile device breaks the queue.
  store16(f.a.used() + 2, 100);
  ASSERT_EQ(f.q->poll().error().code(), Errc::bad_device_data);
  ASSERT_TRUE(f.q->broken());
  EXPECT_EQ(f.q->outstanding_tokens(), (std::vector<std::uint64_t>{1, 2}));  // what was lost
  ASSERT_TRUE(f.q->reset_ring().ok());
  EXPECT_FALSE(f.q->broken());
  EXPECT_TRUE(f.q->outstanding_tokens().empty());
  EXPECT_EQ(f.q->free_count(), 8);
  for (std::size_t i = 0; i < f.a.lay.pool; ++i) ASSERT_EQ(f.a.mem[i], 0) << i;  // ring memory zeroed
  // The device side restarts too (a new queue after the reset).
  auto dr = f.a.device();
  ASSERT_TRUE(dr.ok());
  f.d.emplace(std::move(dr).value());
  f.d->set_indirect(true);
  f.d->set_event_idx(true);
  // Resubmit: indirect still configured, event idx still on; the heads that
  // were in flight (0 and 1) are handed out last.
  ASSERT_EQ(*f.q->add(b3, {}, 3), 2);
  ASSERT_EQ(*f.q->add(b, {}, 4), 3);
  EXPECT_EQ(f.a.desc()[2].flags.get(), VIRTQ_DESC_F_INDIRECT);
  EXPECT_TRUE(f.q->publish());
  for (int k = 0; k < 2; ++k) {
    auto r = f.d->pop();
    ASSERT_TRUE(r.ok() && r->has_value());
    ASSERT_TRUE(f.d->push((*r)->head, 0).ok());
  }
  EXPECT_EQ((*f.q->poll())->token, 3u);
  EXPECT_EQ((*f.q->poll())->token, 4u);
  EXPECT_EQ(f.a.used_event(), 2);
}

// A device that completes, after its reset, a request from before it (QEMU
// 7.2's virtio-pmem does with a flush still running in its thread pool):
// the head of the dropped request is handed out last, and its one late
// completion is dropped instead of completing the new request that would
// otherwise have the same head. A second one, or any other id not in
// flight, is still an error.
TEST(SplitOutstanding, StaleCompletionAfterResetIsNotTakenForANewRequest) {
  Arena a(8);
  auto q = a.driver();
  ASSERT_TRUE(q.ok());
  const Buffer in[] = {{kBus + a.lay.data, 4}};
  ASSERT_EQ(*q->add({}, in, 1), 0);
  q->publish();
  ASSERT_TRUE(q->reset_ring().ok());  // the device was reset with head 0 in flight
  auto head = q->add({}, in, 2);
  ASSERT_TRUE(head.ok());
  EXPECT_NE(*head, 0) << "the head of the dropped request came back first";
  q->publish();
  a.put_used(0, 0, 4);  // the old request's completion lands in the new ring
  auto c = q->poll();
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_FALSE(c->has_value()) << "a stale completion was taken for request " << (**c).token;
  EXPECT_EQ(q->stale_dropped(), 1u);
  a.put_used(1, *head, 0);  // the new request's own
  c = q->poll();
  ASSERT_TRUE(c.ok() && c->has_value()) << (c.ok() ? "nothing" : c.error().message());
  EXPECT_EQ((**c).token, 2u);
  a.put_used(2, 0, 4);  // the same stale id again: not once more
  c = q->poll();
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().code(), Errc::bad_device_data);
  EXPECT_NE(c.error().message().find("used id 0 not in flight"), std::string::npos) << c.error().message();

  // start_ids_at: only on an idle queue, and within the ring.
  ASSERT_TRUE(q->reset_ring().ok());
  EXPECT_EQ(q->start_ids_at(8).error().code(), Errc::invalid_argument);
  ASSERT_TRUE(q->start_ids_at(5).ok());
  EXPECT_EQ(*q->add({}, in, 3), 5);
  EXPECT_EQ(q->start_ids_at(0).error().code(), Errc::invalid_argument) << "a request is in flight";
  // Ids wrap: 6, 7, then 0.
  EXPECT_EQ(*q->add({}, in, 4), 6);
  EXPECT_EQ(*q->add({}, in, 5), 7);
  EXPECT_EQ(*q->add({}, in, 6), 0);
}

// set_in_order() rebuilds the free list; turned off (or set again off), it
// must keep the ids still marked stale last, as relinking does, or a new
// request takes an id whose late completion is still to come.
TEST(SplitOutstanding, SetInOrderOffKeepsStaleIdsLast) {
  Arena a(8);
  auto q = a.driver();
  ASSERT_TRUE(q.ok());
  const std::uint16_t stale[] = {0, 1};
  ASSERT_TRUE(q->adopt_stale(0, stale).ok());
  ASSERT_TRUE(q->set_in_order(false).ok());
  const Buffer in[] = {{kBus + a.lay.data, 4}};
  std::vector<std::uint16_t> order;
  for (std::uint64_t t = 0; t < 8; ++t) {
    auto id = q->add({}, in, t);
    ASSERT_TRUE(id.ok()) << id.error().message();
    order.push_back(*id);
  }
  EXPECT_EQ(order, (std::vector<std::uint16_t>{2, 3, 4, 5, 6, 7, 0, 1}));
}

// Turned on, in-order allocation starts at descriptor 0 (2.7.5) whatever ids
// are still marked stale: an in-order device expects its first chain there.
TEST(SplitOutstanding, SetInOrderOnStartsAtDescriptorZeroDespiteStaleIds) {
  Arena a(8);
  auto q = a.driver();
  ASSERT_TRUE(q.ok());
  const std::uint16_t stale[] = {0, 1};
  ASSERT_TRUE(q->adopt_stale(0, stale).ok());
  ASSERT_TRUE(q->set_in_order(true).ok());
  auto dev = a.device();
  ASSERT_TRUE(dev.ok());
  ASSERT_TRUE(dev->set_in_order(true).ok());
  const Buffer in[] = {{kBus + a.lay.data, 4}};
  auto head = q->add({}, in, 1);
  ASSERT_TRUE(head.ok()) << head.error().message();
  EXPECT_EQ(*head, 0) << "in-order allocation did not start at offset 0";
  q->publish();
  auto r = dev->pop();
  ASSERT_TRUE(r.ok()) << r.error().message();
  ASSERT_TRUE(r->has_value());
  ASSERT_TRUE(dev->push((**r).head, 4).ok());
  auto c = q->poll();
  ASSERT_TRUE(c.ok() && c->has_value()) << (c.ok() ? "nothing" : c.error().message());
  EXPECT_EQ((**c).token, 1u);
}

// In-order chains take descriptors in ring order, not along the free list:
// ending the stale marks of a chain's descriptors must walk the ring too,
// not the free-list links (whose end is the queue size, one past stale_).
TEST(SplitOutstanding, InOrderChainsEndStaleMarksInRingOrder) {
  Arena a(64);
  auto q = a.driver();
  ASSERT_TRUE(q.ok());
  const std::uint16_t stale[] = {1, 3};
  ASSERT_TRUE(q->adopt_stale(0, stale).ok());
  ASSERT_TRUE(q->set_in_order(true).ok());
  const Buffer one[] = {{kBus + a.lay.data, 4}};
  const Buffer two[] = {{kBus + a.lay.data, 4}, {kBus + a.lay.data + 4, 4}};
  EXPECT_EQ(*q->add({}, two, 1), 0);  // descriptors 0 and 1
  EXPECT_EQ(*q->add({}, one, 2), 2);
  EXPECT_EQ(*q->add({}, two, 3), 3);  // descriptors 3 and 4
  EXPECT_FALSE(q->id_outstanding(1)) << "descriptor 1 is in use, its stale mark must end";
  EXPECT_FALSE(q->id_outstanding(4));
}

// Ids an earlier owner of the queue left in flight (Virtqueue reads them from
// its in-flight ledger): a fresh queue hands them out after every other id,
// and drops one late completion of each, like reset_ring(). Completions
// carry the head id that add() returned.
TEST(SplitOutstanding, AdoptedStaleIdsComeLastAndOneLateCompletionOfEachIsDropped) {
  Arena a(8);
  auto q = a.driver();
  ASSERT_TRUE(q.ok());
  const std::uint16_t stale[] = {3, 5};
  EXPECT_EQ(q->adopt_stale(8, stale).error().code(), Errc::invalid_argument) << "first id out of range";
  const std::uint16_t too_big[] = {8};
  EXPECT_EQ(q->adopt_stale(0, too_big).error().code(), Errc::invalid_argument) << "id out of range";
  ASSERT_TRUE(q->adopt_stale(2, stale).ok());
  const Buffer in[] = {{kBus + a.lay.data, 4}};
  std::vector<std::uint16_t> order;
  for (std::uint64_t t = 0; t < 8; ++t) {
    auto id = q->add({}, in, t);
    ASSERT_TRUE(id.ok()) << id.error().message();
    order.push_back(*id);
  }
  EXPECT_EQ(order, (std::vector<std::uint16_t>{2, 4, 6, 7, 0, 1, 3, 5}));
  EXPECT_EQ(q->adopt_stale(0, stale).error().code(), Errc::invalid_argument) << "requests in flight";
  q->publish();
  // Handing 3 and 5 out again ended their marks: their used entries now
  // complete the new requests.
  a.put_used(0, 3, 4);
  auto c = q->poll();
  ASSERT_TRUE(c.ok() && c->has_value()) << (c.ok() ? "nothing" : c.error().message());
  EXPECT_EQ((**c).token, 6u);
  EXPECT_EQ((**c).id, 3);
  EXPECT_EQ(q->stale_dropped(), 0u);

  // A fresh queue whose earlier owner had id 1 in flight: its late
  // completion is dropped once, then the new request's own arrives.
  Arena b(4);
  auto r = b.driver();
  ASSERT_TRUE(r.ok());
  const std::uint16_t one[] = {1};
  ASSERT_TRUE(r->adopt_stale(1, one).ok());
  const Buffer in_b[] = {{kBus + b.lay.data, 4}};
  auto head = r->add({}, in_b, 42);
  ASSERT_TRUE(head.ok());
  EXPECT_EQ(*head, 2) << "the stale id came first";
  r->publish();
  b.put_used(0, 1, 4);
  c = r->poll();
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_FALSE(c->has_value()) << "the earlier owner's completion was taken for request " << (**c).token;
  EXPECT_EQ(r->stale_dropped(), 1u);
  b.put_used(1, 2, 4);
  c = r->poll();
  ASSERT_TRUE(c.ok() && c->has_value()) << (c.ok() ? "nothing" : c.error().message());
  EXPECT_EQ((**c).token, 42u);
  EXPECT_EQ((**c).id, 2);
  b.put_used(2, 1, 4);  // not twice
  c = r->poll();
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.error().message().find("used id 1 not in flight"), std::string::npos) << c.error().message();
}

// A stale mark ends when its id is handed out again: the used entry then
// belongs to the new chain.
TEST(SplitOutstanding, StaleMarkEndsWhenTheIdIsHandedOutAgain) {
  Arena a(2);
  auto q = a.driver();
  ASSERT_TRUE(q.ok());
  const Buffer in[] = {{kBus + a.lay.data, 4}};
  ASSERT_EQ(*q->add({}, in, 1), 0);
  ASSERT_TRUE(q->reset_ring().ok());
  EXPECT_EQ(*q->add({}, in, 2), 1);
  EXPECT_EQ(*q->add({}, in, 3), 0) << "ring full: the stale id is handed out";
  q->publish();
  a.put_used(0, 0, 4);
  auto c = q->poll();
  ASSERT_TRUE(c.ok() && c->has_value()) << (c.ok() ? "nothing" : c.error().message());
  EXPECT_EQ((**c).token, 3u) << "id 0 is request 3's now";
  EXPECT_EQ(q->stale_dropped(), 0u);
}

// A device that answers with a late completion for every stale id at once
// (a whole 32768-entry ring of them, after adopt_stale() of an earlier
// owner's ids): each is dropped, and dropping them must not nest one call
// per entry (that overflows the stack of a Debug build).
TEST(SplitOutstanding, ARingFullOfStaleCompletionsIsDroppedWithoutDeepRecursion) {
  constexpr std::uint16_t kSize = 32768;
  Arena a(kSize);
  auto q = a.driver();
  ASSERT_TRUE(q.ok());
  std::vector<std::uint16_t> ids(kSize);
  for (std::uint32_t i = 0; i < kSize; ++i) ids[i] = static_cast<std::uint16_t>(i);
  ASSERT_TRUE(q->adopt_stale(0, ids).ok());
  for (std::uint32_t i = 0; i < kSize; ++i) {
    test::store32(a.used() + 4 + 8 * i, i);
    test::store32(a.used() + 8 + 8 * i, 0);
  }
  store16(a.used() + 2, kSize);
  auto c = q->poll();
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_FALSE(c->has_value());
  EXPECT_EQ(q->stale_dropped(), kSize);
}

// ---- device role: push and pop details ----

TEST(SplitDevice, CreateValidates) {
  Arena a(8);
  auto xl = window(a.mem.get(), a.lay.total);
  EXPECT_EQ(SplitDeviceQueue::create(6, a.desc(), a.avail(), a.used(), kDev, xl).error().code(),
            Errc::invalid_argument);
  EXPECT_EQ(SplitDeviceQueue::create(8, nullptr, a.avail(), a.used(), kDev, xl).error().code(),
            Errc::invalid_argument);
  EXPECT_EQ(SplitDeviceQueue::create(8, a.at(8), a.avail(), a.used(), kDev, xl).error().code(),
            Errc::invalid_argument);
  auto e = SplitDeviceQueue::create(8, a.desc(), a.avail(), a.used(), kDev, {});
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.error().device(), kDev);
  // create() leaves the driver's memory alone.
  std::memset(a.mem.get(), 0x77, a.lay.data);
  ASSERT_TRUE(SplitDeviceQueue::create(8, a.desc(), a.avail(), a.used(), kDev, xl).ok());
  for (std::size_t i = 0; i < a.lay.data; ++i) ASSERT_EQ(a.mem[i], 0x77);
}

TEST(SplitDevice, PushRejectsCallerMistakesWithoutBreaking) {
  Arena a(4);
  auto q = a.driver();
  auto d = a.device();
  ASSERT_TRUE(q.ok() && d.ok());
  const Buffer out[] = {{kBus + a.lay.data, 4}};
  const Buffer in[] = {{kBus + a.lay.data + 64, 10}};
  ASSERT_TRUE(q->add(out, in, 1).ok());
  q->publish();
  EXPECT_TRUE(d->has_avail());
  auto r = d->pop();
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_FALSE(d->has_avail());
  EXPECT_EQ(d->in_flight(), 1);
  const auto before = a.used_area();
  for (auto [head, len] : {std::pair<std::uint16_t, std::uint32_t>{1, 0}, {4, 0}, {0, 11}}) {
    auto p = d->push(head, len);
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.error().code(), Errc::invalid_argument);
    EXPECT_EQ(p.error().device(), kDev);
  }
  EXPECT_EQ(a.used_area(), before);
  EXPECT_FALSE(d->broken());
  ASSERT_TRUE(d->push(0, 10).ok());
  EXPECT_EQ(d->push(0, 0).error().code(), Errc::invalid_argument);  // twice
  auto c = q->poll();
  ASSERT_TRUE(c.ok() && c->has_value());
  EXPECT_EQ((*c)->len, 10u);
}

// The loop bound is exact: a chain using every descriptor is legal.
TEST(SplitDevice, AcceptsAChainOfQueueSizeDescriptors) {
  Arena a(8);
  auto d = a.device();
  ASSERT_TRUE(d.ok());
  for (std::uint16_t i = 0; i < 8; ++i) {
    a.desc()[i].addr.set(kBus + a.lay.data + 8u * i);
    a.desc()[i].len.set(8);
    a.desc()[i].flags.set(static_cast<std::uint16_t>(i != 5 ? VIRTQ_DESC_F_NEXT : 0));
    a.desc()[i].next.set(static_cast<std::uint16_t>((i + 3) % 8));  // 0 3 6 1 4 7 2 5
  }
  store16(a.avail() + 4, 0);
  store16(a.avail() + 2, 1);
  auto r = d->pop();
  ASSERT_TRUE(r.ok()) << r.error().message();
  ASSERT_TRUE(r->has_value());
  ASSERT_EQ((*r)->readable.size(), 8u);
  EXPECT_EQ((*r)->readable[1].data(), a.data() + 24);
  EXPECT_EQ((*r)->readable_bytes, 64u);
}

TEST(SplitDevice, AcceptsZeroLengthBuffersAndDirectThenIndirect) {
  Arena a(8, 0, 4096);
  auto d = a.device();
  ASSERT_TRUE(d.ok());
  d->set_indirect(true);
  VirtqDesc* t = a.desc();
  auto set = [](VirtqDesc& x, std::uint64_t ad, std::uint32_t l, std::uint16_t fl, std::uint16_t nx) {
    x.addr.set(ad);
    x.len.set(l);
    x.flags.set(fl);
    x.next.set(nx);
  };
  // 2.7.5.3.2: normal descriptors followed by one indirect; the WRITE flag of
  // the indirect descriptor is ignored. The table sits in the data area.
  auto* table = reinterpret_cast<VirtqDesc*>(a.data());
  set(table[0], kBus + a.lay.data + 256, 8, VIRTQ_DESC_F_NEXT, 1);
  set(table[1], kBus + a.lay.data + 512, 16, VIRTQ_DESC_F_WRITE, 0);
  set(t[5], 0xdead0000, 0, VIRTQ_DESC_F_NEXT, 6);  // zero length: not translated
  set(t[6], kBus + a.lay.data + 128, 4, VIRTQ_DESC_F_NEXT, 2);
  set(t[2], kBus + a.lay.data, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, 0);
  store16(a.avail() + 4, 5);
  store16(a.avail() + 2, 1);
  auto r = d->pop();
  ASSERT_TRUE(r.ok()) << r.error().message();
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ((*r)->head, 5);
  ASSERT_EQ((*r)->readable.size(), 3u);
  EXPECT_EQ((*r)->readable[0].size(), 0u);
  EXPECT_EQ((*r)->readable[1].data(), a.data() + 128);
  EXPECT_EQ((*r)->readable[2].data(), a.data() + 256);
  ASSERT_EQ((*r)->writable.size(), 1u);
  EXPECT_EQ((*r)->writable[0].data(), a.data() + 512);
  EXPECT_EQ((*r)->writable[0].size(), 16u);
  EXPECT_EQ((*r)->readable_bytes, 12u);
  EXPECT_EQ((*r)->writable_bytes, 16u);
}

// ---- device role: hostile driver ----

// Head 0 (one readable 8-byte buffer) is popped and held; each test then
// writes something bad for avail slot 1 and pops again.
class SplitDeviceHostile : public ::testing::Test {
 protected:
  void SetUp() override {
    auto r = a.device();
    ASSERT_TRUE(r.ok());
    d.emplace(std::move(r).value());
    d->set_event_idx(true);
    d->set_indirect(true);
    set(0, data(0), 8, 0, 0);
    offer(0);
    auto p = d->pop();
    ASSERT_TRUE(p.ok() && p->has_value());
    std::memset(a.used(), 0xC5, SplitLayout::used_bytes(a.size));  // anything: it must stay as is
  }
  std::uint64_t data(std::size_t off) const { return kBus + a.lay.data + off; }
  void set(std::uint16_t i, std::uint64_t ad, std::uint32_t len, std::uint16_t flags, std::uint16_t next) {
    set_desc(a.desc()[i], ad, len, flags, next);
  }
  static void set_desc(VirtqDesc& x, std::uint64_t ad, std::uint32_t len, std::uint16_t flags,
                       std::uint16_t next) {
    x.addr.set(ad);
    x.len.set(len);
    x.flags.set(flags);
    x.next.set(next);
  }
  VirtqDesc* table(std::size_t off) const { return reinterpret_cast<VirtqDesc*>(a.data() + off); }
  // Puts `head` in the next avail slot and publishes it.
  void offer(std::uint16_t head) {
    store16(a.avail() + 4 + 2 * (avail_idx % a.size), head);
    store16(a.avail() + 2, ++avail_idx);
  }

  void ExpectBroken(const std::string& cause_part) {
    const auto used_before = a.used_area();
    auto r = d->pop();
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Errc::bad_device_data);
    EXPECT_EQ(r.error().device(), kDev);
    EXPECT_EQ(r.error().op(), "pop available ring");
    EXPECT_NE(r.error().cause().find(cause_part), std::string::npos) << r.error().cause();
    EXPECT_EQ(r.error().message().rfind(std::string(kDev) + ": pop available ring: ", 0), 0u);
    EXPECT_TRUE(d->broken());
    // Later calls fail with broken and write nothing, even valid ones.
    auto p = d->pop();
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.error().code(), Errc::broken);
    EXPECT_EQ(p.error().device(), kDev);
    auto u = d->push(0, 0);
    ASSERT_FALSE(u.ok());
    EXPECT_EQ(u.error().code(), Errc::broken);
    EXPECT_EQ(u.error().device(), kDev);
    EXPECT_FALSE(d->has_avail());
    EXPECT_FALSE(d->should_interrupt());
    d->set_notifications(true);
    d->set_notifications(false);
    EXPECT_FALSE(d->enable_notifications_and_check());
    EXPECT_EQ(a.used_area(), used_before);
  }

  Arena a{8, 0, 8192};
  std::optional<SplitDeviceQueue> d;
  std::uint16_t avail_idx = 0;
};

TEST_F(SplitDeviceHostile, AvailIndexJumpsAhead) {
  store16(a.avail() + 2, 1 + 9);
  ExpectBroken("available index 10 is 9 entries ahead of the last seen 1 (queue size 8)");
}

TEST_F(SplitDeviceHostile, AvailIndexGoesBackwards) {
  store16(a.avail() + 2, 0);
  ExpectBroken("65535 entries ahead");
}

TEST_F(SplitDeviceHostile, HeadOutOfRange) {
  offer(8);
  ExpectBroken("head 8 out of range");
}

TEST_F(SplitDeviceHostile, HeadAlreadyInFlight) {
  offer(0);
  ExpectBroken("head 0 is already in flight");
}

TEST_F(SplitDeviceHostile, DescriptorLoop) {
  set(1, data(0), 4, VIRTQ_DESC_F_NEXT, 2);
  set(2, data(0), 4, VIRTQ_DESC_F_NEXT, 1);
  offer(1);
  ExpectBroken("chain from head 1 is longer than the queue size 8 (loop)");
}

TEST_F(SplitDeviceHostile, SelfLoop) {
  set(3, data(0), 4, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 3);
  offer(3);
  ExpectBroken("(loop)");
}

TEST_F(SplitDeviceHostile, NextOutOfRange) {
  set(1, data(0), 4, VIRTQ_DESC_F_NEXT, 8);
  offer(1);
  ExpectBroken("descriptor 1: next 8 out of range");
}

TEST_F(SplitDeviceHostile, WritableBeforeReadable) {
  set(1, data(0), 4, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
  set(2, data(64), 4, 0, 0);
  offer(1);
  ExpectBroken("readable descriptor after a writable one");
}

TEST_F(SplitDeviceHostile, WritableBeforeReadableAcrossIndirect) {
  set_desc(table(0)[0], data(64), 4, 0, 0);
  set(1, data(128), 4, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
  set(2, data(0), 16, VIRTQ_DESC_F_INDIRECT, 0);
  offer(1);
  ExpectBroken("readable descriptor after a writable one");
}

class SplitDeviceHostileIndirectLen : public SplitDeviceHostile,
                                      public ::testing::WithParamInterface<std::uint32_t> {};

TEST_P(SplitDeviceHostileIndirectLen, IndirectTableOfBadLength) {
  for (int k = 0; k < 9; ++k) set_desc(table(0)[k], data(512), 4, 0, 0);
  set(1, data(0), GetParam(), VIRTQ_DESC_F_INDIRECT, 0);
  offer(1);
  ExpectBroken("indirect table of descriptor 1 has bad length " + std::to_string(GetParam()));
}
INSTANTIATE_TEST_SUITE_P(SplitDeviceLens, SplitDeviceHostileIndirectLen,
                         ::testing::Values(0u, 8u, 24u, 17u, 9u * 16u, 0xFFFFFFF0u));

TEST_F(SplitDeviceHostile, NestedIndirect) {
  set_desc(table(0)[0], data(512), 4, VIRTQ_DESC_F_NEXT, 1);
  set_desc(table(0)[1], data(256), 16, VIRTQ_DESC_F_INDIRECT, 0);
  set(1, data(0), 32, VIRTQ_DESC_F_INDIRECT, 0);
  offer(1);
  ExpectBroken("entry 1 is itself indirect");
}

TEST_F(SplitDeviceHostile, IndirectWithNext) {
  set_desc(table(0)[0], data(512), 4, 0, 0);
  set(1, data(0), 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 2);
  set(2, data(512), 4, 0, 0);
  offer(1);
  ExpectBroken("indirect descriptor 1 also has NEXT");
}

TEST_F(SplitDeviceHostile, IndirectWithoutTheFeature) {
  d->set_indirect(false);
  set_desc(table(0)[0], data(512), 4, 0, 0);
  set(1, data(0), 16, VIRTQ_DESC_F_INDIRECT, 0);
  offer(1);
  ExpectBroken("VIRTIO_F_INDIRECT_DESC is off");
}

TEST_F(SplitDeviceHostile, IndirectTableLoops) {
  set_desc(table(0)[0], data(512), 4, VIRTQ_DESC_F_NEXT, 1);
  set_desc(table(0)[1], data(512), 4, VIRTQ_DESC_F_NEXT, 0);
  set(1, data(0), 32, VIRTQ_DESC_F_INDIRECT, 0);
  offer(1);
  ExpectBroken("indirect table of descriptor 1 loops");
}

TEST_F(SplitDeviceHostile, IndirectNextOutOfRange) {
  set_desc(table(0)[0], data(512), 4, VIRTQ_DESC_F_NEXT, 2);  // table has 2 entries
  set(1, data(0), 32, VIRTQ_DESC_F_INDIRECT, 0);
  offer(1);
  ExpectBroken("entry 0 next 2 out of range");
}

TEST_F(SplitDeviceHostile, UntranslatableBuffer) {
  set(1, data(0), 4, VIRTQ_DESC_F_NEXT, 2);
  set(2, 0x1000, 4, VIRTQ_DESC_F_WRITE, 0);
  offer(1);
  ExpectBroken("writable buffer at 0x1000 (4 bytes) is not mapped");
}

TEST_F(SplitDeviceHostile, BufferRunsPastTheWindow) {
  set(1, kBus + a.lay.total - 4, 5, 0, 0);
  offer(1);
  ExpectBroken("readable buffer at");
}

TEST_F(SplitDeviceHostile, BufferAddressWraps) {
  set(1, ~std::uint64_t{0} - 1, 16, 0, 0);
  offer(1);
  ExpectBroken("is not mapped");
}

TEST_F(SplitDeviceHostile, UntranslatableIndirectTable) {
  set(1, kBus + a.lay.total, 16, VIRTQ_DESC_F_INDIRECT, 0);
  offer(1);
  ExpectBroken("indirect table of descriptor 1 at 0x");
}

TEST_F(SplitDeviceHostile, UntranslatableBufferInsideIndirectTable) {
  set_desc(table(0)[0], data(512), 4, VIRTQ_DESC_F_NEXT, 1);
  set_desc(table(0)[1], 0x42, 4, VIRTQ_DESC_F_WRITE, 0);
  set(1, data(0), 32, VIRTQ_DESC_F_INDIRECT, 0);
  offer(1);
  ExpectBroken("writable buffer at 0x42 (4 bytes) is not mapped");
}

TEST_F(SplitDeviceHostile, MisalignedIndirectTable) {
  set(1, data(4), 16, VIRTQ_DESC_F_INDIRECT, 0);
  offer(1);
  ExpectBroken("is not 8-byte aligned");
}

// 2.7.5.1: more than 2^32 bytes in one chain. The translation here maps
// anything (the spans are never touched), so only the length check can stop it.
TEST(SplitDeviceHostileTotal, ChainLongerThanFourGiB) {
  Arena a(8);
  static std::uint8_t dummy[1];
  auto d = SplitDeviceQueue::create(
      8, a.desc(), a.avail(), a.used(), kDev, [](std::uint64_t, std::uint32_t len, bool) {
        return std::optional<std::span<std::uint8_t>>(std::span<std::uint8_t>(dummy, len));
      });
  ASSERT_TRUE(d.ok());
  for (std::uint16_t i = 0; i < 3; ++i) {
    a.desc()[i].addr.set(kBus);
    a.desc()[i].len.set(0x7FFFFFFF);
    a.desc()[i].flags.set(static_cast<std::uint16_t>(i < 2 ? VIRTQ_DESC_F_NEXT : 0));
    a.desc()[i].next.set(static_cast<std::uint16_t>(i + 1));
  }
  a.desc()[2].len.set(2);  // exactly 2^32: allowed
  store16(a.avail() + 2, 1);
  const auto before = a.used_area();
  auto first = d->pop();
  ASSERT_TRUE(first.ok()) << first.error().message();
  EXPECT_EQ((*first)->readable_bytes, std::uint64_t{1} << 32);
  a.desc()[2].len.set(3);  // one more
  store16(a.avail() + 4 + 2, 0);
  ASSERT_TRUE(d->push(0, 0).ok());
  store16(a.avail() + 2, 2);
  auto r = d->pop();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::bad_device_data);
  EXPECT_NE(r.error().cause().find("longer than 2^32 bytes"), std::string::npos);
  EXPECT_TRUE(d->broken());
  EXPECT_EQ(d->pop().error().code(), Errc::broken);
}

}  // namespace
}  // namespace uvirtio::rings
