"""The small x86-64 test guests and their build driver (sources in guests/)."""

from .build import (
    BuildError,
    ToolchainMissing,
    UnknownGuest,
    build,
    cache_dir,
    elf_path,
    image_path,
    source_dir,
)
from .catalog import GUESTS, NEEDS, NEEDS_EXAMPLE

__all__ = [
    "GUESTS",
    "NEEDS",
    "NEEDS_EXAMPLE",
    "BuildError",
    "ToolchainMissing",
    "UnknownGuest",
    "build",
    "cache_dir",
    "elf_path",
    "image_path",
    "source_dir",
]
