// vhost-pci (shared/seeds/vhost-pci-spec-rfc-review.txt; doc/vhost-pci.md):
// a PCI function whose memory BAR maps a remote VM's memory, and a control
// virtqueue on which the device tells the driver which memory and which
// remote virtio devices (with their virtqueues) it can serve.
//
// This header has the protocol (fixed layouts with static_asserts), the pure
// parser of controlq messages (fuzzed), the table of remote memory regions
// through which every remote address is translated, and the driver.
//
// The driver is the code that would run over VFIO in a guest: it sees only
// pci::Function. It negotiates on the controlq, validates every region
// (inside the BAR, no overlap, no overflow) and every virtqueue (inside a
// region, aligned), acks as the spec says (writing the device config,
// ack value last) or, with VHOST_PCI_F_ACKQ negotiated, as the reviewers
// proposed (ack messages with request ids on a driver-to-device queue).
// After a remote device is added it serves the remote virtqueues in the
// device role (rings::SplitDeviceQueue over the BAR), with the remote's kicks
// arriving as MSI-X interrupts and its calls made through a doorbell BAR.
//
//   auto drv = vhost_pci::Driver::open(std::move(fn), {.accept = ...});
//   for (;;) { poll({drv->control_fd(), drv->kick_fd(0), ...});
//              UV_TRY(auto ev, drv->handle_control());
//              if (auto* q = drv->remote_queue(1)) { q->pop() ... q->push() ...; drv->call_remote(1); } }
//
// Threading: one thread owns a Driver.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "uvirtio/base/le.hpp"
#include "uvirtio/base/result.hpp"
#include "uvirtio/driver/device.hpp"
#include "uvirtio/driver/virtqueue.hpp"
#include "uvirtio/pci/function.hpp"
#include "uvirtio/rings/channel.hpp"
#include "uvirtio/rings/split_device.hpp"

