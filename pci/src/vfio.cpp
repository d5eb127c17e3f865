// VfioDevice: VFIO container, group and device handling (see vfio.hpp).
#include "uvirtio/pci/vfio.hpp"

#include <fcntl.h>
#include <linux/vfio.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iostream>

#include "uvirtio/base/mmio.hpp"
#include "uvirtio/pci/discovery.hpp"

namespace uvirtio::pci {
namespace {

// Why an access of `width` bytes at `off` of a BAR of `size` bytes is
// refused, or an empty string. Accesses are naturally aligned: on a mapped
// BAR a misaligned one would be a misaligned volatile load or store.
// Checked without building a string: BAR accesses are on the notify and
// config paths, and only a refused one needs its message.
std::string bad_access(std::uint64_t off, unsigned width, std::uint64_t size) {
  const bool width_ok = width == 1 || width == 2 || width == 4 || width == 8;
  const bool aligned = width_ok && off % width == 0;
  const bool inside = off < size && width <= size - off;
  if (aligned && inside) [[likely]]
    return {};
  const std::string what = "access of " + std::to_string(width) + " bytes at " + std::to_string(off);
  if (!width_ok) return what + ": width is not 1, 2, 4 or 8";
  if (!aligned) return what + " not aligned to its width";
  return what + " outside a BAR of " + std::to_string(size) + " bytes";
}

// A BAR mapped into our address space: single-width volatile accesses.
class MappedBar final : public BarIo {
 public:
  MappedBar(Os& os, std::string dev, unsigned index, void* base, std::uint64_t size)
      : os_(os), dev_(std::move(dev)), index_(index), base_(static_cast<std::uint8_t*>(base)), size_(size) {}
  ~MappedBar() override { os_.munmap(base_, size_); }
  std::uint64_t size() const override { return size_; }
  volatile std::uint8_t* mapping() const override { return base_; }
  Result<std::uint64_t> read(std::uint64_t off, unsigned width) override {
    if (auto why = bad_access(off, width, size_); !why.empty()) return range_error("read", why);
    switch (width) {
      case 1:
        return mmio::read<std::uint8_t>(base_, off);
      case 2:
        return mmio::read<std::uint16_t>(base_, off);
      case 4:
        return mmio::read<std::uint32_t>(base_, off);
      default:
        return mmio::read<std::uint64_t>(base_, off);
    }
  }
  Result<void> write(std::uint64_t off, unsigned width, std::uint64_t v) override {
    if (auto why = bad_access(off, width, size_); !why.empty()) return range_error("write", why);
    switch (width) {
      case 1:
        mmio::write<std::uint8_t>(base_, off, static_cast<std::uint8_t>(v));
        break;
      case 2:
        mmio::write<std::uint16_t>(base_, off, static_cast<std::uint16_t>(v));
        break;
      case 4:
        mmio::write<std::uint32_t>(base_, off, static_cast<std::uint32_t>(v));
        break;
      default:
        mmio::write<std::uint64_t>(base_, off, v);
        break;
    }
    return ok();
  }

 private:
  Error range_error(const char* what, std::string why) const {
    return Error(Errc::invalid_argument, dev_, "BAR" + std::to_string(index_) + " " + what, std::move(why));
  }
  Os& os_;
  std::string dev_;
  unsigned index_;
  std::uint8_t* base_;
  std::uint64_t size_;
};

// A BAR reached through pread/pwrite on the device fd (I/O BARs, regions
// without VFIO_REGION_INFO_FLAG_MMAP).
class RegionBar final : public BarIo {
 public:
  RegionBar(Os& os, int fd, std::string dev, RegionInfo info)
      : os_(os), fd_(fd), dev_(std::move(dev)), info_(info) {}
  std::uint64_t size() const override { return info_.size; }
  volatile std::uint8_t* mapping() const override { return nullptr; }
  Result<std::uint64_t> read(std::uint64_t off, unsigned width) override {
    if (auto why = bad_access(off, width, info_.size); !why.empty())
      return Error(Errc::invalid_argument, dev_, "BAR" + std::to_string(info_.index) + " read", why);
    std::uint64_t v = 0;
    ssize_t n = os_.pread(fd_, &v, width, static_cast<off_t>(info_.offset + off));
    if (n != static_cast<ssize_t>(width))
      return Error::from_errno(n < 0 ? errno : EIO, dev_, "BAR" + std::to_string(info_.index) + " read");
    return v;  // little-endian host: the low bytes hold the value
  }
  Result<void> write(std::uint64_t off, unsigned width, std::uint64_t v) override {
    if (auto why = bad_access(off, width, info_.size); !why.empty())
      return Error(Errc::invalid_argument, dev_, "BAR" + std::to_string(info_.index) + " write", why);
    ssize_t n = os_.pwrite(fd_, &v, width, static_cast<off_t>(info_.offset + off));
    if (n != static_cast<ssize_t>(width))
      return Error::from_errno(n < 0 ? errno : EIO, dev_, "BAR" + std::to_string(info_.index) + " write");
    return ok();
  }

