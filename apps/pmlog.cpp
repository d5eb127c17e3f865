// uvirtio-pmlog: a crash-consistent append-only log on a virtio-pmem device.
//
// Layout of the pmem range (all little-endian):
//   [0, 4096)      header: magic "UVPMLOG1", le32 version, le32 reserved,
//                  le64 capacity, le64 committed_end
//   [4096, ...)    records, each 8-byte aligned:
//                  le32 magic 0x5245434f ("OCER"), le32 payload_len, le64 seq,
//                  le32 crc32 (over seq, len and payload), le32 reserved, payload
//
// Append writes the record past committed_end and persists it; only then does
// it store the new committed_end (one aligned 8-byte store, which is atomic)
// and persist it. A crash before that store leaves the record invisible; a
// crash after it leaves it complete. Sequence numbers are counted from the
// start, so a record's seq must equal its position. `verify` checks every committed record
// (magic, length, sequence, checksum) and that nothing is torn or reordered.
//
//   uvirtio-pmlog BDF init
//   uvirtio-pmlog BDF append TEXT...          append each TEXT as a record
//   uvirtio-pmlog BDF append --count N [--size S] [--tag T]   N generated records, printing "acked SEQ"
//   uvirtio-pmlog BDF list [--json]
//   uvirtio-pmlog BDF verify [--expect-at-least N]
#include <zlib.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.hpp"
#include "uvirtio/base/le.hpp"
#include "uvirtio/driver/pmem.hpp"

namespace uvirtio::apps {
namespace {

constexpr char kMagic[8] = {'U', 'V', 'P', 'M', 'L', 'O', 'G', '1'};
constexpr std::uint32_t kVersion = 1;
constexpr std::uint32_t kRecordMagic = 0x5245434f;
constexpr std::uint64_t kDataStart = 4096;
constexpr std::uint32_t kMaxPayload = 1u << 20;

struct Header {
  char magic[8];
  le32 version;
  le32 reserved;
  le64 capacity;
  le64 committed_end;  // offset just past the last committed record
};
static_assert(offsetof(Header, committed_end) == 24);

struct RecordHeader {
  le32 magic;
  le32 len;
  le64 seq;
  le32 crc;
  le32 reserved;
};
static_assert(sizeof(RecordHeader) == 24);

std::uint64_t align8(std::uint64_t v) { return (v + 7) & ~std::uint64_t{7}; }

std::uint32_t record_crc(std::uint64_t seq, std::uint32_t len, const std::uint8_t* payload) {
  std::uint8_t meta[12];
  std::memcpy(meta, &seq, 8);
  std::memcpy(meta + 8, &len, 4);
  uLong c = crc32(0L, Z_NULL, 0);
  c = crc32(c, meta, sizeof meta);
  c = crc32(c, payload, len);
  return static_cast<std::uint32_t>(c);
}

class Log {
 public:
  explicit Log(driver::Pmem& pm) : pm_(pm), hdr_(reinterpret_cast<Header*>(pm.data())) {}

  bool formatted() const { return std::memcmp(hdr_->magic, kMagic, 8) == 0; }

  Result<void> init() {
    std::memset(pm_.data(), 0, kDataStart);
    hdr_->version.set(kVersion);
    hdr_->capacity.set(pm_.size());
    hdr_->committed_end.set(kDataStart);
    count_ = 0;
    UV_TRY_VOID(pm_.persist(pm_.data(), kDataStart));
    // The magic last: a crash during init leaves an unformatted log.
    std::memcpy(hdr_->magic, kMagic, 8);
    return pm_.persist(hdr_, sizeof kMagic);
  }

  Result<void> check_header() const {
    if (!formatted())
      return Error(Errc::invalid_argument, pm_.name(), "open log",
                   "no log here (run 'uvirtio-pmlog BDF init')");
    if (hdr_->version.get() != kVersion)
      return Error(Errc::unsupported, pm_.name(), "open log",
                   "log version " + std::to_string(hdr_->version.get()));
    const std::uint64_t end = hdr_->committed_end.get();
    if (hdr_->capacity.get() != pm_.size() || end < kDataStart || end > pm_.size() || end % 8 != 0)
      return Error(Errc::bad_device_data, pm_.name(), "open log",
                   "corrupt header (capacity or committed_end)");
    return ok();
  }

  // Appends one record; returns its sequence number once it is durable.
  Result<std::uint64_t> append(std::span<const std::uint8_t> payload) {
    if (payload.size() > kMaxPayload)
      return Error(Errc::invalid_argument, pm_.name(), "append", "record larger than 1 MiB");
    const std::uint64_t end = hdr_->committed_end.get();
    const std::uint64_t seq = count_ + 1;
    const auto len = static_cast<std::uint32_t>(payload.size());
    const std::uint64_t next = align8(end + sizeof(RecordHeader) + len);
    if (next > pm_.size()) return Error(Errc::busy, pm_.name(), "append", "the log is full");
    std::uint8_t* at = pm_.data() + end;
    RecordHeader rh{};
    rh.magic.set(kRecordMagic);
    rh.len.set(len);
    rh.seq.set(seq);
    rh.crc.set(record_crc(seq, len, payload.data()));
    std::memcpy(at, &rh, sizeof rh);
    if (len > 0) std::memcpy(at + sizeof rh, payload.data(), len);
    // 1. The record is durable before it becomes visible.
    UV_TRY_VOID(pm_.persist(at, sizeof rh + len));
    // 2. Commit with one atomic 8-byte store, then make it durable.
    std::atomic_ref<std::uint64_t>(hdr_->committed_end.raw())
        .store(le64::to_raw(next), std::memory_order_release);
    UV_TRY_VOID(pm_.persist(&hdr_->committed_end, sizeof(le64)));
    count_ = seq;
    return seq;
  }

