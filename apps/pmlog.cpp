// uvirtio-pmlog: a crash-consistent append-only log on a virtio-pmem device.
// The format and its checks are in pmlog_format.hpp; this is the command.
//
//   uvirtio-pmlog BDF init
//   uvirtio-pmlog BDF append TEXT...          append each TEXT as a record
//   uvirtio-pmlog BDF append --count N [--size S] [--tag T]   N generated records, printing "acked SEQ"
//   uvirtio-pmlog BDF list [--json]
//   uvirtio-pmlog BDF verify [--expect-at-least N]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "cli_common.hpp"
#include "pmlog_format.hpp"
#include "uvirtio/driver/pmem.hpp"

namespace uvirtio::apps {
namespace {

using pmlog::kMaxPayload;

const char* kUsageText =
    "usage: uvirtio-pmlog BDF init\n"
    "       uvirtio-pmlog BDF append TEXT...\n"
    "       uvirtio-pmlog BDF append --count N [--size S] [--tag T]\n"
    "       uvirtio-pmlog BDF list [--json]\n"
    "       uvirtio-pmlog BDF verify [--expect-at-least N]\n"
    "list escapes control characters and backslashes as \\xNN and \\\\ (and bytes from 0x80\n"
    "when a record is not UTF-8); --json adds payload_hex for such a record.\n"
    "A flush that meets a device needing a reset recovers and is sent again\n"
    "(said on stderr); --no-recover fails instead.\n";

int run(int argc, char** argv) {
  if (argc >= 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
    std::cout << kUsageText;
    return 0;
  }
  if (argc < 3) {
    std::cerr << kUsageText;
    return kUsage;
  }
  const pci::Bdf bdf = parse_bdf_or_throw(argv[1]);
  const std::string cmd = argv[2];
  const std::vector<std::string> args(argv + 3, argv + argc);
  po::options_description desc("options");
  desc.add_options()("count", po::value<std::string>(), "records to generate")(
      "size", po::value<std::string>()->default_value("100"), "payload bytes per generated record")(
      "tag", po::value<std::string>()->default_value("rec"), "text at the start of generated payloads")(
      "no-recover", "fail when the device needs a reset instead of resetting it and sending the flush again")(
      "json", "print JSON")("expect-at-least", po::value<std::string>(),
                            "fail unless this many records are there")(
      "text", po::value<std::vector<std::string>>(), "record text")("help,h", "show help");
  po::positional_options_description pos;
  pos.add("text", -1);
  auto vm = parse(args, desc, pos);
  if (vm.count("help")) {
    std::cout << kUsageText;
    return 0;
  }
  // What each command takes; anything else given to it is a mistake, not
  // something to ignore (and every usage error comes before the device is
  // opened).
  const std::vector<std::pair<std::string, std::vector<std::string>>> takes = {
      {"init", {"no-recover"}},
      {"append", {"text", "count", "size", "tag", "no-recover"}},
      {"list", {"json"}},
      {"verify", {"expect-at-least"}}};
  const auto it = std::find_if(takes.begin(), takes.end(), [&](const auto& t) { return t.first == cmd; });
  if (it == takes.end()) throw UsageError{"unknown command '" + cmd + "' (init, append, list, verify)"};
  for (const auto& [name, value] : vm) {
    if (value.defaulted() || std::find(it->second.begin(), it->second.end(), name) != it->second.end())
      continue;
    throw UsageError{cmd + ": " +
                     (name == "text"
                          ? "unexpected argument '" + vm["text"].as<std::vector<std::string>>()[0] + "'"
                          : "--" + name + " does not apply") +
                     " (see --help)"};
  }
  if (cmd == "append" && vm.count("count") == vm.count("text"))
    throw UsageError{"append: give record texts or --count N (one of them)"};
  if (cmd == "append" && vm.count("text") && (!vm["size"].defaulted() || !vm["tag"].defaulted()))
    throw UsageError{"append: --size and --tag go with --count"};
  const std::uint64_t count = vm.count("count") ? parse_u64(vm["count"].as<std::string>(), "--count") : 0;
  // Zero records would open the device, append nothing and exit 0.
  if (vm.count("count") && count == 0) throw UsageError{"append: --count must be at least 1"};
  const std::uint64_t size = parse_u64(vm["size"].as<std::string>(), "--size");
  if (size > kMaxPayload) throw UsageError{"--size must be at most 1048576"};
  const std::uint64_t want = vm.count("expect-at-least")
                                 ? parse_u64(vm["expect-at-least"].as<std::string>(), "--expect-at-least")
                                 : 0;

  // Flushes are idempotent, and an earlier process that gave up on one can
  // leave QEMU to complete it late into our ring, which sets NEEDS_RESET
  // (split) or breaks the ring (packed): recover and send it again.
  driver::PmemOptions opt;
  opt.recover_on_reset = vm.count("no-recover") == 0;
  auto pm = driver::Pmem::open(bdf, opt);
  if (!pm) return fail(pm.error());
  const auto note_recoveries = [&pm] {
    if (const std::uint64_t n = (*pm)->recoveries(); n > 0)
      std::fprintf(stderr, "uvirtio-pmlog: %s: %s\n", (*pm)->name().c_str(), pmem_recovery_note(n).c_str());
  };
  driver::Pmem& dev = **pm;
  pmlog::Log log(std::span(dev.data(), dev.size()), dev.name(),
                 [&dev](const void* addr, std::size_t len) { return dev.persist(addr, len); });
  if (cmd == "init") {
    if (auto r = log.init(); !r) return fail(r.error());
    std::printf("%s: log initialised (%llu bytes)\n", (*pm)->name().c_str(),
                static_cast<unsigned long long>((*pm)->size()));
    return 0;
  }
  auto recs = log.records();
  if (!recs) return fail(recs.error());
  if (cmd == "append") {
    if (vm.count("text")) {
      for (const auto& t : vm["text"].as<std::vector<std::string>>()) {
        auto seq = log.append(std::span(reinterpret_cast<const std::uint8_t*>(t.data()), t.size()));
        if (!seq) return fail(seq.error());
        std::printf("acked %llu\n", static_cast<unsigned long long>(*seq));
      }
      note_recoveries();
      return 0;
    }
    const std::string tag = vm["tag"].as<std::string>();
    for (std::uint64_t i = 0; i < count; ++i) {
      std::string payload = tag + " " + std::to_string(i) + " ";
      while (payload.size() < size) payload += static_cast<char>('a' + (payload.size() + i) % 26);
      payload.resize(size);
      auto seq = log.append(std::span(reinterpret_cast<const std::uint8_t*>(payload.data()), payload.size()));
      if (!seq) return fail(seq.error());
      std::printf("acked %llu\n", static_cast<unsigned long long>(*seq));
      std::fflush(stdout);
    }
    note_recoveries();
    return 0;
  }
  if (cmd == "list") {
    if (vm.count("json")) {
      json j = json::array();
      for (const auto& r : *recs) {
        json rec = {{"seq", r.seq}, {"offset", r.offset}, {"payload", r.payload}};
        // Not UTF-8: "payload" shows U+FFFD for the bad bytes, the hex has them all.
        if (!pmlog::is_utf8(r.payload)) rec["payload_hex"] = pmlog::to_hex(r.payload);
        j.push_back(std::move(rec));
      }
      print_json(j);
    } else {
      for (const auto& r : *recs)
        std::printf("%llu\t%s\n", static_cast<unsigned long long>(r.seq),
                    pmlog::printable(r.payload).c_str());
    }
    return 0;
  }
  // verify
  std::printf("%s: %zu records, all intact and in order\n", (*pm)->name().c_str(), recs->size());
  if (vm.count("expect-at-least")) {
    if (recs->size() < want) {
      std::fprintf(stderr, "uvirtio-pmlog: %s: verify: %zu records, but %llu appends were acknowledged\n",
                   (*pm)->name().c_str(), recs->size(), static_cast<unsigned long long>(want));
      return kFail;
    }
  }
  return 0;
}

}  // namespace

}  // namespace uvirtio::apps

int main(int argc, char** argv) {
  return uvirtio::apps::tool_main("uvirtio-pmlog", argc, argv, uvirtio::apps::run);
}
