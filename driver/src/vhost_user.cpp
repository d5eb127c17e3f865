// vhost-user back-end: message parsing, guest memory mapping and the session
// state machine (QEMU docs/interop/vhost-user.rst). See vhost_user.hpp for
// the model; the sections cited below are that document's.
#include "uvirtio/driver/vhost_user.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <limits>
#include <utility>

#include "uvirtio/base/hex.hpp"
#include "uvirtio/base/le.hpp"
#include "uvirtio/driver/features.hpp"

namespace uvirtio::driver::vhost_user {
namespace {

template <class T>
T read_as(std::span<const std::uint8_t> bytes, std::size_t off = 0) {
  T v;
  std::memcpy(&v, bytes.data() + off, sizeof v);
  return v;
}

// [a, a + n) and [b, b + m), n and m non-zero and not overflowing.
bool overlap(std::uint64_t a, std::uint64_t n, std::uint64_t b, std::uint64_t m) {
  return a <= b + (m - 1) && b <= a + (n - 1);
}

enum class Shape { none, u64, state, addr, mem_table, vring_fd, unknown };

Shape shape_of(std::uint32_t request) {
  switch (static_cast<Request>(request)) {
    case Request::get_features:
    case Request::set_owner:
    case Request::reset_owner:
    case Request::get_protocol_features:
    case Request::get_queue_num:
      return Shape::none;
    case Request::set_features:
    case Request::set_protocol_features:
      return Shape::u64;
    case Request::set_vring_num:
    case Request::set_vring_base:
    case Request::get_vring_base:
    case Request::set_vring_enable:
      return Shape::state;
    case Request::set_vring_addr:
      return Shape::addr;
    case Request::set_mem_table:
      return Shape::mem_table;
    case Request::set_vring_kick:
    case Request::set_vring_call:
    case Request::set_vring_err:
      return Shape::vring_fd;
    default:
      return Shape::unknown;
  }
}

// Requests that answer with a payload of their own; REPLY_ACK does not apply.
bool has_own_reply(std::uint32_t request) {
  switch (static_cast<Request>(request)) {
    case Request::get_features:
    case Request::get_protocol_features:
    case Request::get_vring_base:
    case Request::get_queue_num:
      return true;
    default:
      return false;
  }
}

// One line per message for BackendOptions::trace.
std::string describe(const Message& m) {
  std::string s = request_name(m.request);
  if (m.need_reply()) s += " (need_reply)";
  switch (shape_of(m.request)) {
    case Shape::u64:
      s += " " + hex(m.u64);
      break;
    case Shape::state:
      s += " ring " + std::to_string(m.state.index) + " num " + std::to_string(m.state.num);
      break;
    case Shape::addr:
      s += " ring " + std::to_string(m.addr.index) + " desc " + hex(m.addr.desc_user_addr) + " avail " +
           hex(m.addr.avail_user_addr) + " used " + hex(m.addr.used_user_addr);
      break;
    case Shape::mem_table:
      for (const auto& r : m.regions) {
        s += " [gpa " + hex(r.guest_phys_addr) + " size " + hex(r.memory_size) + " uva " +
             hex(r.userspace_addr) + " off " + hex(r.mmap_offset) + "]";
      }
      break;
    case Shape::vring_fd:
      s += " ring " + std::to_string(m.ring_index) + (m.has_fd ? " fd" : " no fd");
      break;
    case Shape::unknown:
      s += " (" + std::to_string(m.raw.size()) + " payload bytes)";
      break;
    case Shape::none:
      break;
  }
  return s;
}

}  // namespace

std::string request_name(std::uint32_t request) {
  switch (static_cast<Request>(request)) {
    case Request::get_features:
      return "GET_FEATURES";
    case Request::set_features:
      return "SET_FEATURES";
    case Request::set_owner:
      return "SET_OWNER";
    case Request::reset_owner:
      return "RESET_OWNER";
    case Request::set_mem_table:
      return "SET_MEM_TABLE";
    case Request::set_log_base:
      return "SET_LOG_BASE";
    case Request::set_log_fd:
      return "SET_LOG_FD";
    case Request::set_vring_num:
      return "SET_VRING_NUM";
    case Request::set_vring_addr:
      return "SET_VRING_ADDR";
    case Request::set_vring_base:
      return "SET_VRING_BASE";
    case Request::get_vring_base:
      return "GET_VRING_BASE";
    case Request::set_vring_kick:
      return "SET_VRING_KICK";
    case Request::set_vring_call:
      return "SET_VRING_CALL";
    case Request::set_vring_err:
      return "SET_VRING_ERR";
    case Request::get_protocol_features:
      return "GET_PROTOCOL_FEATURES";
    case Request::set_protocol_features:
      return "SET_PROTOCOL_FEATURES";
    case Request::get_queue_num:
      return "GET_QUEUE_NUM";
    case Request::set_vring_enable:
      return "SET_VRING_ENABLE";
  }
  return "request " + std::to_string(request);
}

// ---- parser ----------------------------------------------------------------

Result<Message> parse_message(std::span<const std::uint8_t> bytes, std::span<const int> fds,
                              const std::string& peer) {
  if (bytes.size() < sizeof(Header)) {
    return Error(Errc::bad_device_data, peer, "parse message",
                 "message of " + std::to_string(bytes.size()) + " bytes is shorter than the 12-byte header");
  }
  const auto h = read_as<Header>(bytes);
  const std::string op = request_name(h.request);
  auto bad = [&](std::string cause) { return Error(Errc::bad_device_data, peer, op, std::move(cause)); };
  if ((h.flags & kVersionMask) != kVersion) {
    return bad("protocol version " + std::to_string(h.flags & kVersionMask) + ", we speak version 1");
  }
  if ((h.flags & kFlagReply) != 0) return bad("a front-end message has the reply flag set");
  if ((h.flags & ~(kVersionMask | kFlagReply | kFlagNeedReply)) != 0) {
    return bad("reserved flag bits set: flags " + hex(h.flags));
  }
  if (h.size > kMaxPayload) {
    return bad("payload size " + std::to_string(h.size) + " exceeds the " + std::to_string(kMaxPayload) +
               "-byte limit");
  }
  if (bytes.size() - sizeof(Header) != h.size) {
    return bad("size field says " + std::to_string(h.size) + " payload bytes, the message has " +
               std::to_string(bytes.size() - sizeof(Header)));
  }
  if (fds.size() > kMaxFds) return bad(std::to_string(fds.size()) + " fds, at most 8 allowed");
  for (int fd : fds) {
    if (fd < 0) return bad("invalid fd " + std::to_string(fd));
  }
  const auto payload = bytes.subspan(sizeof(Header));
  Message m;
  m.request = h.request;
  m.flags = h.flags;
  m.known = true;

  auto want_size = [&](std::size_t n) -> Result<void> {
    if (payload.size() != n) {
      return bad("payload is " + std::to_string(payload.size()) + " bytes, expected " + std::to_string(n));
    }
    return ok();
  };
  auto want_fds = [&](std::size_t n) -> Result<void> {
    if (fds.size() != n) {
      return bad(std::to_string(fds.size()) + " fds came with the message, expected " + std::to_string(n));
    }
    return ok();
  };

  switch (shape_of(h.request)) {
    case Shape::none:
      UV_TRY_VOID(want_size(0));
      UV_TRY_VOID(want_fds(0));
      break;
    case Shape::u64:
      UV_TRY_VOID(want_size(sizeof(std::uint64_t)));
      UV_TRY_VOID(want_fds(0));
      m.u64 = read_as<std::uint64_t>(payload);
      break;
    case Shape::state: {
      UV_TRY_VOID(want_size(sizeof(VringState)));
      UV_TRY_VOID(want_fds(0));
      m.state = read_as<VringState>(payload);
      const std::uint32_t n = m.state.num;
      switch (static_cast<Request>(h.request)) {
        case Request::set_vring_num:
          // virtio spec 1.2, 2.7: split queue sizes are powers of two <= 32768.
          if (n == 0 || n > kMaxQueueSize || !std::has_single_bit(n)) {
            return bad("ring " + std::to_string(m.state.index) + " size " + std::to_string(n) +
                       " is not a power of two in [1, 32768]");
          }
          break;
        case Request::set_vring_base:
          // Split rings: a 16-bit available index (packed layouts are never offered).
          if (n > 0xffff) {
            return bad("ring " + std::to_string(m.state.index) + " base " + std::to_string(n) +
                       " does not fit the 16-bit split ring index");
          }
          break;
        case Request::set_vring_enable:
          if (n > 1)
            return bad("ring " + std::to_string(m.state.index) + " enable value " + std::to_string(n));
          break;
        default:
          break;
      }
      break;
    }
    case Shape::addr: {
      UV_TRY_VOID(want_size(sizeof(VringAddr)));
      UV_TRY_VOID(want_fds(0));
      m.addr = read_as<VringAddr>(payload);
      const auto& a = m.addr;
      const std::string ring = "ring " + std::to_string(a.index);
      if ((a.flags & ~kVringFlagLog) != 0) return bad(ring + ": unknown address flags " + hex(a.flags));
      // virtio spec 1.2, 2.7: descriptor table 16-, available ring 2-, used ring 4-aligned.
      if (a.desc_user_addr % 16 != 0)
        return bad(ring + ": descriptor table " + hex(a.desc_user_addr) + " not 16-aligned");
      if (a.avail_user_addr % 2 != 0)
        return bad(ring + ": available ring " + hex(a.avail_user_addr) + " not 2-aligned");
      if (a.used_user_addr % 4 != 0)
        return bad(ring + ": used ring " + hex(a.used_user_addr) + " not 4-aligned");
      break;
    }
    case Shape::mem_table: {
      if (payload.size() < sizeof(MemoryTableHeader)) {
        return bad("payload of " + std::to_string(payload.size()) +
                   " bytes is shorter than the table header");
      }
      const auto th = read_as<MemoryTableHeader>(payload);
      if (th.num_regions == 0) return bad("memory table has no regions");
      if (th.num_regions > kMaxRegions) {
        return bad("memory table has " + std::to_string(th.num_regions) + " regions, at most 8 allowed");
      }
      UV_TRY_VOID(want_size(sizeof(MemoryTableHeader) + th.num_regions * sizeof(MemoryRegion)));
      UV_TRY_VOID(want_fds(th.num_regions));
      for (std::uint32_t i = 0; i < th.num_regions; ++i) {
        const auto r = read_as<MemoryRegion>(payload, sizeof(MemoryTableHeader) + i * sizeof(MemoryRegion));
        const std::string reg = "region " + std::to_string(i);
        if (r.memory_size == 0) return bad(reg + " has size 0");
        const std::uint64_t last = r.memory_size - 1;
        if (r.guest_phys_addr > std::numeric_limits<std::uint64_t>::max() - last) {
          return bad(reg + ": guest range " + hex(r.guest_phys_addr) + " + " + hex(r.memory_size) +
                     " overflows");
        }
        if (r.userspace_addr > std::numeric_limits<std::uint64_t>::max() - last) {
          return bad(reg + ": user range " + hex(r.userspace_addr) + " + " + hex(r.memory_size) +
                     " overflows");
        }
        constexpr auto kMaxOff = static_cast<std::uint64_t>(std::numeric_limits<off_t>::max());
        if (r.memory_size > kMaxOff || r.mmap_offset > kMaxOff - r.memory_size) {
          return bad(reg + ": file range " + hex(r.mmap_offset) + " + " + hex(r.memory_size) +
                     " overflows the file offset");
        }
        if constexpr (sizeof(std::size_t) < sizeof(std::uint64_t)) {
          if (r.memory_size > std::numeric_limits<std::size_t>::max() / 2) {
            return bad(reg + ": size " + hex(r.memory_size) + " cannot be mapped here");
          }
        }
        for (std::size_t j = 0; j < m.regions.size(); ++j) {
          const auto& o = m.regions[j];
          if (overlap(r.guest_phys_addr, r.memory_size, o.guest_phys_addr, o.memory_size)) {
            return bad(reg + " guest range " + hex(r.guest_phys_addr) + "+" + hex(r.memory_size) +
                       " overlaps region " + std::to_string(j));
          }
          if (overlap(r.userspace_addr, r.memory_size, o.userspace_addr, o.memory_size)) {
            return bad(reg + " user range " + hex(r.userspace_addr) + "+" + hex(r.memory_size) +
                       " overlaps region " + std::to_string(j));
          }
        }
        m.regions.push_back(r);
      }
      break;
    }
    case Shape::vring_fd: {
      UV_TRY_VOID(want_size(sizeof(std::uint64_t)));
      m.u64 = read_as<std::uint64_t>(payload);
      if ((m.u64 & ~(kVringIndexMask | kVringNoFd)) != 0) return bad("unknown bits in " + hex(m.u64));
      m.ring_index = static_cast<std::uint32_t>(m.u64 & kVringIndexMask);
      m.has_fd = (m.u64 & kVringNoFd) == 0;
      UV_TRY_VOID(want_fds(m.has_fd ? 1 : 0));
      break;
    }
    case Shape::unknown:
      m.known = false;
      m.raw.assign(payload.begin(), payload.end());
      break;
  }
  return m;
}

// ---- guest memory ----------------------------------------------------------

Result<std::shared_ptr<const MemoryTable>> MemoryTable::map(std::span<const MemoryRegion> regions,
                                                            std::span<const int> fds,
                                                            const std::string& name) {
  const char* op = "SET_MEM_TABLE";
  if (regions.empty() || regions.size() > kMaxRegions || fds.size() != regions.size()) {
    return Error(Errc::invalid_argument, name, op,
                 std::to_string(regions.size()) + " regions with " + std::to_string(fds.size()) + " fds");
  }
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  std::shared_ptr<MemoryTable> t(new MemoryTable());
  for (std::size_t i = 0; i < regions.size(); ++i) {
    const MemoryRegion& r = regions[i];
    const std::string reg = "region " + std::to_string(i);
    // parse_message() checked these; a caller that did not gets an error, not a fault.
    constexpr auto kMaxOff = static_cast<std::uint64_t>(std::numeric_limits<off_t>::max());
    if (r.memory_size == 0 || r.memory_size > kMaxOff || r.mmap_offset > kMaxOff - r.memory_size) {
      return Error(Errc::invalid_argument, name, op, reg + ": size 0 or file range overflows");
    }
    struct stat st {};
    if (::fstat(fds[i], &st) != 0) return Error::from_errno(errno, name, op, "fstat " + reg);
    // Mapping past the end of a file succeeds but faults on access: refuse.
    if (S_ISREG(st.st_mode) && static_cast<std::uint64_t>(st.st_size) < r.mmap_offset + r.memory_size) {
      return Error(Errc::bad_device_data, name, op,
                   reg + " wants file bytes up to " + hex(r.mmap_offset + r.memory_size) + ", its fd has " +
                       hex(static_cast<std::uint64_t>(st.st_size)));
    }
    const std::uint64_t map_off = r.mmap_offset / page * page;
    const std::uint64_t delta = r.mmap_offset - map_off;
    const auto map_len = static_cast<std::size_t>(r.memory_size + delta);
    void* p = ::mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fds[i],
                     static_cast<off_t>(map_off));
    if (p == MAP_FAILED) {
      return Error::from_errno(
          errno, name, op,
          "mmap " + reg + " (" + hex(r.memory_size) + " bytes at offset " + hex(r.mmap_offset) + ")");
    }
    const int dup = ::fcntl(fds[i], F_DUPFD_CLOEXEC, 0);
    if (dup < 0) {
      const int e = errno;
      ::munmap(p, map_len);
      return Error::from_errno(e, name, op, "dup fd of " + reg);
    }
    t->regions_.push_back(
        Mapped{r, static_cast<std::uint8_t*>(p) + delta, p, map_len, pci::Fd(pci::Os::system(), dup)});
  }
  return std::shared_ptr<const MemoryTable>(std::move(t));
}

