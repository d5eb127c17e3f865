// Unit tests for the virtio-pmem driver (virtio spec 1.2, 5.19) against
// FakeVirtioDevice playing a pmem device: device id 27, device config
// {le64 start; le64 size}, one request queue whose requests are a 4-byte
// device-readable type (0: FLUSH) and a 4-byte device-writable ret. The pmem
// range itself is a heap buffer handed out through PmemOptions::map_range
// (the "host file"), so the bounds checks can be verified byte for byte.
// Every error must carry its exact Errc and the device's BDF; a stuck or
// dead device must give its error within the configured (small) timeout.
#include "uvirtio/driver/pmem.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <future>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "support/fake_virtio.hpp"
#include "uvirtio/base/le.hpp"
#include "uvirtio/driver/pmem_c.hpp"

namespace uvirtio::driver {
namespace {

using test::FakeVirtioDevice;
using test::FakeVirtioOptions;
using test::Segment;
using namespace std::chrono_literals;

constexpr const char* kBdf = "0000:00:04.0";  // the fake's default
// Above 4 GiB, so both 32-bit halves of the le64 fields matter.
constexpr std::uint64_t kStart = 0x0000'0012'3456'7000ull;
constexpr std::uint64_t kSize = 64 * 1024;
constexpr std::uint64_t kDeviceStatus = FakeVirtioDevice::kCommon + 0x14;  // common config device_status
const std::vector<std::string> kNone;                                      // no driver protocol violations

std::vector<std::uint8_t> pmem_config(std::uint64_t start, std::uint64_t size) {
  std::vector<std::uint8_t> c(16);
  store_le32(c.data(), static_cast<std::uint32_t>(start));
  store_le32(c.data() + 4, static_cast<std::uint32_t>(start >> 32));
  store_le32(c.data() + 8, static_cast<std::uint32_t>(size));
  store_le32(c.data() + 12, static_cast<std::uint32_t>(size >> 32));
  return c;
}

// The ring features QEMU's virtio-pmem offers with packed=on, which the
// driver accepts: the packed layout, event index and indirect tables.
constexpr std::uint64_t kPackedRingFeatures =
    (1ull << feature::kRingPacked) | (1ull << feature::kEventIdx) | (1ull << feature::kIndirectDesc);

FakeVirtioOptions pmem_device(unsigned msix_vectors = 0, std::uint64_t start = kStart,
                              std::uint64_t size = kSize) {
  FakeVirtioOptions o;
  o.device_type = kVirtioPmemType;
  o.msix_vectors = msix_vectors;  // QEMU's virtio-pmem: INTx only
  o.device_config = pmem_config(start, size);
  return o;  // offered features: VERSION_1 only
}

// Polls pred() until it holds or `limit` passes (for states no callback
// signals: the device has taken a request, ...).
template <class Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = 5s) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(50us);
  }
  return true;
}

class Countdown {
 public:
  // Notifies under the lock: a waiter may destroy the Countdown as soon as
  // it sees the count, while this thread is still inside hit().
  void hit() {
    std::lock_guard lk(m_);
    ++n_;
    cv_.notify_all();
  }
  bool wait_for_count(std::uint64_t want, std::chrono::milliseconds limit = 5s) {
    std::unique_lock lk(m_);
    return cv_.wait_for(lk, limit, [&] { return n_ >= want; });
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  std::uint64_t n_ = 0;
};

// The memory behind the pmem range: map_range hands out this buffer, filled
// with a pattern so an unwanted store shows up in a snapshot comparison.
struct Backing {
  std::vector<std::uint8_t> mem;
  std::string device;
  std::uint64_t start = 0, size = 0;
  int maps = 0, unmaps = 0;
  std::uint64_t shrink = 0;   // a buggy hook: maps this many bytes fewer than asked
  std::uint64_t grow = 0;     // a hook that maps this many bytes more (e.g. rounded up to pages)
  std::optional<Error> fail;  // the hook fails with this

  std::function<Result<PmemRange>(const std::string&, std::uint64_t, std::uint64_t)> hook() {
    return [this](const std::string& dev, std::uint64_t s, std::uint64_t n) -> Result<PmemRange> {
      ++maps;
      device = dev;
      start = s;
      size = n;
      if (fail) return *fail;
      mem.resize(n - shrink + grow);
      for (std::size_t i = 0; i < mem.size(); ++i) mem[i] = static_cast<std::uint8_t>(i * 7 + 3);
      return PmemRange{mem.data(), mem.size(), [this] { ++unmaps; }};
    };
  }
};

// What the device saw of one request.
struct SeenRequest {
  std::uint16_t queue = 0;
  std::vector<std::uint32_t> lens;
  std::vector<bool> writable;
  std::uint32_t type = 0xdeadbeef;  // first readable 4 bytes
};

// The device side: answers each FLUSH with `ret` (le32) in the writable
// buffer and used length `used_len`, optionally after `work`. Runs on the
// device's thread (or inside the notify), under the fake's lock.
class FlushDevice {
 public:
  std::atomic<std::uint32_t> ret{0};
  std::atomic<std::uint32_t> used_len{4};
  std::atomic<std::int64_t> work_us{0};
  std::atomic<bool>* raise_on_request = nullptr;  // set to true when a request is served

  test::RequestHandler handler() {
    return [this](std::uint16_t q, std::span<const Segment> chain) -> std::uint32_t {
      SeenRequest s;
      s.queue = q;
      for (const Segment& seg : chain) {
        s.lens.push_back(seg.len);
        s.writable.push_back(seg.writable);
      }
      if (!chain.empty() && !chain[0].writable && chain[0].len >= 4) s.type = load_le32(chain[0].data);
      for (const Segment& seg : chain)
        if (seg.writable && seg.len >= 4) store_le32(seg.data, ret.load());
      if (const auto us = work_us.load(); us > 0) std::this_thread::sleep_for(std::chrono::microseconds(us));
      {
        std::lock_guard lk(m_);
        seen_.push_back(std::move(s));
      }
      if (raise_on_request != nullptr) *raise_on_request = true;
      return used_len.load();
    };
  }
  std::vector<SeenRequest> seen() const {
    std::lock_guard lk(m_);
    return seen_;
  }

 private:
  mutable std::mutex m_;
  std::vector<SeenRequest> seen_;
};

struct PmemSetup {
  CompletionMode completion = PmemOptions{}.completion;  // the library's default
  std::chrono::milliseconds timeout = 2s;
  bool map = true;
  bool recover_on_reset = false;
};

// bring_up() on `fn` (default: the fake's function) and Pmem::attach().
Result<std::unique_ptr<Pmem>> try_attach(FakeVirtioDevice& dev, Backing& backing, const PmemSetup& s = {},
                                         std::unique_ptr<pci::Function> fn = nullptr) {
  FeaturePolicy policy;
  policy.supported = FeatureSet::of({kPmemFeatureShmemRegion});
  auto d = bring_up(fn ? std::move(fn) : dev.take_function(), kVirtioPmemType, policy);
  if (!d.ok()) return std::move(d).error();
  PmemOptions opt;
  opt.completion = s.completion;
  opt.timeout = s.timeout;
  opt.map = s.map;
  opt.recover_on_reset = s.recover_on_reset;
  opt.map_range = backing.hook();
  return Pmem::attach(std::move(d).value(), opt);
}

std::unique_ptr<Pmem> attach(FakeVirtioDevice& dev, Backing& backing, const PmemSetup& s = {},
                             std::unique_ptr<pci::Function> fn = nullptr) {
  auto pm = try_attach(dev, backing, s, std::move(fn));
  EXPECT_TRUE(pm.ok()) << pm.error().message();
  return pm.ok() ? std::move(pm).value() : nullptr;
}

void expect_error(const Result<void>& r, Errc code, const std::string& needle) {
  ASSERT_FALSE(r.ok()) << "expected " << errc_name(code);
  EXPECT_EQ(r.error().code(), code) << errc_name(r.error().code()) << ": " << r.error().message();
  EXPECT_NE(r.error().message().find(kBdf), std::string::npos) << r.error().message();
  EXPECT_NE(r.error().message().find(needle), std::string::npos)
      << "'" << needle << "' not in: " << r.error().message();
}

template <class T>
void expect_error(const Result<T>& r, Errc code, const std::string& needle) {
  ASSERT_FALSE(r.ok()) << "expected " << errc_name(code);
  expect_error(Result<void>(r.error()), code, needle);
}

// Completion set-ups the flush path must work in.
struct Mode {
  const char* name;
  unsigned msix_vectors;
  CompletionMode completion;
  bool device_thread;
};
constexpr Mode kModes[] = {
    {"intx-interrupt", 0, CompletionMode::interrupt, false},
    {"intx-interrupt-device-thread", 0, CompletionMode::interrupt, true},
    {"msix-interrupt-device-thread", 2, CompletionMode::interrupt, true},
    {"polling-device-thread", 0, CompletionMode::polling, true},
    {"intx-hybrid", 0, CompletionMode::hybrid, false},
    {"intx-hybrid-device-thread", 0, CompletionMode::hybrid, true},
    {"msix-hybrid-device-thread", 2, CompletionMode::hybrid, true},
};

// BAR4 of the fake device's function, except that once `raised` is set it
// reports DEVICE_NEEDS_RESET in device_status reads: a device that completes
// a request and declares at the same moment that it needs a reset (the fake
// cannot do that from its request handler, which runs under its lock).
class NeedsResetBar final : public pci::BarIo {
 public:
  NeedsResetBar(pci::BarIo& inner, const std::atomic<bool>& raised) : inner_(inner), raised_(raised) {}
  std::uint64_t size() const override { return inner_.size(); }
  volatile std::uint8_t* mapping() const override { return inner_.mapping(); }
  Result<std::uint64_t> read(std::uint64_t off, unsigned width) override {
    auto v = inner_.read(off, width);
    if (v.ok() && off == kDeviceStatus && width == 1 && raised_.load()) return *v | status::kNeedsReset;
    return v;
  }
  Result<void> write(std::uint64_t off, unsigned width, std::uint64_t value) override {
    return inner_.write(off, width, value);
  }

