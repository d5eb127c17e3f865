// Memory barriers named for what they order.
//
// Rings shared with a device need three orderings (virtio spec 1.2, 2.7.13 and
// 2.8.21): descriptors before the index/flag that publishes them, the used
// index before the used entries it covers, and our index publication before
// reading the device's event-suppression field. Each helper says which one it
// provides; callers pick by purpose, not by fence strength. Memory shared with
// a device behind an IOMMU is ordinary cacheable memory on x86 and arm64, so
// thread fences are the right strength (Linux uses virt_*mb for the same
// reason when the device is a hypervisor).
#pragma once

#include <atomic>

namespace uvirtio {

// Makes descriptor writes visible before the index or flag that publishes them.
inline void barrier_publish() noexcept { std::atomic_thread_fence(std::memory_order_release); }

// Orders a load of a device-written index before the loads of the entries it
// covers.
inline void barrier_consume() noexcept { std::atomic_thread_fence(std::memory_order_acquire); }

// Orders our store of an index before our load of the device's event
// suppression field (store->load: needs a full fence).
inline void barrier_store_load() noexcept { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Tells the CPU we are spinning (saves power, helps the sibling hyperthread).
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Hints that another core will read the line at `p` next: CLDEMOTE moves it
// from our core's caches to the shared last-level cache, so the reader's
// miss is served there instead of by a snoop of our core. CPUs without it
// execute the encoding as a NOP (it sits in the reserved-NOP space, 0F 1C);
// a hint either way, never needed for correctness.
inline void cache_line_demote(const void* p) noexcept {
#if defined(__x86_64__)
  asm volatile("cldemote %0" : : "m"(*static_cast<const char*>(p)) : "memory");
#else
  (void)p;
#endif
}

}  // namespace uvirtio
