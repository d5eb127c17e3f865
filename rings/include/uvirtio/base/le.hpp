// Little-endian fields for device-visible structures.
//
// Virtio 1.x structures are little-endian (virtio spec 1.2, 1.4). A Le<T>
// field keeps its storage private and converts on every access, so a
// structure read or written by a device can never be used in host order by
// mistake. Le<T> has the size and alignment of T, so device layouts built from
// it can be pinned with static_assert on size and offsetof.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>

namespace uvirtio {

template <class T>
constexpr T byteswap_if_big(T v) noexcept {
  static_assert(std::is_unsigned_v<T>);
  if constexpr (std::endian::native == std::endian::little || sizeof(T) == 1) {
    return v;
  } else if constexpr (sizeof(T) == 2) {
    return static_cast<T>(__builtin_bswap16(v));
  } else if constexpr (sizeof(T) == 4) {
    return static_cast<T>(__builtin_bswap32(v));
  } else {
    return static_cast<T>(__builtin_bswap64(v));
  }
}

template <class T>
class Le {
 public:
  constexpr Le() noexcept = default;
  constexpr T get() const noexcept { return byteswap_if_big(raw_); }
  constexpr void set(T v) noexcept { raw_ = byteswap_if_big(v); }
  // The stored bytes, for atomic access through std::atomic_ref.
  T& raw() noexcept { return raw_; }
  static constexpr T to_raw(T v) noexcept { return byteswap_if_big(v); }
  static constexpr T from_raw(T v) noexcept { return byteswap_if_big(v); }
  static constexpr Le of(T v) noexcept {
    Le l;
    l.set(v);
    return l;
  }

 private:
  T raw_{};
};

using le16 = Le<std::uint16_t>;
using le32 = Le<std::uint32_t>;
using le64 = Le<std::uint64_t>;

static_assert(sizeof(le16) == 2 && alignof(le16) == 2);
static_assert(sizeof(le32) == 4 && alignof(le32) == 4);
static_assert(sizeof(le64) == 8 && alignof(le64) == 8);
static_assert(std::is_trivially_copyable_v<le64>);

// Little-endian loads from an unaligned byte buffer (config-space snapshots).
inline std::uint16_t load_le16(const std::uint8_t* p) noexcept {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
inline std::uint32_t load_le32(const std::uint8_t* p) noexcept {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}
inline void store_le16(std::uint8_t* p, std::uint16_t v) noexcept {
  p[0] = static_cast<std::uint8_t>(v);
  p[1] = static_cast<std::uint8_t>(v >> 8);
}
inline void store_le32(std::uint8_t* p, std::uint32_t v) noexcept {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

}  // namespace uvirtio
