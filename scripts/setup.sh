#!/usr/bin/env bash
# Set up a fresh Debian machine for pykvm: the system packages the bundled guests need (gcc,
# binutils) and pykvm itself. Run as root (KVM and the apt installs need it).
# `bash scripts/setup.sh test` also installs what the test suite needs (kernel headers for the
# uapi check, QEMU as the reference peer, iproute2/ping for TAP tests), the test extras and the
# bundled Linux guest.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v gcc >/dev/null || packages+=(gcc libc6-dev)
command -v ld >/dev/null && command -v objcopy >/dev/null && command -v ar >/dev/null || packages+=(binutils)
if [ "${1:-}" = test ]; then
    [ -e /usr/include/linux/kvm.h ] || packages+=(linux-libc-dev)
    command -v qemu-system-x86_64 >/dev/null || packages+=(qemu-system-x86)
    command -v unshare >/dev/null || packages+=(util-linux)
    command -v ip >/dev/null || packages+=(iproute2)
    command -v ping >/dev/null || packages+=(iputils-ping)
fi
if [ ${#packages[@]} -gt 0 ]; then
    echo "setup: installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

if [ "${1:-}" = test ]; then
    python3 -m pip install -q --disable-pip-version-check -e '.[test]'
else
    python3 -m pip install -q --disable-pip-version-check .
fi
python3 -m pykvm guests build >/dev/null
if [ "${1:-}" = test ]; then
    # The bundled Linux guest (kernel, initramfs, root disk): ~5-10 min the first time on 2 cores
    # (it installs linux-source-6.1 and the kernel's build tools with apt), cached afterwards.
    python3 -m pykvm guests build linux >/dev/null
fi
