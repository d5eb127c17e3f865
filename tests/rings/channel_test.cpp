// Unit tests for the inter-VM message channel (rings/channel.hpp).
//
// Most tests put both sides in one process on one window; the doorbell and
// restart tests use a memfd window shared with a forked child, the way two
// processes (or two VMs over ivshmem) share it. Every window sits between
// guard bytes inside read-write pages, themselves between inaccessible
// pages: a stray write shows up in the guards, a stray access farther out
// faults. The hostile-peer tests play side 1 by writing raw values into the
// window (layout::Control) and check that side 0 latches broken with a
// message naming the bad value, and touches nothing afterwards.
#include "uvirtio/rings/channel.hpp"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "uvirtio/pci/eventfd_doorbell.hpp"

namespace uvirtio::channel {
namespace {

using namespace std::chrono_literals;
using layout::Control;

constexpr const char* kName = "test channel";

// A window of `size` bytes (a multiple of 64) with kGuard guard bytes on each
// side, inside pages fenced by PROT_NONE pages. `shared` maps it MAP_SHARED
// so a forked child sees the same bytes.
class Window {
 public:
  static constexpr std::size_t kGuard = 256;
  static constexpr std::uint8_t kGuardByte = 0xEE;
  explicit Window(std::size_t size, bool shared = false) : size_(size) {
    const std::size_t page = 4096;
    rw_ = (size + 2 * kGuard + page - 1) / page * page;
    total_ = rw_ + 2 * page;
    base_ = static_cast<std::uint8_t*>(
        ::mmap(nullptr, total_, PROT_NONE, (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS, -1, 0));
    if (base_ == MAP_FAILED) std::abort();
    if (::mprotect(base_ + page, rw_, PROT_READ | PROT_WRITE) != 0) std::abort();
    std::memset(base_ + page, kGuardByte, rw_);
    // The window ends exactly kGuard bytes before the last RW byte.
    win_ = base_ + page + rw_ - kGuard - size;
    std::memset(win_, 0, size);
  }
  ~Window() { ::munmap(base_, total_); }
  Window(const Window&) = delete;
  Window& operator=(const Window&) = delete;

  void* get() const { return win_; }
  std::uint8_t* bytes() const { return win_; }
  std::size_t size() const { return size_; }
  Control* ctl() const { return reinterpret_cast<Control*>(win_); }
  bool guards_intact() const {
    for (std::uint8_t* p = base_ + 4096; p < win_; ++p)
      if (*p != kGuardByte) return false;
    for (std::uint8_t* p = win_ + size_; p < base_ + 4096 + rw_; ++p)
      if (*p != kGuardByte) return false;
    return true;
  }
  std::vector<std::uint8_t> snapshot() const { return {win_, win_ + size_}; }
  bool contains(std::span<const std::byte> s) const {
    auto* p = reinterpret_cast<const std::uint8_t*>(s.data());
    return p >= win_ && p + s.size() <= win_ + size_;
  }

 private:
  std::size_t size_;
  std::size_t rw_ = 0, total_ = 0;
  std::uint8_t* base_ = nullptr;
  std::uint8_t* win_ = nullptr;
};

Options opts(unsigned side, Doorbell* bell = nullptr) {
  Options o;
  o.side = side;
  o.doorbell_id = 100 + side;
  o.doorbell = bell;
  o.heartbeat_thread = false;
  o.name = kName;
  return o;
}

std::unique_ptr<Channel> must_attach(const Window& w, const Options& o) {
  auto r = Channel::attach(w.get(), w.size(), o);
  EXPECT_TRUE(r.ok()) << r.error().message();
  if (!r.ok()) return nullptr;
  return std::move(r).value();
}

// A control word written as the peer would.
void poke(le64& f, std::uint64_t v) { f.set(v); }

std::vector<std::byte> pattern(std::size_t n, std::uint64_t seed) {
  std::vector<std::byte> v(n);
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& b : v) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    b = std::byte(x & 0xff);
  }
  return v;
}

template <class T>
void expect_error(const Result<T>& r, Errc code, const std::string& text = {}) {
  ASSERT_FALSE(r.ok()) << "expected " << errc_name(code);
  EXPECT_EQ(r.error().code(), code) << errc_name(r.error().code()) << ": " << r.error().message();
  EXPECT_EQ(r.error().device(), kName);
  if (!text.empty()) {
    EXPECT_NE(r.error().message().find(text), std::string::npos) << r.error().message();
  }
}

// ---------------------------------------------------------------- attach

TEST(ChannelAttach, Side0FormatsAndSide1Joins) {
  Window w(64 * 1024);
  auto a = must_attach(w, opts(0));
  ASSERT_TRUE(a);
  const auto& h = w.ctl()->header;
  EXPECT_EQ(h.magic.get(), layout::kMagic);
  EXPECT_EQ(h.version.get(), 2u);
  EXPECT_EQ(h.header_bytes.get(), 64u);
  EXPECT_EQ(h.window_bytes.get(), w.size());
  // (64 KiB - 448) / 2 rounds down to 16 KiB per ring.
  EXPECT_EQ(h.ring[0].offset.get(), layout::kControlBytes);
  EXPECT_EQ(h.ring[0].capacity.get(), 16384u);
  EXPECT_EQ(h.ring[1].offset.get(), layout::kControlBytes + 16384u);
  EXPECT_EQ(h.ring[1].capacity.get(), 16384u);
  EXPECT_EQ(h.max_message.get(), 4096u);
  EXPECT_EQ(a->max_message(), 4096u);
  EXPECT_EQ(a->ring_bytes(), 16384u);
  EXPECT_NE(w.ctl()->side[0].session.get(), 0u);
  EXPECT_EQ(w.ctl()->side[0].doorbell_id.get(), 100u);
  EXPECT_FALSE(a->peer_present());

  auto b = must_attach(w, opts(1));
  ASSERT_TRUE(b);
  EXPECT_TRUE(a->peer_present());
  EXPECT_TRUE(b->peer_present());
  EXPECT_EQ(a->peer_doorbell_id(), 101u);
  EXPECT_EQ(b->peer_doorbell_id(), 100u);
  EXPECT_EQ(a->peer_session(), w.ctl()->side[1].session.get());
  EXPECT_TRUE(w.guards_intact());

  b.reset();  // a clean detach clears the session
  EXPECT_EQ(w.ctl()->side[1].session.get(), 0u);
  EXPECT_FALSE(a->peer_present());
}

TEST(ChannelAttach, HonoursRingBytesAndMaxMessage) {
  Window w(64 * 1024);
  Options o = opts(0);
  o.ring_bytes = 4096;
  o.max_message = 2040;  // 4096/2 - 8
  auto a = must_attach(w, o);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->ring_bytes(), 4096u);
  EXPECT_EQ(a->max_message(), 2040u);
  auto b = must_attach(w, opts(1));  // side 1 takes what the header says
  ASSERT_TRUE(b);
  EXPECT_EQ(b->max_message(), 2040u);
}

TEST(ChannelAttach, RejectsBadArgumentsWithoutWriting) {
  Window w(4096);
  const auto before = w.snapshot();
  auto check = [&](void* p, std::size_t n, Options o, const std::string& text) {
    auto r = Channel::attach(p, n, o);
    expect_error(r, Errc::invalid_argument, text);
  };
  Options o = opts(0);
  o.side = 2;
  check(w.get(), w.size(), o, "side 2");
  check(nullptr, w.size(), opts(0), "null");
  check(w.bytes() + 8, w.size() - 64, opts(0), "64-byte aligned");
  check(w.get(), layout::kMinWindow - 1, opts(0), "smaller than the minimum");
  o = opts(0);
  o.peer_timeout = 0ms;
  check(w.get(), w.size(), o, "peer_timeout");
  o = opts(0);
  o.ring_bytes = 1000;
  check(w.get(), w.size(), o, "ring_bytes");
  o = opts(0);
  o.ring_bytes = 8192;  // does not fit twice
  check(w.get(), w.size(), o, "ring_bytes");
  o = opts(0);
  o.max_message = 512;  // 1024-byte rings: at most 504
  check(w.get(), w.size(), o, "max_message");
  EXPECT_EQ(w.snapshot(), before);
  EXPECT_TRUE(w.guards_intact());
}

