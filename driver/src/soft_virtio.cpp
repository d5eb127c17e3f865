// SoftVirtioDevice: see soft_virtio.hpp.
#include "uvirtio/driver/soft_virtio.hpp"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <utility>

#include "uvirtio/base/le.hpp"
#include "uvirtio/driver/features.hpp"
#include "uvirtio/rings/packed.hpp"
#include "uvirtio/rings/split.hpp"

namespace uvirtio::driver {
namespace {

// Register offsets of struct virtio_pci_common_cfg (spec 4.1.4.3).
enum : std::uint64_t {
  kDeviceFeatureSelect = 0x00,
  kDeviceFeature = 0x04,
  kDriverFeatureSelect = 0x08,
  kDriverFeature = 0x0c,
  kConfigMsixVector = 0x10,
  kNumQueues = 0x12,
  kDeviceStatus = 0x14,
  kConfigGeneration = 0x15,
  kQueueSelect = 0x16,
  kQueueSize = 0x18,
  kQueueMsixVector = 0x1a,
  kQueueEnable = 0x1c,
  kQueueNotifyOff = 0x1e,
  kQueueDesc = 0x20,
  kQueueDriver = 0x28,
  kQueueDevice = 0x30,
  kCommonEnd = 0x38,
};

constexpr std::uint8_t kDriverOk = 4, kFeaturesOk = 8, kNeedsReset = 64;

std::uint16_t load_acquire(le16& f) {
  return le16::from_raw(std::atomic_ref<std::uint16_t>(f.raw()).load(std::memory_order_acquire));
}
void store_release(le16& f, std::uint16_t v) {
  std::atomic_ref<std::uint16_t>(f.raw()).store(le16::to_raw(v), std::memory_order_release);
}

// Replaces the bytes [at, at + width) of a 64-bit register value.
std::uint64_t merge(std::uint64_t reg, unsigned at, unsigned width, std::uint64_t v) {
  const std::uint64_t mask = width == 8 ? ~0ull : ((1ull << (8 * width)) - 1) << (8 * at);
  return (reg & ~mask) | ((v << (8 * at)) & mask);
}

}  // namespace

SoftVirtioDevice::SoftVirtioDevice(SoftVirtioOptions options)
    : opt_(std::move(options)), fn_(opt_.bdf), queues_(opt_.num_queues), config_(opt_.device_config) {
  const auto pci_id =
      opt_.pci_device_id ? opt_.pci_device_id : static_cast<std::uint16_t>(0x1040 + opt_.device_type);
  fn_.set_ids(0x1af4, pci_id, opt_.device_type);
  pci::SoftBar& bar = fn_.add_bar(kBar, kBarSize);
  using pci::VirtioCfgType;
  if (opt_.modern_caps) {
    fn_.add_virtio_cap(VirtioCfgType::common, kBar, kCommon, kRegionSize);
    fn_.add_virtio_cap(VirtioCfgType::isr, kBar, kIsr, kRegionSize);
    if (!config_.empty())
      fn_.add_virtio_cap(VirtioCfgType::device, kBar, kDevice, static_cast<std::uint32_t>(config_.size()));
    fn_.add_virtio_cap(VirtioCfgType::notify, kBar, kNotify, kRegionSize, opt_.notify_multiplier);
  }
  if (opt_.msix_vectors > 0) {
    fn_.add_bar(1, 0x1000);
    fn_.add_msix_cap(static_cast<std::uint16_t>(opt_.msix_vectors), 1, 0x000, 1, 0x800);
  }
  bar.hook(
      kCommon, kRegionSize,
      [this](std::uint64_t off, unsigned w) -> std::uint64_t {
        if (faults.gone) return w >= 8 ? ~std::uint64_t{0} : (std::uint64_t{1} << (8 * w)) - 1;
        std::lock_guard lock(mu_);
        return common_read(off, w);
      },
      [this](std::uint64_t off, unsigned w, std::uint64_t v) {
        if (faults.gone) return;
        std::function<void(std::uint8_t)> hook;
        std::uint8_t status = 0;
        {
          std::lock_guard lock(mu_);
          common_write(off, w, v);
          if (off == kDeviceStatus && status_hook_) {
            hook = status_hook_;
            status = status_;
          }
        }
        if (hook) hook(status);
      });
  bar.hook(
      kIsr, kRegionSize,
      [this](std::uint64_t off, unsigned) -> std::uint64_t {
        std::lock_guard lock(mu_);
        if (off != 0) return 0;
        ++isr_reads_;
        return std::exchange(isr_, 0);  // spec 4.1.4.5: reading clears
      },
      [this](std::uint64_t, unsigned, std::uint64_t) {
        std::lock_guard lock(mu_);
        violation("write to the ISR");
      });
  bar.hook(
      kDevice, kRegionSize,
      [this](std::uint64_t off, unsigned w) {
        std::lock_guard lock(mu_);
        std::uint64_t v = 0;
        for (unsigned i = 0; i < w; ++i)
          if (off + i < config_.size()) v |= std::uint64_t{config_[off + i]} << (8 * i);
        return v;
      },
      [this](std::uint64_t off, unsigned w, std::uint64_t v) {
        std::function<void(std::uint32_t, unsigned)> hook;
        {
          std::lock_guard lock(mu_);
          for (unsigned i = 0; i < w; ++i)
            if (off + i < config_.size()) config_[off + i] = static_cast<std::uint8_t>(v >> (8 * i));
          hook = config_write_hook_;
        }
        if (hook) hook(static_cast<std::uint32_t>(off), w);
      });
  bar.hook(kNotify, kRegionSize, nullptr,
           [this](std::uint64_t off, unsigned w, std::uint64_t v) { notify(off, w, v); });
  std::lock_guard lock(mu_);
  reset_locked();
  for (std::uint16_t q = 0; q < queues_.size(); ++q) queues_[q].notify_off = q;
}

SoftVirtioDevice::~SoftVirtioDevice() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void SoftVirtioDevice::set_handler(RequestHandler handler) {
  std::lock_guard lock(mu_);
  handler_ = std::move(handler);
}

void SoftVirtioDevice::set_notify_hook(std::function<void(std::uint16_t)> hook) {
  std::lock_guard lock(mu_);
  notify_hook_ = std::move(hook);
}

void SoftVirtioDevice::set_status_hook(std::function<void(std::uint8_t)> hook) {
  std::lock_guard lock(mu_);
  status_hook_ = std::move(hook);
}

void SoftVirtioDevice::set_config_write_hook(std::function<void(std::uint32_t, unsigned)> hook) {
  std::lock_guard lock(mu_);
  config_write_hook_ = std::move(hook);
}

SoftVirtioDevice::QueueState SoftVirtioDevice::queue_state(std::uint16_t q) const {
  std::lock_guard lock(mu_);
  if (q >= queues_.size()) return {};
  const Queue& s = queues_[q];
  return QueueState{s.size, s.vector, s.enabled != 0, s.desc, s.driver, s.device};
}

bool SoftVirtioDevice::interrupt_queue(std::uint16_t q) {
  std::lock_guard lock(mu_);
  if (q >= queues_.size()) return false;
  if (fn_.irq_kind() == pci::IrqKind::msix)
    return queues_[q].vector != kNoVector && fn_.raise(queues_[q].vector);
  isr_ |= 1;
  return fn_.raise(0);
}

std::vector<std::uint8_t> SoftVirtioDevice::device_config() const {
  std::lock_guard lock(mu_);
  return config_;
}

void SoftVirtioDevice::start_worker(std::chrono::microseconds delay) {
  std::lock_guard lock(mu_);
  threaded_ = true;
  delay_ = delay;
  worker_ = std::thread([this] { worker_loop(); });
}

void SoftVirtioDevice::set_worker_delay(std::chrono::microseconds delay) {
  std::lock_guard lock(mu_);
  delay_ = delay;
}

void SoftVirtioDevice::worker_loop() {
  std::unique_lock lock(mu_);
  for (;;) {
    cv_.wait(lock, [this] { return stop_ || pending_; });
    if (stop_) return;
    pending_ = false;
    if (const auto delay = delay_; delay.count() > 0) {
      lock.unlock();
      std::this_thread::sleep_for(delay);
      lock.lock();
    }
    for (std::uint16_t q = 0; q < queues_.size(); ++q)
      if (queues_[q].enabled) process(q);
  }
}

// ---------------------------------------------------------------- common config

bool SoftVirtioDevice::width_is(unsigned width, unsigned want, std::uint64_t off) {
  if (width == want) return true;
  violation("common config offset " + std::to_string(off) + " accessed with width " + std::to_string(width) +
            " (field is " + std::to_string(want) + " bytes)");
  return false;
}

SoftVirtioDevice::Queue* SoftVirtioDevice::selected() {
  return queue_select_ < queues_.size() ? &queues_[queue_select_] : nullptr;
}

std::uint64_t SoftVirtioDevice::common_read(std::uint64_t off, unsigned width) {
  Queue* q = selected();
  // 64-bit queue addresses: one 8-byte access or two 4-byte halves.
  if (off >= kQueueDesc && off < kCommonEnd) {
    const std::uint64_t base = off & ~7ull;
    if (!(width == 8 && off == base) && !(width == 4 && off % 4 == 0)) {
      width_is(width, 4, off);
      return 0;
    }
    if (q == nullptr) return 0;
    const std::uint64_t reg = base == kQueueDesc ? q->desc : base == kQueueDriver ? q->driver : q->device;
    return width == 8 ? reg : (reg >> (8 * (off - base))) & 0xffffffffu;
  }
  switch (off) {
    case kDeviceFeatureSelect:
      return width_is(width, 4, off) ? feature_select_ : 0;
    case kDeviceFeature:
      if (!width_is(width, 4, off) || feature_select_ > 1) return 0;
      return (opt_.features >> (32 * feature_select_)) & 0xffffffffu;
    case kDriverFeatureSelect:
      return width_is(width, 4, off) ? driver_feature_select_ : 0;
    case kDriverFeature:
      if (!width_is(width, 4, off) || driver_feature_select_ > 1) return 0;
      return (driver_features_ >> (32 * driver_feature_select_)) & 0xffffffffu;
    case kConfigMsixVector:
      return width_is(width, 2, off) ? config_vector_ : 0;
    case kNumQueues:
      return width_is(width, 2, off) ? queues_.size() : 0;
    case kDeviceStatus:
      return width_is(width, 1, off) ? status_ : 0;
    case kConfigGeneration:
      if (!width_is(width, 1, off)) return 0;
      if (faults.unstable_generation) ++generation_;
      return generation_;
    case kQueueSelect:
      return width_is(width, 2, off) ? queue_select_ : 0;
    case kQueueSize:
      return width_is(width, 2, off) && q ? q->size : 0;
    case kQueueMsixVector:
      return width_is(width, 2, off) && q ? q->vector : kNoVector;
    case kQueueEnable:
      return width_is(width, 2, off) && q ? q->enabled : 0;
    case kQueueNotifyOff:
      return width_is(width, 2, off) && q ? q->notify_off : 0;
    default:
      return 0;
  }
}

void SoftVirtioDevice::common_write(std::uint64_t off, unsigned width, std::uint64_t v) {
  Queue* q = selected();
  if (off >= kQueueDesc && off < kCommonEnd) {
    const std::uint64_t base = off & ~7ull;
    if (!(width == 8 && off == base) && !(width == 4 && off % 4 == 0)) {
      width_is(width, 4, off);
      return;
    }
    if (q == nullptr) return violation("queue address written for a queue that does not exist");
    if (q->enabled) violation("queue address written while the queue is enabled");
    std::uint64_t& reg = base == kQueueDesc ? q->desc : base == kQueueDriver ? q->driver : q->device;
    reg = merge(reg, static_cast<unsigned>(off - base), width, v);
    return;
  }
  switch (off) {
    case kDeviceFeatureSelect:
      if (width_is(width, 4, off)) feature_select_ = static_cast<std::uint32_t>(v);
      return;
    case kDriverFeatureSelect:
      if (width_is(width, 4, off)) driver_feature_select_ = static_cast<std::uint32_t>(v);
      return;
    case kDriverFeature:
      if (!width_is(width, 4, off)) return;
      if (driver_feature_select_ > 1) return violation("driver_feature written with select > 1");
      driver_features_ = merge(driver_features_, 4 * driver_feature_select_, 4, v);
      return;
    case kConfigMsixVector:
      if (width_is(width, 2, off)) config_vector_ = accept_vector(v);
      return;
    case kDeviceStatus:
      if (width_is(width, 1, off)) write_status(static_cast<std::uint8_t>(v));
      return;
    case kQueueSelect:
      if (width_is(width, 2, off)) queue_select_ = static_cast<std::uint16_t>(v);
      return;
    case kQueueSize:
      if (!width_is(width, 2, off) || q == nullptr) return;
      if (v == 0 || v > opt_.queue_max_size || (v & (v - 1)) != 0)
        violation("queue_size " + std::to_string(v) + " is not a power of two <= the maximum");
      q->size = static_cast<std::uint16_t>(v);
      return;
    case kQueueMsixVector:
      if (width_is(width, 2, off) && q != nullptr) q->vector = accept_vector(v);
      return;
    case kQueueEnable:
      if (!width_is(width, 2, off) || q == nullptr) return;
      if (v != 1) return violation("queue_enable written with " + std::to_string(v));
      q->enabled = 1;
      return;
    default:
      violation("write to read-only or reserved common config offset " + std::to_string(off));
  }
}

std::uint16_t SoftVirtioDevice::accept_vector(std::uint64_t v) const {
  if (auto a = vector_answers_.find(static_cast<std::uint16_t>(v)); a != vector_answers_.end())
    return a->second;
  if (v >= opt_.msix_vectors) return kNoVector;
  return static_cast<std::uint16_t>(v);
}

void SoftVirtioDevice::write_status(std::uint8_t v) {
  status_writes_.push_back(v);
  if (v == 0) {
    if (!faults.reset_stuck) reset_locked();
    return;
  }
  if (status_ & ~v & ~kNeedsReset) violation("the driver cleared device_status bits");
  if ((v & kFeaturesOk) && !(status_ & kFeaturesOk)) {
    // QEMU refuses features it did not offer; a device behind an IOMMU
    // refuses a driver that does not accept ACCESS_PLATFORM (spec 6.1).
    const std::uint64_t offered = opt_.features;
    const bool ok = !faults.refuse_features_ok && (driver_features_ & ~offered) == 0 &&
                    (!((offered >> feature::kAccessPlatform) & 1) || negotiated(feature::kAccessPlatform)) &&
                    (!((offered >> feature::kVersion1) & 1) || negotiated(feature::kVersion1));
    if (!ok) v = static_cast<std::uint8_t>(v & ~kFeaturesOk);
  }
  status_ = static_cast<std::uint8_t>(v | (status_ & kNeedsReset));
}

void SoftVirtioDevice::reset_locked() {
  feature_select_ = driver_feature_select_ = 0;
  driver_features_ = 0;
  config_vector_ = kNoVector;
  queue_select_ = 0;
  status_ = 0;
  isr_ = 0;
  for (Queue& q : queues_) {
    const std::uint16_t notify_off = q.notify_off;
    std::vector<SwallowedChain> swallowed = std::move(q.swallowed);
    q = Queue{};
    q.size = opt_.queue_max_size;
    q.notify_off = notify_off;
    q.swallowed = std::move(swallowed);
  }
}

// ---------------------------------------------------------------- queues

void SoftVirtioDevice::notify(std::uint64_t off, unsigned width, std::uint64_t v) {
  std::unique_lock lock(mu_);
  ++notifies_;
  const auto q = static_cast<std::uint16_t>(v);
  if (width != 2 && width != 4) return violation("notify written with width " + std::to_string(width));
  // Spec 4.1.5.2: with NOTIFICATION_DATA the driver writes 32-bit notification data.
  if (negotiated(feature::kNotificationData) && width != 4)
    violation("notify written with width " + std::to_string(width) +
              " although NOTIFICATION_DATA was negotiated");
  if (q >= queues_.size()) return violation("notify of queue " + std::to_string(q) + " that does not exist");
  if (off != std::uint64_t{queues_[q].notify_off} * opt_.notify_multiplier)
    violation("notify of queue " + std::to_string(q) + " at the wrong address");
  if (notify_hook_) {
    auto hook = notify_hook_;
    lock.unlock();
    hook(q);
    return;
  }
  if (threaded_) {
    pending_ = true;
    lock.unlock();
    cv_.notify_all();
    return;
  }
  process(q);
}

void SoftVirtioDevice::process(std::uint16_t qi) {
  Queue& q = queues_[qi];
  if (!q.enabled) return violation("notify of a disabled queue");
  if (!(status_ & kDriverOk)) return violation("notify before DRIVER_OK");
  if (status_ & kNeedsReset) return;
  if (faults.needs_reset_on_notify) return needs_reset_locked();
  if (negotiated(feature::kRingPacked)) return process_packed(qi, q);
  process_split(qi, q);
}

void SoftVirtioDevice::raise_queue(const Queue& q) {
  if (fn_.irq_kind() == pci::IrqKind::msix) {
    if (q.vector != kNoVector) fn_.raise(q.vector);
  } else {
    isr_ |= 1;
    fn_.raise(0);
  }
}

void SoftVirtioDevice::process_split(std::uint16_t qi, Queue& q) {
  pci::SoftDma& dma = fn_.soft_dma();
  auto* desc =
      reinterpret_cast<rings::VirtqDesc*>(dma.translate(q.desc, rings::SplitLayout::desc_bytes(q.size)));
  auto* avail = reinterpret_cast<le16*>(dma.translate(q.driver, rings::SplitLayout::avail_bytes(q.size)));
  auto* used = reinterpret_cast<le16*>(dma.translate(q.device, rings::SplitLayout::used_bytes(q.size)));
  if (!desc || !avail || !used) return fatal("ring address outside DMA memory");
  auto* used_ring = reinterpret_cast<rings::VirtqUsedElem*>(used + 2);
  // VIRTIO_F_EVENT_IDX (2.7.7, 2.7.10): used_event follows the available
  // ring, avail_event the used ring.
  le16& used_event = avail[2 + q.size];
  le16& avail_event = used[2 + 4 * q.size];
  const bool event_idx = negotiated(feature::kEventIdx), indirect = negotiated(feature::kIndirectDesc);
  // VIRTIO_F_IN_ORDER (2.7.9): the chains taken here are one batch, reported
  // by a single used entry at the batch's first position naming its last chain.
  const bool in_order = negotiated(feature::kInOrder);
  const std::uint16_t used_before = q.used_idx;
  std::uint16_t batch = 0, batch_head = 0;
  std::uint32_t batch_len = 0;
  std::vector<Segment> chain;
  std::uint64_t writable = 0;
  // Appends one buffer of the chain; false (the device now needs a reset) when it is not DMA memory.
  const auto add = [&](std::uint64_t addr, std::uint32_t len, bool w) {
    std::uint8_t* p = dma.translate(addr, len);
    if (p == nullptr) {
      fatal("descriptor address outside DMA memory");
      return false;
    }
    if (!w && writable > 0) violation("readable descriptor after a writable one");
    chain.push_back(Segment{p, len, w});
    if (w) writable += len;
    return true;
  };
  for (;;) {
    const std::uint16_t avail_idx = load_acquire(avail[1]);
    if (static_cast<std::uint16_t>(avail_idx - q.last_avail) > q.size) return fatal("available index jumped");
    if (q.last_avail == avail_idx) {
      if (!event_idx) break;
      // Ask for a kick for the next chain, then look once more: a chain made
      // available before the driver could see avail_event got no kick.
      store_release(avail_event, q.last_avail);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      if (load_acquire(avail[1]) == q.last_avail) break;
      continue;
    }
    const std::uint16_t head = avail[2 + (q.last_avail & (q.size - 1u))].get();
    ++q.last_avail;
    ++requests_;
    if (head >= q.size) return fatal("available ring entry out of range");
    // 2.7.5: with IN_ORDER the driver allocates descriptors in ring order.
    if (in_order && head != q.next_desc) violation("IN_ORDER: chain head out of ring order");
    chain.clear();
    writable = 0;
    std::uint16_t descs = 0;  // ring descriptors the chain takes
    for (std::uint16_t i = head;;) {
      if (descs >= q.size) return fatal("descriptor chain loops");
      ++descs;
      const rings::VirtqDesc& d = desc[i];
      const std::uint16_t flags = d.flags.get();
      if (flags & rings::VIRTQ_DESC_F_INDIRECT) {
        // 2.7.5.3: a table, after zero or more direct descriptors, ends the chain.
        if (!indirect) return fatal("indirect descriptor not negotiated");
        if (flags & rings::VIRTQ_DESC_F_NEXT) return fatal("indirect descriptor with NEXT");
        const std::uint32_t n = d.len.get() / 16;
        if (d.len.get() % 16 != 0 || n == 0 || n > q.size) return fatal("indirect table of bad length");
        const auto* table =
            reinterpret_cast<const rings::VirtqDesc*>(dma.translate(d.addr.get(), d.len.get()));
        if (table == nullptr) return fatal("indirect table outside DMA memory");
        for (std::uint32_t j = 0, taken = 0;;) {
          if (taken++ == n) return fatal("indirect table loops");
          const std::uint16_t f = table[j].flags.get();
          if (f & rings::VIRTQ_DESC_F_INDIRECT) return fatal("indirect table entry is itself indirect");
          if (!add(table[j].addr.get(), table[j].len.get(), (f & rings::VIRTQ_DESC_F_WRITE) != 0)) return;
          if (!(f & rings::VIRTQ_DESC_F_NEXT)) break;
          j = table[j].next.get();
          if (j >= n) return fatal("indirect table entry next out of range");
        }
        break;
      }
      if (!add(d.addr.get(), d.len.get(), (flags & rings::VIRTQ_DESC_F_WRITE) != 0)) return;
      if (!(flags & rings::VIRTQ_DESC_F_NEXT)) break;
      if (in_order && d.next.get() != ((i + 1u) & (q.size - 1u)))
        violation("IN_ORDER: next out of ring order");
      i = d.next.get();
      if (i >= q.size) return fatal("descriptor next out of range");
    }
    q.next_desc = static_cast<std::uint16_t>((head + descs) & (q.size - 1u));
    if (faults.swallow) {
      q.swallowed.push_back(SwallowedChain{head, chain});
      continue;
    }
    std::uint32_t len = handler_ ? handler_(qi, chain) : 0;
    if (faults.used_len_excess > 0) len = static_cast<std::uint32_t>(writable + faults.used_len_excess);
    ++completions_;
    if (in_order) {
      ++batch;
      batch_head = head;
      batch_len = len;
      continue;
    }
    rings::VirtqUsedElem& e = used_ring[q.used_idx & (q.size - 1u)];
    e.id.set(faults.bad_used_id ? q.size + 3u : head);
    e.len.set(len);
    store_release(used[1], ++q.used_idx);
  }
  if (batch > 0) {
    rings::VirtqUsedElem& e = used_ring[q.used_idx & (q.size - 1u)];
    e.id.set(faults.bad_used_id ? q.size + 3u : batch_head);
    e.len.set(batch_len);
    q.used_idx = static_cast<std::uint16_t>(q.used_idx + batch);
    store_release(used[1], q.used_idx);
  }
  if (q.used_idx == used_before) return;
  // 2.7.7: with EVENT_IDX the driver asks for an interrupt when the used
  // index passes used_event; without it VIRTQ_AVAIL_F_NO_INTERRUPT says no.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (event_idx) {
    const std::uint16_t event = load_acquire(used_event);
    if (static_cast<std::uint16_t>(q.used_idx - event - 1) >=
        static_cast<std::uint16_t>(q.used_idx - used_before))
      return;
  } else if (load_acquire(avail[0]) & rings::VIRTQ_AVAIL_F_NO_INTERRUPT) {
    return;
  }
  raise_queue(q);
}

