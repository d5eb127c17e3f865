// Unit tests for the split virtqueue (driver role) against a software device.
//
// SoftDevice below plays the device side of virtio spec 1.2, 2.7: it reads
// the available index, walks descriptor chains, writes into device-writable
// buffers, fills used entries and bumps the used index. It also checks what
// the driver wrote (descriptor given twice, readable after writable, chain
// loops), so a driver bug shows up as a device error. Buffer addresses are the
// driver's virtual addresses unless a test installs a translation (the memfd
// test maps the same memory twice, as Linux's vringh_test does).
#include "uvirtio/rings/split.hpp"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <vector>

namespace uvirtio::rings {
namespace {

constexpr const char* kName = "0000:00:03.0 queue 1";

std::uint16_t load_acquire(le16& f) {
  return le16::from_raw(std::atomic_ref<std::uint16_t>(f.raw()).load(std::memory_order_acquire));
}
void store_release(le16& f, std::uint16_t v) {
  std::atomic_ref<std::uint16_t>(f.raw()).store(le16::to_raw(v), std::memory_order_release);
}
std::size_t align_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

// Offsets of the three ring areas and a data area, with guard gaps between
// them so a write past an area's end is caught.
struct Layout {
  static constexpr std::size_t kGuard = 64;
  explicit Layout(std::uint16_t n, std::size_t data_bytes = 0) {
    desc = kGuard;
    avail = align_up(desc + SplitLayout::desc_bytes(n) + kGuard, 16);
    used = align_up(avail + SplitLayout::avail_bytes(n) + kGuard, 16);
    data = align_up(used + SplitLayout::used_bytes(n) + kGuard, 64);
    total = align_up(data + data_bytes + kGuard, 4096);
    ends = {desc + SplitLayout::desc_bytes(n), avail + SplitLayout::avail_bytes(n),
            used + SplitLayout::used_bytes(n)};
  }
  std::size_t desc, avail, used, data, total;
  std::vector<std::size_t> ends;
};

// Heap ring memory for a queue of `n` entries, guard bytes set to 0xEE.
struct RingMem {
  explicit RingMem(std::uint16_t n, std::size_t data_bytes = 0) : size(n), lay(n, data_bytes) {
    mem.reset(static_cast<std::uint8_t*>(std::aligned_alloc(4096, lay.total)));
    std::memset(mem.get(), 0xEE, lay.total);
  }
  std::uint8_t* desc() const { return mem.get() + lay.desc; }
  std::uint8_t* avail() const { return mem.get() + lay.avail; }
  std::uint8_t* used() const { return mem.get() + lay.used; }
  std::uint8_t* data() const { return mem.get() + lay.data; }
  Result<SplitQueue> create() const { return SplitQueue::create(size, desc(), avail(), used(), kName); }
  bool guards_intact() const {
    const std::size_t starts[] = {0, lay.ends[0], lay.ends[1], lay.ends[2]};
    const std::size_t stops[] = {lay.desc, lay.avail, lay.used, lay.data};
    for (int r = 0; r < 4; ++r) {
      for (std::size_t i = starts[r]; i < stops[r]; ++i) {
        if (mem[i] != 0xEE) return false;
      }
    }
    return true;
  }
  // The driver-written areas: descriptor table and available ring.
  std::vector<std::uint8_t> driver_areas() const {
    std::vector<std::uint8_t> v(desc(), desc() + SplitLayout::desc_bytes(size));
    v.insert(v.end(), avail(), avail() + SplitLayout::avail_bytes(size));
    return v;
  }
  std::uint16_t size;
  Layout lay;
  std::unique_ptr<std::uint8_t[], decltype(&std::free)> mem{nullptr, &std::free};
};

struct Seg {
  std::uint8_t* p;
  std::uint32_t len;
  bool write;
};
struct Chain {
  std::uint16_t head = 0;
  std::vector<std::uint16_t> descs;
  std::vector<Seg> segs;
};

class SoftDevice {
 public:
  using Xlate = std::function<std::uint8_t*(std::uint64_t addr)>;
  SoftDevice(std::uint16_t size, void* desc, void* avail, void* used, Xlate xlate = {})
      : size_(size),
        desc_(static_cast<VirtqDesc*>(desc)),
        avail_(static_cast<le16*>(avail)),
        used_(static_cast<std::uint8_t*>(used)),
        xlate_(xlate ? std::move(xlate)
                     : [](std::uint64_t
                              a) { return reinterpret_cast<std::uint8_t*>(static_cast<std::uintptr_t>(a)); }),
        owned_(size, false) {}
  explicit SoftDevice(const RingMem& m) : SoftDevice(m.size, m.desc(), m.avail(), m.used()) {}

