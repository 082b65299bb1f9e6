#!/usr/bin/env bash
# Set up a fresh Debian machine for pykvm: the system packages the bundled guests need (gcc,
# binutils), pykvm itself in the repository's own virtual environment (.venv/), and `pykvm` on
# the PATH (/usr/local/bin/pykvm, a link to the venv's script). Run as root (KVM, the apt installs
# and /usr/local/bin need it).
# A virtual environment because Debian 12's Python refuses `pip install` outside one (PEP 668)
# and may come without pip at all; python3-venv is installed if venv cannot make one.
# `bash scripts/setup.sh test` also installs what the test suite needs (kernel headers for the
# uapi check, QEMU as the reference peer, iproute2/ping for TAP tests, iasl to disassemble the
# DSDT, etcd as an FT witness, gdb for the gdb stub's test), the test extras and the bundled Linux guest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$PWD/.venv"

updated=no
apt_install() {
    echo "setup: installing $*"
    export DEBIAN_FRONTEND=noninteractive
    if [ $updated = no ]; then
        apt-get update -qq
        updated=yes
    fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

packages=()
command -v python3 >/dev/null || packages+=(python3 python3-venv)
command -v gcc >/dev/null || packages+=(gcc libc6-dev)
command -v ld >/dev/null && command -v objcopy >/dev/null && command -v ar >/dev/null || packages+=(binutils)
if [ "${1:-}" = test ]; then
    [ -e /usr/include/linux/kvm.h ] || packages+=(linux-libc-dev)
    command -v qemu-system-x86_64 >/dev/null || packages+=(qemu-system-x86)
    command -v unshare >/dev/null || packages+=(util-linux)
    command -v ip >/dev/null || packages+=(iproute2)
    command -v ping >/dev/null || packages+=(iputils-ping)
    command -v iasl >/dev/null || packages+=(acpica-tools)
    command -v etcd >/dev/null || packages+=(etcd-server)
    command -v gdb >/dev/null || packages+=(gdb)
fi
if [ ${#packages[@]} -gt 0 ]; then
    apt_install "${packages[@]}"
fi

# A venv without pip is what a failed `python3 -m venv` leaves (Debian without python3-venv).
if [ ! -x "$VENV/bin/pip" ]; then
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        apt_install python3-venv
        python3 -m venv "$VENV"
    fi
fi
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ "${1:-}" = test ]; then
    "${pip[@]}" -e '.[test]'
else
    "${pip[@]}" .
fi
ln -sfn "$VENV/bin/pykvm" /usr/local/bin/pykvm

"$VENV/bin/pykvm" guests build >/dev/null
if [ "${1:-}" = test ]; then
    # The bundled Linux guest (kernel, initramfs, root disk): ~5-10 min the first time on 2 cores
    # (it installs linux-source-6.1 and the kernel's build tools with apt), cached afterwards.
    "$VENV/bin/pykvm" guests build linux >/dev/null
fi
