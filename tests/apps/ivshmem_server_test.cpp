// uvirtio-ivshmem-server against clients with real sockets: the exact message
// sequence of QEMU's ivshmem protocol, shared memory and eventfds that are
// the same objects for every peer, join and leave announcements, id
// allocation, misbehaving clients, and the binary's cleanup on SIGTERM.
// Most tests run the server in-process on a thread; the last ones fork and
// exec the built binary (UVIRTIO_IVSHMEM_SERVER_BIN).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "ivshmem_server_lib.hpp"
#include "uvirtio/base/le.hpp"

namespace {

namespace iv = uvirtio::apps::ivshmem;
using iv::UniqueFd;
using namespace std::chrono_literals;

constexpr std::uint64_t kSize = 64 * 1024;

struct Msg {
  std::int64_t value = 0;
  UniqueFd fd;
  bool eof = false;  // the server closed the connection (no message)
};

// Receives one 8-byte message and the descriptor sent with it, waiting up to
// timeout_ms for it.
Msg recv_msg(int sock, int timeout_ms = 5000) {
  Msg m;
  unsigned char buf[8];
  std::size_t got = 0;
  while (got < sizeof buf) {
    pollfd pfd{sock, POLLIN, 0};
    if (::poll(&pfd, 1, timeout_ms) != 1) {
      ADD_FAILURE() << "no message from the server within " << timeout_ms << " ms";
      m.eof = true;
      return m;
    }
    iovec iov{buf + got, sizeof buf - got};
    alignas(cmsghdr) unsigned char ctrl[CMSG_SPACE(sizeof(int) * 4)];
    msghdr h{};
    h.msg_iov = &iov;
    h.msg_iovlen = 1;
    h.msg_control = ctrl;
    h.msg_controllen = sizeof ctrl;
    const ssize_t n = ::recvmsg(sock, &h, MSG_CMSG_CLOEXEC);
    if (n <= 0) {
      if (n < 0) ADD_FAILURE() << "recvmsg: " << std::strerror(errno);
      if (got != 0) ADD_FAILURE() << "connection closed inside a message";
      m.eof = true;
      return m;
    }
    EXPECT_FALSE(h.msg_flags & MSG_CTRUNC);
    for (cmsghdr* c = CMSG_FIRSTHDR(&h); c != nullptr; c = CMSG_NXTHDR(&h, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const std::size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (std::size_t i = 0; i < nfds; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        if (m.fd.valid() || got != 0) {
          ADD_FAILURE() << "more than one descriptor with one message";
          ::close(fd);
        } else {
          m.fd.reset(fd);
        }
      }
    }
    got += static_cast<std::size_t>(n);
  }
  std::uint64_t raw;
  std::memcpy(&raw, buf, sizeof raw);
  m.value = static_cast<std::int64_t>(uvirtio::le64::from_raw(raw));
  return m;
}

bool readable(int fd, int timeout_ms) {
  pollfd pfd{fd, POLLIN, 0};
  return ::poll(&pfd, 1, timeout_ms) == 1;
}

std::string fd_target(int fd) {
  char buf[256];
  const ssize_t n = ::readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), buf, sizeof buf - 1);
  return n < 0 ? std::string() : std::string(buf, static_cast<std::size_t>(n));
}

// How many eventfds a process holds.
int eventfds_of(pid_t pid) {
  int n = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    std::error_code ec2;
    if (std::filesystem::read_symlink(e.path(), ec2).string() == "anon_inode:[eventfd]") ++n;
  }
  return n;
}

UniqueFd connect_to(const std::string& path) {
  UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  if (::connect(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) < 0)
    ADD_FAILURE() << "connect " << path << ": " << std::strerror(errno);
  return s;
}

std::uint64_t eventfd_read(int fd) {
  std::uint64_t v = 0;
  EXPECT_EQ(::read(fd, &v, sizeof v), 8);
  return v;
}

void eventfd_write(int fd, std::uint64_t v) { EXPECT_EQ(::write(fd, &v, sizeof v), 8); }

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A client that has joined: its id, the shared memory, its own eventfds
// (interrupts for it) and the peers' (to interrupt them).
struct Client {
  UniqueFd sock;
  std::int64_t id = -1;
  UniqueFd shm;
  std::vector<UniqueFd> own;
  std::map<std::int64_t, std::vector<UniqueFd>> peers;
};

