// The ivshmem server (see ivshmem_server_lib.hpp and doc/ivshmem.md).
#include "ivshmem_server_lib.hpp"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iostream>

#include "uvirtio/base/le.hpp"

namespace uvirtio::apps::ivshmem {

namespace {

constexpr std::uint64_t kStopTag = ~std::uint64_t{0};
constexpr std::uint64_t kListenTag = ~std::uint64_t{0} - 1;
constexpr int kListenBacklog = 64;

std::string errno_text(int err) { return std::strerror(err); }

bool is_fd_exhaustion(int err) { return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM; }

// Removes path only if it still is the file we created (someone may have
// replaced it meanwhile).
void unlink_if_same(const std::string& path, std::uint64_t dev, std::uint64_t ino) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && st.st_dev == dev && st.st_ino == ino) ::unlink(path.c_str());
}

sockaddr_un unix_address(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.data(), path.size());  // validate() checked the length
  return a;
}

}  // namespace

void UniqueFd::reset(int fd) noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

std::optional<std::uint64_t> parse_size(const std::string& text) {
  if (text.empty() || text[0] < '0' || text[0] > '9') return std::nullopt;
  const bool hex = text.size() > 2 && text[0] == '0' && (text[1] == 'x' || text[1] == 'X');
  errno = 0;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(text.c_str(), &end, hex ? 16 : 10);
  if (errno != 0 || end == text.c_str() + (hex ? 2 : 0)) return std::nullopt;
  const std::string suffix(end);
  unsigned shift = 0;
  if (suffix.empty())
    shift = 0;
  else if (suffix == "K" || suffix == "k")
    shift = 10;
  else if (suffix == "M" || suffix == "m")
    shift = 20;
  else if (suffix == "G" || suffix == "g")
    shift = 30;
  else if (suffix == "T" || suffix == "t")
    shift = 40;
  else
    return std::nullopt;
  if (v > (~std::uint64_t{0} >> shift)) return std::nullopt;
  return std::uint64_t{v} << shift;
}

Result<void> validate(const ServerOptions& o) {
  auto bad = [](const std::string& what, const std::string& cause) {
    return Error(Errc::invalid_argument, what, "", cause);
  };
  if (o.socket_path.empty()) return bad("--socket", "the path is empty");
  if (o.socket_path.size() >= sizeof(sockaddr_un{}.sun_path))
    return bad("--socket", "'" + o.socket_path + "' has " + std::to_string(o.socket_path.size()) +
                               " bytes; a Unix socket path has at most " +
                               std::to_string(sizeof(sockaddr_un{}.sun_path) - 1));
  if ((o.shm_size & (o.shm_size - 1)) != 0 || o.shm_size == 0)
    return bad("--size", std::to_string(o.shm_size) +
                             " bytes is not a power of two (QEMU maps the memory as a PCI BAR)");
  if (o.shm_size < kMinSize) return bad("--size", "must be at least 4K (one page)");
  if (o.shm_size > kMaxSize) return bad("--size", "must be at most 1T");
  if (o.vectors < 1 || o.vectors > kMaxVectors)
    return bad("--vectors", "must be 1.." + std::to_string(kMaxVectors));
  if (!o.shm_file.empty() && !o.shm_name.empty())
    return bad("--shm-path", "give --shm-path or --shm-name, not both");
  if (!o.shm_name.empty()) {
    const std::string n = o.shm_name[0] == '/' ? o.shm_name.substr(1) : o.shm_name;
    if (n.empty() || n.find('/') != std::string::npos || n.size() > NAME_MAX || n == "." || n == "..")
      return bad("--shm-name",
                 "'" + o.shm_name + "' is not a POSIX shared memory name (NAME or /NAME, no other '/')");
  }
  if (o.id_space < 1 || o.id_space > kIdSpace) return bad("id space", "must be 1..65536");
  if (o.max_queued < 1) return bad("queue limit", "must be at least 1");
  return ok();
}

// ---- the server -------------------------------------------------------------

