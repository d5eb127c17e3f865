// Channel: see channel.hpp for the interface and doc/channel.md for the
// window layout and protocol.
//
// Fast path. The consumer finds records by their headers: the next header
// word carries the tag of the lap the consumer is in once the producer has
// stored it (release, after the payload), so a receive costs one cache-line
// transfer, not two (an index, then the record). The producer zeroes the
// header word after each record before publishing it, whenever those bytes
// are free, so the word at the consumer's position is always this lap's
// record, a zero, or a header of the previous lap (when the ring was full):
// stale payload bytes are never read as a header. The producer keeps its
// own position and the peer's consumer index as last validated, and
// re-reads that index only when the ring looks full. The producer index is
// still published (Flush::now, flush_sent, a full ring): a rejoining
// consumer starts there. The common case of each data-path call is inline
// in the header; this file has the slow paths, which repeat every check.
//
// Wake-up (Dekker-style): a consumer that found nothing for `spin` stores a
// fresh ticket in its recv_ticket, issues a full fence, checks the ring once
// more, then sleeps on the doorbell; a producer stores its index, issues a
// full fence and reads the peer's ticket, ringing once per ticket seen. One of
// the two always sees the other's store, so a wake-up is never lost. A
// producer waiting for room does the same with send_ticket and the
// consumer's index. Without a doorbell, waiting is polling with short sleeps.
//
// Untrusted peer: indices are compared as distances from our own position
// (wrap-safe modulo 2^64) and bounded by the ring's capacity; a record of
// the current lap is checked (kind, length against max_message and the
// ring's end) before its payload is handed out. Any violation latches the
// channel broken; after that the window is not touched again, except our
// own session word on detach.
#include "uvirtio/rings/channel.hpp"

#include <algorithm>
#include <bit>
#include <cstdio>
#include <cstring>

#include "uvirtio/base/barrier.hpp"
#include "uvirtio/base/hex.hpp"

namespace uvirtio::channel {
namespace {

using Clock = std::chrono::steady_clock;
using namespace layout;

// Control words are accessed as atomics on the Le<> storage: the peer
// changes them under us, and each is read exactly once per use.
std::uint64_t load64(const le64& f, std::memory_order o = std::memory_order_relaxed) noexcept {
  return le64::from_raw(std::atomic_ref<std::uint64_t>(const_cast<le64&>(f).raw()).load(o));
}
void store64(le64& f, std::uint64_t v, std::memory_order o = std::memory_order_relaxed) noexcept {
  std::atomic_ref<std::uint64_t>(f.raw()).store(le64::to_raw(v), o);
}
std::uint32_t load32(const le32& f, std::memory_order o = std::memory_order_relaxed) noexcept {
  return le32::from_raw(std::atomic_ref<std::uint32_t>(const_cast<le32&>(f).raw()).load(o));
}
void store32(le32& f, std::uint32_t v, std::memory_order o = std::memory_order_relaxed) noexcept {
  std::atomic_ref<std::uint32_t>(f.raw()).store(le32::to_raw(v), o);
}
std::int64_t ns_of(Clock::time_point t) noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}
// A record header: one 8-byte word, written and read in one access.
le64& record_at(std::byte* data, std::uint64_t off) noexcept { return *reinterpret_cast<le64*>(data + off); }

std::string duration_text(std::chrono::nanoseconds d) {
  char buf[48];
  if (d >= std::chrono::milliseconds(1))
    std::snprintf(buf, sizeof buf, "%lld ms",
                  static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(d).count()));
  else
    std::snprintf(buf, sizeof buf, "%lld us",
                  static_cast<long long>(std::chrono::duration_cast<std::chrono::microseconds>(d).count()));
  return buf;
}

// Longest single doorbell sleep: bounds how late we notice a silent peer or
// a notification consumed by the other direction's waiter.
constexpr std::chrono::nanoseconds kMaxSlice = std::chrono::milliseconds(10);
// Deadlines further out than this are treated as "no deadline" (keeps
// now + timeout from overflowing).
constexpr std::chrono::nanoseconds kMaxTimeout = std::chrono::hours(24 * 365);

struct Geometry {
  std::uint64_t window_bytes = 0;
  std::uint32_t max_message = 0;
  std::uint64_t offset[2] = {0, 0};
  std::uint64_t capacity[2] = {0, 0};
};

