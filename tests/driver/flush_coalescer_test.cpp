// Unit tests for FlushCoalescer: many callers, one device flush at a time.
//
// The flush function is a fake that counts its calls, asserts that it never
// runs twice at once, and can be held on a gate so a test can place callers
// exactly before, during or after a given round. "Writes" are modelled by a
// counter: a caller bumps `written` before asking for a flush, the fake flush
// records the value it saw when it started as `durable` (a host fsync makes
// durable what was written before it started), and a caller whose flush()
// returned must find its own write durable.
#include "uvirtio/driver/flush_coalescer.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace uvirtio::driver {
namespace {

using namespace std::chrono_literals;

// Polls pred() until it holds or `limit` passes: for conditions that no
// callback signals (a caller has taken its ticket, ...).
template <class Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = 5s) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(50us);
  }
  return true;
}

// Holds the fake flush until the test opens it. A wait gives up after
// `limit` so a broken coalescer fails the test instead of hanging it.
class Gate {
 public:
  void open() {
    std::lock_guard lk(m_);
    open_ = true;
    cv_.notify_all();
  }
  bool wait(std::chrono::milliseconds limit = 5s) {
    std::unique_lock lk(m_);
    return cv_.wait_for(lk, limit, [&] { return open_; });
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool open_ = false;
};

// Counts completions of asynchronous requests and lets the test wait for them.
class Countdown {
 public:
  // Notifies under the lock: a waiter may destroy the Countdown as soon as
  // it sees the count, while this thread is still inside hit().
  void hit() {
    std::lock_guard lk(m_);
    ++n_;
    cv_.notify_all();
  }
  bool wait_for_count(std::uint64_t want, std::chrono::milliseconds limit = 5s) {
    std::unique_lock lk(m_);
    return cv_.wait_for(lk, limit, [&] { return n_ >= want; });
  }
  std::uint64_t count() {
    std::lock_guard lk(m_);
    return n_;
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  std::uint64_t n_ = 0;
};

// Runs a function when the scope ends (opens gates and joins threads even
// when an assertion returned early).
class Cleanup {
 public:
  explicit Cleanup(std::function<void()> f) : f_(std::move(f)) {}
  ~Cleanup() { f_(); }
  Cleanup(const Cleanup&) = delete;
  Cleanup& operator=(const Cleanup&) = delete;

 private:
  std::function<void()> f_;
};

// Aborts the test binary with a message unless destroyed within `limit`: a
// hang in the code under test then fails loudly instead of blocking the suite.
class Watchdog {
 public:
  Watchdog(std::chrono::milliseconds limit, const char* what)
      : thread_([this, limit, what] {
          std::unique_lock lk(m_);
          if (!cv_.wait_for(lk, limit, [&] { return done_; })) {
            std::fprintf(stderr, "FATAL: %s did not finish within %lld ms\n", what,
                         static_cast<long long>(limit.count()));
            std::abort();
          }
        }) {}
  ~Watchdog() {
    {
      std::lock_guard lk(m_);
      done_ = true;
      cv_.notify_all();
    }
    thread_.join();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;  // last: starts once the rest is constructed
};

Error flush_failed(const std::string& why) { return Error(Errc::device_error, "fakedev", "flush", why, EIO); }

// The flush function of most tests: counts calls, detects overlapping calls,
// records `written` at its start into `durable` when it ends.
// flush_async() that must be accepted (a non-empty callback, not shut down).
void queue(FlushCoalescer& c, FlushCoalescer::Callback done) {
  auto r = c.flush_async(std::move(done));
  EXPECT_TRUE(r.ok()) << r.error().message();
}

struct FakeFlush {
  std::atomic<std::uint64_t> calls{0};  // bumped after `written` was sampled
  std::atomic<int> in_flight{0};
  std::atomic<int> max_in_flight{0};
  std::atomic<std::uint64_t> written{0};
  std::atomic<std::uint64_t> durable{0};
  std::chrono::microseconds work{0};
  Gate* first_gate = nullptr;  // holds the first call until opened

