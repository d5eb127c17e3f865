// Packed virtqueue, device role: validated chains off the shared descriptor
// ring, used descriptors back onto it (virtio spec 1.2, 2.8). The driver is
// not trusted: each descriptor word it wrote is loaded exactly once
// (std::atomic_ref, so it cannot change between check and use), the walk is
// bounded by the ring positions we do not hold (never more than the queue
// size), every descriptor after the head must be available for its own lap,
// and every buffer goes through the owner's translation callback. All checks
// run before any state changes or anything is written; a violation latches the
// queue broken.
//
// Spec sections: 2.8.1 (wrap counters and the AVAIL/USED bits), 2.8.4
// (element length and WRITE in used descriptors), 2.8.6 (chains: consecutive
// positions, buffer id in the last descriptor, the used descriptor skips the
// whole chain), 2.8.7 and 2.8.19 (indirect tables), 2.8.10 and 2.8.14 (event
// suppression, with VIRTIO_F_EVENT_IDX the DESC offset/wrap form), 2.8.13
// (descriptor layout), 2.8.17 (readable before writable), 2.8.21 (the driver
// publishes the head flags last), 2.8.9 (VIRTIO_F_IN_ORDER: one used
// descriptor for a batch).
#include "uvirtio/rings/packed_device.hpp"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <utility>

#include "uvirtio/base/barrier.hpp"
#include "uvirtio/base/hex.hpp"

