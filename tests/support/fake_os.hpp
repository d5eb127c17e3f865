// FakeOs: an in-memory model of the kernel interfaces behind pci::Os.
//
// It models just enough of Linux for the PCI layer to run without root or
// /dev/vfio:
//   * sysfs: regular files, directories and symlinks (driver, iommu_group),
//     with the side effects of the PCI driver attributes (driver_override,
//     drivers/<drv>/bind and unbind, drivers_probe) as the kernel implements
//     them (drivers/pci/pci-driver.c, drivers/base/bus.c);
//   * /dev/vfio: a container (/dev/vfio/vfio), groups (/dev/vfio/N, opened
//     exclusively, present while a member is bound to vfio-pci) and device
//     fds, with the VFIO ioctls answered the way drivers/vfio/vfio_main.c,
//     vfio_iommu_type1.c and pci/vfio_pci_core.c answer them (argsz checks,
//     the VFIO_IOMMU_GET_INFO capability chain and its argsz growth, region
//     offsets index << 40, VGA refused with EINVAL);
//   * eventfd and memfd: real kernel objects (both work unprivileged);
//     MFD_HUGETLB is simulated so hugepage paths are deterministic; mlock is
//     a no-op.
// Every call is logged (ioctls, writes, mmaps, closes) in one ordered event
// list, and fd bookkeeping checks that each fd is closed exactly once.
// Failures are scriptable through the public knobs below.
#pragma once

#include <fcntl.h>
#include <linux/memfd.h>
#include <linux/vfio.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "uvirtio/pci/dma.hpp"
#include "uvirtio/pci/os.hpp"

namespace uvirtio::test {

// vfio-pci places region N at offset N << 40 of the device fd (VFIO_PCI_OFFSET_SHIFT).
inline constexpr unsigned kRegionShift = 40;
inline constexpr std::uint64_t region_offset(std::uint32_t index) {
  return std::uint64_t{index} << kRegionShift;
}

inline const char* vfio_ioctl_name(unsigned long request) {
  switch (request) {
    case VFIO_GET_API_VERSION:
      return "VFIO_GET_API_VERSION";
    case VFIO_CHECK_EXTENSION:
      return "VFIO_CHECK_EXTENSION";
    case VFIO_SET_IOMMU:
      return "VFIO_SET_IOMMU";
    case VFIO_GROUP_GET_STATUS:
      return "VFIO_GROUP_GET_STATUS";
    case VFIO_GROUP_SET_CONTAINER:
      return "VFIO_GROUP_SET_CONTAINER";
    case VFIO_GROUP_UNSET_CONTAINER:
      return "VFIO_GROUP_UNSET_CONTAINER";
    case VFIO_GROUP_GET_DEVICE_FD:
      return "VFIO_GROUP_GET_DEVICE_FD";
    case VFIO_DEVICE_GET_INFO:
      return "VFIO_DEVICE_GET_INFO";
    case VFIO_DEVICE_GET_REGION_INFO:
      return "VFIO_DEVICE_GET_REGION_INFO";
    case VFIO_DEVICE_GET_IRQ_INFO:
      return "VFIO_DEVICE_GET_IRQ_INFO";
    case VFIO_DEVICE_SET_IRQS:
      return "VFIO_DEVICE_SET_IRQS";
    case VFIO_DEVICE_RESET:
      return "VFIO_DEVICE_RESET";
    case VFIO_IOMMU_GET_INFO:
      return "VFIO_IOMMU_GET_INFO";
    case VFIO_IOMMU_MAP_DMA:
      return "VFIO_IOMMU_MAP_DMA";
    case VFIO_IOMMU_UNMAP_DMA:
      return "VFIO_IOMMU_UNMAP_DMA";
    default:
      return "unknown-ioctl";
  }
}

// One region of a fake VFIO device. mem.size() is the region size; for BARs
// mem also backs mmap and pread/pwrite.
struct FakeRegion {
  std::uint32_t flags = 0;        // VFIO_REGION_INFO_FLAG_*
  std::vector<std::uint8_t> mem;  // empty: not implemented (size 0)
  bool refuse = false;            // VFIO_DEVICE_GET_REGION_INFO fails with EINVAL (VGA)
  bool mmap_fails = false;        // mmap answers ENOMEM even though FLAG_MMAP is set
};

// A PCI function: its sysfs attributes and its VFIO view.
struct FakePciDevice {
  std::string bdf = "0000:00:03.0";
  std::uint16_t vendor = 0x1af4, device = 0x1044;  // modern virtio-rng
  std::uint16_t subsys_vendor = 0x1af4, subsys_device = 0x1100;
  std::uint32_t class_code = 0x00ff00;
  std::uint8_t revision = 0x01;
  std::string driver;                        // initially bound driver, "" for none
  std::optional<unsigned> iommu_group = 12;  // none: no iommu_group link
  std::string probe_driver;                  // driver drivers_probe picks without an override
  bool vfio_refuses = false;                 // vfio-pci's probe fails for this function

  std::uint32_t device_flags = VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET;
  std::array<FakeRegion, VFIO_PCI_NUM_REGIONS> regions{};
  std::array<std::uint32_t, VFIO_PCI_NUM_IRQS> irq_counts{1, 1, 4, 1, 1};  // INTx MSI MSI-X ERR REQ
  std::size_t config_read_limit = SIZE_MAX;  // config reads reaching past this fail with EIO

  // A QEMU-like transitional-layout virtio function: BAR0 a 32-byte I/O BAR
  // (not mmappable), BAR1 the 4 KiB MSI-X BAR, BAR4 a 16 KiB 64-bit memory
  // BAR (BAR5 its upper half), no ROM, 256 bytes of config space, VGA refused.
  static FakePciDevice virtio(std::string bdf = "0000:00:03.0", std::string driver = "vfio-pci") {
    FakePciDevice d;
    d.bdf = std::move(bdf);
    d.driver = std::move(driver);
    constexpr std::uint32_t rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    d.regions[0].flags = rw;
    d.regions[0].mem.assign(0x20, 0);
    d.regions[1].flags = rw | VFIO_REGION_INFO_FLAG_MMAP;
    d.regions[1].mem.assign(0x1000, 0);
    d.regions[4].flags = rw | VFIO_REGION_INFO_FLAG_MMAP;
    d.regions[4].mem.assign(0x4000, 0);
    d.regions[VFIO_PCI_CONFIG_REGION_INDEX].flags = rw;
    auto& cfg = d.regions[VFIO_PCI_CONFIG_REGION_INDEX].mem;
    cfg.assign(256, 0);
    cfg[0] = static_cast<std::uint8_t>(d.vendor & 0xff);
    cfg[1] = static_cast<std::uint8_t>(d.vendor >> 8);
    cfg[2] = static_cast<std::uint8_t>(d.device & 0xff);
    cfg[3] = static_cast<std::uint8_t>(d.device >> 8);
    cfg[4] = 0x00;  // command: memory and bus master off,
    cfg[5] = 0x04;  // INTx disable set (must survive the read-modify-write)
    cfg[6] = 0x10;  // status: capabilities list
    d.regions[VFIO_PCI_VGA_REGION_INDEX].refuse = true;
    return d;
  }
  std::vector<std::uint8_t>& config() { return regions[VFIO_PCI_CONFIG_REGION_INDEX].mem; }
};

class FakeOs final : public pci::Os {
 public:
  enum class FdKind { container, group, device, eventfd, memfd, file };