  Result<void> operator()() {
    const int now = ++in_flight;
    for (int seen = max_in_flight.load(); now > seen && !max_in_flight.compare_exchange_weak(seen, now);) {
    }
    const std::uint64_t w = written.load();
    if (++calls == 1 && first_gate != nullptr && !first_gate->wait()) {
      --in_flight;
      return flush_failed("gate never opened");
    }
    if (work.count() > 0) std::this_thread::sleep_for(work);
    // Monotonic even if a broken coalescer overlaps two flushes.
    for (std::uint64_t d = durable.load(); w > d && !durable.compare_exchange_weak(d, w);) {
    }
    --in_flight;
    return ok();
  }
  FlushCoalescer::FlushFn fn() {
    return [this] { return (*this)(); };
  }
};

// ------------------------------------------------------------------ single-threaded

TEST(FlushCoalescer, SequentialFlushesEachIssueOneDeviceFlush) {
  FakeFlush fake;
  FlushCoalescer c(fake.fn());
  EXPECT_EQ(c.requests(), 0u);
  EXPECT_EQ(c.device_flushes(), 0u);
  for (int i = 1; i <= 10; ++i) {
    ++fake.written;
    auto r = c.flush();
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(c.requests(), static_cast<std::uint64_t>(i));
    EXPECT_EQ(c.device_flushes(), static_cast<std::uint64_t>(i));
    EXPECT_EQ(fake.durable.load(), fake.written.load());
  }
  // Sequential futures: each waits for its own flush, one device flush each.
  for (int i = 1; i <= 5; ++i) {
    auto f = c.flush_future();
    ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
    auto r = f.get();
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(c.requests(), static_cast<std::uint64_t>(10 + i));
    EXPECT_EQ(c.device_flushes(), static_cast<std::uint64_t>(10 + i));
  }
  EXPECT_EQ(fake.calls.load(), 15u);
  EXPECT_EQ(fake.max_in_flight.load(), 1);
}

TEST(FlushCoalescer, SequentialFailureGoesToThatCallerOnly) {
  int calls = 0;
  FlushCoalescer c([&]() -> Result<void> {
    if (++calls == 3) return flush_failed("fsync of the backing file failed");
    return ok();
  });
  std::vector<Result<void>> results;
  for (int i = 0; i < 5; ++i) results.push_back(c.flush());
  for (int i = 0; i < 5; ++i) {
    SCOPED_TRACE(i);
    if (i == 2) {
      ASSERT_FALSE(results[i].ok());
      EXPECT_EQ(results[i].error().code(), Errc::device_error);
      EXPECT_EQ(results[i].error().sys_errno(), EIO);
      EXPECT_NE(results[i].error().message().find("fsync of the backing file failed"), std::string::npos)
          << results[i].error().message();
    } else {
      EXPECT_TRUE(results[i].ok()) << results[i].error().message();
    }
  }
  EXPECT_EQ(c.device_flushes(), 5u);
  // An asynchronous request after the failure gets a fresh flush.
  auto f = c.flush_future();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  EXPECT_TRUE(f.get().ok());
  EXPECT_EQ(calls, 6);
}

// A flush function that throws (an allocation, say) fails its round with an
// error naming the device; the leader role is given back, so the next flush
// runs instead of waiting for ever behind a leader that unwound.
TEST(FlushCoalescer, AFlushFunctionThatThrowsFailsTheRoundAndTheNextFlushRuns) {
  int calls = 0;
  FlushCoalescer c(
      [&]() -> Result<void> {
        if (++calls == 1) throw std::runtime_error("out of memory");
        return ok();
      },
      "0000:01:00.0");
  auto first = c.flush();
  ASSERT_FALSE(first.ok());
  EXPECT_EQ(first.error().code(), Errc::io);
  EXPECT_NE(first.error().message().find("0000:01:00.0: flush: the flush function threw: out of memory"),
            std::string::npos)
      << first.error().message();
  auto second = std::async(std::launch::async, [&] { return c.flush(); });
  ASSERT_EQ(second.wait_for(5s), std::future_status::ready) << "the next flush hangs";
  EXPECT_TRUE(second.get().ok());
  EXPECT_EQ(calls, 2);
}

// ------------------------------------------------------------------ the covering rule

// A caller that arrives while a flush is running must not be satisfied by it:
// that flush may have started before the caller's write.
TEST(FlushCoalescer, TicketTakenDuringAFlushWaitsForTheNextOne) {
  Gate gate;
  FakeFlush fake;
  fake.first_gate = &gate;
  FlushCoalescer c(fake.fn());
  Result<void> ra, rb;
  std::atomic<bool> b_returned{false};
  std::uint64_t durable_when_b_returned = 0, calls_when_b_returned = 0;
  std::thread a, b;
  Cleanup cleanup([&] {
    gate.open();
    for (std::thread* t : {&a, &b})
      if (t->joinable()) t->join();
  });
  fake.written = 1;
  a = std::thread([&] { ra = c.flush(); });
  ASSERT_TRUE(eventually([&] { return fake.calls.load() == 1; })) << "first flush never started";
  // Round 1 is running and saw written == 1. B writes, then asks.
  const std::uint64_t b_write = ++fake.written;
  b = std::thread([&] {
    rb = c.flush();
    durable_when_b_returned = fake.durable.load();
    calls_when_b_returned = fake.calls.load();
    b_returned = true;
  });
  ASSERT_TRUE(eventually([&] { return c.requests() == 2; }));
  EXPECT_FALSE(b_returned.load()) << "B returned while the only flush was blocked";
  gate.open();
  a.join();
  b.join();
  EXPECT_TRUE(ra.ok());
  EXPECT_TRUE(rb.ok());
  EXPECT_EQ(calls_when_b_returned, 2u) << "B must be covered by a flush that started after its ticket";
  EXPECT_GE(durable_when_b_returned, b_write);
  EXPECT_EQ(c.device_flushes(), 2u);
}

// The same rule under load: every caller's write is durable when its flush()
// returns, and flushes never overlap.
TEST(FlushCoalescer, EveryReturnedCallerIsCoveredUnderLoad) {
  FakeFlush fake;
  fake.work = 300us;
  FlushCoalescer c(fake.fn());
  constexpr int kThreads = 6, kCalls = 120;
  std::atomic<int> uncovered{0}, failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < kCalls; ++i) {
        const std::uint64_t mine = ++fake.written;
        if (!c.flush().ok()) ++failed;
        if (fake.durable.load() < mine) ++uncovered;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(uncovered.load(), 0) << "a flush() returned before a flush covering its write ended";
  EXPECT_EQ(fake.max_in_flight.load(), 1);
  EXPECT_EQ(c.requests(), std::uint64_t{kThreads} * kCalls);
  EXPECT_EQ(c.device_flushes(), fake.calls.load());
}

// ------------------------------------------------------------------ coalescing

TEST(FlushCoalescer, ConcurrentCallersShareDeviceFlushes) {
  FakeFlush fake;
  fake.work = 1ms;
  FlushCoalescer c(fake.fn());
  constexpr int kThreads = 8, kCalls = 200;
  std::atomic<int> failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < kCalls; ++i)
        if (!c.flush().ok()) ++failed;
    });
  for (auto& t : threads) t.join();
  const std::uint64_t requests = c.requests(), flushes = c.device_flushes();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(requests, std::uint64_t{kThreads} * kCalls);
  EXPECT_EQ(flushes, fake.calls.load());
  EXPECT_EQ(fake.max_in_flight.load(), 1) << "two device flushes ran at once";
  // One thread's consecutive calls need distinct rounds; 8 threads share them.
  EXPECT_GE(flushes, std::uint64_t{kCalls});
  EXPECT_LE(flushes * 2, requests) << flushes << " device flushes for " << requests << " requests";
}