// Side 0 on a window without our magic. The magic is stored last (release):
// side 1 reads it first (acquire) and then sees every other field.
Result<void> format(Control* ctl, std::size_t size, const Options& o) {
  const char* op = "attach: format window";
  const std::uint64_t largest = std::bit_floor((size - kControlBytes) / 2);
  const std::uint64_t cap = o.ring_bytes != 0 ? o.ring_bytes : largest;
  if (!std::has_single_bit(cap) || cap < kMinCapacity || cap > largest)
    return Error(Errc::invalid_argument, o.name, op,
                 "ring_bytes " + std::to_string(o.ring_bytes) + " must be a power of two in [" +
                     std::to_string(kMinCapacity) + ", " + std::to_string(largest) + "] for a window of " +
                     std::to_string(size) + " bytes");
  // The header holds max_message in 32 bits: a ring of 2^34 bytes or more
  // (a 64 GiB window) would make a quarter of it wrap to 0 and leave the
  // window formatted with a header its own checks refuse.
  const std::uint64_t max =
      o.max_message != 0 ? o.max_message : std::min<std::uint64_t>(cap / 4, 0xffffffffu & ~std::uint64_t{7});
  if (max > cap / 2 - kRecordHeader)
    return Error(Errc::invalid_argument, o.name, op,
                 "max_message " + std::to_string(max) + " exceeds " +
                     std::to_string(cap / 2 - kRecordHeader) + " (half the ring minus a record header)");
  std::memset(static_cast<void*>(ctl), 0, kControlBytes);
  Header& h = ctl->header;
  h.version.set(kVersion);
  h.header_bytes.set(sizeof(Header));
  h.window_bytes.set(size);
  h.max_message.set(static_cast<std::uint32_t>(max));
  h.flags.set(0);
  for (unsigned r = 0; r < 2; ++r) {
    h.ring[r].offset.set(kControlBytes + r * cap);
    h.ring[r].capacity.set(cap);
    // Position 0 holds no record yet; every later header word is zeroed by
    // the producer before the consumer can reach it.
    std::memset(reinterpret_cast<std::byte*>(ctl) + kControlBytes + r * cap, 0, kRecordHeader);
  }
  store64(h.magic, kMagic, std::memory_order_release);
  return ok();
}

// Every header field is checked against the others and our mapping's size
// before anything is derived from it. Each field is read once.
Result<Geometry> check_header(const Control* ctl, std::size_t size, const std::string& name) {
  const char* op = "attach";
  const Header& h = ctl->header;
  auto bad = [&](std::string cause) {
    return Error(Errc::bad_device_data, name, op, "window header: " + cause);
  };
  const std::uint32_t version = load32(h.version);
  if (version != kVersion)
    return Error(
        Errc::unsupported, name, op,
        "window header: version " + std::to_string(version) + ", we speak " + std::to_string(kVersion));
  const std::uint32_t flags = load32(h.flags);
  if (flags != 0) return Error(Errc::unsupported, name, op, "window header: unknown flags " + hex(flags));
  const std::uint32_t header_bytes = load32(h.header_bytes);
  if (header_bytes != sizeof(Header))
    return bad("header size " + std::to_string(header_bytes) + ", expected " +
               std::to_string(sizeof(Header)));
  Geometry g;
  g.window_bytes = load64(h.window_bytes);
  if (g.window_bytes < kMinWindow || g.window_bytes > size)
    return bad("window size " + hex(g.window_bytes) + " is not in [" + hex(kMinWindow) + ", " + hex(size) +
               "] (our mapping is " + hex(size) + " bytes)");
  for (unsigned r = 0; r < 2; ++r) {
    const std::uint64_t off = load64(h.ring[r].offset), cap = load64(h.ring[r].capacity);
    const std::string ring = "ring " + std::to_string(r) + " ";
    if (!std::has_single_bit(cap) || cap < kMinCapacity)
      return bad(ring + "capacity " + hex(cap) + " is not a power of two >= " + hex(kMinCapacity));
    if (off % 64 != 0 || off < kControlBytes)
      return bad(ring + "offset " + hex(off) + " is not 64-byte aligned past the control area (" +
                 hex(kControlBytes) + ")");
    if (off > g.window_bytes || cap > g.window_bytes - off)
      return bad(ring + "data area [" + hex(off) + ", +" + hex(cap) + ") runs past the window end " +
                 hex(g.window_bytes));
    g.offset[r] = off;
    g.capacity[r] = cap;
  }
  if (g.offset[0] < g.offset[1] + g.capacity[1] && g.offset[1] < g.offset[0] + g.capacity[0])
    return bad("the data areas of ring 0 [" + hex(g.offset[0]) + ", +" + hex(g.capacity[0]) +
               ") and ring 1 [" + hex(g.offset[1]) + ", +" + hex(g.capacity[1]) + ") overlap");
  g.max_message = load32(h.max_message);
  const std::uint64_t limit = std::min(g.capacity[0], g.capacity[1]) / 2 - kRecordHeader;
  if (g.max_message == 0 || g.max_message > limit)
    return bad("max message " + hex(g.max_message) + " is not in [1, " + hex(limit) +
               "] (half the ring minus 8)");
  return g;
}