// Reads a join announcement: id repeated once per vector, each with an fd.
void expect_announcement(Client& c, std::int64_t id, unsigned vectors) {
  for (unsigned v = 0; v < vectors; ++v) {
    Msg m = recv_msg(c.sock.get());
    ASSERT_FALSE(m.eof);
    EXPECT_EQ(m.value, id) << "vector " << v;
    ASSERT_TRUE(m.fd.valid()) << "announcement of peer " << id << " vector " << v << " has no descriptor";
    EXPECT_EQ(fd_target(m.fd.get()), "anon_inode:[eventfd]");
    c.peers[id].push_back(std::move(m.fd));
  }
}

void expect_leave(Client& c, std::int64_t id) {
  Msg m = recv_msg(c.sock.get());
  ASSERT_FALSE(m.eof);
  EXPECT_EQ(m.value, id);
  EXPECT_FALSE(m.fd.valid()) << "a leave comes without a descriptor";
  c.peers.erase(id);
}

class IvshmemServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ivsrv-test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    stop();
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  iv::ServerOptions options() {
    iv::ServerOptions o;
    o.socket_path = dir_ + "/sock";
    o.shm_size = kSize;
    o.vectors = 2;
    o.verbose = true;
    o.log = [this](const std::string& line) {
      std::lock_guard g(mu_);
      log_.push_back(line);
    };
    return o;
  }

  void start(const iv::ServerOptions& o) {
    vectors_ = o.vectors;
    auto s = iv::Server::start(o);
    ASSERT_TRUE(s) << s.error().message();
    server_ = std::move(*s);
    thread_ = std::thread([this] {
      auto r = server_->run();
      EXPECT_TRUE(r) << r.error().message();
    });
  }
  void start() { start(options()); }

  void stop() {
    if (!thread_.joinable()) return;
    server_->request_stop();
    thread_.join();
  }

  // Waits until a log line contains text.
  bool logged(const std::string& text, std::chrono::milliseconds within = 5000ms) {
    const auto until = std::chrono::steady_clock::now() + within;
    do {
      {
        std::lock_guard g(mu_);
        for (const auto& l : log_)
          if (l.find(text) != std::string::npos) return true;
      }
      std::this_thread::sleep_for(5ms);
    } while (std::chrono::steady_clock::now() < until);
    return false;
  }
  std::string log_text() {
    std::lock_guard g(mu_);
    std::string all;
    for (const auto& l : log_) all += l + "\n";
    return all;
  }

  // Connects and reads the whole join sequence, checking it message by
  // message: version, id, shared memory, each existing peer (ascending ids)
  // once per vector, then the client's own id once per vector.
  Client join(const std::vector<std::int64_t>& existing, std::int64_t want_id = -1, bool then_quiet = true) {
    Client c;
    c.sock = connect_to(options().socket_path);
    Msg version = recv_msg(c.sock.get());
    if (version.eof) {
      ADD_FAILURE() << "connection closed before the version";
      return c;
    }
    EXPECT_EQ(version.value, 0) << "protocol version";
    EXPECT_FALSE(version.fd.valid());
    Msg id = recv_msg(c.sock.get());
    EXPECT_FALSE(id.fd.valid());
    EXPECT_GE(id.value, 0);
    EXPECT_LE(id.value, 65535);
    if (want_id >= 0) {
      EXPECT_EQ(id.value, want_id) << "peer id";
    }
    c.id = id.value;
    Msg shm = recv_msg(c.sock.get());
    EXPECT_EQ(shm.value, -1);
    EXPECT_TRUE(shm.fd.valid()) << "the shared memory message has no descriptor";
    c.shm = std::move(shm.fd);
    for (std::int64_t p : existing) expect_announcement(c, p, vectors_);
    for (unsigned v = 0; v < vectors_; ++v) {
      Msg m = recv_msg(c.sock.get());
      EXPECT_EQ(m.value, c.id) << "own vector " << v;
      EXPECT_TRUE(m.fd.valid());
      c.own.push_back(std::move(m.fd));
    }
    if (then_quiet) {
      EXPECT_FALSE(readable(c.sock.get(), 20)) << "unexpected message after the join sequence";
    }
    return c;
  }

  std::string dir_;
  unsigned vectors_ = 2;
  std::unique_ptr<iv::Server> server_;
  std::thread thread_;
  std::mutex mu_;
  std::vector<std::string> log_;
};

