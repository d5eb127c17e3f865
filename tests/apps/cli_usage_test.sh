#!/usr/bin/env bash
# Bad input to the command-line tools: a clear message and exit status 2,
# never a crash. Runs on the host, no device or root needed.
#   cli_usage_test.sh BIN_DIR
set -u
bin=$1
pass=0
fail=0
check() {  # WANT_STATUS WANT_TEXT CMD...
  local want=$1 text=$2
  shift 2
  local out status
  out=$("$@" 2>&1)
  status=$?
  if [ "$status" = "$want" ] && grep -qF -- "$text" <<<"$out"; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1))
    echo "FAIL: $* -> status $status (want $want), output: $out (want text: $text)"
  fi
}
u=$bin/uvirtio
vm=$bin/uvirtio-vm
check 2 "usage: uvirtio" "$u"
check 2 "unknown command 'frobnicate'" "$u" frobnicate
check 0 "commands:" "$u" --help
check 2 "expected DDDD:BB:DD.F" "$u" caps 00:zz.0
check 2 "caps: which function?" "$u" caps
check 2 "give one or more BDFs or --all" "$u" bind
check 2 "give one or more BDFs or --all" "$u" bind 00:03.0 --all
# One function named twice (two spellings): refused before anything is touched.
check 2 "bind: 0000:7f:1f.7 is given twice" "$u" bind 7f:1f.7 0000:7f:1f.7
check 2 "unbind: 0000:7f:1f.7 is given twice" "$u" unbind 0000:7f:1f.7 7F:1F.7
check 2 "-n must be between 1 and 1048576" "$u" rng read 00:03.0 -n 0
check 2 "-n must be between 1 and 1048576" "$u" rng read 00:03.0 -n 99999999
check 2 "how many bytes?" "$u" rng read 00:03.0
check 2 "the only subcommand is 'read'" "$u" rng write 00:03.0
check 2 "unrecognised option '--bogus'" "$u" list --bogus
check 2 "--timeout must be 1..3600000 ms" "$u" rng read 00:03.0 -n 4 --timeout 0
check 1 "0000:7f:1f.7: describe function: no such PCI function" "$u" rng read 0000:7f:1f.7 -n 4
check 1 "0000:7f:1f.7: read config space: no such PCI function" "$u" caps 0000:7f:1f.7
check 2 "usage: uvirtio pmem info" "$u" pmem
check 2 "unknown subcommand 'frob'" "$u" pmem frob
check 2 "--offset is required" "$u" pmem write 00:03.0 --data x
check 2 "exactly one of --data or --file" "$u" pmem write 00:03.0 --offset 0
check 2 "'-5' is not a non-negative integer" "$u" pmem write 00:03.0 --offset -5 --data x
check 2 "'12abc' is not a non-negative integer" "$u" pmem read 00:03.0 --offset 12abc --length 1
check 2 "--length must be 1..67108864" "$u" pmem read 00:03.0 --offset 0 --length 0
check 2 "pmem repersist: --offset and --length are required" "$u" pmem repersist 00:03.0 --offset 0
check 2 "pmem repersist: --length must be 1.." "$u" pmem repersist 00:03.0 --offset 0 --length 0
check 1 "0000:7f:1f.7: describe function: no such PCI function" "$u" pmem repersist 0000:7f:1f.7 --offset 0 --length 1
check 2 "--completion must be hybrid, interrupt or poll" "$u" pmem flush 00:03.0 --completion sometimes
check 2 "--threads values must be 1..64" "$u" pmem bench 00:03.0 --threads 0
# --no-recover only where a flush could recover: elsewhere it would do nothing.
check 2 "unrecognised option '--no-recover'" "$u" pmem bench 00:03.0 --no-recover
check 2 "unrecognised option '--no-recover'" "$u" pmem read 00:03.0 --offset 0 --length 1 --no-recover
check 2 "--no-recover needs --persist" "$u" pmem write 00:03.0 --offset 0 --data x --no-recover
check 1 "0000:7f:1f.7: describe function: no such PCI function" "$u" pmem flush 0000:7f:1f.7 --no-recover
check 1 "0000:7f:1f.7: describe function: no such PCI function" "$u" pmem info 0000:7f:1f.7
c=$bin/uvirtio-pmem-c  # the C API from C
check 2 "usage: uvirtio-pmem-c BDF OFFSET TEXT" "$c"
check 2 "OFFSET '-1' is not a non-negative integer" "$c" 0000:7f:1f.7 -1 x
check 2 "OFFSET '12abc' is not a non-negative integer" "$c" 0000:7f:1f.7 12abc x
check 2 "TEXT is empty" "$c" 0000:7f:1f.7 0 ""
check 2 "zz: parse PCI address" "$c" zz 0 x
check 1 "0000:7f:1f.7: describe function: no such PCI function" "$c" 0000:7f:1f.7 0 x
check 2 "usage: uvirtio-pmlog" "$bin/uvirtio-pmlog"
check 2 "unknown command 'frob'" "$bin/uvirtio-pmlog" 00:03.0 frob
check 2 "give record texts or --count N" "$bin/uvirtio-pmlog" 00:03.0 append
check 2 "expected DDDD:BB:DD.F" "$bin/uvirtio-pmlog" nobdf list
check 2 "usage: uvirtio-bench" "$bin/uvirtio-bench"
check 2 "unknown benchmark 'frob'" "$bin/uvirtio-bench" frob
check 1 "/nonexistent/file: open: No such file or directory" "$bin/uvirtio-bench" fsync /nonexistent/file --seconds 0.1
check 2 "rings: --size must be a power of two" "$bin/uvirtio-bench" rings --size 100
# Negative numbers to unsigned options are refused, not wrapped (-4294967040 was 256).
check 2 "the argument ('-4294967040') for option '--size' is invalid" "$bin/uvirtio-bench" rings --size -4294967040
check 2 "the argument ('-4294967264') for option '--batch' is invalid" "$bin/uvirtio-bench" rings --batch -4294967264
check 2 "the argument ('-4294967293') for option '--rounds' is invalid" "$bin/uvirtio-bench" channel --rounds -4294967293
check 2 "the argument ('4294967296') for option '--size' is invalid" "$bin/uvirtio-bench" channel --size 4294967296
check 2 "rings: --batch values must be 1..size" "$bin/uvirtio-bench" rings --batch 0
check 2 "rings: --seconds: -1.000000 is not a duration" "$bin/uvirtio-bench" rings --seconds -1
check 2 "channel: --ring-bytes must be 0 or a power of two" "$bin/uvirtio-bench" channel --ring-bytes 1000
check 2 "channel: --size must be at most a quarter of --small-ring-bytes" "$bin/uvirtio-bench" channel --small-ring-bytes 4096 --size 2048
check 2 "--dev-opt wants KEY=VALUE" "$vm" --dev-opt nokey
check 2 "--blk-opt wants KEY=VALUE" "$vm" --blk-opt nokey
check 2 "--blk-opt logical_block_size=4096 without a --blk device" "$vm" --rng --blk-opt logical_block_size=4096
check 2 "usage: uvirtio blk info" "$u" blk
check 2 "blk read: --sector is required" "$u" blk read 00:03.0
check 2 "blk read: --count must be 1..8192" "$u" blk read 00:03.0 --sector 0 --count 0
check 2 "blk write: give exactly one of --data or --file" "$u" blk write 00:03.0 --sector 0
check 2 "--kernel-pmem wants FILE:SIZE" "$vm" --kernel-pmem nosize
check 2 "--module: bad module name" "$vm" --module 'a b'
check 2 "unknown option '--frob'" "$vm" --frob
check 2 "--pmem wants FILE:SIZE" "$vm" --pmem nosize
check 2 "--blk: image '/nonexistent.img' does not exist" "$vm" --blk /nonexistent.img
check 2 "--timeout wants seconds" "$vm" --timeout soon
check 2 "option --qemu-arg needs a value" "$vm" --qemu-arg
check 2 "fetch-kernel takes no arguments" "$vm" fetch-kernel extra
check 0 "usage: uvirtio-vm" "$vm" --help
srv=$bin/uvirtio-ivshmem-server
check 2 "--size: 3145728 bytes is not a power of two" "$srv" -S /nonexistent/sock -l 3M
check 2 "--size: '4Q' is not a size" "$srv" -S /nonexistent/sock -l 4Q
check 2 "--vectors: must be 1..1024" "$srv" -S /nonexistent/sock -n 0
check 2 "unexpected argument 'extra'" "$srv" extra
check 0 "usage: uvirtio-ivshmem-server" "$srv" --help
for tool in vhost-net vhost-pci; do
  t=$bin/uvirtio-$tool
  check 2 "usage: uvirtio-$tool serve" "$t"
  check 2 "serve: --socket is required" "$t" serve --ip 10.0.2.1
  check 2 "serve: --ip is required" "$t" serve --socket /nonexistent/sock
  check 2 "--ip: '1.2.3' is not an IPv4 address" "$t" serve --socket /nonexistent/sock --ip 1.2.3
  check 2 "is a multicast address" "$t" serve --socket /nonexistent/sock --ip 10.0.2.1 --mac 01:00:00:00:00:01
  check 1 "bind /nonexistent/sock: No such file or directory" "$t" serve --socket /nonexistent/sock --ip 10.0.2.1
  check 2 "unknown command 'frob'" "$t" frob
