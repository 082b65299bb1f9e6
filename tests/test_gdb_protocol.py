"""The gdb stub's sans-IO parts, without KVM: RSP framing, checksums and escapes, the register
layout and target description, and the successors of an instruction (for steps by breakpoints)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from pykvm.gdb import packets as rsp
from pykvm.gdb import registers
from pykvm.gdb.stepping import CannotStep, successors
from pykvm.kvm.structs import KvmRegs

pytestmark = pytest.mark.nokvm


def test_encode_is_what_gdb_sends():
    # `$qSupported#37` and `$g#67` as captured from gdb; `$#00` is the empty reply
    assert rsp.encode(b"qSupported") == b"$qSupported#37"
    assert rsp.encode(b"g") == b"$g#67"
    assert rsp.encode(b"") == b"$#00"


def test_escapes_round_trip_every_special_byte():
    data = bytes(range(256)) + b"#$}*"
    escaped = rsp.escape(data)
    assert not set(escaped) & {ord("#"), ord("$"), ord("*")}
    assert rsp.unescape(escaped) == data
    assert rsp.escape(b"a}b") == b"a}]b"


def test_decoder_takes_packets_split_anywhere_and_acks_and_interrupts():
    wire = b"+" + rsp.encode(b"m100,4") + b"\x03" + rsp.encode(b"X100,2:" + b"#}") + b"-"
    decoder = rsp.Decoder()
    events = []
    for byte in wire:
        events += decoder.feed(bytes([byte]))
    assert events == [rsp.Ack(True), rsp.Packet(b"m100,4"), rsp.Interrupt(), rsp.Packet(b"X100,2:#}"),
                      rsp.Ack(False)]


def test_bad_checksum_and_oversized_packets_are_refused_and_the_stream_goes_on():
    decoder = rsp.Decoder(max_payload=8)
    events = decoder.feed(b"$g#00" + b"$" + b"x" * 100 + b"#00" + rsp.encode(b"?"))
    assert isinstance(events[0], rsp.BadPacket) and "checksum" in events[0].reason
    assert isinstance(events[1], rsp.BadPacket) and "longer" in events[1].reason
    assert events[2] == rsp.Packet(b"?")
    assert isinstance(rsp.Decoder().feed(b"$g#zz")[0], rsp.BadPacket)


def test_payload_parsers():
    assert rsp.parse_address_length(b"ffffffff80000000,40") == (0xFFFFFFFF80000000, 0x40)
    assert rsp.parse_breakpoint(b"Z0,1022d0,1") == rsp.BreakpointRequest(True, 0, 0x1022D0, 1)
    assert rsp.parse_breakpoint(b"z1,102590,1") == rsp.BreakpointRequest(False, 1, 0x102590, 1)
    assert rsp.parse_thread(b"-1") == -1 and rsp.parse_thread(b"2") == 2 and rsp.parse_thread(b"p1.3") == 3
    with pytest.raises(rsp.ProtocolError):
        rsp.parse_address_length(b"100")
    with pytest.raises(rsp.ProtocolError):
        rsp.parse_breakpoint(b"Z0,zz,1")
    with pytest.raises(rsp.ProtocolError):
        rsp.parse_hex_bytes(b"0g")
    assert rsp.stop_reply(5, 1, swbreak=True) == b"T05thread:1;swbreak:;"
    assert rsp.exit_reply(0x105) == b"W05"


def test_target_description_numbers_every_register_as_gdb_amd64_does():
    root = ET.fromstring(registers.target_xml().split(b"\n", 2)[2])  # past the XML declaration and DOCTYPE
    assert root.findtext("architecture") == "i386:x86-64"
    regs = [(reg.get("name"), int(reg.get("bitsize")), int(reg.get("regnum"))) for reg in root.iter("reg")]
    names = [name for name, _, _ in regs]
    assert names[:18] == [*registers.GPRS, "rip", "eflags"]
    assert names.index("st0") == 24 and names.index("fop") == 39 and names.index("xmm0") == 40
    assert [number for _, _, number in regs] == list(range(len(regs)))
    assert sum(bits for _, bits, _ in regs) // 8 == registers.G_PACKET_BYTES
    values = list(range(len(registers.REGISTERS)))
    assert registers.decode_all(bytes.fromhex(registers.encode_all(values).decode())) == values
    with pytest.raises(registers.RegisterError):
        registers.decode_all(b"\0" * 8)


def _regs(**values: int) -> KvmRegs:
    regs = KvmRegs()
    for name, value in values.items():
        setattr(regs, name, value)
    return regs


def test_successors_of_branches_calls_and_returns():
    memory = {0x8000: 0x401234, 0x9010: 0x405000}
    read = memory.__getitem__
    # je +0x10 (74 10): falls through or jumps
    assert successors(bytes.fromhex("7410"), _regs(rip=0x1000), read) == [0x1002, 0x1012]
    # call rel32 (e8 fb 0f 00 00): only the callee (a step goes into calls)
    assert successors(bytes.fromhex("e8fb0f0000"), _regs(rip=0x1000), read) == [0x2000]
    # ret: the address on the stack
    assert successors(bytes.fromhex("c3"), _regs(rip=0x1000, rsp=0x8000), read) == [0x401234]
    # jmp rax; call [rbx+rcx*8+0x10]; jmp [rip+0x8009] (rip-relative, from the next instruction)
    assert successors(bytes.fromhex("ffe0"), _regs(rip=0x1000, rax=0x7777), read) == [0x7777]
    assert successors(bytes.fromhex("ff54cb10"), _regs(rip=0x1000, rbx=0x9000, rcx=0), read) == [0x405000]
    assert successors(bytes.fromhex("ff2509800000"), _regs(rip=0x1001), read) == [0x405000]
    # an ordinary instruction, and a system call: the next one
    assert successors(bytes.fromhex("4801d8"), _regs(rip=0x1000), read) == [0x1003]
    assert successors(bytes.fromhex("0f05"), _regs(rip=0x1000), read) == [0x1002]
    with pytest.raises(CannotStep):
        successors(b"\x0f", _regs(rip=0x1000), read)
