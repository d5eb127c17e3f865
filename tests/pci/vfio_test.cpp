// Unit tests for the OS-facing PCI layer, run against FakeOs (an in-memory
// sysfs and /dev/vfio): VfioDevice open/teardown and its error paths, the
// VFIO_IOMMU_GET_INFO capability-chain parser, IovaAllocator, DmaPool,
// bind_vfio/unbind_vfio and describe_function. No root, no /dev/vfio.
#include "uvirtio/pci/vfio.hpp"

#include <gtest/gtest.h>
#include <linux/memfd.h>
#include <linux/vfio.h>
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "support/fake_os.hpp"
#include "uvirtio/pci/binding.hpp"
#include "uvirtio/pci/discovery.hpp"
#include "uvirtio/pci/dma.hpp"
#include "uvirtio/pci/soft_function.hpp"

namespace uvirtio::pci {
namespace {

using test::FakeOs;
using test::FakePciDevice;
using test::region_offset;

constexpr const char* kBdf = "0000:00:03.0";
const std::string kDevDir = "/sys/bus/pci/devices/0000:00:03.0";
constexpr Bdf kAddr{0, 0, 3, 0};
constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
constexpr std::size_t kSmallChunk = 256 * 1024;  // DmaPool's minimum small-page chunk
constexpr std::size_t kHugePage = 2u << 20;

template <class T>
std::string msg(const Result<T>& r) {
  return r.ok() ? std::string("(ok)") : r.error().message();
}

std::size_t index_of(const std::vector<std::string>& v, const std::string& s, std::size_t from = 0) {
  for (std::size_t i = from; i < v.size(); ++i)
    if (v[i] == s) return i;
  return std::string::npos;
}
std::size_t count_of(const std::vector<std::string>& v, const std::string& s) {
  return static_cast<std::size_t>(std::count(v.begin(), v.end(), s));
}

std::vector<std::pair<std::uint64_t, std::uint64_t>> pairs(const std::vector<IovaRange>& v) {
  std::vector<std::pair<std::uint64_t, std::uint64_t>> out;
  for (const auto& r : v) out.emplace_back(r.start, r.end);
  return out;
}

// Addresses as integers: gtest would print an unsigned char* as a C string.
std::uintptr_t addr(const volatile void* p) { return reinterpret_cast<std::uintptr_t>(p); }

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

// Every test leaves the fake machine clean: each fd closed exactly once, no
// mapping left behind.
void expect_clean(const FakeOs& os) {
  EXPECT_TRUE(os.all_closed_once()) << "open: [" << join(os.open_fds())
                                    << "], bad closes: " << os.bad_closes().size();
  EXPECT_EQ(os.live_real_mappings(), 0u);
  EXPECT_EQ(os.live_bar_mappings(), 0u);
}

// ===========================================================================
// (a) VfioDevice::open against a healthy machine
// ===========================================================================

class VfioOpen : public ::testing::Test {
 protected:
  VfioOpen() {
    os.add_driver("vfio-pci");
    os.add_driver("virtio-pci");
    os.add_device(FakePciDevice::virtio(kBdf, "vfio-pci"));
  }
  void TearDown() override { expect_clean(os); }

  Result<std::unique_ptr<VfioDevice>> open(VfioOptions o = {}) {
    return VfioDevice::open(kAddr, std::move(o), os);
  }
  std::unique_ptr<VfioDevice> open_ok(VfioOptions o = {}) {
    auto r = open(std::move(o));
    EXPECT_TRUE(r.ok()) << msg(r);
    return r.ok() ? std::move(r).value() : nullptr;
  }
  FakePciDevice& dev() { return os.device(kBdf); }

  FakeOs os;
};

TEST_F(VfioOpen, IssuesIoctlsInKernelOrder) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  std::vector<std::string> want = {
      "VFIO_GET_API_VERSION",     "VFIO_CHECK_EXTENSION",     "VFIO_GROUP_GET_STATUS",
      "VFIO_GROUP_SET_CONTAINER", "VFIO_SET_IOMMU",           "VFIO_IOMMU_GET_INFO",
      "VFIO_IOMMU_GET_INFO",      "VFIO_GROUP_GET_DEVICE_FD", "VFIO_DEVICE_GET_INFO"};
  for (int i = 0; i < VFIO_PCI_NUM_REGIONS; ++i) want.push_back("VFIO_DEVICE_GET_REGION_INFO");
  for (int i = 0; i < 3; ++i) want.push_back("VFIO_DEVICE_GET_IRQ_INFO");
  EXPECT_EQ(os.ioctl_names(), want);

  // Which fd each ioctl went to.
  const auto& calls = os.ioctls();
  ASSERT_EQ(calls.size(), want.size());
  const std::vector<std::string> targets = {"container", "container", "group 12",
                                            "group 12",  "container", "container",
                                            "container", "group 12",  "device 0000:00:03.0"};
  for (std::size_t i = 0; i < targets.size(); ++i) EXPECT_EQ(calls[i].target, targets[i]) << i;
  for (std::size_t i = targets.size(); i < calls.size(); ++i)
    EXPECT_EQ(calls[i].target, "device 0000:00:03.0");
  EXPECT_EQ(calls[1].arg_value, static_cast<unsigned long>(VFIO_TYPE1v2_IOMMU));  // CHECK_EXTENSION
  EXPECT_EQ(calls[4].arg_value, static_cast<unsigned long>(VFIO_TYPE1v2_IOMMU));  // SET_IOMMU

  // Opens: container, then group, then the device fd; nothing else.
  std::vector<std::string> opened;
  for (const auto& rec : os.fd_history()) opened.push_back(rec.name);
  EXPECT_EQ(opened, (std::vector<std::string>{"container", "group 12", "device 0000:00:03.0"}));
  EXPECT_EQ(d->mode(), IommuMode::type1v2);
  EXPECT_EQ(d->bdf(), kBdf);
}

TEST_F(VfioOpen, GrowsIommuInfoArgszAsTheKernelAsks) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  // First call with the bare struct (24 bytes); the kernel answers with the
  // size the capability chain needs: migration (32) + DMA avail (16) + IOVA
  // ranges (16 + 2 * 16) = 96 bytes after the 24-byte header.
  EXPECT_EQ(os.iommu_info_argsz(), (std::vector<std::uint32_t>{24, 120}));
  EXPECT_EQ(pairs(d->iova_ranges()), (std::vector<std::pair<std::uint64_t, std::uint64_t>>{
                                         {0, 0xfedfffff}, {0xfef00000, 0x7fffffffff}}));
}

TEST_F(VfioOpen, NoIovaCapabilityMeansNoRanges) {
  os.report_iova_caps = false;  // kernels before 5.4
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(os.iommu_info_argsz(), (std::vector<std::uint32_t>{24}));
  EXPECT_TRUE(d->iova_ranges().empty());
}

TEST_F(VfioOpen, EnablesMemorySpaceAndBusMasterWithReadModifyWrite) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  const auto& io = os.region_io();
  ASSERT_EQ(io.size(), 2u);
  EXPECT_FALSE(io[0].write);
  EXPECT_EQ(io[0].target, "device 0000:00:03.0");
  EXPECT_EQ(io[0].offset, region_offset(VFIO_PCI_CONFIG_REGION_INDEX) + 4);
  EXPECT_EQ(io[0].data, (std::vector<std::uint8_t>{0x00, 0x04}));
  EXPECT_TRUE(io[1].write);
  EXPECT_EQ(io[1].offset, region_offset(VFIO_PCI_CONFIG_REGION_INDEX) + 4);
  // Bits 1 (memory space) and 2 (bus master) set, INTx disable (bit 10) kept.
  EXPECT_EQ(io[1].data, (std::vector<std::uint8_t>{0x06, 0x04}));
  EXPECT_EQ(dev().config()[4], 0x06);
  EXPECT_EQ(dev().config()[5], 0x04);
}

TEST_F(VfioOpen, ConfigReadWriteGoThroughTheConfigRegion) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  std::array<std::uint8_t, 4> id{};
  ASSERT_TRUE(d->read_config(0, id).ok());
  EXPECT_EQ(id, (std::array<std::uint8_t, 4>{0xf4, 0x1a, 0x44, 0x10}));
  EXPECT_EQ(os.region_io().back().offset, region_offset(VFIO_PCI_CONFIG_REGION_INDEX));

  const std::array<std::uint8_t, 1> line{0x0b};
  ASSERT_TRUE(d->write_config(0x3c, line).ok());
  EXPECT_TRUE(os.region_io().back().write);
  EXPECT_EQ(os.region_io().back().offset, region_offset(VFIO_PCI_CONFIG_REGION_INDEX) + 0x3c);
  EXPECT_EQ(dev().config()[0x3c], 0x0b);

  std::array<std::uint8_t, 4> last{};
  EXPECT_TRUE(d->read_config(0xfc, last).ok());  // ends exactly at 256

  const std::size_t ios = os.region_io().size();
  auto beyond = d->read_config(0xfd, last);
  ASSERT_FALSE(beyond.ok());
  EXPECT_EQ(beyond.error().code(), Errc::invalid_argument);
  EXPECT_EQ(beyond.error().message(), "0000:00:03.0: read config space: offset beyond config space");
  auto wbeyond = d->write_config(0x100, line);
  ASSERT_FALSE(wbeyond.ok());
  EXPECT_EQ(wbeyond.error().message(), "0000:00:03.0: write config space: offset beyond config space");
  EXPECT_FALSE(d->read_config(0xffffffffu, std::span<std::uint8_t>()).ok());
  EXPECT_EQ(os.region_io().size(), ios) << "out-of-range accesses must not reach the device";
}

TEST_F(VfioOpen, ConfigReadErrorFromTheKernel) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  dev().config_read_limit = 0x40;
  std::array<std::uint8_t, 4> b{};
  auto r = d->read_config(0x40, b);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::io);
  EXPECT_EQ(r.error().sys_errno(), EIO);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: read config space at 64: Input/output error");
}

TEST_F(VfioOpen, ConfigSnapshot) {
  {
    auto d = open_ok();
    ASSERT_NE(d, nullptr);
    auto snap = d->config_snapshot();
    ASSERT_TRUE(snap.ok()) << msg(snap);
    EXPECT_EQ(*snap, dev().config());
  }
  // A PCIe function: 4096 bytes, unless the kernel refuses the extended space.
  dev().config().resize(4096, 0);
  dev().config()[0x100] = 0x01;
  {
    auto d = open_ok();
    ASSERT_NE(d, nullptr);
    auto snap = d->config_snapshot();
    ASSERT_TRUE(snap.ok()) << msg(snap);
    ASSERT_EQ(snap->size(), 4096u);
    EXPECT_EQ((*snap)[0x100], 0x01);
    dev().config_read_limit = 256;
    auto small = d->config_snapshot();
    ASSERT_TRUE(small.ok()) << msg(small);
    EXPECT_EQ(small->size(), 256u);
  }
}

