// uvirtio-bench channel: the inter-VM message channel (rings/channel.hpp)
// between two host processes (fork; a memfd window; eventfd doorbells),
// against baselines measured in the same run:
//   - Unix-domain socket and TCP loopback: ping-pong round trip (one write
//     and one read per direction) and streaming (one write per message, the
//     receiver reading 64 KiB at a time);
//   - the bare SPSC ring of 64-byte slots between two threads (ceiling) and
//     the cache-line round trip (floor), from bench_common.hpp;
//   - the wake-up alone: two processes ping-ponging on blocking eventfds
//     (no data), what any sleeping round trip pays here.
// Channel figures:
//   - streaming: messages of --size bytes, producer and consumer polling,
//     both publishing their index once per --batch messages;
//   - round trip, polling: both sides spin (no doorbell wake-up);
//   - round trip, doorbell: both sides sleep at once (spin 0), so every
//     message is an eventfd wake-up of a sleeping process;
//   - round trip, hybrid: the default 50 us spin, then sleep.
// Every point is measured in --rounds rounds interleaved with the others;
// the medians are reported (the vCPUs here move around).
//
// The channel roles (chanbench:: below) take a Channel& and talk to the
// other side only through it: run_peer() serves commands on one side, the
// run_*_sender/initiator functions drive from the other. A peer in another
// VM (ivshmem) runs the same run_peer() on its Channel.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bench_common.hpp"
#include "cli_common.hpp"
#include "uvirtio/driver/ivshmem.hpp"
#include "uvirtio/pci/eventfd_doorbell.hpp"
#include "uvirtio/pci/os.hpp"
#include "uvirtio/rings/channel.hpp"

namespace uvirtio::apps {
namespace chanbench {

using channel::Channel;
using channel::Flush;
using Clock = BenchClock;
using namespace std::chrono_literals;

// Control messages (16 bytes): tag, wake mode, 2 zero bytes, le32 size,
// le64 value. Data messages start with the tag 'D'.
constexpr std::byte kData{'D'}, kStream{'S'}, kPing{'P'}, kEnd{'E'}, kAck{'A'}, kQuit{'Q'};
constexpr std::chrono::seconds kTimeout(10);  // any single wait on the peer
constexpr std::size_t kCmd = 16;

// doorbell_one_cpu: as doorbell, with both processes pinned to one CPU for
// the phase, so a wake-up is a context switch on that CPU rather than the
// hypervisor waking the other, halted vCPU (~25 us each way here, the same
// for every mechanism): what is left is the wake-up path's own cost.
// doorbell_two_cpus: as doorbell, the initiator pinned to one CPU and the
// responder to another, so every wake-up crosses vCPUs, as between two VMs;
// without pinning the scheduler sometimes puts both on one CPU for a while,
// and a round then measures where they were rather than the mechanism.
enum class Wake : std::uint8_t {
  poll = 0,
  doorbell = 1,
  hybrid = 2,
  doorbell_one_cpu = 3,
  doorbell_two_cpus = 4
};

// The index-th CPU (0: the first) the calling thread may run on now, or -1.
int allowed_cpu(int index) {
  cpu_set_t set;
  if (index < 0 || ::sched_getaffinity(0, sizeof set, &set) != 0) return -1;
  int seen = 0;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set) && seen++ == index) return c;
  return -1;
}

// Pins the calling thread to CPU `cpu` and restores its affinity when
// destroyed. Inert when `cpu` is negative or the kernel refuses.
class PinCpu {
 public:
  explicit PinCpu(int cpu) {
    if (cpu < 0 || ::sched_getaffinity(0, sizeof saved_, &saved_) != 0) return;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pinned_ = ::sched_setaffinity(0, sizeof one, &one) == 0;
  }
  ~PinCpu() {
    if (pinned_) (void)::sched_setaffinity(0, sizeof saved_, &saved_);
  }
  PinCpu(const PinCpu&) = delete;
  PinCpu& operator=(const PinCpu&) = delete;

 private:
  cpu_set_t saved_{};
  bool pinned_ = false;
};

// Where the two processes of a ping-pong run.
enum class Placement { scheduler, one_cpu, two_cpus };
// The CPU the initiator and the responder pin to (-1: none), taken from the
// calling thread's affinity before either pins.
int initiator_cpu(Placement p) { return p == Placement::scheduler ? -1 : allowed_cpu(0); }
int responder_cpu(Placement p) {
  return p == Placement::scheduler ? -1 : allowed_cpu(p == Placement::one_cpu ? 0 : 1);
}
Placement placement_of(Wake w) {
  return w == Wake::doorbell_one_cpu
             ? Placement::one_cpu
             : (w == Wake::doorbell_two_cpus ? Placement::two_cpus : Placement::scheduler);
}

std::chrono::nanoseconds spin_for(Wake w) {
  switch (w) {
    case Wake::poll:
      return kTimeout;  // never sleeps within a wait
    case Wake::doorbell:
    case Wake::doorbell_one_cpu:
    case Wake::doorbell_two_cpus:
      return 0ns;
    case Wake::hybrid:
      break;
  }
  return 50us;
}

struct StreamResult {
  std::uint64_t messages = 0;
  double seconds = 0;
  double msgs_per_s = 0;
};

struct RoundTripResult {
  std::uint64_t trips = 0;
  double mean_ns = 0;
  double p50_ns = 0;
  double p99_ns = 0;
};

// Mean over `total_ns`, p50 and p99 of per-trip samples (at least one).
RoundTripResult summarize(std::vector<double> samples, double total_ns) {
  RoundTripResult r;
  r.trips = samples.size();
  r.mean_ns = total_ns / static_cast<double>(samples.size());
  std::sort(samples.begin(), samples.end());
  r.p50_ns = samples[samples.size() / 2];
  r.p99_ns = samples[std::min(samples.size() - 1, samples.size() * 99 / 100)];
  return r;
}

