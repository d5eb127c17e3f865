// vhost-user, back-end side (QEMU docs/interop/vhost-user.rst): we serve the
// virtqueues of a front-end (a QEMU guest's virtio device, or DPDK's
// virtio-user) in the device role.
//
// The front-end talks to us over a Unix stream socket. Each message is a
// 12-byte header (request, flags, payload size; native byte order) and a
// payload; file descriptors (guest memory, kick and call eventfds) travel as
// SCM_RIGHTS ancillary data with the message. The front-end shares its guest
// memory as up to 8 regions (SET_MEM_TABLE); we mmap each region's fd and
// translate every address it gives us through that table: ring addresses are
// front-end user addresses, descriptor addresses guest physical ones.
//
// Everything the front-end sends is untrusted. parse_message() is a pure
// function (no syscalls, fuzzed) that checks each message's size and fields
// for its request type; the back-end then checks the message against the
// session state (ring index in range, memory table present, the rings inside
// mapped memory, features a subset of what we offered). A bad message gets a
// failure reply when the front-end asked for one (need_reply, REPLY_ACK),
// otherwise it ends the session: the connection is closed, every mapping and
// descriptor dropped, and a listening back-end accepts the next front-end.
//
//   auto be = VhostUserBackend::listen("/tmp/net.sock", {.name = "net", .features = ..., .num_queues = 2});
//   UV_TRY_VOID((*be)->accept());
//   while (...) { poll((*be)->conn_fd(), (*be)->kick_fd(i)...);
//                 UV_TRY(auto ev, (*be)->handle_message());
//                 if (auto* q = (*be)->queue(1)) { q->pop() ... q->push() ... (*be)->notify(1); } }
//
// Threading: one thread owns a back-end and its queues.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "uvirtio/base/result.hpp"
#include "uvirtio/pci/os.hpp"
#include "uvirtio/rings/split_device.hpp"

