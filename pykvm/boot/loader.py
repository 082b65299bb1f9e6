"""Put a guest image into RAM and the boot vCPU into the state its format promises.

Three formats, recognised by content, not by file name:
- ELF64 (x86-64 executable): PT_LOAD segments at their physical addresses, entered in 64-bit mode
  with identity-mapped page tables, RAX = multiboot magic, RBX = a multiboot info block.
- Multiboot v1: an ELF32, or any file whose header carries load addresses (the "a.out kludge"),
  entered in 32-bit protected mode as the multiboot spec describes (QEMU's -kernel does the same).
- Flat binary (only with an explicit load address): below 1 MiB it starts in real mode at its
  first byte, above 1 MiB in 32-bit protected mode.

Boot data the VMM writes below 1 MiB (where images usually load at or above 1 MiB): a GDT at
0x500, the multiboot info at 0x1000 with its memory map and loader name, the command line at
0x2000, and for ELF64 the page tables at 0x10000. An image may not overlap them.
"""

from __future__ import annotations

import array
import dataclasses
import struct
from dataclasses import dataclass
from pathlib import Path

import construct

from pykvm.boot import formats as f
from pykvm.errors import ConfigError
from pykvm.memory import MMIO_HOLE_END, MMIO_HOLE_START, GuestMemoryError
from pykvm.boot.cpu_mode import enter_long_mode, enter_protected_mode, enter_real_mode, write_boot_gdt
from pykvm.vcpu import Vcpu
from pykvm.vm import Vm

BOOT_GDT = 0x0500
MULTIBOOT_INFO = 0x1000
MEMORY_MAP = 0x1200
BOOT_LOADER_NAME = 0x1800
CMDLINE = 0x2000
CMDLINE_MAX = 0x1000
PAGE_TABLES = 0x10000  # PML4, PDPT, then four page directories: 4 GiB in 2 MiB pages
BOOT_AREA_END = PAGE_TABLES + 6 * 0x1000
LOW_MEMORY_END = 0x9FC00  # conventional memory ends where the EBDA would begin
ONE_MIB = 0x10_0000

LOADER_NAME = b"pykvm\0"


@dataclass(frozen=True)
class LoadedImage:
    """What was loaded, for the user (`--trace`) and for tests."""

    format: str
    entry: int
    start: int  # lowest guest-physical address written
    end: int  # one past the highest


def load_image(vm: Vm, image: str | Path | bytes, *, cmdline: str = "", load_addr: int | None = None) -> LoadedImage:
    """Load an image (a file, or its bytes) into the VM's RAM and set up vCPU 0 to start it.
    Raises ConfigError for anything wrong with the image."""
    path = "image" if isinstance(image, bytes) else image
    data = image if isinstance(image, bytes) else read_input(Path(image))
    header = f.ElfIdent.parse(data[:16]) if data.startswith(f.ELF_MAGIC) and len(data) >= 16 else None
    multiboot = _find_multiboot_header(data)
    if load_addr is not None and (header is not None or multiboot is not None):
        kind = "an ELF" if header is not None else "a multiboot image"
        raise ConfigError(f"--load-addr {load_addr:#x}: {path} is {kind}, which says where it loads "
                          "(--load-addr is for flat binaries)")
    if header is not None and header.elf_class == f.ELFCLASS64:
        image = _load_elf(vm, data, bits=64)
        _write_boot_data(vm, cmdline)
        _write_long_mode_tables(vm)
        enter_long_mode(vm.vcpus[0], image.entry, cr3=PAGE_TABLES, gdt_base=BOOT_GDT,
                        rax=f.MULTIBOOT_BOOTLOADER_MAGIC, rbx=MULTIBOOT_INFO)
        return image
    if multiboot is not None:
        image = _load_multiboot(vm, data, *multiboot, elf=header is not None)
        _enter_protected(vm.vcpus[0], vm, cmdline, image.entry)
        return image
    if header is not None:
        raise ConfigError(f"{path}: a 32-bit ELF without a multiboot header cannot be booted")
    if load_addr is not None:
        return _load_flat(vm, data, load_addr, cmdline)
    raise ConfigError(f"{path}: not an ELF64, multiboot or flat image (give --load-addr for a flat binary)")


def read_input(path: Path, what: str = "a guest image", *, option: str = "", allow_empty: bool = False) -> bytes:
    """A file the user named (`what` it should be, the `option` that named it), or one line of
    ConfigError saying why it cannot be read."""
    named = f" ({option})" if option else ""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file{named}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not {what}") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    if not data and not allow_empty:
        raise ConfigError(f"{path}: file is empty")
    return data


