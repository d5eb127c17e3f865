// libFuzzer target: a hostile device writing used descriptors (and anything
// else) into the ring of a packed virtqueue (virtio spec 1.2, 2.8) while the
// driver adds, publishes and polls. The input is a small program (see the op
// list below). A model of the driver state (live ids with their tokens,
// descriptor counts and writable bytes, next available and last used ring
// positions with their wrap counters, free count) predicts every result
// exactly: add() must write exactly the chain's descriptors with the right
// AVAIL/USED bits and nothing else; poll() must return the right completion,
// nothing, or fail with bad_device_data exactly when the device data is
// invalid, and never write memory; after a failure every call fails with
// Errc::broken and the driver-written areas never change. Any mismatch traps.
//
// Input: byte 0 picks the queue size (1, 2, 3, 4, 5, 7, 8 or 16); then ops,
// each starting with a byte b, op = b % 7:
//   0 add:        n_out%4, n_in%4, one length byte per buffer
//                 (0: zero length, 255: next 4 bytes raw, else 16*b)
//   1 publish
//   2 device:     entry count byte %4, then per entry, written from the
//                 driver's last-used position on, skipping like a device:
//                 id selector (bit 7: next 2 bytes raw, else a live id),
//                 len selector (bit 7: 4 bytes raw, else writable+1 / writable
//                 / half), flags selector (%4: used, used, used for the other
//                 wrap counter, next 2 bytes raw)
//   3 poll until nullopt or error
//   4 misc:       byte: bit0 set_interrupts(bit1); has_used() and
//                 outstanding_tokens() checks
//   5 scribble:   the device overwrites id, len and flags of descriptor
//                 (byte % size) with 8 raw bytes
//   6 the device writes its event suppression area (4 raw bytes)
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <new>
#include <optional>
#include <vector>

#include "uvirtio/rings/packed.hpp"

