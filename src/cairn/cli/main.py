"""`cairn COMMAND ...`: the parser of every command, the dispatch to the command's module, and errors as
one line with exit code 2 (no traceback; CAIRN_DEBUG=1 shows it)."""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import Callable, Optional

from cairn.cli import bench, chat, export, generate, plot, prepare, serve, tokenizer, train
from cairn.cli import eval as evaluate
from cairn.cli import push
from cairn.cli.options import Command, Parser, Subcommands
from cairn.util.errors import CairnError, SharedError

# each command's parser, in the order `cairn --help` lists them
ADD_PARSERS: tuple[Callable[[Subcommands], None], ...] = (
    train.add_parser, prepare.add_parser, evaluate.add_parser, generate.add_parser, serve.add_parser,
    chat.add_parser, plot.add_parser, export.add_parser, tokenizer.add_parser, bench.add_parser,
    push.add_parser)


def build_parser() -> Parser:
    from cairn.version import __version__

    parser = Parser(prog="cairn", description="Train GPT-style language models from scratch.")
    parser.add_argument("--version", action="version", version=f"cairn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add_parser in ADD_PARSERS:
        add_parser(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    # a --time-budget counts from the command's start: the process's, when this is the program
    # (argv from the command line); a call from Python code starts its own clock here
    program = argv is None
    started = process_started() if program else time.monotonic()
    code = _command(list(sys.argv[1:] if argv is None else argv), started)
    if program:
        _spare_the_exit_a_collection()
    return code


def _spare_the_exit_a_collection() -> None:
    """The process ends once the command returns, and the interpreter's shutdown then runs the
    garbage collector over every object still alive, torch's and cairn's: 1.4 to 2.8 s on a 2-core
    machine busy with other work (0.35 s frozen), after the run's end yet within what a
    --time-budget counts (the whole process). Frozen objects are left out of those collections and
    their memory goes back with the process; cairn closes its own files (with-blocks, logging's
    handlers at exit), so none of them waits on a collection to be flushed."""
    gc.freeze()


def _command(args: list[str], started: float) -> int:
    try:
        return _dispatch(args, started)
    except CairnError as e:
        if os.environ.get("CAIRN_DEBUG"):
            raise
        if not isinstance(e, SharedError):  # under torchrun rank 0 already said it
            print(f"error: {e.for_cli()}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`cairn generate ... | head`): stop quietly, and let the
        # interpreter's final flush write nowhere instead of failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - storage failures come in many libraries' types
        code = _storage_failure(e)
        if code is None:
            raise  # a bug: its traceback is worth seeing
        return code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _dispatch(argv: list[str], started: float) -> int:
    if argv[:1] == ["bench"]:  # bench has its own parser: its options must not meet cairn's
        return bench.run(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "train":  # train takes the config's `--key value` options argparse does not know
        return train.run(args, extra, started)
    if extra:
        raise CairnError(f"unknown option {extra[0]!r} for `cairn {args.command}` "
                         f"(see `cairn {args.command} --help`)")
    run: Command = args.func
    return run(args)


def _storage_failure(e: Exception) -> Optional[int]:
    """A storage failure that no command caught where it happened, said in one line (exit code 2);
    None for anything else, or when CAIRN_DEBUG asks for the traceback."""
    from cairn.util.failures import storage_problem

    problem = storage_problem(e)
    if problem is None or os.environ.get("CAIRN_DEBUG"):
        return None
    where = f" ({problem.path})" if problem.path else ""
    print(f"error: {problem.what}{where}: {problem.advice}, then run the command again "
          "(set CAIRN_DEBUG=1 to see where it failed)", file=sys.stderr)
    return 2


def process_started() -> float:
    """When this process began, on the time.monotonic() clock: a time budget then covers the
    interpreter's start and the imports (torch's take seconds), which a wall clock around the
    command counts too. Read from /proc (Linux); elsewhere, now."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        began = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - began
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic()
    now = time.monotonic()
    return now - min(max(age, 0.0), now)
