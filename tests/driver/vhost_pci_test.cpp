// vhost-pci: the controlq parser against every malformed field, the remote
// memory table, the driver against a scripted hostile device (messages
// delivered through its real controlq), and the whole chain in one process:
// a vhost-user front-end (memfd guest memory, driver-side split rings) ->
// the device model -> the vhost-pci driver over pci::Function, with packets
// both ways, kicks as MSI-X eventfds, calls through the doorbell BAR, the
// front-end leaving and a new one arriving, and a feature subset forcing
// renegotiation. Every test runs in both ack modes (spec config acks, ACKQ).
#include "uvirtio/driver/vhost_pci.hpp"

#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <mutex>
#include <thread>

#include "support/vhost_user_frontend.hpp"
#include "uvirtio/driver/features.hpp"
#include "uvirtio/driver/soft_virtio.hpp"
#include "uvirtio/driver/vhost_pci_device.hpp"
#include "uvirtio/rings/split.hpp"

namespace uvirtio::driver::vhost_pci {
namespace {

using namespace std::chrono_literals;

// ---- message builders ----

std::vector<std::uint8_t> msg(std::uint16_t type, const std::vector<std::uint8_t>& payload, bool ackq,
                              std::uint64_t request_id = 7, std::uint16_t version = 0) {
  std::vector<std::uint8_t> m;
  ControlqHeader h{};
  h.msg_type.set(type);
  h.msg_version.set(version ? version : (ackq ? kVersionAckq : kVersionSpec));
  h.msg_len.set(static_cast<std::uint32_t>(payload.size()));
  m.resize(sizeof h);
  std::memcpy(m.data(), &h, sizeof h);
  if (ackq) {
    const auto id = le64::of(request_id);
    m.insert(m.end(), reinterpret_cast<const std::uint8_t*>(&id),
             reinterpret_cast<const std::uint8_t*>(&id) + 8);
  }
  m.insert(m.end(), payload.begin(), payload.end());
  return m;
}

template <class T>
void put(std::vector<std::uint8_t>& out, const T& v) {
  const std::size_t at = out.size();
  out.resize(at + sizeof v);
  std::memcpy(out.data() + at, &v, sizeof v);
}

std::vector<std::uint8_t> memory_info(std::uint16_t ops, const std::vector<Region>& regions,
                                      std::uint32_t n = ~0u) {
  std::vector<std::uint8_t> p;
  MemoryInfoHeader h{};
  h.ops.set(ops);
  h.nregion.set(n == ~0u ? static_cast<std::uint32_t>(regions.size()) : n);
  put(p, h);
  for (const auto& r : regions) {
    MemoryRegion w{};
    w.region_base_xgpa.set(r.gpa);
    w.size.set(r.size);
    w.offset_in_bar_area.set(r.bar_offset);
    put(p, w);
  }
  return p;
}

std::vector<std::uint8_t> device_info(std::uint16_t ops, const std::vector<Virtq>& vqs,
                                      std::uint64_t id = 0x5254, std::uint32_t type = kDeviceNet) {
  std::vector<std::uint8_t> p;
  DeviceInfoHeader h{};
  h.ops.set(ops);
  h.nvirtq.set(static_cast<std::uint32_t>(vqs.size()));
  h.device_type.set(type);
  h.device_id.set(id);
  put(p, h);
  for (const auto& q : vqs) {
    RemoteVirtq v{};
    v.index.set(q.index);
    v.num.set(q.num);
    v.desc.set(q.desc);
    v.avail.set(q.avail);
    v.used.set(q.used);
    v.last_avail_idx.set(q.last_avail_idx);
    v.kick_vector.set(q.kick_vector);
    v.call_doorbell.set(q.call_doorbell);
    put(p, v);
  }
  return p;
}

std::vector<std::uint8_t> feature_bits(std::uint64_t bits, bool ackq) {
  std::vector<std::uint8_t> p;
  if (ackq) {
    FeatureBitsAckq f{};
    f.feature_bits.set(bits);
    f.device_type.set(kDeviceNet);
    f.device_id.set(0x5254);
    put(p, f);
  } else {
    put(p, le64::of(bits));
  }
  return p;
}

std::vector<std::uint8_t> update_done(std::uint64_t id = 0x5254) {
  std::vector<std::uint8_t> p;
  UpdateDone u{};
  u.device_type.set(kDeviceNet);
  u.device_id.set(id);
  put(p, u);
  return p;
}

void expect_bad(const Result<Message>& r, const std::string& text) {
  ASSERT_FALSE(r.ok()) << "accepted, expected: " << text;
  EXPECT_EQ(r.error().code(), Errc::bad_device_data);
  EXPECT_NE(r.error().message().find(text), std::string::npos) << r.error().message();
  EXPECT_NE(r.error().message().find("0000:00:10.0"), std::string::npos) << r.error().message();
}

Result<Message> parse(const std::vector<std::uint8_t>& b, bool ackq) {
  return parse_message(b, ackq, "0000:00:10.0");
}

Virtq vq(std::uint32_t index, std::uint64_t base, std::uint32_t num = 8) {
  return Virtq{index,
               num,
               base,
               base + 0x1000,
               base + 0x2000,
               0,
               static_cast<std::uint16_t>(kFirstKickVector + index),
               static_cast<std::uint16_t>(index)};
}

// ---- parser ----

class VhostPciParse : public ::testing::TestWithParam<bool> {};

TEST_P(VhostPciParse, ValidMessagesOfEveryType) {
  const bool ackq = GetParam();
  auto m = parse(
      msg(kMemoryInfo, memory_info(kOpAdd, {{0x100000, 0x4000, 0}, {0x200000, 0x1000, 0x200000}}), ackq, 42),
      ackq);
  ASSERT_TRUE(m.ok()) << m.error().message();
  EXPECT_EQ(m->type, kMemoryInfo);
  EXPECT_EQ(m->request_id, ackq ? 42u : 0u);
  ASSERT_EQ(m->regions.size(), 2u);
  EXPECT_EQ(m->regions[1].gpa, 0x200000u);
  EXPECT_EQ(m->regions[1].bar_offset, 0x200000u);

  m = parse(msg(kDeviceInfo, device_info(kOpAdd, {vq(0, 0x100000), vq(1, 0x104000, 256)}), ackq), ackq);
  ASSERT_TRUE(m.ok()) << m.error().message();
  ASSERT_EQ(m->virtqs.size(), 2u);
  EXPECT_EQ(m->virtqs[1].num, 256u);
  EXPECT_EQ(m->virtqs[1].kick_vector, kFirstKickVector + 1);
  EXPECT_EQ(m->device_id, 0x5254u);

  m = parse(msg(kDeviceInfo, device_info(kOpDel, {}), ackq), ackq);
  ASSERT_TRUE(m.ok()) << m.error().message();
  EXPECT_EQ(m->ops, kOpDel);

  m = parse(msg(kFeatureBits, feature_bits(0x1234, ackq), ackq), ackq);
  ASSERT_TRUE(m.ok()) << m.error().message();
  EXPECT_EQ(m->feature_bits, 0x1234u);

  if (!ackq) {
    m = parse(msg(kUpdateDone, update_done(), false), false);
    ASSERT_TRUE(m.ok()) << m.error().message();
    EXPECT_EQ(m->device_id, 0x5254u);
  }
}

TEST_P(VhostPciParse, MalformedMessagesAreRefused) {
  const bool ackq = GetParam();
  const auto good_mem = memory_info(kOpAdd, {{0x100000, 0x4000, 0}});
  auto whole = msg(kMemoryInfo, good_mem, ackq);
  expect_bad(parse(std::vector<std::uint8_t>(whole.begin(), whole.begin() + 5), ackq), "shorter than");
  expect_bad(parse(msg(kMemoryInfo, good_mem, ackq, 1, 9), ackq), "version 9");
  auto wrong_len = whole;
  wrong_len[4] = 99;
  expect_bad(parse(wrong_len, ackq), "msg_len 99");
  expect_bad(parse(msg(17, {}, ackq), ackq), "unknown message type 17");
  auto bad_ops = memory_info(5, {{0x100000, 0x4000, 0}});
  expect_bad(parse(msg(kMemoryInfo, bad_ops, ackq), ackq), "unknown ops 5");
  expect_bad(parse(msg(kMemoryInfo, memory_info(kOpAdd, {}), ackq), ackq), "0 regions");
  std::vector<Region> nine(9, Region{0, 0x1000, 0});
  expect_bad(parse(msg(kMemoryInfo, memory_info(kOpAdd, nine), ackq), ackq), "9 regions");
  expect_bad(parse(msg(kMemoryInfo, memory_info(kOpAdd, {{0x100000, 0x4000, 0}}, 2), ackq), ackq),
             "2 regions in 32");
  expect_bad(parse(msg(kMemoryInfo, memory_info(kOpAdd, {{0x100000, 0, 0}}), ackq), ackq), "size 0");
  expect_bad(parse(msg(kMemoryInfo, memory_info(kOpAdd, {{~0ull - 10, 0x1000, 0}}), ackq), ackq),
             "overflows");
  expect_bad(parse(msg(kMemoryInfo, memory_info(kOpAdd, {{0, 0x1000, ~0ull - 5}}), ackq), ackq), "overflows");
  auto padded = good_mem;
  padded[2] = 1;
  expect_bad(parse(msg(kMemoryInfo, padded, ackq), ackq), "nonzero padding");

  expect_bad(parse(msg(kDeviceInfo, device_info(kOpAdd, {}), ackq), ackq), "ADD with 0 virtqueues");
  expect_bad(parse(msg(kDeviceInfo, device_info(kOpDel, {vq(0, 0)}), ackq), ackq), "DEL with 1 virtqueues");
  std::vector<Virtq> many;
  for (std::uint32_t i = 0; i < 9; ++i) many.push_back(vq(i, 0x100000 * (i + 1)));
  expect_bad(parse(msg(kDeviceInfo, device_info(kOpAdd, many), ackq), ackq), "9 virtqueues");
  expect_bad(parse(msg(kDeviceInfo, device_info(kOpAdd, {vq(0, 0x100000, 6)}), ackq), ackq),
             "not a power of two");
  expect_bad(parse(msg(kDeviceInfo, device_info(kOpAdd, {vq(0, 0x100000, 65536)}), ackq), ackq),
             "not a power of two");
  auto mis = vq(0, 0x100000);
  mis.desc += 8;
  expect_bad(parse(msg(kDeviceInfo, device_info(kOpAdd, {mis}), ackq), ackq), "misaligned");
  auto far = vq(0, 0);
  far.used = ~0ull - 3;
  expect_bad(parse(msg(kDeviceInfo, device_info(kOpAdd, {far}), ackq), ackq), "overflow");
  expect_bad(parse(msg(kDeviceInfo, device_info(kOpAdd, {vq(1, 0x100000), vq(1, 0x200000)}), ackq), ackq),
             "listed twice");
  auto flagged = device_info(kOpAdd, {vq(0, 0x100000)});
  flagged[sizeof(DeviceInfoHeader) + offsetof(RemoteVirtq, flags)] = 1;
  expect_bad(parse(msg(kDeviceInfo, flagged, ackq), ackq), "unknown flags");
  auto short_dev = device_info(kOpAdd, {vq(0, 0x100000)});
  short_dev.pop_back();
  expect_bad(parse(msg(kDeviceInfo, short_dev, ackq), ackq), "payload bytes");

  auto fb = feature_bits(1, ackq);
  fb.push_back(0);
  expect_bad(parse(msg(kFeatureBits, fb, ackq), ackq), "expected");
  if (ackq)
    expect_bad(parse(msg(kUpdateDone, update_done(), true), true), "VHOST_PCI_F_ACKQ");
  else
    expect_bad(parse(msg(kUpdateDone, {1, 2, 3}, false), false), "expected 16");
}

INSTANTIATE_TEST_SUITE_P(AckModes, VhostPciParse, ::testing::Values(false, true),
                         [](const auto& p) { return p.param ? "Ackq" : "SpecConfigAcks"; });

// ---- remote memory ----

TEST(VhostPciMemory, RegionsAreCheckedAgainstTheBar) {
  const std::string dev = "0000:00:10.0";
  auto bad = [&](std::vector<Region> r, const std::string& text) {
    auto t = RemoteMemory::build(r, 0x100000, dev);
    ASSERT_FALSE(t.ok()) << text;
    EXPECT_EQ(t.error().code(), Errc::bad_device_data);
    EXPECT_NE(t.error().message().find(text), std::string::npos) << t.error().message();
  };
  bad({{0, 0x2000, 0xff000}}, "outside the 0x100000-byte memory BAR");
  bad({{0, 0x1000, 0x800}}, "not page aligned");
  bad({{0, 0x2000, 0}, {0x10000, 0x1000, 0x1000}}, "overlaps region 0 in the BAR");
  bad({{0, 0x2000, 0}, {0x1000, 0x1000, 0x4000}}, "overlaps region 0 in remote addresses");
  bad({{~0ull - 0xfff, 0x2000, 0}}, "outside");

  std::vector<std::uint8_t> bar(0x100000);
  auto t = RemoteMemory::build(std::vector<Region>{{0x200000, 0x2000, 0x10000}, {0x100000, 0x1000, 0}},
                               bar.size(), dev);
  ASSERT_TRUE(t.ok()) << t.error().message();
  auto s = t->translate(bar.data(), 0x200010, 16);
  ASSERT_TRUE(s);
  EXPECT_EQ(s->data(), bar.data() + 0x10010);
  EXPECT_TRUE(t->translate(bar.data(), 0x201fff, 1));
  EXPECT_FALSE(t->translate(bar.data(), 0x201fff, 2));       // past the region
  EXPECT_FALSE(t->translate(bar.data(), 0x100fff, 0x1002));  // would span into nothing
  EXPECT_FALSE(t->translate(bar.data(), 0x1fffff, 2));
  EXPECT_FALSE(t->translate(bar.data(), ~0ull, 1));
  EXPECT_FALSE(t->translate(bar.data(), 0x100000, ~0ull));
}

// ---- the driver against a scripted device ----

// A vhost-pci function whose controlq the test fills by hand (through the
// device role of the real ring the driver set up), to send it anything.
class ScriptedDevice {
 public:
  explicit ScriptedDevice(bool ackq, std::uint16_t queue_max_size = 256) {
    SoftVirtioOptions o;
    o.bdf = "0000:00:10.0";
    o.device_type = kDefaultVirtioId;
    o.features = (1ull << feature::kVersion1) | (ackq ? 1ull << kFeatureAckq : 0);
    o.num_queues = 2;
    o.queue_max_size = queue_max_size;
    o.msix_vectors = kFirstKickVector + kMaxRemoteVirtqs;
    o.device_config.assign(sizeof(Config), 0);
    dev = std::make_unique<SoftVirtioDevice>(o);
    dev->set_notify_hook([](std::uint16_t) {});
    dev->function().add_bar(kDoorbellBar, 4096);
    auto& mem = dev->function().add_bar(kMemoryBar, 0x100000);
    mem.set_mappable(true);
  }
  // Writes `bytes` into the next posted controlq buffer and interrupts.
  void deliver(const std::vector<std::uint8_t>& bytes) {
    if (!ctrl) {
      const auto st = dev->queue_state(kControlq);
      auto& d = dev->function().soft_dma();
      auto q = rings::SplitDeviceQueue::create(
          st.size, d.translate(st.desc, 16 * st.size), d.translate(st.driver, 6 + 2 * st.size),
          d.translate(st.device, 6 + 8 * st.size), "scripted controlq",
          [&d](std::uint64_t a, std::uint32_t l, bool) -> std::optional<std::span<std::uint8_t>> {
            auto* p = d.translate(a, l);
            if (!p) return std::nullopt;
            return std::span<std::uint8_t>(p, l);
          });
      ASSERT_TRUE(q.ok()) << q.error().message();
      ctrl.emplace(std::move(*q));
    }
    auto p = ctrl->pop();
    ASSERT_TRUE(p.ok() && p->has_value()) << "no controlq buffer posted";
    ASSERT_GE((*p)->writable_bytes, bytes.size());
    std::memcpy((*p)->writable[0].data(), bytes.data(), bytes.size());
    ASSERT_TRUE(ctrl->push((*p)->head, static_cast<std::uint32_t>(bytes.size())).ok());
    dev->interrupt_queue(kControlq);
  }
  Config config() const {
    Config c;
    const auto b = dev->device_config();
    std::memcpy(&c, b.data(), sizeof c);
    return c;
  }
  std::unique_ptr<SoftVirtioDevice> dev;
  std::optional<rings::SplitDeviceQueue> ctrl;
};

class VhostPciDriverTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    ackq = GetParam();
    sd = std::make_unique<ScriptedDevice>(ackq);
    auto d = Driver::open(sd->dev->take_function());
    ASSERT_TRUE(d.ok()) << d.error().message();
    drv = std::move(*d);
    EXPECT_EQ(drv->ackq(), ackq);
  }
  Driver::Event next() {
    auto ev = drv->wait_control(2000ms);
    EXPECT_TRUE(ev.ok()) << ev.error().message();
    if (!ev.ok() || ev->empty()) return Driver::Event::none;
    EXPECT_EQ(ev->size(), 1u);
    return ev->front();
  }
  void expect_refused(const std::string& text) {
    EXPECT_EQ(next(), Driver::Event::refused);
    ASSERT_TRUE(drv->last_refusal().has_value());
    EXPECT_NE(drv->last_refusal()->message().find(text), std::string::npos) << drv->last_refusal()->message();
    EXPECT_NE(drv->last_refusal()->message().find("0000:00:10.0"), std::string::npos);
  }
  // The last ack: from the config (spec) or the ackq.
  std::pair<std::uint32_t, std::uint64_t> last_ack() {
    if (!ackq) {
      const Config c = sd->config();
      return {c.ack_type.get(), c.ack.get()};
    }
    // The newest ack on the ackq; every pending one is completed so the
    // driver never runs out of ack buffers.
    const auto st = sd->dev->queue_state(kAckq);
    auto& d = sd->dev->function().soft_dma();
    auto* avail = d.translate(st.driver, 6 + 2 * st.size);
    auto* used = d.translate(st.device, 6 + 8 * st.size);
    const std::uint16_t idx = load_le16(avail + 2);
    EXPECT_NE(idx, load_le16(used + 2)) << "no new ack";
    auto* desc = reinterpret_cast<rings::VirtqDesc*>(d.translate(st.desc, 16 * st.size));
    auto* e = reinterpret_cast<rings::VirtqUsedElem*>(used + 4);
    AckMessage a{};
    for (std::uint16_t u = load_le16(used + 2); u != idx; ++u) {
      const std::uint16_t head = load_le16(avail + 4 + 2 * (u % st.size));
      std::memcpy(&a, d.translate(desc[head].addr.get(), sizeof a), sizeof a);
      e[u % st.size].id.set(head);
      e[u % st.size].len.set(0);
    }
    store_le16(used + 2, idx);
    sd->dev->interrupt_queue(kAckq);
    return {a.ack_type.get(), a.ack.get()};
  }
  void send(std::uint16_t type, const std::vector<std::uint8_t>& payload) {
    sd->deliver(msg(type, payload, ackq));
  }
  // Memory (128 KiB at 0x40000000, BAR offset 0) and VERSION_1 features.
  void announce_memory() {
    send(kMemoryInfo, memory_info(kOpAdd, {{0x40000000, 0x20000, 0}}));
    EXPECT_EQ(next(), Driver::Event::memory_added);
    last_ack();
    send(kFeatureBits, feature_bits(1ull << feature::kVersion1, ackq));
    EXPECT_EQ(next(), Driver::Event::features);
    last_ack();
  }
  // DEVICE_INFO ADD (and UPDATE_DONE in spec mode): served and ready.
  void serve(const std::vector<Virtq>& vqs) {
    send(kDeviceInfo, device_info(kOpAdd, vqs));
    EXPECT_EQ(next(), Driver::Event::device_added);
    EXPECT_EQ(last_ack(), std::make_pair(kDeviceInfoAck, kAddDone));
    if (!ackq) {
      send(kUpdateDone, update_done());
      EXPECT_EQ(next(), Driver::Event::device_ready);
    }
    ASSERT_TRUE(drv->remote_ready());
  }
  void withdraw() {
    send(kDeviceInfo, device_info(kOpDel, {}));
    EXPECT_EQ(next(), Driver::Event::device_removed);
    EXPECT_EQ(last_ack(), std::make_pair(kDeviceInfoAck, kDelDone));
  }
  std::uint8_t* bar() {
    return const_cast<std::uint8_t*>(sd->dev->function().soft_bar(kMemoryBar)->mapping());
  }
  // The remote driver of the ring vq(i, 0x40000000 + ring) offers a
  // one-descriptor chain `head` over [addr, addr + len).
  void offer(std::size_t ring, std::uint16_t head, std::uint64_t addr, std::uint32_t len, bool writable) {
    auto* desc = reinterpret_cast<rings::VirtqDesc*>(bar() + ring);
    desc[head].addr.set(addr);
    desc[head].len.set(len);
    desc[head].flags.set(writable ? rings::VIRTQ_DESC_F_WRITE : 0);
    std::uint8_t* avail = bar() + ring + 0x1000;
    const std::uint16_t idx = load_le16(avail + 2);
    store_le16(avail + 4 + 2 * (idx % 8), head);
    store_le16(avail + 2, static_cast<std::uint16_t>(idx + 1));
  }
  std::uint16_t used_idx(std::size_t ring) { return load_le16(bar() + ring + 0x2000 + 2); }
  void expect_peer_gone(const Result<void>& r, const std::string& op, const std::string& cause) {
    ASSERT_FALSE(r.ok()) << op << " succeeded";
    EXPECT_EQ(r.error().code(), Errc::peer_gone) << r.error().message();
    for (const auto& text : {std::string("0000:00:10.0"), op, cause})
      EXPECT_NE(r.error().message().find(text), std::string::npos) << r.error().message();
  }

