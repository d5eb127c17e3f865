// virtio-pmem (virtio spec 1.2, 5.19): DAX persistence from userspace.
//
// The device exposes a host-file-backed memory range; stores to it become
// durable only after a FLUSH request on queue 0, which makes the host fsync
// the backing file. Pmem maps the range (shared memory region 0 when
// VIRTIO_PMEM_F_SHMEM_REGION is offered, else [start, start+size) through
// /dev/mem), and offers PMDK-style calls:
//
//   auto pm = uvirtio::driver::Pmem::open(bdf, {});
//   std::memcpy((*pm)->data() + off, buf, n);
//   if (auto r = (*pm)->persist((*pm)->data() + off, n); !r) ...  // EIO-class error on host fsync failure
//
// persist = CPU cache write-back of the range + drain + a coalesced device
// flush. Thread-safe: concurrent callers share device flushes (see
// FlushCoalescer); every request has a deadline.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "uvirtio/driver/device.hpp"
#include "uvirtio/driver/flush_coalescer.hpp"
#include "uvirtio/driver/virtqueue.hpp"

namespace uvirtio::driver {

inline constexpr std::uint16_t kVirtioPmemType = 27;
inline constexpr unsigned kPmemFeatureShmemRegion = 0;  // VIRTIO_PMEM_F_SHMEM_REGION
// "SHMEM_REGION" for bit 0, else nullptr: for FeatureSet::describe().
const char* pmem_feature_name(unsigned bit);
inline constexpr std::uint8_t kPmemShmemRegionId = 0;

enum class PmemMapping { shared_memory_region, devmem, custom };
const char* pmem_mapping_name(PmemMapping m);

// A mapping of the pmem range; `unmap` releases it.
struct PmemRange {
  std::uint8_t* data = nullptr;
  std::uint64_t size = 0;
  std::function<void()> unmap;
};

struct PmemOptions {
  // Hybrid: spin briefly (a flush takes a few hundred microseconds), then
  // sleep on the interrupt (QEMU's virtio-pmem has INTx only). Measured in
  // doc/benchmarks.md: spinning saves ~200 us per flush against pure INTx.
  CompletionMode completion = CompletionMode::hybrid;
  std::chrono::milliseconds timeout{10000};  // per device flush
  OpenOptions open;
  bool map = true;  // false: no data mapping (flush-only use, `pmem info`)
  // Maps [start, start+size) when the device has no shared memory region;
  // default: /dev/mem. Tests substitute their own.
  std::function<Result<PmemRange>(const std::string& device, std::uint64_t start, std::uint64_t size)>
      map_range;
  // When the device reports DEVICE_NEEDS_RESET during a device flush:
  // recover() and send the flush again, once per device flush; likewise, up
  // to kMaxStaleRecoveries times, when a packed ring meets the completion of
  // a flush from before a reset (Errc::stale_completion). That is safe: a
  // flush covers every write made before it started, and the new one starts
  // later still, so it covers every caller that shared the dropped one.
  // Off: the error reaches every such caller; any may recover().
  bool recover_on_reset = false;
  // Group commit: after a flush that covered several callers, the next one
  // waits up to this long (and at most half a flush) for them to come back,
  // so one flush covers them all (FlushCoalescer). 0 turns it off. Measured
  // in doc/benchmarks.md: 1.34-1.51x the persists/s at 4 threads on a disk.
  std::chrono::microseconds gather_limit{500};
};

class Pmem {
 public:
  static Result<std::unique_ptr<Pmem>> open(const pci::Bdf& bdf, const PmemOptions& options);
  static Result<std::unique_ptr<Pmem>> attach(std::unique_ptr<Device> dev, const PmemOptions& options);
  ~Pmem();

  const std::string& name() const { return dev_->transport().name(); }
  std::uint64_t start() const { return start_; }  // guest-physical, from device config
  std::uint64_t size() const { return size_; }
  PmemMapping mapping() const { return mapping_; }
  FeatureSet features() const { return dev_->transport().features(); }
  // The mapped range (nullptr when opened with map = false).
  std::uint8_t* data() const { return range_.data; }

