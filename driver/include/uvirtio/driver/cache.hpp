// CPU cache write-back for persistence.
//
// Stores to a DAX mapping sit in the CPU caches until written back. Before a
// device flush can make data durable, each cache line of the range must be
// written back (x86: CLWB, else CLFLUSHOPT, else CLFLUSH, chosen once by
// CPUID) and the write-backs ordered with SFENCE. CLWB keeps the line cached;
// the other two evict it. Names follow PMDK: flush (write back, no fence),
// drain (fence).
#pragma once

#include <cstddef>

namespace uvirtio::driver::cache {

enum class Insn { clwb, clflushopt, clflush, none };

// The instruction in use on this CPU (detected once).
Insn instruction() noexcept;
const char* name(Insn insn) noexcept;
std::size_t line_size() noexcept;

// Writes back every cache line overlapping [addr, addr+len); no fence.
void flush(const void* addr, std::size_t len) noexcept;
// Orders the write-backs issued so far before later stores (SFENCE).
void drain() noexcept;

}  // namespace uvirtio::driver::cache