  // The next chain the driver made available, or nullopt.
  std::optional<Chain> pop() {
    const std::uint16_t aidx = load_acquire(avail_[1]);
    if (aidx == last_avail_) return std::nullopt;
    if (static_cast<std::uint16_t>(aidx - last_avail_) > size_) return error("avail idx too far ahead");
    Chain c;
    c.head = avail_[2 + (last_avail_ & (size_ - 1))].get();
    ++last_avail_;
    if (c.head >= size_) return error("head out of range");
    bool seen_write = false;
    for (std::uint16_t i = c.head;;) {
      if (c.descs.size() == size_) return error("chain loops");
      if (owned_[i]) return error("descriptor given twice");
      owned_[i] = true;
      c.descs.push_back(i);
      const VirtqDesc& d = desc_[i];
      const std::uint16_t flags = d.flags.get();
      const bool w = (flags & VIRTQ_DESC_F_WRITE) != 0;
      if (!w && seen_write) return error("readable descriptor after a writable one");
      if ((flags & VIRTQ_DESC_F_INDIRECT) != 0) return error("unexpected indirect descriptor");
      seen_write |= w;
      c.segs.push_back({xlate_(d.addr.get()), d.len.get(), w});
      if ((flags & VIRTQ_DESC_F_NEXT) == 0) break;
      i = d.next.get();
      if (i >= size_) return error("next out of range");
    }
    held_[c.head] = c.descs;
    return c;
  }

  // Writes a used entry and publishes it (spec 2.7.8); frees what the
  // device held for `id` if it is a head it popped.
  void complete(std::uint32_t id, std::uint32_t len) {
    if (auto it = held_.find(id); it != held_.end()) {
      for (std::uint16_t i : it->second) owned_[i] = false;
      held_.erase(it);
    }
    write_entry(used_idx_, id, len);
    set_used_idx(static_cast<std::uint16_t>(used_idx_ + 1));
  }
  void write_entry(std::uint16_t idx, std::uint32_t id, std::uint32_t len) {
    auto* ring = reinterpret_cast<VirtqUsedElem*>(used_ + 4);
    ring[idx & (size_ - 1)].id.set(id);
    ring[idx & (size_ - 1)].len.set(len);
  }
  void set_used_idx(std::uint16_t v) {
    used_idx_ = v;
    store_release(reinterpret_cast<le16*>(used_)[1], v);  // entries before the index
  }
  void set_used_flags(std::uint16_t v) { store_release(reinterpret_cast<le16*>(used_)[0], v); }
  std::uint16_t avail_flags() { return load_acquire(avail_[0]); }
  std::uint16_t avail_idx() { return load_acquire(avail_[1]); }
  std::uint16_t used_idx() const { return used_idx_; }

  // Echo handler: writes each readable byte plus one into the writable
  // buffers (as many as fit); with no readable bytes fills them with 0x5A.
  static std::uint32_t echo(const Chain& c) {
    std::vector<std::uint8_t> src;
    for (const Seg& s : c.segs) {
      if (!s.write) src.insert(src.end(), s.p, s.p + s.len);
    }
    std::uint32_t n = 0;
    for (const Seg& s : c.segs) {
      for (std::uint32_t j = 0; s.write && j < s.len; ++j, ++n) {
        if (!src.empty() && n == src.size()) return n;
        s.p[j] = src.empty() ? std::uint8_t{0x5A} : static_cast<std::uint8_t>(src[n] + 1);
      }
    }
    return n;
  }
  // Pops, echoes and completes up to `max` chains in order.
  int process(int max = INT_MAX) {
    int n = 0;
    for (; n < max; ++n) {
      auto c = pop();
      if (!c) break;
      complete(c->head, echo(*c));
    }
    return n;
  }
  const std::vector<std::string>& errors() const { return errors_; }