MemoryTable::~MemoryTable() {
  for (auto& m : regions_) ::munmap(m.map_base, m.map_len);
}

namespace {
template <class Regions, class Key>
std::optional<std::span<std::uint8_t>> lookup(const Regions& regions, std::uint64_t addr, std::uint64_t len,
                                              Key key) noexcept {
  for (const auto& m : regions) {
    const std::uint64_t start = key(m.desc);
    if (addr < start) continue;
    const std::uint64_t off = addr - start;
    if (off >= m.desc.memory_size || len > m.desc.memory_size - off) continue;
    return std::span<std::uint8_t>(m.host + off, static_cast<std::size_t>(len));
  }
  return std::nullopt;
}
}  // namespace

std::optional<std::span<std::uint8_t>> MemoryTable::guest(std::uint64_t gpa,
                                                          std::uint64_t len) const noexcept {
  return lookup(regions_, gpa, len, [](const MemoryRegion& r) { return r.guest_phys_addr; });
}

std::optional<std::span<std::uint8_t>> MemoryTable::user(std::uint64_t uva,
                                                         std::uint64_t len) const noexcept {
  return lookup(regions_, uva, len, [](const MemoryRegion& r) { return r.userspace_addr; });
}

// ---- back-end --------------------------------------------------------------

VhostUserBackend::VhostUserBackend(BackendOptions options) : opts_(std::move(options)) {
  queues_.resize(opts_.num_queues);
}

