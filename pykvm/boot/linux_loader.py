"""Booting Linux: a bzImage through the x86 boot protocol's 64-bit entry, or a vmlinux ELF.

What a boot loader does for a 64-bit kernel (Documentation/x86/boot.rst, "64-bit Boot Protocol"),
and so what this module does:

1. bzImage: check the setup header (boot flag 0xAA55, "HdrS", protocol 2.12 or later with
   XLF_KERNEL_64), and put the protected-mode part (everything after the real-mode setup
   sectors) at the kernel's preferred load address. vmlinux: load the ELF's PT_LOAD segments
   at their physical addresses; its entry point is the kernel's own startup_64, which the
   bzImage's decompressor would otherwise jump to, so no decompression runs at all.
2. Build the zero page (`struct boot_params`): a copy of the image's setup header (a vmlinux has
   none: one is made up) with the loader's fields filled in (loader type, command line pointer,
   initrd address and size), the e820 memory map, and the RSDP address.
3. Put the initrd as high in low RAM as the kernel allows, above the kernel's init_size.
4. Write the firmware tables a PC kernel expects (ACPI, MP table: pykvm.boot.firmware).
5. Start vCPU 0 in 64-bit mode with identity-mapped page tables, RSI = the zero page, at
   load address + 0x200 (bzImage) or at the ELF entry (vmlinux). The other vCPUs wait for
   INIT-SIPI-SIPI, which the kernel sends to the processors the MADT or MP table lists.

Low memory (besides the loader's GDT and page tables, see pykvm.boot.loader):

    0x07000  boot_params (the zero page)
    0x02000  command line (up to the kernel's cmdline_size, at most 4 KiB)
    0xE0000  ACPI tables; 0xF0000 MP table (the BIOS area, reserved in the e820 map)
"""

from __future__ import annotations

import bz2
import lzma
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import construct

from pykvm.boot import firmware
from pykvm.boot.cpu_mode import enter_long_mode, write_boot_gdt
from pykvm.boot import formats as f
from pykvm.boot.loader import (
    BOOT_GDT,
    CMDLINE,
    CMDLINE_MAX,
    ONE_MIB,
    PAGE_TABLES,
    LoadedImage,
    _copy,
    _memory_map,
    _write_long_mode_tables,
    elf_segments,
    read_input,
)
from pykvm.errors import ConfigError
from pykvm.memory import MMIO_HOLE_START
from pykvm.vm import Vm

ZERO_PAGE = 0x7000
SECTOR = 512
DEFAULT_SETUP_SECTS = 4  # setup_sects == 0 means 4 (protocol note for very old images)
ENTRY_64_OFFSET = 0x200  # the 64-bit entry point, from the protected-mode kernel's start
VMLINUX_PROTOCOL = 0x020F  # the protocol version claimed in the header made up for a vmlinux
VMLINUX_CMDLINE_SIZE = 2047  # x86 COMMAND_LINE_SIZE - 1
INITRD_ALIGN = 0x1000
LINUX_MIN_LOAD = ONE_MIB


@dataclass(frozen=True)
class LinuxImage:
    """A kernel image, parsed: where its code goes, where it starts, what it needs."""

    format: str  # "bzImage" or "vmlinux"
    header: dict  # setup header fields for the zero page
    segments: list[tuple[int, memoryview, int]]  # (physical address, bytes, memory size)
    entry: int
    end: int  # first byte above everything the kernel needs while it initialises


