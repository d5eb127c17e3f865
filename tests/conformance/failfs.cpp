// failfs: a FUSE filesystem with one file, a pass-through to a real backing
// file, whose fsync fails with EIO on the calls the test chooses. QEMU's
// memory-backend-file maps the file (MAP_SHARED: FUSE writes its dirty pages
// back through our write handler) and virtio-pmem's flush fsyncs it, so a
// guest flush meets a real host fsync failure, as on a failing disk.
//
//   uvirtio-failfs BACKING MOUNTPOINT --log FILE [--fail FIRST:COUNT]
//                  [--lose-failed-writes] [--stall N:MS] [FUSE options]
//
// The mount shows BACKING's name. fsync calls are numbered from 1; calls
// FIRST .. FIRST+COUNT-1 return EIO without syncing, the others fsync the
// backing file. Each call is appended to the log as "fsync N ok|EIO".
// --stall N:MS (repeatable) makes fsync call N take MS milliseconds longer
// (a host whose disk hangs for a while); it then succeeds (log: "fsync N
// ok, stalled").
//
// --lose-failed-writes models a disk whose write-back failed, as Linux
// leaves it: writes are held until the next fsync; a successful fsync
// writes them to BACKING and syncs it, a failed one drops them. The kernel
// counted them as written, so it holds those pages clean: their data stays
// in its page cache but no later fsync writes it again.
// libfuse does the protocol work; this file only answers the operations QEMU
// uses (lookup, open, read, write, truncate, fsync).
#define FUSE_USE_VERSION 35
#include <fcntl.h>
#include <fuse3/fuse.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

struct State {
  std::string backing;  // path of the real file
  std::string name;     // "/" + its base name
  int fd = -1;          // the backing file, opened once
  unsigned long first_fail = 0, fail_count = 0;
  std::map<unsigned long, unsigned long> stalls;  // fsync call -> extra ms
  unsigned long fsyncs = 0;
  FILE* log = nullptr;
  bool lose = false;  // --lose-failed-writes
  struct Held {
    off_t off;
    std::vector<char> bytes;
  };
  std::vector<Held> held;  // writes since the last fsync (lose mode), in order
  std::mutex m;
};

State& state() { return *static_cast<State*>(fuse_get_context()->private_data); }

int fs_getattr(const char* path, struct stat* st, fuse_file_info*) {
  State& s = state();
  if (std::strcmp(path, "/") == 0) {
    std::memset(st, 0, sizeof *st);
    st->st_mode = S_IFDIR | 0755;
    st->st_nlink = 2;
    return 0;
  }
  if (path != s.name) return -ENOENT;
  if (fstat(s.fd, st) != 0) return -errno;
  return 0;
}

int fs_readdir(const char* path, void* buf, fuse_fill_dir_t fill, off_t, fuse_file_info*,
               fuse_readdir_flags) {
  if (std::strcmp(path, "/") != 0) return -ENOENT;
  State& s = state();
  fill(buf, ".", nullptr, 0, fuse_fill_dir_flags{});
  fill(buf, "..", nullptr, 0, fuse_fill_dir_flags{});
  fill(buf, s.name.c_str() + 1, nullptr, 0, fuse_fill_dir_flags{});
  return 0;
}

int fs_open(const char* path, fuse_file_info* fi) {
  if (path != state().name) return -ENOENT;
  fi->keep_cache = 1;  // page-cache mode (not direct_io): shared writable mmap works
  return 0;
}

int fs_read(const char* path, char* buf, size_t size, off_t off, fuse_file_info*) {
  State& s = state();
  if (path != s.name) return -ENOENT;
  std::lock_guard lk(s.m);
  const ssize_t n = pread(s.fd, buf, size, off);
  if (n < 0) return -errno;
  // Held writes show, as they would from a disk's cache.
  for (const auto& h : s.held) {
    const off_t lo = std::max(off, h.off);
    const off_t hi = std::min<off_t>(off + n, h.off + static_cast<off_t>(h.bytes.size()));
    if (lo < hi) std::memcpy(buf + (lo - off), h.bytes.data() + (lo - h.off), static_cast<size_t>(hi - lo));
  }
  return static_cast<int>(n);
}

int fs_write(const char* path, const char* buf, size_t size, off_t off, fuse_file_info*) {
  State& s = state();
  if (path != s.name) return -ENOENT;
  std::lock_guard lk(s.m);
  if (s.lose) {
    struct stat st {};
    if (fstat(s.fd, &st) != 0) return -errno;
    if (off + static_cast<off_t>(size) > st.st_size) return -ENOSPC;  // the file never grows here
    s.held.push_back({off, std::vector<char>(buf, buf + size)});
    return static_cast<int>(size);
  }
  const ssize_t n = pwrite(s.fd, buf, size, off);
  return n < 0 ? -errno : static_cast<int>(n);
}