TEST_F(VfioOpen, RegionsDescribeBarsAndSkipVga) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  const auto& rs = d->regions();
  ASSERT_EQ(rs.size(), static_cast<std::size_t>(VFIO_PCI_NUM_REGIONS));
  for (std::uint32_t i = 0; i < rs.size(); ++i) EXPECT_EQ(rs[i].index, i);
  constexpr std::uint32_t rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
  EXPECT_TRUE(rs[0].available);
  EXPECT_EQ(rs[0].flags, rw);
  EXPECT_EQ(rs[0].size, 0x20u);
  EXPECT_EQ(rs[0].offset, 0u);
  EXPECT_EQ(rs[1].flags, rw | VFIO_REGION_INFO_FLAG_MMAP);
  EXPECT_EQ(rs[1].offset, region_offset(1));
  EXPECT_TRUE(rs[2].available);
  EXPECT_EQ(rs[2].size, 0u);
  EXPECT_EQ(rs[4].size, 0x4000u);
  EXPECT_EQ(rs[4].offset, region_offset(4));
  EXPECT_EQ(rs[VFIO_PCI_CONFIG_REGION_INDEX].size, 256u);
  EXPECT_EQ(rs[VFIO_PCI_CONFIG_REGION_INDEX].offset, region_offset(VFIO_PCI_CONFIG_REGION_INDEX));
  EXPECT_FALSE(rs[VFIO_PCI_VGA_REGION_INDEX].available);  // EINVAL from the kernel: kept, marked unavailable
  EXPECT_EQ(rs[VFIO_PCI_VGA_REGION_INDEX].size, 0u);
  EXPECT_EQ(d->bar_sizes(), (std::array<std::uint64_t, 6>{0x20, 0x1000, 0, 0, 0x4000, 0}));
}

TEST_F(VfioOpen, MappableBarIsMmapped) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  auto b = d->bar(4);
  ASSERT_TRUE(b.ok()) << msg(b);
  BarIo* bar = *b;
  EXPECT_EQ(bar->size(), 0x4000u);
  EXPECT_EQ(addr(bar->mapping()), addr(dev().regions[4].mem.data()));
  ASSERT_EQ(os.mmaps().size(), 1u);
  const auto& m = os.mmaps()[0];
  EXPECT_EQ(m.target, "device 0000:00:03.0");
  EXPECT_EQ(m.len, 0x4000u);
  EXPECT_EQ(m.prot, PROT_READ | PROT_WRITE);
  EXPECT_EQ(m.flags, MAP_SHARED);
  EXPECT_EQ(m.offset, region_offset(4));

  const std::size_t ios = os.region_io().size();
  ASSERT_TRUE(bar->write(0x100, 4, 0xdeadbeef).ok());
  EXPECT_EQ(dev().regions[4].mem[0x100], 0xef);
  EXPECT_EQ(dev().regions[4].mem[0x103], 0xde);
  auto v = bar->read(0x100, 2);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 0xbeefu);
  ASSERT_TRUE(bar->write(0x3ff8, 8, 0x0102030405060708ull).ok());
  auto v8 = bar->read(0x3ff8, 8);
  ASSERT_TRUE(v8.ok());
  EXPECT_EQ(*v8, 0x0102030405060708ull);
  EXPECT_EQ(os.region_io().size(), ios) << "a mapped BAR must not use pread/pwrite";

  EXPECT_EQ(bar->read(0x3ffd, 4).error().code(), Errc::invalid_argument);
  EXPECT_EQ(bar->read(0, 3).error().code(), Errc::invalid_argument);
  EXPECT_EQ(bar->write(0x4000, 1, 0).error().code(), Errc::invalid_argument);
  EXPECT_EQ(bar->read(kMax, 1).error().code(), Errc::invalid_argument);

  auto again = d->bar(4);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, bar);
  EXPECT_EQ(os.mmaps().size(), 1u) << "the BAR is mapped once";
}

// BUG (pci/src/vfio.cpp:50, MappedBar::range_error): the Error has an empty
// device, so "BAR read: access of 4 bytes at ..." does not name the function
// (RegionBar does name it). Fix: give MappedBar the device name (as RegionBar
// gets it) and the BAR index, e.g. "0000:00:03.0: BAR4 read: ...". Enable
// when fixed.
TEST_F(VfioOpen, MappedBarErrorsNameTheFunction) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  auto b = d->bar(4);
  ASSERT_TRUE(b.ok());
  auto r = (*b)->read(0x4000, 4);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().device(), kBdf);
}

// A BAR access must be naturally aligned: on a mapped BAR a misaligned one
// is a misaligned volatile load or store through a uint16/32/64 pointer
// (undefined behaviour; on the bus a split access the device never asked
// for). It is refused with an error naming the function, as an access
// outside the BAR is, on mapped and pread/pwrite BARs alike.
TEST_F(VfioOpen, MisalignedBarAccessIsRefused) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  auto mapped = d->bar(4);
  ASSERT_TRUE(mapped.ok()) << msg(mapped);
  ASSERT_NE(addr((*mapped)->mapping()), 0u);
  auto r = (*mapped)->read(1, 4);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_EQ(r.error().device(), kBdf);
  EXPECT_NE(r.error().message().find("not aligned"), std::string::npos) << r.error().message();
  EXPECT_FALSE((*mapped)->write(2, 4, 0).ok());
  EXPECT_FALSE((*mapped)->read(4, 8).ok());
  EXPECT_TRUE((*mapped)->read(8, 8).ok());
  EXPECT_TRUE((*mapped)->read(3, 1).ok());

  auto io = d->bar(0);
  ASSERT_TRUE(io.ok()) << msg(io);
  const std::size_t ios = os.region_io().size();
  auto q = (*io)->read(1, 2);
  ASSERT_FALSE(q.ok());
  EXPECT_EQ(q.error().device(), kBdf);
  EXPECT_FALSE((*io)->write(6, 4, 0).ok());
  EXPECT_EQ(os.region_io().size(), ios) << "no pread/pwrite for a refused access";
  EXPECT_TRUE((*io)->read(2, 2).ok());
}

TEST_F(VfioOpen, NonMappableBarUsesPreadPwrite) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  auto b = d->bar(0);
  ASSERT_TRUE(b.ok()) << msg(b);
  BarIo* bar = *b;
  EXPECT_EQ(addr(bar->mapping()), 0u);
  EXPECT_EQ(bar->size(), 0x20u);
  EXPECT_TRUE(os.mmaps().empty()) << "no mmap for a region without VFIO_REGION_INFO_FLAG_MMAP";

  ASSERT_TRUE(bar->write(0x10, 2, 0xbeef).ok());
  ASSERT_TRUE(os.region_io().back().write);
  EXPECT_EQ(os.region_io().back().offset, region_offset(0) + 0x10);
  EXPECT_EQ(os.region_io().back().data, (std::vector<std::uint8_t>{0xef, 0xbe}));
  EXPECT_EQ(dev().regions[0].mem[0x10], 0xef);
  EXPECT_EQ(dev().regions[0].mem[0x11], 0xbe);

  dev().regions[0].mem[0x12] = 0x34;
  auto v = bar->read(0x10, 4);
  ASSERT_TRUE(v.ok()) << msg(v);
  EXPECT_EQ(*v, 0x0034beefu);
  EXPECT_FALSE(os.region_io().back().write);
  EXPECT_EQ(os.region_io().back().offset, region_offset(0) + 0x10);

  auto bad = bar->write(0x1c, 8, 0);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code(), Errc::invalid_argument);
  EXPECT_EQ(bad.error().device(), kBdf);
  EXPECT_EQ(bar->read(0x20, 1).error().code(), Errc::invalid_argument);
  EXPECT_EQ(bar->read(0, 0).error().code(), Errc::invalid_argument);
}

TEST_F(VfioOpen, MmapFailureFallsBackToRegionIo) {
  dev().regions[1].mmap_fails = true;
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  auto b = d->bar(1);
  ASSERT_TRUE(b.ok()) << msg(b);
  EXPECT_EQ(addr((*b)->mapping()), 0u);
  ASSERT_EQ(os.mmaps().size(), 1u);
  EXPECT_EQ(os.mmaps()[0].result, MAP_FAILED);
  ASSERT_TRUE((*b)->write(0x800, 4, 0x12345678).ok());
  EXPECT_EQ(os.region_io().back().offset, region_offset(1) + 0x800);
  EXPECT_EQ(dev().regions[1].mem[0x800], 0x78);
}

TEST_F(VfioOpen, AbsentAndOutOfRangeBars) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  auto b2 = d->bar(2);
  ASSERT_FALSE(b2.ok());
  EXPECT_EQ(b2.error().code(), Errc::not_found);
  EXPECT_EQ(b2.error().message(), "0000:00:03.0: open BAR2: the BAR is not implemented");
  auto b6 = d->bar(6);
  ASSERT_FALSE(b6.ok());
  EXPECT_EQ(b6.error().code(), Errc::invalid_argument);
  EXPECT_EQ(b6.error().message(), "0000:00:03.0: open BAR: BAR index 6 > 5");
  EXPECT_TRUE(os.mmaps().empty());
}

TEST_F(VfioOpen, IrqCounts) {
  dev().irq_counts = {1, 1, 3, 1, 1};
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->irq_count(IrqKind::intx), 1u);
  EXPECT_EQ(d->irq_count(IrqKind::msix), 3u);
}

TEST_F(VfioOpen, EnableMsixPassesOneEventfdPerVector) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  auto fds = d->enable_irqs(IrqKind::msix, 3);
  ASSERT_TRUE(fds.ok()) << msg(fds);
  ASSERT_EQ(fds->size(), 3u);
  for (int fd : *fds) {
    const auto* rec = os.open_record(fd);
    ASSERT_NE(rec, nullptr);
    EXPECT_EQ(rec->kind, FakeOs::FdKind::eventfd);
  }
  EXPECT_NE((*fds)[0], (*fds)[1]);
  EXPECT_NE((*fds)[1], (*fds)[2]);
  ASSERT_EQ(os.irq_sets().size(), 1u);
  const auto& s = os.irq_sets()[0];
  EXPECT_EQ(s.argsz, sizeof(vfio_irq_set) + 3 * sizeof(std::int32_t));
  EXPECT_EQ(s.flags, static_cast<std::uint32_t>(VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER));
  EXPECT_EQ(s.index, static_cast<std::uint32_t>(VFIO_PCI_MSIX_IRQ_INDEX));
  EXPECT_EQ(s.start, 0u);
  EXPECT_EQ(s.count, 3u);
  EXPECT_EQ(s.fds, *fds);
}

TEST_F(VfioOpen, EnableIrqsRejectsBadCounts) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  auto many = d->enable_irqs(IrqKind::msix, 5);
  ASSERT_FALSE(many.ok());
  EXPECT_EQ(many.error().code(), Errc::unsupported);
  EXPECT_EQ(many.error().message(), "0000:00:03.0: enable MSI-X: asked for 5 vectors, the function has 4");
  auto none = d->enable_irqs(IrqKind::msix, 0);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.error().code(), Errc::unsupported);
  auto intx = d->enable_irqs(IrqKind::intx, 2);
  ASSERT_FALSE(intx.ok());
  EXPECT_EQ(intx.error().message(), "0000:00:03.0: enable INTx: asked for 2 vectors, the function has 1");
  EXPECT_TRUE(os.irq_sets().empty());
  EXPECT_EQ(os.fd_history().size(), 3u) << "no eventfd created";
}