 private:
  pci::BarIo& inner_;
  const std::atomic<bool>& raised_;
};

// ------------------------------------------------------------------ attach

TEST(Pmem, AttachReadsTheConfigAndMapsTheRange) {
  FakeVirtioDevice dev(pmem_device());
  Backing backing;
  {
    auto pm = attach(dev, backing);
    ASSERT_TRUE(pm);
    EXPECT_EQ(pm->name(), kBdf);
    EXPECT_EQ(pm->start(), kStart);
    EXPECT_EQ(pm->size(), kSize);
    EXPECT_EQ(pm->mapping(), PmemMapping::custom);
    EXPECT_STREQ(pmem_mapping_name(pm->mapping()), "custom");
    EXPECT_FALSE(pm->features().has(kPmemFeatureShmemRegion));
    EXPECT_EQ(backing.maps, 1);
    EXPECT_EQ(backing.device, kBdf);
    EXPECT_EQ(backing.start, kStart);
    EXPECT_EQ(backing.size, kSize);
    EXPECT_EQ(pm->data(), backing.mem.data());
    EXPECT_EQ(pm->queue().index(), 0);
    EXPECT_EQ(pm->persist_calls(), 0u);
    EXPECT_EQ(pm->device_flushes(), 0u);
    EXPECT_EQ(dev.status(), status::kAcknowledge | status::kDriver | status::kFeaturesOk | status::kDriverOk);
    EXPECT_EQ(dev.driver_features(), 1ull << 32);  // VERSION_1 only
    EXPECT_EQ(dev.requests(), 0u) << "attach must not send requests";
    EXPECT_EQ(backing.unmaps, 0);
  }
  EXPECT_EQ(backing.unmaps, 1) << "the mapping is released with the Pmem";
  EXPECT_EQ(dev.violations(), kNone);
}

TEST(Pmem, SizeAbove4GiBWithoutMapping) {
  constexpr std::uint64_t kBig = 0x3'0000'0000ull;  // 12 GiB: the high half of le64 size is 3
  FakeVirtioDevice dev(pmem_device(0, kStart, kBig));
  FlushDevice device;
  dev.set_handler(device.handler());
  Backing backing;
  PmemSetup s;
  s.map = false;
  auto pm = attach(dev, backing, s);
  ASSERT_TRUE(pm);
  EXPECT_EQ(pm->start(), kStart);
  EXPECT_EQ(pm->size(), kBig);
  EXPECT_EQ(pm->data(), nullptr);
  EXPECT_EQ(backing.maps, 0);
  // Nothing mapped: range operations refuse, a plain device flush works.
  std::uint8_t byte = 0;
  expect_error(pm->persist(&byte, 1), Errc::invalid_argument, "not mapped");
  std::uint8_t one[1] = {1};
  expect_error(pm->write(0, one, true), Errc::invalid_argument, "not mapped");
  expect_error(pm->read(0, one), Errc::invalid_argument, "not mapped");
  EXPECT_EQ(dev.requests(), 0u);
  auto r = pm->flush();
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(dev.requests(), 1u);
}

TEST(Pmem, BadDeviceConfigIsRefusedAtAttach) {
  struct Case {
    const char* what;
    std::uint64_t start, size;
  };
  const Case cases[] = {
      {"start not page-aligned", kStart + 0x800, kSize},
      {"size not page-aligned", kStart, kSize + 0x10},
      {"size 0", kStart, 0},
      {"start + size wraps", 0xffff'ffff'ffff'0000ull, 0x2'0000},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    FakeVirtioDevice dev(pmem_device(0, c.start, c.size));
    Backing backing;
    auto pm = try_attach(dev, backing);
    expect_error(pm, Errc::bad_device_data, "page-aligned");
    EXPECT_EQ(backing.maps, 0) << "nothing may be mapped for a bad range";
    EXPECT_EQ(dev.requests(), 0u);
  }
}

TEST(Pmem, MapRangeFailureIsReported) {
  FakeVirtioDevice dev(pmem_device());
  Backing backing;
  backing.fail = Error(Errc::permission, kBdf, "map pmem range", "the test refuses to map");
  auto pm = try_attach(dev, backing);
  expect_error(pm, Errc::permission, "the test refuses to map");
  EXPECT_EQ(backing.maps, 1);
}

// Regression: attach() used to trust the range the hook returned, while
// write()/read() check offsets against the device's size and persist()
// against the range's: a hook that maps less than `size` let write(offset)
// store past the end of the mapping. A short (or null) range is refused, and
// released.
TEST(Pmem, MapRangeSmallerThanTheDeviceIsRefused) {
  FakeVirtioDevice dev(pmem_device());
  Backing backing;
  backing.shrink = 4096;  // maps one page less than asked
  auto pm = try_attach(dev, backing);
  ASSERT_FALSE(pm.ok()) << "a mapping of " << backing.mem.size() << " bytes accepted for a " << kSize
                        << "-byte device: write(" << kSize - 1 << ", 1 byte) would store past its end";
  EXPECT_EQ(pm.error().code(), Errc::invalid_argument) << pm.error().message();
  EXPECT_NE(pm.error().message().find(kBdf), std::string::npos) << pm.error().message();
  EXPECT_EQ(backing.unmaps, backing.maps) << "the refused mapping must be released";
}

// ------------------------------------------------------------------ the flush request

TEST(Pmem, PersistSendsOneFlushRequest) {
  for (const Mode& m : kModes) {
    SCOPED_TRACE(m.name);
    FakeVirtioDevice dev(pmem_device(m.msix_vectors));
    FlushDevice device;
    dev.set_handler(device.handler());
    if (m.device_thread) dev.start_worker();
    Backing backing;
    PmemSetup s;
    s.completion = m.completion;
    auto pm = attach(dev, backing, s);
    ASSERT_TRUE(pm);
    EXPECT_EQ(pm->queue().mode(), m.completion);

    std::memcpy(pm->data() + 100, "hello", 5);
    auto r = pm->persist(pm->data() + 100, 5);
    ASSERT_TRUE(r.ok()) << r.error().message();
    auto seen = device.seen();
    ASSERT_EQ(seen.size(), 1u);
    EXPECT_EQ(seen[0].queue, 0);
    // Spec 5.19.6: struct virtio_pmem_req { le32 type; } device-readable,
    // then struct virtio_pmem_resp { le32 ret; } device-writable.
    EXPECT_EQ(seen[0].lens, (std::vector<std::uint32_t>{4, 4}));
    EXPECT_EQ(seen[0].writable, (std::vector<bool>{false, true}));
    EXPECT_EQ(seen[0].type, 0u) << "VIRTIO_PMEM_REQ_TYPE_FLUSH";
    EXPECT_EQ(dev.requests(), 1u);
    EXPECT_EQ(dev.completions(), 1u);
    EXPECT_EQ(pm->persist_calls(), 1u);
    EXPECT_EQ(pm->device_flushes(), 1u);

    // flush(), memcpy_persist() and write(persist_now) each send one more.
    ASSERT_TRUE(pm->flush().ok());
    const std::uint8_t src[3] = {9, 8, 7};
    ASSERT_TRUE(pm->memcpy_persist(pm->data() + kSize - 3, src, 3).ok());
    EXPECT_EQ(std::memcmp(backing.mem.data() + kSize - 3, src, 3), 0);
    ASSERT_TRUE(pm->write(0, src, true).ok());
    EXPECT_EQ(std::memcmp(backing.mem.data(), src, 3), 0);
    ASSERT_TRUE(pm->write(10, src, false).ok());  // no persist: no request
    EXPECT_EQ(std::memcmp(backing.mem.data() + 10, src, 3), 0);
    std::uint8_t back[3] = {};
    ASSERT_TRUE(pm->read(10, back).ok());
    EXPECT_EQ(std::memcmp(back, src, 3), 0);
    EXPECT_EQ(pm->device_flushes(), 4u);
    EXPECT_EQ(dev.completions(), 4u);
    for (const auto& req : device.seen()) EXPECT_EQ(req.type, 0u);
    // A whole-range persist is in bounds.
    ASSERT_TRUE(pm->persist(pm->data(), kSize).ok());
    EXPECT_EQ(dev.violations(), kNone);
  }
}

TEST(Pmem, HostFsyncFailureIsDeviceError) {
  for (unsigned msix : {0u, 2u}) {
    SCOPED_TRACE(msix ? "msix" : "intx");
    FakeVirtioDevice dev(pmem_device(msix));
    FlushDevice device;
    device.ret = 1;
    dev.set_handler(device.handler());
    Backing backing;
    auto pm = attach(dev, backing);
    ASSERT_TRUE(pm);
    auto r = pm->persist(pm->data(), 64);
    expect_error(r, Errc::device_error, "EIO");
    EXPECT_NE(r.error().message().find("ret=1"), std::string::npos) << r.error().message();
    EXPECT_EQ(r.error().sys_errno(), EIO);
    expect_error(pm->flush(), Errc::device_error, "EIO");
    expect_error(pm->repersist(pm->data(), 64), Errc::device_error, "EIO");
    // Not sticky: the next flush the host answers with 0 succeeds (and
    // repersist, which the caller needs after such a failure, see below).
    device.ret = 0;
    auto again = pm->persist(pm->data(), 64);
    EXPECT_TRUE(again.ok()) << again.error().message();
    EXPECT_TRUE(pm->repersist(pm->data(), 64).ok());
    EXPECT_EQ(pm->device_flushes(), 5u);
  }
}

// After a failed host fsync the host may hold our pages clean (Linux marks
// pages whose write-back failed clean), so repersist() must make every page
// of the range dirty again in the kernel's eyes, change no byte, and flush.
// The range here is a MAP_SHARED mapping of a file on a disk filesystem:
// msync() cleans its pages, and the kernel's own page flags
// (/proc/kpageflags bit 4, DIRTY, found through /proc/self/pagemap; root
// only) then show which pages were written again, the same state a host's
// fsync relies on to know what to write back.
TEST(Pmem, RepersistWritesEveryPageOfTheRangeAgainAndNothingElse) {
  constexpr std::size_t kPage = 4096, kPages = 8;
  char path[] = "/var/tmp/uvirtio-pmem-test.XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  unlink(path);
  ASSERT_EQ(ftruncate(fd, kSize), 0);
  void* map = mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  ASSERT_NE(map, MAP_FAILED);
  auto* mem = static_cast<std::uint8_t*>(map);
  for (std::size_t i = 0; i < kSize; ++i) mem[i] = static_cast<std::uint8_t>(i * 13 + 1);
  const std::vector<std::uint8_t> before(mem, mem + kSize);

  FakeVirtioDevice dev(pmem_device());
  FlushDevice device;
  dev.set_handler(device.handler());
  FeaturePolicy policy;
  auto d = bring_up(dev.take_function(), kVirtioPmemType, policy);
  ASSERT_TRUE(d.ok()) << d.error().message();
  PmemOptions opt;
  opt.map_range = [&](const std::string&, std::uint64_t, std::uint64_t n) -> Result<PmemRange> {
    return PmemRange{mem, n, [mem] { munmap(mem, kSize); }};
  };
  auto pm = Pmem::attach(std::move(d).value(), opt);
  ASSERT_TRUE(pm.ok()) << pm.error().message();

  // 1 dirty, 0 clean, -1 unknown (not root, no kpageflags, page absent).
  auto dirty = [&](std::size_t page) -> int {
    std::uint64_t entry = 0, flags = 0;
    const int pm_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm_fd < 0) return -1;
    const auto vpn = reinterpret_cast<std::uintptr_t>(mem) / kPage + page;
    const ssize_t n = pread(pm_fd, &entry, sizeof entry, static_cast<off_t>(vpn * sizeof entry));
    close(pm_fd);
    const std::uint64_t pfn = entry & ((std::uint64_t{1} << 55) - 1);
    if (n != sizeof entry || (entry >> 63) == 0 || pfn == 0) return -1;
    const int kf = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
    if (kf < 0) return -1;
    const ssize_t m = pread(kf, &flags, sizeof flags, static_cast<off_t>(pfn * sizeof flags));
    close(kf);
    return m == sizeof flags ? static_cast<int>((flags >> 4) & 1) : -1;
  };
  if (dirty(0) != 1) GTEST_SKIP() << "page flags not readable here (/proc/kpageflags needs root)";
  ASSERT_EQ(msync(mem, kSize, MS_SYNC), 0) << std::strerror(errno);
  for (std::size_t p = 0; p < kPages; ++p)
    if (dirty(p) != 0) GTEST_SKIP() << "msync left page " << p << " dirty: /var/tmp is not a disk filesystem";

