// Channel: a message channel between two parties sharing one memory window
// (ivshmem BAR2 between two VMs, a memfd between two processes), plus an
// optional doorbell to wake a sleeping peer. Layout and protocol: doc/channel.md.
//
// The window holds a header, one control line per side, and one ring per
// direction: side s produces ring s and consumes ring 1-s. Records in a ring
// are an 8-byte header (length, kind, lap tag) and the payload padded to 8
// bytes; a message never straddles the ring's end (a padding record fills
// the tail). Producer and consumer positions are free-running 64-bit byte
// counters. A record is there when its header carries the tag of the lap
// the consumer is in: the consumer polls the next header, not an index.
//
// The peer is not trusted. Everything it writes (header fields at attach,
// its indices, record headers) is validated before we use it; a violation
// latches the channel broken with Errc::bad_device_data naming what was
// wrong, and every later call fails with Errc::broken. No value read from
// the window can make us read or write outside it or loop without bound.
// Payload bytes are the peer's: a borrowed message (try_peek) can change
// under the reader, so read each byte once or copy it (recv) first.
//
// Usage (side 1 mirrors side 0):
//   uvirtio::channel::Options o;
//   o.side = 0;
//   o.doorbell = &bell;                                    // or nullptr: poll
//   UV_TRY(auto ch, uvirtio::channel::Channel::attach(mem, len, o));
//   UV_TRY_VOID(ch->wait_peer(std::chrono::seconds(10)));
//   UV_TRY_VOID(ch->send(msg, std::chrono::seconds(1)));
//   UV_TRY(std::size_t n, ch->recv(buf, std::chrono::seconds(1)));
//
// Threading: one thread may send while another receives (the two
// directions share no mutable state but the liveness tracker, which is
// locked); two threads must not send, or receive, at the same time.
// heartbeat() and peer_present() may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>

#include "uvirtio/base/barrier.hpp"
#include "uvirtio/base/le.hpp"
#include "uvirtio/base/result.hpp"

