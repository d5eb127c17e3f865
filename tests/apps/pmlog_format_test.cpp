// uvirtio-pmlog's on-media format over plain memory: round trip, the order
// of persists, crashes at every persist point, and a hostile range.
#include "pmlog_format.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace uvirtio::apps::pmlog {
namespace {

std::span<const std::uint8_t> bytes(const std::string& s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

// A range plus the image a power cut would leave: only persisted bytes reach
// `durable`. Every persist call is logged.
struct Media {
  explicit Media(std::size_t n) : live(n, 0), durable(n, 0) {}
  std::vector<std::uint8_t> live, durable;
  struct Call {
    std::size_t off, len;
  };
  std::vector<Call> calls;
  int fail_at = -1;                  // the index of a persist call that fails
  std::function<void()> at_persist;  // called before and after the bytes reach `durable`

  PersistFn persist() {
    return [this](const void* addr, std::size_t len) -> Result<void> {
      const auto off = static_cast<std::size_t>(static_cast<const std::uint8_t*>(addr) - live.data());
      if (off > live.size() || len > live.size() - off) ADD_FAILURE() << "persist outside the range";
      calls.push_back({off, len});
      if (static_cast<int>(calls.size()) - 1 == fail_at)
        return Error(Errc::device_error, "test pmem", "flush", "the host's fsync failed");
      if (at_persist) at_persist();
      std::memcpy(durable.data() + off, live.data() + off, len);
      if (at_persist) at_persist();
      return ok();
    };
  }
  std::span<std::uint8_t> span() { return live; }
};

std::vector<std::string> payloads_of(const std::vector<Record>& rs) {
  std::vector<std::string> out;
  for (const auto& r : rs) out.push_back(r.payload);
  return out;
}

TEST(PmlogFormat, AppendsAndReadsBack) {
  Media m(64 * 1024);
  Log log(m.span(), "test pmem", m.persist());
  ASSERT_TRUE(log.init());
  const std::vector<std::string> want = {"first", "", "a longer record of 33 bytes......",
                                         std::string(1000, 'x')};
  for (std::size_t i = 0; i < want.size(); ++i) {
    auto seq = log.append(bytes(want[i]));
    ASSERT_TRUE(seq) << seq.error().message();
    EXPECT_EQ(*seq, i + 1);
  }
  Log again(m.span(), "test pmem", m.persist());
  auto rs = again.records();
  ASSERT_TRUE(rs) << rs.error().message();
  EXPECT_EQ(payloads_of(*rs), want);
  EXPECT_EQ((*rs)[0].offset, kDataStart);
  for (std::size_t i = 0; i < rs->size(); ++i) {
    EXPECT_EQ((*rs)[i].seq, i + 1);
    EXPECT_EQ((*rs)[i].offset % 8, 0u);
  }
  // The reopened log continues the sequence.
  auto seq = again.append(bytes("fifth"));
  ASSERT_TRUE(seq);
  EXPECT_EQ(*seq, 5u);
}

TEST(PmlogFormat, RecordIsDurableBeforeItsCommitMarker) {
  Media m(16 * 1024);
  Log log(m.span(), "test pmem", m.persist());
  ASSERT_TRUE(log.init());
  m.calls.clear();
  ASSERT_TRUE(log.append(bytes("payload")));
  // Two persists: the record (header + payload) at the old commit point, then
  // the 8-byte commit word in the header.
  ASSERT_EQ(m.calls.size(), 2u);
  EXPECT_EQ(m.calls[0].off, kDataStart);
  EXPECT_EQ(m.calls[0].len, kRecordHeaderBytes + 7);
  EXPECT_EQ(m.calls[1].off, 24u);
  EXPECT_EQ(m.calls[1].len, 8u);
}

// Power cut just before and just after every persist call, and with any subset of the bytes
// written but not persisted reaching the media: the image must always read
// back as a prefix of what was appended, holding every acknowledged record.
TEST(PmlogFormat, EveryCrashPointLeavesAValidPrefix) {
  Media m(32 * 1024);
  Log log(m.span(), "test pmem", m.persist());
  ASSERT_TRUE(log.init());
  std::vector<std::string> appended;
  std::size_t acked = 0;
  std::mt19937 rng(7);
  int crash_points = 0;
  m.at_persist = [&] {
    for (int variant = 0; variant < 4; ++variant) {
      std::vector<std::uint8_t> image = m.durable;
      if (variant > 0)  // some 8-byte words written but not yet persisted land too
        for (std::size_t w = 0; w + 8 <= image.size(); w += 8)
          if (std::memcmp(&image[w], &m.live[w], 8) != 0 && rng() % 2 == 0)
            std::memcpy(&image[w], &m.live[w], 8);
      Log after(image, "crashed pmem", [](const void*, std::size_t) { return Result<void>(ok()); });
      auto rs = after.records();
      ASSERT_TRUE(rs) << rs.error().message();
      ASSERT_GE(rs->size(), acked);
      ASSERT_LE(rs->size(), appended.size());
      for (std::size_t i = 0; i < rs->size(); ++i) ASSERT_EQ((*rs)[i].payload, appended[i]);
      ++crash_points;
    }
  };
  for (int i = 0; i < 40; ++i) {
    appended.push_back("record " + std::to_string(i) +
                       std::string(static_cast<std::size_t>(i * 7 % 50), '.'));
    ASSERT_TRUE(log.append(bytes(appended.back())));
    acked = appended.size();
  }
  EXPECT_EQ(crash_points, 40 * 2 * 2 * 4);  // appends x persists x before/after x variants
}

// Damage of each kind is reported naming the device, the operation and
// what is wrong, and the first bad record.
TEST(PmlogFormat, DamageIsReportedNotFollowed) {
  Media m(16 * 1024);
  Log log(m.span(), "0000:01:00.0", m.persist());
  ASSERT_TRUE(log.init());
  ASSERT_TRUE(log.append(bytes("one")));
  ASSERT_TRUE(log.append(bytes("two")));
  const std::vector<std::uint8_t> good = m.live;
  const std::uint64_t second = kDataStart + 32;  // 24-byte header + 3 bytes, aligned to 8

  struct Case {
    const char* what;
    std::size_t off;
    std::vector<std::uint8_t> bytes;
    const char* expect;
  };
  const std::vector<Case> cases = {
      {"magic", 0, {'X'}, "no log here"},
      {"version", 8, {2}, "log version 2"},
      {"capacity", 16, {0, 0x10}, "capacity"},
      {"commit point past the end", 24, {0, 0, 1}, "committed_end"},
      {"commit point misaligned", 24, {0x44}, "not 8-byte aligned"},
      {"commit point inside the header", 24, {0, 0}, "committed_end"},
      {"record magic", second, {0}, "offset 4128: bad magic"},
      {"record length", second + 4, {0xff, 0xff}, "offset 4128: length runs past"},
      {"record sequence", second + 8, {9}, "sequence 9, expected 2"},
      {"record checksum", second + 16, {0x5a}, "offset 4128: checksum mismatch"},
      {"payload", second + 24, {'T'}, "checksum mismatch"},
      {"commit point inside a record", 24, {0x30, 0x10}, "offset 4128: truncated header"},
  };
  for (const auto& c : cases) {
    m.live = good;
    std::memcpy(m.live.data() + c.off, c.bytes.data(), c.bytes.size());
    const std::vector<std::uint8_t> before = m.live;
    Log bad(m.span(), "0000:01:00.0", m.persist());
    auto rs = bad.records();
    ASSERT_FALSE(rs) << c.what;
    const std::string msg = rs.error().message();
    EXPECT_NE(msg.find("0000:01:00.0"), std::string::npos) << c.what << ": " << msg;
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.what << ": " << msg;
    // Nothing is written after a failed check.
    EXPECT_FALSE(bad.append(bytes("more"))) << c.what;
    EXPECT_EQ(m.live, before) << c.what;
  }
}

TEST(PmlogFormat, AppendRefusesWhenTheHeaderMovedUnderIt) {
  Media m(16 * 1024);
  Log log(m.span(), "test pmem", m.persist());
  ASSERT_TRUE(log.init());
  ASSERT_TRUE(log.append(bytes("one")));
  // Someone else commits a record behind our back.
  Log other(m.span(), "test pmem", m.persist());
  ASSERT_TRUE(other.records());
  ASSERT_TRUE(other.append(bytes("theirs")));
  const auto before = m.live;
  auto r = log.append(bytes("ours"));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), Errc::busy);
  EXPECT_NE(r.error().message().find("commit point moved"), std::string::npos) << r.error().message();
  EXPECT_EQ(m.live, before);
  // A hostile commit point past the range is refused too, nothing written.
  m.live[24 + 2] = 0x7f;
  const auto hostile = m.live;
  r = log.append(bytes("ours"));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), Errc::bad_device_data);
  EXPECT_EQ(m.live, hostile);
}

