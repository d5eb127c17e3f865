#!/usr/bin/env bash
# A stock Linux guest pings uvirtio-vhost-net: the guest's own virtio-net
# driver (virtio_pci + virtio_net) over QEMU's -netdev vhost-user, served on
# the host by our back-end in the device role. With APP vhost-pci the same
# guest is served through uvirtio-vhost-pci instead: the vhost-pci device
# model takes the vhost-user session and the vhost-pci driver, bound to the
# function the model presents, serves the guest's rings through the BAR
# (vhost-pci-rfc: with the RFC's config acks instead of VHOST_PCI_F_ACKQ).
#   vhost_net_ping_test.sh BIN_DIR [MODE] [APP]
# MODE:
#   ping          (default) one guest, back-end with --once; EVENT_IDX and
#                 INDIRECT_DESC negotiated
#   no_event_idx  the same with event_idx=off on the NIC: interrupts and kicks
#                 go by the NO_INTERRUPT / NO_NOTIFY flags
#   reconnect     two guests one after the other on one back-end (no --once):
#                 the first session is torn down, the second served; SIGTERM
#                 ends the back-end with its summary
#   killed        like reconnect, but the first guest's QEMU is SIGKILLed in
#                 the middle of a long ping (its replies are not counted)
# Checks: each guest got 5 of 5 echo replies; the back-end answered ARP and 5
# echo requests per guest, counted no malformed packets and no ring errors,
# negotiated what the mode expects, and exited 0 with its summary.
# Exit 77 (skip) when QEMU or the guest kernel is missing.
set -euo pipefail
bin=$1
mode=${2:-ping}
kernel_dir=${UVIRTIO_KERNEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uvirtio/kernel}
qemu=${UVIRTIO_QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null || { echo "SKIP: QEMU not installed"; exit 77; }
[ -f "$kernel_dir/current/vmlinuz" ] || { echo "SKIP: no guest kernel in $kernel_dir"; exit 77; }

app=${3:-vhost-net}
app_args=()
gone='front-end disconnected'  # the log line of a finished session
case "$app" in
  vhost-net) ;;
  vhost-pci) gone='remote device withdrawn' ;;
  vhost-pci-rfc) app=vhost-pci; app_args=(--no-ackq); gone='remote device withdrawn' ;;
  *) echo "unknown app '$app'" >&2; exit 2 ;;
esac
vm_args=()
once=(--once)
guests=1
pre=  # run in the guest first
case "$mode" in
  # The guest's NIC belongs to its kernel's virtio-pci: `uvirtio bind --all`
  # must leave it there (the ping then still works).
  ping) pre='uvirtio bind --all && ' ;;
  no_event_idx) vm_args=(--dev-opt event_idx=off) ;;
  reconnect) once=(); guests=2 ;;
  killed) once=(); guests=2 ;;
  *) echo "unknown mode '$mode'" >&2; exit 2 ;;
esac

work=$(mktemp -d)
be_pid=
cleanup() {
  [ -n "$be_pid" ] && kill "$be_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
source "$(dirname "$0")/../support/tap.sh"
counter() {  # NAME: the back-end's summary counter NAME
  sed -n "s/.*summary:.* $1=\([0-9a-fx]*\).*/\1/p" "$work/backend.log" | tail -n 1
}
feature() {  # BIT: 1 when the summary's features have BIT
  local f
  f=$(counter features)
  echo $(((${f:-0} >> $1) & 1))
}

sock=$work/net.sock
"$bin/uvirtio-$app" serve --socket "$sock" --ip 10.0.2.1 "${app_args[@]}" "${once[@]}" >"$work/backend.log" 2>&1 &
be_pid=$!
for ((i = 0; i < 50; i++)); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "the back-end did not start:"; cat "$work/backend.log"; exit 1; }

first=1
if [ "$mode" = killed ]; then
  # Guest 1 pings until its QEMU is killed after three replies.
  "$bin/uvirtio-vm" --timeout 240 --vhost-user-net "$sock" -- \
    sh -c 'ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ping -c 1000 10.0.2.1' \
    >"$work/guest1.out" 2>&1 &
  vm_pid=$!
  # The guest's output reaches the file only when uvirtio-vm ends, so the
  # kill is timed from the back-end's log: served, then ~4 pings later.
  serving='serving the remote\|client connected'
  for ((i = 0; i < 1200; i++)); do grep -q "$serving" "$work/backend.log" && break; sleep 0.1; done
  sleep 8
  qemu_pid=$(pgrep -f "qemu-system.*$sock" | head -n 1 || true)
  check "guest 1's QEMU found (pid ${qemu_pid:-none})" [ -n "$qemu_pid" ]
  [ -n "$qemu_pid" ] && kill -KILL "$qemu_pid"
  wait "$vm_pid" || true
  for ((i = 0; i < 50; i++)); do grep -q "$gone" "$work/backend.log" && break; sleep 0.1; done
  check "the killed guest's session was torn down" grep -q "$gone" "$work/backend.log"
  check "guest 1 got replies before the kill" grep -q 'seq=0 ' "$work/guest1.out"
  first=2