  // Pages 2..5: a range starting mid-page 2 and ending mid-page 5.
  ASSERT_TRUE(pm.value()->repersist(mem + 2 * kPage + 100, 3 * kPage + 50).ok());
  for (std::size_t p = 0; p < kPages; ++p) EXPECT_EQ(dirty(p), p >= 2 && p <= 5 ? 1 : 0) << "page " << p;
  EXPECT_TRUE(std::equal(before.begin(), before.end(), mem)) << "repersist changed a byte";
  EXPECT_EQ(device.seen().size(), 1u) << "one device flush";
  // The offset form, one byte at the end of page 7.
  ASSERT_TRUE(pm.value()->repersist_at(8 * kPage - 1, 1).ok());
  EXPECT_EQ(dirty(7), 1);
  EXPECT_EQ(dirty(6), 0);
  EXPECT_EQ(device.seen().size(), 2u);
}

TEST(Pmem, ShortResponseIsBadDeviceData) {
  for (std::uint32_t len : {0u, 3u}) {
    SCOPED_TRACE(len);
    FakeVirtioDevice dev(pmem_device());
    FlushDevice device;
    device.used_len = len;
    dev.set_handler(device.handler());
    Backing backing;
    auto pm = attach(dev, backing);
    ASSERT_TRUE(pm);
    expect_error(pm->persist(pm->data(), 8), Errc::bad_device_data, "4-byte response");
    // The slot was returned: a well-behaved answer works again.
    device.used_len = 4;
    auto r = pm->persist(pm->data(), 8);
    EXPECT_TRUE(r.ok()) << r.error().message();
  }
}

TEST(Pmem, UsedLenBeyondTheResponseIsBadDeviceData) {
  FakeVirtioDevice dev(pmem_device());
  FlushDevice device;
  dev.set_handler(device.handler());
  dev.faults.used_len_excess = 1;
  Backing backing;
  auto pm = attach(dev, backing);
  ASSERT_TRUE(pm);
  expect_error(pm->flush(), Errc::bad_device_data, "exceeds");
}

// ------------------------------------------------------------------ DEVICE_NEEDS_RESET

TEST(Pmem, NeedsResetBeforeARequestSendsNothing) {
  FakeVirtioDevice dev(pmem_device());
  FlushDevice device;
  dev.set_handler(device.handler());
  Backing backing;
  auto pm = attach(dev, backing);
  ASSERT_TRUE(pm);
  ASSERT_TRUE(pm->flush().ok());
  const std::uint64_t notifies = dev.notifies();
  dev.set_needs_reset();
  expect_error(pm->persist(pm->data(), 16), Errc::needs_reset, "DEVICE_NEEDS_RESET");
  auto f = pm->persist_future(pm->data(), 16);
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  expect_error(f.get(), Errc::needs_reset, "DEVICE_NEEDS_RESET");
  EXPECT_EQ(dev.notifies(), notifies) << "no request may be sent to a device that needs a reset";
  EXPECT_EQ(dev.requests(), 1u);
}

// The device takes the request and, instead of answering, sets NEEDS_RESET
// (with a configuration-change interrupt). The waiter must learn it from that
// interrupt or its status polling, long before its deadline.
//
// Regression: with INTx the queue and config interrupts share one eventfd,
// and the config interrupt used to count as a plain `fired` wake-up: the ISR
// "config change" bit was read and dropped, the status was not checked, and
// the waiter slept on until its 1000 ms poll slice ended. QEMU's virtio-pmem
// has INTx only, so a flush learned of a dead device 1 s late.
TEST(Pmem, NeedsResetWhileWaiting) {
  struct Case {
    const char* name;
    unsigned msix;
    CompletionMode completion;
  };
  const Case cases[] = {
      {"polling", 0, CompletionMode::polling},
      {"msix-interrupt", 2, CompletionMode::interrupt},
      {"intx-interrupt", 0, CompletionMode::interrupt},
      {"intx-hybrid", 0, CompletionMode::hybrid},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    FakeVirtioDevice dev(pmem_device(c.msix));
    FlushDevice device;
    dev.set_handler(device.handler());
    dev.faults.swallow = true;
    Backing backing;
    PmemSetup s;
    s.completion = c.completion;
    s.timeout = 3s;
    auto pm = attach(dev, backing, s);
    ASSERT_TRUE(pm);
    std::thread device_dies([&] {
      if (eventually([&] { return dev.requests() == 1; })) dev.set_needs_reset();
    });
    const auto t0 = std::chrono::steady_clock::now();
    auto r = pm->persist(pm->data(), 32);
    const auto took = std::chrono::steady_clock::now() - t0;
    device_dies.join();
    expect_error(r, Errc::needs_reset, "DEVICE_NEEDS_RESET");
    EXPECT_LT(took, 500ms) << "NEEDS_RESET noticed only after "
                           << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms";
  }
}

