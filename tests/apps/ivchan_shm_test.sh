#!/usr/bin/env bash
# uvirtio-ivchan between two host processes over a shared file (no VM): ping,
# bulk transfer with CRC-32, a peer killed with SIGKILL then replaced, and bad
# input refused with a message and exit status 2.
#   ivchan_shm_test.sh BIN_DIR
set -uo pipefail
bin=$1
iv=$bin/uvirtio-ivchan
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
source "$(dirname "$0")/../support/tap.sh"
wait_for() {  # FILE PATTERN SECONDS
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    grep -q -- "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
usage_fails() {  # PATTERN ARGS...: exit status 2 and PATTERN in the message
  local pat=$1 out rc
  shift
  out=$("$iv" "$@" 2>&1)
  rc=$?
  [ $rc = 2 ] && grep -q -- "$pat" <<<"$out"
}

shm=$work/window
truncate -s 1M "$shm"

# 1. ping + bulk, one session.
"$iv" serve --shm "$shm" --side 0 --sessions 1 >"$work/a1.out" 2>&1 &
a=$!
wait_for "$work/a1.out" "serve: ready" 10
"$iv" ping --shm "$shm" --side 1 --count 500 --bytes 3000000 --chunk 1000 >"$work/b1.out" 2>&1
rc_b=$?
wait $a
rc_a=$?
check "ping exits 0 ($rc_b) and the server too ($rc_a)" [ "$rc_b$rc_a" = 00 ]
check "500 round trips echoed intact" grep -q "500 round trips of 64 bytes, every echo intact" "$work/b1.out"
check "3000000 bytes in 3000 messages, CRCs match on both ends" \
  grep -q "send: 3000000 bytes in 3000 messages.*: match" "$work/b1.out"
check "server checked the bulk data" grep -q "bulk 3000000 bytes, crc32 .*: match" "$work/a1.out"

# 2. The initiator is killed mid-stream; the server notices within its peer
#    timeout and serves a new initiator on the same window.
"$iv" serve --shm "$shm" --side 0 --sessions 2 --peer-timeout-ms 300 >"$work/a2.out" 2>&1 &
a=$!
"$iv" ping --shm "$shm" --side 1 --count 4000000000 --peer-timeout-ms 300 >/dev/null 2>&1 &
b=$!
wait_for "$work/a2.out" "session 1: peer present" 10
sleep 0.3
kill -KILL $b
wait $b 2>/dev/null
killed=$(date +%s%N)
wait_for "$work/a2.out" "session 1: peer gone" 10
seen=$(date +%s%N)
delay_ms=$(((seen - killed) / 1000000))
check "peer gone reported ${delay_ms} ms after SIGKILL (timeout 300 ms, allowed 2000)" \
  [ "$(grep -c 'session 1: peer gone' "$work/a2.out")" = 1 -a "$delay_ms" -le 2000 ]
"$iv" ping --shm "$shm" --side 1 --count 50 --bytes 10000 --peer-timeout-ms 300 >"$work/c.out" 2>&1
check "a new initiator is served afterwards" grep -q "50 round trips of 64 bytes, every echo intact" "$work/c.out"
wait $a
check "the server ends its second session cleanly ($?)" grep -q "session 2: peer said goodbye after 50 pings" "$work/a2.out"

# 3. Bad input.
check "no target" usage_fails "give a BDF or --shm" ping --side 1
check "both a BDF and --shm" usage_fails "one of them" ping 0000:01:00.0 --shm "$shm" --side 1
check "missing --side" usage_fails "side 0 or --side 1 is required" serve --shm "$shm"
check "--side 2" usage_fails "must be 0 or 1" serve --shm "$shm" --side 2
check "message too small" usage_fails "at least 16" ping --shm "$shm" --side 1 --size 8
check "send without --bytes" usage_fails "--bytes N is required" send --shm "$shm" --side 1
check "bad number" usage_fails "--count" ping --shm "$shm" --side 1 --count ten
check "unknown command" usage_fails "unknown command" frobnicate
check "bad BDF" usage_fails "" info 00:zz
runtime_fails() {  # PATTERN ARGS...: exit status 1 and PATTERN in the message
  local pat=$1 out rc
  shift
  out=$("$iv" "$@" 2>&1)
  rc=$?
  echo "  ($out)"
  [ $rc = 1 ] && grep -q -- "$pat" <<<"$out"
}
check "a missing file: exit 1, the file named" runtime_fails "missing: open shared file" ping --shm "$work/missing" --side 1
truncate -s 100 "$work/tiny"
check "a window too small for a channel is refused" runtime_fails "tiny: attach: window of 100 bytes" \
  serve --shm "$work/tiny" --side 0
echo "$passed passed, $fail failed"
[ $fail = 0 ]