namespace uvirtio::channel {

// What wakes the peer and what we sleep on. The ivshmem driver implements
// it with its Doorbell register and MSI-X eventfds; pci::EventfdDoorbell
// with a pair of eventfds between two processes.
class Doorbell {
 public:
  virtual ~Doorbell() = default;
  // Notifies the peer whose doorbell address is `peer_id` (it publishes it
  // in the window; a transport with a fixed peer may ignore it).
  virtual Result<void> ring(std::uint32_t peer_id) = 0;
  // Sleeps until notified (true, the notification is consumed) or until
  // `timeout` passes (false). Spurious true returns are allowed.
  virtual Result<bool> wait(std::chrono::nanoseconds timeout) = 0;
};

// Window layout, version 2. All fields little-endian, offsets from the
// window's start (which must be 64-byte aligned).
namespace layout {

inline constexpr std::uint64_t kMagic = 0x322d6e6168637675;  // "uvchan-2"
inline constexpr std::uint32_t kVersion = 2;

// Written once by the formatter (side 0), magic last.
struct Header {
  le64 magic;
  le32 version;
  le32 header_bytes;  // sizeof(Header)
  le64 window_bytes;  // <= the mapping each side has
  le32 max_message;   // largest payload, <= capacity/2 - 8 of each ring
  le32 flags;         // 0 in version 2
  struct Ring {
    le64 offset;    // of the data area: 64-aligned, past the control area
    le64 capacity;  // bytes, a power of two >= 64
  } ring[2];        // ring s carries side s -> side 1-s
};
static_assert(sizeof(Header) == 64);
static_assert(offsetof(Header, magic) == 0 && offsetof(Header, version) == 8 &&
              offsetof(Header, header_bytes) == 12 && offsetof(Header, window_bytes) == 16 &&
              offsetof(Header, max_message) == 24 && offsetof(Header, flags) == 28 &&
              offsetof(Header, ring) == 32 && sizeof(Header::Ring) == 16);

// One cache line per side, written only by that side.
struct SideLine {
  le64 session;      // nonzero while attached, new on every attach
  le64 heartbeat;    // bumped every peer_timeout/4 while alive
  le32 doorbell_id;  // the address the peer passes to Doorbell::ring()
  le32 recv_ticket;  // nonzero: our consumer sleeps, ring us after publishing
  le32 send_ticket;  // nonzero: our producer sleeps for space, ring us after consuming
  le32 reserved0;
  std::uint8_t reserved[32];
};
static_assert(sizeof(SideLine) == 64);
static_assert(offsetof(SideLine, session) == 0 && offsetof(SideLine, heartbeat) == 8 &&
              offsetof(SideLine, doorbell_id) == 16 && offsetof(SideLine, recv_ticket) == 20 &&
              offsetof(SideLine, send_ticket) == 24);

// A ring index on its own cache line: written by one side, read by the other.
struct IndexLine {
  le64 value;
  std::uint8_t reserved[56];
};
static_assert(sizeof(IndexLine) == 64);

struct Control {
  Header header;
  SideLine side[2];
  struct RingIndices {
    IndexLine producer;  // written by the producing side
    IndexLine consumer;  // written by the consuming side
  } ring[2];
};
static_assert(sizeof(Control) == 448);
static_assert(offsetof(Control, side) == 64 && offsetof(Control, ring) == 192 &&
              sizeof(Control::RingIndices) == 128);

inline constexpr std::size_t kControlBytes = sizeof(Control);
inline constexpr std::size_t kMinCapacity = 64;
inline constexpr std::size_t kMinWindow = kControlBytes + 2 * kMinCapacity;

// Record header, one 64-bit word: bits 0-31 payload length, bits 32-39
// kind, bits 40-63 the lap tag: (position / capacity) mod 2^24 of the
// record's first byte. Kind 0 (a zeroed word) means "no record yet".
inline constexpr std::uint32_t kKindMessage = 1;
inline constexpr std::uint32_t kKindPadding = 2;  // fills the ring's tail; length = bytes to the end - 8
inline constexpr std::size_t kRecordHeader = 8;
inline constexpr unsigned kTagShift = 40;
inline constexpr std::uint64_t kTagMask = (std::uint64_t{1} << 24) - 1;
inline constexpr std::uint64_t record_bytes(std::uint64_t len) noexcept {
  return kRecordHeader + ((len + 7) & ~std::uint64_t{7});
}
// The tag of position `pos` in a ring of 2^cap_shift bytes.
inline constexpr std::uint64_t lap_tag(std::uint64_t pos, unsigned cap_shift) noexcept {
  return (pos >> cap_shift) & kTagMask;
}
inline constexpr std::uint64_t record_word(std::uint32_t len, std::uint32_t kind, std::uint64_t pos,
                                           unsigned cap_shift) noexcept {
  return std::uint64_t{len} | (std::uint64_t{kind & 0xff} << 32) | (lap_tag(pos, cap_shift) << kTagShift);
}
inline constexpr std::uint32_t record_kind(std::uint64_t word) noexcept {
  return static_cast<std::uint32_t>(word >> 32) & 0xff;
}
// The word at position `pos` is a record of pos's lap (of any kind but 0);
// anything else means "nothing there yet".
inline constexpr bool record_here(std::uint64_t word, std::uint64_t pos, unsigned cap_shift) noexcept {
  return record_kind(word) != 0 && (word >> kTagShift) == lap_tag(pos, cap_shift);
}

}  // namespace layout

struct Options {
  unsigned side = 0;              // 0 or 1; side 0 formats a window without a channel magic
  std::uint32_t doorbell_id = 0;  // our address, published in the window for the peer's ring()
  Doorbell* doorbell = nullptr;   // nullptr: polling only (ivshmem-plain); must outlive the channel
  // Blocking calls busy-poll this long before arming the doorbell and sleeping.
  std::chrono::nanoseconds spin{std::chrono::microseconds(50)};
  // The peer's heartbeat unchanged this long (on our clock) => peer gone.
  // Use the same value on both sides: each heartbeats every peer_timeout/4.
  std::chrono::milliseconds peer_timeout{1000};
  bool heartbeat_thread = true;  // else heartbeat() is up to the caller (blocking calls bump it)
  std::string name = "channel";  // the Error device name, e.g. "0000:01:00.0 ivshmem"
  // Side 1 only: how long attach waits for side 0 to format an empty window.
  std::chrono::milliseconds format_wait{0};
  // Side 0, when it formats: data bytes per direction (a power of two >= 64;
  // 0: the largest that fits twice) and the largest message (0: a quarter
  // of that; at most half of it minus 8, so an empty ring always takes one).
  std::size_t ring_bytes = 0;
  std::uint32_t max_message = 0;
};

// Whether commit()/release() publish at once or leave it to a later flush.
enum class Flush { now, later };

class Channel {
 public:
  // Attaches as options.side. A window without the channel magic is
  // formatted by side 0 (side 1 waits up to format_wait, then not_found); a
  // valid header means a rejoin: whatever the peer published before we
  // attach is dropped, then our new session id is published. Fails with
  // invalid_argument (options, window), bad_device_data or unsupported (a
  // header or a peer index that fails validation: nothing is written then).
  static Result<std::unique_ptr<Channel>> attach(void* window, std::size_t size, const Options& options);