 private:
  Os& os_;
  int fd_;
  std::string dev_;
  RegionInfo info_;
};

void* ioctl_value(unsigned long v) { return reinterpret_cast<void*>(v); }

}  // namespace

std::vector<IovaRange> parse_iova_ranges(const std::uint8_t* info, std::size_t info_len) {
  std::vector<IovaRange> out;
  if (info_len < sizeof(vfio_iommu_type1_info)) return out;
  vfio_iommu_type1_info hdr;
  std::memcpy(&hdr, info, sizeof hdr);
  if (!(hdr.flags & VFIO_IOMMU_INFO_CAPS)) return out;
  std::uint32_t off = hdr.cap_offset;
  for (int guard = 0; off != 0 && guard < 64; ++guard) {
    if (off < sizeof hdr || off > info_len || info_len - off < sizeof(vfio_info_cap_header)) break;
    vfio_info_cap_header cap;
    std::memcpy(&cap, info + off, sizeof cap);
    if (cap.id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
      const std::size_t base = sizeof(vfio_iommu_type1_info_cap_iova_range);
      if (info_len - off < base) break;
      vfio_iommu_type1_info_cap_iova_range r;
      std::memcpy(&r, info + off, base);
      const std::size_t avail = (info_len - off - base) / sizeof(vfio_iova_range);
      for (std::uint32_t i = 0; i < r.nr_iovas && i < avail; ++i) {
        vfio_iova_range one;
        std::memcpy(&one, info + off + base + i * sizeof one, sizeof one);
        if (one.start <= one.end) out.push_back({one.start, one.end});
      }
      break;
    }
    if (cap.next != 0 && cap.next <= off) break;  // chains only move forward
    off = cap.next;
  }
  return out;
}

Result<std::unique_ptr<VfioDevice>> VfioDevice::open(const Bdf& bdf, VfioOptions options, Os& os) {
  std::unique_ptr<VfioDevice> dev(new VfioDevice(os, bdf.str()));
  if (auto r = dev->init(bdf, options); !r) return std::move(r).error();
  return dev;
}

Result<void> VfioDevice::init(const Bdf& bdf, const VfioOptions& options) {
  mode_ = options.mode;
  const std::string& dev = name_;
  std::string driver = sysfs_driver(bdf, os_);
  if (!os_.exists("/sys/bus/pci/devices/" + dev))
    return Error(Errc::not_found, dev, "open VFIO device", "no such PCI function");
  if (driver != "vfio-pci")
    return Error(Errc::invalid_argument, dev, "open VFIO device",
                 "not bound to vfio-pci (driver: " + (driver.empty() ? std::string("none") : driver) +
                     "); run 'uvirtio bind " + dev + "'");
  auto group = sysfs_iommu_group(bdf, os_);
  if (!group) return Error(Errc::unsupported, dev, "open VFIO device", "the function has no IOMMU group");

  // Container.
  int cfd = os_.open("/dev/vfio/vfio", O_RDWR);
  if (cfd < 0) return Error::from_errno(errno, dev, "open /dev/vfio/vfio");
  container_ = Fd(os_, cfd);
  int api = os_.ioctl(cfd, VFIO_GET_API_VERSION, nullptr);
  if (api != VFIO_API_VERSION)
    return Error(Errc::unsupported, dev, "VFIO_GET_API_VERSION", "kernel VFIO API " + std::to_string(api));
  const unsigned long type = mode_ == IommuMode::type1v2 ? VFIO_TYPE1v2_IOMMU : VFIO_NOIOMMU_IOMMU;
  if (os_.ioctl(cfd, VFIO_CHECK_EXTENSION, ioctl_value(type)) <= 0)
    return Error(Errc::unsupported, dev, "VFIO_CHECK_EXTENSION",
                 mode_ == IommuMode::type1v2
                     ? "no Type1v2 IOMMU support (load vfio_iommu_type1)"
                     : "no no-IOMMU support (vfio needs enable_unsafe_noiommu_mode=1 and "
                       "CONFIG_VFIO_NOIOMMU)");

  // Group.
  const std::string gpath =
      (mode_ == IommuMode::noiommu ? "/dev/vfio/noiommu-" : "/dev/vfio/") + std::to_string(*group);
  int gfd = os_.open(gpath, O_RDWR);
  if (gfd < 0) {
    int e = errno;
    if (e == EBUSY)
      return Error(Errc::busy, dev, "open " + gpath, "the group is in use by another process", e);
    const std::string other =
        (mode_ == IommuMode::noiommu ? "/dev/vfio/" : "/dev/vfio/noiommu-") + std::to_string(*group);
    if (e == ENOENT && os_.exists(other))
      return Error(Errc::invalid_argument, dev, "open " + gpath,
                   mode_ == IommuMode::noiommu
                       ? "the group is an IOMMU group (" + other + "): drop --no-iommu"
                       : "the group is a no-IOMMU group (" + other + "): pass --no-iommu",
                   e);
    return Error::from_errno(e, dev, "open " + gpath);
  }
  group_ = Fd(os_, gfd);
  vfio_group_status status{};
  status.argsz = sizeof status;
  if (os_.ioctl(gfd, VFIO_GROUP_GET_STATUS, &status) != 0)
    return Error::from_errno(errno, dev, "VFIO_GROUP_GET_STATUS");
  if (!(status.flags & VFIO_GROUP_FLAGS_VIABLE))
    return Error(
        Errc::busy, dev, "VFIO_GROUP_GET_STATUS",
        "IOMMU group " + std::to_string(*group) + " is not viable: bind every function in it to vfio-pci");
  if (os_.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, &cfd) != 0)
    return Error::from_errno(errno, dev, "VFIO_GROUP_SET_CONTAINER");
  if (os_.ioctl(cfd, VFIO_SET_IOMMU, ioctl_value(type)) != 0) {
    int e = errno;
    std::string hint = e == EPERM ? "interrupt remapping missing? (intremap=on, or vfio_iommu_type1 "
                                    "allow_unsafe_interrupts=1)"
                                  : "";
    return Error::from_errno(e, dev, "VFIO_SET_IOMMU", hint);
  }

