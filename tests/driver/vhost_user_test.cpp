// The vhost-user back-end: the message parser against every malformed size
// and field, the memory table (mapping, translation, bounds), and whole
// sessions over a socketpair where the test plays the front-end: it shares
// memfd-backed "guest memory", drives split rings in it as the virtio driver
// (SplitQueue), and checks packets going both ways through the back-end's
// device-role rings, kicks and calls on real eventfds, refusals with
// REPLY_ACK, session teardown and the listening socket.
#include "uvirtio/driver/vhost_user.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <future>
#include <string>
#include <utility>
#include <vector>

#include "support/vhost_user_frontend.hpp"
#include "uvirtio/driver/features.hpp"
#include "uvirtio/rings/split.hpp"

namespace uvirtio::driver::vhost_user {
namespace {

using rings::Buffer;
using rings::SplitQueue;

Result<Message> parse(std::uint32_t request, const std::vector<std::uint8_t>& payload, std::size_t nfds = 0,
                      std::uint32_t flags = kVersion) {
  const std::vector<int> fds(nfds, 100);
  return parse_message(message(request, payload, flags), fds, "test front-end");
}

void expect_bad(const Result<Message>& r, const std::string& text) {
  ASSERT_FALSE(r.ok()) << "expected an error containing '" << text << "'";
  EXPECT_EQ(r.error().code(), Errc::bad_device_data);
  EXPECT_EQ(r.error().device(), "test front-end");
  EXPECT_NE(r.error().message().find(text), std::string::npos) << r.error().message();
}

// ---- parser: header ----

TEST(VhostUserParse, HeaderChecks) {
  const std::vector<std::uint8_t> short_header(11, 0);
  auto r = parse_message(short_header, {}, "test front-end");
  expect_bad(r, "shorter than the 12-byte header");
  expect_bad(parse(R(Request::get_features), {}, 0, 0), "protocol version 0");
  expect_bad(parse(R(Request::get_features), {}, 0, 2), "protocol version 2");
  expect_bad(parse(R(Request::get_features), {}, 0, kVersion | kFlagReply), "reply flag");
  expect_bad(parse(R(Request::get_features), {}, 0, kVersion | 0x10), "reserved flag bits");
  // The size field disagrees with the bytes that came.
  auto b = message(R(Request::set_features), std::vector<std::uint8_t>(8));
  b.pop_back();
  expect_bad(parse_message(b, {}, "test front-end"), "size field says 8");
  // A size beyond the limit, even when the bytes are there.
  expect_bad(parse(R(Request::set_features), std::vector<std::uint8_t>(kMaxPayload + 1)), "exceeds the 4096");
  expect_bad(parse(R(Request::set_owner), {}, 9), "at most 8");
  const std::vector<int> negative{-1};
  expect_bad(parse_message(message(R(Request::set_vring_call), bytes_of(std::uint64_t{0})), negative,
                           "test front-end"),
             "invalid fd");
}

TEST(VhostUserParse, NeedReplyAndName) {
  auto m = parse(R(Request::set_owner), {}, 0, kVersion | kFlagNeedReply);
  ASSERT_TRUE(m.ok()) << m.error().message();
  EXPECT_TRUE(m->need_reply());
  EXPECT_EQ(request_name(R(Request::set_mem_table)), "SET_MEM_TABLE");
  EXPECT_EQ(request_name(42), "request 42");
}

// Every request we know, with its one valid payload size and fd count.
struct Shape {
  Request request;
  std::size_t size;
  std::size_t fds;
};
const Shape kShapes[] = {
    {Request::get_features, 0, 0},
    {Request::set_features, 8, 0},
    {Request::set_owner, 0, 0},
    {Request::reset_owner, 0, 0},
    {Request::set_vring_num, 8, 0},
    {Request::set_vring_addr, 40, 0},
    {Request::set_vring_base, 8, 0},
    {Request::get_vring_base, 8, 0},
    {Request::set_vring_kick, 8, 1},
    {Request::set_vring_call, 8, 1},
    {Request::set_vring_err, 8, 1},
    {Request::get_protocol_features, 0, 0},
    {Request::set_protocol_features, 8, 0},
    {Request::get_queue_num, 0, 0},
    {Request::set_vring_enable, 8, 0},
};

std::vector<std::uint8_t> valid_payload(Request r, std::size_t size) {
  std::vector<std::uint8_t> p(size, 0);
  if (r == Request::set_vring_num && size > 4) p[4] = 1;  // num 1
  return p;
}

TEST(VhostUserParse, EveryRequestRejectsEveryWrongSize) {
  for (const auto& s : kShapes) {
    SCOPED_TRACE(request_name(R(s.request)));
    auto good = parse(R(s.request), valid_payload(s.request, s.size), s.fds);
    ASSERT_TRUE(good.ok()) << good.error().message();
    EXPECT_TRUE(good->known);
    for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{4}, std::size_t{7}, std::size_t{9},
                          std::size_t{16}, std::size_t{39}, std::size_t{41}, std::size_t{264}}) {
      if (n == s.size) continue;
      expect_bad(parse(R(s.request), valid_payload(s.request, n), s.fds), "payload is " + std::to_string(n));
    }
    // Wrong fd counts.
    expect_bad(parse(R(s.request), valid_payload(s.request, s.size), s.fds + 1), "fds came with the message");
    if (s.fds > 0) {
      expect_bad(parse(R(s.request), valid_payload(s.request, s.size), 0), "fds came with the message");
    }
  }
}