TEST(PmlogFormat, BadUseAndFullLogWriteNothing) {
  Media m(8192);
  Log log(m.span(), "test pmem", m.persist());
  auto r = log.append(bytes("x"));
  ASSERT_FALSE(r);  // neither init() nor records() yet
  EXPECT_NE(r.error().message().find("not checked first"), std::string::npos);
  EXPECT_TRUE(std::all_of(m.live.begin(), m.live.end(), [](std::uint8_t b) { return b == 0; }));

  ASSERT_TRUE(log.init());
  const std::string big(kMaxPayload + 1, 'b');
  EXPECT_EQ(log.append(bytes(big)).error().code(), Errc::invalid_argument);
  const std::string fits(4096 - kRecordHeaderBytes, 'f');
  ASSERT_TRUE(log.append(bytes(fits)));
  const auto before = m.live;
  r = log.append(bytes("x"));
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("full"), std::string::npos);
  EXPECT_EQ(m.live, before);

  std::vector<std::uint8_t> tiny(4000);
  Log small(tiny, "test pmem", m.persist());
  EXPECT_EQ(small.init().error().code(), Errc::invalid_argument);
  EXPECT_EQ(small.records().error().code(), Errc::invalid_argument);
}

TEST(PmlogFormat, FailedPersistIsReported) {
  Media m(16 * 1024);
  Log log(m.span(), "test pmem", m.persist());
  ASSERT_TRUE(log.init());
  m.fail_at = static_cast<int>(m.calls.size());  // the record's persist
  auto r = log.append(bytes("lost"));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), Errc::device_error);
  // Not committed: the log still reads as empty, and the next append reuses the place.
  Log again(m.span(), "test pmem", m.persist());
  auto rs = again.records();
  ASSERT_TRUE(rs);
  EXPECT_TRUE(rs->empty());
  m.fail_at = -1;
  ASSERT_TRUE(log.append(bytes("kept")));
  rs = again.records();
  ASSERT_TRUE(rs);
  EXPECT_EQ(payloads_of(*rs), std::vector<std::string>{"kept"});
}