// The device completes the flush with ret = 0 but sets NEEDS_RESET with it:
// the status is checked after the request too, so this is no success.
TEST(Pmem, NeedsResetWithTheCompletionIsNotASuccess) {
  FakeVirtioDevice dev(pmem_device());
  std::atomic<bool> raised{false};
  FlushDevice device;
  device.raise_on_request = &raised;
  dev.set_handler(device.handler());
  Backing backing;
  auto pm =
      attach(dev, backing, {}, pci::borrow(dev.function(), FakeVirtioDevice::kBar, [&raised](pci::BarIo& b) {
               return std::make_unique<NeedsResetBar>(b, raised);
             }));
  ASSERT_TRUE(pm);
  expect_error(pm->persist(pm->data(), 32), Errc::needs_reset, "DEVICE_NEEDS_RESET");
  EXPECT_EQ(dev.completions(), 1u) << "the device did answer";
  ASSERT_EQ(device.seen().size(), 1u);
  raised = false;  // lets the reset in ~Device read status 0 at once
}

// `threads` threads each persist `calls` one-byte updates (byte i = i + 1)
// in a page of their own; returns how many calls failed.
int persist_from_threads(Pmem& pm, int threads, int calls) {
  std::atomic<int> failed{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      std::uint8_t* mine = pm.data() + 4096 * t;
      for (int i = 0; i < calls; ++i) {
        mine[i] = static_cast<std::uint8_t>(i + 1);
        if (auto r = pm.persist(mine, 64); !r.ok()) {
          ADD_FAILURE() << r.error().message();
          ++failed;
        }
      }
    });
  for (auto& w : workers) w.join();
  return failed.load();
}

// ------------------------------------------------------------------ recovery

// Makes `dev` go NEEDS_RESET on its next notify (dropping that request) until
// the driver resets it.
void break_until_reset(FakeVirtioDevice& dev) {
  dev.set_status_hook([&dev](std::uint8_t st) {
    if (st == 0) dev.faults.needs_reset_on_notify = false;
  });
  dev.faults.needs_reset_on_notify = true;
}

// With recover_on_reset the dropped flush is sent again after the reset, in
// every completion set-up, and the device keeps working.
TEST(Pmem, RecoversFromNeedsResetAndResendsTheFlush) {
  for (const Mode& m : kModes) {
    SCOPED_TRACE(m.name);
    FakeVirtioDevice dev(pmem_device(m.msix_vectors));
    FlushDevice device;
    dev.set_handler(device.handler());
    if (m.device_thread) dev.start_worker();
    Backing backing;
    PmemSetup s;
    s.completion = m.completion;
    s.recover_on_reset = true;
    auto pm = attach(dev, backing, s);
    ASSERT_TRUE(pm);
    ASSERT_TRUE(pm->persist(pm->data(), 8).ok());
    break_until_reset(dev);
    const std::size_t writes_before = dev.status_writes().size();
    std::memcpy(pm->data() + 64, "after", 5);
    auto r = pm->persist(pm->data() + 64, 5);
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(pm->recoveries(), 1u);
    EXPECT_EQ(device.seen().size(), 2u) << "the dropped flush was not served; its resend was";
    const auto writes = dev.status_writes();
    ASSERT_GT(writes.size(), writes_before);
    EXPECT_EQ(writes[writes_before], 0) << "recovery starts with a reset";
    EXPECT_EQ(std::memcmp(backing.mem.data() + 64, "after", 5), 0);
    for (int i = 0; i < 100; ++i) ASSERT_TRUE(pm->persist(pm->data(), 8).ok()) << i;
    EXPECT_EQ(pm->recoveries(), 1u);
    EXPECT_EQ(dev.violations(), kNone);
  }
}

// Callers sharing a flush the device dropped all get the resent flush's
// result; one recovery serves them all. On either ring layout: a packed ring
// (with event index and indirect tables) restarts in place too.
TEST(Pmem, ConcurrentPersistsAcrossARecovery) {
  for (const std::uint64_t rings : {std::uint64_t{0}, kPackedRingFeatures}) {
    SCOPED_TRACE(rings ? "packed" : "split");
    FakeVirtioOptions o = pmem_device();
    o.features |= rings;
    FakeVirtioDevice dev(o);
    FlushDevice device;
    device.work_us = 300;
    dev.set_handler(device.handler());
    dev.start_worker();
    Backing backing;
    PmemSetup s;
    s.recover_on_reset = true;
    auto pm = attach(dev, backing, s);
    ASSERT_TRUE(pm);
    EXPECT_EQ(dev.driver_features() & rings, rings);
    constexpr int kThreads = 4, kCalls = 25;
    std::thread breaker([&] {
      if (eventually([&] { return dev.requests() >= 10; })) break_until_reset(dev);
    });
    const int failed = persist_from_threads(*pm, kThreads, kCalls);
    breaker.join();
    EXPECT_EQ(failed, 0);
    EXPECT_EQ(pm->recoveries(), 1u);
    EXPECT_EQ(pm->persist_calls(), std::uint64_t{kThreads} * kCalls);
    for (int t = 0; t < kThreads; ++t) EXPECT_EQ(backing.mem[4096 * t + kCalls - 1], kCalls);  // i + 1
    EXPECT_EQ(dev.violations(), kNone);
  }
}

// Without recover_on_reset the caller recovers; a device that describes
// another range after the reset is refused and marked FAILED, since the
// mapping was made for the old one.
TEST(Pmem, ExplicitRecoverChecksTheRangeAgain) {
  FakeVirtioDevice dev(pmem_device());
  FlushDevice device;
  dev.set_handler(device.handler());
  Backing backing;
  auto pm = attach(dev, backing);
  ASSERT_TRUE(pm);
  dev.set_needs_reset();
  expect_error(pm->flush(), Errc::needs_reset, "DEVICE_NEEDS_RESET");
  auto n = pm->recover();
  ASSERT_TRUE(n.ok()) << n.error().message();
  EXPECT_EQ(*n, 0u) << "nothing was in flight";
  ASSERT_TRUE(pm->flush().ok());

  const auto moved = pmem_config(kStart + kSize, kSize);
  dev.set_device_config(0, moved);
  dev.set_needs_reset();
  expect_error(pm->recover(), Errc::bad_device_data, "instead of the mapped");
  EXPECT_NE(dev.status() & status::kFailed, 0) << "a device that moved its range is marked FAILED";
  expect_error(pm->flush(), Errc::broken, "FAILED");
  EXPECT_EQ(device.seen().size(), 1u);
}

// ------------------------------------------------------------------ stuck devices

TEST(Pmem, RequestThatNeverCompletesTimesOutThenRecovers) {
  for (CompletionMode mode : {CompletionMode::interrupt, CompletionMode::polling, CompletionMode::hybrid}) {
    SCOPED_TRACE(completion_mode_name(mode));
    FakeVirtioDevice dev(pmem_device());
    FlushDevice device;
    dev.set_handler(device.handler());
    dev.faults.swallow = true;
    Backing backing;
    PmemSetup s;
    s.completion = mode;
    s.timeout = 30ms;
    auto pm = attach(dev, backing, s);
    ASSERT_TRUE(pm);
    const auto t0 = std::chrono::steady_clock::now();
    auto r = pm->persist(pm->data(), 64);
    const auto took = std::chrono::steady_clock::now() - t0;
    expect_error(r, Errc::timeout, "flush: wait for queue 0: no completion within 30 ms");
    EXPECT_GE(took, 30ms) << "the deadline must not expire early";
    EXPECT_LT(took, 1s);
    // The device answers again: the abandoned request keeps its slot, the
    // next flush takes another and succeeds.
    dev.faults.swallow = false;
    auto again = pm->persist(pm->data(), 64);
    ASSERT_TRUE(again.ok()) << again.error().message();
    EXPECT_EQ(dev.requests(), 2u);
    EXPECT_EQ(dev.completions(), 1u);
    EXPECT_EQ(pm->device_flushes(), 2u);
    EXPECT_EQ(dev.violations(), kNone);
  }
}

// The device answers an abandoned request late (with ret = 1): the next flush
// drops that completion and waits for its own.
TEST(Pmem, LateCompletionOfAnAbandonedFlushIsDropped) {
  FakeVirtioDevice dev(pmem_device());
  FlushDevice device;
  device.ret = 1;
  dev.set_handler(device.handler());
  dev.start_worker(80ms);  // the device answers after the driver gave up
  Backing backing;
  PmemSetup s;
  s.timeout = 20ms;
  auto pm = attach(dev, backing, s);
  ASSERT_TRUE(pm);
  expect_error(pm->flush(), Errc::timeout, "no completion");
  ASSERT_TRUE(eventually([&] { return dev.completions() == 1; })) << "the late answer never came";
  dev.set_worker_delay(0us);
  device.ret = 0;
  auto r = pm->flush();
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto r2 = pm->persist(pm->data(), 1);
  ASSERT_TRUE(r2.ok()) << r2.error().message();
  EXPECT_EQ(dev.completions(), 3u);
  EXPECT_EQ(dev.violations(), kNone);
}

