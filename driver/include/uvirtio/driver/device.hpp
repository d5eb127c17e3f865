// Opening a virtio PCI function for a device driver: check what the function
// is, open it through VFIO, bring up the transport and negotiate features.
//
//   auto dev = uvirtio::driver::open_device(bdf, kRngType, policy);
//   if (!dev) { std::cerr << dev.error().message() << "\n"; return 1; }
//   // dev->transport() is at FEATURES_OK; set up queues, then driver_ok().
#pragma once

#include <memory>
#include <vector>

#include "uvirtio/driver/virtio_pci.hpp"
#include "uvirtio/driver/virtqueue.hpp"
#include "uvirtio/pci/bdf.hpp"
#include "uvirtio/pci/vfio.hpp"

namespace uvirtio::driver {

struct OpenOptions {
  pci::IommuMode iommu = pci::IommuMode::type1v2;
  IrqPreference irq = IrqPreference::msix_then_intx;
  std::chrono::milliseconds reset_deadline{1000};
  // MSI-X vectors for device-specific interrupts (VirtioPci::create).
  unsigned extra_msix_vectors = 0;
  // Ring features the driver accepts when the device offers them; Virtqueue
  // then uses the packed layout, event-index suppression, indirect tables
  // and in-order descriptors. Clear bits to force the simpler forms.
  FeatureSet ring_features =
      FeatureSet::of({feature::kRingPacked, feature::kEventIdx, feature::kIndirectDesc, feature::kInOrder});
  // Directory of the queues' in-flight ledgers (InflightLedger: a device
  // that completes an earlier owner's request after a reset never completes
  // one of ours with it). Empty: no ledger. Used by open_device() only.
  std::string inflight_dir = "/run/uvirtio";
};

// A function, its transport and its negotiated features. Owns the VFIO device.
class Device {
 public:
  pci::Function& function() { return *fn_; }
  VirtioPci& transport() { return *transport_; }
  // Sets DRIVER_OK after queues are set up (spec 3.1.1 step 8).
  Result<void> driver_ok() { return transport_->add_status(status::kDriverOk); }
  // Recovery from DEVICE_NEEDS_RESET (spec 2.1.2): resets the device and
  // runs the initialization again up to FEATURES_OK with the features
  // negotiated before (unsupported, and FAILED set, if the device no longer
  // offers them all). The driver then restarts its queues
  // (Virtqueue::restart), resubmits or fails what was in flight, and sets
  // DRIVER_OK.
  Result<void> reinitialize(std::chrono::milliseconds reset_deadline);
  // The whole recovery for a driver with one queue: reinitialize, restart
  // `vq`, DRIVER_OK, and check the device took it. Returns the tokens the
  // device dropped (Virtqueue::restart).
  Result<std::vector<std::uint64_t>> recover(Virtqueue& vq, std::chrono::milliseconds reset_deadline);
  // Best-effort reset so the device stops DMA before our memory goes away.
  ~Device();
  Device(std::unique_ptr<pci::Function> fn, std::unique_ptr<VirtioPci> t)
      : fn_(std::move(fn)), transport_(std::move(t)) {}

 private:
  std::unique_ptr<pci::Function> fn_;
  std::unique_ptr<VirtioPci> transport_;
};

// Runs the initialization of spec 3.1.1 up to FEATURES_OK on `fn`: reset,
// ACKNOWLEDGE, DRIVER, negotiate, FEATURES_OK read back. `expected_type` is
// the virtio device id (4 for entropy, 27 for pmem), checked first.
Result<std::unique_ptr<Device>> bring_up(std::unique_ptr<pci::Function> fn, std::uint16_t expected_type,
                                         const FeaturePolicy& policy, const OpenOptions& options = {});

// bring_up() on the VFIO device at bdf, with a clear error when the function
// is absent, not virtio, of another type, or not bound to vfio-pci.
Result<std::unique_ptr<Device>> open_device(const pci::Bdf& bdf, std::uint16_t expected_type,
                                            const FeaturePolicy& policy, const OpenOptions& options = {});

// Recoveries one request may run for Errc::stale_completion: each request
// a reset abandoned while the device still worked on it can come back once
// after that reset (QEMU 7.2's virtio-pmem, doc/qemu-bugs.md), and on a
// packed ring each such completion needs a reset of its own.
inline constexpr int kMaxStaleRecoveries = 3;

// Whether the `recover_on_reset` policy recovers from `e` now, given the
// recoveries this request has already run; counts this one.
inline bool recovery_allowed(const Error& e, bool& reset_done, int& stale_done) {
  if (e.code() == Errc::needs_reset && !reset_done) {
    reset_done = true;
    return true;
  }
  if (e.code() == Errc::stale_completion && stale_done < kMaxStaleRecoveries) {
    ++stale_done;
    return true;
  }
  return false;
}

// The `recover_on_reset` policy of the drivers whose requests are
// idempotent: runs attempt(); if it failed because the device set
// DEVICE_NEEDS_RESET (once) or completed a request from before a reset on a
// packed ring (up to kMaxStaleRecoveries times) and `enabled`, runs
// recover() (which returns how many requests the device dropped) and
// attempt() again.
template <class Attempt, class Recover>
Result<void> retry_after_recovery(bool enabled, Attempt&& attempt, Recover&& recover) {
  bool reset_done = false;
  int stale_done = 0;
  for (;;) {
    auto r = attempt();
    if (r.ok() || !enabled || !recovery_allowed(r.error(), reset_done, stale_done)) return r;
    UV_TRY(const std::size_t dropped, recover());
    (void)dropped;
  }
}

}  // namespace uvirtio::driver
