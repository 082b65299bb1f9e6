"""Errors a user can cause and fix: the CLI prints them as one line and exits with status 2."""


class ConfigError(Exception):
    """Bad input to the VMM: a missing or malformed image, an impossible machine size, ...
    `in_use`: the resource is held by another process (it may come free)."""

    def __init__(self, message: str, *, in_use: bool = False) -> None:
        super().__init__(message)
        self.in_use = in_use
