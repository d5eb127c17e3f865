// SoftFunction: a pci::Function made of memory, with a software device
// behind it instead of hardware. Unit tests use it to script hostile devices
// without root or VFIO; the vhost-pci device model (driver/vhost_pci_device.hpp)
// uses it to present a device that exists only in software to a driver that
// is unchanged from the VFIO case.
//
// Config space is a 4096-byte array scripted with the helpers below (IDs, the
// capability-list status bit, virtio vendor capabilities, MSI-X). BARs are
// SoftBars (byte arrays whose accesses all go through BarIo::read/write so a
// device model can hook address ranges and react to register accesses) or any
// BarIo the device model installs (set_bar). Interrupts are real eventfds
// created with eventfd(2); raise(vector) signals one. The DMA allocator hands
// out zeroed, aligned heap memory whose device address is its virtual address
// and remembers every allocation, so a device model can translate addresses
// and reject those outside any allocation, as an IOMMU would.
#pragma once

#include <array>
#include <cerrno>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "uvirtio/pci/caps.hpp"
#include "uvirtio/pci/function.hpp"

namespace uvirtio::pci {

// Identity-mapped DMA memory (iova == (uint64_t)va). Thread-safe.
class SoftDma final : public pci::DmaAllocator {
 public:
  Result<pci::DmaRegion> alloc(std::size_t size, std::size_t align) override;
  // The CPU pointer for device address range [iova, iova + len) when it lies
  // entirely inside one allocation, else nullptr.
  std::uint8_t* translate(std::uint64_t iova, std::uint64_t len) const;
  // The same as a span of exactly `len` bytes (nullopt: not DMA memory), the
  // form a device queue's BufferTranslation wants.
  std::optional<std::span<std::uint8_t>> span(std::uint64_t iova, std::uint64_t len) const;
  std::size_t allocations() const;

 private:
  struct Block {
    std::unique_ptr<std::uint8_t, void (*)(void*)> mem{nullptr, nullptr};
    std::size_t size = 0;
  };
  mutable std::mutex mu_;
  std::vector<Block> blocks_;
};

// One BAR backed by memory. Hooks claim address ranges; accesses outside any
// hooked range read and write the memory.
class SoftBar final : public pci::BarIo {
 public:
  // `off` is relative to the start of the hooked range.
  using ReadHook = std::function<std::uint64_t(std::uint64_t off, unsigned width)>;
  using WriteHook = std::function<void(std::uint64_t off, unsigned width, std::uint64_t value)>;

  SoftBar(std::string device, std::uint64_t size);
  std::uint64_t size() const override { return mem_.size(); }
  // Unmapped unless set_mappable(true): then mapping() exposes the memory, as
  // VFIO does for an mmappable BAR (hooks no longer see mapped accesses).
  volatile std::uint8_t* mapping() const override {
    return mappable_ ? const_cast<std::uint8_t*>(mem_.data()) : nullptr;
  }
  void set_mappable(bool on) { mappable_ = on; }
  Result<std::uint64_t> read(std::uint64_t off, unsigned width) override;
  Result<void> write(std::uint64_t off, unsigned width, std::uint64_t value) override;

  void hook(std::uint64_t begin, std::uint64_t length, ReadHook on_read, WriteHook on_write);
  // Raw memory, bypassing hooks (little-endian).
  std::uint64_t peek(std::uint64_t off, unsigned width) const;
  void poke(std::uint64_t off, unsigned width, std::uint64_t value);
  // Writes that landed in [begin, begin + length), hooked or not.
  std::size_t writes_in(std::uint64_t begin, std::uint64_t length) const;
  // The next `count` writes in [begin, begin + length) fail with `err`
  // before reaching a hook or the memory, as a VFIO region write can.
  void fail_writes_in(std::uint64_t begin, std::uint64_t length, unsigned count, int err = EIO);

 private:
  struct Range {
    std::uint64_t begin, length;
    ReadHook on_read;
    WriteHook on_write;
  };
  const Range* find(std::uint64_t off) const;
  Result<void> check(const char* op, std::uint64_t off, unsigned width) const;

  std::string device_;
  std::vector<std::uint8_t> mem_;
  bool mappable_ = false;
  std::vector<Range> ranges_;
  mutable std::mutex log_mu_;
  std::vector<std::uint64_t> write_log_;  // offsets of all writes
  struct FailingRange {
    std::uint64_t begin, length;
    unsigned count;
    int err;
  };
  std::vector<FailingRange> failing_;  // under log_mu_
};

class SoftFunction final : public pci::Function {
 public:
  explicit SoftFunction(std::string bdf = "0000:00:04.0");
  ~SoftFunction() override;
  SoftFunction(const SoftFunction&) = delete;
  SoftFunction& operator=(const SoftFunction&) = delete;

