// Unit tests for the packed virtqueue (driver role) against a software device.
//
// PackedDevice below plays the device side of virtio spec 1.2, 2.8: it keeps
// its own ring position and Device Ring Wrap Counter, takes chains whose head
// is available for that counter, writes into device-writable buffers, and
// writes used descriptors at its used position, skipping by the chain length
// (2.8.6), one at a time or as a batch whose first flags are stored last
// (2.8.9). It also checks what the driver wrote (a chain descriptor not
// available for its lap, readable after writable, ids that differ within a
// chain, an id handed out twice), so a driver bug shows up as a device error.
// Buffer addresses are the driver's virtual addresses.
#include "uvirtio/rings/packed.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <utility>
#include <vector>

namespace uvirtio::rings {
namespace {

constexpr const char* kName = "0000:00:04.0 queue 2";

std::uint16_t load_acquire(le16& f) {
  return le16::from_raw(std::atomic_ref<std::uint16_t>(f.raw()).load(std::memory_order_acquire));
}
void store_release(le16& f, std::uint16_t v) {
  std::atomic_ref<std::uint16_t>(f.raw()).store(le16::to_raw(v), std::memory_order_release);
}
std::size_t align_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }
std::uint64_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// Flags of a used descriptor written with device wrap counter `wrap` (2.8.1).
std::uint16_t used_flags(bool wrap) {
  return wrap ? static_cast<std::uint16_t>(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) : std::uint16_t{0};
}

// Heap memory for a queue of `n` entries: descriptor ring, driver and device
// event areas and a data area, with 0xEE guard gaps between them.
struct PackedMem {
  static constexpr std::size_t kGuard = 64;
  explicit PackedMem(std::uint16_t n, std::size_t data_bytes = 0) : size(n) {
    desc_off = kGuard;
    drv_off = align_up(desc_off + PackedLayout::desc_bytes(n) + kGuard, 16);
    dev_off = align_up(drv_off + PackedLayout::event_bytes() + kGuard, 16);
    data_off = align_up(dev_off + PackedLayout::event_bytes() + kGuard, 64);
    total = align_up(data_off + data_bytes + kGuard, 4096);
    mem.reset(static_cast<std::uint8_t*>(std::aligned_alloc(4096, total)));
    std::memset(mem.get(), 0xEE, total);
  }
  std::uint8_t* desc() const { return mem.get() + desc_off; }
  std::uint8_t* drv_event() const { return mem.get() + drv_off; }
  std::uint8_t* dev_event() const { return mem.get() + dev_off; }
  std::uint8_t* data() const { return mem.get() + data_off; }
  PvirtqDesc* ring() const { return reinterpret_cast<PvirtqDesc*>(desc()); }
  Result<PackedQueue> create() const {
    return PackedQueue::create(size, desc(), drv_event(), dev_event(), kName);
  }
  bool guards_intact() const {
    const std::size_t starts[] = {0, desc_off + PackedLayout::desc_bytes(size), drv_off + 4, dev_off + 4};
    const std::size_t stops[] = {desc_off, drv_off, dev_off, data_off};
    for (int r = 0; r < 4; ++r) {
      for (std::size_t i = starts[r]; i < stops[r]; ++i) {
        if (mem[i] != 0xEE) return false;
      }
    }
    return true;
  }
  std::vector<std::uint8_t> bytes() const { return {mem.get(), mem.get() + total}; }

  std::uint16_t size;
  std::size_t desc_off, drv_off, dev_off, data_off, total;
  std::unique_ptr<std::uint8_t[], decltype(&std::free)> mem{nullptr, &std::free};
};

struct Seg {
  std::uint8_t* p;
  std::uint32_t len;
  bool write;
};
struct Chain {
  std::uint16_t id = 0;
  std::uint16_t pos = 0;    // ring position of the head
  std::uint16_t count = 0;  // descriptors
  std::vector<Seg> segs;
};

class PackedDevice {
 public:
  PackedDevice(std::uint16_t size, void* desc, void* drv_event, void* dev_event)
      : size_(size),
        desc_(static_cast<PvirtqDesc*>(desc)),
        drv_event_(static_cast<PvirtqEventSuppress*>(drv_event)),
        dev_event_(static_cast<PvirtqEventSuppress*>(dev_event)) {}
  explicit PackedDevice(const PackedMem& m) : PackedDevice(m.size, m.desc(), m.drv_event(), m.dev_event()) {}

