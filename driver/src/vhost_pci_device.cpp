// The vhost-pci device model: see vhost_pci_device.hpp.
#include "uvirtio/driver/vhost_pci_device.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <vector>

#include "uvirtio/base/deadline.hpp"
#include "uvirtio/base/hex.hpp"
#include "uvirtio/driver/features.hpp"
#include "uvirtio/driver/soft_virtio.hpp"
#include "uvirtio/driver/transport.hpp"
#include "uvirtio/driver/vhost_user.hpp"
#include "uvirtio/pci/os.hpp"
#include "uvirtio/pci/soft_function.hpp"

namespace uvirtio::driver::vhost_pci {
namespace {

namespace vu = vhost_user;

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kRegionAlign = 2ull << 20;  // BAR offsets of regions
constexpr std::uint32_t kNetQueues = 2;             // receiveq1, transmitq1
// Config acks recorded but not yet read by run(). One request is awaited at
// a time, so a driver that keeps more than this pending is flooding us.
constexpr std::size_t kMaxPendingConfigAcks = 64;

// BAR2: address space reserved once; regions are mapped into it with
// MAP_FIXED and replaced by anonymous zero pages when withdrawn, so every
// offset inside the BAR stays readable, as on a real BAR.
class MemoryBar final : public pci::BarIo {
 public:
  static Result<std::unique_ptr<MemoryBar>> create(std::uint64_t size, std::string name) {
    void* p =
        ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return Error::from_errno(errno, name, "reserve the memory BAR", "mmap " + hex(size));
    return std::unique_ptr<MemoryBar>(new MemoryBar(static_cast<std::uint8_t*>(p), size, std::move(name)));
  }
  ~MemoryBar() override { ::munmap(base_, size_); }
  std::uint64_t size() const override { return size_; }
  volatile std::uint8_t* mapping() const override { return base_; }
  Result<std::uint64_t> read(std::uint64_t off, unsigned width) override {
    UV_TRY_VOID(check("read memory BAR", off, width));
    std::uint64_t v = 0;
    std::memcpy(&v, base_ + off, width);
    return v;
  }
  Result<void> write(std::uint64_t off, unsigned width, std::uint64_t value) override {
    UV_TRY_VOID(check("write memory BAR", off, width));
    std::memcpy(base_ + off, &value, width);
    return ok();
  }
  Result<void> map(std::uint64_t off, std::uint64_t len, int fd, std::uint64_t file_off) {
    void* p = ::mmap(base_ + off, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_NORESERVE, fd,
                     static_cast<off_t>(file_off));
    if (p == MAP_FAILED)
      return Error::from_errno(errno, name_, "map remote memory into the BAR",
                               hex(len) + " bytes at " + hex(off));
    return ok();
  }
  // Replaces a region by zero pages. When that fails (ENOMEM: too many
  // mappings) the remote memory stays mapped; the caller must say so.
  Result<void> unmap(std::uint64_t off, std::uint64_t len) {
    if (::mmap(base_ + off, len, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0) == MAP_FAILED)
      return Error::from_errno(errno, name_, "withdraw remote memory from the BAR",
                               "mmap zero pages over " + hex(len) + " bytes at " + hex(off) +
                                   " (the old front-end's memory stays mapped there)");
    return ok();
  }

 private:
  MemoryBar(std::uint8_t* base, std::uint64_t size, std::string name)
      : base_(base), size_(size), name_(std::move(name)) {}
  Result<void> check(const char* op, std::uint64_t off, unsigned width) const {
    if ((width != 1 && width != 2 && width != 4 && width != 8) || off > size_ || width > size_ - off)
      return Error(Errc::invalid_argument, name_, op,
                   std::to_string(width) + " bytes at " + hex(off) + " outside the BAR");
    return ok();
  }
  std::uint8_t* base_;
  std::uint64_t size_;
  std::string name_;
};

template <class T>
void append(std::vector<std::uint8_t>& out, const T& v) {
  const std::size_t at = out.size();
  out.resize(at + sizeof v);
  std::memcpy(out.data() + at, &v, sizeof v);
}

}  // namespace

struct DeviceModel::Impl {
  enum class Phase { idle, mem, feat, dev, up, del_dev, del_mem };

