// Fuzz target: SplitDeviceQueue (split virtqueue, device role, virtio spec 1.2
// 2.7) facing a hostile driver.
//
// The input is a script. The first byte picks the queue size (bits 0-2:
// 1..16), VIRTIO_F_IN_ORDER (bit 3) and the features (EVENT_IDX, INDIRECT_DESC,
// indirect table limit); then each op byte is followed by its arguments
// (missing bytes read as 0):
//   0 descriptor:   index, addr mode (in-window offset or raw 64-bit), len
//                   mode, flags, next
//   1 table entry:  a descriptor written into the data window (indirect tables)
//   2 avail slot:   slot, head (small or raw 16-bit)
//   3 avail idx:    last popped + small, or raw 16-bit (read by the queue
//                   only once it consumed what it saw before)
//   4 pop
//   5 push:         which held head (bit 7: a raw one; bit 5: the oldest), written mode
//   6 notify:       set_notifications / enable_notifications_and_check /
//                   should_interrupt / has_avail
//   7 driver flags: avail flags and used_event
// The model walks the ring itself (2.7.5, 2.7.5.3, 2.7.4.2, 2.7.13: the
// available index bound, heads and nexts in range, loops, readable before
// writable, indirect tables, translation, heads in flight, and with IN_ORDER
// descriptors in table order and chains completed oldest first), so pop()
// must return exactly nothing, the chain with exactly the model's spans, or
// bad_device_data. Traps on any mismatch, when the device writes the
// descriptor table or available ring, when pop writes anything at all, when
// used entries or indices differ from the model, or when a broken queue does
// anything but fail.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <iterator>
#include <map>
#include <optional>
#include <vector>

#include "fuzz_input.hpp"
#include "uvirtio/base/le.hpp"
#include "uvirtio/rings/split_device.hpp"

