#!/usr/bin/env bash
# uvirtio-ivshmem-server against real QEMUs on the host (no guest kernel: the
# machines stay stopped with -S; the ivshmem-doorbell device talks to the
# server while QEMU starts):
#  1. two QEMUs join (ids 0 and 1) and realise the device (HMP 'info pci');
#  2. the first is killed with SIGKILL: the server announces the leave, the
#     other QEMU keeps running and closes the departed peer's eventfds;
#  3. a third QEMU joins with a fresh id (2, not the freed 0) and the second
#     QEMU takes its eventfds;
#  4. no QEMU complained on stderr; they quit cleanly and the server, on
#     SIGTERM, exits 0 and removes its socket.
#   ivshmem_server_qemu_test.sh BIN_DIR      (exit 77: QEMU or its ivshmem-doorbell missing)
set -uo pipefail
bin=$1
qemu=${UVIRTIO_QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null || { echo "SKIP: QEMU not installed"; exit 77; }
"$qemu" -device help 2>/dev/null | grep -q '"ivshmem-doorbell"' ||
  { echo "SKIP: $qemu has no ivshmem-doorbell device"; exit 77; }

work=$(mktemp -d /tmp/ivsrv-qemu.XXXXXX)  # short: a socket path has at most 107 bytes
sock=$work/sock
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

source "$(dirname "$0")/../support/tap.sh"
# Polls CONDITION... every 0.05 s for up to 10 s.
eventually() {
  local i
  for ((i = 0; i < 200; i++)); do
    "$@" && return 0
    sleep 0.05
  done
  return 1
}
logged() { grep -qF -- "$1" "$work/server.err"; }
eventfds() { find "/proc/$1/fd" -lname 'anon_inode:\[eventfd\]' 2>/dev/null | wc -l; }
has_eventfds() { [ "$(eventfds "$1")" = "$2" ]; }
alive() { kill -0 "$1" 2>/dev/null; }

"$bin/uvirtio-ivshmem-server" -S "$sock" -l 1M -n 2 -v --ready-file "$work/ready" \
  >"$work/server.out" 2>"$work/server.err" &
server=$!
pids+=("$server")
check "the server starts listening" eventually test -e "$work/ready"
[ $fail = 0 ] || { cat "$work/server.err"; exit 1; }

# start_qemu NAME: a stopped q35 machine with the device, HMP on a fifo.
# Sets NAME_pid and NAME_mon (the fd to write monitor commands to).
start_qemu() {
  local n=$1 fd
  mkfifo "$work/$n.in"
  "$qemu" -M q35 -accel tcg -S -nodefaults -display none -monitor stdio \
    -chardev socket,path="$sock",id=ivs -device ivshmem-doorbell,chardev=ivs,vectors=2 \
    <"$work/$n.in" >"$work/$n.out" 2>"$work/$n.err" &
  pids+=($!)
  printf -v "${n}_pid" %s $!
  exec {fd}>"$work/$n.in"
  printf -v "${n}_mon" %s "$fd"
}
# realised NAME: the device is on the PCI bus (1af4:1110 with a 64-bit BAR2).
realised() {
  local mon=${1}_mon
  echo "info pci" >&"${!mon}"
  eventually grep -q "PCI device 1af4:1110" "$work/$1.out" &&
    eventually grep -q "BAR2: 64 bit prefetchable memory" "$work/$1.out"
}

start_qemu a
check "QEMU a joins as peer 0" eventually logged "peer 0 joined"
check "QEMU a realised ivshmem-doorbell" realised a
start_qemu b
check "QEMU b joins as peer 1" eventually logged "peer 1 joined"
check "QEMU b realised ivshmem-doorbell" realised b
# b holds its own 2 eventfds, a's 2 and QEMU's internal ones.
b_base=$(eventfds "$b_pid")

kill -KILL "$a_pid"
wait "$a_pid" 2>/dev/null
check "the server announces that peer 0 left" eventually logged "peer 0 left"
check "QEMU b keeps running" alive "$b_pid"
check "QEMU b closed peer 0's 2 eventfds ($b_base -> $((b_base - 2)))" eventually has_eventfds "$b_pid" $((b_base - 2))

start_qemu c
check "QEMU c joins with a fresh id, 2" eventually logged "peer 2 joined"
check "QEMU c realised ivshmem-doorbell" realised c
check "QEMU b took peer 2's 2 eventfds" eventually has_eventfds "$b_pid" "$b_base"
check "QEMU b is still running" alive "$b_pid"
check "the server holds its stop eventfd and 2 per peer (b, c)" eventually has_eventfds "$server" 5

for n in a b c; do
  check "QEMU $n said nothing on stderr" test ! -s "$work/$n.err"
done
for n in b c; do
  mon=${n}_mon
  pid=${n}_pid
  echo quit >&"${!mon}"
  wait "${!pid}"
  check "QEMU $n quits with status 0" test $? = 0
done
check "the server announces that peers 1 and 2 left" eventually eval 'logged "peer 1 left" && logged "peer 2 left"'

kill -TERM "$server"
wait "$server"
check "the server exits 0 on SIGTERM" test $? = 0
check "the server removed its socket" test ! -e "$sock"
check "no id other than 0, 1 and 2 was given out" test "$(grep -c joined "$work/server.err")" = 3

echo "$passed passed, $fail failed"
if [ $fail != 0 ]; then
  for f in server.out server.err a.err b.err c.err; do
    echo "--- $f"
    cat "$work/$f"
  done
  exit 1
fi
