"""What `pykvm`'s commands import only when they use it (FT, migration, snapshots: numpy and the
wire, ~15 MiB resident), and how the command still names their errors: a module nobody imported
raised none of them."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from pykvm.ft.fencing import Fencing


def loaded_errors(*where: tuple[str, str]) -> tuple[type[BaseException], ...]:
    """The exception classes (module, class name) of the modules imported so far."""
    return tuple(getattr(sys.modules[module], name) for module, name in where if module in sys.modules)


def open_witness(uri: str | None, role: str, log: Callable[[str], None]) -> Fencing | None:
    """`--ft-witness URI` opened for `role` (FT's modules load here), or None without one."""
    if not uri:
        return None
    from pykvm.ft.fencing import Fencing

    return Fencing.open(uri, role, log)