std::array<std::byte, kCmd> command(std::byte tag, Wake wake = Wake::poll, std::uint32_t size = 0,
                                    std::uint64_t value = 0) {
  std::array<std::byte, kCmd> c{};
  c[0] = tag;
  c[1] = std::byte(static_cast<std::uint8_t>(wake));
  for (int i = 0; i < 4; ++i) c[4 + i] = std::byte(static_cast<std::uint8_t>(size >> (8 * i)));
  for (int i = 0; i < 8; ++i) c[8 + i] = std::byte(static_cast<std::uint8_t>(value >> (8 * i)));
  return c;
}
std::uint64_t get_value(std::span<const std::byte> m) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= std::uint64_t(static_cast<std::uint8_t>(m[8 + i])) << (8 * i);
  return v;
}

Error protocol_error(const Channel& ch, const char* op, const std::string& what) {
  return Error(Errc::bad_device_data, ch.name(), op, what);
}

Result<std::span<const std::byte>> expect(Channel& ch, std::byte tag, const char* op) {
  UV_TRY(auto m, ch.peek(kTimeout));
  if (m.size() < kCmd || m[0] != tag)
    return protocol_error(ch, op,
                          "expected a '" + std::string(1, static_cast<char>(tag)) + "' message, got " +
                              std::to_string(m.size()) + " bytes starting with '" +
                              (m.empty() ? std::string() : std::string(1, static_cast<char>(m[0]))) + "'");
  return m;
}

// Streams data messages for `seconds`, then an end marker with the count;
// the rate counts until the receiver's acknowledgement (all delivered).
Result<StreamResult> run_stream_sender(Channel& ch, std::size_t size, double seconds, unsigned batch) {
  const auto cmd = command(kStream, Wake::poll, static_cast<std::uint32_t>(size));
  UV_TRY_VOID(ch.send(cmd, kTimeout));
  std::uint64_t count = 0;
  unsigned to_flush = batch;  // a countdown: count % batch was a 64-bit division per message
  const auto start = Clock::now();
  const auto until =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  for (;;) {
    for (int i = 0; i < 1024; ++i) {
      // The result is used in place: copying the optional out (as UV_TRY
      // does) costs a store-forwarding stall per message, ~5 ns here.
      auto r = ch.try_reserve(size);
      if (!r) return std::move(r).error();
      if (!*r) {
        cpu_relax();
        continue;
      }
      const std::span<std::byte>* slot = &**r;
      if (size == 64)  // the bare ring's constant-size fill, inlined the same way
        std::memset(slot->data(), static_cast<int>(count), 64);
      else
        std::memset(slot->data(), static_cast<int>(count), size);
      (*slot)[0] = kData;
      ++count;
      const bool now = --to_flush == 0;
      if (now) to_flush = batch;
      UV_TRY_VOID(ch.commit(size, now ? Flush::now : Flush::later));
    }
    if (Clock::now() >= until) break;
  }
  UV_TRY_VOID(ch.flush_sent());
  const auto end = command(kEnd, Wake::poll, 0, count);
  UV_TRY_VOID(ch.send(end, kTimeout));
  UV_TRY(const auto ack, expect(ch, kAck, "stream: acknowledgement"));
  const std::uint64_t got = get_value(ack);
  UV_TRY_VOID(ch.release());
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  if (got != count)
    return protocol_error(ch, "stream",
                          "sent " + std::to_string(count) + " messages, the peer got " + std::to_string(got));
  return StreamResult{count, secs, static_cast<double>(count) / secs};
}

// Counts data messages until the end marker; acknowledges with the count.
Result<std::uint64_t> run_stream_receiver(Channel& ch, unsigned batch) {
  std::uint64_t count = 0, sum = 0, idle = 0, seen_at_check = 0;
  unsigned to_flush = batch;  // see run_stream_sender
  for (;;) {
    auto r = ch.try_peek();  // used in place, see run_stream_sender
    if (!r) return std::move(r).error();
    const auto& m = *r;
    if (!m) {
      // Every so often: is the peer still there?
      if (++idle % (1u << 20) == 0) {
        if (count == seen_at_check && !ch.peer_present())
          return Error(Errc::peer_gone, ch.name(), "stream", "the sender went away");
        seen_at_check = count;
      }
      cpu_relax();
      continue;
    }
    const std::span<const std::byte> msg = *m;
    if (!msg.empty() && msg[0] == kData) {
      sum += static_cast<std::uint8_t>(msg[0]);  // one byte per message, as the bare ring's consumer
      ++count;
      const bool now = --to_flush == 0;
      if (now) to_flush = batch;
      UV_TRY_VOID(ch.release(now ? Flush::now : Flush::later));
      continue;
    }
    if (msg.size() < kCmd || msg[0] != kEnd) return protocol_error(ch, "stream", "unexpected message");
    const std::uint64_t sent = get_value(msg);
    UV_TRY_VOID(ch.release());
    const auto ack = command(kAck, Wake::poll, 0, count);
    UV_TRY_VOID(ch.send(ack, kTimeout));
    (void)sum;
    if (sent != count)
      return protocol_error(ch, "stream",
                            "the peer sent " + std::to_string(sent) + ", we got " + std::to_string(count));
    return count;
  }
}

