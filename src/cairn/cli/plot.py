"""`cairn plot`: training curves of one or more runs, from their metrics.jsonl, into one picture."""

from __future__ import annotations

import argparse

from cairn.cli.options import Subcommands
from cairn.util.errors import CairnError


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("plot", help="draw training curves of one or more runs into a PNG",
                       description="Draw loss (train and validation) against steps and against tokens seen, the "
                                   "learning rate and the throughput of one or more runs, read from their "
                                   "metrics.jsonl, into one picture; one colour per run. Needs matplotlib: "
                                   "pip install 'cairn-lm[plot]'.")
    p.set_defaults(func=run)
    p.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run directories (each holds metrics.jsonl)")
    p.add_argument("--out", metavar="FILE.png",
                   help="picture to write (.png; .svg and .pdf work too); default RUN_DIR/plot.png for one run, "
                        "runs.png in the current directory for several")
    p.add_argument("--title", help="figure title (default: the run name, or the number of runs)")


def run(args: argparse.Namespace) -> int:
    from cairn.trackers.plot import default_out, plot_runs

    paths: list[str] = args.paths
    out = args.out if args.out is not None else default_out(paths)
    if not str(out).strip():
        raise CairnError("--out is empty: give a file name such as plot.png, or leave --out out")
    plot_runs(paths, out, title=args.title)
    print(f"wrote {out}")
    return 0
