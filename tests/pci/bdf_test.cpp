// Unit tests for PCI address parsing and printing (pci/bdf.hpp): the forms
// users type ("0000:00:03.0", "00:03.0") and sysfs prints.
#include "uvirtio/pci/bdf.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace uvirtio::pci {
namespace {

Bdf parse_ok(const std::string& text) {
  auto r = Bdf::parse(text);
  EXPECT_TRUE(r.ok()) << text << ": " << (r.ok() ? "" : r.error().message());
  return r.ok() ? *r : Bdf{0xdead, 0xee, 0x1f, 7};
}

TEST(BdfParse, FullForm) {
  EXPECT_EQ(parse_ok("0000:00:03.0"), (Bdf{0x0000, 0x00, 0x03, 0}));
  EXPECT_EQ(parse_ok("0001:3a:1f.7"), (Bdf{0x0001, 0x3a, 0x1f, 7}));
}

TEST(BdfParse, ShortFormMeansDomainZero) {
  EXPECT_EQ(parse_ok("00:03.0"), (Bdf{0, 0, 3, 0}));
  EXPECT_EQ(parse_ok("ff:1e.6"), (Bdf{0, 0xff, 0x1e, 6}));
}

TEST(BdfParse, HexIsCaseInsensitive) {
  EXPECT_EQ(parse_ok("ABCD:EF:1F.7"), (Bdf{0xabcd, 0xef, 0x1f, 7}));
  EXPECT_EQ(parse_ok("abcd:ef:1f.7"), (Bdf{0xabcd, 0xef, 0x1f, 7}));
  EXPECT_EQ(parse_ok("aBcD:eF:0a.3"), (Bdf{0xabcd, 0xef, 0x0a, 3}));
}

TEST(BdfParse, LargestValues) {
  EXPECT_EQ(parse_ok("ffff:ff:1f.7"), (Bdf{0xffff, 0xff, 0x1f, 7}));
  EXPECT_EQ(parse_ok("FFFF:00:00.0"), (Bdf{0xffff, 0, 0, 0}));
}

class BdfReject : public ::testing::TestWithParam<const char*> {};

TEST_P(BdfReject, IsInvalidArgumentNamingTheInput) {
  const std::string text = GetParam();
  auto r = Bdf::parse(text);
  ASSERT_FALSE(r.ok()) << "accepted '" << text << "'";
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_EQ(r.error().device(), text);
  EXPECT_EQ(r.error().op(), "parse PCI address");
  EXPECT_EQ(r.error().sys_errno(), 0);
  EXPECT_EQ(r.error().message(),
            (text.empty() ? std::string() : text + ": ") +
                "parse PCI address: expected DDDD:BB:DD.F or BB:DD.F in hex, e.g. 0000:00:03.0");
}

INSTANTIATE_TEST_SUITE_P(Malformed, BdfReject,
                         ::testing::Values("",                // empty
                                           "0000:00:03",      // no function
                                           "00:03",           // no function, short form
                                           "00:20.0",         // device 32 > 31
                                           "0000:00:ff.0",    // device 255
                                           "00:03.8",         // function 8 > 7
                                           "00:03.00",        // two function digits
                                           "00:03.",          // empty function
                                           "zz:03.0",         // not hex
                                           "00:0g.0",         // not hex
                                           "0x00:03.0",       // no 0x prefix
                                           "10000:00:03.0",   // domain > ffff
                                           "100:03.0",        // bus > ff
                                           ":00:03.0",        // empty domain
                                           "0000::03.0",      // empty bus
                                           "0000:00:.0",      // empty device
                                           "0000:00:03.0 ",   // trailing space
                                           "0000:00:03.0\n",  // trailing newline (as read from sysfs)
                                           "0000:00:03.0x",   // trailing junk
                                           "0000:00:03.0:1",  // a third colon
                                           "0000:00:03.1.2",  // a second dot
                                           " 00:03.0",        // leading space
                                           "00.03:0",         // separators swapped
                                           "-1:03.0"));       // sign

// BUG (pci/src/bdf.cpp, parse_hex): every field accepts up to four hex
// digits, so "0000:000:03.0" (a three-digit bus), "00:003.0" and
// "0000:00:0003.0" parse as 0000:00:03.0. sysfs and lspci always print
// fixed widths, so an overlong field is a typo and must be rejected. Enable
// this test once parse_hex takes a maximum digit count (domain 4, bus 2,
// device 2, function 1).
TEST(BdfParse, RejectsOverlongFields) {
  for (const char* text : {"0000:000:03.0", "00:003.0", "0000:00:0003.0", "000:03.0", "0000:00:003.0"}) {
    auto r = Bdf::parse(text);
    ASSERT_FALSE(r.ok()) << "accepted '" << text << "'";
    EXPECT_EQ(r.error().code(), Errc::invalid_argument);
    EXPECT_EQ(r.error().device(), text);
  }
}

TEST(BdfStr, CanonicalLowerCaseZeroPadded) {
  EXPECT_EQ((Bdf{0, 0, 3, 0}).str(), "0000:00:03.0");
  EXPECT_EQ((Bdf{0xabcd, 0xef, 0x1f, 7}).str(), "abcd:ef:1f.7");
  EXPECT_EQ((Bdf{1, 2, 3, 4}).str(), "0001:02:03.4");
  EXPECT_EQ((Bdf{0xffff, 0xff, 0x1f, 7}).str(), "ffff:ff:1f.7");
}

TEST(BdfStr, RoundTrip) {
  const std::vector<std::string> canonical = {"0000:00:03.0", "0000:00:00.0", "abcd:ef:1f.7", "ffff:ff:1f.7",
                                              "0001:3a:10.2"};
  for (const auto& s : canonical) EXPECT_EQ(parse_ok(s).str(), s);
  EXPECT_EQ(parse_ok("00:03.0").str(), "0000:00:03.0");
  EXPECT_EQ(parse_ok("ABCD:EF:1F.7").str(), "abcd:ef:1f.7");
  for (unsigned dev = 0; dev < 32; ++dev)
    for (unsigned fn = 0; fn < 8; ++fn) {
      Bdf b{0x0002, 0x41, static_cast<std::uint8_t>(dev), static_cast<std::uint8_t>(fn)};
      EXPECT_EQ(parse_ok(b.str()), b);
    }
}

}  // namespace
}  // namespace uvirtio::pci
