// The software PCI function of the library under the names the unit tests
// use (see uvirtio/pci/soft_function.hpp).
#pragma once

#include "uvirtio/pci/soft_function.hpp"

namespace uvirtio::test {
using FakeDma = pci::SoftDma;
using FakeBar = pci::SoftBar;
using FakeFunction = pci::SoftFunction;
using pci::borrow;
}  // namespace uvirtio::test
