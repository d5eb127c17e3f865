// Split virtqueue, device role: validated chains off the available ring,
// completions onto the used ring (virtio spec 1.2, 2.7). The driver is not
// trusted: each index and descriptor word it wrote is loaded exactly once
// (std::atomic_ref, so it cannot change between check and use), the walk is
// bounded by the queue size (or the indirect table's entry count), and every
// buffer goes through the owner's translation callback. Any violation latches
// the queue broken before anything is written.
//
// Spec sections: 2.7.5 (descriptor table), 2.7.5.3 (indirect descriptors),
// 2.7.4.2 (readable before writable), 2.7.6 and 2.7.13 (available ring),
// 2.7.8 (used ring), 2.7.7 and 2.7.10 (notification suppression), 2.7.5 and
// 2.7.9 (VIRTIO_F_IN_ORDER: ring-order descriptors, one used entry a batch).
#include "uvirtio/rings/split_device.hpp"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdio>
#include <cstring>
#include <utility>

#include "uvirtio/base/barrier.hpp"
#include "uvirtio/base/hex.hpp"

namespace uvirtio::rings {
namespace {

constexpr std::size_t kFlags = 0;
constexpr std::size_t kIdx = 1;
constexpr std::size_t kRing = 2;
constexpr const char* kPop = "pop available ring";
constexpr std::uint64_t kMaxChainBytes = std::uint64_t{1} << 32;  // 2.7.5.1
constexpr std::uint16_t kPrefetchAhead = 4;  // chains whose descriptor pop_into() prefetches ahead

le16* words(std::uint8_t* area) noexcept { return reinterpret_cast<le16*>(area); }

template <class T>
T load(Le<T>& f, std::memory_order mo) noexcept {
  return Le<T>::from_raw(std::atomic_ref<T>(f.raw()).load(mo));
}
template <class T>
void store(Le<T>& f, T v, std::memory_order mo) noexcept {
  std::atomic_ref<T>(f.raw()).store(Le<T>::to_raw(v), mo);
}

// One descriptor, each field read once.
struct Desc {
  std::uint64_t addr;
  std::uint32_t len;
  std::uint16_t flags;
  std::uint16_t next;
};
Desc read_desc(VirtqDesc& d) noexcept {
  return {load(d.addr, std::memory_order_relaxed), load(d.len, std::memory_order_relaxed),
          load(d.flags, std::memory_order_relaxed), load(d.next, std::memory_order_relaxed)};
}

bool aligned(const void* p, std::size_t a) noexcept { return reinterpret_cast<std::uintptr_t>(p) % a == 0; }

}  // namespace

Result<SplitDeviceQueue> SplitDeviceQueue::create(std::uint16_t size, void* desc, void* avail, void* used,
                                                  std::string name, BufferTranslation translate,
                                                  std::uint16_t base) {
  const char* op = "create split device queue";
  UV_TRY_VOID(SplitLayout::check(size, desc, avail, used, name, op));
  if (translate.empty())
    return Error(Errc::invalid_argument, std::move(name), op,
                 "no translation: neither a callback nor memory regions");
  SplitDeviceQueue q;
  q.size_ = size;
  q.desc_ = static_cast<VirtqDesc*>(desc);
  q.avail_ = static_cast<std::uint8_t*>(avail);
  q.used_ = static_cast<std::uint8_t*>(used);
  q.name_ = std::move(name);
  q.xlate_ = std::move(translate);
  q.held_.assign(size, Held{});
  q.max_indirect_ = size;
  q.last_avail_ = q.avail_cache_ = q.used_idx_ = q.published_used_ = q.signalled_used_ = base;
  return q;
}

void SplitDeviceQueue::set_indirect(bool enabled, std::uint32_t max_entries) noexcept {
  indirect_ = enabled;
  max_indirect_ = max_entries == 0 ? size_ : max_entries;
}

Result<std::optional<SplitDeviceQueue::Request>> SplitDeviceQueue::pop() {
  Request req;
  UV_TRY(const bool got, pop_into(req));
  if (!got) return std::optional<Request>{};
  return std::optional<Request>{std::move(req)};
}

Result<bool> SplitDeviceQueue::pop_into(Request& req) {
  if (broken_) return Error(Errc::broken, name_, kPop, "queue is broken by an earlier driver error");
  if (last_avail_ == avail_cache_) {
    // Everything seen is consumed: read the index again. Acquire pairs with
    // the driver's release of avail->idx (2.7.13.3). The driver only moves
    // it forward, so a value checked here stays valid until consumed.
    const std::uint16_t aidx = load(words(avail_)[kIdx], std::memory_order_acquire);
    if (aidx == last_avail_) return false;
    const auto ahead = static_cast<std::uint16_t>(aidx - last_avail_);
    if (ahead > size_) {
      return fail("available index " + std::to_string(aidx) + " is " + std::to_string(ahead) +
                  " entries ahead of the last seen " + std::to_string(last_avail_) + " (queue size " +
                  std::to_string(size_) + ")")
          .error();
    }
    avail_cache_ = aidx;
    // The ring entry and descriptors are read after the index that covers them.
    barrier_consume();
    // The first chains of the batch, whose descriptors the look-ahead below
    // does not cover.
    for (std::uint16_t k = 1; k < kPrefetchAhead && k < ahead; ++k) {
      const std::uint16_t h =
          load(words(avail_)[kRing + ((last_avail_ + k) & (size_ - 1u))], std::memory_order_relaxed);
      __builtin_prefetch(&desc_[h & (size_ - 1u)]);
    }
  }
  const std::uint16_t head =
      load(words(avail_)[kRing + (last_avail_ & (size_ - 1u))], std::memory_order_relaxed);
  if (head >= size_) return fail("head " + std::to_string(head) + " out of range").error();
  if (held_[head].live) return fail("head " + std::to_string(head) + " is already in flight").error();
  if (in_order_ && expect_known_ && head != expect_head_) {
    return fail("head " + std::to_string(head) + " is not descriptor " + std::to_string(expect_head_) +
                ", the next in ring order (VIRTIO_F_IN_ORDER, 2.7.5)")
        .error();
  }
  if (static_cast<std::uint16_t>(avail_cache_ - last_avail_) > kPrefetchAhead) {
    // Start a later chain's descriptor on its way while this one is walked,
    // so the misses of a batch overlap (a hint only: the index is masked,
    // and the value is read again, and checked, when that chain is popped).
    const std::uint16_t next = load(words(avail_)[kRing + ((last_avail_ + kPrefetchAhead) & (size_ - 1u))],
                                    std::memory_order_relaxed);
    __builtin_prefetch(&desc_[next & (size_ - 1u)]);
  }
  req.head = head;
  req.readable.clear();
  req.writable.clear();
  req.readable_bytes = req.writable_bytes = 0;
  // The common chain, one direct descriptor, without the general walk; any
  // other shape (or a buffer that does not translate) takes the walk, which
  // reads and checks the descriptor afresh.
  std::uint32_t descs = 1;
  const Desc d = read_desc(desc_[head]);
  std::optional<std::span<std::uint8_t>> one;
  if ((d.flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT)) == 0 && d.len != 0)
    one = xlate_(d.addr, d.len, (d.flags & VIRTQ_DESC_F_WRITE) != 0);
  if (one && one->size() >= d.len) {
    if ((d.flags & VIRTQ_DESC_F_WRITE) != 0) {
      req.writable.push_back(one->subspan(0, d.len));
      req.writable_bytes = d.len;
    } else {
      req.readable.push_back(one->subspan(0, d.len));
      req.readable_bytes = d.len;
    }
  } else if (auto r = walk(head, req, descs); !r.ok()) {
    return std::move(r).error();
  }
  ++last_avail_;
  held_[head] = Held{true, req.writable_bytes};
  if (in_order_) {
    order_[(order_first_ + in_flight_) & (size_ - 1u)] = head;
    expect_head_ = static_cast<std::uint16_t>((head + descs) & (size_ - 1u));
    expect_known_ = true;
  }
  ++in_flight_;
  return true;
}

