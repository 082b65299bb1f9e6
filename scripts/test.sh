#!/usr/bin/env bash
# Set up a fresh Debian machine for pykvm's tests and run them: system packages (toolchain for the
# guests, kernel headers for the uapi check, QEMU as the peer), the package with its test extras,
# the guests, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v gcc >/dev/null || packages+=(gcc libc6-dev)
command -v ld >/dev/null && command -v objcopy >/dev/null || packages+=(binutils)
[ -e /usr/include/linux/kvm.h ] || packages+=(linux-libc-dev)
command -v qemu-system-x86_64 >/dev/null || packages+=(qemu-system-x86)
command -v unshare >/dev/null || packages+=(util-linux)
command -v ip >/dev/null || packages+=(iproute2)
command -v ping >/dev/null || packages+=(iputils-ping)
if [ ${#packages[@]} -gt 0 ]; then
    echo "installing: ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -m pykvm guests build
exec python3 -m pytest "$@"
