// Unit tests for the packed virtqueue extensions (virtio spec 1.2, 2.8):
// VIRTIO_F_EVENT_IDX in both event suppression areas (2.8.10, 2.8.14) and
// indirect descriptor tables (2.8.7, 2.8.19), in the driver role (PackedQueue)
// and the device role (PackedDeviceQueue), alone against hand-written memory
// and against each other.
//
// Everything lives in one arena: descriptor ring, both event areas, the
// driver's indirect table pool and a data area. The device reaches buffers
// and tables through bus addresses (kBus + arena offset) and a window
// callback that refuses anything outside the arena and device writes outside
// the data area, so "address outside memory" is a real translation failure.
//
// Event index is checked three ways: packed_need_event() against an oracle
// that walks the ring positions one by one; exact kick/interrupt patterns
// through thousands of wrap-counter flips; and loopbacks (event idx on/off x
// indirect on/off) in which each side only works after a notification or a
// successful re-check, so one lost notification stalls the run and fails it.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "uvirtio/rings/packed.hpp"
#include "uvirtio/rings/packed_device.hpp"

namespace uvirtio::rings {
namespace {

constexpr const char* kName = "peer 3 queue 5";
constexpr std::uint64_t kBus = 0x20'0000'0000;

std::size_t align_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

// Ring, event areas, indirect pool (`max_indirect` entries per id) and data.
struct Arena {
  Arena(std::uint16_t n, std::size_t max_indirect = 0, std::size_t data_bytes = 8192)
      : size(n), max(max_indirect) {
    drv_off = align_up(PackedLayout::desc_bytes(n), 16);
    dev_off = drv_off + 16;
    pool_off = align_up(dev_off + 16, 64);
    pool_bytes = std::size_t{n} * std::max<std::size_t>(max_indirect, 1) * sizeof(PvirtqDesc);
    data_off = align_up(pool_off + pool_bytes, 64);
    data_bytes_ = data_bytes;
    total = align_up(data_off + data_bytes, 4096);
    mem.reset(static_cast<std::uint8_t*>(std::aligned_alloc(4096, total)));
    std::memset(mem.get(), 0, total);
  }
  std::uint8_t* at(std::size_t off) const { return mem.get() + off; }
  PvirtqDesc* ring() const { return reinterpret_cast<PvirtqDesc*>(at(0)); }
  PvirtqEventSuppress* drv_ev() const { return reinterpret_cast<PvirtqEventSuppress*>(at(drv_off)); }
  PvirtqEventSuppress* dev_ev() const { return reinterpret_cast<PvirtqEventSuppress*>(at(dev_off)); }
  std::uint8_t* pool() const { return at(pool_off); }
  std::uint8_t* data() const { return at(data_off); }
  std::uint64_t bus(const void* p) const {
    return kBus + static_cast<std::uint64_t>(static_cast<const std::uint8_t*>(p) - mem.get());
  }
  std::uint64_t data_bus(std::size_t off) const { return kBus + data_off + off; }
  std::vector<std::uint8_t> bytes() const { return {mem.get(), mem.get() + total}; }

  // The device may read the whole arena and write only the data area.
  PackedDeviceQueue::Translate window() const {
    std::uint8_t* base = mem.get();
    const std::size_t bytes = total, writable_from = data_off;
    return [=](std::uint64_t a, std::uint32_t len, bool writable) -> std::optional<std::span<std::uint8_t>> {
      if (a < kBus) return std::nullopt;
      const std::uint64_t off = a - kBus;
      if (off > bytes || len > bytes - off) return std::nullopt;
      if (writable && off < writable_from) return std::nullopt;
      return std::span<std::uint8_t>(base + off, len);
    };
  }
  Result<PackedQueue> driver() const { return PackedQueue::create(size, ring(), drv_ev(), dev_ev(), kName); }
  Result<PackedDeviceQueue> device() const {
    return PackedDeviceQueue::create(size, ring(), drv_ev(), dev_ev(), kName, window());
  }
  // A driver with indirect tables of `max` entries from the arena's pool.
  PackedQueue indirect_driver() const {
    PackedQueue q = driver().value();
    q.set_indirect(true, max);
    auto r = q.provide_indirect_pool(pool(), bus(pool()), pool_bytes);
    EXPECT_TRUE(r.ok()) << r.error().message();
    return q;
  }