TEST(ChannelAttach, Side1NeedsAFormattedWindow) {
  Window w(8192);
  auto r = Channel::attach(w.get(), w.size(), opts(1));
  expect_error(r, Errc::not_found, "holds no channel");
  EXPECT_EQ(w.ctl()->side[1].session.get(), 0u);

  // With format_wait, side 1 waits for side 0.
  std::unique_ptr<Channel> a;
  std::thread late([&] {
    std::this_thread::sleep_for(50ms);
    a = must_attach(w, opts(0));
  });
  Options o = opts(1);
  o.format_wait = 5000ms;
  auto b = Channel::attach(w.get(), w.size(), o);
  late.join();
  ASSERT_TRUE(b.ok()) << b.error().message();
  ASSERT_TRUE(a);
  EXPECT_TRUE((*b)->peer_present());
}

TEST(ChannelAttach, Side0ReformatsAWindowWithoutMagic) {
  Window w(8192);
  std::memset(w.get(), 0x5a, w.size());  // garbage, no magic
  auto a = must_attach(w, opts(0));
  ASSERT_TRUE(a);
  EXPECT_EQ(w.ctl()->header.magic.get(), layout::kMagic);
  EXPECT_EQ(w.ctl()->side[1].session.get(), 0u);  // control area zeroed
  auto b = must_attach(w, opts(1));
  ASSERT_TRUE(b);
  const auto msg = pattern(100, 1);
  ASSERT_TRUE(a->try_send(msg).value());
  std::vector<std::byte> in(a->max_message());
  auto n = b->recv(in, 1s);
  ASSERT_TRUE(n.ok()) << n.error().message();
  EXPECT_EQ(*n, msg.size());
  EXPECT_TRUE(std::equal(msg.begin(), msg.end(), in.begin()));
}

// Each header field corrupted on its own: both sides refuse, write nothing.
TEST(ChannelAttach, RefusesEachCorruptedHeaderField) {
  struct Case {
    const char* what;
    std::function<void(layout::Header&)> corrupt;
    Errc code;
    const char* text;
  };
  const std::vector<Case> cases = {
      {"version", [](auto& h) { h.version.set(1); }, Errc::unsupported, "version 1, we speak 2"},
      {"flags", [](auto& h) { h.flags.set(1); }, Errc::unsupported, "unknown flags"},
      {"header size", [](auto& h) { h.header_bytes.set(128); }, Errc::bad_device_data, "header size 128"},
      {"window too big", [](auto& h) { h.window_bytes.set(h.window_bytes.get() + 64); },
       Errc::bad_device_data, "window size"},
      {"window too small", [](auto& h) { h.window_bytes.set(100); }, Errc::bad_device_data, "window size"},
      {"window huge", [](auto& h) { h.window_bytes.set(~0ull); }, Errc::bad_device_data, "window size"},
      {"capacity not pow2", [](auto& h) { h.ring[0].capacity.set(3000); }, Errc::bad_device_data, "capacity"},
      {"capacity tiny", [](auto& h) { h.ring[1].capacity.set(32); }, Errc::bad_device_data, "capacity"},
      {"capacity zero", [](auto& h) { h.ring[1].capacity.set(0); }, Errc::bad_device_data, "capacity"},
      {"capacity past end", [](auto& h) { h.ring[1].capacity.set(1ull << 40); }, Errc::bad_device_data,
       "runs past the window end"},
      {"capacity wraps", [](auto& h) { h.ring[0].capacity.set(1ull << 63); }, Errc::bad_device_data,
       "runs past the window end"},
      {"offset misaligned", [](auto& h) { h.ring[0].offset.set(h.ring[0].offset.get() + 8); },
       Errc::bad_device_data, "64-byte aligned"},
      {"offset in control area", [](auto& h) { h.ring[1].offset.set(64); }, Errc::bad_device_data,
       "past the control area"},
      {"offset past end", [](auto& h) { h.ring[1].offset.set(h.window_bytes.get()); }, Errc::bad_device_data,
       "runs past the window end"},
      {"offset huge", [](auto& h) { h.ring[1].offset.set(~0ull - 63); }, Errc::bad_device_data,
       "runs past the window end"},
      {"overlap", [](auto& h) { h.ring[1].offset.set(h.ring[0].offset.get() + 64); }, Errc::bad_device_data,
       "overlap"},
      {"max message zero", [](auto& h) { h.max_message.set(0); }, Errc::bad_device_data, "max message"},
      {"max message too big",
       [](auto& h) { h.max_message.set(static_cast<std::uint32_t>(h.ring[0].capacity.get() / 2)); },
       Errc::bad_device_data, "max message"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    Window w(16384);
    { auto a = must_attach(w, opts(0)); }  // formats; leaves cleanly
    c.corrupt(w.ctl()->header);
    const auto before = w.snapshot();
    for (unsigned side : {0u, 1u}) {
      auto r = Channel::attach(w.get(), w.size(), opts(side));
      expect_error(r, c.code, c.text);
      EXPECT_EQ(w.snapshot(), before) << "side " << side << " wrote to a window it refused";
    }
    EXPECT_TRUE(w.guards_intact());
  }
}

// ---------------------------------------------------------------- data path

struct Pair {
  explicit Pair(std::size_t size = 8192, std::size_t ring = 0) : w(size) {
    Options o0 = opts(0);
    o0.ring_bytes = ring;
    a = must_attach(w, o0);
    b = must_attach(w, opts(1));
  }
  Window w;
  std::unique_ptr<Channel> a, b;
};

TEST(Channel, RoundTripOfEverySizeAcrossManyWraps) {
  Pair p(8192);  // 2048-byte rings, max message 512
  ASSERT_TRUE(p.a && p.b);
  const std::size_t max = p.a->max_message();
  ASSERT_EQ(max, 512u);
  const std::size_t sizes[] = {0, 1, 7, 8, 9, 63, 64, 100, max - 1, max};
  std::vector<std::byte> in(max);
  std::uint64_t seq = 0, bytes = 0;
  // Both directions; several messages in flight at a time so wraps land at
  // every offset; far more bytes than the ring holds.
  while (bytes < 200 * p.a->ring_bytes()) {
    for (Channel* tx : {p.a.get(), p.b.get()}) {
      Channel* rx = tx == p.a.get() ? p.b.get() : p.a.get();
      std::vector<std::vector<std::byte>> sent;
      for (int k = 0; k < 3; ++k) {  // up to 3 in flight (fewer when large ones fill the ring)
        const std::size_t n = sizes[(seq * 7 + static_cast<std::uint64_t>(k)) % std::size(sizes)];
        auto m = pattern(n, seq);
        auto r = tx->try_send(m);
        ASSERT_TRUE(r.ok()) << r.error().message();
        if (!*r) {
          ASSERT_GT(k, 0) << "an empty ring refused a message";
          break;
        }
        sent.push_back(std::move(m));
        ++seq;
        bytes += n;
      }
      for (const auto& m : sent) {
        auto n = rx->recv(in, 0ns);
        ASSERT_TRUE(n.ok()) << n.error().message();
        ASSERT_EQ(*n, m.size());
        ASSERT_TRUE(std::equal(m.begin(), m.end(), in.begin()));
      }
      auto none = rx->try_peek();
      ASSERT_TRUE(none.ok());
      EXPECT_FALSE(none->has_value());
    }
  }
  EXPECT_TRUE(p.w.guards_intact());
}

TEST(Channel, ZeroCopyReserveCommitPeekRelease) {
  Pair p;
  ASSERT_TRUE(p.a && p.b);
  auto slot = p.a->try_reserve(100);
  ASSERT_TRUE(slot.ok() && slot->has_value());
  ASSERT_EQ((*slot)->size(), 100u);
  EXPECT_TRUE(p.w.contains(**slot));
  std::memset((*slot)->data(), 0x42, 100);
  // Not visible before commit.
  EXPECT_FALSE(p.b->try_peek()->has_value());
  expect_error(p.a->commit(101), Errc::invalid_argument, "reserved");
  ASSERT_TRUE(p.a->commit(60).ok());  // a shorter message than reserved
  expect_error(p.a->commit(0), Errc::invalid_argument, "nothing reserved");

  expect_error(p.b->release(), Errc::invalid_argument, "no message peeked");
  auto m = p.b->try_peek();
  ASSERT_TRUE(m.ok() && m->has_value());
  EXPECT_EQ((*m)->size(), 60u);
  EXPECT_TRUE(p.w.contains(**m));
  for (std::byte x : **m) EXPECT_EQ(x, std::byte{0x42});
  auto again = p.b->try_peek();  // the same message until released
  ASSERT_TRUE(again.ok() && again->has_value());
  EXPECT_EQ((*again)->data(), (*m)->data());
  ASSERT_TRUE(p.b->release().ok());
  EXPECT_FALSE(p.b->try_peek()->has_value());

  // A zero-length message.
  auto z = p.a->try_reserve(0);
  ASSERT_TRUE(z.ok() && z->has_value());
  ASSERT_TRUE(p.a->commit(0).ok());
  auto zm = p.b->peek(0ns);
  ASSERT_TRUE(zm.ok());
  EXPECT_EQ(zm->size(), 0u);
  ASSERT_TRUE(p.b->release().ok());
  EXPECT_TRUE(p.w.guards_intact());
}

// A new try_reserve replaces an uncommitted reservation, also when it finds
// no room: a commit after that has nothing to commit (it used to publish
// the earlier, abandoned reservation's bytes as a message).
TEST(Channel, CommitAfterAFailedReserveIsRefused) {
  Pair p;  // 2048-byte rings, max message 512
  ASSERT_TRUE(p.a && p.b);
  for (std::uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(p.a->try_send(pattern(504, i)).value());  // 1536 used
  auto small = p.a->try_reserve(8);
  ASSERT_TRUE(small.ok() && small->has_value());
  auto big = p.a->try_reserve(p.a->max_message());  // needs padding first: no room
  ASSERT_TRUE(big.ok());
  ASSERT_FALSE(big->has_value());
  expect_error(p.a->commit(8), Errc::invalid_argument, "nothing reserved");
  std::vector<std::byte> in(512);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(p.b->recv(in, 0ns).ok());
  EXPECT_FALSE(p.b->try_peek()->has_value()) << "the abandoned reservation was sent";
}

TEST(Channel, OversizeMessagesAndSmallBuffers) {
  Pair p;
  ASSERT_TRUE(p.a && p.b);
  const std::size_t max = p.a->max_message();
  expect_error(p.a->try_reserve(max + 1), Errc::invalid_argument, "exceeds the largest");
  std::vector<std::byte> big(max + 1);
  expect_error(p.a->try_send(big), Errc::invalid_argument, "exceeds the largest");
  expect_error(p.a->send(big, 0ns), Errc::invalid_argument, "exceeds the largest");
  const auto msg = pattern(32, 3);
  ASSERT_TRUE(p.a->try_send(msg).value());
  std::vector<std::byte> small(31);
  expect_error(p.b->recv(small, 0ns), Errc::invalid_argument, "too small");
  std::vector<std::byte> fits(32);  // the message stayed
  auto n = p.b->recv(fits, 0ns);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 32u);
  EXPECT_EQ(fits, msg);
}

TEST(Channel, FullRingWouldBlockUntilTheConsumerReleases) {
  Pair p;  // 2048-byte rings
  ASSERT_TRUE(p.a && p.b);
  const auto msg = pattern(56, 9);  // 64-byte records: 32 fit in 2048 bytes
  int sent = 0;
  for (;; ++sent) {
    auto r = p.a->try_send(msg);
    ASSERT_TRUE(r.ok()) << r.error().message();
    if (!*r) break;
  }
  EXPECT_EQ(sent, 32);
  auto slot = p.a->try_reserve(0);
  ASSERT_TRUE(slot.ok());
  EXPECT_FALSE(slot->has_value()) << "would block";
  auto t0 = std::chrono::steady_clock::now();
  expect_error(p.a->send(msg, 20ms), Errc::timeout, "no room");
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 20ms);

  ASSERT_TRUE(p.b->peek(0ns).ok());
  ASSERT_TRUE(p.b->release().ok());
  EXPECT_TRUE(p.a->try_send(msg).value());
  EXPECT_FALSE(p.a->try_send(msg).value());
  std::vector<std::byte> in(64);
  for (int i = 0; i < 32; ++i) ASSERT_TRUE(p.b->recv(in, 0ns).ok());
  expect_error(p.b->recv(in, 10ms), Errc::timeout, "no message");
  EXPECT_TRUE(p.w.guards_intact());
}