// A session id that differs from the previous one and from 0.
std::uint64_t new_session(std::uint64_t old, const void* salt) noexcept {
  std::uint64_t x = static_cast<std::uint64_t>(ns_of(Clock::now())) ^ reinterpret_cast<std::uintptr_t>(salt) ^
                    (old * 0x9e3779b97f4a7c15ull);
  x ^= x >> 30;  // splitmix64 finaliser
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  if (x == 0 || x == old) x = old + 1 == 0 ? 1 : old + 1;
  return x;
}

}  // namespace

Result<std::unique_ptr<Channel>> Channel::attach(void* window, std::size_t size, const Options& o) {
  const char* op = "attach";
  if (o.side > 1)
    return Error(Errc::invalid_argument, o.name, op, "side " + std::to_string(o.side) + " is not 0 or 1");
  if (window == nullptr) return Error(Errc::invalid_argument, o.name, op, "window is null");
  if (reinterpret_cast<std::uintptr_t>(window) % 64 != 0)
    return Error(Errc::invalid_argument, o.name, op, "window is not 64-byte aligned");
  if (size < kMinWindow)
    return Error(Errc::invalid_argument, o.name, op,
                 "window of " + std::to_string(size) + " bytes is smaller than the minimum " +
                     std::to_string(kMinWindow));
  if (o.peer_timeout <= std::chrono::milliseconds(0) || o.spin < std::chrono::nanoseconds(0) ||
      o.format_wait < std::chrono::milliseconds(0))
    return Error(Errc::invalid_argument, o.name, op,
                 "peer_timeout must be positive, spin and format_wait >= 0");

  auto* ctl = static_cast<Control*>(window);
  if (load64(ctl->header.magic, std::memory_order_acquire) != kMagic) {
    if (o.side == 0) {
      UV_TRY_VOID(format(ctl, size, o));
    } else {
      const auto until = Clock::now() + o.format_wait;
      while (load64(ctl->header.magic, std::memory_order_acquire) != kMagic) {
        if (Clock::now() >= until)
          return Error(
              Errc::not_found, o.name, op,
              "the window holds no channel (side 0 formats it; waited " + duration_text(o.format_wait) + ")");
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
  }
  UV_TRY(const Geometry g, check_header(ctl, size, o.name));

  std::unique_ptr<Channel> ch(new Channel());
  ch->name_ = o.name;
  ch->side_ = o.side;
  ch->base_ = static_cast<std::byte*>(window);
  ch->self_ = &ctl->side[o.side];
  ch->peer_ = &ctl->side[1 - o.side];
  ch->doorbell_ = o.doorbell;
  ch->max_message_ = g.max_message;
  ch->max_record_ = record_bytes(g.max_message);
  ch->peer_timeout_ = o.peer_timeout;
  ch->spin_ns_.store(o.spin.count(), std::memory_order_relaxed);
  auto setup = [&](Ring& ring, unsigned r) {
    ring.data = ch->base_ + g.offset[r];
    ring.cap = g.capacity[r];
    ring.mask = g.capacity[r] - 1;
    ring.shift = static_cast<unsigned>(std::countr_zero(g.capacity[r]));
    ring.producer = &ctl->ring[r].producer.value;
    ring.consumer = &ctl->ring[r].consumer.value;
  };
  setup(ch->tx_, o.side);
  setup(ch->rx_, 1 - o.side);
  UV_TRY_VOID(ch->join(o));
  if (o.heartbeat_thread) ch->hb_thread_ = std::thread([c = ch.get()] { c->heartbeat_loop(); });
  return ch;
}

// Joining (first attach or rejoin after a restart of this side). Every
// value is read and checked first and only then anything written, so a
// refused attach leaves the window as it was. Only our own words are
// written, and the session id last, so a peer that sees the new session also
// sees the rest.
Result<void> Channel::join(const Options& o) {
  const char* op = "attach";
  // What the peer published before we came is not for us: consume it all.
  const std::uint64_t p = load64(*rx_.producer, std::memory_order_acquire);
  if (p % 8 != 0)
    return Error(Errc::bad_device_data, name_, op,
                 "peer producer index " + hex(p) + " is not a multiple of 8");
  // Our consumer index must not move backwards either: the peer stores a
  // padding record (visible by its tag) before publishing its index, so our
  // previous incarnation may have skipped it and published an index up to
  // one capacity ahead of p, and the peer may have read that. Keep such an
  // index; any other value (behind p, too far ahead, misaligned) is not
  // trusted and we start at p.
  std::uint64_t rcons = load64(*rx_.consumer, std::memory_order_relaxed);
  if (rcons % 8 != 0 || rcons - p > rx_.cap) rcons = p;

  // Our producer index: records our previous incarnation published are
  // complete messages, and the peer may be reading them right now, so we
  // continue after them rather than rewind (a rewind would let new records
  // overwrite bytes under the peer and make our index move backwards, which
  // the peer must treat as a violation). Only an index that is inconsistent
  // with the peer's consumer index is reset to it.
  std::uint64_t prod = load64(*tx_.producer, std::memory_order_relaxed);
  const std::uint64_t cons = load64(*tx_.consumer, std::memory_order_acquire);
  if (cons % 8 != 0)
    return Error(Errc::bad_device_data, name_, op,
                 "peer consumer index " + hex(cons) + " is not a multiple of 8");
  if (prod % 8 != 0 || prod - cons > tx_.cap) prod = cons;
  // Records our previous incarnation committed past the index it published
  // are visible to the peer already (by their tags): continue after them.
  prod = end_of_records(prod, cons);

  // Everything is valid: publish.
  store64(*rx_.consumer, rcons, std::memory_order_release);
  rx_.cons = rx_.published = rcons;
  store64(*tx_.producer, prod, std::memory_order_release);
  tx_.prod = tx_.published = prod;
  tx_.cons_cache = cons;

  store32(self_->recv_ticket, 0);
  store32(self_->send_ticket, 0);
  store32(self_->doorbell_id, o.doorbell_id);
  store64(self_->heartbeat, load64(self_->heartbeat) + 1);
  session_ = new_session(load64(self_->session), this);
  store64(self_->session, session_, std::memory_order_seq_cst);
  last_beat_ns_.store(ns_of(Clock::now()), std::memory_order_relaxed);
  return ok();
}

std::uint64_t Channel::end_of_records(std::uint64_t prod, std::uint64_t cons) const {
  // Each step moves forward, and prod stays within one capacity of cons.
  for (;;) {
    const std::uint64_t off = prod & tx_.mask, to_end = tx_.cap - off;
    const std::uint64_t word = load64(record_at(tx_.data, off), std::memory_order_acquire);
    const auto len = static_cast<std::uint32_t>(word);
    const std::uint32_t kind = record_kind(word);
    if (!record_here(word, prod, tx_.shift)) return prod;
    std::uint64_t step = 0;
    if (kind == kKindPadding && to_end < max_record_ && len == to_end - kRecordHeader)
      step = to_end;
    else if (kind == kKindMessage && len <= max_message_ && record_bytes(len) <= to_end)
      step = record_bytes(len);
    else
      return prod;
    if (prod + step - cons > tx_.cap) return prod;
    prod += step;
  }
}

Channel::~Channel() {
  if (hb_thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lk(hb_mu_);
      hb_stop_ = true;
    }
    hb_cv_.notify_all();
    hb_thread_.join();
  }
  if (session_ == 0) return;  // join() failed: we never published anything
  // Clear the session only if it is still ours: another process may have
  // taken this side over, and then the side line (its tickets included:
  // clearing them while it sleeps would lose its wake-up) is its own.
  std::uint64_t expected = le64::to_raw(session_);
  if (!std::atomic_ref<std::uint64_t>(self_->session.raw()).compare_exchange_strong(expected, 0)) return;
  store32(self_->recv_ticket, 0);
  store32(self_->send_ticket, 0);
  // A peer asleep waiting for us learns at once that we are gone.
  if (doorbell_ != nullptr && !broken()) {
    barrier_store_load();
    if (load32(peer_->recv_ticket) != 0 || load32(peer_->send_ticket) != 0)
      (void)doorbell_->ring(load32(peer_->doorbell_id));
  }
}

Error Channel::violation(const char* op, std::string cause) {
  {
    std::lock_guard<std::mutex> lk(cause_mu_);
    if (!broken_.load(std::memory_order_relaxed)) {
      cause_ = cause;
      broken_.store(true, std::memory_order_release);
    }
  }
  return Error(Errc::bad_device_data, name_, op, std::move(cause));
}

Error Channel::broken_error(const char* op) const {
  std::lock_guard<std::mutex> lk(cause_mu_);
  return Error(Errc::broken, name_, op, "channel is broken by an earlier violation: " + cause_);
}

// --- sending ---

Result<bool> Channel::refresh_consumer(const char* op) {
  const std::uint64_t c = load64(*tx_.consumer, std::memory_order_acquire);
  // Committed records are visible at once, so the consumer may be anywhere
  // up to our position.
  const std::uint64_t behind = tx_.prod - c, known = tx_.prod - tx_.cons_cache;
  if (c % 8 != 0) return violation(op, "peer consumer index " + hex(c) + " is not a multiple of 8");
  if (behind > known) {
    if (c - tx_.prod <= tx_.cap)
      return violation(op, "peer consumer index " + hex(c) + " is " + hex(c - tx_.prod) +
                               " bytes past our producer index " + hex(tx_.prod));
    return violation(op, "peer consumer index moved backwards from " + hex(tx_.cons_cache) + " to " + hex(c));
  }
  tx_.cons_cache = c;
  return behind < known;
}

Result<void> Channel::ring_if_armed(const le32& ticket, std::uint32_t& last_rung,
                                    std::uint64_t& last_rung_session, const char* op) {
  // Our index store must be visible before we read the sleeper's ticket; it
  // stores the ticket before re-reading our index (full fence on both sides).
  barrier_store_load();
  // Acquire: the sleeper stored its ticket (release) after its session, so
  // a ticket of a rejoined peer comes with that peer's session.
  const std::uint32_t t = load32(ticket, std::memory_order_acquire);
  if (t == 0) return ok();
  // A rejoined peer counts its tickets from 1 again: the same ticket in a
  // new session is a new sleep (same cache line as the ticket).
  const std::uint64_t s = load64(peer_->session);
  if (t == last_rung && s == last_rung_session) return ok();
  last_rung = t;
  last_rung_session = s;
  auto r = doorbell_->ring(load32(peer_->doorbell_id));
  if (!r) return std::move(r).error().within(op);
  return ok();
}

Result<void> Channel::publish_producer() {
  if (tx_.published == tx_.prod) return ok();
  if (tx_.batch_open) {
    // The batch's first header, last: the consumer takes the whole batch.
    std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(tx_.data + tx_.head_off))
        .store(tx_.head_word, std::memory_order_release);
    tx_.batch_open = false;
  }
  // Record bytes before the index that covers them (release store).
  store64(*tx_.producer, tx_.prod, std::memory_order_release);
  tx_.published = tx_.prod;
  if (doorbell_ == nullptr) return ok();
  return ring_if_armed(peer_->recv_ticket, tx_.last_rung, tx_.last_rung_session, "send: ring the peer");
}

