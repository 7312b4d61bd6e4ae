"""Saving and restoring a run through its parts: one checkpointer, symmetric.

A resumable checkpoint is the state of the run's `Stateful` parts (`checkpoint.schema.PARTS` says
which file each goes to): `save` asks each part for its `state_dict` and writes the files
atomically; `restore` checks the files first (every problem a one-line error naming the file and
the field), then hands each part its state back. Past the checks nothing is caught: an exception
while loading checked state is a bug in cairn, and surfaces as one.

Every rank takes part in a save (FSDP gathers the shards onto rank 0); rank 0 alone writes, and
the others wait for it, so none goes on to read or replace a half-written checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from cairn.checkpoint import store as ckpt
from cairn.checkpoint.schema import PARTS, STATE, TRAINER, WEIGHTS, Stateful
from cairn.checkpoint.verify import optimizer_problem, state_problem, tensors_problem, torch_rng_problem
from cairn.model.transformer import Transformer
from cairn.training.distributed import Dist
from cairn.training.optim import Optimizer
from cairn.training.rundir import RunDir
from cairn.util import files
from cairn.util.errors import CairnError
from cairn.util.failures import storage_problem


class ModelWeights:
    """The weights, whole (gathered from FSDP's shards on save, scattered into them on load)."""

    def __init__(self, model: Transformer, dist: Dist):
        self.model, self.dist = model, dist

    def state_dict(self) -> dict[str, Any]:
        return dict(self.dist.full_weights(self.model))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dist.load_full_weights(self.model, state)


class OptimizerState:
    """The optimizer's state, keyed by parameter name whatever wrapped the model."""

    def __init__(self, model: Transformer, optimizer: Optimizer, dist: Dist):
        self.model, self.optimizer, self.dist = model, optimizer, dist

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.dist.optimizer_state(self.model, self.optimizer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dist.load_optimizer_state(self.model, self.optimizer, state["optimizer"])


def seed_rank(seed: int, step: int, rank: int) -> None:
    """Every rank drew the same initial weights; from here on their dropout masks must differ."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))  # seeds CUDA too


class TorchRng:
    """torch's generators: the process's (and CUDA's), or under torchrun every rank's own dropout stream."""

    def __init__(self, dist: Dist, seed: int, step: Callable[[], int]):
        self.dist, self.seed, self.step = dist, seed, step
        self.changed_world = False  # restored with another number of processes

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
        if self.dist.enabled:
            # every rank's own dropout stream, so a resume with as many processes continues each
            state["rank_rng"] = self.dist.gather_objects(self._rank_rng())
        elif torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def _rank_rng(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state()}
        if self.dist.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.dist.device)
        return rng

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks, dist = state.get("rank_rng"), self.dist
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
            seed_rank(self.seed, self.step(), dist.rank)
            self.changed_world = True


class PythonRng:
    """Python's and NumPy's generators (the data order draws from neither, but user code may)."""

    def state_dict(self) -> dict[str, Any]:
        return {"rng": ckpt.rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ckpt.set_rng_state(state["rng"])


class Checkpointer:
    """Writes a run's checkpoints (atomic, `latest`, keep-K) and restores a run from one."""

    def __init__(self, run: RunDir, dist: Dist, prefix: str, keep: int):
        self.run, self.dist, self.prefix, self.keep = run, dist, prefix, keep
        self.dir = run.checkpoints

    def newest(self) -> Optional[Path]:
        return ckpt.latest(self.dir) if self.dir.is_dir() else None

    def clean_up(self) -> None:
        """What a killed writer left behind (only while this process is the run's one writer)."""
        files.restore_leftovers(self.dir)

    def path(self, name: str) -> Path:
        return self.dir / f"{self.prefix}_{name}"

    # ------------------------------------------------------------ saving

    def save(self, name: str, parts: dict[str, Stateful], meta: dict[str, Any], resumable: bool, step: int) -> Path:
        """Write checkpoint `<prefix>_<name>` from `parts`; a resumable one holds every part and
        becomes `latest`, then older step checkpoints beyond `keep` go. One that is not resumable
        (the best weights, a run's end on them) holds the weights and state.json only."""
        by_file: dict[str, dict[str, Any]] = {WEIGHTS: {}, TRAINER: {}, STATE: {}}
        for part, where in PARTS.items():
            if where != TRAINER or resumable:  # every rank takes part: gathers are collective
                by_file[where].update(parts[part].state_dict())
        path = self.path(name)
        trainer = by_file[TRAINER] if resumable else None
        return self.dist.on_main(lambda: self._write(path, by_file[WEIGHTS], {**meta, **by_file[STATE]}, trainer,
                                                     step))

    def _write(self, path: Path, weights: dict[str, Any], meta: dict[str, Any], trainer: Optional[dict[str, Any]],
               step: int) -> Path:
        try:
            ckpt.save_checkpoint(path, weights, meta, trainer)
        except Exception as e:  # noqa: BLE001 - torch and safetensors wrap the OS error in their own types
            problem = storage_problem(e, str(self.dir))
            if problem is None:
                raise
            raise CairnError(f"could not write checkpoint {path} at step {step} ({problem.what}): stopped; the "
                             f"newest good checkpoint is {self.newest() or 'none'}; {problem.advice}, then resume "
                             f"with: cairn train --resume {self.run.path}") from None
        if trainer is not None:
            ckpt.set_latest(path)
            ckpt.prune(self.dir, self.prefix, self.keep)
        return path

    # ------------------------------------------------------------ restoring

    def read(self, path: Path, model: Transformer, compatible: Callable[[ckpt.Checkpoint], object]
             ) -> tuple[ckpt.Checkpoint, dict[str, dict[str, Any]]]:
        """Checkpoint `path` and its files' contents by file, every file checked against the schema,
        `compatible` (the run's own rules: same model, same tokenizer) and `model`; CairnError (one
        line, naming what is wrong) for anything that does not fit."""
        c = ckpt.read_checkpoint(path)
        problem = state_problem(c.meta)
        if problem is None:
            compatible(c)
            problem = tensors_problem(path / WEIGHTS, model.weights())
        if problem:
            raise CairnError(f"cannot resume from {path}: {problem}; resume from another checkpoint, or delete this "
                             "one and resume again (the newest good one is then used)")
        trainer = c.trainer_state()
        problem = optimizer_problem(trainer.get("optimizer") if isinstance(trainer, dict) else None,
                                    dict(model.named_parameters()))
        if problem:
            raise CairnError(f"{path}/{TRAINER} does not fit this model ({problem}): resume from another checkpoint")
        problem = torch_rng_problem(trainer)
        if problem:
            raise CairnError(f"{path}/{TRAINER} holds no valid random-generator state ({problem}): resume from "
                             "another checkpoint")
        return c, {WEIGHTS: c.model_state(), TRAINER: trainer, STATE: c.meta}

    @staticmethod
    def restore(parts: dict[str, Stateful], contents: dict[str, dict[str, Any]]) -> None:
        """Hand every part its state back, from the checked contents `read` gave."""
        for part, where in PARTS.items():
            parts[part].load_state_dict(contents[where])