TEST(Channel, DeferredPublicationIsFlushedWhenNeeded) {
  Pair p;  // 2048-byte rings
  ASSERT_TRUE(p.a && p.b);
  const auto msg = pattern(24, 5);
  for (int i = 0; i < 3; ++i) {
    auto s = p.a->try_reserve(msg.size());
    ASSERT_TRUE(s.ok() && s->has_value());
    std::memcpy((*s)->data(), msg.data(), msg.size());
    ASSERT_TRUE(p.a->commit(msg.size(), Flush::later).ok());
  }
  // Deferred: the batch's first header is held back, so nothing is visible,
  // and the producer index (where a rejoining consumer starts) is not
  // published either.
  EXPECT_FALSE(p.b->try_peek()->has_value()) << "visible before flush";
  EXPECT_EQ(p.w.ctl()->ring[0].producer.value.get(), 0u) << "producer index published before flush";
  ASSERT_TRUE(p.a->flush_sent().ok());
  EXPECT_EQ(p.w.ctl()->ring[0].producer.value.get(), 3 * 32u);
  for (int i = 0; i < 3; ++i) {
    auto m = p.b->try_peek();
    ASSERT_TRUE(m.ok() && m->has_value());
    ASSERT_TRUE(p.b->release(Flush::later).ok());
  }
  const std::uint64_t cons = p.w.ctl()->ring[0].consumer.value.get();
  EXPECT_EQ(cons, 0u) << "consumer index published before flush";
  EXPECT_FALSE(p.b->try_peek()->has_value());  // finding the ring empty publishes
  EXPECT_EQ(p.w.ctl()->ring[0].consumer.value.get(), 3 * 32u);

  // A reserve that finds the ring full publishes what was committed: the
  // peer can drain it, no deadlock.
  int n = 0;
  for (;; ++n) {
    auto s = p.a->try_reserve(msg.size());
    ASSERT_TRUE(s.ok());
    if (!s->has_value()) break;
    ASSERT_TRUE(p.a->commit(msg.size(), Flush::later).ok());
  }
  EXPECT_EQ(n, 2048 / 32);
  for (int i = 0; i < n; ++i) {
    auto m = p.b->try_peek();
    ASSERT_TRUE(m.ok() && m->has_value()) << i;
    ASSERT_TRUE(p.b->release().ok());
  }
}

