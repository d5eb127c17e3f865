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
  }
}

}  // namespace uvirtio::apps
