// uvirtio-vhost-net: a vhost-user back-end for a virtio-net front-end (a QEMU
// guest with -netdev vhost-user) that answers ARP and ICMP echo for one IPv4
// address. It serves the guest's virtqueues in the device role:
//   ring 0 (receiveq1): we put packets into the guest
//   ring 1 (transmitq1): we take the guest's packets
// Each packet starts with a struct virtio_net_hdr (virtio spec 1.2, 5.1.6):
// 12 bytes with VERSION_1 (num_buffers included), 10 without it and without
// MRG_RXBUF. We offer VERSION_1, EVENT_IDX and INDIRECT_DESC, nothing
// net-specific: no offloads, so every packet is complete and checksummed, and
// no MRG_RXBUF, so each receive chain holds one whole packet.
//
//   uvirtio-vhost-net serve --socket PATH --ip A.B.C.D [--mac MAC] [--once] [-v]
//
// ARP requests for --ip get a reply from --mac; ICMP echo requests to --ip
// (checksums verified) get an echo reply; everything else is counted and
// dropped. Replies wait in a small backlog until the guest posts receive
// buffers. On SIGINT/SIGTERM, or when the front-end disconnects with --once,
// it prints one summary line:
//   uvirtio-vhost-net: summary: received=N sent=N arp_replies=N icmp_replies=N dropped=N malformed=N
//                      rx_no_buffer=N ring_errors=N sessions=N features=0x...
// (features: what the last front-end acknowledged when its rings ran).
// Exit status: 0, 1 when the last session ended on an error, 2 bad usage.
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <deque>
#include <iostream>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "cli_common.hpp"
#include "uvirtio/driver/features.hpp"
#include "uvirtio/driver/vhost_user.hpp"

namespace uvirtio::apps {
namespace {

namespace vu = driver::vhost_user;

const char* kUsageText =
    "usage: uvirtio-vhost-net serve --socket PATH --ip A.B.C.D [--mac MAC] [--once] [-v]\n"
    "A vhost-user back-end for a virtio-net front-end (QEMU: -chardev socket,id=c,path=PATH\n"
    "-netdev vhost-user,id=n,chardev=c -device virtio-net-pci,netdev=n, guest RAM shared).\n"
    "Answers ARP and ICMP echo for --ip; drops everything else. --once: exit when the\n"
    "front-end disconnects. Prints a summary line on exit.\n";

constexpr unsigned kMrgRxbuf = 15;  // VIRTIO_NET_F_MRG_RXBUF (virtio spec 1.2, 5.1.3)
constexpr std::uint32_t kRx = 0;
constexpr std::uint32_t kTx = 1;
constexpr std::size_t kMaxFrame = 65535 + 14;
constexpr std::size_t kBacklog = 256;
constexpr std::uint16_t kEthArp = 0x0806;
constexpr std::uint16_t kEthIpv4 = 0x0800;

using MacAddr = std::array<std::uint8_t, 6>;

struct Counters {
  std::uint64_t received = 0;  // frames the guest sent us
  std::uint64_t sent = 0;      // frames we put into the guest
  std::uint64_t arp_replies = 0;
  std::uint64_t icmp_replies = 0;
  std::uint64_t dropped = 0;    // well-formed but not for us / not answered
  std::uint64_t malformed = 0;  // short, bad checksum, bad lengths
  std::uint64_t rx_no_buffer = 0;
  std::uint64_t ring_errors = 0;
  std::uint64_t sessions = 0;
  std::uint64_t features = 0;  // acknowledged by the last front-end whose rings ran
};

std::uint16_t get16(const std::uint8_t* p) { return static_cast<std::uint16_t>(p[0] << 8 | p[1]); }
void put16(std::uint8_t* p, std::uint16_t v) {
  p[0] = static_cast<std::uint8_t>(v >> 8);
  p[1] = static_cast<std::uint8_t>(v);
}

// The Internet checksum (RFC 1071): 0 over data that includes a correct one.
std::uint16_t inet_checksum(std::span<const std::uint8_t> d) {
  std::uint32_t sum = 0;
  std::size_t i = 0;
  for (; i + 1 < d.size(); i += 2) sum += static_cast<std::uint32_t>(d[i] << 8 | d[i + 1]);
  if (i < d.size()) sum += static_cast<std::uint32_t>(d[i] << 8);
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return static_cast<std::uint16_t>(~sum & 0xffff);
}

// Builds answers to the frames the guest sends; knows nothing of rings.
class Responder {
 public:
  Responder(MacAddr mac, std::array<std::uint8_t, 4> ip) : mac_(mac), ip_(ip) {}