struct Server::Message {
  std::int64_t value;
  std::shared_ptr<const UniqueFd> fd;  // keeps the descriptor open until it is sent
};

struct Server::Peer {
  std::uint16_t id = 0;
  std::uint64_t serial = 0;  // tells a peer from an earlier one with the same id
  UniqueFd sock;
  // One eventfd per vector. Shared with the messages still queued for other
  // clients, so a departed peer's eventfds close once nothing refers to them.
  std::vector<std::shared_ptr<const UniqueFd>> vectors;
  std::deque<Message> out;  // not yet sent; the front one may be partly sent
  std::size_t out_off = 0;
  bool want_out = false;
  bool dead = false;  // dropped; removed and announced by reap()

  std::uint64_t tag() const noexcept { return serial << 16 | id; }
};

Server::Server(ServerOptions options) : opt_(std::move(options)) {}

Server::~Server() {
  peers_.clear();
  listen_.reset();
  if (own_socket_) unlink_if_same(opt_.socket_path, socket_dev_, socket_ino_);
  shm_.reset();
  if (own_shm_file_) unlink_if_same(opt_.shm_file, shm_dev_, shm_ino_);
  if (own_shm_name_) ::shm_unlink(opt_.shm_name.c_str());
}

Result<std::unique_ptr<Server>> Server::start(ServerOptions options) {
  UV_TRY_VOID(validate(options));
  std::unique_ptr<Server> s(new Server(std::move(options)));
  const std::string& where = s->opt_.socket_path;
  s->epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!s->epoll_.valid()) return Error::from_errno(errno, where, "start", "epoll_create1");
  s->stop_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!s->stop_.valid()) return Error::from_errno(errno, where, "start", "eventfd");
  s->reserve_.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!s->reserve_.valid()) return Error::from_errno(errno, where, "start", "open /dev/null");
  UV_TRY_VOID(s->open_shm());
  UV_TRY_VOID(s->listen_socket());
  for (auto [fd, tag] : {std::pair{s->stop_.get(), kStopTag}, std::pair{s->listen_.get(), kListenTag}}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = tag;
    if (::epoll_ctl(s->epoll_.get(), EPOLL_CTL_ADD, fd, &ev) < 0)
      return Error::from_errno(errno, where, "start", "epoll_ctl");
  }
  return s;
}