TEST(VhostUserParse, VringState) {
  auto num = [](std::uint32_t n) { return parse(R(Request::set_vring_num), bytes_of(VringState{0, n})); };
  for (std::uint32_t bad : {0u, 3u, 6u, 1000u, 65536u, 0x80000000u, 0xffffffffu}) {
    expect_bad(num(bad), "size " + std::to_string(bad) + " is not a power of two in [1, 32768]");
  }
  for (std::uint32_t good : {1u, 2u, 256u, 32768u}) EXPECT_TRUE(num(good).ok()) << good;
  auto m = num(256);
  EXPECT_EQ(m->state.num, 256u);
  expect_bad(parse(R(Request::set_vring_base), bytes_of(VringState{1, 0x10000})), "does not fit the 16-bit");
  EXPECT_TRUE(parse(R(Request::set_vring_base), bytes_of(VringState{1, 0xffff})).ok());
  expect_bad(parse(R(Request::set_vring_enable), bytes_of(VringState{1, 2})), "enable value 2");
  // GET_VRING_BASE carries an index only; num is not checked.
  EXPECT_TRUE(parse(R(Request::get_vring_base), bytes_of(VringState{1, 12345})).ok());
}

TEST(VhostUserParse, VringAddr) {
  VringAddr a{0, 0, 0x1000, 0x3000, 0x2000, 0};
  auto m = parse(R(Request::set_vring_addr), bytes_of(a));
  ASSERT_TRUE(m.ok()) << m.error().message();
  EXPECT_EQ(m->addr.desc_user_addr, 0x1000u);
  EXPECT_EQ(m->addr.used_user_addr, 0x3000u);
  EXPECT_EQ(m->addr.avail_user_addr, 0x2000u);
  a.flags = 2;
  expect_bad(parse(R(Request::set_vring_addr), bytes_of(a)), "unknown address flags 0x2");
  a.flags = kVringFlagLog;  // known to the parser; the back-end refuses it
  EXPECT_TRUE(parse(R(Request::set_vring_addr), bytes_of(a)).ok());
  a.flags = 0;
  a.desc_user_addr = 0x1008;
  expect_bad(parse(R(Request::set_vring_addr), bytes_of(a)), "not 16-aligned");
  a.desc_user_addr = 0x1000;
  a.avail_user_addr = 0x2001;
  expect_bad(parse(R(Request::set_vring_addr), bytes_of(a)), "not 2-aligned");
  a.avail_user_addr = 0x2000;
  a.used_user_addr = 0x3002;
  expect_bad(parse(R(Request::set_vring_addr), bytes_of(a)), "not 4-aligned");
}

TEST(VhostUserParse, VringFds) {
  auto m = parse(R(Request::set_vring_kick), bytes_of(std::uint64_t{5}), 1);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->ring_index, 5u);
  EXPECT_TRUE(m->has_fd);
  m = parse(R(Request::set_vring_call), bytes_of(std::uint64_t{kVringNoFd | 3}), 0);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->ring_index, 3u);
  EXPECT_FALSE(m->has_fd);
  expect_bad(parse(R(Request::set_vring_call), bytes_of(std::uint64_t{kVringNoFd | 3}), 1), "1 fds came");
  expect_bad(parse(R(Request::set_vring_err), bytes_of(std::uint64_t{0x200}), 1), "unknown bits");
  expect_bad(parse(R(Request::set_vring_kick), bytes_of(std::uint64_t{1} << 40), 1), "unknown bits");
}