namespace uvirtio::driver::vhost_pci {

// ---- identity and layout of the function ---------------------------------

// The RFC leaves the device id TBD. We use virtio device id 63 (unassigned
// in virtio 1.2), PCI id 0x1040 + 63 = 0x107f; both are options of the device
// model and of the driver.
inline constexpr std::uint16_t kDefaultVirtioId = 63;

// Virtqueues: 0 controlq (device to driver, as the spec), 1 ackq (driver to
// device, only with VHOST_PCI_F_ACKQ).
inline constexpr std::uint16_t kControlq = 0;
inline constexpr std::uint16_t kAckq = 1;

// Device feature bit (device-specific range, below 24): the reviewers' fix.
// Acks travel as AckMessages on the ackq instead of through config fields;
// every controlq message carries a request id that its ack echoes, so several
// requests of one kind may be in flight; UPDATE_DONE is not sent (the
// DEVICE_INFO ack completes an update); FEATURE_BITS names its device.
inline constexpr unsigned kFeatureAckq = 0;

// BARs of the function. The memory BAR maps the remote memory regions at the
// offsets MEMORY_INFO gives. The doorbell BAR has one 32-bit register per
// remote virtqueue (RemoteVirtq::call_doorbell * 4): writing it signals the
// remote's call eventfd, i.e. interrupts the remote driver.
inline constexpr unsigned kDoorbellBar = 0;
inline constexpr unsigned kMemoryBar = 2;
inline constexpr std::uint32_t kDoorbellStride = 4;
// MSI-X vectors: 0 config, 1 controlq, 2 ackq (the transport's), then one per
// remote virtqueue (RemoteVirtq::kick_vector), signalled by the remote's kick.
inline constexpr unsigned kFirstKickVector = 3;
inline constexpr unsigned kMaxRemoteVirtqs = 8;
inline constexpr unsigned kMaxRegions = 8;

// ---- device config (RFC section 4) ---------------------------------------

struct Config {
  le32 ack_type;
  le32 ack_device_type;
  le64 ack_device_id;
  le64 ack;  // the union ack_memory_info / ack_device_info / ack_feature_bits
};
static_assert(sizeof(Config) == 24);
static_assert(offsetof(Config, ack_type) == 0 && offsetof(Config, ack_device_type) == 4 &&
              offsetof(Config, ack_device_id) == 8 && offsetof(Config, ack) == 16);

// ack_type
inline constexpr std::uint32_t kMemoryInfoAck = 0;
inline constexpr std::uint32_t kDeviceInfoAck = 1;
inline constexpr std::uint32_t kFeatureBitsAck = 2;
// ack values for memory and device info (for feature bits the value is the
// accepted bits)
inline constexpr std::uint64_t kAddDone = 0;
inline constexpr std::uint64_t kAddFail = 1;
inline constexpr std::uint64_t kDelDone = 2;
inline constexpr std::uint64_t kDelFail = 3;

// ---- controlq messages ----------------------------------------------------

struct ControlqHeader {
  le16 msg_type;
  le16 msg_version;
  le32 msg_len;  // payload bytes after the header (and after the request id)
};
static_assert(sizeof(ControlqHeader) == 8);
static_assert(offsetof(ControlqHeader, msg_type) == 0 && offsetof(ControlqHeader, msg_version) == 2 &&
              offsetof(ControlqHeader, msg_len) == 4);
inline constexpr std::uint16_t kMemoryInfo = 0;
inline constexpr std::uint16_t kDeviceInfo = 1;
inline constexpr std::uint16_t kFeatureBits = 2;
inline constexpr std::uint16_t kUpdateDone = 3;
// msg_version 1: the RFC's messages. 2 (VHOST_PCI_F_ACKQ): a le64 request id
// follows the header.
inline constexpr std::uint16_t kVersionSpec = 1;
inline constexpr std::uint16_t kVersionAckq = 2;

inline constexpr std::uint16_t kOpAdd = 0;
inline constexpr std::uint16_t kOpDel = 1;

struct MemoryInfoHeader {
  le16 ops;
  le16 padding;
  le32 nregion;
};
static_assert(sizeof(MemoryInfoHeader) == 8);
struct MemoryRegion {
  le64 region_base_xgpa;  // guest physical address in the remote VM
  le64 size;
  le64 offset_in_bar_area;
};
static_assert(sizeof(MemoryRegion) == 24);
static_assert(offsetof(MemoryRegion, size) == 8 && offsetof(MemoryRegion, offset_in_bar_area) == 16);

// Frontend device types (RFC: VHOST_PCI_FRONTEND_DEVICE_*).
inline constexpr std::uint32_t kDeviceNet = 1;
inline constexpr std::uint32_t kDeviceBlk = 2;

struct DeviceInfoHeader {
  le16 ops;
  le16 padding;
  le32 nvirtq;
  le32 device_type;
  le32 padding2;
  le64 device_id;  // net: the MAC address in the low 48 bits
};
static_assert(sizeof(DeviceInfoHeader) == 24);
static_assert(offsetof(DeviceInfoHeader, nvirtq) == 4 && offsetof(DeviceInfoHeader, device_type) == 8 &&
              offsetof(DeviceInfoHeader, device_id) == 16);
// The RFC's `struct virtq exotic_virtq[]`, made concrete: a split ring in the
// remote VM's guest-physical addresses, where the remote driver left it
// (last_avail_idx), and how its notifications reach us and it.
struct RemoteVirtq {
  le32 index;  // the remote device's queue number
  le32 num;    // ring size, a power of two <= 32768
  le64 desc;
  le64 avail;
  le64 used;
  le16 last_avail_idx;
  le16 kick_vector;    // MSI-X vector of this function its kicks raise
  le16 call_doorbell;  // doorbell register that interrupts the remote
  le16 flags;          // 0
};
static_assert(sizeof(RemoteVirtq) == 40);
static_assert(offsetof(RemoteVirtq, desc) == 8 && offsetof(RemoteVirtq, avail) == 16 &&
              offsetof(RemoteVirtq, used) == 24 && offsetof(RemoteVirtq, last_avail_idx) == 32 &&
              offsetof(RemoteVirtq, kick_vector) == 34 && offsetof(RemoteVirtq, call_doorbell) == 36);

struct FeatureBitsAckq {  // FEATURE_BITS payload with VHOST_PCI_F_ACKQ
  le64 feature_bits;
  le32 device_type;
  le32 padding;
  le64 device_id;
};
static_assert(sizeof(FeatureBitsAckq) == 24);

struct UpdateDone {
  le32 device_type;
  le32 padding;
  le64 device_id;
};
static_assert(sizeof(UpdateDone) == 16);

// An ack on the ackq (VHOST_PCI_F_ACKQ).
struct AckMessage {
  le64 request_id;
  le32 ack_type;
  le32 ack_device_type;
  le64 ack_device_id;
  le64 ack;
};
static_assert(sizeof(AckMessage) == 32);
static_assert(offsetof(AckMessage, ack_type) == 8 && offsetof(AckMessage, ack_device_id) == 16 &&
              offsetof(AckMessage, ack) == 24);

// The RFC's server-socket messages (vhost_pci_socket_hdr and payloads). The
// device model here speaks vhost-user to its front-ends instead (what QEMU
// and DPDK implement); the layouts are kept so a server speaking the RFC's
// socket protocol can be checked against them.
struct SocketHeader {
  le16 msg_type;
  le16 msg_version;
  le32 msg_len;
  le64 qemu_pid;
};
static_assert(sizeof(SocketHeader) == 16);
struct SocketAck {
  le64 ack;
};
static_assert(sizeof(SocketAck) == 8);

// Largest controlq message: DEVICE_INFO with kMaxRemoteVirtqs queues.
inline constexpr std::size_t kMaxMessage =
    sizeof(ControlqHeader) + 8 + sizeof(DeviceInfoHeader) + kMaxRemoteVirtqs * sizeof(RemoteVirtq);

// ---- parsed messages -------------------------------------------------------

struct Region {
  std::uint64_t gpa = 0, size = 0, bar_offset = 0;
};
struct Virtq {
  std::uint32_t index = 0, num = 0;
  std::uint64_t desc = 0, avail = 0, used = 0;
  std::uint16_t last_avail_idx = 0, kick_vector = 0, call_doorbell = 0;
};
struct Message {
  std::uint16_t type = 0;
  std::uint16_t version = 0;
  std::uint64_t request_id = 0;   // version 2 only
  std::uint16_t ops = 0;          // MEMORY_INFO, DEVICE_INFO
  std::vector<Region> regions;    // MEMORY_INFO
  std::uint32_t device_type = 0;  // DEVICE_INFO, UPDATE_DONE, FEATURE_BITS (v2)
  std::uint64_t device_id = 0;
  std::vector<Virtq> virtqs;       // DEVICE_INFO ADD
  std::uint64_t feature_bits = 0;  // FEATURE_BITS
};
const char* message_name(std::uint16_t type);

// Checks one controlq message (`bytes` as the device wrote it, the used
// length). Errc::bad_device_data naming `device` for: fewer bytes than the
// header(s), a version other than the one negotiated (1, or 2 with ACKQ),
// msg_len disagreeing with the bytes, an unknown type or ops, a payload size
// wrong for the type, 0 or more than 8 regions, a zero-sized region or one
// whose address or BAR range overflows, DEVICE_INFO ADD with 0 or more than 8
// virtqueues (DEL with any), a ring size that is not a power of two <= 32768,
// misaligned ring addresses (desc 16, avail 2, used 4), ring areas whose end
// overflows, unknown flags, or nonzero padding. Pure: fuzzed.
Result<Message> parse_message(std::span<const std::uint8_t> bytes, bool ackq, const std::string& device);

// The remote memory as MEMORY_INFO announced it, checked against the BAR.
class RemoteMemory {
 public:
  // Errc::bad_device_data naming `device` when a region lies (partly) outside
  // the BAR, its BAR offset is not page aligned, or two regions overlap in
  // the BAR or in remote addresses.
  static Result<RemoteMemory> build(std::span<const Region> regions, std::uint64_t bar_size,
                                    const std::string& device);
  RemoteMemory() = default;
  // Our pointer for remote [gpa, gpa + len) when it lies inside one region.
  std::optional<std::span<std::uint8_t>> translate(std::uint8_t* bar, std::uint64_t gpa,
                                                   std::uint64_t len) const noexcept;
  const std::vector<Region>& regions() const noexcept { return regions_; }
  bool empty() const noexcept { return regions_.empty(); }