  // Detaches: stops the heartbeat, clears our session id (the peer sees us
  // gone at once) and rings the peer if it sleeps.
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  std::size_t max_message() const noexcept { return max_message_; }
  std::size_t ring_bytes() const noexcept { return tx_.cap; }  // data bytes per direction
  unsigned side() const noexcept { return side_; }
  const std::string& name() const noexcept { return name_; }
  bool broken() const noexcept { return broken_.load(std::memory_order_relaxed); }
  // Blocking calls' busy-poll time (0: arm the doorbell at once).
  void set_spin(std::chrono::nanoseconds spin) noexcept {
    spin_ns_.store(spin.count(), std::memory_order_relaxed);
  }

  // --- sending ---
  // Zero-copy send: reserves room for a message of `len` bytes and returns
  // where to write it; nullopt when the ring has no room ("would block": no
  // error object is built on this path). A new try_reserve replaces an
  // uncommitted reservation, also when it returns nullopt or an error (a
  // commit then fails). len > max_message() is invalid_argument.
  Result<std::optional<std::span<std::byte>>> try_reserve(std::size_t len);
  // Makes the reserved message `len` (<= reserved) bytes long and commits
  // it. Flush::now publishes everything committed and rings the peer if it
  // sleeps (the message is published even if ringing fails); with
  // Flush::later the message becomes visible at the next flush_sent(), the
  // next Flush::now commit, or when a reserve finds the ring full.
  Result<void> commit(std::size_t len, Flush flush = Flush::now);
  Result<void> flush_sent();
  // Copies and commits msg: false when there is no room.
  Result<bool> try_send(std::span<const std::byte> msg);
  // Waits for room up to `timeout` (spin, then sleep on the doorbell or
  // poll): timeout, peer_gone (peer detached or silent) or broken errors.
  Result<void> send(std::span<const std::byte> msg, std::chrono::nanoseconds timeout);

  // --- receiving ---
  // Zero-copy receive: the next message, left in the ring until release();
  // nullopt when none is there. Peeking again returns the same message.
  Result<std::optional<std::span<const std::byte>>> try_peek();
  // Frees the peeked message's room; Flush::later defers telling the peer
  // until flush_released(), a Flush::now release or a peek finding nothing.
  Result<void> release(Flush flush = Flush::now);
  Result<void> flush_released();
  // Waits up to `timeout` for a message (spin, then arm the doorbell and sleep).
  Result<std::span<const std::byte>> peek(std::chrono::nanoseconds timeout);
  // Receives one message into `out` and releases it; returns its length.
  // invalid_argument (and the message stays) when `out` is too small.
  Result<std::size_t> recv(std::span<std::byte> out, std::chrono::nanoseconds timeout);

