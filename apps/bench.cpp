// uvirtio-bench: host-side and in-guest measurements that are not a device
// command. For now:
//   uvirtio-bench fsync FILE [--seconds S] [--json]
//       p50/p99 of a 64-byte pwrite + fsync on FILE (the host half of the
//       virtio-pmem floor: what one device flush costs the host). FILE is
//       created if missing; one with data in its first 4 KiB is refused.
//   uvirtio-bench rings [--batch B]... [--seconds S] [--size N] [--no-dpdk] [--json]
//       split ring throughput between two threads vs a bare SPSC ring
//       (bench_rings.cpp).
//   uvirtio-bench channel [--seconds S] [--size BYTES] [--rounds R] [--json]
//       the inter-VM message channel between two processes vs Unix and TCP
//       sockets, a bare ring and the cache-line round trip (bench_channel.cpp).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <vector>

#include "cli_common.hpp"

namespace uvirtio::apps {
namespace {

int bench_fsync(const std::vector<std::string>& args) {
  po::options_description desc("uvirtio-bench fsync FILE");
  desc.add_options()("help,h", "show help")("file", po::value<std::string>(), "file to write and fsync")(
      "seconds", po::value<double>()->default_value(2.0), "duration")("json", "print JSON");
  po::positional_options_description pos;
  pos.add("file", 1);
  auto vm = parse(args, desc, pos);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  if (!vm.count("file")) throw UsageError{"fsync: which file? (uvirtio-bench fsync FILE)"};
  const double seconds = parse_seconds(vm["seconds"].as<double>(), "fsync: --seconds");
  const std::string path = vm["file"].as<std::string>();
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    std::cerr << g_program << ": " << path << ": open: " << std::strerror(errno) << "\n";
    return kFail;
  }
  // The benchmark writes zeros over the first 4 KiB; it never does that to
  // a file that holds anything else there.
  std::uint8_t head[4096] = {};
  const ssize_t got = ::pread(fd, head, sizeof head, 0);
  if (got < 0 || std::any_of(head, head + std::max<ssize_t>(got, 0), [](std::uint8_t b) { return b != 0; })) {
    std::cerr << g_program << ": " << path << ": fsync benchmark: "
              << (got < 0 ? std::string("read: ") + std::strerror(errno)
                          : "the file holds data in its first 4 KiB, which the benchmark overwrites (give a "
                            "new, empty or zero-filled file)")
              << "\n";
    ::close(fd);
    return kFail;
  }
  std::vector<double> lat;
  std::uint8_t buf[64] = {};
  using Clock = std::chrono::steady_clock;
  const auto until =
      Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  for (std::uint64_t i = 0; Clock::now() < until; ++i) {
    const auto a = Clock::now();
    if (::pwrite(fd, buf, sizeof buf, static_cast<off_t>((i % 64) * 64)) != sizeof buf || ::fsync(fd) != 0) {
      std::cerr << g_program << ": " << path << ": pwrite + fsync: " << std::strerror(errno) << "\n";
      ::close(fd);
      return kFail;
    }
    lat.push_back(std::chrono::duration<double, std::micro>(Clock::now() - a).count());
  }
  ::close(fd);
  if (lat.empty()) {
    std::cerr << g_program << ": " << path << ": no pwrite + fsync finished within " << seconds << " s\n";
    return kFail;
  }
  std::sort(lat.begin(), lat.end());
  const double p50 = lat[lat.size() / 2], p99 = lat[std::min(lat.size() - 1, lat.size() * 99 / 100)];
  if (vm.count("json")) {
    print_json(json{{"file", path}, {"ops", lat.size()}, {"p50_us", p50}, {"p99_us", p99}});
  } else {
    std::printf("%s: 64 B pwrite + fsync: %zu ops, p50 %.1f us, p99 %.1f us\n", path.c_str(), lat.size(), p50,
                p99);
  }
  return 0;
}

}  // namespace

int bench_rings(const std::vector<std::string>& args);
int bench_channel(const std::vector<std::string>& args);

}  // namespace uvirtio::apps

namespace {

int run(int argc, char** argv) {
  using namespace uvirtio::apps;
  const char* usage =
      "usage: uvirtio-bench fsync FILE [--seconds S] [--json]\n"
      "       uvirtio-bench rings [--batch B]... [--seconds S] [--size N] [--json]\n"
      "       uvirtio-bench channel [--seconds S] [--size BYTES] [--rounds R] [--json]\n";
  if (argc < 2) {
    std::cerr << usage;
    return kUsage;
  }
  const std::string cmd = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  if (cmd == "fsync") return bench_fsync(args);
  if (cmd == "rings") return bench_rings(args);
  if (cmd == "channel") return bench_channel(args);
  if (cmd == "-h" || cmd == "--help") {
    std::cout << usage;
    return 0;
  }
  throw UsageError{"unknown benchmark '" + cmd + "'"};
}

}  // namespace

int main(int argc, char** argv) { return uvirtio::apps::tool_main("uvirtio-bench", argc, argv, run); }