 private:
  std::vector<Region> regions_;  // sorted by gpa
};

// ---- the driver ------------------------------------------------------------

struct DriverOptions {
  // Remote (frontend) feature bits the driver accepts when FEATURE_BITS
  // offers them; the ack carries offered & accept, never VIRTIO_F_RING_PACKED
  // (the remote rings are served as split rings).
  std::uint64_t accept_remote_features = ~std::uint64_t{0};
  bool use_ackq = true;  // accept VHOST_PCI_F_ACKQ when the device offers it
  std::uint16_t virtio_id = kDefaultVirtioId;
  OpenOptions open;  // transport options (extra MSI-X vectors are added)
};

class Driver {
 public:
  static Result<std::unique_ptr<Driver>> open(std::unique_ptr<pci::Function> fn, DriverOptions options = {});
  ~Driver();

  const std::string& name() const noexcept { return name_; }
  bool ackq() const noexcept { return ackq_; }
  // Readable when controlq messages (or ackq completions) may be waiting.
  int control_fd() const noexcept { return control_fd_; }

  enum class Event {
    none,            // nothing was waiting
    memory_added,    // MEMORY_INFO ADD accepted
    memory_removed,  // MEMORY_INFO DEL
    features,        // FEATURE_BITS acked (remote_features())
    device_added,    // DEVICE_INFO ADD accepted; with ACKQ the device is ready
    device_removed,  // DEVICE_INFO DEL: remote queues are gone
    device_ready,    // UPDATE_DONE (spec mode): serve the remote queues now
    refused,         // a message was refused with a FAIL ack; last_refusal() says why
  };
  // Handles one waiting controlq message (non-blocking). An error means the
  // device broke the protocol so badly that the controlq is unusable.
  Result<Event> handle_control();
  // handle_control() until it returns none (at most 64 messages: a device
  // flooding the controlq cannot hold the caller), with up to `timeout` of
  // waiting for the first message; returns the events seen.
  Result<std::vector<Event>> wait_control(std::chrono::milliseconds timeout);
  const std::optional<Error>& last_refusal() const noexcept { return refusal_; }

