// uvirtio pmem: info, write, read, flush and bench on a virtio-pmem device.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <optional>
#include <thread>
#include <utility>

#include "cli_common.hpp"
#include "uvirtio/driver/cache.hpp"
#include "uvirtio/driver/pmem.hpp"
#include "uvirtio/driver/rng.hpp"

namespace uvirtio::apps {
namespace {

using Clock = std::chrono::steady_clock;

const char* kPmemUsage =
    "usage: uvirtio pmem info BDF [--json]\n"
    "       uvirtio pmem write BDF --offset O (--data S | --file F) [--persist [--no-recover]]\n"
    "       uvirtio pmem read BDF --offset O --length L [--hex]\n"
    "       uvirtio pmem flush BDF [--no-recover]\n"
    "       uvirtio pmem repersist BDF --offset O --length L [--no-recover]   (after a failed flush)\n"
    "       uvirtio pmem bench BDF [--threads T]... [--seconds S] [--json] [--rng BDF]\n"
    "                          [--kernel-file PATH] [--host-fsync-us US] [--gather-us US] [--overwrite]\n";

enum class Recovery { offered, not_applicable };
enum class Flushes { yes, no };

// --no-recover only where it changes something: `bench` never recovers, and
// `info` and `read` send no flush, so there it would be a silent no-op; so
// would a flush deadline (--timeout) there.
void add_common(po::options_description& d, Recovery recovery = Recovery::not_applicable,
                Flushes flushes = Flushes::no) {
  d.add_options()("help,h", "show help")("bdf", po::value<std::string>(), "PCI address of the pmem function")(
      "completion", po::value<std::string>()->default_value("hybrid"),
      "hybrid (spin, then sleep on the interrupt), interrupt, or poll")("poll", "same as --completion poll");
  if (flushes == Flushes::yes || recovery == Recovery::offered)
    d.add_options()("timeout", po::value<long long>()->default_value(10000), "per-flush deadline in ms");
  if (recovery == Recovery::offered)
    d.add_options()("no-recover",
                    "fail when the device needs a reset (or completes a request from before one) instead of "
                    "resetting it and sending the flush again");
}

driver::PmemOptions options_from(const po::variables_map& vm) {
  driver::PmemOptions opt;
  // A flush is idempotent, and an earlier command that gave up on one (its
  // deadline) can leave QEMU to complete it late into this command's ring
  // (doc/qemu-bugs.md): recover and send it again, and say so.
  opt.recover_on_reset = vm.count("no-recover") == 0;
  if (vm.count("timeout")) {
    const long long timeout = vm["timeout"].as<long long>();
    if (timeout < 1 || timeout > 3600000) throw UsageError{"pmem: --timeout must be 1..3600000 ms"};
    opt.timeout = std::chrono::milliseconds(timeout);
  }
  // --poll is --completion poll: with another explicit --completion one of
  // the two would be ignored.
  if (vm.count("poll") && !vm["completion"].defaulted() && vm["completion"].as<std::string>() != "poll")
    throw UsageError{"pmem: --poll and --completion " + vm["completion"].as<std::string>() +
                     " contradict each other (give one)"};
  const std::string mode = vm.count("poll") ? "poll" : vm["completion"].as<std::string>();
  if (mode == "poll")
    opt.completion = driver::CompletionMode::polling;
  else if (mode == "interrupt")
    opt.completion = driver::CompletionMode::interrupt;
  else if (mode == "hybrid")
    opt.completion = driver::CompletionMode::hybrid;
  else
    throw UsageError{"pmem: --completion must be hybrid, interrupt or poll, not '" + mode + "'"};
  return opt;
}

// What the success line adds when the device was reset during the command.
std::string recovery_note(const driver::Pmem& pm) {
  if (pm.recoveries() == 0) return "";
  return "; " + pmem_recovery_note(pm.recoveries());
}

pci::Bdf bdf_of(const po::variables_map& vm, const char* sub) {
  if (!vm.count("bdf"))
    throw UsageError{std::string("pmem ") + sub + ": which device? (uvirtio pmem " + sub + " BDF)"};
  return parse_bdf_or_throw(vm["bdf"].as<std::string>());
}

int pmem_info(const std::vector<std::string>& args) {
  po::options_description desc("uvirtio pmem info BDF");
  add_common(desc);
  desc.add_options()("json", "print JSON");
  po::positional_options_description pos;
  pos.add("bdf", 1);
  auto vm = parse(args, desc, pos);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  auto opt = options_from(vm);
  opt.map = false;  // info needs no mapping
  auto pm = driver::Pmem::open(bdf_of(vm, "info"), opt);
  if (!pm) return fail(pm.error());
  auto& p = **pm;
  const bool shm = p.features().has(driver::kPmemFeatureShmemRegion);
  json j = {{"bdf", p.name()},
            {"features", p.features().describe(driver::pmem_feature_name)},
            {"feature_bits", p.features().bits()},
            {"start", p.start()},
            {"size", p.size()},
            {"mapping", shm ? "shared-memory-region" : "devmem"},
            {"completion", driver::completion_mode_name(p.queue().mode())},
            {"cache_writeback", driver::cache::name(driver::cache::instruction())}};
  // Where the queue's in-flight ids are kept for the next owner, and what the
  // previous one left (doc/protocols.md, "Completions from before a reset").
  const driver::InflightLedger* ledger = p.queue().ledger();
  std::string ledger_line;
  if (ledger != nullptr) {
    j["inflight_ledger"] = {{"path", ledger->path()}, {"left_over", ledger->left_over()}};
    if (!ledger->discarded().empty()) j["inflight_ledger"]["discarded"] = ledger->discarded();
    if (ledger->resized_from() != 0) j["inflight_ledger"]["resized_from"] = ledger->resized_from();
    ledger_line =
        ledger->path() + " (" + std::to_string(ledger->left_over().size()) +
        " ids left in flight by an earlier owner" +
        (ledger->discarded().empty() ? "" : "; an invalid file was discarded: " + ledger->discarded()) +
        (ledger->resized_from() == 0 ? ""
                                     : "; written for queue size " + std::to_string(ledger->resized_from()) +
                                           ", rewritten for this one") +
        ")";
  } else {
    j["inflight_ledger"] = nullptr;
    if (!p.queue().ledger_error().empty()) j["inflight_ledger_error"] = p.queue().ledger_error();
    ledger_line = p.queue().ledger_error().empty() ? "none" : "none: " + p.queue().ledger_error();
  }
  if (vm.count("json")) {
    print_json(j);
    return 0;
  }
  std::printf(
      "%s: virtio-pmem\n  features  %s\n  start     0x%llx\n  size      %llu bytes (%llu MiB)\n"
      "  mapping   %s\n  cache     %s\n  ledger    %s\n",
      p.name().c_str(), p.features().describe(driver::pmem_feature_name).c_str(),
      static_cast<unsigned long long>(p.start()), static_cast<unsigned long long>(p.size()),
      static_cast<unsigned long long>(p.size() >> 20),
      shm ? "shared memory region 0 (BAR)" : "/dev/mem (device does not offer SHMEM_REGION)",
      driver::cache::name(driver::cache::instruction()), ledger_line.c_str());
  return 0;
}

int pmem_write(const std::vector<std::string>& args) {
  po::options_description desc("uvirtio pmem write BDF --offset O (--data S | --file F) [--persist]");
  add_common(desc, Recovery::offered);
  desc.add_options()("offset", po::value<std::string>(), "byte offset in the pmem range")(
      "data", po::value<std::string>(), "bytes to write (the string as given)")(
      "file", po::value<std::string>(), "write this file's contents")("persist", "persist after writing");
  po::positional_options_description pos;
  pos.add("bdf", 1);
  auto vm = parse(args, desc, pos);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  if (!vm.count("offset")) throw UsageError{"pmem write: --offset is required"};
  if (vm.count("no-recover") && !vm.count("persist"))
    throw UsageError{"pmem write: --no-recover needs --persist (without it no flush is sent)"};
  if (!vm["timeout"].defaulted() && !vm.count("persist"))
    throw UsageError{"pmem write: --timeout needs --persist (without it no flush is sent)"};
  if (vm.count("data") == vm.count("file"))
    throw UsageError{"pmem write: give exactly one of --data or --file"};
  const std::uint64_t offset = parse_u64(vm["offset"].as<std::string>(), "--offset");
  std::vector<std::uint8_t> bytes;
  if (vm.count("data")) {
    const auto& d = vm["data"].as<std::string>();
    bytes.assign(d.begin(), d.end());
  } else {
    auto file = read_input_file(vm["file"].as<std::string>(), kMaxWriteFile, "pmem write --file");
    if (!file) return fail(file.error());
    bytes = std::move(file).value();
  }
  if (bytes.empty()) throw UsageError{"pmem write: nothing to write (empty data)"};
  auto pm = driver::Pmem::open(bdf_of(vm, "write"), options_from(vm));
  if (!pm) return fail(pm.error());
  if (auto r = (*pm)->write(offset, bytes, vm.count("persist") != 0); !r) return fail(r.error());
  std::printf("%s: wrote %zu bytes at offset %llu%s%s\n", (*pm)->name().c_str(), bytes.size(),
              static_cast<unsigned long long>(offset),
              vm.count("persist") ? " (persisted)" : " (not persisted)", recovery_note(**pm).c_str());
  return 0;
}

// --offset and --length, both required, length in 1..max_length.
std::pair<std::uint64_t, std::uint64_t> offset_and_length(const po::variables_map& vm, const std::string& cmd,
                                                          std::uint64_t max_length) {
  if (!vm.count("offset") || !vm.count("length"))
    throw UsageError{cmd + ": --offset and --length are required"};
  const std::uint64_t offset = parse_u64(vm["offset"].as<std::string>(), "--offset");
  const std::uint64_t length = parse_u64(vm["length"].as<std::string>(), "--length");
  if (length == 0 || length > max_length)
    throw UsageError{cmd + ": --length must be 1.." + std::to_string(max_length)};
  return {offset, length};
}

int pmem_read(const std::vector<std::string>& args) {
  po::options_description desc("uvirtio pmem read BDF --offset O --length L [--hex]");
  add_common(desc);
  desc.add_options()("offset", po::value<std::string>(), "byte offset")(
      "length", po::value<std::string>(), "bytes to read (at most 64 MiB)")("hex",
                                                                            "print hex instead of raw bytes");
  po::positional_options_description pos;
  pos.add("bdf", 1);
  auto vm = parse(args, desc, pos);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  const auto [offset, length] = offset_and_length(vm, "pmem read", 64u << 20);
  auto pm = driver::Pmem::open(bdf_of(vm, "read"), options_from(vm));
  if (!pm) return fail(pm.error());
  std::vector<std::uint8_t> buf(length);
  if (auto r = (*pm)->read(offset, buf); !r) return fail(r.error());
  if (vm.count("hex")) {
    std::string out;
    for (auto b : buf) out += hex(b, 2);
    std::printf("%s\n", out.c_str());
  } else {
    std::fwrite(buf.data(), 1, buf.size(), stdout);
  }
  // A short write (a full disk, a closed pipe) is an error, in either form.
  if (std::fflush(stdout) != 0 || std::ferror(stdout))
    return fail(Error::from_errno(errno, (*pm)->name(), "read", "write the data to standard output"));
  return 0;
}

int pmem_flush(const std::vector<std::string>& args) {
  po::options_description desc("uvirtio pmem flush BDF");
  add_common(desc, Recovery::offered);
  po::positional_options_description pos;
  pos.add("bdf", 1);
  auto vm = parse(args, desc, pos);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  auto opt = options_from(vm);
  opt.map = false;
  auto pm = driver::Pmem::open(bdf_of(vm, "flush"), opt);
  if (!pm) return fail(pm.error());
  const auto t0 = Clock::now();
  if (auto r = (*pm)->flush(); !r) return fail(r.error());
  const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
  std::printf("%s: flushed (%.0f us)%s\n", (*pm)->name().c_str(), us, recovery_note(**pm).c_str());
  return 0;
}

// After a failed flush, writes made before it are not durable even when a
// later flush succeeds: the host marked their pages clean. This makes the
// host write [O, O+L) back again and persists it.
int pmem_repersist(const std::vector<std::string>& args) {
  po::options_description desc("uvirtio pmem repersist BDF --offset O --length L");
  add_common(desc, Recovery::offered);
  desc.add_options()("offset", po::value<std::string>(), "byte offset")("length", po::value<std::string>(),
                                                                        "bytes to write back again");
  po::positional_options_description pos;
  pos.add("bdf", 1);
  auto vm = parse(args, desc, pos);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  const auto [offset, length] =
      offset_and_length(vm, "pmem repersist", std::numeric_limits<std::uint64_t>::max());
  auto pm = driver::Pmem::open(bdf_of(vm, "repersist"), options_from(vm));
  if (!pm) return fail(pm.error());
  if (auto r = (*pm)->repersist_at(offset, length); !r) return fail(r.error());
  std::printf("%s: wrote back and persisted %llu bytes at offset %llu%s\n", (*pm)->name().c_str(),
              static_cast<unsigned long long>(length), static_cast<unsigned long long>(offset),
              recovery_note(**pm).c_str());
  return 0;
}

// ---- bench -----------------------------------------------------------------

struct Stats {
  double p50_us = 0, p99_us = 0, mean_us = 0;
  std::uint64_t ops = 0;
  double seconds = 0;
  double ops_per_s() const { return seconds > 0 ? static_cast<double>(ops) / seconds : 0; }
};

Stats summarize(std::vector<double>& lat_us, double seconds) {
  Stats s;
  s.ops = lat_us.size();
  s.seconds = seconds;
  if (lat_us.empty()) return s;
  std::sort(lat_us.begin(), lat_us.end());
  s.p50_us = lat_us[lat_us.size() / 2];
  s.p99_us = lat_us[std::min(lat_us.size() - 1, lat_us.size() * 99 / 100)];
  double sum = 0;
  for (double v : lat_us) sum += v;
  s.mean_us = sum / static_cast<double>(lat_us.size());
  return s;
}

json stats_json(const Stats& s) {
  return {{"ops", s.ops},       {"seconds", s.seconds}, {"ops_per_s", s.ops_per_s()},
          {"p50_us", s.p50_us}, {"p99_us", s.p99_us},   {"mean_us", s.mean_us}};
}

struct Sample {
  std::vector<double> lat_us;
  double seconds = 0;
  void add(const Sample& o) {
    lat_us.insert(lat_us.end(), o.lat_us.begin(), o.lat_us.end());
    seconds += o.seconds;
  }
  Stats stats() const {
    auto copy = lat_us;
    return summarize(copy, seconds);
  }
};

// Runs `threads` workers for `seconds`, each calling op(thread, i) and timing it.
template <class Op>
Result<Sample> run_threads(unsigned threads, double seconds, Op op) {
  std::vector<std::vector<double>> lat(threads);
  std::vector<std::optional<Error>> err(threads);
  std::atomic<bool> go{false};
  std::vector<std::thread> ts;
  const auto t0 = Clock::now();
  const auto until = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  for (unsigned t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      while (!go.load()) std::this_thread::yield();
      for (std::uint64_t i = 0; Clock::now() < until; ++i) {
        const auto a = Clock::now();
        auto r = op(t, i);
        const auto b = Clock::now();
        if (!r) {
          err[t] = r.error();
          return;
        }
        lat[t].push_back(std::chrono::duration<double, std::micro>(b - a).count());
      }
    });
  }
  go = true;
  for (auto& t : ts) t.join();
  Sample out;
  out.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  for (auto& e : err)
    if (e) return *e;
  for (auto& l : lat) out.lat_us.insert(out.lat_us.end(), l.begin(), l.end());
  return out;
}

