// Shared pieces of the command-line tools (see cli_common.hpp).
#include "cli_common.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace uvirtio::apps {

std::optional<std::uint64_t> read_u64(const std::string& text, bool* too_large) {
  // from_chars: no octal for a leading 0, as strtoull's base 0 would read
  // "010", and no blanks or sign.
  const bool hex = text.size() > 2 && text[0] == '0' && (text[1] == 'x' || text[1] == 'X');
  const char* first = text.data() + (hex ? 2 : 0);
  const char* last = text.data() + text.size();
  std::uint64_t v = 0;
  const auto [end, ec] = std::from_chars(first, last, v, hex ? 16 : 10);
  if (too_large != nullptr) *too_large = ec == std::errc::result_out_of_range;
  if (ec != std::errc{} || end != last) return std::nullopt;
  return v;
}

std::uint64_t parse_u64(const std::string& text, const std::string& what) {
  bool too_large = false;
  const auto v = read_u64(text, &too_large);
  if (!v)
    throw UsageError{what + ": '" + text + "' is not a non-negative integer (decimal or 0x hex)" +
                     (too_large ? " below 2^64" : "")};
  return *v;
}

double parse_seconds(double value, const std::string& what) {
  if (!std::isfinite(value) || value < 0.01 || value > 600)
    throw UsageError{what + ": " + std::to_string(value) + " is not a duration in seconds from 0.01 to 600"};
  return value;
}

Result<std::vector<std::uint8_t>> read_input_file(const std::string& path, std::uint64_t max_bytes,
                                                  const std::string& op) {
  const auto err = [&](int e, const std::string& what) {
    return Error(Errc::io, path, op, what + ": " + std::strerror(e));
  };
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return err(errno, "cannot open");
  std::vector<std::uint8_t> bytes;
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    return err(e, "cannot stat");
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    return Error(Errc::invalid_argument, path, op, "is a directory");
  }
  // Read at most one byte past the limit, so a file (or pipe) that is too
  // large is refused without reading it all into memory.
  for (;;) {
    const std::size_t chunk = 1 << 16;
    const std::size_t have = bytes.size();
    bytes.resize(have + chunk);
    const ssize_t n = ::read(fd, bytes.data() + have, chunk);
    if (n < 0 && errno == EINTR) {
      bytes.resize(have);
      continue;
    }
    if (n < 0) {
      const int e = errno;
      ::close(fd);
      return err(e, "read failed");
    }
    bytes.resize(have + static_cast<std::size_t>(n));
    if (n == 0) break;
    if (bytes.size() > max_bytes) {
      ::close(fd);
      return Error(Errc::invalid_argument, path, op,
                   "larger than this command's limit of " + std::to_string(max_bytes) + " bytes");
    }
  }
  ::close(fd);
  return bytes;
}

int tool_main(const char* program, int argc, char** argv, int (*run)(int, char**)) {
  g_program = program;
  try {
    return finish_stdout(run(argc, argv));
  } catch (const UsageError& e) {
    std::cerr << program << ": " << e.what << "\n";
    return kUsage;
  } catch (const boost::program_options::error& e) {
    std::cerr << program << ": " << e.what() << "\n";
    return kUsage;
  } catch (const std::exception& e) {
    std::cerr << program << ": internal error: " << e.what() << "\n";
    return kFail;
  }
}

int finish_stdout(int status) {
  // Output that could not be written is output lost: a listing or a read
  // redirected to a full disk or a closed descriptor must not exit 0.
  std::cout.flush();
  errno = 0;
  const bool flush_failed = std::fflush(stdout) != 0;
  const int e = errno;
  if (!flush_failed && !std::ferror(stdout) && std::cout) return status;
  // A write that failed earlier left no errno behind; say what it means.
  std::cerr << g_program << ": write standard output: "
            << (flush_failed && e != 0
                    ? std::strerror(e)
                    : "some output was not written (disk full, or standard output closed?)")
            << "\n";
  return status == 0 ? kFail : status;
}

void print_json(const json& j) { std::cout << j.dump(2, ' ', false, json::error_handler_t::replace) << "\n"; }

int run_command(int argc, char** argv, const char* usage,
                const std::vector<std::pair<std::string, Command>>& commands) {
  if (argc < 2 || std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help") {
    std::cout << usage;
    return argc < 2 ? kUsage : 0;
  }
  const std::string cmd = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  for (const auto& [name, fn] : commands)
    if (name == cmd) return fn(args);
  throw UsageError{"unknown command '" + cmd + "' (see --help)"};
}

std::string pmem_recovery_note(std::uint64_t recoveries) {
  if (recoveries == 0) return "";
  return "the device was reset and a flush sent again (" + std::to_string(recoveries) +
         (recoveries == 1 ? " time)" : " times)");
}

}  // namespace uvirtio::apps
