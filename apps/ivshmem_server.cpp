// uvirtio-ivshmem-server: an ivshmem server for QEMU's ivshmem-doorbell
// device (QEMU docs/specs/ivshmem-spec.rst), for systems whose QEMU ships
// none. It listens on a Unix socket; each client (a QEMU with
// -chardev socket,path=SOCK,id=c -device ivshmem-doorbell,chardev=c,vectors=N)
// gets a peer id, the shared memory and one eventfd per vector for itself
// and for every other peer. See doc/ivshmem.md.
//
//   uvirtio-ivshmem-server [-S SOCKET] [-l SIZE] [-n VECTORS] [-m FILE | -M NAME]
//                          [-p PIDFILE] [--ready-file FILE] [-v]
//
// It runs in the foreground until SIGINT, SIGTERM or SIGHUP, then removes the
// socket, the pid file, the ready file and the shared memory file or object
// if it created them. Exit status: 0 after a signal, 1 failure, 2 bad usage.
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "cli_common.hpp"
#include "ivshmem_server_lib.hpp"

namespace uvirtio::apps {
namespace {

namespace iv = ivshmem;

std::atomic<iv::Server*> g_server{nullptr};
static_assert(std::atomic<iv::Server*>::is_always_lock_free);

void on_signal(int) {
  if (iv::Server* s = g_server.load()) s->request_stop();
}

const char* kUsageText =
    "usage: uvirtio-ivshmem-server [-S SOCKET] [-l SIZE] [-n VECTORS] [-m FILE | -M NAME]\n"
    "                              [-p PIDFILE] [--ready-file FILE] [-v]\n"
    "An ivshmem server for QEMU's ivshmem-doorbell device. Start QEMU with\n"
    "  -chardev socket,path=SOCKET,id=c -device ivshmem-doorbell,chardev=c,vectors=VECTORS\n"
    "(VECTORS as given here). Runs in the foreground until SIGINT, SIGTERM or SIGHUP.\n";

std::string human_size(std::uint64_t n) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (u < 4 && n >= 1024 && n % 1024 == 0) {
    n /= 1024;
    ++u;
  }
  return std::to_string(n) + " " + units[u];
}

// Writes text to path through a temporary file and rename(), so a reader
// never sees a partial file.
Result<void> write_file_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  iv::UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd.valid()) return Error::from_errno(errno, path, "write", "create " + tmp);
  if (::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return Error::from_errno(err, path, "write");
  }
  fd.reset();
  if (::rename(tmp.c_str(), path.c_str()) < 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return Error::from_errno(err, path, "write", "rename from " + tmp);
  }
  return ok();
}

void set_signal_mask(int how) {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&set, sig);
  sigprocmask(how, &set, nullptr);
}