  bool ackq = false;
  std::unique_ptr<ScriptedDevice> sd;
  std::unique_ptr<Driver> drv;
};

TEST_P(VhostPciDriverTest, HostileMessagesAreRefusedAndNothingIsServed) {
  // DEVICE_INFO before any memory.
  send(kDeviceInfo, device_info(kOpAdd, {vq(0, 0x1000)}));
  expect_refused("no MEMORY_INFO");
  EXPECT_EQ(last_ack(), std::make_pair(kDeviceInfoAck, kAddFail));
  // Regions outside the BAR, overlapping.
  send(kMemoryInfo, memory_info(kOpAdd, {{0x40000000, 0x200000, 0}}));
  expect_refused("outside the 0x100000-byte memory BAR");
  EXPECT_EQ(last_ack(), std::make_pair(kMemoryInfoAck, kAddFail));
  send(kMemoryInfo, memory_info(kOpAdd, {{0x40000000, 0x10000, 0}, {0x50000000, 0x10000, 0x8000}}));
  expect_refused("overlaps region 0 in the BAR");
  // Garbage: refused, no ack (nothing in it can be trusted), buffer reused.
  sd->deliver({1, 2, 3});
  expect_refused("shorter than");
  // Good memory now.
  send(kMemoryInfo, memory_info(kOpAdd, {{0x40000000, 0x10000, 0}}));
  EXPECT_EQ(next(), Driver::Event::memory_added);
  EXPECT_EQ(last_ack(), std::make_pair(kMemoryInfoAck, kAddDone));
  send(kFeatureBits, feature_bits((1ull << feature::kVersion1) | (1ull << 40), ackq));
  EXPECT_EQ(next(), Driver::Event::features);
  // Rings outside the remote memory, a wrong kick vector, a doorbell outside its BAR.
  send(kDeviceInfo, device_info(kOpAdd, {vq(0, 0x40000000), vq(1, 0x4000f000)}));
  expect_refused("outside the remote memory");
  EXPECT_EQ(last_ack(), std::make_pair(kDeviceInfoAck, kAddFail));
  auto v = vq(0, 0x40000000);
  v.kick_vector = 1;
  send(kDeviceInfo, device_info(kOpAdd, {v}));
  expect_refused("kick vector 1");
  v = vq(0, 0x40000000);
  v.call_doorbell = 2000;
  send(kDeviceInfo, device_info(kOpAdd, {v}));
  expect_refused("call doorbell 2000");
  send(kDeviceInfo, device_info(kOpAdd, {vq(0, 0x40000000)}, 1, kDeviceBlk));
  expect_refused("only net");
  EXPECT_EQ(drv->remote_queue(0), nullptr);
  // A good device (its queue 1 resumes at index 3); UPDATE_DONE for another
  // device is refused.
  auto resumed = vq(1, 0x40004000);
  resumed.last_avail_idx = 3;
  send(kDeviceInfo, device_info(kOpAdd, {vq(0, 0x40000000), resumed}));
  EXPECT_EQ(next(), Driver::Event::device_added);
  EXPECT_EQ(last_ack(), std::make_pair(kDeviceInfoAck, kAddDone));
  if (!ackq) {
    EXPECT_EQ(drv->remote_queue(0), nullptr);  // not before UPDATE_DONE
    send(kUpdateDone, update_done(0x9999));
    expect_refused("not added");
    send(kUpdateDone, update_done());
    EXPECT_EQ(next(), Driver::Event::device_ready);
  }
  ASSERT_NE(drv->remote_queue(1), nullptr);
  EXPECT_GE(drv->kick_fd(1), 0);
  {  // queue 1 takes the entry at available index 3 first
    auto* bar = sd->dev->function().soft_bar(kMemoryBar);
    std::uint8_t* avail = const_cast<std::uint8_t*>(bar->mapping()) + 0x4000 + 0x1000;
    store_le16(avail + 4 + 2 * 3, 5);  // ring[3] = head 5
    store_le16(avail + 2, 4);          // avail idx 4
    auto* desc = reinterpret_cast<rings::VirtqDesc*>(const_cast<std::uint8_t*>(bar->mapping()) + 0x4000);
    desc[5].addr.set(0x40008000);
    desc[5].len.set(8);
    auto got = drv->remote_queue(1)->pop();
    ASSERT_TRUE(got.ok() && got->has_value()) << (got.ok() ? "empty" : got.error().message());
    EXPECT_EQ((*got)->head, 5);
    ASSERT_TRUE(drv->remote_queue(1)->push(5, 0).ok());
  }
  // Memory cannot go while it is in use; the device goes first.
  send(kMemoryInfo, memory_info(kOpDel, {{0x40000000, 0x10000, 0}}));
  expect_refused("while a remote device is served");
  send(kDeviceInfo, device_info(kOpDel, {}));
  EXPECT_EQ(next(), Driver::Event::device_removed);
  EXPECT_EQ(last_ack(), std::make_pair(kDeviceInfoAck, kDelDone));
  EXPECT_EQ(drv->remote_queue(1), nullptr);
  send(kMemoryInfo, memory_info(kOpDel, {{0x40000000, 0x10000, 0}}));
  EXPECT_EQ(next(), Driver::Event::memory_removed);
  EXPECT_TRUE(drv->memory().empty());
}

