// The ivshmem server behind uvirtio-ivshmem-server: hands QEMU's
// ivshmem-doorbell devices (and any other client) the shared memory and the
// eventfds they interrupt each other with, speaking the protocol of QEMU's
// docs/specs/ivshmem-spec.rst. See doc/ivshmem.md for the protocol as
// implemented and for the differences from QEMU's contrib/ivshmem-server.
//
//   ServerOptions o;
//   o.socket_path = "/tmp/ivshmem_socket";
//   auto srv = Server::start(o);     // shared memory, socket bound and listening
//   (*srv)->run();                   // until request_stop()
//
// Every message is an 8-byte little-endian signed integer, optionally with one
// file descriptor (SCM_RIGHTS). The server never blocks on a client: messages
// a client does not read yet wait in a per-client queue.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "uvirtio/base/result.hpp"

namespace uvirtio::apps::ivshmem {

inline constexpr std::int64_t kProtocolVersion = 0;
// Peer ids are 0..65535: the Doorbell register has 16 bits for them.
inline constexpr std::uint32_t kIdSpace = 65536;
inline constexpr unsigned kMaxVectors = 1024;
// QEMU maps the memory as a PCI BAR: a power of two, and at least a page.
inline constexpr std::uint64_t kMinSize = 4096;
inline constexpr std::uint64_t kMaxSize = std::uint64_t{1} << 40;
inline constexpr std::uint64_t kDefaultSize = std::uint64_t{4} << 20;
inline constexpr const char* kDefaultSocket = "/tmp/ivshmem_socket";

struct ServerOptions {
  std::string socket_path = kDefaultSocket;
  std::uint64_t shm_size = kDefaultSize;
  unsigned vectors = 1;
  // Backing of the shared memory: a file (created when missing, removed at
  // the end only if created), a POSIX shm object (shm_open, same rule), or,
  // when both are empty, an anonymous memfd.
  std::string shm_file;
  std::string shm_name;
  // Log joins and leaves (warnings are logged always).
  bool verbose = false;
  // Ids are 0..id_space-1; tests shrink it to reach the end quickly.
  std::uint32_t id_space = kIdSpace;
  // A client with this many unsent messages is not reading: it is dropped.
  std::size_t max_queued = std::size_t{1} << 18;
  // Where log lines go (no trailing newline). Default: stderr, prefixed
  // with "uvirtio-ivshmem-server: ". Called on the thread running run().
  std::function<void(const std::string&)> log;
};

// "4M", "65536", "0x10000", "1G", "2T": an integer (decimal or 0x hex) with
// an optional binary suffix K, M, G or T (either case). nullopt on bad text.
std::optional<std::uint64_t> parse_size(const std::string& text);

// Checks the options' values (size, vectors, socket path length, backing);
// the error (Errc::invalid_argument) names the option.
Result<void> validate(const ServerOptions& o);

// Move-only owner of a file descriptor.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }
  int get() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  int release() noexcept {
    const int f = fd_;
    fd_ = -1;
    return f;
  }
  void reset(int fd = -1) noexcept;

 private:
  int fd_ = -1;
};

class Server {
 public:
  // Creates the shared memory and listens on the socket. A socket file that
  // nobody listens on is removed first; a live one (or a path that is not a
  // socket) is an error (Errc::busy, Errc::invalid_argument).
  static Result<std::unique_ptr<Server>> start(ServerOptions options);
  // Closes every connection without announcing departures (the clients may
  // go on interrupting each other), removes the socket file and the shared
  // memory file or object if this server created them.
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Serves until request_stop(); an error only when the event loop itself
  // fails (a misbehaving client is dropped and logged instead).
  Result<void> run();
  // One round of waiting (at most timeout_ms, -1 forever) and handling
  // events; false once a stop was requested.
  Result<bool> run_once(int timeout_ms);
  // Makes run() return. Async-signal-safe and callable from any thread.
  void request_stop() noexcept;

  const ServerOptions& options() const noexcept { return opt_; }
  // The connected peers' ids (call on the thread running the server, or
  // after it stopped).
  std::vector<std::uint16_t> peer_ids() const;

 private:
  struct Peer;
  struct Message;
  explicit Server(ServerOptions options);
  Result<void> open_shm();
  Result<void> listen_socket();
  void log(const std::string& line) const;
  void accept_clients();
  bool refuse_for_lack_of_fds(int err);
  void admit(UniqueFd sock);
  void on_peer_event(std::uint64_t tag, std::uint32_t events);
  void send(Peer& p, std::int64_t value, std::shared_ptr<const UniqueFd> fd);
  void flush(Peer& p);
  void set_want_out(Peer& p, bool want);
  void drop(Peer& p, std::string why, bool warn);
  void reap();

  ServerOptions opt_;
  UniqueFd epoll_;
  UniqueFd stop_;     // eventfd: request_stop() writes it
  UniqueFd listen_;   // the listening socket
  UniqueFd reserve_;  // spare descriptor, given up to refuse a client when out of fds
  std::shared_ptr<const UniqueFd> shm_;
  // Identity of what we created, so the destructor removes only our own.
  bool own_socket_ = false, own_shm_file_ = false, own_shm_name_ = false;
  std::uint64_t socket_dev_ = 0, socket_ino_ = 0, shm_dev_ = 0, shm_ino_ = 0;
  std::map<std::uint16_t, std::unique_ptr<Peer>> peers_;
  std::uint32_t next_id_ = 0;
  std::uint64_t next_serial_ = 1;
  bool reap_pending_ = false;
  bool listen_paused_ = false;  // out of descriptors: not accepting for now
  bool stopping_ = false;
};

}  // namespace uvirtio::apps::ivshmem
