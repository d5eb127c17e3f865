// Packed virtqueue, driver role (virtio spec 1.2, 2.8).
//
// One descriptor ring shared in both directions plus two 4-byte event
// suppression areas, all given to the queue by its owner; like SplitQueue this
// class does no syscalls and knows nothing of PCI. The driver keeps its own
// shadow state (next available position and wrap counter, last used position
// and wrap counter, a free list of buffer ids, and per id the chain length,
// device-writable byte count and the caller's token) and never trusts what the
// device writes: every used descriptor's wrap bits, id and length are checked
// against that state, and the ring position advances by the chain length we
// recorded, never by anything the device wrote. A violation latches the queue
// broken, after which every call fails with Errc::broken and touches no memory.
//
// Threading: one thread (or the caller's lock) owns a PackedQueue.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "uvirtio/base/le.hpp"
#include "uvirtio/base/result.hpp"
#include "uvirtio/rings/split.hpp"  // Buffer, Completion, VIRTQ_DESC_F_{NEXT,WRITE,INDIRECT}

namespace uvirtio::rings {

// Device-visible layouts (spec 2.8.13 packed descriptor, 2.8.14 event
// suppression structure).
struct PvirtqDesc {
  le64 addr;
  le32 len;
  le16 id;     // buffer id
  le16 flags;  // VIRTQ_DESC_F_*
};
static_assert(sizeof(PvirtqDesc) == 16);
static_assert(offsetof(PvirtqDesc, addr) == 0 && offsetof(PvirtqDesc, len) == 8);
static_assert(offsetof(PvirtqDesc, id) == 12 && offsetof(PvirtqDesc, flags) == 14);

struct PvirtqEventSuppress {
  le16 desc;   // off_wrap: descriptor ring offset in bits 0-14, wrap counter in bit 15
  le16 flags;  // RING_EVENT_FLAGS_* in bits 0-1, the rest reserved
};
static_assert(sizeof(PvirtqEventSuppress) == 4);
static_assert(offsetof(PvirtqEventSuppress, desc) == 0 && offsetof(PvirtqEventSuppress, flags) == 2);

// Packed-only descriptor flags (spec 2.8.1): NEXT, WRITE and INDIRECT keep
// their split-ring values.
inline constexpr std::uint16_t VIRTQ_DESC_F_AVAIL = 1u << 7;
inline constexpr std::uint16_t VIRTQ_DESC_F_USED = 1u << 15;

// Event suppression flags (spec 2.8.10).
inline constexpr std::uint16_t RING_EVENT_FLAGS_ENABLE = 0;
inline constexpr std::uint16_t RING_EVENT_FLAGS_DISABLE = 1;
inline constexpr std::uint16_t RING_EVENT_FLAGS_DESC = 2;
inline constexpr std::uint16_t RING_EVENT_FLAGS_MASK = 3;

// Sizes and alignments of the three parts for a queue of `size` entries
// (spec 2.8.10.1: descriptor ring 16-aligned, both event areas 4-aligned).
struct PackedLayout {
  static constexpr std::size_t desc_align = 16;
  static constexpr std::size_t event_align = 4;
  static constexpr std::size_t desc_bytes(std::uint16_t size) { return 16u * size; }
  static constexpr std::size_t event_bytes() { return sizeof(PvirtqEventSuppress); }
  // The arguments every packed ring's create() takes, driver or device role.
  static Result<void> check(std::uint16_t size, const void* desc_ring, const void* driver_event,
                            const void* device_event, const std::string& name, const char* op);
};

class PackedQueue {
 public:
  // `desc_ring` (16-byte aligned), `driver_event` and `device_event` (4-byte
  // aligned) point at driver-mapped memory laid out as PackedLayout says;
  // `size` is any value in [1, 32768]. `name` appears in errors
  // ("0000:00:03.0 queue 0"). The queue zeroes the three areas.
  static Result<PackedQueue> create(std::uint16_t size, void* desc_ring, void* driver_event,
                                    void* device_event, std::string name);

