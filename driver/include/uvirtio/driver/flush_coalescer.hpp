// FlushCoalescer: many threads ask for a durable point, one device flush at a
// time serves them all.
//
// Each caller takes a ticket after its writes are written back from the CPU
// caches. A device flush that *starts* after a ticket was taken covers that
// ticket: the host's fsync then sees every write made before it. So when a
// flush is already running, a new caller waits for it to end and then joins
// the next one, which covers everybody who arrived in the meantime. At most
// one device flush is ever in flight, which also suits QEMU's virtio-pmem (it
// takes one request per notification).
//
// The caller whose ticket is not yet covered and who finds no flush running
// becomes the leader and issues it on its own thread (no hand-off latency).
// When the previous flush covered several callers, the leader first waits
// (group commit) until as many have asked again, for at most half the
// average flush time and at most the gather limit: they were all woken by
// that flush and are on their way back, and one flush for all of them beats
// one for the fastest plus another for the rest.
// Asynchronous requests are served by the current leader or, when nobody is
// flushing, by a helper thread started on first use.
//
//   FlushCoalescer c([&] { return device_flush(); });
//   auto r = c.flush();                 // blocks until a covering flush ended
//   c.flush_async([](Result<void> r) { ... });
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "uvirtio/base/result.hpp"

namespace uvirtio::driver {

class FlushCoalescer {
 public:
  using FlushFn = std::function<Result<void>()>;
  using Callback = std::function<void(Result<void>)>;

  // `device` names the device in the errors the coalescer makes itself.
  explicit FlushCoalescer(FlushFn fn, std::string device = {})
      : fn_(std::move(fn)), device_(std::move(device)) {}
  ~FlushCoalescer();
  FlushCoalescer(const FlushCoalescer&) = delete;
  FlushCoalescer& operator=(const FlushCoalescer&) = delete;

  // Returns once a device flush that started after this call has ended, with
  // that flush's result. From inside a completion callback: invalid_argument
  // (that thread may be the one that has to issue the next flush).
  Result<void> flush();
  // The same without blocking: `done` (not empty: invalid_argument) runs on
  // the thread that completed the covering flush: the helper thread, or the
  // thread of a flush() caller that issued it. Keep it short; it may call
  // flush_async() but not flush(). It must not throw: one that does ends
  // the program (std::terminate). Errc::io when the helper thread cannot
  // be started (the request is then not queued).
  Result<void> flush_async(Callback done);
  // Stops: waits for a running flush, fails the async requests whose flush
  // had not started (their callbacks run before this returns). The owner
  // calls it before tearing down what the flush function or the callbacks
  // use; the destructor calls it too.
  void shutdown();
  std::future<Result<void>> flush_future();

  // The group-commit wait's upper bound (default 500 us; 0 turns it off).
  void set_gather_limit(std::chrono::nanoseconds limit);

  std::uint64_t requests() const;  // flush() + flush_async() calls
  // True when callers are waiting for a flush other than the running one
  // (the leader may then prefer to sleep rather than spin).
  bool contended() const;
  std::uint64_t device_flushes() const;  // calls of the flush function

 private:
  Result<void> call_flush();
  static void run_callback(Callback& done, Result<void> r) noexcept;
  struct Failure {
    std::uint64_t from, to;  // tickets (from, to] got this error
    Error error;
  };
  struct Pending {
    std::uint64_t ticket;
    Callback done;
  };
  // Runs flushes until every ticket <= want is covered (and, with
  // serve_async, every async ticket that arrives meanwhile). Called with lk
  // held and leader_ false; returns with lk held.
  void lead(std::unique_lock<std::mutex>& lk, std::uint64_t want, bool serve_async);
  Result<void> result_for(std::uint64_t ticket) const;
  void wake_gatherer();  // with m_ held: a new ticket may end the group-commit wait
  // Group commit: waits (lk held, leader_ set) for the callers of the last
  // round to ask again, within the limits above.
  void gather(std::unique_lock<std::mutex>& lk);
  void worker_loop();

  FlushFn fn_;
  std::string device_;
  mutable std::mutex m_;
  std::condition_variable cv_;
  std::uint64_t next_ticket_ = 0;  // last ticket handed out
  std::uint64_t done_ = 0;         // every ticket <= done_ is covered
  std::uint64_t covering_ = 0;     // tickets the running flush covers
  bool leader_ = false;
  std::uint64_t flushes_ = 0;
  // Group commit (gather()): how many callers the last flush covered, the
  // flushes' moving average duration, the longest a leader waits, and the
  // leader's wake-up when a caller arrives while it waits.
  std::uint64_t last_round_ = 0;
  std::chrono::nanoseconds flush_avg_{0};
  std::chrono::nanoseconds gather_limit_{std::chrono::microseconds(500)};
  bool gathering_ = false;
  std::condition_variable gather_cv_;
  std::deque<Failure> failures_;  // recent failed rounds (bounded)
  std::uint64_t forgotten_upto_ = 0;
  std::vector<Pending> pending_;  // asynchronous waiters
  std::thread worker_;
  bool stop_ = false;
};

}  // namespace uvirtio::driver
