"""The training loop: data -> model -> AdamW steps -> evaluation, early stopping, checkpoints.

Read it top to bottom: `train()` prepares everything, then runs `Trainer.run()`, whose body is the
loop. One optimizer step consumes `grad_accum` micro-batches; its loss is the mean over every real
(non-padding) target token of those micro-batches, so padding and uneven micro-batches never
change the weight of a token.

Under torchrun the same loop runs in every process: `distributed.Dist` gives each its share of
every global batch, wraps the model (DDP or FSDP), reduces what must be global (token counts,
losses, evaluation sums, stop flags), and lets only rank 0 write files and logs.
"""

from __future__ import annotations

import json
import math
from collections import deque
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import __version__
from ..config import RunConfig, from_dict, parse_duration, to_toml, validate
from ..data import (PackedDataset, PaddedDataset, StoryWindows, epoch_offset, make_loader, num_batches,
                    prepare_data)
from ..errors import CairnError
from ..evaluate import evaluate
from ..model import Transformer
from ..runtime import (autocast, cpu_compiler, keep_freed_memory, peak_flops, pick_device, resolve_precision,
                       seed_everything, set_threads)
from ..tokenizer import TOKENIZER_FILE, get_tokenizer, parse_bpe_spec, run_tokenizer
from ..tokenizer_train import split_tokenizer
from . import budget
from . import checkpoint as ckpt
from .distributed import Dist, session
from .optim import lr_at, make_optimizer, warmup_steps


PACE_WINDOW = 200  # steps over which a time-budgeted run measures its pace
GROW_MARGIN = 0.01  # a plan grows only by more than this fraction: no re-plan for every small wobble
# fixed, so the stories of two runs can be compared side by side
END_PROMPTS = ("Once upon a time", "One day, a little girl named Lily", "Tom had a big red ball")


@dataclass
class TrainState:
    """Everything besides weights and optimizer that decides the rest of a run."""
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # global micro-batches (of processes x batch_size rows) of this epoch already consumed
    best_val_loss: float = math.inf
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    tokens_seen: int = 0  # real target tokens trained on
    last_eval_step: int = -1
    skipped_steps: int = 0  # updates skipped for a non-finite loss
    # running sums behind the logged train losses, so a resumed run logs what the original would
    window_loss_sum: float = 0.0
    window_tokens: int = 0
    epoch_loss_sum: float = 0.0
    epoch_tokens: int = 0


@dataclass
class Plan:
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    epochs: int
    budget_s: float = 0.0  # the time budget the steps were planned for (0 = planned from the config)
    step_s: float = 0.0  # the measured seconds per step behind that plan


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # only rank 0 writes
        self.sink: Optional[Callable[[dict], None]] = None  # e.g. TensorBoardLogger.write

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.sink is not None:
            self.sink(record)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (and a torn last line): a resumed run redoes them."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step and record.get("kind") not in ("test",):
                keep.append(line)
        ckpt.write_atomic_text(self.path, "".join(k + "\n" for k in keep))


def _json_float(x: float):
    return x if math.isfinite(x) else None


