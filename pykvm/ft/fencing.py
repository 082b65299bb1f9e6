"""Fencing: which side of an FT pair may run the guest when the two lose each other.

The rule: **a side runs the guest and releases outputs on its own only after winning the next
epoch at the witness** (ft.witness: an atomic compare-and-swap of an epoch record).

- Start-up. The primary reads the witness and claims the next epoch before its guest runs; its
  Hello names the witness and that epoch. A standby admits a primary only if it names the same
  witness as the standby's own `--ft-witness` (both none also agree) and its epoch is the
  witness's current one; that record is the pair's *agreed* epoch. An unknown URI, or a witness
  unreachable or damaged at start-up, is bad input: one line, exit 2, nothing runs.
- The link breaks. The primary sees its standby lost (no Ack or heartbeat answer in time, EOF,
  a StandbyFault); the standby sees silence or EOF from its primary. Each claims the step from
  the agreed epoch: exactly one wins. The primary claims *before* it closes its socket, so a
  standby that sees EOF has already lost if the primary won.
- The winner goes on: the primary unprotected (its held outputs go out), the standby takes
  over (`took over from sync N`). The winner's epoch is the one a new pair starts from
  (`ft-protect`).
- The loser fences itself: its vCPUs stop, nothing it holds is released (held disk writes and
  frames die with it), it says why on stderr in one line starting with `fenced: ` and exits
  with status 75 (EXIT_FENCED).
- The witness cannot be asked (unreachable, locked, damaged): nobody decides. Outputs stay held
  (the guest stalls on them) and each side keeps asking with a short bounded back-off, logging
  one line when asking starts failing and one when it works again. Safety over availability.
- A primary whose FT thread fails unexpectedly fences itself too: its standby, seeing EOF, wins.
- Without a witness both sides decide alone, as if each had won: a cut link can leave two live
  copies of the guest (the primary warns once at start-up).
"""

from __future__ import annotations

import threading
from typing import Callable

from pykvm.ft.choices import EXIT_FENCED  # noqa: F401 (the status a fenced side exits with)
from pykvm.errors import ConfigError
from pykvm.ft.protocol import Hello
from pykvm.ft.witness import Epoch, Witness, WitnessUnavailable, open_witness, side_name

RETRY_FIRST, RETRY_MAX = 0.05, 1.0  # seconds between asks of an unreachable witness, doubling
NO_WITNESS_WARNING = ("ft primary: warning: no --ft-witness: a cut link between primary and standby can "
                      "leave two live copies of the guest")


class Fenced(Exception):
    """This side lost the epoch: it must stop and release nothing. The message says why."""


class Undecided(Exception):
    """Asked to give up (the VMM is ending) while the witness could not be reached."""


class Fencing:
    """One side's standing at the witness: the epoch it holds or agreed on with its peer."""

    def __init__(self, witness: Witness, role: str, log: Callable[[str], None]) -> None:
        self.witness, self.role, self.log = witness, role, log
        self.owner = side_name(role)
        self.epoch: Epoch | None = None  # the pair's agreed epoch (the primary's once it claimed)
        self._give_up = threading.Event()

    @classmethod
    def open(cls, uri: str, role: str, log: Callable[[str], None]) -> Fencing:
        """Start-up: an unknown URI or a witness that cannot be read now is bad input (exit 2)."""
        fencing = cls(open_witness(uri), role, log)
        fencing._read_at_start()
        return fencing

    @property
    def uri(self) -> str:
        return self.witness.uri

    def claim_start(self) -> Epoch:
        """The primary, before its guest runs: win the next epoch for the pair to agree on."""
        seen = self._read_at_start()
        try:
            won = self.witness.claim(seen, self.owner)
        except WitnessUnavailable as error:
            raise ConfigError(f"--ft-witness {self.uri}: {error}") from None
        if won is None:
            raise ConfigError(f"--ft-witness {self.uri}: another side claimed epoch {seen.number + 1} meanwhile")
        self.epoch = won
        return won

    def admit(self, hello: Hello) -> str | None:
        """The standby: why it refuses this primary, or None (and the pair's epoch is agreed)."""
        if hello.witness != self.uri:
            named = f"names the witness {hello.witness}" if hello.witness else "has no witness"
            return f"the primary {named}; this standby's is {self.uri}"
        try:
            current = self.witness.read()
        except WitnessUnavailable as error:
            return f"cannot check the primary's epoch: {error}"
        if hello.epoch != current.number:
            return f"the primary holds epoch {hello.epoch}, the witness {self.uri} is at {current.number}"
        self.epoch = current
        return None

    def settle(self, reason: str) -> Epoch:
        """The link broke (`reason`): claim the step from the agreed epoch until the witness
        answers. Returns the epoch won; raises Fenced if the other side won it, Undecided if
        give_up() was called first."""
        agreed, delay, failing = self.epoch, RETRY_FIRST, False
        assert agreed is not None, "settle() before the pair agreed on an epoch"
        while True:
            try:
                won = self.witness.claim(agreed, self.owner) or self._won_already(agreed)
                break
            except WitnessUnavailable as error:
                if not failing:
                    self.log(f"ft {self.role}: cannot ask the witness ({error}); holding everything, retrying")
                    failing = True
            if self._give_up.wait(delay):
                raise Undecided(f"gave up asking the witness {self.uri}")
            delay = min(delay * 2, RETRY_MAX)
        if failing:
            self.log(f"ft {self.role}: the witness {self.uri} answers again")
        if won is None:
            raise Fenced(f"{self.role}: the other side won epoch {agreed.number + 1} at {self.uri} "
                         f"after the link broke ({reason})")
        self.epoch = won
        return won

    def _won_already(self, agreed: Epoch) -> Epoch | None:
        """A claim that took effect although its answer was lost (a timeout after etcd committed,
        an fsync error after the write) shows our own name on the next epoch: we won it."""
        current = self.witness.read()
        return current if current.number == agreed.number + 1 and current.owner == self.owner else None

    def give_up(self) -> None:
        """Stop a settle() waiting for the witness (the VMM is ending; nothing is released)."""
        self._give_up.set()

    def _read_at_start(self) -> Epoch:
        try:
            return self.witness.read()
        except WitnessUnavailable as error:
            raise ConfigError(f"--ft-witness {self.uri}: {error}") from None


def admission(fencing: Fencing | None, hello: Hello) -> str | None:
    """Why a standby (with `fencing`, or None without a witness) refuses this primary, or None."""
    if fencing is not None:
        return fencing.admit(hello)
    if hello.witness:
        return f"the primary names the witness {hello.witness}; this standby has none"
    return None