  struct Record {
    std::uint64_t offset, seq;
    std::string payload;
  };

  // Walks the committed records, checking each; the error names the first bad one.
  Result<std::vector<Record>> records() const {
    UV_TRY_VOID(check_header());
    const std::uint64_t end = hdr_->committed_end.get();
    std::vector<Record> out;
    std::uint64_t off = kDataStart;
    while (off < end) {
      const std::string where = "record at offset " + std::to_string(off);
      if (end - off < sizeof(RecordHeader))
        return Error(Errc::bad_device_data, pm_.name(), "verify", where + ": truncated header (torn)");
      RecordHeader rh;
      std::memcpy(&rh, pm_.data() + off, sizeof rh);
      if (rh.magic.get() != kRecordMagic)
        return Error(Errc::bad_device_data, pm_.name(), "verify", where + ": bad magic (torn)");
      const std::uint32_t len = rh.len.get();
      if (len > kMaxPayload || len > end - off - sizeof rh)
        return Error(Errc::bad_device_data, pm_.name(), "verify",
                     where + ": length runs past the commit point");
      const std::uint64_t want = out.size() + 1;
      if (rh.seq.get() != want)
        return Error(Errc::bad_device_data, pm_.name(), "verify",
                     where + ": sequence " + std::to_string(rh.seq.get()) + ", expected " +
                         std::to_string(want) + " (reordered)");
      const std::uint8_t* payload = pm_.data() + off + sizeof rh;
      if (rh.crc.get() != record_crc(rh.seq.get(), len, payload))
        return Error(Errc::bad_device_data, pm_.name(), "verify", where + ": checksum mismatch (torn)");
      out.push_back(Record{off, rh.seq.get(), std::string(reinterpret_cast<const char*>(payload), len)});
      off = align8(off + sizeof rh + len);
    }
    if (off != end)
      return Error(Errc::bad_device_data, pm_.name(), "verify",
                   "records end at " + std::to_string(off) + ", commit point is " + std::to_string(end));
    return out;
  }

 private:
  driver::Pmem& pm_;
  Header* hdr_;
  std::uint64_t count_ = 0;  // committed records (set by init or records())

 public:
  void set_count(std::uint64_t n) { count_ = n; }
};

const char* kUsageText =
    "usage: uvirtio-pmlog BDF init\n"
    "       uvirtio-pmlog BDF append TEXT...\n"
    "       uvirtio-pmlog BDF append --count N [--size S] [--tag T]\n"
    "       uvirtio-pmlog BDF list [--json]\n"
    "       uvirtio-pmlog BDF verify [--expect-at-least N]\n"
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
      "text", po::value<std::vector<std::string>>(), "record text");
  po::positional_options_description pos;
  pos.add("text", -1);
  auto vm = parse(args, desc, pos);
  if (cmd != "init" && cmd != "append" && cmd != "list" && cmd != "verify")
    throw UsageError{"unknown command '" + cmd + "' (init, append, list, verify)"};
  if (cmd == "append" && vm.count("count") == vm.count("text"))
    throw UsageError{"append: give record texts or --count N (one of them)"};

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
  Log log(**pm);
  if (cmd == "init") {
    if (auto r = log.init(); !r) return fail(r.error());
    std::printf("%s: log initialised (%llu bytes)\n", (*pm)->name().c_str(),
                static_cast<unsigned long long>((*pm)->size()));
    return 0;
  }
  if (auto r = log.check_header(); !r) return fail(r.error());
  auto recs = log.records();
  if (!recs) return fail(recs.error());
  log.set_count(recs->size());
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
    const std::uint64_t count = parse_u64(vm["count"].as<std::string>(), "--count");
    const std::uint64_t size = parse_u64(vm["size"].as<std::string>(), "--size");
    if (size > kMaxPayload) throw UsageError{"--size must be at most 1048576"};
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
      for (const auto& r : *recs) j.push_back({{"seq", r.seq}, {"offset", r.offset}, {"payload", r.payload}});
      std::cout << j.dump(2) << "\n";
    } else {
      for (const auto& r : *recs)
        std::printf("%llu\t%s\n", static_cast<unsigned long long>(r.seq), r.payload.c_str());
    }
    return 0;
  }
  // verify
  std::printf("%s: %zu records, all intact and in order\n", (*pm)->name().c_str(), recs->size());
  if (vm.count("expect-at-least")) {
    const std::uint64_t want = parse_u64(vm["expect-at-least"].as<std::string>(), "--expect-at-least");
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