 private:
  std::nullopt_t error(const char* what) {
    errors_.push_back(what);
    return std::nullopt;
  }
  std::uint16_t size_;
  VirtqDesc* desc_;
  le16* avail_;
  std::uint8_t* used_;
  Xlate xlate_;
  std::vector<bool> owned_;
  std::map<std::uint32_t, std::vector<std::uint16_t>> held_;
  std::uint16_t last_avail_ = 0;
  std::uint16_t used_idx_ = 0;
  std::vector<std::string> errors_;
};

std::uint64_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// ---- create() ----

TEST(SplitQueueCreate, AcceptsPowersOfTwo) {
  for (std::uint16_t n : std::initializer_list<std::uint16_t>{1, 2, 4, 256, 32768}) {
    RingMem m(n);
    auto q = m.create();
    ASSERT_TRUE(q.ok()) << n << ": " << q.error().message();
    EXPECT_EQ(q->size(), n);
    EXPECT_EQ(q->free_count(), n);
    EXPECT_EQ(q->in_flight(), 0);
    EXPECT_FALSE(q->broken());
    EXPECT_EQ(q->name(), kName);
  }
}

TEST(SplitQueueCreate, RejectsBadSizes) {
  RingMem m(8);
  for (std::uint16_t n : std::initializer_list<std::uint16_t>{0, 3, 6, 12, 100, 32767, 32769, 65535}) {
    auto q = SplitQueue::create(n, m.desc(), m.avail(), m.used(), kName);
    ASSERT_FALSE(q.ok()) << n;
    EXPECT_EQ(q.error().code(), Errc::invalid_argument);
    EXPECT_EQ(q.error().device(), kName);
    EXPECT_EQ(q.error().cause(), "size " + std::to_string(n) + " is not a power of two in [1, 32768]");
  }
}

TEST(SplitQueueCreate, RejectsNullAndMisalignedPointersWithoutTouchingMemory) {
  RingMem m(8);
  std::memset(m.mem.get(), 0xAB, m.lay.total);
  struct Case {
    void* d;
    void* a;
    void* u;
  };
  const Case cases[] = {{nullptr, m.avail(), m.used()},      {m.desc(), nullptr, m.used()},
                        {m.desc(), m.avail(), nullptr},      {m.desc() + 8, m.avail(), m.used()},
                        {m.desc(), m.avail() + 1, m.used()}, {m.desc(), m.avail(), m.used() + 2}};
  for (const Case& c : cases) {
    auto q = SplitQueue::create(8, c.d, c.a, c.u, kName);
    ASSERT_FALSE(q.ok());
    EXPECT_EQ(q.error().code(), Errc::invalid_argument);
    EXPECT_EQ(q.error().device(), kName);
  }
  for (std::size_t i = 0; i < m.lay.total; ++i) ASSERT_EQ(m.mem[i], 0xAB) << i;
}

TEST(SplitQueueCreate, ZeroesExactlyTheRingAreas) {
  RingMem m(16);
  std::memset(m.desc(), 0xCD, m.lay.ends[0] - m.lay.desc);
  std::memset(m.avail(), 0xCD, m.lay.ends[1] - m.lay.avail);
  std::memset(m.used(), 0xCD, m.lay.ends[2] - m.lay.used);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  for (std::size_t i = 0; i < m.lay.total; ++i) {
    const bool in_area = (i >= m.lay.desc && i < m.lay.ends[0]) || (i >= m.lay.avail && i < m.lay.ends[1]) ||
                         (i >= m.lay.used && i < m.lay.ends[2]);
    ASSERT_EQ(m.mem[i], in_area ? 0 : 0xEE) << i;
  }
}

// ---- add() / publish() / poll() ----

TEST(SplitQueue, AddWritesDescriptorsAndAvailRingButPublishesOnlyOnPublish) {
  RingMem m(8);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  auto* d = reinterpret_cast<VirtqDesc*>(m.desc());
  auto* av = reinterpret_cast<le16*>(m.avail());
  const Buffer out[] = {{0x1000, 16}, {0x2000, 8}};
  const Buffer in[] = {{0x3000, 32}, {0x4000, 4}};
  auto h = q->add(out, in, 7);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(*h, 0);
  const std::uint64_t addrs[] = {0x1000, 0x2000, 0x3000, 0x4000};
  const std::uint32_t lens[] = {16, 8, 32, 4};
  const std::uint16_t flags[] = {VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                                 VIRTQ_DESC_F_WRITE};
  const std::uint16_t nexts[] = {1, 2, 3, 0};
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(d[i].addr.get(), addrs[i]) << i;
    EXPECT_EQ(d[i].len.get(), lens[i]) << i;
    EXPECT_EQ(d[i].flags.get(), flags[i]) << i;
    EXPECT_EQ(d[i].next.get(), nexts[i]) << i;
  }
  EXPECT_EQ(av[2].get(), 0);  // ring[0]
  EXPECT_EQ(av[1].get(), 0);  // idx: not yet published
  EXPECT_EQ(q->free_count(), 4);
  EXPECT_EQ(q->in_flight(), 4);

  const Buffer one[] = {{0x5000, 1}};
  auto h2 = q->add(one, {}, 8);
  ASSERT_TRUE(h2.ok());
  EXPECT_EQ(*h2, 4);
  EXPECT_EQ(d[4].flags.get(), 0);
  EXPECT_EQ(d[4].len.get(), 1u);
  EXPECT_EQ(av[3].get(), 4);