// ------------------------------------------------------------------ failures

// Round 2 fails: exactly the callers it covered (sync and async) get the
// error; the callers of rounds 1 and 3 succeed.
TEST(FlushCoalescer, FailureGoesToTheCallersOfThatRoundOnly) {
  Gate gate1, gate2;
  std::atomic<int> calls{0};
  Countdown async_done;
  std::optional<Result<void>> ra, rb, rc, rd, re, rf;
  FlushCoalescer c([&]() -> Result<void> {
    const int n = ++calls;
    if (n == 1 && !gate1.wait()) return flush_failed("gate 1 never opened");
    if (n == 2) {
      if (!gate2.wait()) return flush_failed("gate 2 never opened");
      return flush_failed("round 2 failed");
    }
    return ok();
  });
  std::thread a, b, cc, d;
  Cleanup cleanup([&] {
    gate1.open();
    gate2.open();
    for (std::thread* t : {&a, &b, &cc, &d})
      if (t->joinable()) t->join();
  });
  a = std::thread([&] { ra = c.flush(); });  // ticket 1: round 1
  ASSERT_TRUE(eventually([&] { return calls.load() == 1; }));
  b = std::thread([&] { rb = c.flush(); });  // tickets 2..4 (taken during round 1): round 2
  cc = std::thread([&] { rc = c.flush(); });
  queue(c, [&](Result<void> r) {
    rf = r;
    async_done.hit();
  });
  ASSERT_TRUE(eventually([&] { return c.requests() == 4; }));
  gate1.open();
  ASSERT_TRUE(eventually([&] { return calls.load() == 2; }));
  d = std::thread([&] { rd = c.flush(); });  // tickets 5, 6 (taken during round 2): round 3
  queue(c, [&](Result<void> r) {
    re = r;
    async_done.hit();
  });
  ASSERT_TRUE(eventually([&] { return c.requests() == 6; }));
  gate2.open();
  for (std::thread* t : {&a, &b, &cc, &d}) t->join();
  ASSERT_TRUE(async_done.wait_for_count(2));

  ASSERT_TRUE(ra && rb && rc && rd && re && rf);
  EXPECT_TRUE(ra->ok()) << "round 1 succeeded";
  for (const auto* r : {&*rb, &*rc, &*rf}) {
    ASSERT_FALSE(r->ok()) << "covered by the failed round 2";
    EXPECT_EQ(r->error().code(), Errc::device_error);
    EXPECT_NE(r->error().message().find("round 2 failed"), std::string::npos) << r->error().message();
  }
  EXPECT_TRUE(rd->ok()) << rd->error().message();
  EXPECT_TRUE(re->ok()) << re->error().message();
  EXPECT_EQ(calls.load(), 3);
  EXPECT_EQ(c.device_flushes(), 3u);
  EXPECT_EQ(c.requests(), 6u);
}