def _copy(vm: Vm, addr: int, data: bytes | memoryview, zero_to: int | None = None, *, boot_data: bool = True) -> None:
    """Write an image piece into RAM, turning an out-of-RAM address into a user-facing error.
    `boot_data`: the VMM's boot data will be written too, so the image must stay clear of it."""
    end = zero_to if zero_to is not None else addr + len(data)
    if boot_data and addr < BOOT_AREA_END and end > BOOT_GDT:
        raise ConfigError(f"image range [{addr:#x}, {end:#x}) overlaps the VMM's boot data below {BOOT_AREA_END:#x}")
    try:
        vm.memory.write(addr, data)
        if zero_to is not None and zero_to > addr + len(data):
            vm.memory.fill(addr + len(data), zero_to - addr - len(data))
    except GuestMemoryError:
        raise ConfigError(
            f"image range [{addr:#x}, {end:#x}) does not fit in guest RAM of {vm.memory.size // ONE_MIB} MiB"
            " (raise --mem)"
        ) from None


# -- ELF ---------------------------------------------------------------------------------------------


def _load_elf(vm: Vm, data: bytes, *, bits: int) -> LoadedImage:
    header_struct, phdr_struct = (
        (f.Elf64Header, f.Elf64ProgramHeader) if bits == 64 else (f.Elf32Header, f.Elf32ProgramHeader)
    )
    try:
        header = header_struct.parse(data)
    except construct.ConstructError:
        raise ConfigError("truncated ELF header") from None
    expected_machine = f.EM_X86_64 if bits == 64 else f.EM_386
    if header.ident.data != f.ELFDATA2LSB or header.machine != expected_machine:
        raise ConfigError(f"ELF{bits} image is not for x86 (machine {header.machine})")
    if header.type != f.ET_EXEC:
        raise ConfigError(f"ELF{bits} image is not an executable (type {header.type})")
    segments = elf_segments(data, header, phdr_struct)
    for address, contents, size in segments:
        _copy(vm, address, contents, zero_to=address + size)
    start = min(address for address, _, _ in segments)
    end = max(address + size for address, _, size in segments)
    return LoadedImage(f"elf{bits}", header.entry, start, end)


def elf_segments(data: bytes, header: construct.Container, phdr_struct: construct.Struct,
                 what: str = "") -> list[tuple[int, memoryview, int]]:
    """(physical address, file bytes, memory size) of each PT_LOAD segment, checked against the
    file and the entry point; `what` prefixes the error messages (a file name)."""
    segments = []
    for i in range(header.phnum):
        offset = header.phoff + i * header.phentsize
        try:
            ph = phdr_struct.parse(data[offset : offset + phdr_struct.sizeof()])
        except construct.ConstructError:
            raise ConfigError(f"{what}truncated ELF: program header {i} is past the end of the file") from None
        if ph.type != f.PT_LOAD or ph.memsz == 0:
            continue
        if ph.offset + ph.filesz > len(data):
            raise ConfigError(f"{what}truncated ELF: segment {i} extends past the end of the file")
        if ph.filesz > ph.memsz:
            raise ConfigError(f"{what}malformed ELF: segment {i} has more file bytes than memory bytes")
        segments.append((ph.paddr, memoryview(data)[ph.offset : ph.offset + ph.filesz], ph.memsz))
    if not segments:
        raise ConfigError(f"{what}ELF image has no loadable segment")
    if not any(address <= header.entry < address + size for address, _, size in segments):
        raise ConfigError(f"{what}ELF entry point {header.entry:#x} is outside the loaded segments")
    return segments


# -- multiboot ---------------------------------------------------------------------------------------


def _find_multiboot_header(data: bytes) -> tuple[int, construct.Container] | None:
    """(file offset, header) of a valid multiboot header in the first 8 KiB, if any."""
    magic = f.MULTIBOOT_HEADER_MAGIC.to_bytes(4, "little")
    limit = min(len(data), f.MULTIBOOT_SEARCH)
    offset = data.find(magic, 0, limit)
    while offset != -1:
        if offset % 4 == 0 and offset + 12 <= len(data):
            flags = int.from_bytes(data[offset + 4 : offset + 8], "little")
            checksum = int.from_bytes(data[offset + 8 : offset + 12], "little")
            if (f.MULTIBOOT_HEADER_MAGIC + flags + checksum) & 0xFFFF_FFFF == 0:
                padded = data[offset : offset + f.MultibootHeader.sizeof()].ljust(f.MultibootHeader.sizeof(), b"\0")
                return offset, f.MultibootHeader.parse(padded)
        offset = data.find(magic, offset + 1, limit)
    return None


def _load_multiboot(vm: Vm, data: bytes, offset: int, header: construct.Container, *, elf: bool) -> LoadedImage:
    if header.flags & f.MB_VIDEO_MODE:
        raise ConfigError("multiboot image asks for a video mode; pykvm has no display")
    if not header.flags & f.MB_AOUT_KLUDGE:
        if not elf:
            raise ConfigError("multiboot image has neither load addresses (flag 16) nor an ELF header")
        return dataclasses.replace(_load_elf(vm, data, bits=32), format="multiboot")
    if offset + f.MultibootHeader.sizeof() > len(data):
        raise ConfigError("truncated multiboot header")
    load_addr, header_addr = header.load_addr, header.header_addr
    if load_addr > header_addr:
        raise ConfigError("malformed multiboot header: load_addr is above header_addr")
    file_start = offset - (header_addr - load_addr)
    if file_start < 0:
        raise ConfigError("malformed multiboot header: load_addr lies before the start of the file")
    if header.load_end_addr:
        if header.load_end_addr < load_addr:
            raise ConfigError("malformed multiboot header: load_end_addr is below load_addr")
        length = header.load_end_addr - load_addr
        if file_start + length > len(data):
            raise ConfigError("truncated multiboot image: the file ends before load_end_addr")
    else:
        length = len(data) - file_start
    end = max(header.bss_end_addr, load_addr + length)
    if not load_addr <= header.entry_addr < end:
        raise ConfigError(f"multiboot entry {header.entry_addr:#x} is outside the loaded image")
    _copy(vm, load_addr, memoryview(data)[file_start : file_start + length], zero_to=end)
    return LoadedImage("multiboot", header.entry_addr, load_addr, end)


