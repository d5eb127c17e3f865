#!/usr/bin/env bash
# uvirtio-vm's argument checks, against a fake QEMU (no guest boots): a bad
# argument gives one clear line on stderr and status 2 before anything is
# created or built and before QEMU starts; valid arguments (paths with commas
# among them) reach QEMU exactly as expected.
#   vm_args_test.sh BIN_DIR
set -u
bin=$1
vm=$(cd "$bin" && pwd)/uvirtio-vm
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
d=$t/files           # the images and sockets the options name
de=${d//,/,,}        # $d as it appears inside a QEMU option string
mkdir -p "$d" "$t/tmp" "$t/path" "$t/bin" "$t/kernel/v1/modules/kernel/drivers"
ln -s v1 "$t/kernel/current"
: >"$t/kernel/v1/vmlinuz"
for m in irqbypass vfio vfio_virqfd vfio_iommu_type1 vfio-pci-core vfio-pci virtio_pci virtio_net virtio_pmem nd_pmem; do
  : >"$t/kernel/v1/modules/kernel/drivers/$m.ko"
done
# Stand-ins: uvirtio (not ELF, so not copied), busybox, modinfo (no
# dependencies), cpio (notes that the initramfs was built).
printf '#!/bin/sh\nexit 0\n' >"$t/bin/uvirtio"
printf '#!/bin/sh\nexit 0\n' >"$t/path/busybox"
printf '#!/bin/sh\nexit 0\n' >"$t/path/modinfo"
printf '#!/bin/sh\ncat >/dev/null\necho built >>"%s/built"\n' "$t" >"$t/path/cpio"
# The fake QEMU records its arguments, writes the command's output to the
# second serial port and "booted" and status 0 to the third, and exits.
cat >"$t/qemu" <<EOF
#!/usr/bin/env bash
printf '%s\n' "\$@" >"$t/qemu.args"
n=0 prev=
for a in "\$@"; do
  if [ "\$prev" = -serial ]; then
    n=\$((n + 1))
    case \$n in 2) echo "guest output" >"\${a#file:}" ;; 3) printf 'booted\n0\n' >"\${a#file:}" ;; esac
  fi
  prev=\$a
done
EOF
chmod +x "$t/bin/uvirtio" "$t/path/"* "$t/qemu"