// Many failed rounds under load: every caller gets a result, and a caller
// reports success only if the round that covered it did not fail (here: no
// round fails after `written` passed 1000, so late writes always succeed).
TEST(FlushCoalescer, FailuresUnderLoadNeverReachLaterCallers) {
  std::atomic<std::uint64_t> written{0}, calls{0};
  constexpr std::uint64_t kFailUntil = 300;  // rounds starting while written < this fail
  FlushCoalescer c([&]() -> Result<void> {
    ++calls;
    const std::uint64_t w = written.load();
    std::this_thread::sleep_for(100us);
    if (w < kFailUntil) return flush_failed("early round failed");
    return ok();
  });
  std::atomic<int> late_failures{0}, early_failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 150; ++i) {
        const std::uint64_t mine = ++written;
        auto r = c.flush();
        if (!r.ok()) {
          EXPECT_EQ(r.error().code(), Errc::device_error);
          (mine >= kFailUntil ? late_failures : early_failures)++;
        }
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(late_failures.load(), 0)
      << "a caller that wrote after the last failing round started got its error";
  EXPECT_GT(early_failures.load(), 0);
  EXPECT_EQ(c.device_flushes(), calls.load());
}

// ------------------------------------------------------------------ asynchronous requests

// No synchronous caller: the helper thread issues the flushes and runs the
// callbacks, each exactly once.
// A callback runs on whichever thread completed the flush, possibly one
// that must issue the next: flush() from it is refused at once (it used to
// wait forever), flush_async() from it works. An empty callback and a
// request after shutdown() are refused too, without queuing anything.
TEST(FlushCoalescer, FlushFromACallbackIsRefusedAndAsyncWorks) {
  FakeFlush fake;
  FlushCoalescer c(fake.fn(), "0000:00:04.0");
  std::promise<Result<void>> inner_sync;
  std::promise<Result<void>> chained;
  queue(c, [&](Result<void>) {
    inner_sync.set_value(c.flush());
    queue(c, [&](Result<void> r) { chained.set_value(std::move(r)); });
  });
  auto f1 = inner_sync.get_future();
  ASSERT_EQ(f1.wait_for(5s), std::future_status::ready) << "flush() from a callback hung";
  const Result<void> r = f1.get();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_NE(r.error().message().find("completion callback"), std::string::npos) << r.error().message();
  EXPECT_NE(r.error().message().find("0000:00:04.0"), std::string::npos) << r.error().message();
  auto f2 = chained.get_future();
  ASSERT_EQ(f2.wait_for(5s), std::future_status::ready);
  EXPECT_TRUE(f2.get().ok());
  EXPECT_TRUE(c.flush().ok()) << "a flush() outside callbacks works";

  const std::uint64_t asked = c.requests();
  auto empty = c.flush_async({});
  ASSERT_FALSE(empty.ok());
  EXPECT_EQ(empty.error().code(), Errc::invalid_argument);
  c.shutdown();
  bool ran = false;
  auto late = c.flush_async([&](Result<void>) { ran = true; });
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.error().code(), Errc::broken);
  EXPECT_FALSE(ran);
  EXPECT_EQ(c.requests(), asked);
}