  // --- pci::Function
  const std::string& bdf() const override { return bdf_; }
  Result<void> read_config(std::uint32_t off, std::span<std::uint8_t> out) override;
  Result<void> write_config(std::uint32_t off, std::span<const std::uint8_t> in) override;
  Result<pci::BarIo*> bar(unsigned index) override;
  unsigned irq_count(pci::IrqKind kind) override;
  Result<std::vector<int>> enable_irqs(pci::IrqKind kind, unsigned count) override;
  Result<void> unmask_intx() override;
  Result<void> disable_irqs() override;
  pci::DmaAllocator& dma() override { return dma_; }

  // --- config space scripting
  std::span<std::uint8_t> config() { return config_; }
  void set_ids(std::uint16_t vendor, std::uint16_t device, std::uint16_t subsystem_id = 0);
  void set_cap_list(bool present);  // Status register bit 4
  // Appends a standard capability (id, next and `body` after them) to the
  // list and returns its offset. Also sets the status bit.
  std::uint8_t add_cap(std::uint8_t id, std::span<const std::uint8_t> body);
  // struct virtio_pci_cap / virtio_pci_notify_cap (virtio spec 1.2, 4.1.4).
  std::uint8_t add_virtio_cap(pci::VirtioCfgType type, std::uint8_t bar, std::uint32_t offset,
                              std::uint32_t length, std::uint32_t notify_multiplier = 0);
  // MSI-X capability (PCI 3.0, 6.8.2); also sets irq_count(msix).
  std::uint8_t add_msix_cap(std::uint16_t vectors, std::uint8_t table_bar, std::uint32_t table_offset,
                            std::uint8_t pba_bar, std::uint32_t pba_offset);

  // --- BARs
  SoftBar& add_bar(unsigned index, std::uint64_t size);
  SoftBar* soft_bar(unsigned index) { return index < 6 ? soft_bars_[index] : nullptr; }
  // Installs a device model's own BarIo at `index` (replacing any BAR there).
  void set_bar(unsigned index, std::unique_ptr<pci::BarIo> bar);

  // --- interrupts
  void set_irq_count(pci::IrqKind kind, unsigned count);
  // Signals the eventfd of `vector` (INTx: vector 0). False when that vector
  // is not enabled.
  bool raise(unsigned vector);
  // Makes the eventfd the driver holds for `vector` refer to `fd`'s file
  // (dup3 onto the same descriptor number): whoever signals `fd` (a remote
  // VM's kick eventfd) then interrupts the driver directly, with no thread in
  // between. unroute_vector() gives the vector a fresh eventfd of its own.
  // A poll() already sleeping on the old file is not woken by the swap.
  // invalid_argument when the vector is not enabled.
  Result<void> route_vector(unsigned vector, int fd);
  Result<void> unroute_vector(unsigned vector);
  std::optional<pci::IrqKind> irq_kind() const;
  std::size_t enabled_vectors() const;
  std::uint64_t raise_count(pci::IrqKind kind) const;
  std::uint64_t unmask_count() const;

  SoftDma& soft_dma() { return dma_; }

 private:
  std::string bdf_;
  std::vector<std::uint8_t> config_;
  std::uint8_t next_cap_ = 0x40;
  std::uint8_t last_cap_ = 0;
  std::array<std::unique_ptr<pci::BarIo>, 6> bars_;
  std::array<SoftBar*, 6> soft_bars_{};  // bars_[i] when it is a SoftBar
  SoftDma dma_;

  mutable std::mutex irq_mu_;
  unsigned intx_count_ = 1;
  unsigned msix_count_ = 0;
  std::optional<pci::IrqKind> irq_kind_;
  std::vector<int> eventfds_;
  std::uint64_t raises_[2] = {0, 0};  // indexed by IrqKind
  std::uint64_t unmasks_ = 0;
};

// A pci::Function that forwards to `fn` without owning it, for APIs that take
// ownership (driver::bring_up). `fn` must outlive the returned object.
std::unique_ptr<pci::Function> borrow(pci::Function& fn);
// The same, except that BAR `index` is seen through the BarIo `wrap` makes of
// it on first use: tests overlay misbehaviour on the real registers.
using BarWrap = std::function<std::unique_ptr<BarIo>(BarIo& inner)>;
std::unique_ptr<pci::Function> borrow(pci::Function& fn, unsigned index, BarWrap wrap);

}  // namespace uvirtio::pci