  SoftDevice dev(m);
  EXPECT_FALSE(dev.pop().has_value());
  EXPECT_TRUE(q->publish());
  EXPECT_EQ(av[1].get(), 2);
  EXPECT_TRUE(dev.pop().has_value());
  EXPECT_TRUE(dev.pop().has_value());
  EXPECT_FALSE(dev.pop().has_value());
  EXPECT_TRUE(dev.errors().empty());
  EXPECT_TRUE(m.guards_intact());
}

TEST(SplitQueue, RoundTripWritesDataThroughTheAddresses) {
  RingMem m(8, 256);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  SoftDevice dev(m);
  std::uint8_t* o1 = m.data();
  std::uint8_t* o2 = m.data() + 64;
  std::uint8_t* i1 = m.data() + 128;
  std::uint8_t* i2 = m.data() + 192;
  for (int k = 0; k < 5; ++k) o1[k] = static_cast<std::uint8_t>(10 + k);
  for (int k = 0; k < 3; ++k) o2[k] = static_cast<std::uint8_t>(20 + k);
  std::memset(i1, 0, 64);
  std::memset(i2, 0, 64);
  const Buffer out[] = {{addr(o1), 5}, {addr(o2), 3}};
  const Buffer in[] = {{addr(i1), 6}, {addr(i2), 4}};
  ASSERT_TRUE(q->add(out, in, 0xABCDEF0123ull).ok());
  EXPECT_FALSE(q->has_used());
  q->publish();
  EXPECT_EQ(dev.process(), 1);
  EXPECT_TRUE(q->has_used());
  auto r = q->poll();
  ASSERT_TRUE(r.ok()) << r.error().message();
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ((*r)->token, 0xABCDEF0123ull);
  EXPECT_EQ((*r)->len, 8u);
  const std::uint8_t want1[] = {11, 12, 13, 14, 15, 21};
  const std::uint8_t want2[] = {22, 23, 0, 0};
  EXPECT_EQ(std::memcmp(i1, want1, 6), 0);
  EXPECT_EQ(std::memcmp(i2, want2, 4), 0);
  EXPECT_EQ(i1[6], 0);  // nothing written past the buffer
  EXPECT_FALSE(q->has_used());
  auto none = q->poll();
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  EXPECT_EQ(q->free_count(), 8);
  EXPECT_TRUE(dev.errors().empty());
  EXPECT_TRUE(m.guards_intact());
}

TEST(SplitQueue, FreedChainIsReusedThroughDriverLinks) {
  RingMem m(8);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  SoftDevice dev(m);
  auto* d = reinterpret_cast<VirtqDesc*>(m.desc());
  const Buffer b4[] = {{1, 1}, {2, 1}, {3, 1}, {4, 1}};
  const Buffer b1[] = {{5, 1}};
  ASSERT_EQ(*q->add(b4, {}, 1), 0);  // descriptors 0-3
  ASSERT_EQ(*q->add(b1, {}, 2), 4);  // descriptor 4
  q->publish();
  auto c = dev.pop();
  ASSERT_TRUE(c.has_value());
  // A misbehaving device scribbles over the links of the chain it holds: the
  // driver must free it through its own copy.
  d[0].next.set(6);
  d[1].next.set(6);
  d[2].next.set(0);
  dev.complete(c->head, 0);
  auto r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->token, 1u);
  EXPECT_EQ(q->free_count(), 7);
  // Free list is now 0 1 2 3 5 6 7: a chain of 5 takes 0 1 2 3 5.
  const Buffer b5[] = {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}};
  ASSERT_EQ(*q->add(b5, {}, 3), 0);
  const std::uint16_t want_next[] = {1, 2, 3, 5};
  for (int i = 0; i < 4; ++i) EXPECT_EQ(d[i < 3 ? i : 3].next.get(), want_next[i]) << i;
  EXPECT_EQ(d[5].flags.get(), 0);
  EXPECT_EQ(q->free_count(), 2);
  const Buffer b2[] = {{6, 1}, {7, 1}};
  ASSERT_EQ(*q->add(b2, {}, 4), 6);
  EXPECT_EQ(d[6].next.get(), 7);
  EXPECT_EQ(q->free_count(), 0);
  q->publish();
  EXPECT_TRUE(dev.pop().has_value());  // token 2
  EXPECT_TRUE(dev.pop().has_value());
  EXPECT_TRUE(dev.pop().has_value());
  EXPECT_TRUE(dev.errors().empty()) << dev.errors().front();
}

// A chain longer than the whole queue (and not indirect) never fits: busy
// would have a caller that retries on busy loop forever. It is refused as
// invalid_argument, the ring untouched, also on an empty queue.
TEST(SplitQueue, AChainLongerThanTheQueueIsInvalidNotBusy) {
  RingMem m(4);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  const Buffer b[] = {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}};
  const auto before = m.driver_areas();
  for (const std::size_t outs : {std::size_t{5}, std::size_t{2}}) {
    auto r = q->add(std::span(b, outs), std::span(b + outs, 5 - outs), 0);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Errc::invalid_argument) << r.error().message();
    EXPECT_EQ(r.error().device(), kName);
    EXPECT_EQ(r.error().cause(), "the chain needs 5 descriptors, the queue has only 4");
  }
  EXPECT_EQ(m.driver_areas(), before);
  EXPECT_EQ(q->free_count(), 4);
  EXPECT_EQ(q->in_flight(), 0);
  // A chain of the whole queue still fits.
  ASSERT_TRUE(q->add(std::span(b, 4), {}, 1).ok());
  EXPECT_EQ(q->free_count(), 0);
  // Once the queue is (partly) full, a chain that fits an empty queue is busy.
  EXPECT_EQ(q->add(std::span(b, 1), {}, 2).error().code(), Errc::busy);
}

TEST(SplitQueue, FreeCountAndBusyWhenFull) {
  RingMem m(4);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  SoftDevice dev(m);
  const Buffer b[] = {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}};
  ASSERT_TRUE(q->add(std::span(b, 2), std::span(b + 2, 1), 10).ok());
  EXPECT_EQ(q->free_count(), 1);
  EXPECT_EQ(q->in_flight(), 3);
  const auto before = m.driver_areas();
  auto busy = q->add(std::span(b, 1), std::span(b, 1), 11);
  ASSERT_FALSE(busy.ok());
  EXPECT_EQ(busy.error().code(), Errc::busy);
  EXPECT_EQ(busy.error().device(), kName);
  EXPECT_EQ(m.driver_areas(), before);
  EXPECT_EQ(q->free_count(), 1);
  ASSERT_TRUE(q->add(std::span(b, 1), {}, 12).ok());
  EXPECT_EQ(q->free_count(), 0);
  EXPECT_EQ(q->add(std::span(b, 1), {}, 13).error().code(), Errc::busy);
  q->publish();
  for (int k = 0; k < 2; ++k) {
    auto c = dev.pop();  // fake addresses: complete without touching the buffers
    ASSERT_TRUE(c.has_value());
    dev.complete(c->head, 0);
  }
  auto r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->token, 10u);
  EXPECT_EQ(q->free_count(), 3);
  r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->token, 12u);
  EXPECT_EQ(q->free_count(), 4);

  // A full ring of single-descriptor chains: the used index ends exactly
  // `size` ahead, which is legal.
  for (std::uint64_t t = 0; t < 4; ++t) ASSERT_TRUE(q->add(std::span(b, 1), {}, 100 + t).ok());
  q->publish();
  std::vector<Chain> held;
  while (auto c = dev.pop()) held.push_back(*c);
  ASSERT_EQ(held.size(), 4u);
  for (const Chain& c : held) dev.complete(c.head, 0);
  for (std::uint64_t t = 0; t < 4; ++t) {
    r = q->poll();
    ASSERT_TRUE(r.ok() && r->has_value()) << t;
    EXPECT_EQ((*r)->token, 100 + t);
  }
  EXPECT_FALSE(q->poll()->has_value());
  EXPECT_EQ(q->free_count(), 4);
}

