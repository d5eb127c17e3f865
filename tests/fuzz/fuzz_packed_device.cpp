// libFuzzer target: PackedDeviceQueue (packed virtqueue, device role, virtio
// spec 1.2 2.8) serving a ring whose driver is hostile, as vhost-pci serves a
// remote VM's queues. The driver side of the script writes anything anywhere
// in the driver's memory (descriptor ring, indirect tables in the buffer
// window, its event suppression area, even ours); the device side pops,
// pushes and publishes. A model of the device state (next available and used
// positions with their wrap counters, held buffer ids with their ring
// positions and writable bytes, the deferred batch, the in-order queue)
// predicts every result exactly:
// - pop() returns nothing, the chain, or bad_device_data exactly as the
//   model's own walk of the ring says (availability per lap, the free-position
//   bound, indirect rules, readable before writable, translation, ids in
//   flight); each returned span is exactly the translated buffer; pop never
//   writes the ring, and writes only the offset of our event area (EVENT_IDX
//   with notifications on);
// - push()/push_deferred()/publish_used() write exactly the used descriptors
//   the model computes (id, len, AVAIL/USED for the used wrap counter, WRITE
//   for writable chains; the first flags of a deferred batch last; with
//   VIRTIO_F_IN_ORDER one descriptor per batch) and nothing else; a caller
//   error is invalid_argument and leaves the queue usable and memory as it was;
// - once broken every call fails with Errc::broken and writes nothing.
// Any mismatch traps; ASan catches any access outside the areas.
//
// Input: byte 0 picks the queue size (bits 0-3: 1..16), VIRTIO_F_EVENT_IDX
// (bit 4), indirect tables (bit 5) with a limit of 3 entries (bit 6; else
// the queue size) and VIRTIO_F_IN_ORDER (bit 7). Then ops, op = byte % 8:
//   0 ring descriptor: position, addr mode (bit 0: 8 raw bytes, else an
//     8-aligned offset in the window), len mode (bit 7: 4 raw bytes), id mode
//     (bit 7: 2 raw bytes, else small), flags: bits 0-2 NEXT/WRITE/INDIRECT,
//     bits 3-4 how AVAIL/USED are set (available for the position's lap, used
//     for it, available for the other lap, raw from bits 5-6)
//   1 indirect table entry in the window: 8-aligned slot, then as op 0
//     (flag bits 0-2 and bit 7 as a reserved flag)
//   2 the driver writes its event suppression area (4 raw bytes)
//   3 pop
//   4 push: selector (bit 7: raw id; bit 6: push_deferred; bit 5: the oldest
//     held id), written mode (bit 7: raw; else writable+1 / writable / 0)
//   5 publish_used
//   6 notifications: byte % 4: set_notifications(bit 2),
//     enable_notifications_and_check, should_interrupt, has_avail
//   7 the driver scribbles our event suppression area (4 raw bytes)
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <iterator>
#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "fuzz_input.hpp"
#include "uvirtio/base/le.hpp"
#include "uvirtio/rings/packed_device.hpp"