TEST(VhostUserParse, MemoryTable) {
  auto ok2 = parse(R(Request::set_mem_table),
                   mem_table({region(0, 0x1000, 0x10000), region(0x1000, 0x1000, 0x11000)}), 2);
  ASSERT_TRUE(ok2.ok()) << ok2.error().message();  // adjacent, not overlapping
  ASSERT_EQ(ok2->regions.size(), 2u);
  EXPECT_EQ(ok2->regions[1].guest_phys_addr, 0x1000u);

  expect_bad(parse(R(Request::set_mem_table), mem_table({}), 0), "no regions");
  std::vector<MemoryRegion> nine;
  for (std::uint64_t i = 0; i < 9; ++i) nine.push_back(region(i << 20, 0x1000, i << 20));
  expect_bad(parse(R(Request::set_mem_table), mem_table(nine), 8), "9 regions, at most 8");
  std::vector<MemoryRegion> eight(nine.begin(), nine.end() - 1);
  EXPECT_TRUE(parse(R(Request::set_mem_table), mem_table(eight), 8).ok());
  // The header's count disagrees with the payload.
  auto p = mem_table({region(0, 0x1000, 0)});
  p[0] = 2;
  expect_bad(parse(R(Request::set_mem_table), p, 2), "payload is 40 bytes, expected 72");
  expect_bad(parse(R(Request::set_mem_table), std::vector<std::uint8_t>(4), 0),
             "shorter than the table header");
  // One fd per region.
  expect_bad(parse(R(Request::set_mem_table), mem_table({region(0, 0x1000, 0)}), 0), "0 fds came");
  expect_bad(parse(R(Request::set_mem_table), mem_table({region(0, 0x1000, 0)}), 2), "2 fds came");

  auto one = [](MemoryRegion r) { return parse(R(Request::set_mem_table), mem_table({r}), 1); };
  expect_bad(one(region(0, 0, 0)), "region 0 has size 0");
  expect_bad(one(region(~0ull - 0xfff, 0x1001, 0)), "guest range");
  EXPECT_TRUE(one(region(~0ull - 0xfff, 0x1000, 0)).ok());  // ends exactly at 2^64
  expect_bad(one(region(0, 0x2000, ~0ull - 0x1000)), "user range");
  expect_bad(one(region(0, 0x1000, 0, 0x7fffffffffffffffull)), "file range");
  expect_bad(one(region(0, 0x8000000000000000ull, 0)), "file range");

  expect_bad(parse(R(Request::set_mem_table),
                   mem_table({region(0, 0x2000, 0x10000), region(0x1fff, 0x1000, 0x20000)}), 2),
             "region 1 guest range");
  expect_bad(parse(R(Request::set_mem_table),
                   mem_table({region(0x5000, 0x1000, 0x10000), region(0x4000, 0x2000, 0x20000)}), 2),
             "region 1 guest range");
  expect_bad(parse(R(Request::set_mem_table),
                   mem_table({region(0, 0x1000, 0x10000), region(0x1000, 0x1000, 0x10800)}), 2),
             "region 1 user range");
}

TEST(VhostUserParse, UnknownRequestIsKeptRaw) {
  auto m = parse(24, {1, 2, 3});  // GET_CONFIG: not ours
  ASSERT_TRUE(m.ok());
  EXPECT_FALSE(m->known);
  EXPECT_EQ(m->raw, (std::vector<std::uint8_t>{1, 2, 3}));
}

// ---- memory table ----

TEST(VhostUserMemory, MapsAndTranslatesWithBounds) {
  Memfd m(0x10000);
  for (std::size_t i = 0; i < m.size; ++i) m.map[i] = static_cast<std::uint8_t>(i * 7);
  // Region 0: file [0x1000, 0x5000) at guest 0x100000; region 1: file
  // [0x8800, 0x9800) (offset not page-aligned) at guest 0x200000.
  const MemoryRegion regions[] = {region(0x100000, 0x4000, 0x7f0000001000, 0x1000),
                                  region(0x200000, 0x1000, 0x7f0000008800, 0x8800)};
  const int fds[] = {m.fd, m.fd};
  auto t = MemoryTable::map(regions, fds, "test");
  ASSERT_TRUE(t.ok()) << t.error().message();
  const MemoryTable& mt = **t;
  EXPECT_EQ(mt.size(), 2u);
  auto g = mt.guest(0x100010, 16);
  ASSERT_TRUE(g);
  EXPECT_EQ(g->size(), 16u);
  EXPECT_EQ(std::memcmp(g->data(), m.map + 0x1010, 16), 0);
  auto u = mt.user(0x7f0000008800 + 3, 5);
  ASSERT_TRUE(u);
  EXPECT_EQ(std::memcmp(u->data(), m.map + 0x8803, 5), 0);
  // Writes land in the shared file.
  (*g)[0] = 0xee;
  EXPECT_EQ(m.map[0x1010], 0xee);
  // Bounds: the last byte translates, one more does not; nothing spans regions.
  EXPECT_TRUE(mt.guest(0x103fff, 1));
  EXPECT_FALSE(mt.guest(0x103fff, 2));
  EXPECT_FALSE(mt.guest(0x104000, 1));
  EXPECT_FALSE(mt.guest(0xfffff, 2));
  EXPECT_FALSE(mt.guest(0x100000, ~0ull));
  EXPECT_FALSE(mt.guest(~0ull, 1));
  EXPECT_FALSE(mt.user(0x100000, 1));  // a guest address is not a user address
  EXPECT_FALSE(mt.guest(0x7f0000001000, 1));
}

TEST(VhostUserMemory, RefusesAnFdSmallerThanItsRegion) {
  Memfd m(0x4000);
  const MemoryRegion r[] = {region(0, 0x4000, 0x10000, 0x1000)};  // needs 0x5000 bytes
  const int fds[] = {m.fd};
  auto t = MemoryTable::map(r, fds, "test");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.error().code(), Errc::bad_device_data);
  EXPECT_NE(t.error().message().find("its fd has 0x4000"), std::string::npos) << t.error().message();
}

// ---- sessions over a socketpair ----

constexpr std::uint64_t kGpa = 0x40000000;
constexpr std::uint64_t kUva = 0x7f1200000000;
constexpr std::size_t kRam = 1 << 20;
constexpr std::uint16_t kQsize = 8;
constexpr std::size_t kRingStride = 0x4000;
constexpr std::size_t kData = 0x10000;
constexpr std::uint64_t kOffered = (1ull << feature::kVersion1) | (1ull << feature::kEventIdx);