  // The next chain the driver made available (2.8.1: AVAIL equal to our wrap
  // counter, USED not), or nullopt.
  std::optional<Chain> pop() {
    const std::uint16_t head_flags = load_acquire(desc_[avail_pos_].flags);
    if (!available(head_flags, avail_wrap_)) return std::nullopt;
    Chain c;
    c.pos = avail_pos_;
    std::uint16_t pos = avail_pos_;
    bool wrap = avail_wrap_, seen_write = false;
    for (;;) {
      if (c.count == size_) return error("chain longer than the ring");
      const PvirtqDesc& d = desc_[pos];
      const std::uint16_t flags = c.count == 0 ? head_flags : d.flags.get();
      if (!available(flags, wrap)) return error("chain descriptor not available for its lap");
      const bool w = (flags & VIRTQ_DESC_F_WRITE) != 0;
      if (!w && seen_write) return error("readable descriptor after a writable one");
      if ((flags & VIRTQ_DESC_F_INDIRECT) != 0) return error("unexpected indirect descriptor");
      seen_write |= w;
      if (c.count > 0 && d.id.get() != c.id) return error("ids differ within a chain");
      c.id = d.id.get();
      c.segs.push_back(
          {reinterpret_cast<std::uint8_t*>(static_cast<std::uintptr_t>(d.addr.get())), d.len.get(), w});
      ++c.count;
      if (++pos == size_) {
        pos = 0;
        wrap = !wrap;
      }
      if ((flags & VIRTQ_DESC_F_NEXT) == 0) break;
    }
    if (c.id >= size_) return error("buffer id out of range");
    if (held_.count(c.id) != 0) return error("buffer id given while the device still holds it");
    held_[c.id] = c.count;
    avail_pos_ = pos;
    avail_wrap_ = wrap;
    return c;
  }

  // Writes one used descriptor at the used position and skips by the
  // chain's length (2.8.6).
  void complete(std::uint16_t id, std::uint32_t len) { complete_batch({{id, len}}); }

  // Writes several used descriptors; the first one's flags go last so the
  // driver sees the batch at once (2.8.9).
  void complete_batch(const std::vector<std::pair<std::uint16_t, std::uint32_t>>& done) {
    std::uint16_t first_pos = used_pos_;
    bool first_wrap = used_wrap_;
    for (std::size_t k = 0; k < done.size(); ++k) {
      const auto [id, len] = done[k];
      auto it = held_.find(id);
      if (it == held_.end()) {
        error("completing an id the device does not hold");
        return;
      }
      PvirtqDesc& d = desc_[used_pos_];
      d.id.set(id);
      d.len.set(len);
      if (k > 0) store_release(d.flags, used_flags(used_wrap_));
      const std::uint32_t next = std::uint32_t{used_pos_} + it->second;
      used_pos_ = static_cast<std::uint16_t>(next % size_);
      if (next >= size_) used_wrap_ = !used_wrap_;
      held_.erase(it);
    }
    if (!done.empty()) store_release(desc_[first_pos].flags, used_flags(first_wrap));
  }

  // A raw used-descriptor write anywhere (hostile tests).
  void write_used(std::uint16_t pos, std::uint16_t id, std::uint32_t len, std::uint16_t flags) {
    desc_[pos].id.set(id);
    desc_[pos].len.set(len);
    store_release(desc_[pos].flags, flags);
  }

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
  // Pops and echoes every available chain, then completes them as one batch.
  int process_batch() {
    std::vector<std::pair<std::uint16_t, std::uint32_t>> done;
    while (auto c = pop()) done.emplace_back(c->id, echo(*c));
    complete_batch(done);
    return static_cast<int>(done.size());
  }

  std::uint16_t driver_event_flags() { return load_acquire(drv_event_->flags); }
  std::uint16_t driver_event_desc() { return load_acquire(drv_event_->desc); }
  void set_device_event_flags(std::uint16_t v) { store_release(dev_event_->flags, v); }
  std::uint16_t used_pos() const { return used_pos_; }
  bool used_wrap() const { return used_wrap_; }
  const std::vector<std::string>& errors() const { return errors_; }