  struct FdRecord {
    int fd = -1;
    FdKind kind = FdKind::file;
    std::string name;   // "container", "group 12", "device 0000:00:03.0", "eventfd", "memfd", "file <path>"
    bool real = false;  // a kernel fd (eventfd, memfd)
    int closes = 0;
  };
  struct Write {
    std::string path;
    std::string value;
    int err = 0;  // errno the write failed with, 0 on success
  };
  struct IoctlCall {
    std::string target;           // fd name
    std::string name;             // VFIO_* name
    unsigned long arg_value = 0;  // for the ioctls taking a value (CHECK_EXTENSION, SET_IOMMU)
  };
  struct DmaMap {
    std::uint64_t vaddr = 0, iova = 0, size = 0;
    std::uint32_t flags = 0;
  };
  struct DmaUnmap {
    std::uint64_t iova = 0, size = 0;
  };
  struct IrqSet {
    std::uint32_t argsz = 0, flags = 0, index = 0, start = 0, count = 0;
    std::vector<int> fds;  // with VFIO_IRQ_SET_DATA_EVENTFD
  };
  struct RegionIo {
    bool write = false;
    std::string target;
    std::uint64_t offset = 0;
    std::vector<std::uint8_t> data;  // bytes written, or bytes returned by a read
  };
  struct MmapCall {
    std::string target;
    std::size_t len = 0;
    int prot = 0, flags = 0;
    std::uint64_t offset = 0;
    void* result = nullptr;
  };
  enum class Huge {
    unsupported,  // memfd_create(MFD_HUGETLB) fails with EINVAL (no hugetlbfs)
    works,        // hugepage memfds work (simulated with ordinary memfds)
    mmap_fails,   // memfd and ftruncate work, mmap fails with ENOMEM (pool exhausted)
  };
  enum class Pagemap { hidden, visible };

  // ---- Scripting knobs -------------------------------------------------
  bool vfio_present = true;  // /dev/vfio/vfio exists
  int api_version = VFIO_API_VERSION;
  std::set<unsigned long> extensions{VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU};
  int set_iommu_errno = 0;  // VFIO_SET_IOMMU fails with it
  std::set<unsigned> nonviable_groups;
  std::set<unsigned> noiommu_groups;  // groups whose node is /dev/vfio/noiommu-N
  unsigned next_noiommu_group = 42;   // group vfio-pci creates for a group-less function in no-IOMMU mode
  bool noiommu_probe_creates_group = true;   // false: vfio-pci binds but no group appears
  std::map<unsigned, int> group_open_errno;  // open("/dev/vfio/N") fails with it
  bool report_iova_caps = true;              // VFIO_IOMMU_GET_INFO has a capability chain
  bool extra_iommu_caps = true;  // migration and DMA-avail caps precede the IOVA cap, as in Linux 5.10+
  std::vector<pci::IovaRange> iova_ranges{{0, 0xfedfffff}, {0xfef00000, 0x7fffffffffull}};
  int map_dma_errno = 0;
  int set_irqs_errno = 0;
  int eventfd_budget = -1;  // eventfds that succeed before EMFILE; -1 unlimited
  int memfd_errno = 0;
  Huge huge = Huge::unsupported;
  int mlock_errno = 0;
  bool poison_dma = false;  // fill fresh memfd mappings with 0xa5
  Pagemap pagemap = Pagemap::hidden;
  std::uint64_t pagemap_pfn_base = 0x100000;  // visible pagemap: pfn = base + (va >> 12)

  FakeOs() {
    for (const char* d :
         {"/", "/sys", "/sys/bus", "/sys/bus/pci", "/sys/bus/pci/devices", "/sys/bus/pci/drivers",
          "/sys/kernel", "/sys/kernel/iommu_groups", "/run", "/dev", "/dev/vfio", "/proc", "/proc/self"})
      dirs_.insert(d);
    files_["/sys/bus/pci/drivers_probe"] = "";
    files_["/proc/self/pagemap"] = "";
  }
  ~FakeOs() override {
    // Release whatever a broken test left behind, so the checks below stay
    // meaningful and ASan stays quiet.
    for (auto& [fd, idx] : open_)
      if (fds_[idx].real) ::close(fd);
    for (auto& [addr, len] : real_maps_) ::munmap(addr, len);
  }
  FakeOs(const FakeOs&) = delete;
  FakeOs& operator=(const FakeOs&) = delete;

  // ---- Building the machine ----------------------------------------------
  void add_driver(const std::string& name) {
    const std::string dir = "/sys/bus/pci/drivers/" + name;
    dirs_.insert(dir);
    files_[dir + "/bind"] = "";
    files_[dir + "/unbind"] = "";
    files_[dir + "/new_id"] = "";
  }
  void remove_driver(const std::string& name) {
    const std::string dir = "/sys/bus/pci/drivers/" + name;
    dirs_.erase(dir);
    for (const char* f : {"/bind", "/unbind", "/new_id"}) files_.erase(dir + f);
  }
  FakePciDevice& add_device(FakePciDevice d) {
    const std::string dir = dev_dir(d.bdf);
    dirs_.insert(dir);
    files_[dir + "/vendor"] = hex(d.vendor, 4);
    files_[dir + "/device"] = hex(d.device, 4);
    files_[dir + "/subsystem_vendor"] = hex(d.subsys_vendor, 4);
    files_[dir + "/subsystem_device"] = hex(d.subsys_device, 4);
    files_[dir + "/class"] = hex(d.class_code, 6);
    files_[dir + "/revision"] = hex(d.revision, 2);
    files_[dir + "/driver_override"] = "(null)\n";
    if (!d.driver.empty()) set_driver(d.bdf, d.driver);
    if (d.iommu_group) {
      const std::string g = "/sys/kernel/iommu_groups/" + std::to_string(*d.iommu_group);
      dirs_.insert(g);
      dirs_.insert(g + "/devices");
      links_[dir + "/iommu_group"] = "../../../../kernel/iommu_groups/" + std::to_string(*d.iommu_group);
    }
    auto& slot = devices_[d.bdf];
    slot = std::move(d);
    return slot;
  }
  FakePciDevice& device(const std::string& bdf) { return devices_.at(bdf); }