done
check 2 "--peer-mac: 'zz' is not a MAC address" "$bin/uvirtio-vhost-pci" serve --socket /x --ip 10.0.2.1 --peer-mac zz
# Numbers are decimal or 0x hex: no octal for a leading 0, no sign, no
# blanks, nothing past 2^64 - 1.
check 2 "'+5' is not a non-negative integer" "$u" pmem write 00:03.0 --offset +5 --data x
check 2 "' 5' is not a non-negative integer" "$u" pmem write 00:03.0 --offset " 5" --data x
check 2 "'0x' is not a non-negative integer" "$u" pmem write 00:03.0 --offset 0x --data x
check 2 "below 2^64" "$u" pmem read 00:03.0 --offset 18446744073709551616 --length 1
check 2 "OFFSET ' 5' is not a non-negative integer" "$c" 0000:7f:1f.7 " 5" x
# "08" is eight (as octal it would be an error, and "010" would be 8):
# accepted as a number, so the error is the device's.
check 1 "0000:7f:1f.7: describe function" "$u" pmem write 0000:7f:1f.7 --offset 08 --data x
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# --file is read (and checked) before any device is opened.
mkdir "$scratch/adir"
check 1 "adir: pmem write --file: is a directory" "$u" pmem write 0000:7f:1f.7 --offset 0 --file "$scratch/adir"
check 1 "adir: blk write --file: is a directory" "$u" blk write 0000:7f:1f.7 --sector 0 --file "$scratch/adir"
check 1 "nofile: pmem write --file: cannot open: No such file" "$u" pmem write 0000:7f:1f.7 --offset 0 --file "$scratch/nofile"
# Usage errors of a benchmark come before the device is opened (it writes to it).
check 2 "--rounds must be 1..100" "$u" pmem bench 0000:7f:1f.7 --rounds 0
check 2 "expected DDDD:BB:DD.F" "$u" pmem bench 0000:7f:1f.7 --rng 0000:zz:00.0
check 2 "--host-fsync-us must be" "$u" pmem bench 0000:7f:1f.7 --host-fsync-us nan
b=$bin/uvirtio-bench
check 2 "is not a duration in seconds from 0.01 to 600" "$b" fsync "$scratch/f" --seconds 1e-9
check 2 "is not a duration in seconds from 0.01 to 600" "$b" rings --no-dpdk --seconds 1e-9
check 2 "is not a duration in seconds from 0.01 to 600" "$b" channel --seconds inf
# Files the user wrote are never overwritten by a benchmark or a channel.
seq 1 2000 >"$scratch/notes.txt"
sum=$(md5sum <"$scratch/notes.txt")
check 1 "holds data in its first 4 KiB" "$b" fsync "$scratch/notes.txt" --seconds 0.05
check 1 "holds data that is not a uvirtio channel" "$bin/uvirtio-ivchan" ping --shm "$scratch/notes.txt" --side 0 --timeout-ms 100
if [ "$(md5sum <"$scratch/notes.txt")" = "$sum" ]; then pass=$((pass + 1)); else
  fail=$((fail + 1)); echo "FAIL: notes.txt was modified"; fi
