"""The link-fault relay lives in pykvm.testing.relay, shared with bench/ft_faults.py."""

from pykvm.testing.relay import Relay

__all__ = ["Relay"]
