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
// reset_ring() holds the ids in flight back: until handed out again, a used
// descriptor naming one fails with Errc::stale_completion instead (latched
// with that code), and reset_ring() ends any broken state.
//
// The optional features are part of the model too: with VIRTIO_F_EVENT_IDX
// publish() must kick exactly when the device's DESC offset/wrap names one of
// the positions made available since the last publish (an independent
// position-walking oracle; undefined device values must kick), and the
// driver event area must hold DESC with the next used position whenever
// interrupts are on; with indirect tables, chains of 2..max buffers must be
// one INDIRECT ring descriptor pointing at the buffer id's table slot, which
// holds exactly the chain (WRITE the only flag), and take one position.
// With VIRTIO_F_IN_ORDER (2.8.9) a chain's buffer id must be its first ring
// position, and a used descriptor completes every chain from the oldest in
// flight up to the one it names: the ring skips all their positions, and the
// batch comes back one chain per poll() (len 0 and `skipped` but for the
// last) without the ring being read.
//
// Input: byte 0 picks the queue size (bits 0-2: 1, 2, 3, 4, 5, 7, 8 or 16),
// VIRTIO_F_EVENT_IDX (bit 3), indirect tables (bit 4) of 2, 3, 4 or 16
// entries (bits 5-6) and VIRTIO_F_IN_ORDER (bit 7); then ops, each starting
// with a byte b, op = b % 8:
//   0 add:        n_out%4, n_in%4, one length byte per buffer
//                 (0: zero length, 255: next 4 bytes raw, else 16*b)
//   1 publish
//   2 device:     entry count byte %4, then per entry, written from the
//                 driver's last-used position on, skipping like a device:
//                 id selector (bit 7: next 2 bytes raw, bit 6: an id held
//                 back by a reset if any, else a live id),
//                 len selector (bit 7: 4 bytes raw, else writable+1 / writable
//                 / half), flags selector (%4: used, used, used for the other
//                 wrap counter, next 2 bytes raw)
//   3 poll until nullopt or error
//   4 misc:       byte: bit0 set_interrupts(bit1), bit2
//                 enable_interrupts_and_check(); has_used() and
//                 outstanding_tokens() checks
//   5 scribble:   the device overwrites id, len and flags of descriptor
//                 (byte % size) with 8 raw bytes; with indirect tables and
//                 bit 7 of that byte, 8 raw bytes at (next 2 bytes) in the
//                 table pool instead
//   6 the device writes its event suppression area (4 raw bytes)
//   7 reset_ring(): the ring and both event areas zeroed, the model's live
//                 ids held back (not in order), everything free again
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <iterator>
#include <map>
#include <new>
#include <optional>
#include <set>
#include <vector>

#include "fuzz_input.hpp"
#include "uvirtio/rings/packed.hpp"