  // IOMMU info: the usable IOVA ranges (a capability chain; grow argsz as asked).
  DmaPool::Mapper mapper;
  if (mode_ == IommuMode::type1v2) {
    std::vector<std::uint8_t> buf(sizeof(vfio_iommu_type1_info));
    for (int attempt = 0; attempt < 3; ++attempt) {
      auto* info = reinterpret_cast<vfio_iommu_type1_info*>(buf.data());
      info->argsz = static_cast<std::uint32_t>(buf.size());
      if (os_.ioctl(cfd, VFIO_IOMMU_GET_INFO, buf.data()) != 0)
        return Error::from_errno(errno, dev, "VFIO_IOMMU_GET_INFO");
      if (info->argsz <= buf.size() || info->argsz > (1u << 20)) break;
      buf.assign(info->argsz, 0);
    }
    iova_ranges_ = parse_iova_ranges(buf.data(), buf.size());
    mapper.map = [this, cfd](void* va, std::uint64_t iova, std::uint64_t size) -> Result<void> {
      vfio_iommu_type1_dma_map m{};
      m.argsz = sizeof m;
      m.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
      m.vaddr = reinterpret_cast<std::uint64_t>(va);
      m.iova = iova;
      m.size = size;
      if (os_.ioctl(cfd, VFIO_IOMMU_MAP_DMA, &m) != 0)
        return Error::from_errno(errno, name_, "VFIO_IOMMU_MAP_DMA");
      return ok();
    };
    mapper.unmap = [this, cfd](std::uint64_t iova, std::uint64_t size) {
      vfio_iommu_type1_dma_unmap u{};
      u.argsz = sizeof u;
      u.iova = iova;
      u.size = size;
      os_.ioctl(cfd, VFIO_IOMMU_UNMAP_DMA, &u);
    };
  } else {
    std::string msg = "WARNING: " + dev +
                      ": VFIO no-IOMMU mode: the device can read and write all of this machine's memory; "
                      "use it only on a throwaway guest";
    if (options.warn)
      options.warn(msg);
    else
      std::cerr << msg << "\n";
  }
  dma_ = std::make_unique<DmaPool>(
      os_, dev, mode_ == IommuMode::type1v2 ? DmaPool::Mode::iommu : DmaPool::Mode::noiommu,
      IovaAllocator(iova_ranges_), std::move(mapper));