// ---- options -------------------------------------------------------------------

TEST(IvshmemServerOptions, ParseSize) {
  EXPECT_EQ(iv::parse_size("4096"), 4096u);
  EXPECT_EQ(iv::parse_size("4M"), 4u << 20);
  EXPECT_EQ(iv::parse_size("4m"), 4u << 20);
  EXPECT_EQ(iv::parse_size("64K"), 64u << 10);
  EXPECT_EQ(iv::parse_size("1G"), 1u << 30);
  EXPECT_EQ(iv::parse_size("2T"), std::uint64_t{2} << 40);
  EXPECT_EQ(iv::parse_size("0x10000"), 65536u);
  EXPECT_EQ(iv::parse_size("010"), 10u) << "no octal";
  for (const char* bad :
       {"", "-4M", "4Q", "4MB", " 4M", "M", "0x", "99999999999999999999", "17179869184T", "4.5M"})
    EXPECT_FALSE(iv::parse_size(bad)) << bad;
}

TEST(IvshmemServerOptions, Validate) {
  auto message = [](auto change) {
    iv::ServerOptions o;
    change(o);
    auto r = iv::validate(o);
    return r ? std::string("ok") : r.error().message();
  };
  EXPECT_EQ(message([](iv::ServerOptions&) {}), "ok");
  EXPECT_EQ(message([](iv::ServerOptions& o) { o.shm_size = 3 << 20; }),
            "--size: 3145728 bytes is not a power of two (QEMU maps the memory as a PCI BAR)");
  EXPECT_EQ(message([](iv::ServerOptions& o) { o.shm_size = 2048; }),
            "--size: must be at least 4K (one page)");
  EXPECT_EQ(message([](iv::ServerOptions& o) { o.shm_size = 0; }),
            "--size: 0 bytes is not a power of two (QEMU maps the memory as a PCI BAR)");
  EXPECT_EQ(message([](iv::ServerOptions& o) { o.vectors = 0; }), "--vectors: must be 1..1024");
  EXPECT_EQ(message([](iv::ServerOptions& o) { o.vectors = 1025; }), "--vectors: must be 1..1024");
  EXPECT_EQ(message([](iv::ServerOptions& o) { o.vectors = 1024; }), "ok");
  EXPECT_NE(message([](iv::ServerOptions& o) { o.socket_path = std::string(108, 'a'); }).find("at most 107"),
            std::string::npos);
  EXPECT_EQ(message([](iv::ServerOptions& o) { o.socket_path = std::string(107, 'a'); }), "ok");
  EXPECT_EQ(message([](iv::ServerOptions& o) {
              o.shm_file = "/dev/shm/x";
              o.shm_name = "x";
            }),
            "--shm-path: give --shm-path or --shm-name, not both");
  EXPECT_NE(message([](iv::ServerOptions& o) { o.shm_name = "a/b"; }), "ok");
}

// ---- the protocol --------------------------------------------------------------

TEST_F(IvshmemServerTest, FirstClientGetsVersionIdMemoryAndItsEventfds) {
  start();
  Client a = join({}, 0);
  // The shared memory: the right size, mappable read-write.
  struct stat st {};
  ASSERT_EQ(::fstat(a.shm.get(), &st), 0);
  EXPECT_EQ(static_cast<std::uint64_t>(st.st_size), kSize);
  void* p = ::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, a.shm.get(), 0);
  ASSERT_NE(p, MAP_FAILED);
  static_cast<volatile char*>(p)[kSize - 1] = 42;
  EXPECT_EQ(static_cast<volatile char*>(p)[kSize - 1], 42);
  ::munmap(p, kSize);
  // One eventfd per vector, distinct objects.
  ASSERT_EQ(a.own.size(), 2u);
  for (const auto& fd : a.own) EXPECT_EQ(fd_target(fd.get()), "anon_inode:[eventfd]");
  eventfd_write(a.own[0].get(), 1);
  EXPECT_TRUE(readable(a.own[0].get(), 0));
  EXPECT_FALSE(readable(a.own[1].get(), 0));
  EXPECT_TRUE(logged("peer 0 joined (2 vectors, 1 peers)"));
}

