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
#include <thread>
#include <vector>

#include "uvirtio/base/barrier.hpp"

namespace uvirtio::apps {

using BenchClock = std::chrono::steady_clock;

// Nanoseconds per cache-line round trip between two threads: one writes an
// odd value into a shared word, the other answers with the next even one.
inline double cache_line_round_trip_ns(double seconds) {
  alignas(64) std::atomic<std::uint64_t> ping{0};
  std::atomic<bool> stop{false};
  std::thread other([&] {
    std::uint64_t seen = 0;
    while (!stop.load(std::memory_order_relaxed)) {
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
  stop = true;
  other.join();
  return ns / static_cast<double>(trips);
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
  std::atomic<bool> stop{false};
  std::uint64_t consumed = 0, checksum = 0;
  std::thread consumer([&] {
    std::uint64_t h = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      const std::uint64_t t = tail.load(std::memory_order_acquire);
      if (t == h) {
        cpu_relax();
        continue;
      }
      for (; h != t; ++h) checksum += slots[h % kSlots].bytes[0];
      head.store(h, std::memory_order_release);
    }
    consumed = h;
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
  stop = true;
  consumer.join();
  (void)checksum;
  return static_cast<double>(consumed) / secs;
}

}  // namespace uvirtio::apps