  // Points the driver link at a driver (or removes it), without any logging.
  void set_driver(const std::string& bdf, const std::string& driver) {
    if (driver.empty())
      links_.erase(dev_dir(bdf) + "/driver");
    else
      links_[dev_dir(bdf) + "/driver"] = "../../drivers/" + driver;
  }
  void set_file(const std::string& path, std::string content) { files_[path] = std::move(content); }
  // vfio's enable_unsafe_noiommu_mode module parameter ("Y"/"N" in sysfs).
  void set_noiommu_param(bool on) {
    for (const char* d : {"/sys/module", "/sys/module/vfio", "/sys/module/vfio/parameters"}) dirs_.insert(d);
    files_[kNoiommuParam] = on ? "Y\n" : "N\n";
  }
  static constexpr const char* kNoiommuParam = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode";
  void set_link(const std::string& path, std::string target) { links_[path] = std::move(target); }
  void remove(const std::string& path) {
    files_.erase(path);
    links_.erase(path);
    dirs_.erase(path);
  }
  std::optional<std::string> file(const std::string& path) const {
    auto it = files_.find(path);
    if (it == files_.end()) return std::nullopt;
    return it->second;
  }
  std::string driver_of(const std::string& bdf) const {
    auto it = links_.find(dev_dir(bdf) + "/driver");
    if (it == links_.end()) return "";
    return basename(it->second);
  }
  // write_file to a path starting with prefix fails with err (an empty prefix matches everything).
  void fail_writes(std::string prefix, int err) { write_failures_.emplace_back(std::move(prefix), err); }
  void fail_mkdir(std::string path, int err) { mkdir_failures_[std::move(path)] = err; }

  // ---- What happened -----------------------------------------------------
  const std::vector<std::string>& events() const { return events_; }
  const std::vector<Write>& write_log() const { return writes_; }
  // Successful and failed writes as (path, value) pairs, in order.
  std::vector<std::pair<std::string, std::string>> writes() const {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& w : writes_) out.emplace_back(w.path, w.value);
    return out;
  }
  const std::vector<std::string>& mkdirs() const { return mkdirs_; }
  const std::vector<IoctlCall>& ioctls() const { return ioctls_; }
  std::vector<std::string> ioctl_names() const {
    std::vector<std::string> out;
    for (const auto& c : ioctls_) out.push_back(c.name);
    return out;
  }
  const std::vector<std::uint32_t>& iommu_info_argsz() const { return get_info_argsz_; }
  const std::vector<DmaMap>& dma_maps() const { return dma_maps_; }
  const std::vector<DmaUnmap>& dma_unmaps() const { return dma_unmaps_; }
  // IOMMU mappings still in place in some container.
  std::size_t live_dma_mappings() const {
    std::size_t n = 0;
    for (const auto& [fd, c] : containers_) n += c.maps.size();
    return n;
  }
  const std::vector<IrqSet>& irq_sets() const { return irq_sets_; }
  const std::vector<RegionIo>& region_io() const { return region_io_; }
  const std::vector<MmapCall>& mmaps() const { return mmaps_; }
  const std::vector<std::string>& munmaps() const { return munmaps_; }
  const std::vector<unsigned>& memfd_flags() const { return memfd_flags_; }
  const std::vector<std::pair<const void*, std::size_t>>& mlocks() const { return mlocks_; }
  std::size_t live_real_mappings() const { return real_maps_.size(); }
  std::size_t live_bar_mappings() const { return fake_maps_.size(); }
  const std::vector<std::string>& close_order() const { return close_order_; }
  const std::vector<FdRecord>& fd_history() const { return fds_; }

  // Names of fds still open.
  std::vector<std::string> open_fds() const {
    std::vector<std::string> out;
    for (const auto& [fd, idx] : open_) out.push_back(fds_[idx].name);
    return out;
  }
  // Calls to close() on fds that were not open (double closes, stray numbers).
  const std::vector<int>& bad_closes() const { return bad_closes_; }
  // Every fd ever opened was closed exactly once and nothing else was closed.
  bool all_closed_once() const {
    if (!open_.empty() || !bad_closes_.empty()) return false;
    return std::all_of(fds_.begin(), fds_.end(), [](const FdRecord& r) { return r.closes == 1; });
  }
  // The fd record for a number currently open, or nullptr.
  const FdRecord* open_record(int fd) const {
    auto it = open_.find(fd);
    return it == open_.end() ? nullptr : &fds_[it->second];
  }
  std::optional<int> container_fd() const {
    for (const auto& [fd, idx] : open_)
      if (fds_[idx].kind == FdKind::container) return fd;
    return std::nullopt;
  }

  // ---- pci::Os -----------------------------------------------------------
  int open(const std::string& path, int /*flags*/) override {
    if (path == "/dev/vfio/vfio") {
      if (!vfio_present) return fail(ENOENT, "open " + path);
      int fd = add_fd(FdKind::container, "container", false, next_virtual_++);
      containers_[fd] = Container{};
      return fd;
    }
    if (path.rfind("/dev/vfio/", 0) == 0) {
      auto node = parse_group_node(path);
      if (!node) return fail(ENOENT, "open " + path);
      const unsigned g = node->first;
      const bool noiommu = node->second;
      if (auto it = group_open_errno.find(g); it != group_open_errno.end())
        return fail(it->second, "open " + path);
      if (!group_node_exists(g, noiommu)) return fail(ENOENT, "open " + path);
      for (const auto& [fd, gs] : groups_)
        if (gs.group == g) return fail(EBUSY, "open " + path);  // groups open exclusively
      int fd = add_fd(FdKind::group, (noiommu ? "group noiommu-" : "group ") + std::to_string(g), false,
                      next_virtual_++);
      groups_[fd] = Group{g, -1, noiommu};
      return fd;
    }
    const std::string p = resolve(path);
    if (dirs_.count(p)) return fail(EISDIR, "open " + path);
    if (!files_.count(p)) return fail(ENOENT, "open " + path);
    int fd = add_fd(FdKind::file, "file " + path, false, next_virtual_++);
    file_fds_[fd] = p;
    return fd;
  }

