// uvirtio-pmlog's on-media format: see pmlog_format.hpp.
#include "pmlog_format.hpp"

#include <zlib.h>

#include <atomic>
#include <cstring>

#include "uvirtio/base/le.hpp"

namespace uvirtio::apps::pmlog {
namespace {

constexpr char kMagic[8] = {'U', 'V', 'P', 'M', 'L', 'O', 'G', '1'};
constexpr std::uint32_t kVersion = 1;
constexpr std::uint32_t kRecordMagic = 0x5245434f;

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
static_assert(sizeof(RecordHeader) == kRecordHeaderBytes);

constexpr char kHex[] = "0123456789abcdef";

std::uint64_t align8(std::uint64_t v) { return (v + 7) & ~std::uint64_t{7}; }

std::uint32_t record_crc(std::uint64_t seq, std::uint32_t len, const std::uint8_t* payload) {
  std::uint8_t meta[12];
  le64 s;
  s.set(seq);
  le32 l;
  l.set(len);
  std::memcpy(meta, &s, 8);
  std::memcpy(meta + 8, &l, 4);
  uLong c = crc32(0L, Z_NULL, 0);
  c = crc32(c, meta, sizeof meta);
  // Not for an empty payload: zlib answers 0 for a null buffer (an empty
  // span's data()), not the CRC so far.
  if (len > 0) c = crc32(c, payload, len);
  return static_cast<std::uint32_t>(c);
}

}  // namespace

Log::Log(std::span<std::uint8_t> range, std::string device, PersistFn persist)
    : range_(range), device_(std::move(device)), persist_(std::move(persist)) {}

Result<void> Log::init() {
  if (range_.size() < kDataStart || range_.size() % 8 != 0)
    return Error(Errc::invalid_argument, device_, "init log",
                 "the range is " + std::to_string(range_.size()) +
                     " bytes; a log needs at least 4096 and a multiple of 8");
  if (reinterpret_cast<std::uintptr_t>(range_.data()) % 8 != 0)
    return Error(Errc::invalid_argument, device_, "init log",
                 "the range does not start 8-byte aligned (the commit store must be atomic)");
  open_ = false;
  std::memset(range_.data(), 0, kDataStart);
  Header h{};
  h.version.set(kVersion);
  h.capacity.set(range_.size());
  h.committed_end.set(kDataStart);
  std::memcpy(range_.data(), &h, sizeof h);
  UV_TRY_VOID(persist_(range_.data(), kDataStart));
  // The magic last: a crash during init leaves an unformatted log.
  std::memcpy(range_.data(), kMagic, sizeof kMagic);
  UV_TRY_VOID(persist_(range_.data(), sizeof kMagic));
  end_ = kDataStart;
  count_ = 0;
  open_ = true;
  return ok();
}

Result<std::uint64_t> Log::read_header(const char* op) const {
  if (range_.size() < kDataStart)
    return Error(Errc::invalid_argument, device_, op,
                 "the range is " + std::to_string(range_.size()) + " bytes, smaller than a log's header");
  if (reinterpret_cast<std::uintptr_t>(range_.data()) % 8 != 0)
    return Error(Errc::invalid_argument, device_, op,
                 "the range does not start 8-byte aligned (the commit store must be atomic)");
  Header h;
  std::memcpy(&h, range_.data(), sizeof h);  // one copy: the device may change it
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0)
    return Error(Errc::invalid_argument, device_, op, "no log here (run 'uvirtio-pmlog BDF init')");
  if (h.version.get() != kVersion)
    return Error(Errc::unsupported, device_, op, "log version " + std::to_string(h.version.get()));
  const std::uint64_t end = h.committed_end.get();
  if (h.capacity.get() != range_.size())
    return Error(Errc::bad_device_data, device_, op,
                 "corrupt header: capacity " + std::to_string(h.capacity.get()) + ", the range is " +
                     std::to_string(range_.size()) + " bytes");
  if (end < kDataStart || end > range_.size() || end % 8 != 0)
    return Error(Errc::bad_device_data, device_, op,
                 "corrupt header: committed_end " + std::to_string(end) + " outside [4096, " +
                     std::to_string(range_.size()) + "] or not 8-byte aligned");
  return end;
}

Result<std::vector<Record>> Log::records() {
  const char* op = "verify";
  open_ = false;
  UV_TRY(const std::uint64_t end, read_header(op));
  std::vector<Record> out;
  std::uint64_t off = kDataStart;
  while (off < end) {
    const std::string where = "record at offset " + std::to_string(off);
    if (end - off < sizeof(RecordHeader))
      return Error(Errc::bad_device_data, device_, op, where + ": truncated header (torn)");
    RecordHeader rh;
    std::memcpy(&rh, range_.data() + off, sizeof rh);
    if (rh.magic.get() != kRecordMagic)
      return Error(Errc::bad_device_data, device_, op, where + ": bad magic (torn)");
    const std::uint32_t len = rh.len.get();
    if (len > kMaxPayload)
      return Error(Errc::bad_device_data, device_, op,
                   where + ": length " + std::to_string(len) + ", more than a record holds (" +
                       std::to_string(kMaxPayload) + ")");
    if (len > end - off - sizeof rh)
      return Error(Errc::bad_device_data, device_, op, where + ": length runs past the commit point");
    const std::uint64_t want = out.size() + 1;
    if (rh.seq.get() != want)
      return Error(Errc::bad_device_data, device_, op,
                   where + ": sequence " + std::to_string(rh.seq.get()) + ", expected " +
                       std::to_string(want) + " (reordered)");
    // Checksum the copy we return, not the range a second time.
    Record r{off, want, std::string(len, '\0')};
    if (len > 0) std::memcpy(r.payload.data(), range_.data() + off + sizeof rh, len);
    if (rh.crc.get() != record_crc(want, len, reinterpret_cast<const std::uint8_t*>(r.payload.data())))
      return Error(Errc::bad_device_data, device_, op, where + ": checksum mismatch (torn)");
    out.push_back(std::move(r));
    off = align8(off + sizeof rh + len);
  }
  if (off != end)
    return Error(Errc::bad_device_data, device_, op,
                 "records end at " + std::to_string(off) + ", commit point is " + std::to_string(end));
  end_ = end;
  count_ = out.size();
  open_ = true;
  return out;
}

