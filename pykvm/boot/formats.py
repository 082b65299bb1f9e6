"""Binary layouts the loaders read and write, declared with construct (off the hot path)."""

from __future__ import annotations

from construct import Array, Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Struct

# -- ELF (System V gABI), little-endian x86 ----------------------------------------------------------

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1

ElfIdent = Struct(
    "magic" / Const(ELF_MAGIC),
    "elf_class" / Int8ul,
    "data" / Int8ul,
    "version" / Int8ul,
    "osabi" / Int8ul,
    "abiversion" / Int8ul,
    "pad" / Bytes(7),
)


def _elf_header(word):
    return Struct(
        "ident" / ElfIdent,
        "type" / Int16ul,
        "machine" / Int16ul,
        "version" / Int32ul,
        "entry" / word,
        "phoff" / word,
        "shoff" / word,
        "flags" / Int32ul,
        "ehsize" / Int16ul,
        "phentsize" / Int16ul,
        "phnum" / Int16ul,
        "shentsize" / Int16ul,
        "shnum" / Int16ul,
        "shstrndx" / Int16ul,
    )


Elf32Header = _elf_header(Int32ul)
Elf64Header = _elf_header(Int64ul)

Elf32ProgramHeader = Struct(
    "type" / Int32ul,
    "offset" / Int32ul,
    "vaddr" / Int32ul,
    "paddr" / Int32ul,
    "filesz" / Int32ul,
    "memsz" / Int32ul,
    "flags" / Int32ul,
    "align" / Int32ul,
)

Elf64ProgramHeader = Struct(
    "type" / Int32ul,
    "flags" / Int32ul,
    "offset" / Int64ul,
    "vaddr" / Int64ul,
    "paddr" / Int64ul,
    "filesz" / Int64ul,
    "memsz" / Int64ul,
    "align" / Int64ul,
)

# -- Multiboot v1 (https://www.gnu.org/software/grub/manual/multiboot/multiboot.html) -----------------

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192  # the header must lie within the first 8 KiB, 4-byte aligned

MB_PAGE_ALIGN = 1 << 0  # modules page-aligned: we load no modules, so trivially honoured
MB_MEMORY_INFO = 1 << 1  # mem_* fields wanted: always provided
MB_VIDEO_MODE = 1 << 2  # a graphics mode wanted: we have no display
MB_AOUT_KLUDGE = 1 << 16  # the address fields below are valid

MultibootHeader = Struct(
    "magic" / Const(MULTIBOOT_HEADER_MAGIC, Int32ul),
    "flags" / Int32ul,
    "checksum" / Int32ul,
    "header_addr" / Int32ul,
    "load_addr" / Int32ul,
    "load_end_addr" / Int32ul,
    "bss_end_addr" / Int32ul,
    "entry_addr" / Int32ul,
)

MBI_MEMORY = 1 << 0
MBI_CMDLINE = 1 << 2
MBI_MEMORY_MAP = 1 << 6
MBI_BOOT_LOADER_NAME = 1 << 9

MultibootInfo = Struct(
    "flags" / Int32ul,
    "mem_lower" / Int32ul,  # KiB below 1 MiB
    "mem_upper" / Int32ul,  # KiB from 1 MiB to the first hole
    "boot_device" / Int32ul,
    "cmdline" / Int32ul,
    "mods_count" / Int32ul,
    "mods_addr" / Int32ul,
    "syms" / Array(4, Int32ul),
    "mmap_length" / Int32ul,
    "mmap_addr" / Int32ul,
    "drives_length" / Int32ul,
    "drives_addr" / Int32ul,
    "config_table" / Int32ul,
    "boot_loader_name" / Int32ul,
    "apm_table" / Int32ul,
    "vbe" / Bytes(16),
    "framebuffer" / Bytes(22),
)

MEMORY_AVAILABLE, MEMORY_RESERVED = 1, 2

MultibootMemoryMapEntry = Struct(
    "size" / Const(20, Int32ul),  # of the rest of the entry
    "base_addr" / Int64ul,
    "length" / Int64ul,
    "type" / Int32ul,
)