TEST_P(VhostPciDriverTest, FeatureBitsAreNeverAcceptedBeyondTheOffer) {
  // The driver accepts everything by default, but only what was offered.
  send(kFeatureBits, feature_bits(0x5, ackq));
  EXPECT_EQ(next(), Driver::Event::features);
  EXPECT_EQ(drv->remote_features(), 0x5u);
  EXPECT_EQ(last_ack(), std::make_pair(kFeatureBitsAck, std::uint64_t{0x5}));
}

// A device withdrawn and another added while NetChannel::peek() sleeps: the
// DEL frees the served queues and the ADD (three queues: served_ grows into
// new storage) makes remote_ready() true again. The wait must end with
// peer_gone instead of reading the freed queue (ASan: heap-use-after-free),
// and the channel then receives from the new device's rings.
TEST_P(VhostPciDriverTest, NetChannelWaitEndsWhenTheDeviceIsReplaced) {
  announce_memory();
  serve({vq(0, 0x40000000), vq(1, 0x40004000)});
  NetChannel ch(*drv);
  // Queued before the app waits, so one wait_control() inside the wait
  // handles them all.
  send(kDeviceInfo, device_info(kOpDel, {}));
  send(kDeviceInfo, device_info(kOpAdd, {vq(0, 0x40008000), vq(1, 0x4000c000), vq(2, 0x40010000)}));
  if (!ackq) send(kUpdateDone, update_done());
  auto r = ch.peek(1s);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::peer_gone) << r.error().message();
  EXPECT_NE(r.error().message().find("0000:00:10.0"), std::string::npos) << r.error().message();
  EXPECT_NE(r.error().message().find("receive a frame"), std::string::npos) << r.error().message();
  EXPECT_NE(r.error().message().find("withdrawn and another added"), std::string::npos)
      << r.error().message();
  if (ackq) last_ack();  // complete the DEL and ADD acks
  ASSERT_TRUE(drv->remote_ready());
  // The new device transmits a frame on its queue 1.
  std::memset(bar() + 0x18000, 0, 12);
  std::memset(bar() + 0x18000 + 12, 0xab, 60);
  offer(0xc000, 3, 0x40018000, 72, false);
  auto m = ch.peek(1s);
  ASSERT_TRUE(m.ok()) << m.error().message();
  ASSERT_EQ(m->size(), 60u);
  EXPECT_EQ(static_cast<std::uint8_t>((*m)[0]), 0xab);
  ASSERT_TRUE(ch.release().ok());
  EXPECT_EQ(used_idx(0xc000), 1);
}