 private:
  static bool available(std::uint16_t flags, bool wrap) {
    return ((flags & VIRTQ_DESC_F_AVAIL) != 0) == wrap && ((flags & VIRTQ_DESC_F_USED) != 0) != wrap;
  }
  std::nullopt_t error(const char* what) {
    errors_.push_back(what);
    return std::nullopt;
  }
  std::uint16_t size_;
  PvirtqDesc* desc_;
  PvirtqEventSuppress* drv_event_;
  PvirtqEventSuppress* dev_event_;
  std::uint16_t avail_pos_ = 0, used_pos_ = 0;
  bool avail_wrap_ = true, used_wrap_ = true;    // Device Ring Wrap Counter, starts at 1 (2.8.1)
  std::map<std::uint16_t, std::uint16_t> held_;  // id -> descriptors
  std::vector<std::string> errors_;
};

// ---- create() ----

TEST(PackedQueueCreate, AcceptsAnySizeUpTo32768) {
  for (std::uint16_t n : std::initializer_list<std::uint16_t>{1, 2, 3, 5, 8, 100, 257, 32767, 32768}) {
    PackedMem m(n);
    auto q = m.create();
    ASSERT_TRUE(q.ok()) << n << ": " << q.error().message();
    EXPECT_EQ(q->size(), n);
    EXPECT_EQ(q->free_count(), n);
    EXPECT_EQ(q->in_flight(), 0);
    EXPECT_FALSE(q->broken());
    EXPECT_FALSE(q->has_used());
    EXPECT_TRUE(q->outstanding_tokens().empty());
    EXPECT_EQ(q->name(), kName);
    EXPECT_TRUE(m.guards_intact());
  }
}

TEST(PackedQueueCreate, RejectsBadSizes) {
  PackedMem m(8);
  for (std::uint16_t n : std::initializer_list<std::uint16_t>{0, 32769, 40000, 65535}) {
    auto q = PackedQueue::create(n, m.desc(), m.drv_event(), m.dev_event(), kName);
    ASSERT_FALSE(q.ok()) << n;
    EXPECT_EQ(q.error().code(), Errc::invalid_argument);
    EXPECT_EQ(q.error().device(), kName);
    EXPECT_EQ(q.error().cause(), "size " + std::to_string(n) + " is not in [1, 32768]");
  }
}

TEST(PackedQueueCreate, RejectsNullAndMisalignedPointersWithoutTouchingMemory) {
  PackedMem m(8);
  std::memset(m.mem.get(), 0xAB, m.total);
  struct Case {
    void* d;
    void* drv;
    void* dev;
  };
  const Case cases[] = {
      {nullptr, m.drv_event(), m.dev_event()},      {m.desc(), nullptr, m.dev_event()},
      {m.desc(), m.drv_event(), nullptr},           {m.desc() + 8, m.drv_event(), m.dev_event()},
      {m.desc(), m.drv_event() + 2, m.dev_event()}, {m.desc(), m.drv_event(), m.dev_event() + 1}};
  for (const Case& c : cases) {
    auto q = PackedQueue::create(8, c.d, c.drv, c.dev, kName);
    ASSERT_FALSE(q.ok());
    EXPECT_EQ(q.error().code(), Errc::invalid_argument);
    EXPECT_EQ(q.error().device(), kName);
  }
  for (std::size_t i = 0; i < m.total; ++i) ASSERT_EQ(m.mem[i], 0xAB) << i;
}

TEST(PackedQueueCreate, ZeroesExactlyTheRingAreas) {
  PackedMem m(5);
  std::memset(m.desc(), 0xCD, PackedLayout::desc_bytes(5));
  std::memset(m.drv_event(), 0xCD, 4);
  std::memset(m.dev_event(), 0xCD, 4);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  for (std::size_t i = 0; i < m.total; ++i) {
    const bool in_area = (i >= m.desc_off && i < m.desc_off + 80) || (i >= m.drv_off && i < m.drv_off + 4) ||
                         (i >= m.dev_off && i < m.dev_off + 4);
    ASSERT_EQ(m.mem[i], in_area ? 0 : 0xEE) << i;
  }
}

// ---- add() / poll() ----

TEST(PackedQueue, AddWritesDescriptorsWithWrapBitsAndChainsCrossTheRingEnd) {
  PackedMem m(4);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  PvirtqDesc* d = m.ring();
  const Buffer out[] = {{0x1000, 16}, {0x2000, 8}};
  const Buffer in[] = {{0x3000, 32}};
  auto id = q->add(out, in, 7);
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(*id, 0);
  const std::uint64_t addrs[] = {0x1000, 0x2000, 0x3000};
  const std::uint32_t lens[] = {16, 8, 32};
  const std::uint16_t flags[] = {VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_AVAIL,
                                 VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_AVAIL,
                                 VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_AVAIL};
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(d[i].addr.get(), addrs[i]) << i;
    EXPECT_EQ(d[i].len.get(), lens[i]) << i;
    EXPECT_EQ(d[i].id.get(), 0) << i;
    EXPECT_EQ(d[i].flags.get(), flags[i]) << i;
  }
  EXPECT_EQ(d[3].flags.get(), 0);
  EXPECT_EQ(q->free_count(), 1);
  EXPECT_EQ(q->in_flight(), 3);

  PackedDevice dev(m);
  auto c = dev.pop();  // add() publishes: the device sees it without publish()
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->count, 3);
  dev.complete(c->id, 32);
  auto r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->token, 7u);

  // Positions 3 then 0: the second descriptor is in the next lap, so its
  // AVAIL/USED bits are flipped (2.8.1).
  const Buffer two[] = {{0x4000, 4}, {0x5000, 4}};
  id = q->add({}, two, 8);
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(d[3].flags.get(), VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_AVAIL);
  EXPECT_EQ(d[0].flags.get(), VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_USED);
  EXPECT_EQ(d[3].id.get(), *id);
  EXPECT_EQ(d[0].id.get(), *id);
  EXPECT_EQ(d[0].addr.get(), 0x5000u);
  c = dev.pop();
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->pos, 3);
  EXPECT_EQ(c->count, 2);
  EXPECT_FALSE(q->has_used());
  dev.complete(c->id, 8);
  EXPECT_TRUE(q->has_used());
  r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value()) << r.error().message();
  EXPECT_EQ((*r)->token, 8u);
  EXPECT_EQ((*r)->len, 8u);
  EXPECT_EQ(dev.used_pos(), 1);
  EXPECT_FALSE(dev.used_wrap());
  EXPECT_FALSE(q->poll()->has_value());
  EXPECT_EQ(q->free_count(), 4);
  EXPECT_TRUE(dev.errors().empty()) << dev.errors().front();
  EXPECT_TRUE(m.guards_intact());
}