TEST(SplitQueue, RejectsBadChainsWithoutChangingState) {
  RingMem m(8);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  const auto before = m.driver_areas();
  const Buffer ok1[] = {{1, 4}};
  const Buffer zero[] = {{1, 4}, {2, 0}};
  const Buffer huge[] = {{1, 0xFFFFFFFFu}, {2, 1}};
  struct Case {
    std::span<const Buffer> out, in;
  };
  const Case cases[] = {{{}, {}}, {zero, {}}, {ok1, zero}, {ok1, huge}, {{}, huge}};
  for (const Case& c : cases) {
    auto r = q->add(c.out, c.in, 1);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Errc::invalid_argument);
    EXPECT_EQ(r.error().device(), kName);
  }
  EXPECT_EQ(m.driver_areas(), before);
  EXPECT_EQ(q->free_count(), 8);
  EXPECT_FALSE(q->broken());

  // Exactly 2^32-1 writable bytes is fine, and the device may use them all.
  const Buffer max[] = {{1, 0xFFFFFFF0u}, {2, 0xF}};
  ASSERT_TRUE(q->add({}, max, 9).ok());
  q->publish();
  SoftDevice dev(m);
  auto c = dev.pop();
  ASSERT_TRUE(c.has_value());
  dev.complete(c->head, 0xFFFFFFFFu);
  auto r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value()) << r.error().message();
  EXPECT_EQ((*r)->len, 0xFFFFFFFFu);
}

TEST(SplitQueue, RejectsChainsOverFourGiBInTotal) {
  // 2.7.5.1: a driver MUST NOT add a chain longer than 2^32 bytes in total,
  // readable bytes included (a device refuses such a chain as malformed).
  RingMem m(8);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  const auto before = m.driver_areas();
  const Buffer big[] = {{1, 0xFFFFFFFFu}, {2, 0xFFFFFFFFu}};
  const Buffer one[] = {{3, 1}, {4, 1}};
  struct Case {
    std::span<const Buffer> out, in;
  };
  const Case cases[] = {{big, {}}, {std::span<const Buffer>(big).first(1), one}};
  for (const Case& c : cases) {
    auto r = q->add(c.out, c.in, 1);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Errc::invalid_argument);
    EXPECT_EQ(r.error().device(), kName);
  }
  EXPECT_EQ(m.driver_areas(), before);
  EXPECT_EQ(q->free_count(), 8);
  // Exactly 2^32 bytes is fine.
  EXPECT_TRUE(q->add(std::span<const Buffer>(big).first(1), std::span<const Buffer>(one).first(1), 2).ok());
}

TEST(SplitQueue, PublishReportsNoNotify) {
  RingMem m(4);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  SoftDevice dev(m);
  const Buffer b[] = {{1, 1}};
  ASSERT_TRUE(q->add(b, {}, 1).ok());
  dev.set_used_flags(VIRTQ_USED_F_NO_NOTIFY);
  EXPECT_FALSE(q->publish());
  EXPECT_EQ(dev.avail_idx(), 1);  // published even when no kick is wanted
  EXPECT_FALSE(q->publish());     // nothing new: still the flag
  dev.set_used_flags(0);
  EXPECT_TRUE(q->publish());
  ASSERT_TRUE(q->add(b, {}, 2).ok());
  EXPECT_TRUE(q->publish());
  EXPECT_EQ(dev.avail_idx(), 2);
  dev.set_used_flags(0xFFFE);  // other bits are not NO_NOTIFY
  EXPECT_TRUE(q->publish());
}

TEST(SplitQueue, SetInterruptsWritesAvailFlags) {
  RingMem m(4);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  SoftDevice dev(m);
  EXPECT_EQ(dev.avail_flags(), 0);
  q->set_interrupts(false);
  EXPECT_EQ(dev.avail_flags(), VIRTQ_AVAIL_F_NO_INTERRUPT);
  q->set_interrupts(false);
  EXPECT_EQ(dev.avail_flags(), VIRTQ_AVAIL_F_NO_INTERRUPT);
  q->set_interrupts(true);
  EXPECT_EQ(dev.avail_flags(), 0);
  // The flag comes from the shadow, not from whatever is in memory.
  reinterpret_cast<le16*>(m.avail())[0].set(0x8000);
  q->set_interrupts(false);
  EXPECT_EQ(dev.avail_flags(), VIRTQ_AVAIL_F_NO_INTERRUPT);
}