// A frame reserved in the remote's receive buffer when the device is
// withdrawn and another added: commit() must not write the header into the
// old buffer (the new remote's memory now) nor push the old head; it drops
// the reservation with peer_gone, and the next reserve/commit fills a buffer
// of the new device.
TEST_P(VhostPciDriverTest, NetChannelDropsAReservationWhenTheDeviceChanges) {
  announce_memory();
  serve({vq(0, 0x40000000), vq(1, 0x40004000)});
  offer(0x0000, 0, 0x40018000, 128, true);
  NetChannel ch(*drv);
  auto slot = ch.try_reserve(60);
  ASSERT_TRUE(slot.ok() && slot->has_value()) << (slot.ok() ? "no buffer" : slot.error().message());
  std::memset((*slot)->data(), 0x11, 60);  // zero-copy: lands in the old buffer itself

  withdraw();
  std::memset(bar() + 0x18000, 0xee, 128);  // the new remote's data at the old place
  serve({vq(0, 0x40008000), vq(1, 0x4000c000)});
  expect_peer_gone(ch.commit(60), "commit a frame", "withdrawn holding a reserved frame");
  for (std::size_t i = 0; i < 128; ++i)
    ASSERT_EQ(bar()[0x18000 + i], 0xee) << "commit wrote byte " << i << " after the device changed";
  EXPECT_EQ(used_idx(0x0000), 0);  // nothing pushed on the old ring
  EXPECT_EQ(used_idx(0x8000), 0);  // nor the old head on the new one
  // Dropped: a second commit has nothing to commit.
  auto again = ch.commit(60);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code(), Errc::invalid_argument) << again.error().message();

  // The new device's receive buffer takes a fresh frame.
  offer(0x8000, 2, 0x4001a000, 128, true);
  slot = ch.try_reserve(60);
  ASSERT_TRUE(slot.ok() && slot->has_value()) << (slot.ok() ? "no buffer" : slot.error().message());
  EXPECT_EQ(reinterpret_cast<std::uint8_t*>((*slot)->data()), bar() + 0x1a000 + 12);
  std::memset((*slot)->data(), 0x22, 60);
  ASSERT_TRUE(ch.commit(60).ok());
  EXPECT_EQ(used_idx(0x8000), 1);
  const auto* used = reinterpret_cast<const rings::VirtqUsedElem*>(bar() + 0xa000 + 4);
  EXPECT_EQ(used[0].id.get(), 2u);
  EXPECT_EQ(used[0].len.get(), 72u);
  EXPECT_EQ(bar()[0x1a000 + 10], 1);  // num_buffers
  EXPECT_EQ(bar()[0x1a000 + 12], 0x22);
  EXPECT_EQ(bar()[0x18000], 0xee);
}

