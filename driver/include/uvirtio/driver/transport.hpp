// The virtio transport interface device drivers are written against.
//
// VirtioPci implements it over a pci::Function (VFIO or a fake); a device
// driver (rng, pmem, ...) only sees this interface and Virtqueue, so unit
// tests can drive it with a software device.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "uvirtio/base/result.hpp"
#include "uvirtio/driver/features.hpp"
#include "uvirtio/pci/function.hpp"

namespace uvirtio::driver {

namespace status {
inline constexpr std::uint8_t kAcknowledge = 1;
inline constexpr std::uint8_t kDriver = 2;
inline constexpr std::uint8_t kDriverOk = 4;
inline constexpr std::uint8_t kFeaturesOk = 8;
inline constexpr std::uint8_t kNeedsReset = 64;
inline constexpr std::uint8_t kFailed = 128;
}  // namespace status

// Ring addresses as the device sees them.
struct QueueAddresses {
  std::uint64_t desc = 0, driver = 0, device = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const std::string& name() const = 0;
  virtual std::uint16_t device_type() const = 0;

  // Writes 0 to device_status and waits (up to deadline) until it reads 0.
  virtual Result<void> reset(std::chrono::milliseconds deadline) = 0;
  virtual Result<std::uint8_t> status() = 0;
  virtual Result<void> add_status(std::uint8_t bits) = 0;
  virtual Result<FeatureSet> device_features() = 0;
  // Writes the driver features, sets FEATURES_OK and reads it back.
  virtual Result<void> accept_features(FeatureSet features) = 0;
  virtual FeatureSet features() const = 0;  // as accepted

  // Device-specific config, read until config_generation is stable.
  // field_width is the width of the fields being read (1, 2, 4; 8-byte fields
  // are read as two 4-byte halves): accesses never span two fields.
  virtual Result<void> read_device_config(std::uint32_t off, std::span<std::uint8_t> out,
                                          unsigned field_width = 4) = 0;
  // Written with the same field widths (a 32-bit field in one 32-bit write).
  virtual Result<void> write_device_config(std::uint32_t off, std::span<const std::uint8_t> in,
                                           unsigned field_width = 4) = 0;

  virtual Result<std::uint16_t> num_queues() = 0;
  virtual Result<std::uint16_t> queue_max_size(std::uint16_t q) = 0;
  // Programs queue q (size, addresses, interrupt routing) and enables it.
  virtual Result<void> setup_queue(std::uint16_t q, std::uint16_t size, const QueueAddresses& addr,
                                   bool interrupts) = 0;
  virtual Result<void> notify(std::uint16_t q) = 0;
  // The eventfd signalled for queue q's interrupts (after setup_queue with interrupts).
  virtual std::optional<int> queue_eventfd(std::uint16_t q) const = 0;
  // The eventfd signalled for configuration changes (device status
  // included); with INTx it is the queues' eventfd too.
  virtual std::optional<int> config_eventfd() const = 0;
  // Called after the eventfd fired: acknowledges INTx (ISR read, unmask).
  virtual Result<void> ack_interrupt(std::uint16_t q) = 0;
  virtual pci::DmaAllocator& dma() = 0;

  // DEVICE_NEEDS_RESET (or FAILED) as an error naming the device; ok otherwise.
  Result<void> check_healthy(const std::string& op);
  // The same error without touching the device once check_healthy() has
  // seen DEVICE_NEEDS_RESET, until the next reset(): the device ignores
  // its queues until then, so a new request could only run into its
  // deadline.
  Result<void> check_not_known_broken(const std::string& op) const;
  bool needs_reset_seen() const noexcept { return needs_reset_seen_; }

  // Where Virtqueue keeps the in-flight ledgers of this device's queues
  // (InflightLedger); empty: none. open_device() sets it from
  // OpenOptions::inflight_dir.
  void set_inflight_dir(std::string dir) { inflight_dir_ = std::move(dir); }
  const std::string& inflight_dir() const noexcept { return inflight_dir_; }

 protected:
  bool needs_reset_seen_ = false;  // cleared by a successful reset()

 private:
  std::string inflight_dir_;
};

}  // namespace uvirtio::driver
