"""The training loop. `build.py` prepares a `Trainer` (all the I/O); `Trainer.run` trains it.

One step (`train_step`): set the scheduled learning rate, run `grad_accum` micro-batches forward
and backward, clip the global gradient norm, take an AdamW (or Muon) step. Its loss is the mean
over every real (non-padding) target token of those micro-batches, so padding and uneven
micro-batches never change the weight of a token. Around the steps: reports, validation with early
stopping, checkpoints, the time budget's deadline, and stop requests (Ctrl-C, SIGTERM).

Under torchrun the same loop runs in every process: `distributed.Dist` gives each its share of
every global batch, wraps the model (DDP or FSDP), reduces what must be global (token counts,
losses, evaluation sums, stop flags), and lets only rank 0 write files and logs.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from cairn.version import __version__
from cairn.checkpoint import store as ckpt
from cairn.config.sections import RunConfig
from cairn.data import epoch_offset, make_loader, num_batches
from cairn.util.errors import CairnError
from cairn.eval.evaluate import evaluate
from cairn.model.ops import IGNORE_INDEX
from cairn.tokenizer.base import Tokenizer
from cairn.runtime.device import autocast
from cairn.training import budget, resume
from cairn.training.checkpointer import Checkpointer
from cairn.training.distributed import Dist
from cairn.training.ending import end_on_best
from cairn.training.report import Reporter
from cairn.training.rundir import RunDir
from cairn.training.signals import StopRequest
from cairn.training.state import Plan, TrainState
from cairn.training.stories import write_stories
from cairn.training.validator import Validator

log = logging.getLogger(__name__)

PAUSES_END_THE_RUN = ("early stopping", "time budget")  # other stops pause: the run can resume


@dataclass
class Trainer:
    """A run ready to train; made by `build.build_trainer`, which does all the I/O."""
    cfg: RunConfig
    dist: Dist
    rundir: RunDir
    tokenizer: Tokenizer
    data: Any  # data.PreparedData
    train_ds: Any
    val_ds: Any  # None when the split is empty (no evaluation on it)
    test_ds: Any
    plan: Plan
    model: Any  # model.Transformer
    precision: str
    threads: int
    checkpointer: Checkpointer
    peak_flops: Optional[float] = None
    peak_source: str = ""
    progress: bool = False
    stop_after: int = 0
    started: float = 0.0  # time.monotonic() when the command began: a time budget counts from there
    precision_reason: str = ""  # why `precision` (measured, asked, kept on resume): see precision.py
    state: TrainState = field(default_factory=TrainState)
    wrapped: Any = None  # the model as DDP/FSDP wrapped it
    forward: Any = None  # `wrapped`, compiled or not
    optimizer: Any = None
    plan_restored: bool = False  # a resumed budgeted run keeps the plan it was given
    deadline: Optional[float] = None  # monotonic time by which the last step must be done
    overhead_s: float = 0.0  # planned evaluation and checkpoint seconds per step
    epoch_end_s: float = 0.0  # planned seconds of an epoch end's validation and checkpoint
    tb: Any = None

    def __post_init__(self):
        self.device = self.dist.device
        self.pace: deque[float] = deque(maxlen=budget.PACE_WINDOW)  # the last steps' seconds
        t = self.cfg.train
        self.validator = Validator(self.evaluate, self.val_ds, t.eval_batches, t.patience, self.rundir.metrics,
                                   on_best=lambda: self.save(f"{self.cfg.name}_best", "best", resumable=False))
        self.reporter = Reporter(t.report_every, self.rundir.metrics, self.peak_flops,
                                 self.model.flops_per_token(self.cfg.data.seq_len), self.dist.world)

    # ------------------------------------------------------------ the loop

    def run(self) -> dict:
        self.describe()
        stopped = None
        with StopRequest(quiet=not self.dist.is_main) as stop:
            while stopped is None and self.state.epoch < self.plan.epochs and self.state.step < self.plan.total_steps:
                stopped = self.run_epoch(stop)
            if stopped is not None and stopped not in PAUSES_END_THE_RUN:
                return self.pause(stopped)
        return self.finish(stopped)

    def run_epoch(self, stop: StopRequest) -> Optional[str]:
        """Steps until the epoch ends, the plan is done or something stops the run, then the
        epoch's end. Returns why the run stops, or None to go on."""
        from tqdm import tqdm

        t, s, plan = self.cfg.train, self.state, self.plan
        left = min(plan.steps_per_epoch - s.batch_in_epoch // t.grad_accum, plan.total_steps - s.step)
        bar = tqdm(total=left, desc=f"epoch {s.epoch + 1}/{plan.epochs}", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        stopped, micro = None, []
        batches = self.loader(self.train_ds, s.epoch, s.batch_in_epoch)
        last = plan.micro_batches_per_epoch - 1
        for i, batch in enumerate(batches, start=s.batch_in_epoch):
            micro.append(batch)
            if len(micro) == t.grad_accum or i == last:  # the epoch's last step may have fewer micro-batches
                self.step(micro, bar)
                micro = []
                stopped = self.poll_stop(stop)
                if stopped or s.step >= plan.total_steps:
                    break
        bar.close()
        return self.end_epoch(stopped)

    def step(self, micro: list[dict], bar) -> None:
        """One optimizer step, then what falls due after it: a report, a validation, a checkpoint."""
        t, s = self.cfg.train, self.state
        began = time.perf_counter()
        loss, grad_norm, n_tokens = self.train_step(micro)
        self.pace.append(time.perf_counter() - began)
        s.batch_in_epoch += len(micro)
        self.reporter.add(s, loss, n_tokens)
        lr = self.plan.lr(s.step - 1, t)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        if self.reporter.due(s.step, self.plan.total_steps):
            self.reporter.report(s, self.plan.total_steps, lr, grad_norm, bar)
            self.replan()
        if t.eval_every and s.step % t.eval_every == 0:
            self.validator(s, full=False)
            self.reporter.restart()
        if t.checkpoint_every and s.step % t.checkpoint_every == 0:
            self.save(f"{self.cfg.name}_checkpoint_step{s.step:07d}", "step", resumable=True)
            self.reporter.restart()

    def poll_stop(self, stop: StopRequest) -> Optional[str]:
        """Why the run stops after this step, if it does. Every rank stops at the same step: a
        signal or the deadline seen by one is seen by all."""
        s = self.state
        late = self.deadline is not None and time.monotonic() > self.deadline
        signalled, late = (v > 0 for v in self.dist.sum([float(stop.requested), float(late)]))
        if self.validator.out_of_patience(s):
            return "early stopping"
        if late and s.step < self.plan.total_steps:
            return "time budget"
        if self.stop_after and s.step >= self.stop_after:
            return f"stop-after {self.stop_after}"
        return "signal" if signalled else None

    def end_epoch(self, stopped: Optional[str]) -> Optional[str]:
        """An epoch's end validates, saves and moves to the next epoch."""
        t, s, plan = self.cfg.train, self.state, self.plan
        if s.batch_in_epoch < plan.micro_batches_per_epoch:
            return stopped
        if s.epoch_tokens:
            mean = s.epoch_loss_sum / s.epoch_tokens
            log.info(f"epoch {s.epoch + 1}: train loss {mean:.4f}, perplexity {math.exp(min(mean, 700)):.2f}")
        if stopped is None and s.step < plan.total_steps and self.deadline is not None:
            # when the epoch's end would run past the deadline the run stops here, and its end
            # validates this very model once, in the time kept for it (not twice, late)
            late = time.monotonic() + self.epoch_end_s > self.deadline
            if self.dist.sum([float(late)])[0] > 0:
                return "time budget"
        self.validator(s, full=t.epoch_val == "full")
        s.epoch, s.batch_in_epoch, s.epoch_loss_sum, s.epoch_tokens = s.epoch + 1, 0, 0.0, 0
        self.save(f"{self.cfg.name}_checkpoint_epoch{s.epoch}", "epoch", resumable=True)
        if stopped is None and self.validator.out_of_patience(s):
            return "early stopping"
        return stopped

    def pause(self, why: str) -> dict:
        s = self.state
        path = self.save(f"{self.cfg.name}_checkpoint_step{s.step:07d}", "step", resumable=True)
        log.info(f"stopped ({why}) at step {s.step}; checkpoint {path}; "
                 f"resume with: cairn train --resume {self.rundir.path}")
        return {"stopped": why, "step": s.step, "checkpoint": str(path)}

    def finish(self, stopped: Optional[str]) -> dict:
        """The run's end: the whole validation split, the final checkpoint, the test, the stories."""
        t, s = self.cfg.train, self.state
        if stopped == "early stopping":
            log.info(f"early stopping at step {s.step}: no better validation loss in {t.patience} evaluations "
                     f"(best {s.best_val_loss:.4f})")
        if stopped == "time budget":
            log.info(f"time budget: the machine ran slower than measured; stopping at step {s.step} of the "
                     f"{self.plan.total_steps} planned, to end in time")
        if self.validator.last_full_step != s.step:  # the end's figure is always the whole split's
            self.validator(s, full=True)
        ends_on = None
        if t.end_on_best and self.validator.last_full:
            # the last state stays resumable; the run's model (its final checkpoint) is then the best one
            ends_on = end_on_best(self, self.validator.last_full,
                                  keep_last=lambda: self.save(f"{self.cfg.name}_checkpoint_step{s.step:07d}", "step",
                                                              resumable=True))
        if ends_on is None:
            final = self.save(f"{self.cfg.name}_final", "final", resumable=True)
        else:
            final = self.save(f"{self.cfg.name}_final", "final", resumable=False, weights_step=ends_on)
        summary = {"step": s.step, "tokens": s.tokens_seen, "stopped": stopped, "final": str(final),
                   "best_val_loss": s.best_val_loss if math.isfinite(s.best_val_loss) else None,
                   "weights_step": s.step if ends_on is None else ends_on}
        if t.test_at_end and self.test_ds is not None:
            summary["test"] = self.test()
        log.info(f"final checkpoint: {final}")
        if t.end_stories:
            summary["stories"] = write_stories(self)
        summary["seconds"] = time.monotonic() - self.started
        log.info(f"done in {summary['seconds']:.0f}s")
        return summary

    # ------------------------------------------------------------ one step

    def train_step(self, micro_batches: list[dict]) -> tuple[float, float, int]:
        """One optimizer step over several micro-batches; returns (mean loss, grad norm, tokens)."""
        t, s = self.cfg.train, self.state
        lr = self.plan.lr(s.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # the step's real tokens on every rank, so each weighs 1/n_tokens of the step wherever it is
        n_tokens = int(self.dist.sum([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)])[0])
        loss_total = torch.zeros((), device=self.device)
        for i, b in enumerate(micro_batches):
            x, y = b["input_ids"].to(self.device, non_blocking=True), b["labels"].to(self.device, non_blocking=True)
            # gradients are reduced across ranks once per step, on its last micro-batch
            with self.dist.grad_sync(self.wrapped, sync=i == len(micro_batches) - 1):
                with autocast(self.device, self.precision):
                    if self.cfg.data.story_mask:  # a story starts at its <|endoftext|> (see data/batching.py)
                        loss_sum, _ = self.forward(x, labels=y, stories=(x == self.tokenizer.eot_id).cumsum(1))
                    else:
                        loss_sum, _ = self.forward(x, labels=y)
                # DDP and FSDP average the ranks' gradients: x world makes that average the token sum
                (loss_sum * self.dist.world / n_tokens).backward()
            loss_total += loss_sum.detach()
        clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = self.dist.clip_grad_norm(self.model.parameters(), clip)
        loss = self.dist.sum([float(loss_total)])[0] / max(n_tokens, 1)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return self.skip_step(loss, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        s.step += 1
        s.tokens_seen += n_tokens
        return loss, grad_norm, n_tokens

    def skip_step(self, loss: float, grad_norm: float) -> tuple[float, float, int]:
        """A non-finite loss or gradient: skip the update while `skip_nonfinite` allows, else stop."""
        t, s = self.cfg.train, self.state
        self.optimizer.zero_grad(set_to_none=True)
        if s.skipped_steps < t.skip_nonfinite:
            s.skipped_steps += 1
            s.step += 1  # the batch is used up and the schedule moves on, the weights do not
            log.info(f"step {s.step}: loss {loss} / gradient norm {grad_norm} is not finite: update skipped "
                     f"({s.skipped_steps} of at most {t.skip_nonfinite})")
            return loss, grad_norm, 0
        raise CairnError(f"loss {loss} / gradient norm {grad_norm} is not finite at step {s.step + 1}: "
                         f"stopped; the last good checkpoint is {self.checkpointer.newest() or 'none'}; "
                         "lower --lr, raise --warmup-steps or allow --skip-nonfinite N, then resume or restart")

    # ------------------------------------------------------------ pieces

    def loader(self, ds, epoch: int, start: int = 0):
        """This rank's share of every global batch (all of it in a single process), the epoch's
        last and shorter batch included. Held-out rows come in one seeded order, the same at every
        evaluation: a partial evaluation (`eval_batches`) is then a fixed random sample of the
        split, not its first stories, which are the first source file's (the splits keep file order).

        With several processes the last global batch is split as evenly as possible; a rank whose
        share of it is empty (fewer rows than processes) steps on a row whose targets are all
        padding, which counts nothing, so every rank takes the same steps."""
        t, training = self.cfg.train, ds is self.train_ds
        if training and self.cfg.data.pack_shift:
            ds = ds.shifted(epoch_offset(self.cfg.data.seq_len, self.cfg.seed, epoch))
        batches = make_loader(ds, t.batch_size, shuffle=True, seed=self.cfg.seed, epoch=epoch, start_batch=start,
                              drop_last=False, num_workers=t.num_workers, pad_id=self.tokenizer.eot_id,
                              rank=self.dist.rank, world=self.dist.world)
        if self.dist.enabled and training:
            n = num_batches(len(ds), t.batch_size * self.dist.world, drop_last=False) - start
            return self.dist.lockstep(batches, n, _masked_row(ds))
        return batches

    def evaluate(self, ds, max_batches: int = 0) -> dict:
        """Held-out metrics, each rank evaluating its share of the batches, the sums reduced."""
        batches = self.loader(ds, 0)
        if self.dist.enabled:
            n = num_batches(len(ds), self.cfg.train.batch_size * self.dist.world, drop_last=False)
            batches = self.dist.lockstep(batches, min(n, max_batches or n), _masked_row(ds))
        return evaluate(self.model, batches, self.device, self.precision, self.tokenizer.token_bytes,
                        max_batches=max_batches, reduce=self.dist.sum)

    def test(self) -> dict:
        r = self.evaluate(self.test_ds)
        s = self.state
        self.rundir.metrics.write({"kind": "test", "step": s.step, "epoch": min(s.epoch + 1, self.plan.epochs),
                                "test_loss": r["loss"], "test_perplexity": r["perplexity"],
                                "test_bits_per_byte": r["bits_per_byte"], "test_tokens": r["tokens"]})
        log.info(f"test: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}, "
                 f"{r['bits_per_byte']:.3f} bits/byte over {r['tokens']:,} tokens")
        return r

    def save(self, name: str, kind: str, resumable: bool, weights_step: Optional[int] = None) -> Path:
        """A checkpoint of the model now; `weights_step` when its weights are an earlier step's."""
        weights = self.dist.full_weights(self.model)
        trainer_state = resume.trainer_state(self) if resumable else None
        meta = {"kind": kind, "cairn_version": __version__, "config": self.cfg.to_dict(),
                "tokenizer": {"name": self.tokenizer.name, "vocab_size": self.tokenizer.vocab_size},
                "state": self.state.to_json(), "plan": asdict(self.plan), "rng": ckpt.rng_state(),
                "world_size": self.dist.world}
        if weights_step is not None:
            meta["weights_step"] = weights_step
        return self.checkpointer.save(name, weights, meta, trainer_state, self.state.step)

    def replan(self) -> None:
        """Under a time budget, fit the plan to the pace measured over the last steps (a machine's
        pace wanders, by 20% from one run to the next on shared hardware). What is left of the
        learning-rate decay is re-laid from the rate in force to the new end: the rate never jumps."""
        if self.deadline is None or not self.pace:
            return
        t, plan = self.cfg.train, self.plan
        recent = sum(self.pace) / len(self.pace)
        # every rank must change the plan alike: they agree on the mean pace and time left
        pace, left = (v / self.dist.world for v in self.dist.sum([recent, max(self.deadline - time.monotonic(), 0.0)]))
        new = budget.replan(self.state.step, plan.total_steps, plan.warmup_steps, pace, left, self.overhead_s,
                            t.max_steps)
        if new is None:
            return
        log.info(f"time budget: {pace:.3f}s per step over the last {len(self.pace)} steps: "
                 f"re-planned from {plan.total_steps} to {new} steps")
        plan.move_end(self.state.step, new)
        plan.epochs = max(plan.epochs, math.ceil(new / plan.steps_per_epoch))
        self.dist.on_main(self.write_run_info)  # run.json holds the plan being followed

    def write_run_info(self) -> None:
        self.rundir.write_json("run.json", {
            "cairn_version": __version__,
            "tokenizer": {"name": self.tokenizer.name, "vocab_size": self.tokenizer.vocab_size},
            "parameters": self.model.num_params(),
            "device": str(self.device), "precision": self.precision,
            "precision_choice": self.precision_reason, "threads": self.threads,
            "processes": self.dist.world, "parallel": self.dist.parallel,
            "plan": asdict(self.plan),
            "data": {"cache": str(self.data.cache_dir), **self.data.meta},
            **({"init_from": self.cfg.init_from} if self.cfg.init_from else {}),
        })

    def describe(self) -> None:
        """What is about to be trained, on what, for how long."""
        cfg, t, plan = self.cfg, self.cfg.train, self.plan
        if self.plan_restored:
            log.info(f"resume: keeping the time budget's plan of {plan.total_steps} steps "
                     "(the budget's clock is not re-applied to a resumed run)")
        log.info(f"model: {self.model.num_params():,} parameters; device {self.device}, {self.precision}, "
                 f"{self.threads} threads")
        if self.peak_flops:
            log.info(f"MFU against {self.peak_flops / 1e9:,.0f} GFLOP/s ({self.peak_source}), "
                     f"{self.reporter.flops_per_token / 1e6:,.1f} MFLOP per token")
        splits = self.data.meta.get("splits", {})
        counts = ", ".join(f"{k} {v.get('stories', 0):,} stories / {v.get('tokens', 0):,} tokens"
                           for k, v in splits.items())
        unit = "windows" if cfg.data.batching == "pack" else "rows"
        if unit == "rows" and len(self.train_ds) == splits.get("train", {}).get("stories"):
            unit = "stories"  # every story fits in one row
        log.info(f"data: {counts}; train has {len(self.train_ds):,} {unit} of <= {cfg.data.seq_len} tokens")
        if self.dist.enabled:
            log.info(f"distributed: {self.dist.describe()}; each reads its share of every global batch")
        per_batch = self.dist.world * t.batch_size
        log.info(f"each epoch: {epoch_steps_text(len(self.train_ds), per_batch, t.grad_accum, unit)}")
        rows = resume.batch_text(self.dist.world, t.batch_size, t.grad_accum)
        log.info(f"plan: {plan.total_steps} steps ({plan.steps_per_epoch} per epoch, {plan.epochs} epoch(s)), "
                 f"{rows} ({self.dist.world * t.batch_size * t.grad_accum * cfg.data.seq_len:,} "
                 f"tokens at most) per step, warm-up {plan.warmup_steps} steps, {t.schedule} schedule, "
                 f"peak lr {t.lr:g}")


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


def _masked_row(ds) -> dict:
    """A one-row batch whose targets are all padding: a forward pass that counts nothing."""
    x = ds[0]["input_ids"][None]
    return {"input_ids": x, "labels": torch.full_like(x, IGNORE_INDEX)}