  std::optional<std::vector<std::uint8_t>> answer(std::span<const std::uint8_t> f, Counters& c) const {
    if (f.size() < 14) {
      ++c.malformed;
      return std::nullopt;
    }
    switch (get16(f.data() + 12)) {
      case kEthArp:
        return arp(f, c);
      case kEthIpv4:
        return ipv4(f, c);
      default:
        ++c.dropped;
        return std::nullopt;
    }
  }

 private:
  std::optional<std::vector<std::uint8_t>> arp(std::span<const std::uint8_t> f, Counters& c) const {
    // RFC 826 for Ethernet/IPv4: 28 bytes after the Ethernet header.
    if (f.size() < 14 + 28) {
      ++c.malformed;
      return std::nullopt;
    }
    const std::uint8_t* a = f.data() + 14;
    if (get16(a) != 1 || get16(a + 2) != kEthIpv4 || a[4] != 6 || a[5] != 4) {
      ++c.dropped;
      return std::nullopt;
    }
    if (get16(a + 6) != 1 || std::memcmp(a + 24, ip_.data(), 4) != 0) {  // a request for our address?
      ++c.dropped;
      return std::nullopt;
    }
    std::vector<std::uint8_t> r(60, 0);  // minimum Ethernet frame without FCS
    std::memcpy(r.data(), a + 8, 6);     // to the sender's hardware address
    std::memcpy(r.data() + 6, mac_.data(), 6);
    put16(r.data() + 12, kEthArp);
    std::uint8_t* o = r.data() + 14;
    std::memcpy(o, a, 6);  // htype, ptype, hlen, plen
    put16(o + 6, 2);       // reply
    std::memcpy(o + 8, mac_.data(), 6);
    std::memcpy(o + 14, ip_.data(), 4);
    std::memcpy(o + 18, a + 8, 10);  // target = the requester (its MAC and IP)
    ++c.arp_replies;
    return r;
  }

  std::optional<std::vector<std::uint8_t>> ipv4(std::span<const std::uint8_t> f, Counters& c) const {
    if (std::memcmp(f.data(), mac_.data(), 6) != 0) {
      ++c.dropped;
      return std::nullopt;
    }
    const auto ip = f.subspan(14);
    if (ip.size() < 20 || (ip[0] >> 4) != 4) {
      ++c.malformed;
      return std::nullopt;
    }
    const std::size_t ihl = (ip[0] & 0xfu) * 4u;
    const std::size_t total = get16(ip.data() + 2);
    // The frame may carry Ethernet padding after the datagram; never less.
    if (ihl < 20 || total < ihl || total > ip.size() || inet_checksum(ip.subspan(0, ihl)) != 0) {
      ++c.malformed;
      return std::nullopt;
    }
    const bool fragment = (get16(ip.data() + 6) & 0x3fff) != 0;  // MF or an offset
    if (std::memcmp(ip.data() + 16, ip_.data(), 4) != 0 || ip[9] != 1 || fragment) {
      ++c.dropped;  // not to us, not ICMP, or a fragment we do not reassemble
      return std::nullopt;
    }
    const auto icmp = ip.subspan(ihl, total - ihl);
    if (icmp.size() < 8 || inet_checksum(icmp) != 0) {
      ++c.malformed;
      return std::nullopt;
    }
    if (icmp[0] != 8 || icmp[1] != 0) {  // echo request
      ++c.dropped;
      return std::nullopt;
    }
    // Echo reply (RFC 792): a fresh 20-byte header (options dropped), the
    // ICMP message copied with type 0 and a new checksum.
    std::vector<std::uint8_t> r(14 + 20 + std::min<std::size_t>(icmp.size(), 0xffff));
    if (r.size() < 14 + 20 + icmp.size()) return std::nullopt;  // cannot happen: total is 16 bits
    std::memcpy(r.data(), f.data() + 6, 6);
    std::memcpy(r.data() + 6, mac_.data(), 6);
    put16(r.data() + 12, kEthIpv4);
    std::uint8_t* h = r.data() + 14;
    h[0] = 0x45;
    h[1] = ip[1];  // TOS
    put16(h + 2, static_cast<std::uint16_t>(20 + icmp.size()));
    std::memcpy(h + 4, ip.data() + 4, 2);  // identification
    put16(h + 6, 0);
    h[8] = 64;  // TTL
    h[9] = 1;
    std::memcpy(h + 12, ip_.data(), 4);
    std::memcpy(h + 16, ip.data() + 12, 4);
    put16(h + 10, inet_checksum({h, 20}));
    std::uint8_t* m = h + 20;
    std::memcpy(m, icmp.data(), icmp.size());
    m[0] = 0;
    put16(m + 2, 0);
    put16(m + 2, inet_checksum({m, icmp.size()}));
    ++c.icmp_replies;
    return r;
  }