def _enter_protected(vcpu: Vcpu, vm: Vm, cmdline: str, entry: int) -> None:
    _write_boot_data(vm, cmdline)
    enter_protected_mode(vcpu, entry, gdt_base=BOOT_GDT, rax=f.MULTIBOOT_BOOTLOADER_MAGIC, rbx=MULTIBOOT_INFO)


def _write_boot_data(vm: Vm, cmdline: str) -> None:
    """The boot GDT, the multiboot info block, its memory map, the command line."""
    memory = vm.memory
    encoded = cmdline.encode() + b"\0"
    if len(encoded) > CMDLINE_MAX:
        raise ConfigError(f"command line is {len(encoded) - 1} bytes; at most {CMDLINE_MAX - 1} fit")
    write_boot_gdt(memory, BOOT_GDT)
    memory.write(CMDLINE, encoded)
    memory.write(BOOT_LOADER_NAME, LOADER_NAME)
    regions = _memory_map(memory.size)
    mmap = b"".join(f.MultibootMemoryMapEntry.build(dict(base_addr=b, length=n, type=t)) for b, n, t in regions)
    memory.write(MEMORY_MAP, mmap)
    low_end = min(memory.size, MMIO_HOLE_START)
    info = f.MultibootInfo.build(dict(
        flags=f.MBI_MEMORY | f.MBI_CMDLINE | f.MBI_MEMORY_MAP | f.MBI_BOOT_LOADER_NAME,
        mem_lower=LOW_MEMORY_END // 1024,
        mem_upper=(low_end - ONE_MIB) // 1024,
        boot_device=0, cmdline=CMDLINE, mods_count=0, mods_addr=0, syms=[0, 0, 0, 0],
        mmap_length=len(mmap), mmap_addr=MEMORY_MAP, drives_length=0, drives_addr=0,
        config_table=0, boot_loader_name=BOOT_LOADER_NAME, apm_table=0,
        vbe=bytes(16), framebuffer=bytes(22),
    ))
    memory.write(MULTIBOOT_INFO, info)


def _memory_map(size: int) -> list[tuple[int, int, int]]:
    """(base, length, type) as a PC firmware reports it: RAM, the legacy hole, RAM, the PCI hole."""
    low_end = min(size, MMIO_HOLE_START)
    regions = [
        (0, LOW_MEMORY_END, f.MEMORY_AVAILABLE),
        (LOW_MEMORY_END, ONE_MIB - LOW_MEMORY_END, f.MEMORY_RESERVED),
        (ONE_MIB, low_end - ONE_MIB, f.MEMORY_AVAILABLE),
    ]
    if size > MMIO_HOLE_START:
        regions.append((MMIO_HOLE_END, size - MMIO_HOLE_START, f.MEMORY_AVAILABLE))
    return regions


def _write_long_mode_tables(vm: Vm) -> None:
    """Identity-map the first 4 GiB with 2 MiB pages (present, writable, user)."""
    pml4, pdpt, pds = PAGE_TABLES, PAGE_TABLES + 0x1000, PAGE_TABLES + 0x2000
    flags = 0x7  # present | writable | user
    vm.memory.write_u64(pml4, pdpt | flags)
    vm.memory.write(pdpt, struct.pack("<4Q", *(pds + i * 0x1000 | flags for i in range(4))))
    entries = array.array("Q", (i << 21 | flags | 0x80 for i in range(4 * 512)))  # 0x80: 2 MiB page
    vm.memory.write(pds, entries.tobytes())  # x86 is little-endian, as the host


# -- flat binaries -----------------------------------------------------------------------------------


def _load_flat(vm: Vm, data: bytes, load_addr: int, cmdline: str) -> LoadedImage:
    if load_addr < ONE_MIB:
        if load_addr & 0xF:
            raise ConfigError(f"--load-addr {load_addr:#x}: below 1 MiB a flat binary must be 16-byte aligned")
        if load_addr + len(data) > LOW_MEMORY_END:
            raise ConfigError(f"flat binary of {len(data)} bytes at {load_addr:#x} runs past conventional memory")
        _copy(vm, load_addr, data, boot_data=False)
        enter_real_mode(vm.vcpus[0], load_addr >> 4, 0)
    else:
        _copy(vm, load_addr, data)
        _enter_protected(vm.vcpus[0], vm, cmdline, load_addr)
    return LoadedImage("flat", load_addr, load_addr, load_addr + len(data))