TEST_F(IvshmemServerTest, AnonymousMemoryCannotBeResizedByAClient) {
  start();
  Client a = join({}, 0);
  EXPECT_LT(::ftruncate(a.shm.get(), 0), 0) << "a client could shrink the memory under the others";
  EXPECT_LT(::ftruncate(a.shm.get(), 2 * kSize), 0);
}

TEST_F(IvshmemServerTest, PeersLearnAboutEachOtherAndShareTheSameObjects) {
  start();
  Client a = join({}, 0);
  Client b = join({0}, 1);
  expect_announcement(a, 1, 2);  // A is told about B
  EXPECT_FALSE(readable(a.sock.get(), 20));

  // One shared memory.
  auto* ma =
      static_cast<volatile char*>(::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, a.shm.get(), 0));
  auto* mb =
      static_cast<volatile char*>(::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, b.shm.get(), 0));
  ASSERT_NE(ma, MAP_FAILED);
  ASSERT_NE(mb, MAP_FAILED);
  ma[100] = 7;
  EXPECT_EQ(mb[100], 7);
  ::munmap(const_cast<char*>(ma), kSize);
  ::munmap(const_cast<char*>(mb), kSize);

  // A doorbell: writing the eventfd A got for (B, vector 1) wakes the one
  // B got for itself on vector 1, and only that one.
  eventfd_write(a.peers[1][1].get(), 1);
  ASSERT_TRUE(readable(b.own[1].get(), 1000));
  EXPECT_EQ(eventfd_read(b.own[1].get()), 1u);
  EXPECT_FALSE(readable(b.own[0].get(), 0));
  // And the other way round.
  eventfd_write(b.peers[0][0].get(), 5);
  ASSERT_TRUE(readable(a.own[0].get(), 1000));
  EXPECT_EQ(eventfd_read(a.own[0].get()), 5u);
  EXPECT_FALSE(readable(a.own[1].get(), 0));

  // A third client hears of both, in ascending id order; both hear of it.
  Client c = join({0, 1}, 2);
  expect_announcement(a, 2, 2);
  expect_announcement(b, 2, 2);
  eventfd_write(c.peers[1][0].get(), 1);
  EXPECT_TRUE(readable(b.own[0].get(), 1000));
  eventfd_write(a.peers[2][1].get(), 1);
  EXPECT_TRUE(readable(c.own[1].get(), 1000));
}

TEST_F(IvshmemServerTest, LeaveIsAnnouncedWithTheIdAndNoDescriptor) {
  start();
  Client a = join({}, 0);
  Client b = join({0}, 1);
  Client c = join({0, 1}, 2);
  expect_announcement(a, 1, 2);
  expect_announcement(a, 2, 2);
  expect_announcement(b, 2, 2);
  b.sock.reset();
  expect_leave(a, 1);
  expect_leave(c, 1);
  EXPECT_FALSE(readable(a.sock.get(), 20));
  EXPECT_FALSE(readable(c.sock.get(), 20));
  EXPECT_TRUE(logged("peer 1 left"));
  stop();
  EXPECT_EQ(server_->peer_ids(), (std::vector<std::uint16_t>{0, 2}));
}

// Like QEMU's server: the next id is the first free one after the last one
// given out, wrapping around; a freed id is not reused at once.
TEST_F(IvshmemServerTest, IdsAdvancePastFreedOnesAndWrapAround) {
  auto o = options();
  o.id_space = 4;
  o.vectors = 1;
  start(o);
  Client a = join({}, 0);
  Client b = join({0}, 1);
  a.sock.reset();
  ASSERT_TRUE(logged("peer 0 left"));
  Client c = join({1}, 2);  // not 0
  Client d = join({1, 2}, 3);
  Client e = join({1, 2, 3}, 0);  // wrapped to the free one
  // All four ids in use: the next client is refused, with no message at all.
  UniqueFd f = connect_to(o.socket_path);
  Msg m = recv_msg(f.get());
  EXPECT_TRUE(m.eof) << "a client beyond the id space got message " << m.value;
  EXPECT_TRUE(logged("refusing a client: all 4 peer ids are in use"));
  b.sock.reset();
  ASSERT_TRUE(logged("peer 1 left"));
  Client g = join({0, 2, 3}, 1);
}