  // Cache write-back of [addr, addr+len) (which must lie in the mapping),
  // drain, then a coalesced device flush.
  Result<void> persist(const void* addr, std::size_t len);
  // A device flush only (coalesced), for data already written back.
  Result<void> flush();
  // persist without waiting: `done` (not empty) runs when the covering
  // flush ended, on the thread that completed it (FlushCoalescer::
  // flush_async); flush() and persist() from inside it fail.
  Result<void> persist_async(const void* addr, std::size_t len, FlushCoalescer::Callback done);
  std::future<Result<void>> persist_future(const void* addr, std::size_t len);
  // Copies n bytes to dst (inside the mapping) and persists them.
  Result<void> memcpy_persist(void* dst, const void* src, std::size_t n);
  // After a flush failed (the host's fsync failed: device_error, EIO): a
  // later successful flush does not make the writes made before the failure
  // durable. Linux on the host marks pages whose write-back failed clean,
  // so no later fsync writes them again, although they keep our data in
  // its page cache until evicted. repersist() makes the host see every page
  // of [addr, addr+len) written again (one atomic no-op store per 4 KiB
  // page: safe while other threads write there), then persists the range.
  Result<void> repersist(const void* addr, std::size_t len);
  // Orders cache write-backs issued so far (SFENCE).
  static void drain();

  // Offset-based helpers with full bounds checks (the CLI uses them).
  Result<void> write(std::uint64_t offset, std::span<const std::uint8_t> bytes, bool persist_now);
  Result<void> read(std::uint64_t offset, std::span<std::uint8_t> out) const;
  Result<void> repersist_at(std::uint64_t offset, std::uint64_t len);

  // One device flush request, not coalesced (benchmarks use it as the floor).
  Result<void> device_flush();
  std::uint64_t persist_calls() const { return coalescer_.requests(); }
  std::uint64_t device_flushes() const { return coalescer_.device_flushes(); }
  // Flush requests completed by the device, coalesced or not (each is one
  // host fsync).
  std::uint64_t device_requests() const { return requests_done_.load(); }
  Virtqueue& queue() { return *vq_; }

  // Resets the device and brings it back with the same features and queue
  // (after DEVICE_NEEDS_RESET, or to reclaim flushes abandoned at their
  // deadline); waits for a flush in progress. Fails, leaving the device
  // FAILED, if the device now describes another range than the one mapped.
  // Returns how many requests were in flight: the device dropped them.
  // The mapped data is untouched: it lives in the host's backing file.
  Result<std::size_t> recover();
  std::uint64_t recoveries() const { return recoveries_.load(); }

 private:
  Pmem(std::unique_ptr<Device> dev, std::unique_ptr<Virtqueue> vq, std::vector<pci::DmaRegion> slots,
       PmemOptions opt);
  Result<void> check_range(const void* addr, std::size_t len, const char* op) const;
  // [offset, offset+len) inside the mapped range: its address, or why not.
  Result<std::uint8_t*> at_offset(std::uint64_t offset, std::uint64_t len, const char* op) const;
  Result<void> device_flush_locked();
  Result<std::size_t> recover_locked();

  std::unique_ptr<Device> dev_;
  std::unique_ptr<Virtqueue> vq_;
  std::vector<pci::DmaRegion> slots_;  // {le32 type; le32 ret} per request slot
  std::vector<bool> busy_;
  // Buffers of requests a reset dropped: the device may still write them
  // (recover_locked), so they are kept and never handed out again.
  std::vector<pci::DmaRegion> retired_slots_;
  PmemOptions opt_;
  std::uint64_t start_ = 0, size_ = 0;
  PmemMapping mapping_ = PmemMapping::devmem;
  PmemRange range_;
  std::mutex request_mutex_;  // one device request at a time
  std::uint64_t next_seq_ = 1;
  std::atomic<std::uint64_t> requests_done_{0};
  std::atomic<std::uint64_t> recoveries_{0};
  FlushCoalescer coalescer_;
};

// Maps [start, start+size) of physical memory through /dev/mem (write-back
// cacheable). Fails with a message naming the kernel settings involved.
Result<PmemRange> map_devmem(const std::string& device, std::uint64_t start, std::uint64_t size);

// What the C API (uvirtio/pmem.h) returns for an error: a negative errno.
// An OS call's failure (Errc::io) keeps its own errno.
int pmem_c_errno(const Error& e);

}  // namespace uvirtio::driver