  // The remote device, once ready.
  bool remote_ready() const noexcept { return ready_; }
  std::uint32_t remote_device_type() const noexcept { return dev_type_; }
  std::uint64_t remote_device_id() const noexcept { return dev_id_; }
  std::uint64_t remote_features() const noexcept { return remote_features_; }
  bool remote_has(unsigned bit) const noexcept { return bit < 64 && ((remote_features_ >> bit) & 1) != 0; }
  const RemoteMemory& memory() const noexcept { return mem_; }
  // Bumped whenever the served remote device is dropped (DEVICE_INFO DEL, a
  // failed ADD) or a new one added. A queue pointer, a popped chain or a span
  // into the BAR belongs to one generation: after a DEL the memory behind it
  // may be the next device's, so users holding such state across calls that
  // handle control messages compare generations before touching it.
  std::uint64_t device_generation() const noexcept { return generation_; }
  // The remote's queue `index` (its own numbering) while ready, else null.
  // Valid until the next handle_control() / wait_control().
  rings::SplitDeviceQueue* remote_queue(std::uint32_t index) noexcept;
  // The eventfd its kicks signal (-1 when not ready); drain_kick() clears it.
  int kick_fd(std::uint32_t index) const noexcept;
  void drain_kick(std::uint32_t index) noexcept;
  // Interrupts the remote driver for queue `index` (its call doorbell).
  Result<void> call_remote(std::uint32_t index);

 private:
  struct Served {
    Virtq vq;
    std::optional<rings::SplitDeviceQueue> ring;
    int kick_fd = -1;
  };
  Driver() = default;
  Result<void> post_control_buffer(std::size_t slot);
  Result<void> ack(std::uint32_t type, std::uint32_t device_type, std::uint64_t device_id,
                   std::uint64_t value, std::uint64_t request_id);
  Result<Event> handle(const Message& m);
  Result<void> add_device(const Message& m);
  void drop_device() noexcept;
  Error err(Errc code, const std::string& op, std::string cause) const;

