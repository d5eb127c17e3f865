// SoftVirtioDevice: a software virtio-pci modern device (virtio spec 1.2, 4.1)
// on top of SoftFunction. Unit tests use it (with `faults`) to test the
// transport and device drivers; the vhost-pci device model uses it, with
// hooks, to present its function to an unchanged driver.
//
// The layout copies QEMU's: BAR4 (0x4000 bytes) holds the common config at
// 0x0, the ISR at 0x1000, the device config at 0x2000 and the notify area at
// 0x3000 (notify_off_multiplier 4 by default, queue q at notify_off q); with
// MSI-X the table and PBA sit in BAR1. The reset-stuck fault ignores writes
// of 0 to device_status, so the status stays at its (nonzero) value.
// The device implements the common config registers (4.1.4.3), FEATURES_OK
// acceptance, config_generation, the read-to-clear ISR, and on a notify it
// plays the device side of the split ring (2.7): it walks the available
// descriptor chains through the DMA allocator's translation (an address
// outside any allocation sets DEVICE_NEEDS_RESET), lets a per-device request
// handler fill the buffers, writes the used ring and interrupts (MSI-X vector
// or INTx with ISR bit 0). Requests are processed inside the notify write, or
// on a worker thread after start_worker(). `faults` makes it misbehave.
// When the driver accepts VIRTIO_F_IN_ORDER (offer it in `features`), the
// chains one notify (or one worker pass) takes are completed as a batch with
// a single used entry (2.7.9), and a driver that does not allocate
// descriptors in ring order (2.7.5) is recorded in violations().
// The ring features the drivers use are served when offered and accepted:
// VIRTIO_F_INDIRECT_DESC (tables, also after direct descriptors, 2.7.5.3),
// VIRTIO_F_EVENT_IDX (interrupts follow used_event, and avail_event is kept
// at the next chain, 2.7.10) and VIRTIO_F_RING_PACKED. The split ring is
// walked here, independently of the rings library; a packed ring is served
// by rings::PackedDeviceQueue, so a malformed packed chain is whatever that
// queue rejects (recorded, then DEVICE_NEEDS_RESET).
// Faults that make an answer hostile (used_len_excess, bad_used_id, or a
// handler returning more than the writable bytes) write that used entry
// raw; on a packed ring the queue then serves nothing more until a reset.
//
// A device model that runs its queues itself (with rings::SplitDeviceQueue)
// sets hooks instead of a handler: notify, status and device-config-write
// hooks run on the driver's thread after the register write, outside the
// device's lock, and may call back into the device.
//
// Driver mistakes the device notices (wrong register width, clearing a status
// bit, notify before DRIVER_OK, ...) are collected in violations().
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "uvirtio/pci/soft_function.hpp"
#include "uvirtio/rings/packed_device.hpp"

namespace uvirtio::driver {

struct SoftVirtioOptions {
  std::string bdf = "0000:00:04.0";
  std::uint16_t device_type = 4;        // virtio device id (4: entropy)
  std::uint16_t pci_device_id = 0;      // 0: 0x1040 + device_type (modern)
  std::uint64_t features = 1ull << 32;  // offered; VERSION_1 only by default
  std::uint16_t num_queues = 1;
  std::uint16_t queue_max_size = 256;
  std::uint32_t notify_multiplier = 4;      // notify_off_multiplier (QEMU: 4)
  unsigned msix_vectors = 0;                // 0: no MSI-X capability (INTx only)
  bool modern_caps = true;                  // false: no virtio capabilities (legacy-only)
  std::vector<std::uint8_t> device_config;  // empty: no device-config structure
};

// One descriptor of a request chain, translated to a CPU pointer.
struct Segment {
  std::uint8_t* data = nullptr;
  std::uint32_t len = 0;
  bool writable = false;
};
// Serves one request; returns the used length (bytes written).
using RequestHandler = std::function<std::uint32_t(std::uint16_t queue, std::span<const Segment> chain)>;

// Misbehaviour switches; safe to flip from any thread.
struct Faults {
  std::atomic<bool> refuse_features_ok{false};   // clear FEATURES_OK when the driver sets it
  std::atomic<bool> reset_stuck{false};          // writing 0 to device_status does not reset
  std::atomic<bool> unstable_generation{false};  // config_generation changes on every read
  std::atomic<bool> swallow{false};  // consume requests, never complete them (split: see swallowed())
  std::atomic<bool> needs_reset_on_notify{false};
  std::atomic<std::uint32_t> used_len_excess{0};  // used len = writable bytes + this (when > 0)
  std::atomic<bool> bad_used_id{false};           // used id = queue size + 3
  // Surprise removal: common config reads return all-ones, writes are lost.
  std::atomic<bool> gone{false};
};

class SoftVirtioDevice {
 public:
  static constexpr std::uint8_t kBar = 4;
  static constexpr std::uint64_t kCommon = 0x0000, kIsr = 0x1000, kDevice = 0x2000, kNotify = 0x3000;
  static constexpr std::uint64_t kRegionSize = 0x1000, kBarSize = 0x4000;
  static constexpr std::uint16_t kNoVector = 0xffff;

  explicit SoftVirtioDevice(SoftVirtioOptions options = {});
  ~SoftVirtioDevice();
  SoftVirtioDevice(const SoftVirtioDevice&) = delete;
  SoftVirtioDevice& operator=(const SoftVirtioDevice&) = delete;

  pci::SoftFunction& function() { return fn_; }
  // A pci::Function for bring_up(); this device must outlive it.
  std::unique_ptr<pci::Function> take_function() { return pci::borrow(fn_); }
  const std::string& bdf() const { return fn_.bdf(); }

  void set_handler(RequestHandler handler);