class VhostUserSession : public ::testing::Test {
 protected:
  void SetUp() override {
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    BackendOptions o;
    o.name = "test back-end";
    o.features = kOffered;
    o.num_queues = 2;
    o.max_queue_size = 256;
    auto b = VhostUserBackend::adopt(sv[0], o);
    ASSERT_TRUE(b.ok()) << b.error().message();
    be = std::move(*b);
    fe = std::make_unique<Frontend>(sv[1]);
    for (int i = 0; i < 2; ++i) {
      kick[i] = make_eventfd();
      call[i] = make_eventfd();
    }
  }
  void TearDown() override {
    for (int i = 0; i < 2; ++i) {
      ::close(kick[i]);
      ::close(call[i]);
    }
  }

  // Hands the last sent message to the back-end.
  VhostUserBackend::Event step() {
    auto r = be->handle_message();
    EXPECT_TRUE(r.ok()) << r.error().message();
    return r.ok() ? *r : VhostUserBackend::Event::disconnected;
  }
  std::uint64_t ring_off(int i) const { return static_cast<std::uint64_t>(i) * kRingStride; }
  std::uint64_t gpa(const void* p) const {
    return kGpa + static_cast<std::uint64_t>(static_cast<const std::uint8_t*>(p) - ram.map);
  }
  VringAddr addr(int i) const {
    return VringAddr{static_cast<std::uint32_t>(i), 0, kUva + ring_off(i), kUva + ring_off(i) + 0x2000,
                     kUva + ring_off(i) + 0x1000,   0};
  }

  void negotiate(bool reply_ack = true) {
    fe->send(Request::get_features);
    step();
    EXPECT_EQ(fe->recv_u64(Request::get_features), kOffered | (1ull << kProtocolFeaturesBit));
    fe->send(Request::get_protocol_features);
    step();
    EXPECT_EQ(fe->recv_u64(Request::get_protocol_features), 1ull << protocol_feature::kReplyAck);
    fe->send(Request::set_protocol_features,
             bytes_of(std::uint64_t{reply_ack ? 1ull << protocol_feature::kReplyAck : 0}));
    step();
    fe->send(Request::set_owner);
    step();
    fe->send(Request::set_features, bytes_of(kOffered | (1ull << kProtocolFeaturesBit)));
    step();
    EXPECT_FALSE(fe->has_reply());
  }
  void set_mem_table() {
    fe->send(Request::set_mem_table, mem_table({region(kGpa, kRam, kUva, 0)}), {ram.fd}, true);
    step();
    EXPECT_EQ(fe->recv_u64(Request::set_mem_table), 0u);  // REPLY_ACK success
    ASSERT_NE(be->memory(), nullptr);
  }
  // Ring i as the driver sees it, and started on the back-end.
  SplitQueue start_ring(int i) {
    auto q = SplitQueue::create(kQsize, ram.map + ring_off(i), ram.map + ring_off(i) + 0x1000,
                                ram.map + ring_off(i) + 0x2000, "driver ring " + std::to_string(i));
    EXPECT_TRUE(q.ok());
    q->set_event_idx(true);
    fe->send(Request::set_vring_num, bytes_of(VringState{static_cast<std::uint32_t>(i), kQsize}));
    step();
    fe->send(Request::set_vring_base, bytes_of(VringState{static_cast<std::uint32_t>(i), 0}));
    step();
    fe->send(Request::set_vring_addr, bytes_of(addr(i)));
    step();
    fe->send(Request::set_vring_call, bytes_of(std::uint64_t(i)), {call[i]});
    step();
    fe->send(Request::set_vring_kick, bytes_of(std::uint64_t(i)), {kick[i]});
    EXPECT_EQ(step(), VhostUserBackend::Event::rings_changed);
    EXPECT_EQ(be->queue(static_cast<std::uint32_t>(i)), nullptr);  // not enabled yet
    fe->send(Request::set_vring_enable, bytes_of(VringState{static_cast<std::uint32_t>(i), 1}));
    EXPECT_EQ(step(), VhostUserBackend::Event::rings_changed);
    EXPECT_NE(be->queue(static_cast<std::uint32_t>(i)), nullptr);
    EXPECT_GE(be->kick_fd(static_cast<std::uint32_t>(i)), 0);
    return std::move(q).value();
  }
  // A bad message with need_reply: answered with failure, the session goes on.
  void expect_refused(Request r, const std::vector<std::uint8_t>& payload, const std::string& text,
                      const std::vector<int>& fds = {}) {
    fe->send(r, payload, fds, true);
    auto ev = be->handle_message();
    ASSERT_TRUE(ev.ok()) << ev.error().message();
    EXPECT_EQ(*ev, VhostUserBackend::Event::refused);
    EXPECT_NE(fe->recv_u64(r), 0u);
    ASSERT_TRUE(be->last_refusal().has_value());
    EXPECT_NE(be->last_refusal()->message().find(text), std::string::npos) << be->last_refusal()->message();
    EXPECT_TRUE(be->connected());
  }

  Memfd ram{kRam};
  std::unique_ptr<VhostUserBackend> be;
  std::unique_ptr<Frontend> fe;
  int kick[2] = {-1, -1};
  int call[2] = {-1, -1};
};