namespace uvirtio::rings {
namespace {

constexpr const char* kPop = "pop available descriptors";
constexpr std::uint64_t kMaxChainBytes = std::uint64_t{1} << 32;  // 2.8.6 (as 2.7.5.1)

template <class T>
T load(Le<T>& f, std::memory_order mo) noexcept {
  return Le<T>::from_raw(std::atomic_ref<T>(f.raw()).load(mo));
}
template <class T>
void store(Le<T>& f, T v, std::memory_order mo) noexcept {
  std::atomic_ref<T>(f.raw()).store(Le<T>::to_raw(v), mo);
}

// 2.8.1: available for wrap counter `wrap` means AVAIL == wrap and USED != wrap.
bool available(std::uint16_t flags, bool wrap) noexcept {
  return ((flags & VIRTQ_DESC_F_AVAIL) != 0) == wrap && ((flags & VIRTQ_DESC_F_USED) != 0) != wrap;
}

bool aligned(const void* p, std::size_t a) noexcept { return reinterpret_cast<std::uintptr_t>(p) % a == 0; }

}  // namespace

Result<PackedDeviceQueue> PackedDeviceQueue::create(std::uint16_t size, void* desc_ring, void* driver_event,
                                                    void* device_event, std::string name,
                                                    BufferTranslation translate) {
  const char* op = "create packed device queue";
  UV_TRY_VOID(PackedLayout::check(size, desc_ring, driver_event, device_event, name, op));
  if (translate.empty())
    return Error(Errc::invalid_argument, std::move(name), op,
                 "no translation: neither a callback nor memory regions");
  PackedDeviceQueue q;
  q.size_ = size;
  q.desc_ = static_cast<PvirtqDesc*>(desc_ring);
  q.driver_event_ = static_cast<PvirtqEventSuppress*>(driver_event);
  q.device_event_ = static_cast<PvirtqEventSuppress*>(device_event);
  q.name_ = std::move(name);
  q.xlate_ = std::move(translate);
  q.max_indirect_ = size;
  q.held_small_.assign(size, Held{});
  return q;
}

void PackedDeviceQueue::set_event_idx(bool enabled) noexcept {
  event_idx_ = enabled;
  // Only an enabled area changes form (ENABLE <-> DESC); a disabled one says
  // DISABLE either way, and create() must not write the area at all.
  if (!broken_ && notify_enabled_) write_device_event();
}

void PackedDeviceQueue::set_indirect(bool enabled, std::uint32_t max_entries) noexcept {
  indirect_ = enabled;
  max_indirect_ = max_entries == 0 ? size_ : max_entries;
}

Result<std::optional<PackedDeviceQueue::Request>> PackedDeviceQueue::pop() {
  Request req;
  UV_TRY(const bool got, pop_into(req));
  if (!got) return std::optional<Request>{};
  return std::optional<Request>{std::move(req)};
}

Result<bool> PackedDeviceQueue::pop_into(Request& req) {
  if (broken_) return Error(Errc::broken, name_, kPop, "queue is broken by an earlier driver error");
  // Every position holds a chain we popped: nothing can be available (a
  // driver writing there anyway is overwriting our in-flight descriptors).
  if (held_descs_ >= size_) return false;
  // Acquire pairs with the driver's release of the head flags (2.8.21.1).
  const std::uint16_t head_flags = load(desc_[avail_pos_].flags, std::memory_order_acquire);
  if (!available(head_flags, avail_wrap_)) return false;
  barrier_consume();

  // 2.8.6: the chain takes consecutive positions from the head, wrapping at
  // the ring end (where the wrap counter flips). It can use at most the
  // positions we do not hold; longer means NEXT on too many descriptors.
  const std::uint32_t bound = size_ - held_descs_;
  std::uint16_t pos = avail_pos_;
  bool wrap = avail_wrap_;
  bool seen_write = false;
  std::uint16_t id = 0;
  std::uint32_t count = 0;
  req.readable.clear();
  req.writable.clear();
  req.readable_bytes = req.writable_bytes = 0;
  // The common chain, one direct descriptor, without the general loop; any
  // other shape (or a buffer that does not translate) takes the loop, which
  // reads and checks everything afresh.
  if ((head_flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT)) == 0) {
    PvirtqDesc& d = desc_[pos];
    const std::uint32_t len = load(d.len, std::memory_order_relaxed);
    const bool write = (head_flags & VIRTQ_DESC_F_WRITE) != 0;
    const auto one = len != 0 ? xlate_(load(d.addr, std::memory_order_relaxed), len, write) : std::nullopt;
    if (one && one->size() >= len) {
      (write ? req.writable_bytes : req.readable_bytes) = len;
      if (write) {
        req.writable.push_back(one->subspan(0, len));
      } else {
        req.readable.push_back(one->subspan(0, len));
      }
      id = load(d.id, std::memory_order_relaxed);
      count = 1;
      if (++pos == size_) {
        pos = 0;
        wrap = !wrap;
      }
    }
  }
  const bool fast = count != 0;
  for (; !fast;) {
    if (count == bound) {
      return fail("chain at position " + std::to_string(avail_pos_) + " is longer than the " +
                  std::to_string(bound) + " free ring positions")
          .error();
    }
    PvirtqDesc& d = desc_[pos];
    const std::uint16_t flags = count == 0 ? head_flags : load(d.flags, std::memory_order_relaxed);
    // The driver writes every other descriptor of a chain before the head
    // flags (2.8.21.1), so each must already be available for its own lap.
    if (count != 0 && !available(flags, wrap)) {
      return fail("descriptor " + std::to_string(pos) + " of the chain at position " +
                  std::to_string(avail_pos_) + " is not available (flags " + hex(flags) + ", wrap counter " +
                  std::to_string(wrap) + ")")
          .error();
    }
    const std::uint64_t addr = load(d.addr, std::memory_order_relaxed);
    const std::uint32_t len = load(d.len, std::memory_order_relaxed);
    const bool last = (flags & VIRTQ_DESC_F_NEXT) == 0;
    if ((flags & VIRTQ_DESC_F_INDIRECT) != 0) {
      if (!indirect_) {
        return fail("descriptor " + std::to_string(pos) + " is indirect but VIRTIO_F_INDIRECT_DESC is off")
            .error();
      }
      // 2.8.19: an indirect descriptor is never part of a list linked by
      // NEXT, so it must be a chain on its own. 2.8.7: its WRITE flag is
      // reserved and ignored.
      if (count != 0 || !last) {
        return fail("indirect descriptor " + std::to_string(pos) + " is linked by VIRTQ_DESC_F_NEXT").error();
      }
      UV_TRY_VOID(walk_indirect(pos, addr, len, seen_write, req));
    } else {
      UV_TRY_VOID(add_buffer(addr, len, (flags & VIRTQ_DESC_F_WRITE) != 0, seen_write, pos, kNoEntry, req));
    }
    ++count;
    if (++pos == size_) {
      pos = 0;
      wrap = !wrap;
    }
    if (last) {
      id = load(d.id, std::memory_order_relaxed);  // 2.8.6: the last descriptor's id names the buffer
      break;
    }
  }
  if (find_held(id) != nullptr) {
    return fail("buffer id " + std::to_string(id) + " of the chain at position " +
                std::to_string(avail_pos_) + " is already in flight")
        .error();
  }
  // Valid: commit.
  avail_pos_ = pos;
  avail_wrap_ = wrap;
  held_descs_ += count;
  if (in_order_) order_[ring_advance(order_first_, held_count_, size_)] = id;
  add_held(id, Held{static_cast<std::uint16_t>(count), req.writable_bytes});  // count >= 1
  req.head = id;
  if (event_idx_ && notify_enabled_) {
    // 2.8.10: "kick me when you make the descriptor at my next position
    // available"; the flags already say DESC.
    store(device_event_->desc, packed_off_wrap(avail_pos_, avail_wrap_), std::memory_order_release);
  }
  return true;
}

