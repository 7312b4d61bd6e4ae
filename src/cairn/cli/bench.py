"""`cairn bench`: timing runs against plain PyTorch references. cairn.bench.speed owns its options, so
its arguments go there unparsed; the parser here only lists the command in `cairn --help`."""

from __future__ import annotations

from cairn.cli.options import Subcommands


def add_parser(sub: Subcommands) -> None:
    sub.add_parser("bench", help="time training steps and generation against plain PyTorch references "
                                 "(`cairn bench --help`)", add_help=False)


def run(argv: list[str]) -> int:
    from cairn.bench.speed import main as bench_main

    return bench_main(argv)
