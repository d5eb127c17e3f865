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

constexpr std::uint16_t kMaxQueueSize = 32768;  // spec 2.6 / 2.8: the largest queue

// Why a file of `file_bytes` bytes starting with `p` (header and bitmap) is
// not a ledger of this queue; empty when it is, with its marked ids in `ids`.
// A ledger written for another queue size (an owner that asked for another
// size) still counts: its ids below `size` are kept (the device may still
// complete them) and `was` says the size it had; ids at or above `size`
// cannot name a chain of the new ring (a completion naming one breaks it).
// Reads the bytes only when the size is right, each once.
std::string check(const std::uint8_t* p, std::size_t file_bytes, std::uint16_t size, std::uint16_t queue,
                  std::vector<std::uint16_t>& ids, std::uint16_t& was) {
  const std::size_t want_bytes = InflightLedger::file_bytes(size);
  if (file_bytes < sizeof(Header))
    return "size " + std::to_string(file_bytes) + " bytes, not " + std::to_string(want_bytes);
  Header h;
  std::memcpy(&h, p, sizeof h);
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) return "no ledger magic";
  if (h.version.get() != kVersion) return "version " + std::to_string(h.version.get());
  const std::uint32_t had = h.queue_size.get();
  if (had == 0 || had > kMaxQueueSize) return "queue size " + std::to_string(had);
  const std::size_t had_bytes = InflightLedger::file_bytes(static_cast<std::uint16_t>(had));
  if (file_bytes != had_bytes) {
    return "size " + std::to_string(file_bytes) + " bytes, not " + std::to_string(had_bytes) +
           (had == size ? "" : " (for queue size " + std::to_string(had) + ")");
  }
  if (h.queue_index.get() != queue)
    return "queue index " + std::to_string(h.queue_index.get()) + ", not " + std::to_string(queue);
  const std::size_t words = (had + 63u) / 64u;
  for (std::size_t w = 0; w < words; ++w) {
    le64 word;
    std::memcpy(&word, p + sizeof(Header) + 8 * w, 8);
    const std::uint64_t bits = word.get();
    for (unsigned b = 0; b < 64; ++b) {
      if ((bits >> b & 1u) == 0) continue;
      const std::size_t id = 64 * w + b;
      if (id >= had) {
        ids.clear();
        return "bit " + std::to_string(id) + " is beyond the queue size " + std::to_string(had);
      }
      if (id < size) ids.push_back(static_cast<std::uint16_t>(id));
    }
  }
  was = static_cast<std::uint16_t>(had);
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
  const int fd = ::open(l.path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return Error::from_errno(errno, device, op, l.path_);
  l.fd_ = pci::Fd(pci::Os::system(), fd);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK)
      return Error(Errc::busy, device, op, l.path_ + " is held by another owner of the queue");
    return Error::from_errno(errno, device, op, "lock " + l.path_);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) return Error::from_errno(errno, device, op, "stat " + l.path_);
  if (!S_ISREG(st.st_mode))
    return Error(Errc::invalid_argument, device, op, l.path_ + " is not a regular file");
  const std::size_t bytes = file_bytes(size);
  const auto had = static_cast<std::size_t>(st.st_size);
  std::uint16_t was = size;
  if (had != 0) {
    // What an earlier owner left, read through pread so a short or long file
    // is judged by its real size, not by the mapping. At most the largest
    // ledger's bytes are read; a longer file fails the size check.
    std::vector<std::uint8_t> old(std::min(had, file_bytes(kMaxQueueSize) + 1));
    const ssize_t n = ::pread(fd, old.data(), old.size(), 0);
    if (n < 0) return Error::from_errno(errno, device, op, "read " + l.path_);
    const std::size_t seen = static_cast<std::size_t>(n) < old.size() ? static_cast<std::size_t>(n) : had;
    l.discarded_ = check(old.data(), seen, size, queue, l.left_over_, was);
    if (l.discarded_.empty() && was != size) l.resized_from_ = was;
  }
  // A file for another queue size is rewritten for this one, its ids kept.
  const bool fresh = had == 0 || !l.discarded_.empty() || was != size;
  if (fresh && ::ftruncate(fd, 0) != 0) return Error::from_errno(errno, device, op, "truncate " + l.path_);
  if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0)
    return Error::from_errno(errno, device, op, "size " + l.path_);
  void* m = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) return Error::from_errno(errno, device, op, "map " + l.path_);
  l.map_ = std::unique_ptr<void, Unmap>(m, Unmap{bytes});
  if (fresh) {
    Header h{};
    std::memcpy(h.magic, kMagic, sizeof kMagic);
    h.version.set(kVersion);
    h.queue_size.set(size);
    h.queue_index.set(queue);
    std::memcpy(m, &h, sizeof h);
    for (const std::uint16_t id : l.left_over_) l.mark(id);  // carried over a resize
  }
  return l;
}

void InflightLedger::Unmap::operator()(void* p) const noexcept { ::munmap(p, bytes); }

std::uint64_t* InflightLedger::words() const noexcept {
  return reinterpret_cast<std::uint64_t*>(static_cast<std::uint8_t*>(map_.get()) + kHeaderBytes);
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