fi
for ((g = first; g <= guests; g++)); do
  rc=0
  "$bin/uvirtio-vm" --timeout 240 --vhost-user-net "$sock" "${vm_args[@]}" -- \
    sh -c "$pre"'ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ping -c 5 -W 5 10.0.2.1' \
    >"$work/guest$g.out" 2>&1 || rc=$?
  echo "---- guest $g"
  cat "$work/guest$g.out"
  check "guest $g: command exited 0 (rc $rc)" [ "$rc" = 0 ]
  check "guest $g: 5 packets transmitted, 5 received" grep -q "5 packets transmitted, 5 packets received" "$work/guest$g.out"
  if [ -n "$pre" ]; then
    check "guest $g: bind --all left the NIC with its kernel driver" \
      grep -q "0000:01:00.0: left with virtio-pci" "$work/guest$g.out"
  fi
done

if [ ${#once[@]} -eq 0 ]; then
  # Served sessions end only on a signal.
  for ((i = 0; i < 50; i++)); do [ "$(grep -c "$gone" "$work/backend.log")" -ge "$guests" ] && break; sleep 0.1; done
  kill -TERM "$be_pid"
fi
# With --once the back-end exits when QEMU is gone.
be_rc=0
for ((i = 0; i < 100; i++)); do kill -0 "$be_pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$be_pid" 2>/dev/null; then
  echo "the back-end did not exit"
  kill "$be_pid"
  be_rc=124
fi
wait "$be_pid" || be_rc=$?
be_pid=

echo "---- back-end"
cat "$work/backend.log"
echo "----"
check "back-end exited 0 (rc $be_rc)" [ "$be_rc" = 0 ]
check "back-end printed its summary" grep -q "summary:" "$work/backend.log"
check "sessions=$guests ($(counter sessions))" [ "$(counter sessions)" = "$guests" ]
check "back-end answered ARP (arp_replies=$(counter arp_replies))" [ "$(counter arp_replies)" -ge "$guests" ]
if [ "$mode" = killed ]; then
  check "back-end answered the killed guest's and 5 more echo requests (icmp_replies=$(counter icmp_replies))" \
    [ "$(counter icmp_replies)" -ge 8 ]
else
  check "back-end answered $((5 * guests)) echo requests (icmp_replies=$(counter icmp_replies))" \
    [ "$(counter icmp_replies)" = $((5 * guests)) ]
fi
check "back-end sent every reply (sent=$(counter sent))" \
  [ "$(counter sent)" = $(($(counter arp_replies) + $(counter icmp_replies))) ]
check "no malformed packets (malformed=$(counter malformed))" [ "$(counter malformed)" = 0 ]
check "no ring errors (ring_errors=$(counter ring_errors))" [ "$(counter ring_errors)" = 0 ]
want_ei=1
[ "$mode" = no_event_idx ] && want_ei=0
check "VERSION_1 negotiated (features=$(counter features))" [ "$(feature 32)" = 1 ]
check "EVENT_IDX negotiated: $want_ei" [ "$(feature 29)" = "$want_ei" ]
if [ "$app" = vhost-pci ]; then
  vp() { sed -n "s/.*vhost-pci:.* $1=\([0-9]*\).*/\1/p" "$work/backend.log" | tail -n 1; }
  check "vhost-pci: $guests remote devices announced ($(vp announced))" [ "$(vp announced)" = "$guests" ]
  check "vhost-pci: $guests remote devices withdrawn ($(vp withdrawn))" [ "$(vp withdrawn)" = "$guests" ]
  want_ackq=1
  [ "${app_args[*]}" = --no-ackq ] && want_ackq=0
  check "vhost-pci: ackq=$want_ackq ($(vp ackq))" [ "$(vp ackq)" = "$want_ackq" ]
fi
[ $fail -eq 0 ] || { echo "$fail check(s) failed"; exit 1; }
echo "all checks passed"