namespace {

using uvirtio::Errc;
using namespace uvirtio::rings;

using uvirtio::fuzz::Area;
using uvirtio::fuzz::Reader;

struct Live {
  std::uint64_t token;
  std::uint16_t descs;
  std::uint32_t writable;
  std::uint64_t seq;
};

constexpr const char* kName = "fuzz packed queue";
constexpr std::uint16_t kSizes[] = {1, 2, 3, 4, 5, 7, 8, 16};
constexpr std::size_t kIndirectMax[] = {2, 3, 4, 16};
constexpr std::uint64_t kPoolDevice = 0x7000'0000'0000;

// Whether the device wants a kick, written independently of the library:
// flags exactly DISABLE say no; DESC with EVENT_IDX says yes only when
// walking back `moved` positions from the driver's next one (pos, wrap)
// meets the named offset and wrap counter; everything else (ENABLE, DESC
// without EVENT_IDX, reserved values and bits, offsets past the ring, a
// whole ring moved) says yes.
bool kick_oracle(std::uint16_t flags, std::uint16_t off_wrap, bool event_idx, std::uint16_t size,
                 std::uint16_t pos, bool wrap, std::uint32_t moved) {
  if (flags == 1) return false;
  if (flags != 2 || !event_idx) return true;
  const unsigned off = off_wrap & 0x7fffu;
  const bool ev_wrap = (off_wrap >> 15) != 0;
  if (off >= size || moved >= size) return true;
  for (std::uint32_t i = 0; i < moved; ++i) {
    if (pos == 0) {
      pos = static_cast<std::uint16_t>(size - 1);
      wrap = !wrap;
    } else {
      --pos;
    }
    if (pos == off && wrap == ev_wrap) return true;
  }
  return false;
}

// Flags a device writes to mark a descriptor used for wrap counter `wrap`.
std::uint16_t used_flags(bool wrap) {
  return wrap ? static_cast<std::uint16_t>(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) : std::uint16_t{0};
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  const std::uint8_t cfg = in.u8();
  const std::uint16_t qsize = kSizes[cfg % 8];
  const bool ev = (cfg & 0x08) != 0;
  const bool ind = (cfg & 0x10) != 0;
  const std::size_t max_ind = kIndirectMax[(cfg >> 5) % 4];
  const bool in_order = (cfg & 0x80) != 0;
  const std::size_t slot_entries =
      std::min<std::size_t>(max_ind, qsize);  // 2.8.17: never longer than the ring
  const std::size_t ind_limit = ind ? slot_entries : 0;
  const std::size_t stride = slot_entries * sizeof(PvirtqDesc);
  Area desc(PackedLayout::desc_bytes(qsize)), drv(PackedLayout::event_bytes()),
      dev(PackedLayout::event_bytes()), pool(ind ? qsize * stride : 16);
  auto created = PackedQueue::create(qsize, desc.p, drv.p, dev.p, kName);
  CHECK(created.ok());
  PackedQueue q = std::move(created).value();
  if (ind) {
    std::memset(pool.p, 0, pool.n);
    q.set_indirect(true, max_ind);
    CHECK(q.provide_indirect_pool(pool.p, kPoolDevice, pool.n).ok());
    CHECK(q.indirect() == (ind_limit >= 2));
  }
  q.set_event_idx(ev);
  CHECK(q.event_idx() == ev);
  CHECK(q.set_in_order(in_order).ok());
  CHECK(q.in_order() == in_order);

  auto* d = reinterpret_cast<PvirtqDesc*>(desc.p);
  auto* drv_ev = reinterpret_cast<PvirtqEventSuppress*>(drv.p);
  auto* dev_ev = reinterpret_cast<PvirtqEventSuppress*>(dev.p);

  std::map<std::uint16_t, Live> live;  // buffer id -> chain
  std::uint16_t model_free = qsize, next_avail = 0, last_used = 0;
  bool avail_wrap = true, used_wrap = true;
  bool ints = true;  // interrupts requested
  std::uint16_t drv_flags = ev ? RING_EVENT_FLAGS_DESC : RING_EVENT_FLAGS_ENABLE;
  std::uint16_t drv_desc = ev ? std::uint16_t{0x8000} : std::uint16_t{0};  // next used: position 0, wrap 1
  std::uint32_t moved = 0;                                                 // positions since the last publish
  std::uint64_t next_token = 1, seq = 0;
  bool broken = false;
  bool stale_broken = false;     // broken by a held-back id: Errc::stale_completion
  std::set<std::uint16_t> held;  // ids in flight at a reset_ring(), not handed out since
  // In order: live ids oldest first, and the batch being handed out.
  std::deque<std::uint16_t> order;
  std::uint16_t batch_left = 0;
  std::uint32_t batch_len = 0;
  // Chains and ring positions from the oldest in flight up to live id `id`.
  auto batch_of = [&](std::uint16_t id, std::size_t from, std::uint16_t& chains, std::uint32_t& positions) {
    chains = 0;
    positions = 0;
    for (std::size_t k = from; k < order.size(); ++k) {
      ++chains;
      positions += live[order[k]].descs;
      if (order[k] == id) return true;
    }
    return false;
  };
  // Driver-written memory: descriptor ring, driver event area, table pool;
  // the snapshot when the queue broke.
  std::vector<std::uint8_t> frozen;
  const std::size_t drv_at = desc.n, pool_at = desc.n + drv.n;
  auto driver_areas = [&] {
    std::vector<std::uint8_t> v(desc.p, desc.p + desc.n);
    v.insert(v.end(), drv.p, drv.p + drv.n);
    v.insert(v.end(), pool.p, pool.p + pool.n);
    return v;
  };
  auto all_areas = [&] {
    std::vector<std::uint8_t> v = driver_areas();
    v.insert(v.end(), dev.p, dev.p + dev.n);
    return v;
  };
  auto check_broken_error = [&](const uvirtio::Error& e) {
    CHECK(e.code() == (stale_broken ? Errc::stale_completion : Errc::broken));
    CHECK(e.device() == kName);
  };
  auto is_used = [&](std::uint16_t flags) {
    return ((flags & VIRTQ_DESC_F_AVAIL) != 0) == used_wrap &&
           ((flags & VIRTQ_DESC_F_USED) != 0) == used_wrap;
  };

  while (!in.empty()) {
    switch (in.u8() % 8) {
      case 0: {  // add
        const unsigned n_out = in.u8() % 4, n_in = in.u8() % 4;
        std::vector<Buffer> bufs;
        for (unsigned i = 0; i < n_out + n_in; ++i) {
          const std::uint8_t b = in.u8();
          const std::uint32_t len = b == 255 ? in.u32() : 16u * b;
          bufs.push_back({0x100000u * (i + 1) + next_token, len});
        }
        const std::span<const Buffer> out(bufs.data(), n_out), inb(bufs.data() + n_out, n_in);
        std::uint64_t writable = 0, total = 0;
        bool zero = false;
        for (const Buffer& b : bufs) {
          zero |= b.len == 0;
          total += b.len;
        }
        for (const Buffer& b : inb) writable += b.len;
        const bool bad = bufs.empty() || zero || writable > 0xFFFFFFFFu || total > (std::uint64_t{1} << 32);
        const bool indirect = bufs.size() > 1 && bufs.size() <= ind_limit;
        const std::size_t positions = indirect ? 1 : bufs.size();
        const bool never_fits = positions > qsize;  // invalid_argument, not busy
        const std::uint64_t token = next_token++;
        const std::vector<std::uint8_t> before = all_areas();
        auto r = q.add(out, inb, token);
        if (broken || bad || never_fits || positions > model_free) {
          CHECK(!r.ok());
          if (broken) {
            check_broken_error(r.error());
          } else if (bad || never_fits) {
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
        held.erase(id);  // handed out again: a used descriptor naming it is this chain's
        if (in_order) {
          CHECK(id == next_avail);  // the buffer id is the chain's first position
          order.push_back(id);
        }
        std::vector<bool> touched(before.size(), false);
        auto touch = [&](std::size_t from, std::size_t n) {
          for (std::size_t i = from; i < from + n; ++i) touched[i] = true;
        };
        if (indirect) {
          // One ring descriptor (INDIRECT, never NEXT, no WRITE) naming the
          // id's table slot, which holds exactly the chain (2.8.7).
          const PvirtqDesc& x = d[next_avail];
          const auto want = static_cast<std::uint16_t>(VIRTQ_DESC_F_INDIRECT |
                                                       (avail_wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED));
          CHECK(x.addr.get() == kPoolDevice + std::uint64_t{id} * stride);
          CHECK(x.len.get() == bufs.size() * sizeof(PvirtqDesc));
          CHECK(x.id.get() == id && x.flags.get() == want);
          touch(std::size_t{next_avail} * sizeof(PvirtqDesc), sizeof(PvirtqDesc));
          const auto* table = reinterpret_cast<const PvirtqDesc*>(pool.p + std::size_t{id} * stride);
          for (std::size_t k = 0; k < bufs.size(); ++k) {
            CHECK(table[k].addr.get() == bufs[k].addr && table[k].len.get() == bufs[k].len);
            CHECK(table[k].flags.get() == (k >= n_out ? VIRTQ_DESC_F_WRITE : 0));
          }
          touch(pool_at + std::size_t{id} * stride, bufs.size() * sizeof(PvirtqDesc));
          if (++next_avail == qsize) {
            next_avail = 0;
            avail_wrap = !avail_wrap;
          }
        }
        // Otherwise exactly the chain's descriptors at the next positions,
        // with the AVAIL/USED bits of each position's lap (2.8.1); nothing
        // else changes.
        for (std::size_t k = 0; !indirect && k < bufs.size(); ++k) {
          const bool last = k + 1 == bufs.size();
          const auto want = static_cast<std::uint16_t>((k >= n_out ? VIRTQ_DESC_F_WRITE : 0) |
                                                       (last ? 0 : VIRTQ_DESC_F_NEXT) |
                                                       (avail_wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED));
          const PvirtqDesc& x = d[next_avail];
          CHECK(x.addr.get() == bufs[k].addr && x.len.get() == bufs[k].len && x.flags.get() == want);
          if (last) CHECK(x.id.get() == id);
          touch(std::size_t{next_avail} * sizeof(PvirtqDesc), sizeof(PvirtqDesc));
          if (++next_avail == qsize) {
            next_avail = 0;
            avail_wrap = !avail_wrap;
          }
        }
        const std::vector<std::uint8_t> after = all_areas();
        for (std::size_t i = 0; i < after.size(); ++i) {
          if (!touched[i]) CHECK(after[i] == before[i]);
        }
        live[id] = {token, static_cast<std::uint16_t>(positions), static_cast<std::uint32_t>(writable),
                    seq++};
        model_free = static_cast<std::uint16_t>(model_free - positions);
        moved += static_cast<std::uint32_t>(positions);
        break;
      }
      case 1: {  // publish
        const std::uint16_t flags = dev_ev->flags.get(), off_wrap = dev_ev->desc.get();
        const std::vector<std::uint8_t> before = all_areas();
        const bool kick = q.publish();
        CHECK(all_areas() == before);  // publish only reads
        CHECK(kick == (!broken && kick_oracle(flags, off_wrap, ev, qsize, next_avail, avail_wrap, moved)));
        if (!broken) moved = 0;
        break;
      }
      case 2: {  // the device writes used descriptors from the driver's last-used position on
        std::uint16_t pos = last_used;
        bool wrap = used_wrap;
        std::size_t cursor = 0;  // in order: the oldest chain not yet covered
        const unsigned count = in.u8() % 4;
        for (unsigned k = 0; k < count; ++k) {
          const std::uint8_t ids = in.u8();
          std::uint16_t id = ids;
          if (ids & 0x80) {
            id = in.u16();
          } else if ((ids & 0x40) && !held.empty()) {
            id = *std::next(held.begin(), ids % static_cast<long>(held.size()));
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
          std::uint32_t step = it != live.end() ? it->second.descs : 1u;
          std::uint16_t chains = 0;
          if (in_order && it != live.end() && batch_of(id, cursor, chains, step)) cursor += chains;
          const std::uint32_t next = pos + step;
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
          std::uint16_t batch = 1;
          std::uint32_t positions = 0;
          if (broken) {
            want_err = stale_broken ? Errc::stale_completion : Errc::broken;
          } else if (in_order && batch_left > 0) {
            const Live& l = live[order.front()];
            want = Completion{l.token, batch_left == 1 ? batch_len : 0, batch_left > 1};
          } else if (!is_used(flags)) {
            // Something in flight: only the driver's own AVAIL/USED pattern
            // for the current lap may sit here besides a used descriptor.
            if (model_free < qsize && avail_bit != used_wrap) want_err = Errc::bad_device_data;
          } else if (id < qsize && live.count(id) == 0 && held.count(id) != 0) {
            want_err = Errc::stale_completion;  // a request from before the reset
          } else if (id >= qsize || live.count(id) == 0 || len > live[id].writable) {
            want_err = Errc::bad_device_data;
          } else if (in_order) {
            CHECK(batch_of(id, 0, batch, positions));
            want = Completion{live[order.front()].token, batch == 1 ? len : 0, batch > 1};
          } else {
            want = Completion{live[id].token, len, false, id};
          }
          std::vector<std::uint8_t> before = all_areas();
          auto r = q.poll();
          // poll writes nothing but, with event idx and interrupts on, the
          // driver event offset (checked below).
          std::vector<std::uint8_t> now = all_areas();
          std::memcpy(now.data() + drv_at, before.data() + drv_at, 2);
          CHECK(now == before);
          if (want_err) {
            CHECK(!r.ok() && r.error().code() == *want_err && r.error().device() == kName);
            CHECK(q.broken());
            if (!broken) {
              frozen = driver_areas();
              stale_broken = *want_err == Errc::stale_completion;
            }
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
          CHECK(c.token == want->token && c.len == want->len && c.skipped == want->skipped);
          CHECK(in_order || c.id == want->id);  // the buffer id
          if (in_order) {
            if (batch_left == 0) {  // the ring was read: skip the whole batch
              const std::uint32_t next = std::uint32_t{last_used} + positions;
              last_used = static_cast<std::uint16_t>(next % qsize);
              if (next >= qsize) used_wrap = !used_wrap;
              batch_left = batch;
              batch_len = len;
              if (ev && ints) drv_desc = static_cast<std::uint16_t>(last_used | (used_wrap ? 0x8000 : 0));
            }
            --batch_left;
            const std::uint16_t oldest = order.front();
            order.pop_front();
            model_free = static_cast<std::uint16_t>(model_free + live[oldest].descs);
            live.erase(oldest);
            CHECK(drv_ev->desc.get() == drv_desc);
            continue;
          }
          // Returned once: the id leaves the live set, the position skips by
          // our descriptor count.
          const std::uint32_t next = std::uint32_t{last_used} + live[id].descs;
          last_used = static_cast<std::uint16_t>(next % qsize);
          if (next >= qsize) used_wrap = !used_wrap;
          model_free = static_cast<std::uint16_t>(model_free + live[id].descs);
          live.erase(id);
          // 2.8.10: with event idx and interrupts on, ask for the next used one.
          if (ev && ints) drv_desc = static_cast<std::uint16_t>(last_used | (used_wrap ? 0x8000 : 0));
          CHECK(drv_ev->desc.get() == drv_desc);
        }
        break;
      }
      case 4: {  // interrupt hint, has_used, outstanding tokens
        const std::uint8_t b = in.u8();
        // What set_interrupts(on) must leave in the driver event area.
        auto arm = [&](bool on) {
          if (broken) return;
          ints = on;
          drv_flags = !on ? RING_EVENT_FLAGS_DISABLE : ev ? RING_EVENT_FLAGS_DESC : RING_EVENT_FLAGS_ENABLE;
          if (on && ev) drv_desc = static_cast<std::uint16_t>(last_used | (used_wrap ? 0x8000 : 0));
        };
        if (b & 1) {
          q.set_interrupts((b & 2) != 0);
          arm((b & 2) != 0);
        }
        if (b & 4) {
          const bool more = q.enable_interrupts_and_check();
          CHECK(more == (!broken && (batch_left > 0 || is_used(d[last_used].flags.get()))));
          arm(true);
        }
        CHECK(drv_ev->flags.get() == drv_flags && drv_ev->desc.get() == drv_desc);
        CHECK(q.has_used() == (!broken && (batch_left > 0 || is_used(d[last_used].flags.get()))));
        std::vector<std::pair<std::uint64_t, std::uint64_t>> order;
        for (const auto& [id, l] : live) order.emplace_back(l.seq, l.token);
        std::sort(order.begin(), order.end());
        std::vector<std::uint64_t> want;
        for (const auto& [s, t] : order) want.push_back(t);
        CHECK(q.outstanding_tokens() == want);
        break;
      }
      case 5: {  // the device scribbles on any descriptor, or on the tables
        const std::uint8_t which = in.u8();
        if (ind && (which & 0x80)) {
          const std::size_t at = in.u16() % (pool.n - 7);
          std::uint8_t junk[8];
          for (auto& j : junk) j = in.u8();
          if (!broken) std::memcpy(pool.p + at, junk, sizeof junk);
          break;
        }
        PvirtqDesc& victim = d[which % qsize];
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
      case 7: {  // reset_ring(): after a device or queue reset
        CHECK(q.reset_ring().ok());
        if (!in_order)
          for (const auto& [id, l] : live) held.insert(id);
        live.clear();
        order.clear();
        model_free = qsize;
        next_avail = last_used = 0;
        avail_wrap = used_wrap = true;
        moved = 0;
        batch_left = 0;
        batch_len = 0;
        broken = stale_broken = false;
        frozen.clear();
        drv_flags = !ints ? RING_EVENT_FLAGS_DISABLE : ev ? RING_EVENT_FLAGS_DESC : RING_EVENT_FLAGS_ENABLE;
        drv_desc = ints && ev ? std::uint16_t{0x8000} : std::uint16_t{0};
        CHECK(std::all_of(desc.p, desc.p + desc.n, [](std::uint8_t b) { return b == 0; }));
        CHECK(std::all_of(dev.p, dev.p + dev.n, [](std::uint8_t b) { return b == 0; }));
        break;
      }
    }
    CHECK(q.broken() == broken);
    CHECK(drv_ev->flags.get() == drv_flags && drv_ev->desc.get() == drv_desc);
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