// A frame peeked from the remote's transmit queue when the device is
// withdrawn and another added: the next try_peek() must not hand out the old
// span again, release() must not push the old head; peer_gone once, then
// the new device's frames.
TEST_P(VhostPciDriverTest, NetChannelDropsAPeekWhenTheDeviceChanges) {
  announce_memory();
  serve({vq(0, 0x40000000), vq(1, 0x40004000)});
  std::memset(bar() + 0x18000, 0, 12);
  std::memset(bar() + 0x18000 + 12, 0x11, 60);
  offer(0x4000, 0, 0x40018000, 72, false);
  NetChannel ch(*drv);
  auto m = ch.try_peek();
  ASSERT_TRUE(m.ok() && m->has_value()) << (m.ok() ? "no frame" : m.error().message());

  withdraw();
  serve({vq(0, 0x40008000), vq(1, 0x4000c000)});
  auto stale = ch.try_peek();
  ASSERT_FALSE(stale.ok()) << "handed out the old device's frame";
  EXPECT_EQ(stale.error().code(), Errc::peer_gone) << stale.error().message();
  EXPECT_NE(stale.error().message().find("peek a frame"), std::string::npos) << stale.error().message();
  EXPECT_NE(stale.error().message().find("a peeked frame"), std::string::npos) << stale.error().message();
  auto rel = ch.release();
  ASSERT_FALSE(rel.ok());
  EXPECT_EQ(rel.error().code(), Errc::invalid_argument) << rel.error().message();  // nothing peeked
  EXPECT_EQ(used_idx(0x4000), 0);
  EXPECT_EQ(used_idx(0xc000), 0);

  // Held across the change again, this time released: dropped, not pushed.
  std::memset(bar() + 0x1a000, 0, 12);
  std::memset(bar() + 0x1a000 + 12, 0x22, 60);
  offer(0xc000, 4, 0x4001a000, 72, false);
  m = ch.try_peek();
  ASSERT_TRUE(m.ok() && m->has_value()) << (m.ok() ? "no frame" : m.error().message());
  EXPECT_EQ(static_cast<std::uint8_t>((**m)[0]), 0x22);
  withdraw();
  // The newest device's rings are where the first device's were, fresh.
  std::memset(bar(), 0, 0x7000);
  serve({vq(0, 0x40000000), vq(1, 0x40004000)});
  expect_peer_gone(ch.release(), "release a frame", "withdrawn holding a peeked frame");
  EXPECT_EQ(used_idx(0xc000), 0);
  EXPECT_EQ(used_idx(0x4000), 0);

  // The newest device transmits; peek and release work on its rings.
  std::memset(bar() + 0x1c000, 0, 12);
  std::memset(bar() + 0x1c000 + 12, 0x33, 60);
  offer(0x4000, 5, 0x4001c000, 72, false);
  m = ch.try_peek();
  ASSERT_TRUE(m.ok() && m->has_value()) << (m.ok() ? "no frame" : m.error().message());
  EXPECT_EQ(static_cast<std::uint8_t>((**m)[0]), 0x33);
  ASSERT_TRUE(ch.release().ok());
  EXPECT_EQ(used_idx(0x4000), 1);
  EXPECT_EQ(reinterpret_cast<const rings::VirtqUsedElem*>(bar() + 0x6000 + 4)[0].id.get(), 5u);
}

// Remote features in effect while a device is served shaped its rings (event
// index, indirect) and NetChannel's header length: FEATURE_BITS then is
// refused, acked with the part of the offer that stays in effect, and
// accepted again once the device is gone.
TEST_P(VhostPciDriverTest, FeatureBitsAreRefusedWhileADeviceIsServed) {
  announce_memory();
  serve({vq(0, 0x40000000), vq(1, 0x40004000)});
  send(kFeatureBits, feature_bits((1ull << feature::kVersion1) | (1ull << feature::kEventIdx), ackq));
  expect_refused("FEATURE_BITS while a remote device is served");
  EXPECT_EQ(last_ack(), std::make_pair(kFeatureBitsAck, std::uint64_t{1} << feature::kVersion1));
  EXPECT_EQ(drv->remote_features(), std::uint64_t{1} << feature::kVersion1);
  withdraw();
  send(kFeatureBits, feature_bits(1ull << feature::kEventIdx, ackq));
  EXPECT_EQ(next(), Driver::Event::features);
  EXPECT_EQ(drv->remote_features(), std::uint64_t{1} << feature::kEventIdx);
}

// A device whose controlq and ackq hold only 2 descriptors (any power of two
// is a valid queue size): the driver posts no more controlq buffers than fit
// (open() failed posting its third), and with both ack descriptors in flight
// the next ack waits for the device's completion instead of failing on a
// full ring.
TEST_P(VhostPciDriverTest, SmallControlQueuesAreUsedWithinTheirSize) {
  drv.reset();
  sd = std::make_unique<ScriptedDevice>(ackq, 2);
  auto d = Driver::open(sd->dev->take_function());
  ASSERT_TRUE(d.ok()) << d.error().message();
  drv = std::move(*d);
  const std::uint64_t version1 = 1ull << feature::kVersion1;
  for (int i = 0; i < 2; ++i) {
    send(kFeatureBits, feature_bits(version1, ackq));
    EXPECT_EQ(next(), Driver::Event::features);
  }
  // Both ack descriptors are in flight now (ACKQ): the device completes
  // them only while the third ack waits.
  std::thread device;
  if (ackq)
    device = std::thread([&] {
      std::this_thread::sleep_for(100ms);
      last_ack();
    });
  send(kFeatureBits, feature_bits(version1, ackq));
  EXPECT_EQ(next(), Driver::Event::features);
  if (device.joinable()) device.join();
  EXPECT_EQ(last_ack(), std::make_pair(kFeatureBitsAck, version1));
}

// The driver serves the remote's rings as split rings only
// (rings::SplitDeviceQueue): acking VIRTIO_F_RING_PACKED would have the remote
// lay its rings out packed while the driver reads them as split. The ack
// leaves it out although DriverOptions accept every bit by default.
TEST_P(VhostPciDriverTest, FeatureBitsNeverAcceptAPackedRing) {
  const std::uint64_t version1 = 1ull << feature::kVersion1;
  send(kFeatureBits, feature_bits(version1 | (1ull << feature::kRingPacked), ackq));
  EXPECT_EQ(next(), Driver::Event::features);
  EXPECT_EQ(drv->remote_features(), version1);
  EXPECT_FALSE(drv->remote_has(feature::kRingPacked));
  EXPECT_EQ(last_ack(), std::make_pair(kFeatureBitsAck, version1));
}

// A frame reserved in a receive buffer of two descriptors (header apart from
// the frame) goes through the bounce buffer, sized for the reserved length.
// commit() of more than was reserved is bad API input (channel.hpp: len <=
// reserved): it must be refused, not copy past the bounce buffer's end into
// the remote's memory (ASan: heap-buffer-overflow), and the reservation stays
// committable.
TEST_P(VhostPciDriverTest, NetChannelCommitLongerThanReservedIsRefused) {
  announce_memory();
  serve({vq(0, 0x40000000), vq(1, 0x40004000)});
  auto* desc = reinterpret_cast<rings::VirtqDesc*>(bar());
  desc[0].addr.set(0x40018000);
  desc[0].len.set(12);
  desc[0].flags.set(rings::VIRTQ_DESC_F_WRITE | rings::VIRTQ_DESC_F_NEXT);
  desc[0].next.set(1);
  desc[1].addr.set(0x40019000);
  desc[1].len.set(2048);
  desc[1].flags.set(rings::VIRTQ_DESC_F_WRITE);
  std::uint8_t* avail = bar() + 0x1000;
  store_le16(avail + 4, 0);
  store_le16(avail + 2, 1);
  std::memset(bar() + 0x19000, 0xee, 2048);
  NetChannel ch(*drv);
  auto slot = ch.try_reserve(60);
  ASSERT_TRUE(slot.ok() && slot->has_value()) << (slot.ok() ? "no buffer" : slot.error().message());
  std::memset((*slot)->data(), 0x11, 60);
  auto r = ch.commit(1000);
  ASSERT_FALSE(r.ok()) << "committed 1000 bytes of a 60-byte reservation";
  EXPECT_EQ(r.error().code(), Errc::invalid_argument) << r.error().message();
  EXPECT_NE(r.error().message().find("0000:00:10.0"), std::string::npos) << r.error().message();
  EXPECT_NE(r.error().message().find("reserved"), std::string::npos) << r.error().message();
  EXPECT_EQ(used_idx(0x0000), 0);
  EXPECT_EQ(bar()[0x19000], 0xee);  // nothing written
  ASSERT_TRUE(ch.commit(60).ok());
  EXPECT_EQ(used_idx(0x0000), 1);
  EXPECT_EQ(reinterpret_cast<const rings::VirtqUsedElem*>(bar() + 0x2000 + 4)[0].len.get(), 72u);
  EXPECT_EQ(bar()[0x19000], 0x11);
  EXPECT_EQ(bar()[0x19000 + 60], 0xee);
}

// A device that answers every controlq buffer the driver posts with a new
// message at once (here: from the notification of the repost) must not keep
// wait_control() -- and the NetChannel waits and app loops calling it --
// from returning: its timeout bounds the wait for the first message, and the
// messages handled in one call are bounded too.
TEST_P(VhostPciDriverTest, AControlqFloodDoesNotHoldWaitControl) {
  int delivered = 0;
  sd->dev->set_notify_hook([&](std::uint16_t q) {
    if (q != kControlq || delivered >= 1000) return;
    ++delivered;
    sd->deliver({1, 2, 3});  // garbage: refused without an ack
  });
  sd->deliver({1, 2, 3});
  auto ev = drv->wait_control(0ms);
  ASSERT_TRUE(ev.ok()) << ev.error().message();
  EXPECT_FALSE(ev->empty());
  EXPECT_LE(ev->size(), 64u) << "one wait_control() handled a flood of " << ev->size() << " messages";
  sd->dev->set_notify_hook([](std::uint16_t) {});
}

