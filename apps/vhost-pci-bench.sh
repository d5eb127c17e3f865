#!/usr/bin/env bash
# Benchmark: packets/s of DPDK testpmd's virtio-user txonly stream (64-byte
# packets, burst 32) received through vhost-pci by uvirtio-vhost-pci --poll,
# against DPDK's own vhost PMD (net_vhost, testpmd rxonly) receiving the same
# stream, alternating in the same run.
#   bash apps/vhost-pci-bench.sh [BIN_DIR] [SECONDS] [ROUNDS]
# Placement: the receiver (our app, or the net_vhost testpmd) on CPU 0, the
# sending testpmd on CPU 1. Both receivers are measured the same way: the
# sender's Tx-pps (packets the ring accepted, i.e. the receiver consumed),
# one sample per second, the first and last second dropped, median taken.
# Prints one line per run and a summary with the ratio (goal >= 1.0), and
# the summary as JSON on the last line.
set -euo pipefail
bin=${1:-build/bin}
secs=${2:-5}
rounds=${3:-3}
command -v dpdk-testpmd >/dev/null || { echo "dpdk-testpmd not installed (Debian package dpdk-dev)" >&2; exit 77; }
[ -x "$bin/uvirtio-vhost-pci" ] || { echo "no $bin/uvirtio-vhost-pci: build first" >&2; exit 2; }
work=$(mktemp -d)
cleanup() {
  pkill -INT -f "uvirtio-vhost-pci serve --socket $work" 2>/dev/null || true
  pkill -INT -f "file-prefix=uvb" 2>/dev/null || true
  sleep 0.5
  rm -rf "$work"
}
trap cleanup EXIT

eal=(--no-pci --no-huge -m 512)
pmd=(--total-num-mbufs=16384 --burst=32 --no-lsc-interrupt --stats-period 1)

# Runs the sender against SOCK for SECS seconds; prints the median Tx-pps.
send() {  # SOCK TAG
  timeout -s INT $((secs + 2)) dpdk-testpmd --lcores '0@1,1@1' "${eal[@]}" --file-prefix=uvb-tx \
    --vdev="net_virtio_user0,path=$1,queues=1,queue_size=256" -- "${pmd[@]}" \
    --forward-mode=txonly --txpkts=64 >"$work/$2.tx.log" 2>&1 || true
  sed -n 's/.*Tx-pps: *\([0-9]*\).*/\1/p' "$work/$2.tx.log" | sed '1d;$d' | sort -n |
    awk '{v[NR]=$1} END {if (NR == 0) print 0; else print v[int((NR + 1) / 2)]}'
}
wait_sock() { for ((i = 0; i < 100; i++)); do [ -S "$1" ] && return 0; sleep 0.05; done; return 1; }

vp_runs=() nv_runs=()
for ((r = 1; r <= rounds; r++)); do
  # uvirtio: vhost-pci device model + driver + app, busy-polling.
  sock=$work/vp$r.sock
  taskset -c 0 "$bin/uvirtio-vhost-pci" serve --socket "$sock" --ip 10.0.2.1 --poll >"$work/vp$r.app.log" 2>&1 &
  app=$!
  wait_sock "$sock" || { cat "$work/vp$r.app.log"; exit 1; }
  vp=$(send "$sock" vp$r)
  sleep 0.5
  kill -INT $app
  wait $app || true
  app_pps=$(sed -n 's/.* rx_pps=\([0-9]*\).*/\1/p' "$work/vp$r.app.log")
  errors=$(sed -n 's/.* ring_errors=\([0-9]*\).*/\1/p' "$work/vp$r.app.log")
  echo "round $r vhost-pci:  $vp pps (app's own count: ${app_pps:-?} pps, ring errors ${errors:-?})"
  vp_runs+=("$vp")

  # DPDK: testpmd's vhost PMD, rxonly.
  sock=$work/nv$r.sock
  timeout -s INT $((secs + 6)) dpdk-testpmd --lcores '0@0,1@0' "${eal[@]}" --file-prefix=uvb-rx \
    --vdev="net_vhost0,iface=$sock,queues=1" -- "${pmd[@]}" --forward-mode=rxonly \
    >"$work/nv$r.rx.log" 2>&1 &
  rx=$!
  wait_sock "$sock" || { cat "$work/nv$r.rx.log"; exit 1; }
  nv=$(send "$sock" nv$r)
  kill -INT $rx 2>/dev/null || true
  wait $rx || true
  echo "round $r net_vhost:  $nv pps"
  nv_runs+=("$nv")
done

median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print v[int((NR + 1) / 2)]}'; }
vpm=$(median "${vp_runs[@]}")
nvm=$(median "${nv_runs[@]}")
ratio=$(awk -v a="$vpm" -v b="$nvm" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}')
echo "median of $rounds rounds of ${secs} s, 64-byte packets, burst 32:"
echo "  vhost-pci (uvirtio) $vpm pps | net_vhost (DPDK) $nvm pps | ratio $ratio (goal >= 1.0)"
# The host moves this machine's two vCPUs between placements where both
# receivers run at 13-17 Mpps and placements where both drop to 4-6 Mpps
# (doc/benchmarks.md). Like with like: the rounds at or above half the run's
# best figure ("fast placement"), counted and compared on their own.
best=$(printf '%s\n' "${vp_runs[@]}" "${nv_runs[@]}" | sort -n | tail -n 1)
fast() { for v in "$@"; do [ $((v * 2)) -ge "$best" ] && echo "$v"; done; }
mapfile -t vp_fast < <(fast "${vp_runs[@]}")
mapfile -t nv_fast < <(fast "${nv_runs[@]}")
vpf=0 nvf=0 fratio=null
if [ ${#vp_fast[@]} -gt 0 ] && [ ${#nv_fast[@]} -gt 0 ]; then
  vpf=$(median "${vp_fast[@]}")
  nvf=$(median "${nv_fast[@]}")
  fratio=$(awk -v a="$vpf" -v b="$nvf" 'BEGIN {printf "%.2f", a / b}')
  echo "  fast-placement rounds only: vhost-pci $vpf pps (${#vp_fast[@]} of $rounds) | net_vhost $nvf pps (${#nv_fast[@]} of $rounds) | ratio $fratio"
else
  echo "  fast-placement rounds only: too few (vhost-pci ${#vp_fast[@]}, net_vhost ${#nv_fast[@]} of $rounds)"
fi
echo "{\"vhost_pci_pps\": $vpm, \"net_vhost_pps\": $nvm, \"ratio_vs_net_vhost\": $ratio, \"rounds\": $rounds, \"seconds\": $secs, \"fast_rounds\": {\"vhost_pci\": ${#vp_fast[@]}, \"net_vhost\": ${#nv_fast[@]}, \"vhost_pci_pps\": $vpf, \"net_vhost_pps\": $nvf, \"ratio\": $fratio}}"