  std::string name_;
  DriverOptions opts_;
  std::unique_ptr<Device> dev_;
  std::unique_ptr<Virtqueue> controlq_, ackq_q_;
  std::vector<pci::DmaRegion> control_bufs_;
  std::vector<pci::DmaRegion> ack_bufs_;
  std::vector<bool> ack_busy_;
  int control_fd_ = -1;
  bool ackq_ = false;
  pci::BarIo* doorbells_ = nullptr;
  std::uint8_t* bar_ = nullptr;
  std::uint64_t bar_size_ = 0;
  RemoteMemory mem_;
  std::uint64_t offered_remote_ = 0, remote_features_ = 0;
  bool ready_ = false;
  std::uint32_t dev_type_ = 0;
  std::uint64_t dev_id_ = 0;
  std::vector<Served> served_;
  std::uint64_t generation_ = 0;  // device_generation()
  // served_ by remote queue index, for the data path's lookups (null: not served).
  std::array<Served*, kMaxRemoteVirtqs> by_index_{};
  std::optional<Error> refusal_;
};

// ---- a packet channel over the remote virtio-net ------------------------

// The channel API of rings/channel.hpp (zero-copy reserve/commit and
// peek/release, copying and blocking calls, Flush::later batching) over the
// remote virtio-net a Driver serves: a message is one Ethernet frame; what
// we send lands in the remote's receive queue (0), what it transmits
// (queue 1) is what we receive. The virtio_net_hdr in front of each frame
// is written (all zero, num_buffers 1) and skipped here. Frames are
// zero-copy when the remote's buffer holds header and frame in one piece
// (Linux and DPDK post such buffers), copied through a bounce buffer
// otherwise. Errc::peer_gone while no remote device is ready; errors of the
// rings (a remote that broke the rules) as the rings report them.
//
// A frame reserved or peeked belongs to the device generation it was taken
// from. When the remote device is withdrawn (and maybe another added) before
// it is committed or released, the next call drops it without writing
// anything into remote memory and returns Errc::peer_gone; the call after
// that works on the new device. A blocking call that sees the device change
// while it waits returns Errc::peer_gone too.
// FEATURE_BITS is refused while a device is served, so the header length
// cannot change under a reserved frame.
//
//   vhost_pci::NetChannel ch(*drv);
//   auto r = ch.try_peek(); if (r && *r) { use(**r); ch.release(); }
//   ch.send(frame, 1s);
//
// Threading: the Driver's thread (one thread owns the Driver and its channel).
class NetChannel {
 public:
  using Flush = channel::Flush;
  explicit NetChannel(Driver& drv) : drv_(drv) {}

  bool ready() const noexcept { return drv_.remote_ready(); }
  // The largest frame the remote can take in one receive buffer right now is
  // known only per buffer; this is the virtio-net limit we accept.
  static constexpr std::size_t kMaxFrame = 65535 + 14;

  // --- sending (into the remote's receive queue) ---
  // Room for a frame of `len` bytes in the remote's next receive buffer;
  // nullopt when it has posted none. A frame larger than that buffer is
  // invalid_argument (the buffer is returned empty, counted in dropped()).
  Result<std::optional<std::span<std::byte>>> try_reserve(std::size_t len);
  Result<void> commit(std::size_t len, Flush flush = Flush::now);
  Result<void> flush_sent();
  Result<bool> try_send(std::span<const std::byte> frame);
  // Waits up to `timeout` for a receive buffer (kicks of the remote's queue 0).
  Result<void> send(std::span<const std::byte> frame, std::chrono::nanoseconds timeout);

  // --- receiving (from the remote's transmit queue) ---
  Result<std::optional<std::span<const std::byte>>> try_peek();
  Result<void> release(Flush flush = Flush::now);
  Result<void> flush_released();
  Result<std::span<const std::byte>> peek(std::chrono::nanoseconds timeout);
  Result<std::size_t> recv(std::span<std::byte> out, std::chrono::nanoseconds timeout);

  std::uint64_t dropped() const noexcept { return dropped_; }

 private:
  std::size_t hdr_len() const noexcept;
  Result<rings::SplitDeviceQueue*> queue(std::uint32_t index, const char* op);
  // Drops a reserved or peeked frame of an earlier device generation
  // (peer_gone naming `op`); ok when there is none.
  Result<void> check_generation(const char* op);
  // Waits for the remote's kick of `index` after re-arming notifications.
  Result<void> wait_kick(std::uint32_t index, std::chrono::steady_clock::time_point until, const char* op);
  Result<void> interrupt(std::uint32_t index);

  Driver& drv_;
  rings::SplitDeviceQueue::Request tx_req_, rx_req_;  // remote rx chain we fill / remote tx chain we read
  bool reserved_ = false, peeked_ = false;
  std::uint64_t generation_ = 0;  // the device generation reserved_ / peeked_ belong to
  std::vector<std::byte> tx_bounce_, rx_bounce_;
  bool tx_bounced_ = false;
  std::size_t tx_len_ = 0;  // the length the reserved frame was handed out for
  std::uint64_t dropped_ = 0;
};

}  // namespace uvirtio::driver::vhost_pci
