// The ivshmem driver over a fake PCI function: BAR checks, IVPosition,
// doorbell register encoding, MSI-X eventfd waits, and the channel doorbell.
#include "uvirtio/driver/ivshmem.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "support/fake_function.hpp"

namespace uvirtio::driver {
namespace {

using test::FakeFunction;

// An ivshmem-doorbell (vectors > 0) or ivshmem-plain function with BAR0
// registers and a mappable BAR2 of shm_size bytes.
std::unique_ptr<FakeFunction> make_ivshmem(unsigned vectors, std::uint32_t position = 3,
                                           std::uint64_t shm_size = 1 << 16) {
  auto fn = std::make_unique<FakeFunction>("0000:05:00.0");
  fn->set_ids(kIvshmemVendor, kIvshmemDevice);
  auto& regs = fn->add_bar(0, 256);
  regs.poke(ivshmem_reg::kIvPosition, 4, position);
  if (shm_size) fn->add_bar(2, shm_size).set_mappable(true);
  if (vectors) {
    fn->add_bar(1, 4096);
    fn->add_msix_cap(static_cast<std::uint16_t>(vectors), 1, 0, 1, 2048);
  }
  return fn;
}

TEST(Ivshmem, DoorbellDeviceReportsPositionVectorsAndMemory) {
  auto fn = make_ivshmem(2, 7);
  FakeFunction* raw = fn.get();
  auto dev = Ivshmem::attach(std::move(fn));
  ASSERT_TRUE(dev) << dev.error().message();
  EXPECT_TRUE((*dev)->has_doorbell());
  EXPECT_EQ((*dev)->position(), std::optional<std::uint16_t>(7));
  EXPECT_EQ((*dev)->vectors(), 2u);
  EXPECT_EQ((*dev)->shm_size(), 1u << 16);
  EXPECT_EQ((*dev)->shm(), const_cast<std::uint8_t*>(raw->soft_bar(2)->mapping()));
}

TEST(Ivshmem, RingWritesPeerAndVectorToTheDoorbellRegister) {
  auto fn = make_ivshmem(2, 1);
  FakeFunction* raw = fn.get();
  std::vector<std::uint64_t> rung;
  raw->soft_bar(0)->hook(
      ivshmem_reg::kDoorbell, 4, [](std::uint64_t, unsigned) { return 0; },
      [&](std::uint64_t, unsigned width, std::uint64_t v) {
        EXPECT_EQ(width, 4u);
        rung.push_back(v);
      });
  auto dev = Ivshmem::attach(std::move(fn));
  ASSERT_TRUE(dev) << dev.error().message();
  ASSERT_TRUE((*dev)->ring(0x1234, 1));
  ASSERT_EQ(rung.size(), 1u);
  EXPECT_EQ(rung[0], 0x12340001u);
  // Values that do not fit the register's 16-bit fields are refused, nothing written.
  auto bad = (*dev)->ring(0x10000, 0);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code(), Errc::invalid_argument);
  EXPECT_NE(bad.error().message().find("0000:05:00.0"), std::string::npos);
  EXPECT_FALSE((*dev)->ring(1, 0x10000));
  EXPECT_EQ(rung.size(), 1u);
}

TEST(Ivshmem, WaitSeesTheVectorsInterrupt) {
  auto fn = make_ivshmem(2);
  FakeFunction* raw = fn.get();
  auto dev = Ivshmem::attach(std::move(fn));
  ASSERT_TRUE(dev) << dev.error().message();
  auto none = (*dev)->wait(0, std::chrono::milliseconds(1));
  ASSERT_TRUE(none);
  EXPECT_FALSE(*none);
  ASSERT_TRUE(raw->raise(1));
  auto v0 = (*dev)->wait(0, std::chrono::milliseconds(1));
  ASSERT_TRUE(v0);
  EXPECT_FALSE(*v0) << "vector 1's interrupt must not wake vector 0";
  auto v1 = (*dev)->wait(1, std::chrono::milliseconds(100));
  ASSERT_TRUE(v1);
  EXPECT_TRUE(*v1);
  EXPECT_EQ((*dev)->interrupts(1), 1u);
  EXPECT_FALSE((*dev)->wait(2, std::chrono::milliseconds(1))) << "vector 2 is not routed";
}

TEST(Ivshmem, ChannelDoorbellRingsAndWaits) {
  auto fn = make_ivshmem(1, 2);
  FakeFunction* raw = fn.get();
  std::uint64_t last = 0;
  raw->soft_bar(0)->hook(
      ivshmem_reg::kDoorbell, 4, [](std::uint64_t, unsigned) { return 0; },
      [&](std::uint64_t, unsigned, std::uint64_t v) { last = v; });
  auto dev = Ivshmem::attach(std::move(fn));
  ASSERT_TRUE(dev) << dev.error().message();
  auto bell = (*dev)->doorbell(0);
  ASSERT_TRUE(bell) << bell.error().message();
  ASSERT_TRUE((*bell)->ring(9));
  EXPECT_EQ(last, 9u << 16);
  std::thread t([&] { raw->raise(0); });
  auto w = (*bell)->wait(std::chrono::seconds(5));
  t.join();
  ASSERT_TRUE(w);
  EXPECT_TRUE(*w);
}

// A channel sends on one thread and receives on another, and both sleep on
// the same vector. One interrupt wakes both pollers; the one that does not get
// the count must go back to its timeout, not block in read() on the emptied
// eventfd until some later interrupt (which may never come: a hang).
TEST(Ivshmem, TwoWaitersOnOneVectorBothReturnWithinTheirTimeout) {
  auto fn = make_ivshmem(1);
  FakeFunction* raw = fn.get();
  auto dev = Ivshmem::attach(std::move(fn));
  ASSERT_TRUE(dev) << dev.error().message();
  int stuck = 0;
  for (int round = 0; round < 40 && stuck == 0; ++round) {
    std::atomic<int> done{0};
    auto waiter = [&] {
      (void)(*dev)->wait(0, std::chrono::milliseconds(50));
      done.fetch_add(1);
    };
    std::thread a(waiter), b(waiter);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // both in poll()
    ASSERT_TRUE(raw->raise(0));
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (done.load() < 2 && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (done.load() < 2) {
      ++stuck;
      while (done.load() < 2) {  // free the stuck reader
        raw->raise(0);
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
    a.join();
    b.join();
    (void)(*dev)->wait(0, std::chrono::milliseconds(0));  // drain
  }
  EXPECT_EQ(stuck, 0) << "a waiter blocked past its 50 ms timeout";
}

TEST(Ivshmem, PlainDeviceHasNoDoorbell) {
  auto dev = Ivshmem::attach(make_ivshmem(0, 0));
  ASSERT_TRUE(dev) << dev.error().message();
  EXPECT_FALSE((*dev)->has_doorbell());
  EXPECT_EQ((*dev)->vectors(), 0u);
  auto r = (*dev)->ring(1, 0);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), Errc::unsupported);
  auto bell = (*dev)->doorbell(0);
  ASSERT_FALSE(bell);
  EXPECT_NE(bell.error().message().find("polling"), std::string::npos);
}

TEST(Ivshmem, RefusesOtherFunctionsAndBadBars) {
  {
    auto fn = make_ivshmem(1);
    fn->set_ids(0x1af4, 0x1044);
    auto r = Ivshmem::attach(std::move(fn));
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message().find("not 1af4:1110"), std::string::npos);
  }
  {
    auto fn = std::make_unique<FakeFunction>("0000:05:00.0");
    fn->set_ids(kIvshmemVendor, kIvshmemDevice);
    fn->add_bar(0, 8);  // too small for the registers
    fn->add_bar(2, 4096).set_mappable(true);
    auto r = Ivshmem::attach(std::move(fn));
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code(), Errc::bad_device_data);
  }
  {
    auto fn = make_ivshmem(1, 3, 0);  // no BAR2
    auto r = Ivshmem::attach(std::move(fn));
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message().find("BAR2"), std::string::npos);
  }
  {
    auto fn = make_ivshmem(1, 3, 4096);
    fn->soft_bar(2)->set_mappable(false);
    auto r = Ivshmem::attach(std::move(fn));
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code(), Errc::unsupported);
  }
  {
    // A doorbell device whose IVPosition is not a 16-bit peer id.
    auto r = Ivshmem::attach(make_ivshmem(1, 0xffffffffu));
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code(), Errc::bad_device_data);
    EXPECT_NE(r.error().message().find("IVPosition"), std::string::npos);
  }
}

}  // namespace
}  // namespace uvirtio::driver