  DeviceOptions opt;
  std::unique_ptr<SoftVirtioDevice> soft;
  MemoryBar* membar = nullptr;
  std::unique_ptr<vu::VhostUserBackend> be;
  pci::Fd wake;

  // Shared with the register hooks (driver thread).
  std::mutex mu;
  std::uint64_t resets = 0;
  bool driver_ok = false;
  std::deque<std::array<std::uint8_t, sizeof(Config)>> config_acks;  // at most kMaxPendingConfigAcks
  bool config_acks_overflowed = false;
  std::mutex call_mu;
  std::array<int, kMaxRemoteVirtqs> call_fds{};  // dup'd front-end call eventfds, -1: none
  mutable std::mutex stats_mu;
  Stats stats;

  // run() thread only.
  std::uint64_t seen_resets = 0;
  std::optional<rings::SplitDeviceQueue> ctrl, ackq;
  bool ackq_on = false;
  Phase phase = Phase::idle;
  struct Awaiting {
    std::uint32_t type;
    std::uint64_t request_id;
    std::chrono::steady_clock::time_point since;
    bool warned = false;
  };
  std::optional<Awaiting> awaiting;
  std::deque<std::vector<std::uint8_t>> outbox;
  std::uint64_t next_request = 1;
  struct Mapped {
    std::uint64_t bar_off, len;
  };
  std::vector<Mapped> mapped;
  std::vector<Region> regions;          // as announced
  std::uint64_t mapped_generation = 0;  // be->memory_generation() of what is mapped
  struct RingSig {
    std::uint32_t num = 0;
    std::uint64_t desc = 0, avail = 0, used = 0;
    int kick = -1, call = -1;
    std::uint16_t base = 0;  // where the driver resumes the ring
  };
  std::array<RingSig, kNetQueues> announced{};
  std::uint64_t offered_features = 0;  // to the driver in FEATURE_BITS
  // The driver broke the protocol: it is at DEVICE_NEEDS_RESET and nothing
  // is announced to it until it resets.
  bool driver_failed = false;

  void log(const std::string& line) const {
    if (opt.log) opt.log(line);
  }
  void signal_wake() {
    const std::uint64_t one = 1;
    (void)!::write(wake.get(), &one, sizeof one);
  }
  void bump(std::uint64_t Stats::*field) {
    std::lock_guard lock(stats_mu);
    ++(stats.*field);
  }

  // ---- hooks (driver thread) ----
  void install_hooks() {
    soft->set_status_hook([this](std::uint8_t s) {
      {
        std::lock_guard lock(mu);
        if (s == 0) {
          ++resets;
          driver_ok = false;
          config_acks.clear();
          config_acks_overflowed = false;
        } else if (s & status::kDriverOk) {
          driver_ok = true;
        }
      }
      signal_wake();
    });
    soft->set_notify_hook([this](std::uint16_t) { signal_wake(); });
    soft->set_config_write_hook([this](std::uint32_t off, unsigned width) {
      if (off + width != sizeof(Config)) return;  // the ack value's last byte commits the ack
      const auto cfg = soft->device_config();
      std::array<std::uint8_t, sizeof(Config)> snap{};
      std::copy_n(cfg.begin(), std::min(cfg.size(), snap.size()), snap.begin());
      {
        std::lock_guard lock(mu);
        if (config_acks.size() < kMaxPendingConfigAcks)
          config_acks.push_back(snap);
        else
          config_acks_overflowed = true;  // dropped; run() fails the driver
      }
      signal_wake();
    });
    pci::SoftBar& doorbells = soft->function().add_bar(kDoorbellBar, 4096);
    doorbells.hook(0, 4096, nullptr, [this](std::uint64_t off, unsigned, std::uint64_t) {
      const std::uint64_t i = off / kDoorbellStride;
      std::lock_guard lock(call_mu);
      if (i < call_fds.size() && call_fds[i] >= 0) {
        const std::uint64_t one = 1;
        (void)!::write(call_fds[i], &one, sizeof one);
      }
    });
  }