// A callback may shut down another coalescer (another device's close),
// which runs that one's unserved callbacks on this thread. Afterwards this
// thread is still inside its own callback: flush() must still be refused.
// (The inner callbacks' end cleared the mark, so the flush() waited for the
// flush that only this thread, the helper leading it, could issue: a hang.)
TEST(FlushCoalescer, FlushIsStillRefusedAfterACallbackShutDownAnotherCoalescer) {
  Watchdog watchdog(10s, "flush() from a callback after a nested shutdown");
  Gate gate;
  std::atomic<bool> held{false};
  FlushCoalescer other([&]() -> Result<void> {
    held = true;
    if (!gate.wait()) return flush_failed("gate never opened");
    return ok();
  });
  std::thread other_leader([&] { EXPECT_TRUE(other.flush().ok()); });
  Cleanup cleanup([&] {
    gate.open();
    if (other_leader.joinable()) other_leader.join();
  });
  ASSERT_TRUE(eventually([&] { return held.load(); }));
  // Queued behind the held flush: other.shutdown() answers it.
  std::atomic<bool> other_cb{false};
  queue(other, [&](Result<void> r) {
    EXPECT_FALSE(r.ok());
    other_cb = true;
  });
  FakeFlush fake;
  FlushCoalescer c(fake.fn(), "0000:00:04.0");
  std::promise<Result<void>> inner;
  queue(c, [&](Result<void>) {
    other.shutdown();
    inner.set_value(c.flush());
  });
  auto f = inner.get_future();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready) << "flush() from a callback hung";
  EXPECT_TRUE(other_cb.load());
  const Result<void> r = f.get();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument) << r.error().message();
}

TEST(FlushCoalescer, AsyncOnlyIsServedByTheHelperThread) {
  FakeFlush fake;
  fake.work = 200us;
  std::mutex ids_m;
  std::vector<std::thread::id> flush_threads;
  FlushCoalescer c([&] {
    {
      std::lock_guard lk(ids_m);
      flush_threads.push_back(std::this_thread::get_id());
    }
    return fake();
  });
  constexpr int kAsync = 100;
  std::vector<std::atomic<int>> hits(kAsync);
  std::vector<std::uint64_t> mine(kAsync);
  std::atomic<int> failed{0}, uncovered{0}, on_caller_thread{0};
  Countdown done;
  const auto main_id = std::this_thread::get_id();
  for (int i = 0; i < kAsync; ++i) {
    mine[i] = ++fake.written;
    queue(c, [&, i](Result<void> r) {
      if (!r.ok()) ++failed;
      if (fake.durable.load() < mine[i]) ++uncovered;
      if (std::this_thread::get_id() == main_id) ++on_caller_thread;
      ++hits[i];
      done.hit();
    });
  }
  std::vector<std::future<Result<void>>> futures;
  for (int i = 0; i < 20; ++i) futures.push_back(c.flush_future());
  ASSERT_TRUE(done.wait_for_count(kAsync)) << done.count() << " of " << kAsync << " callbacks ran";
  for (auto& f : futures) {
    ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
    auto r = f.get();
    EXPECT_TRUE(r.ok()) << r.error().message();
  }
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(uncovered.load(), 0);
  EXPECT_EQ(on_caller_thread.load(), 0);
  for (int i = 0; i < kAsync; ++i) EXPECT_EQ(hits[i].load(), 1) << "callback " << i;
  EXPECT_EQ(c.requests(), std::uint64_t{kAsync} + 20);
  EXPECT_LE(c.device_flushes(), c.requests());
  EXPECT_EQ(fake.max_in_flight.load(), 1);
  std::lock_guard lk(ids_m);
  for (const auto& id : flush_threads) EXPECT_NE(id, main_id) << "flush_async must not flush on the caller";
}