Error VhostUserBackend::err(Errc code, const char* op, std::string cause) const {
  return Error(code, opts_.name, op, std::move(cause));
}

namespace {
Result<void> check_options(const BackendOptions& o, const char* op) {
  if (o.num_queues == 0 || o.num_queues > kVringIndexMask + 1) {
    return Error(Errc::invalid_argument, o.name, op,
                 "num_queues " + std::to_string(o.num_queues) + " not in [1, 256]");
  }
  if (o.max_queue_size == 0 || o.max_queue_size > kMaxQueueSize || !std::has_single_bit(o.max_queue_size)) {
    return Error(Errc::invalid_argument, o.name, op, "max_queue_size " + std::to_string(o.max_queue_size));
  }
  // No IOTLB messages, split rings only: a front-end that negotiated these
  // would use addresses or a ring layout we cannot serve.
  constexpr std::uint64_t kUnservable = (1ull << feature::kAccessPlatform) | (1ull << feature::kRingPacked);
  if ((o.features & kUnservable) != 0) {
    return Error(Errc::invalid_argument, o.name, op,
                 "features " + hex(o.features) + " include bits we cannot serve: " +
                     hex(o.features & kUnservable) + " (ACCESS_PLATFORM, RING_PACKED)");
  }
  constexpr std::uint64_t kServedProtocol =
      (1ull << protocol_feature::kMq) | (1ull << protocol_feature::kReplyAck);
  if ((o.protocol_features & ~kServedProtocol) != 0) {
    return Error(Errc::invalid_argument, o.name, op,
                 "protocol features " + hex(o.protocol_features) + " include bits we do not implement: " +
                     hex(o.protocol_features & ~kServedProtocol) + " (only MQ and REPLY_ACK)");
  }
  if (o.message_timeout.count() <= 0 || o.message_timeout > std::chrono::hours(1)) {
    return Error(Errc::invalid_argument, o.name, op,
                 "message_timeout " + std::to_string(o.message_timeout.count()) + " ms not in (0, 1 h]");
  }
  return ok();
}
}  // namespace