  // ---- the driver side of the function ----
  std::optional<std::span<std::uint8_t>> dma(std::uint64_t addr, std::uint64_t len) {
    return soft->function().soft_dma().span(addr, len);
  }

  Result<rings::SplitDeviceQueue> build_queue(std::uint16_t q, const char* what) {
    const auto st = soft->queue_state(q);
    if (!st.enabled || st.size == 0)
      return Error(Errc::bad_device_data, opt.bdf, std::string("start ") + what,
                   "the driver did not enable it");
    auto d = dma(st.desc, rings::SplitLayout::desc_bytes(st.size));
    auto a = dma(st.driver, rings::SplitLayout::avail_bytes(st.size));
    auto u = dma(st.device, rings::SplitLayout::used_bytes(st.size));
    if (!d || !a || !u)
      return Error(Errc::bad_device_data, opt.bdf, std::string("start ") + what, "ring outside DMA memory");
    return rings::SplitDeviceQueue::create(
        st.size, d->data(), a->data(), u->data(), opt.bdf + " " + what,
        [this](std::uint64_t addr, std::uint32_t len, bool) { return dma(addr, len); });
  }

  void driver_side(std::vector<std::array<std::uint8_t, sizeof(Config)>>& acks) {
    std::uint64_t r;
    bool ok_now, flooded;
    {
      std::lock_guard lock(mu);
      r = resets;
      ok_now = driver_ok;
      flooded = config_acks_overflowed;
      config_acks_overflowed = false;
      acks.assign(config_acks.begin(), config_acks.end());
      config_acks.clear();
    }
    if (r != seen_resets) {
      seen_resets = r;
      driver_failed = false;
      if (phase != Phase::idle) log("driver reset: remote device withdrawn without acks");
      ctrl.reset();
      ackq.reset();
      awaiting.reset();
      outbox.clear();
      withdraw_all();
      phase = Phase::idle;
    }
    if (flooded && !driver_failed) {
      acks.clear();
      return fail_driver("the driver wrote more than " + std::to_string(kMaxPendingConfigAcks) +
                         " config acks before they were read (one request is outstanding at a time)");
    }
    if (driver_failed) {
      acks.clear();
      return;
    }
    if (ok_now && !ctrl) {
      ackq_on = ((soft->driver_features() >> kFeatureAckq) & 1) != 0;
      auto c = build_queue(kControlq, "controlq");
      Result<rings::SplitDeviceQueue> a = Error(Errc::not_found, opt.bdf, "", "");
      if (c && ackq_on) a = build_queue(kAckq, "ackq");
      if (!c || (ackq_on && !a)) {
        log((c ? a.error() : c.error()).message());
        soft->set_needs_reset();
        return;
      }
      ctrl.emplace(std::move(*c));
      if (ackq_on) ackq.emplace(std::move(*a));
      log(std::string("driver ready (") + (ackq_on ? "VHOST_PCI_F_ACKQ" : "spec acks through device config") +
          ")");
    }
  }

  // ---- controlq output ----
  std::vector<std::uint8_t> header(std::uint16_t type, std::size_t payload, std::uint64_t* request_id) {
    std::vector<std::uint8_t> m;
    ControlqHeader h{};
    h.msg_type.set(type);
    h.msg_version.set(ackq_on ? kVersionAckq : kVersionSpec);
    h.msg_len.set(static_cast<std::uint32_t>(payload));
    append(m, h);
    const std::uint64_t id = next_request++;
    if (ackq_on) append(m, le64::of(id));
    if (request_id) *request_id = id;
    return m;
  }

  void send(std::vector<std::uint8_t> msg, std::uint32_t expect_ack, std::uint64_t request_id) {
    outbox.push_back(std::move(msg));
    awaiting = Awaiting{expect_ack, request_id, std::chrono::steady_clock::now()};
  }

