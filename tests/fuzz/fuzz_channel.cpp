// libFuzzer target: the inter-VM channel against a hostile window.
//
// The window is a heap block of exactly its size, so any access outside it
// is caught by ASan; every span the channel hands out is checked to lie
// inside it. Two modes, picked by the first byte:
//   raw:   the window is the input's bytes (optionally with the magic
//          forced in); one side attaches and runs the ops below, while
//          "peer" ops keep overwriting words of the window.
//   pair:  side 0 formats, side 1 joins, both run ops; besides the hostile
//          writes, a model of the messages in flight checks every message
//          received byte for byte as long as nothing hostile was written.
// Always: errors name the channel; a channel that reported bad_device_data
// fails every later call with Errc::broken; without hostile writes no
// validation error ever happens. Any mismatch traps.
//
// Input: byte 0: bit 0 mode (0 raw, 1 pair), bits 1-3 window size
// (576 .. 16384 bytes). raw: byte 1 bit 0 side, bit 1 force the magic,
// bit 2 give a doorbell; then the window's bytes; then ops. pair: byte 1
// ring_bytes selector, byte 2 max_message selector; then ops. Each op is
// one byte b (op = b % 12, the channel is side (b >> 7) in pair mode) and
// its operands (missing bytes read as 0):
//   0 try_send: len byte            1 reserve + commit: len, cut, flags
//   2 try_peek                      3 release: flags
//   4 recv(0): buffer byte          5 send(0): len byte
//   6 flush_sent / flush_released   7 heartbeat, peer_present, peer ids
//   8 hostile: 8-byte word at an 8-aligned offset of the window
//   9 hostile: a ring index moved by a signed delta or set raw
//  10 hostile: a record header (kind, lap tag) at a ring offset
//  11 pair: detach and rejoin that side (raw: detach and re-attach)
#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <new>
#include <optional>
#include <vector>

#include "fuzz_input.hpp"
#include "uvirtio/rings/channel.hpp"

namespace {

using uvirtio::Errc;
using namespace uvirtio::channel;
using namespace std::chrono_literals;

using uvirtio::fuzz::Reader;

struct Block {
  explicit Block(std::size_t bytes)
      : n(bytes), p(static_cast<std::uint8_t*>(::operator new (bytes, std::align_val_t{64}))) {
    std::memset(p, 0, n);
  }
  ~Block() { ::operator delete (p, std::align_val_t{64}); }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  std::size_t n;
  std::uint8_t* p;
};

class NullDoorbell final : public Doorbell {
 public:
  uvirtio::Result<void> ring(std::uint32_t) override { return uvirtio::ok(); }
  uvirtio::Result<bool> wait(std::chrono::nanoseconds) override { return false; }
};

constexpr const char* kName = "fuzz channel";
constexpr std::size_t kSizes[8] = {layout::kMinWindow, 640, 1024, 1536, 2048, 4096, 8192, 16384};

std::uint8_t content(std::uint64_t seed, std::size_t k) { return static_cast<std::uint8_t>(seed * 31 + k); }

struct Side {
  std::unique_ptr<Channel> ch;
  bool failed = false;     // reported bad_device_data: broken from now on
  bool peeked = false;     // a message is borrowed (model: the front)
  std::uint64_t seed = 1;  // content of the next message we send
};

struct Fuzz {
  Block& w;
  Reader& in;
  bool hostile = false;  // something other than a channel wrote to the window
  NullDoorbell bell;
  Side side[2];
  std::deque<std::pair<std::size_t, std::uint64_t>> model[2];  // model[s]: messages s sent, in order

  bool inside(std::span<const std::byte> s) const {
    auto* b = reinterpret_cast<const std::uint8_t*>(s.data());
    return b >= w.p && b + s.size() <= w.p + w.n && b + s.size() >= b;
  }

  // Every error names the channel; validation errors latch. A channel can
  // also break inside a call that does not report it (a blocking call's
  // heartbeat finding our session word overwritten).
  template <class T>
  void check(Side& s, const uvirtio::Result<T>& r) {
    const bool was_failed = s.failed;
    if (s.ch->broken()) {
      CHECK(hostile);  // only a hostile write can break a channel
      s.failed = true;
    }
    if (r.ok()) return;
    const auto& e = r.error();
    CHECK(e.device() == kName);
    if (was_failed) {
      CHECK(e.code() == Errc::broken);
    } else if (e.code() == Errc::bad_device_data || e.code() == Errc::broken) {
      CHECK(s.failed);
    } else {
      CHECK(e.code() == Errc::invalid_argument || e.code() == Errc::timeout || e.code() == Errc::peer_gone);
    }
  }