void PackedDeviceQueue::add_held(std::uint16_t id, Held h) {
  if (id < held_small_.size()) {
    held_small_[id] = h;
  } else {
    held_big_.emplace(id, h);
  }
  ++held_count_;
}

void PackedDeviceQueue::erase_held(std::uint16_t id) noexcept {
  if (id < held_small_.size()) {
    held_small_[id] = Held{};
  } else {
    held_big_.erase(id);
  }
  --held_count_;
}

// Names a descriptor for an error message: "descriptor 5" for a ring
// position, "entry 2 of the indirect table of descriptor 5" inside a table.
// Built only on failure, so the pop path allocates no strings.
std::string PackedDeviceQueue::where(std::uint16_t pos, std::uint32_t entry) {
  if (entry == kNoEntry) return "descriptor " + std::to_string(pos);
  return "entry " + std::to_string(entry) + " of the indirect table of descriptor " + std::to_string(pos);
}

Result<void> PackedDeviceQueue::walk_indirect(std::uint16_t at, std::uint64_t addr, std::uint32_t len,
                                              bool& seen_write, Request& req) {
  // 2.8.7: the table holds len/16 descriptors; empty or ragged is malformed,
  // and the device limits how many (2.8.18). Checked before translating, so
  // a huge length never reaches the callback.
  if (len == 0 || len % sizeof(PvirtqDesc) != 0 || len / sizeof(PvirtqDesc) > max_indirect_) {
    return fail("indirect table of descriptor " + std::to_string(at) + " has bad length " +
                std::to_string(len) + " (want a non-zero multiple of 16 up to " +
                std::to_string(std::uint64_t{max_indirect_} * sizeof(PvirtqDesc)) + ")");
  }
  // The device only reads a table (2.8.7: "read-only by the device").
  const auto table = xlate_(addr, len, false);
  if (!table || table->size() < len) {
    return fail("indirect table of descriptor " + std::to_string(at) + " at " + hex(addr) + " (" +
                std::to_string(len) + " bytes) is not mapped");
  }
  // Each field is loaded once through std::atomic_ref, which needs natural
  // alignment; SplitDeviceQueue refuses such tables the same way.
  if (!aligned(table->data(), alignof(PvirtqDesc))) {
    return fail("indirect table of descriptor " + std::to_string(at) + " at " + hex(addr) +
                " is not 8-byte aligned");
  }
  auto* entries = reinterpret_cast<PvirtqDesc*>(table->data());
  const std::uint32_t n = len / static_cast<std::uint32_t>(sizeof(PvirtqDesc));
  for (std::uint32_t j = 0; j < n; ++j) {
    PvirtqDesc& e = entries[j];
    const std::uint16_t flags = load(e.flags, std::memory_order_relaxed);
    // 2.8.19: the driver MUST NOT set anything but WRITE in a table. Most
    // such flags are ignored as 2.8.7 says (NEXT: the entries are simply
    // consecutive); a nested table is refused, as by the split device:
    // following it is forbidden, and taking its address as a plain buffer
    // would hide the driver's bug.
    if ((flags & VIRTQ_DESC_F_INDIRECT) != 0) {
      return fail(where(at, j) + " is itself indirect");
    }
    UV_TRY_VOID(add_buffer(load(e.addr, std::memory_order_relaxed), load(e.len, std::memory_order_relaxed),
                           (flags & VIRTQ_DESC_F_WRITE) != 0, seen_write, at, j, req));
  }
  return ok();
}