TEST(PackedQueue, RoundTripWritesDataThroughTheAddresses) {
  PackedMem m(8, 256);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  PackedDevice dev(m);
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
  EXPECT_TRUE(q->publish());
  EXPECT_FALSE(q->has_used());
  EXPECT_EQ(dev.process_batch(), 1);
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
  EXPECT_EQ(i1[6], 0);
  EXPECT_FALSE(q->has_used());
  auto none = q->poll();
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  EXPECT_EQ(q->free_count(), 8);
  EXPECT_TRUE(dev.errors().empty()) << dev.errors().front();
  EXPECT_TRUE(m.guards_intact());
}

// A chain longer than the whole queue (and not indirect) never fits: busy
// would have a caller that retries on busy loop forever. It is refused as
// invalid_argument, the ring untouched, also on an empty queue.
TEST(PackedQueue, AChainLongerThanTheQueueIsInvalidNotBusy) {
  PackedMem m(5);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  const Buffer b[] = {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}, {6, 1}};
  const auto before = m.bytes();
  for (const std::size_t outs : {std::size_t{6}, std::size_t{1}}) {
    auto r = q->add(std::span(b, outs), std::span(b + outs, 6 - outs), 0);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Errc::invalid_argument) << r.error().message();
    EXPECT_EQ(r.error().device(), kName);
    EXPECT_EQ(r.error().cause(), "the chain needs 6 descriptors, the queue has only 5");
  }
  EXPECT_EQ(m.bytes(), before);
  EXPECT_EQ(q->free_count(), 5);
  EXPECT_EQ(q->in_flight(), 0);
  ASSERT_TRUE(q->add(std::span(b, 5), {}, 1).ok());  // the whole queue still fits
  EXPECT_EQ(q->free_count(), 0);
  EXPECT_EQ(q->add(std::span(b, 1), {}, 2).error().code(), Errc::busy);
}

TEST(PackedQueue, FreeCountBusyWhenFullAndOutOfOrderCompletion) {
  PackedMem m(5);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  PackedDevice dev(m);
  const Buffer b[] = {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}, {6, 1}};
  ASSERT_TRUE(q->add(std::span(b, 2), std::span(b + 2, 1), 10).ok());  // positions 0-2
  EXPECT_EQ(q->free_count(), 2);
  EXPECT_EQ(q->in_flight(), 3);
  const auto before = m.bytes();
  auto busy = q->add(std::span(b, 2), std::span(b, 1), 11);
  ASSERT_FALSE(busy.ok());
  EXPECT_EQ(busy.error().code(), Errc::busy);
  EXPECT_EQ(busy.error().cause(), "3 descriptors needed, 2 free");
  EXPECT_EQ(busy.error().device(), kName);
  EXPECT_EQ(m.bytes(), before);
  EXPECT_EQ(q->free_count(), 2);
  ASSERT_TRUE(q->add(std::span(b, 2), {}, 12).ok());  // positions 3-4
  EXPECT_EQ(q->free_count(), 0);
  EXPECT_EQ(q->add(std::span(b, 1), {}, 13).error().code(), Errc::busy);
  auto c1 = dev.pop(), c2 = dev.pop();
  ASSERT_TRUE(c1 && c2);
  // Second request first: its used descriptor lands at position 0 and the
  // device skips 2; the first lands at position 2 and skips 3.
  dev.complete(c2->id, 0);
  auto r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value()) << r.error().message();
  EXPECT_EQ((*r)->token, 12u);
  EXPECT_EQ(q->free_count(), 2);
  EXPECT_FALSE(q->poll()->has_value());
  dev.complete(c1->id, 1);
  r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value()) << r.error().message();
  EXPECT_EQ((*r)->token, 10u);
  EXPECT_EQ((*r)->len, 1u);
  EXPECT_EQ(q->free_count(), 5);

  // A full ring of single-descriptor chains, completed in reverse as one batch.
  for (std::uint64_t t = 0; t < 5; ++t) ASSERT_TRUE(q->add(std::span(b, 1), {}, 100 + t).ok());
  EXPECT_EQ(q->add(std::span(b, 1), {}, 105).error().code(), Errc::busy);
  std::vector<std::pair<std::uint16_t, std::uint32_t>> done;
  while (auto c = dev.pop()) done.emplace_back(c->id, 0);
  ASSERT_EQ(done.size(), 5u);
  std::reverse(done.begin(), done.end());
  dev.complete_batch(done);
  for (std::uint64_t t = 0; t < 5; ++t) {
    r = q->poll();
    ASSERT_TRUE(r.ok() && r->has_value()) << t;
    EXPECT_EQ((*r)->token, 104 - t);
  }
  EXPECT_FALSE(q->poll()->has_value());
  EXPECT_EQ(q->free_count(), 5);
  EXPECT_TRUE(dev.errors().empty()) << dev.errors().front();
}

TEST(PackedQueue, RejectsBadChainsWithoutChangingState) {
  PackedMem m(8);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  const auto before = m.bytes();
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
  EXPECT_EQ(m.bytes(), before);
  EXPECT_EQ(q->free_count(), 8);
  EXPECT_FALSE(q->broken());

  // Exactly 2^32-1 writable bytes is fine, and the device may use them all.
  const Buffer max[] = {{1, 0xFFFFFFF0u}, {2, 0xF}};
  ASSERT_TRUE(q->add({}, max, 9).ok());
  PackedDevice dev(m);
  auto c = dev.pop();
  ASSERT_TRUE(c.has_value());
  dev.complete(c->id, 0xFFFFFFFFu);
  auto r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value()) << r.error().message();
  EXPECT_EQ((*r)->len, 0xFFFFFFFFu);
}