Result<void> SplitDeviceQueue::walk(std::uint16_t head, Request& req, std::uint32_t& descs) {
  bool seen_write = false;
  std::uint16_t i = head;
  for (std::uint32_t count = 0;; ++count) {
    descs = count + 1;
    // 2.7.5.1: a chain is never longer than the queue; more means a loop.
    if (count == size_) {
      return fail("chain from head " + std::to_string(head) + " is longer than the queue size " +
                  std::to_string(size_) + " (loop)");
    }
    const Desc d = read_desc(desc_[i]);
    if ((d.flags & VIRTQ_DESC_F_INDIRECT) != 0) {
      if (!indirect_) {
        return fail("descriptor " + std::to_string(i) + " is indirect but VIRTIO_F_INDIRECT_DESC is off");
      }
      // 2.7.5.3.1: INDIRECT and NEXT are exclusive; the table ends the chain.
      // 2.7.5.3.2: the WRITE flag of this descriptor is ignored.
      if ((d.flags & VIRTQ_DESC_F_NEXT) != 0) {
        return fail("indirect descriptor " + std::to_string(i) + " also has NEXT");
      }
      return walk_indirect(i, d.addr, d.len, seen_write, req);
    }
    UV_TRY_VOID(add_buffer(d.addr, d.len, (d.flags & VIRTQ_DESC_F_WRITE) != 0, seen_write, req));
    if ((d.flags & VIRTQ_DESC_F_NEXT) == 0) return ok();
    if (d.next >= size_) {
      return fail("descriptor " + std::to_string(i) + ": next " + std::to_string(d.next) + " out of range");
    }
    if (in_order_ && d.next != ((i + 1u) & (size_ - 1u))) {
      return fail("descriptor " + std::to_string(i) + ": next " + std::to_string(d.next) +
                  " is not the next in ring order (VIRTIO_F_IN_ORDER, 2.7.5)");
    }
    i = d.next;
  }
}