Result<std::unique_ptr<VhostUserBackend>> VhostUserBackend::listen(const std::string& path,
                                                                   BackendOptions options) {
  const char* op = "listen";
  UV_TRY_VOID(check_options(options, op));
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof sa.sun_path) {
    return Error(Errc::invalid_argument, options.name, op,
                 "socket path '" + path + "' is empty or longer than " +
                     std::to_string(sizeof sa.sun_path - 1) + " bytes");
  }
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  auto& os = pci::Os::system();
  pci::Fd fd(os, ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Error::from_errno(errno, options.name, op, "socket");
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Error(Errc::busy, options.name, op, "'" + path + "' exists and is not a socket");
    }
    // A live server answers a connect; a stale socket file refuses it.
    pci::Fd probe(os, ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (probe.valid() && ::connect(probe.get(), reinterpret_cast<const sockaddr*>(&sa), sizeof sa) == 0) {
      return Error(Errc::busy, options.name, op, "another server is listening on '" + path + "'");
    }
    ::unlink(path.c_str());
  }
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&sa), sizeof sa) != 0) {
    return Error::from_errno(errno, options.name, op, "bind " + path);
  }
  if (::listen(fd.get(), 1) != 0) {
    const int e = errno;
    ::unlink(path.c_str());
    return Error::from_errno(e, options.name, op, "listen on " + path);
  }
  std::unique_ptr<VhostUserBackend> b(new VhostUserBackend(std::move(options)));
  b->listen_ = std::move(fd);
  b->path_ = path;
  return b;
}

Result<std::unique_ptr<VhostUserBackend>> VhostUserBackend::adopt(int connected_fd, BackendOptions options) {
  const char* op = "adopt connection";
  UV_TRY_VOID(check_options(options, op));
  if (connected_fd < 0) return Error(Errc::invalid_argument, options.name, op, "invalid fd");
  std::unique_ptr<VhostUserBackend> b(new VhostUserBackend(std::move(options)));
  b->conn_ = pci::Fd(pci::Os::system(), connected_fd);
  return b;
}

VhostUserBackend::~VhostUserBackend() {
  disconnect();
  listen_.reset();
  if (!path_.empty()) ::unlink(path_.c_str());
}