INSTANTIATE_TEST_SUITE_P(AckModes, VhostPciDriverTest, ::testing::Values(false, true),
                         [](const auto& p) { return p.param ? "Ackq" : "SpecConfigAcks"; });

// ---- the whole chain: front-end -> device model -> driver ----

using vhost_user::bytes_of;
using vhost_user::Frontend;
using vhost_user::Memfd;
using vhost_user::Request;
using vhost_user::VringAddr;
using vhost_user::VringState;

constexpr std::uint64_t kGpa = 0x40000000;
constexpr std::uint64_t kUva = 0x7f3400000000;
constexpr std::size_t kRam = 1 << 20;
constexpr std::uint16_t kQsize = 8;
constexpr std::uint64_t kNetFeatures = (1ull << feature::kVersion1) | (1ull << feature::kEventIdx);

class VhostPciChain : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    ackq = GetParam();
    dir = std::filesystem::temp_directory_path() / ("uvirtio-vpci-" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir);
    DeviceOptions o;
    o.socket = (dir / "net.sock").string();
    o.net_features = kNetFeatures;
    o.device_id = 0x525400aabbcc;
    o.offer_ackq = ackq;
    o.memory_bar_size = 64ull << 20;
    o.log = [this](const std::string& line) { on_log(line); };
    auto m = DeviceModel::create(o);
    ASSERT_TRUE(m.ok()) << m.error().message();
    model = std::move(*m);
    stop = ::eventfd(0, EFD_CLOEXEC);
    thread = std::thread([this] {
      auto r = model->run(stop);
      EXPECT_TRUE(r.ok()) << r.error().message();
    });
    DriverOptions d;
    d.accept_remote_features = accept;
    auto drv_r = Driver::open(model->function(), d);
    ASSERT_TRUE(drv_r.ok()) << drv_r.error().message();
    drv = std::move(*drv_r);
    for (int i = 0; i < 2; ++i) {
      kick[i] = vhost_user::make_eventfd();
      call[i] = vhost_user::make_eventfd();
    }
  }
  void TearDown() override {
    fe.reset();
    drv.reset();
    const std::uint64_t one = 1;
    (void)!::write(stop, &one, sizeof one);
    if (thread.joinable()) thread.join();
    model.reset();
    ::close(stop);
    for (int i = 0; i < 2; ++i) {
      ::close(kick[i]);
      ::close(call[i]);
    }
    std::filesystem::remove_all(dir);
  }

  void connect() {
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    const auto path = (dir / "net.sock").string();
    std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    fe = std::make_unique<Frontend>(fd);
  }
  std::uint64_t ring_off(int i) const { return static_cast<std::uint64_t>(i) * 0x4000; }
  std::uint64_t gpa(const void* p) const {
    return kGpa + static_cast<std::uint64_t>(static_cast<const std::uint8_t*>(p) - ram.map);
  }
  // The front-end's whole set-up, as QEMU does it; returns the offered features.
  std::uint64_t start_frontend(std::uint64_t want = kNetFeatures) {
    connect();
    fe->send(Request::get_features);
    const std::uint64_t offered = fe->recv_u64(Request::get_features);
    fe->send(Request::get_protocol_features);
    (void)fe->recv_u64(Request::get_protocol_features);
    fe->send(Request::set_protocol_features,
             bytes_of(std::uint64_t{1} << vhost_user::protocol_feature::kReplyAck));
    fe->send(Request::set_owner);
    fe->send(Request::set_features, bytes_of((want & offered) | (1ull << vhost_user::kProtocolFeaturesBit)));
    fe->send(Request::set_mem_table, vhost_user::mem_table({vhost_user::region(kGpa, kRam, kUva, 0)}),
             {ram.fd}, true);
    EXPECT_EQ(fe->recv_u64(Request::set_mem_table), 0u);
    for (int i = 0; i < 2; ++i) {
      auto q =
          rings::SplitQueue::create(kQsize, ram.map + ring_off(i), ram.map + ring_off(i) + 0x1000,
                                    ram.map + ring_off(i) + 0x2000, "front-end ring " + std::to_string(i));
      EXPECT_TRUE(q.ok());
      q->set_event_idx((want & offered & (1ull << feature::kEventIdx)) != 0);
      rings[i].emplace(std::move(*q));
      const auto u = static_cast<std::uint32_t>(i);
      fe->send(Request::set_vring_num, bytes_of(VringState{u, kQsize}));
      fe->send(Request::set_vring_base, bytes_of(VringState{u, 0}));
      fe->send(Request::set_vring_addr,
               bytes_of(VringAddr{u, 0, kUva + ring_off(i), kUva + ring_off(i) + 0x2000,
                                  kUva + ring_off(i) + 0x1000, 0}));
      fe->send(Request::set_vring_call, bytes_of(std::uint64_t(i)), {call[i]});
      fe->send(Request::set_vring_kick, bytes_of(std::uint64_t(i)), {kick[i]});
      fe->send(Request::set_vring_enable, bytes_of(VringState{u, 1}), {}, true);
      EXPECT_EQ(fe->recv_u64(Request::set_vring_enable), 0u);
    }
    return offered;
  }
  // Handles controlq messages until `want` was seen (or 5 s pass); events
  // that came after it in the same batch are kept for the next call.
  bool wait_for(Driver::Event want) {
    const auto until = std::chrono::steady_clock::now() + 5s;
    for (;;) {
      while (!seen.empty()) {
        const auto e = seen.front();
        seen.pop_front();
        if (e == want) return true;
      }
      if (std::chrono::steady_clock::now() >= until) return false;
      auto ev = drv->wait_control(200ms);
      if (!ev.ok()) {
        ADD_FAILURE() << ev.error().message();
        return false;
      }
      seen.insert(seen.end(), ev->begin(), ev->end());
    }
  }
  void exchange_packets() {
    // Front-end transmits "ping" on its ring 1 and kicks.
    std::uint8_t* out = ram.map + 0x10000;
    std::memcpy(out, "ping", 4);
    const rings::Buffer tx[] = {{gpa(out), 4}};
    ASSERT_TRUE(rings[1]->add(tx, {}, 1).ok());
    if (rings[1]->publish()) {
      ASSERT_EQ(::write(kick[1], "\1\0\0\0\0\0\0\0", 8), 8);
    }
    // The kick arrives as the driver's MSI-X eventfd.
    const int kfd = drv->kick_fd(1);
    ASSERT_GE(kfd, 0);
    pollfd p{kfd, POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 2000), 1);
    drv->drain_kick(1);
    auto* q = drv->remote_queue(1);
    ASSERT_NE(q, nullptr);
    auto got = q->pop();
    ASSERT_TRUE(got.ok() && got->has_value()) << (got.ok() ? "empty" : got.error().message());
    EXPECT_EQ(std::string(reinterpret_cast<const char*>((*got)->readable[0].data()), 4), "ping");
    ASSERT_TRUE(q->push((*got)->head, 0).ok());
    if (q->should_interrupt()) {
      ASSERT_TRUE(drv->call_remote(1).ok());
    }
    EXPECT_EQ(vhost_user::drain(call[1]), 1u);  // through the doorbell BAR
    auto done = rings[1]->poll();
    ASSERT_TRUE(done.ok() && done->has_value());

    // The driver answers "pong" into the front-end's receive ring.
    std::uint8_t* in = ram.map + 0x11000;
    const rings::Buffer rx[] = {{gpa(in), 64}};
    ASSERT_TRUE(rings[0]->add({}, rx, 2).ok());
    rings[0]->publish();
    auto* rq = drv->remote_queue(0);
    ASSERT_NE(rq, nullptr);
    auto chain = rq->pop();
    ASSERT_TRUE(chain.ok() && chain->has_value());
    std::memcpy((*chain)->writable[0].data(), "pong", 4);
    ASSERT_TRUE(rq->push((*chain)->head, 4).ok());
    if (rq->should_interrupt()) {
      ASSERT_TRUE(drv->call_remote(0).ok());
    }
    EXPECT_EQ(vhost_user::drain(call[0]), 1u);
    auto rdone = rings[0]->poll();
    ASSERT_TRUE(rdone.ok() && rdone->has_value());
    EXPECT_EQ((*rdone)->len, 4u);
    EXPECT_EQ(std::memcmp(in, "pong", 4), 0);
  }

  // The device model's log lines; `on_feature_bits` (if set) runs on the
  // model's thread when it is about to send FEATURE_BITS (the offer), before
  // the driver can see the message.
  void on_log(const std::string& line) {
    std::lock_guard lock(log_mu);
    logs.push_back(line);
    if (on_feature_bits && line.rfind("FEATURE_BITS ", 0) == 0)
      on_feature_bits(std::stoull(line.substr(13), nullptr, 16));
  }
  bool logged(const std::string& part) {
    std::lock_guard lock(log_mu);
    return std::any_of(logs.begin(), logs.end(),
                       [&](const std::string& l) { return l.find(part) != std::string::npos; });
  }
  // Device status as the driver reads it, through a second handle on the function.
  bool needs_reset_within(std::chrono::milliseconds limit) {
    auto fn = model->function();
    auto bar = fn->bar(SoftVirtioDevice::kBar);
    EXPECT_TRUE(bar.ok());
    if (!bar.ok()) return false;
    const auto until = std::chrono::steady_clock::now() + limit;
    do {
      auto st = (*bar)->read(SoftVirtioDevice::kCommon + 0x14, 1);
      if (st.ok() && (*st & status::kNeedsReset) != 0) return true;
      std::this_thread::sleep_for(5ms);
    } while (std::chrono::steady_clock::now() < until);
    return false;
  }

  std::mutex log_mu;
  std::vector<std::string> logs;
  std::function<void(std::uint64_t)> on_feature_bits;
  bool ackq = false;
  std::uint64_t accept = ~0ull;
  std::filesystem::path dir;
  std::unique_ptr<DeviceModel> model;
  int stop = -1;
  std::thread thread;
  std::unique_ptr<Driver> drv;
  Memfd ram{kRam};
  std::unique_ptr<Frontend> fe;
  std::optional<rings::SplitQueue> rings[2];
  std::deque<Driver::Event> seen;
  int kick[2] = {-1, -1};
  int call[2] = {-1, -1};
};