Result<std::optional<std::span<std::byte>>> Channel::reserve_slow(std::size_t len) {
  const char* op = "reserve";
  // A new reserve replaces an uncommitted reservation, whatever it returns:
  // after "no room" or an error there is nothing to commit.
  tx_.reserved = false;
  if (broken()) return broken_error(op);
  if (len > max_message_)
    return Error(Errc::invalid_argument, name_, op,
                 "message of " + std::to_string(len) + " bytes exceeds the largest of " +
                     std::to_string(max_message_));
  const std::uint64_t rec = record_bytes(len);
  const std::uint64_t off = tx_.prod & tx_.mask, to_end = tx_.cap - off;
  const std::uint64_t need =
      rec <= to_end ? rec : to_end + rec;  // a padding record first when it would straddle
  if (tx_.cap - (tx_.prod - tx_.cons_cache) < need) {
    UV_TRY(const bool moved, refresh_consumer(op));
    if (!moved || tx_.cap - (tx_.prod - tx_.cons_cache) < need) {
      // The peer may be waiting for records we committed but did not publish.
      UV_TRY_VOID(publish_producer());
      return std::optional<std::span<std::byte>>{};
    }
  }
  std::uint64_t at = off;
  if (rec > to_end) {
    // Offset 0 of the next lap is where the consumer goes after the padding.
    // It usually holds a header of this lap, but after a rejoin over an
    // unflushed batch (its first header held back, the rest stored) it can
    // hold a record of the next lap written by our previous incarnation:
    // zero it first, like every other record's successor (it is free: `need`
    // covers it).
    store64(record_at(tx_.data, 0), 0);
    store64(
        record_at(tx_.data, off),
        record_word(static_cast<std::uint32_t>(to_end - kRecordHeader), kKindPadding, tx_.prod, tx_.shift),
        std::memory_order_release);
    tx_.prod += to_end;
    at = 0;
  }
  tx_.reserved = true;
  tx_.reserved_len = len;
  return std::optional<std::span<std::byte>>(std::span<std::byte>(tx_.data + at + kRecordHeader, len));
}