  // Device.
  std::string name = dev;
  int dfd = os_.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, name.data());
  if (dfd < 0) return Error::from_errno(errno, dev, "VFIO_GROUP_GET_DEVICE_FD");
  device_ = Fd(os_, dfd);
  vfio_device_info dinfo{};
  dinfo.argsz = sizeof dinfo;
  if (os_.ioctl(dfd, VFIO_DEVICE_GET_INFO, &dinfo) != 0)
    return Error::from_errno(errno, dev, "VFIO_DEVICE_GET_INFO");
  if (!(dinfo.flags & VFIO_DEVICE_FLAGS_PCI))
    return Error(Errc::unsupported, dev, "VFIO_DEVICE_GET_INFO", "not a PCI device");
  const std::uint32_t nregions = std::min<std::uint32_t>(dinfo.num_regions, 64);
  for (std::uint32_t i = 0; i < nregions; ++i) {
    vfio_region_info r{};
    r.argsz = sizeof r;
    r.index = i;
    RegionInfo ri;
    ri.index = i;
    // The kernel refuses some regions (VGA without legacy VGA): keep them as unavailable.
    if (os_.ioctl(dfd, VFIO_DEVICE_GET_REGION_INFO, &r) == 0) {
      ri.flags = r.flags;
      ri.size = r.size;
      ri.offset = r.offset;
      ri.available = true;
    }
    regions_.push_back(ri);
  }
  if (regions_.size() <= VFIO_PCI_CONFIG_REGION_INDEX || !regions_[VFIO_PCI_CONFIG_REGION_INDEX].available)
    return Error(Errc::unsupported, dev, "VFIO_DEVICE_GET_REGION_INFO", "no config space region");
  for (std::uint32_t i = 0; i < 3 && i < dinfo.num_irqs; ++i) {
    vfio_irq_info irq{};
    irq.argsz = sizeof irq;
    irq.index = i;
    if (os_.ioctl(dfd, VFIO_DEVICE_GET_IRQ_INFO, &irq) == 0) irq_counts_[i] = irq.count;
  }

  // Memory space and bus mastering on (PCI command register, offset 4): the
  // function must be allowed to answer MMIO and to DMA.
  std::uint8_t cmd[2];
  UV_TRY_VOID(read_config(4, cmd));
  cmd[0] |= 0x06;  // bit 1 memory space, bit 2 bus master
  UV_TRY_VOID(write_config(4, cmd));
  return ok();
}

VfioDevice::~VfioDevice() {
  if (irq_kind_) (void)disable_irqs();
  for (auto& b : bars_) b.reset();
}

Result<void> VfioDevice::read_config(std::uint32_t off, std::span<std::uint8_t> out) {
  const RegionInfo& cfg = regions_[VFIO_PCI_CONFIG_REGION_INDEX];
  if (off > cfg.size || out.size() > cfg.size - off)
    return Error(Errc::invalid_argument, name_, "read config space", "offset beyond config space");
  ssize_t n = os_.pread(device_.get(), out.data(), out.size(), static_cast<off_t>(cfg.offset + off));
  if (n != static_cast<ssize_t>(out.size()))
    return Error::from_errno(n < 0 ? errno : EIO, name_, "read config space at " + std::to_string(off));
  return ok();
}

Result<void> VfioDevice::write_config(std::uint32_t off, std::span<const std::uint8_t> in) {
  const RegionInfo& cfg = regions_[VFIO_PCI_CONFIG_REGION_INDEX];
  if (off > cfg.size || in.size() > cfg.size - off)
    return Error(Errc::invalid_argument, name_, "write config space", "offset beyond config space");
  ssize_t n = os_.pwrite(device_.get(), in.data(), in.size(), static_cast<off_t>(cfg.offset + off));
  if (n != static_cast<ssize_t>(in.size()))
    return Error::from_errno(n < 0 ? errno : EIO, name_, "write config space at " + std::to_string(off));
  return ok();
}

Result<std::vector<std::uint8_t>> VfioDevice::config_snapshot() {
  const RegionInfo& cfg = regions_[VFIO_PCI_CONFIG_REGION_INDEX];
  std::vector<std::uint8_t> buf(cfg.size >= 4096 ? 4096 : 256);
  if (auto r = read_config(0, buf); !r) {
    buf.resize(256);  // some kernels refuse the extended space
    UV_TRY_VOID(read_config(0, buf));
  }
  return buf;
}

std::array<std::uint64_t, 6> VfioDevice::bar_sizes() const {
  std::array<std::uint64_t, 6> s{};
  for (std::size_t i = 0; i < 6 && i < regions_.size(); ++i)
    if (regions_[i].available) s[i] = regions_[i].size;
  return s;
}