  void send_memory_info(std::uint16_t ops) {
    std::uint64_t id = 0;
    auto m = header(kMemoryInfo, sizeof(MemoryInfoHeader) + regions.size() * sizeof(MemoryRegion), &id);
    MemoryInfoHeader mh{};
    mh.ops.set(ops);
    mh.nregion.set(static_cast<std::uint32_t>(regions.size()));
    append(m, mh);
    for (const Region& r : regions) {
      MemoryRegion w{};
      w.region_base_xgpa.set(r.gpa);
      w.size.set(r.size);
      w.offset_in_bar_area.set(r.bar_offset);
      append(m, w);
    }
    log(std::string("MEMORY_INFO ") + (ops == kOpAdd ? "ADD" : "DEL") + " " + std::to_string(regions.size()) +
        " regions");
    send(std::move(m), kMemoryInfoAck, id);
  }

  void send_feature_bits(std::uint64_t bits) {
    std::uint64_t id = 0;
    auto m = header(kFeatureBits, ackq_on ? sizeof(FeatureBitsAckq) : 8, &id);
    if (ackq_on) {
      FeatureBitsAckq f{};
      f.feature_bits.set(bits);
      f.device_type.set(kDeviceNet);
      f.device_id.set(opt.device_id);
      append(m, f);
    } else {
      append(m, le64::of(bits));
    }
    offered_features = bits;
    log("FEATURE_BITS " + hex(bits));
    send(std::move(m), kFeatureBitsAck, id);
  }

  void send_device_info(std::uint16_t ops) {
    std::uint64_t id = 0;
    const std::size_t n = ops == kOpAdd ? kNetQueues : 0;
    auto m = header(kDeviceInfo, sizeof(DeviceInfoHeader) + n * sizeof(RemoteVirtq), &id);
    DeviceInfoHeader dh{};
    dh.ops.set(ops);
    dh.nvirtq.set(static_cast<std::uint32_t>(n));
    dh.device_type.set(kDeviceNet);
    dh.device_id.set(opt.device_id);
    append(m, dh);
    for (std::uint32_t i = 0; i < n; ++i) {
      const RingSig& s = announced[i];
      RemoteVirtq v{};
      v.index.set(i);
      v.num.set(s.num);
      v.desc.set(s.desc);
      v.avail.set(s.avail);
      v.used.set(s.used);
      v.last_avail_idx.set(s.base);
      v.kick_vector.set(static_cast<std::uint16_t>(kFirstKickVector + i));
      v.call_doorbell.set(static_cast<std::uint16_t>(i));
      append(m, v);
    }
    log(std::string("DEVICE_INFO ") + (ops == kOpAdd ? "ADD" : "DEL") + " net " + hex(opt.device_id));
    send(std::move(m), kDeviceInfoAck, id);
  }

  void send_update_done() {
    auto m = header(kUpdateDone, sizeof(UpdateDone), nullptr);
    UpdateDone u{};
    u.device_type.set(kDeviceNet);
    u.device_id.set(opt.device_id);
    append(m, u);
    log("UPDATE_DONE");
    outbox.push_back(std::move(m));  // no ack in the spec
  }

  void deliver() {
    if (!ctrl || ctrl->broken()) return;
    bool pushed = false;
    while (!outbox.empty()) {
      auto p = ctrl->pop();
      if (!p) {
        log(p.error().message());
        soft->set_needs_reset();
        return;
      }
      if (!*p) break;  // no buffer posted: the driver's next notify wakes us
      const auto& msg = outbox.front();
      std::uint32_t written = 0;
      if ((*p)->writable_bytes >= msg.size()) {
        std::size_t at = 0;
        for (auto b : (*p)->writable) {
          const std::size_t n = std::min(b.size(), msg.size() - at);
          std::memcpy(b.data(), msg.data() + at, n);
          at += n;
          if (at == msg.size()) break;
        }
        written = static_cast<std::uint32_t>(msg.size());
        outbox.pop_front();
      } else {
        log("controlq buffer of " + std::to_string((*p)->writable_bytes) + " bytes too small for a " +
            std::to_string(msg.size()) + "-byte message: returned empty");
      }
      if (auto r = ctrl->push((*p)->head, written); !r) log(r.error().message());
      pushed = true;
    }
    if (pushed && ctrl->should_interrupt()) soft->interrupt_queue(kControlq);
  }

