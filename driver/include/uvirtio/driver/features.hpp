// Feature bits and negotiation (virtio spec 1.2, 2.2 and 6).
//
// Negotiation is a pure function: from what the device offers and what the
// driver supports and requires, it computes the set the driver writes, or
// explains why the device is unusable. The transport then writes that set,
// sets FEATURES_OK and reads the status back (3.1.1 step 6).
#pragma once

#include <cstdint>
#include <string>

#include "uvirtio/base/result.hpp"

namespace uvirtio::driver {

namespace feature {
inline constexpr unsigned kIndirectDesc = 28;
inline constexpr unsigned kEventIdx = 29;
inline constexpr unsigned kVersion1 = 32;
inline constexpr unsigned kAccessPlatform = 33;
inline constexpr unsigned kRingPacked = 34;
inline constexpr unsigned kInOrder = 35;
inline constexpr unsigned kOrderPlatform = 36;
inline constexpr unsigned kSrIov = 37;
inline constexpr unsigned kNotificationData = 38;
inline constexpr unsigned kNotifConfigData = 39;
inline constexpr unsigned kRingReset = 40;
}  // namespace feature

class FeatureSet {
 public:
  constexpr FeatureSet() = default;
  constexpr explicit FeatureSet(std::uint64_t bits) : bits_(bits) {}
  static constexpr FeatureSet of(std::initializer_list<unsigned> bits) {
    std::uint64_t b = 0;
    for (unsigned x : bits) b |= 1ull << x;
    return FeatureSet(b);
  }
  constexpr std::uint64_t bits() const { return bits_; }
  constexpr bool has(unsigned bit) const { return bit < 64 && ((bits_ >> bit) & 1); }
  constexpr FeatureSet with(unsigned bit) const { return FeatureSet(bits_ | (1ull << bit)); }
  constexpr FeatureSet without(unsigned bit) const { return FeatureSet(bits_ & ~(1ull << bit)); }
  constexpr FeatureSet operator&(FeatureSet o) const { return FeatureSet(bits_ & o.bits_); }
  constexpr FeatureSet operator|(FeatureSet o) const { return FeatureSet(bits_ | o.bits_); }
  constexpr bool contains(FeatureSet o) const { return (bits_ & o.bits_) == o.bits_; }
  friend constexpr bool operator==(FeatureSet, FeatureSet) = default;
  // "VERSION_1 ACCESS_PLATFORM bit3 ..." (device-specific bits as bitN, or
  // by the name `device_bit_name` gives them; it returns nullptr for a bit
  // it does not know).
  using BitName = const char* (*)(unsigned bit);
  std::string describe(BitName device_bit_name = nullptr) const;

 private:
  std::uint64_t bits_ = 0;
};

struct FeaturePolicy {
  FeatureSet supported;  // bits the driver understands (device-specific and transport)
  FeatureSet required;   // bits the driver cannot work without
};

// virtio spec 1.2, 3.1.1 and 6: VERSION_1 must be offered (a device without it
// is legacy-only: refused); ACCESS_PLATFORM must be accepted when offered
// (the device sits behind an IOMMU and fails FEATURES_OK otherwise); every
// required bit must be offered. The result is offered & supported.
Result<FeatureSet> negotiate(FeatureSet offered, const FeaturePolicy& policy, const std::string& device);

}  // namespace uvirtio::driver
