"""Fault tolerance in the spirit of Kemari: the primary syncs its standby at every output.

`protocol` is the replication protocol (sans-IO), `primary` the output gate and sync loop,
`standby` the staging, commit and takeover, `demo` the end-to-end demonstration. `Primary`,
`Standby` and `FtError` load on first use (PEP 562), so that importing a light module of the
package (`choices`, `trace`) does not load numpy and the wire.
"""

from __future__ import annotations

import importlib

_HOMES = {"FtError": "pykvm.ft.reach", "Primary": "pykvm.ft.primary", "Standby": "pykvm.ft.standby"}

__all__ = ["FtError", "Primary", "Standby"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
