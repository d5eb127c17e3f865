// The software virtio-pci device of the library under the names the unit
// tests use (see uvirtio/driver/soft_virtio.hpp).
#pragma once

#include "support/fake_function.hpp"
#include "uvirtio/driver/soft_virtio.hpp"

namespace uvirtio::test {
using FakeVirtioDevice = driver::SoftVirtioDevice;
using FakeVirtioOptions = driver::SoftVirtioOptions;
using driver::Faults;
using driver::RequestHandler;
using driver::Segment;
}  // namespace uvirtio::test
