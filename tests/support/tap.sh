# Shared by the shell tests: TAP-style checks.
#   source "$(dirname "$0")/../support/tap.sh"
#   check "what it shows" CONDITION...   # prints ok/not ok, counts
#   finish                                # summary line; exit 1 if any failed
# A condition is one command: chain tests inside it ([ a -a b ]), never with
# && after check (that would end the script instead of failing the check).
passed=0
fail=0
check() {  # DESCRIPTION CONDITION...
  local what=$1
  shift
  if "$@"; then echo "ok - $what"; passed=$((passed + 1)); else echo "not ok - $what"; fail=$((fail + 1)); fi
}
finish() {
  [ "$fail" -eq 0 ] || { echo "$fail check(s) failed, $passed passed"; exit 1; }
  echo "all checks passed ($passed)"
}
