// uvirtio: the command-line tool.
//
//   uvirtio list [--json] [--type T] [-q] virtio functions with ids, type, driver, IOMMU group
//   uvirtio bind (BDF... | --all)         hand functions to vfio-pci
//   uvirtio unbind (BDF... | --all)       give them back to their previous driver
//   uvirtio caps BDF [--json]             PCI and virtio capabilities
//   uvirtio rng read BDF -n N [--poll]    N bytes of entropy from a virtio-rng device, in hex
//
// Exit status: 0 success, 1 the operation failed, 2 bad usage.
#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_common.hpp"
#include "sysfs_config.hpp"
#include "uvirtio/driver/rng.hpp"
#include "uvirtio/pci/binding.hpp"
#include "uvirtio/pci/caps.hpp"
#include "uvirtio/pci/discovery.hpp"

using namespace uvirtio;
using namespace uvirtio::apps;

namespace {

const char* kUsageText =
    "usage: uvirtio COMMAND [options]\n"
    "commands:\n"
    "  list [--json] [--type T] [--driver D] [-q]   virtio PCI functions: BDF, ids, type, driver, group\n"
    "  bind (BDF... | --all)          bind functions to vfio-pci (--all: every virtio and ivshmem function\n"
    "                                 no other driver holds)\n"
    "  unbind (BDF... | --all)        give functions back to the driver they had before bind\n"
    "  caps BDF [--json]              PCI and virtio capabilities of a function\n"
    "  rng read BDF -n N [--poll]     read N bytes of entropy from a virtio-rng device (hex)\n"
    "  pmem info BDF [--json]         virtio-pmem features, range and mapping mode\n"
    "  pmem write BDF --offset O (--data S | --file F) [--persist]\n"
    "  pmem read BDF --offset O --length L [--hex]\n"
    "  pmem flush BDF                 one (coalesced) device flush\n"
    "  pmem bench BDF [--threads T]... [--json]   persist latency and throughput\n"
    "  blk info|read|write|flush BDF ...   virtio-blk (see 'uvirtio blk --help')\n"
    "run 'uvirtio COMMAND --help' for a command's options\n";

// ---- list -------------------------------------------------------------------

int cmd_list(const std::vector<std::string>& args) {
  po::options_description desc("uvirtio list");
  desc.add_options()("help,h", "show help")("json", "print JSON")("all",
                                                                  "list every PCI function, not only virtio")(
      "type", po::value<std::string>(), "only virtio functions of this type (entropy, pmem, block, ...)")(
      "quiet,q", "print only the BDFs, one a line (for scripts)")(
      "driver", po::value<std::string>(), "only functions bound to this driver ('none': unbound)");
  auto vm = parse(args, desc, {});
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  if (vm.count("json") && vm.count("quiet")) throw UsageError{"list: --json and --quiet are alternatives"};
  // --type keeps only virtio and ivshmem functions, which are listed anyway.
  if (vm.count("all") && vm.count("type"))
    throw UsageError{"list: --all and --type are alternatives (--type lists only functions of that type)"};
  if (vm.count("type")) {
    // A misspelt type would list nothing, which reads as "no such device".
    const std::string want = vm["type"].as<std::string>();
    std::string known = "ivshmem";
    bool ok = want == "ivshmem";
    for (std::uint16_t id = 1; id < 64; ++id) {
      const std::string name = pci::virtio_device_name(id);
      if (name == "unknown") continue;
      ok = ok || name == want;
      known += ", " + name;
    }
    if (!ok) throw UsageError{"list: --type: unknown type '" + want + "' (" + known + ")"};
  }
  auto fns = pci::enumerate_functions();
  if (!fns) return fail(fns.error());
  json out = json::array();
  for (const auto& f : *fns) {
    auto type = pci::virtio_device_id(f);
    const bool ivshmem = pci::is_ivshmem(f);
    if (!type && !ivshmem && !vm.count("all")) continue;
    if (vm.count("type")) {
      const std::string want = vm["type"].as<std::string>();
      if (ivshmem ? want != "ivshmem" : (!type || want != pci::virtio_device_name(*type))) continue;
    }
    if (vm.count("driver")) {
      const std::string want = vm["driver"].as<std::string>();
      if (f.driver != (want == "none" ? std::string() : want)) continue;
    }
    json j = {{"bdf", f.bdf.str()},
              {"vendor", hex(f.vendor, 4)},
              {"device", hex(f.device, 4)},
              {"subsystem_vendor", hex(f.subsys_vendor, 4)},
              {"subsystem_device", hex(f.subsys_device, 4)},
              {"class", hex(f.class_code, 6)},
              {"revision", f.revision},
              {"driver", f.driver},
              {"iommu_group", f.iommu_group ? json(*f.iommu_group) : json(nullptr)}};
    if (type) {
      j["virtio_type"] = *type;
      j["virtio_name"] = pci::virtio_device_name(*type);
      j["modern"] = pci::is_modern_virtio(f);
    }
    if (ivshmem) j["ivshmem"] = true;
    out.push_back(j);
  }
  if (vm.count("json")) {
    print_json(out);
    return 0;
  }
  if (vm.count("quiet")) {
    for (const auto& j : out) std::printf("%s\n", j["bdf"].get<std::string>().c_str());
    return 0;
  }
  std::printf("%-13s %-9s %-9s %-10s %-10s %s\n", "BDF", "ID", "SUBSYS", "TYPE", "DRIVER", "IOMMU_GROUP");
  for (const auto& j : out) {
    std::string type = j.contains("virtio_name") ? j["virtio_name"].get<std::string>()
                       : j.contains("ivshmem")   ? "ivshmem"
                                                 : "-";
    if (j.contains("modern") && !j["modern"].get<bool>()) type += "(t)";
    std::string drv = j["driver"].get<std::string>();
    std::string group = j["iommu_group"].is_null() ? "-" : std::to_string(j["iommu_group"].get<unsigned>());
    std::printf("%-13s %s:%s %s:%s %-10s %-10s %s\n", j["bdf"].get<std::string>().c_str(),
                j["vendor"].get<std::string>().c_str(), j["device"].get<std::string>().c_str(),
                j["subsystem_vendor"].get<std::string>().c_str(),
                j["subsystem_device"].get<std::string>().c_str(), type.c_str(),
                drv.empty() ? "-" : drv.c_str(), group.c_str());
  }
  return 0;
}

// ---- bind / unbind -------------------------------------------------------------

std::vector<pci::Bdf> targets(const po::variables_map& vm, const char* cmd) {
  std::vector<pci::Bdf> out;
  const bool all = vm.count("all") != 0;
  const bool some = vm.count("bdf") != 0;
  if (all == some) throw UsageError{std::string(cmd) + ": give one or more BDFs or --all (not both)"};
  if (some) {
    for (const auto& s : vm["bdf"].as<std::vector<std::string>>()) {
      pci::Bdf bdf = parse_bdf_or_throw(s);
      // 00:03.0 and 0000:00:03.0 are one function: a second pass would only
      // fail (unbind) or report "already bound" after the fact.
      for (const auto& seen : out)
        if (seen == bdf) throw UsageError{std::string(cmd) + ": " + bdf.str() + " is given twice"};
      out.push_back(bdf);
    }
    return out;
  }
  auto fns = pci::enumerate_functions();
  if (!fns) throw fns.error();
  for (const auto& f : *fns)
    if (pci::virtio_device_id(f) || pci::is_ivshmem(f)) out.push_back(f.bdf);
  return out;
}

int cmd_bind(const std::vector<std::string>& args, bool bind) {
  const char* name = bind ? "bind" : "unbind";
  po::options_description desc(std::string("uvirtio ") + name + " (BDF... | --all)");
  desc.add_options()("help,h", "show help")(
      "all",
      bind ? "every virtio and ivshmem function no other driver holds" : "every function bound to vfio-pci")(
      "bdf", po::value<std::vector<std::string>>(), "PCI address");
  po::positional_options_description pos;
  pos.add("bdf", -1);
  auto vm = parse(args, desc, pos);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  std::vector<pci::Bdf> list;
  try {
    list = targets(vm, name);
  } catch (const Error& e) {
    return fail(e);
  }
  int rc = 0;
  unsigned done = 0;
  unsigned left = 0;
  for (const auto& bdf : list) {
    if (bind) {
      // --all takes only functions no other driver holds: one a kernel
      // driver owns may be in use (the guest's own disk or NIC). Naming
      // its address takes it anyway.
      if (vm.count("all")) {
        const std::string held = pci::sysfs_driver(bdf, pci::Os::system());
        if (!held.empty() && held != "vfio-pci") {
          std::printf("%s: left with %s (give its address to take it from that driver)\n", bdf.str().c_str(),
                      held.c_str());
          ++left;
          continue;
        }
      }
      auto r = pci::bind_vfio(bdf);
      if (!r) {
        rc = fail(r.error());
        continue;
      }
      if (!r->changed)
        std::printf("%s: already bound to vfio-pci\n", bdf.str().c_str());
      else
        std::printf("%s: bound to vfio-pci (was %s)\n", bdf.str().c_str(),
                    r->previous_driver.empty() ? "unbound" : r->previous_driver.c_str());
    } else {
      if (vm.count("all") && pci::sysfs_driver(bdf, pci::Os::system()) != "vfio-pci") continue;
      ++done;
      auto r = pci::unbind_vfio(bdf);
      if (!r) {
        rc = fail(r.error());
        continue;
      }
      std::printf("%s: unbound from vfio-pci (now %s)\n", bdf.str().c_str(),
                  r->empty() ? "unbound" : r->c_str());
    }
  }
  if (list.empty() && vm.count("all"))
    std::printf("no virtio functions found\n");
  else if (bind && left == list.size())
    std::printf("every virtio and ivshmem function is held by another driver: nothing bound\n");
  else if (!bind && vm.count("all") && done == 0)
    std::printf("no virtio or ivshmem function is bound to vfio-pci: nothing to unbind\n");
  return rc;
}

// ---- caps -------------------------------------------------------------------------

const char* std_cap_name(unsigned id) {
  switch (id) {
    case 0x01:
      return "power-management";
    case 0x05:
      return "msi";
    case 0x09:
      return "vendor";
    case 0x10:
      return "pci-express";
    case 0x11:
      return "msi-x";
    default:
      return "other";
  }
}

int cmd_caps(const std::vector<std::string>& args) {
  po::options_description desc("uvirtio caps BDF");
  desc.add_options()("help,h", "show help")("json", "print JSON")("bdf", po::value<std::string>(),
                                                                  "PCI address");
  po::positional_options_description pos;
  pos.add("bdf", 1);
  auto vm = parse(args, desc, pos);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  if (!vm.count("bdf")) throw UsageError{"caps: which function? (uvirtio caps BDF)"};
  const pci::Bdf bdf = parse_bdf_or_throw(vm["bdf"].as<std::string>());
  auto snap = apps::read_sysfs_snapshot(bdf);
  if (!snap) return fail(snap.error());
  auto caps = pci::parse_capabilities(snap->config, snap->bar_sizes, bdf.str());
  if (!caps) return fail(caps.error());
  json j;
  j["bdf"] = bdf.str();
  j["list"] = json::array();
  for (const auto& c : caps->list) {
    json e = {{"offset", c.offset}, {"id", c.id}, {"extended", c.extended}};
    if (!c.extended) e["name"] = std_cap_name(c.id);
    if (c.id == 0x09 && !c.extended) {
      e["virtio_cfg_type"] = c.virtio_cfg_type;
      e["virtio_name"] = pci::virtio_cfg_type_name(c.virtio_cfg_type);
    }
    j["list"].push_back(e);
  }
  j["virtio"] = json::object();
  auto put = [&](const char* name, const std::optional<pci::VirtioRegion>& r) {
    if (!r) return;
    j["virtio"][name] = {
        {"cap_offset", r->cap_offset}, {"bar", r->bar}, {"offset", r->offset}, {"length", r->length}};
  };
  put("common", caps->common);
  put("notify", caps->notify);
  put("isr", caps->isr);
  put("device", caps->device);
  put("pci_cfg", caps->pci_cfg);
  if (caps->notify) j["virtio"]["notify"]["multiplier"] = caps->notify_off_multiplier;
  j["virtio"]["shared_memory"] = json::array();
  for (const auto& s : caps->shm)
    j["virtio"]["shared_memory"].push_back({{"id", s.id},
                                            {"cap_offset", s.region.cap_offset},
                                            {"bar", s.region.bar},
                                            {"offset", s.region.offset},
                                            {"length", s.region.length}});
  if (caps->msix)
    j["msix"] = {{"cap_offset", caps->msix->cap_offset}, {"vectors", caps->msix->table_size},
                 {"table_bar", caps->msix->table_bar},   {"table_offset", caps->msix->table_offset},
                 {"pba_bar", caps->msix->pba_bar},       {"pba_offset", caps->msix->pba_offset}};
  j["warnings"] = caps->warnings;
  if (vm.count("json")) {
    print_json(j);
    return 0;
  }
  std::printf("%s capabilities (walk order):\n", bdf.str().c_str());
  for (const auto& c : caps->list) {
    if (c.extended) {
      std::printf("  [ext 0x%03x] id 0x%04x\n", c.offset, c.id);
    } else if (c.id == 0x09) {
      std::printf("  [0x%02x] vendor: virtio %s\n", c.offset, pci::virtio_cfg_type_name(c.virtio_cfg_type));
    } else {
      std::printf("  [0x%02x] %s (0x%02x)\n", c.offset, std_cap_name(c.id), c.id);
    }
  }
  std::printf("virtio structures in use:\n");
  for (const char* name : {"common", "notify", "isr", "device", "pci_cfg"}) {
    if (!j["virtio"].contains(name)) continue;
    const auto& r = j["virtio"][name];
    std::printf("  %-8s cap@0x%02x BAR%u +0x%llx len 0x%llx", name, r["cap_offset"].get<unsigned>(),
                r["bar"].get<unsigned>(), r["offset"].get<unsigned long long>(),
                r["length"].get<unsigned long long>());
    if (r.contains("multiplier")) std::printf(" multiplier %u", r["multiplier"].get<unsigned>());
    std::printf("\n");
  }
  for (const auto& s : caps->shm)
    std::printf("  shm id %u BAR%u +0x%llx len 0x%llx\n", s.id, s.region.bar,
                static_cast<unsigned long long>(s.region.offset),
                static_cast<unsigned long long>(s.region.length));
  if (caps->msix)
    std::printf("  msi-x    %u vectors, table BAR%u +0x%x, PBA BAR%u +0x%x\n", caps->msix->table_size,
                caps->msix->table_bar, caps->msix->table_offset, caps->msix->pba_bar, caps->msix->pba_offset);
  for (const auto& w : caps->warnings) std::printf("warning: %s\n", w.c_str());
  return 0;
}

// ---- rng --------------------------------------------------------------------------

int cmd_rng(const std::vector<std::string>& args) {
  if (args.empty() || args[0] != "read") {
    if (!args.empty() && (args[0] == "--help" || args[0] == "-h")) {
      std::cout << "usage: uvirtio rng read BDF -n N [--poll] [--timeout MS]\n";
      return 0;
    }
    throw UsageError{"rng: the only subcommand is 'read' (uvirtio rng read BDF -n N)"};
  }
  po::options_description desc("uvirtio rng read BDF -n N");
  desc.add_options()("help,h", "show help")("bdf", po::value<std::string>(), "PCI address")(
      "bytes,n", po::value<std::string>(), "how many bytes (1..1048576)")(
      "poll", "complete by polling, not interrupts")("timeout", po::value<long long>()->default_value(5000),
                                                     "per-request deadline in ms")(
      "no-iommu", "the group is a no-IOMMU group (unsafe)");
  po::positional_options_description pos;
  pos.add("bdf", 1);
  auto vm = parse({args.begin() + 1, args.end()}, desc, pos);
  if (vm.count("help")) {
    std::cout << desc;
    return 0;
  }
  if (!vm.count("bdf")) throw UsageError{"rng read: which device? (uvirtio rng read BDF -n N)"};
  if (!vm.count("bytes")) throw UsageError{"rng read: how many bytes? (-n N)"};
  const std::uint64_t n = parse_u64(vm["bytes"].as<std::string>(), "rng read: -n");
  if (n < 1 || n > (1 << 20))
    throw UsageError{"rng read: -n must be between 1 and 1048576, got " + std::to_string(n)};
  const long long timeout = vm["timeout"].as<long long>();
  if (timeout < 1 || timeout > 3600000) throw UsageError{"rng read: --timeout must be 1..3600000 ms"};
  const pci::Bdf bdf = parse_bdf_or_throw(vm["bdf"].as<std::string>());
  driver::RngOptions opt;
  opt.completion = vm.count("poll") ? driver::CompletionMode::polling : driver::CompletionMode::interrupt;
  opt.timeout = std::chrono::milliseconds(timeout);
  if (vm.count("no-iommu")) opt.open.iommu = pci::IommuMode::noiommu;
  auto rng = driver::Rng::open(bdf, opt);
  if (!rng) return fail(rng.error());
  std::vector<std::uint8_t> buf(static_cast<std::size_t>(n));
  if (auto r = (*rng)->read(buf); !r) return fail(r.error());
  std::string out;
  out.reserve(buf.size() * 2 + 1);
  for (auto b : buf) out += hex(b, 2);
  std::printf("%s\n", out.c_str());
  return 0;
}

}  // namespace

namespace {

int run(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsageText;
    return kUsage;
  }
  const std::string cmd = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  try {
    if (cmd == "list") return cmd_list(args);
    if (cmd == "bind") return cmd_bind(args, true);
    if (cmd == "unbind") return cmd_bind(args, false);
    if (cmd == "caps") return cmd_caps(args);
    if (cmd == "rng") return cmd_rng(args);
    if (cmd == "pmem") return cmd_pmem(args);
    if (cmd == "blk") return cmd_blk(args);
    if (cmd == "-h" || cmd == "--help" || cmd == "help") {
      std::cout << kUsageText;
      return 0;
    }
    std::cerr << "uvirtio: unknown command '" << cmd << "'\n" << kUsageText;
    return kUsage;
  } catch (const po::error& e) {
    std::cerr << "uvirtio " << cmd << ": " << e.what() << " (see 'uvirtio " << cmd << " --help')\n";
    return kUsage;
  }
}

}  // namespace

int main(int argc, char** argv) { return tool_main("uvirtio", argc, argv, run); }
