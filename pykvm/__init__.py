"""pykvm: a pure-Python userspace hypervisor on Linux KVM.

The names below are the Python API (README, "Using pykvm from Python"): the objects the `pykvm`
command itself uses. They are imported on first use, so `import pykvm` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> (module, attribute)
_API = {
    "Machine": ("pykvm.machine", "Machine"),
    "MachineConfig": ("pykvm.machine", "MachineConfig"),
    "MachineState": ("pykvm.machine", "MachineState"),
    "DiskSpec": ("pykvm.devices.virtio.blk", "DiskSpec"),
    "NetSpec": ("pykvm.devices.net_backends", "NetSpec"),
    "StopReason": ("pykvm.run_control", "StopReason"),
    "StopKind": ("pykvm.run_control", "StopKind"),
    "RunState": ("pykvm.run_control", "RunState"),
    "Debugger": ("pykvm.gdb.debugger", "Debugger"),
    "StopEvent": ("pykvm.gdb.target", "StopEvent"),
    "save_snapshot": ("pykvm.transfer.snapshot", "save"),
    "open_snapshot": ("pykvm.transfer.snapshot", "open_snapshot"),
    "Primary": ("pykvm.ft.primary", "Primary"),
    "Standby": ("pykvm.ft.standby", "Standby"),
    "guest_image": ("pykvm.guestbuild", "image_path"),
    "guest_elf": ("pykvm.guestbuild", "elf_path"),
    "ConfigError": ("pykvm.errors", "ConfigError"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'pykvm' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
