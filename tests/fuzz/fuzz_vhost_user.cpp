// Fuzz target: the vhost-user message parser (driver/vhost_user.hpp), the
// first thing that sees what a front-end sends.
//
// Input: one byte giving the number of fds that "came with" the message
// (mod 10; the fds are placeholders, the parser only counts them), then the
// message bytes (header and payload). Traps when the parser accepts a
// message that breaks a rule it promises to check, or fails with anything
// but bad_device_data naming the peer.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "fuzz_input.hpp"
#include "uvirtio/driver/vhost_user.hpp"

namespace {

using namespace uvirtio::driver::vhost_user;

constexpr const char* kPeer = "fuzz front-end";

bool overlap(std::uint64_t a, std::uint64_t n, std::uint64_t b, std::uint64_t m) {
  return a <= b + (m - 1) && b <= a + (n - 1);
}

void check_accepted(const Message& m, std::span<const std::uint8_t> bytes, std::size_t nfds) {
  Header h;
  std::memcpy(&h, bytes.data(), sizeof h);
  CHECK(h.request == m.request && h.flags == m.flags);
  CHECK((h.flags & kVersionMask) == kVersion && (h.flags & ~(kVersionMask | kFlagNeedReply)) == 0);
  CHECK(h.size <= kMaxPayload && h.size == bytes.size() - sizeof h);
  CHECK(nfds <= kMaxFds);
  if (!m.known) {
    CHECK(m.raw.size() == h.size);
    return;
  }
  switch (static_cast<Request>(m.request)) {
    case Request::set_mem_table: {
      CHECK(!m.regions.empty() && m.regions.size() <= kMaxRegions && m.regions.size() == nfds);
      CHECK(h.size == sizeof(MemoryTableHeader) + m.regions.size() * sizeof(MemoryRegion));
      for (std::size_t i = 0; i < m.regions.size(); ++i) {
        const auto& r = m.regions[i];
        CHECK(r.memory_size != 0);
        CHECK(r.guest_phys_addr + (r.memory_size - 1) >= r.guest_phys_addr);
        CHECK(r.userspace_addr + (r.memory_size - 1) >= r.userspace_addr);
        CHECK(r.mmap_offset + r.memory_size >= r.mmap_offset &&
              r.mmap_offset + r.memory_size <= (1ull << 63) - 1);
        for (std::size_t j = 0; j < i; ++j) {
          const auto& o = m.regions[j];
          CHECK(!overlap(r.guest_phys_addr, r.memory_size, o.guest_phys_addr, o.memory_size));
          CHECK(!overlap(r.userspace_addr, r.memory_size, o.userspace_addr, o.memory_size));
        }
      }
      break;
    }
    case Request::set_vring_num:
      CHECK(h.size == sizeof(VringState) && nfds == 0);
      CHECK(m.state.num >= 1 && m.state.num <= kMaxQueueSize && (m.state.num & (m.state.num - 1)) == 0);
      break;
    case Request::set_vring_base:
      CHECK(m.state.num <= 0xffff);
      break;
    case Request::set_vring_enable:
      CHECK(m.state.num <= 1);
      break;
    case Request::set_vring_addr:
      CHECK(h.size == sizeof(VringAddr) && nfds == 0);
      CHECK((m.addr.flags & ~kVringFlagLog) == 0);
      CHECK(m.addr.desc_user_addr % 16 == 0 && m.addr.avail_user_addr % 2 == 0 &&
            m.addr.used_user_addr % 4 == 0);
      break;
    case Request::set_vring_kick:
    case Request::set_vring_call:
    case Request::set_vring_err:
      CHECK(h.size == 8);
      CHECK(m.ring_index <= 0xff && (m.u64 & ~std::uint64_t{0x1ff}) == 0);
      CHECK(nfds == (m.has_fd ? 1u : 0u));
      break;
    case Request::set_features:
    case Request::set_protocol_features:
      CHECK(h.size == 8 && nfds == 0);
      break;
    default:
      CHECK(nfds == 0);
      break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::size_t nfds = data[0] % 10;
  const std::vector<int> fds(nfds, 3);
  const std::span<const std::uint8_t> bytes(data + 1, size - 1);
  auto r = parse_message(bytes, fds, kPeer);
  if (r.ok()) {
    check_accepted(*r, bytes, nfds);
  } else {
    CHECK(r.error().code() == uvirtio::Errc::bad_device_data && r.error().device() == kPeer);
    CHECK(!r.error().cause().empty());
  }
  return 0;
}
