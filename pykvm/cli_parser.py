"""The parser of the `pykvm` command: argparse made to print one line for any bad input (no
usage block) and exit 2, to refuse an option given twice, and to take a value that starts with '-'
as the value; and the relations between options (one that needs another, two that exclude each
other), declared per command in REQUIRES and EXCLUDES and checked right after parsing. The checks
of each value are in cli_validate."""

from __future__ import annotations

import argparse
import re
import sys

from pykvm.errors import ConfigError

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that prints one line for any bad input (no usage block), refuses an option given
    twice, and takes a value that starts with '-' as the value (`--mem -64M` is a bad size, not
    a missing argument)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)
        self.register("action", "store_true", _Flag)
        self.register("action", "append", _Append)

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._join_dash_values(args), namespace)

    def _join_dash_values(self, args: list[str]) -> list[str]:
        joined: list[str] = []
        index = 0
        while index < len(args):
            token = args[index]
            action = self._option_string_actions.get(token)
            following = args[index + 1] if index + 1 < len(args) else None
            if (action is not None and action.nargs is None and action.option_strings and following is not None
                    and following.startswith("-") and following != "--"
                    and following not in self._option_string_actions):
                joined.append(f"{token}={following}")
                index += 2
                continue
            joined.append(token)
            if token == "--" or (action is None and token in getattr(self, "_command_names", ())):
                joined.extend(args[index + 1:])  # a subcommand's own parser sees the rest
                break
            index += 1
        return joined

    def add_subparsers(self, **kwargs):
        subparsers = super().add_subparsers(**kwargs)
        names = self.__dict__.setdefault("_command_names", set())
        original = subparsers.add_parser

        def add_parser(name, **options):
            names.add(name)
            return original(name, **options)

        subparsers.add_parser = add_parser
        return subparsers

    def error(self, message: str):
        match = re.match(r"argument ([^:]+): (.*)", message, re.DOTALL)
        if match:
            option = match.group(1).split("/")[-1]
            reason = match.group(2)
            message = reason if reason.startswith(option) else f"{option} {reason}"
        print(f"pykvm: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _given(namespace: argparse.Namespace) -> set[str]:
    if not hasattr(namespace, "given"):
        namespace.given = set()
    return namespace.given


class _StoreOnce(argparse._StoreAction):
    def __call__(self, parser, namespace, values, option_string=None):
        given = _given(namespace)
        if self.dest in given and self.option_strings:
            parser.error(f"{option_string} given twice (give it once)")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class _Flag(argparse._StoreTrueAction):
    def __call__(self, parser, namespace, values, option_string=None):
        _given(namespace).add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class _Append(argparse._AppendAction):
    def __call__(self, parser, namespace, values, option_string=None):
        _given(namespace).add(self.dest)
        super().__call__(parser, namespace, values, option_string)


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether the user gave the option (not its default)."""
    return dest in getattr(args, "given", ())


# -- relations between options ------------------------------------------------------------------------

# command -> option -> the options it needs (any one of them); "GUEST" is the positional image.
REQUIRES: dict[str, dict[str, tuple[str, ...]]] = {
    "run": {"--initrd": ("--kernel",), "--load-addr": ("GUEST",), "--metrics": ("--ft",), "--ft-verify": ("--ft",),
            "--ft-witness": ("--ft",), "--ft-mode": ("--ft",), "--ft-disk": ("--ft",),
            "--ft-interval": ("--ft",), "--trace-ft": ("--ft",), "--ft-timeout": ("--ft",),
            "--insecure": ("--incoming",)},
}
# command -> pairs of options that exclude each other
EXCLUDES: dict[str, tuple[tuple[str, str], ...]] = {
    "run": (("--kernel", "GUEST"), ("--tls-creds", "--insecure")),
    "ft": (("--tls-creds", "--insecure"),),
    "restore": (("--tls-creds", "--insecure"),),
}


def _dest(option: str) -> str:
    return "image" if option == "GUEST" else option.lstrip("-").replace("-", "_")


def _was_given(args: argparse.Namespace, option: str) -> bool:
    return getattr(args, "image", None) is not None if option == "GUEST" else given(args, _dest(option))


def check_relations(args: argparse.Namespace) -> None:
    """Refuse an option without one it needs, and two that exclude each other (one line each)."""
    command = args.command
    for option, needs in REQUIRES.get(command, {}).items():
        if _was_given(args, option) and not any(_was_given(args, need) for need in needs):
            raise ConfigError(f"{option} needs {' or '.join(needs)}")
    for first, second in EXCLUDES.get(command, ()):
        if _was_given(args, first) and _was_given(args, second):
            raise ConfigError(f"give either {first} or {second}, not both")
