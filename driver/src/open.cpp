// Opening and bringing up a virtio device (spec 3.1.1).
#include "uvirtio/driver/device.hpp"
#include "uvirtio/pci/discovery.hpp"

namespace uvirtio::driver {

Device::~Device() {
  if (transport_) (void)transport_->reset(std::chrono::milliseconds(100));
}

Result<void> Device::reinitialize(std::chrono::milliseconds reset_deadline) {
  VirtioPci& t = *transport_;
  const FeatureSet accepted = t.features();
  UV_TRY_VOID(t.reset(reset_deadline));
  UV_TRY_VOID(t.add_status(status::kAcknowledge));
  UV_TRY_VOID(t.add_status(status::kDriver));
  UV_TRY(const FeatureSet offered, t.device_features());
  if (!offered.contains(accepted)) {
    (void)t.add_status(status::kFailed);
    return Error(Errc::unsupported, t.name(), "reinitialize after reset",
                 "the device no longer offers features it accepted before: " +
                     FeatureSet(accepted.bits() & ~offered.bits()).describe());
  }
  auto accepted_again = t.accept_features(accepted);
  if (!accepted_again) {
    // Spec 3.1.1: a driver that gives up sets FAILED (as bring_up does).
    (void)t.add_status(status::kFailed);
    return accepted_again;
  }
  return ok();
}

Result<std::vector<std::uint64_t>> Device::recover(Virtqueue& vq, std::chrono::milliseconds reset_deadline) {
  UV_TRY_VOID(reinitialize(reset_deadline));
  auto dropped = vq.restart();
  if (!dropped) {
    // Spec 3.1.1: a driver that gives up sets FAILED (as reinitialize does).
    (void)transport_->add_status(status::kFailed);
    return std::move(dropped).error();
  }
  UV_TRY_VOID(driver_ok());
  UV_TRY_VOID(transport_->check_healthy("recover after reset"));
  return std::move(dropped).value();
}

Result<std::unique_ptr<Device>> bring_up(std::unique_ptr<pci::Function> fn, std::uint16_t expected_type,
                                         const FeaturePolicy& policy, const OpenOptions& options) {
  UV_TRY(std::unique_ptr<VirtioPci> t, VirtioPci::create(*fn, options.irq, options.extra_msix_vectors));
  if (t->device_type() != expected_type)
    return Error(Errc::invalid_argument, fn->bdf(), "open device",
                 std::string("it is a virtio ") + pci::virtio_device_name(t->device_type()) +
                     " device, not " + pci::virtio_device_name(expected_type));
  UV_TRY_VOID(t->reset(options.reset_deadline));
  UV_TRY_VOID(t->add_status(status::kAcknowledge));
  auto negotiated = [&]() -> Result<void> {
    UV_TRY_VOID(t->add_status(status::kDriver));
    UV_TRY(FeatureSet offered, t->device_features());
    FeaturePolicy with_rings = policy;
    with_rings.supported = policy.supported | options.ring_features;
    UV_TRY(FeatureSet accepted, negotiate(offered, with_rings, fn->bdf()));
    return t->accept_features(accepted);
  }();
  if (!negotiated) {
    // Spec 3.1.1: a driver that gives up sets FAILED.
    (void)t->add_status(status::kFailed);
    return std::move(negotiated).error();
  }
  return std::make_unique<Device>(std::move(fn), std::move(t));
}

Result<std::unique_ptr<Device>> open_device(const pci::Bdf& bdf, std::uint16_t expected_type,
                                            const FeaturePolicy& policy, const OpenOptions& options) {
  UV_TRY(pci::FunctionInfo info, pci::describe_function(bdf));
  auto type = pci::virtio_device_id(info);
  if (!type) return Error(Errc::invalid_argument, bdf.str(), "open device", "not a virtio function");
  if (*type != expected_type)
    return Error(Errc::invalid_argument, bdf.str(), "open device",
                 std::string("it is a virtio ") + pci::virtio_device_name(*type) + " device, not " +
                     pci::virtio_device_name(expected_type));
  if (info.driver != "vfio-pci")
    return Error(Errc::invalid_argument, bdf.str(), "open device",
                 "bound to driver '" + (info.driver.empty() ? std::string("none") : info.driver) +
                     "', not vfio-pci (run 'uvirtio bind " + bdf.str() + "')");
  pci::VfioOptions vopts;
  vopts.mode = options.iommu;
  UV_TRY(std::unique_ptr<pci::VfioDevice> vfio, pci::VfioDevice::open(bdf, vopts));
  UV_TRY(std::unique_ptr<Device> dev, bring_up(std::move(vfio), expected_type, policy, options));
  dev->transport().set_inflight_dir(options.inflight_dir);
  return dev;
}

}  // namespace uvirtio::driver
