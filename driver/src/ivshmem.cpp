// ivshmem driver: see ivshmem.hpp.
#include "uvirtio/driver/ivshmem.hpp"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

#include "uvirtio/base/hex.hpp"
#include "uvirtio/pci/discovery.hpp"

namespace uvirtio::driver {
namespace {

// Wakes the peer through our device's Doorbell register and sleeps on our
// vector's eventfd. The peer id comes from the shared window (the channel
// publishes it), so it is checked against the register's 16 bits.
class IvshmemDoorbell final : public channel::Doorbell {
 public:
  IvshmemDoorbell(Ivshmem& dev, unsigned vector) : dev_(dev), vector_(vector) {}
  Result<void> ring(std::uint32_t peer_id) override { return dev_.ring(peer_id, vector_); }
  Result<bool> wait(std::chrono::nanoseconds timeout) override { return dev_.wait(vector_, timeout); }

 private:
  Ivshmem& dev_;
  unsigned vector_;
};

}  // namespace

Result<std::unique_ptr<Ivshmem>> Ivshmem::open(const pci::Bdf& bdf, const IvshmemOptions& options) {
  UV_TRY(pci::FunctionInfo info, pci::describe_function(bdf));
  if (info.vendor != kIvshmemVendor || info.device != kIvshmemDevice)
    return Error(Errc::invalid_argument, bdf.str(), "open ivshmem",
                 "not an ivshmem function (it is " + hex(info.vendor) + ":" + hex(info.device) +
                     ", ivshmem is 1af4:1110)");
  if (info.driver != "vfio-pci")
    return Error(Errc::invalid_argument, bdf.str(), "open ivshmem",
                 "bound to driver '" + (info.driver.empty() ? std::string("none") : info.driver) +
                     "', not vfio-pci (run 'uvirtio bind " + bdf.str() + "')");
  pci::VfioOptions vopts;
  vopts.mode = options.iommu;
  UV_TRY(std::unique_ptr<pci::VfioDevice> vfio, pci::VfioDevice::open(bdf, vopts));
  return attach(std::move(vfio), options);
}

Result<std::unique_ptr<Ivshmem>> Ivshmem::attach(std::unique_ptr<pci::Function> fn,
                                                 const IvshmemOptions& options) {
  std::unique_ptr<Ivshmem> dev(new Ivshmem(std::move(fn)));
  UV_TRY_VOID(dev->init(options));
  return dev;
}

Ivshmem::~Ivshmem() {
  if (!eventfds_.empty()) (void)fn_->disable_irqs();
}

Result<void> Ivshmem::init(const IvshmemOptions& options) {
  const std::string& name = fn_->bdf();
  std::uint8_t id[4];
  UV_TRY_VOID(fn_->read_config(0, id));
  const unsigned vendor = id[0] | (id[1] << 8), device = id[2] | (id[3] << 8);
  if (vendor != kIvshmemVendor || device != kIvshmemDevice)
    return Error(Errc::invalid_argument, name, "open ivshmem",
                 "config space says " + hex(vendor) + ":" + hex(device) + ", not 1af4:1110");

  auto regs = fn_->bar(0);
  if (!regs) return regs.error().within("open ivshmem: BAR0 (registers)");
  if ((*regs)->size() < ivshmem_reg::kMinBar0)
    return Error(Errc::bad_device_data, name, "open ivshmem",
                 "BAR0 is " + hex((*regs)->size()) + " bytes, the registers need 0x10");
  regs_ = *regs;

  auto mem = fn_->bar(2);
  if (!mem) return mem.error().within("open ivshmem: BAR2 (shared memory)");
  if ((*mem)->size() == 0)
    return Error(Errc::bad_device_data, name, "open ivshmem", "BAR2 (shared memory) is empty");
  if ((*mem)->mapping() == nullptr)
    return Error(Errc::unsupported, name, "open ivshmem",
                 "BAR2 (shared memory) cannot be mmapped through VFIO; the channel needs a mapping");
  // The window is ordinary RAM on the host side (QEMU maps the shared memory
  // object into the guest as a RAM BAR), so plain loads, stores and atomics
  // are what both peers use.
  shm_ = const_cast<std::uint8_t*>((*mem)->mapping());
  shm_size_ = (*mem)->size();

  // Only ivshmem-doorbell has MSI-X (its vectors come from the server); its
  // IVPosition is our peer id. ivshmem-plain has neither.
  const unsigned nvec = fn_->irq_count(pci::IrqKind::msix);
  if (nvec > 0) {
    UV_TRY(std::uint64_t pos, regs_->read(ivshmem_reg::kIvPosition, 4));
    if (pos > 0xffff)
      return Error(Errc::bad_device_data, name, "open ivshmem",
                   "IVPosition " + hex(pos) +
                       " is not a peer id (the device has no connection to an ivshmem server?)");
    position_ = static_cast<std::uint16_t>(pos);
    if (options.interrupts) {
      auto fds = fn_->enable_irqs(pci::IrqKind::msix, nvec);
      if (!fds) return fds.error().within("open ivshmem: route MSI-X vectors");
      eventfds_ = std::move(*fds);
      interrupts_ = std::vector<std::atomic<std::uint64_t>>(eventfds_.size());
      // A send and a receive may sleep on one vector at once: one interrupt
      // wakes both pollers and only one gets the count, so the other's read
      // must fail with EAGAIN rather than block until some later interrupt.
      for (int fd : eventfds_) {
        const int fl = ::fcntl(fd, F_GETFL);
        if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
          return Error::from_errno(errno, name, "open ivshmem", "make the MSI-X eventfds non-blocking");
      }
    }
  }
  return ok();
}

Result<void> Ivshmem::ring(std::uint32_t peer, std::uint32_t vector) {
  if (!position_) return Error(Errc::unsupported, bdf(), "ring doorbell", "ivshmem-plain has no doorbell");
  if (peer > 0xffff)
    return Error(Errc::invalid_argument, bdf(), "ring doorbell",
                 "peer id " + std::to_string(peer) + " does not fit the 16-bit doorbell field");
  if (vector > 0xffff)
    return Error(Errc::invalid_argument, bdf(), "ring doorbell",
                 "vector " + std::to_string(vector) + " does not fit the 16-bit doorbell field");
  return regs_->write(ivshmem_reg::kDoorbell, 4, (std::uint64_t{peer} << 16) | vector);
}

Result<bool> Ivshmem::wait(unsigned vector, std::chrono::nanoseconds timeout) {
  if (vector >= eventfds_.size())
    return Error(Errc::invalid_argument, bdf(), "wait for doorbell",
                 "vector " + std::to_string(vector) + " is not routed (" + std::to_string(eventfds_.size()) +
                     " vectors)");
  const int fd = eventfds_[vector];
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(timeout).count();
  if (ms < 0) ms = 0;
  pollfd p{fd, POLLIN, 0};
  int rc;
  do {
    rc = ::poll(&p, 1, static_cast<int>(ms > 0x7fffffff ? 0x7fffffff : ms));
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) return Error::from_errno(errno, bdf(), "wait for doorbell", "poll eventfd");
  if (rc == 0) return false;
  std::uint64_t count = 0;
  if (::read(fd, &count, sizeof count) != sizeof count) {
    if (errno == EAGAIN) return false;
    return Error::from_errno(errno, bdf(), "wait for doorbell", "read eventfd");
  }
  interrupts_[vector].fetch_add(count, std::memory_order_relaxed);
  return true;
}

std::uint64_t Ivshmem::interrupts(unsigned vector) const {
  return vector < interrupts_.size() ? interrupts_[vector].load(std::memory_order_relaxed) : 0;
}

Result<std::unique_ptr<channel::Doorbell>> Ivshmem::doorbell(unsigned vector) {
  if (!position_)
    return Error(Errc::unsupported, bdf(), "doorbell",
                 "ivshmem-plain has no doorbell; use the channel in polling mode");
  if (vector >= eventfds_.size())
    return Error(Errc::unsupported, bdf(), "doorbell",
                 "vector " + std::to_string(vector) + " has no interrupt routed (" +
                     std::to_string(eventfds_.size()) + " vectors)");
  return std::unique_ptr<channel::Doorbell>(new IvshmemDoorbell(*this, vector));
}

}  // namespace uvirtio::driver
