"""Everything a run needs before its first step: the I/O half of training (the loop is loop.py).

In order: threads, device and precision; the run directory (new, or the checkpoint to resume);
the run's tokenizer; the tokenized data and its batches; the step plan; the model (and its
resumed weights); wrapping for DDP/FSDP, the optimizer (and its resumed state), torch.compile;
the time budget's measured plan; the run files.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch

from cairn.model import lora
from cairn.data import run_tokenizer
from cairn.config.sections import RunConfig, parse_duration, to_toml, validate
from cairn.data import PackedDataset, PaddedDataset, StoryWindows, num_batches, prepare_data
from cairn.data.sft import SFTRows, prepare_sft
from cairn.util.errors import CairnError
from cairn.util.log import ensure_setup, only_main_speaks
from cairn.model.transformer import build_model
from cairn.runtime.precision import for_run as precision_for_run
from cairn.runtime.device import cpu_compiler, keep_freed_memory, seed_everything, set_threads
from cairn.runtime.precision import peak_flops
from cairn.training import budget, growth, init_from, resume
from cairn.training.calibrate import measure
from cairn.training.checkpointer import Checkpointer
from cairn.training.distributed import Dist, session
from cairn.training.loop import Trainer
from cairn.training.optim import make_optimizer, warmup_steps
from cairn.training.rundir import CONFIG, RunDir, RunLock
from cairn.training.state import Plan

log = logging.getLogger(__name__)


def build_trainer(cfg: RunConfig, out_dir: Path, dist: Dist, *, resume_run: bool = False, restart: bool = False,
                  stop_after: int = 0, progress: bool = False, started: Optional[float] = None) -> Trainer:
    """A Trainer for `cfg` writing into `out_dir`, resumed from its newest valid checkpoint if
    asked (or started over with the old contents moved aside: `restart`). Call it holding the
    run's lock. The caller's `cfg` is not changed."""
    cfg = copy.deepcopy(cfg)
    t, main = cfg.train, dist.is_main
    if t.tensorboard:  # fail before the data is prepared, not after
        from cairn.trackers.tensorboard import require_tensorboard
        require_tensorboard()
    threads = set_threads(dist.cpu_threads(t.num_threads))
    if dist.device.type == "cpu":
        keep_freed_memory()  # a CPU step's large tensors would otherwise be page-faulted in anew each step
    run = RunDir(out_dir, writer=main)
    checkpointer = Checkpointer(run, dist, cfg.name, t.keep_checkpoints)
    start_from = dist.on_main(lambda: resume.starting_point(run, checkpointer, resume_run, restart))
    # rank 0 learns a bpe:N tokenizer and tokenizes a new source into the (shared) cache; the others then read them
    tokenizer = dist.main_first(lambda: run_tokenizer.for_training(cfg, run.path, start_from is not None))
    cfg.model.vocab_size = tokenizer.vocab_size
    seed_everything(cfg.seed)
    d = cfg.data
    if d.format == "sft":  # whole instruction examples, the loss on their answers (data/sft.py)
        data = prepare_sft(d, cfg.seed, tokenizer)
        train_ds = SFTRows(data.train, d.seq_len, pack=d.batching == "pack")
        val_ds, test_ds = (SFTRows(split, d.seq_len, pack=False) or None for split in (data.val, data.test))
    else:
        data = dist.main_first(lambda: prepare_data(cfg.data, cfg.seed, tokenizer))
        train_ds = PackedDataset(data.train, d.seq_len) if d.batching == "pack" else PaddedDataset(data.train,
                                                                                                   d.seq_len)
        # held-out stories are scored one at a time from their own beginning, however training cuts
        # them (a sliding window past seq_len); an empty split is absent (no evaluation on it)
        val_ds, test_ds = (StoryWindows(split, d.seq_len) or None for split in (data.val, data.test))
    # the same initial weights on every rank; training holds float32 weights, gradients and AdamW's two moments
    initial_rng = torch.get_rng_state()
    model = build_model(cfg.model, dist.device, bytes_per_param=16)
    plan = initial_plan(cfg, len(train_ds), dist)
    # measured for this model's matmuls on CPUs (precision.py); rank 0 decides for all ranks
    resumed = run.path / "run.json" if start_from is not None else None
    choice = dist.on_main(lambda: precision_for_run(t.precision, dist.device, cfg.model,
                                                    t.batch_size * cfg.data.seq_len, resumed))
    log.info(choice.describe())
    parts = dict(cfg=cfg, dist=dist, run=run, tokenizer=tokenizer, data=data, datasets=(train_ds, val_ds, test_ds),
                 precision=choice, threads=threads, checkpointer=checkpointer, start_from=start_from,
                 progress=progress and main, stop_after=stop_after,
                 started=time.monotonic() if started is None else started)
    trainer = _assemble(model, plan, **parts)
    # a fine-tune keeps its base's shape: only a run from scratch grows
    if t.time_budget and t.grow_to_epochs and start_from is None and not cfg.init_from:
        shape = growth.wider_for_budget(cfg.model, cfg.data.seq_len, trainer.plan, t.grow_to_epochs)
        if shape is not None:
            cfg.model = shape
            torch.set_rng_state(initial_rng)  # the wider model starts from the same seeded state
            trainer = _assemble(build_model(shape, dist.device, bytes_per_param=16), plan, **parts)
            growth.report(trainer.plan, t.grow_to_epochs)
    dist.on_main(lambda: _write_run_files(trainer))
    if t.tensorboard and main:
        from cairn.trackers.tensorboard import TensorBoardLogger
        # purge_step hides events a killed run wrote past the checkpoint, as metrics.jsonl drops them
        trainer.tb = TensorBoardLogger(run.path, purge_step=trainer.state.step + 1)
        run.metrics.sink = trainer.tb.write
    return trainer


def _assemble(model, plan: Plan, *, cfg: RunConfig, dist: Dist, run: RunDir, tokenizer, data, datasets, precision,
              threads: int, checkpointer: Checkpointer, start_from, progress: bool, stop_after: int,
              started: float) -> Trainer:
    """The trainer of `model`: its initial or resumed weights and state, the wrapped and compiled
    model, the optimizer, and under a time budget the measured plan."""
    t = cfg.train
    if cfg.init_from and start_from is None:
        init_from.load_initial_weights(model, cfg, tokenizer)
    if t.lora_rank:
        model = lora.add_adapters(model, t.lora_rank, t.lora_alpha, t.lora_targets)
        n_train, n_all = lora.trainable(model)
        where = t.lora_targets or "every linear of the blocks"
        log.info(f"LoRA rank {t.lora_rank}, alpha {t.lora_alpha:g} on {where}: {n_train:,} trainable parameters "
                 f"of {n_all:,} ({100 * n_train / n_all:.2f}%)")
    peak, peak_source = peak_flops(dist.device, precision.precision)
    trainer = Trainer(cfg, dist, run, tokenizer, data, *datasets, copy.deepcopy(plan), model, precision.precision,
                      threads, checkpointer, peak, peak_source, progress, stop_after, started,
                      precision_reason=precision.reason)
    saved = resume.load_weights_and_state(trainer, start_from) if start_from is not None else None
    trainer.wrapped = dist.wrap(model, trainer.precision)
    trainer.optimizer = make_optimizer(model, t, dist.device)
    if dist.enabled:
        resume.seed_rank(trainer, 0)
    if saved is not None:
        resume.restore_optimizer_and_rng(trainer, *saved)
    trainer.forward = torch.compile(trainer.wrapped) if _can_compile(t.compile, dist.device) else trainer.wrapped
    if t.time_budget and not trainer.plan_restored:
        plan_for_budget(trainer)  # before the run directory is written: a budget too short leaves nothing
    return trainer


def initial_plan(cfg: RunConfig, n_items: int, dist: Dist) -> Plan:
    """The steps the config asks for: its epochs of the training split, capped by max_steps."""
    t = cfg.train
    # the last, short batch is kept: the loss is a mean over real tokens, so its rows weigh what
    # every other row weighs, and every training row is seen in every epoch
    micro = num_batches(n_items, t.batch_size * dist.world, drop_last=False)
    steps_per_epoch = -(-micro // t.grad_accum)
    if steps_per_epoch == 0:
        unit = "windows" if cfg.data.batching == "pack" else "rows"
        raise CairnError(f"the train split has {n_items} {unit} of up to {cfg.data.seq_len} tokens, "
                         "too few for one step: lower --seq-len or add data")
    total = min(steps_per_epoch * t.epochs, t.max_steps or math.inf)
    return Plan(micro, steps_per_epoch, total, warmup_steps(t, total), t.epochs)


def _can_compile(asked: bool, device: torch.device) -> bool:
    if asked and device.type == "cpu" and cpu_compiler() is None:
        log.info("compile: torch.compile needs a C++ compiler on CPUs and none was found (g++, clang++ or "
                 "$CXX): training without it; install one to get its speed")
        return False
    return asked


def plan_for_budget(trainer: Trainer) -> None:
    """Measure, then plan the steps that fit in the time budget (see budget.py)."""
    t, dist, p = trainer.cfg.train, trainer.dist, trainer.plan
    budget_s = parse_duration(t.time_budget)
    costs = measure(trainer)
    elapsed = dist.sum([time.monotonic() - trainer.started])[0] / dist.world
    b = budget.plan(budget_s, elapsed, costs, _workload(trainer))
    trainer.plan = Plan(p.micro_batches_per_epoch, p.steps_per_epoch, b.steps, warmup_steps(t, b.steps),
                        math.ceil(b.steps / p.steps_per_epoch), budget_s=budget_s, step_s=costs.step_s)
    # the deadline keeps the plan's margin, so that re-plans (which fit the steps to the time left
    # before it) never spend the margin meant for a machine that slows down
    trainer.deadline = trainer.started + budget_s - b.reserve_s - budget.margin_s(budget_s)
    trainer.overhead_s, trainer.epoch_end_s = b.overhead_s, b.epoch_end_s
    log.info(f"time budget {budget_s:.0f}s: {elapsed:.1f}s used by set-up and measuring; {costs.step_s:.3f}s per "
             f"step, {costs.eval_batch_s:.3f}s per evaluation batch, {costs.checkpoint_s:.2f}s per checkpoint, "
             f"{b.reserve_s:.0f}s kept for the end of the run -> {b.steps} steps "
             f"({b.steps / p.steps_per_epoch:.2f} epochs)")


def _workload(trainer: Trainer) -> budget.Workload:
    t = trainer.cfg.train

    def batches(ds) -> int:
        return num_batches(len(ds), t.batch_size, drop_last=False) if ds is not None else 0

    val = batches(trainer.val_ds)
    return budget.Workload(
        steps_per_epoch=trainer.plan.steps_per_epoch, val_batches=val,
        test_batches=batches(trainer.test_ds) if t.test_at_end else 0,
        eval_every=t.eval_every, eval_sample_batches=min(t.eval_batches, val) if t.eval_batches else val,
        epoch_val_batches=min(val, t.eval_batches) if t.epoch_val == "sample" and t.eval_batches else val,
        checkpoint_every=t.checkpoint_every, story_tokens=t.end_stories * t.end_story_tokens, max_steps=t.max_steps,
        best_val_batches=val if t.end_on_best else 0)


def _write_run_files(trainer: Trainer) -> None:
    run_tokenizer.save_copy(trainer.tokenizer, trainer.rundir.path)
    trainer.rundir.write(CONFIG, to_toml(trainer.cfg))
    trainer.write_run_info()


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, restart: bool = False, stop_after: int = 0,
          progress: bool = False, started: Optional[float] = None) -> dict:
    """Train a model as `cfg` says, writing everything into `out_dir`. Returns a summary.
    `resume` continues the run in `out_dir` from its newest valid checkpoint; `restart` starts it
    over, its old contents moved aside. `started` (time.monotonic()) is when the command began:
    a time budget counts from there.

    Under torchrun every process calls this; they train one model together (see distributed.py),
    and rank 0 holds the run's lock."""
    started = time.monotonic() if started is None else started
    validate(cfg)
    if cfg.data.format == "sft" and run_tokenizer.parse_bpe_spec(cfg.tokenizer) is not None:
        raise CairnError(f"data.format sft cannot learn a tokenizer ({cfg.tokenizer}) on instruction records: "
                         "use --init-from RUN (its tokenizer), --tokenizer gpt2 or a tokenizer directory")
    ensure_setup()
    with session(cfg.train) as dist:
        # the trainer lives in _locked_run's frame, gone when it returns: the session's end then tears
        # down process groups that nothing of the run (the DDP reducer holds one) keeps alive
        return _locked_run(cfg, Path(out_dir), dist, resume=resume, restart=restart, stop_after=stop_after,
                           progress=progress, started=started)


def _locked_run(cfg: RunConfig, out_dir: Path, dist: Dist, *, resume: bool, restart: bool, stop_after: int,
                progress: bool, started: float) -> dict:
    only_main_speaks(dist.rank)
    lock = RunLock(out_dir)
    dist.on_main(lock.acquire, share_result=False)
    try:
        trainer = build_trainer(cfg, out_dir, dist, resume_run=resume, restart=restart,
                                stop_after=stop_after, progress=progress, started=started)
        try:
            return trainer.run()
        finally:
            if trainer.tb is not None:
                trainer.tb.close()
    finally:
        lock.release()
