// The OS seam: every syscall uvirtio's PCI layer makes goes through Os.
//
// SystemOs forwards to the kernel. Tests substitute a fake that models
// /dev/vfio, sysfs and device regions in memory, so container, group, device,
// binding and DMA logic runs without root or hardware (the idea of rust-vmm's
// vfio-ioctls seam). Calls follow the libc convention: -1 (or MAP_FAILED) with
// errno set on failure.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace uvirtio::pci {

class Os {
 public:
  virtual ~Os() = default;

  virtual int open(const std::string& path, int flags) = 0;
  virtual int close(int fd) = 0;
  virtual int ioctl(int fd, unsigned long request, void* arg) = 0;
  virtual void* mmap(void* addr, std::size_t len, int prot, int flags, int fd, off_t off) = 0;
  virtual int munmap(void* addr, std::size_t len) = 0;
  virtual ssize_t pread(int fd, void* buf, std::size_t len, off_t off) = 0;
  virtual ssize_t pwrite(int fd, const void* buf, std::size_t len, off_t off) = 0;
  virtual int eventfd(unsigned initval, int flags) = 0;
  virtual int memfd_create(const char* name, unsigned flags) = 0;
  virtual int ftruncate(int fd, off_t len) = 0;
  virtual int mlock(const void* addr, std::size_t len) = 0;

  // Small-file helpers for sysfs and procfs. Return nullopt with errno set.
  virtual std::optional<std::string> read_file(const std::string& path) = 0;
  // Writes text in one write(2), creating a regular file if needed (sysfs
  // attributes take the whole value in one write).
  virtual bool write_file(const std::string& path, const std::string& text) = 0;
  virtual int mkdir(const std::string& path) = 0;  // 0 also when it exists
  virtual std::optional<std::vector<std::string>> list_dir(const std::string& path) = 0;
  virtual std::optional<std::string> readlink(const std::string& path) = 0;
  virtual bool exists(const std::string& path) = 0;

  // The process-wide real implementation.
  static Os& system();
};

// Move-only owner of a file descriptor, closed through the Os that opened it.
class Fd {
 public:
  Fd() = default;
  Fd(Os& os, int fd) : os_(&os), fd_(fd) {}
  Fd(Fd&& o) noexcept : os_(o.os_), fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      os_ = o.os_;
      fd_ = o.release();
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }

  int get() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  int release() noexcept {
    int f = fd_;
    fd_ = -1;
    return f;
  }
  void reset() noexcept {
    if (fd_ >= 0 && os_ != nullptr) os_->close(fd_);
    fd_ = -1;
  }

 private:
  Os* os_ = nullptr;
  int fd_ = -1;
};

}  // namespace uvirtio::pci