TEST_F(VhostUserSession, PacketsGoThroughTheDeviceRolesRings) {
  negotiate();
  set_mem_table();
  SplitQueue rx = start_ring(0);
  SplitQueue tx = start_ring(1);
  EXPECT_TRUE(be->has_feature(feature::kEventIdx));

  // The driver sends "ping" on the transmit ring and kicks.
  std::uint8_t* out = ram.map + kData;
  std::memcpy(out, "ping", 4);
  const Buffer tx_buf[] = {{gpa(out), 4}};
  ASSERT_TRUE(tx.add(tx_buf, {}, 11).ok());
  EXPECT_TRUE(tx.publish());  // event idx: the device wants the first kick
  ASSERT_EQ(::write(kick[1], "\1\0\0\0\0\0\0\0", 8), 8);
  ASSERT_TRUE(readable(be->kick_fd(1)));
  be->drain_kick(1);
  EXPECT_FALSE(readable(be->kick_fd(1)));

  auto* q = be->queue(1);
  ASSERT_NE(q, nullptr);
  auto got = q->pop();
  ASSERT_TRUE(got.ok()) << got.error().message();
  ASSERT_TRUE(got->has_value());
  ASSERT_EQ((*got)->readable.size(), 1u);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>((*got)->readable[0].data()), 4), "ping");
  EXPECT_NE((*got)->readable[0].data(), out);  // our own mapping of the memfd
  ASSERT_TRUE(q->push((*got)->head, 0).ok());
  EXPECT_TRUE(q->should_interrupt());
  ASSERT_TRUE(be->notify(1).ok());
  EXPECT_EQ(drain(call[1]), 1u);
  auto done = tx.poll();
  ASSERT_TRUE(done.ok() && done->has_value());
  EXPECT_EQ((*done)->token, 11u);

  // The device answers "pong" into a receive buffer.
  std::uint8_t* in = ram.map + kData + 0x1000;
  const Buffer rx_buf[] = {{gpa(in), 64}};
  ASSERT_TRUE(rx.add({}, rx_buf, 22).ok());
  rx.publish();
  auto* rq = be->queue(0);
  auto chain = rq->pop();
  ASSERT_TRUE(chain.ok() && chain->has_value());
  ASSERT_EQ((*chain)->writable.size(), 1u);
  std::memcpy((*chain)->writable[0].data(), "pong", 4);
  ASSERT_TRUE(rq->push((*chain)->head, 4).ok());
  EXPECT_TRUE(rq->should_interrupt());
  ASSERT_TRUE(be->notify(0).ok());
  EXPECT_EQ(drain(call[0]), 1u);
  auto rdone = rx.poll();
  ASSERT_TRUE(rdone.ok() && rdone->has_value());
  EXPECT_EQ((*rdone)->len, 4u);
  EXPECT_EQ(std::memcmp(in, "pong", 4), 0);

  // GET_VRING_BASE stops the ring and reports how far it got.
  fe->send(Request::get_vring_base, bytes_of(VringState{1, 0}));
  EXPECT_EQ(step(), VhostUserBackend::Event::rings_changed);
  auto [h, p] = fe->recv();
  EXPECT_EQ(h.request, R(Request::get_vring_base));
  ASSERT_EQ(p.size(), sizeof(VringState));
  VringState s;
  std::memcpy(&s, p.data(), sizeof s);
  EXPECT_EQ(s.index, 1u);
  EXPECT_EQ(s.num, 1u);
  EXPECT_EQ(be->queue(1), nullptr);
  EXPECT_EQ(be->kick_fd(1), -1);
  EXPECT_NE(be->queue(0), nullptr);

  // The front-end goes away: everything is dropped.
  fe->close();
  EXPECT_EQ(step(), VhostUserBackend::Event::disconnected);
  EXPECT_FALSE(be->connected());
  EXPECT_EQ(be->queue(0), nullptr);
  EXPECT_EQ(be->memory(), nullptr);
}

TEST_F(VhostUserSession, RingOutsideMemoryIsRefused) {
  negotiate();
  set_mem_table();
  fe->send(Request::set_vring_num, bytes_of(VringState{0, kQsize}));
  step();
  VringAddr a = addr(0);
  a.used_user_addr = kUva + kRam - 8;  // the used ring runs past the region
  expect_refused(Request::set_vring_addr, bytes_of(a), "used ring at 0x7f12000ffff8");
  a = addr(0);
  a.desc_user_addr = kGpa;  // a guest address where a user address belongs
  expect_refused(Request::set_vring_addr, bytes_of(a), "descriptor table at 0x40000000");
  // Starting a ring that has no address is refused, and it stays stopped.
  expect_refused(Request::set_vring_kick, bytes_of(std::uint64_t{0}), "before its addresses", {kick[0]});
  EXPECT_EQ(be->queue(0), nullptr);
  EXPECT_EQ(be->kick_fd(0), -1);
}