namespace {

using uvirtio::Errc;
using namespace uvirtio::rings;

using uvirtio::fuzz::Area;
using uvirtio::fuzz::check_spans;
using uvirtio::fuzz::Reader;

constexpr const char* kName = "fuzz packed device queue";
constexpr std::uint64_t kBus = 0x40000000ull;
constexpr std::size_t kWindow = 1024;
constexpr std::size_t kReadOnly = 896;  // window offsets from here on refuse device writes

std::uint64_t get64(const std::uint8_t* p) {
  return static_cast<std::uint64_t>(uvirtio::load_le32(p)) |
         (static_cast<std::uint64_t>(uvirtio::load_le32(p + 4)) << 32);
}
void put64(std::uint8_t* p, std::uint64_t v) {
  uvirtio::store_le32(p, static_cast<std::uint32_t>(v));
  uvirtio::store_le32(p + 4, static_cast<std::uint32_t>(v >> 32));
}

// A descriptor as the model reads it (2.8.13: addr, len, id, flags).
struct Desc {
  std::uint64_t addr;
  std::uint32_t len;
  std::uint16_t id;
  std::uint16_t flags;
};
Desc read_desc(const std::uint8_t* p) {
  return Desc{get64(p), uvirtio::load_le32(p + 8), uvirtio::load_le16(p + 12), uvirtio::load_le16(p + 14)};
}

bool available(std::uint16_t flags, bool wrap) {
  return ((flags & VIRTQ_DESC_F_AVAIL) != 0) == wrap && ((flags & VIRTQ_DESC_F_USED) != 0) != wrap;
}

// The queue's translation, restated: [addr, addr+len) inside the window, and
// not in its read-only tail when the device will write.
std::optional<std::size_t> window_offset(std::uint64_t a, std::uint32_t len, bool write) {
  if (a < kBus || a - kBus > kWindow || len > kWindow - (a - kBus)) return std::nullopt;
  if (write && a - kBus + len > kReadOnly) return std::nullopt;
  return static_cast<std::size_t>(a - kBus);
}

struct Held {
  std::uint16_t count;  // ring positions of the chain
  std::uint64_t writable;
};

struct Model {
  std::uint16_t size = 0;
  bool event_idx = false, indirect = false, in_order = false;
  std::uint32_t max_indirect = 0;
  std::uint16_t avail_pos = 0, used_pos = 0;
  bool avail_wrap = true, used_wrap = true;
  std::uint32_t held_descs = 0;  // positions popped and not yet covered by a written used descriptor
  std::map<std::uint16_t, Held> held;
  std::deque<std::uint16_t> order;  // in_order: popped and not pushed, oldest first
  bool notify = true;
  std::uint64_t moved = 0;  // positions published since should_interrupt()
  // A deferred batch without in_order: the first used descriptor's flags wait.
  bool pending = false;
  std::uint16_t pending_pos = 0, pending_flags = 0;
  std::uint64_t pending_moved = 0;
  // A deferred batch with in_order: one used descriptor for all of it.
  std::uint16_t batch_count = 0, batch_id = 0;
  std::uint32_t batch_descs = 0, batch_len = 0;
  bool batch_writable = false;
  bool broken = false;
};

enum class Kind { none, bad, chain };
struct Expect {
  Kind kind = Kind::none;
  std::uint16_t id = 0;
  std::uint32_t count = 0;
  std::uint16_t end_pos = 0;
  bool end_wrap = true;
  std::vector<Buffer> rd, wr;
};

// The model's own walk of the next chain (2.8.1, 2.8.6, 2.8.7, 2.8.17, 2.8.19).
Expect predict(const Model& m, const std::uint8_t* ring, const std::uint8_t* window) {
  Expect e;
  if (m.held_descs >= m.size) return e;
  if (!available(read_desc(ring + 16u * m.avail_pos).flags, m.avail_wrap)) return e;
  e.kind = Kind::bad;
  const std::uint32_t bound = m.size - m.held_descs;
  std::uint16_t pos = m.avail_pos;
  bool wrap = m.avail_wrap;
  bool seen_write = false;
  std::uint64_t total = 0;
  auto add = [&](std::uint64_t addr, std::uint32_t len, bool write) {
    if (!write && seen_write) return false;
    seen_write |= write;
    total += len;
    if (total > (std::uint64_t{1} << 32)) return false;
    if (len != 0 && !window_offset(addr, len, write)) return false;
    (write ? e.wr : e.rd).push_back(Buffer{addr, len});
    return true;
  };
  for (std::uint32_t count = 0;; ++count) {
    if (count == bound) return e;
    const Desc d = read_desc(ring + 16u * pos);
    if (count != 0 && !available(d.flags, wrap)) return e;
    const bool last = (d.flags & VIRTQ_DESC_F_NEXT) == 0;
    if ((d.flags & VIRTQ_DESC_F_INDIRECT) != 0) {
      if (!m.indirect || count != 0 || !last) return e;
      if (d.len == 0 || d.len % 16 != 0 || d.len / 16 > m.max_indirect) return e;
      const auto off = window_offset(d.addr, d.len, false);
      if (!off || *off % 8 != 0) return e;
      for (std::uint32_t j = 0; j < d.len / 16; ++j) {
        const Desc t = read_desc(window + *off + 16u * j);
        if ((t.flags & VIRTQ_DESC_F_INDIRECT) != 0) return e;
        if (!add(t.addr, t.len, (t.flags & VIRTQ_DESC_F_WRITE) != 0)) return e;
      }
    } else if (!add(d.addr, d.len, (d.flags & VIRTQ_DESC_F_WRITE) != 0)) {
      return e;
    }
    if (++pos == m.size) {
      pos = 0;
      wrap = !wrap;
    }
    if (last) {
      if (m.held.count(d.id) != 0) return e;
      e.kind = Kind::chain;
      e.id = d.id;
      e.count = count + 1;
      e.end_pos = pos;
      e.end_wrap = wrap;
      return e;
    }
  }
}

std::uint16_t used_flags(bool wrap, bool writable) {
  std::uint16_t f = wrap ? static_cast<std::uint16_t>(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) : 0;
  if (writable) f = static_cast<std::uint16_t>(f | VIRTQ_DESC_F_WRITE);
  return f;
}

// Writes the used descriptor into the expected ring (flags unless deferred
// first) and moves the used position past `descs`.
void model_write_used(Model& m, std::vector<std::uint8_t>& ring, std::uint16_t id, std::uint32_t len,
                      bool writable, std::uint32_t descs, bool defer) {
  std::uint8_t* d = ring.data() + 16u * m.used_pos;
  uvirtio::store_le32(d + 8, len);
  uvirtio::store_le16(d + 12, id);
  const std::uint16_t flags = used_flags(m.used_wrap, writable);
  if (!defer) {
    uvirtio::store_le16(d + 14, flags);
  } else if (!m.pending) {
    m.pending = true;
    m.pending_pos = m.used_pos;
    m.pending_flags = flags;
  } else {
    uvirtio::store_le16(d + 14, flags);
  }
  const std::uint32_t next = std::uint32_t{m.used_pos} + descs;
  if (next >= m.size) {
    m.used_pos = static_cast<std::uint16_t>(next - m.size);
    m.used_wrap = !m.used_wrap;
  } else {
    m.used_pos = static_cast<std::uint16_t>(next);
  }
  m.held_descs -= descs;
  (defer ? m.pending_moved : m.moved) += descs;
}

void model_publish(Model& m, std::vector<std::uint8_t>& ring) {
  if (m.broken) return;
  if (m.pending) {
    uvirtio::store_le16(ring.data() + 16u * m.pending_pos + 14, m.pending_flags);
    m.pending = false;
    m.moved += m.pending_moved;
    m.pending_moved = 0;
  }
  if (m.batch_count == 0) return;
  model_write_used(m, ring, m.batch_id, m.batch_len, m.batch_writable, m.batch_descs, false);
  m.batch_count = 0;
  m.batch_descs = 0;
}

void model_device_event(const Model& m, std::vector<std::uint8_t>& dev) {
  if (!m.notify) {
    uvirtio::store_le16(dev.data() + 2, RING_EVENT_FLAGS_DISABLE);
  } else if (m.event_idx) {
    uvirtio::store_le16(dev.data(), packed_off_wrap(m.avail_pos, m.avail_wrap));
    uvirtio::store_le16(dev.data() + 2, RING_EVENT_FLAGS_DESC);
  } else {
    uvirtio::store_le16(dev.data() + 2, RING_EVENT_FLAGS_ENABLE);
  }
}

bool model_has_avail(const Model& m, const std::uint8_t* ring) {
  return !m.broken && m.held_descs < m.size &&
         available(read_desc(ring + 16u * m.avail_pos).flags, m.avail_wrap);
}

// Op 0 and op 1: one descriptor as the driver writes it. `lap` is the wrap
// counter of the lap the position is in (ring descriptors only).
void write_desc(std::uint8_t* p, Reader& in, std::optional<bool> lap, std::uint16_t small_ids) {
  const std::uint8_t amode = in.u8();
  const std::uint64_t addr = (amode & 1) ? in.u64() : kBus + static_cast<std::uint64_t>(amode >> 1) * 8;
  const std::uint8_t lmode = in.u8();
  const std::uint32_t len = (lmode & 0x80) ? in.u32() : lmode;
  const std::uint8_t im = in.u8();
  const std::uint16_t id = (im & 0x80) ? in.u16() : static_cast<std::uint16_t>(im % small_ids);
  const std::uint8_t f = in.u8();
  auto flags = static_cast<std::uint16_t>(f & 7u);
  if (lap) {
    const std::uint16_t avail_for = *lap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
    const std::uint16_t other_lap = *lap ? VIRTQ_DESC_F_USED : VIRTQ_DESC_F_AVAIL;
    switch ((f >> 3) & 3) {
      case 0:
        flags = static_cast<std::uint16_t>(flags | avail_for);
        break;
      case 1:
        flags = static_cast<std::uint16_t>(flags | (*lap ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0));
        break;
      case 2:
        flags = static_cast<std::uint16_t>(flags | other_lap);
        break;
      default:
        if (f & 0x20) flags = static_cast<std::uint16_t>(flags | VIRTQ_DESC_F_AVAIL);
        if (f & 0x40) flags = static_cast<std::uint16_t>(flags | VIRTQ_DESC_F_USED);
    }
  } else if (f & 0x80) {
    flags = static_cast<std::uint16_t>(flags | 0x100);  // a reserved flag in a table entry
  }
  put64(p, addr);
  uvirtio::store_le32(p + 8, len);
  uvirtio::store_le16(p + 12, id);
  uvirtio::store_le16(p + 14, flags);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  const std::uint8_t cfg = in.u8();
  Model m;
  m.size = static_cast<std::uint16_t>(1u + (cfg & 15u));
  Area ring(PackedLayout::desc_bytes(m.size)), drv(PackedLayout::event_bytes()),
      dev(PackedLayout::event_bytes()), window(kWindow);
  auto translate = [&](std::uint64_t a, std::uint32_t len,
                       bool write) -> std::optional<std::span<std::uint8_t>> {
    const auto off = window_offset(a, len, write);
    if (!off) return std::nullopt;
    return std::span<std::uint8_t>(window.p + *off, len);
  };
  auto created = PackedDeviceQueue::create(m.size, ring.p, drv.p, dev.p, kName, translate);
  CHECK(created.ok());
  PackedDeviceQueue q = std::move(created).value();
  m.event_idx = (cfg & 0x10) != 0;
  m.indirect = (cfg & 0x20) != 0;
  m.max_indirect = (cfg & 0x40) ? 3u : m.size;
  m.in_order = (cfg & 0x80) != 0;
  q.set_event_idx(m.event_idx);
  if (m.indirect) q.set_indirect(true, (cfg & 0x40) ? 3u : 0u);
  CHECK(q.set_in_order(m.in_order).ok());
  std::vector<std::uint8_t> expect_dev(dev.p, dev.p + dev.n);
  model_device_event(m, expect_dev);
  CHECK(dev.bytes() == expect_dev);

  const auto small_ids = static_cast<std::uint16_t>(m.size + 2u);
  while (!in.empty()) {
    std::vector<std::uint8_t> expect_ring = ring.bytes();
    switch (in.u8() % 8) {
      case 0: {
        const auto pos = static_cast<std::uint16_t>(in.u8() % m.size);
        // Positions before our next available one are in the next lap.
        const bool lap = pos >= m.avail_pos ? m.avail_wrap : !m.avail_wrap;
        write_desc(ring.p + 16u * pos, in, lap, small_ids);
        expect_ring = ring.bytes();
        break;
      }
      case 1:
        write_desc(window.p + (in.u8() % ((kWindow - 16) / 8 + 1)) * 8, in, std::nullopt, small_ids);
        break;
      case 2:
        uvirtio::store_le32(drv.p, in.u32());
        break;
      case 3: {
        const Expect e = predict(m, ring.p, window.p);
        auto r = q.pop();
        if (m.broken) {
          CHECK(!r.ok() && r.error().code() == Errc::broken && r.error().device() == kName);
          break;
        }
        if (e.kind == Kind::none) {
          CHECK(r.ok() && !r.value().has_value());
          break;
        }
        if (e.kind == Kind::bad) {
          CHECK(!r.ok() && r.error().code() == Errc::bad_device_data && r.error().device() == kName);
          m.broken = true;
          break;
        }
        CHECK(r.ok() && r.value().has_value());
        const auto& req = *r.value();
        CHECK(req.head == e.id);
        check_spans(req.readable, e.rd, window.p, kBus);
        check_spans(req.writable, e.wr, window.p, kBus);
        std::uint64_t rb = 0, wb = 0;
        for (const auto& b : e.rd) rb += b.len;
        for (const auto& b : e.wr) wb += b.len;
        CHECK(req.readable_bytes == rb && req.writable_bytes == wb);
        for (auto s : req.writable) {
          if (!s.empty()) std::memset(s.data(), 0xAB, s.size());  // the device really writes
        }
        m.avail_pos = e.end_pos;
        m.avail_wrap = e.end_wrap;
        m.held_descs += e.count;
        m.held[e.id] = Held{static_cast<std::uint16_t>(e.count), wb};
        if (m.in_order) m.order.push_back(e.id);
        if (m.event_idx && m.notify)
          uvirtio::store_le16(expect_dev.data(), packed_off_wrap(m.avail_pos, m.avail_wrap));
        break;
      }
      case 4: {
        const std::uint8_t sel = in.u8();
        std::uint16_t id;
        if ((sel & 0x80) || m.held.empty()) {
          id = in.u16();
        } else if ((sel & 0x20) && !m.order.empty()) {
          id = m.order.front();
        } else {
          id = std::next(m.held.begin(), static_cast<long>(sel % m.held.size()))->first;
        }
        const bool defer = (sel & 0x40) != 0;
        const std::uint8_t wm = in.u8();
        std::uint32_t written = wm;
        auto it = m.held.find(id);
        if ((wm & 0x80) == 0 && it != m.held.end()) {
          written = static_cast<std::uint32_t>(wm % 3 == 0 ? it->second.writable + 1
                                                           : (wm % 3 == 1 ? it->second.writable : 0));
        }
        auto r = defer ? q.push_deferred(id, written) : q.push(id, written);
        if (m.broken) {
          CHECK(!r.ok() && r.error().code() == Errc::broken);
          break;
        }
        if (it == m.held.end() || written > it->second.writable || (m.in_order && id != m.order.front())) {
          CHECK(!r.ok() && r.error().code() == Errc::invalid_argument && r.error().device() == kName);
          break;
        }
        CHECK(r.ok());
        const Held h = it->second;
        m.held.erase(it);
        if (!m.in_order) {
          model_write_used(m, expect_ring, id, written, h.writable != 0, h.count, true);
        } else {
          m.order.pop_front();
          ++m.batch_count;
          m.batch_descs += h.count;
          m.batch_id = id;
          m.batch_len = written;
          m.batch_writable = h.writable != 0;
        }
        if (!defer) model_publish(m, expect_ring);
        break;
      }
      case 5:
        q.publish_used();
        model_publish(m, expect_ring);
        break;
      case 6: {
        const std::uint8_t b = in.u8();
        switch (b % 4) {
          case 0:
            q.set_notifications((b & 4) != 0);
            if (!m.broken) {
              m.notify = (b & 4) != 0;
              model_device_event(m, expect_dev);
            }
            break;
          case 1: {
            const bool more = q.enable_notifications_and_check();
            if (!m.broken) {
              m.notify = true;
              model_device_event(m, expect_dev);
            }
            CHECK(more == model_has_avail(m, ring.p));
            break;
          }
          case 2: {
            const bool want = q.should_interrupt();
            if (m.broken) {
              CHECK(!want);
              break;
            }
            const std::uint64_t moved = m.moved;
            m.moved = 0;
            const std::uint16_t flags = uvirtio::load_le16(drv.p + 2);
            if (moved == 0 || flags == RING_EVENT_FLAGS_DISABLE) CHECK(!want);
            if (moved != 0 && flags == RING_EVENT_FLAGS_ENABLE) CHECK(want);
            break;
          }
          default:
            CHECK(q.has_avail() == model_has_avail(m, ring.p));
        }
        break;
      }
      default:
        uvirtio::store_le32(dev.p, in.u32());
        expect_dev = dev.bytes();
    }
    CHECK(ring.bytes() == expect_ring);
    CHECK(dev.bytes() == expect_dev);
    CHECK(q.broken() == m.broken);
    if (!m.broken) CHECK(q.in_flight() == m.held.size());
  }
  return 0;
}
