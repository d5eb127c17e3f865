#!/usr/bin/env bash
# The main job: set up a fresh Debian machine, build, boot a QEMU guest and
# run the demo in it: list the virtio functions, show the pmem function's
# capabilities, read entropy from virtio-rng through a userspace driver
# (interrupt and polling completion), persist data on virtio-pmem and run the
# crash-consistent log; then read the persisted bytes from the host's file.
# Then two guests exchange messages through ivshmem and uvirtio's channel.
# Last, a guest's stock virtio-net pings an app served through vhost-pci.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash apps/setup-debian.sh
work=$(mktemp -d)
# Whatever runs in the background (the ivshmem server, guest A, the vhost-pci
# app) is stopped however the job ends, a failed step included.
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
echo "== booting a guest (q35, Intel vIOMMU, virtio-rng + virtio-pmem bound to vfio-pci) =="
build/bin/uvirtio-vm --rng --pmem "$work/pmem.img:16M" -- sh -c '
  set -e
  echo "\$ uvirtio list"; uvirtio list
  pmem=$(uvirtio list --type pmem -q)
  rng=$(uvirtio list --type entropy -q)
  echo; echo "\$ uvirtio caps $pmem"; uvirtio caps "$pmem"
  echo; echo "\$ uvirtio rng read $rng -n 32"; uvirtio rng read "$rng" -n 32
  echo; echo "\$ uvirtio rng read $rng -n 32 --poll"; uvirtio rng read "$rng" -n 32 --poll
  echo; echo "\$ uvirtio pmem info $pmem"; uvirtio pmem info "$pmem"
  echo; echo "\$ uvirtio pmem write $pmem --offset 65536 --data \"hello from the guest\" --persist"
  uvirtio pmem write "$pmem" --offset 65536 --data "hello from the guest" --persist
  echo; echo "\$ uvirtio-pmem-c $pmem 131072 \"hello from C\"   # the C API (uvirtio/pmem.h) from a C program"
  uvirtio-pmem-c "$pmem" 131072 "hello from C"
  echo; echo "\$ uvirtio-pmlog $pmem init / append / verify / list"
  uvirtio-pmlog "$pmem" init
  uvirtio-pmlog "$pmem" append "first record" "second record" "third record"
  uvirtio-pmlog "$pmem" verify
  uvirtio-pmlog "$pmem" list
'
echo "== back on the host: the persisted bytes are in the backing file =="
dd if="$work/pmem.img" bs=1 skip=65536 count=20 status=none; echo
dd if="$work/pmem.img" bs=1 skip=131072 count=12 status=none; echo
echo "== two guests on one ivshmem server: ping-pong and a checksummed bulk transfer =="
build/bin/uvirtio-ivshmem-server -S "$work/ivshmem.sock" -l 4M -n 2 -v &
pids+=($!)
for _ in $(seq 50); do [ -S "$work/ivshmem.sock" ] && break; sleep 0.1; done
build/bin/uvirtio-vm --ivshmem "$work/ivshmem.sock" --out "$work/guest-a.out" -- sh -c '
  uvirtio list --type ivshmem
  uvirtio-ivchan info 0000:01:00.0
  uvirtio-ivchan serve 0000:01:00.0 --side 0' >/dev/null &
guest_a=$!
pids+=("$guest_a")
for _ in $(seq 1200); do
  grep -q "serve: ready" "$work/guest-a.out" 2>/dev/null && break
  kill -0 "$guest_a" 2>/dev/null || { echo "guest A ended before serving:" >&2; cat "$work/guest-a.out" >&2; exit 1; }
  sleep 0.1
done
build/bin/uvirtio-vm --ivshmem "$work/ivshmem.sock" -- \
  uvirtio-ivchan ping 0000:01:00.0 --side 1 --count 1000 --bytes 8388608 | sed 's/^/guest B: /'
wait $guest_a
sed 's/^/guest A: /' "$work/guest-a.out"
echo "== vhost-pci: a guest's virtio-net pings an app behind the vhost-pci device model and driver =="
build/bin/uvirtio-vhost-pci serve --socket "$work/vp.sock" --ip 10.0.2.1 --once > >(sed 's/^/host: /') &
vhost_pci=$!  # the app itself, not a pipeline's last command
pids+=("$vhost_pci")
for _ in $(seq 50); do [ -S "$work/vp.sock" ] && break; sleep 0.1; done
build/bin/uvirtio-vm --vhost-user-net "$work/vp.sock" -- \
  sh -c 'ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ping -c 3 10.0.2.1' | sed 's/^/guest: /'
wait $vhost_pci
echo "== demo finished =="
