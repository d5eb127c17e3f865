#!/usr/bin/env bash
# Crash safety of uvirtio-pmlog on QEMU's virtio-pmem: append records while
# QEMU is killed with SIGKILL at random points, boot a new guest on the same
# backing file each time, and check that `verify` never finds a torn or
# reordered record and that every record whose append was acknowledged is
# there.
#   pmem_crash_test.sh BIN_DIR [RUNS]   (RUNS defaults to $UVIRTIO_CRASH_RUNS or 20)
set -euo pipefail
bin=$1
runs=${2:-${UVIRTIO_CRASH_RUNS:-20}}
kernel_dir=${UVIRTIO_KERNEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uvirtio/kernel}
qemu=${UVIRTIO_QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null || { echo "SKIP: QEMU not installed"; exit 77; }
[ -f "$kernel_dir/current/vmlinuz" ] || { echo "SKIP: no guest kernel in $kernel_dir"; exit 77; }

work=$(mktemp -d)
vm_pid=
cleanup() {
  [ -n "$vm_pid" ] && kill "$vm_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
img=$work/log.img
# A QEMU wrapper that records its pid, so we kill QEMU itself, not the harness.
cat >"$work/qemu" <<EOW
#!/bin/sh
echo \$\$ >"$work/qemu.pid"
exec $qemu "\$@"
EOW
chmod +x "$work/qemu"
vm() { UVIRTIO_QEMU=$work/qemu "$bin/uvirtio-vm" --pmem "$img:16M" "$@"; }
pmlog='uvirtio-pmlog $(uvirtio list --type pmem -q)'
# FILE without a last line that has no newline yet.
whole_lines() { if [ -n "$(tail -c 1 "$1")" ]; then sed '$d' "$1"; else cat "$1"; fi; }

vm -- sh -c "$pmlog init" >/dev/null
acked=0
passed=0
failed=0
for run in $(seq 1 "$runs"); do
  out=$work/out.$run
  : >"$out"
  rm -f "$work/qemu.pid"
  size=$((RANDOM % 300 + 1))
  vm --out "$out" -- sh -c "$pmlog verify --expect-at-least $acked && $pmlog append --count 1000000 --size $size --tag run$run" \
    >/dev/null 2>&1 &
  vm_pid=$!
  # Wait for the first acknowledged append (or for the guest to end).
  for _ in $(seq 1 600); do
    grep -q '^acked' "$out" 2>/dev/null && break
    kill -0 "$vm_pid" 2>/dev/null || break
    sleep 0.05
  done
  # Then let it append for a random while and pull the plug.
  sleep "0.$((RANDOM % 9 + 1))"
  [ -f "$work/qemu.pid" ] && kill -9 "$(cat "$work/qemu.pid")" 2>/dev/null || true
  wait "$vm_pid" 2>/dev/null || true
  vm_pid=
  verdict=$(head -n 1 "$out" | tr -d '\r')
  # The kill can cut the last line ("acked" without its number): only whole
  # lines count.
  last=$(whole_lines "$out" | grep '^acked' | tail -n 1 | tr -d '\r' | awk '{print $2}')
  if grep -q 'all intact and in order' <<<"$verdict" && [ -n "$last" ]; then
    passed=$((passed + 1))
    echo "ok - run $run: $verdict; appended up to seq $last (record size $size) before SIGKILL"
    acked=$last
  else
    failed=$((failed + 1))
    echo "not ok - run $run: verify after the previous kill said: $(head -n 3 "$out")"
  fi
done
# A last clean boot checks what the last kill left, then appends a record
# that is not UTF-8 and holds a terminal escape: list must escape it, list
# --json must keep every byte in payload_hex (it used to abort on it).
final=$(vm -- sh -c "$pmlog verify --expect-at-least $acked && $pmlog append \"\$(printf 'x\\377\\033[2J')\" >/dev/null &&
  $pmlog list | tail -n 1 && $pmlog list --json | tail -n 8" 2>&1 || true)
if grep -q 'all intact and in order' <<<"$final"; then
  passed=$((passed + 1))
  echo "ok - final: $(head -n 1 <<<"$final") (at least $acked acknowledged)"
else
  failed=$((failed + 1))
  echo "not ok - final: $final"
fi
if grep -qF 'x\xff\x1b[2J' <<<"$final" && grep -q '"payload_hex": "78ff1b5b324a"' <<<"$final"; then
  passed=$((passed + 1))
  echo "ok - a record that is not UTF-8 is listed escaped, and in JSON with its bytes in hex"
else
  failed=$((failed + 1))
  echo "not ok - listing a record that is not UTF-8: $final"
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
