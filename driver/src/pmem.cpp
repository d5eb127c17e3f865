// virtio-pmem driver (virtio spec 1.2, 5.19) and the persistence API.
#include "uvirtio/driver/pmem.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "uvirtio/base/deadline.hpp"
#include "uvirtio/base/le.hpp"
#include "uvirtio/driver/cache.hpp"

namespace uvirtio::driver {

const char* pmem_feature_name(unsigned bit) {
  return bit == kPmemFeatureShmemRegion ? "SHMEM_REGION" : nullptr;
}
namespace {

constexpr std::uint32_t kReqFlush = 0;  // VIRTIO_PMEM_REQ_TYPE_FLUSH
constexpr std::size_t kSlots = 8;       // request slots (abandoned requests keep theirs)
constexpr std::uint64_t kPage = 4096;

// One request: the device reads `type`, writes `ret` (5.19.6).
struct PmemRequest {
  le32 type;
  le32 ret;
};
static_assert(sizeof(PmemRequest) == 8);
static_assert(offsetof(PmemRequest, type) == 0 && offsetof(PmemRequest, ret) == 4);

}  // namespace

const char* pmem_mapping_name(PmemMapping m) {
  switch (m) {
    case PmemMapping::shared_memory_region:
      return "shared-memory-region";
    case PmemMapping::devmem:
      return "devmem";
    case PmemMapping::custom:
      return "custom";
  }
  return "unknown";
}

Result<PmemRange> map_devmem(const std::string& device, std::uint64_t start, std::uint64_t size) {
  const std::string op = "map pmem range through /dev/mem";
  int fd = ::open("/dev/mem", O_RDWR | O_CLOEXEC);  // no O_SYNC: keep the mapping cacheable
  if (fd < 0)
    return Error::from_errno(errno, device, op,
                             "open /dev/mem (needs root and CONFIG_DEVMEM; kernel lockdown forbids it)");
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, static_cast<off_t>(start));
  int e = errno;
  ::close(fd);
  if (p == MAP_FAILED)
    return Error::from_errno(
        e, device, op,
        "mmap of [" + std::to_string(start) + ", +" + std::to_string(size) +
            ") refused: with CONFIG_STRICT_DEVMEM/CONFIG_IO_STRICT_DEVMEM a range claimed "
            "by a kernel driver (virtio_pmem, nd_pmem, dax) is refused; make sure no kernel "
            "driver owns the device (or boot with iomem=relaxed)");
  auto* data = static_cast<std::uint8_t*>(p);
  return PmemRange{data, size, [data, size] { ::munmap(data, size); }};
}

namespace {

struct PmemConfig {
  std::uint64_t start = 0, size = 0;
};

// struct virtio_pmem_config { le64 start; le64 size; } (5.19.4), read as
// 32-bit halves under config_generation, and checked.
Result<PmemConfig> read_pmem_config(Transport& t, const std::string& op) {
  std::uint8_t cfg[16];
  UV_TRY_VOID(t.read_device_config(0, cfg, 4));
  const std::uint64_t start =
      static_cast<std::uint64_t>(load_le32(cfg)) | (static_cast<std::uint64_t>(load_le32(cfg + 4)) << 32);
  const std::uint64_t size = static_cast<std::uint64_t>(load_le32(cfg + 8)) |
                             (static_cast<std::uint64_t>(load_le32(cfg + 12)) << 32);
  if (size == 0 || size % kPage != 0 || start % kPage != 0 || start + size < start)
    return Error(Errc::bad_device_data, t.name(), op,
                 "device config start " + std::to_string(start) + " size " + std::to_string(size) +
                     " is not a non-empty page-aligned range");
  return PmemConfig{start, size};
}

}  // namespace

Pmem::Pmem(std::unique_ptr<Device> dev, std::unique_ptr<Virtqueue> vq, std::vector<pci::DmaRegion> slots,
           PmemOptions opt)
    : dev_(std::move(dev)),
      vq_(std::move(vq)),
      slots_(std::move(slots)),
      busy_(slots_.size(), false),
      opt_(std::move(opt)),
      coalescer_([this] { return device_flush(); }, dev_->transport().name()) {}

Pmem::~Pmem() {
  // The pending callbacks run first, while the range they persisted (and
  // may read) is still mapped.
  coalescer_.shutdown();
  if (range_.unmap) range_.unmap();
}

