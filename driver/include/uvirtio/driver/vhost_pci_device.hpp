// The vhost-pci device model (doc/vhost-pci.md). vhost-pci was never merged
// into QEMU, so uvirtio provides the device side too: a vhost-user back-end
// for a front-end's virtio-net (a QEMU guest with -netdev vhost-user, or
// DPDK's virtio-user) that presents what the front-end shares as a vhost-pci
// function through pci::Function (a SoftFunction), the same interface VFIO
// implements, so the driver above it is unchanged from the VFIO case.
//
// The function (SoftVirtioDevice, virtio-pci modern layout):
//   BAR4            common config, ISR, device config (vhost_pci::Config), notify
//   BAR1            MSI-X table; vectors 0 config, 1 controlq, 2 ackq, 3.. remote kicks
//   BAR0            doorbells: a 32-bit write at 4*i signals the front-end's
//                   call eventfd of its queue i
//   BAR2            memory: the front-end's memory regions mapped (MAP_SHARED,
//                   from the fds SET_MEM_TABLE passed) at the offsets
//                   MEMORY_INFO announces; the rest reads as zeros
//   queue 0         controlq, device to driver; queue 1 ackq (VHOST_PCI_F_ACKQ)
//
// The spec's initialisation, driven when the front-end's rings all run and
// the driver is at DRIVER_OK: MEMORY_INFO ADD -> ack; FEATURE_BITS (what the
// front-end acknowledged) -> accepted bits (bits beyond the offer, or a
// flood of config acks, are a driver protocol violation: DEVICE_NEEDS_RESET,
// nothing announced until the driver resets); if the driver accepted fewer,
// the front-end must renegotiate: the session is ended and the next
// GET_FEATURES offers only the accepted bits (QEMU's reconnect=N comes back);
// DEVICE_INFO ADD (the front-end's rings in guest-physical addresses, with
// its kick eventfds routed onto MSI-X vectors and call eventfds behind the
// doorbells) -> ack; UPDATE_DONE (not with ACKQ). When the front-end
// disconnects or its rings change, DEVICE_INFO DEL -> ack and MEMORY_INFO DEL
// -> ack come first; the next front-end is then accepted and announced.
//
// Threading: run() on a thread of its own; the driver runs on another. The
// register hooks (on the driver's thread) only record and wake run().
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "uvirtio/base/result.hpp"
#include "uvirtio/driver/vhost_pci.hpp"
#include "uvirtio/pci/function.hpp"

namespace uvirtio::driver::vhost_pci {

struct DeviceOptions {
  std::string bdf = "0000:00:10.0";  // the function's name in errors
  std::uint16_t virtio_id = kDefaultVirtioId;
  std::string socket;                           // vhost-user socket we listen on
  std::uint64_t net_features = 0;               // virtio-net features offered to the front-end
  std::uint64_t device_id = 0;                  // DEVICE_INFO device_id (net: the front-end's MAC)
  bool offer_ackq = true;                       // offer VHOST_PCI_F_ACKQ
  std::uint64_t memory_bar_size = 16ull << 30;  // address space reserved for BAR2
  std::chrono::milliseconds ack_timeout{3000};  // a driver slower than this is reported
  std::function<void(const std::string&)> log;  // one line per protocol step; optional
};

class DeviceModel {
 public:
  static Result<std::unique_ptr<DeviceModel>> create(DeviceOptions options);
  ~DeviceModel();
  DeviceModel(const DeviceModel&) = delete;
  DeviceModel& operator=(const DeviceModel&) = delete;

  // The function for the driver (Driver::open); this model must outlive it.
  std::unique_ptr<pci::Function> function();

  // Serves front-ends and the driver until `stop_fd` becomes readable.
  Result<void> run(int stop_fd);

  struct Stats {
    std::uint64_t sessions = 0;   // front-ends accepted
    std::uint64_t announced = 0;  // remote devices the driver acked (ADD_DONE)
    std::uint64_t withdrawn = 0;  // DEVICE_INFO DEL acked
    std::uint64_t refusals = 0;   // FAIL acks, feature subsets
    std::uint64_t frontend_errors = 0;
    std::uint64_t driver_errors = 0;  // protocol violations: the driver was set DEVICE_NEEDS_RESET
  };
  Stats stats() const;

 private:
  struct Impl;
  explicit DeviceModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace uvirtio::driver::vhost_pci