int run(int argc, char** argv) {
  po::options_description desc("options");
  desc.add_options()("help,h", "show this help")(
      "socket,S", po::value<std::string>()->value_name("PATH")->default_value(iv::kDefaultSocket),
      "the Unix socket to listen on; a stale socket file there is removed, a live one is an error")(
      "size,l", po::value<std::string>()->value_name("SIZE")->default_value("4M"),
      "shared memory size in bytes, suffix K, M, G or T allowed; a power of two, at least 4K")(
      "vectors,n", po::value<std::string>()->value_name("N")->default_value("1"),
      "interrupt vectors (eventfds) per peer, 1..1024; must match the device's vectors=")(
      "shm-path,m", po::value<std::string>()->value_name("FILE"),
      "back the memory with FILE (e.g. in /dev/shm); created if missing (and then removed at exit), "
      "an existing one must be empty or have SIZE bytes. Default: an anonymous memfd")(
      "shm-name,M", po::value<std::string>()->value_name("NAME"),
      "back the memory with the POSIX shared memory object NAME (shm_open), same rules as -m")(
      "foreground,F",
      "accepted for compatibility with QEMU's server; this server always runs in the foreground")(
      "pidfile,p", po::value<std::string>()->value_name("FILE"),
      "write the process id to FILE (removed at exit)")(
      "ready-file", po::value<std::string>()->value_name("FILE"),
      "create FILE (holding the process id) once the socket listens (removed at exit)")(
      "verbose,v", "log peers joining and leaving to stderr");
  po::options_description hidden;
  hidden.add_options()("extra", po::value<std::vector<std::string>>());
  po::options_description all;
  all.add(desc).add(hidden);
  po::positional_options_description pos;
  pos.add("extra", -1);
  const std::vector<std::string> args(argv + 1, argv + argc);
  auto vm = parse(args, all, pos);
  if (vm.count("extra"))
    throw UsageError{"unexpected argument '" + vm["extra"].as<std::vector<std::string>>().front() +
                     "' (the server takes only options; see --help)"};
  if (vm.count("help")) {
    std::cout << kUsageText << desc;
    return 0;
  }

  iv::ServerOptions o;
  o.socket_path = vm["socket"].as<std::string>();
  const std::string size_text = vm["size"].as<std::string>();
  const auto size = iv::parse_size(size_text);
  if (!size)
    throw UsageError{"--size: '" + size_text +
                     "' is not a size (an integer with an optional K, M, G or T suffix)"};
  o.shm_size = *size;
  const std::uint64_t vectors = parse_u64(vm["vectors"].as<std::string>(), "--vectors");
  if (vectors < 1 || vectors > iv::kMaxVectors)
    throw UsageError{"--vectors: must be 1.." + std::to_string(iv::kMaxVectors)};
  o.vectors = static_cast<unsigned>(vectors);
  if (vm.count("shm-path")) o.shm_file = vm["shm-path"].as<std::string>();
  if (vm.count("shm-name")) o.shm_name = vm["shm-name"].as<std::string>();
  // An empty name would silently fall back to an anonymous memfd.
  if (vm.count("shm-path") && o.shm_file.empty()) throw UsageError{"--shm-path: the path is empty"};
  if (vm.count("shm-name") && o.shm_name.empty()) throw UsageError{"--shm-name: the name is empty"};
  o.verbose = vm.count("verbose") > 0;
  const std::string pidfile = vm.count("pidfile") ? vm["pidfile"].as<std::string>() : "";
  const std::string ready_file = vm.count("ready-file") ? vm["ready-file"].as<std::string>() : "";
  if (auto r = iv::validate(o); !r) throw UsageError{r.error().message()};
  if (pidfile.empty() && vm.count("pidfile")) throw UsageError{"--pidfile: the path is empty"};
  if (ready_file.empty() && vm.count("ready-file")) throw UsageError{"--ready-file: the path is empty"};

  // Each peer costs a socket and one eventfd per vector: allow as many
  // descriptors as the hard limit does.
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &lim);
  }
  std::signal(SIGPIPE, SIG_IGN);
  // A signal before the handlers are in place must not leave the socket
  // behind: hold them until the server can be stopped cleanly.
  set_signal_mask(SIG_BLOCK);
  auto srv = iv::Server::start(o);
  if (!srv) return fail(srv.error());
  g_server.store(srv->get());
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &sa, nullptr);

  auto cleanup = [&] {
    set_signal_mask(SIG_BLOCK);
    g_server.store(nullptr);
    srv->reset();
    if (!pidfile.empty()) ::unlink(pidfile.c_str());
    if (!ready_file.empty()) ::unlink(ready_file.c_str());
  };
  const std::string pid_text = std::to_string(::getpid()) + "\n";
  for (const auto* f : {&pidfile, &ready_file}) {
    if (f->empty()) continue;
    if (auto r = write_file_atomically(*f, pid_text); !r) {
      cleanup();
      return fail(r.error());
    }
  }
  const std::string backing = !o.shm_file.empty()   ? "file " + o.shm_file
                              : !o.shm_name.empty() ? "POSIX shm " + o.shm_name
                                                    : "anonymous memfd";
  std::printf("listening on %s (%s shared memory, %s; %u vector%s)\n", o.socket_path.c_str(),
              human_size(o.shm_size).c_str(), backing.c_str(), o.vectors, o.vectors == 1 ? "" : "s");
  std::fflush(stdout);
  set_signal_mask(SIG_UNBLOCK);

  auto r = (*srv)->run();
  if (o.verbose) std::cerr << "uvirtio-ivshmem-server: stopping\n";
  cleanup();
  if (!r) return fail(r.error());
  return 0;
}

}  // namespace
}  // namespace uvirtio::apps

int main(int argc, char** argv) {
  return uvirtio::apps::tool_main("uvirtio-ivshmem-server", argc, argv, uvirtio::apps::run);
}
