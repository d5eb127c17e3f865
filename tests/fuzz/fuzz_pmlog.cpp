// libFuzzer target: uvirtio-pmlog's log format over a hostile pmem range.
//
// The range is a heap block of exactly its size, so any access outside it is
// caught by ASan. Checks: records() either fails with an error naming the
// device, or returns records in order, 8-byte aligned, inside the commit
// point, numbered from 1; after it, appending and reading back gives the same
// records plus the new one; an append that fails (bad header, a commit point
// moved by the "host", a full log) leaves every byte of the range as it was;
// the printing helpers hold on every payload and on the raw input (is_utf8
// agrees with nlohmann::json's own check; printable() leaves no byte a
// terminal would obey, C1 controls included; to_hex loses nothing).
//
// Input: byte 0: bit 0 force a valid header (magic, version, capacity),
// bit 1 set committed_end from the next two bytes, bits 2-4 the range size
// (4096 + 512 * (1 + n)); then 32 bytes of header; then, when bit 5 of byte
// 0 is set, an 8-byte offset and value written into the range between
// records() and the first append (the host changing the file); then two
// payload lengths; the rest is copied to the range from offset 4096.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "fuzz_input.hpp"
#include "pmlog_format.hpp"

namespace {

using uvirtio::Errc;
using uvirtio::Result;
using uvirtio::fuzz::Area;
using uvirtio::fuzz::Reader;
using namespace uvirtio::apps::pmlog;

constexpr const char* kDevice = "0000:00:05.0";

void put64(std::uint8_t* p, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

// The printing helpers on bytes from the range: the UTF-8 check agrees with
// nlohmann::json's strict dump, and printable() leaves nothing a terminal
// would obey (nor, for text that is not UTF-8, any byte from 0x80).
void check_printing(const std::string& p) {
  bool strict_ok = true;
  try {
    (void)nlohmann::json(p).dump();
  } catch (const nlohmann::json::type_error&) {
    strict_ok = false;
  }
  const bool utf8 = is_utf8(p);
  CHECK(utf8 == strict_ok);
  const std::string shown = printable(p);
  for (std::size_t i = 0; i < shown.size(); ++i) {
    const auto b = static_cast<unsigned char>(shown[i]);
    CHECK(b >= 0x20 && b != 0x7f && (utf8 || b < 0x80));
    // nor a C1 control (U+0080..U+009F, which is 0xc2 0x80..0x9f)
    CHECK(!(b == 0xc2 && i + 1 < shown.size() && static_cast<unsigned char>(shown[i + 1]) <= 0x9f));
  }
  CHECK(to_hex(p).size() == 2 * p.size());
}

void check_records(const std::vector<Record>& rs, std::size_t size) {
  std::uint64_t prev_end = kDataStart;
  for (std::size_t i = 0; i < rs.size(); ++i) {
    CHECK(rs[i].seq == i + 1);
    CHECK(rs[i].offset == prev_end);
    CHECK(rs[i].offset % 8 == 0);
    CHECK(rs[i].payload.size() <= kMaxPayload);
    const std::uint64_t end = rs[i].offset + kRecordHeaderBytes + rs[i].payload.size();
    CHECK(end <= size);
    prev_end = (end + 7) & ~std::uint64_t{7};
    check_printing(rs[i].payload);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  const std::uint8_t flags = in.u8();
  const std::size_t bytes = kDataStart + 512 * (1 + ((flags >> 2) & 7));
  Area range(bytes);
  const bool force_end = flags & 2;
  const std::uint16_t end_sel = force_end ? in.u16() : 0;
  for (std::size_t i = 0; i < 32; ++i) range.p[i] = in.u8();
  const bool host_write = flags & 0x20;
  const std::uint64_t poke_off = host_write ? in.u64() : 0, poke_val = host_write ? in.u64() : 0;
  const std::size_t len1 = in.u8(), len2 = static_cast<std::size_t>(in.u16()) % 2048;
  for (std::size_t i = kDataStart; i < bytes && !in.empty(); ++i) range.p[i] = in.u8();
  if (flags & 1) {
    std::memcpy(range.p, "UVPMLOG1", 8);
    put64(range.p + 8, 1);  // le32 version 1, le32 reserved 0
    put64(range.p + 16, bytes);
  }
  if (force_end) put64(range.p + 24, kDataStart + 8 * (end_sel % ((bytes - kDataStart) / 8 + 1)));

  int persists = 0;
  auto persist = [&](const void* addr, std::size_t len) -> Result<void> {
    const auto* a = static_cast<const std::uint8_t*>(addr);
    CHECK(a >= range.p && len <= bytes && static_cast<std::size_t>(a - range.p) <= bytes - len);
    ++persists;
    return uvirtio::ok();
  };
  // The whole input as a payload of its own, so the printing checks see
  // arbitrary bytes even when the range holds no valid record.
  check_printing(std::string(reinterpret_cast<const char*>(data), size));
  Log log({range.p, bytes}, kDevice, persist);
  auto rs = log.records();
  if (!rs) {
    CHECK(rs.error().message().find(kDevice) != std::string::npos);
    const auto before = range.bytes();
    CHECK(!log.append({}));  // a log that failed its check takes no appends
    CHECK(range.bytes() == before && persists == 0);
    return 0;
  }
  check_records(*rs, bytes);

  if (host_write) {
    const std::uint64_t at = poke_off % (bytes - 7);
    std::memcpy(range.p + at, &poke_val, 8);
  }
  const std::vector<std::uint8_t> before = range.bytes();
  const std::string p1(len1, 'a'), p2(len2, 'b');
  auto s1 = log.append({reinterpret_cast<const std::uint8_t*>(p1.data()), p1.size()});
  if (!s1) {
    const Errc c = s1.error().code();
    CHECK(c == Errc::busy || c == Errc::bad_device_data || c == Errc::invalid_argument ||
          c == Errc::unsupported);
    CHECK(s1.error().message().find(kDevice) != std::string::npos);
    CHECK(range.bytes() == before && persists == 0);
    return 0;
  }
  CHECK(*s1 == rs->size() + 1 && persists == 2);
  auto s2 = log.append({reinterpret_cast<const std::uint8_t*>(p2.data()), p2.size()});
  if (s2) CHECK(*s2 == rs->size() + 2);
  if (host_write) return 0;  // the poke may have hit a record we read back
  Log again({range.p, bytes}, kDevice, persist);
  auto after = again.records();
  CHECK(after);
  check_records(*after, bytes);
  CHECK(after->size() == rs->size() + (s2 ? 2 : 1));
  CHECK(std::equal(rs->begin(), rs->end(), after->begin(), [](const Record& x, const Record& y) {
    return x.offset == y.offset && x.payload == y.payload;
  }));
  CHECK((*after)[rs->size()].payload == p1);
  if (s2) CHECK(after->back().payload == p2);
  return 0;
}