  int close(int fd) override {
    auto it = open_.find(fd);
    if (it == open_.end()) {
      bad_closes_.push_back(fd);
      events_.push_back("bad close " + std::to_string(fd));
      errno = EBADF;
      return -1;
    }
    FdRecord& r = fds_[it->second];
    ++r.closes;
    close_order_.push_back(r.name);
    events_.push_back("close " + r.name);
    open_.erase(it);
    if (r.kind == FdKind::container) containers_.erase(fd);
    if (r.kind == FdKind::group) groups_.erase(fd);
    if (r.kind == FdKind::device) device_fds_.erase(fd);
    if (r.kind == FdKind::file) file_fds_.erase(fd);
    huge_fds_.erase(fd);
    if (r.real) return ::close(fd);
    return 0;
  }

  int ioctl(int fd, unsigned long request, void* arg) override {
    const FdRecord* r = open_record(fd);
    IoctlCall call{r ? r->name : "bad fd " + std::to_string(fd), vfio_ioctl_name(request),
                   reinterpret_cast<unsigned long>(arg)};
    ioctls_.push_back(call);
    events_.push_back("ioctl " + call.target + " " + call.name);
    if (r == nullptr) return errno_ret(EBADF);
    switch (r->kind) {
      case FdKind::container:
        return container_ioctl(fd, request, arg);
      case FdKind::group:
        return group_ioctl(fd, request, arg);
      case FdKind::device:
        return device_ioctl(fd, request, arg);
      default:
        return errno_ret(ENOTTY);
    }
  }

  void* mmap(void* addr, std::size_t len, int prot, int flags, int fd, off_t off) override {
    const FdRecord* r = open_record(fd);
    MmapCall call{r ? r->name : "bad fd", len, prot, flags, static_cast<std::uint64_t>(off), MAP_FAILED};
    auto finish = [&](void* result, int err) {
      call.result = result;
      mmaps_.push_back(call);
      if (result == MAP_FAILED) {
        events_.push_back("mmap " + call.target + " failed");
        errno = err;
      }
      return result;
    };
    if (r == nullptr) return finish(MAP_FAILED, EBADF);
    if (r->kind == FdKind::device) {
      FakePciDevice& d = devices_.at(device_fds_.at(fd));
      const std::uint64_t index = static_cast<std::uint64_t>(off) >> kRegionShift;
      const std::uint64_t within = static_cast<std::uint64_t>(off) & ((std::uint64_t{1} << kRegionShift) - 1);
      if (index >= d.regions.size()) return finish(MAP_FAILED, EINVAL);
      FakeRegion& reg = d.regions[index];
      if (!(reg.flags & VFIO_REGION_INFO_FLAG_MMAP) || within != 0 || len == 0 || len > reg.mem.size())
        return finish(MAP_FAILED, EINVAL);
      if (reg.mmap_fails) return finish(MAP_FAILED, ENOMEM);
      void* p = reg.mem.data();
      fake_maps_[p] = {len, "BAR" + std::to_string(index)};
      events_.push_back("mmap BAR" + std::to_string(index));
      return finish(p, 0);
    }
    if (r->kind == FdKind::memfd) {
      if (huge_fds_.count(fd) && huge == Huge::mmap_fails) return finish(MAP_FAILED, ENOMEM);
      void* p = ::mmap(addr, len, prot, flags, fd, off);
      if (p == MAP_FAILED) return finish(MAP_FAILED, errno);
      if (poison_dma) std::memset(p, 0xa5, len);
      real_maps_[p] = len;
      events_.push_back("mmap memfd");
      return finish(p, 0);
    }
    return finish(MAP_FAILED, ENODEV);
  }

  int munmap(void* addr, std::size_t len) override {
    if (auto it = fake_maps_.find(addr); it != fake_maps_.end()) {
      if (it->second.first != len) return errno_ret(EINVAL);
      munmaps_.push_back(it->second.second);
      events_.push_back("munmap " + it->second.second);
      fake_maps_.erase(it);
      return 0;
    }
    if (auto it = real_maps_.find(addr); it != real_maps_.end()) {
      if (it->second != len) {
        munmaps_.push_back("memfd (wrong length)");
        return errno_ret(EINVAL);
      }
      munmaps_.push_back("memfd");
      events_.push_back("munmap memfd");
      real_maps_.erase(it);
      return ::munmap(addr, len);
    }
    munmaps_.push_back("unknown");
    events_.push_back("munmap unknown");
    return errno_ret(EINVAL);
  }

  ssize_t pread(int fd, void* buf, std::size_t len, off_t off) override {
    const FdRecord* r = open_record(fd);
    if (r == nullptr) return errno_ret(EBADF);
    if (r->kind == FdKind::file) {
      const std::string& path = file_fds_.at(fd);
      if (path == "/proc/self/pagemap") return pagemap_read(buf, len, off);
      const std::string& content = files_[path];
      const auto o = static_cast<std::size_t>(off);
      if (o >= content.size()) return 0;
      const std::size_t n = std::min(len, content.size() - o);
      std::memcpy(buf, content.data() + o, n);
      return static_cast<ssize_t>(n);
    }
    if (r->kind != FdKind::device) return errno_ret(EINVAL);
    return region_rw(fd, false, buf, len, static_cast<std::uint64_t>(off));
  }

  ssize_t pwrite(int fd, const void* buf, std::size_t len, off_t off) override {
    const FdRecord* r = open_record(fd);
    if (r == nullptr) return errno_ret(EBADF);
    if (r->kind != FdKind::device) return errno_ret(EINVAL);
    return region_rw(fd, true, const_cast<void*>(buf), len, static_cast<std::uint64_t>(off));
  }

  int eventfd(unsigned initval, int flags) override {
    if (eventfd_budget == 0) return fail(EMFILE, "eventfd");
    if (eventfd_budget > 0) --eventfd_budget;
    int fd = ::eventfd(initval, flags | EFD_CLOEXEC);
    if (fd < 0) return fail(errno, "eventfd");
    return add_fd(FdKind::eventfd, "eventfd", true, fd);
  }

  int memfd_create(const char* name, unsigned flags) override {
    memfd_flags_.push_back(flags);
    if (memfd_errno != 0) return fail(memfd_errno, "memfd_create");
    const bool want_huge = (flags & MFD_HUGETLB) != 0;
    if (want_huge && huge == Huge::unsupported) return fail(EINVAL, "memfd_create hugetlb");
    int fd = ::memfd_create(name, (flags & ~(MFD_HUGETLB | (MFD_HUGE_MASK << MFD_HUGE_SHIFT))) | MFD_CLOEXEC);
    if (fd < 0) return fail(errno, "memfd_create");
    add_fd(FdKind::memfd, want_huge ? "memfd hugetlb" : "memfd", true, fd);
    if (want_huge) huge_fds_.insert(fd);
    return fd;
  }