  // ---- acks ----
  void collect_acks(const std::vector<std::array<std::uint8_t, sizeof(Config)>>& config) {
    if (!ackq_on) {
      for (const auto& raw : config) {
        Config c;
        std::memcpy(&c, raw.data(), sizeof c);
        on_ack(c.ack_type.get(), c.ack_device_type.get(), c.ack_device_id.get(), c.ack.get(), 0);
      }
      return;
    }
    if (!ackq || ackq->broken()) return;
    bool pushed = false;
    for (;;) {
      auto p = ackq->pop();
      if (!p) {
        log(p.error().message());
        return;
      }
      if (!*p) break;
      const auto& req = **p;
      if (req.readable_bytes == sizeof(AckMessage) && req.writable_bytes == 0) {
        std::array<std::uint8_t, sizeof(AckMessage)> buf{};
        std::size_t at = 0;
        for (auto s : req.readable) {
          std::memcpy(buf.data() + at, s.data(), s.size());
          at += s.size();
        }
        AckMessage a;
        std::memcpy(&a, buf.data(), sizeof a);
        on_ack(a.ack_type.get(), a.ack_device_type.get(), a.ack_device_id.get(), a.ack.get(),
               a.request_id.get());
      } else {
        log("ackq message of " + std::to_string(req.readable_bytes) + " bytes ignored (an ack is 32)");
      }
      (void)ackq->push(req.head, 0);
      pushed = true;
    }
    if (pushed && ackq->should_interrupt()) soft->interrupt_queue(kAckq);
  }

  // Set while a ring is being stopped (GET_VRING_BASE): the remote device
  // must be withdrawn before the front-end hears the ring's base.
  bool stopping = false;

  // Withdraws the remote device from the driver and waits for its acks (up
  // to ack_timeout), running the protocol from here.
  void quiesce() {
    if (phase == Phase::idle) return;
    stopping = true;
    const auto until = deadline_after(opt.ack_timeout);
    while (phase != Phase::idle && std::chrono::steady_clock::now() < until) {
      pollfd p{wake.get(), POLLIN, 0};
      if (::poll(&p, 1, 10) == 1) {
        std::uint64_t v = 0;
        (void)!::read(wake.get(), &v, sizeof v);
      }
      step();
    }
    if (phase != Phase::idle)
      log("the driver did not release the remote device in time; stopping the ring anyway");
    stopping = false;
  }

  bool want_up() {
    if (stopping || driver_failed) return false;
    if (!be || !be->connected() || be->memory() == nullptr || !ctrl) return false;
    for (std::uint32_t i = 0; i < kNetQueues; ++i)
      if (!be->queue(i)) return false;
    return true;
  }

  // The front-end replaced its memory table since we mapped it (QEMU does
  // while the rings run, on memory hotplug): the announcement is stale.
  bool memory_replaced() const { return be->memory_generation() != mapped_generation; }

  std::optional<std::uint64_t> uva_to_gpa(std::uint64_t uva) const {
    const auto* mem = be->memory();
    for (std::size_t i = 0; i < mem->size(); ++i) {
      const auto& r = mem->region(i);
      if (uva >= r.userspace_addr && uva - r.userspace_addr < r.memory_size)
        return r.guest_phys_addr + (uva - r.userspace_addr);
    }
    return std::nullopt;
  }

  std::optional<std::array<RingSig, kNetQueues>> current_rings() const {
    std::array<RingSig, kNetQueues> sig{};
    for (std::uint32_t i = 0; i < kNetQueues; ++i) {
      auto info = be->ring_info(i);
      if (!info) return std::nullopt;
      auto d = uva_to_gpa(info->addr.desc_user_addr), a = uva_to_gpa(info->addr.avail_user_addr),
           u = uva_to_gpa(info->addr.used_user_addr);
      if (!d || !a || !u) return std::nullopt;
      // A ring withdrawn while it kept running (disabled and enabled again)
      // resumes where the driver left it, not at its SET_VRING_BASE.
      sig[i] = RingSig{info->num, *d, *a, *u, info->kick_fd, info->call_fd, info->last_avail};
    }
    return sig;
  }

