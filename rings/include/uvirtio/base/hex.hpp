// "0x1f": how errors and logs print addresses, offsets and feature bits.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace uvirtio {

inline std::string hex(std::uint64_t v) {
  char b[24];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

}  // namespace uvirtio
