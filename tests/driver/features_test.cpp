// Unit tests for feature negotiation (virtio spec 1.2, 2.2, 3.1.1 and 6):
// legacy devices are refused, missing required bits are named, ACCESS_PLATFORM
// is accepted whenever offered, and the result is offered & supported.
#include "uvirtio/driver/features.hpp"

#include <gtest/gtest.h>

#include "uvirtio/driver/blk.hpp"
#include "uvirtio/driver/pmem.hpp"

namespace uvirtio::driver {
namespace {

using namespace feature;

constexpr const char* kDev = "0000:00:04.0";

TEST(Negotiate, RefusesLegacyDeviceWithoutVersion1) {
  auto r = negotiate(FeatureSet::of({0, 5, kIndirectDesc}), {FeatureSet::of({0, 5}), {}}, kDev);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_EQ(r.error().device(), kDev);
  EXPECT_NE(r.error().message().find("legacy"), std::string::npos) << r.error().message();
  EXPECT_NE(r.error().message().find("VERSION_1"), std::string::npos) << r.error().message();
}

TEST(Negotiate, RefusesLegacyEvenWhenNothingIsRequired) {
  auto r = negotiate(FeatureSet(), {}, kDev);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_NE(r.error().message().find("legacy"), std::string::npos);
}

TEST(Negotiate, NamesMissingRequiredBits) {
  const FeaturePolicy policy{FeatureSet::of({3, kEventIdx, kRingPacked}), FeatureSet::of({3, kRingPacked})};
  auto r = negotiate(FeatureSet::of({kVersion1, kEventIdx}), policy, kDev);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  const std::string m = r.error().message();
  EXPECT_EQ(m.rfind(kDev, 0), 0u) << m;
  EXPECT_NE(m.find("bit3"), std::string::npos) << m;
  EXPECT_NE(m.find("RING_PACKED"), std::string::npos) << m;
  EXPECT_EQ(m.find("EVENT_IDX"), std::string::npos) << "offered bits are not missing: " << m;
  EXPECT_EQ(m.find("VERSION_1"), std::string::npos) << m;
}

TEST(Negotiate, OnlyTheMissingBitIsNamed) {
  const FeaturePolicy policy{FeatureSet::of({1, 2}), FeatureSet::of({1, 2})};
  auto r = negotiate(FeatureSet::of({kVersion1, 1}), policy, kDev);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().cause().find("bit2"), std::string::npos) << r.error().cause();
  EXPECT_EQ(r.error().cause().find("bit1"), std::string::npos) << r.error().cause();
}

TEST(Negotiate, ResultIsOfferedAndSupported) {
  const FeatureSet offered = FeatureSet::of({kVersion1, 0, 1, 7, kIndirectDesc, kEventIdx, 63});
  const FeaturePolicy policy{FeatureSet::of({1, 2, 7, kEventIdx, kRingPacked}), FeatureSet::of({7})};
  auto r = negotiate(offered, policy, kDev);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(*r, FeatureSet::of({kVersion1, 1, 7, kEventIdx}));
  EXPECT_TRUE(offered.contains(*r));
}

TEST(Negotiate, Version1AcceptedEvenIfPolicyForgetsIt) {
  auto r = negotiate(FeatureSet::of({kVersion1, 4}), {FeatureSet::of({4}), {}}, kDev);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, FeatureSet::of({kVersion1, 4}));
}

TEST(Negotiate, AccessPlatformAcceptedWhenOffered) {
  // The policy does not list ACCESS_PLATFORM; a device behind an IOMMU fails
  // FEATURES_OK unless the driver accepts it (spec 6.1).
  auto r = negotiate(FeatureSet::of({kVersion1, kAccessPlatform}), {}, kDev);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, FeatureSet::of({kVersion1, kAccessPlatform}));
}

TEST(Negotiate, AccessPlatformNotInventedWhenNotOffered) {
  auto r = negotiate(FeatureSet::of({kVersion1}), {FeatureSet::of({kAccessPlatform}), {}}, kDev);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, FeatureSet::of({kVersion1}));
}

TEST(FeatureSet, Describe) {
  EXPECT_EQ(FeatureSet().describe(), "none");
  EXPECT_EQ(FeatureSet::of({kVersion1}).describe(), "VERSION_1");
  EXPECT_EQ(FeatureSet::of({0, 5, kIndirectDesc, kEventIdx, kVersion1, kAccessPlatform, kRingPacked, kInOrder,
                            kOrderPlatform, kSrIov, kNotificationData, kNotifConfigData, kRingReset, 41, 63})
                .describe(),
            "bit0 bit5 INDIRECT_DESC EVENT_IDX VERSION_1 ACCESS_PLATFORM RING_PACKED IN_ORDER ORDER_PLATFORM "
            "SR_IOV "
            "NOTIFICATION_DATA NOTIF_CONFIG_DATA RING_RESET bit41 bit63");
}

TEST(FeatureSet, DescribeNamesDeviceBitsOnlyInTheDeviceRanges) {
  // A table that knows every bit: only 0..23 and 50..63 may take its names.
  const FeatureSet::BitName all = [](unsigned) -> const char* { return "DEV"; };
  EXPECT_EQ(FeatureSet::of({0, 23, 24, kVersion1, 49, 50, 63}).describe(all),
            "DEV DEV bit24 VERSION_1 bit49 DEV DEV");
  EXPECT_EQ(FeatureSet::of({1, 3, 6, 9, kVersion1}).describe(uvirtio::driver::blk_feature::name),
            "SIZE_MAX bit3 BLK_SIZE FLUSH VERSION_1");
  EXPECT_EQ(FeatureSet::of({0, 1}).describe(uvirtio::driver::pmem_feature_name), "SHMEM_REGION bit1");
}

TEST(FeatureSet, SetOperations) {
  const FeatureSet a = FeatureSet::of({1, 40});
  EXPECT_TRUE(a.has(40));
  EXPECT_FALSE(a.has(64));  // out of range, not UB
  EXPECT_EQ(a.with(2).without(1), FeatureSet::of({2, 40}));
  EXPECT_EQ(a | FeatureSet::of({3}), FeatureSet::of({1, 3, 40}));
  EXPECT_EQ(a & FeatureSet::of({40, 41}), FeatureSet::of({40}));
  EXPECT_TRUE(a.contains(FeatureSet::of({40})));
  EXPECT_FALSE(a.contains(FeatureSet::of({41})));
  EXPECT_EQ(FeatureSet::of({63}).bits(), 1ull << 63);
}

}  // namespace
}  // namespace uvirtio::driver