Result<void> SplitDeviceQueue::walk_indirect(std::uint16_t at, std::uint64_t addr, std::uint32_t len,
                                             bool& seen_write, Request& req) {
  const std::string where = "indirect table of descriptor " + std::to_string(at);
  // 2.7.5.3: a table holds len/16 descriptors; empty or ragged is malformed.
  if (len == 0 || len % sizeof(VirtqDesc) != 0 || len / sizeof(VirtqDesc) > max_indirect_) {
    return fail(where + " has bad length " + std::to_string(len));
  }
  const auto table = xlate_(addr, len, false);
  if (!table || table->size() < len) {
    return fail(where + " at " + hex(addr) + " (" + std::to_string(len) + " bytes) is not mapped");
  }
  if (!aligned(table->data(), alignof(VirtqDesc))) {
    return fail(where + " at " + hex(addr) + " is not 8-byte aligned");
  }
  auto* entries = reinterpret_cast<VirtqDesc*>(table->data());
  const std::uint32_t n = len / static_cast<std::uint32_t>(sizeof(VirtqDesc));
  std::uint32_t j = 0;
  for (std::uint32_t count = 0;; ++count) {
    if (count == n) return fail(where + " loops");
    const Desc d = read_desc(entries[j]);
    if ((d.flags & VIRTQ_DESC_F_INDIRECT) != 0) {  // 2.7.5.3.1: one table per descriptor
      return fail(where + ": entry " + std::to_string(j) + " is itself indirect");
    }
    UV_TRY_VOID(add_buffer(d.addr, d.len, (d.flags & VIRTQ_DESC_F_WRITE) != 0, seen_write, req));
    if ((d.flags & VIRTQ_DESC_F_NEXT) == 0) return ok();
    if (d.next >= n) {
      return fail(where + ": entry " + std::to_string(j) + " next " + std::to_string(d.next) +
                  " out of range");
    }
    j = d.next;
  }
}

