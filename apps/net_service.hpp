// The packet side shared by the vhost-user net back-end (uvirtio-vhost-net)
// and the vhost-pci net app (uvirtio-vhost-pci): an ARP and ICMP echo
// responder for one IPv4 address, and the virtio-net data path (virtio spec
// 1.2, 5.1.6: a struct virtio_net_hdr before each packet, 12 bytes with
// VERSION_1 or MRG_RXBUF, else 10; no offloads; one receive chain per packet)
// over any device-role port.
#pragma once

#include <arpa/inet.h>
#include <signal.h>
#include <sys/signalfd.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <iostream>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "cli_common.hpp"
#include "uvirtio/base/hex.hpp"
#include "uvirtio/driver/features.hpp"
#include "uvirtio/pci/os.hpp"
#include "uvirtio/rings/split_device.hpp"

namespace uvirtio::apps {

inline constexpr unsigned kMrgRxbuf = 15;  // VIRTIO_NET_F_MRG_RXBUF (virtio spec 1.2, 5.1.3)
inline constexpr std::uint32_t kRx = 0;
inline constexpr std::uint32_t kTx = 1;
inline constexpr std::size_t kMaxFrame = 65535 + 14;
inline constexpr std::size_t kBacklog = 256;
inline constexpr std::uint16_t kEthArp = 0x0806;
inline constexpr std::uint16_t kEthIpv4 = 0x0800;

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
  std::uint64_t features = 0;   // acknowledged by the last front-end whose rings ran
  std::uint64_t reflected = 0;  // frames sent back with the addresses swapped (--reflect)
  // Steady-clock nanoseconds of the first and last frame received: the
  // receive rate is (received - 1) over the time between them.
  std::int64_t first_rx_ns = 0, last_rx_ns = 0;
};

inline std::uint16_t get16(const std::uint8_t* p) { return static_cast<std::uint16_t>(p[0] << 8 | p[1]); }
inline void put16(std::uint8_t* p, std::uint16_t v) {
  p[0] = static_cast<std::uint8_t>(v >> 8);
  p[1] = static_cast<std::uint8_t>(v);
}

// The Internet checksum (RFC 1071): 0 over data that includes a correct one.
inline std::uint16_t inet_checksum(std::span<const std::uint8_t> d) {
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
  Responder(MacAddr mac, std::array<std::uint8_t, 4> ip, bool reflect = false)
      : mac_(mac), ip_(ip), reflect_(reflect) {}

  // Whether answer() could reply to a frame that starts like `head` (at
  // least 14 bytes): ARP, or IPv4 to our MAC, or anything when reflecting.
  // Lets the data path count and drop other frames without copying them.
  bool may_answer(std::span<const std::uint8_t> head) const {
    if (reflect_ || head.size() < 14) return true;
    const std::uint16_t type = get16(head.data() + 12);
    return type == kEthArp || (type == kEthIpv4 && std::memcmp(head.data(), mac_.data(), 6) == 0);
  }

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
        return reflect_or_drop(f, c);
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
      return reflect_or_drop(f, c);
    }
    if (get16(a + 6) != 1 || std::memcmp(a + 24, ip_.data(), 4) != 0) {  // a request for our address?
      return reflect_or_drop(f, c);
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
      return reflect_or_drop(f, c);
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
      return reflect_or_drop(f, c);  // not to us, not ICMP, or a fragment we do not reassemble
    }
    const auto icmp = ip.subspan(ihl, total - ihl);
    if (icmp.size() < 8 || inet_checksum(icmp) != 0) {
      ++c.malformed;
      return std::nullopt;
    }
    if (icmp[0] != 8 || icmp[1] != 0) {  // echo request
      return reflect_or_drop(f, c);
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

  // With --reflect a frame we do not answer goes back to its sender with
  // the Ethernet addresses swapped (a DPDK macswap peer bounces it again).
  std::optional<std::vector<std::uint8_t>> reflect_or_drop(std::span<const std::uint8_t> f,
                                                           Counters& c) const {
    if (!reflect_) {
      ++c.dropped;
      return std::nullopt;
    }
    std::vector<std::uint8_t> r(f.begin(), f.end());
    std::memcpy(r.data(), f.data() + 6, 6);
    std::memcpy(r.data() + 6, f.data(), 6);
    ++c.reflected;
    return r;
  }

  MacAddr mac_;
  std::array<std::uint8_t, 4> ip_;
  bool reflect_ = false;
};