// Runs > 70000 requests through a size-4 queue so both 16-bit indices wrap
// (more than once), with mixed chain shapes and out-of-order completion.
TEST(SplitQueue, SixteenBitIndicesWrap) {
  RingMem m(4, 4 * 64);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  SoftDevice dev(m);
  constexpr std::uint64_t kTotal = 140000;
  std::uint64_t token = 0, batch_no = 0;
  while (token < kTotal) {
    std::vector<std::uint64_t> batch;
    for (int j = 0; j < 4 && token < kTotal; ++j) {
      std::uint8_t* o = m.data() + j * 64;
      std::uint8_t* i = o + 32;
      std::memset(o, static_cast<int>(token & 0x7F), 8);
      const Buffer out[] = {{addr(o), 8}};
      const Buffer in[] = {{addr(i), 8}};
      const int shape = static_cast<int>(token % 3);  // out only, out+in, in only
      auto r = q->add(shape == 2 ? std::span<const Buffer>{} : std::span<const Buffer>(out),
                      shape == 0 ? std::span<const Buffer>{} : std::span<const Buffer>(in), token);
      if (!r.ok()) {
        ASSERT_EQ(r.error().code(), Errc::busy);
        break;
      }
      batch.push_back(token++);
    }
    ASSERT_FALSE(batch.empty());
    q->publish();
    std::vector<Chain> chains;
    while (auto c = dev.pop()) chains.push_back(*c);
    ASSERT_EQ(chains.size(), batch.size());
    if (batch_no++ % 2 == 1) {
      std::reverse(chains.begin(), chains.end());
      std::reverse(batch.begin(), batch.end());
    }
    for (const Chain& c : chains) dev.complete(c.head, SoftDevice::echo(c));
    for (std::uint64_t t : batch) {
      auto r = q->poll();
      ASSERT_TRUE(r.ok()) << r.error().message();
      ASSERT_TRUE(r->has_value());
      ASSERT_EQ((*r)->token, t);
      ASSERT_EQ((*r)->len, t % 3 == 0 ? 0u : 8u);
    }
    ASSERT_FALSE(q->poll()->has_value());
    ASSERT_EQ(q->free_count(), 4);
  }
  EXPECT_EQ(dev.avail_idx(), static_cast<std::uint16_t>(kTotal));
  EXPECT_EQ(dev.used_idx(), static_cast<std::uint16_t>(kTotal));
  EXPECT_TRUE(dev.errors().empty()) << dev.errors().front();
  EXPECT_TRUE(m.guards_intact());
}

// Random chain shapes, random completion order and partial completion:
// checks the exact free count and that tokens and lengths come back right.
TEST(SplitQueue, RandomOutOfOrderCompletion) {
  RingMem m(16);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  SoftDevice dev(m);
  std::mt19937 rng(12345);
  std::map<std::uint64_t, std::pair<std::uint16_t, std::uint32_t>> outstanding;  // token -> (descs, writable)
  std::vector<Chain> held;
  std::map<std::uint16_t, std::uint64_t> head_token;
  std::uint64_t token = 0;
  unsigned used_descs = 0;
  for (int step = 0; step < 30000; ++step) {
    const auto n_out = static_cast<unsigned>(rng() % 3), n_in = static_cast<unsigned>(rng() % 3);
    std::vector<Buffer> out(n_out, Buffer{0x1000, 3}), in(n_in, Buffer{0x2000, 5});
    auto r = q->add(out, in, token);
    const unsigned n = n_out + n_in;
    if (n == 0) {
      ASSERT_EQ(r.error().code(), Errc::invalid_argument);
    } else if (n > 16 - used_descs) {
      ASSERT_EQ(r.error().code(), Errc::busy);
    } else {
      ASSERT_TRUE(r.ok());
      outstanding[token] = {static_cast<std::uint16_t>(n), static_cast<std::uint32_t>(5 * n_in)};
      head_token[*r] = token;
      used_descs += n;
      ++token;
    }
    ASSERT_EQ(q->free_count(), 16 - used_descs);
    if (rng() % 3 == 0) q->publish();
    while (auto c = dev.pop()) held.push_back(*c);
    if (!held.empty() && rng() % 2 == 0) {
      const std::size_t k = rng() % held.size();
      const Chain c = held[k];
      held.erase(held.begin() + static_cast<std::ptrdiff_t>(k));
      std::uint32_t w = 0;
      for (const Seg& s : c.segs) w += s.write ? s.len : 0;
      dev.complete(c.head, w == 0 ? 0 : static_cast<std::uint32_t>(rng() % (w + 1)));
      auto p = q->poll();
      ASSERT_TRUE(p.ok()) << p.error().message();
      ASSERT_TRUE(p->has_value());
      const std::uint64_t t = (*p)->token;
      ASSERT_EQ(t, head_token.at(c.head));
      ASSERT_EQ(outstanding.count(t), 1u);
      ASSERT_LE((*p)->len, outstanding[t].second);
      used_descs -= outstanding[t].first;
      outstanding.erase(t);
      ASSERT_EQ(q->free_count(), 16 - used_descs);
    }
  }
  EXPECT_TRUE(dev.errors().empty()) << dev.errors().front();
  EXPECT_TRUE(m.guards_intact());
}