TEST(PackedQueue, RejectsChainsOverFourGiBInTotal) {
  // 2.7.5.1: a driver MUST NOT add a chain longer than 2^32 bytes in total,
  // readable bytes included (a device refuses such a chain as malformed).
  PackedMem m(8);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  const auto before = m.bytes();
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
  EXPECT_EQ(m.bytes(), before);
  EXPECT_EQ(q->free_count(), 8);
  // Exactly 2^32 bytes is fine.
  EXPECT_TRUE(q->add(std::span<const Buffer>(big).first(1), std::span<const Buffer>(one).first(1), 2).ok());
}

// > 70000 requests through small queues of odd and power-of-two size: both
// wrap counters flip thousands of times, chains of 1-3 descriptors cross the
// ring end, completions come back shuffled, batched, and some only in a later
// round. Data written by the device is checked for every request.
class PackedQueueWrap : public ::testing::TestWithParam<std::uint16_t> {};

TEST_P(PackedQueueWrap, WrapCountersFlipManyTimes) {
  const std::uint16_t n = GetParam();
  constexpr std::size_t kSlot = 64;
  PackedMem m(n, n * kSlot);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  PackedDevice dev(m);
  std::mt19937 rng(n);
  constexpr std::uint64_t kTotal = 75000;
  std::vector<std::size_t> free_slots;
  for (std::size_t s = 0; s < n; ++s) free_slots.push_back(s);
  struct Req {
    std::size_t slot;
    int shape;
    std::uint16_t descs;
  };
  std::map<std::uint64_t, Req> live;                           // token -> request
  std::map<std::uint16_t, std::uint64_t> by_id;                // buffer id -> token
  std::vector<Chain> held;                                     // popped, not yet completed
  std::deque<std::pair<std::uint64_t, std::uint32_t>> expect;  // completion order
  std::uint64_t token = 0, done = 0, descs_total = 0;
  while (done < kTotal) {
    // Fill: out 8 / out 8 + in 8 / in 8 / out 4 + in 8 + in 8.
    while (token < kTotal) {
      const int shape = static_cast<int>(rng() % (n >= 3 ? 4u : n == 2 ? 3u : 1u));
      const std::uint16_t need = shape == 1 ? 2 : shape == 3 ? 3 : 1;
      if (need > q->free_count()) {
        const Buffer one[] = {{1, 1}, {2, 1}, {3, 1}};
        auto r = q->add(std::span(one, need), {}, 0);
        ASSERT_EQ(r.error().code(), Errc::busy);
        break;
      }
      ASSERT_FALSE(free_slots.empty());
      const std::size_t slot = free_slots.back();
      free_slots.pop_back();
      std::uint8_t* p = m.data() + slot * kSlot;
      std::memset(p, 0, kSlot);
      for (unsigned k = 0; k < 8; ++k) p[k] = static_cast<std::uint8_t>(token * 7 + k);
      const Buffer o8[] = {{addr(p), 8}}, o4[] = {{addr(p), 4}};
      const Buffer i8[] = {{addr(p + 16), 8}}, i88[] = {{addr(p + 16), 8}, {addr(p + 32), 8}};
      Result<std::uint16_t> r = shape == 0   ? q->add(o8, {}, token)
                                : shape == 1 ? q->add(o8, i8, token)
                                : shape == 2 ? q->add({}, i8, token)
                                             : q->add(o4, i88, token);
      ASSERT_TRUE(r.ok()) << r.error().message();
      ASSERT_EQ(by_id.count(*r), 0u);
      by_id[*r] = token;
      live[token] = {slot, shape, need};
      ++token;
    }
    while (auto c = dev.pop()) held.push_back(*c);
    // Complete a random non-empty subset, shuffled, one by one or batched.
    std::shuffle(held.begin(), held.end(), rng);
    const std::size_t k = held.empty() ? 0 : 1 + rng() % held.size();
    std::vector<std::pair<std::uint16_t, std::uint32_t>> batch;
    for (std::size_t j = 0; j < k; ++j) {
      const std::uint32_t len = PackedDevice::echo(held[j]);
      batch.emplace_back(held[j].id, len);
      expect.emplace_back(by_id.at(held[j].id), len);
    }
    held.erase(held.begin(), held.begin() + static_cast<std::ptrdiff_t>(k));
    if (rng() % 2 == 0) {
      dev.complete_batch(batch);
    } else {
      for (const auto& [id, len] : batch) dev.complete(id, len);
    }
    while (!expect.empty()) {
      auto r = q->poll();
      ASSERT_TRUE(r.ok()) << r.error().message();
      ASSERT_TRUE(r->has_value());
      const auto [t, len] = expect.front();
      expect.pop_front();
      ASSERT_EQ((*r)->token, t);
      ASSERT_EQ((*r)->len, len);
      const Req req = live.at(t);
      const std::uint8_t* p = m.data() + req.slot * kSlot;
      const std::uint32_t want_len[] = {0, 8, 8, 4};
      ASSERT_EQ(len, want_len[req.shape]) << "shape " << req.shape;
      for (std::uint32_t b = 0; b < len; ++b) {
        const auto want = req.shape == 2 ? std::uint8_t{0x5A} : static_cast<std::uint8_t>(p[b] + 1);
        ASSERT_EQ(p[16 + b], want) << "token " << t << " byte " << b;
      }
      for (auto it = by_id.begin(); it != by_id.end(); ++it) {
        if (it->second == t) {
          by_id.erase(it);
          break;
        }
      }
      descs_total += req.descs;
      free_slots.push_back(req.slot);
      live.erase(t);
      ++done;
    }
    ASSERT_FALSE(q->poll()->has_value());
    ASSERT_EQ(q->in_flight(), [&] {
      std::uint16_t s = 0;
      for (const auto& [t, req] : live) s = static_cast<std::uint16_t>(s + req.descs);
      return s;
    }());
  }
  EXPECT_EQ(q->free_count(), n);
  EXPECT_TRUE(q->outstanding_tokens().empty());
  // The device's used position and wrap counter agree with the total count
  // of descriptors completed, which spans thousands of laps.
  EXPECT_GT(descs_total / n, 10000u);
  EXPECT_EQ(dev.used_pos(), static_cast<std::uint16_t>(descs_total % n));
  EXPECT_EQ(dev.used_wrap(), (descs_total / n) % 2 == 0);
  EXPECT_TRUE(dev.errors().empty()) << dev.errors().front();
  EXPECT_TRUE(m.guards_intact());
}

