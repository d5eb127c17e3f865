// InflightLedger: which ids of one virtqueue have a request that the device
// may still complete, kept in a small file that outlives the process.
//
// Why: a device can complete a request after it was reset (QEMU 7.2's
// virtio-pmem does, for a flush still running in its thread pool; see
// doc/protocols.md, "Completions from before a reset"). Within one process
// the ring knows which ids were in flight and never takes such a late
// completion for a new request. A process that dies, or exits with a request
// abandoned at its deadline, takes that knowledge with it: the next owner of
// the queue could hand out the same id first and take the stale completion
// for its own request, reporting a flush the host never ran. The ledger
// keeps it: Virtqueue marks an id when it submits a chain and clears it when
// the chain completes, so the file holds what was in flight when the owner
// went away. The next owner hands those ids out last and drops one late
// completion of each (SplitQueue::adopt_stale). The same idea as vhost-user's
// shared in-flight area (shared/seeds, VHOST_USER_GET_INFLIGHT_FD), where
// the back-end survives its own crash; here the driver does.
//
// The file is DIR/<device>-q<queue>.inflight (tmpfs /run by default, so it
// goes with a reboot, as the device's state does): a 64-byte header (magic
// "uvinfl1", version 1, queue size, queue index) and a bitmap of `size` bits
// in little-endian 64-bit words. It is locked (flock) while open, so two
// owners of one queue cannot both use it. A file that fails any check (size,
// magic, version, queue size or index, a bit beyond the size) is not trusted:
// it is rewritten empty and discarded() says why. A valid file written for
// another queue size (an earlier owner asked for another size) is rewritten
// for this one with its ids below the new size kept (resized_from()).
//
// Threading: the owner of the Virtqueue (one thread or its lock).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "uvirtio/base/result.hpp"
#include "uvirtio/pci/os.hpp"

namespace uvirtio::driver {

class InflightLedger {
 public:
  // Opens (creating the directory and the file) the ledger of queue `queue`
  // of `device` (a PCI address; '/' is replaced), for a queue of `size`
  // entries. Fails with busy when another open file holds the lock, with the
  // errno class otherwise; errors name the device and the path.
  static Result<InflightLedger> open(const std::string& dir, const std::string& device, std::uint16_t queue,
                                     std::uint16_t size);

  // The ids marked when the file was opened, ascending: an earlier owner's
  // requests that the device may still complete.
  const std::vector<std::uint16_t>& left_over() const noexcept { return left_over_; }
  // Why the file's earlier content was not used; empty when it was (or the
  // file is new).
  const std::string& discarded() const noexcept { return discarded_; }
  // The queue size the earlier owner's file was written for, when it differs
  // from this one's (the file was rewritten, left_over() kept); else 0.
  std::uint16_t resized_from() const noexcept { return resized_from_; }
  const std::string& path() const noexcept { return path_; }

  void mark(std::uint16_t id) noexcept;
  void clear(std::uint16_t id) noexcept;
  bool marked(std::uint16_t id) const noexcept;

  // Layout, for tests and tools.
  static constexpr std::size_t kHeaderBytes = 64;
  static std::size_t file_bytes(std::uint16_t size) { return kHeaderBytes + (size + 63u) / 64u * 8u; }

 private:
  InflightLedger() = default;
  std::uint64_t* words() const noexcept;

  struct Unmap {
    std::size_t bytes;
    void operator()(void* p) const noexcept;
  };
  pci::Fd fd_;  // holds the lock; closing it lets the next owner in (the file stays)
  std::unique_ptr<void, Unmap> map_;
  std::uint16_t size_ = 0;
  std::string path_;
  std::vector<std::uint16_t> left_over_;
  std::string discarded_;
  std::uint16_t resized_from_ = 0;
};

}  // namespace uvirtio::driver