namespace uvirtio::driver::vhost_user {

// ---- wire format (vhost-user.rst "Message Specification"), native order ----

struct Header {
  std::uint32_t request;
  std::uint32_t flags;
  std::uint32_t size;  // payload bytes after the header
};
static_assert(sizeof(Header) == 12);
static_assert(offsetof(Header, request) == 0 && offsetof(Header, flags) == 4 && offsetof(Header, size) == 8);

inline constexpr std::uint32_t kVersion = 0x1;        // flags bits 0-1
inline constexpr std::uint32_t kVersionMask = 0x3;    //
inline constexpr std::uint32_t kFlagReply = 0x4;      // a reply (back-end to front-end)
inline constexpr std::uint32_t kFlagNeedReply = 0x8;  // REPLY_ACK: answer with a u64 status

// "A vring state description"
struct VringState {
  std::uint32_t index;
  std::uint32_t num;
};
static_assert(sizeof(VringState) == 8);
static_assert(offsetof(VringState, index) == 0 && offsetof(VringState, num) == 4);

// "A vring address description": user addresses of the three ring parts
// (IOVAs only with VIRTIO_F_IOMMU_PLATFORM, which we never offer).
struct VringAddr {
  std::uint32_t index;
  std::uint32_t flags;  // bit 0: log used-ring writes (never offered)
  std::uint64_t desc_user_addr;
  std::uint64_t used_user_addr;
  std::uint64_t avail_user_addr;
  std::uint64_t log_guest_addr;
};
static_assert(sizeof(VringAddr) == 40);
static_assert(offsetof(VringAddr, index) == 0 && offsetof(VringAddr, flags) == 4 &&
              offsetof(VringAddr, desc_user_addr) == 8 && offsetof(VringAddr, used_user_addr) == 16 &&
              offsetof(VringAddr, avail_user_addr) == 24 && offsetof(VringAddr, log_guest_addr) == 32);
inline constexpr std::uint32_t kVringFlagLog = 0x1;

// "Memory region description"
struct MemoryRegion {
  std::uint64_t guest_phys_addr;
  std::uint64_t memory_size;
  std::uint64_t userspace_addr;  // the front-end's own mapping: what ring addresses refer to
  std::uint64_t mmap_offset;     // where the region starts in its fd
};
static_assert(sizeof(MemoryRegion) == 32);
static_assert(offsetof(MemoryRegion, guest_phys_addr) == 0 && offsetof(MemoryRegion, memory_size) == 8 &&
              offsetof(MemoryRegion, userspace_addr) == 16 && offsetof(MemoryRegion, mmap_offset) == 24);

// "Multiple memory regions description": num_regions, padding, regions.
struct MemoryTableHeader {
  std::uint32_t num_regions;
  std::uint32_t padding;
};
static_assert(sizeof(MemoryTableHeader) == 8);
inline constexpr std::uint32_t kMaxRegions = 8;

// The u64 of SET_VRING_KICK / CALL / ERR: ring index in bits 0-7, bit 8 set
// when no fd is passed (kick: the ring is polled; call/err: none).
inline constexpr std::uint64_t kVringIndexMask = 0xff;
inline constexpr std::uint64_t kVringNoFd = 0x100;

// Largest payload we read; the biggest message we understand is the memory
// table (8 + 8 * 32 bytes). A larger size field ends the session.
inline constexpr std::uint32_t kMaxPayload = 4096;
// Most fds one message may carry (SET_MEM_TABLE with 8 regions).
inline constexpr std::size_t kMaxFds = kMaxRegions;

// Front-end requests (vhost-user.rst "Front-end message types").
enum class Request : std::uint32_t {
  get_features = 1,
  set_features = 2,
  set_owner = 3,
  reset_owner = 4,
  set_mem_table = 5,
  set_log_base = 6,
  set_log_fd = 7,
  set_vring_num = 8,
  set_vring_addr = 9,
  set_vring_base = 10,
  get_vring_base = 11,
  set_vring_kick = 12,
  set_vring_call = 13,
  set_vring_err = 14,
  get_protocol_features = 15,
  set_protocol_features = 16,
  get_queue_num = 17,
  set_vring_enable = 18,
};
// "SET_MEM_TABLE", or "request 42" for codes we do not know.
std::string request_name(std::uint32_t request);

// VHOST_USER_F_PROTOCOL_FEATURES: the vhost-user feature bit on top of the
// virtio ones (driver::feature), offered in GET_FEATURES.
inline constexpr unsigned kProtocolFeaturesBit = 30;
namespace protocol_feature {
inline constexpr unsigned kMq = 0;
inline constexpr unsigned kReplyAck = 3;
}  // namespace protocol_feature

// Ring size bound of the split layout (virtio spec 1.2, 2.7: power of two).
inline constexpr std::uint32_t kMaxQueueSize = 32768;

// One front-end message as checked by parse_message(). Which fields carry
// meaning depends on the request:
//   no payload:      GET_FEATURES, SET_OWNER, RESET_OWNER, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM
//   u64:             SET_FEATURES, SET_PROTOCOL_FEATURES
//   state:           SET_VRING_NUM (num a power of two <= 32768), SET_VRING_BASE
//                    (num <= 0xffff), GET_VRING_BASE, SET_VRING_ENABLE (num 0 or 1)
//   addr:            SET_VRING_ADDR
//   regions:         SET_MEM_TABLE (1..8 regions, one fd each, in order)
//   ring_index/has_fd: SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR (u64 holds the raw value)
//   known == false:  any other request; payload kept raw for the caller to refuse.
struct Message {
  std::uint32_t request = 0;
  std::uint32_t flags = 0;
  bool known = false;
  std::uint64_t u64 = 0;
  VringState state{};
  VringAddr addr{};
  std::vector<MemoryRegion> regions;
  std::uint32_t ring_index = 0;
  bool has_fd = false;
  std::vector<std::uint8_t> raw;  // payload of an unknown request

  bool need_reply() const noexcept { return (flags & kFlagNeedReply) != 0; }
};

// Checks one complete message: `bytes` is the header and exactly `size`
// payload bytes; `fds` the descriptors that came with it (only counted and
// checked for >= 0 here; the caller owns them). Errc::bad_device_data naming
// `peer` and the request for: a short header, a version other than 1, the
// reply flag or reserved flag bits set, a size field that disagrees with the
// bytes or exceeds kMaxPayload, a payload size wrong for the request, a ring
// number that is not a power of two in [1, 32768], a ring base above 0xffff,
// an enable value other than 0/1, unknown vring-address flags or misaligned
// ring addresses, a memory table with 0 or more than 8 regions, a
// zero-sized region, a region whose guest, user or file range overflows 64
// bits (or the file offset 63), regions whose guest or user ranges overlap,
// unknown bits in a KICK/CALL/ERR value, or an fd count that does not match
// the request (one per region; one for KICK/CALL/ERR unless bit 8; else none).
Result<Message> parse_message(std::span<const std::uint8_t> bytes, std::span<const int> fds,
                              const std::string& peer = "vhost-user front-end");

// ---- guest memory --------------------------------------------------------

// The front-end's memory table, mapped. Immutable once built; a new
// SET_MEM_TABLE builds a new one. Unmaps everything on destruction.
class MemoryTable {
 public:
  // Maps each region's fd (MAP_SHARED, read/write) at its mmap_offset.
  // `regions` as checked by parse_message(); `fds[i]` belongs to
  // `regions[i]` (the fds stay with the caller and may be closed after).
  // Errc::bad_device_data when an fd is smaller than its region's
  // offset + size (the access would SIGBUS), io when mmap fails.
  static Result<std::shared_ptr<const MemoryTable>> map(std::span<const MemoryRegion> regions,
                                                        std::span<const int> fds, const std::string& name);
  ~MemoryTable();
  MemoryTable(const MemoryTable&) = delete;
  MemoryTable& operator=(const MemoryTable&) = delete;

