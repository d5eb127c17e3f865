// Handing a PCI function to vfio-pci and back, through sysfs driver_override.
//
// bind_vfio records the driver the function had in a state file under
// /run/uvirtio, so unbind_vfio can give the function back to it (or, if it
// had none, let the kernel probe drivers again).
#pragma once

#include <string>

#include "uvirtio/base/result.hpp"
#include "uvirtio/pci/bdf.hpp"
#include "uvirtio/pci/os.hpp"

namespace uvirtio::pci {

struct BindOutcome {
  std::string previous_driver;  // empty: none
  bool changed = false;         // false: it was already bound to the target
};

inline constexpr const char* kBindStateDir = "/run/uvirtio";

Result<BindOutcome> bind_vfio(const Bdf& bdf, Os& os = Os::system());
// Returns the driver the function ended up with (may be empty).
Result<std::string> unbind_vfio(const Bdf& bdf, Os& os = Os::system());

}  // namespace uvirtio::pci