TEST_F(IvshmemServerTest, ClientThatSendsDataIsDisconnected) {
  start();
  Client a = join({}, 0);
  Client b = join({0}, 1);
  expect_announcement(a, 1, 2);
  ASSERT_EQ(::write(b.sock.get(), "hello", 5), 5);
  expect_leave(a, 1);
  EXPECT_TRUE(recv_msg(b.sock.get()).eof);
  EXPECT_TRUE(logged("peer 1 sent data, but the protocol is one-way"));
  // The server goes on serving.
  Client c = join({0}, 2);
  expect_announcement(a, 2, 2);
}

// A client that never reads must not stall the server: its messages queue
// up to a limit, then it is dropped.
TEST_F(IvshmemServerTest, ClientThatDoesNotReadIsDroppedNotWaitedFor) {
  auto o = options();
  o.max_queued = 8;
  start(o);
  Client lazy = join({}, 0);  // reads its join sequence, then nothing more
  // Each round a client joins (fully served) and leaves, which makes three
  // messages for the lazy one.
  bool dropped = false;
  int rounds = 0;
  for (; rounds < 5000 && !dropped; ++rounds) {
    Client c = join({0}, -1, false);
    ASSERT_GE(c.id, 1) << "round " << rounds;
    dropped = logged("peer 0 does not read its messages (8 waiting): disconnected", 0ms);
    if (dropped) expect_leave(c, 0);  // it was dropped while c joined
    EXPECT_FALSE(readable(c.sock.get(), 0));
    if (::testing::Test::HasFailure()) return;
  }
  ASSERT_TRUE(dropped) << "never dropped after " << rounds << " rounds";
  // The lazy client gets what fitted in its socket, then the end.
  int msgs = 0;
  while (!recv_msg(lazy.sock.get()).eof) ++msgs;
  EXPECT_GT(msgs, 0);
  stop();
  EXPECT_TRUE(server_->peer_ids().empty());
}

// ---- the socket and the memory backing -----------------------------------------

TEST_F(IvshmemServerTest, LiveSocketIsRefusedStaleSocketReplacedOtherFilesKept) {
  start();
  auto second = iv::Server::start(options());
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().code(), uvirtio::Errc::busy);
  EXPECT_EQ(second.error().message(), dir_ + "/sock: listen: another server is listening on this socket");

  // A socket file nobody listens on is removed and replaced.
  const std::string stale = dir_ + "/stale";
  {
    UniqueFd s(::socket(AF_UNIX, SOCK_STREAM, 0));
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, stale.c_str(), sizeof a.sun_path - 1);
    ASSERT_EQ(::bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  }
  ASSERT_TRUE(std::filesystem::is_socket(stale));
  auto o = options();
  o.socket_path = stale;
  auto third = iv::Server::start(o);
  ASSERT_TRUE(third) << third.error().message();
  EXPECT_TRUE(std::filesystem::is_socket(stale));
  third->reset();
  EXPECT_FALSE(std::filesystem::exists(stale)) << "the socket file stays after the server ends";

  // Anything else at the path is left alone.
  const std::string file = dir_ + "/file";
  std::ofstream(file) << "precious";
  o.socket_path = file;
  auto fourth = iv::Server::start(o);
  ASSERT_FALSE(fourth);
  EXPECT_EQ(fourth.error().message(),
            file + ": listen: the path exists and is not a socket (not removing it)");
  EXPECT_EQ(slurp(file), "precious");
}

TEST_F(IvshmemServerTest, SocketFileIsRemovedWhenTheServerEnds) {
  start();
  Client a = join({}, 0);
  stop();
  server_.reset();
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/sock"));
  EXPECT_TRUE(recv_msg(a.sock.get()).eof);
}

TEST_F(IvshmemServerTest, FileBackedMemoryCreatedAndRemovedOrReusedAndKept) {
  auto o = options();
  o.shm_file = dir_ + "/shm";
  start(o);
  ASSERT_EQ(std::filesystem::file_size(o.shm_file), kSize);
  Client a = join({}, 0);
  struct stat mine {
  }, file{};
  ASSERT_EQ(::fstat(a.shm.get(), &mine), 0);
  ASSERT_EQ(::stat(o.shm_file.c_str(), &file), 0);
  EXPECT_EQ(mine.st_ino, file.st_ino) << "the client got another file";
  stop();
  server_.reset();
  EXPECT_FALSE(std::filesystem::exists(o.shm_file)) << "a file the server created stays";

  // An existing file of the right size is used as it is, and kept.
  {
    std::ofstream f(o.shm_file);
    f << "hello";
  }
  std::filesystem::resize_file(o.shm_file, kSize);
  start(o);
  Client b = join({}, 0);
  char buf[5] = {};
  EXPECT_EQ(::pread(b.shm.get(), buf, 5, 0), 5);
  EXPECT_EQ(std::string(buf, 5), "hello");
  stop();
  server_.reset();
  EXPECT_TRUE(std::filesystem::exists(o.shm_file));

  // One of another size is not resized.
  std::filesystem::resize_file(o.shm_file, 100);
  auto r = iv::Server::start(o);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().message(),
            o.shm_file +
                ": use as shared memory: it has 100 bytes, --size asks for 65536 (give its "
                "size, or remove it)");
  EXPECT_EQ(std::filesystem::file_size(o.shm_file), 100u);
}