// An empty payload handed over as an empty span has no buffer (data() is
// null), and zlib's crc32() answers 0 for a null buffer instead of the CRC so
// far: the acknowledged record failed its checksum on every later read,
// which made the whole log unreadable and refused further appends.
TEST(PmlogFormat, EmptyPayloadWithoutABufferReadsBack) {
  Media m(16 * 1024);
  Log log(m.span(), "test pmem", m.persist());
  ASSERT_TRUE(log.init());
  ASSERT_TRUE(log.append(bytes("one")));
  auto seq = log.append(std::span<const std::uint8_t>{});
  ASSERT_TRUE(seq) << seq.error().message();
  EXPECT_EQ(*seq, 2u);
  Log again(m.span(), "test pmem", m.persist());
  auto rs = again.records();
  ASSERT_TRUE(rs) << rs.error().message();
  EXPECT_EQ(payloads_of(*rs), (std::vector<std::string>{"one", ""}));
  ASSERT_TRUE(again.append(bytes("three")));
}

// The commit is one 8-byte store that is atomic only when aligned: a range
// that does not start 8-byte aligned is refused (it was used, with a
// misaligned atomic store, which is undefined and can tear across a crash).
TEST(PmlogFormat, MisalignedRangeIsRefused) {
  std::vector<std::uint64_t> words(16 * 1024 / 8 + 1, 0);
  const std::span<std::uint8_t> range(reinterpret_cast<std::uint8_t*>(words.data()) + 4, 16 * 1024);
  Log log(range, "test pmem", [](const void*, std::size_t) { return Result<void>(ok()); });
  auto r = log.init();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_NE(r.error().message().find("test pmem"), std::string::npos) << r.error().message();
  EXPECT_NE(r.error().message().find("8-byte aligned"), std::string::npos) << r.error().message();
  EXPECT_FALSE(log.records());
  EXPECT_FALSE(log.append(bytes("x")));
}

