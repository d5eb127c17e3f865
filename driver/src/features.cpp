// Feature negotiation (see features.hpp).
#include "uvirtio/driver/features.hpp"

namespace uvirtio::driver {
namespace {

const char* transport_bit_name(unsigned bit) {
  switch (bit) {
    case feature::kIndirectDesc:
      return "INDIRECT_DESC";
    case feature::kEventIdx:
      return "EVENT_IDX";
    case feature::kVersion1:
      return "VERSION_1";
    case feature::kAccessPlatform:
      return "ACCESS_PLATFORM";
    case feature::kRingPacked:
      return "RING_PACKED";
    case feature::kInOrder:
      return "IN_ORDER";
    case feature::kOrderPlatform:
      return "ORDER_PLATFORM";
    case feature::kSrIov:
      return "SR_IOV";
    case feature::kNotificationData:
      return "NOTIFICATION_DATA";
    case feature::kNotifConfigData:
      return "NOTIF_CONFIG_DATA";
    case feature::kRingReset:
      return "RING_RESET";
    default:
      return nullptr;
  }
}

}  // namespace

std::string FeatureSet::describe(BitName device_bit_name) const {
  std::string out;
  for (unsigned b = 0; b < 64; ++b) {
    if (!has(b)) continue;
    if (!out.empty()) out += ' ';
    // Device-specific bits are 0..23 and 50..127 (spec 6); the rest are
    // the transport's, whatever the device's table says.
    const bool device_bit = b < 24 || b >= 50;
    const char* n = device_bit && device_bit_name != nullptr ? device_bit_name(b) : transport_bit_name(b);
    out += n != nullptr ? std::string(n) : "bit" + std::to_string(b);
  }
  return out.empty() ? "none" : out;
}

Result<FeatureSet> negotiate(FeatureSet offered, const FeaturePolicy& policy, const std::string& device) {
  const std::string op = "negotiate features";
  if (!offered.has(feature::kVersion1))
    return Error(Errc::unsupported, device, op,
                 "the device does not offer VERSION_1: legacy-only virtio devices are not supported "
                 "(QEMU: use disable-legacy=on or a modern device id)");
  const FeatureSet required = policy.required.with(feature::kVersion1);
  if (!offered.contains(required)) {
    FeatureSet missing(required.bits() & ~offered.bits());
    return Error(Errc::unsupported, device, op,
                 "the device does not offer required features: " + missing.describe());
  }
  FeatureSet accepted = offered & policy.supported.with(feature::kVersion1);
  if (offered.has(feature::kAccessPlatform)) accepted = accepted.with(feature::kAccessPlatform);
  return accepted;
}

}  // namespace uvirtio::driver
