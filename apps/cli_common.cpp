// Shared pieces of the command-line tools (see cli_common.hpp).
#include "cli_common.hpp"

#include <cerrno>
#include <cstdlib>

namespace uvirtio::apps {

std::uint64_t parse_u64(const std::string& text, const std::string& what) {
  if (text.empty() || text[0] == '-')
    throw UsageError{what + ": '" + text + "' is not a non-negative integer"};
  errno = 0;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(text.c_str(), &end, 0);
  if (errno != 0 || end == text.c_str() || *end != '\0')
    throw UsageError{what + ": '" + text + "' is not a non-negative integer (decimal or 0x hex)"};
  return v;
}

int tool_main(const char* program, int argc, char** argv, int (*run)(int, char**)) {
  g_program = program;
  try {
    return run(argc, argv);
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