  std::uint16_t size;
  std::size_t max;
  std::size_t drv_off, dev_off, pool_off, pool_bytes, data_off, data_bytes_, total;
  std::unique_ptr<std::uint8_t[], decltype(&std::free)> mem{nullptr, &std::free};
};

std::uint16_t ev_flags(const PvirtqEventSuppress* e) { return e->flags.get(); }
std::uint16_t ev_desc(const PvirtqEventSuppress* e) { return e->desc.get(); }
void set_ev(PvirtqEventSuppress* e, std::uint16_t flags, std::uint16_t desc) {
  e->desc.set(desc);
  e->flags.set(flags);
}

// Flags a driver with wrap counter `wrap` writes to make a descriptor available.
std::uint16_t avail(bool wrap) { return wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED; }

void put(PvirtqDesc& d, std::uint64_t addr, std::uint32_t len, std::uint16_t id, std::uint16_t flags) {
  d.addr.set(addr);
  d.len.set(len);
  d.id.set(id);
  d.flags.set(flags);
}

// Device echo: each readable byte plus one into the writable buffers.
std::uint32_t echo(const PackedDeviceQueue::Request& r) {
  std::vector<std::uint8_t> src;
  for (auto s : r.readable) src.insert(src.end(), s.begin(), s.end());
  std::uint32_t n = 0;
  for (auto s : r.writable) {
    for (std::size_t j = 0; j < s.size() && n < src.size(); ++j, ++n)
      s[j] = static_cast<std::uint8_t>(src[n] + 1);
  }
  return n;
}

// ---- the event test itself ----

// Oracle: walk back `moved` positions from (pos, wrap) one at a time and see
// whether (off, off_wrap's wrap bit) is among them.
bool walk_back_oracle(std::uint16_t off_wrap, std::uint16_t size, std::uint16_t pos, bool wrap,
                      std::uint32_t moved) {
  const std::uint16_t off = off_wrap & RING_EVENT_OFF_MASK;
  const bool ev_wrap = (off_wrap & RING_EVENT_WRAP) != 0;
  if (off >= size || moved >= size) return true;  // the documented fail-safe cases
  std::uint16_t p = pos;
  bool w = wrap;
  for (std::uint32_t i = 0; i < moved; ++i) {
    if (p == 0) {
      p = static_cast<std::uint16_t>(size - 1);
      w = !w;
    } else {
      --p;
    }
    if (p == off && w == ev_wrap) return true;
  }
  return false;
}

// Linux's formulation (virtqueue_kick_prepare_packed): the split-ring test in
// 16-bit arithmetic, with an event in the other lap moved back by the size.
bool linux_style(std::uint16_t off_wrap, std::uint16_t size, std::uint16_t pos, bool wrap,
                 std::uint32_t moved) {
  auto event = static_cast<std::uint16_t>(off_wrap & RING_EVENT_OFF_MASK);
  if (((off_wrap & RING_EVENT_WRAP) != 0) != wrap) event = static_cast<std::uint16_t>(event - size);
  return vring_need_event(event, pos, static_cast<std::uint16_t>(pos - moved));
}

TEST(PackedNeedEvent, NamedCases) {
  const std::uint16_t w1 = RING_EVENT_WRAP;
  struct Case {
    std::uint16_t off_wrap, size, pos;
    bool wrap;
    std::uint32_t moved;
    bool want;
    const char* what;
  };
  const Case cases[] = {
      {2 | w1, 8, 3, true, 1, true, "the position just written"},
      {3 | w1, 8, 3, true, 1, false, "the next position, not yet written"},
      {1 | w1, 8, 3, true, 1, false, "written before this batch"},
      {1 | w1, 8, 3, true, 2, true, "first of a batch of two"},
      {0 | w1, 8, 3, true, 3, true, "first of a batch of three from 0"},
      {2 | w1, 8, 3, true, 0, false, "nothing moved"},
      // Just flipped to wrap 0 at position 1: written were 6, 7 (wrap 1) and 0 (wrap 0).
      {7 | w1, 8, 1, false, 3, true, "last position of the previous lap"},
      {6 | w1, 8, 1, false, 3, true, "earlier in the previous lap"},
      {5 | w1, 8, 1, false, 3, false, "before the batch, previous lap"},
      {0, 8, 1, false, 3, true, "first position of the new lap"},
      {0 | w1, 8, 1, false, 3, false, "position 0 of the previous lap was long ago"},
      {7, 8, 1, false, 3, false, "position 7 with the new counter is a lap ahead"},
      {1, 8, 1, false, 3, false, "the next position in the new lap"},
      // Offsets the ring does not have, and batches of a whole ring: notify.
      {8 | w1, 8, 3, true, 1, true, "offset == size"},
      {RING_EVENT_OFF_MASK, 8, 3, true, 1, true, "offset 0x7fff"},
      {RING_EVENT_OFF_MASK | w1, 8, 3, true, 0, true, "bad offset, even with nothing moved"},
      {1 | w1, 8, 3, true, 8, true, "a whole ring moved"},
      {1 | w1, 8, 3, true, 100000, true, "more than a ring moved"},
      // Largest ring.
      {32767 | w1, 32768, 0, false, 1, true, "32768: last position, previous lap"},
      {32767, 32768, 0, false, 1, false, "32768: last position, this lap (ahead)"},
      {0, 32768, 0, false, 32767, false, "32768: position 0 of this lap not yet written"},
      {0 | w1, 32768, 0, false, 32767, false, "32768: position 0 of the previous lap, before the batch"},
      {1 | w1, 32768, 0, false, 32767, true, "32768: position 1 of the previous lap, first of the batch"},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(packed_need_event(c.off_wrap, c.size, c.pos, c.wrap, c.moved), c.want) << c.what;
    EXPECT_EQ(walk_back_oracle(c.off_wrap, c.size, c.pos, c.wrap, c.moved), c.want) << c.what;
  }
}

TEST(PackedNeedEvent, ExhaustiveSmallRingsMatchTheOracleAndLinux) {
  for (std::uint16_t size = 1; size <= 9; ++size) {
    for (std::uint32_t off = 0; off <= size; ++off) {  // including the invalid offset == size
      for (const bool ev_wrap : {false, true}) {
        const auto ow = static_cast<std::uint16_t>(off | (ev_wrap ? RING_EVENT_WRAP : 0));
        for (std::uint16_t pos = 0; pos < size; ++pos) {
          for (const bool wrap : {false, true}) {
            for (std::uint32_t moved = 0; moved <= size + 1u; ++moved) {
              const bool got = packed_need_event(ow, size, pos, wrap, moved);
              ASSERT_EQ(got, walk_back_oracle(ow, size, pos, wrap, moved))
                  << "size " << size << " off " << off << "/" << ev_wrap << " pos " << pos << "/" << wrap
                  << " moved " << moved;
              if (off < size && moved < size) {
                ASSERT_EQ(got, linux_style(ow, size, pos, wrap, moved))
                    << "size " << size << " off " << off << "/" << ev_wrap << " pos " << pos << "/" << wrap;
              }
            }
          }
        }
      }
    }
  }
}

TEST(PackedNeedEvent, RandomLargeRingsMatchTheOracleAndLinux) {
  std::mt19937 rng(17);
  for (int i = 0; i < 200000; ++i) {
    const auto size = static_cast<std::uint16_t>(1 + rng() % 32768);
    const auto off = static_cast<std::uint16_t>(rng() % size);
    const auto ow = static_cast<std::uint16_t>(off | ((rng() & 1) ? RING_EVENT_WRAP : 0));
    const auto pos = static_cast<std::uint16_t>(rng() % size);
    const bool wrap = (rng() & 1) != 0;
    // Mostly short batches (where the answer is interesting), some long ones.
    const auto moved = static_cast<std::uint32_t>((rng() & 3) != 0 ? rng() % std::min<std::uint32_t>(size, 8)
                                                                   : rng() % size);
    const bool got = packed_need_event(ow, size, pos, wrap, moved);
    ASSERT_EQ(got, linux_style(ow, size, pos, wrap, moved))
        << size << " " << ow << " " << pos << " " << moved;
    if (moved < 64) {
      ASSERT_EQ(got, walk_back_oracle(ow, size, pos, wrap, moved));
    }
  }
}

TEST(PackedEventWanted, FlagValues) {
  const auto desc_hit = packed_off_wrap(2, true);   // written by a batch ending at 3/wrap 1
  const auto desc_miss = packed_off_wrap(5, true);  // not written
  EXPECT_TRUE(packed_event_wanted(RING_EVENT_FLAGS_ENABLE, desc_miss, true, 8, 3, true, 1));
  EXPECT_TRUE(packed_event_wanted(RING_EVENT_FLAGS_ENABLE, desc_miss, false, 8, 3, true, 0));
  EXPECT_FALSE(packed_event_wanted(RING_EVENT_FLAGS_DISABLE, desc_hit, true, 8, 3, true, 1));
  EXPECT_TRUE(packed_event_wanted(RING_EVENT_FLAGS_DESC, desc_hit, true, 8, 3, true, 1));
  EXPECT_FALSE(packed_event_wanted(RING_EVENT_FLAGS_DESC, desc_miss, true, 8, 3, true, 1));
  // DESC without EVENT_IDX is not defined (2.8.10): notify.
  EXPECT_TRUE(packed_event_wanted(RING_EVENT_FLAGS_DESC, desc_miss, false, 8, 3, true, 1));
  // The reserved value 3 and reserved bits 2-15: notify, whatever the low bits say.
  EXPECT_TRUE(packed_event_wanted(3, desc_miss, true, 8, 3, true, 1));
  EXPECT_TRUE(packed_event_wanted(RING_EVENT_FLAGS_DISABLE | 0x8000, desc_miss, true, 8, 3, true, 1));
  EXPECT_TRUE(packed_event_wanted(RING_EVENT_FLAGS_DESC | 0x0004, desc_miss, true, 8, 3, true, 1));
  EXPECT_TRUE(packed_event_wanted(0xFFFF, desc_miss, true, 8, 3, true, 1));
  // DESC with an offset outside the ring: notify.
  EXPECT_TRUE(packed_event_wanted(RING_EVENT_FLAGS_DESC, packed_off_wrap(8, true), true, 8, 3, true, 1));
  EXPECT_EQ(packed_off_wrap(5, true), 0x8005);
  EXPECT_EQ(packed_off_wrap(0x7fff, false), 0x7fff);
}

// ---- driver role: kicks ----

// Completes everything the driver made available, leaving the device's own
// event area alone (event idx off and set_notifications never called).
void drain(PackedDeviceQueue& dev, PackedQueue& drv) {
  for (;;) {
    auto r = dev.pop();
    ASSERT_TRUE(r.ok()) << r.error().message();
    if (!r->has_value()) break;
    ASSERT_TRUE(dev.push((*r)->head, 0).ok());
  }
  for (;;) {
    auto c = drv.poll();
    ASSERT_TRUE(c.ok()) << c.error().message();
    if (!c->has_value()) break;
  }
}

TEST(PackedEventIdxDriver, PublishKicksOnlyWhenTheDeviceOffsetIsPassed) {
  Arena a(4);
  auto q = a.driver().value();
  auto dev = a.device().value();
  q.set_event_idx(true);
  const Buffer b[] = {{a.data_bus(0), 1}};
  ASSERT_TRUE(q.add(b, {}, 1).ok());
  EXPECT_TRUE(q.publish());  // zeroed area: ENABLE
  set_ev(a.dev_ev(), RING_EVENT_FLAGS_DESC, packed_off_wrap(1, true));
  ASSERT_TRUE(q.add(b, {}, 2).ok());  // position 1
  EXPECT_TRUE(q.publish());
  ASSERT_TRUE(q.add(b, {}, 3).ok());  // position 2
  EXPECT_FALSE(q.publish());
  EXPECT_FALSE(q.publish());  // nothing new
  drain(dev, q);
  // Next lap's position 0 named before the driver gets there.
  set_ev(a.dev_ev(), RING_EVENT_FLAGS_DESC, packed_off_wrap(0, false));
  ASSERT_TRUE(q.add(b, {}, 4).ok());  // position 3, wrap 1
  EXPECT_FALSE(q.publish());
  ASSERT_TRUE(q.add(b, {}, 5).ok());  // position 0, wrap 0
  ASSERT_TRUE(q.add(b, {}, 6).ok());  // position 1, wrap 0
  EXPECT_TRUE(q.publish());           // the batch covered it
  // The same offset with the old wrap counter is a whole lap behind.
  drain(dev, q);
  set_ev(a.dev_ev(), RING_EVENT_FLAGS_DESC, packed_off_wrap(2, true));
  ASSERT_TRUE(q.add(b, {}, 7).ok());  // position 2, wrap 0
  EXPECT_FALSE(q.publish());
  // DISABLE overrides any offset.
  set_ev(a.dev_ev(), RING_EVENT_FLAGS_DISABLE, packed_off_wrap(3, false));
  ASSERT_TRUE(q.add(b, {}, 8).ok());  // position 3, wrap 0
  EXPECT_FALSE(q.publish());
  EXPECT_FALSE(q.broken());
}

// Hostile or confused device values in the device area: every undefined
// value asks for a kick, none breaks the queue, none changes what we write.
TEST(PackedEventIdxDriver, UndefinedDeviceAreaValuesKickAndNeverBreak) {
  for (const bool ev : {true, false}) {
    SCOPED_TRACE(ev ? "event idx" : "no event idx");
    Arena a(5);
    auto q = a.driver().value();
    auto dev = a.device().value();
    q.set_event_idx(ev);
    const Buffer b[] = {{a.data_bus(0), 1}};
    struct V {
      std::uint16_t flags, desc;
      bool kick_with_ev;  // without event idx every non-DISABLE value kicks
    };
    const V values[] = {
        {RING_EVENT_FLAGS_DESC, packed_off_wrap(5, true), true},   // offset == size
        {RING_EVENT_FLAGS_DESC, packed_off_wrap(5, false), true},  // offset == size, other counter
        {RING_EVENT_FLAGS_DESC, 0x7fff, true},                     // offset far outside
        {RING_EVENT_FLAGS_DESC, 0xffff, true},
        {3, packed_off_wrap(4, true), true},           // reserved value
        {RING_EVENT_FLAGS_DISABLE | 0x0100, 0, true},  // DISABLE with a reserved bit
        {RING_EVENT_FLAGS_DESC | 0x8000, packed_off_wrap(4, true), true},
        {RING_EVENT_FLAGS_DESC, packed_off_wrap(4, false), false},  // valid, not passed: no kick
    };
    std::uint16_t pos = 0;  // the driver's next position, modelled
    bool wrap = true;
    for (int round = 0; round < 20; ++round) {
      for (const V& v : values) {
        set_ev(a.dev_ev(), v.flags, v.desc);
        ASSERT_TRUE(q.add(b, {}, 0).ok());
        if (++pos == 5) {
          pos = 0;
          wrap = !wrap;
        }
        const auto drv_area = std::vector<std::uint8_t>(a.at(a.drv_off), a.at(a.drv_off) + 4);
        // Without event idx every value but exactly DISABLE kicks; with it
        // the one valid DESC value kicks only when its descriptor was written.
        const bool want = !ev || v.kick_with_ev || walk_back_oracle(v.desc, 5, pos, wrap, 1);
        EXPECT_EQ(q.publish(), want) << "flags " << v.flags << " desc " << v.desc;
        EXPECT_EQ(std::vector<std::uint8_t>(a.at(a.drv_off), a.at(a.drv_off) + 4), drv_area);
        drain(dev, q);
      }
    }
    EXPECT_FALSE(q.broken());
  }
}

// Kick decisions through thousands of wrap-counter flips of a 5-entry ring,
// with chains of 1-3 descriptors (crossing the ring end), batches of several
// chains per publish and a device offset chosen near the driver's position,
// checked against the position-walking oracle.
TEST(PackedEventIdxDriver, KickDecisionsMatchTheOracleThroughManyWraps) {
  for (const bool indirect : {false, true}) {
    SCOPED_TRACE(indirect ? "indirect" : "direct");
    constexpr std::uint16_t kSize = 5;
    Arena a(kSize, 4);
    PackedQueue q = indirect ? a.indirect_driver() : a.driver().value();
    auto dev = a.device().value();
    dev.set_indirect(true);
    q.set_event_idx(true);
    std::mt19937 rng(indirect ? 5 : 6);
    std::uint16_t pos = 0;  // our model of the driver's next position
    bool wrap = true;
    std::uint64_t kicks = 0, flips = 0;
    for (int it = 0; it < 20000; ++it) {
      // The device names a position at most one lap around ours.
      const auto off = static_cast<std::uint16_t>(rng() % kSize);
      const bool ev_wrap = (rng() & 1) != 0;
      set_ev(a.dev_ev(), RING_EVENT_FLAGS_DESC, packed_off_wrap(off, ev_wrap));
      std::uint32_t moved = 0;
      const unsigned chains = 1 + rng() % 2;
      for (unsigned c = 0; c < chains; ++c) {
        const std::size_t n = 1 + rng() % 3;
        if (n > q.free_count()) break;
        std::vector<Buffer> bufs(n, Buffer{a.data_bus(0), 1});
        ASSERT_TRUE(q.add(bufs, {}, 0).ok());
        const std::uint32_t positions = indirect && n > 1 ? 1 : static_cast<std::uint32_t>(n);
        moved += positions;
        for (std::uint32_t k = 0; k < positions; ++k) {
          if (++pos == kSize) {
            pos = 0;
            wrap = !wrap;
            ++flips;
          }
        }
      }
      const bool want = walk_back_oracle(packed_off_wrap(off, ev_wrap), kSize, pos, wrap, moved);
      const bool got = q.publish();
      ASSERT_EQ(got, want) << "iteration " << it << " off " << off << "/" << ev_wrap << " pos " << pos << "/"
                           << wrap << " moved " << moved;
      kicks += got;
      drain(dev, q);
      ASSERT_FALSE(q.broken());
    }
    EXPECT_GT(flips, 1000u);
    EXPECT_GT(kicks, 1000u);
    EXPECT_LT(kicks, 19000u);
  }
}

// ---- driver role: interrupts ----

TEST(PackedEventIdxDriver, SetInterruptsWritesDescWithTheNextUsedPosition) {
  Arena a(4);
  auto q = a.driver().value();
  auto dev = a.device().value();
  EXPECT_EQ(ev_flags(a.drv_ev()), RING_EVENT_FLAGS_ENABLE);
  q.set_event_idx(true);
  EXPECT_EQ(ev_flags(a.drv_ev()), RING_EVENT_FLAGS_DESC);
  EXPECT_EQ(ev_desc(a.drv_ev()), packed_off_wrap(0, true));
  q.set_interrupts(false);
  EXPECT_EQ(ev_flags(a.drv_ev()), RING_EVENT_FLAGS_DISABLE);  // valid with EVENT_IDX too
  const Buffer b[] = {{a.data_bus(0), 1}};
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(q.add(b, {}, static_cast<std::uint64_t>(k)).ok());
  for (int k = 0; k < 3; ++k) {
    auto r = dev.pop().value();
    ASSERT_TRUE(r.has_value());
    ASSERT_TRUE(dev.push(r->head, 0).ok());
  }
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(q.poll().value().has_value());
  EXPECT_EQ(ev_desc(a.drv_ev()), packed_off_wrap(0, true));  // disabled: left alone
  EXPECT_EQ(ev_flags(a.drv_ev()), RING_EVENT_FLAGS_DISABLE);
  q.set_interrupts(true);
  EXPECT_EQ(ev_flags(a.drv_ev()), RING_EVENT_FLAGS_DESC);
  EXPECT_EQ(ev_desc(a.drv_ev()), packed_off_wrap(3, true));
  // While enabled, poll keeps the offset at the next used position, and the
  // wrap bit follows the flip at the ring end.
  ASSERT_TRUE(q.add(b, {}, 10).ok());  // position 3
  ASSERT_TRUE(q.add(b, {}, 11).ok());  // position 0, next lap
  for (int k = 0; k < 2; ++k) {
    auto r = dev.pop().value();
    ASSERT_TRUE(r.has_value());
    ASSERT_TRUE(dev.push(r->head, 0).ok());
  }
  ASSERT_TRUE(q.poll().value().has_value());
  EXPECT_EQ(ev_desc(a.drv_ev()), packed_off_wrap(0, false));
  ASSERT_TRUE(q.poll().value().has_value());
  EXPECT_EQ(ev_desc(a.drv_ev()), packed_off_wrap(1, false));
  EXPECT_FALSE(q.poll().value().has_value());
  EXPECT_EQ(ev_desc(a.drv_ev()), packed_off_wrap(1, false));
  // What we write comes from our shadow state, never from memory.
  set_ev(a.drv_ev(), 0xFFFF, 0x1234);
  q.set_interrupts(true);
  EXPECT_EQ(ev_flags(a.drv_ev()), RING_EVENT_FLAGS_DESC);
  EXPECT_EQ(ev_desc(a.drv_ev()), packed_off_wrap(1, false));
  // Event index off again: plain ENABLE; on while disabled: stays DISABLE.
  q.set_event_idx(false);
  EXPECT_EQ(ev_flags(a.drv_ev()), RING_EVENT_FLAGS_ENABLE);
  q.set_interrupts(false);
  q.set_event_idx(true);
  EXPECT_EQ(ev_flags(a.drv_ev()), RING_EVENT_FLAGS_DISABLE);
  EXPECT_TRUE(q.event_idx());
}

// Device pushes while the driver has interrupts off; the re-arm must report
// the descriptor instead of letting the driver sleep on an interrupt that the
// device (correctly) will not send.
TEST(PackedEventIdxLoopback, EnableInterruptsAndCheckClosesTheRace) {
  for (const bool ev : {true, false}) {
    SCOPED_TRACE(ev ? "event idx" : "flags");
    Arena a(4);
    auto q = a.driver().value();
    auto d = a.device().value();
    q.set_event_idx(ev);
    d.set_event_idx(ev);
    const Buffer b[] = {{a.data_bus(0), 1}};
    ASSERT_TRUE(q.add(b, {}, 1).ok());
    ASSERT_TRUE(q.add(b, {}, 2).ok());
    EXPECT_TRUE(q.publish());
    auto r1 = d.pop().value();
    auto r2 = d.pop().value();
    ASSERT_TRUE(r1.has_value() && r2.has_value());
    EXPECT_FALSE(q.enable_interrupts_and_check());  // nothing yet
    ASSERT_TRUE(d.push(r1->head, 0).ok());
    EXPECT_TRUE(d.should_interrupt());
    EXPECT_FALSE(d.should_interrupt());  // nothing new since
    q.set_interrupts(false);
    ASSERT_TRUE(q.poll().value().has_value());
    ASSERT_TRUE(d.push(r2->head, 0).ok());
    EXPECT_FALSE(d.should_interrupt());  // suppressed
    EXPECT_TRUE(q.enable_interrupts_and_check());
    auto c = q.poll().value();
    ASSERT_TRUE(c.has_value());
    EXPECT_EQ(c->token, 2u);
    EXPECT_FALSE(q.enable_interrupts_and_check());
    if (ev) {
      EXPECT_EQ(ev_desc(a.drv_ev()), packed_off_wrap(2, true));
      EXPECT_EQ(ev_flags(a.drv_ev()), RING_EVENT_FLAGS_DESC);
    }
  }
}

// ---- device role: interrupts and the device area ----

TEST(PackedEventIdxDevice, InterruptOnlyWhenTheDriverOffsetIsPassed) {
  Arena a(4);
  auto q = a.driver().value();  // event idx off: it never writes its area below
  auto d = a.device().value();
  d.set_event_idx(true);
  const Buffer b[] = {{a.data_bus(0), 1}};
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(q.add(b, {}, static_cast<std::uint64_t>(k)).ok());
  std::vector<std::uint16_t> ids;
  for (int k = 0; k < 3; ++k) ids.push_back(d.pop().value()->head);
  set_ev(a.drv_ev(), RING_EVENT_FLAGS_DESC, packed_off_wrap(1, true));
  ASSERT_TRUE(d.push(ids[0], 0).ok());  // used position 0
  EXPECT_FALSE(d.should_interrupt());
  ASSERT_TRUE(d.push(ids[1], 0).ok());  // used position 1: the named one
  EXPECT_TRUE(d.should_interrupt());
  ASSERT_TRUE(d.push(ids[2], 0).ok());
  EXPECT_FALSE(d.should_interrupt());
  EXPECT_FALSE(d.should_interrupt());  // nothing pushed
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(q.poll().value().has_value());
  // Across the flip: the driver waits for position 0 of the next lap.
  set_ev(a.drv_ev(), RING_EVENT_FLAGS_DESC, packed_off_wrap(0, false));
  ASSERT_TRUE(q.add(b, {}, 3).ok());  // position 3
  ASSERT_TRUE(q.add(b, {}, 4).ok());  // position 0, wrap 0
  ids = {d.pop().value()->head, d.pop().value()->head};
  ASSERT_TRUE(d.push(ids[0], 0).ok());
  EXPECT_FALSE(d.should_interrupt());
  ASSERT_TRUE(d.push(ids[1], 0).ok());
  EXPECT_TRUE(d.should_interrupt());
  for (int k = 0; k < 2; ++k) ASSERT_TRUE(q.poll().value().has_value());
  // A batch covering the position interrupts once.
  set_ev(a.drv_ev(), RING_EVENT_FLAGS_DESC, packed_off_wrap(2, false));
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(q.add(b, {}, 5).ok());  // positions 1, 2, 3
  ids = {d.pop().value()->head, d.pop().value()->head, d.pop().value()->head};
  for (auto id : ids) ASSERT_TRUE(d.push(id, 0).ok());
  EXPECT_TRUE(d.should_interrupt());
  EXPECT_FALSE(d.should_interrupt());
  EXPECT_FALSE(d.broken());
}

TEST(PackedEventIdxDevice, UndefinedDriverAreaValuesInterruptAndNeverBreak) {
  Arena a(4);
  auto q = a.driver().value();
  auto d = a.device().value();
  d.set_event_idx(true);
  const Buffer b[] = {{a.data_bus(0), 1}};
  struct V {
    std::uint16_t flags, desc;
    bool want;
  };
  const V values[] = {
      {RING_EVENT_FLAGS_DESC, packed_off_wrap(4, true), true},  // offset == size
      {RING_EVENT_FLAGS_DESC, 0x7fff, true},                    // far outside
      {3, 0, true},                                             // reserved value
      {RING_EVENT_FLAGS_DISABLE | 0x4000, 0, true},             // reserved bit
      {RING_EVENT_FLAGS_DISABLE, packed_off_wrap(4, true), false},
      {RING_EVENT_FLAGS_ENABLE, 0x7fff, true},
  };
  for (int round = 0; round < 10; ++round) {
    for (const V& v : values) {
      ASSERT_TRUE(q.add(b, {}, 0).ok());
      auto r = d.pop().value();
      ASSERT_TRUE(r.has_value());
      set_ev(a.drv_ev(), v.flags, v.desc);
      ASSERT_TRUE(d.push(r->head, 0).ok());
      const auto before = a.bytes();
      EXPECT_EQ(d.should_interrupt(), v.want) << v.flags << " " << v.desc;
      EXPECT_EQ(a.bytes(), before) << "reading the area writes nothing";
      ASSERT_TRUE(q.poll().value().has_value());
    }
  }
  // DESC when the device has no EVENT_IDX: undefined, interrupt.
  d.set_event_idx(false);
  set_ev(a.drv_ev(), RING_EVENT_FLAGS_DESC, packed_off_wrap(3, false));
  ASSERT_TRUE(q.add(b, {}, 0).ok());
  ASSERT_TRUE(d.push(d.pop().value()->head, 0).ok());
  EXPECT_TRUE(d.should_interrupt());
  EXPECT_FALSE(d.broken());
  EXPECT_FALSE(q.broken());
}

TEST(PackedEventIdxDevice, DeviceAreaFollowsPopsWhileEnabled) {
  Arena a(3);
  auto q = a.driver().value();
  set_ev(a.dev_ev(), 0, 0);
  const auto before = a.bytes();
  auto d = a.device().value();
  EXPECT_EQ(a.bytes(), before);  // create() writes nothing
  d.set_event_idx(true);         // notifications are on: DESC at our position
  EXPECT_EQ(ev_flags(a.dev_ev()), RING_EVENT_FLAGS_DESC);
  EXPECT_EQ(ev_desc(a.dev_ev()), packed_off_wrap(0, true));
  d.set_notifications(false);
  EXPECT_EQ(ev_flags(a.dev_ev()), RING_EVENT_FLAGS_DISABLE);
  const Buffer two[] = {{a.data_bus(0), 1}, {a.data_bus(8), 1}};
  ASSERT_TRUE(q.add(two, {}, 1).ok());  // positions 0, 1
  EXPECT_FALSE(q.publish());
  auto r = d.pop().value();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(ev_desc(a.dev_ev()), packed_off_wrap(0, true));  // disabled: left alone
  EXPECT_FALSE(d.enable_notifications_and_check());
  EXPECT_EQ(ev_flags(a.dev_ev()), RING_EVENT_FLAGS_DESC);
  EXPECT_EQ(ev_desc(a.dev_ev()), packed_off_wrap(2, true));
  ASSERT_TRUE(d.push(r->head, 0).ok());
  ASSERT_TRUE(q.poll().value().has_value());
  ASSERT_TRUE(q.add(two, {}, 2).ok());  // positions 2, 0 (wrap 0)
  EXPECT_TRUE(q.publish());             // position 2 was named
  ASSERT_TRUE(d.pop().value().has_value());
  EXPECT_EQ(ev_desc(a.dev_ev()), packed_off_wrap(1, false));  // pop moved it across the flip
  EXPECT_EQ(q.add(two, {}, 3).error().code(), Errc::busy);    // one position left
  d.set_event_idx(false);
  EXPECT_EQ(ev_flags(a.dev_ev()), RING_EVENT_FLAGS_ENABLE);
  EXPECT_FALSE(d.broken());
}

// ---- exact patterns through wrap-counter flips ----

struct Pattern {
  std::uint16_t size;
  std::size_t chain;  // buffers per chain
  bool indirect;
};

// Each round: two chains published separately (the first kicks, the second
// not), the device takes both and pushes them one at a time (the first
// interrupts, the second not), re-arms, the driver drains and re-arms. Small
// odd rings flip the wrap counters every few rounds.
TEST(PackedEventIdxLoopback, KickAndInterruptPatternThroughWrapFlips) {
  for (const Pattern p : {Pattern{3, 1, false}, Pattern{5, 2, false}, Pattern{7, 3, false},
                          Pattern{3, 3, true}, Pattern{2, 1, false}, Pattern{5, 4, true}}) {
    SCOPED_TRACE("size " + std::to_string(p.size) + " chain " + std::to_string(p.chain) +
                 (p.indirect ? " indirect" : ""));
    Arena a(p.size, 4);
    PackedQueue q = p.indirect ? a.indirect_driver() : a.driver().value();
    auto d = a.device().value();
    q.set_event_idx(true);
    d.set_event_idx(true);
    d.set_indirect(true);
    std::vector<Buffer> bufs(p.chain, Buffer{a.data_bus(0), 1});
    std::uint64_t kicks = 0, irqs = 0, token = 0;
    const int rounds = 30000;
    for (int round = 0; round < rounds; ++round) {
      ASSERT_TRUE(q.add(bufs, {}, token++).ok());
      const bool k1 = q.publish();
      ASSERT_TRUE(q.add(bufs, {}, token++).ok());
      const bool k2 = q.publish();
      ASSERT_TRUE(k1) << round;  // the device re-armed after draining
      ASSERT_FALSE(k2) << round;
      kicks += k1 + k2;
      std::uint16_t ids[2];
      for (auto& id : ids) {
        auto r = d.pop();
        ASSERT_TRUE(r.ok() && r->has_value()) << (r.ok() ? "empty" : r.error().message());
        id = (*r)->head;
      }
      for (int k = 0; k < 2; ++k) {
        ASSERT_TRUE(d.push(ids[k], 0).ok());
        const bool irq = d.should_interrupt();
        ASSERT_EQ(irq, k == 0) << round;
        irqs += irq;
      }
      ASSERT_FALSE(d.enable_notifications_and_check());
      for (int k = 0; k < 2; ++k) ASSERT_TRUE(q.poll().value().has_value());
      ASSERT_FALSE(q.enable_interrupts_and_check());
    }
    EXPECT_EQ(kicks, static_cast<std::uint64_t>(rounds));
    EXPECT_EQ(irqs, static_cast<std::uint64_t>(rounds));
    EXPECT_EQ(q.free_count(), p.size);
    EXPECT_FALSE(q.broken() || d.broken());
  }
}

// ---- loopback matrix: event idx on/off x indirect on/off ----

using Combo = std::tuple<bool, bool>;  // event idx, indirect
class PackedLoopback : public ::testing::TestWithParam<Combo> {};

std::string combo_name(const ::testing::TestParamInfo<Combo>& i) {
  return std::string(std::get<0>(i.param) ? "EventIdx" : "NoEventIdx") + "_" +
         (std::get<1>(i.param) ? "Indirect" : "Direct");
}

// Single-threaded simulation in which each side only works after a
// notification or a successful re-check, as real ones that sleep. The device
// works with notifications off and re-arms with enable_notifications_and_check;
// the driver polls with interrupts off and re-arms with
// enable_interrupts_and_check. A lost notification leaves both asleep with
// work outstanding: the run stalls and the test fails. Chains are random
// (1-3 readable, 0-3 writable, data echoed and checked), the device completes
// out of order and sometimes keeps chains across rounds.
TEST_P(PackedLoopback, NoLostNotificationsAndDataIntact) {
  const auto [ev, ind] = GetParam();
  // keep: the driver leaves interrupts on and sleeps whenever requests are in
  // flight after a poll round (as Virtqueue does), relying on poll() moving
  // its event offset; otherwise it polls with interrupts off and re-arms.
  for (const bool keep : {false, true})
    for (const std::uint16_t size :
         {std::uint16_t{1}, std::uint16_t{3}, std::uint16_t{8}, std::uint16_t{13}}) {
      SCOPED_TRACE(std::to_string(size) + (keep ? " interrupts kept on" : " re-arming"));
      constexpr std::size_t kSlot = 256;
      Arena a(size, 4, std::size_t{size} * kSlot);
      PackedQueue q = ind ? a.indirect_driver() : a.driver().value();
      auto d = a.device().value();
      q.set_event_idx(ev);
      d.set_event_idx(ev);
      d.set_indirect(ind, 4);
      EXPECT_EQ(q.indirect(), ind && size >= 2);
      std::mt19937 rng(size * 7u + ev * 2u + ind);
      struct Live {
        std::size_t slot;
        std::uint32_t readable, writable;
      };
      std::map<std::uint64_t, Live> live;  // token -> request
      std::vector<bool> slot_used(size, false);
      std::deque<std::pair<std::uint16_t, std::uint32_t>> held;  // device: id, bytes to report
      bool device_asleep = true, kick = false, driver_asleep = false, irq = false;
      std::uint64_t token = 0, done = 0, kicks = 0, irqs = 0, stalls = 0;
      constexpr std::uint64_t kTotal = 6000;
      while (done < kTotal) {
        bool progress = false;
        // Driver: submit while there is room.
        bool added = false;
        for (int k = 0; k < 4 && token < kTotal; ++k) {
          // Never longer than the ring (2.8.17), so every chain fits once it drains.
          const std::size_t nout = 1 + rng() % std::min<std::size_t>(3, size);
          const std::size_t nin = rng() % (std::min<std::size_t>(3, size - nout) + 1);
          const std::size_t n = nout + nin;
          const bool fits_indirect = ind && n >= 2 && n <= std::min<std::size_t>(4, size);
          if ((fits_indirect ? 1 : n) > q.free_count()) break;
          const auto slot = static_cast<std::size_t>(std::find(slot_used.begin(), slot_used.end(), false) -
                                                     slot_used.begin());
          ASSERT_LT(slot, slot_used.size());
          std::uint8_t* base = a.data() + slot * kSlot;
          std::vector<Buffer> out, in;
          std::uint32_t rd = 0, wr = 0;
          for (std::size_t j = 0; j < nout; ++j) {
            const auto len = static_cast<std::uint32_t>(1 + rng() % 20);
            for (std::uint32_t x = 0; x < len; ++x)
              base[j * 32 + x] = static_cast<std::uint8_t>(token + j + x);
            out.push_back({a.bus(base + j * 32), len});
            rd += len;
          }
          for (std::size_t j = 0; j < nin; ++j) {
            std::memset(base + 128 + j * 32, 0, 32);
            in.push_back({a.bus(base + 128 + j * 32), 8});
            wr += 8;
          }
          auto r = q.add(out, in, token);
          ASSERT_TRUE(r.ok()) << r.error().message();
          slot_used[slot] = true;
          live[token++] = Live{slot, rd, wr};
          added = true;
        }
        if (added) {
          progress = true;
          if (q.publish()) {
            kick = true;
            ++kicks;
          }
        }
        // Device: wakes on a kick; works with notifications off.
        if (kick || !device_asleep) {
          kick = false;
          device_asleep = false;
          d.set_notifications(false);
          for (;;) {
            auto r = d.pop();
            ASSERT_TRUE(r.ok()) << r.error().message();
            if (!r->has_value()) break;
            held.emplace_back((*r)->head, echo(**r));
            progress = true;
          }
          // Complete a random part, out of order.
          std::shuffle(held.begin(), held.end(), rng);
          const std::size_t now = held.empty() ? 0 : rng() % (held.size() + 1);
          for (std::size_t k = 0; k < now; ++k) {
            ASSERT_TRUE(d.push(held.front().first, held.front().second).ok());
            held.pop_front();
            progress = true;
          }
          if (now > 0 && d.should_interrupt()) {
            irq = true;
            ++irqs;
          }
          // Sleep only with nothing held and nothing that came in meanwhile.
          if (held.empty() && !d.enable_notifications_and_check()) device_asleep = true;
        }
        // Driver: takes completions after an interrupt or a re-check.
        if (irq || !driver_asleep) {
          irq = false;
          driver_asleep = false;
          if (!keep) q.set_interrupts(false);
          for (;;) {
            auto c = q.poll();
            ASSERT_TRUE(c.ok()) << c.error().message();
            if (!c->has_value()) break;
            const auto it = live.find((*c)->token);
            ASSERT_NE(it, live.end());
            const Live l = it->second;
            // The byte-exact echo is EchoedBytesArriveExactly's job; here the
            // length says the device saw the whole chain.
            ASSERT_EQ((*c)->len, std::min(l.readable, l.writable));
            slot_used[l.slot] = false;
            live.erase(it);
            ++done;
            progress = true;
          }
          if (keep) {
            driver_asleep = !live.empty();
          } else {
            if (!live.empty() && !q.enable_interrupts_and_check()) driver_asleep = true;
            if (live.empty()) q.set_interrupts(true);
          }
        }
        // A device holding chains completes some of them sooner or later.
        if (!progress && held.empty()) {
          ++stalls;
          ASSERT_LT(stalls, 3u) << "stalled: " << live.size() << " in flight, device "
                                << (device_asleep ? "asleep" : "awake") << ", driver "
                                << (driver_asleep ? "asleep" : "awake") << " after " << done
                                << " completions";
        } else {
          stalls = 0;
        }
      }
      EXPECT_EQ(q.free_count(), size);
      EXPECT_FALSE(q.broken() || d.broken());
      EXPECT_GT(kicks, 0u);
      EXPECT_GT(irqs, 0u);
    }
}

// Exact data through every shape: readable bytes echoed (+1) into the
// writable buffers, checked byte by byte, with and without indirect tables.
TEST_P(PackedLoopback, EchoedBytesArriveExactly) {
  const auto [ev, ind] = GetParam();
  constexpr std::uint16_t kSize = 7;
  Arena a(kSize, 4, 8192);
  PackedQueue q = ind ? a.indirect_driver() : a.driver().value();
  auto d = a.device().value();
  q.set_event_idx(ev);
  d.set_event_idx(ev);
  d.set_indirect(ind);
  std::uint8_t* data = a.data();
  for (std::uint64_t t = 0; t < 3000; ++t) {
    const std::size_t nout = 1 + t % 3, nin = t % 5;
    std::vector<Buffer> out, in;
    std::size_t off = 0;
    std::uint32_t rd = 0, wr = 0;
    for (std::size_t k = 0; k < nout; ++k, off += 64) {
      const auto len = static_cast<std::uint32_t>(1 + (t + k) % 17);
      for (std::uint32_t j = 0; j < len; ++j) data[off + j] = static_cast<std::uint8_t>(t * 3 + k + j);
      out.push_back({a.data_bus(off), len});
      rd += len;
    }
    for (std::size_t k = 0; k < nin; ++k, off += 64) {
      std::memset(data + off, 0, 64);
      in.push_back({a.data_bus(off), static_cast<std::uint32_t>(3 + k)});
      wr += static_cast<std::uint32_t>(3 + k);
    }
    ASSERT_TRUE(q.add(out, in, t).ok());
    q.publish();
    auto r = d.pop();
    ASSERT_TRUE(r.ok()) << r.error().message();
    ASSERT_TRUE(r->has_value());
    ASSERT_EQ((*r)->readable.size(), nout);
    ASSERT_EQ((*r)->writable.size(), nin);
    ASSERT_EQ((*r)->readable_bytes, rd);
    ASSERT_EQ((*r)->writable_bytes, wr);
    ASSERT_TRUE(d.push((*r)->head, echo(**r)).ok());
    auto c = q.poll();
    ASSERT_TRUE(c.ok() && c->has_value());
    ASSERT_EQ((*c)->token, t);
    ASSERT_EQ((*c)->len, std::min(rd, wr));
    std::vector<std::uint8_t> src, got;
    for (const Buffer& b : out)
      src.insert(src.end(), data + (b.addr - a.data_bus(0)), data + (b.addr - a.data_bus(0)) + b.len);
    for (const Buffer& b : in)
      got.insert(got.end(), data + (b.addr - a.data_bus(0)), data + (b.addr - a.data_bus(0)) + b.len);
    for (std::size_t j = 0; j < std::min(src.size(), got.size()); ++j)
      ASSERT_EQ(got[j], static_cast<std::uint8_t>(src[j] + 1)) << t;
    ASSERT_EQ(q.free_count(), kSize);
  }
}

// Device on its own thread; both sides sleep (spin with a deadline) when the
// re-check says there is nothing, and wake only on a notification from the
// other side. Real memory ordering: a lost kick or interrupt times out. With
// `keep` the driver never disables interrupts and sleeps right after an empty
// poll round, as Virtqueue does (the interrupt count is read before polling,
// as an eventfd would keep it).
void threads_sleeping_on_notifications(bool ev, bool ind, bool keep) {
  constexpr std::uint16_t kSize = 5;
  constexpr std::uint64_t kTotal = 40000;
  Arena a(kSize, 4, 4096);
  PackedQueue q = ind ? a.indirect_driver() : a.driver().value();
  auto d = a.device().value();
  q.set_event_idx(ev);
  d.set_event_idx(ev);
  d.set_indirect(ind);
  std::atomic<std::uint64_t> kicks{0}, irqs{0};
  std::atomic<bool> stop{false}, dev_failed{false};
  const auto wait_change = [&](std::atomic<std::uint64_t>& c, std::uint64_t seen) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (c.load() == seen) {
      if (stop.load()) return true;
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::yield();
    }
    return true;
  };
  std::thread device([&] {
    while (!stop.load()) {
      d.set_notifications(false);
      for (;;) {
        auto r = d.pop();
        if (!r.ok()) {
          dev_failed = true;
          stop = true;
          return;
        }
        if (!r->has_value()) break;
        if (!d.push((*r)->head, echo(**r)).ok()) dev_failed = true;
        if (d.should_interrupt()) irqs.fetch_add(1);
      }
      const std::uint64_t seen = kicks.load();
      if (d.enable_notifications_and_check()) continue;
      if (!wait_change(kicks, seen)) {
        dev_failed = true;  // lost kick
        stop = true;
        return;
      }
    }
  });
  std::uint64_t next = 0, done = 0;
  bool failed = false;
  while (done < kTotal && !failed && !stop.load()) {
    bool added = false;
    while (next < kTotal) {
      std::uint8_t* o = a.data() + (next % 64) * 32;
      std::memcpy(o, &next, 8);
      const Buffer out[] = {{a.bus(o), 4}, {a.bus(o + 4), 4}};
      const Buffer in[] = {{a.bus(o + 8), 8}};
      auto r = q.add(out, in, next);
      if (!r.ok()) {
        if (r.error().code() != Errc::busy) failed = true;
        break;
      }
      ++next;
      added = true;
    }
    if (added && q.publish()) kicks.fetch_add(1);
    if (!keep) q.set_interrupts(false);
    const std::uint64_t seen = irqs.load();
    bool got = false;
    for (;;) {
      auto c = q.poll();
      if (!c.ok()) {
        ADD_FAILURE() << c.error().message();
        failed = true;
        break;
      }
      if (!c->has_value()) break;
      if ((*c)->token != done || (*c)->len != 8) {
        ADD_FAILURE() << "token " << (*c)->token << " len " << (*c)->len << ", want " << done;
        failed = true;
        break;
      }
      ++done;
      got = true;
    }
    // Nothing submitted (ring full) and nothing completed: sleep.
    if (added || got || failed || done == kTotal) continue;
    if (!keep && q.enable_interrupts_and_check()) continue;
    if (!wait_change(irqs, seen)) {
      ADD_FAILURE() << "lost interrupt: " << q.in_flight() << " in flight after " << done;
      failed = true;
    }
  }
  stop = true;
  device.join();
  EXPECT_FALSE(failed);
  EXPECT_FALSE(dev_failed) << "device error or lost kick";
  EXPECT_EQ(done, kTotal);
  EXPECT_FALSE(d.broken());
}

TEST_P(PackedLoopback, ThreadsSleepingOnNotificationsNeverHang) {
  const auto [ev, ind] = GetParam();
  for (const bool keep : {false, true}) {
    SCOPED_TRACE(keep ? "interrupts kept on" : "re-arming");
    threads_sleeping_on_notifications(ev, ind, keep);
  }
}

INSTANTIATE_TEST_SUITE_P(Matrix, PackedLoopback, ::testing::Combine(::testing::Bool(), ::testing::Bool()),
                         combo_name);

// ---- indirect tables, driver role ----

TEST(PackedIndirectDriver, AddWritesOneRingDescriptorAndTheTable) {
  Arena a(8, 4);
  PackedQueue q = a.indirect_driver();
  EXPECT_TRUE(q.indirect());
  const Buffer out[] = {{0x1000, 16}, {0x2000, 8}};
  const Buffer in[] = {{0x3000, 32}};
  auto id = q.add(out, in, 5);
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(*id, 0);
  EXPECT_EQ(q.free_count(), 7);
  const PvirtqDesc& rd = a.ring()[0];
  EXPECT_EQ(rd.flags.get(), VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_AVAIL);  // no NEXT, no WRITE
  EXPECT_EQ(rd.len.get(), 48u);
  EXPECT_EQ(rd.addr.get(), a.bus(a.pool()));
  EXPECT_EQ(rd.id.get(), 0);
  const auto* t = reinterpret_cast<const PvirtqDesc*>(a.pool());
  const std::uint64_t addrs[] = {0x1000, 0x2000, 0x3000};
  const std::uint32_t lens[] = {16, 8, 32};
  const std::uint16_t flags[] = {0, 0, VIRTQ_DESC_F_WRITE};  // 2.8.7: only WRITE in a table
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(t[i].addr.get(), addrs[i]);
    EXPECT_EQ(t[i].len.get(), lens[i]);
    EXPECT_EQ(t[i].flags.get(), flags[i]);
    EXPECT_EQ(t[i].id.get(), 0);
  }
  // Next chain: id 1, position 1, table slot 1 (4 entries * 16 bytes further).
  ASSERT_EQ(*q.add(out, {}, 6), 1);
  EXPECT_EQ(a.ring()[1].addr.get(), a.bus(a.pool()) + 64);
  EXPECT_EQ(a.ring()[1].len.get(), 32u);
  EXPECT_EQ(a.ring()[1].id.get(), 1);
  // One buffer: direct. Five (> max 4): a direct chain of five positions.
  const Buffer five[] = {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}};
  ASSERT_EQ(*q.add(std::span(five, 1), {}, 7), 2);
  EXPECT_EQ(a.ring()[2].flags.get(), VIRTQ_DESC_F_AVAIL);
  EXPECT_EQ(a.ring()[2].addr.get(), 1u);
  ASSERT_EQ(*q.add(five, {}, 8), 3);
  EXPECT_EQ(a.ring()[3].flags.get(), VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_AVAIL);
  EXPECT_EQ(a.ring()[7].flags.get(), VIRTQ_DESC_F_AVAIL);
  EXPECT_EQ(q.free_count(), 0);
  EXPECT_EQ(q.add(out, {}, 9).error().code(), Errc::busy);
  EXPECT_EQ(q.outstanding_tokens(), (std::vector<std::uint64_t>{5, 6, 7, 8}));
}

