"""Fault tolerance in the spirit of Kemari: the primary syncs its standby at every output.

`protocol` is the replication protocol (sans-IO), `primary` the output gate and sync loop,
`standby` the staging, commit and takeover, `demo` the end-to-end demonstration.
"""

from pykvm.ft.primary import FtError, Primary
from pykvm.ft.standby import Standby

__all__ = ["FtError", "Primary", "Standby"]