// Two threads, 1M messages of 0..64 bytes with a checksum, blocking calls
// (polling, no doorbell) and batched publication on both sides.
TEST(Channel, TwoThreadsStreamAMillionMessages) {
  Window w(64 * 1024);
  // The sender only makes non-blocking calls: its heartbeat thread keeps it
  // present for the receiver's blocking peek() (sanitizer builds are slow).
  Options o0 = opts(0), o1 = opts(1);
  o0.heartbeat_thread = o1.heartbeat_thread = true;
  auto a = must_attach(w, o0);
  auto b = must_attach(w, o1);
  ASSERT_TRUE(a && b);
  constexpr std::uint64_t kCount = 1'000'000;
  std::uint64_t sent_sum = 0, recv_sum = 0, received = 0;
  std::string recv_error;
  std::atomic<bool> rx_done{false};
  std::thread rx([&] {
    struct Done {
      std::atomic<bool>& d;
      ~Done() { d = true; }
    } done{rx_done};
    std::vector<std::byte> expect;
    for (std::uint64_t i = 0; i < kCount; ++i) {
      auto m = b->peek(10s);
      if (!m) {
        recv_error = m.error().message();
        return;
      }
      const std::size_t n = i % 65;
      if (m->size() != n) {
        recv_error = "message " + std::to_string(i) + " has " + std::to_string(m->size()) + " bytes";
        return;
      }
      for (std::size_t k = 0; k < n; ++k) {
        const auto v = static_cast<std::uint8_t>((*m)[k]);
        if (v != static_cast<std::uint8_t>(i + k)) {
          recv_error = "message " + std::to_string(i) + " byte " + std::to_string(k) + " differs";
          return;
        }
        recv_sum += v;
      }
      if (auto r = b->release(i % 16 == 15 ? Flush::now : Flush::later); !r) {
        recv_error = r.error().message();
        return;
      }
      ++received;
    }
  });
  struct Joiner {  // an ASSERT below returns early: never leave rx joinable
    std::thread& t;
    ~Joiner() {
      if (t.joinable()) t.join();
    }
  } joiner{rx};
  for (std::uint64_t i = 0; i < kCount; ++i) {
    const std::size_t n = i % 65;
    std::optional<std::span<std::byte>> slot;
    for (;;) {
      auto s = a->try_reserve(n);
      ASSERT_TRUE(s.ok()) << s.error().message();
      if (*s) {
        slot = *s;
        break;
      }
      if (rx_done) break;  // the receiver gave up: do not spin forever
      std::this_thread::yield();
    }
    if (!slot) {
      rx.join();
      FAIL() << "receiver stopped: " << recv_error;
    }
    for (std::size_t k = 0; k < n; ++k) {
      (*slot)[k] = std::byte(static_cast<std::uint8_t>(i + k));
      sent_sum += static_cast<std::uint8_t>(i + k);
    }
    ASSERT_TRUE(a->commit(n, i % 32 == 31 ? Flush::now : Flush::later).ok());
  }
  ASSERT_TRUE(a->flush_sent().ok());
  rx.join();
  EXPECT_EQ(recv_error, "");
  EXPECT_EQ(received, kCount);
  EXPECT_EQ(recv_sum, sent_sum);
  EXPECT_TRUE(w.guards_intact());
}

// ---------------------------------------------------------------- doorbell, fork

// Counts rings and waits around another doorbell.
class CountingDoorbell final : public Doorbell {
 public:
  explicit CountingDoorbell(Doorbell& inner) : inner_(inner) {}
  Result<void> ring(std::uint32_t peer_id) override {
    ++rings;
    last_peer = peer_id;
    return inner_.ring(peer_id);
  }
  Result<bool> wait(std::chrono::nanoseconds timeout) override {
    ++waits;
    auto r = inner_.wait(timeout);
    if (r.ok() && *r) ++woken;
    return r;
  }
  std::atomic<int> rings{0}, waits{0}, woken{0};
  std::atomic<std::uint32_t> last_peer{0};

 private:
  Doorbell& inner_;
};

// Runs `child` in a forked process; returns its exit status (0: success).
int run_child(const std::function<int()>& child, pid_t* pid_out = nullptr, bool wait = true) {
  const pid_t pid = ::fork();
  if (pid == 0) _exit(child());
  if (pid_out != nullptr) *pid_out = pid;
  if (!wait) return 0;
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

TEST(Channel, BlockingWithEventfdDoorbellAcrossFork) {
  Window w(64 * 1024, /*shared=*/true);
  auto bells = pci::EventfdDoorbell::pair("test bell");
  ASSERT_TRUE(bells.ok()) << bells.error().message();
  constexpr int kRounds = 200;
  {
    CountingDoorbell bell(bells->first);
    Options o = opts(0, &bell);
    o.spin = 0ns;  // always sleep: every wake-up goes through the eventfd
    // No heartbeat thread on this side (its blocking calls keep its heartbeat
    // moving): a child forked from a multithreaded process may inherit a lock
    // another thread held, and this one hung once under ASan when the child
    // then started its own thread.
    o.heartbeat_thread = false;
    auto a = must_attach(w, o);
    ASSERT_TRUE(a);
    pid_t pid = 0;
    run_child(
        [&]() -> int {
          CountingDoorbell cbell(bells->second);
          Options oc = opts(1, &cbell);
          oc.spin = 0ns;
          oc.heartbeat_thread = true;
          auto b = Channel::attach(w.get(), w.size(), oc);
          if (!b) return 10;
          std::vector<std::byte> in((*b)->max_message());
          for (int i = 0; i < kRounds; ++i) {
            auto n = (*b)->recv(in, 10s);
            if (!n) return 11;
            // Sleep now and then so the parent has to sleep too.
            if (i % 50 == 0) std::this_thread::sleep_for(2ms);
            if (!(*b)->send(std::span<const std::byte>(in.data(), *n), 10s)) return 12;
          }
          return cbell.rings.load() > 0 && cbell.woken.load() > 0 ? 0 : 13;
        },
        &pid, /*wait=*/false);
    ASSERT_TRUE(a->wait_peer(10s).ok());
    std::vector<std::byte> in(a->max_message());
    for (int i = 0; i < kRounds; ++i) {
      const auto msg = pattern(static_cast<std::size_t>(i) % 200, static_cast<std::uint64_t>(i));
      ASSERT_TRUE(a->send(msg, 10s).ok());
      auto n = a->recv(in, 10s);
      ASSERT_TRUE(n.ok()) << n.error().message();
      ASSERT_EQ(*n, msg.size());
      ASSERT_TRUE(std::equal(msg.begin(), msg.end(), in.begin()));
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 0);
    EXPECT_GT(bell.rings.load(), 0);
    EXPECT_GT(bell.woken.load(), 0);
    EXPECT_EQ(bell.last_peer.load(), 101u);  // the child's published doorbell id
  }
  EXPECT_TRUE(w.guards_intact());
}

// A doorbell that counts rings and runs `on_wait` (the peer acting while we
// sleep) instead of sleeping.
class ScriptedDoorbell final : public Doorbell {
 public:
  Result<void> ring(std::uint32_t) override {
    ++rings;
    return ok();
  }
  Result<bool> wait(std::chrono::nanoseconds) override {
    if (on_wait) on_wait();
    return true;
  }
  int rings = 0;
  std::function<void()> on_wait;
};

// The producer rings a sleeping consumer once per ticket it sees. A consumer
// that restarts counts its tickets from 1 again, so its first sleep can
// carry the very ticket the producer last rang the previous incarnation for:
// that wake-up must not be skipped (the sleeper would lie there a whole slice).
TEST(Channel, RejoinedPeersFirstSleepIsRung) {
  Window w(8192);
  ScriptedDoorbell abell, bbell;
  auto a = must_attach(w, opts(0, &abell));
  ASSERT_TRUE(a);
  Options ob = opts(1, &bbell);
  ob.spin = 0ns;
  std::vector<std::byte> in(64);
  int rings_seen_while_asleep = 0;
  bbell.on_wait = [&] {
    // b stored its ticket and looked at the ring: it sleeps. a sends now.
    const int before = abell.rings;
    ASSERT_TRUE(a->try_send(pattern(8, 1)).value());
    rings_seen_while_asleep += abell.rings - before;
  };
  for (int incarnation = 0; incarnation < 2; ++incarnation) {
    auto b = must_attach(w, ob);
    ASSERT_TRUE(b);
    auto n = b->recv(in, 1s);
    ASSERT_TRUE(n.ok()) << n.error().message();
    EXPECT_EQ(rings_seen_while_asleep, incarnation + 1)
        << "incarnation " << incarnation << " slept and was not rung";
  }
}

// A channel whose side was taken over by another attach is detached later
// (it may not even have noticed yet). Its destructor must leave the new
// owner's side line alone: clearing its tickets while it sleeps makes the
// peer skip the ring it is waiting for.
TEST(Channel, DetachAfterATakeoverLeavesTheNewOwnersTicketsAlone) {
  Window w(8192);
  ScriptedDoorbell abell, bbell;
  auto a = must_attach(w, opts(0, &abell));
  Options ob = opts(1, &bbell);
  ob.spin = 0ns;
  auto b1 = must_attach(w, ob);
  auto b2 = must_attach(w, ob);  // takes side 1 over
  ASSERT_TRUE(a && b1 && b2);
  const std::uint64_t b2_session = w.ctl()->side[1].session.get();
  int rung = -1;
  bbell.on_wait = [&] {
    if (rung >= 0) return;
    // b2 sleeps with its ticket armed; the old b1 goes away, then a sends.
    b1.reset();
    const int before = abell.rings;
    ASSERT_TRUE(a->try_send(pattern(8, 1)).value());
    rung = abell.rings - before;
  };
  std::vector<std::byte> in(64);
  auto n = b2->recv(in, 1s);
  ASSERT_TRUE(n.ok()) << n.error().message();
  EXPECT_EQ(rung, 1) << "the sleeping new owner of side 1 was not rung";
  EXPECT_EQ(w.ctl()->side[1].session.get(), b2_session);
}

// ---------------------------------------------------------------- liveness

TEST(Channel, PeerGoneWhenItsHeartbeatStops) {
  Window w(8192);
  Options o0 = opts(0);
  o0.peer_timeout = 200ms;
  auto a = must_attach(w, o0);
  auto b = must_attach(w, opts(1));  // no heartbeat thread: it falls silent
  ASSERT_TRUE(a && b);
  EXPECT_TRUE(a->peer_present());
  std::vector<std::byte> in(64);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = a->recv(in, 10s);
  const auto took = std::chrono::steady_clock::now() - t0;
  expect_error(r, Errc::peer_gone, "heartbeat has not moved");
  EXPECT_GE(took, 180ms);  // counted from when a last saw b's heartbeat move, just before
  EXPECT_LT(took, 500ms);
  EXPECT_FALSE(a->peer_present());
  // A message already there is still delivered.
  ASSERT_TRUE(b->try_send(pattern(8, 1)).value());
  EXPECT_TRUE(a->recv(in, 10s).ok());
  // A beat brings it back.
  b->heartbeat();
  EXPECT_TRUE(a->peer_present());
}

TEST(Channel, HeartbeatThreadKeepsThePeerPresent) {
  Window w(8192);
  Options o0 = opts(0), o1 = opts(1);
  o0.peer_timeout = o1.peer_timeout = 100ms;
  o0.heartbeat_thread = o1.heartbeat_thread = true;
  auto a = must_attach(w, o0);
  auto b = must_attach(w, o1);
  ASSERT_TRUE(a && b);
  std::vector<std::byte> in(64);
  expect_error(a->recv(in, 400ms), Errc::timeout, "no message within 400 ms");
  EXPECT_TRUE(a->peer_present());
  EXPECT_TRUE(b->peer_present());
}

TEST(Channel, PeerDetachIsSeenAtOnce) {
  Window w(8192);
  auto a = must_attach(w, opts(0));
  auto b = must_attach(w, opts(1));
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(a->wait_peer(0ms).ok());
  b.reset();
  std::vector<std::byte> in(64);
  const auto t0 = std::chrono::steady_clock::now();
  expect_error(a->recv(in, 10s), Errc::peer_gone, "the peer detached");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 100ms);
  expect_error(a->wait_peer(20ms), Errc::timeout, "detached");
}

