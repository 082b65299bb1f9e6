"""Pause/resume of all vCPUs from another thread while guests run: the guests' results stay right."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pykvm.machine import Machine, MachineConfig
from pykvm.run_control import RunState
from tests.conftest import requires_kvm

pytestmark = requires_kvm


TIMEOUT = 60  # seconds: for all the pause cycles, and for the guest to finish


def _pause_while_running(machine: Machine, cycles: int) -> int:
    """Pause and resume `cycles` times from a controller thread; returns how many pauses
    happened while the guest was running. During each, the controller reads every vCPU's RIP
    and exit count twice; this thread checks that nothing moved. The assertions are made here,
    not in the controller, so that they fail the test (and a pause that never returns fails it
    after TIMEOUT) instead of leaving it waiting for a controller that died."""
    vm = machine.vm
    looks: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]] = []  # two looks per pause
    errors: list[BaseException] = []

    def look() -> list[tuple[int, int]]:
        return [(v.fd.get_regs().rip, v.exit_count) for v in vm.vcpus]

    def controller() -> None:
        try:
            for _ in range(cycles):
                if vm.state is RunState.STOPPED:
                    break
                hold = vm.pause("test")
                if vm.state is RunState.PAUSED:
                    looks.append((look(), look()))
                vm.resume(hold)
        except BaseException as error:  # handed to the test's thread
            errors.append(error)

    thread = threading.Thread(target=controller, daemon=True)
    vm.start()
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"pause/resume hung after {len(looks)} pauses"
    if errors:
        raise errors[0]
    for index, (first, second) in enumerate(looks):
        assert first == second, f"pause {index}: a vCPU moved while paused ((rip, exits) {first} then {second})"
    return len(looks)


def test_compute_survives_many_pauses(guest_images):
    output = bytearray()
    with Machine(MachineConfig(), serial_output=output.extend) as machine:
        machine.load(guest_images["compute"], cmdline="rounds=200")
        paused = _pause_while_running(machine, cycles=300)
        stop = machine.vm.wait(TIMEOUT)
    assert stop is not None and stop.status == 0, output.decode()
    assert b"compute: ok rounds=200 primes=78498" in output
    assert paused > 0


def test_smp_pauses_every_vcpu(guest_images):
    """Two vCPUs running `dirty` (which checks every page it wrote): pausing both many times
    loses no write."""
    output = bytearray()
    with Machine(MachineConfig(cpus=2), serial_output=output.extend) as machine:
        machine.load(guest_images["dirty"], cmdline="pages=1024 seconds=2")
        paused = _pause_while_running(machine, cycles=200)
        stop = machine.vm.wait(TIMEOUT)
    assert stop is not None and stop.status == 0, output.decode()
    assert output.rstrip().endswith(b"dirty: done")
    assert paused > 0


def test_pause_from_a_vcpu_thread_is_refused(guest_images):
    with Machine(MachineConfig(), serial_output=lambda data: None) as machine:
        machine.load(guest_images["hello"])
        errors = []

        class PausingDevice:
            """Stands in for COM1 and, on the guest's first write, tries to pause its own VM."""

            def pio_read(self, offset: int, size: int) -> int:
                return 0

            def pio_write(self, offset: int, size: int, value: int) -> None:
                try:
                    machine.vm.pause("device")
                except RuntimeError as error:
                    errors.append(error)
                machine.vm.stop(0, "done")

        machine.vm.bus.unregister_pio(0x3F8, 8)
        machine.vm.bus.register_pio(0x3F8, 8, PausingDevice())
        stop = machine.run()
    assert stop.reason == "done"
    assert errors and "cannot pause" in str(errors[0])


def test_stop_while_paused_ends_the_run(guest_images):
    with Machine(MachineConfig(), serial_output=lambda data: None) as machine:
        machine.load(guest_images["compute"], cmdline="rounds=100000")
        vm = machine.vm
        vm.start()
        vm.pause("test")
        assert vm.state is RunState.PAUSED
        vm.stop(7, "stopped by test")
        stop = vm.wait(timeout=10)
    assert stop is not None and stop.status == 7