// Ping-pong of `size`-byte messages for `seconds`, both sides waiting as
// `wake` says. The mean comes from the total time; p50/p99 from per-trip
// timestamps (not taken when polling, where they would cost ~10%).
Result<RoundTripResult> run_pingpong_initiator(Channel& ch, std::size_t size, double seconds, Wake wake) {
  const PinCpu pin(initiator_cpu(placement_of(wake)));
  const auto cmd = command(kPing, wake, static_cast<std::uint32_t>(size));
  UV_TRY_VOID(ch.send(cmd, kTimeout));
  ch.set_spin(spin_for(wake));
  std::vector<std::byte> msg(size, std::byte{0x5a});
  msg[0] = kData;
  std::vector<double> samples;
  const bool timed = wake != Wake::poll;
  bool holding = false;
  auto trip = [&]() -> Result<void> {
    UV_TRY_VOID(ch.send(msg, kTimeout));
    if (holding) UV_TRY_VOID(ch.release());
    holding = false;
    UV_TRY(const auto m, ch.peek(kTimeout));
    if (m.size() != size || m[0] != kData) return protocol_error(ch, "ping", "the echo differs");
    holding = true;
    return ok();
  };
  for (int i = 0; i < 100; ++i) UV_TRY_VOID(trip());  // warm up
  std::uint64_t trips = 0;
  const auto start = Clock::now();
  const auto until =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  while (Clock::now() < until) {
    for (int i = 0; i < 64; ++i) {
      const auto t0 = timed ? Clock::now() : Clock::time_point{};
      UV_TRY_VOID(trip());
      if (timed) samples.push_back(std::chrono::duration<double, std::nano>(Clock::now() - t0).count());
      ++trips;
    }
  }
  const double ns = std::chrono::duration<double, std::nano>(Clock::now() - start).count();
  if (holding) UV_TRY_VOID(ch.release());
  const auto end = command(kEnd);
  UV_TRY_VOID(ch.send(end, kTimeout));
  ch.set_spin(spin_for(Wake::hybrid));
  RoundTripResult r;
  r.trips = trips;
  r.mean_ns = ns / static_cast<double>(trips);
  r.p50_ns = r.p99_ns = r.mean_ns;
  if (!samples.empty()) {
    std::sort(samples.begin(), samples.end());
    r.p50_ns = samples[samples.size() / 2];
    r.p99_ns = samples[std::min(samples.size() - 1, samples.size() * 99 / 100)];
  }
  return r;
}

// Echoes every data message until the end marker.
Result<void> run_pingpong_responder(Channel& ch, Wake wake) {
  const PinCpu pin(responder_cpu(placement_of(wake)));
  ch.set_spin(spin_for(wake));
  for (;;) {
    UV_TRY(const auto m, ch.peek(kTimeout));
    if (!m.empty() && m[0] == kData) {
      UV_TRY_VOID(ch.send(m, kTimeout));
      UV_TRY_VOID(ch.release());
      continue;
    }
    if (m.size() < kCmd || m[0] != kEnd) return protocol_error(ch, "pong", "unexpected message");
    UV_TRY_VOID(ch.release());
    ch.set_spin(spin_for(Wake::hybrid));
    return ok();
  }
}

// The passive side: serves stream and ping-pong phases until told to quit.
// Between phases it sleeps on the doorbell (hybrid wait).
Result<void> run_peer(Channel& ch, unsigned batch) {
  for (;;) {
    UV_TRY(const auto m, ch.peek(std::chrono::minutes(10)));
    if (m.size() < kCmd) return protocol_error(ch, "serve", "short command");
    const std::byte tag = m[0];
    const auto wake = static_cast<Wake>(static_cast<std::uint8_t>(m[1]));
    UV_TRY_VOID(ch.release());
    if (tag == kStream) {
      UV_TRY(const std::uint64_t n, run_stream_receiver(ch, batch));
      (void)n;
    } else if (tag == kPing) {
      UV_TRY_VOID(run_pingpong_responder(ch, wake));
    } else if (tag == kQuit) {
      return ok();
    } else {
      return protocol_error(ch, "serve", "unknown command");
    }
  }
}

Result<void> quit_peer(Channel& ch) {
  const auto q = command(kQuit);
  return ch.send(q, kTimeout);
}

}  // namespace chanbench

namespace {

using chanbench::Placement;
using chanbench::RoundTripResult;
using chanbench::StreamResult;
using chanbench::summarize;
using Clock = BenchClock;

// ---- socket baselines ----

bool write_full(int fd, const void* p, std::size_t n) {
  auto* b = static_cast<const std::uint8_t*>(p);
  while (n > 0) {
    const ssize_t k = ::write(fd, b, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    b += k;
    n -= static_cast<std::size_t>(k);
  }
  return true;
}
// false on EOF or error before n bytes.
bool read_full(int fd, void* p, std::size_t n) {
  auto* b = static_cast<std::uint8_t*>(p);
  while (n > 0) {
    const ssize_t k = ::read(fd, b, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    b += k;
    n -= static_cast<std::size_t>(k);
  }
  return true;
}

// A connected pair of sockets: ours, and the child's (already forked, its
// end running `child`). kind: "unix socket" or "tcp loopback".
struct SocketPeer {
  int fd = -1;
  pid_t pid = -1;
  ~SocketPeer() {
    if (fd >= 0) ::close(fd);
    if (pid > 0) {
      int status = 0;
      ::waitpid(pid, &status, 0);
    }
  }
};

Result<void> spawn_socket_peer(const std::string& kind, bool nodelay, const std::function<int(int)>& child,
                               SocketPeer& out) {
  const char* op = "set up";
  if (kind == "unix socket") {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
      return Error::from_errno(errno, kind, op, "socketpair");
    const pid_t pid = ::fork();
    if (pid < 0) return Error::from_errno(errno, kind, op, "fork");
    if (pid == 0) {
      ::close(sv[0]);
      _exit(child(sv[1]));
    }
    ::close(sv[1]);
    out.fd = sv[0];
    out.pid = pid;
    return ok();
  }
  const int lfd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (lfd < 0) return Error::from_errno(errno, kind, op, "socket");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof a;
  if (::bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(lfd, 1) != 0 ||
      ::getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &alen) != 0) {
    const int e = errno;
    ::close(lfd);
    return Error::from_errno(e, kind, op, "bind/listen 127.0.0.1");
  }
  const int one = 1;
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int e = errno;
    ::close(lfd);
    return Error::from_errno(e, kind, op, "fork");
  }
  if (pid == 0) {
    ::close(lfd);
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) _exit(3);
    if (nodelay) ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    _exit(child(fd));
  }
  const int fd = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
  const int e = errno;
  ::close(lfd);
  out.pid = pid;
  if (fd < 0) return Error::from_errno(e, kind, op, "accept");
  if (nodelay) ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  out.fd = fd;
  return ok();
}

