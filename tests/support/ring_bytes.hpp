// Little-endian loads and stores at byte addresses of ring memory, and
// alignment, for tests that lay out rings by hand or play the other side.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "uvirtio/base/le.hpp"

namespace uvirtio::test {

inline std::size_t align_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }
inline std::uint16_t load16(const std::uint8_t* p) {
  std::uint16_t v;
  std::memcpy(&v, p, 2);
  return le16::from_raw(v);
}
inline void store16(std::uint8_t* p, std::uint16_t v) {
  v = le16::to_raw(v);
  std::memcpy(p, &v, 2);
}
inline void store32(std::uint8_t* p, std::uint32_t v) {
  v = le32::to_raw(v);
  std::memcpy(p, &v, 4);
}

}  // namespace uvirtio::test