TEST_F(VfioOpen, ReenablingDisablesTheOldVectorsFirst) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  auto first = d->enable_irqs(IrqKind::msix, 2);
  ASSERT_TRUE(first.ok());
  auto second = d->enable_irqs(IrqKind::msix, 4);
  ASSERT_TRUE(second.ok()) << msg(second);
  ASSERT_EQ(os.irq_sets().size(), 3u);
  const auto& off = os.irq_sets()[1];
  EXPECT_EQ(off.flags, static_cast<std::uint32_t>(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER));
  EXPECT_EQ(off.index, static_cast<std::uint32_t>(VFIO_PCI_MSIX_IRQ_INDEX));
  EXPECT_EQ(off.count, 0u);
  EXPECT_EQ(os.irq_sets()[2].count, 4u);
  EXPECT_EQ(os.irq_sets()[2].fds, *second);
  EXPECT_EQ(count_of(os.close_order(), "eventfd"), 2u) << "the first two eventfds are closed";
  for (int fd : *second) EXPECT_NE(os.open_record(fd), nullptr);
}

TEST_F(VfioOpen, UnmaskIntxAndDisable) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  ASSERT_TRUE(d->unmask_intx().ok());
  ASSERT_EQ(os.irq_sets().size(), 1u);
  EXPECT_EQ(os.irq_sets()[0].argsz, sizeof(vfio_irq_set));
  EXPECT_EQ(os.irq_sets()[0].flags,
            static_cast<std::uint32_t>(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK));
  EXPECT_EQ(os.irq_sets()[0].index, static_cast<std::uint32_t>(VFIO_PCI_INTX_IRQ_INDEX));
  EXPECT_EQ(os.irq_sets()[0].start, 0u);
  EXPECT_EQ(os.irq_sets()[0].count, 1u);

  auto fds = d->enable_irqs(IrqKind::intx, 1);
  ASSERT_TRUE(fds.ok()) << msg(fds);
  ASSERT_EQ(os.irq_sets().size(), 2u);
  EXPECT_EQ(os.irq_sets()[1].index, static_cast<std::uint32_t>(VFIO_PCI_INTX_IRQ_INDEX));
  EXPECT_EQ(os.irq_sets()[1].fds, *fds);

  ASSERT_TRUE(d->disable_irqs().ok());
  ASSERT_EQ(os.irq_sets().size(), 3u);
  const auto& off = os.irq_sets()[2];
  EXPECT_EQ(off.flags, static_cast<std::uint32_t>(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER));
  EXPECT_EQ(off.index, static_cast<std::uint32_t>(VFIO_PCI_INTX_IRQ_INDEX));
  EXPECT_EQ(off.start, 0u);
  EXPECT_EQ(off.count, 0u);
  EXPECT_EQ(os.open_record((*fds)[0]), nullptr) << "the eventfd is closed on disable";
  ASSERT_TRUE(d->disable_irqs().ok());
  EXPECT_EQ(os.irq_sets().size(), 3u) << "disabling twice issues no ioctl";
}

TEST_F(VfioOpen, SetIrqsFailureClosesTheNewEventfds) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  os.set_irqs_errno = EINVAL;
  auto r = d->enable_irqs(IrqKind::msix, 2);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: VFIO_DEVICE_SET_IRQS (enable MSI-X): Invalid argument");
  EXPECT_EQ(count_of(os.close_order(), "eventfd"), 2u);
  d.reset();
  EXPECT_EQ(os.irq_sets().size(), 1u) << "nothing to disable at teardown";
}

TEST_F(VfioOpen, EventfdExhaustion) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  os.eventfd_budget = 1;
  auto r = d->enable_irqs(IrqKind::msix, 2);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::io);
  EXPECT_EQ(r.error().sys_errno(), EMFILE);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: enable MSI-X: eventfd: Too many open files");
  EXPECT_TRUE(os.irq_sets().empty());
  EXPECT_EQ(count_of(os.close_order(), "eventfd"), 1u);
}

TEST_F(VfioOpen, TeardownOrder) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  ASSERT_TRUE(d->enable_irqs(IrqKind::msix, 2).ok());
  ASSERT_TRUE(d->bar(4).ok());
  auto region = d->dma().alloc(64, 64);
  ASSERT_TRUE(region.ok()) << msg(region);
  const std::size_t before = os.events().size();
  d.reset();

  const auto& ev = os.events();
  const std::size_t irq_off = index_of(ev, "ioctl device 0000:00:03.0 VFIO_DEVICE_SET_IRQS", before);
  const std::size_t efd = index_of(ev, "close eventfd", before);
  const std::size_t bar = index_of(ev, "munmap BAR4", before);
  const std::size_t dev_close = index_of(ev, "close device 0000:00:03.0", before);
  const std::size_t unmap = index_of(ev, "ioctl container VFIO_IOMMU_UNMAP_DMA", before);
  const std::size_t dma_munmap = index_of(ev, "munmap memfd", before);
  const std::size_t group_close = index_of(ev, "close group 12", before);
  const std::size_t container_close = index_of(ev, "close container", before);
  for (std::size_t i : {irq_off, efd, bar, dev_close, unmap, dma_munmap, group_close, container_close})
    ASSERT_NE(i, std::string::npos) << join(ev);
  EXPECT_LT(irq_off, efd) << "interrupts off before their eventfds close";
  EXPECT_LT(efd, bar);
  EXPECT_LT(bar, dev_close) << "BARs unmapped before the device fd closes";
  EXPECT_LT(dev_close, unmap) << "device fd closed before DMA is unmapped";
  EXPECT_LT(unmap, dma_munmap) << "IOMMU mapping removed before the memory is freed";
  EXPECT_LT(unmap, group_close);
  EXPECT_LT(group_close, container_close) << "group closes before the container";

  std::vector<std::string> vfio_closes;
  for (const auto& n : os.close_order())
    if (n == "container" || n.rfind("group", 0) == 0 || n.rfind("device", 0) == 0) vfio_closes.push_back(n);
  EXPECT_EQ(vfio_closes, (std::vector<std::string>{"device 0000:00:03.0", "group 12", "container"}));
  ASSERT_EQ(os.dma_maps().size(), 1u);
  ASSERT_EQ(os.dma_unmaps().size(), 1u);
  EXPECT_EQ(os.dma_unmaps()[0].iova, os.dma_maps()[0].iova);
  EXPECT_EQ(os.dma_unmaps()[0].size, os.dma_maps()[0].size);
}

TEST_F(VfioOpen, DmaThroughTheContainer) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  auto a = d->dma().alloc(64, 64);
  ASSERT_TRUE(a.ok()) << msg(a);
  auto b = d->dma().alloc(4096, 4096);
  ASSERT_TRUE(b.ok()) << msg(b);
  ASSERT_EQ(os.dma_maps().size(), 1u);
  const auto& m = os.dma_maps()[0];
  EXPECT_EQ(m.vaddr, reinterpret_cast<std::uint64_t>(a->va));
  EXPECT_EQ(m.iova, 0x1000u) << "first page of the first usable range (IOVA 0 is never used)";
  EXPECT_EQ(m.size, kSmallChunk);
  EXPECT_EQ(m.flags, static_cast<std::uint32_t>(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE));
  EXPECT_EQ(a->iova, m.iova);
  EXPECT_EQ(static_cast<std::uint8_t*>(b->va) - static_cast<std::uint8_t*>(a->va), 4096);
  EXPECT_EQ(b->iova, m.iova + 4096);
  EXPECT_EQ(os.live_dma_mappings(), 1u);
}

TEST_F(VfioOpen, NoIommuMode) {
  os.noiommu_groups.insert(12);
  os.extensions.insert(VFIO_NOIOMMU_IOMMU);
  std::vector<std::string> warnings;
  VfioOptions o;
  o.mode = IommuMode::noiommu;
  o.warn = [&](const std::string& w) { warnings.push_back(w); };
  auto d = open_ok(std::move(o));
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->mode(), IommuMode::noiommu);
  EXPECT_NE(index_of(os.events(), "open group noiommu-12"), std::string::npos) << join(os.events());
  EXPECT_EQ(os.ioctls()[1].arg_value, static_cast<unsigned long>(VFIO_NOIOMMU_IOMMU));
  EXPECT_EQ(os.ioctls()[4].name, "VFIO_SET_IOMMU");
  EXPECT_EQ(os.ioctls()[4].arg_value, static_cast<unsigned long>(VFIO_NOIOMMU_IOMMU));
  EXPECT_EQ(index_of(os.ioctl_names(), "VFIO_IOMMU_GET_INFO"), std::string::npos);
  EXPECT_TRUE(d->iova_ranges().empty());
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_EQ(warnings[0],
            "WARNING: 0000:00:03.0: VFIO no-IOMMU mode: the device can read and write all of this machine's "
            "memory; "
            "use it only on a throwaway guest");
}

TEST_F(VfioOpen, NoIommuDmaUsesPhysicalAddressesAndStaysInsideAPage) {
  os.noiommu_groups.insert(12);
  os.extensions.insert(VFIO_NOIOMMU_IOMMU);
  os.pagemap = FakeOs::Pagemap::visible;
  VfioOptions o;
  o.mode = IommuMode::noiommu;
  o.warn = [](const std::string&) {};
  auto d = open_ok(std::move(o));
  ASSERT_NE(d, nullptr);
  auto a = d->dma().alloc(3000, 8);
  ASSERT_TRUE(a.ok()) << msg(a);
  auto b = d->dma().alloc(3000, 8);  // would cross a page boundary at 3000: moved to the next page
  ASSERT_TRUE(b.ok()) << msg(b);
  const auto va = reinterpret_cast<std::uint64_t>(a->va);
  const auto vb = reinterpret_cast<std::uint64_t>(b->va);
  EXPECT_EQ(vb - va, 4096u);
  EXPECT_EQ(a->iova, (os.pagemap_pfn_base + (va >> 12)) * 4096 + va % 4096);
  EXPECT_EQ(b->iova, (os.pagemap_pfn_base + (vb >> 12)) * 4096 + vb % 4096);
  EXPECT_TRUE(os.dma_maps().empty()) << "no IOMMU mappings in no-IOMMU mode";
  auto big = d->dma().alloc(5000, 8);
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.error().code(), Errc::unsupported);
}

TEST_F(VfioOpen, NoIommuDmaWithoutPagemapAccess) {
  os.noiommu_groups.insert(12);
  os.extensions.insert(VFIO_NOIOMMU_IOMMU);
  VfioOptions o;
  o.mode = IommuMode::noiommu;
  o.warn = [](const std::string&) {};
  auto d = open_ok(std::move(o));
  ASSERT_NE(d, nullptr);
  auto a = d->dma().alloc(64, 8);
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.error().code(), Errc::permission);
  EXPECT_EQ(a.error().message(),
            "0000:00:03.0: translate to physical address (no-IOMMU): page frame number hidden (needs "
            "CAP_SYS_ADMIN) or page absent");
}

TEST_F(VfioOpen, SecondOpenOfTheSameGroupIsBusy) {
  auto d = open_ok();
  ASSERT_NE(d, nullptr);
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::busy);
  EXPECT_EQ(r.error().sys_errno(), EBUSY);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: open /dev/vfio/12: the group is in use by another process");
}

// ===========================================================================
// (b) VfioDevice::open error paths: exact Errc, message naming BDF and step,
// and everything opened so far closed again (checked in TearDown).
// ===========================================================================

using VfioOpenError = VfioOpen;

TEST_F(VfioOpenError, NotBoundToVfioPci) {
  os.set_driver(kBdf, "virtio-pci");
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_EQ(r.error().message(),
            "0000:00:03.0: open VFIO device: not bound to vfio-pci (driver: virtio-pci); run 'uvirtio bind "
            "0000:00:03.0'");
  EXPECT_TRUE(os.fd_history().empty());
}