// QEMU 7.2 keeps running a flush through a device reset and then writes its
// answer into the buffer the old request named (doc/protocols.md). The flush
// after the reset must not use that buffer: here the host's fsync fails for
// the new flush (ret = 1) and the old one's success (ret = 0) lands right
// after, before the driver reads its answer, as QEMU's thread pool delivers
// finished work newest first. Read from a shared buffer, that was a success.
TEST(Pmem, AStaleAnswerAfterAResetCannotAnswerTheNextFlush) {
  FakeVirtioDevice dev(pmem_device());
  FlushDevice device;
  dev.faults.swallow = true;
  Backing backing;
  PmemSetup s;
  s.timeout = 20ms;
  s.completion = CompletionMode::polling;
  auto pm = attach(dev, backing, s);
  ASSERT_TRUE(pm);
  expect_error(pm->flush(), Errc::timeout, "no completion");
  const auto held = dev.swallowed(0);
  ASSERT_EQ(held.size(), 1u);
  ASSERT_EQ(held[0].chain.size(), 2u);
  ASSERT_TRUE(held[0].chain[1].writable);
  std::uint8_t* stale_ret = held[0].chain[1].data;
  auto n = pm->recover();
  ASSERT_TRUE(n.ok()) << n.error().message();
  EXPECT_EQ(*n, 1u) << "the reset dropped the abandoned flush";
  dev.faults.swallow = false;
  device.ret = 1;
  auto serve = device.handler();
  dev.set_handler([&](std::uint16_t q, std::span<const Segment> chain) {
    const std::uint32_t len = serve(q, chain);
    store_le32(stale_ret, 0);  // the old request's answer, written late
    return len;
  });
  expect_error(pm->flush(), Errc::device_error, "the host failed to fsync");
  // Its used entry follows; the ring drops it and the device keeps working.
  ASSERT_TRUE(dev.complete_late(0, held[0].head, 4));
  device.ret = 0;
  auto r = pm->flush();
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(dev.violations(), kNone);
}

// A flush whose notification failed (the BAR write refused, as a VFIO region
// write can be) was published all the same: the device takes it at the next
// notification and answers into its buffer. The next flush must use another
// buffer, or that answer would land in the one it reads its own from.
TEST(Pmem, AFlushWhoseNotifyFailedKeepsItsBufferFromTheNextFlush) {
  FakeVirtioDevice dev(pmem_device());
  FlushDevice device;
  std::vector<const std::uint8_t*> answers;  // each served chain's response buffer
  auto serve = device.handler();
  dev.set_handler([&](std::uint16_t q, std::span<const Segment> chain) {
    if (chain.size() == 2) answers.push_back(chain[1].data);
    return serve(q, chain);
  });
  Backing backing;
  PmemSetup s;
  s.completion = CompletionMode::polling;
  auto pm = attach(dev, backing, s);
  ASSERT_TRUE(pm);
  dev.function()
      .soft_bar(FakeVirtioDevice::kBar)
      ->fail_writes_in(FakeVirtioDevice::kNotify, FakeVirtioDevice::kRegionSize, 1);
  expect_error(pm->flush(), Errc::io, "write BAR");
  EXPECT_TRUE(answers.empty()) << "the device never heard of the first flush";
  auto r = pm->flush();
  ASSERT_TRUE(r.ok()) << r.error().message();
  ASSERT_EQ(answers.size(), 2u) << "the second notification serves both chains";
  EXPECT_NE(answers[0], answers[1]) << "the failed flush's buffer went to the next flush as well";
  EXPECT_EQ(dev.violations(), kNone);
}

// A deadline of milliseconds::max() means "as long as it takes": now + max
// overflowed the clock (UB; in a release build a deadline in the past, so a
// flush the device answers a little later timed out at once).
TEST(Pmem, ATimeoutOfForeverWaitsForTheAnswer) {
  FakeVirtioDevice dev(pmem_device());
  FlushDevice device;
  dev.set_handler(device.handler());
  dev.start_worker(5ms);
  Backing backing;
  PmemSetup s;
  s.timeout = std::chrono::milliseconds::max();
  s.completion = CompletionMode::polling;
  auto pm = attach(dev, backing, s);
  ASSERT_TRUE(pm);
  auto r = pm->persist(pm->data(), 64);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(device.seen().size(), 1u);
}

// A gather limit of microseconds::max() ("only half a flush bounds the
// wait") is the longest wait the coalescer can hold. Its conversion to the
// coalescer's nanoseconds overflowed (UB; in a release build a negative
// limit, which turned group commit off).
TEST(Pmem, AGatherLimitOfForeverDoesNotOverflow) {
  FakeVirtioDevice dev(pmem_device());
  FlushDevice device;
  dev.set_handler(device.handler());
  FeaturePolicy policy;
  policy.supported = FeatureSet::of({kPmemFeatureShmemRegion});
  auto d = bring_up(dev.take_function(), kVirtioPmemType, policy);
  ASSERT_TRUE(d.ok()) << d.error().message();
  Backing backing;
  PmemOptions opt;
  opt.completion = CompletionMode::polling;
  opt.gather_limit = std::chrono::microseconds::max();
  opt.map_range = backing.hook();
  auto pm = Pmem::attach(std::move(d).value(), opt);
  ASSERT_TRUE(pm.ok()) << pm.error().message();
  ASSERT_TRUE((*pm)->persist((*pm)->data(), 8).ok());
  EXPECT_EQ(device.seen().size(), 1u);
}

TEST(Pmem, AllSlotsAbandonedIsBusy) {
  FakeVirtioDevice dev(pmem_device());
  dev.faults.swallow = true;
  Backing backing;
  PmemSetup s;
  s.timeout = 5ms;
  s.completion = CompletionMode::polling;
  auto pm = attach(dev, backing, s);
  ASSERT_TRUE(pm);
  std::uint64_t timeouts = 0;
  Result<void> r = ok();
  for (int i = 0; i < 64; ++i) {
    r = pm->flush();
    if (r.ok() || r.error().code() != Errc::timeout) break;
    ++timeouts;
  }
  EXPECT_GT(timeouts, 0u);
  expect_error(r, Errc::busy, "abandoned flush requests are still in flight");
  EXPECT_EQ(dev.requests(), timeouts) << "the busy flush must not submit";
}

// ------------------------------------------------------------------ bounds

// A mapping larger than the device (a hook rounding up, say) does not widen
// what persist() accepts: the device flushes only its own range.
TEST(Pmem, RangeChecksUseTheDeviceSizeNotTheMappingSize) {
  FakeVirtioDevice dev(pmem_device());
  FlushDevice device;
  dev.set_handler(device.handler());
  Backing backing;
  backing.grow = 4096;
  auto pm = attach(dev, backing);
  ASSERT_TRUE(pm);
  ASSERT_EQ(backing.mem.size(), kSize + 4096);
  expect_error(pm->persist(pm->data() + kSize, 1), Errc::invalid_argument, "outside the");
  expect_error(pm->persist(pm->data() + kSize - 8, 16), Errc::invalid_argument, "outside the");
  const char text[] = "xyz";
  expect_error(pm->memcpy_persist(pm->data() + kSize, text, 3), Errc::invalid_argument, "outside the");
  EXPECT_TRUE(device.seen().empty()) << "nothing was flushed";
  EXPECT_EQ(backing.mem[kSize], static_cast<std::uint8_t>(kSize * 7 + 3)) << "nothing was written";
  ASSERT_TRUE(pm->persist(pm->data() + kSize - 8, 8).ok());
}

