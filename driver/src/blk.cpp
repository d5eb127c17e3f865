// virtio-blk driver (spec 5.2).
#include "uvirtio/driver/blk.hpp"

#include <cstring>

#include "uvirtio/base/le.hpp"

namespace uvirtio::driver {

const char* blk_feature::name(unsigned bit) {
  switch (bit) {
    case 1:
      return "SIZE_MAX";
    case 2:
      return "SEG_MAX";
    case 4:
      return "GEOMETRY";
    case 5:
      return "RO";
    case 6:
      return "BLK_SIZE";
    case 9:
      return "FLUSH";
    case 10:
      return "TOPOLOGY";
    case 11:
      return "CONFIG_WCE";
    case 12:
      return "MQ";
    case 13:
      return "DISCARD";
    case 14:
      return "WRITE_ZEROES";
    case 15:
      return "LIFETIME";
    case 16:
      return "SECURE_ERASE";
    default:
      return nullptr;
  }
}
namespace {

constexpr std::uint32_t kTypeIn = 0;     // VIRTIO_BLK_T_IN
constexpr std::uint32_t kTypeOut = 1;    // VIRTIO_BLK_T_OUT
constexpr std::uint32_t kTypeFlush = 4;  // VIRTIO_BLK_T_FLUSH
constexpr std::uint8_t kStatusOk = 0, kStatusIoErr = 1, kStatusUnsupp = 2;
constexpr std::size_t kBounce = 64 * 1024;

// struct virtio_blk_req's device-readable part (5.2.6).
struct BlkReqHeader {
  le32 type;
  le32 reserved;
  le64 sector;
};
static_assert(sizeof(BlkReqHeader) == 16);
constexpr std::size_t kStatusOffset = 16;

}  // namespace

FeaturePolicy Blk::policy(const BlkOptions& options) {
  FeaturePolicy p;
  p.supported = FeatureSet::of({blk_feature::kSizeMax, blk_feature::kSegMax, blk_feature::kRo,
                                blk_feature::kBlkSize, blk_feature::kFlush}) |
                options.extra_features;
  return p;
}

Result<std::unique_ptr<Blk>> Blk::open(const pci::Bdf& bdf, const BlkOptions& options) {
  UV_TRY(std::unique_ptr<Device> dev, open_device(bdf, kVirtioBlkType, policy(options), options.open));
  return attach(std::move(dev), options);
}

Result<std::unique_ptr<Blk>> Blk::attach(std::unique_ptr<Device> dev, const BlkOptions& options) {
  auto& t = dev->transport();
  // struct virtio_blk_config starts with le64 capacity (in 512-byte sectors).
  std::uint8_t cap[8];
  UV_TRY_VOID(t.read_device_config(0, cap, 4));
  const std::uint64_t capacity =
      static_cast<std::uint64_t>(load_le32(cap)) | (static_cast<std::uint64_t>(load_le32(cap + 4)) << 32);
  if (capacity > (std::uint64_t{1} << 54))
    return Error(Errc::bad_device_data, t.name(), "open block device",
                 "capacity of " + std::to_string(capacity) + " sectors overflows a byte offset");
  // With VIRTIO_BLK_F_BLK_SIZE, blk_size (le32 at offset 20) is the logical
  // block size: a device such as QEMU's with logical_block_size=4096 fails
  // requests not aligned to it, so reads and writes are refused unless whole
  // blocks.
  std::size_t block = kSectorSize;
  if (t.features().has(blk_feature::kBlkSize)) {
    std::uint8_t v[4];
    UV_TRY_VOID(t.read_device_config(20, v, 4));
    const std::uint32_t blk_size = load_le32(v);
    if (blk_size < kSectorSize || blk_size > kBounce || (blk_size & (blk_size - 1)) != 0)
      return Error(
          Errc::bad_device_data, t.name(), "open block device",
          "blk_size of " + std::to_string(blk_size) + " bytes is not a power of two between 512 and 65536");
    block = blk_size;
  }
  // One data descriptor per request: with VIRTIO_BLK_F_SIZE_MAX it may not
  // be longer than size_max (le32 at offset 8), so requests are cut to it
  // (whole blocks).
  std::size_t max_request = kBounce;
  if (t.features().has(blk_feature::kSizeMax)) {
    std::uint8_t v[4];
    UV_TRY_VOID(t.read_device_config(8, v, 4));
    const std::uint32_t size_max = load_le32(v);
    if (size_max < block)
      return Error(Errc::bad_device_data, t.name(), "open block device",
                   "size_max of " + std::to_string(size_max) + " bytes is less than one " +
                       std::to_string(block) + "-byte " + (block == kSectorSize ? "sector" : "block"));
    max_request = std::min<std::size_t>(max_request, size_max / block * block);
  }
  UV_TRY(std::unique_ptr<Virtqueue> vq, Virtqueue::create(t, 0, 128, options.completion));
  UV_TRY(pci::DmaRegion hdr, t.dma().alloc(64, 64));
  UV_TRY(pci::DmaRegion data, t.dma().alloc(kBounce, 4096));
  UV_TRY_VOID(dev->driver_ok());
  UV_TRY_VOID(t.check_healthy("start block device"));
  std::unique_ptr<Blk> b(new Blk(std::move(dev), std::move(vq), hdr, data, options));
  b->capacity_ = capacity;
  b->max_request_ = max_request;
  b->block_size_ = block;
  b->read_only_ = b->features().has(blk_feature::kRo);
  return b;
}

Result<void> Blk::check_range(std::uint64_t sector, std::size_t bytes, const char* op) const {
  if (bytes == 0 || bytes % block_size_ != 0)
    return Error(Errc::invalid_argument, name(), op,
                 "length " + std::to_string(bytes) + " is not a non-zero multiple of " +
                     std::to_string(block_size_) +
                     (block_size_ == kSectorSize ? "" : " (the device's logical block size)"));
  if (sector % (block_size_ / kSectorSize) != 0)
    return Error(Errc::invalid_argument, name(), op,
                 "sector " + std::to_string(sector) + " is not aligned to the device's " +
                     std::to_string(block_size_) + "-byte logical block size");
  const std::uint64_t n = bytes / kSectorSize;
  if (sector > capacity_ || n > capacity_ - sector)
    return Error(Errc::invalid_argument, name(), op,
                 "sectors [" + std::to_string(sector) + ", +" + std::to_string(n) + ") are beyond the " +
                     std::to_string(capacity_) + "-sector device");
  return ok();
}

Result<void> Blk::check_idle(const char* op) {
  while (vq_->ring().in_flight() != 0) {
    auto c = vq_->poll();
    if (!c) return std::move(c).error().within(op);
    if (!*c)
      return Error(Errc::busy, name(), op,
                   "an earlier request (abandoned at its deadline, or whose notification failed) is still "
                   "in flight and owns the request buffers; recover() the device");
  }
  return ok();
}

Result<std::size_t> Blk::recover() {
  UV_TRY(const std::vector<std::uint64_t> dropped, dev_->recover(*vq_, opt_.open.reset_deadline));
  ++recoveries_;
  return dropped.size();
}

Result<void> Blk::request(std::uint32_t type, std::uint64_t sector, std::size_t bytes,
                          bool device_writes_data, const std::uint8_t* src, const char* op) {
  // A request the device dropped is sent again after recovery.
  return retry_after_recovery(
      opt_.recover_on_reset, [&] { return request_once(type, sector, bytes, device_writes_data, src, op); },
      [this] { return recover(); });
}

Result<void> Blk::request_once(std::uint32_t type, std::uint64_t sector, std::size_t bytes,
                               bool device_writes_data, const std::uint8_t* src, const char* op) {
  auto& t = dev_->transport();
  UV_TRY_VOID(t.check_healthy(op));
  UV_TRY_VOID(check_idle(op));
  if (src != nullptr) std::memcpy(data_.va, src, bytes);
  auto* h = static_cast<BlkReqHeader*>(hdr_.va);
  h->type.set(type);
  h->reserved.set(0);
  h->sector.set(sector);
  auto* status = static_cast<std::uint8_t*>(hdr_.va) + kStatusOffset;
  *status = 0xff;  // the device must overwrite it
  rings::Buffer out[2] = {{hdr_.iova, sizeof(BlkReqHeader)}, {data_.iova, static_cast<std::uint32_t>(bytes)}};
  rings::Buffer in[2] = {{data_.iova, static_cast<std::uint32_t>(bytes)}, {hdr_.iova + kStatusOffset, 1}};
  std::span<const rings::Buffer> outs(out, bytes > 0 && !device_writes_data ? 2 : 1);
  std::span<const rings::Buffer> ins = bytes > 0 && device_writes_data
                                           ? std::span<const rings::Buffer>(in, 2)
                                           : std::span<const rings::Buffer>(in + 1, 1);
  const std::uint64_t token = next_token_++;
  // Queue errors carry the queue's own operation; ours goes in front.
  if (auto s = vq_->submit(outs, ins, token); !s) return std::move(s).error().within(op);
  auto waited = vq_->wait(opt_.timeout);
  if (!waited) return std::move(waited).error().within(op);
  const rings::Completion c = *waited;
  if (c.token != token) return Error(Errc::bad_device_data, name(), op, "completion for another request");
  UV_TRY_VOID(t.check_healthy(op));
  // The status byte is the last device-writable byte: a used length that
  // does not reach it means the device never wrote it.
  const std::uint32_t need = (device_writes_data ? static_cast<std::uint32_t>(bytes) : 0) + 1;
  if (c.len < need)
    return Error(Errc::bad_device_data, name(), op,
                 "used length " + std::to_string(c.len) + " does not cover the " + std::to_string(need) +
                     " bytes (data and status) the device must write");
  switch (*status) {
    case kStatusOk:
      return ok();
    case kStatusIoErr:
      return Error(Errc::device_error, name(), op, "the device reported an I/O error (VIRTIO_BLK_S_IOERR)",
                   EIO);
    case kStatusUnsupp:
      return Error(Errc::unsupported, name(), op,
                   "the device does not support this request (VIRTIO_BLK_S_UNSUPP)");
    default:
      return Error(Errc::bad_device_data, name(), op,
                   "status byte " + std::to_string(*status) + " is not defined");
  }
}

Result<void> Blk::read(std::uint64_t sector, std::span<std::uint8_t> out) {
  UV_TRY_VOID(check_range(sector, out.size(), "read"));
  for (std::size_t done = 0; done < out.size();) {
    const std::size_t n = std::min(out.size() - done, max_request_);
    UV_TRY_VOID(request(kTypeIn, sector + done / kSectorSize, n, true, nullptr, "read"));
    std::memcpy(out.data() + done, data_.va, n);
    done += n;
  }
  return ok();
}

Result<void> Blk::write(std::uint64_t sector, std::span<const std::uint8_t> in) {
  UV_TRY_VOID(check_range(sector, in.size(), "write"));
  if (read_only_)
    return Error(Errc::permission, name(), "write", "the device is read-only (VIRTIO_BLK_F_RO)");
  for (std::size_t done = 0; done < in.size();) {
    const std::size_t n = std::min(in.size() - done, max_request_);
    UV_TRY_VOID(request(kTypeOut, sector + done / kSectorSize, n, false, in.data() + done, "write"));
    done += n;
  }
  return ok();
}

Result<void> Blk::flush() {
  if (!features().has(blk_feature::kFlush)) return ok();
  return request(kTypeFlush, 0, 0, false, nullptr, "flush");
}

}  // namespace uvirtio::driver