Result<void> Server::open_shm() {
  UniqueFd fd;
  std::string what;
  if (!opt_.shm_file.empty() || !opt_.shm_name.empty()) {
    const bool file = !opt_.shm_file.empty();
    what = file ? opt_.shm_file : opt_.shm_name;
    const char* op = file ? "open shared memory file" : "shm_open";
    auto open_it = [&](int flags) {
      return file ? ::open(what.c_str(), flags | O_CLOEXEC, 0600) : ::shm_open(what.c_str(), flags, 0600);
    };
    bool created = true;
    fd.reset(open_it(O_RDWR | O_CREAT | O_EXCL));
    if (!fd.valid() && errno == EEXIST) {
      created = false;
      fd.reset(open_it(O_RDWR));
    }
    if (!fd.valid()) return Error::from_errno(errno, what, op);
    struct stat st {};
    if (::fstat(fd.get(), &st) < 0) return Error::from_errno(errno, what, "fstat");
    if (created) {
      (file ? own_shm_file_ : own_shm_name_) = true;
      shm_dev_ = st.st_dev;
      shm_ino_ = st.st_ino;
    }
    if (!S_ISREG(st.st_mode))
      return Error(Errc::invalid_argument, what, "use as shared memory", "not a regular file");
    const auto have = static_cast<std::uint64_t>(st.st_size);
    if (have != 0 && have != opt_.shm_size)
      return Error(Errc::invalid_argument, what, "use as shared memory",
                   "it has " + std::to_string(have) + " bytes, --size asks for " +
                       std::to_string(opt_.shm_size) + " (give its size, or remove it)");
    if (have == 0 && ::ftruncate(fd.get(), static_cast<off_t>(opt_.shm_size)) < 0)
      return Error::from_errno(errno, what, "ftruncate", "to " + std::to_string(opt_.shm_size) + " bytes");
  } else {
    what = "memfd";
    fd.reset(::memfd_create("ivshmem", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    if (!fd.valid()) return Error::from_errno(errno, "shared memory", "memfd_create");
    if (::ftruncate(fd.get(), static_cast<off_t>(opt_.shm_size)) < 0)
      return Error::from_errno(errno, "shared memory", "ftruncate",
                               "memfd to " + std::to_string(opt_.shm_size) + " bytes");
    // No client can shrink the memory under the others (they would fault).
    if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
      return Error::from_errno(errno, "shared memory", "seal memfd");
  }
  shm_ = std::make_shared<const UniqueFd>(std::move(fd));
  return ok();
}

Result<void> Server::listen_socket() {
  const std::string& path = opt_.socket_path;
  const sockaddr_un addr = unix_address(path);
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return Error(Errc::invalid_argument, path, "listen",
                   "the path exists and is not a socket (not removing it)");
    // Live or stale? Only a listener accepts the connection.
    // Non-blocking: a listener whose backlog is full (a stopped server)
    // answers EAGAIN instead of holding us in connect() forever.
    UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!probe.valid()) return Error::from_errno(errno, path, "listen", "socket");
    if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0 || errno == EAGAIN)
      return Error(Errc::busy, path, "listen", "another server is listening on this socket");
    if (errno != ECONNREFUSED) return Error::from_errno(errno, path, "listen", "probe the existing socket");
    if (::unlink(path.c_str()) < 0 && errno != ENOENT)
      return Error::from_errno(errno, path, "listen", "remove the stale socket");
    if (opt_.verbose) log("removed the stale socket " + path);
  } else if (errno != ENOENT) {
    return Error::from_errno(errno, path, "listen", "lstat");
  }
  listen_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!listen_.valid()) return Error::from_errno(errno, path, "listen", "socket");
  if (::bind(listen_.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) < 0)
    return Error::from_errno(errno, path, "bind");
  if (::lstat(path.c_str(), &st) == 0) {
    own_socket_ = true;
    socket_dev_ = st.st_dev;
    socket_ino_ = st.st_ino;
  }
  if (::listen(listen_.get(), kListenBacklog) < 0) return Error::from_errno(errno, path, "listen");
  return ok();
}

void Server::log(const std::string& line) const {
  if (opt_.log)
    opt_.log(line);
  else
    std::cerr << "uvirtio-ivshmem-server: " << line << std::endl;
}

void Server::request_stop() noexcept {
  const std::uint64_t one = 1;
  if (::write(stop_.get(), &one, sizeof one) < 0) {
    // The counter is full only if a stop is already pending.
  }
}

std::vector<std::uint16_t> Server::peer_ids() const {
  std::vector<std::uint16_t> ids;
  for (const auto& [id, p] : peers_)
    if (!p->dead) ids.push_back(id);
  return ids;
}

Result<void> Server::run() {
  for (;;) {
    UV_TRY(const bool more, run_once(-1));
    if (!more) return ok();
  }
}

Result<bool> Server::run_once(int timeout_ms) {
  if (stopping_) return false;
  epoll_event evs[32];
  const int n = ::epoll_wait(epoll_.get(), evs, 32, timeout_ms);
  if (n < 0) {
    if (errno == EINTR) return true;
    return Error::from_errno(errno, opt_.socket_path, "serve", "epoll_wait");
  }
  for (int i = 0; i < n; ++i) {
    const std::uint64_t tag = evs[i].data.u64;
    if (tag == kStopTag) {
      std::uint64_t v;
      if (::read(stop_.get(), &v, sizeof v) < 0) {
        // Already drained; the stop stands either way.
      }
      stopping_ = true;
    } else if (tag == kListenTag) {
      accept_clients();
    } else {
      on_peer_event(tag, evs[i].events);
    }
    reap();
  }
  return !stopping_;
}

