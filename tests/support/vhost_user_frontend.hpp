// The front-end side of a vhost-user session for tests: message builders,
// memfd-backed "guest memory", eventfd helpers, and a Frontend that sends
// requests (with fds) over a connected socket and reads the replies.
#pragma once

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "uvirtio/driver/vhost_user.hpp"

namespace uvirtio::driver::vhost_user {

inline constexpr std::uint32_t R(Request r) { return static_cast<std::uint32_t>(r); }

template <class T>
inline std::vector<std::uint8_t> bytes_of(const T& v) {
  std::vector<std::uint8_t> b(sizeof v);
  std::memcpy(b.data(), &v, sizeof v);
  return b;
}

inline std::vector<std::uint8_t> message(std::uint32_t request, const std::vector<std::uint8_t>& payload = {},
                                         std::uint32_t flags = kVersion) {
  const Header h{request, flags, static_cast<std::uint32_t>(payload.size())};
  auto b = bytes_of(h);
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}

inline std::vector<std::uint8_t> mem_table(const std::vector<MemoryRegion>& regions) {
  const MemoryTableHeader th{static_cast<std::uint32_t>(regions.size()), 0};
  auto b = bytes_of(th);
  for (const auto& r : regions) {
    const auto rb = bytes_of(r);
    b.insert(b.end(), rb.begin(), rb.end());
  }
  return b;
}

inline MemoryRegion region(std::uint64_t gpa, std::uint64_t size, std::uint64_t uva, std::uint64_t off = 0) {
  return MemoryRegion{gpa, size, uva, off};
}

// A memfd of `bytes`, filled with a byte pattern.
struct Memfd {
  explicit Memfd(std::size_t bytes) : size(bytes) {
    fd = ::memfd_create("vhost-user-test", MFD_CLOEXEC);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(bytes)), 0);
    map = static_cast<std::uint8_t*>(::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
    EXPECT_NE(map, MAP_FAILED);
  }
  ~Memfd() {
    ::munmap(map, size);
    ::close(fd);
  }
  Memfd(const Memfd&) = delete;
  Memfd& operator=(const Memfd&) = delete;
  int fd = -1;
  std::size_t size;
  std::uint8_t* map = nullptr;
};

inline int make_eventfd() { return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }
inline bool readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1 && (p.revents & POLLIN) != 0;
}
inline std::uint64_t drain(int fd) {
  std::uint64_t v = 0;
  return ::read(fd, &v, sizeof v) == sizeof v ? v : 0;
}

// The front-end side of the socket.
class Frontend {
 public:
  explicit Frontend(int fd) : fd_(fd) {
    // A reply that never comes fails the test instead of hanging it.
    const timeval limit{5, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
  }
  ~Frontend() { close(); }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  void send_raw(const std::vector<std::uint8_t>& bytes, const std::vector<int>& fds = {}) {
    iovec iov{const_cast<std::uint8_t*>(bytes.data()), bytes.size()};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    std::vector<char> ctrl(CMSG_SPACE(sizeof(int) * std::max<std::size_t>(fds.size(), 1)));
    if (!fds.empty()) {
      mh.msg_control = ctrl.data();
      mh.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
      cmsghdr* c = CMSG_FIRSTHDR(&mh);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    ASSERT_EQ(::sendmsg(fd_, &mh, MSG_NOSIGNAL), static_cast<ssize_t>(bytes.size()));
  }
  void send(Request r, const std::vector<std::uint8_t>& payload = {}, const std::vector<int>& fds = {},
            bool need_reply = false) {
    send_raw(message(R(r), payload, kVersion | (need_reply ? kFlagNeedReply : 0)), fds);
  }
  // The back-end closed the connection and sent nothing more.
  bool at_eof() const {
    char c;
    return ::recv(fd_, &c, 1, MSG_DONTWAIT) == 0;
  }
  bool has_reply() const {
    pollfd p{fd_, POLLIN, 0};
    return ::poll(&p, 1, 0) == 1;
  }
  // One reply: its header and payload.
  std::pair<Header, std::vector<std::uint8_t>> recv() {
    Header h{};
    EXPECT_EQ(::recv(fd_, &h, sizeof h, MSG_WAITALL), static_cast<ssize_t>(sizeof h));
    std::vector<std::uint8_t> p(h.size);
    if (h.size) {
      EXPECT_EQ(::recv(fd_, p.data(), p.size(), MSG_WAITALL), static_cast<ssize_t>(h.size));
    }
    return {h, p};
  }
  std::uint64_t recv_u64(Request r) {
    auto [h, p] = recv();
    EXPECT_EQ(h.request, R(r));
    EXPECT_EQ(h.flags, kVersion | kFlagReply);
    EXPECT_EQ(p.size(), 8u);
    std::uint64_t v = ~0ull;
    if (p.size() == 8) std::memcpy(&v, p.data(), 8);
    return v;
  }

 private:
  int fd_;
};

}  // namespace uvirtio::driver::vhost_user
