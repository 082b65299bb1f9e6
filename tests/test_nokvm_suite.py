"""The promise of the `nokvm` marker, kept in CI: `pytest -m nokvm` passes on a host whose /dev/kvm
is unusable. Here that host is made: a private mount namespace with an empty regular file bound
over /dev/kvm, which opens like the device but fails every ioctl."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO, requires_kvm

MINIMUM_PASSED = 30
# Each of these must have passing tests in that run: devices on the fake platform, PCI, the
# virtio transport, the virtqueue, the FT protocol and its wire format.
MUST_PASS = ("test_legacy_devices.py", "test_pci_bus.py", "test_virtio_transport_nokvm.py",
             "test_virtqueue_fuzz.py", "test_ft_protocol.py")

PROBE = """
from pykvm.kvm import Kvm, KvmUnavailable
try:
    Kvm()
except KvmUnavailable as error:
    print("probe:", error)
else:
    raise SystemExit("probe: KVM still answers inside the namespace")
"""


@requires_kvm  # run where KVM works: this test takes it away
def test_nokvm_tests_pass_with_an_unusable_dev_kvm(tmp_path):
    empty = tmp_path / "kvm-empty"
    empty.touch()
    # $0 is this Python, $1 the probe: the probe proves KVM is gone before pytest runs.
    script = (f"mount --bind {empty} /dev/kvm && cd {REPO} && \"$0\" -c \"$1\" && "
              "exec \"$0\" -m pytest -m nokvm -v -p no:cacheprovider")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, sys.executable, PROBE],
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert "probe: /dev/kvm is not a KVM device" in output, output[-4000:]
    assert result.returncode == 0, output[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= MINIMUM_PASSED, summary
    assert not re.search(r"failed|error", summary), summary
    files_passing = set(re.findall(r"^tests/(\S+?\.py)::\S+ PASSED", result.stdout, re.MULTILINE))
    assert set(MUST_PASS) <= files_passing, sorted(files_passing)
