// CPU cache write-back (see cache.hpp). Intel SDM vol. 2: CLWB, CLFLUSHOPT,
// CLFLUSH; CPUID.(EAX=7,ECX=0):EBX bit 24 CLWB, bit 23 CLFLUSHOPT;
// CPUID.01H:EDX bit 19 CLFSH, EBX[15:8] CLFLUSH line size in 8-byte units.
#include "uvirtio/driver/cache.hpp"

#include <atomic>
#include <cstdint>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace uvirtio::driver::cache {
namespace {

struct CpuInfo {
  Insn insn = Insn::none;
  std::size_t line = 64;
};

CpuInfo detect() noexcept {
  CpuInfo info;
#if defined(__x86_64__)
  unsigned a, b, c, d;
  if (__get_cpuid(1, &a, &b, &c, &d)) {
    if (d & (1u << 19)) {
      info.insn = Insn::clflush;
      const std::size_t line = ((b >> 8) & 0xff) * 8;
      // flush() masks addresses with line - 1 and steps by line: a size that
      // is not a power of two would skip lines, so keep the default then.
      if (line >= 32 && line <= 256 && (line & (line - 1)) == 0) info.line = line;
    }
  }
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    if (b & (1u << 24))
      info.insn = Insn::clwb;
    else if (b & (1u << 23))
      info.insn = Insn::clflushopt;
  }
#endif
  return info;
}

const CpuInfo& cpu() noexcept {
  static const CpuInfo info = detect();
  return info;
}

#if defined(__x86_64__)
// The instructions as raw bytes so no -m flags are needed: these run only
// after CPUID said they exist. Encodings: CLWB 66 0F AE /6, CLFLUSHOPT 66 0F
// AE /7, CLFLUSH 0F AE /7 (all with a memory operand in rdi here).
inline void clwb(const void* p) noexcept { asm volatile(".byte 0x66, 0x0f, 0xae, 0x37" ::"D"(p) : "memory"); }
inline void clflushopt(const void* p) noexcept {
  asm volatile(".byte 0x66, 0x0f, 0xae, 0x3f" ::"D"(p) : "memory");
}
inline void clflush(const void* p) noexcept { asm volatile("clflush (%0)" ::"r"(p) : "memory"); }
#endif

}  // namespace

Insn instruction() noexcept { return cpu().insn; }

const char* name(Insn insn) noexcept {
  switch (insn) {
    case Insn::clwb:
      return "clwb";
    case Insn::clflushopt:
      return "clflushopt";
    case Insn::clflush:
      return "clflush";
    case Insn::none:
      return "none";
  }
  return "none";
}

std::size_t line_size() noexcept { return cpu().line; }

void flush(const void* addr, std::size_t len) noexcept {
  if (len == 0) return;
  const CpuInfo& info = cpu();
  auto p = reinterpret_cast<std::uintptr_t>(addr) & ~(info.line - 1);
  const auto end = reinterpret_cast<std::uintptr_t>(addr) + len;
#if defined(__x86_64__)
  switch (info.insn) {
    case Insn::clwb:
      for (; p < end; p += info.line) clwb(reinterpret_cast<const void*>(p));
      return;
    case Insn::clflushopt:
      for (; p < end; p += info.line) clflushopt(reinterpret_cast<const void*>(p));
      return;
    case Insn::clflush:
      for (; p < end; p += info.line) clflush(reinterpret_cast<const void*>(p));
      return;
    case Insn::none:
      break;
  }
#endif
  (void)p;
  (void)end;
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

void drain() noexcept {
#if defined(__x86_64__)
  asm volatile("sfence" ::: "memory");
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

}  // namespace uvirtio::driver::cache
