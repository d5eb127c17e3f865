#!/usr/bin/env bash
# The main job: set up a fresh Debian machine, build, boot a QEMU guest and
# run the demo in it: list the virtio functions, show the pmem function's
# capabilities, and read entropy from virtio-rng through a userspace driver
# (interrupt and polling completion).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash apps/setup-debian.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "== booting a guest (q35, Intel vIOMMU, virtio-rng + virtio-pmem bound to vfio-pci) =="
build/bin/uvirtio-vm --rng --pmem "$work/pmem.img:16M" -- sh -c '
  set -e
  echo "\$ uvirtio list"; uvirtio list
  pmem=$(uvirtio list --type pmem -q)
  rng=$(uvirtio list --type entropy -q)
  echo; echo "\$ uvirtio caps $pmem"; uvirtio caps "$pmem"
  echo; echo "\$ uvirtio rng read $rng -n 32"; uvirtio rng read "$rng" -n 32
  echo; echo "\$ uvirtio rng read $rng -n 32 --poll"; uvirtio rng read "$rng" -n 32 --poll
'
echo "== demo finished =="
