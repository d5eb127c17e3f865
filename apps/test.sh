#!/usr/bin/env bash
# The test job: the same set-up as the main job, then the whole suite:
#   1. release build (-Werror): unit tests, corpus replay, CLI checks and the
#      QEMU conformance tests (ctest);
#   2. ASan+UBSan build: unit tests, then the guest checks of
#      conformance.foundation and conformance.pmem_fsync_error again with
#      the sanitized uvirtio-conformance;
#   3. clang libFuzzer build (with the tools, so clang -Werror covers them):
#      each fuzz target for a bounded time;
#   4. clang-format check of every tracked C and C++ file;
#   5. cppcheck (its bug checks, not style) over the library and the tools.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash apps/setup-debian.sh
jobs=$(nproc)
fuzz_seconds=${UVIRTIO_FUZZ_SECONDS:-30}

echo "== release build: unit + conformance =="
ctest --test-dir build --output-on-failure -j1

echo "== ASan+UBSan build: unit tests =="
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DUVIRTIO_SANITIZE=ON -DUVIRTIO_WERROR=ON -DUVIRTIO_APPS=OFF >/dev/null
# Every tests/fuzz/fuzz_*.cpp is a target; its seeds are in tests/fuzz/corpus/NAME.
fuzz_targets=$(cd tests/fuzz && ls fuzz_*.cpp | sed 's/\.cpp$//')
# shellcheck disable=SC2086
cmake --build build-asan -j"$jobs" --target uvirtio_unit_tests $fuzz_targets
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --test-dir build-asan -L unit --output-on-failure -j"$jobs"

echo "== ASan+UBSan conformance binary against QEMU's devices =="
# The same guest checks with the sanitized uvirtio-conformance: the real
# VFIO, ring and recovery paths under ASan+UBSan (which abort on a finding).
# The guest needs more RAM for the larger binary.
cmake --build build-asan -j"$jobs" --target uvirtio-conformance
asan_conf=build-asan/tests/conformance/uvirtio-conformance
in_guest() { # CHECK-SCRIPT ARGS...: exit 77 is a skip, said once; anything else non-zero fails
  local rc=0
  UVIRTIO_VM_MEM=1G bash "$@" || rc=$?
  if [ "$rc" = 77 ]; then echo "skipped $1 (reason above)"; elif [ "$rc" != 0 ]; then exit "$rc"; fi
}
in_guest tests/conformance/run_guest_test.sh foundation build/bin "$asan_conf"
in_guest tests/conformance/pmem_fsync_error_test.sh build/bin build/tests/conformance/uvirtio-failfs "$asan_conf"

echo "== libFuzzer: ${fuzz_seconds}s per target =="
# The tools are built here too, so the whole tree also compiles warning-free
# with clang (gcc builds it above).
cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DUVIRTIO_FUZZ=ON -DUVIRTIO_WERROR=ON -DUVIRTIO_TESTS=OFF -DUVIRTIO_APPS=ON >/dev/null
cmake --build build-fuzz -j"$jobs"
for t in $fuzz_targets; do
  corpus=tests/fuzz/corpus/${t#fuzz_}
  scratch=$(mktemp -d)
  echo "$t:"
  build-fuzz/tests/fuzz/$t -max_total_time="$fuzz_seconds" -print_final_stats=1 "$scratch" "$corpus" 2>&1 |
    grep -E "^(Done|stat::number_of_executed_units|stat::new_units_added)|ERROR|SUMMARY"
  rm -rf "$scratch"
done
echo "== format check (clang-format) =="
git ls-files '*.cpp' '*.hpp' '*.c' '*.h' | xargs clang-format --dry-run --Werror
echo "== static analysis (cppcheck) =="
# Severity error and warning only (bugs: out-of-bounds, null and
# uninitialised use, leaks, ...): clean today, so any finding fails the job.
# The tests are left out: cppcheck cannot parse gtest's macros.
cppcheck --project=build/compile_commands.json --enable=warning --error-exitcode=1 --inline-suppr -q -j"$jobs" \
  --suppress=missingInclude --suppress=missingIncludeSystem --suppress='*:/usr/*' -i tests -i build \
  --template='{file}:{line}: {severity}: {message} [{id}]'
echo "== all tests passed =="