  Result<void> map_memory() {
    const auto* mem = be->memory();
    regions.clear();
    mapped_generation = be->memory_generation();
    std::uint64_t at = 0;
    for (std::size_t i = 0; i < mem->size(); ++i) {
      const auto& r = mem->region(i);
      if (r.mmap_offset % kPage != 0)
        return Error(
            Errc::unsupported, opt.bdf, "map front-end memory",
            "region " + std::to_string(i) + " has mmap_offset " + hex(r.mmap_offset) + ", not page aligned");
      const std::uint64_t len = (r.memory_size + kPage - 1) / kPage * kPage;
      if (len > membar->size() || at > membar->size() - len)
        return Error(Errc::unsupported, opt.bdf, "map front-end memory",
                     "the front-end's memory does not fit the " + hex(membar->size()) + "-byte BAR");
      UV_TRY_VOID(membar->map(at, len, mem->fd(i), r.mmap_offset));
      mapped.push_back(Mapped{at, len});
      regions.push_back(Region{r.guest_phys_addr, r.memory_size, at});
      at = (at + len + kRegionAlign - 1) / kRegionAlign * kRegionAlign;
    }
    return ok();
  }

  void unmap_memory() {
    for (const auto& m : mapped)
      if (auto r = membar->unmap(m.bar_off, m.len); !r) {
        // The driver could still read a withdrawn front-end's memory: stop it.
        log(r.error().message());
        soft->set_needs_reset();
      }
    mapped.clear();
    regions.clear();
  }

  void set_call_fds(bool on) {
    std::lock_guard lock(call_mu);
    for (std::uint32_t i = 0; i < call_fds.size(); ++i) {
      if (call_fds[i] >= 0) ::close(call_fds[i]);
      call_fds[i] = -1;
      if (on && i < kNetQueues && announced[i].call >= 0)
        call_fds[i] = ::fcntl(announced[i].call, F_DUPFD_CLOEXEC, 0);
    }
  }

  Result<void> route_kicks() {
    for (std::uint32_t i = 0; i < kNetQueues; ++i)
      if (announced[i].kick >= 0)
        UV_TRY_VOID(soft->function().route_vector(kFirstKickVector + i, announced[i].kick));
    return ok();
  }

  void withdraw_all() {
    for (std::uint32_t i = 0; i < kNetQueues; ++i)
      (void)soft->function().unroute_vector(kFirstKickVector + i);
    announced = {};
    set_call_fds(false);
    unmap_memory();
  }

  // Set when a session must end while the back-end is inside
  // handle_message() (quiesce() runs from its GET_VRING_BASE hook): run()
  // disconnects once that call has returned.
  bool disconnect_pending = false;

  void end_frontend(const std::string& why) {
    log("ending the front-end's session: " + why);
    bump(&Stats::refusals);
    if (stopping) {
      disconnect_pending = true;
      return;
    }
    if (be) be->disconnect();
  }

  // The driver broke the protocol: DEVICE_NEEDS_RESET, and the remote device
  // and its memory are withdrawn from it until it resets. The front-end's
  // session stays: it did nothing wrong, and ending it would only make it
  // come back to the same driver.
  void fail_driver(const std::string& why) {
    log(opt.bdf + ": " + why + "; device needs reset, nothing is announced until the driver resets");
    bump(&Stats::driver_errors);
    driver_failed = true;
    soft->set_needs_reset();
    awaiting.reset();
    outbox.clear();
    withdraw_all();
    phase = Phase::idle;
  }