TEST(Channel, AnotherAttachOfTheSameSideBreaksTheOldOne) {
  Window w(8192);
  auto a = must_attach(w, opts(0));
  auto b1 = must_attach(w, opts(1));
  auto b2 = must_attach(w, opts(1));
  ASSERT_TRUE(a && b1 && b2);
  b1->heartbeat();
  EXPECT_TRUE(b1->broken());
  expect_error(b1->try_send(pattern(1, 1)), Errc::broken, "another process attached as side 1");
  b1.reset();  // must not clear b2's session
  EXPECT_NE(w.ctl()->side[1].session.get(), 0u);
  EXPECT_TRUE(a->peer_present());
}

// ---------------------------------------------------------------- rejoin

TEST(Channel, RejoinAfterACleanRestart) {
  Window w(8192);
  auto a = must_attach(w, opts(0));
  auto b = must_attach(w, opts(1));
  ASSERT_TRUE(a && b);
  std::vector<std::byte> in(512);
  ASSERT_TRUE(a->try_send(pattern(10, 1)).value());
  ASSERT_TRUE(b->recv(in, 0ns).ok());
  const std::uint64_t old_session = a->peer_session();
  b.reset();
  EXPECT_FALSE(a->peer_present());
  // Sent while nobody listens: dropped when the peer comes back.
  ASSERT_TRUE(a->try_send(pattern(20, 2)).value());
  b = must_attach(w, opts(1));
  ASSERT_TRUE(b);
  EXPECT_TRUE(a->peer_present());
  EXPECT_NE(a->peer_session(), old_session);
  EXPECT_FALSE(b->try_peek()->has_value()) << "stale message delivered to the new session";
  for (int i = 0; i < 100; ++i) {  // both directions work, across wraps
    const auto m = pattern(static_cast<std::size_t>(i) * 5 % 300, static_cast<std::uint64_t>(i));
    ASSERT_TRUE(a->send(m, 1s).ok());
    auto n = b->recv(in, 1s);
    ASSERT_TRUE(n.ok()) << n.error().message();
    ASSERT_EQ(*n, m.size());
    ASSERT_TRUE(b->send(std::span<const std::byte>(in.data(), *n), 1s).ok());
    auto k = a->recv(in, 1s);
    ASSERT_TRUE(k.ok()) << k.error().message();
    ASSERT_TRUE(std::equal(m.begin(), m.end(), in.begin()));
  }
  EXPECT_FALSE(a->broken());
  EXPECT_TRUE(w.guards_intact());
}

