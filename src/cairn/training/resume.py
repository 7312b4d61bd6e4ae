"""Resuming: which checkpoint a run continues from, and putting everything back as it was.

A resumable checkpoint holds, besides the weights, what `trainer_state` gives (optimizer and torch
RNG states, per rank under torchrun) and in state.json the run's counters (`TrainState`), plan and
Python/NumPy RNG. Restoring all of it makes a resumed run continue exactly as the run that never
stopped: the same batches in the same order, the same schedule, the same weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cairn.checkpoint import store as ckpt
from cairn.checkpoint.verify import optimizer_problem, state_problem, tensors_problem
from cairn.config.sections import RunConfig, from_dict, load_toml
from cairn.util.errors import CairnError
from cairn.data.run_tokenizer import check_same
from cairn.training.checkpointer import Checkpointer
from cairn.training.rundir import CONFIG, WRITER, RunDir
from cairn.training.state import Plan, TrainState

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


def trainer_state(trainer) -> dict:
    """Optimizer state (by parameter name, whatever wrapped the model) and the torch RNG streams."""
    dist = trainer.dist
    state = {"optimizer": dist.optimizer_state(trainer.model, trainer.optimizer), "torch_rng": torch.get_rng_state()}
    if dist.enabled:
        # every rank's own dropout stream, so a resume with as many processes continues each
        state["rank_rng"] = dist.gather_objects(_rank_rng(trainer.dist.device))
    elif torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _rank_rng(device: torch.device) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def seed_rank(trainer, step: int) -> None:
    """Every rank drew the same initial weights; from here on their dropout masks must differ."""
    seed = int(np.random.SeedSequence([trainer.cfg.seed, step, trainer.dist.rank]).generate_state(1)[0])
    torch.manual_seed(seed)  # seeds CUDA too


def load_weights_and_state(trainer, path: Path) -> tuple[ckpt.Checkpoint, dict]:
    """Weights (before the model is wrapped: FSDP shards what it holds), counters and plan; the
    optimizer and RNG follow in `restore_optimizer_and_rng` once the optimizer exists."""
    c = ckpt.read_checkpoint(path)
    problem = state_problem(c.meta)
    try:
        saved = None if problem else _check_compatible(trainer, path, c)
        problem = problem or tensors_problem(path / "model.safetensors", trainer.model.weights())
        if problem:
            raise CairnError(f"cannot resume from {path}: {problem}; resume from another checkpoint, or delete this "
                             "one and resume again (the newest good one is then used)")
        trainer.model.load_weights(c.model_state())
        state = c.trainer_state()
        raw = dict(c.meta["state"])
        raw["best_val_loss"] = math.inf if raw["best_val_loss"] is None else raw["best_val_loss"]
        trainer.state = TrainState(**raw)
        if trainer.cfg.train.time_budget and c.meta.get("plan"):
            # the steps were planned for the budget once; a resumed run finishes that plan
            trainer.plan = Plan(**c.meta["plan"])
            trainer.plan_restored = True
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CairnError(f"{path}/state.json is incomplete ({type(e).__name__}: {e}): "
                         "resume from another checkpoint") from None
    _carry_position(trainer, path, saved, c.meta.get("world_size", 1))
    trainer.rundir.metrics.truncate_after(trainer.state.step)
    s = trainer.state
    log.info(f"resumed from {path} at step {s.step} (epoch {s.epoch + 1}, batch {s.batch_in_epoch})")
    return c, state


def _check_compatible(trainer, path: Path, c: ckpt.Checkpoint) -> RunConfig:
    """The same tokenizer and model; other changes are allowed, and named."""
    saved = from_dict(c.meta["config"])
    check_same(trainer.tokenizer, c.meta["tokenizer"], path)
    cfg = trainer.cfg
    diff = [f"model.{k} ({v} -> {getattr(cfg.model, k)})" for k, v in asdict(saved.model).items()
            if getattr(cfg.model, k) != v]
    if diff:
        raise CairnError(f"cannot resume {path}: the model config differs: {', '.join(diff)}; "
                         "resume with the saved model config or start a new run")
    for section in ("data", "train"):
        for k, v in asdict(getattr(saved, section)).items():
            if getattr(getattr(cfg, section), k) != v:
                log.info(f"resume: {section}.{k} changed {v!r} -> {getattr(getattr(cfg, section), k)!r}")
    return saved


def batch_text(world: int, batch: int, accum: int) -> str:
    """The rows of one optimizer step, spelled out."""
    procs = f"{world} processes x " if world > 1 else ""
    return f"{procs}batch {batch} x {accum} accumulation = {world * batch * accum} rows"


def _carry_position(trainer, path: Path, saved: RunConfig, saved_world: int) -> None:
    """Re-express the place in the epoch (global micro-batches of the saved run) in this run's.

    The epoch's row order does not depend on the batch, so with the same rows per optimizer
    step (processes x batch_size x grad_accum) the run continues exactly, on any number of
    processes; at an epoch boundary any batch will do. Otherwise the rest of the epoch would be
    cut into other steps than the saved plan's: refused, saying what to pass."""
    t, s, world = trainer.cfg.train, trainer.state, trainer.dist.world
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


def restore_optimizer_and_rng(trainer, c: ckpt.Checkpoint, state: dict) -> None:
    dist = trainer.dist
    problem = optimizer_problem(state.get("optimizer") if isinstance(state, dict) else None,
                                dict(trainer.model.named_parameters()))
    try:
        if problem:
            raise ValueError(problem)
        dist.load_optimizer_state(trainer.model, trainer.optimizer, state["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CairnError(f"{c.path}/trainer.pt does not fit this model ({type(e).__name__}: {e}): "
                         "resume from another checkpoint") from None
    try:
        _restore_rng(trainer, c, state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CairnError(f"{c.path}/trainer.pt holds no valid random-generator state ({type(e).__name__}: {e}): "
                         "resume from another checkpoint") from None


def _restore_rng(trainer, c: ckpt.Checkpoint, state: dict) -> None:
    dist = trainer.dist
    ranks = state.get("rank_rng")
    if ranks is None and not dist.enabled:
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    elif ranks is not None and len(ranks) == dist.world:
        mine = ranks[dist.rank]
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and dist.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], dist.device)
    else:  # another number of processes: only dropout draws from these generators
        seed_rank(trainer, trainer.state.step)
        if trainer.cfg.model.dropout > 0:
            log.info("resume: the number of processes changed, so dropout continues from new per-rank seeds "
                     "(equal in distribution, not bitwise, to the run that never stopped)")
    ckpt.set_rng_state(c.meta["rng"])