TEST_F(IvshmemServerTest, PosixShmObjectCreatedAndRemoved) {
  auto o = options();
  o.shm_name = "/uvirtio-ivsrv-test-" + std::to_string(::getpid());
  start(o);
  Client a = join({}, 0);
  const std::string dev_shm = "/dev/shm" + o.shm_name;
  struct stat mine {
  }, obj{};
  ASSERT_EQ(::fstat(a.shm.get(), &mine), 0);
  ASSERT_EQ(::stat(dev_shm.c_str(), &obj), 0);
  EXPECT_EQ(mine.st_ino, obj.st_ino);
  EXPECT_EQ(static_cast<std::uint64_t>(obj.st_size), kSize);
  stop();
  server_.reset();
  EXPECT_FALSE(std::filesystem::exists(dev_shm));
}

// ---- the binary ----------------------------------------------------------------

class IvshmemServerBinaryTest : public IvshmemServerTest {
 protected:
  // Starts the server binary with args, its output in NAME.out and NAME.err;
  // nofile > 0 limits its descriptors.
  void spawn(std::vector<std::string> args, const std::string& name = "server", rlim_t nofile = 0) {
    args.insert(args.begin(), UVIRTIO_IVSHMEM_SERVER_BIN);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const std::string out = dir_ + "/" + name + ".out", err = dir_ + "/" + name + ".err";
    pid_ = ::fork();
    ASSERT_GE(pid_, 0);
    if (pid_ == 0) {
      const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      const int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(o, 1);
      ::dup2(e, 2);
      ::close_range(3, ~0u, 0);
      if (nofile > 0) {
        rlimit lim{nofile, nofile};
        ::setrlimit(RLIMIT_NOFILE, &lim);
      }
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
  }
  bool wait_for_file(const std::string& path) {
    for (int i = 0; i < 1000; ++i) {
      if (std::filesystem::exists(path)) return true;
      int status;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return false;
      }
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }
  // Sends sig and returns the exit status; -1 if it did not exit normally
  // within 5 s (then it is killed).
  int terminate(int sig) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, sig);
    int status = 0;
    pid_t r = 0;
    for (int i = 0; i < 500 && (r = ::waitpid(pid_, &status, WNOHANG)) == 0; ++i)
      std::this_thread::sleep_for(10ms);
    if (r == 0) {
      ADD_FAILURE() << "the server did not exit within 5 s of signal " << sig;
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status, 0);
      pid_ = -1;
      return -1;
    }
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  bool stderr_has(const std::string& text) {
    for (int i = 0; i < 500; ++i) {
      if (slurp(dir_ + "/server.err").find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }
  void TearDown() override {
    if (pid_ > 0) terminate(SIGKILL);
    IvshmemServerTest::TearDown();
  }
  pid_t pid_ = -1;
};

TEST_F(IvshmemServerBinaryTest, ServesAndCleansUpOnSigterm) {
  const std::string sock = dir_ + "/sock", pid = dir_ + "/pid", ready = dir_ + "/ready";
  spawn({"-S", sock, "-l", "64K", "-n", "2", "-v", "-p", pid, "--ready-file", ready, "-F"});
  ASSERT_TRUE(wait_for_file(ready)) << slurp(dir_ + "/server.err");
  EXPECT_EQ(slurp(pid), std::to_string(pid_) + "\n");
  EXPECT_EQ(slurp(ready), std::to_string(pid_) + "\n");
  EXPECT_EQ(slurp(dir_ + "/server.out"),
            "listening on " + sock + " (64 KiB shared memory, anonymous memfd; 2 vectors)\n");

  Client a = join({}, 0);
  Client b = join({0}, 1);
  expect_announcement(a, 1, 2);
  EXPECT_EQ(eventfds_of(pid_), 1 + 2 * 2) << "its stop eventfd and 2 per peer";
  // A second server on the same socket is refused and leaves it alone.
  {
    const pid_t first = pid_;
    spawn({"-S", sock}, "second");
    int status = 0;
    ASSERT_EQ(::waitpid(pid_, &status, 0), pid_);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1);
    EXPECT_EQ(slurp(dir_ + "/second.err"),
              "uvirtio-ivshmem-server: " + sock + ": listen: another server is listening on this socket\n");
    pid_ = first;
  }
  EXPECT_TRUE(std::filesystem::is_socket(sock));
  // The second server's probe was a short-lived client (id 2): A and B heard
  // it come and go.
  expect_announcement(a, 2, 2);
  expect_leave(a, 2);
  expect_announcement(b, 2, 2);
  expect_leave(b, 2);

  b.sock.reset();
  expect_leave(a, 1);
  EXPECT_EQ(eventfds_of(pid_), 1 + 2) << "the server kept a departed peer's eventfds";

  EXPECT_EQ(terminate(SIGTERM), 0);
  EXPECT_FALSE(std::filesystem::exists(sock));
  EXPECT_FALSE(std::filesystem::exists(pid));
  EXPECT_FALSE(std::filesystem::exists(ready));
  EXPECT_TRUE(recv_msg(a.sock.get()).eof);
}