// The virtio-net data path over a device's two rings, in the device role.
// Port gives the rings and their notifications:
//   rings::SplitDeviceQueue* queue(std::uint32_t ring);  // null: not running
//   bool has_feature(unsigned bit);                        // negotiated by the front-end
//   Result<void> notify(std::uint32_t ring);               // interrupt the front-end
//   Result<void> report_error(std::uint32_t ring);         // a ring latched broken
template <class Port>
class NetDevice {
 public:
  NetDevice(Port& port, const Responder& responder) : port_(port), responder_(responder) {}

  Counters& counters() { return c_; }
  // A new front-end: replies meant for the old one are dropped.
  void reset() { backlog_.clear(); }

  // After any ring change: both rings are looked at once (kicks may have
  // come before we watched the eventfds).
  // Returns the frames taken from the front-end's transmit ring.
  unsigned service_all() {
    const unsigned n = service_tx();
    flush_rx();
    return n;
  }
  void service(std::uint32_t ring) {
    if (ring == kTx) service_tx();
    flush_rx();
  }
  // A running ring that latched broken is skipped until the front-end
  // restarts it.
  bool serviceable(std::uint32_t ring) {
    auto* q = port_.queue(ring);
    return q != nullptr && !q->broken();
  }

 private:
  std::size_t hdr_len() const {
    return port_.has_feature(driver::feature::kVersion1) || port_.has_feature(kMrgRxbuf) ? 12 : 10;
  }

  void ring_error(std::uint32_t ring, const Error& e) {
    ++c_.ring_errors;
    std::cerr << g_program << ": " << e.message() << " (ring stopped until the front-end restarts it)\n";
    if (auto r = port_.report_error(ring); !r) std::cerr << g_program << ": " << r.error().message() << "\n";
  }

  void interrupt(std::uint32_t ring) {
    auto* q = port_.queue(ring);
    if (q == nullptr || !q->should_interrupt()) return;
    if (auto r = port_.notify(ring); !r) std::cerr << g_program << ": " << r.error().message() << "\n";
  }

  unsigned service_tx() {
    auto* q = port_.queue(kTx);
    if (q == nullptr || q->broken()) return 0;
    const std::size_t hl = hdr_len();
    bool any = false;
    // At most one ring's worth per call, published at once (one used-index
    // store per batch); the batch's frames share one timestamp.
    unsigned n = 0;
    for (; n < q->size(); ++n) {
      auto popped = q->pop_into(req_);
      if (!popped) {
        ring_error(kTx, popped.error());
        return n;
      }
      if (!*popped) break;
      const auto& req = req_;
      if (!any) {
        const std::int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                     std::chrono::steady_clock::now().time_since_epoch())
                                     .count();
        if (c_.received == 0) c_.first_rx_ns = now;
        c_.last_rx_ns = now;
        any = true;
      }
      frame_.clear();
      if (req.readable_bytes > hl + kMaxFrame) {
        ++c_.malformed;
      } else if (!req.readable.empty() && req.readable[0].size() >= hl + 14 &&
                 !responder_.may_answer(req.readable[0].subspan(hl, 14))) {
        ++c_.received;  // not for us: counted and dropped without a copy
        ++c_.dropped;
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
      if (auto r = q->push_deferred(req.head, 0); !r) {
        q->publish_used();  // what was completed before stays completed
        ring_error(kTx, r.error());
        return n;
      }
    }
    q->publish_used();
    interrupt(kTx);
    return n;
  }

  void flush_rx() {
    auto* q = port_.queue(kRx);
    if (q == nullptr || q->broken()) return;
    bool pushed = false;
    while (!backlog_.empty()) {
      auto popped = q->pop_into(req_);
      if (!popped) {
        ring_error(kRx, popped.error());
        return;
      }
      if (!*popped) break;  // no buffer yet: wait for the next rx kick
      const auto& req = req_;
      const auto& frame = backlog_.front();
      const std::size_t hl = hdr_len();
      std::uint32_t written = 0;
      if (req.writable_bytes >= hl + frame.size()) {
        // virtio_net_hdr: no checksum offload, no GSO; num_buffers 1
        // (5.1.6.4: without MRG_RXBUF the device sets it to 1).
        std::array<std::uint8_t, 12> hdr{};
        hdr[10] = 1;
        rings::scatter(req.writable, 0, std::as_bytes(std::span<const std::uint8_t>(hdr).first(hl)));
        rings::scatter(req.writable, hl, std::as_bytes(std::span<const std::uint8_t>(frame)));
        written = static_cast<std::uint32_t>(hl + frame.size());
        ++c_.sent;
      } else {
        ++c_.rx_no_buffer;  // a buffer too small for the frame: returned empty
      }
      backlog_.pop_front();
      if (auto r = q->push_deferred(req.head, written); !r) {
        q->publish_used();  // what was completed before stays completed
        ring_error(kRx, r.error());
        return;
      }
      pushed = true;
    }
    if (pushed) {
      q->publish_used();  // the replies of this call at once
      interrupt(kRx);
    }
  }