# Output that cannot be written is an error, not a silent exit 0. (Servers
# under `timeout`: one that wrongly starts must not hang the test.)
check 1 "write standard output" sh -c "'$u' --help >/dev/full"
check 1 "write standard output" sh -c "'$u' list >&-"
check 2 "--shm-path: the path is empty" timeout 10 "$srv" -S "$scratch/iv.sock" -m ""
check 2 "--shm-name: the name is empty" timeout 10 "$srv" -S "$scratch/iv.sock" -M ""
check 2 "is not a MAC address" timeout 10 "$bin/uvirtio-vhost-net" serve --socket "$scratch/s" --ip 10.0.2.1 --mac -2:00:00:00:00:01
check 2 "is not a MAC address" timeout 10 "$bin/uvirtio-vhost-pci" serve --socket "$scratch/s" --ip 10.0.2.1 --mac " 2:+0:0:0:0:1"
# Arguments a command does not take are refused, not ignored.
lg=$bin/uvirtio-pmlog
check 2 "init: unexpected argument 'extra'" "$lg" 0000:7f:1f.7 init extra words
check 2 "list: --count does not apply" "$lg" 0000:7f:1f.7 list --count 5
check 2 "append: --size and --tag go with --count" "$lg" 0000:7f:1f.7 append hi --tag x
check 2 "--count: 'abc' is not a non-negative integer" "$lg" 0000:7f:1f.7 append --count abc
check 2 "--size must be at most 1048576" "$lg" 0000:7f:1f.7 append --count 1 --size 99999999
check 0 "usage: uvirtio-pmlog" "$lg" 0000:7f:1f.7 init --help
check 2 "list: --type: unknown type 'nonsense'" "$u" list --type nonsense
check 2 "list: --json and --quiet are alternatives" "$u" list --json --quiet
check 2 "list: --all and --type are alternatives" "$u" list --all --type block
check 1 "0000:7f:1f.7: describe function" "$u" rng read 0000:7f:1f.7 -n 0x10
check 2 "unrecognised option '--json'" "$u" blk flush 0000:7f:1f.7 --json
check 2 "serve: --json does not apply" "$bin/uvirtio-ivchan" serve --shm "$scratch/z" --side 0 --json
# --poll is --completion poll: with another --completion one would be ignored.
check 2 "--poll and --completion interrupt contradict each other" "$u" pmem flush 0000:7f:1f.7 --poll --completion interrupt
check 1 "0000:7f:1f.7: describe function" "$u" pmem flush 0000:7f:1f.7 --poll --completion poll
# Counts are non-negative: a negative one is not wrapped around 2^32 (as a
# value<unsigned> would take "-4294967295" for 1).
check 2 "--threads: '-4294967295' is not a non-negative integer" "$u" pmem bench 0000:7f:1f.7 --threads -4294967295
check 2 "--rounds: '-4294967291' is not a non-negative integer" "$u" pmem bench 0000:7f:1f.7 --rounds -4294967291
check 2 "--gather-us: '-4294967295' is not a non-negative integer" "$u" pmem bench 0000:7f:1f.7 --gather-us -4294967295
check 1 "0000:7f:1f.7: describe function" "$u" pmem bench 0000:7f:1f.7 --threads 0x2 4 --rounds 0x3 --gather-us 0x10
# A flush deadline where no flush (or request) is sent would do nothing.
check 2 "unrecognised option '--timeout'" "$u" pmem read 0000:7f:1f.7 --offset 0 --length 1 --timeout 5
check 2 "unrecognised option '--timeout'" "$u" pmem info 0000:7f:1f.7 --timeout 5
check 2 "pmem write: --timeout needs --persist" "$u" pmem write 0000:7f:1f.7 --offset 0 --data x --timeout 5
check 1 "0000:7f:1f.7: describe function" "$u" pmem write 0000:7f:1f.7 --offset 0 --data x --persist --timeout 5
check 2 "--timeout must be 1..3600000 ms" "$u" pmem bench 0000:7f:1f.7 --timeout 0
check 2 "unrecognised option '--timeout'" "$u" blk info 0000:7f:1f.7 --timeout 5
check 2 "blk: --timeout must be 1..3600000 ms" "$u" blk flush 0000:7f:1f.7 --timeout 0
# Nothing to do is a usage error, not a device opened for an exit 0.
check 2 "append: --count must be at least 1" "$lg" 0000:7f:1f.7 append --count 0
# ping options of a part that does not run are refused, not ignored (side 0
# would otherwise format the file and wait for a peer).
truncate -s 1M "$scratch/chan"
check 2 "ping: --chunk goes with --bytes" "$bin/uvirtio-ivchan" ping --shm "$scratch/chan" --side 0 --chunk 100 --timeout-ms 100
check 2 "ping: --seed goes with --bytes" "$bin/uvirtio-ivchan" ping --shm "$scratch/chan" --side 0 --seed 7 --timeout-ms 100
check 2 "ping: --size goes with round trips" "$bin/uvirtio-ivchan" ping --shm "$scratch/chan" --side 0 --count 0 --size 32 --bytes 10 --timeout-ms 100
# pmem bench --kernel-file PATH writes PATH.0..PATH.3: never over a user's
# file, and that is known before the device is opened.
seq 1 2000 >"$scratch/kf.1"
ksum=$(md5sum <"$scratch/kf.1")
check 1 "kf.1: the file holds data in its first 256 KiB" "$u" pmem bench 0000:7f:1f.7 --kernel-file "$scratch/kf"
if [ "$(md5sum <"$scratch/kf.1")" = "$ksum" ] && [ ! -e "$scratch/kf.0" ]; then pass=$((pass + 1)); else
  fail=$((fail + 1)); echo "FAIL: pmem bench --kernel-file changed kf.1 or created kf.0"; fi
mkfifo "$scratch/kfifo.0"  # not seekable: refused at once, no hang in open()
check 1 "kfifo.0: Illegal seek" timeout 10 "$u" pmem bench 0000:7f:1f.7 --kernel-file "$scratch/kfifo"
check 0 "usage: uvirtio-pmem-c" "$c" --help
check 0 "usage: uvirtio-vhost-net serve" "$bin/uvirtio-vhost-net" serve --help
check 0 "usage: uvirtio-vhost-pci serve" "$bin/uvirtio-vhost-pci" serve --help
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
