// uvirtio blk: info, read, write and flush on a virtio-blk device.
#include <cerrno>
#include <cstring>
#include <iterator>

#include "cli_common.hpp"
#include "uvirtio/driver/blk.hpp"

namespace uvirtio::apps {
namespace {

const char* kBlkUsage =
    "usage: uvirtio blk info BDF [--json]\n"
    "       uvirtio blk read BDF --sector S [--count N] [--hex]   (N sectors, default one block)\n"
    "       uvirtio blk write BDF --sector S (--data TEXT | --file F) [--flush]   (a last, partial block "
    "keeps the rest of what the disk holds)\n"
    "       uvirtio blk flush BDF\n"
    "options for all: --poll; for read, write and flush: --timeout MS\n";

struct Parsed {
  po::variables_map vm;
  driver::BlkOptions opt;
  pci::Bdf bdf;
};

Parsed parse_blk(const std::vector<std::string>& args, const char* sub, po::options_description extra) {
  po::options_description desc(std::string("uvirtio blk ") + sub);
  desc.add_options()("help,h", "show help")("bdf", po::value<std::string>(), "PCI address")(
      "poll", "complete by polling");
  // `info` sends no request: a deadline there would be silently ignored.
  const bool requests = std::string(sub) != "info";
  if (requests) desc.add_options()("timeout", po::value<long long>()->default_value(10000), "deadline in ms");
  desc.add(extra);
  po::positional_options_description pos;
  pos.add("bdf", 1);
  Parsed p;
  p.vm = parse(args, desc, pos);
  if (p.vm.count("help")) {
    std::cout << desc;
    return p;
  }
  if (!p.vm.count("bdf"))
    throw UsageError{std::string("blk ") + sub + ": which device? (uvirtio blk " + sub + " BDF)"};
  p.bdf = parse_bdf_or_throw(p.vm["bdf"].as<std::string>());
  if (requests) {
    const long long timeout = p.vm["timeout"].as<long long>();
    if (timeout < 1 || timeout > 3600000) throw UsageError{"blk: --timeout must be 1..3600000 ms"};
    p.opt.timeout = std::chrono::milliseconds(timeout);
  }
  if (p.vm.count("poll")) p.opt.completion = driver::CompletionMode::polling;
  return p;
}

}  // namespace

int cmd_blk(const std::vector<std::string>& args) {
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::cout << kBlkUsage;
    return args.empty() ? kUsage : 0;
  }
  const std::string sub = args[0];
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  if (sub == "info" || sub == "flush") {
    po::options_description extra("options");
    if (sub == "info") extra.add_options()("json", "print JSON");  // flush prints one line
    auto p = parse_blk(rest, sub.c_str(), extra);
    if (p.vm.count("help")) return 0;
    auto blk = driver::Blk::open(p.bdf, p.opt);
    if (!blk) return fail(blk.error());
    if (sub == "flush") {
      if (auto r = (*blk)->flush(); !r) return fail(r.error());
      std::printf("%s: flushed\n", (*blk)->name().c_str());
      return 0;
    }
    json j = {{"bdf", (*blk)->name()},
              {"capacity_sectors", (*blk)->capacity_sectors()},
              {"block_size", (*blk)->block_size()},
              {"read_only", (*blk)->read_only()},
              {"features", (*blk)->features().describe(driver::blk_feature::name)}};
    if (p.vm.count("json"))
      print_json(j);
    else
      std::printf("%s: virtio-blk, %llu sectors (%llu MiB), %zu-byte blocks%s\n  features %s\n",
                  (*blk)->name().c_str(), static_cast<unsigned long long>((*blk)->capacity_sectors()),
                  static_cast<unsigned long long>((*blk)->capacity_sectors() / 2048), (*blk)->block_size(),
                  (*blk)->read_only() ? ", read-only" : "",
                  (*blk)->features().describe(driver::blk_feature::name).c_str());
    return 0;
  }
  if (sub == "read") {
    po::options_description extra("options");
    extra.add_options()("sector", po::value<std::string>(), "first sector")(
        "count", po::value<std::string>(), "sectors (1..8192; default: one logical block)")("hex",
                                                                                            "print hex");
    auto p = parse_blk(rest, "read", extra);
    if (p.vm.count("help")) return 0;
    if (!p.vm.count("sector")) throw UsageError{"blk read: --sector is required"};
    const std::uint64_t sector = parse_u64(p.vm["sector"].as<std::string>(), "--sector");
    std::uint64_t count = 0;  // 0: one logical block of the device (known once it is open)
    if (p.vm.count("count")) {
      count = parse_u64(p.vm["count"].as<std::string>(), "--count");
      if (count < 1 || count > 8192) throw UsageError{"blk read: --count must be 1..8192"};
    }
    auto blk = driver::Blk::open(p.bdf, p.opt);
    if (!blk) return fail(blk.error());
    if (count == 0) count = (*blk)->block_size() / driver::kSectorSize;
    std::vector<std::uint8_t> buf(count * driver::kSectorSize);
    if (auto r = (*blk)->read(sector, buf); !r) return fail(r.error());
    if (p.vm.count("hex")) {
      std::string out;
      for (auto b : buf) out += hex(b, 2);
      std::printf("%s\n", out.c_str());
    } else {
      std::fwrite(buf.data(), 1, buf.size(), stdout);
    }
    // A short write (a full disk, a closed pipe) is an error, in either form.
    if (std::fflush(stdout) != 0 || std::ferror(stdout))
      return fail(Error::from_errno(errno, (*blk)->name(), "read", "write the data to standard output"));
    return 0;
  }
  if (sub == "write") {
    po::options_description extra("options");
    extra.add_options()("sector", po::value<std::string>(), "first sector")(
        "data", po::value<std::string>(), "text")("file", po::value<std::string>(), "file to write")(
        "flush", "flush after writing");
    auto p = parse_blk(rest, "write", extra);
    if (p.vm.count("help")) return 0;
    if (!p.vm.count("sector")) throw UsageError{"blk write: --sector is required"};
    if (p.vm.count("data") == p.vm.count("file"))
      throw UsageError{"blk write: give exactly one of --data or --file"};
    const std::uint64_t sector = parse_u64(p.vm["sector"].as<std::string>(), "--sector");
    std::vector<std::uint8_t> bytes;
    if (p.vm.count("data")) {
      const auto& d = p.vm["data"].as<std::string>();
      bytes.assign(d.begin(), d.end());
    } else {
      auto file = read_input_file(p.vm["file"].as<std::string>(), kMaxWriteFile, "blk write --file");
      if (!file) return fail(file.error());
      bytes = std::move(file).value();
    }
    if (bytes.empty()) throw UsageError{"blk write: nothing to write"};
    auto blk = driver::Blk::open(p.bdf, p.opt);
    if (!blk) return fail(blk.error());
    // The device writes whole logical blocks. A last, partial block is read
    // first and only the user's bytes replaced, as a write through the
    // kernel's block layer would do: padding it with zeros would wipe up
    // to a whole block (4 KiB on some disks) the user never wrote. A
    // misaligned start is left to write(), which refuses it.
    const std::size_t block = (*blk)->block_size();
    const std::size_t whole = bytes.size() / block * block;
    std::size_t kept = 0;
    if (whole != bytes.size() && sector % (block / driver::kSectorSize) == 0) {
      std::vector<std::uint8_t> last(block);
      const std::uint64_t last_sector = sector + whole / driver::kSectorSize;
      if (last_sector < sector)
        return fail(Error(Errc::invalid_argument, (*blk)->name(), "write", "--sector overflows"));
      if (auto r = (*blk)->read(last_sector, last); !r)
        return fail(r.error().within("write: read the last, partial block to keep the rest of it"));
      kept = block - (bytes.size() - whole);
      std::copy(bytes.begin() + static_cast<std::ptrdiff_t>(whole), bytes.end(), last.begin());
      bytes.resize(whole);
      bytes.insert(bytes.end(), last.begin(), last.end());
    } else {
      bytes.resize((bytes.size() + block - 1) / block * block, 0);
    }
    if (auto r = (*blk)->write(sector, bytes); !r) return fail(r.error());
    if (p.vm.count("flush"))
      if (auto r = (*blk)->flush(); !r) return fail(r.error());
    std::printf(
        "%s: wrote %zu sectors at %llu%s%s\n", (*blk)->name().c_str(), bytes.size() / driver::kSectorSize,
        static_cast<unsigned long long>(sector),
        kept != 0 ? (", the last block's other " + std::to_string(kept) + " bytes as they were").c_str() : "",
        p.vm.count("flush") ? " (flushed)" : "");
    return 0;
  }
  throw UsageError{"blk: unknown subcommand '" + sub + "' (info, read, write, flush)"};
}

}  // namespace uvirtio::apps