TEST(Pmem, OutOfRangeArgumentsAreRefusedAndWriteNothing) {
  FakeVirtioDevice dev(pmem_device());
  FlushDevice device;
  dev.set_handler(device.handler());
  Backing backing;
  auto pm = attach(dev, backing);
  ASSERT_TRUE(pm);
  const std::vector<std::uint8_t> snapshot = backing.mem;
  std::uint8_t* base = pm->data();
  const auto at = [&](std::uintptr_t a) { return reinterpret_cast<std::uint8_t*>(a); };
  const auto b = reinterpret_cast<std::uintptr_t>(base);
  constexpr std::uintptr_t kTop = std::numeric_limits<std::uintptr_t>::max();
  std::vector<std::uint8_t> elsewhere(64, 0x11);

  struct AddrCase {
    const char* what;
    std::uint8_t* addr;
    std::size_t len;
    const char* needle;
  };
  const AddrCase addr_cases[] = {
      {"length 0", base, 0, "length 0"},
      {"at the end", at(b + kSize), 1, "outside"},
      {"straddles the end", at(b + kSize - 1), 2, "outside"},
      {"one byte before", at(b - 1), 1, "outside"},
      {"length SIZE_MAX", at(b + 8), std::numeric_limits<std::size_t>::max(), "outside"},
      {"address wraps", at(kTop - 7), 16, "outside"},
      {"null", nullptr, 1, "outside"},
      {"another buffer", elsewhere.data(), elsewhere.size(), "outside"},
  };
  const std::uint8_t src[16] = {0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee,
                                0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee};
  Countdown never;
  for (const AddrCase& c : addr_cases) {
    SCOPED_TRACE(c.what);
    expect_error(pm->persist(c.addr, c.len), Errc::invalid_argument, c.needle);
    expect_error(pm->persist_async(c.addr, c.len, [&](Result<void>) { never.hit(); }), Errc::invalid_argument,
                 c.needle);
    auto f = pm->persist_future(c.addr, c.len);
    ASSERT_EQ(f.wait_for(0s), std::future_status::ready) << "an invalid range is refused at once";
    expect_error(f.get(), Errc::invalid_argument, c.needle);
    expect_error(pm->repersist(c.addr, c.len), Errc::invalid_argument, c.needle);
    // memcpy_persist must not copy anything (len capped: src holds 16 bytes).
    if (c.len <= sizeof src)
      expect_error(pm->memcpy_persist(c.addr, src, c.len), Errc::invalid_argument, c.needle);
  }
  // Straddling by a few bytes: the bytes that are inside stay untouched.
  expect_error(pm->memcpy_persist(base + kSize - 4, src, 8), Errc::invalid_argument, "outside");

  struct OffsetCase {
    const char* what;
    std::uint64_t offset;
    std::size_t len;
    const char* needle;
  };
  const OffsetCase offset_cases[] = {
      {"length 0", 0, 0, "length 0"},
      {"at the end", kSize, 1, "beyond"},
      {"straddles the end", kSize - 1, 2, "beyond"},
      {"just past the end", kSize + 1, 1, "beyond"},
      {"past the end", kSize + 4096, 4, "beyond"},
      {"offset UINT64_MAX", std::numeric_limits<std::uint64_t>::max(), 1, "beyond"},
      {"offset + length wraps", std::numeric_limits<std::uint64_t>::max() - 7, 16, "beyond"},
  };
  std::vector<std::uint8_t> out(16, 0x5a);
  for (const OffsetCase& c : offset_cases) {
    SCOPED_TRACE(c.what);
    expect_error(pm->write(c.offset, std::span(src, c.len), true), Errc::invalid_argument, c.needle);
    expect_error(pm->write(c.offset, std::span(src, c.len), false), Errc::invalid_argument, c.needle);
    expect_error(pm->read(c.offset, std::span(out.data(), c.len)), Errc::invalid_argument, c.needle);
    expect_error(pm->repersist_at(c.offset, c.len), Errc::invalid_argument, c.needle);
    EXPECT_EQ(out, std::vector<std::uint8_t>(16, 0x5a)) << "a refused read must not fill the buffer";
  }

  EXPECT_TRUE(backing.mem == snapshot) << "a refused call stored into the pmem range";
  EXPECT_EQ(elsewhere, std::vector<std::uint8_t>(64, 0x11));
  EXPECT_EQ(dev.requests(), 0u) << "a refused call sent a flush";
  EXPECT_EQ(pm->persist_calls(), 0u);
  pm.reset();  // runs any callback still pending
  EXPECT_FALSE(never.wait_for_count(1, 0ms)) << "persist_async ran the callback of a refused call";
}

TEST(Pmem, EdgesOfTheRangeAreAccepted) {
  FakeVirtioDevice dev(pmem_device());
  FlushDevice device;
  dev.set_handler(device.handler());
  Backing backing;
  auto pm = attach(dev, backing);
  ASSERT_TRUE(pm);
  const std::uint8_t last[4] = {1, 2, 3, 4};
  ASSERT_TRUE(pm->write(kSize - 4, last, true).ok());
  EXPECT_EQ(std::memcmp(backing.mem.data() + kSize - 4, last, 4), 0);
  std::uint8_t back[4] = {};
  ASSERT_TRUE(pm->read(kSize - 4, back).ok());
  EXPECT_EQ(std::memcmp(back, last, 4), 0);
  ASSERT_TRUE(pm->persist(pm->data() + kSize - 1, 1).ok());
  ASSERT_TRUE(pm->persist(pm->data(), 1).ok());
  std::vector<std::uint8_t> whole(kSize, 0x42);
  ASSERT_TRUE(pm->write(0, whole, true).ok());
  EXPECT_TRUE(backing.mem == whole);
  EXPECT_EQ(pm->device_flushes(), 4u);
}

// ------------------------------------------------------------------ coalescing and async

TEST(Pmem, ConcurrentPersistsShareDeviceFlushes) {
  for (const std::uint64_t rings : {std::uint64_t{0}, kPackedRingFeatures}) {
    SCOPED_TRACE(rings ? "packed" : "split");
    FakeVirtioOptions o = pmem_device();
    o.features |= rings;
    FakeVirtioDevice dev(o);
    FlushDevice device;
    device.work_us = 1000;
    dev.set_handler(device.handler());
    dev.start_worker();
    Backing backing;
    auto pm = attach(dev, backing);
    ASSERT_TRUE(pm);
    EXPECT_EQ(dev.driver_features() & rings, rings);
    constexpr int kThreads = 6, kCalls = 25;
    const int failed = persist_from_threads(*pm, kThreads, kCalls);
    EXPECT_EQ(failed, 0);
    EXPECT_EQ(pm->persist_calls(), std::uint64_t{kThreads} * kCalls);
    EXPECT_LT(pm->device_flushes(), pm->persist_calls());
    EXPECT_GE(pm->device_flushes(), std::uint64_t{kCalls});
    EXPECT_EQ(dev.completions(), pm->device_flushes());
    EXPECT_EQ(dev.requests(), pm->device_flushes());
    EXPECT_EQ(dev.violations(), kNone);
  }
}

TEST(Pmem, PersistFutureAndAsyncComplete) {
  FakeVirtioDevice dev(pmem_device(2));
  FlushDevice device;
  device.work_us = 200;
  dev.set_handler(device.handler());
  dev.start_worker();
  Backing backing;
  auto pm = attach(dev, backing);
  ASSERT_TRUE(pm);

  auto f = pm->persist_future(pm->data(), 128);
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  auto r = f.get();
  ASSERT_TRUE(r.ok()) << r.error().message();

  constexpr int kAsync = 30;
  Countdown done;
  std::atomic<int> failed{0};
  for (int i = 0; i < kAsync; ++i) {
    auto sub = pm->persist_async(pm->data() + 64 * i, 64, [&](Result<void> res) {
      if (!res.ok()) ++failed;
      done.hit();
    });
    ASSERT_TRUE(sub.ok()) << sub.error().message();
  }
  // A synchronous persist alongside them.
  ASSERT_TRUE(pm->persist(pm->data(), 1).ok());
  ASSERT_TRUE(done.wait_for_count(kAsync));
  EXPECT_EQ(failed, 0);
  EXPECT_EQ(pm->persist_calls(), 1u + kAsync + 1u);
  EXPECT_LE(pm->device_flushes(), pm->persist_calls());

  // A failing host fsync reaches the future, with the device named.
  device.ret = 1;
  auto bad = pm->persist_future(pm->data(), 8);
  ASSERT_EQ(bad.wait_for(5s), std::future_status::ready);
  auto rb = bad.get();
  expect_error(rb, Errc::device_error, "EIO");
  Countdown bad_done;
  std::optional<Result<void>> bad_async;
  ASSERT_TRUE(pm->persist_async(pm->data(), 8, [&](Result<void> res) {
                  bad_async = std::move(res);
                  bad_done.hit();
                }).ok());
  ASSERT_TRUE(bad_done.wait_for_count(1));
  ASSERT_TRUE(bad_async.has_value());
  expect_error(*bad_async, Errc::device_error, "EIO");
  EXPECT_EQ(dev.violations(), kNone);
}

// ------------------------------------------------------------------ C API

// The C handle over a fake device (to_c_handle), so the C calls' errno
// mapping, per-thread messages and callbacks are checked without a guest.
// The C API's return values: an OS call's failure keeps its errno, a failed
// host fsync is EIO, a device that needs a reset ERESTART.
TEST(PmemCApi, ErrorsMapToErrnoValues) {
  const auto of = [](Errc c, int sys = 0) { return pmem_c_errno(Error(c, kBdf, "op", "cause", sys)); };
  EXPECT_EQ(of(Errc::io, ENOMEM), -ENOMEM);
  EXPECT_EQ(of(Errc::io, EMFILE), -EMFILE);
  EXPECT_EQ(of(Errc::io), -EIO) << "no errno recorded";
  EXPECT_EQ(of(Errc::device_error, EIO), -EIO);
  EXPECT_EQ(of(Errc::bad_device_data), -EIO);
  EXPECT_EQ(of(Errc::broken), -EIO);
  EXPECT_EQ(of(Errc::needs_reset), -ERESTART);
  EXPECT_EQ(of(Errc::stale_completion), -ERESTART);
  EXPECT_EQ(of(Errc::invalid_argument), -EINVAL);
  EXPECT_EQ(of(Errc::timeout), -ETIMEDOUT);
  EXPECT_EQ(of(Errc::not_found), -ENODEV);
  EXPECT_EQ(of(Errc::busy), -EBUSY);
  EXPECT_EQ(of(Errc::permission, EACCES), -EPERM);
  EXPECT_EQ(of(Errc::unsupported), -EOPNOTSUPP);
}

struct CHandle {
  uvirtio_pmem* h = nullptr;
  ~CHandle() { uvirtio_pmem_close(h); }
};

// A fake pmem device answering flushes (on its own thread with `worker`).
struct FakePmem {
  FakeVirtioDevice dev{pmem_device()};
  FlushDevice device;
  Backing backing;
  explicit FakePmem(bool worker = false) {
    dev.set_handler(device.handler());
    if (worker) dev.start_worker();
  }
};

