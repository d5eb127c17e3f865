// uvirtio-vhost-pci: a VM's virtio-net served through vhost-pci. Runs the
// vhost-pci device model (a vhost-user back-end for the front-end's
// virtio-net: a QEMU guest with -netdev vhost-user, or DPDK's virtio-user)
// and, over the function it presents, the vhost-pci driver: the driver
// negotiates on the controlq, maps the front-end's memory through the BAR
// and serves its rings in the device role. The app on top answers ARP and
// ICMP echo for one IPv4 address (the same responder as uvirtio-vhost-net),
// so `ping` from the front-end's guest reaches it.
//
//   uvirtio-vhost-pci serve --socket PATH --ip A.B.C.D [--mac MAC]
//                           [--peer-mac MAC] [--no-ackq] [--reflect] [--poll] [--once] [-v]
//
// --no-ackq keeps to the RFC's acks through the device config (the driver
// then also waits for UPDATE_DONE). --once: exit when the first remote
// device is withdrawn (its front-end left). --reflect: frames not answered
// go back to their sender with the Ethernet addresses swapped (for a DPDK
// macswap peer). --poll: busy-poll the remote rings instead of sleeping on
// kicks (the benchmark mode). On exit one summary line:
//   uvirtio-vhost-pci: summary: received=N sent=N arp_replies=N ... sessions=N features=0x...
//                      announced=N withdrawn=N ackq=0|1
// Exit status: 0, 1 on a driver or device-model error, 2 bad usage.
#include "uvirtio/driver/vhost_pci.hpp"

#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "cli_common.hpp"
#include "net_service.hpp"
#include "uvirtio/driver/features.hpp"
#include "uvirtio/driver/vhost_pci_device.hpp"
#include "uvirtio/pci/os.hpp"