// The packed ring (2.8) through the rings library's device role; hostile
// answers are written raw at the queue's used position.
void SoftVirtioDevice::process_packed(std::uint16_t qi, Queue& q) {
  if (q.rogue) return;
  pci::SoftDma& dma = fn_.soft_dma();
  auto* ring =
      reinterpret_cast<rings::PvirtqDesc*>(dma.translate(q.desc, rings::PackedLayout::desc_bytes(q.size)));
  if (!q.packed) {
    std::uint8_t* drv = dma.translate(q.driver, rings::PackedLayout::event_bytes());
    std::uint8_t* dev = dma.translate(q.device, rings::PackedLayout::event_bytes());
    if (!ring || !drv || !dev) return fatal("ring address outside DMA memory");
    auto made = rings::PackedDeviceQueue::create(
        q.size, ring, drv, dev, fn_.bdf() + " queue " + std::to_string(qi),
        [&dma](std::uint64_t addr, std::uint32_t len, bool) { return dma.span(addr, len); });
    if (!made) return fatal(made.error().message());
    made->set_event_idx(negotiated(feature::kEventIdx));
    made->set_indirect(negotiated(feature::kIndirectDesc));
    if (auto r = made->set_in_order(negotiated(feature::kInOrder)); !r) return fatal(r.error().message());
    q.packed.emplace(std::move(made).value());
  }
  rings::PackedDeviceQueue& pq = *q.packed;
  const bool in_order = pq.in_order();
  rings::PackedDeviceQueue::Request req;
  std::vector<Segment> chain;
  bool raw = false;
  for (;;) {
    auto got = pq.pop_into(req);
    if (!got) return fatal(got.error().message());
    if (!*got) {
      if (pq.enable_notifications_and_check()) continue;
      break;
    }
    ++requests_;
    if (faults.swallow) continue;
    chain.clear();
    for (const auto s : req.readable)
      chain.push_back(
          Segment{const_cast<std::uint8_t*>(s.data()), static_cast<std::uint32_t>(s.size()), false});
    for (const auto s : req.writable)
      chain.push_back(Segment{s.data(), static_cast<std::uint32_t>(s.size()), true});
    std::uint32_t len = handler_ ? handler_(qi, chain) : 0;
    if (faults.used_len_excess > 0)
      len = static_cast<std::uint32_t>(req.writable_bytes + faults.used_len_excess);
    ++completions_;
    if (len > req.writable_bytes || faults.bad_used_id) {
      // 2.8.1: a used descriptor has AVAIL and USED equal to the wrap
      // counter; id and len are visible before the flags.
      pq.publish_used();
      rings::PvirtqDesc& d = ring[pq.used_position()];
      d.id.set(static_cast<std::uint16_t>(faults.bad_used_id ? q.size + 3u : req.head));
      d.len.set(len);
      const auto flags = static_cast<std::uint16_t>(
          (pq.used_wrap_counter() ? rings::VIRTQ_DESC_F_AVAIL | rings::VIRTQ_DESC_F_USED : 0) |
          rings::VIRTQ_DESC_F_WRITE);
      store_release(d.flags, flags);
      q.rogue = raw = true;
      break;
    }
    auto pushed = in_order ? pq.push_deferred(req.head, len) : pq.push(req.head, len);
    if (!pushed) return fatal(pushed.error().message());
  }
  pq.publish_used();
  if (pq.should_interrupt() || raw) raise_queue(q);
}

