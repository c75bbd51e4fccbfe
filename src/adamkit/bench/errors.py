"""Errors the command line turns into exit status 2 with a one-line message."""


class UsageError(Exception):
    """Bad input from the user: unknown name, invalid value, missing data, unwritable path."""


class DataNotFoundError(UsageError):
    """A workload's data files are missing; the message says which files, where, and how to get them."""