int pmem_bench(const std::vector<std::string>& args) {
  po::options_description desc("uvirtio pmem bench BDF");
  add_common(desc, Recovery::not_applicable, Flushes::yes);
  // Counts are strings for parse_u64: a value<unsigned> takes "-4294967295"
  // as 1 (lexical_cast wraps a negative number).
  desc.add_options()("threads", po::value<std::vector<std::string>>()->multitoken(),
                     "thread counts (default 1 2 4 8)")("seconds", po::value<double>()->default_value(2.0),
                                                        "duration of each measurement")("json", "print JSON")(
      "rng", po::value<std::string>(), "virtio-rng function for the null round trip of the floor")(
      "kernel-file", po::value<std::string>(),
      "a file on an ext4 -o dax mount over the kernel's virtio_pmem: measure 4 KiB pwrite + fsync there")(
      "host-fsync-us", po::value<double>(), "host fsync latency of the backing file (measured on the host)")(
      "rounds", po::value<std::string>()->default_value("5"), "interleaved slices per point")(
      "gather-us", po::value<std::string>(), "group-commit wait limit in microseconds (0: off; default 500)")(
      "overwrite", "run even if the first 256 KiB of the range hold data the benchmark did not write");
  po::positional_options_description pos;
  pos.add("bdf", 1);
  auto vm = parse(args, desc, pos);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  std::vector<unsigned> threads = {1, 2, 4, 8};
  if (vm.count("threads")) {
    threads.clear();
    for (const auto& text : vm["threads"].as<std::vector<std::string>>()) {
      const std::uint64_t t = parse_u64(text, "pmem bench: --threads");
      if (t < 1 || t > 64) throw UsageError{"pmem bench: --threads values must be 1..64"};
      threads.push_back(static_cast<unsigned>(t));
    }
  }
  if (threads.empty()) throw UsageError{"pmem bench: --threads needs at least one value"};
  const double seconds = parse_seconds(vm["seconds"].as<double>(), "pmem bench: --seconds");
  // Every usage error before the device is opened: the warm-up writes to it.
  const std::uint64_t rounds64 = parse_u64(vm["rounds"].as<std::string>(), "pmem bench: --rounds");
  if (rounds64 < 1 || rounds64 > 100) throw UsageError{"pmem bench: --rounds must be 1..100"};
  const auto rounds = static_cast<unsigned>(rounds64);
  std::optional<pci::Bdf> rng_bdf;
  if (vm.count("rng")) rng_bdf = parse_bdf_or_throw(vm["rng"].as<std::string>());
  if (vm.count("host-fsync-us")) {
    const double us = vm["host-fsync-us"].as<double>();
    if (!std::isfinite(us) || us < 0)
      throw UsageError{"pmem bench: --host-fsync-us must be a latency in us >= 0"};
  }
  auto opt = options_from(vm);
  // Figures timed through a device reset would mislead: a benchmark stops
  // at a device fault and reports it.
  opt.recover_on_reset = false;
  if (vm.count("gather-us")) {
    const std::uint64_t g = parse_u64(vm["gather-us"].as<std::string>(), "pmem bench: --gather-us");
    if (g > 1000000) throw UsageError{"pmem bench: --gather-us must be 0..1000000"};
    opt.gather_limit = std::chrono::microseconds(static_cast<std::int64_t>(g));
  }
  // The kernel path writes pages of 0x5a over the first 256 KiB of PATH.0
  // .. PATH.3: never over a file that holds anything else there (checked
  // before the device is opened; a missing file is created later).
  if (vm.count("kernel-file")) {
    const std::string path = vm["kernel-file"].as<std::string>();
    for (unsigned i = 0; i < 4; ++i) {
      const std::string f = path + "." + std::to_string(i);
      const int fd = ::open(f.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);  // a FIFO: no hang
      if (fd < 0 && errno == ENOENT) continue;
      std::vector<std::uint8_t> head(64 * 4096);
      ssize_t got = -1;
      if (fd >= 0) {
        got = ::pread(fd, head.data(), head.size(), 0);
        const int e = errno;
        ::close(fd);
        errno = e;
      }
      if (got < 0) {
        std::cerr << "uvirtio: pmem bench: --kernel-file: " << f << ": " << std::strerror(errno) << "\n";
        return kFail;
      }
      if (std::any_of(head.begin(), head.begin() + got, [](std::uint8_t b) { return b != 0 && b != 0x5a; })) {
        std::cerr << "uvirtio: pmem bench: --kernel-file: " << f
                  << ": the file holds data in its first 256 KiB, which the benchmark overwrites (give a new "
                     "name)\n";
        return kFail;
      }
    }
  }
  auto pm = driver::Pmem::open(bdf_of(vm, "bench"), opt);
  if (!pm) return fail(pm.error());
  auto& p = **pm;
  if (p.size() < 64u * 4096) {
    std::cerr << "uvirtio: " << p.name() << ": pmem bench: the range is smaller than 256 KiB\n";
    return kFail;
  }
  // The benchmark writes over the first 256 KiB of the range (0x5a pages,
  // then 0xa5 stores): never over anything else there, a pmlog log say,
  // unless asked to.
  if (!vm.count("overwrite")) {
    const std::uint8_t* head = p.data();
    const auto* other =
        std::find_if(head, head + 64 * 4096, [](std::uint8_t b) { return b != 0 && b != 0x5a && b != 0xa5; });
    if (other != head + 64 * 4096) {
      std::cerr
          << "uvirtio: " << p.name() << ": pmem bench: the range holds data at offset " << (other - head)
          << ", which the benchmark would overwrite with its first 256 KiB (give --overwrite to allow it)\n";
      return kFail;
    }
  }
  json out;
  out["bdf"] = p.name();
  out["cache_writeback"] = driver::cache::name(driver::cache::instruction());
  out["seconds_per_point"] = seconds;
  out["gather_limit_us"] = opt.gather_limit.count();

  // Warm-up (not measured): touch every page the workers use and persist
  // once, so first-touch faults and the host's block allocation are not in
  // the figures.
  std::vector<std::uint8_t> pattern(64, 0xa5);
  const std::size_t pages = 64;
  std::memset(p.data(), 0x5a, pages * 4096);
  if (auto r = p.persist(p.data(), pages * 4096); !r) return fail(r.error());
  if (auto w = run_threads(1, std::min(seconds, 0.5),
                           [&](unsigned, std::uint64_t i) {
                             std::memcpy(p.data() + (i % 64) * 64, pattern.data(), 64);
                             return p.persist(p.data() + (i % 64) * 64, 64);
                           });
      !w)
    return fail(w.error());

  // The host's fsync latency drifts a lot over seconds on shared disks, so
  // every point is measured in `rounds` short slices, interleaved with the
  // other points, and the slices are pooled.
  const double slice = seconds / rounds;
  std::optional<std::unique_ptr<driver::Rng>> rng;
  if (rng_bdf) {
    driver::RngOptions ro;
    ro.completion = p.queue().mode() == driver::CompletionMode::polling ? driver::CompletionMode::polling
                                                                        : driver::CompletionMode::interrupt;
    auto r = driver::Rng::open(*rng_bdf, ro);
    if (!r) return fail(r.error());
    rng = std::move(r).value();
  }
  std::vector<int> kfds;
  const bool kernel = vm.count("kernel-file") != 0;
  if (kernel) {
    const std::string path = vm["kernel-file"].as<std::string>();
    for (unsigned i = 0; i < 4; ++i) {
      std::string f = path + "." + std::to_string(i);
      int fd = ::open(f.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
      if (fd < 0) {
        std::cerr << "uvirtio: pmem bench: open " << f << ": " << std::strerror(errno) << "\n";
        for (int k : kfds) ::close(k);
        return kFail;
      }
      kfds.push_back(fd);
    }
  }
  struct CloseAll {
    std::vector<int>& fds;
    ~CloseAll() {
      for (int fd : fds) ::close(fd);
    }
  } close_all{kfds};

  std::vector<Sample> user(threads.size());
  std::vector<std::uint64_t> user_calls(threads.size()), user_flushes(threads.size());
  Sample raw, null_rt;
  std::vector<Sample> kern(2);
  const std::vector<std::uint8_t> page(4096, 0x5a);
  for (unsigned round = 0; round < rounds; ++round) {
    // Userspace: 64-byte write + persist per call; each thread in its own 4 KiB page.
    for (std::size_t k = 0; k < threads.size(); ++k) {
      const auto calls0 = p.persist_calls();
      const auto flushes0 = p.device_flushes();
      auto st = run_threads(threads[k], slice, [&](unsigned th, std::uint64_t i) {
        std::uint8_t* at = p.data() + th * 4096u + (i % 64) * 64;
        std::memcpy(at, pattern.data(), 64);
        return p.persist(at, 64);
      });
      if (!st) return fail(st.error());
      user[k].add(*st);
      user_calls[k] += p.persist_calls() - calls0;
      user_flushes[k] += p.device_flushes() - flushes0;
    }
    // Floor: the same 64-byte write, then one uncoalesced device flush: the
    // host's fsync of one dirty page plus one virtqueue round trip.
    auto r = run_threads(1, slice, [&](unsigned, std::uint64_t i) {
      std::uint8_t* at = p.data() + (i % 64) * 64;
      std::memcpy(at, pattern.data(), 64);
      driver::cache::flush(at, 64);
      driver::cache::drain();
      return p.device_flush();
    });
    if (!r) return fail(r.error());
    raw.add(*r);
    if (rng) {
      std::uint8_t b;
      auto rt =
          run_threads(1, slice, [&](unsigned, std::uint64_t) { return (*rng)->read(std::span(&b, 1)); });
      if (!rt) return fail(rt.error());
      null_rt.add(*rt);
    }
    // Kernel path: 4 KiB pwrite + fsync on ext4 -o dax over virtio_pmem.
    if (kernel) {
      for (std::size_t k = 0; k < 2; ++k) {
        const unsigned t = k == 0 ? 1 : 4;
        auto st = run_threads(t, slice, [&](unsigned th, std::uint64_t i) -> Result<void> {
          if (::pwrite(kfds[th], page.data(), page.size(), static_cast<off_t>((i % 64) * 4096)) != 4096 ||
              ::fsync(kfds[th]) != 0)
            return Error::from_errno(errno, vm["kernel-file"].as<std::string>(), "pwrite + fsync");
          return ok();
        });
        if (!st) return fail(st.error());
        kern[k].add(*st);
      }
    }
  }
  out["rounds"] = rounds;
  out["device_requests_total"] = p.device_requests();  // every flush the device completed, warm-up included
  out["userspace"] = json::array();
  for (std::size_t k = 0; k < threads.size(); ++k) {
    json j = stats_json(user[k].stats());
    j["threads"] = threads[k];
    j["persist_calls"] = user_calls[k];
    j["device_flushes"] = user_flushes[k];
    out["userspace"].push_back(j);
  }
  const Stats raw_stats = raw.stats();
  out["write_and_device_flush"] = stats_json(raw_stats);
  // The floor is measured in the guest, the same way as persist: one host
  // fsync of a dirty page plus one virtqueue round trip.
  const double floor_us = raw_stats.p50_us;
  out["floor_p50_us"] = floor_us;
  if (rng) out["null_round_trip"] = stats_json(null_rt.stats());
  if (vm.count("host-fsync-us")) out["host_fsync_us"] = vm["host-fsync-us"].as<double>();
  if (kernel) {
    out["kernel"] = json::array();
    for (std::size_t k = 0; k < 2; ++k) {
      json j = stats_json(kern[k].stats());
      j["threads"] = k == 0 ? 1 : 4;
      out["kernel"].push_back(j);
    }
  }

  // Ratios within this run.
  json ratios;
  const auto& u1 = out["userspace"][0];
  ratios["persist_p50_vs_floor"] = u1["p50_us"].get<double>() / floor_us;
  if (out.contains("kernel")) {
    ratios["persist_p50_vs_kernel_p50"] =
        u1["p50_us"].get<double>() / out["kernel"][0]["p50_us"].get<double>();
    for (const auto& u : out["userspace"])
      if (u["threads"] == 4)
        ratios["throughput_4_threads_vs_kernel_4_threads"] =
            u["ops_per_s"].get<double>() / out["kernel"][1]["ops_per_s"].get<double>();
  }
  out["ratios"] = ratios;

  if (vm.count("json")) {
    print_json(out);
    return 0;
  }
  std::printf("%s: persist (64 B write + persist), cache write-back %s\n", p.name().c_str(),
              out["cache_writeback"].get<std::string>().c_str());
  std::printf("  %-8s %10s %10s %12s %12s %14s\n", "threads", "p50 us", "p99 us", "persists/s", "calls",
              "device flushes");
  for (const auto& u : out["userspace"])
    std::printf("  %-8u %10.1f %10.1f %12.0f %12llu %14llu\n", u["threads"].get<unsigned>(),
                u["p50_us"].get<double>(), u["p99_us"].get<double>(), u["ops_per_s"].get<double>(),
                static_cast<unsigned long long>(u["persist_calls"].get<std::uint64_t>()),
                static_cast<unsigned long long>(u["device_flushes"].get<std::uint64_t>()));
  std::printf("  floor: 64 B write + one uncoalesced device flush: p50 %.1f us, p99 %.1f us\n",
              raw_stats.p50_us, raw_stats.p99_us);
  if (out.contains("null_round_trip"))
    std::printf("    of which a null virtqueue round trip (rng, 1 byte): p50 %.1f us\n",
                out["null_round_trip"]["p50_us"].get<double>());
  if (out.contains("host_fsync_us"))
    std::printf("    host 64 B pwrite + fsync measured on the host before boot: p50 %.1f us\n",
                out["host_fsync_us"].get<double>());
  if (out.contains("kernel"))
    for (const auto& k : out["kernel"])
      std::printf("  kernel ext4-dax 4 KiB pwrite+fsync, %u threads: p50 %.1f us, %.0f ops/s\n",
                  k["threads"].get<unsigned>(), k["p50_us"].get<double>(), k["ops_per_s"].get<double>());
  for (auto it = ratios.begin(); it != ratios.end(); ++it)
    std::printf("  ratio %s = %.3f\n", it.key().c_str(), it.value().get<double>());
  return 0;
}

}  // namespace

int cmd_pmem(const std::vector<std::string>& args) {
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::cout << kPmemUsage;
    return args.empty() ? kUsage : 0;
  }
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  if (args[0] == "info") return pmem_info(rest);
  if (args[0] == "write") return pmem_write(rest);
  if (args[0] == "read") return pmem_read(rest);
  if (args[0] == "flush") return pmem_flush(rest);
  if (args[0] == "repersist") return pmem_repersist(rest);
  if (args[0] == "bench") return pmem_bench(rest);
  throw UsageError{"pmem: unknown subcommand '" + args[0] + "' (info, write, read, flush, repersist, bench)"};
}

}  // namespace uvirtio::apps
