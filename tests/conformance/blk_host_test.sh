#!/usr/bin/env bash
# virtio-blk against QEMU, checked from the host: the guest writes a random
# pattern through `uvirtio blk write` (interrupt and polling completion),
# reads it back, runs the Blk conformance tests, and exits; the host then
# finds the pattern in the image file.
#   blk_host_test.sh BIN_DIR CONFORMANCE_BINARY [UVIRTIO_VM_OPTION...]
# UVIRTIO_MATRIX (e.g. "PACKED=1 EVENT_IDX=0 INDIRECT=1") is passed into the
# guest as UVIRTIO_EXPECT_* so the tests check what was negotiated and that
# the queue uses it (for packed rings too: event index and indirect tables).
set -euo pipefail
bin=$1
conf=$2
shift 2
kernel_dir=${UVIRTIO_KERNEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uvirtio/kernel}
command -v "${UVIRTIO_QEMU:-qemu-system-x86_64}" >/dev/null || { echo "SKIP: QEMU not installed"; exit 77; }
[ -f "$kernel_dir/current/vmlinuz" ] || { echo "SKIP: no guest kernel in $kernel_dir"; exit 77; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
truncate -s 16M "$work/disk.img"
head -c 131072 /dev/urandom >"$work/pattern"
expect=
for kv in ${UVIRTIO_MATRIX:-}; do expect+="export UVIRTIO_EXPECT_$kv; "; done
"$bin/uvirtio-vm" --blk "$work/disk.img" --add "$conf" --add "$work/pattern:/root/pattern" "$@" -- sh -c "$expect"'
  set -e
  B=$(uvirtio list --type block -q)
  uvirtio blk write $B --sector 100 --file /root/pattern --flush
  uvirtio blk write $B --sector 1000 --file /root/pattern --flush --poll
  uvirtio blk read $B --sector 100 --count 256 > /tmp/a
  uvirtio blk read $B --sector 1000 --count 256 --poll > /tmp/b
  cmp /tmp/a /root/pattern && cmp /tmp/b /root/pattern && echo "guest read-back ok"
  if uvirtio blk read $B --sector 100 --count 8 >/dev/full 2>/tmp/e; then echo "blk read to a full stdout: exit 0"; fi
  grep -q "$B: read: write the data to standard output" /tmp/e && echo "full stdout refused"
  uvirtio-conformance --gtest_color=no --gtest_filter="Completion/*:RngCli.*"
' | tee "$work/out"
passed=0
failed=0
for s in 100 1000; do
  if cmp -s <(dd if="$work/disk.img" bs=512 skip=$s count=256 status=none) "$work/pattern"; then
    passed=$((passed + 1)); echo "ok - pattern at sector $s is in the image on the host"
  else
    failed=$((failed + 1)); echo "not ok - pattern at sector $s is not in the image"
  fi
done
grep -q "guest read-back ok" "$work/out" && passed=$((passed + 1)) || { failed=$((failed + 1)); echo "not ok - guest read-back"; }
grep -q "full stdout refused" "$work/out" && passed=$((passed + 1)) || { failed=$((failed + 1)); echo "not ok - blk read to a full stdout is not reported"; }
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