Result<void> PackedDeviceQueue::add_buffer(std::uint64_t addr, std::uint32_t len, bool write,
                                           bool& seen_write, std::uint16_t pos, std::uint32_t entry,
                                           Request& req) {
  // 2.8.17: device-writable elements follow all device-readable ones.
  if (!write && seen_write) {
    return fail("readable " + where(pos, entry) + " follows a writable one in the chain at position " +
                std::to_string(avail_pos_));
  }
  seen_write |= write;
  if (req.readable_bytes + req.writable_bytes + len > kMaxChainBytes) {
    return fail("chain at position " + std::to_string(avail_pos_) + " is longer than 2^32 bytes");
  }
  std::span<std::uint8_t> s;
  if (len != 0) {
    const auto t = xlate_(addr, len, write);
    if (!t || t->size() < len) {
      return fail(std::string(write ? "writable" : "readable") + " buffer of " + where(pos, entry) + " at " +
                  hex(addr) + " (" + std::to_string(len) + " bytes) is not mapped");
    }
    s = t->subspan(0, len);
  }
  if (write) {
    req.writable.push_back(s);
    req.writable_bytes += len;
  } else {
    req.readable.push_back(s);
    req.readable_bytes += len;
  }
  return ok();
}

Result<void> PackedDeviceQueue::check_push(std::uint16_t id, std::uint32_t written, const char* op, Held& h) {
  if (broken_) return Error(Errc::broken, name_, op, "queue is broken by an earlier driver error");
  const Held* held = find_held(id);
  if (held == nullptr) {
    return Error(Errc::invalid_argument, name_, op, "buffer id " + std::to_string(id) + " is not in flight");
  }
  h = *held;
  if (written > h.writable) {
    return Error(Errc::invalid_argument, name_, op,
                 "written " + std::to_string(written) + " exceeds the " + std::to_string(h.writable) +
                     " writable bytes of buffer " + std::to_string(id));
  }
  // 2.8.9: with IN_ORDER chains are used in the order they were made available.
  if (in_order_ && id != order_[order_first_]) {
    return Error(Errc::invalid_argument, name_, op,
                 "buffer id " + std::to_string(id) + " is not the oldest chain in flight (" +
                     std::to_string(order_[order_first_]) + "): VIRTIO_F_IN_ORDER completes chains in order");
  }
  return ok();
}

// One used descriptor at our used position standing for `descs` ring
// positions (one chain, or with IN_ORDER a batch), then skip them.
void PackedDeviceQueue::write_used(std::uint16_t id, std::uint32_t written, bool writable,
                                   std::uint32_t descs, bool defer) noexcept {
  // Our used position is the first of the positions we hold, so this never
  // overwrites a descriptor we have not popped.
  PvirtqDesc& d = desc_[used_pos_];
  store(d.id, id, std::memory_order_relaxed);
  store(d.len, written, std::memory_order_relaxed);
  // 2.8.1: a used descriptor has AVAIL and USED both equal to our used wrap
  // counter. 2.8.4: WRITE says len is meaningful (the chain had writable
  // buffers).
  auto flags = static_cast<std::uint16_t>(used_wrap_ ? (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) : 0);
  if (writable) flags = static_cast<std::uint16_t>(flags | VIRTQ_DESC_F_WRITE);
  if (!defer) {
    // id and len must be visible before the flags that mark them used (2.8.22).
    barrier_publish();
    store(d.flags, flags, std::memory_order_release);
  } else if (!pending_) {
    // The first of a deferred batch: publish_used() stores its flags last.
    pending_ = true;
    pending_pos_ = used_pos_;
    pending_wrap_ = used_wrap_;
    pending_flags_ = flags;
  } else {
    // Ordered before the first descriptor's flags by publish_used()'s barrier.
    store(d.flags, flags, std::memory_order_relaxed);
  }
  // 2.8.6 (2.8.9): the used descriptor stands for the whole chain (batch); skip its positions.
  const std::uint32_t next = std::uint32_t{used_pos_} + descs;
  if (next >= size_) {
    used_pos_ = static_cast<std::uint16_t>(next - size_);
    used_wrap_ = !used_wrap_;
  } else {
    used_pos_ = static_cast<std::uint16_t>(next);
  }
  held_descs_ -= descs;
  (defer ? pending_moved_ : moved_) += descs;
}

Result<void> PackedDeviceQueue::push(std::uint16_t id, std::uint32_t written) {
  UV_TRY_VOID(push_deferred(id, written));
  publish_used();
  return ok();
}

