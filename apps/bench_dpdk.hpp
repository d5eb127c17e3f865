// DPDK's own virtqueue pair as a same-run baseline for `uvirtio-bench rings`:
// testpmd's virtio-user port (the driver role, txonly, 64-byte packets)
// sending to testpmd's vhost-user port (the device role, rxonly), two
// processes on one Unix socket, each forwarding lcore on its own CPU.
// Packets/s is the sender's Tx-pps (what the receiving ring accepted), one
// sample per second, the first and last dropped, median taken.
#pragma once

#include <optional>
#include <string>

#include "uvirtio/base/result.hpp"

namespace uvirtio::apps {

struct DpdkLoopbackOptions {
  unsigned burst = 32;        // testpmd --burst: packets per enqueue/dequeue
  unsigned queue_size = 256;  // virtio-user queue_size
  unsigned seconds = 5;       // run time (at least 3: the first and last samples are dropped)
  std::string testpmd;        // path; empty: dpdk-testpmd from PATH
};

// Why the baseline cannot run here (no dpdk-testpmd), or nullopt when it can.
std::optional<std::string> dpdk_unavailable(const std::string& testpmd);

// Median packets/s; Errc::io / timeout naming "dpdk-testpmd" when a
// process fails to start, the socket never appears, or no samples come back
// (the log's last lines are in the cause).
Result<double> dpdk_loopback_pps(const DpdkLoopbackOptions& options);

}  // namespace uvirtio::apps
