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
// Optional features: VIRTIO_F_EVENT_IDX (set_event_idx, spec 2.7.7 and
// 2.7.10), VIRTIO_F_INDIRECT_DESC (set_indirect plus a caller-provided
// pool of device-visible indirect tables, spec 2.7.5.3) and
// VIRTIO_F_IN_ORDER (set_in_order, spec 2.7.5 and 2.7.9).
//
// VIRTIO_F_IN_ORDER. Descriptors are allocated in ring order (2.7.5: from
// offset 0, wrapping at the end of the table, NEXT of descriptor x naming
// x+1, or 0 for the last one; an indirect chain takes one). The device uses
// chains in the order they were made available and may report a batch with a
// single used entry (2.7.9): written at the used ring position of the batch's
// FIRST chain, carrying the head id of its LAST chain, with the used index
// advanced by the number of chains in the batch. poll() validates that entry
// before changing anything: the id must be the head of an in-flight chain
// (so not one already completed, nor a descriptor inside a chain); the batch
// it implies, every chain from the oldest in flight up to and including that
// one, must fit in how far the used index moved (batch <= used idx -
// last seen; the rest of the advance belongs to later batches, whose entries
// are read at the positions after this batch); and its length must fit the
// last chain's writable bytes. The chains of the batch then come back one per
// poll() call, oldest first, without reading the ring again. Only the last
// one carries the device's length; for every other one the device wrote no
// length, and the Completion says so with `skipped` = true and len = 0. The
// spec lets a driver assume such buffers were used completely (2.7.9), but
// that is the device's claim, not a length it wrote: a caller that wants it
// takes its own writable byte count for the chain, knowingly. Until it is
// returned a chain counts as in flight (in_flight(), outstanding_tokens()).
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
  // The arguments every split ring's create() takes, driver or device role:
  // size a power of two in [1, 32768], pointers non-null and aligned.
  static Result<void> check(std::uint16_t size, const void* desc, const void* avail, const void* used,
                            const std::string& name, const char* op);
  // Byte offsets of the event-index words (spec 2.7.6 used_event, 2.7.8 avail_event).
  static constexpr std::size_t used_event_offset(std::uint16_t size) { return 4u + 2u * size; }
  static constexpr std::size_t avail_event_offset(std::uint16_t size) { return 4u + 8u * size; }
};

// Spec 2.7.10 (and 2.7.7): with VIRTIO_F_EVENT_IDX, the other side wants a
// notification when moving an index from `old_idx` to `new_idx` stepped past
// `event_idx`. Wrap-safe in 16-bit arithmetic, as in the spec's
// vring_need_event().
inline constexpr bool vring_need_event(std::uint16_t event_idx, std::uint16_t new_idx,
                                       std::uint16_t old_idx) noexcept {
  return static_cast<std::uint16_t>(new_idx - event_idx - 1) < static_cast<std::uint16_t>(new_idx - old_idx);
}

// One buffer of a chain, in device addresses.
struct Buffer {
  std::uint64_t addr = 0;
  std::uint32_t len = 0;
};

// A completed request as validated from the used ring.
struct Completion {
  std::uint64_t token = 0;  // what the caller passed to add()
  std::uint32_t len = 0;    // bytes the device wrote, <= the chain's writable bytes
  // VIRTIO_F_IN_ORDER only: the device completed this chain as part of a
  // batch and wrote no used entry (so no length) for it; len is 0. Spec
  // 2.7.9 / 2.8.9 say the buffer is "assumed to have been used completely":
  // trusting that is the caller's call (see SplitQueue, PackedQueue).
  bool skipped = false;
  // The chain's id: SplitQueue's head descriptor index, PackedQueue's buffer
  // id (what add() returned for it).
  std::uint16_t id = 0;
};

// The checks every ring's add() makes on a chain before touching memory: not
// empty, no zero-length buffer, device-writable bytes fit in 32 bits (the
// used length is a le32), at most 2^32 bytes in all (2.7.5.1, 2.8.6).
// Returns the device-writable byte count; errors are invalid_argument naming
// `queue` and the operation "add buffers".
Result<std::uint32_t> chain_writable_bytes(std::span<const Buffer> out, std::span<const Buffer> in,
                                           const std::string& queue);

