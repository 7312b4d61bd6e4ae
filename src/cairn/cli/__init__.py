"""The command line: parse, call one library function, print."""

from cairn.cli.commands import main

__all__ = ["main"]
