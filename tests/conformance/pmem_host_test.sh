#!/usr/bin/env bash
# virtio-pmem end to end against QEMU, checked from the host:
#  1. the guest writes a random pattern with `uvirtio pmem write --persist` and
#     exits; the host finds the pattern in the backing file; likewise the
#     text that the C program uvirtio-pmem-c persists through uvirtio/pmem.h;
#  2. QEMU runs under strace: every device flush the guest reports is exactly
#     one fsync of the backing file, and 8 threads' concurrent persist() calls
#     need far fewer flushes than calls.
#   pmem_host_test.sh BIN_DIR          (exit 77: QEMU, strace or kernel missing)
set -euo pipefail
bin=$1
kernel_dir=${UVIRTIO_KERNEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uvirtio/kernel}
qemu=${UVIRTIO_QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null || { echo "SKIP: QEMU not installed"; exit 77; }
command -v strace >/dev/null || { echo "SKIP: strace not installed"; exit 77; }
[ -f "$kernel_dir/current/vmlinuz" ] || { echo "SKIP: no guest kernel in $kernel_dir"; exit 77; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
img=$work/pmem.img
pattern=$work/pattern
head -c 65536 /dev/urandom >"$pattern"
offset=1048576
c_offset=2097152 c_text="written from C through uvirtio/pmem.h"
source "$(dirname "$0")/../support/tap.sh"

UVIRTIO_QEMU="strace -f -y -qq --seccomp-bpf -e trace=fsync,fdatasync -o $work/strace.log $qemu" \
  "$bin/uvirtio-vm" --pmem "$img:16M" --add "$pattern:/root/pattern" --qemu-arg -smp --qemu-arg 2 -- sh -c "
    set -e
    P=\$(uvirtio list --type pmem -q)
    uvirtio pmem write \$P --offset $offset --file /root/pattern --persist
    uvirtio pmem flush \$P
    uvirtio pmem flush \$P
    uvirtio-pmem-c \$P $c_offset '$c_text'
    if uvirtio-pmem-c \$P $((16 * 1024 * 1024 - 4)) 0123456789; then echo 'C demo accepted a write past the end'; fi
    uvirtio pmem write \$P --offset 8 --data keepme --persist
    if uvirtio pmem bench \$P --threads 1 --seconds 0.1 2>/tmp/e; then echo 'bench ran over data it did not write'; fi
    grep -q 'holds data at offset 8, which the benchmark would overwrite' /tmp/e && echo 'bench refused to overwrite data'
    echo \"kept: \$(uvirtio pmem read \$P --offset 8 --length 6)\"
    uvirtio pmem bench \$P --threads 8 --seconds 2 --json --overwrite
  " >"$work/guest.out"

# 1. The pattern is in the backing file.
check "persisted pattern is in the backing file on the host" \
  cmp -s <(dd if="$img" bs=4096 skip=$((offset / 4096)) count=16 2>/dev/null) "$pattern"

# 1b. The C API, from the C program uvirtio-pmem-c.
check "the C program's text is in the backing file" \
  [ "$(dd if="$img" bs=1 skip=$c_offset count=${#c_text} 2>/dev/null)" = "$c_text" ]
c_flushes=$(sed -n 's/.*persisted (async) and flushed; .* device_flushes=\([0-9]*\).*/\1/p' "$work/guest.out")
check "the C program reports its device flushes ($c_flushes)" [ "${c_flushes:-0}" -ge 2 ]
absent() { ! grep -q "$1" "$2"; }
check "the C program refused a write past the end" absent "accepted a write past the end" "$work/guest.out"
check "and wrote nothing there" cmp -s <(tail -c 8 "$img") <(head -c 8 /dev/zero)

# 1c. The benchmark refuses to run over data it did not write.
check "pmem bench refused a range holding data" grep -q "bench refused to overwrite data" "$work/guest.out"
check "and did not run" absent "bench ran over data it did not write" "$work/guest.out"
check "the data was still there after the refusal" grep -q "kept: keepme" "$work/guest.out"

# 2. fsyncs of the image vs device flushes the guest made.
fsyncs=$(grep -c "fsync(.*<$img>) = 0" "$work/strace.log" || true)
failed=$(grep "$img" "$work/strace.log" | grep -vc ') = 0' || true)
num() { sed -n "s/.*\"$1\": \([0-9.]*\).*/\1/p" "$work/guest.out" | head -n "$2" | tail -n 1; }
calls=$(num persist_calls 1)
bench_flushes=$(num device_flushes 1)
bench_total=$(num device_requests_total 1)
expected=$((1 + 2 + ${c_flushes:-0} + 1 + bench_total))
echo "host fsyncs of the image: $fsyncs; guest device flushes: $expected (1 write, 2 flush, ${c_flushes:-0} C program, 1 write, $bench_total in the bench); persist calls from 8 threads: $calls, $bench_flushes device flushes"
check "no fsync of the image failed" [ "$failed" = 0 ]
check "one host fsync per device flush ($fsyncs = $expected)" [ "$fsyncs" = "$expected" ]
check "8 threads coalesce: $bench_flushes device flushes for $calls persist calls (at most half)" \
  [ $((bench_flushes * 2)) -le "$calls" ]
check "some persists were made ($calls)" [ "$calls" -gt 100 ]
echo "$passed passed, $fail failed"
[ $fail = 0 ] || { echo "guest output:"; cat "$work/guest.out"; exit 1; }