class StopRequest:
    """First Ctrl-C or SIGTERM: finish the step, checkpoint, exit. Second Ctrl-C: stop at once."""

    def __init__(self, quiet: bool = False):
        self.requested = False
        self.quiet = quiet  # ranks other than 0 do not repeat the message
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if not self.quiet:
            print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: Path, resume: bool, stop_after: int, log: Callable[[str], None],
                 progress: bool, dist: Optional[Dist] = None, started: Optional[float] = None):
        t = cfg.train
        self.dist = dist or Dist(device=pick_device(t.device))
        main = self.dist.is_main  # only rank 0 logs, shows progress and writes files
        self.cfg, self.out, self.log, self.progress = cfg, out_dir, log if main else _quiet, progress and main
        self.stop_after = stop_after
        self.started = time.monotonic() if started is None else started  # the time budget counts from here
        self.deadline: Optional[float] = None  # monotonic time by which the last step must be done
        self._overhead_s = 0.0  # planned evaluation and checkpoint seconds per step
        self._epoch_end_s = 0.0  # planned seconds of an epoch end's validation and checkpoint
        self._step_times: deque[float] = deque(maxlen=PACE_WINDOW)  # the last steps' seconds (the measured pace)
        self._last_full_val_step = -1
        self.plan_restored = False
        if t.tensorboard:  # fail before the data is prepared, not after
            from ..tensorboard import require_tensorboard
            require_tensorboard()
        self.threads = set_threads(self.dist.cpu_threads(t.num_threads))
        self.device = self.dist.device
        if self.device.type == "cpu":
            keep_freed_memory()  # a CPU step's large tensors would otherwise be page-faulted in anew each step
        self.precision = resolve_precision(t.precision, self.device)
        self.ckpt_dir = out_dir / "checkpoints"
        resume_from = self.dist.on_main(lambda: self._check_run_dir(resume))
        # rank 0 learns a bpe:N tokenizer into the (shared) cache; the other ranks then load it
        self.tokenizer = self.dist.main_first(lambda: self._tokenizer(resume_from is not None))
        cfg.model.vocab_size = self.tokenizer.vocab_size
        seed_everything(cfg.seed)

        # rank 0 tokenizes a new source into the (shared) cache; the other ranks then read it
        data = self.dist.main_first(lambda: prepare_data(cfg.data, cfg.seed, self.tokenizer, log=self.log))
        self.data = data
        if cfg.data.batching == "pack":
            self.train_ds = PackedDataset(data.train, cfg.data.seq_len, shiftable=cfg.data.pack_shift)
        else:
            self.train_ds = PaddedDataset(data.train, cfg.data.seq_len)
        # held-out stories are scored one at a time from their own beginning, however training cuts
        # them (a sliding window past seq_len); an empty split is absent (no evaluation on it)
        self.val_ds, self.test_ds = (StoryWindows(split, cfg.data.seq_len) or None for split in (data.val, data.test))
        self.plan = self._plan()

        self.model = Transformer(cfg.model).to(self.device)  # the same initial weights on every rank
        self.peak_flops, self.peak_source = peak_flops(self.device, self.precision)
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        self.state = TrainState()
        self.metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=main)
        # weights are loaded before wrapping (FSDP shards what the model holds), the optimizer state after
        saved = self._load(resume_from) if resume_from is not None else None
        self.wrapped = self.dist.wrap(self.model, self.precision)
        self.optimizer = make_optimizer(self.model, t, self.device)
        if self.dist.enabled:
            self._seed_rank(0)
        if saved is not None:
            self._restore_trainer(*saved)
        compiled = t.compile
        if compiled and self.device.type == "cpu" and cpu_compiler() is None:
            self.log("compile: torch.compile needs a C++ compiler on CPUs and none was found (g++, clang++ or "
                     "$CXX): training without it; install one to get its speed")
            compiled = False
        self.forward = torch.compile(self.wrapped) if compiled else self.wrapped
        if t.time_budget and not self.plan_restored:
            self.plan_for_budget()  # before the run directory is written: a budget too short leaves nothing
        self.dist.on_main(self._write_run_files)
        self.tb = None
        if t.tensorboard and main:
            from ..tensorboard import TensorBoardLogger
            # purge_step hides events a killed run wrote past the checkpoint, as metrics.jsonl drops them
            self.tb = TensorBoardLogger(out_dir, purge_step=self.state.step + 1)
            self.metrics.sink = self.tb.write

    # ------------------------------------------------------------ set-up

    def _tokenizer(self, resuming: bool):
        vocab = parse_bpe_spec(self.cfg.tokenizer)
        if vocab is None:
            return run_tokenizer(self.cfg.tokenizer, self.out)  # an own tokenizer that moved: the run's copy
        copy = self.out / "tokenizer"
        if resuming and (copy / TOKENIZER_FILE).is_file():
            return get_tokenizer(str(copy))  # the very tokenizer the checkpoint was trained with
        return split_tokenizer(vocab, self.cfg.data, self.cfg.seed, log=self.log)

    def _check_run_dir(self, resume: bool) -> Optional[Path]:
        has_run = (self.out / "config.toml").exists() or self.ckpt_dir.exists()
        if resume:
            ckpt.cleanup(self.ckpt_dir)
            newest = ckpt.latest(self.ckpt_dir) if self.ckpt_dir.is_dir() else None
            if newest is not None:
                return newest
            if has_run:  # stopped before its first checkpoint: nothing trained is lost by starting over
                self.log(f"{self.out} has no checkpoint yet: starting it from the beginning")
                MetricsLog(self.out / "metrics.jsonl").truncate_after(-1)
            return None
        if has_run:
            raise CairnError(f"{self.out} already holds a run: resume it with --resume {self.out}, "
                             "or choose another --out")
        return None

    def _plan(self) -> Plan:
        t, n_items = self.cfg.train, len(self.train_ds)
        micro = num_batches(n_items, t.batch_size * self.dist.world, drop_last=True)
        steps_per_epoch = micro // t.grad_accum
        if steps_per_epoch == 0:
            unit = "windows" if self.cfg.data.batching == "pack" else "rows"
            raise CairnError(f"the train split has {n_items} {unit} of up to {self.cfg.data.seq_len} tokens, "
                             f"too few for one step of {t.batch_size} x {t.grad_accum}"
                             f"{f' x {self.dist.world} processes' if self.dist.enabled else ''}: "
                             "lower --batch-size, --grad-accum or --seq-len, or add data")
        total = steps_per_epoch * t.epochs
        if t.max_steps:
            total = min(total, t.max_steps)
        return Plan(micro, steps_per_epoch, total, warmup_steps(t, total), t.epochs)

    def _batch_text(self, world: int = 0, batch: int = 0, accum: int = 0) -> str:
        """The rows of one optimizer step, spelled out (this run's unless told otherwise)."""
        t = self.cfg.train
        world, batch, accum = world or self.dist.world, batch or t.batch_size, accum or t.grad_accum
        procs = f"{world} processes x " if world > 1 else ""
        return f"{procs}batch {batch} x {accum} accumulation = {world * batch * accum} rows"

    def _write_run_files(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(self.out / "tokenizer")  # own tokenizers: the run keeps a copy (gpt2: nothing)
        ckpt.write_atomic_text(self.out / "config.toml", to_toml(self.cfg))
        self._write_run_info()

    def _write_run_info(self) -> None:
        info = {
            "cairn_version": __version__,
            "tokenizer": {"name": self.tokenizer.name, "vocab_size": self.tokenizer.vocab_size},
            "parameters": self.model.num_params(),
            "device": str(self.device), "precision": self.precision, "threads": self.threads,
            "processes": self.dist.world, "parallel": self.dist.parallel,
            "plan": asdict(self.plan),
            "data": {"cache": str(self.data.cache_dir), **self.data.meta},
        }
        ckpt.write_atomic_text(self.out / "run.json", json.dumps(info, indent=1, default=str))

    def _meta(self, kind: str) -> dict:
        return {
            "kind": kind, "cairn_version": __version__, "config": self.cfg.to_dict(),
            "tokenizer": {"name": self.tokenizer.name, "vocab_size": self.tokenizer.vocab_size},
            "state": {k: _json_float(v) if isinstance(v, float) else v for k, v in asdict(self.state).items()},
            "plan": asdict(self.plan), "rng": ckpt.rng_state(), "world_size": self.dist.world,
        }

    def _save(self, name: str, kind: str, resumable: bool) -> Path:
        # every rank takes part (FSDP gathers the shards onto rank 0); rank 0 alone writes, and the
        # others wait for it, so none goes on to read or replace a half-written checkpoint
        weights = self.dist.full_weights(self.model)
        trainer_state = self._trainer_state() if resumable else None
        meta = self._meta(kind)
        return self.dist.on_main(lambda: self._write_checkpoint(name, weights, meta, trainer_state))

    def _trainer_state(self) -> dict:
        state = {"optimizer": self.dist.optimizer_state(self.model, self.optimizer), "torch_rng": torch.get_rng_state()}
        if self.dist.enabled:
            # every rank's own dropout stream, so a resume with as many processes continues each
            state["rank_rng"] = self.dist.gather_objects(self._rank_rng())
        elif torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def _rank_rng(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _seed_rank(self, step: int) -> None:
        """Every rank drew the same initial weights; from here on their dropout masks must differ."""
        import numpy as np

        seed = int(np.random.SeedSequence([self.cfg.seed, step, self.dist.rank]).generate_state(1)[0])
        torch.manual_seed(seed)  # seeds CUDA too

    def _write_checkpoint(self, name: str, weights: dict, meta: dict, trainer_state: Optional[dict]) -> Path:
        resumable = trainer_state is not None
        try:
            path = ckpt.save_checkpoint(self.ckpt_dir / name, weights, meta, trainer_state)
        except OSError as e:
            newest = ckpt.latest(self.ckpt_dir)
            raise CairnError(f"could not write checkpoint {self.ckpt_dir / name} ({e.strerror or e}) at step "
                             f"{self.state.step}: stopped; the newest good checkpoint is {newest or 'none'}; "
                             f"free space and resume with: cairn train --resume {self.out}") from None
        if resumable:
            ckpt.set_latest(path)
            ckpt.prune(self.ckpt_dir, self.cfg.name, self.cfg.train.keep_checkpoints)
        return path

    def _load(self, path: Path) -> tuple[Path, ckpt.Checkpoint, dict]:
        """Weights and training state; the optimizer and RNG state follow in `_restore_trainer`."""
        c = ckpt.read_checkpoint(path)
        try:
            trainer = self._restore(path, c)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CairnError(f"{path}/state.json is incomplete ({type(e).__name__}: {e}): "
                             "resume from another checkpoint") from None
        return path, c, trainer

    def _restore(self, path: Path, c) -> dict:
        saved = from_dict(c.meta["config"])
        if c.meta["tokenizer"]["name"] != self.tokenizer.name:
            raise CairnError(f"cannot resume {path}: it was trained with tokenizer {c.meta['tokenizer']['name']!r}, "
                             f"this run uses {self.tokenizer.name!r}")
        diff = [f"model.{k} ({v} -> {getattr(self.cfg.model, k)})" for k, v in asdict(saved.model).items()
                if getattr(self.cfg.model, k) != v]
        if diff:
            raise CairnError(f"cannot resume {path}: the model config differs: {', '.join(diff)}; "
                             "resume with the saved model config or start a new run")
        for section in ("data", "train"):
            for k, v in asdict(getattr(saved, section)).items():
                if getattr(getattr(self.cfg, section), k) != v:
                    self.log(f"resume: {section}.{k} changed {v!r} -> {getattr(getattr(self.cfg, section), k)!r}")
        self.model.load_weights(c.model_state())
        trainer = c.trainer_state()
        state = dict(c.meta["state"])
        state["best_val_loss"] = math.inf if state["best_val_loss"] is None else state["best_val_loss"]
        self.state = TrainState(**state)
        if self.cfg.train.time_budget and c.meta.get("plan"):
            # the steps were planned for the budget once; a resumed run finishes that plan
            self.plan = Plan(**c.meta["plan"])
            self.plan_restored = True
        self._carry_position(path, saved, c.meta.get("world_size", 1))
        self.metrics.truncate_after(self.state.step)
        self.log(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch + 1}, "
                 f"batch {self.state.batch_in_epoch})")
        return trainer

    def _carry_position(self, path: Path, saved: RunConfig, saved_world: int) -> None:
        """Re-express the place in the epoch (global micro-batches of the saved run) in this run's.

        The epoch's row order does not depend on the batch, so with the same rows per optimizer
        step (processes x batch_size x grad_accum) the run continues exactly, on any number of
        processes; at an epoch boundary any batch will do. Otherwise the rest of the epoch would be
        cut into other steps than the saved plan's: refused, saying what to pass."""
        t, s, world = self.cfg.train, self.state, self.dist.world
        old_micro = saved_world * saved.train.batch_size
        old_rows, new_rows = old_micro * saved.train.grad_accum, world * t.batch_size * t.grad_accum
        old_text = self._batch_text(saved_world, saved.train.batch_size, saved.train.grad_accum)
        if old_rows == new_rows:
            s.batch_in_epoch = s.batch_in_epoch * old_micro // (world * t.batch_size)
            if saved_world != world:
                self.log(f"resume: {saved_world} -> {world} processes with the same {new_rows} rows per step "
                         f"({old_text} before, {self._batch_text()} now): continuing where it stopped")
            return
        if s.batch_in_epoch == 0:
            self.log(f"resume: {old_text} per step before, {self._batch_text()} now, from the start of "
                     f"epoch {s.epoch + 1}: the remaining steps are planned for the new batch")
            return
        if old_rows % (world * t.grad_accum) == 0:
            fix = f"--batch-size {old_rows // (world * t.grad_accum)}"
        elif old_rows % (world * t.batch_size) == 0:
            fix = f"--grad-accum {old_rows // (world * t.batch_size)}"
        else:
            fix = f"{saved_world} processes"
        raise CairnError(f"cannot resume {path} with {self._batch_text()} per step: it stopped in the middle of "
                         f"an epoch with {old_text}, and the epoch's rows only continue in the same steps with the "
                         f"same rows per step: resume with {fix}")

    def _restore_trainer(self, path: Path, c, trainer: dict) -> None:
        """Optimizer state (by parameter name, whatever wrapped the model) and random generators."""
        try:
            self.dist.load_optimizer_state(self.model, self.optimizer, trainer["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CairnError(f"{path}/trainer.pt does not fit this model ({type(e).__name__}: {e}): "
                             "resume from another checkpoint") from None
        ranks = trainer.get("rank_rng")
        if ranks is None and not self.dist.enabled:
            torch.set_rng_state(trainer["torch_rng"])
            if "cuda_rng" in trainer and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(trainer["cuda_rng"])
        elif ranks is not None and len(ranks) == self.dist.world:
            mine = ranks[self.dist.rank]
            torch.set_rng_state(mine["torch"])
            if "cuda" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        else:  # another number of processes: only dropout draws from these generators
            self._seed_rank(self.state.step)
            if self.cfg.model.dropout > 0:
                self.log("resume: the number of processes changed, so dropout continues from new per-rank seeds "
                         "(equal in distribution, not bitwise, to the run that never stopped)")
        ckpt.set_rng_state(c.meta["rng"])

    # ------------------------------------------------------------ pieces of the loop

    def loader(self, ds, epoch: int, start: int = 0, drop_last: bool = True):
        """This rank's share of every global batch (all of it in a single process). Held-out rows
        come in one seeded order, the same at every evaluation: a partial evaluation
        (`eval_batches`) is then a fixed random sample of the split, not its first stories, which
        are the first source file's (the splits keep file order)."""
        t = self.cfg.train
        if ds is self.train_ds and self.cfg.data.pack_shift:
            ds = ds.shifted(epoch_offset(self.cfg.data.seq_len, self.cfg.seed, epoch))
        return make_loader(ds, t.batch_size, shuffle=True, seed=self.cfg.seed, epoch=epoch, start_batch=start,
                           drop_last=drop_last, num_workers=t.num_workers, pad_id=self.tokenizer.eot_id,
                           rank=self.dist.rank, world=self.dist.world)

    def evaluate(self, ds, max_batches: int = 0) -> dict:
        """Held-out metrics, each rank evaluating its share of the batches, the sums reduced."""
        batches = self.loader(ds, 0, drop_last=False)
        if self.dist.enabled:
            n = num_batches(len(ds), self.cfg.train.batch_size * self.dist.world, drop_last=False)
            batches = self.dist.lockstep(batches, min(n, max_batches or n), _masked_row(ds))
        return evaluate(self.model, batches, self.device, self.precision, self.tokenizer.token_bytes,
                        max_batches=max_batches, reduce=self.dist.sum)

    def validate(self, full: bool) -> Optional[dict]:
        if self.val_ds is None:
            return None
        result = self.evaluate(self.val_ds, 0 if full else self.cfg.train.eval_batches)
        s = self.state
        s.last_eval_step = s.step
        if full:
            self._last_full_val_step = s.step
        improved = result["loss"] < s.best_val_loss
        if improved:
            s.best_val_loss, s.bad_evals = result["loss"], 0
        else:
            s.bad_evals += 1
        self.metrics.write({"kind": "val", "step": s.step, "epoch": s.epoch + 1, "val_loss": result["loss"],
                            "val_perplexity": result["perplexity"], "val_bits_per_byte": result["bits_per_byte"],
                            "val_tokens": result["tokens"], "full": full})
        self.log(f"step {s.step}: val loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
                 f"{result['bits_per_byte']:.3f} bits/byte{' (best)' if improved else ''}")
        if improved:
            self._save(f"{self.cfg.name}_best", "best", resumable=False)
        return result

    def should_stop_early(self) -> bool:
        p = self.cfg.train.patience
        return p > 0 and self.state.bad_evals >= p

    def train_step(self, micro_batches: list[dict]) -> tuple[float, float, int]:
        """One optimizer step over several micro-batches; returns (mean loss, grad norm, tokens)."""
        t, s = self.cfg.train, self.state
        lr = lr_at(s.step, t, self.plan.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # the step's real tokens on every rank, so each weighs 1/n_tokens of the step wherever it is
        n_tokens = int(self.dist.sum([sum(int((b["labels"] != -100).sum()) for b in micro_batches)])[0])
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
            self.optimizer.zero_grad(set_to_none=True)
            if s.skipped_steps < t.skip_nonfinite:
                s.skipped_steps += 1
                s.step += 1  # the batch is used up and the schedule moves on, the weights do not
                self.log(f"step {s.step}: loss {loss} / gradient norm {grad_norm} is not finite: update skipped "
                         f"({s.skipped_steps} of at most {t.skip_nonfinite})")
                return loss, grad_norm, 0
            newest = ckpt.latest(self.ckpt_dir)
            raise CairnError(f"loss {loss} / gradient norm {grad_norm} is not finite at step {s.step + 1}: "
                             f"stopped; the last good checkpoint is {newest or 'none'}; "
                             "lower --lr, raise --warmup-steps or allow --skip-nonfinite N, then resume or restart")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        s.step += 1
        s.tokens_seen += n_tokens
        return loss, grad_norm, n_tokens

    def plan_for_budget(self) -> None:
        """Measure, then set `self.plan` to the steps that fit in the time budget (see budget.py)."""
        t = self.cfg.train
        budget_s = parse_duration(t.time_budget)
        costs = budget.measure(self)
        elapsed = self.dist.sum([time.monotonic() - self.started])[0] / self.dist.world
        steps, reserve, self._overhead_s = budget.plan_steps(self, budget_s, elapsed, costs, self.plan.steps_per_epoch)
        p = self.plan
        self.plan = Plan(p.micro_batches_per_epoch, p.steps_per_epoch, steps, warmup_steps(t, steps),
                         math.ceil(steps / p.steps_per_epoch), budget_s=budget_s, step_s=costs.step_s)
        self.deadline = self.started + budget_s - reserve - budget.SAFETY_S
        self._epoch_end_s = budget.epoch_end_s(self, costs)
        self.log(f"time budget {budget_s:.0f}s: {elapsed:.1f}s used by set-up and measuring; {costs.step_s:.3f}s per "
                 f"step, {costs.eval_batch_s:.3f}s per evaluation batch, {costs.checkpoint_s:.2f}s per checkpoint, "
                 f"{reserve:.0f}s kept for the end of the run -> {steps} steps "
                 f"({steps / p.steps_per_epoch:.2f} epochs)")

    def replan(self) -> None:
        """Under a time budget, fit the plan to the pace actually measured, over the last
        PACE_WINDOW steps (the machine's pace wanders, by 20% from one run to the next here). When
        the steps left no longer fit, the plan shrinks at once, so the deadline never falls
        mid-schedule at a high learning rate. Once a tenth of the plan is done (six calibration
        steps are a noisy estimate) it also grows, by more than GROW_MARGIN at a time, when the
        machine has sped up: otherwise a run that speeds up ends early and wastes its budget. The
        schedule is stretched or shortened to the new end; its learning rate moves by about the
        same small fraction."""
        if self.deadline is None or not self._step_times:
            return
        t, s, plan = self.cfg.train, self.state, self.plan
        recent = sum(self._step_times) / len(self._step_times)
        # every rank must change the plan alike: they agree on the mean pace and time left
        pace, left = (v / self.dist.world for v in self.dist.sum([recent, max(self.deadline - time.monotonic(), 0.0)]))
        fits = s.step + math.floor(left / (pace + self._overhead_s))
        if t.max_steps:
            fits = min(fits, t.max_steps)
        fits = max(fits, s.step, plan.warmup_steps)
        grow = s.step >= plan.total_steps / 10 and fits > plan.total_steps * (1 + GROW_MARGIN)
        if fits < plan.total_steps or grow:
            self.log(f"time budget: {pace:.3f}s per step over the last {len(self._step_times)} steps: "
                     f"re-planned from {plan.total_steps} to {fits} steps")
            plan.total_steps, plan.warmup_steps = fits, warmup_steps(t, fits)
            plan.epochs = max(plan.epochs, math.ceil(fits / plan.steps_per_epoch))
            self.dist.on_main(self._write_run_info)  # run.json holds the plan being followed

    # ------------------------------------------------------------ the loop

    def run(self) -> dict:
        if self.plan_restored:
            self.log(f"resume: keeping the time budget's plan of {self.plan.total_steps} steps "
                     "(the budget's clock is not re-applied to a resumed run)")
        cfg, t, s, plan = self.cfg, self.cfg.train, self.state, self.plan
        n_params = self.model.num_params()
        self.log(f"model: {n_params:,} parameters; device {self.device}, {self.precision}, {self.threads} threads")
        if self.peak_flops:
            self.log(f"MFU against {self.peak_flops / 1e9:,.0f} GFLOP/s ({self.peak_source}), "
                     f"{self.flops_per_token / 1e6:,.1f} MFLOP per token")
        splits = self.data.meta.get("splits", {})
        counts = ", ".join(f"{k} {v.get('stories', 0):,} stories / {v.get('tokens', 0):,} tokens"
                           for k, v in splits.items())
        self.log(f"data: {counts}; train has {len(self.train_ds):,} "
                 f"{'windows' if cfg.data.batching == 'pack' else 'rows'} of <= {cfg.data.seq_len} tokens")
        if self.dist.enabled:
            self.log(f"distributed: {self.dist.describe()}; each reads its share of every global batch")
        self.log(f"plan: {plan.total_steps} steps ({plan.steps_per_epoch} per epoch, {plan.epochs} epoch(s)), "
                 f"{self._batch_text()} ({self.dist.world * t.batch_size * t.grad_accum * cfg.data.seq_len:,} "
                 f"tokens at most) per step, warm-up {plan.warmup_steps} steps, {t.schedule} schedule, "
                 f"peak lr {t.lr:g}")
        from tqdm import tqdm

        stopped = None
        timed_tokens, window_start = 0, time.perf_counter()  # throughput since the last report
        with StopRequest(quiet=not self.dist.is_main) as stop:
            while s.epoch < plan.epochs and s.step < plan.total_steps and stopped is None:
                left = min(plan.steps_per_epoch - s.batch_in_epoch // t.grad_accum, plan.total_steps - s.step)
                bar = tqdm(total=left, desc=f"epoch {s.epoch + 1}/{plan.epochs}", disable=not self.progress,
                           leave=False, dynamic_ncols=True)
                micro: list[dict] = []
                for batch in self.loader(self.train_ds, s.epoch, s.batch_in_epoch):
                    micro.append(batch)
                    if len(micro) < t.grad_accum:
                        continue
                    began = time.perf_counter()
                    loss, grad_norm, n_tok = self.train_step(micro)
                    self._step_times.append(time.perf_counter() - began)
                    s.batch_in_epoch += len(micro)
                    micro = []
                    s.epoch_loss_sum += loss * n_tok
                    s.epoch_tokens += n_tok
                    s.window_loss_sum += loss * n_tok
                    s.window_tokens += n_tok
                    timed_tokens += n_tok
                    lr = lr_at(s.step - 1, t, plan.total_steps)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

                    if s.step % t.report_every == 0 or s.step == plan.total_steps:
                        elapsed = time.perf_counter() - window_start
                        tps = timed_tokens / max(elapsed, 1e-9)
                        mean = s.window_loss_sum / max(s.window_tokens, 1)
                        # MFU of the real (non-padding) tokens: padding is compute that teaches nothing
                        peak = self.peak_flops * self.dist.world if self.peak_flops else None
                        mfu = tps * self.flops_per_token / peak if peak else None
                        mfu_text = f", MFU {mfu:.1%}" if mfu is not None else ""
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                                        mfu=mfu_text[6:] or "n/a")
                        self.metrics.write({"kind": "train", "step": s.step, "epoch": s.epoch + 1,
                                            "train_loss": mean, "train_perplexity": math.exp(min(mean, 700)),
                                            "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps, "mfu": mfu,
                                            "tokens": s.tokens_seen, "time": time.time()})
                        self.log(f"step {s.step}/{plan.total_steps}: loss {mean:.4f}, lr {lr:.2e}, "
                                 f"{tps:,.0f} tok/s{mfu_text}")
                        s.window_loss_sum, s.window_tokens = 0.0, 0
                        timed_tokens, window_start = 0, time.perf_counter()
                        self.replan()

                    if t.eval_every and s.step % t.eval_every == 0:
                        self.validate(full=False)
                        window_start = time.perf_counter()  # evaluation time is not training throughput
                    if t.checkpoint_every and s.step % t.checkpoint_every == 0:
                        self._save(f"{cfg.name}_checkpoint_step{s.step:07d}", "step", resumable=True)
                        window_start = time.perf_counter()
                    # every rank stops at the same step: a signal or the deadline seen by one is seen by all
                    late = self.deadline is not None and time.monotonic() > self.deadline
                    signalled, late = (v > 0 for v in self.dist.sum([float(stop.requested), float(late)]))
                    if self.should_stop_early():
                        stopped = "early stopping"
                    elif late and s.step < plan.total_steps:
                        stopped = "time budget"
                    elif self.stop_after and s.step >= self.stop_after:
                        stopped = f"stop-after {self.stop_after}"
                    elif signalled:
                        stopped = "signal"
                    if stopped or s.step >= plan.total_steps:
                        break
                bar.close()
                epoch_done = s.batch_in_epoch >= plan.steps_per_epoch * t.grad_accum
                if epoch_done and s.epoch_tokens:
                    mean = s.epoch_loss_sum / s.epoch_tokens
                    self.log(f"epoch {s.epoch + 1}: train loss {mean:.4f}, perplexity {math.exp(min(mean, 700)):.2f}")
                if epoch_done and stopped is None and s.step < plan.total_steps and self.deadline is not None:
                    # an epoch's end validates and saves; when that would run past the deadline the
                    # run stops here, and its end validates this very model once, in the time kept
                    # for it (not twice, late)
                    late = time.monotonic() + self._epoch_end_s > self.deadline
                    if self.dist.sum([float(late)])[0] > 0:
                        stopped, epoch_done = "time budget", False
                if epoch_done:
                    self.validate(full=t.epoch_val == "full")
                    s.epoch, s.batch_in_epoch, s.epoch_loss_sum, s.epoch_tokens = s.epoch + 1, 0, 0.0, 0
                    self._save(f"{cfg.name}_checkpoint_epoch{s.epoch}", "epoch", resumable=True)
                    if stopped is None and self.should_stop_early():
                        stopped = "early stopping"

            if stopped is not None and stopped not in ("early stopping", "time budget"):  # a pause: resumable
                path = self._save(f"{cfg.name}_checkpoint_step{s.step:07d}", "step", resumable=True)
                self.log(f"stopped ({stopped}) at step {s.step}; checkpoint {path}; "
                         f"resume with: cairn train --resume {self.out}")
                return {"stopped": stopped, "step": s.step, "checkpoint": str(path)}

        if stopped == "early stopping":
            self.log(f"early stopping at step {s.step}: no better validation loss in {t.patience} evaluations "
                     f"(best {s.best_val_loss:.4f})")
        if stopped == "time budget":
            self.log(f"time budget: the machine ran slower than measured; stopping at step {s.step} of the "
                     f"{plan.total_steps} planned, to end in time")
        if self._last_full_val_step != s.step:  # the end's figure is always the whole split's
            self.validate(full=True)
        final = self._save(f"{cfg.name}_final", "final", resumable=True)
        summary = {"step": s.step, "tokens": s.tokens_seen, "best_val_loss": _json_float(s.best_val_loss),
                   "final": str(final), "stopped": stopped}
        if t.test_at_end and self.test_ds is not None:
            r = self.evaluate(self.test_ds)
            self.metrics.write({"kind": "test", "step": s.step, "epoch": min(s.epoch + 1, plan.epochs),
                                "test_loss": r["loss"],
                                "test_perplexity": r["perplexity"], "test_bits_per_byte": r["bits_per_byte"],
                                "test_tokens": r["tokens"]})
            self.log(f"test: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}, "
                     f"{r['bits_per_byte']:.3f} bits/byte over {r['tokens']:,} tokens")
            summary["test"] = r
        self.log(f"final checkpoint: {final}")
        if t.end_stories:
            summary["stories"] = self.write_stories()
        summary["seconds"] = time.monotonic() - self.started
        self.log(f"done in {summary['seconds']:.0f}s")
        return summary

    def write_stories(self) -> list[dict]:
        """Stories from fixed prompts and seeds, so runs can be compared by eye; saved to RUN/stories.md."""
        from ..generate import SamplingConfig, generate_text

        t, stories = self.cfg.train, []
        self.model.eval()
        for i in range(t.end_stories):
            prompt = END_PROMPTS[i % len(END_PROMPTS)]
            s = SamplingConfig(max_new_tokens=t.end_story_tokens, temperature=0.8, top_k=50, seed=i + 1)
            with autocast(self.device, self.precision):
                text = generate_text(self.model, self.tokenizer, prompt, s)
            stories.append({"prompt": prompt, "seed": s.seed, "text": prompt + text})
        body = "".join(f"## Story {i + 1} (seed {st['seed']}, temperature 0.8, top-k 50)\n\n{st['text'].strip()}\n\n"
                       for i, st in enumerate(stories))
        # every rank generated (FSDP needs them all for each forward); rank 0 writes
        text = f"# Stories from {self.cfg.name}, step {self.state.step}\n\n" + body
        self.dist.on_main(lambda: ckpt.write_atomic_text(self.out / "stories.md", text), share_result=False)
        for i, st in enumerate(stories):
            self.log(f"story {i + 1}: {st['text'].strip()}")
        self.log(f"stories saved to {self.out / 'stories.md'}")
        return stories


def _quiet(msg: str) -> None:
    pass


def _masked_row(ds) -> dict:
    """A one-row batch whose targets are all padding: a forward pass that counts nothing."""
    x = ds[0]["input_ids"][None]
    return {"input_ids": x, "labels": torch.full_like(x, -100)}


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, stop_after: int = 0,
          log: Callable[[str], None] = print, progress: bool = False, started: Optional[float] = None) -> dict:
    """Train a model as `cfg` says, writing everything into `out_dir`. Returns a summary.
    `started` (time.monotonic()) is when the command began: a time budget counts from there.

    Under torchrun every process calls this; they train one model together (see distributed.py)."""
    started = time.monotonic() if started is None else started
    validate(cfg)
    with session(cfg.train, log) as dist:
        trainer = Trainer(cfg, Path(out_dir), resume, stop_after, log, progress, dist, started)
        try:
            return trainer.run()
        finally:
            if trainer.tb is not None:
                trainer.tb.close()
