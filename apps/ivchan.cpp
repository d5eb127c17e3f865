// uvirtio-ivchan: messages between two VMs over an ivshmem device (or between
// two processes over a shared file), through uvirtio's channel library.
//
//   uvirtio-ivchan info BDF
//   uvirtio-ivchan serve (BDF | --shm FILE) --side S [--sessions K]
//   uvirtio-ivchan ping  (BDF | --shm FILE) --side S [--count N] [--size B]
//   uvirtio-ivchan send  (BDF | --shm FILE) --side S --bytes N [--chunk C]
//
// `serve` answers: it echoes every ping and checks bulk transfers, until the
// peer says goodbye, or goes away (no heartbeat for --peer-timeout-ms), which
// ends one session; after --sessions sessions it exits. `ping` and `send` are
// the initiators. The two ends pick different --side values; side 0 formats
// the window when it holds no channel yet.
//
// Messages start with an 8-byte tag: type ('P' ping, 'D' bulk data, 'T' bulk
// trailer with byte count and CRC-32, 'A' the receiver's verdict, 'B' bye).
// ivshmem-doorbell devices wake the peer through the Doorbell register and
// sleep on an MSI-X eventfd; ivshmem-plain devices and --shm files poll.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.hpp"
#include "uvirtio/driver/ivshmem.hpp"
#include "uvirtio/rings/channel.hpp"

namespace uvirtio::apps {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr std::size_t kTag = 8;

const char* kUsageText =
    "usage: uvirtio-ivchan COMMAND ...\n"
    "  info BDF                                   the ivshmem device: memory size, peer id, vectors\n"
    "  serve (BDF | --shm FILE) --side S [--sessions K]   echo pings, check bulk transfers\n"
    "  ping  (BDF | --shm FILE) --side S [--count N] [--size B] [--bytes N]   round trips (and bulk), "
    "checked\n"
    "  send  (BDF | --shm FILE) --side S --bytes N [--chunk C]    bulk transfer with CRC-32\n"
    "common options: --poll (no doorbell), --peer-timeout-ms MS (default 3000),\n"
    "                --timeout-ms MS (per wait, default 20000), --json\n";

struct Common {
  std::optional<pci::Bdf> bdf;
  std::string shm_path;
  unsigned side = 0;
  bool poll = false;
  milliseconds peer_timeout{3000};
  milliseconds timeout{20000};
  std::optional<std::chrono::microseconds> spin;
  bool json = false;
};

void add_common(po::options_description& desc) {
  desc.add_options()("help,h", "show help")("bdf", po::value<std::string>(), "ivshmem PCI address")(
      "shm", po::value<std::string>(), "a shared file instead of a device (polling)")(
      "side", po::value<std::string>(), "0 or 1; the two ends pick different sides")(
      "poll", "poll instead of sleeping on the doorbell interrupt")(
      "peer-timeout-ms", po::value<std::string>(), "peer gone after this long without a heartbeat")(
      "timeout-ms", po::value<std::string>(), "give up a wait after this long")(
      "spin-us", po::value<std::string>(),
      "busy-poll this long before sleeping on the doorbell (default 50)")("json", "print JSON");
}

Common common_of(const po::variables_map& vm, const char* cmd) {
  Common c;
  const bool has_bdf = vm.count("bdf") != 0, has_shm = vm.count("shm") != 0;
  if (has_bdf == has_shm) throw UsageError{std::string(cmd) + ": give a BDF or --shm FILE (one of them)"};
  if (has_bdf) c.bdf = parse_bdf_or_throw(vm["bdf"].as<std::string>());
  if (has_shm) c.shm_path = vm["shm"].as<std::string>();
  if (!vm.count("side")) throw UsageError{std::string(cmd) + ": --side 0 or --side 1 is required"};
  const auto side = parse_u64(vm["side"].as<std::string>(), "--side");
  if (side > 1) throw UsageError{std::string(cmd) + ": --side must be 0 or 1"};
  c.side = static_cast<unsigned>(side);
  c.poll = vm.count("poll") != 0 || has_shm;
  if (vm.count("peer-timeout-ms")) {
    auto v = parse_u64(vm["peer-timeout-ms"].as<std::string>(), "--peer-timeout-ms");
    if (v < 10 || v > 600000)
      throw UsageError{std::string(cmd) + ": --peer-timeout-ms must be in 10..600000"};
    c.peer_timeout = milliseconds(v);
  }
  if (vm.count("timeout-ms")) {
    auto v = parse_u64(vm["timeout-ms"].as<std::string>(), "--timeout-ms");
    if (v < 1 || v > 3600000) throw UsageError{std::string(cmd) + ": --timeout-ms must be in 1..3600000"};
    c.timeout = milliseconds(v);
  }
  if (vm.count("spin-us")) {
    auto v = parse_u64(vm["spin-us"].as<std::string>(), "--spin-us");
    if (v > 1000000) throw UsageError{std::string(cmd) + ": --spin-us must be at most 1000000"};
    c.spin = std::chrono::microseconds(v);
  }
  c.json = vm.count("json") != 0;
  return c;
}

// The window (device BAR2 or a mapped file), its doorbell and the channel.
struct Endpoint {
  std::unique_ptr<driver::Ivshmem> dev;
  void* file_map = nullptr;
  std::size_t file_size = 0;
  std::unique_ptr<channel::Doorbell> bell;
  std::unique_ptr<channel::Channel> ch;
  std::string name;

