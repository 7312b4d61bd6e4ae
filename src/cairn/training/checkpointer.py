"""Saving checkpoints during a run: atomic writes, the `latest` pointer, keeping the newest K.

Every rank takes part in a save (FSDP gathers the shards onto rank 0); rank 0 alone writes, and
the others wait for it, so none goes on to read or replace a half-written checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cairn.checkpoint import store as ckpt
from cairn.util import files
from cairn.util.errors import CairnError
from cairn.util.failures import storage_problem
from cairn.training.rundir import RunDir


class Checkpointer:
    def __init__(self, run: RunDir, dist, prefix: str, keep: int):
        self.run, self.dist, self.prefix, self.keep = run, dist, prefix, keep
        self.dir = run.checkpoints

    def newest(self) -> Optional[Path]:
        return ckpt.latest(self.dir) if self.dir.is_dir() else None

    def clean_up(self) -> None:
        """What a killed writer left behind (only while this process is the run's one writer)."""
        files.restore_leftovers(self.dir)

    def save(self, name: str, weights: dict, meta: dict, trainer_state: Optional[dict], step: int) -> Path:
        """Write checkpoint `name`; a resumable one becomes `latest`, then older step checkpoints
        beyond `keep` go."""
        return self.dist.on_main(lambda: self._write(self.dir / name, weights, meta, trainer_state, step))

    def _write(self, path: Path, weights: dict, meta: dict, trainer_state: Optional[dict], step: int) -> Path:
        try:
            ckpt.save_checkpoint(path, weights, meta, trainer_state)
        except Exception as e:  # noqa: BLE001 - torch and safetensors wrap the OS error in their own types
            problem = storage_problem(e, str(self.dir))
            if problem is None:
                raise
            raise CairnError(f"could not write checkpoint {path} at step {step} ({problem.what}): stopped; the "
                             f"newest good checkpoint is {self.newest() or 'none'}; {problem.advice}, then resume "
                             f"with: cairn train --resume {self.run.path}") from None
        if trainer_state is not None:
            ckpt.set_latest(path)
            ckpt.prune(self.dir, self.prefix, self.keep)
        return path
