#!/usr/bin/env bash
# Installs what uvirtio needs on a Debian 12 machine, fetches the guest
# kernel and builds the project into build/.
#   bash apps/setup-debian.sh            packages + kernel + release build
#   UVIRTIO_SKIP_APT=1 ...               skip the package step (already installed)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

packages=(
  build-essential cmake pkg-config            # toolchain
  clang libclang-rt-14-dev clang-format       # fuzz targets (libFuzzer), formatting check
  cppcheck                                    # static analysis in the test job
  libpci-dev libboost-program-options-dev nlohmann-json3-dev googletest libgtest-dev zlib1g-dev
  qemu-system-x86 busybox-static cpio kmod    # the guest harness
  strace xz-utils e2fsprogs                   # strace: fsync counting; mkfs.ext4: pmem benchmark
  libfuse3-dev                                # uvirtio-failfs: a backing file whose host fsync fails
  dpdk dpdk-dev                               # testpmd: vhost-pci front-end and baseline
)

if [ "${UVIRTIO_SKIP_APT:-0}" != 1 ]; then
  sudo=
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "setup: run as root or install sudo" >&2; exit 1; }
    sudo=sudo
  fi
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # apt-cache needs fresh lists to name the current kernel package.
  [ -n "$(apt-cache depends linux-image-amd64 2>/dev/null | grep 'Depends: linux-image-[0-9]')" ] || $sudo apt-get update -qq
fi

bash apps/uvirtio-vm fetch-kernel

cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DUVIRTIO_WERROR=ON >/dev/null
cmake --build build -j"$(nproc)"
echo "setup: built into $top/build (binaries in build/bin)"