TEST_P(VhostPciChain, FrontendServedThroughTheDriverAndReplacedAfterLeaving) {
  EXPECT_EQ(start_frontend() & kNetFeatures, kNetFeatures);
  ASSERT_TRUE(wait_for(Driver::Event::memory_added));
  ASSERT_TRUE(wait_for(ackq ? Driver::Event::device_added : Driver::Event::device_ready));
  EXPECT_TRUE(drv->remote_ready());
  EXPECT_EQ(drv->remote_device_id(), 0x525400aabbccu);
  EXPECT_EQ(drv->remote_features() & kNetFeatures, kNetFeatures);
  ASSERT_EQ(drv->memory().regions().size(), 1u);
  EXPECT_EQ(drv->memory().regions()[0].gpa, kGpa);
  exchange_packets();

  // The front-end goes away: the device is withdrawn, then the memory.
  fe.reset();
  ASSERT_TRUE(wait_for(Driver::Event::device_removed));
  EXPECT_EQ(drv->remote_queue(1), nullptr);
  ASSERT_TRUE(wait_for(Driver::Event::memory_removed));

  // A new front-end on the same socket is announced and served.
  std::memset(ram.map, 0, 0x8000);  // fresh rings
  start_frontend();
  ASSERT_TRUE(wait_for(ackq ? Driver::Event::device_added : Driver::Event::device_ready));
  exchange_packets();
  // The device model counts the ack when its thread has read it.
  auto st = model->stats();
  for (int i = 0; i < 200 && st.announced < 2; ++i) {
    std::this_thread::sleep_for(10ms);
    st = model->stats();
  }
  EXPECT_EQ(st.sessions, 2u);
  EXPECT_EQ(st.announced, 2u);
  EXPECT_EQ(st.withdrawn, 1u);
}

// The channel API over the remote virtio-net: frames without their
// virtio_net_hdr, zero-copy in single-buffer chains, timeouts and peer_gone.
TEST_P(VhostPciChain, NetChannelCarriesFramesBothWays) {
  start_frontend();
  ASSERT_TRUE(wait_for(ackq ? Driver::Event::device_added : Driver::Event::device_ready));
  NetChannel ch(*drv);
  ASSERT_TRUE(ch.ready());
  const std::size_t hl = 12;  // VERSION_1

  // Nothing sent yet; no receive buffer posted yet.
  auto none = ch.try_peek();
  ASSERT_TRUE(none.ok()) << none.error().message();
  EXPECT_FALSE(none->has_value());
  std::vector<std::byte> frame(60);
  for (std::size_t i = 0; i < frame.size(); ++i) frame[i] = static_cast<std::byte>(i);
  auto t = ch.send(frame, 50ms);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.error().code(), Errc::timeout);

  // The front-end transmits header + 60-byte frame; we peek the frame only.
  std::uint8_t* out = ram.map + 0x10000;
  std::memset(out, 0, hl);
  std::memcpy(out + hl, frame.data(), frame.size());
  const rings::Buffer tx[] = {{gpa(out), static_cast<std::uint32_t>(hl + frame.size())}};
  ASSERT_TRUE(rings[1]->add(tx, {}, 7).ok());
  if (rings[1]->publish()) {
    ASSERT_EQ(::write(kick[1], "\1\0\0\0\0\0\0\0", 8), 8);
  }
  auto m = ch.peek(2s);
  ASSERT_TRUE(m.ok()) << m.error().message();
  ASSERT_EQ(m->size(), frame.size());
  EXPECT_EQ(std::memcmp(m->data(), frame.data(), frame.size()), 0);
  {  // zero-copy: the frame is read in place, through the memory BAR
    auto fn = model->function();
    auto bar = fn->bar(kMemoryBar);
    ASSERT_TRUE(bar.ok());
    auto* base = const_cast<std::uint8_t*>((*bar)->mapping());
    auto at = drv->memory().translate(base, gpa(out) + hl, frame.size());
    ASSERT_TRUE(at);
    EXPECT_EQ(reinterpret_cast<const std::uint8_t*>(m->data()), at->data());
  }
  ASSERT_TRUE(ch.release().ok());
  auto done = rings[1]->poll();
  ASSERT_TRUE(done.ok() && done->has_value());
  EXPECT_EQ((*done)->token, 7u);

  // The front-end posts a receive buffer; we send a frame into it (zero-copy).
  std::uint8_t* in = ram.map + 0x11000;
  std::memset(in, 0xee, 256);
  const rings::Buffer rx[] = {{gpa(in), 256}};
  ASSERT_TRUE(rings[0]->add({}, rx, 8).ok());
  rings[0]->publish();
  auto slot = ch.try_reserve(frame.size());
  ASSERT_TRUE(slot.ok() && slot->has_value()) << (slot.ok() ? "no buffer" : slot.error().message());
  std::memcpy((*slot)->data(), frame.data(), frame.size());
  ASSERT_TRUE(ch.commit(frame.size()).ok());
  auto rdone = rings[0]->poll();
  ASSERT_TRUE(rdone.ok() && rdone->has_value());
  EXPECT_EQ((*rdone)->len, hl + frame.size());
  EXPECT_EQ(in[10], 1);  // num_buffers
  EXPECT_EQ(in[0], 0);
  EXPECT_EQ(std::memcmp(in + hl, frame.data(), frame.size()), 0);
  EXPECT_EQ(in[hl + frame.size()], 0xee);  // nothing written past the frame

  // A frame too big for the posted buffer: refused, the buffer returned empty.
  ASSERT_TRUE(rings[0]->add({}, rx, 9).ok());
  rings[0]->publish();
  std::vector<std::byte> big(1000);
  auto tb = ch.try_send(big);
  ASSERT_FALSE(tb.ok());
  EXPECT_EQ(tb.error().code(), Errc::invalid_argument);
  EXPECT_EQ(ch.dropped(), 1u);

  // The front-end leaves: the channel reports peer_gone.
  fe.reset();
  auto gone = ch.peek(5s);
  ASSERT_FALSE(gone.ok());
  EXPECT_EQ(gone.error().code(), Errc::peer_gone) << gone.error().message();
}

