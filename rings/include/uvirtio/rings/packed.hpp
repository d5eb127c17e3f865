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
// Optional features, as on SplitQueue: VIRTIO_F_EVENT_IDX (set_event_idx:
// RING_EVENT_FLAGS_DESC with a descriptor offset and wrap counter in both
// event suppression areas, spec 2.8.10 and 2.8.14) and VIRTIO_F_INDIRECT_DESC
// (set_indirect plus a caller-provided pool of device-visible indirect tables,
// spec 2.8.7), and VIRTIO_F_IN_ORDER (set_in_order, spec 2.8.9).
//
// VIRTIO_F_IN_ORDER. Chains take consecutive ring positions anyway (2.8.6);
// with in_order on, a chain's buffer id is the ring position of its first
// descriptor, so the ids in flight follow the ring and the oldest chain's id
// is always our last-used position. The device uses chains in the order they
// were made available and may report a batch with a single used descriptor
// (2.8.9): written at the batch's first position, carrying the buffer id of
// its LAST chain; it then skips forward by the batch's descriptors. poll()
// validates that descriptor (wrap bits as always; the id must be the buffer
// id of a chain in flight, so not one already completed nor a position inside
// a chain; the length must fit that chain's writable bytes) before changing
// anything, then skips the ring positions of every chain from the oldest in
// flight up to that one, counted from our own chain lengths, and hands those
// chains out one per poll() call, oldest first, without reading the ring
// again. Only the last one carries the device's length; the others come with
// Completion::skipped = true and len = 0: the device wrote no length for them
// (2.8.9 lets a driver assume they were used completely; a caller that
// wants that takes its own writable byte count, knowingly). Until returned, a
// chain counts as in flight (in_flight(), outstanding_tokens()).
//
// The device's event suppression area is advice, not ring state: a value the
// spec does not define there (flags 3 or reserved bits set, DESC without
// EVENT_IDX, an offset outside the ring) makes publish() ask for a
// notification. That errs on the harmless side (a spurious kick) instead of
// stalling the queue, and matches SplitQueue, for which every avail_event
// value is legal; such values never latch the queue broken.
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
// The desc word of the event suppression structure (2.8.14): descriptor ring
// offset in bits 0-14, wrap counter in bit 15.
inline constexpr std::uint16_t RING_EVENT_OFF_MASK = 0x7fff;
inline constexpr std::uint16_t RING_EVENT_WRAP = 0x8000;

// Ring position `pos` (< size) moved on by `n` (<= size) positions, wrapping
// at the ring end. Packed queue sizes need not be powers of two, so a `%`
// here is a division on every request: with it the in-order rings bench ran
// ~20% slower.
inline constexpr std::uint16_t ring_advance(std::uint32_t pos, std::uint32_t n, std::uint16_t size) noexcept {
  const std::uint32_t next = pos + n;
  return static_cast<std::uint16_t>(next >= size ? next - size : next);
}

inline constexpr std::uint16_t packed_off_wrap(std::uint16_t pos, bool wrap) noexcept {
  return static_cast<std::uint16_t>(pos | (wrap ? RING_EVENT_WRAP : 0));
}

// The packed counterpart of vring_need_event (spec 2.8.10 with
// VIRTIO_F_EVENT_IDX; Linux's virtqueue_kick_prepare_packed decides the
// same): one side has just written `moved` consecutive ring positions that end
// right before `pos`, where `wrap` is its wrap counter at `pos` (so the
// positions just behind a wrap belong to the lap with the other counter).
// True when the descriptor the other side named in `off_wrap` is one of them.
// An offset outside the ring cannot be honoured, and `moved` >= size covers
// the whole ring so the wrap bit no longer tells the laps apart: both give
// true, as an extra notification is harmless and a missing one stalls.
inline constexpr bool packed_need_event(std::uint16_t off_wrap, std::uint16_t size, std::uint16_t pos,
                                        bool wrap, std::uint32_t moved) noexcept {
  const std::uint16_t off = off_wrap & RING_EVENT_OFF_MASK;
  if (off >= size || moved >= size) return true;
  // How far back from `pos` the event descriptor lies: 1 is the position just
  // written. Same wrap counter: in the current lap, so behind `pos` only when
  // off < pos. Other counter: in the previous lap.
  const bool same_lap = ((off_wrap & RING_EVENT_WRAP) != 0) == wrap;
  const std::int32_t back = std::int32_t{pos} - off + (same_lap ? 0 : std::int32_t{size});
  return back >= 1 && back <= static_cast<std::int32_t>(moved);
}