def test_pauses_nest_and_the_last_resume_runs_the_guest(guest_images):
    """Two holders: releasing the first leaves the VM paused (no guest write lands, which the
    dirty log would show: `dirty` writes pages without pause); releasing the second runs it on."""
    output = bytearray()
    with Machine(MachineConfig(cpus=2), serial_output=output.extend) as machine:
        machine.load(guest_images["dirty"], cmdline="pages=1024 seconds=1")
        vm = machine.vm
        vm.set_dirty_logging(True)
        vm.start()
        snapshot = vm.pause("snapshot")
        user = vm.pause("ctl stop")
        vm.resume(snapshot)
        assert vm.control.status() == (RunState.PAUSED, ["ctl stop"])
        _pages_written(vm)  # before the pauses
        rips = [v.fd.get_regs().rip for v in vm.vcpus]
        assert [v.fd.get_regs().rip for v in vm.vcpus] == rips
        assert _pages_written(vm) == 0
        with pytest.raises(RuntimeError, match="not held"):
            vm.resume(snapshot)  # a second release of the same pause cannot release another's
        assert vm.state is RunState.PAUSED
        vm.resume(user)
        assert vm.control.status() == (RunState.RUNNING, [])
        stop = vm.wait()
    assert stop.status == 0, output.decode()
    assert output.rstrip().endswith(b"dirty: done")


def _pages_written(vm) -> int:
    """Pages written since the last call."""
    return sum(int(np.unpackbits(vm.dirty_bitmap(slot).view(np.uint8)).sum()) for slot in vm.memory.slots)


def test_a_pause_ends_when_its_vcpus_run_again(guest_images):
    """`ran_again` tells when every vCPU that a release let go was out of its park again (the end
    of a sync's pause in the FT metrics): after the release, for the release that let them go;
    None for a release that left another pause holding them, or once the VM stopped."""
    with Machine(MachineConfig(cpus=2), serial_output=lambda data: None) as machine:
        machine.load(guest_images["dirty"], cmdline="pages=1024 seconds=30")
        vm = machine.vm
        vm.start()
        for _ in range(20):
            hold = vm.pause("test")
            released = time.perf_counter()
            vm.resume(hold)
            ran = vm.control.ran_again(hold, TIMEOUT)
            assert ran is not None and ran >= released
        snapshot, user = vm.pause("snapshot"), vm.pause("ctl stop")
        vm.resume(snapshot)
        assert vm.control.ran_again(snapshot, 0) is None  # "ctl stop" holds them still
        vm.resume(user)
        assert vm.control.ran_again(user, TIMEOUT) is not None
        last = vm.pause("test")
        vm.stop(0, "done")
        vm.resume(last)
        assert vm.control.ran_again(last, 0) is None


def test_run_paused_work_runs_on_the_vcpu_that_parks_last(guest_images):
    """The work of a run_paused sees every vCPU parked and runs on a vCPU thread (after it, the
    vCPUs run again: ran_again tells when), and its exception reaches the caller while the guest
    goes on; with the vCPUs parked already for another pause, or not started, the caller runs it
    itself."""
    output = bytearray()
    with Machine(MachineConfig(cpus=2), serial_output=output.extend) as machine:
        machine.load(guest_images["dirty"], cmdline="pages=1024 seconds=60")
        vm = machine.vm

        def look() -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
            first = [(v.fd.get_regs().rip, v.exit_count) for v in vm.vcpus]
            return threading.current_thread().name, first, [(v.fd.get_regs().rip, v.exit_count) for v in vm.vcpus]

        (thread, _, _), _ = vm.run_paused("test", look)
        assert thread == threading.current_thread().name  # not started: run here
        vm.start()
        for _ in range(50):
            (thread, first, second), hold = vm.run_paused("test", look)
            assert thread.startswith("vcpu") and first == second
            assert vm.control.ran_again(hold, TIMEOUT) is not None
        with pytest.raises(ZeroDivisionError) as raised:
            vm.run_paused("test", lambda: 1 // 0)
        assert raised.value.__context__ is None  # not chained to the vCPU's EINTR
        user = vm.pause("ctl stop")
        (thread, first, second), _ = vm.run_paused("test", look)
        assert thread == threading.current_thread().name and first == second
        assert vm.control.status() == (RunState.PAUSED, ["ctl stop"])
        vm.resume(user)
        vm.stop(0, "test done")
        stop = vm.wait(TIMEOUT)
    assert stop is not None and stop.reason == "test done", output.decode()
    assert b"FAIL" not in output, output.decode()