namespace {

using uvirtio::Errc;
using namespace uvirtio::rings;

#define CHECK(c)                \
  do {                          \
    if (!(c)) __builtin_trap(); \
  } while (0)

struct Reader {
  const std::uint8_t* p;
  std::size_t n;
  bool empty() const { return n == 0; }
  std::uint8_t u8() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  std::uint16_t u16() { return static_cast<std::uint16_t>(u8() | (u8() << 8)); }
  std::uint32_t u32() {
    return static_cast<std::uint32_t>(u16()) | (static_cast<std::uint32_t>(u16()) << 16);
  }
};

struct Area {
  explicit Area(std::size_t bytes)
      : n(bytes), p(static_cast<std::uint8_t*>(::operator new (bytes, std::align_val_t{16}))) {}
  ~Area() { ::operator delete (p, std::align_val_t{16}); }
  Area(const Area&) = delete;
  Area& operator=(const Area&) = delete;
  std::size_t n;
  std::uint8_t* p;
};

struct Live {
  std::uint64_t token;
  std::uint16_t descs;
  std::uint32_t writable;
  std::uint64_t seq;
};

constexpr const char* kName = "fuzz packed queue";
constexpr std::uint16_t kSizes[] = {1, 2, 3, 4, 5, 7, 8, 16};

// Flags a device writes to mark a descriptor used for wrap counter `wrap`.
std::uint16_t used_flags(bool wrap) {
  return wrap ? static_cast<std::uint16_t>(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) : std::uint16_t{0};
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  const std::uint16_t qsize = kSizes[in.u8() % 8];
  Area desc(PackedLayout::desc_bytes(qsize)), drv(PackedLayout::event_bytes()),
      dev(PackedLayout::event_bytes());
  auto created = PackedQueue::create(qsize, desc.p, drv.p, dev.p, kName);
  CHECK(created.ok());
  PackedQueue q = std::move(created).value();

  auto* d = reinterpret_cast<PvirtqDesc*>(desc.p);
  auto* drv_ev = reinterpret_cast<PvirtqEventSuppress*>(drv.p);
  auto* dev_ev = reinterpret_cast<PvirtqEventSuppress*>(dev.p);

  std::map<std::uint16_t, Live> live;  // buffer id -> chain
  std::uint16_t model_free = qsize, next_avail = 0, last_used = 0;
  bool avail_wrap = true, used_wrap = true;
  std::uint16_t drv_flags = RING_EVENT_FLAGS_ENABLE;
  std::uint64_t next_token = 1, seq = 0;
  bool broken = false;
  std::vector<std::uint8_t> frozen;  // descriptor ring + driver event area when the queue broke
  auto driver_areas = [&] {
    std::vector<std::uint8_t> v(desc.p, desc.p + desc.n);
    v.insert(v.end(), drv.p, drv.p + drv.n);
    return v;
  };
  auto all_areas = [&] {
    std::vector<std::uint8_t> v = driver_areas();
    v.insert(v.end(), dev.p, dev.p + dev.n);
    return v;
  };
  auto check_broken_error = [&](const uvirtio::Error& e) {
    CHECK(e.code() == Errc::broken);
    CHECK(e.device() == kName);
  };
  auto is_used = [&](std::uint16_t flags) {
    return ((flags & VIRTQ_DESC_F_AVAIL) != 0) == used_wrap &&
           ((flags & VIRTQ_DESC_F_USED) != 0) == used_wrap;
  };

  while (!in.empty()) {
    switch (in.u8() % 7) {
      case 0: {  // add
        const unsigned n_out = in.u8() % 4, n_in = in.u8() % 4;
        std::vector<Buffer> bufs;
        for (unsigned i = 0; i < n_out + n_in; ++i) {
          const std::uint8_t b = in.u8();
          const std::uint32_t len = b == 255 ? in.u32() : 16u * b;
          bufs.push_back({0x100000u * (i + 1) + next_token, len});
        }
        const std::span<const Buffer> out(bufs.data(), n_out), inb(bufs.data() + n_out, n_in);
        std::uint64_t writable = 0;
        bool zero = false;
        for (const Buffer& b : bufs) zero |= b.len == 0;
        for (const Buffer& b : inb) writable += b.len;
        const std::uint64_t token = next_token++;
        const std::vector<std::uint8_t> before = all_areas();
        auto r = q.add(out, inb, token);
        if (broken || bufs.empty() || zero || writable > 0xFFFFFFFFu || bufs.size() > model_free) {
          CHECK(!r.ok());
          if (broken) {
            check_broken_error(r.error());
          } else if (bufs.empty() || zero || writable > 0xFFFFFFFFu) {
            CHECK(r.error().code() == Errc::invalid_argument);
          } else {
            CHECK(r.error().code() == Errc::busy);
          }
          CHECK(all_areas() == before);
          break;
        }
        CHECK(r.ok());
        const std::uint16_t id = r.value();
        CHECK(id < qsize && live.count(id) == 0);
        // Exactly the chain's descriptors at the next positions, with the
        // AVAIL/USED bits of each position's lap (2.8.1); nothing else changes.
        std::vector<bool> touched(qsize, false);
        for (std::size_t k = 0; k < bufs.size(); ++k) {
          const bool last = k + 1 == bufs.size();
          const auto want = static_cast<std::uint16_t>((k >= n_out ? VIRTQ_DESC_F_WRITE : 0) |
                                                       (last ? 0 : VIRTQ_DESC_F_NEXT) |
                                                       (avail_wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED));
          const PvirtqDesc& x = d[next_avail];
          CHECK(x.addr.get() == bufs[k].addr && x.len.get() == bufs[k].len && x.flags.get() == want);
          if (last) CHECK(x.id.get() == id);
          touched[next_avail] = true;
          if (++next_avail == qsize) {
            next_avail = 0;
            avail_wrap = !avail_wrap;
          }
        }
        const std::vector<std::uint8_t> after = all_areas();
        for (std::size_t i = 0; i < after.size(); ++i) {
          if (i >= desc.n || !touched[i / sizeof(PvirtqDesc)]) CHECK(after[i] == before[i]);
        }
        live[id] = {token, static_cast<std::uint16_t>(bufs.size()), static_cast<std::uint32_t>(writable),
                    seq++};
        model_free = static_cast<std::uint16_t>(model_free - bufs.size());
        break;
      }
      case 1: {  // publish
        const bool kick = q.publish();
        CHECK(kick == (!broken && (dev_ev->flags.get() & RING_EVENT_FLAGS_MASK) != RING_EVENT_FLAGS_DISABLE));
        break;
      }
      case 2: {  // the device writes used descriptors from the driver's last-used position on
        std::uint16_t pos = last_used;
        bool wrap = used_wrap;
        const unsigned count = in.u8() % 4;
        for (unsigned k = 0; k < count; ++k) {
          const std::uint8_t ids = in.u8();
          std::uint16_t id = ids;
          if (ids & 0x80) {
            id = in.u16();
          } else if (!live.empty()) {
            id = std::next(live.begin(), ids % static_cast<long>(live.size()))->first;
          }
          const std::uint8_t lens = in.u8();
          std::uint32_t len = lens;
          const auto it = live.find(id);
          if (lens & 0x80) {
            len = in.u32();
          } else if (it != live.end()) {
            const std::uint32_t w = it->second.writable;
            len = lens % 3 == 0 ? w + 1 : (lens % 3 == 1 ? w : w / 2);
          }
          const std::uint8_t fs = in.u8() % 4;
          const std::uint16_t flags = fs < 2 ? used_flags(wrap) : fs == 2 ? used_flags(!wrap) : in.u16();
          if (!broken) {  // after that the ring is checked to stay frozen
            d[pos].id.set(id);
            d[pos].len.set(len);
            d[pos].flags.set(flags);
          }
          const std::uint32_t next = pos + (it != live.end() ? it->second.descs : 1u);
          pos = static_cast<std::uint16_t>(next % qsize);
          if (next >= qsize) wrap = !wrap;
        }
        break;
      }
      case 3: {  // poll until nothing or error
        for (int iter = 0;; ++iter) {
          CHECK(iter <= qsize + 1);
          // Prediction from the device data, before the driver looks.
          std::optional<Errc> want_err;
          std::optional<Completion> want;
          const PvirtqDesc& x = d[last_used];
          const std::uint16_t flags = x.flags.get(), id = x.id.get();
          const std::uint32_t len = x.len.get();
          const bool avail_bit = (flags & VIRTQ_DESC_F_AVAIL) != 0;
          if (broken) {
            want_err = Errc::broken;
          } else if (!is_used(flags)) {
            // Something in flight: only the driver's own AVAIL/USED pattern
            // for the current lap may sit here besides a used descriptor.
            if (model_free < qsize && avail_bit != used_wrap) want_err = Errc::bad_device_data;
          } else if (id >= qsize || live.count(id) == 0 || len > live[id].writable) {
            want_err = Errc::bad_device_data;
          } else {
            want = Completion{live[id].token, len};
          }
          const std::vector<std::uint8_t> before = all_areas();
          auto r = q.poll();
          CHECK(all_areas() == before);  // poll never writes shared memory
          if (want_err) {
            CHECK(!r.ok() && r.error().code() == *want_err && r.error().device() == kName);
            CHECK(q.broken());
            if (!broken) frozen = driver_areas();
            broken = true;
            break;
          }
          CHECK(r.ok());
          if (!want) {
            CHECK(!r.value().has_value());
            break;
          }
          CHECK(r.value().has_value());
          const Completion c = *r.value();
          CHECK(c.token == want->token && c.len == want->len);
          // Returned once: the id leaves the live set, the position skips by
          // our descriptor count.
          const std::uint32_t next = std::uint32_t{last_used} + live[id].descs;
          last_used = static_cast<std::uint16_t>(next % qsize);
          if (next >= qsize) used_wrap = !used_wrap;
          model_free = static_cast<std::uint16_t>(model_free + live[id].descs);
          live.erase(id);
        }
        break;
      }
      case 4: {  // interrupt hint, has_used, outstanding tokens
        const std::uint8_t b = in.u8();
        if (b & 1) {
          q.set_interrupts((b & 2) != 0);
          if (!broken) drv_flags = (b & 2) ? RING_EVENT_FLAGS_ENABLE : RING_EVENT_FLAGS_DISABLE;
        }
        CHECK(drv_ev->flags.get() == drv_flags && drv_ev->desc.get() == 0);
        CHECK(q.has_used() == (!broken && is_used(d[last_used].flags.get())));
        std::vector<std::pair<std::uint64_t, std::uint64_t>> order;
        for (const auto& [id, l] : live) order.emplace_back(l.seq, l.token);
        std::sort(order.begin(), order.end());
        std::vector<std::uint64_t> want;
        for (const auto& [s, t] : order) want.push_back(t);
        CHECK(q.outstanding_tokens() == want);
        break;
      }
      case 5: {  // the device scribbles on any descriptor
        PvirtqDesc& victim = d[in.u8() % qsize];
        const std::uint16_t id = in.u16(), flags = in.u16();
        const std::uint32_t len = in.u32();
        if (!broken) {
          victim.id.set(id);
          victim.len.set(len);
          victim.flags.set(flags);
        }
        break;
      }
      case 6: {  // the device's event suppression area (not part of the frozen check)
        dev_ev->desc.set(in.u16());
        dev_ev->flags.set(in.u16());
        break;
      }
    }
    CHECK(q.broken() == broken);
    CHECK(q.free_count() <= qsize && q.free_count() == model_free);
    CHECK(q.in_flight() == qsize - model_free);
    // In-flight descriptors are exactly the positions from last used to next available.
    const int span = next_avail - last_used + (avail_wrap != used_wrap ? qsize : 0);
    CHECK(span == qsize - model_free);
    if (broken) CHECK(driver_areas() == frozen);
  }

  if (broken) {  // one last round: everything fails with broken
    const Buffer b[] = {{1, 1}};
    auto a = q.add(b, {}, 0);
    CHECK(!a.ok());
    check_broken_error(a.error());
    auto p = q.poll();
    CHECK(!p.ok());
    check_broken_error(p.error());
    CHECK(!q.publish() && !q.has_used());
    CHECK(driver_areas() == frozen);
  }
  return 0;
}
