"""Both ways a queue notification reaches a pykvm device (MachineConfig.ioeventfd): an exit to Python
that serves the queue on the vCPU thread (the default), and a KVM ioeventfd that wakes the
device's I/O thread. The same guests must see the same devices either way."""

from __future__ import annotations

import time

import pytest

from pykvm.devices.net_backends import NetSpec
from pykvm.devices.virtio.blk import DiskSpec
from pykvm.devices.virtio.transport import VirtioPciFunction
from pykvm.machine import Machine, MachineConfig
from tests.conftest import requires_kvm
from tests.netutil import FrameSocket, Peer, blk_pattern

pytestmark = requires_kvm

SECTOR = 512


def notifies_reaching_python(function: VirtioPciFunction) -> list[int]:
    """The queue index of every notify that exits to Python (VirtioPciFunction.notify), from now
    on. Through an ioeventfd KVM completes the write itself and none does."""
    reached: list[int] = []
    served = function.notify

    def notify(index: int) -> None:
        reached.append(index)
        served(index)

    function.notify = notify  # the BAR regions call it through the instance
    return reached


def assert_notify_path(function: VirtioPciFunction, ioeventfd: bool, reached: list[int], caplog) -> None:
    """The path asked for is the one the notifies took, and a fallback would have said so."""
    fell_back = [r.getMessage() for r in caplog.records if "exit to Python instead" in r.getMessage()]
    if ioeventfd:
        assert function.notify_path == "ioeventfd" and not fell_back, fell_back
        assert reached == [], f"{len(reached)} notifies exited to Python despite the ioeventfds"
    else:
        assert function.notify_path == "exit"
        assert reached, "no notify reached Python"


@pytest.mark.parametrize("ioeventfd", [False, True])
@pytest.mark.parametrize("append", ["", "irq=intx event_idx=0"])
def test_blk_guest(tmp_path, guest_images, ioeventfd, append, caplog):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 << 20))
    output = bytearray()
    config = MachineConfig(disks=(DiskSpec(str(disk)),), ioeventfd=ioeventfd)
    with Machine(config, serial_output=output.extend) as machine:
        blk = machine.virtio[0]
        reached = notifies_reaching_python(blk)
        machine.load(guest_images["blk"], cmdline=f"seed=3 sectors=1500 zero=16 {append}")
        stop = machine.run()
        text = output.decode()
        assert stop.status == 0, text
        assert_notify_path(blk, ioeventfd, reached, caplog)
    assert "blk: ok sectors=1500" in text
    assert disk.read_bytes()[: 1500 * SECTOR] == blk_pattern(0, 1500 * SECTOR, 3)


@pytest.mark.parametrize("ioeventfd", [False, True])
def test_net_echo_guest(tmp_path, guest_images, ioeventfd, caplog):
    link = tmp_path / "vm.sock"
    output = bytearray()
    config = MachineConfig(nets=(NetSpec("socket", str(link)),), ioeventfd=ioeventfd)
    with Machine(config, serial_output=output.extend) as machine:
        net = machine.virtio[0]
        reached = notifies_reaching_python(net)
        machine.load(guest_images["net-echo"], cmdline="count=0")
        machine.vm.start()
        try:
            deadline = time.monotonic() + 30
            while b"net-echo: ready" not in output:
                assert time.monotonic() < deadline, output.decode()
                time.sleep(0.01)
            with FrameSocket(tmp_path / "host.sock", link) as sock:
                peer = Peer(sock)
                peer.resolve()
                for size in (1, 100, 1472):  # 1472 bytes span three 512-byte receive buffers
                    payload = bytes(i * 13 % 256 for i in range(size))
                    assert peer.udp(7, payload, sport=6000 + size) == payload
                # A burst, answered in order, none lost
                for i in range(8):
                    peer.send_udp(7, b"burst %d" % i, sport=7000)
                assert [peer.receive_udp(7, 7000).udp.payload for _ in range(8)] == [b"burst %d" % i for i in range(8)]
            assert_notify_path(net, ioeventfd, reached, caplog)
        finally:
            machine.vm.stop(0, "test done")
            machine.vm.wait()