// Whether the other side wants a notification, from one snapshot of its event
// suppression area (`flags`, `off_wrap`) after we wrote `moved` positions up
// to `pos`/`wrap`. ENABLE: yes; DISABLE: no; DESC: packed_need_event when
// VIRTIO_F_EVENT_IDX is in use. DESC without EVENT_IDX (2.8.10: "only valid
// if negotiated"), the reserved value 3 and any reserved bit set are values
// the spec does not define: notify, the safe answer.
inline constexpr bool packed_event_wanted(std::uint16_t flags, std::uint16_t off_wrap, bool event_idx,
                                          std::uint16_t size, std::uint16_t pos, bool wrap,
                                          std::uint32_t moved) noexcept {
  if (flags == RING_EVENT_FLAGS_DISABLE) return false;
  if (flags == RING_EVENT_FLAGS_DESC && event_idx) return packed_need_event(off_wrap, size, pos, wrap, moved);
  return true;
}

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
  // nothing. With indirect tables in use (set_indirect, provide_indirect_pool)
  // a chain of 2..max_indirect buffers goes into the buffer id's table and
  // takes one ring position (2.8.7), also when fewer positions are free.
  // Returns the buffer id. Fails with invalid_argument for an empty chain, a
  // zero-length buffer, more than 2^32-1 writable bytes or more than 2^32
  // bytes in all or a chain needing more ring positions than the queue has
  // (it never fits), busy when too few ring positions are free, broken when
  // latched.
  //
  //   const Buffer req[] = {{hdr_iova, 16}}, resp[] = {{data_iova, 512}};
  //   UV_TRY(auto id, q.add(req, resp, cookie));
  //   if (q.publish()) notify();
  Result<std::uint16_t> add(std::span<const Buffer> out, std::span<const Buffer> in, std::uint64_t token);

  // add() already made the chains visible; publish() orders that against the
  // read of the device event suppression area and returns true when the
  // device wants a notification for the positions made available since the
  // previous publish(): packed_event_wanted() (ENABLE, or with event_idx on
  // DESC naming one of those positions; anything undefined also notifies).
  bool publish();

  // Takes one completion off the ring at the driver's last-used position,
  // validated: nullopt when none is pending; Errc::bad_device_data (and the
  // queue latched broken) when the descriptor there has wrap bits the spec
  // forbids, or an id out of range or not in flight, or a length larger than
  // the chain's writable bytes. With event_idx and interrupts on, moves the
  // driver event offset to the next used position (as SplitQueue moves
  // used_event). With in_order on, the rest of a batch is returned by the
  // next calls (header comment).
  Result<std::optional<Completion>> poll();

  // True when the descriptor at the last-used position is marked used for
  // the current wrap counter, or (in_order) chains of a batch are still to
  // be returned (cheap check, no validation).
  bool has_used() const noexcept;

  // Interrupt suppression hint to the device (driver event suppression area).
  // Disabling writes RING_EVENT_FLAGS_DISABLE (valid with or without
  // EVENT_IDX). Enabling writes RING_EVENT_FLAGS_ENABLE, or with event_idx on
  // RING_EVENT_FLAGS_DESC with the offset and wrap counter of the next used
  // descriptor we wait for (stored before the flags), so the device
  // interrupts once per batch instead of once per buffer.
  void set_interrupts(bool enabled) noexcept;

  // The race-free way to go to sleep: re-enables interrupts, then (after a
  // full barrier) re-checks the last-used position. True when a used
  // descriptor arrived meanwhile: poll() again instead of waiting for an
  // interrupt that may never come. False when broken.
  bool enable_interrupts_and_check() noexcept;

  // VIRTIO_F_EVENT_IDX was negotiated. Set before the queue is used; rewrites
  // the driver event area for the current interrupt setting.
  void set_event_idx(bool enabled) noexcept;
  bool event_idx() const noexcept { return event_idx_; }

  // VIRTIO_F_IN_ORDER was negotiated: buffer ids follow the ring and batched
  // used descriptors are accepted (header comment). Set before the queue is
  // used: busy while chains are in flight.
  Result<void> set_in_order(bool enabled);
  bool in_order() const noexcept { return in_order_; }

  // VIRTIO_F_INDIRECT_DESC was negotiated; chains of 2..`max_indirect`
  // buffers go into an indirect table once a pool is provided
  // (provide_indirect_pool), so call this first.
  void set_indirect(bool enabled, std::size_t max_indirect) noexcept;
  // Chains can go indirect now (set_indirect on and a pool provided).
  bool indirect() const noexcept { return indirect_limit() >= 2; }

  // Gives the queue device-visible memory for indirect tables: `va` is our
  // mapping, `device_addr` the same memory as the device addresses it. One
  // table of min(max_indirect, size) descriptors (16 bytes each) per buffer
  // id, so `bytes` must be at least size * that * 16; `va` 16-aligned. Fails
  // with invalid_argument (bad arguments, set_indirect not called), busy
  // (chains in flight) or broken.
  //   q.set_indirect(true, 16);
  //   UV_TRY_VOID(q.provide_indirect_pool(pool.va, pool.iova, q.size() * 16 * 16));
  Result<void> provide_indirect_pool(void* va, std::uint64_t device_addr, std::size_t bytes);

  // Tokens of the requests still in flight, in the order they were added
  // (for resubmission after a device reset).
  std::vector<std::uint64_t> outstanding_tokens() const;

  // Forgets everything in flight and returns the queue to its just-created
  // state: ring and event areas zeroed, all descriptors and ids free, both
  // wrap counters 1, not broken. Keeps the event_idx / indirect / in_order
  // settings, the indirect pool and the interrupt setting. Only call it
  // when the device no longer uses the ring (after a device or queue reset).
  // Buffer ids that were in flight are handed out last (see SplitQueue).
  Result<void> reset_ring();
  // Idle queue, not in-order: buffer ids are handed out from `first` on,
  // except that ids held back by reset_ring() or adopt_stale() and not yet
  // handed out again still come last.
  Result<void> start_ids_at(std::uint16_t first);
  // Idle queue, not in-order: an earlier owner of the queue had the buffer
  // ids `ids` in flight when the device was reset. Hands ids out from
  // `first` on with those last. A late completion naming one of them still
  // breaks the ring (it sits at a ring position the device will also use
  // for our next chain, so it cannot be skipped), but it is never taken for
  // a new request. invalid_argument as SplitQueue::adopt_stale().
  Result<void> adopt_stale(std::uint16_t first, std::span<const std::uint16_t> ids);

  // One read of the flags word the device last wrote in its event
  // suppression area (diagnostics and conformance checks: whether the device
  // really asks for RING_EVENT_FLAGS_DESC). Unvalidated; 0 when broken.
  std::uint16_t device_event_flags() const noexcept;

 private:
  PackedQueue() = default;
  // Zeroes the ring and event areas and sets every shadow field to its
  // just-created value (settings such as event_idx are kept).
  void init_state();
  Result<void> fail(std::string cause);
  // Marks `id` (< size) held back, once.
  void hold_back(std::uint16_t id) noexcept;
  // Errc::broken, or Errc::stale_completion when a held-back id broke the ring.
  Error broken_error(const char* op) const;
  std::size_t indirect_limit() const noexcept;
  void write_driver_event() noexcept;
  Completion take_oldest() noexcept;
  // start_ids_at / adopt_stale: relinks the free ids from `first` on, `ids` last.
  Result<void> relink_ids(const char* op, std::uint16_t first, std::span<const std::uint16_t> ids);

  std::uint16_t size_ = 0;
  PvirtqDesc* desc_ = nullptr;
  PvirtqEventSuppress* driver_event_ = nullptr;  // written by us
  PvirtqEventSuppress* device_event_ = nullptr;  // written by the device
  std::string name_;
  bool broken_ = false;
  bool stale_broken_ = false;  // broken by a held-back id's late completion

  // Driver-private shadow state: never read back from device-writable memory.
  std::uint16_t num_free_ = 0;    // free descriptors (ring positions)
  std::uint16_t next_avail_ = 0;  // ring position of the next descriptor we write
  bool avail_wrap_ = true;        // Driver Ring Wrap Counter (2.8.1), starts at 1
  std::uint16_t last_used_ = 0;   // ring position of the next used descriptor
  bool used_wrap_ = true;         // wrap counter expected there
  std::uint16_t free_id_ = 0;     // head of the free buffer id list
  std::uint64_t add_seq_ = 0;     // orders outstanding_tokens()
  std::uint32_t moved_ = 0;       // ring positions made available since the last publish()
  bool interrupts_ = true;        // what set_interrupts() last asked for
  bool event_idx_ = false;
  bool in_order_ = false;
  std::uint16_t batch_left_ = 0;  // in_order: chains of the last batch not yet returned
  std::uint16_t batch_pos_ = 0;   // in_order: id (= first position) of the next of them
  std::uint32_t batch_len_ = 0;   // in_order: the device's len, for the batch's last chain
  bool indirect_ = false;
  std::size_t max_indirect_ = 0;
  std::uint8_t* pool_ = nullptr;  // indirect tables, slot_entries_ * 16 bytes per buffer id
  std::uint64_t pool_device_ = 0;
  std::size_t slot_entries_ = 0;
  struct Extra {
    std::uint16_t next_free = 0;  // free id list link
    std::uint16_t chain_len = 0;  // ring positions of the chain (0: id not in flight)
    std::uint32_t writable = 0;   // device-writable bytes of the chain
    std::uint64_t token = 0;
    std::uint64_t seq = 0;
  };
  std::vector<Extra> extra_;  // indexed by buffer id
  // Ids a reset or an earlier owner left in flight, until handed out again:
  // every relink of the free list puts them last, so a late completion
  // naming one finds it not in flight. Survives reset_ring().
  std::vector<bool> held_back_;
  std::uint16_t held_count_ = 0;
};

}  // namespace uvirtio::rings