  void on_ack(std::uint32_t type, std::uint32_t dtype, std::uint64_t did, std::uint64_t value,
              std::uint64_t id) {
    if (!awaiting || awaiting->type != type || (ackq_on && awaiting->request_id != id)) {
      log("unexpected ack (type " + std::to_string(type) + ", request " + std::to_string(id) + ") ignored");
      return;
    }
    (void)dtype;
    (void)did;
    awaiting.reset();
    switch (phase) {
      case Phase::mem:
        if (value != kAddDone) {
          end_frontend("the driver refused MEMORY_INFO ADD (ack " + std::to_string(value) + ")");
          unmap_memory();
          phase = Phase::idle;
          return;
        }
        if (!want_up() || memory_replaced()) return teardown_memory();
        phase = Phase::feat;
        // The remote device's features: VHOST_USER_F_PROTOCOL_FEATURES is
        // vhost-user's own bit, always offered; a driver that dropped it would
        // make the front-end renegotiate the same features forever.
        return send_feature_bits(be->acked_features() & ~(1ull << vu::kProtocolFeaturesBit));
      case Phase::feat: {
        const std::uint64_t offered = offered_features;
        if ((value & ~offered) != 0)  // would narrow nothing: the front-end would renegotiate in a loop
          return fail_driver("FEATURE_BITS ack " + hex(value) + " accepts bits " + hex(value & ~offered) +
                             " that were not offered (" + hex(offered) + ")");
        if (value != offered) {
          // Spec 4.5: the front-end must renegotiate with the accepted bits.
          be->restrict_features(~(offered & ~value));
          end_frontend("the driver accepted features " + hex(value) + " of " + hex(offered) +
                       "; the front-end must reconnect and renegotiate");
          return teardown_memory();
        }
        if (!want_up() || memory_replaced()) return teardown_memory();
        auto sig = current_rings();
        if (!sig) {
          end_frontend("a ring address lies outside the front-end's memory table");
          return teardown_memory();
        }
        announced = *sig;
        if (auto r = route_kicks(); !r) {
          log(r.error().message());
          announced = {};
          return teardown_memory();
        }
        set_call_fds(true);
        phase = Phase::dev;
        return send_device_info(kOpAdd);
      }
      case Phase::dev:
        if (value != kAddDone) {
          end_frontend("the driver refused DEVICE_INFO ADD (ack " + std::to_string(value) + ")");
          withdraw_routes();
          return teardown_memory();
        }
        bump(&Stats::announced);
        phase = Phase::up;
        if (!ackq_on) send_update_done();
        return;
      case Phase::del_dev:
        if (value != kDelDone) log("the driver answered DEVICE_INFO DEL with " + std::to_string(value));
        bump(&Stats::withdrawn);
        withdraw_routes();
        return teardown_memory();
      case Phase::del_mem:
        if (value != kDelDone) log("the driver answered MEMORY_INFO DEL with " + std::to_string(value));
        unmap_memory();
        phase = Phase::idle;
        return;
      default:
        log("ack in phase without a request: ignored");
    }
  }

  void withdraw_routes() {
    for (std::uint32_t i = 0; i < kNetQueues; ++i)
      (void)soft->function().unroute_vector(kFirstKickVector + i);
    announced = {};
    set_call_fds(false);
  }

  void teardown_memory() {
    phase = Phase::del_mem;
    send_memory_info(kOpDel);
  }

  void advance() {
    if (awaiting) {
      if (!awaiting->warned && std::chrono::steady_clock::now() - awaiting->since > opt.ack_timeout) {
        awaiting->warned = true;
        log("the driver has not acked for " + std::to_string(opt.ack_timeout.count()) +
            " ms (still waiting)");
      }
      return;
    }
    const bool up = want_up();
    switch (phase) {
      case Phase::idle:
        if (!up) return;
        if (auto r = map_memory(); !r) {
          unmap_memory();
          end_frontend(r.error().message());
          return;
        }
        phase = Phase::mem;
        return send_memory_info(kOpAdd);
      case Phase::up: {
        auto sig = up && !memory_replaced() ? current_rings() : std::nullopt;
        const bool same_layout =
            sig &&
            std::equal(sig->begin(), sig->end(), announced.begin(), [](const RingSig& a, const RingSig& b) {
              return a.num == b.num && a.desc == b.desc && a.avail == b.avail && a.used == b.used;
            });
        if (same_layout) {
          // New kick or call eventfds for the same rings: re-routed in place.
          if (!std::equal(
                  sig->begin(), sig->end(), announced.begin(),
                  [](const RingSig& a, const RingSig& b) { return a.kick == b.kick && a.call == b.call; })) {
            announced = *sig;
            if (auto r = route_kicks(); !r) log(r.error().message());
            set_call_fds(true);
          }
          return;
        }
        phase = Phase::del_dev;
        return send_device_info(kOpDel);
      }
      default:
        return;
    }
  }

