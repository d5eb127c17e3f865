// Shared pieces of the fuzz targets: a trap that works without gtest, and a
// reader that turns the fuzzer's bytes into little-endian integers (zeros
// once the input runs out, so every input is a complete script).
#pragma once

#include <cstddef>
#include <cstdint>

#define CHECK(c)                \
  do {                          \
    if (!(c)) __builtin_trap(); \
  } while (0)

namespace uvirtio::fuzz {

struct Reader {
  const std::uint8_t* p;
  std::size_t n;
  bool empty() const { return n == 0; }
  std::uint8_t u8() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  std::uint16_t u16() { return static_cast<std::uint16_t>(u8() | (u8() << 8)); }
  std::uint32_t u32() {
    return static_cast<std::uint32_t>(u16()) | (static_cast<std::uint32_t>(u16()) << 16);
  }
  std::uint64_t u64() {
    return static_cast<std::uint64_t>(u32()) | (static_cast<std::uint64_t>(u32()) << 32);
  }
};

}  // namespace uvirtio::fuzz
