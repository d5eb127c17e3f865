// The recover_on_reset policy shared by the drivers (driver/device.hpp):
// which errors it recovers from, and how often for one request.
#include "uvirtio/driver/device.hpp"

#include <gtest/gtest.h>

#include <vector>

namespace uvirtio::driver {
namespace {

// Runs retry_after_recovery over attempts that fail with `codes` in turn
// (then succeed); returns the final result and counts the recoveries.
struct Script {
  std::vector<Errc> codes;
  std::size_t attempts = 0;
  std::size_t recoveries = 0;
  bool recovery_fails = false;

  Result<void> run(bool enabled) {
    return retry_after_recovery(
        enabled,
        [&]() -> Result<void> {
          const std::size_t i = attempts++;
          if (i < codes.size()) return Error(codes[i], "0000:00:04.0", "flush", "scripted");
          return ok();
        },
        [&]() -> Result<std::size_t> {
          ++recoveries;
          if (recovery_fails)
            return Error(Errc::timeout, "0000:00:04.0", "recover", "reset not acknowledged");
          return std::size_t{1};
        });
  }
};

TEST(RecoveryPolicy, NeedsResetIsRecoveredOncePerRequest) {
  Script once{{Errc::needs_reset}};
  EXPECT_TRUE(once.run(true).ok());
  EXPECT_EQ(once.recoveries, 1u);
  EXPECT_EQ(once.attempts, 2u);

  Script twice{{Errc::needs_reset, Errc::needs_reset}};
  auto r = twice.run(true);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::needs_reset);
  EXPECT_EQ(twice.recoveries, 1u) << "a device that keeps needing a reset is reported, not looped on";
}

TEST(RecoveryPolicy, StaleCompletionsAreRecoveredUpToTheLimit) {
  Script within{std::vector<Errc>(kMaxStaleRecoveries, Errc::stale_completion)};
  EXPECT_TRUE(within.run(true).ok());
  EXPECT_EQ(within.recoveries, static_cast<std::size_t>(kMaxStaleRecoveries));

  Script beyond{std::vector<Errc>(kMaxStaleRecoveries + 1, Errc::stale_completion)};
  auto r = beyond.run(true);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::stale_completion);
  EXPECT_EQ(beyond.recoveries, static_cast<std::size_t>(kMaxStaleRecoveries));

  // The two limits are separate: QEMU's stale push is followed by NEEDS_RESET.
  Script mixed{{Errc::stale_completion, Errc::needs_reset, Errc::stale_completion}};
  EXPECT_TRUE(mixed.run(true).ok());
  EXPECT_EQ(mixed.recoveries, 3u);
}

TEST(RecoveryPolicy, OtherErrorsAndADisabledPolicyAreReturnedAsTheyAre) {
  for (Errc c : {Errc::bad_device_data, Errc::broken, Errc::timeout, Errc::device_error}) {
    Script s{{c}};
    auto r = s.run(true);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), c);
    EXPECT_EQ(s.recoveries, 0u) << errc_name(c);
  }
  Script off{{Errc::stale_completion}};
  EXPECT_EQ(off.run(false).error().code(), Errc::stale_completion);
  EXPECT_EQ(off.recoveries, 0u);
}

TEST(RecoveryPolicy, AFailedRecoveryIsTheResult) {
  Script s{{Errc::needs_reset}};
  s.recovery_fails = true;
  auto r = s.run(true);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::timeout);
  EXPECT_NE(r.error().message().find("reset not acknowledged"), std::string::npos) << r.error().message();
  EXPECT_EQ(s.attempts, 1u);
}

}  // namespace
}  // namespace uvirtio::driver