Result<BarIo*> VfioDevice::bar(unsigned index) {
  if (index > 5)
    return Error(Errc::invalid_argument, name_, "open BAR", "BAR index " + std::to_string(index) + " > 5");
  if (bars_[index]) return bars_[index].get();
  if (index >= regions_.size() || !regions_[index].available || regions_[index].size == 0)
    return Error(Errc::not_found, name_, "open BAR" + std::to_string(index), "the BAR is not implemented");
  const RegionInfo& ri = regions_[index];
  if ((ri.flags & VFIO_REGION_INFO_FLAG_MMAP) && ri.size <= (1ull << 40)) {
    void* p = os_.mmap(nullptr, ri.size, PROT_READ | PROT_WRITE, MAP_SHARED, device_.get(),
                       static_cast<off_t>(ri.offset));
    if (p != MAP_FAILED) {
      bars_[index] = std::make_unique<MappedBar>(os_, name_, index, p, ri.size);
      return bars_[index].get();
    }
  }
  bars_[index] = std::make_unique<RegionBar>(os_, device_.get(), name_, ri);
  return bars_[index].get();
}

unsigned VfioDevice::irq_count(IrqKind kind) {
  return irq_counts_[kind == IrqKind::intx ? VFIO_PCI_INTX_IRQ_INDEX : VFIO_PCI_MSIX_IRQ_INDEX];
}

Result<std::vector<int>> VfioDevice::enable_irqs(IrqKind kind, unsigned count) {
  const std::uint32_t index = kind == IrqKind::intx ? VFIO_PCI_INTX_IRQ_INDEX : VFIO_PCI_MSIX_IRQ_INDEX;
  const std::string op = kind == IrqKind::intx ? "enable INTx" : "enable MSI-X";
  if (count == 0 || count > irq_counts_[index])
    return Error(Errc::unsupported, name_, op,
                 "asked for " + std::to_string(count) + " vectors, the function has " +
                     std::to_string(irq_counts_[index]));
  if (irq_kind_) UV_TRY_VOID(disable_irqs());
  std::vector<Fd> fds;
  std::vector<std::uint8_t> buf(sizeof(vfio_irq_set) + sizeof(std::int32_t) * count);
  auto* set = reinterpret_cast<vfio_irq_set*>(buf.data());
  set->argsz = static_cast<std::uint32_t>(buf.size());
  set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
  set->index = index;
  set->start = 0;
  set->count = count;
  for (unsigned i = 0; i < count; ++i) {
    int fd = os_.eventfd(0, 0);
    if (fd < 0) return Error::from_errno(errno, name_, op, "eventfd");
    fds.emplace_back(os_, fd);
    std::int32_t v = fd;
    std::memcpy(buf.data() + sizeof(vfio_irq_set) + sizeof v * i, &v, sizeof v);
  }
  if (os_.ioctl(device_.get(), VFIO_DEVICE_SET_IRQS, buf.data()) != 0)
    return Error::from_errno(errno, name_, "VFIO_DEVICE_SET_IRQS (" + op + ")");
  irq_kind_ = kind;
  std::vector<int> out;
  for (auto& f : fds) out.push_back(f.get());
  eventfds_ = std::move(fds);
  return out;
}

Result<void> VfioDevice::unmask_intx() {
  vfio_irq_set set{};
  set.argsz = sizeof set;
  set.flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK;
  set.index = VFIO_PCI_INTX_IRQ_INDEX;
  set.start = 0;
  set.count = 1;
  if (os_.ioctl(device_.get(), VFIO_DEVICE_SET_IRQS, &set) != 0)
    return Error::from_errno(errno, name_, "VFIO_DEVICE_SET_IRQS (unmask INTx)");
  return ok();
}

Result<void> VfioDevice::disable_irqs() {
  if (!irq_kind_) return ok();
  vfio_irq_set set{};
  set.argsz = sizeof set;
  set.flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
  set.index = *irq_kind_ == IrqKind::intx ? VFIO_PCI_INTX_IRQ_INDEX : VFIO_PCI_MSIX_IRQ_INDEX;
  set.start = 0;
  set.count = 0;
  irq_kind_.reset();
  const int rc = os_.ioctl(device_.get(), VFIO_DEVICE_SET_IRQS, &set);
  const int e = errno;
  eventfds_.clear();
  if (rc != 0) return Error::from_errno(e, name_, "VFIO_DEVICE_SET_IRQS (disable)");
  return ok();
}

}  // namespace uvirtio::pci
