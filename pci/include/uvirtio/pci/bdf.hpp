// PCI addresses (domain:bus:device.function) as users type them and sysfs names them.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "uvirtio/base/result.hpp"

namespace uvirtio::pci {

struct Bdf {
  std::uint16_t domain = 0;
  std::uint8_t bus = 0;
  std::uint8_t device = 0;    // 0..31
  std::uint8_t function = 0;  // 0..7

  // Accepts "DDDD:BB:DD.F" or "BB:DD.F" (hex, case-insensitive).
  static Result<Bdf> parse(std::string_view text);
  // Canonical sysfs form, "0000:00:03.0".
  std::string str() const;
  friend bool operator==(const Bdf&, const Bdf&) = default;
};

}  // namespace uvirtio::pci
