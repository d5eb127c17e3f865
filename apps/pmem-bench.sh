#!/usr/bin/env bash
# The virtio-pmem benchmark, all three paths in one run:
#   userspace  uvirtio persist (64 B write + persist) with 1, 2, 4, 8 threads;
#   kernel     virtio_pci + virtio_pmem + nd_pmem, ext4 -o dax (mkfs.ext4 -I 256
#              on the host), 4 KiB pwrite + fsync, 1 and 4 threads;
#   floor      the host's 64 B pwrite + fsync of the backing file (measured here,
#              on the host) plus one null virtqueue round trip (1-byte virtio-rng
#              request, measured in the guest).
# The two pmem devices are the same kind (64 MiB virtio-pmem-pci, same host
# filesystem) in one guest with 2 vCPUs.
#   bash apps/pmem-bench.sh [BIN_DIR] [SECONDS]     (default build/bin, 3)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$top/build/bin}
seconds=${2:-6}
command -v mkfs.ext4 >/dev/null || { echo "pmem-bench: mkfs.ext4 not found (install e2fsprogs)" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/var/tmp}/uvirtio-pmem-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
# Fully allocated images: block allocation on first write would be measured
# as fsync cost otherwise.
dd if=/dev/zero of="$work/user.img" bs=1M count=64 status=none
dd if=/dev/zero of="$work/kernel.img" bs=1M count=64 status=none
mkfs.ext4 -q -b 4096 -I 256 -F "$work/kernel.img"
host=$("$bin/uvirtio-bench" fsync "$work/user.img" --seconds "$seconds" --json)
host_us=$(sed -n 's/.*"p50_us": \([0-9.]*\).*/\1/p' <<<"$host")
echo "host: 64 B pwrite + fsync of a backing file: p50 $host_us us"
"$bin/uvirtio-vm" --qemu-arg -smp --qemu-arg 2 --pmem "$work/user.img:64M" --kernel-pmem "$work/kernel.img:64M" --rng \
  --module ext4 --module crc32c_generic -- sh -c "
    set -e
    mkdir -p /mnt
    mount -t ext4 -o dax /dev/pmem0 /mnt
    grep -q 'pmem0 /mnt ext4 .*dax' /proc/mounts
    uvirtio pmem bench \$(uvirtio list --type pmem --driver vfio-pci -q) --seconds $seconds \
      --rng \$(uvirtio list --type entropy -q) --host-fsync-us $host_us --kernel-file /mnt/bench ${PMEM_BENCH_ARGS:-}
  "