  Port& port_;
  const Responder& responder_;
  Counters c_;
  std::deque<std::vector<std::uint8_t>> backlog_;
  std::vector<std::uint8_t> frame_;
  rings::SplitDeviceQueue::Request req_;  // reused: no allocation per frame
};

// The virtio-net features the apps serve: no offloads, no MRG_RXBUF.
// IN_ORDER (spec 2.7.9): NetDevice takes chains in available order and
// completes each before taking the next, so it already uses buffers in the
// order they were made available. It writes one used entry per chain, never
// one per batch (which the spec would allow): DPDK's virtio PMD, the front-end
// that negotiates it, frees one transmit chain per used-index step without
// reading the entries and takes each receive length from the entry of its own
// position. Offering it lets that front-end use its in-order paths, which is
// what DPDK's own vhost back-end offers too.
inline constexpr std::uint64_t kServedNetFeatures =
    (1ull << driver::feature::kVersion1) | (1ull << driver::feature::kEventIdx) |
    (1ull << driver::feature::kIndirectDesc) | (1ull << driver::feature::kInOrder);

// Blocks SIGINT and SIGTERM and returns a signalfd for them, to be polled
// with everything else.
inline Result<pci::Fd> termination_signalfd() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  if (::sigprocmask(SIG_BLOCK, &set, nullptr) != 0) return Error::from_errno(errno, "signals", "sigprocmask");
  pci::Fd fd(pci::Os::system(), ::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!fd.valid()) return Error::from_errno(errno, "signals", "signalfd");
  return fd;
}

inline MacAddr parse_mac(const std::string& text, const std::string& option = "--mac") {
  // Exactly six pairs of hex digits joined by ':' (sscanf's %x would also
  // take signs, blanks and single digits).
  MacAddr m{};
  bool ok = text.size() == 17;
  for (std::size_t i = 0; ok && i < 6; ++i) {
    const char* p = text.data() + 3 * i;
    const auto [end, ec] = std::from_chars(p, p + 2, m[i], 16);
    ok = ec == std::errc{} && end == p + 2 && (i == 5 || p[2] == ':');
  }
  if (!ok) throw UsageError{option + ": '" + text + "' is not a MAC address like 02:00:00:00:00:01"};
  if (m[0] & 1) throw UsageError{option + ": '" + text + "' is a multicast address"};
  return m;
}

inline std::array<std::uint8_t, 4> parse_ip(const std::string& text) {
  in_addr a{};
  if (::inet_pton(AF_INET, text.c_str(), &a) != 1) {
    throw UsageError{"--ip: '" + text + "' is not an IPv4 address like 10.0.2.1"};
  }
  std::array<std::uint8_t, 4> ip;
  std::memcpy(ip.data(), &a.s_addr, 4);
  return ip;
}

// Frames per second between the first and the last frame received.
inline double rx_pps(const Counters& c) {
  if (c.received < 2 || c.last_rx_ns <= c.first_rx_ns) return 0;
  return static_cast<double>(c.received - 1) * 1e9 / static_cast<double>(c.last_rx_ns - c.first_rx_ns);
}

inline void print_summary(const Counters& c) {
  std::cout << g_program << ": summary: received=" << c.received << " sent=" << c.sent
            << " arp_replies=" << c.arp_replies << " icmp_replies=" << c.icmp_replies
            << " dropped=" << c.dropped << " malformed=" << c.malformed << " rx_no_buffer=" << c.rx_no_buffer
            << " ring_errors=" << c.ring_errors << " sessions=" << c.sessions
            << " features=" << uvirtio::hex(c.features) << " reflected=" << c.reflected
            << " rx_pps=" << static_cast<std::uint64_t>(rx_pps(c)) << std::endl;
}

}  // namespace uvirtio::apps
