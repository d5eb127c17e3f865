// Ring: a split or a packed virtqueue behind one interface (driver role).
//
// Virtqueue (driver/) picks the layout from the negotiated features
// (VIRTIO_F_RING_PACKED) and talks to the ring only through this class, so a
// device driver never cares which layout is in use.
#pragma once

#include <variant>

#include "uvirtio/rings/packed.hpp"
#include "uvirtio/rings/split.hpp"

namespace uvirtio::rings {

class Ring {
 public:
  Ring(SplitQueue q) : q_(std::move(q)) {}   // NOLINT: implicit by design
  Ring(PackedQueue q) : q_(std::move(q)) {}  // NOLINT

  bool packed() const noexcept { return std::holds_alternative<PackedQueue>(q_); }
  SplitQueue* split() noexcept { return std::get_if<SplitQueue>(&q_); }
  PackedQueue* packed_queue() noexcept { return std::get_if<PackedQueue>(&q_); }

  Result<std::uint16_t> add(std::span<const Buffer> out, std::span<const Buffer> in, std::uint64_t token) {
    return std::visit([&](auto& q) { return q.add(out, in, token); }, q_);
  }
  bool publish() {
    return std::visit([](auto& q) { return q.publish(); }, q_);
  }
  Result<std::optional<Completion>> poll() {
    return std::visit([](auto& q) { return q.poll(); }, q_);
  }
  bool has_used() const noexcept {
    return std::visit([](const auto& q) { return q.has_used(); }, q_);
  }
  void set_interrupts(bool enabled) noexcept {
    std::visit([&](auto& q) { q.set_interrupts(enabled); }, q_);
  }
  bool enable_interrupts_and_check() noexcept {
    return std::visit([](auto& q) { return q.enable_interrupts_and_check(); }, q_);
  }
  bool event_idx() const noexcept {
    return std::visit([](const auto& q) { return q.event_idx(); }, q_);
  }
  // VIRTIO_F_IN_ORDER (spec 2.7.9, 2.8.9); set before use, busy otherwise.
  Result<void> set_in_order(bool enabled) {
    return std::visit([&](auto& q) { return q.set_in_order(enabled); }, q_);
  }
  bool in_order() const noexcept {
    return std::visit([](const auto& q) { return q.in_order(); }, q_);
  }
  std::uint16_t size() const noexcept {
    return std::visit([](const auto& q) { return q.size(); }, q_);
  }
  std::uint16_t in_flight() const noexcept {
    return std::visit([](const auto& q) { return q.in_flight(); }, q_);
  }
  std::uint16_t free_count() const noexcept {
    return std::visit([](const auto& q) { return q.free_count(); }, q_);
  }
  bool broken() const noexcept {
    return std::visit([](const auto& q) { return q.broken(); }, q_);
  }
  std::vector<std::uint64_t> outstanding_tokens() const {
    return std::visit([](const auto& q) { return q.outstanding_tokens(); }, q_);
  }
  Result<void> start_ids_at(std::uint16_t first) {
    return std::visit([first](auto& q) { return q.start_ids_at(first); }, q_);
  }
  // Ids an earlier owner left in flight: see SplitQueue/PackedQueue::adopt_stale().
  Result<void> adopt_stale(std::uint16_t first, std::span<const std::uint16_t> ids) {
    return std::visit([&](auto& q) { return q.adopt_stale(first, ids); }, q_);
  }
  // After a device or queue reset: see SplitQueue/PackedQueue::reset_ring().
  Result<void> reset_ring() {
    return std::visit([](auto& q) { return q.reset_ring(); }, q_);
  }

 private:
  std::variant<SplitQueue, PackedQueue> q_;
};

}  // namespace uvirtio::rings
