// EventfdDoorbell: see eventfd_doorbell.hpp.
#include "uvirtio/pci/eventfd_doorbell.hpp"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <ctime>

#include "uvirtio/base/deadline.hpp"

namespace uvirtio::pci {
namespace {

using Clock = std::chrono::steady_clock;

Result<Fd> new_eventfd(const std::string& name) {
  const int fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) return Error::from_errno(errno, name, "create doorbell", "eventfd");
  return Fd(Os::system(), fd);
}

Result<Fd> dup_fd(const Fd& fd, const std::string& name) {
  const int d = ::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0);
  if (d < 0) return Error::from_errno(errno, name, "create doorbell", "dup eventfd");
  return Fd(Os::system(), d);
}

}  // namespace

Result<std::pair<EventfdDoorbell, EventfdDoorbell>> EventfdDoorbell::pair(const std::string& name) {
  // e0 wakes side 0, e1 wakes side 1; side 1 gets duplicates so each
  // doorbell closes its own descriptors.
  UV_TRY(Fd e0, new_eventfd(name));
  UV_TRY(Fd e1, new_eventfd(name));
  UV_TRY(Fd e0_dup, dup_fd(e0, name));
  UV_TRY(Fd e1_dup, dup_fd(e1, name));
  return std::pair<EventfdDoorbell, EventfdDoorbell>(
      std::piecewise_construct, std::forward_as_tuple(std::move(e1), std::move(e0), name + " side 0"),
      std::forward_as_tuple(std::move(e0_dup), std::move(e1_dup), name + " side 1"));
}

EventfdDoorbell::EventfdDoorbell(Fd ring_fd, Fd wait_fd, std::string name)
    : ring_(std::move(ring_fd)), wait_(std::move(wait_fd)), name_(std::move(name)) {}

Result<void> EventfdDoorbell::ring(std::uint32_t /*peer_id*/) {
  const std::uint64_t one = 1;
  for (;;) {
    if (::write(ring_.get(), &one, sizeof one) == static_cast<ssize_t>(sizeof one)) return ok();
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return ok();  // counter saturated: the peer has a wake-up pending
    return Error::from_errno(errno, name_, "ring doorbell", "write eventfd");
  }
}

Result<bool> EventfdDoorbell::wait(std::chrono::nanoseconds timeout) {
  if (!epoll_.valid()) {
    const int ep = ::epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) return Error::from_errno(errno, name_, "wait for doorbell", "epoll_create1");
    Fd owned(Os::system(), ep);
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLET;
    if (::epoll_ctl(ep, EPOLL_CTL_ADD, wait_.get(), &ev) != 0)
      return Error::from_errno(errno, name_, "wait for doorbell", "add the eventfd to epoll");
    epoll_ = std::move(owned);
  }
  const auto deadline = deadline_after(timeout);  // saturated: nanoseconds::max() waits for ever
  for (;;) {
    const auto left =
        std::max(std::chrono::nanoseconds(deadline - Clock::now()), std::chrono::nanoseconds(0));
    const auto secs = std::chrono::duration_cast<std::chrono::seconds>(left);
    timespec ts{};
    ts.tv_sec = static_cast<time_t>(secs.count());
    ts.tv_nsec = static_cast<long>((left - secs).count());
    epoll_event ev{};
    const int rc = ::epoll_pwait2(epoll_.get(), &ev, 1, &ts, nullptr);
    if (rc < 0) {
      if (errno == EINTR) continue;
      return Error::from_errno(errno, name_, "wait for doorbell", "epoll_pwait2 on the eventfd");
    }
    if (rc == 0) return false;
    if (ev.events & (EPOLLERR | EPOLLHUP))
      return Error(Errc::io, name_, "wait for doorbell", "the eventfd reports an error condition");
    return true;
  }
}

}  // namespace uvirtio::pci
