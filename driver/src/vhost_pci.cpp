// vhost-pci protocol parser, remote memory table and driver: see vhost_pci.hpp.
#include "uvirtio/driver/vhost_pci.hpp"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "uvirtio/base/deadline.hpp"
#include "uvirtio/base/hex.hpp"
#include "uvirtio/driver/virtio_pci.hpp"

namespace uvirtio::driver::vhost_pci {
namespace {

template <class T>
T load(std::span<const std::uint8_t> bytes, std::size_t at) {
  T v;
  std::memcpy(&v, bytes.data() + at, sizeof v);
  return v;
}

// Clears an eventfd without blocking when it is not signalled.
void drain_fd(int fd) {
  if (fd < 0) return;
  pollfd p{fd, POLLIN, 0};
  std::uint64_t n = 0;
  if (::poll(&p, 1, 0) == 1 && (p.revents & POLLIN)) (void)!::read(fd, &n, sizeof n);
}

bool pow2(std::uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// End of [addr, addr + len) without overflow, or nullopt.
std::optional<std::uint64_t> end_of(std::uint64_t addr, std::uint64_t len) {
  if (len > ~std::uint64_t{0} - addr) return std::nullopt;
  return addr + len;
}

constexpr std::uint64_t kPage = 4096;
constexpr std::size_t kControlBuffers = 4;
constexpr std::size_t kControlBufferBytes = 1024;
constexpr std::size_t kAckBuffers = 8;
// Messages one wait_control() handles at most: a device that fills every
// buffer as soon as it is posted again must not hold the caller (and the
// timeout it gave) forever; the rest stays signalled on control_fd().
constexpr std::size_t kMaxMessagesPerWait = 64;
static_assert(kMaxMessage <= kControlBufferBytes);

}  // namespace

const char* message_name(std::uint16_t type) {
  switch (type) {
    case kMemoryInfo:
      return "MEMORY_INFO";
    case kDeviceInfo:
      return "DEVICE_INFO";
    case kFeatureBits:
      return "FEATURE_BITS";
    case kUpdateDone:
      return "UPDATE_DONE";
    default:
      return "unknown message";
  }
}

Result<Message> parse_message(std::span<const std::uint8_t> bytes, bool ackq, const std::string& device) {
  const char* op = "parse controlq message";
  auto bad = [&](std::string cause) { return Error(Errc::bad_device_data, device, op, std::move(cause)); };
  const std::size_t hdr = sizeof(ControlqHeader) + (ackq ? 8 : 0);
  if (bytes.size() < hdr)
    return bad(std::to_string(bytes.size()) + " bytes, shorter than the " + std::to_string(hdr) +
               "-byte header");
  const auto h = load<ControlqHeader>(bytes, 0);
  Message m;
  m.type = h.msg_type.get();
  m.version = h.msg_version.get();
  const std::string what = std::string(message_name(m.type)) + " (type " + std::to_string(m.type) + ")";
  const std::uint16_t want_version = ackq ? kVersionAckq : kVersionSpec;
  if (m.version != want_version)
    return bad(what + " has version " + std::to_string(m.version) + ", expected " +
               std::to_string(want_version));
  if (ackq) m.request_id = load<le64>(bytes, sizeof(ControlqHeader)).get();
  const auto payload = bytes.subspan(hdr);
  if (h.msg_len.get() != payload.size())
    return bad(what + " says msg_len " + std::to_string(h.msg_len.get()) + " but carries " +
               std::to_string(payload.size()) + " payload bytes");
  auto need = [&](std::size_t n) -> Result<void> {
    if (payload.size() < n)
      return bad(what + " payload of " + std::to_string(payload.size()) + " bytes, needs " +
                 std::to_string(n));
    return ok();
  };
  switch (m.type) {
    case kMemoryInfo: {
      UV_TRY_VOID(need(sizeof(MemoryInfoHeader)));
      const auto mh = load<MemoryInfoHeader>(payload, 0);
      m.ops = mh.ops.get();
      if (m.ops != kOpAdd && m.ops != kOpDel) return bad(what + " with unknown ops " + std::to_string(m.ops));
      if (mh.padding.get() != 0) return bad(what + " with nonzero padding");
      const std::uint32_t n = mh.nregion.get();
      if (n == 0 || n > kMaxRegions) return bad(what + " with " + std::to_string(n) + " regions (1 to 8)");
      if (payload.size() != sizeof(MemoryInfoHeader) + std::size_t{n} * sizeof(MemoryRegion))
        return bad(what + " with " + std::to_string(n) + " regions in " + std::to_string(payload.size()) +
                   " payload bytes");
      for (std::uint32_t i = 0; i < n; ++i) {
        const auto r = load<MemoryRegion>(payload, sizeof(MemoryInfoHeader) + i * sizeof(MemoryRegion));
        Region g{r.region_base_xgpa.get(), r.size.get(), r.offset_in_bar_area.get()};
        const std::string reg = what + " region " + std::to_string(i);
        if (g.size == 0) return bad(reg + " has size 0");
        if (!end_of(g.gpa, g.size) || !end_of(g.bar_offset, g.size))
          return bad(reg + " (" + hex(g.gpa) + " + " + hex(g.size) + " at BAR offset " + hex(g.bar_offset) +
                     ") overflows");
        m.regions.push_back(g);
      }
      return m;
    }
    case kDeviceInfo: {
      UV_TRY_VOID(need(sizeof(DeviceInfoHeader)));
      const auto dh = load<DeviceInfoHeader>(payload, 0);
      m.ops = dh.ops.get();
      if (m.ops != kOpAdd && m.ops != kOpDel) return bad(what + " with unknown ops " + std::to_string(m.ops));
      if (dh.padding.get() != 0 || dh.padding2.get() != 0) return bad(what + " with nonzero padding");
      m.device_type = dh.device_type.get();
      m.device_id = dh.device_id.get();
      const std::uint32_t n = dh.nvirtq.get();
      if (m.ops == kOpAdd ? (n == 0 || n > kMaxRemoteVirtqs) : n != 0)
        return bad(what + (m.ops == kOpAdd ? " ADD" : " DEL") + " with " + std::to_string(n) + " virtqueues");
      if (payload.size() != sizeof(DeviceInfoHeader) + std::size_t{n} * sizeof(RemoteVirtq))
        return bad(what + " with " + std::to_string(n) + " virtqueues in " + std::to_string(payload.size()) +
                   " payload bytes");
      for (std::uint32_t i = 0; i < n; ++i) {
        const auto v = load<RemoteVirtq>(payload, sizeof(DeviceInfoHeader) + i * sizeof(RemoteVirtq));
        Virtq q{v.index.get(),       v.num.get(),          v.desc.get(),
                v.avail.get(),       v.used.get(),         v.last_avail_idx.get(),
                v.kick_vector.get(), v.call_doorbell.get()};
        const std::string vq = what + " virtqueue " + std::to_string(q.index);
        if (v.flags.get() != 0) return bad(vq + " with unknown flags " + hex(v.flags.get()));
        if (!pow2(q.num) || q.num > 32768)
          return bad(vq + " size " + std::to_string(q.num) + " is not a power of two <= 32768");
        if (q.desc % 16 != 0 || q.avail % 2 != 0 || q.used % 4 != 0)
          return bad(vq + " ring addresses misaligned (desc " + hex(q.desc) + ", avail " + hex(q.avail) +
                     ", used " + hex(q.used) + ")");
        if (!end_of(q.desc, rings::SplitLayout::desc_bytes(static_cast<std::uint16_t>(q.num))) ||
            !end_of(q.avail, rings::SplitLayout::avail_bytes(static_cast<std::uint16_t>(q.num))) ||
            !end_of(q.used, rings::SplitLayout::used_bytes(static_cast<std::uint16_t>(q.num))))
          return bad(vq + " ring areas overflow the address space");
        for (const auto& o : m.virtqs)
          if (o.index == q.index) return bad(vq + " listed twice");
        m.virtqs.push_back(q);
      }
      return m;
    }
    case kFeatureBits:
      if (ackq) {
        if (payload.size() != sizeof(FeatureBitsAckq))
          return bad(what + " payload of " + std::to_string(payload.size()) + " bytes, expected 24");
        const auto f = load<FeatureBitsAckq>(payload, 0);
        if (f.padding.get() != 0) return bad(what + " with nonzero padding");
        m.feature_bits = f.feature_bits.get();
        m.device_type = f.device_type.get();
        m.device_id = f.device_id.get();
      } else {
        if (payload.size() != 8)
          return bad(what + " payload of " + std::to_string(payload.size()) + " bytes, expected 8");
        m.feature_bits = load<le64>(payload, 0).get();
      }
      return m;
    case kUpdateDone: {
      if (ackq) return bad(what + " sent although VHOST_PCI_F_ACKQ was negotiated");
      if (payload.size() != sizeof(UpdateDone))
        return bad(what + " payload of " + std::to_string(payload.size()) + " bytes, expected 16");
      const auto u = load<UpdateDone>(payload, 0);
      if (u.padding.get() != 0) return bad(what + " with nonzero padding");
      m.device_type = u.device_type.get();
      m.device_id = u.device_id.get();
      return m;
    }
    default:
      return bad("unknown message type " + std::to_string(m.type));
  }
}

// ---- RemoteMemory ----------------------------------------------------------

Result<RemoteMemory> RemoteMemory::build(std::span<const Region> regions, std::uint64_t bar_size,
                                         const std::string& device) {
  const char* op = "add remote memory";
  RemoteMemory t;
  for (std::size_t i = 0; i < regions.size(); ++i) {
    const Region& r = regions[i];
    const std::string reg = "region " + std::to_string(i) + " (" + hex(r.gpa) + " + " + hex(r.size) +
                            " at BAR offset " + hex(r.bar_offset) + ")";
    const auto bar_end = end_of(r.bar_offset, r.size);
    if (r.size == 0 || !bar_end || !end_of(r.gpa, r.size) || *bar_end > bar_size)
      return Error(Errc::bad_device_data, device, op,
                   reg + " lies outside the " + hex(bar_size) + "-byte memory BAR");
    if (r.bar_offset % kPage != 0)
      return Error(Errc::bad_device_data, device, op, reg + " is not page aligned in the BAR");
    for (std::size_t j = 0; j < i; ++j) {
      const Region& o = regions[j];
      if (r.bar_offset < o.bar_offset + o.size && o.bar_offset < r.bar_offset + r.size)
        return Error(Errc::bad_device_data, device, op,
                     reg + " overlaps region " + std::to_string(j) + " in the BAR");
      if (r.gpa < o.gpa + o.size && o.gpa < r.gpa + r.size)
        return Error(Errc::bad_device_data, device, op,
                     reg + " overlaps region " + std::to_string(j) + " in remote addresses");
    }
    t.regions_.push_back(r);
  }
  std::sort(t.regions_.begin(), t.regions_.end(),
            [](const Region& a, const Region& b) { return a.gpa < b.gpa; });
  return t;
}

std::optional<std::span<std::uint8_t>> RemoteMemory::translate(std::uint8_t* bar, std::uint64_t gpa,
                                                               std::uint64_t len) const noexcept {
  for (const Region& r : regions_) {
    if (gpa < r.gpa) break;
    const std::uint64_t off = gpa - r.gpa;
    if (off >= r.size) continue;
    if (len > r.size - off) return std::nullopt;  // runs past the region (no spanning)
    return std::span<std::uint8_t>(bar + r.bar_offset + off, static_cast<std::size_t>(len));
  }
  return std::nullopt;
}

// ---- Driver ----------------------------------------------------------------

Error Driver::err(Errc code, const std::string& op, std::string cause) const {
  return Error(code, name_, op, std::move(cause));
}

Result<std::unique_ptr<Driver>> Driver::open(std::unique_ptr<pci::Function> fn, DriverOptions options) {
  std::unique_ptr<Driver> d(new Driver());
  d->name_ = fn->bdf();
  d->opts_ = options;
  OpenOptions oo = options.open;
  oo.extra_msix_vectors = kMaxRemoteVirtqs + (kFirstKickVector - 2);  // vector 2 is the ackq's own
  oo.ring_features = FeatureSet();  // control queues are tiny: plain split rings
  FeatureSet supported = FeatureSet::of({feature::kVersion1});
  if (options.use_ackq) supported = supported.with(kFeatureAckq);
  UV_TRY(d->dev_, bring_up(std::move(fn), options.virtio_id, FeaturePolicy{supported, FeatureSet()}, oo));
  auto& t = d->dev_->transport();
  d->ackq_ = t.features().has(kFeatureAckq);
  UV_TRY(std::uint16_t nq, t.num_queues());
  if (nq < (d->ackq_ ? 2 : 1))
    return d->err(Errc::bad_device_data, "open vhost-pci",
                  std::to_string(nq) + " virtqueues, too few for the controlq");
  UV_TRY(d->controlq_, Virtqueue::create(t, kControlq, 16, CompletionMode::interrupt));
  if (!t.using_msix())  // interrupts are set up with the first queue
    return d->err(Errc::unsupported, "open vhost-pci",
                  "the function has no MSI-X; remote kicks need vectors");
  if (d->ackq_) {
    UV_TRY(d->ackq_q_, Virtqueue::create(t, kAckq, 16, CompletionMode::interrupt));
  }
  // BARs: doorbells and the remote memory (mapped: the data path reads it directly).
  UV_TRY(d->doorbells_, d->dev_->function().bar(kDoorbellBar));
  UV_TRY(pci::BarIo * mem, d->dev_->function().bar(kMemoryBar));
  if (mem->mapping() == nullptr)
    return d->err(Errc::unsupported, "open vhost-pci", "the memory BAR cannot be mapped");
  d->bar_ = const_cast<std::uint8_t*>(mem->mapping());
  d->bar_size_ = mem->size();
  // No more buffers than the queues hold: the device chose their sizes (one
  // descriptor a buffer, the control queues have no indirect tables), and
  // ack() waits for a completion only once every ack buffer is in flight.
  const std::size_t ncontrol = std::min<std::size_t>(kControlBuffers, d->controlq_->size());
  const std::size_t nack = d->ackq_ ? std::min<std::size_t>(kAckBuffers, d->ackq_q_->size()) : 0;
  for (std::size_t i = 0; i < ncontrol; ++i) {
    UV_TRY(auto buf, t.dma().alloc(kControlBufferBytes, 64));
    d->control_bufs_.push_back(buf);
  }
  for (std::size_t i = 0; i < nack; ++i) {
    UV_TRY(auto buf, t.dma().alloc(sizeof(AckMessage), 64));
    d->ack_bufs_.push_back(buf);
    d->ack_busy_.push_back(false);
  }
  for (std::size_t i = 0; i < ncontrol; ++i) UV_TRY_VOID(d->post_control_buffer(i));
  UV_TRY_VOID(d->dev_->driver_ok());
  d->control_fd_ = t.queue_eventfd(kControlq).value_or(-1);
  return d;
}

Driver::~Driver() { drop_device(); }

Result<void> Driver::post_control_buffer(std::size_t slot) {
  const rings::Buffer in{control_bufs_[slot].iova, static_cast<std::uint32_t>(kControlBufferBytes)};
  UV_TRY(std::uint16_t head, controlq_->submit({}, std::span(&in, 1), slot));
  (void)head;
  return ok();
}

Result<void> Driver::ack(std::uint32_t type, std::uint32_t device_type, std::uint64_t device_id,
                         std::uint64_t value, std::uint64_t request_id) {
  auto& t = dev_->transport();
  if (!ackq_) {
    // The spec's config acks. The driver "MUST ensure that writing to the
    // vhost_pci_config fields to be atomic": MMIO cannot write 24 bytes at
    // once, so the ack value is written last and is the commit point the
    // device acts on.
    Config c{};
    c.ack_type.set(type);
    c.ack_device_type.set(device_type);
    c.ack_device_id.set(device_id);
    c.ack.set(value);
    const auto* raw = reinterpret_cast<const std::uint8_t*>(&c);
    UV_TRY_VOID(t.write_device_config(0, std::span(raw, 16)));
    return t.write_device_config(16, std::span(raw + 16, 8));
  }
  // ACKQ: up to kAckBuffers acks in flight; the device's completions are
  // reaped here, and only a full set of buffers makes us wait.
  auto reap = [&](std::optional<rings::Completion> c) -> Result<void> {
    if (c->token >= ack_busy_.size())
      return err(Errc::bad_device_data, "reap ackq",
                 "completion for unknown ack buffer " + std::to_string(c->token));
    ack_busy_[static_cast<std::size_t>(c->token)] = false;
    return ok();
  };
  for (;;) {
    UV_TRY(auto c, ackq_q_->poll());
    if (!c) break;
    UV_TRY_VOID(reap(c));
  }
  auto free_slot = std::find(ack_busy_.begin(), ack_busy_.end(), false);
  if (free_slot == ack_busy_.end()) {
    UV_TRY(auto c, ackq_q_->wait(std::chrono::milliseconds(2000)));
    UV_TRY_VOID(reap(c));
    free_slot = std::find(ack_busy_.begin(), ack_busy_.end(), false);
  }
  const auto slot = static_cast<std::size_t>(free_slot - ack_busy_.begin());
  AckMessage a{};
  a.request_id.set(request_id);
  a.ack_type.set(type);
  a.ack_device_type.set(device_type);
  a.ack_device_id.set(device_id);
  a.ack.set(value);
  std::memcpy(ack_bufs_[slot].va, &a, sizeof a);
  const rings::Buffer out{ack_bufs_[slot].iova, sizeof a};
  UV_TRY(std::uint16_t head, ackq_q_->submit(std::span(&out, 1), {}, slot));
  (void)head;
  ack_busy_[slot] = true;
  return ok();
}

Result<Driver::Event> Driver::handle_control() {
  UV_TRY(auto c, controlq_->poll());
  if (!c) {
    // Drain the interrupt eventfd so poll() on control_fd() sleeps again; a
    // message landing after this poll signals it anew.
    drain_fd(control_fd_);
    UV_TRY(auto again, controlq_->poll());
    if (!again) return Event::none;
    c = again;
  }
  const std::size_t slot = static_cast<std::size_t>(c->token);
  if (slot >= control_bufs_.size())
    return err(Errc::bad_device_data, "read controlq",
               "completion for unknown buffer " + std::to_string(slot));
  // Parsed from a private copy: the device can still write the DMA buffer,
  // and a field checked must be the field used. Read in place, the checks
  // and the uses are separate loads the compiler may even repeat; after one
  // copy and a compiler fence, nothing reads the buffer again. (The ring
  // has already held c->len to the buffer's size.)
  std::array<std::uint8_t, kControlBufferBytes> copy;
  const std::size_t len = std::min<std::size_t>(c->len, copy.size());
  std::memcpy(copy.data(), control_bufs_[slot].va, len);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  auto parsed = parse_message(std::span<const std::uint8_t>(copy.data(), len), ackq_, name_);
  Result<Event> ev = Event::refused;
  if (!parsed) {
    // Not even its type is trustworthy: nothing to ack; the buffer is reused.
    refusal_ = parsed.error();
  } else {
    ev = handle(*parsed);
  }
  std::memset(control_bufs_[slot].va, 0, kControlBufferBytes);
  UV_TRY_VOID(post_control_buffer(slot));
  return ev;
}

Result<std::vector<Driver::Event>> Driver::wait_control(std::chrono::milliseconds timeout) {
  std::vector<Event> events;
  const auto until = deadline_after(timeout);
  for (;;) {
    UV_TRY(Event e, handle_control());
    if (e != Event::none) {
      events.push_back(e);
      if (events.size() >= kMaxMessagesPerWait) return events;
      continue;
    }
    if (!events.empty()) return events;
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
    if (left.count() <= 0) return events;
    pollfd p{control_fd_, POLLIN, 0};
    (void)::poll(&p, 1, static_cast<int>(std::min<long long>(left.count(), 100)));
  }
}

Result<Driver::Event> Driver::handle(const Message& m) {
  const std::string op = std::string("handle ") + message_name(m.type);
  auto refuse = [&](std::uint32_t type, std::uint64_t value, std::string cause) -> Result<Event> {
    refusal_ = err(Errc::bad_device_data, op, std::move(cause));
    UV_TRY_VOID(ack(type, m.device_type, m.device_id, value, m.request_id));
    return Event::refused;
  };
  switch (m.type) {
    case kMemoryInfo: {
      if (m.ops == kOpDel) {
        if (!served_.empty())
          return refuse(kMemoryInfoAck, kDelFail, "MEMORY_INFO DEL while a remote device is served on it");
        mem_ = RemoteMemory();
        UV_TRY_VOID(ack(kMemoryInfoAck, 0, 0, kDelDone, m.request_id));
        return Event::memory_removed;
      }
      if (!served_.empty())
        return refuse(kMemoryInfoAck, kAddFail, "MEMORY_INFO ADD while a remote device is served");
      auto table = RemoteMemory::build(m.regions, bar_size_, name_);
      if (!table) return refuse(kMemoryInfoAck, kAddFail, table.error().message());
      mem_ = std::move(*table);
      UV_TRY_VOID(ack(kMemoryInfoAck, 0, 0, kAddDone, m.request_id));
      return Event::memory_added;
    }
    case kFeatureBits: {
      // The served rings and NetChannel's header length were set up with
      // the features in effect; new ones take a new device (DEL first). The
      // ack is the part of the offer that stays in effect.
      if (!served_.empty())
        return refuse(kFeatureBitsAck, m.feature_bits & remote_features_,
                      "FEATURE_BITS while a remote device is served");
      // Spec 4.5.2: never accept bits the remote did not offer; nor a ring
      // layout the driver does not serve (split rings only: spec 2.2.1).
      offered_remote_ = m.feature_bits;
      remote_features_ =
          m.feature_bits & opts_.accept_remote_features & ~(std::uint64_t{1} << feature::kRingPacked);
      UV_TRY_VOID(ack(kFeatureBitsAck, m.device_type, m.device_id, remote_features_, m.request_id));
      return Event::features;
    }
    case kDeviceInfo: {
      if (m.ops == kOpDel) {
        if (served_.empty() || m.device_type != dev_type_ || m.device_id != dev_id_)
          return refuse(kDeviceInfoAck, kDelFail, "DEVICE_INFO DEL for a device that is not served");
        drop_device();
        UV_TRY_VOID(ack(kDeviceInfoAck, m.device_type, m.device_id, kDelDone, m.request_id));
        return Event::device_removed;
      }
      if (!served_.empty())
        return refuse(kDeviceInfoAck, kAddFail, "DEVICE_INFO ADD while a device is served");
      if (auto r = add_device(m); !r) {
        drop_device();
        return refuse(kDeviceInfoAck, kAddFail, r.error().message());
      }
      UV_TRY_VOID(ack(kDeviceInfoAck, m.device_type, m.device_id, kAddDone, m.request_id));
      if (ackq_) ready_ = true;  // with ACKQ the DEVICE_INFO ack completes the update
      return Event::device_added;
    }
    case kUpdateDone:
      if (served_.empty() || m.device_type != dev_type_ || m.device_id != dev_id_) {
        refusal_ = err(Errc::bad_device_data, op, "UPDATE_DONE for a device that was not added");
        return Event::refused;  // the spec has no ack for UPDATE_DONE
      }
      ready_ = true;
      return Event::device_ready;
    default:
      return err(Errc::bad_device_data, op, "unexpected message");
  }
}

Result<void> Driver::add_device(const Message& m) {
  if (m.device_type != kDeviceNet)
    return err(Errc::unsupported, "add remote device",
               "device type " + std::to_string(m.device_type) + " (only net, 1, is served)");
  if (mem_.empty())
    return err(Errc::bad_device_data, "add remote device", "no MEMORY_INFO before DEVICE_INFO");
  dev_type_ = m.device_type;
  dev_id_ = m.device_id;
  auto& t = dev_->transport();
  const bool event_idx = remote_has(feature::kEventIdx);
  const bool indirect = remote_has(feature::kIndirectDesc);
  for (const Virtq& v : m.virtqs) {
    const std::string qn = "virtqueue " + std::to_string(v.index);
    if (v.index >= kMaxRemoteVirtqs)
      return err(Errc::unsupported, "add remote " + qn,
                 "index beyond the " + std::to_string(kMaxRemoteVirtqs) + " served");
    if (v.kick_vector < kFirstKickVector || !t.msix_eventfd(v.kick_vector))
      return err(Errc::bad_device_data, "add remote " + qn,
                 "kick vector " + std::to_string(v.kick_vector) + " is not a remote-kick vector");
    if ((std::uint64_t{v.call_doorbell} + 1) * kDoorbellStride > doorbells_->size())
      return err(Errc::bad_device_data, "add remote " + qn,
                 "call doorbell " + std::to_string(v.call_doorbell) + " outside the doorbell BAR");
    const auto n = static_cast<std::uint16_t>(v.num);
    auto desc = mem_.translate(bar_, v.desc, rings::SplitLayout::desc_bytes(n));
    auto avail = mem_.translate(bar_, v.avail, rings::SplitLayout::avail_bytes(n));
    auto used = mem_.translate(bar_, v.used, rings::SplitLayout::used_bytes(n));
    if (!desc || !avail || !used)
      return err(Errc::bad_device_data, "add remote " + qn,
                 "ring areas (desc " + hex(v.desc) + ", avail " + hex(v.avail) + ", used " + hex(v.used) +
                     ") outside the remote memory");
    // Every buffer address goes through the region table, nothing else; the
    // table cannot change while a ring is served (MEMORY_INFO is refused).
    std::vector<rings::MemoryRegion> regions;
    for (const Region& r : mem_.regions()) regions.push_back({r.gpa, r.size, bar_ + r.bar_offset, true});
    UV_TRY(auto map, rings::MemoryMap::create(std::move(regions), name_ + " remote memory"));
    UV_TRY(auto ring,
           rings::SplitDeviceQueue::create(n, desc->data(), avail->data(), used->data(),
                                           name_ + " remote " + qn, std::move(map), v.last_avail_idx));
    ring.set_event_idx(event_idx);
    ring.set_indirect(indirect);
    Served s;
    s.vq = v;
    s.ring.emplace(std::move(ring));
    s.kick_fd = *t.msix_eventfd(v.kick_vector);
    served_.push_back(std::move(s));
  }
  for (auto& s : served_)
    if (s.vq.index < by_index_.size()) by_index_[s.vq.index] = &s;
  ++generation_;
  return ok();
}

void Driver::drop_device() noexcept {
  by_index_.fill(nullptr);
  served_.clear();
  ready_ = false;
  ++generation_;
}

rings::SplitDeviceQueue* Driver::remote_queue(std::uint32_t index) noexcept {
  if (!ready_ || index >= by_index_.size() || by_index_[index] == nullptr) return nullptr;
  return &*by_index_[index]->ring;
}

int Driver::kick_fd(std::uint32_t index) const noexcept {
  if (!ready_ || index >= by_index_.size() || by_index_[index] == nullptr) return -1;
  return by_index_[index]->kick_fd;
}

void Driver::drain_kick(std::uint32_t index) noexcept { drain_fd(kick_fd(index)); }

Result<void> Driver::call_remote(std::uint32_t index) {
  for (const auto& s : served_)
    if (s.vq.index == index && ready_)
      return doorbells_->write(std::uint64_t{s.vq.call_doorbell} * kDoorbellStride, 4, 1);
  return err(Errc::invalid_argument, "call remote virtqueue " + std::to_string(index),
             "the queue is not served");
}

// ---- NetChannel -------------------------------------------------------------

namespace {
constexpr std::uint32_t kRemoteRx = 0, kRemoteTx = 1;
constexpr unsigned kNetMrgRxbuf = 15;  // VIRTIO_NET_F_MRG_RXBUF

}  // namespace

std::size_t NetChannel::hdr_len() const noexcept {
  // virtio spec 1.2, 5.1.6: 12 bytes with VERSION_1 or MRG_RXBUF, else 10.
  return drv_.remote_has(feature::kVersion1) || drv_.remote_has(kNetMrgRxbuf) ? 12 : 10;
}

Result<rings::SplitDeviceQueue*> NetChannel::queue(std::uint32_t index, const char* op) {
  rings::SplitDeviceQueue* q = drv_.remote_queue(index);
  if (q == nullptr) return Error(Errc::peer_gone, drv_.name(), op, "no remote virtio-net is served");
  return q;
}

Result<void> NetChannel::check_generation(const char* op) {
  if ((!reserved_ && !peeked_) || drv_.device_generation() == generation_) return ok();
  // The device the frame came from was withdrawn: its chain and spans point
  // into memory that may be the next device's now, and its queue is gone.
  // Writing the header or pushing the head would corrupt the new remote.
  const char* what = reserved_ && peeked_ ? "a reserved and a peeked frame"
                     : reserved_          ? "a reserved frame"
                                          : "a peeked frame";
  reserved_ = peeked_ = tx_bounced_ = false;
  return Error(Errc::peer_gone, drv_.name(), op,
               std::string("the remote virtio-net was withdrawn holding ") + what + " (device generation " +
                   std::to_string(generation_) + ", now " + std::to_string(drv_.device_generation()) +
                   "); dropped without writing remote memory");
}

Result<void> NetChannel::interrupt(std::uint32_t index) {
  rings::SplitDeviceQueue* q = drv_.remote_queue(index);
  if (q == nullptr) return ok();
  q->publish_used();
  if (q->should_interrupt()) return drv_.call_remote(index);
  return ok();
}

Result<std::optional<std::span<std::byte>>> NetChannel::try_reserve(std::size_t len) {
  const char* op = "reserve a frame";
  UV_TRY_VOID(check_generation(op));
  UV_TRY(auto* q, queue(kRemoteRx, op));
  if (len > kMaxFrame)
    return Error(Errc::invalid_argument, drv_.name(), op, std::to_string(len) + "-byte frame (limit 65549)");
  const std::size_t hl = hdr_len();
  if (!reserved_) {
    UV_TRY(const bool got, q->pop_into(tx_req_));
    if (!got) return std::optional<std::span<std::byte>>{};
    reserved_ = true;
    generation_ = drv_.device_generation();
  }
  if (tx_req_.writable_bytes < hl + len) {
    // The remote posted a buffer too small for this frame: give it back empty.
    reserved_ = false;
    ++dropped_;
    UV_TRY_VOID(q->push(tx_req_.head, 0));
    return Error(Errc::invalid_argument, drv_.name(), op,
                 std::to_string(len) + "-byte frame does not fit the remote's " +
                     std::to_string(tx_req_.writable_bytes) + "-byte receive buffer");
  }
  tx_len_ = len;  // commit() takes at most this much (the bounce buffer's size)
  if (!tx_req_.writable.empty() && tx_req_.writable[0].size() >= hl + len) {
    tx_bounced_ = false;
    return std::optional<std::span<std::byte>>(
        std::in_place, reinterpret_cast<std::byte*>(tx_req_.writable[0].data()) + hl, len);
  }
  tx_bounced_ = true;
  tx_bounce_.resize(len);
  return std::optional<std::span<std::byte>>(std::in_place, tx_bounce_.data(), len);
}

Result<void> NetChannel::commit(std::size_t len, Flush flush) {
  const char* op = "commit a frame";
  UV_TRY_VOID(check_generation(op));
  if (!reserved_) return Error(Errc::invalid_argument, drv_.name(), op, "nothing reserved");
  UV_TRY(auto* q, queue(kRemoteRx, op));
  const std::size_t hl = hdr_len();
  if (len > tx_len_ || hl + len > tx_req_.writable_bytes)
    return Error(Errc::invalid_argument, drv_.name(), op,
                 std::to_string(len) + " bytes committed, " + std::to_string(tx_len_) + " reserved");
  // No offloads: flags 0, gso none; num_buffers 1 (5.1.6.4).
  std::array<std::byte, 12> hdr{};
  hdr[10] = std::byte{1};
  rings::scatter(tx_req_.writable, 0, std::span<const std::byte>(hdr).first(hl));
  if (tx_bounced_) rings::scatter(tx_req_.writable, hl, std::span<const std::byte>(tx_bounce_).first(len));
  reserved_ = false;
  UV_TRY_VOID(q->push_deferred(tx_req_.head, static_cast<std::uint32_t>(hl + len)));
  if (flush == Flush::now) return interrupt(kRemoteRx);
  return ok();
}

Result<void> NetChannel::flush_sent() {
  UV_TRY_VOID(check_generation("flush sent frames"));
  return interrupt(kRemoteRx);
}

Result<bool> NetChannel::try_send(std::span<const std::byte> frame) {
  UV_TRY(auto slot, try_reserve(frame.size()));
  if (!slot) return false;
  if (!frame.empty()) std::memcpy(slot->data(), frame.data(), frame.size());
  UV_TRY_VOID(commit(frame.size()));
  return true;
}

Result<void> NetChannel::wait_kick(std::uint32_t index, std::chrono::steady_clock::time_point until,
                                   const char* op) {
  const std::uint64_t generation = drv_.device_generation();
  UV_TRY(auto* q, queue(index, op));
  if (q->enable_notifications_and_check()) return ok();  // arrived while arming
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
    if (left.count() <= 0)
      return Error(Errc::timeout, drv_.name(), op, "no frame or buffer from the remote in time");
    // The controlq too: a remote that goes away is a DEVICE_INFO DEL.
    pollfd p[2] = {{drv_.kick_fd(index), POLLIN, 0}, {drv_.control_fd(), POLLIN, 0}};
    (void)::poll(p, 2, static_cast<int>(std::min<long long>(left.count(), 100)));
    if (p[1].revents & POLLIN) {
      UV_TRY(auto events, drv_.wait_control(std::chrono::milliseconds(0)));
      (void)events;
      // A DEL frees the served queues, q among them, and an ADD in the same
      // batch makes remote_ready() true again over new rings: the generation
      // tells, and q is not touched after a change.
      if (drv_.device_generation() != generation)
        return Error(Errc::peer_gone, drv_.name(), op,
                     drv_.remote_ready()
                         ? "the remote virtio-net was withdrawn and another added while waiting"
                         : "the remote virtio-net was withdrawn");
    }
    if (p[0].revents & POLLIN) {
      drv_.drain_kick(index);
      return ok();
    }
    if (q->has_avail()) return ok();
  }
}

Result<void> NetChannel::send(std::span<const std::byte> frame, std::chrono::nanoseconds timeout) {
  const auto until = deadline_after(timeout);
  for (;;) {
    UV_TRY(const bool sent, try_send(frame));
    if (sent) return ok();
    UV_TRY_VOID(wait_kick(kRemoteRx, until, "send a frame"));
  }
}

Result<std::optional<std::span<const std::byte>>> NetChannel::try_peek() {
  const char* op = "peek a frame";
  UV_TRY_VOID(check_generation(op));
  UV_TRY(auto* q, queue(kRemoteTx, op));
  const std::size_t hl = hdr_len();
  for (;;) {
    if (!peeked_) {
      UV_TRY(const bool got, q->pop_into(rx_req_));
      if (!got) return std::optional<std::span<const std::byte>>{};
      peeked_ = true;
      generation_ = drv_.device_generation();
    }
    if (rx_req_.readable_bytes >= hl + 14 && rx_req_.readable_bytes <= hl + kMaxFrame) break;
    // Not a frame (shorter than an Ethernet header, or too long): dropped.
    ++dropped_;
    peeked_ = false;
    UV_TRY_VOID(q->push_deferred(rx_req_.head, 0));
  }
  const std::size_t len = static_cast<std::size_t>(rx_req_.readable_bytes) - hl;
  if (!rx_req_.readable.empty() && rx_req_.readable[0].size() >= hl + len)
    return std::optional<std::span<const std::byte>>(
        std::in_place, reinterpret_cast<const std::byte*>(rx_req_.readable[0].data()) + hl, len);
  rx_bounce_.clear();
  for (auto s : rx_req_.readable) {
    const auto* b = reinterpret_cast<const std::byte*>(s.data());
    rx_bounce_.insert(rx_bounce_.end(), b, b + s.size());
  }
  return std::optional<std::span<const std::byte>>(std::in_place, rx_bounce_.data() + hl, len);
}

Result<void> NetChannel::release(Flush flush) {
  const char* op = "release a frame";
  UV_TRY_VOID(check_generation(op));
  if (!peeked_) return Error(Errc::invalid_argument, drv_.name(), op, "nothing peeked");
  UV_TRY(auto* q, queue(kRemoteTx, op));
  peeked_ = false;
  UV_TRY_VOID(q->push_deferred(rx_req_.head, 0));
  if (flush == Flush::now) return interrupt(kRemoteTx);
  return ok();
}

Result<void> NetChannel::flush_released() {
  UV_TRY_VOID(check_generation("flush released frames"));
  return interrupt(kRemoteTx);
}

Result<std::span<const std::byte>> NetChannel::peek(std::chrono::nanoseconds timeout) {
  const auto until = deadline_after(timeout);
  for (;;) {
    UV_TRY(auto m, try_peek());
    if (m) return *m;
    UV_TRY_VOID(flush_released());  // before sleeping, tell the remote what we consumed
    UV_TRY_VOID(wait_kick(kRemoteTx, until, "receive a frame"));
  }
}

Result<std::size_t> NetChannel::recv(std::span<std::byte> out, std::chrono::nanoseconds timeout) {
  UV_TRY(auto m, peek(timeout));
  if (m.size() > out.size())
    return Error(Errc::invalid_argument, drv_.name(), "receive a frame",
                 std::to_string(m.size()) + "-byte frame, " + std::to_string(out.size()) + "-byte buffer");
  std::memcpy(out.data(), m.data(), m.size());
  UV_TRY_VOID(release());
  return m.size();
}

}  // namespace uvirtio::driver::vhost_pci
