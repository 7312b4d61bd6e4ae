"""`cairn prepare`: tokenize a data source into the token cache, without training, and report it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from cairn.cli.options import Subcommands, add_config_options, not_empty
from cairn.util.errors import CairnError
from cairn.util.log import setup as setup_logging

if TYPE_CHECKING:
    from cairn.config.sections import RunConfig

# the data settings `cairn prepare` takes as its own options, by config key
DATA_OPTIONS = ("seed", "tokenizer", "n_samples", "train_frac", "val_frac", "text_field", "txt_separator",
                "hub_split", "cache_dir")


# more processes than this is never what a machine has (and a process pool cannot take 2^63 of them)
MAX_WORKERS = 4096

def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "prepare", help="tokenize a data source into the token cache, on every core, without training",
        description="Read, clean, split and tokenize --data into the token cache that `cairn train` then maps "
                    "(the same cache for the same data and settings). The source is streamed in chunks, so "
                    "memory stays small whatever its size, and chunks are tokenized on --workers processes. "
                    "Prints the splits, tokens, throughput (MB/s of input), time and peak memory.")
    p.set_defaults(func=run)
    p.add_argument("--data", help="data source, as for `cairn train --data` (default: the config's)")
    p.add_argument("--preset", help="take the data settings of this preset (as `cairn train --preset`)")
    p.add_argument("--config", help="take the data settings of this TOML config file")
    p.add_argument("--workers", type=int, default=0,
                   help="tokenizer processes (default 0: every usable core; small sources use one)")
    add_config_options(p, DATA_OPTIONS, keep_config=True)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")


def run(args: argparse.Namespace) -> int:
    from cairn.data.report import prepare, report_lines
    from cairn.data.run_tokenizer import for_data

    cfg = _config(args)
    as_json: bool = args.json
    setup_logging(stream=sys.stderr, quiet=as_json)
    report = prepare(cfg, for_data(cfg.tokenizer, cfg.data, cfg.seed), workers=args.workers,
                     progress=not (args.no_progress or as_json) and sys.stderr.isatty())
    print(json.dumps(report) if as_json else "\n".join(report_lines(report)))
    return 0


def _config(args: argparse.Namespace) -> RunConfig:
    """The run config whose data settings `cairn prepare` uses: preset, then config file, then flags."""
    from cairn.training.resolve import resolve_config

    not_empty(args, "prepare", "data", "preset", "config", "tokenizer", "cache_dir")
    if not 0 <= args.workers <= MAX_WORKERS:
        raise CairnError(f"--workers must be from 0 (every usable core) to {MAX_WORKERS}, got {args.workers}")
    overrides: dict[str, Any] = {key: getattr(args, key) for key in DATA_OPTIONS if getattr(args, key) is not None}
    if args.data is not None:
        overrides["source"] = args.data
    return resolve_config(args.preset, args.config, overrides, continuing=True)