// The device runs on its own thread; tokens must come back in order, once.
TEST(SplitQueue, ConcurrentDeviceThread) {
  constexpr std::uint16_t kSize = 16;
  constexpr std::uint64_t kTotal = 200000;
  constexpr std::size_t kSlots = kSize / 2;  // two descriptors per request
  RingMem m(kSize, kSlots * 16);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  SoftDevice dev(m);
  std::atomic<bool> stop{false};
  std::thread device([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      if (dev.process() == 0) std::this_thread::yield();
    }
  });
  std::uint64_t next_token = 0, next_expected = 0;
  bool failed = false;
  while (next_expected < kTotal && !failed) {
    bool added = false;
    while (next_token < kTotal && q->free_count() >= 2) {
      std::uint8_t* o = m.data() + (next_token % kSlots) * 16;
      std::memcpy(o, &next_token, 8);
      std::memset(o + 8, 0, 8);
      const Buffer out[] = {{addr(o), 8}};
      const Buffer in[] = {{addr(o + 8), 8}};
      if (!q->add(out, in, next_token).ok()) {
        failed = true;
        break;
      }
      ++next_token;
      added = true;
    }
    if (added) q->publish();
    const std::uint64_t polled_before = next_expected;
    for (;;) {
      auto r = q->poll();
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
      const std::uint8_t* o = m.data() + (next_expected % kSlots) * 16;
      std::uint8_t src[8];
      std::memcpy(src, &next_expected, 8);
      for (int k = 0; k < 8; ++k) {
        if (o[8 + k] != static_cast<std::uint8_t>(src[k] + 1)) {
          ADD_FAILURE() << "bad data for token " << next_expected;
          failed = true;
        }
      }
      ++next_expected;
    }
    if (!added && next_expected == polled_before) std::this_thread::yield();
  }
  stop.store(true, std::memory_order_relaxed);
  device.join();
  EXPECT_FALSE(failed);
  EXPECT_EQ(next_expected, kTotal);
  EXPECT_EQ(q->free_count(), kSize);
  EXPECT_TRUE(dev.errors().empty()) << dev.errors().front();
}

// Driver and device see the same memfd pages at two different addresses; the
// device gets bus addresses (offsets plus a base) and translates them to its
// own view, so nothing may depend on a pointer being the same on both sides.
TEST(SplitQueue, DualMappedMemfd) {
  constexpr std::uint16_t kSize = 16;  // four 4-descriptor chains per batch
  Layout lay(kSize, 4096);
  const int fd = memfd_create("uvirtio-split-test", 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, static_cast<off_t>(lay.total)), 0);
  void* a = mmap(nullptr, lay.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  void* b = mmap(nullptr, lay.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  ASSERT_NE(a, MAP_FAILED);
  ASSERT_NE(b, MAP_FAILED);
  ASSERT_NE(a, b);
  auto* drv = static_cast<std::uint8_t*>(a);
  auto* devv = static_cast<std::uint8_t*>(b);
  constexpr std::uint64_t kBus = 0x7f0000000000ull;
  auto q = SplitQueue::create(kSize, drv + lay.desc, drv + lay.avail, drv + lay.used, kName);
  ASSERT_TRUE(q.ok());
  SoftDevice dev(kSize, devv + lay.desc, devv + lay.avail, devv + lay.used,
                 [&](std::uint64_t x) { return devv + (x - kBus); });
  for (std::uint64_t t = 0; t < 100; ++t) {
    const std::size_t off = lay.data + (t % 4) * 512;
    for (std::size_t k = 0; k < 100; ++k) drv[off + k] = static_cast<std::uint8_t>(t + k);
    const Buffer out[] = {{kBus + off, 60}, {kBus + off + 60, 40}};
    const Buffer in[] = {{kBus + off + 100, 50}, {kBus + off + 150, 200}};
    ASSERT_TRUE(q->add(out, in, t).ok());
    if (t % 4 != 3) continue;
    q->publish();
    EXPECT_EQ(dev.process(), 4);
    for (std::uint64_t u = t - 3; u <= t; ++u) {
      auto r = q->poll();
      ASSERT_TRUE(r.ok() && r->has_value());
      EXPECT_EQ((*r)->token, u);
      EXPECT_EQ((*r)->len, 100u);
      const std::size_t uo = lay.data + (u % 4) * 512;
      for (std::size_t k = 0; k < 100; ++k) {
        ASSERT_EQ(drv[uo + 100 + k], static_cast<std::uint8_t>(u + k + 1)) << u;
      }
    }
  }
  EXPECT_EQ(q->free_count(), kSize);
  EXPECT_TRUE(dev.errors().empty()) << dev.errors().front();
  munmap(a, lay.total);
  munmap(b, lay.total);
}

// ---- hostile device ----

// Two chains in flight: head 0 (out 16 + in 32 bytes, token 100) and head 2
// (out 8 bytes only, token 200), both taken by the device.
class SplitQueueHostile : public ::testing::Test {
 protected:
  void SetUp() override {
    auto r = m.create();
    ASSERT_TRUE(r.ok());
    q.emplace(std::move(r).value());
    const Buffer o[] = {{0x1000, 16}};
    const Buffer i[] = {{0x2000, 32}};
    const Buffer ro[] = {{0x3000, 8}};
    ASSERT_EQ(*q->add(o, i, 100), 0);
    ASSERT_EQ(*q->add(ro, {}, 200), 2);
    q->publish();
    ASSERT_TRUE(dev.pop().has_value());
    ASSERT_TRUE(dev.pop().has_value());
  }
  void Snapshot() { snapshot = m.driver_areas(); }

  // `r` is the poll that met the bad data; checks the error and that the
  // queue stays broken and leaves ring memory alone from then on.
  void ExpectBroken(const Result<std::optional<Completion>>& r, const std::string& cause,
                    std::uint16_t free) {
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Errc::bad_device_data);
    EXPECT_EQ(r.error().device(), kName);
    EXPECT_EQ(r.error().op(), "poll used ring");
    EXPECT_EQ(r.error().cause(), cause);
    EXPECT_EQ(r.error().message(), std::string(kName) + ": poll used ring: " + cause);
    EXPECT_TRUE(q->broken());
    EXPECT_EQ(m.driver_areas(), snapshot);
    EXPECT_EQ(q->free_count(), free);

    const Buffer b[] = {{0x4000, 4}};
    auto a = q->add(b, {}, 300);
    ASSERT_FALSE(a.ok());
    EXPECT_EQ(a.error().code(), Errc::broken);
    EXPECT_EQ(a.error().device(), kName);
    auto p = q->poll();
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.error().code(), Errc::broken);
    EXPECT_EQ(p.error().device(), kName);
    dev.complete(0, 0);  // even a now-valid entry is not looked at
    EXPECT_EQ(q->poll().error().code(), Errc::broken);
    EXPECT_FALSE(q->has_used());
    EXPECT_FALSE(q->publish());
    q->set_interrupts(false);
    EXPECT_EQ(m.driver_areas(), snapshot);
    EXPECT_EQ(q->free_count(), free);
    EXPECT_TRUE(m.guards_intact());
  }

  RingMem m{8};
  std::optional<SplitQueue> q;
  SoftDevice dev{m};
  std::vector<std::uint8_t> snapshot;
};

