"""`cairn train`: a config from preset, file, saved run and `--key value` options, then one training run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cairn.cli.options import Parser, Subcommands, not_empty
from cairn.util.errors import CairnError
from cairn.util.log import setup as setup_logging

if TYPE_CHECKING:
    from cairn.config.sections import RunConfig

CFG = "cfg:"  # argparse dest prefix of the generated config options


def add_parser(sub: Subcommands) -> None:
    from cairn.config.io import describe_options
    from cairn.config.presets import PRESETS

    p = sub.add_parser(
        "train", help="train a model from scratch, or on from a trained run (--init-from)",
        description="Train a GPT-style model. Settings come from a preset, then a TOML config file, then "
                    "--key value overrides (any option below, with - or _, e.g. --lr 1e-3 --d-model 256).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config options (as --key value; in a TOML file, a table per section):\n"
               + describe_options())
    p.add_argument("--preset", help=f"named preset: {', '.join(PRESETS)} (default: plain defaults)")
    p.add_argument("--config", help="TOML config file applied after the preset")
    p.add_argument("--data", help="data source: hub dataset id (default roneneldan/TinyStories), or a local "
                                  ".txt/.jsonl/.parquet file, a directory or a glob of them")
    p.add_argument("--out", help="run directory for config, metrics and checkpoints (default runs/<name>)")
    p.add_argument("--max-steps", type=int, help="cap on optimizer steps; the schedule is planned for it")
    p.add_argument("--resume", metavar="RUN_DIR|auto",
                   help="continue the run in RUN_DIR from its newest checkpoint; 'auto': resume --out if it "
                        "has a checkpoint, else start it")
    p.add_argument("--restart", metavar="RUN_DIR",
                   help="start the run in RUN_DIR over, with its saved config: its old contents are moved aside "
                        "into RUN_DIR.before-restart-<time> (nothing is deleted)")
    p.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="save a checkpoint and stop once step N is done, keeping the planned schedule")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (report lines only)")
    p.add_argument("--tracker", metavar="NAMES",
                   help="experiment trackers to feed, comma-separated: tensorboard, wandb, mlflow, trackio, csv "
                        "(config report.trackers; see docs/use-elsewhere.md)")
    _add_config_options(p)


def _add_config_options(p: Parser) -> None:
    """Every config field as `--name VALUE` (also `--name_with_underscores` and `--section.name`);
    a lone `--flag` means true. Values stay text here: the config coerces and checks them."""
    from cairn.config.io import field_index

    taken = set(p._option_string_actions)  # the command's own options (--max-steps) win
    for key, (section, name, _) in field_index().items():
        if "." in key:
            continue
        dashed = name.replace("_", "-")
        flags = {f"--{dashed}", f"--{name}"} | ({f"--{section}.{name}", f"--{section}.{dashed}"} if section else set())
        p.add_argument(*sorted(flags - taken), dest=CFG + dashed, nargs="?", const="true", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)


def run(args: argparse.Namespace, extra: list[str], started: float) -> int:
    """Train as the options say; `started` (time.monotonic()) is when the command began, for --time-budget."""
    from cairn.training import train

    overrides = _config_overrides(args, extra)
    not_empty(args, "train", "preset", "config", "data", "out", "resume", "restart")
    stop_after: int = args.stop_after
    if stop_after < 0:
        raise CairnError(f"--stop-after must be zero (off) or a step number, got {stop_after}")
    cfg, out, resume = train_config(args, overrides)
    progress = not args.no_progress and sys.stderr.isatty()
    setup_logging(progress=progress)
    train(cfg, out, resume=resume, restart=bool(args.restart), stop_after=stop_after, progress=progress,
          started=started)
    return 0


def _config_overrides(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """The `--key value` config options given, by config key; anything argparse did not know is refused."""
    for arg in extra:
        if arg.startswith("--") and len(arg) > 2:
            key = arg[2:].split("=", 1)[0]
            raise CairnError(f"unknown option {key!r}: run `cairn train --help` to see every option")
        raise CairnError(f"unexpected argument {arg!r}: options are --key value (see `cairn train --help`)")
    return {k[len(CFG):]: v for k, v in vars(args).items() if k.startswith(CFG)}


def train_config(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[RunConfig, Path, bool]:
    """(config, run directory, resume?) from the preset, config file, saved run and overrides."""
    from cairn.training.resolve import resolve_config

    if args.restart and args.resume:
        raise CairnError("--resume and --restart exclude each other: give one of them")
    if args.data is not None:
        overrides["source"] = args.data
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    if args.tracker is not None:
        overrides["trackers"] = args.tracker
    saved: str | None = args.restart or (args.resume if args.resume != "auto" else None)
    if saved:
        return _saved_run_config(args, Path(saved), overrides)
    cfg = resolve_config(args.preset, args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    _check_out(out)
    return cfg, out, args.resume == "auto"


def _saved_run_config(args: argparse.Namespace, run: Path, overrides: dict[str, Any]) -> tuple[RunConfig, Path, bool]:
    """--resume RUN_DIR or --restart RUN_DIR: the run's saved config with the overrides, in that directory."""
    from cairn.training.resolve import resolve_config
    from cairn.training.resume import run_config

    option = "--restart" if args.restart else "--resume"
    if args.out and Path(args.out) != run:
        raise CairnError(f"{option} RUN_DIR and --out name different directories: give one of them")
    if args.preset or args.config:
        raise CairnError(f"{option} RUN_DIR uses the run's saved config: drop --preset/--config "
                         "(overrides like --max-steps are allowed)")
    _check_out(run)
    return resolve_config(base=run_config(run), overrides=overrides, continuing=True), run, not args.restart


def _check_out(out: Path) -> None:
    """The run directory must be a directory, or creatable as one (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise CairnError(f"--out {str(out)!r} is a file, not a directory: choose another --out")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CairnError(f"cannot create run directory {str(out)!r}: {str(parent)!r} is a file; "
                                 "choose another --out")
            break
