// libFuzzer target: the virtio-pci transport and the rng, blk and pmem
// drivers against a device whose registers lie.
//
// A software device with QEMU's layout (SoftVirtioDevice) serves the
// requests, but every read of its BAR (common config, ISR, device config)
// may be replaced by a value from the input, and its answers to requests
// (bytes written, used length) come from the input too. The driver then
// runs bring-up, queue setup, DRIVER_OK and a few requests with short
// deadlines. Checks: no crash, no out-of-bounds access (ASan), no hang, and
// every error names the device and says what it was doing. What the drivers
// accept must stay inside what they checked: a pmem range is mapped only
// with a nonzero page-multiple size, a blk read only within the capacity.
//
// Input: byte 0: bits 0-1 device (0 rng, 1 blk, 2 and 3 pmem), bit 2 MSI-X,
// bit 3 recover_on_reset (recovery then runs against the same lies); then u64
// features offered (VERSION_1 forced), u8 num_queues, u16 queue_max_size,
// 24 bytes of device config; the rest is a script read as the device runs:
// for each BAR read a byte b (b < 48: lie with a width-masked u64 from the
// script), for each request a byte choosing the used length (exact, zero,
// exact + u8, or a u32) and a fill byte for the writable buffers.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "fuzz_input.hpp"
#include "uvirtio/driver/blk.hpp"
#include "uvirtio/driver/device.hpp"
#include "uvirtio/driver/pmem.hpp"
#include "uvirtio/driver/rng.hpp"
#include "uvirtio/driver/soft_virtio.hpp"

namespace {

using namespace uvirtio;
using namespace uvirtio::driver;
using namespace std::chrono_literals;
using uvirtio::fuzz::Reader;

constexpr const char* kBdf = "0000:00:04.0";

template <class T>
void check_error(const Result<T>& r) {
  if (r) return;
  const std::string m = r.error().message();
  CHECK(m.find(kBdf) != std::string::npos);
  CHECK(!r.error().op().empty());
}

// BAR reads go to the real register, then may be replaced by the script.
class LyingBar final : public pci::BarIo {
 public:
  LyingBar(pci::BarIo& inner, Reader& script) : inner_(inner), script_(script) {}
  std::uint64_t size() const override { return inner_.size(); }
  volatile std::uint8_t* mapping() const override { return nullptr; }  // every access comes here
  Result<std::uint64_t> read(std::uint64_t off, unsigned width) override {
    auto v = inner_.read(off, width);
    if (!v || script_.empty() || script_.u8() >= 48) return v;
    const std::uint64_t lie = script_.u64();
    return width >= 8 ? lie : lie & ((std::uint64_t{1} << (8 * width)) - 1);
  }
  Result<void> write(std::uint64_t off, unsigned width, std::uint64_t value) override {
    return inner_.write(off, width, value);
  }

 private:
  pci::BarIo& inner_;
  Reader& script_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  const std::uint8_t head = in.u8();
  const unsigned kind = (head & 3) % 3;
  SoftVirtioOptions o;
  o.bdf = kBdf;
  o.device_type = kind == 0 ? 4 : kind == 1 ? 2 : kVirtioPmemType;
  o.msix_vectors = (head & 4) ? 2 : 0;
  const bool recover = (head & 8) != 0;
  o.features = in.u64() | (std::uint64_t{1} << 32);
  o.num_queues = static_cast<std::uint16_t>(in.u8() % 4);
  o.queue_max_size = in.u16();
  o.device_config.resize(24);
  for (auto& b : o.device_config) b = in.u8();
  Reader& script = in;
  SoftVirtioDevice dev(o);
  dev.set_handler([&script](std::uint16_t, std::span<const Segment> chain) -> std::uint32_t {
    const std::uint8_t how = script.u8(), fill = script.u8();
    std::uint32_t writable = 0;
    for (const Segment& s : chain)
      if (s.writable) {
        std::memset(s.data, fill, s.len);
        writable += s.len;
      }
    switch (how % 4) {
      case 0:
        return writable;
      case 1:
        return 0;
      case 2:
        return writable + script.u8();
      default:
        return script.u32();
    }
  });

  OpenOptions open;
  open.reset_deadline = 2ms;
  open.inflight_dir.clear();
  auto fn = pci::borrow(dev.function(), SoftVirtioDevice::kBar,
                        [&script](pci::BarIo& b) { return std::make_unique<LyingBar>(b, script); });
  if (kind == 0) {
    auto d = bring_up(std::move(fn), 4, FeaturePolicy{}, open);
    check_error(d);
    if (!d) return 0;
    RngOptions ro;
    ro.completion = CompletionMode::polling;
    ro.timeout = 5ms;
    ro.open = open;
    ro.recover_on_reset = recover;
    auto rng = Rng::attach(std::move(*d), ro);
    check_error(rng);
    if (!rng) return 0;
    std::uint8_t buf[40];
    check_error((*rng)->read(buf));
    check_error((*rng)->read(buf));
  } else if (kind == 1) {
    BlkOptions bo;
    bo.completion = CompletionMode::polling;
    bo.timeout = 5ms;
    bo.open = open;
    bo.recover_on_reset = recover;
    auto d = bring_up(std::move(fn), 2, Blk::policy(bo), open);
    check_error(d);
    if (!d) return 0;
    auto blk = Blk::attach(std::move(*d), bo);
    check_error(blk);
    if (!blk) return 0;
    std::vector<std::uint8_t> sector(1024);
    auto r = (*blk)->read(0, sector);
    check_error(r);
    if (r) CHECK((*blk)->capacity_sectors() >= 2);
    check_error((*blk)->write(1, std::span<const std::uint8_t>(sector).first(512)));
    check_error((*blk)->flush());
  } else {
    FeaturePolicy policy;
    policy.supported = FeatureSet::of({kPmemFeatureShmemRegion});
    auto d = bring_up(std::move(fn), kVirtioPmemType, policy, open);
    check_error(d);
    if (!d) return 0;
    std::vector<std::uint8_t> backing;
    PmemOptions po;
    po.completion = CompletionMode::polling;
    po.timeout = 5ms;
    po.open = open;
    po.recover_on_reset = recover;
    po.map_range = [&backing](const std::string& name, std::uint64_t start,
                              std::uint64_t n) -> Result<PmemRange> {
      CHECK(n != 0 && n % 4096 == 0 && start % 4096 == 0 && start + n > start);
      if (n > (1u << 20)) return Error(Errc::io, name, "map pmem range", "larger than the fuzzer maps");
      backing.assign(n, 0);
      return PmemRange{backing.data(), n, {}};
    };
    auto pm = Pmem::attach(std::move(*d), po);
    check_error(pm);
    if (!pm) return 0;
    CHECK((*pm)->size() == backing.size());
    const std::uint64_t line = 0x1122334455667788;
    check_error((*pm)->write(0, std::span(reinterpret_cast<const std::uint8_t*>(&line), 8), true));
    check_error((*pm)->persist((*pm)->data(), 64));
    check_error((*pm)->flush());
  }
  return 0;
}