Result<void> Channel::commit_slow(std::size_t len, Flush flush) {
  const char* op = "commit";
  if (broken()) return broken_error(op);
  if (!tx_.reserved) return Error(Errc::invalid_argument, name_, op, "nothing reserved");
  if (len > tx_.reserved_len)
    return Error(Errc::invalid_argument, name_, op,
                 std::to_string(len) + " bytes committed, " + std::to_string(tx_.reserved_len) + " reserved");
  return store_record(len, flush);
}

Result<void> Channel::flush_sent() {
  if (broken()) return broken_error("flush sent");
  return publish_producer();
}

Result<void> Channel::send_wait(std::span<const std::byte> msg, std::chrono::nanoseconds timeout) {
  std::span<std::byte> slot;
  UV_TRY_VOID(block("send", Wait::space, timeout, [&]() -> Result<bool> {
    auto r = try_reserve(msg.size());  // used in place: see peek() in the header
    if (!r) return std::move(r).error();
    if (!*r) return false;
    slot = **r;
    return true;
  }));
  if (!msg.empty()) std::memcpy(slot.data(), msg.data(), msg.size());
  return commit(msg.size());
}

// --- receiving ---

Result<void> Channel::publish_consumer() {
  if (rx_.published == rx_.cons) return ok();
  // We are done reading the records before handing their room back (release).
  store64(*rx_.consumer, rx_.cons, std::memory_order_release);
  rx_.published = rx_.cons;
  if (doorbell_ == nullptr) return ok();
  return ring_if_armed(peer_->send_ticket, rx_.last_rung, rx_.last_rung_session, "receive: ring the peer");
}