// A producer that died after storing a record's header but before its
// index store: the record is visible to the consumer already, so the next
// incarnation continues after it instead of overwriting it under the reader.
// An unflushed batch is invisible (its first header is held back) and is
// overwritten.
TEST(Channel, RejoinContinuesAfterRecordsVisibleBeyondTheIndex) {
  Window w(8192);
  auto a = must_attach(w, opts(0));
  auto b = must_attach(w, opts(1));
  ASSERT_TRUE(a && b);
  for (std::uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(a->try_send(pattern(24, i)).value());
  for (std::uint64_t i = 0; i < 2; ++i) {  // an open batch: never flushed
    auto s = a->try_reserve(24);
    ASSERT_TRUE(s.ok() && s->has_value());
    ASSERT_TRUE(a->commit(24, Flush::later).ok());
  }
  a.reset();
  w.ctl()->ring[0].producer.value.set(32);  // as if the last two index stores never happened
  a = must_attach(w, opts(0));
  ASSERT_TRUE(a);
  EXPECT_EQ(w.ctl()->ring[0].producer.value.get(), 3 * 32u);
  ASSERT_TRUE(a->try_send(pattern(40, 9)).value());
  std::vector<std::byte> in(64);
  for (std::uint64_t i = 0; i < 3; ++i) {
    auto n = b->recv(in, 0ns);
    ASSERT_TRUE(n.ok()) << n.error().message();
    EXPECT_EQ(std::vector<std::byte>(in.begin(), in.begin() + static_cast<std::ptrdiff_t>(*n)),
              pattern(24, i));
  }
  auto n = b->recv(in, 0ns);
  ASSERT_TRUE(n.ok()) << n.error().message();
  EXPECT_EQ(std::vector<std::byte>(in.begin(), in.begin() + static_cast<std::ptrdiff_t>(*n)), pattern(40, 9));
  EXPECT_FALSE(b->try_peek()->has_value());
  EXPECT_FALSE(a->broken() || b->broken());
  EXPECT_TRUE(w.guards_intact());
}

// A producer detaches (or dies) with a batch open: its first header is held
// back, so the consumer never saw the batch, but the records after it were
// stored with their lap tags, some of them past the ring's end in the next
// lap. The next incarnation starts at the held-back head and, at its first
// wrap through a padding record, lands on offset 0 of that next lap, where
// such a stale record of the right lap still sits. The consumer must find
// "nothing yet" there, not the dead batch's record (which it would hand out
// while the producer writes over it, then run past the producer's index).
TEST(Channel, RejoinAfterAnOpenBatchDoesNotExposeItsRecordsAtTheWrap) {
  Window w(8192);  // 2048-byte rings, max message 512
  auto a = must_attach(w, opts(0));
  auto b = must_attach(w, opts(1));
  ASSERT_TRUE(a && b);
  ASSERT_EQ(a->ring_bytes(), 2048u);
  std::vector<std::byte> in(512);
  for (std::uint64_t i = 0; i < 2; ++i) {  // [0, 1024), received and released
    ASSERT_TRUE(a->try_send(pattern(504, i)).value());
    ASSERT_TRUE(b->recv(in, 0ns).ok());
  }
  for (std::uint64_t i = 0; i < 3; ++i) {  // a batch at 1024, 1536 and 2048 (lap 1, offset 0)
    auto r = a->try_reserve(504);
    ASSERT_TRUE(r.ok() && r->has_value());
    std::memcpy((**r).data(), pattern(504, 10 + i).data(), 504);
    ASSERT_TRUE(a->commit(504, Flush::later).ok());
  }
  EXPECT_FALSE(b->try_peek()->has_value()) << "the batch's head is held back";
  a.reset();  // never flushed
  a = must_attach(w, opts(0));
  ASSERT_TRUE(a);
  ASSERT_TRUE(a->try_send(pattern(504, 20)).value());  // at 1024
  ASSERT_TRUE(a->try_send(pattern(400, 21)).value());  // at 1536, up to 1944
  // 504 bytes do not fit the 104 left before the end: padding at 1944, then
  // the reservation at offset 0 of lap 1, not committed yet.
  auto r = a->try_reserve(504);
  ASSERT_TRUE(r.ok() && r->has_value());
  for (std::uint64_t i = 20; i < 22; ++i) {
    auto n = b->recv(in, 0ns);
    ASSERT_TRUE(n.ok()) << n.error().message();
    EXPECT_EQ(std::vector<std::byte>(in.begin(), in.begin() + static_cast<std::ptrdiff_t>(*n)),
              pattern(i == 20 ? 504 : 400, i));
  }
  auto stale = b->try_peek();
  ASSERT_TRUE(stale.ok()) << stale.error().message();
  EXPECT_FALSE(stale->has_value()) << "the dead batch's record at lap 1 offset 0 was delivered";
  if (stale->has_value()) {
    ASSERT_TRUE(b->release().ok());
  }
  std::memcpy((**r).data(), pattern(504, 22).data(), 504);
  ASSERT_TRUE(a->commit(504).ok());
  auto m = b->recv(in, 0ns);
  ASSERT_TRUE(m.ok()) << m.error().message();
  EXPECT_EQ(std::vector<std::byte>(in.begin(), in.begin() + static_cast<std::ptrdiff_t>(*m)),
            pattern(504, 22));
  ASSERT_TRUE(a->try_send(pattern(8, 23)).value());  // the producer still trusts the consumer's index
  EXPECT_FALSE(a->broken() || b->broken());
  EXPECT_TRUE(w.guards_intact());
}

// Review 3, bug A. A producer stores a padding record (in reserve, visible
// by its lap tag) before it publishes its index; the consumer skips it and
// publishes a consumer index past the producer's published one, and the
// producer reads that index back. Then the consumer restarts (clean detach
// and attach). The rejoin used to publish the producer's published index as
// its consumer index: lower than the producer had seen, so the honest
// producer's next refresh said "peer consumer index moved backwards" and it
// latched broken. The rejoin must keep the consumer index it finds when that
// is ahead of the peer's producer index (within one capacity).
TEST(Channel, ConsumerRejoinAfterSkippingUnpublishedPaddingKeepsItsIndex) {
  Window w(4096);
  auto small = [](unsigned side) {
    Options o = opts(side);
    o.ring_bytes = 256;
    o.max_message = 64;  // max record 72
    return o;
  };
  auto a = must_attach(w, small(0));
  auto b = must_attach(w, small(1));
  ASSERT_TRUE(a && b);
  const std::vector<std::byte> msg = pattern(64, 7);
  std::vector<std::byte> in(64);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(b->try_send(msg).value());  // 3 x 72 bytes: producer at 216
    ASSERT_TRUE(a->recv(in, 0ns).ok());     // consumer publishes 216
  }
  // b reserves 64: padding [216, 256) stored, its index still 216.
  auto r = b->try_reserve(64);
  ASSERT_TRUE(r.ok() && r->has_value());
  // a skips the padding, finds nothing more, and publishes 256.
  auto p = a->try_peek();
  ASSERT_TRUE(p.ok());
  ASSERT_FALSE(p->has_value());
  ASSERT_EQ(w.ctl()->ring[1].consumer.value.get(), 256u);
  ASSERT_EQ(w.ctl()->ring[1].producer.value.get(), 216u);
  // b fills a deferred batch (index still 216); a reserve refreshes its copy
  // of the consumer index (256) and succeeds without publishing.
  ASSERT_TRUE(b->commit(64, Flush::later).ok());  // 256 -> 328
  for (std::size_t n : {64u, 0u}) {               // -> 400 -> 408
    auto s = b->try_reserve(n);
    ASSERT_TRUE(s.ok() && s->has_value());
    ASSERT_TRUE(b->commit(n, Flush::later).ok());
  }
  auto s = b->try_reserve(64);  // refresh: consumer 256
  ASSERT_TRUE(s.ok() && s->has_value());
  a.reset();
  a = must_attach(w, small(0));
  ASSERT_TRUE(a);
  EXPECT_EQ(w.ctl()->ring[1].consumer.value.get(), 256u) << "the rejoin moved the consumer index backwards";
  ASSERT_TRUE(b->commit(64, Flush::now).ok());  // 480 published
  auto t = b->try_reserve(64);                  // the ring looks full: refresh
  EXPECT_TRUE(t.ok()) << t.error().message();
  EXPECT_FALSE(b->broken());
  // The batch b committed was published after a came back: a gets it, and
  // both directions go on working.
  for (std::size_t n : {64u, 64u, 0u, 64u}) {
    auto k = a->recv(in, 0ns);
    ASSERT_TRUE(k.ok()) << k.error().message();
    EXPECT_EQ(*k, n);
  }
  EXPECT_FALSE(a->try_peek()->has_value());
  ASSERT_TRUE(a->try_send(pattern(10, 3)).value());
  auto k = b->recv(in, 0ns);
  ASSERT_TRUE(k.ok()) << k.error().message();
  EXPECT_EQ(*k, 10u);
  EXPECT_FALSE(a->broken() || b->broken());
  EXPECT_TRUE(w.guards_intact());
}

