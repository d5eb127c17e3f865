// Split virtqueue, driver role: writes descriptor chains and the available
// ring, and takes validated completions off the used ring (virtio spec 1.2,
// 2.7). The device is not trusted: the free list, chain lengths, writable
// byte counts and tokens live only in driver-private memory (`extra_`), every
// device-written word is read exactly once, and a used ring entry is checked
// completely before any state changes. A violation latches the queue broken;
// from then on no ring memory is read or written.
//
// Shared indices and flags are accessed through std::atomic_ref on the
// little-endian storage of the Le<> fields. Spec sections: 2.7.13 (supplying
// buffers), 2.7.14 and 2.7.8.3 (receiving used buffers), 2.7.7 and 2.7.10
// (notification suppression, including VIRTIO_F_EVENT_IDX), 2.7.5.3
// (indirect descriptors), 2.7.5 and 2.7.9 (VIRTIO_F_IN_ORDER: descriptors in
// ring order, batches reported by one used entry).
#include "uvirtio/rings/split.hpp"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <limits>
#include <utility>

#include "free_ids.hpp"
#include "indirect_pool.hpp"
#include "uvirtio/base/barrier.hpp"

namespace uvirtio::rings {
namespace {

// le16 words of the rings: both start with flags and idx (spec 2.7.6, 2.7.8);
// the available ring goes on with ring[size] and used_event.
constexpr std::size_t kFlags = 0;
constexpr std::size_t kIdx = 1;
constexpr std::size_t kRing = 2;

le16* words(std::uint8_t* area) noexcept { return reinterpret_cast<le16*>(area); }

std::uint16_t load_acquire(le16& f) noexcept {
  return le16::from_raw(std::atomic_ref<std::uint16_t>(f.raw()).load(std::memory_order_acquire));
}
void store_release(le16& f, std::uint16_t v) noexcept {
  std::atomic_ref<std::uint16_t>(f.raw()).store(le16::to_raw(v), std::memory_order_release);
}
// A single read of a device-written word (the device may change it under us).
std::uint32_t read_once(le32& f) noexcept {
  return le32::from_raw(std::atomic_ref<std::uint32_t>(f.raw()).load(std::memory_order_relaxed));
}

// used_event (last word of the available ring) and avail_event (last word of
// the used ring), spec 2.7.6 and 2.7.8.
le16& used_event(std::uint8_t* avail, std::uint16_t size) noexcept {
  return *reinterpret_cast<le16*>(avail + SplitLayout::used_event_offset(size));
}
le16& avail_event(std::uint8_t* used, std::uint16_t size) noexcept {
  return *reinterpret_cast<le16*>(used + SplitLayout::avail_event_offset(size));
}

bool aligned(const void* p, std::size_t a) noexcept { return reinterpret_cast<std::uintptr_t>(p) % a == 0; }

}  // namespace

Result<void> SplitLayout::check(std::uint16_t size, const void* desc, const void* avail, const void* used,
                                const std::string& name, const char* op) {
  if (!std::has_single_bit(size)) {  // uint16_t: a single bit means [1, 32768]
    return Error(Errc::invalid_argument, name, op,
                 "size " + std::to_string(size) + " is not a power of two in [1, 32768]");
  }
  if (desc == nullptr || avail == nullptr || used == nullptr)
    return Error(Errc::invalid_argument, name, op, "ring pointer is null");
  if (!aligned(desc, desc_align) || !aligned(avail, avail_align) || !aligned(used, used_align)) {
    return Error(Errc::invalid_argument, name, op,
                 "ring areas must be aligned to 16 (descriptors), 2 (available) and 4 (used) bytes");
  }
  return ok();
}

Result<SplitQueue> SplitQueue::create(std::uint16_t size, void* desc, void* avail, void* used,
                                      std::string name) {
  const char* op = "create split queue";
  UV_TRY_VOID(SplitLayout::check(size, desc, avail, used, name, op));
  std::memset(desc, 0, SplitLayout::desc_bytes(size));
  std::memset(avail, 0, SplitLayout::avail_bytes(size));
  std::memset(used, 0, SplitLayout::used_bytes(size));

  SplitQueue q;
  q.size_ = size;
  q.desc_ = static_cast<VirtqDesc*>(desc);
  q.avail_ = static_cast<std::uint8_t*>(avail);
  q.used_ = static_cast<std::uint8_t*>(used);
  q.name_ = std::move(name);
  q.init_shadow();
  q.stale_.assign(size, false);
  return q;
}

void SplitQueue::init_shadow() {
  extra_.assign(size_, Extra{});
  for (std::uint16_t i = 0; i < size_; ++i) extra_[i].next = static_cast<std::uint16_t>(i + 1);
  free_head_ = 0;
  num_free_ = size_;
  avail_idx_shadow_ = 0;
  published_idx_ = 0;
  last_used_ = 0;
  used_cache_ = 0;
  avail_flags_shadow_ = 0;
  next_seq_ = 0;
  batch_left_ = 0;
  batch_len_ = 0;
  broken_ = false;
}

std::size_t SplitQueue::indirect_limit() const noexcept {
  if (!indirect_ || pool_ == nullptr) return 0;
  return std::min(max_indirect_, slot_entries_);
}

Error detail::chain_fault(std::int64_t fault, const std::string& queue) {
  const char* op = "add buffers";
  switch (fault) {
    case kChainEmpty:
      return Error(Errc::invalid_argument, queue, op, "empty descriptor chain");
    case kChainZeroLength:
      return Error(Errc::invalid_argument, queue, op, "zero-length buffer");
    case kChainOverFourGiB:
      return Error(Errc::invalid_argument, queue, op, "chain is longer than 2^32 bytes in total");
    default:
      return Error(Errc::invalid_argument, queue, op, "device-writable bytes of the chain overflow 32 bits");
  }
}

Error detail::chain_too_long(std::size_t needed, std::size_t queue_size, const std::string& queue) {
  return Error(Errc::invalid_argument, queue, "add buffers",
               "the chain needs " + std::to_string(needed) + " descriptors, the queue has only " +
                   std::to_string(queue_size));
}

Result<std::uint32_t> chain_writable_bytes(std::span<const Buffer> out, std::span<const Buffer> in,
                                           const std::string& queue) {
  const std::int64_t w = detail::chain_writable(out, in);
  if (w < 0) return detail::chain_fault(w, queue);
  return static_cast<std::uint32_t>(w);
}

Result<std::uint16_t> SplitQueue::add(std::span<const Buffer> out, std::span<const Buffer> in,
                                      std::uint64_t token) {
  if (broken_) [[unlikely]]
    return broken_error("add buffers");
  const std::size_t n = out.size() + in.size();
  const std::int64_t checked = detail::chain_writable(out, in);
  if (checked < 0) [[unlikely]]
    return detail::chain_fault(checked, name_);
  const auto writable = static_cast<std::uint32_t>(checked);
  // Spec 2.7.5.3: a chain of several buffers goes into the head's indirect
  // table and takes one ring descriptor (also when the ring has too few free).
  const bool indirect = n > 1 && n <= indirect_limit();
  const std::size_t ring_descs = indirect ? 1 : n;
  if (ring_descs > num_free_) [[unlikely]] {
    // More than the whole queue never fits: busy would have the caller
    // retry forever. (Checked only here: num_free_ <= size_.)
    if (ring_descs > size_) return detail::chain_too_long(ring_descs, size_, name_);
    return busy_error(ring_descs);
  }

  // The descriptor after `i` in allocation order: our free-list link, or with
  // VIRTIO_F_IN_ORDER the next offset in the table, wrapping at its end (2.7.5).
  const auto next_of = [this](std::uint16_t i) noexcept {
    return in_order_ ? static_cast<std::uint16_t>((i + 1u) & (size_ - 1u)) : extra_[i].next;
  };
  const std::uint16_t head = free_head_;
  if (indirect) {
    // The table lives in driver-owned, device-visible memory and is written
    // before publish()'s barrier like any descriptor; the device may scribble
    // on it, but we never read it back. No INDIRECT flag inside (2.7.5.3.1).
    const std::size_t stride = slot_entries_ * sizeof(VirtqDesc);
    auto* table = reinterpret_cast<VirtqDesc*>(pool_ + std::size_t{head} * stride);
    std::size_t j = 0;
    for (const auto* part : {&out, &in}) {
      const std::uint16_t write = part == &in ? VIRTQ_DESC_F_WRITE : 0;
      for (const Buffer& b : *part) {
        const bool last = j + 1 == n;
        table[j].addr.set(b.addr);
        table[j].len.set(b.len);
        table[j].flags.set(static_cast<std::uint16_t>(write | (last ? 0 : VIRTQ_DESC_F_NEXT)));
        table[j].next.set(last ? 0 : static_cast<std::uint16_t>(j + 1));
        ++j;
      }
    }
    VirtqDesc& d = desc_[head];
    d.addr.set(pool_device_ + std::uint64_t{head} * stride);
    d.len.set(static_cast<std::uint32_t>(n * sizeof(VirtqDesc)));
    d.flags.set(VIRTQ_DESC_F_INDIRECT);  // never with NEXT (2.7.5.3.1)
    d.next.set(0);
    free_head_ = next_of(head);
    num_free_ = static_cast<std::uint16_t>(num_free_ - 1);
    extra_[head].chain_len = 1;
    extra_[head].writable = writable;
    extra_[head].token = token;
    extra_[head].seq = next_seq_++;
    words(avail_)[kRing + (avail_idx_shadow_ & (size_ - 1u))].set(head);
    ++avail_idx_shadow_;
    if (stale_count_ != 0) [[unlikely]]
      unmark_stale(head, 1);
    return head;
  }

  // Spec 2.7.13.1: fill the descriptors, walking our own free-list links.
  std::uint16_t i = head;
  std::size_t k = 0;
  for (const auto* part : {&out, &in}) {
    const std::uint16_t write = part == &in ? VIRTQ_DESC_F_WRITE : 0;
    for (const Buffer& b : *part) {
      const bool last = ++k == n;
      VirtqDesc& d = desc_[i];
      d.addr.set(b.addr);
      d.len.set(b.len);
      d.flags.set(static_cast<std::uint16_t>(write | (last ? 0 : VIRTQ_DESC_F_NEXT)));
      d.next.set(last ? 0 : next_of(i));
      if (!last) i = next_of(i);
    }
  }
  free_head_ = next_of(i);
  num_free_ = static_cast<std::uint16_t>(num_free_ - n);
  extra_[head].chain_len = static_cast<std::uint16_t>(n);
  extra_[head].writable = writable;
  extra_[head].token = token;
  extra_[head].seq = next_seq_++;
  if (stale_count_ != 0) [[unlikely]]
    unmark_stale(head, static_cast<std::uint16_t>(n));

  // Spec 2.7.13.2: the head goes into the next available ring slot; the
  // index itself is stored by publish().
  words(avail_)[kRing + (avail_idx_shadow_ & (size_ - 1u))].set(head);
  ++avail_idx_shadow_;
  return head;
}

bool SplitQueue::publish() {
  if (broken_) return false;
  // Descriptors and ring entries must be visible before the index covering them (2.7.13.3).
  barrier_publish();
  store_release(words(avail_)[kIdx], avail_idx_shadow_);
  // The index store must be ordered before reading the device's NO_NOTIFY
  // flag or avail_event (2.7.10, 2.7.13.4): otherwise the device could go to
  // sleep having seen the old index while we read its stale "don't notify".
  barrier_store_load();
  const std::uint16_t old_idx = published_idx_;
  published_idx_ = avail_idx_shadow_;
  if (event_idx_) {
    return vring_need_event(load_acquire(avail_event(used_, size_)), avail_idx_shadow_, old_idx);
  }
  return (load_acquire(words(used_)[kFlags]) & VIRTQ_USED_F_NO_NOTIFY) == 0;
}

inline void SplitQueue::step_past_used_entry() noexcept {
  ++last_used_;
  if (event_idx_ && (avail_flags_shadow_ & VIRTQ_AVAIL_F_NO_INTERRUPT) == 0) {
    // Interrupts on: ask for one at the next entry (2.7.7.2), and order that
    // store before our next read of the used index, so an entry the device
    // adds meanwhile is either seen by us or interrupts us.
    store_release(used_event(avail_, size_), last_used_);
    barrier_store_load();
  }
}

Result<std::optional<Completion>> SplitQueue::poll() {
  if (broken_) [[unlikely]]
    return broken_error("poll used ring");
  if (in_order_) return poll_in_order();
  // Loops only past used entries of stale ids (one per id, drop_stale), not
  // by recursion: a device may name every id of a 32768-entry ring that way.
  for (;;) {
    if (last_used_ == used_cache_) {
      // Everything seen is consumed: read the index again (once per batch, not
      // per entry: the line it sits on is the one the device keeps writing).
      const std::uint16_t used_idx = load_acquire(words(used_)[kIdx]);
      if (used_idx == last_used_) return std::optional<Completion>{};
      const auto ahead = static_cast<std::uint16_t>(used_idx - last_used_);
      if (ahead > size_) [[unlikely]]
        return used_index_error(used_idx);
      used_cache_ = used_idx;
      // The used entries must be read after the index that covers them (2.7.14).
      barrier_consume();
      // Their cache lines (8 entries each) on their way at once, not one miss
      // after the other.
      auto* entries = reinterpret_cast<VirtqUsedElem*>(used_ + 4);
      for (std::uint16_t k = 8; k < ahead && k <= 64; k = static_cast<std::uint16_t>(k + 8))
        __builtin_prefetch(&entries[(last_used_ + k) & (size_ - 1u)]);
    }
    auto* ring = reinterpret_cast<VirtqUsedElem*>(used_ + 4);
    VirtqUsedElem& e = ring[last_used_ & (size_ - 1u)];
    const std::uint32_t id = read_once(e.id);
    const std::uint32_t len = read_once(e.len);
    if (id >= size_ || extra_[id].chain_len == 0 || len > extra_[id].writable) [[unlikely]] {
      if (id < size_ && extra_[id].chain_len == 0 && stale_count_ != 0 && stale_[id]) {
        drop_stale(static_cast<std::uint16_t>(id));
        continue;
      }
      return used_entry_error(id, len);
    }
    Extra& x = extra_[id];

    // Valid: return the chain to the free list through our own links.
    std::uint16_t tail = static_cast<std::uint16_t>(id);
    for (std::uint16_t s = 1; s < x.chain_len; ++s) tail = extra_[tail].next;
    extra_[tail].next = free_head_;
    free_head_ = static_cast<std::uint16_t>(id);
    num_free_ = static_cast<std::uint16_t>(num_free_ + x.chain_len);
    x.chain_len = 0;
    step_past_used_entry();
    return std::optional<Completion>{Completion{x.token, len, false, static_cast<std::uint16_t>(id)}};
  }
}

// VIRTIO_F_IN_ORDER (2.7.9): the entry at last_used_ stands for every chain
// from the oldest in flight up to the one its id heads. Checked completely
// before anything changes; then the batch is handed out by take_oldest(), one
// chain per call, without reading the ring again.
Result<std::optional<Completion>> SplitQueue::poll_in_order() {
  if (batch_left_ > 0) return std::optional<Completion>{take_oldest()};
  const std::uint16_t used_idx = load_acquire(words(used_)[kIdx]);
  if (used_idx == last_used_) return std::optional<Completion>{};
  const auto ahead = static_cast<std::uint16_t>(used_idx - last_used_);
  // Every chain in flight was added in ring order and comes back in that
  // order, so they are the chains numbered (seq) from the oldest's on.
  const auto oldest = static_cast<std::uint16_t>((free_head_ + num_free_) & (size_ - 1u));
  const std::uint64_t chains = in_flight() == 0 ? 0 : next_seq_ - extra_[oldest].seq;
  if (ahead > chains) {
    return fail("used index " + std::to_string(used_idx) + " is " + std::to_string(ahead) +
                " entries ahead of the last seen " + std::to_string(last_used_) + " but only " +
                std::to_string(chains) + " chains are in flight")
        .error();
  }
  // The used entry must be read after the index that covers it (2.7.14).
  barrier_consume();
  auto* ring = reinterpret_cast<VirtqUsedElem*>(used_ + 4);
  VirtqUsedElem& e = ring[last_used_ & (size_ - 1u)];
  const std::uint32_t id = read_once(e.id);
  const std::uint32_t len = read_once(e.len);
  if (id >= size_) return used_entry_error(id, len);
  const Extra& x = extra_[id];
  if (x.chain_len == 0) {
    return fail("used id " + std::to_string(id) + " is not the head of an in-flight chain (in-order)")
        .error();
  }
  // The batch: the oldest chain in flight up to and including chain `id`.
  // Its entry sits where the batch's first chain's would; the used index
  // must have moved past all of it (2.7.9), what it moved beyond belongs to
  // later batches.
  const std::uint64_t batch = x.seq - extra_[oldest].seq + 1;
  if (batch > ahead) {
    return fail("used id " + std::to_string(id) + " completes an in-order batch of " + std::to_string(batch) +
                " chains (oldest in flight: head " + std::to_string(oldest) +
                ") but the used index moved by only " + std::to_string(ahead))
        .error();
  }
  if (len > x.writable) return used_entry_error(id, len);

  // Valid: consume the batch's used ring positions now, hand the chains out one by one.
  last_used_ = static_cast<std::uint16_t>(last_used_ + batch);
  batch_left_ = static_cast<std::uint16_t>(batch);
  batch_len_ = len;
  if (event_idx_ && (avail_flags_shadow_ & VIRTQ_AVAIL_F_NO_INTERRUPT) == 0) {
    // As in poll(): interrupt at the next entry, ordered before our next read.
    store_release(used_event(avail_, size_), last_used_);
    barrier_store_load();
  }
  return std::optional<Completion>{take_oldest()};
}

// Frees the oldest chain in flight (in_order, a batch pending): its
// descriptors are the ones right after the free range. Only the batch's last
// chain carries the device's length.
Completion SplitQueue::take_oldest() noexcept {
  const auto oldest = static_cast<std::uint16_t>((free_head_ + num_free_) & (size_ - 1u));
  Extra& x = extra_[oldest];
  num_free_ = static_cast<std::uint16_t>(num_free_ + x.chain_len);
  x.chain_len = 0;
  --batch_left_;
  if (batch_left_ == 0) return Completion{x.token, batch_len_, false, oldest};
  return Completion{x.token, 0, true, oldest};
}

bool SplitQueue::has_used() const noexcept {
  if (broken_) return false;
  if (batch_left_ > 0) return true;
  return load_acquire(words(used_)[kIdx]) != last_used_;
}

void SplitQueue::set_interrupts(bool enabled) noexcept {
  if (broken_) return;
  avail_flags_shadow_ = enabled
                            ? static_cast<std::uint16_t>(avail_flags_shadow_ & ~VIRTQ_AVAIL_F_NO_INTERRUPT)
                            : static_cast<std::uint16_t>(avail_flags_shadow_ | VIRTQ_AVAIL_F_NO_INTERRUPT);
  if (event_idx_) {
    // Spec 2.7.7.2: with EVENT_IDX the flags stay 0; used_event says "interrupt
    // me once the used index passes last_used". Disabling leaves it: the
    // device then interrupts at most once more (when it passes the old value).
    if (enabled) store_release(used_event(avail_, size_), last_used_);
    return;
  }
  store_release(words(avail_)[kFlags], avail_flags_shadow_);
}

bool SplitQueue::enable_interrupts_and_check() noexcept {
  if (broken_) return false;
  set_interrupts(true);
  // Our used_event / flags store must be ordered before re-reading the used
  // index (2.7.7.2): otherwise an entry written in between is neither seen
  // here nor signalled.
  barrier_store_load();
  return batch_left_ > 0 || load_acquire(words(used_)[kIdx]) != last_used_;
}

void SplitQueue::set_event_idx(bool enabled) noexcept {
  event_idx_ = enabled;
  if (broken_) return;
  // Spec 2.7.7.2: with EVENT_IDX the driver MUST keep flags at 0.
  store_release(words(avail_)[kFlags], enabled ? std::uint16_t{0} : avail_flags_shadow_);
  if (enabled && (avail_flags_shadow_ & VIRTQ_AVAIL_F_NO_INTERRUPT) == 0) {
    store_release(used_event(avail_, size_), last_used_);
  }
}

Result<void> SplitQueue::set_in_order(bool enabled) {
  if (in_flight() > 0) {
    return Error(
        Errc::busy, name_, "set in-order",
        std::to_string(in_flight()) + " descriptors are in flight; set it before use or after reset_ring()");
  }
  in_order_ = enabled;
  used_cache_ = last_used_;  // poll_in_order() keeps no cache
  // Everything is free: restart allocation at offset 0 (2.7.5) with a fresh
  // free list, which the in-order allocator does not maintain. Ids still
  // marked stale (reset_ring, adopt_stale) stay last, as a relink keeps them.
  free_head_ = detail::link_free_ids_last(extra_, size_, 0, &Extra::next, stale_);
  // In-order allocation ignores the links and must begin at offset 0 (2.7.5).
  if (enabled) free_head_ = 0;
  batch_left_ = 0;
  return ok();
}

void SplitQueue::set_indirect(bool enabled, std::size_t max_indirect) noexcept {
  indirect_ = enabled;
  max_indirect_ = max_indirect;
}

Result<void> SplitQueue::provide_indirect_pool(void* va, std::uint64_t device_addr, std::size_t bytes) {
  static_assert(sizeof(VirtqDesc) == 16);
  UV_TRY(const std::size_t entries,
         detail::check_indirect_pool(
             {name_, broken_, indirect_, max_indirect_, in_flight(), size_, va, device_addr, bytes}));
  pool_ = static_cast<std::uint8_t*>(va);
  pool_device_ = device_addr;
  slot_entries_ = entries;
  return ok();
}

std::vector<std::uint64_t> SplitQueue::outstanding_tokens() const {
  std::vector<std::pair<std::uint64_t, std::uint64_t>> live;  // (seq, token)
  for (const Extra& x : extra_) {
    if (x.chain_len != 0) live.emplace_back(x.seq, x.token);
  }
  std::sort(live.begin(), live.end());
  std::vector<std::uint64_t> tokens;
  tokens.reserve(live.size());
  for (const auto& l : live) tokens.push_back(l.second);
  return tokens;
}

Result<void> SplitQueue::reset_ring() {
  // Heads in flight now: the device was reset, but a device that still
  // completes one of them afterwards (QEMU 7.2's virtio-pmem does, for a
  // flush it was running) must not be taken for a new request with the same
  // id. Allocation restarts past the highest of them, so they come last,
  // and such a late completion is dropped once per head (not in order mode,
  // whose used entries name ring positions).
  const std::uint16_t after = detail::after_ids_in_flight(extra_, size_);
  if (!in_order_)
    for (std::uint16_t i = 0; i < size_; ++i)
      if (extra_[i].chain_len != 0 && !stale_[i]) {
        stale_[i] = true;
        ++stale_count_;
      }
  std::memset(static_cast<void*>(desc_), 0, SplitLayout::desc_bytes(size_));
  std::memset(avail_, 0, SplitLayout::avail_bytes(size_));
  std::memset(used_, 0, SplitLayout::used_bytes(size_));
  init_shadow();
  if (in_order_) return ok();  // ids follow ring positions there
  return start_ids_at(after);
}

void SplitQueue::unmark_stale(std::uint16_t head, std::uint16_t descs) noexcept {
  // Handed out again: a used entry naming one of them is this chain's now.
  // The chain's descriptors: along our free-list links, or with in_order in
  // ring order (add() does not follow the links there).
  std::uint16_t i = head;
  for (std::uint16_t k = 0; k < descs && stale_count_ != 0; ++k) {
    if (stale_[i]) {
      stale_[i] = false;
      --stale_count_;
    }
    i = in_order_ ? static_cast<std::uint16_t>((i + 1u) & (size_ - 1u)) : extra_[i].next;
  }
}

void SplitQueue::drop_stale(std::uint16_t id) noexcept {
  stale_[id] = false;
  --stale_count_;
  ++stale_dropped_;
  step_past_used_entry();
}

Result<void> SplitQueue::start_ids_at(std::uint16_t first) { return relink_ids("start ids", first, {}); }

Result<void> SplitQueue::adopt_stale(std::uint16_t first, std::span<const std::uint16_t> ids) {
  return relink_ids("adopt stale ids", first, ids);
}

Result<void> SplitQueue::relink_ids(const char* op, std::uint16_t first, std::span<const std::uint16_t> ids) {
  if (auto why = detail::relink_problem(in_flight() == 0, in_order_, size_, first, ids); !why.empty())
    return Error(Errc::invalid_argument, name_, op, why);
  // `ids` and those still marked stale (reset_ring) go last.
  for (const std::uint16_t id : ids)
    if (!stale_[id]) {
      stale_[id] = true;
      ++stale_count_;
    }
  free_head_ = detail::link_free_ids_last(extra_, size_, first, &Extra::next, stale_);
  return ok();
}

Error SplitQueue::broken_error(const char* op) const {
  return Error(Errc::broken, name_, op, "queue is broken by an earlier device error");
}

Error SplitQueue::busy_error(std::size_t needed) const {
  return Error(Errc::busy, name_, "add buffers",
               std::to_string(needed) + " descriptors needed, " + std::to_string(num_free_) + " free");
}

Error SplitQueue::used_index_error(std::uint16_t used_idx) {
  const auto ahead = static_cast<std::uint16_t>(used_idx - last_used_);
  return fail("used index " + std::to_string(used_idx) + " is " + std::to_string(ahead) +
              " entries ahead of the last seen " + std::to_string(last_used_) + " (queue size " +
              std::to_string(size_) + ")")
      .error();
}

Error SplitQueue::used_entry_error(std::uint32_t id, std::uint32_t len) {
  if (id >= size_) return fail("used id " + std::to_string(id) + " out of range").error();
  const Extra& x = extra_[id];
  if (x.chain_len == 0) return fail("used id " + std::to_string(id) + " not in flight").error();
  return fail("used len " + std::to_string(len) + " exceeds the " + std::to_string(x.writable) +
              " device-writable bytes of chain " + std::to_string(id))
      .error();
}

Result<void> SplitQueue::fail(std::string cause) {
  broken_ = true;
  return Error(Errc::bad_device_data, name_, "poll used ring", std::move(cause));
}

}  // namespace uvirtio::rings