  PackedQueue(PackedQueue&&) noexcept = default;
  PackedQueue& operator=(PackedQueue&&) noexcept = default;

  std::uint16_t size() const noexcept { return size_; }
  std::uint16_t free_count() const noexcept { return num_free_; }
  std::uint16_t in_flight() const noexcept { return static_cast<std::uint16_t>(size_ - num_free_); }
  bool broken() const noexcept { return broken_; }
  const std::string& name() const noexcept { return name_; }

  // Writes a chain of `out` (device-readable) then `in` (device-writable)
  // buffers at the next ring positions and makes it available: the head
  // descriptor's flags are stored last, so the device sees the whole chain or
  // nothing. Returns the buffer id. Fails with invalid_argument for an empty
  // chain, a zero-length buffer or more than 2^32-1 writable bytes, busy when
  // fewer than out.size()+in.size() descriptors are free, broken when latched.
  //
  //   const Buffer req[] = {{hdr_iova, 16}}, resp[] = {{data_iova, 512}};
  //   UV_TRY(auto id, q.add(req, resp, cookie));
  //   if (q.publish()) notify();
  Result<std::uint16_t> add(std::span<const Buffer> out, std::span<const Buffer> in, std::uint64_t token);

  // add() already made the chains visible; publish() orders that against
  // the read of the device event suppression area and returns true when the
  // device wants a notification (flags not RING_EVENT_FLAGS_DISABLE). DESC
  // mode is treated as ENABLE: without VIRTIO_F_EVENT_IDX the device may not
  // use it, and a spurious notification is harmless.
  bool publish();

  // Takes one completion off the ring at the driver's last-used position,
  // validated: nullopt when none is pending; Errc::bad_device_data (and the
  // queue latched broken) when the descriptor there has wrap bits the spec
  // forbids, or an id out of range or not in flight, or a length larger than
  // the chain's writable bytes.
  Result<std::optional<Completion>> poll();

  // True when the descriptor at the last-used position is marked used for
  // the current wrap counter (cheap check, no validation).
  bool has_used() const noexcept;

  // Interrupt suppression hint to the device: driver event suppression flags
  // RING_EVENT_FLAGS_ENABLE or RING_EVENT_FLAGS_DISABLE.
  void set_interrupts(bool enabled) noexcept;

  // Tokens of the requests still in flight, in the order they were added
  // (for resubmission after a device reset).
  std::vector<std::uint64_t> outstanding_tokens() const;

 private:
  PackedQueue() = default;
  Result<void> fail(std::string cause);

  std::uint16_t size_ = 0;
  PvirtqDesc* desc_ = nullptr;
  PvirtqEventSuppress* driver_event_ = nullptr;  // written by us
  PvirtqEventSuppress* device_event_ = nullptr;  // written by the device
  std::string name_;
  bool broken_ = false;

  // Driver-private shadow state: never read back from device-writable memory.
  std::uint16_t num_free_ = 0;    // free descriptors (ring positions)
  std::uint16_t next_avail_ = 0;  // ring position of the next descriptor we write
  bool avail_wrap_ = true;        // Driver Ring Wrap Counter (2.8.1), starts at 1
  std::uint16_t last_used_ = 0;   // ring position of the next used descriptor
  bool used_wrap_ = true;         // wrap counter expected there
  std::uint16_t free_id_ = 0;     // head of the free buffer id list
  std::uint64_t add_seq_ = 0;     // orders outstanding_tokens()
  std::uint16_t driver_event_flags_ = RING_EVENT_FLAGS_ENABLE;
  struct Extra {
    std::uint16_t next_free = 0;  // free id list link
    std::uint16_t chain_len = 0;  // descriptors in the chain (0: id not in flight)
    std::uint32_t writable = 0;   // device-writable bytes of the chain
    std::uint64_t token = 0;
    std::uint64_t seq = 0;
  };
  std::vector<Extra> extra_;  // indexed by buffer id
};

}  // namespace uvirtio::rings