Result<std::optional<std::span<const std::byte>>> Channel::peek_slow() {
  const char* op = "receive";
  using Msg = std::optional<std::span<const std::byte>>;
  if (broken()) return broken_error(op);
  if (rx_.peek_bytes != 0) return Msg(rx_.peeked);
  // At most a padding record, then a message: after padding we are at
  // offset 0, where padding is never valid.
  for (int step = 0; step < 2; ++step) {
    const std::uint64_t off = rx_.cons & rx_.mask, to_end = rx_.cap - off;
    const std::uint64_t word = load64(record_at(rx_.data, off), std::memory_order_acquire);
    const auto len = static_cast<std::uint32_t>(word);
    const std::uint32_t kind = record_kind(word);
    if (!record_here(word, rx_.cons, rx_.shift)) {
      // Nothing yet: a zeroed word, or a header of an earlier lap.
      UV_TRY_VOID(publish_consumer());  // before the caller waits: the peer may wait for room
      return Msg{};
    }
    if (kind == kKindPadding) {
      if (to_end >= max_record_)
        return violation(op, "padding record at ring offset " + hex(off) +
                                 " where the largest message fits (" + hex(to_end) + " bytes to the end)");
      if (len != to_end - kRecordHeader)
        return violation(op, "padding record at ring offset " + hex(off) + " has length " + hex(len) + ", " +
                                 hex(to_end - kRecordHeader) + " expected");
      rx_.cons += to_end;
      continue;
    }
    if (kind != kKindMessage)
      return violation(
          op, "record at ring offset " + hex(off) + " has kind " + hex(kind) + " (1 message, 2 padding)");
    if (len > max_message_)
      return violation(op, "record at ring offset " + hex(off) + " has length " + hex(len) +
                               ", larger than the max message " + hex(max_message_));
    const std::uint64_t rec = record_bytes(len);
    if (rec > to_end)
      return violation(op, "message of " + hex(len) + " bytes at ring offset " + hex(off) +
                               " straddles the ring's end (capacity " + hex(rx_.cap) + ")");
    rx_.peek_bytes = rec;
    rx_.peeked = std::span<const std::byte>(rx_.data + off + kRecordHeader, len);
    return Msg(rx_.peeked);
  }
  return violation(op, "two padding records in a row");  // unreachable: checked above
}

