// PCI function discovery with libpci, plus sysfs look-ups through Os.
#include "uvirtio/pci/discovery.hpp"

#include <algorithm>
#include <csetjmp>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <tuple>

extern "C" {
#include <pci/pci.h>
}

namespace uvirtio::pci {
namespace {

std::string sysfs_dir(const Bdf& bdf) { return "/sys/bus/pci/devices/" + bdf.str(); }

std::string basename_of(const std::string& path) {
  auto pos = path.rfind('/');
  return pos == std::string::npos ? path : path.substr(pos + 1);
}

// libpci reports fatal errors through a callback that must not return. We
// jump back out of the scan; the frame between setjmp and longjmp holds only
// trivially destructible objects (see scan_raw).
thread_local std::jmp_buf* g_pci_jmp = nullptr;
thread_local char g_pci_msg[256];

__attribute__((noreturn)) void pci_error(char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(g_pci_msg, sizeof g_pci_msg, fmt, ap);
  va_end(ap);
  if (g_pci_jmp != nullptr) std::longjmp(*g_pci_jmp, 1);
  std::_Exit(70);  // unreachable: scan_raw always sets the jump buffer
}
void pci_quiet(char*, ...) {}

struct RawDev {
  std::uint16_t domain;
  std::uint8_t bus, dev, func, rev;
  std::uint16_t vendor, device, subsys_vendor, subsys_device;
  std::uint32_t class_code;
};

// Returns the number of devices written to out (at most cap), or -1 on a libpci error.
int scan_raw(RawDev* out, int cap) {
  std::jmp_buf jb;
  pci_access* pacc = pci_alloc();
  pacc->error = pci_error;
  pacc->warning = pci_quiet;
  pacc->debug = pci_quiet;
  pacc->method = PCI_ACCESS_SYS_BUS_PCI;
  g_pci_jmp = &jb;
  if (setjmp(jb) != 0) {
    g_pci_jmp = nullptr;
    return -1;  // pacc leaks on this path; libpci has no safe way to free it here
  }
  pci_init(pacc);
  pci_scan_bus(pacc);
  int n = 0;
  for (pci_dev* d = pacc->devices; d != nullptr && n < cap; d = d->next) {
    pci_fill_info(d, PCI_FILL_IDENT | PCI_FILL_CLASS | PCI_FILL_CLASS_EXT | PCI_FILL_SUBSYS);
    RawDev& r = out[n++];
    r.domain = static_cast<std::uint16_t>(d->domain);
    r.bus = d->bus;
    r.dev = d->dev;
    r.func = d->func;
    r.rev = d->rev_id;
    r.vendor = d->vendor_id;
    r.device = d->device_id;
    r.subsys_vendor = d->subsys_vendor_id;
    r.subsys_device = d->subsys_id;
    r.class_code = (static_cast<std::uint32_t>(d->device_class) << 8) | d->prog_if;
  }
  pci_cleanup(pacc);
  g_pci_jmp = nullptr;
  return n;
}

}  // namespace

std::string sysfs_driver(const Bdf& bdf, Os& os) {
  auto link = os.readlink(sysfs_dir(bdf) + "/driver");
  return link ? basename_of(*link) : std::string();
}

std::optional<unsigned> sysfs_iommu_group(const Bdf& bdf, Os& os) {
  auto link = os.readlink(sysfs_dir(bdf) + "/iommu_group");
  if (!link) return std::nullopt;
  std::string name = basename_of(*link);
  if (name.empty() || name.size() > 9 ||
      !std::all_of(name.begin(), name.end(), [](unsigned char c) { return c >= '0' && c <= '9'; }))
    return std::nullopt;
  return static_cast<unsigned>(std::stoul(name));
}

Result<std::vector<FunctionInfo>> enumerate_functions(Os& os) {
  if (!os.exists("/sys/bus/pci/devices"))
    return Error(Errc::not_found, "pci", "enumerate functions",
                 "/sys/bus/pci/devices is missing (sysfs not mounted?)");
  std::vector<RawDev> raw(4096);
  int n = scan_raw(raw.data(), static_cast<int>(raw.size()));
  if (n < 0) return Error(Errc::io, "pci", "enumerate functions (libpci)", g_pci_msg);
  std::vector<FunctionInfo> out;
  for (int i = 0; i < n; ++i) {
    const RawDev& r = raw[static_cast<std::size_t>(i)];
    FunctionInfo f;
    f.bdf = Bdf{r.domain, r.bus, r.dev, r.func};
    f.vendor = r.vendor;
    f.device = r.device;
    f.subsys_vendor = r.subsys_vendor;
    f.subsys_device = r.subsys_device;
    f.class_code = r.class_code;
    f.revision = r.rev;
    f.driver = sysfs_driver(f.bdf, os);
    f.iommu_group = sysfs_iommu_group(f.bdf, os);
    out.push_back(std::move(f));
  }
  std::sort(out.begin(), out.end(), [](const FunctionInfo& a, const FunctionInfo& b) {
    return std::tie(a.bdf.domain, a.bdf.bus, a.bdf.device, a.bdf.function) <
           std::tie(b.bdf.domain, b.bdf.bus, b.bdf.device, b.bdf.function);
  });
  return out;
}

Result<FunctionInfo> describe_function(const Bdf& bdf, Os& os) {
  const std::string dir = sysfs_dir(bdf);
  if (!os.exists(dir))
    return Error(Errc::not_found, bdf.str(), "describe function",
                 "no such PCI function (" + dir + " is missing)");
  auto hex = [&](const char* attr, std::uint32_t max) -> Result<std::uint32_t> {
    auto text = os.read_file(dir + "/" + attr);
    if (!text) return Error::from_errno(errno, bdf.str(), std::string("read ") + attr);
    while (!text->empty() && (text->back() == '\n' || text->back() == ' ')) text->pop_back();
    char* end = nullptr;
    errno = 0;
    unsigned long v = std::strtoul(text->c_str(), &end, 16);
    if (end == text->c_str() || *end != '\0' || errno != 0 || v > max)
      return Error(Errc::bad_device_data, bdf.str(), std::string("read ") + attr,
                   "unparsable value '" + *text + "'");
    return static_cast<std::uint32_t>(v);
  };
  FunctionInfo f;
  f.bdf = bdf;
  UV_TRY(auto vendor, hex("vendor", 0xffff));
  UV_TRY(auto device, hex("device", 0xffff));
  UV_TRY(auto sv, hex("subsystem_vendor", 0xffff));
  UV_TRY(auto sd, hex("subsystem_device", 0xffff));
  UV_TRY(auto cls, hex("class", 0xffffff));
  UV_TRY(auto rev, hex("revision", 0xff));
  f.vendor = static_cast<std::uint16_t>(vendor);
  f.device = static_cast<std::uint16_t>(device);
  f.subsys_vendor = static_cast<std::uint16_t>(sv);
  f.subsys_device = static_cast<std::uint16_t>(sd);
  f.class_code = cls;
  f.revision = static_cast<std::uint8_t>(rev);
  f.driver = sysfs_driver(bdf, os);
  f.iommu_group = sysfs_iommu_group(bdf, os);
  return f;
}

std::optional<std::uint16_t> virtio_device_id(const FunctionInfo& f) {
  if (f.vendor != kVirtioVendor) return std::nullopt;
  if (f.device >= 0x1040 && f.device <= 0x107f) return static_cast<std::uint16_t>(f.device - 0x1040);
  if (f.device >= 0x1000 && f.device <= 0x103f) return f.subsys_device;
  return std::nullopt;
}

bool is_ivshmem(const FunctionInfo& f) { return f.vendor == kVirtioVendor && f.device == 0x1110; }

bool is_modern_virtio(const FunctionInfo& f) {
  return f.vendor == kVirtioVendor && f.device >= 0x1040 && f.device <= 0x107f;
}

const char* virtio_device_name(std::uint16_t id) {
  switch (id) {
    case 1:
      return "net";
    case 2:
      return "block";
    case 3:
      return "console";
    case 4:
      return "entropy";
    case 5:
      return "balloon";
    case 8:
      return "scsi";
    case 9:
      return "9p";
    case 16:
      return "gpu";
    case 18:
      return "input";
    case 19:
      return "vsock";
    case 20:
      return "crypto";
    case 26:
      return "fs";
    case 27:
      return "pmem";
    case 28:
      return "rpmb";
    case 29:
      return "iommu";
    case 34:
      return "sound";
    case 36:
      return "memory";
    default:
      return "unknown";
  }
}

}  // namespace uvirtio::pci