// SET_VRING_BASE resumes a ring elsewhere than 0 (migration, reconnect):
// the base is kept and reported back while the ring is stopped.
TEST_F(VhostUserSession, RingBaseIsKept) {
  negotiate();
  fe->send(Request::set_vring_base, bytes_of(VringState{0, 5}), {}, true);
  step();
  EXPECT_EQ(fe->recv_u64(Request::set_vring_base), 0u);
  fe->send(Request::get_vring_base, bytes_of(VringState{0, 0}));
  step();
  auto [h, p] = fe->recv();
  ASSERT_EQ(p.size(), sizeof(VringState));
  VringState st;
  std::memcpy(&st, p.data(), sizeof st);
  EXPECT_EQ(st.num, 5u);
  ASSERT_TRUE(be->ring_info(0).has_value());
  EXPECT_EQ(be->ring_info(0)->base, 5u);
}

TEST_F(VhostUserSession, BadValuesAreRefusedWithReplyAck) {
  negotiate();
  expect_refused(Request::set_vring_num, bytes_of(VringState{2, 8}), "ring index 2 out of range (2 rings)");
  expect_refused(Request::set_vring_num, bytes_of(VringState{0, 512}), "exceeds our maximum 256");
  expect_refused(Request::set_vring_num, bytes_of(VringState{0, 7}), "not a power of two");
  expect_refused(Request::set_features, bytes_of(std::uint64_t{1} << 33),
                 "bits we did not offer: 0x200000000");
  expect_refused(Request::set_protocol_features, bytes_of(std::uint64_t{1}), "bits we did not offer");
  VringAddr a = addr(0);
  a.flags = kVringFlagLog;
  expect_refused(Request::set_vring_addr, bytes_of(a), "logging");
  expect_refused(Request::set_vring_call, bytes_of(std::uint64_t{9}), "ring index 9", {call[0]});
  expect_refused(Request::set_features, std::vector<std::uint8_t>(4), "payload is 4 bytes, expected 8");
  // An fd smaller than its region (mapping it would fault later).
  Memfd small(0x1000);
  expect_refused(Request::set_mem_table, mem_table({region(0, 0x2000, 0x10000)}), "its fd has 0x1000",
                 {small.fd});
  EXPECT_EQ(be->memory(), nullptr);
  // A request we do not implement.
  fe->send_raw(message(24, std::vector<std::uint8_t>(12), kVersion | kFlagNeedReply));
  auto ev = be->handle_message();
  ASSERT_TRUE(ev.ok());
  EXPECT_EQ(*ev, VhostUserBackend::Event::refused);
  EXPECT_EQ(fe->recv_u64(static_cast<Request>(24)), 1u);
  EXPECT_NE(be->last_refusal()->message().find("request 24: not supported"), std::string::npos);
  // After all that the session still works.
  set_mem_table();
  EXPECT_TRUE(be->connected());
}

TEST_F(VhostUserSession, WithoutReplyAckABadMessageEndsTheSession) {
  negotiate(false);
  fe->send(Request::set_vring_num, bytes_of(VringState{0, 3}), {}, true);  // need_reply, but no REPLY_ACK
  auto r = be->handle_message();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::bad_device_data);
  EXPECT_EQ(r.error().device(), "test back-end");
  EXPECT_EQ(r.error().op(), "SET_VRING_NUM");
  EXPECT_FALSE(be->connected());
  EXPECT_TRUE(fe->at_eof());  // no reply, just the closed connection
}

TEST_F(VhostUserSession, UnknownRequestWithoutNeedReplyEndsTheSession) {
  negotiate();
  fe->send_raw(message(19, bytes_of(std::uint64_t{0})));  // SEND_RARP, never negotiated
  auto r = be->handle_message();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  EXPECT_FALSE(be->connected());
}

TEST_F(VhostUserSession, OversizedOrTruncatedMessagesEndTheSession) {
  Header h{R(Request::set_features), kVersion, 1u << 20};
  fe->send_raw(bytes_of(h));
  auto r = be->handle_message();
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("exceeds the 4096-byte limit"), std::string::npos);
  EXPECT_FALSE(be->connected());
}

TEST_F(VhostUserSession, TruncatedMessageEndsTheSession) {
  Header h{R(Request::set_features), kVersion, 8};
  fe->send_raw(bytes_of(h));
  fe->close();  // 8 payload bytes never come
  auto r = be->handle_message();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::peer_gone);
  EXPECT_FALSE(be->connected());
}

// A front-end that stops in the middle of a message must not hold the
// serving thread (and with it every other fd that thread polls, the
// vhost-pci driver's side and the stop fd included) for good.
TEST_F(VhostUserSession, AFrontendStallingMidMessageEndsTheSession) {
  negotiate();
  const Header h{R(Request::set_features), kVersion, 8};
  const auto head = bytes_of(h);
  fe->send_raw({head.begin(), head.begin() + 5});  // and nothing more, connection open
  auto handled = std::async(std::launch::async, [&] { return be->handle_message(); });
  if (handled.wait_for(std::chrono::seconds(5)) != std::future_status::ready) {
    ADD_FAILURE() << "handle_message() still waits for the rest of the message";
    fe->close();  // unblocks it
  }
  auto r = handled.get();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::timeout) << r.error().message();
  EXPECT_EQ(r.error().device(), "test back-end");
  EXPECT_FALSE(be->connected());
}