namespace uvirtio::apps {
namespace {

namespace vp = driver::vhost_pci;

// Control messages handled per pass of the serving loop (wait_control() in
// the driver takes the same bound).
constexpr int kControlBatch = 64;

const char* kUsageText =
    "usage: uvirtio-vhost-pci serve --socket PATH --ip A.B.C.D [--mac MAC] [--peer-mac MAC]\n"
    "                               [--no-ackq] [--reflect] [--poll] [--once] [-v]\n"
    "Serves a VM's virtio-net through vhost-pci: the device model listens for a vhost-user\n"
    "front-end (QEMU: -chardev socket,id=c,path=PATH -netdev vhost-user,id=n,chardev=c\n"
    "-device virtio-net-pci,netdev=n, guest RAM shared), the vhost-pci driver serves its rings,\n"
    "and the app answers ARP and ICMP echo for --ip. --peer-mac: the front-end's MAC, sent as\n"
    "the DEVICE_INFO device id. --no-ackq: RFC acks through the device config only.\n";

// The driver's remote rings as NetDevice's port.
struct DriverPort {
  vp::Driver& drv;
  rings::SplitDeviceQueue* queue(std::uint32_t ring) { return drv.remote_queue(ring); }
  bool has_feature(unsigned bit) const { return drv.remote_has(bit); }
  Result<void> notify(std::uint32_t ring) { return drv.call_remote(ring); }
  Result<void> report_error(std::uint32_t) { return ok(); }  // vhost-pci has no error channel
};

std::uint64_t mac_id(const MacAddr& m) {
  std::uint64_t v = 0;
  for (auto b : m) v = v << 8 | b;
  return v;
}

int cmd_serve(const std::vector<std::string>& args) {
  std::string socket_path, ip_text, mac_text = "02:75:76:00:00:02", peer_mac_text = "52:54:00:12:34:56";
  bool once = false, verbose = false, no_ackq = false, reflect = false, busy_poll = false;
  po::options_description desc("serve options");
  desc.add_options()("help,h", "show help")("socket", po::value(&socket_path), "Unix socket to listen on")(
      "ip", po::value(&ip_text), "IPv4 address to answer for")(
      "mac", po::value(&mac_text), "our MAC address")("peer-mac", po::value(&peer_mac_text),
                                                      "the front-end's MAC (DEVICE_INFO device id)")(
      "no-ackq", po::bool_switch(&no_ackq), "RFC acks through the device config")(
      "once", po::bool_switch(&once), "exit when the front-end's device is withdrawn")(
      "reflect", po::bool_switch(&reflect), "send frames not answered back with the addresses swapped")(
      "poll", po::bool_switch(&busy_poll), "busy-poll the remote rings (no kicks)")(
      "verbose,v", po::bool_switch(&verbose), "log protocol steps");
  const auto vm = parse(args, desc, {});
  if (vm.count("help")) {
    std::cout << kUsageText << desc;
    return 0;
  }
  if (socket_path.empty()) throw UsageError{"serve: --socket is required"};
  if (ip_text.empty()) throw UsageError{"serve: --ip is required"};
  const Responder responder(parse_mac(mac_text), parse_ip(ip_text), reflect);
  const MacAddr peer_mac = parse_mac(peer_mac_text, "--peer-mac");

  auto sig = termination_signalfd();  // polled with everything else
  if (!sig) return fail(sig.error());
  pci::Fd sigfd = std::move(*sig);

  vp::DeviceOptions dopt;
  dopt.socket = socket_path;
  dopt.net_features = kServedNetFeatures;
  dopt.device_id = mac_id(peer_mac);
  dopt.offer_ackq = !no_ackq;
  if (verbose)
    dopt.log = [](const std::string& line) { std::cout << g_program << ": device: " << line << std::endl; };
  auto model = vp::DeviceModel::create(dopt);
  if (!model) return fail(model.error());
  pci::Fd stop(pci::Os::system(), ::eventfd(0, EFD_CLOEXEC));
  if (!stop.valid()) return fail(Error::from_errno(errno, "device model", "eventfd"));
  std::optional<Error> model_error;
  std::thread model_thread([&] {
    if (auto r = (*model)->run(stop.get()); !r) model_error = r.error();
  });
  auto stop_model = [&] {
    const std::uint64_t one = 1;
    (void)!::write(stop.get(), &one, sizeof one);
    if (model_thread.joinable()) model_thread.join();
  };

  auto drv_r = vp::Driver::open((*model)->function());
  if (!drv_r) {
    stop_model();
    return fail(drv_r.error());
  }
  vp::Driver& drv = **drv_r;
  std::cout << g_program << ": listening on " << socket_path << " for " << ip_text << " (" << mac_text
            << "); vhost-pci driver bound to " << drv.name()
            << (drv.ackq() ? " with VHOST_PCI_F_ACKQ" : " (RFC acks)") << std::endl;

  DriverPort port{drv};
  NetDevice<DriverPort> dev(port, responder);
  int status = 0;
  bool done = false;
  std::uint64_t withdrawn = 0;  // DEVICE_INFO DEL seen by the driver
  bool more_control = false;    // the last pass stopped at kControlBatch messages
  while (!done) {
    std::vector<pollfd> pfds{{sigfd.get(), POLLIN, 0}, {drv.control_fd(), POLLIN, 0}};
    std::vector<std::uint32_t> kick_ring;
    for (std::uint32_t r : {kRx, kTx}) {
      if (!dev.serviceable(r) || drv.kick_fd(r) < 0) continue;
      pfds.push_back({drv.kick_fd(r), POLLIN, 0});
      kick_ring.push_back(r);
    }
    // Kicks are eventfds swapped in under the poll set when a device is
    // added; a bounded wait picks the new ones up.
    const bool spinning = busy_poll && drv.remote_ready();
    const int n = ::poll(pfds.data(), pfds.size(), spinning || more_control ? 0 : 200);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      status = fail(Error::from_errno(errno, "vhost-pci", "poll"));
      break;
    }
    if (pfds[0].revents != 0) break;
    // A bounded batch of control messages per pass, as in wait_control():
    // a device refilling the controlq as fast as we repost its buffers must
    // not starve the data path or the signal pipe; the rest waits for the
    // next pass, which does not sleep.
    more_control = false;
    for (int handled = 0;; ++handled) {
      if (handled == kControlBatch) {
        more_control = true;
        break;
      }
      auto ev = drv.handle_control();
      if (!ev) {
        std::cerr << g_program << ": " << ev.error().message() << "\n";
        status = 1;
        done = true;
        break;
      }
      if (*ev == vp::Driver::Event::none) break;
      using E = vp::Driver::Event;
      switch (*ev) {
        case E::refused:
          std::cerr << g_program << ": refused: " << drv.last_refusal()->message() << "\n";
          break;
        case E::device_added:
        case E::device_ready:
          if (drv.remote_ready()) {
            ++dev.counters().sessions;
            dev.counters().features = drv.remote_features();
            dev.reset();
            std::cout << g_program << ": serving the remote virtio-net " << peer_mac_text << " (features "
                      << uvirtio::hex(drv.remote_features()) << ", " << drv.memory().regions().size()
                      << " memory regions)" << std::endl;
            if (busy_poll)  // no kicks wanted: we look at the ring all the time
              if (auto* q = drv.remote_queue(kTx)) q->set_notifications(false);
            dev.service_all();
          }
          break;
        case E::device_removed:
          ++withdrawn;
          std::cout << g_program << ": remote device withdrawn" << std::endl;
          if (once) done = true;
          break;
        default:
          if (verbose) std::cout << g_program << ": controlq event " << static_cast<int>(*ev) << std::endl;
          break;
      }
    }
    for (std::size_t i = 0; i < kick_ring.size(); ++i) {
      if (pfds[i + 2].revents == 0) continue;
      drv.drain_kick(kick_ring[i]);
      dev.service(kick_ring[i]);
    }
    if (drv.remote_ready()) dev.service_all();  // a kick may land between the swap and the poll
    // No PAUSE between looks at an empty ring: on these virtual CPUs it
    // costs a hypervisor exit (pause-loop exiting), and measured 1.2 Mpps
    // instead of 5-15.
    for (int i = 0; spinning && i < 1024 && drv.remote_ready(); ++i) dev.service_all();
  }
  print_summary(dev.counters());
  // Counted on the driver's side (the device model counts an ack only when
  // its thread has read it); refusals are the model's.
  std::cout << g_program << ": vhost-pci: announced=" << dev.counters().sessions << " withdrawn=" << withdrawn
            << " refusals=" << (*model)->stats().refusals << " ackq=" << (drv.ackq() ? 1 : 0) << std::endl;
  drv_r->reset();
  stop_model();
  if (model_error) {
    std::cerr << g_program << ": " << model_error->message() << "\n";
    status = 1;
  }
  return status;
}

int run(int argc, char** argv) { return run_command(argc, argv, kUsageText, {{"serve", cmd_serve}}); }

}  // namespace
}  // namespace uvirtio::apps

int main(int argc, char** argv) {
  return uvirtio::apps::tool_main("uvirtio-vhost-pci", argc, argv, uvirtio::apps::run);
}
