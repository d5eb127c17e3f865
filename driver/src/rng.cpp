// virtio-rng driver (spec 5.4).
#include "uvirtio/driver/rng.hpp"

#include <cstring>

namespace uvirtio::driver {
namespace {
constexpr std::size_t kBufBytes = 4096;
}

Result<std::unique_ptr<Rng>> Rng::open(const pci::Bdf& bdf, const RngOptions& options) {
  FeaturePolicy policy;  // entropy devices define no feature bits
  UV_TRY(std::unique_ptr<Device> dev, open_device(bdf, kVirtioRngType, policy, options.open));
  return attach(std::move(dev), options);
}

Result<std::unique_ptr<Rng>> Rng::attach(std::unique_ptr<Device> dev, const RngOptions& options) {
  UV_TRY(std::unique_ptr<Virtqueue> vq, Virtqueue::create(dev->transport(), 0, 64, options.completion));
  UV_TRY(pci::DmaRegion buf, dev->transport().dma().alloc(kBufBytes, 64));
  UV_TRY_VOID(dev->driver_ok());
  UV_TRY_VOID(dev->transport().check_healthy("start entropy device"));
  return std::unique_ptr<Rng>(new Rng(std::move(dev), std::move(vq), buf, options));
}

Result<void> Rng::read(std::span<std::uint8_t> out) {
  std::size_t done = 0;
  int empty_answers = 0;
  while (done < out.size()) {
    const auto want = static_cast<std::uint32_t>(std::min(out.size() - done, kBufBytes));
    const rings::Buffer in{buf_.iova, want};
    const std::uint64_t token = next_token_++;
    auto submitted = vq_->submit({}, std::span(&in, 1), token);
    if (!submitted) return std::move(submitted).error();
    UV_TRY(rings::Completion c, vq_->wait(opt_.timeout));
    if (c.token != token)
      return Error(Errc::bad_device_data, dev_->transport().name(), "read entropy",
                   "completion for request " + std::to_string(c.token) + " while waiting for " + std::to_string(token));
    // c.len was validated against the buffer by the ring. Zero bytes is legal
    // but a device that keeps answering with nothing is stuck.
    if (c.len == 0 && ++empty_answers > 16)
      return Error(Errc::device_error, dev_->transport().name(), "read entropy", "the device keeps returning 0 bytes");
    std::memcpy(out.data() + done, buf_.va, c.len);
    done += c.len;
  }
  return ok();
}

}  // namespace uvirtio::driver