  // Hooks for device models (see above). A notify hook replaces request
  // processing for every queue.
  void set_notify_hook(std::function<void(std::uint16_t queue)> hook);
  void set_status_hook(std::function<void(std::uint8_t status)> hook);
  void set_config_write_hook(std::function<void(std::uint32_t off, unsigned width)> hook);
  struct QueueState {
    std::uint16_t size = 0, vector = 0xffff;
    bool enabled = false;
    std::uint64_t desc = 0, driver = 0, device = 0;
  };
  QueueState queue_state(std::uint16_t q) const;
  // Interrupts for queue q as the negotiated transport says (its MSI-X
  // vector, or INTx with ISR bit 0). False when no vector is set or enabled.
  bool interrupt_queue(std::uint16_t q);
  std::vector<std::uint8_t> device_config() const;
  // From now on a notify only flags the work; a thread processes it `delay` later.
  void start_worker(std::chrono::microseconds delay = {});
  void set_worker_delay(std::chrono::microseconds delay);

  Faults faults;
  void set_needs_reset();  // sets DEVICE_NEEDS_RESET and sends a config interrupt
  // Writes a used entry naming `id` that no chain on this ring asked for, as
  // QEMU 7.2's virtio-pmem does when a flush from before a reset finishes
  // (doc/protocols.md, "Completions from before a reset"). False when queue
  // q has no split ring in DMA memory (a packed ring is not supported).
  bool complete_late(std::uint16_t q, std::uint32_t id, std::uint32_t len);
  // Chains a split ring's queue q swallowed (Faults::swallow), oldest first,
  // kept across resets as QEMU keeps a request its thread pool still runs:
  // its buffers can still be written after the driver reset the device.
  struct SwallowedChain {
    std::uint32_t head = 0;
    std::vector<Segment> chain;
  };
  std::vector<SwallowedChain> swallowed(std::uint16_t q) const;
  void set_queue_notify_off(std::uint16_t q, std::uint16_t notify_off);
  void refuse_vector(std::uint16_t vector);  // the device answers 0xffff when it is written
  // The device reads back `answer` after `vector` is written to
  // config_msix_vector or queue_msix_vector (refuse_vector: 0xffff).
  void answer_vector(std::uint16_t vector, std::uint16_t answer);
  void set_device_config(std::uint32_t off, std::span<const std::uint8_t> bytes);  // bumps config_generation

  // Observations.
  std::uint8_t status() const;
  std::vector<std::uint8_t> status_writes() const;
  std::uint64_t driver_features() const;
  std::uint16_t config_vector() const;
  std::uint16_t queue_vector(std::uint16_t q) const;
  std::uint16_t queue_size(std::uint16_t q) const;
  bool queue_enabled(std::uint16_t q) const;
  std::uint8_t isr() const;
  std::uint64_t notifies() const;
  std::uint64_t requests() const;     // chains taken off the available ring
  std::uint64_t completions() const;  // used entries written
  std::uint64_t isr_reads() const;
  std::vector<std::string> violations() const;

 private:
  struct Queue {
    std::uint16_t size = 0, vector = kNoVector, notify_off = 0, enabled = 0;
    std::uint64_t desc = 0, driver = 0, device = 0;
    std::uint16_t last_avail = 0, used_idx = 0;
    std::uint16_t next_desc = 0;                     // IN_ORDER: where the driver's next chain must start
    std::optional<rings::PackedDeviceQueue> packed;  // made at the first notify of a packed ring
    bool rogue = false;                              // a raw used descriptor went onto the packed ring
    std::vector<SwallowedChain> swallowed;           // split only; not cleared by a reset
  };

  std::uint64_t common_read(std::uint64_t off, unsigned width);
  void common_write(std::uint64_t off, unsigned width, std::uint64_t v);
  void write_status(std::uint8_t v);
  void reset_locked();
  std::uint16_t accept_vector(std::uint64_t v) const;
  Queue* selected();
  void notify(std::uint64_t off, unsigned width, std::uint64_t v);
  void process(std::uint16_t q);
  void process_split(std::uint16_t qi, Queue& q);
  void process_packed(std::uint16_t qi, Queue& q);
  void raise_queue(const Queue& q);
  bool negotiated(unsigned bit) const { return ((driver_features_ >> bit) & 1) != 0; }
  void fatal(const std::string& why);  // records it, sets NEEDS_RESET
  void needs_reset_locked();
  void violation(const std::string& what) { violations_.push_back(what); }
  bool width_is(unsigned width, unsigned want, std::uint64_t off);
  void worker_loop();

  SoftVirtioOptions opt_;
  pci::SoftFunction fn_;  // declared first so it outlives the worker thread
  mutable std::mutex mu_;
  std::condition_variable cv_;
  RequestHandler handler_;
  std::function<void(std::uint16_t)> notify_hook_;
  std::function<void(std::uint8_t)> status_hook_;
  std::function<void(std::uint32_t, unsigned)> config_write_hook_;
  std::map<std::uint16_t, std::uint16_t> vector_answers_;

  std::uint32_t feature_select_ = 0, driver_feature_select_ = 0;
  std::uint64_t driver_features_ = 0;
  std::uint16_t config_vector_ = kNoVector, queue_select_ = 0;
  std::uint8_t status_ = 0, generation_ = 0, isr_ = 0;
  std::vector<Queue> queues_;
  std::vector<std::uint8_t> config_;

  std::vector<std::uint8_t> status_writes_;
  std::vector<std::string> violations_;
  std::uint64_t notifies_ = 0, requests_ = 0, completions_ = 0, isr_reads_ = 0;

  bool threaded_ = false, pending_ = false, stop_ = false;
  std::chrono::microseconds delay_{0};
  std::thread worker_;
};

}  // namespace uvirtio::driver
