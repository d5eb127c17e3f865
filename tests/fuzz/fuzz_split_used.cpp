// libFuzzer target: a hostile device rewriting the used ring of a split
// virtqueue (virtio spec 1.2, 2.7.8) while the driver adds, publishes and
// polls. The input is a small program (see the op list below). A model of
// the driver state (live heads with their tokens, descriptor counts and
// writable bytes, last used index, free count) predicts every result
// exactly: poll() must return the right completion or fail with
// bad_device_data exactly when the device data is invalid, after which every
// call fails with Errc::broken and the driver-written ring areas never change.
// Any mismatch traps.
//
// With VIRTIO_F_IN_ORDER (2.7.5, 2.7.9) the model also checks that add()
// allocates descriptors in ring order, and predicts batches: the entry at
// the last used position completes every chain from the oldest in flight up
// to the one its id heads, valid only when the used index moved by at least
// that many and by no more than the chains in flight; the batch then comes
// back one chain per poll() (len 0 and `skipped` but for the last) without
// the ring being read.
//
// Input: byte 0 picks the queue size (1 << (b % 5), so 1..16) and, with bit
// 7, VIRTIO_F_IN_ORDER; then ops,
// each starting with a byte b, op = b % 6:
//   0 add:        n_out%4, n_in%4, one length byte per buffer
//                 (0: zero length, 255: next 4 bytes raw, else 16*b)
//   1 publish
//   2 device:     used flags (2 bytes), idx mode byte m (odd: last seen +
//                 (m>>1) % (size+2), even: next 2 bytes raw), entry count
//                 byte %5, then per entry: slot, id selector, len selector
//   3 poll until nullopt or error
//   4 misc:       byte: bit0 set_interrupts(bit1), then has_used() check
//   5 scribble:   the device overwrites next and flags of descriptor
//                 (byte % size) with 4 bytes; the driver must not care
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <iterator>
#include <map>
#include <new>
#include <optional>
#include <vector>

#include "fuzz_input.hpp"
#include "uvirtio/rings/split.hpp"

namespace {

using uvirtio::Errc;
using namespace uvirtio::rings;

using uvirtio::fuzz::Area;
using uvirtio::fuzz::Reader;

struct Live {
  std::uint64_t token;
  std::uint16_t descs;
  std::uint32_t writable;
};

constexpr const char* kName = "fuzz queue";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  const std::uint8_t cfg = in.u8();
  const auto qsize = static_cast<std::uint16_t>(1u << (cfg % 5));
  const bool in_order = (cfg & 0x80) != 0;
  const std::uint16_t mask = static_cast<std::uint16_t>(qsize - 1);
  Area desc(SplitLayout::desc_bytes(qsize)), avail(SplitLayout::avail_bytes(qsize)),
      used(SplitLayout::used_bytes(qsize));
  auto created = SplitQueue::create(qsize, desc.p, avail.p, used.p, kName);
  CHECK(created.ok());
  SplitQueue q = std::move(created).value();
  CHECK(q.set_in_order(in_order).ok());
  CHECK(q.in_order() == in_order);

  auto* d = reinterpret_cast<VirtqDesc*>(desc.p);
  auto* av = reinterpret_cast<uvirtio::le16*>(avail.p);
  auto* uw = reinterpret_cast<uvirtio::le16*>(used.p);
  auto* ue = reinterpret_cast<VirtqUsedElem*>(used.p + 4);

  std::map<std::uint16_t, Live> live;                               // head -> chain
  std::map<std::uint16_t, std::vector<std::uint16_t>> chain_descs;  // head -> descriptors, our copy
  std::vector<bool> owned(qsize, false);
  std::uint16_t model_free = qsize, last_used = 0, avail_count = 0, avail_flags = 0;
  std::uint64_t next_token = 1;
  bool broken = false;
  // In order: the next descriptor to allocate, the live heads oldest first,
  // and the batch being handed out (chains left, the device's len).
  std::uint16_t alloc_pos = 0, batch_left = 0;
  std::uint32_t batch_len = 0;
  std::deque<std::uint16_t> order;
  std::vector<std::uint8_t> frozen;  // descriptor table + avail ring when the queue broke
  auto driver_areas = [&] {
    std::vector<std::uint8_t> v(desc.p, desc.p + desc.n);
    v.insert(v.end(), avail.p, avail.p + avail.n);
    return v;
  };
  auto check_broken_error = [&](const uvirtio::Error& e) {
    CHECK(e.code() == Errc::broken);
    CHECK(e.device() == kName);
  };