TEST_F(VfioOpenError, UnboundFunction) {
  os.set_driver(kBdf, "");
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_EQ(r.error().message(),
            "0000:00:03.0: open VFIO device: not bound to vfio-pci (driver: none); run 'uvirtio bind "
            "0000:00:03.0'");
}

TEST_F(VfioOpenError, NoSuchFunction) {
  auto r = VfioDevice::open(Bdf{0, 0, 9, 0}, {}, os);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::not_found);
  EXPECT_EQ(r.error().message(), "0000:00:09.0: open VFIO device: no such PCI function");
  EXPECT_TRUE(os.fd_history().empty());
}

TEST_F(VfioOpenError, NoIommuGroup) {
  os.remove(kDevDir + "/iommu_group");
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: open VFIO device: the function has no IOMMU group");
  EXPECT_TRUE(os.fd_history().empty());
}

TEST_F(VfioOpenError, DevVfioMissing) {
  os.vfio_present = false;
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::not_found);
  EXPECT_EQ(r.error().sys_errno(), ENOENT);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: open /dev/vfio/vfio: No such file or directory");
  EXPECT_TRUE(os.fd_history().empty());
}

TEST_F(VfioOpenError, BadApiVersion) {
  os.api_version = 1;
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: VFIO_GET_API_VERSION: kernel VFIO API 1");
  EXPECT_EQ(os.close_order(), (std::vector<std::string>{"container"}));
}

TEST_F(VfioOpenError, NoType1v2Extension) {
  os.extensions = {VFIO_TYPE1_IOMMU};
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_EQ(r.error().message(),
            "0000:00:03.0: VFIO_CHECK_EXTENSION: no Type1v2 IOMMU support (load vfio_iommu_type1)");
  EXPECT_EQ(os.close_order(), (std::vector<std::string>{"container"}));
}

TEST_F(VfioOpenError, NoIommuNotEnabled) {
  VfioOptions o;
  o.mode = IommuMode::noiommu;
  auto r = open(std::move(o));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_EQ(
      r.error().message(),
      "0000:00:03.0: VFIO_CHECK_EXTENSION: no no-IOMMU support (vfio needs enable_unsafe_noiommu_mode=1 and "
      "CONFIG_VFIO_NOIOMMU)");
}

TEST_F(VfioOpenError, NoIommuGroupOpenedWithoutNoIommuMode) {
  os.noiommu_groups.insert(12);
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_EQ(r.error().sys_errno(), ENOENT);
  EXPECT_EQ(r.error().message(),
            "0000:00:03.0: open /dev/vfio/12: the group is a no-IOMMU group (/dev/vfio/noiommu-12): pass "
            "--no-iommu");
  EXPECT_EQ(os.close_order(), (std::vector<std::string>{"container"}));
}

TEST_F(VfioOpenError, IommuGroupOpenedInNoIommuMode) {
  os.extensions.insert(VFIO_NOIOMMU_IOMMU);
  VfioOptions o;
  o.mode = IommuMode::noiommu;
  auto r = open(std::move(o));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_EQ(
      r.error().message(),
      "0000:00:03.0: open /dev/vfio/noiommu-12: the group is an IOMMU group (/dev/vfio/12): drop --no-iommu");
}

TEST_F(VfioOpenError, GroupNodeMissing) {
  os.device(kBdf).iommu_group = 13;  // sysfs still says 12; /dev/vfio/12 is not there
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::not_found);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: open /dev/vfio/12: No such file or directory");
}

TEST_F(VfioOpenError, GroupInUse) {
  os.group_open_errno[12] = EBUSY;
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::busy);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: open /dev/vfio/12: the group is in use by another process");
  EXPECT_EQ(os.close_order(), (std::vector<std::string>{"container"}));
}

TEST_F(VfioOpenError, GroupOpenPermission) {
  os.group_open_errno[12] = EACCES;
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::permission);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: open /dev/vfio/12: Permission denied");
}

TEST_F(VfioOpenError, GroupNotViable) {
  os.nonviable_groups.insert(12);
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::busy);
  EXPECT_EQ(r.error().op(), "VFIO_GROUP_GET_STATUS");
  EXPECT_EQ(r.error().message(),
            "0000:00:03.0: VFIO_GROUP_GET_STATUS: IOMMU group 12 is not viable: bind every function in it to "
            "vfio-pci");
  EXPECT_EQ(os.ioctl_names().back(), "VFIO_GROUP_GET_STATUS") << "nothing after the viability check";
  EXPECT_EQ(os.close_order(), (std::vector<std::string>{"group 12", "container"}));
}

TEST_F(VfioOpenError, SetIommuEpermHintsAtInterruptRemapping) {
  os.set_iommu_errno = EPERM;
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::permission);
  EXPECT_EQ(r.error().sys_errno(), EPERM);
  EXPECT_EQ(r.error().message(),
            "0000:00:03.0: VFIO_SET_IOMMU: interrupt remapping missing? (intremap=on, or vfio_iommu_type1 "
            "allow_unsafe_interrupts=1): Operation not permitted");
  EXPECT_EQ(os.close_order(), (std::vector<std::string>{"group 12", "container"}));
}

TEST_F(VfioOpenError, SetIommuOtherErrorHasNoHint) {
  os.set_iommu_errno = ENODEV;
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::not_found);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: VFIO_SET_IOMMU: No such device");
}

TEST_F(VfioOpenError, NotAPciDevice) {
  dev().device_flags = VFIO_DEVICE_FLAGS_PLATFORM;
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: VFIO_DEVICE_GET_INFO: not a PCI device");
  EXPECT_EQ(os.close_order(), (std::vector<std::string>{"device 0000:00:03.0", "group 12", "container"}));
}

TEST_F(VfioOpenError, NoConfigRegion) {
  dev().regions[VFIO_PCI_CONFIG_REGION_INDEX].refuse = true;
  auto r = open();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: VFIO_DEVICE_GET_REGION_INFO: no config space region");
  EXPECT_EQ(os.close_order(), (std::vector<std::string>{"device 0000:00:03.0", "group 12", "container"}));
}

// ===========================================================================
// (c) parse_iova_ranges: the VFIO_IOMMU_GET_INFO capability chain
// ===========================================================================

// A VFIO_IOMMU_GET_INFO answer assembled byte by byte.
struct InfoBuf {
  std::vector<std::uint8_t> b;

  explicit InfoBuf(std::size_t size, std::uint32_t cap_offset = sizeof(vfio_iommu_type1_info),
                   std::uint32_t flags = VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS)
      : b(size, 0) {
    vfio_iommu_type1_info h{};
    h.argsz = static_cast<std::uint32_t>(size);
    h.flags = flags;
    h.iova_pgsizes = 0x40201000;
    h.cap_offset = cap_offset;
    std::memcpy(b.data(), &h, std::min(sizeof h, size));
  }
  void put(std::size_t at, const void* p, std::size_t n) {
    ASSERT_LE(at + n, b.size());
    std::memcpy(b.data() + at, p, n);
  }
  void cap(std::size_t at, std::uint16_t id, std::uint32_t next) {
    vfio_info_cap_header h{id, 1, next};
    put(at, &h, sizeof h);
  }
  // An IOVA-range capability claiming nr ranges, with `ranges` actually written.
  void iova(std::size_t at, std::uint32_t next, std::uint32_t nr,
            const std::vector<std::pair<std::uint64_t, std::uint64_t>>& ranges) {
    cap(at, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, next);
    put(at + 8, &nr, 4);
    for (std::size_t i = 0; i < ranges.size(); ++i) {
      vfio_iova_range r{ranges[i].first, ranges[i].second};
      put(at + 16 + i * 16, &r, sizeof r);
    }
  }
  std::vector<std::pair<std::uint64_t, std::uint64_t>> parse() const {
    return pairs(parse_iova_ranges(b.data(), b.size()));
  }
};

using Ranges = std::vector<std::pair<std::uint64_t, std::uint64_t>>;
const Ranges kQemu = {{0, 0xfedfffff}, {0xfef00000, kMax}};

TEST(ParseIovaRanges, QemuCase) {
  InfoBuf info(24 + 16 + 2 * 16);
  info.iova(24, 0, 2, kQemu);
  EXPECT_EQ(info.parse(), kQemu);
}

TEST(ParseIovaRanges, IovaCapAfterOtherCaps) {
  // Linux 5.10+: migration (32 bytes), DMA avail (16), then the IOVA ranges.
  InfoBuf info(24 + 32 + 16 + 48);
  info.cap(24, VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, 56);
  info.cap(56, VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 72);
  info.iova(72, 0, 2, kQemu);
  EXPECT_EQ(info.parse(), kQemu);
}

TEST(ParseIovaRanges, UnalignedCapOffset) {
  InfoBuf info(25 + 16 + 16, 25);
  info.iova(25, 0, 1, {{0x1000, 0x1fff}});
  EXPECT_EQ(info.parse(), (Ranges{{0x1000, 0x1fff}}));
}

TEST(ParseIovaRanges, NoCapsFlagOrNoChain) {
  InfoBuf no_flag(24 + 32, 24, VFIO_IOMMU_INFO_PGSIZES);
  no_flag.iova(24, 0, 1, {{0x1000, 0x1fff}});
  EXPECT_TRUE(no_flag.parse().empty());
  InfoBuf zero_offset(24 + 32, 0);
  zero_offset.iova(24, 0, 1, {{0x1000, 0x1fff}});
  EXPECT_TRUE(zero_offset.parse().empty());
  InfoBuf only_other(24 + 16);
  only_other.cap(24, VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 0);
  EXPECT_TRUE(only_other.parse().empty());
}

TEST(ParseIovaRanges, ShortBuffers) {
  EXPECT_TRUE(parse_iova_ranges(nullptr, 0).empty());
  InfoBuf header_only(sizeof(vfio_iommu_type1_info));
  EXPECT_TRUE(header_only.parse().empty());
  InfoBuf truncated(sizeof(vfio_iommu_type1_info) - 1);
  EXPECT_TRUE(truncated.parse().empty());
}

TEST(ParseIovaRanges, CapOffsetBeyondTheBuffer) {
  for (std::uint32_t off : {200u, 56u, 52u, 0xfffffff8u, 0xffffffffu}) {
    InfoBuf info(56, off);  // 56 bytes: a cap at 52 would not fit its 8-byte header
    EXPECT_TRUE(info.parse().empty()) << off;
  }
}

TEST(ParseIovaRanges, CapOffsetInsideTheHeader) {
  for (std::uint32_t off : {1u, 8u, 16u, 23u}) {
    InfoBuf info(24 + 32, off);
    EXPECT_TRUE(info.parse().empty()) << off;
  }
}

TEST(ParseIovaRanges, ChainPointingBackwardsTerminates) {
  InfoBuf loop(24 + 16 + 32);
  loop.cap(24, 0x7777, 32);
  loop.cap(32, 0x7778, 24);  // back to the first cap
  loop.iova(40, 0, 1, {{0x1000, 0x1fff}});
  EXPECT_TRUE(loop.parse().empty());

  InfoBuf self(24 + 8);
  self.cap(24, 0x7777, 24);  // points at itself
  EXPECT_TRUE(self.parse().empty());

  InfoBuf into_header(24 + 8);
  into_header.cap(24, 0x7777, 4);
  EXPECT_TRUE(into_header.parse().empty());
}

