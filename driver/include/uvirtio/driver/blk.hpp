// virtio-blk (virtio spec 1.2, 5.2): read, write and flush.
//
// A small driver that exists mostly as a second conformance peer for the
// rings: every request is a chain of a device-readable header, the data
// buffer(s) and a device-writable status byte, so it exercises
// multi-descriptor chains. Data moves through a DMA bounce buffer; large
// transfers are split into requests of at most that size.
//
//   auto blk = uvirtio::driver::Blk::open(bdf, {});
//   std::vector<std::uint8_t> sector(512);
//   (*blk)->read(0, sector);
#pragma once

#include <chrono>
#include <memory>
#include <span>

#include "uvirtio/driver/device.hpp"
#include "uvirtio/driver/virtqueue.hpp"

namespace uvirtio::driver {

inline constexpr std::uint16_t kVirtioBlkType = 2;
inline constexpr std::size_t kSectorSize = 512;

namespace blk_feature {
inline constexpr unsigned kSizeMax = 1;
inline constexpr unsigned kSegMax = 2;
inline constexpr unsigned kRo = 5;
inline constexpr unsigned kBlkSize = 6;
inline constexpr unsigned kFlush = 9;
// The virtio 1.2 name of a virtio-blk feature bit (5.2.3), or nullptr: for
// FeatureSet::describe().
const char* name(unsigned bit);
}  // namespace blk_feature

struct BlkOptions {
  CompletionMode completion = CompletionMode::interrupt;
  std::chrono::milliseconds timeout{10000};
  OpenOptions open;
  FeatureSet extra_features;  // transport features to accept if offered (e.g. INDIRECT_DESC)
  // When the device reports DEVICE_NEEDS_RESET during a request: recover()
  // and resubmit that request, once (reads, writes and flushes are
  // idempotent); likewise for a packed ring's Errc::stale_completion (see
  // retry_after_recovery). Off: the error is returned and the caller may
  // recover().
  bool recover_on_reset = false;
};

class Blk {
 public:
  static Result<std::unique_ptr<Blk>> open(const pci::Bdf& bdf, const BlkOptions& options);
  static Result<std::unique_ptr<Blk>> attach(std::unique_ptr<Device> dev, const BlkOptions& options);
  static FeaturePolicy policy(const BlkOptions& options);

  const std::string& name() const { return dev_->transport().name(); }
  std::uint64_t capacity_sectors() const { return capacity_; }
  // The logical block size in bytes: blk_size with VIRTIO_BLK_F_BLK_SIZE
  // (a power of two, 512..64 KiB), else 512. Sector numbers stay in 512-byte
  // units (5.2.5).
  std::size_t block_size() const { return block_size_; }
  bool read_only() const { return read_only_; }
  FeatureSet features() const { return dev_->transport().features(); }
  Virtqueue& queue() { return *vq_; }

  // `out.size()` and the byte offset sector * 512 must be multiples of
  // block_size() (checked before anything is sent: a device with larger
  // logical blocks fails misaligned requests); sectors [sector, sector + n)
  // must exist.
  // A request that ran into its deadline keeps the request buffers until
  // the device completes it: until then requests fail with Errc::busy
  // (recover() reclaims them at once).
  Result<void> read(std::uint64_t sector, std::span<std::uint8_t> out);
  Result<void> write(std::uint64_t sector, std::span<const std::uint8_t> in);
  // Makes completed writes durable (VIRTIO_BLK_T_FLUSH); a no-op success
  // when the device did not offer VIRTIO_BLK_F_FLUSH (write-through).
  Result<void> flush();

  // Resets the device and brings it back with the same features and queue
  // (after DEVICE_NEEDS_RESET). Returns how many requests were in flight:
  // the device dropped them.
  Result<std::size_t> recover();
  std::uint64_t recoveries() const { return recoveries_; }

 private:
  Blk(std::unique_ptr<Device> dev, std::unique_ptr<Virtqueue> vq, pci::DmaRegion hdr, pci::DmaRegion data,
      BlkOptions opt)
      : dev_(std::move(dev)), vq_(std::move(vq)), hdr_(hdr), data_(data), opt_(opt) {}
  // `src`: the data of a write (copied into the bounce buffer once the
  // buffer is free), else null.
  Result<void> request(std::uint32_t type, std::uint64_t sector, std::size_t bytes, bool device_writes_data,
                       const std::uint8_t* src, const char* op);
  Result<void> request_once(std::uint32_t type, std::uint64_t sector, std::size_t bytes,
                            bool device_writes_data, const std::uint8_t* src, const char* op);
  Result<void> check_range(std::uint64_t sector, std::size_t bytes, const char* op) const;
  // Takes off completions of requests abandoned at their deadline; busy
  // while one is still in flight (it owns the header and bounce buffer).
  Result<void> check_idle(const char* op);

  std::unique_ptr<Device> dev_;
  std::unique_ptr<Virtqueue> vq_;
  pci::DmaRegion hdr_;   // virtio_blk_req header (16 bytes) + status byte at offset 16
  pci::DmaRegion data_;  // bounce buffer
  BlkOptions opt_;
  std::uint64_t capacity_ = 0;
  std::size_t max_request_ = 0;  // bytes per request: the bounce buffer, or size_max (blocks)
  std::size_t block_size_ = kSectorSize;
  bool read_only_ = false;
  std::uint64_t next_token_ = 1;
  std::uint64_t recoveries_ = 0;
};

}  // namespace uvirtio::driver