  ~Endpoint() {
    ch.reset();
    if (file_map) ::munmap(file_map, file_size);
  }
};

Result<std::unique_ptr<Endpoint>> open_endpoint(const Common& c) {
  auto ep = std::make_unique<Endpoint>();
  void* window = nullptr;
  std::size_t size = 0;
  std::uint32_t my_id = 0;
  if (c.bdf) {
    driver::IvshmemOptions o;
    o.interrupts = !c.poll;
    UV_TRY(ep->dev, driver::Ivshmem::open(*c.bdf, o));
    window = ep->dev->shm();
    size = ep->dev->shm_size();
    ep->name = c.bdf->str() + " ivshmem";
    if (ep->dev->position()) my_id = *ep->dev->position();
    if (!c.poll && ep->dev->has_doorbell() && ep->dev->vectors() > 0) {
      UV_TRY(ep->bell, ep->dev->doorbell(0));
    }
  } else {
    ep->name = c.shm_path;
    int fd = ::open(c.shm_path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return Error::from_errno(errno, c.shm_path, "open shared file");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      int e = errno;
      ::close(fd);
      return Error::from_errno(e, c.shm_path, "stat shared file");
    }
    if (st.st_size <= 0) {
      ::close(fd);
      return Error(Errc::invalid_argument, c.shm_path, "open shared file",
                   "the file is empty (size it first)");
    }
    size = static_cast<std::size_t>(st.st_size);
    window = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    ::close(fd);
    if (window == MAP_FAILED) return Error::from_errno(e, c.shm_path, "mmap shared file");
    ep->file_map = window;
    ep->file_size = size;
    // Side 0 formats a window without the channel magic. A file is the
    // user's: format it only when it holds nothing yet (all zeros, as
    // `truncate -s` leaves it), never over data of another kind.
    std::uint64_t magic = 0;
    std::memcpy(&magic, window, std::min<std::size_t>(size, sizeof magic));
    const auto* bytes = static_cast<const unsigned char*>(window);
    if (c.side == 0 && le64::to_raw(channel::layout::kMagic) != magic &&
        std::any_of(bytes, bytes + size, [](unsigned char b) { return b != 0; }))
      return Error(Errc::invalid_argument, c.shm_path, "open shared file",
                   "it holds data that is not a uvirtio channel, which side 0 would overwrite (give a new "
                   "file: truncate -s 1M FILE)");
  }
  channel::Options o;
  o.side = c.side;
  o.doorbell_id = my_id;
  o.doorbell = ep->bell.get();
  o.peer_timeout = c.peer_timeout;
  if (c.spin) o.spin = *c.spin;
  o.name = ep->name;
  UV_TRY(ep->ch, channel::Channel::attach(window, size, o));
  return ep;
}

std::vector<std::byte> tagged(char type, std::size_t len) {
  std::vector<std::byte> m(std::max(len, kTag));
  m[0] = std::byte(type);
  return m;
}

void put64(std::vector<std::byte>& m, std::size_t off, std::uint64_t v) {
  std::memcpy(m.data() + off, &v, 8);
}
std::uint64_t get64(std::span<const std::byte> m, std::size_t off) {
  std::uint64_t v = 0;
  std::memcpy(&v, m.data() + off, 8);
  return v;
}

// Pattern bytes that depend on the position and a seed, so a misplaced or
// stale byte shows up.
void fill(std::byte* p, std::size_t n, std::uint64_t seed) {
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (std::size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    p[i] = std::byte(x & 0xff);
  }
}

Result<void> send_msg(Endpoint& ep, std::span<const std::byte> m, milliseconds timeout) {
  return ep.ch->send(m, timeout);
}

// Receives one message into buf; returns its length.
Result<std::size_t> recv_msg(Endpoint& ep, std::vector<std::byte>& buf, milliseconds timeout) {
  UV_TRY(std::size_t n, ep.ch->recv(buf, timeout));
  if (n < kTag)
    return Error(Errc::bad_device_data, ep.name, "receive",
                 "message of " + std::to_string(n) + " bytes has no tag");
  return n;
}

double pct(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  auto i = static_cast<std::size_t>(p * static_cast<double>(v.size() - 1));
  return v[i];
}

int cmd_info(const std::vector<std::string>& args) {
  po::options_description desc("uvirtio-ivchan info BDF");
  desc.add_options()("help,h", "show help")("bdf", po::value<std::string>(), "ivshmem PCI address")(
      "json", "print JSON");
  po::positional_options_description pos;
  pos.add("bdf", 1);
  auto vm = parse(args, desc, pos);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  if (!vm.count("bdf")) throw UsageError{"info: give the ivshmem device's BDF"};
  auto bdf = parse_bdf_or_throw(vm["bdf"].as<std::string>());
  auto dev = driver::Ivshmem::open(bdf);
  if (!dev) return fail(dev.error());
  json j = {{"bdf", bdf.str()},
            {"shm_size", (*dev)->shm_size()},
            {"doorbell", (*dev)->has_doorbell()},
            {"position", (*dev)->position() ? json(*(*dev)->position()) : json(nullptr)},
            {"vectors", (*dev)->vectors()}};
  if (vm.count("json")) {
    print_json(j);
    return 0;
  }
  std::printf("%s: ivshmem-%s, shared memory %zu bytes", bdf.str().c_str(),
              (*dev)->has_doorbell() ? "doorbell" : "plain", (*dev)->shm_size());
  if ((*dev)->position()) std::printf(", peer id %u, %u vectors", *(*dev)->position(), (*dev)->vectors());
  std::printf("\n");
  return 0;
}

po::variables_map parse_cmd(const std::vector<std::string>& args, po::options_description& desc) {
  add_common(desc);
  po::positional_options_description pos;
  pos.add("bdf", 1);
  return parse(args, desc, pos);
}

const char* mode_name(const Endpoint& ep) { return ep.bell ? "doorbell interrupts" : "polling"; }

// Doorbell interrupts this end has slept on and been woken by.
std::uint64_t interrupts(const Endpoint& ep) { return ep.dev ? ep.dev->interrupts(0) : 0; }

struct BulkResult {
  std::uint64_t messages = 0;
  std::uint64_t crc = 0, receiver_bytes = 0, receiver_crc = 0;
  bool match = false;
  double seconds = 0;
};

// Streams `bytes` of generated data in messages of `chunk` payload bytes,
// then a trailer with the count and CRC-32; the receiver answers with its own
// count, CRC-32 and verdict.
Result<BulkResult> bulk_send(Endpoint& e, const Common& c, std::uint64_t bytes, std::uint64_t chunk,
                             std::uint64_t seed) {
  BulkResult res;
  uLong crc = crc32(0L, Z_NULL, 0);
  auto t0 = Clock::now();
  for (std::uint64_t off = 0; off < bytes; off += chunk) {
    const std::uint64_t n = std::min(chunk, bytes - off);
    auto m = tagged('D', kTag + n);
    fill(m.data() + kTag, n, seed ^ off);  // generated per message: --bytes can exceed RAM
    crc = crc32(crc, reinterpret_cast<const Bytef*>(m.data() + kTag), static_cast<uInt>(n));
    if (auto r = send_msg(e, m, c.timeout); !r) return r.error().within("send data");
    ++res.messages;
  }
  auto trailer = tagged('T', 24);
  put64(trailer, 8, bytes);
  put64(trailer, 16, crc);
  if (auto r = send_msg(e, trailer, c.timeout); !r) return r.error().within("send trailer");
  std::vector<std::byte> in(e.ch->max_message());
  UV_TRY(std::size_t n, recv_msg(e, in, c.timeout));
  res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  if (static_cast<char>(in[0]) != 'A' || n < 24)
    return Error(Errc::bad_device_data, e.name, "bulk transfer",
                 std::string("expected the receiver's verdict, got a message of type '") +
                     static_cast<char>(in[0]) + "'");
  res.crc = crc;
  res.match = static_cast<char>(in[1]) == '1';
  res.receiver_bytes = get64(in, 8);
  res.receiver_crc = get64(in, 16);
  return res;
}

std::uint64_t pick_chunk(const po::variables_map& vm, const Endpoint& e, const char* cmd) {
  std::uint64_t chunk = vm.count("chunk") ? parse_u64(vm["chunk"].as<std::string>(), "--chunk") : 0;
  if (vm.count("chunk") && chunk == 0) throw UsageError{std::string(cmd) + ": --chunk must be at least 1"};
  // max_message comes from the window's header, which the peer may have
  // formatted: one with no room past the tag would make this wrap.
  if (e.ch->max_message() <= kTag)
    throw UsageError{std::string(cmd) + ": the channel's largest message is " +
                     std::to_string(e.ch->max_message()) + " bytes, no room for data after the " +
                     std::to_string(kTag) + "-byte tag"};
  const std::uint64_t max_chunk = e.ch->max_message() - kTag;
  if (chunk == 0) chunk = std::min<std::uint64_t>(4096, max_chunk);
  if (chunk > max_chunk)
    throw UsageError{std::string(cmd) + ": --chunk " + std::to_string(chunk) +
                     " exceeds the channel's largest payload (" + std::to_string(max_chunk) + " bytes)"};
  return chunk;
}

int cmd_ping(const std::vector<std::string>& args, bool send_only) {
  const char* name = send_only ? "send" : "ping";
  po::options_description desc(std::string("uvirtio-ivchan ") + name + " (BDF | --shm FILE) --side S");
  if (!send_only)
    desc.add_options()("count", po::value<std::string>(), "round trips (default 1000)")(
        "size", po::value<std::string>(), "message size in bytes, at least 16 (default 64)");
  desc.add_options()("bytes", po::value<std::string>(),
                     send_only ? "bytes to transfer" : "then transfer this many bytes (checked with CRC-32)")(
      "chunk", po::value<std::string>(), "payload bytes per bulk message (default min(4096, largest))")(
      "seed", po::value<std::string>(), "bulk data seed (default 1)");
  auto vm = parse_cmd(args, desc);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  Common c = common_of(vm, name);
  std::uint64_t count = send_only ? 0 : 1000;
  if (vm.count("count")) count = parse_u64(vm["count"].as<std::string>(), "--count");
  const std::uint64_t size = vm.count("size") ? parse_u64(vm["size"].as<std::string>(), "--size") : 64;
  if (send_only && !vm.count("bytes")) throw UsageError{"send: --bytes N is required"};
  const std::uint64_t bytes = vm.count("bytes") ? parse_u64(vm["bytes"].as<std::string>(), "--bytes") : 0;
  const std::uint64_t seed = vm.count("seed") ? parse_u64(vm["seed"].as<std::string>(), "--seed") : 1;
  if (!send_only && count == 0 && !vm.count("bytes"))
    throw UsageError{"ping: --count 0 without --bytes does nothing"};
  // Options of a part that does not run would be ignored.
  if (!send_only && count == 0 && vm.count("size"))
    throw UsageError{"ping: --size goes with round trips, and --count 0 makes none"};
  if (!vm.count("bytes") && (vm.count("chunk") || vm.count("seed")))
    throw UsageError{std::string(name) + ": --" + (vm.count("chunk") ? "chunk" : "seed") +
                     " goes with --bytes (the bulk transfer)"};
  if (size < 16)
    throw UsageError{std::string(name) + ": --size must be at least 16 (tag and sequence number)"};
  auto ep = open_endpoint(c);
  if (!ep) return fail(ep.error());
  Endpoint& e = **ep;
  // send makes no round trips, so its (default) size is not checked.
  if (count > 0 && size > e.ch->max_message())
    throw UsageError{std::string(name) + ": --size " + std::to_string(size) +
                     " exceeds the channel's largest message (" + std::to_string(e.ch->max_message()) +
                     " bytes)"};
  const std::uint64_t chunk = pick_chunk(vm, e, name);
  if (auto r = e.ch->wait_peer(c.timeout); !r) return fail(r.error());
  std::vector<std::byte> out, in(e.ch->max_message());
  std::vector<double> rt_us;
  constexpr std::uint64_t kMaxSamples = 1 << 20;  // percentiles over the first 1 Mi round trips
  rt_us.reserve(std::min(count, kMaxSamples));
  for (std::uint64_t i = 0; i < count; ++i) {
    out = tagged('P', size);
    put64(out, 8, i);
    fill(out.data() + 16, size - 16, i);
    auto t0 = Clock::now();
    if (auto r = send_msg(e, out, c.timeout); !r) return fail(r.error().within("ping " + std::to_string(i)));
    auto n = recv_msg(e, in, c.timeout);
    if (!n) return fail(n.error().within("ping " + std::to_string(i)));
    if (rt_us.size() < kMaxSamples)
      rt_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    if (*n != size || std::memcmp(in.data(), out.data(), size) != 0) {
      std::cerr << g_program << ": " << e.name << ": ping " << i << ": the echo differs from what was sent ("
                << *n << " bytes back for " << size << ")\n";
      return kFail;
    }
  }
  std::optional<BulkResult> bulk;
  if (vm.count("bytes")) {
    auto b = bulk_send(e, c, bytes, chunk, seed);
    if (!b) return fail(b.error());
    bulk = *b;
  }
  auto bye = tagged('B', kTag);
  if (auto r = send_msg(e, bye, c.timeout); !r) return fail(r.error().within("bye"));
  const double p50 = pct(rt_us, 0.5), p99 = pct(rt_us, 0.99);
  if (c.json) {
    json j = {{"mode", mode_name(e)}, {"interrupts", interrupts(e)}};
    if (count) j["ping"] = {{"round_trips", count}, {"size", size}, {"p50_us", p50}, {"p99_us", p99}};
    if (bulk)
      j["bulk"] = {{"bytes", bytes},
                   {"messages", bulk->messages},
                   {"crc32", bulk->crc},
                   {"receiver_bytes", bulk->receiver_bytes},
                   {"receiver_crc32", bulk->receiver_crc},
                   {"match", bulk->match},
                   {"mb_per_s", static_cast<double>(bytes) / bulk->seconds / 1e6}};
    print_json(j);
  } else {
    if (count)
      std::printf("ping: %llu round trips of %llu bytes, every echo intact; p50 %.1f us, p99 %.1f us (%s)\n",
                  static_cast<unsigned long long>(count), static_cast<unsigned long long>(size), p50, p99,
                  mode_name(e));
    if (bulk)
      std::printf(
          "send: %llu bytes in %llu messages, crc32 %08llx; receiver counted %llu bytes, crc32 %08llx: %s "
          "(%.1f MB/s, %s)\n",
          static_cast<unsigned long long>(bytes), static_cast<unsigned long long>(bulk->messages),
          static_cast<unsigned long long>(bulk->crc), static_cast<unsigned long long>(bulk->receiver_bytes),
          static_cast<unsigned long long>(bulk->receiver_crc), bulk->match ? "match" : "MISMATCH",
          static_cast<double>(bytes) / bulk->seconds / 1e6, mode_name(e));
  }
  if (e.bell && !c.json)  // --json: the count is "interrupts", and stdout stays one JSON value
    std::printf("ivchan: %llu doorbell interrupts woke us\n", static_cast<unsigned long long>(interrupts(e)));
  if (bulk && !bulk->match) {
    std::cerr << g_program << ": " << e.name << ": the receiver's data differs from what was sent\n";
    return kFail;
  }
  return 0;
}

int cmd_serve(const std::vector<std::string>& args) {
  po::options_description desc("uvirtio-ivchan serve (BDF | --shm FILE) --side S");
  desc.add_options()("sessions", po::value<std::string>(), "exit after this many sessions (default 1)");
  auto vm = parse_cmd(args, desc);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  Common c = common_of(vm, "serve");
  if (c.json) throw UsageError{"serve: --json does not apply (serve prints progress lines)"};
  const std::uint64_t sessions =
      vm.count("sessions") ? parse_u64(vm["sessions"].as<std::string>(), "--sessions") : 1;
  if (sessions == 0) throw UsageError{"serve: --sessions must be at least 1"};
  auto ep = open_endpoint(c);
  if (!ep) return fail(ep.error());
  Endpoint& e = **ep;
  std::printf("serve: ready on %s (%s)\n", e.name.c_str(), mode_name(e));
  std::fflush(stdout);
  std::vector<std::byte> in(e.ch->max_message());
  int rc = 0;
  for (std::uint64_t s = 1; s <= sessions; ++s) {
    if (auto r = e.ch->wait_peer(c.timeout); !r)
      return fail(r.error().within("session " + std::to_string(s)));
    std::printf("session %llu: peer present\n", static_cast<unsigned long long>(s));
    std::fflush(stdout);
    std::uint64_t pings = 0, bulk_bytes = 0;
    uLong crc = crc32(0L, Z_NULL, 0);
    for (;;) {
      auto n = recv_msg(e, in, c.timeout);
      if (!n) {
        if (n.error().code() == Errc::peer_gone) {
          std::printf("session %llu: peer gone (%s) after %llu pings and %llu bulk bytes\n",
                      static_cast<unsigned long long>(s), n.error().cause().c_str(),
                      static_cast<unsigned long long>(pings), static_cast<unsigned long long>(bulk_bytes));
          std::fflush(stdout);
          break;
        }
        return fail(n.error().within("session " + std::to_string(s)));
      }
      const char type = static_cast<char>(in[0]);
      if (type == 'P') {
        auto r = e.ch->send(std::span<const std::byte>(in.data(), *n), c.timeout);
        if (!r) return fail(r.error().within("echo"));
        ++pings;
      } else if (type == 'D') {
        crc = crc32(crc, reinterpret_cast<const Bytef*>(in.data() + kTag), static_cast<uInt>(*n - kTag));
        bulk_bytes += *n - kTag;
      } else if (type == 'T' && *n >= 24) {
        const std::uint64_t want_bytes = get64(in, 8), want_crc = get64(in, 16);
        const bool match = want_bytes == bulk_bytes && want_crc == crc;
        auto a = tagged('A', 24);
        a[1] = std::byte(match ? '1' : '0');
        put64(a, 8, bulk_bytes);
        put64(a, 16, crc);
        if (auto r = e.ch->send(a, c.timeout); !r) return fail(r.error().within("bulk verdict"));
        std::printf("session %llu: bulk %llu bytes, crc32 %08lx: %s\n", static_cast<unsigned long long>(s),
                    static_cast<unsigned long long>(bulk_bytes), crc, match ? "match" : "MISMATCH");
        std::fflush(stdout);
        if (!match) rc = kFail;
        bulk_bytes = 0;
        crc = crc32(0L, Z_NULL, 0);
      } else if (type == 'B') {
        std::printf("session %llu: peer said goodbye after %llu pings (%llu doorbell interrupts so far)\n",
                    static_cast<unsigned long long>(s), static_cast<unsigned long long>(pings),
                    static_cast<unsigned long long>(interrupts(e)));
        std::fflush(stdout);
        break;
      } else {
        std::cerr << g_program << ": " << e.name << ": unknown message type 0x"
                  << hex(static_cast<unsigned>(in[0]), 2) << " (" << *n << " bytes)\n";
        return kFail;
      }
    }
  }
  return rc;
}

int run(int argc, char** argv) {
  return run_command(argc, argv, kUsageText,
                     {{"info", cmd_info},
                      {"serve", cmd_serve},
                      {"ping", [](const auto& a) { return cmd_ping(a, false); }},
                      {"send", [](const auto& a) { return cmd_ping(a, true); }}});
}

}  // namespace
}  // namespace uvirtio::apps

int main(int argc, char** argv) {
  return uvirtio::apps::tool_main("uvirtio-ivchan", argc, argv, uvirtio::apps::run);
}
