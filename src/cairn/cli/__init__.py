"""The command line: parse, call one library function, print. `main` (cairn.cli.main) builds the parser
from one module per command (train, prepare, eval, generate, chat, serve, plot, export, tokenizer,
bench); options.py holds what several of them share."""

from cairn.cli.main import main

__all__ = ["main"]