def load_linux(vm: Vm, kernel: str | Path | bytes, *, initrd: str | Path | bytes | None = None,
               cmdline: str = "", pci_slots: int = firmware.PCI_SLOTS) -> LoadedImage:
    """Load a bzImage or vmlinux (and an initrd) and set vCPU 0 up to start it. Raises ConfigError
    with a one-line reason for anything wrong with the files or the fit in RAM. `pci_slots`: the
    PCI slots in use (0 to pci_slots - 1), for the interrupt routing tables."""
    name = "kernel" if isinstance(kernel, bytes) else str(kernel)
    data = kernel if isinstance(kernel, bytes) else read_input(Path(kernel))
    image = parse_kernel(data, name)
    memory = vm.memory
    low_end = min(memory.size, MMIO_HOLE_START)
    if image.end > low_end:
        raise ConfigError(f"{name}: the {image.format} needs RAM up to {image.end / ONE_MIB:.0f} MiB while it "
                          f"starts; guest RAM is {memory.size // ONE_MIB} MiB (raise --mem)")
    for address, payload, size in image.segments:
        _copy(vm, address, payload, zero_to=address + size)

    header = dict(image.header)
    encoded = cmdline.encode() + b"\0"
    limit = min(header["cmdline_size"] + 1, CMDLINE_MAX)
    if len(encoded) > limit:
        raise ConfigError(f"kernel command line is {len(encoded) - 1} bytes; this kernel takes at most {limit - 1}")
    memory.write(CMDLINE, encoded)
    header.update(type_of_loader=f.LOADER_TYPE_UNDEFINED, cmd_line_ptr=CMDLINE,
                  loadflags=header["loadflags"] | f.LOADED_HIGH, vid_mode=0xFFFF)

    if initrd is not None:
        initrd_name = "initrd" if isinstance(initrd, bytes) else str(initrd)
        initrd_data = (initrd if isinstance(initrd, bytes)
                       else read_input(Path(initrd), "an initrd", option="--initrd", allow_empty=True))
        address = _place_initrd(len(initrd_data), image, header, low_end, memory.size, initrd_name)
        check_initrd(initrd_data, initrd_name)
        memory.write(address, initrd_data)
        header.update(ramdisk_image=address, ramdisk_size=len(initrd_data))

    rsdp = firmware.write_acpi_tables(memory, len(vm.vcpus), pci_slots=pci_slots)
    firmware.write_mp_table(memory, len(vm.vcpus), pci_slots=pci_slots)
    e820 = [dict(addr=base, size=length, type=kind) for base, length, kind in _memory_map(memory.size)]
    empty = dict(addr=0, size=0, type=0)
    boot_params = f.BootParams.build(dict(
        tboot_addr=0, acpi_rsdp_addr=rsdp, ext_ramdisk_image=0, ext_ramdisk_size=0, ext_cmd_line_ptr=0,
        e820_entries=len(e820), hdr=header,
        e820_table=e820 + [empty] * (f.E820_MAX_ENTRIES_ZEROPAGE - len(e820)),
    ))
    memory.write(ZERO_PAGE, boot_params)

    write_boot_gdt(memory, BOOT_GDT)
    _write_long_mode_tables(vm)
    vcpu = vm.vcpus[0]
    enter_long_mode(vcpu, image.entry, cr3=PAGE_TABLES, gdt_base=BOOT_GDT)
    regs = vcpu.fd.get_regs()
    regs.rsi = ZERO_PAGE  # the 64-bit boot protocol: RSI points at boot_params
    vcpu.fd.set_regs(regs)
    start = min(address for address, _, _ in image.segments)
    return LoadedImage(image.format, image.entry, start, image.end)


# -- the kernel image ----------------------------------------------------------------------------------


def parse_kernel(data: bytes, name: str = "kernel") -> LinuxImage:
    if data.startswith(f.ELF_MAGIC):
        return _parse_vmlinux(data, name)
    return _parse_bzimage(data, name)