void SoftVirtioDevice::fatal(const std::string& why) {
  violation(why);
  needs_reset_locked();
}

void SoftVirtioDevice::needs_reset_locked() {
  status_ |= kNeedsReset;
  // Configuration change interrupt (spec 4.1.5.3).
  if (fn_.irq_kind() == pci::IrqKind::msix) {
    if (config_vector_ != kNoVector) fn_.raise(config_vector_);
  } else {
    isr_ |= 2;
    fn_.raise(0);
  }
}

// ---------------------------------------------------------------- test controls

void SoftVirtioDevice::set_needs_reset() {
  std::lock_guard lock(mu_);
  needs_reset_locked();
}

bool SoftVirtioDevice::complete_late(std::uint16_t qi, std::uint32_t id, std::uint32_t len) {
  std::lock_guard lock(mu_);
  Queue& q = queues_.at(qi);
  if (q.size == 0 || negotiated(feature::kRingPacked)) return false;
  auto* used =
      reinterpret_cast<le16*>(fn_.soft_dma().translate(q.device, rings::SplitLayout::used_bytes(q.size)));
  if (used == nullptr) return false;
  rings::VirtqUsedElem& e = reinterpret_cast<rings::VirtqUsedElem*>(used + 2)[q.used_idx & (q.size - 1u)];
  e.id.set(id);
  e.len.set(len);
  store_release(used[1], ++q.used_idx);
  return true;
}