  // --- the peer ---
  // The peer is attached and its heartbeat moved within peer_timeout (a
  // peer seen for the first time counts as present until then).
  bool peer_present() const;
  // Waits until peer_present(); timeout error otherwise.
  Result<void> wait_peer(std::chrono::milliseconds timeout);
  std::uint32_t peer_doorbell_id() const noexcept;
  // The peer's session id (0: not attached); it changes when the peer rejoins.
  std::uint64_t peer_session() const noexcept;
  // Bumps our heartbeat (the heartbeat thread and blocking calls do). Also
  // notices another process attaching as our side, which breaks the channel.
  void heartbeat();

 private:
  struct Ring {
    std::byte* data = nullptr;
    std::uint64_t cap = 0;
    std::uint64_t mask = 0;
    unsigned shift = 0;  // log2(cap)
    le64* producer = nullptr;
    le64* consumer = nullptr;
  };
  enum class Wait { data, space };

  Channel() = default;
  // The fast paths above are inline; everything else (refreshing the
  // peer's index, padding, errors, publication) is out of line.
  Result<std::optional<std::span<std::byte>>> reserve_slow(std::size_t len);
  Result<void> commit_slow(std::size_t len, Flush flush);
  // The part of commit() after its checks: writes the record's header (or
  // holds it back as a deferred batch's first) and publishes on Flush::now.
  Result<void> store_record(std::size_t len, Flush flush);
  Result<std::optional<std::span<const std::byte>>> peek_slow();
  Result<void> release_slow(Flush flush);
  Result<void> send_wait(std::span<const std::byte> msg, std::chrono::nanoseconds timeout);
  Result<std::span<const std::byte>> peek_wait(std::chrono::nanoseconds timeout);
  Result<std::size_t> recv_copy(std::span<const std::byte> msg, std::span<std::byte> out);
  Result<void> join(const Options& options);
  // Past the complete records of the current lap that start at `prod` in
  // our own ring (written by an earlier incarnation), bounded by capacity.
  std::uint64_t end_of_records(std::uint64_t prod, std::uint64_t cons) const;
  Error violation(const char* op, std::string cause);
  Error broken_error(const char* op) const;
  Result<bool> refresh_consumer(const char* op);  // re-reads the peer's consumer index
  Result<void> publish_producer();
  // A record published alone (store_record): the peer is likely spinning on
  // it, so its lines go to the shared cache at once (cache_line_demote).
  // Both lines of a record that spans two; the header's line alone did not
  // help. Not for batches: a streaming peer is behind, and the hint costs
  // tens of ns while the record's stores drain.
  void demote_record(std::uint64_t off, std::size_t len) noexcept {
    cache_line_demote(tx_.data + off);
    const std::uint64_t last = off + layout::record_bytes(len) - 1;  // records never wrap
    if ((last >> 6) != (off >> 6)) cache_line_demote(tx_.data + last);
  }
  Result<void> publish_consumer();
  // Rings the peer if `ticket` shows it asleep in a sleep we did not ring for
  // yet: a ticket of the peer's session we last rang (tickets count from 1
  // again in a peer that rejoined, so the ticket alone does not tell).
  Result<void> ring_if_armed(const le32& ticket, std::uint32_t& last_rung, std::uint64_t& last_rung_session,
                             const char* op);
  template <class Ready>
  Result<void> block(const char* op, Wait what, std::chrono::nanoseconds timeout, Ready&& ready);
  // Liveness: empty when present, else why not.
  std::optional<std::string> peer_absence(std::chrono::steady_clock::time_point now) const;
  void maybe_heartbeat(std::chrono::steady_clock::time_point now);
  void heartbeat_loop();