void Server::accept_clients() {
  for (;;) {
    const int fd = ::accept4(listen_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      admit(UniqueFd(fd));
      reap();
      continue;
    }
    const int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK) return;
    if (err == EINTR || err == ECONNABORTED || err == EPROTO) continue;
    // Out of descriptors, accept() fails even with nothing pending.
    if (is_fd_exhaustion(err)) {
      if (!refuse_for_lack_of_fds(err)) return;
      continue;
    }
    log("accept on " + opt_.socket_path + ": " + errno_text(err));
    return;
  }
}

// Out of descriptors, accept() fails and a client would stay in the
// backlog, waking us forever: give up the spare descriptor to accept the
// client and close it at once. True if a client was refused (there may be
// more), false if none was pending or listening is paused.
bool Server::refuse_for_lack_of_fds(int err) {
  reserve_.reset();
  const int fd = ::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC);
  const int accept_err = errno;
  if (fd >= 0) {
    ::close(fd);
    log("refusing a client: accept: " + errno_text(err) + " (out of file descriptors)");
  }
  reserve_.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if ((fd < 0 && is_fd_exhaustion(accept_err)) || !reserve_.valid()) {
    // No way to take clients off the backlog now: stop listening until a
    // peer leaves and gives descriptors back.
    epoll_event ev{};
    ev.data.u64 = kListenTag;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, listen_.get(), &ev) == 0) {
      listen_paused_ = true;
      log("out of file descriptors (" + errno_text(err) + "): not accepting clients until a peer leaves");
    }
  }
  return fd >= 0 && !listen_paused_;
}

void Server::admit(UniqueFd sock) {
  std::optional<std::uint16_t> id;
  for (std::uint32_t i = 0; i < opt_.id_space; ++i) {
    const auto cand = static_cast<std::uint16_t>((next_id_ + i) % opt_.id_space);
    if (peers_.find(cand) == peers_.end()) {
      id = cand;
      break;
    }
  }
  if (!id) {
    log("refusing a client: all " + std::to_string(opt_.id_space) + " peer ids are in use");
    return;
  }
  auto p = std::make_unique<Peer>();
  p->id = *id;
  p->serial = next_serial_++;
  p->sock = std::move(sock);
  for (unsigned v = 0; v < opt_.vectors; ++v) {
    UniqueFd efd(::eventfd(0, EFD_CLOEXEC));
    if (!efd.valid()) {
      const int err = errno;
      log("refusing a client: eventfd: " + errno_text(err) +
          (is_fd_exhaustion(err) ? " (out of file descriptors)" : ""));
      return;
    }
    p->vectors.push_back(std::make_shared<const UniqueFd>(std::move(efd)));
  }
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP;
  ev.data.u64 = p->tag();
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, p->sock.get(), &ev) < 0) {
    log("refusing a client: epoll_ctl: " + errno_text(errno));
    return;
  }
  next_id_ = (std::uint32_t{*id} + 1) % opt_.id_space;
  Peer& np = *p;
  if (opt_.verbose)
    log("peer " + std::to_string(np.id) + " joined (" + std::to_string(opt_.vectors) + " vectors, " +
        std::to_string(peers_.size() + 1) + " peers)");
  // 1-3: version, the client's id, the shared memory.
  send(np, kProtocolVersion, nullptr);
  send(np, np.id, nullptr);
  send(np, -1, shm_);
  // The others learn about the new peer ...
  for (auto& [oid, o] : peers_)
    for (const auto& efd : np.vectors) send(*o, np.id, efd);
  // 4: ... and it about them (a peer that is just being dropped included:
  // its departure follows) ...
  for (auto& [oid, o] : peers_)
    for (const auto& efd : o->vectors) send(np, oid, efd);
  // 5: ... and its own eventfds, to receive interrupts on.
  for (const auto& efd : np.vectors) send(np, np.id, efd);
  peers_.emplace(np.id, std::move(p));
}