TEST_F(SplitQueueHostile, UsedIndexJumpsAhead) {
  Snapshot();
  dev.set_used_idx(9);
  ExpectBroken(q->poll(), "used index 9 is 9 entries ahead of the last seen 0 (queue size 8)", 5);
}

TEST_F(SplitQueueHostile, UsedIndexJumpsAheadAfterProgressAndWrap) {
  dev.complete(2, 0);
  auto r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->token, 200u);
  Snapshot();
  dev.set_used_idx(0);  // 65535 ahead of 1
  ExpectBroken(q->poll(), "used index 0 is 65535 entries ahead of the last seen 1 (queue size 8)", 6);
}

TEST_F(SplitQueueHostile, IdOutOfRange) {
  Snapshot();
  dev.complete(8, 0);
  ExpectBroken(q->poll(), "used id 8 out of range", 5);
}

TEST_F(SplitQueueHostile, IdOutOfRangeThatTruncatesToALiveHead) {
  Snapshot();
  dev.complete(0x10000, 0);  // low 16 bits are head 0
  ExpectBroken(q->poll(), "used id 65536 out of range", 5);
}

TEST_F(SplitQueueHostile, IdCompletedTwice) {
  dev.complete(0, 32);
  auto r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->token, 100u);
  EXPECT_EQ((*r)->len, 32u);
  Snapshot();
  dev.complete(0, 1);
  ExpectBroken(q->poll(), "used id 0 not in flight", 7);
}

TEST_F(SplitQueueHostile, IdOfANonHeadDescriptor) {
  Snapshot();
  dev.complete(1, 0);  // second descriptor of chain 0
  ExpectBroken(q->poll(), "used id 1 not in flight", 5);
}

TEST_F(SplitQueueHostile, IdOfAFreeDescriptor) {
  Snapshot();
  dev.complete(5, 0);
  ExpectBroken(q->poll(), "used id 5 not in flight", 5);
}

TEST_F(SplitQueueHostile, LenLargerThanWritableBytes) {
  Snapshot();
  dev.complete(0, 33);
  ExpectBroken(q->poll(), "used len 33 exceeds the 32 device-writable bytes of chain 0", 5);
}

TEST_F(SplitQueueHostile, LenOnReadOnlyChain) {
  Snapshot();
  dev.complete(2, 1);
  ExpectBroken(q->poll(), "used len 1 exceeds the 0 device-writable bytes of chain 2", 5);
}

TEST_F(SplitQueueHostile, BadSecondEntryAfterAGoodOne) {
  dev.complete(2, 0);
  dev.complete(0, 0xFFFFFFFFu);
  auto r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->token, 200u);
  EXPECT_EQ((*r)->len, 0u);
  Snapshot();
  ExpectBroken(q->poll(), "used len 4294967295 exceeds the 32 device-writable bytes of chain 0", 6);
}

}  // namespace
}  // namespace uvirtio::rings
