// Single-width volatile MMIO access.
//
// Device registers are read and written exactly once per access with the width
// the spec gives (virtio spec 1.2, 4.1.3.1: the driver accesses each field of
// the common config with its own width). Never memcpy device registers: the
// compiler may split or merge such copies.
#pragma once

#include <cstdint>

namespace uvirtio::mmio {

template <class T>
inline T read(const volatile void* base, std::uint64_t off) noexcept {
  return *reinterpret_cast<const volatile T*>(static_cast<const volatile std::uint8_t*>(base) + off);
}

template <class T>
inline void write(volatile void* base, std::uint64_t off, T v) noexcept {
  *reinterpret_cast<volatile T*>(static_cast<volatile std::uint8_t*>(base) + off) = v;
}

}  // namespace uvirtio::mmio
