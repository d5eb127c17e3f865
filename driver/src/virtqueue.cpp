// Virtqueue: split or packed ring + transport queue + completion waiting.
#include "uvirtio/driver/virtqueue.hpp"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <random>

#include "uvirtio/base/barrier.hpp"

namespace uvirtio::driver {

const char* completion_mode_name(CompletionMode m) {
  switch (m) {
    case CompletionMode::polling:
      return "polling";
    case CompletionMode::interrupt:
      return "interrupt";
    case CompletionMode::hybrid:
      return "hybrid";
  }
  return "unknown";
}

Result<std::unique_ptr<Virtqueue>> Virtqueue::create(Transport& t, std::uint16_t index,
                                                     std::uint16_t wanted_size, CompletionMode mode) {
  const std::string op = "create queue " + std::to_string(index);
  UV_TRY(std::uint16_t max, t.queue_max_size(index));
  if (max == 0) return Error(Errc::unsupported, t.name(), op, "the device reports queue size 0");
  std::uint16_t size = std::min(wanted_size, max);
  // Round down to a power of two (split rings need one, spec 2.7).
  while (size & (size - 1)) size = static_cast<std::uint16_t>(size & (size - 1));
  if (size == 0) return Error(Errc::invalid_argument, t.name(), op, "queue size 0 requested");
  const std::string name = t.name() + " queue " + std::to_string(index);
  const FeatureSet f = t.features();
  std::optional<rings::Ring> ring;
  QueueAddresses addr;
  bool indirect = false;
  if (f.has(feature::kRingPacked)) {
    // Packed layout (spec 2.8): descriptor ring plus the driver and device
    // event suppression areas.
    using L = rings::PackedLayout;
    UV_TRY(pci::DmaRegion desc, t.dma().alloc(L::desc_bytes(size), L::desc_align));
    UV_TRY(pci::DmaRegion drv, t.dma().alloc(L::event_bytes(), L::event_align));
    UV_TRY(pci::DmaRegion dev, t.dma().alloc(L::event_bytes(), L::event_align));
    UV_TRY(rings::PackedQueue q, rings::PackedQueue::create(size, desc.va, drv.va, dev.va, name));
    // The same ring features as the split layout, in their packed form
    // (2.8.10 DESC event offsets, 2.8.7 indirect tables).
    if (f.has(feature::kEventIdx)) q.set_event_idx(true);
    // 2.8.9: buffer ids follow the ring, batched used descriptors accepted.
    if (f.has(feature::kInOrder)) UV_TRY_VOID(q.set_in_order(true));
    if (f.has(feature::kIndirectDesc)) {
      // One table of kIndirectMax descriptors per buffer id (2.8.7).
      const std::size_t table = kIndirectMax * sizeof(rings::PvirtqDesc);
      q.set_indirect(true, kIndirectMax);
      UV_TRY(pci::DmaRegion pool, t.dma().alloc(table * size, 16));
      UV_TRY_VOID(q.provide_indirect_pool(pool.va, pool.iova, pool.size));
      indirect = q.indirect();
    }
    ring.emplace(std::move(q));
    addr = QueueAddresses{desc.iova, drv.iova, dev.iova};
  } else {
    using L = rings::SplitLayout;
    UV_TRY(pci::DmaRegion desc, t.dma().alloc(L::desc_bytes(size), L::desc_align));
    UV_TRY(pci::DmaRegion avail, t.dma().alloc(L::avail_bytes(size), L::avail_align));
    UV_TRY(pci::DmaRegion used, t.dma().alloc(L::used_bytes(size), L::used_align));
    UV_TRY(rings::SplitQueue q, rings::SplitQueue::create(size, desc.va, avail.va, used.va, name));
    if (f.has(feature::kEventIdx)) q.set_event_idx(true);
    // 2.7.5, 2.7.9: descriptors in ring order, batched used entries accepted.
    if (f.has(feature::kInOrder)) UV_TRY_VOID(q.set_in_order(true));
    if (f.has(feature::kIndirectDesc)) {
      // One table of kIndirectMax descriptors per ring entry (2.7.5.3).
      const std::size_t table = kIndirectMax * sizeof(rings::VirtqDesc);
      q.set_indirect(true, kIndirectMax);
      UV_TRY(pci::DmaRegion pool, t.dma().alloc(table * size, 16));
      UV_TRY_VOID(q.provide_indirect_pool(pool.va, pool.iova, pool.size));
      indirect = size >= 2;  // a table is never longer than the ring (2.7.5.3.1)
    }
    ring.emplace(std::move(q));
    addr = QueueAddresses{desc.iova, avail.iova, used.iova};
  }
  // A device may complete a request of an earlier owner of this queue after
  // its reset (QEMU 7.2's virtio-pmem does, for a flush still running in its
  // thread pool). The in-flight ledger says which ids that owner left in
  // flight: they are handed out last and one late completion of each is
  // dropped (split) or breaks the ring (packed), never taken for one of our
  // requests. Without a ledger, ids start at a random point, so such a
  // completion most likely names an id not in flight here (an error, not a
  // request completed before the device ran it).
  std::optional<InflightLedger> ledger;
  std::string ledger_error;
  if (!f.has(feature::kInOrder)) {
    std::random_device rd;
    const auto first = static_cast<std::uint16_t>(rd() % size);
    if (!t.inflight_dir().empty()) {
      auto l = InflightLedger::open(t.inflight_dir(), t.name(), index, size);
      if (l) {
        ledger.emplace(std::move(*l));
      } else {
        ledger_error = l.error().message();
      }
    }
    if (ledger) {
      UV_TRY_VOID(ring->adopt_stale(first, ledger->left_over()));
    } else {
      UV_TRY_VOID(ring->start_ids_at(first));
    }
  }
  if (mode == CompletionMode::polling) ring->set_interrupts(false);
  UV_TRY_VOID(t.setup_queue(index, size, addr, mode != CompletionMode::polling));
  if (mode != CompletionMode::polling && !t.queue_eventfd(index))
    return Error(Errc::unsupported, t.name(), op, "no interrupt eventfd for the queue");
  auto vq = std::unique_ptr<Virtqueue>(new Virtqueue(t, index, std::move(*ring), mode, addr));
  vq->indirect_ = indirect;
  vq->ledger_ = std::move(ledger);
  vq->ledger_error_ = std::move(ledger_error);
  return vq;
}

Result<std::vector<std::uint64_t>> Virtqueue::restart() {
  // The device is reset (its status read back 0), so it writes nothing more
  // into this ring. Used entries it wrote before the reset are requests that
  // ran to the end: taken off here, they are not reported as dropped and
  // their ids are not held back for a late completion that cannot come.
  // Each entry is validated as usual; at the first bad one the rest count
  // as dropped.
  while (ring_.in_flight() != 0) {
    auto c = poll();
    if (!c.ok() || !*c) break;
    ++completed_before_reset_;
  }
  std::vector<std::uint64_t> dropped = ring_.outstanding_tokens();
  UV_TRY_VOID(ring_.reset_ring());
  ring_.set_interrupts(mode_ != CompletionMode::polling);
  UV_TRY_VOID(t_.setup_queue(index_, ring_.size(), addr_, mode_ != CompletionMode::polling));
  // A wake-up left from before the reset would only cost a spurious poll,
  // but drain it so counts stay meaningful.
  if (mode_ != CompletionMode::polling) {
    UV_TRY(const bool stale, take_interrupt(0));
    (void)stale;
  }
  return dropped;
}

Result<std::uint16_t> Virtqueue::submit(std::span<const rings::Buffer> out, std::span<const rings::Buffer> in,
                                        std::uint64_t token) {
  if (t_.needs_reset_seen()) [[unlikely]]
    return t_.check_not_known_broken("submit to queue " + std::to_string(index_)).error();
  UV_TRY(std::uint16_t head, ring_.add(out, in, token));
  // Marked before the device can see the chain: the ledger never misses a
  // request the device may complete.
  if (ledger_) ledger_->mark(head);
  if (ring_.publish()) {
    UV_TRY_VOID(t_.notify(index_));
    ++notifications_;
  }
  return head;
}

bool Virtqueue::holds(std::uint64_t token) const {
  const std::vector<std::uint64_t> tokens = ring_.outstanding_tokens();
  return std::find(tokens.begin(), tokens.end(), token) != tokens.end();
}

Result<std::optional<rings::Completion>> Virtqueue::poll() {
  UV_TRY(std::optional<rings::Completion> c, ring_.poll());
  settle_ledger();
  if (c) completed(*c);
  return c;
}

Result<rings::Completion> Virtqueue::wait(std::chrono::milliseconds timeout) {
  return wait_until(deadline_after(timeout), timeout);
}

Result<rings::Completion> Virtqueue::wait_until(std::chrono::steady_clock::time_point until,
                                                std::chrono::milliseconds timeout) {
  // Built only when it is needed (a health check or an error), not on every
  // wait: a pmem flush or an rng read waits once per request.
  const auto op = [this] { return "wait for queue " + std::to_string(index_); };
  const auto spin_until = deadline_after(spin_budget_);
  // Hybrid: while we spin the device need not interrupt (under TCG an MSI-X
  // injection through the vIOMMU costs the vCPU ~70 us per completion), so
  // interrupts stay suppressed until just before we sleep.
  bool armed = mode_ != CompletionMode::hybrid;
  if (!armed) ring_.set_interrupts(false);
  for (;;) {
    UV_TRY(std::optional<rings::Completion> c, poll());
    if (c) {
      // The device may have completed before we slept: take its interrupt
      // now, so INTx is acknowledged and unmasked and no stale wake-up is
      // left for the next wait. The completion is the caller's whatever the
      // drain finds (a config interrupt saying NEEDS_RESET, say): an error
      // here would lose it, and the next call reports the device's state.
      if (mode_ != CompletionMode::polling) (void)take_interrupt(0, false);
      return *c;
    }
    const auto now = std::chrono::steady_clock::now();
    if (now >= until) {
      UV_TRY_VOID(t_.check_healthy(op()));
      return Error(Errc::timeout, t_.name(), op(),
                   "no completion within " + std::to_string(timeout.count()) + " ms (" +
                       std::to_string(ring_.in_flight()) + " requests in flight)");
    }
    if (mode_ == CompletionMode::polling ||
        (mode_ == CompletionMode::hybrid && now < spin_until && (!spin_while_ || spin_while_()))) {
      // Busy-poll, but look at the device status now and then so a device
      // that went NEEDS_RESET is reported promptly.
      for (int spin = 0; spin < 4096 && !ring_.has_used(); ++spin) cpu_relax();
      if (!ring_.has_used()) UV_TRY_VOID(t_.check_healthy(op()));
      continue;
    }
    if (!armed) {
      armed = true;
      // Arm, then look once more: a completion that landed before the
      // device could see the armed state would otherwise never interrupt.
      if (ring_.enable_interrupts_and_check()) continue;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - now).count();
    UV_TRY(bool fired, take_interrupt(static_cast<int>(std::min<long long>(left + 1, 1000))));
    if (!fired) UV_TRY_VOID(t_.check_healthy(op()));
  }
}

Result<bool> Virtqueue::take_interrupt(int timeout_ms, bool strict) {
  // Built only for an error: this runs after every completion (the drain).
  const auto op = [this] { return "wait for queue " + std::to_string(index_) + " interrupt"; };
  // A transport reset takes the queue's eventfd away until restart() sets
  // the queue up again.
  const std::optional<int> qfd = t_.queue_eventfd(index_);
  if (!qfd && !strict) return false;
  if (!qfd)
    return Error(Errc::invalid_argument, t_.name(), op(),
                 "the queue has no interrupt eventfd (not set up again since the transport reset?)");
  const int fd = *qfd;
  // With MSI-X, DEVICE_NEEDS_RESET arrives as a config interrupt on its own
  // vector (spec 2.1.2, 4.1.5.3): watch it too so a waiter learns at once.
  const std::optional<int> cfg = t_.config_eventfd();
  pollfd p[2] = {{fd, POLLIN, 0}, {cfg.value_or(-1), POLLIN, 0}};
  const nfds_t n = cfg && *cfg != fd ? 2 : 1;
  int rc = ::poll(p, n, timeout_ms);
  if (rc < 0 && errno != EINTR) return Error::from_errno(errno, t_.name(), op(), "poll eventfd");
  if (rc <= 0) return false;
  // A closed or broken eventfd never becomes readable: fail now rather
  // than spin on it until the deadline.
  for (nfds_t i = 0; i < n; ++i) {
    const int bad = p[i].revents & (POLLERR | POLLHUP | POLLNVAL);
    if (bad && !strict) return false;
    if (bad)
      return Error(Errc::io, t_.name(), op(),
                   std::string(i == 0 ? "queue" : "config") + " eventfd " + std::to_string(p[i].fd) +
                       (bad & POLLNVAL  ? " is not open (POLLNVAL)"
                        : bad & POLLERR ? " reports an error (POLLERR)"
                                        : " was hung up (POLLHUP)"));
  }
  if (n == 2 && (p[1].revents & POLLIN)) {
    std::uint64_t count = 0;
    if (::read(*cfg, &count, sizeof count) == sizeof count) ++config_interrupts_;
    UV_TRY_VOID(t_.check_healthy("wait for queue " + std::to_string(index_)));
  }
  if (!(p[0].revents & POLLIN)) return false;
  std::uint64_t count = 0;
  if (::read(fd, &count, sizeof count) == sizeof count) interrupts_ += count;
  UV_TRY_VOID(t_.ack_interrupt(index_));
  return true;
}

}  // namespace uvirtio::driver