TEST(PackedIndirectDriver, UsedDescriptorSkipsOnePositionAndAChainLongerThanTheFreeOnesFits) {
  Arena a(4, 4);
  PackedQueue q = a.indirect_driver();
  auto d = a.device().value();
  d.set_indirect(true);
  const Buffer one[] = {{a.data_bus(0), 1}};
  const Buffer four[] = {{a.data_bus(0), 1}, {a.data_bus(0), 2}, {a.data_bus(0), 3}, {a.data_bus(0), 4}};
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(q.add(one, {}, static_cast<std::uint64_t>(k)).ok());
  EXPECT_EQ(q.free_count(), 1);
  auto id = q.add(four, {}, 3);  // 4 buffers, 1 position
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(q.free_count(), 0);
  std::vector<std::uint16_t> ids;
  for (int k = 0; k < 4; ++k) {
    auto r = d.pop();
    ASSERT_TRUE(r.ok()) << r.error().message();
    ASSERT_TRUE(r->has_value());
    ids.push_back((*r)->head);
    if (k == 3) {
      EXPECT_EQ((*r)->head, *id);
      EXPECT_EQ((*r)->readable.size(), 4u);
      EXPECT_EQ((*r)->readable_bytes, 10u);
    }
  }
  // Complete the indirect chain first: it frees one position, and the next
  // used descriptor is expected one position further.
  ASSERT_TRUE(d.push(ids[3], 0).ok());
  auto c = q.poll().value();
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->token, 3u);
  EXPECT_EQ(q.free_count(), 1);
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(d.push(ids[static_cast<std::size_t>(k)], 0).ok());
  for (std::uint64_t k = 0; k < 3; ++k) EXPECT_EQ(q.poll().value()->token, k);
  EXPECT_FALSE(q.poll().value().has_value());
  EXPECT_EQ(q.free_count(), 4);
}