TEST(PmemCApi, OptionsInitGivesTheLibraryDefaults) {
  uvirtio_pmem_options o;
  std::memset(&o, 0xa5, sizeof o);
  uvirtio_pmem_options_init(&o);
  EXPECT_EQ(o.size, sizeof o);
  auto p = pmem_options_from_c(&o);
  ASSERT_TRUE(p.ok()) << p.error().message();
  const PmemOptions d;
  EXPECT_EQ(p->completion, d.completion);
  EXPECT_EQ(p->timeout, d.timeout);
  EXPECT_EQ(p->recover_on_reset, d.recover_on_reset);
  EXPECT_EQ(p->gather_limit, d.gather_limit);
  auto none = pmem_options_from_c(nullptr);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->timeout, d.timeout);

  o.completion = UVIRTIO_PMEM_POLL;
  o.timeout_ms = 250;
  o.recover_on_reset = 7;  // any nonzero value
  o.gather_us = 0;
  p = pmem_options_from_c(&o);
  ASSERT_TRUE(p.ok()) << p.error().message();
  EXPECT_EQ(p->completion, CompletionMode::polling);
  EXPECT_EQ(p->timeout, 250ms);
  EXPECT_TRUE(p->recover_on_reset);
  EXPECT_EQ(p->gather_limit, 0us);
  o.completion = UVIRTIO_PMEM_INTERRUPT;
  EXPECT_EQ(pmem_options_from_c(&o)->completion, CompletionMode::interrupt);
}

TEST(PmemCApi, BadOptionsAreRejectedBeforeTheDeviceIsTouched) {
  auto expect_bad = [](uvirtio_pmem_options o, const std::string& needle) {
    auto p = pmem_options_from_c(&o);
    ASSERT_FALSE(p.ok()) << needle;
    EXPECT_EQ(p.error().code(), Errc::invalid_argument);
    EXPECT_NE(p.error().message().find(needle), std::string::npos) << p.error().message();
    // Through open: the BDF names a function that does not exist, so only
    // the option check can produce -EINVAL with this message.
    uvirtio_pmem* h = reinterpret_cast<uvirtio_pmem*>(&o);  // must stay untouched
    char err[256] = "";
    EXPECT_EQ(uvirtio_pmem_open_opts("0000:7f:1f.7", &o, &h, err, sizeof err), -EINVAL);
    EXPECT_EQ(h, reinterpret_cast<uvirtio_pmem*>(&o));
    EXPECT_NE(std::string(err).find("0000:7f:1f.7"), std::string::npos) << err;
    EXPECT_NE(std::string(err).find(needle), std::string::npos) << err;
  };
  uvirtio_pmem_options o;
  uvirtio_pmem_options_init(&o);
  auto bad = o;
  bad.size = sizeof o - 1;  // an older, smaller struct or a forgotten _init
  expect_bad(bad, "uvirtio_pmem_options_init");
  bad = o;
  bad.completion = 3;
  expect_bad(bad, "completion 3");
  bad.completion = -1;
  expect_bad(bad, "completion -1");
  bad = o;
  bad.timeout_ms = 0;
  expect_bad(bad, "timeout_ms");

  char err[64] = "";
  uvirtio_pmem* h = nullptr;
  EXPECT_EQ(uvirtio_pmem_open_opts("00:zz.0", &o, &h, err, sizeof err), -EINVAL);
  EXPECT_NE(std::string(err).find("00:zz.0"), std::string::npos) << err;
  EXPECT_EQ(uvirtio_pmem_open_opts(nullptr, &o, &h, err, sizeof err), -EINVAL);
  EXPECT_EQ(h, nullptr);
}

TEST(PmemCApi, ErrnoValuesAndMessagesNameTheDevice) {
  FakePmem f;
  CHandle c{to_c_handle(attach(f.dev, f.backing))};
  ASSERT_NE(c.h, nullptr);
  EXPECT_STREQ(uvirtio_pmem_last_error(c.h), "");
  auto* data = static_cast<std::uint8_t*>(uvirtio_pmem_data(c.h));
  EXPECT_EQ(data, f.backing.mem.data());
  EXPECT_EQ(uvirtio_pmem_size(c.h), kSize);
  EXPECT_EQ(uvirtio_pmem_memcpy_persist(c.h, data + 100, "c", 1), 0) << uvirtio_pmem_last_error(c.h);

  auto expect_msg = [&](const std::string& needle) {
    const std::string m = uvirtio_pmem_last_error(c.h);
    EXPECT_NE(m.find(kBdf), std::string::npos) << m;
    EXPECT_NE(m.find(needle), std::string::npos) << "'" << needle << "' not in: " << m;
  };
  const auto before = f.backing.mem;
  EXPECT_EQ(uvirtio_pmem_memcpy_persist(c.h, data + kSize - 2, "abcd", 4), -EINVAL);
  expect_msg("memcpy_persist");
  EXPECT_EQ(f.backing.mem, before) << "a rejected copy must write nothing";

  f.device.ret = 1;  // the host's fsync failed
  EXPECT_EQ(uvirtio_pmem_persist(c.h, data, 8), -EIO);
  expect_msg("EIO");
  EXPECT_EQ(uvirtio_pmem_flush(c.h), -EIO);
  f.device.ret = 0;
  EXPECT_EQ(uvirtio_pmem_repersist(c.h, data, 8), 0) << uvirtio_pmem_last_error(c.h);
  expect_msg("EIO");  // a success leaves the last failure's message

  f.dev.set_needs_reset();
  EXPECT_EQ(uvirtio_pmem_persist(c.h, data, 8), -ERESTART);
  expect_msg("DEVICE_NEEDS_RESET");
  EXPECT_EQ(uvirtio_pmem_recover(c.h), 0) << "nothing was in flight" << uvirtio_pmem_last_error(c.h);
  EXPECT_EQ(uvirtio_pmem_persist(c.h, data, 8), 0) << uvirtio_pmem_last_error(c.h);

  uvirtio_pmem_stats st{};
  uvirtio_pmem_get_stats(c.h, &st);
  EXPECT_EQ(st.persist_calls, 6u);  // memcpy_persist, persist, flush, repersist, persist, persist
  EXPECT_EQ(st.device_flushes, 6u);
  EXPECT_EQ(st.recoveries, 1u);
  EXPECT_EQ(f.dev.violations(), kNone);
}

TEST(PmemCApi, RecoverOnResetHidesTheResetFromTheCaller) {
  FakePmem f;
  uvirtio_pmem_options o;
  uvirtio_pmem_options_init(&o);
  o.recover_on_reset = 1;
  o.timeout_ms = 2000;
  auto opt = pmem_options_from_c(&o);
  ASSERT_TRUE(opt.ok());
  PmemSetup s;
  s.completion = opt->completion;
  s.timeout = opt->timeout;
  s.recover_on_reset = opt->recover_on_reset;
  CHandle c{to_c_handle(attach(f.dev, f.backing, s))};
  ASSERT_NE(c.h, nullptr);
  break_until_reset(f.dev);
  EXPECT_EQ(uvirtio_pmem_persist(c.h, uvirtio_pmem_data(c.h), 8), 0) << uvirtio_pmem_last_error(c.h);
  uvirtio_pmem_stats st{};
  uvirtio_pmem_get_stats(c.h, &st);
  EXPECT_EQ(st.recoveries, 1u);
  EXPECT_EQ(f.device.seen().size(), 1u) << "the dropped flush was sent again";
}

struct AsyncResults {
  std::mutex m;
  std::condition_variable cv;
  std::vector<std::pair<int, std::string>> got;
  static void done(int rc, const char* msg, void* ctx) {
    auto* self = static_cast<AsyncResults*>(ctx);
    std::lock_guard lk(self->m);
    self->got.emplace_back(rc, msg);
    self->cv.notify_all();
  }
  bool wait_for_count(std::size_t n) {
    std::unique_lock lk(m);
    return cv.wait_for(lk, 5s, [&] { return got.size() >= n; });
  }
};

TEST(PmemCApi, PersistAsyncCallsBackOnceWithTheResult) {
  FakePmem f(true);
  CHandle c{to_c_handle(attach(f.dev, f.backing))};
  ASSERT_NE(c.h, nullptr);
  auto* data = static_cast<std::uint8_t*>(uvirtio_pmem_data(c.h));
  AsyncResults res;
  ASSERT_EQ(uvirtio_pmem_persist_async(c.h, data, 64, &AsyncResults::done, &res), 0);
  ASSERT_TRUE(res.wait_for_count(1));
  f.device.ret = 1;
  ASSERT_EQ(uvirtio_pmem_persist_async(c.h, data, 64, &AsyncResults::done, &res), 0);
  ASSERT_TRUE(res.wait_for_count(2));
  {
    std::lock_guard lk(res.m);
    EXPECT_EQ(res.got[0].first, 0);
    EXPECT_EQ(res.got[0].second, "");
    EXPECT_EQ(res.got[1].first, -EIO);
    EXPECT_NE(res.got[1].second.find(kBdf), std::string::npos) << res.got[1].second;
    EXPECT_NE(res.got[1].second.find("EIO"), std::string::npos) << res.got[1].second;
  }
  // Refused at once, without a callback.
  EXPECT_EQ(uvirtio_pmem_persist_async(c.h, data + kSize, 1, &AsyncResults::done, &res), -EINVAL);
  EXPECT_NE(std::string(uvirtio_pmem_last_error(c.h)).find("outside"), std::string::npos)
      << uvirtio_pmem_last_error(c.h);
  EXPECT_EQ(uvirtio_pmem_persist_async(c.h, data, 1, nullptr, &res), -EINVAL);
  EXPECT_NE(std::string(uvirtio_pmem_last_error(c.h)).find("NULL"), std::string::npos)
      << uvirtio_pmem_last_error(c.h);
  std::this_thread::sleep_for(20ms);
  std::lock_guard lk(res.m);
  EXPECT_EQ(res.got.size(), 2u);
}