TEST(ParseIovaRanges, BackwardPointerIsNotFollowedEvenToAnIovaCap) {
  // The first cap (at 56) points back to a well-formed IOVA cap at 24: chains
  // only move forward, so it is not used.
  InfoBuf info(24 + 32 + 8, 56);
  info.iova(24, 0, 1, {{0x1000, 0x1fff}});
  info.cap(56, 0x7777, 24);
  EXPECT_TRUE(info.parse().empty());
  // The same layout with a forward chain is accepted.
  InfoBuf fwd(24 + 8 + 32);
  fwd.cap(24, 0x7777, 32);
  fwd.iova(32, 0, 1, {{0x1000, 0x1fff}});
  EXPECT_EQ(fwd.parse(), (Ranges{{0x1000, 0x1fff}}));
}

TEST(ParseIovaRanges, HeaderBytesAreNeverReadAsACap) {
  // cap_offset 8 points at iova_pgsizes, whose bytes are made to look like an
  // IOVA-range cap header (id 1, version 1, next 0) followed by cap_offset
  // (= nr_iovas 8) and a real range right after the header.
  InfoBuf info(24 + 16, 8);
  const std::uint64_t fake_cap = 0x0000000000010001ull;
  info.put(8, &fake_cap, 8);
  const std::pair<std::uint64_t, std::uint64_t> r{0x1000, 0x1fff};
  info.put(24, &r.first, 8);
  info.put(32, &r.second, 8);
  EXPECT_TRUE(info.parse().empty());
}

TEST(ParseIovaRanges, NextBeyondTheBuffer) {
  InfoBuf info(24 + 8);
  info.cap(24, 0x7777, 0x10000);
  EXPECT_TRUE(info.parse().empty());
}

TEST(ParseIovaRanges, NrIovasLargerThanTheBufferHolds) {
  for (std::uint32_t nr : {3u, 1000u, 0xffffffffu}) {
    InfoBuf info(24 + 16 + 2 * 16 + 8);  // room for two and a half entries
    info.iova(24, 0, nr, kQemu);
    EXPECT_EQ(info.parse(), kQemu) << nr;
  }
}

TEST(ParseIovaRanges, TruncatedIovaCap) {
  InfoBuf info(24 + 12);  // header fits, nr_iovas/reserved do not
  info.cap(24, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 0);
  EXPECT_TRUE(info.parse().empty());
  InfoBuf zero(24 + 16);
  zero.iova(24, 0, 0, {});
  EXPECT_TRUE(zero.parse().empty());
}

TEST(ParseIovaRanges, InvertedRangesDropped) {
  InfoBuf info(24 + 16 + 4 * 16);
  info.iova(24, 0, 4, {{0x2000, 0x1fff}, {0x10000, 0x1ffff}, {5, 5}, {kMax, 0}});
  EXPECT_EQ(info.parse(), (Ranges{{0x10000, 0x1ffff}, {5, 5}}));
}

// ===========================================================================
// (d) IovaAllocator
// ===========================================================================

std::vector<IovaRange> qemu_ranges() { return {{0, 0xfedfffff}, {0xfef00000, kMax}}; }
constexpr std::uint64_t kMsiStart = 0xfee00000, kMsiEnd = 0xfeefffff;

TEST(IovaAllocator, NeverReturnsZero) {
  IovaAllocator a({{0, 0xffff}});
  EXPECT_EQ(a.allocate(0x1000, 0x1000), 0x1000u);
  IovaAllocator b({{0, 0xffff}});
  EXPECT_EQ(b.allocate(1, 1), 0x1000u);
  IovaAllocator c({{0, 0xfff}});  // nothing above page 0
  EXPECT_EQ(c.allocate(1, 1), std::nullopt);
}

TEST(IovaAllocator, AlignmentHonoured) {
  IovaAllocator a(qemu_ranges());
  EXPECT_EQ(a.allocate(0x10, 0x1000), 0x1000u);
  EXPECT_EQ(a.allocate(0x10, 0x200000), 0x200000u);
  EXPECT_EQ(a.allocate(1, 1), 0x200010u);
  EXPECT_EQ(a.allocate(0x100, 0x100), 0x200100u);
  EXPECT_EQ(a.allocate(0x1000, 0x40000000), 0x40000000u);
}

TEST(IovaAllocator, SkipsTheMsiWindow) {
  IovaAllocator a(qemu_ranges());
  EXPECT_EQ(a.allocate(0xfed00000, 0x1000), 0x1000u);  // up to 0xfed01000
  // 1 MiB does not fit below 0xfedfffff any more: the next range starts after the window.
  EXPECT_EQ(a.allocate(0x100000, 0x1000), 0xfef00000u);
  EXPECT_EQ(a.allocate(0x1000, 0x1000), 0xff000000u);
}

TEST(IovaAllocator, HugeChunksNeverTouchTheMsiWindow) {
  IovaAllocator a(qemu_ranges());
  std::vector<std::uint64_t> got;
  for (int i = 0; i < 2100; ++i) {  // just over 4 GiB of 2 MiB chunks
    auto v = a.allocate(kHugePage, kHugePage);
    ASSERT_TRUE(v.has_value());
    got.push_back(*v);
  }
  for (std::size_t i = 0; i < got.size(); ++i) {
    const std::uint64_t s = got[i], e = got[i] + kHugePage - 1;
    EXPECT_EQ(s % kHugePage, 0u);
    EXPECT_NE(s, 0u);
    EXPECT_TRUE(e < kMsiStart || s > kMsiEnd) << std::hex << s;
    EXPECT_TRUE(e <= 0xfedfffff || s >= 0xfef00000) << std::hex << s;
    if (i > 0) {
      EXPECT_GE(s, got[i - 1] + kHugePage) << "overlap at " << i;
    }
  }
  // The 2 MiB slot holding the window is skipped: 0xfec00000 is the last below, 0xff000000 the first above.
  EXPECT_NE(std::find(got.begin(), got.end(), 0xfec00000u), got.end());
  EXPECT_NE(std::find(got.begin(), got.end(), 0xff000000u), got.end());
  EXPECT_EQ(std::find(got.begin(), got.end(), 0xfee00000u), got.end());
}

TEST(IovaAllocator, Exhaustion) {
  IovaAllocator a({{0x10000, 0x1ffff}});
  EXPECT_EQ(a.allocate(0x8000, 0x1000), 0x10000u);
  EXPECT_EQ(a.allocate(0x8000, 0x1000), 0x18000u);  // exactly to the end
  EXPECT_EQ(a.allocate(1, 1), std::nullopt);
  EXPECT_EQ(a.allocate(1, 1), std::nullopt);

  IovaAllocator b({{0x10000, 0x1ffff}});
  EXPECT_EQ(b.allocate(0x10001, 1), std::nullopt);  // one byte too big
  IovaAllocator c({{0xfef00000, kMax}});
  EXPECT_EQ(c.allocate(kMax, 0x1000), std::nullopt);
  IovaAllocator e({{0xfef00000, kMax}});
  EXPECT_EQ(e.allocate(0x1000, std::uint64_t{1} << 63), std::uint64_t{1} << 63);
  EXPECT_EQ(e.allocate(0x1000, std::uint64_t{1} << 63), std::nullopt) << "align_up wrapping past 2^64";
}

// BUG (pci/src/dma.cpp:33-42, IovaAllocator::allocate): a request that fits
// in no remaining range advances cur_ past every range, so one oversized
// request leaves the allocator permanently empty although the space is still
// free (a DmaPool would then fail every later chunk with "IOVA space
// exhausted"). Fix: search from cur_ with local copies of cur_/next_ and
// commit them only when an allocation succeeds. Enable when fixed.
TEST(IovaAllocator, FailedOversizeRequestConsumesNothing) {
  IovaAllocator a(qemu_ranges());
  EXPECT_EQ(a.allocate(kMax, 0x1000), std::nullopt);
  EXPECT_EQ(a.allocate(0x1000, 0x1000), 0x1000u);
}

TEST(IovaAllocator, RejectsZeroSizeAndBadAlignment) {
  IovaAllocator a(qemu_ranges());
  EXPECT_EQ(a.allocate(0, 0x1000), std::nullopt);
  EXPECT_EQ(a.allocate(0x1000, 0), std::nullopt);
  EXPECT_EQ(a.allocate(0x1000, 3), std::nullopt);
  EXPECT_EQ(a.allocate(0x1000, 0x1800), std::nullopt);
  EXPECT_EQ(a.allocate(0x1000, 0x1000), 0x1000u) << "failed calls consume nothing";
}

TEST(IovaAllocator, NoReportedRangesUsesTheDefaultWindow) {
  IovaAllocator a({});
  EXPECT_EQ(a.allocate(0x1000, 0x1000), 0x100000u);
  // The default window leaves out the x86 MSI range 0xfee00000-0xfeefffff.
  IovaAllocator b({});
  EXPECT_EQ(b.allocate(0xfee00000 - 0x100000, 0x1000), 0x100000u);
  EXPECT_EQ(b.allocate(0x1000, 0x1000), 0xfef00000u);
  EXPECT_EQ(b.allocate((std::uint64_t{1} << 39) - 0xfef01000, 0x1000), 0xfef01000u);
  EXPECT_EQ(b.allocate(1, 1), std::nullopt);
}

// BUG (pci/src/dma.cpp:37, IovaAllocator::allocate): `next_ = base + size`
// wraps to 0 when an allocation ends exactly at 2^64 (a range ending at
// UINT64_MAX, as virtio-iommu and AMD report). The next call then computes
// max(next_, r.start) == r.start and hands out the same IOVA a second time.
// Fix: when base + size wraps (or == 0), mark the range used up (++cur_), e.g.
//   if (size - 1 == r.end - base) { ++cur_; next_ = cur_ < ranges_.size() ? ranges_[cur_].start : 0; }
//   else next_ = base + size;
// Enable when fixed.
TEST(IovaAllocator, AllocationEndingAtTopOfAddressSpaceIsNotHandedOutTwice) {
  IovaAllocator a({{0xfef00000, kMax}});
  const std::uint64_t rest = 0 - std::uint64_t{0xfef00000};  // exactly up to 2^64
  EXPECT_EQ(a.allocate(rest, 0x1000), 0xfef00000u);
  EXPECT_EQ(a.allocate(0x1000, 0x1000), std::nullopt);
}

// ===========================================================================
// (e) DmaPool in IOMMU mode
// ===========================================================================

class DmaPoolTest : public ::testing::Test {
 protected:
  void TearDown() override { expect_clean(os); }

  std::unique_ptr<DmaPool> pool(std::vector<IovaRange> ranges = qemu_ranges()) {
    DmaPool::Mapper m;
    m.map = [this](void* va, std::uint64_t iova, std::uint64_t size) -> Result<void> {
      maps.push_back({reinterpret_cast<std::uint64_t>(va), iova, size, 0});
      if (map_errno != 0) return Error::from_errno(map_errno, "dev", "VFIO_IOMMU_MAP_DMA");
      return ok();
    };
    m.unmap = [this](std::uint64_t iova, std::uint64_t size) { unmaps.push_back({iova, size}); };
    return std::make_unique<DmaPool>(os, "dev", DmaPool::Mode::iommu, IovaAllocator(std::move(ranges)),
                                     std::move(m));
  }

  FakeOs os;
  std::vector<FakeOs::DmaMap> maps;
  std::vector<FakeOs::DmaUnmap> unmaps;
  int map_errno = 0;
};

