"""Errors a user can cause and fix: the CLI prints them as one line and exits with status 2."""


class ConfigError(Exception):
    """Bad input to the VMM: a missing or malformed image, an impossible machine size, ..."""