// Writes the held writes to the backing file (lose mode); -errno on failure.
int apply_held(State& s) {
  for (const auto& h : s.held)
    if (pwrite(s.fd, h.bytes.data(), h.bytes.size(), h.off) != static_cast<ssize_t>(h.bytes.size()))
      return errno != 0 ? -errno : -EIO;
  s.held.clear();
  return 0;
}

int fs_truncate(const char* path, off_t size, fuse_file_info*) {
  if (path != state().name) return -ENOENT;
  return ftruncate(state().fd, size) != 0 ? -errno : 0;
}

int fs_fsync(const char* path, int datasync, fuse_file_info*) {
  State& s = state();
  if (path != s.name) return -ENOENT;
  std::unique_lock lk(s.m);
  const unsigned long n = ++s.fsyncs;
  const auto st = s.stalls.find(n);
  const bool stall = st != s.stalls.end();
  if (stall) {
    lk.unlock();  // reads and writes go on meanwhile
    std::this_thread::sleep_for(std::chrono::milliseconds(st->second));
    lk.lock();
  }
  int r = 0;
  if (n >= s.first_fail && n - s.first_fail < s.fail_count) {
    r = -EIO;
    s.held.clear();  // lose mode: the failed write-back is gone
  } else if ((r = apply_held(s)) == 0 && (datasync ? fdatasync(s.fd) : fsync(s.fd)) != 0) {
    r = -errno;
  }
  std::fprintf(s.log, "fsync %lu %s%s\n", n,
               r == 0      ? "ok"
               : r == -EIO ? "EIO"
                           : std::strerror(-r),
               stall ? ", stalled" : "");
  std::fflush(s.log);
  return r;
}

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "uvirtio-failfs: %s\n"
               "usage: uvirtio-failfs BACKING MOUNTPOINT --log FILE [--fail FIRST:COUNT]\n"
               "                      [--lose-failed-writes] [--stall N:MS] [FUSE options]\n",
               why);
  std::exit(2);
}

// "A:B" with A >= 1 and B >= 0, both decimal; anything else is a usage error.
void parse_pair(const char* arg, unsigned long& a, unsigned long& b, const char* what) {
  char* end = nullptr;
  a = std::strtoul(arg, &end, 10);
  if (end == arg || *end != ':' || a == 0) usage(what);
  const char* second = end + 1;
  b = std::strtoul(second, &end, 10);
  if (end == second || *end != '\0') usage(what);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) usage("BACKING and MOUNTPOINT are required");
  State s;
  s.backing = argv[1];
  const auto slash = s.backing.find_last_of('/');
  s.name = "/" + (slash == std::string::npos ? s.backing : s.backing.substr(slash + 1));
  if (s.name == "/") usage("BACKING has no file name");
  std::vector<char*> fuse_args{argv[0], argv[2]};
  const char* log_path = nullptr;
  for (int i = 3; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--fail" && i + 1 < argc) {
      parse_pair(argv[++i], s.first_fail, s.fail_count, "--fail wants FIRST:COUNT, FIRST >= 1");
    } else if (a == "--stall" && i + 1 < argc) {
      unsigned long call = 0, ms = 0;
      parse_pair(argv[++i], call, ms, "--stall wants N:MS, N >= 1");
      s.stalls[call] = ms;
    } else if (a == "--lose-failed-writes") {
      s.lose = true;
    } else if (a == "--log" && i + 1 < argc) {
      log_path = argv[++i];
    } else {
      fuse_args.push_back(argv[i]);
    }
  }
  if (log_path == nullptr) usage("--log is required");
  s.fd = open(s.backing.c_str(), O_RDWR | O_CLOEXEC);
  if (s.fd < 0) {
    std::fprintf(stderr, "uvirtio-failfs: cannot open %s: %s\n", s.backing.c_str(), std::strerror(errno));
    return 1;
  }
  s.log = std::fopen(log_path, "a");
  if (s.log == nullptr) {
    std::fprintf(stderr, "uvirtio-failfs: cannot open log %s: %s\n", log_path, std::strerror(errno));
    return 1;
  }
  fuse_operations ops{};
  ops.getattr = fs_getattr;
  ops.readdir = fs_readdir;
  ops.open = fs_open;
  ops.read = fs_read;
  ops.write = fs_write;
  ops.truncate = fs_truncate;
  ops.fsync = fs_fsync;
  const int r = fuse_main(static_cast<int>(fuse_args.size()), fuse_args.data(), &ops, &s);
  std::fclose(s.log);
  close(s.fd);
  return r;
}