TEST(FlushCoalescer, AsyncAndSyncCallersMixed) {
  FakeFlush fake;
  fake.work = 200us;
  FlushCoalescer c(fake.fn());
  constexpr int kSync = 4, kAsyncThreads = 2, kEach = 80;
  std::atomic<int> failed{0}, uncovered{0};
  Countdown done;
  std::vector<std::thread> threads;
  for (int t = 0; t < kSync; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < kEach; ++i) {
        const std::uint64_t mine = ++fake.written;
        if (!c.flush().ok()) ++failed;
        if (fake.durable.load() < mine) ++uncovered;
      }
    });
  for (int t = 0; t < kAsyncThreads; ++t)
    threads.emplace_back([&] {
      std::vector<std::pair<std::uint64_t, std::future<Result<void>>>> futures;
      for (int i = 0; i < kEach; ++i) {
        const std::uint64_t mine = ++fake.written;
        if (i % 2 == 0) {
          queue(c, [&, mine](Result<void> r) {
            if (!r.ok()) ++failed;
            if (fake.durable.load() < mine) ++uncovered;
            done.hit();
          });
        } else {
          futures.emplace_back(mine, c.flush_future());
        }
      }
      for (auto& [w, f] : futures) {
        if (f.wait_for(5s) != std::future_status::ready) {
          ++failed;
          continue;
        }
        if (!f.get().ok()) ++failed;
        if (fake.durable.load() < w) ++uncovered;
      }
    });
  for (auto& t : threads) t.join();
  ASSERT_TRUE(done.wait_for_count(kAsyncThreads * kEach / 2));
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(uncovered.load(), 0);
  EXPECT_EQ(fake.max_in_flight.load(), 1);
  EXPECT_EQ(c.requests(), std::uint64_t{kSync + kAsyncThreads} * kEach);
  EXPECT_LT(c.device_flushes(), c.requests());
}

// A synchronous caller whose own ticket is covered must return, not keep
// flushing for asynchronous requests that keep arriving (here a callback that
// re-arms itself, like a periodic background persist). The helper thread
// exists for those.
//
// Regression: lead() used to extend a synchronous leader's target to every
// pending async ticket after each round, so while async requests kept
// arriving during each round flush() never returned (21 device flushes on the
// caller's thread here instead of 1).
TEST(FlushCoalescer, SyncLeaderIsNotHeldHostageByAsyncRequests) {
  Gate gate;
  std::mutex ids_m;
  std::vector<std::thread::id> flush_threads;
  constexpr int kChain = 20;
  std::atomic<int> chained{0}, chain_failed{0};
  Countdown chain_done;
  std::function<void(Result<void>)> link;
  FlushCoalescer c([&]() -> Result<void> {
    bool first;
    {
      std::lock_guard lk(ids_m);
      first = flush_threads.empty();
      flush_threads.push_back(std::this_thread::get_id());
    }
    if (first && !gate.wait()) return flush_failed("gate never opened");
    return ok();
  });
  link = [&](Result<void> r) {
    if (!r.ok()) ++chain_failed;
    if (++chained < kChain)
      queue(c, link);
    else
      chain_done.hit();
  };
  std::thread::id sync_id;
  Result<void> rs;
  std::thread s;
  Cleanup cleanup([&] {
    gate.open();
    if (s.joinable()) s.join();
  });
  s = std::thread([&] {
    sync_id = std::this_thread::get_id();
    rs = c.flush();
  });
  ASSERT_TRUE(eventually([&] {
    std::lock_guard lk(ids_m);
    return flush_threads.size() == 1;
  }));
  queue(c, link);  // arrives during round 1: needs round 2, whose callback asks again, ...
  gate.open();
  s.join();
  ASSERT_TRUE(chain_done.wait_for_count(1)) << chained.load() << " links ran";
  EXPECT_TRUE(rs.ok());
  EXPECT_EQ(chain_failed.load(), 0);
  int on_sync_thread = 0;
  {
    std::lock_guard lk(ids_m);
    for (const auto& id : flush_threads) on_sync_thread += id == sync_id;
  }
  EXPECT_LE(on_sync_thread, 2) << "flush() ran " << on_sync_thread
                               << " device flushes for asynchronous requests before returning";
}

// ------------------------------------------------------------------ destruction