  std::string name_;
  unsigned side_ = 0;
  std::byte* base_ = nullptr;
  layout::SideLine* self_ = nullptr;
  layout::SideLine* peer_ = nullptr;
  Doorbell* doorbell_ = nullptr;
  std::size_t max_message_ = 0;
  std::uint64_t max_record_ = 0;
  std::uint64_t session_ = 0;
  std::chrono::nanoseconds peer_timeout_{};
  std::atomic<std::int64_t> spin_ns_{0};
  std::atomic<bool> broken_{false};
  mutable std::mutex cause_mu_;
  std::string cause_;  // the first violation

  // Sender and receiver state, each on cache lines of its own: a sending
  // and a receiving thread may run side by side.
  struct alignas(64) Tx : Ring {
    std::uint64_t prod = 0;        // next record position (committed or not)
    std::uint64_t published = 0;   // producer index in the window
    std::uint64_t cons_cache = 0;  // the peer's consumer index, as last validated
    std::size_t reserved_len = 0;
    bool reserved = false;
    // Flush::later: the first record of the batch has its header word held
    // back (head_word, for ring offset head_off) until the flush, so the
    // consumer stops there and later takes the batch in one sweep instead
    // of chasing our stores line by line.
    bool batch_open = false;
    std::uint64_t head_off = 0;
    std::uint64_t head_word = 0;
    std::uint32_t last_rung = 0;          // the peer's recv ticket we last rang for
    std::uint64_t last_rung_session = 0;  // ... and the peer's session then
    std::uint32_t ticket = 0;             // our send ticket counter
  } tx_;
  struct alignas(64) Rx : Ring {
    std::uint64_t cons = 0;        // next record position (released or not)
    std::uint64_t published = 0;   // consumer index in the window
    std::uint64_t peek_bytes = 0;  // record bytes of the peeked message (0: none)
    std::span<const std::byte> peeked;
    std::uint32_t last_rung = 0;          // the peer's send ticket we last rang for
    std::uint64_t last_rung_session = 0;  // ... and the peer's session then
    std::uint32_t ticket = 0;             // our recv ticket counter
  } rx_;

  // Liveness tracker: the peer's session and heartbeat as last seen, and
  // when the heartbeat last moved on our clock.
  mutable std::mutex live_mu_;
  mutable std::uint64_t seen_session_ = 0;
  mutable std::uint64_t seen_heartbeat_ = 0;
  mutable std::chrono::steady_clock::time_point seen_change_{};
  std::atomic<std::int64_t> last_beat_ns_{0};

  std::thread hb_thread_;
  std::mutex hb_mu_;
  std::condition_variable hb_cv_;
  bool hb_stop_ = false;
};

// Fast paths: the common case of each data-path call, inline so a loop of
// them compiles to plain loads and stores. Anything unusual (ring full or
// empty as far as our cached copy of the peer's index says, a record that
// needs padding or fails a check, the channel broken, bad arguments) goes
// to the out-of-line slow path, which repeats the whole check.

inline Result<std::optional<std::span<std::byte>>> Channel::try_reserve(std::size_t len) {
  const std::uint64_t rec = layout::record_bytes(len);
  const std::uint64_t off = tx_.prod & tx_.mask;
  if (len <= max_message_ && rec <= tx_.cap - off && rec <= tx_.cap - (tx_.prod - tx_.cons_cache) &&
      !broken()) [[likely]] {
    tx_.reserved = true;
    tx_.reserved_len = len;
    return std::optional<std::span<std::byte>>(std::in_place, tx_.data + off + layout::kRecordHeader, len);
  }
  return reserve_slow(len);
}

inline Result<void> Channel::commit(std::size_t len, Flush flush) {
  if (tx_.reserved && len <= tx_.reserved_len && !broken()) [[likely]]
    return store_record(len, flush);
  return commit_slow(len, flush);
}

inline Result<void> Channel::store_record(std::size_t len, Flush flush) {
  // The payload was written by the caller. Zero the next record's header
  // word when it is ours to write (so the consumer finds "nothing yet"
  // there, never stale bytes), then store this record's header: release,
  // so whoever sees it sees the payload and the zero. The first record of
  // a deferred batch keeps its header back until the flush.
  const std::uint64_t next = tx_.prod + layout::record_bytes(len);
  if (next + layout::kRecordHeader - tx_.cons_cache <= tx_.cap)
    std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(tx_.data + (next & tx_.mask)))
        .store(0, std::memory_order_relaxed);
  const std::uint64_t off = tx_.prod & tx_.mask;
  const std::uint64_t word = le64::to_raw(
      layout::record_word(static_cast<std::uint32_t>(len), layout::kKindMessage, tx_.prod, tx_.shift));
  tx_.prod = next;
  tx_.reserved = false;
  if (flush == Flush::later && !tx_.batch_open) {
    tx_.batch_open = true;
    tx_.head_off = off;
    tx_.head_word = word;
    return {};
  }
  std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(tx_.data + off))
      .store(word, std::memory_order_release);
  if (flush == Flush::later) return {};
  if (!tx_.batch_open) demote_record(off, len);
  return publish_producer();
}