Result<std::unique_ptr<Pmem>> Pmem::open(const pci::Bdf& bdf, const PmemOptions& options) {
  FeaturePolicy policy;
  policy.supported = FeatureSet::of({kPmemFeatureShmemRegion});
  UV_TRY(std::unique_ptr<Device> dev, open_device(bdf, kVirtioPmemType, policy, options.open));
  return attach(std::move(dev), options);
}

Result<std::unique_ptr<Pmem>> Pmem::attach(std::unique_ptr<Device> dev, const PmemOptions& options) {
  auto& t = dev->transport();
  const std::string op = "open pmem device";
  UV_TRY(const PmemConfig cfg, read_pmem_config(t, op));
  const std::uint64_t start = cfg.start, size = cfg.size;

  UV_TRY(std::unique_ptr<Virtqueue> vq, Virtqueue::create(t, 0, 64, options.completion));
  std::vector<pci::DmaRegion> slots;
  for (std::size_t i = 0; i < std::min<std::size_t>(kSlots, vq->size()); ++i) {
    UV_TRY(pci::DmaRegion r, t.dma().alloc(sizeof(PmemRequest), 64));
    slots.push_back(r);
  }
  UV_TRY_VOID(dev->driver_ok());
  UV_TRY_VOID(t.check_healthy("start pmem device"));

  PmemRange range;
  PmemMapping mode = PmemMapping::devmem;
  if (options.map) {
    if (t.features().has(kPmemFeatureShmemRegion)) {
      // Spec 5.19.5: with SHMEM_REGION the range is shared memory region 0.
      mode = PmemMapping::shared_memory_region;
      const pci::VirtioShmRegion* shm = nullptr;
      for (const auto& s : t.capabilities().shm)
        if (s.id == kPmemShmemRegionId) shm = &s;
      if (shm == nullptr)
        return Error(Errc::bad_device_data, t.name(), op,
                     "VIRTIO_PMEM_F_SHMEM_REGION negotiated but there is no shared memory region 0");
      if (shm->region.length < size)
        return Error(Errc::bad_device_data, t.name(), op,
                     "shared memory region 0 (" + std::to_string(shm->region.length) +
                         " bytes) is smaller than the device's size " + std::to_string(size));
      UV_TRY(pci::BarIo * bar, dev->function().bar(shm->region.bar));
      if (bar->mapping() == nullptr)
        return Error(Errc::unsupported, t.name(), op, "BAR holding shared memory region 0 cannot be mmapped");
      range.data = const_cast<std::uint8_t*>(bar->mapping()) + shm->region.offset;
      range.size = size;
    } else if (options.map_range) {
      mode = PmemMapping::custom;
      UV_TRY(range, options.map_range(t.name(), start, size));
      if (range.data == nullptr || range.size < size) {
        if (range.unmap) range.unmap();
        return Error(Errc::invalid_argument, t.name(), op,
                     "the mapping hook returned " + std::to_string(range.size) + " bytes for a " +
                         std::to_string(size) + "-byte device");
      }
    } else {
      UV_TRY(range, map_devmem(t.name(), start, size));
    }
  }
  std::unique_ptr<Pmem> pm(new Pmem(std::move(dev), std::move(vq), std::move(slots), options));
  // The coalescer counts in nanoseconds: a longer limit (microseconds::max())
  // is the longest it can hold, not an overflow.
  constexpr auto kLongestGather =
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::nanoseconds::max());
  pm->coalescer_.set_gather_limit(options.gather_limit >= kLongestGather
                                      ? std::chrono::nanoseconds::max()
                                      : std::chrono::nanoseconds(options.gather_limit));
  // Hybrid completion spins only while no other caller waits for the next
  // flush: they need the CPU more than the leader needs a fast wake-up.
  Pmem* self = pm.get();
  pm->vq_->set_spin_while([self] { return !self->coalescer_.contended(); });
  pm->start_ = start;
  pm->size_ = size;
  pm->mapping_ = mode;
  pm->range_ = std::move(range);
  return pm;
}

Result<void> Pmem::device_flush() {
  std::lock_guard lk(request_mutex_);
  return retry_after_recovery(
      opt_.recover_on_reset, [this] { return device_flush_locked(); }, [this] { return recover_locked(); });
}

Result<std::size_t> Pmem::recover() {
  std::lock_guard lk(request_mutex_);
  return recover_locked();
}