bool all_bytes(const void* p, std::size_t n, std::uint8_t v) {
  const auto* b = static_cast<const std::uint8_t*>(p);
  return std::all_of(b, b + n, [v](std::uint8_t x) { return x == v; });
}

TEST_F(DmaPoolTest, AllocationsZeroedAlignedAndInsideTheMappedChunk) {
  os.poison_dma = true;  // fresh memory full of 0xa5: zeroing must be the pool's doing
  auto p = pool();
  auto a = p->alloc(24, 8);
  auto b = p->alloc(100, 64);
  auto c = p->alloc(4096, 4096);
  auto d = p->alloc(1, 1);
  for (auto* r : {&a, &b, &c, &d}) ASSERT_TRUE(r->ok()) << msg(*r);
  ASSERT_EQ(maps.size(), 1u);
  auto* base = reinterpret_cast<std::uint8_t*>(maps[0].vaddr);
  EXPECT_EQ(maps[0].iova, 0x1000u);
  EXPECT_EQ(maps[0].size, kSmallChunk);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(base) % 4096, 0u);

  EXPECT_EQ(addr(a->va), addr(base));
  EXPECT_EQ(addr(b->va), addr(base + 64));
  EXPECT_EQ(addr(c->va), addr(base + 4096));
  EXPECT_EQ(addr(d->va), addr(base + 8192));
  for (auto* r : {&a, &b, &c, &d}) {
    const auto off = static_cast<std::uint64_t>(static_cast<std::uint8_t*>((*r)->va) - base);
    EXPECT_EQ((*r)->iova, maps[0].iova + off);
    EXPECT_TRUE(all_bytes((*r)->va, (*r)->size, 0)) << "allocation at offset " << off << " not zeroed";
  }
  EXPECT_EQ(a->size, 24u);
  EXPECT_EQ(b->size, 100u);
  // Exactly the allocation is zeroed: the alignment gaps keep the poison.
  EXPECT_TRUE(all_bytes(base + 24, 64 - 24, 0xa5));
  EXPECT_TRUE(all_bytes(base + 164, 4096 - 164, 0xa5));
  EXPECT_TRUE(all_bytes(base + 8193, 100, 0xa5));
  EXPECT_EQ(c->iova % 4096, 0u);

  EXPECT_EQ(os.memfd_flags(), (std::vector<unsigned>{MFD_HUGETLB | MFD_HUGE_2MB, 0}));
  EXPECT_FALSE(p->hugepages());
  ASSERT_EQ(os.mlocks().size(), 1u);
  EXPECT_EQ(addr(os.mlocks()[0].first), addr(base));
  EXPECT_EQ(os.mlocks()[0].second, kSmallChunk);
  ASSERT_EQ(os.mmaps().size(), 1u);
  EXPECT_EQ(os.mmaps()[0].flags, MAP_SHARED | MAP_POPULATE);
}

TEST_F(DmaPoolTest, NewChunkWhenFullAndDestructionUnmapsEveryChunk) {
  auto p = pool();
  auto a = p->alloc(200 * 1024, 4096);
  auto b = p->alloc(100 * 1024, 4096);  // does not fit behind a: second chunk
  auto big = p->alloc(300 * 1024, 8);   // bigger than the default chunk: its own chunk
  for (auto* r : {&a, &b, &big}) ASSERT_TRUE(r->ok()) << msg(*r);
  ASSERT_EQ(maps.size(), 3u);
  EXPECT_EQ(maps[0].iova, 0x1000u);
  EXPECT_EQ(maps[1].iova, 0x1000u + kSmallChunk);
  EXPECT_EQ(maps[1].size, kSmallChunk);
  EXPECT_EQ(maps[2].iova, 0x1000u + 2 * kSmallChunk);
  EXPECT_EQ(maps[2].size, 300u * 1024);
  EXPECT_EQ(addr(b->va), maps[1].vaddr);
  EXPECT_EQ(b->iova, maps[1].iova);
  EXPECT_EQ(big->iova, maps[2].iova);
  // Only the first chunk tried hugepages.
  EXPECT_EQ(os.memfd_flags(), (std::vector<unsigned>{MFD_HUGETLB | MFD_HUGE_2MB, 0, 0, 0}));
  EXPECT_EQ(os.live_real_mappings(), 3u);
  EXPECT_TRUE(unmaps.empty());

  p.reset();
  ASSERT_EQ(unmaps.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(unmaps[i].iova, maps[i].iova);
    EXPECT_EQ(unmaps[i].size, maps[i].size);
  }
  EXPECT_EQ(count_of(os.munmaps(), "memfd"), 3u);
}

TEST_F(DmaPoolTest, RejectsZeroSizeAndBadAlignment) {
  auto p = pool();
  for (auto [size, align] :
       std::vector<std::pair<std::size_t, std::size_t>>{{0, 8}, {8, 0}, {8, 3}, {8, 8192}, {8, 24}}) {
    auto r = p->alloc(size, align);
    ASSERT_FALSE(r.ok()) << size << "/" << align;
    EXPECT_EQ(r.error().code(), Errc::invalid_argument);
    const std::string want = size == 0 ? "dev: allocate DMA memory: size 0 is not in 1..1 GiB"
                                       : "dev: allocate DMA memory: alignment " + std::to_string(align) +
                                             " is not a power of two <= 4096";
    EXPECT_EQ(r.error().message(), want);
  }
  EXPECT_TRUE(os.memfd_flags().empty()) << "no memory is touched for a bad request";
  EXPECT_TRUE(maps.empty());
}

TEST_F(DmaPoolTest, Hugepages) {
  os.huge = FakeOs::Huge::works;
  auto p = pool();
  auto a = p->alloc(64, 64);
  ASSERT_TRUE(a.ok()) << msg(a);
  EXPECT_TRUE(p->hugepages());
  ASSERT_EQ(maps.size(), 1u);
  EXPECT_EQ(maps[0].size, kHugePage);
  EXPECT_EQ(maps[0].iova, kHugePage) << "first 2 MiB-aligned IOVA above page 0";
  EXPECT_EQ(os.memfd_flags(), (std::vector<unsigned>{MFD_HUGETLB | MFD_HUGE_2MB}));
  auto b = p->alloc(kHugePage, 8);  // does not fit: a second hugepage chunk
  ASSERT_TRUE(b.ok()) << msg(b);
  ASSERT_EQ(maps.size(), 2u);
  EXPECT_EQ(maps[1].iova, 2 * kHugePage);
  EXPECT_EQ(os.memfd_flags(),
            (std::vector<unsigned>{MFD_HUGETLB | MFD_HUGE_2MB, MFD_HUGETLB | MFD_HUGE_2MB}));
}

TEST_F(DmaPoolTest, HugepageMmapFailureFallsBackToSmallPages) {
  os.huge = FakeOs::Huge::mmap_fails;
  auto p = pool();
  auto a = p->alloc(64, 64);
  ASSERT_TRUE(a.ok()) << msg(a);
  EXPECT_FALSE(p->hugepages());
  EXPECT_EQ(os.memfd_flags(), (std::vector<unsigned>{MFD_HUGETLB | MFD_HUGE_2MB, 0}));
  ASSERT_EQ(maps.size(), 1u);
  EXPECT_EQ(maps[0].size, kSmallChunk);
  EXPECT_EQ(count_of(os.close_order(), "memfd hugetlb"), 1u);
  auto b = p->alloc(kSmallChunk, 8);
  ASSERT_TRUE(b.ok()) << msg(b);
  EXPECT_EQ(os.memfd_flags().size(), 3u);
  EXPECT_EQ(os.memfd_flags()[2], 0u) << "hugepages are not retried after a failure";
}

TEST_F(DmaPoolTest, MlockFailure) {
  os.mlock_errno = ENOMEM;
  auto p = pool();
  auto r = p->alloc(64, 64);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::io);
  EXPECT_EQ(r.error().message(),
            "dev: allocate DMA memory: mlock (raise RLIMIT_MEMLOCK): Cannot allocate memory");
  EXPECT_TRUE(maps.empty());
  EXPECT_EQ(os.live_real_mappings(), 0u) << "the chunk is unmapped again";
  os.mlock_errno = EPERM;
  auto e = p->alloc(64, 64);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.error().code(), Errc::permission);
}

TEST_F(DmaPoolTest, MapDmaFailure) {
  map_errno = EFAULT;
  auto p = pool();
  auto r = p->alloc(64, 64);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::io);
  EXPECT_EQ(r.error().op(), "allocate DMA memory: VFIO_IOMMU_MAP_DMA");
  EXPECT_EQ(r.error().message(), "dev: allocate DMA memory: VFIO_IOMMU_MAP_DMA: Bad address");
  EXPECT_EQ(os.live_real_mappings(), 0u);
  p.reset();
  EXPECT_TRUE(unmaps.empty()) << "a chunk that was never mapped is not unmapped";
}

// SoftDma (the identity-mapped allocator of SoftFunction) must refuse a size
// that rounding up to the alignment would wrap, not hand out a region
// claiming SIZE_MAX bytes over a tiny allocation.
TEST(SoftDmaTest, HugeSizeIsRefusedNotWrapped) {
  SoftDma d;
  auto r = d.alloc(std::numeric_limits<std::size_t>::max() - 2, 64);
  ASSERT_FALSE(r.ok()) << "a region of " << r->size << " bytes";
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_EQ(d.allocations(), 0u);
}

// A chunk whose VFIO_IOMMU_MAP_DMA failed gives its IOVA range back: a
// transient failure must not use up the IOVA space for good.
TEST_F(DmaPoolTest, FailedMapDmaGivesTheIovaRangeBack) {
  auto p = pool({{0x1000, 0x1000 + kSmallChunk - 1}});  // room for exactly one chunk
  map_errno = ENOMEM;
  ASSERT_FALSE(p->alloc(64, 64).ok());
  map_errno = 0;
  auto r = p->alloc(64, 64);
  ASSERT_TRUE(r.ok()) << msg(r);
  EXPECT_EQ(r->iova, 0x1000u);
}

TEST_F(DmaPoolTest, IovaSpaceExhausted) {
  auto p = pool({{0x1000, 0x1fff}});
  auto r = p->alloc(64, 64);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_EQ(r.error().message(), "dev: allocate DMA memory: IOVA space exhausted");
  EXPECT_TRUE(maps.empty());
  EXPECT_EQ(os.live_real_mappings(), 0u);
}

TEST_F(DmaPoolTest, MemfdFailure) {
  os.memfd_errno = EMFILE;
  auto p = pool();
  auto r = p->alloc(64, 64);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::io);
  EXPECT_EQ(r.error().message(), "dev: allocate DMA memory: memfd_create: Too many open files");
}

// BUG (pci/src/dma.cpp:137, DmaPool::alloc, the `fits` lambda): `off + size
// > c.size` wraps for a size near SIZE_MAX once a chunk exists, so the
// request "fits", chunk->used wraps and memset(r.va, 0, size) runs off the
// mapping (SIGSEGV). Fix: test `size > c.size || off > c.size - size`, and
// reject sizes above some sane bound (e.g. 1 GiB) at the top of alloc. The
// allocation runs in a child process so the crash fails only this test.
// Enable when fixed.
TEST(DmaPoolDeathTest, HugeSizeIsRejectedNotWrapped) {
  EXPECT_EXIT(
      {
        FakeOs os;
        DmaPool::Mapper m;
        m.map = [](void*, std::uint64_t, std::uint64_t) -> Result<void> { return ok(); };
        m.unmap = [](std::uint64_t, std::uint64_t) {};
        DmaPool p(os, "dev", DmaPool::Mode::iommu, IovaAllocator(qemu_ranges()), std::move(m));
        if (!p.alloc(64, 8).ok()) std::_Exit(2);
        auto r = p.alloc(std::numeric_limits<std::size_t>::max() - 10, 8);
        std::_Exit(r.ok() ? 1 : 0);
      },
      ::testing::ExitedWithCode(0), "");
}

