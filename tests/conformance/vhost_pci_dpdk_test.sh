#!/usr/bin/env bash
# DPDK's virtio-user as the vhost-pci front-end (no VM): testpmd's
# net_virtio_user port connects to uvirtio-vhost-pci's device model, the
# vhost-pci driver serves its rings.
#   vhost_pci_dpdk_test.sh BIN_DIR
# Session 1: testpmd macswap with --tx-first, the app with --reflect: packets
# bounce between the two for 3 s; every packet testpmd sent was received by
# the app and sent back, and testpmd received them (all but those in flight
# when it stopped). Session 2's packets are reflected too, but only into the
# receive buffers testpmd posted at start (txonly never reads them). Session 2: a new testpmd (txonly) on the same app, whose
# device model withdrew the first front-end and announces the second.
# Exit 77 (skip) when dpdk-testpmd is missing or cannot start here.
set -euo pipefail
bin=$1
command -v dpdk-testpmd >/dev/null || { echo "SKIP: dpdk-testpmd not installed (Debian package dpdk-dev)"; exit 77; }
work=$(mktemp -d)
app_pid=
cleanup() {
  [ -n "$app_pid" ] && kill "$app_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
source "$(dirname "$0")/../support/tap.sh"
num() {  # FILE KEY: the last "KEY: N" of a testpmd log
  sed -n "s/.*$2: *\([0-9]*\).*/\1/p" "$1" | tail -n 1
}
counter() {  # NAME: the app's summary counter NAME
  sed -n "s/.* $1=\([0-9a-fx]*\).*/\1/p" "$work/app.log" | tail -n 1
}
testpmd() {  # LOG SECONDS ARGS...: one testpmd session on the app's socket
  local log=$1 secs=$2
  shift 2
  # A prefix per session: the previous testpmd's runtime files may linger.
  timeout -s INT "$secs" dpdk-testpmd -l 0,1 --no-pci --no-huge -m 512 --file-prefix="uvt$$-$(basename "$log" .log)" \
    --vdev="net_virtio_user0,path=$sock,queues=1,queue_size=256" -- \
    --total-num-mbufs=16384 --burst=32 --no-lsc-interrupt "$@" >"$log" 2>&1 || true
}

sock=$work/net.sock
"$bin/uvirtio-vhost-pci" serve --socket "$sock" --ip 10.0.2.1 --reflect >"$work/app.log" 2>&1 &
app_pid=$!
for ((i = 0; i < 50; i++)); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "the app did not start:"; cat "$work/app.log"; exit 1; }

# Non-interactive testpmd stops (with its totals) on SIGINT.
testpmd "$work/tp1.log" 3 --forward-mode=macswap --tx-first --stats-period 1
if ! grep -q 'TX-packets' "$work/tp1.log"; then
  cat "$work/tp1.log"
  grep -q 'Cannot allocate\|Permission denied\|cannot init' "$work/tp1.log" &&
    { echo "SKIP: testpmd cannot start on this machine"; exit 77; }
fi
for ((i = 0; i < 50; i++)); do grep -q 'remote device withdrawn' "$work/app.log" && break; sleep 0.1; done
testpmd "$work/tp2.log" 2 --forward-mode=txonly --txpkts=64 --stats-period 1
for ((i = 0; i < 50; i++)); do [ "$(grep -c 'remote device withdrawn' "$work/app.log")" -ge 2 ] && break; sleep 0.1; done
kill -INT "$app_pid"
app_rc=0
wait "$app_pid" || app_rc=$?
app_pid=

echo "---- testpmd 1 (macswap)"
grep -E 'RX-packets|TX-packets' "$work/tp1.log" | tail -n 2
echo "---- testpmd 2 (txonly)"
grep -E 'TX-packets' "$work/tp2.log" | tail -n 1
echo "---- app"
cat "$work/app.log"
echo "----"
tx1=$(num "$work/tp1.log" TX-packets)
tx1=${tx1:-0}
rx1=$(num "$work/tp1.log" RX-packets)
rx1=${rx1:-0}
tx2=$(num "$work/tp2.log" TX-packets)
tx2=${tx2:-0}
check "app exited 0 (rc $app_rc)" [ "$app_rc" = 0 ]
check "testpmd 1 sent packets (TX-packets=${tx1:-none})" [ "${tx1:-0}" -gt 1000 ]
check "testpmd 1 got them back (RX-packets=${rx1:-none}, at most 256 in flight)" \
  [ "${rx1:-0}" -gt 1000 -a $((tx1 - rx1)) -le 256 -a "${rx1:-0}" -le "${tx1:-0}" ]
check "testpmd 2 sent packets (TX-packets=${tx2:-none})" [ "${tx2:-0}" -gt 1000 ]
# testpmd counts what it put on the ring; a burst still there when it stops
# the device stays unconsumed (the ring's base tells the next session).
rcv=$(counter received)
check "the app received every packet both sent, up to a ring's worth left at the stop ($rcv of $tx1 + $tx2)" \
  [ "${rcv:-0}" -le $((tx1 + tx2)) -a "${rcv:-0}" -ge $((tx1 + tx2 - 512)) ]
check "the app reflected every packet it received (reflected=$(counter reflected))" [ "$(counter reflected)" = "$rcv" ]
# Session 2 (txonly) posts only its initial 256 receive buffers.
sent=$(counter sent)
check "session 1's packets all went back (sent=$sent, session 1 sent $tx1)" \
  [ "${sent:-0}" -ge $((tx1 - 256)) -a $((${sent:-0} - tx1)) -le 256 ]
# DPDK's virtio-user accepts the IN_ORDER the app offers: its in-order
# transmit and receive paths ran against the device role.
features=$(counter features)
check "IN_ORDER negotiated (features=${features:-none})" [ $(((${features:-0} >> 35) & 1)) = 1 ]
check "no malformed packets, no ring errors" [ "$(counter malformed)" = 0 -a "$(counter ring_errors)" = 0 ]
check "two front-ends announced and withdrawn" grep -q 'announced=2 withdrawn=2' "$work/app.log"
if [ $fail -ne 0 ]; then
  for f in "$work"/tp1.log "$work"/tp2.log; do echo "---- $f"; grep -v '^EAL: \(Detected\|Multi\|Physical\|Selected\)' "$f" | tail -n 30; done
  echo "$fail check(s) failed"
  exit 1
fi
echo "all checks passed"
