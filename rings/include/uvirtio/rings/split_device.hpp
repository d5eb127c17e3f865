// Split virtqueue, device role (virtio spec 1.2, 2.7).
//
// The mirror image of SplitQueue: takes descriptor chains off the available
// ring and returns them on the used ring. It is meant for serving rings that
// belong to someone else (a vhost-pci peer VM), so the DRIVER is the
// untrusted side here: every index, descriptor and address it wrote is read
// once, checked, and translated through the owner's callback before anything
// is handed out. A violation fails with Errc::bad_device_data ("the other
// side presented a value that fails validation"), latches the queue broken,
// and writes nothing; from then on every call fails with Errc::broken and
// touches no ring memory.
//
// The queue does no syscalls and never writes the descriptor table or the
// available ring; it writes only the used ring (entries, idx, flags and
// avail_event). create() leaves all memory as the driver initialised it.
//
// VIRTIO_F_IN_ORDER (set_in_order, spec 2.7.5 and 2.7.9): pop() also checks
// that the driver allocates descriptors in ring order (each head right after
// the previous chain's descriptors, from offset 0 on a fresh ring, and NEXT
// of descriptor x naming x+1, 0 after the last; an indirect chain takes one),
// chains must be pushed in the order they were popped (anything else is
// invalid_argument, a caller bug), and publish_used() reports everything
// push_deferred() since the last publish as ONE used entry: written at the
// batch's first used position, with the last chain's head and length, and
// the used index advanced by the batch's chain count. The driver learns no
// length for the other chains (2.7.9 has it assume them fully used), so push
// a chain on its own when its length matters.
//
// Threading: one thread (or the caller's lock) owns a SplitDeviceQueue.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "uvirtio/base/result.hpp"
#include "uvirtio/rings/memory_map.hpp"
#include "uvirtio/rings/split.hpp"

namespace uvirtio::rings {

class SplitDeviceQueue {
 public:
  // Maps a driver address range into our memory (BufferTranslation::Callback).
  using Translate = BufferTranslation::Callback;

  // One chain as validated and translated; spans are in our memory, readable
  // ones first, each exactly as long as its descriptor said.
  struct Request {
    std::uint16_t head = 0;
    std::vector<std::span<const std::uint8_t>> readable;
    std::vector<std::span<std::uint8_t>> writable;
    std::uint64_t readable_bytes = 0;
    std::uint64_t writable_bytes = 0;
  };

  // `desc`, `avail`, `used` are our mappings of the three areas (SplitLayout;
  // size a power of two in [1, 32768]). `name` appears in errors. Every buffer is translated
  // through `translate`: a MemoryMap, or a callback (BufferTranslation);
  // invalid_argument when it is neither.
  //   auto q = SplitDeviceQueue::create(256, d, a, u, "peer 1 queue 0", xlate);
  // `base` resumes a ring where an earlier device left it (vhost-user
  // SET_VRING_BASE, vhost-pci last_avail_idx): the next chain taken is the
  // available entry at index `base`, and used entries are written from
  // index `base` on (the earlier device completed everything before it).
  static Result<SplitDeviceQueue> create(std::uint16_t size, void* desc, void* avail, void* used,
                                         std::string name, BufferTranslation translate,
                                         std::uint16_t base = 0);

  SplitDeviceQueue(SplitDeviceQueue&&) noexcept = default;
  SplitDeviceQueue& operator=(SplitDeviceQueue&&) noexcept = default;

  std::uint16_t size() const noexcept { return size_; }
  const std::string& name() const noexcept { return name_; }
  bool broken() const noexcept { return broken_; }
  std::uint16_t in_flight() const noexcept { return in_flight_; }  // popped, not yet pushed

  // Negotiated features; set before use.
  void set_event_idx(bool enabled) noexcept { event_idx_ = enabled; }
  // VIRTIO_F_IN_ORDER (header comment). busy while chains are popped and not
  // published. On a queue that has taken nothing yet (base 0) the first head
  // must be descriptor 0; otherwise ring order is checked from the next pop on.
  Result<void> set_in_order(bool enabled);
  bool in_order() const noexcept { return in_order_; }
  // VIRTIO_F_INDIRECT_DESC: accept indirect tables of up to `max_entries`
  // descriptors (0: the queue size). Without it an INDIRECT flag is an error.
  void set_indirect(bool enabled, std::uint32_t max_entries = 0) noexcept;