def _parse_bzimage(data: bytes, name: str) -> LinuxImage:
    end_of_header = f.SETUP_HEADER_OFFSET + f.SetupHeader.sizeof()
    if len(data) < end_of_header:
        raise ConfigError(f"{name}: not a Linux kernel: {len(data)} bytes is too short for a bzImage setup header")
    hdr = f.SetupHeader.parse(data[f.SETUP_HEADER_OFFSET:end_of_header])
    if hdr.header != f.LINUX_HEADER_MAGIC or hdr.boot_flag != f.LINUX_BOOT_FLAG:
        raise ConfigError(f"{name}: not a Linux kernel: no bzImage setup header (boot flag {hdr.boot_flag:#06x}, "
                          f"signature {bytes(hdr.header)!r}) and not an ELF vmlinux")
    if hdr.version < f.LINUX_MIN_PROTOCOL or not hdr.xloadflags & f.XLF_KERNEL_64:
        raise ConfigError(f"{name}: boot protocol {hdr.version >> 8}.{hdr.version & 0xFF:02d} without a 64-bit "
                          "entry point; pykvm needs a 64-bit kernel (protocol 2.12 or later)")
    if not hdr.loadflags & f.LOADED_HIGH:
        raise ConfigError(f"{name}: a zImage (loaded below 1 MiB) is not supported; use a bzImage")
    setup_size = ((hdr.setup_sects or DEFAULT_SETUP_SECTS) + 1) * SECTOR
    payload_size = hdr.syssize * 16
    if setup_size + payload_size > len(data) or payload_size == 0:
        raise ConfigError(f"{name}: truncated bzImage: the header announces {setup_size + payload_size} bytes, "
                          f"the file has {len(data)}")
    # At pref_address: where a non-relocatable kernel runs anyway (it would move itself there),
    # and where init_size is counted from. Protocols before 2.10 have no pref_address: 1 MiB.
    load_address = hdr.pref_address if hdr.pref_address >= LINUX_MIN_LOAD else LINUX_MIN_LOAD
    if hdr.init_size < payload_size:
        raise ConfigError(f"{name}: malformed bzImage header: init_size {hdr.init_size:#x} is smaller than the "
                          f"kernel ({payload_size:#x} bytes)")
    header = {key: value for key, value in hdr.items() if not key.startswith("_")}
    payload = memoryview(data)[setup_size : setup_size + payload_size]
    return LinuxImage("bzImage", header, [(load_address, payload, payload_size)],
                      load_address + ENTRY_64_OFFSET, load_address + hdr.init_size)


def _parse_vmlinux(data: bytes, name: str) -> LinuxImage:
    try:
        elf = f.Elf64Header.parse(data)
    except construct.ConstructError:
        raise ConfigError(f"{name}: truncated ELF header") from None
    if elf.ident.elf_class != f.ELFCLASS64 or elf.machine != f.EM_X86_64:
        raise ConfigError(f"{name}: an ELF vmlinux must be x86-64 (class {elf.ident.elf_class}, machine {elf.machine})")
    if elf.type != f.ET_EXEC:
        raise ConfigError(f"{name}: not a Linux kernel: an ELF of type {elf.type} (a vmlinux is an executable, "
                          f"type {f.ET_EXEC}; a program or shared library is not)")
    segments = elf_segments(data, elf, f.Elf64ProgramHeader, f"{name}: ")
    end = max(address + size for address, _, size in segments)
    # A vmlinux carries no setup header: make up the one a boot loader would have copied.
    header = {field.name: 0 for field in f.SetupHeader.subcons}
    header.update(boot_flag=f.LINUX_BOOT_FLAG, header=f.LINUX_HEADER_MAGIC, version=VMLINUX_PROTOCOL,
                  loadflags=f.LOADED_HIGH, initrd_addr_max=0x7FFF_FFFF, kernel_alignment=0x20_0000,
                  xloadflags=f.XLF_KERNEL_64, cmdline_size=VMLINUX_CMDLINE_SIZE, setup_sects=DEFAULT_SETUP_SECTS)
    return LinuxImage("vmlinux", header, segments, elf.entry, end)


# -- the initrd ----------------------------------------------------------------------------------------


