"""The promise of the `nokvm` marker, kept in CI: `pytest -m nokvm` passes on a host whose /dev/kvm
is unusable. Here that host is made: a private mount namespace with an empty regular file bound
over /dev/kvm, which opens like the device but fails every ioctl."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO, requires_kvm

# The tests that must be among them: devices on the fake platform, virtqueue, PCI, FT protocol
# and wire. Fewer than this passing means tests were lost or are being skipped.
MINIMUM_PASSED = 30

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
              "exec \"$0\" -m pytest -m nokvm -q -p no:cacheprovider")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, sys.executable, PROBE],
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert "probe: /dev/kvm is not a KVM device" in output, output[-4000:]
    assert result.returncode == 0, output[-4000:]
    summary = output.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= MINIMUM_PASSED, summary
    assert not re.search(r"failed|error", summary), summary
