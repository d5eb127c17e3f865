// Deadlines that cannot overflow the clock.
#pragma once

#include <chrono>

namespace uvirtio {

// now + d as a steady_clock deadline, saturated: a duration too long for
// the clock (milliseconds::max(): wait as long as it takes) gives
// time_point::max() instead of overflowing; a negative one gives now.
template <class Rep, class Period>
std::chrono::steady_clock::time_point deadline_after(std::chrono::duration<Rep, Period> d) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point now = Clock::now();
  if (d <= d.zero()) return now;
  const auto room =
      std::chrono::duration_cast<std::chrono::duration<Rep, Period>>(Clock::time_point::max() - now);
  if (d >= room) return Clock::time_point::max();
  return now + std::chrono::duration_cast<Clock::duration>(d);
}

}  // namespace uvirtio
