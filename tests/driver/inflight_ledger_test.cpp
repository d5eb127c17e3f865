// InflightLedger: the file that carries a queue's in-flight ids from one
// owner to the next.
#include "uvirtio/driver/inflight_ledger.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace uvirtio::driver {
namespace {

namespace fs = std::filesystem;

class Ledger : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/uvirtio-ledger-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir = tmpl;
  }
  void TearDown() override { fs::remove_all(dir); }
  Result<InflightLedger> open(std::uint16_t size = 128, std::uint16_t queue = 0) {
    return InflightLedger::open(dir.string() + "/sub", "0000:01:00.0", queue, size);
  }
  std::string path() const { return (dir / "sub" / "0000:01:00.0-q0.inflight").string(); }
  std::vector<char> bytes() const {
    std::ifstream f(path(), std::ios::binary);
    return {std::istreambuf_iterator<char>(f), {}};
  }
  void write_bytes(const std::vector<char>& b) const {
    std::ofstream f(path(), std::ios::binary | std::ios::trunc);
    f.write(b.data(), static_cast<std::streamsize>(b.size()));
  }
  fs::path dir;
};

TEST_F(Ledger, MarksSurviveTheOwnerAndClearedOnesDoNot) {
  {
    auto l = open();
    ASSERT_TRUE(l) << l.error().message();
    EXPECT_TRUE(l->left_over().empty());
    EXPECT_TRUE(l->discarded().empty());
    EXPECT_EQ(l->path(), path());
    for (int id : {3, 70, 127, 5}) l->mark(static_cast<std::uint16_t>(id));
    l->clear(5);
    l->mark(128);  // beyond the queue: ignored
    EXPECT_TRUE(l->marked(70));
    EXPECT_FALSE(l->marked(5));
  }
  EXPECT_EQ(fs::file_size(path()), InflightLedger::file_bytes(128));
  auto again = open();
  ASSERT_TRUE(again) << again.error().message();
  EXPECT_EQ(again->left_over(), (std::vector<std::uint16_t>{3, 70, 127}));
  EXPECT_TRUE(again->discarded().empty()) << again->discarded();
  // The marks stay until cleared: a third owner sees them too.
  EXPECT_TRUE(again->marked(3));
}

TEST_F(Ledger, AProcessKilledWithRequestsInFlightLeavesThemMarked) {
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto l = open();
    if (!l) ::_exit(1);
    l->mark(9);
    l->mark(64);
    ::raise(SIGKILL);  // no destructor, no unmap: as a crash
    ::_exit(2);
  }
  int st = 0;
  ASSERT_EQ(::waitpid(pid, &st, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL) << "child status " << st;
  auto l = open();
  ASSERT_TRUE(l) << l.error().message();
  EXPECT_EQ(l->left_over(), (std::vector<std::uint16_t>{9, 64}));
}

TEST_F(Ledger, OneOwnerAtATime) {
  auto first = open();
  ASSERT_TRUE(first) << first.error().message();
  auto second = open();
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().code(), Errc::busy);
  EXPECT_NE(second.error().message().find("0000:01:00.0"), std::string::npos) << second.error().message();
  EXPECT_NE(second.error().message().find(path()), std::string::npos) << second.error().message();
  InflightLedger moved = std::move(*first);  // the lock moves with it
  EXPECT_FALSE(open());
}