  int ftruncate(int fd, off_t len) override {
    const FdRecord* r = open_record(fd);
    if (r == nullptr || r->kind != FdKind::memfd) return errno_ret(EINVAL);
    // hugetlbfs sizes must be whole hugepages.
    if (huge_fds_.count(fd) && len % (2 << 20) != 0) return errno_ret(EINVAL);
    return ::ftruncate(fd, len);
  }

  int mlock(const void* addr, std::size_t len) override {
    mlocks_.emplace_back(addr, len);
    if (mlock_errno != 0) return errno_ret(mlock_errno);
    return 0;
  }

  std::optional<std::string> read_file(const std::string& path) override {
    const std::string p = resolve(path);
    if (auto it = files_.find(p); it != files_.end()) return it->second;
    errno = dirs_.count(p) ? EISDIR : ENOENT;
    return std::nullopt;
  }

  bool write_file(const std::string& path, const std::string& text) override {
    writes_.push_back({path, text, 0});
    events_.push_back("write " + path + " = " + text);
    int err = 0;
    for (const auto& [prefix, e] : write_failures_)
      if (path.rfind(prefix, 0) == 0) {
        err = e;
        break;
      }
    if (err == 0) err = do_write(resolve(path), text);
    if (err != 0) {
      writes_.back().err = err;
      errno = err;
      return false;
    }
    return true;
  }

  int mkdir(const std::string& path) override {
    mkdirs_.push_back(path);
    if (auto it = mkdir_failures_.find(path); it != mkdir_failures_.end()) return errno_ret(it->second);
    const std::string p = resolve(path);
    if (dirs_.count(p) || files_.count(p)) return 0;
    if (!dirs_.count(parent(p))) return errno_ret(ENOENT);
    dirs_.insert(p);
    return 0;
  }

  std::optional<std::vector<std::string>> list_dir(const std::string& path) override {
    const std::string p = resolve(path);
    if (!dirs_.count(p)) {
      errno = files_.count(p) ? ENOTDIR : ENOENT;
      return std::nullopt;
    }
    std::set<std::string> names;
    auto add = [&](const std::string& child) {
      if (child != p && parent(child) == p) names.insert(basename(child));
    };
    for (const auto& d : dirs_) add(d);
    for (const auto& [f, c] : files_) add(f);
    for (const auto& [l, t] : links_) add(l);
    return std::vector<std::string>(names.begin(), names.end());
  }

  std::optional<std::string> readlink(const std::string& path) override {
    const std::string n = normalize(path);
    const std::string p = resolve(parent(n)) + (parent(n) == "/" ? "" : "/") + basename(n);
    if (auto it = links_.find(p); it != links_.end()) return it->second;
    errno = (files_.count(p) || dirs_.count(p)) ? EINVAL : ENOENT;
    return std::nullopt;
  }

  bool exists(const std::string& path) override {
    const std::string p = resolve(path);
    if (p == "/dev/vfio/vfio") return vfio_present;
    if (auto node = parse_group_node(p)) return group_node_exists(node->first, node->second);
    return dirs_.count(p) != 0 || files_.count(p) != 0;
  }

 private:
  struct Container {
    std::vector<int> groups;
    unsigned long iommu = 0;  // 0: not set
    std::vector<DmaMap> maps;
  };
  struct Group {
    unsigned group = 0;
    int container = -1;
    bool noiommu = false;
  };

