// ivshmem: QEMU's inter-VM shared memory device (PCI 1af4:1110, revision 1),
// driven from userspace through VFIO.
//
// BAR0 holds four 32-bit registers (IntrMask, IntrStatus, IVPosition,
// Doorbell), BAR1 the MSI-X table (ivshmem-doorbell only) and BAR2 the shared
// memory. ivshmem-plain has no doorbells: IVPosition is not a peer id and the
// peers can only poll. ivshmem-doorbell gets its peer id (IVPosition) and one
// eventfd per vector from an ivshmem server; writing (peer << 16 | vector) to
// the Doorbell register signals that peer's vector, which arrives here as an
// MSI-X interrupt on our eventfd.
//
// The device is a peer's window, not a trusted party: the BAR sizes and
// IVPosition are checked before use, and a peer id given to ring() is checked
// against the 16 bits the register has.
//
//   auto dev = uvirtio::driver::Ivshmem::open(bdf, {});
//   void* mem = (*dev)->shm(); size_t n = (*dev)->shm_size();
//   auto bell = (*dev)->doorbell(0);   // a channel::Doorbell on vector 0
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "uvirtio/pci/bdf.hpp"
#include "uvirtio/pci/function.hpp"
#include "uvirtio/pci/vfio.hpp"
#include "uvirtio/rings/channel.hpp"

namespace uvirtio::driver {

inline constexpr std::uint16_t kIvshmemVendor = 0x1af4;
inline constexpr std::uint16_t kIvshmemDevice = 0x1110;

// BAR0 register offsets (QEMU docs/specs/ivshmem-spec.rst).
namespace ivshmem_reg {
inline constexpr std::uint64_t kIntrMask = 0x00;
inline constexpr std::uint64_t kIntrStatus = 0x04;
inline constexpr std::uint64_t kIvPosition = 0x08;
inline constexpr std::uint64_t kDoorbell = 0x0c;
inline constexpr std::uint64_t kMinBar0 = 0x10;
}  // namespace ivshmem_reg

struct IvshmemOptions {
  pci::IommuMode iommu = pci::IommuMode::type1v2;
  // Route the MSI-X vectors to eventfds (ivshmem-doorbell). Off: poll only.
  bool interrupts = true;
};

class Ivshmem {
 public:
  // Opens the function at bdf through VFIO after checking it is an ivshmem
  // device bound to vfio-pci.
  static Result<std::unique_ptr<Ivshmem>> open(const pci::Bdf& bdf, const IvshmemOptions& options = {});
  // On an already opened function (tests pass a fake one).
  static Result<std::unique_ptr<Ivshmem>> attach(std::unique_ptr<pci::Function> fn,
                                                 const IvshmemOptions& options = {});
  ~Ivshmem();

  const std::string& bdf() const { return fn_->bdf(); }
  // The shared memory (BAR2), mapped.
  void* shm() const { return shm_; }
  std::size_t shm_size() const { return shm_size_; }
  // Our peer id (IVPosition) on ivshmem-doorbell; nullopt on ivshmem-plain.
  std::optional<std::uint16_t> position() const { return position_; }
  // MSI-X vectors routed to eventfds (0 without doorbells or interrupts).
  unsigned vectors() const { return static_cast<unsigned>(eventfds_.size()); }
  bool has_doorbell() const { return position_.has_value(); }

  // Signals `vector` of peer `peer`.
  Result<void> ring(std::uint32_t peer, std::uint32_t vector);
  // Waits for an interrupt on `vector`; true when one arrived (it is consumed).
  Result<bool> wait(unsigned vector, std::chrono::nanoseconds timeout);
  // Interrupts seen so far on `vector`.
  std::uint64_t interrupts(unsigned vector) const;

  // A channel::Doorbell that rings the peer's `vector` and sleeps on ours.
  // Fails without doorbell or interrupts (use polling then).
  Result<std::unique_ptr<channel::Doorbell>> doorbell(unsigned vector = 0);

 private:
  explicit Ivshmem(std::unique_ptr<pci::Function> fn) : fn_(std::move(fn)) {}
  Result<void> init(const IvshmemOptions& options);

  std::unique_ptr<pci::Function> fn_;
  pci::BarIo* regs_ = nullptr;
  void* shm_ = nullptr;
  std::size_t shm_size_ = 0;
  std::optional<std::uint16_t> position_;
  std::vector<int> eventfds_;  // owned by fn_
  // Counted by every waiter; a send and a receive may wait on one vector
  // from two threads.
  std::vector<std::atomic<std::uint64_t>> interrupts_;
};

}  // namespace uvirtio::driver
