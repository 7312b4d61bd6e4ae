"""The end of a run on its best weights: when the last validation was not the best, the best
validated weights and the last ones are both scored on the whole validation split, and the run
ends on the better (as `load_best_model_at_end` does in Hugging Face's Trainer).

A time budget plans the steps ahead of time from a measured pace; on a small dataset the last of
them can overfit (a 10-minute CPU run takes ten epochs of 0.9M tokens), and the final weights are
then not the run's best model. The last state is kept as a resumable checkpoint, so resuming still
continues exactly where the steps stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from cairn.checkpoint import store as ckpt
from cairn.data.formats import Rows
from cairn.model.transformer import Transformer
from cairn.training.distributed import Dist
from cairn.training.rundir import MetricsLog

log = logging.getLogger(__name__)


def best_weights_step(best: Path, step_now: int) -> Optional[int]:
    """The step of the run's best checkpoint `best`, when it holds other weights than the model's now."""
    if not (best / "state.json").is_file():
        return None
    step = ckpt.read_checkpoint(best).meta["state"]["step"]
    return step if step != step_now else None


def end_on_best(best: Path, last: dict[str, float], *, step_now: int, model: Transformer, dist: Dist,
                score: Callable[[Rows, int], dict[str, float]], val: Rows, metrics: MetricsLog,
                keep_last: Callable[[], object], max_batches: int = 0) -> Optional[int]:
    """Score the best checkpoint's weights (`best`) on the whole validation split `val` (its first
    `max_batches` batches, 0 = all: the ones `last` was scored on) against `last` (the last weights'
    result); keep the better in the model. When that is the best, `keep_last` saves the last state
    first. Returns the best weights' step when the run ends on them, else None."""
    step = dist.on_main(lambda: best_weights_step(best, step_now))
    if step is None:
        return None
    # this rank's own tensors (under FSDP its shards), to put back if the last weights stay
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # every rank reads the best checkpoint, as every rank reads the one a run resumes from
    best_weights = ckpt.read_checkpoint(best).model_state()
    dist.load_full_weights(model, best_weights)
    r = score(val, max_batches)
    better = r["loss"] < last["loss"]
    model.load_state_dict(current)
    if better:
        keep_last()  # the last state, saved before the model takes the best weights for good
        dist.load_full_weights(model, best_weights)
    metrics.write({"kind": "end_on_best", "step": step_now, "best_step": step,
                   "last_val_loss": last["loss"], "best_val_loss": r["loss"],
                   "last_val_bits_per_byte": last["bits_per_byte"], "best_val_bits_per_byte": r["bits_per_byte"],
                   "ends_on": "best" if better else "last"})
    if better:
        log.info(f"end: step {step}'s weights (the best validated) score {r['bits_per_byte']:.3f} bits/byte on the "
                 f"whole validation split, the last ones (step {step_now}) {last['bits_per_byte']:.3f}: "
                 f"the run ends on step {step}'s")
        return step
    log.info(f"end: the last weights score {last['bits_per_byte']:.3f} bits/byte on the whole validation split, "
             f"step {step}'s (the best of the samples) {r['bits_per_byte']:.3f}: the run ends on the last ones")
    return None