Result<void> Channel::release_slow(Flush flush) {
  const char* op = "release";
  if (broken()) return broken_error(op);
  if (rx_.peek_bytes == 0) return Error(Errc::invalid_argument, name_, op, "no message peeked");
  rx_.cons += rx_.peek_bytes;
  rx_.peek_bytes = 0;
  rx_.peeked = {};
  if (flush == Flush::later) return ok();
  return publish_consumer();
}

Result<void> Channel::flush_released() {
  if (broken()) return broken_error("flush released");
  return publish_consumer();
}

Result<std::span<const std::byte>> Channel::peek_wait(std::chrono::nanoseconds timeout) {
  std::span<const std::byte> msg;
  UV_TRY_VOID(block("receive", Wait::data, timeout, [&]() -> Result<bool> {
    auto r = try_peek();  // used in place: see peek() in the header
    if (!r) return std::move(r).error();
    if (!*r) return false;
    msg = **r;
    return true;
  }));
  return msg;
}

Result<std::size_t> Channel::recv_copy(std::span<const std::byte> msg, std::span<std::byte> out) {
  if (msg.size() > out.size())
    return Error(Errc::invalid_argument, name_, "receive",
                 "buffer of " + std::to_string(out.size()) + " bytes is too small for a message of " +
                     std::to_string(msg.size()));
  if (!msg.empty()) std::memcpy(out.data(), msg.data(), msg.size());
  UV_TRY_VOID(release());
  return msg.size();
}

// --- waiting ---

template <class Ready>
Result<void> Channel::block(const char* op, Wait what, std::chrono::nanoseconds timeout, Ready&& ready) {
  UV_TRY(const bool first, ready());
  if (first) return ok();
  timeout = std::clamp(timeout, std::chrono::nanoseconds(0), kMaxTimeout);
  const auto start = Clock::now();
  const auto deadline = start + timeout;
  const auto spin = std::min(std::chrono::nanoseconds(spin_ns_.load(std::memory_order_relaxed)), timeout);
  if (spin > std::chrono::nanoseconds(0)) {
    // Spin on the one word that can change the answer and run the full,
    // validating ready() only when it says something is there: a spin
    // iteration is then a load and a pause, and the round trip does not
    // wait for result objects or the clock. Waiting for data, the word is
    // the next record's header: anything of the current lap (ready() then
    // returns it, skips padding, or reports the violation). Waiting for
    // room, it is the peer's consumer index, moved from our copy.
    const auto spin_end = start + spin;
    for (unsigned i = 1;; ++i) {
      cpu_relax();
      bool look;
      if (what == Wait::data) {
        // Only the header's line. Prefetching the record's second line in
        // this loop as well (a 64-byte message runs into it) made the
        // polled round trip ~10% slower on an Intel host (doc/channel.md):
        // it takes the line back while the producer is still writing it.
        look = record_here(load64(record_at(rx_.data, rx_.cons & rx_.mask)), rx_.cons, rx_.shift);
      } else {
        look = load64(*tx_.consumer) != tx_.cons_cache;
      }
      if (look) {
        UV_TRY(const bool r, ready());
        if (r) return ok();
      }
      if (i % 64 == 0 && Clock::now() >= spin_end) break;
    }
  }
  const auto slice = std::min(kMaxSlice, std::chrono::nanoseconds(peer_timeout_) / 4);
  auto backoff = std::chrono::nanoseconds(std::chrono::microseconds(10));
  for (;;) {
    const auto now = Clock::now();
    maybe_heartbeat(now);
    if (auto why = peer_absence(now)) return Error(Errc::peer_gone, name_, op, *why);
    if (now >= deadline)
      return Error(Errc::timeout, name_, op,
                   (what == Wait::data ? "no message within " : "no room in the ring within ") +
                       duration_text(timeout));
    const auto left = deadline - now;
    if (doorbell_ != nullptr) {
      le32& word = what == Wait::data ? self_->recv_ticket : self_->send_ticket;
      std::uint32_t& counter = what == Wait::data ? rx_.ticket : tx_.ticket;
      if (++counter == 0) counter = 1;
      store32(word, counter, std::memory_order_release);  // after our session (ring_if_armed)
      // The ticket must be visible before we look at the ring one last time
      // (the peer publishes, fences, then reads the ticket).
      barrier_store_load();
      auto r = ready();
      if (!r || *r) {
        store32(word, 0);
        if (!r) return std::move(r).error();
        return ok();
      }
      auto w = doorbell_->wait(std::min<std::chrono::nanoseconds>(left, slice));
      store32(word, 0);
      if (!w) return std::move(w).error().within(op);
    } else {
      std::this_thread::sleep_for(std::min<std::chrono::nanoseconds>(left, backoff));
      backoff = std::min<std::chrono::nanoseconds>(backoff * 2, std::chrono::milliseconds(1));
    }
    UV_TRY(const bool r, ready());
    if (r) return ok();
  }
}