  static std::string hex(std::uint32_t v, int digits) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%0*x\n", digits, v);
    return buf;
  }
  static std::string dev_dir(const std::string& bdf) { return "/sys/bus/pci/devices/" + bdf; }
  static std::string parent(const std::string& p) {
    auto pos = p.rfind('/');
    if (pos == std::string::npos || pos == 0) return "/";
    return p.substr(0, pos);
  }
  static std::string basename(const std::string& p) {
    auto pos = p.rfind('/');
    return pos == std::string::npos ? p : p.substr(pos + 1);
  }
  static std::string normalize(const std::string& path) {
    std::vector<std::string> parts;
    std::size_t i = 0;
    while (i <= path.size()) {
      std::size_t j = path.find('/', i);
      if (j == std::string::npos) j = path.size();
      std::string part = path.substr(i, j - i);
      if (part == "..") {
        if (!parts.empty()) parts.pop_back();
      } else if (!part.empty() && part != ".") {
        parts.push_back(part);
      }
      i = j + 1;
    }
    std::string out;
    for (const auto& part : parts) out += "/" + part;
    return out.empty() ? "/" : out;
  }
  // Follows symlinks in every component (like path lookup in the kernel).
  std::string resolve(const std::string& path, int depth = 0) const {
    const std::string n = normalize(path);
    if (depth > 16) return n;
    std::string cur;
    std::size_t i = 1;
    while (i <= n.size()) {
      std::size_t j = n.find('/', i);
      if (j == std::string::npos) j = n.size();
      if (j > i) {
        cur += "/" + n.substr(i, j - i);
        if (auto it = links_.find(cur); it != links_.end()) {
          const std::string& t = it->second;
          std::string target = t.rfind('/', 0) == 0 ? t : parent(cur) + "/" + t;
          cur = resolve(target, depth + 1);
        }
      }
      i = j + 1;
    }
    return cur.empty() ? "/" : cur;
  }

  // "/dev/vfio/12" -> (12, false), "/dev/vfio/noiommu-0" -> (0, true).
  static std::optional<std::pair<unsigned, bool>> parse_group_node(const std::string& path) {
    const std::string prefix = "/dev/vfio/";
    if (path.rfind(prefix, 0) != 0) return std::nullopt;
    std::string rest = path.substr(prefix.size());
    bool noiommu = false;
    if (rest.rfind("noiommu-", 0) == 0) {
      noiommu = true;
      rest = rest.substr(8);
    }
    if (rest.empty() || rest.size() > 9 ||
        !std::all_of(rest.begin(), rest.end(), [](char c) { return c >= '0' && c <= '9'; }))
      return std::nullopt;
    return std::make_pair(static_cast<unsigned>(std::stoul(rest)), noiommu);
  }
  // vfio creates /dev/vfio/N (or noiommu-N) while a member of group N is bound to vfio-pci.
  bool group_node_exists(unsigned g, bool noiommu) const {
    if (noiommu != (noiommu_groups.count(g) != 0)) return false;
    for (const auto& [bdf, d] : devices_)
      if (d.iommu_group && *d.iommu_group == g && driver_of(bdf) == "vfio-pci") return true;
    return false;
  }
  bool noiommu_param() const {
    auto it = files_.find(kNoiommuParam);
    return it != files_.end() && !it->second.empty() && (it->second[0] == 'Y' || it->second[0] == '1');
  }
  // Binding and unbinding vfio-pci, with the no-IOMMU group vfio creates in
  // its probe (vfio_noiommu_group_alloc) and removes again on release.
  void attach(const std::string& bdf, const std::string& drv) {
    set_driver(bdf, drv);
    FakePciDevice& d = devices_.at(bdf);
    if (drv == "vfio-pci" && !d.iommu_group && noiommu_param() && noiommu_probe_creates_group) {
      const unsigned g = next_noiommu_group++;
      d.iommu_group = g;
      noiommu_groups.insert(g);
      links_[dev_dir(bdf) + "/iommu_group"] = "../../../../kernel/iommu_groups/" + std::to_string(g);
    }
  }
  void detach(const std::string& bdf) {
    const bool was_vfio = driver_of(bdf) == "vfio-pci";
    set_driver(bdf, "");
    FakePciDevice& d = devices_.at(bdf);
    if (was_vfio && d.iommu_group && noiommu_groups.count(*d.iommu_group)) {
      noiommu_groups.erase(*d.iommu_group);
      d.iommu_group.reset();
      links_.erase(dev_dir(bdf) + "/iommu_group");
    }
  }

  int add_fd(FdKind kind, std::string name, bool real, int fd) {
    if (open_.count(fd)) {  // a real fd number colliding with a virtual one cannot happen; guard anyway
      events_.push_back("fd number reused while open: " + std::to_string(fd));
    }
    fds_.push_back(FdRecord{fd, kind, name, real, 0});
    open_[fd] = fds_.size() - 1;
    events_.push_back("open " + name);
    return fd;
  }
  int fail(int err, const std::string& what) {
    events_.push_back(what + " failed");
    errno = err;
    return -1;
  }
  static int errno_ret(int err) {
    errno = err;
    return -1;
  }

  // sysfs attribute semantics; p is resolved. Returns 0 or an errno value.
  int do_write(const std::string& p, const std::string& text) {
    const std::string bdf_arg = text.size() && text.back() == '\n' ? text.substr(0, text.size() - 1) : text;
    if (p == "/sys/bus/pci/drivers_probe") {
      auto it = devices_.find(bdf_arg);
      if (it == devices_.end()) return ENODEV;
      if (!driver_of(bdf_arg).empty()) return 0;
      const std::string ovr = override_of(bdf_arg);
      const std::string want = ovr.empty() ? it->second.probe_driver : ovr;
      if (!want.empty() && dirs_.count("/sys/bus/pci/drivers/" + want) &&
          !(want == "vfio-pci" && it->second.vfio_refuses))
        attach(bdf_arg, want);
      return 0;  // a probe that binds nothing is not an error
    }
    const std::string drivers = "/sys/bus/pci/drivers/";
    if (p.rfind(drivers, 0) == 0 && (basename(p) == "bind" || basename(p) == "unbind")) {
      const std::string drv = basename(parent(p));
      if (!dirs_.count(parent(p))) return ENOENT;
      auto it = devices_.find(bdf_arg);
      if (it == devices_.end()) return ENODEV;
      if (basename(p) == "unbind") {
        if (driver_of(bdf_arg) != drv) return ENODEV;
        detach(bdf_arg);
        return 0;
      }
      const std::string ovr = override_of(bdf_arg);
      if (!driver_of(bdf_arg).empty() || (!ovr.empty() && ovr != drv) ||
          (drv == "vfio-pci" && it->second.vfio_refuses))
        return ENODEV;
      attach(bdf_arg, drv);
      return 0;
    }
    if (p.rfind("/sys/bus/pci/devices/", 0) == 0 && basename(p) == "driver_override") {
      if (!files_.count(p)) return ENOENT;
      files_[p] = bdf_arg.empty() ? "(null)\n" : bdf_arg + "\n";
      return 0;
    }
    if (dirs_.count(p)) return EISDIR;
    if (files_.count(p)) {
      files_[p] = text;
      return 0;
    }
    if (p.rfind("/sys/", 0) == 0) return ENOENT;  // sysfs files cannot be created
    if (!dirs_.count(parent(p))) return ENOENT;
    files_[p] = text;
    return 0;
  }
  std::string override_of(const std::string& bdf) const {
    auto it = files_.find(dev_dir(bdf) + "/driver_override");
    if (it == files_.end()) return "";
    std::string v = it->second;
    while (!v.empty() && v.back() == '\n') v.pop_back();
    return v == "(null)" ? "" : v;
  }

  ssize_t pagemap_read(void* buf, std::size_t len, off_t off) {
    if (len != 8 || off % 8 != 0) return errno_ret(EINVAL);
    std::uint64_t entry = 0;
    const std::uint64_t vpn = static_cast<std::uint64_t>(off) / 8;
    if (pagemap == Pagemap::visible)
      entry = (std::uint64_t{1} << 63) | (pagemap_pfn_base + vpn);
    else
      entry = std::uint64_t{1} << 63;  // unprivileged readers see present pages with PFN 0
    std::memcpy(buf, &entry, 8);
    return 8;
  }

  ssize_t region_rw(int fd, bool write, void* buf, std::size_t len, std::uint64_t off) {
    FakePciDevice& d = devices_.at(device_fds_.at(fd));
    const std::uint64_t index = off >> kRegionShift;
    const std::uint64_t within = off & ((std::uint64_t{1} << kRegionShift) - 1);
    RegionIo io{write, open_record(fd)->name, off, {}};
    if (index >= d.regions.size() || d.regions[index].refuse) return errno_ret(EINVAL);
    FakeRegion& reg = d.regions[index];
    if (within >= reg.mem.size()) return errno_ret(EINVAL);
    const std::size_t n = std::min<std::size_t>(len, reg.mem.size() - within);
    if (index == VFIO_PCI_CONFIG_REGION_INDEX && !write && within + n > d.config_read_limit)
      return errno_ret(EIO);
    auto* bytes = static_cast<std::uint8_t*>(buf);
    if (write) {
      std::memcpy(reg.mem.data() + within, bytes, n);
    } else {
      std::memcpy(bytes, reg.mem.data() + within, n);
    }
    io.data.assign(bytes, bytes + n);
    region_io_.push_back(std::move(io));
    return static_cast<ssize_t>(n);
  }

  // ---- ioctl handlers ----
  template <class T>
  static T load(const void* arg) {
    T v{};
    std::memcpy(&v, arg, sizeof v);
    return v;
  }
  template <class T>
  static void store(void* arg, const T& v, std::size_t n = sizeof(T)) {
    std::memcpy(arg, &v, n);
  }

  int container_ioctl(int fd, unsigned long request, void* arg) {
    Container& c = containers_.at(fd);
    const auto value = reinterpret_cast<unsigned long>(arg);
    switch (request) {
      case VFIO_GET_API_VERSION:
        return api_version;
      case VFIO_CHECK_EXTENSION:
        return extensions.count(value) ? 1 : 0;
      case VFIO_SET_IOMMU: {
        if (c.groups.empty()) return errno_ret(EINVAL);  // needs a group first
        if (c.iommu != 0) return errno_ret(EBUSY);
        if (!extensions.count(value)) return errno_ret(EINVAL);
        if (set_iommu_errno != 0) return errno_ret(set_iommu_errno);
        c.iommu = value;
        return 0;
      }
      case VFIO_IOMMU_GET_INFO:
        return iommu_get_info(c, arg);
      case VFIO_IOMMU_MAP_DMA: {
        if (c.iommu != VFIO_TYPE1_IOMMU && c.iommu != VFIO_TYPE1v2_IOMMU) return errno_ret(EINVAL);
        auto m = load<vfio_iommu_type1_dma_map>(arg);
        if (m.argsz < sizeof m) return errno_ret(EINVAL);
        DmaMap rec{m.vaddr, m.iova, m.size, m.flags};
        dma_maps_.push_back(rec);
        if (map_dma_errno != 0) return errno_ret(map_dma_errno);
        if (m.size == 0 || ((m.size | m.iova | m.vaddr) & 0xfff) != 0) return errno_ret(EINVAL);
        if (m.iova + m.size - 1 < m.iova) return errno_ret(EINVAL);
        bool inside = iova_ranges.empty();
        for (const auto& r : iova_ranges)
          if (m.iova >= r.start && m.iova + m.size - 1 <= r.end) inside = true;
        if (!inside) return errno_ret(EINVAL);
        for (const auto& e : c.maps)
          if (m.iova < e.iova + e.size && e.iova < m.iova + m.size) return errno_ret(EEXIST);
        c.maps.push_back(rec);
        return 0;
      }
      case VFIO_IOMMU_UNMAP_DMA: {
        auto u = load<vfio_iommu_type1_dma_unmap>(arg);
        if (u.argsz < offsetof(vfio_iommu_type1_dma_unmap, size) + sizeof u.size) return errno_ret(EINVAL);
        dma_unmaps_.push_back({u.iova, u.size});
        const std::uint64_t iova = u.iova, size = u.size;
        auto it = std::find_if(c.maps.begin(), c.maps.end(),
                               [&](const DmaMap& e) { return e.iova == iova && e.size == size; });
        if (it != c.maps.end()) c.maps.erase(it);
        return 0;
      }
      default:
        return errno_ret(ENOTTY);
    }
  }

  int iommu_get_info(Container& c, void* arg) {
    if (c.iommu != VFIO_TYPE1_IOMMU && c.iommu != VFIO_TYPE1v2_IOMMU) return errno_ret(EINVAL);
    constexpr std::size_t min_pgsizes = offsetof(vfio_iommu_type1_info, iova_pgsizes) + 8;
    constexpr std::size_t min_capoff = offsetof(vfio_iommu_type1_info, cap_offset) + 4;
    vfio_iommu_type1_info info{};
    std::memcpy(&info, arg, min_pgsizes);
    get_info_argsz_.push_back(info.argsz);
    if (info.argsz < min_pgsizes) return errno_ret(EINVAL);
    const std::size_t minsz = info.argsz >= min_capoff ? min_capoff : min_pgsizes;
    info.flags = VFIO_IOMMU_INFO_PGSIZES;
    info.iova_pgsizes = 0x40201000;  // 4K | 2M | 1G
    info.cap_offset = 0;
    std::vector<std::uint8_t> caps = report_iova_caps ? build_caps() : std::vector<std::uint8_t>{};
    if (!caps.empty()) {
      info.flags |= VFIO_IOMMU_INFO_CAPS;
      if (info.argsz < sizeof info + caps.size()) {
        info.argsz = static_cast<std::uint32_t>(sizeof info + caps.size());
      } else {
        std::memcpy(static_cast<std::uint8_t*>(arg) + sizeof info, caps.data(), caps.size());
        info.cap_offset = sizeof info;
      }
    }
    std::memcpy(arg, &info, minsz);
    return 0;
  }

  // The chain as vfio_iommu_type1 builds it: migration, DMA-avail, IOVA
  // ranges, each 8-byte aligned; `next` offsets are from the start of the
  // info struct (vfio_info_cap_shift).
  std::vector<std::uint8_t> build_caps() const {
    std::vector<std::uint8_t> out;
    std::size_t prev = SIZE_MAX;
    auto add = [&](const void* p, std::size_t n) {
      const std::size_t at = out.size();
      out.resize(at + ((n + 7) & ~std::size_t{7}), 0);
      std::memcpy(out.data() + at, p, n);
      if (prev != SIZE_MAX) {
        const auto next = static_cast<std::uint32_t>(sizeof(vfio_iommu_type1_info) + at);
        std::memcpy(out.data() + prev + offsetof(vfio_info_cap_header, next), &next, 4);
      }
      prev = at;
    };
    if (extra_iommu_caps) {
      vfio_iommu_type1_info_cap_migration mig{};
      mig.header.id = VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION;
      mig.header.version = 1;
      mig.pgsize_bitmap = 0x1000;
      mig.max_dirty_bitmap_size = 256ull << 20;
      add(&mig, sizeof mig);
      vfio_iommu_type1_info_dma_avail avail{};
      avail.header.id = VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL;
      avail.header.version = 1;
      avail.avail = 65535;
      add(&avail, sizeof avail);
    }
    std::vector<std::uint8_t> iova(sizeof(vfio_iommu_type1_info_cap_iova_range) +
                                   iova_ranges.size() * sizeof(vfio_iova_range));
    vfio_iommu_type1_info_cap_iova_range hdr{};
    hdr.header.id = VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE;
    hdr.header.version = 1;
    hdr.nr_iovas = static_cast<std::uint32_t>(iova_ranges.size());
    std::memcpy(iova.data(), &hdr, sizeof hdr);
    for (std::size_t i = 0; i < iova_ranges.size(); ++i) {
      vfio_iova_range r{iova_ranges[i].start, iova_ranges[i].end};
      std::memcpy(iova.data() + sizeof hdr + i * sizeof r, &r, sizeof r);
    }
    add(iova.data(), iova.size());
    return out;
  }

  int group_ioctl(int fd, unsigned long request, void* arg) {
    Group& g = groups_.at(fd);
    switch (request) {
      case VFIO_GROUP_GET_STATUS: {
        auto s = load<vfio_group_status>(arg);
        if (s.argsz < sizeof s) return errno_ret(EINVAL);
        s.flags = 0;
        if (!nonviable_groups.count(g.group)) s.flags |= VFIO_GROUP_FLAGS_VIABLE;
        if (g.container >= 0) s.flags |= VFIO_GROUP_FLAGS_CONTAINER_SET;
        store(arg, s);
        return 0;
      }
      case VFIO_GROUP_SET_CONTAINER: {
        const int cfd = load<int>(arg);
        if (g.container >= 0) return errno_ret(EINVAL);
        if (nonviable_groups.count(g.group)) return errno_ret(EPERM);
        auto it = containers_.find(cfd);
        if (it == containers_.end()) return errno_ret(EBADF);
        g.container = cfd;
        it->second.groups.push_back(fd);
        return 0;
      }
      case VFIO_GROUP_GET_DEVICE_FD: {
        if (g.container < 0 || containers_.at(g.container).iommu == 0) return errno_ret(EINVAL);
        const std::string name(static_cast<const char*>(arg));
        auto it = devices_.find(name);
        if (it == devices_.end() || !it->second.iommu_group || *it->second.iommu_group != g.group ||
            driver_of(name) != "vfio-pci")
          return errno_ret(ENODEV);
        int dfd = add_fd(FdKind::device, "device " + name, false, next_virtual_++);
        device_fds_[dfd] = name;
        return dfd;
      }
      default:
        return errno_ret(ENOTTY);
    }
  }

  int device_ioctl(int fd, unsigned long request, void* arg) {
    FakePciDevice& d = devices_.at(device_fds_.at(fd));
    switch (request) {
      case VFIO_DEVICE_GET_INFO: {
        auto info = load<vfio_device_info>(arg);
        if (info.argsz < offsetof(vfio_device_info, num_irqs) + 4) return errno_ret(EINVAL);
        info.flags = d.device_flags;
        info.num_regions = VFIO_PCI_NUM_REGIONS;
        info.num_irqs = VFIO_PCI_NUM_IRQS;
        store(arg, info, offsetof(vfio_device_info, num_irqs) + 4);
        return 0;
      }
      case VFIO_DEVICE_GET_REGION_INFO: {
        auto ri = load<vfio_region_info>(arg);
        if (ri.argsz < offsetof(vfio_region_info, offset) + 8) return errno_ret(EINVAL);
        if (ri.index >= d.regions.size() || d.regions[ri.index].refuse) return errno_ret(EINVAL);
        const FakeRegion& reg = d.regions[ri.index];
        ri.offset = region_offset(ri.index);
        ri.size = reg.mem.size();
        ri.flags = reg.mem.empty() ? 0 : reg.flags;
        ri.cap_offset = 0;
        store(arg, ri, offsetof(vfio_region_info, offset) + 8);
        return 0;
      }
      case VFIO_DEVICE_GET_IRQ_INFO: {
        auto ii = load<vfio_irq_info>(arg);
        if (ii.argsz < sizeof ii) return errno_ret(EINVAL);
        if (ii.index >= d.irq_counts.size()) return errno_ret(EINVAL);
        ii.count = d.irq_counts[ii.index];
        ii.flags = VFIO_IRQ_INFO_EVENTFD;
        if (ii.index == VFIO_PCI_INTX_IRQ_INDEX)
          ii.flags |= VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED;
        else
          ii.flags |= VFIO_IRQ_INFO_NORESIZE;
        store(arg, ii);
        return 0;
      }
      case VFIO_DEVICE_SET_IRQS: {
        auto s = load<vfio_irq_set>(arg);
        IrqSet rec{s.argsz, s.flags, s.index, s.start, s.count, {}};
        if (s.argsz < sizeof s) {
          irq_sets_.push_back(rec);
          return errno_ret(EINVAL);
        }
        if ((s.flags & VFIO_IRQ_SET_DATA_EVENTFD) != 0) {
          if (s.argsz < sizeof s + std::size_t{s.count} * 4) {
            irq_sets_.push_back(rec);
            return errno_ret(EINVAL);
          }
          for (std::uint32_t i = 0; i < s.count; ++i)
            rec.fds.push_back(load<std::int32_t>(static_cast<const std::uint8_t*>(arg) + sizeof s + i * 4));
        }
        irq_sets_.push_back(rec);
        if (set_irqs_errno != 0) return errno_ret(set_irqs_errno);
        if (s.index >= d.irq_counts.size() || s.start + s.count > d.irq_counts[s.index])
          return errno_ret(EINVAL);
        for (int efd : rec.fds) {
          const FdRecord* er = open_record(efd);
          if (er == nullptr || er->kind != FdKind::eventfd) return errno_ret(EBADF);
        }
        return 0;
      }
      case VFIO_DEVICE_RESET:
        return 0;
      default:
        return errno_ret(ENOTTY);
    }
  }

  // Filesystem.
  std::set<std::string> dirs_;
  std::map<std::string, std::string> files_;
  std::map<std::string, std::string> links_;  // path -> raw target
  std::vector<std::pair<std::string, int>> write_failures_;
  std::map<std::string, int> mkdir_failures_;
  std::map<std::string, FakePciDevice> devices_;

  // Fds.
  int next_virtual_ = 1 << 20;  // far above any real fd this process opens
  std::vector<FdRecord> fds_;
  std::map<int, std::size_t> open_;
  std::vector<int> bad_closes_;
  std::vector<std::string> close_order_;
  std::map<int, Container> containers_;
  std::map<int, Group> groups_;
  std::map<int, std::string> device_fds_;
  std::map<int, std::string> file_fds_;
  std::set<int> huge_fds_;

  // Mappings.
  std::map<void*, std::pair<std::size_t, std::string>> fake_maps_;
  std::map<void*, std::size_t> real_maps_;

  // Logs.
  std::vector<std::string> events_;
  std::vector<Write> writes_;
  std::vector<std::string> mkdirs_;
  std::vector<IoctlCall> ioctls_;
  std::vector<std::uint32_t> get_info_argsz_;
  std::vector<DmaMap> dma_maps_;
  std::vector<DmaUnmap> dma_unmaps_;
  std::vector<IrqSet> irq_sets_;
  std::vector<RegionIo> region_io_;
  std::vector<MmapCall> mmaps_;
  std::vector<std::string> munmaps_;
  std::vector<unsigned> memfd_flags_;
  std::vector<std::pair<const void*, std::size_t>> mlocks_;
};

}  // namespace uvirtio::test
