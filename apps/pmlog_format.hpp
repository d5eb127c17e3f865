// The on-media format of uvirtio-pmlog's crash-consistent append-only log,
// apart from the device so that it can be unit-tested and fuzzed over plain
// memory.
//
// Layout of the range (all little-endian):
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
// start, so a record's seq must equal its position.
//
// The range is device memory backed by a host file: the host (or another
// guest process) may change any byte at any time. So every value is copied
// out of the range once and checked before it is used, a payload is
// checksummed in the copy that is returned, and append() writes only where
// its own bookkeeping says the log ends, after checking that the header
// still agrees.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "uvirtio/base/result.hpp"

namespace uvirtio::apps::pmlog {

inline constexpr std::uint64_t kDataStart = 4096;
inline constexpr std::uint32_t kMaxPayload = 1u << 20;
inline constexpr std::uint64_t kRecordHeaderBytes = 24;

struct Record {
  std::uint64_t offset = 0;
  std::uint64_t seq = 0;
  std::string payload;
};

// Makes [addr, addr + len) of the range durable (Pmem::persist on a device).
using PersistFn = std::function<Result<void>(const void* addr, std::size_t len)>;

class Log {
 public:
  // `range`: the whole pmem range, 8-byte aligned (the commit store is an
  // atomic 8-byte store); `device` names it in errors.
  Log(std::span<std::uint8_t> range, std::string device, PersistFn persist);

  // Formats an empty log (the magic is written and persisted last).
  Result<void> init();

  // Checks the header and every committed record (magic, length, sequence,
  // checksum, nothing past the commit point) and returns them; the error
  // names the first bad one. After it, append() continues the log.
  Result<std::vector<Record>> records();

  // Appends one record and returns its sequence number once it is durable.
  // Needs init() or records() first.
  Result<std::uint64_t> append(std::span<const std::uint8_t> payload);

 private:
  Result<std::uint64_t> read_header(const char* op) const;  // the checked commit point

  std::span<std::uint8_t> range_;
  std::string device_;
  PersistFn persist_;
  bool open_ = false;      // init() or records() succeeded
  std::uint64_t end_ = 0;  // our commit point
  std::uint64_t count_ = 0;
};

// Payloads are bytes (the host or any writer may have put anything there).
// For printing: whether they are valid UTF-8 (RFC 3629: no overlong forms,
// no surrogates, nothing above U+10FFFF); the text with control characters
// (C0, DEL and the C1 controls U+0080..U+009F, byte by byte) and backslashes
// escaped as \xNN and \\ (and, when it is not valid UTF-8,
// every byte from 0x80 too), so a terminal shows it without obeying it; and
// lowercase hex, which loses nothing.
bool is_utf8(std::string_view s);
std::string printable(std::string_view s);
std::string to_hex(std::string_view s);

}  // namespace uvirtio::apps::pmlog