// In no-IOMMU mode the device gets the physical address of an allocation's
// first byte, so an allocation must be physically contiguous. Hugepages are
// contiguous only within one 2 MiB page: a bigger request (whose chunk is
// two or more hugepages the kernel placed anywhere) is refused rather than
// handed out with an address that is wrong after its first 2 MiB.
TEST(DmaPoolNoIommu, HugepageAllocationNeverSpansTwoHugepages) {
  FakeOs os;
  os.huge = FakeOs::Huge::works;
  os.pagemap = FakeOs::Pagemap::visible;
  DmaPool p(os, "dev", DmaPool::Mode::noiommu, IovaAllocator({}), DmaPool::Mapper{});
  auto big = p.alloc(kHugePage + 4096, 4096);
  ASSERT_FALSE(big.ok()) << "a 2 MiB + 4 KiB allocation got one physical address";
  EXPECT_EQ(big.error().code(), Errc::unsupported);
  EXPECT_EQ(big.error().device(), "dev");
  // Up to one hugepage is fine, and the refused request consumed nothing.
  auto a = p.alloc(kHugePage, 4096);
  ASSERT_TRUE(a.ok()) << msg(a);
  EXPECT_TRUE(p.hugepages());
}

// ===========================================================================
// (f) bind_vfio / unbind_vfio through sysfs
// ===========================================================================

class Binding : public ::testing::Test {
 protected:
  Binding() {
    os.add_driver("vfio-pci");
    os.add_driver("virtio-pci");
    auto d = FakePciDevice::virtio(kBdf, "virtio-pci");
    d.probe_driver = "virtio-pci";
    os.add_device(std::move(d));
  }
  void TearDown() override { expect_clean(os); }
  using Writes = std::vector<std::pair<std::string, std::string>>;
  const std::string state = "/run/uvirtio/0000:00:03.0.driver";
  FakeOs os;
};

TEST_F(Binding, BindRecordsTheDriverThenOverridesUnbindsAndProbes) {
  auto r = bind_vfio(kAddr, os);
  ASSERT_TRUE(r.ok()) << msg(r);
  EXPECT_EQ(r->previous_driver, "virtio-pci");
  EXPECT_TRUE(r->changed);
  EXPECT_EQ(os.mkdirs(), (std::vector<std::string>{"/run/uvirtio"}));
  EXPECT_EQ(os.writes(), (Writes{{state, "virtio-pci\n"},
                                 {kDevDir + "/driver_override", "vfio-pci"},
                                 {kDevDir + "/driver/unbind", kBdf},
                                 {"/sys/bus/pci/drivers_probe", kBdf}}));
  EXPECT_EQ(os.driver_of(kBdf), "vfio-pci");
  EXPECT_EQ(os.file(state), std::optional<std::string>("virtio-pci\n"));
  EXPECT_EQ(os.file(kDevDir + "/driver_override"), std::optional<std::string>("vfio-pci\n"));
}

TEST_F(Binding, BindUnboundFunctionSkipsUnbind) {
  os.set_driver(kBdf, "");
  auto r = bind_vfio(kAddr, os);
  ASSERT_TRUE(r.ok()) << msg(r);
  EXPECT_EQ(r->previous_driver, "");
  EXPECT_TRUE(r->changed);
  EXPECT_EQ(os.writes(), (Writes{{state, "\n"},
                                 {kDevDir + "/driver_override", "vfio-pci"},
                                 {"/sys/bus/pci/drivers_probe", kBdf}}));
  EXPECT_EQ(os.driver_of(kBdf), "vfio-pci");
}

TEST_F(Binding, AlreadyBoundIsANoOp) {
  os.set_driver(kBdf, "vfio-pci");
  auto r = bind_vfio(kAddr, os);
  ASSERT_TRUE(r.ok()) << msg(r);
  EXPECT_EQ(r->previous_driver, "vfio-pci");
  EXPECT_FALSE(r->changed);
  EXPECT_TRUE(os.writes().empty());
  EXPECT_TRUE(os.mkdirs().empty());
}

TEST_F(Binding, VfioPciNotLoaded) {
  os.remove_driver("vfio-pci");
  auto r = bind_vfio(kAddr, os);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_EQ(r.error().message(),
            "0000:00:03.0: bind to vfio-pci: the vfio-pci driver is not loaded (modprobe vfio-pci)");
  EXPECT_TRUE(os.writes().empty());
  EXPECT_EQ(os.driver_of(kBdf), "virtio-pci");
}

TEST_F(Binding, MissingFunction) {
  auto r = bind_vfio(Bdf{0, 0, 9, 0}, os);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::not_found);
  EXPECT_EQ(r.error().message(), "0000:00:09.0: bind to vfio-pci: no such PCI function");
  auto u = unbind_vfio(Bdf{0, 0, 9, 0}, os);
  ASSERT_FALSE(u.ok());
  EXPECT_EQ(u.error().code(), Errc::not_found);
  EXPECT_EQ(u.error().message(), "0000:00:09.0: unbind from vfio-pci: no such PCI function");
  EXPECT_TRUE(os.writes().empty());
}

TEST_F(Binding, NoIommuGroup) {
  os.remove(kDevDir + "/iommu_group");
  auto r = bind_vfio(kAddr, os);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_EQ(r.error().message(),
            "0000:00:03.0: bind to vfio-pci: the function has no IOMMU group (enable the IOMMU, e.g. "
            "intel_iommu=on, or load vfio with enable_unsafe_noiommu_mode=1)");
  EXPECT_TRUE(os.writes().empty());
}

TEST_F(Binding, NoIommuModeBindCreatesAGroup) {
  os.remove(kDevDir + "/iommu_group");
  os.device(kBdf).iommu_group.reset();
  os.set_noiommu_param(true);
  auto r = bind_vfio(kAddr, os);
  ASSERT_TRUE(r.ok()) << msg(r);
  EXPECT_TRUE(r->changed);
  EXPECT_EQ(os.writes(), (Writes{{state, "virtio-pci\n"},
                                 {kDevDir + "/driver_override", "vfio-pci"},
                                 {kDevDir + "/driver/unbind", kBdf},
                                 {"/sys/bus/pci/drivers_probe", kBdf}}));
  EXPECT_EQ(sysfs_iommu_group(kAddr, os), std::optional<unsigned>(42));

  os.extensions.insert(VFIO_NOIOMMU_IOMMU);
  VfioOptions o;
  o.mode = IommuMode::noiommu;
  o.warn = [](const std::string&) {};
  {
    auto d = VfioDevice::open(kAddr, std::move(o), os);
    ASSERT_TRUE(d.ok()) << msg(d);
    EXPECT_EQ(os.fd_history()[1].name, "group noiommu-42");
  }
  auto u = unbind_vfio(kAddr, os);
  ASSERT_TRUE(u.ok()) << msg(u);
  EXPECT_EQ(*u, "virtio-pci");
  EXPECT_EQ(sysfs_iommu_group(kAddr, os), std::nullopt) << "the no-IOMMU group goes away with vfio-pci";
}

TEST_F(Binding, NoIommuModeParameterOff) {
  os.remove(kDevDir + "/iommu_group");
  os.device(kBdf).iommu_group.reset();
  os.set_noiommu_param(false);
  auto r = bind_vfio(kAddr, os);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_TRUE(os.writes().empty());
}

// A function vfio-pci took but that has no IOMMU group is unusable: the
// rollback must take it off vfio-pci again and give it back to its previous
// driver, not leave it on vfio-pci with the override cleared.
TEST_F(Binding, NoIommuModeButNoGroupAppearsRestoresThePreviousDriver) {
  os.remove(kDevDir + "/iommu_group");
  os.device(kBdf).iommu_group.reset();
  os.set_noiommu_param(true);
  os.noiommu_probe_creates_group = false;
  auto r = bind_vfio(kAddr, os);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_EQ(r.error().message(),
            "0000:00:03.0: bind to vfio-pci: bound to vfio-pci but the function still has no IOMMU group");
  EXPECT_EQ(os.driver_of(kBdf), "virtio-pci");
  EXPECT_EQ(os.file(kDevDir + "/driver_override"), std::optional<std::string>("(null)\n"));
}

TEST_F(Binding, PermissionDeniedSaysRunAsRoot) {
  os.fail_writes("/sys/", EACCES);
  auto r = bind_vfio(kAddr, os);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::permission);
  EXPECT_EQ(r.error().sys_errno(), EACCES);
  EXPECT_EQ(
      r.error().message(),
      "0000:00:03.0: bind to vfio-pci: cannot write /sys/bus/pci/devices/0000:00:03.0/driver_override (run "
      "as root)");
  EXPECT_EQ(os.driver_of(kBdf), "virtio-pci") << "nothing changed";
}

TEST_F(Binding, StateDirectoryNotWritable) {
  // What a non-root user hits first: it says how to fix it.
  os.fail_mkdir("/run/uvirtio", EACCES);
  auto r = bind_vfio(kAddr, os);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::permission);
  EXPECT_EQ(r.error().message(), "0000:00:03.0: bind to vfio-pci: cannot create /run/uvirtio (run as root)");
  EXPECT_TRUE(os.writes().empty());
}

TEST_F(Binding, OtherWriteErrors) {
  os.fail_writes("/sys/bus/pci/drivers_probe", ENOMEM);
  auto r = bind_vfio(kAddr, os);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::io);
  EXPECT_EQ(
      r.error().message(),
      "0000:00:03.0: bind to vfio-pci: write '0000:00:03.0' to /sys/bus/pci/drivers_probe: Cannot allocate "
      "memory");
}

TEST_F(Binding, VfioPciRefusesTheFunction) {
  os.device(kBdf).vfio_refuses = true;
  auto r = bind_vfio(kAddr, os);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::io);
  EXPECT_EQ(r.error().message(),
            "0000:00:03.0: bind to vfio-pci: vfio-pci did not take the function (driver is now 'none')");
}

// BUG (pci/src/binding.cpp:52-61, bind_vfio): a failure after
// driver_override was written (the unbind or probe write fails, or vfio-pci
// does not take the function) leaves the function with no driver and
// driver_override=vfio-pci, and unbind_vfio then refuses to help ("not bound
// to vfio-pci (driver is 'none')"), so the previous driver cannot be restored
// with the tool. Fix: on any failure after the driver_override write, roll
// back: write "\n" to driver_override and, if there was a previous driver,
// write the BDF to /sys/bus/pci/drivers/<prev>/bind (or drivers_probe).
// Enable when fixed.
TEST_F(Binding, FailedBindRestoresThePreviousDriver) {
  os.device(kBdf).vfio_refuses = true;
  auto r = bind_vfio(kAddr, os);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(os.driver_of(kBdf), "virtio-pci");
  EXPECT_EQ(os.file(kDevDir + "/driver_override"), std::optional<std::string>("(null)\n"));
}

