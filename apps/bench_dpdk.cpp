// DPDK testpmd virtio-user -> vhost-user loopback, the same-run baseline of
// `uvirtio-bench rings` (bench_dpdk.hpp). We start testpmd, we do not link
// DPDK: its EAL wants the whole process (hugepage or memory setup, lcores),
// and the two Debian-built testpmd processes are exactly what users compare
// against.
#include "bench_dpdk.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

extern char** environ;

namespace uvirtio::apps {
namespace {

constexpr const char* kWho = "dpdk-testpmd";

std::string find_in_path(const std::string& name) {
  if (name.find('/') != std::string::npos) return access(name.c_str(), X_OK) == 0 ? name : std::string();
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path != nullptr ? path : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string p = (dir.empty() ? "." : dir) + "/" + name;
    if (access(p.c_str(), X_OK) == 0) return p;
  }
  return {};
}

// A started testpmd; stopped (SIGINT, then SIGKILL after a grace period) and
// reaped when it goes out of scope.
class Process {
 public:
  static Result<Process> spawn(const std::vector<std::string>& argv, const std::string& log) {
    const char* op = "start";
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    pid_t pid = -1;
    const int rc = posix_spawn(&pid, argv[0].c_str(), &fa, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) return Error::from_errno(rc, kWho, op, argv[0]);
    Process p;
    p.pid_ = pid;
    return p;
  }
  Process(Process&& o) noexcept : pid_(std::exchange(o.pid_, -1)) {}
  Process& operator=(Process&&) = delete;
  ~Process() { stop(); }

  bool running() {
    if (pid_ < 0) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    return true;
  }

  void stop() {
    if (pid_ < 0) return;
    kill(pid_, SIGINT);
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (running() && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (pid_ >= 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }

 private:
  Process() = default;
  pid_t pid_ = -1;
};

std::string tail(const std::string& path, std::size_t lines) {
  std::ifstream in(path);
  std::vector<std::string> all;
  for (std::string l; std::getline(in, l);) all.push_back(l);
  std::string out;
  for (std::size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i)
    out += "\n  " + all[i];
  return out;
}

// The Tx-pps figures of testpmd's periodic statistics, in order.
std::vector<double> tx_pps_samples(const std::string& path) {
  std::ifstream in(path);
  std::vector<double> v;
  for (std::string l; std::getline(in, l);) {
    const auto at = l.find("Tx-pps:");
    if (at == std::string::npos) continue;
    v.push_back(std::strtod(l.c_str() + at + 7, nullptr));
  }
  return v;
}

}  // namespace

std::optional<std::string> dpdk_unavailable(const std::string& testpmd) {
  const std::string name = testpmd.empty() ? "dpdk-testpmd" : testpmd;
  if (find_in_path(name).empty()) return name + " not found (Debian package dpdk-dev)";
  return std::nullopt;
}

Result<double> dpdk_loopback_pps(const DpdkLoopbackOptions& o) {
  const char* op = "virtio-user -> vhost-user loopback";
  const std::string testpmd = find_in_path(o.testpmd.empty() ? "dpdk-testpmd" : o.testpmd);
  if (testpmd.empty()) return Error(Errc::not_found, kWho, op, *dpdk_unavailable(o.testpmd));
  if (o.seconds < 3) return Error(Errc::invalid_argument, kWho, op, "at least 3 seconds are needed");
  char tmpl[] = "/tmp/uvirtio-dpdk.XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return Error::from_errno(errno, kWho, op, "mkdtemp");
  const std::filesystem::path dir(tmpl);
  struct Cleanup {
    std::filesystem::path d;
    ~Cleanup() {
      std::error_code ec;
      std::filesystem::remove_all(d, ec);
    }
  } cleanup{dir};
  const std::string sock = (dir / "vhost.sock").string();
  const std::string burst = std::to_string(o.burst);
  const std::vector<std::string> eal = {"--no-pci", "--no-huge", "-m", "512"};
  const std::vector<std::string> pmd = {"--total-num-mbufs=16384", "--burst=" + burst, "--no-lsc-interrupt",
                                        "--stats-period", "1"};
  auto cmd = [&](const std::string& lcores, const std::string& prefix, const std::string& vdev,
                 const std::vector<std::string>& extra) {
    std::vector<std::string> a = {testpmd, "--lcores", lcores};
    a.insert(a.end(), eal.begin(), eal.end());
    a.push_back("--file-prefix=" + prefix + std::to_string(getpid()));
    a.push_back("--vdev=" + vdev);
    a.push_back("--");
    a.insert(a.end(), pmd.begin(), pmd.end());
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  };
  // Device role: vhost-user rxonly, forwarding lcore on CPU 0.
  const std::string rx_log = (dir / "rx.log").string(), tx_log = (dir / "tx.log").string();
  UV_TRY(Process rx, Process::spawn(cmd("0@0,1@0", "uvr-rx", "net_vhost0,iface=" + sock + ",queues=1",
                                        {"--forward-mode=rxonly"}),
                                    rx_log));
  for (int i = 0; i < 200 && !std::filesystem::exists(sock); ++i) {
    if (!rx.running()) return Error(Errc::io, kWho, op, "the vhost-user side exited:" + tail(rx_log, 5));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (!std::filesystem::exists(sock))
    return Error(Errc::timeout, kWho, op, "no vhost-user socket after 10 s:" + tail(rx_log, 5));
  // Driver role: virtio-user txonly, 64-byte packets, forwarding lcore on CPU 1.
  UV_TRY(Process tx, Process::spawn(cmd("0@1,1@1", "uvr-tx",
                                        "net_virtio_user0,path=" + sock +
                                            ",queues=1,queue_size=" + std::to_string(o.queue_size),
                                        {"--forward-mode=txonly", "--txpkts=64"}),
                                    tx_log));
  // testpmd prints Tx-pps once a second. Its start (EAL memory without
  // hugepages, the vhost-user handshake) took from under 1 s to over 3 s on
  // these machines, with samples of 0 until the link is up, so the run is
  // timed from the first sample that moved packets: that one (it covers the
  // start), o.seconds more, and one that may be cut short, both dropped below.
  auto first_moving = [](const std::vector<double>& v) {
    return static_cast<std::size_t>(std::find_if(v.begin(), v.end(), [](double x) { return x > 0; }) -
                                    v.begin());
  };
  constexpr auto kStartLimit = std::chrono::seconds(30);
  const auto start_deadline = std::chrono::steady_clock::now() + kStartLimit;
  std::vector<double> v;
  for (;;) {
    if (!tx.running()) break;
    v = tx_pps_samples(tx_log);
    const std::size_t first = first_moving(v);
    if (first < v.size() && v.size() - first >= o.seconds + 2) break;
    if (first == v.size() && std::chrono::steady_clock::now() > start_deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  tx.stop();
  rx.stop();
  v = tx_pps_samples(tx_log);
  const std::size_t first = first_moving(v);
  if (first == v.size())
    return Error(Errc::io, kWho, op,
                 "the pair moved no packets within " + std::to_string(kStartLimit.count()) + " s (" +
                     std::to_string(v.size()) + " Tx-pps samples, all 0):" + tail(tx_log, 8) +
                     "\n vhost-user side:" + tail(rx_log, 8));
  // The first moving sample covers the start, the last may be cut short.
  v = std::vector<double>(v.begin() + static_cast<std::ptrdiff_t>(first), v.end());
  if (v.size() >= 3) v = std::vector<double>(v.begin() + 1, v.end() - 1);
  std::sort(v.begin(), v.end());
  return v[(v.size() - 1) / 2];
}

}  // namespace uvirtio::apps
