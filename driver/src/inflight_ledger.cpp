// InflightLedger: see inflight_ledger.hpp.
#include "uvirtio/driver/inflight_ledger.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include "uvirtio/base/le.hpp"

namespace uvirtio::driver {
namespace {

constexpr char kMagic[8] = {'u', 'v', 'i', 'n', 'f', 'l', '1', '\0'};
constexpr std::uint32_t kVersion = 1;

struct Header {
  char magic[8];
  le32 version;
  le16 queue_size;
  le16 queue_index;
  std::uint8_t reserved[48];
};
static_assert(sizeof(Header) == InflightLedger::kHeaderBytes);

// Why `h` and the bitmap after it are not a ledger of this queue; empty when
// they are. Reads the file's bytes once each.
std::string check(const std::uint8_t* p, std::size_t file_bytes, std::size_t want_bytes, std::uint16_t size,
                  std::uint16_t queue, std::vector<std::uint16_t>& ids) {
  if (file_bytes != want_bytes)
    return "size " + std::to_string(file_bytes) + " bytes, not " + std::to_string(want_bytes);
  Header h;
  std::memcpy(&h, p, sizeof h);
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) return "no ledger magic";
  if (h.version.get() != kVersion) return "version " + std::to_string(h.version.get());
  if (h.queue_size.get() != size)
    return "queue size " + std::to_string(h.queue_size.get()) + ", not " + std::to_string(size);
  if (h.queue_index.get() != queue)
    return "queue index " + std::to_string(h.queue_index.get()) + ", not " + std::to_string(queue);
  const std::size_t words = (size + 63u) / 64u;
  for (std::size_t w = 0; w < words; ++w) {
    le64 word;
    std::memcpy(&word, p + sizeof(Header) + 8 * w, 8);
    const std::uint64_t bits = word.get();
    for (unsigned b = 0; b < 64; ++b) {
      if ((bits >> b & 1u) == 0) continue;
      const std::size_t id = 64 * w + b;
      if (id >= size) {
        ids.clear();
        return "bit " + std::to_string(id) + " is beyond the queue size " + std::to_string(size);
      }
      ids.push_back(static_cast<std::uint16_t>(id));
    }
  }
  return {};
}

}  // namespace

Result<InflightLedger> InflightLedger::open(const std::string& dir, const std::string& device,
                                            std::uint16_t queue, std::uint16_t size) {
  const std::string op = "open in-flight ledger";
  std::string file = device;
  for (char& c : file)
    if (c == '/') c = '_';
  InflightLedger l;
  l.size_ = size;
  l.path_ = dir + "/" + file + "-q" + std::to_string(queue) + ".inflight";
  if (size == 0) return Error(Errc::invalid_argument, device, op, "queue size 0");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Error(Errc::io, device, op, "create " + dir + ": " + ec.message());
  l.fd_ = ::open(l.path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (l.fd_ < 0) return Error::from_errno(errno, device, op, l.path_);
  if (::flock(l.fd_, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK)
      return Error(Errc::busy, device, op, l.path_ + " is held by another owner of the queue");
    return Error::from_errno(errno, device, op, "lock " + l.path_);
  }
  struct stat st {};
  if (::fstat(l.fd_, &st) != 0) return Error::from_errno(errno, device, op, "stat " + l.path_);
  if (!S_ISREG(st.st_mode))
    return Error(Errc::invalid_argument, device, op, l.path_ + " is not a regular file");
  l.bytes_ = file_bytes(size);
  const auto had = static_cast<std::size_t>(st.st_size);
  if (had != 0) {
    // What an earlier owner left, read through pread so a short or long file
    // is judged by its real size, not by the mapping.
    std::vector<std::uint8_t> old(std::min(had, l.bytes_));
    const ssize_t n = ::pread(l.fd_, old.data(), old.size(), 0);
    if (n < 0) return Error::from_errno(errno, device, op, "read " + l.path_);
    l.discarded_ = had == l.bytes_ && static_cast<std::size_t>(n) == old.size()
                       ? check(old.data(), had, l.bytes_, size, queue, l.left_over_)
                       : "size " + std::to_string(had) + " bytes, not " + std::to_string(l.bytes_);
  }
  const bool fresh = had == 0 || !l.discarded_.empty();
  if (fresh && ::ftruncate(l.fd_, 0) != 0) return Error::from_errno(errno, device, op, "truncate " + l.path_);
  if (::ftruncate(l.fd_, static_cast<off_t>(l.bytes_)) != 0)
    return Error::from_errno(errno, device, op, "size " + l.path_);
  void* m = ::mmap(nullptr, l.bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, l.fd_, 0);
  if (m == MAP_FAILED) return Error::from_errno(errno, device, op, "map " + l.path_);
  l.map_ = m;
  if (fresh) {
    Header h{};
    std::memcpy(h.magic, kMagic, sizeof kMagic);
    h.version.set(kVersion);
    h.queue_size.set(size);
    h.queue_index.set(queue);
    std::memcpy(l.map_, &h, sizeof h);
  }
  return l;
}

InflightLedger::InflightLedger(InflightLedger&& o) noexcept
    : fd_(std::exchange(o.fd_, -1)),
      map_(std::exchange(o.map_, nullptr)),
      bytes_(o.bytes_),
      size_(o.size_),
      path_(std::move(o.path_)),
      left_over_(std::move(o.left_over_)),
      discarded_(std::move(o.discarded_)) {}

InflightLedger& InflightLedger::operator=(InflightLedger&& o) noexcept {
  if (this != &o) {
    this->~InflightLedger();
    new (this) InflightLedger(std::move(o));
  }
  return *this;
}

InflightLedger::~InflightLedger() {
  if (map_ != nullptr) ::munmap(map_, bytes_);
  if (fd_ >= 0) ::close(fd_);  // drops the lock; the file stays for the next owner
}

std::uint64_t* InflightLedger::words() const noexcept {
  return reinterpret_cast<std::uint64_t*>(static_cast<std::uint8_t*>(map_) + kHeaderBytes);
}

// One word per update: whatever moment the process dies at, the file holds
// the bits of every earlier update (the page stays in the page cache).
namespace {
std::uint64_t raw_bit(std::uint16_t id) noexcept { return le64::to_raw(std::uint64_t{1} << (id % 64)); }
}  // namespace

void InflightLedger::mark(std::uint16_t id) noexcept {
  if (map_ == nullptr || id >= size_) return;
  std::atomic_ref<std::uint64_t>(words()[id / 64]).fetch_or(raw_bit(id), std::memory_order_relaxed);
}

void InflightLedger::clear(std::uint16_t id) noexcept {
  if (map_ == nullptr || id >= size_) return;
  std::atomic_ref<std::uint64_t>(words()[id / 64]).fetch_and(~raw_bit(id), std::memory_order_relaxed);
}

bool InflightLedger::marked(std::uint16_t id) const noexcept {
  if (map_ == nullptr || id >= size_) return false;
  return (std::atomic_ref<std::uint64_t>(words()[id / 64]).load(std::memory_order_relaxed) & raw_bit(id)) !=
         0;
}

}  // namespace uvirtio::driver
