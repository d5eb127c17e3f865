// Flush coalescing (see flush_coalescer.hpp).
#include "uvirtio/driver/flush_coalescer.hpp"

#include <algorithm>
#include <exception>
#include <system_error>

#include "uvirtio/base/deadline.hpp"

namespace uvirtio::driver {
namespace {
constexpr std::size_t kFailureMemory = 1024;  // failed rounds remembered for late waiters

// Set while this thread runs completion callbacks: flush() from one would
// wait for a flush that only this thread could issue.
thread_local bool t_in_callback = false;

// Nests: a callback may shut down another coalescer, which runs that one's
// callbacks on this thread; when they end, this thread is still inside its
// own callback.
struct InCallback {
  InCallback() : outer_(t_in_callback) { t_in_callback = true; }
  ~InCallback() { t_in_callback = outer_; }
  InCallback(const InCallback&) = delete;
  InCallback& operator=(const InCallback&) = delete;

 private:
  bool outer_;
};

}  // namespace

FlushCoalescer::~FlushCoalescer() { shutdown(); }

void FlushCoalescer::shutdown() {
  {
    std::unique_lock lk(m_);
    stop_ = true;
  }
  cv_.notify_all();
  gather_cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  // Async waiters that nobody served: tell them.
  std::vector<Pending> left;
  {
    std::unique_lock lk(m_);
    left.swap(pending_);
  }
  InCallback in;
  for (auto& p : left)
    p.done(Error(Errc::broken, device_, "flush", "the device was closed before the flush was issued"));
}

Result<void> FlushCoalescer::result_for(std::uint64_t ticket) const {
  for (const auto& f : failures_)
    if (ticket > f.from && ticket <= f.to) return f.error;
  // Conservative: a ticket older than the failures we still remember may
  // have been in a forgotten failed round, so never report it durable.
  if (ticket <= forgotten_upto_)
    return Error(Errc::broken, device_, "flush",
                 "the result is no longer known (over 1024 failed flushes since)");
  return ok();
}

// The flush function reports failure as a Result; should it throw all the
// same (an allocation), the round still ends: an exception leaving lead()
// would leave leader_ set and every later caller waiting for ever.
Result<void> FlushCoalescer::call_flush() {
  try {
    return fn_();
  } catch (const std::exception& e) {
    return Error(Errc::io, device_, "flush", std::string("the flush function threw: ") + e.what());
  }
}

// Completion callbacks must not throw (flush_async()); one that does ends
// the program here, whichever thread runs it, instead of unwinding through
// lead() with the round half done.
void FlushCoalescer::run_callback(Callback& done, Result<void> r) noexcept { done(std::move(r)); }

void FlushCoalescer::lead(std::unique_lock<std::mutex>& lk, std::uint64_t want, bool serve_async) {
  leader_ = true;
  while (done_ < want) {
    gather(lk);
    // Everything ticketed so far is covered by a flush that starts now.
    const std::uint64_t covered = next_ticket_;
    covering_ = covered;
    lk.unlock();
    const auto t0 = std::chrono::steady_clock::now();
    Result<void> r = call_flush();
    const auto took = std::chrono::steady_clock::now() - t0;
    lk.lock();
    ++flushes_;
    flush_avg_ = flush_avg_.count() == 0 ? took : (flush_avg_ * 7 + took) / 8;
    last_round_ = covered - done_;
    if (!r) {
      failures_.push_back(Failure{done_, covered, r.error()});
      if (failures_.size() > kFailureMemory) {
        forgotten_upto_ = failures_.front().to;
        failures_.pop_front();
      }
    }
    done_ = covered;
    // Hand completed async waiters their result outside the lock.
    std::vector<Pending> ready;
    auto split = std::partition(pending_.begin(), pending_.end(),
                                [&](const Pending& p) { return p.ticket > covered; });
    ready.assign(std::make_move_iterator(split), std::make_move_iterator(pending_.end()));
    pending_.erase(split, pending_.end());
    cv_.notify_all();
    if (!ready.empty()) {
      lk.unlock();
      {
        InCallback in;
        for (auto& p : ready) run_callback(p.done, r.ok() ? Result<void>() : Result<void>(r.error()));
      }
      lk.lock();
    }
    // The helper thread also serves async waiters that arrived meanwhile; a
    // synchronous caller returns as soon as its own ticket is covered (the
    // helper takes over what is left), so its latency stays bounded.
    if (serve_async)
      for (const auto& p : pending_) want = std::max(want, p.ticket);
  }
  leader_ = false;
  cv_.notify_all();
}

void FlushCoalescer::gather(std::unique_lock<std::mutex>& lk) {
  // Group commit: the last flush covered several callers, and they come
  // back once it woke them. Waiting a little for them (at most half a flush,
  // and at most the limit) lets the next flush cover them all, instead of
  // only the first to return while the rest wait a whole extra flush.
  if (last_round_ < 2 || gather_limit_.count() <= 0) return;
  const auto wait = std::min<std::chrono::nanoseconds>(gather_limit_, flush_avg_ / 2);
  const auto until = deadline_after(wait);
  gathering_ = true;
  while (next_ticket_ - done_ < last_round_ && !stop_)
    if (gather_cv_.wait_until(lk, until) == std::cv_status::timeout) break;
  gathering_ = false;
}

void FlushCoalescer::wake_gatherer() {
  // Only the ticket that completes the group ends the wait: waking the leader
  // for each arrival cost a context switch per caller (8 threads: 1.10-1.28x
  // the persists/s without those wake-ups, doc/benchmarks.md).
  if (gathering_ && next_ticket_ - done_ >= last_round_) gather_cv_.notify_one();
}

void FlushCoalescer::set_gather_limit(std::chrono::nanoseconds limit) {
  std::unique_lock lk(m_);
  gather_limit_ = limit;
}

Result<void> FlushCoalescer::flush() {
  if (t_in_callback)
    return Error(Errc::invalid_argument, device_, "flush",
                 "called from a completion callback (use the async call there)");
  std::unique_lock lk(m_);
  const std::uint64_t ticket = ++next_ticket_;
  wake_gatherer();
  for (;;) {
    if (done_ >= ticket) return result_for(ticket);
    if (!leader_) {
      lead(lk, ticket, false);
      continue;
    }
    cv_.wait(lk);
  }
}

Result<void> FlushCoalescer::flush_async(Callback done) {
  if (!done) return Error(Errc::invalid_argument, device_, "flush", "no completion callback");
  std::unique_lock lk(m_);
  if (stop_) return Error(Errc::broken, device_, "flush", "the device is being closed");
  const std::uint64_t ticket = ++next_ticket_;
  pending_.push_back(Pending{ticket, std::move(done)});
  wake_gatherer();
  if (!worker_.joinable()) {
    try {
      worker_ = std::thread([this] { worker_loop(); });
    } catch (const std::system_error& e) {
      // No helper thread: take the request back (the lock is held, so no
      // ticket was handed out after it) and say so, rather than throw
      // through the C API or leave a request nobody will serve.
      pending_.pop_back();
      --next_ticket_;
      return Error(Errc::io, device_, "flush", std::string("start the completion thread: ") + e.what());
    }
  }
  cv_.notify_all();
  return ok();
}

std::future<Result<void>> FlushCoalescer::flush_future() {
  auto promise = std::make_shared<std::promise<Result<void>>>();
  auto fut = promise->get_future();
  if (auto queued = flush_async([promise](Result<void> r) { promise->set_value(std::move(r)); }); !queued)
    promise->set_value(std::move(queued));
  return fut;
}

void FlushCoalescer::worker_loop() {
  std::unique_lock lk(m_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || (!leader_ && !pending_.empty()); });
    if (stop_) return;
    std::uint64_t want = 0;
    for (const auto& p : pending_) want = std::max(want, p.ticket);
    lead(lk, want, true);
  }
}

bool FlushCoalescer::contended() const {
  std::unique_lock lk(m_);
  // Tickets past those the running (or last) flush covers; every waiter,
  // async or not, has one. An async request the running flush covers is
  // still in pending_ but waits for nothing else.
  return next_ticket_ > covering_;
}

std::uint64_t FlushCoalescer::requests() const {
  std::unique_lock lk(m_);
  return next_ticket_;
}

std::uint64_t FlushCoalescer::device_flushes() const {
  std::unique_lock lk(m_);
  return flushes_;
}

}  // namespace uvirtio::driver