INSTANTIATE_TEST_SUITE_P(PackedSizes, PackedQueueWrap, ::testing::Values(1, 3, 5, 8));

// The device runs on its own thread, completing in batches; tokens must come
// back in order, once, with the device's data.
TEST(PackedQueue, ConcurrentDeviceThread) {
  constexpr std::uint16_t kSize = 13;
  constexpr std::uint64_t kTotal = 100000;
  constexpr std::size_t kSlots = kSize / 2;  // two descriptors per request
  PackedMem m(kSize, kSlots * 16);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  PackedDevice dev(m);
  std::atomic<bool> stop{false};
  std::thread device([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      if (dev.process_batch() == 0) std::this_thread::yield();
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

TEST(PackedQueue, PublishHonoursDeviceEventSuppression) {
  PackedMem m(4);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  PackedDevice dev(m);
  const Buffer b[] = {{1, 1}};
  ASSERT_TRUE(q->add(b, {}, 1).ok());
  EXPECT_TRUE(q->publish());  // ENABLE after create()
  dev.set_device_event_flags(RING_EVENT_FLAGS_DISABLE);
  EXPECT_FALSE(q->publish());
  EXPECT_TRUE(dev.pop().has_value());  // available even when no kick is wanted
  ASSERT_TRUE(q->add(b, {}, 2).ok());
  EXPECT_FALSE(q->publish());
  dev.set_device_event_flags(RING_EVENT_FLAGS_ENABLE);
  EXPECT_TRUE(q->publish());
  dev.set_device_event_flags(RING_EVENT_FLAGS_DESC);  // without EVENT_IDX undefined: kick
  EXPECT_TRUE(q->publish());
  dev.set_device_event_flags(3);  // reserved: kick, to be safe
  EXPECT_TRUE(q->publish());
  dev.set_device_event_flags(0xFFFC);  // reserved bits set: undefined, kick
  EXPECT_TRUE(q->publish());
  dev.set_device_event_flags(0xFFFD);  // DISABLE, but with reserved bits: kick
  EXPECT_TRUE(q->publish());
  dev.set_device_event_flags(RING_EVENT_FLAGS_DISABLE);
  EXPECT_FALSE(q->publish());
}

TEST(PackedQueue, SetInterruptsWritesDriverEventFlags) {
  PackedMem m(4);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  PackedDevice dev(m);
  EXPECT_EQ(dev.driver_event_flags(), RING_EVENT_FLAGS_ENABLE);
  q->set_interrupts(false);
  EXPECT_EQ(dev.driver_event_flags(), RING_EVENT_FLAGS_DISABLE);
  q->set_interrupts(false);
  EXPECT_EQ(dev.driver_event_flags(), RING_EVENT_FLAGS_DISABLE);
  q->set_interrupts(true);
  EXPECT_EQ(dev.driver_event_flags(), RING_EVENT_FLAGS_ENABLE);
  // The value comes from the shadow, not from whatever is in memory.
  reinterpret_cast<PvirtqEventSuppress*>(m.drv_event())->flags.set(0x8002);
  q->set_interrupts(false);
  EXPECT_EQ(dev.driver_event_flags(), RING_EVENT_FLAGS_DISABLE);
  EXPECT_EQ(dev.driver_event_desc(), 0);
  EXPECT_TRUE(m.guards_intact());
}

TEST(PackedQueue, OutstandingTokensAfterPartialCompletionAndResubmission) {
  PackedMem m(8);
  auto q = m.create();
  ASSERT_TRUE(q.ok());
  PackedDevice dev(m);
  const Buffer o[] = {{0x1000, 4}, {0x1100, 4}};
  const Buffer i[] = {{0x2000, 16}};
  ASSERT_TRUE(q->add(o, i, 10).ok());
  ASSERT_TRUE(q->add({}, i, 11).ok());
  ASSERT_TRUE(q->add(std::span(o, 1), {}, 12).ok());
  ASSERT_TRUE(q->add(std::span(o, 1), i, 13).ok());
  EXPECT_EQ(q->outstanding_tokens(), (std::vector<std::uint64_t>{10, 11, 12, 13}));
  std::vector<Chain> held;
  while (auto c = dev.pop()) held.push_back(*c);
  ASSERT_EQ(held.size(), 4u);
  dev.complete_batch({{held[3].id, 16}, {held[1].id, 2}});
  for (std::uint64_t want : {13u, 11u}) {
    auto r = q->poll();
    ASSERT_TRUE(r.ok() && r->has_value());
    EXPECT_EQ((*r)->token, want);
  }
  EXPECT_EQ(q->outstanding_tokens(), (std::vector<std::uint64_t>{10, 12}));
  ASSERT_TRUE(q->add(std::span(o, 1), {}, 14).ok());  // reuses a freed id
  EXPECT_EQ(q->outstanding_tokens(), (std::vector<std::uint64_t>{10, 12, 14}));
  EXPECT_EQ(q->in_flight(), 5);

  // After a device reset the owner builds a fresh queue and resubmits.
  const std::vector<std::uint64_t> redo = q->outstanding_tokens();
  auto q2 = m.create();
  ASSERT_TRUE(q2.ok());
  PackedDevice dev2(m);
  for (std::uint64_t t : redo) ASSERT_TRUE(q2->add(std::span(o, 1), {}, t).ok());
  EXPECT_EQ(q2->outstanding_tokens(), redo);
  std::vector<std::pair<std::uint16_t, std::uint32_t>> done;  // fake addresses: no echo
  while (auto c = dev2.pop()) done.emplace_back(c->id, 0);
  ASSERT_EQ(done.size(), 3u);
  dev2.complete_batch(done);
  for (std::uint64_t t : redo) {
    auto r = q2->poll();
    ASSERT_TRUE(r.ok() && r->has_value());
    EXPECT_EQ((*r)->token, t);
  }
  EXPECT_TRUE(q2->outstanding_tokens().empty());
  EXPECT_TRUE(dev.errors().empty()) << dev.errors().front();
  EXPECT_TRUE(dev2.errors().empty()) << dev2.errors().front();
}

// ---- hostile device ----

// Two chains in flight, both taken by the device: id 0 at positions 0-1
// (out 16 + in 32 bytes, token 100) and id 1 at position 2 (out 8 bytes
// only, token 200).
class PackedQueueHostile : public ::testing::Test {
 protected:
  void SetUp() override {
    auto r = m.create();
    ASSERT_TRUE(r.ok());
    q.emplace(std::move(r).value());
    const Buffer o[] = {{0x1000, 16}};
    const Buffer i[] = {{0x2000, 32}};
    const Buffer ro[] = {{0x3000, 8}};
    ASSERT_EQ(*q->add(o, i, 100), 0);
    ASSERT_EQ(*q->add(ro, {}, 200), 1);
    ASSERT_TRUE(dev.pop().has_value());
    ASSERT_TRUE(dev.pop().has_value());
  }
  void Snapshot() { snapshot = m.bytes(); }

  // `r` is the poll that met the bad data; checks the error, that the poll
  // wrote nothing, and that the queue stays broken and leaves memory alone.
  void ExpectBroken(const Result<std::optional<Completion>>& r, const std::string& cause,
                    std::uint16_t free) {
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Errc::bad_device_data);
    EXPECT_EQ(r.error().device(), kName);
    EXPECT_EQ(r.error().op(), "poll used ring");
    EXPECT_EQ(r.error().cause(), cause);
    EXPECT_EQ(r.error().message(), std::string(kName) + ": poll used ring: " + cause);
    EXPECT_TRUE(q->broken());
    EXPECT_EQ(m.bytes(), snapshot);
    EXPECT_EQ(q->free_count(), free);
    const auto tokens = q->outstanding_tokens();

    const Buffer b[] = {{0x4000, 4}};
    auto a = q->add(b, {}, 300);
    ASSERT_FALSE(a.ok());
    EXPECT_EQ(a.error().code(), Errc::broken);
    EXPECT_EQ(a.error().device(), kName);
    auto p = q->poll();
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.error().code(), Errc::broken);
    EXPECT_EQ(p.error().device(), kName);
    EXPECT_FALSE(q->publish());
    q->set_interrupts(false);
    EXPECT_EQ(m.bytes(), snapshot);
    // Even a now-valid used descriptor is not looked at.
    dev.write_used(0, 1, 0, used_flags(true));
    Snapshot();
    EXPECT_EQ(q->poll().error().code(), Errc::broken);
    EXPECT_FALSE(q->has_used());
    EXPECT_EQ(m.bytes(), snapshot);
    EXPECT_EQ(q->free_count(), free);
    EXPECT_EQ(q->outstanding_tokens(), tokens);
    EXPECT_TRUE(m.guards_intact());
  }

  PackedMem m{8};
  std::optional<PackedQueue> q;
  PackedDevice dev{m};
  std::vector<std::uint8_t> snapshot;
};

TEST_F(PackedQueueHostile, IdOutOfRange) {
  dev.write_used(0, 8, 0, used_flags(true));
  Snapshot();
  ExpectBroken(q->poll(), "used id 8 out of range", 5);
}

TEST_F(PackedQueueHostile, IdOutOfRangeMax) {
  dev.write_used(0, 0xFFFF, 0, used_flags(true));
  Snapshot();
  ExpectBroken(q->poll(), "used id 65535 out of range", 5);
}

TEST_F(PackedQueueHostile, IdNotInFlight) {
  dev.write_used(0, 5, 0, used_flags(true));
  Snapshot();
  ExpectBroken(q->poll(), "used id 5 not in flight", 5);
}

TEST_F(PackedQueueHostile, IdCompletedTwice) {
  dev.complete(0, 32);
  auto r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->token, 100u);
  EXPECT_EQ((*r)->len, 32u);
  dev.write_used(2, 0, 1, used_flags(true));  // id 0 again
  Snapshot();
  ExpectBroken(q->poll(), "used id 0 not in flight", 7);
}

