// VfioDevice: a PCI function opened through the VFIO container/group/device
// API (Documentation/driver-api/vfio.rst), implementing pci::Function.
//
// Opening follows the kernel's order: container (/dev/vfio/vfio, API version,
// IOMMU extension), group (/dev/vfio/N, viable), group -> container, IOMMU
// type, device fd. Teardown runs the other way: interrupts off, BARs unmapped,
// device fd closed, DMA unmapped, group closed, container closed. All kernel
// calls go through the Os seam.
#pragma once

#include <array>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "uvirtio/pci/bdf.hpp"
#include "uvirtio/pci/dma.hpp"
#include "uvirtio/pci/function.hpp"
#include "uvirtio/pci/os.hpp"

namespace uvirtio::pci {

enum class IommuMode {
  type1v2,  // the default: DMA through the IOMMU, addresses are IOVAs
  noiommu,  // unsafe: no isolation, the device sees physical addresses
};

struct VfioOptions {
  IommuMode mode = IommuMode::type1v2;
  // Where warnings go (the no-IOMMU warning); default: stderr.
  std::function<void(const std::string&)> warn;
};

struct RegionInfo {
  std::uint32_t index = 0;
  std::uint32_t flags = 0;  // VFIO_REGION_INFO_FLAG_*
  std::uint64_t size = 0;
  std::uint64_t offset = 0;  // in the device fd
  bool available = false;    // false: the kernel refused to describe it (e.g. VGA)
};

class VfioDevice final : public Function {
 public:
  static Result<std::unique_ptr<VfioDevice>> open(const Bdf& bdf, VfioOptions options = {},
                                                  Os& os = Os::system());
  ~VfioDevice() override;

  const std::string& bdf() const override { return name_; }
  Result<void> read_config(std::uint32_t off, std::span<std::uint8_t> out) override;
  Result<void> write_config(std::uint32_t off, std::span<const std::uint8_t> in) override;
  Result<BarIo*> bar(unsigned index) override;
  unsigned irq_count(IrqKind kind) override;
  Result<std::vector<int>> enable_irqs(IrqKind kind, unsigned count) override;
  Result<void> unmask_intx() override;
  Result<void> disable_irqs() override;
  DmaAllocator& dma() override { return *dma_; }

  const std::vector<RegionInfo>& regions() const { return regions_; }
  // Sizes of BAR0..5 (0 for absent ones), for the capability parser.
  std::array<std::uint64_t, 6> bar_sizes() const;
  IommuMode mode() const { return mode_; }
  const std::vector<IovaRange>& iova_ranges() const { return iova_ranges_; }
  // A snapshot of config space (4096 bytes for PCIe functions, else 256).
  Result<std::vector<std::uint8_t>> config_snapshot();

 private:
  VfioDevice(Os& os, std::string name) : os_(os), name_(std::move(name)) {}
  Result<void> init(const Bdf& bdf, const VfioOptions& options);

  Os& os_;
  std::string name_;
  IommuMode mode_ = IommuMode::type1v2;
  // Declaration order is teardown order reversed: see the file comment.
  Fd container_;
  Fd group_;
  std::unique_ptr<DmaPool> dma_;
  Fd device_;
  std::vector<RegionInfo> regions_;
  std::array<std::unique_ptr<BarIo>, 6> bars_;
  std::array<std::uint32_t, 3> irq_counts_{};  // INTx, MSI, MSI-X
  std::optional<IrqKind> irq_kind_;
  std::vector<Fd> eventfds_;
  std::vector<IovaRange> iova_ranges_;
};

// Parses the capability chain of a VFIO_IOMMU_GET_INFO answer (the bytes the
// kernel wrote, `info_len` long) for the usable IOVA ranges. The chain is
// bounds-checked: a bad offset ends the walk. Exposed for tests and fuzzing.
std::vector<IovaRange> parse_iova_ranges(const std::uint8_t* info, std::size_t info_len);

}  // namespace uvirtio::pci
