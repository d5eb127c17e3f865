// Parsing and printing of PCI addresses.
#include "uvirtio/pci/bdf.hpp"

#include <cstdio>

namespace uvirtio::pci {
namespace {

// A hex field of 1..max_digits digits whose value is at most max.
bool parse_hex(std::string_view s, std::size_t max_digits, unsigned max, unsigned& out) {
  if (s.empty() || s.size() > max_digits) return false;
  unsigned v = 0;
  for (char c : s) {
    unsigned d;
    if (c >= '0' && c <= '9')
      d = static_cast<unsigned>(c - '0');
    else if (c >= 'a' && c <= 'f')
      d = static_cast<unsigned>(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F')
      d = static_cast<unsigned>(c - 'A' + 10);
    else
      return false;
    v = v * 16 + d;
  }
  if (v > max) return false;
  out = v;
  return true;
}

}  // namespace

Result<Bdf> Bdf::parse(std::string_view text) {
  auto bad = [&] {
    return Error(Errc::invalid_argument, std::string(text), "parse PCI address",
                 "expected DDDD:BB:DD.F or BB:DD.F in hex, e.g. 0000:00:03.0");
  };
  std::string_view rest = text;
  unsigned domain = 0, bus = 0, dev = 0, fn = 0;
  auto c1 = rest.find(':');
  if (c1 == std::string_view::npos) return bad();
  auto c2 = rest.find(':', c1 + 1);
  if (c2 != std::string_view::npos) {
    if (!parse_hex(rest.substr(0, c1), 4, 0xffff, domain)) return bad();
    rest = rest.substr(c1 + 1);
    c1 = rest.find(':');
  }
  auto dot = rest.find('.');
  if (dot == std::string_view::npos || dot < c1) return bad();
  if (!parse_hex(rest.substr(0, c1), 2, 0xff, bus) ||
      !parse_hex(rest.substr(c1 + 1, dot - c1 - 1), 2, 31, dev) ||
      !parse_hex(rest.substr(dot + 1), 1, 7, fn) || rest.size() - dot - 1 != 1)
    return bad();
  return Bdf{static_cast<std::uint16_t>(domain), static_cast<std::uint8_t>(bus),
             static_cast<std::uint8_t>(dev), static_cast<std::uint8_t>(fn)};
}

std::string Bdf::str() const {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%04x:%02x:%02x.%x", domain, bus, device, function);
  return buf;
}

}  // namespace uvirtio::pci