// A record longer than any append writes, inside the commit point of a big
// log, is called what it is (it used to be "runs past the commit point").
TEST(PmlogFormat, OversizedRecordIsReportedAsSuch) {
  Media m(4 * 1024 * 1024);
  Log log(m.span(), "0000:01:00.0", m.persist());
  ASSERT_TRUE(log.init());
  ASSERT_TRUE(log.append(bytes(std::string(kMaxPayload, 'p'))));
  const std::uint32_t big = kMaxPayload + 8;
  std::memcpy(m.live.data() + kDataStart + 4, &big, 4);  // le32 len (the host is little-endian)
  const std::uint64_t end = kDataStart + kRecordHeaderBytes + big;
  std::memcpy(m.live.data() + 24, &end, 8);
  Log bad(m.span(), "0000:01:00.0", m.persist());
  auto rs = bad.records();
  ASSERT_FALSE(rs);
  const std::string msg = rs.error().message();
  EXPECT_NE(msg.find("offset 4096: length 1048584, more than a record holds (1048576)"), std::string::npos)
      << msg;
}

TEST(PmlogFormat, Utf8Validation) {
  EXPECT_TRUE(is_utf8(""));
  EXPECT_TRUE(is_utf8("plain ascii\n"));
  EXPECT_TRUE(is_utf8("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"));  // e-acute, euro, emoji
  EXPECT_TRUE(is_utf8("\xf4\x8f\xbf\xbf"));                           // U+10FFFF
  EXPECT_FALSE(is_utf8("\xff"));
  EXPECT_FALSE(is_utf8("\xc3"));              // truncated
  EXPECT_FALSE(is_utf8("\xc0\xaf"));          // overlong '/'
  EXPECT_FALSE(is_utf8("\xe0\x80\xaf"));      // overlong, 3 bytes
  EXPECT_FALSE(is_utf8("\xed\xa0\x80"));      // surrogate U+D800
  EXPECT_FALSE(is_utf8("\xf4\x90\x80\x80"));  // above U+10FFFF
  EXPECT_FALSE(is_utf8("\xe2\x82"));          // truncated at the end
  EXPECT_FALSE(
      is_utf8("a\x80"
              "b"));  // lone continuation byte
}

TEST(PmlogFormat, PrintableEscapesWhatATerminalWouldObey) {
  EXPECT_EQ(printable("hello"), "hello");
  EXPECT_EQ(printable(std::string("a\0b", 3)), "a\\x00b");
  EXPECT_EQ(printable("\x1b[2Jx\ty\\z\x7f"), "\\x1b[2Jx\\x09y\\\\z\\x7f");
  EXPECT_EQ(printable("caf\xc3\xa9"), "caf\xc3\xa9");             // valid UTF-8 stays text
  EXPECT_EQ(printable("caf\xc3\xa9\xff"), "caf\\xc3\\xa9\\xff");  // otherwise every high byte is escaped
  EXPECT_EQ(to_hex(std::string("x\xff\x1b\0", 4)), "78ff1b00");
  // C1 controls (U+0080..U+009F) are controls too: U+009B is CSI, which the
  // Linux console and xterm obey in UTF-8, so "\xc2\x9b2J" clears the screen.
  EXPECT_EQ(printable("a\xc2\x9b"
                      "2Jb"),
            "a\\xc2\\x9b2Jb");
  EXPECT_EQ(printable("\xc2\x85\xc2\x80\xc2\x9f\xc2\xa0"), "\\xc2\\x85\\xc2\\x80\\xc2\\x9f\xc2\xa0");
}

}  // namespace
}  // namespace uvirtio::apps::pmlog
