// Packed virtqueue, device role (virtio spec 1.2, 2.8).
//
// The mirror image of PackedQueue and the packed counterpart of
// SplitDeviceQueue: takes descriptor chains the driver made available on the
// shared descriptor ring and writes used descriptors back into the same ring.
// It serves rings that belong to someone else, so the DRIVER is the untrusted
// side: every descriptor word it wrote is read once, the chain walk is bounded
// by the ring positions we do not hold, and every buffer address goes through
// the owner's translation callback before anything is handed out. A violation
// fails with Errc::bad_device_data naming the queue ("the other side presented
// a value that fails validation"), latches the queue broken and writes
// nothing; from then on every call fails with Errc::broken and touches no ring
// memory.
//
// The queue does no syscalls. It writes used descriptors (2.8.6, 2.8.22's mirror) and the
// device event suppression area (2.8.10), reads the driver event suppression
// area, and create() leaves all memory as the driver initialised it.
// Indirect descriptors (2.8.7) are not supported: an INDIRECT flag is a
// driver error, as it would be without VIRTIO_F_INDIRECT_DESC negotiated.
//
// Threading: one thread (or the caller's lock) owns a PackedDeviceQueue.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>

#include "uvirtio/base/result.hpp"
#include "uvirtio/rings/packed.hpp"
#include "uvirtio/rings/split_device.hpp"  // Translate, Request

namespace uvirtio::rings {

class PackedDeviceQueue {
 public:
  // Same callback and chain types as the split device role. Request::head
  // holds the buffer id (the id of the chain's last descriptor, 2.8.6).
  using Translate = SplitDeviceQueue::Translate;
  using Request = SplitDeviceQueue::Request;

  // `desc_ring` (16-byte aligned), `driver_event` and `device_event` (4-byte
  // aligned) are our mappings of the three areas (PackedLayout); `size` is in
  // [1, 32768]. `name` appears in errors.
  //   auto q = PackedDeviceQueue::create(256, d, drv, dev, "peer 1 queue 0", xlate);
  static Result<PackedDeviceQueue> create(std::uint16_t size, void* desc_ring, void* driver_event,
                                          void* device_event, std::string name, Translate translate);

  PackedDeviceQueue(PackedDeviceQueue&&) noexcept = default;
  PackedDeviceQueue& operator=(PackedDeviceQueue&&) noexcept = default;

  std::uint16_t size() const noexcept { return size_; }
  const std::string& name() const noexcept { return name_; }
  bool broken() const noexcept { return broken_; }
  std::uint16_t in_flight() const noexcept { return static_cast<std::uint16_t>(held_.size()); }

  // The next available chain (2.8.1: head AVAIL bit equal to our avail wrap
  // counter, USED bit not): nullopt when there is none. Errc::bad_device_data
  // (queue broken, nothing written) when a chain descriptor after the head is
  // not available for its lap, the chain is longer than the ring positions we
  // do not hold, a readable descriptor follows a writable one, a descriptor is
  // INDIRECT, the chain exceeds 2^32 bytes, the buffer id is already in
  // flight, or an address does not translate.
  Result<std::optional<Request>> pop();

  // Returns buffer `id` (Request::head from pop()) with `written` bytes
  // written as a used descriptor at our used position, then skips the chain's
  // descriptor count (2.8.1, 2.8.6). invalid_argument (caller bug, the queue
  // stays usable) for an id not in flight or `written` beyond the chain's
  // writable bytes.
  Result<void> push(std::uint16_t id, std::uint32_t written);

  // True when the descriptor at our next position is available (no validation).
  bool has_avail() const noexcept;

  // After push(): whether the driver wants an interrupt for the used
  // descriptors written since the last call (driver event suppression flags,
  // 2.8.10; DESC mode is treated as ENABLE, a spurious interrupt being
  // harmless). False when nothing was pushed since.
  bool should_interrupt() noexcept;

  // Notification suppression for the driver's kicks: device event
  // suppression flags RING_EVENT_FLAGS_ENABLE or RING_EVENT_FLAGS_DISABLE.
  void set_notifications(bool enabled) noexcept;
  // Race-free sleep: enable notifications, full barrier, re-check; true when
  // chains arrived meanwhile (pop again instead of waiting for a kick).
  bool enable_notifications_and_check() noexcept;

 private:
  PackedDeviceQueue() = default;
  Result<void> fail(std::string cause);

  std::uint16_t size_ = 0;
  PvirtqDesc* desc_ = nullptr;
  PvirtqEventSuppress* driver_event_ = nullptr;  // written by the driver
  PvirtqEventSuppress* device_event_ = nullptr;  // written by us
  std::string name_;
  Translate translate_;
  bool broken_ = false;

  // Device-private state; never read back from driver-writable memory.
  std::uint16_t avail_pos_ = 0;   // ring position of the next chain head
  bool avail_wrap_ = true;        // Device Ring Wrap Counter for reading (2.8.1), starts at 1
  std::uint16_t used_pos_ = 0;    // ring position of the next used descriptor
  bool used_wrap_ = true;         // wrap counter written there
  std::uint32_t held_descs_ = 0;  // descriptors popped and not yet pushed
  std::uint64_t pushed_ = 0;      // used descriptors written
  std::uint64_t signalled_ = 0;   // pushed_ at the last should_interrupt()
  struct Held {
    std::uint16_t count = 0;  // descriptors in the chain
    std::uint64_t writable = 0;
  };
  std::unordered_map<std::uint16_t, Held> held_;  // by buffer id (any 16-bit value)
};

}  // namespace uvirtio::rings