TEST_F(PackedQueueHostile, LenLargerThanWritableBytes) {
  dev.complete(0, 33);
  Snapshot();
  ExpectBroken(q->poll(), "used len 33 exceeds the 32 device-writable bytes of chain 0", 5);
}

TEST_F(PackedQueueHostile, LenOnReadOnlyChain) {
  dev.complete(1, 1);
  Snapshot();
  ExpectBroken(q->poll(), "used len 1 exceeds the 0 device-writable bytes of chain 1", 5);
}

TEST_F(PackedQueueHostile, UsedBitWithoutAvailBit) {
  dev.write_used(0, 0, 0, VIRTQ_DESC_F_USED);  // AVAIL 0 / USED 1: the driver's pattern for lap 0
  Snapshot();
  ExpectBroken(q->poll(), "descriptor 0 of an in-flight chain has avail/used bits 0/1 (used wrap counter 1)",
               5);
}

TEST_F(PackedQueueHostile, StaleWrapBitsFromThePreviousLap) {
  dev.write_used(0, 0, 0, used_flags(false));  // "used" for wrap counter 0
  Snapshot();
  ExpectBroken(q->poll(), "descriptor 0 of an in-flight chain has avail/used bits 0/0 (used wrap counter 1)",
               5);
}

TEST_F(PackedQueueHostile, AvailableButNotYetUsedIsJustPending) {
  // AVAIL 1 / USED 0 is what the driver wrote: not used, not an error; the
  // device's id and len in it are not looked at.
  dev.write_used(0, 0xFFFF, 0xFFFFFFFFu, VIRTQ_DESC_F_AVAIL);
  EXPECT_FALSE(q->has_used());
  auto r = q->poll();
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
  EXPECT_FALSE(q->broken());
}