Result<RoundTripResult> socket_pingpong(const std::string& kind, std::size_t size, double seconds,
                                        Placement where = Placement::scheduler) {
  const int child_cpu = chanbench::responder_cpu(where);
  const chanbench::PinCpu pin(chanbench::initiator_cpu(where));
  std::vector<std::uint8_t> buf(size, 0x5a), echo(size);
  SocketPeer peer;
  UV_TRY_VOID(spawn_socket_peer(
      kind, true,
      [&](int fd) {
        const chanbench::PinCpu own(child_cpu);
        while (read_full(fd, echo.data(), size))
          if (!write_full(fd, echo.data(), size)) return 1;
        return 0;
      },
      peer));
  auto trip = [&] { return write_full(peer.fd, buf.data(), size) && read_full(peer.fd, buf.data(), size); };
  for (int i = 0; i < 100; ++i)
    if (!trip()) return Error::from_errno(errno, kind, "ping-pong", "write/read");
  std::vector<double> samples;
  const auto start = Clock::now();
  const auto until =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  while (Clock::now() < until) {
    const auto t0 = Clock::now();
    if (!trip()) return Error::from_errno(errno, kind, "ping-pong", "write/read");
    samples.push_back(std::chrono::duration<double, std::nano>(Clock::now() - t0).count());
  }
  return summarize(std::move(samples),
                   std::chrono::duration<double, std::nano>(Clock::now() - start).count());
}

// The wake-up alone: a ping-pong of two blocking eventfds between two
// processes, no data and no channel. What a sleeping round trip cannot get
// below on this machine, whatever carries the data.
Result<RoundTripResult> eventfd_pingpong(double seconds, Placement where = Placement::scheduler) {
  const int child_cpu = chanbench::responder_cpu(where);
  const chanbench::PinCpu pin(chanbench::initiator_cpu(where));
  const char* what = "eventfd ping-pong";
  const int ping_fd = ::eventfd(0, EFD_CLOEXEC);
  if (ping_fd < 0) return Error::from_errno(errno, what, "set up", "eventfd");
  const pci::Fd ping(pci::Os::system(), ping_fd);
  const int pong_fd = ::eventfd(0, EFD_CLOEXEC);
  if (pong_fd < 0) return Error::from_errno(errno, what, "set up", "eventfd");
  const pci::Fd pong(pci::Os::system(), pong_fd);
  const pid_t pid = ::fork();
  if (pid < 0) return Error::from_errno(errno, what, "set up", "fork");
  if (pid == 0) {
    const chanbench::PinCpu own(child_cpu);
    for (;;) {
      std::uint64_t v = 0;
      if (::read(ping_fd, &v, sizeof v) != sizeof v || v != 1) _exit(0);  // 2: stop
      const std::uint64_t one = 1;
      if (::write(pong_fd, &one, sizeof one) != sizeof one) _exit(1);
    }
  }
  auto signal_and_wait = [&](std::uint64_t v) {
    std::uint64_t got = 0;
    return ::write(ping_fd, &v, sizeof v) == sizeof v &&
           (v != 1 || ::read(pong_fd, &got, sizeof got) == sizeof got);
  };
  std::vector<double> samples;
  bool okay = true;
  for (int i = 0; i < 100 && okay; ++i) okay = signal_and_wait(1);
  const auto start = Clock::now();
  const auto until =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  while (okay && Clock::now() < until) {
    const auto t0 = Clock::now();
    okay = signal_and_wait(1);
    samples.push_back(std::chrono::duration<double, std::nano>(Clock::now() - t0).count());
  }
  const int e = errno;
  const double ns = std::chrono::duration<double, std::nano>(Clock::now() - start).count();
  signal_and_wait(2);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!okay || samples.empty()) return Error::from_errno(e, what, "ping-pong", "write/read");
  return summarize(std::move(samples), ns);
}

// One write per message; the receiver reads 64 KiB at a time and answers
// the byte count when we shut our side down.
Result<StreamResult> socket_stream(const std::string& kind, std::size_t size, double seconds) {
  std::vector<std::uint8_t> msg(size, 0x5a), sink(64 * 1024);
  SocketPeer peer;
  UV_TRY_VOID(spawn_socket_peer(
      kind, false,
      [&](int fd) {
        std::uint64_t total = 0;
        for (;;) {
          const ssize_t k = ::read(fd, sink.data(), sink.size());
          if (k < 0 && errno == EINTR) continue;
          if (k <= 0) break;
          total += static_cast<std::uint64_t>(k);
        }
        return write_full(fd, &total, sizeof total) ? 0 : 1;
      },
      peer));
  std::uint64_t count = 0;
  const auto start = Clock::now();
  const auto until =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  while (Clock::now() < until) {
    for (int i = 0; i < 64; ++i, ++count)
      if (!write_full(peer.fd, msg.data(), size)) return Error::from_errno(errno, kind, "stream", "write");
  }
  ::shutdown(peer.fd, SHUT_WR);
  std::uint64_t total = 0;
  if (!read_full(peer.fd, &total, sizeof total))
    return Error::from_errno(errno, kind, "stream", "read the byte count");
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  if (total != count * size)
    return Error(Errc::io, kind, "stream",
                 "sent " + std::to_string(count * size) + " bytes, the peer got " + std::to_string(total));
  return StreamResult{count, secs, static_cast<double>(count) / secs};
}

// ---- the channel between two processes ----

// The first line of a sysfs file, or "" when it cannot be read.
std::string sysfs_line(const char* path) {
  const std::string text = pci::Os::system().read_file(path).value_or("");
  return text.substr(0, text.find('\n'));
}

// Window bytes for two rings of ring_bytes (whole pages).
std::size_t layout_bytes(std::size_t ring_bytes) {
  return (channel::layout::kControlBytes + 2 * ring_bytes + 4095) / 4096 * 4096;
}

