// virtio-pci modern transport (virtio spec 1.2, 4.1.4 and 3.1).
#include "uvirtio/driver/virtio_pci.hpp"

#include <thread>

#include "uvirtio/base/deadline.hpp"
#include "uvirtio/base/le.hpp"

namespace uvirtio::driver {
namespace {

// struct virtio_pci_common_cfg (spec 4.1.4.3).
namespace cc {
constexpr std::uint32_t device_feature_select = 0x00;
constexpr std::uint32_t device_feature = 0x04;
constexpr std::uint32_t driver_feature_select = 0x08;
constexpr std::uint32_t driver_feature = 0x0c;
constexpr std::uint32_t config_msix_vector = 0x10;
constexpr std::uint32_t num_queues = 0x12;
constexpr std::uint32_t device_status = 0x14;
constexpr std::uint32_t config_generation = 0x15;
constexpr std::uint32_t queue_select = 0x16;
constexpr std::uint32_t queue_size = 0x18;
constexpr std::uint32_t queue_msix_vector = 0x1a;
constexpr std::uint32_t queue_enable = 0x1c;
constexpr std::uint32_t queue_notify_off = 0x1e;
constexpr std::uint32_t queue_desc = 0x20;
constexpr std::uint32_t queue_driver = 0x28;
constexpr std::uint32_t queue_device = 0x30;
}  // namespace cc

constexpr std::uint16_t kNoVector = 0xffff;
// No device_status has the reserved bits 4 and 5 set: all-ones is what a
// read of a device that is gone (surprise removal) returns.
constexpr std::uint8_t kGoneStatus = 0xff;
constexpr int kConfigRetries = 64;

// Spec 4.1.3.1: each device-config field is accessed with its own width
// (64-bit fields as two 32-bit halves): the widest of 4, 2, 1 that the
// field width allows, `at` is aligned to and `left` bytes still hold.
unsigned access_width(std::uint64_t at, std::size_t left, unsigned field_width) {
  if (field_width >= 4 && at % 4 == 0 && left >= 4) return 4;
  if (field_width >= 2 && at % 2 == 0 && left >= 2) return 2;
  return 1;
}

}  // namespace

Result<void> Transport::check_healthy(const std::string& op) {
  UV_TRY(std::uint8_t s, status());
  if (s == 0xff)
    return Error(Errc::not_found, name(), op,
                 "device status reads 0xff: the device is gone (surprise removal?)");
  if (s & status::kNeedsReset) {
    needs_reset_seen_ = true;
    return check_not_known_broken(op);
  }
  if (s & status::kFailed) return Error(Errc::broken, name(), op, "device status has FAILED set");
  return ok();
}

Result<void> Transport::check_not_known_broken(const std::string& op) const {
  if (!needs_reset_seen_) return ok();
  return Error(Errc::needs_reset, name(), op,
               "the device set DEVICE_NEEDS_RESET: it must be reset before further use");
}

Result<std::unique_ptr<VirtioPci>> VirtioPci::create(pci::Function& fn, IrqPreference irq,
                                                     unsigned extra_msix_vectors) {
  std::unique_ptr<VirtioPci> t(new VirtioPci(fn));
  t->extra_vectors_ = std::min(extra_msix_vectors, 2048u);
  if (auto r = t->init(irq); !r) return std::move(r).error();
  return t;
}

Result<void> VirtioPci::init(IrqPreference irq) {
  const std::string op = "open virtio-pci transport";
  irq_pref_ = irq;
  std::vector<std::uint8_t> cfg(256);
  UV_TRY_VOID(fn_.read_config(0, cfg));
  const std::uint16_t vendor = load_le16(&cfg[0]);
  const std::uint16_t device = load_le16(&cfg[2]);
  if (vendor == 0xffff)
    return Error(Errc::not_found, fn_.bdf(), op, "config space reads all-ones: device gone");
  if (vendor != 0x1af4 || device < 0x1000 || device > 0x107f)
    return Error(Errc::invalid_argument, fn_.bdf(), op, "not a virtio function");
  if (device < 0x1040) {
    // Transitional: the type is the subsystem id. Modern capabilities may still
    // be present; without them the function is legacy-only.
    device_type_ = load_le16(&cfg[0x2e]);
  } else {
    device_type_ = static_cast<std::uint16_t>(device - 0x1040);
  }
  std::array<std::uint64_t, 6> sizes{};
  for (unsigned i = 0; i < 6; ++i) {
    auto b = fn_.bar(i);
    sizes[i] = b ? (*b)->size() : 0;
  }
  UV_TRY(caps_, pci::parse_capabilities(cfg, sizes, fn_.bdf()));
  if (!caps_.common || !caps_.notify || !caps_.isr)
    return Error(
        Errc::unsupported, fn_.bdf(), op,
        "no usable virtio modern capabilities (common/notify/ISR): a legacy-only device is not supported");
  UV_TRY(common_, fn_.bar(caps_.common->bar));
  UV_TRY(notify_, fn_.bar(caps_.notify->bar));
  UV_TRY(isr_, fn_.bar(caps_.isr->bar));
  if (caps_.device) {
    UV_TRY(device_, fn_.bar(caps_.device->bar));
  }
  return ok();
}

Result<std::uint64_t> VirtioPci::common_read(std::uint32_t off, unsigned width) {
  auto r = common_->read(caps_.common->offset + off, width);
  if (!r) return Error(r.error().code(), fn_.bdf(), "read common config", r.error().cause());
  return r;
}

Result<void> VirtioPci::common_write(std::uint32_t off, unsigned width, std::uint64_t v) {
  auto r = common_->write(caps_.common->offset + off, width, v);
  if (!r) return Error(r.error().code(), fn_.bdf(), "write common config", r.error().cause());
  return r;
}

Result<void> VirtioPci::reset(std::chrono::milliseconds deadline) {
  UV_TRY_VOID(common_write(cc::device_status, 1, 0));
  // Spec 4.1.4.3.2: after writing 0 the driver waits until device_status reads 0.
  const auto until = deadline_after(deadline);
  for (;;) {
    UV_TRY(std::uint64_t s, common_read(cc::device_status, 1));
    if (s == 0) break;
    if (s == kGoneStatus)
      return Error(Errc::not_found, fn_.bdf(), "reset device",
                   "device status reads 0xff: the device is gone (surprise removal?)");
    if (std::chrono::steady_clock::now() >= until)
      return Error(
          Errc::timeout, fn_.bdf(), "reset device",
          "device_status still " + std::to_string(s) + " after " + std::to_string(deadline.count()) + " ms");
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  needs_reset_seen_ = false;
  accepted_ = FeatureSet();
  queues_.clear();
  if (irqs_ready_) {
    (void)fn_.disable_irqs();
    eventfds_.clear();
    irqs_ready_ = false;
    msix_ = false;
  }
  return ok();
}

Result<std::uint8_t> VirtioPci::status() {
  UV_TRY(std::uint64_t s, common_read(cc::device_status, 1));
  return static_cast<std::uint8_t>(s);
}

Result<std::uint8_t> VirtioPci::live_status(const std::string& op) {
  UV_TRY(std::uint8_t s, status());
  if (s == kGoneStatus)
    return Error(Errc::not_found, fn_.bdf(), op,
                 "device status reads 0xff: the device is gone (surprise removal?)");
  return s;
}

Result<void> VirtioPci::add_status(std::uint8_t bits) {
  // A gone device's all-ones status must not be written back (it would
  // claim FEATURES_OK, DRIVER_OK, FAILED and the reserved bits at once).
  UV_TRY(std::uint8_t s, live_status("set device status " + std::to_string(bits)));
  return common_write(cc::device_status, 1, static_cast<std::uint8_t>(s | bits));
}

Result<FeatureSet> VirtioPci::device_features() {
  std::uint64_t bits = 0;
  for (std::uint32_t word = 0; word < 2; ++word) {
    UV_TRY_VOID(common_write(cc::device_feature_select, 4, word));
    UV_TRY(std::uint64_t w, common_read(cc::device_feature, 4));
    bits |= (w & 0xffffffffu) << (32 * word);
  }
  return FeatureSet(bits);
}

Result<void> VirtioPci::accept_features(FeatureSet features) {
  // Transport features this transport does not implement (spec 6): with
  // NOTIFICATION_DATA the notify write carries the next available index,
  // which notify() does not know; with NOTIF_CONFIG_DATA it carries the
  // queue's queue_notify_data instead of its index (4.1.5.2).
  for (unsigned bit : {feature::kNotificationData, feature::kNotifConfigData})
    if (features.has(bit))
      return Error(Errc::unsupported, fn_.bdf(), "accept features",
                   FeatureSet().with(bit).describe() + " is not implemented by the virtio-pci transport");
  for (std::uint32_t word = 0; word < 2; ++word) {
    UV_TRY_VOID(common_write(cc::driver_feature_select, 4, word));
    UV_TRY_VOID(common_write(cc::driver_feature, 4, (features.bits() >> (32 * word)) & 0xffffffffu));
  }
  UV_TRY_VOID(add_status(status::kFeaturesOk));
  UV_TRY(std::uint8_t s, live_status("accept features"));
  if (!(s & status::kFeaturesOk))
    return Error(Errc::unsupported, fn_.bdf(), "accept features",
                 "the device cleared FEATURES_OK: it does not accept " + features.describe());
  accepted_ = features;
  return ok();
}

Result<void> VirtioPci::read_device_config(std::uint32_t off, std::span<std::uint8_t> out,
                                           unsigned field_width) {
  const std::string op = "read device config";
  if (!caps_.device)
    return Error(Errc::unsupported, fn_.bdf(), op, "the device has no device-specific config");
  if (off > caps_.device->length || out.size() > caps_.device->length - off)
    return Error(Errc::invalid_argument, fn_.bdf(), op,
                 "bytes [" + std::to_string(off) + ", +" + std::to_string(out.size()) + ") outside the " +
                     std::to_string(caps_.device->length) + "-byte device config");
  // Spec 4.1.4.3.1 / 2.5.1: re-read until config_generation is unchanged.
  for (int attempt = 0; attempt < kConfigRetries; ++attempt) {
    UV_TRY(std::uint64_t before, common_read(cc::config_generation, 1));
    std::size_t i = 0;
    while (i < out.size()) {
      const std::uint64_t at = caps_.device->offset + off + i;
      const unsigned w = access_width(at, out.size() - i, field_width);
      UV_TRY(std::uint64_t v, device_->read(at, w));
      for (unsigned b = 0; b < w; ++b) out[i + b] = static_cast<std::uint8_t>(v >> (8 * b));
      i += w;
    }
    UV_TRY(std::uint64_t after, common_read(cc::config_generation, 1));
    if (before == after) return ok();
  }
  return Error(Errc::bad_device_data, fn_.bdf(), op,
               "config_generation kept changing over " + std::to_string(kConfigRetries) + " reads");
}

Result<void> VirtioPci::write_device_config(std::uint32_t off, std::span<const std::uint8_t> in,
                                            unsigned field_width) {
  const std::string op = "write device config";
  if (!caps_.device)
    return Error(Errc::unsupported, fn_.bdf(), op, "the device has no device-specific config");
  if (off > caps_.device->length || in.size() > caps_.device->length - off)
    return Error(Errc::invalid_argument, fn_.bdf(), op, "bytes outside the device config");
  std::size_t i = 0;
  while (i < in.size()) {
    const std::uint64_t at = caps_.device->offset + off + i;
    const unsigned w = access_width(at, in.size() - i, field_width);
    std::uint64_t v = 0;
    for (unsigned b = 0; b < w; ++b) v |= std::uint64_t{in[i + b]} << (8 * b);
    UV_TRY_VOID(device_->write(at, w, v));
    i += w;
  }
  return ok();
}

Result<std::uint16_t> VirtioPci::num_queues() {
  UV_TRY(std::uint64_t n, common_read(cc::num_queues, 2));
  return static_cast<std::uint16_t>(n);
}

Result<std::uint16_t> VirtioPci::queue_max_size(std::uint16_t q) {
  UV_TRY(std::uint16_t n, num_queues());
  if (q >= n)
    return Error(Errc::invalid_argument, fn_.bdf(), "select queue",
                 "queue " + std::to_string(q) + " does not exist (device has " + std::to_string(n) + ")");
  UV_TRY_VOID(common_write(cc::queue_select, 2, q));
  UV_TRY(std::uint64_t size, common_read(cc::queue_size, 2));
  return static_cast<std::uint16_t>(size);
}

Result<void> VirtioPci::setup_interrupts() {
  UV_TRY(std::uint16_t nq, num_queues());
  const unsigned msix_vectors = fn_.irq_count(pci::IrqKind::msix);
  if (irq_pref_ == IrqPreference::msix_then_intx && msix_vectors > 0 && caps_.msix) {
    const unsigned want = std::min<unsigned>(msix_vectors, nq + 1u + extra_vectors_);
    UV_TRY(eventfds_, fn_.enable_irqs(pci::IrqKind::msix, want));
    msix_ = true;
    // Config changes (and DEVICE_NEEDS_RESET, 2.1.2) arrive on vector 0.
    auto routed = [&]() -> Result<void> {
      UV_TRY_VOID(common_write(cc::config_msix_vector, 2, 0));
      UV_TRY(std::uint64_t back, common_read(cc::config_msix_vector, 2));
      if (back == kNoVector)
        return Error(Errc::unsupported, fn_.bdf(), "set config MSI-X vector", "the device refused vector 0");
      // Spec 4.1.5.1.2: the device answers the vector written or NO_VECTOR.
      if (back != 0)
        return Error(Errc::bad_device_data, fn_.bdf(), "set config MSI-X vector",
                     "vector 0 written, but the device reads back " + std::to_string(back));
      return ok();
    }();
    if (!routed) {
      (void)fn_.disable_irqs();
      eventfds_.clear();
      msix_ = false;
      return routed;
    }
  } else {
    if (fn_.irq_count(pci::IrqKind::intx) == 0)
      return Error(Errc::unsupported, fn_.bdf(), "enable interrupts",
                   "the function has neither MSI-X nor INTx");
    UV_TRY(eventfds_, fn_.enable_irqs(pci::IrqKind::intx, 1));
    msix_ = false;
  }
  irqs_ready_ = true;
  return ok();
}

Result<void> VirtioPci::setup_queue(std::uint16_t q, std::uint16_t size, const QueueAddresses& addr,
                                    bool interrupts) {
  const std::string op = "set up queue " + std::to_string(q);
  UV_TRY(std::uint16_t max, queue_max_size(q));  // also selects q
  if (max == 0) return Error(Errc::unsupported, fn_.bdf(), op, "queue is not available (size 0)");
  if (size == 0 || size > max || (size & (size - 1)) != 0)
    return Error(Errc::invalid_argument, fn_.bdf(), op,
                 "size " + std::to_string(size) + " must be a power of two <= " + std::to_string(max));
  if (interrupts && !irqs_ready_) {
    UV_TRY_VOID(setup_interrupts());
    UV_TRY_VOID(common_write(cc::queue_select, 2, q));
  }
  UV_TRY_VOID(common_write(cc::queue_size, 2, size));
  if (msix_ || irqs_ready_) {
    // Polling queues get NO_VECTOR so the device does not interrupt for them.
    std::uint16_t vector = kNoVector;
    if (interrupts && msix_)
      vector = static_cast<std::uint16_t>(std::min<std::size_t>(1u + q, eventfds_.size() - 1));
    if (msix_) {
      UV_TRY_VOID(common_write(cc::queue_msix_vector, 2, vector));
      UV_TRY(std::uint64_t back, common_read(cc::queue_msix_vector, 2));
      if (back == kNoVector && vector != kNoVector)
        return Error(Errc::unsupported, fn_.bdf(), op,
                     "the device refused MSI-X vector " + std::to_string(vector));
      // Spec 4.1.5.1.2: the device answers the vector written or NO_VECTOR.
      if (back != vector)
        return Error(Errc::bad_device_data, fn_.bdf(), op,
                     "MSI-X vector " + std::to_string(vector) + " written, but the device reads back " +
                         std::to_string(back));
    }
  }
  for (auto [reg, value] : {std::pair{cc::queue_desc, addr.desc}, std::pair{cc::queue_driver, addr.driver},
                            std::pair{cc::queue_device, addr.device}}) {
    UV_TRY_VOID(common_write(reg, 4, value & 0xffffffffu));
    UV_TRY_VOID(common_write(reg + 4, 4, value >> 32));
  }
  // Spec 4.1.4.4: the notify address is cap.offset + queue_notify_off *
  // notify_off_multiplier; it must leave room for the 16-bit write inside the
  // notify structure (4 bytes with NOTIFICATION_DATA).
  UV_TRY(std::uint64_t notify_off, common_read(cc::queue_notify_off, 2));
  const std::uint64_t off = notify_off * caps_.notify_off_multiplier;
  const unsigned width = 2;  // NOTIFICATION_DATA (4-byte writes) is refused in accept_features
  if (off > caps_.notify->length || caps_.notify->length - off < width)
    return Error(Errc::bad_device_data, fn_.bdf(), op,
                 "queue_notify_off " + std::to_string(notify_off) + " x multiplier " +
                     std::to_string(caps_.notify_off_multiplier) + " lies outside the " +
                     std::to_string(caps_.notify->length) + "-byte notify structure");
  UV_TRY_VOID(common_write(cc::queue_enable, 2, 1));
  if (queues_.size() <= q) queues_.resize(q + 1u);
  queues_[q] = QueueState{off, interrupts, true};
  return ok();
}

Result<void> VirtioPci::notify(std::uint16_t q) {
  if (q >= queues_.size() || !queues_[q].ready)
    return Error(Errc::invalid_argument, fn_.bdf(), "notify queue " + std::to_string(q), "queue not set up");
  auto r = notify_->write(caps_.notify->offset + queues_[q].notify_off, 2, q);
  if (!r) return r.error().within("notify queue " + std::to_string(q));
  return ok();
}

std::optional<int> VirtioPci::config_eventfd() const {
  if (eventfds_.empty()) return std::nullopt;
  return eventfds_[0];  // MSI-X vector 0, or the shared INTx line
}

std::optional<int> VirtioPci::queue_eventfd(std::uint16_t q) const {
  if (q >= queues_.size() || !queues_[q].interrupts || eventfds_.empty()) return std::nullopt;
  if (!msix_) return eventfds_[0];
  return eventfds_[std::min<std::size_t>(1u + q, eventfds_.size() - 1)];
}

Result<void> VirtioPci::ack_interrupt(std::uint16_t) {
  if (msix_) {
    // With a single vector, config changes (DEVICE_NEEDS_RESET, 2.1.2) come
    // on the queues' eventfd too: look at the status as INTx looks at the ISR.
    if (eventfds_.size() == 1) return check_healthy("interrupt");
    return ok();
  }
  // INTx: reading the ISR acknowledges it (spec 4.1.4.5); VFIO masked the line
  // when it fired, so unmask it again.
  auto isr = isr_->read(caps_.isr->offset, 1);
  if (!isr) return isr.error().within("read ISR");
  UV_TRY_VOID(fn_.unmask_intx());
  // ISR bit 1: a configuration change, which is how a device reports
  // DEVICE_NEEDS_RESET on INTx (spec 4.1.4.5.1, 2.1.2).
  if (*isr & 0x2) return check_healthy("interrupt");
  return ok();
}

}  // namespace uvirtio::driver