// The peer is a child process that dies without detaching (its session
// stays in the window); a new incarnation rejoins and the survivor, which
// kept its channel, goes on working. Messages the dead child had published
// and the survivor had not read are delivered; messages the survivor sent to
// the dead child are dropped.
TEST(Channel, RejoinAfterAPeerCrash) {
  Window w(16384, /*shared=*/true);
  Options o0 = opts(0);
  o0.peer_timeout = 300ms;
  o0.heartbeat_thread = true;
  auto a = must_attach(w, o0);
  ASSERT_TRUE(a);
  auto incarnation = [&](int id, bool crash) {
    return [&w, id, crash]() -> int {
      // No thread in the child: it was forked from a process that has one
      // (our heartbeat thread). Its blocking calls keep its heartbeat moving.
      Options o = opts(1);
      auto b = Channel::attach(w.get(), w.size(), o);
      if (!b) return 20;
      std::vector<std::byte> in(256);
      auto n = (*b)->recv(in, 10s);  // "hello"
      if (!n || *n != 5) return 21;
      const std::string reply = "incarnation " + std::to_string(id);
      if (!(*b)->send(std::as_bytes(std::span(reply)), 10s)) return 22;
      if (crash) {
        (void)(*b)->try_send(std::as_bytes(std::span(std::string_view("last words"))));
        _exit(0);  // no destructor: the session stays, the heartbeat stops
      }
      return 0;
    };
  };
  const auto hello = std::as_bytes(std::span(std::string_view("hello")));
  std::vector<std::byte> in(256);
  for (int id = 1; id <= 2; ++id) {
    SCOPED_TRACE(id);
    const std::uint64_t before = a->peer_session();
    pid_t pid = 0;
    run_child(incarnation(id, /*crash=*/true), &pid, /*wait=*/false);
    // Wait for the new incarnation (a new session id), then talk.
    const auto until = std::chrono::steady_clock::now() + 10s;
    while (a->peer_session() == before || a->peer_session() == 0) {
      ASSERT_LT(std::chrono::steady_clock::now(), until);
      std::this_thread::sleep_for(1ms);
    }
    ASSERT_TRUE(a->send(hello, 10s).ok());
    auto n = a->recv(in, 10s);
    ASSERT_TRUE(n.ok()) << n.error().message();
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(in.data()), *n), "incarnation " + std::to_string(id));
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
    // The dead child's last message is there; then silence and peer_gone.
    n = a->recv(in, 10s);
    ASSERT_TRUE(n.ok()) << n.error().message();
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(in.data()), *n), "last words");
    EXPECT_NE(a->peer_session(), 0u);  // crashed: the session is still there
    expect_error(a->recv(in, 10s), Errc::peer_gone, "heartbeat");
    // Sent to the dead incarnation: the next one must not see it (its
    // first recv would get 11 bytes instead of "hello").
    ASSERT_TRUE(a->try_send(pattern(11, 7)).value());
  }
  EXPECT_FALSE(a->broken());
  EXPECT_TRUE(w.guards_intact());
}

// ---------------------------------------------------------------- hostile peer

// Side 0 is us; side 1 is a real channel we use to get the ring into a
// state, then corrupt by hand.
struct Hostile : ::testing::Test {
  void SetUp() override {
    Options o0 = opts(0);
    o0.ring_bytes = 1024;  // max message 256, max record 264
    a = must_attach(w, o0);
    b = must_attach(w, opts(1));
    ASSERT_TRUE(a && b);
  }
  Control& c() { return *w.ctl(); }
  std::uint8_t* rx_data() { return w.bytes() + c().header.ring[1].offset.get(); }  // ring 1: b -> a
  // A record header at ring position `pos` (offset pos mod 1024), tagged
  // with pos's lap unless `lap` says otherwise.
  void write_record(std::uint64_t pos, std::uint32_t len, std::uint32_t kind, std::int64_t lap = -1) {
    le64 word;
    const std::uint64_t tag = lap < 0 ? pos / 1024 : static_cast<std::uint64_t>(lap);
    word.set((tag << layout::kTagShift) | (std::uint64_t{kind} << 32) | len);
    std::memcpy(rx_data() + pos % 1024, &word, 8);
  }
  // b sends and a receives 8-byte messages (16-byte records) until both are
  // at ring offset `pos`.
  void advance_to(std::uint64_t pos) {
    std::vector<std::byte> in(8);
    while (c().ring[1].producer.value.get() < pos) {
      ASSERT_TRUE(b->try_send(pattern(8, 0)).value());
      ASSERT_TRUE(a->recv(in, 0ns).ok());
    }
    ASSERT_EQ(c().ring[1].producer.value.get(), pos);
  }
  // The op must fail with bad_device_data naming `text`, then every call
  // fails with broken and the window stays as it was.
  template <class T>
  void expect_violation(const Result<T>& r, const std::string& text) {
    expect_error(r, Errc::bad_device_data, text);
    EXPECT_TRUE(a->broken());
    const auto frozen = w.snapshot();
    std::vector<std::byte> in(64);
    expect_error(a->try_peek(), Errc::broken, text);
    expect_error(a->recv(in, 10ms), Errc::broken, text);
    expect_error(a->release(), Errc::broken, "");
    expect_error(a->try_reserve(8), Errc::broken, "");
    expect_error(a->try_send(pattern(8, 1)), Errc::broken, "");
    expect_error(a->send(pattern(8, 1), 10ms), Errc::broken, "");
    expect_error(a->commit(0), Errc::broken, "");
    expect_error(a->flush_sent(), Errc::broken, "");
    expect_error(a->flush_released(), Errc::broken, "");
    a->heartbeat();
    EXPECT_EQ(w.snapshot(), frozen) << "a broken channel wrote to the window";
    EXPECT_TRUE(w.guards_intact());
  }
  Window w{4096};
  std::unique_ptr<Channel> a, b;
};

// The consumer finds records by their headers: the peer's producer index is
// only where a rejoining consumer starts. Garbage in it changes nothing on
// the data path.
TEST_F(Hostile, ProducerIndexIsNotTrustedOnTheDataPath) {
  for (const std::uint64_t v :
       {std::uint64_t{1024 + 8}, std::uint64_t{12}, ~std::uint64_t{0} - 7, std::uint64_t{0}}) {
    poke(c().ring[1].producer.value, v);
    auto m = a->try_peek();
    ASSERT_TRUE(m.ok()) << m.error().message();
    EXPECT_FALSE(m->has_value()) << "a message out of nothing, producer index " << v;
  }
  ASSERT_TRUE(b->try_send(pattern(8, 3)).value());
  poke(c().ring[1].producer.value, 12);
  std::vector<std::byte> in(8);
  auto n = a->recv(in, 0ns);
  ASSERT_TRUE(n.ok()) << n.error().message();
  EXPECT_EQ(in, pattern(8, 3));
  EXPECT_FALSE(a->broken());
}

// A header of an earlier lap, or of a later one, at the consumer's position
// is "nothing yet": never read as a record.
TEST_F(Hostile, RecordOfAnotherLapIsNotThere) {
  advance_to(1024 - 16);
  write_record(1024 - 16, 8, layout::kKindMessage, 1);  // lap 1 at a lap-0 position
  EXPECT_FALSE(a->try_peek()->has_value());
  write_record(1024 - 16, 8, layout::kKindMessage, 0xffffff);  // the lap "before" 0
  EXPECT_FALSE(a->try_peek()->has_value());
  write_record(1024 - 16, 8, layout::kKindMessage);  // this lap: there
  auto m = a->try_peek();
  ASSERT_TRUE(m.ok() && m->has_value());
  EXPECT_EQ((*m)->size(), 8u);
  EXPECT_FALSE(a->broken());
}

TEST_F(Hostile, RecordLengthAboveMaxMessage) {
  ASSERT_TRUE(b->try_send(pattern(8, 0)).value());
  write_record(0, 257, layout::kKindMessage);
  expect_violation(a->try_peek(), "has length 0x101, larger than the max message 0x100");
}

TEST_F(Hostile, HugeRecordLength) {
  ASSERT_TRUE(b->try_send(pattern(8, 0)).value());
  write_record(0, 0xffffffff, layout::kKindMessage);
  expect_violation(a->try_peek(), "larger than the max message");
}