TEST(PackedIndirectDriver, PoolValidation) {
  Arena a(8, 8);
  auto q = a.driver().value();
  std::uint8_t* pool = a.pool();
  const std::uint64_t dev = a.bus(pool);
  auto code = [&](void* va, std::uint64_t dev_addr, std::size_t bytes) -> std::optional<Errc> {
    auto r = q.provide_indirect_pool(va, dev_addr, bytes);
    if (r.ok()) return std::nullopt;
    EXPECT_EQ(r.error().device(), kName);
    return r.error().code();
  };
  EXPECT_EQ(code(pool, dev, 8 * 8 * 16), Errc::invalid_argument);  // set_indirect not called
  q.set_indirect(true, 1);
  EXPECT_EQ(code(pool, dev, 8 * 8 * 16), Errc::invalid_argument);  // a table of 1 is pointless
  q.set_indirect(true, 4);
  EXPECT_EQ(code(nullptr, dev, 8 * 4 * 16), Errc::invalid_argument);
  EXPECT_EQ(code(pool + 8, dev, 8 * 4 * 16), Errc::invalid_argument);
  EXPECT_EQ(code(pool, dev, 8 * 4 * 16 - 1), Errc::invalid_argument);
  EXPECT_EQ(code(pool, ~std::uint64_t{0} - 100, 8 * 4 * 16), Errc::invalid_argument);
  EXPECT_FALSE(q.indirect());
  const Buffer b[] = {{1, 1}};
  ASSERT_TRUE(q.add(b, {}, 0).ok());
  EXPECT_EQ(code(pool, dev, 8 * 4 * 16), Errc::busy);
  // A fresh queue: accepted; max above the queue size is clamped to it.
  Arena a2(8, 8);
  auto q2 = a2.driver().value();
  q2.set_indirect(true, 100);
  EXPECT_TRUE(q2.provide_indirect_pool(a2.pool(), a2.bus(a2.pool()), 8 * 8 * 16).ok());
  EXPECT_TRUE(q2.indirect());
  const Buffer eight[] = {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}, {6, 1}, {7, 1}, {8, 1}};
  ASSERT_TRUE(q2.add(eight, {}, 0).ok());
  EXPECT_EQ(a2.ring()[0].len.get(), 8u * 16u);
  EXPECT_EQ(q2.free_count(), 7);
  // Turning indirect off again goes back to direct chains.
  q2.set_indirect(false, 0);
  EXPECT_FALSE(q2.indirect());
  ASSERT_TRUE(q2.add(std::span(eight, 2), {}, 1).ok());
  EXPECT_EQ(q2.free_count(), 5);
}

