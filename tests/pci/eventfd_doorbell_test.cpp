// Unit tests for EventfdDoorbell: the two halves of a pair wake each other,
// a wait times out on time, pending rings collapse into one wake-up, and the
// pair works across fork() (each process keeps its own half).
#include "uvirtio/pci/eventfd_doorbell.hpp"

#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <thread>

namespace uvirtio::pci {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

TEST(EventfdDoorbell, PairHalvesWakeEachOther) {
  auto bells = EventfdDoorbell::pair("bell");
  ASSERT_TRUE(bells.ok()) << bells.error().message();
  auto& [a, b] = *bells;
  EXPECT_EQ(a.name(), "bell side 0");
  EXPECT_EQ(b.name(), "bell side 1");
  // Four distinct descriptors: each half closes its own.
  EXPECT_NE(a.ring_fd(), b.wait_fd());
  EXPECT_NE(a.wait_fd(), b.ring_fd());

  ASSERT_TRUE(a.ring(7).ok());
  auto w = b.wait(1s);
  ASSERT_TRUE(w.ok()) << w.error().message();
  EXPECT_TRUE(*w);
  // a's own wait is not woken by its ring.
  auto self = a.wait(0ns);
  ASSERT_TRUE(self.ok());
  EXPECT_FALSE(*self);

  ASSERT_TRUE(b.ring(0).ok());
  EXPECT_TRUE(a.wait(1s).value());
}

TEST(EventfdDoorbell, WaitTimesOut) {
  auto bells = EventfdDoorbell::pair();
  ASSERT_TRUE(bells.ok());
  const auto t0 = Clock::now();
  auto w = bells->second.wait(30ms);
  ASSERT_TRUE(w.ok());
  EXPECT_FALSE(*w);
  EXPECT_GE(Clock::now() - t0, 30ms);
  auto now = bells->second.wait(0ns);  // zero: just a check
  ASSERT_TRUE(now.ok());
  EXPECT_FALSE(*now);
  auto neg = bells->second.wait(-5ms);
  ASSERT_TRUE(neg.ok());
  EXPECT_FALSE(*neg);
}

// Pending rings collapse into one wake-up; after it, waits time out even
// though the eventfd's counter is never cleared.
TEST(EventfdDoorbell, PendingRingsCollapseIntoOneWakeUp) {
  auto bells = EventfdDoorbell::pair();
  ASSERT_TRUE(bells.ok());
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(bells->first.ring(0).ok());
  EXPECT_TRUE(bells->second.wait(0ns).value());
  EXPECT_FALSE(bells->second.wait(0ns).value());
  EXPECT_FALSE(bells->second.wait(10ms).value());
  // The counter still holds the five rings: the wait consumed the edge only.
  std::uint64_t count = 0;
  ASSERT_EQ(::read(bells->second.wait_fd(), &count, sizeof count), static_cast<ssize_t>(sizeof count));
  EXPECT_EQ(count, 5u);
}

// A ring that lands while the counter is already set (nobody clears it) is
// a new edge and wakes the next wait: no wake-up is ever lost.
TEST(EventfdDoorbell, EveryRingAfterAWaitWakesTheNextOne) {
  auto bells = EventfdDoorbell::pair();
  ASSERT_TRUE(bells.ok());
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(bells->first.ring(0).ok());
    ASSERT_TRUE(bells->second.wait(1s).value()) << i;
    ASSERT_TRUE(bells->first.ring(0).ok());  // while the counter is still set
    ASSERT_TRUE(bells->second.wait(1s).value()) << i;
  }
}

TEST(EventfdDoorbell, WakesASleeperInAnotherThread) {
  auto bells = EventfdDoorbell::pair();
  ASSERT_TRUE(bells.ok());
  std::thread ringer([&] {
    std::this_thread::sleep_for(20ms);
    (void)bells->first.ring(0);
  });
  const auto t0 = Clock::now();
  auto w = bells->second.wait(5s);
  ringer.join();
  ASSERT_TRUE(w.ok());
  EXPECT_TRUE(*w);
  EXPECT_LT(Clock::now() - t0, 2s);
}

// A timeout too long to add to the clock (nanoseconds::max() as "wait for
// ever") must not overflow the deadline: that is undefined behaviour, and
// the wrapped deadline lies in the past, so the wait returned false at once
// without sleeping.
TEST(EventfdDoorbell, HugeTimeoutWaitsInsteadOfOverflowing) {
  auto bells = EventfdDoorbell::pair();
  ASSERT_TRUE(bells.ok());
  std::thread ringer([&] {
    std::this_thread::sleep_for(50ms);
    (void)bells->first.ring(0);
  });
  auto w = bells->second.wait(std::chrono::nanoseconds::max());
  ringer.join();
  ASSERT_TRUE(w.ok()) << w.error().message();
  EXPECT_TRUE(*w) << "the wait gave up before the ring";
}

TEST(EventfdDoorbell, WorksAcrossFork) {
  auto bells = EventfdDoorbell::pair("fork bell");
  ASSERT_TRUE(bells.ok());
  const pid_t pid = ::fork();
  if (pid == 0) {
    // Child: side 1. Wait for the parent's ring, answer, then exit.
    EventfdDoorbell& mine = bells->second;
    auto w = mine.wait(10s);
    if (!w || !*w) _exit(1);
    std::this_thread::sleep_for(10ms);
    _exit(mine.ring(0) ? 0 : 2);
  }
  ASSERT_GT(pid, 0);
  std::this_thread::sleep_for(10ms);
  ASSERT_TRUE(bells->first.ring(0).ok());
  auto w = bells->first.wait(10s);
  ASSERT_TRUE(w.ok()) << w.error().message();
  EXPECT_TRUE(*w);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST(EventfdDoorbell, AdoptsDescriptors) {
  // As if received over a Unix socket: two eventfds, each end owning copies.
  const int e0 = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC), e1 = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  ASSERT_GE(e0, 0);
  ASSERT_GE(e1, 0);
  const int e0d = ::dup(e0), e1d = ::dup(e1);
  ASSERT_GE(e0d, 0);
  ASSERT_GE(e1d, 0);
  EventfdDoorbell x(Fd(Os::system(), e1), Fd(Os::system(), e0), "x");
  EventfdDoorbell y(Fd(Os::system(), e0d), Fd(Os::system(), e1d), "y");
  EXPECT_EQ(x.ring_fd(), e1);
  EXPECT_EQ(x.wait_fd(), e0);
  ASSERT_TRUE(x.ring(0).ok());
  EXPECT_TRUE(y.wait(1s).value());
  ASSERT_TRUE(y.ring(0).ok());
  EXPECT_TRUE(x.wait(1s).value());
}

TEST(EventfdDoorbell, ErrorsNameTheDoorbell) {
  EventfdDoorbell none(Fd(), Fd(), "broken bell");
  auto r = none.ring(0);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().device(), "broken bell");
  EXPECT_EQ(r.error().sys_errno(), EBADF);
  EXPECT_NE(r.error().message().find("ring doorbell: write eventfd"), std::string::npos)
      << r.error().message();
}

}  // namespace
}  // namespace uvirtio::pci