void Server::on_peer_event(std::uint64_t tag, std::uint32_t events) {
  const auto it = peers_.find(static_cast<std::uint16_t>(tag & 0xffff));
  if (it == peers_.end() || it->second->tag() != tag || it->second->dead) return;  // stale event
  Peer& p = *it->second;
  const std::string who = "peer " + std::to_string(p.id);
  if (events & EPOLLOUT) flush(p);
  if (p.dead || !(events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return;
  char buf[64];
  const ssize_t r = ::recv(p.sock.get(), buf, sizeof buf, MSG_DONTWAIT);
  if (r > 0)
    drop(p, who + " sent data, but the protocol is one-way (server to client): disconnected", true);
  else if (r == 0)
    drop(p, who + " left", false);
  else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
    drop(p, who + " left (" + errno_text(errno) + ")", false);
  else if (events & (EPOLLHUP | EPOLLERR))
    drop(p, who + " left (hangup)", false);
}

void Server::send(Peer& p, std::int64_t value, std::shared_ptr<const UniqueFd> fd) {
  if (p.dead) return;
  if (p.out.size() >= opt_.max_queued) {
    drop(p,
         "peer " + std::to_string(p.id) + " does not read its messages (" + std::to_string(p.out.size()) +
             " waiting): disconnected",
         true);
    return;
  }
  p.out.push_back(Message{value, std::move(fd)});
  if (p.out.size() == 1) flush(p);  // else EPOLLOUT is armed already
}

void Server::flush(Peer& p) {
  while (!p.out.empty()) {
    const Message& m = p.out.front();
    unsigned char bytes[8];
    const std::uint64_t raw = le64::to_raw(static_cast<std::uint64_t>(m.value));
    std::memcpy(bytes, &raw, sizeof bytes);
    iovec iov{bytes + p.out_off, sizeof bytes - p.out_off};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) unsigned char ctrl[CMSG_SPACE(sizeof(int))] = {};
    if (p.out_off == 0 && m.fd) {  // the descriptor travels with the first byte
      msg.msg_control = ctrl;
      msg.msg_controllen = sizeof ctrl;
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      const int fd = m.fd->get();
      std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    const ssize_t r = ::sendmsg(p.sock.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) {
        set_want_out(p, true);
        return;
      }
      const std::string who = "peer " + std::to_string(p.id);
      if (err == EPIPE || err == ECONNRESET)
        drop(p, who + " left", false);
      else
        drop(p, who + ": send: " + errno_text(err) + ": disconnected", true);
      return;
    }
    p.out_off += static_cast<std::size_t>(r);
    if (p.out_off == sizeof bytes) {
      p.out.pop_front();
      p.out_off = 0;
    }
  }
  set_want_out(p, false);
}

void Server::set_want_out(Peer& p, bool want) {
  if (p.want_out == want) return;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP | (want ? EPOLLOUT : 0u);
  ev.data.u64 = p.tag();
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, p.sock.get(), &ev) < 0) {
    drop(p, "peer " + std::to_string(p.id) + ": epoll_ctl: " + errno_text(errno) + ": disconnected", true);
    return;
  }
  p.want_out = want;
}

void Server::drop(Peer& p, std::string why, bool warn) {
  if (p.dead) return;
  p.dead = true;
  reap_pending_ = true;
  if (warn || opt_.verbose) log(why);
}

// Removes dropped peers: closes their connection and eventfds and tells
// every remaining client (their id without a descriptor). Telling may drop
// more peers, hence the loop.
void Server::reap() {
  while (reap_pending_) {
    reap_pending_ = false;
    for (auto it = peers_.begin(); it != peers_.end();) {
      if (!it->second->dead) {
        ++it;
        continue;
      }
      const std::uint16_t id = it->first;
      std::unique_ptr<Peer> gone = std::move(it->second);
      it = peers_.erase(it);
      ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, gone->sock.get(), nullptr);
      gone.reset();
      for (auto& [oid, o] : peers_) send(*o, id, nullptr);
      if (listen_paused_) {
        if (!reserve_.valid()) reserve_.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = kListenTag;
        if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, listen_.get(), &ev) == 0) listen_paused_ = false;
      }
    }
  }
}

}  // namespace uvirtio::apps::ivshmem
