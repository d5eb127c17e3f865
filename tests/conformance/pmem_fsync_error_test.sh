#!/usr/bin/env bash
# A host fsync that really fails, end to end: QEMU's virtio-pmem backing file
# lives on uvirtio-failfs, a FUSE pass-through whose fsync calls 4 and 5 fail
# with EIO and drop the writes they should have written, as a disk whose
# write-back failed leaves Linux: the pages stay in the page cache, clean.
#  - a persist before the failure succeeds and its data reaches the backing file;
#  - `uvirtio pmem flush` and a `uvirtio-pmlog append` during the failure exit
#    non-zero, naming the device, the operation and the host fsync failure (EIO);
#  - the device keeps working: the next flush succeeds, the next append is
#    acknowledged, the log verifies and holds it but not the failed record;
#  - data written before the failed flush is NOT in the backing file although
#    later flushes succeeded (the host holds its page clean), while the guest
#    still reads it; `uvirtio pmem repersist` writes it back for real;
#  - the host's log shows exactly the fsyncs the guest asked for, with those results.
# Then a host whose fsync hangs: failfs stalls fsyncs 1, 3 and 6 for 3, 5 and 1.5 s, and
# uvirtio-conformance's PmemStalledHost cases in a new guest expect a timeout
# naming the device at its 1 s deadline, then a working persist once QEMU
# answered the abandoned flush (the host finds that persist's data); and,
# after a reset with a flush stuck in QEMU, that QEMU's late completion of it
# is dropped by the new owner (the queue's in-flight ledger names the old
# owner's id) instead of completing the new owner's flush; and after
# recover() within one owner, it is dropped and the next flush works. Last,
# both reset cases on a packed ring, where the late completion breaks the
# ring (stale_completion) and recover_on_reset brings the device back.
#   pmem_fsync_error_test.sh BIN_DIR FAILFS CONFORMANCE_BINARY   (exit 77: QEMU, kernel or FUSE missing)
set -euo pipefail
bin=$1
failfs=${2:-}
conf=${3:-}
kernel_dir=${UVIRTIO_KERNEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uvirtio/kernel}
qemu=${UVIRTIO_QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null || { echo "SKIP: QEMU not installed"; exit 77; }
[ -f "$kernel_dir/current/vmlinuz" ] || { echo "SKIP: no guest kernel in $kernel_dir"; exit 77; }
[ -x "$failfs" ] || { echo "SKIP: uvirtio-failfs not built (libfuse3-dev missing at configure time)"; exit 77; }
[ -c /dev/fuse ] || { echo "SKIP: no /dev/fuse on this machine"; exit 77; }

work=$(mktemp -d)
fs_pid=
cleanup() {
  if mountpoint -q "$work/mnt" 2>/dev/null; then umount "$work/mnt" 2>/dev/null || fusermount3 -u "$work/mnt" 2>/dev/null || true; fi
  [ -n "$fs_pid" ] && kill "$fs_pid" 2>/dev/null || true
  [ -n "$fs_pid" ] && wait "$fs_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/mnt"
truncate -s 16M "$work/pmem.img"
# start_failfs LOG ARGS...: mounts failfs over pmem.img on $work/mnt with
# ARGS, its fsync log in LOG; fails if it is not mounted within 5 s.
start_failfs() {
  local log=$1
  shift
  "$failfs" "$work/pmem.img" "$work/mnt" "$@" --log "$log" -f -s 2>"$work/failfs.err" &
  fs_pid=$!
  for _ in $(seq 50); do
    mountpoint -q "$work/mnt" && return 0
    kill -0 "$fs_pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
stop_failfs() {
  umount "$work/mnt" 2>/dev/null || fusermount3 -u "$work/mnt"
  wait "$fs_pid" || true
  fs_pid=
}
if ! start_failfs "$work/fsync.log" --fail 4:2 --lose-failed-writes; then
  echo "SKIP: cannot mount a FUSE filesystem here: $(head -c 300 "$work/failfs.err")"
  exit 77
fi
source "$(dirname "$0")/../support/tap.sh"

# Each step prints a marker line the host checks; stderr goes to the console.
# Host fsyncs: 1-2 pmlog init, 3 the first persist, 4-5 fail, then 6-9.
M8=8388608 M9=9437184 M10=10485760
"$bin/uvirtio-vm" --pmem "$work/mnt/pmem.img:16M" -- sh -c "
    P=\$(uvirtio list --type pmem -q)
    echo BDF=\$P
    uvirtio-pmlog \$P init 2>&1; echo step0 rc=\$?
    uvirtio pmem write \$P --offset $M8 --data before-failure --persist 2>&1; echo step1 rc=\$?
    uvirtio pmem write \$P --offset $M9 --data lost-write >/dev/null 2>&1
    uvirtio pmem write \$P --offset $M10 --data lost-too >/dev/null 2>&1
    uvirtio pmem flush \$P 2>&1; echo step2 rc=\$?
    uvirtio-pmlog \$P append lost-record 2>&1; echo step3 rc=\$?
    uvirtio pmem flush \$P 2>&1; echo step4 rc=\$?
    uvirtio-pmlog \$P append after-failure 2>&1; echo step5 rc=\$?
    uvirtio-pmlog \$P verify --expect-at-least 1 2>&1; echo step6 rc=\$?
    uvirtio-pmlog \$P list 2>&1; echo step7 rc=\$?
    echo guest-reads=\$(uvirtio pmem read \$P --offset $M9 --length 10),\$(uvirtio pmem read \$P --offset $M10 --length 8)
    uvirtio pmem repersist \$P --offset $M9 --length 10 2>&1; echo step8 rc=\$?
  " 2>&1 | tr -d '\r' >"$work/guest.out" || true

out=$work/guest.out
bdf=$(sed -n 's/^BDF=\([0-9a-f:.]*\).*/\1/p' "$out" | head -n 1)
rc() { sed -n "s/^step$1 rc=\([0-9]*\).*/\1/p" "$out" | head -n 1; }
# The error line of a step: the line before its rc marker.
err_of() { grep -B1 "^step$1 rc=" "$out" | head -n 1; }
names_all() { # LINE: names the BDF, the operation and the host fsync failure
  grep -q "$bdf" <<<"$1" && grep -q "flush" <<<"$1" && grep -q "fsync" <<<"$1" && grep -q "EIO" <<<"$1"
}
list=$(sed -n '/^step6 rc=/,/^step7 rc=/p' "$out")
check "the guest found the pmem function ($bdf)" [ -n "$bdf" ]
check "pmlog init and a persist before the failure succeed (rc $(rc 0), $(rc 1))" [ "$(rc 0)" = 0 -a "$(rc 1)" = 0 ]
check "flush during the failure exits non-zero (rc $(rc 2))" [ -n "$(rc 2)" -a "$(rc 2)" != 0 ]
check "its error names the device, the operation and the fsync failure: $(err_of 2)" names_all "$(err_of 2)"
check "a log append during the failure exits non-zero (rc $(rc 3))" [ -n "$(rc 3)" -a "$(rc 3)" != 0 ]
check "its error names the device, the operation and the fsync failure: $(err_of 3)" names_all "$(err_of 3)"
check "the device keeps working: the next flush succeeds (rc $(rc 4))" [ "$(rc 4)" = 0 ]
check "the next append is acknowledged as record 1 (rc $(rc 5): $(err_of 5))" [ "$(rc 5)" = 0 -a "$(err_of 5)" = "acked 1" ]
check "the log verifies (rc $(rc 6))" [ "$(rc 6)" = 0 ]
check "the log holds the acknowledged record and not the failed one" \
  [ "$(grep -c after-failure <<<"$list")" = 1 -a "$(grep -c lost-record <<<"$list")" = 0 ]
check "the guest still reads what the failed flush lost ($(grep '^guest-reads=' "$out"))" \
  grep -q "^guest-reads=lost-write,lost-too$" "$out"
check "repersist succeeds (rc $(rc 8))" [ "$(rc 8)" = 0 ]
stop_failfs
expected=$(printf 'fsync %s\n' "1 ok" "2 ok" "3 ok" "4 EIO" "5 EIO" "6 ok" "7 ok" "8 ok" "9 ok")
check "the host saw fsyncs 1-3 ok, 4-5 EIO, 6-9 ok: $(tr '\n' ',' <"$work/fsync.log")" \
  [ "$(cat "$work/fsync.log")" = "$expected" ]
at() { dd if="$work/pmem.img" bs=1M skip="$1" count=1 status=none | head -c "$2" | tr -d '\0'; }
check "the data persisted before the failure is in the backing file" [ "$(at 8 14)" = before-failure ]
check "a write lost by the failed flush stays lost although 4 later flushes succeeded" [ -z "$(at 10 8)" ]
check "repersist wrote the other lost write back to the backing file" [ "$(at 9 10)" = lost-write ]
[ "$fail" = 0 ] || { echo "guest output:"; cat "$out"; }

# A host whose fsync hangs for 3 s, twice.
start_failfs "$work/stall.log" --stall 1:3000 --stall 3:5000 --stall 6:1500 || true
check "failfs mounted again, stalling fsyncs 1, 3 and 6" mountpoint -q "$work/mnt"
"$bin/uvirtio-vm" --pmem "$work/mnt/pmem.img:16M" --add "$conf" -- \
  env UVIRTIO_PMEM_STALL_MS=3000 uvirtio-conformance --gtest_color=no --gtest_filter='PmemStalledHost.*' \
  2>&1 | tr -d '\r' >"$work/stall.out" || true
check "in the guest, the stalled persist timed out naming the device and the next one worked" \
  grep -q '^\[       OK \] PmemStalledHost.PersistTimesOutThenTheDeviceWorksOn' "$work/stall.out"
check "a completion QEMU delivered after a reset was not taken for the new owner's flush" \
  grep -q '^\[       OK \] PmemStalledHost.StaleCompletionAfterAResetIsNeverTakenForANewFlush' "$work/stall.out"
check "after recover() with a flush stuck in QEMU, its late answer was dropped and the next flush worked" \
  grep -q '^\[       OK \] PmemStalledHost.RecoverWithAFlushStuckInQemuThenFlushWorks' "$work/stall.out"
stop_failfs
check "the host saw each stalled fsync, then the next ones: $(tr '\n' ',' <"$work/stall.log")" \
  [ "$(cat "$work/stall.log")" = "$(printf 'fsync %s\n' '1 ok, stalled' '2 ok' '3 ok, stalled' '4 ok' '5 ok' '6 ok, stalled' '7 ok')" ]
check "the data of the persist after the stall is in the backing file" [ "$(at 12 7)" = stalled ]
grep -h 'stale completions dropped' "$work/stall.out" || true
grep -q '^\[  PASSED  \] 3 tests' "$work/stall.out" || { echo "guest output:"; cat "$work/stall.out"; }

# The two reset cases again on a packed ring (packed=on), one guest each so
# the stalled fsync is the first: the stale used descriptor cannot be
# skipped there (QEMU advances its used index past it), so it must break the
# ring with Errc::stale_completion whichever completion QEMU delivers first,
# and recover_on_reset must reset the device and make the flush work.
for case in StaleCompletionAfterAResetIsNeverTakenForANewFlush:5000 RecoverWithAFlushStuckInQemuThenFlushWorks:1500; do
  name=${case%:*}
  rm -f "$work/packed.log"
  start_failfs "$work/packed.log" --stall "1:${case#*:}" || true
  check "failfs mounted for the packed $name, stalling fsync 1" mountpoint -q "$work/mnt"
  "$bin/uvirtio-vm" --packed --pmem "$work/mnt/pmem.img:16M" --add "$conf" -- \
    env UVIRTIO_PMEM_STALL_MS=3000 uvirtio-conformance --gtest_color=no --gtest_filter="PmemStalledHost.$name" \
    2>&1 | tr -d '\r' >"$work/packed.out" || true
  check "packed ring, $name: the late completion broke the ring, never answered a new flush, and recovery made the flush work" \
    grep -q "^\[       OK \] PmemStalledHost.$name" "$work/packed.out"
  stop_failfs
  check "the host saw the stalled fsync first, then only successful ones: $(tr '\n' ',' <"$work/packed.log")" \
    [ "$(head -n 1 "$work/packed.log")" = "fsync 1 ok, stalled" -a "$(grep -c stalled "$work/packed.log")" = 1 \
      -a "$(grep -vc ' ok' "$work/packed.log")" = 0 -a "$(wc -l <"$work/packed.log")" -ge 3 ]
  grep -h '^packed ring' "$work/packed.out" || true
  grep -q '^\[  PASSED  \] 1 test' "$work/packed.out" || { echo "guest output:"; cat "$work/packed.out"; }
done

# The CLI across processes on a packed ring: a flush that gives up at its
# deadline leaves its id in the in-flight ledger; the next command adopts it,
# and when QEMU's late completion of it reaches that command's ring first it
# recovers (the default; --no-recover would fail) instead of failing.
rm -f "$work/packed.log"
start_failfs "$work/packed.log" --stall 1:3000 || true
check "failfs mounted for the packed CLI run, stalling fsync 1" mountpoint -q "$work/mnt"
"$bin/uvirtio-vm" --packed --pmem "$work/mnt/pmem.img:16M" -- sh -c '
    P=$(uvirtio list --type pmem -q)
    uvirtio pmem flush $P --timeout 1000 2>&1; echo cli1 rc=$?
    uvirtio pmem flush $P 2>&1; echo cli2 rc=$?
    uvirtio pmem flush $P 2>&1; echo cli3 rc=$?
  ' 2>&1 | tr -d '\r' >"$work/cli.out" || true
stop_failfs
cli_rc() { sed -n "s/^cli$1 rc=\([0-9]*\).*/\1/p" "$work/cli.out" | head -n 1; }
cli_line() { grep -B1 "^cli$1 rc=" "$work/cli.out" | head -n 1; }
check "a flush whose host fsync hangs fails at its deadline: $(cli_line 1)" \
  [ -n "$(cli_rc 1)" -a "$(cli_rc 1)" != 0 ]
check "the next command's flush works whatever QEMU delivers first: $(cli_line 2)" [ "$(cli_rc 2)" = 0 ]
check "and the one after it: $(cli_line 3)" [ "$(cli_rc 3)" = 0 ]
check "the host saw the stalled fsync first: $(tr '\n' ',' <"$work/packed.log")" \
  [ "$(head -n 1 "$work/packed.log")" = "fsync 1 ok, stalled" -a "$(grep -vc ' ok' "$work/packed.log")" = 0 ]
[ "$(cli_rc 2)" = 0 ] && [ "$(cli_rc 3)" = 0 ] || { echo "guest output:"; cat "$work/cli.out"; }

# The log demo after such a flush, on the default split ring: QEMU's late
# completion is dropped, but it underflows QEMU's in-use count, so the
# append's second flush (its commit marker) meets NEEDS_RESET. The append
# recovers, says so, and is acknowledged (with --no-recover it failed).
rm -f "$work/packed.log"
truncate -s 0 "$work/pmem.img"
truncate -s 16M "$work/pmem.img"
start_failfs "$work/packed.log" --stall 3:3000 || true
check "failfs mounted for the log demo after a stalled flush, stalling fsync 3" mountpoint -q "$work/mnt"
"$bin/uvirtio-vm" --pmem "$work/mnt/pmem.img:16M" -- sh -c '
    P=$(uvirtio list --type pmem -q)
    uvirtio-pmlog $P init 2>&1; echo log0 rc=$?
    uvirtio pmem flush $P --timeout 1000 2>&1; echo log1 rc=$?
    uvirtio-pmlog $P append after-stall 2>&1; echo log2 rc=$?
    uvirtio-pmlog $P list 2>&1; echo log3 rc=$?
  ' 2>&1 | tr -d '\r' >"$work/log.out" || true
stop_failfs
log_rc() { sed -n "s/^log$1 rc=\([0-9]*\).*/\1/p" "$work/log.out" | head -n 1; }
check "init works, the stalled flush fails at its deadline (rc $(log_rc 0), $(log_rc 1))" \
  [ "$(log_rc 0)" = 0 -a -n "$(log_rc 1)" -a "$(log_rc 1)" != 0 ]
check "the next append is acknowledged: $(grep -B2 '^log2 rc=' "$work/log.out" | tr '\n' ' ')" \
  [ "$(log_rc 2)" = 0 -a "$(grep -c '^acked 1$' "$work/log.out")" = 1 ]
check "it says the device was reset and a flush sent again" \
  grep -q "uvirtio-pmlog: .*: the device was reset and a flush sent again" "$work/log.out"
check "the log holds the record once (rc $(log_rc 3))" \
  [ "$(log_rc 3)" = 0 -a "$(grep -c "^1	after-stall\$" "$work/log.out")" = 1 ]
[ "$(log_rc 2)" = 0 ] || { echo "guest output:"; cat "$work/log.out"; }
finish
