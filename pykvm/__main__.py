"""`python -m pykvm` and the `pykvm` command's entry point. SIGTERM and SIGHUP are blocked before
the first import that may start a thread (see cli_signals)."""

import sys

from pykvm import cli_signals

cli_signals.block()


def run() -> int:
    from pykvm.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