def _place_initrd(size: int, image: LinuxImage, header: dict, low_end: int, ram: int, name: str) -> int:
    """The highest page-aligned address where the initrd fits below initrd_addr_max and the top of
    low RAM and above the kernel, as boot loaders do (the kernel moves it if it must)."""
    top = min(low_end, header["initrd_addr_max"] + 1)
    address = (top - size) & ~(INITRD_ALIGN - 1)
    floor = (image.end + INITRD_ALIGN - 1) & ~(INITRD_ALIGN - 1)
    if size == 0:
        raise ConfigError(f"{name}: initrd is empty")
    if address < floor:
        room = max(top - floor, 0)
        raise ConfigError(f"{name}: initrd of {size / ONE_MIB:.1f} MiB does not fit: {room / ONE_MIB:.1f} MiB free "
                          f"between the kernel and the top of {ram // ONE_MIB} MiB of guest RAM (raise --mem)")
    return address


CPIO_MAGICS = (b"070701", b"070702")
CPIO_HEADER = 110
CPIO_TRAILER = b"TRAILER!!!"
_NON_ZERO = re.compile(rb"[^\0]")


def check_initrd(data: bytes, name: str = "initrd") -> None:
    """Refuse an initrd the kernel would silently half-unpack: an empty file, a newc cpio whose
    entries run past the end or that lacks its trailer, or a gzip/xz/bzip2 stream cut short.
    An initramfs may be several archives back to back (an uncompressed one for CPU microcode,
    then a compressed one); each is checked. Other formats (zstd, lz4, a disk image) pass."""
    if not data:
        raise ConfigError(f"{name}: initrd is empty")
    offset = 0
    while offset < len(data):
        if data[offset : offset + 6] in CPIO_MAGICS:
            offset = _check_cpio(data, offset, name)
        elif data.startswith(b"\x1f\x8b", offset):
            offset = _check_stream(data, offset, zlib.decompressobj(wbits=31), "gzip", name)
        elif data.startswith(b"\xfd7zXZ\x00", offset):
            offset = _check_stream(data, offset, lzma.LZMADecompressor(), "xz", name)
        elif data.startswith(b"BZh", offset):
            offset = _check_stream(data, offset, bz2.BZ2Decompressor(), "bzip2", name)
        elif data[offset] == 0:
            following = _NON_ZERO.search(data, offset)  # padding between archives
            offset = following.start() if following else len(data)
        else:
            return  # a format not checked here


def _check_cpio(data: bytes, offset: int, name: str) -> int:
    """Walk one newc archive from `offset`; returns the offset after its trailer."""
    while True:
        header = data[offset : offset + CPIO_HEADER]
        if len(header) < CPIO_HEADER:
            raise ConfigError(f"{name}: truncated initrd: cpio archive ends inside an entry header at byte {offset}")
        if header[:6] not in CPIO_MAGICS:
            raise ConfigError(f"{name}: corrupt initrd: no cpio header at byte {offset}")
        try:
            file_size = int(header[54:62], 16)
            name_size = int(header[94:102], 16)
        except ValueError:
            raise ConfigError(f"{name}: corrupt initrd: bad cpio header at byte {offset}") from None
        name_end = offset + CPIO_HEADER + name_size
        entry_name = data[offset + CPIO_HEADER : name_end - 1]
        data_start = (name_end + 3) & ~3
        data_end = data_start + file_size
        if data_end > len(data):
            raise ConfigError(f"{name}: truncated initrd: cpio entry {entry_name.decode(errors='replace')!r} runs "
                              f"past the end of the file ({len(data)} bytes)")
        offset = (data_end + 3) & ~3
        if entry_name == CPIO_TRAILER:
            return offset


def _check_stream(data: bytes, offset: int, decompressor, kind: str, name: str) -> int:
    """Decompress one stream (to check it is whole, and check a cpio inside); returns its end."""
    try:
        content = decompressor.decompress(data[offset:])
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as error:
        raise ConfigError(f"{name}: corrupt initrd: {kind} data is damaged ({error})") from None
    if not decompressor.eof:
        raise ConfigError(f"{name}: truncated initrd: the {kind} stream ends early")
    if content[:6] in CPIO_MAGICS:
        check_initrd(content, f"{name} ({kind} content)")
    return len(data) - len(decompressor.unused_data)
