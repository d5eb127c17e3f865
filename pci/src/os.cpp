// SystemOs: the real kernel behind the Os seam.
#include "uvirtio/pci/os.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>

namespace uvirtio::pci {
namespace {

class SystemOs final : public Os {
 public:
  int open(const std::string& path, int flags) override { return ::open(path.c_str(), flags | O_CLOEXEC); }
  int close(int fd) override { return ::close(fd); }
  int ioctl(int fd, unsigned long request, void* arg) override { return ::ioctl(fd, request, arg); }
  void* mmap(void* addr, std::size_t len, int prot, int flags, int fd, off_t off) override {
    return ::mmap(addr, len, prot, flags, fd, off);
  }
  int munmap(void* addr, std::size_t len) override { return ::munmap(addr, len); }
  ssize_t pread(int fd, void* buf, std::size_t len, off_t off) override { return ::pread(fd, buf, len, off); }
  ssize_t pwrite(int fd, const void* buf, std::size_t len, off_t off) override {
    return ::pwrite(fd, buf, len, off);
  }
  int eventfd(unsigned initval, int flags) override { return ::eventfd(initval, flags | EFD_CLOEXEC); }
  int memfd_create(const char* name, unsigned flags) override {
    return ::memfd_create(name, flags | MFD_CLOEXEC);
  }
  int ftruncate(int fd, off_t len) override { return ::ftruncate(fd, len); }
  int mlock(const void* addr, std::size_t len) override { return ::mlock(addr, len); }

  std::optional<std::string> read_file(const std::string& path) override {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return std::nullopt;
    std::string out;
    char buf[4096];
    for (;;) {
      ssize_t n = ::read(fd, buf, sizeof buf);
      if (n < 0) {
        int e = errno;
        ::close(fd);
        errno = e;
        return std::nullopt;
      }
      if (n == 0) break;
      out.append(buf, static_cast<std::size_t>(n));
    }
    ::close(fd);
    return out;
  }
  bool write_file(const std::string& path, const std::string& text) override {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return false;
    ssize_t n = ::write(fd, text.data(), text.size());
    int e = errno;
    ::close(fd);
    if (n != static_cast<ssize_t>(text.size())) {
      errno = n < 0 ? e : EIO;
      return false;
    }
    return true;
  }
  std::optional<std::string> readlink(const std::string& path) override {
    char buf[PATH_MAX];
    ssize_t n = ::readlink(path.c_str(), buf, sizeof buf - 1);
    if (n < 0) return std::nullopt;
    return std::string(buf, static_cast<std::size_t>(n));
  }
  int mkdir(const std::string& path) override {
    if (::mkdir(path.c_str(), 0755) == 0 || errno == EEXIST) return 0;
    return -1;
  }
  std::optional<std::vector<std::string>> list_dir(const std::string& path) override {
    DIR* d = ::opendir(path.c_str());
    if (d == nullptr) return std::nullopt;
    std::vector<std::string> names;
    while (dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n != "." && n != "..") names.push_back(std::move(n));
    }
    ::closedir(d);
    return names;
  }
  bool exists(const std::string& path) override { return ::access(path.c_str(), F_OK) == 0; }
};

}  // namespace

Os& Os::system() {
  static SystemOs os;
  return os;
}

}  // namespace uvirtio::pci
