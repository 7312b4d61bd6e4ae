"""Resuming: which checkpoint a run continues from, whether this run may continue it, and where
in its epoch it stands.

Restoring the checkpoint's parts is the checkpointer's (`checkpointing.py`); restoring all of them
makes a resumed run continue exactly as the run that never stopped: the same batches in the same
order, the same schedule, the same weights.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from cairn.checkpoint import store as ckpt
from cairn.checkpoint.schema import TrainState
from cairn.config.io import from_dict, load_toml
from cairn.config.sections import RunConfig, TrainConfig
from cairn.data.run_tokenizer import check_same
from cairn.tokenizer.base import Tokenizer
from cairn.training.checkpointing import Checkpointer
from cairn.training.rundir import CONFIG, WRITER, RunDir
from cairn.util.errors import CairnError

log = logging.getLogger(__name__)


def run_config(run_dir: Path) -> RunConfig:
    """The saved config of the run in `run_dir` (what `cairn train --resume RUN` continues)."""
    if not (Path(run_dir) / CONFIG).is_file():
        raise CairnError(f"{run_dir} is not a cairn run directory (no {CONFIG}): check the path")
    return load_toml(Path(run_dir) / CONFIG, RunConfig())


def starting_point(run: RunDir, checkpointer: Checkpointer, resume: bool, restart: bool = False) -> Optional[Path]:
    """The checkpoint a run continues from, or None for a run that starts from step 0. Call it
    holding the run's lock. A run that has made progress is never started over by accident: only
    `restart`, which moves the old contents aside first."""
    if run.checkpoints.exists() and not run.checkpoints.is_dir():
        raise CairnError(f"{run.checkpoints} is a file, not the run's checkpoint directory: move it away, then run "
                         "the command again")
    if restart:
        if run.path.is_dir() and any(p.name != WRITER for p in run.path.iterdir()):
            log.info(f"restart: the run's old contents are kept in {run.move_aside()}")
        return None
    if not resume:
        run.check_new()
        return None
    checkpointer.clean_up()
    found, passed_over = ckpt.newest_resumable(run.checkpoints)
    for path, why in passed_over:
        log.warning(f"resume: passing over {path}: {why}")
    if found is not None:
        return found
    progress = run.progress()
    if progress:
        why = f" ({passed_over[0][1]})" if passed_over else ""
        raise CairnError(f"cannot resume {run.path}: it holds {' and '.join(progress)} but no checkpoint that can "
                         f"resume{why}; nothing was changed; to start it over on purpose: cairn train --restart "
                         f"{run.path} (moves the old contents aside, deletes nothing)")
    if run.holds_run():  # stopped before its first checkpoint and its first report: nothing to lose
        log.info(f"{run.path} has no checkpoint yet: starting it from the beginning")
    return None


def check_compatible(cfg: RunConfig, tokenizer: Tokenizer, c: ckpt.Checkpoint) -> RunConfig:
    """The checkpoint's config, when it has the same tokenizer and model as `cfg`; other changes
    are allowed, and named."""
    path = c.path
    saved = from_dict(c.meta["config"])
    check_same(tokenizer, c.meta["tokenizer"], path)
    diff = [f"model.{k} ({v} -> {getattr(cfg.model, k)})" for k, v in asdict(saved.model).items()
            if getattr(cfg.model, k) != v]
    if diff:
        raise CairnError(f"cannot resume {path}: the model config differs: {', '.join(diff)}; "
                         "resume with the saved model config or start a new run")
    for section, now in cfg.sections():
        if section == "model":
            continue
        for k, v in asdict(getattr(saved, section)).items():
            if getattr(now, k) != v:
                log.info(f"resume: {section}.{k} changed {v!r} -> {getattr(now, k)!r}")
    return saved


def batch_text(world: int, batch: int, accum: int) -> str:
    """The rows of one optimizer step, spelled out."""
    procs = f"{world} processes x " if world > 1 else ""
    return f"{procs}batch {batch} x {accum} accumulation = {world * batch * accum} rows"


def carry_position(s: TrainState, t: TrainConfig, world: int, path: Path, saved: RunConfig,
                   saved_world: int) -> None:
    """Re-express the place in the epoch (global micro-batches of the saved run) in this run's.

    The epoch's row order does not depend on the batch, so with the same rows per optimizer
    step (processes x batch_size x grad_accum) the run continues exactly, on any number of
    processes; at an epoch boundary any batch will do. Otherwise the rest of the epoch would be
    cut into other steps than the saved plan's: refused, saying what to pass."""
    old_micro = saved_world * saved.train.batch_size
    old_rows, new_rows = old_micro * saved.train.grad_accum, world * t.batch_size * t.grad_accum
    old_text = batch_text(saved_world, saved.train.batch_size, saved.train.grad_accum)
    new_text = batch_text(world, t.batch_size, t.grad_accum)
    if old_rows == new_rows:
        s.batch_in_epoch = s.batch_in_epoch * old_micro // (world * t.batch_size)
        if saved_world != world:
            log.info(f"resume: {saved_world} -> {world} processes with the same {new_rows} rows per step "
                     f"({old_text} before, {new_text} now): continuing where it stopped")
        return
    if s.batch_in_epoch == 0:
        log.info(f"resume: {old_text} per step before, {new_text} now, from the start of "
                 f"epoch {s.epoch + 1}: the remaining steps are planned for the new batch")
        return
    if old_rows % (world * t.grad_accum) == 0:
        fix = f"--batch-size {old_rows // (world * t.grad_accum)}"
    elif old_rows % (world * t.batch_size) == 0:
        fix = f"--grad-accum {old_rows // (world * t.batch_size)}"
    else:
        fix = f"{saved_world} processes"
    raise CairnError(f"cannot resume {path} with {new_text} per step: it stopped in the middle of "
                     f"an epoch with {old_text}, and the epoch's rows only continue in the same steps with the "
                     f"same rows per step: resume with {fix}")