TEST_F(Binding, UnbindRestoresThePreviousDriver) {
  ASSERT_TRUE(bind_vfio(kAddr, os).ok());
  const std::size_t before = os.writes().size();
  auto r = unbind_vfio(kAddr, os);
  ASSERT_TRUE(r.ok()) << msg(r);
  EXPECT_EQ(*r, "virtio-pci");
  const Writes all = os.writes();
  EXPECT_EQ(Writes(all.begin() + static_cast<std::ptrdiff_t>(before), all.end()),
            (Writes{{kDevDir + "/driver/unbind", kBdf},
                    {kDevDir + "/driver_override", "\n"},
                    {"/sys/bus/pci/drivers/virtio-pci/bind", kBdf},
                    {state, ""}}));
  EXPECT_EQ(os.driver_of(kBdf), "virtio-pci");
  EXPECT_EQ(os.file(kDevDir + "/driver_override"), std::optional<std::string>("(null)\n"));
  EXPECT_EQ(os.file(state), std::optional<std::string>(""));
}

TEST_F(Binding, UnbindWithoutRecordedDriverProbes) {
  os.set_driver(kBdf, "vfio-pci");
  os.set_file(kDevDir + "/driver_override", "vfio-pci\n");
  // No state file at all: the kernel picks a driver (probe_driver: virtio-pci).
  auto r = unbind_vfio(kAddr, os);
  ASSERT_TRUE(r.ok()) << msg(r);
  EXPECT_EQ(*r, "virtio-pci");
  EXPECT_EQ(os.writes(), (Writes{{kDevDir + "/driver/unbind", kBdf},
                                 {kDevDir + "/driver_override", "\n"},
                                 {"/sys/bus/pci/drivers_probe", kBdf},
                                 {state, ""}}));
}

TEST_F(Binding, UnbindWithEmptyRecordAndNoDriverLeavesItUnbound) {
  os.device(kBdf).probe_driver = "";
  os.set_driver(kBdf, "vfio-pci");
  ASSERT_EQ(os.mkdir("/run/uvirtio"), 0);
  os.set_file(state, "\n");
  auto r = unbind_vfio(kAddr, os);
  ASSERT_TRUE(r.ok()) << msg(r);
  EXPECT_EQ(*r, "");
  EXPECT_EQ(os.writes()[2], (std::pair<std::string, std::string>{"/sys/bus/pci/drivers_probe", kBdf}));
  EXPECT_EQ(os.driver_of(kBdf), "");
}

TEST_F(Binding, UnbindWhenThePreviousDriverIsGone) {
  os.set_driver(kBdf, "vfio-pci");
  ASSERT_EQ(os.mkdir("/run/uvirtio"), 0);
  os.set_file(state, "nvme\n");  // no /sys/bus/pci/drivers/nvme
  auto r = unbind_vfio(kAddr, os);
  ASSERT_TRUE(r.ok()) << msg(r);
  EXPECT_EQ(*r, "virtio-pci");
  EXPECT_EQ(os.writes()[2], (std::pair<std::string, std::string>{"/sys/bus/pci/drivers_probe", kBdf}));
}

TEST_F(Binding, UnbindWhenNotBoundToVfio) {
  auto r = unbind_vfio(kAddr, os);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_EQ(r.error().message(),
            "0000:00:03.0: unbind from vfio-pci: not bound to vfio-pci (driver is 'virtio-pci')");
  EXPECT_TRUE(os.writes().empty());
}

TEST_F(Binding, UnbindPermissionDenied) {
  os.set_driver(kBdf, "vfio-pci");
  os.fail_writes("/sys/", EPERM);
  auto r = unbind_vfio(kAddr, os);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::permission);
  EXPECT_EQ(
      r.error().message(),
      "0000:00:03.0: unbind from vfio-pci: cannot write /sys/bus/pci/devices/0000:00:03.0/driver/unbind (run "
      "as root)");
  EXPECT_EQ(os.driver_of(kBdf), "vfio-pci");
}

TEST_F(Binding, RoundTripThenOpen) {
  ASSERT_TRUE(bind_vfio(kAddr, os).ok());
  {
    auto d = VfioDevice::open(kAddr, {}, os);
    ASSERT_TRUE(d.ok()) << msg(d);
  }
  auto r = unbind_vfio(kAddr, os);
  ASSERT_TRUE(r.ok()) << msg(r);
  EXPECT_EQ(*r, "virtio-pci");
  auto d = VfioDevice::open(kAddr, {}, os);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.error().code(), Errc::invalid_argument);
}

// ===========================================================================
// (g) describe_function and virtio ids
// ===========================================================================

class Discovery : public ::testing::Test {
 protected:
  FakeOs os;
};

TEST_F(Discovery, DescribeFunctionFromSysfs) {
  auto dev = FakePciDevice::virtio(kBdf, "vfio-pci");
  dev.subsys_device = 0x1100;
  dev.revision = 0x01;
  os.add_device(dev);
  auto f = describe_function(kAddr, os);
  ASSERT_TRUE(f.ok()) << msg(f);
  EXPECT_EQ(f->bdf, kAddr);
  EXPECT_EQ(f->vendor, 0x1af4);
  EXPECT_EQ(f->device, 0x1044);
  EXPECT_EQ(f->subsys_vendor, 0x1af4);
  EXPECT_EQ(f->subsys_device, 0x1100);
  EXPECT_EQ(f->class_code, 0x00ff00u);
  EXPECT_EQ(f->revision, 0x01);
  EXPECT_EQ(f->driver, "vfio-pci");
  EXPECT_EQ(f->iommu_group, std::optional<unsigned>(12));
  EXPECT_EQ(virtio_device_id(*f), std::optional<std::uint16_t>(4));
  EXPECT_TRUE(is_modern_virtio(*f));
  EXPECT_STREQ(virtio_device_name(*virtio_device_id(*f)), "entropy");
}

TEST_F(Discovery, TransitionalBlockDeviceUnboundWithoutGroup) {
  FakePciDevice dev;
  dev.bdf = "0001:02:1f.3";
  dev.device = 0x1001;
  dev.subsys_device = 2;
  dev.class_code = 0x010000;
  dev.revision = 0;
  dev.iommu_group.reset();
  os.add_device(dev);
  auto f = describe_function(Bdf{1, 2, 0x1f, 3}, os);
  ASSERT_TRUE(f.ok()) << msg(f);
  EXPECT_EQ(f->device, 0x1001);
  EXPECT_EQ(f->class_code, 0x010000u);
  EXPECT_EQ(f->driver, "");
  EXPECT_EQ(f->iommu_group, std::nullopt);
  EXPECT_EQ(virtio_device_id(*f), std::optional<std::uint16_t>(2));
  EXPECT_FALSE(is_modern_virtio(*f));
}

TEST_F(Discovery, MissingFunction) {
  auto f = describe_function(Bdf{0, 0, 9, 0}, os);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.error().code(), Errc::not_found);
  EXPECT_EQ(
      f.error().message(),
      "0000:00:09.0: describe function: no such PCI function (/sys/bus/pci/devices/0000:00:09.0 is missing)");
}

TEST_F(Discovery, BadAttributeValues) {
  os.add_device(FakePciDevice::virtio(kBdf));
  os.set_file(kDevDir + "/vendor", "garbage\n");
  auto f = describe_function(kAddr, os);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.error().code(), Errc::bad_device_data);
  EXPECT_EQ(f.error().message(), "0000:00:03.0: read vendor: unparsable value 'garbage'");

  os.set_file(kDevDir + "/vendor", "0x1af4\n");
  os.set_file(kDevDir + "/class", "0x1000000\n");
  auto big = describe_function(kAddr, os);
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.error().code(), Errc::bad_device_data);
  EXPECT_EQ(big.error().op(), "read class");

  os.set_file(kDevDir + "/class", "0x00ff00\n");
  os.remove(kDevDir + "/revision");
  auto missing = describe_function(kAddr, os);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code(), Errc::not_found);
  EXPECT_EQ(missing.error().message(), "0000:00:03.0: read revision: No such file or directory");
}

TEST_F(Discovery, IommuGroupLinkMustEndInANumber) {
  os.add_device(FakePciDevice::virtio(kBdf));
  EXPECT_EQ(sysfs_iommu_group(kAddr, os), std::optional<unsigned>(12));
  os.set_link(kDevDir + "/iommu_group", "../../../../kernel/iommu_groups/abc");
  EXPECT_EQ(sysfs_iommu_group(kAddr, os), std::nullopt);
  os.set_link(kDevDir + "/iommu_group", "../../../../kernel/iommu_groups/1234567890");
  EXPECT_EQ(sysfs_iommu_group(kAddr, os), std::nullopt);
  os.set_link(kDevDir + "/iommu_group", "../../../../kernel/iommu_groups/");
  EXPECT_EQ(sysfs_iommu_group(kAddr, os), std::nullopt);
  os.set_link(kDevDir + "/iommu_group", "../../../../kernel/iommu_groups/123456789");
  EXPECT_EQ(sysfs_iommu_group(kAddr, os), std::optional<unsigned>(123456789));
  EXPECT_EQ(sysfs_driver(kAddr, os), "vfio-pci");
}

FunctionInfo fn(std::uint16_t vendor, std::uint16_t device, std::uint16_t subsys_device = 0) {
  FunctionInfo f;
  f.vendor = vendor;
  f.device = device;
  f.subsys_vendor = vendor;
  f.subsys_device = subsys_device;
  return f;
}

TEST(VirtioIds, ModernAndTransitional) {
  EXPECT_EQ(virtio_device_id(fn(0x1af4, 0x1044)), std::optional<std::uint16_t>(4));
  EXPECT_EQ(virtio_device_id(fn(0x1af4, 0x1040)), std::optional<std::uint16_t>(0));
  EXPECT_EQ(virtio_device_id(fn(0x1af4, 0x105b)), std::optional<std::uint16_t>(27));
  EXPECT_EQ(virtio_device_id(fn(0x1af4, 0x107f)), std::optional<std::uint16_t>(0x3f));
  EXPECT_EQ(virtio_device_id(fn(0x1af4, 0x1005, 4)), std::optional<std::uint16_t>(4));
  EXPECT_EQ(virtio_device_id(fn(0x1af4, 0x1000, 1)), std::optional<std::uint16_t>(1));
  EXPECT_EQ(virtio_device_id(fn(0x1af4, 0x103f, 9)), std::optional<std::uint16_t>(9));
  EXPECT_TRUE(is_modern_virtio(fn(0x1af4, 0x1044)));
  EXPECT_FALSE(is_modern_virtio(fn(0x1af4, 0x1005, 4)));
}

TEST(VirtioIds, NonVirtio) {
  EXPECT_EQ(virtio_device_id(fn(0x8086, 0x1044)), std::nullopt);  // right device id, wrong vendor
  EXPECT_EQ(virtio_device_id(fn(0x1af4, 0x1110)), std::nullopt);  // ivshmem
  EXPECT_EQ(virtio_device_id(fn(0x1af4, 0x0fff)), std::nullopt);
  EXPECT_EQ(virtio_device_id(fn(0x1af4, 0x1080)), std::nullopt);
  EXPECT_FALSE(is_modern_virtio(fn(0x8086, 0x1044)));
  EXPECT_STREQ(virtio_device_name(4), "entropy");
  EXPECT_STREQ(virtio_device_name(27), "pmem");
  EXPECT_STREQ(virtio_device_name(999), "unknown");
}

}  // namespace
}  // namespace uvirtio::pci
