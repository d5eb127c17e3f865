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
// The queue does no syscalls. It writes used descriptors (2.8.6, 2.8.22's
// mirror) and the device event suppression area (2.8.10), reads the driver
// event suppression area, and create() leaves all memory as the driver
// initialised it.
//
// Optional features, as on SplitDeviceQueue: VIRTIO_F_EVENT_IDX
// (set_event_idx: interrupts follow the driver's RING_EVENT_FLAGS_DESC
// offset, and we publish our own offset to suppress kicks, 2.8.10) and
// VIRTIO_F_INDIRECT_DESC (set_indirect: a ring descriptor may name a table of
// descriptors, 2.8.7). Without the feature an INDIRECT flag is a driver error.
// The driver event suppression area is advice: an undefined value there
// (reserved flags or bits, DESC without EVENT_IDX, an offset outside the
// ring) makes should_interrupt() say yes and never breaks the queue (see
// packed_event_wanted()).
//
// VIRTIO_F_IN_ORDER (set_in_order, spec 2.8.9): chains must be pushed in the
// order they were popped (anything else is invalid_argument, a caller bug),
// and push_deferred() collects chains that publish_used() reports as ONE
// used descriptor: written at the batch's first ring position with the last
// chain's buffer id and length, after which our used position skips the
// batch's descriptors. The driver learns no length for the other chains
// (2.8.9 has it assume them fully used), so push a chain on its own when its
// length matters. The spec asks nothing of the driver's buffer ids here.
//
// Threading: one thread (or the caller's lock) owns a PackedDeviceQueue.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "uvirtio/base/result.hpp"
#include "uvirtio/rings/memory_map.hpp"
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
  // [1, 32768]. `name` appears in errors. Every buffer is translated
  // through `translate`: a MemoryMap, or a callback (BufferTranslation);
  // invalid_argument when it is neither.
  //   auto q = PackedDeviceQueue::create(256, d, drv, dev, "peer 1 queue 0", xlate);
  static Result<PackedDeviceQueue> create(std::uint16_t size, void* desc_ring, void* driver_event,
                                          void* device_event, std::string name, BufferTranslation translate);

  PackedDeviceQueue(PackedDeviceQueue&&) noexcept = default;
  PackedDeviceQueue& operator=(PackedDeviceQueue&&) noexcept = default;

  std::uint16_t size() const noexcept { return size_; }
  const std::string& name() const noexcept { return name_; }
  bool broken() const noexcept { return broken_; }
  std::uint16_t in_flight() const noexcept { return static_cast<std::uint16_t>(held_count_); }
  // Where the next used descriptor goes: its ring position and the wrap
  // counter its AVAIL and USED bits will carry (2.8.1). A device model that
  // writes a used descriptor itself (the test device's faults) reads them;
  // after such a write this queue's view of the ring is stale.
  std::uint16_t used_position() const noexcept { return used_pos_; }
  bool used_wrap_counter() const noexcept { return used_wrap_; }

  // Negotiated features; set before use.
  // VIRTIO_F_EVENT_IDX. When notifications are enabled, this also rewrites
  // our event suppression area in the matching form (DESC or ENABLE).
  void set_event_idx(bool enabled) noexcept;
  bool event_idx() const noexcept { return event_idx_; }
  // VIRTIO_F_INDIRECT_DESC: accept indirect tables of up to `max_entries`
  // descriptors (0: the queue size, the spec's limit without a device one,
  // 2.8.5).
  void set_indirect(bool enabled, std::uint32_t max_entries = 0) noexcept;
  // VIRTIO_F_IN_ORDER (header comment); busy while chains are popped and not
  // published.
  Result<void> set_in_order(bool enabled);
  bool in_order() const noexcept { return in_order_; }

  // The next available chain (2.8.1: head AVAIL bit equal to our avail wrap
  // counter, USED bit not): nullopt when there is none. Errc::bad_device_data
  // (queue broken, nothing written) when a chain descriptor after the head is
  // not available for its lap, the chain is longer than the ring positions we
  // do not hold, a readable descriptor follows a writable one, the chain
  // exceeds 2^32 bytes, the buffer id is already in flight, or an address
  // does not translate; and for INDIRECT: without set_indirect, on a
  // descriptor linked by NEXT (2.8.19), with a table length that is zero, not
  // a multiple of 16 or above the limit, a table that does not translate or
  // is not 8-byte aligned in our memory, or an entry that is itself INDIRECT.
  // In a table only WRITE counts: NEXT, the other flags and the buffer id are
  // reserved there and ignored (2.8.7), the entries are taken in order.
  Result<std::optional<Request>> pop();
  // pop() into `out`, whose vectors keep their capacity (no allocation per
  // chain once warm): true when a chain was taken.
  Result<bool> pop_into(Request& out);

  // Returns buffer `id` (Request::head from pop()) with `written` bytes
  // written as a used descriptor at our used position, then skips the chain's
  // descriptor count (2.8.1, 2.8.6). invalid_argument (caller bug, the queue
  // stays usable) for an id not in flight or `written` beyond the chain's
  // writable bytes.
  Result<void> push(std::uint16_t id, std::uint32_t written);
  // push() without handing the used descriptor to the driver yet;
  // publish_used() hands over everything deferred at once, and
  // should_interrupt() counts only what was published. Without in_order the
  // used descriptors are written here, but the flags of the batch's first
  // one are stored by publish_used(), after everything else (2.8.22): the
  // driver reads them in ring order, so it sees the whole batch at once.
  // With in_order `id` must be the oldest chain popped and not pushed, and
  // publish_used() writes one used descriptor for the batch (header comment).
  Result<void> push_deferred(std::uint16_t id, std::uint32_t written);
  void publish_used() noexcept;

  // True when the descriptor at our next position is available (no validation).
  bool has_avail() const noexcept;

  // After push(): whether the driver wants an interrupt for the used
  // descriptors written since the last call: packed_event_wanted() on the
  // driver event suppression area (ENABLE; with event_idx DESC naming one of
  // the ring positions our used descriptors covered since the last call;
  // undefined values also say yes). False when nothing was pushed since.
  bool should_interrupt() noexcept;

  // Notification suppression for the driver's kicks (device event
  // suppression area): disabling writes RING_EVENT_FLAGS_DISABLE; enabling
  // writes RING_EVENT_FLAGS_ENABLE, or with event_idx RING_EVENT_FLAGS_DESC
  // with the offset and wrap counter of the next descriptor we will pop, kept
  // there by pop() while enabled (so the driver kicks once per batch).
  void set_notifications(bool enabled) noexcept;
  // Race-free sleep: enable notifications, full barrier, re-check; true when
  // chains arrived meanwhile (pop again instead of waiting for a kick).
  bool enable_notifications_and_check() noexcept;

 private:
  PackedDeviceQueue() = default;
  Result<void> fail(std::string cause);
  Result<void> walk_indirect(std::uint16_t at, std::uint64_t addr, std::uint32_t len, bool& seen_write,
                             Request& req);
  // `entry` is the index in the indirect table of descriptor `pos`, or
  // kNoEntry for a descriptor in the ring itself.
  static constexpr std::uint32_t kNoEntry = ~std::uint32_t{0};
  static std::string where(std::uint16_t pos, std::uint32_t entry);
  Result<void> add_buffer(std::uint64_t addr, std::uint32_t len, bool write, bool& seen_write,
                          std::uint16_t pos, std::uint32_t entry, Request& req);
  void write_device_event() noexcept;

  std::uint16_t size_ = 0;
  PvirtqDesc* desc_ = nullptr;
  PvirtqEventSuppress* driver_event_ = nullptr;  // written by the driver
  PvirtqEventSuppress* device_event_ = nullptr;  // written by us
  std::string name_;
  BufferTranslation xlate_;
  bool broken_ = false;
  bool event_idx_ = false;
  bool indirect_ = false;
  std::uint32_t max_indirect_ = 0;
  bool notify_enabled_ = true;  // what set_notifications() last asked for

  // Device-private state; never read back from driver-writable memory.
  std::uint16_t avail_pos_ = 0;   // ring position of the next chain head
  bool avail_wrap_ = true;        // Device Ring Wrap Counter for reading (2.8.1), starts at 1
  std::uint16_t used_pos_ = 0;    // ring position of the next used descriptor
  bool used_wrap_ = true;         // wrap counter written there
  std::uint32_t held_descs_ = 0;  // ring positions popped and not yet pushed
  std::uint64_t moved_ = 0;  // ring positions our used descriptors covered since the last should_interrupt()
  struct Held {
    std::uint16_t count = 0;  // ring positions of the chain
    std::uint64_t writable = 0;
  };
  // By buffer id, which the driver picks from all 16-bit values: ids below
  // the queue size (what Linux and DPDK use) in a flat table, count 0 meaning
  // free; larger ones in a map.
  std::vector<Held> held_small_;
  std::unordered_map<std::uint16_t, Held> held_big_;
  std::uint32_t held_count_ = 0;
  Held* find_held(std::uint16_t id) noexcept {
    if (id < held_small_.size()) return held_small_[id].count != 0 ? &held_small_[id] : nullptr;
    const auto it = held_big_.find(id);
    return it == held_big_.end() ? nullptr : &it->second;
  }
  void add_held(std::uint16_t id, Held h);
  void erase_held(std::uint16_t id) noexcept;
  // A deferred batch without in_order: its first used descriptor's flags.
  bool pending_ = false;
  std::uint16_t pending_pos_ = 0;
  bool pending_wrap_ = true;  // our used wrap counter at pending_pos_
  std::uint16_t pending_flags_ = 0;
  std::uint64_t pending_moved_ = 0;  // ring positions of the deferred batch

  // VIRTIO_F_IN_ORDER state.
  bool in_order_ = false;
  std::vector<std::uint16_t> order_;  // ids popped, not pushed, oldest at order_first_ (ring of size_)
  std::uint16_t order_first_ = 0;
  std::uint16_t batch_count_ = 0;  // chains push_deferred() since the last publish_used()
  std::uint32_t batch_descs_ = 0;  // their ring positions
  std::uint16_t batch_id_ = 0;     // the last of them: id, length, writable
  std::uint32_t batch_len_ = 0;
  bool batch_writable_ = false;
  Result<void> check_push(std::uint16_t id, std::uint32_t written, const char* op, Held& h);
  // `defer`: store the flags only if this is not the first descriptor of a
  // deferred batch (publish_used() stores that one's).
  void write_used(std::uint16_t id, std::uint32_t written, bool writable, std::uint32_t descs,
                  bool defer = false) noexcept;
};

}  // namespace uvirtio::rings