  // The next available chain: nullopt when there is none. Errc::bad_device_data
  // (queue broken, nothing written) when the available index is more than
  // `size` ahead, the head is out of range or already in flight, a chain is
  // longer than the queue (loop), a next index is out of range, a readable
  // descriptor follows a writable one, the chain exceeds 2^32 bytes, an
  // indirect table is malformed or nested, or any address does not translate.
  Result<std::optional<Request>> pop();
  // pop() into `out`, whose vectors keep their capacity (no allocation per
  // chain once warm): true when a chain was taken. The available index is
  // read again only when every entry seen before is consumed.
  Result<bool> pop_into(Request& out);

  // Returns `head` (from pop()) with `written` bytes written on the used ring.
  // invalid_argument (caller bug, queue stays usable) for a head not in
  // flight or `written` beyond the chain's writable bytes.
  Result<void> push(std::uint16_t head, std::uint32_t written);
  // push() without publishing the used index; publish_used() publishes
  // every entry pushed so far at once (one store the driver sees per batch).
  // should_interrupt() and the ring's base only count published entries.
  // With in_order, `head` must be the oldest chain popped and not pushed
  // (invalid_argument otherwise), and the batch becomes a single used entry.
  Result<void> push_deferred(std::uint16_t head, std::uint32_t written);
  void publish_used() noexcept;

  // True when the available ring holds entries we have not popped.
  bool has_avail() const noexcept;

  // After push(): whether the driver wants an interrupt for the entries
  // pushed since the last call (VIRTQ_AVAIL_F_NO_INTERRUPT, or with
  // event_idx vring_need_event(used_event, ...), spec 2.7.7). False when
  // nothing was pushed since.
  bool should_interrupt() noexcept;

  // Notification suppression for the driver's kicks (spec 2.7.10):
  // VIRTQ_USED_F_NO_NOTIFY, or with event_idx avail_event = last popped
  // index when enabling (and on every push while enabled).
  void set_notifications(bool enabled) noexcept;
  // Race-free sleep: enable notifications, full barrier, re-check; true when
  // chains arrived meanwhile (pop again instead of waiting for a kick).
  bool enable_notifications_and_check() noexcept;

 private:
  SplitDeviceQueue() = default;
  Result<void> fail(std::string cause);
  Result<void> walk(std::uint16_t head, Request& req, std::uint32_t& descs);
  Result<void> walk_indirect(std::uint16_t at, std::uint64_t addr, std::uint32_t len, bool& seen_write,
                             Request& req);
  Result<void> add_buffer(std::uint64_t addr, std::uint32_t len, bool write, bool& seen_write, Request& req);

  std::uint16_t size_ = 0;
  VirtqDesc* desc_ = nullptr;
  std::uint8_t* avail_ = nullptr;
  std::uint8_t* used_ = nullptr;
  std::string name_;
  BufferTranslation xlate_;
  bool broken_ = false;
  bool event_idx_ = false;
  bool indirect_ = false;
  std::uint32_t max_indirect_ = 0;

  // Device-private state; never read back from driver-writable memory.
  std::uint16_t last_avail_ = 0;      // avail idx consumed so far
  std::uint16_t used_idx_ = 0;        // next used idx we publish
  std::uint16_t published_used_ = 0;  // used idx last stored for the driver
  std::uint16_t avail_cache_ = 0;     // avail idx last read (checked)
  std::uint16_t signalled_used_ = 0;  // used idx at the last should_interrupt()
  std::uint16_t used_flags_shadow_ = 0;
  bool notify_enabled_ = true;
  std::uint16_t in_flight_ = 0;
  struct Held {
    bool live = false;
    std::uint64_t writable = 0;
  };
  std::vector<Held> held_;  // by head

  // VIRTIO_F_IN_ORDER state.
  bool in_order_ = false;
  bool expect_known_ = false;         // expect_head_ is meaningful
  std::uint16_t expect_head_ = 0;     // where the driver's next chain must start (2.7.5)
  std::vector<std::uint16_t> order_;  // heads popped, not pushed, oldest at order_first_ (ring of size_)
  std::uint16_t order_first_ = 0;
  std::uint16_t batch_count_ = 0;  // chains push_deferred() since the last publish_used()
  std::uint16_t batch_head_ = 0;   // the last of them, and its length
  std::uint32_t batch_len_ = 0;
};

// Copies `data` into a chain's writable buffers (Request::writable) from
// byte `at` of the chain on; what does not fit is not copied.
void scatter(std::span<const std::span<std::uint8_t>> bufs, std::size_t at,
             std::span<const std::byte> data) noexcept;

}  // namespace uvirtio::rings
