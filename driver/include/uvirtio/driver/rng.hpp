// virtio-rng (virtio spec 1.2, 5.4): entropy from the device.
//
// One request queue; the driver posts a device-writable buffer and the device
// fills up to its length. No feature bits, no config.
//
//   auto rng = uvirtio::driver::Rng::open(bdf, {});
//   std::vector<std::uint8_t> buf(32);
//   auto n = (*rng)->read(buf);  // fills all 32 bytes or fails
#pragma once

#include <chrono>
#include <memory>
#include <span>

#include "uvirtio/driver/device.hpp"
#include "uvirtio/driver/virtqueue.hpp"

namespace uvirtio::driver {

inline constexpr std::uint16_t kVirtioRngType = 4;

struct RngOptions {
  CompletionMode completion = CompletionMode::interrupt;
  std::chrono::milliseconds timeout{5000};  // per request
  OpenOptions open;
};

class Rng {
 public:
  static Result<std::unique_ptr<Rng>> open(const pci::Bdf& bdf, const RngOptions& options);
  // On an already brought-up device (tests use a fake function this way).
  static Result<std::unique_ptr<Rng>> attach(std::unique_ptr<Device> dev, const RngOptions& options);

  // Fills `out` completely (several requests if needed).
  Result<void> read(std::span<std::uint8_t> out);
  Virtqueue& queue() { return *vq_; }
  Device& device() { return *dev_; }

 private:
  Rng(std::unique_ptr<Device> dev, std::unique_ptr<Virtqueue> vq, pci::DmaRegion buf, RngOptions opt)
      : dev_(std::move(dev)), vq_(std::move(vq)), buf_(buf), opt_(opt) {}
  std::unique_ptr<Device> dev_;
  std::unique_ptr<Virtqueue> vq_;
  pci::DmaRegion buf_;
  RngOptions opt_;
  std::uint64_t next_token_ = 1;
};

}  // namespace uvirtio::driver
