// Shared pieces of the fuzz targets: a trap that works without gtest, and a
// reader that turns the fuzzer's bytes into little-endian integers (zeros
// once the input runs out, so every input is a complete script).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

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

// Zeroed, 16-byte aligned memory standing for a ring area or a guest window.
struct Area {
  explicit Area(std::size_t bytes)
      : n(bytes), p(static_cast<std::uint8_t*>(::operator new (bytes, std::align_val_t{16}))) {
    std::memset(p, 0, n);
  }
  ~Area() { ::operator delete (p, std::align_val_t{16}); }
  Area(const Area&) = delete;
  Area& operator=(const Area&) = delete;
  std::vector<std::uint8_t> bytes() const { return std::vector<std::uint8_t>(p, p + n); }
  std::size_t n;
  std::uint8_t* p;
};

// The spans a device queue handed out are exactly the model's buffers (each
// with addr and len), in `window`, which the device sees at bus address
// `bus`; a zero-length buffer is an empty span.
template <class Span, class Buf>
void check_spans(const std::vector<Span>& got, const std::vector<Buf>& want, const std::uint8_t* window,
                 std::uint64_t bus) {
  CHECK(got.size() == want.size());
  for (std::size_t k = 0; k < got.size(); ++k) {
    if (want[k].len == 0) {
      CHECK(got[k].empty());
    } else {
      CHECK(got[k].data() == window + (want[k].addr - bus) && got[k].size() == want[k].len);
    }
  }
}

}  // namespace uvirtio::fuzz
