"""The training loop. `build.py` builds a `Trainer` from its parts (all the I/O); `Trainer.run` trains it.

Each step is the `Stepper`'s (step.py). Around the steps: reports, validation with early stopping,
checkpoints, the time budget's deadline and re-plans, and stop requests (Ctrl-C, SIGTERM). Every
part is handed in, typed, by the build; the loop only calls them.

Under torchrun the same loop runs in every process: `distributed.Dist` gives each its share of
every global batch, wraps the model (DDP or FSDP), reduces what must be global (token counts,
losses, evaluation sums, stop flags), and lets only rank 0 write files and logs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from cairn.checkpoint.schema import Stateful, TrainState
from cairn.config.io import to_toml
from cairn.config.sections import RunConfig
from cairn.data.formats import RunDatasets
from cairn.data.run_tokenizer import save_copy
from cairn.model.transformer import Transformer
from cairn.tokenizer.base import Tokenizer
from cairn.tokenizer.chat_template import ChatTemplate
from cairn.trackers.fanout import Trackers
from cairn.training.batches import RunBatches, Scorer
from cairn.training.budget.budget import Budget, end_test_batches
from cairn.training.checkpointing import Checkpointer
from cairn.training.distributed import Dist
from cairn.training.ending import end_on_best
from cairn.training.report import Reporter
from cairn.training.resume import batch_text
from cairn.training.rundir import CONFIG, RunDir
from cairn.training.signals import StopRequest
from cairn.training.step import Batch, Stepper
from cairn.training.stories import Story, write_stories
from cairn.training.validator import Validator
from cairn.version import __version__

log = logging.getLogger(__name__)

PAUSES_END_THE_RUN = ("early stopping", "time budget")  # other stops pause: the run can resume


@dataclass
class Compute:
    """What the run computes on, and why: for the logs and run.json."""
    precision: str
    precision_reason: str  # measured, asked, or kept on resume: see runtime/precision.py
    threads: int
    peak_flops: Optional[float]
    peak_source: str


@dataclass
class Trainer:
    """A run ready to train: its parts, built by `build.build_trainer`."""
    cfg: RunConfig
    dist: Dist
    rundir: RunDir
    tokenizer: Tokenizer
    data: RunDatasets
    model: Transformer
    batches: RunBatches
    stepper: Stepper
    score: Scorer
    checkpointer: Checkpointer
    validator: Validator
    reporter: Reporter
    budget: Budget
    state: TrainState
    parts: dict[str, Stateful]  # what a checkpoint saves and restores (checkpoint/schema.py)
    compute: Compute
    started: float  # time.monotonic() when the command began: a time budget counts from there
    stop_after: int = 0
    progress: bool = False
    trackers: Optional[Trackers] = None  # rank 0's experiment trackers, fed metrics.jsonl's records

    # ------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        self.describe()
        stopped = None
        with StopRequest(quiet=not self.dist.is_main) as stop:
            plan = self.budget.plan
            while stopped is None and self.state.epoch < plan.epochs and self.state.step < plan.total_steps:
                stopped = self.run_epoch(stop)
                plan = self.budget.plan
            if stopped is not None and stopped not in PAUSES_END_THE_RUN:
                return self.pause(stopped)
        return self.finish(stopped)

    def run_epoch(self, stop: StopRequest) -> Optional[str]:
        """Steps until the epoch ends, the plan is done or something stops the run, then the
        epoch's end. Returns why the run stops, or None to go on."""
        accum, s, plan = self.cfg.train.grad_accum, self.state, self.budget.plan
        left = min(plan.steps_per_epoch - s.batch_in_epoch // accum, plan.total_steps - s.step)
        bar = tqdm(total=left, desc=f"epoch {s.epoch + 1}/{plan.epochs}", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        stopped, micro = None, []
        last = plan.micro_batches_per_epoch - 1
        for i, batch in enumerate(self.batches.epoch(s.epoch, s.batch_in_epoch), start=s.batch_in_epoch):
            micro.append(batch)
            if len(micro) == accum or i == last:  # the epoch's last step may have fewer micro-batches
                self.step(micro, bar)
                micro = []
                stopped = self.poll_stop(stop)
                if stopped or s.step >= self.budget.plan.total_steps:
                    break
        bar.close()
        return self.end_epoch(stopped)

    def step(self, micro: list[Batch], bar: tqdm) -> None:
        """One optimizer step, then what falls due after it: a report, a validation, a checkpoint."""
        s, budget = self.state, self.budget
        lr = budget.lr(s.step)
        began = time.perf_counter()
        r = self.stepper(micro, lr, s)
        budget.after_step(time.perf_counter() - began)
        s.batch_in_epoch += len(micro)
        self.reporter.add(s, r.loss, r.tokens)
        bar.update(1)
        bar.set_postfix(loss=f"{r.loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        if self.reporter.due(s.step, budget.plan.total_steps):
            self.reporter.report(s, budget.plan.total_steps, lr, r.grad_norm, bar)
            if budget.replan(s.step):
                self.dist.on_main(self.write_run_info)  # run.json holds the plan being followed
        every = self.cfg.eval.eval_every
        if every and s.step % every == 0:
            self.validator(s, full=False)
            self.reporter.restart()
        every = self.cfg.checkpoint.checkpoint_every
        if every and s.step % every == 0:
            self.save(f"checkpoint_step{s.step:07d}", "step", resumable=True)
            self.reporter.restart()

    def poll_stop(self, stop: StopRequest) -> Optional[str]:
        """Why the run stops after this step, if it does. Every rank stops at the same step: a
        signal or the deadline seen by one is seen by all."""
        s = self.state
        signalled, late = (v > 0 for v in self.dist.sum([float(stop.requested), float(self.budget.past_deadline())]))
        if self.validator.out_of_patience(s):
            return "early stopping"
        if late and s.step < self.budget.plan.total_steps:
            return "time budget"
        if self.stop_after and s.step >= self.stop_after:
            return f"stop-after {self.stop_after}"
        return "signal" if signalled else None

    def end_epoch(self, stopped: Optional[str]) -> Optional[str]:
        """An epoch's end validates, saves and moves to the next epoch."""
        s, plan = self.state, self.budget.plan
        if s.batch_in_epoch < plan.micro_batches_per_epoch:
            return stopped
        if s.epoch_tokens:
            mean = s.epoch_loss_sum / s.epoch_tokens
            log.info(f"epoch {s.epoch + 1}: train loss {mean:.4f}, perplexity {math.exp(min(mean, 700)):.2f}")
        if stopped is None and s.step < plan.total_steps and self.budget.no_room_for_epoch_end():
            return "time budget"
        self.validator(s, full=self.cfg.eval.epoch_val == "full")
        s.epoch, s.batch_in_epoch, s.epoch_loss_sum, s.epoch_tokens = s.epoch + 1, 0, 0.0, 0
        self.save(f"checkpoint_epoch{s.epoch}", "epoch", resumable=True)
        if stopped is None and self.validator.out_of_patience(s):
            return "early stopping"
        return stopped

    def pause(self, why: str) -> dict[str, Any]:
        s = self.state
        path = self.save(f"checkpoint_step{s.step:07d}", "step", resumable=True)
        log.info(f"stopped ({why}) at step {s.step}; checkpoint {path}; "
                 f"resume with: cairn train --resume {self.rundir.path}")
        return {"stopped": why, "step": s.step, "checkpoint": str(path)}

    def finish(self, stopped: Optional[str]) -> dict[str, Any]:
        """The run's end: the whole validation split (under a time budget, at most eval.end_val_batches
        of it), the final checkpoint, the test (the whole test split; under a time budget, at most
        eval.end_test_batches of it), the stories."""
        e, s = self.cfg.eval, self.state
        if stopped == "early stopping":
            log.info(f"early stopping at step {s.step}: no better validation loss in {e.patience} evaluations "
                     f"(best {s.best_val_loss:.4f})")
        if stopped == "time budget":
            log.info(f"time budget: the machine ran slower than measured; stopping at step {s.step} of the "
                     f"{self.budget.plan.total_steps} planned, to end in time")
        if self.validator.last_full_step != s.step:  # the end's figure is always the whole split's
            self.validator(s, full=True)
        ends_on = self.end_on_best()
        if ends_on is None:
            final = self.save("final", "final", resumable=True)
        else:
            final = self.save("final", "final", resumable=False, weights_step=ends_on)
        summary: dict[str, Any] = {
            "step": s.step, "tokens": s.tokens_seen, "stopped": stopped, "final": str(final),
            "best_val_loss": s.best_val_loss if math.isfinite(s.best_val_loss) else None,
            "weights_step": s.step if ends_on is None else ends_on}
        if e.test_at_end and self.data.test is not None:
            summary["test"] = self.test()
        log.info(f"final checkpoint: {final}")
        if e.end_stories:
            summary["stories"] = self.write_stories()
        summary["seconds"] = time.monotonic() - self.started
        log.info(f"done in {summary['seconds']:.0f}s")
        return summary

    def end_on_best(self) -> Optional[int]:
        """When the best validated weights score better on the whole split than the last ones, the
        run ends on them (its final checkpoint); the last state stays resumable. Their step, or None."""
        last = self.validator.last_full
        if not (self.cfg.eval.end_on_best and last and self.data.val is not None):
            return None
        s = self.state
        return end_on_best(self.checkpointer.path("best"), last, step_now=s.step, model=self.model,
                           dist=self.dist, score=self.score, val=self.data.val, metrics=self.rundir.metrics,
                           keep_last=lambda: self.save(f"checkpoint_step{s.step:07d}", "step", resumable=True),
                           max_batches=self.validator.whole_batches)

    # ------------------------------------------------------------ pieces

    def test(self) -> dict[str, float]:
        assert self.data.test is not None
        r = self.score(self.data.test, end_test_batches(self.cfg))
        s = self.state
        self.rundir.metrics.write({"kind": "test", "step": s.step, "epoch": min(s.epoch + 1, self.budget.plan.epochs),
                                   "test_loss": r["loss"], "test_perplexity": r["perplexity"],
                                   "test_bits_per_byte": r["bits_per_byte"], "test_tokens": r["tokens"]})
        log.info(f"test: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}, "
                 f"{r['bits_per_byte']:.3f} bits/byte over {r['tokens']:,} tokens")
        return r

    def write_stories(self) -> list[Story]:
        conversations = self.data.conversations
        return write_stories(self.model, self.tokenizer, n=self.cfg.eval.end_stories,
                             max_tokens=self.cfg.eval.end_story_tokens, device=self.dist.device,
                             precision=self.compute.precision, conversations=conversations,
                             template=ChatTemplate.from_config(self.cfg.chat) if conversations else None,
                             title=f"{self.cfg.name}, step {self.state.step}", rundir=self.rundir, dist=self.dist)

    def save(self, name: str, kind: str, resumable: bool, weights_step: Optional[int] = None) -> Path:
        """A checkpoint of the run now; `weights_step` when its weights are an earlier step's."""
        meta: dict[str, Any] = {"kind": kind, "cairn_version": __version__, "config": self.cfg.to_dict(),
                                "tokenizer": {"name": self.tokenizer.name, "vocab_size": self.tokenizer.vocab_size},
                                "world_size": self.dist.world}
        if weights_step is not None:
            meta["weights_step"] = weights_step
        return self.checkpointer.save(name, self.parts, meta, resumable, self.state.step)

    def write_run_files(self) -> None:
        """The run's tokenizer copy, its resolved config, run.json."""
        save_copy(self.tokenizer, self.rundir.path)
        self.rundir.write(CONFIG, to_toml(self.cfg))
        self.write_run_info()

    def write_run_info(self) -> None:
        self.rundir.write_json("run.json", self.run_info())

    def run_info(self) -> dict[str, Any]:
        """What run.json holds: the version, tokenizer, size, device, precision and why, the plan, the data."""
        c = self.compute
        return {
            "cairn_version": __version__,
            "tokenizer": {"name": self.tokenizer.name, "vocab_size": self.tokenizer.vocab_size},
            "parameters": self.model.num_params(),
            "device": str(self.dist.device), "precision": c.precision,
            "precision_choice": c.precision_reason, "threads": c.threads,
            "processes": self.dist.world, "parallel": self.dist.parallel,
            "plan": asdict(self.budget.plan),
            "data": {"cache": self.data.cache_dir, **self.data.meta},
            **({"init_from": self.cfg.init_from} if self.cfg.init_from else {}),
        }

    def describe(self) -> None:
        """What is about to be trained, on what, for how long."""
        cfg, t, plan, c = self.cfg, self.cfg.train, self.budget.plan, self.compute
        log.info(f"model: {self.model.num_params():,} parameters; device {self.dist.device}, {c.precision}, "
                 f"{c.threads} threads")
        if c.peak_flops:
            log.info(f"MFU against {c.peak_flops / 1e9:,.0f} GFLOP/s ({c.peak_source}), "
                     f"{self.reporter.flops_per_token / 1e6:,.1f} MFLOP per token")
        splits = self.data.meta.get("splits", {})
        counts = ", ".join(f"{k} {v.get('stories', 0):,} stories / {v.get('tokens', 0):,} tokens"
                           for k, v in splits.items())
        unit = self.data.unit
        log.info(f"data: {counts}; train has {len(self.data.train):,} {unit} of <= {cfg.data.seq_len} tokens")
        if self.dist.enabled:
            log.info(f"distributed: {self.dist.describe()}; each reads its share of every global batch")
        per_batch = self.dist.world * t.batch_size
        log.info(f"each epoch: {epoch_steps_text(len(self.data.train), per_batch, t.grad_accum, unit)}")
        rows = batch_text(self.dist.world, t.batch_size, t.grad_accum)
        log.info(f"plan: {plan.total_steps} steps ({plan.steps_per_epoch} per epoch, {plan.epochs} epoch(s)), "
                 f"{rows} ({self.dist.world * t.batch_size * t.grad_accum * cfg.data.seq_len:,} "
                 f"tokens at most) per step, warm-up {plan.warmup_steps} steps, {cfg.schedule.schedule} schedule, "
                 f"peak lr {cfg.schedule.lr:g}")


def epoch_steps_text(n_rows: int, rows_per_batch: int, accum: int, unit: str) -> str:
    """One epoch's steps and the rows of each: "3 steps of 32, 32 and 16 stories"."""
    full, rest = divmod(n_rows, rows_per_batch)
    sizes = [rows_per_batch] * full + ([rest] if rest else [])
    steps = [sum(sizes[i:i + accum]) for i in range(0, len(sizes), accum)]
    if len(steps) > 4:
        tail = f", the last of {steps[-1]:,}" if steps[-1] != steps[0] else ""
        return f"{len(steps):,} steps of {steps[0]:,} {unit}{tail}"
    listed = ", ".join(f"{n:,}" for n in steps[:-1])
    plural = "s" if len(steps) > 1 else ""
    return f"{len(steps)} step{plural} of {listed + ' and ' if listed else ''}{steps[-1]:,} {unit}"
