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
// whole chain), 2.8.7 (indirect, unsupported here), 2.8.10 (event
// suppression), 2.8.13 (descriptor layout), 2.7.4.2 as kept by 2.8 (readable
// before writable), 2.8.21 (the driver publishes the head flags last).
#include "uvirtio/rings/packed_device.hpp"

#include <atomic>
#include <cstdio>
#include <utility>

#include "uvirtio/base/barrier.hpp"

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

std::string hex(std::uint64_t v) {
  char b[24];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

}  // namespace

Result<PackedDeviceQueue> PackedDeviceQueue::create(std::uint16_t size, void* desc_ring, void* driver_event,
                                                    void* device_event, std::string name,
                                                    Translate translate) {
  const char* op = "create packed device queue";
  UV_TRY_VOID(PackedLayout::check(size, desc_ring, driver_event, device_event, name, op));
  if (!translate) return Error(Errc::invalid_argument, std::move(name), op, "no translation callback");
  PackedDeviceQueue q;
  q.size_ = size;
  q.desc_ = static_cast<PvirtqDesc*>(desc_ring);
  q.driver_event_ = static_cast<PvirtqEventSuppress*>(driver_event);
  q.device_event_ = static_cast<PvirtqEventSuppress*>(device_event);
  q.name_ = std::move(name);
  q.translate_ = std::move(translate);
  q.held_.reserve(size);
  return q;
}

Result<std::optional<PackedDeviceQueue::Request>> PackedDeviceQueue::pop() {
  if (broken_) return Error(Errc::broken, name_, kPop, "queue is broken by an earlier driver error");
  // Every position holds a chain we popped: nothing can be available (a
  // driver writing there anyway is overwriting our in-flight descriptors).
  if (held_descs_ >= size_) return std::optional<Request>{};
  // Acquire pairs with the driver's release of the head flags (2.8.21.1).
  const std::uint16_t head_flags = load(desc_[avail_pos_].flags, std::memory_order_acquire);
  if (!available(head_flags, avail_wrap_)) return std::optional<Request>{};
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
  Request req;
  for (;;) {
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
    if ((flags & VIRTQ_DESC_F_INDIRECT) != 0) {
      return fail("descriptor " + std::to_string(pos) + " is indirect, which this queue does not support")
          .error();
    }
    const std::uint64_t addr = load(d.addr, std::memory_order_relaxed);
    const std::uint32_t len = load(d.len, std::memory_order_relaxed);
    const bool write = (flags & VIRTQ_DESC_F_WRITE) != 0;
    // 2.7.4.2, kept by 2.8: device-writable descriptors follow all readable ones.
    if (!write && seen_write) {
      return fail("readable descriptor " + std::to_string(pos) + " after a writable one").error();
    }
    seen_write |= write;
    if (req.readable_bytes + req.writable_bytes + len > kMaxChainBytes) {
      return fail("chain at position " + std::to_string(avail_pos_) + " is longer than 2^32 bytes").error();
    }
    std::span<std::uint8_t> s;
    if (len != 0) {
      const auto t = translate_(addr, len, write);
      if (!t || t->size() < len) {
        return fail(std::string(write ? "writable" : "readable") + " buffer of descriptor " +
                    std::to_string(pos) + " at " + hex(addr) + " (" + std::to_string(len) +
                    " bytes) is not mapped")
            .error();
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
    ++count;
    if (++pos == size_) {
      pos = 0;
      wrap = !wrap;
    }
    if ((flags & VIRTQ_DESC_F_NEXT) == 0) {
      id = load(d.id, std::memory_order_relaxed);  // 2.8.6: the last descriptor's id names the buffer
      break;
    }
  }
  if (held_.contains(id)) {
    return fail("buffer id " + std::to_string(id) + " of the chain at position " +
                std::to_string(avail_pos_) + " is already in flight")
        .error();
  }
  // Valid: commit.
  avail_pos_ = pos;
  avail_wrap_ = wrap;
  held_descs_ += count;
  held_.emplace(id, Held{static_cast<std::uint16_t>(count), req.writable_bytes});
  req.head = id;
  return std::optional<Request>{std::move(req)};
}

Result<void> PackedDeviceQueue::push(std::uint16_t id, std::uint32_t written) {
  const char* op = "push used descriptor";
  if (broken_) return Error(Errc::broken, name_, op, "queue is broken by an earlier driver error");
  const auto it = held_.find(id);
  if (it == held_.end()) {
    return Error(Errc::invalid_argument, name_, op, "buffer id " + std::to_string(id) + " is not in flight");
  }
  const Held h = it->second;
  if (written > h.writable) {
    return Error(Errc::invalid_argument, name_, op,
                 "written " + std::to_string(written) + " exceeds the " + std::to_string(h.writable) +
                     " writable bytes of buffer " + std::to_string(id));
  }
  // Our used position is the first of the positions we hold, so this never
  // overwrites a descriptor we have not popped.
  PvirtqDesc& d = desc_[used_pos_];
  store(d.id, id, std::memory_order_relaxed);
  store(d.len, written, std::memory_order_relaxed);
  // 2.8.1: a used descriptor has AVAIL and USED both equal to our used wrap
  // counter. 2.8.4: WRITE says len is meaningful (the chain had writable
  // buffers).
  auto flags = static_cast<std::uint16_t>(used_wrap_ ? (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) : 0);
  if (h.writable != 0) flags = static_cast<std::uint16_t>(flags | VIRTQ_DESC_F_WRITE);
  // id and len must be visible before the flags that mark them used (2.8.22).
  barrier_publish();
  store(d.flags, flags, std::memory_order_release);
  // 2.8.6: the used descriptor stands for the whole chain; skip its positions.
  const std::uint32_t next = std::uint32_t{used_pos_} + h.count;
  if (next >= size_) {
    used_pos_ = static_cast<std::uint16_t>(next - size_);
    used_wrap_ = !used_wrap_;
  } else {
    used_pos_ = static_cast<std::uint16_t>(next);
  }
  held_descs_ -= h.count;
  held_.erase(it);
  ++pushed_;
  return ok();
}

bool PackedDeviceQueue::has_avail() const noexcept {
  if (broken_ || held_descs_ >= size_) return false;
  return available(load(desc_[avail_pos_].flags, std::memory_order_acquire), avail_wrap_);
}

bool PackedDeviceQueue::should_interrupt() noexcept {
  if (broken_) return false;
  // Our used-flag stores must be ordered before reading the driver's event
  // suppression flags, or we could miss its switch back to ENABLE (2.8.10).
  barrier_store_load();
  const bool pushed = pushed_ != signalled_;
  signalled_ = pushed_;
  if (!pushed) return false;
  const std::uint16_t flags = load(driver_event_->flags, std::memory_order_acquire) & RING_EVENT_FLAGS_MASK;
  return flags != RING_EVENT_FLAGS_DISABLE;
}

void PackedDeviceQueue::set_notifications(bool enabled) noexcept {
  if (broken_) return;
  store(device_event_->flags, enabled ? RING_EVENT_FLAGS_ENABLE : RING_EVENT_FLAGS_DISABLE,
        std::memory_order_release);
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
