// pci::Function: what a driver needs from one PCI function.
//
// VfioDevice implements it over /dev/vfio; tests implement it over memory with
// a software device behind it. The virtio transport above sees only this
// interface, so the same driver code runs against QEMU's devices through VFIO
// and against hostile fakes in unit tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "uvirtio/base/result.hpp"

namespace uvirtio::pci {

// Access to one BAR, either mapped (fast path: volatile loads/stores) or
// through read/write calls (regions the kernel will not let us mmap).
class BarIo {
 public:
  virtual ~BarIo() = default;
  virtual std::uint64_t size() const = 0;
  // The mapping of the whole BAR, or nullptr when accesses go through read/write.
  virtual volatile std::uint8_t* mapping() const = 0;
  // width is 1, 2, 4 or 8; off + width must lie inside the BAR.
  virtual Result<std::uint64_t> read(std::uint64_t off, unsigned width) = 0;
  virtual Result<void> write(std::uint64_t off, unsigned width, std::uint64_t value) = 0;
};

// Device-visible memory: a CPU address and the address the device uses (IOVA
// under an IOMMU, physical address in no-IOMMU mode).
struct DmaRegion {
  void* va = nullptr;
  std::uint64_t iova = 0;
  std::size_t size = 0;
};

class DmaAllocator {
 public:
  virtual ~DmaAllocator() = default;
  // Zeroed, device-visible memory of at least size bytes, aligned to align
  // (a power of two no larger than a page). Lives until the allocator dies.
  virtual Result<DmaRegion> alloc(std::size_t size, std::size_t align) = 0;
};

enum class IrqKind { intx, msix };

class Function {
 public:
  virtual ~Function() = default;
  virtual const std::string& bdf() const = 0;

  virtual Result<void> read_config(std::uint32_t off, std::span<std::uint8_t> out) = 0;
  virtual Result<void> write_config(std::uint32_t off, std::span<const std::uint8_t> in) = 0;

  // The BAR, mapped or opened on first use. Fails for absent or I/O BARs
  // that cannot be accessed.
  virtual Result<BarIo*> bar(unsigned index) = 0;

  // Number of vectors the function offers for kind (0 if none).
  virtual unsigned irq_count(IrqKind kind) = 0;
  // Routes `count` vectors of `kind` to new eventfds (returned, owned by the
  // Function until disable_irqs or destruction).
  virtual Result<std::vector<int>> enable_irqs(IrqKind kind, unsigned count) = 0;
  virtual Result<void> unmask_intx() = 0;
  virtual Result<void> disable_irqs() = 0;

  virtual DmaAllocator& dma() = 0;
};

}  // namespace uvirtio::pci
