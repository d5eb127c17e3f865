// virtio-rng driver (spec 5.4).
#include "uvirtio/driver/rng.hpp"

#include <algorithm>
#include <cstring>

namespace uvirtio::driver {
namespace {
constexpr std::size_t kBufBytes = 4096;
constexpr std::size_t kMaxSlots = 8;
}  // namespace

Result<std::unique_ptr<Rng>> Rng::open(const pci::Bdf& bdf, const RngOptions& options) {
  FeaturePolicy policy;  // entropy devices define no feature bits
  UV_TRY(std::unique_ptr<Device> dev, open_device(bdf, kVirtioRngType, policy, options.open));
  return attach(std::move(dev), options);
}

Result<std::unique_ptr<Rng>> Rng::attach(std::unique_ptr<Device> dev, const RngOptions& options) {
  UV_TRY(std::unique_ptr<Virtqueue> vq, Virtqueue::create(dev->transport(), 0, 64, options.completion));
  // One buffer per request slot (at most kMaxSlots): a request abandoned by a
  // timeout keeps its buffer until the device completes it, so a late
  // completion can never write into the buffer of a newer request.
  std::vector<pci::DmaRegion> bufs;
  for (std::size_t i = 0; i < std::min<std::size_t>(vq->size(), kMaxSlots); ++i) {
    UV_TRY(pci::DmaRegion b, dev->transport().dma().alloc(kBufBytes, 64));
    bufs.push_back(b);
  }
  UV_TRY_VOID(dev->driver_ok());
  UV_TRY_VOID(dev->transport().check_healthy("start entropy device"));
  return std::unique_ptr<Rng>(new Rng(std::move(dev), std::move(vq), std::move(bufs), options));
}

Result<std::size_t> Rng::recover() {
  UV_TRY(const std::vector<std::uint64_t> dropped, dev_->recover(*vq_, opt_.open.reset_deadline));
  std::fill(busy_.begin(), busy_.end(), false);
  ++recoveries_;
  return dropped.size();
}

Result<void> Rng::read(std::span<std::uint8_t> out) {
  const std::string op = "read entropy";
  std::size_t done = 0;
  int empty_answers = 0;
  bool reset_done = false;
  int stale_done = 0;
  // A request the device dropped by going NEEDS_RESET is resubmitted after
  // recovery (entropy requests are idempotent), once per call; the same
  // after a packed ring's stale completion (recovery_allowed).
  auto may_recover = [&](const Error& e) -> Result<bool> {
    if (!opt_.recover_on_reset || !recovery_allowed(e, reset_done, stale_done)) return false;
    UV_TRY(const std::size_t dropped, recover());
    (void)dropped;
    return true;
  };
  while (done < out.size()) {
    std::size_t slot = 0;
    while (slot < busy_.size() && busy_[slot]) ++slot;
    if (slot == busy_.size())
      return Error(
          Errc::busy, dev_->transport().name(), op,
          std::to_string(busy_.size()) + " abandoned requests are still in flight; reset the device");
    const auto want = static_cast<std::uint32_t>(std::min(out.size() - done, kBufBytes));
    const rings::Buffer in{bufs_[slot].iova, want};
    const std::uint64_t token = (next_seq_++ << 8) | slot;
    auto submitted = vq_->submit({}, std::span(&in, 1), token);
    if (!submitted) {
      // Published before its notification failed: the device may still
      // fill this buffer, so the next request must not share it.
      if (vq_->holds(token)) busy_[slot] = true;
      return std::move(submitted).error().within(op);
    }
    busy_[slot] = true;
    const auto until = deadline_after(opt_.timeout);
    for (;;) {
      auto waited = vq_->wait_until(until, opt_.timeout);
      if (!waited) {
        UV_TRY(const bool again, may_recover(waited.error()));
        if (!again) return std::move(waited).error().within(op);
        break;  // recovered: the loop submits the rest, this request included
      }
      const rings::Completion c = *waited;
      // Tokens come from the ring's shadow state (it validated the id), so
      // the slot is one we handed out.
      busy_[c.token & 0xff] = false;
      if (c.token != token) {
        ++stale_completions_;  // a request an earlier read gave up on
        continue;
      }
      // c.len was validated against the buffer by the ring. Zero bytes is
      // legal but a device that keeps answering with nothing is stuck.
      if (c.len == 0 && ++empty_answers > 16)
        return Error(Errc::device_error, dev_->transport().name(), op, "the device keeps returning 0 bytes");
      std::memcpy(out.data() + done, bufs_[slot].va, c.len);
      done += c.len;
      break;
    }
  }
  return ok();
}

}  // namespace uvirtio::driver
