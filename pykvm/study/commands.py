"""The `pykvm ft study` and `pykvm ft report` subcommands: their options (registered on `pykvm
ft` by cli.py) and what they run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pykvm.errors import ConfigError

ROLES = ("study", "report")
EXIT_FAILURE = 1


def add_commands(roles: argparse._SubParsersAction) -> None:
    """Add `study` and `report` beside `pykvm ft standby`."""
    study = roles.add_parser("study", help="reproduce the Kemari measurements: latency, syncs, pauses per FT mode",
                             description="Run the iozone guest (buffered+fsync and O_SYNC writes) under every FT "
                                         "mode and write results.json, table.md and PNG plots into DIR.")
    study.add_argument("--quick", action="store_true", help="short trials (about two minutes in all), for CI")
    study.add_argument("-o", "--output", default="ft-study", metavar="DIR", help="where to write (default ./ft-study)")
    report = roles.add_parser("report", help="plots and a summary table from a --metrics file",
                              description="Draw the sync figures of a `--metrics` file (JSON lines) into DIR.")
    report.add_argument("metrics", metavar="METRICS.jsonl")
    report.add_argument("-o", "--output", metavar="DIR", help="where to write (default: the metrics file's folder)")


def run(args: argparse.Namespace) -> int:
    return {"study": _study, "report": _report}[args.role](args)


def _output(text: str) -> Path:
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {text}: exists and is not a folder")
    return out


def _study(args: argparse.Namespace) -> int:
    from pykvm.study.runner import TrialFailed
    from pykvm.study.study import run_study

    out = _output(args.output)
    try:
        run_study(out, quick=args.quick, say=lambda line: print(line, flush=True))
    except TrialFailed as error:
        print(f"pykvm: error: ft study: {error}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"ft study: results.json, table.md and the plots are in {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pykvm.study.report import report

    metrics = Path(args.metrics)
    out = _output(args.output) if args.output else metrics.parent
    text, written = report(metrics, out)
    print(text, end="")
    print("ft report: wrote " + ", ".join(str(path) for path in written))
    return 0
