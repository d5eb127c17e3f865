// Baselines shared by the uvirtio-bench measurements (bench_rings.cpp,
// bench_channel.cpp): the two numbers every ring or channel figure is put
// next to, measured in the same run because the vCPUs here move around.
//   - cache_line_round_trip_ns: the floor of any round trip through memory;
//   - bare_ring_msgs_per_s: the ceiling of a ring of 64-byte messages.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "uvirtio/base/barrier.hpp"

namespace uvirtio::apps {

using BenchClock = std::chrono::steady_clock;

// The flag that ends a measurement thread's loop, which reads it on every
// round: on lines of its own, so that read is not a miss each time the
// other thread writes its own locals next to it on the stack.
struct alignas(128) StopFlag {
  std::atomic<bool> set{false};
  bool raised() const noexcept { return set.load(std::memory_order_relaxed); }
  void raise() noexcept { set.store(true, std::memory_order_relaxed); }
};
static_assert(sizeof(StopFlag) == 128);

// Nanoseconds per cache-line round trip between two threads: one writes an
// odd value into a shared word, the other answers with the next even one.
inline double cache_line_round_trip_ns(double seconds) {
  alignas(64) std::atomic<std::uint64_t> ping{0};
  StopFlag stop;
  std::thread other([&] {
    std::uint64_t seen = 0;
    while (!stop.raised()) {
      const std::uint64_t v = ping.load(std::memory_order_acquire);
      if (v != seen && (v & 1)) {
        ping.store(v + 1, std::memory_order_release);
        seen = v + 1;
      } else {
        cpu_relax();
      }
    }
  });
  std::uint64_t trips = 0;
  const auto t0 = BenchClock::now();
  const auto until =
      t0 + std::chrono::duration_cast<BenchClock::duration>(std::chrono::duration<double>(seconds));
  std::uint64_t v = 0;
  while (BenchClock::now() < until) {
    for (int i = 0; i < 1000; ++i) {
      ping.store(v + 1, std::memory_order_release);
      while (ping.load(std::memory_order_acquire) != v + 2) cpu_relax();
      v += 2;
      ++trips;
    }
  }
  const double ns = std::chrono::duration<double, std::nano>(BenchClock::now() - t0).count();
  stop.raise();
  other.join();
  return ns / static_cast<double>(trips);
}

// Round trip of a 64-byte message through two bare SPSC rings of 64-byte
// slots between two threads (one ring each way, no validation, no framing):
// the responder copies each message it sees into the other ring. The
// polled round trip's ceiling, next to the cache line's floor.
//   seq_in_slot false: the producer publishes a tail index on a line of its
//     own (as bare_ring_msgs_per_s), so each way moves the index line and
//     the slot's line;
//   seq_in_slot true: the slot's first 8 bytes carry the sequence number and
//     56 bytes the message, so each way moves one line.
inline double bare_ring_round_trip_ns(double seconds, bool seq_in_slot) {
  constexpr std::size_t kSlots = 64;
  struct alignas(64) Slot {
    std::uint8_t bytes[64];
  };
  struct Ring {
    Slot slots[kSlots];
    alignas(64) std::atomic<std::uint64_t> tail{0};
  };
  auto there = std::make_unique<Ring>(), back = std::make_unique<Ring>();
  const std::size_t skip = seq_in_slot ? 8 : 0, len = 64 - skip;
  auto seq = [](Slot& s) {
    return std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(s.bytes));
  };
  auto publish = [&](Ring& r, std::uint64_t n) {
    if (seq_in_slot)
      seq(r.slots[(n - 1) % kSlots]).store(n, std::memory_order_release);
    else
      r.tail.store(n, std::memory_order_release);
  };
  auto arrived = [&](Ring& r, std::uint64_t n) {
    return seq_in_slot ? seq(r.slots[(n - 1) % kSlots]).load(std::memory_order_acquire) == n
                       : r.tail.load(std::memory_order_acquire) == n;
  };
  StopFlag stop;
  std::thread responder([&] {
    std::uint8_t msg[64];
    for (std::uint64_t n = 1; !stop.raised();) {
      if (!arrived(*there, n)) {
        cpu_relax();
        continue;
      }
      std::memcpy(msg, there->slots[(n - 1) % kSlots].bytes + skip, len);
      std::memcpy(back->slots[(n - 1) % kSlots].bytes + skip, msg, len);
      publish(*back, n++);
    }
  });
  std::uint8_t msg[64];
  std::memset(msg, 0x5a, sizeof msg);
  std::uint64_t n = 0;
  const auto t0 = BenchClock::now();
  const auto until =
      t0 + std::chrono::duration_cast<BenchClock::duration>(std::chrono::duration<double>(seconds));
  while (BenchClock::now() < until) {
    for (int i = 0; i < 1000; ++i) {
      ++n;
      std::memcpy(there->slots[(n - 1) % kSlots].bytes + skip, msg, len);
      publish(*there, n);
      while (!arrived(*back, n)) cpu_relax();
      std::memcpy(msg, back->slots[(n - 1) % kSlots].bytes + skip, len);
    }
  }
  const double ns = std::chrono::duration<double, std::nano>(BenchClock::now() - t0).count();
  stop.raise();
  responder.join();
  return ns / static_cast<double>(n);
}

// Messages per second through a bare SPSC ring of 64-byte slots between two
// threads: the producer fills a slot and publishes its index for each
// message, the consumer reads one byte per slot and publishes its index per
// batch. No validation, no framing.
inline double bare_ring_msgs_per_s(double seconds) {
  constexpr std::size_t kSlots = 1024;
  struct alignas(64) Slot {
    std::uint8_t bytes[64];
  };
  std::vector<Slot> slots(kSlots);
  alignas(64) std::atomic<std::uint64_t> head{0};  // consumer position
  alignas(64) std::atomic<std::uint64_t> tail{0};  // producer position
  StopFlag stop;
  alignas(64) std::uint64_t consumed = 0;
  std::thread consumer([&] {
    std::uint64_t h = 0, checksum = 0;  // the consumer's own, not on the producer's stack
    while (!stop.raised()) {
      const std::uint64_t t = tail.load(std::memory_order_acquire);
      if (t == h) {
        cpu_relax();
        continue;
      }
      for (; h != t; ++h) checksum += slots[h % kSlots].bytes[0];
      head.store(h, std::memory_order_release);
    }
    consumed = h;
    asm volatile("" : : "r"(checksum));  // the bytes read are used
  });
  const auto t0 = BenchClock::now();
  const auto until =
      t0 + std::chrono::duration_cast<BenchClock::duration>(std::chrono::duration<double>(seconds));
  std::uint64_t t = 0;
  while (BenchClock::now() < until) {
    for (int i = 0; i < 4096; ++i) {
      while (t - head.load(std::memory_order_acquire) >= kSlots) cpu_relax();
      std::memset(slots[t % kSlots].bytes, static_cast<int>(t), 64);
      tail.store(++t, std::memory_order_release);
    }
  }
  while (head.load(std::memory_order_acquire) != t) cpu_relax();
  const double secs = std::chrono::duration<double>(BenchClock::now() - t0).count();
  stop.raise();
  consumer.join();
  return static_cast<double>(consumed) / secs;
}

}  // namespace uvirtio::apps
