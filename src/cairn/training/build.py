"""Everything a run needs before its first step: the I/O half of training (the loop is loop.py).

In order: threads, device and precision; the run directory (new, or the checkpoint to resume);
the run's tokenizer; its data, as its format reads it; the step plan; the model (and its initial
weights); wrapping for DDP/FSDP, the optimizer, the parts a checkpoint restores; torch.compile;
the time budget's measured plan; the run files. Each part is built from its own config section
and handed what it needs.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from cairn.checkpoint.schema import Stateful, TrainState
from cairn.config.io import from_dict
from cairn.config.sections import RunConfig
from cairn.data import run_tokenizer
from cairn.data.formats import RunDatasets, get_format
from cairn.model import lora
from cairn.model.transformer import Transformer, build_model
from cairn.runtime.device import cpu_compiler, keep_freed_memory, seed_everything, set_threads
from cairn.runtime.precision import Choice, peak_flops
from cairn.runtime.precision import for_run as precision_for_run
from cairn.tokenizer.base import Tokenizer
from cairn.trackers.base import TrackedRun
from cairn.trackers.fanout import Trackers
from cairn.training import init_from, resume
from cairn.training.batches import RunBatches, Scorer
from cairn.training.budget import calibrate, growth
from cairn.training.budget.budget import Budget, end_val_batches, initial_plan, workload
from cairn.training.checkpointing import Checkpointer, ModelWeights, OptimizerState, PythonRng, TorchRng, seed_rank
from cairn.training.distributed import Dist, session
from cairn.training.loop import Compute, Trainer
from cairn.training.optim import make_optimizer
from cairn.training.report import Reporter
from cairn.training.resolve import prepare_config
from cairn.training.rundir import RunDir, RunLock
from cairn.training.step import Stepper
from cairn.training.validator import Validator
from cairn.util.errors import CairnError, option
from cairn.util.log import ensure_setup, only_main_speaks

log = logging.getLogger(__name__)


@dataclass
class RunInputs:
    """What every model a run may try (the configured one, a wider one) shares: the run directory,
    the tokenizer, the data, the precision, where the run starts from."""
    cfg: RunConfig
    dist: Dist
    run: RunDir
    checkpointer: Checkpointer
    tokenizer: Tokenizer
    data: RunDatasets
    choice: Choice
    threads: int
    start_from: Optional[Path]
    started: float


def build_trainer(cfg: RunConfig, out_dir: Path, dist: Dist, *, resume_run: bool = False, restart: bool = False,
                  stop_after: int = 0, progress: bool = False, started: Optional[float] = None) -> Trainer:
    """A Trainer for `cfg` writing into `out_dir`, resumed from its newest valid checkpoint if
    asked (or started over with the old contents moved aside: `restart`). Call it holding the
    run's lock. The caller's `cfg` is not changed."""
    cfg = copy.deepcopy(cfg)
    main = dist.is_main
    threads = set_threads(dist.cpu_threads(cfg.system.num_threads))
    keep_freed_memory(dist.device)  # a CPU step's large tensors would otherwise be page-faulted in anew each step
    run = RunDir(out_dir, writer=main)
    checkpointer = Checkpointer(run, dist, cfg.name, cfg.checkpoint.keep_checkpoints)
    start_from = dist.on_main(lambda: resume.starting_point(run, checkpointer, resume_run, restart))
    # rank 0 learns a bpe:N tokenizer and tokenizes a new source into the (shared) cache; the others then read them
    tokenizer = dist.main_first(lambda: run_tokenizer.for_training(cfg, run.path, start_from is not None))
    cfg.model.vocab_size = tokenizer.vocab_size
    seed_everything(cfg.seed)
    data = get_format(cfg.data.format).prepare(cfg, tokenizer, dist.main_first)
    # the same initial weights on every rank; training holds float32 weights, gradients and AdamW's two moments
    initial_rng = torch.get_rng_state()
    model = build_model(cfg.model, dist.device, bytes_per_param=16)
    # measured for this model's matmuls on CPUs (runtime/precision.py); rank 0 decides for all ranks
    resumed = run.path / "run.json" if start_from is not None else None
    choice = dist.on_main(lambda: precision_for_run(cfg.system.precision, dist.device, cfg.model,
                                                    cfg.train.batch_size * cfg.data.seq_len, resumed))
    log.info(choice.describe())
    inputs = RunInputs(cfg, dist, run, checkpointer, tokenizer, data, choice, threads, start_from,
                       time.monotonic() if started is None else started)
    b = cfg.budget
    compiled = _can_compile(cfg.system.compile, dist.device)
    # a fine-tune keeps its base's shape: only a run from scratch grows
    grows = bool(b.seconds is not None and b.grow_to_epochs and start_from is None and not cfg.init_from)
    # The configured model is first measured without torch.compile when it may be swapped for a
    # wider one: compiling it costs more than its measuring (cpu-10min's d128: 24.7 s of a 600 s
    # budget on a 2-core EPYC with an empty compile cache; benchmarks/records/compile-shapes-cpu-10min.json),
    # spent on a model that is then thrown away. Its compiled steps would be faster, so an eager plan
    # that has too many epochs already is one the compiled model has too; the width is then chosen
    # from the eager plan, erring narrower.
    eager_probe = compiled and grows
    trainer = assemble(model, inputs, stop_after=stop_after, progress=progress and main,
                       compiled=compiled and not grows)
    if grows:
        shape = growth.wider_for_budget(cfg.model, cfg.data.seq_len, trainer.budget.plan, b.grow_to_epochs,
                                        eager=eager_probe)
        if shape is None and eager_probe:  # the eager plan fits: the compiled model's faster steps may not
            # a new model from the same seed: the probe's is wrapped (DDP, FSDP, LoRA) already
            torch.set_rng_state(initial_rng)
            trainer = assemble(build_model(cfg.model, dist.device, bytes_per_param=16), inputs,
                               stop_after=stop_after, progress=progress and main, compiled=True)
            shape = growth.wider_for_budget(cfg.model, cfg.data.seq_len, trainer.budget.plan, b.grow_to_epochs)
        if shape is not None:
            cfg.model = shape
            torch.set_rng_state(initial_rng)  # the wider model starts from the same seeded state
            trainer = assemble(build_model(shape, dist.device, bytes_per_param=16), inputs, stop_after=stop_after,
                               progress=progress and main, compiled=compiled)
            growth.report(trainer.budget.plan, b.grow_to_epochs)
    dist.on_main(trainer.write_run_files)
    if cfg.report.tracker_names() and main:
        trainer.trackers = Trackers.open(cfg.report.tracker_names(), TrackedRun(
            run.path, cfg.name, cfg.to_dict(), trainer.run_info(), trainer.state.step))
        run.metrics.sink = trainer.trackers.log
    return trainer


def assemble(model: Transformer, inputs: RunInputs, *, stop_after: int, progress: bool, compiled: bool) -> Trainer:
    """The trainer of `model`: its initial or resumed weights and state, the wrapped (and, if
    `compiled`, torch.compile'd) model, the optimizer, and under a time budget the measured plan."""
    cfg, dist, data = inputs.cfg, inputs.dist, inputs.data
    if cfg.init_from and inputs.start_from is None:
        init_from.load_initial_weights(model, cfg, inputs.tokenizer)
    if cfg.lora.lora_rank:
        model = add_lora(model, cfg)
    precision = inputs.choice.precision
    wrapped = dist.wrap(model, precision)
    optimizer = make_optimizer(model, cfg.optim, cfg.schedule.lr, dist.device)
    if dist.enabled:
        seed_rank(cfg.seed, 0, dist.rank)
    plan = initial_plan(len(data.train), cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs,
                        cfg.train.max_steps, dist.world, cfg.schedule)
    if plan is None:
        raise CairnError(f"the train split has {len(data.train)} {data.unit} of up to {cfg.data.seq_len} tokens, "
                         f"too few for one step: lower {option('data.seq_len')} or add data")
    budget = Budget(plan, cfg.budget.seconds, inputs.started, dist, cfg.schedule, cfg.train.max_steps)
    state = TrainState()
    torch_rng = TorchRng(dist, cfg.seed, lambda: state.step)
    parts: dict[str, Stateful] = {"model": ModelWeights(model, dist),
                                  "optimizer": OptimizerState(model, optimizer, dist), "torch_rng": torch_rng,
                                  "counters": state, "plan": budget, "python_rng": PythonRng()}
    if inputs.start_from is not None:
        restore(inputs, model, parts, state, torch_rng)
    forward = torch.compile(wrapped) if compiled else wrapped
    story_start = inputs.tokenizer.eot_id if cfg.data.story_mask else None
    stepper = Stepper(model, wrapped, forward, optimizer, dist, precision, cfg.optim, story_start,
                      inputs.checkpointer.newest, cfg.train.batch_size)
    batches = RunBatches(data.train, cfg.train.batch_size, cfg.data, cfg.seed, cfg.system.num_workers,
                         inputs.tokenizer.eot_id, dist)
    score = Scorer(model, batches, precision, inputs.tokenizer.token_bytes, dist)
    if budget.active:  # before the run directory is written: a budget too short leaves nothing
        held_out = data.val or data.test
        costs = calibrate.measure(
            step=lambda micro: stepper(micro, budget.lr(state.step), state),
            train_batches=lambda: batches.epoch(0), accum=cfg.train.grad_accum, score=score, held_out=held_out,
            held_out_batches=batches.global_batches(held_out) if held_out is not None else 0,
            weights=lambda: dist.full_weights(model), optimizer_state=lambda: dist.optimizer_state(model, optimizer),
            model=model, story_start=inputs.tokenizer.eot_id, story_tokens=cfg.eval.end_stories > 0,
            snapshot=calibrate.Snapshot(model, optimizer, state), dist=dist)
        budget.fit(costs, workload(cfg, budget.plan.steps_per_epoch, data))
    peak, peak_source = peak_flops(dist.device, precision)
    trainer = Trainer(
        cfg=cfg, dist=dist, rundir=inputs.run, tokenizer=inputs.tokenizer, data=data, model=model, batches=batches,
        stepper=stepper, score=score, checkpointer=inputs.checkpointer,
        validator=Validator(score, data.val, cfg.eval.eval_batches, cfg.eval.patience, inputs.run.metrics,
                            on_best=lambda: trainer.save("best", "best", resumable=False),
                            whole_batches=end_val_batches(cfg)),
        reporter=Reporter(cfg.report.report_every, inputs.run.metrics, peak,
                          model.flops_per_token(cfg.data.seq_len), dist.world),
        budget=budget, state=state, parts=parts,
        compute=Compute(precision, inputs.choice.reason, inputs.threads, peak, peak_source),
        started=inputs.started, stop_after=stop_after, progress=progress)
    return trainer


def add_lora(model: Transformer, cfg: RunConfig) -> Transformer:
    c = cfg.lora
    model = lora.add_adapters(model, c.lora_rank, c.lora_alpha, c.lora_targets)
    n_train, n_all = lora.trainable(model)
    where = c.lora_targets or "every linear of the blocks"
    log.info(f"LoRA rank {c.lora_rank}, alpha {c.lora_alpha:g} on {where}: {n_train:,} trainable parameters "
             f"of {n_all:,} ({100 * n_train / n_all:.2f}%)")
    return model


def restore(inputs: RunInputs, model: Transformer, parts: dict[str, Stateful], state: TrainState,
            torch_rng: TorchRng) -> None:
    """Every part of the run as the checkpoint it resumes from holds it, the place in the epoch
    carried over to this run's batches."""
    assert inputs.start_from is not None
    cfg, dist = inputs.cfg, inputs.dist
    c, contents = inputs.checkpointer.read(inputs.start_from, model,
                                           lambda c: resume.check_compatible(cfg, inputs.tokenizer, c))
    saved = from_dict(c.meta["config"])
    inputs.checkpointer.restore(parts, contents)
    if torch_rng.changed_world and cfg.model.dropout > 0:
        log.info("resume: the number of processes changed, so dropout continues from new per-rank seeds "
                 "(equal in distribution, not bitwise, to the run that never stopped)")
    resume.carry_position(state, cfg.train, dist.world, c.path, saved, c.meta.get("world_size", 1))
    inputs.run.metrics.truncate_after(state.step)
    log.info(f"resumed from {c.path} at step {state.step} (epoch {state.epoch + 1}, batch {state.batch_in_epoch})")


def _can_compile(asked: bool, device: torch.device) -> bool:
    if asked and device.type == "cpu" and cpu_compiler() is None:
        log.info("compile: torch.compile needs a C++ compiler on CPUs and none was found (g++, clang++ or "
                 "$CXX): training without it; install one to get its speed")
        return False
    return asked


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, restart: bool = False, stop_after: int = 0,
          progress: bool = False, started: Optional[float] = None) -> dict[str, Any]:
    """Train a model as `cfg` says, writing everything into `out_dir`. Returns a summary.
    `resume` continues the run in `out_dir` from its newest valid checkpoint; `restart` starts it
    over, its old contents moved aside. `started` (time.monotonic()) is when the command began:
    a time budget counts from there. A config with `init_from` set starts from that run's
    weights, architecture and tokenizer, as `cairn train --init-from` does.

    Under torchrun every process calls this; they train one model together (see distributed.py),
    and rank 0 holds the run's lock."""
    started = time.monotonic() if started is None else started
    cfg = prepare_config(cfg, continuing=resume or restart)
    if not get_format(cfg.data.format).learns_tokenizer and run_tokenizer.parse_bpe_spec(cfg.tokenizer) is not None:
        raise CairnError(f"data.format {cfg.data.format} cannot learn a tokenizer ({cfg.tokenizer}) on its records: "
                         f"use {option('init_from')} RUN (its tokenizer), {option('tokenizer')} gpt2 or a tokenizer "
                         "directory")
    ensure_setup()
    with session(cfg.system) as dist:
        # the trainer lives in _locked_run's frame, gone when it returns: the session's end then tears
        # down process groups that nothing of the run (the DDP reducer holds one) keeps alive
        return _locked_run(cfg, Path(out_dir), dist, resume=resume, restart=restart, stop_after=stop_after,
                           progress=progress, started=started)


def _locked_run(cfg: RunConfig, out_dir: Path, dist: Dist, *, resume: bool, restart: bool, stop_after: int,
                progress: bool, started: float) -> dict[str, Any]:
    only_main_speaks(dist.rank)
    lock = RunLock(out_dir)
    dist.on_main(lock.acquire, share_result=False)
    try:
        trainer = build_trainer(cfg, out_dir, dist, resume_run=resume, restart=restart,
                                stop_after=stop_after, progress=progress, started=started)
        try:
            summary = trainer.run()
        except BaseException:
            if trainer.trackers is not None:
                trainer.trackers.finish(ok=False)
            raise
        if trainer.trackers is not None:
            trainer.trackers.finish(ok=True)
        return summary
    finally:
        lock.release()
