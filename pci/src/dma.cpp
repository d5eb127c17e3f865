// DMA memory pool and IOVA allocator (see dma.hpp).
#include "uvirtio/pci/dma.hpp"

#include <fcntl.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace uvirtio::pci {
namespace {

constexpr std::size_t kPage = 4096;
constexpr std::size_t kHuge = 2u << 20;
constexpr std::size_t kMaxAlloc = std::size_t{1} << 30;

std::uint64_t align_up(std::uint64_t v, std::uint64_t a) { return (v + a - 1) & ~(a - 1); }
bool is_pow2(std::uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace

IovaAllocator::IovaAllocator(std::vector<IovaRange> usable) : ranges_(std::move(usable)) {
  // No ranges reported (old kernels): [1 MiB, 2^39) without the x86 MSI
  // window, which the IOMMU reserves for interrupt messages.
  if (ranges_.empty()) ranges_ = {{1u << 20, 0xfedfffff}, {0xfef00000, (1ull << 39) - 1}};
  // Never hand out IOVA 0: a zero address in a ring is more often a bug than a buffer.
  for (auto& r : ranges_)
    if (r.start < kPage) r.start = kPage;
  next_ = ranges_[0].start;
}

std::optional<std::uint64_t> IovaAllocator::allocate(std::uint64_t size, std::uint64_t align) {
  if (size == 0 || !is_pow2(align)) return std::nullopt;
  // Search with local cursors; commit them only on success, so a request that
  // fits nowhere consumes nothing.
  std::size_t cur = cur_;
  std::uint64_t next = next_;
  while (cur < ranges_.size()) {
    const IovaRange& r = ranges_[cur];
    const std::uint64_t from = std::max(next, r.start);
    const std::uint64_t base = align_up(from, align);
    if (base >= from && base <= r.end && size - 1 <= r.end - base) {
      if (size - 1 == r.end - base) {  // the range is used up; base + size may wrap to 0
        cur_ = cur + 1;
        next_ = cur_ < ranges_.size() ? ranges_[cur_].start : 0;
      } else {
        cur_ = cur;
        next_ = base + size;
      }
      return base;
    }
    ++cur;
    if (cur < ranges_.size()) next = ranges_[cur].start;
  }
  return std::nullopt;
}

DmaPool::DmaPool(Os& os, std::string device, Mode mode, IovaAllocator iova, Mapper mapper)
    : os_(os), device_(std::move(device)), mode_(mode), iova_(std::move(iova)), mapper_(std::move(mapper)) {}

DmaPool::~DmaPool() {
  for (auto& c : chunks_) {
    if (c.mapped && mapper_.unmap) mapper_.unmap(c.iova, c.size);
    os_.munmap(c.va, c.size);
  }
}

Result<DmaPool::Chunk*> DmaPool::new_chunk(std::size_t min_size) {
  const std::string op = "allocate DMA memory";
  int fd = -1;
  std::size_t size = 0;
  if (!huge_tried_ || huge_) {
    huge_tried_ = true;
    size = align_up(min_size, kHuge);
    fd = os_.memfd_create("uvirtio-dma", MFD_HUGETLB | MFD_HUGE_2MB);
    if (fd >= 0 && os_.ftruncate(fd, static_cast<off_t>(size)) != 0) {
      os_.close(fd);
      fd = -1;
    }
    huge_ = fd >= 0;
  }
  if (fd < 0) {
    size = align_up(std::max(min_size, std::size_t{256} * 1024), kPage);
    fd = os_.memfd_create("uvirtio-dma", 0);
    if (fd < 0) return Error::from_errno(errno, device_, op, "memfd_create");
    if (os_.ftruncate(fd, static_cast<off_t>(size)) != 0) {
      int e = errno;
      os_.close(fd);
      return Error::from_errno(e, device_, op, "ftruncate memfd");
    }
  }
  void* va = os_.mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  int e = errno;
  os_.close(fd);
  if (va == MAP_FAILED) {
    if (huge_) {  // hugepages reserved but exhausted: fall back to small pages for good
      huge_ = false;
      return new_chunk(min_size);
    }
    return Error::from_errno(e, device_, op, "mmap " + std::to_string(size) + " bytes");
  }
  if (os_.mlock(va, size) != 0) {
    e = errno;
    os_.munmap(va, size);
    return Error::from_errno(e, device_, op, "mlock (raise RLIMIT_MEMLOCK)");
  }
  Chunk c{static_cast<std::uint8_t*>(va), 0, size, 0, false};
  if (mode_ == Mode::iommu) {
    IovaAllocator before = iova_;  // a chunk that cannot be mapped gives its range back
    auto iova = iova_.allocate(size, huge_ ? kHuge : kPage);
    if (!iova) {
      os_.munmap(va, size);
      return Error(Errc::unsupported, device_, op, "IOVA space exhausted");
    }
    c.iova = *iova;
    if (auto r = mapper_.map(va, c.iova, size); !r) {
      iova_ = std::move(before);
      os_.munmap(va, size);
      return std::move(r).error().within(op);
    }
    c.mapped = true;
  }
  chunks_.push_back(c);
  return &chunks_.back();
}

Result<std::uint64_t> DmaPool::phys_addr(const void* va) {
  const std::string op = "translate to physical address (no-IOMMU)";
  int fd = os_.open("/proc/self/pagemap", O_RDONLY);
  if (fd < 0) return Error::from_errno(errno, device_, op, "open /proc/self/pagemap");
  auto v = reinterpret_cast<std::uintptr_t>(va);
  std::uint64_t entry = 0;
  ssize_t n = os_.pread(fd, &entry, sizeof entry, static_cast<off_t>((v / kPage) * sizeof entry));
  int e = errno;
  os_.close(fd);
  if (n != static_cast<ssize_t>(sizeof entry))
    return Error::from_errno(n < 0 ? e : EIO, device_, op, "read pagemap");
  const bool present = (entry >> 63) & 1;
  const std::uint64_t pfn = entry & ((1ull << 55) - 1);
  if (!present || pfn == 0)
    return Error(Errc::permission, device_, op,
                 "page frame number hidden (needs CAP_SYS_ADMIN) or page absent");
  return pfn * kPage + (v % kPage);
}

Result<DmaRegion> DmaPool::alloc(std::size_t size, std::size_t align) {
  const std::string op = "allocate DMA memory";
  if (size == 0 || size > kMaxAlloc)
    return Error(Errc::invalid_argument, device_, op, "size " + std::to_string(size) + " is not in 1..1 GiB");
  if (!is_pow2(align) || align > kPage)
    return Error(Errc::invalid_argument, device_, op,
                 "alignment " + std::to_string(align) + " is not a power of two <= 4096");
  // In no-IOMMU mode the device sees physical addresses, so an allocation must
  // stay inside one page: a 4 KiB page, or a hugepage (a chunk of several
  // hugepages is not physically contiguous).
  auto fits = [&](const Chunk& c, std::size_t off) {
    if (size > c.size || off > c.size - size) return false;
    if (mode_ == Mode::noiommu) {
      const std::size_t page = huge_ ? kHuge : kPage;
      return size <= page && (off / page) == ((off + size - 1) / page);
    }
    return true;
  };
  if (mode_ == Mode::noiommu && size > kHuge)
    return Error(Errc::unsupported, device_, op,
                 "no-IOMMU mode cannot give more than 2 MiB contiguous (size " + std::to_string(size) + ")");
  if (mode_ == Mode::noiommu && !huge_ && huge_tried_ && size > kPage)
    return Error(Errc::unsupported, device_, op,
                 "no-IOMMU mode without hugepages cannot give more than 4 KiB contiguous");
  Chunk* chunk = nullptr;
  std::size_t off = 0;
  for (auto& c : chunks_) {
    std::size_t o = align_up(c.used, align);
    if (!fits(c, o) && mode_ == Mode::noiommu) o = align_up(c.used, kPage);
    if (fits(c, o)) {
      chunk = &c;
      off = o;
      break;
    }
  }
  if (chunk == nullptr) {
    UV_TRY(chunk, new_chunk(size));
    off = 0;
    if (!fits(*chunk, off))
      return Error(Errc::unsupported, device_, op,
                   "no-IOMMU mode without hugepages cannot give more than 4 KiB contiguous");
  }
  chunk->used = off + size;
  DmaRegion r;
  r.va = chunk->va + off;
  r.size = size;
  std::memset(r.va, 0, size);
  if (mode_ == Mode::iommu) {
    r.iova = chunk->iova + off;
  } else {
    UV_TRY(r.iova, phys_addr(r.va));
  }
  return r;
}

}  // namespace uvirtio::pci
