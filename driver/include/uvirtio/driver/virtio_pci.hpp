// The virtio-pci modern transport (virtio spec 1.2, 4.1) over a pci::Function.
//
// It finds the virtio structures with the capability parser, maps their BARs,
// and implements Transport: reset with a deadline, status, 64-bit feature
// negotiation with FEATURES_OK read back, generation-stable config reads,
// queue setup with bounds-checked notify addresses, and interrupt routing
// (one MSI-X vector for config and one per queue when available, INTx with
// the ISR otherwise).
#pragma once

#include <memory>
#include <vector>

#include "uvirtio/driver/transport.hpp"
#include "uvirtio/pci/caps.hpp"

namespace uvirtio::driver {

enum class IrqPreference { msix_then_intx, intx };

class VirtioPci final : public Transport {
 public:
  // `fn` must outlive the transport. Refuses legacy-only and non-virtio
  // functions and functions whose capabilities lack a usable common, notify,
  // ISR structure.
  // `extra_msix_vectors`: vectors enabled after the config and queue ones,
  // for device-specific interrupts (vhost-pci: a remote VM's kicks);
  // msix_eventfd() gives their eventfds. Fewer are enabled when the function
  // has fewer.
  static Result<std::unique_ptr<VirtioPci>> create(pci::Function& fn,
                                                   IrqPreference irq = IrqPreference::msix_then_intx,
                                                   unsigned extra_msix_vectors = 0);

  const std::string& name() const override { return fn_.bdf(); }
  std::uint16_t device_type() const override { return device_type_; }
  Result<void> reset(std::chrono::milliseconds deadline) override;
  Result<std::uint8_t> status() override;
  Result<void> add_status(std::uint8_t bits) override;
  Result<FeatureSet> device_features() override;
  Result<void> accept_features(FeatureSet features) override;
  FeatureSet features() const override { return accepted_; }
  Result<void> read_device_config(std::uint32_t off, std::span<std::uint8_t> out,
                                  unsigned field_width = 4) override;
  std::optional<int> config_eventfd() const override;
  Result<void> write_device_config(std::uint32_t off, std::span<const std::uint8_t> in,
                                   unsigned field_width = 4) override;
  Result<std::uint16_t> num_queues() override;
  Result<std::uint16_t> queue_max_size(std::uint16_t q) override;
  Result<void> setup_queue(std::uint16_t q, std::uint16_t size, const QueueAddresses& addr,
                           bool interrupts) override;
  Result<void> notify(std::uint16_t q) override;
  std::optional<int> queue_eventfd(std::uint16_t q) const override;
  Result<void> ack_interrupt(std::uint16_t q) override;
  pci::DmaAllocator& dma() override { return fn_.dma(); }

  const pci::Capabilities& capabilities() const { return caps_; }
  bool using_msix() const { return msix_; }
  // The eventfd of MSI-X vector v once interrupts are set up (nullopt
  // without MSI-X or for a vector not enabled).
  std::optional<int> msix_eventfd(unsigned v) const {
    if (!msix_ || v >= eventfds_.size()) return std::nullopt;
    return eventfds_[v];
  }

 private:
  VirtioPci(pci::Function& fn) : fn_(fn) {}
  Result<void> init(IrqPreference irq);
  Result<void> setup_interrupts();
  // status(), with a gone device (all-ones) as a not_found error for `op`.
  Result<std::uint8_t> live_status(const std::string& op);
  Result<std::uint64_t> common_read(std::uint32_t off, unsigned width);
  Result<void> common_write(std::uint32_t off, unsigned width, std::uint64_t v);

  pci::Function& fn_;
  std::uint16_t device_type_ = 0;
  pci::Capabilities caps_;
  pci::BarIo* common_ = nullptr;
  pci::BarIo* notify_ = nullptr;
  pci::BarIo* isr_ = nullptr;
  pci::BarIo* device_ = nullptr;
  FeatureSet accepted_;
  IrqPreference irq_pref_ = IrqPreference::msix_then_intx;
  unsigned extra_vectors_ = 0;
  bool irqs_ready_ = false;
  bool msix_ = false;
  std::vector<int> eventfds_;  // MSI-X: [0] config, [1 + q] queue q; INTx: [0] for everything
  struct QueueState {
    std::uint64_t notify_off = 0;  // inside the notify structure
    bool interrupts = false;
    bool ready = false;
  };
  std::vector<QueueState> queues_;
};

}  // namespace uvirtio::driver