TEST_F(PackedQueueHostile, UsedDescriptorWithNothingInFlight) {
  dev.complete_batch({{1, 0}, {0, 32}});
  for (int k = 0; k < 2; ++k) {
    auto r = q->poll();
    ASSERT_TRUE(r.ok() && r->has_value());
  }
  EXPECT_EQ(q->in_flight(), 0);
  EXPECT_FALSE(q->poll()->has_value());
  dev.write_used(3, 0, 0, used_flags(true));  // "used" where nothing was made available
  EXPECT_TRUE(q->has_used());
  Snapshot();
  ExpectBroken(q->poll(), "used id 0 not in flight", 8);
}

TEST_F(PackedQueueHostile, OldWrapBitsAfterTheCounterFlipped) {
  dev.complete_batch({{0, 0}, {1, 0}});
  for (int k = 0; k < 2; ++k) ASSERT_TRUE(q->poll().ok());
  const Buffer five[] = {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}};
  const Buffer two[] = {{6, 1}, {7, 1}};
  ASSERT_TRUE(q->add(five, {}, 300).ok());  // positions 3-7
  ASSERT_TRUE(q->add(two, {}, 400).ok());   // positions 0-1, next lap
  auto c1 = dev.pop(), c2 = dev.pop();
  ASSERT_TRUE(c1 && c2);
  dev.complete(c1->id, 0);  // position 3, skips to 0 and flips
  auto r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->token, 300u);
  dev.write_used(0, c2->id, 0, used_flags(true));  // used for the old counter
  Snapshot();
  ExpectBroken(q->poll(), "descriptor 0 of an in-flight chain has avail/used bits 1/1 (used wrap counter 0)",
               6);
}

TEST_F(PackedQueueHostile, BadSecondEntryOfABatch) {
  dev.complete_batch({{1, 0}, {0, 0xFFFFFFFFu}});
  auto r = q->poll();
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->token, 200u);
  Snapshot();
  ExpectBroken(q->poll(), "used len 4294967295 exceeds the 32 device-writable bytes of chain 0", 6);
}

}  // namespace
}  // namespace uvirtio::rings
