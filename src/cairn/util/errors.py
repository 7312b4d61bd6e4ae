"""The one exception type the CLI turns into a one-line message and exit code 2.

A message names the setting to change with `option(key)`: in the library's own words that is the
config key (`schedule.lr`), on the command line the flag (`--lr`). `str(error)` gives the first,
`error.for_cli()` the second, so a Python caller is never told to pass a flag."""

from __future__ import annotations

import re

_MARK = "\x1f"  # unit separator: brackets a setting's name inside a message, never printed
_OPTION = re.compile(f"{_MARK}([^{_MARK}]+){_MARK}")
# config keys whose command-line flag has another name
FLAG_OF = {"source": "data"}


def option(key: str) -> str:
    """A setting named in an error message, by its config key (`lr` or `schedule.lr`)."""
    return f"{_MARK}{key}{_MARK}"


def as_flag(key: str) -> str:
    name = key.rsplit(".", 1)[-1]
    return "--" + FLAG_OF.get(name, name).replace("_", "-")


class CairnError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""

    def raw(self) -> str:
        return super().__str__()

    def __str__(self) -> str:
        return _OPTION.sub(lambda m: m.group(1), self.raw())

    def for_cli(self) -> str:
        """The message with each setting named as its command-line flag."""
        return _OPTION.sub(lambda m: as_flag(m.group(1)), self.raw())


class SharedError(CairnError):
    """Under torchrun: rank 0's error, raised again on the other ranks, which stay quiet about it."""