Result<std::uint64_t> Log::append(std::span<const std::uint8_t> payload) {
  const char* op = "append";
  if (!open_)
    return Error(Errc::invalid_argument, device_, op, "the log was not checked first (init() or records())");
  if (payload.size() > kMaxPayload)
    return Error(Errc::invalid_argument, device_, op,
                 "record of " + std::to_string(payload.size()) + " bytes, larger than 1 MiB");
  // We are the only writer: if the header no longer says where we left the
  // log, someone else wrote it, and writing on would corrupt their records.
  UV_TRY(const std::uint64_t end, read_header(op));
  if (end != end_)
    return Error(Errc::busy, device_, op,
                 "the commit point moved from " + std::to_string(end_) + " to " + std::to_string(end) +
                     " under us (another writer?)");
  const std::uint64_t seq = count_ + 1;
  const auto len = static_cast<std::uint32_t>(payload.size());
  const std::uint64_t next = align8(end_ + sizeof(RecordHeader) + len);  // end_ <= size: no overflow
  if (next > range_.size()) return Error(Errc::busy, device_, op, "the log is full");
  std::uint8_t* at = range_.data() + end_;
  RecordHeader rh{};
  rh.magic.set(kRecordMagic);
  rh.len.set(len);
  rh.seq.set(seq);
  rh.crc.set(record_crc(seq, len, payload.data()));
  std::memcpy(at, &rh, sizeof rh);
  if (len > 0) std::memcpy(at + sizeof rh, payload.data(), len);
  // 1. The record is durable before it becomes visible.
  UV_TRY_VOID(persist_(at, sizeof rh + len));
  // 2. Commit with one atomic 8-byte store, then make it durable.
  auto* hdr = reinterpret_cast<Header*>(range_.data());
  std::atomic_ref<std::uint64_t>(hdr->committed_end.raw())
      .store(le64::to_raw(next), std::memory_order_release);
  // From here the record is part of the log whatever the persist says (a
  // failed persist leaves its durability unknown, as a failed fsync does;
  // the next successful flush covers it).
  end_ = next;
  count_ = seq;
  UV_TRY_VOID(persist_(&hdr->committed_end, sizeof(le64)));
  return seq;
}

bool is_utf8(std::string_view s) {
  // Hand-written: glibc's only validator is iconv, whose buffer interface
  // costs more code than this; the table is RFC 3629's, section 4.
  std::size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<unsigned char>(s[i]);
    std::size_t n;
    unsigned char lo = 0x80, hi = 0xbf;  // bounds of the second byte
    if (b < 0x80) {
      ++i;
      continue;
    } else if (b >= 0xc2 && b <= 0xdf) {
      n = 1;
    } else if (b >= 0xe0 && b <= 0xef) {
      n = 2;
      if (b == 0xe0) lo = 0xa0;  // overlong
      if (b == 0xed) hi = 0x9f;  // surrogates
    } else if (b >= 0xf0 && b <= 0xf4) {
      n = 3;
      if (b == 0xf0) lo = 0x90;  // overlong
      if (b == 0xf4) hi = 0x8f;  // above U+10FFFF
    } else {
      return false;
    }
    if (s.size() - i <= n) return false;
    for (std::size_t k = 1; k <= n; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      if (k == 1 ? (c < lo || c > hi) : (c < 0x80 || c > 0xbf)) return false;
    }
    i += n + 1;
  }
  return true;
}

std::string printable(std::string_view s) {
  const bool utf8 = is_utf8(s);
  // In UTF-8 the C1 controls U+0080..U+009F are 0xc2 0x80..0x9f (0xc2 is
  // only ever a lead byte); terminals obey them too (U+009B is CSI).
  const auto c1_at = [&](std::size_t i) {
    return utf8 && i + 1 < s.size() && static_cast<unsigned char>(s[i]) == 0xc2 &&
           static_cast<unsigned char>(s[i + 1]) <= 0x9f;
  };
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    const auto b = static_cast<unsigned char>(s[i]);
    if (b == '\\') {
      out += "\\\\";
    } else if (b < 0x20 || b == 0x7f || (b >= 0x80 && !utf8) || c1_at(i) || (i > 0 && c1_at(i - 1))) {
      out += "\\x";
      out += kHex[b >> 4];
      out += kHex[b & 15];
    } else {
      out += s[i];
    }
  }
  return out;
}

std::string to_hex(std::string_view s) {
  std::string out;
  out.reserve(2 * s.size());
  for (const char ch : s) {
    const auto b = static_cast<unsigned char>(ch);
    out += kHex[b >> 4];
    out += kHex[b & 15];
  }
  return out;
}

}  // namespace uvirtio::apps::pmlog