Result<std::size_t> Pmem::recover_locked() {
  const std::string op = "recover pmem device";
  UV_TRY(const std::vector<std::uint64_t> dropped, dev_->recover(*vq_, opt_.open.reset_deadline));
  auto& t = dev_->transport();
  std::fill(busy_.begin(), busy_.end(), false);
  // A request the reset dropped may still be answered: QEMU 7.2 finishes a
  // flush its thread pool runs after the reset and writes its ret into the
  // old buffer. A new flush in that buffer could read the old answer (a
  // success for a failed fsync), so the slot gets a fresh buffer and the old
  // one is never used again. If none can be had, the slot stays out of use.
  for (const std::uint64_t token : dropped) {
    const std::size_t slot = token & 0xff;
    if (slot >= slots_.size()) continue;
    if (auto fresh = t.dma().alloc(sizeof(PmemRequest), 64); fresh.ok()) {
      retired_slots_.push_back(slots_[slot]);
      slots_[slot] = *fresh;
    } else {
      busy_[slot] = true;
    }
  }
  ++recoveries_;
  // The mapping was made for the range the device described at attach; a
  // device that now describes another must not be flushed for it.
  auto cfg = read_pmem_config(t, op);
  if (cfg.ok() && (cfg->start != start_ || cfg->size != size_)) {
    cfg = Error(Errc::bad_device_data, t.name(), op,
                "after the reset the device describes start " + std::to_string(cfg->start) + " size " +
                    std::to_string(cfg->size) + " instead of the mapped start " + std::to_string(start_) +
                    " size " + std::to_string(size_));
  }
  if (!cfg.ok()) {
    (void)t.add_status(status::kFailed);
    return std::move(cfg).error();
  }
  return dropped.size();
}

Result<void> Pmem::device_flush_locked() {
  const std::string op = "flush";
  auto& t = dev_->transport();
  UV_TRY_VOID(t.check_healthy(op));
  std::size_t slot = 0;
  while (slot < busy_.size() && busy_[slot]) ++slot;
  if (slot == busy_.size())
    return Error(
        Errc::busy, t.name(), op,
        std::to_string(busy_.size()) + " abandoned flush requests are still in flight; reset the device");
  auto* req = static_cast<PmemRequest*>(slots_[slot].va);
  req->type.set(kReqFlush);
  req->ret.set(0xffffffffu);  // not a value the device may leave behind on success
  const rings::Buffer out{slots_[slot].iova + offsetof(PmemRequest, type), sizeof(le32)};
  const rings::Buffer in{slots_[slot].iova + offsetof(PmemRequest, ret), sizeof(le32)};
  const std::uint64_t token = (next_seq_++ << 8) | slot;
  // Queue errors carry the queue's own operation; ours goes in front.
  if (auto sub = vq_->submit(std::span(&out, 1), std::span(&in, 1), token); !sub) {
    // Published before its notification failed, the request is in flight
    // all the same: the device may answer it into this buffer later, so the
    // next flush must not share it (a reset drops and retires it).
    if (vq_->holds(token)) busy_[slot] = true;
    return std::move(sub).error().within(op);
  }
  busy_[slot] = true;
  const auto until = deadline_after(opt_.timeout);
  for (;;) {
    auto waited = vq_->wait_until(until, opt_.timeout);
    if (!waited) return std::move(waited).error().within(op);
    const rings::Completion c = *waited;
    busy_[c.token & 0xff] = false;
    ++requests_done_;
    if (c.token != token) continue;  // a request an earlier flush gave up on
    UV_TRY_VOID(t.check_healthy(op));
    if (c.len < sizeof(le32))
      return Error(Errc::bad_device_data, t.name(), op,
                   "the device wrote " + std::to_string(c.len) + " bytes of the 4-byte response");
    const std::uint32_t ret = req->ret.get();
    if (ret != 0)
      return Error(
          Errc::device_error, t.name(), op,
          "the host failed to fsync the backing file (EIO; device answered ret=" + std::to_string(ret) + ")",
          EIO);
    return ok();
  }
}

