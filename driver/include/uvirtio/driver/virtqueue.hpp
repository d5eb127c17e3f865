// Virtqueue: a split or packed ring in DMA memory attached to a transport
// queue, with completion by polling or by interrupt (eventfd). The layout,
// event-index suppression and indirect tables follow the negotiated features
// (VIRTIO_F_RING_PACKED, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC) for
// either layout.
//
// The ring algorithm lives in rings/ (no syscalls); this class adds what needs
// the OS: ring memory from the transport's DMA allocator, the notify write,
// and waiting on the queue's eventfd with a deadline. Every wait re-checks
// DEVICE_NEEDS_RESET when it times out, so a dead device gives an error that
// says so instead of a bare timeout.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "uvirtio/base/deadline.hpp"
#include "uvirtio/driver/inflight_ledger.hpp"
#include "uvirtio/driver/transport.hpp"
#include "uvirtio/rings/ring.hpp"

namespace uvirtio::driver {

// polling: spin on the used ring (no interrupts). interrupt: sleep on the
// queue's eventfd. hybrid: interrupts armed, but spin for up to
// Virtqueue::spin_budget() before sleeping, which saves the wake-up latency
// when the device answers quickly.
enum class CompletionMode { polling, interrupt, hybrid };
const char* completion_mode_name(CompletionMode m);

class Virtqueue {
 public:
  // Sets up queue `index` with min(wanted_size, device max) entries.
  static Result<std::unique_ptr<Virtqueue>> create(Transport& t, std::uint16_t index,
                                                   std::uint16_t wanted_size, CompletionMode mode);

  std::uint16_t index() const { return index_; }
  std::uint16_t size() const { return ring_.size(); }
  CompletionMode mode() const { return mode_; }
  rings::Ring& ring() { return ring_; }
  bool packed() const { return ring_.packed(); }
  // The ring uses event-index suppression (VIRTIO_F_EVENT_IDX negotiated).
  bool event_idx() const { return ring_.event_idx(); }
  // Multi-buffer chains go into indirect tables (VIRTIO_F_INDIRECT_DESC
  // negotiated and the table pool set up).
  bool indirect() const { return indirect_; }
  // Descriptors per indirect table when VIRTIO_F_INDIRECT_DESC is in use.
  static constexpr std::size_t kIndirectMax = 16;

  // add() then publish and notify when the device wants it. A failed
  // notification fails the call although the chain is already published:
  // the device may still take it, so its buffers are the device's until it
  // completes or a reset drops it (holds() tells).
  Result<std::uint16_t> submit(std::span<const rings::Buffer> out, std::span<const rings::Buffer> in,
                               std::uint64_t token);
  // The request `token` is in the ring: added, not yet completed or dropped.
  // For a submit() that failed (a scan of what is in flight).
  bool holds(std::uint64_t token) const;
  Result<std::optional<rings::Completion>> poll();
  // Waits for the next completion until `timeout` passes (deadline_after).
  Result<rings::Completion> wait(std::chrono::milliseconds timeout);
  // The same with an absolute deadline; `timeout` is what the error reports.
  Result<rings::Completion> wait_until(std::chrono::steady_clock::time_point until,
                                       std::chrono::milliseconds timeout);

  // After the device was reset and its features accepted again (Device::
  // reinitialize), before DRIVER_OK: forgets everything in flight, returns
  // the ring to its initial state in the same memory and programs the queue
  // again. Returns the tokens of the requests that were in flight, in
  // submission order: the device dropped them, the caller resubmits or
  // fails each. Requests the device completed before the reset (used
  // entries not yet taken) are taken off first and are not among them.
  Result<std::vector<std::uint64_t>> restart();
  // Completions restart() found in the ring, over the queue's life.
  std::uint64_t completed_before_reset() const { return completed_before_reset_; }

  std::uint64_t notifications() const { return notifications_; }
  std::uint64_t interrupts() const { return interrupts_; }
  // Hybrid mode: how long a wait spins before it sleeps (default 2 ms).
  void set_spin_budget(std::chrono::microseconds budget) { spin_budget_ = budget; }
  std::chrono::microseconds spin_budget() const { return spin_budget_; }
  // Hybrid mode: spinning continues only while this returns true (checked
  // between spin bursts); e.g. stop spinning when other threads need the CPU.
  void set_spin_while(std::function<bool()> keep_spinning) { spin_while_ = std::move(keep_spinning); }
  std::uint64_t config_interrupts() const { return config_interrupts_; }

  // The queue's in-flight ledger (when the transport names a directory and
  // the ring is not in-order), else null; ledger_error() then says why not
  // when opening it failed (the queue works without it).
  const InflightLedger* ledger() const { return ledger_ ? &*ledger_ : nullptr; }
  const std::string& ledger_error() const { return ledger_error_; }

 private:
  // A completion taken off the ring: its id is no longer in flight.
  void completed(const rings::Completion& c) noexcept {
    if (ledger_) ledger_->clear(c.id);
  }
  // After a ring poll: a late completion the split ring dropped (an id an
  // earlier owner, or this one before a reset, left in flight) ends that id's
  // time in the ledger too; nothing else would clear it.
  void settle_ledger() noexcept {
    if (!ledger_) return;
    const rings::SplitQueue* s = ring_.split();
    if (s == nullptr || s->stale_dropped() == stale_seen_) return;
    stale_seen_ = s->stale_dropped();
    for (std::uint16_t id = 0; id < ring_.size(); ++id)
      if (ledger_->marked(id) && !s->id_outstanding(id)) ledger_->clear(id);
  }

  Virtqueue(Transport& t, std::uint16_t index, rings::Ring ring, CompletionMode mode, QueueAddresses addr)
      : t_(t), index_(index), ring_(std::move(ring)), mode_(mode), addr_(addr) {}
  // Waits up to timeout_ms for the queue's eventfd; on a signal, counts it and
  // acknowledges the interrupt. Returns whether one was taken. A missing or
  // broken eventfd is an error, unless `strict` is false (draining after a
  // completion, which must not be lost to it): then nothing is taken.
  Result<bool> take_interrupt(int timeout_ms, bool strict = true);

  Transport& t_;
  std::uint16_t index_;
  rings::Ring ring_;
  CompletionMode mode_;
  QueueAddresses addr_;  // of the ring memory, for restart()
  std::uint64_t notifications_ = 0;
  std::uint64_t interrupts_ = 0;
  std::chrono::microseconds spin_budget_{2000};
  std::function<bool()> spin_while_;
  std::uint64_t config_interrupts_ = 0;
  bool indirect_ = false;
  std::optional<InflightLedger> ledger_;
  std::string ledger_error_;
  std::uint64_t stale_seen_ = 0;  // the ring's stale_dropped() as last settled
  std::uint64_t completed_before_reset_ = 0;
};

}  // namespace uvirtio::driver