Result<void> VhostUserBackend::accept() {
  const char* op = "accept";
  if (conn_.valid()) return err(Errc::invalid_argument, op, "a front-end is already connected");
  if (!listen_.valid()) return err(Errc::invalid_argument, op, "not listening");
  int fd;
  do {
    fd = ::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return Error::from_errno(errno, opts_.name, op, path_);
  conn_ = pci::Fd(pci::Os::system(), fd);
  return ok();
}

void VhostUserBackend::stop_ring(Queue& q) noexcept {
  q.ring.reset();
  q.ring_mem.reset();
  q.kick.reset();
  q.kick_set = false;
  q.kick_polled = false;
}

void VhostUserBackend::reset_session() noexcept {
  for (auto& q : queues_) stop_ring(q);
  queues_.clear();
  queues_.resize(opts_.num_queues);
  mem_.reset();
  ++memory_generation_;
  owned_ = false;
  acked_features_ = 0;
  features_set_ = false;
  acked_protocol_ = 0;
}

void VhostUserBackend::disconnect() noexcept {
  reset_session();
  conn_.reset();
}

std::uint64_t VhostUserBackend::offered_features() const noexcept {
  return opts_.features | (1ull << kProtocolFeaturesBit);
}

std::uint16_t VhostUserBackend::resume_index(const Queue& q) const noexcept {
  if (!q.ring) return q.base;
  // The ring started at its base with used index = base, so the last
  // available index consumed is the used index published plus what is still
  // in flight. The used index lives in memory the front-end can write: at
  // worst it misleads only the front-end itself.
  const auto u = q.ring_mem->user(q.addr->used_user_addr, 4);
  const auto used_idx =
      le16::from_raw(std::atomic_ref<std::uint16_t>(*reinterpret_cast<std::uint16_t*>(u->data() + 2))
                         .load(std::memory_order_acquire));
  return static_cast<std::uint16_t>(used_idx + q.ring->in_flight());
}

std::optional<VhostUserBackend::RingInfo> VhostUserBackend::ring_info(std::uint32_t index) const noexcept {
  if (index >= queues_.size()) return std::nullopt;
  const Queue& q = queues_[index];
  RingInfo info;
  info.running = const_cast<VhostUserBackend*>(this)->queue(index) != nullptr;
  info.num = q.num;
  if (q.addr) info.addr = *q.addr;
  info.base = q.base;
  info.last_avail = resume_index(q);
  info.kick_fd = q.kick.get();
  info.call_fd = q.call.get();
  return info;
}

rings::SplitDeviceQueue* VhostUserBackend::queue(std::uint32_t index) noexcept {
  if (index >= queues_.size()) return nullptr;
  Queue& q = queues_[index];
  if (!q.ring) return nullptr;
  // vhost-user.rst "Ring states": without VHOST_USER_F_PROTOCOL_FEATURES a
  // ring is enabled when it starts; with it, SET_VRING_ENABLE decides.
  const bool enabled = !has_feature(kProtocolFeaturesBit) || q.enabled;
  return enabled ? &*q.ring : nullptr;
}

int VhostUserBackend::kick_fd(std::uint32_t index) const noexcept {
  if (index >= queues_.size()) return -1;
  return queues_[index].kick.get();
}

void VhostUserBackend::drain_kick(std::uint32_t index) noexcept {
  if (index >= queues_.size() || !queues_[index].kick.valid()) return;
  pollfd p{queues_[index].kick.get(), POLLIN, 0};
  if (::poll(&p, 1, 0) != 1 || (p.revents & POLLIN) == 0) return;
  std::uint64_t v;
  [[maybe_unused]] auto n = ::read(p.fd, &v, sizeof v);
}

namespace {
Result<void> signal_fd(int fd, const std::string& name, const std::string& op) {
  const std::uint64_t one = 1;
  ssize_t n;
  do {
    n = ::write(fd, &one, sizeof one);
  } while (n < 0 && errno == EINTR);
  // EAGAIN: the counter is at its maximum, a wake-up is pending anyway.
  if (n < 0 && errno != EAGAIN) return Error::from_errno(errno, name, op);
  return ok();
}
}  // namespace

Result<void> VhostUserBackend::notify(std::uint32_t index) {
  if (index >= queues_.size() || !queues_[index].call.valid()) return ok();
  return signal_fd(queues_[index].call.get(), opts_.name,
                   "signal call eventfd of ring " + std::to_string(index));
}

Result<void> VhostUserBackend::report_error(std::uint32_t index) {
  if (index >= queues_.size() || !queues_[index].err.valid()) return ok();
  return signal_fd(queues_[index].err.get(), opts_.name,
                   "signal error eventfd of ring " + std::to_string(index));
}

// ---- socket I/O ------------------------------------------------------------

namespace {
// One recvmsg; adds any fds that came along to `fds` (closing them again on
// every error path through the Fd owners).
Result<std::size_t> recv_some(int sock, std::uint8_t* buf, std::size_t len, std::vector<pci::Fd>& fds,
                              const std::string& name) {
  iovec iov{buf, len};
  alignas(cmsghdr) char ctrl[CMSG_SPACE(sizeof(int) * kMaxFds)];
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = ctrl;
  mh.msg_controllen = sizeof ctrl;
  ssize_t n;
  do {
    n = ::recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return Error::from_errno(errno, name, "read message");
  for (cmsghdr* c = CMSG_FIRSTHDR(&mh); c != nullptr; c = CMSG_NXTHDR(&mh, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      fds.emplace_back(pci::Os::system(), fd);
    }
  }
  if ((mh.msg_flags & MSG_CTRUNC) != 0) {
    return Error(Errc::bad_device_data, name, "read message", "more than 8 fds came with one message");
  }
  return static_cast<std::size_t>(n);
}
}  // namespace

Result<void> VhostUserBackend::send_reply(std::uint32_t request, std::span<const std::uint8_t> payload) {
  std::vector<std::uint8_t> buf(sizeof(Header) + payload.size());
  const Header h{request, kVersion | kFlagReply, static_cast<std::uint32_t>(payload.size())};
  std::memcpy(buf.data(), &h, sizeof h);
  if (!payload.empty()) std::memcpy(buf.data() + sizeof h, payload.data(), payload.size());
  std::size_t done = 0;
  while (done < buf.size()) {
    const ssize_t n = ::send(conn_.get(), buf.data() + done, buf.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::from_errno(errno, opts_.name, "reply to " + request_name(request));
    done += static_cast<std::size_t>(n);
  }
  return ok();
}

// ---- message handling ------------------------------------------------------

Result<VhostUserBackend::Event> VhostUserBackend::handle_message() {
  if (!conn_.valid()) return err(Errc::invalid_argument, "handle message", "no front-end connected");
  refusal_.reset();
  // Header first (with the fds, which travel with its first byte), then the
  // payload it announces.
  std::vector<std::uint8_t> bytes(sizeof(Header));
  std::vector<pci::Fd> fds;
  std::size_t got = 0;
  std::chrono::steady_clock::time_point deadline;
  auto read_fully = [&](std::size_t want) -> Result<bool> {
    while (got < want) {
      if (got > 0) {
        // The message has begun: the rest must come by the deadline.
        const auto left =
            std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        pollfd p{conn_.get(), POLLIN, 0};
        const int ready = ::poll(
            &p, 1,
            static_cast<int>(std::clamp<std::int64_t>(left.count(), 0, std::numeric_limits<int>::max())));
        if (ready < 0 && errno == EINTR) continue;
        if (ready < 0) return Error::from_errno(errno, opts_.name, "read message", "poll");
        if (ready == 0) {
          return err(Errc::timeout, "read message",
                     "the front-end sent " + std::to_string(got) + " bytes of a message and stopped for " +
                         std::to_string(opts_.message_timeout.count()) + " ms");
        }
      }
      auto n = recv_some(conn_.get(), bytes.data() + got, want - got, fds, opts_.name);
      if (!n) return std::move(n).error();
      if (*n == 0) {
        if (got == 0) return false;
        return err(Errc::peer_gone, "read message",
                   "connection closed after " + std::to_string(got) + " bytes of a message");
      }
      if (got == 0) deadline = std::chrono::steady_clock::now() + opts_.message_timeout;
      got += *n;
      if (fds.size() > kMaxFds) {
        return err(Errc::bad_device_data, "read message", "more than 8 fds came with one message");
      }
    }
    return true;
  };
  auto more = read_fully(sizeof(Header));
  if (!more) {
    disconnect();
    return std::move(more).error();
  }
  if (!*more) {
    disconnect();
    return Event::disconnected;
  }
  const auto h = read_as<Header>(bytes);
  if (h.size > kMaxPayload) {
    disconnect();
    return err(Errc::bad_device_data, request_name(h.request).c_str(),
               "payload size " + std::to_string(h.size) + " exceeds the " + std::to_string(kMaxPayload) +
                   "-byte limit");
  }
  bytes.resize(sizeof(Header) + h.size);
  more = read_fully(bytes.size());
  if (!more || !*more) {
    disconnect();
    if (!more) return std::move(more).error();
    return err(Errc::peer_gone, "read message", "connection closed in the middle of a message");
  }

  std::vector<int> raw_fds;
  for (const auto& f : fds) raw_fds.push_back(f.get());
  // A failure is answered (and the session goes on) only where the protocol
  // has a place for it: REPLY_ACK negotiated, need_reply set, and a request
  // without a reply payload of its own. Otherwise the front-end cannot learn
  // of it, and going on would serve a state it does not know: end the session.
  const bool can_refuse = (h.flags & kVersionMask) == kVersion && (h.flags & kFlagReply) == 0 &&
                          (h.flags & kFlagNeedReply) != 0 &&
                          (acked_protocol_ & (1ull << protocol_feature::kReplyAck)) != 0 &&
                          !has_own_reply(h.request);
  auto refuse_or_end = [&](Error e) -> Result<Event> {
    if (can_refuse) {
      const std::uint64_t failure = 1;
      auto r = send_reply(h.request, {reinterpret_cast<const std::uint8_t*>(&failure), sizeof failure});
      if (r) {
        refusal_ = std::move(e);
        return Event::refused;
      }
    }
    disconnect();
    return e;
  };

  auto parsed = parse_message(bytes, raw_fds, opts_.name);
  if (!parsed) return refuse_or_end(std::move(parsed).error());
  const Message& m = *parsed;
  if (opts_.trace) opts_.trace(describe(m));
  std::vector<std::uint8_t> reply;
  auto changed = dispatch(m, fds, reply);
  if (!changed) return refuse_or_end(std::move(changed).error());
  Result<void> sent = ok();
  if (has_own_reply(m.request)) {
    sent = send_reply(m.request, reply);
  } else if (can_refuse) {  // REPLY_ACK success
    const std::uint64_t success = 0;
    sent = send_reply(m.request, {reinterpret_cast<const std::uint8_t*>(&success), sizeof success});
  }
  if (!sent) {
    disconnect();
    return std::move(sent).error();
  }
  return *changed ? Event::rings_changed : Event::handled;
}

Result<void> VhostUserBackend::check_ring_addr(const VringAddr& a, std::uint32_t num, const MemoryTable& mem,
                                               const char* op) const {
  const auto n = static_cast<std::uint16_t>(num);
  const std::string ring = "ring " + std::to_string(a.index) + " (size " + std::to_string(num) + "): ";
  struct Part {
    const char* what;
    std::uint64_t addr;
    std::size_t bytes;
  };
  const Part parts[] = {{"descriptor table", a.desc_user_addr, rings::SplitLayout::desc_bytes(n)},
                        {"available ring", a.avail_user_addr, rings::SplitLayout::avail_bytes(n)},
                        {"used ring", a.used_user_addr, rings::SplitLayout::used_bytes(n)}};
  for (const auto& p : parts) {
    if (!mem.user(p.addr, p.bytes)) {
      return err(Errc::bad_device_data, op,
                 ring + p.what + " at " + hex(p.addr) + " (" + std::to_string(p.bytes) +
                     " bytes) is not inside one mapped memory region");
    }
  }
  return ok();
}

// Starts ring `index` once everything it needs is there (vhost-user.rst
// "Starting and stopping rings": a ring starts on SET_VRING_KICK).
Result<bool> VhostUserBackend::update_ring(std::uint32_t index, const char* op) {
  Queue& q = queues_[index];
  if (!q.kick_set || q.ring) return false;
  const std::string ring = "ring " + std::to_string(index);
  if (q.num == 0 || !q.addr || !mem_) {
    return err(Errc::bad_device_data, op,
               ring + " was started before its " +
                   (!mem_ ? "memory table" : (q.num == 0 ? "size" : "addresses")) + " were set");
  }
  UV_TRY_VOID(check_ring_addr(*q.addr, q.num, *mem_, op));
  const auto n = static_cast<std::uint16_t>(q.num);
  auto d = mem_->user(q.addr->desc_user_addr, rings::SplitLayout::desc_bytes(n));
  auto av = mem_->user(q.addr->avail_user_addr, rings::SplitLayout::avail_bytes(n));
  auto u = mem_->user(q.addr->used_user_addr, rings::SplitLayout::used_bytes(n));
  // Descriptor addresses are guest physical; they translate through the
  // table current at the time of the pop (SET_MEM_TABLE may replace it).
  auto translate = [this](std::uint64_t addr, std::uint32_t len,
                          bool) -> std::optional<std::span<std::uint8_t>> {
    if (!mem_) return std::nullopt;
    return mem_->guest(addr, len);
  };
  UV_TRY(auto created, rings::SplitDeviceQueue::create(n, d->data(), av->data(), u->data(),
                                                       opts_.name + " " + ring, translate, q.base));
  created.set_event_idx(has_feature(feature::kEventIdx));
  created.set_indirect(has_feature(feature::kIndirectDesc));
  q.ring.emplace(std::move(created));
  q.ring_mem = mem_;  // the ring pointers stay valid while this table lives
  return true;
}

Result<bool> VhostUserBackend::dispatch(const Message& m, std::vector<pci::Fd>& fds,
                                        std::vector<std::uint8_t>& reply) {
  const std::string op_name = request_name(m.request);
  const char* op = op_name.c_str();
  auto put_u64 = [&](std::uint64_t v) {
    reply.resize(sizeof v);
    std::memcpy(reply.data(), &v, sizeof v);
  };
  auto ring_index = [&](std::uint32_t i) -> Result<std::uint32_t> {
    if (i >= queues_.size()) {
      return err(
          Errc::bad_device_data, op,
          "ring index " + std::to_string(i) + " out of range (" + std::to_string(queues_.size()) + " rings)");
    }
    return i;
  };
  // The fd of KICK/CALL/ERR, made non-blocking. It is the front-end's: a
  // blocking eventfd whose counter it holds at the maximum (or a full pipe)
  // would block our write to it for good, and a kick it drains between our
  // poll() and read() our read. The flag is on the file the front-end shares
  // with us; QEMU and DPDK create theirs non-blocking anyway. The call and
  // error fds are written to: a pipe or socket whose reader the front-end
  // closed would raise SIGPIPE on that write (and kill a back-end that does
  // not ignore it), so only other files (eventfds) are taken for them.
  auto take_fd = [&](std::uint32_t i, bool written) -> Result<pci::Fd> {
    if (!m.has_fd) return pci::Fd();
    const int fd = fds.at(0).get();
    if (written) {
      struct stat st {};
      if (::fstat(fd, &st) != 0) {
        return Error::from_errno(errno, opts_.name, op, "fstat the eventfd of ring " + std::to_string(i));
      }
      if (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode)) {
        return err(Errc::bad_device_data, op,
                   "ring " + std::to_string(i) + ": the fd is a " +
                       (S_ISFIFO(st.st_mode) ? "pipe" : "socket") +
                       ", not an eventfd (writing to it could raise SIGPIPE)");
      }
    }
    const int fl = ::fcntl(fd, F_GETFL);
    if (fl < 0 || ((fl & O_NONBLOCK) == 0 && ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0)) {
      return Error::from_errno(errno, opts_.name, op,
                               "make the eventfd of ring " + std::to_string(i) + " non-blocking");
    }
    return std::move(fds.at(0));
  };
  auto any_running = [&]() {
    return std::any_of(queues_.begin(), queues_.end(), [](const Queue& q) { return q.ring.has_value(); });
  };
  if (!m.known) {
    return err(Errc::unsupported, op, "not supported (we offer no feature that uses it)");
  }
  switch (static_cast<Request>(m.request)) {
    case Request::get_features:
      put_u64(offered_features());
      return false;
    case Request::set_features: {
      const std::uint64_t extra = m.u64 & ~offered_features();
      if (extra != 0) {
        return err(Errc::bad_device_data, op,
                   "features " + hex(m.u64) + " include bits we did not offer: " + hex(extra));
      }
      if (any_running() && m.u64 != acked_features_) {
        return err(Errc::bad_device_data, op,
                   "features change from " + hex(acked_features_) + " to " + hex(m.u64) + " while rings run");
      }
      const bool was_protocol = has_feature(kProtocolFeaturesBit);
      acked_features_ = m.u64;
      features_set_ = true;
      return was_protocol != has_feature(kProtocolFeaturesBit);  // enable default flipped
    }
    case Request::set_owner:
      owned_ = true;  // repeated SET_OWNER is harmless and accepted
      return false;
    case Request::reset_owner:
      reset_session();
      return true;
    case Request::get_protocol_features:
      put_u64(opts_.protocol_features);
      return false;
    case Request::set_protocol_features: {
      const std::uint64_t extra = m.u64 & ~opts_.protocol_features;
      if (extra != 0) {
        return err(Errc::bad_device_data, op,
                   "protocol features " + hex(m.u64) + " include bits we did not offer: " + hex(extra));
      }
      acked_protocol_ = m.u64;
      return false;
    }
    case Request::get_queue_num:
      put_u64(opts_.num_queues);
      return false;
    case Request::set_mem_table: {
      std::vector<int> raw;
      for (const auto& f : fds) raw.push_back(f.get());
      UV_TRY(auto table, MemoryTable::map(m.regions, raw, opts_.name));
      // The old table is unmapped here unless a running ring still holds it
      // (its ring pointers); then it goes when that ring stops.
      mem_ = std::move(table);
      ++memory_generation_;
      return false;
    }
    case Request::set_vring_num: {
      UV_TRY(auto i, ring_index(m.state.index));
      if (m.state.num > opts_.max_queue_size) {
        return err(Errc::bad_device_data, op,
                   "ring " + std::to_string(i) + " size " + std::to_string(m.state.num) +
                       " exceeds our maximum " + std::to_string(opts_.max_queue_size));
      }
      if (queues_[i].ring) return err(Errc::bad_device_data, op, "ring " + std::to_string(i) + " is running");
      queues_[i].num = m.state.num;
      return false;
    }
    case Request::set_vring_addr: {
      UV_TRY(auto i, ring_index(m.addr.index));
      if ((m.addr.flags & kVringFlagLog) != 0) {
        return err(Errc::bad_device_data, op,
                   "ring " + std::to_string(i) + " asks for used-ring logging, which we never offered");
      }
      if (queues_[i].ring) return err(Errc::bad_device_data, op, "ring " + std::to_string(i) + " is running");
      // Checked now when size and memory are known, and again at start.
      if (queues_[i].num != 0 && mem_) UV_TRY_VOID(check_ring_addr(m.addr, queues_[i].num, *mem_, op));
      queues_[i].addr = m.addr;
      return false;
    }
    case Request::set_vring_base: {
      UV_TRY(auto i, ring_index(m.state.index));
      if (queues_[i].ring) return err(Errc::bad_device_data, op, "ring " + std::to_string(i) + " is running");
      // The ring resumes at this available index (migration, back-end
      // reconnect); parse_message() checked it fits 16 bits.
      queues_[i].base = static_cast<std::uint16_t>(m.state.num);
      return false;
    }
    case Request::get_vring_base: {
      UV_TRY(auto i, ring_index(m.state.index));
      Queue& q = queues_[i];
      if (q.ring && opts_.on_ring_stop) opts_.on_ring_stop(i);
      const std::uint32_t last_avail = resume_index(q);
      stop_ring(q);  // "GET_VRING_BASE ... stops the ring"
      q.base = static_cast<std::uint16_t>(last_avail);
      const VringState s{i, last_avail};
      reply.resize(sizeof s);
      std::memcpy(reply.data(), &s, sizeof s);
      return true;
    }
    case Request::set_vring_kick: {
      UV_TRY(auto i, ring_index(m.ring_index));
      UV_TRY(auto kick, take_fd(i, false));
      Queue& q = queues_[i];
      q.kick = std::move(kick);
      q.kick_polled = !m.has_fd;
      q.kick_set = true;
      if (auto started = update_ring(i, op); !started) {
        stop_ring(q);  // refused: the ring stays stopped
        return std::move(started).error();
      }
      return true;  // new kick fd (or a ring that started)
    }
    case Request::set_vring_call: {
      UV_TRY(auto i, ring_index(m.ring_index));
      UV_TRY(queues_[i].call, take_fd(i, true));
      return false;
    }
    case Request::set_vring_err: {
      UV_TRY(auto i, ring_index(m.ring_index));
      UV_TRY(queues_[i].err, take_fd(i, true));
      return false;
    }
    case Request::set_vring_enable: {
      UV_TRY(auto i, ring_index(m.state.index));
      const bool was = queues_[i].enabled;
      queues_[i].enabled = m.state.num == 1;
      return was != queues_[i].enabled;
    }
    default:
      break;
  }
  return err(Errc::unsupported, op, "not supported (we offer no feature that uses it)");
}

}  // namespace uvirtio::driver::vhost_user