pass=0
fail=0
extra_env=()
run() {  # ARGS...: uvirtio-vm with the fakes; sets status
  rm -f "$t/qemu.args" "$t/built"
  env -u UVIRTIO_VM_MEM PATH="$t/path:$PATH" TMPDIR="$t/tmp" UVIRTIO_QEMU="$t/qemu" UVIRTIO_KERNEL_DIR="$t/kernel" \
    "${extra_env[@]}" "$vm" --bin-dir "$t/bin" "$@" >"$t/stdout" 2>"$t/stderr"
  status=$?
}
listing() { (cd "$d" && find . -printf '%p %s\n' | sort); }
want_status=2  # what reject() expects: 2 for bad arguments, 7 for a host that cannot run the guest
reject() {  # TEXT ARGS...: status $want_status, one "uvirtio-vm: ...TEXT..." line on stderr, nothing created
  local text=$1 before problems=()
  shift
  before=$(listing)
  run "$@"
  [ "$status" = "$want_status" ] || problems+=("status $status, want $want_status")
  [ "$(wc -l <"$t/stderr")" = 1 ] && grep -q '^uvirtio-vm: ' "$t/stderr" || problems+=("stderr is not one uvirtio-vm: line")
  grep -qF -- "$text" "$t/stderr" || problems+=("stderr lacks '$text'")
  [ ! -e "$t/qemu.args" ] || problems+=("QEMU started")
  [ ! -e "$t/built" ] || problems+=("the initramfs was built")
  [ "$(listing)" = "$before" ] || problems+=("files under $d changed: $(diff <(echo "$before") <(listing) | tr '\n' ' ')")
  [ -z "$(ls -A "$t/tmp")" ] || problems+=("left in TMPDIR: $(ls -A "$t/tmp")")
  if [ ${#problems[@]} -eq 0 ]; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1))
    echo "FAIL: ${extra_env[*]} uvirtio-vm $*: $(printf '%s; ' "${problems[@]}")stderr: $(cat "$t/stderr")"
  fi
}
accept() {  # EXPECTED_ARGS_FILE ARGS...: status 0, the guest output, and QEMU got exactly the expected arguments
  local want=$1 problems=() work="" prev="" a got=()
  shift
  run "$@"
  [ "$status" = 0 ] || problems+=("status $status, want 0")
  [ "$(cat "$t/stdout")" = "guest output" ] || problems+=("stdout '$(cat "$t/stdout")'")
  [ ! -s "$t/stderr" ] || problems+=("stderr: $(cat "$t/stderr")")
  if [ -f "$t/qemu.args" ]; then
    # The work folder is a mktemp name: the folder of -initrd, shown as WORK.
    while IFS= read -r a; do
      [ "$prev" = -initrd ] && work=$(dirname "$a")
      prev=$a
    done <"$t/qemu.args"
    while IFS= read -r a; do got+=("${a//"$work"/WORK}"); done <"$t/qemu.args"
    diff -u "$want" <(printf '%s\n' "${got[@]}") >"$t/diff" || problems+=("QEMU arguments differ: $(cat "$t/diff")")
  else
    problems+=("QEMU did not start")
  fi
  [ -z "$(ls -A "$t/tmp")" ] || problems+=("left in TMPDIR: $(ls -A "$t/tmp")")
  if [ ${#problems[@]} -eq 0 ]; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1))
    echo "FAIL: ${extra_env[*]} uvirtio-vm $*: $(printf '%s; ' "${problems[@]}")"
  fi
}
check() {  # DESCRIPTION COMMAND...: a further check on a run's results
  local what=$1
  shift
  if "$@"; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAIL: $what"; fi
}

# ---- sizes -----------------------------------------------------------------
reject "--pmem $d/p.img:0: the size must not be zero" --pmem "$d/p.img:0"
reject "--pmem $d/p.img:000K: the size must not be zero" --pmem "$d/p.img:000K"
reject "'16Q' is not a size" --pmem "$d/p.img:16Q"
reject "'1.5M' is not a size" --pmem "$d/p.img:1.5M"
reject "--pmem wants FILE:SIZE" --pmem "$d/p.img"
reject "--pmem wants FILE:SIZE" --pmem ":16M"
reject "the size must be a multiple of 4K" --pmem "$d/p.img:1000"
reject "the size '99999999999999999999999G' is above 1T" --pmem "$d/p.img:99999999999999999999999G"
reject "the size '1025G' is above 1T" --pmem "$d/p.img:1025G"
reject "of pmem does not fit beside 256M of RAM" --pmem "$d/p.img:4G"
reject "of pmem does not fit beside 3G of RAM" --mem 3G --pmem "$d/p.img:512M" --pmem "$d/q.img:600M"
reject "--kernel-pmem $d/k.img:0: the size must not be zero" --kernel-pmem "$d/k.img:0"
reject "--ivshmem-plain $d/iv:3M: the size must be a power of two, at least 4K" --ivshmem-plain "$d/iv:3M"
reject "the size must be a power of two, at least 4K" --ivshmem-plain "$d/iv:2K"
reject "--ivshmem-plain $d/iv:0: the size must not be zero" --ivshmem-plain "$d/iv:0"
reject "--mem: the size must not be zero, got '0M'" --mem 0M
reject "--mem 8G: guest RAM must be below maxmem (4G)" --mem 8G
reject "--mem 4G: guest RAM must be below maxmem (4G)" --mem 4G
reject "--mem 4096M: guest RAM must be below maxmem (4G)" --mem 4096M
reject "--mem wants a size like 256M" --mem 256
reject "--mem wants a size like 256M" --mem 1T
extra_env=(UVIRTIO_VM_MEM=0G)
reject "UVIRTIO_VM_MEM: the size must not be zero" --rng
extra_env=(UVIRTIO_VM_MEM=lots)
reject "UVIRTIO_VM_MEM wants a size like 256M" --rng
extra_env=()
# ---- numbers ---------------------------------------------------------------
reject "--timeout wants seconds from 1 to 86400, got '0'" --timeout 0
reject "--timeout wants seconds from 1 to 86400, got '000'" --timeout 000
reject "--timeout wants seconds from 1 to 86400, got '99999999999999999999999'" --timeout 99999999999999999999999
reject "--timeout wants seconds from 1 to 86400, got '86401'" --timeout 86401
reject "--timeout wants seconds from 1 to 86400, got '-5'" --timeout -5
reject "--timeout wants seconds from 1 to 86400, got '1.5'" --timeout 1.5
# ---- paths -----------------------------------------------------------------
reject "--out: folder '/nonexistent/d' (for '/nonexistent/d/out') does not exist" --out /nonexistent/d/out
reject "--out: '$d' is a directory" --out "$d"
reject "--pmem: folder '$d/nodir' (for '$d/nodir/p.img') does not exist" --pmem "$d/nodir/p.img:16M"
reject "--pmem: '$d' is a directory" --pmem "$d:16M"
reject "--ivshmem-plain: folder '$d/nodir' (for '$d/nodir/iv') does not exist" --ivshmem-plain "$d/nodir/iv:4M"
truncate -s 4K "$d/small.img"
reject "--pmem: '$d/small.img' has 4096 bytes, fewer than the 16777216 asked for" --pmem "$d/small.img:16M"
reject "--blk: image '$d/none.img' does not exist" --blk "$d/none.img"
reject "--blk: image '$d/none,readonly=on' does not exist" --blk "$d/none,readonly=on"
reject "--add: '$d/none' does not exist" --add "$d/none"
reject "--add: guest path 'rel/path' must be absolute" --add "$d/small.img:rel/path"
reject "--ivshmem: '$d/small.img' is not a socket" --ivshmem "$d/small.img"
reject "module nosuchmod not found under" --module nosuchmod
reject "--no-iommu needs vfio modules built with CONFIG_VFIO_NOIOMMU" --no-iommu --rng
if [ "$(id -u)" != 0 ]; then  # root may write anywhere
  mkdir "$d/ro" && chmod a-w "$d/ro"
  reject "--out: cannot create '$d/ro/out': folder '$d/ro' is not writable" --out "$d/ro/out"
  chmod u+w "$d/ro" && rmdir "$d/ro"
fi
# A bad argument after a good FILE:SIZE one: the good one's image is not created either.
reject "--timeout wants seconds" --pmem "$d/new.img:16M" --timeout 0
reject "--out: folder '/nonexistent/d'" --ivshmem-plain "$d/new-iv:4M" --pmem "$d/new.img:16M" --out /nonexistent/d/out
reject "--mem 8G: guest RAM must be below maxmem" --pmem "$d/new.img:16M" --mem 8G
# --add's guest path is joined to the initramfs folder on the host: no way
# out of it (here onto $d/victim), not the harness's own /init or /cmd, and
# not one path twice.
echo precious >"$d/victim"
reject "--add: guest path '/../../../files/victim' must not have '.', '..' or empty parts" --add "$d/small.img:/../../../files/victim"
check "--add left '$d/victim' alone" [ "$(cat "$d/victim")" = precious ]
reject "--add: guest path '/usr/local/bin/' must not have" --add "$d/small.img:/usr/local/bin/"
reject "--add: guest path '/init' is the harness's own" --add "$d/small.img:/init"
reject "--add: guest path '/cmd' is the harness's own" --add "$d/victim:/cmd"
mkdir "$d/sub" && cp "$d/small.img" "$d/sub/small.img"
reject "--add: guest path '/usr/bin/small.img' is given twice" --add "$d/small.img" --add "$d/sub/small.img"
reject "--add: guest path '/opt/x' is given twice" --add "$d/small.img:/opt/x" --add "$d/victim:/opt/x"
# One file, one use: --out would empty a device's image, and two devices on
# one file would write over each other's data.
truncate -s 1M "$d/disk.img" && echo "user data" | dd of="$d/disk.img" conv=notrunc status=none
ln -s disk.img "$d/disk-link"
reject "--out '$d/disk.img' is the file of --blk '$d/disk.img'" --blk "$d/disk.img" --out "$d/disk.img"
reject "--out '$d/disk-link' is the file of --pmem '$d/disk.img'" --pmem "$d/disk.img:1M" --out "$d/disk-link"
reject "--out '$d/fresh.img' is the file of --pmem '$d/fresh.img'" --out "$d/fresh.img" --pmem "$d/fresh.img:16M"
reject "--out '$d/./fresh-iv' is the file of --ivshmem-plain '$d/fresh-iv'" --ivshmem-plain "$d/fresh-iv:4M" --out "$d/./fresh-iv"
reject "--pmem '$d/disk.img' and --blk '$d/disk-link' are one file" --pmem "$d/disk.img:1M" --blk "$d/disk-link"
reject "--pmem '$d/fresh.img' and --kernel-pmem '$d/fresh.img' are one file" --pmem "$d/fresh.img:16M" --kernel-pmem "$d/fresh.img:16M"
check "--out and --blk left '$d/disk.img' alone" [ "$(head -c 10 "$d/disk.img")" = "user data" ]
# Two ivshmem-plain devices on one file share its memory: allowed.
run --ivshmem-plain "$d/shared-iv:4M" --ivshmem-plain "$d/shared-iv:4M" -- true
check "two --ivshmem-plain on one file start the guest (status $status: $(cat "$t/stderr"))" [ "$status" = 0 ]
rm -f "$d/shared-iv"
# One-value options given twice: the first would be silently replaced.
reject "option --out is given twice" --out "$d/o1" --out "$d/o2"
reject "option --timeout is given twice" --timeout 30 --rng --timeout 60
reject "option --mem is given twice" --mem 512M --mem 1G
reject "option --bin-dir is given twice" --bin-dir "$t/bin"
reject "option --kernel-dir is given twice" --kernel-dir "$t/kernel" --kernel-dir "$t/kernel"
# A host that cannot run the guest: status 7, told apart from bad arguments.
want_status=7
extra_env=(UVIRTIO_QEMU=/nonexistent/qemu-system-x86_64)
reject "QEMU binary '/nonexistent/qemu-system-x86_64' not found" --rng
extra_env=(UVIRTIO_KERNEL_DIR=$d/nokernel)
reject "no kernel in $d/nokernel (run 'uvirtio-vm fetch-kernel' first)" --pmem "$d/new.img:16M"
extra_env=()
want_status=2

# ---- valid arguments: paths with commas stay file names --------------------
truncate -s 1M "$d/disk,readonly=on"
cat >"$t/want1" <<EOF
-accel
tcg
-machine
q35
-cpu
max
-m
512M,slots=2,maxmem=4G
-smp
1
-nographic
-no-reboot
-nic
none
-kernel
$t/kernel/current/vmlinuz
-initrd
WORK/initrd
-device
pcie-root-port,id=rp1,chassis=1,slot=1
-drive
if=none,id=blk1,format=raw,file=$de/disk,,readonly=on,cache=none,aio=threads
-device
virtio-blk-pci,drive=blk1,bus=rp1,disable-legacy=on,iommu_platform=on
-device
pcie-root-port,id=rp2,chassis=2,slot=2
-object
memory-backend-file,id=pmem2,share=on,mem-path=$de/pm,,size=1.img,size=16M
-device
virtio-pmem-pci,memdev=pmem2,bus=rp2,disable-legacy=on,iommu_platform=on
-device
pcie-root-port,id=rp3,chassis=3,slot=3
-object
memory-backend-file,id=ivmem3,share=on,mem-path=$de/iv,,x,size=4M
-device
ivshmem-plain,memdev=ivmem3,bus=rp3
-serial
file:WORK/console
-serial
file:$d/out,1.txt
-serial
file:WORK/status
-serial
file:WORK/bind
-append
console=ttyS0 panic=-1 quiet loglevel=3 intel_iommu=on
-device
intel-iommu,intremap=on
EOF
accept "$t/want1" --blk "$d/disk,readonly=on" --pmem "$d/pm,size=1.img:16M" --ivshmem-plain "$d/iv,x:4M" \
  --out "$d/out,1.txt" --mem 512M --timeout 30 -- true
check "--pmem created '$d/pm,size=1.img' with 16M" [ "$(stat -c %s "$d/pm,size=1.img" 2>/dev/null)" = $((16 << 20)) ]
check "--ivshmem-plain created '$d/iv,x' with 4M" [ "$(stat -c %s "$d/iv,x" 2>/dev/null)" = $((4 << 20)) ]
check "--out wrote '$d/out,1.txt'" [ "$(cat "$d/out,1.txt" 2>/dev/null)" = "guest output" ]

# Sockets with commas, UVIRTIO_VM_MEM, leading zeros, a relative --blk path
# with a colon (QEMU would read "a:" as a protocol), an existing larger image.
if python3 -c 'import socket, sys
for p in sys.argv[1:]: socket.socket(socket.AF_UNIX).bind(p)' "$d/iv,sock" "$d/vu,sock" 2>/dev/null; then
  truncate -s 1M "$d/a:b.img"
  truncate -s 32M "$d/kp,big.img"
  cat >"$t/want2" <<EOF
-accel
tcg
-machine
q35
-cpu
max
-m
1G,slots=2,maxmem=4G
-smp
1
-nographic
-no-reboot
-nic
none
-kernel
$t/kernel/current/vmlinuz
-initrd
WORK/initrd
-object
memory-backend-memfd,id=uvram,size=1G,share=on
-machine
memory-backend=uvram
-device
pcie-root-port,id=rp1,chassis=1,slot=1
-chardev
socket,path=$de/iv,,sock,id=ivsh1
-device
ivshmem-doorbell,chardev=ivsh1,vectors=2,bus=rp1
-device
pcie-root-port,id=rp2,chassis=2,slot=2
-chardev
socket,id=vun2,path=$de/vu,,sock
-netdev
vhost-user,id=net2,chardev=vun2
-device
virtio-net-pci,netdev=net2,bus=rp2,disable-legacy=on,vectors=0
-device
pcie-root-port,id=rp3,chassis=3,slot=3
-object
memory-backend-file,id=pmem3,share=on,mem-path=$de/kp,,big.img,size=16M
-device
virtio-pmem-pci,memdev=pmem3,bus=rp3,disable-legacy=on,iommu_platform=on
-device
pcie-root-port,id=rp4,chassis=4,slot=4
-drive
if=none,id=blk4,format=raw,file=./a:b.img,cache=none,aio=threads
-device
virtio-blk-pci,drive=blk4,bus=rp4,disable-legacy=on,iommu_platform=on
-serial
file:WORK/console
-serial
file:WORK/out
-serial
file:WORK/status
-serial
file:WORK/bind
-append
console=ttyS0 panic=-1 quiet loglevel=3 intel_iommu=on
-device
intel-iommu,intremap=on
EOF
  extra_env=(UVIRTIO_VM_MEM=1G)
  cd "$d" || exit 1  # so that a:b.img is relative
  accept "$t/want2" --ivshmem "$d/iv,sock" --vhost-user-net "$d/vu,sock" \
    --kernel-pmem "$d/kp,big.img:0016M" --blk a:b.img --timeout 007 -- true
  cd - >/dev/null || exit 1
  extra_env=()
  check "an existing larger --kernel-pmem image keeps its size" [ "$(stat -c %s "$d/kp,big.img")" = $((32 << 20)) ]
else
  echo "note: python3 cannot make unix sockets here; skipped the socket case"
fi

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