struct ChannelPeer {
  void* window = MAP_FAILED;
  std::size_t bytes = 0;
  pid_t pid = -1;
  std::optional<std::pair<pci::EventfdDoorbell, pci::EventfdDoorbell>> bells;
  std::unique_ptr<channel::Channel> ch;
  ~ChannelPeer() {
    if (ch && pid > 0) (void)chanbench::quit_peer(*ch);
    ch.reset();
    if (pid > 0) {
      int status = 0;
      if (::waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        std::cerr << g_program << ": channel peer process ended with status " << status << "\n";
    }
    if (window != MAP_FAILED) ::munmap(window, bytes);
  }
};

channel::Options channel_options(unsigned side, channel::Doorbell* bell) {
  channel::Options o;
  o.side = side;
  o.doorbell = bell;
  o.doorbell_id = side;
  o.name = "bench channel side " + std::to_string(side);
  o.format_wait = std::chrono::milliseconds(10000);
  return o;
}

// The window the benchmark uses by default: uvirtio-ivshmem-server's default
// size, formatted with the library's default ring (the largest that fits),
// which is what two guests get from uvirtio-ivchan out of the box.
constexpr std::size_t kDefaultWindow = 4u << 20;

// memfd window mapped shared, eventfd doorbells, a forked child attached as
// side 1 running run_peer(); we attach as side 0. `ring_bytes` 0: the
// library's default ring in a kDefaultWindow window.
Result<void> start_channel(std::size_t ring_bytes, unsigned batch, ChannelPeer& p) {
  const char* op = "set up channel";
  p.bytes = ring_bytes == 0 ? kDefaultWindow : layout_bytes(ring_bytes);
  const int fd = ::memfd_create("uvirtio-bench-channel", MFD_CLOEXEC);
  if (fd < 0) return Error::from_errno(errno, "bench channel", op, "memfd_create");
  if (::ftruncate(fd, static_cast<off_t>(p.bytes)) != 0) {
    const int e = errno;
    ::close(fd);
    return Error::from_errno(e, "bench channel", op, "ftruncate");
  }
  p.window = ::mmap(nullptr, p.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int e = errno;
  ::close(fd);
  if (p.window == MAP_FAILED) return Error::from_errno(e, "bench channel", op, "mmap");
  UV_TRY(auto bells, pci::EventfdDoorbell::pair("bench doorbell"));
  p.bells.emplace(std::move(bells));
  // Fork before any thread exists here; the child is a full channel user.
  p.pid = ::fork();
  if (p.pid < 0) return Error::from_errno(errno, "bench channel", op, "fork");
  if (p.pid == 0) {
    auto o = channel_options(1, &p.bells->second);
    auto ch = channel::Channel::attach(p.window, p.bytes, o);
    if (!ch) {
      std::cerr << g_program << ": " << ch.error().message() << "\n";
      _exit(1);
    }
    auto r = chanbench::run_peer(**ch, batch);
    if (!r) std::cerr << g_program << ": peer: " << r.error().message() << "\n";
    ch->reset();
    _exit(r ? 0 : 1);
  }
  auto o = channel_options(0, &p.bells->first);
  o.ring_bytes = ring_bytes;
  UV_TRY(p.ch, channel::Channel::attach(p.window, p.bytes, o));
  return p.ch->wait_peer(std::chrono::milliseconds(10000));
}

// Between two guests: this end is one side of the channel in an ivshmem
// device's BAR2 (doorbell interrupts when the device has them); side 1 serves
// (run_peer), side 0 measures. The in-guest ceiling and floor (bare ring and
// cache-line round trip between two threads of this guest) are measured in
// the same run.
int bench_channel_ivshmem(const pci::Bdf& bdf, unsigned side, double seconds, unsigned size, unsigned rounds,
                          unsigned batch, bool as_json) {
  auto dev = driver::Ivshmem::open(bdf);
  if (!dev) return fail(dev.error());
  std::unique_ptr<channel::Doorbell> bell;
  if ((*dev)->vectors() > 0) {
    auto b = (*dev)->doorbell(0);
    if (!b) return fail(b.error());
    bell = std::move(*b);
  }
  channel::Options o = channel_options(side, bell.get());
  o.doorbell_id = (*dev)->position().value_or(0);
  o.name = bdf.str() + " ivshmem";
  o.format_wait = std::chrono::milliseconds(60000);
  auto ch = channel::Channel::attach((*dev)->shm(), (*dev)->shm_size(), o);
  if (!ch) return fail(ch.error());
  if (auto r = (*ch)->wait_peer(std::chrono::milliseconds(120000)); !r) return fail(r.error());
  if (side == 1) {
    auto r = chanbench::run_peer(**ch, batch);
    if (!r) return fail(r.error().within("serve the measuring side"));
    std::printf("channel bench peer: done\n");
    return 0;
  }
  if (size > (*ch)->max_message()) throw UsageError{"channel: --size exceeds the channel's largest message"};
  std::map<std::string, std::vector<double>> m;
  for (unsigned round = 0; round < rounds; ++round) {
    auto stream = chanbench::run_stream_sender(**ch, size, seconds, batch);
    if (!stream) return fail(stream.error());
    m["channel_stream_msgs_per_s"].push_back(stream->msgs_per_s);
    for (auto [wake, key] : {std::pair{chanbench::Wake::poll, "channel_rt_polling"},
                             std::pair{chanbench::Wake::doorbell, "channel_rt_doorbell"}}) {
      if (wake == chanbench::Wake::doorbell && !bell) continue;
      auto rt = chanbench::run_pingpong_initiator(**ch, size, seconds, wake);
      if (!rt) return fail(rt.error());
      m[std::string(key) + "_ns"].push_back(rt->mean_ns);
      m[std::string(key) + "_p50_ns"].push_back(rt->p50_ns);
    }
    m["bare_ring_msgs_per_s"].push_back(bare_ring_msgs_per_s(seconds));
    m["cache_line_round_trip_ns"].push_back(cache_line_round_trip_ns(std::min(seconds, 0.5)));
  }
  if (auto r = chanbench::quit_peer(**ch); !r) return fail(r.error());
  json out = {{"between", "two guests (ivshmem)"},
              {"bdf", bdf.str()},
              {"size", size},
              {"seconds", seconds},
              {"rounds", rounds},
              {"batch", batch},
              {"doorbell", bell != nullptr},
              {"vcpus", std::thread::hardware_concurrency()}};
  for (auto& [k, v] : m) {
    std::sort(v.begin(), v.end());
    out[k] = v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
  }
  out["ratio_vs_bare_ring"] =
      out["channel_stream_msgs_per_s"].get<double>() / out["bare_ring_msgs_per_s"].get<double>();
  out["polling_rt_vs_cache_line"] =
      out["channel_rt_polling_ns"].get<double>() / out["cache_line_round_trip_ns"].get<double>();
  if (as_json) {
    print_json(out);
    return 0;
  }
  std::printf(
      "channel between two guests over ivshmem (%s), %u-byte messages, %u rounds of %.1f s, medians\n",
      bdf.str().c_str(), size, rounds, seconds);
  std::printf(
      "  streaming: channel %.2f M msg/s | bare ring between two threads of this guest %.2f M msg/s "
      "(ratio %.2f)\n",
      out["channel_stream_msgs_per_s"].get<double>() / 1e6, out["bare_ring_msgs_per_s"].get<double>() / 1e6,
      out["ratio_vs_bare_ring"].get<double>());
  std::printf("  round trip (mean): polling %.0f ns", out["channel_rt_polling_ns"].get<double>());
  if (bell) std::printf(" | doorbell %.0f ns", out["channel_rt_doorbell_ns"].get<double>());
  std::printf(" | cache line in this guest %.0f ns (%u vCPUs)\n",
              out["cache_line_round_trip_ns"].get<double>(), std::thread::hardware_concurrency());
  return 0;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  if (v.empty()) return 0;
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

}  // namespace

int bench_channel(const std::vector<std::string>& args) {
  po::options_description desc("uvirtio-bench channel");
  desc.add_options()("help,h", "show help")("seconds", po::value<double>()->default_value(1.0),
                                            "duration of each point in each round")(
      "size", po::value<unsigned>()->default_value(64), "message size in bytes (16..4096)")(
      "rounds", po::value<unsigned>()->default_value(3), "rounds (medians are reported)")(
      "batch", po::value<unsigned>()->default_value(32),
      "streaming: messages per index publication (1..1024)")(
      "ring-bytes", po::value<unsigned>()->default_value(0),
      "channel data bytes per direction (power of two, 4096..16M; 0: the library's default ring in a "
      "4 MiB window, uvirtio-ivshmem-server's default size)")(
      "small-ring-bytes", po::value<unsigned>()->default_value(16 * 1024),
      "also stream through a second channel with this ring (the earlier sessions' default; 0: no)")(
      "ivshmem", po::value<std::string>(), "between two guests: this guest's ivshmem device (BDF)")(
      "side", po::value<unsigned>(), "with --ivshmem: 1 serves, 0 measures (start both)")("json",
                                                                                          "print JSON");
  auto vm = parse(args, desc, {});
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  const double seconds = parse_seconds(vm["seconds"].as<double>(), "channel: --seconds");
  const unsigned size = vm["size"].as<unsigned>();
  if (size < 16 || size > 4096) throw UsageError{"channel: --size must be in 16..4096"};
  const unsigned rounds = vm["rounds"].as<unsigned>();
  if (rounds < 1 || rounds > 100) throw UsageError{"channel: --rounds must be in 1..100"};
  const unsigned batch = vm["batch"].as<unsigned>();
  if (batch < 1 || batch > 1024) throw UsageError{"channel: --batch must be in 1..1024"};
  auto ring_option = [&](const char* name) {
    const unsigned v = vm[name].as<unsigned>();
    if (v != 0 && (v < 4096 || v > (16u << 20) || (v & (v - 1)) != 0))
      throw UsageError{std::string("channel: --") + name + " must be 0 or a power of two in 4096..16777216"};
    if (v != 0 && size > v / 4)
      throw UsageError{std::string("channel: --size must be at most a quarter of --") + name};
    return v;
  };
  const unsigned ring_arg = ring_option("ring-bytes");
  const unsigned small_ring = ring_option("small-ring-bytes");
  ::signal(SIGPIPE, SIG_IGN);
  if (vm.count("ivshmem")) {
    if (!vm.count("side") || vm["side"].as<unsigned>() > 1)
      throw UsageError{"channel: --ivshmem needs --side 0 (measures) or --side 1 (serves)"};
    return bench_channel_ivshmem(parse_bdf_or_throw(vm["ivshmem"].as<std::string>()),
                                 vm["side"].as<unsigned>(), seconds, size, rounds, batch,
                                 vm.count("json") != 0);
  }
  if (vm.count("side")) throw UsageError{"channel: --side only goes with --ivshmem"};

  ChannelPeer peer;
  if (auto r = start_channel(ring_arg, batch, peer); !r) return fail(r.error());
  channel::Channel& ch = *peer.ch;
  const std::size_t ring = ch.ring_bytes();
  ChannelPeer small_peer;
  if (small_ring != 0) {
    if (auto r = start_channel(small_ring, batch, small_peer); !r) return fail(r.error());
  }

  // Each ratio is taken within a round from measurements made back to back
  // (the bare ring just before the channel stream, the cache-line round
  // trip just before the polling one): the host moves the two vCPUs around,
  // and absolute figures drift by 2-4x between placements.
  std::map<std::string, std::vector<double>> m;  // metric -> one value per round
  json per_round = json::array();
  for (unsigned round = 0; round < rounds; ++round) {
    json r;
    r["bare_ring_msgs_per_s"] = bare_ring_msgs_per_s(seconds);
    auto stream = chanbench::run_stream_sender(ch, size, seconds, batch);
    if (!stream) return fail(stream.error());
    r["channel_stream_msgs_per_s"] = stream->msgs_per_s;
    if (small_peer.ch) {
      auto small = chanbench::run_stream_sender(*small_peer.ch, size, seconds, batch);
      if (!small) return fail(small.error());
      r["small_ring_stream_msgs_per_s"] = small->msgs_per_s;
    }
    r["cache_line_round_trip_ns"] = cache_line_round_trip_ns(std::min(seconds, 0.5));
    r["bare_ring_rt_ns"] = bare_ring_round_trip_ns(std::min(seconds, 0.5), false);
    r["bare_slot_rt_ns"] = bare_ring_round_trip_ns(std::min(seconds, 0.5), true);
    for (auto [wake, key] : {std::pair{chanbench::Wake::poll, "channel_rt_polling"},
                             std::pair{chanbench::Wake::doorbell, "channel_rt_doorbell"},
                             std::pair{chanbench::Wake::hybrid, "channel_rt_hybrid"},
                             std::pair{chanbench::Wake::doorbell_one_cpu, "channel_rt_doorbell_one_cpu"},
                             std::pair{chanbench::Wake::doorbell_two_cpus, "channel_rt_doorbell_two_cpus"}}) {
      auto rt = chanbench::run_pingpong_initiator(ch, size, seconds, wake);
      if (!rt) return fail(rt.error());
      r[std::string(key) + "_ns"] = rt->mean_ns;
      r[std::string(key) + "_p50_ns"] = rt->p50_ns;
      r[std::string(key) + "_p99_ns"] = rt->p99_ns;
    }
    auto wake = eventfd_pingpong(seconds);
    if (!wake) return fail(wake.error());
    r["eventfd_rt_ns"] = wake->mean_ns;
    auto wake2 = eventfd_pingpong(seconds, Placement::two_cpus);
    if (!wake2) return fail(wake2.error());
    r["eventfd_rt_two_cpus_ns"] = wake2->mean_ns;
    for (auto [kind, key] : {std::pair{"unix socket", "unix_socket"}, std::pair{"tcp loopback", "tcp"}}) {
      auto rt = socket_pingpong(kind, size, seconds);
      if (!rt) return fail(rt.error());
      r[std::string(key) + "_rt_ns"] = rt->mean_ns;
      r[std::string(key) + "_rt_p50_ns"] = rt->p50_ns;
      auto one = socket_pingpong(kind, size, seconds, Placement::one_cpu);
      if (!one) return fail(one.error());
      r[std::string(key) + "_rt_one_cpu_ns"] = one->mean_ns;
      auto two = socket_pingpong(kind, size, seconds, Placement::two_cpus);
      if (!two) return fail(two.error());
      r[std::string(key) + "_rt_two_cpus_ns"] = two->mean_ns;
      auto st = socket_stream(kind, size, seconds);
      if (!st) return fail(st.error());
      r[std::string(key) + "_stream_msgs_per_s"] = st->msgs_per_s;
    }
    auto ratio = [&r](const char* num, const char* den) {
      return r[num].get<double>() / r[den].get<double>();
    };
    r["ratio_vs_bare_ring"] = ratio("channel_stream_msgs_per_s", "bare_ring_msgs_per_s");
    r["ratio_vs_unix_socket"] = ratio("channel_stream_msgs_per_s", "unix_socket_stream_msgs_per_s");
    if (small_peer.ch) {
      r["small_ring_ratio_vs_bare_ring"] = ratio("small_ring_stream_msgs_per_s", "bare_ring_msgs_per_s");
      r["small_ring_ratio_vs_unix_socket"] =
          ratio("small_ring_stream_msgs_per_s", "unix_socket_stream_msgs_per_s");
    }
    r["polling_rt_vs_cache_line"] = ratio("channel_rt_polling_ns", "cache_line_round_trip_ns");
    // What the hardware allows a 64-byte message: the bare rings' round trips.
    r["bare_ring_rt_vs_cache_line"] = ratio("bare_ring_rt_ns", "cache_line_round_trip_ns");
    r["polling_rt_vs_bare_ring_rt"] = ratio("channel_rt_polling_ns", "bare_ring_rt_ns");
    r["polling_rt_vs_bare_slot_rt"] = ratio("channel_rt_polling_ns", "bare_slot_rt_ns");
    r["blocking_rt_vs_unix_socket"] = ratio("channel_rt_doorbell_ns", "unix_socket_rt_ns");
    // How much of the sleeping round trip is the wake-up itself.
    r["blocking_rt_vs_eventfd"] = ratio("channel_rt_doorbell_ns", "eventfd_rt_ns");
    r["eventfd_rt_vs_unix_socket"] = ratio("eventfd_rt_ns", "unix_socket_rt_ns");
    r["blocking_rt_vs_unix_socket_one_cpu"] =
        ratio("channel_rt_doorbell_one_cpu_ns", "unix_socket_rt_one_cpu_ns");
    r["blocking_rt_vs_unix_socket_two_cpus"] =
        ratio("channel_rt_doorbell_two_cpus_ns", "unix_socket_rt_two_cpus_ns");
    r["blocking_rt_vs_eventfd_two_cpus"] = ratio("channel_rt_doorbell_two_cpus_ns", "eventfd_rt_two_cpus_ns");
    for (auto it = r.begin(); it != r.end(); ++it) m[it.key()].push_back(it.value().get<double>());
    per_round.push_back(r);
  }

  json out;
  out["size"] = size;
  out["seconds"] = seconds;
  out["rounds"] = rounds;
  out["batch"] = batch;
  out["ring_bytes"] = ring;
  // What a sleeping round trip depends on most: whether an idle vCPU polls
  // before it halts (a halted one costs the hypervisor's wake-up, ~25 us
  // each way on these machines, whatever the mechanism).
  out["cpuidle_driver"] = sysfs_line("/sys/devices/system/cpu/cpuidle/current_driver");
  out["guest_halt_poll_ns"] = sysfs_line("/sys/module/haltpoll/parameters/guest_halt_poll_ns");
  out["small_ring_bytes"] = small_ring;
  for (auto& [k, v] : m) out[k] = median(v);  // medians; the ratios are medians of per-round ratios
  const double r_bare = out["ratio_vs_bare_ring"], r_unix = out["ratio_vs_unix_socket"];
  const double r_poll = out["polling_rt_vs_cache_line"], r_bell = out["blocking_rt_vs_unix_socket"];
  const double r_bell1 = out["blocking_rt_vs_unix_socket_one_cpu"];
  const double r_bell2 = out["blocking_rt_vs_unix_socket_two_cpus"];
  out["goals"] = {{"ratio_vs_bare_ring >= 0.8", r_bare >= 0.8},
                  {"ratio_vs_unix_socket >= 50", r_unix >= 50},
                  {"polling_rt_vs_cache_line <= 3", r_poll <= 3},
                  {"blocking_rt_vs_unix_socket < 1", r_bell < 1},
                  {"blocking_rt_vs_unix_socket_one_cpu < 1", r_bell1 < 1},
                  {"blocking_rt_vs_unix_socket_two_cpus < 1", r_bell2 < 1}};
  out["per_round"] = per_round;
  if (vm.count("json")) {
    print_json(out);
    return 0;
  }
  auto g = [&](const char* k) { return out[k].get<double>(); };
  std::printf("channel between two processes (memfd window, eventfd doorbells), %u-byte messages,\n", size);
  std::printf("%u rounds of %.1f s per point, medians; ring %zu bytes per direction%s, batch %u\n", rounds,
              seconds, ring, ring_arg == 0 ? " (the library's default in a 4 MiB window)" : "", batch);
  std::printf(
      "  streaming (M msg/s):   channel %7.2f | bare ring (64 B slots) %6.2f | unix %6.3f | tcp %6.3f\n",
      g("channel_stream_msgs_per_s") / 1e6, g("bare_ring_msgs_per_s") / 1e6,
      g("unix_socket_stream_msgs_per_s") / 1e6, g("tcp_stream_msgs_per_s") / 1e6);
  if (small_ring != 0) {
    std::printf(
        "  streaming with a %u-byte ring: %.2f M msg/s, %.2f x the bare ring, %.1f x the unix socket\n",
        small_ring, g("small_ring_stream_msgs_per_s") / 1e6, g("small_ring_ratio_vs_bare_ring"),
        g("small_ring_ratio_vs_unix_socket"));
  }
  std::printf("  round trip, mean (ns): polling %7.0f | doorbell %7.0f | hybrid %7.0f\n",
              g("channel_rt_polling_ns"), g("channel_rt_doorbell_ns"), g("channel_rt_hybrid_ns"));
  std::printf("                         cache line %4.0f | unix %7.0f | tcp %7.0f\n",
              g("cache_line_round_trip_ns"), g("unix_socket_rt_ns"), g("tcp_rt_ns"));
  std::printf("  round trip, p50 (ns):  doorbell %7.0f | unix %7.0f | tcp %7.0f\n",
              g("channel_rt_doorbell_p50_ns"), g("unix_socket_rt_p50_ns"), g("tcp_rt_p50_ns"));
  std::printf("  round trip on one CPU, mean (ns): doorbell %7.0f | unix %7.0f | tcp %7.0f\n",
              g("channel_rt_doorbell_one_cpu_ns"), g("unix_socket_rt_one_cpu_ns"), g("tcp_rt_one_cpu_ns"));
  std::printf(
      "  round trip pinned to two CPUs, mean (ns): doorbell %7.0f | unix %7.0f | tcp %7.0f | eventfd %7.0f\n",
      g("channel_rt_doorbell_two_cpus_ns"), g("unix_socket_rt_two_cpus_ns"), g("tcp_rt_two_cpus_ns"),
      g("eventfd_rt_two_cpus_ns"));
  const std::string idle = out["cpuidle_driver"].get<std::string>();
  const std::string halt_poll = out["guest_halt_poll_ns"].get<std::string>();
  std::printf("  idle: cpuidle driver %s%s%s\n", idle.empty() ? "unknown" : idle.c_str(),
              halt_poll.empty() ? "" : ", guest_halt_poll_ns ", halt_poll.c_str());
  std::printf("  ratios (median of per-round ratios):\n");
  std::printf("    channel / bare ring rate      %6.2f (goal >= 0.8)\n", r_bare);
  std::printf("    channel / unix socket rate    %6.1f (goal >= 50)\n", r_unix);
  std::printf("    polling RT / cache-line RT    %6.2f (goal <= 3)\n", r_poll);
  std::printf(
      "      bare rings' RT (64 B slots): %.0f ns with a tail index (%.2f x the cache line; the channel "
      "%.2f x it), %.0f ns with the sequence in the slot (the channel %.2f x it)\n",
      g("bare_ring_rt_ns"), g("bare_ring_rt_vs_cache_line"), g("polling_rt_vs_bare_ring_rt"),
      g("bare_slot_rt_ns"), g("polling_rt_vs_bare_slot_rt"));
  std::printf(
      "    doorbell RT / unix socket RT  %6.2f (goal < 1; both processes where the scheduler puts them)\n",
      r_bell);
  std::printf("    the same on one CPU           %6.2f (no cross-vCPU wake-up in either)\n", r_bell1);
  std::printf(
      "    the same on two CPUs          %6.2f (every wake-up crosses vCPUs; doorbell / bare eventfd %.2f)\n",
      r_bell2, g("blocking_rt_vs_eventfd_two_cpus"));
  std::printf(
      "    doorbell RT / bare eventfd RT %6.2f, bare eventfd RT / unix socket RT %.2f (the wake-up alone: "
      "%.0f ns)\n",
      g("blocking_rt_vs_eventfd"), g("eventfd_rt_vs_unix_socket"), g("eventfd_rt_ns"));
  return 0;
}

}  // namespace uvirtio::apps