  // A message s received (borrowed from the window, or copied out by recv
  // when `pop`): in the model's order and content, while nothing hostile
  // happened.
  void received(unsigned s, std::span<const std::byte> m, bool pop) {
    if (!pop) CHECK(inside(m));
    if (hostile) return;
    auto& q = model[1 - s];
    CHECK(!q.empty());
    CHECK(q.front().first == m.size());
    for (std::size_t k = 0; k < m.size(); ++k)
      CHECK(static_cast<std::uint8_t>(m[k]) == content(q.front().second, k));
    if (pop) q.pop_front();
  }

  std::size_t pick_len(Side& s) {
    const std::size_t max = s.ch->max_message();
    const std::uint8_t b = in.u8();
    if (b == 255) return max + 1;  // too long: invalid_argument
    if (b == 254) return max;
    return b % (max + 1);
  }

  void op(unsigned s) {
    Side& me = side[s];
    const std::uint8_t b = in.u8();
    Channel& ch = *me.ch;
    switch (b % 12) {
      case 0: {  // try_send
        const std::size_t len = pick_len(me);
        std::vector<std::byte> msg(len);
        for (std::size_t k = 0; k < len; ++k) msg[k] = std::byte(content(me.seed, k));
        auto r = ch.try_send(msg);
        check(me, r);
        if (r.ok() && *r) model[s].push_back({len, me.seed++});
        break;
      }
      case 1: {  // reserve, fill, commit (maybe shorter, maybe later, maybe never)
        const std::size_t len = pick_len(me);
        const std::uint8_t cut = in.u8(), flags = in.u8();
        auto r = ch.try_reserve(len);
        check(me, r);
        if (!r.ok() || !r->has_value()) break;
        const std::span<std::byte> slot = **r;
        CHECK(slot.size() == len && inside(slot));
        const std::size_t n = len - cut % (len + 1);
        for (std::size_t k = 0; k < n; ++k) slot[k] = std::byte(content(me.seed, k));
        if (flags & 4) break;  // abandoned
        auto c = ch.commit(n, (flags & 1) ? Flush::later : Flush::now);
        check(me, c);
        if (c.ok()) model[s].push_back({n, me.seed++});
        break;
      }
      case 2: {  // try_peek
        auto r = ch.try_peek();
        check(me, r);
        if (r.ok() && r->has_value()) {
          received(s, **r, false);
          me.peeked = true;
        }
        break;
      }
      case 3: {  // release
        const bool had = me.peeked;
        auto r = ch.release((in.u8() & 1) ? Flush::later : Flush::now);
        check(me, r);
        if (r.ok()) {
          CHECK(had);
          if (!hostile) model[1 - s].pop_front();
          me.peeked = false;
        } else if (r.error().code() == Errc::invalid_argument) {
          CHECK(!had);
        }
        break;
      }
      case 4: {  // recv with a buffer of some size
        std::vector<std::byte> buf(in.u8() * 4u);
        auto r = ch.recv(buf, 0ns);
        check(me, r);
        if (r.ok()) {
          CHECK(*r <= buf.size());
          received(s, std::span<const std::byte>(buf.data(), *r), true);
          me.peeked = false;
        } else if (!me.failed && r.error().code() == Errc::invalid_argument) {
          me.peeked = true;  // too small: the message stays peeked
        }
        break;
      }
      case 5: {  // blocking send, zero timeout
        const std::size_t len = pick_len(me);
        std::vector<std::byte> msg(len);
        for (std::size_t k = 0; k < len; ++k) msg[k] = std::byte(content(me.seed, k));
        auto r = ch.send(msg, 0ns);
        check(me, r);
        if (r.ok()) model[s].push_back({len, me.seed++});
        break;
      }
      case 6:
        check(me, (b & 16) ? ch.flush_sent() : ch.flush_released());
        break;
      case 7:
        ch.heartbeat();
        if (!me.failed && ch.broken()) {  // our session word was overwritten
          CHECK(hostile);
          me.failed = true;
        }
        (void)ch.peer_present();
        (void)ch.peer_doorbell_id();
        (void)ch.peer_session();
        break;
      case 8: {  // hostile: any word of the window
        const std::size_t off = (in.u16() % w.n) & ~std::size_t{7};
        const std::uint64_t v = in.u64();
        std::memcpy(w.p + off, &v, 8);
        hostile = true;
        break;
      }
      case 9: {  // hostile: a ring index, moved or set
        auto* ctl = reinterpret_cast<layout::Control*>(w.p);
        const std::uint8_t which = in.u8();
        uvirtio::le64& idx =
            (which & 2) ? ctl->ring[which & 1].consumer.value : ctl->ring[which & 1].producer.value;
        if (which & 4) {
          idx.set(in.u64());
        } else {
          const auto delta = static_cast<std::int16_t>(in.u16());
          idx.set(idx.get() +
                  static_cast<std::uint64_t>(static_cast<std::int64_t>(delta) * ((which & 8) ? 8 : 1)));
        }
        hostile = true;
        break;
      }
      case 10: {  // hostile: a record header somewhere in a ring's data area
        const auto* ctl = reinterpret_cast<const layout::Control*>(w.p);
        const unsigned r = in.u8() & 1;
        const std::uint64_t off = ctl->header.ring[r].offset.get(), cap = ctl->header.ring[r].capacity.get();
        const std::uint32_t len = in.u32();
        const std::uint8_t kind_lap = in.u8();
        const std::uint16_t where = in.u16();
        // The header may have been scribbled on too: stay inside the block.
        if (cap < 8 || off >= w.n || cap > w.n - off) break;
        const std::uint64_t at = (where % cap) & ~std::uint64_t{7};
        // Kind 0-3, lap tag 0-63 (the laps a run reaches in these windows).
        const std::uint64_t word = (static_cast<std::uint64_t>(kind_lap >> 2u) << layout::kTagShift) |
                                   (static_cast<std::uint64_t>(kind_lap & 3u) << 32) | len;
        std::memcpy(w.p + off + at, &word, 8);
        hostile = true;
        break;
      }
      case 11:
        break;  // handled by the caller (needs to replace the channel)
    }
  }
};

Options options(unsigned side, Doorbell* bell) {
  Options o;
  o.side = side;
  o.doorbell_id = side;
  o.doorbell = bell;
  o.spin = 0ns;
  o.heartbeat_thread = false;
  o.name = kName;
  return o;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  const std::uint8_t b0 = in.u8();
  const bool pair = (b0 & 1) != 0;
  Block w(kSizes[(b0 >> 1) & 7]);
  Fuzz f{w, in};

  if (!pair) {
    const std::uint8_t b1 = in.u8();
    const unsigned s = b1 & 1;
    for (std::size_t i = 0; i < w.n; ++i) w.p[i] = in.u8();
    if (b1 & 2) reinterpret_cast<layout::Control*>(w.p)->header.magic.set(layout::kMagic);
    f.hostile = true;  // the whole window is the peer's doing
    const Options o = options(s, (b1 & 4) ? &f.bell : nullptr);
    auto attach = [&]() -> bool {
      auto r = Channel::attach(w.p, w.n, o);
      if (!r) {
        CHECK(r.error().device() == kName);
        const Errc c = r.error().code();
        CHECK(c == Errc::bad_device_data || c == Errc::unsupported || c == Errc::not_found);
        return false;
      }
      f.side[s] = Side{std::move(r).value()};
      return true;
    };
    if (!attach()) return 0;
    while (!in.empty()) {
      if (in.n > 0 && in.p[0] % 12 == 11) {
        in.u8();
        f.side[s].ch.reset();
        if (!attach()) return 0;
        continue;
      }
      f.op(s);
    }
    return 0;
  }

  // Pair mode: side 0 formats with the selected geometry, side 1 joins.
  const std::uint8_t ring_sel = in.u8(), max_sel = in.u8();
  const std::size_t largest = std::bit_floor((w.n - layout::kControlBytes) / 2);
  Options o0 = options(0, &f.bell), o1 = options(1, &f.bell);
  if (ring_sel % 4 != 0)
    o0.ring_bytes = std::max<std::size_t>(layout::kMinCapacity, largest >> (ring_sel % 4));
  const std::size_t cap = o0.ring_bytes != 0 ? o0.ring_bytes : largest;
  if (max_sel != 0)
    o0.max_message = static_cast<std::uint32_t>(1 + max_sel % (cap / 2 - layout::kRecordHeader));
  for (unsigned s = 0; s < 2; ++s) {
    auto r = Channel::attach(w.p, w.n, s == 0 ? o0 : o1);
    CHECK(r.ok());
    f.side[s].ch = std::move(r).value();
  }
  while (!in.empty()) {
    const unsigned s = in.p[0] >> 7;
    if (in.p[0] % 12 == 11) {  // rejoin side s
      in.u8();
      Side& me = f.side[s];
      // Publish what both sides committed: what the rejoiner sent stays
      // deliverable, what the survivor sent is dropped by the rejoin.
      if (!me.failed) (void)me.ch->flush_sent();
      if (!f.side[1 - s].failed) (void)f.side[1 - s].ch->flush_sent();
      me.ch.reset();
      auto r = Channel::attach(w.p, w.n, s == 0 ? o0 : o1);
      if (!r) {
        // Only a hostile window can make a rejoin fail.
        CHECK(f.hostile && r.error().device() == kName);
        return 0;
      }
      const std::uint64_t seed = me.seed;
      me = Side{std::move(r).value()};
      me.seed = seed;
      f.model[1 - s].clear();  // the rejoiner drops what was sent to it
      // The peer's borrowed message (if any) is untouched; our own
      // messages in flight stay in the model.
      continue;
    }
    f.op(s);
  }
  return 0;
}