TEST_F(Hostile, BadRecordKind) {
  ASSERT_TRUE(b->try_send(pattern(8, 0)).value());
  write_record(0, 8, 7);
  expect_violation(a->try_peek(), "has kind 0x7");
}

TEST_F(Hostile, ZeroedRecordIsNothingYet) {
  ASSERT_TRUE(b->try_send(pattern(8, 0)).value());
  std::memset(rx_data(), 0, 64);
  EXPECT_FALSE(a->try_peek()->has_value());
  EXPECT_FALSE(a->broken());
}

TEST_F(Hostile, MessageStraddlingTheEnd) {
  advance_to(1024 - 16);
  write_record(1024 - 16, 32, layout::kKindMessage);
  expect_violation(a->try_peek(), "straddles the ring's end");
}

TEST_F(Hostile, PaddingWhereTheLargestMessageFits) {
  write_record(0, 1024 - 8, layout::kKindPadding);
  expect_violation(a->try_peek(), "padding record at ring offset 0x0 where the largest message fits");
}

TEST_F(Hostile, PaddingWithTheWrongLength) {
  advance_to(1024 - 16);
  write_record(1024 - 16, 4, layout::kKindPadding);
  expect_violation(a->try_peek(), "has length 0x4, 0x8 expected");
}

TEST_F(Hostile, ValidPaddingIsSkipped) {
  advance_to(1024 - 16);
  write_record(1024 - 16, 8, layout::kKindPadding);
  EXPECT_FALSE(a->try_peek()->has_value());  // offset 0 still holds lap 0's first header
  write_record(1024, 3, layout::kKindMessage);
  auto m = a->try_peek();
  ASSERT_TRUE(m.ok() && m->has_value()) << (m.ok() ? "" : m.error().message());
  EXPECT_EQ((*m)->size(), 3u);
  EXPECT_EQ(reinterpret_cast<const std::uint8_t*>((*m)->data()), rx_data() + 8);
}

TEST_F(Hostile, ConsumerIndexPastOurProducer) {
  // Fill our ring so the next reserve must re-read the peer's index.
  while (a->try_send(pattern(56, 0)).value()) {
  }
  poke(c().ring[0].consumer.value, 1024 + 64);
  expect_violation(a->try_reserve(8),
                   "peer consumer index 0x440 is 0x40 bytes past our producer index 0x400");
}

TEST_F(Hostile, ConsumerIndexBackwards) {
  std::vector<std::byte> in(64);
  while (a->try_send(pattern(56, 0)).value()) {
  }
  ASSERT_TRUE(b->recv(in, 0ns).ok());
  ASSERT_TRUE(a->try_send(pattern(56, 0)).value());  // a learns consumer 0x40
  poke(c().ring[0].consumer.value, 0);
  expect_violation(a->try_reserve(8), "peer consumer index moved backwards from 0x40 to 0x0");
}

TEST_F(Hostile, ConsumerIndexNotAMultipleOf8) {
  while (a->try_send(pattern(56, 0)).value()) {
  }
  poke(c().ring[0].consumer.value, 4);
  expect_violation(a->try_reserve(8), "not a multiple of 8");
}

TEST(ChannelRejoinHostile, BadIndicesRefusedAtAttach) {
  Window w(4096);
  { auto a = must_attach(w, opts(0)); }
  w.ctl()->ring[1].producer.value.set(13);
  auto r = Channel::attach(w.get(), w.size(), opts(0));
  expect_error(r, Errc::bad_device_data, "peer producer index 0xd is not a multiple of 8");
  w.ctl()->ring[1].producer.value.set(0);
  w.ctl()->ring[0].consumer.value.set(5);
  expect_error(Channel::attach(w.get(), w.size(), opts(0)), Errc::bad_device_data, "peer consumer index 0x5");
  // An inconsistent producer index of our own is reset to the consumer's.
  w.ctl()->ring[0].consumer.value.set(64);
  w.ctl()->ring[0].producer.value.set(64 + 4096);
  auto a = must_attach(w, opts(0));
  ASSERT_TRUE(a);
  EXPECT_EQ(w.ctl()->ring[0].producer.value.get(), 64u);
  EXPECT_TRUE(a->try_send(pattern(8, 1)).value());
  EXPECT_TRUE(w.guards_intact());
}

// Review 3, bug B. A bad value from the peer fails the attach before
// anything is written: the window stays byte for byte as it was. (join used
// to store our consumer index before it checked the peer's consumer index.)
TEST(ChannelRejoinHostile, RefusedAttachLeavesTheWindowUntouched) {
  Window w(4096);
  { auto a = must_attach(w, opts(0)); }
  // The peer published 64 bytes we have not consumed (so a join would move
  // our consumer index), and its consumer index for our ring is bad.
  w.ctl()->ring[1].producer.value.set(64);
  w.ctl()->ring[0].consumer.value.set(5);
  const auto before = w.snapshot();
  expect_error(Channel::attach(w.get(), w.size(), opts(0)), Errc::bad_device_data, "peer consumer index 0x5");
  EXPECT_EQ(w.snapshot(), before) << "a refused attach wrote to the window";
  w.ctl()->ring[0].consumer.value.set(0);
  w.ctl()->ring[1].producer.value.set(61);
  const auto before2 = w.snapshot();
  expect_error(Channel::attach(w.get(), w.size(), opts(0)), Errc::bad_device_data,
               "peer producer index 0x3d");
  EXPECT_EQ(w.snapshot(), before2) << "a refused attach wrote to the window";
  EXPECT_TRUE(w.guards_intact());
}

// Our consumer index found in the window is kept on rejoin when it is ahead
// of the peer's producer index by at most one capacity (the peer may have
// read it: moving it back would look like a violation); any other value is
// not trusted and we start at the peer's producer index.
TEST(ChannelRejoinHostile, OwnConsumerIndexKeptOnlyWhenConsistent) {
  Window w(4096);
  { auto a = must_attach(w, opts(0)); }
  const std::uint64_t cap = w.ctl()->header.ring[1].capacity.get();
  const std::uint64_t p = 3 * cap + 64;
  struct Case {
    std::uint64_t found, expected;
  };
  for (const Case& k : {Case{p + 8, p + 8}, Case{p + cap, p + cap}, Case{p + cap + 8, p}, Case{p + 12, p},
                        Case{p - 8, p}, Case{p, p}, Case{0, p}, Case{~std::uint64_t{7}, p}}) {
    SCOPED_TRACE(k.found);
    w.ctl()->ring[1].producer.value.set(p);
    w.ctl()->ring[1].consumer.value.set(k.found);
    auto a = must_attach(w, opts(0));
    ASSERT_TRUE(a);
    EXPECT_EQ(w.ctl()->ring[1].consumer.value.get(), k.expected);
    EXPECT_FALSE(a->try_peek()->has_value());  // reads only inside the ring
    EXPECT_FALSE(a->broken());
  }
  EXPECT_TRUE(w.guards_intact());
}

}  // namespace
// A window of 32 GiB and more (a 64 GiB ivshmem BAR): the default
// max_message, a quarter of the ring, no longer fits the header's 32 bits.
// It is clamped; it used to wrap to 0, and side 0 then refused the header it
// had just written. The mapping reserves nothing; only the header is touched.
TEST(Channel, HugeWindowGetsAUsableDefaultMaxMessage) {
  const std::size_t size = (std::size_t{1} << 35) + 4096;
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  Options o;
  o.side = 0;
  o.heartbeat_thread = false;
  o.name = "huge";
  auto r = Channel::attach(p, size, o);
  EXPECT_TRUE(r.ok()) << r.error().message();
  if (r.ok()) {
    EXPECT_EQ((*r)->max_message(), 0xfffffff8u);
    r->reset();
  }
  ::munmap(p, size);
}

}  // namespace uvirtio::channel