// The device may scribble on a table after taking it; we never read tables
// back, so completions stay right and the next use rewrites the slot.
TEST(PackedIndirectDriver, DeviceScribblingOnTablesChangesNothing) {
  Arena a(4, 4);
  PackedQueue q = a.indirect_driver();
  auto d = a.device().value();
  d.set_indirect(true);
  std::mt19937 rng(3);
  for (std::uint64_t t = 0; t < 2000; ++t) {
    const Buffer out[] = {{a.data_bus(0), 4}, {a.data_bus(4), 4}};
    const Buffer in[] = {{a.data_bus(64), 16}};
    ASSERT_TRUE(q.add(out, in, t).ok());
    auto r = d.pop();
    ASSERT_TRUE(r.ok()) << r.error().message();
    ASSERT_TRUE(r->has_value());
    for (std::size_t k = 0; k < a.pool_bytes; ++k) a.pool()[k] = static_cast<std::uint8_t>(rng());
    ASSERT_TRUE(d.push((*r)->head, static_cast<std::uint32_t>(t % 17)).ok());
    auto c = q.poll();
    ASSERT_TRUE(c.ok() && c->has_value());
    EXPECT_EQ((*c)->token, t);
    EXPECT_EQ((*c)->len, t % 17);
  }
  EXPECT_FALSE(q.broken());
}

