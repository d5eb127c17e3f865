// Split virtqueue, driver role (virtio spec 1.2, 2.7).
//
// The ring memory (descriptor table, available ring, used ring) is given to
// the queue by its owner; this class does no syscalls and knows nothing of
// PCI. The driver keeps its own shadow state (free list, per-head chain
// length, device-writable byte count, the caller's token, last seen used
// index) and never trusts what the device writes: every used id and length is
// checked against that state, and a violation latches the queue broken, after
// which every call fails with Errc::broken and touches no memory.
//
// Threading: one thread (or the caller's lock) owns a SplitQueue.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "uvirtio/base/le.hpp"
#include "uvirtio/base/result.hpp"

namespace uvirtio::rings {

// Device-visible layouts (spec 2.7.5, 2.7.6, 2.7.8).
struct VirtqDesc {
  le64 addr;
  le32 len;
  le16 flags;
  le16 next;
};
static_assert(sizeof(VirtqDesc) == 16);

inline constexpr std::uint16_t VIRTQ_DESC_F_NEXT = 1;
inline constexpr std::uint16_t VIRTQ_DESC_F_WRITE = 2;
inline constexpr std::uint16_t VIRTQ_DESC_F_INDIRECT = 4;
inline constexpr std::uint16_t VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
inline constexpr std::uint16_t VIRTQ_USED_F_NO_NOTIFY = 1;

struct VirtqUsedElem {
  le32 id;
  le32 len;
};
static_assert(sizeof(VirtqUsedElem) == 8);

// Sizes and alignments of the three parts for a queue of `size` entries
// (spec 2.7: descriptor table 16-aligned, available ring 2, used ring 4).
// With event_idx the rings carry the extra used_event / avail_event field;
// the bytes are reserved either way so a queue can switch.
struct SplitLayout {
  static constexpr std::size_t desc_align = 16;
  static constexpr std::size_t avail_align = 2;
  static constexpr std::size_t used_align = 4;
  static constexpr std::size_t desc_bytes(std::uint16_t size) { return 16u * size; }
  static constexpr std::size_t avail_bytes(std::uint16_t size) { return 6u + 2u * size; }
  static constexpr std::size_t used_bytes(std::uint16_t size) { return 6u + 8u * size; }
};

// One buffer of a chain, in device addresses.
struct Buffer {
  std::uint64_t addr = 0;
  std::uint32_t len = 0;
};

// A completed request as validated from the used ring.
struct Completion {
  std::uint64_t token = 0;  // what the caller passed to add()
  std::uint32_t len = 0;    // bytes the device wrote, <= the chain's writable bytes
};

class SplitQueue {
 public:
  // `desc`, `avail`, `used` point at driver-mapped ring memory laid out as
  // SplitLayout says; `size` is a power of two in [1, 32768]. `name` appears
  // in errors ("0000:00:03.0 queue 0"). The queue zeroes the ring memory.
  static Result<SplitQueue> create(std::uint16_t size, void* desc, void* avail, void* used, std::string name);

  SplitQueue(SplitQueue&&) noexcept = default;
  SplitQueue& operator=(SplitQueue&&) noexcept = default;

  std::uint16_t size() const noexcept { return size_; }
  std::uint16_t free_count() const noexcept { return num_free_; }
  std::uint16_t in_flight() const noexcept { return static_cast<std::uint16_t>(size_ - num_free_); }
  bool broken() const noexcept { return broken_; }
  const std::string& name() const noexcept { return name_; }

  // Writes a chain of `out` (device-readable) then `in` (device-writable)
  // buffers and places its head in the available ring, without making it
  // visible to the device yet (see publish()). Fails with invalid_argument
  // for an empty chain or a zero-length buffer, busy when fewer than
  // out.size()+in.size() descriptors are free, broken when latched.
  Result<std::uint16_t> add(std::span<const Buffer> out, std::span<const Buffer> in, std::uint64_t token);

  // Makes everything added so far visible: barrier, then avail->idx store.
  // Returns true when the device asked to be notified (VIRTQ_USED_F_NO_NOTIFY
  // clear), so the caller kicks.
  bool publish();

  // Takes one completion off the used ring, validated: nullopt when none is
  // pending; Errc::bad_device_data (and the queue latched broken) when the
  // device wrote an index more than `size` ahead, an id out of range or not
  // in flight, or a length larger than the chain's writable bytes.
  Result<std::optional<Completion>> poll();

  // True when the used ring holds entries we have not consumed (cheap check,
  // no validation).
  bool has_used() const noexcept;

  // Interrupt suppression hint to the device (VIRTQ_AVAIL_F_NO_INTERRUPT).
  void set_interrupts(bool enabled) noexcept;

 private:
  SplitQueue() = default;
  Result<void> fail(std::string cause);

  std::uint16_t size_ = 0;
  VirtqDesc* desc_ = nullptr;
  std::uint8_t* avail_ = nullptr;  // le16 flags, le16 idx, le16 ring[size], le16 used_event
  std::uint8_t* used_ = nullptr;   // le16 flags, le16 idx, VirtqUsedElem ring[size], le16 avail_event
  std::string name_;
  bool broken_ = false;

  // Driver-private shadow state: never read back from device-writable memory.
  std::uint16_t free_head_ = 0;
  std::uint16_t num_free_ = 0;
  std::uint16_t avail_idx_shadow_ = 0;  // next avail idx we will publish
  std::uint16_t last_used_ = 0;         // used idx consumed so far
  std::uint16_t avail_flags_shadow_ = 0;
  struct Extra {
    std::uint16_t next = 0;       // free-list / chain link, our copy
    std::uint16_t chain_len = 0;  // descriptors in the chain headed here (0: not a live head)
    std::uint32_t writable = 0;   // device-writable bytes of the chain
    std::uint64_t token = 0;
  };
  std::vector<Extra> extra_;
};

}  // namespace uvirtio::rings
