// Packed virtqueue, driver role: writes descriptor chains into the shared
// ring and takes validated completions off the same ring (virtio spec 1.2,
// 2.8). The device is not trusted: buffer ids, chain lengths, writable byte
// counts and tokens live only in driver-private memory (`extra_`), the ring
// position always advances by the chain length we recorded, every
// device-written word is read exactly once, and a used descriptor is checked
// completely before any state changes. A violation latches the queue broken;
// from then on no ring memory is read or written.
//
// Descriptor flags and event suppression flags are accessed through
// std::atomic_ref on the little-endian storage of the Le<> fields. Spec
// sections: 2.8.1 (wrap counters), 2.8.2 (polling), 2.8.6 (chains and the
// used-descriptor skip), 2.8.7 (indirect tables), 2.8.21 (supplying
// buffers), 2.8.22 (receiving used buffers), 2.8.10 and 2.8.14 (event
// suppression, with VIRTIO_F_EVENT_IDX the DESC offset/wrap form), 2.8.9
// (VIRTIO_F_IN_ORDER: one used descriptor for a batch).
#include "uvirtio/rings/packed.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <utility>

#include "free_ids.hpp"
#include "indirect_pool.hpp"
#include "uvirtio/base/barrier.hpp"

namespace uvirtio::rings {
namespace {

std::uint16_t load_acquire(le16& f) noexcept {
  return le16::from_raw(std::atomic_ref<std::uint16_t>(f.raw()).load(std::memory_order_acquire));
}
void store_release(le16& f, std::uint16_t v) noexcept {
  std::atomic_ref<std::uint16_t>(f.raw()).store(le16::to_raw(v), std::memory_order_release);
}
// A single read of a device-written word (the device may change it under us).
template <class T>
T read_once(Le<T>& f) noexcept {
  return Le<T>::from_raw(std::atomic_ref<T>(f.raw()).load(std::memory_order_relaxed));
}

bool aligned(const void* p, std::size_t a) noexcept { return reinterpret_cast<std::uintptr_t>(p) % a == 0; }

// AVAIL and USED bits of a descriptor the driver makes available while its
// wrap counter is `wrap`: AVAIL = wrap, USED = !wrap (2.8.1).
std::uint16_t avail_bits(bool wrap) noexcept { return wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED; }

}  // namespace

Result<void> PackedLayout::check(std::uint16_t size, const void* desc_ring, const void* driver_event,
                                 const void* device_event, const std::string& name, const char* op) {
  if (size == 0 || size > 32768)  // 2.8.10.1: Queue Size up to 2^15, any value
    return Error(Errc::invalid_argument, name, op, "size " + std::to_string(size) + " is not in [1, 32768]");
  if (desc_ring == nullptr || driver_event == nullptr || device_event == nullptr)
    return Error(Errc::invalid_argument, name, op, "ring pointer is null");
  if (!aligned(desc_ring, desc_align) || !aligned(driver_event, event_align) ||
      !aligned(device_event, event_align)) {
    return Error(Errc::invalid_argument, name, op,
                 "ring areas must be aligned to 16 (descriptors) and 4 (event suppression) bytes");
  }
  return ok();
}

Result<PackedQueue> PackedQueue::create(std::uint16_t size, void* desc_ring, void* driver_event,
                                        void* device_event, std::string name) {
  const char* op = "create packed queue";
  UV_TRY_VOID(PackedLayout::check(size, desc_ring, driver_event, device_event, name, op));
  PackedQueue q;
  q.size_ = size;
  q.desc_ = static_cast<PvirtqDesc*>(desc_ring);
  q.driver_event_ = static_cast<PvirtqEventSuppress*>(driver_event);
  q.device_event_ = static_cast<PvirtqEventSuppress*>(device_event);
  q.name_ = std::move(name);
  q.held_back_.assign(size, false);
  q.init_state();
  return q;
}

void PackedQueue::init_state() {
  // All zero: no descriptor looks available or used for wrap counter 1, and
  // both event areas say RING_EVENT_FLAGS_ENABLE.
  std::memset(static_cast<void*>(desc_), 0, PackedLayout::desc_bytes(size_));
  std::memset(static_cast<void*>(driver_event_), 0, PackedLayout::event_bytes());
  std::memset(static_cast<void*>(device_event_), 0, PackedLayout::event_bytes());
  extra_.assign(size_, Extra{});
  for (std::uint16_t i = 0; i < size_; ++i) extra_[i].next_free = static_cast<std::uint16_t>(i + 1);
  num_free_ = size_;
  next_avail_ = 0;
  avail_wrap_ = true;
  last_used_ = 0;
  used_wrap_ = true;
  free_id_ = 0;
  add_seq_ = 0;
  moved_ = 0;
  batch_left_ = batch_pos_ = 0;
  batch_len_ = 0;
  broken_ = false;
  stale_broken_ = false;
}

std::size_t PackedQueue::indirect_limit() const noexcept {
  if (!indirect_ || pool_ == nullptr) return 0;
  return std::min(max_indirect_, slot_entries_);
}

Result<std::uint16_t> PackedQueue::add(std::span<const Buffer> out, std::span<const Buffer> in,
                                       std::uint64_t token) {
  const char* op = "add buffers";
  if (broken_) return broken_error(op);
  const std::size_t n = out.size() + in.size();
  const std::int64_t checked = detail::chain_writable(out, in);
  if (checked < 0) return detail::chain_fault(checked, name_);
  const auto writable = static_cast<std::uint32_t>(checked);
  // 2.8.7: a list of several buffers can live in an indirect table and take
  // a single ring position.
  const bool indirect = n > 1 && n <= indirect_limit();
  const std::size_t ring_descs = indirect ? 1 : n;
  if (ring_descs > num_free_) [[unlikely]] {
    // More than the whole ring never fits (num_free_ <= size_): not busy.
    if (ring_descs > size_) return detail::chain_too_long(ring_descs, size_, name_);
    return Error(Errc::busy, name_, op,
                 std::to_string(ring_descs) + " descriptors needed, " + std::to_string(num_free_) + " free");
  }

  // A free descriptor count >= 1 implies a free id: each live id holds at
  // least one ring position. With in_order the id is the head's position,
  // free because the positions in flight run from the oldest chain's to ours.
  const std::uint16_t id = in_order_ ? next_avail_ : free_id_;
  Extra& x = extra_[id];
  if (!in_order_) free_id_ = x.next_free;
  if (held_count_ != 0 && held_back_[id]) {  // handed out again: a used descriptor naming it is ours now
    held_back_[id] = false;
    --held_count_;
  }

  const std::uint16_t head = next_avail_;
  std::uint16_t head_flags = 0;
  if (indirect) {
    // The table is the buffer id's slot in driver-owned, device-visible
    // memory; the id is not reused before its used descriptor comes back, so
    // the device never sees a slot change under it. 2.8.7: WRITE is the only
    // flag inside a table (no NEXT: the entries are simply consecutive) and
    // the buffer id there is reserved; we write 0. Like the ring, we never
    // read a table back.
    const std::size_t stride = slot_entries_ * sizeof(PvirtqDesc);
    auto* table = reinterpret_cast<PvirtqDesc*>(pool_ + std::size_t{id} * stride);
    std::size_t j = 0;
    for (const auto* part : {&out, &in}) {
      const std::uint16_t write = part == &in ? VIRTQ_DESC_F_WRITE : 0;
      for (const Buffer& b : *part) {
        table[j].addr.set(b.addr);
        table[j].len.set(b.len);
        table[j].id.set(0);
        table[j].flags.set(write);
        ++j;
      }
    }
    PvirtqDesc& d = desc_[head];
    d.addr.set(pool_device_ + std::uint64_t{id} * stride);
    d.len.set(static_cast<std::uint32_t>(n * sizeof(PvirtqDesc)));
    d.id.set(id);
    // 2.8.7: never with NEXT, and WRITE is reserved on this descriptor.
    head_flags = static_cast<std::uint16_t>(VIRTQ_DESC_F_INDIRECT | avail_bits(avail_wrap_));
    if (++next_avail_ == size_) {
      next_avail_ = 0;
      avail_wrap_ = !avail_wrap_;
    }
  } else {
    // 2.8.6, 2.8.21.1: the chain takes consecutive positions, wrapping at
    // the ring end (the wrap counter flips there, so later descriptors carry
    // the flipped AVAIL/USED bits). We write the id into every descriptor;
    // the spec needs it only in the last.
    std::size_t k = 0;
    for (const auto* part : {&out, &in}) {
      const std::uint16_t write = part == &in ? VIRTQ_DESC_F_WRITE : 0;
      for (const Buffer& b : *part) {
        const bool last = ++k == n;
        PvirtqDesc& d = desc_[next_avail_];
        d.addr.set(b.addr);
        d.len.set(b.len);
        d.id.set(id);
        const auto flags =
            static_cast<std::uint16_t>(write | (last ? 0 : VIRTQ_DESC_F_NEXT) | avail_bits(avail_wrap_));
        if (k == 1) {
          head_flags = flags;  // stored below, after the rest of the chain
        } else {
          d.flags.set(flags);  // the device reads these only after the head flags
        }
        if (++next_avail_ == size_) {
          next_avail_ = 0;
          avail_wrap_ = !avail_wrap_;
        }
      }
    }
  }
  num_free_ = static_cast<std::uint16_t>(num_free_ - ring_descs);
  // Saturates: a whole ring or more kicks anyway (packed_need_event), and a
  // caller that never publishes must not wrap the count back to "few".
  if (moved_ < size_) moved_ += static_cast<std::uint32_t>(ring_descs);
  x.chain_len = static_cast<std::uint16_t>(ring_descs);
  x.writable = writable;
  x.token = token;
  x.seq = add_seq_++;

  // 2.8.21.1: the rest of the chain, the indirect table (and the head's
  // addr/len/id) must be visible before the head's flags hand the chain to
  // the device.
  barrier_publish();
  store_release(desc_[head].flags, head_flags);
  return id;
}

bool PackedQueue::publish() {
  if (broken_) return false;
  // Our head-flag stores must be ordered before reading the device's event
  // suppression area, or we could miss its switch back to ENABLE or a new
  // event offset (2.8.10, 2.8.21.2).
  barrier_store_load();
  const std::uint32_t moved = moved_;
  moved_ = 0;
  // Flags first (acquire), then the offset: the device stores the offset
  // before the flags that make it meaningful, so DESC comes with its offset.
  const std::uint16_t flags = load_acquire(device_event_->flags);
  const std::uint16_t off_wrap = read_once(device_event_->desc);
  return packed_event_wanted(flags, off_wrap, event_idx_, size_, next_avail_, avail_wrap_, moved);
}

Result<std::optional<Completion>> PackedQueue::poll() {
  const char* op = "poll used ring";
  if (broken_) return broken_error(op);
  if (batch_left_ > 0) return std::optional<Completion>{take_oldest()};
  PvirtqDesc& d = desc_[last_used_];
  const std::uint16_t flags = load_acquire(d.flags);
  const bool avail = (flags & VIRTQ_DESC_F_AVAIL) != 0;
  const bool used = (flags & VIRTQ_DESC_F_USED) != 0;
  if (avail != used_wrap_ || used != used_wrap_) {
    // Not used (2.8.1, 2.8.2). While we have descriptors in flight, this position
    // holds one we made available in the current lap (AVAIL = wrap counter,
    // USED = !wrap counter) until the device overwrites it with a used
    // descriptor (both = wrap counter); any other AVAIL value means the
    // device wrote wrong or stale wrap bits. With nothing in flight the slot
    // holds leftovers of an earlier lap, which are legitimately not used.
    if (in_flight() > 0 && avail != used_wrap_) {
      return fail("descriptor " + std::to_string(last_used_) + " of an in-flight chain has avail/used bits " +
                  std::to_string(avail) + "/" + std::to_string(used) + " (used wrap counter " +
                  std::to_string(used_wrap_) + ")")
          .error();
    }
    return std::optional<Completion>{};
  }
  // The id and length must be read after the flags that mark them used (2.8.22).
  barrier_consume();
  const std::uint16_t id = read_once(d.id);
  const std::uint32_t len = read_once(d.len);
  if (id >= size_) return fail("used id " + std::to_string(id) + " out of range").error();
  Extra& x = extra_[id];
  if (x.chain_len == 0) {
    if (held_back_[id]) {
      // A request a reset abandoned, completed by a device that went on
      // with it (QEMU 7.2's virtio-pmem). It cannot be skipped: the device
      // has moved its used position past it too. Only a reset goes on.
      broken_ = true;
      stale_broken_ = true;
      return Error(
          Errc::stale_completion, name_, op,
          "used id " + std::to_string(id) +
              " not in flight: the device completed a request from before the reset; reset the device");
    }
    return fail("used id " + std::to_string(id) + " not in flight").error();
  }
  // 2.8.4 lets a driver ignore len when the used descriptor lacks
  // VIRTQ_DESC_F_WRITE; devices commonly leave that flag clear, so like
  // Linux we take len as written and check it against our own count.
  if (len > x.writable) {
    return fail("used len " + std::to_string(len) + " exceeds the " + std::to_string(x.writable) +
                " device-writable bytes of chain " + std::to_string(id))
        .error();
  }

  if (in_order_) {
    // 2.8.9: the descriptor at our last-used position reports every chain
    // from the oldest in flight (whose id is that position) up to chain
    // `id`; skip all their positions, by our own counts.
    std::uint32_t skip = 0;
    std::uint16_t batch = 0;
    std::uint16_t p = last_used_;
    for (;;) {
      const std::uint16_t n = extra_[p].chain_len;
      skip += n;
      ++batch;
      if (p == id) break;
      p = ring_advance(p, n, size_);
    }
    batch_pos_ = last_used_;
    batch_left_ = batch;
    batch_len_ = len;
    const std::uint32_t end = std::uint32_t{last_used_} + skip;
    if (end >= size_) {
      last_used_ = static_cast<std::uint16_t>(end - size_);
      used_wrap_ = !used_wrap_;
    } else {
      last_used_ = static_cast<std::uint16_t>(end);
    }
    if (event_idx_ && interrupts_) {
      store_release(driver_event_->desc, packed_off_wrap(last_used_, used_wrap_));
      barrier_store_load();
    }
    return std::optional<Completion>{take_oldest()};
  }

  // Valid: skip the chain's descriptors by our own count (2.8.6) and free the id.
  const std::uint32_t next = std::uint32_t{last_used_} + x.chain_len;
  if (next >= size_) {
    last_used_ = static_cast<std::uint16_t>(next - size_);
    used_wrap_ = !used_wrap_;
  } else {
    last_used_ = static_cast<std::uint16_t>(next);
  }
  num_free_ = static_cast<std::uint16_t>(num_free_ + x.chain_len);
  x.chain_len = 0;
  x.next_free = free_id_;
  free_id_ = id;
  // The descriptors two lines on: a device that used this one has often
  // used those too (it publishes in batches), and the miss on each new line
  // of the ring is most of what poll() costs. Only a hint: nothing is read.
  {
    std::uint32_t ahead = std::uint32_t{last_used_} + 8;
    if (ahead >= size_) ahead -= size_;
    if (ahead < size_) __builtin_prefetch(&desc_[ahead]);
  }
  if (event_idx_ && interrupts_) {
    // Interrupts on: ask for one at the next used descriptor (2.8.10), and
    // order that store before our next read of the ring, so a descriptor the
    // device uses meanwhile is either seen by us or interrupts us. The flags
    // already say DESC.
    store_release(driver_event_->desc, packed_off_wrap(last_used_, used_wrap_));
    barrier_store_load();
  }
  return std::optional<Completion>{Completion{x.token, len, false, id}};
}

// Frees the oldest chain in flight (in_order, a batch pending). Only the
// batch's last chain carries the device's length.
Completion PackedQueue::take_oldest() noexcept {
  const std::uint16_t id = batch_pos_;
  Extra& x = extra_[id];
  batch_pos_ = ring_advance(batch_pos_, x.chain_len, size_);
  num_free_ = static_cast<std::uint16_t>(num_free_ + x.chain_len);
  x.chain_len = 0;
  --batch_left_;
  if (batch_left_ == 0) return Completion{x.token, batch_len_, false, id};
  return Completion{x.token, 0, true, id};
}

bool PackedQueue::has_used() const noexcept {
  if (broken_) return false;
  if (batch_left_ > 0) return true;
  const std::uint16_t flags = load_acquire(desc_[last_used_].flags);
  return ((flags & VIRTQ_DESC_F_AVAIL) != 0) == used_wrap_ &&
         ((flags & VIRTQ_DESC_F_USED) != 0) == used_wrap_;
}

void PackedQueue::set_interrupts(bool enabled) noexcept {
  if (broken_) return;
  interrupts_ = enabled;
  write_driver_event();
}

// The driver event suppression area from our shadow state, never from what
// is in memory: DISABLE, ENABLE, or with EVENT_IDX DESC at the next used
// position. The offset is stored before the flags (release), so a device
// that sees DESC also sees the offset that goes with it.
void PackedQueue::write_driver_event() noexcept {
  if (!interrupts_) {
    store_release(driver_event_->flags, RING_EVENT_FLAGS_DISABLE);
    return;
  }
  if (event_idx_) {
    store_release(driver_event_->desc, packed_off_wrap(last_used_, used_wrap_));
    store_release(driver_event_->flags, RING_EVENT_FLAGS_DESC);
    return;
  }
  store_release(driver_event_->flags, RING_EVENT_FLAGS_ENABLE);
}

bool PackedQueue::enable_interrupts_and_check() noexcept {
  if (broken_) return false;
  set_interrupts(true);
  // Our event area stores must be ordered before re-reading the ring (2.8.10,
  // 2.8.22): otherwise a used descriptor written in between is neither seen
  // here nor signalled.
  barrier_store_load();
  return has_used();
}

void PackedQueue::set_event_idx(bool enabled) noexcept {
  event_idx_ = enabled;
  if (broken_) return;
  write_driver_event();
}

Result<void> PackedQueue::reset_ring() {
  // Buffer ids in flight now are handed out last (see SplitQueue::reset_ring).
  const std::uint16_t after = detail::after_ids_in_flight(extra_, size_);
  if (!in_order_)
    for (std::uint16_t i = 0; i < size_; ++i)
      if (extra_[i].chain_len != 0) hold_back(i);
  init_state();
  write_driver_event();        // the zeroed area says "enabled"; restore what was asked
  if (in_order_) return ok();  // ids follow ring positions there
  return start_ids_at(after);
}

Result<void> PackedQueue::start_ids_at(std::uint16_t first) { return relink_ids("start ids", first, {}); }

Result<void> PackedQueue::adopt_stale(std::uint16_t first, std::span<const std::uint16_t> ids) {
  return relink_ids("adopt stale ids", first, ids);
}

Result<void> PackedQueue::relink_ids(const char* op, std::uint16_t first,
                                     std::span<const std::uint16_t> ids) {
  if (auto why = detail::relink_problem(in_flight() == 0, in_order_, size_, first, ids); !why.empty())
    return Error(Errc::invalid_argument, name_, op, why);
  for (const std::uint16_t id : ids) hold_back(id);
  free_id_ = detail::link_free_ids_last(extra_, size_, first, &Extra::next_free, held_back_);
  return ok();
}

Result<void> PackedQueue::set_in_order(bool enabled) {
  if (in_flight() > 0) {
    return Error(Errc::busy, name_, "set in-order",
                 std::to_string(in_flight()) + " descriptors are in flight; set it before use");
  }
  in_order_ = enabled;
  // Everything is free: a fresh id free list, which in_order does not keep.
  // Ids still held back (reset_ring, adopt_stale) stay held back and last,
  // as a relink keeps them: their late completion may still come.
  free_id_ = detail::link_free_ids_last(extra_, size_, 0, &Extra::next_free, held_back_);
  batch_left_ = 0;
  return ok();
}

void PackedQueue::set_indirect(bool enabled, std::size_t max_indirect) noexcept {
  indirect_ = enabled;
  max_indirect_ = max_indirect;
}

Result<void> PackedQueue::provide_indirect_pool(void* va, std::uint64_t device_addr, std::size_t bytes) {
  static_assert(sizeof(PvirtqDesc) == 16);
  UV_TRY(const std::size_t entries,
         detail::check_indirect_pool(
             {name_, broken_, indirect_, max_indirect_, in_flight(), size_, va, device_addr, bytes}));
  pool_ = static_cast<std::uint8_t*>(va);
  pool_device_ = device_addr;
  slot_entries_ = entries;
  return ok();
}

std::uint16_t PackedQueue::device_event_flags() const noexcept {
  if (broken_) return 0;
  return load_acquire(device_event_->flags);
}

std::vector<std::uint64_t> PackedQueue::outstanding_tokens() const {
  std::vector<std::pair<std::uint64_t, std::uint64_t>> live;  // (seq, token)
  for (const Extra& x : extra_) {
    if (x.chain_len != 0) live.emplace_back(x.seq, x.token);
  }
  std::sort(live.begin(), live.end());
  std::vector<std::uint64_t> tokens;
  tokens.reserve(live.size());
  for (const auto& [seq, token] : live) tokens.push_back(token);
  return tokens;
}

void PackedQueue::hold_back(std::uint16_t id) noexcept {
  if (held_back_[id]) return;
  held_back_[id] = true;
  ++held_count_;
}

Error PackedQueue::broken_error(const char* op) const {
  if (stale_broken_)
    return Error(Errc::stale_completion, name_, op,
                 "queue is broken by the completion of a request from before the reset; reset the device");
  return Error(Errc::broken, name_, op, "queue is broken by an earlier device error");
}

Result<void> PackedQueue::fail(std::string cause) {
  broken_ = true;
  return Error(Errc::bad_device_data, name_, "poll used ring", std::move(cause));
}

}  // namespace uvirtio::rings
