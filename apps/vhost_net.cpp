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
#include "net_service.hpp"
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

// The back-end's rings as NetDevice's port.
struct BackendPort {
  vu::VhostUserBackend& be;
  rings::SplitDeviceQueue* queue(std::uint32_t ring) { return be.queue(ring); }
  bool has_feature(unsigned bit) const { return be.has_feature(bit); }
  Result<void> notify(std::uint32_t ring) { return be.notify(ring); }
  Result<void> report_error(std::uint32_t ring) { return be.report_error(ring); }
};

int cmd_serve(const std::vector<std::string>& args) {
  std::string socket_path, ip_text, mac_text = "02:75:76:00:00:01";
  bool once = false, verbose = false;
  po::options_description desc("serve options");
  desc.add_options()("help,h", "show help")("socket", po::value(&socket_path), "Unix socket to listen on")(
      "ip", po::value(&ip_text), "IPv4 address to answer for")(
      "mac", po::value(&mac_text), "our MAC address")("once", po::bool_switch(&once),
                                                      "exit when the front-end disconnects")(
      "verbose,v", po::bool_switch(&verbose), "log session events");
  const auto vm = parse(args, desc, {});
  if (vm.count("help")) {
    std::cout << kUsageText << desc;
    return 0;
  }
  if (socket_path.empty()) throw UsageError{"serve: --socket is required"};
  if (ip_text.empty()) throw UsageError{"serve: --ip is required"};
  const Responder responder(parse_mac(mac_text), parse_ip(ip_text));

  auto sig = termination_signalfd();  // polled with everything else
  if (!sig) return fail(sig.error());
  pci::Fd sigfd = std::move(*sig);

  vu::BackendOptions opts;
  opts.name = "vhost-user net " + socket_path;
  opts.features = kServedNetFeatures;
  opts.num_queues = 2;
  opts.max_queue_size = 1024;
  if (verbose)
    opts.trace = [](const std::string& line) { std::cout << g_program << ": < " << line << std::endl; };
  auto be = vu::VhostUserBackend::listen(socket_path, opts);
  if (!be) return fail(be.error());
  vu::VhostUserBackend& backend = **be;
  std::cout << g_program << ": listening on " << socket_path << " for " << ip_text << " (" << mac_text
            << "), offering features " << uvirtio::hex(backend.offered_features()) << std::endl;

  BackendPort port{backend};
  NetDevice<BackendPort> dev(port, responder);
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
                      << uvirtio::hex(backend.acked_features()) << std::endl;
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

int run(int argc, char** argv) { return run_command(argc, argv, kUsageText, {{"serve", cmd_serve}}); }

}  // namespace
}  // namespace uvirtio::apps

int main(int argc, char** argv) {
  return uvirtio::apps::tool_main("uvirtio-vhost-net", argc, argv, uvirtio::apps::run);
}