  MacAddr mac_;
  std::array<std::uint8_t, 4> ip_;
};

// The virtio-net data path over the back-end's two rings.
class NetDevice {
 public:
  NetDevice(vu::VhostUserBackend& be, const Responder& responder) : be_(be), responder_(responder) {}

  Counters& counters() { return c_; }
  // A new front-end: replies meant for the old one are dropped.
  void reset() { backlog_.clear(); }

  // After any ring change: both rings are looked at once (kicks may have
  // come before we watched the eventfds).
  void service_all() {
    service_tx();
    flush_rx();
  }
  void service(std::uint32_t ring) {
    if (ring == kTx) service_tx();
    flush_rx();
  }
  // A running ring that latched broken is skipped until the front-end
  // restarts it.
  bool serviceable(std::uint32_t ring) {
    auto* q = be_.queue(ring);
    return q != nullptr && !q->broken();
  }

 private:
  std::size_t hdr_len() const {
    return be_.has_feature(driver::feature::kVersion1) || be_.has_feature(kMrgRxbuf) ? 12 : 10;
  }

  void ring_error(std::uint32_t ring, const Error& e) {
    ++c_.ring_errors;
    std::cerr << g_program << ": " << e.message() << " (ring stopped until the front-end restarts it)\n";
    if (auto r = be_.report_error(ring); !r) std::cerr << g_program << ": " << r.error().message() << "\n";
  }

  void interrupt(std::uint32_t ring) {
    auto* q = be_.queue(ring);
    if (q == nullptr || !q->should_interrupt()) return;
    if (auto r = be_.notify(ring); !r) std::cerr << g_program << ": " << r.error().message() << "\n";
  }

  void service_tx() {
    auto* q = be_.queue(kTx);
    if (q == nullptr || q->broken()) return;
    for (;;) {
      auto popped = q->pop();
      if (!popped) {
        ring_error(kTx, popped.error());
        return;
      }
      if (!popped->has_value()) break;
      const auto& req = **popped;
      frame_.clear();
      const std::size_t hl = hdr_len();
      if (req.readable_bytes > hl + kMaxFrame) {
        ++c_.malformed;
      } else {
        for (auto s : req.readable) frame_.insert(frame_.end(), s.begin(), s.end());
        ++c_.received;
        if (frame_.size() < hl) {
          ++c_.malformed;
        } else if (auto reply = responder_.answer(std::span<const std::uint8_t>(frame_).subspan(hl), c_)) {
          if (backlog_.size() < kBacklog) {
            backlog_.push_back(std::move(*reply));
          } else {
            ++c_.rx_no_buffer;
          }
        }
      }
      if (auto r = q->push(req.head, 0); !r) {
        ring_error(kTx, r.error());
        return;
      }
    }
    interrupt(kTx);
  }

  // Copies `data` into the chain's writable buffers from byte `at` on.
  static void scatter(const std::vector<std::span<std::uint8_t>>& bufs, std::size_t at,
                      std::span<const std::uint8_t> data) {
    for (auto b : bufs) {
      if (data.empty()) return;
      if (at >= b.size()) {
        at -= b.size();
        continue;
      }
      const std::size_t n = std::min(b.size() - at, data.size());
      std::memcpy(b.data() + at, data.data(), n);
      data = data.subspan(n);
      at = 0;
    }
  }