TEST_F(VhostUserSession, RingsRunOnWhenTheMemoryTableIsReplaced) {
  negotiate();
  set_mem_table();
  SplitQueue tx = start_ring(1);
  // A new table (same memory through a new fd): the running ring keeps its
  // mapping; descriptors translate through the new table.
  const int dup = ::dup(ram.fd);
  fe->send(Request::set_mem_table, mem_table({region(kGpa, kRam, kUva, 0)}), {dup}, true);
  step();
  ::close(dup);
  EXPECT_EQ(fe->recv_u64(Request::set_mem_table), 0u);
  std::memcpy(ram.map + kData, "abcd", 4);
  const Buffer b[] = {{gpa(ram.map + kData), 4}};
  ASSERT_TRUE(tx.add(b, {}, 1).ok());
  tx.publish();
  auto got = be->queue(1)->pop();
  ASSERT_TRUE(got.ok() && got->has_value()) << (got.ok() ? "" : got.error().message());
  EXPECT_EQ(std::memcmp((*got)->readable[0].data(), "abcd", 4), 0);
  // A descriptor outside the table breaks the ring, and the error eventfd
  // tells the front-end.
  const int err = make_eventfd();
  fe->send(Request::set_vring_err, bytes_of(std::uint64_t{1}), {err});
  step();
  const Buffer outside[] = {{kGpa + kRam, 4}};
  ASSERT_TRUE(tx.add(outside, {}, 2).ok());
  tx.publish();
  auto bad = be->queue(1)->pop();
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code(), Errc::bad_device_data);
  EXPECT_NE(bad.error().message().find("test back-end ring 1"), std::string::npos) << bad.error().message();
  ASSERT_TRUE(be->report_error(1).ok());
  EXPECT_EQ(drain(err), 1u);
  ::close(err);
}

// The front-end's eventfds are untrusted: a blocking one whose counter it
// holds at the maximum (or a full pipe) would block every write we make to
// it, and with it the thread that serves the back-end (or, behind the
// vhost-pci doorbells, the driver's). Signalling one never blocks.
TEST_F(VhostUserSession, SignallingABlockingEventfdAtItsMaximumDoesNotBlock) {
  negotiate();
  constexpr std::uint64_t kMax = 0xfffffffffffffffe;
  int fds[2] = {::eventfd(0, EFD_CLOEXEC), ::eventfd(0, EFD_CLOEXEC)};  // blocking
  for (int fd : fds) {
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::write(fd, &kMax, sizeof kMax), static_cast<ssize_t>(sizeof kMax));
  }
  fe->send(Request::set_vring_call, bytes_of(std::uint64_t{0}), {fds[0]});
  step();
  fe->send(Request::set_vring_err, bytes_of(std::uint64_t{0}), {fds[1]});
  step();
  auto signalled =
      std::async(std::launch::async, [&] { return be->notify(0).ok() && be->report_error(0).ok(); });
  if (signalled.wait_for(std::chrono::seconds(2)) != std::future_status::ready) {
    ADD_FAILURE() << "signalling a full eventfd blocked";
    for (int i = 0; i < 50 && signalled.wait_for(std::chrono::milliseconds(100)) != std::future_status::ready;
         ++i) {
      for (int fd : fds) (void)drain(fd);  // unblocks the writer
    }
  }
  EXPECT_TRUE(signalled.get());
  for (int fd : fds) ::close(fd);
}

// A call or error "eventfd" that is really a pipe or a socket whose reader
// the front-end closed would raise SIGPIPE on our write (and kill a back-end
// that did not ignore it; the vhost-pci doorbells write the same fd from the
// driver's thread). Only the front-end can see that: SET_VRING_CALL/ERR
// refuse such an fd, and no signal is ever raised.
TEST_F(VhostUserSession, CallOrErrorFdThatIsAPipeOrSocketIsRefused) {
  negotiate();
  sigset_t pipe_set, old;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  ASSERT_EQ(::pthread_sigmask(SIG_BLOCK, &pipe_set, &old), 0);  // a SIGPIPE stays pending for us to see
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  ::close(p[0]);  // nobody reads: a write raises SIGPIPE
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  ::close(sv[1]);
  expect_refused(Request::set_vring_call, bytes_of(std::uint64_t{0}), "ring 0", {p[1]});
  expect_refused(Request::set_vring_err, bytes_of(std::uint64_t{1}), "ring 1", {sv[0]});
  EXPECT_TRUE(be->notify(0).ok());
  EXPECT_TRUE(be->report_error(1).ok());
  sigset_t pending;
  sigemptyset(&pending);
  ASSERT_EQ(::sigpending(&pending), 0);
  const bool raised = sigismember(&pending, SIGPIPE) == 1;
  EXPECT_FALSE(raised) << "signalling the front-end raised SIGPIPE";
  if (raised) {
    const timespec now{0, 0};
    (void)::sigtimedwait(&pipe_set, nullptr, &now);
  }
  ASSERT_EQ(::pthread_sigmask(SIG_SETMASK, &old, nullptr), 0);
  ::close(p[1]);
  ::close(sv[0]);
  // An eventfd is still taken.
  fe->send(Request::set_vring_call, bytes_of(std::uint64_t{0}), {call[0]}, true);
  step();
  EXPECT_EQ(fe->recv_u64(Request::set_vring_call), 0u);
  ASSERT_TRUE(be->notify(0).ok());
  EXPECT_EQ(drain(call[0]), 1u);
}

