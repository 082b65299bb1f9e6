"""pykvm.kvm against the C headers (tests/test_kvm_uapi_ioctls.py: against the real /dev/kvm).

The header check generates a C program from our ctypes definitions: for every
struct in STRUCTS it walks ``_fields_`` recursively (nested structs, unions,
arrays, anonymous members) and prints sizeof/_Alignof of the struct and the
offset, size and signedness of each field, plus the value of every constant
and ioctl number we define; gcc compiles it against <linux/kvm.h>, and each
printed value must equal ours. A field or constant added to pykvm.kvm is thus
checked without touching this file (and one missing from the header fails to
compile).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from pykvm.kvm import constants, ioctls, run_layout, structs
from pykvm.kvm import EXIT_REASON_NAMES, KVM_EXIT_IO

KVM_H = "/usr/include/linux/kvm.h"

# Our type -> the C type it mirrors. Types without a C name of their own
# (anonymous nested structs/unions) are reached by walking these.
STRUCTS = [
    # <asm/kvm.h>
    (structs.KvmPicState, "struct kvm_pic_state"),
    (structs.KvmIoapicState, "struct kvm_ioapic_state"),
    (structs.KvmRegs, "struct kvm_regs"),
    (structs.KvmLapicState, "struct kvm_lapic_state"),
    (structs.KvmSegment, "struct kvm_segment"),
    (structs.KvmDtable, "struct kvm_dtable"),
    (structs.KvmSregs, "struct kvm_sregs"),
    (structs.KvmFpu, "struct kvm_fpu"),
    (structs.KvmMsrEntry, "struct kvm_msr_entry"),
    (structs.msrs_type(0), "struct kvm_msrs"),
    (structs.msr_list_type(0), "struct kvm_msr_list"),
    (structs.KvmCpuidEntry2, "struct kvm_cpuid_entry2"),
    (structs.cpuid2_type(0), "struct kvm_cpuid2"),
    (structs.KvmPitChannelState, "struct kvm_pit_channel_state"),
    (structs.KvmDebugExitArch, "struct kvm_debug_exit_arch"),
    (structs.KvmGuestDebugArch, "struct kvm_guest_debug_arch"),
    (structs.KvmPitState2, "struct kvm_pit_state2"),
    (structs.KvmReinjectControl, "struct kvm_reinject_control"),
    (structs.KvmVcpuEvents, "struct kvm_vcpu_events"),
    (structs.KvmDebugregs, "struct kvm_debugregs"),
    (structs.KvmXsave, "struct kvm_xsave"),
    (structs.KvmXcr, "struct kvm_xcr"),
    (structs.KvmXcrs, "struct kvm_xcrs"),
    (structs.KvmSyncRegs, "struct kvm_sync_regs"),
    # <linux/kvm.h>
    (structs.KvmUserspaceMemoryRegion, "struct kvm_userspace_memory_region"),
    (structs.KvmIrqLevel, "struct kvm_irq_level"),
    (structs.KvmIrqchip, "struct kvm_irqchip"),
    (structs.KvmPitConfig, "struct kvm_pit_config"),
    (structs.KvmRun, "struct kvm_run"),
    (structs.KvmTranslation, "struct kvm_translation"),
    (structs.KvmDirtyLog, "struct kvm_dirty_log"),
    (structs.KvmClearDirtyLog, "struct kvm_clear_dirty_log"),
    (structs.KvmSignalMask, "struct kvm_signal_mask"),
    (structs.KvmMpState, "struct kvm_mp_state"),
    (structs.KvmGuestDebug, "struct kvm_guest_debug"),
    (structs.KvmIoeventfd, "struct kvm_ioeventfd"),
    (structs.KvmEnableCap, "struct kvm_enable_cap"),
    (structs.KvmIrqRoutingIrqchip, "struct kvm_irq_routing_irqchip"),
    (structs.KvmIrqRoutingMsi, "struct kvm_irq_routing_msi"),
    (structs.KvmIrqRoutingS390Adapter, "struct kvm_irq_routing_s390_adapter"),
    (structs.KvmIrqRoutingHvSint, "struct kvm_irq_routing_hv_sint"),
    (structs.KvmIrqRoutingXenEvtchn, "struct kvm_irq_routing_xen_evtchn"),
    (structs.KvmIrqRoutingEntry, "struct kvm_irq_routing_entry"),
    (structs.irq_routing_type(0), "struct kvm_irq_routing"),
    (structs.KvmIrqfd, "struct kvm_irqfd"),
    (structs.KvmClockData, "struct kvm_clock_data"),
    (structs.KvmMsi, "struct kvm_msi"),
    (structs.KvmDirtyGfn, "struct kvm_dirty_gfn"),
]

# Exit "sub-codes" #defined inside the exit structs; not exit reasons.
EXIT_SUBCODES = {
    "KVM_EXIT_IO_IN",
    "KVM_EXIT_IO_OUT",
    "KVM_EXIT_HYPERV_SYNIC",
    "KVM_EXIT_HYPERV_HCALL",
    "KVM_EXIT_HYPERV_SYNDBG",
    "KVM_EXIT_XEN_HCALL",
}

# Where we mirror a C union by one of its scalar views, the C expression whose
# signedness our scalar must match.
UNION_AS_SCALAR = {
    # union { __u64 bits; struct {...} fields; } redirtbl[]: kept as raw u64.
    "redirtbl[0]": "redirtbl[0].bits",
}

_SIGNED = set("bhilq")
_UNSIGNED = set("BHILQ")


def _scalar_kind(ctype) -> str:
    code = ctype._type_
    if code == "P":
        return "p"
    if code in _SIGNED:
        return "s"
    if code in _UNSIGNED:
        return "u"
    raise AssertionError(f"unexpected scalar type {ctype}")


def _walk(ctype, path: str, base: int, seen: set):
    """Yield (c_path, offset, size or None, kind or None) for each member of ctype."""
    seen.add(ctype)
    for name, ftype, *_ in ctype._fields_:
        offset = base + getattr(ctype, name).offset
        if name in getattr(ctype, "_anonymous_", ()):
            # Anonymous in C: its members are named directly.
            seen.add(ftype)
            yield from _walk(ftype, path, offset, seen)
        else:
            yield from _member(f"{path}.{name}" if path else name, ftype, offset, seen)


def _member(path: str, ftype, offset: int, seen: set):
    if issubclass(ftype, (ctypes.Structure, ctypes.Union)):
        yield path, offset, ctypes.sizeof(ftype), None
        yield from _walk(ftype, path, offset, seen)
    elif issubclass(ftype, ctypes.Array):
        # A zero-length array stands for a C flexible array: no sizeof in C.
        yield path, offset, ctypes.sizeof(ftype) or None, None
        yield from _member(f"{path}[0]", ftype._type_, offset, seen)
    else:
        yield path, offset, ctypes.sizeof(ftype), _scalar_kind(ftype)


def _int_constants(module) -> dict[str, int]:
    return {
        name: value
        for name, value in vars(module).items()
        if name.isupper() and not name.startswith("_") and type(value) is int
    }


def _expected_and_c_source() -> tuple[dict[str, object], str, set]:
    expected: dict[str, object] = {}
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "#define M(T, m) (((T *)0)->m)",
        # 'c' for plain char (our c_uint8 mirrors those), 'p' for pointers.
        "#define KIND(x) _Generic((x), char: 'c', void *: 'p', "
        "default: ((__typeof__(x))-1 < 0 ? 's' : 'u'))",
        "int main(void) {",
    ]

    def num(key, c_expr, value):
        expected[key] = value
        lines.append(f'  printf("%s=%llu\\n", "{key}", (unsigned long long)({c_expr}));')

    seen: set = set()
    for ctype, cname in STRUCTS:
        num(f"{cname}|sizeof", f"sizeof({cname})", ctypes.sizeof(ctype))
        num(f"{cname}|alignof", f"_Alignof({cname})", ctypes.alignment(ctype))
        for path, offset, size, kind in _walk(ctype, "", 0, seen):
            num(f"{cname}|{path}|offset", f"offsetof({cname}, {path})", offset)
            if size is not None:
                num(f"{cname}|{path}|size", f"sizeof(M({cname}, {path}))", size)
            if kind is not None:
                key = f"{cname}|{path}|kind"
                expected[key] = kind
                c_path = path
                for suffix, view in UNION_AS_SCALAR.items():
                    if path.endswith(suffix):
                        c_path = path[: -len(suffix)] + view
                lines.append(f'  printf("%s=%c\\n", "{key}", KIND(M({cname}, {c_path})));')

    for module in (constants, ioctls):
        for name, value in _int_constants(module).items():
            num(f"const|{name}", name, value & 0xFFFF_FFFF_FFFF_FFFF)

    lines += ["  return 0;", "}"]
    return expected, "\n".join(lines) + "\n", seen


@pytest.fixture(scope="module")
def c_values(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed: cannot compile the header check")
    if not os.path.exists(KVM_H):
        pytest.skip(f"{KVM_H} missing: install linux-libc-dev")
    expected, source, _ = _expected_and_c_source()
    tmp = tmp_path_factory.mktemp("uapi")
    (tmp / "uapi.c").write_text(source)
    build = subprocess.run(
        [gcc, "-std=gnu11", "-w", "-o", str(tmp / "uapi"), str(tmp / "uapi.c")],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, f"generated C did not compile:\n{build.stderr[-4000:]}"
    out = subprocess.run([str(tmp / "uapi")], capture_output=True, text=True, check=True).stdout
    actual: dict[str, object] = {}
    for line in out.splitlines():
        key, _, value = line.rpartition("=")
        actual[key] = value if key.endswith("|kind") else int(value)
    return expected, actual


@pytest.mark.nokvm
def test_layouts_and_numbers_match_header(c_values):
    expected, actual = c_values
    assert expected.keys() == actual.keys()
    mismatches = []
    for key, ours in expected.items():
        theirs = actual[key]
        if key.endswith("|kind") and ours == "u" and theirs == "c":
            continue  # C char array mirrored as c_uint8: same layout
        if ours != theirs:
            mismatches.append(f"{key}: ours {ours!r}, C {theirs!r}")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.nokvm
def test_header_check_is_not_vacuous(c_values):
    expected, _ = c_values
    assert expected["struct kvm_run|io.port|offset"] == 34
    assert expected["struct kvm_run|s|offset"] == 304
    assert expected["const|KVM_SET_IRQCHIP"] == 0x8208AE63
    assert len(expected) > 1000


@pytest.mark.nokvm
def test_every_struct_is_checked():
    _, _, seen = _expected_and_c_source()
    defined = {
        obj
        for obj in vars(structs).values()
        if isinstance(obj, type)
        and issubclass(obj, (ctypes.Structure, ctypes.Union))
        and obj.__module__ == structs.__name__
    }
    assert not defined - seen, f"not checked against C: {sorted(t.__name__ for t in defined - seen)}"


@pytest.mark.nokvm
def test_exit_reasons_complete():
    header = {}
    with open(KVM_H) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "#define" and parts[1].startswith("KVM_EXIT_"):
                if parts[1] not in EXIT_SUBCODES:
                    header[parts[1]] = int(parts[2], 0)
    assert header, "no KVM_EXIT_* found in header"
    assert {v: k for k, v in header.items()} == EXIT_REASON_NAMES


@pytest.mark.nokvm
def test_ioctl_numbers_distinct():
    numbers = [v for k, v in _int_constants(ioctls).items() if k.startswith("KVM_")]
    assert len(numbers) == len(set(numbers)) == len(ioctls.IOCTL_NAMES)


@pytest.mark.nokvm
def test_flex_factories_cached_and_sized():
    assert structs.msrs_type(3) is structs.msrs_type(3)
    assert ctypes.sizeof(structs.msrs_type(3)) == 8 + 3 * 16
    assert ctypes.sizeof(structs.cpuid2_type(2)) == 8 + 2 * 40
    assert ctypes.sizeof(structs.msr_list_type(5)) == 4 + 5 * 4
    assert ctypes.sizeof(structs.irq_routing_type(2)) == 8 + 2 * 48


@pytest.mark.nokvm
def test_run_layout_reads_what_ctypes_writes():
    # The run loop reads kvm_run with struct.unpack_from at offsets derived from KvmRun; fill a
    # KvmRun through ctypes and read it back the run loop's way.
    run = structs.KvmRun(exit_reason=KVM_EXIT_IO)
    run.io.direction, run.io.size, run.io.port, run.io.count, run.io.data_offset = 1, 2, 0x3F8, 3, 4096
    page = memoryview(bytearray(run))
    assert page.cast("I")[run_layout.EXIT_REASON_WORD] == KVM_EXIT_IO
    assert run_layout.IO_EXIT.unpack_from(page, run_layout.IO_EXIT_OFFSET) == (1, 2, 0x3F8, 3, 4096)

    run = structs.KvmRun()
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xFEE0_0030, 4, 1
    run.mmio.data[:] = range(1, 9)
    page = bytes(run)
    assert run_layout.MMIO_EXIT.unpack_from(page, run_layout.MMIO_EXIT_OFFSET) == (
        0xFEE0_0030, bytes(range(1, 9)), 4, 1)
    assert page[run_layout.MMIO_DATA_OFFSET] == 1