// Closing runs the pending callbacks before the range is unmapped: one that
// reads the bytes it persisted must find them (a review found the range
// unmapped first, an ASan heap-use-after-free on the helper thread).
TEST(Pmem, CloseRunsPendingCallbacksWhileTheRangeIsMapped) {
  FakeVirtioDevice dev{pmem_device()};
  FlushDevice device;
  device.work_us = 50000;  // the flush is still running at close
  dev.set_handler(device.handler());
  dev.start_worker();
  FeaturePolicy policy;
  policy.supported = FeatureSet::of({kPmemFeatureShmemRegion});
  auto d = bring_up(dev.take_function(), kVirtioPmemType, policy);
  ASSERT_TRUE(d.ok()) << d.error().message();
  PmemOptions opt;
  opt.timeout = 2s;
  opt.map_range = [](const std::string&, std::uint64_t, std::uint64_t n) -> Result<PmemRange> {
    auto* mem = new std::uint8_t[n]();
    return PmemRange{mem, n, [mem] { delete[] mem; }};
  };
  auto pm = Pmem::attach(std::move(d).value(), opt);
  ASSERT_TRUE(pm.ok()) << pm.error().message();
  std::uint8_t* data = (*pm)->data();
  data[0] = 42;
  std::atomic<int> seen{-1};
  ASSERT_TRUE((*pm)->persist_async(data, 1, [&seen, data](Result<void>) { seen = data[0]; }).ok());
  ASSERT_TRUE(eventually([&] { return dev.requests() >= 1; }));  // the helper thread's flush is running
  pm->reset();
  EXPECT_EQ(seen.load(), 42);
}

TEST(Pmem, EmptyCallbackIsRefusedBeforeAnythingIsQueued) {
  FakePmem f(true);
  auto pm = attach(f.dev, f.backing);
  ASSERT_TRUE(pm);
  auto r = pm->persist_async(pm->data(), 8, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_EQ(pm->persist_calls(), 0u);
  r = pm->memcpy_persist(pm->data(), nullptr, 8);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("source is null"), std::string::npos) << r.error().message();
}

// A callback may run on an application thread that is issuing a flush;
// persist() or flush() from it would wait for a flush only that thread can
// issue. They fail at once instead of hanging; persist_async works.
TEST(PmemCApi, PersistFromACallbackFailsInsteadOfHanging) {
  FakePmem f(true);
  CHandle c{to_c_handle(attach(f.dev, f.backing))};
  ASSERT_NE(c.h, nullptr);
  struct Ctx {
    uvirtio_pmem* h;
    std::atomic<int> persist_rc{1}, flush_rc{1}, async_rc{1};
    std::string message;
    std::atomic<bool> chained_done{false};
  } ctx{c.h, {}, {}, {}, {}, {}};
  auto cb = [](int, const char*, void* p) {
    auto* x = static_cast<Ctx*>(p);
    auto* data = static_cast<std::uint8_t*>(uvirtio_pmem_data(x->h));
    x->persist_rc = uvirtio_pmem_persist(x->h, data, 8);
    x->message = uvirtio_pmem_last_error(x->h);
    x->flush_rc = uvirtio_pmem_flush(x->h);
    x->async_rc = uvirtio_pmem_persist_async(
        x->h, data, 8, [](int rc, const char*, void* q) { static_cast<Ctx*>(q)->chained_done = rc == 0; }, x);
  };
  ASSERT_EQ(uvirtio_pmem_persist_async(c.h, uvirtio_pmem_data(c.h), 8, cb, &ctx), 0);
  ASSERT_TRUE(eventually([&] { return ctx.chained_done.load(); }));
  EXPECT_EQ(ctx.persist_rc.load(), -EINVAL);
  EXPECT_EQ(ctx.flush_rc.load(), -EINVAL);
  EXPECT_EQ(ctx.async_rc.load(), 0);
  EXPECT_NE(ctx.message.find("completion callback"), std::string::npos) << ctx.message;
  EXPECT_NE(ctx.message.find(kBdf), std::string::npos) << ctx.message;
}

// to_c_handle() of no Pmem (an attach that failed, moved in unchecked) is
// no handle: NULL, which every call refuses. It was a handle around a null
// Pmem, which the tests' own ASSERT_NE(c.h, nullptr) let through and the
// first call dereferenced.
TEST(PmemCApi, AHandleOfNoPmemIsNull) {
  uvirtio_pmem* h = to_c_handle(nullptr);
  EXPECT_EQ(h, nullptr);
  EXPECT_EQ(uvirtio_pmem_flush(h), -EINVAL);
  EXPECT_EQ(uvirtio_pmem_size(h), 0u);
  uvirtio_pmem_close(h);
}

TEST(PmemCApi, NullHandleIsEinvalNotACrash) {
  std::uint8_t buf[8] = {};
  EXPECT_EQ(uvirtio_pmem_persist(nullptr, buf, 8), -EINVAL);
  EXPECT_EQ(uvirtio_pmem_flush(nullptr), -EINVAL);
  EXPECT_EQ(uvirtio_pmem_memcpy_persist(nullptr, buf, buf, 8), -EINVAL);
  EXPECT_EQ(uvirtio_pmem_repersist(nullptr, buf, 8), -EINVAL);
  EXPECT_EQ(uvirtio_pmem_recover(nullptr), -EINVAL);
  EXPECT_EQ(uvirtio_pmem_persist_async(
                nullptr, buf, 8, [](int, const char*, void*) {}, nullptr),
            -EINVAL);
  EXPECT_EQ(uvirtio_pmem_data(nullptr), nullptr);
  EXPECT_EQ(uvirtio_pmem_size(nullptr), 0u);
  uvirtio_pmem_stats st;
  std::memset(&st, 0xa5, sizeof st);
  uvirtio_pmem_get_stats(nullptr, &st);
  EXPECT_EQ(st.persist_calls, 0u);
  EXPECT_EQ(st.device_flushes, 0u);
  EXPECT_NE(std::string(uvirtio_pmem_last_error(nullptr)).find("NULL"), std::string::npos);
  uvirtio_pmem_close(nullptr);
}

TEST(PmemCApi, CloseRunsEveryPendingCallback) {
  FakePmem f(true);
  f.device.work_us = 20000;  // a slow host: callbacks are still pending at close
  AsyncResults res;
  constexpr int kCalls = 5;
  {
    CHandle c{to_c_handle(attach(f.dev, f.backing))};
    ASSERT_NE(c.h, nullptr);
    for (int i = 0; i < kCalls; ++i)
      ASSERT_EQ(uvirtio_pmem_persist_async(c.h, uvirtio_pmem_data(c.h), 8, &AsyncResults::done, &res), 0);
  }
  std::lock_guard lk(res.m);
  ASSERT_EQ(res.got.size(), static_cast<std::size_t>(kCalls)) << "close returned before every callback ran";
  for (const auto& [rc, msg] : res.got) {
    if (rc == 0) continue;
    EXPECT_EQ(rc, -EIO);
    EXPECT_NE(msg.find("closed before"), std::string::npos) << msg;
    EXPECT_NE(msg.find(kBdf), std::string::npos) << msg;
  }
}

// Threads sharing a handle each read their own last failure, never another
// thread's (nor a string another thread is overwriting).
TEST(PmemCApi, LastErrorIsPerThread) {
  FakePmem f;
  CHandle c{to_c_handle(attach(f.dev, f.backing))};
  ASSERT_NE(c.h, nullptr);
  auto* data = static_cast<std::uint8_t*>(uvirtio_pmem_data(c.h));
  std::atomic<int> wrong{0};
  std::string sample_wrong;
  std::mutex sample_m;
  std::atomic<int> ready{0};
  auto worker = [&](bool copy) {
    const char* mine = copy ? "memcpy_persist" : "repersist";
    ready.fetch_add(1);
    while (ready.load() < 2) {
    }
    for (int i = 0; i < 20000; ++i) {
      const int rc = copy ? uvirtio_pmem_memcpy_persist(c.h, data + kSize, "x", 1)
                          : uvirtio_pmem_repersist(c.h, data + kSize, 1);
      const std::string m = uvirtio_pmem_last_error(c.h);
      // "memcpy_persist" contains "persist" but not "repersist" and vice versa.
      const bool ok = rc == -EINVAL && m.find(mine) != std::string::npos &&
                      m.find(copy ? "repersist" : "memcpy_persist") == std::string::npos;
      if (!ok && wrong.fetch_add(1) == 0) {
        std::lock_guard lk(sample_m);
        sample_wrong = m;
      }
    }
  };
  std::thread a(worker, true), b(worker, false);
  a.join();
  b.join();
  EXPECT_EQ(wrong.load(), 0) << "e.g. " << sample_wrong;
}

}  // namespace
}  // namespace uvirtio::driver