// ---- indirect tables, device role ----

TEST(PackedIndirectDevice, AcceptsATableAndIgnoresNextIdAndWriteWhereTheSpecSaysSo) {
  Arena a(4, 4);
  auto d = a.device().value();
  d.set_indirect(true);
  auto* t = reinterpret_cast<PvirtqDesc*>(a.pool());
  // NEXT and ids inside a table are reserved and ignored (2.8.7); entries are
  // taken in order, all of them.
  put(t[0], a.data_bus(0), 8, 0xBEEF, VIRTQ_DESC_F_NEXT);
  put(t[1], a.data_bus(8), 4, 7, 0);
  put(t[2], a.data_bus(64), 16, 0xFFFF, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT);
  put(t[3], a.data_bus(80), 0, 0, VIRTQ_DESC_F_WRITE);  // zero length: an empty span
  // WRITE on the ring descriptor of a table is reserved and ignored.
  put(a.ring()[0], a.bus(t), 64, 3,
      static_cast<std::uint16_t>(VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE | avail(true)));
  auto r = d.pop();
  ASSERT_TRUE(r.ok()) << r.error().message();
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ((*r)->head, 3);
  ASSERT_EQ((*r)->readable.size(), 2u);
  ASSERT_EQ((*r)->writable.size(), 2u);
  EXPECT_EQ((*r)->readable[0].data(), a.data());
  EXPECT_EQ((*r)->readable[1].data(), a.data() + 8);
  EXPECT_EQ((*r)->writable[0].data(), a.data() + 64);
  EXPECT_EQ((*r)->writable[1].size(), 0u);
  EXPECT_EQ((*r)->readable_bytes, 12u);
  EXPECT_EQ((*r)->writable_bytes, 16u);
  EXPECT_EQ(d.in_flight(), 1);
  // One position: the next chain starts at position 1.
  put(a.ring()[1], a.data_bus(0), 1, 1, avail(true));
  auto r2 = d.pop();
  ASSERT_TRUE(r2.ok() && r2->has_value());
  EXPECT_EQ((*r2)->head, 1);
  ASSERT_TRUE(d.push(3, 16).ok());
  EXPECT_EQ(a.ring()[0].id.get(), 3);
  EXPECT_EQ(a.ring()[0].len.get(), 16u);
  EXPECT_EQ(a.ring()[0].flags.get(), VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED | VIRTQ_DESC_F_WRITE);
  ASSERT_TRUE(d.push(1, 0).ok());
  EXPECT_EQ(a.ring()[1].flags.get(), VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);  // next used after one position
}

