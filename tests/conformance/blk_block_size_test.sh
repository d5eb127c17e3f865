#!/usr/bin/env bash
# virtio-blk with 4 KiB logical blocks against QEMU (logical_block_size=4096,
# so the device offers VIRTIO_BLK_F_BLK_SIZE with blk_size 4096), checked
# from the host: `uvirtio blk info` reports the block size; whole blocks are
# written (interrupt and polling completion) and read back; a 3-byte write
# keeps the rest of its block; a write or read
# not on a whole block is refused with an error naming the device and the
# block size, and writes nothing (the host finds the bytes around the
# pattern still zero).
#   blk_block_size_test.sh BIN_DIR
set -euo pipefail
bin=$1
kernel_dir=${UVIRTIO_KERNEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uvirtio/kernel}
command -v "${UVIRTIO_QEMU:-qemu-system-x86_64}" >/dev/null || { echo "SKIP: QEMU not installed"; exit 77; }
[ -f "$kernel_dir/current/vmlinuz" ] || { echo "SKIP: no guest kernel in $kernel_dir"; exit 77; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
truncate -s 16M "$work/disk.img"
head -c 65536 /dev/urandom >"$work/pattern"
# Sector 104 is byte 53248, block 13; sector 1000 is block 125.
"$bin/uvirtio-vm" --blk "$work/disk.img" --blk-opt logical_block_size=4096 --blk-opt physical_block_size=4096 \
  --add "$work/pattern:/root/pattern" -- sh -c '
  B=$(uvirtio list --type block -q)
  uvirtio blk info $B
  uvirtio blk info $B --json | grep -q "\"block_size\": *4096" && echo "info: block size 4096"
  uvirtio blk write $B --sector 104 --file /root/pattern --flush &&
    uvirtio blk write $B --sector 1000 --file /root/pattern --flush --poll &&
    uvirtio blk read $B --sector 104 --count 128 > /tmp/a &&
    uvirtio blk read $B --sector 1000 --count 128 --poll > /tmp/b &&
    cmp /tmp/a /root/pattern && cmp /tmp/b /root/pattern && echo "guest read-back ok"
  if uvirtio blk write $B --sector 100 --data misaligned 2>/tmp/e1; then echo "misaligned write: exit 0"; fi
  cat /tmp/e1
  grep -q "$B: .*4096-byte logical block size" /tmp/e1 && echo "misaligned write refused"
  if uvirtio blk read $B --sector 104 --count 1 >/dev/null 2>/tmp/e2; then echo "partial-block read: exit 0"; fi
  cat /tmp/e2
  grep -q "$B: .*4096" /tmp/e2 && echo "partial-block read refused"
  uvirtio blk write $B --sector 104 --data XYZ --flush
  uvirtio blk read $B --sector 1000 > /tmp/c && [ "$(wc -c < /tmp/c)" -eq 4096 ] && cmp -n 4096 /tmp/c /root/pattern &&
    echo "default read: one 4 KiB block"
' | tee "$work/out"
source "$(dirname "$0")/../support/tap.sh"
check "pattern at sector 1000 is in the image on the host" \
  cmp -s <(dd if="$work/disk.img" bs=512 skip=1000 count=128 status=none) "$work/pattern"
# A 3-byte write replaced 3 bytes: the rest of its 4 KiB block kept the pattern.
check "XYZ then the pattern from byte 3 at sector 104 (a partial block is read, not zero-padded)" \
  cmp -s <(dd if="$work/disk.img" bs=512 skip=104 count=128 status=none) <(printf XYZ; tail -c +4 "$work/pattern")
check "the refused write at sector 100 left sectors 96..103 zero" \
  cmp -s <(dd if="$work/disk.img" bs=512 skip=96 count=8 status=none) <(head -c 4096 /dev/zero)
for line in "info: block size 4096" "guest read-back ok" "misaligned write refused" "partial-block read refused" \
  "default read: one 4 KiB block"; do
  check "guest: $line" grep -q "$line" "$work/out"
done
finish