namespace {

using uvirtio::Errc;
using namespace uvirtio::rings;

using uvirtio::fuzz::Area;
using uvirtio::fuzz::check_spans;
using uvirtio::fuzz::Reader;

constexpr const char* kName = "fuzz device queue";
constexpr std::uint64_t kBus = 0x40000000ull;
constexpr std::size_t kWindow = 1024;

enum class Kind { none, bad, chain };
struct Expect {
  Kind kind = Kind::none;
  std::uint16_t head = 0;
  std::uint16_t descs = 0;  // ring descriptors of the chain
  std::uint16_t avail_idx = 0;
  std::vector<Buffer> rd, wr;
};

std::optional<std::size_t> window_offset(std::uint64_t a, std::uint32_t len) {
  if (a < kBus || a - kBus > kWindow || len > kWindow - (a - kBus)) return std::nullopt;
  return static_cast<std::size_t>(a - kBus);
}

struct Desc {
  std::uint64_t addr;
  std::uint32_t len;
  std::uint16_t flags, next;
};
Desc read_desc(const std::uint8_t* p) {
  return Desc{static_cast<std::uint64_t>(uvirtio::load_le32(p)) |
                  (static_cast<std::uint64_t>(uvirtio::load_le32(p + 4)) << 32),
              uvirtio::load_le32(p + 8), uvirtio::load_le16(p + 12), uvirtio::load_le16(p + 14)};
}

struct Config {
  std::uint16_t qsize;
  bool indirect, in_order;
  std::uint32_t max_indirect;
};

// The model's own walk of the next chain.
Expect predict(const Config& c, const std::uint8_t* desc, const std::uint8_t* avail,
               const std::uint8_t* window, std::uint16_t last_avail, std::uint16_t avail_cache,
               const std::map<std::uint16_t, std::uint64_t>& held, std::optional<std::uint16_t> expect_head) {
  Expect e;
  const auto mask = static_cast<std::uint16_t>(c.qsize - 1);
  e.avail_idx = avail_cache;
  if (last_avail == avail_cache) {
    e.avail_idx = uvirtio::load_le16(avail + 2);
    if (e.avail_idx == last_avail) return e;
  }
  e.kind = Kind::bad;
  if (static_cast<std::uint16_t>(e.avail_idx - last_avail) > c.qsize) return e;
  const std::uint16_t head = uvirtio::load_le16(avail + 4 + 2 * (last_avail & mask));
  if (head >= c.qsize || held.count(head) != 0) return e;
  if (c.in_order && expect_head && head != *expect_head) return e;
  bool seen_write = false;
  std::uint64_t total = 0;
  auto add = [&](const Desc& d) {
    const bool write = (d.flags & VIRTQ_DESC_F_WRITE) != 0;
    if (!write && seen_write) return false;
    seen_write |= write;
    total += d.len;
    if (total > (std::uint64_t{1} << 32)) return false;
    if (d.len != 0 && !window_offset(d.addr, d.len)) return false;
    (write ? e.wr : e.rd).push_back(Buffer{d.addr, d.len});
    return true;
  };
  std::uint16_t i = head;
  for (std::uint32_t count = 0;; ++count) {
    if (count == c.qsize) return e;
    const Desc d = read_desc(desc + 16u * i);
    if ((d.flags & VIRTQ_DESC_F_INDIRECT) != 0) {
      if (!c.indirect || (d.flags & VIRTQ_DESC_F_NEXT) != 0) return e;
      if (d.len == 0 || d.len % 16 != 0 || d.len / 16 > c.max_indirect) return e;
      const auto off = window_offset(d.addr, d.len);
      if (!off || *off % 8 != 0) return e;
      const std::uint32_t n = d.len / 16;
      std::uint32_t j = 0;
      for (std::uint32_t k = 0;; ++k) {
        if (k == n) return e;
        const Desc t = read_desc(window + *off + 16u * j);
        if ((t.flags & VIRTQ_DESC_F_INDIRECT) != 0 || !add(t)) return e;
        if ((t.flags & VIRTQ_DESC_F_NEXT) == 0) break;
        if (t.next >= n) return e;
        j = t.next;
      }
      e.descs = static_cast<std::uint16_t>(count + 1);
      break;
    }
    if (!add(d)) return e;
    if ((d.flags & VIRTQ_DESC_F_NEXT) == 0) {
      e.descs = static_cast<std::uint16_t>(count + 1);
      break;
    }
    if (d.next >= c.qsize) return e;
    if (c.in_order && d.next != ((i + 1u) & mask)) return e;
    i = d.next;
  }
  e.kind = Kind::chain;
  e.head = head;
  return e;
}

void write_desc(std::uint8_t* p, Reader& in) {
  const std::uint8_t amode = in.u8();
  const std::uint64_t addr = (amode & 1) ? in.u64() : kBus + static_cast<std::uint64_t>(amode >> 1) * 8;
  const std::uint8_t lmode = in.u8();
  const std::uint32_t len = (lmode & 0x80) ? in.u32() : lmode;
  const std::uint16_t flags = in.u8() & 7u;
  const std::uint16_t next = in.u8();
  VirtqDesc d;
  d.addr.set(addr);
  d.len.set(len);
  d.flags.set(flags);
  d.next.set(next);
  std::memcpy(p, &d, sizeof d);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  const std::uint8_t cfg = in.u8();
  const auto qsize = static_cast<std::uint16_t>(1u << ((cfg & 7u) % 5));
  const std::uint16_t mask = static_cast<std::uint16_t>(qsize - 1);
  Area desc(SplitLayout::desc_bytes(qsize)), avail(SplitLayout::avail_bytes(qsize)),
      used(SplitLayout::used_bytes(qsize)), window(kWindow);

  auto translate = [&](std::uint64_t a, std::uint32_t len, bool) -> std::optional<std::span<std::uint8_t>> {
    const auto off = window_offset(a, len);
    if (!off) return std::nullopt;
    return std::span<std::uint8_t>(window.p + *off, len);
  };
  auto created = SplitDeviceQueue::create(qsize, desc.p, avail.p, used.p, kName, translate);
  CHECK(created.ok());
  SplitDeviceQueue q = std::move(created).value();
  const bool event_idx = (cfg & 0x20) != 0;
  q.set_event_idx(event_idx);
  if (cfg & 0x40) q.set_indirect(true, (cfg >> 7) ? 4u : 0u);
  const Config conf{qsize, (cfg & 0x40) != 0, (cfg & 8) != 0, (cfg >> 7) ? 4u : qsize};
  CHECK(q.set_in_order(conf.in_order).ok());
  std::deque<std::uint16_t> order;  // in_order: heads popped and not pushed, oldest first
  // in_order: the head the next chain must have; a fresh ring starts at descriptor 0 (2.7.5)
  std::optional<std::uint16_t> expect_head;
  if (conf.in_order) expect_head = 0;

  std::map<std::uint16_t, std::uint64_t> held;  // head -> writable bytes
  std::uint16_t last_avail = 0, used_idx = 0;
  // The queue reads the available index again only when it has consumed
  // every entry it saw (as Linux and DPDK do); the model does the same.
  std::uint16_t avail_cache = 0;
  bool broken = false;
  std::vector<std::uint8_t> frozen_used;
  auto* uw = reinterpret_cast<uvirtio::le16*>(used.p);

  auto in_window = [&](const std::uint8_t* p, std::size_t n) {
    return p >= window.p && p <= window.p + kWindow && n <= static_cast<std::size_t>(window.p + kWindow - p);
  };

  while (!in.empty()) {
    const auto driver_before = desc.bytes();
    const auto avail_before = avail.bytes();
    bool device_op = true;
    switch (in.u8() % 8) {
      case 0:
        write_desc(desc.p + 16u * (in.u8() & mask), in);
        device_op = false;
        break;
      case 1:
        write_desc(window.p + (in.u8() % (kWindow / 16)) * 16, in);
        device_op = false;
        break;
      case 2: {
        const std::uint8_t slot = in.u8();
        const std::uint8_t hm = in.u8();
        const std::uint16_t head = (hm & 0x80) ? in.u16() : static_cast<std::uint16_t>(hm % (qsize + 1));
        uvirtio::store_le16(avail.p + 4 + 2 * (slot & mask), head);
        device_op = false;
        break;
      }
      case 3: {
        const std::uint8_t m = in.u8();
        uvirtio::store_le16(
            avail.p + 2,
            (m & 1) ? in.u16() : static_cast<std::uint16_t>(last_avail + (m >> 1) % (qsize + 2)));
        device_op = false;
        break;
      }
      case 4: {
        const auto used_before = used.bytes();
        const Expect want =
            predict(conf, desc.p, avail.p, window.p, last_avail, avail_cache, held, expect_head);
        const std::uint16_t aidx = want.avail_idx;
        auto r = q.pop();
        CHECK(used.bytes() == used_before);  // pop never writes
        if (broken) {
          CHECK(!r.ok() && r.error().code() == Errc::broken && r.error().device() == kName);
          break;
        }
        if (!r.ok()) {
          CHECK(want.kind == Kind::bad);
          CHECK(r.error().code() == Errc::bad_device_data && r.error().device() == kName);
          CHECK(q.broken());
          broken = true;
          frozen_used = used.bytes();
          break;
        }
        if (!r.value().has_value()) {
          CHECK(want.kind == Kind::none && aidx == last_avail);
          break;
        }
        CHECK(want.kind == Kind::chain);
        const auto& req = *r.value();
        CHECK(aidx != last_avail && static_cast<std::uint16_t>(aidx - last_avail) <= qsize);
        CHECK(req.head == want.head && req.head < qsize && held.count(req.head) == 0);
        CHECK(req.head == uvirtio::load_le16(avail.p + 4 + 2 * (last_avail & mask)));
        check_spans(req.readable, want.rd, window.p, kBus);
        check_spans(req.writable, want.wr, window.p, kBus);
        if (conf.in_order) {
          order.push_back(req.head);
          expect_head = static_cast<std::uint16_t>((req.head + want.descs) & mask);
        }
        std::uint64_t rb = 0, wb = 0;
        for (auto s : req.readable) {
          CHECK(s.empty() || in_window(s.data(), s.size()));
          rb += s.size();
        }
        for (auto s : req.writable) {
          CHECK(s.empty() || in_window(s.data(), s.size()));
          wb += s.size();
          if (!s.empty()) std::memset(s.data(), 0xAB, s.size());  // the device really writes
        }
        CHECK(rb == req.readable_bytes && wb == req.writable_bytes);
        CHECK(rb + wb <= (std::uint64_t{1} << 32));
        CHECK(req.readable.size() + req.writable.size() <= 2u * qsize);
        held[req.head] = wb;
        avail_cache = aidx;
        ++last_avail;
        break;
      }
      case 5: {
        const std::uint8_t sel = in.u8();
        std::uint16_t head;
        if ((sel & 0x80) || held.empty()) {
          head = in.u16();
        } else if ((sel & 0x20) && !order.empty()) {
          head = order.front();
        } else {
          head = std::next(held.begin(), static_cast<long>(sel % held.size()))->first;
        }
        const std::uint8_t wm = in.u8();
        std::uint32_t written = wm;
        auto it = held.find(head);
        if ((wm & 0x80) == 0 && it != held.end()) {
          written = static_cast<std::uint32_t>(wm % 3 == 0 ? it->second + 1 : (wm % 3 == 1 ? it->second : 0));
        }
        const auto used_before = used.bytes();
        auto r = q.push(head, written);
        if (broken) {
          CHECK(!r.ok() && r.error().code() == Errc::broken);
        } else if (it == held.end() || written > it->second || (conf.in_order && head != order.front())) {
          CHECK(!r.ok() && r.error().code() == Errc::invalid_argument && !q.broken());
          CHECK(used.bytes() == used_before);
        } else {
          CHECK(r.ok());
          const std::uint8_t* e = used.p + 4 + 8 * (used_idx & mask);
          CHECK(uvirtio::load_le32(e) == head && uvirtio::load_le32(e + 4) == written);
          ++used_idx;
          CHECK(uw[1].get() == used_idx);
          held.erase(it);
          if (conf.in_order) order.pop_front();
        }
        break;
      }
      case 6: {
        const std::uint8_t b = in.u8();
        switch (b % 4) {
          case 0:
            q.set_notifications((b & 4) != 0);
            if (!broken && !event_idx) CHECK(uw[0].get() == ((b & 4) ? 0 : VIRTQ_USED_F_NO_NOTIFY));
            if (!broken && event_idx) CHECK(uw[0].get() == 0);
            break;
          case 1: {
            const bool more = q.enable_notifications_and_check();
            CHECK(more == (!broken && uvirtio::load_le16(avail.p + 2) != last_avail));
            break;
          }
          case 2:
            if (broken)
              CHECK(!q.should_interrupt());
            else
              (void)q.should_interrupt();
            break;
          default:
            CHECK(q.has_avail() == (!broken && uvirtio::load_le16(avail.p + 2) != last_avail));
        }
        break;
      }
      case 7:
        uvirtio::store_le16(avail.p, in.u16());
        uvirtio::store_le16(avail.p + SplitLayout::used_event_offset(qsize), in.u16());
        device_op = false;
        break;
    }
    if (device_op) {  // the device never writes driver areas
      CHECK(desc.bytes() == driver_before);
      CHECK(avail.bytes() == avail_before);
    }
    CHECK(q.broken() == broken);
    if (!broken) CHECK(q.in_flight() == held.size());
    if (broken) CHECK(used.bytes() == frozen_used);
    if (!broken) CHECK(uw[1].get() == used_idx);
  }
  return 0;
}