// Destroying the coalescer right after queueing async requests must not hang
// or crash, and every callback runs exactly once: with the flush's result if
// it was issued, else with Errc::broken. (Whether the helper thread got to
// them first is a race; over the rounds both outcomes usually occur.)
TEST(FlushCoalescer, DestructorWithPendingAsyncRequests) {
  int rounds_with_unserved = 0;
  for (int round = 0; round < 50; ++round) {
    SCOPED_TRACE(round);
    constexpr int kAsync = 16;
    std::vector<std::atomic<int>> hits(kAsync);
    std::atomic<int> bad{0};
    FakeFlush fake;
    fake.work = 100us;
    auto c = std::make_unique<FlushCoalescer>(fake.fn());
    std::atomic<int> unserved{0};
    for (int i = 0; i < kAsync; ++i)
      queue(*c, [&, i](Result<void> r) {
        ++hits[i];
        if (!r.ok() && r.error().code() == Errc::broken)
          ++unserved;
        else if (!r.ok())
          ++bad;
      });
    {
      Watchdog watchdog(5s, "~FlushCoalescer with pending requests");
      c.reset();  // on this thread, racing the helper thread's start
    }
    for (int i = 0; i < kAsync; ++i) EXPECT_EQ(hits[i].load(), 1) << "callback " << i;
    EXPECT_EQ(bad.load(), 0);
    rounds_with_unserved += unserved.load() > 0;
  }
  std::printf("[          ] %d of 50 rounds destroyed the coalescer with requests unserved\n",
              rounds_with_unserved);
}

// Destruction while the helper thread is inside a (slow) flush, with more
// requests queued behind it: waits for that flush, still answers everybody.
TEST(FlushCoalescer, DestructorDuringARunningFlush) {
  Gate gate;
  std::atomic<int> calls{0};
  std::vector<std::optional<Result<void>>> results(3);
  std::atomic<int> callbacks{0};
  auto cb = [&](int i) {
    return [&, i](Result<void> r) {
      results[i] = std::move(r);
      ++callbacks;
    };
  };
  std::thread opener;
  auto c = std::make_unique<FlushCoalescer>([&]() -> Result<void> {
    if (++calls == 1 && !gate.wait()) return flush_failed("gate never opened");
    return ok();
  });
  Cleanup cleanup([&] {
    gate.open();
    if (opener.joinable()) opener.join();
  });
  queue(*c, cb(0));
  ASSERT_TRUE(eventually([&] { return calls.load() == 1; }));
  queue(*c, cb(1));
  auto fut = c->flush_future();
  queue(*c, cb(2));
  opener = std::thread([&] {
    std::this_thread::sleep_for(
        5ms);  // widens the window: the destructor likely waits (either order is legal)
    gate.open();
  });
  {
    Watchdog watchdog(5s, "~FlushCoalescer during a flush");
    c.reset();
  }
  opener.join();
  EXPECT_EQ(callbacks.load(), 3);
  ASSERT_TRUE(results[0].has_value());
  EXPECT_TRUE(results[0]->ok()) << "the running flush covered the first request";
  for (int i = 1; i < 3; ++i) {
    ASSERT_TRUE(results[i].has_value()) << i;
    if (!results[i]->ok()) {
      EXPECT_EQ(results[i]->error().code(), Errc::broken) << results[i]->error().message();
    }
  }
  ASSERT_EQ(fut.wait_for(0s), std::future_status::ready) << "a future left unanswered by the destructor";
  auto r = fut.get();
  if (!r.ok()) {
    EXPECT_EQ(r.error().code(), Errc::broken) << r.error().message();
  }
}

}  // namespace
}  // namespace uvirtio::driver

namespace uvirtio::driver {
namespace {

// contended() tells a flushing leader whether anybody waits for the next
// flush (Pmem's hybrid completion stops spinning then).
TEST(FlushCoalescer, ContendedOnlyWhileSomebodyWaitsForTheNextFlush) {
  Gate gate;
  std::atomic<int> calls{0};
  FlushCoalescer c([&]() -> Result<void> {
    if (++calls == 1 && !gate.wait()) return Error(Errc::timeout, "fake", "flush", "gate never opened");
    return ok();
  });
  EXPECT_FALSE(c.contended());
  std::thread leader([&] { EXPECT_TRUE(c.flush().ok()); });
  ASSERT_TRUE(eventually([&] { return calls.load() == 1; }));
  EXPECT_FALSE(c.contended()) << "the running flush covers everybody so far";
  std::thread waiter([&] { EXPECT_TRUE(c.flush().ok()); });
  ASSERT_TRUE(eventually([&] { return c.requests() == 2; }));
  EXPECT_TRUE(c.contended()) << "a caller waits for the next flush";
  gate.open();
  leader.join();
  waiter.join();
  EXPECT_FALSE(c.contended());
  EXPECT_EQ(c.device_flushes(), 2u);
}

// An asynchronous request the running flush covers waits for nothing else:
// it is no more contention than a synchronous caller of that flush. (It
// counted as such while it sat in the pending list, so a helper-thread
// flush never spun in hybrid mode: every persist_async paid the interrupt
// wake-up.) A request queued behind the running flush is contention.
TEST(FlushCoalescer, AnAsyncRequestTheRunningFlushCoversIsNotContention) {
  Gate gate;
  std::atomic<int> calls{0};
  FlushCoalescer c([&]() -> Result<void> {
    if (++calls == 1 && !gate.wait()) return Error(Errc::timeout, "fake", "flush", "gate never opened");
    return ok();
  });
  Cleanup open_gate([&] { gate.open(); });
  Countdown done;
  queue(c, [&](Result<void> r) {
    EXPECT_TRUE(r.ok());
    done.hit();
  });
  ASSERT_TRUE(eventually([&] { return calls.load() == 1; }));
  EXPECT_FALSE(c.contended()) << "the running flush covers the only request";
  queue(c, [&](Result<void> r) {
    EXPECT_TRUE(r.ok());
    done.hit();
  });
  EXPECT_TRUE(c.contended()) << "a request waits for the next flush";
  gate.open();
  ASSERT_TRUE(done.wait_for_count(2));
  EXPECT_FALSE(c.contended());
}

}  // namespace
}  // namespace uvirtio::driver