  // [addr, addr + len) inside one region, as our memory; nullopt otherwise
  // (also for len 0 outside every region). A range that spans two regions,
  // even adjacent ones, does not translate.
  std::optional<std::span<std::uint8_t>> guest(std::uint64_t gpa, std::uint64_t len) const noexcept;
  std::optional<std::span<std::uint8_t>> user(std::uint64_t uva, std::uint64_t len) const noexcept;

  std::size_t size() const noexcept { return regions_.size(); }
  const MemoryRegion& region(std::size_t i) const { return regions_[i].desc; }
  // The region's memory in our address space (memory_size bytes), and our
  // own duplicate of its fd (for mapping it a second time: vhost-pci).
  std::uint8_t* host(std::size_t i) const { return regions_[i].host; }
  int fd(std::size_t i) const { return regions_[i].fd.get(); }

 private:
  struct Mapped {
    MemoryRegion desc;
    std::uint8_t* host = nullptr;  // region start in our memory
    void* map_base = nullptr;
    std::size_t map_len = 0;
    pci::Fd fd;
  };
  MemoryTable() = default;
  std::vector<Mapped> regions_;
};

// ---- the back-end --------------------------------------------------------

struct BackendOptions {
  std::string name = "vhost-user";  // appears in errors and log lines
  // Virtio feature bits we offer (device type, ring and VERSION_1 bits);
  // VHOST_USER_F_PROTOCOL_FEATURES is added. ACCESS_PLATFORM (needs IOTLB
  // messages) and RING_PACKED (split rings only) are refused
  // (invalid_argument from listen()/adopt()).
  std::uint64_t features = 0;
  // Protocol features we offer; REPLY_ACK is the one we implement fully
  // (MQ only answers GET_QUEUE_NUM); any other bit is refused.
  std::uint64_t protocol_features = 1ull << protocol_feature::kReplyAck;
  std::uint32_t num_queues = 2;
  std::uint32_t max_queue_size = kMaxQueueSize;  // SET_VRING_NUM above it is refused
  // Called with a one-line description of every message handled
  // ("SET_VRING_NUM ring 0 num 256"), for logs. Optional.
  std::function<void(const std::string&)> trace;
  // Called with the ring index when GET_VRING_BASE is about to stop a
  // running ring and report how far it got, on the thread that called
  // handle_message(). A device model that serves the ring elsewhere (the
  // vhost-pci driver) stops doing so before returning, so the front-end
  // never changes a ring still being read. Optional.
  std::function<void(std::uint32_t ring)> on_ring_stop;
  // A message whose first bytes came must be complete within this; a
  // front-end that stops in the middle of one ends the session
  // (Errc::timeout) instead of holding the serving thread. At most 1 h.
  std::chrono::milliseconds message_timeout{1000};
};

class VhostUserBackend {
 public:
  // Listens on a new Unix socket at `path` (a stale socket there is
  // replaced; any other file is an error). Whether a socket is stale is
  // found by connecting to it: a live server refuses us with busy, and sees
  // a client that connects and leaves without a message. The socket file
  // is removed on destruction.
  static Result<std::unique_ptr<VhostUserBackend>> listen(const std::string& path, BackendOptions options);
  // Serves an already connected socket (one end of a socketpair in tests).
  // There is nothing to accept again after it disconnects.
  static Result<std::unique_ptr<VhostUserBackend>> adopt(int connected_fd, BackendOptions options);
  ~VhostUserBackend();
  VhostUserBackend(const VhostUserBackend&) = delete;
  VhostUserBackend& operator=(const VhostUserBackend&) = delete;

  const std::string& name() const noexcept { return opts_.name; }
  // -1 when not listening (adopted) / not connected.
  int listen_fd() const noexcept { return listen_.get(); }
  int conn_fd() const noexcept { return conn_.get(); }
  bool connected() const noexcept { return conn_.valid(); }

  // Blocks until a front-end connects. invalid_argument when already
  // connected or not listening.
  Result<void> accept();

  enum class Event {
    handled,        // a message was handled; nothing changed for the data path
    rings_changed,  // a ring started, stopped, was enabled/disabled or got new fds
    disconnected,   // the front-end closed the connection (session torn down)
    refused,        // a bad or unsupported message was answered with a failure
                    // reply (need_reply); the session goes on; last_refusal() says why
  };
  // Reads one message (blocking until it begins; once it has begun, for at
  // most BackendOptions::message_timeout) and handles it. An error means
  // the session was ended because of it (connection closed, all state
  // dropped); the error says why.
  Result<Event> handle_message();
  const std::optional<Error>& last_refusal() const noexcept { return refusal_; }

