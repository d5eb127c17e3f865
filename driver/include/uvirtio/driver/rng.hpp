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
#include <vector>

#include "uvirtio/driver/device.hpp"
#include "uvirtio/driver/virtqueue.hpp"

namespace uvirtio::driver {

inline constexpr std::uint16_t kVirtioRngType = 4;

struct RngOptions {
  CompletionMode completion = CompletionMode::interrupt;
  std::chrono::milliseconds timeout{5000};  // per request
  OpenOptions open;
  // When the device reports DEVICE_NEEDS_RESET during read(): recover()
  // and resubmit the request, once per read() call; likewise for a packed
  // ring's Errc::stale_completion (see retry_after_recovery). Off: the
  // error is returned and the caller may recover() itself.
  bool recover_on_reset = false;
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

  // Completions of requests an earlier read() abandoned at its deadline.
  std::uint64_t stale_completions() const { return stale_completions_; }

  // Resets the device and brings it back with the same features and queue
  // (after DEVICE_NEEDS_RESET, or to reclaim requests abandoned at their
  // deadline). Returns how many requests were in flight: the device dropped
  // them, and their buffers are free again.
  Result<std::size_t> recover();
  std::uint64_t recoveries() const { return recoveries_; }

 private:
  Rng(std::unique_ptr<Device> dev, std::unique_ptr<Virtqueue> vq, std::vector<pci::DmaRegion> bufs,
      RngOptions opt)
      : dev_(std::move(dev)),
        vq_(std::move(vq)),
        bufs_(std::move(bufs)),
        busy_(bufs_.size(), false),
        opt_(opt) {}
  std::unique_ptr<Device> dev_;
  std::unique_ptr<Virtqueue> vq_;
  std::vector<pci::DmaRegion> bufs_;
  std::vector<bool> busy_;  // bufs_[i] belongs to a request the device has not completed
  RngOptions opt_;
  std::uint64_t next_seq_ = 1;
  std::uint64_t stale_completions_ = 0;
  std::uint64_t recoveries_ = 0;
};

}  // namespace uvirtio::driver
