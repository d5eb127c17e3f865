// Shared pieces of the uvirtio command-line tool: usage errors, option
// parsing, printing errors.
#pragma once

#include <boost/program_options.hpp>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "uvirtio/base/result.hpp"
#include "uvirtio/pci/bdf.hpp"

namespace uvirtio::apps {
// A non-negative integer: decimal, or hex after 0x; a leading 0 is not
// octal; no sign or blanks. nullopt otherwise; `too_large` says whether it
// was only out of range. parse_u64() and the unsigned options use it.
std::optional<std::uint64_t> read_u64(const std::string& text, bool* too_large = nullptr);
}  // namespace uvirtio::apps

// Every `unsigned` option is read this way: boost's own reading (through
// lexical_cast) wraps a negative number, so "--size -4294967040" was 256.
// Found by argument-dependent lookup on boost::any from boost's typed_value
// (and its vector<unsigned> reader), and preferred to boost's template for
// its exact `int` last parameter.
namespace boost {
inline void validate(boost::any& v, const std::vector<std::string>& values, unsigned*, int) {
  program_options::validators::check_first_occurrence(v);
  const std::string& text = program_options::validators::get_single_string(values);
  const auto n = uvirtio::apps::read_u64(text);
  if (!n || *n > std::numeric_limits<unsigned>::max()) throw program_options::invalid_option_value(text);
  v = boost::any(static_cast<unsigned>(*n));
}
}  // namespace boost

namespace uvirtio::apps {

namespace po = boost::program_options;
using json = nlohmann::json;

inline constexpr int kFail = 1;
inline constexpr int kUsage = 2;
// The largest --file a write command reads (it is held in memory).
inline constexpr std::uint64_t kMaxWriteFile = std::uint64_t{1} << 30;

// Thrown by command parsers for bad usage; main prints it and exits 2.
struct UsageError {
  std::string what;
};

// The tool's name in messages ("uvirtio", "uvirtio-pmlog").
inline const char* g_program = "uvirtio";

inline int fail(const Error& e) {
  std::cerr << g_program << ": " << e.message() << "\n";
  return kFail;
}

inline std::string hex(unsigned v, int width) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%0*x", width, v);
  return buf;
}

inline pci::Bdf parse_bdf_or_throw(const std::string& text) {
  auto b = pci::Bdf::parse(text);
  if (!b) throw UsageError{b.error().message()};
  return *b;
}

inline po::variables_map parse(const std::vector<std::string>& args, const po::options_description& desc,
                               const po::positional_options_description& pos) {
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(desc).positional(pos).run(), vm);
  po::notify(vm);
  return vm;
}

// Prints `j` indented, one line per value. Strings that are not valid UTF-8
// (text from a device, a log, the host) are printed with U+FFFD in place of
// the bad bytes instead of making the JSON library throw.
void print_json(const json& j);

// Parses a non-negative integer option value (decimal, or hex after 0x;
// a leading 0 is not octal) or throws UsageError.
std::uint64_t parse_u64(const std::string& text, const std::string& what);
// A benchmark duration in seconds, finite and in [0.01, 600], or UsageError.
double parse_seconds(double value, const std::string& what);
// The contents of `path` (a file or a pipe; not a directory), at most
// `max_bytes`: an error naming the file, `op` and the cause otherwise.
Result<std::vector<std::uint8_t>> read_input_file(const std::string& path, std::uint64_t max_bytes,
                                                  const std::string& op);
// Flushes standard output; when anything written to it was lost (a full
// disk, a closed descriptor) says so and turns status 0 into 1.
int finish_stdout(int status);

// What a pmem tool says after a command whose flushes recovered from device
// resets (PmemOptions::recover_on_reset): "the device was reset and a flush
// sent again (N time[s])"; "" when there was none.
std::string pmem_recovery_note(std::uint64_t recoveries);

// main() of a tool: sets g_program, runs `run` and turns usage errors into
// a message and exit status 2, and any other exception into a message and
// exit status 1 (never an abort).
int tool_main(const char* program, int argc, char** argv, int (*run)(int, char**));

// Runs subcommand argv[1] of a tool with the arguments after it: no
// command prints `usage` to stdout with status 2, -h/--help with status 0,
// an unknown one is a UsageError.
using Command = std::function<int(const std::vector<std::string>&)>;
int run_command(int argc, char** argv, const char* usage,
                const std::vector<std::pair<std::string, Command>>& commands);

int cmd_pmem(const std::vector<std::string>& args);
int cmd_blk(const std::vector<std::string>& args);

}  // namespace uvirtio::apps