// Reads stay inside the span the translation returned: the table is mapped to
// a heap block of exactly its length (AddressSanitizer catches any overrun).
TEST(PackedIndirectDevice, TableReadsStayInsideTheTranslatedSpan) {
  for (const std::uint32_t entries : {1u, 2u, 7u}) {
    SCOPED_TRACE(entries);
    Arena a(4);
    auto table = std::make_unique<PvirtqDesc[]>(entries);
    for (std::uint32_t j = 0; j < entries; ++j) put(table[j], a.data_bus(j * 8), 8, 0, 0);
    constexpr std::uint64_t kTable = 0x9'0000'0000;
    const auto inner = a.window();
    auto d =
        PackedDeviceQueue::create(
            4, a.ring(), a.drv_ev(), a.dev_ev(), kName,
            [&](std::uint64_t addr, std::uint32_t len, bool w) -> std::optional<std::span<std::uint8_t>> {
              if (addr == kTable) {
                if (w || len > entries * sizeof(PvirtqDesc)) return std::nullopt;
                return std::span<std::uint8_t>(reinterpret_cast<std::uint8_t*>(table.get()), len);
              }
              return inner(addr, len, w);
            })
            .value();
    d.set_indirect(true, 8);
    put(a.ring()[0], kTable, entries * 16, 0,
        static_cast<std::uint16_t>(VIRTQ_DESC_F_INDIRECT | avail(true)));
    auto r = d.pop();
    ASSERT_TRUE(r.ok()) << r.error().message();
    ASSERT_TRUE(r->has_value());
    EXPECT_EQ((*r)->readable.size(), entries);
  }
}

