// uvirtio-bench rings: split and packed ring throughput between a driver
// thread and a device thread sharing one memory region, against two same-run
// baselines:
//   - a bare single-producer/single-consumer ring of 64-byte slots between the
//     same two threads (the ceiling: no descriptors, no validation);
//   - the cache-line round trip between the two threads (printed next to every
//     figure: the vCPUs here move around, so compare only within one run);
//   - DPDK's own pair, testpmd's virtio-user txonly into its vhost-user
//     rxonly at the same burst size (bench_dpdk.hpp), when dpdk-testpmd is
//     installed (skipped with --no-dpdk).
// The virtqueue runs in polling mode, no notifications: the driver keeps up to
// `batch` requests (one 64-byte device-readable buffer each, like a small
// packet) in flight, publishing a batch at once; the device pops what is
// available, validates and translates each chain, and completes it.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <string_view>
#include <thread>
#include <vector>

#include "bench_common.hpp"
#include "bench_dpdk.hpp"
#include "cli_common.hpp"
#include "uvirtio/base/barrier.hpp"
#include "uvirtio/rings/packed.hpp"
#include "uvirtio/rings/packed_device.hpp"
#include "uvirtio/rings/split.hpp"
#include "uvirtio/rings/split_device.hpp"

namespace uvirtio::apps {
namespace {

using Clock = std::chrono::steady_clock;

struct AlignedBuf {
  explicit AlignedBuf(std::size_t n)
      : p(static_cast<std::uint8_t*>(std::aligned_alloc(4096, (n + 4095) / 4096 * 4096))) {
    std::memset(p, 0, (n + 4095) / 4096 * 4096);
  }
  ~AlignedBuf() { std::free(p); }
  std::uint8_t* p;
};

// Requests per second between a driver and a device thread over one ring.
template <class Driver, class Device>
Result<double> ops_per_s(Driver& drv, Device& dev, std::uint64_t base, std::uint16_t size, unsigned batch,
                         double seconds) {
  StopFlag stop;
  std::optional<Error> dev_error;
  std::thread device([&] {
    // Like a real device: take what is available, complete it, publish the
    // used entries once per batch (one store the driver sees per batch).
    typename Device::Request req;
    while (!stop.raised()) {
      unsigned got = 0;
      for (;;) {
        auto r = dev.pop_into(req);
        if (!r) {
          dev_error = r.error();
          return;
        }
        if (!*r) break;
        if (auto p = dev.push_deferred(req.head, 0); !p) {
          dev_error = p.error();
          return;
        }
        ++got;
      }
      if (got == 0) {
        cpu_relax();
        continue;
      }
      dev.publish_used();
    }
  });
  std::uint64_t done = 0, slot = 0;
  const auto t0 = Clock::now();
  const auto until = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  std::optional<Error> drv_error;
  while (Clock::now() < until && !drv_error) {
    for (int iter = 0; iter < 256 && !drv_error; ++iter) {
      if (drv.free_count() >= batch) {
        for (unsigned b = 0; b < batch; ++b) {
          const rings::Buffer buf{base + (slot++ % size) * 64, 64};
          if (auto a = drv.add(std::span(&buf, 1), {}, slot); !a) drv_error = a.error();
        }
        drv.publish();
      }
      for (;;) {
        auto c = drv.poll();
        if (!c) {
          drv_error = c.error();
          break;
        }
        if (!*c) break;
        ++done;
      }
    }
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  stop.raise();
  device.join();
  if (drv_error) return *drv_error;
  if (dev_error) return *dev_error;
  return static_cast<double>(done) / secs;
}

// The rings measured: each layout without and with VIRTIO_F_IN_ORDER, which
// DPDK's pair negotiates (its vhost back-end offers it, its virtio PMD takes it).
constexpr std::string_view kLayouts[] = {"split", "packed", "split_in_order", "packed_in_order"};

struct Pool {
  explicit Pool(std::uint16_t size)
      : buf(static_cast<std::size_t>(size) * 64), bytes(static_cast<std::uint64_t>(size) * 64) {}
  AlignedBuf buf;
  std::uint64_t bytes;
  std::uint64_t base() const { return reinterpret_cast<std::uint64_t>(buf.p); }
  rings::MemoryMap map() {
    auto m = rings::MemoryMap::create({{base(), bytes, buf.p, true}}, "bench pool");
    return std::move(*m);  // one non-empty region: cannot fail
  }
};

// The driver's and the device's queue objects on cache lines of their own,
// as they would be in two processes: side by side on one stack, the device
// thread's index stores kept invalidating the line the driver reads.
template <class T>
struct alignas(128) Own {
  explicit Own(T&& v) : q(std::move(v)) {}  // clang 14 has no parenthesised aggregate init
  T q;
};

Result<double> split_ops_per_s(std::uint16_t size, unsigned batch, double seconds, bool in_order) {
  using L = rings::SplitLayout;
  AlignedBuf desc(L::desc_bytes(size)), avail(L::avail_bytes(size)), used(L::used_bytes(size));
  Pool pool(size);
  UV_TRY(rings::SplitQueue drv, rings::SplitQueue::create(size, desc.p, avail.p, used.p, "bench queue"));
  UV_TRY(rings::SplitDeviceQueue dev,
         rings::SplitDeviceQueue::create(size, desc.p, avail.p, used.p, "bench device", pool.map()));
  if (in_order) {
    UV_TRY_VOID(drv.set_in_order(true));
    UV_TRY_VOID(dev.set_in_order(true));
  }
  auto d = std::make_unique<Own<rings::SplitQueue>>(std::move(drv));
  auto v = std::make_unique<Own<rings::SplitDeviceQueue>>(std::move(dev));
  return ops_per_s(d->q, v->q, pool.base(), size, batch, seconds);
}

Result<double> packed_ops_per_s(std::uint16_t size, unsigned batch, double seconds, bool in_order) {
  using L = rings::PackedLayout;
  AlignedBuf desc(L::desc_bytes(size)), drv_ev(L::event_bytes()), dev_ev(L::event_bytes());
  Pool pool(size);
  UV_TRY(rings::PackedQueue drv, rings::PackedQueue::create(size, desc.p, drv_ev.p, dev_ev.p, "bench queue"));
  UV_TRY(rings::PackedDeviceQueue dev,
         rings::PackedDeviceQueue::create(size, desc.p, drv_ev.p, dev_ev.p, "bench device", pool.map()));
  if (in_order) {
    UV_TRY_VOID(drv.set_in_order(true));
    UV_TRY_VOID(dev.set_in_order(true));
  }
  auto d = std::make_unique<Own<rings::PackedQueue>>(std::move(drv));
  auto v = std::make_unique<Own<rings::PackedDeviceQueue>>(std::move(dev));
  return ops_per_s(d->q, v->q, pool.base(), size, batch, seconds);
}

}  // namespace

int bench_rings(const std::vector<std::string>& args) {
  po::options_description desc("uvirtio-bench rings");
  desc.add_options()("help,h", "show help")("batch", po::value<std::vector<unsigned>>()->multitoken(),
                                            "batch sizes (default 1 2 4 8 16 32 64)")(
      "seconds", po::value<double>()->default_value(1.0), "duration of each point")(
      "size", po::value<unsigned>()->default_value(256), "queue size (power of two, 2..32768)")(
      "layouts", po::value<std::vector<std::string>>()->multitoken(),
      "rings to measure (default split packed split_in_order packed_in_order)")(
      "no-dpdk", "leave out the DPDK testpmd baseline")(
      "dpdk-seconds", po::value<unsigned>()->default_value(5), "duration of each DPDK point (3..600)")(
      "testpmd", po::value<std::string>()->default_value("dpdk-testpmd"), "the testpmd binary")("json",
                                                                                                "print JSON");
  auto vm = parse(args, desc, {});
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  std::vector<unsigned> batches = {1, 2, 4, 8, 16, 32, 64};
  if (vm.count("batch")) batches = vm["batch"].as<std::vector<unsigned>>();
  const unsigned size = vm["size"].as<unsigned>();
  if (size < 2 || size > 32768 || (size & (size - 1)) != 0)
    throw UsageError{"rings: --size must be a power of two in 2..32768"};
  for (unsigned b : batches)
    if (b < 1 || b > size) throw UsageError{"rings: --batch values must be 1..size"};
  const double seconds = parse_seconds(vm["seconds"].as<double>(), "rings: --seconds");
  std::vector<std::string> layouts(std::begin(kLayouts), std::end(kLayouts));
  if (vm.count("layouts")) {
    layouts = vm["layouts"].as<std::vector<std::string>>();
    for (const auto& l : layouts)
      if (std::find(std::begin(kLayouts), std::end(kLayouts), l) == std::end(kLayouts))
        throw UsageError{"rings: unknown layout '" + l +
                         "' (split, packed, split_in_order, packed_in_order)"};
  }
  const unsigned dpdk_seconds = vm["dpdk-seconds"].as<unsigned>();
  if (dpdk_seconds < 3 || dpdk_seconds > 600) throw UsageError{"rings: --dpdk-seconds must be in 3..600"};
  const std::string testpmd = vm["testpmd"].as<std::string>();
  std::optional<std::string> no_dpdk;
  if (vm.count("no-dpdk")) {
    no_dpdk = "--no-dpdk";
  } else if (auto why = dpdk_unavailable(testpmd)) {
    no_dpdk = *why;
  } else if (size > 1024) {
    no_dpdk = "virtio-user queues hold at most 1024 entries";
  }
  if (no_dpdk && !vm.count("json")) std::printf("DPDK baseline left out: %s\n", no_dpdk->c_str());

  json out;
  out["queue_size"] = size;
  out["cache_line_round_trip_ns"] = cache_line_round_trip_ns(std::min(seconds, 0.5));
  const double bare = bare_ring_msgs_per_s(seconds);
  out["bare_ring_msgs_per_s"] = bare;
  for (const std::string& l : layouts) {
    const char* layout = l.c_str();
    out[layout] = json::array();
    const bool in_order = l.ends_with("_in_order");
    for (unsigned b : batches) {
      auto ops = l.starts_with("split")
                     ? split_ops_per_s(static_cast<std::uint16_t>(size), b, seconds, in_order)
                     : packed_ops_per_s(static_cast<std::uint16_t>(size), b, seconds, in_order);
      if (!ops) return fail(ops.error());
      out[layout].push_back({{"batch", b},
                             {"ops_per_s", *ops},
                             {"ratio_vs_bare_ring", *ops / bare},
                             {"cache_line_round_trip_ns", cache_line_round_trip_ns(0.1)}});
    }
  }
  // DPDK last: its two processes spin on both CPUs while they run.
  if (no_dpdk) {
    out["dpdk"] = nullptr;
    out["dpdk_left_out"] = *no_dpdk;
  } else {
    out["dpdk"] = json::array();
    for (std::size_t i = 0; i < batches.size(); ++i) {
      const unsigned b = batches[i];
      auto pps = dpdk_loopback_pps({b, size, dpdk_seconds, testpmd});
      if (!pps) {
        // The rings' figures stand on their own: keep them, and say why the
        // baseline is missing instead of failing the whole run.
        out["dpdk"] = nullptr;
        out["dpdk_left_out"] = "failed at burst " + std::to_string(b) + ": " + pps.error().message();
        std::fprintf(stderr, "uvirtio-bench: DPDK baseline failed: %s\n", pps.error().message().c_str());
        break;
      }
      json point = {{"batch", b},
                    {"packets_per_s", *pps},
                    {"ratio_vs_bare_ring", *pps / bare},
                    {"cache_line_round_trip_ns", cache_line_round_trip_ns(0.1)}};
      for (const std::string& layout : layouts)
        point[layout + "_vs_dpdk"] = out[layout][i]["ops_per_s"].get<double>() / *pps;
      out["dpdk"].push_back(point);
    }
  }
  if (vm.count("json")) {
    print_json(out);
    return 0;
  }
  std::printf("cache-line round trip: %.0f ns; bare SPSC ring (64 B slots): %.2f M msg/s\n",
              out["cache_line_round_trip_ns"].get<double>(), bare / 1e6);
  for (const std::string& l : layouts) {
    const char* layout = l.c_str();
    std::printf("%s ring%s, driver thread <-> device thread, queue size %u, polling:\n",
                l.substr(0, l.find('_')).c_str(), l.ends_with("_in_order") ? " (VIRTIO_F_IN_ORDER)" : "",
                size);
    std::printf("  %-6s %14s %10s %10s %14s\n", "batch", "M requests/s", "vs bare", "vs DPDK", "cache RT ns");
    for (std::size_t i = 0; i < out[layout].size(); ++i) {
      const auto& p = out[layout][i];
      char vs_dpdk[32] = "-";
      if (out["dpdk"].is_array())
        std::snprintf(vs_dpdk, sizeof vs_dpdk, "%.2f",
                      out["dpdk"][i][std::string(layout) + "_vs_dpdk"].get<double>());
      std::printf("  %-6u %14.2f %10.3f %10s %14.0f\n", p["batch"].get<unsigned>(),
                  p["ops_per_s"].get<double>() / 1e6, p["ratio_vs_bare_ring"].get<double>(), vs_dpdk,
                  p["cache_line_round_trip_ns"].get<double>());
    }
  }
  if (!no_dpdk && !out["dpdk"].is_array())
    std::printf("DPDK baseline left out: %s\n", out["dpdk_left_out"].get<std::string>().c_str());
  if (out["dpdk"].is_array()) {
    std::printf(
        "DPDK testpmd virtio-user (txonly, 64 B) -> vhost-user (rxonly), queue size %u, median of %u s:\n",
        size, dpdk_seconds);
    std::printf("  %-6s %14s %10s %14s\n", "burst", "M packets/s", "vs bare", "cache RT ns");
    for (const auto& p : out["dpdk"])
      std::printf("  %-6u %14.2f %10.3f %14.0f\n", p["batch"].get<unsigned>(),
                  p["packets_per_s"].get<double>() / 1e6, p["ratio_vs_bare_ring"].get<double>(),
                  p["cache_line_round_trip_ns"].get<double>());
  }
  return 0;
}

}  // namespace uvirtio::apps