TEST_F(VhostUserSession, WithoutProtocolFeaturesRingsStartEnabled) {
  fe->send(Request::set_features, bytes_of(kOffered));
  step();
  fe->send(Request::set_mem_table, mem_table({region(kGpa, kRam, kUva, 0)}), {ram.fd});
  step();
  fe->send(Request::set_vring_num, bytes_of(VringState{0, kQsize}));
  step();
  fe->send(Request::set_vring_addr, bytes_of(addr(0)));
  step();
  fe->send(Request::set_vring_kick, bytes_of(std::uint64_t{kVringNoFd}));  // polled ring
  EXPECT_EQ(step(), VhostUserBackend::Event::rings_changed);
  EXPECT_NE(be->queue(0), nullptr);
  EXPECT_EQ(be->kick_fd(0), -1);
  fe->send(Request::reset_owner);
  EXPECT_EQ(step(), VhostUserBackend::Event::rings_changed);
  EXPECT_EQ(be->queue(0), nullptr);
  EXPECT_EQ(be->memory(), nullptr);
  EXPECT_TRUE(be->connected());
}

// ---- options ----

// Features the back-end cannot serve (it has no IOTLB, serves split rings
// only, and implements no protocol feature beyond MQ and REPLY_ACK) are a
// caller's mistake: offering them would let a front-end negotiate a layout
// or messages we then cannot serve.
TEST(VhostUserOptions, FeaturesWeCannotServeAreRefused) {
  struct Case {
    std::uint64_t features, protocol;
    const char* text;
  };
  const Case cases[] = {
      {kOffered | (1ull << feature::kAccessPlatform), 1ull << protocol_feature::kReplyAck, "0x200000000"},
      {kOffered | (1ull << feature::kRingPacked), 1ull << protocol_feature::kReplyAck, "0x400000000"},
      {kOffered, (1ull << protocol_feature::kReplyAck) | (1ull << 9), "protocol features"},
  };
  for (const auto& c : cases) {
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    BackendOptions o;
    o.name = "options test";
    o.features = c.features;
    o.protocol_features = c.protocol;
    auto b = VhostUserBackend::adopt(sv[0], o);
    if (b.ok()) {
      ADD_FAILURE() << "features " << c.features << " protocol " << c.protocol << " were accepted";
    } else {
      ::close(sv[0]);
      EXPECT_EQ(b.error().code(), Errc::invalid_argument);
      EXPECT_EQ(b.error().device(), "options test");
      EXPECT_NE(b.error().message().find(c.text), std::string::npos) << b.error().message();
    }
    ::close(sv[1]);
  }
}

// ---- listening socket ----

TEST(VhostUserListen, AcceptsServesAndCleansUp) {
  char dir_template[] = "/tmp/uvirtio-vhost-user-XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  const std::string path = dir + "/sock";
  BackendOptions o;
  o.name = "listen test";
  o.features = kOffered;
  {
    auto b = VhostUserBackend::listen(path, o);
    ASSERT_TRUE(b.ok()) << b.error().message();
    // A second server on a live socket is refused. Its probe connection
    // reaches us as a front-end that leaves without a word.
    auto again = VhostUserBackend::listen(path, o);
    ASSERT_FALSE(again.ok());
    EXPECT_EQ(again.error().code(), Errc::busy);
    ASSERT_TRUE((*b)->accept().ok());
    auto probe = (*b)->handle_message();
    ASSERT_TRUE(probe.ok());
    EXPECT_EQ(*probe, VhostUserBackend::Event::disconnected);

    int c = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
    ASSERT_EQ(::connect(c, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
    ASSERT_TRUE((*b)->accept().ok());
    EXPECT_FALSE((*b)->accept().ok());  // one front-end at a time
    Frontend fe(c);
    fe.send(Request::get_features);
    auto ev = (*b)->handle_message();
    ASSERT_TRUE(ev.ok());
    EXPECT_EQ(fe.recv_u64(Request::get_features), kOffered | (1ull << kProtocolFeaturesBit));
    fe.close();
    ev = (*b)->handle_message();
    ASSERT_TRUE(ev.ok());
    EXPECT_EQ(*ev, VhostUserBackend::Event::disconnected);
    EXPECT_GE((*b)->listen_fd(), 0);  // ready for the next front-end
  }
  EXPECT_FALSE(std::filesystem::exists(path));  // removed on destruction
  // A stale socket file is replaced; any other file is not.
  {
    int s = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
    ASSERT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
    ::close(s);  // bound, never listened: stale
    auto b = VhostUserBackend::listen(path, o);
    EXPECT_TRUE(b.ok()) << b.error().message();
  }
  {
    std::FILE* f = std::fopen(path.c_str(), "w");
    std::fclose(f);
  }
  auto b = VhostUserBackend::listen(path, o);
  ASSERT_FALSE(b.ok());
  EXPECT_NE(b.error().message().find("is not a socket"), std::string::npos);
  std::filesystem::remove_all(dir);
  o.num_queues = 0;
  EXPECT_FALSE(VhostUserBackend::listen(path, o).ok());
  EXPECT_FALSE(VhostUserBackend::adopt(-1, BackendOptions{}).ok());
}

}  // namespace
}  // namespace uvirtio::driver::vhost_user
