#!/usr/bin/env bash
# Boots a guest for one conformance configuration and runs its checks inside.
#   run_guest_test.sh NAME BIN_DIR CONFORMANCE_BINARY
# Exit 77 (CTest: skipped) when QEMU or the guest kernel is missing.
set -euo pipefail
name=$1
bin=$2
conf=$3
kernel_dir=${UVIRTIO_KERNEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uvirtio/kernel}
if ! command -v "${UVIRTIO_QEMU:-qemu-system-x86_64}" >/dev/null; then
  echo "SKIP: QEMU not installed (apps/setup-debian.sh installs it)"
  exit 77
fi
if [ ! -f "$kernel_dir/current/vmlinuz" ]; then
  echo "SKIP: no guest kernel in $kernel_dir (run: $bin/uvirtio-vm fetch-kernel)"
  exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
case "$name" in
  foundation)
    # rng with MSI-X, pmem with INTx only: the whole foundation suite.
    exec "$bin/uvirtio-vm" --rng --pmem "$work/pmem.img:16M" --add "$conf" -- uvirtio-conformance --gtest_color=no
    ;;
  foundation_intx_only)
    # The same rng checks with MSI-X switched off in the device (vectors=0):
    # completion must fall back to INTx + ISR + unmask.
    exec "$bin/uvirtio-vm" --rng --pmem "$work/pmem.img:16M" --qemu-arg -global --qemu-arg virtio-rng-pci.vectors=0 \
      --add "$conf" -- env UVIRTIO_EXPECT_MSIX=0 uvirtio-conformance --gtest_color=no
    ;;
  *)
    echo "unknown configuration $name" >&2
    exit 2
    ;;
esac