inline Result<std::optional<std::span<const std::byte>>> Channel::try_peek() {
  using Msg = std::optional<std::span<const std::byte>>;
  if (rx_.peek_bytes == 0 && !broken()) [[likely]] {
    const std::uint64_t off = rx_.cons & rx_.mask;
    // One read of the peer-written header word (acquire: the payload after
    // it): a message of this lap, checked before use. Anything else (no
    // record yet, padding, a bad record) goes to the slow path.
    const std::uint64_t word =
        le64::from_raw(std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(rx_.data + off))
                           .load(std::memory_order_acquire));
    const auto len = static_cast<std::uint32_t>(word);
    if ((word >> 32) == ((layout::lap_tag(rx_.cons, rx_.shift) << 8) | layout::kKindMessage) &&
        len <= max_message_ && layout::record_bytes(len) <= rx_.cap - off) [[likely]] {
      // Built from registers, not read back from rx_ (a wide load of what
      // was just stored in halves stalls store forwarding, ~10 ns here).
      const std::byte* at = rx_.data + off + layout::kRecordHeader;
      rx_.peek_bytes = layout::record_bytes(len);
      rx_.peeked = std::span<const std::byte>(at, len);
      return Msg(std::in_place, at, len);
    }
  }
  return peek_slow();
}

inline Result<void> Channel::release(Flush flush) {
  if (rx_.peek_bytes != 0 && !broken()) [[likely]] {
    rx_.cons += rx_.peek_bytes;
    rx_.peek_bytes = 0;
    if (flush == Flush::later) return {};
    return publish_consumer();
  }
  return release_slow(flush);
}

// The copying and blocking calls try the fast path first and enter the
// out-of-line wait only when they must. Results are used in place: copying
// the optional out of a Result reads back its flag byte inside a wider load,
// a store-forwarding stall that costs more than the whole fast path.

inline Result<bool> Channel::try_send(std::span<const std::byte> msg) {
  auto r = try_reserve(msg.size());
  if (!r) return std::move(r).error();
  if (!r->has_value()) return false;
  if (!msg.empty()) std::memcpy((**r).data(), msg.data(), msg.size());
  UV_TRY_VOID(commit(msg.size()));
  return true;
}

inline Result<void> Channel::send(std::span<const std::byte> msg, std::chrono::nanoseconds timeout) {
  auto r = try_reserve(msg.size());
  if (r.ok() && r->has_value()) [[likely]] {
    if (!msg.empty()) std::memcpy((**r).data(), msg.data(), msg.size());
    return commit(msg.size());
  }
  return send_wait(msg, timeout);
}

inline Result<std::span<const std::byte>> Channel::peek(std::chrono::nanoseconds timeout) {
  auto r = try_peek();
  if (r.ok() && r->has_value()) [[likely]]
    return **r;
  return peek_wait(timeout);
}

inline Result<std::size_t> Channel::recv(std::span<std::byte> out, std::chrono::nanoseconds timeout) {
  auto r = peek(timeout);
  if (!r) return std::move(r).error();
  return recv_copy(*r, out);
}

}  // namespace uvirtio::channel