// --- the peer ---

std::optional<std::string> Channel::peer_absence(Clock::time_point now) const {
  std::lock_guard<std::mutex> lk(live_mu_);
  const std::uint64_t s = load64(peer_->session, std::memory_order_acquire);
  if (s == 0) return std::string(seen_session_ != 0 ? "the peer detached" : "no peer is attached");
  const std::uint64_t h = load64(peer_->heartbeat);
  if (s != seen_session_ || h != seen_heartbeat_) {
    seen_session_ = s;
    seen_heartbeat_ = h;
    seen_change_ = now;
    return std::nullopt;
  }
  if (now - seen_change_ >= peer_timeout_)
    return "the peer's heartbeat has not moved for " + duration_text(now - seen_change_) + " (peer timeout " +
           duration_text(peer_timeout_) + ")";
  return std::nullopt;
}

bool Channel::peer_present() const { return !peer_absence(Clock::now()).has_value(); }

Result<void> Channel::wait_peer(std::chrono::milliseconds timeout) {
  const char* op = "wait for the peer";
  const auto deadline = Clock::now() + std::clamp<std::chrono::nanoseconds>(timeout, {}, kMaxTimeout);
  for (;;) {
    if (broken()) return broken_error(op);
    const auto now = Clock::now();
    maybe_heartbeat(now);
    auto why = peer_absence(now);
    if (!why) return ok();
    if (now >= deadline)
      return Error(Errc::timeout, name_, op, *why + " (waited " + duration_text(timeout) + ")");
    std::this_thread::sleep_for(
        std::min<std::chrono::nanoseconds>(deadline - now, std::chrono::milliseconds(1)));
  }
}

std::uint32_t Channel::peer_doorbell_id() const noexcept { return load32(peer_->doorbell_id); }

std::uint64_t Channel::peer_session() const noexcept {
  return load64(peer_->session, std::memory_order_acquire);
}

void Channel::heartbeat() {
  if (broken()) return;  // a broken channel stops beating: the peer will see it gone
  const std::uint64_t s = load64(self_->session);
  if (s != session_) {
    (void)violation("heartbeat", "our session id in the window changed from " + hex(session_) + " to " +
                                     hex(s) + " (another process attached as side " + std::to_string(side_) +
                                     "?)");
    return;
  }
  // Several of our threads may beat at once; losing one increment is fine,
  // the word still moves.
  store64(self_->heartbeat, load64(self_->heartbeat) + 1);
  last_beat_ns_.store(ns_of(Clock::now()), std::memory_order_relaxed);
}

void Channel::maybe_heartbeat(Clock::time_point now) {
  const std::int64_t last = last_beat_ns_.load(std::memory_order_relaxed);
  if (ns_of(now) - last >= std::chrono::nanoseconds(peer_timeout_).count() / 8) heartbeat();
}

void Channel::heartbeat_loop() {
  const auto period = std::max<std::chrono::nanoseconds>(peer_timeout_ / 4, std::chrono::milliseconds(1));
  std::unique_lock<std::mutex> lk(hb_mu_);
  while (!hb_stop_) {
    lk.unlock();
    heartbeat();
    lk.lock();
    hb_cv_.wait_for(lk, period, [this] { return hb_stop_; });
  }
}

}  // namespace uvirtio::channel
