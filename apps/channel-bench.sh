#!/usr/bin/env bash
# The channel benchmark, both settings in one run:
#   1. between two host processes (memfd window, eventfd doorbells) with the
#      baselines: Unix socket, TCP loopback, bare SPSC ring, cache-line ping-pong;
#   2. between two guests over ivshmem-doorbell on uvirtio-ivshmem-server
#      (guest B serves, guest A measures; 2 vCPUs each).
#   bash apps/channel-bench.sh [BIN_DIR] [SECONDS] [ROUNDS]    (default build/bin, 1, 3)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$top/build/bin}
seconds=${2:-1}
rounds=${3:-3}
work=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill $server 2>/dev/null; rm -rf "$work"' EXIT
echo "== between two host processes =="
"$bin/uvirtio-bench" channel --seconds "$seconds" --rounds "$rounds"
echo
echo "== between two guests (ivshmem-doorbell, TCG) =="
"$bin/uvirtio-ivshmem-server" -S "$work/sock" -l 4M -n 2 >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 50); do [ -S "$work/sock" ] && break; sleep 0.1; done
"$bin/uvirtio-vm" --ivshmem "$work/sock" --qemu-arg -smp --qemu-arg 2 --out "$work/b.out" -- \
  uvirtio-bench channel --ivshmem 0000:01:00.0 --side 1 >/dev/null 2>&1 &
guest_b=$!
"$bin/uvirtio-vm" --ivshmem "$work/sock" --qemu-arg -smp --qemu-arg 2 -- \
  uvirtio-bench channel --ivshmem 0000:01:00.0 --side 0 --seconds "$seconds" --rounds "$rounds"
wait $guest_b || { echo "guest B (serving side) failed:"; cat "$work/b.out"; exit 1; }