std::vector<SoftVirtioDevice::SwallowedChain> SoftVirtioDevice::swallowed(std::uint16_t q) const {
  std::lock_guard lock(mu_);
  return queues_.at(q).swallowed;
}

void SoftVirtioDevice::set_queue_notify_off(std::uint16_t q, std::uint16_t notify_off) {
  std::lock_guard lock(mu_);
  queues_.at(q).notify_off = notify_off;
}

void SoftVirtioDevice::refuse_vector(std::uint16_t vector) { answer_vector(vector, kNoVector); }

void SoftVirtioDevice::answer_vector(std::uint16_t vector, std::uint16_t answer) {
  std::lock_guard lock(mu_);
  vector_answers_[vector] = answer;
}

void SoftVirtioDevice::set_device_config(std::uint32_t off, std::span<const std::uint8_t> bytes) {
  std::lock_guard lock(mu_);
  if (off > config_.size() || bytes.size() > config_.size() - off)
    throw std::out_of_range("set_device_config past the device config");
  std::copy(bytes.begin(), bytes.end(), config_.begin() + off);
  ++generation_;
}

std::uint8_t SoftVirtioDevice::status() const {
  std::lock_guard lock(mu_);
  return status_;
}
std::vector<std::uint8_t> SoftVirtioDevice::status_writes() const {
  std::lock_guard lock(mu_);
  return status_writes_;
}
std::uint64_t SoftVirtioDevice::driver_features() const {
  std::lock_guard lock(mu_);
  return driver_features_;
}
std::uint16_t SoftVirtioDevice::config_vector() const {
  std::lock_guard lock(mu_);
  return config_vector_;
}
std::uint16_t SoftVirtioDevice::queue_vector(std::uint16_t q) const {
  std::lock_guard lock(mu_);
  return queues_.at(q).vector;
}
std::uint16_t SoftVirtioDevice::queue_size(std::uint16_t q) const {
  std::lock_guard lock(mu_);
  return queues_.at(q).size;
}
bool SoftVirtioDevice::queue_enabled(std::uint16_t q) const {
  std::lock_guard lock(mu_);
  return queues_.at(q).enabled != 0;
}
std::uint8_t SoftVirtioDevice::isr() const {
  std::lock_guard lock(mu_);
  return isr_;
}
std::uint64_t SoftVirtioDevice::notifies() const {
  std::lock_guard lock(mu_);
  return notifies_;
}
std::uint64_t SoftVirtioDevice::requests() const {
  std::lock_guard lock(mu_);
  return requests_;
}
std::uint64_t SoftVirtioDevice::completions() const {
  std::lock_guard lock(mu_);
  return completions_;
}
std::uint64_t SoftVirtioDevice::isr_reads() const {
  std::lock_guard lock(mu_);
  return isr_reads_;
}
std::vector<std::string> SoftVirtioDevice::violations() const {
  std::lock_guard lock(mu_);
  return violations_;
}

}  // namespace uvirtio::driver