  // Ends the session: unmaps the memory, closes every fd and the connection.
  void disconnect() noexcept;

  // The data path. queue(i) is non-null while ring i runs: address, size and
  // kick set, enabled, memory mapped. It stays valid until the next
  // handle_message() or disconnect().
  rings::SplitDeviceQueue* queue(std::uint32_t index) noexcept;
  // The ring's kick eventfd (-1: none, or polled when queue(i) is running).
  int kick_fd(std::uint32_t index) const noexcept;
  // Reads (clears) the kick eventfd; a no-op without one.
  void drain_kick(std::uint32_t index) noexcept;
  // Signals the front-end's call eventfd for ring `index` (no-op without
  // one). Call it when queue(index)->should_interrupt() said so.
  Result<void> notify(std::uint32_t index);
  // Signals the ring's error eventfd (SET_VRING_ERR; no-op without one): call
  // it when queue(index) latched broken. QEMU logs "vhost vring error".
  Result<void> report_error(std::uint32_t index);

  // What the front-end set up for ring `index` (nullopt: no such ring), for
  // a device model that serves the ring elsewhere (vhost-pci). `running` is
  // queue(index) != nullptr; the addresses are front-end user addresses.
  struct RingInfo {
    bool running = false;
    std::uint32_t num = 0;
    VringAddr addr{};
    std::uint16_t base = 0;
    // Where the ring resumes: what GET_VRING_BASE would answer now (while it
    // runs, the used index in ring memory plus the chains in flight; base
    // otherwise). A model that withdraws a running ring and serves it again
    // later (vhost-pci) resumes it here, not at base.
    std::uint16_t last_avail = 0;
    int kick_fd = -1, call_fd = -1;
  };
  std::optional<RingInfo> ring_info(std::uint32_t index) const noexcept;

  std::uint64_t offered_features() const noexcept;
  // Offers only `mask`'s bits of the virtio features from the next
  // GET_FEATURES on (a vhost-pci driver accepted fewer: spec 4.5).
  void restrict_features(std::uint64_t mask) noexcept { opts_.features &= mask; }
  std::uint64_t acked_features() const noexcept { return acked_features_; }
  std::uint64_t acked_protocol_features() const noexcept { return acked_protocol_; }
  bool has_feature(unsigned bit) const noexcept { return bit < 64 && ((acked_features_ >> bit) & 1) != 0; }
  const MemoryTable* memory() const noexcept { return mem_.get(); }
  // Changes whenever the memory table is replaced (SET_MEM_TABLE) or dropped:
  // a model that mapped memory() elsewhere (vhost-pci) maps it again.
  std::uint64_t memory_generation() const noexcept { return memory_generation_; }
  std::uint32_t num_queues() const noexcept { return opts_.num_queues; }

 private:
  struct Queue {
    std::uint32_t num = 0;  // 0: not set
    std::optional<VringAddr> addr;
    std::uint16_t base = 0;
    pci::Fd kick, call, err;
    bool kick_polled = false;  // SET_VRING_KICK with the no-fd bit
    bool kick_set = false;     // started (vhost-user "ring started on SET_VRING_KICK")
    bool enabled = false;
    std::optional<rings::SplitDeviceQueue> ring;
    std::shared_ptr<const MemoryTable> ring_mem;  // keeps the ring's mapping alive
  };

  explicit VhostUserBackend(BackendOptions options);
  Result<Message> read_message();
  Result<bool> dispatch(const Message& m, std::vector<pci::Fd>& fds, std::vector<std::uint8_t>& reply);
  Result<void> send_reply(std::uint32_t request, std::span<const std::uint8_t> payload);
  Result<void> check_ring_addr(const VringAddr& a, std::uint32_t num, const MemoryTable& mem,
                               const char* op) const;
  Result<bool> update_ring(std::uint32_t index, const char* op);
  std::uint16_t resume_index(const Queue& q) const noexcept;
  void stop_ring(Queue& q) noexcept;
  void reset_session() noexcept;
  Error err(Errc code, const char* op, std::string cause) const;

  BackendOptions opts_;
  std::string path_;  // socket file we created ("" when adopted)
  pci::Fd listen_;
  pci::Fd conn_;
  bool owned_ = false;
  std::uint64_t acked_features_ = 0;
  bool features_set_ = false;
  std::uint64_t acked_protocol_ = 0;
  std::shared_ptr<const MemoryTable> mem_;
  std::uint64_t memory_generation_ = 0;
  std::vector<Queue> queues_;
  std::optional<Error> refusal_;
};

}  // namespace uvirtio::driver::vhost_user

namespace uvirtio::driver {
using VhostUserBackend = vhost_user::VhostUserBackend;
}