// vhost-user: a disabled ring keeps its state; enabled again it resumes where
// it was. The device model withdraws the remote device while a ring is
// disabled and announces it again afterwards: the driver must resume at
// the ring's current position, not at the SET_VRING_BASE of its start, or
// it takes chains the front-end already got back (and may have reused).
TEST_P(VhostPciChain, ARingEnabledAgainResumesWhereItWas) {
  start_frontend();
  ASSERT_TRUE(wait_for(ackq ? Driver::Event::device_added : Driver::Event::device_ready));
  exchange_packets();  // one chain through each ring
  fe->send(Request::set_vring_enable, bytes_of(VringState{1, 0}), {}, true);
  EXPECT_EQ(fe->recv_u64(Request::set_vring_enable), 0u);
  ASSERT_TRUE(wait_for(Driver::Event::device_removed));
  ASSERT_TRUE(wait_for(Driver::Event::memory_removed));
  fe->send(Request::set_vring_enable, bytes_of(VringState{1, 1}), {}, true);
  EXPECT_EQ(fe->recv_u64(Request::set_vring_enable), 0u);
  ASSERT_TRUE(wait_for(ackq ? Driver::Event::device_added : Driver::Event::device_ready));
  for (std::uint32_t i = 0; i < 2; ++i) {
    auto* q = drv->remote_queue(i);
    ASSERT_NE(q, nullptr);
    auto again = q->pop();
    ASSERT_TRUE(again.ok()) << again.error().message();
    EXPECT_FALSE(again->has_value()) << "ring " << i
                                     << ": a chain the front-end already got back was taken again";
  }
  exchange_packets();
}

// QEMU sends a new memory table while the rings run (memory hotplug). The
// driver must see the new table: a buffer in memory the front-end added
// must be reachable through the BAR, not break the ring.
TEST_P(VhostPciChain, ANewMemoryTableWhileServedIsAnnouncedAgain) {
  start_frontend();
  ASSERT_TRUE(wait_for(ackq ? Driver::Event::device_added : Driver::Event::device_ready));
  exchange_packets();
  constexpr std::uint64_t kGpa2 = kGpa + 0x10000000, kUva2 = kUva + 0x10000000;
  Memfd ram2{kRam};
  fe->send(Request::set_mem_table,
           vhost_user::mem_table(
               {vhost_user::region(kGpa, kRam, kUva, 0), vhost_user::region(kGpa2, kRam, kUva2, 0)}),
           {ram.fd, ram2.fd}, true);
  EXPECT_EQ(fe->recv_u64(Request::set_mem_table), 0u);
  ASSERT_TRUE(wait_for(Driver::Event::device_removed));
  ASSERT_TRUE(wait_for(ackq ? Driver::Event::device_added : Driver::Event::device_ready));
  ASSERT_EQ(drv->memory().regions().size(), 2u);
  // The front-end transmits from its new memory.
  std::memcpy(ram2.map + 0x100, "new!", 4);
  const rings::Buffer tx[] = {{kGpa2 + 0x100, 4}};
  ASSERT_TRUE(rings[1]->add(tx, {}, 3).ok());
  rings[1]->publish();
  auto* q = drv->remote_queue(1);
  ASSERT_NE(q, nullptr);
  auto got = q->pop();
  ASSERT_TRUE(got.ok()) << got.error().message();
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ(std::memcmp((*got)->readable[0].data(), "new!", 4), 0);
  ASSERT_TRUE(q->push((*got)->head, 0).ok());
}

TEST_P(VhostPciChain, FeatureSubsetMakesTheFrontendRenegotiate) {
  // Reconfigure: the driver refuses EVENT_IDX.
  drv.reset();
  DriverOptions d;
  d.accept_remote_features = ~(1ull << feature::kEventIdx);
  auto r = Driver::open(model->function(), d);
  ASSERT_TRUE(r.ok()) << r.error().message();
  drv = std::move(*r);
  const std::uint64_t first = start_frontend();
  EXPECT_TRUE(first & (1ull << feature::kEventIdx));
  ASSERT_TRUE(wait_for(Driver::Event::features));
  EXPECT_FALSE(drv->remote_has(feature::kEventIdx));
  // The device model ends the session; the next front-end is offered the subset.
  ASSERT_TRUE(wait_for(Driver::Event::memory_removed));
  fe.reset();
  std::memset(ram.map, 0, 0x8000);
  const std::uint64_t second = start_frontend();
  EXPECT_FALSE(second & (1ull << feature::kEventIdx));
  ASSERT_TRUE(wait_for(ackq ? Driver::Event::device_added : Driver::Event::device_ready));
  exchange_packets();
}

// VHOST_USER_F_PROTOCOL_FEATURES (bit 30) is a vhost-user transport bit the
// front-end acks, not a feature of its virtio device. A driver that accepts
// only the device bits it knows drops it; had FEATURE_BITS carried it, the
// model would end the session to narrow features it cannot narrow (the bit
// is always offered), and the front-end would come back to the same, forever.
TEST_P(VhostPciChain, FeatureBitsCarryOnlyTheRemoteDevicesBits) {
  drv.reset();
  DriverOptions d;
  d.accept_remote_features = ~(1ull << vhost_user::kProtocolFeaturesBit);
  auto r = Driver::open(model->function(), d);
  ASSERT_TRUE(r.ok()) << r.error().message();
  drv = std::move(*r);
  start_frontend();
  ASSERT_TRUE(wait_for(ackq ? Driver::Event::device_added : Driver::Event::device_ready));
  EXPECT_EQ(model->stats().refusals, 0u) << "the front-end's session was ended";
  EXPECT_FALSE(logged("must reconnect"));
  exchange_packets();
}

// A hostile driver acks FEATURE_BITS with bits beyond the offer. Ending the
// front-end's session would narrow nothing (offered & ~value is 0): the
// front-end would come back with the same features and the same ack would
// end it again, forever. It is a driver protocol violation: the driver is
// set DEVICE_NEEDS_RESET, named in the log, and the front-end keeps its session.
TEST_P(VhostPciChain, FeatureBitsAckBeyondTheOfferFailsTheDriverNotTheFrontend) {
  if (ackq)
    GTEST_SKIP() << "writes its hostile ack to the device config, which the model ignores once the ack queue "
                    "(ACKQ) is negotiated";
  auto fn = model->function();
  auto bar = fn->bar(SoftVirtioDevice::kBar);
  ASSERT_TRUE(bar.ok());
  pci::BarIo* cfg = *bar;
  {
    std::lock_guard lock(log_mu);
    on_feature_bits = [cfg](std::uint64_t offered) {
      // Before the driver sees the offer: the ack the model takes first.
      const std::uint64_t at = SoftVirtioDevice::kDevice;
      ASSERT_TRUE(cfg->write(at + 0, 4, kFeatureBitsAck).ok());
      ASSERT_TRUE(cfg->write(at + 4, 4, kDeviceNet).ok());
      ASSERT_TRUE(cfg->write(at + 8, 8, 0).ok());
      ASSERT_TRUE(cfg->write(at + 16, 8, offered | (1ull << 63)).ok());
    };
  }
  start_frontend();
  ASSERT_TRUE(wait_for(Driver::Event::memory_added));  // its ack makes the model offer FEATURE_BITS
  EXPECT_TRUE(needs_reset_within(3s));
  EXPECT_TRUE(logged("0000:00:10.0: FEATURE_BITS ack")) << "no log line names the device";
  EXPECT_TRUE(logged("not offered"));
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(model->stats().refusals, 0u) << "the front-end's session was ended";
  EXPECT_EQ(model->stats().driver_errors, 1u);
  EXPECT_FALSE(drv->remote_ready());
}

// A hostile driver writes the config ack's last byte far faster than the
// model reads the acks (here: while the model's thread is busy): the pending
// acks are bounded, and the flood fails the driver with a clear error.
TEST_P(VhostPciChain, AConfigAckFloodIsBoundedAndFailsTheDriver) {
  auto fn = model->function();
  auto bar = fn->bar(SoftVirtioDevice::kBar);
  ASSERT_TRUE(bar.ok());
  pci::BarIo* cfg = *bar;
  {
    std::lock_guard lock(log_mu);
    on_feature_bits = [cfg](std::uint64_t) {
      for (int i = 0; i < 10000; ++i) ASSERT_TRUE(cfg->write(SoftVirtioDevice::kDevice + 23, 1, 0).ok());
    };
  }
  start_frontend();
  ASSERT_TRUE(wait_for(Driver::Event::memory_added));  // its ack makes the model offer FEATURE_BITS
  EXPECT_TRUE(needs_reset_within(3s));
  EXPECT_TRUE(logged("0000:00:10.0: the driver wrote more than 64 config acks"));
  EXPECT_EQ(model->stats().driver_errors, 1u);
}

INSTANTIATE_TEST_SUITE_P(AckModes, VhostPciChain, ::testing::Values(false, true),
                         [](const auto& p) { return p.param ? "Ackq" : "SpecConfigAcks"; });

}  // namespace
}  // namespace uvirtio::driver::vhost_pci