TEST_F(Ledger, AFileThatFailsACheckIsDiscardedAndRewritten) {
  {
    auto l = open();
    ASSERT_TRUE(l);
    l->mark(1);
  }
  const std::vector<char> good = bytes();
  ASSERT_EQ(good.size(), InflightLedger::file_bytes(128));
  struct Case {
    const char* what;
    std::vector<char> content;
  };
  std::vector<Case> cases;
  auto with = [&](std::size_t off, char v) {
    auto b = good;
    b[off] = v;
    return b;
  };
  cases.push_back({"no ledger magic", with(0, 'x')});
  cases.push_back({"version 2", with(8, 2)});
  cases.push_back({"size 80 bytes, not 88 (for queue size 129)", with(12, static_cast<char>(129))});
  cases.push_back({"queue size 0", with(12, 0)});
  cases.push_back({"queue index 1, not 0", with(14, 1)});
  cases.push_back({"size 72 bytes, not 80", std::vector<char>(good.begin(), good.begin() + 72)});
  auto longer = good;
  longer.push_back(0);
  cases.push_back({"size 81 bytes, not 80", longer});
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    write_bytes(c.content);
    {
      auto l = open();
      ASSERT_TRUE(l) << l.error().message();
      EXPECT_EQ(l->discarded(), c.what);
      EXPECT_TRUE(l->left_over().empty());
    }
    EXPECT_EQ(fs::file_size(path()), good.size());
    auto again = open();
    ASSERT_TRUE(again);
    EXPECT_TRUE(again->discarded().empty()) << again->discarded();
  }
  // A bit past the queue size (here 100 entries: bits 100..127 of the
  // second word) is not from a ledger of this queue.
  {
    fs::remove(path());
    auto l = open(100);
    ASSERT_TRUE(l);
    l->mark(99);
  }
  auto b = bytes();
  b[64 + 8 + (100 - 64) / 8] = static_cast<char>(1 << (100 % 8));
  write_bytes(b);
  auto l = open(100);
  ASSERT_TRUE(l);
  EXPECT_EQ(l->discarded(), "bit 100 is beyond the queue size 100");
  EXPECT_TRUE(l->left_over().empty());
}

// An owner that asks for another queue size (a program of the user's with
// its own wanted size) still inherits the ids the device may complete: those
// below its size are kept and stay marked for the owner after it; ids past
// its size cannot name one of its chains.
TEST_F(Ledger, AFileForAnotherQueueSizeKeepsTheIdsThatStillFit) {
  {
    auto l = open(128);
    ASSERT_TRUE(l);
    l->mark(3);
    l->mark(100);
  }
  {
    auto l = open(64);
    ASSERT_TRUE(l) << l.error().message();
    EXPECT_TRUE(l->discarded().empty()) << l->discarded();
    EXPECT_EQ(l->resized_from(), 128);
    EXPECT_EQ(l->left_over(), (std::vector<std::uint16_t>{3}));
    EXPECT_TRUE(l->marked(3));
  }
  EXPECT_EQ(fs::file_size(path()), InflightLedger::file_bytes(64));
  {
    auto l = open(256);
    ASSERT_TRUE(l);
    EXPECT_EQ(l->resized_from(), 64);
    EXPECT_EQ(l->left_over(), (std::vector<std::uint16_t>{3}));
    l->mark(200);
  }
  auto l = open(256);
  ASSERT_TRUE(l);
  EXPECT_EQ(l->resized_from(), 0);
  EXPECT_EQ(l->left_over(), (std::vector<std::uint16_t>{3, 200}));
}

TEST_F(Ledger, ErrorsNameTheDeviceAndThePath) {
  // The directory cannot be made: a regular file is in the way.
  std::ofstream(dir / "sub") << "x";
  auto l = open();
  ASSERT_FALSE(l);
  EXPECT_EQ(l.error().device(), "0000:01:00.0");
  EXPECT_NE(l.error().message().find("open in-flight ledger"), std::string::npos) << l.error().message();
  EXPECT_NE(l.error().message().find((dir / "sub").string()), std::string::npos) << l.error().message();
  auto zero = open(0);
  ASSERT_FALSE(zero);
  EXPECT_EQ(zero.error().code(), Errc::invalid_argument);
}

TEST_F(Ledger, DeviceNamesCannotLeaveTheDirectory) {
  auto l = InflightLedger::open(dir.string(), "../soft/dev", 2, 8);
  ASSERT_TRUE(l) << l.error().message();
  EXPECT_EQ(l->path(), dir.string() + "/.._soft_dev-q2.inflight");
  EXPECT_TRUE(fs::exists(l->path()));
}

}  // namespace
}  // namespace uvirtio::driver