namespace detail {
// The same checks without building a Result on the hot path: the
// device-writable byte count, or a negative ChainFault (chain_fault() turns
// it into the error chain_writable_bytes() would return).
enum ChainFault : std::int64_t {
  kChainEmpty = -1,
  kChainZeroLength = -2,
  kChainTooLong = -3,
  kChainOverFourGiB = -4
};
inline std::int64_t chain_writable(std::span<const Buffer> out, std::span<const Buffer> in) noexcept {
  if (out.empty() && in.empty()) return kChainEmpty;
  bool zero_len = false;
  std::uint64_t readable = 0;
  std::uint64_t writable = 0;
  for (const Buffer& b : out) {
    zero_len |= b.len == 0;
    readable += b.len;
  }
  for (const Buffer& b : in) {
    zero_len |= b.len == 0;
    writable += b.len;
  }
  if (zero_len) return kChainZeroLength;
  if (writable > 0xffffffffu) return kChainTooLong;
  if (readable + writable > std::uint64_t{1} << 32) return kChainOverFourGiB;
  return static_cast<std::int64_t>(writable);
}
Error chain_fault(std::int64_t fault, const std::string& queue);
// A chain that takes more ring descriptors than the queue has: it can never
// fit, so it is invalid_argument, not busy (a caller retrying on busy would
// loop forever).
Error chain_too_long(std::size_t needed, std::size_t queue_size, const std::string& queue);
}  // namespace detail

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
  // for an empty chain, a zero-length buffer, more than 2^32-1 writable bytes
  // or more than 2^32 bytes in all (chain_writable_bytes) or for a chain
  // that needs more descriptors than the queue has (it never fits), busy when
  // fewer than out.size()+in.size() descriptors are free, broken when latched.
  Result<std::uint16_t> add(std::span<const Buffer> out, std::span<const Buffer> in, std::uint64_t token);

  // Makes everything added so far visible: barrier, then avail->idx store.
  // Returns true when the device asked to be notified (VIRTQ_USED_F_NO_NOTIFY
  // clear), so the caller kicks. With event_idx on, the decision is instead
  // vring_need_event(avail_event, new idx, idx of the previous publish()).
  bool publish();

  // Takes one completion off the used ring, validated: nullopt when none is
  // pending; Errc::bad_device_data (and the queue latched broken) when the
  // device wrote an index more than `size` ahead, an id out of range or not
  // in flight, or a length larger than the chain's writable bytes. With
  // in_order on, also when the batch the id implies is larger than the used
  // index advance; the rest of a batch is returned by the next calls (see
  // the header comment). The used index is read again only when every entry
  // seen before is consumed.
  Result<std::optional<Completion>> poll();

  // True when the used ring holds entries we have not consumed, or (in_order)
  // chains of a batch are still to be returned (cheap check, no validation).
  bool has_used() const noexcept;

  // Interrupt suppression hint to the device (VIRTQ_AVAIL_F_NO_INTERRUPT).
  // With event_idx on (spec 2.7.7.2: flags stay 0), enabling writes
  // used_event = last consumed used index, and poll() keeps it moving while
  // interrupts are enabled; disabling leaves used_event alone.
  void set_interrupts(bool enabled) noexcept;

  // The race-free way to go to sleep: re-enables interrupts, then (after a
  // full barrier) re-reads the used index. Returns true when entries arrived
  // meanwhile, in which case the caller must poll() again instead of
  // waiting for an interrupt that may never come. False when broken.
  //   while (true) { drain(q); if (!q.enable_interrupts_and_check()) wait(); }
  bool enable_interrupts_and_check() noexcept;

  // VIRTIO_F_EVENT_IDX was negotiated. Set before the queue is used (or
  // right after reset_ring()).
  void set_event_idx(bool enabled) noexcept;
  bool event_idx() const noexcept { return event_idx_; }

  // VIRTIO_F_IN_ORDER was negotiated: allocate descriptors in ring order and
  // accept batched used entries (header comment). Set before the queue is
  // used or right after reset_ring(): busy while chains are in flight.
  // Switching rebuilds the (all free) descriptor allocator, from offset 0.
  Result<void> set_in_order(bool enabled);
  bool in_order() const noexcept { return in_order_; }

  // VIRTIO_F_INDIRECT_DESC was negotiated; chains of up to `max_indirect`
  // buffers go into an indirect table. Indirect tables are only used once a
  // pool is provided (provide_indirect_pool), so call this first.
  void set_indirect(bool enabled, std::size_t max_indirect) noexcept;

  // Gives the queue device-visible memory for indirect tables: `va` is our
  // mapping, `device_addr` the same memory as the device addresses it. One
  // slot of min(max_indirect, size)*16 bytes per queue entry, so `bytes` must
  // be at least size*slot. `va` 16-aligned. Fails with invalid_argument
  // (bad arguments, set_indirect not called), busy (chains in flight) or
  // broken.
  //   q.set_indirect(true, 16);
  //   UV_TRY_VOID(q.provide_indirect_pool(pool.va, pool.iova, q.size() * 16 * 16));
  Result<void> provide_indirect_pool(void* va, std::uint64_t device_addr, std::size_t bytes);

  // Tokens of the chains added and not yet completed, in submission order
  // (for recovery after a device error or reset).
  std::vector<std::uint64_t> outstanding_tokens() const;

  // Forgets everything in flight and returns the queue to its just-created
  // state: ring memory zeroed, all descriptors free, indices 0, not broken,
  // no batch pending. Keeps the event_idx / indirect / in_order settings and
  // the indirect pool. Only
  // call it when the device no longer uses the ring (after a device reset or
  // a queue reset, spec 2.6.1). Descriptor ids that were in flight are
  // handed out last, and one late completion of each (a device that still
  // finishes work from before its reset) is dropped instead of completing
  // a new request (stale_dropped()). Not in in-order mode, whose used
  // entries name ring positions.
  Result<void> reset_ring();
  // Idle queue, not in-order: descriptor ids are handed out from `first`
  // on (wrapping), e.g. a random start so a device's late completion from an
  // earlier owner of the queue cannot match this one's first request. Ids
  // marked stale (reset_ring, adopt_stale) still come after all others.
  Result<void> start_ids_at(std::uint16_t first);
  // Idle queue, not in-order: an earlier owner of the queue (another
  // process, before the device was reset) had the descriptor ids `ids` in
  // flight. Hands ids out from `first` on with those last, and drops one late
  // completion of each, as after reset_ring(). invalid_argument for a busy
  // or in-order queue, or an id or `first` not below the size.
  Result<void> adopt_stale(std::uint16_t first, std::span<const std::uint16_t> ids);
  // Used entries dropped because they completed a chain that was in flight
  // at the last reset_ring() (each such id once, until it is handed out
  // again; any other id not in flight is still an error).
  std::uint64_t stale_dropped() const noexcept { return stale_dropped_; }
  // Whether the device may still name `id` in a used entry: it heads a chain
  // in flight, or it is stale and its one late completion has not come.
  bool id_outstanding(std::uint16_t id) const noexcept {
    return id < size_ && (extra_[id].chain_len != 0 || (stale_count_ != 0 && stale_[id]));
  }

 private:
  SplitQueue() = default;
  Result<void> fail(std::string cause);
  // Errors of add() and poll(), out of line so the hot paths carry no
  // string building.
  [[gnu::cold]] Error broken_error(const char* op) const;
  [[gnu::cold]] Error busy_error(std::size_t needed) const;
  [[gnu::cold]] Error used_index_error(std::uint16_t used_idx);
  [[gnu::cold]] Error used_entry_error(std::uint32_t id, std::uint32_t len);
  void init_shadow();
  std::size_t indirect_limit() const noexcept;
  Result<std::optional<Completion>> poll_in_order();
  Completion take_oldest() noexcept;

  std::uint16_t size_ = 0;
  VirtqDesc* desc_ = nullptr;
  std::uint8_t* avail_ = nullptr;  // le16 flags, le16 idx, le16 ring[size], le16 used_event
  std::uint8_t* used_ = nullptr;   // le16 flags, le16 idx, VirtqUsedElem ring[size], le16 avail_event
  std::string name_;
  bool broken_ = false;

  // Driver-private shadow state: never read back from device-writable memory.
  // With in_order, free_head_ is the ring position of the next descriptor to
  // allocate and the free descriptors are the num_free_ positions from there
  // on, so the oldest in-flight chain's head is free_head_ + num_free_.
  std::uint16_t free_head_ = 0;
  std::uint16_t num_free_ = 0;
  std::uint16_t avail_idx_shadow_ = 0;  // next avail idx we will publish
  std::uint16_t last_used_ = 0;         // used idx consumed so far
  std::uint16_t used_cache_ = 0;        // used idx last read (checked), >= last_used_
  std::uint16_t avail_flags_shadow_ = 0;
  std::uint16_t published_idx_ = 0;  // avail idx at the last publish() (event idx "old")
  std::uint64_t next_seq_ = 0;       // submission counter for outstanding_tokens()
  bool event_idx_ = false;
  bool in_order_ = false;
  std::uint16_t batch_left_ = 0;  // in_order: chains of the last batch not yet returned
  std::uint32_t batch_len_ = 0;   // in_order: the device's len, for the batch's last chain
  bool indirect_ = false;
  std::size_t max_indirect_ = 0;
  std::uint8_t* pool_ = nullptr;  // indirect tables, slot_entries_*16 bytes per head
  std::uint64_t pool_device_ = 0;
  std::size_t slot_entries_ = 0;
  struct Extra {
    std::uint16_t next = 0;       // free-list / chain link, our copy
    std::uint16_t chain_len = 0;  // descriptors in the chain headed here (0: not a live head)
    std::uint32_t writable = 0;   // device-writable bytes of the chain
    std::uint64_t token = 0;
    std::uint64_t seq = 0;  // submission order
  };
  std::vector<Extra> extra_;
  // Heads in flight at a reset_ring() whose late completion is dropped once
  // (cold paths only: poll's error path, add() while any is marked).
  std::vector<bool> stale_;
  std::uint16_t stale_count_ = 0;
  std::uint64_t stale_dropped_ = 0;
  // Past the used entry at last_used_, asking for the next interrupt there
  // when event-index suppression is on.
  void step_past_used_entry() noexcept;
  // start_ids_at / adopt_stale: marks `ids` stale and relinks the free ids
  // from `first` on, the stale ones last.
  Result<void> relink_ids(const char* op, std::uint16_t first, std::span<const std::uint16_t> ids);
  [[gnu::cold]] void unmark_stale(std::uint16_t head, std::uint16_t descs) noexcept;
  // Consumes the used entry of a stale id (poll() then reads the next one).
  [[gnu::cold]] void drop_stale(std::uint16_t id) noexcept;
};

}  // namespace uvirtio::rings