  void flush_rx() {
    auto* q = be_.queue(kRx);
    if (q == nullptr || q->broken()) return;
    bool pushed = false;
    while (!backlog_.empty()) {
      auto popped = q->pop();
      if (!popped) {
        ring_error(kRx, popped.error());
        return;
      }
      if (!popped->has_value()) break;  // no buffer yet: wait for the next rx kick
      const auto& req = **popped;
      const auto& frame = backlog_.front();
      const std::size_t hl = hdr_len();
      std::uint32_t written = 0;
      if (req.writable_bytes >= hl + frame.size()) {
        // virtio_net_hdr: no checksum offload, no GSO; num_buffers 1
        // (5.1.6.4: without MRG_RXBUF the device sets it to 1).
        std::array<std::uint8_t, 12> hdr{};
        hdr[10] = 1;
        scatter(req.writable, 0, std::span<const std::uint8_t>(hdr).first(hl));
        scatter(req.writable, hl, frame);
        written = static_cast<std::uint32_t>(hl + frame.size());
        ++c_.sent;
      } else {
        ++c_.rx_no_buffer;  // a buffer too small for the frame: returned empty
      }
      backlog_.pop_front();
      if (auto r = q->push(req.head, written); !r) {
        ring_error(kRx, r.error());
        return;
      }
      pushed = true;
    }
    if (pushed) interrupt(kRx);
  }