Result<void> PackedDeviceQueue::push_deferred(std::uint16_t id, std::uint32_t written) {
  Held h;
  UV_TRY_VOID(check_push(id, written, "push used descriptor", h));
  erase_held(id);
  if (!in_order_) {
    write_used(id, written, h.writable != 0, h.count, true);
    return ok();
  }
  order_first_ = ring_advance(order_first_, 1, size_);
  ++batch_count_;
  batch_descs_ += h.count;  // held_descs_ keeps counting them until written
  batch_id_ = id;
  batch_len_ = written;
  batch_writable_ = h.writable != 0;
  return ok();
}

void PackedDeviceQueue::publish_used() noexcept {
  if (broken_) return;
  if (pending_) {
    // id, len and the later descriptors' flags must be visible before the
    // flags that mark the batch's first descriptor used (2.8.22).
    barrier_publish();
    store(desc_[pending_pos_].flags, pending_flags_, std::memory_order_release);
    pending_ = false;
    moved_ += pending_moved_;
    pending_moved_ = 0;
  }
  if (batch_count_ == 0) return;
  // 2.8.9: one used descriptor with the last buffer id, skipping the batch.
  write_used(batch_id_, batch_len_, batch_writable_, batch_descs_);
  batch_count_ = 0;
  batch_descs_ = 0;
}

Result<void> PackedDeviceQueue::set_in_order(bool enabled) {
  if (held_count_ != 0 || batch_count_ > 0 || pending_) {
    return Error(Errc::busy, name_, "set in-order", "chains are popped and not published; set it before use");
  }
  in_order_ = enabled;
  order_.assign(enabled ? size_ : 0, 0);
  order_first_ = 0;
  return ok();
}

bool PackedDeviceQueue::has_avail() const noexcept {
  if (broken_ || held_descs_ >= size_) return false;
  return available(load(desc_[avail_pos_].flags, std::memory_order_acquire), avail_wrap_);
}

bool PackedDeviceQueue::should_interrupt() noexcept {
  if (broken_) return false;
  // Our used-flag stores must be ordered before reading the driver's event
  // suppression area, or we could miss its switch back to ENABLE or a new
  // event offset (2.8.10).
  barrier_store_load();
  const std::uint64_t moved = moved_;
  moved_ = 0;
  if (moved == 0) return false;
  // Flags first (acquire), then the offset the driver stored before them.
  const std::uint16_t flags = load(driver_event_->flags, std::memory_order_acquire);
  const std::uint16_t off_wrap = load(driver_event_->desc, std::memory_order_relaxed);
  // Clamped: packed_need_event treats a whole ring (or more) the same.
  const auto span = static_cast<std::uint32_t>(std::min<std::uint64_t>(moved, size_));
  // The published descriptors end where a deferred batch begins: used_pos_
  // has already moved past that batch, which the driver cannot see yet.
  const std::uint16_t end = pending_ ? pending_pos_ : used_pos_;
  const bool end_wrap = pending_ ? pending_wrap_ : used_wrap_;
  return packed_event_wanted(flags, off_wrap, event_idx_, size_, end, end_wrap, span);
}

void PackedDeviceQueue::set_notifications(bool enabled) noexcept {
  if (broken_) return;
  notify_enabled_ = enabled;
  write_device_event();
}

// Our event suppression area from our shadow state: DISABLE, ENABLE, or with
// EVENT_IDX DESC at our next avail position, the offset stored before the
// flags (release) so a driver that sees DESC sees the matching offset.
void PackedDeviceQueue::write_device_event() noexcept {
  if (!notify_enabled_) {
    store(device_event_->flags, RING_EVENT_FLAGS_DISABLE, std::memory_order_release);
    return;
  }
  if (event_idx_) {
    store(device_event_->desc, packed_off_wrap(avail_pos_, avail_wrap_), std::memory_order_release);
    store(device_event_->flags, RING_EVENT_FLAGS_DESC, std::memory_order_release);
    return;
  }
  store(device_event_->flags, RING_EVENT_FLAGS_ENABLE, std::memory_order_release);
}

bool PackedDeviceQueue::enable_notifications_and_check() noexcept {
  if (broken_) return false;
  set_notifications(true);
  // The flag store before re-reading the descriptor at our position (2.8.10).
  barrier_store_load();
  return has_avail();
}

Result<void> PackedDeviceQueue::fail(std::string cause) {
  broken_ = true;
  return Error(Errc::bad_device_data, name_, kPop, std::move(cause));
}

}  // namespace uvirtio::rings
