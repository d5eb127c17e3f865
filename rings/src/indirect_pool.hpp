// Internal to rings/: the checks SplitQueue and PackedQueue make on a pool
// for indirect descriptor tables (one table per ring slot, 16-byte
// descriptors in both layouts).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "uvirtio/base/result.hpp"

namespace uvirtio::rings::detail {

struct IndirectPoolRequest {
  const std::string& queue;
  bool broken;
  bool indirect;             // set_indirect(true, ...) was called
  std::size_t max_indirect;  // its limit
  std::size_t in_flight;
  std::uint16_t size;  // ring slots
  const void* va;
  std::uint64_t device_addr;
  std::size_t bytes;
};

// Entries per table (min(max_indirect, size): a chain is never longer than
// the queue, split 2.7.5.3.1 and packed 2.8.5), or why the pool is refused.
inline Result<std::size_t> check_indirect_pool(const IndirectPoolRequest& r) {
  constexpr std::size_t kDesc = 16;
  const char* op = "provide indirect pool";
  if (r.broken) return Error(Errc::broken, r.queue, op, "queue is broken by an earlier device error");
  if (!r.indirect || r.max_indirect < 2)
    return Error(Errc::invalid_argument, r.queue, op, "call set_indirect(true, n >= 2) first");
  if (r.va == nullptr || reinterpret_cast<std::uintptr_t>(r.va) % kDesc != 0)
    return Error(Errc::invalid_argument, r.queue, op, "pool pointer is null or not 16-byte aligned");
  if (r.in_flight != 0)
    return Error(Errc::busy, r.queue, op, std::to_string(r.in_flight) + " descriptors in flight");
  const std::size_t entries = std::min<std::size_t>(r.max_indirect, r.size);
  const std::size_t need = std::size_t{r.size} * entries * kDesc;  // <= 2^34: no overflow
  if (r.bytes < need)
    return Error(Errc::invalid_argument, r.queue, op,
                 "pool of " + std::to_string(r.bytes) + " bytes, need " + std::to_string(need));
  if (r.device_addr > std::numeric_limits<std::uint64_t>::max() - need)
    return Error(Errc::invalid_argument, r.queue, op, "pool device address range wraps");
  return entries;
}

}  // namespace uvirtio::rings::detail
