// EventfdDoorbell: a channel::Doorbell over two eventfds, for a channel
// between two processes on one host (a memfd window), or for tests.
//
// Each doorbell writes one eventfd to wake the peer and reads the other to
// sleep. pair() makes two doorbells wired to each other; create them before
// fork() and let each process use its own half (the descriptors are
// inherited; they are close-on-exec). The peer id given to ring() is
// ignored: the eventfd is the address.
//
//   UV_TRY(auto bells, uvirtio::pci::EventfdDoorbell::pair("demo"));
//   if (fork() == 0) { o.side = 1; o.doorbell = &bells.second; ... }
//   else             { o.side = 0; o.doorbell = &bells.first; ... }
//
// Waiting is one epoll_pwait2 on an edge-triggered epoll instance watching
// our eventfd, which is never read: every ring() is a new edge and wakes one
// wait, so a wake-up costs the ringer's write and the sleeper's return from
// epoll and nothing else (no read to clear a counter, no poll table set up
// per wait). The counter only grows, by one per ring; at one ring per
// nanosecond it would take five centuries to saturate, and ring() treats a
// saturated counter as a pending wake-up anyway.
//
// The eventfds and the epoll instance are used directly (eventfd, write,
// epoll), not through pci::Os: they need no privilege, so tests use real
// ones, and Os has no such calls to route them through. Fd only owns them.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>

#include "uvirtio/base/result.hpp"
#include "uvirtio/pci/os.hpp"
#include "uvirtio/rings/channel.hpp"

namespace uvirtio::pci {

class EventfdDoorbell final : public channel::Doorbell {
 public:
  // Two doorbells wired to each other: first.ring() wakes second.wait() and
  // the other way round. Each owns its own descriptors. `name` appears in
  // errors ("demo side 0", "demo side 1").
  static Result<std::pair<EventfdDoorbell, EventfdDoorbell>> pair(
      const std::string& name = "eventfd doorbell");

  // Takes over two eventfds (e.g. received over a Unix socket): `ring_fd` is
  // written to wake the peer, `wait_fd` read to sleep. Both non-blocking.
  EventfdDoorbell(Fd ring_fd, Fd wait_fd, std::string name);
  EventfdDoorbell(EventfdDoorbell&&) noexcept = default;
  EventfdDoorbell& operator=(EventfdDoorbell&&) noexcept = default;

  // Adds 1 to the peer's eventfd (a counter already at its maximum means a
  // wake-up is pending anyway: not an error).
  Result<void> ring(std::uint32_t peer_id) override;
  // Waits until the peer rings (true) or `timeout` passes (false). Rings
  // that landed since the last wait collapse into one wake-up. The epoll
  // instance is made by the first wait, in the process that waits (so a
  // pair made before fork() shares none).
  Result<bool> wait(std::chrono::nanoseconds timeout) override;

  int ring_fd() const noexcept { return ring_.get(); }
  int wait_fd() const noexcept { return wait_.get(); }
  const std::string& name() const noexcept { return name_; }

 private:
  Fd ring_;
  Fd wait_;
  std::string name_;
  Fd epoll_;  // edge-triggered, watching wait_; made by the first wait()
};

}  // namespace uvirtio::pci
