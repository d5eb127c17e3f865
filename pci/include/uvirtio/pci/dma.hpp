// Device-visible memory for VFIO devices.
//
// DmaPool carves allocations out of chunks of memfd memory (2 MiB hugepages
// when the kernel has them, 4 KiB pages otherwise). Under an IOMMU each chunk
// is mapped with VFIO_IOMMU_MAP_DMA at an IOVA chosen by IovaAllocator, which
// stays inside the ranges the kernel reports as usable (reserved windows such
// as the x86 MSI range 0xfee00000-0xfeefffff are left out). In no-IOMMU mode
// the device address is the physical address, read from /proc/self/pagemap
// for locked memory; that mode is unsafe (the device can reach all of RAM).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "uvirtio/base/result.hpp"
#include "uvirtio/pci/function.hpp"
#include "uvirtio/pci/os.hpp"

namespace uvirtio::pci {

struct IovaRange {
  std::uint64_t start = 0;
  std::uint64_t end = 0;  // inclusive, as VFIO reports
};

// First-fit allocator of IOVA space inside the usable ranges.
class IovaAllocator {
 public:
  // An empty `usable` list means "the kernel reported none": [1 MiB, 2^39).
  explicit IovaAllocator(std::vector<IovaRange> usable);
  // An aligned range of `size` bytes (align a power of two), or nullopt.
  std::optional<std::uint64_t> allocate(std::uint64_t size, std::uint64_t align);

 private:
  std::vector<IovaRange> ranges_;
  std::size_t cur_ = 0;
  std::uint64_t next_ = 0;
};

class DmaPool final : public DmaAllocator {
 public:
  enum class Mode { iommu, noiommu };
  // map/unmap issue VFIO_IOMMU_(UN)MAP_DMA on the container; unused in noiommu mode.
  struct Mapper {
    std::function<Result<void>(void* va, std::uint64_t iova, std::uint64_t size)> map;
    std::function<void(std::uint64_t iova, std::uint64_t size)> unmap;
  };
  DmaPool(Os& os, std::string device, Mode mode, IovaAllocator iova, Mapper mapper);
  ~DmaPool() override;
  DmaPool(const DmaPool&) = delete;
  DmaPool& operator=(const DmaPool&) = delete;

  Result<DmaRegion> alloc(std::size_t size, std::size_t align) override;
  bool hugepages() const noexcept { return huge_; }

 private:
  struct Chunk {
    std::uint8_t* va = nullptr;
    std::uint64_t iova = 0;  // iommu mode: IOVA of va; noiommu: unused
    std::size_t size = 0;
    std::size_t used = 0;
    bool mapped = false;
  };
  Result<Chunk*> new_chunk(std::size_t min_size);
  Result<std::uint64_t> phys_addr(const void* va);

  Os& os_;
  std::string device_;
  Mode mode_;
  IovaAllocator iova_;
  Mapper mapper_;
  bool huge_ = false;
  bool huge_tried_ = false;
  std::vector<Chunk> chunks_;
};

}  // namespace uvirtio::pci