TEST_F(IvshmemServerBinaryTest, SigintAlsoCleansUpAndKeepsAnExistingShmFile) {
  const std::string sock = dir_ + "/sock", shm = dir_ + "/shm", ready = dir_ + "/ready";
  std::ofstream(shm).close();
  std::filesystem::resize_file(shm, kSize);
  spawn({"-S", sock, "-l", "64K", "-m", shm, "--ready-file", ready});
  ASSERT_TRUE(wait_for_file(ready)) << slurp(dir_ + "/server.err");
  vectors_ = 1;  // the default
  Client a = join({}, 0);
  EXPECT_EQ(terminate(SIGINT), 0);
  EXPECT_FALSE(std::filesystem::exists(sock));
  EXPECT_TRUE(std::filesystem::exists(shm)) << "removed a shared memory file it had not created";
}

TEST_F(IvshmemServerBinaryTest, OutOfDescriptorsRefusesClientsAndRecovers) {
  const std::string sock = dir_ + "/sock", ready = dir_ + "/ready";
  vectors_ = 1;
  spawn({"-S", sock, "-l", "64K", "-n", "1", "-v", "--ready-file", ready}, "server", 16);
  ASSERT_TRUE(wait_for_file(ready)) << slurp(dir_ + "/server.err");
  std::vector<Client> joined;
  bool refused = false;
  for (int i = 0; i < 40 && !refused; ++i) {
    UniqueFd s = connect_to(sock);
    Msg m = recv_msg(s.get());
    if (m.eof) {
      refused = true;
      break;
    }
    // Joined: read the rest of the sequence.
    Client c;
    c.sock = std::move(s);
    c.id = recv_msg(c.sock.get()).value;
    c.shm = recv_msg(c.sock.get()).fd;
    for (auto& p : joined) expect_announcement(c, p.id, 1);
    c.own.push_back(recv_msg(c.sock.get()).fd);
    for (auto& p : joined) expect_announcement(p, c.id, 1);
    joined.push_back(std::move(c));
  }
  ASSERT_TRUE(refused) << "never ran out of descriptors";
  ASSERT_GE(joined.size(), 2u);
  EXPECT_TRUE(stderr_has("(out of file descriptors)")) << slurp(dir_ + "/server.err");
  // A peer leaves; its descriptors make room for a new one.
  const std::int64_t gone = joined.back().id;
  joined.pop_back();
  for (auto& p : joined) expect_leave(p, gone);
  std::vector<std::int64_t> ids;
  for (auto& p : joined) ids.push_back(p.id);
  Client fresh = join(ids);
  EXPECT_GE(fresh.id, 0);
  EXPECT_EQ(terminate(SIGTERM), 0);
  EXPECT_FALSE(std::filesystem::exists(sock));
}

}  // namespace