  while (!in.empty()) {
    switch (in.u8() % 6) {
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
        const std::uint64_t token = next_token++;
        auto r = q.add(out, inb, token);
        if (broken) {
          CHECK(!r.ok());
          check_broken_error(r.error());
        } else if (bufs.empty() || zero || writable > 0xFFFFFFFFu || total > (std::uint64_t{1} << 32) ||
                   bufs.size() > qsize) {  // a chain the queue can never hold is not "busy"
          CHECK(!r.ok() && r.error().code() == Errc::invalid_argument);
        } else if (bufs.size() > model_free) {
          CHECK(!r.ok() && r.error().code() == Errc::busy);
        } else {
          CHECK(r.ok());
          const std::uint16_t head = r.value();
          CHECK(head < qsize && live.count(head) == 0);
          // The chain in the table must be exactly what was asked for, on
          // descriptors no other live chain holds.
          std::uint16_t i = head;
          if (in_order) CHECK(head == alloc_pos);
          for (std::size_t k = 0; k < bufs.size(); ++k) {
            CHECK(i < qsize && !owned[i]);
            if (in_order) CHECK(i == ((head + k) & mask));  // 2.7.5: ring order, wrapping
            owned[i] = true;
            chain_descs[head].push_back(i);
            const bool last = k + 1 == bufs.size();
            const std::uint16_t want = static_cast<std::uint16_t>((k >= n_out ? VIRTQ_DESC_F_WRITE : 0) |
                                                                  (last ? 0 : VIRTQ_DESC_F_NEXT));
            CHECK(d[i].addr.get() == bufs[k].addr && d[i].len.get() == bufs[k].len &&
                  d[i].flags.get() == want);
            i = d[i].next.get();
          }
          live[head] = {token, static_cast<std::uint16_t>(bufs.size()), static_cast<std::uint32_t>(writable)};
          model_free = static_cast<std::uint16_t>(model_free - bufs.size());
          alloc_pos = static_cast<std::uint16_t>((alloc_pos + bufs.size()) & mask);
          order.push_back(head);
          CHECK(av[2 + (avail_count & mask)].get() == head);
          ++avail_count;
        }
        break;
      }
      case 1: {  // publish
        const bool kick = q.publish();
        if (broken) {
          CHECK(!kick);
        } else {
          CHECK(av[1].get() == avail_count);
          CHECK(kick == ((uw[0].get() & VIRTQ_USED_F_NO_NOTIFY) == 0));
        }
        break;
      }
      case 2: {  // the device rewrites the used ring
        uw[0].set(in.u16());
        const std::uint8_t mode = in.u8();
        uw[1].set((mode & 1) ? static_cast<std::uint16_t>(last_used + (mode >> 1) % (qsize + 2)) : in.u16());
        const unsigned count = in.u8() % 5;
        for (unsigned k = 0; k < count; ++k) {
          VirtqUsedElem& e = ue[(last_used + in.u8()) & mask];
          const std::uint8_t ids = in.u8();
          std::uint32_t id = ids;
          if (ids & 0x80) {
            id = in.u32();
          } else if (!live.empty()) {
            id = std::next(live.begin(), ids % static_cast<long>(live.size()))->first;
          }
          const std::uint8_t lens = in.u8();
          std::uint32_t len = lens;
          if (lens & 0x80) {
            len = in.u32();
          } else if (auto it = live.find(static_cast<std::uint16_t>(id)); id < qsize && it != live.end()) {
            const std::uint32_t w = it->second.writable;
            len = lens % 3 == 0 ? w + 1 : (lens % 3 == 1 ? w : w / 2);
          }
          e.id.set(id);
          e.len.set(len);
        }
        break;
      }
      case 3: {  // poll until nothing or error
        for (int iter = 0;; ++iter) {
          CHECK(iter <= qsize + 1);
          // Prediction from the device data, before the driver looks.
          std::optional<Errc> want_err;
          std::optional<Completion> want;
          const std::uint16_t idx = uw[1].get();
          const VirtqUsedElem& e = ue[last_used & mask];
          const std::uint32_t id = e.id.get(), len = e.len.get();
          std::uint16_t batch = 1;  // chains the entry completes (in order)
          if (broken) {
            want_err = Errc::broken;
          } else if (in_order && batch_left > 0) {
            // The rest of a batch: no ring read.
            const Live& l = live[order.front()];
            want = Completion{l.token, batch_left == 1 ? batch_len : 0, batch_left > 1};
          } else if (idx == last_used) {
          } else if (in_order) {
            const auto ahead = static_cast<std::uint16_t>(idx - last_used);
            const auto pos = std::find(order.begin(), order.end(), id);
            if (ahead > live.size() || id >= qsize || live.count(static_cast<std::uint16_t>(id)) == 0) {
              want_err = Errc::bad_device_data;
            } else {
              batch = static_cast<std::uint16_t>(pos - order.begin() + 1);
              if (batch > ahead || len > live[static_cast<std::uint16_t>(id)].writable) {
                want_err = Errc::bad_device_data;
              } else {
                const Live& l = live[order.front()];
                want = Completion{l.token, batch == 1 ? len : 0, batch > 1};
              }
            }
          } else if (static_cast<std::uint16_t>(idx - last_used) > qsize || id >= qsize ||
                     live.count(static_cast<std::uint16_t>(id)) == 0 ||
                     len > live[static_cast<std::uint16_t>(id)].writable) {
            want_err = Errc::bad_device_data;
          } else {
            want = Completion{live[static_cast<std::uint16_t>(id)].token, len, false,
                              static_cast<std::uint16_t>(id)};
          }
          auto r = q.poll();
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
          CHECK(c.token == want->token && c.len == want->len && c.skipped == want->skipped);
          CHECK(in_order || c.id == want->id);  // the head that add() returned
          if (in_order) {
            if (batch_left == 0) {  // the ring was read: the batch's used entries are consumed
              last_used = static_cast<std::uint16_t>(last_used + batch);
              batch_left = batch;
              batch_len = len;
            }
            --batch_left;
            const std::uint16_t head = order.front();
            order.pop_front();
            for (std::uint16_t i : chain_descs[head]) owned[i] = false;
            model_free = static_cast<std::uint16_t>(model_free + live[head].descs);
            live.erase(head);
            chain_descs.erase(head);
            continue;
          }
          // Returned once: the head leaves the live set and its descriptors are free again.
          const std::uint16_t head = static_cast<std::uint16_t>(id);
          for (std::uint16_t i : chain_descs[head]) owned[i] = false;
          model_free = static_cast<std::uint16_t>(model_free + live[head].descs);
          live.erase(head);
          chain_descs.erase(head);
          ++last_used;
        }
        break;
      }
      case 4: {  // interrupt hint and has_used
        const std::uint8_t b = in.u8();
        if (b & 1) {
          q.set_interrupts((b & 2) != 0);
          if (!broken) avail_flags = (b & 2) ? 0 : VIRTQ_AVAIL_F_NO_INTERRUPT;
        }
        if (!broken) CHECK(av[0].get() == avail_flags);
        CHECK(q.has_used() == (!broken && (batch_left > 0 || uw[1].get() != last_used)));
        break;
      }
      case 5: {  // the device scribbles on the descriptor table
        VirtqDesc& victim = d[in.u8() & mask];
        const std::uint16_t next = in.u16(), flags = in.u16();
        if (!broken) {  // after that the table is checked to stay frozen
          victim.next.set(next);
          victim.flags.set(flags);
        }
        break;
      }
    }
    CHECK(q.broken() == broken);
    CHECK(q.free_count() <= qsize && q.free_count() == model_free);
    CHECK(q.in_flight() == qsize - model_free);
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