  vu::VhostUserBackend& be_;
  const Responder& responder_;
  Counters c_;
  std::deque<std::vector<std::uint8_t>> backlog_;
  std::vector<std::uint8_t> frame_;
};

MacAddr parse_mac(const std::string& text) {
  MacAddr m{};
  unsigned v[6];
  char tail;
  if (std::sscanf(text.c_str(), "%2x:%2x:%2x:%2x:%2x:%2x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                  &tail) != 6) {
    throw UsageError{"--mac: '" + text + "' is not a MAC address like 02:00:00:00:00:01"};
  }
  for (int i = 0; i < 6; ++i) m[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(v[i]);
  if (m[0] & 1) throw UsageError{"--mac: '" + text + "' is a multicast address"};
  return m;
}

std::array<std::uint8_t, 4> parse_ip(const std::string& text) {
  in_addr a{};
  if (::inet_pton(AF_INET, text.c_str(), &a) != 1) {
    throw UsageError{"--ip: '" + text + "' is not an IPv4 address like 10.0.2.1"};
  }
  std::array<std::uint8_t, 4> ip;
  std::memcpy(ip.data(), &a.s_addr, 4);
  return ip;
}

std::string hex64(std::uint64_t v) {
  char b[24];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

void print_summary(const Counters& c) {
  std::cout << g_program << ": summary: received=" << c.received << " sent=" << c.sent
            << " arp_replies=" << c.arp_replies << " icmp_replies=" << c.icmp_replies
            << " dropped=" << c.dropped << " malformed=" << c.malformed << " rx_no_buffer=" << c.rx_no_buffer
            << " ring_errors=" << c.ring_errors << " sessions=" << c.sessions
            << " features=" << hex64(c.features) << std::endl;
}

int cmd_serve(const std::vector<std::string>& args) {
  std::string socket_path, ip_text, mac_text = "02:75:76:00:00:01";
  bool once = false, verbose = false;
  po::options_description desc("serve options");
  desc.add_options()("socket", po::value(&socket_path), "Unix socket to listen on")(
      "ip", po::value(&ip_text), "IPv4 address to answer for")(
      "mac", po::value(&mac_text), "our MAC address")("once", po::bool_switch(&once),
                                                      "exit when the front-end disconnects")(
      "verbose,v", po::bool_switch(&verbose), "log session events");
  parse(args, desc, {});
  if (socket_path.empty()) throw UsageError{"serve: --socket is required"};
  if (ip_text.empty()) throw UsageError{"serve: --ip is required"};
  const Responder responder(parse_mac(mac_text), parse_ip(ip_text));

  // Signals arrive on a signalfd, polled with everything else.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  if (::sigprocmask(SIG_BLOCK, &set, nullptr) != 0)
    return fail(Error::from_errno(errno, "signals", "sigprocmask"));
  pci::Fd sigfd(pci::Os::system(), ::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!sigfd.valid()) return fail(Error::from_errno(errno, "signals", "signalfd"));

  vu::BackendOptions opts;
  opts.name = "vhost-user net " + socket_path;
  opts.features = (1ull << driver::feature::kVersion1) | (1ull << driver::feature::kEventIdx) |
                  (1ull << driver::feature::kIndirectDesc);
  opts.num_queues = 2;
  opts.max_queue_size = 1024;
  if (verbose)
    opts.trace = [](const std::string& line) { std::cout << g_program << ": < " << line << std::endl; };
  auto be = vu::VhostUserBackend::listen(socket_path, opts);
  if (!be) return fail(be.error());
  vu::VhostUserBackend& backend = **be;
  std::cout << g_program << ": listening on " << socket_path << " for " << ip_text << " (" << mac_text
            << "), offering features " << hex64(backend.offered_features()) << std::endl;

  NetDevice dev(backend, responder);
  int status = 0;
  std::uint64_t session_messages = 0;
  for (;;) {
    std::vector<pollfd> pfds{{sigfd.get(), POLLIN, 0}};
    std::vector<std::uint32_t> kick_ring;  // pfds index - 2 -> ring
    pfds.push_back({backend.connected() ? backend.conn_fd() : backend.listen_fd(), POLLIN, 0});
    int timeout = -1;
    for (std::uint32_t r : {kRx, kTx}) {
      if (!backend.connected() || !dev.serviceable(r)) continue;
      if (backend.kick_fd(r) < 0) {
        timeout = 1;  // a polled ring (SET_VRING_KICK without an fd)
        continue;
      }
      pfds.push_back({backend.kick_fd(r), POLLIN, 0});
      kick_ring.push_back(r);
    }
    const int n = ::poll(pfds.data(), pfds.size(), timeout);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(Error::from_errno(errno, "vhost-net", "poll"));
    if (pfds[0].revents != 0) break;  // SIGINT / SIGTERM
    if (pfds[1].revents != 0) {
      if (!backend.connected()) {
        if (auto r = backend.accept(); !r) {
          std::cerr << g_program << ": " << r.error().message() << "\n";
          continue;
        }
        ++dev.counters().sessions;
        session_messages = 0;
        dev.reset();
        std::cout << g_program << ": client connected (session " << dev.counters().sessions << ")"
                  << std::endl;
        continue;
      }
      auto ev = backend.handle_message();
      ++session_messages;
      if (!ev) {
        std::cerr << g_program << ": session ended: " << ev.error().message() << "\n";
        status = 1;
        if (once) break;
        continue;
      }
      switch (*ev) {
        case vu::VhostUserBackend::Event::disconnected:
          if (session_messages == 1) {
            // Connected and left without a message (another server probing
            // whether the socket is live): not the front-end --once waits for.
            std::cout << g_program << ": a client connected and left without a message" << std::endl;
            --dev.counters().sessions;
            continue;
          }
          std::cout << g_program << ": front-end disconnected" << std::endl;
          status = 0;
          break;
        case vu::VhostUserBackend::Event::refused:
          std::cerr << g_program << ": refused: " << backend.last_refusal()->message() << "\n";
          break;
        case vu::VhostUserBackend::Event::rings_changed:
          if (backend.queue(kRx) != nullptr || backend.queue(kTx) != nullptr) {
            dev.counters().features = backend.acked_features();
          }
          if (verbose) {
            std::cout << g_program << ": rings: rx " << (backend.queue(kRx) ? "running" : "stopped")
                      << ", tx " << (backend.queue(kTx) ? "running" : "stopped") << ", features "
                      << hex64(backend.acked_features()) << std::endl;
          }
          dev.service_all();
          break;
        case vu::VhostUserBackend::Event::handled:
          break;
      }
      if (!backend.connected() && once) break;
      continue;  // ring pointers may have changed: rebuild the poll set
    }
    for (std::size_t i = 0; i < kick_ring.size(); ++i) {
      if (pfds[i + 2].revents == 0) continue;
      backend.drain_kick(kick_ring[i]);
      dev.service(kick_ring[i]);
    }
    if (timeout >= 0) dev.service_all();
  }
  print_summary(dev.counters());
  return status;
}

int run(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help") {
    std::cout << kUsageText;
    return argc < 2 ? kUsage : 0;
  }
  const std::string cmd = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  if (cmd == "serve") return cmd_serve(args);
  throw UsageError{"unknown command '" + cmd + "' (see --help)"};
}

}  // namespace
}  // namespace uvirtio::apps

int main(int argc, char** argv) {
  return uvirtio::apps::tool_main("uvirtio-vhost-net", argc, argv, uvirtio::apps::run);
}