Result<void> Pmem::check_range(const void* addr, std::size_t len, const char* op) const {
  if (range_.data == nullptr)
    return Error(Errc::invalid_argument, name(), op, "the pmem range is not mapped");
  const auto a = reinterpret_cast<std::uintptr_t>(addr);
  const auto base = reinterpret_cast<std::uintptr_t>(range_.data);
  if (len == 0) return Error(Errc::invalid_argument, name(), op, "length 0");
  // The device's size, not the mapping's: a mapping hook may map more, and
  // the device flushes only its own range.
  if (a < base || a - base > size_ || len > size_ - (a - base))
    return Error(Errc::invalid_argument, name(), op,
                 "[" + std::to_string(a - base) + ", +" + std::to_string(len) + ") is outside the " +
                     std::to_string(size_) + "-byte pmem range");
  return ok();
}

Result<void> Pmem::persist(const void* addr, std::size_t len) {
  UV_TRY_VOID(check_range(addr, len, "persist"));
  cache::flush(addr, len);
  cache::drain();
  return coalescer_.flush();
}

Result<void> Pmem::flush() { return coalescer_.flush(); }

Result<void> Pmem::persist_async(const void* addr, std::size_t len, FlushCoalescer::Callback done) {
  UV_TRY_VOID(check_range(addr, len, "persist"));
  cache::flush(addr, len);
  cache::drain();
  return coalescer_.flush_async(std::move(done));  // refuses an empty callback
}

std::future<Result<void>> Pmem::persist_future(const void* addr, std::size_t len) {
  if (auto r = check_range(addr, len, "persist"); !r) {
    std::promise<Result<void>> p;
    p.set_value(r);
    return p.get_future();
  }
  cache::flush(addr, len);
  cache::drain();
  return coalescer_.flush_future();
}

Result<void> Pmem::memcpy_persist(void* dst, const void* src, std::size_t n) {
  UV_TRY_VOID(check_range(dst, n, "memcpy_persist"));
  if (src == nullptr) return Error(Errc::invalid_argument, name(), "memcpy_persist", "source is null");
  std::memcpy(dst, src, n);
  return persist(dst, n);
}

void Pmem::drain() { cache::drain(); }

Result<void> Pmem::write(std::uint64_t offset, std::span<const std::uint8_t> bytes, bool persist_now) {
  if (bytes.empty()) return Error(Errc::invalid_argument, name(), "write", "nothing to write (length 0)");
  UV_TRY(std::uint8_t* const at, at_offset(offset, bytes.size(), "write"));
  std::memcpy(at, bytes.data(), bytes.size());
  if (!persist_now) return ok();
  return persist(at, bytes.size());
}

Result<void> Pmem::repersist(const void* addr, std::size_t len) {
  UV_TRY_VOID(check_range(addr, len, "repersist"));
  // One byte per host page, the first of the range and then each page start
  // in it (the mapping is page-aligned). An atomic OR of zero stores without
  // changing anything, whatever other threads write meanwhile; the compiler
  // may not drop it (an atomic read-modify-write is never elided).
  auto* p = static_cast<std::uint8_t*>(const_cast<void*>(addr));
  std::uint8_t* const end = p + len;
  while (p < end) {
    std::atomic_ref<std::uint8_t>(*p).fetch_or(0, std::memory_order_relaxed);
    p = reinterpret_cast<std::uint8_t*>((reinterpret_cast<std::uintptr_t>(p) | (kPage - 1)) + 1);
  }
  return persist(addr, len);
}

Result<void> Pmem::repersist_at(std::uint64_t offset, std::uint64_t len) {
  if (len == 0) return Error(Errc::invalid_argument, name(), "repersist", "length 0");
  UV_TRY(std::uint8_t* const at, at_offset(offset, len, "repersist"));
  return repersist(at, len);
}

Result<std::uint8_t*> Pmem::at_offset(std::uint64_t offset, std::uint64_t len, const char* op) const {
  if (offset > size_ || len > size_ - offset)
    return Error(Errc::invalid_argument, name(), op,
                 "offset " + std::to_string(offset) + " + length " + std::to_string(len) + " is beyond the " +
                     std::to_string(size_) + "-byte pmem range");
  if (range_.data == nullptr)
    return Error(Errc::invalid_argument, name(), op, "the pmem range is not mapped");
  return range_.data + offset;
}

Result<void> Pmem::read(std::uint64_t offset, std::span<std::uint8_t> out) const {
  if (out.empty()) return Error(Errc::invalid_argument, name(), "read", "nothing to read (length 0)");
  UV_TRY(const std::uint8_t* const at, at_offset(offset, out.size(), "read"));
  std::memcpy(out.data(), at, out.size());
  return ok();
}

}  // namespace uvirtio::driver