Result<void> SplitDeviceQueue::add_buffer(std::uint64_t addr, std::uint32_t len, bool write, bool& seen_write,
                                          Request& req) {
  // 2.7.4.2: device-writable descriptors come after all device-readable ones.
  if (!write && seen_write) return fail("readable descriptor after a writable one");
  seen_write |= write;
  // 2.7.5.1: a chain is at most 2^32 bytes in total.
  if (req.readable_bytes + req.writable_bytes + len > kMaxChainBytes) {
    return fail("chain from head " + std::to_string(req.head) + " is longer than 2^32 bytes");
  }
  std::span<std::uint8_t> s;
  if (len != 0) {
    const auto t = xlate_(addr, len, write);
    if (!t || t->size() < len) {
      return fail(std::string(write ? "writable" : "readable") + " buffer at " + hex(addr) + " (" +
                  std::to_string(len) + " bytes) is not mapped");
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

Result<void> SplitDeviceQueue::push(std::uint16_t head, std::uint32_t written) {
  UV_TRY_VOID(push_deferred(head, written));
  publish_used();
  return ok();
}

Result<void> SplitDeviceQueue::push_deferred(std::uint16_t head, std::uint32_t written) {
  const char* op = "push used ring";
  if (broken_) return Error(Errc::broken, name_, op, "queue is broken by an earlier driver error");
  if (head >= size_ || !held_[head].live) {
    return Error(Errc::invalid_argument, name_, op, "head " + std::to_string(head) + " is not in flight");
  }
  if (written > held_[head].writable) {
    return Error(Errc::invalid_argument, name_, op,
                 "written " + std::to_string(written) + " exceeds the " +
                     std::to_string(held_[head].writable) + " writable bytes of chain " +
                     std::to_string(head));
  }
  if (in_order_) {
    // 2.7.9: chains are used in the order they were made available; the
    // entry is written by publish_used(), one for the whole batch.
    const std::uint16_t oldest = order_[order_first_];
    if (head != oldest) {
      return Error(Errc::invalid_argument, name_, op,
                   "head " + std::to_string(head) + " is not the oldest chain in flight (" +
                       std::to_string(oldest) + "): VIRTIO_F_IN_ORDER completes chains in ring order");
    }
    order_first_ = static_cast<std::uint16_t>((order_first_ + 1u) & (size_ - 1u));
    ++batch_count_;
    batch_head_ = head;
    batch_len_ = written;
    held_[head].live = false;
    --in_flight_;
    return ok();
  }
  auto* ring = reinterpret_cast<VirtqUsedElem*>(used_ + 4);
  VirtqUsedElem& e = ring[used_idx_ & (size_ - 1u)];
  store(e.id, std::uint32_t{head}, std::memory_order_relaxed);
  store(e.len, written, std::memory_order_relaxed);
  ++used_idx_;
  held_[head].live = false;
  --in_flight_;
  return ok();
}

void SplitDeviceQueue::publish_used() noexcept {
  if (broken_) return;
  if (batch_count_ > 0) {
    // 2.7.9: one entry, at the position of the batch's first chain, naming
    // its last chain; the index skips forward by the batch.
    auto* ring = reinterpret_cast<VirtqUsedElem*>(used_ + 4);
    VirtqUsedElem& e = ring[used_idx_ & (size_ - 1u)];
    store(e.id, std::uint32_t{batch_head_}, std::memory_order_relaxed);
    store(e.len, batch_len_, std::memory_order_relaxed);
    used_idx_ = static_cast<std::uint16_t>(used_idx_ + batch_count_);
    batch_count_ = 0;
  }
  if (used_idx_ == published_used_) return;
  // 2.7.8.2: the entries (id and len) must be visible before the index covering them.
  barrier_publish();
  store(words(used_)[kIdx], used_idx_, std::memory_order_release);
  published_used_ = used_idx_;
  if (event_idx_ && notify_enabled_) {
    // 2.7.10: "kick me when you make entry last_avail available".
    store(*reinterpret_cast<le16*>(used_ + SplitLayout::avail_event_offset(size_)), last_avail_,
          std::memory_order_release);
  }
}

Result<void> SplitDeviceQueue::set_in_order(bool enabled) {
  if (in_flight_ > 0 || batch_count_ > 0) {
    return Error(Errc::busy, name_, "set in-order", "chains are popped and not published; set it before use");
  }
  in_order_ = enabled;
  order_.assign(enabled ? size_ : 0, 0);
  order_first_ = 0;
  // A fresh ring starts at descriptor 0 (2.7.5); after a resume at a base we
  // cannot know where the driver's allocation stands until its next chain.
  expect_known_ = last_avail_ == 0 && used_idx_ == 0;
  expect_head_ = 0;
  return ok();
}

bool SplitDeviceQueue::has_avail() const noexcept {
  if (broken_) return false;
  return load(words(avail_)[kIdx], std::memory_order_acquire) != last_avail_;
}

bool SplitDeviceQueue::should_interrupt() noexcept {
  if (broken_ || published_used_ == signalled_used_) return false;  // nothing new: no fence needed
  // Our used idx store must be ordered before reading used_event / flags
  // (2.7.7): otherwise the driver may re-arm having seen the old index while
  // we read its stale "no interrupt".
  barrier_store_load();
  const std::uint16_t old_idx = signalled_used_;
  signalled_used_ = published_used_;
  if (published_used_ == old_idx) return false;
  if (event_idx_) {
    const auto ue = load(*reinterpret_cast<le16*>(avail_ + SplitLayout::used_event_offset(size_)),
                         std::memory_order_acquire);
    return vring_need_event(ue, published_used_, old_idx);
  }
  return (load(words(avail_)[kFlags], std::memory_order_acquire) & VIRTQ_AVAIL_F_NO_INTERRUPT) == 0;
}

void SplitDeviceQueue::set_notifications(bool enabled) noexcept {
  if (broken_) return;
  notify_enabled_ = enabled;
  if (event_idx_) {
    // 2.7.10.1: with EVENT_IDX the device keeps flags 0 and uses avail_event;
    // disabling leaves avail_event where it is.
    if (enabled) {
      store(*reinterpret_cast<le16*>(used_ + SplitLayout::avail_event_offset(size_)), last_avail_,
            std::memory_order_release);
    }
    return;
  }
  used_flags_shadow_ = enabled ? static_cast<std::uint16_t>(used_flags_shadow_ & ~VIRTQ_USED_F_NO_NOTIFY)
                               : static_cast<std::uint16_t>(used_flags_shadow_ | VIRTQ_USED_F_NO_NOTIFY);
  store(words(used_)[kFlags], used_flags_shadow_, std::memory_order_release);
}

bool SplitDeviceQueue::enable_notifications_and_check() noexcept {
  if (broken_) return false;
  set_notifications(true);
  // The flag / avail_event store before re-reading avail idx (2.7.10).
  barrier_store_load();
  return has_avail();
}

Result<void> SplitDeviceQueue::fail(std::string cause) {
  broken_ = true;
  return Error(Errc::bad_device_data, name_, kPop, std::move(cause));
}

void scatter(std::span<const std::span<std::uint8_t>> bufs, std::size_t at,
             std::span<const std::byte> data) noexcept {
  for (auto b : bufs) {
    if (data.empty()) return;
    if (at >= b.size()) {
      at -= b.size();
      continue;
    }
    const std::size_t n = std::min(b.size() - at, data.size());
    std::memcpy(b.data() + at, data.data(), n);
    data = data.subspan(n);
    at = 0;
  }
}

}  // namespace uvirtio::rings