namespace uvirtio::driver {
namespace {

// Group commit, step by step. A's flush (round 1) is held on a gate while B
// and C ask, so round 2 covers B and C together. Then B asks again at once
// and C only `c_delay` later: with gathering, B's flush waits for C and
// round 3 covers both; without, round 3 covers B alone and C needs round 4.
// Every flush takes `work`, so the wait may be up to half of that.
struct GatherRun {
  std::uint64_t flushes = 0;
  std::chrono::milliseconds b_third_call{0};  // how long B's second flush() took
};

GatherRun run_gather(std::chrono::nanoseconds limit, std::chrono::milliseconds c_delay,
                     std::chrono::milliseconds work = 60ms) {
  Gate gate;
  FakeFlush fake;
  fake.first_gate = &gate;
  fake.work = work;
  FlushCoalescer c(fake.fn());
  c.set_gather_limit(limit);
  GatherRun out;
  std::thread a([&] { EXPECT_TRUE(c.flush().ok()); });
  EXPECT_TRUE(eventually([&] { return fake.calls.load() == 1; }));
  std::atomic<bool> b_back{false};
  std::thread b([&] {
    EXPECT_TRUE(c.flush().ok());  // round 2, with C
    b_back = true;
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_TRUE(c.flush().ok());  // round 3
    out.b_third_call =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  });
  std::thread cc([&] {
    EXPECT_TRUE(c.flush().ok());  // round 2, with B
    EXPECT_TRUE(eventually([&] { return b_back.load(); }));
    std::this_thread::sleep_for(c_delay);
    EXPECT_TRUE(c.flush().ok());  // round 3 if gathered, else 4
  });
  EXPECT_TRUE(eventually([&] { return c.requests() == 3; }));
  gate.open();
  a.join();
  b.join();
  cc.join();
  out.flushes = c.device_flushes();
  return out;
}

TEST(FlushCoalescer, GroupCommitWaitsForTheCallersOfTheLastRound) {
  const GatherRun on = run_gather(500ms, 5ms);
  EXPECT_EQ(on.flushes, 3u) << "B's flush should have waited for C (5 ms behind) and covered both";
  const GatherRun off = run_gather(0ns, 5ms);
  EXPECT_EQ(off.flushes, 4u) << "without gathering C needs a flush of its own";
}

TEST(FlushCoalescer, GroupCommitWaitIsBoundedByHalfAFlushAndTheLimit) {
  // Flushes of 200 ms; C comes back 400 ms late. B's flush must not wait
  // for it beyond half a flush (100 ms) with a 1 s limit, nor beyond a 5 ms
  // limit: B's call then takes about 300 ms and 205 ms.
  const GatherRun half = run_gather(1s, 400ms, 200ms);
  EXPECT_EQ(half.flushes, 4u) << "waited for C beyond half a flush";
  EXPECT_LT(half.b_third_call, 200ms + 100ms + 50ms);
  const GatherRun limited = run_gather(5ms, 400ms, 200ms);
  EXPECT_EQ(limited.flushes, 4u);
  EXPECT_LT(limited.b_third_call, 200ms + 5ms + 50ms) << "waited longer than the limit";
}

}  // namespace
}  // namespace uvirtio::driver