  void step() {
    std::vector<std::array<std::uint8_t, sizeof(Config)>> acks;
    driver_side(acks);
    deliver();
    collect_acks(acks);
    advance();
    deliver();
  }
};

DeviceModel::DeviceModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

DeviceModel::~DeviceModel() {
  if (impl_) {
    impl_->withdraw_all();
    impl_->set_call_fds(false);
  }
}

Result<std::unique_ptr<DeviceModel>> DeviceModel::create(DeviceOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->opt = std::move(options);
  impl->call_fds.fill(-1);
  SoftVirtioOptions so;
  so.bdf = impl->opt.bdf;
  so.device_type = impl->opt.virtio_id;
  so.features = (1ull << feature::kVersion1) | (impl->opt.offer_ackq ? 1ull << kFeatureAckq : 0);
  so.num_queues = 2;
  so.queue_max_size = 64;
  so.msix_vectors = kFirstKickVector + kMaxRemoteVirtqs;
  so.device_config.assign(sizeof(Config), 0);
  impl->soft = std::make_unique<SoftVirtioDevice>(so);
  UV_TRY(auto bar,
         MemoryBar::create(impl->opt.memory_bar_size, impl->opt.bdf + " BAR" + std::to_string(kMemoryBar)));
  impl->membar = bar.get();
  impl->soft->function().set_bar(kMemoryBar, std::move(bar));
  const int w = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (w < 0) return Error::from_errno(errno, impl->opt.bdf, "create device model", "eventfd");
  impl->wake = pci::Fd(pci::Os::system(), w);
  impl->install_hooks();
  vu::BackendOptions bo;
  bo.name = impl->opt.bdf + " vhost-user";
  bo.features = impl->opt.net_features;
  bo.num_queues = kNetQueues;
  bo.on_ring_stop = [m = impl.get()](std::uint32_t) { m->quiesce(); };
  UV_TRY(impl->be, vu::VhostUserBackend::listen(impl->opt.socket, bo));
  return std::unique_ptr<DeviceModel>(new DeviceModel(std::move(impl)));
}

std::unique_ptr<pci::Function> DeviceModel::function() { return impl_->soft->take_function(); }

DeviceModel::Stats DeviceModel::stats() const {
  std::lock_guard lock(impl_->stats_mu);
  return impl_->stats;
}

Result<void> DeviceModel::run(int stop_fd) {
  Impl& m = *impl_;
  for (;;) {
    const bool connected = m.be->connected();
    pollfd p[3] = {{stop_fd, POLLIN, 0},
                   {m.wake.get(), POLLIN, 0},
                   {connected ? m.be->conn_fd() : m.be->listen_fd(), POLLIN, 0}};
    const int n = ::poll(p, 3, 100);
    if (n < 0 && errno != EINTR) return Error::from_errno(errno, m.opt.bdf, "run device model", "poll");
    if (p[0].revents) return ok();
    if (p[1].revents & POLLIN) {
      std::uint64_t v = 0;
      (void)!::read(m.wake.get(), &v, sizeof v);
    }
    if (p[2].revents) {
      if (!connected) {
        if (auto r = m.be->accept(); !r) {
          m.log(r.error().message());
        } else {
          m.bump(&Stats::sessions);
          m.log("front-end connected");
        }
      } else {
        auto ev = m.be->handle_message();
        if (!ev) {
          m.bump(&Stats::frontend_errors);
          m.log("front-end session ended: " + ev.error().message());
        } else if (*ev == vu::VhostUserBackend::Event::disconnected) {
          m.log("front-end disconnected");
        }
        if (m.disconnect_pending) {
          m.disconnect_pending = false;
          m.be->disconnect();
        }
      }
    }
    m.step();
  }
}

}  // namespace uvirtio::driver::vhost_pci
