"""Binary layouts the loaders read and write, declared with construct (off the hot path)."""

from __future__ import annotations

from construct import Array, Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

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

# -- Linux x86 boot protocol (Documentation/x86/boot.rst, arch/x86/include/uapi/asm/bootparam.h) ----

LINUX_BOOT_FLAG = 0xAA55
LINUX_HEADER_MAGIC = b"HdrS"
SETUP_HEADER_OFFSET = 0x1F1  # in the bzImage file and in boot_params alike
LINUX_MIN_PROTOCOL = 0x020C  # 2.12: the first with xloadflags, so the first that can say "64-bit entry"
LOADED_HIGH = 1 << 0  # loadflags: the protected-mode kernel is loaded at 1 MiB or above
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0  # xloadflags: the kernel has the 64-bit entry at load address + 0x200
LOADER_TYPE_UNDEFINED = 0xFF  # type_of_loader: a boot loader without an assigned ID

SetupHeader = Struct(
    "setup_sects" / Int8ul,  # 512-byte sectors of real-mode setup after the boot sector (0 means 4)
    "root_flags" / Int16ul,
    "syssize" / Int32ul,  # protected-mode code size in 16-byte paragraphs
    "ram_size" / Int16ul,
    "vid_mode" / Int16ul,
    "root_dev" / Int16ul,
    "boot_flag" / Int16ul,  # 0xAA55
    "jump" / Int16ul,
    "header" / Bytes(4),  # "HdrS"
    "version" / Int16ul,  # boot protocol version, e.g. 0x020F
    "realmode_swtch" / Int32ul,
    "start_sys_seg" / Int16ul,
    "kernel_version" / Int16ul,
    "type_of_loader" / Int8ul,
    "loadflags" / Int8ul,
    "setup_move_size" / Int16ul,
    "code32_start" / Int32ul,
    "ramdisk_image" / Int32ul,
    "ramdisk_size" / Int32ul,
    "bootsect_kludge" / Int32ul,
    "heap_end_ptr" / Int16ul,
    "ext_loader_ver" / Int8ul,
    "ext_loader_type" / Int8ul,
    "cmd_line_ptr" / Int32ul,
    "initrd_addr_max" / Int32ul,  # highest address the initrd may occupy
    "kernel_alignment" / Int32ul,
    "relocatable_kernel" / Int8ul,
    "min_alignment" / Int8ul,
    "xloadflags" / Int16ul,
    "cmdline_size" / Int32ul,  # longest command line, without the NUL
    "hardware_subarch" / Int32ul,
    "hardware_subarch_data" / Int64ul,
    "payload_offset" / Int32ul,
    "payload_length" / Int32ul,
    "setup_data" / Int64ul,
    "pref_address" / Int64ul,  # where a relocatable kernel prefers to be loaded
    "init_size" / Int32ul,  # bytes the kernel needs from its load address while it initialises
    "handover_offset" / Int32ul,
    "kernel_info_offset" / Int32ul,
)

E820_RAM, E820_RESERVED, E820_ACPI = 1, 2, 3
E820_MAX_ENTRIES_ZEROPAGE = 128

E820Entry = Struct("addr" / Int64ul, "size" / Int64ul, "type" / Int32ul)

# The "zero page": what a boot loader hands the kernel in RSI. Only the fields a VMM fills are
# named; the rest (screen, APM, EDD, EFI information) stays zero.
BootParams = Struct(
    Padding(0x58),  # screen_info, apm_bios_info
    "tboot_addr" / Int64ul,
    Padding(0x10),  # ist_info
    "acpi_rsdp_addr" / Int64ul,  # 0x070: where the RSDP is, so the kernel need not scan for it
    Padding(0xC0 - 0x78),
    "ext_ramdisk_image" / Int32ul,  # 0x0C0: bits 32-63 of the hdr fields
    "ext_ramdisk_size" / Int32ul,
    "ext_cmd_line_ptr" / Int32ul,
    Padding(0x1E8 - 0xCC),
    "e820_entries" / Int8ul,  # 0x1E8
    Padding(SETUP_HEADER_OFFSET - 0x1E9),
    "hdr" / SetupHeader,  # 0x1F1
    Padding(0x2D0 - SETUP_HEADER_OFFSET - SetupHeader.sizeof()),
    "e820_table" / Array(E820_MAX_ENTRIES_ZEROPAGE, E820Entry),  # 0x2D0
    Padding(0x1000 - 0x2D0 - E820_MAX_ENTRIES_ZEROPAGE * E820Entry.sizeof()),
)
