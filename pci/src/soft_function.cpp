// SoftFunction, SoftBar and SoftDma: see soft_function.hpp.
#include "uvirtio/pci/soft_function.hpp"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "uvirtio/base/le.hpp"

namespace uvirtio::pci {

// ---------------------------------------------------------------- SoftDma

Result<pci::DmaRegion> SoftDma::alloc(std::size_t size, std::size_t align) {
  std::lock_guard lock(mu_);
  if (size == 0 || align == 0 || (align & (align - 1)) != 0 || align > 4096)
    return Error(Errc::invalid_argument, "fake-dma", "allocate DMA memory", "bad size or alignment");
  align = std::max<std::size_t>(align, alignof(std::max_align_t));
  if (size > SIZE_MAX - align)  // rounding up to the alignment would wrap
    return Error(Errc::invalid_argument, "fake-dma", "allocate DMA memory",
                 "size " + std::to_string(size) + " too large");
  const std::size_t rounded = (size + align - 1) / align * align;
  void* p = std::aligned_alloc(align, rounded);
  if (p == nullptr) return Error::from_errno(ENOMEM, "fake-dma", "allocate DMA memory");
  std::memset(p, 0, rounded);
  Block b;
  b.mem = {static_cast<std::uint8_t*>(p), &std::free};
  b.size = size;
  blocks_.push_back(std::move(b));
  return pci::DmaRegion{p, reinterpret_cast<std::uintptr_t>(p), size};
}

std::uint8_t* SoftDma::translate(std::uint64_t iova, std::uint64_t len) const {
  std::lock_guard lock(mu_);
  for (const Block& b : blocks_) {
    const auto base = reinterpret_cast<std::uintptr_t>(b.mem.get());
    if (iova >= base && iova - base <= b.size && len <= b.size - (iova - base))
      return b.mem.get() + (iova - base);
  }
  return nullptr;
}

std::optional<std::span<std::uint8_t>> SoftDma::span(std::uint64_t iova, std::uint64_t len) const {
  std::uint8_t* p = translate(iova, len);
  if (p == nullptr) return std::nullopt;
  return std::span<std::uint8_t>(p, static_cast<std::size_t>(len));
}

std::size_t SoftDma::allocations() const {
  std::lock_guard lock(mu_);
  return blocks_.size();
}

// ---------------------------------------------------------------- SoftBar

SoftBar::SoftBar(std::string device, std::uint64_t size) : device_(std::move(device)), mem_(size, 0) {}

Result<void> SoftBar::check(const char* op, std::uint64_t off, unsigned width) const {
  if (width != 1 && width != 2 && width != 4 && width != 8)
    return Error(Errc::invalid_argument, device_, op, "width " + std::to_string(width));
  if (off > mem_.size() || width > mem_.size() - off)
    return Error(Errc::invalid_argument, device_, op, "offset " + std::to_string(off) + " outside the BAR");
  return ok();
}

const SoftBar::Range* SoftBar::find(std::uint64_t off) const {
  for (const Range& r : ranges_)
    if (off >= r.begin && off - r.begin < r.length) return &r;
  return nullptr;
}

Result<std::uint64_t> SoftBar::read(std::uint64_t off, unsigned width) {
  UV_TRY_VOID(check("read BAR", off, width));
  if (const Range* r = find(off); r != nullptr && r->on_read) return r->on_read(off - r->begin, width);
  return peek(off, width);
}

Result<void> SoftBar::write(std::uint64_t off, unsigned width, std::uint64_t value) {
  UV_TRY_VOID(check("write BAR", off, width));
  {
    std::lock_guard lock(log_mu_);
    for (auto& f : failing_) {
      if (f.count == 0 || off < f.begin || off - f.begin >= f.length) continue;
      --f.count;
      return Error::from_errno(f.err, device_, "write BAR", "pwrite at offset " + std::to_string(off));
    }
    write_log_.push_back(off);
  }
  if (const Range* r = find(off); r != nullptr && r->on_write) {
    r->on_write(off - r->begin, width, value);
    return ok();
  }
  poke(off, width, value);
  return ok();
}

void SoftBar::fail_writes_in(std::uint64_t begin, std::uint64_t length, unsigned count, int err) {
  std::lock_guard lock(log_mu_);
  failing_.push_back(FailingRange{begin, length, count, err});
}

void SoftBar::hook(std::uint64_t begin, std::uint64_t length, ReadHook on_read, WriteHook on_write) {
  ranges_.push_back(Range{begin, length, std::move(on_read), std::move(on_write)});
}

std::uint64_t SoftBar::peek(std::uint64_t off, unsigned width) const {
  std::uint64_t v = 0;
  for (unsigned i = 0; i < width; ++i) v |= std::uint64_t{mem_[off + i]} << (8 * i);
  return v;
}

void SoftBar::poke(std::uint64_t off, unsigned width, std::uint64_t value) {
  for (unsigned i = 0; i < width; ++i) mem_[off + i] = static_cast<std::uint8_t>(value >> (8 * i));
}

std::size_t SoftBar::writes_in(std::uint64_t begin, std::uint64_t length) const {
  std::lock_guard lock(log_mu_);
  return static_cast<std::size_t>(std::count_if(write_log_.begin(), write_log_.end(),
                                                [&](std::uint64_t o) { return o - begin < length; }));
}

// ---------------------------------------------------------------- SoftFunction

SoftFunction::SoftFunction(std::string bdf) : bdf_(std::move(bdf)), config_(4096, 0) {}

SoftFunction::~SoftFunction() { (void)disable_irqs(); }

Result<void> SoftFunction::read_config(std::uint32_t off, std::span<std::uint8_t> out) {
  if (off > config_.size() || out.size() > config_.size() - off)
    return Error(Errc::invalid_argument, bdf_, "read config space", "offset beyond config space");
  std::memcpy(out.data(), config_.data() + off, out.size());
  return ok();
}

Result<void> SoftFunction::write_config(std::uint32_t off, std::span<const std::uint8_t> in) {
  if (off > config_.size() || in.size() > config_.size() - off)
    return Error(Errc::invalid_argument, bdf_, "write config space", "offset beyond config space");
  std::memcpy(config_.data() + off, in.data(), in.size());
  return ok();
}

Result<pci::BarIo*> SoftFunction::bar(unsigned index) {
  if (index >= 6 || !bars_[index])
    return Error(Errc::not_found, bdf_, "open BAR " + std::to_string(index), "BAR is absent");
  return bars_[index].get();
}

void SoftFunction::set_ids(std::uint16_t vendor, std::uint16_t device, std::uint16_t subsystem_id) {
  store_le16(&config_[0x00], vendor);
  store_le16(&config_[0x02], device);
  store_le16(&config_[0x2c], vendor);
  store_le16(&config_[0x2e], subsystem_id);
}

void SoftFunction::set_cap_list(bool present) {
  config_[0x06] = static_cast<std::uint8_t>(present ? (config_[0x06] | 0x10) : (config_[0x06] & ~0x10));
}

std::uint8_t SoftFunction::add_cap(std::uint8_t id, std::span<const std::uint8_t> body) {
  const std::uint8_t at = next_cap_;
  config_[at] = id;
  config_[at + 1u] = 0;
  std::memcpy(&config_[at + 2u], body.data(), body.size());
  if (last_cap_ == 0)
    config_[0x34] = at;
  else
    config_[last_cap_ + 1u] = at;
  last_cap_ = at;
  next_cap_ = static_cast<std::uint8_t>((at + 2u + body.size() + 3u) & ~3u);
  set_cap_list(true);
  return at;
}

std::uint8_t SoftFunction::add_virtio_cap(pci::VirtioCfgType type, std::uint8_t bar, std::uint32_t offset,
                                          std::uint32_t length, std::uint32_t notify_multiplier) {
  const bool notify = type == pci::VirtioCfgType::notify;
  std::vector<std::uint8_t> body(notify ? 18 : 14, 0);   // cap_len 20 or 16, minus id and next
  body[0] = static_cast<std::uint8_t>(body.size() + 2);  // cap_len
  body[1] = static_cast<std::uint8_t>(type);
  body[2] = bar;
  store_le32(&body[6], offset);
  store_le32(&body[10], length);
  if (notify) store_le32(&body[14], notify_multiplier);
  return add_cap(0x09, body);
}

std::uint8_t SoftFunction::add_msix_cap(std::uint16_t vectors, std::uint8_t table_bar,
                                        std::uint32_t table_offset, std::uint8_t pba_bar,
                                        std::uint32_t pba_offset) {
  std::uint8_t body[10] = {};
  store_le16(&body[0], static_cast<std::uint16_t>(vectors - 1u));
  store_le32(&body[2], table_offset | table_bar);
  store_le32(&body[6], pba_offset | pba_bar);
  set_irq_count(pci::IrqKind::msix, vectors);
  return add_cap(0x11, body);
}

SoftBar& SoftFunction::add_bar(unsigned index, std::uint64_t size) {
  auto bar = std::make_unique<SoftBar>(bdf_ + " BAR" + std::to_string(index), size);
  SoftBar& ref = *bar;
  bars_.at(index) = std::move(bar);
  soft_bars_[index] = &ref;
  return ref;
}

void SoftFunction::set_bar(unsigned index, std::unique_ptr<pci::BarIo> bar) {
  bars_.at(index) = std::move(bar);
  soft_bars_[index] = nullptr;
}

void SoftFunction::set_irq_count(pci::IrqKind kind, unsigned count) {
  std::lock_guard lock(irq_mu_);
  (kind == pci::IrqKind::intx ? intx_count_ : msix_count_) = count;
}

unsigned SoftFunction::irq_count(pci::IrqKind kind) {
  std::lock_guard lock(irq_mu_);
  return kind == pci::IrqKind::intx ? intx_count_ : msix_count_;
}

Result<std::vector<int>> SoftFunction::enable_irqs(pci::IrqKind kind, unsigned count) {
  const unsigned have = irq_count(kind);
  if (count == 0 || count > have)
    return Error(Errc::unsupported, bdf_, "enable interrupts",
                 "asked for " + std::to_string(count) + " vectors, the function has " + std::to_string(have));
  UV_TRY_VOID(disable_irqs());
  std::lock_guard lock(irq_mu_);
  for (unsigned i = 0; i < count; ++i) {
    const int fd = ::eventfd(0, EFD_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      for (int f : eventfds_) ::close(f);
      eventfds_.clear();
      return Error::from_errno(err, bdf_, "enable interrupts", "eventfd");
    }
    eventfds_.push_back(fd);
  }
  irq_kind_ = kind;
  return eventfds_;
}

Result<void> SoftFunction::unmask_intx() {
  std::lock_guard lock(irq_mu_);
  ++unmasks_;
  return ok();
}

Result<void> SoftFunction::disable_irqs() {
  std::lock_guard lock(irq_mu_);
  for (int f : eventfds_) ::close(f);
  eventfds_.clear();
  irq_kind_.reset();
  return ok();
}

Result<void> SoftFunction::route_vector(unsigned vector, int fd) {
  std::lock_guard lock(irq_mu_);
  if (!irq_kind_ || vector >= eventfds_.size())
    return Error(Errc::invalid_argument, bdf_, "route interrupt vector " + std::to_string(vector),
                 "the vector is not enabled");
  if (::dup3(fd, eventfds_[vector], O_CLOEXEC) < 0)
    return Error::from_errno(errno, bdf_, "route interrupt vector " + std::to_string(vector), "dup3");
  return ok();
}

Result<void> SoftFunction::unroute_vector(unsigned vector) {
  const int fresh = ::eventfd(0, EFD_CLOEXEC);
  if (fresh < 0)
    return Error::from_errno(errno, bdf_, "unroute interrupt vector " + std::to_string(vector), "eventfd");
  auto r = route_vector(vector, fresh);
  ::close(fresh);
  return r;
}

bool SoftFunction::raise(unsigned vector) {
  std::lock_guard lock(irq_mu_);
  if (!irq_kind_ || vector >= eventfds_.size()) return false;
  const std::uint64_t one = 1;
  if (::write(eventfds_[vector], &one, sizeof one) != static_cast<ssize_t>(sizeof one)) return false;
  ++raises_[*irq_kind_ == pci::IrqKind::intx ? 0 : 1];
  return true;
}

std::optional<pci::IrqKind> SoftFunction::irq_kind() const {
  std::lock_guard lock(irq_mu_);
  return irq_kind_;
}

std::size_t SoftFunction::enabled_vectors() const {
  std::lock_guard lock(irq_mu_);
  return eventfds_.size();
}

std::uint64_t SoftFunction::raise_count(pci::IrqKind kind) const {
  std::lock_guard lock(irq_mu_);
  return raises_[kind == pci::IrqKind::intx ? 0 : 1];
}

std::uint64_t SoftFunction::unmask_count() const {
  std::lock_guard lock(irq_mu_);
  return unmasks_;
}

// ---------------------------------------------------------------- borrow

namespace {

class Borrowed final : public pci::Function {
 public:
  explicit Borrowed(pci::Function& fn, unsigned wrap_index = 0, BarWrap wrap = {})
      : fn_(fn), wrap_index_(wrap_index), wrap_(std::move(wrap)) {}
  const std::string& bdf() const override { return fn_.bdf(); }
  Result<void> read_config(std::uint32_t off, std::span<std::uint8_t> out) override {
    return fn_.read_config(off, out);
  }
  Result<void> write_config(std::uint32_t off, std::span<const std::uint8_t> in) override {
    return fn_.write_config(off, in);
  }
  Result<pci::BarIo*> bar(unsigned index) override {
    auto b = fn_.bar(index);
    if (!b.ok() || !wrap_ || index != wrap_index_) return b;
    if (!wrapped_) wrapped_ = wrap_(**b);
    return wrapped_.get();
  }
  unsigned irq_count(pci::IrqKind kind) override { return fn_.irq_count(kind); }
  Result<std::vector<int>> enable_irqs(pci::IrqKind kind, unsigned count) override {
    return fn_.enable_irqs(kind, count);
  }
  Result<void> unmask_intx() override { return fn_.unmask_intx(); }
  Result<void> disable_irqs() override { return fn_.disable_irqs(); }
  pci::DmaAllocator& dma() override { return fn_.dma(); }

 private:
  pci::Function& fn_;
  unsigned wrap_index_;
  BarWrap wrap_;
  std::unique_ptr<BarIo> wrapped_;
};

}  // namespace

std::unique_ptr<pci::Function> borrow(pci::Function& fn) { return std::make_unique<Borrowed>(fn); }

std::unique_ptr<pci::Function> borrow(pci::Function& fn, unsigned index, BarWrap wrap) {
  return std::make_unique<Borrowed>(fn, index, std::move(wrap));
}

}  // namespace uvirtio::pci
