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
check 2 "-n must be between 1 and 1048576" "$u" rng read 00:03.0 -n 0
check 2 "-n must be between 1 and 1048576" "$u" rng read 00:03.0 -n 99999999
check 2 "how many bytes?" "$u" rng read 00:03.0
check 2 "the only subcommand is 'read'" "$u" rng write 00:03.0
check 2 "unrecognised option '--bogus'" "$u" list --bogus
check 2 "--timeout must be 1..3600000 ms" "$u" rng read 00:03.0 -n 4 --timeout 0
check 1 "0000:7f:1f.7: describe function: no such PCI function" "$u" rng read 0000:7f:1f.7 -n 4
check 1 "0000:7f:1f.7: read config space: no such PCI function" "$u" caps 0000:7f:1f.7
check 2 "unknown option '--frob'" "$vm" --frob
check 2 "--pmem wants FILE:SIZE" "$vm" --pmem nosize
check 2 "--blk: image '/nonexistent.img' does not exist" "$vm" --blk /nonexistent.img
check 2 "--timeout wants seconds" "$vm" --timeout soon
check 2 "option --qemu-arg needs a value" "$vm" --qemu-arg
check 2 "fetch-kernel takes no arguments" "$vm" fetch-kernel extra
check 0 "usage: uvirtio-vm" "$vm" --help
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