// Hostile driver writing indirect descriptors by hand.
class PackedIndirectHostile : public ::testing::Test {
 protected:
  PackedIndirectHostile() : a(4, 4), dev(a.device().value()) { dev.set_indirect(true, 4); }

  PvirtqDesc* table() { return reinterpret_cast<PvirtqDesc*>(a.pool()); }
  void ring_indirect(std::uint64_t addr, std::uint32_t len, std::uint16_t extra = 0, std::uint16_t pos = 0) {
    put(a.ring()[pos], addr, len, 0, static_cast<std::uint16_t>(VIRTQ_DESC_F_INDIRECT | extra | avail(true)));
  }

  // pop() must fail with bad_device_data naming the queue (and `text`),
  // latch broken and leave memory untouched; later calls fail with broken.
  void expect_rejected(const char* text) {
    SCOPED_TRACE(text);
    const auto before = a.bytes();
    EXPECT_TRUE(dev.has_avail());
    auto r = dev.pop();
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Errc::bad_device_data);
    EXPECT_NE(r.error().message().find(kName), std::string::npos) << r.error().message();
    EXPECT_NE(r.error().message().find(text), std::string::npos) << r.error().message();
    EXPECT_TRUE(dev.broken());
    EXPECT_EQ(a.bytes(), before);
    EXPECT_EQ(dev.pop().error().code(), Errc::broken);
    EXPECT_EQ(dev.push(0, 0).error().code(), Errc::broken);
    EXPECT_FALSE(dev.should_interrupt());
    dev.set_notifications(false);
    dev.set_event_idx(true);
    EXPECT_EQ(a.bytes(), before);
  }
  void good_table(std::uint32_t n) {
    for (std::uint32_t j = 0; j < n; ++j) put(table()[j], a.data_bus(j * 8), 8, 0, 0);
  }

  Arena a;
  PackedDeviceQueue dev;
};

TEST_F(PackedIndirectHostile, WithoutTheFeature) {
  dev.set_indirect(false);
  good_table(2);
  ring_indirect(a.bus(table()), 32);
  expect_rejected("VIRTIO_F_INDIRECT_DESC is off");
}

TEST_F(PackedIndirectHostile, TableLengthZero) {
  ring_indirect(a.bus(table()), 0);
  expect_rejected("bad length 0");
}

TEST_F(PackedIndirectHostile, TableLengthNotAMultipleOf16) {
  good_table(2);
  ring_indirect(a.bus(table()), 24);
  expect_rejected("bad length 24");
}

TEST_F(PackedIndirectHostile, TableLongerThanTheLimit) {
  good_table(4);
  ring_indirect(a.bus(table()), 5 * 16);
  expect_rejected("bad length 80");
}

TEST_F(PackedIndirectHostile, HugeTableIsRejectedBeforeTranslation) {
  ring_indirect(a.bus(table()), 0xFFFFFFF0u);
  expect_rejected("bad length 4294967280");
}

TEST_F(PackedIndirectHostile, TableOutsideMemory) {
  ring_indirect(0x1000, 32);
  expect_rejected("is not mapped");
}

TEST_F(PackedIndirectHostile, TableStraddlesTheEndOfMemory) {
  ring_indirect(kBus + a.total - 16, 32);
  expect_rejected("is not mapped");
}

TEST_F(PackedIndirectHostile, TableMisaligned) {
  good_table(3);
  ring_indirect(a.bus(table()) + 4, 32);
  expect_rejected("not 8-byte aligned");
}

TEST_F(PackedIndirectHostile, NestedIndirect) {
  good_table(2);
  put(table()[1], a.bus(table()), 32, 0, VIRTQ_DESC_F_INDIRECT);
  ring_indirect(a.bus(table()), 32);
  expect_rejected("entry 1 of the indirect table of descriptor 0 is itself indirect");
}

TEST_F(PackedIndirectHostile, IndirectWithNext) {
  good_table(2);
  put(a.ring()[1], a.data_bus(0), 8, 0, avail(true));
  ring_indirect(a.bus(table()), 32, VIRTQ_DESC_F_NEXT);
  expect_rejected("linked by VIRTQ_DESC_F_NEXT");
}

TEST_F(PackedIndirectHostile, IndirectAfterNext) {
  good_table(2);
  put(a.ring()[1], a.bus(table()), 32, 0, static_cast<std::uint16_t>(VIRTQ_DESC_F_INDIRECT | avail(true)));
  put(a.ring()[0], a.data_bus(0), 8, 0, static_cast<std::uint16_t>(VIRTQ_DESC_F_NEXT | avail(true)));
  expect_rejected("linked by VIRTQ_DESC_F_NEXT");
}

TEST_F(PackedIndirectHostile, BufferInTableOutsideMemory) {
  good_table(2);
  put(table()[1], 0x2000, 8, 0, 0);
  ring_indirect(a.bus(table()), 32);
  expect_rejected("entry 1 of the indirect table of descriptor 0 at 0x2000");
}

TEST_F(PackedIndirectHostile, WritableBufferInTableOverTheRing) {
  good_table(1);
  put(table()[1], a.bus(a.ring()), 16, 0, VIRTQ_DESC_F_WRITE);  // the window refuses device writes there
  ring_indirect(a.bus(table()), 32);
  expect_rejected("writable buffer of entry 1 of the indirect table");
}

TEST_F(PackedIndirectHostile, ReadableAfterWritableInTable) {
  put(table()[0], a.data_bus(0), 8, 0, VIRTQ_DESC_F_WRITE);
  put(table()[1], a.data_bus(8), 8, 0, 0);
  ring_indirect(a.bus(table()), 32);
  expect_rejected("readable entry 1 of the indirect table of descriptor 0 follows a writable one");
}

TEST_F(PackedIndirectHostile, TableChainOverFourGiB) {
  // Lengths are checked before translation, so no mapping is needed.
  put(table()[0], a.data_bus(0), 0x10u, 0, 0);
  put(table()[1], a.data_bus(0), 0xFFFF'FFFFu, 0, 0);
  ring_indirect(a.bus(table()), 32);
  expect_rejected("longer than 2^32 bytes");
}

TEST_F(PackedIndirectHostile, BufferIdAlreadyInFlight) {
  good_table(2);
  ring_indirect(a.bus(table()), 32);
  ASSERT_TRUE(dev.pop().value().has_value());
  ring_indirect(a.bus(table()), 32, 0, 1);
  expect_rejected("already in flight");
}

}  // namespace
}  // namespace uvirtio::rings
